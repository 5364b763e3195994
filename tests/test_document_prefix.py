"""Packed documents (``document``) and prefixes (``prefix_lm``), issue 19: each against its rule
written here as plain Python on (i, j); their documents and prefix as the issue defines them;
every backend against dense attention under the same mask; block_sparse's plan built from the
boundaries (never an n x n mask); prefix_lm's own causality through the scenario, the records'
ideal speedup and the tables; bad parameters as one line naming the field."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.cli.app import app
from sparsebench.errors import PatternError
from sparsebench.patterns.base import PATTERNS
from sparsebench.patterns.geometry import scanned_layout


def document(doc_lens):
    return PATTERNS.get("document").from_params({"doc_lens": doc_lens})


def prefix_lm(prefix):
    return PATTERNS.get("prefix_lm").from_params({"prefix": prefix})


def docs_of(lens, n):
    """Document index of each position: ``lens`` laid end to end from 0, repeated, cut at n."""
    out, d = [], 0
    while len(out) < n:
        out += [d] * lens[d % len(lens)]
        d += 1
    return out[:n]


def document_rule(lens, causal):
    def rule(i, j, n):
        doc = docs_of(lens, n)
        return doc[i] == doc[j] and (j <= i or not causal)

    return rule


def prefix_rule(prefix):
    return lambda i, j, n: j < prefix or j <= i


CASES = [
    (lambda: document([5, 9, 3]), lambda c: document_rule([5, 9, 3], c)),
    (lambda: document([4]), lambda c: document_rule([4], c)),
    (lambda: document([40]), lambda c: document_rule([40], c)),  # one document longer than n: cut
    (lambda: prefix_lm(7), lambda c: prefix_rule(7)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("n", [13, 31])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_counts_structure_and_layout_follow_the_rule(case, n, causal):
    make, rule_of = CASES[case]
    pat, rule = make(), rule_of(causal)
    mask = pat.mask(n, causal)
    want = torch.tensor([[rule(i, j, n) for j in range(n)] for i in range(n)])
    assert torch.equal(mask, want), pat.label()
    assert torch.equal(pat.keys_per_query(n, causal), want.sum(1))
    assert pat.nnz(n, causal) == int(want.sum())
    i = torch.arange(n)
    st = pat.structure(n, causal)
    assert torch.equal(st.covers(i[:, None], i[None, :]), want)
    for tile in (4, 8):  # the analytic layout of the structure, tile by tile as the mask says
        lay = pat.block_layout(n, tile, causal)
        scan = scanned_layout(pat, n, tile, lay.causal)  # prefix_lm: its own, bidirectional layout
        for field in ("crow", "col", "count", "full"):
            assert torch.equal(getattr(lay, field), getattr(scan, field)), (pat.label(), tile, field)


def test_documents_are_laid_end_to_end_cut_at_n_and_repeated():
    pat = document([3, 5, 2])
    assert pat.starts(13).tolist() == [0, 3, 8, 10, 13]  # the list (10 tokens) repeats
    assert pat.starts(7).tolist() == [0, 3, 7]  # the second document cut at n
    assert pat.kv_retained(13) == 3 and pat.kv_retained(7) == 4  # the last document: the one a decoder continues
    assert pat.label() == "document(doc_lens=[3,5,2])" and pat.params() == {"doc_lens": [3, 5, 2]}
    assert document(7).params() == {"doc_lens": [7]}  # one length: a list of one


def test_drawn_documents_are_seeded_exponential_and_the_same_everywhere():
    spec = {"mean": 64, "seed": 3}
    a, b = document(spec), document(dict(spec))
    n = 1 << 16
    starts = a.starts(n)
    lens = starts.diff()
    assert int(starts[-1]) == n and bool((lens >= 1).all())
    assert torch.equal(starts, b.starts(n))  # the same n: the same documents, in any instance
    assert torch.equal(a.starts(4096)[:-2], starts[: a.starts(4096).numel() - 2])  # a longer n continues them
    assert 0.85 * 64 < float(lens[:-1].double().mean()) < 1.15 * 64  # ~1000 documents of mean 64
    assert float(lens[:-1].double().std()) > 0.7 * 64  # exponential (std = mean), not a constant
    assert not torch.equal(starts, document({"mean": 64, "seed": 4}).starts(n))
    assert a.label() == "document(doc_lens={mean:64,seed:3})" and a.params() == {"doc_lens": spec}
    assert hash(a) == hash(b)  # frozen patterns hash, dict parameter included


def test_prefix_lm_sets_its_own_causality_and_keeps_its_prefix_whole():
    pat = prefix_lm(4)
    assert pat.causality(True) is True and pat.causality(False) is True
    assert "bidirectional" in pat.causality_reason()
    m = pat.mask(8, True)
    assert bool(m[0, 3]) and not bool(m[4, 5])  # above the diagonal inside the prefix, causal after it
    assert torch.equal(m, pat.mask(8, False))  # the same mask in either setting
    p = Problem(pat, 64, False, 1, 2, 32, torch.float32, torch.device("cpu"))
    assert p.causal is True  # records and backends see it causal, its dense baseline is causal
    n = 64
    assert pat.nnz(n, True) == 4 * 4 + sum(i + 1 for i in range(4, n)) > n * (n + 1) // 2
    assert pat.kv_retained(n) == n


def _qkv(n, dtype=torch.float32, seed=0, h=2, d=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g).to(dtype) for _ in range(3)]


PATTERN_PARAMS = [
    ("document", {"doc_lens": [100, 37, 300]}),
    ("document", {"doc_lens": {"mean": 50, "seed": 3}}),
    ("prefix_lm", {"prefix": 77}),
]


@pytest.mark.parametrize("name,params", PATTERN_PARAMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["naive", "sdpa_masked", "block_sparse", "flex"])
def test_every_backend_matches_dense_attention_under_the_mask(name, params, causal, backend):
    be = BACKENDS.get(backend)()
    why = be.unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    pat = PATTERNS.get(name).from_params(params)
    n = 300
    p = Problem(pat, n, causal, 1, 2, 64, torch.float32, torch.device("cpu"))
    q, k, v = _qkv(n)
    out = be.prepare(p)(q, k, v)
    ref = masked_softmax_attention(q.double(), k.double(), v.double(), pat.mask(n, p.causal))
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name,params", PATTERN_PARAMS)
def test_block_sparse_forward_and_backward_over_several_calls(monkeypatch, name, params, native):
    """Several calls of rows (made smaller here) and their gradients, on the native window kernel
    and on ATen's (an additive mask from the ranges)."""
    from sparsebench.backends.block_sparse import plan as plan_mod

    monkeypatch.setattr(plan_mod, "NATIVE_WINDOWS", native)
    monkeypatch.setattr(plan_mod, "RANGES_NATIVE_ROWS", 256)
    monkeypatch.setattr(plan_mod, "RANGE_ROWS", 128)
    pat = PATTERNS.get(name).from_params(params)
    n = 700
    p = Problem(pat, n, True, 1, 2, 64, torch.float32, torch.device("cpu"), mode="backward")
    q, k, v = (t.requires_grad_(True) for t in _qkv(n))
    go = _qkv(n, seed=1)[0]
    fn = BACKENDS.get("block_sparse")().prepare(p)
    assert fn.plan.kinds == ("ranges",) and len(fn.plan.calls) > 1
    fn(q, k, v).backward(go)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = masked_softmax_attention(q2, k2, v2, pat.mask(n, p.causal))
    ref.backward(go.double())
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name,params", PATTERN_PARAMS[1:])
def test_block_sparse_plans_one_key_range_per_row_not_a_mask(monkeypatch, name, params):
    """The layout and the plan come from the boundaries: at n = 16384 no tile is evaluated
    (``allowed`` never runs), the plan holds a few bytes per row, and its calls cover about the
    pattern's own pairs at the 8-row blocks of the native kernel, not the causal square."""
    from sparsebench.backends.block_sparse import plan as plan_mod
    from sparsebench.backends.block_sparse import plan_bytes
    from sparsebench.backends.block_sparse.attend import RangeMask

    pat = PATTERNS.get(name).from_params(params)
    n = 1 << 14
    monkeypatch.setattr(type(pat), "_allowed", lambda *a, **k: pytest.fail("evaluated the mask"))
    lay = pat.block_layout(n, 64, True)
    assert int(lay.count.sum()) == pat.nnz(n, True)
    plan = plan_mod.build(pat, n, True, groups=8, head_dim=64, block=64, device=torch.device("cpu"))
    assert plan.kinds == ("ranges",)
    assert all(isinstance(c.mask, RangeMask) and c.ranges is not None for c in plan.calls)
    assert sum(c.mask.stored_bytes for c in plan.calls) <= 16 * n
    touched = 0  # keys each 8-row block computes: from its rows' first key to their last
    for c in plan.calls:
        lo, hi = (t.long().view(-1, 8) for t in c.ranges)  # calls of whole 8-row blocks here
        touched += 8 * int((hi.amax(1) - lo.amin(1) + 1).sum())
    assert touched < 1.2 * pat.nnz(n, True) + 16 * n
    p = Problem(pat, n, True, 1, 8, 64, torch.float32, torch.device("cpu"))
    assert plan_bytes(plan, p) < 1.3 * p.io_bytes + 64 * 8 * n  # q, k, v, out and O(n) beside them


def _expand(text, tmp_path):
    from sparsebench.scenario import expand, load

    path = tmp_path / "s.yaml"
    path.write_text(text)
    return expand(load(path)[0], str(path))


SCENARIO = """
name: s
seq_lens: [256, 512]
patterns:
  - name: prefix_lm
    params: {{prefix: 300}}
  - name: document
    params: {{doc_lens: [100, 50]}}
backends: [block_sparse]
causal: {causal}
"""


@pytest.mark.parametrize("causal", ["true", "false"])
def test_prefix_lm_runs_causal_against_causal_dense_and_its_ideal_is_below_one(tmp_path, causal):
    plan = _expand(SCENARIO.format(causal=causal), tmp_path)
    by = {(c.pattern, c.backend, c.seq_len): c for c in plan.cases}
    pre = by[("prefix_lm", "block_sparse", 512)]
    assert pre.causal is True  # its own, in either scenario
    assert by[("prefix_lm", "block_sparse", 256)].skip_reason  # the prefix does not fit n = 256: skipped
    assert by[("document", "block_sparse", 512)].causal is (causal == "true")  # documents follow the scenario
    baselines = [c for c in plan.cases if c.pattern == "dense" and c.backend == "sdpa" and c.seq_len == 512]
    assert any(c.causal for c in baselines)  # the causal dense baseline it is set against
    if causal == "false":
        assert any("prefix_lm(prefix=300) runs causal" in note for note in plan.notes)
    ideal = (512 * 513 // 2) / prefix_lm(300).nnz(512, pre.causal)  # the records' ideal_speedup
    assert ideal == (512 * 513 // 2) / (300 * 300 + sum(i + 1 for i in range(300, 512))) < 1.0


def test_the_baseline_table_says_an_ideal_below_one_is_real():
    from report_fixtures import record

    from sparsebench.analysis.scaling import analyze
    from sparsebench.render.analysis import BASELINE_TITLE, tables
    from sparsebench.results.folder import frame

    pat, recs = prefix_lm(1024), []
    for n in (2048, 4096):
        dense = n * (n + 1) // 2
        recs.append(record("dense", "sdpa", n, 1e-9 * dense))
        nnz = pat.nnz(n, True)
        recs.append(
            record("prefix_lm", "block_sparse", n, 1e-9 * nnz, params={"prefix": 1024}, nnz=nnz, density=nnz / n / n)
        )
    a = analyze(frame(recs))
    s = a.find("prefix_lm(prefix=1024)", "block_sparse")
    assert s.ideal_speedup == pytest.approx((4096 * 4097 // 2) / pat.nnz(4096, True)) and s.ideal_speedup < 1
    note = next(t for t in tables(a) if t.title == BASELINE_TITLE).note
    assert note.startswith("An ideal below 1x is real: prefix_lm(prefix=1024) 0.94x at 4096.")
    assert "more (query, key) pairs than the dense sdpa baseline" in note


@pytest.mark.parametrize(
    "params,words",
    [
        ("{doc_lens: [512, 0, 3]}", "has length 0 at entry 1"),
        ("{doc_lens: [-4]}", "has length -4 at entry 0"),
        ("{doc_lens: []}", "must be a non-empty list"),
        ("{doc_lens: {mean: -1, seed: 0}}", "mean must be a number of tokens >= 1"),
        ("{doc_lens: {meen: 5, seed: 0}}", "unknown key 'meen' (did you mean 'mean'?)"),
        ("{doc_lens: {mean: 5, seed: x}}", "seed must be an integer"),
        ("{doc_lens: {seed: 1}}", "needs a mean"),
    ],
)
def test_bad_doc_lens_is_one_line_naming_the_field(tmp_path, params, words):
    path = tmp_path / "bad.yaml"
    head = "name: bad\nseq_lens: [1k]\nbackends: [sdpa]\npatterns:\n"
    path.write_text(f"{head}  - name: document\n    params: {params}\n")
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "Traceback" not in line, res.output
    assert "patterns[0].params" in line and "'doc_lens'" in line and words in line, line
    with pytest.raises(PatternError):
        PATTERNS.get("document").from_params(__import__("yaml").safe_load(params))


def test_a_prefix_longer_than_every_length_refuses_the_scenario(tmp_path):
    path = tmp_path / "bad.yaml"
    head = "name: bad\nseq_lens: [1k, 2k]\nbackends: [sdpa]\npatterns:\n"
    path.write_text(f"{head}  - name: prefix_lm\n    params: {{prefix: 4096}}\n")
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "'prefix'=4096" in line and "patterns[0].params" in line, line
    with pytest.raises(PatternError):
        prefix_lm(0)


def test_documents_scenario_ships_and_expands(tmp_path):
    from pathlib import Path

    from sparsebench.scenario import expand, load

    path = Path(__file__).resolve().parent.parent / "scenarios" / "documents-cpu.yaml"
    plan = expand(load(path)[0], str(path))
    labels = {c.pattern_label for c in plan.cases}
    assert {"document(doc_lens={mean:1024,seed:0})", "prefix_lm(prefix=4096)"} <= labels
    assert {c.backend for c in plan.cases} == {"sdpa", "sdpa_masked", "block_sparse", "flex"}
    assert not any(c.skip_reason for c in plan.cases)
