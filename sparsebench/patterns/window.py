"""Local windows: sliding_window (Longformer's local attention, Mistral) and dilated_window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, Pattern, param, require_at_most_n, require_positive, window_keys
from sparsebench.patterns.geometry import Band, Intervals, Structure, band


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class SlidingWindow(Pattern):
    name = "sliding_window"
    rule = "causal: i-W < j <= i (W keys incl. self); bidirectional: |i-j| < W"
    family = "window"
    bounded_kv = True
    window: int = param("keys per query including itself (W)")

    def validate(self):
        require_positive(self, "window")

    def check(self, n, causal):
        require_at_most_n(self, n, "window")

    def _allowed(self, q, k, n, causal):
        return (q - k).abs() < self.window

    def key_intervals(self, n, block, causal):
        return band(n, block, self.window - 1, 0 if causal else self.window - 1)

    def keys_per_query(self, n, causal):
        return window_keys(n, self.window, causal)

    def structure(self, n, causal):
        w = self.window - 1
        return Structure(n, causal, (Band(-w, w),))

    def kv_retained(self, n):
        return min(n, self.window)


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DilatedWindow(Pattern):
    name = "dilated_window"
    rule = "j = i - kD (and i + kD bidirectional), 0 <= k < W"
    family = "window"
    bounded_kv = True
    window: int = param("keys on each side including self (W)")
    dilation: int = param("gap between attended keys (D)")

    def validate(self):
        require_positive(self, "window", "dilation")

    def check(self, n, causal):
        require_at_most_n(self, n, "window")

    def _allowed(self, q, k, n, causal):
        d = (q - k).abs()
        return (d % self.dilation == 0) & (d // self.dilation < self.window)

    def key_intervals(self, n, block, causal):
        # keys at offsets k*D: each offset touches at most two key blocks per query block
        parts = []
        for step in range(self.window):
            off = step * self.dilation
            if off >= n:
                break
            parts.append(band(n, block, off, -off))
            if not causal and off:
                parts.append(band(n, block, -off, off))
        return Intervals.cat(parts)

    def structure(self, n, causal):
        w = self.window - 1
        return Structure(n, causal, (Band(-w, w, self.dilation),))

    def keys_per_query(self, n, causal):
        i = torch.arange(n)
        back = torch.clamp(i // self.dilation + 1, max=self.window)
        if causal:
            return back
        fwd = torch.clamp((n - 1 - i) // self.dilation + 1, max=self.window)
        return back + fwd - 1

    def kv_retained(self, n):
        return min(n, (self.window - 1) * self.dilation + 1)
