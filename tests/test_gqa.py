"""Grouped-query attention (issue 19): q with ``heads`` heads over k and v with ``kv_heads``
(query head h reads key/value head h // (heads // kv_heads)), in the scenario, the case key,
every backend, the check, the static figures, the records and the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparsebench
from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError
from sparsebench.measure import harness
from sparsebench.measure.harness import TOLERANCE, inputs, make_problem, reference_error
from sparsebench.measure.memory import ESTIMATE_BAND, estimate_ratio
from sparsebench.patterns.base import PATTERNS
from sparsebench.results import schema
from sparsebench.scenario import expand, parse

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
MiB = 2**20

SCENARIO = """
name: gqa
seq_lens: [64, 128]
patterns: [dense, {name: sliding_window, params: {window: 16}}]
backends: [sdpa, block_sparse]
heads: 8
head_dim: 16
"""


def reference(pattern, q, k, v, causal=True):
    """float64 dense attention under the mask, k and v repeated head by head (h -> h // group)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    return masked_softmax_attention(q.double(), k, v, pattern.mask(q.shape[2], causal))


# -- scenario, case key, records ---------------------------------------------------------------


def test_kv_heads_defaults_to_heads_and_joins_the_case_key():
    plan = expand(parse(SCENARIO, "gqa.yaml"), "gqa.yaml")
    assert {c.kv_heads for c in plan.cases} == {8}
    gqa = expand(parse(SCENARIO + "kv_heads: 2\n", "gqa.yaml"), "gqa.yaml")
    assert {c.kv_heads for c in gqa.cases} == {2} and {c.heads for c in gqa.cases} == {8}
    assert "kv_heads" in schema.CASE_KEY and "kv_heads" in schema.SERIES_KEY
    ids = {c.case_id for c in plan.cases}
    assert not ids & {c.case_id for c in gqa.cases}  # the same case with fewer KV heads is another case
    rec = schema.identity(gqa.cases[0])
    assert rec["kv_heads"] == 2 and schema.case_key(rec) == gqa.cases[0].key()


@pytest.mark.parametrize("kv", [3, 5, 16])
def test_kv_heads_that_does_not_divide_heads_is_one_line_naming_the_field(tmp_path, kv):
    path = tmp_path / "bad.yaml"
    path.write_text(SCENARIO + f"kv_heads: {kv}\n")
    with pytest.raises(ScenarioError, match=rf"field 'kv_heads'.*kv_heads {kv} does not divide heads 8"):
        parse(path.read_text(), str(path))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "field 'kv_heads'" in lines[0] and "Traceback" not in res.output
    assert f"{path}:" in lines[0]  # the file (and line) too


def test_an_older_record_reads_kv_heads_as_heads_and_pairs_with_a_new_one():
    new = schema.identity(expand(parse(SCENARIO, "gqa.yaml"), "gqa.yaml").cases[0])
    old = {k: v for k, v in new.items() if k != "kv_heads"}
    old["schema_version"] = 2
    old["case_id"] = "|".join(str(old[c]) for c in schema.CASE_KEY if c != "kv_heads")  # as version 2 wrote it
    migrated = schema.migrate(old, 2)
    assert migrated["kv_heads"] == migrated["heads"] == 8
    assert schema.case_key(migrated) == schema.case_key(new) and migrated["case_id"] == new["case_id"]
    assert schema.case_key(old) == schema.case_key(new)  # read without migrating too


def test_static_fields_count_kv_heads(make_case):
    """kv_cache_bytes and the estimates count KV heads; FLOPs stay per query head."""
    from sparsebench.measure.runner import _Static

    static = _Static()
    for backend, pattern in (("sdpa", "dense"), ("block_sparse", "sliding_window"), ("sdpa_masked", "dense")):
        params = {"window": 256} if pattern == "sliding_window" else {}
        full, gqa = (
            static.fields(make_case(backend=backend, pattern=pattern, params=params, heads=32, kv_heads=kv,
                                    head_dim=64, seq_len=2048, tile=64))
            for kv in (32, 8)
        )  # fmt: skip
        assert gqa["kv_cache_bytes"] * 4 == full["kv_cache_bytes"] == 2 * 32 * 64 * 4 * full["kv_retained"]
        assert gqa["flops"] == full["flops"] and gqa["nnz"] == full["nnz"]
        q_bytes = 32 * 2048 * 64 * 4
        saved = full["est_mem_bytes"] - gqa["est_mem_bytes"]
        # three quarters of k and v; block_sparse copies one group's query heads and output (q / 4 each);
        # sdpa_masked, a reference, repeats k and v for every query head
        expected = {"sdpa": 2 * q_bytes * 3 // 4, "block_sparse": 2 * q_bytes * 3 // 4 - 2 * q_bytes // 4}
        assert saved >= 0.9 * expected.get(backend, -2 * q_bytes), (backend, saved)


# -- the check ---------------------------------------------------------------------------------


def test_the_check_repeats_each_kv_head_for_its_own_query_heads(make_case):
    """The reference pairs query head h with KV head h // group (repeat_interleave): an output that
    pairs it with h % kv_heads (k.repeat, the other way to widen k) is far off, the right one is not."""
    p = make_problem(make_case(pattern="sliding_window", params={"window": 8}, heads=8, kv_heads=2, seq_len=64))
    q, k, v = inputs(p)
    assert k.shape == (1, 2, 64, 16) and q.shape == (1, 8, 64, 16)
    mask = p.pattern.mask(64, True)
    right = masked_softmax_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), mask)
    wrong = masked_softmax_attention(q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1), mask)
    for rows in (1 << 20, 0):  # exact, then sampled rows
        kw = dict(exact_max_elems=rows, sample_rows=8)
        assert reference_error(p, q, k, v, right, **kw)[0] < 1e-5
        assert reference_error(p, q, k, v, wrong, **kw)[0] > 10 * TOLERANCE["fp32"]


CASES = [
    ("naive", "sliding_window", {"window": 16}, "fp32", "forward"),
    ("sdpa", "dense", {}, "fp32", "forward"),
    ("sdpa", "dense", {}, "bf16", "forward"),
    ("sdpa", "dense", {}, "fp32", "backward"),
    ("sdpa_masked", "strided", {"stride": 16}, "fp32", "forward"),
    ("block_sparse", "sliding_window", {"window": 40}, "fp32", "forward"),
    ("block_sparse", "sliding_window", {"window": 40}, "bf16", "forward"),
    ("block_sparse", "random", {"keys": 8}, "fp32", "forward"),
    ("block_sparse", "bigbird", {"block": 16}, "fp32", "forward"),
    ("block_sparse", "longformer", {"window": 16, "global_tokens": [0, 5]}, "fp32", "backward"),
    ("block_sparse", "strided", {"stride": 16}, "bf16", "backward"),
]


@pytest.mark.parametrize("backend, pattern, params, dtype, mode", CASES)
def test_every_backend_runs_grouped_query_cases_checked_against_the_reference(
    make_case, backend, pattern, params, dtype, mode
):
    """A measured case (as a run measures it, gradients too in backward mode) with 8 query heads
    over 2 KV heads, checked exactly against the repeat-interleave reference."""
    case = make_case(backend=backend, pattern=pattern, params=params, dtype=dtype, mode=mode, heads=8, kv_heads=2,
                     seq_len=128, tile=16, head_dim=32)  # fmt: skip
    rec = harness.run_case(case)
    assert rec.get("status", "ok") == "ok", rec
    assert rec["check"] == "exact" and rec["max_abs_err"] <= TOLERANCE[dtype]
    if mode == "backward":
        assert rec["grad_check"] == "exact" and rec["grad_err"] is not None


def test_block_sparse_reads_the_shared_kv_head_without_repeating_it(monkeypatch):
    """block_sparse's kernels see k and v with kv_heads heads (the plan runs once per group of
    query heads on the shared rows), never a repeated copy of the size of q."""
    from sparsebench.backends.block_sparse import execute

    seen = []
    forward = execute.run_forward

    def spy(plan, q, k, v, keep=False):
        seen.append((tuple(q.shape), k.data_ptr(), tuple(k.shape)))
        return forward(plan, q, k, v, keep)

    monkeypatch.setattr(execute, "run_forward", spy)
    p = Problem(PATTERNS.get("sliding_window")(window=32), 256, True, 1, 8, 32, torch.float32, torch.device("cpu"),
                tile=32, kv_heads=2)  # fmt: skip
    q, k, v = inputs(p)
    with torch.no_grad():
        out = BACKENDS.get("block_sparse")().prepare(p)(q, k, v)
    assert seen and all(shape == (1, 2, 256, 32) and ptr == k.data_ptr() for _, ptr, shape in seen)
    assert (out.double() - reference(p.pattern, q, k, v)).abs().max() < 1e-5


# -- the Python API ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["naive", "sdpa_masked", "block_sparse"])
def test_attention_takes_k_and_v_with_fewer_heads(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 96, 32, generator=g)
    k, v = (torch.randn(2, 3, 96, 32, generator=g) for _ in range(2))
    out = sparsebench.attention(q, k, v, pattern="sliding_window", backend=backend, window=24, tile=16)
    ref = reference(sparsebench.pattern("sliding_window", window=24), q, k, v)
    assert out.shape == q.shape and (out.double() - ref).abs().max() < 1e-5
    fn = sparsebench.prepare("sliding_window", 96, backend=backend, batch=2, heads=6, kv_heads=1, head_dim=32,
                             tile=16, window=24)  # fmt: skip
    assert fn.expected_shapes() == ((2, 6, 96, 32), (2, 1, 96, 32))
    one = k[:, :1].contiguous(), v[:, :1].contiguous()
    ref = reference(sparsebench.pattern("sliding_window", window=24), q, *one)
    assert (fn(q, *one).double() - ref).abs().max() < 1e-5


def test_attention_grouped_query_gradients_match_the_reference():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 128, 32, generator=g, dtype=torch.float64).float() for h in (4, 2, 2))
    grads = []
    for run in ("block_sparse", "reference"):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if run == "reference":
            out = reference(sparsebench.pattern("bigbird", block=16), *ins).float()
        else:
            out = sparsebench.attention(*ins, pattern="bigbird", backend=run, block=16, tile=16)
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in ins])
        assert ins[1].grad.shape == (1, 2, 128, 32)
    for got, ref in zip(*grads):
        assert (got - ref).abs().max() < 1e-4


def test_attention_names_the_shapes_when_kv_heads_does_not_divide():
    q = torch.randn(1, 4, 16, 16)
    for k, v in ((torch.randn(1, 3, 16, 16),) * 2, (torch.randn(1, 2, 16, 16), torch.randn(1, 4, 16, 16))):
        with pytest.raises(ScenarioError) as info:
            sparsebench.attention(q, k, v, backend="sdpa")
        text = str(info.value)
        assert "\n" not in text and f"k {tuple(k.shape)}" in text and f"v {tuple(v.shape)}" in text, text


# -- measured memory, flex -------------------------------------------------------------------------


@linux
@pytest.mark.slow
def test_grouped_query_peaks_are_below_the_same_case_without_it(make_case):
    """Where k and v are a large part of the memory (16 query heads, n = 4096), 16 query heads over
    2 KV heads peak well below the same case with 16 KV heads on block_sparse and sdpa (inputs,
    output and the kernels' temporaries, measured in a worker as a run measures them; a backend
    that repeated k and v would peak above it), and each estimate holds its peak."""
    from sparsebench.measure.worker import Worker

    worker = Worker()
    try:
        peaks = {}
        lo, hi = ESTIMATE_BAND
        for backend, pattern, params in (("block_sparse", "sliding_window", {"window": 256}), ("sdpa", "dense", {})):
            for kv in (16, 2):
                case = make_case(backend=backend, pattern=pattern, params=params, heads=16, kv_heads=kv, head_dim=64,
                                 seq_len=4096, tile=64, warmup=1, repeats=1, max_repeats=1, check=False)  # fmt: skip
                rec = worker.run(case, 300)
                assert rec.get("status", "ok") == "ok", rec
                peaks[backend, kv] = rec["peak_mem_bytes"]
                est = BACKENDS.get(backend)().estimate_bytes(make_problem(case))
                ratio = estimate_ratio(est, rec["peak_mem_bytes"])
                peak = rec["peak_mem_bytes"] / MiB
                print(f"{backend} kv_heads={kv}: peak {peak:.1f} MiB, estimate ratio {ratio:.2f}")
                assert lo <= ratio <= hi, (backend, kv, ratio)
    finally:
        worker.close()
    # without GQA: q, k, v and out of 16 MiB each; with it k and v are 2 MiB each (block_sparse also
    # copies one group's query heads and output: 2 MiB each): about 0.6 and 0.55 of it
    for backend in ("block_sparse", "sdpa"):
        assert peaks[backend, 2] < 0.8 * peaks[backend, 16], (backend, peaks)


@pytest.mark.slow
def test_flex_runs_grouped_query_attention():
    if BACKENDS.get("flex").unavailable() is not None:
        pytest.skip(BACKENDS.get("flex").unavailable())
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 256, 32, generator=g)
    k, v = (torch.randn(1, 1, 256, 32, generator=g) for _ in range(2))
    out = sparsebench.attention(q, k, v, pattern="sliding_window", backend="flex", window=64)
    ref = reference(sparsebench.pattern("sliding_window", window=64), q, k, v)
    assert (out.double() - ref).abs().max() < 1e-5


def test_the_panel_title_names_the_kv_heads():
    from sparsebench.render.plots import _panel_title

    row = dict(device="cpu", dtype="fp32", mode="forward", causal=True, batch=1, heads=32, kv_heads=8, head_dim=64)
    assert "H=32/8 KV" in _panel_title(row)
    assert "KV" not in _panel_title({**row, "kv_heads": 32})


def test_a_run_records_kv_heads(tmp_path):
    path = tmp_path / "gqa.yaml"
    path.write_text(SCENARIO.replace("[64, 128]", "[64]") + "kv_heads: 2\nrepeats: 1\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(path), "--output", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (Path(out) / "records.jsonl").read_text().splitlines()]
    assert recs and all(r["kv_heads"] == 2 and r["heads"] == 8 and r["status"] == "ok" for r in recs), recs
    assert all(r["kv_cache_bytes"] == 2 * 2 * 16 * 4 * r["kv_retained"] for r in recs)
