"""An exponent is a finding only where its 95% interval is narrower than ±0.25 over at least
three sizes above the overhead floor; otherwise the table and the legend say why beside the
value and the analysis text does not cite it (issue 17, finding 4)."""

from __future__ import annotations

import pytest
from report_fixtures import dense_time, make_records, record

from sparsebench.analysis.scaling import FINDING, TOO_FEW_SIZES, TOO_NOISY, analyze, fit_status
from sparsebench.render import plots
from sparsebench.render.analysis import tables, to_markdown
from sparsebench.results.folder import frame

NOISE = {1024: 1.0, 2048: 1.9, 4096: 0.55}  # dense with a noisy middle size: ~n^1.66 ± ~8


def noisy_records() -> list[dict]:
    return [record("dense", "sdpa", n, dense_time(n) * f, mem=1e6 + 3e3 * n) for n, f in NOISE.items()]


def scaling_cells(analysis, series: str) -> dict[str, str]:
    t = tables(analysis)[0]
    row = next(r for r in t.rows if r[0].startswith(series))
    return dict(zip(t.columns, row))


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_a_noisy_three_size_fit_is_labelled_and_not_cited():
    df = frame(noisy_records())
    a = analyze(df)
    s = a.find("dense", "sdpa")
    assert s.time_fit.points == 3 and s.time_fit.half_width >= 0.25
    assert s.time_status == TOO_NOISY
    value = f"{s.time_fit.exponent:.2f}"
    cell = scaling_cells(a, "dense · sdpa")["time exp."]
    assert cell.startswith(value) and cell.endswith("(too noisy)")
    md = to_markdown(a, df)
    assert f"{value} ± {s.time_fit.half_width:.2f} (too noisy)" in md
    findings = md[md.index("Findings") :] if "Findings" in md else md[md.index("No exponent is a finding") :]
    assert f"n^{value}" not in findings.split("\n")[0]  # the text does not cite it
    legend = [t for t in legend_texts(plots.fig_time_vs_seqlen(df, a)) if t.startswith("dense")]
    assert legend and "too noisy" in legend[0]
    # an 80-column terminal: the caveat whole, on its own line under the value
    from sparsebench.render.analysis import renderables
    from sparsebench.render.tables import render_plain

    text = render_plain(renderables(a, df), width=80)
    assert "(too noisy)" in text and all(len(line) <= 80 for line in text.splitlines())


def test_two_sizes_are_too_few():
    df = frame([r for r in noisy_records() if r["seq_len"] != 2048])
    a = analyze(df)
    s = a.find("dense", "sdpa")
    assert s.time_status == TOO_FEW_SIZES
    assert scaling_cells(a, "dense · sdpa")["time exp."].endswith("(too few sizes: 2)")
    assert "No exponent is a finding" in to_markdown(a, df)
    legend = [t for t in legend_texts(plots.fig_time_vs_seqlen(df, a)) if t.startswith("dense")]
    assert "too few sizes" in legend[0]


def test_a_clean_five_size_fit_is_a_finding():
    sizes = (512, 1024, 2048, 4096, 8192)
    df = frame(make_records(sizes=sizes))
    a = analyze(df)
    s = a.find("dense", "sdpa")
    assert s.time_fit.points == 5 and s.time_status == FINDING
    cell = scaling_cells(a, "dense · sdpa")["time exp."]
    assert cell == s.time_fit.describe()  # "2.00 ± 0.03": no caveat
    md = to_markdown(a, df)
    assert f"dense · sdpa (baseline): time n^{s.time_fit.exponent:.2f} ± {s.time_fit.half_width:.2f}" in md
    legend = [t for t in legend_texts(plots.fig_time_vs_seqlen(df, a)) if t.startswith("dense · sdpa")]
    assert "too" not in legend[0] and f"n^{{{s.time_fit.exponent:.2f}}}" in legend[0]
    mem = [t for t in legend_texts(plots.fig_memory_vs_seqlen(df, a)) if t.startswith("dense · sdpa")]
    assert "too" not in mem[0]


@pytest.mark.parametrize(
    "points, half, status",
    [(3, 0.24, FINDING), (3, 0.25, TOO_NOISY), (2, None, TOO_FEW_SIZES), (5, 1.1, TOO_NOISY)],
)
def test_the_rule_is_decided_in_one_place(points, half, status):
    from sparsebench.stats import Fit

    lo, hi = (None, None) if half is None else (2.0 - half, 2.0 + half)
    assert fit_status(Fit(2.0, 0.0, lo, hi, tuple(range(1, points + 1)))) == status
    assert fit_status(None) is None
