"""The Python API (sparsebench.api): pattern(), prepare() and attention() keep pattern and
backend apart, reuse the backend's plan across calls, and refuse bad shapes with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparsebench
from sparsebench.backends.base import BACKENDS, masked_softmax_attention
from sparsebench.errors import BackendUnavailable, PatternError, ScenarioError
from sparsebench.patterns.base import PATTERNS, Pattern


def qkv(n, b=1, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


def dense_reference(pat, q, k, v, causal=True):
    """Dense attention (float64, the n x n scores) under the pattern's mask."""
    return masked_softmax_attention(q.double(), k.double(), v.double(), pat.mask(q.shape[2], causal))


def max_err(out, ref) -> float:
    return (out.double() - ref).abs().max().item()


def test_import_does_not_import_torch():
    code = "import sys, sparsebench; print(callable(sparsebench.prepare), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_pattern_is_the_pattern_object():
    sw = sparsebench.pattern("sliding_window", window=4)
    assert isinstance(sw, Pattern) and sw == PATTERNS.get("sliding_window").from_params({"window": 4})
    assert sw.label() == "sliding_window(window=4)"
    assert sw.keys_per_query(10, True).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert sw.nnz(10, True) == 34 and int(sw.mask(10, True).sum()) == 34
    assert sw.kv_retained(10) == 4
    assert sw.block_layout(10, 5, True).dense().tolist() == [[1, 0], [1, 1]]
    with pytest.raises(PatternError, match="needs parameter"):
        sparsebench.pattern("sliding_window")
    with pytest.raises(ScenarioError, match="unknown pattern 'sliding_windw'.*did you mean 'sliding_window'"):
        sparsebench.pattern("sliding_windw", window=4)


@pytest.mark.parametrize("backend", ["naive", "block_sparse"])
@pytest.mark.parametrize("name, params", [("block_local", {"block": 8}), ("bigbird", {"block": 8, "random_blocks": 1})])
def test_every_keyword_that_is_not_an_api_option_goes_to_the_pattern(backend, name, params):
    """``block`` is the pattern's parameter on every backend, never the tile size; ``tile`` stays
    the backend's."""
    n = 40
    q, k, v = qkv(n)
    pat = PATTERNS.get(name).from_params(params)
    ref = dense_reference(pat, q, k, v)
    assert max_err(sparsebench.attention(q, k, v, pattern=name, backend=backend, **params), ref) < 1e-5
    assert max_err(sparsebench.attention(q, k, v, pattern=name, backend=backend, tile=16, **params), ref) < 1e-5
    fn = sparsebench.prepare(name, n, backend=backend, batch=1, heads=2, head_dim=16, tile=16, **params)
    assert fn.pattern == pat and fn.problem.tile == 16
    assert max_err(fn(q, k, v), ref) < 1e-5
    # the default tile is the backend's, 64, whatever the pattern's block
    assert sparsebench.prepare(name, n, backend=backend, batch=1, heads=2, head_dim=16, **params).problem.tile == 64


@pytest.mark.parametrize("backend", ["naive", "sdpa_masked", "block_sparse"])
def test_prepare_equals_attention_and_dense_reference(backend):
    n = 77
    q, k, v = qkv(n, b=2, h=3)
    pat = sparsebench.pattern("longformer", window=6, global_tokens=[0, 31])
    fn = sparsebench.prepare(pat, n, backend=backend, batch=2, heads=3, head_dim=16, tile=16)
    out = fn(q, k, v)
    assert max_err(out, dense_reference(pat, q, k, v)) < 1e-5
    same = sparsebench.attention(
        q, k, v, pattern="longformer", backend=backend, tile=16, window=6, global_tokens=[0, 31]
    )
    assert torch.equal(out, same)
    # bidirectional, by name with its parameters
    fn = sparsebench.prepare(
        "sliding_window", n, backend=backend, causal=False, batch=2, heads=3, head_dim=16, window=5
    )
    assert max_err(fn(q, k, v), dense_reference(fn.pattern, q, k, v, causal=False)) < 1e-5


def test_prepare_runs_the_backends_prepare_once_for_many_calls(monkeypatch):
    cls = BACKENDS.get("block_sparse")
    calls = []
    original = cls.prepare

    def counting(self, p):
        calls.append(p)
        return original(self, p)

    monkeypatch.setattr(cls, "prepare", counting)
    n = 50
    fn = sparsebench.prepare("sliding_window", n, batch=1, heads=2, head_dim=16, window=8, tile=16)
    assert len(calls) == 1
    pat = fn.pattern
    for seed in range(5):  # new inputs every step, as in a model's forward
        q, k, v = qkv(n, seed=seed)
        assert max_err(fn(q, k, v), dense_reference(pat, q, k, v)) < 1e-5
    assert len(calls) == 1
    sparsebench.attention(q, k, v, pattern="sliding_window", window=8)  # one call: prepares for it
    assert len(calls) == 2


def test_prepared_backward_matches_dense_gradients():
    n = 45
    q, k, v = (t.requires_grad_() for t in qkv(n))
    fn = sparsebench.prepare("sink_window", n, batch=1, heads=2, head_dim=16, sinks=2, window=5, tile=16)
    fn(q, k, v).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dense_reference(fn.pattern, q, k, v).sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert (a.double() - b).abs().max().item() < 1e-5


def test_a_backend_without_backward_refuses_only_calls_that_need_gradients(monkeypatch):
    monkeypatch.setattr(BACKENDS.get("naive"), "supports_backward", False)
    n = 32
    fn = sparsebench.prepare("sliding_window", n, backend="naive", batch=1, heads=2, head_dim=16, window=4)
    assert fn.no_backward == "backend 'naive' has no backward pass"
    q, k, v = qkv(n)
    assert max_err(fn(q, k, v), dense_reference(fn.pattern, q, k, v)) < 1e-5
    with pytest.raises(BackendUnavailable, match="no backward pass"):
        fn(q.requires_grad_(), k, v)
    with torch.no_grad():
        fn(q, k, v)


@pytest.mark.parametrize(
    "q_shape, k_shape",
    [
        ((1, 2, 49, 16), (1, 2, 50, 16)),  # another n
        ((1, 3, 50, 16), (1, 3, 50, 16)),  # another number of heads
        ((2, 2, 50, 16), (2, 2, 50, 16)),  # another batch
        ((1, 2, 50, 8), (1, 2, 50, 8)),  # another head_dim
        ((1, 2, 50, 16), (1, 1, 50, 16)),  # k with fewer heads than prepared for
    ],
)
def test_prepared_call_refuses_other_shapes_in_one_line(q_shape, k_shape):
    fn = sparsebench.prepare("sliding_window", 50, batch=1, heads=2, head_dim=16, window=8)
    q, k = torch.randn(q_shape), torch.randn(k_shape)
    with pytest.raises(ScenarioError) as info:
        fn(q, k, k.clone())
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("prepared for q (1, 2, 50, 16), k and v (1, 2, 50, 16), fp32 on cpu; got ")
    assert f"q {q_shape}, k {k_shape}, v {k_shape}" in msg


def test_prepared_call_refuses_another_dtype():
    fn = sparsebench.prepare("dense", 20, batch=1, heads=2, head_dim=16, dtype="bf16")
    assert fn.problem.dtype == torch.bfloat16
    q, k, v = qkv(20)
    with pytest.raises(ScenarioError, match=r"bf16 on cpu; got .* fp32 on cpu"):
        fn(q, k, v)
    out = fn(*(t.bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16


def test_attention_refuses_inputs_that_are_not_4d_or_differ():
    q, k, v = qkv(24)
    with pytest.raises(ScenarioError, match="must be 4-D") as info:
        sparsebench.attention(q[0], k, v)
    assert "\n" not in str(info.value)
    with pytest.raises(ScenarioError, match=r"got q \(1, 2, 24, 16\), k \(1, 2, 23, 16\)"):
        sparsebench.attention(q, k[:, :, :23], v)


def test_kv_heads_accepted_and_a_non_divisor_refused():
    # grouped-query attention itself (kv_heads < heads) runs: tests/test_gqa.py
    fn = sparsebench.prepare("dense", 16, batch=1, heads=4, kv_heads=4, head_dim=16)
    assert fn.kv_heads == 4 and fn.expected_shapes() == ((1, 4, 16, 16), (1, 4, 16, 16))
    fn = sparsebench.prepare("dense", 16, batch=1, heads=4, kv_heads=2, head_dim=16)
    assert fn.kv_heads == 2 and fn.expected_shapes() == ((1, 4, 16, 16), (1, 2, 16, 16))
    with pytest.raises(ScenarioError, match="must divide heads"):
        sparsebench.prepare("dense", 16, batch=1, heads=4, kv_heads=3, head_dim=16)
    q = torch.randn(1, 4, 16, 16)
    kv = torch.randn(1, 3, 16, 16)
    # attention() reads kv_heads from k
    with pytest.raises(ScenarioError, match=r"q \(1, 4, 16, 16\), k \(1, 3, 16, 16\)"):
        sparsebench.attention(q, kv, kv)


def test_prepare_refuses_bad_values_before_any_work():
    with pytest.raises(ScenarioError, match="larger than the sequence length"):
        sparsebench.prepare("sliding_window", 16, batch=1, heads=2, head_dim=16, window=100)
    with pytest.raises(ScenarioError, match="batch must be a positive integer"):
        sparsebench.prepare("dense", 16, batch=0, heads=2, head_dim=16)
    with pytest.raises(ScenarioError, match="tile must be a positive integer"):
        sparsebench.prepare("dense", 16, batch=1, heads=2, head_dim=16, tile=0)
    with pytest.raises(ScenarioError, match="unknown dtype 'fp8'"):
        sparsebench.prepare("dense", 16, batch=1, heads=2, head_dim=16, dtype="fp8")
    with pytest.raises(ScenarioError, match="unknown backend 'nope'"):
        sparsebench.prepare("dense", 16, backend="nope", batch=1, heads=2, head_dim=16)
    with pytest.raises(BackendUnavailable, match="dense attention only"):
        sparsebench.prepare("sliding_window", 16, backend="sdpa", batch=1, heads=2, head_dim=16, window=4)
    with pytest.raises(ScenarioError, match="already built; give its parameters to sparsebench.pattern"):
        sparsebench.prepare(
            sparsebench.pattern("sliding_window", window=4), 16, batch=1, heads=2, head_dim=16, window=8
        )
    with pytest.raises(PatternError, match="parameter for pattern 'dense'"):
        sparsebench.prepare(
            "dense", 16, batch=1, heads=2, head_dim=16, window=8
        )  # a typo'd option is a pattern parameter
