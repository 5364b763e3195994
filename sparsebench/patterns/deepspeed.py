"""DeepSpeed block-sparse layouts (``deepspeed.ops.sparse_attention.sparsity_config``, removed
after DeepSpeed 0.14), rebuilt from the same parameter names so that old configs keep working.

=================  ==============================================================
pattern            DeepSpeed class
=================  ==============================================================
ds_fixed           FixedSparsityConfig
ds_variable        VariableSparsityConfig
ds_bigbird         BigBirdSparsityConfig
ds_bslongformer    BSLongformerSparsityConfig
ds_sliding_window  LocalSlidingWindowSparsityConfig
=================  ==============================================================

Each pattern builds DeepSpeed's ``make_layout`` block matrix (vectorised, at block level only)
and allows token pair (i, j) when ``layout[i // block, j // block]`` is set. Choices, where this
differs from DeepSpeed:

* One layout, that of head 0. ``num_heads`` and ``different_layout_per_head`` are not parameters;
  ``num_different_global_patterns`` (ds_fixed) must be <= num_local_blocks / num_global_blocks as in
  DeepSpeed (which also wants different_layout_per_head for > 1) but, as in
  DeepSpeed, it only changes the global blocks of heads other than head 0.
* ``attention`` defaults to ``auto``: ``unidirectional`` when the case is causal, otherwise
  ``bidirectional``. ``attention=bidirectional`` sets the pattern's own causality
  (``fixed_causality``): it runs bidirectional in a causal scenario too, as DeepSpeed's layout
  does, and its records say ``causal: false``. ``unidirectional`` is a block-level layout whose
  diagonal blocks follow the scenario (cut at j > i when causal, whole when not, as in DeepSpeed).
* DeepSpeed requires ``n % block == 0``. Here the layout has ``ceil(n / block)`` blocks and the
  last one is short.
* Random blocks (ds_variable, ds_bigbird) come from a generator seeded by ``seed``: they follow
  DeepSpeed's distribution (``random.sample`` of distinct key blocks per block row) but not its
  exact draws. Unidirectional ds_bigbird draws ``min(num_random_blocks, row + 1)`` blocks for
  early rows, where DeepSpeed's ``random.sample`` would fail.
* ``block_layout`` and ``keys_per_query`` are computed from the block layout (cost grows with
  its set blocks, not with n^2 tokens); only causal diagonal tiles are counted token by token.
* Global block indices must be >= 0 (DeepSpeed would index negative ones from the end), and
  ds_fixed needs at least ``num_global_blocks`` blocks (DeepSpeed slices with a negative start).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsebench.errors import PatternError
from sparsebench.patterns.base import PATTERNS, Pattern, param, require_positive, sample_distinct
from sparsebench.patterns.geometry import BlockLayout, Intervals

_ATTENTION = ("auto", "bidirectional", "unidirectional")


@functools.lru_cache(maxsize=16)
def _cached_layout(cls: type, params: tuple, nb: int, uni: bool, device: str) -> torch.Tensor:
    """Block layouts keyed by pattern class + parameters (list defaults made tuples)."""
    return cls(**dict(params))._build(nb, uni).to(device)


def _grid(nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(nb)
    return r[:, None], r[None, :]


def _span_rows(nb: int, starts, ends, threshold_from_start: bool) -> torch.Tensor:
    """(nb,) first row that sees each global column (nb + 1 where none): columns in
    [start, min(end, nb)) for each start < nb; the row is 0 (bidirectional) or the span start."""
    first = torch.full((nb,), nb + 1, dtype=torch.long)
    for s, e in zip(starts, ends):
        if s < nb:
            row = s if threshold_from_start else 0
            first[s : min(e, nb)] = torch.clamp(first[s : min(e, nb)], max=row)
    return first


def _spans(starts: tuple[int, ...], ends: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """DeepSpeed's global_block_indices / global_block_end_indices as [start, end) spans."""
    return starts, (ends if ends else tuple(s + 1 for s in starts))


@dataclass(frozen=True, kw_only=True)
class _DeepSpeed(Pattern):
    """Shared machinery: a cached (nb, nb) bool block layout (``_build``), its lookup, and key
    intervals, tile layouts and keys per query all derived from it at block level."""

    horizontal: ClassVar[bool] = False  # whether the class has horizontal_global_attention
    family: ClassVar[str] = "DeepSpeed"
    block: int = param("DeepSpeed block size (tokens per layout block)", 16)
    attention: str = param(
        "auto | bidirectional | unidirectional (auto: unidirectional when causal; bidirectional runs "
        "bidirectional in a causal scenario too)",
        "auto",
    )

    # -- to implement --------------------------------------------------------------------------
    def _build(self, nb: int, uni: bool) -> torch.Tensor:
        raise NotImplementedError

    def _check_blocks(self, nb: int) -> None:
        """Raise if DeepSpeed would reject a layout of nb blocks."""

    # -- shared -------------------------------------------------------------------------------
    def _err(self, name: str, text: str) -> PatternError:
        return PatternError(f"pattern {self.name!r} parameter {name!r} {text}")

    def validate(self):
        require_positive(self, "block")
        if self.attention not in _ATTENTION:
            raise self._err("attention", f"must be one of {', '.join(_ATTENTION)}, got {self.attention!r}")
        if self.horizontal and self.horizontal_global_attention and self.attention == "unidirectional":
            raise self._err("horizontal_global_attention", "needs attention=bidirectional")

    def unidirectional(self, causal: bool) -> bool:
        return self.attention == "unidirectional" or (self.attention == "auto" and causal)

    def fixed_causality(self) -> bool | None:
        # DeepSpeed's bidirectional layout is not cut to its causal half by a causal scenario;
        # a unidirectional layout is a block layout whose diagonal blocks follow the scenario
        return False if self.attention == "bidirectional" else None

    def causality_reason(self) -> str:
        return f"its attention={self.attention}" if self.attention == "bidirectional" else ""

    def quality_exempt(self, causal: bool) -> str | None:
        # a unidirectional (or auto) layout approximates full attention with the scenario's causality
        if self.attention != "bidirectional":
            return None
        return (
            f"{self.name}: attention=bidirectional sets the layout's own causality; the layout is the model's "
            "semantics, not an approximation of the scenario's full attention"
        )

    def check(self, n, causal):
        if self.block > n:
            raise self._err("block", f"={self.block} is larger than the sequence length {n}")
        if self.horizontal and self.horizontal_global_attention and self.unidirectional(causal):
            raise self._err("horizontal_global_attention", "needs a bidirectional layout (set attention=bidirectional)")
        self._check_blocks(math.ceil(n / self.block))

    def _need_blocks(self, nb: int, name: str) -> None:
        if getattr(self, name) > nb:
            raise self._err(name, f"={getattr(self, name)} is more than the {nb} blocks of the sequence")

    def _check_spans(self) -> None:
        starts, ends = self.global_block_indices, self.global_block_end_indices
        if any(s < 0 for s in starts):
            raise self._err("global_block_indices", "must hold block indices >= 0")
        if ends and len(ends) != len(starts):
            raise self._err("global_block_end_indices", "must have as many entries as global_block_indices")
        if ends and any(s >= e for s, e in zip(starts, ends)):
            raise self._err("global_block_end_indices", "must be larger than the matching start index")

    def layout_tensor(self, n: int, causal: bool, device: str | torch.device = "cpu") -> torch.Tensor:
        """(nb, nb) bool block layout, nb = ceil(n / block) (cached; do not modify)."""
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.params().items())
        return _cached_layout(type(self), key, math.ceil(n / self.block), self.unidirectional(causal), str(device))

    def ds_layout(self, n: int, causal: bool) -> torch.Tensor:
        """DeepSpeed ``make_layout(n)[0]``: the (nb, nb) int64 layout of head 0."""
        return self.layout_tensor(n, causal).to(torch.int64)

    def _allowed(self, q, k, n, causal, layout=None):
        if layout is None:
            layout = self.layout_tensor(n, causal, q.device)
        return layout[q // self.block, k // self.block]

    def mask_fn(self, n, causal, device="cpu"):
        # the layout built here, outside the traced function: a cached lookup inside it would
        # break FlexAttention's full-graph compile
        layout = self.layout_tensor(n, causal, device)

        def f(q, k):
            m = self._allowed(q, k, n, causal, layout)
            return m & (k <= q) if causal else m

        return f

    def key_intervals(self, n, block, causal):
        lay = self.layout_tensor(n, causal)
        nb, bb = lay.shape[0], self.block
        pad = torch.zeros(nb, nb + 2, dtype=torch.bool)
        pad[:, 1:-1] = lay
        # each run of set blocks in a row is one key interval
        rows, c_lo = torch.nonzero(lay & ~pad[:, :-2], as_tuple=True)
        _, c_hi = torch.nonzero(lay & ~pad[:, 2:], as_tuple=True)
        # map each pattern query block onto the layout query blocks it overlaps
        first = rows * bb // block
        last = torch.clamp((rows * bb + bb - 1) // block, max=math.ceil(n / block) - 1)
        span = last - first + 1
        offs = torch.arange(int(span.sum())) - torch.repeat_interleave(torch.cumsum(span, 0) - span, span)
        qb = torch.repeat_interleave(first, span) + offs
        lo = torch.repeat_interleave(c_lo * bb, span)
        hi = torch.clamp(torch.repeat_interleave(c_hi * bb + bb - 1, span), max=n - 1)
        return Intervals(qb, lo, hi)

    def block_layout(self, n, block, causal):
        """Tile counts from the block layout (cost ~ its set blocks), not from token tiles;
        only the diagonal tiles of a causal layout are counted token by token."""
        lay = self.layout_tensor(n, causal)
        nbl = math.ceil(n / block)
        # the layout blocks each pattern block overlaps, and by how many tokens
        start = torch.arange(lay.shape[0]) * self.block
        stop = torch.clamp(start + self.block, max=n)
        first = start // block
        width = int(((stop - 1) // block - first).max()) + 1
        t = first[:, None] + torch.arange(width)
        ov = (torch.minimum(stop[:, None], (t + 1) * block) - torch.maximum(start[:, None], t * block)).clamp(min=0)
        p, q = torch.nonzero(lay, as_tuple=True)
        code = (t[p][:, :, None] * nbl + t[q][:, None, :]).flatten()
        weight = (ov[p][:, :, None] * ov[q][:, None, :]).flatten()
        keep = weight > 0
        if causal:
            keep &= code // nbl > code % nbl
        tiles, inverse = torch.unique(code[keep], return_inverse=True)
        count = torch.zeros(tiles.numel(), dtype=torch.long).index_add_(0, inverse, weight[keep])
        size = torch.clamp(n - torch.arange(nbl) * block, max=block)
        full = count == size[tiles // nbl] * size[tiles % nbl]
        if causal:  # diagonal tiles: count j <= i token by token
            d = torch.arange(nbl)
            dcount = torch.cat([self._diagonal(n, block, d[s : s + 4096]) for s in range(0, nbl, 4096)])
            dfull = dcount == size * size  # as the base: no mask needed (so only 1-token tiles)
            tiles, order = torch.sort(torch.cat([tiles, d * nbl + d]))
            count, full = torch.cat([count, dcount])[order], torch.cat([full, dfull])[order]
            nz = count > 0
            tiles, count, full = tiles[nz], count[nz], full[nz]
        qb = tiles // nbl
        crow = torch.zeros(nbl + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(qb, minlength=nbl), 0)
        return BlockLayout(n=n, block=block, causal=causal, crow=crow, col=tiles % nbl, full=full, count=count)

    def _diagonal(self, n, block, d):
        """Allowed causal pairs inside the diagonal tiles d (rows of at most block tokens)."""
        out = torch.empty(d.numel(), dtype=torch.long)
        step = max(1, (1 << 22) // (block * block))
        ar = torch.arange(block)
        for s in range(0, d.numel(), step):
            tok = d[s : s + step, None] * block + ar
            ok = tok < n
            tok = tok.clamp(max=n - 1)
            m = self.allowed(tok[:, :, None], tok[:, None, :], n, True) & ok[:, :, None] & ok[:, None, :]
            out[s : s + step] = m.sum(dim=(1, 2))
        return out

    def keys_per_query(self, n, causal):
        lay = self.layout_tensor(n, causal)
        b = self.block
        i = torch.arange(n)
        qb = i // b
        if causal:  # earlier blocks are always full; the own block up to the query
            before = torch.tril(lay, -1).sum(1) * b
            return before[qb] + lay.diagonal()[qb].long() * (i - qb * b + 1)
        short = b - (n - (lay.shape[0] - 1) * b)  # missing tokens of the last block
        return (lay.sum(1) * b - lay[:, -1].long() * short)[qb]


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DSFixed(_DeepSpeed):
    name = "ds_fixed"
    rule = "DeepSpeed FixedSparsityConfig: local block windows + last blocks of each window global"
    horizontal = True
    num_local_blocks: int = param("blocks per local window", 4)
    num_global_blocks: int = param("last blocks of each window that are global", 1)
    horizontal_global_attention: bool = param("global blocks also attend to everything (bidirectional)", False)
    num_different_global_patterns: int = param("accepted for DeepSpeed configs; head 0 ignores it", 1)

    def validate(self):
        super().validate()
        require_positive(self, "num_local_blocks", "num_global_blocks", "num_different_global_patterns")
        if self.num_local_blocks % self.num_global_blocks:
            raise self._err("num_local_blocks", f"={self.num_local_blocks} must be a multiple of num_global_blocks")
        if self.num_different_global_patterns > self.num_local_blocks // self.num_global_blocks:
            raise self._err("num_different_global_patterns", "must be <= num_local_blocks / num_global_blocks")

    def _check_blocks(self, nb):
        self._need_blocks(nb, "num_global_blocks")

    def _build(self, nb, uni):
        r, c = _grid(nb)
        L, g = self.num_local_blocks, self.num_global_blocks
        local = (r // L == c // L) & ((c <= r) if uni else True)
        # global columns: the last g blocks of every complete window ...
        col = torch.arange(nb)
        first_g = L - g
        end = nb - nb % L
        is_g = (col < end) & (col % L >= first_g)
        first_row = torch.where(is_g, col - col % L + first_g if uni else 0, nb + 1)
        # ... and g blocks at the same offset in a short last window (or its last g blocks)
        if end < nb:
            start = min(end + first_g, nb - g)
            tail = first_row[start : start + g]
            first_row[start : start + g] = torch.clamp(tail, max=start if uni else 0)
            is_g[start : start + g] = True
        lay = local | (r >= first_row[None, :])
        if self.horizontal_global_attention:
            lay |= is_g[:, None]
        return lay


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DSVariable(_DeepSpeed):
    name = "ds_variable"
    rule = "DeepSpeed VariableSparsityConfig: variable local windows + global block spans + random"
    horizontal = True
    num_random_blocks: int = param("random key blocks per block row", 0)
    local_window_blocks: list[int] = param("blocks of each local window; the last size repeats", [4])
    global_block_indices: list[int] = param("global blocks (span starts when end indices are given)", [0])
    global_block_end_indices: list[int] = param("exclusive ends of the global spans (empty: single blocks)", [])
    horizontal_global_attention: bool = param("global blocks also attend to everything (bidirectional)", False)
    seed: int = param("random seed", 0)

    def validate(self):
        super().validate()
        if self.num_random_blocks < 0:
            raise self._err("num_random_blocks", "must be >= 0")
        if not self.local_window_blocks or min(self.local_window_blocks) < 1:
            raise self._err("local_window_blocks", "must be a non-empty list of sizes >= 1")
        self._check_spans()

    def _check_blocks(self, nb):
        self._need_blocks(nb, "num_random_blocks")

    def _build(self, nb, uni):
        r, c = _grid(nb)
        sizes = torch.tensor(self.local_window_blocks)
        ends = torch.cumsum(sizes, 0)
        total, last = int(ends[-1]), int(sizes[-1])
        blk = torch.arange(nb)
        listed = torch.cat([torch.zeros(1, dtype=torch.long), ends])[torch.searchsorted(ends, blk, right=True)]
        window = torch.where(blk < total, listed, total + (blk - total) // last * last)
        lay = (window[:, None] == window[None, :]) & ((c <= r) if uni else True)
        starts, stops = _spans(self.global_block_indices, self.global_block_end_indices)
        lay |= r >= _span_rows(nb, starts, stops, uni)[None, :]
        if self.horizontal_global_attention:
            lay |= (_span_rows(nb, starts, stops, False) == 0)[:, None]
        if self.num_random_blocks:
            gen = torch.Generator().manual_seed(self.seed)
            draw = sample_distinct(torch.full((nb,), nb), self.num_random_blocks, gen)
            ok = draw >= 0
            lay[blk[:, None].expand_as(draw)[ok], draw[ok]] = True
        return lay


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DSBigBird(_DeepSpeed):
    name = "ds_bigbird"
    rule = "DeepSpeed BigBirdSparsityConfig: sliding block window + leading global blocks + random"
    num_random_blocks: int = param("random key blocks per block row", 1)
    num_sliding_window_blocks: int = param("blocks in the sliding window (centred)", 3)
    num_global_blocks: int = param("leading blocks that attend and are attended by all", 1)
    seed: int = param("random seed", 0)

    def validate(self):
        super().validate()
        require_positive(self, "num_sliding_window_blocks")
        for name in ("num_random_blocks", "num_global_blocks"):
            if getattr(self, name) < 0:
                raise self._err(name, "must be >= 0")

    def _check_blocks(self, nb):
        self._need_blocks(nb, "num_random_blocks")
        self._need_blocks(nb, "num_sliding_window_blocks")
        self._need_blocks(nb, "num_global_blocks")

    def _build(self, nb, uni):
        r, c = _grid(nb)
        g = self.num_global_blocks
        lay = ((r - c).abs() <= self.num_sliding_window_blocks // 2) | (r < g) | (c < g)
        if self.num_random_blocks:
            gen = torch.Generator().manual_seed(self.seed)
            rows = torch.arange(nb)
            draw = sample_distinct(rows + 1 if uni else torch.full((nb,), nb), self.num_random_blocks, gen)
            ok = draw >= 0
            lay[rows[:, None].expand_as(draw)[ok], draw[ok]] = True
        return (lay & (c <= r)) if uni else lay


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DSBSLongformer(_DeepSpeed):
    name = "ds_bslongformer"
    rule = "DeepSpeed BSLongformerSparsityConfig: sliding block window + global block spans"
    num_sliding_window_blocks: int = param("blocks in the sliding window (centred)", 3)
    global_block_indices: list[int] = param("global blocks (span starts when end indices are given)", [0])
    global_block_end_indices: list[int] = param("exclusive ends of the global spans (empty: single blocks)", [])

    def validate(self):
        super().validate()
        require_positive(self, "num_sliding_window_blocks")
        self._check_spans()

    def _check_blocks(self, nb):
        self._need_blocks(nb, "num_sliding_window_blocks")

    def _build(self, nb, uni):
        r, c = _grid(nb)
        is_g = _span_rows(nb, *_spans(self.global_block_indices, self.global_block_end_indices), False) == 0
        lay = ((r - c).abs() <= self.num_sliding_window_blocks // 2) | is_g[:, None] | is_g[None, :]
        return (lay & (c <= r)) if uni else lay


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DSSlidingWindow(_DeepSpeed):
    name = "ds_sliding_window"
    rule = "DeepSpeed LocalSlidingWindowSparsityConfig: sliding block window only"
    bounded_kv = True
    num_sliding_window_blocks: int = param("blocks in the sliding window (centred; causal: w//2 back)", 3)

    def validate(self):
        super().validate()
        require_positive(self, "num_sliding_window_blocks")

    def _check_blocks(self, nb):
        self._need_blocks(nb, "num_sliding_window_blocks")

    def _build(self, nb, uni):
        r, c = _grid(nb)
        w = self.num_sliding_window_blocks // 2
        return (c >= r - w) & ((c <= r) if uni else (c <= r + w))

    def kv_retained(self, n):
        # the newest query and all later ones start at block (n - 1) // block - w or after
        first = (n - 1) // self.block - self.num_sliding_window_blocks // 2
        return n - max(0, first * self.block)
