"""BigBird (Zaheer et al. 2020), block form: a window of blocks, global blocks (ITC: the first
blocks attend and are attended by all), and random blocks per query block."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from sparsebench.errors import PatternError
from sparsebench.patterns.base import PATTERNS, Pattern, param, require_positive, sample_distinct
from sparsebench.patterns.geometry import BlockBand, BlockTable, Intervals, Keys, Rows, Structure


@functools.lru_cache(maxsize=8)
def random_blocks(nblocks: int, random: int, window: int, glob: int, seed: int, causal: bool) -> torch.Tensor:
    """(nblocks, random) key-block indices chosen outside the window and global blocks."""
    g = torch.Generator().manual_seed(seed)
    qb = torch.arange(nblocks)
    half = window // 2
    # candidates: blocks [glob, lo_window) and (hi_window, last] (causal: only the first range)
    lo_w = torch.clamp(qb - half, min=glob)
    hi_w = torch.clamp(qb + half, max=nblocks - 1)
    left = torch.clamp(lo_w - glob, min=0)
    right = (
        torch.zeros_like(left)
        if causal
        else torch.clamp(nblocks - 1 - torch.maximum(hi_w, torch.tensor(glob - 1)), min=0)
    )
    draw = sample_distinct(left + right, random, g)
    pick = torch.where(draw < left[:, None], draw + glob, draw - left[:, None] + hi_w[:, None] + 1)
    out = torch.where(draw >= 0, pick, torch.tensor(-1))
    out[qb < glob] = -1  # global query blocks already see everything
    return out


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class BigBird(Pattern):
    name = "bigbird"
    rule = "block-level window + global + random blocks"
    family = "global + window"
    block: int = param("BigBird block size", 64)
    window_blocks: int = param("blocks in the sliding window (odd, centred)", 3)
    global_blocks: int = param("leading global blocks", 1)
    random_blocks: int = param("random key blocks per query block", 2)
    seed: int = param("random seed", 0)

    def validate(self):
        require_positive(self, "block", "window_blocks")
        if self.global_blocks < 0 or self.random_blocks < 0:
            raise PatternError("pattern 'bigbird': global_blocks and random_blocks must be >= 0")

    def check(self, n, causal):
        if self.block > n:
            raise PatternError(
                f"pattern 'bigbird' parameter 'block'={self.block} is larger than the sequence length {n}"
            )

    def _table(self, n, causal):
        nbl = math.ceil(n / self.block)
        return random_blocks(nbl, self.random_blocks, self.window_blocks, self.global_blocks, self.seed, causal)

    def _allowed(self, q, k, n, causal, table=None):
        qb, kb = q // self.block, k // self.block
        m = ((qb - kb).abs() <= self.window_blocks // 2) | (qb < self.global_blocks) | (kb < self.global_blocks)
        if self.random_blocks:
            if table is None:
                table = self._table(n, causal).to(q.device)
            for r in range(table.shape[1]):  # unrolled: traceable as a pointwise mask_mod
                m = m | (table[:, r][qb] == kb)
        return m

    def mask_fn(self, n, causal, device="cpu"):
        table = self._table(n, causal).to(device) if self.random_blocks else None

        def f(q, k):
            m = self._allowed(q, k, n, causal, table)
            return m & (k <= q) if causal else m

        return f

    def structure(self, n, causal):
        half = self.window_blocks // 2
        parts = [BlockBand(self.block, -half, half)]
        if self.random_blocks:
            parts.append(BlockTable(self.block, self._table(n, causal)))
        if self.global_blocks:
            g = torch.arange(min(n, self.global_blocks * self.block))
            parts += [Keys(g), Rows(g)]
        return Structure(n, causal, tuple(parts))

    def key_intervals(self, n, block, causal):
        bb = self.block
        nbl = math.ceil(n / bb)
        qbl = torch.arange(nbl)
        half = self.window_blocks // 2
        rows, los, his = [], [], []

        def add(q_big, k_lo_big, k_hi_big):
            rows.append(q_big)
            los.append(k_lo_big)
            his.append(k_hi_big)

        add(qbl, torch.clamp(qbl - half, min=0), torch.clamp(qbl + half, max=nbl - 1))
        if self.global_blocks:
            g = min(self.global_blocks, nbl)
            add(qbl, torch.zeros_like(qbl), torch.full_like(qbl, g - 1))
            gq = torch.arange(g)
            add(gq, torch.zeros_like(gq), torch.full_like(gq, nbl - 1))
        if self.random_blocks:
            t = self._table(n, causal)
            ok = t >= 0
            r = qbl[:, None].expand_as(t)[ok]
            add(r, t[ok], t[ok])
        q_big, k_lo, k_hi = torch.cat(rows), torch.cat(los), torch.cat(his)
        # map each BigBird query block onto the layout's query blocks it overlaps
        first = q_big * bb // block
        last = torch.clamp((q_big * bb + bb - 1) // block, max=math.ceil(n / block) - 1)
        span = last - first + 1
        qb = torch.repeat_interleave(first, span) + (
            torch.arange(int(span.sum())) - torch.repeat_interleave(torch.cumsum(span, 0) - span, span)
        )
        lo = torch.repeat_interleave(k_lo * bb, span)
        hi = torch.clamp(torch.repeat_interleave(k_hi * bb + bb - 1, span), max=n - 1)
        return Intervals(qb, lo, hi)
