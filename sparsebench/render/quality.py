"""Quality beside speed, where a reader decides: how far each case is from full attention
(``recall_mean``, ``recall_min``, ``full_rel_err``, in backward mode ``full_grad_rel_err``), with
its speedup over dense beside it, as tables (summary.md, the terminal, report.html) and as the
figure ``quality_vs_speedup`` (speedup across, recall and rel. error up, the frontier drawn).

The figure is drawn by ``render.plots.fig_quality_vs_speedup`` from the data here.

The tables: one row per pattern and n (and inputs, where a run has more than one kind), the
quality figures of its backends' cases (the worst, where they differ) and a speedup column per
backend; patterns exempt from the figures (their mask is the model's semantics) in a table of
their own, each with its record's note. The figure's data are plain functions (``points``,
``frontier``, ``frontiers``) so that tests check what is drawn, not pixels. A run without
quality figures (an old folder, a decode run) gets neither tables nor figure. pandas is
imported inside the functions."""

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
# On i.i.d. random q and k attention is nearly uniform over a query's keys, so its recall is about the
# share of its keys it attends (row density: window 256 of 2048 causal, recall 0.384, mean share 0.385;
# the density column, nnz / n^2, is 0.117: "recall ~ density" would send a reader to the wrong number).
RANDOM_NOTE = "random inputs: recall ~ each query's share of keys attended (row density); see inputs: synthetic"
TITLE = "Quality against full attention"
EXEMPT_TITLE = "Without quality figures"
NOT_RECORDED = "no quality figures recorded (a run from before they were measured?)"
# the panels' dimensions besides the inputs (device, dtype, mode, causality, shape)
OTHER_DIMS = tuple(c for c in SHAPE_KEY if c != "inputs")
CAPTION = (
    "Each point is one pattern on one backend at one n (colour the pattern, marker the backend, larger"
    " markers larger n, a thin line joining a series' sizes), its speedup over dense sdpa across (log scale"
    " where the speedups span a wide range) against, on the left, the share of full attention's softmax"
    " mass its keys hold (recall, 1 at the dotted line is full attention) and, on the right, its output's"
    " relative error from full attention (0 is full attention), a ring around every point that no other"
    " point at its n beats on both speed and quality (the frontier at that n) and the frontier at the largest"
    " n dashed, so a point below and left of it gives up quality without buying speed."
)
CAPTION_RANDOM = (
    " (every point here ran on random inputs, whose attention is nearly uniform, so a pattern's recall is about"
    " the share of each query's keys it attends: inputs: synthetic shows what it keeps of concentrated attention)"
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


def tables(df) -> list:
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
            *(speedup_column(b) for b in shown),
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
        out.append(TableSpec(title, tuple(cols), tuple(body), _note_text(measured, kinds, backward, sampled, shown)))
    if exempt:
        groups: dict[tuple, list[QualityRow]] = {}
        for r in exempt:
            groups.setdefault((r.pattern_label, r.inputs, r.dims, r.note), []).append(r)
        body = []
        for (label, inputs, dvals, note), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            body.append(
                (
                    label,
                    *((inputs,) if several else ()),
                    *(dim_text(c, v) for c, v in zip(dims, dvals)),
                    _n_range([r.seq_len for r in rs]),
                    _best_speedup(rs),
                    str(note),
                )
            )
        semantic = any(r.note != NOT_RECORDED for r in exempt)
        out.append(
            TableSpec(
                EXEMPT_TITLE,
                (*lead, "n", "best speedup", "why"),
                tuple(body),
                "a pattern whose mask is the model's semantics (a document mask, a prefix-LM) is no approximation"
                " of full attention: its distance from it is no cost, and is not reported"
                if semantic
                else "these cases recorded no quality figures and no reason",
                wrap=(0, len(lead) + 2),
                left=(0, len(lead) + 2),
            )
        )
    return out


def speedup_column(backend: str) -> str:
    """A speedup column's header: on two lines in the terminal, one in Markdown and HTML."""
    return f"speedup\n{backend}"


def _best_speedup(rows: Sequence[QualityRow]) -> str:
    """ "11.5x (block_sparse, n=4096)": the best speedup of an exempt pattern's cases."""
    best = [(s, b, r.seq_len) for r in rows for b, s in r.speedups.items() if s is not None]
    if not best:
        return "-"
    s, b, n = max(best)
    return f"{s:.2f}x ({b}, n={n})"


def _sortable(values: Sequence[Any]) -> tuple:
    return tuple(str(v) for v in values)


def _note_text(measured: list[QualityRow], kinds: list[str], backward: bool, sampled: bool, shown) -> str:
    bits = [
        "recall: the share of full attention's softmax mass on the keys the case attended (mean over batch, heads"
        " and queries; min: the least query); rel. err: ||O - O_full|| / ||O_full|| (Frobenius) against full"
        " attention with the case's causality on the same inputs"
    ]
    if backward:
        bits.append("grad rel. err: the same norm over the query gradient")
    if sampled:
        bits.append("rows: the query rows the figures were computed on (all, or a sample at large n)")
    if any(len(r.speedups) > 1 for r in measured):
        bits.append("where a pattern's backends differ, the worst of their figures")
    if shown:
        bits.append("speedup <backend>: over dense sdpa at the same n, each backend's")
    if kinds == [RANDOM]:
        bits.append(RANDOM_NOTE)
    return "; ".join(bits) + "."


def markdown(df) -> str:
    """summary.md's quality section ('' when the run has no quality figures)."""
    from sparsebench.render.tables import markdown_section

    parts = []
    for i, t in enumerate(tables(df)):
        parts += markdown_section(t, "##" if i == 0 else "###")
    return "\n".join(parts)


def renderables(df) -> list:
    """The quality tables for the terminal (rich)."""
    from sparsebench.render.tables import rich_table

    return [rich_table(t) for t in tables(df)]


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
    each query's share of keys."""
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
