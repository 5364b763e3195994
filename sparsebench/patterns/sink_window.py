"""Attention sinks (StreamingLLM, Xiao et al. 2023): the first S tokens plus a sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, Pattern, param, require_at_most_n, require_positive, window_keys
from sparsebench.patterns.geometry import Band, Intervals, Keys, Structure, band, fixed_keys


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class SinkWindow(Pattern):
    name = "sink_window"
    rule = "j < S (sinks), or i-W < j <= i (|i-j| < W bidirectional)"
    family = "global + window"
    bounded_kv = True
    sinks: int = param("leading sink tokens S", 4)
    window: int = param("sliding window W (keys incl. self)")

    def validate(self):
        require_positive(self, "sinks", "window")

    def check(self, n, causal):
        require_at_most_n(self, n, "window", "sinks")

    def _allowed(self, q, k, n, causal):
        return (k < self.sinks) | ((q - k).abs() < self.window)

    def key_intervals(self, n, block, causal):
        return Intervals.cat(
            [band(n, block, self.window - 1, 0 if causal else self.window - 1), fixed_keys(n, block, 0, self.sinks - 1)]
        )

    def structure(self, n, causal):
        w = self.window - 1
        return Structure(n, causal, (Band(-w, w), Keys(torch.arange(min(self.sinks, n)))))

    def keys_per_query(self, n, causal):
        i = torch.arange(n)
        base = window_keys(n, self.window, causal)
        lo = torch.clamp(i - self.window + 1, min=0)
        # sinks below the window's start (and, causally, not after the query)
        extra = torch.clamp(torch.minimum(lo, torch.tensor(self.sinks)), min=0)
        if causal:
            extra = torch.minimum(extra, i + 1)
        return base + extra

    def kv_retained(self, n):
        return min(n, self.sinks + self.window)
