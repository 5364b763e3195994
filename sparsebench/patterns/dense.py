"""Full attention: every query attends every key (every earlier key when causal)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, Pattern
from sparsebench.patterns.geometry import Band, Structure


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Dense(Pattern):
    name = "dense"
    rule = "all pairs (the baseline)"
    family = "dense"

    def _allowed(self, q, k, n, causal):
        return torch.ones((), dtype=torch.bool, device=q.device)

    def structure(self, n, causal):
        return Structure(n, causal, (Band(-n, n),))

    def keys_per_query(self, n, causal):
        return torch.arange(1, n + 1) if causal else torch.full((n,), n, dtype=torch.long)
