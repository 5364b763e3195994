"""Child et al. 2019 ("Generating Long Sequences with Sparse Transformers"), section 4.2:
strided and fixed factorised patterns, as the union of their two heads (A1 | A2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsebench.errors import PatternError
from sparsebench.patterns.base import PATTERNS, Pattern, param, require_at_most_n, require_positive
from sparsebench.patterns.geometry import Band, BlockBand, Intervals, Keys, Structure, all_keys_for


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Strided(Pattern):
    name = "strided"
    rule = "A1: i-L <= j <= i (|i-j| <= L bidirectional) or A2: (i-j) mod L == 0"
    family = "strided"
    stride: int = param("stride L (about sqrt(n) in the paper)")

    def validate(self):
        require_positive(self, "stride")

    def check(self, n, causal):
        require_at_most_n(self, n, "stride")

    def _allowed(self, q, k, n, causal):
        d = q - k
        return (d.abs() <= self.stride) | (d % self.stride == 0)

    def key_intervals(self, n, block, causal):
        # the A2 column pattern touches every key block once the stride is below n
        return all_keys_for(n, torch.arange(math.ceil(n / block)))

    def structure(self, n, causal):
        # A1 is the band |i-j| <= L; A2 adds the residue class of i beyond it: i - j = mL, |m| >= 2
        L = self.stride
        big = n // L + 1
        return Structure(n, causal, (Band(-L, L), Band(2, big, L), Band(-big, -2, L)))

    def keys_per_query(self, n, causal):
        i = torch.arange(n)
        L = self.stride
        local_back = torch.clamp(i, max=L) + 1  # i-L..i
        # A2 behind beyond the local band: j = i - mL, m >= 2, j >= 0  ->  floor(i/L) - 1 if i >= 2L
        far_back = torch.clamp(i // L - 1, min=0)
        if causal:
            return local_back + far_back
        r = n - 1 - i
        local_fwd = torch.clamp(r, max=L)
        far_fwd = torch.clamp(r // L - 1, min=0)
        return local_back + far_back + local_fwd + far_fwd


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Fixed(Pattern):
    name = "fixed"
    rule = "A1: floor(j/L) == floor(i/L) or A2: j mod L >= L - c (summary columns)"
    family = "strided"
    stride: int = param("block length L")
    summary: int = param("summary columns c at the end of each block", 1)

    def validate(self):
        require_positive(self, "stride", "summary")
        if self.summary > self.stride:
            raise PatternError(f"pattern 'fixed' parameter 'summary'={self.summary} must be <= stride {self.stride}")

    def check(self, n, causal):
        require_at_most_n(self, n, "stride")

    def _allowed(self, q, k, n, causal):
        L = self.stride
        return (q // L == k // L) | (k % L >= L - self.summary)

    def key_intervals(self, n, block, causal):
        L, c = self.stride, self.summary
        nb = math.ceil(n / block)
        # A1: the query block's own L-blocks
        qb = torch.arange(nb)
        lo = (qb * block) // L * L
        hi = torch.clamp(((qb * block + block - 1) // L + 1) * L - 1, max=n - 1)
        parts = [Intervals(qb, lo, hi)]
        # A2: summary columns of every L-block (a range when they are dense at block level)
        if L <= block:
            parts.append(all_keys_for(n, qb))
        else:
            m = torch.arange(math.ceil(n / L))
            lo2 = m * L + L - c
            qq = qb.repeat_interleave(m.numel())
            parts.append(Intervals(qq, lo2.repeat(nb), (lo2 + c - 1).repeat(nb)))
        return Intervals.cat(parts)

    def structure(self, n, causal):
        L, c = self.stride, self.summary
        j = torch.arange(n)
        return Structure(n, causal, (BlockBand(L, 0, 0), Keys(j[j % L >= L - c])))

    def keys_per_query(self, n, causal):
        L, c = self.stride, self.summary
        i = torch.arange(n)
        start = i // L * L
        if causal:
            own = i - start + 1
            # summary columns of earlier L-blocks (the own block's are inside A1 already)
            return own + (i // L) * c
        end = torch.clamp(start + L, max=n)
        own = end - start
        # summary columns j in other blocks: count j < n with j mod L >= L-c, minus own block's
        total = (n // L) * c + max(0, n % L - (L - c))
        own_summary = torch.clamp(end - (start + L - c), min=0)
        return own + total - own_summary
