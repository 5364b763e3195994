"""The masks figure: every pattern of a run drawn at a length the run measured, so that what it
shows is the structure the run timed.

* The length: the run's smallest n at which every pattern fits and no two patterns draw the same
  (at n = 256 a BigBird of 64-token blocks covers every causal pair, as dense does: a run that
  also measured 512 is drawn at 512). Above ``FULL_MAX`` tokens a panel shows the first ``ZOOM``
  of them (computed at the run's n, so random and global tokens are the run's) and says so; twice
  as many, and so on up to n, where its first ZOOM tokens would draw as dense attention while the
  pattern is sparse at n (a 2048-token window, MoBA's four 512-token chunks: within their reach
  every pair attends), or where two patterns would draw the same there.
* A panel has at most ``CELLS`` cells a side; a cell of several tokens is shaded by the share of
  its pairs that attend (black: all; grey: some, never lighter than ``FLOOR``), so a one-token
  diagonal stays visible.
* What one pixel cannot show is marked from the pattern's structure: keys every query attends
  (global tokens, sinks, summary columns) by vermillion triangles above the panel, queries that
  attend every key by triangles on its right (a few runs of them; many, such as a fixed pattern's
  summary columns, show in the shading), random keys by blue dots. The panel's label says which.

``mask_panels`` returns the data of each panel (tests read it), ``fig_masks`` draws them.
torch, numpy and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

from sparsebench.results.schema import BASELINE_PATTERN

CELLS = 512  # at most this many cells a side
FULL_MAX = 4096  # longer runs are drawn zoomed onto their first ZOOM tokens
ZOOM = 2048
FLOOR = 0.3  # the lightest grey of a cell with any allowed pair
SEARCH = 4  # lengths tried, smallest first, for one at which no two patterns draw the same
MAX_DOTS = 6000  # random keys drawn as dots; more: a seeded sample of this many
MAX_RUNS = 8  # key columns / query rows marked one by one; more runs are left to the shading
MARK = "#D55E00"  # Okabe-Ito vermillion: global keys/queries, sinks
RANDOM = "#0072B2"  # Okabe-Ito blue: random keys


@dataclass(frozen=True, eq=False)
class MaskPanel:
    """One pattern as drawn: ``image`` (cells x cells, the share of each cell's pairs allowed)
    over the first ``shown`` tokens of a run of ``n``, ``cell`` tokens a side per cell; the key
    columns every query attends (``keys``) and the queries that attend every key (``rows``) as
    inclusive runs; random (query, key) pairs as dots (``dots``, a sample of ``dot_total``)."""

    label: str
    n: int
    causal: bool
    shown: int = 0
    cell: int = 1
    image: Any = None  # numpy (cells, cells) float32
    density: float = 0.0
    keys: tuple[tuple[int, int], ...] = ()
    rows: tuple[tuple[int, int], ...] = ()
    dots: Any = None  # numpy (m, 2) int64: (query, key)
    dot_total: int = 0
    error: str = ""
    note: str = ""  # a content-selected pattern: which inputs its drawn selection was made for

    @property
    def zoomed(self) -> bool:
        return self.shown < self.n

    def signature(self) -> tuple:
        """The pairs the panel draws (its marks aside: a pattern that allows what dense allows
        draws as dense, whatever its parts are called)."""
        import numpy as np

        img = b"" if self.image is None else np.asarray(self.image, dtype=np.float32).tobytes()
        return (self.shown, self.cell, img)


def _patterns(df) -> dict[str, tuple[str, dict, bool, list[int]]]:
    """label -> (pattern name, params, causal, the run's lengths for it), dense first."""
    from sparsebench.render.stack import layer_rows

    seen: dict[str, tuple[str, dict, bool, list[int]]] = {}
    for _, r in layer_rows(df).iterrows():  # a model's stack: the patterns of its layers
        lab = str(r.get("pattern_label") or r["pattern"])
        params = r.get("params")
        if isinstance(params, str):
            params = json.loads(params or "{}")
        if not isinstance(params, dict):
            params = {}
        causal = r.get("causal")
        causal = True if causal is None or (isinstance(causal, float) and math.isnan(causal)) else bool(causal)
        entry = seen.setdefault(lab, (str(r["pattern"]), params, causal, []))
        n = r.get("seq_len")
        if n is not None and not (isinstance(n, float) and math.isnan(n)) and int(n) > 0:
            entry[3].append(int(n))
    order = sorted(seen, key=lambda lab: (not lab.startswith(BASELINE_PATTERN), lab))
    return {lab: (seen[lab][0], seen[lab][1], seen[lab][2], sorted(set(seen[lab][3]))) for lab in order}


def mask_panels(df, n: int | None = None) -> list[MaskPanel]:
    """The panels of the run's patterns (dense first), at the length the module docstring says;
    ``n`` draws every pattern at that length instead."""
    from sparsebench.errors import SparsebenchError
    from sparsebench.patterns.base import PATTERNS

    if df is None or "pattern" not in df or len(df) == 0:
        return []
    info = _patterns(df)
    built: dict[str, Any] = {}
    for lab, (name, params, causal, _) in info.items():
        try:
            built[lab] = PATTERNS.get(name).from_params(params)
        except SparsebenchError as e:
            built[lab] = e

    def fits(lab: str, size: int) -> bool:
        pat = built[lab]
        if isinstance(pat, Exception):
            return False
        try:
            pat.check(size, info[lab][2])
            return True
        except SparsebenchError:
            return False

    def panel(lab: str, size: int, shown: int | None = None) -> MaskPanel:
        pat, causal = built[lab], info[lab][2]
        if isinstance(pat, Exception):
            return MaskPanel(lab, size, causal, error=f"cannot draw: {pat}")
        try:
            pat.check(size, causal)
        except SparsebenchError as e:
            return MaskPanel(lab, size, causal, error=f"cannot draw: {e}")
        return draw_data(lab, pat, size, causal, shown)

    def widened(panels: list[MaskPanel]) -> list[MaskPanel]:
        """Zoomed panels that draw the same as another, redrawn over twice their tokens (up to
        their n) until none does or none can widen."""
        while True:
            sigs = [p.signature() if not p.error else None for p in panels]
            twins = {i for i, s in enumerate(sigs) if s is not None and sigs.count(s) > 1 and panels[i].zoomed}
            if not twins:
                return panels
            panels = [panel(p.label, p.n, 2 * p.shown) if i in twins else p for i, p in enumerate(panels)]

    labels = list(info)
    if n is not None:
        return widened([panel(lab, n) for lab in labels])
    lengths = sorted({m for v in info.values() for m in v[3]}) or [256]
    common = [m for m in lengths if all(fits(lab, m) for lab in labels if not isinstance(built[lab], Exception))]
    first = None
    for m in common[:SEARCH]:  # the smallest length at which no two patterns draw the same
        panels = [panel(lab, m) for lab in labels]
        first = first or panels
        sigs = [p.signature() for p in panels if not p.error]
        if len(set(sigs)) == len(sigs):
            return panels
    if first is not None:
        return widened(first)
    # no length fits every pattern: each at its own smallest length that fits
    out = []
    for lab in labels:
        own = [m for m in (info[lab][3] or lengths) if fits(lab, m)]
        out.append(panel(lab, own[0] if own else (info[lab][3] or lengths)[0]))
    return out


def draw_data(label: str, pat, n: int, causal: bool, shown: int | None = None) -> MaskPanel:
    """One pattern's panel at the run's length n, over its first ``shown`` tokens (by default all
    of them up to FULL_MAX, else ZOOM), widened (doubled, up to n) while it would draw as dense
    attention where the pattern is sparse at n."""
    if shown is None:
        shown = n if n <= FULL_MAX else ZOOM
    while True:
        p = _panel(label, pat, n, causal, min(shown, n))
        if p.shown >= n or not _looks_dense(p, pat):
            return p
        shown = p.shown * 2


def _dense_pairs(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def _looks_dense(p: MaskPanel, pat) -> bool:
    """Whether the panel allows every pair dense attention allows over its tokens while the
    pattern allows fewer at the run's n."""
    import numpy as np

    cells = p.image.shape[0]
    sizes = np.minimum(p.shown - np.arange(cells) * p.cell, p.cell).astype(np.float64)
    drawn = float((p.image * sizes[:, None] * sizes[None, :]).sum())
    sparse_at_n = pat.nnz(p.n, p.causal) < 0.999 * _dense_pairs(p.n, p.causal)
    return sparse_at_n and drawn >= 0.999 * _dense_pairs(p.shown, p.causal)


def _panel(label: str, pat, n: int, causal: bool, shown: int) -> MaskPanel:
    import numpy as np

    from sparsebench.patterns.selection import content_selected

    cell = 1
    while shown / cell > CELLS:
        cell *= 2
    if content_selected(pat):  # no mask of its own: one selection, for seeded random inputs
        return _selected_panel(label, pat, n, shown, cell, causal)
    image = _image(pat, n, shown, cell, causal)
    keys, rows, dots, total = _marks(pat, n, shown, causal)
    return MaskPanel(
        label,
        n,
        causal,
        shown=shown,
        cell=cell,
        image=image.astype(np.float32),
        density=pat.density(n, causal),
        keys=keys,
        rows=rows,
        dots=dots,
        dot_total=total,
    )


def _selected_panel(label: str, pat, n: int, shown: int, cell: int, causal: bool) -> MaskPanel:
    """A content-selected pattern's panel: the keys it selects for seeded random inputs over the
    first ``shown`` tokens (its queries there select among those tokens only: causal), shaded
    per cell; its density (analytic: the same for every input) at the run's n."""
    import numpy as np
    import torch

    from sparsebench.patterns.selection import SEEDED_SHORT, seeded_selection, tile_counts

    counts = tile_counts(seeded_selection(pat, shown), cell).to(torch.float64)
    cells = counts.shape[0]
    sizes = torch.clamp(shown - torch.arange(cells) * cell, max=cell).to(torch.float64)
    image = (counts / (sizes[:, None] * sizes[None, :])).numpy().astype(np.float32)
    return MaskPanel(
        label, n, causal, shown=shown, cell=cell, image=image, density=pat.density(n, causal), note=SEEDED_SHORT
    )


def _image(pat, n: int, shown: int, cell: int, causal: bool):
    """(ceil(shown / cell),) x 2 share of allowed pairs per cell over the first ``shown`` tokens."""
    import numpy as np
    import torch

    cells = math.ceil(shown / cell)
    if shown == n and cell > 1:
        try:  # the pattern's own tile counts: cost in proportion to its non-empty tiles
            lay = pat.block_layout(n, cell, causal)
            img = np.zeros((cells, cells), dtype=np.float64)
            r, c = lay.row_of_tiles().numpy(), lay.col.numpy()
            sizes = np.minimum(n - np.arange(cells) * cell, cell)
            img[r, c] = lay.count.numpy() / (sizes[r] * sizes[c])
            return img
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    idx = torch.arange(shown)
    out = torch.zeros(cells, cells, dtype=torch.float64)
    band = max(cell, (1 << 22) // max(1, shown) // cell * cell)
    for r0 in range(0, shown, band):
        r1 = min(shown, r0 + band)
        m = pat.allowed(idx[r0:r1, None], idx[None, :], n, causal).to(torch.float64)
        pad_r, pad_c = (-(r1 - r0)) % cell, (-shown) % cell
        m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))
        out[r0 // cell : r0 // cell + m.shape[0] // cell] = m.reshape(m.shape[0] // cell, cell, cells, cell).sum((1, 3))
    sizes = torch.clamp(shown - torch.arange(cells) * cell, max=cell).to(torch.float64)
    return (out / (sizes[:, None] * sizes[None, :])).numpy()


def _runs(values) -> tuple[tuple[int, int], ...]:
    """Sorted distinct ints as inclusive runs: [0, 1, 2, 7] -> ((0, 2), (7, 7))."""
    out: list[list[int]] = []
    for v in sorted(set(int(x) for x in values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return tuple((a, b) for a, b in out)


def _marks(pat, n: int, shown: int, causal: bool):
    """(key runs, row runs, random dots (query, key), how many random pairs there are) from the
    pattern's structure."""
    import numpy as np
    import torch

    from sparsebench.patterns.geometry import BlockTable, Keys, Rows, Table

    st = pat.structure(n, causal)
    if st is None:
        return (), (), None, 1
    keys: list[int] = []
    rows: list[int] = []
    pairs = []
    for part in st.parts:
        if isinstance(part, Keys):
            keys += [int(k) for k in part.keys if k < shown]
        elif isinstance(part, Rows):
            rows += [int(q) for q in part.rows if q < shown]
        elif isinstance(part, Table):
            t = part.table[:shown]
            q = torch.arange(t.shape[0])[:, None].expand_as(t)
            ok = (t >= 0) & (t < shown) & (t != q)  # the query itself is the diagonal, not random
            if causal:
                ok &= t <= q
            pairs.append(torch.stack([q[ok], t[ok]], 1))
        elif isinstance(part, BlockTable):  # random blocks: the centre of each, where a block is small
            t = part.table
            b = part.size
            if b * CELLS >= 3 * shown:  # a block at least ~3 cells: visible on its own
                continue
            qb = torch.arange(t.shape[0])[:, None].expand_as(t)
            ok = (t >= 0) & (t * b < shown) & (qb * b < shown)
            if causal:
                ok &= t <= qb
            centre = lambda x: torch.clamp(x * b + b // 2, max=shown - 1)  # noqa: E731
            pairs.append(torch.stack([centre(qb[ok]), centre(t[ok])], 1))
    dots, total = None, 0
    if pairs:
        d = torch.cat(pairs).numpy().astype(np.int64)
        total = len(d)
        if total > MAX_DOTS:  # a uniform sample: every k-th query would draw stripes
            d = d[np.sort(np.random.default_rng(0).choice(total, MAX_DOTS, replace=False))]
        dots = d if len(d) else None
    return _runs(keys), _runs(rows), dots, total


def _runs_text(runs: Sequence[tuple[int, int]]) -> str:
    if len(runs) > 4:
        total = sum(b - a + 1 for a, b in runs)
        return f"{total} in {len(runs)} runs"
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def marks_text(p: MaskPanel) -> str:
    """The panel's legend of its marks ("" without marks)."""
    bits = []
    if p.keys:
        bits.append(f"▼ keys every query attends: {_runs_text(p.keys)}")
    if p.rows:
        every = "every earlier key" if p.causal else "every key"
        bits.append(f"◀ queries attending {every}: {_runs_text(p.rows)}")
    if p.dots is not None:
        sample = len(p.dots) < p.dot_total
        bits.append("• random keys" + (f" (a sample: {len(p.dots)} of {p.dot_total})" if sample else ""))
    return "\n".join(bits)


def panel_title(p: MaskPanel) -> str:
    """The pattern, its density at the run's n, and the zoom and cell size where they apply."""
    from sparsebench.units import short_tokens

    title = "\n".join(textwrap.wrap(p.label, 30, break_long_words=False, break_on_hyphens=False))  # not inside a value
    if p.error:
        return title
    density = f"{p.density:.1%}" if p.density >= 0.01 else f"{100 * p.density:.2g}%"
    lines = [title, f"density {density} at n={short_tokens(p.n)}"]
    how = []
    if p.zoomed:
        how.append(f"zoom: its first {short_tokens(p.shown)} tokens")
    if p.cell > 1:
        how.append(f"cell {p.cell}x{p.cell} tokens")
    if how:
        lines.append("; ".join(how))
    if p.note:
        lines.append(p.note)
    return "\n".join(lines)


def fig_masks(df, analysis=None, styles=None, n: int | None = None):
    """Every pattern's attention matrix at the run's length (``mask_panels``), dense first,
    titled with its density, its marks named under it."""
    import numpy as np

    panels = mask_panels(df, n)
    if not panels:
        return None
    from matplotlib.figure import Figure

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    # tall enough for the longest title and marks legend of a row: the panels stay square
    heights = []
    for r in range(rows):
        row = panels[r * cols : (r + 1) * cols]
        title = max(panel_title(p).count("\n") + 1 for p in row)
        marks = max(marks_text(p).count("\n") + 1 if marks_text(p) else 0 for p in row)
        heights.append(3.5 + 0.17 * title + 0.16 * (marks + 1))
    width = 3.6 * cols + 0.6
    smallest = int(df["seq_len"].min()) if "seq_len" in df and df["seq_len"].notna().any() else None
    title = _suptitle(panels, smallest, asked=n is not None)
    # wrapped to the figure's width (about 9 bold characters an inch): a lone panel's figure is narrow
    title = "\n".join(part for line in title.split("\n") for part in textwrap.wrap(line, int(width * 9)))
    fig = Figure(figsize=(width, sum(heights) + 0.6 + 0.2 * title.count("\n")), layout="constrained")
    fig.suptitle(title, fontweight="bold")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    for ax, p in zip(axes, panels):
        ax.set_title(panel_title(p), fontsize=9)
        if p.error:
            ax.text(
                0.5,
                0.5,
                "\n".join(textwrap.wrap(p.error, 32)),
                ha="center",
                va="center",
                fontsize=8,
                transform=ax.transAxes,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        shade = np.where(p.image > 0, FLOOR + (1 - FLOOR) * p.image, 0.0)
        s = p.shown
        ax.imshow(
            shade, cmap="Greys", vmin=0, vmax=1, interpolation="antialiased", extent=(-0.5, s - 0.5, s - 0.5, -0.5)
        )
        _draw_marks(ax, p)
        marks = marks_text(p)
        ax.set_xlabel("key j" + (f"\n{marks}" if marks else ""), fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ticks = [0, s // 2, s - 1]
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-0.5, s - 0.5)
        ax.set_ylim(s - 0.5, -0.5)
        ax.set_gid(f"mask:{p.label}")
    return fig


def _suptitle(panels: Sequence[MaskPanel], smallest: int | None, asked: bool = False) -> str:
    """The length drawn, and why where it is not the run's smallest (``asked``: the caller chose
    it, which the title then says)."""
    from sparsebench.units import short_tokens

    drawn = [p for p in panels if not p.error]
    causal = {p.causal for p in drawn}
    how = "causal" if causal == {True} else ("bidirectional" if causal == {False} else "causal and bidirectional")
    ns = sorted({p.n for p in drawn})
    if len(ns) != 1:
        at = "each at its own smallest n that fits it"
    elif asked:
        at = f"at n={short_tokens(ns[0])}, as asked"
    elif smallest is None or ns[0] == smallest:
        at = f"at n={short_tokens(ns[0])}, the run's smallest length"
    else:
        at = (
            f"at n={short_tokens(ns[0])} (at the run's smallest, n={short_tokens(smallest)}, "
            "two patterns draw the same or one does not fit)"
        )
    zoom = {p.shown for p in drawn if p.zoomed}
    if len(zoom) == 1:
        at += f", each panel zoomed onto its first {short_tokens(zoom.pop())} tokens"
    return f"Attention masks {at}\n{how}; black = query attends key, grey = some pairs of a cell"


def _draw_marks(ax, p: MaskPanel) -> None:
    """Triangles above the panel at the keys every query attends, on its right at the queries
    attending every key, dots at random keys."""

    def triangle(x, y, transform, marker, gid):
        style = dict(marker=marker, markersize=7, color=MARK, linestyle="none", zorder=5, clip_on=False)
        ax.plot([x], [y], transform=transform, gid=gid, **style)

    for a, b in p.keys if len(p.keys) <= MAX_RUNS else ():
        triangle((a + b) / 2, 1.0, ax.get_xaxis_transform(), "v", "mark:keys")
        if b - a + 1 >= p.cell * 3:  # a wide run: its extent too, visible on its own below
            ax.plot([a - 0.5, b + 0.5], [1.0, 1.0], transform=ax.get_xaxis_transform(), color=MARK, lw=3, clip_on=False)
        else:  # a column narrower than a few pixels: a line down it, over the queries that attend it
            x = (a + b) / 2
            ax.plot([x, x], [a if p.causal else 0, p.shown - 1], color=MARK, lw=1.3, zorder=3, gid="mark:key_line")
    for a, b in p.rows if len(p.rows) <= MAX_RUNS else ():
        triangle(1.0, (a + b) / 2, ax.get_yaxis_transform(), "<", "mark:rows")
        if b - a + 1 < p.cell * 3:  # a row narrower than a few pixels: a line along it
            y = (a + b) / 2
            ax.plot([0, b if p.causal else p.shown - 1], [y, y], color=MARK, lw=1.3, zorder=3, gid="mark:row_line")
    if p.dots is not None:
        ax.plot(
            p.dots[:, 1],
            p.dots[:, 0],
            linestyle="none",
            marker="o",
            markersize=1.6,
            markeredgewidth=0,
            color=RANDOM,
            alpha=0.85,
            zorder=4,
            gid="mark:random",
        )
