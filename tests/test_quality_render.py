"""Quality beside speed (issue 20, showing): the quality table per pattern and n in summary.md,
the terminal and report.html, exempt patterns with their note, the quality_vs_speedup figure's
data (points, frontier), compare's quality columns and flags, and an old folder rendered as
before. Built on fabricated records (tests/quality_fixtures.py): nothing is measured."""

from __future__ import annotations

import re

import pytest
from quality_fixtures import EXEMPT_NOTE, PATTERNS, quality_records
from report_fixtures import make_records, write_result

from sparsebench.analysis.compare import compare, judge_quality
from sparsebench.render import plots, quality
from sparsebench.render.compare import render, to_markdown
from sparsebench.render.quality import Point, frontier, frontiers, points, quality_rows, tables
from sparsebench.render.summary import finalize, summary_markdown
from sparsebench.render.tables import render_plain
from sparsebench.results.folder import frame, read_records

SW = "sliding_window(window=256)"


def _row(spec, **cells):
    """The rows of a TableSpec whose columns hold ``cells``."""
    idx = {c: spec.columns.index(c) for c in cells}
    return [r for r in spec.rows if all(r[idx[c]] == v for c, v in cells.items())]


# -- the table --------------------------------------------------------------------------------


def test_the_quality_table_has_a_row_per_pattern_and_n_with_its_figures_and_each_backends_speedup():
    recs = quality_records()
    df = frame(recs)
    measured, exempt, dims, backends = quality_rows(df)
    assert len(measured) == len(PATTERNS) * 4 and dims == ()  # 4 patterns x 4 sizes; dense is the reference
    assert backends == ("block_sparse", "flex")
    spec = tables(df)[0]
    assert spec.title == "Quality against full attention (inputs: random)"  # one kind: said in the title
    assert "inputs" not in spec.columns and "grad rel. err" not in spec.columns  # forward, one kind
    (row,) = _row(spec, pattern=SW, n="4096")
    src = {r["backend"]: r for r in recs if r["pattern_label"] == SW and r["seq_len"] == 4096}
    cols = dict(zip(spec.columns, row))
    assert cols["recall mean"] == f"{src['block_sparse']['recall_mean']:.3f}"
    assert cols["recall min"] == f"{src['block_sparse']['recall_min']:.3f}"
    # the worst of the backends' errors (flex's is larger here)
    assert src["flex"]["full_rel_err"] > src["block_sparse"]["full_rel_err"]
    assert cols["rel. err"] == f"{src['flex']['full_rel_err']:.3g}"
    base = next(r for r in recs if r["pattern"] == "dense" and r["seq_len"] == 4096)
    for b in ("block_sparse", "flex"):
        assert cols[f"speedup\n{b}"] == f"{base['time_median_s'] / src[b]['time_median_s']:.2f}x"
    assert quality.RANDOM_NOTE in spec.note


def test_an_exempt_pattern_is_listed_with_its_note_not_as_blanks():
    df = frame(quality_records())
    specs = tables(df)
    assert [t.title for t in specs] == ["Quality against full attention (inputs: random)", "Without quality figures"]
    assert not any(r[0].startswith("document") for r in specs[0].rows)
    (row,) = specs[1].rows
    assert row[0] == "document(doc_lens=[...])" and row[1] == "1024-8192" and row[-1] == EXEMPT_NOTE
    assert row[2] == "3.33x (block_sparse, n=8192)"  # its speedup beside it
    md = summary_markdown(__import__("pathlib").Path("/nonexistent"), quality_records())
    assert EXEMPT_NOTE in md and "## Quality against full attention" in md


def test_a_case_without_figures_or_note_says_so():
    recs = quality_records()
    for r in recs:
        if r["pattern_label"] == SW:
            r.update(recall_mean=None, recall_min=None, full_rel_err=None)
    (spec, exempt) = tables(frame(recs))
    assert not _row(spec, pattern=SW)
    assert any(r[0] == SW and r[-1] == quality.NOT_RECORDED for r in exempt.rows)


def test_inputs_are_named_per_row_where_a_run_has_several_kinds():
    recs = quality_records(("random", "synthetic"))
    spec = tables(frame(recs))[0]
    assert spec.title == "Quality against full attention" and spec.columns[:3] == ("pattern", "inputs", "n")
    rand, syn = _row(spec, pattern=SW, n="4096", inputs="random"), _row(spec, pattern=SW, n="4096", inputs="synthetic")
    assert len(rand) == len(syn) == 1  # a random and a synthetic case of one pattern: two rows
    at = spec.columns.index("recall mean")
    for kind, row in (("random", rand[0]), ("synthetic", syn[0])):  # each row its own inputs' figure
        src = next(r for r in recs if r["inputs"] == kind and r["pattern_label"] == SW and r["seq_len"] == 4096)
        assert row[at] == f"{src['recall_mean']:.3f}"
    assert rand[0][at] != syn[0][at]
    assert "random inputs" not in spec.note  # not every row is random


def test_backward_mode_adds_the_gradient_column():
    spec = tables(frame(quality_records(mode="backward")))[0]
    assert "grad rel. err" in spec.columns
    (row,) = _row(spec, pattern=SW, n="1024")
    assert row[spec.columns.index("grad rel. err")] != "-"


def test_sampled_rows_are_said():
    recs = quality_records()
    assert "rows" not in tables(frame(recs))[0].columns  # every figure exact: no column
    for r in recs:
        if r["seq_len"] == 8192 and r.get("recall_mean") is not None:
            r["quality_rows"] = 256
    spec = tables(frame(recs))[0]
    (big,) = _row(spec, pattern=SW, n="8192")
    (small,) = _row(spec, pattern=SW, n="1024")
    at = spec.columns.index("rows")
    assert big[at] == "256 sampled" and small[at] == "all"


def test_recall_never_reads_1_below_1():
    assert quality.recall_text(0.99996) == "> 0.999" and quality.recall_text(1.0) == "1"
    assert quality.recall_text(0.8734) == "0.873" and quality.recall_text(None) == "-"


# -- summary.md, the terminal, report.html ----------------------------------------------------------


@pytest.fixture(scope="module")
def finalized(tmp_path_factory):
    out = write_result(tmp_path_factory.mktemp("quality"), quality_records(("random", "synthetic")))
    shown: list = []
    written = finalize(out, read_records(out), plots=False, renderables=shown)
    return out, written, shown


def test_summary_terminal_and_report_carry_the_quality_table(finalized):
    out, written, shown = finalized
    md = (out / "summary.md").read_text()
    section = md[md.index("## Quality against full attention") : md.index("## Scaling")]
    assert f"| {SW} | synthetic | 4096 |" in section and EXEMPT_NOTE in section
    assert md.index("## Results") < md.index("## Quality against full attention")
    results = md[md.index("## Results") : md.index("## Quality against full attention")]
    assert "| block_sparse inputs=synthetic | 4096 |" in results  # the results table tells the kinds apart too
    assert "| block_sparse | 4096 |" in results  # random, the default, unsaid
    text = render_plain(shown, width=240)
    assert text.index("Quality against full attention") < text.index("Scaling")  # right under the results
    assert "sliding_window(window=256)" in text and "synthetic" in text
    html = __import__("html").unescape((out / "report.html").read_text())
    assert '<h2 id="quality">Quality against full attention</h2>' in html and EXEMPT_NOTE in html
    assert "<th>recall mean</th>" in html and "<th>recall vs full</th>" in html  # and in the results table


def test_an_old_folder_renders_as_before(tmp_path):
    recs = make_records()  # no quality fields at all (a run before schema 4)
    shown: list = []
    finalize(write_result(tmp_path, recs), recs, plots=False, renderables=shown, warn=pytest.fail)
    assert "Quality" not in (tmp_path / "summary.md").read_text()
    assert "Quality" not in render_plain(shown) and 'id="quality"' not in (tmp_path / "report.html").read_text()
    assert plots.fig_quality_vs_speedup(frame(recs)) is None and tables(frame(recs)) == []
    nulls = [dict(r, recall_mean=None, full_rel_err=None, quality_note=None) for r in recs]  # schema 4, none measured
    assert tables(frame(nulls)) == [] and plots.fig_quality_vs_speedup(frame(nulls)) is None


# -- the figure --------------------------------------------------------------------------------


def P(speedup, value, label="p", n=1024, backend="b"):
    return Point(label, backend, n, speedup, value)


def test_the_frontier_keeps_the_points_no_other_beats_on_both_axes():
    a, b, c, d = P(1.0, 1.0), P(2.0, 0.9), P(3.0, 0.5), P(1.5, 0.6)  # d: b is faster and recalls more
    assert frontier([a, b, c, d], "recall_mean") == [a, b, c]
    e = P(3.0, 0.4)  # as fast as c, recalls less
    assert frontier([a, b, c, d, e], "recall_mean") == [a, b, c]
    # rel. err: lower is better
    x, y, z = P(1.0, 0.0), P(2.0, 0.3), P(2.0, 0.5)
    assert frontier([x, y, z], "full_rel_err") == [x, y]
    assert frontier([P(2.0, 0.3, backend="b1"), P(2.0, 0.3, backend="b2")], "full_rel_err") == [
        P(2.0, 0.3, backend="b1")
    ]  # one vertex where two points coincide


def test_the_figure_plots_each_case_with_the_reference_and_a_frontier_per_n():
    recs = quality_records(("random", "synthetic"))
    df = frame(recs)
    found = quality.panels(df)
    assert [setup["inputs"] for setup, _ in found] == ["random", "synthetic"]  # one row of panels each
    setup, sub = found[1]
    pts = points(sub, "recall_mean")
    assert sum(p.reference for p in pts) == 4  # dense sdpa at (1x, recall 1) at each n
    real = [p for p in pts if not p.reference]
    assert len(real) == len(PATTERNS) * 2 * 4  # every pattern x backend x n with a figure; no exempt one
    src = next(r for r in recs if r["inputs"] == "synthetic" and r["pattern_label"] == SW and r["seq_len"] == 8192)
    hit = [p for p in real if p.pattern_label == SW and p.seq_len == 8192 and p.backend == src["backend"]]
    assert hit[0].value == pytest.approx(src["recall_mean"])
    fronts = frontiers(sub, "recall_mean")
    assert sorted(fronts) == [1024, 2048, 4096, 8192]
    at = fronts[8192]
    assert at[0].reference and all(p.seq_len == 8192 for p in at)
    for p in at:  # none beaten by another point at that n
        assert not any(q.speedup >= p.speedup and q.value > p.value for q in pts if q.seq_len == 8192)
    # on the fixture's synthetic inputs sink_window keeps more at the same speed as sliding_window:
    assert not any(p.pattern_label == SW for p in at)
    fig = plots.fig_quality_vs_speedup(df)
    assert fig is not None and len(fig.axes) == 4
    assert "inputs: random, synthetic" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and any(line.get_gid() == "ideal" for line in ax.get_lines())


def test_a_random_only_figure_says_recall_is_about_density():
    df = frame(quality_records())
    fig = plots.fig_quality_vs_speedup(df)
    title = fig._suptitle.get_text()
    assert "random inputs: recall ~ each query's share of keys attended (row density); see inputs: synthetic" in title
    caption = quality.caption(df)
    assert "random inputs" in caption and caption.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", caption)
    assert quality.caption(frame(quality_records(("synthetic",)))) == quality.CAPTION


def test_no_figure_without_a_baseline():
    recs = [r for r in quality_records() if r["pattern"] != "dense"]
    assert plots.fig_quality_vs_speedup(frame(recs)) is None  # quality, but no speedup to set it against


def test_the_figure_is_registered_and_written_as_png_and_svg(tmp_path):
    assert plots.FIGURE_FUNCTIONS[quality.FIGURE] is plots.fig_quality_vs_speedup  # render_all draws it
    assert plots.figure_caption(quality.FIGURE, None) == quality.CAPTION  # report.html's caption hook
    fig = plots.fig_quality_vs_speedup(frame(quality_records(("random", "synthetic"))))
    for fmt in ("png", "svg"):
        path = plots.save(fig, tmp_path / f"{quality.FIGURE}.{fmt}")
        assert path.stat().st_size > 10_000


# -- compare -----------------------------------------------------------------------------------


def _moved(recs, recall=0.0, err=1.0):
    out = []
    for r in recs:
        r = dict(r)
        if r["pattern_label"] == SW and r["backend"] == "block_sparse" and r["seq_len"] == 4096:
            r["recall_mean"] = r["recall_mean"] + recall
            r["full_rel_err"] = r["full_rel_err"] * err
        out.append(r)
    return out


def test_compare_flags_a_recall_drop_beside_the_time():
    recs = quality_records()
    c = compare(frame(recs), frame(_moved(recs, recall=-0.02)))
    (worse,) = c.quality_regressions()
    assert worse.get("pattern_label") == SW and worse.get("seq_len") == 4096 and worse.quality == "worse"
    assert "recall" in worse.quality_change and worse.verdict == "same"  # as fast, computing something else
    assert c.gate_failed() and "moved away from full attention" in c.failure_message()
    md = to_markdown(c)
    assert "❌" in md and "| **worse** |" in md and "1 case(s) moved away from full attention" in md
    table = render(c, "table")
    assert "recall" in table and "worse" in table
    data = __import__("json").loads(render(c, "json"))
    assert data["quality_regressions"] == 1
    case = next(x for x in data["cases"] if x["quality"] == "worse")
    assert case["new_recall_mean"] == pytest.approx(case["base_recall_mean"] - 0.02)


def test_compare_flags_a_rel_err_rise_but_not_rounding():
    recs = quality_records()
    assert [r.quality for r in compare(frame(recs), frame(_moved(recs, err=1.15))).quality_regressions()] == ["worse"]
    assert not compare(frame(recs), frame(_moved(recs, err=1.05))).quality_regressions()
    assert judge_quality({"full_rel_err": 1e-6}, {"full_rel_err": 2e-6}) == ("same", "")  # below the floor
    assert judge_quality({"recall_mean": 0.9}, {"recall_mean": 0.95})[0] == "better"
    assert judge_quality({"recall_mean": None}, {"recall_mean": 0.9}) == (None, "")


def test_compare_is_silent_on_equal_figures():
    recs = quality_records()
    c = compare(frame(recs), frame(quality_records()))
    assert not c.quality_regressions() and not c.gate_failed()
    assert {r.quality for r in c.rows if r.has_quality} == {"same"}
    md = to_markdown(c)
    assert "✅" in md and "**worse**" not in md and "| worse |" not in md and "no change beyond the tolerance" in md


def test_compare_of_old_folders_has_no_quality_columns():
    c = compare(frame(make_records()), frame(make_records()))
    assert not c.has_quality
    assert "recall" not in to_markdown(c) and "quality" not in render(c, "table")
