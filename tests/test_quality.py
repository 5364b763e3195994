"""Issue 20, part A1: every case says how far it is from full attention. The definitions
(sparsebench.quality_figures, the API's sparsebench.quality, the harness' case_quality) are
checked against references written here in float64: an explicit softmax, a loop over heads for
grouped-query attention, autograd for the query gradient, and one case worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import sparsebench
from sparsebench import quality_figures as quality_module
from sparsebench.errors import ScenarioError
from sparsebench.measure import harness

# -- independent references (float64) -----------------------------------------------------------


def qkv(n, b=1, h=2, kvh=None, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, n, d), (b, kvh or h, n, d), (b, kvh or h, n, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def softmax_attention(q, k, v, allowed):
    """Per query head (h reads key/value head h // group, by a loop here), an explicit softmax
    over the allowed keys: (weights, output), both float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    ws, outs = [], []
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h // group].transpose(-1, -2) / math.sqrt(q.shape[-1])
        e = torch.exp(s - s.max(-1, keepdim=True).values) * allowed
        w = e / e.sum(-1, keepdim=True)
        ws.append(w)
        outs.append(w @ v[:, h // group])
    return torch.stack(ws, 1), torch.stack(outs, 1)


def causal_allowed(n):
    i = torch.arange(n)
    return (i[None, :] <= i[:, None]).double()


def reference(q, k, v, pattern_mask, rows=None):
    """The quality figures from their definitions, over the given query rows (all by default)."""
    n = q.shape[2]
    full = causal_allowed(n)
    w_full, o_full = softmax_attention(q, k, v, full)
    _, o_pat = softmax_attention(q, k, v, full * pattern_mask.double())
    if rows is not None:
        w_full, o_full, o_pat = w_full[:, :, rows], o_full[:, :, rows], o_pat[:, :, rows]
        pattern_mask = pattern_mask[rows]
    recall = (w_full * pattern_mask.double()).sum(-1)
    return {
        "full_rel_err": float((o_pat - o_full).norm() / o_full.norm()),
        "recall_mean": float(recall.mean()),
        "recall_min": float(recall.min()),
        "quality_rows": o_full.shape[2],
    }


def assert_figures(got, want, rel=1e-9):
    assert got["quality_rows"] == want["quality_rows"]
    for name in ("full_rel_err", "recall_mean", "recall_min"):
        assert got[name] == pytest.approx(want[name], rel=rel, abs=rel), name


# -- the definitions ----------------------------------------------------------------------------


def test_dense_recalls_everything_and_equals_full_attention():
    q, k, v = qkv(96)
    got = sparsebench.quality(q, k, v, pattern="dense")
    assert got["recall_mean"] == 1.0 and got["recall_min"] == 1.0  # exactly: no mass is missed
    assert got["full_rel_err"] < 1e-12 and got["quality_rows"] == 96 and got["quality_note"] is None
    got32 = sparsebench.quality(*(t.float() for t in (q, k, v)), pattern="dense", causal=True)
    assert got32["recall_mean"] == 1.0 and got32["full_rel_err"] < 1e-6


@pytest.mark.parametrize(
    "name, params",
    [
        ("sliding_window", {"window": 16}),
        ("sink_window", {"sinks": 4, "window": 16}),
        ("strided", {"stride": 8}),
        ("bigbird", {"block": 8, "window_blocks": 3, "global_blocks": 1, "random_blocks": 1}),
    ],
)
def test_patterns_against_the_float64_definition(name, params):
    q, k, v = qkv(96)
    pat = sparsebench.pattern(name, **params)
    want = reference(q, k, v, pat.mask(96, True))
    assert 0 < want["recall_min"] < want["recall_mean"] < 1  # a real approximation, not a trivial case
    assert_figures(sparsebench.quality(q, k, v, pattern=name, **params), want)  # float64 in, float64 out
    assert_figures(sparsebench.quality(*(t.float() for t in (q, k, v)), pattern=name, **params), want, rel=2e-5)


@pytest.mark.parametrize(
    "name, params",
    [
        ("moba", {"chunk": 16, "topk": 2}),
        ("quest", {"page_size": 8, "token_budget": 24}),
        ("topk_keys", {"keys": 12, "index_dim": 8}),
    ],
)
def test_a_content_selected_pattern_is_judged_on_the_keys_it_selects(name, params):
    """The keys of moba, quest and topk_keys are chosen from q and k: the figures are the
    definition's under the selection the pattern makes from these inputs (one head here, so that
    the float64 reference's mask is that head's)."""
    q, k, v = (t[:, :1] for t in qkv(96))
    pat = sparsebench.pattern(name, **params)
    want = reference(q, k, v, pat.select(q, k).mask()[0, 0])
    assert 0 < want["recall_min"] < want["recall_mean"] < 1
    assert_figures(sparsebench.quality(q, k, v, pattern=name, **params), want)
    every = sparsebench.quality(q, k, v, pattern="moba", chunk=16, topk=6)  # all 6 chunks: full attention
    assert every["recall_mean"] == pytest.approx(1.0, abs=1e-12) and every["full_rel_err"] < 1e-12


def test_a_case_worked_out_by_hand():
    # n = 4, head_dim 1 (scale 1), every q = 1 and k_j = ln(j + 1): query i's full causal softmax
    # weights are proportional to j + 1 over j <= i. sliding_window(window=2) keeps keys i-1 and i:
    #   row 0: {0} of {0}: recall 1;  row 1: {0, 1} of {0, 1}: 1;
    #   row 2: keys 1, 2 of weights 1, 2, 3: (2 + 3) / 6 = 5/6;
    #   row 3: keys 2, 3 of weights 1, 2, 3, 4: (3 + 4) / 10 = 0.7.
    # recall_mean = (1 + 1 + 5/6 + 0.7) / 4 = 0.8833..., recall_min = 0.7.
    # v = (0, 0, 1, 1): full attention gives rows 0, 0, 3/6 = 0.5, 7/10 = 0.7; the window gives
    #   0, 0, (0*2 + 1*3) / 5 = 0.6, (3 + 4) / 7 = 1. Differences 0.1 and 0.3:
    # full_rel_err = sqrt(0.01 + 0.09) / sqrt(0.25 + 0.49) = sqrt(0.1 / 0.74) = 0.36761...
    q = torch.ones(1, 1, 4, 1, dtype=torch.float64)
    k = torch.log(torch.arange(1.0, 5.0, dtype=torch.float64)).reshape(1, 1, 4, 1)
    v = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).reshape(1, 1, 4, 1)
    got = sparsebench.quality(q, k, v, pattern="sliding_window", window=2)
    assert got["recall_mean"] == pytest.approx((1 + 1 + 5 / 6 + 0.7) / 4, rel=1e-12)
    assert got["recall_min"] == pytest.approx(0.7, rel=1e-12)
    assert got["full_rel_err"] == pytest.approx(math.sqrt(0.1 / 0.74), rel=1e-12)
    assert got["quality_rows"] == 4


def test_sampled_rows_give_the_exact_figures_of_those_rows():
    q, k, v = qkv(128)
    pat = sparsebench.pattern("sliding_window", window=16)
    got = sparsebench.quality(q, k, v, pattern="sliding_window", window=16, rows=6)
    rows = quality_module.sampled_rows(128, 6, 1)  # the first, the last and 6 seeded ones, as a run's check
    assert got["quality_rows"] == len(rows) and 2 < len(rows) <= 8
    assert_figures(got, reference(q, k, v, pat.mask(128, True), rows))
    exact = sparsebench.quality(q, k, v, pattern="sliding_window", window=16)
    assert exact["quality_rows"] == 128 and exact["recall_mean"] != got["recall_mean"]
    chosen = sparsebench.quality(q, k, v, pattern="sliding_window", window=16, rows=[5, 100, 5])
    assert_figures(chosen, reference(q, k, v, pat.mask(128, True), torch.tensor([5, 100])))


def test_grouped_query_attention_repeats_each_key_value_head_for_its_group():
    q, k, v = qkv(64, h=4, kvh=2)
    pat = sparsebench.pattern("sliding_window", window=8)
    want = reference(q, k, v, pat.mask(64, True))
    assert_figures(sparsebench.quality(q, k, v, pattern="sliding_window", window=8), want)
    # not the same as each query head reading key/value head h % kv_heads
    wrong = reference(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), pat.mask(64, True))
    assert wrong["recall_mean"] != pytest.approx(want["recall_mean"], rel=1e-6)


def test_the_query_gradient_against_float64_autograd():
    n = 48
    q, k, v = qkv(n, h=4, kvh=2, seed=3)
    grad = qkv(n, h=4, seed=4)[0]
    mask = sparsebench.pattern("sliding_window", window=8).mask(n, True)

    def attention(qq, allowed):  # autograd through the explicit float64 softmax
        return softmax_attention(qq, k, v, allowed)[1]

    qa = q.clone().requires_grad_(True)
    attention(qa, causal_allowed(n) * mask.double()).backward(grad)
    dq_window = qa.grad
    qb = q.clone().requires_grad_(True)
    attention(qb, causal_allowed(n)).backward(grad)
    dq_full = qb.grad
    want = float((dq_window - dq_full).norm() / dq_full.norm())
    assert want > 0.05

    got = quality_module.measure(
        q, k, v, causal=True, attended=lambda r: mask[r], out=attention(q, causal_allowed(n) * mask.double()),
        grad=grad, dq=dq_window,
    )  # fmt: skip
    assert got.full_grad_rel_err == pytest.approx(want, rel=1e-9)
    # sampled rows: the rows' own query gradients (a row's depends on that row alone)
    rows = torch.tensor([0, 7, 30, 47])
    sub = quality_module.measure(
        q, k, v, causal=True, attended=lambda r: mask[r], out=attention(q, causal_allowed(n) * mask.double()),
        rows=rows, grad=grad, dq=dq_window,
    )  # fmt: skip
    want_rows = float((dq_window - dq_full)[:, :, rows].norm() / dq_full[:, :, rows].norm())
    assert sub.full_grad_rel_err == pytest.approx(want_rows, rel=1e-9) and sub.quality_rows == 4
    with pytest.raises(ValueError, match="come together"):
        quality_module.measure(q, k, v, causal=True, attended=lambda r: mask[r], grad=grad)


def test_full_attention_bidirectional_when_the_case_is():
    q, k, v = qkv(64)
    pat = sparsebench.pattern("sliding_window", window=8)
    w_full, o_full = softmax_attention(q, k, v, torch.ones(64, 64, dtype=torch.float64))
    allowed = pat.mask(64, False).double()
    _, o_pat = softmax_attention(q, k, v, allowed)
    got = sparsebench.quality(q, k, v, pattern="sliding_window", causal=False, window=8)
    assert got["recall_mean"] == pytest.approx(float((w_full * allowed).sum(-1).mean()), rel=1e-9)
    assert got["full_rel_err"] == pytest.approx(float((o_pat - o_full).norm() / o_full.norm()), rel=1e-9)


def test_the_figures_are_computed_a_band_of_rows_at_a_time():
    """Never an n x n tensor: each band asks for the keys of at most BAND_ELEMENTS scores' rows."""
    n, batch, heads = 2048, 1, 4
    q, k, v = qkv(n, b=batch, h=heads, d=8, dtype=torch.float32)
    mask = sparsebench.pattern("sliding_window", window=64)
    asked: list[int] = []

    def attended(r):
        asked.append(len(r))
        return mask.rows(r, n, True)

    got = quality_module.measure(q, k, v, causal=True, attended=attended)
    step = quality_module.band_rows(batch, heads, n)
    assert step * batch * heads * n <= quality_module.BAND_ELEMENTS and step < n
    assert sum(asked) == n and max(asked) == step and got.quality_rows == n
    assert quality_module.band_rows(1, 8, 1 << 20) == 1  # at 1M tokens a band is one row


def test_bad_input_is_one_scenario_error_line():
    q, k, v = qkv(32)
    for call, words in [
        (lambda: sparsebench.quality(q, k, v, pattern="nope"), "unknown pattern"),
        (lambda: sparsebench.quality(q[0], k, v, pattern="dense"), "must be 4-D"),
        (lambda: sparsebench.quality(q, k[:, :, :30], v, pattern="dense"), "k and v need"),
        (lambda: sparsebench.quality(q, k, v, pattern="sliding_window", window=64), "larger than the sequence"),
        (lambda: sparsebench.quality(q, k, v, pattern="dense", rows=[40]), "rows must be query rows"),
        (lambda: sparsebench.quality(q, k, v, pattern="dense", rows=0), "rows must be a positive integer"),
    ]:
        with pytest.raises(ScenarioError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


def test_the_api_function_survives_importing_the_definitions_module():
    # sparsebench.quality is the API function; the definitions live in sparsebench.quality_figures,
    # so that importing them never rebinds the package attribute to a module
    import sparsebench.quality_figures  # noqa: F401

    assert callable(sparsebench.quality) and sparsebench.quality.__module__ == "sparsebench.api"


# -- patterns whose mask is the model's semantics -------------------------------------------------


@pytest.mark.parametrize(
    "name, params, word",
    [
        ("document", {"doc_lens": [16]}, "document"),
        ("prefix_lm", {"prefix": 8}, "prefix"),
        ("ds_bigbird", {"block": 8, "attention": "bidirectional"}, "attention=bidirectional"),
    ],
)
def test_a_pattern_that_is_the_model_s_semantics_has_no_figures_and_says_why(name, params, word):
    q, k, v = qkv(64)
    got = sparsebench.quality(q, k, v, pattern=name, **params)
    assert {got[f] for f in ("full_rel_err", "recall_mean", "recall_min", "quality_rows")} == {None}
    assert word in got["quality_note"] and "not an approximation" in got["quality_note"]
    assert sparsebench.pattern(name, **params).quality_exempt(True) == got["quality_note"]


def test_a_unidirectional_deepspeed_layout_is_measured():
    q, k, v = qkv(64)
    for attention in ("auto", "unidirectional"):
        assert sparsebench.pattern("ds_bigbird", block=8, attention=attention).quality_exempt(True) is None
        got = sparsebench.quality(q, k, v, pattern="ds_bigbird", block=8, attention=attention)
        assert got["quality_note"] is None and 0 < got["recall_mean"] <= 1


# -- the harness: once per case, on the check's rows ---------------------------------------------


@pytest.fixture
def captured(monkeypatch):
    """The tensors each case_quality call was given (q with the gradient of the last timed call)."""
    calls: list[dict] = []
    real = harness.case_quality

    def spy(case, p, q, k, v, out, **kw):
        calls.append(dict(q=q, k=k, v=v, out=out, dq=None if q.grad is None else q.grad.clone(), **kw))
        return real(case, p, q, k, v, out, **kw)

    monkeypatch.setattr(harness, "case_quality", spy)
    return calls


@pytest.mark.parametrize("backend", ["sdpa_masked", "block_sparse"])
def test_a_forward_case_records_its_quality_against_the_definition(make_case, captured, backend):
    case = make_case(
        pattern="sliding_window", params={"window": 16}, pattern_label="sliding_window(window=16)", backend=backend,
        heads=4, kv_heads=2, seq_len=96,
    )  # fmt: skip
    rec = harness.run_case(case)
    assert rec.get("status", "ok") == "ok" and rec["check"] == "exact"
    (call,) = captured
    want = reference(call["q"], call["k"], call["v"], sparsebench.pattern("sliding_window", window=16).mask(96, True))
    assert_figures(rec, want, rel=2e-5)  # the backend's fp32 output, not the float64 reference
    assert rec["quality_note"] is None and rec["full_grad_rel_err"] is None


def test_a_sampled_case_covers_the_check_s_rows(make_case, captured):
    case = make_case(pattern="strided", params={"stride": 8}, pattern_label="strided(stride=8)", seq_len=128,
                     exact_max_elems=0, sample_rows=5)  # fmt: skip
    rec = harness.run_case(case)
    assert rec["check"] == "sampled"
    rows = harness._check_rows(harness.make_problem(case), 0, 5, 1, "cpu")
    assert rec["quality_rows"] == len(rows) < 128
    (call,) = captured
    mask = sparsebench.pattern("strided", stride=8).mask(128, True)
    assert_figures(rec, reference(call["q"], call["k"], call["v"], mask, rows), rel=2e-5)


def test_a_backward_case_records_the_query_gradient_s_distance(make_case, captured):
    case = make_case(pattern="sliding_window", params={"window": 8}, pattern_label="sliding_window(window=8)",
                     backend="sdpa_masked", mode="backward", seq_len=64)  # fmt: skip
    rec = harness.run_case(case)
    assert rec.get("status", "ok") == "ok" and rec["grad_check"] == "exact"
    (call,) = captured
    q, k, v, grad = call["q"].detach(), call["k"].detach(), call["v"].detach(), call["grad"]
    qb = q.double().clone().requires_grad_(True)
    softmax_attention(qb, k, v, causal_allowed(64))[1].backward(grad.double())
    want = float((call["dq"].double() - qb.grad).norm() / qb.grad.norm())
    assert want > 0.05 and rec["full_grad_rel_err"] == pytest.approx(want, rel=1e-4)
    assert rec["full_rel_err"] > 0.05 and rec["quality_rows"] == 64

    dense = harness.run_case(make_case(backend="sdpa", mode="backward", seq_len=64))
    assert dense["full_grad_rel_err"] < 1e-5 and dense["recall_mean"] == 1.0


def test_an_unchecked_case_and_an_exempt_pattern_have_null_figures_with_a_note(make_case):
    rec = harness.run_case(make_case(check=False))
    assert rec["recall_mean"] is None and rec["quality_note"].startswith("not measured")
    doc = harness.run_case(make_case(pattern="document", params={"doc_lens": [16]}, pattern_label="document"))
    assert doc["recall_mean"] is None and doc["full_rel_err"] is None and "document" in doc["quality_note"]


# -- a real run ----------------------------------------------------------------------------------

RUN = """\
name: quality
seq_lens: [64]
patterns:
  - name: dense
  - name: sliding_window
    params: {window: 16}
  - name: prefix_lm
    params: {prefix: 8}
backends: [naive]
mode: [forward, backward, decode]
heads: 2
head_dim: 16
warmup: 0
repeats: 2
decode_tokens: 2
"""


def test_a_run_s_records_carry_the_quality_fields(tmp_path):
    from sparsebench.cli.app import app

    scen = tmp_path / "q.yaml"
    scen.write_text(RUN)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    recs = {(r["pattern"], r["mode"]): r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    assert {r["status"] for r in recs.values()} == {"ok"}
    for mode in ("forward", "backward"):
        dense, window = recs[("dense", mode)], recs[("sliding_window", mode)]
        assert dense["recall_mean"] == 1.0 and dense["full_rel_err"] < 1e-5 and dense["quality_rows"] == 64
        assert 0 < window["recall_min"] < window["recall_mean"] < 1 and window["full_rel_err"] > 0.01
        assert (window["full_grad_rel_err"] is not None) == (mode == "backward")
        prefix = recs[("prefix_lm", mode)]
        assert prefix["recall_mean"] is None and "prefix" in prefix["quality_note"]
    for pattern in ("dense", "sliding_window"):
        decode = recs[(pattern, "decode")]
        assert decode["recall_mean"] is None and decode["quality_note"].startswith("decode mode")
