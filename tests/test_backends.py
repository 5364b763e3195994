"""Every backend against dense attention under the same mask, on lengths that are not block
multiples; the Python API; backward where supported."""

from __future__ import annotations

import pytest
import torch

import sparsebench
from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.errors import BackendUnavailable, ScenarioError
from sparsebench.patterns.base import PATTERNS

CASES = [
    ("dense", {}),
    ("sliding_window", {"window": 9}),
    ("dilated_window", {"window": 4, "dilation": 3}),
    ("strided", {"stride": 7}),
    ("fixed", {"stride": 8, "summary": 2}),
    ("block_local", {"block": 10}),
    ("longformer", {"window": 6, "global_tokens": [0, 31]}),
    ("sink_window", {"sinks": 2, "window": 5}),
    ("random", {"keys": 5, "seed": 1}),
    ("bigbird", {"block": 8, "random_blocks": 1}),
    ("ds_fixed", {"block": 16, "num_local_blocks": 2}),
    ("ds_bslongformer", {"block": 16}),
]
EAGER = ["naive", "sdpa", "sdpa_masked", "block_sparse"]


def qkv(n, b=2, h=3, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def reference(pat, q, k, v, causal):
    return masked_softmax_attention(q.double(), k.double(), v.double(), pat.mask(q.shape[2], causal))


@pytest.mark.parametrize("backend", EAGER)
@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("n", [45, 100, 130])
@pytest.mark.parametrize("causal", [True, False])
def test_backend_matches_reference(backend, name, params, n, causal):
    pat = PATTERNS.get(name).from_params(params)
    be = BACKENDS.get(backend)()
    p = Problem(pat, n, causal, 2, 3, 16, torch.float32, torch.device("cpu"), tile=32)
    why = be.unsupported(p)
    if why:
        assert backend == "sdpa" and name != "dense"
        return
    q, k, v = qkv(n)
    out = be.prepare(p)(q, k, v)
    assert out.shape == q.shape
    err = (out.double() - reference(pat, q, k, v, causal)).abs().max().item()
    assert err < 1e-5, err


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_block_sparse_low_precision(dtype, tol):
    pat = PATTERNS.get("longformer").from_params({"window": 16, "global_tokens": [0]})
    p = Problem(pat, 200, True, 1, 2, 32, dtype, torch.device("cpu"), tile=64)
    q, k, v = qkv(200, 1, 2, 32, dtype)
    out = BACKENDS.get("block_sparse")().prepare(p)(q, k, v)
    assert out.dtype == dtype
    assert (out.double() - reference(pat, q, k, v, True)).abs().max().item() < tol


@pytest.mark.parametrize("backend", ["naive", "sdpa_masked", "block_sparse"])
def test_backward_gradients_match(backend):
    n = 70
    pat = PATTERNS.get("sliding_window").from_params({"window": 12})
    p = Problem(pat, n, True, 1, 2, 16, torch.float32, torch.device("cpu"), mode="backward", tile=16)
    q, k, v = (t.requires_grad_(True) for t in qkv(n, 1, 2, 16))
    grad = torch.randn(1, 2, n, 16)
    BACKENDS.get(backend)().prepare(p)(q, k, v).backward(grad)
    got = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    masked_softmax_attention(q2, k2, v2, pat.mask(n, True)).backward(grad.double())
    for g, ref in zip(got, (q2.grad, k2.grad, v2.grad)):
        assert (g.double() - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_flex_matches_reference():
    """One small compiled case (compilation takes seconds on a CPU)."""
    be = BACKENDS.get("flex")
    why = be.unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    n = 100
    pat = PATTERNS.get("random").from_params({"keys": 4, "seed": 2})
    p = Problem(pat, n, True, 1, 2, 16, torch.float32, torch.device("cpu"))
    q, k, v = qkv(n, 1, 2, 16)
    out = be().prepare(p)(q, k, v)
    assert (out.double() - reference(pat, q, k, v, True)).abs().max().item() < 1e-5


@pytest.mark.slow
def test_flex_never_runs_eagerly_behind_a_graph_break(monkeypatch):
    """A mask_mod that does not trace whole (DeepSpeed's variable layout was once built inside it)
    made torch.compile fall back to eager FlexAttention: n x n scores, 1.8 GiB at n = 4096 where
    the compiled kernel takes 32 MiB, measured as flex. It is an error that says so; the DeepSpeed
    patterns now build their layout before the mask_mod and compile whole."""
    be = BACKENDS.get("flex")
    why = be.unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    pat = PATTERNS.get("ds_variable").from_params({"block": 16})
    p = Problem(pat, 256, True, 1, 2, 16, torch.float32, torch.device("cpu"))
    q, k, v = qkv(256, 1, 2, 16)
    with torch.no_grad():
        out = be().prepare(p)(q, k, v)
    want = masked_softmax_attention(q, k, v, pat.mask(256, causal=True))
    assert torch.allclose(out, want, atol=1e-5)

    inner = pat.mask_fn(256, True)

    def breaks(q_idx, k_idx):
        torch._dynamo.graph_break()
        return inner(q_idx, k_idx)

    monkeypatch.setattr(type(pat), "mask_fn", lambda self, n, causal, device="cpu": breaks)
    with pytest.raises(RuntimeError, match="mask_mod does not compile whole"):
        with torch.no_grad():
            be().prepare(p)(q, k, v)


def test_flex_backward_on_cpu_is_skipped_with_its_reason():
    """torch's FlexAttention raises NotImplementedError for backward on CPU: the case is skipped."""
    pat = PATTERNS.get("sliding_window").from_params({"window": 8})
    p = Problem(pat, 64, True, 1, 2, 16, torch.float32, torch.device("cpu"), mode="backward")
    assert "no backward pass on CPU" in BACKENDS.get("flex")().unsupported(p)
    assert (
        BACKENDS.get("flex")().unsupported(Problem(pat, 64, True, 1, 2, 16, torch.float32, torch.device("cpu"))) is None
    )


def test_api_keywords_that_are_not_api_options_go_to_the_pattern():
    q, k, v = qkv(24, 1, 2, 16)
    out = sparsebench.attention(q, k, v, pattern="block_local", backend="naive", block=8)
    pat = PATTERNS.get("block_local").from_params({"block": 8})
    assert (out.double() - reference(pat, q, k, v, True)).abs().max().item() < 1e-5
    both = sparsebench.attention(q, k, v, pattern="block_local", backend="block_sparse", block=8, tile=16)
    assert (both.double() - reference(pat, q, k, v, True)).abs().max().item() < 1e-5


def test_problem_block_is_the_old_name_of_tile():
    p = Problem(PATTERNS.get("dense")(), 64, True, 1, 2, 16, torch.float32, torch.device("cpu"), tile=32)
    with pytest.warns(DeprecationWarning, match="Problem.tile"):
        assert p.block == 32


def test_api_attention():
    q, k, v = qkv(77, 1, 2, 16)
    out = sparsebench.attention(q, k, v, pattern="sliding_window", backend="block_sparse", window=8, tile=16)
    pat = PATTERNS.get("sliding_window").from_params({"window": 8})
    assert (out.double() - reference(pat, q, k, v, True)).abs().max().item() < 1e-5
    with pytest.raises(ScenarioError, match="unknown backend"):
        sparsebench.attention(q, k, v, pattern="dense", backend="nope")
    with pytest.raises(ScenarioError, match="larger than the sequence length"):
        sparsebench.attention(q, k, v, pattern="sliding_window", window=1000)
    with pytest.raises(BackendUnavailable, match="dense attention only"):
        sparsebench.attention(q, k, v, pattern="sliding_window", backend="sdpa", window=8)


def test_every_backend_module_registered():
    assert set(EAGER + ["flex"]) <= set(BACKENDS.names())


def _effective_mask(bm, mask_fn, n, block):
    """The (n, n) pairs a BlockMask lets through: its partial tiles under the mask_mod, its full
    tiles whole. Also checks that no tile is listed twice."""
    nbp = bm.kv_num_blocks.shape[-1]
    out = torch.zeros(nbp * block, nbp * block, dtype=torch.bool)
    ar = torch.arange(block)
    for r in range(nbp):
        part = bm.kv_indices[0, 0, r, : bm.kv_num_blocks[0, 0, r]].tolist()
        full = bm.full_kv_indices[0, 0, r, : bm.full_kv_num_blocks[0, 0, r]].tolist()
        assert not set(part) & set(full) and len(set(part)) == len(part) and len(set(full)) == len(full)
        rows = r * block + ar
        for c in part + full:
            cols = c * block + ar
            tile = torch.ones(block, block, dtype=torch.bool)
            if c in part:
                ok = (rows[:, None] < n) & (cols[None, :] < n)
                tile = mask_fn(rows[:, None].clamp(max=n - 1), cols[None, :].clamp(max=n - 1)) & ok
            out[r * block : (r + 1) * block, c * block : (c + 1) * block] = tile
    return out[:n, :n]


@pytest.mark.parametrize("n", [256, 300])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,params", CASES + [("block_local", {"block": 128}), ("sliding_window", {"window": 200})])
def test_flex_block_mask_from_the_layout_is_the_mask(name, params, causal, n):
    """The BlockMask made from the pattern's block layout (no n x n evaluation) lets through
    exactly the pattern's pairs; tiles marked full are full."""
    from sparsebench.backends.flex import FLEX_BLOCK, block_mask_from_layout

    pat = PATTERNS.get(name).from_params(params)
    fn = pat.mask_fn(n, causal)
    bm = block_mask_from_layout(pat.block_layout(n, FLEX_BLOCK, causal), lambda b, h, q, k: fn(q, k), "cpu")
    assert torch.equal(_effective_mask(bm, fn, n, FLEX_BLOCK), pat.mask(n, causal))
    # the same partial and full tiles as torch's create_block_mask (which evaluates every pair)
    from torch.nn.attention.flex_attention import create_block_mask

    ref = create_block_mask(lambda b, h, q, k: fn(q, k), None, None, n, n, device="cpu", BLOCK_SIZE=FLEX_BLOCK)

    def tiles(num, idx):
        return [sorted(idx[0, 0, r, : num[0, 0, r]].tolist()) for r in range(num.shape[-1])]

    assert tiles(bm.kv_num_blocks, bm.kv_indices) == tiles(ref.kv_num_blocks, ref.kv_indices)
    assert tiles(bm.full_kv_num_blocks, bm.full_kv_indices) == tiles(ref.full_kv_num_blocks, ref.full_kv_indices)
    if params == {"block": 128} and not causal and n == 256:
        assert int(bm.full_kv_num_blocks.sum()) == 2 and int(bm.kv_num_blocks.sum()) == 0


@pytest.mark.parametrize("name,params,n", [("block_local", {"block": 128}, 300), ("dense", {}, 384)])
def test_flex_with_full_tiles_matches_reference(name, params, n):
    """Compiled FlexAttention on a mask with full tiles (no mask_mod) and a short last block."""
    be = BACKENDS.get("flex")
    why = be.unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    pat = PATTERNS.get(name).from_params(params)
    p = Problem(pat, n, False, 1, 2, 16, torch.float32, torch.device("cpu"))
    q, k, v = qkv(n, 1, 2, 16)
    out = be().prepare(p)(q, k, v)
    assert (out.double() - reference(pat, q, k, v, False)).abs().max().item() < 1e-5
