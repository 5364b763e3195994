"""The Triton tile plan of block_sparse on CUDA: its masks and transposed layout against the
pattern (runs everywhere), and the kernels themselves under Triton's CPU interpreter (where
Triton is installed; CPU builds of PyTorch come without it, so CI skips that one and
tests/test_cuda.py checks the kernels on a GPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cuda import CASES

from sparsebench.backends.block_sparse import triton as _triton
from sparsebench.patterns.base import PATTERNS, Pattern
from sparsebench.patterns.geometry import Band, Structure

N = 300


def plan_mask(plan: _triton.TilePlan) -> torch.Tensor:
    """The (n, n) mask a tile plan computes: full tiles whole, partial tiles from their bits."""
    B, nb = plan.block, plan.num_blocks
    big = torch.zeros(nb * B, nb * B, dtype=torch.bool)
    bits = (plan.bits.long()[..., None] >> torch.arange(32)) & 1  # (P, B, B/32, 32)
    crow, col, part = plan.crow.long(), plan.col.long(), plan.part.long()
    for qb in range(nb):
        for t in range(crow[qb], crow[qb + 1]):
            tile = torch.ones(B, B, dtype=torch.bool) if part[t] < 0 else bits[part[t]].reshape(B, B).bool()
            big[qb * B : (qb + 1) * B, col[t] * B : (col[t] + 1) * B] = tile
    n = plan.n
    assert not big[n:].any() and not big[:, n:].any(), "pairs past the end of the sequence are on"
    return big[:n, :n]


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_tile_plan_is_the_pattern(name, params, causal, block):
    pat = PATTERNS.get(name).from_params(params)
    plan = _triton.build(pat, N, causal, 64, "cpu", block)
    assert torch.equal(plan_mask(plan), pat.mask(N, causal))
    # the transposed layout lists the same tiles, by key block
    rows = torch.repeat_interleave(torch.arange(plan.num_blocks), (plan.crow[1:] - plan.crow[:-1]).long())
    by_key = plan.tile.long()
    assert torch.equal(torch.sort(by_key).values, torch.arange(plan.col.numel()))
    assert torch.equal(plan.row.long(), rows[by_key])
    kb = torch.repeat_interleave(torch.arange(plan.num_blocks), (plan.ccol[1:] - plan.ccol[:-1]).long())
    assert torch.equal(plan.col.long()[by_key], kb)


def parts_masks(pp: _triton.PartsPlan) -> list[torch.Tensor]:
    """Each part's (n, n) mask in the natural order."""
    masks = []
    for part in pp.parts:
        m = plan_mask(part.plan)
        masks.append(m if part.inv is None else m[part.inv.cpu()][:, part.inv.cpu()])
    return masks


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "name,params",
    [("strided", {"stride": 17}), ("strided", {"stride": 64}), ("dilated_window", {"window": 16, "dilation": 3})],
)
def test_residue_parts_are_the_pattern(monkeypatch, name, params, causal):
    """Residue bands reordered by residue class, and the rest in order: disjoint, and together
    the pattern."""
    monkeypatch.setattr(_triton, "PARTS", "always")
    pat = PATTERNS.get(name).from_params(params)
    pp = _triton.build(pat, N, causal, 64, "cpu", 32)
    assert isinstance(pp, _triton.PartsPlan) and any(p.perm is not None for p in pp.parts)
    masks = parts_masks(pp)
    total = torch.stack(masks).sum(0)
    assert int(total.max()) == 1  # no pair twice
    assert torch.equal(total.bool(), pat.mask(N, causal))


@dataclass(frozen=True, kw_only=True)
class FarColumns(Pattern):
    """Residue pairs i - j = mL, |m| >= 2, and nothing else: two residue bands of one step and
    no rest part (tiles both bands touch are recounted in residue order)."""

    name = "far_columns"

    def _allowed(self, q, k, n, causal):
        d = q - k
        return (d % 40 == 0) & (d.abs() >= 80)

    def structure(self, n, causal):
        big = n // 40 + 1
        return Structure(n, causal, (Band(2, big, 40), Band(-big, -2, 40)))


@dataclass(frozen=True, kw_only=True)
class TwoSteps(Pattern):
    """Residue bands of steps 2 and 3 that meet (i - j = 6): each pair once."""

    name = "two_steps"

    def _allowed(self, q, k, n, causal):
        d = (q - k).abs()
        return ((d % 2 == 0) & (d <= 8)) | ((d % 3 == 0) & (d <= 9))

    def structure(self, n, causal):
        return Structure(n, causal, (Band(-4, 4, 2), Band(-3, 3, 3)))


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pat", [FarColumns(), TwoSteps()], ids=["far_columns", "two_steps"])
def test_residue_parts_of_unusual_structures(monkeypatch, pat, causal, block):
    monkeypatch.setattr(_triton, "PARTS", "always")
    masks = parts_masks(_triton.build(pat, N, causal, 64, "cpu", block))
    total = torch.stack(masks).sum(0)
    assert int(total.max()) == 1
    assert torch.equal(total.bool(), pat.mask(N, causal))


@pytest.mark.slow
def test_residue_parts_where_they_save_tiles():
    """Strided columns cover nearly every tile in order but few by residue class; a dilated window
    is a band either way; patterns without residue bands have one plan."""
    n = 16384
    strided = _triton.build(PATTERNS.get("strided").from_params({"stride": 128}), n, True, 64, "cpu", 64)
    assert isinstance(strided, _triton.PartsPlan)
    whole = PATTERNS.get("strided").from_params({"stride": 128}).block_layout(n, 64, True).nnz_blocks
    assert strided.tiles * 10 < whole
    dilated = _triton.build(
        PATTERNS.get("dilated_window").from_params({"window": 128, "dilation": 2}), n, True, 64, "cpu", 64
    )
    assert isinstance(dilated, _triton.TilePlan)
    assert isinstance(
        _triton.build(PATTERNS.get("sliding_window").from_params({"window": 256}), n, True, 64, "cpu", 64),
        _triton.TilePlan,
    )


def test_pack_bits_round_trip():
    m = torch.rand(3, 5, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    words = _triton._pack_bits(m)
    assert words.dtype == torch.int32 and words.shape == (3, 5, 2)
    back = ((words.long()[..., None] >> torch.arange(32)) & 1).flatten(-2).bool()
    assert torch.equal(back, m)


def test_tiles_past_the_end_are_off():
    pat = PATTERNS.get("dense").from_params({})
    plan = _triton.build(pat, 70, False, 64, "cpu", 64)  # a short last block of 6
    assert plan.part.tolist() == [-1, 0, 1, 2]  # only the tile of two whole blocks is full
    assert torch.equal(plan_mask(plan), torch.ones(70, 70, dtype=torch.bool))


def test_tile_size():
    assert [_triton.tile_size(b, 64) for b in (16, 32, 50, 64, 100, 128, 4096)] == [32, 32, 32, 64, 64, 128, 128]
    assert [_triton.tile_size(128, d) for d in (16, 128, 256)] == [128, 128, 64]
    plan = _triton.build(PATTERNS.get("dense").from_params({}), 300, True, 256, "cpu", 128)
    assert plan.block == 64


def test_prune_keeps_settings_that_fit():
    """The autotuner's candidates: SUB is the whole tile or half of it (from 64 up), and the
    (SUB, head_dim) accumulator stays within 64 x 128 (else the smallest SUB); never none."""
    configs = [SimpleNamespace(kwargs={"SUB": sub}, w=w) for sub in (64, 128, 32) for w in (4, 8)]
    expect = {(32, 64): {32}, (64, 64): {32, 64}, (64, 128): {32, 64}, (64, 256): {32},
              (128, 64): {64, 128}, (128, 128): {64}, (128, 256): {32}}  # fmt: skip
    for (block, d), subs in expect.items():
        kept = _triton._prune(configs, {"BLOCK": block}, D=d, PRECISION="tf32")
        assert {c.kwargs["SUB"] for c in kept} == subs, (block, d)
        assert len(kept) == 2 * len(subs)


def test_launch_refuses_a_plan_of_another_length():
    plan = _triton.build(PATTERNS.get("dense").from_params({}), 300, True, 64, "cpu", 64)
    with pytest.raises(ValueError, match="n = 300"):
        _triton._launch(torch.zeros(1, 2, 299, 64), plan)
    assert not _triton.supports(64, torch.float32, groups=_triton.MAX_GROUPS + 1)
    assert not _triton.supports(96, torch.float32) and not _triton.supports(64, torch.float64)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU builds of PyTorch have none)"
)
def test_kernels_under_the_interpreter():
    script = Path(__file__).with_name("triton_interpreted.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
