"""Token-level selection by a cheap indexer, as DeepSeek's sparse attention (V3.2) does: a seeded
Gaussian projection shared by all heads stands in for the trained indexer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, param, require_positive
from sparsebench.patterns.selection import (
    ContentSelected,
    Selection,
    TokenIncremental,
    gaussian_projection,
    select_tokens,
)


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class TopkKeys(ContentSelected):
    name = "topk_keys"
    rule = (
        "query i keeps itself and the R earlier keys with the highest indexer score (q_i P) . (k_j P), P one "
        "seeded Gaussian (head_dim x index_dim) projection shared by all heads (all earlier keys when there are "
        "fewer), per batch and query head; fp32 scores, ties to the lowest key; causal only"
    )
    _sized = ("keys",)
    keys: int = param("earlier keys per query (R)")
    index_dim: int = param("dimensions of the indexer's projection", 32)
    seed: int = param("seed of the projection", 0)
    score_bytes = 16  # the block's scores, the previous block's and the product's operands (measured)

    def validate(self):
        require_positive(self, "keys", "index_dim")

    def keys_per_query(self, n, causal):
        return torch.clamp(torch.arange(n), max=self.keys) + 1

    @property
    def unit(self):
        return 1

    def slots(self, n):
        return min(self.keys, n - 1) + 1

    def key_side_bytes(self, bh: int, n: int, head_dim: int) -> int:
        """The keys' fp32 projections the indexer scores against (at most ``bh`` key heads)."""
        return bh * n * self.index_dim * 4

    def row_bytes(self, head_dim: int) -> int:
        """A block's fp32 query rows and their projections."""
        return 4 * (head_dim + self.index_dim)

    def projection(self, head_dim: int, device) -> torch.Tensor:
        return gaussian_projection(head_dim, self.index_dim, self.seed, device)

    def select(self, q, k) -> Selection:
        return select_tokens(q, k, self.keys, self.projection(q.shape[-1], q.device))

    def incremental(self, cache_k, heads, context):
        return TokenIncremental(self, cache_k, heads, context)
