"""Quality beside speed, where a reader decides: how far each case is from full attention
(``recall_mean``, ``recall_min``, ``full_rel_err``, in backward mode ``full_grad_rel_err``), with
its speedup over dense beside it, as tables (summary.md, the terminal, report.html) and as the
figure ``quality_vs_speedup`` (speedup across, recall and rel. error up, the frontier drawn).

The tables: one row per pattern and n (and inputs, where a run has more than one kind), the
quality figures of its backends' cases (the worst, where they differ) and a speedup column per
backend; patterns exempt from the figures (their mask is the model's semantics) in a table of
their own, each with its record's note. The figure's data are plain functions (``points``,
``frontier``) so that tests check what is drawn, not pixels. A run without quality figures (an
old folder, a decode run) gets neither tables nor figure. pandas and matplotlib are imported
inside the functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from sparsebench.analysis.scaling import SHAPE_KEY, dim_text, ensure_derived, finite_or_none, iter_groups
from sparsebench.results.schema import BASELINE_BACKEND, BASELINE_PATTERN, DECODE

FIGURE = "quality_vs_speedup"
RECALL, ERROR = "recall_mean", "full_rel_err"
VALUES = ("recall_mean", "recall_min", "full_rel_err", "full_grad_rel_err")
HIGHER_IS_BETTER = {"recall_mean": True, "recall_min": True, "full_rel_err": False, "full_grad_rel_err": False}
RANDOM = "random"
RANDOM_NOTE = "random inputs: recall ~ density; see inputs: synthetic"
TITLE = "Quality against full attention"
EXEMPT_TITLE = "Without quality figures"
NOT_RECORDED = "no quality figures recorded (a run from before they were measured?)"
# the panels' dimensions besides the inputs (device, dtype, mode, causality, shape)
OTHER_DIMS = tuple(c for c in SHAPE_KEY if c != "inputs")
WIDE_SPEEDUPS = 10.0  # a log speedup axis where the largest speedup is this many times the smallest
BACKEND_MARKERS = {"block_sparse": "s", "flex": "^", "sdpa_masked": "D", "naive": "v", "sdpa": "o"}
SPARE_MARKERS = ("P", "X", "h", "*", "<", ">")
CAPTION = (
    "Each point is one pattern on one backend at one n (colour the pattern, marker the backend, larger"
    " markers larger n, a thin line joining a series' sizes), its speedup over dense sdpa across (log scale"
    " where the speedups span a wide range) against, on the left, the share of full attention's softmax"
    " mass its keys hold (recall, 1 at the dotted line is full attention) and, on the right, its output's"
    " relative error from full attention (0 is full attention), with the frontier at each n dashed through"
    " the points no other point at that n beats on both speed and quality, so a point below and left of a"
    " frontier gives up quality without buying speed."
)
CAPTION_RANDOM = (
    " (every point here ran on random inputs, whose attention is nearly uniform, so a pattern's recall is about"
    " its density: the inputs: synthetic scenario shows what it keeps of concentrated attention)"
)


# ----------------------------------------------------------------------------------------------
# which records


def _measured_rows(df):
    """The records the quality reports speak of: ok, not decode, not a model stack."""
    if df is None or len(df) == 0 or "status" not in df:
        return None
    rows = df[df["status"].astype(str) == "ok"]
    if "mode" in rows:
        rows = rows[rows["mode"].astype(str) != DECODE]
    if "model" in rows:
        rows = rows[rows["model"].isna()]
    return rows


def _value(r: Any, col: str) -> float | None:
    return finite_or_none(r.get(col)) if hasattr(r, "get") else None


def _note(r: Any) -> str | None:
    v = r.get("quality_note")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "" else str(v)


def has_quality(df) -> bool:
    """Whether the run recorded any quality figure or exemption note (else nothing is shown)."""
    rows = _measured_rows(df)
    if rows is None or rows.empty:
        return False
    cols = [c for c in (*VALUES, "quality_note") if c in rows]
    return bool(cols) and bool(rows[cols].notna().any().any())


def _inputs_of(rows) -> list[str]:
    return sorted({str(v) for v in rows["inputs"]}) if "inputs" in rows else [RANDOM]


# ----------------------------------------------------------------------------------------------
# tables


@dataclass(frozen=True)
class QualityRow:
    """One row of the quality table: a pattern at one n (with its inputs and setup), the worst
    quality figures over its backends' cases, and each backend's speedup."""

    pattern_label: str
    inputs: str
    dims: tuple[Any, ...]  # the values of the varying OTHER_DIMS
    seq_len: int
    density: float | None
    values: dict[str, float | None]  # VALUES
    rows: int | None  # quality_rows: the query rows the figures cover (the fewest of the backends')
    speedups: dict[str, float | None]  # by backend
    note: str | None = None  # quality_note, for an exempt row


def quality_rows(df) -> tuple[list[QualityRow], list[QualityRow], tuple[str, ...], tuple[str, ...]]:
    """(measured rows, exempt rows, the varying setup dimensions, the backends with a speedup
    column), from a results frame. Dense attention, the reference, has no row."""
    rows = _measured_rows(ensure_derived(df) if df is not None and len(df) else df)
    if rows is None or rows.empty or not has_quality(rows):
        return [], [], (), ()
    rows = rows[rows["pattern"].astype(str) != BASELINE_PATTERN]
    dims = tuple(c for c in OTHER_DIMS if c in rows and rows[c].astype(str).nunique() > 1)
    backends = tuple(sorted({str(b) for b in rows["backend"]}))
    measured, exempt = [], []
    for key, g in iter_groups(rows, ["pattern_label", "inputs", *dims, "seq_len"]):
        recs = g.to_dict("records")
        values = {c: _worst([_value(r, c) for r in recs], HIGHER_IS_BETTER[c]) for c in VALUES}
        counts = [int(v) for r in recs if (v := _value(r, "quality_rows")) is not None]
        row = QualityRow(
            pattern_label=str(key[0]),
            inputs=str(key[1]),
            dims=tuple(key[2:-1]),
            seq_len=int(key[-1]),
            density=_value(recs[0], "density"),
            values=values,
            rows=min(counts) if counts else None,
            speedups={str(r["backend"]): _value(r, "speedup") for r in recs},
        )
        if any(v is not None for v in values.values()):
            measured.append(row)
        else:
            notes = [n for r in recs if (n := _note(r))]
            exempt.append(_replace_note(row, notes[0] if notes else NOT_RECORDED))
    return measured, exempt, dims, backends


def _replace_note(row: QualityRow, note: str) -> QualityRow:
    from dataclasses import replace

    return replace(row, note=note)


def _worst(values: Sequence[float | None], higher_is_better: bool) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return min(vals) if higher_is_better else max(vals)


def recall_text(v: float | None) -> str:
    """0.8734 -> '0.873'; 1.0 -> '1'; 0.99996 -> '> 0.999' (never '1.000' for a recall below 1)."""
    if v is None:
        return "-"
    if v >= 1.0:
        return "1"
    return "> 0.999" if v > 0.999 else f"{v:.3f}"


def error_text(v: float | None) -> str:
    """A relative error, three significant digits: '0.231', '1.2e-06'."""
    return "-" if v is None else f"{v:.3g}"


def _speedup_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _rows_text(r: QualityRow) -> str:
    if r.rows is None:
        return "-"
    return "all" if r.rows >= r.seq_len else f"{r.rows} sampled"


def _n_range(ns: Sequence[int]) -> str:
    ns = sorted(set(ns))
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def tables(df, compact: bool = False) -> list:
    """The quality tables (render.tables.TableSpec): the measured one and, where the run has
    them, the exempt patterns with their notes. [] when the run has no quality figures."""
    from sparsebench.render.tables import TableSpec

    measured, exempt, dims, backends = quality_rows(df)
    if not measured and not exempt:
        return []
    kinds = sorted({r.inputs for r in (*measured, *exempt)})
    several = len(kinds) > 1
    title = TITLE + ("" if several else f" (inputs: {kinds[0]})")
    lead = ("pattern", *(("inputs",) if several else ()), *dims)
    out = []
    if measured:
        backward = any(r.values.get("full_grad_rel_err") is not None for r in measured)
        sampled = any(r.rows is not None and r.rows < r.seq_len for r in measured)
        shown = [b for b in backends if any(r.speedups.get(b) is not None for r in measured)]
        cols = (
            *lead,
            "n",
            "density",
            "recall mean",
            "recall min",
            "rel. err",
            *(("grad rel. err",) if backward else ()),
            *(("rows",) if sampled else ()),
            *(f"speedup {b}" if not compact else b for b in shown),
        )
        body = []
        for r in sorted(measured, key=lambda r: (r.pattern_label, r.inputs, _sortable(r.dims), r.seq_len)):
            body.append(
                (
                    r.pattern_label,
                    *((r.inputs,) if several else ()),
                    *(dim_text(c, v) for c, v in zip(dims, r.dims)),
                    str(r.seq_len),
                    "-" if r.density is None else f"{r.density:.4f}",
                    recall_text(r.values["recall_mean"]),
                    recall_text(r.values["recall_min"]),
                    error_text(r.values["full_rel_err"]),
                    *((error_text(r.values["full_grad_rel_err"]),) if backward else ()),
                    *((_rows_text(r),) if sampled else ()),
                    *(_speedup_text(r.speedups.get(b)) for b in shown),
                )
            )
        out.append(TableSpec(title, tuple(cols), tuple(body), _note_text(measured, kinds, backward, compact, shown)))
    if exempt:
        groups: dict[tuple, list[QualityRow]] = {}
        for r in exempt:
            groups.setdefault((r.pattern_label, r.inputs, r.dims, r.note), []).append(r)
        body = []
        for (label, inputs, dvals, note), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            ns = [r.seq_len for r in rs]
            best = [s for r in rs for s in r.speedups.values() if s is not None]
            body.append(
                (
                    label,
                    *((inputs,) if several else ()),
                    *(dim_text(c, v) for c, v in zip(dims, dvals)),
                    _n_range(ns),
                    _speedup_range(best),
                    str(note),
                )
            )
        out.append(
            TableSpec(
                EXEMPT_TITLE,
                (*lead, "n", "speedup", "why"),
                tuple(body),
                "a pattern whose mask is the model's semantics (a document mask, a prefix-LM) is no approximation"
                " of full attention: its distance from it is no cost, and is not reported",
                wrap=(0, len(lead) + 2),
            )
        )
    return out


def _speedup_range(vals: Sequence[float]) -> str:
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}x-{hi:.2f}x"


def _sortable(values: Sequence[Any]) -> tuple:
    return tuple(str(v) for v in values)


def _note_text(measured: list[QualityRow], kinds: list[str], backward: bool, compact: bool, shown) -> str:
    bits = [
        "recall: the share of full attention's softmax mass on the keys the case attended (mean over batch, heads"
        " and queries; min: the least query); rel. err: ||O - O_full|| / ||O_full|| (Frobenius) against full"
        " attention with the case's causality on the same inputs"
    ]
    if backward:
        bits.append("grad rel. err: the same norm over the query gradient")
    if len({r.seq_len for r in measured}) and any(len(r.speedups) > 1 for r in measured):
        bits.append("where a pattern's backends differ, the worst of their figures")
    if shown:
        bits.append(
            ("speedup columns: " if compact else "speedup <backend>: ")
            + "over dense sdpa at the same n, each backend's"
        )
    if kinds == [RANDOM]:
        bits.append(RANDOM_NOTE)
    return "; ".join(bits) + "."


def markdown(df) -> str:
    """summary.md's quality section ('' when the run has no quality figures)."""
    from sparsebench.render.tables import markdown_table

    specs = tables(df)
    if not specs:
        return ""
    parts = []
    for i, t in enumerate(specs):
        parts += [f"{'##' if i == 0 else '###'} {t.title}", "", markdown_table(t.columns, t.rows).rstrip("\n"), ""]
        if t.note:
            parts += [t.note, ""]
    return "\n".join(parts)


def renderables(df) -> list:
    """The quality tables for the terminal (rich)."""
    from sparsebench.render.tables import rich_table

    return [rich_table(t) for t in tables(df, compact=True)]


# ----------------------------------------------------------------------------------------------
# the figure's data


@dataclass(frozen=True)
class Point:
    """A case on the figure: its speedup over dense sdpa and one quality figure. ``reference``:
    dense sdpa itself, full attention by definition (1x; recall 1, error 0)."""

    pattern_label: str
    backend: str
    seq_len: int
    speedup: float
    value: float
    reference: bool = False


def panels(df) -> list[tuple[dict[str, Any], Any]]:
    """(the panel's setup: inputs and OTHER_DIMS, its rows) per inputs kind and setup, for the
    rows with a quality figure and a speedup."""
    rows = _measured_rows(ensure_derived(df) if df is not None and len(df) else df)
    if rows is None or rows.empty or "speedup" not in rows:
        return []
    keys = [c for c in SHAPE_KEY if c in rows]
    out = []
    for key, sub in iter_groups(rows, keys):
        if _points_of(sub, RECALL) or _points_of(sub, ERROR):
            out.append((dict(zip(keys, key)), sub))
    return out


def _points_of(sub, metric: str) -> list[Point]:
    out = []
    for r in sub.to_dict("records"):
        if str(r.get("pattern")) == BASELINE_PATTERN and str(r.get("backend")) == BASELINE_BACKEND:
            continue  # the reference, added by definition
        s, v = _value(r, "speedup"), _value(r, metric)
        if s is not None and s > 0 and v is not None:
            out.append(Point(str(r["pattern_label"]), str(r["backend"]), int(r["seq_len"]), s, v))
    return out


def points(sub, metric: str) -> list[Point]:
    """The panel's points for ``metric`` (recall_mean or full_rel_err), and at each n that has
    one the dense sdpa reference (1x; recall 1, error 0)."""
    pts = _points_of(sub, metric)
    ideal = 1.0 if HIGHER_IS_BETTER[metric] else 0.0
    refs = [Point(BASELINE_PATTERN, BASELINE_BACKEND, n, 1.0, ideal, True) for n in sorted({p.seq_len for p in pts})]
    return refs + pts


def frontier(pts: Sequence[Point], metric: str) -> list[Point]:
    """The points no other point beats on both axes (at least as fast and at least as good, and
    better in one), by speedup: higher speedup and higher recall, or lower error. Give it the
    points of one n: points at different n are no alternatives to each other."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0

    def beats(q: Point, p: Point) -> bool:
        qa, pa = sign * q.value, sign * p.value
        return q.speedup >= p.speedup and qa >= pa and (q.speedup > p.speedup or qa > pa)

    front = [p for p in pts if not any(beats(q, p) for q in pts)]
    unique: dict[tuple[float, float], Point] = {}
    for p in front:  # points in the same place (two backends of one pattern): one frontier vertex
        unique.setdefault((p.speedup, p.value), p)
    return sorted(unique.values(), key=lambda p: (p.speedup, -sign * p.value))


def frontiers(sub, metric: str) -> dict[int, list[Point]]:
    """The frontier at each n of a panel."""
    pts = points(sub, metric)
    return {n: frontier([p for p in pts if p.seq_len == n], metric) for n in sorted({p.seq_len for p in pts})}


def subtitle(df) -> str:
    """What inputs the figure's points used; for random inputs only, why their recall is about
    their density."""
    kinds = sorted({str(setup.get("inputs", RANDOM)) for setup, _ in panels(df)})
    if kinds == [RANDOM]:
        return RANDOM_NOTE
    return "inputs: " + ", ".join(kinds) + ("" if len(kinds) == 1 else " (one row of panels each)")


def caption(df=None) -> str:
    """report.html's sentence under the figure."""
    if (
        df is not None
        and [str(s.get("inputs", RANDOM)) for s, _ in panels(df)]
        and all(str(s.get("inputs", RANDOM)) == RANDOM for s, _ in panels(df))
    ):
        return CAPTION[:-1] + CAPTION_RANDOM + "."
    return CAPTION


# ----------------------------------------------------------------------------------------------
# the figure


def fig_quality_vs_speedup(df, analysis=None, styles=None):
    """Recall (left) and relative error (right) against full attention, against the speedup
    over dense sdpa, one row of panels per inputs kind and setup; None when no case has both a
    quality figure and a speedup."""
    found = panels(df)
    if not found:
        return None
    from matplotlib.figure import Figure

    from sparsebench.render.plots import BASELINE_COLOUR, PATTERN_COLOURS, WIDTH, _panel_title

    labels = sorted({p.pattern_label for _, sub in found for p in _points_of(sub, RECALL) + _points_of(sub, ERROR)})
    sparse = [lab for lab in labels if not lab.startswith(BASELINE_PATTERN)]
    colours = {lab: PATTERN_COLOURS[i % len(PATTERN_COLOURS)] for i, lab in enumerate(sparse)}
    colours.update({lab: BASELINE_COLOUR for lab in labels if lab.startswith(BASELINE_PATTERN)})
    backends = sorted({p.backend for _, sub in found for p in _points_of(sub, RECALL) + _points_of(sub, ERROR)})
    spare = iter(SPARE_MARKERS * 4)
    markers = {b: BACKEND_MARKERS.get(b) or next(spare) for b in backends}
    ns = sorted({p.seq_len for _, sub in found for p in points(sub, RECALL) + points(sub, ERROR)})

    fig = Figure(figsize=(WIDTH, 4.8 * len(found) + 2.4), layout="constrained")
    fig.suptitle(f"Quality against full attention vs speedup over dense sdpa\n{subtitle(df)}", fontweight="bold")
    axes = fig.subplots(len(found), 2, squeeze=False)
    for row_axes, (setup, sub) in zip(axes, found):
        where = f"inputs: {setup.get('inputs', RANDOM)} · {_panel_title(setup)}"
        for ax, metric in zip(row_axes, (RECALL, ERROR)):
            _panel(ax, sub, metric, where, colours, markers, ns)
    _legend(fig, axes, colours, markers, ns)
    return fig


def _size(n: int, ns: Sequence[int]) -> float:
    """A marker's area (points^2) for n: 30 at the smallest n of the figure, 220 at the largest."""
    if len(ns) < 2:
        return 90.0
    lo, hi = math.log2(ns[0]), math.log2(ns[-1])
    return 30.0 + 190.0 * (math.log2(n) - lo) / (hi - lo)


def _panel(ax, sub, metric: str, where: str, colours, markers, ns) -> None:
    from sparsebench.render.plots import BASELINE_COLOUR, NEUTRAL, _decade_axis, _n_text

    pts = points(sub, metric)
    real = [p for p in pts if not p.reference]
    recall = metric == RECALL
    for key in sorted({(p.pattern_label, p.backend) for p in real}):
        series = sorted((p for p in real if (p.pattern_label, p.backend) == key), key=lambda p: p.seq_len)
        colour = colours.get(key[0], NEUTRAL)
        if len(series) > 1:
            ax.plot(
                [p.speedup for p in series],
                [p.value for p in series],
                color=colour,
                linewidth=0.8,
                alpha=0.45,
                zorder=2,
                gid=f"series:{key[0]} · {key[1]}",
            )
        ax.scatter(
            [p.speedup for p in series],
            [p.value for p in series],
            s=[_size(p.seq_len, ns) for p in series],
            c=colour,
            marker=markers[key[1]],
            edgecolors="white",
            linewidths=0.6,
            alpha=0.9,
            zorder=4,
            gid=f"points:{key[0]} · {key[1]}",
        )
        last = series[-1]
        ax.annotate(
            _n_text(last.seq_len),
            (last.speedup, last.value),
            xytext=(5, 3),
            textcoords="offset points",
            fontsize=7,
            color=colour,
            zorder=6,
        )
    ideal = 1.0 if recall else 0.0
    ax.scatter([1.0], [ideal], s=160, marker="*", c=BASELINE_COLOUR, zorder=5, gid="reference")
    ax.annotate(
        "dense · sdpa (full attention)",
        (1.0, ideal),
        xytext=(6, -10 if recall else 6),
        textcoords="offset points",
        fontsize=7,
        color=BASELINE_COLOUR,
    )
    fronts = frontiers(sub, metric)
    on_front = [p for front in fronts.values() for p in front if not p.reference]
    if on_front:  # every point on the frontier at its own n: a ring
        ax.scatter(
            [p.speedup for p in on_front],
            [p.value for p in on_front],
            s=[_size(p.seq_len, ns) * 2.2 for p in on_front],
            facecolors="none",
            edgecolors=BASELINE_COLOUR,
            linewidths=1.0,
            zorder=5,
            gid=f"on_frontier:{metric}",
        )
    largest = max(fronts)
    front = fronts[largest]
    if len(front) > 1:  # the frontier at the largest n, drawn
        ax.plot(
            [p.speedup for p in front],
            [p.value for p in front],
            color=BASELINE_COLOUR,
            linestyle="--",
            linewidth=1.2,
            zorder=3,
            gid=f"frontier:{metric}:{largest}",
        )
    ax.axvline(1.0, color="#999999", linewidth=0.8, zorder=1)
    speedups = [p.speedup for p in pts]
    lo, hi = min(speedups), max(speedups)
    if hi / lo > WIDE_SPEEDUPS:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.25, hi * 1.25)
        _decade_axis(ax.xaxis, ax.get_xlim(), lambda v: f"{v:g}x")
        ax.set_xlabel("speedup over dense sdpa (x, log scale)")
    else:
        from matplotlib.ticker import FuncFormatter

        ax.set_xlim(0, hi * 1.12)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("speedup over dense sdpa (x; the axis starts at 0)")
    values = [p.value for p in pts]
    if recall:
        ax.axhline(1.0, color=BASELINE_COLOUR, linestyle=":", linewidth=1.2, zorder=1, gid="ideal")
        ax.set_ylim(0, 1.06)
        ax.set_ylabel("recall: share of full attention's mass kept\n(mean over queries; 1 = full attention)")
        ax.set_title(f"recall (higher is better)\n{where}", fontsize=9, loc="left")
    else:
        ax.set_ylim(0, max(values) * 1.1 or 1.0)
        ax.set_ylabel("relative error of the output vs full attention\n||O - O_full|| / ||O_full|| (0 = full)")
        ax.set_title(f"relative error (lower is better)\n{where}", fontsize=9, loc="left")
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


def _legend(fig, axes, colours, markers, ns) -> None:
    from matplotlib.lines import Line2D

    from sparsebench.render.plots import BASELINE_COLOUR, _n_text

    handles = [
        Line2D([], [], linestyle="none", marker="o", markersize=8, color=c, label=lab) for lab, c in colours.items()
    ]
    handles += [
        Line2D([], [], linestyle="none", marker=m, markersize=8, color="#555555", label=f"backend: {b}")
        for b, m in markers.items()
    ]
    handles.append(
        Line2D([], [], linestyle="none", marker="*", markersize=11, color=BASELINE_COLOUR, label="dense · sdpa")
    )
    shown = ns if len(ns) <= 4 else [ns[0], ns[len(ns) // 2], ns[-1]]
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=math.sqrt(_size(n, ns)),
            color="#bbbbbb",
            label=f"n = {_n_text(n)}",
        )
        for n in shown
    ]
    handles.append(
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor=BASELINE_COLOUR,
            label="ring: on the frontier at its n",
        )
    )
    handles.append(Line2D([], [], color=BASELINE_COLOUR, linestyle="--", label="dashed: the frontier at the largest n"))
    handles.append(Line2D([], [], color=BASELINE_COLOUR, linestyle=":", label="recall 1: full attention"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
