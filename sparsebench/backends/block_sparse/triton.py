"""Block-sparse attention as fused Triton kernels, for ``block_sparse`` on CUDA.

The plan is the pattern's block layout (``Pattern.block_layout``: the non-empty tiles of each
query block, and which are full). Forward is one program per (query block, sequence): it loads
its queries once and runs an online softmax over its tiles' keys (FlashAttention-2 order), so
nothing but the output and one log-sum-exp per row is written. Full tiles need no mask; each
partial tile (the diagonal, band edges, random keys, a short last block) has a bit mask of its
pairs, evaluated once from the pattern at setup in chunks of tiles: memory proportional to the
partial tiles, never n x n. Backward is FlashAttention-2's: dK and dV by key block over the query
blocks that use it (the layout transposed), dQ by query block. Residue bands (pairs i - j = m D:
Child et al.'s strided columns) touch nearly every tile in order; where that saves tiles they run
as a part of their own on the sequence reordered residue class by residue class (where they are
diagonal bands again), merged with the rest through the log-sum-exps (``PartsPlan``).

Tiles of 128, 64 or 32 (``tile_size``: the layout block rounded down to one of them, smaller for
head sizes above 128); head sizes 16 to 256 that are powers of two; fp32 (IEEE products), bf16
and fp16; up to 65535 sequences (batch * heads). With ``TRITON_INTERPRET=1`` set before this
module is imported, the kernels also run (slowly) on the CPU, which is how they are tested
without a GPU."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from sparsebench.shapes import broadcast_shape

try:  # Triton comes with CUDA builds of PyTorch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# SPARSEBENCH_TRITON_TUNE=0: the first fitting launch setting, without autotuning (quick tests).
TUNE = os.environ.get("SPARSEBENCH_TRITON_TUNE", "1") != "0"
# Tiles of the layout, square: rows of a query block and keys of a key block.
BLOCKS = (32, 64, 128)
DEFAULT_BLOCK = 64
# A forward program holds its (tile, head_dim) queries and fp32 accumulator: at most this many.
MAX_TILE_ELEMS = 128 * 128
# Pairs of partial tiles whose bit masks are evaluated at once.
MASK_CHUNK_ELEMS = 1 << 22
# Rows (over all sequences) per chunk of backward's delta = rowsum(dO * O) in fp32.
DELTA_ROWS = 1 << 18
# Sequences (batch * heads) per launch: CUDA's limit on the second grid dimension.
MAX_GROUPS = 65535
# Under the interpreter there is no autotuning: kernels take "half" tiles (from 64 up) or "whole".
INTERPRET_SUB = "half"
# Residue bands as parts of their own in residue order (see PartsPlan): "auto" where that halves
# the tiles at least, "always" (tests), "never".
PARTS = os.environ.get("SPARSEBENCH_TRITON_PARTS", "auto")
_LOG2E = 1.4426950408889634


def unavailable(device: torch.device) -> str | None:
    """None when the kernels can run on ``device``, else why not."""
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda" and not INTERPRET:
        return "the Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)"
    return None


def supports(head_dim: int, dtype: torch.dtype, groups: int = 1) -> bool:
    """Whether the kernels take this head size, dtype and number of sequences (batch * heads)."""
    pow2 = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    return pow2 and dtype in (torch.float32, torch.bfloat16, torch.float16) and groups <= MAX_GROUPS


def tile_size(block: int, head_dim: int) -> int:
    """The kernels' tile for a layout block: the largest of 128, 64, 32 that is at most ``block``
    (32 at least) and keeps a forward program's (tile, head_dim) within MAX_TILE_ELEMS."""
    for tile in sorted(BLOCKS, reverse=True):
        if tile <= block and tile * head_dim <= MAX_TILE_ELEMS:
            return tile
    return BLOCKS[0]


@dataclass(frozen=True)
class TilePlan:
    """The layout on the device: tiles by query block (CSR) and by key block (CSC), and the bit
    masks of the partial tiles (``part[t]`` is tile t's mask index, -1 when it is full)."""

    n: int
    block: int
    scale: float
    crow: torch.Tensor  # (nb + 1,) int32
    col: torch.Tensor  # (tiles,) int32 key block of each tile, by query block
    part: torch.Tensor  # (tiles,) int32
    ccol: torch.Tensor  # (nb + 1,) int32
    row: torch.Tensor  # (tiles,) int32 query block of each tile, by key block
    tile: torch.Tensor  # (tiles,) int32 tile index (into part) of each, by key block
    bits: torch.Tensor  # (partial tiles, block, block // 32) int32

    @property
    def num_blocks(self) -> int:
        return self.crow.numel() - 1


def _pack_bits(m: torch.Tensor) -> torch.Tensor:
    """(..., B) bool -> (..., B // 32) int32, bit j of word w is m[..., 32 w + j]."""
    words = m.unflatten(-1, (-1, 32)).to(torch.int64) << torch.arange(32, device=m.device)
    words = words.sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def tile_masks(allowed, n: int, B: int, rows: torch.Tensor, cols: torch.Tensor, device):
    """Bit masks (T, B, B // 32) of the tiles (rows[t], cols[t]) under ``allowed(q, k)`` (index
    tensors, broadcast), and their allowed pairs (T,); pairs past the end of the sequence are
    off."""
    rows, cols = rows.to(device), cols.to(device)
    ar = torch.arange(B, device=device)
    bits = torch.empty(len(rows), B, B // 32, dtype=torch.int32, device=device)
    counts = torch.empty(len(rows), dtype=torch.int64, device=device)
    step = max(1, MASK_CHUNK_ELEMS // (B * B))
    for i in range(0, len(rows), step):
        qi = rows[i : i + step, None, None] * B + ar[:, None]
        ki = cols[i : i + step, None, None] * B + ar[None, :]
        m = allowed(qi.clamp(max=n - 1), ki.clamp(max=n - 1)) & (qi < n) & (ki < n)
        bits[i : i + step] = _pack_bits(m)
        counts[i : i + step] = m.sum((1, 2))
    return bits, counts.cpu()


def _tile_plan(layout, scale: float, allowed, device, known_full: bool = True) -> TilePlan:
    """A tile plan from a layout's tiles, which may be more than needed: its full tiles are taken
    as full where ``known_full`` (never a tile of a short last block: the kernels mask past the end
    only in partial tiles), the others are evaluated under ``allowed``, dropped when they hold no
    pair and counted full when they hold them all."""
    n, B, nb = layout.n, layout.block, layout.num_blocks
    rows, cols = layout.row_of_tiles(), layout.col
    edge = layout.at_short_end()
    full = layout.full & ~edge if known_full else torch.zeros_like(edge)
    cand = (~full).nonzero().flatten()
    bits, counts = tile_masks(allowed, n, B, rows[cand], cols[cand], device)
    keep = counts > 0
    now_full = (counts == B * B) & ~edge[cand]
    partial = keep & ~now_full
    rows = torch.cat([rows[full], rows[cand[keep]]])
    cols = torch.cat([cols[full], cols[cand[keep]]])
    part_c = torch.full((cand.numel(),), -1, dtype=torch.int64)
    part_c[partial] = torch.arange(int(partial.sum()))
    part = torch.cat([torch.full((int(full.sum()),), -1, dtype=torch.int64), part_c[keep]])
    bits = bits[partial.to(bits.device)]
    order = torch.argsort(rows * nb + cols)
    rows, cols, part = rows[order], cols[order], part[order]
    crow = torch.zeros(nb + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=nb), 0)
    by_key = torch.argsort(cols, stable=True)
    ccol = torch.zeros(nb + 1, dtype=torch.int64)
    ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=nb), 0)

    def dev(t):
        return t.to(device=device, dtype=torch.int32)

    return TilePlan(n, B, scale, dev(crow), dev(cols), dev(part), dev(ccol), dev(rows[by_key]), dev(by_key), bits)


@dataclass(frozen=True)
class Part:
    """One exclusive share of the pattern's pairs as a tile plan, over the sequence in its own
    order: ``perm[p]`` is the position at place p (None: the natural order), ``inv`` its inverse."""

    plan: TilePlan
    perm: torch.Tensor | None = None
    inv: torch.Tensor | None = None


@dataclass(frozen=True)
class PartsPlan:
    """Disjoint parts whose outputs merge through their log-sum-exps: the residue bands of a
    pattern (strided columns, dilated windows: pairs i - j = m D) run on the sequence reordered
    residue class by residue class, where they are diagonal bands again; the rest in order."""

    parts: tuple[Part, ...]

    @property
    def tiles(self) -> int:
        return sum(p.plan.col.numel() for p in self.parts)


def build(pattern, n: int, causal: bool, head_dim: int, device, block: int = DEFAULT_BLOCK) -> TilePlan | PartsPlan:
    """The tile plan of a pattern (setup work), at tiles of ``tile_size(block, head_dim)``: its
    block layout, transposed, with bit masks of the partial tiles; or, for patterns with residue
    bands whose tiles would cover most of the square, a ``PartsPlan`` (PARTS: "auto", "always" for
    such patterns, "never")."""
    block = tile_size(block, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    layout = pattern.block_layout(n, block, causal)
    parts = None if PARTS == "never" else _parts(pattern, n, causal, block)
    if parts is not None and (PARTS == "always" or 2 * sum(lay.nnz_blocks for lay, _, _ in parts) < layout.nnz_blocks):
        out = []
        for lay, allowed, perm in parts:
            plan = _tile_plan(lay, scale, allowed(device), device, known_full=False)  # candidates
            out.append(Part(plan) if perm is None else Part(plan, perm.to(device), torch.argsort(perm).to(device)))
        return PartsPlan(tuple(out))
    allowed = pattern.mask_fn(n, causal, device)
    return _tile_plan(layout, scale, allowed, device)


def residue_bands(st) -> list:
    """A structure's residue bands: its Band parts of step D > 1 (pairs i - j = m D); none
    without a structure."""
    from sparsebench.patterns.geometry import Band

    return [] if st is None else [p for p in st.parts if isinstance(p, Band) and p.step > 1]


class _Pairs:
    """A predicate as structured_layout's pattern: it recounts the tiles two parts share."""

    def __init__(self, allowed):
        self._allowed = allowed

    def allowed(self, q, k, n, causal):
        return self._allowed(q, k)


def _parts(pattern, n: int, causal: bool, B: int):
    """The pattern's residue bands (Band parts of step D > 1) reordered by residue class, one part
    per step, and the rest of its structure in order, each as (candidate tiles: a layout that
    holds its pairs, its predicate on a device: device -> allowed(q, k) in the part's order, the
    order: None or perm, perm[p] the position at place p); None without residue bands."""
    from sparsebench.patterns.geometry import Band, Structure, structured_layout

    st = pattern.structure(n, causal)
    residue = residue_bands(st)
    if not residue:
        return None
    rest = [p for p in st.parts if p not in residue]

    def covered(ps, q, k):
        m = torch.zeros(broadcast_shape(q.shape, k.shape), dtype=torch.bool, device=q.device)
        for p in ps:
            m = m | p.covers(q, k)
        return m & (k <= q) if causal else m

    out = []
    if rest:
        lay = structured_layout(pattern, Structure(n, causal, tuple(rest)), B)  # rest within pattern
        if lay is None:
            return None
        out.append((lay, lambda device: lambda q, k: covered(rest, q, k) & ~covered(residue, q, k), None))
    earlier: list = []  # bands of other steps counted already (exclusive parts never meet; in case)
    for D in sorted({p.step for p in residue}):
        bands = [p for p in residue if p.step == D]
        i = torch.arange(n)
        perm = torch.argsort((i % D) * n + i)  # residue class by residue class, in order

        def allowed(device, bands=bands, before=tuple(earlier), perm=perm):
            pd = perm.to(device)

            def f(q, k):
                a, b = pd[q], pd[k]
                m = covered(bands, a, b)
                return m & ~covered(before, a, b) if before else m

            return f

        # in that order a residue band is the diagonal band lo..hi (within each class, so a
        # superset), tiles two bands share recounted under the part's own predicate
        st_p = Structure(n, causal, tuple(Band(p.lo, p.hi, 1) for p in bands))
        lay = structured_layout(_Pairs(allowed(torch.device("cpu"))), st_p, B)
        if lay is None:
            return None
        out.append((lay, allowed, perm))
        earlier += bands
    return out


def _configs():
    """Launch settings tried by the autotuner on the first call of each kernel, per head size,
    tile size and dtype (that first call is the case's compile_s): warps, pipelining stages, and
    SUB, the rows or keys a kernel takes at once from a tile (the whole tile or half of it).
    Under the interpreter nothing is tuned (``_launch`` sets SUB from INTERPRET_SUB)."""
    if triton is None or INTERPRET:
        return []
    return [
        triton.Config({"SUB": sub}, num_warps=w, num_stages=st) for sub in (64, 128, 32) for w in WARPS for st in STAGES
    ]  # fmt: skip


def _prune(configs, named_args, **kwargs):
    """Settings whose SUB fits the tile (the whole tile, or half of it from 64 up) and keeps a
    (SUB, D) fp32 accumulator of at most 64 x 128 (larger ones spill registers: slow to compile
    and to run). Without autotuning, the first of them."""
    args = {**named_args, **kwargs}
    block, d = args["BLOCK"], args["D"]
    subs = [s for s in (block, block // 2) if s >= 32 and (s * d <= 64 * 128 or s == 32)] or [min(block, 32)]
    fits = [c for c in configs if c.kwargs["SUB"] in subs]
    return fits if TUNE else fits[:1]


# Warps per program and software-pipelining stages that the autotuner tries.
WARPS = (4, 8)
STAGES = (2, 3)

if triton is not None:
    if INTERPRET:

        def _tuned(fn):
            return fn
    else:
        _tuned = triton.autotune(
            configs=_configs(), key=["BLOCK", "D", "PRECISION"], prune_configs_by={"early_config_prune": _prune}
        )  # fmt: skip

    @triton.jit
    def _scores(q, k, p, bits, r, c, qk_scale, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        """Scores in log2 units of queries q (rows r of their tile) against keys k (columns c of
        the tile), -inf where the tile's mask (index p into bits, -1 when full) is off."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if p >= 0:
            w = tl.load(bits + p.to(tl.int64) * (BLOCK * BLOCK // 32) + r[:, None] * (BLOCK // 32) + c[None, :] // 32)
            s = tl.where(((w >> (c[None, :] % 32)) & 1) != 0, s, float("-inf"))
        return s

    @triton.jit
    def _rows(X, base, rows, n, D: tl.constexpr):
        """Rows ``rows`` of the sequence at ``base`` of an (sequences, n, D) tensor, zero past n."""
        return tl.load(X + base + rows[:, None] * D + tl.arange(0, D)[None, :], mask=rows[:, None] < n, other=0.0)

    @triton.jit
    def _put_rows(X, base, rows, n, x, D: tl.constexpr):
        tl.store(
            X + base + rows[:, None] * D + tl.arange(0, D)[None, :], x.to(X.dtype.element_ty), mask=rows[:, None] < n
        )

    @triton.jit
    def _row_stats(LSE, DELTA, g, n, rows):
        """Backward's per-row log2-sum-exp and delta (+inf and 0 past n: no probability)."""
        lse = tl.load(LSE + g * n + rows, mask=rows < n, other=float("inf"))
        return lse, tl.load(DELTA + g * n + rows, mask=rows < n, other=0.0)

    @_tuned
    @triton.jit
    def _forward(
        Q, K, V, Out, LSE, crow, col, part, bits, n, qk_scale,
        BLOCK: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, SUB: tl.constexpr,
    ):  # fmt: skip
        """One query block against its tiles' keys, SUB keys at a time, online softmax."""
        qb = tl.program_id(0)
        g = tl.program_id(1).to(tl.int64)
        base = g * n * D
        offs = tl.arange(0, BLOCK)
        sub = tl.arange(0, SUB)
        rows = qb * BLOCK + offs
        q = _rows(Q, base, rows, n, D)
        m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, D), tl.float32)
        for t in range(tl.load(crow + qb), tl.load(crow + qb + 1)):
            kb = tl.load(col + t)
            p_t = tl.load(part + t)
            for j in tl.static_range(BLOCK // SUB):
                keys = kb * BLOCK + j * SUB + sub
                k, v = _rows(K, base, keys, n, D), _rows(V, base, keys, n, D)
                s = _scores(q, k, p_t, bits, offs, j * SUB + sub, qk_scale, BLOCK, PRECISION)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        _put_rows(Out, base, rows, n, acc, D)
        # log2-sum-exp; +inf for rows without keys, so that backward's probabilities are 0
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + g * n + rows, lse, mask=rows < n)

    @_tuned
    @triton.jit
    def _backward_kv(
        Q, K, V, DO, LSE, DELTA, DK, DV, ccol, row, tile, part, bits, n, qk_scale, scale,
        BLOCK: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, SUB: tl.constexpr,
    ):  # fmt: skip
        """dK, dV of SUB keys of a key block, over the query blocks of its tiles, SUB rows at a
        time."""
        kb = tl.program_id(0) // (BLOCK // SUB)
        c = tl.program_id(0) % (BLOCK // SUB) * SUB + tl.arange(0, SUB)  # columns in the tile
        g = tl.program_id(1).to(tl.int64)
        base = g * n * D
        sub = tl.arange(0, SUB)
        keys = kb * BLOCK + c
        k, v = _rows(K, base, keys, n, D), _rows(V, base, keys, n, D)
        dk = tl.zeros((SUB, D), tl.float32)
        dv = tl.zeros((SUB, D), tl.float32)
        for i in range(tl.load(ccol + kb), tl.load(ccol + kb + 1)):
            qb = tl.load(row + i)
            p_t = tl.load(part + tl.load(tile + i))
            for j in tl.static_range(BLOCK // SUB):
                rows = qb * BLOCK + j * SUB + sub
                q, do = _rows(Q, base, rows, n, D), _rows(DO, base, rows, n, D)
                lse, delta = _row_stats(LSE, DELTA, g, n, rows)
                s = _scores(q, k, p_t, bits, j * SUB + sub, c, qk_scale, BLOCK, PRECISION)
                p = tl.exp2(s - lse[:, None])
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        _put_rows(DK, base, keys, n, dk * scale, D)
        _put_rows(DV, base, keys, n, dv, D)

    @_tuned
    @triton.jit
    def _backward_q(
        Q, K, V, DO, LSE, DELTA, DQ, crow, col, part, bits, n, qk_scale, scale,
        BLOCK: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, SUB: tl.constexpr,
    ):  # fmt: skip
        """dQ of SUB rows of a query block, over its tiles' keys, SUB keys at a time."""
        qb = tl.program_id(0) // (BLOCK // SUB)
        r = tl.program_id(0) % (BLOCK // SUB) * SUB + tl.arange(0, SUB)  # rows in the tile
        g = tl.program_id(1).to(tl.int64)
        base = g * n * D
        sub = tl.arange(0, SUB)
        rows = qb * BLOCK + r
        q, do = _rows(Q, base, rows, n, D), _rows(DO, base, rows, n, D)
        lse, delta = _row_stats(LSE, DELTA, g, n, rows)
        dq = tl.zeros((SUB, D), tl.float32)
        for t in range(tl.load(crow + qb), tl.load(crow + qb + 1)):
            kb = tl.load(col + t)
            p_t = tl.load(part + t)
            for j in tl.static_range(BLOCK // SUB):
                keys = kb * BLOCK + j * SUB + sub
                k, v = _rows(K, base, keys, n, D), _rows(V, base, keys, n, D)
                s = _scores(q, k, p_t, bits, r, j * SUB + sub, qk_scale, BLOCK, PRECISION)
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        _put_rows(DQ, base, rows, n, dq * scale, D)


def _launch(q: torch.Tensor, plan: TilePlan):
    """Grids (forward: one program per query block; backward: per SUB rows or keys of a block)
    and the kernels' compile-time arguments."""
    B, H, n, D = q.shape
    if n != plan.n:
        raise ValueError(f"the tile plan is for n = {plan.n}, the inputs have n = {n}")
    if B * H > MAX_GROUPS:
        raise ValueError(f"batch * heads = {B * H} is more than the kernels' {MAX_GROUPS}")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products
    nb, G = plan.num_blocks, B * H
    meta = dict(BLOCK=plan.block, D=D, PRECISION=precision)
    if INTERPRET:
        meta["SUB"] = plan.block // 2 if INTERPRET_SUB == "half" and plan.block >= 64 else plan.block
    return (nb, G), lambda m: (nb * (plan.block // m["SUB"]), G), meta


def _on(t: torch.Tensor):
    """Launch on t's GPU (not merely the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) in fp32, (B*H, n), chunk by chunk of rows (no full fp32 copies)."""
    B, H, n, D = out.shape
    o, do = out.reshape(-1, D), dout.reshape(-1, D)
    delta = torch.empty(o.shape[0], dtype=torch.float32, device=out.device)
    for i in range(0, o.shape[0], DELTA_ROWS):
        delta[i : i + DELTA_ROWS] = (o[i : i + DELTA_ROWS].float() * do[i : i + DELTA_ROWS].float()).sum(-1)
    return delta.view(B * H, n)


def forward(plan: TilePlan, q, k, v, dtype: torch.dtype | None = None):
    """(out (B, H, n, D) in ``dtype`` (default q's), log2-sum-exp (B*H, n) fp32)."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    B, H, n, D = q.shape
    out = torch.empty_like(q, dtype=dtype or q.dtype)
    lse = torch.empty(B * H, n, dtype=torch.float32, device=q.device)
    grid, _, meta = _launch(q, plan)
    with _on(q):
        _forward[grid](q, k, v, out, lse, plan.crow, plan.col, plan.part, plan.bits, n, plan.scale * _LOG2E, **meta)
    return out, lse


def backward(plan: TilePlan, q, k, v, out, lse, dout, delta=None, dtype: torch.dtype | None = None):
    """(dq, dk, dv) in ``dtype`` (default q's); ``delta``, rowsum(dO * O), is made from out and
    dout unless given."""
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    n = q.shape[2]
    delta = _delta(out, dout) if delta is None else delta.contiguous()
    dq, dk, dv = (torch.empty_like(t, dtype=dtype or t.dtype) for t in (q, k, v))
    _, grid, meta = _launch(q, plan)
    qk_scale = plan.scale * _LOG2E
    with _on(q):
        _backward_kv[grid](
            q, k, v, dout, lse, delta, dk, dv, plan.ccol, plan.row, plan.tile, plan.part, plan.bits, n, qk_scale,
            plan.scale, **meta,
        )  # fmt: skip
        _backward_q[grid](
            q, k, v, dout, lse, delta, dq, plan.crow, plan.col, plan.part, plan.bits, n, qk_scale, plan.scale, **meta
        )  # fmt: skip
    return dq, dk, dv


def _permuted(t: torch.Tensor, perm: torch.Tensor | None, dim: int = 2) -> torch.Tensor:
    return t if perm is None else t.index_select(dim, perm)


def parts_forward(pp: PartsPlan, q, k, v):
    """Each part on its own order, merged through the log-sum-exps in fp32: (out, log2-sum-exp
    (B*H, n), +inf for rows without keys)."""
    B, H, n, D = q.shape
    outs, lses = [], []
    for part in pp.parts:
        o, lse = forward(part.plan, *(_permuted(t, part.perm) for t in (q, k, v)), dtype=torch.float32)
        outs.append(_permuted(o, part.inv))
        lse = _permuted(lse, part.inv, dim=1)
        lses.append(torch.where(torch.isposinf(lse), float("-inf"), lse))  # no keys: no weight
    lse = torch.stack(lses)
    top = lse.max(0).values
    top = torch.where(torch.isneginf(top), 0.0, top)
    w = torch.exp2(lse - top)
    total = w.sum(0)
    w = (w / torch.where(total > 0, total, 1.0)).view(len(outs), B, H, n, 1)
    out = outs[0].mul_(w[0])
    for i, o in enumerate(outs[1:], 1):
        out.add_(o.mul_(w[i]))
    merged = torch.where(total > 0, top + torch.log2(total), float("inf"))
    return out.to(q.dtype), merged


def parts_backward(pp: PartsPlan, q, k, v, out, lse, dout):
    """Each part's FlashAttention-2 backward with the merged log-sum-exp (its probabilities are
    its share of the whole softmax) and the merged output's delta; the gradients summed in fp32."""
    delta = _delta(out, dout.contiguous())
    grads = None
    for part in pp.parts:
        args = [_permuted(t, part.perm) for t in (q, k, v, out)]
        g = backward(
            part.plan, *args, _permuted(lse, part.perm, dim=1), _permuted(dout, part.perm),
            delta=_permuted(delta, part.perm, dim=1), dtype=torch.float32,
        )  # fmt: skip
        g = [_permuted(t, part.inv) for t in g]
        grads = g if grads is None else [a.add_(b) for a, b in zip(grads, g)]
    return [t.to(x.dtype) for t, x in zip(grads, (q, k, v))]


def run_forward(plan, q, k, v):
    return parts_forward(plan, q, k, v) if isinstance(plan, PartsPlan) else forward(plan, q, k, v)


def run_backward(plan, q, k, v, out, lse, dout):
    if isinstance(plan, PartsPlan):
        return parts_backward(plan, q, k, v, out, lse, dout)
    return backward(plan, q, k, v, out, lse, dout)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = run_forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*run_backward(ctx.plan, q, k, v, out, lse, dout), None)


def attention_fn(plan: TilePlan | PartsPlan):
    """fn(q, k, v) for a tile plan: differentiable when the inputs need gradients."""

    def fn(q, k, v):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _Attention.apply(q, k, v, plan)
        return run_forward(plan, q, k, v)[0]

    fn.plan = plan  # type: ignore[attr-defined]
    return fn
