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


# ------------------------------------------------------------------------------------------
# content-selected patterns on CUDA (triton_selected.py): the per-call tables and the dispatch
# run everywhere; the kernels under the interpreter where Triton is installed


def _selection(name, params, n=300, heads=4, kv_heads=2, batch=2, d=32):
    from sparsebench.patterns.base import PATTERNS as P

    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, n, d, generator=g)
    k = torch.randn(batch, kv_heads, n, d, generator=g)
    return P.get(name).from_params(params).select(q, k)


UNIT_SELECTIONS = [
    ("moba", {"chunk": 50, "topk": 3}),
    ("quest", {"page_size": 16, "token_budget": 64}),
    ("quest", {"page_size": 4, "token_budget": 64}),  # unions of more than 32 pages: several words per row
    ("moba", {"chunk": 20, "topk": 1}),  # own chunk only
]


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("name,params", UNIT_SELECTIONS, ids=[f"{n}-{sorted(p.values())}" for n, p in UNIT_SELECTIONS])
def test_unit_tables_are_the_selection(name, params, block):
    """Per block of query rows, the union is exactly the units its rows chose (ascending, -1
    padding, counted), and each row's bits over it give back the row's own units."""
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    sel = _selection(name, params)
    B, H, n, _ = sel.index.shape
    tables = _tsel.unit_tables(sel, block)
    G, nb = B * H, -(-n // block)
    assert tables.union.shape[:2] == (G, nb) and tables.chose.shape[:2] == (G, nb * block)
    assert tables.union.dtype == tables.count.dtype == tables.chose.dtype == torch.int32
    assert tables.words == -(-tables.width // 32)
    chosen = sel.unit_table().reshape(G, n, -1)  # (G, n, units)
    assert torch.equal(tables.unit_table(), chosen)
    # the union of a block: the units any of its rows chose, nothing more, ascending, then -1
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, nb * block - n)).view(G, nb, block, -1).any(2)
    units = torch.arange(padded.shape[-1])
    for gi in range(G):
        for b in range(nb):
            want = units[padded[gi, b]]
            c = int(tables.count[gi, b])
            assert c == want.numel()
            assert torch.equal(tables.union[gi, b, :c].long(), want)
            assert bool((tables.union[gi, b, c:] == -1).all())
    assert not tables.chose[:, n:].any()  # rows past the end choose nothing
    if params.get("page_size") == 4:
        assert tables.words > 1


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("name,params", UNIT_SELECTIONS, ids=[f"{n}-{sorted(p.values())}" for n, p in UNIT_SELECTIONS])
def test_unit_pairs_are_the_selection(name, params, block):
    """The key-major tables: every (row, unit) pair of the selection once, under its own unit's
    programs, rows ascending; each program at most ``block`` pairs of one (sequence, unit), the
    programs of a unit contiguous and covering its pairs; ``where`` finds each pair in the index."""
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    sel = _selection(name, params)
    B, H, n, S = sel.index.shape
    G, units = B * H, sel.units
    pairs = _tsel.unit_pairs(sel, block)
    assert pairs.rows.numel() == int((sel.index >= 0).sum())
    assert torch.equal(pairs.unit_table(G), sel.unit_table().reshape(G, n, units))
    start, end, cell = pairs.start.long(), pairs.end.long(), pairs.cell.long()
    assert bool(((end - start >= 1) & (end - start <= block)).all())
    assert torch.equal(start[1:], end[:-1]) and int(start[0]) == 0 and int(end[-1]) == pairs.rows.numel()
    assert bool((cell[1:] >= cell[:-1]).all())  # by sequence and unit
    # the pairs of one cell: its rows ascending; ``where`` points at the slot that names the unit
    flat = sel.index.reshape(-1).long()
    assert torch.equal(flat[pairs.where], cell.repeat_interleave(end - start) % units)
    assert torch.equal(pairs.where // S % n, pairs.rows.long())
    assert torch.equal(pairs.where // (n * S), cell.repeat_interleave(end - start) // units)
    same = cell.repeat_interleave(end - start)
    step = pairs.rows.long()[1:] - pairs.rows.long()[:-1]
    assert bool((step[same[1:] == same[:-1]] > 0).all())


def test_pairs_bytes_bound_the_pairs():
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    sel = _selection("quest", {"page_size": 4, "token_budget": 64})
    B, H, n, S = sel.index.shape
    pairs = _tsel.unit_pairs(sel, 64)
    held = sum(t.numel() * t.element_size() for t in (pairs.rows, pairs.where, pairs.cell, pairs.start, pairs.end))
    held += pairs.rows.numel() * 4 + B * H * n * S * 4  # the pairs' log-sum-exps and their table
    assert held <= _tsel.pairs_bytes(B * H, n, S, 64)


def test_unit_tables_by_chunks_of_blocks(monkeypatch):
    """Built a few blocks at a time (chunks of different union widths), the tables are the same."""
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    sel = _selection("quest", {"page_size": 4, "token_budget": 64})
    whole = _tsel.unit_tables(sel, 32)
    monkeypatch.setattr(_tsel, "TABLE_CHUNK_ELEMS", 3 * 32 * sel.index.shape[-1])  # 3 blocks a chunk
    chunked = _tsel.unit_tables(sel, 32)
    for name in ("union", "count", "chose"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name


@pytest.mark.parametrize("name,params", UNIT_SELECTIONS[:3])
def test_table_bytes_bound_the_tables(name, params):
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    sel = _selection(name, params, d=64)
    B, H, n, slots = sel.index.shape
    tables = _tsel.unit_tables(sel, _tsel.block_sizes(sel.unit, 64)[0])
    held = sum(t.numel() * 4 for t in (tables.union, tables.count, tables.chose))
    assert held <= _tsel.table_bytes(B * H, n, sel.unit, slots, 64)


def _selected_problem(name, params, device="cuda", **kw):
    from sparsebench.backends.base import Problem

    base = dict(seq_len=300, causal=True, batch=1, heads=4, head_dim=32, dtype=torch.float16, kv_heads=2)
    return Problem(PATTERNS.get(name).from_params(params), device=torch.device(device), **{**base, **kw})


@pytest.fixture
def triton_here(monkeypatch):
    """As on a GPU machine with Triton: its kernels count as available (none is launched)."""
    monkeypatch.setattr(_triton, "unavailable", lambda device: None)


def test_content_selected_on_cuda_runs_the_triton_path(monkeypatch, triton_here):
    """On CUDA with Triton, block_sparse's callable for a content-selected pattern selects from
    the call's q and k and hands that selection to the Triton kernels' ``attend`` (and back
    through ``fn.selected``); on the CPU it stays on the native path."""
    from sparsebench.backends.base import BACKENDS
    from sparsebench.backends.block_sparse import selected as _selected
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    seen = []

    def attend(q, k, v, selection):
        seen.append(selection)
        return torch.full_like(q, 7.0)

    monkeypatch.setattr(_tsel, "attend", attend)
    backend = BACKENDS.get("block_sparse")()
    for name, params in CASES_SELECTED:
        p = _selected_problem(name, params)
        assert backend.unsupported(p) is None
        fn = backend.prepare(p)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 300, 32, generator=g)
        k, v = (torch.randn(1, 2, 300, 32, generator=g) for _ in range(2))
        out, selection = fn.selected(q, k, v)
        assert seen[-1] is selection and bool((out == 7).all())
        assert torch.equal(selection.index, p.pattern.select(q, k).index)
    native = object()
    monkeypatch.setattr(_selected, "prepare", lambda p: native)
    assert backend.prepare(_selected_problem("moba", {"chunk": 50, "topk": 3}, device="cpu")) is native


def test_content_selected_on_cuda_says_what_it_cannot_run(monkeypatch, triton_here):
    from sparsebench.backends import block_sparse
    from sparsebench.backends.base import BACKENDS

    backend = BACKENDS.get("block_sparse")()
    moba = ("moba", {"chunk": 50, "topk": 3})
    assert backend.unsupported(_selected_problem(*moba, mode="backward")) is None  # backward on Triton too
    assert "power of two from 16 to 256 (not 96)" in backend.unsupported(_selected_problem(*moba, head_dim=96))
    assert "fp32, bf16 or fp16" in backend.unsupported(_selected_problem(*moba, dtype=torch.float64))
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    monkeypatch.setattr(_tsel, "UNIT_ORDER", "rows")
    assert backend.unsupported(_selected_problem(*moba)) == "SPARSEBENCH_TRITON_UNITS='rows' is not one of keys, union"
    monkeypatch.setattr(block_sparse, "TRITON", False)  # SPARSEBENCH_TRITON=0: the CPU kernels only
    assert backend.unsupported(_selected_problem(*moba)) == "content-selected patterns run on the CPU kernels only"


@pytest.mark.parametrize("order", ["keys", "union"])
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_content_selected_estimate_on_cuda(monkeypatch, triton_here, mode, order):
    """The Triton path's estimate: inputs and output, the selection, its tables and log-sum-exps
    (backward: the gradients and their fp32 buffers); linear in n (no n x n), not the CPU path's."""
    from sparsebench.backends.base import BACKENDS
    from sparsebench.backends.block_sparse import selected as _selected
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    monkeypatch.setattr(_tsel, "UNIT_ORDER", order)
    backend = BACKENDS.get("block_sparse")()
    for name, params in CASES_SELECTED:
        kw = dict(seq_len=32768, heads=8, kv_heads=8, head_dim=64, dtype=torch.bfloat16, mode=mode)
        p = _selected_problem(name, params, **kw)
        est = backend.estimate_bytes(p)
        assert est == _tsel.estimate_bytes(p) != _selected.estimate_bytes(p)
        rows = 8 * 32768
        floor = p.io_bytes + rows * p.pattern.slots(32768) * 4 + rows * 4
        if mode == "backward":
            floor += 2 * p.io_bytes
        assert est >= floor
        twice = backend.estimate_bytes(_selected_problem(name, params, **{**kw, "seq_len": 65536}))
        assert twice < 2.2 * est, (name, twice / est)


CASES_SELECTED = [("moba", {"chunk": 512, "topk": 4}), ("quest", {"page_size": 16, "token_budget": 512}),
                  ("topk_keys", {"keys": 64})]  # fmt: skip


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU builds of PyTorch have none)"
)
def test_selected_kernels_under_the_interpreter():
    """moba, quest and topk_keys on the Triton kernels (forward and backward) in Triton's CPU
    interpreter against float64 dense attention under the call's selection: tests/triton_selected_interpreted.py."""
    script = Path(__file__).with_name("triton_selected_interpreted.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
