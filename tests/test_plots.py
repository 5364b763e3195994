"""Figures hold the expected series (read from the matplotlib objects, not from pixels), files
are written, report.html is self-contained, and `sparsebench plot` re-renders a folder."""

from __future__ import annotations

import math
import re

import pytest
import typer
from report_fixtures import SIZES, make_records, record, write_result
from typer.testing import CliRunner

from sparsebench.analysis.scaling import analyze
from sparsebench.cli.report import register
from sparsebench.render import plots
from sparsebench.render.analysis import to_markdown
from sparsebench.render.html import write_report
from sparsebench.results.folder import load_frame
from sparsebench.stats import fit_power

SW = "sliding_window(window=256)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_result(tmp_path_factory.mktemp("run"), make_records())


@pytest.fixture(scope="module")
def df(folder):
    return load_frame(folder)


@pytest.fixture(scope="module")
def analysis(df):
    return analyze(df)


def lines_by_gid(fig, prefix: str) -> dict:
    return {
        ln.get_gid().split(":", 1)[1]: ln
        for ax in fig.axes
        for ln in ax.get_lines()
        if (ln.get_gid() or "").startswith(prefix + ":")
    }


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_time_vs_seqlen(df, analysis):
    fig = plots.fig_time_vs_seqlen(df, analysis)
    lines = lines_by_gid(fig, "time")
    assert set(lines) == {
        "dense · sdpa",
        "dense · naive",
        f"{SW} · block_sparse",
        f"{SW} · flex",
        f"{SW} · sdpa_masked",
    }
    assert list(lines["dense · sdpa"].get_xdata()) == list(SIZES)
    assert list(lines["dense · naive"].get_xdata()) == list(SIZES[:-1])  # OOM at the largest n
    base = lines["dense · sdpa"]
    assert base.get_color() == "#000000" and base.get_linewidth() >= 2.5  # the baseline stands out
    assert max(ln.get_linewidth() for k, ln in lines.items() if k != "dense · sdpa") < base.get_linewidth()
    # the fitted exponent is in each legend entry
    label = base.get_label()
    exp = float(re.search(r"n\^\{([0-9.]+)\}", label).group(1))
    assert exp == pytest.approx(analysis.find("dense", "sdpa").time_fit.exponent, abs=0.005)
    assert "oom at n=8K" in lines["dense · naive"].get_label()
    guides = lines_by_gid(fig, "guide")
    assert set(guides) == {"O(n) guide", "O(n²) guide"}
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "tokens" in ax.get_xlabel() and ax.get_ylabel()
    # legends sit outside the axes (anchored right of it), never over the data
    leg = ax.get_legend()
    assert leg is not None and leg.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
    # readable log ticks: sequence lengths as 256 .. 8K, times with units
    xt = [t.get_text() for t in ax.get_xticklabels()]
    assert "256" in xt and "8K" in xt
    yt = [t.get_text() for t in ax.get_yticklabels()]
    assert any(t.endswith("ms") for t in yt)


def test_memory_vs_seqlen(df, analysis):
    fig = plots.fig_memory_vs_seqlen(df, analysis)
    measured = lines_by_gid(fig, "memory")
    est = lines_by_gid(fig, "estimate")
    assert "dense · naive" in measured and f"{SW} · block_sparse" in measured
    assert set(est) <= set(measured) and "dense · naive" in est
    assert est["dense · naive"].get_linestyle() == "--"
    assert measured[f"{SW} · block_sparse"].get_linestyle() != "--"
    assert any(t.startswith("dashed, no markers: analytic estimate") for t in legend_texts(fig))
    assert not any("(estimate)" in t for t in legend_texts(fig))  # one legend entry per series
    assert "peak memory" in fig.axes[0].get_ylabel()
    assert any(t.get_text().endswith("MiB") for t in fig.axes[0].get_yticklabels())
    # estimates that coincide (one backend, the same figures for two patterns) are drawn once
    drawn = [tuple(map(tuple, ln.get_xydata())) + (ln.get_color(),) for ln in est.values()]
    assert len(drawn) == len(set(drawn))


def test_speedup_vs_seqlen(df, analysis):
    fig = plots.fig_speedup_vs_seqlen(df, analysis)
    sp = lines_by_gid(fig, "speedup")
    assert set(sp) == {"dense · naive", f"{SW} · block_sparse", f"{SW} · flex", f"{SW} · sdpa_masked"}
    bs = sp[f"{SW} · block_sparse"]
    s = analysis.find(SW, "block_sparse")
    assert bs.get_ydata()[-1] == pytest.approx(s.speedup)
    ideal = lines_by_gid(fig, "ideal")
    assert set(ideal) == {SW} and ideal[SW].get_linestyle() == "--"
    assert ideal[SW].get_ydata()[-1] == pytest.approx(s.ideal_speedup)
    one = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "baseline"]
    assert one and set(one[0].get_ydata()) == {1.0}


@pytest.mark.parametrize("lim,ends", [((0.4, 25.0), (0.5, 20.0)), ((0.6, 9.0), (1.0, 5.0)), ((2e-4, 0.9), (3e-4, 0.3))])
def test_log_axis_labels_reach_both_ends(lim, ends):
    """A speedup axis from 0.4x to 25x labels 0.5x and 20x, not only 1x, 3x and 10x: the series
    slower than dense sit on a labelled part of the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.set_ylim(*lim)
    plots._decade_axis(ax.yaxis, ax.get_ylim(), lambda v: f"{v:g}x")
    ticks = [t for t in ax.yaxis.get_majorticklocs() if lim[0] <= t <= lim[1]]
    plt.close(fig)
    assert min(ticks) == pytest.approx(ends[0]) and max(ticks) == pytest.approx(ends[1]), ticks


def test_kv_cache_vs_seqlen(df):
    fig = plots.fig_kv_cache_vs_seqlen(df)
    kv = lines_by_gid(fig, "kv")
    assert set(kv) == {"dense", SW}
    assert len(set(kv[SW].get_ydata())) == 1  # a window keeps a bounded cache
    dense = list(kv["dense"].get_ydata())
    assert dense == sorted(dense) and dense[-1] == 32 * dense[0]
    assert "bounded" in kv[SW].get_label()


def test_masks_gallery(df):
    fig = plots.fig_masks(df)
    drawn = {ax.get_gid() for ax in fig.axes if ax.get_gid()}
    assert drawn == {"mask:dense", f"mask:{SW}"}
    titles = [ax.get_title() for ax in fig.axes if ax.get_gid()]
    assert titles[0].startswith("dense")  # dense first, beside the sparse ones
    assert all("density" in t for t in titles)
    img = [ax for ax in fig.axes if ax.get_gid() == f"mask:{SW}"][0].get_images()[0].get_array()
    n = img.shape[0]
    assert img.shape == (n, n) and img[n - 1, n - 1] and not img[n - 1, 0] and not img[0, n - 1]


def test_speedup_above_the_ideal_is_said_on_the_figure():
    from report_fixtures import above_ideal_records

    from sparsebench.results.folder import frame

    df = frame(above_ideal_records())
    fig = plots.fig_speedup_vs_seqlen(df, analyze(df))
    lines = lines_by_gid(fig, "speedup")
    # the sparse kernel's own dense path is drawn, named as such
    assert "dense · block_sparse" in lines
    assert "block_sparse's own dense path" in lines["dense · block_sparse"].get_label().replace("\n", " ")
    # a ring on each point above the ideal, the legend explaining it
    rings = lines_by_gid(fig, "above_ideal")
    assert set(rings) == {f"{SW} · block_sparse"}
    ideal = dict(zip(*lines_by_gid(fig, "ideal")[SW].get_data()))
    ringed = dict(zip(*rings[f"{SW} · block_sparse"].get_data()))
    assert ringed and all(v > ideal[n] for n, v in ringed.items())
    assert "ring: above its ideal speedup" in legend_texts(fig)
    # and in words, on the figure
    notes = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "above_ideal_note"]
    assert len(notes) == 1
    text = notes[0].replace("\n", " ")
    assert f"{SW} · block_sparse 251% of its ideal at 8192" in text
    assert "slower per pair than block_sparse's own dense path" in text
    # nothing above the ideal: no ring, no note
    plain = plots.fig_speedup_vs_seqlen(frame(make_records()))
    assert not lines_by_gid(plain, "above_ideal")
    assert not [t for ax in plain.axes for t in ax.texts if t.get_gid() == "above_ideal_note"]


def test_styles_are_consistent_across_figures(df, analysis):
    figs = [
        plots.fig_time_vs_seqlen(df, analysis),
        plots.fig_memory_vs_seqlen(df, analysis),
        plots.fig_speedup_vs_seqlen(df, analysis),
    ]
    prefixes = ["time", "memory", "speedup"]
    key = f"{SW} · flex"
    styles = {
        (
            lines_by_gid(f, p)[key].get_color(),
            lines_by_gid(f, p)[key].get_linestyle(),
            lines_by_gid(f, p)[key].get_marker(),
        )
        for f, p in zip(figs, prefixes)
    }
    assert len(styles) == 1
    colour, *_ = styles.pop()
    assert colour == plots.BACKEND_COLOURS["flex"]
    assert colour in plots.OKABE_ITO.values()
    # one colour per backend, one style per pattern
    t = lines_by_gid(figs[0], "time")
    assert t[f"{SW} · flex"].get_linestyle() == t[f"{SW} · block_sparse"].get_linestyle()
    assert t[f"{SW} · flex"].get_color() != t[f"{SW} · block_sparse"].get_color()
    assert t["dense · naive"].get_linestyle() != t[f"{SW} · block_sparse"].get_linestyle()


@pytest.mark.slow
def test_render_all_and_report(tmp_path, df, analysis):
    out = write_result(tmp_path / "r", make_records())
    paths = plots.render_all(out, df, analysis=analysis)
    names = {p.name for p in paths}
    for name in plots.FIGURES:
        assert f"{name}.png" in names and f"{name}.svg" in names
    for p in paths:
        assert p.parent == out / "plots" and p.stat().st_size > 1000
        head = p.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<" in head
    report = write_report(out, df, analysis, paths)
    html = report.read_text()
    assert report.name == "report.html"
    assert html.count("data:image/png;base64,") == len(plots.FIGURES)
    assert 'src="http' not in html and "<link" not in html  # nothing fetched
    assert "Synthetic CPU" in html  # environment.json shown
    assert "Against the dense baseline" in html and "oom" in html


def test_report_states_noisy_cases_and_machine_speed_like_the_summary(tmp_path):
    """report.html, the file people share, keeps summary.md's caveats: "ok (noisy)" on a case
    whose spread is large, and how far the machine's speed moved during the run."""
    recs = make_records()
    for i, r in enumerate(recs):
        r["probe_s"] = 0.010 if i % 2 else 0.021  # a 2.1x drift between cases
    recs[0]["noisy"] = True
    out = write_result(tmp_path / "n", recs)
    frame = load_frame(out)
    html = write_report(out, frame, analyze(frame), []).read_text()
    assert html.count("ok (noisy)") == 1
    assert "Machine speed varied during the run" in html and "(2.10x)" in html and "class=warn" in html
    summary = to_markdown(analyze(frame))
    assert "Machine speed varied during the run" in summary


def test_single_size_and_no_data(tmp_path):
    single = load_frame(write_result(tmp_path / "one", make_records(sizes=(1024,))))
    fig = plots.fig_time_vs_seqlen(single)
    assert "one size: no fit" in lines_by_gid(fig, "time")["dense · sdpa"].get_label()
    assert plots.render_all(tmp_path / "one", single, formats=("png",))
    failed = [record("dense", "sdpa", n, None, status="oom") for n in (256, 512)]
    bad = load_frame(write_result(tmp_path / "bad", failed))
    assert plots.fig_time_vs_seqlen(bad) is None
    assert plots.fig_memory_vs_seqlen(bad) is None
    assert plots.fig_speedup_vs_seqlen(bad) is None
    paths = plots.render_all(tmp_path / "bad", bad, formats=("png",))
    assert {p.stem for p in paths} <= {"kv_cache_vs_seqlen", "masks"}


def test_facets_one_panel_per_mode(tmp_path):
    recs = make_records() + [dict(r, mode="backward") for r in make_records(scale=2.5)]
    fig = plots.fig_time_vs_seqlen(load_frame(write_result(tmp_path / "m", recs)))
    assert len(fig.axes) == 2
    assert "forward" in fig.axes[0].get_title(loc="left") and "backward" in fig.axes[1].get_title(loc="left")


def test_panels_that_differ_by_their_inputs_say_which(tmp_path):
    """A run on random and synthetic inputs draws a row of panels per kind: each names its inputs
    (two panels with the same setup in their titles would be told apart by their footnotes only);
    a run on random inputs alone keeps its titles as they were."""
    recs = make_records() + [dict(r, inputs="synthetic") for r in make_records(scale=1.2)]
    for fig in (plots.fig_time_vs_seqlen, plots.fig_speedup_vs_seqlen, plots.fig_memory_vs_seqlen):
        titles = [ax.get_title(loc="left") for ax in fig(load_frame(write_result(tmp_path / "i", recs))).axes]
        titles = [t for t in titles if t]
        assert len(titles) == 2 and titles[0].startswith("inputs: random") and titles[1].startswith("inputs: synthetic")
    plain = plots.fig_time_vs_seqlen(load_frame(write_result(tmp_path / "r", make_records())))
    assert "inputs" not in plain.axes[0].get_title(loc="left")


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def test_plot_command(tmp_path):
    out = write_result(tmp_path / "r", make_records(sizes=(256, 512, 1024)))
    res = CliRunner().invoke(app(), ["plot", str(out), "--formats", "png"])
    assert res.exit_code == 0, res.output
    assert (out / "plots" / "time_vs_seqlen.png").exists() and (out / "report.html").exists()
    assert not (out / "plots" / "time_vs_seqlen.svg").exists()


def test_plot_command_errors(tmp_path):
    res = CliRunner().invoke(app(), ["plot", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "no such result folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    out = write_result(tmp_path / "r", make_records(sizes=(256, 512)))
    res = CliRunner().invoke(app(), ["plot", str(out), "--formats", "png,gif"])
    assert res.exit_code == 2 and "expected one of: png, svg, pdf" in res.stderr


# ----------------------------------------------------------------------------------------------
# decode runs

DECODE_SIZES = (4096, 8192, 16384, 32768, 65536)
SWD = "sliding_window(window=4096)"
WINDOW_TIMES = (3.4e-4, 3.1e-4, 2.1e-4, 2.3e-4, 2.0e-4)  # flat, with a machine's noise


def decode_records(sizes=DECODE_SIZES, measured_scale: float = 1.0) -> list[dict]:
    """Decode records as the runner writes them: per-token latency, dense ~ n, a window flat;
    cache bytes measured beside the analytic ones."""
    out = []
    for n in sizes:
        flat = WINDOW_TIMES[DECODE_SIZES.index(n)] if n in DECODE_SIZES else 3e-4
        for pattern, params, t in (("dense", {}, 2e-5 + 6e-8 * n), ("sliding_window", {"window": 4096}, flat)):
            r = record(
                pattern,
                "kv_cache",
                n,
                t,
                params=params,
                mem=1e7 + n * 1e3,
                mode="decode",
                block=None,
                nnz=None,
                density=None,
                flops=None,
                tflops=None,
                decode_tokens=16,
            )
            r["cache_bytes_measured"] = int(r["kv_cache_bytes"] * measured_scale)
            r["cache_policy"] = "dense(%d)" % n if pattern == "dense" else "ring(pinned=0, ring=4096)"
            out.append(r)
    return out


@pytest.fixture(scope="module")
def decode_df(tmp_path_factory):
    return load_frame(write_result(tmp_path_factory.mktemp("decode"), decode_records()))


def test_per_token_latency_vs_context(decode_df):
    a = analyze(decode_df)
    fig = plots.fig_per_token_latency_vs_context(decode_df, a)
    lines = lines_by_gid(fig, "latency")
    assert set(lines) == {"dense", SWD}  # one line per pattern, named without the backend
    assert list(lines["dense"].get_xdata()) == list(DECODE_SIZES)
    exps = {k: float(re.search(r"n\^\{(-?[0-9.]+)\}", ln.get_label()).group(1)) for k, ln in lines.items()}
    assert exps["dense"] == pytest.approx(a.find("dense", "kv_cache").time_fit.exponent, abs=0.005)
    # every size is fitted: a flat decode window has no overhead floor, in analyze() and the figure alike
    all_sizes = fit_power(DECODE_SIZES, WINDOW_TIMES, floor_slope=-math.inf)
    assert not a.find(SWD, "kv_cache").time_fit.excluded
    assert a.find(SWD, "kv_cache").time_fit.exponent == pytest.approx(all_sizes.exponent, abs=0.005)
    assert exps[SWD] == pytest.approx(all_sizes.exponent, abs=0.005)
    assert f"[{all_sizes.ci_low:.2f}, {all_sizes.ci_high:.2f}]" in lines[SWD].get_label()
    assert exps["dense"] == pytest.approx(1.0, abs=0.1) and exps[SWD] == pytest.approx(0.0, abs=0.25)
    assert not [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "_floor"]  # no hollow markers
    # dense thick black; the window in its own colour
    assert lines["dense"].get_color() == "#000000" and lines["dense"].get_linewidth() >= 2.5
    assert lines[SWD].get_color() in plots.OKABE_ITO.values() and lines[SWD].get_color() != "#000000"
    assert set(lines_by_gid(fig, "guide")) == {"O(1) guide", "O(n) guide"}
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "context" in ax.get_xlabel() and "per generated token" in ax.get_ylabel()
    assert "decode" in ax.get_title(loc="left")
    assert "time per generated token" in fig.get_suptitle()


def test_decode_records_stay_out_of_time_vs_seqlen(tmp_path, decode_df):
    assert plots.fig_time_vs_seqlen(decode_df) is None  # "time per call" means nothing for a decode step
    assert plots.fig_per_token_latency_vs_context(load_frame(write_result(tmp_path / "f", make_records()))) is None
    mixed = load_frame(write_result(tmp_path / "m", make_records() + decode_records()))
    fig = plots.fig_time_vs_seqlen(mixed)
    assert len(fig.axes) == 1 and "forward" in fig.axes[0].get_title(loc="left")
    assert "dense · kv_cache" not in lines_by_gid(fig, "time")
    assert set(lines_by_gid(plots.fig_per_token_latency_vs_context(mixed), "latency")) == {"dense", SWD}


def test_kv_cache_measured_against_analytic(tmp_path):
    df = load_frame(write_result(tmp_path / "d", decode_records(measured_scale=1.25)))
    fig = plots.fig_kv_cache_vs_seqlen(df)
    measured, analytic = lines_by_gid(fig, "kv_measured"), lines_by_gid(fig, "kv")
    assert set(measured) == set(analytic) == {"dense", SWD}
    for lab in measured:
        m, e = measured[lab], analytic[lab]
        assert list(m.get_xdata()) == list(DECODE_SIZES)
        assert list(m.get_ydata()) == pytest.approx([1.25 * y for y in e.get_ydata()])  # each its own column
        assert m.get_linestyle() == "-" and m.get_marker() not in (None, "None", "")
        assert e.get_linestyle() == "--"
        assert m.get_markerfacecolor() == e.get_color()  # one colour per pattern
    assert len(set(analytic[SWD].get_ydata())) == 1 and "bounded: 4096 tokens" in measured[SWD].get_label()
    assert "ring(pinned=0, ring=4096)" in measured[SWD].get_label()
    dense = list(measured["dense"].get_ydata())
    assert dense == sorted(dense) and dense[-1] == pytest.approx(16 * dense[0])
    texts = legend_texts(fig)
    assert any(t.startswith("dashed: analytic") for t in texts) and any("measured" in t for t in texts)
    assert not any("(analytic)" in t for t in texts)  # one legend entry per pattern
    assert "measured and analytic" in fig.get_suptitle()


@pytest.mark.slow
def test_render_all_decode_run(tmp_path, decode_df):
    out = write_result(tmp_path / "r", decode_records())
    (out / "plots").mkdir()
    (out / "plots" / "time_vs_seqlen.png").write_bytes(b"stale")  # from an older render
    (out / "plots" / "notes.txt").write_text("mine")
    paths = plots.render_all(out, decode_df, formats=("png",))
    names = {p.stem for p in paths}
    assert "per_token_latency_vs_context" in names and "kv_cache_vs_seqlen" in names
    assert "time_vs_seqlen" not in names and "speedup_vs_seqlen" not in names
    assert not (out / "plots" / "time_vs_seqlen.png").exists()  # a figure not drawn leaves no stale file
    assert (out / "plots" / "notes.txt").exists()
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert set(plots.DECODE_FIGURES) <= set(plots.FIGURE_FUNCTIONS)


def test_kv_cache_panel_keeps_patterns_without_a_measurement(tmp_path):
    recs = make_records() + decode_records()
    failed = [
        dict(r, status="error", time_median_s=None, cache_bytes_measured=None)
        for r in decode_records(sizes=(4096, 8192))
        if r["pattern"] == "dense"
    ]
    df = load_frame(write_result(tmp_path / "m", recs + [dict(r, pattern_label="dense-failed") for r in failed]))
    fig = plots.fig_kv_cache_vs_seqlen(df)
    measured, analytic = lines_by_gid(fig, "kv_measured"), lines_by_gid(fig, "kv")
    assert set(measured) == {"dense", SWD}
    assert {SW, "dense-failed"} <= set(analytic)  # a forward-only pattern, a decode that failed
    for lab in (SW, "dense-failed"):
        assert "analytic only" in analytic[lab].get_label().replace("\n", " ")
        assert analytic[lab].get_linestyle() == "--"


def test_kv_lines_on_top_of_each_other_stay_visible(df):
    """A pattern whose cache equals another's (within 3%) is drawn with open, larger markers over
    it, in its own colour, and its legend entry says whose line it lies on."""
    twin = df[df["pattern_label"] == SW].copy()
    twin["pattern_label"] = "twin_window(window=9)"
    twin["pattern"] = "twin_window"
    twin["kv_cache_bytes"] = twin["kv_cache_bytes"] * 1.01
    import pandas as pd

    fig = plots.fig_kv_cache_vs_seqlen(pd.concat([df, twin], ignore_index=True))
    kv = lines_by_gid(fig, "kv")
    assert "on the line of sliding_window" in " ".join(kv["twin_window(window=9)"].get_label().split())
    assert kv["twin_window(window=9)"].get_markerfacecolor() == "none"
    assert "on the line" not in kv[SW].get_label() and "on the line" not in kv["dense"].get_label()
    assert kv["twin_window(window=9)"].get_color() != kv[SW].get_color()
