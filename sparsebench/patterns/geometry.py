"""Tile geometry of attention patterns: which (query block, key block) tiles a pattern touches.

* ``Intervals``: a cheap superset of the keys each query block may touch, as inclusive key
  ranges (``band``, ``fixed_keys``, ``key_list``, ``all_keys_for`` build the usual ones); a
  pattern's ``key_intervals`` returns them.
* ``BlockLayout``: the non-empty tiles in CSR form, with their allowed-pair counts.
  ``scanned_layout`` finds them by evaluating the pattern's ``allowed`` on the candidate tiles of
  its intervals only, so the cost grows with the non-empty tiles, never with n^2.
* ``Structure``: a pattern as a union of a few structured parts (``Band``, ``BlockBand``,
  ``Keys``, ``Rows``, ``Table``, ``BlockTable``, ``Ranges``) that a kernel can compute without
  gathers or n x n masks; ``structured_layout`` counts its tiles analytically.

The Pattern API itself (parameters, ``allowed``, ``mask``, ``keys_per_query``...) is in
``sparsebench.patterns.base``; this module only needs a pattern's ``allowed`` and
``key_intervals``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from sparsebench.shapes import broadcast_shape

if TYPE_CHECKING:
    from sparsebench.patterns.base import Pattern

# Upper bound on tile elements evaluated at once while scanning tiles.
TILE_CHUNK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------------------------
# key intervals and block layouts


@dataclass(frozen=True)
class Intervals:
    """Key ranges [lo, hi] (inclusive) that query block ``qb`` may touch."""

    qb: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @staticmethod
    def cat(parts: list["Intervals"]) -> "Intervals":
        return Intervals(
            torch.cat([p.qb for p in parts]),
            torch.cat([p.lo for p in parts]),
            torch.cat([p.hi for p in parts]),
        )


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Non-empty (query block, key block) tiles in CSR form; ``full`` marks tiles where every
    in-range pair is allowed (no mask needed). Sequences that are not a multiple of ``block``
    end in a short last block."""

    n: int
    block: int
    causal: bool
    crow: torch.Tensor  # (num_blocks + 1,) int64
    col: torch.Tensor  # (nnz_blocks,) int64, key block indices
    full: torch.Tensor  # (nnz_blocks,) bool
    count: torch.Tensor  # (nnz_blocks,) int64, allowed pairs inside the tile

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.n / self.block)

    @property
    def nnz_blocks(self) -> int:
        return int(self.col.numel())

    def row_of_tiles(self) -> torch.Tensor:
        """Query block index of each tile."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.num_blocks), counts)

    def at_short_end(self) -> torch.Tensor:
        """(nnz_blocks,) bool: tiles in the short last block row or column (none when the block
        divides n); kernels that pad that block must not count them full."""
        if self.n % self.block == 0:
            return torch.zeros(self.nnz_blocks, dtype=torch.bool)
        last = self.num_blocks - 1
        return (self.row_of_tiles() == last) | (self.col == last)

    def dense(self) -> torch.Tensor:
        """(num_blocks, num_blocks) int8 matrix of non-empty tiles (for display and tests)."""
        out = torch.zeros(self.num_blocks, self.num_blocks, dtype=torch.int8)
        out[self.row_of_tiles(), self.col] = 1
        return out


def band(n: int, block: int, before: int, after: int) -> Intervals:
    """Each query block may touch keys from ``before`` positions before its first query to
    ``after`` positions after its last."""
    nb = math.ceil(n / block)
    qb = torch.arange(nb)
    lo = (qb * block - before).clamp(min=0)
    hi = (qb * block + block - 1 + after).clamp(max=n - 1)
    return Intervals(qb, lo, hi)


def fixed_keys(n: int, block: int, lo: int, hi: int) -> Intervals:
    """Every query block may touch keys lo..hi (global tokens, sinks)."""
    nb = math.ceil(n / block)
    qb = torch.arange(nb)
    return Intervals(qb, torch.full((nb,), max(lo, 0)), torch.full((nb,), min(hi, n - 1)))


def key_list(n: int, block: int, qblocks: torch.Tensor, keys: torch.Tensor) -> Intervals:
    """Query block qblocks[i] may touch key keys[i] (single keys, e.g. random ones)."""
    keys = keys.clamp(0, n - 1)
    return Intervals(qblocks, keys, keys)


def all_keys_for(n: int, qblocks: torch.Tensor) -> Intervals:
    """Query blocks ``qblocks`` may touch every key (global queries)."""
    return Intervals(qblocks, torch.zeros_like(qblocks), torch.full_like(qblocks, n - 1))


def _candidate_tiles(iv: Intervals, n: int, block: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique (query block, key block) candidate pairs from key intervals."""
    nb = math.ceil(n / block)
    keep = iv.lo <= iv.hi
    qb, lo, hi = iv.qb[keep], iv.lo[keep] // block, iv.hi[keep] // block
    if causal:
        hi = torch.minimum(hi, qb)
        keep = lo <= hi
        qb, lo, hi = qb[keep], lo[keep], hi[keep]
    span = hi - lo + 1
    qbs = torch.repeat_interleave(qb, span)
    offs = torch.arange(int(span.sum())) - torch.repeat_interleave(torch.cumsum(span, 0) - span, span)
    kbs = torch.repeat_interleave(lo, span) + offs
    code = torch.unique(qbs * nb + kbs)  # sorted: by query block, then key block
    return code // nb, code % nb


def scan_tiles(
    pattern: Pattern, n: int, block: int, causal: bool, per_row: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Evaluate ``allowed`` on every candidate tile. Returns ((qb, kb, count, full), per-row
    key counts or None)."""
    qb, kb = _candidate_tiles(pattern.key_intervals(n, block, causal), n, block, causal)
    ar = torch.arange(block)
    counts = torch.empty(qb.numel(), dtype=torch.long)
    full = torch.empty(qb.numel(), dtype=torch.bool)
    row_counts = torch.zeros(n, dtype=torch.long) if per_row else None
    step = max(1, TILE_CHUNK_ELEMENTS // (block * block))
    for s in range(0, qb.numel(), step):
        q = qb[s : s + step, None] * block + ar  # (P, b)
        k = kb[s : s + step, None] * block + ar
        valid = (q < n)[:, :, None] & (k < n)[:, None, :]
        m = pattern.allowed(q.clamp(max=n - 1)[:, :, None], k.clamp(max=n - 1)[:, None, :], n, causal) & valid
        c = m.sum(dim=(1, 2))
        counts[s : s + step] = c
        full[s : s + step] = c == valid.sum(dim=(1, 2))
        if row_counts is not None:
            rc = m.sum(dim=2).flatten()
            qf = q.flatten()
            ok = qf < n
            row_counts.index_add_(0, qf[ok], rc[ok])
    return (qb, kb, counts, full), row_counts


def scanned_layout(pattern: Pattern, n: int, block: int, causal: bool) -> BlockLayout:
    """The block layout found by evaluating ``allowed`` on the candidate tiles of the pattern's
    key intervals (the general way; ``structured_layout`` is the analytic one)."""
    (qb, kb, counts, full), _ = scan_tiles(pattern, n, block, causal)
    keep = counts > 0
    qb, kb, counts, full = qb[keep], kb[keep], counts[keep], full[keep]
    nb = math.ceil(n / block)
    crow = torch.zeros(nb + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(qb, minlength=nb), 0)
    return BlockLayout(n=n, block=block, causal=causal, crow=crow, col=kb, full=full, count=counts)


# ------------------------------------------------------------------------------------------
# structure: a pattern as a union of a few structured parts


@dataclass(frozen=True)
class Band:
    """Pairs with i - j = step * m, lo <= m <= hi: a diagonal band (step 1), or a band inside
    each residue class i mod step (step > 1; e.g. a dilated window)."""

    lo: int
    hi: int
    step: int = 1
    exclusive: ClassVar[bool] = True

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        d = q - k
        if self.step == 1:
            return (d >= self.lo) & (d <= self.hi)
        return (d % self.step == 0) & (d >= self.lo * self.step) & (d <= self.hi * self.step)


@dataclass(frozen=True)
class BlockBand:
    """Pairs whose blocks of ``size`` tokens are lo..hi blocks apart: lo <= i//size - j//size <= hi
    (block-local attention is BlockBand(size, 0, 0))."""

    size: int
    lo: int
    hi: int
    exclusive: ClassVar[bool] = True

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        e = q // self.size - k // self.size
        return (e >= self.lo) & (e <= self.hi)


@dataclass(frozen=True, eq=False)
class Keys:
    """Every query attends the keys ``keys`` (sorted, distinct): global tokens, sinks, summary
    columns. May overlap earlier parts: a kernel computes only the pairs they left."""

    keys: torch.Tensor
    exclusive: ClassVar[bool] = False

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.isin(k, self.keys.to(k.device))


@dataclass(frozen=True, eq=False)
class Rows:
    """The queries ``rows`` (sorted, distinct) attend every key. May overlap earlier parts."""

    rows: torch.Tensor
    exclusive: ClassVar[bool] = False

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.isin(q, self.rows.to(q.device))


@dataclass(frozen=True, eq=False)
class Table:
    """Query i attends keys table[i, :] (distinct per row; -1 = unused slot)."""

    table: torch.Tensor  # (n, R) int64
    exclusive: ClassVar[bool] = True

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = self.table.to(q.device)[q.clamp(0, self.table.shape[0] - 1)]
        return (t == k.unsqueeze(-1)).any(-1)


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Query block i // size attends key blocks table[i // size, :] (distinct; -1 = unused)."""

    size: int
    table: torch.Tensor  # (ceil(n / size), R) int64
    exclusive: ClassVar[bool] = True

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = self.table.to(q.device)[(q // self.size).clamp(0, self.table.shape[0] - 1)]
        return (t == (k // self.size).unsqueeze(-1)).any(-1)


@dataclass(frozen=True, eq=False)
class Ranges:
    """Query i attends keys lo[i]..hi[i] (inclusive; none where lo[i] > hi[i]): one contiguous key
    range per query, built from a pattern's boundaries in O(n) (packed documents: each query's own
    document; a prefix LM: the prefix and every earlier key). Both ends are non-decreasing in i,
    so the rows of a query block touch the keys from its first row's lo to its last row's hi."""

    lo: torch.Tensor  # (n,) int64
    hi: torch.Tensor  # (n,) int64
    exclusive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.lo.shape != self.hi.shape or self.lo.dim() != 1:
            raise ValueError("Ranges needs lo and hi of one shape (n,)")
        if self.lo.numel() > 1 and not (
            bool((self.lo[1:] >= self.lo[:-1]).all()) and bool((self.hi[1:] >= self.hi[:-1]).all())
        ):
            raise ValueError("Ranges needs lo and hi non-decreasing in the query index")

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        i = q.clamp(0, self.lo.numel() - 1)
        return (k >= self.lo.to(q.device)[i]) & (k <= self.hi.to(q.device)[i])


Part = Band | BlockBand | Keys | Rows | Table | BlockTable | Ranges


@dataclass(frozen=True, eq=False)
class Structure:
    """A pattern as the union of ``parts`` (then cut to j <= i when causal). Parts marked
    ``exclusive`` (bands, block bands, tables) are pairwise disjoint; ``Keys`` and ``Rows`` may
    overlap anything before them, and a kernel computes only the pairs that earlier parts left.
    ``Pattern.allowed`` stays the definition; tests check that the union equals it."""

    n: int
    causal: bool
    parts: tuple

    def covers(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(broadcast_shape(q.shape, k.shape), dtype=torch.bool, device=q.device)
        for part in self.parts:
            m |= part.covers(q, k)
        return m & (k <= q) if self.causal else m


def _row_interval(part, i: torch.Tensor, n: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive key range [lo, hi] of query rows i for a part whose rows are one interval (its
    ends non-decreasing in i: a band, a block band, ranges)."""
    if isinstance(part, Band):
        lo, hi = i - part.hi, i - part.lo
    elif isinstance(part, Ranges):
        lo, hi = part.lo[i], part.hi[i]
    else:
        blk = i // part.size
        lo, hi = (blk - part.hi) * part.size, (blk - part.lo + 1) * part.size - 1
    lo = lo.clamp(min=0)
    hi = hi.clamp(max=n - 1)
    if causal:
        hi = torch.minimum(hi, i)
    return lo, hi


def _interval_tiles(part, n: int, block: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query block, key block, count) of the tiles a row-interval part touches, counted exactly
    row by row (b vectorised passes over the tiles, no b x b evaluation)."""
    nb = math.ceil(n / block)
    qb = torch.arange(nb)
    first = qb * block
    last = torch.clamp(first + block - 1, max=n - 1)
    lo_first, _ = _row_interval(part, first, n, causal)
    lo_last, hi_last = _row_interval(part, last, n, causal)
    _, hi_first = _row_interval(part, first, n, causal)
    klo = torch.minimum(lo_first, lo_last) // block
    khi = torch.maximum(hi_first, hi_last) // block
    keep = torch.maximum(hi_first, hi_last) >= torch.minimum(lo_first, lo_last)
    qb, klo, khi = qb[keep], klo[keep], khi[keep]
    span = (khi - klo + 1).clamp(min=0)
    tq = torch.repeat_interleave(qb, span)
    tk = torch.repeat_interleave(klo, span) + (
        torch.arange(int(span.sum())) - torch.repeat_interleave(torch.cumsum(span, 0) - span, span)
    )
    count = torch.zeros(tq.numel(), dtype=torch.long)
    k0 = tk * block
    k1 = torch.clamp(k0 + block - 1, max=n - 1)
    for t in range(block):
        i = tq * block + t
        ok = i < n
        lo, hi = _row_interval(part, i.clamp(max=n - 1), n, causal)
        c = (torch.minimum(hi, k1) - torch.maximum(lo, k0) + 1).clamp(min=0)
        count += torch.where(ok, c, 0)
    return tq, tk, count


def _keys_tiles(keys: torch.Tensor, n: int, block: int, causal: bool, transpose: bool = False):
    """Tiles of a Keys part (or, transposed, of a Rows part) with exact counts."""
    nb = math.ceil(n / block)
    other = torch.arange(nb)
    o0 = other * block
    o1 = torch.clamp(o0 + block, max=n)  # exclusive
    x = keys[:, None]
    if not causal:
        c = (o1 - o0).expand(keys.numel(), nb)
    elif not transpose:  # key j: queries i >= j in each query block
        c = (o1 - torch.maximum(o0, x)).clamp(min=0)
    else:  # query i: keys j <= i in each key block
        c = (torch.minimum(o1, x + 1) - o0).clamp(min=0)
    own = keys // block
    blocks, inv = torch.unique(own, return_inverse=True)
    per = torch.zeros(blocks.numel(), nb, dtype=torch.long).index_add_(0, inv, c)
    b_idx, o_idx = torch.nonzero(per, as_tuple=True)
    cnt = per[b_idx, o_idx]
    if transpose:
        return blocks[b_idx], o_idx, cnt
    return o_idx, blocks[b_idx], cnt


def _table_tiles(table: torch.Tensor, n: int, block: int, causal: bool, rows_per_chunk: int = 1 << 16):
    """Tiles of a Table part with exact counts (its keys are distinct per row): one pass over the
    table, by chunks of whole query blocks."""
    nb = math.ceil(n / block)
    step = max(block, rows_per_chunk // block * block)
    qs, ks, cs = [], [], []
    for r0 in range(0, table.shape[0], step):
        t = table[r0 : r0 + step]
        i = torch.arange(r0, r0 + t.shape[0])[:, None].expand_as(t)
        ok = (t >= 0) & (t <= i) if causal else t >= 0
        tiles, cnt = torch.unique((i[ok] // block) * nb + t[ok] // block, return_counts=True)
        qs.append(tiles // nb)
        ks.append(tiles % nb)
        cs.append(cnt)
    return torch.cat(qs), torch.cat(ks), torch.cat(cs)


def structured_layout(pattern: Pattern, st: Structure, block: int) -> BlockLayout | None:
    """The block layout from a structure: each part's tiles are counted analytically; tiles that
    two parts touch are evaluated exactly (few: where a column of sinks meets the band). None
    when a part has no analytic tile count (block tables, residue bands) or would be too large."""
    n, causal = st.n, st.causal
    nb = math.ceil(n / block)
    tq, tk, tc = [], [], []
    for part in st.parts:
        if isinstance(part, (Band, BlockBand, Ranges)) and getattr(part, "step", 1) == 1:
            a, b_, c = _interval_tiles(part, n, block, causal)
        elif isinstance(part, (Keys, Rows)):
            sel = part.keys if isinstance(part, Keys) else part.rows
            if sel.numel() * nb > (1 << 24):
                return None
            a, b_, c = _keys_tiles(sel.cpu(), n, block, causal, transpose=isinstance(part, Rows))
        elif isinstance(part, Table):
            a, b_, c = _table_tiles(part.table[:n].cpu(), n, block, causal)
        else:
            return None
        if a.numel() > (1 << 24) and not isinstance(part, Table):  # a table's tiles: at most its size
            return None
        tq.append(a)
        tk.append(b_)
        tc.append(c)
    code = torch.cat(tq) * nb + torch.cat(tk)
    cnt = torch.cat(tc)
    keep = cnt > 0
    code, cnt = code[keep], cnt[keep]
    uniq, inv, touches = torch.unique(code, return_inverse=True, return_counts=True)
    counts = torch.zeros(uniq.numel(), dtype=torch.long).index_add_(0, inv, cnt)
    qb, kb = uniq // nb, uniq % nb
    shared = torch.nonzero(touches > 1).flatten()
    if shared.numel():
        counts[shared] = _count_allowed(pattern, qb[shared], kb[shared], n, block, causal)
    rows = torch.clamp(n - qb * block, max=block)
    cols = torch.clamp(n - kb * block, max=block)
    keep = counts > 0
    qb, kb, counts, rows, cols = qb[keep], kb[keep], counts[keep], rows[keep], cols[keep]
    crow = torch.zeros(nb + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(qb, minlength=nb), 0)
    return BlockLayout(n=n, block=block, causal=causal, crow=crow, col=kb, full=counts == rows * cols, count=counts)


def _count_allowed(
    pattern: Pattern, qb: torch.Tensor, kb: torch.Tensor, n: int, block: int, causal: bool
) -> torch.Tensor:
    """Allowed pairs in the given tiles, evaluated element by element."""
    ar = torch.arange(block)
    out = torch.empty(qb.numel(), dtype=torch.long)
    step = max(1, TILE_CHUNK_ELEMENTS // (block * block))
    for s in range(0, qb.numel(), step):
        q = qb[s : s + step, None] * block + ar
        k = kb[s : s + step, None] * block + ar
        valid = (q < n)[:, :, None] & (k < n)[:, None, :]
        m = pattern.allowed(q.clamp(max=n - 1)[:, :, None], k.clamp(max=n - 1)[:, None, :], n, causal) & valid
        out[s : s + step] = m.sum(dim=(1, 2))
    return out
