"""The block-sparse kernel's code paths against dense attention under the pattern's mask: every
planner path (bands, residue bands, block bands, columns, rows, key tables, gathered tiles), odd
lengths, causal and bidirectional, fp32 / bf16 / fp16, forward and backward; the structures the
paths rest on; layouts of a million tokens without an n x n anything."""

from __future__ import annotations

import math
import time

import pytest
import torch

from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.backends.block_sparse import attention_fn
from sparsebench.backends.block_sparse import execute as _execute
from sparsebench.backends.block_sparse import plan as _plan
from sparsebench.backends.block_sparse.views import Gather, Strided
from sparsebench.patterns.base import PATTERNS
from sparsebench.patterns.geometry import scanned_layout

# (pattern, params, the planner paths its structure must use)
PATHS = [
    ("dense", {}, {"band"}),
    ("sliding_window", {"window": 9}, {"band"}),
    ("sliding_window", {"window": 70}, {"band"}),
    ("dilated_window", {"window": 5, "dilation": 3}, {"residue_band"}),
    ("strided", {"stride": 7}, {"band", "residue_band"}),
    ("fixed", {"stride": 16, "summary": 3}, {"block_band", "keys"}),
    ("block_local", {"block": 10}, {"block_band"}),
    ("block_local", {"block": 128}, {"block_band"}),
    ("longformer", {"window": 6, "global_tokens": [0, 31]}, {"band", "keys", "rows"}),
    ("sink_window", {"sinks": 3, "window": 40}, {"band", "keys"}),
    ("random", {"keys": 5, "seed": 1}, {"table"}),
    ("bigbird", {"block": 16, "random_blocks": 2, "global_blocks": 1}, {"block_band", "block_table", "keys", "rows"}),
]
# patterns without a structure: planned from the block layout
LAYOUT_ONLY = [
    ("ds_fixed", {"block": 16, "num_local_blocks": 4, "num_global_blocks": 1}),
    ("ds_bslongformer", {"block": 16}),
    ("ds_bigbird", {"block": 16, "num_random_blocks": 1, "num_sliding_window_blocks": 3}),
    ("ds_variable", {"block": 16, "local_window_blocks": [4], "global_block_indices": [0]}),
]
CPU = torch.device("cpu")


def qkv(n, b=2, h=3, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def reference(pat, q, k, v, causal):
    return masked_softmax_attention(q.double(), k.double(), v.double(), pat.mask(q.shape[2], causal))


def assert_forward_backward(plan, pat, q, k, v, causal):
    """The plan's output and input gradients equal dense attention's under the pattern's mask."""
    n = q.shape[2]
    g = torch.randn_like(q)
    out = attention_fn(plan)(q, k, v)
    out.backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = masked_softmax_attention(q2, k2, v2, pat.mask(n, causal))
    ref.backward(g.double())
    assert (out.double() - ref).abs().max().item() < 1e-5
    for a, b in zip((q, k, v), (q2, k2, v2)):
        assert (a.grad.double() - b.grad).abs().max().item() < 1e-4


def plan_for(pat, n, causal, block=16, structured=True, groups=6, head_dim=16):
    return _plan.build(pat, n, causal, groups=groups, head_dim=head_dim, block=block, device=CPU, structured=structured)


@pytest.mark.parametrize("name,params,paths", PATHS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PATHS)])
@pytest.mark.parametrize("n", [61, 203])
@pytest.mark.parametrize("causal", [True, False])
def test_structured_paths_match_reference(name, params, paths, n, causal):
    pat = PATTERNS.get(name).from_params(params)
    plan = plan_for(pat, n, causal)
    assert paths <= set(plan.kinds), plan.kinds
    assert "tiles" not in plan.kinds
    q, k, v = qkv(n)
    out = attention_fn(plan)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - reference(pat, q, k, v, causal)).abs().max().item() < 1e-5


@pytest.mark.parametrize("name,params", LAYOUT_ONLY + [(p[0], p[1]) for p in PATHS[1:6]])
@pytest.mark.parametrize("n", [77, 200])
@pytest.mark.parametrize("causal", [True, False])
def test_layout_path_matches_reference(name, params, n, causal):
    """Without a structure: the layout's diagonal run as a block band, other tiles gathered."""
    pat = PATTERNS.get(name).from_params(params)
    plan = plan_for(pat, n, causal, structured=False)
    if name.startswith("ds_"):
        assert pat.structure(n, causal) is None
    q, k, v = qkv(n)
    out = attention_fn(plan)(q, k, v)
    assert (out.double() - reference(pat, q, k, v, causal)).abs().max().item() < 1e-5


def test_sliding_window_takes_the_band_path():
    """A regression to gathers or to the generic layout path is caught here."""
    pat = PATTERNS.get("sliding_window").from_params({"window": 256})
    fn = BACKENDS.get("block_sparse")().prepare(Problem(pat, 16384, True, 1, 8, 64, torch.float32, CPU))
    plan = fn.plan
    assert plan.kinds == ("band",)
    kinds = [c.kind for c in plan.calls]
    assert kinds.count("band_window") >= 1 and set(kinds) <= {"band_window", "band_edge"}
    assert not plan.multi  # one call per row: written in place, nothing merged
    assert all(isinstance(c.k, Strided) for c in plan.calls)  # views of K and V, no gathers
    window = next(c for c in plan.calls if c.kind == "band_window")
    assert (
        window.k.window_stride == window.q.length and window.k.length == 256 + window.q.length - 1
    )  # overlapping windows


def test_million_token_plan_is_views_and_small_masks():
    pat = PATTERNS.get("sliding_window").from_params({"window": 256})
    n = 1 << 20
    t0 = time.perf_counter()
    plan = plan_for(pat, n, True, groups=8, head_dim=64)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30
    assert all(isinstance(c.q, Strided) and isinstance(c.k, Strided) for c in plan.calls)
    assert sum(c.q.windows * c.q.length for c in plan.calls) == n  # every row once
    assert max(c.mask.bool.numel() for c in plan.calls if c.mask is not None) <= 512 * 1024


@pytest.mark.parametrize(
    "name,params,block",
    [
        ("sliding_window", {"window": 256}, 128),
        ("sink_window", {"sinks": 4, "window": 256}, 64),
        ("longformer", {"window": 256, "global_tokens": [0, 1, 2, 3]}, 64),
        ("block_local", {"block": 256}, 128),
    ],
)
def test_layout_of_a_million_tokens(name, params, block):
    """Counted from the structure (no b x b evaluation per tile, no n x n mask: that would be
    a TiB of bools). The build time is printed, not asserted."""
    pat = PATTERNS.get(name).from_params(params)
    n = 1 << 20
    t0 = time.perf_counter()
    layout = pat.block_layout(n, block, True)
    print(f"\n{name}: layout of n=2^20 at block {block} in {time.perf_counter() - t0:.3f}s")
    nb = n // block
    if name == "sliding_window":
        assert layout.nnz_blocks == 3 * nb - 3
    elif name == "block_local":
        assert layout.nnz_blocks == nb * (256 // block + 1) // 2
    else:  # the window's 5 tiles per row plus key block 0 (rows 0-4: a+1 tiles, block 0 inside)
        assert layout.nnz_blocks == 6 * nb - (5 + 4 + 3 + 2 + 1)
    assert int(layout.count.sum()) == pat.nnz(n, True)


@pytest.mark.parametrize("name,params", [(p[0], p[1]) for p in PATHS] + LAYOUT_ONLY)
@pytest.mark.parametrize("n", [45, 130])
def test_structured_layout_equals_scanned_layout(name, params, n):
    pat = PATTERNS.get(name).from_params(params)
    for causal in (True, False):
        for b in (8, 32):
            fast, slow = pat.block_layout(n, b, causal), scanned_layout(pat, n, b, causal)
            for f in ("crow", "col", "count", "full"):
                assert torch.equal(getattr(fast, f), getattr(slow, f)), (f, causal, b)


@pytest.mark.parametrize("name,params,paths", PATHS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PATHS)])
def test_structure_is_the_mask_and_exclusive_parts_are_disjoint(name, params, paths):
    pat = PATTERNS.get(name).from_params(params)
    for n in (50, 97):
        for causal in (True, False):
            st = pat.structure(n, causal)
            i = torch.arange(n)
            assert torch.equal(st.covers(i[:, None], i[None, :]), pat.mask(n, causal))
            seen = torch.zeros(n, n, dtype=torch.int32)
            for part in st.parts:
                if part.exclusive:
                    seen += part.covers(i[:, None], i[None, :]).int()
            assert int(seen.max()) <= 1


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize(
    "name,params",
    [
        ("sliding_window", {"window": 40}),
        ("longformer", {"window": 16, "global_tokens": [0, 5]}),
        ("strided", {"stride": 9}),
        ("ds_bigbird", {"block": 16}),
    ],
)
def test_low_precision(dtype, tol, name, params):
    pat = PATTERNS.get(name).from_params(params)
    n = 150
    q, k, v = qkv(n, 1, 2, 32, dtype)
    out = attention_fn(plan_for(pat, n, True, groups=2, head_dim=32))(q, k, v)
    assert out.dtype == dtype
    assert (out.double() - reference(pat, q, k, v, True)).abs().max().item() < tol


def test_plain_torch_path_matches_the_fused_one(monkeypatch):
    """The path CUDA (and any device without the CPU flash kernel) takes, forward and backward."""
    from sparsebench.backends.block_sparse import attend as _attend

    pat = PATTERNS.get("longformer").from_params({"window": 12, "global_tokens": [0, 40]})
    n = 97
    q, k, v = (t.requires_grad_(True) for t in qkv(n))
    plan = plan_for(pat, n, False)
    monkeypatch.setattr(_attend, "flash_ok", lambda t: False)
    assert_forward_backward(plan, pat, q, k, v, False)


@pytest.mark.parametrize(
    "name,params", [("dense", {}), ("longformer", {"window": 12, "global_tokens": [0, 40]}), ("strided", {"stride": 9})]
)
@pytest.mark.parametrize("causal", [True, False])
def test_plain_torch_path_by_pieces_of_rows(monkeypatch, name, params, causal):
    """Calls whose score matrix exceeds MATH_ELEMS run by pieces of query rows (a causal piece
    sees only the keys before its end): forward and backward unchanged."""
    from sparsebench.backends.block_sparse import attend as _attend

    monkeypatch.setattr(_attend, "flash_ok", lambda t: False)
    monkeypatch.setattr(_attend, "MATH_ELEMS", 6 * 97 * 10)  # about 10 rows per piece
    pieces = []
    piece = _attend._forward_piece

    def counted(q_, k_, *rest):  # fp32 score elements of each piece
        pieces.append(math.prod(torch.broadcast_shapes(q_.shape[:-2], k_.shape[:-2])) * q_.shape[-2] * k_.shape[-2])
        return piece(q_, k_, *rest)

    monkeypatch.setattr(_attend, "_forward_piece", counted)
    pat = PATTERNS.get(name).from_params(params)
    n = 97
    q, k, v = (t.requires_grad_(True) for t in qkv(n))
    plan = plan_for(pat, n, causal, structured=False)
    assert_forward_backward(plan, pat, q, k, v, causal)
    assert len(pieces) > len(plan.calls) and max(pieces) <= _attend.MATH_ELEMS  # split, and bounded


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
def test_plain_torch_path_in_low_precision(monkeypatch, dtype, tol):
    """CUDA's plain-PyTorch path for bf16 / fp16 (operands multiplied as they are, fp32 scores),
    taken here on the CPU: forward and backward against dense attention in float64."""
    from sparsebench.backends.block_sparse import attend as _attend

    monkeypatch.setattr(_attend, "flash_ok", lambda t: False)
    monkeypatch.setattr(_attend, "_tensor_cores", lambda t: t.dtype in (torch.bfloat16, torch.float16))
    monkeypatch.setattr(_attend, "_BMM_OUT_DTYPE", {})  # probed afresh: the CPU has none, widened
    monkeypatch.setattr(_attend, "MATH_ELEMS", 6 * 97 * 16)  # and by pieces of rows
    pat = PATTERNS.get("longformer").from_params({"window": 12, "global_tokens": [0, 40]})
    n = 97
    q, k, v = (t.to(dtype).requires_grad_(True) for t in qkv(n))
    g = torch.randn(q.shape).to(dtype)
    out = attention_fn(plan_for(pat, n, True, structured=True))(q, k, v)
    out.backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = masked_softmax_attention(q2, k2, v2, pat.mask(n, True))
    ref.backward(g.double())
    assert out.dtype == dtype
    for a, b in ((out, ref), (q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < tol


@pytest.mark.parametrize(
    "name,params,structured",
    [
        ("sliding_window", {"window": 20}, True),  # one band: overlapping key windows
        ("sliding_window", {"window": 20}, False),  # the generic layout path
        ("strided", {"stride": 8}, True),  # merged band + residue band
        ("longformer", {"window": 10, "global_tokens": [0, 33]}, True),  # band + columns + rows
        ("bigbird", {"block": 16, "random_blocks": 2}, True),  # block band + gathered random blocks
        ("ds_fixed", {"block": 16, "num_local_blocks": 2}, False),  # gathered tiles, shared keys
        ("random", {"keys": 6}, True),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_backward_matches_reference(monkeypatch, name, params, structured, causal):
    monkeypatch.setattr(_execute, "BACKWARD_KEY_ROWS", 64)  # split window calls into small pieces
    pat = PATTERNS.get(name).from_params(params)
    n = 150
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, 2, 16))
    g = torch.randn_like(q)
    attention_fn(plan_for(pat, n, causal, groups=2, structured=structured))(q, k, v).backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    masked_softmax_attention(q2, k2, v2, pat.mask(n, causal)).backward(g.double())
    for a, b in zip((q, k, v), (q2, k2, v2)):
        assert (a.grad.double() - b.grad).abs().max().item() < 1e-4


def test_non_contiguous_inputs_and_no_grad_path():
    pat = PATTERNS.get("sink_window").from_params({"sinks": 2, "window": 11})
    n = 88
    base = torch.randn(2, n, 3, 16)  # (batch, n, heads, d): a transposed view, as models hold it
    q = k = v = base.transpose(1, 2)
    fn = attention_fn(plan_for(pat, n, True))
    with torch.no_grad():
        out = fn(q, k, v)
    assert (out.double() - reference(pat, q, k, v, True)).abs().max().item() < 1e-5


def test_native_kernels_build_where_a_compiler_is():
    """Where a C++ compiler is present and the kernels are not switched off, they must build:
    a source that no longer compiles would otherwise fall back to ATen without a word (and the
    native tests below would all skip). Builds them once here (30-60 s, then cached)."""
    import os
    import shutil

    from sparsebench.backends.block_sparse import native as _native

    if os.environ.get("SPARSEBENCH_NATIVE", "1") == "0" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here, or SPARSEBENCH_NATIVE=0")
    mod = _native.kernel()
    assert mod is not None, _native.why_not()
    assert mod.has_window() == (_native.capability() == "AVX512")


def _native_or_skip():
    import os

    from sparsebench.backends.block_sparse import native as _native

    if not _native.built() and os.environ.get("SPARSEBENCH_NATIVE_TESTS") != "1":
        pytest.skip("native kernels not built yet (set SPARSEBENCH_NATIVE_TESTS=1 to build them here)")
    if _native.kernel() is None:
        pytest.skip(f"native kernels unavailable: {_native.why_not()}")
    return _native.kernel()


@pytest.mark.parametrize("causal", [True, False])
def test_native_key_table_kernel(causal):
    """Random keys through the C++ kernel (rows read in place), forward and backward. Compiling
    takes 30-60 s once; without SPARSEBENCH_NATIVE_TESTS=1 the native tests run only when the
    kernels are already in the extension cache (any fp32 CPU run of block_sparse builds them)."""
    _native_or_skip()
    pat = PATTERNS.get("random").from_params({"keys": 7, "seed": 3})
    n = 301
    plan = _plan.build(pat, n, causal, groups=6, head_dim=16, block=16, device=CPU, dtype=torch.float32)
    assert all(c.table is not None for c in plan.calls)
    q, k, v = (t.requires_grad_(True) for t in qkv(n))
    assert_forward_backward(plan, pat, q, k, v, causal)


@pytest.mark.parametrize(
    "name,params,structured",
    [
        ("sliding_window", {"window": 70}, True),  # overlapping windows: one packed run per thread
        ("block_local", {"block": 128}, True),  # windows apart: packed one by one, causal ranges
        ("strided", {"stride": 16}, True),  # residue classes side by side
        ("sink_window", {"sinks": 3, "window": 40}, True),  # a few key columns
        ("fixed", {"stride": 32, "summary": 4}, True),  # staircase of summary columns
        ("bigbird", {"block": 32, "random_blocks": 2}, True),  # gathered random blocks
        ("ds_bigbird", {"block": 32, "num_random_blocks": 1}, False),  # gathered tiles
        ("ds_fixed", {"block": 32, "num_local_blocks": 2}, False),  # gathered keys shared by all windows
        ("dense", {}, True),  # one call: its output is the output
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_native_window_kernel(name, params, structured, causal):
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the window kernel needs AVX-512")
    pat = PATTERNS.get(name).from_params(params)
    n = 333
    plan = _plan.build(
        pat, n, causal, groups=3, head_dim=64, block=32, device=CPU, dtype=torch.float32, structured=structured
    )
    assert any(c.ranges is not None for c in plan.calls)
    if name == "ds_fixed":  # the gathered keys of these windows are one shared index
        assert any(isinstance(c.k, Gather) and c.k.shared and c.ranges is not None for c in plan.calls)
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, 3, 64))
    assert_forward_backward(plan, pat, q, k, v, causal)  # native forward and window backward


def test_native_window_kernel_gathered_query_rows(monkeypatch):
    """Tiles whose query rows are gathered (ds_bigbird's tiles grouped by key count, here at
    n = 700) run forward and backward on the native kernel: their dq rows added at the index."""
    mod = _native_or_skip()
    seen = []
    native_backward = _execute._native_window_backward
    monkeypatch.setattr(
        _execute, "_native_window_backward", lambda call, *a: (seen.append(call), native_backward(call, *a))
    )
    if not mod.has_window():
        pytest.skip("the window kernel needs AVX-512")
    pat = PATTERNS.get("ds_bigbird").from_params({"block": 32, "num_random_blocks": 1})
    n = 700
    plan = _plan.build(
        pat, n, False, groups=2, head_dim=64, block=32, device=CPU, dtype=torch.float32, structured=False
    )
    assert any(isinstance(c.q, Gather) and c.ranges is not None for c in plan.calls)
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, 2, 64))
    assert_forward_backward(plan, pat, q, k, v, False)
    assert any(isinstance(c.q, Gather) for c in seen)


def test_native_window_merges_in_place():
    """A later call merges its rows into the output through the log-sum-exps, in the kernel:
    rows never written (lse -inf, output garbage) take the new values, rows without a key in
    this call keep theirs, the others equal the attention over both key sets."""
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the window kernel needs AVX-512")
    torch.manual_seed(0)
    X, M, L, S, d = 2, 3, 19, 70, 64
    q = torch.randn(X, M, L, d)
    k, v = torch.randn(X, M, S, d), torch.randn(X, M, S, d)
    lo1 = torch.zeros(L, dtype=torch.int32)
    hi1 = torch.full((L,), 29, dtype=torch.int32)
    lo2 = torch.full((L,), 30, dtype=torch.int32)
    hi2 = torch.full((L,), S - 1, dtype=torch.int32)
    lo2[:4], hi2[:4] = 1, 0  # rows 0-3: no key in the second call
    scale = 0.125
    out, lse = mod.window_forward(q, k, v, lo1, hi1, scale, torch.empty(0), torch.empty(0))
    lse[:, :, 10:14] = float("-inf")  # rows 10-13 as if never written
    out[:, :, 10:14] = float("nan")
    before = out.clone()
    _, l2 = mod.window_forward(q, k, v, lo2, hi2, scale, out, lse)
    allowed = torch.zeros(L, S, dtype=torch.bool)
    allowed[:, :30] = True
    allowed[4:, 30:] = True
    allowed[10:14, :30] = False
    ref = masked_softmax_attention(q.double(), k.double(), v.double(), allowed)
    assert torch.equal(out[:, :, :4], before[:, :, :4])
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (l2[:, :, :4] == 0).all()
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    full = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
    assert (lse[:, :, 4:].double() - full[:, :, 4:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_native_blocked_key_table_kernel(causal, monkeypatch):
    """Random keys through the cache-blocked kernel (keys sorted per row, taken chunk by chunk
    with an online softmax): equal to dense attention under the mask, forward and backward."""
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the blocked kernel needs AVX-512")
    monkeypatch.setattr(_plan, "KEY_CHUNK_BYTES", 64 * 2 * 4 * 64)  # chunks of 64 keys: many chunks
    pat = PATTERNS.get("random").from_params({"keys": 16, "seed": 5})
    n = 700
    plan = _plan.build(pat, n, causal, groups=4, head_dim=64, block=64, device=CPU, dtype=torch.float32)
    assert all(c.bounds is not None and c.bounds.shape[1] == 12 for c in plan.calls)
    # more chunks (11) than keys per query (4 + self): the bounds would outgrow the table, the
    # plain kernel runs
    few = PATTERNS.get("random").from_params({"keys": 4, "seed": 5})
    many = _plan.build(few, n, causal, groups=4, head_dim=64, block=64, device=CPU, dtype=torch.float32)
    assert all(c.bounds is None and c.table is not None for c in many.calls)
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, 4, 64))
    assert_forward_backward(plan, pat, q, k, v, causal)


@pytest.mark.parametrize(
    "d,groups,causal,table_rows,keys,chunk",
    [(32, 3, False, 128, 16, 64), (128, 1, True, 100, 16, 64), (64, 2, False, 200, 40, 256)],
)
def test_native_blocked_key_table_shapes(d, groups, causal, table_rows, keys, chunk, monkeypatch):
    """The blocked key-table kernels at head_dim 32, 64 and 128, one or several sequences, tables
    cut into calls that start mid-sequence (row0 > 0, the last one short), and chunks holding
    more than 16 of a query's keys (scores are taken 16 keys at a time)."""
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the blocked kernel needs AVX-512")
    monkeypatch.setattr(_plan, "KEY_CHUNK_BYTES", chunk * 2 * 4 * d)  # chunks of `chunk` keys
    monkeypatch.setattr(_plan, "TABLE_ROWS", table_rows)
    pat = PATTERNS.get("random").from_params({"keys": keys, "seed": 7})
    n = 517
    plan = _plan.build(pat, n, causal, groups=groups, head_dim=d, block=64, device=CPU, dtype=torch.float32)
    assert len(plan.calls) > 1 and all(c.bounds is not None for c in plan.calls)
    most = max(int(c.bounds.diff(dim=1).max()) for c in plan.calls)  # a query's keys in one chunk
    assert most > 16 if keys > 16 else most <= 17
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, groups, d))
    assert_forward_backward(plan, pat, q, k, v, causal)


@pytest.mark.parametrize("heads", [1, 2])
def test_native_window_backward_merged_calls_extreme_logits(heads):
    """Merged native calls (band, key columns, query rows) for one sequence (B*H = 1, where size-1
    dimensions make strides ambiguous) and for two, with every logit near -170: each call's share
    of a row's output gradient, exp(lse - merged lse), is taken in the kernel."""
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the window kernel needs AVX-512")
    pat = PATTERNS.get("longformer").from_params({"window": 10, "global_tokens": [0, 33]})
    n = 150
    plan = _plan.build(pat, n, True, groups=heads, head_dim=64, block=32, device=CPU, dtype=torch.float32)
    assert plan.multi and all(c.ranges is not None for c in plan.calls)
    g = torch.Generator().manual_seed(3)
    q = torch.full((1, heads, n, 64), 12.0)
    k = -(1.0 + torch.rand(1, heads, n, 64, generator=g))
    v = torch.randn(1, heads, n, 64, generator=g)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    go = torch.randn(1, heads, n, 64, generator=g)
    attention_fn(plan)(q, k, v).backward(go)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    masked_softmax_attention(q2, k2, v2, pat.mask(n, True)).backward(go.double())
    for a, b in zip((q, k, v), (q2, k2, v2)):
        assert torch.isfinite(a.grad).all()
        assert (a.grad.double() - b.grad).abs().max().item() <= 1e-4 * max(1.0, b.grad.abs().max().item())


def test_native_window_backward_share_of_merged_rows():
    """window_backward given the merged log-sum-exps equals window_backward given the output
    gradient already scaled by each row's share; rows without a key in the call get none, even
    where exp(-merged lse) would overflow."""
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the window kernel needs AVX-512")
    torch.manual_seed(0)
    X, M, L, S, d = 2, 2, 21, 50, 64
    q, k, v = torch.randn(X, M, L, d), torch.randn(X, M, S, d), torch.randn(X, M, S, d)
    lo = torch.zeros(L, dtype=torch.int32)
    hi = torch.full((L,), S - 1, dtype=torch.int32)
    lo[:4], hi[:4] = 1, 0  # rows 0-3: no key in this call
    scale = 0.125
    out, lse = mod.window_forward(q, k, v, lo, hi, scale, torch.empty(0), torch.empty(0))
    lk = lse.masked_fill(~torch.isfinite(lse), 0.0)  # as the planner passes it
    lm = lse + torch.rand(X, M, L)  # merged with other calls: this call holds part of each row
    lm[..., :4] = -200.0  # rows with keys only elsewhere, logits far below zero
    go = torch.randn(X, M, L, d)
    share = torch.exp(lse - lm)
    share[..., :4] = 0.0

    def grads(go_in, lm_in):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        mod.window_backward(q, k, v, lo, hi, scale, go_in, out, lk, dq, dk, dv, torch.empty(0), lm_in)
        return dq, dk, dv

    for a, b in zip(grads(go, lm), grads(go * share.unsqueeze(-1), torch.empty(0))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name,params,structured",
    [
        ("sliding_window", {"window": 70}, True),  # key windows
        ("longformer", {"window": 20, "global_tokens": [0, 33]}, True),  # merged calls
        ("bigbird", {"block": 32, "random_blocks": 2}, True),  # gathered keys
        ("ds_bigbird", {"block": 32, "num_random_blocks": 1}, False),  # gathered tiles
        ("random", {"keys": 24}, True),  # cache-blocked key tables
    ],
)
def test_native_low_precision_forward_is_the_fp32_kernel_on_widened_inputs(dtype, name, params, structured):
    """bf16 / fp16 inputs run the native forward widened to fp32 as loaded: where every call is a
    native one, the output is the fp32 kernel's output on the same values, rounded once; backward
    (ATen's kernel) still matches dense attention."""
    mod = _native_or_skip()
    if not mod.has_window():
        pytest.skip("the window kernel needs AVX-512")
    pat = PATTERNS.get(name).from_params(params)
    n = 333
    plan = _plan.build(pat, n, True, groups=2, head_dim=64, block=32, device=CPU, dtype=dtype, structured=structured)
    q, k, v = qkv(n, 1, 2, 64, dtype)
    low = attention_fn(plan)(q, k, v)
    wide = attention_fn(plan)(q.float(), k.float(), v.float())
    assert low.dtype == dtype
    if name == "random":
        assert all(c.bounds is not None for c in plan.calls)
    if all(c.ranges is not None or c.bounds is not None for c in plan.calls):  # every call native
        assert torch.equal(low, wide.to(dtype))
    else:  # a call left to ATen's kernel computes in the low precision itself
        assert (low.double() - reference(pat, q, k, v, True)).abs().max().item() < (
            3e-2 if dtype == torch.bfloat16 else 4e-3
        )
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    g = torch.randn(q.shape).to(dtype)
    attention_fn(plan)(q, k, v).backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    masked_softmax_attention(q2, k2, v2, pat.mask(n, True)).backward(g.double())
    tol = 6e-2 if dtype == torch.bfloat16 else 1e-2
    for a, b in zip((q, k, v), (q2, k2, v2)):
        assert (a.grad.double() - b.grad).abs().max().item() < tol * max(1.0, b.grad.abs().max().item())


@pytest.mark.parametrize("native", [True, False])
def test_big_column_masks_are_kept_as_ranges(monkeypatch, native):
    """Key columns against many rows (fixed's summary columns) would keep an n x columns mask,
    growing like n^2; where each row is one key range it is kept as the ranges, which the native
    kernel reads and the ATen path turns back into booleans, forward and backward."""
    from sparsebench.backends.block_sparse.attend import RangeMask

    pat = PATTERNS.get("fixed").from_params({"stride": 64, "summary": 4})
    n = 2048
    plan = plan_for(pat, n, True, groups=2, head_dim=32)
    ranged = [c for c in plan.calls if isinstance(c.mask, RangeMask)]
    assert ranged and all(c.kind == "keys" for c in ranged)
    assert sum(c.mask.stored_bytes for c in plan.calls if c.mask is not None) < 64 * n
    for c in ranged:  # the ranges are the mask they replace
        m = c.mask.bool[0, 0]
        lo, hi = c.ranges
        assert torch.equal(m.sum(1), (hi - lo + 1).clamp(min=0).long())
    monkeypatch.setattr(_plan, "NATIVE_WINDOWS", native)  # at run time: native kernel or ATen
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, 2, 32))
    assert_forward_backward(plan, pat, q, k, v, True)


@pytest.mark.parametrize("source", ["native.cpp", "allocator.cpp"])
def test_a_missing_kernel_source_is_a_broken_install_not_a_failed_build(monkeypatch, tmp_path, source):
    """Without native/native.cpp (or native/allocator.cpp, built into the same module) the kernels
    are off for this process with the reason, and no BUILD_FAILED marker is left in the shared
    extension cache (a reinstall must bring them back)."""
    import os
    import shutil

    from sparsebench.backends.block_sparse import native as _native

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the source is never looked for")
    monkeypatch.setenv("SPARSEBENCH_NATIVE", "1")
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_failed", None)
    sources = tuple(tmp_path / "missing.cpp" if path.name == source else path for path in _native._SOURCES)
    assert sources != _native._SOURCES
    monkeypatch.setattr(_native, "_SOURCES", sources)
    monkeypatch.setattr(_native, "_marker", lambda: str(tmp_path / "cache" / "BUILD_FAILED"))
    assert _native.kernel() is None
    assert "missing.cpp is missing (reinstall sparsebench)" in _native.why_not()
    assert not os.path.exists(tmp_path / "cache" / "BUILD_FAILED")
