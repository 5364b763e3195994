"""Decode through the backends (issue 19): every backend the scenario names decodes, each
generated token equals the row of full attention under the pattern's mask (with grouped-query
heads too: the cache holds kv_heads heads, the reference repeats them per group), the records
name the backend that ran, a backend that cannot decode is skipped with its reason, and the
figure and tables say time per generated token, one line per pattern and backend."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from report_fixtures import record, write_result

from sparsebench import scenario as sc_mod
from sparsebench.analysis.scaling import analyze
from sparsebench.kv.planner import make_pattern
from sparsebench.measure import decode_steps, runner
from sparsebench.measure.decode import Decoder, SeededKV, TensorKV, measure_decode, reference_rows
from sparsebench.render import plots
from sparsebench.render.analysis import DECODE_TITLE, tables
from sparsebench.results import folder as results
from sparsebench.results.folder import load_frame


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EAGER = ["sdpa", "sdpa_masked", "naive", "block_sparse"]
PATTERNS = [
    ("dense", {}),  # a contiguous prefix of a dense cache
    ("sliding_window", {"window": 16}),  # a ring
    ("sink_window", {"sinks": 2, "window": 8}),  # pinned slots and a ring
    ("strided", {"stride": 8}),  # gathered slots of a dense cache
    ("random", {"keys": 4, "seed": 3}),
    ("longformer", {"window": 8, "global_tokens": [0, 5, 70]}),  # a global query among the generated
]
IDS = [name for name, _ in PATTERNS]


def _inputs(context, tokens, heads, kv_heads, b=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = context + tokens
    k = torch.randn(b, kv_heads, n, d, generator=g)
    v = torch.randn(b, kv_heads, n, d, generator=g)
    q = torch.randn(b, heads, tokens, d, generator=g)
    return q, k, v


def _full_reference(pattern, context, q, k, v):
    """Independent of the decoder and of its streamed reference: SDPA of the generated queries
    under the full (n, n) mask, each KV head repeated for the query heads of its group."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = pattern.mask(k.shape[2], causal=True)[context:]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("name, params", PATTERNS, ids=IDS)
@pytest.mark.parametrize("backend", EAGER)
def test_every_backend_decodes_every_token_as_full_attention(backend, name, params, heads, kv_heads):
    pattern = make_pattern(name, params)
    context, tokens = 64, 21  # every ring wraps
    q, k, v = _inputs(context, tokens, heads, kv_heads)
    dec = Decoder(pattern, context, q, TensorKV(k, v, chunk=16), backend)
    assert dec.backend == backend and dec.cache.k.shape[1] == kv_heads  # the cache holds the KV heads only
    for i in range(tokens):
        dec.step(i)
    ref = _full_reference(pattern, context, q, k, v)
    torch.testing.assert_close(dec.out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 1)])
def test_the_streamed_reference_repeats_each_kv_head_for_its_group(heads, kv_heads):
    pattern = make_pattern("sink_window", {"sinks": 2, "window": 8})
    q, k, v = _inputs(40, 7, heads, kv_heads)
    rows = torch.arange(40, 47)
    got = reference_rows(
        q, TensorKV(k, v, chunk=16), lambda a, b: pattern.allowed(rows[:, None], torch.arange(a, b)[None], 47, True)
    )
    torch.testing.assert_close(got, _full_reference(pattern, 40, q, k, v), atol=1e-5, rtol=1e-5)


def test_gqa_cache_bytes_count_the_kv_heads():
    """32 query heads over 8 KV heads: the cache, its analytic bytes and the prefill's source hold
    8 heads, a quarter of the same decoder without GQA."""
    sw = make_pattern("sliding_window", {"window": 32})
    kw = dict(tokens=4, heads=32, head_dim=16, warmup=1, warmup_s=0.0, min_time_s=0.0)
    gqa = measure_decode(sw, 96, kv_heads=8, **kw)
    mha = measure_decode(sw, 96, **kw)
    assert gqa["kv_cache_bytes"] == gqa["cache_bytes_measured"] == 2 * 8 * 16 * 4 * 32
    assert mha["kv_cache_bytes"] == 4 * gqa["kv_cache_bytes"]
    assert gqa["max_abs_err"] < 1e-5 and mha["max_abs_err"] < 1e-5
    with pytest.raises(Exception, match="kv_heads must divide heads"):
        measure_decode(sw, 96, kv_heads=5, **kw)


@pytest.mark.parametrize("backend", EAGER)
def test_a_timed_step_records_its_backend_and_first_call(backend):
    rec = measure_decode(
        make_pattern("strided", {"stride": 8}), 64, tokens=3, heads=4, kv_heads=2, head_dim=16, warmup=1,
        warmup_s=0.0, min_time_s=0.0, backend=backend,
    )  # fmt: skip
    assert rec["max_abs_err"] < 1e-5 and rec["compile_s"] == 0.0 and rec["first_call_s"] > 0
    assert len(rec["times_s"]) == 3


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="FlexAttention on CPU compiles C++")
def test_flex_decodes_with_a_block_mask_over_the_cache_compiled_once():
    """One compilation per case (a fixed cache size), counted as compile_s and never in a step;
    the cache spans full, partial and short blocks of 128 slots, with 2 query heads per KV head."""
    rec = measure_decode(
        make_pattern("dense"), 250, tokens=12, heads=4, kv_heads=2, head_dim=16, warmup=1, warmup_s=0.0,
        min_time_s=0.0, backend="flex",
    )  # fmt: skip
    assert rec["max_abs_err"] < 1e-5
    assert rec["compile_s"] > 0 and rec["first_call_s"] > 10 * rec["time_median_s"]
    assert max(rec["times_s"]) < rec["first_call_s"]  # no step recompiled


def test_a_backend_that_cannot_decode_says_why():
    cpu = torch.device("cpu")
    assert decode_steps.unsupported("flex", cpu, torch.float16) == "FlexAttention on CPU does not support fp16"
    assert "has no decode step" in decode_steps.unsupported("my_plugin", cpu, torch.float32)
    for b in EAGER:
        assert decode_steps.unsupported(b, cpu, torch.float32) is None


DECODE_RUN = """\
name: decode-backends
seq_lens: [48, 96]
patterns:
  - name: sliding_window
    params: {window: 16}
backends: [block_sparse, naive]
mode: decode
heads: 2
head_dim: 16
warmup: 0
tile: 16
decode_tokens: 3
"""


def test_a_decode_scenario_runs_the_backends_it_names(tmp_path):
    """Every pattern on every named backend (dense on sdpa added as the baseline), records named by
    the backend that ran, not "kv_cache"."""
    plan = sc_mod.expand(sc_mod.parse(DECODE_RUN, "d.yaml"), "d.yaml")
    pairs = {(c.pattern_label, c.backend) for c in plan.cases}
    assert pairs == {("dense", "sdpa")} | {
        (lab, b) for lab in ("dense", "sliding_window(window=16)") for b in ("block_sparse", "naive")
    }
    runner.run(plan, tmp_path / "run", scenario_text=DECODE_RUN, isolate=False)
    recs = results.read_records(tmp_path / "run")
    assert {(r["pattern_label"], r["backend"]) for r in recs} == pairs and len(recs) == len(plan.cases)
    for r in recs:
        assert r["status"] == "ok", r["reason"]
        assert r["max_abs_err"] < 1e-5 and r["mode"] == "decode"


def test_a_decode_case_its_backend_cannot_run_is_skipped_with_the_reason():
    text = DECODE_RUN.replace("backends: [block_sparse, naive]", "backends: [flex]") + "dtypes: [fp16]\n"
    plan = sc_mod.expand(sc_mod.parse(text, "d.yaml"), "d.yaml")
    flex = [c for c in plan.cases if c.backend == "flex"]
    assert flex and all(
        runner._precheck(c, {}) == "FlexAttention on CPU does not support fp16" for c in flex
    )  # the runner records it as skipped with this reason, before any worker runs it


def _decode_records(backends=("sdpa", "block_sparse")):
    out = []
    for n in (4096, 8192, 16384):
        for b in backends:
            for pattern, params, t in (("dense", {}, 6e-8 * n), ("sliding_window", {"window": 4096}, 3e-4)):
                r = record(
                    pattern, b, n, t * (1.0 if b == "sdpa" else 0.8), params=params, mem=1e7, mode="decode",
                    block=None, nnz=None, density=None, flops=None, tflops=None, decode_tokens=16,
                )  # fmt: skip
                r["case_id"] += "-decode"
                out.append(r)
    return out


def test_the_latency_figure_draws_one_line_per_pattern_and_backend(tmp_path):
    df = load_frame(write_result(tmp_path / "r", _decode_records()))
    fig = plots.fig_per_token_latency_vs_context(df, analyze(df))
    lines = {ln.get_gid().split(":", 1)[1]: ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    lines = {k: v for k, v in lines.items() if "·" in k}
    sw = "sliding_window(window=4096)"
    assert set(lines) == {f"{p} · {b}" for p in ("dense", sw) for b in ("sdpa", "block_sparse")}
    # two backends of one pattern are told apart (colour = backend), dense on sdpa thick black
    assert lines[f"{sw} · sdpa"].get_color() != lines[f"{sw} · block_sparse"].get_color()
    assert lines["dense · sdpa"].get_color() == "#000000" and lines["dense · sdpa"].get_linewidth() >= 2.5
    assert "time per generated token" in fig.get_suptitle()
    assert "per generated token" in fig.axes[0].get_ylabel()


def test_the_decode_table_gives_the_time_per_generated_token(tmp_path):
    df = load_frame(write_result(tmp_path / "r", _decode_records()))
    [t] = [t for t in tables(analyze(df), df=df) if t.title == DECODE_TITLE]
    assert t.columns[:4] == ("series", "context n", "per token", "vs dense · sdpa")
    rows = {r[0]: r for r in t.rows}
    assert len(rows) == 4 and rows["dense · block_sparse"][1] == "16384"
    assert rows["dense · block_sparse"][3] == "1.25x"  # 0.8x the dense sdpa decoder's time per token
    assert "each generated token is one step on the named backend" in t.note
    scaling = tables(analyze(df), df=df)[0]
    assert "Decode series: the time is per generated token" in scaling.note


def test_an_old_run_with_its_own_kv_cache_decoder_still_loads_and_plots(tmp_path):
    df = load_frame(write_result(tmp_path / "old", _decode_records(backends=("kv_cache",))))
    fig = plots.fig_per_token_latency_vs_context(df, analyze(df))
    names = {ln.get_gid().split(":", 1)[1] for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    assert {"dense", "sliding_window(window=4096)"} <= names  # named by pattern, as that run's one decoder
    [t] = [t for t in tables(analyze(df), df=df) if t.title == DECODE_TITLE]
    assert all("(one decoder of its own)" in r[0] for r in t.rows)


def test_seeded_source_draws_kv_heads_only():
    src = SeededKV(1, 2, 4, torch.float32, torch.device("cpu"), seed=0, positions=20, chunk=8)
    dec = Decoder(make_pattern("dense"), 16, torch.randn(1, 6, 4, 4), src, "naive")
    assert dec.cache.k.shape == (1, 2, 20, 4)
    for i in range(4):
        dec.step(i)
    torch.testing.assert_close(dec.out, dec.reference(), atol=1e-5, rtol=1e-5)
