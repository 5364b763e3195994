"""Random attention: each query attends R seeded random keys (distinct, not itself) plus itself.
Causal: the keys are drawn from the earlier tokens only."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, Pattern, param, require_positive, sample_distinct
from sparsebench.patterns.geometry import Structure, Table, key_list


@functools.lru_cache(maxsize=8)
def random_table(keys: int, seed: int, n: int, causal: bool) -> torch.Tensor:
    """(n, keys) int64: the random keys of each query, -1 where fewer candidates exist."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n)
    counts = i if causal else torch.full((n,), n - 1, dtype=torch.long)
    draw = sample_distinct(counts, keys, g)
    if not causal:  # skip over the query itself
        draw = torch.where(draw >= i[:, None], draw + 1, draw)
    return torch.where(draw >= 0, draw, torch.tensor(-1))


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Random(Pattern):
    name = "random"
    rule = "R seeded random keys per query, plus self"
    family = "random"
    keys: int = param("random keys per query (R)")
    seed: int = param("random seed", 0)

    def validate(self):
        require_positive(self, "keys")

    def table(self, n: int, causal: bool) -> torch.Tensor:
        return random_table(self.keys, self.seed, n, causal)

    def mask_build_bytes(self, n: int) -> int:
        """The key table and its row and validity indices (int64), not bands of the grid."""
        return 4 * 8 * n * min(self.keys, n)

    def mask(self, n: int, causal: bool, device: str | torch.device = "cpu") -> torch.Tensor:
        """Scattered from the key table (n R writes), not R comparisons over the n x n grid."""
        table = self.table(n, causal)
        out = torch.zeros(n, n, dtype=torch.bool)
        ok = table >= 0
        rows = torch.arange(n)
        out[rows[:, None].expand_as(table)[ok], table[ok]] = True
        out[rows, rows] = True
        if causal:
            out.tril_()
        return out.to(device)

    def _allowed(self, q, k, n, causal, table=None):
        if table is None:
            table = self.table(n, causal).to(q.device)
        m = q == k
        for r in range(table.shape[1]):  # unrolled: traceable as a pointwise mask_mod
            m = m | (table[:, r][q] == k)
        return m

    def mask_fn(self, n, causal, device="cpu"):
        table = self.table(n, causal).t().contiguous().t().to(device)  # column-major: cheap columns
        return lambda q, k: (
            self._allowed(q, k, n, causal, table) & (k <= q) if causal else self._allowed(q, k, n, causal, table)
        )

    def key_intervals(self, n, block, causal):
        table = self.table(n, causal)
        i = torch.arange(n)
        keys = torch.cat([table.flatten(), i])
        qb = torch.cat([(i // block).repeat_interleave(self.keys), i // block])
        ok = keys >= 0
        return key_list(n, block, qb[ok], keys[ok])

    def structure(self, n, causal):
        own = torch.arange(n)[:, None]  # the query itself, as one more slot
        return Structure(n, causal, (Table(torch.cat([self.table(n, causal), own], dim=1)),))

    def keys_per_query(self, n, causal):
        return (self.table(n, causal) >= 0).sum(1) + 1
