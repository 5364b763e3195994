"""Content-selected attention: patterns whose keys depend on q and k (moba, quest, topk_keys).

* ``Selection``: the keys one call chose, as per-query tables of selected *units* (a unit is a
  chunk, a page or a single key), with the mask, the per-query key counts and nnz it implies.
* ``ContentSelected``: the Pattern base these patterns share. Their counts (``keys_per_query``,
  ``nnz``, ``density``) are analytic because they do not depend on the content; their masks and
  layouts do, so ``mask(n, causal)`` and ``block_layout`` raise and ``select(q, k)`` answers.
* The selection algorithms: ``select_units`` (a score per earlier unit, the best ``topk - 1``
  of them plus the query's own unit: moba's gate, quest's page bound) and ``select_tokens``
  (topk_keys' indexer). Scores are computed in fp32 whatever the input dtype, a block of queries
  at a time (never n x n), and ties are broken by the lowest index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from sparsebench.errors import PatternError
from sparsebench.patterns.base import Pattern, require_at_most_n

# Score elements (batch x heads x rows x candidates) computed at once: the query block's size.
SCORE_ELEMENTS = 1 << 22

DYNAMIC = "content-selected: its keys depend on q and k; use select(q, k)"


def content_selected(pattern) -> bool:
    """Whether ``pattern`` chooses its keys from q and k (its mask exists only per call)."""
    return bool(getattr(pattern, "content_selected", False))


@dataclass(frozen=True, eq=False)
class Selection:
    """The keys one call of a content-selected pattern chose."""

    n: int
    unit: int  # tokens per selected unit: chunk (moba), page_size (quest), 1 (topk_keys)
    # (batch, heads, n, slots) int32: ids of selected units (unit u covers keys [u*unit, (u+1)*unit)),
    # ascending, -1 padding at the end; always contains the query's own unit i // unit;
    # heads = query heads (under GQA each query head selects)
    index: torch.Tensor
    # semantics: query i attends key j iff j // unit is in index[b, h, i] and j <= i (causal)

    @property
    def units(self) -> int:
        return math.ceil(self.n / self.unit)

    def _queries(self, rows: torch.Tensor | None) -> torch.Tensor:
        dev = self.index.device
        return torch.arange(self.n, device=dev) if rows is None else rows.to(dev).long()

    def unit_table(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, heads, len(rows) or n, units) bool: which units each query selected."""
        idx = self.index if rows is None else self.index[:, :, self._queries(rows)]
        table = torch.zeros(*idx.shape[:-1], self.units + 1, dtype=torch.bool, device=idx.device)
        table.scatter_(-1, idx.long() + 1, True)  # padding (-1) lands in column 0, dropped
        return table[..., 1:]

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, heads, len(rows) or n, n) bool: the keys of every query (small n only) or of
        the given query rows."""
        i = self._queries(rows)
        j = torch.arange(self.n, device=self.index.device)
        m = self.unit_table(rows).index_select(-1, j // self.unit)
        return m & (j[None, :] <= i[:, None])

    def keys_per_query(self) -> torch.Tensor:
        """(batch, heads, n) int64: keys each query attends."""
        u = self.index.long()
        i = torch.arange(self.n, device=u.device)[:, None]
        lo = u * self.unit
        hi = torch.minimum((u + 1) * self.unit, i + 1)
        return torch.where(u >= 0, (hi - lo).clamp(min=0), 0).sum(-1)

    def nnz(self) -> int:
        """Allowed (query, key) pairs per head: the mean over batch and heads (the shipped
        patterns select the same number of keys whatever the content, so every head has it)."""
        kpq = self.keys_per_query()
        heads = max(1, kpq.shape[0] * kpq.shape[1])
        return int(round(float(kpq.sum()) / heads))

    def density(self) -> float:
        return self.nnz() / float(self.n * self.n)


# ------------------------------------------------------------------------------------------
# the pattern base


@dataclass(frozen=True, kw_only=True)
class ContentSelected(Pattern):
    """A pattern that chooses its keys from q and k, causally: ``select(q, k)`` makes the
    ``Selection`` of one call; the counts are analytic (``own_and_earlier_units``)."""

    content_selected: ClassVar[bool] = True
    family: ClassVar[str] = "content-selected"
    # parameters that are token counts, skipped for the lengths they exceed
    _sized: ClassVar[tuple[str, ...]] = ()

    def check(self, n, causal):
        if not causal:
            raise PatternError(
                f"pattern {self.name!r} is causal only (it selects among earlier keys): not bidirectional "
                "(causal: false)"
            )
        require_at_most_n(self, n, *self._sized)

    # -- no fixed mask ------------------------------------------------------------------------
    def _dynamic(self):
        raise PatternError(f"pattern {self.name!r} is {DYNAMIC}")

    def _allowed(self, q, k, n, causal):
        self._dynamic()

    def mask_fn(self, n, causal, device="cpu"):
        self._dynamic()

    def mask(self, n, causal, device="cpu"):
        self._dynamic()

    def block_layout(self, n, block, causal):
        self._dynamic()

    def key_intervals(self, n, block, causal):
        self._dynamic()

    def kv_retained(self, n):
        return n  # it may select any earlier key

    def select_bytes(self, batch: int, heads: int, n: int, head_dim: int, elem_bytes: int = 4) -> int:
        """Peak bytes of ``select`` beyond its inputs (of ``elem_bytes`` per element), the larger of
        its two phases. First the keys' fp32 summaries (``key_side_bytes``), made, for inputs in a
        low precision, from an fp32 copy of k that is dropped before the queries are scored (fp32
        inputs are used as they are). Then, beside the summaries, the index table and one query
        block at a time: while it is scored, ``score_bytes`` per score and the copies ``score``
        makes of the block's rows (``row_bytes``; fp32 rows of all queries are used as they
        are); while it is ranked, its scores with the ranking's bool masks (6 bytes a score) and
        about 40 bytes per chosen slot of its rows (topk's values and int64 indices, the chosen
        ones and their sort, the padded copy with the own unit). Measured against the peak
        resident memory of ``select`` on a CPU: 0.9-1.1x at n = 8192 and 16384."""
        bh, candidates, slots = batch * heads, -(-n // self.unit), self.slots(n)
        step = min(n, _rows_per_block(bh, candidates))
        rows = bh * step
        k32 = 4 * bh * n * head_dim if elem_bytes != 4 else 0
        copies = self.row_bytes(head_dim) - (4 * head_dim if elem_bytes == 4 and step == n else 0)
        scoring = rows * copies + self.score_bytes * rows * candidates
        ranking = 6 * rows * candidates + 40 * rows * slots
        return self.key_side_bytes(bh, n, head_dim) + max(k32, bh * n * slots * 4 + max(scoring, ranking))

    def row_bytes(self, head_dim: int) -> int:
        """Bytes per query row of a block while ``score`` runs: its fp32 copy (a view where the
        input is fp32 and the block all of it)."""
        return 4 * head_dim

    def key_side_bytes(self, bh: int, n: int, head_dim: int) -> int:
        """The fp32 summaries of the keys ``select`` scores against (at most ``bh`` key heads):
        one (``mean``) or two (``minmax``) vectors per whole unit."""
        return (2 if self.summary == "minmax" else 1) * bh * (n // self.unit) * head_dim * 4

    def slots(self, n: int) -> int:
        """Units each query selects at most (the index table's last dimension)."""
        return min(self.earlier_units, -(-n // self.unit) - 1) + 1

    @property
    def earlier_units(self) -> int:
        """Earlier units a query keeps besides its own (all earlier ones when there are fewer)."""
        raise NotImplementedError

    def keys_per_query(self, n, causal):
        return own_and_earlier_units(n, self.unit, self.earlier_units)

    # -- unit selection (moba, quest): a summary per whole unit of keys, a score per summary ---
    summary: ClassVar[str] = "mean"  # what unit_summaries keeps of a unit: "mean" or "minmax"
    # bytes per score of a query block while it is scored: its fp32 scores and the previous block's,
    # still held until the new ones are assigned
    score_bytes: ClassVar[int] = 8
    # what ``score`` computes, by name, for kernels that compute it themselves: "dot" (q . the unit's
    # mean: moba's gate, summary "mean"), "bound" (sum_d max(q_d min_d, q_d max_d): Quest's, summary
    # "minmax"); None: only ``score`` knows
    score_kind: ClassVar[str | None] = None

    def score(self, rows: torch.Tensor, summaries, m: int) -> torch.Tensor:
        """(batch, kv_heads, R, m) fp32: the scores of units [0, m) for the query rows (batch,
        kv_heads, R, d) fp32, from ``summaries`` (``unit_summaries`` of the keys)."""
        raise NotImplementedError

    def select(self, q: torch.Tensor, k: torch.Tensor) -> Selection:
        """The keys each query head chooses: q (batch, heads, n, d), k (batch, kv_heads, n, d)."""
        summaries = unit_summaries(k, self.unit, self.summary)
        return select_units(
            q, self.unit, self.earlier_units, lambda rows, m: self.score(rows, summaries, m), k.shape[1]
        )

    def incremental(self, cache_k: torch.Tensor, heads: int, context: int) -> "Incremental":
        """The selector of a decoder whose cache ``cache_k`` (batch, kv_heads, n_total, d) holds
        the first ``context`` positions: it keeps its summaries up to date as positions are
        written (``wrote``) and selects the keys of one generated query (``select``)."""
        return UnitIncremental(self, cache_k, heads, context)

    @property
    def unit(self) -> int:
        """Tokens per selected unit (the Selection's ``unit``)."""
        raise NotImplementedError


def own_and_earlier_units(n: int, unit: int, earlier: int) -> torch.Tensor:
    """(n,) int64 keys per query of a unit selection: the own unit's keys up to the query, plus
    ``earlier`` whole earlier units (all of them where there are fewer)."""
    i = torch.arange(n)
    own = i // unit
    return (i - own * unit + 1) + torch.clamp(own, max=max(0, earlier)) * unit


# ------------------------------------------------------------------------------------------
# selection algorithms


def _rows_per_block(batch_heads: int, candidates: int) -> int:
    return max(1, SCORE_ELEMENTS // max(1, batch_heads * max(1, candidates)))


def best_prefix(s: torch.Tensor, count: torch.Tensor, k: int) -> torch.Tensor:
    """(..., R, k) int64: for each row r of the scores ``s`` (..., R, m), the min(k, count[r])
    columns among the candidates [0, count[r]) with the highest scores, ties broken by the lowest
    column; ascending, -1 padding at the end. ``s`` is overwritten (the non-candidates set to
    -inf): the callers' score blocks are their own."""
    R, m = s.shape[-2:]
    kk = min(k, m)
    out = torch.full((*s.shape[:-2], R, k), -1, dtype=torch.long, device=s.device)
    if kk == 0:
        return out
    col = torch.arange(m, device=s.device)
    valid = col[None, :] < count[:, None]  # (R, m)
    s = s.masked_fill_(~valid, float("-inf"))
    vals, idx = s.topk(kk, dim=-1)  # descending
    want = count.clamp(max=kk).expand(*s.shape[:-2], R)  # (..., R)
    thr = vals.gather(-1, (want - 1).clamp(min=0)[..., None])  # the want-th best score
    big = torch.iinfo(torch.long).max
    chosen = torch.where(torch.arange(kk, device=s.device) < want[..., None], idx, big)
    # a row is ambiguous when more candidates reach its threshold than it has places: topk
    # chose among the tied ones arbitrarily, so those rows are redone by the lowest index
    tied = (((s >= thr) & valid).sum(-1) > want) & (want > 0)
    if bool(tied.any()):
        where = tied.nonzero(as_tuple=True)
        st, tt, wt = s[where], thr[where], want[where]
        ok = valid[where[-1]]
        take = (st > tt) & ok
        tie = (st == tt) & ok
        need = wt - take.sum(-1)
        take |= tie & (tie.cumsum(-1) <= need[:, None])
        pos = torch.where(take, take.cumsum(-1) - 1, kk)
        redo = torch.full((st.shape[0], kk + 1), big, dtype=torch.long, device=s.device)
        redo.scatter_(-1, pos, col.expand_as(pos))
        chosen[where] = redo[:, :kk]
    chosen = chosen.sort(dim=-1).values
    out[..., :kk] = torch.where(chosen == big, -1, chosen)
    return out


def _with_own(best: torch.Tensor, count: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``best`` (..., R, s) with one more slot, the own unit ``own`` (R,) placed right after the
    row's min(s, count) chosen earlier ones (it is larger than all of them: still ascending)."""
    pad = torch.full((*best.shape[:-1], 1), -1, dtype=best.dtype, device=best.device)
    out = torch.cat([best, pad], dim=-1)
    pos = count.clamp(max=best.shape[-1]).expand(out.shape[:-1])[..., None]
    out.scatter_(-1, pos, own.expand(out.shape[:-1])[..., None])
    return out


def unit_summaries(k: torch.Tensor, unit: int, how: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per whole unit of keys (the last partial one is never an earlier unit, so never scored):
    ``mean`` (batch, kv_heads, n // unit, d) fp32, or ``minmax`` (min, max) of the keys."""
    b, h, n, d = k.shape
    full = n // unit
    kf = k[:, :, : full * unit].detach().float().reshape(b, h, full, unit, d)
    if how == "mean":
        return kf.mean(3)
    return kf.amin(3), kf.amax(3)


ScoreFn = Callable[[torch.Tensor, int], torch.Tensor]


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, heads, R, d) query rows as (batch, kv_heads, group * R, d): the rows of the query
    heads that share a key/value head, side by side (query head h reads key/value head
    h // group), so that one product per key/value head scores them all (no repeated keys)."""
    b, h, r, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * r, d)


def ungrouped(s: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``grouped`` for scores: (batch, kv_heads, group * R, m) -> (batch, heads, R, m)."""
    b, kv, gr, m = s.shape
    return s.reshape(b, heads, gr * kv // heads, m)


def select_units(q: torch.Tensor, unit: int, earlier: int, score: ScoreFn, kv_heads: int) -> Selection:
    """Each query keeps its own unit and the ``earlier`` earlier units with the highest
    ``score(rows, m)`` -> (batch, kv_heads, rows, m), the scores of units [0, m) for the fp32
    query rows (batch, kv_heads, rows, d) of ``grouped`` (all earlier units when there are fewer)."""
    b, h, n, _ = q.shape
    units = math.ceil(n / unit)
    slots = min(earlier, units - 1) + 1
    index = torch.empty(b, h, n, slots, dtype=torch.int32, device=q.device)
    step = _rows_per_block(b * h, units)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            i = torch.arange(r0, r1, device=q.device)
            own = i // unit
            m = (r1 - 1) // unit  # the units earlier than the block's last query's
            if slots > 1 and m > 0:
                s = ungrouped(score(grouped(q[:, :, r0:r1].detach().float(), kv_heads), m), h)
                best = best_prefix(s, own, slots - 1)
            else:
                best = torch.full((b, h, r1 - r0, slots - 1), -1, dtype=torch.long, device=q.device)
            index[:, :, r0:r1] = _with_own(best, own, own).to(torch.int32)
    return Selection(n=n, unit=unit, index=index)


def select_tokens(q: torch.Tensor, k: torch.Tensor, keys: int, project: torch.Tensor) -> Selection:
    """Each query keeps itself and the ``keys`` earlier keys with the highest indexer score
    (q P) . (k P) (all earlier keys when there are fewer), P the (d, index_dim) projection."""
    b, h, n, _ = q.shape
    slots = min(keys, n - 1) + 1
    index = torch.empty(b, h, n, slots, dtype=torch.int32, device=q.device)
    step = _rows_per_block(b * h, n)
    with torch.no_grad():
        kp = k.detach().float() @ project  # (batch, kv_heads, n, index_dim)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            i = torch.arange(r0, r1, device=q.device)
            m = r1 - 1  # the keys earlier than the block's last query
            if slots > 1 and m > 0:
                qp = grouped(q[:, :, r0:r1].detach().float(), k.shape[1]) @ project
                s = ungrouped(qp @ kp[:, :, :m].transpose(-1, -2), h)
                best = best_prefix(s, i, slots - 1)
            else:
                best = torch.full((b, h, r1 - r0, slots - 1), -1, dtype=torch.long, device=q.device)
            index[:, :, r0:r1] = _with_own(best, i, i).to(torch.int32)
    return Selection(n=n, unit=1, index=index)


def gaussian_projection(head_dim: int, index_dim: int, seed: int, device) -> torch.Tensor:
    """(head_dim, index_dim) fp32: one seeded Gaussian projection (entries N(0, 1/index_dim))."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(head_dim, index_dim, generator=g) / math.sqrt(index_dim)).to(device)


# ------------------------------------------------------------------------------------------
# decode: one query at a time over a growing cache


class Incremental:
    """A content-selected pattern's selection during decode, over a cache (batch, kv_heads,
    n_total, d) that is written one position at a time: ``wrote(t)`` after position t's key is
    in the cache (idempotent: writing t again is a no-op for it), ``select(q, t)`` -> (batch,
    heads, keys) int64 ascending positions <= t that the query q (batch, heads, 1, d) at t
    attends, the same keys ``pattern.select`` gives row t."""

    def wrote(self, t: int) -> None:
        raise NotImplementedError

    def select(self, q: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError


class UnitIncremental(Incremental):
    """moba and quest: the summaries of the cache's whole units, each made once its last key
    is written (the prompt's at construction); a step scores the earlier units from them."""

    def __init__(self, pattern: ContentSelected, cache_k: torch.Tensor, heads: int, context: int) -> None:
        self.pattern, self.k, self.heads, self.unit = pattern, cache_k, heads, pattern.unit
        done = context // self.unit
        made = unit_summaries(cache_k[:, :, : done * self.unit], self.unit, pattern.summary)
        total = cache_k.shape[2] // self.unit
        b, kv, _, d = cache_k.shape

        def room(part: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(b, kv, total, d, dtype=torch.float32, device=cache_k.device)
            out[:, :, :done] = part
            return out

        self.summaries = room(made) if pattern.summary == "mean" else tuple(room(x) for x in made)

    def wrote(self, t: int) -> None:
        if (t + 1) % self.unit:
            return
        u = t // self.unit
        part = unit_summaries(self.k[:, :, u * self.unit : (u + 1) * self.unit], self.unit, self.pattern.summary)
        if isinstance(self.summaries, tuple):
            for mine, new in zip(self.summaries, part):
                mine[:, :, u] = new[:, :, 0]
        else:
            self.summaries[:, :, u] = part[:, :, 0]

    def select(self, q: torch.Tensor, t: int) -> torch.Tensor:
        own = t // self.unit
        b, h = q.shape[:2]
        take = min(self.pattern.earlier_units, own)
        parts = []
        if take:
            s = ungrouped(self.pattern.score(grouped(q.float(), self.k.shape[1]), self.summaries, own), h)
            best = best_prefix(s, torch.tensor([own], device=q.device), take)[:, :, 0]  # (batch, heads, take)
            offsets = torch.arange(self.unit, device=q.device)
            parts.append((best[..., None] * self.unit + offsets).flatten(-2))
        parts.append(torch.arange(own * self.unit, t + 1, device=q.device).expand(b, h, -1))
        return torch.cat(parts, dim=-1)


class TokenIncremental(Incremental):
    """topk_keys: the indexer's projection of every cached key, made as it is written."""

    def __init__(self, pattern, cache_k: torch.Tensor, heads: int, context: int) -> None:
        self.pattern, self.k, self.heads = pattern, cache_k, heads
        self.project = pattern.projection(cache_k.shape[-1], cache_k.device)
        b, kv, n, _ = cache_k.shape
        self.kp = torch.zeros(b, kv, n, self.project.shape[1], dtype=torch.float32, device=cache_k.device)
        self.kp[:, :, :context] = cache_k[:, :, :context].float() @ self.project

    def wrote(self, t: int) -> None:
        self.kp[:, :, t] = self.k[:, :, t].float() @ self.project

    def select(self, q: torch.Tensor, t: int) -> torch.Tensor:
        b, h = q.shape[:2]
        own = torch.full((b, h, 1), t, dtype=torch.long, device=q.device)
        take = min(self.pattern.keys, t)
        if not take:
            return own
        qp = grouped(q.float(), self.k.shape[1]) @ self.project
        s = ungrouped(qp @ self.kp[:, :, :t].transpose(-1, -2), h)
        best = best_prefix(s, torch.tensor([t], device=q.device), take)[:, :, 0]
        return torch.cat([best, own], dim=-1)


# ------------------------------------------------------------------------------------------
# backends


def selecting_call(
    pattern: ContentSelected,
    attend: Callable[..., torch.Tensor],
    select: Callable[[torch.Tensor, torch.Tensor], Selection] | None = None,
):
    """A backend's ``fn(q, k, v)`` for a content-selected pattern: each call selects (no
    gradient flows through the choice) and then attends, ``attend(q, k, v, selection)``.
    ``select(q, k)``: the backend's own selection of the pattern's keys (the same keys), by
    default ``pattern.select``. ``fn.select(q, k)`` is that selection alone (what ``select_s``
    times) and ``fn.selected(q, k, v)`` returns ``(out, selection)`` so that the check uses the
    call's own."""
    select = select or pattern.select

    def selected(q, k, v):
        selection = select(q, k)
        return attend(q, k, v, selection), selection

    def fn(q, k, v):
        return selected(q, k, v)[0]

    fn.select = select
    fn.selected = selected
    return fn


def selection_mask_bytes(p) -> int:
    """A reference's bytes for a content-selected pattern beyond inputs and scores: the selection
    (``select_bytes``), its unit table and the (batch, heads, n, n) bool mask made from it."""
    n, bh = p.seq_len, p.batch * p.heads
    units = math.ceil(n / p.pattern.unit)
    return p.pattern.select_bytes(p.batch, p.heads, n, p.head_dim, p.elem_bytes) + bh * n * (units + 1) + bh * n * n


# ------------------------------------------------------------------------------------------
# drawing one selection (``show``, the masks figure)

SHOW_HEAD_DIM = 64
SHOW_SEED = 0
SEEDED = f"selected for seeded random inputs (seed {SHOW_SEED}, head_dim {SHOW_HEAD_DIM})"
SEEDED_SHORT = "selected for seeded random inputs"  # a figure's panel title


def seeded_selection(pattern: ContentSelected, n: int) -> Selection:
    """The selection a content-selected pattern makes for seeded random normal q and k (batch
    1, one head, ``SHOW_HEAD_DIM``): what ``show`` and the masks figure draw (``SEEDED`` says so)."""
    g = torch.Generator().manual_seed(SHOW_SEED)
    q = torch.randn(1, 1, n, SHOW_HEAD_DIM, generator=g)
    k = torch.randn(1, 1, n, SHOW_HEAD_DIM, generator=g)
    return pattern.select(q, k)


def tile_counts(selection: Selection, tile: int, shown: int | None = None) -> torch.Tensor:
    """(tiles, tiles) int64: allowed pairs per (query tile, key tile) of batch 0, head 0 over the
    first ``shown`` tokens (all by default), from the mask a band of rows at a time (never n x n)."""
    shown = selection.n if shown is None else shown
    tiles = -(-shown // tile)
    out = torch.zeros(tiles, tiles, dtype=torch.long)
    band = max(tile, SCORE_ELEMENTS // max(1, selection.n) // tile * tile)
    for r0 in range(0, shown, band):
        r1 = min(shown, r0 + band)
        m = selection.mask(torch.arange(r0, r1))[0, 0, :, :shown].long()
        m = torch.nn.functional.pad(m, (0, (-shown) % tile, 0, (-(r1 - r0)) % tile))
        out[r0 // tile : r0 // tile + m.shape[0] // tile] = m.reshape(m.shape[0] // tile, tile, tiles, tile).sum((1, 3))
    return out
