"""Longformer (Beltagy et al. 2020): a sliding window plus global tokens that attend, and are
attended by, every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.errors import PatternError
from sparsebench.patterns.base import (
    PATTERNS,
    Pattern,
    any_equal,
    param,
    require_at_most_n,
    require_positive,
    window_keys,
)
from sparsebench.patterns.geometry import Band, Intervals, Keys, Rows, Structure, all_keys_for, band, fixed_keys


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Longformer(Pattern):
    name = "longformer"
    rule = "sliding window, or j in G, or i in G (global tokens)"
    family = "global + window"
    bounded_kv = True
    window: int = param("sliding window W (keys incl. self)")
    global_tokens: list[int] = param("indices of global tokens G", [0])

    def validate(self):
        require_positive(self, "window")
        if any(g < 0 for g in self.global_tokens):
            raise PatternError("pattern 'longformer' parameter 'global_tokens' must hold indices >= 0")

    def check(self, n, causal):
        require_at_most_n(self, n, "window")
        bad = [g for g in self.global_tokens if g >= n]
        if bad:
            raise PatternError(
                f"pattern 'longformer' parameter 'global_tokens' has index {bad[0]} outside a sequence of {n}"
            )

    def _g(self, device):
        return torch.tensor(sorted(set(self.global_tokens)), dtype=torch.long, device=device)

    def _allowed(self, q, k, n, causal):
        g = sorted(set(self.global_tokens))
        return ((q - k).abs() < self.window) | any_equal(k, g) | any_equal(q, g)

    def key_intervals(self, n, block, causal):
        parts = [band(n, block, self.window - 1, 0 if causal else self.window - 1)]
        for t in sorted(set(self.global_tokens)):
            parts.append(fixed_keys(n, block, t, t))
        gq = torch.unique(self._g("cpu") // block)
        parts.append(all_keys_for(n, gq))
        return Intervals.cat(parts)

    def structure(self, n, causal):
        w = self.window - 1
        g = self._g("cpu")
        g = g[g < n]
        return Structure(n, causal, (Band(-w, w), Keys(g), Rows(g)))

    def keys_per_query(self, n, causal):
        g = self._g("cpu")
        i = torch.arange(n)
        base = window_keys(n, self.window, causal)
        # global keys outside each query's window
        lo = torch.clamp(i - self.window + 1, min=0)
        hi = i if causal else torch.clamp(i + self.window - 1, max=n - 1)
        inside = (g[None, :] >= lo[:, None]) & (g[None, :] <= hi[:, None])
        visible = (g[None, :] <= i[:, None]) if causal else torch.ones_like(inside)
        out = base + (visible & ~inside).sum(1)
        is_g = torch.isin(i, g)
        out[is_g] = (i[is_g] + 1) if causal else n
        return out

    def kv_retained(self, n):
        g = set(self.global_tokens)
        if any(t >= n for t in g):  # a global query still to come attends every earlier key
            return n
        return min(n, self.window + len(g))
