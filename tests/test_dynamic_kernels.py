"""block_sparse on content-selected patterns (keys chosen from q and k per call): the native unit
kernel (moba's chunks, quest's pages) and per-head key tables (topk_keys) against dense attention
under the selection the call made (fp32 masked softmax), fp32 / bf16 / fp16, grouped-query
attention, at small n exactly and at a larger n on sampled rows; topk_keys' backward; the
backend's wiring (the selection is part of the call and handed back); memory without n x n.

The selections are the test's own stand-ins (simple, correct moba and topk_keys selections),
made as the interface of sparsebench/patterns/selection.py describes a ``Selection``: index
(batch, heads, n, slots) int32 of unit ids, ascending, -1 padding at the end, the query's own
unit always in it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.backends.block_sparse import selected as _selected
from sparsebench.patterns.base import Pattern


def _native_or_skip():
    from sparsebench.backends.block_sparse import native as _native

    why = _selected.native_missing()
    if why is not None:
        pytest.skip(why)
    if _native.kernel() is None:
        pytest.skip(f"native kernels unavailable: {_native.why_not()}")


@dataclass(frozen=True)
class Sel:
    """A Selection as the interface describes it."""

    n: int
    unit: int
    index: torch.Tensor  # (B, H, n, slots) int32

    def mask(self, rows=None) -> torch.Tensor:
        B, H, n, S = self.index.shape
        r = torch.arange(n) if rows is None else rows
        idx = self.index[:, :, r].long()
        units = torch.zeros(B, H, r.numel(), math.ceil(n / self.unit) + 1, dtype=torch.bool)
        units.scatter_(-1, torch.where(idx >= 0, idx, units.shape[-1] - 1), True)
        j = torch.arange(n)
        return units[..., j // self.unit] & (j <= r[:, None])

    def keys_per_query(self) -> torch.Tensor:
        return self.mask().sum(-1)

    def nnz(self) -> int:
        return int(self.keys_per_query().sum())


def _ascending(chosen: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Unit ids (-1: none) plus each row's own unit, ascending, -1 padding at the end (int32)."""
    ids = torch.cat([chosen, own.expand(*chosen.shape[:-1], 1)], -1)
    big = torch.iinfo(torch.int64).max
    ids = torch.where(ids >= 0, ids, big).sort(-1).values
    return torch.where(ids == big, -1, ids).to(torch.int32)


def moba_select(q, k, chunk: int, topk: int) -> Sel:
    """Own chunk plus the topk - 1 earlier chunks with the highest q . mean(K over the chunk)."""
    B, H, n, d = q.shape
    kf = k.float().repeat_interleave(H // k.shape[1], 1)
    units = math.ceil(n / chunk)
    means = torch.stack([kf[:, :, u * chunk : (u + 1) * chunk].mean(2) for u in range(units)], 2)
    gate = q.float() @ means.transpose(-1, -2)
    own = torch.arange(n) // chunk
    gate = gate.masked_fill(torch.arange(units)[None, :] >= own[:, None], float("-inf"))
    take = min(topk, units) - 1
    if take == 0:
        chosen = torch.empty(B, H, n, 0, dtype=torch.long)
    else:
        top = gate.topk(take, dim=-1)
        chosen = torch.where(torch.isfinite(top.values), top.indices, -1)
    return Sel(n, chunk, _ascending(chosen, own[:, None]))


def topk_select(q, k, keys: int, index_dim: int = 32, seed: int = 0) -> Sel:
    """Itself plus the ``keys`` earlier keys with the highest indexer score (q and k projected)."""
    B, H, n, d = q.shape
    proj = torch.randn(d, index_dim, generator=torch.Generator().manual_seed(seed))
    kf = k.float().repeat_interleave(H // k.shape[1], 1)
    s = (q.float() @ proj) @ (kf @ proj).transpose(-1, -2)
    i = torch.arange(n)
    s = s.masked_fill(i[None, :] >= i[:, None], float("-inf"))
    top = s.topk(min(keys, n - 1), dim=-1)
    chosen = torch.where(torch.isfinite(top.values), top.indices, -1)
    return Sel(n, 1, _ascending(chosen, i[:, None]))


@dataclass(frozen=True, kw_only=True)
class StandInMoba(Pattern):
    name = "moba"
    content_selected: ClassVar[bool] = True
    chunk: int = 32
    topk: int = 3

    def select(self, q, k):
        return moba_select(q, k, self.chunk, self.topk)


@dataclass(frozen=True, kw_only=True)
class StandInTopk(Pattern):
    name = "topk_keys"
    content_selected: ClassVar[bool] = True
    keys: int = 24
    index_dim: int = 32
    seed: int = 0

    def select(self, q, k):
        return topk_select(q, k, self.keys, self.index_dim, self.seed)


def qkv(n, heads=4, kv_heads=4, d=64, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, d), (batch, kv_heads, n, d), (batch, kv_heads, n, d)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def reference(sel: Sel, q, k, v, rows=None):
    """fp32 dense attention under the selection (k, v repeated for grouped-query heads)."""
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(group, 1) for t in (k, v))
    qf = q.float() if rows is None else q.float()[:, :, rows]
    return masked_softmax_attention(qf, kf, vf, sel.mask(rows))


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("chunk,topk", [(32, 3), (16, 6), (64, 1)], ids=["moba-like", "quest-like", "own-chunk-only"])
def test_unit_kernel_is_attention_under_the_selection(chunk, topk, kv_heads, dtype):
    """Every query's own unit (the causal diagonal) and its chosen earlier units, merged through
    the log-sum-exps, equal dense attention under the selection's mask; n not a multiple of the
    unit (a short last unit), two batches, grouped-query heads sharing the unit's keys."""
    _native_or_skip()
    n = 203
    q, k, v = qkv(n, kv_heads=kv_heads, dtype=dtype)
    sel = moba_select(q, k, chunk, topk)
    assert (sel.index[..., -1] >= 0).any() and sel.index.shape[-1] == min(topk, math.ceil(n / chunk))
    out, lse = _selected.attend_units(sel, q, k, v)
    assert out.dtype == torch.float32 and lse.shape == q.shape[:3]
    ref = reference(sel, q, k, v)
    assert (out - ref).abs().max().item() <= TOL[dtype]
    assert torch.isfinite(lse).all()
    # in q's dtype through the dispatcher
    assert _selected.attend(sel, q, k, v).dtype == dtype


def test_unit_kernel_small_work_items(monkeypatch):
    """Query blocks of one unit each (many work items, rows of a block in one unit) give the same
    output as blocks of many units."""
    _native_or_skip()
    q, k, v = qkv(300, kv_heads=2)
    sel = moba_select(q, k, 32, 4)
    whole = _selected.attend_units(sel, q, k, v)[0]
    monkeypatch.setattr(_selected, "UNIT_QUERY_ROWS", 1)
    monkeypatch.setattr(_selected, "UNIT_MAX_ROWS", 1)
    assert _selected.unit_rows(32, 300, 4, 2) == 32
    small = _selected.attend_units(sel, q, k, v)[0]
    assert (whole - small).abs().max().item() <= 1e-6


def test_unit_work_items_grow_with_n():
    """The unit kernel's items grow with n (about 4 per thread), so that the units an item packs
    (about all of its past) are not packed n / 2048 times over: moba's 512-token chunks, 8 heads,
    2 threads."""
    rows = {n: _selected.unit_rows(512, n, 8, 2) for n in (4096, 8192, 32768, 131072)}
    assert rows == {4096: 4096, 8192: 8192, 32768: 16384, 131072: 16384}, rows
    assert _selected.unit_rows(512, 4096, 1, 2) == 512  # one sequence: 4 items per thread first
    assert _selected.unit_rows(64, 100_000, 8, 2) % 64 == 0


def test_unit_kernel_at_moba_size_sampled_rows():
    """moba's shipped chunk (512) and topk (4) at n = 4096 (8 chunks), grouped-query heads: sampled
    rows, the first and last among them, against dense attention under the selection."""
    _native_or_skip()
    n = 4096
    q, k, v = qkv(n, heads=4, kv_heads=2, batch=1)
    sel = moba_select(q, k, 512, 4)
    out = _selected.attend_units(sel, q, k, v)[0]
    rows = torch.unique(torch.cat([torch.tensor([0, 511, 512, n - 1]), torch.randint(0, n, (60,))]))
    ref = reference(sel, q, k, v, rows)
    assert (out[:, :, rows] - ref).abs().max().item() <= TOL[torch.float32]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_token_tables_forward_and_backward(kv_heads):
    """topk_keys' per-head key tables (rows with fewer earlier keys than asked included): output
    and the gradients of q, k and v against autograd through dense attention under the mask."""
    _native_or_skip()
    n = 150
    q, k, v = (t.requires_grad_() for t in qkv(n, kv_heads=kv_heads))
    sel = topk_select(q.detach(), k.detach(), 24)
    assert sel.index.shape[-1] == 25 and (sel.index[..., 0, 1:] == -1).all()
    out = _selected.attend(sel, q, k, v)
    grad = torch.randn_like(out)
    out.backward(grad)
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = reference(sel, *ins)
    ref.backward(grad)
    assert (out - ref).abs().max().item() <= TOL[torch.float32]
    for got, want in zip((q.grad, k.grad, v.grad), ins):
        assert (got - want.grad).abs().max().item() <= 1e-4 * want.grad.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_token_tables_low_precision(dtype):
    _native_or_skip()
    q, k, v = qkv(130, kv_heads=2, dtype=dtype)
    sel = topk_select(q, k, 16)
    out = _selected.attend(sel, q, k, v)
    assert out.dtype == dtype
    assert (out.float() - reference(sel, q, k, v)).abs().max().item() <= TOL[dtype]


def test_chunk_bounds_skip_the_padding():
    """Each row's keys per chunk of key rows: padding (-1 at the end) counts in no chunk."""
    index = torch.tensor([[[0, 3, 4, 9], [5, -1, -1, -1], [-1, -1, -1, -1]]], dtype=torch.int32)
    b = _selected.chunk_bounds(index, 10, 4)
    assert b.tolist() == [[[0, 2, 3, 4], [0, 0, 1, 1], [0, 0, 0, 0]]]


def _problem(pattern, **kw):
    base = dict(
        pattern=pattern, seq_len=96, causal=True, batch=1, heads=4, head_dim=64,
        dtype=torch.float32, device=torch.device("cpu"), kv_heads=2,
    )  # fmt: skip
    return Problem(**{**base, **kw})


@pytest.mark.parametrize("pattern", [StandInMoba(chunk=16, topk=3), StandInTopk(keys=10)], ids=["moba", "topk_keys"])
def test_backend_runs_the_selection_in_the_call(pattern):
    """prepare's callable selects (per call, from these q and k) and attends; ``selected`` hands
    back the selection the call used, which the output is attention under."""
    _native_or_skip()
    backend = BACKENDS.get("block_sparse")()
    p = _problem(pattern)
    assert backend.unsupported(p) is None
    fn = backend.prepare(p)
    q, k, v = qkv(96, kv_heads=2, batch=1)
    out, sel = fn.selected(q, k, v)
    assert torch.equal(sel.index, pattern.select(q, k).index)
    assert (out - reference(sel, q, k, v)).abs().max().item() <= TOL[torch.float32]
    assert torch.equal(fn(q, k, v), out)
    # other inputs, another selection: made by the call, not at prepare
    q2 = torch.randn_like(q)
    assert (fn(q2, k, v) - reference(pattern.select(q2, k), q2, k, v)).abs().max().item() <= TOL[torch.float32]


def test_backend_says_what_it_cannot_run(monkeypatch):
    import sparsebench.backends.block_sparse as block_sparse

    monkeypatch.setattr(block_sparse, "TRITON", False)  # without Triton (where it is, CUDA runs them)
    backend = BACKENDS.get("block_sparse")()
    moba = StandInMoba()
    assert backend.unsupported(_problem(moba, device=torch.device("cuda"))) == (
        "content-selected patterns run on the CPU kernels only"
    )
    if _selected.native_missing() is None:
        assert "no backward pass for 'moba'" in backend.unsupported(_problem(moba, mode="backward"))
        assert backend.unsupported(_problem(StandInTopk(), mode="backward")) is None
    assert "head_dim 32, 64 or 128" in backend.unsupported(_problem(moba, head_dim=48))


def test_estimate_is_near_the_inputs_for_moba():
    """moba's peak is q, k, v and the output plus small tables, or the selection's blocks while it
    selects: the analytic estimate at n = 32768 (8 heads of 64, fp32) is within 1.25x of q + k + v
    + out plus the selection's own bytes, and has no n x n term (doubling n at most doubles it)."""
    import sparsebench

    backend = BACKENDS.get("block_sparse")()
    moba = sparsebench.pattern("moba", chunk=512, topk=4)
    p = _problem(moba, seq_len=32768, heads=8, kv_heads=8)
    est = backend.estimate_bytes(p)
    # beyond q, k, v and the output: the selection's own blocks (counted by the pattern's
    # select_bytes, freed before the kernel runs) and the kernel's tables and scratch
    assert p.io_bytes < est <= 1.25 * p.io_bytes + moba.select_bytes(1, 8, 32768, 64)
    p2 = _problem(moba, seq_len=65536, heads=8, kv_heads=8)
    assert backend.estimate_bytes(p2) <= 2.05 * est


def test_measured_peak_has_no_n_by_n():
    """The unit kernel's call at n = 8192 (4 heads): what it allocates beyond q, k, v and the
    selection is its fp32 output, a log-sum-exp per row and per-thread scratch (an n x n fp32
    score matrix would be 1 GiB)."""
    _native_or_skip()
    from sparsebench.measure.memory import PeakMemory

    n = 8192
    q, k, v = qkv(n, heads=4, kv_heads=4, batch=1)
    sel = moba_select(q, k, 512, 4)
    out_bytes = q.numel() * 4
    with PeakMemory("cpu") as pm:
        out, lse = _selected.attend_units(sel, q, k, v)
    del out, lse
    if pm.peak_bytes is None:
        pytest.skip("peak memory is not measurable here")
    assert pm.peak_bytes <= out_bytes + n * 4 * 4 + 48 * 2**20


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_native_token_selection_is_topk(kv_heads):
    """select_top_keys keeps, per query head and row, its earlier keys with the highest indexer
    scores: no kept key scores below a dropped one (up to rounding: the native products sum in
    another order than torch's), as many as asked (all earlier ones when fewer), then itself."""
    _native_or_skip()
    n = 300
    q, k, _ = qkv(n, kv_heads=kv_heads)
    proj = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    qi, ki = q @ proj, k @ proj
    scores = qi @ ki.repeat_interleave(4 // kv_heads, 1).transpose(-1, -2)
    i = torch.arange(n)
    for keys in (24, 150, 400):
        got = _selected.select_top_keys(qi, ki, keys)
        kept = min(keys, n - 1)
        assert got.shape == (2, 4, n, kept + 1)
        want = topk_select(q, k, keys).index  # torch.topk of the same scores
        assert (got == want).float().mean().item() > 0.999
        sel = Sel(n, 1, got).mask() & (i[None, :] < i[:, None])  # earlier keys kept
        earlier = i[None, :] < i[:, None]
        assert torch.equal(sel.sum(-1), torch.clamp(i, max=kept).expand(2, 4, n))
        low = scores.masked_fill(~sel, float("inf")).amin(-1)
        high = scores.masked_fill(sel | ~earlier, float("-inf")).amax(-1)
        assert bool((high <= low + 1e-5).all())
        assert bool(Sel(n, 1, got).mask().diagonal(dim1=-2, dim2=-1).all())  # and itself


def test_token_selection_ties_go_to_the_earlier_key():
    """Equal scores: the earlier keys first, in short rows and in long ones (where the sampled
    threshold and the exact one coincide)."""
    _native_or_skip()
    n, e = 5000, 16
    qi = torch.zeros(1, 1, n, e)
    qi[0, 0, :, 0] = 1.0
    ki = torch.zeros(1, 1, n, e)
    ki[0, 0, 30, 0] = 1.0
    ki[0, 0, 4000:4010, 0] = 2.0
    got = _selected.select_top_keys(qi, ki, 20)[0, 0]
    assert got[39].tolist() == list(range(19)) + [30, 39]
    assert got[4999].tolist() == list(range(9)) + [30] + list(range(4000, 4010)) + [4999]


# ------------------------------------------------------------------------------------------
# topk_keys' native selection against the torch reference (sparsebench.patterns.selection)


def _reference_top_keys(qi, ki, keys):
    """The reference's selection (select_tokens) of the projections themselves (the identity
    projection: exact), int32 as the kernel gives it."""
    from sparsebench.patterns.selection import select_tokens

    return select_tokens(qi, ki, keys, torch.eye(qi.shape[-1])).index


@pytest.mark.parametrize("keys", [5, 24, 100, 300])
@pytest.mark.parametrize("case", ["integers", "all_equal"])
def test_native_selection_is_the_reference_with_exact_ties(case, keys):
    """Integer-valued q, k and projection: the scores are exact integers in both, with many equal
    ones (all equal in ``all_equal``): the same keys, ties to the earlier key; GQA 4 over 2, n =
    333 (not a multiple of 8 or 32), rows with fewer earlier keys than asked (keys 300: most)."""
    _native_or_skip()
    from sparsebench.patterns.selection import select_tokens

    n, g = 333, torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (1, 4, n, 64), generator=g).float()
    k = torch.randint(-2, 3, (1, 2, n, 64), generator=g).float()
    proj = torch.randint(-1, 2, (64, 32), generator=g).float()
    if case == "all_equal":
        q.zero_()
    want = select_tokens(q, k, keys, proj).index
    got = _selected.select_top_keys(q @ proj, k @ proj, keys)
    assert got.shape == want.shape == (1, 4, n, min(keys, n - 1) + 1)
    assert torch.equal(got, want)
    if case == "all_equal":  # every row: its first min(keys, i) keys, then itself
        i = n - 1
        assert got[0, 0, i].tolist() == list(range(min(keys, i))) + [i] + [-1] * (got.shape[-1] - min(keys, i) - 1)


@pytest.mark.parametrize("order", ["rising", "falling", "spikes"])
def test_native_selection_when_the_sample_misleads_or_lists_overflow(order):
    """Scores chosen against the kernel's shortcuts, exact integers (score = ki_j[0]): ``spikes``
    puts high scores in the tiles of keys 0-31 and 128-159 only, where the threshold's sample of
    rows 448-511 (tiles 0, 4 and 9 of the 14 below them) lies, so that the sampled threshold keeps
    fewer than `keys` candidates and those rows are scored again (the fallback); ``rising``
    (each key beats every earlier one) makes every list overflow and be cut again and again;
    ``falling`` the opposite. The same keys as the reference either way."""
    _native_or_skip()
    n, e, keys = 512, 16, 100
    g = torch.Generator().manual_seed(2)
    qi = torch.zeros(1, 1, n, e)
    qi[..., 0] = 1.0
    ki = torch.zeros(1, 1, n, e)
    j = torch.arange(n).float()
    if order == "rising":
        ki[0, 0, :, 0] = j
    elif order == "falling":
        ki[0, 0, :, 0] = -j
    else:
        ki[0, 0, :, 0] = torch.randperm(n, generator=g).float()  # distinct, below 512
        for t in (0, 4):
            ki[0, 0, t * 32 : (t + 1) * 32, 0] += 1000.0
    want = _reference_top_keys(qi, ki, keys)
    got = _selected.select_top_keys(qi, ki, keys)
    assert torch.equal(got, want)
    if order == "spikes":  # the rows after the spikes keep all 64 of them and 36 more
        row = set(got[0, 0, 500].tolist())
        assert set(range(32)) | set(range(128, 160)) <= row and len(row - {-1}) == keys + 1


def test_native_selection_is_the_pattern_s_on_random_inputs():
    """topk_keys' own selection (its seeded projection, fp32 scores) and the native one that
    block_sparse's call makes: the same index on random inputs, GQA 4 over 2, odd n."""
    _native_or_skip()
    from sparsebench.patterns.topk_keys import TopkKeys

    q, k, _ = qkv(453, kv_heads=2, batch=2)
    for keys in (7, 40, 200):
        pattern = TopkKeys(keys=keys)
        select = _selected.native_token_selector(pattern, 64, "cpu")
        assert select is not None
        assert torch.equal(select(q, k).index, pattern.select(q, k).index)


def _selects_without_pattern_select(monkeypatch, owner, backend, p, q, k, v) -> None:
    """block_sparse's call for ``p`` gives the pattern's selection with ``owner.select`` (the
    pattern's own) out of reach, and its output is attention under that selection."""
    want = p.pattern.select(q, k).index
    with monkeypatch.context() as m:

        def unreachable(self, q, k):
            raise AssertionError("pattern.select was called")

        m.setattr(owner, "select", unreachable)
        fn = backend.prepare(p)  # a fallback to pattern.select would be bound to unreachable here
        assert torch.equal(fn.select(q, k).index, want)
        out, sel = fn.selected(q, k, v)
    assert torch.equal(sel.index, want)
    assert (out - reference(sel, q, k, v)).abs().max().item() <= TOL[torch.float32]


def test_block_sparse_topk_keys_selects_natively(monkeypatch):
    """block_sparse's topk_keys call selects with the native kernel: ``fn.select`` exists and
    gives the pattern's keys, and the call runs with ``pattern.select`` out of reach; its output
    is attention under its own selection. A pattern without an indexer projection (the stand-in)
    keeps its own ``select``."""
    _native_or_skip()
    from sparsebench.patterns.topk_keys import TopkKeys

    pattern = TopkKeys(keys=20)
    backend = BACKENDS.get("block_sparse")()
    p = _problem(pattern)
    assert backend.unsupported(p) is None
    q, k, v = qkv(96, kv_heads=2, batch=1)
    _selects_without_pattern_select(monkeypatch, TopkKeys, backend, p, q, k, v)
    stand_in = StandInTopk(keys=10)
    assert backend.prepare(_problem(stand_in)).select == stand_in.select


def test_select_time_times_the_call_s_own_selection():
    """The record's select_s times ``fn.select`` where the backend's call has one (the selection
    that call makes), else ``pattern.select``."""
    from sparsebench.measure import harness

    calls = []

    def own(q, k):
        calls.append("fn")

    def fn(q, k, v):
        return q

    fn.select = own
    p = _problem(StandInTopk(keys=10))
    q, k, _ = qkv(96, kv_heads=2, batch=1)
    assert harness.select_time(p, q, k, fn) >= 0.0
    assert calls == ["fn"] * (1 + harness.SELECT_REPEATS)


# ------------------------------------------------------------------------------------------
# moba's and quest's native unit selection against the torch reference (select_units)


def _unit_pattern(name, unit, earlier):
    """moba (chunk, topk = earlier + 1) or quest (page_size, token_budget = (earlier + 1) pages)."""
    import sparsebench

    if name == "moba":
        return sparsebench.pattern("moba", chunk=unit, topk=earlier + 1)
    return sparsebench.pattern("quest", page_size=unit, token_budget=(earlier + 1) * unit)


def _native_units(pattern, q, k):
    select = _selected.native_unit_selector(pattern, q.shape[-1], "cpu")
    assert select is not None
    return select(q, k)


@pytest.mark.parametrize("name", ["moba", "quest"])
@pytest.mark.parametrize(
    "n,unit,earlier,kv_heads",
    [(1000, 32, 5, 2), (1000, 16, 20, 2), (999, 8, 80, 4), (300, 64, 9, 2), (640, 32, 0, 2)],
    ids=["gqa-odd-n", "bisection", "bisection-long", "fewer-earlier-than-kept", "own-unit-only"],
)
def test_native_unit_selection_is_the_reference_on_random_inputs(name, n, unit, earlier, kv_heads):
    """The native unit selection gives the pattern's own index (shape, int32, ascending, the own
    unit after the chosen, -1 padding) on random inputs: GQA 4 over 2, n not a multiple of the
    unit, more kept units than the running list holds (20 of up to 62, 80 of up to 124: the
    bisection), rows with fewer earlier units than kept (300 / 64: at most 4 of 9), topk 1 (the own
    unit only)."""
    _native_or_skip()
    q, k, _ = qkv(n, kv_heads=kv_heads, batch=2)
    pattern = _unit_pattern(name, unit, earlier)
    want = pattern.select(q, k).index
    got = _native_units(pattern, q, k).index
    assert got.dtype == torch.int32 and got.shape == want.shape == (2, 4, n, min(earlier, -(-n // unit) - 1) + 1)
    assert torch.equal(got, want)
    if earlier == 0:
        assert torch.equal(got[..., 0], (torch.arange(n) // unit).int().expand(2, 4, n))


@pytest.mark.parametrize("name", ["moba", "quest"])
@pytest.mark.parametrize("case", ["integers", "all_equal"])
def test_native_unit_selection_ties_go_to_the_lowest_unit(name, case):
    """Integer-valued q and k (sums of small integers and eighths: exact in any order; moba's mean a
    division by 8, exact too): many equal scores, all equal in ``all_equal``; the same index as the
    reference, ties to the lowest unit, with the running list (5 kept) and the bisection (70)."""
    _native_or_skip()
    n, unit, g = 1024, 8, torch.Generator().manual_seed(3)
    for earlier in (5, 70):
        q = torch.randint(-2, 3, (1, 4, n, 32), generator=g).float()
        k = torch.randint(-2, 3, (1, 2, n, 32), generator=g).float()
        if case == "all_equal":
            q.zero_()
        pattern = _unit_pattern(name, unit, earlier)
        want = pattern.select(q, k).index
        assert torch.equal(_native_units(pattern, q, k).index, want)
        if case == "all_equal":  # every row: its first min(earlier, own) units, then its own
            i = n - 1
            assert want[0, 0, i].tolist() == list(range(earlier)) + [i // unit]


def test_block_sparse_moba_and_quest_select_natively(monkeypatch):
    """block_sparse's moba and quest calls select with the native kernel: ``fn.select`` gives the
    pattern's units with ``pattern.select`` out of reach, and the output is attention under the
    call's own selection. A unit pattern whose score the kernel does not know (no ``score_kind``)
    keeps its own ``select``."""
    _native_or_skip()
    from sparsebench.patterns.moba import Moba
    from sparsebench.patterns.quest import Quest
    from sparsebench.patterns.selection import ContentSelected

    backend = BACKENDS.get("block_sparse")()
    q, k, v = qkv(200, kv_heads=2, batch=1)
    for pattern in (Moba(chunk=16, topk=4), Quest(page_size=16, token_budget=64)):
        p = _problem(pattern, seq_len=200)
        assert backend.unsupported(p) is None
        _selects_without_pattern_select(monkeypatch, ContentSelected, backend, p, q, k, v)

    class OtherScore(Moba):  # the same summaries, a score of its own
        score_kind = None

    other = OtherScore(chunk=16, topk=4)
    assert _selected.native_unit_selector(other, 64, "cpu") is None
    assert backend.prepare(_problem(other, seq_len=200)).select == other.select
