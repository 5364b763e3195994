"""Scaling fits, crossover, speedup/efficiency and failure reporting on synthetic records."""

from __future__ import annotations

import pytest
from report_fixtures import (
    SIZES,
    approx_crossover,
    dense_time,
    make_records,
    nnz_dense,
    nnz_window,
    record,
    write_result,
)

from sparsebench.analysis.scaling import analyze, find_crossover
from sparsebench.render.analysis import crossover_text, drift_note, renderables, tables, to_markdown
from sparsebench.results.folder import frame, load_frame
from sparsebench.units import format_time

SW = "sliding_window(window=256)"


@pytest.fixture(scope="module")
def analysis():
    return analyze(frame(make_records()))


def test_exponents_dense_about_two_sparse_about_one(analysis):
    dense = analysis.find("dense", "sdpa")
    sparse = analysis.find(SW, "block_sparse")
    assert dense.is_baseline and not sparse.is_baseline
    assert dense.time_fit.exponent == pytest.approx(2.0, abs=0.1)
    assert sparse.time_fit.exponent == pytest.approx(1.0, abs=0.1)
    for fit in (dense.time_fit, sparse.time_fit):
        assert fit.ci_low < fit.exponent < fit.ci_high
        assert fit.ci_high - fit.ci_low < 0.3
    # the masked-dense "sparse" series is really quadratic
    assert analysis.find(SW, "sdpa_masked").time_fit.exponent == pytest.approx(2.0, abs=0.1)


def test_memory_exponents(analysis):
    assert analysis.find("dense", "naive").mem_fit.exponent == pytest.approx(2.0, abs=0.2)
    assert analysis.find(SW, "block_sparse").mem_fit.exponent == pytest.approx(1.0, abs=0.15)


def test_crossover_interpolated_and_absent(analysis):
    cross = analysis.find(SW, "block_sparse").crossover
    assert cross.n is not None and not cross.below_range
    assert 512 < cross.n < 1024
    assert cross.n == pytest.approx(approx_crossover(), rel=0.25)
    assert crossover_text(cross).startswith("~")
    never = analysis.find(SW, "sdpa_masked").crossover
    assert never.n is None and crossover_text(never) == "not within the measured range"
    # dense series are not sparse: no crossover
    assert analysis.find("dense", "naive").crossover is None


def test_crossover_below_range():
    recs = [record("dense", "sdpa", n, dense_time(n)) for n in SIZES]
    recs += [record("sliding_window", "block_sparse", n, 1e-7 * n, params={"window": 256}) for n in SIZES]
    s = analyze(frame(recs)).find(SW, "block_sparse")
    assert s.crossover.below_range and s.crossover.n == 256
    assert "faster at every measured n" in crossover_text(s.crossover)
    df = frame(recs)
    assert find_crossover(df[df.backend == "block_sparse"], None).compared == 0


def test_speedup_ideal_efficiency_at_largest_n(analysis):
    s = analysis.find(SW, "block_sparse")
    n = max(SIZES)
    assert s.largest_n == n
    expected = dense_time(n) / (3e-5 + 1e-6 * n)
    assert s.speedup == pytest.approx(expected, rel=1e-6)
    assert s.ideal_speedup == pytest.approx(nnz_dense(n) / nnz_window(n), rel=1e-9)
    assert s.efficiency == pytest.approx(expected / s.ideal_speedup, rel=1e-6)
    assert s.best_speedup == pytest.approx(expected, rel=1e-6) and s.best_speedup_n == n


def test_longest_n_before_oom_and_compile_time(analysis):
    naive = analysis.find("dense", "naive")
    assert naive.failure.status == "oom" and naive.failure.seq_len == 8192
    assert naive.max_ok_n == 4096
    assert analysis.find("dense", "sdpa").failure is None
    assert analysis.find("dense", "sdpa").max_ok_n == 8192
    assert analysis.find(SW, "flex").compile_s == pytest.approx(4.0)


def test_first_call_table_separates_setup_first_call_and_steady_state():
    """At each series' largest ok n: setup, the first call and the steady median side by side, the
    first call's extra time as their difference; in summary.md, not in the compact terminal view."""
    recs = make_records()
    for r in recs:
        if r["backend"] == "flex":
            r["first_call_s"] = r["time_median_s"] + 4.0
            r["setup_s"] = 0.25 if r["seq_len"] == max(SIZES) else 0.01
    a = analyze(frame(recs))
    f = a.find(SW, "flex").first_call
    n = max(SIZES)
    steady = 1e-5 + 8e-7 * n
    assert f.seq_len == n and f.setup_s == pytest.approx(0.25)
    assert f.steady_s == pytest.approx(steady) and f.extra_s == pytest.approx(4.0)
    # an oom at the largest n: the last size that ran, and no first-call figure without a record of it
    naive = a.find("dense", "naive").first_call
    assert naive.seq_len == 4096 and naive.first_call_s is None and naive.extra_s is None
    (table,) = [t for t in tables(a) if t.title == "First call"]
    row = next(r for r in table.rows if r[0].startswith(SW) and "flex" in r[0])
    assert row[1:] == (str(n), format_time(0.25), format_time(steady + 4.0), format_time(steady), format_time(4.0), "-")
    assert "## First call" in to_markdown(a)
    # a first call faster than the steady median (noise) shows as a negative difference, not 0
    for r in recs:
        if r["backend"] == "flex" and r["seq_len"] == n:
            r["first_call_s"] = r["time_median_s"] - 0.002
    f = analyze(frame(recs)).find(SW, "flex").first_call
    assert f.extra_s == pytest.approx(-0.002) and format_time(f.extra_s) == "-2 ms"
    # where the largest first-call cost fell on a smaller n (a compile cache filled there), it is named
    smallest = min(SIZES)
    for r in recs:
        if r["backend"] == "flex" and r["seq_len"] == smallest:
            r["first_call_s"] = r["time_median_s"] + 9.0
    a = analyze(frame(recs))
    f = a.find(SW, "flex").first_call
    assert f.worst_n == smallest and f.worst_extra_s == pytest.approx(9.0)
    (table,) = [t for t in tables(a) if t.title == "First call"]
    row = next(r for r in table.rows if r[0].startswith(SW) and "flex" in r[0])
    assert row[-1] == f"{format_time(9.0)} at {smallest}"
    assert all(t.title != "First call" for t in tables(a, compact=True))


def test_wrong_results_are_flagged():
    recs = make_records()
    for r in recs:
        if r["backend"] == "flex" and r["seq_len"] == 1024:
            r["status"], r["reason"] = "wrong", "max abs err 0.3 > 1e-3"
    s = analyze(frame(recs)).find(SW, "flex")
    assert s.wrong_sizes == (1024,) and s.failure is None
    assert 1024 not in s.time_fit.sizes
    assert "wrong result at 1024" in to_markdown(analyze(frame(recs)))


def test_markdown_and_rich(analysis):
    md = to_markdown(analysis)
    assert "## Scaling" in md and "## Against the dense baseline" in md
    assert "oom at 8192" in md
    assert "not within the measured range" in md
    assert "dense · sdpa (baseline)" in md
    assert md.count("\n| ") >= 2 * 5

    from rich.console import Console

    tables = renderables(analysis)
    assert len(tables) == 2
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    for t in tables:
        console.print(t)
    text = console.export_text()
    assert "block_sparse" in text and "crossover" in text


def test_single_size_and_empty():
    recs = make_records(sizes=(1024,))
    a = analyze(frame(recs))
    s = a.find("dense", "sdpa")
    assert s.time_fit is None and s.sizes == (1024,)
    assert "one size, no fit" in to_markdown(a)
    empty = analyze(frame([]))
    assert empty.series == () and "no successful" in to_markdown(empty)


def test_from_a_result_folder(tmp_path):
    folder = write_result(tmp_path / "run", make_records())
    df = load_frame(folder)
    a = analyze(df)
    assert len(a.series) == 5
    assert a.series[0].is_baseline  # baseline listed first


def test_labels_name_varying_dims():
    recs = make_records()
    recs += [dict(r, mode="backward") for r in make_records(scale=2.0)]
    a = analyze(frame(recs))
    labels = {s.label for s in a.series}
    assert "dense · sdpa, forward" in labels and "dense · sdpa, backward" in labels
    back = a.find("dense", "sdpa", mode="backward")
    assert back.time_fit.exponent == pytest.approx(2.0, abs=0.1)


def test_crossover_ignores_a_faster_then_slower_blip():
    import pandas as pd

    from sparsebench.analysis.scaling import find_crossover

    base = pd.DataFrame(
        {"seq_len": [512, 1024, 2048, 4096], "time_median_s": [1.0, 2.0, 4.0, 8.0], "status": ["ok"] * 4}
    )
    blip = pd.DataFrame({"seq_len": [512, 1024, 2048, 4096], "time_median_s": [0.8, 3.0, 5.0, 10.0]})
    assert find_crossover(blip, base).n is None  # faster only at 512: never pays within range
    late = pd.DataFrame({"seq_len": [512, 1024, 2048, 4096], "time_median_s": [0.8, 3.0, 2.0, 1.0]})
    c = find_crossover(late, base)
    assert not c.below_range and 1024 < c.n < 2048


def test_machine_speed_drift_is_reported():
    recs = make_records()
    assert drift_note(analyze(frame(recs))) is None  # no probes recorded: nothing said
    for i, r in enumerate(recs):
        r["probe_s"] = 0.001 * (1.0 + 0.05 * (i % 2))
    steady = analyze(frame(recs))
    assert steady.probe == pytest.approx((0.001, 0.00105))
    assert drift_note(steady).startswith("Machine speed was steady")
    recs[3]["probe_s"] = 0.0016
    drift = analyze(frame(recs))
    assert "varied during the run" in drift_note(drift) and "(1.60x)" in drift_note(drift)
    assert "## Machine speed" in to_markdown(drift)
    # probes of two devices are different workloads: each device's spread on its own
    for i, r in enumerate(recs):
        r["probe_s"] = 0.001 if i % 2 else 0.003
        r["device"] = "cpu" if i % 2 else "cuda"
    assert drift_note(analyze(frame(recs))).startswith("Machine speed was steady")


def test_compact_tables_leave_out_columns_and_their_explanations(analysis):
    full, compact = tables(analysis), tables(analysis, compact=True)
    assert [t.title for t in compact] == [t.title for t in full if t.title != "First call"]
    for f, c in zip(full, compact):
        assert "fit range" not in c.columns and "best" not in c.columns
        assert len(c.wrap) <= len(f.wrap) and all(i < len(c.columns) for i in c.wrap)
        assert all(len(r) == len(c.columns) for r in c.rows)
    assert "over the fit range" in full[0].note and "over the fit range" not in compact[0].note
    assert "best: the highest speedup" in full[1].note and "best:" not in compact[1].note
    never = full[1].columns.index("crossover n")
    assert "not within the measured range" in {r[never] for r in full[1].rows}
    assert "not in range" in {r[compact[1].columns.index("crossover n")] for r in compact[1].rows}


def test_a_series_above_its_ideal_is_explained_in_the_baseline_table():
    from report_fixtures import above_ideal_records

    from sparsebench.render.analysis import BASELINE_TITLE

    a = analyze(frame(above_ideal_records()))
    s = a.find(SW, "block_sparse")
    assert s.efficiency == pytest.approx(2.5, rel=0.02) and s.above_ideal
    assert s.peak_efficiency_n == 8192 and s.peak_efficiency == pytest.approx(s.efficiency)
    assert s.dense_path_speedup == pytest.approx(2.5) and s.own_dense_efficiency == pytest.approx(1.0, rel=0.02)
    assert not a.find("dense", "block_sparse").above_ideal  # the dense path is the reason, not a case of it
    for compact in (False, True):
        note = next(t for t in tables(a, compact=compact) if t.title == BASELINE_TITLE).note
        assert note.startswith(
            f"Above the ideal speedup (efficiency over 100%): {SW} · block_sparse 251% of its ideal at 8192 "
            "(100% against dense · block_sparse)."
        )
        assert "slower per pair than block_sparse's own dense path" in note
        assert "dense · block_sparse is 2.50x as fast as dense · sdpa at 8192." in note
        assert "dense · block_sparse 250%" not in note
    # without the dense path measured, the table says what is missing
    a = analyze(frame(above_ideal_records(dense_path=False)))
    note = next(t for t in tables(a) if t.title == BASELINE_TITLE).note
    assert f"{SW} · block_sparse 251% of its ideal at 8192." in note and "did not run dense · block_sparse" in note
    # nothing above its ideal: nothing said
    assert "Above the ideal" not in to_markdown(analyze(frame(make_records())))


def test_above_the_ideal_at_a_smaller_n_only_is_said_too():
    """As in the quickstart on a loaded machine: above the ideal at 512, below it at the largest n."""
    from report_fixtures import above_ideal_records

    recs = above_ideal_records()
    for r in recs:
        if r["pattern"] == "sliding_window" and r["seq_len"] > 512:
            r["time_median_s"] *= 4  # 63% of the ideal from 1024 on
    a = analyze(frame(recs))
    s = a.find(SW, "block_sparse")
    assert s.efficiency < 1 and s.above_ideal and s.peak_efficiency_n == 512
    md = to_markdown(a)
    assert f"{SW} · block_sparse {s.peak_efficiency:.0%} of its ideal at 512" in md
    assert "dense · block_sparse is 2.50x as fast as dense · sdpa at 512." in md


def test_a_decode_only_run_has_no_baseline_table_that_says_no_common_sizes():
    # a decoder has no dense sdpa call to be set against: its series are left out of the
    # baseline table (which then is not printed), not listed as "no common sizes"
    import pandas as pd

    from sparsebench.analysis.scaling import analyze
    from sparsebench.render.analysis import BASELINE_TITLE, tables

    rows = []
    for pattern, grow in (("dense", 1.0), ("sliding_window", 0.0)):
        for n in (4096, 8192, 16384):
            rows.append(
                dict(
                    pattern=pattern, pattern_label=pattern, backend="kv_cache", device="cpu", dtype="fp32",
                    mode="decode", batch=1, heads=8, head_dim=64, seq_len=n, causal=True, status="ok",
                    time_median_s=1e-3 * (n / 4096) ** grow, peak_mem_bytes=2**20 * (n / 4096) ** grow,
                    nnz=None, round=1,
                )
            )  # fmt: skip
    df = pd.DataFrame(rows)
    titles = [t.title for t in tables(analyze(df), df=df)]
    assert "Scaling" in titles and BASELINE_TITLE not in titles


def test_kv_heads_is_named_in_labels_not_a_bare_number():
    from sparsebench.analysis.scaling import dim_text

    assert dim_text("kv_heads", 8) == "KV=8" and dim_text("heads", 32) == "H=32"
