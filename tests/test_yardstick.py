"""The yardstick (sparsebench/measure/yardstick.py): the machine's own GEMM rate and copy bandwidth,
measured once per run per device and dtype where the cases run, kept in environment.json and on every
record, with each case's share of it (gemm_fraction, bandwidth_fraction), recomputed when rounds merge,
and shown in the tables."""

from __future__ import annotations

import inspect
import json
import math

import pandas as pd
import pytest
import torch

from sparsebench import scenario as sc_mod
from sparsebench.analysis.scaling import analyze
from sparsebench.measure import runner, yardstick
from sparsebench.measure.decode import measure_decode
from sparsebench.measure.worker import Worker
from sparsebench.render import summary
from sparsebench.render.analysis import BASELINE_TITLE, tables, yardstick_text
from sparsebench.results import folder as results

TINY = """\
name: tiny-yardstick
seq_lens: [64]
patterns:
  - name: dense
  - name: sliding_window
    params: {window: 16}
backends: [sdpa, naive]
mode: [forward, decode]
heads: 2
head_dim: 16
warmup: 0
repeats: 2
rounds: 2
decode_tokens: 2
check: {exact_max_elems: 0, sample_rows: 4}
"""
KEY = "cpu/fp32"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run in this process (forward and decode, two rounds), its reports written."""
    out = tmp_path_factory.mktemp("yardstick") / "run"
    plan = sc_mod.expand(sc_mod.parse(TINY, "tiny.yaml"), "tiny.yaml")
    runner.run(
        plan, out, scenario_text=TINY, isolate=False, finalize=lambda f, recs: summary.finalize(f, recs, plots=False)
    )
    return out


def _env(folder) -> dict:
    return json.loads((folder / results.ENVIRONMENT).read_text())


def test_the_measurement_gives_positive_finite_rates_and_leaves_the_random_state():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    y = yardstick.measure("cpu", "fp32")
    for name in ("gemm_tflops", "copy_bytes_per_s"):
        assert math.isfinite(y[name]) and y[name] > 0, (name, y[name])
    assert torch.equal(torch.get_rng_state(), state)  # no draw from the global generator
    assert torch.get_num_threads() == threads  # the copy's own thread count was put back
    assert y["gemm_threads"] == threads  # the GEMM ran on the threads the cases run with
    # the copy on the threads the decode steps run with: measure_decode's own default
    default = inspect.signature(measure_decode).parameters["threads"].default
    assert y["copy_threads"] == yardstick.decode_threads() == default


def test_the_gemm_size_doubles_until_a_product_takes_long_enough(monkeypatch):
    monkeypatch.setattr(yardstick, "STEP_S_OTHER", 0.0)  # the first product is already long enough
    assert yardstick.gemm("cpu", "fp32", rounds=1)[1] == yardstick.MIN_SIZE
    monkeypatch.setattr(yardstick, "STEP_S_OTHER", float("inf"))  # never long enough: up to the largest size
    monkeypatch.setattr(yardstick, "MAX_SIZE_OTHER", 2 * yardstick.MIN_SIZE)
    assert yardstick.gemm("cpu", "fp32", rounds=1)[1] == 2 * yardstick.MIN_SIZE


def test_a_slow_first_product_does_not_stop_the_ladder(monkeypatch):
    """Each size's first product carries one-off costs (on an H200 the first bf16 product took
    over 2 ms at size 256, which stopped the ladder there and read 1.07 TFLOP/s; 688 at 8192): it is
    an untimed warm-up, and the product after it decides."""
    import time

    real, seen = torch.matmul, set()

    def first_slow(a, b, out=None):
        if a.shape not in seen:
            seen.add(a.shape)
            time.sleep(0.2)
        return real(a, b, out=out)

    monkeypatch.setattr(yardstick.torch, "matmul", first_slow)
    monkeypatch.setattr(yardstick, "STEP_S_OTHER", 0.1)  # a real fp32 product of 512 takes ~1-10 ms here
    monkeypatch.setattr(yardstick, "MAX_SIZE_OTHER", 2 * yardstick.MIN_SIZE)
    tflops, size = yardstick.gemm("cpu", "fp32", rounds=1)
    assert size == 2 * yardstick.MIN_SIZE
    assert 2 * size**3 / (tflops * 1e12) < 0.1  # the timed product is not the slow first one


def test_a_run_keeps_the_yardstick_and_every_record_its_share(run):
    y = _env(run)["yardstick"][KEY]
    assert y["gemm_tflops"] > 0 and y["copy_bytes_per_s"] > 0
    recs = results.read_records(run)
    assert {r["mode"] for r in recs} == {"forward", "decode"} and {r["status"] for r in recs} == {"ok"}
    for r in recs:  # every record is self-describing: the run's figures of its device and dtype
        assert (r["gemm_tflops"], r["copy_bytes_per_s"]) == (y["gemm_tflops"], y["copy_bytes_per_s"])
        if r["mode"] == "decode":
            assert r["gemm_fraction"] is None and r["tflops"] is None
            assert r["bandwidth_fraction"] == pytest.approx(
                r["kv_cache_bytes"] / r["time_median_s"] / r["copy_bytes_per_s"], rel=1e-12
            )
            assert r["decode_threads"] == y["copy_threads"]  # the copy ran as the steps did
        else:
            assert r["bandwidth_fraction"] is None
            assert r["gemm_fraction"] == pytest.approx(r["tflops"] / r["gemm_tflops"], rel=1e-12)


def test_merged_rounds_recompute_the_fractions(run):
    base = dict(case_id="c", status="ok", flops=4e9, kv_cache_bytes=2**20, times_s=[1.0], time_iqr_s=0.0)
    fwd = [
        dict(base, mode="forward", round=i, time_median_s=t, time_min_s=t, gemm_tflops=g, copy_bytes_per_s=b)
        for i, (t, g, b) in enumerate([(1.0, 0.1, 1e10), (3.0, 0.2, 2e10), (2.0, 0.4, 3e10)], 1)
    ]
    for r in fwd:
        r.update(results.fractions(dict(r, tflops=results.tflops(r))))
    [m] = results.merge_rounds(fwd)
    assert m["time_median_s"] == 2.0 and m["tflops"] == pytest.approx(4e9 / 2.0 / 1e12)
    assert m["gemm_tflops"] == 0.2  # the rounds' median (a resumed round measured its own)
    assert m["gemm_fraction"] == pytest.approx(m["tflops"] / 0.2) and m["bandwidth_fraction"] is None
    assert m["gemm_fraction"] != fwd[0]["gemm_fraction"]  # not round 1's, carried over
    [d] = results.merge_rounds([dict(r, mode="decode", flops=None) for r in fwd])
    assert d["gemm_fraction"] is None and d["bandwidth_fraction"] == pytest.approx(2**20 / 2.0 / 2e10)
    # and in a real run: results.csv's merged rows carry the merged time's fraction
    csv = pd.read_csv(run / "results.csv")
    fw = csv[csv["mode"] == "forward"]
    assert fw["rounds"].eq(2).all()
    assert (fw["gemm_fraction"] - fw["tflops"] / fw["gemm_tflops"]).abs().max() < 1e-9 * fw["gemm_fraction"].max()
    dec = csv[csv["mode"] == "decode"]
    expect = dec["kv_cache_bytes"] / dec["time_median_s"] / dec["copy_bytes_per_s"]
    assert ((dec["bandwidth_fraction"] - expect).abs() <= 1e-9 * expect).all()


def test_the_tables_show_the_yardstick(run):
    df = results.load_frame(run)
    a = analyze(df)
    [base] = [t for t in tables(a, df=df) if t.title == BASELINE_TITLE]
    assert "yardstick" in base.columns
    assert base.columns.index("yardstick") == base.columns.index("efficiency") + 1  # beside it
    cells = {row[0]: row[base.columns.index("yardstick")] for row in base.rows}
    naive = df[(df["pattern"] == "dense") & (df["backend"] == "naive") & (df["mode"] == "forward")].iloc[0]
    assert cells["dense · naive, forward"] == yardstick_text(naive["gemm_fraction"], None)
    assert cells["dense · naive, forward"].startswith("GEMM ")
    # a decoder is not set against dense sdpa (it has no such call): no decode row here; its copy
    # share is in the results table (below)
    assert not any(name.endswith(", decode") for name in cells)
    assert "The baseline itself: " in base.note and "dense · sdpa, forward GEMM " in base.note
    assert "exceed 100%" in base.note
    # a frame from before the yardstick (no fraction anywhere): the table as it was
    old = df.drop(columns=["gemm_fraction", "bandwidth_fraction"])
    [plain] = [t for t in tables(a, df=old) if t.title == BASELINE_TITLE]
    assert "yardstick" not in plain.columns and "yardstick" not in plain.note
    # the reports: summary.md's results and baseline tables, report.html's results table
    md = (run / "summary.md").read_text()
    assert "| yardstick |" in md and f"| {cells['dense · naive, forward']} |" in md
    assert "| copy " in md.split("## Against the dense baseline", 1)[0]  # the decode rows' share
    assert "- yardstick (this machine's own torch rates): cpu/fp32 GEMM " in md
    assert "exceed 100%" in md.split("## Against the dense baseline", 1)[1]
    html = (run / "report.html").read_text()
    assert "<th>of GEMM</th>" in html and "<th>of copy bw</th>" in html


def test_yardstick_text_keeps_small_shares_readable():
    assert yardstick_text(0.71, None) == "GEMM 71%" and yardstick_text(2.13, None) == "GEMM 213%"
    assert yardstick_text(0.0042, None) == "GEMM 0.42%" and yardstick_text(None, 0.071) == "copy 7.1%"
    assert yardstick_text(float("nan"), None) == "-" and yardstick_text(None, None) == "-"


def test_a_failed_yardstick_is_a_warning_and_a_resumed_run_keeps_the_first(tmp_path):
    (tmp_path / results.ENVIRONMENT).write_text(json.dumps({"yardstick": {KEY: {"gemm_tflops": 1.0}}}))

    class Stub:
        def yardstick(self, device, dtype, timeout):
            if dtype == "fp16":
                return {"status": "timeout", "reason": "no result within the 120 s yardstick limit; worker killed"}
            return {"gemm_tflops": 2.0, "copy_bytes_per_s": 3e10}

    warned: list[str] = []
    pairs = [("cpu", "fp32"), ("cpu", "bf16"), ("cpu", "fp16")]
    got = runner.measure_yardsticks(pairs, Stub(), tmp_path, warned.append)
    assert set(got) == {("cpu", "fp32"), ("cpu", "bf16")}  # the new records carry what was measured now
    assert len(warned) == 1 and "cpu/fp16" in warned[0] and "120 s yardstick limit" in warned[0]
    stored = _env(tmp_path)["yardstick"]
    assert stored[KEY] == {"gemm_tflops": 1.0}  # environment.json keeps the first run's
    assert stored["cpu/bf16"]["gemm_tflops"] == 2.0 and "cpu/fp16" not in stored


def test_the_worker_measures_it_in_its_own_process():
    w = Worker()
    try:
        y = w.yardstick("cpu", "fp32", 120.0)
        assert y["gemm_tflops"] > 0 and y["copy_threads"] == yardstick.decode_threads(), y
        pid = w.pid
        assert w.yardstick("cpu", "fp32", 120.0)["gemm_tflops"] > 0 and w.pid == pid  # the same worker serves on
    finally:
        w.close()
