"""Figures of a result folder, drawn from its records (nothing is re-measured).

Each ``fig_*`` function takes the results frame and returns a matplotlib ``Figure`` (or None
when the frame holds nothing to draw), so tests can inspect its lines. ``render_all`` writes
them to ``<result>/plots/<name>.<fmt>``. Figures are built with ``matplotlib.figure.Figure``
(never pyplot): no global state, no GUI backend, the Agg/SVG canvases are picked at save time.

Encoding, the same in every figure: colour = backend (Okabe-Ito, colour-blind safe), line
style + marker = pattern, the dense sdpa baseline thick black; dashed = an analytic estimate
or an ideal, never a measurement. The decode figure draws one line per pattern and backend in
that encoding too (dense on sdpa thick black); a run with one decode implementation (one
backend, or an old run's own KV-cache decoder, backend "kv_cache") has colour = pattern there.

The masks figure is ``render.masks`` (its length, its marks); ``fig_masks`` is re-exported here,
and the quality-vs-speedup figure (``fig_quality_vs_speedup``, its data from ``render.quality``)
has colour = pattern and marker = backend, as a trade-off plot reads best.

Decode records (mode "decode") are drawn by ``per_token_latency_vs_context`` and left out of
``time_vs_seqlen`` (a decode step is one generated token, not one call over n tokens).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sparsebench.analysis.scaling import (
    SHAPE_KEY,
    Analysis,
    analyze,
    dim_text,
    ensure_derived,
    is_baseline_key,
    iter_groups,
    positive_mask,
)
from sparsebench.render.analysis import LEGACY_DECODE_BACKEND, above_ideal_text, exponent_caveat
from sparsebench.render.masks import fig_masks
from sparsebench.render.quality import RANDOM
from sparsebench.results.schema import BASELINE_PATTERN, DECODE, SERIES_KEY
from sparsebench.stats import fit_power
from sparsebench.units import format_bytes, format_time

FIGURES = ("time_vs_seqlen", "memory_vs_seqlen", "speedup_vs_seqlen", "kv_cache_vs_seqlen", "masks")
# Figures drawn only when the frame holds decode records.
DECODE_FIGURES = ("per_token_latency_vs_context",)
# Figures drawn only when the frame holds a model scenario's stack records (render/stack.py).
MODEL_FIGURES = ("model_stack",)
# Figures drawn only when the frame holds quality figures against full attention (render/quality.py).
QUALITY_FIGURES = ("quality_vs_speedup",)

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "black": "#000000",
}
BACKEND_COLOURS = {
    "sdpa": OKABE_ITO["blue"],
    "sdpa_masked": OKABE_ITO["sky_blue"],
    "block_sparse": OKABE_ITO["bluish_green"],
    "flex": OKABE_ITO["reddish_purple"],
    "naive": OKABE_ITO["vermillion"],
}
SPARE_COLOURS = (OKABE_ITO["orange"], "#7F7F7F", OKABE_ITO["yellow"])
# Decode figures: one colour per (non-dense) pattern, in this order.
PATTERN_COLOURS = (
    OKABE_ITO["blue"],
    OKABE_ITO["vermillion"],
    OKABE_ITO["bluish_green"],
    OKABE_ITO["reddish_purple"],
    OKABE_ITO["orange"],
    OKABE_ITO["sky_blue"],
    "#7F7F7F",
)
BASELINE_COLOUR = OKABE_ITO["black"]
NEUTRAL = "#555555"
# "--" is kept for estimates and ideals; patterns get the others, each with its own marker.
PATTERN_STYLES = (
    ("-", "o"),
    ("-.", "s"),
    (":", "^"),
    ((0, (3, 1, 1, 1, 1, 1)), "D"),
    ((0, (1, 1)), "v"),
    ((0, (5, 1, 1, 1)), "P"),
    ((0, (8, 2)), "X"),
    ((0, (2, 2, 6, 2)), "*"),
)
LEGEND_FONT = 8
PANEL_HEIGHT = 4.3
WIDTH = 11.5


# ----------------------------------------------------------------------------------------------
# styles


@dataclass(frozen=True)
class Styles:
    colours: dict[str, str]
    patterns: dict[str, tuple[Any, str]]

    def colour(self, backend: str) -> str:
        return self.colours.get(backend, NEUTRAL)

    def pattern_colour(self, label: str) -> str:
        """Decode figures: dense black, every other pattern its own colour."""
        if label.startswith(BASELINE_PATTERN):
            return BASELINE_COLOUR
        others = [lab for lab in self.patterns if not lab.startswith(BASELINE_PATTERN)]
        i = others.index(label) if label in others else len(others)
        return PATTERN_COLOURS[i % len(PATTERN_COLOURS)]

    def decode_line(self, label: str) -> dict[str, Any]:
        ls, marker = self.pattern(label)
        if label.startswith(BASELINE_PATTERN):
            return dict(color=BASELINE_COLOUR, linestyle="-", marker="o", linewidth=3.0, markersize=6, zorder=4)
        return dict(
            color=self.pattern_colour(label), linestyle=ls, marker=marker, linewidth=1.8, markersize=6, zorder=3
        )

    def pattern(self, label: str) -> tuple[Any, str]:
        return self.patterns.get(label, PATTERN_STYLES[0])

    def line(self, pattern_label: str, backend: str, baseline: bool = False) -> dict[str, Any]:
        ls, marker = self.pattern(pattern_label)
        if baseline:
            return dict(color=BASELINE_COLOUR, linestyle="-", marker="o", linewidth=3.0, markersize=6, zorder=5)
        return dict(color=self.colour(backend), linestyle=ls, marker=marker, linewidth=1.8, markersize=5, zorder=3)


def styles_for(df) -> Styles:
    """One colour per backend, one (line style, marker) per pattern label, dense first."""
    backends = sorted(str(b) for b in df["backend"].dropna().unique()) if "backend" in df else []
    colours = {}
    spare = iter(SPARE_COLOURS * 4)
    for b in backends:
        colours[b] = BACKEND_COLOURS.get(b) or next(spare)
    labels = sorted({str(x) for x in df["pattern_label"].dropna().unique()}) if "pattern_label" in df else []
    labels.sort(key=lambda lab: (not lab.startswith(BASELINE_PATTERN), lab))
    patterns = {lab: PATTERN_STYLES[i % len(PATTERN_STYLES)] for i, lab in enumerate(labels)}
    return Styles(colours, patterns)


# ----------------------------------------------------------------------------------------------
# figures


def fig_time_vs_seqlen(df, analysis: Analysis | None = None, styles: Styles | None = None):
    """Median time against n, log-log, one line per series, fitted exponent in the legend."""
    df = ensure_derived(df)
    ok = df[(df["status"] == "ok") & positive_mask(df, "time_median_s") & ~_decode_mask(df)]
    if ok.empty:
        return None  # nothing, or only decode records (per_token_latency_vs_context draws those)
    analysis = analysis or analyze(df)
    fits = analysis.by_key()
    styles = styles or styles_for(df)
    fig, panels = _figure(ok, "Median time per call vs sequence length")
    for ax, sub, title in panels:
        floor_shown = False
        for key, g in _ordered_series(sub):
            g = g.sort_values("seq_len")
            s = fits.get(key)
            base = is_baseline_key(key)
            suffix = ""
            if s and s.time_fit:
                suffix += exponent_legend(s.time_fit)
            elif s and len(set(s.sizes)) == 1:
                suffix += "  (one size: no fit)"
            if s and s.failure:
                suffix += f"; {s.failure.status} at n={_n_text(s.failure.seq_len)}"
            label = wrap_label(_short(key) + (" (baseline)" if base else ""), suffix)
            style = styles.line(key[0], key[1], base)
            ax.plot(g["seq_len"], g["time_median_s"], label=label, gid=f"time:{_short(key)}", **style)
            excluded = set(s.time_fit.excluded) if s and s.time_fit else set()
            if excluded:
                e = g[g["seq_len"].isin(excluded)]
                ax.plot(
                    e["seq_len"],
                    e["time_median_s"],
                    linestyle="none",
                    marker=style["marker"],
                    markersize=style["markersize"] + 1,
                    markerfacecolor="white",
                    markeredgecolor=style["color"],
                    zorder=style["zorder"] + 1,
                    label="_floor",
                )
                floor_shown = True
        _guides(ax, sub)
        finish_axes(ax, title, _xlabel(sub), "median time per call", y="time")
        extra = []
        if floor_shown:
            from matplotlib.lines import Line2D

            extra.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="o",
                    markerfacecolor="white",
                    markeredgecolor=NEUTRAL,
                    label="hollow: overhead floor, not fitted",
                )
            )
        outside_legend(ax, extra)
    return fig


def fig_per_token_latency_vs_context(df, analysis: Analysis | None = None, styles: Styles | None = None):
    """Decode: median time per generated token against the context length, log-log, one line
    per pattern and backend, the fitted exponent in the legend (dense should read ~1, a window ~0).

    The exponent is fitted over every context length: ``analyze`` leaves out leading sizes
    that grow slower than n^0.5 as an overhead floor, but a flat per-token latency is what a
    bounded cache should show, not overhead."""
    df = ensure_derived(df)
    ok = df[(df["status"] == "ok") & positive_mask(df, "time_median_s") & _decode_mask(df)]
    if ok.empty:
        return None
    analysis = analysis or analyze(df)
    summaries = analysis.by_key()
    styles = styles or styles_for(df)
    fig, panels = _figure(ok, "Decode: time per generated token vs context length")
    # one decode implementation (one backend, or an old run's kv_cache decoder): colour = pattern
    by_pattern = ok["backend"].astype(str).nunique() == 1
    for ax, sub, title in panels:
        for key, g in _ordered_series(sub):
            g = g.sort_values("seq_len")
            s = summaries.get(key)
            fit = fit_power(g["seq_len"], g["time_median_s"], floor_slope=-math.inf)
            name = _decode_name(key)
            suffix = ""
            if fit:
                suffix += exponent_legend(fit)
            elif g["seq_len"].nunique() == 1:
                suffix += "  (one size: no fit)"
            if s and s.failure:
                suffix += f"; {s.failure.status} at n={_n_text(s.failure.seq_len)}"
            if by_pattern:
                style = styles.decode_line(str(key[0]))
            else:
                style = styles.line(str(key[0]), str(key[1]), baseline=is_baseline_key(key))
            ax.plot(g["seq_len"], g["time_median_s"], label=wrap_label(name, suffix), gid=f"latency:{name}", **style)
        _guides(ax, sub, ((0, "O(1) guide", (0, (4, 4))), (1, "O(n) guide", (0, (1, 3)))))
        finish_axes(ax, title, _xlabel(sub), "median time per generated token", y="time")
        from matplotlib.lines import Line2D

        outside_legend(
            ax,
            [
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    label="n: tokens in the KV cache before the step\nexponent fitted over every n [95% CI]",
                )
            ],
        )
    return fig


def fig_memory_vs_seqlen(df, analysis: Analysis | None = None, styles: Styles | None = None):
    """Measured peak memory against n, log-log; the analytic estimate dashed."""
    df = ensure_derived(df)
    ok = df[(df["status"] == "ok") & positive_mask(df, "peak_mem_bytes")]
    if ok.empty:
        return None
    analysis = analysis or analyze(df)
    fits = analysis.by_key()
    styles = styles or styles_for(df)
    fig, panels = _figure(ok, "Peak memory vs sequence length")
    for ax, sub, title in panels:
        any_est = False
        drawn: set[tuple] = set()  # (colour, points) of the estimates drawn: equal ones once
        for key, g in _ordered_series(sub):
            g = g.sort_values("seq_len")
            s = fits.get(key)
            base = is_baseline_key(key)
            suffix = exponent_legend(s.mem_fit) if s and s.mem_fit else ""
            label = wrap_label(_short(key) + (" (baseline)" if base else ""), suffix)
            style = styles.line(key[0], key[1], base)
            ax.plot(g["seq_len"], g["peak_mem_bytes"], label=label, gid=f"memory:{_short(key)}", **style)
            est = g[positive_mask(g, "est_mem_bytes")]
            points = (style["color"], tuple(zip(est["seq_len"].tolist(), est["est_mem_bytes"].tolist())))
            if len(est) and points not in drawn:
                drawn.add(points)
                ax.plot(
                    est["seq_len"],
                    est["est_mem_bytes"],
                    color=style["color"],
                    linestyle="--",
                    linewidth=1.2,
                    alpha=0.85,
                    zorder=2,
                    label=f"{_short(key)} (estimate)",
                    gid=f"estimate:{_short(key)}",
                )
                any_est = True
        finish_axes(ax, title, _xlabel(sub), "peak memory", y="bytes")
        extra = []
        if any_est:
            from matplotlib.lines import Line2D

            extra.append(
                Line2D(
                    [],
                    [],
                    color=NEUTRAL,
                    linestyle="--",
                    linewidth=1.2,
                    label="dashed, no markers: analytic estimate\n(in its backend's colour)",
                )
            )
        outside_legend(ax, extra, skip=("(estimate)",))
    return fig


def fig_speedup_vs_seqlen(df, analysis: Analysis | None = None, styles: Styles | None = None):
    """Speedup over dense sdpa per series; the ideal speedup (from nnz) dashed; a line at 1."""
    import numpy as np

    df = ensure_derived(df)
    ok = df[(df["status"] == "ok") & np.isfinite(df["speedup"].astype(float))]
    ok = ok[[not is_baseline_key(k) for k in _keys(ok)]] if len(ok) else ok
    if ok.empty:
        return None
    analysis = analysis or analyze(df)
    summaries = analysis.by_key()
    styles = styles or styles_for(df)
    fig, panels = _figure(ok, "Speedup over dense sdpa vs sequence length")
    for ax, sub, title in panels:
        ax.axhline(
            1.0, color=BASELINE_COLOUR, linewidth=2.5, zorder=4, label="dense · sdpa baseline (= 1x)", gid="baseline"
        )
        above_shown = False
        for key, g in _ordered_series(sub):
            g = g.sort_values("seq_len")
            dense_path = str(key[0]) == BASELINE_PATTERN
            name = _short(key) + (f" ({key[1]}'s own dense path)" if dense_path else "")
            style = styles.line(key[0], key[1])
            ax.plot(g["seq_len"], g["speedup"], label=wrap_label(name), gid=f"speedup:{_short(key)}", **style)
            # a ring on every point above the pattern's ideal speedup
            above = g[g["speedup"].astype(float) > g["ideal_speedup"].astype(float)] if not dense_path else g.iloc[0:0]
            if len(above):
                above_shown = True
                ax.plot(
                    above["seq_len"],
                    above["speedup"],
                    linestyle="none",
                    marker="o",
                    markersize=13,
                    markerfacecolor="none",
                    markeredgecolor=OKABE_ITO["vermillion"],
                    markeredgewidth=1.6,
                    zorder=6,
                    label="_above",
                    gid=f"above_ideal:{_short(key)}",
                )
        for lab, g in sub.groupby("pattern_label", sort=True):
            if str(lab).startswith(BASELINE_PATTERN):
                continue
            g = g.drop_duplicates("seq_len").sort_values("seq_len")
            g = g[np.isfinite(g["ideal_speedup"].astype(float))]
            if len(g):
                ax.plot(
                    g["seq_len"],
                    g["ideal_speedup"],
                    color=NEUTRAL,
                    linestyle="--",
                    linewidth=1.2,
                    marker=styles.pattern(str(lab))[1],
                    markersize=3,
                    alpha=0.9,
                    zorder=2,
                    label=wrap_label(f"ideal (nnz): {lab}"),
                    gid=f"ideal:{lab}",
                )
        finish_axes(ax, title, _xlabel(sub), "speedup over dense sdpa (x)", y="ratio")
        extra = []
        if above_shown:
            from matplotlib.lines import Line2D

            extra.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="o",
                    markersize=9,
                    markerfacecolor="none",
                    markeredgecolor=OKABE_ITO["vermillion"],
                    label="ring: above its ideal speedup",
                )
            )
        outside_legend(ax, extra)
        text = above_ideal_text([summaries[k] for k, _ in _ordered_series(sub) if k in summaries])
        if text:  # said in words under the panel, where it happens
            ax.text(
                0.0,
                -0.16,
                "\n".join(textwrap.wrap(text, 150)),
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=8,
                color=OKABE_ITO["vermillion"],
                gid="above_ideal_note",
            )
    return fig


def fig_kv_cache_vs_seqlen(df, analysis: Analysis | None = None, styles: Styles | None = None):
    """KV-cache bytes a decoder must keep, per pattern, against the context length.

    Where decode records carry ``cache_bytes_measured`` (the K/V tensors the decoder actually
    allocated), a panel shows those as markers on a light solid band and the analytic bytes as a
    dashed line through them; otherwise it shows the analytic bytes alone, one line per pattern.
    """
    df = ensure_derived(df)
    kv = df[positive_mask(df, "kv_cache_bytes") | positive_mask(df, "cache_bytes_measured")]
    if kv.empty:
        return None
    styles = styles or styles_for(df)
    dims = ("dtype", "batch", "heads", "head_dim")
    from matplotlib.figure import Figure

    groups = list(iter_groups(kv, dims))
    measured_any = bool(positive_mask(kv, "cache_bytes_measured").any())
    fig = Figure(
        figsize=(WIDTH, sum(_panel_height(sub, "pattern_label") for _, sub in groups) + 0.3), layout="constrained"
    )
    fig.suptitle(
        "KV-cache a decoder must keep vs context length" + (": measured and analytic" if measured_any else ""),
        fontweight="bold",
    )
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, (key, sub) in zip(axes, groups):
        row = dict(zip(dims, key))
        title = " · ".join([str(row["dtype"]), f"B={row['batch']} H={row['heads']} D={row['head_dim']}"])
        measured = sub[positive_mask(sub, "cache_bytes_measured") & (sub["status"] == "ok")]
        if len(measured):
            _kv_measured_panel(ax, sub, measured, styles)
            finish_axes(ax, title + " · one layer", "context length (tokens)", "K/V cache size", y="bytes")
            from matplotlib.lines import Line2D

            extra = [
                Line2D(
                    [],
                    [],
                    color=NEUTRAL,
                    linestyle="-",
                    linewidth=4,
                    alpha=0.35,
                    marker="o",
                    markerfacecolor=NEUTRAL,
                    markeredgecolor=NEUTRAL,
                    label="markers on a band: measured (K/V tensors allocated)",
                ),
                Line2D([], [], color=NEUTRAL, linestyle="--", label="dashed: analytic (2·B·H·D·bytes·kept tokens)"),
            ]
            outside_legend(ax, extra, skip=("(analytic)",))
            continue
        labels = sorted(
            sub["pattern_label"].astype(str).unique(), key=lambda lab: (not lab.startswith(BASELINE_PATTERN), lab)
        )
        drawn: list[tuple[str, Any]] = []
        for lab in labels:
            g = sub[sub["pattern_label"] == lab].drop_duplicates("seq_len").sort_values("seq_len")
            g = g[positive_mask(g, "kv_cache_bytes")]
            if g.empty:
                continue
            ls, marker = styles.pattern(lab)
            dense = lab.startswith(BASELINE_PATTERN)
            under = _coinciding(g, drawn)
            text = _kv_text(lab, g) + (f"; on the line of {under.split('(')[0]}" if under else "")
            # a line drawn over an equal one gets open, larger markers: both stay visible
            ax.plot(
                g["seq_len"],
                g["kv_cache_bytes"],
                label=wrap_label(text, width=72),
                gid=f"kv:{lab}",
                color=BASELINE_COLOUR if dense else styles.pattern_colour(lab),
                linestyle=ls,
                marker=marker,
                markersize=10 if under else 6,
                markerfacecolor="none" if under else None,
                markeredgewidth=1.6 if under else None,
                linewidth=3.0 if dense else 1.8,
                zorder=2 if dense else 3,
            )
            drawn.append((lab, g))
        finish_axes(ax, title, "context length (tokens)", "KV-cache size", y="bytes")
        outside_legend(ax)
    return fig


def _coinciding(g, drawn: list[tuple[str, Any]], rel: float = 0.03) -> str | None:
    """The label of the first drawn series with the same sizes and bytes within ``rel`` at every
    size (on a log axis the two lines would lie on top of each other), else None."""
    import numpy as np

    x = g["seq_len"].to_numpy()
    y = g["kv_cache_bytes"].to_numpy(dtype=float)
    for lab, h in drawn:
        if len(h) == len(g) and (h["seq_len"].to_numpy() == x).all():
            if np.all(np.abs(h["kv_cache_bytes"].to_numpy(dtype=float) / y - 1.0) <= rel):
                return lab
    return None


def _kv_text(lab: str, g) -> str:
    """The pattern label, and whether its cache is bounded (from the last two sizes)."""
    text = lab
    if "kv_retained" in g and len(g) > 1:
        r = g["kv_retained"].astype(float).tolist()
        if r[-1] == r[-2] and r[-1] < float(g["seq_len"].iloc[-1]):
            text += f" (bounded: {int(r[-1])} tokens)"
        else:
            text += " (grows with n)"
    return text


def _kv_measured_panel(ax, sub, measured, styles: Styles) -> None:
    """Per pattern: measured bytes as opaque markers on a light solid band (gid kv_measured:),
    analytic bytes of the same records dashed through them (gid kv:), in the pattern's colour.
    Where the two agree the dashes run through the markers. A pattern of the panel with no
    measured record (no decode run, or its decode failed) keeps its analytic line."""
    from matplotlib.colors import to_rgba

    labels = sorted(
        sub["pattern_label"].astype(str).unique(), key=lambda lab: (not lab.startswith(BASELINE_PATTERN), lab)
    )
    for lab in labels:
        g = measured[measured["pattern_label"] == lab].drop_duplicates("seq_len").sort_values("seq_len")
        colour = styles.pattern_colour(lab)
        marker = styles.decode_line(lab)["marker"]
        dense = lab.startswith(BASELINE_PATTERN)
        if g.empty:
            a = sub[(sub["pattern_label"] == lab) & positive_mask(sub, "kv_cache_bytes")]
            a = a.drop_duplicates("seq_len").sort_values("seq_len")
            if len(a):
                ax.plot(
                    a["seq_len"],
                    a["kv_cache_bytes"],
                    color=colour,
                    linestyle="--",
                    linewidth=1.3,
                    zorder=4,
                    label=wrap_label(_kv_text(lab, a) + "; analytic only, nothing measured", width=60),
                    gid=f"kv:{lab}",
                )
            continue
        policy = ""
        if "cache_policy" in g and g["cache_policy"].notna().any():
            policy = str(g["cache_policy"].dropna().iloc[-1]).split(" (")[0]
        text = _kv_text(lab, g) + (f"; cache {policy}" if policy else "")
        ax.plot(
            g["seq_len"],
            g["cache_bytes_measured"],
            label=wrap_label(text, width=60),
            gid=f"kv_measured:{lab}",
            color=to_rgba(colour, 0.35),
            linestyle="-",
            linewidth=6.0 if dense else 4.0,
            marker=marker,
            markersize=10 if dense else 7,
            markerfacecolor=colour,
            markeredgecolor=colour,
            zorder=2 if dense else 3,
        )  # dense larger and below: a pattern that equals it leaves a rim
        a = g[positive_mask(g, "kv_cache_bytes")]
        if len(a):
            ax.plot(
                a["seq_len"],
                a["kv_cache_bytes"],
                color=colour,
                linestyle="--",
                linewidth=1.3,
                zorder=4,
                label=f"{lab} (analytic)",
                gid=f"kv:{lab}",
            )


def fig_model_stack(df, analysis=None, styles=None):
    """Time, peak memory and KV cache of each model stack against n: the model as shipped
    (solid) and its all-dense twin (dashed), one row of three panels per backend and shape."""
    from sparsebench.render.stack import ALL_DENSE, pairs

    found = pairs(df)
    if not found:
        return None
    from matplotlib.figure import Figure

    rows: dict[tuple, list] = {}
    for shape, shipped, dense in found:
        rows.setdefault(tuple(shape[k] for k in ("backend", "device", "dtype", "mode", "batch")), []).append(
            (shape, shipped, dense)
        )
    colours = list(OKABE_ITO.values())
    models = sorted({shape["model"] for shape, _, _ in found})
    fig = Figure(figsize=(WIDTH + 2, 3.9 * len(rows) + 0.9), layout="constrained")
    fig.suptitle("A model's attention stack as shipped (solid) and all-dense (dashed) vs n", fontweight="bold")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    panels = (
        ("time_median_s", "time of the stack (one forward pass)", "time", "time"),
        ("peak_mem_bytes", "peak memory (measured)", "peak memory", "bytes"),
        ("stack_kv_bytes", "KV cache of every layer", "KV cache", "bytes"),
    )
    for row_axes, (key, entries) in zip(axes, rows.items()):
        where = " · ".join(str(k) for k in key[:4]) + f" · B={key[4]}"
        for ax, (col, title, ylabel, y) in zip(row_axes, panels):
            for shape, shipped, dense in entries:
                colour = colours[models.index(shape["model"]) % len(colours)]
                heads = f"H={shape['heads']}, D={shape['head_dim']}"
                for rows_, name, ls, marker in ((shipped, "as shipped", "-", "o"), (dense, ALL_DENSE, "--", "s")):
                    g = rows_[rows_[col].notna()] if col in rows_ else rows_.iloc[0:0]
                    if g.empty:
                        continue
                    ax.plot(
                        g["seq_len"],
                        g[col].astype(float),
                        color=colour,
                        linestyle=ls,
                        marker=marker,
                        linewidth=1.8,
                        label=f"{shape['model']} {name} ({heads})",
                        gid=f"stack:{shape['model']}:{name}:{col}",
                    )
            finish_axes(ax, f"{title}\n{where}", "sequence length n (tokens)", ylabel, y=y)
    seen: dict[str, Any] = {}
    for ax in axes[:, 0]:
        handles, labels = ax.get_legend_handles_labels()
        seen.update(zip(labels, handles))
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------------------------
# quality against full attention vs speedup (the data: render/quality.py)


# marker per backend in the quality figure (its colour is the pattern's)
QUALITY_MARKERS = {"block_sparse": "s", "flex": "^", "sdpa_masked": "D", "naive": "v", "sdpa": "o"}
SPARE_QUALITY_MARKERS = ("P", "X", "h", "*", "<", ">")
WIDE_SPEEDUPS = 10.0  # a log speedup axis where the largest speedup is this many times the smallest


def fig_quality_vs_speedup(df, analysis=None, styles=None):
    """Recall (left) and relative error (right) against full attention, against the speedup
    over dense sdpa, one row of panels per inputs kind and setup; None when no case has both a
    quality figure and a speedup."""
    from sparsebench.render.quality import ERROR, RECALL, _points_of, panels, points, subtitle

    found = panels(df)
    if not found:
        return None
    from matplotlib.figure import Figure

    labels = sorted({p.pattern_label for _, sub in found for p in _points_of(sub, RECALL) + _points_of(sub, ERROR)})
    sparse = [lab for lab in labels if not lab.startswith(BASELINE_PATTERN)]
    colours = {lab: PATTERN_COLOURS[i % len(PATTERN_COLOURS)] for i, lab in enumerate(sparse)}
    colours.update({lab: BASELINE_COLOUR for lab in labels if lab.startswith(BASELINE_PATTERN)})
    backends = sorted({p.backend for _, sub in found for p in _points_of(sub, RECALL) + _points_of(sub, ERROR)})
    spare = iter(SPARE_QUALITY_MARKERS * 4)
    markers = {b: QUALITY_MARKERS.get(b) or next(spare) for b in backends}
    ns = sorted({p.seq_len for _, sub in found for p in points(sub, RECALL) + points(sub, ERROR)})

    fig = Figure(figsize=(WIDTH, 4.8 * len(found) + 2.4), layout="constrained")
    fig.suptitle(f"Quality against full attention vs speedup over dense sdpa\n{subtitle(df)}", fontweight="bold")
    axes = fig.subplots(len(found), 2, squeeze=False)
    for row_axes, (setup, sub) in zip(axes, found):
        where = _panel_title(setup, inputs=True)
        for ax, metric in zip(row_axes, (RECALL, ERROR)):
            _quality_panel(ax, sub, metric, where, colours, markers, ns)
    _quality_legend(fig, colours, markers, ns)
    return fig


def _quality_size(n: int, ns: Sequence[int]) -> float:
    """A marker's area (points^2) for n: 30 at the smallest n of the figure, 220 at the largest."""
    if len(ns) < 2:
        return 90.0
    lo, hi = math.log2(ns[0]), math.log2(ns[-1])
    return 30.0 + 190.0 * (math.log2(n) - lo) / (hi - lo)


def _quality_panel(ax, sub, metric: str, where: str, colours, markers, ns) -> None:
    from sparsebench.render.quality import RECALL, frontiers, points

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
            s=[_quality_size(p.seq_len, ns) for p in series],
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
    ax.scatter([1.0], [ideal], s=160, marker="*", c=BASELINE_COLOUR, zorder=5, gid="reference", clip_on=False)
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
            s=[_quality_size(p.seq_len, ns) * 2.2 for p in on_front],
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


def _quality_legend(fig, colours, markers, ns) -> None:
    from matplotlib.lines import Line2D

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
            markersize=math.sqrt(_quality_size(n, ns)),
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


FIGURE_FUNCTIONS = {
    "time_vs_seqlen": fig_time_vs_seqlen,
    "per_token_latency_vs_context": fig_per_token_latency_vs_context,
    "memory_vs_seqlen": fig_memory_vs_seqlen,
    "speedup_vs_seqlen": fig_speedup_vs_seqlen,
    "kv_cache_vs_seqlen": fig_kv_cache_vs_seqlen,
    "masks": fig_masks,
    "model_stack": fig_model_stack,
    "quality_vs_speedup": fig_quality_vs_speedup,
}


def figure_caption(stem: str, df=None) -> str | None:
    """The caption report.html puts under a figure this module knows better than its fixed
    table does (render.html.figure_caption's hook): the model stack figure's, the quality figure's
    (which says when every point ran on random inputs); else None."""
    from sparsebench.render import quality, stack

    if stem == quality.FIGURE:
        return quality.caption(df)
    return stack.CAPTION if stem == "model_stack" else None


def render_all(
    folder: Path, df, formats: Sequence[str] = ("png", "svg"), analysis: Analysis | None = None
) -> list[Path]:
    """Write every figure that has data to ``folder/plots`` in each format; return the paths.

    A figure with nothing to draw is not written, and a file of that name left in ``plots/``
    by an earlier render (in a format written now) is removed, so the folder never shows a
    stale figure beside fresh ones."""
    out_dir = Path(folder) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    df = ensure_derived(df)
    analysis = analysis or analyze(df)
    styles = styles_for(df)
    written = []
    for name, func in FIGURE_FUNCTIONS.items():
        fig = func(df, analysis=analysis, styles=styles)
        if fig is None:
            for fmt in formats:
                (out_dir / f"{name}.{fmt}").unlink(missing_ok=True)
            continue
        for fmt in formats:
            written.append(save(fig, out_dir / f"{name}.{fmt}"))
    return written


def save(fig, path: Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {"Date": None} if fmt == "svg" else ({"Software": "sparsebench"} if fmt == "png" else None)
    fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# helpers


def _decode_mask(df):
    """True for the decode records of ``df``."""
    import pandas as pd

    if "mode" not in df:
        return pd.Series(False, index=df.index)
    return df["mode"].astype(str) == DECODE


def _decode_name(key: Sequence[Any]) -> str:
    """A decode series by its pattern and backend; an old run's (backend "kv_cache", its one
    decoder) by its pattern."""
    return str(key[0]) if key[1] == LEGACY_DECODE_BACKEND else _short(key)


def _keys(df) -> list[tuple]:
    return [tuple(r) for r in df[list(SERIES_KEY)].itertuples(index=False, name=None)]


def _short(key: Sequence[Any]) -> str:
    return f"{key[0]} · {key[1]}"


def exponent_legend(fit) -> str:
    """A legend's exponent: "  ∝ n^1.98 [1.91, 2.05]" (mathtext), and beside it why it is not a
    finding where it is not ("too noisy", "too few sizes": scaling.fit_status decides)."""
    text = f"  $\\propto n^{{{fit.exponent:.2f}}}$"
    if fit.ci_low is not None:
        text += f" [{fit.ci_low:.2f}, {fit.ci_high:.2f}]"
    caveat = exponent_caveat(fit)
    return text + (f" {caveat}" if caveat else "")


def wrap_label(text: str, suffix: str = "", width: int = 44) -> str:
    """Wrap a long legend label at its commas; ``suffix`` (mathtext) is never split."""
    lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]
    if suffix:
        if len(lines[-1]) + len(suffix) <= 78:  # the mathtext source is ~12 chars longer than drawn
            lines[-1] += suffix
        else:
            lines.append("  " + suffix.strip())
    return "\n".join(lines)


def _ordered_series(sub):
    """Series of a panel, the baseline first, then by pattern and backend."""
    items = list(iter_groups(sub, SERIES_KEY))
    items.sort(
        key=lambda kg: (
            not is_baseline_key(kg[0]),
            not str(kg[0][0]).startswith(BASELINE_PATTERN),
            str(kg[0][0]),
            str(kg[0][1]),
        )
    )
    return items


def _kv_heads(row: dict) -> str:
    """ "/8 KV" after the heads of a grouped-query panel (fewer key/value heads than heads), else ""."""
    kv = row.get("kv_heads", row["heads"])
    return "" if kv == row["heads"] else f"/{kv} KV"


def _panel_title(row: dict, inputs: bool = False) -> str:
    """The panel's setup in words; with ``inputs``, led by "inputs: KIND" (where a figure's
    panels differ by their inputs, or its inputs are not the default random ones)."""
    bits = [
        *([f"inputs: {row.get('inputs', RANDOM)}"] if inputs else []),
        str(row["device"]),
        str(row["dtype"]),
        str(row["mode"]),
        dim_text("causal", row["causal"]),
        f"B={row['batch']} H={row['heads']}" + _kv_heads(row) + f" D={row['head_dim']}",
    ]
    return " · ".join(bits)


def _figure(df, suptitle: str):
    """A Figure with one row per panel (device/dtype/mode/shape/causality present in df)."""
    from matplotlib.figure import Figure

    groups = list(iter_groups(df, SHAPE_KEY))
    height = sum(_panel_height(sub) for _, sub in groups) + 0.3
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    fig.suptitle(suptitle, fontweight="bold")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    setups = [dict(zip(SHAPE_KEY, key)) for key, _ in groups]
    kinds = {str(st.get("inputs", RANDOM)) for st in setups}
    inputs = len(kinds) > 1 or kinds != {RANDOM}
    return fig, [(ax, sub, _panel_title(st, inputs)) for ax, st, (_, sub) in zip(axes, setups, groups)]


def _panel_height(sub, by: str | Sequence[str] = SERIES_KEY) -> float:
    """Tall enough for the panel's legend (one entry per series, long labels on two lines, plus
    a few guide/estimate entries), never below PANEL_HEIGHT."""
    cols = [by] if isinstance(by, str) else list(by)
    labels = sub[cols].drop_duplicates().astype(str).agg(" · ".join, axis=1)
    rows = sum(2 if len(lab) > 44 else 1 for lab in labels) + 4
    return max(PANEL_HEIGHT, 0.2 * rows + 1.2)


def _xlabel(sub) -> str:
    modes = set(sub["mode"].astype(str)) if "mode" in sub else set()
    if modes == {"decode"}:
        return "context length (tokens)"
    return "sequence length n (tokens)"


GUIDES = ((1, "O(n) guide", (0, (1, 3))), (2, "O(n²) guide", (0, (4, 4))))


def _guides(ax, sub, guides: Sequence[tuple[float, str, Any]] = GUIDES) -> None:
    """Reference slopes (O(n) and O(n^2) unless told), anchored half a step below the lowest
    first point."""
    import numpy as np

    ns = sorted(set(float(n) for n in sub["seq_len"]))
    if len(ns) < 2:
        return
    first = sub[sub["seq_len"] == ns[0]]["time_median_s"].astype(float)
    y0 = float(first.min()) * 0.5
    x = np.array([ns[0], ns[-1]])
    for power, text, ls in guides:
        y = y0 * (x / ns[0]) ** power
        ax.plot(x, y, color="#999999", linestyle=ls, linewidth=1.3, zorder=1, label=text, gid=f"guide:{text}")
        ax.annotate(
            text.replace(" guide", ""),
            (x[-1], y[-1]),
            xytext=(-6, -2),
            textcoords="offset points",
            fontsize=8,
            color="#666666",
            ha="right",
            va="top",
            zorder=6,
            bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8),
        )


def finish_axes(ax, title: str, xlabel: str, ylabel: str, y: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="major", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    _pow2_axis(ax.xaxis, ax.get_xlim(), _n_text)
    if y == "time":
        _decade_axis(ax.yaxis, ax.get_ylim(), format_time)
        ax.set_ylabel(f"{ylabel} (log scale)")
    elif y == "bytes":
        _pow2_axis(ax.yaxis, ax.get_ylim(), format_bytes)
        ax.set_ylabel(f"{ylabel} (log scale)")  # the ticks carry their unit (KiB, MiB, GiB)
    else:
        _decade_axis(ax.yaxis, ax.get_ylim(), lambda v: f"{v:g}x")
        ax.set_ylabel(f"{ylabel}, log scale")


def _pow2_axis(axis, lim, text) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = sorted(lim)
    lo, hi = max(lo, 1e-300), max(hi, 1e-300)
    k0, k1 = math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9)
    ks = list(range(k0, k1 + 1)) or [round(math.log2(math.sqrt(lo * hi)))]
    step = max(1, math.ceil(len(ks) / 8))
    ks = [k for k in ks if (k - ks[-1]) % step == 0]
    axis.set_major_locator(FixedLocator([2.0**k for k in ks]))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: text(v)))


def _decade_axis(axis, lim, text) -> None:
    """Ticks at 1x10^k, or 1-2-5 x 10^k when the range spans under two decades."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = sorted(lim)
    lo = max(lo, 1e-300)
    span = math.log10(hi / lo) if hi > lo else 0.0
    subs = (1.0,) if span >= 4 else ((1.0, 3.0) if span >= 1.5 else (1.0, 2.0, 5.0))
    ticks = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        ticks += [s * 10.0**k for s in subs if lo <= s * 10.0**k <= hi]
    if len(ticks) > 9:
        step = math.ceil(len(ticks) / 8)
        ticks = ticks[::step]
    if len(ticks) < 3:  # a narrow range: plain "nice" values
        from matplotlib.ticker import MaxNLocator

        ticks = [
            t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi and t > 0
        ]
    else:  # more than a factor 2 of axis without a label at either end: a 1-2-5 value there
        nice = sorted(
            s * 10.0**k
            for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            for s in (1.0, 2.0, 5.0)
            if lo <= s * 10.0**k <= hi
        )
        below = [t for t in nice if t < ticks[0] / 1.9]
        if below and ticks[0] > 2 * lo:
            ticks.insert(0, below[0])  # the one nearest the end
        above = [t for t in nice if t > ticks[-1] * 1.9]
        if above and hi > 2 * ticks[-1]:
            ticks.append(above[-1])
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: text(v)))


def _n_text(v: float) -> str:
    """n on an axis or in a legend: '512', '4K', '1.5K', '1M'. Compact and rounded to what a
    glance needs, unlike units.short_tokens, which abbreviates whole multiples only (its text
    must read back as the exact count)."""
    v = float(v)
    for suffix, scale in (("M", 2**20), ("K", 2**10)):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def outside_legend(ax, extra: Sequence[Any] = (), skip: Sequence[str] = ()) -> None:
    """The legend outside the axes on the right, so it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if not any(s in lab for s in skip)]
    keep += [(h, h.get_label()) for h in extra]
    if not keep:
        return
    ax.legend(
        [h for h, _ in keep],
        [lab for _, lab in keep],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=LEGEND_FONT,
        frameon=False,
        handlelength=3.2,
    )
