"""Block-local attention: queries attend only inside their own block of b tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, Pattern, param, require_at_most_n, require_positive
from sparsebench.patterns.geometry import BlockBand, Intervals, Structure


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class BlockLocal(Pattern):
    name = "block_local"
    rule = "floor(i/b) == floor(j/b)"
    family = "block"
    bounded_kv = True
    block: int = param("block length b")

    def validate(self):
        require_positive(self, "block")

    def check(self, n, causal):
        require_at_most_n(self, n, "block")

    def _allowed(self, q, k, n, causal):
        return q // self.block == k // self.block

    def key_intervals(self, n, block, causal):
        b = self.block
        nb = -(-n // block)
        qb = torch.arange(nb)
        lo = (qb * block) // b * b
        hi = torch.clamp(((qb * block + block - 1) // b + 1) * b - 1, max=n - 1)
        return Intervals(qb, lo, hi)

    def structure(self, n, causal):
        return Structure(n, causal, (BlockBand(self.block, 0, 0),))

    def keys_per_query(self, n, causal):
        i = torch.arange(n)
        start = i // self.block * self.block
        if causal:
            return i - start + 1
        return torch.clamp(start + self.block, max=n) - start

    def kv_retained(self, n):
        return min(n, self.block)
