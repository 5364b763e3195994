"""The CUDA paths: every pattern on every eager backend in fp32, bf16 and fp16, forward and
backward, against dense attention in float64 under the same mask; FlexAttention compiled on the
GPU; a small scenario end to end on ``cuda`` (records, peak memory, correctness). Skipped where
no CUDA device is present (CI has none): run it on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.patterns.base import PATTERNS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [
    ("dense", {}),
    ("sliding_window", {"window": 40}),
    ("dilated_window", {"window": 16, "dilation": 3}),
    ("strided", {"stride": 17}),
    ("fixed", {"stride": 32, "summary": 4}),
    ("block_local", {"block": 50}),
    ("longformer", {"window": 24, "global_tokens": [0, 1, 150]}),
    ("sink_window", {"sinks": 4, "window": 32}),
    ("random", {"keys": 12, "seed": 1}),
    ("bigbird", {"block": 32, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2}),
    ("ds_fixed", {"block": 32, "num_local_blocks": 2, "num_global_blocks": 1}),
    ("ds_bigbird", {"block": 32, "num_random_blocks": 1, "num_sliding_window_blocks": 3, "num_global_blocks": 1}),
    ("ds_bslongformer", {"block": 32, "num_sliding_window_blocks": 3, "global_block_indices": [0]}),
    ("ds_sliding_window", {"block": 32, "num_sliding_window_blocks": 3}),
    ("ds_variable", {"block": 32, "local_window_blocks": [2], "global_block_indices": [0]}),
    ("document", {"doc_lens": [70, 130, 41]}),
    ("prefix_lm", {"prefix": 90}),
]
# content-selected patterns (keys chosen from q and k per call): checked against dense attention
# under the selection the call handed back (``fn.selected``)
SELECTED_CASES = [
    ("moba", {"chunk": 50, "topk": 3}),
    ("quest", {"page_size": 16, "token_budget": 64}),
    ("topk_keys", {"keys": 20}),
]
# largest error relative to the largest reference value
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
DTYPES = list(TOL)
N = 300  # not a multiple of the block
CUDA = torch.device("cuda")


def qkv(n, dtype, b=1, h=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(CUDA, dtype) for _ in range(3)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def problem(name, params, dtype, causal=True, mode="forward", n=N, d=64, tile=64):
    pat = PATTERNS.get(name).from_params(params)
    return pat, Problem(pat, n, causal, 1, 2, d, dtype, CUDA, mode=mode, tile=tile)


def assert_forward_backward(backend, pat, p):
    """The backend's output and q, k, v gradients against float64 dense attention under the
    pattern's mask (gradients in the input dtype)."""
    q, k, v = (t.requires_grad_(True) for t in qkv(p.seq_len, p.dtype, d=p.head_dim))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(CUDA, p.dtype)
    out = BACKENDS.get(backend)().prepare(p)(q, k, v)
    out.backward(grad)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = masked_softmax_attention(q2, k2, v2, pat.mask(p.seq_len, p.causal, CUDA))
    ref.backward(grad.double())
    assert rel_err(out, ref) < TOL[p.dtype]
    for got, r in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        assert got.dtype == p.dtype
        assert rel_err(got, r) < GRAD_TOL[p.dtype]


def test_every_pattern_is_covered():
    # content-selected patterns (moba, quest, topk_keys) have no fixed mask: SELECTED_CASES, on
    # block_sparse's Triton kernels (their CPU checks live in tests/test_dynamic_patterns.py and
    # tests/test_dynamic_kernels.py)
    from sparsebench.patterns.selection import content_selected

    positional = {n for n in PATTERNS.names() if not content_selected(PATTERNS.get(n))}
    assert {name for name, _ in CASES} == positional
    assert {name for name, _ in SELECTED_CASES} == set(PATTERNS.names()) - positional


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["naive", "sdpa_masked", "block_sparse"])
@pytest.mark.parametrize("name,params", CASES)
def test_forward_matches_dense_under_the_mask(name, params, backend, causal, dtype):
    pat, p = problem(name, params, dtype, causal)
    be = BACKENDS.get(backend)()
    assert be.unsupported(p) is None
    q, k, v = qkv(N, dtype)
    out = be.prepare(p)(q, k, v)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == q.shape
    ref = masked_softmax_attention(q.double(), k.double(), v.double(), pat.mask(N, causal, CUDA))
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,params", CASES)
def test_block_sparse_backward_matches_dense_under_the_mask(name, params, dtype):
    assert_forward_backward("block_sparse", *problem(name, params, dtype, mode="backward"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,params", [CASES[0], CASES[6]])
def test_block_sparse_by_pieces_of_rows(monkeypatch, name, params, dtype):
    """Calls larger than MATH_ELEMS run by pieces of query rows, forward and backward (the
    plain PyTorch path of block_sparse, without Triton)."""
    from sparsebench.backends import block_sparse
    from sparsebench.backends.block_sparse import attend as _attend

    monkeypatch.setattr(block_sparse, "TRITON", False)
    monkeypatch.setattr(_attend, "MATH_ELEMS", 2 * N * 16)
    assert_forward_backward("block_sparse", *problem(name, params, dtype, mode="backward"))


def test_block_sparse_runs_the_triton_kernels_on_cuda():
    from sparsebench.backends.block_sparse import triton as _triton

    fn = BACKENDS.get("block_sparse")().prepare(problem("sliding_window", {"window": 40}, torch.bfloat16)[1])
    assert isinstance(fn.plan, _triton.TilePlan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("name,params", [CASES[1], CASES[6], CASES[8], CASES[9]])
def test_block_sparse_tiles_of_128_large_heads(name, params, d, dtype):
    """The scenarios' GPU shape: layout blocks of 128 (tiles of 128 taken whole or by halves;
    of 64 for head_dim 256) and head_dim 128 or 256, at a length that is not a multiple of the
    tile, forward and backward."""
    assert_forward_backward("block_sparse", *problem(name, params, dtype, mode="backward", n=1000, d=d, tile=128))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,params", [CASES[2], CASES[3]])
def test_block_sparse_residue_parts(monkeypatch, name, params, causal, dtype):
    """Residue bands as parts of their own, reordered by residue class and merged with the rest
    through the log-sum-exps, forward and backward."""
    from sparsebench.backends.block_sparse import triton as _triton

    monkeypatch.setattr(_triton, "PARTS", "always")
    pat, p = problem(name, params, dtype, causal, mode="backward", n=1000)
    assert isinstance(BACKENDS.get("block_sparse")().prepare(p).plan, _triton.PartsPlan)
    assert_forward_backward("block_sparse", pat, p)


@pytest.fixture(params=["keys", "union"])
def unit_order(request, monkeypatch):
    """Both orders of block_sparse's Triton unit kernels (moba, quest): key-major and union."""
    from sparsebench.backends.block_sparse import triton_selected as _tsel

    monkeypatch.setattr(_tsel, "UNIT_ORDER", request.param)
    return request.param


def assert_selected(name, params, dtype, n=N, d=64, heads=4, kv_heads=2):
    """block_sparse's Triton kernels for a content-selected pattern, forward and backward, with
    grouped-query heads: the output and q, k, v gradients against float64 dense attention under
    the selection the call handed back."""
    pat = PATTERNS.get(name).from_params(params)
    p = Problem(pat, n, True, 1, heads, d, dtype, CUDA, mode="backward", kv_heads=kv_heads)
    backend = BACKENDS.get("block_sparse")()
    assert backend.unsupported(p) is None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=g).to(CUDA, dtype).requires_grad_(True)
    k, v = (torch.randn(1, kv_heads, n, d, generator=g).to(CUDA, dtype).requires_grad_(True) for _ in range(2))
    grad = torch.randn(q.shape, generator=g).to(CUDA, dtype)
    out, selection = backend.prepare(p).selected(q, k, v)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == q.shape
    out.backward(grad)
    group = heads // kv_heads
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = masked_softmax_attention(q2, k2.repeat_interleave(group, 1), v2.repeat_interleave(group, 1), selection.mask())
    ref.backward(grad.double())
    assert rel_err(out, ref) < TOL[dtype]
    for got, r in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        assert got.dtype == dtype
        assert rel_err(got, r) < GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,params", SELECTED_CASES)
def test_block_sparse_content_selected_on_triton(name, params, dtype, unit_order):
    assert_selected(name, params, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize(
    "name,params",
    [
        ("moba", {"chunk": 128, "topk": 3}),
        ("quest", {"page_size": 16, "token_budget": 256}),
        ("topk_keys", {"keys": 100}),
    ],
)
def test_block_sparse_content_selected_large_heads(name, params, d, dtype, unit_order):
    """The scenarios' shapes: head_dim 128 and 256, a length that is not a multiple of the tiles."""
    assert_selected(name, params, dtype, n=1000, d=d)


def test_dense_sdpa_bf16():
    pat, p = problem("dense", {}, torch.bfloat16)
    q, k, v = qkv(N, torch.bfloat16)
    out = BACKENDS.get("sdpa")().prepare(p)(q, k, v)
    ref = masked_softmax_attention(q.double(), k.double(), v.double(), pat.mask(N, True, CUDA))
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "name,params,n,causal",
    [
        (*CASES[1], 512, True),
        (*CASES[6], 512, True),
        (*CASES[8], 512, True),
        ("dense", {}, 300, False),  # full tiles (no mask_mod) and a short last block
        ("block_local", {"block": 128}, 300, False),
    ],
)
def test_flex_on_cuda_forward_and_backward(name, params, n, causal, dtype):
    assert_forward_backward("flex", *problem(name, params, dtype, causal, mode="backward", n=n))


def test_scenario_on_cuda_end_to_end(tmp_path):
    """The CLI runs CUDA cases in its worker process: every record ok, on the GPU, with a GPU
    peak memory, a checked output and, in backward mode, checked gradients."""
    from typer.testing import CliRunner

    from sparsebench.cli.app import app
    from sparsebench.results.folder import read_records

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: cuda-small\nseq_lens: [1024, 2048]\n"
        "patterns:\n  - name: sliding_window\n    params: {window: 128}\n"
        "  - name: bigbird\n    params: {block: 64, window_blocks: 3, global_blocks: 1, random_blocks: 1}\n"
        "backends: [block_sparse]\ndevices: [cuda]\ndtypes: [bf16]\nmode: [forward, backward]\n"
        "batch: 1\nheads: 4\nhead_dim: 64\nwarmup: 1\nrepeats: 3\nblock: 64\n"
    )
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "res"), "--no-plots"])
    assert res.exit_code == 0, res.output
    recs = read_records(tmp_path / "res")
    # 2 lengths x 2 modes x (2 sparse patterns + the dense sdpa baseline)
    assert len(recs) == 12
    for r in recs:
        assert r["status"] == "ok", r
        assert r["device"].startswith("cuda")
        assert r["peak_mem_bytes"] > 0
        assert r["backend"] == "sdpa" or r["max_abs_err"] < 5e-2
        assert r["mode"] == "forward" or (r["grad_check"] == "exact" and r["grad_err"] < 6e-2)


def test_content_selected_scenario_on_cuda(tmp_path):
    """moba, quest and topk_keys on block_sparse's Triton kernels through the CLI: every record
    ok on the GPU, checked against the selection each call made (output and gradients), the
    selection's own time recorded, and the estimate within ESTIMATE_BAND of the measured peak."""
    from typer.testing import CliRunner

    from sparsebench.cli.app import app
    from sparsebench.measure.memory import ESTIMATE_BAND, estimate_ratio
    from sparsebench.results.folder import read_records

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: cuda-selected\nseq_lens: [1024, 2048]\n"
        "patterns:\n  - name: moba\n    params: {chunk: 128, topk: 3}\n"
        "  - name: quest\n    params: {page_size: 16, token_budget: 256}\n"
        "  - name: topk_keys\n    params: {keys: 128}\n"
        "backends: [block_sparse]\ndevices: [cuda]\ndtypes: [bf16]\nmode: [forward, backward]\n"
        "batch: 1\nheads: 4\nhead_dim: 64\nwarmup: 1\nrepeats: 3\n"
    )
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "res"), "--no-plots"])
    assert res.exit_code == 0, res.output
    recs = [r for r in read_records(tmp_path / "res") if r["backend"] == "block_sparse"]
    assert len(recs) == 12  # 2 lengths x 2 modes x 3 patterns
    for r in recs:
        assert r["status"] == "ok", r
        assert r["device"].startswith("cuda")
        assert r["max_abs_err"] < 5e-2
        assert r["select_s"] > 0
        assert r["mode"] == "forward" or (r["grad_check"] == "exact" and r["grad_err"] < 6e-2)
        assert ESTIMATE_BAND[0] <= estimate_ratio(r["est_mem_bytes"], r["peak_mem_bytes"]) <= ESTIMATE_BAND[1], r
