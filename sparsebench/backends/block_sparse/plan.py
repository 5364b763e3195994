"""From a pattern's structure (or, failing that, its block layout) to a list of fused attention
calls over views of q, k and v (``views.py``); ``execute.py`` runs them forward and backward.

Each part of a ``Structure`` becomes a few calls on 4-D views (X sequences, windows, rows, d):

* ``Band`` (a diagonal band): query blocks of 32 rows against overlapping key windows of
  ``width + 31`` keys: one ``as_strided`` view of K and V for all blocks (no gather, no copy) and
  one shared mask, which is one key range per row; the few blocks at the sequence ends are
  separate masked calls. Residue bands (step > 1: dilated windows, strided columns) are the
  same on views with that row stride, one residue class at a time (or all side by side when
  the band reaches back to the start). Wide causal bands (dense) are one causal call.
* ``BlockBand`` (block-local windows): the same, with windows that start at block boundaries;
  for ATen, causal diagonal blocks are split into sub-blocks so that little above the diagonal is
  computed (the native kernel stops each 8-row block at its last key by itself).
* ``Keys`` / ``Rows`` (globals, sinks, summary columns): query chunks against the columns (or
  the gathered rows against all keys), masked only where earlier parts already covered a pair.
* ``Table`` / ``BlockTable`` (random keys, random blocks): keys gathered per query (block).
* ``Ranges`` (packed documents, a prefix LM: one key range per query): chunks of consecutive
  rows against the keys their ranges span, each row's range kept as a ``RangeMask`` (the native
  window kernel computes each 8-row block over its rows' keys only).
* Without a structure: the block layout's diagonal run becomes a ``BlockBand`` and the other
  tiles are gathered, grouped by tile count (identical key blocks gathered once, broadcast).

The plan decides which kernel can take each call: windows whose mask is one key range per row
keep those ranges (the native window kernel's input), key tables keep their per-row keys and,
for the cache-blocked kernel, where each row's key chunks begin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsebench.backends.block_sparse import native as _native
from sparsebench.backends.block_sparse.attend import Mask, RangeMask
from sparsebench.backends.block_sparse.views import Gather, Strided, View
from sparsebench.patterns.base import Pattern
from sparsebench.patterns.geometry import (
    Band,
    BlockBand,
    BlockLayout,
    BlockTable,
    Keys,
    Ranges,
    Rows,
    Structure,
    Table,
)
from sparsebench.shapes import broadcast_shape

# Query rows (over all batch*heads sequences) per call: bounds every temporary to a few MiB.
ROW_BUDGET = 1 << 15
# Query rows per window of a band: the CPU kernel works in units of 32 query rows, so 32 wastes
# least above and below the band at the same speed per unit.
BAND_ROWS = 32
# Keys per block of the CPU kernel: a causal call skips whole blocks past each row, not less.
KV_SPLIT = 512
# Window calls on the native kernel where it is available (see native/); read at run time too.
NATIVE_WINDOWS = True
# Element types the AVX-512 kernels take (bf16 / fp16 widened to fp32 as loaded).
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Query rows per call of the native key-table kernel, and per gathered piece without it.
TABLE_ROWS = 8192
# Bytes of K and V rows per key chunk of the blocked key-table kernel: the chunk stays in L2
# while every query takes its keys from it.
KEY_CHUNK_BYTES = 1 << 20
# Query rows per chunk for masked range calls (columns, rows, wide bands).
RANGE_ROWS = 512
# Masks larger than this whose rows are each one key range are kept as the ranges.
RANGE_MASK_BYTES = 1 << 16
# Ranges parts: query rows per call on the native window kernel (it reads each row's range, so a
# call's size costs nothing but the keys it packs once per sequence), and elsewhere the largest
# rows x keys of a call (ATen's kernel gets the booleans as an additive mask of that size).
RANGES_NATIVE_ROWS = 2048
RANGES_MASK_ELEMENTS = 1 << 22


@dataclass(eq=False)
class Call:
    """One fused attention call: query rows ``q`` against key (and value) rows ``k``, window by
    window, under ``mask`` (None: every pair) or causal within each window. The planner sets
    ``first``, ``table``, ``bounds`` and ``ranges`` (``Planner.finish``)."""

    q: View
    k: View
    mask: Mask | None
    causal: bool
    empty: torch.Tensor | None  # bool, broadcastable to the (X, windows, rows) rows: rows with no key
    kind: str
    first: bool = True  # writes its rows (no earlier call did); else merges into them
    table: torch.Tensor | None = None  # (rows, keys) int32 keys per query row (-1: none): native kernel
    bounds: torch.Tensor | None = None  # (rows, chunks + 1) int32: where each sorted row's key chunks begin
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None  # per query row, its one key range (native)

    def sub(self, m0: int, m1: int) -> "Call":
        """The same call on windows m0..m1-1 only."""

        def cut(t):
            return t if t is None or t.shape[1] == 1 else t[:, m0:m1]

        mask = None if self.mask is None else (self.mask if self.mask.windows == 1 else Mask(cut(self.mask.bool)))
        table = None if self.table is None else self.table[m0:m1]
        bounds = None if self.bounds is None else self.bounds[m0:m1]
        q, k = self.q.sub(m0, m1), self.k.sub(m0, m1)
        return Call(q, k, mask, self.causal, cut(self.empty), self.kind, self.first, table, bounds, self.ranges)

    def pieces(self, rows: int):
        """Sub-calls of at most ``rows`` windows (the call itself when it is small enough)."""
        if self.q.windows <= rows:
            yield 0, self
            return
        for m0 in range(0, self.q.windows, rows):
            yield m0, self.sub(m0, min(self.q.windows, m0 + rows))


@dataclass(eq=False)
class Plan:
    """The calls that compute attention under a pattern for sequences of n tokens."""

    n: int
    causal: bool
    scale: float
    calls: list[Call]
    multi: bool  # some row is computed by more than one call: log-sum-exps are merged
    init: bool  # some row gets no call (or a call mixes new and computed rows): zero-fill first
    kinds: tuple[str, ...]  # the code paths used (e.g. "band", "keys", "tiles"), for tests and notes


# ------------------------------------------------------------------------------------------
# planning


class Planner:
    """Collects the calls of a plan, part by part (``build`` drives it); ``finish`` makes the plan.
    ``groups``: batch * heads sequences, which every call covers at once (its row budget)."""

    def __init__(
        self, n: int, causal: bool, groups: int, device: torch.device, dtype: torch.dtype | None, head_dim: int
    ) -> None:
        self.n, self.causal, self.groups, self.device, self.dtype = n, causal, groups, device, dtype
        self.head_dim = head_dim
        # window calls will run on the native kernel (it computes each row's key range only)
        self.native_windows = (
            NATIVE_WINDOWS and device.type == "cpu" and dtype in NATIVE_DTYPES and head_dim % 32 == 0
            and _native.enabled() and _native.capability() == "AVX512"
        )  # fmt: skip
        self.calls: list[Call] = []
        self.earlier: list = []  # parts already planned (Keys / Rows compute what they left)
        self.kinds: list[str] = []

    def mask(self, allowed: torch.Tensor) -> Mask:
        """A call's mask on the plan's device."""
        return Mask(allowed.to(self.device))

    def chunk(self, rows_per_item: int) -> int:
        """Windows per call whose query rows, over all sequences, stay within ROW_BUDGET."""
        return max(1, ROW_BUDGET // max(1, self.groups * rows_per_item))

    def add(self, q: View, k: View, m: torch.Tensor | None, causal: bool, kind: str) -> None:
        """One call; its mask ``m`` (bool, broadcastable to (1, windows, query rows, keys)) is
        dropped when all true, and rows without any key are noted as ``empty``."""
        mask = empty = None
        if m is not None and not bool(m.all()):
            mask = self.mask(m)
            e = ~m.any(-1)
            if bool(e.any()):
                empty = e.to(self.device)
        self.calls.append(Call(q, k, mask, causal, empty, kind))

    # -- ranges with explicit masks ----------------------------------------------------------
    def range_calls(
        self, first_residue: int, residues: int, step: int, length: int, start: int, end: int, span, pred, kind: str
    ) -> None:
        """Masked calls for positions [start, end) of residues first_residue .. first_residue +
        residues - 1 (row = residue + step * position; step 1: plain rows), each residue
        ``length`` positions long: ``span(a, b)`` gives the key positions of query positions
        [a, b), ``pred(t, u)`` the allowed (query, key) positions."""
        for q_start in range(start, end, RANGE_ROWS):
            q_end = min(end, q_start + RANGE_ROWS)
            key_start, key_end = span(q_start, q_end)
            key_start, key_end = max(0, key_start), min(length, key_end)
            if key_end <= key_start:
                continue
            t = torch.arange(q_start, q_end)[:, None]
            u = torch.arange(key_start, key_end)[None, :]
            m = pred(t, u).expand(q_end - q_start, key_end - key_start)
            if self.causal:
                m = m & (u <= t)
            rows, cols = m.any(1), m.any(0)
            if not bool(rows.any()):
                continue
            row_idx, col_idx = torch.nonzero(rows).flatten(), torch.nonzero(cols).flatten()
            first_row, end_row = q_start + int(row_idx[0]), q_start + int(row_idx[-1]) + 1
            first_key, end_key = key_start + int(col_idx[0]), key_start + int(col_idx[-1]) + 1
            m = m[first_row - q_start : end_row - q_start, first_key - key_start : end_key - key_start]
            qv = Strided(residues, end_row - first_row, 1, first_residue + step * first_row, step)
            kv = Strided(residues, end_key - first_key, 1, first_residue + step * first_key, step)
            self.add(qv, kv, m[None, None], False, kind)

    # -- bands -------------------------------------------------------------------------------
    def band(self, part: Band) -> None:
        n, step = self.n, part.step
        if step >= n:
            step = n  # every residue class holds one position
        # residues of equal length, as (first residue, count, length)
        if n % step == 0:
            classes = [(0, step, n // step)]
        else:
            classes = [(0, n % step, n // step + 1), (n % step, step - n % step, n // step)]
        self.kinds.append("band" if part.step == 1 else "residue_band")
        for first_residue, residues, length in classes:
            if residues > 0 and length > 0:
                self._band(part.lo, part.hi, first_residue, residues, step, length)

    def _band(self, lo: int, hi: int, first_residue: int, residues: int, step: int, length: int) -> None:
        """The band lo <= t - u <= hi over positions t, u of residues first_residue ..
        first_residue + residues - 1 (row = residue + step * position), each ``length`` long."""
        causal = self.causal
        if causal:
            lo = max(lo, 0)
        lo, hi = max(lo, -(length - 1)), min(hi, length - 1)
        if lo > hi:
            return
        width = hi - lo + 1
        block_rows = BAND_ROWS
        window_keys = width + block_rows - 1  # keys of one query block's window

        def pred(t, u):
            return ((t - u) >= lo) & ((t - u) <= hi)

        def span(a, c):
            return a - hi, c - lo

        def rows_at(rows: int, position: int) -> Strided:
            """``rows`` consecutive positions from ``position`` on, in every residue."""
            return Strided(residues, rows, 1, first_residue + step * position, step)

        if causal and hi == length - 1:  # every key at least lo back: causal attention, shifted by lo
            rows = length - lo
            if rows <= 0:
                return
            if rows > 4 * KV_SPLIT:  # long: one causal call, the kernel skips key blocks past each row
                self.calls.append(Call(rows_at(rows, lo), rows_at(rows, 0), None, True, None, "band_causal"))
                return
            if self.native_windows:  # one call: the native kernel stops each row at its diagonal
                tt = torch.arange(rows)[:, None]
                self.add(rows_at(rows, lo), rows_at(rows, 0), (torch.arange(rows)[None, :] <= tt)[None, None], False,
                         "band_causal")  # fmt: skip
                return
            # short (ATen's kernel would compute the whole square): 32 rows at a time
            for row_start in range(0, rows, block_rows):
                row_end = min(rows, row_start + block_rows)
                tt = torch.arange(row_start, row_end)[:, None]
                uu = torch.arange(row_end)[None, :]
                qv = rows_at(row_end - row_start, lo + row_start)
                self.add(qv, rows_at(row_end, 0), (uu <= tt)[None, None], False, "band_causal")
            return
        if not causal and lo == -(length - 1) and hi == length - 1:
            qv = rows_at(length, 0)
            self.calls.append(Call(qv, qv, None, False, None, "band_full"))
            return
        first_block = -(-hi // block_rows) if hi > 0 else 0  # first query block whose window starts at key >= 0
        # first block whose window (or rows) passes the end
        end_block = min(length - window_keys + hi, length - block_rows) // block_rows + 1
        if window_keys >= length or end_block <= first_block:
            self.range_calls(first_residue, residues, step, length, 0, length, span, pred, "band_edge")
            return
        tt = torch.arange(block_rows)[:, None]
        uu = torch.arange(window_keys)[None, :]
        shared = self.mask(((uu >= tt) & (uu <= tt + (hi - lo)))[None, None])
        per_call = self.chunk(block_rows)
        for residue in range(first_residue, first_residue + residues):  # windows take the windows dimension
            for s in range(first_block, end_block, per_call):
                windows = min(per_call, end_block - s)
                qv = Strided(windows, block_rows, step * block_rows, residue + step * s * block_rows, step)
                kv = Strided(windows, window_keys, step * block_rows, residue + step * (s * block_rows - hi), step)
                self.calls.append(Call(qv, kv, shared, False, None, "band_window"))
        edges = [(0, first_block * block_rows)] if first_block > 0 else []
        for start, end in edges + [(end_block * block_rows, length)]:
            self.range_calls(first_residue, residues, step, length, start, end, span, pred, "band_edge")

    def block_band(self, part: BlockBand) -> None:
        n, causal, size = self.n, self.causal, part.size
        lo, hi = part.lo, part.hi
        if causal:
            lo = max(lo, 0)
        num_blocks = -(-n // size)
        lo, hi = max(lo, -(num_blocks - 1)), min(hi, num_blocks - 1)
        if lo > hi:
            return
        self.kinds.append("block_band")
        diag = causal and lo == 0
        sub = size  # query rows per call window: the block, or a sub-block of it
        # causal diagonal blocks in sub-blocks, so that ATen's kernel computes less above the
        # diagonal (the native kernel stops each row block at its last key anyway, and one call
        # per block packs each key once)
        if diag and size > 32 and not self.native_windows:
            sub = next((c for c in (64, 32) if size % c == 0 and c < size), size)

        def pred(i, j):
            e = i // size - j // size
            return (e >= lo) & (e <= hi)

        def span(a, c):
            return (a // size - hi) * size, ((c - 1) // size - lo + 1) * size

        first_block = max(hi, 0)
        sub_blocks = []  # (index of the sub-block in its block, keys of its window)
        end_block = n  # interior blocks first_block <= A < end_block: every sub-block's queries and keys in range
        for p in range(size // sub):
            window_keys = hi * size + (p + 1) * sub if diag else (hi - lo + 1) * size
            sub_blocks.append((p, window_keys))
            end_block = min(end_block, (n - (p + 1) * sub) // size + 1, (n - window_keys) // size + hi + 1)
        if end_block <= first_block:
            end_block = first_block
        per_call = self.chunk(sub)
        for p, window_keys in sub_blocks:
            if end_block <= first_block:
                break
            mask = None
            if diag:
                tt = torch.arange(sub)[:, None]
                uu = torch.arange(window_keys)[None, :]
                mask = self.mask((uu <= hi * size + p * sub + tt)[None, None])
            for s in range(first_block, end_block, per_call):
                windows = min(per_call, end_block - s)
                qv = Strided(windows, sub, size, s * size + p * sub)
                kv = Strided(windows, window_keys, size, (s - hi) * size)
                self.calls.append(Call(qv, kv, mask, False, None, "block_band_window"))
        if first_block > 0:
            self.range_calls(0, 1, 1, n, 0, min(n, first_block * size), span, pred, "block_band_edge")
        self.range_calls(0, 1, 1, n, min(n, end_block * size), n, span, pred, "block_band_edge")

    # -- columns, rows, tables ----------------------------------------------------------------
    def _uncovered(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Pairs (i, j) that no part planned so far covers (and, causal, j <= i)."""
        m = torch.ones(broadcast_shape(i.shape, j.shape), dtype=torch.bool)
        for part in self.earlier:
            m &= ~part.covers(i, j)
        if self.causal:
            m &= j <= i
        return m

    def keys(self, part: Keys) -> None:
        """Key columns: chunks of query rows against the columns (a view when they are
        consecutive, else gathered), masked where earlier parts covered a pair."""
        keys = part.keys.cpu()
        keys = keys[keys < self.n]
        if keys.numel() == 0:
            return
        self.kinds.append("keys")
        n = self.n
        contiguous = keys.numel() == 1 or bool((keys[1:] - keys[:-1] == 1).all())
        rows_chunk = max(RANGE_ROWS, min(4096, (1 << 22) // keys.numel()))
        for chunk_start in range(0, n, rows_chunk):
            chunk_end = min(n, chunk_start + rows_chunk)
            m = self._uncovered(torch.arange(chunk_start, chunk_end)[:, None], keys[None, :])
            rows = m.any(1)
            if not bool(rows.any()):
                continue
            row_idx, col_idx = torch.nonzero(rows).flatten(), torch.nonzero(m.any(0)).flatten()
            first_row, end_row = chunk_start + int(row_idx[0]), chunk_start + int(row_idx[-1]) + 1
            first_key, end_key = int(col_idx[0]), int(col_idx[-1]) + 1
            m = m[first_row - chunk_start : end_row - chunk_start, first_key:end_key]
            qv = Strided(1, end_row - first_row, 1, first_row)
            if contiguous:
                kv: View = Strided(1, end_key - first_key, 1, int(keys[first_key]))
            else:
                kv = Gather(keys[first_key:end_key].to(self.device), 1, end_key - first_key)
            self.add(qv, kv, m[None, None], False, "keys")

    def rows(self, part: Rows) -> None:
        """Query rows against every key: the rows gathered, one call."""
        rows = part.rows.cpu()
        rows = rows[rows < self.n]
        if rows.numel() == 0:
            return
        self.kinds.append("rows")
        m = self._uncovered(rows[:, None], torch.arange(self.n)[None, :])
        keep = m.any(1)
        rows, m = rows[keep], m[keep]
        if rows.numel() == 0:
            return
        col_idx = torch.nonzero(m.any(0)).flatten()
        first_key, end_key = int(col_idx[0]), int(col_idx[-1]) + 1
        qv = Gather(rows.to(self.device), 1, rows.numel())
        self.add(qv, Strided(1, end_key - first_key, 1, first_key), m[None, None, :, first_key:end_key], False, "rows")

    def table(self, part: Table) -> None:
        """Per-query key tables: calls of single query rows against their gathered keys, which
        carry the table itself for the native kernels (and, blocked, each row's chunk bounds)."""
        n = self.n
        table = part.table[:n].cpu()
        self.kinds.append("table")
        keys_per_row = table.shape[1]
        cpu = self.device.type == "cpu" and _native.enabled()
        # AVX-512: the cache-blocked kernel (fp32, bf16, fp16), chunks of keys whose K and V rows
        # fill ~1 MiB in fp32; while there are no more chunks than keys per query (beyond that,
        # the per-chunk bounds would outgrow the table itself, n^2 / chunk, and most visits would
        # find nothing)
        chunk = max(64, KEY_CHUNK_BYTES // (2 * 4 * self.head_dim))
        blocked = cpu and self.native_windows and self.head_dim in (32, 64, 128) and -(-n // chunk) <= keys_per_row
        native = cpu and (self.dtype == torch.float32 or blocked)
        # the native kernels read rows in place (large calls); gathering needs small ones
        rows_per_call = TABLE_ROWS if native else 8 * self.chunk(keys_per_row)
        for start in range(0, n, rows_per_call):
            end = min(n, start + rows_per_call)
            row_keys = table[start:end]
            ok = row_keys >= 0
            if self.causal:
                ok &= row_keys <= torch.arange(start, end)[:, None]
            qv = Strided(end - start, 1, 1, start)
            kv = Gather(row_keys.clamp(min=0).flatten().to(self.device), end - start, keys_per_row)
            self.add(qv, kv, ok[None, :, None, :], False, "table")
            row_table = torch.where(ok, row_keys, -1).to(torch.int32)
            if blocked:  # keys sorted per row, and where each row's keys of each chunk begin
                row_table = row_table.sort(dim=1).values
                edges = torch.arange(0, n + chunk, chunk, dtype=torch.int32).clamp(max=n)
                bounds = torch.searchsorted(row_table, edges.expand(end - start, edges.numel()).contiguous())
                self.calls[-1].bounds = bounds.to(torch.int32).contiguous()
            self.calls[-1].table = row_table.contiguous()

    def block_table(self, part: BlockTable) -> None:
        """Per-query-block key-block tables: query blocks against their gathered key blocks."""
        n, size = self.n, part.size
        num_blocks = -(-n // size)
        table = part.table[:num_blocks].cpu()
        self.kinds.append("block_table")
        blocks_per_row = table.shape[1]
        ar = torch.arange(size)
        per_call = self.chunk(size)
        # calls without a mask: blocks from the first whose slots are all used (and, causal,
        # before it); the first blocks and a short last one get calls of their own
        full_blocks = n // size
        used = (table >= 0).all(1)
        first_used = int(torch.nonzero(~used).max()) + 1 if bool((~used[:full_blocks]).any()) else 0
        first_used = min(first_used, full_blocks)
        cuts = [0, first_used] + list(range(first_used + per_call, full_blocks, per_call)) + [full_blocks, num_blocks]
        for cut_start, cut_end in zip(cuts[:-1], cuts[1:]):
            for call_start in range(cut_start, cut_end, per_call):
                call_end = min(cut_end, call_start + per_call)
                self._block_table_call(table, call_start, call_end, size, blocks_per_row, ar)

    def _block_table_call(self, table, start, end, size, blocks_per_row, ar) -> None:
        n = self.n
        windows = end - start
        blocks = table[start:end]  # (windows, blocks_per_row)
        keys_per_row = blocks_per_row * size
        keys = (blocks.clamp(min=0)[:, :, None] * size + ar).reshape(windows, keys_per_row)
        ok = (blocks >= 0)[:, :, None].expand(windows, blocks_per_row, size).reshape(windows, keys_per_row) & (keys < n)
        rows = min(size, n - start * size)
        i = (torch.arange(start, end)[:, None] * size + ar[:rows])[:, :, None]  # (windows, rows, 1)
        okm = ok[:, None, :].expand(windows, rows, keys_per_row)
        if self.causal:
            okm = okm & (keys[:, None, :] <= i)
        if not bool(okm.any()):
            return
        qv = Strided(windows, rows, size, start * size)
        kv = Gather(keys.clamp(max=n - 1).flatten().to(self.device), windows, keys_per_row)
        self.add(qv, kv, okm[None], False, "block_table")

    def ranges(self, part: Ranges) -> None:
        """One key range per query row: chunks of consecutive rows against the keys their ranges
        span (both ends non-decreasing, so a chunk's keys run from its first row's lo to its last
        row's hi), each row's range kept as a RangeMask: no n x n mask, and the native window
        kernel computes each 8-row block over its own rows' keys only."""
        n = self.n
        i = torch.arange(n)
        lo, hi = part.lo[:n].cpu().clamp(min=0), part.hi[:n].cpu().clamp(max=n - 1)
        if self.causal:
            hi = torch.minimum(hi, i)
        self.kinds.append("ranges")
        start = 0
        while start < n:
            end = min(n, start + (RANGES_NATIVE_ROWS if self.native_windows else RANGE_ROWS))
            if not self.native_windows:  # ATen: the additive mask of rows x keys stays bounded
                while (
                    end - start > BAND_ROWS
                    and (end - start) * (int(hi[end - 1]) - int(lo[start]) + 1) > RANGES_MASK_ELEMENTS
                ):
                    end = start + max(BAND_ROWS, (end - start) // 2)
            row_lo, row_hi = lo[start:end], hi[start:end]
            has = row_lo <= row_hi
            if bool(has.any()):
                first_key, end_key = int(row_lo[has].min()), int(row_hi[has].max()) + 1
                keys = end_key - first_key
                mask = RangeMask(
                    torch.where(has, row_lo - first_key, 1).to(self.device),
                    torch.where(has, row_hi - first_key, 0).to(self.device),
                    keys,
                )
                empty = None if bool(has.all()) else (~has)[None, None].to(self.device)
                qv = Strided(1, end - start, 1, start)
                self.calls.append(Call(qv, Strided(1, keys, 1, first_key), mask, False, empty, "ranges"))
            start = end

    # -- tiles of a block layout ---------------------------------------------------------------
    def tiles(self, pattern: Pattern, layout: BlockLayout, keep: torch.Tensor) -> None:
        """Gathered tiles (the generic path): query blocks grouped by their number of tiles."""
        n, block = self.n, layout.block
        rows_of = layout.row_of_tiles()[keep]
        cols = layout.col[keep]
        full = layout.full[keep]
        if cols.numel() == 0:
            return
        self.kinds.append("tiles")
        num_blocks = layout.num_blocks
        per_row = torch.bincount(rows_of, minlength=num_blocks)
        starts = torch.cumsum(per_row, 0) - per_row
        ar = torch.arange(block)
        short = n % block != 0
        for count in torch.unique(per_row).tolist():
            if count == 0:
                continue
            rows = torch.nonzero(per_row == count).flatten()
            if short:
                rows = rows[rows != num_blocks - 1]
            per_call = self.chunk(block)
            for start in range(0, rows.numel(), per_call):
                self._tile_call(pattern, rows[start : start + per_call], starts, cols, full, count, block, ar)
        if short and per_row[num_blocks - 1] > 0:
            last = num_blocks - 1
            self._tile_call(pattern, torch.tensor([last]), starts, cols, full, int(per_row[last]), block, ar)

    def _tile_call(self, pattern, qblocks, starts, cols, full, count, block, ar) -> None:
        n = self.n
        windows = qblocks.numel()
        idx = starts[qblocks][:, None] + torch.arange(count)
        key_blocks = cols[idx]  # (windows, count)
        keys = (key_blocks[:, :, None] * block + ar).reshape(windows, count * block)
        nrows = min(block, n - int(qblocks[0]) * block)
        m = None
        if not bool(full[idx].all()) or bool((keys >= n).any()):
            i = (qblocks[:, None] * block + ar[:nrows])[:, :, None]
            m = pattern.allowed(i.clamp(max=n - 1), keys.clamp(max=n - 1)[:, None, :], n, self.causal)
            m = (m & (keys < n)[:, None, :])[None]
        if windows == 1 or bool((qblocks[1:] - qblocks[:-1] == 1).all()):
            qv: View = Strided(windows, nrows, block, int(qblocks[0]) * block)
        else:
            qv = Gather((qblocks[:, None] * block + ar).flatten().to(self.device), windows, block)
        same = windows == 1 or bool((key_blocks == key_blocks[:1]).all())
        consecutive = count == 1 or bool((key_blocks[0, 1:] - key_blocks[0, :-1] == 1).all())
        if same and consecutive and int(key_blocks[0, -1]) * block + block <= n:
            kv: View = Strided(windows, count * block, 0, int(key_blocks[0, 0]) * block)  # one key range, all rows
        elif same:  # the same key blocks for all rows: gathered once
            kv = Gather(keys[0].clamp(max=n - 1).to(self.device), windows, count * block, shared=True)
        else:
            kv = Gather(keys.clamp(max=n - 1).flatten().to(self.device), windows, count * block)
        self.add(qv, kv, m, False, "tiles")

    # -- bookkeeping ---------------------------------------------------------------------------
    def finish(self, scale: float) -> Plan:
        """Mark each call as the first writer of its rows or a merge into them."""
        written = torch.zeros(self.n, dtype=torch.int32)
        init = False
        for call in self.calls:
            pos = call.q.positions(self.n)
            seen = written[pos]
            call.first = not bool(seen.any())
            init = init or (not call.first and not bool(seen.all()))
            written[pos] += 1
        multi = bool((written > 1).any())
        init = init or bool((written == 0).any())
        for call in self.calls:
            call.ranges = _row_ranges(call)
            if (
                call.ranges is not None
                and call.mask is not None
                and not isinstance(call.mask, RangeMask)
                and call.mask.stored_bytes > RANGE_MASK_BYTES
            ):
                # a mask of its own per row (key columns against many rows): kept as its ranges
                lo, hi = call.ranges
                if call.mask.bool.shape[2] == lo.numel():
                    lo, hi = lo.to(self.device, torch.int64), hi.to(self.device, torch.int64)
                    call.mask = RangeMask(lo, hi, call.k.length)
        return Plan(self.n, self.causal, scale, self.calls, multi, init, tuple(dict.fromkeys(self.kinds)))


def _row_ranges(call: Call) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo, hi) int32 per query row when every row of every window sees one contiguous key range
    and all windows alike (a shared mask or none): the native window kernel's input."""
    if call.causal or call.table is not None:
        return None
    if isinstance(call.mask, RangeMask):  # planned as ranges (Ranges parts): taken as they are
        return call.mask.lo.cpu().to(torch.int32), call.mask.hi.cpu().to(torch.int32)
    rows, keys = call.q.length, call.k.length
    if call.mask is None:
        lo = torch.zeros(rows, dtype=torch.int32)
        return lo, torch.full((rows,), keys - 1, dtype=torch.int32)
    m = call.mask.bool
    if m.dim() != 4 or m.shape[0] != 1 or m.shape[1] != 1:
        return None
    m = m[0, 0].expand(rows, keys).cpu()
    idx = torch.arange(keys)
    any_key = m.any(1)
    lo = torch.where(m, idx, keys).min(1).values
    hi = torch.where(m, idx, -1).max(1).values
    if not bool((m.sum(1) == torch.where(any_key, hi - lo + 1, 0)).all()):
        return None
    lo = torch.where(any_key, lo, 1)
    hi = torch.where(any_key, hi, 0)
    return lo.to(torch.int32), hi.to(torch.int32)


def _detect_band(layout: BlockLayout, keep_all: torch.Tensor) -> tuple[BlockBand | None, torch.Tensor]:
    """The longest diagonal run of full tiles (causal: and the diagonal triangle) present in
    every block row, as a BlockBand, and the tiles it does not cover."""
    n, block, causal = layout.n, layout.block, layout.causal
    num_blocks = layout.num_blocks
    rows = layout.row_of_tiles()
    cols = layout.col
    offset = rows - cols
    block_rows = torch.clamp(n - rows * block, max=block)
    diag_full = block_rows * (block_rows + 1) // 2 if causal else block_rows * block_rows
    good = layout.full | ((offset == 0) & (layout.count == diag_full))
    cap = 8
    best, best_cover = None, 0
    candidates: list[BlockBand] = []
    # diagonal runs at the layout's block size: offsets 0..back (and -forward..-1 bidirectional)
    back_tiles = torch.zeros(num_blocks, cap + 1, dtype=torch.bool)
    sel = good & (offset >= 0) & (offset <= cap)
    back_tiles[rows[sel], offset[sel]] = True
    run = torch.where(back_tiles.all(1), cap + 1, torch.argmin(back_tiles.int(), dim=1))
    reach = torch.arange(num_blocks) + 1  # offsets available in block row r: 0..r
    limited = run < torch.clamp(reach, max=cap + 1)
    back = int(run[limited].min()) - 1 if bool(limited.any()) else cap
    forward = 0
    if not causal and back >= 0:
        forward_tiles = torch.zeros(num_blocks, cap + 1, dtype=torch.bool)
        sel = good & (offset <= 0) & (offset >= -cap)
        forward_tiles[rows[sel], -offset[sel]] = True
        run_f = torch.where(forward_tiles.all(1), cap + 1, torch.argmin(forward_tiles.int(), dim=1))
        reach_f = num_blocks - torch.arange(num_blocks)
        limited_f = run_f < torch.clamp(reach_f, max=cap + 1)
        forward = int(run_f[limited_f].min()) - 1 if bool(limited_f.any()) else cap
        forward = max(forward, 0)
    if back >= 0:
        candidates.append(BlockBand(block, -forward, back))
    # coarse block-diagonal windows (DeepSpeed local windows): blocks of factor * block
    for factor in (16, 8, 4, 2):
        if factor * block >= n:
            continue
        part = BlockBand(factor * block, 0, 0)
        inside = (rows // factor) == (cols // factor)
        if causal:
            need = (torch.arange(num_blocks) % factor) + 1
        else:
            need = torch.clamp(n - (torch.arange(num_blocks) // factor) * factor * block, max=factor * block)
            need = -(-need // block)
        have = torch.bincount(rows[inside & good], minlength=num_blocks)
        if bool((have >= need).all()):
            candidates.append(part)
            break
    for part in candidates:
        if part.size == block:
            covers = (offset >= part.lo) & (offset <= part.hi)
        else:
            covers = (rows * block) // part.size == (cols * block) // part.size
        total = int(covers.sum())
        if total > best_cover:
            best, best_cover = part, total
    if best is None:
        return None, keep_all
    if best.size == block:
        covered = (offset >= best.lo) & (offset <= best.hi)
    else:
        covered = (rows * block) // best.size == (cols * block) // best.size
    return best, keep_all & ~covered


def build(
    pattern: Pattern,
    n: int,
    causal: bool,
    *,
    groups: int,
    head_dim: int,
    block: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    structured: bool = True,
) -> Plan:
    """The plan for a problem: from ``pattern.structure`` when it has one (and ``structured``),
    else from the block layout at ``block``. ``dtype`` decides whether key tables use the native
    kernel (fp32 on the CPU)."""
    st: Structure | None = pattern.structure(n, causal) if structured else None
    # the structure's own causality: a pattern that keeps pairs above the diagonal in a causal
    # case (prefix_lm's prefix) describes itself as a bidirectional structure
    bld = Planner(n, st.causal if st is not None else causal, groups, device, dtype, head_dim)
    if st is not None:
        for part in st.parts:
            if isinstance(part, Band):
                bld.band(part)
            elif isinstance(part, BlockBand):
                bld.block_band(part)
            elif isinstance(part, Keys):
                bld.keys(part)
            elif isinstance(part, Rows):
                bld.rows(part)
            elif isinstance(part, Table):
                bld.table(part)
            elif isinstance(part, BlockTable):
                bld.block_table(part)
            elif isinstance(part, Ranges):
                bld.ranges(part)
            else:  # pragma: no cover - a new part type without a planner
                raise TypeError(f"no planner for {type(part).__name__}")
            bld.earlier.append(part)
    else:
        layout = pattern.block_layout(n, block, causal)
        bld.causal = layout.causal  # the layout's own causality, as the structure's above
        band, keep = _detect_band(layout, torch.ones(layout.nnz_blocks, dtype=torch.bool))
        if band is not None:
            bld.block_band(band)
        bld.tiles(pattern, layout, keep)
    return bld.finish(1.0 / math.sqrt(head_dim))
