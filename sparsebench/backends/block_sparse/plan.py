"""From a pattern's structure (or, failing that, its block layout) to a list of fused attention
calls over views of q, k and v (``views.py``); ``execute.py`` runs them forward and backward.

Each part of a ``Structure`` becomes a few calls on 4-D views (X sequences, M windows, rows, d):

* ``Band`` (a diagonal band): query blocks of 32 rows against overlapping key windows of
  ``width + 31`` keys: one ``as_strided`` view of K and V for all blocks (no gather, no copy) and
  one shared mask, which is one key range per row; the few blocks at the sequence ends are
  separate masked calls. Residue bands (step D > 1: dilated windows, strided columns) are the
  same on views with a row stride of D, one residue class at a time (or all side by side when
  the band reaches back to the start). Wide causal bands (dense) are one causal call.
* ``BlockBand`` (block-local windows): the same, with windows that start at block boundaries;
  for ATen, causal diagonal blocks are split into sub-blocks so that little above the diagonal is
  computed (the native kernel stops each 8-row block at its last key by itself).
* ``Keys`` / ``Rows`` (globals, sinks, summary columns): query chunks against the columns (or
  the gathered rows against all keys), masked only where earlier parts already covered a pair.
* ``Table`` / ``BlockTable`` (random keys, random blocks): keys gathered per query (block).
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
from sparsebench.patterns.geometry import Band, BlockBand, BlockLayout, BlockTable, Keys, Rows, Structure, Table
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


@dataclass(eq=False)
class Call:
    q: View
    k: View
    mask: Mask | None
    causal: bool
    empty: torch.Tensor | None  # bool, broadcastable to the (X, M, R) rows: rows with no key
    kind: str
    first: bool = True  # writes its rows (no earlier call did); else merges into them
    table: torch.Tensor | None = None  # (rows, R) int32 keys per query row (-1: none): native kernel
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
        if self.q.M <= rows:
            yield 0, self
            return
        for m0 in range(0, self.q.M, rows):
            yield m0, self.sub(m0, min(self.q.M, m0 + rows))


@dataclass(eq=False)
class Plan:
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
    def __init__(self, n: int, causal: bool, groups: int, device: torch.device, dtype: torch.dtype | None, head_dim: int):
        self.n, self.causal, self.groups, self.device, self.dtype = n, causal, groups, device, dtype
        self.head_dim = head_dim
        # window calls will run on the native kernel (it computes each row's key range only)
        self.native_windows = (
            NATIVE_WINDOWS and device.type == "cpu" and dtype in NATIVE_DTYPES and head_dim % 32 == 0
            and _native.enabled() and _native._capability() == "AVX512"
        )  # fmt: skip
        self.calls: list[Call] = []
        self.earlier: list = []  # parts already planned (Keys / Rows compute what they left)
        self.kinds: list[str] = []

    def mask(self, allowed: torch.Tensor) -> Mask:
        return Mask(allowed.to(self.device))

    def chunk(self, rows_per_item: int) -> int:
        return max(1, ROW_BUDGET // max(1, self.groups * rows_per_item))

    def add(self, q: View, k: View, m: torch.Tensor | None, causal: bool, kind: str) -> None:
        """One call; ``m`` (bool, broadcastable to (1, M, R, S)) is dropped when all true."""
        mask = empty = None
        if m is not None and not bool(m.all()):
            mask = self.mask(m)
            e = ~m.any(-1)
            if bool(e.any()):
                empty = e.to(self.device)
        self.calls.append(Call(q, k, mask, causal, empty, kind))

    # -- ranges with explicit masks ----------------------------------------------------------
    def range_calls(self, r0: int, nr: int, D: int, length: int, c0: int, c1: int, span, pred, kind: str) -> None:
        """Masked calls for positions [c0, c1) of residues r0..r0+nr-1 (row = r + D * position;
        D = 1: plain rows), each residue ``length`` positions long: ``span(a, b)`` gives the key
        positions of query positions [a, b), ``pred(t, u)`` the allowed (query, key) positions."""
        for a in range(c0, c1, RANGE_ROWS):
            b_ = min(c1, a + RANGE_ROWS)
            k0, k1 = span(a, b_)
            k0, k1 = max(0, k0), min(length, k1)
            if k1 <= k0:
                continue
            t = torch.arange(a, b_)[:, None]
            u = torch.arange(k0, k1)[None, :]
            m = pred(t, u).expand(b_ - a, k1 - k0)
            if self.causal:
                m = m & (u <= t)
            rows, cols = m.any(1), m.any(0)
            if not bool(rows.any()):
                continue
            rr, cc = torch.nonzero(rows).flatten(), torch.nonzero(cols).flatten()
            q0, q1 = a + int(rr[0]), a + int(rr[-1]) + 1
            j0, j1 = k0 + int(cc[0]), k0 + int(cc[-1]) + 1
            m = m[q0 - a : q1 - a, j0 - k0 : j1 - k0]
            qv = Strided(nr, q1 - q0, 1, r0 + D * q0, D)
            kv = Strided(nr, j1 - j0, 1, r0 + D * j0, D)
            self.add(qv, kv, m[None, None], False, kind)

    # -- bands -------------------------------------------------------------------------------
    def band(self, part: Band) -> None:
        n, D = self.n, part.step
        if D >= n:
            D = n  # every residue class holds one position
        # residues of equal length, as (first residue, count, length)
        groups = [(0, D, n // D)] if n % D == 0 else [(0, n % D, n // D + 1), (n % D, D - n % D, n // D)]
        self.kinds.append("band" if part.step == 1 else "residue_band")
        for r0, nr, L in groups:
            if nr > 0 and L > 0:
                self._band(part.lo, part.hi, r0, nr, D, L)

    def _band(self, lo: int, hi: int, r0: int, nr: int, D: int, L: int) -> None:
        causal = self.causal
        if causal:
            lo = max(lo, 0)
        lo, hi = max(lo, -(L - 1)), min(hi, L - 1)
        if lo > hi:
            return
        width = hi - lo + 1
        b = BAND_ROWS
        S = width + b - 1

        def pred(t, u):
            return ((t - u) >= lo) & ((t - u) <= hi)

        def span(a, c):
            return a - hi, c - lo

        if causal and hi == L - 1:  # every key at least lo back: causal attention, shifted by lo
            rows = L - lo
            if rows <= 0:
                return
            if rows > 4 * KV_SPLIT:  # long: one causal call, the kernel skips key blocks past each row
                qv = Strided(nr, rows, 1, r0 + D * lo, D)
                kv = Strided(nr, rows, 1, r0, D)
                self.calls.append(Call(qv, kv, None, True, None, "band_causal"))
                return
            if self.native_windows:  # one call: the native kernel stops each row at its diagonal
                tt = torch.arange(rows)[:, None]
                qv = Strided(nr, rows, 1, r0 + D * lo, D)
                kv = Strided(nr, rows, 1, r0, D)
                self.add(qv, kv, (torch.arange(rows)[None, :] <= tt)[None, None], False, "band_causal")
                return
            # short (ATen's kernel would compute the whole square): 32 rows at a time
            for c in range(0, rows, b):
                e = min(rows, c + b)
                tt = torch.arange(c, e)[:, None]
                uu = torch.arange(e)[None, :]
                qv = Strided(nr, e - c, 1, r0 + D * (lo + c), D)
                kv = Strided(nr, e, 1, r0, D)
                self.add(qv, kv, (uu <= tt)[None, None], False, "band_causal")
            return
        if not causal and lo == -(L - 1) and hi == L - 1:
            qv = Strided(nr, L, 1, r0, D)
            self.calls.append(Call(qv, qv, None, False, None, "band_full"))
            return
        a0 = -(-hi // b) if hi > 0 else 0  # first query block whose window starts at key >= 0
        a1 = min(L - S + hi, L - b) // b + 1  # first block whose window (or rows) passes the end
        if S >= L or a1 <= a0:
            self.range_calls(r0, nr, D, L, 0, L, span, pred, "band_edge")
            return
        tt = torch.arange(b)[:, None]
        uu = torch.arange(S)[None, :]
        shared = self.mask(((uu >= tt) & (uu <= tt + (hi - lo)))[None, None])
        step = self.chunk(b)
        for r in range(r0, r0 + nr):  # windows use the M dimension: one residue at a time
            for s in range(a0, a1, step):
                m = min(step, a1 - s)
                qv = Strided(m, b, D * b, r + D * s * b, D)
                kv = Strided(m, S, D * b, r + D * (s * b - hi), D)
                self.calls.append(Call(qv, kv, shared, False, None, "band_window"))
        if a0 > 0:
            self.range_calls(r0, nr, D, L, 0, a0 * b, span, pred, "band_edge")
        self.range_calls(r0, nr, D, L, a1 * b, L, span, pred, "band_edge")

    def block_band(self, part: BlockBand) -> None:
        n, causal, bb = self.n, self.causal, part.size
        lo, hi = part.lo, part.hi
        if causal:
            lo = max(lo, 0)
        nA = -(-n // bb)
        lo, hi = max(lo, -(nA - 1)), min(hi, nA - 1)
        if lo > hi:
            return
        self.kinds.append("block_band")
        diag = causal and lo == 0
        b = bb
        # causal diagonal blocks in sub-blocks, so that ATen's kernel computes less above the
        # diagonal (the native kernel stops each row block at its last key anyway, and one call
        # per block packs each key once)
        if diag and bb > 32 and not self.native_windows:
            b = next((c for c in (64, 32) if bb % c == 0 and c < bb), bb)

        def pred(i, j):
            e = i // bb - j // bb
            return (e >= lo) & (e <= hi)

        def span(a, c):
            return (a // bb - hi) * bb, ((c - 1) // bb - lo + 1) * bb

        A0 = max(hi, 0)
        subs = []
        A1 = n  # interior blocks A0 <= A < A1: every sub-block's queries and keys in range
        for p in range(bb // b):
            S = hi * bb + (p + 1) * b if diag else (hi - lo + 1) * bb
            subs.append((p, S))
            A1 = min(A1, (n - (p + 1) * b) // bb + 1, (n - S) // bb + hi + 1)
        if A1 <= A0:
            A1 = A0
        step = self.chunk(b)
        for p, S in subs:
            if A1 <= A0:
                break
            mask = None
            if diag:
                tt = torch.arange(b)[:, None]
                uu = torch.arange(S)[None, :]
                mask = self.mask((uu <= hi * bb + p * b + tt)[None, None])
            for s in range(A0, A1, step):
                m = min(step, A1 - s)
                qv = Strided(m, b, bb, s * bb + p * b)
                kv = Strided(m, S, bb, (s - hi) * bb)
                self.calls.append(Call(qv, kv, mask, False, None, "block_band_window"))
        if A0 > 0:
            self.range_calls(0, 1, 1, n, 0, min(n, A0 * bb), span, pred, "block_band_edge")
        self.range_calls(0, 1, 1, n, min(n, A1 * bb), n, span, pred, "block_band_edge")

    # -- columns, rows, tables ----------------------------------------------------------------
    def _uncovered(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        m = torch.ones(broadcast_shape(i.shape, j.shape), dtype=torch.bool)
        for part in self.earlier:
            m &= ~part.covers(i, j)
        if self.causal:
            m &= j <= i
        return m

    def keys(self, part: Keys) -> None:
        keys = part.keys.cpu()
        keys = keys[keys < self.n]
        if keys.numel() == 0:
            return
        self.kinds.append("keys")
        n = self.n
        contiguous = keys.numel() == 1 or bool((keys[1:] - keys[:-1] == 1).all())
        rows_chunk = max(RANGE_ROWS, min(4096, (1 << 22) // keys.numel()))
        for c0 in range(0, n, rows_chunk):
            c1 = min(n, c0 + rows_chunk)
            m = self._uncovered(torch.arange(c0, c1)[:, None], keys[None, :])
            rows = m.any(1)
            if not bool(rows.any()):
                continue
            rr, cc = torch.nonzero(rows).flatten(), torch.nonzero(m.any(0)).flatten()
            a0, a1 = c0 + int(rr[0]), c0 + int(rr[-1]) + 1
            k0, k1 = int(cc[0]), int(cc[-1]) + 1
            m = m[a0 - c0 : a1 - c0, k0:k1]
            qv = Strided(1, a1 - a0, 1, a0)
            if contiguous:
                kv: View = Strided(1, k1 - k0, 1, int(keys[k0]))
            else:
                kv = Gather(keys[k0:k1].to(self.device), 1, k1 - k0)
            self.add(qv, kv, m[None, None], False, "keys")

    def rows(self, part: Rows) -> None:
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
        cc = torch.nonzero(m.any(0)).flatten()
        k0, k1 = int(cc[0]), int(cc[-1]) + 1
        qv = Gather(rows.to(self.device), 1, rows.numel())
        self.add(qv, Strided(1, k1 - k0, 1, k0), m[None, None, :, k0:k1], False, "rows")

    def table(self, part: Table) -> None:
        n = self.n
        t = part.table[:n].cpu()
        self.kinds.append("table")
        R = t.shape[1]
        cpu = self.device.type == "cpu" and _native.enabled()
        # AVX-512: the cache-blocked kernel (fp32, bf16, fp16), chunks of keys whose K and V rows
        # fill ~1 MiB in fp32; while there are no more chunks than keys per query (beyond that,
        # the per-chunk bounds would outgrow the table itself, n^2 / chunk, and most visits would
        # find nothing)
        chunk = max(64, KEY_CHUNK_BYTES // (2 * 4 * self.head_dim))
        blocked = cpu and self.native_windows and self.head_dim in (32, 64, 128) and -(-n // chunk) <= R
        native = cpu and (self.dtype == torch.float32 or blocked)
        # the native kernels read rows in place (large calls); gathering needs small ones
        step = TABLE_ROWS if native else 8 * self.chunk(R)
        for s in range(0, n, step):
            e = min(n, s + step)
            tt = t[s:e]
            ok = tt >= 0
            if self.causal:
                ok &= tt <= torch.arange(s, e)[:, None]
            qv = Strided(e - s, 1, 1, s)
            kv = Gather(tt.clamp(min=0).flatten().to(self.device), e - s, R)
            self.add(qv, kv, ok[None, :, None, :], False, "table")
            tab = torch.where(ok, tt, -1).to(torch.int32)
            if blocked:  # keys sorted per row, and where each row's keys of each chunk begin
                tab = tab.sort(dim=1).values
                edges = torch.arange(0, n + chunk, chunk, dtype=torch.int32).clamp(max=n)
                bounds = torch.searchsorted(tab, edges.expand(e - s, edges.numel()).contiguous())
                self.calls[-1].bounds = bounds.to(torch.int32).contiguous()
            self.calls[-1].table = tab.contiguous()

    def block_table(self, part: BlockTable) -> None:
        n, bb = self.n, part.size
        nA = -(-n // bb)
        t = part.table[:nA].cpu()
        self.kinds.append("block_table")
        R = t.shape[1]
        ar = torch.arange(bb)
        step = self.chunk(bb)
        # calls without a mask: blocks from the first whose slots are all used (and, causal,
        # before it); the first blocks and a short last one get calls of their own
        full = n // bb
        used = (t >= 0).all(1)
        first = int(torch.nonzero(~used).max()) + 1 if bool((~used[:full]).any()) else 0
        first = min(first, full)
        bounds = [0, first] + list(range(first + step, full, step)) + [full, nA]
        for s, e in zip(bounds[:-1], bounds[1:]):
            for a in range(s, e, step):
                self._block_table_call(t, a, min(e, a + step), bb, R, ar)

    def _block_table_call(self, t, s, e, bb, R, ar) -> None:
        n = self.n
        m_ = e - s
        blocks = t[s:e]  # (m, R)
        keys = (blocks.clamp(min=0)[:, :, None] * bb + ar).reshape(m_, R * bb)
        ok = (blocks >= 0)[:, :, None].expand(m_, R, bb).reshape(m_, R * bb) & (keys < n)
        rows = min(bb, n - s * bb)
        i = (torch.arange(s, e)[:, None] * bb + ar[:rows])[:, :, None]  # (m, rows, 1)
        okm = ok[:, None, :].expand(m_, rows, R * bb)
        if self.causal:
            okm = okm & (keys[:, None, :] <= i)
        if not bool(okm.any()):
            return
        qv = Strided(m_, rows, bb, s * bb)
        kv = Gather(keys.clamp(max=n - 1).flatten().to(self.device), m_, R * bb)
        self.add(qv, kv, okm[None], False, "block_table")

    # -- tiles of a block layout ---------------------------------------------------------------
    def tiles(self, pattern: Pattern, layout: BlockLayout, keep: torch.Tensor) -> None:
        """Gathered tiles (the generic path): query blocks grouped by their number of tiles."""
        n, b = self.n, layout.block
        rows_of = layout.row_of_tiles()[keep]
        cols = layout.col[keep]
        full = layout.full[keep]
        if cols.numel() == 0:
            return
        self.kinds.append("tiles")
        nb = layout.num_blocks
        per_row = torch.bincount(rows_of, minlength=nb)
        starts = torch.cumsum(per_row, 0) - per_row
        ar = torch.arange(b)
        short = n % b != 0
        for c in torch.unique(per_row).tolist():
            if c == 0:
                continue
            rows = torch.nonzero(per_row == c).flatten()
            if short:
                rows = rows[rows != nb - 1]
            step = self.chunk(b)
            for s in range(0, rows.numel(), step):
                self._tile_call(pattern, rows[s : s + step], starts, cols, full, c, b, ar)
        if short and per_row[nb - 1] > 0:
            self._tile_call(pattern, torch.tensor([nb - 1]), starts, cols, full, int(per_row[nb - 1]), b, ar)

    def _tile_call(self, pattern, r, starts, cols, full, c, b, ar) -> None:
        n = self.n
        m_ = r.numel()
        idx = starts[r][:, None] + torch.arange(c)
        kb = cols[idx]  # (m, c)
        keys = (kb[:, :, None] * b + ar).reshape(m_, c * b)
        nrows = min(b, n - int(r[0]) * b)
        m = None
        if not bool(full[idx].all()) or bool((keys >= n).any()):
            i = (r[:, None] * b + ar[:nrows])[:, :, None]
            m = pattern.allowed(i.clamp(max=n - 1), keys.clamp(max=n - 1)[:, None, :], n, self.causal)
            m = (m & (keys < n)[:, None, :])[None]
        if m_ == 1 or bool((r[1:] - r[:-1] == 1).all()):
            qv: View = Strided(m_, nrows, b, int(r[0]) * b)
        else:
            qv = Gather((r[:, None] * b + ar).flatten().to(self.device), m_, b)
        same = m_ == 1 or bool((kb == kb[:1]).all())
        consecutive = c == 1 or bool((kb[0, 1:] - kb[0, :-1] == 1).all())
        if same and consecutive and int(kb[0, -1]) * b + b <= n:
            kv: View = Strided(m_, c * b, 0, int(kb[0, 0]) * b)  # one key range for all rows
        elif same:  # the same key blocks for all rows: gathered once
            kv = Gather(keys[0].clamp(max=n - 1).to(self.device), m_, c * b, shared=True)
        else:
            kv = Gather(keys.clamp(max=n - 1).flatten().to(self.device), m_, c * b)
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
            if call.ranges is not None and call.mask is not None and call.mask.stored_bytes > RANGE_MASK_BYTES:
                # a mask of its own per row (key columns against many rows): kept as its ranges
                lo, hi = call.ranges
                if call.mask.bool.shape[2] == lo.numel():
                    call.mask = RangeMask(lo.to(self.device, torch.int64), hi.to(self.device, torch.int64), call.k.R)
        return Plan(self.n, self.causal, scale, self.calls, multi, init, tuple(dict.fromkeys(self.kinds)))


def _row_ranges(call: Call) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo, hi) int32 per query row when every row of every window sees one contiguous key range
    and all windows alike (a shared mask or none): the native window kernel's input."""
    if call.causal or call.table is not None:
        return None
    L, S = call.q.R, call.k.R
    if call.mask is None:
        lo = torch.zeros(L, dtype=torch.int32)
        return lo, torch.full((L,), S - 1, dtype=torch.int32)
    m = call.mask.bool
    if m.dim() != 4 or m.shape[0] != 1 or m.shape[1] != 1:
        return None
    m = m[0, 0].expand(L, S).cpu()
    idx = torch.arange(S)
    anyr = m.any(1)
    lo = torch.where(m, idx, S).min(1).values
    hi = torch.where(m, idx, -1).max(1).values
    if not bool((m.sum(1) == torch.where(anyr, hi - lo + 1, 0)).all()):
        return None
    lo = torch.where(anyr, lo, 1)
    hi = torch.where(anyr, hi, 0)
    return lo.to(torch.int32), hi.to(torch.int32)


def _detect_band(layout: BlockLayout, keep_all: torch.Tensor) -> tuple[BlockBand | None, torch.Tensor]:
    """The longest diagonal run of full tiles (causal: and the diagonal triangle) present in
    every block row, as a BlockBand, and the tiles it does not cover."""
    n, b, causal = layout.n, layout.block, layout.causal
    nb = layout.num_blocks
    rows = layout.row_of_tiles()
    cols = layout.col
    e = rows - cols
    rq = torch.clamp(n - rows * b, max=b)
    diag_full = rq * (rq + 1) // 2 if causal else rq * rq
    good = layout.full | ((e == 0) & (layout.count == diag_full))
    cap = 8
    best, best_cover = None, 0
    candidates: list[BlockBand] = []
    # diagonal runs at the layout's block size: offsets 0..h (and -f..-1 bidirectional)
    back = torch.zeros(nb, cap + 1, dtype=torch.bool)
    sel = good & (e >= 0) & (e <= cap)
    back[rows[sel], e[sel]] = True
    run = torch.where(back.all(1), cap + 1, torch.argmin(back.int(), dim=1))
    reach = torch.arange(nb) + 1  # offsets available in row a: 0..a
    limited = run < torch.clamp(reach, max=cap + 1)
    h = int(run[limited].min()) - 1 if bool(limited.any()) else cap
    f = 0
    if not causal and h >= 0:
        fwd = torch.zeros(nb, cap + 1, dtype=torch.bool)
        sel = good & (e <= 0) & (e >= -cap)
        fwd[rows[sel], -e[sel]] = True
        run_f = torch.where(fwd.all(1), cap + 1, torch.argmin(fwd.int(), dim=1))
        reach_f = nb - torch.arange(nb)
        lim = run_f < torch.clamp(reach_f, max=cap + 1)
        f = int(run_f[lim].min()) - 1 if bool(lim.any()) else cap
        f = max(f, 0)
    if h >= 0:
        candidates.append(BlockBand(b, -f, h))
    # coarse block-diagonal windows (DeepSpeed local windows): blocks of s*b
    for s in (16, 8, 4, 2):
        if s * b >= n:
            continue
        part = BlockBand(s * b, 0, 0)
        inside = (rows // s) == (cols // s)
        need = (torch.arange(nb) % s) + 1 if causal else torch.clamp(n - (torch.arange(nb) // s) * s * b, max=s * b)
        if not causal:
            need = -(-need // b)
        have = torch.bincount(rows[inside & good], minlength=nb)
        if bool((have >= need).all()):
            candidates.append(part)
            break
    for part in candidates:
        if part.size == b:
            cov = (e >= part.lo) & (e <= part.hi)
        else:
            cov = (rows * b) // part.size == (cols * b) // part.size
        total = int(cov.sum())
        if total > best_cover:
            best, best_cover = part, total
    if best is None:
        return None, keep_all
    if best.size == b:
        covered = (e >= best.lo) & (e <= best.hi)
    else:
        covered = (rows * b) // best.size == (cols * b) // best.size
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
    bld = Planner(n, causal, groups, device, dtype, head_dim)
    st: Structure | None = pattern.structure(n, causal) if structured else None
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
            else:  # pragma: no cover - a new part type without a planner
                raise TypeError(f"no planner for {type(part).__name__}")
            bld.earlier.append(part)
    else:
        layout = pattern.block_layout(n, block, causal)
        band, keep = _detect_band(layout, torch.ones(layout.nnz_blocks, dtype=torch.bool))
        if band is not None:
            bld.block_band(band)
        bld.tiles(pattern, layout, keep)
    return bld.finish(1.0 / math.sqrt(head_dim))
