"""A history drawn: ``render(history, fmt)`` writes an ``analysis.history.History`` in one of
FORMATS; ``renderables`` gives the rich objects of the terminal; ``fig_history`` draws each case's
time over the folders, one panel per series (pattern · backend), one line per sequence length.

Nothing here judges: the steps and intervals are ``analysis.history``'s."""

from __future__ import annotations

import csv
import io
import json
import math

from sparsebench.analysis.compare import FAMILY_ALPHA
from sparsebench.analysis.history import FASTER, SLOWER, TIME_LEVEL, CaseHistory, History, Point, Step
from sparsebench.analysis.scaling import dim_text
from sparsebench.render.tables import TableSpec, markdown_table, render_plain, rich_table
from sparsebench.results.schema import CASE_KEY, SERIES_KEY
from sparsebench.units import format_time

FORMATS = ("table", "markdown", "json", "csv")
MARKS = {SLOWER: "▲", FASTER: "▼"}
ABSENT = "-"
PANEL_COLUMNS = 3
PANEL_HEIGHT = 2.7
# A line per sequence length: Okabe-Ito colours other than the steps' vermillion and green.
SIZE_COLOURS = ("blue", "reddish_purple", "sky_blue", "black", "orange", "yellow")


def render(h: History, fmt: str) -> str:
    """Text in one of FORMATS ('table' is the terminal's tables as plain text)."""
    if fmt == "markdown":
        return to_markdown(h)
    if fmt == "json":
        return json.dumps(h.to_dict(), indent=2, default=str) + "\n"
    if fmt == "csv":
        return to_csv(h)
    return render_plain(renderables(h))


# -- text -----------------------------------------------------------------------------------------


def cell(p: Point, step: Step | None = None) -> str:
    """ "12.3 ms ±4%" (the half-width of the 95% interval, on the log scale), the status where
    there is no time, "▲ 1.32x" before the time where a step appeared."""
    if not p.ok:
        return ABSENT if p.status == "absent" else p.status
    text = format_time(p.time)
    iv = p.interval
    if iv is not None:
        if math.isfinite(iv.high):
            pct = (iv.high / p.time - 1) * 100
            text += f" ±{pct:.0f}%" if pct >= 0.5 else " ±<1%"
        else:
            text += " ±?"
    if step is not None:
        text = f"{MARKS[step.direction]} {step.ratio:.2f}x  {text}"
    return text


def step_line(h: History, s: Step) -> str:
    """ "strided(stride=64) · block_sparse, n=4096: 1.32x [1.18, 1.48] slower at abc1234 (2026-11-30)"."""
    f = h.folders[s.index]
    date = f.date_text()
    return (
        f"{s.label}: {s.ratio:.2f}x {s.interval.text()} {s.direction} at {f.label}"
        + (f" ({date})" if date else "")
        + f", after {h.folders[s.index - 1].label}"
    )


def rule_text(h: History) -> str:
    """What a cell and a step mean, in one line."""
    return (
        f"median time per call, ± its {TIME_LEVEL:.0%} interval (the upper side); "
        "▲/▼: a step, the ratio to the folder before "
        f"beyond {h.threshold:.0%} (above {1 + h.threshold:.2f}x or below {1 / (1 + h.threshold):.2f}x) "
        f"with its interval, at {1 - FAMILY_ALPHA:.0%} confidence over the cases of each pair (Holm)"
    )


def table_spec(h: History) -> TableSpec:
    """One row per case, one column per folder (in order)."""
    steps = {(s.key, s.index): s for s in h.steps}
    rows = []
    for c in h.cases:
        rows.append((c.label,) + tuple(cell(p, steps.get((c.key, i))) for i, p in enumerate(c.points)))
    title = f"history of {h.scenario}" if h.scenario else "history"
    return TableSpec(title, ("case",) + tuple(f.label for f in h.folders), tuple(rows), rule_text(h), wrap=(0,))


def folders_spec(h: History) -> TableSpec:
    """The folders in order: the label that heads their column, the folder, commit date, start."""
    rows = [
        (f.label, f.path, f.commit_date or "-", f.started or "-", "" if i == 0 else _pair_text(h, i - 1))
        for i, f in enumerate(h.folders)
    ]
    return TableSpec(
        f"{len(h.folders)} folders, {h.order}",
        ("label", "folder", "commit date", "started", "vs the folder before"),
        tuple(rows),
        "noise: the typical spread of a case's samples (rounds) in the two folders, pooled over their cases",
        wrap=(1,),
    )


def _pair_text(h: History, i: int) -> str:
    """ "9 cases, noise ±12%": the cases judged between folders i and i + 1 and their noise."""
    text = f"{h.compared[i]} cases"
    if i < len(h.noise) and h.noise[i] > 0:
        text += f", noise ±{math.expm1(h.noise[i]) * 100:.0f}%"
    return text


def steps_heading(h: History) -> str:
    if not h.steps:
        return f"no step beyond {h.threshold:.0%} and the noise in {len(h.cases)} cases over {len(h.folders)} folders"
    return f"{len(h.steps)} step(s) in {len(h.cases)} cases over {len(h.folders)} folders:"


def renderables(h: History) -> list:
    """For the terminal: warnings, the folders, the table (rows with a slower step red, with a
    faster one green), the steps."""
    from rich.text import Text

    out: list = [Text(f"warning: {w}", style="yellow") for w in h.warnings]
    out.append(rich_table(folders_spec(h)))
    styles = []
    for c in h.cases:
        dirs = {s.direction for s in h.steps if s.key == c.key}
        styles.append("red" if SLOWER in dirs else ("green" if FASTER in dirs else None))
    out.append(rich_table(table_spec(h), styles))
    out.append(Text(steps_heading(h), style="bold"))
    for s in h.steps:
        out.append(Text(f"  {MARKS[s.direction]} {step_line(h, s)}", style="red" if s.direction == SLOWER else "green"))
    return out


def to_markdown(h: History) -> str:
    f = folders_spec(h)
    t = table_spec(h)
    parts = [f"### sparsebench {t.title}\n", f"{len(h.folders)} folders, {h.order}.\n"]
    parts += [f"> **Warning:** {w}\n" for w in h.warnings]
    parts.append(markdown_table(f.columns, f.rows))
    parts.append(markdown_table(t.columns, t.rows))
    parts.append(f"{t.note}.\n")
    parts.append(f"**{steps_heading(h)}**\n")
    parts += [f"- {MARKS[s.direction]} {step_line(h, s)}" for s in h.steps]
    return "\n".join(parts).rstrip() + "\n"


def to_csv(h: History) -> str:
    """Tidy: one line per case and folder, the folders in order, with the step where one
    appeared."""
    fields = [
        *CASE_KEY,
        "case",
        "position",
        "folder",
        "commit",
        "commit_date",
        "started",
        "status",
        "time_median_s",
        "low_s",
        "high_s",
        "step",
        "step_ratio",
        "step_low",
        "step_high",
    ]
    steps = {(s.key, s.index): s for s in h.steps}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for c in h.cases:
        for i, (f, p) in enumerate(zip(h.folders, c.points)):
            s = steps.get((c.key, i))
            w.writerow(
                {
                    **dict(zip(CASE_KEY, c.key)),
                    "case": c.label,
                    "position": i + 1,
                    "folder": f.label,
                    "commit": f.commit,
                    "commit_date": f.commit_date,
                    "started": f.started,
                    **p.to_dict(),
                    "step": s.direction if s else "",
                    "step_ratio": s.ratio if s else "",
                    "step_low": s.interval.low if s else "",
                    "step_high": s.interval.high if s else "",
                }
            )
    return buf.getvalue()


# -- figure ---------------------------------------------------------------------------------------


def _panels(h: History) -> list[tuple[str, list[CaseHistory]]]:
    """One panel per series (the case key less the sequence length), in the table's order."""
    extra = [c for c in h.shown_dims if c in SERIES_KEY and c not in ("pattern_label", "backend")]
    out: dict[tuple, tuple[str, list[CaseHistory]]] = {}
    for c in h.cases:
        row = dict(zip(CASE_KEY, c.key))
        title = ", ".join([f"{row['pattern_label']} · {row['backend']}"] + [dim_text(d, row[d]) for d in extra])
        out.setdefault(c.series, (title, []))[1].append(c)
    return list(out.values())


def _size_text(c: CaseHistory) -> str:
    """A line's legend entry: n=4096."""
    return dim_text("seq_len", c.seq_len)


def fig_history(h: History):
    """Each case's median time over the folders (x: the folders in order, by short commit), its
    95% interval as error bars, log-scale y; one panel per series, one line per sequence length;
    a step marked where it appeared (▲ slower, ▼ faster) with its ratio. A matplotlib Figure, or
    None when no case has a time."""
    if not any(p.ok for c in h.cases for p in c.points):
        return None
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from sparsebench.render.plots import NEUTRAL, OKABE_ITO, PATTERN_STYLES, WIDTH, _decade_axis, wrap_label

    panels = _panels(h)
    ncols = min(PANEL_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    k = len(h.folders)
    fig = Figure(figsize=(WIDTH, PANEL_HEIGHT * nrows + 1.3), layout="constrained")
    title = f"History of {h.scenario}" if h.scenario else "History"
    fig.suptitle(
        f"{title}: median time per call over {len(h.folders)} folders, with its {TIME_LEVEL:.0%} interval",
        fontweight="bold",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    sizes: list[str] = []
    for c in h.cases:
        if _size_text(c) not in sizes:
            sizes.append(_size_text(c))
    palette = [OKABE_ITO[c] for c in SIZE_COLOURS]
    colour = {s: palette[i % len(palette)] for i, s in enumerate(sizes)}
    marker = {s: PATTERN_STYLES[i % len(PATTERN_STYLES)][1] for i, s in enumerate(sizes)}
    steps = {(s.key, s.index): s for s in h.steps}
    step_colour = {SLOWER: OKABE_ITO["vermillion"], FASTER: OKABE_ITO["bluish_green"]}
    step_marker = {SLOWER: "^", FASTER: "v"}
    x = list(range(k))
    for n, (ax, (ptitle, cases)) in enumerate(zip(axes.flat, panels)):
        for c in cases:
            s = _size_text(c)
            ys = [p.time if p.ok else math.nan for p in c.points]
            lo = [p.time - p.interval.low if p.ok and p.interval else 0.0 for p in c.points]
            hi = [
                p.interval.high - p.time if p.ok and p.interval and math.isfinite(p.interval.high) else 0.0
                for p in c.points
            ]
            ax.errorbar(
                x,
                ys,
                yerr=[lo, hi],
                color=colour[s],
                marker=marker[s],
                markersize=4,
                linewidth=1.5,
                elinewidth=1.1,
                capsize=2.5,
                label=s,
                gid=f"history:{c.label}",
                zorder=3,
            )
            for i in range(k):
                st = steps.get((c.key, i))
                if st is None:
                    continue
                col = step_colour[st.direction]
                ax.plot(
                    [i],
                    [c.points[i].time],
                    linestyle="none",
                    marker=step_marker[st.direction],
                    markersize=11,
                    markerfacecolor="none",
                    markeredgecolor=col,
                    markeredgewidth=1.8,
                    zorder=5,
                    gid=f"step:{c.label}",
                )
                ax.annotate(
                    f"{st.ratio:.2f}x",
                    (i, c.points[i].time),
                    xytext=(-7, 0),
                    textcoords="offset points",
                    ha="right",
                    va="center",
                    fontsize=8,
                    fontweight="bold",
                    color=col,
                    zorder=6,
                    bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8),
                )
        ax.set_title(wrap_label(ptitle, width=48), fontsize=9, loc="left")
        ax.set_yscale("log")
        lo_y, hi_y = ax.get_ylim()
        ax.set_ylim(lo_y / 1.15, hi_y * 1.15)
        _decade_axis(ax.yaxis, ax.get_ylim(), format_time)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlim(-0.5, k - 0.5)
        ax.set_xticks(x)
        last_row = n >= len(panels) - ncols
        ax.set_xticklabels(
            [f.label for f in h.folders] if last_row else [],
            fontsize=8,
            rotation=30 if k > 4 else 0,
            ha="right" if k > 4 else "center",
        )
        if last_row:
            ax.set_xlabel(f"commit, {h.order.split(';')[0].split(' (')[0]}", fontsize=8)
        ax.grid(True, which="major", color="#dddddd", linewidth=0.8)
        ax.set_axisbelow(True)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("time (log scale)", fontsize=9)
    handles = [Line2D([], [], color=colour[s], marker=marker[s], markersize=4, linewidth=1.5, label=s) for s in sizes]
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker=step_marker[d],
            markersize=9,
            markerfacecolor="none",
            markeredgecolor=step_colour[d],
            markeredgewidth=1.8,
            label=f"{d} step (ratio to the folder before)",
        )
        for d in (SLOWER, FASTER)
        if any(s.direction == d for s in h.steps)
    ]
    handles.append(Line2D([], [], color=NEUTRAL, marker="|", markersize=8, linestyle="none", label="95% interval"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    return fig
