"""Content-selected patterns (moba, quest, topk_keys) as fused Triton kernels, for ``block_sparse`` on CUDA.

Each call runs the pattern's own selection (``pattern.select(q, k)``, fp32, in torch on the
device) and then a kernel, both inside the timed call; ``fn.selected(q, k, v) -> (out, selection)``
hands the selection back so that the check judges the keys the call chose.

* Units of several keys (moba's chunks, quest's pages), in one of two orders (``UNIT_ORDER``,
  SPARSEBENCH_TRITON_UNITS):
  - "keys" (the default), MoBA's own order: the selection's (row, unit) pairs sorted by sequence
    and unit (``UnitPairs``, one sort per call). One program per up to ``block_m`` rows that chose
    one unit gathers their queries and runs them against the unit's keys with ``tl.dot`` (j <= i):
    a first pass writes each pair's log-sum-exp, torch combines them per row, a second pass adds
    each pair's normalised share to an fp32 output atomically. Backward: the same programs, dQ,
    dK and dV by fp32 atomic adds.
  - "union": per sequence and block of ``block_m`` query rows, the union of the units its rows
    chose, ascending (``UnitTables``, built a chunk of blocks at a time), and per row a bit mask
    over that union (bit s of the row's words: the row chose the block's s-th unit). One program
    per (query block, query head) loads its queries once and walks the union in key tiles,
    masking the pairs by "the row chose this unit" and j <= i, online softmax (FlashAttention-2
    order). Backward recomputes the same tiles: dQ in the program, dK and dV by fp32 atomic adds.
* Single keys (topk_keys): one program per (query row, query head) reads the row's selected keys
  through the index, ``block_n`` at a time (``tl.load`` through the ids), online softmax; backward
  the same, dK and dV by atomic adds.

Neither table holds an n x n tensor. What the unit kernels walk, counted from the tables (no GPU
needed) at n = 32768, 8 heads, head_dim 64, blocks of 64 rows: the union order computes every pair
of the union and masks those a row did not choose, and where neighbouring queries choose different
units a block's union approaches every earlier unit: moba (chunk 512, topk 4) walks 0.99 of the
causal square on seeded random inputs and 0.69 on the synthetic model-like ones (its selection is
0.106 of it), quest (page_size 64, token_budget 2048) 0.81 and 0.57 (0.119); with blocks of 16
rows 0.72 / 0.45 and 0.59 / 0.38. The key order walks 1.16x moba's selection and 1.03x quest's
(partly filled programs, the own unit's causal half), each pair's scores twice in forward (its
two passes). Which is faster on a GPU has not been measured.

Grouped-query attention: query head h reads key/value head h // group (k and v are never
repeated). fp32 (IEEE products), bf16 and fp16; head sizes 16 to 256 that are powers of two. The
output is in q's dtype, with an fp32 log2-sum-exp per row. With ``TRITON_INTERPRET=1`` set before
this module is imported the kernels run (slowly) on the CPU, which is how they are tested without
a GPU; no figure of them has been timed on a GPU yet."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from sparsebench.backends.block_sparse import triton as _triton
from sparsebench.patterns.selection import Selection, selecting_call

triton, tl = _triton.triton, (_triton.tl if _triton.triton is not None else None)

# Elements (blocks x their rows' slots) of the selection turned into union tables at once: bounds
# the sort's and the bit masks' temporaries whatever n.
TABLE_CHUNK_ELEMS = 1 << 22
# How the unit kernels (moba, quest) walk a selection: "keys", MoBA's order (per key unit, the query
# rows that chose it: only the selection's pairs), or "union" (per query block, the union of the
# units its rows chose). SPARSEBENCH_TRITON_UNITS sets it; neither has been timed on a GPU yet.
UNIT_ORDERS = ("keys", "union")
UNIT_ORDER = os.environ.get("SPARSEBENCH_TRITON_UNITS", "keys")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634


def unavailable(device: torch.device) -> str | None:
    """None when the kernels can run on ``device`` (CUDA with Triton, or the interpreter)."""
    return _triton.unavailable(device)


def unsupported(p) -> str | None:
    """Why these kernels cannot run the content-selected problem ``p``, in one line, else None."""
    why = unavailable(p.device)
    if why is not None:
        return f"content-selected patterns on {p.device.type} need the Triton kernels: {why}"
    if p.dtype not in DTYPES:
        return f"content-selected patterns need fp32, bf16 or fp16, not {p.dtype}"
    if not _triton.supports(p.head_dim, p.dtype, p.batch * p.heads):
        return (
            f"content-selected patterns on the Triton kernels need a head_dim that is a power of two from 16 to 256 "
            f"(not {p.head_dim}) and batch * heads at most {_triton.MAX_GROUPS}"
        )
    if not p.causal:
        return f"pattern {p.pattern.name!r} is causal only"
    if UNIT_ORDER not in UNIT_ORDERS:
        return f"SPARSEBENCH_TRITON_UNITS={UNIT_ORDER!r} is not one of {', '.join(UNIT_ORDERS)}"
    return None


def block_sizes(unit: int, head_dim: int) -> tuple[int, int]:
    """(block_m query rows per program, block_n keys per tile) of the unit kernel: 64 rows (32 for
    head sizes above 128), tiles of the unit rounded up to a power of two, 16 to 64 keys (32 above
    head size 128)."""
    big = head_dim > 128
    block_m = 32 if big else 64
    block_n = min(32 if big else 64, max(16, 1 << max(0, unit - 1).bit_length()))
    return block_m, block_n


def token_block(head_dim: int) -> int:
    """Selected keys a program of the token kernel gathers at once."""
    return 32 if head_dim > 128 else 64


@dataclass(frozen=True)
class UnitTables:
    """What the unit kernel walks, per call, from a unit selection: per sequence (batch x query
    head) and block of ``block`` query rows the union of the units its rows chose (ascending, -1
    padding) and how many; per row (padded to whole blocks) ``words`` int32 bit masks over the
    union: bit s % 32 of word s // 32 is set when the row chose ``union[..., s]``."""

    n: int
    unit: int
    block: int
    union: torch.Tensor  # (G, blocks, width) int32
    count: torch.Tensor  # (G, blocks) int32
    chose: torch.Tensor  # (G, blocks * block, words) int32

    @property
    def width(self) -> int:
        return self.union.shape[-1]

    @property
    def words(self) -> int:
        return self.chose.shape[-1]

    def unit_table(self) -> torch.Tensor:
        """(G, n, units) bool: which units each row chose, read back from the tables (tests)."""
        G, nb, w = self.union.shape
        units = math.ceil(self.n / self.unit)
        bits = (self.chose.long()[..., None] >> torch.arange(32, device=self.chose.device)) & 1
        bits = bits.flatten(-2)[..., :w].bool().view(G, nb, self.block, w)  # row chose slot s
        ids = self.union.long().clamp(min=0)[:, :, None, :].expand(-1, -1, self.block, -1)
        out = torch.zeros(G, nb, self.block, units + 1, dtype=torch.bool, device=self.chose.device)
        out.scatter_(-1, torch.where(bits, ids, units), True)  # slots not chosen land in column ``units``
        return out.view(G, nb * self.block, units + 1)[:, : self.n, :units]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unit_tables(selection: Selection, block: int) -> UnitTables:
    """The union tables of a unit selection (see ``UnitTables``), built a chunk of blocks at a time."""
    B, H, n, S = selection.index.shape
    G, nb, units = B * H, -(-n // block), selection.units
    dev = selection.index.device
    index = selection.index.reshape(G, n, S)
    if nb * block != n:
        index = torch.nn.functional.pad(index, (0, 0, 0, nb * block - n), value=-1)
    index = index.reshape(G * nb, block * S)  # every block's rows' slots
    step = max(1, TABLE_CHUNK_ELEMS // (block * S))
    unions, counts, chosen = [], [], []
    for r0 in range(0, G * nb, step):
        idx = index[r0 : r0 + step].long()
        v = torch.where(idx < 0, units, idx)  # padding after every unit
        s = v.sort(-1).values
        keep = torch.ones_like(s, dtype=torch.bool)
        keep[:, 1:] = s[:, 1:] != s[:, :-1]
        keep &= s < units
        count = keep.sum(-1)
        width = max(1, int(count.max()))
        union = torch.full((s.shape[0], width + 1), units, dtype=torch.long, device=dev)
        union.scatter_(-1, torch.where(keep, keep.cumsum(-1) - 1, width), s)
        union = union[:, :width].contiguous()
        slot = torch.searchsorted(union, v.contiguous())  # where each chosen unit is in its block's union
        words = -(-width // 32)
        bit = torch.where(idx >= 0, torch.ones_like(slot) << (slot % 32), 0)
        row = torch.arange(block * S, device=dev) // S
        target = row * words + torch.where(idx >= 0, slot // 32, 0)
        mask = torch.zeros(s.shape[0], block * words, dtype=torch.long, device=dev)
        mask.scatter_add_(-1, target, bit)  # a row's units are distinct: the sum is the OR
        unions.append(torch.where(union < units, union, -1))
        counts.append(count)
        chosen.append(mask.view(-1, block, words))
    width = max(u.shape[-1] for u in unions)
    words = -(-width // 32)
    union = torch.cat([torch.nn.functional.pad(u, (0, width - u.shape[-1]), value=-1) for u in unions])
    chose = torch.cat([torch.nn.functional.pad(c, (0, words - c.shape[-1])) for c in chosen])
    return UnitTables(
        n=n,
        unit=selection.unit,
        block=block,
        union=union.to(torch.int32).view(G, nb, width),
        count=torch.cat(counts).to(torch.int32).view(G, nb),
        chose=_to_int32(chose).view(G, nb * block, words),
    )


def table_bytes(G: int, n: int, unit: int, slots: int, head_dim: int) -> int:
    """Bytes of ``unit_tables`` at its largest (every block's union at the bound min(units, rows x
    slots)) and of its temporaries (a chunk's sort, union and masks: about 48 bytes per element)."""
    block, _ = block_sizes(unit, head_dim)
    nb, units = -(-n // block), -(-n // unit)
    width = min(units, block * slots)
    words = -(-width // 32)
    tables = G * nb * (width + 1) * 4 + G * nb * block * words * 4
    chunk = min(G * nb, max(1, TABLE_CHUNK_ELEMS // (block * slots))) * block * slots
    return tables + 48 * chunk + G * nb * (width + 1) * 8


@dataclass(frozen=True)
class UnitPairs:
    """What the key-major unit kernels walk, per call, from a unit selection (MoBA's order): the
    selection's (query row, unit) pairs sorted by sequence and unit (rows ascending within), and
    programs of up to ``block`` pairs of one (sequence, unit) each: program t takes the pairs
    ``start[t]`` .. ``end[t]`` of ``cell[t]`` = sequence * units + unit. ``where``: each sorted
    pair's flat position in the selection's (G, n, slots) index (for the per-pair log-sum-exps)."""

    n: int
    unit: int
    block: int
    rows: torch.Tensor  # (P,) int32
    where: torch.Tensor  # (P,) int64
    cell: torch.Tensor  # (T,) int32
    start: torch.Tensor  # (T,) int32
    end: torch.Tensor  # (T,) int32

    def unit_table(self, G: int) -> torch.Tensor:
        """(G, n, units) bool: which units each row's pairs name, read back from the tables (tests)."""
        units = math.ceil(self.n / self.unit)
        out = torch.zeros(G * units, self.n, dtype=torch.bool, device=self.rows.device)
        for t in range(self.cell.numel()):
            out[int(self.cell[t]), self.rows[int(self.start[t]) : int(self.end[t])].long()] = True
        return out.view(G, units, self.n).transpose(1, 2)


def unit_pairs(selection: Selection, block: int) -> UnitPairs:
    """The key-major tables of a unit selection (see ``UnitPairs``): one sort of its pairs."""
    B, H, n, S = selection.index.shape
    G, units = B * H, selection.units
    idx = selection.index.reshape(-1)
    pos = (idx >= 0).nonzero().flatten()  # ascending: by sequence, row, slot
    key = pos // (n * S) * units + idx[pos].long()
    order = torch.sort(key, stable=True).indices  # rows stay ascending within a unit
    where = pos[order]
    rows = (where // S % n).to(torch.int32)
    counts = torch.bincount(key, minlength=G * units)
    offsets = torch.cumsum(counts, 0) - counts
    tiles = -(-counts // block)
    cell = torch.repeat_interleave(torch.arange(G * units, device=idx.device), tiles)
    first = torch.repeat_interleave(torch.cumsum(tiles, 0) - tiles, tiles)
    start = offsets[cell] + (torch.arange(cell.numel(), device=idx.device) - first) * block
    end = torch.minimum(start + block, offsets[cell] + counts[cell])
    i32 = torch.int32
    return UnitPairs(n, selection.unit, block, rows, where, cell.to(i32), start.to(i32), end.to(i32))


def pairs_bytes(G: int, n: int, slots: int, block: int) -> int:
    """Bytes of ``unit_pairs`` with its temporaries (positions, keys, the sort's values and order:
    about 48 bytes a pair) and the per-pair log-sum-exps (4 bytes, and the (G, n, slots) fp32
    table they are scattered into)."""
    pairs = G * n * slots
    return pairs * (48 + 4 + 4) + (pairs // block + G * n // block + 1) * 12


if triton is not None:

    @triton.jit
    def _online(s, v, m_i, l_i, acc, PRECISION: tl.constexpr, DOT: tl.constexpr):
        """One step of the online softmax: scores s (rows, keys) in log2 units, -inf where off."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), 1)
        return m_new, l_i, acc

    @triton.jit
    def _unit_tile(K, V, chose, g, gk, n, padded, hi, rows, t0, words, s_idx, BLOCK_N: tl.constexpr, D: tl.constexpr):
        """The keys t0 .. t0 + BLOCK_N of a unit ending at hi, the s_idx-th of the block's union: their
        k and v rows, and which (row, key) pairs are on (the row chose the unit, j <= i, j < hi);
        ``padded`` rows per sequence in ``chose``."""
        keys = t0 + tl.arange(0, BLOCK_N)
        kbase = gk * n * D
        k = _triton._rows(K, kbase, keys, n, D)
        v = _triton._rows(V, kbase, keys, n, D)
        w = tl.load(chose + (g * padded + rows) * words + s_idx // 32)
        on = ((w >> (s_idx % 32)) & 1) != 0
        ok = on[:, None] & (keys[None, :] <= rows[:, None]) & (keys[None, :] < hi)
        return keys, k, v, ok

    @triton.jit
    def _unit_forward(
        Q, K, V, Out, LSE, union, count, chose, n, group, width, words, unit, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One block of query rows of one query head against the union of the units its rows chose."""
        qb = tl.program_id(0)
        nb = tl.num_programs(0)
        g = tl.program_id(1).to(tl.int64)
        gk = g // group
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _triton._rows(Q, g * n * D, rows, n, D)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        cell = g * nb + qb
        for s_idx in range(0, tl.load(count + cell)):
            u = tl.load(union + cell * width + s_idx)
            lo = u * unit
            hi = tl.minimum(lo + unit, n)
            for t0 in range(lo, hi, BLOCK_N):
                keys, k, v, ok = _unit_tile(K, V, chose, g, gk, n, nb * BLOCK_M, hi, rows, t0, words, s_idx, BLOCK_N, D)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                s = tl.where(ok, s, float("-inf"))
                m_i, l_i, acc = _online(s, v, m_i, l_i, acc, PRECISION, True)
        empty = l_i == 0.0
        _triton._put_rows(Out, g * n * D, rows, n, acc / tl.where(empty, 1.0, l_i)[:, None], D)
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + g * n + rows, lse, mask=rows < n)

    @triton.jit
    def _unit_backward(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, union, count, chose, n, group, width, words, unit, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dQ of one block of query rows (unscaled, fp32); its tiles' shares of dK (unscaled) and dV
        added atomically to the fp32 buffers of its key/value head."""
        qb = tl.program_id(0)
        nb = tl.num_programs(0)
        g = tl.program_id(1).to(tl.int64)
        gk = g // group
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        q = _triton._rows(Q, g * n * D, rows, n, D)
        do = _triton._rows(DO, g * n * D, rows, n, D)
        lse, delta = _triton._row_stats(LSE, DELTA, g, n, rows)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        cell = g * nb + qb
        for s_idx in range(0, tl.load(count + cell)):
            u = tl.load(union + cell * width + s_idx)
            lo = u * unit
            hi = tl.minimum(lo + unit, n)
            for t0 in range(lo, hi, BLOCK_N):
                keys, k, v, ok = _unit_tile(K, V, chose, g, gk, n, nb * BLOCK_M, hi, rows, t0, words, s_idx, BLOCK_N, D)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
                at = gk * n * D + keys[:, None] * D + cols[None, :]
                live = (keys < hi)[:, None]
                tl.atomic_add(DV + at, dv, mask=live)
                tl.atomic_add(DK + at, dk, mask=live)
        tl.store(DQ + g * n * D + rows[:, None] * D + cols[None, :], dq, mask=(rows < n)[:, None])

    @triton.jit
    def _pair_rows(Q, rows_of, cell_of, start_of, end_of, n, units, group, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """A key-major program's pairs: their indices, whether live, their query rows and q, and its
        sequence, key/value sequence and unit."""
        t = tl.program_id(0)
        cell = tl.load(cell_of + t)
        idx = tl.load(start_of + t) + tl.arange(0, BLOCK_M)
        live = idx < tl.load(end_of + t)
        rows = tl.load(rows_of + idx, mask=live, other=0)
        g = (cell // units).to(tl.int64)
        u = cell % units
        q = tl.load(Q + (g * n + rows)[:, None] * D + tl.arange(0, D)[None, :], mask=live[:, None], other=0.0)
        return idx, live, rows, q, g, g // group, u

    @triton.jit
    def _pairs_lse(
        Q, K, LSEP, rows_of, cell_of, start_of, end_of, n, units, group, unit, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Pass 1 of the key-major forward: each pair's log2-sum-exp over its unit's keys j <= i."""
        idx, live, rows, q, g, gk, u = _pair_rows(Q, rows_of, cell_of, start_of, end_of, n, units, group, D, BLOCK_M)
        lo = u * unit
        hi = tl.minimum(lo + unit, n)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        for t0 in range(lo, hi, BLOCK_N):
            keys = t0 + tl.arange(0, BLOCK_N)
            k = _triton._rows(K, gk * n * D, keys, n, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(live[:, None] & (keys[None, :] <= rows[:, None]) & (keys[None, :] < hi), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSEP + idx, lse, mask=live)

    @triton.jit
    def _pairs_out(
        Q, K, V, OUT, LSE, rows_of, cell_of, start_of, end_of, n, units, group, unit, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Pass 2: each pair's share of its row's output, normalised by the row's log2-sum-exp,
        added atomically to the row's fp32 output."""
        idx, live, rows, q, g, gk, u = _pair_rows(Q, rows_of, cell_of, start_of, end_of, n, units, group, D, BLOCK_M)
        lse = tl.load(LSE + g * n + rows, mask=live, other=float("inf"))
        lo = u * unit
        hi = tl.minimum(lo + unit, n)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for t0 in range(lo, hi, BLOCK_N):
            keys = t0 + tl.arange(0, BLOCK_N)
            k = _triton._rows(K, gk * n * D, keys, n, D)
            v = _triton._rows(V, gk * n * D, keys, n, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            ok = live[:, None] & (keys[None, :] <= rows[:, None]) & (keys[None, :] < hi)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        at = (g * n + rows)[:, None] * D + tl.arange(0, D)[None, :]
        tl.atomic_add(OUT + at, acc, mask=live[:, None])

    @triton.jit
    def _pairs_backward(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, rows_of, cell_of, start_of, end_of, n, units, group, unit, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """The key-major backward: a program's pairs against their unit's keys; dQ of its rows,
        dK (unscaled) and dV of the unit's keys, all added atomically in fp32."""
        idx, live, rows, q, g, gk, u = _pair_rows(Q, rows_of, cell_of, start_of, end_of, n, units, group, D, BLOCK_M)
        cols = tl.arange(0, D)
        at_rows = (g * n + rows)[:, None] * D + cols[None, :]
        do = tl.load(DO + at_rows, mask=live[:, None], other=0.0)
        lse = tl.load(LSE + g * n + rows, mask=live, other=float("inf"))
        delta = tl.load(DELTA + g * n + rows, mask=live, other=0.0)
        lo = u * unit
        hi = tl.minimum(lo + unit, n)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        for t0 in range(lo, hi, BLOCK_N):
            keys = t0 + tl.arange(0, BLOCK_N)
            k = _triton._rows(K, gk * n * D, keys, n, D)
            v = _triton._rows(V, gk * n * D, keys, n, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            ok = live[:, None] & (keys[None, :] <= rows[:, None]) & (keys[None, :] < hi)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            at = gk * n * D + keys[:, None] * D + cols[None, :]
            tl.atomic_add(DV + at, dv, mask=(keys < hi)[:, None])
            tl.atomic_add(DK + at, dk, mask=(keys < hi)[:, None])
        tl.atomic_add(DQ + at_rows, dq, mask=live[:, None])

    @triton.jit
    def _token_forward(
        Q, K, V, Out, LSE, index, n, group, slots, qk_scale, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """One query row of one query head against its selected keys, BLOCK_N ids at a time."""
        i = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        gk = g // group
        cols = tl.arange(0, D)
        q = tl.load(Q + (g * n + i) * D + cols).to(tl.float32)
        m_i = tl.full((1,), float("-inf"), tl.float32)
        l_i = tl.zeros((1,), tl.float32)
        acc = tl.zeros((1, D), tl.float32)
        for s0 in range(0, slots, BLOCK_N):
            slot = s0 + tl.arange(0, BLOCK_N)
            ids = tl.load(index + (g * n + i) * slots + slot, mask=slot < slots, other=-1)
            live = ids >= 0
            at = (gk * n + ids.to(tl.int64))[:, None] * D + cols[None, :]
            k = tl.load(K + at, mask=live[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + at, mask=live[:, None], other=0.0)
            s = tl.sum(q[None, :] * k, 1) * qk_scale
            s = tl.where(live, s, float("-inf"))
            m_i, l_i, acc = _online(s[None, :], v, m_i, l_i, acc, "ieee", False)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(Out + (g * n + i) * D + cols[None, :], out.to(Out.dtype.element_ty))
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + g * n + i + tl.arange(0, 1), lse)

    @triton.jit
    def _token_backward(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, index, n, group, slots, qk_scale, BLOCK_N: tl.constexpr,
        D: tl.constexpr,
    ):  # fmt: skip
        """dQ of one query row (unscaled, fp32); its keys' shares of dK (unscaled) and dV added
        atomically to the fp32 buffers of its key/value head."""
        i = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        gk = g // group
        cols = tl.arange(0, D)
        q = tl.load(Q + (g * n + i) * D + cols).to(tl.float32)
        do = tl.load(DO + (g * n + i) * D + cols).to(tl.float32)
        lse = tl.load(LSE + g * n + i)
        delta = tl.load(DELTA + g * n + i)
        dq = tl.zeros((D,), tl.float32)
        for s0 in range(0, slots, BLOCK_N):
            slot = s0 + tl.arange(0, BLOCK_N)
            ids = tl.load(index + (g * n + i) * slots + slot, mask=slot < slots, other=-1)
            live = ids >= 0
            at = (gk * n + ids.to(tl.int64))[:, None] * D + cols[None, :]
            k = tl.load(K + at, mask=live[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + at, mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[None, :] * k, 1) * qk_scale
            p = tl.where(live, tl.exp2(s - lse), 0.0)
            dp = tl.sum(do[None, :] * v, 1)
            ds = p * (dp - delta)
            dq += tl.sum(ds[:, None] * k, 0)
            tl.atomic_add(DV + at, p[:, None] * do[None, :], mask=live[:, None])
            tl.atomic_add(DK + at, ds[:, None] * q[None, :], mask=live[:, None])
        tl.store(DQ + (g * n + i) * D + cols, dq)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact products


def _warps(head_dim: int) -> int:
    """Warps per program: 8 for head sizes of 128 and more (a block's queries, output and, in
    backward, its dQ and output gradient held at once), else 4. Not tuned: no GPU has timed them."""
    return 8 if head_dim >= 128 else 4


def _check(q, k, selection: Selection) -> None:
    B, H, n, D = q.shape
    if selection.n != n or selection.index.shape[:3] != (B, H, n):
        raise ValueError(f"the selection is for {tuple(selection.index.shape[:3])}, the queries are {(B, H, n)}")
    if H % k.shape[1]:
        raise ValueError(f"kv_heads={k.shape[1]} must divide heads={H}")


def tables_for(selection: Selection, head_dim: int) -> UnitTables | UnitPairs | None:
    """What the kernels walk for this selection: nothing for single keys; for units, the pairs
    sorted by unit (UNIT_ORDER "keys") or the union per query block ("union")."""
    if selection.unit == 1:
        return None
    block = block_sizes(selection.unit, head_dim)[0]
    return unit_pairs(selection, block) if UNIT_ORDER == "keys" else unit_tables(selection, block)


def _pairs_lse_rows(selection: Selection, pairs: UnitPairs, lse_pairs: torch.Tensor) -> torch.Tensor:
    """(G, n) log2-sum-exp per row from its pairs' (+inf for a row without keys)."""
    B, H, n, S = selection.index.shape
    full = torch.full((B * H * n * S,), float("-inf"), dtype=torch.float32, device=lse_pairs.device)
    full[pairs.where] = lse_pairs
    full = full.view(B * H, n, S)
    top = full.amax(-1)
    top = torch.where(torch.isneginf(top), 0.0, top)
    total = torch.exp2(full - top[..., None]).sum(-1)
    return torch.where(total > 0, top + torch.log2(total), float("inf"))


def forward(selection: Selection, q, k, v, tables: UnitTables | UnitPairs | None = None):
    """(out (B, H, n, D) in q's dtype, log2-sum-exp (B*H, n) fp32, +inf for rows without keys)
    under a selection: the token kernel for single keys; for units the key-major kernels (two
    passes: the pairs' log-sum-exps, then their normalised shares added to an fp32 output) or the
    union kernel, by ``tables`` (``tables_for``, made here unless given)."""
    _check(q, k, selection)
    q, k, v = (t.contiguous() for t in (q, k, v))
    B, H, n, D = q.shape
    group, G = H // k.shape[1], B * H
    qk_scale = _LOG2E / math.sqrt(D)
    tables = tables if tables is not None else tables_for(selection, D)
    block_m, block_n = block_sizes(selection.unit, D)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, D=D, PRECISION=_precision(q.dtype), num_warps=_warps(D))
    with _triton._on(q):
        if isinstance(tables, UnitPairs):
            units, T = selection.units, tables.cell.numel()
            pair_args = (tables.rows, tables.cell, tables.start, tables.end, n, units, group, selection.unit, qk_scale)
            lse_pairs = torch.empty(tables.rows.numel(), dtype=torch.float32, device=q.device)
            _pairs_lse[(T,)](q, k, lse_pairs, *pair_args, **meta)
            lse = _pairs_lse_rows(selection, tables, lse_pairs)
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            _pairs_out[(T,)](q, k, v, out, lse, *pair_args, **meta)
            return out.to(q.dtype), lse
        out = torch.empty_like(q)
        lse = torch.empty(G, n, dtype=torch.float32, device=q.device)
        if tables is None:
            index = selection.index.to(torch.int32).contiguous()
            slots = index.shape[-1]
            _token_forward[(n, G)](
                q, k, v, out, lse, index, n, group, slots, qk_scale, token_block(D), D, num_warps=_warps(D)
            )  # fmt: skip
        else:
            _unit_forward[(tables.union.shape[1], G)](
                q, k, v, out, lse, tables.union, tables.count, tables.chose, n, group, tables.width, tables.words,
                selection.unit, qk_scale, **meta,
            )  # fmt: skip
    return out, lse


def backward(selection: Selection, q, k, v, out, lse, dout, tables: UnitTables | UnitPairs | None = None):
    """(dq, dk, dv) in the inputs' dtypes: FlashAttention-2's recomputation with the forward's
    log-sum-exps, summed in fp32 by atomic adds where programs share rows or keys (dK and dV over
    query blocks, rows and the query heads of a group; the key-major order dQ too)."""
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    B, H, n, D = q.shape
    group, G = H // k.shape[1], B * H
    delta = _triton._delta(out, dout)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = (torch.zeros(k.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    qk_scale, scale = _LOG2E / math.sqrt(D), 1.0 / math.sqrt(D)
    tables = tables if tables is not None else tables_for(selection, D)
    block_m, block_n = block_sizes(selection.unit, D)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, D=D, PRECISION=_precision(q.dtype), num_warps=_warps(D))
    grads = (q, k, v, dout, lse, delta, dq, dk, dv)
    with _triton._on(q):
        if isinstance(tables, UnitPairs):
            _pairs_backward[(tables.cell.numel(),)](
                *grads, tables.rows, tables.cell, tables.start, tables.end, n, selection.units, group,
                selection.unit, qk_scale, **meta,
            )  # fmt: skip
        elif tables is None:
            index = selection.index.to(torch.int32).contiguous()
            slots = index.shape[-1]
            _token_backward[(n, G)](
                *grads, index, n, group, slots, qk_scale, token_block(D), D, num_warps=_warps(D)
            )  # fmt: skip
        else:
            _unit_backward[(tables.union.shape[1], G)](
                *grads, tables.union, tables.count, tables.chose, n, group, tables.width, tables.words,
                selection.unit, qk_scale, **meta,
            )  # fmt: skip
    return (dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selection, tables):
        out, lse = forward(selection, q, k, v, tables)
        ctx.selection, ctx.tables = selection, tables
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*backward(ctx.selection, q, k, v, out, lse, dout, ctx.tables), None, None)


def attend(q, k, v, selection: Selection) -> torch.Tensor:
    """Attention under a selection, in q's dtype; differentiable when the inputs need gradients
    (the unit tables are made once and kept for backward)."""
    tables = tables_for(selection, q.shape[-1])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Attention.apply(q, k, v, selection, tables)
    return forward(selection, q, k, v, tables)[0]


def prepare(p):
    """fn(q, k, v) for a content-selected problem on CUDA: the pattern's selection, then the
    kernel (both timed), with ``fn.selected(q, k, v) -> (out, selection)`` for the check."""
    return selecting_call(p.pattern, attend)


def estimate_bytes(p) -> int:
    """Peak bytes of a call: q, k, v and the output; the selection (int32 ids per query head and
    row) and the larger of its own temporaries and the kernel's: for units, the sorted pairs with
    their log-sum-exps and the fp32 output (``pairs_bytes``) or the union tables (``table_bytes``);
    a log2-sum-exp per row. Backward also: the output gradient, delta, fp32
    dQ, dK and dV buffers and the gradients in the input dtype. No n x n."""
    pattern = p.pattern
    G, n, d = p.batch * p.heads, p.seq_len, p.head_dim
    slots = pattern.slots(n)
    rows = G * n
    selection = rows * slots * 4
    selecting = pattern.select_bytes(p.batch, p.heads, n, d, p.elem_bytes) - selection
    attending = rows * 4  # lse
    if pattern.unit > 1 and UNIT_ORDER == "keys":
        block = block_sizes(pattern.unit, d)[0]
        attending += pairs_bytes(G, n, slots, block) + rows * d * 4  # the fp32 output the pairs add to
    elif pattern.unit > 1:
        attending += table_bytes(G, n, pattern.unit, slots, d)
    if p.mode == "backward":
        kv_rows = p.batch * p.kv_heads * n
        attending += p.q_bytes + rows * 4  # dout, delta
        attending += (rows + 2 * kv_rows) * d * 4  # fp32 dq, dk, dv
        attending += p.q_bytes + p.kv_bytes  # the gradients in the input dtype
    return p.io_bytes + selection + max(selecting, attending)
