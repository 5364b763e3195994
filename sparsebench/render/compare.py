"""A comparison drawn: ``render(result, fmt)`` writes a ``Comparison`` (two folders) or a
``ByComparison`` (one folder along a dimension) in one of FORMATS; ``renderables`` gives the
rich objects of the terminal table; ``fig_ratio`` draws the new/base ratio figure.

The comparison itself (verdicts, statistics) is ``analysis.compare``'s; nothing here judges."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from sparsebench.analysis.compare import (
    BASELINE_COLUMN,
    FAMILY_ALPHA,
    METRICS,
    PROBE_SLACK,
    QUALITY_WORSE,
    REGRESSIONS,
    SAME_AS_BASELINE,
    WITHHELD,
    ByComparison,
    CaseDiff,
    Comparison,
    check_choice,
    key_text,
    quality_tolerance,
    ratio_text,
)
from sparsebench.analysis.scaling import dim_text, iter_groups
from sparsebench.render.tables import (
    TableSpec,
    markdown_table,
    render_plain,
    rich_table,
)
from sparsebench.results.schema import CASE_KEY
from sparsebench.units import format_time

FORMATS = ("table", "markdown", "json", "csv")
RING = "#000000"  # marks a regression in the ratio plot
RING_MARKER = dict(linestyle="none", marker="o", markerfacecolor="none", markeredgecolor=RING, markeredgewidth=1.6)
VERDICT_COLOURS = {"slower": "red", "now failing": "red", "faster": "green", "now ok": "green", WITHHELD: "yellow"}
# how a verdict reads in a table (the JSON and CSV keep the short word)
VERDICT_TEXT = {"same": "same within noise", WITHHELD: "withheld: machine unstable"}

Result = Comparison | ByComparison


def render(result: Result, fmt: str) -> str:
    """Text in one of FORMATS ('table' is the rich table as plain text)."""
    fmt = check_choice("format", fmt, FORMATS)
    if fmt == "markdown":
        return to_markdown(result)
    if fmt == "json":
        return to_json(result)
    if fmt == "csv":
        return to_csv(result)
    return render_plain(renderables(result))


def table_spec(result: Result) -> TableSpec:
    """The comparison's table: one row per case, or per row of a --by comparison."""
    if isinstance(result, ByComparison):
        return _by_table(result)
    return _case_table(result)


def renderables(result: Result) -> list:
    """For the terminal: warnings, the table (slower cases red, faster green), the cases only
    one folder has."""
    if isinstance(result, ByComparison):
        return [rich_table(_by_table(result))]
    from rich.text import Text

    c = result
    out: list = [Text(f"warning: {w}", style="yellow") for w in c.warnings]
    styles = [("red" if r.quality_worse else VERDICT_COLOURS.get(r.verdict)) for r in _ordered(c)]
    out.append(rich_table(_case_table(c), styles))
    for title, keys in ((f"only in {c.base_name}", c.only_base), (f"only in {c.new_name}", c.only_new)):
        if keys:
            out.append(Text(f"{title} ({len(keys)}):", style="bold"))
            for k in keys:
                out.append(Text(f"  {key_text(k, c.shown_dims)}"))
    return out


def to_markdown(result: Result) -> str:
    """A Markdown section (a CI comment): a headline, the warnings, the table with
    regressions (or the best of each row) in bold, the cases only one folder has."""
    if isinstance(result, ByComparison):
        t = _by_table(result)
        rows = [tuple(f"**{v}**" if v.endswith("(best)") else v for v in r) for r in t.rows]
        return f"### {t.title}\n\n" + markdown_table(t.columns, rows) + f"\n{t.note}\n"
    c = result
    t = _case_table(c)
    bad = c.regressions()
    worse = c.quality_regressions()
    gone = c.missing()
    run_slower = c.shift_verdict == "slower"
    head = "❌ " if bad or worse or run_slower or not c.compared() else ("⚠️ " if gone else "✅ ")
    extra = " The run as a whole is slower." if run_slower else ""
    if c.has_quality:
        extra += (
            f" {len(worse)} case(s) moved away from full attention."
            if worse
            else " Quality against full attention: no change beyond the tolerance."
        )
    if gone:
        extra += f" {len(gone)} case(s) of {c.base_name} not measured in {c.new_name}."
    if c.withheld():
        extra += f" ⚠️ Machine unstable: verdict withheld for {len(c.withheld())} case(s)."
    if c.rows and not c.compared():
        extra += " Nothing was measured in both."
    parts = [
        f"### sparsebench compare: {c.new_name} vs {c.base_name}\n",
        f"{head}{len(bad)} regression(s).{extra} {summary_line(c)}.\n",
    ]
    for w in c.warnings:
        parts.append(f"> **Warning:** {w}\n")
    verdict_at = t.columns.index("verdict")
    quality_at = t.columns.index("quality") if "quality" in t.columns else None
    rows = [
        tuple(
            f"**{v}**"
            if (i == verdict_at and v in REGRESSIONS) or (i == quality_at and v.startswith(QUALITY_WORSE))
            else v
            for i, v in enumerate(r)
        )
        for r in t.rows
    ]
    parts.append(markdown_table(t.columns, rows))
    parts.append(f"\n{_explanation(c)}\n")
    for title, keys in ((f"Only in {c.base_name}", c.only_base), (f"Only in {c.new_name}", c.only_new)):
        if keys:
            parts.append(f"\n**{title}** ({len(keys)}):\n")
            parts += [f"- {key_text(k, c.shown_dims)}" for k in keys]
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def to_json(result: Result) -> str:
    return json.dumps(result.to_dict(), indent=2, default=str) + "\n"


def to_csv(result: Result) -> str:
    """One line per case (side "both"), then the cases of one folder only; a --by comparison:
    one line per row, a time (or a status) per value."""
    buf = io.StringIO()
    if isinstance(result, ByComparison):
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(result.dims) + list(result.values))
        for key, cells in result.rows:
            w.writerow(list(key) + [t if t is not None else s for _, t, s in cells])
        return buf.getvalue()
    c = result
    fields = [*CASE_KEY, "side", *CaseDiff.FIELDS]
    dw = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    dw.writeheader()
    for r in c.rows:
        dw.writerow({**r.to_dict(), "side": "both"})
    for side, keys in (("base only", c.only_base), ("new only", c.only_new)):
        for k in keys:
            dw.writerow({**dict(zip(CASE_KEY, k)), "side": side})
    return buf.getvalue()


def summary_line(c: Comparison) -> str:
    """ "12 common cases (10 same, 2 slower, 1 only in base); threshold 10% on the median"."""
    counts = c.counts()
    parts = [f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: (kv[0] not in REGRESSIONS, -kv[1]))]
    if c.only_base:
        parts.append(f"{len(c.only_base)} only in {c.base_name}")
    if c.only_new:
        parts.append(f"{len(c.only_new)} only in {c.new_name}")
    text = f"{len(c.rows)} common cases ({', '.join(parts) or 'none'})"
    text += f"; threshold {c.threshold:.0%} on the {c.metric} time"
    if c.adjusted_text:
        text += f", {c.adjusted_text}"
    if c.has_quality:
        q: dict[str, int] = {}
        for r in c.rows:
            if r.quality:
                q[r.quality] = q.get(r.quality, 0) + 1
        moved = ", ".join(f"{v} {k}" for k, v in sorted(q.items())) or "not in both"
        text += f"; quality against full attention: {moved}"
    if c.shift_text:
        text += f"; {c.shift_text}"
    return text


# -- tables ---------------------------------------------------------------------------------------


def _ordered(c: Comparison) -> list[CaseDiff]:
    """The regressions (slower, or worse quality) first, then the other cases, each in case order."""

    def bad(r: CaseDiff) -> bool:
        return r.is_regression or r.quality_worse

    return [r for r in c.rows if bad(r)] + [r for r in c.rows if not bad(r)]


def _case_table(c: Comparison) -> TableSpec:
    cols = ("case",) + tuple(c.shown_dims) + ("n", "base", "new", c.ratio_name, "interval", "verdict")
    if c.has_quality:  # quality against full attention beside the time, base -> new
        cols += ("recall", "rel. err", "quality")
    rows = []
    for r in _ordered(c):
        rows.append(
            (f"{r.get('pattern_label')} · {r.get('backend')}",)
            + tuple(dim_text(d, r.get(d)) for d in c.shown_dims)
            + (
                str(r.get("seq_len")),
                _side(r.base, r.base_status),
                _side(r.new, r.new_status),
                ratio_text(r),
                r.interval or "-",
                VERDICT_TEXT.get(r.verdict, r.verdict),
            )
            + (_quality_cells(r) if c.has_quality else ())
        )
    return TableSpec(
        f"{c.metric} time, new = {c.new_name} vs base = {c.base_name}",
        cols,
        tuple(rows),
        f"{summary_line(c)}. {_explanation(c)}",
        wrap=(0,),
    )


def _quality_cells(r: CaseDiff) -> tuple[str, str, str]:
    """recall and rel. err as "base → new", and the quality verdict with what moved."""
    from sparsebench.render.quality import error_text

    def pair(b: float | None, n: float | None, text) -> str:
        return "-" if b is None and n is None else f"{text(b)} → {text(n)}"

    verdict = r.quality or "-"
    return (
        pair(r.base_recall_mean, r.new_recall_mean, _recall3),
        pair(r.base_full_rel_err, r.new_full_rel_err, error_text),
        verdict,
    )


def _recall3(v: float | None) -> str:
    """A recall to three decimals ('-' where none): a compare shows small moves, so never '> 0.999'."""
    return "-" if v is None else f"{v:.3f}"


def _explanation(c: Comparison) -> str:
    """What the ratio, the interval and the verdicts mean (the table's note)."""
    text = (
        f"{c.ratio_name} = new / base of the {c.metric} time "
        f"({METRICS[c.metric]}); {c.machine_text}; interval: {c.control}; "
        f"{c.noise_text}."
    )
    if c.has_quality:
        text += (
            " recall and rel. err: the case's quality against full attention (recall_mean, full_rel_err), base → new;"
            f" {quality_tolerance()}; better where it moved as far the other way."
        )
    if c.withheld():
        text += (
            f" withheld: the machine-speed probe moved by more than {(1 + c.threshold) ** PROBE_SLACK - 1:.0%} between"
            " the two runs, so "
            "the machine may have changed, not the program (--fail-on-unstable fails the gate on them)."
        )
    return text


def _by_table(b: ByComparison) -> TableSpec:
    out = []
    for key, cells in b.rows:
        times = [t for _, t, _ in cells if t is not None]
        best = min(times) if times else None
        row = [dim_text(c, v) if c != "seq_len" else str(v) for c, v in zip(b.dims, key)]
        for _, t, status in cells:
            if t is None:
                row.append(status or "-")
            elif best is not None and t == best:
                row.append(f"{format_time(t)} (best)" if len(times) > 1 else format_time(t))
            else:
                row.append(f"{format_time(t)} ({t / best:.2f}x)")
        out.append(tuple(row))
    note = "(best) marks the fastest in each row; (k x) is the time relative to it."
    if BASELINE_COLUMN in b.values:
        note += (
            f" {BASELINE_COLUMN}: the dense baseline at the same n, beside every pattern"
            f" ({SAME_AS_BASELINE} on dense's own rows)."
        )
    return TableSpec(
        f"{b.metric} time by {b.by}",
        tuple({"seq_len": "n", "pattern_label": "pattern"}.get(c, c) for c in b.dims) + b.values,
        tuple(out),
        note,
    )


def _side(v: float | None, status: str) -> str:
    return format_time(v) if status == "ok" and v is not None else status


# -- figure ---------------------------------------------------------------------------------------


def fig_ratio(cmp: Comparison, styles: Any = None):
    """new/base ratio against n per series (log-log), the threshold band shaded, slower cases
    ringed, the run as a whole (the cases' common shift) as a dashed line in the band of its
    interval, vermillion where it is slower. Returns a matplotlib Figure, or None when no case
    has a ratio."""
    rows = [r for r in cmp.rows if r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0]
    if not rows:
        return None
    import pandas as pd
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from sparsebench.analysis.scaling import is_baseline_key
    from sparsebench.render.plots import (
        finish_axes,
        outside_legend,
        styles_for,
        wrap_label,
    )

    df = pd.DataFrame(
        [
            {**dict(zip(CASE_KEY, r.key)), "ratio": r.ratio, "verdict": r.verdict, "low": r.low, "high": r.high}
            for r in rows
        ]
    )
    styles = styles or styles_for(df)
    fig = Figure(figsize=(11.5, 4.8), layout="constrained")
    title = f"{cmp.metric} time ratio, {cmp.new_name} / {cmp.base_name}"
    fig.suptitle(f"{title}, {cmp.adjusted_text}" if cmp.adjusted_text else title, fontweight="bold")
    ax = fig.add_subplot()
    t = cmp.threshold
    ax.axhspan(1 / (1 + t), 1 + t, color="#eeeeee", zorder=0, label=f"within ±{t:.0%}")
    ax.axhline(1.0, color="#777777", linewidth=1.5, zorder=1, label="no change")
    if cmp.shift is not None and cmp.shift_interval is not None:  # the run as a whole: its interval and verdict
        iv, verdict = cmp.shift_interval, cmp.shift_verdict
        color = "#D55E00" if verdict == "slower" else "#0072B2"
        ax.axhspan(iv.low, iv.high, color=color, alpha=0.15, zorder=0.5, gid="shift:interval")
        ax.axhline(
            cmp.shift.ratio,
            color=color,
            linewidth=2.5,
            linestyle=(0, (6, 3)),
            zorder=1.5,
            gid="shift:ratio",
            label=wrap_label(
                f"the run as a whole: {cmp.shift.ratio:.2f}x {iv.text()}, {cmp.shift_verdict_text} "
                "(median of the cases' ratios, band: its interval)"
            ),
        )
    keys = [c for c in CASE_KEY if c != "seq_len"]
    for key, g in iter_groups(df, keys):
        g = g.sort_values("seq_len")
        row = dict(zip(keys, key))
        label = f"{row['pattern_label']} · {row['backend']}"
        extra = [dim_text(c, row[c]) for c in cmp.shown_dims]
        if extra:
            label += ", " + ", ".join(extra)
        style = styles.line(row["pattern_label"], row["backend"], is_baseline_key(key))
        ax.plot(g["seq_len"], g["ratio"], label=wrap_label(label), gid=f"ratio:{label}", **style)
        bars = g.dropna(subset=["low", "high"])
        bars = bars[bars["high"].map(math.isfinite)]
        if len(bars):  # the interval of each ratio
            ax.errorbar(
                bars["seq_len"],
                bars["ratio"],
                yerr=[bars["ratio"] - bars["low"], bars["high"] - bars["ratio"]],
                linestyle="none",
                ecolor=style.get("color"),
                elinewidth=1.0,
                capsize=3,
                alpha=0.7,
                label="_interval",
            )
        slow = g[g["verdict"] == "slower"]
        if len(slow):
            ax.plot(slow["seq_len"], slow["ratio"], markersize=13, zorder=6, label="_slower", **RING_MARKER)
    finish_axes(
        ax,
        f"threshold {t:.0%}; bars: intervals, {1 - FAMILY_ALPHA:.0%} family-wise (Holm, {cmp.level_span}); "
        "ring: the whole interval above the threshold",
        "sequence length n (tokens)",
        f"{cmp.metric} time ratio (new / base{', adjusted' if cmp.machine is not None else ''})",
        y="ratio",
    )
    extra = []
    if (df["verdict"] == "slower").any():
        extra.append(Line2D([], [], markersize=10, label="slower (regression)", **RING_MARKER))
    outside_legend(ax, extra)
    return fig
