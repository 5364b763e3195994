"""Figures hold the expected series (read from the matplotlib objects, not from pixels), files
are written, report.html is self-contained, and `sparsebench plot` re-renders a folder."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from report_fixtures import SIZES, make_records, record, write_result
from sparsebench import plots
from sparsebench.analysis import analyze
from sparsebench.cli_report import register
from sparsebench.html_report import write_report
from sparsebench.results import load_frame

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
    return {ln.get_gid().split(":", 1)[1]: ln for ax in fig.axes for ln in ax.get_lines()
            if (ln.get_gid() or "").startswith(prefix + ":")}


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_time_vs_seqlen(df, analysis):
    fig = plots.fig_time_vs_seqlen(df, analysis)
    lines = lines_by_gid(fig, "time")
    assert set(lines) == {"dense · sdpa", "dense · naive", f"{SW} · block_sparse", f"{SW} · flex", f"{SW} · sdpa_masked"}
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
    assert set(est) == set(measured)
    assert est["dense · naive"].get_linestyle() == "--"
    assert measured[f"{SW} · block_sparse"].get_linestyle() != "--"
    assert "dashed: analytic estimate" in legend_texts(fig)
    assert not any("(estimate)" in t for t in legend_texts(fig))  # one legend entry per series
    assert "bytes" in fig.axes[0].get_ylabel()


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


def test_styles_are_consistent_across_figures(df, analysis):
    figs = [plots.fig_time_vs_seqlen(df, analysis), plots.fig_memory_vs_seqlen(df, analysis),
            plots.fig_speedup_vs_seqlen(df, analysis)]
    prefixes = ["time", "memory", "speedup"]
    key = f"{SW} · flex"
    styles = {(lines_by_gid(f, p)[key].get_color(), lines_by_gid(f, p)[key].get_linestyle(),
               lines_by_gid(f, p)[key].get_marker()) for f, p in zip(figs, prefixes)}
    assert len(styles) == 1
    colour, *_ = styles.pop()
    assert colour == plots.BACKEND_COLOURS["flex"]
    assert colour in plots.OKABE_ITO.values()
    # one colour per backend, one style per pattern
    t = lines_by_gid(figs[0], "time")
    assert t[f"{SW} · flex"].get_linestyle() == t[f"{SW} · block_sparse"].get_linestyle()
    assert t[f"{SW} · flex"].get_color() != t[f"{SW} · block_sparse"].get_color()
    assert t["dense · naive"].get_linestyle() != t[f"{SW} · block_sparse"].get_linestyle()


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
