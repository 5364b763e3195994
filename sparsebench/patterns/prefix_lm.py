"""Prefix LM (T5's prefix LM, UniLM, chat prompts seen whole): key j is allowed when j < P, the
prefix, for every query (also inside the prefix, so the prefix attends itself both ways), or
j <= i.

The pattern sets its own causality (``fixed_causality``): it is a causal decoder's mask with a
bidirectional prefix, the same mask whatever the scenario's ``causal`` says. Its cases run, and
are recorded, as causal (every query past the prefix is causal, a decoder continues it), and are
set against causal dense attention, which has fewer pairs: its ideal speedup is below 1. The
prefix is never cut to its causal half: ``allowed``, the structure and the block layout ignore
the causal cut that the base class applies to other patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.patterns.base import PATTERNS, Pattern, param, require_at_most_n, require_positive
from sparsebench.patterns.geometry import Intervals, Ranges, Structure


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class PrefixLM(Pattern):
    name = "prefix_lm"
    rule = "j < P (the prefix, for every query) or j <= i: causal after a bidirectional prefix"
    family = "dense"
    prefix: int = param("tokens of the bidirectional prefix P (every query attends them)", 1024)

    def validate(self):
        require_positive(self, "prefix")

    def check(self, n, causal):
        require_at_most_n(self, n, "prefix")

    # -- causality: its own --------------------------------------------------------------------
    def fixed_causality(self) -> bool | None:
        return True

    def causality_reason(self) -> str:
        return f"its prefix of {self.prefix} tokens is bidirectional, the rest causal"

    def quality_exempt(self, causal: bool) -> str | None:
        return (
            f"prefix_lm: its bidirectional prefix of {self.prefix} tokens is the model's semantics (a prefix LM), "
            "not an approximation of full attention"
        )

    # -- semantics: the prefix whole, in either setting ---------------------------------------
    def _allowed(self, q, k, n, causal):
        return (k < self.prefix) | (k <= q)

    def allowed(self, q, k, n, causal):
        return super().allowed(q, k, n, False)

    def key_intervals(self, n, block, causal):
        nb = -(-n // block)
        qb = torch.arange(nb)
        last = torch.clamp(qb * block + block - 1, max=n - 1)
        return Intervals(qb, torch.zeros(nb, dtype=torch.long), torch.clamp(last, min=min(self.prefix, n) - 1))

    def structure(self, n, causal):
        i = torch.arange(n)
        return Structure(
            n, False, (Ranges(torch.zeros(n, dtype=torch.long), torch.clamp(i, min=min(self.prefix, n) - 1)),)
        )

    def block_layout(self, n, block, causal):
        return super().block_layout(n, block, False)

    def keys_per_query(self, n, causal):
        i = torch.arange(n)
        return torch.clamp(i + 1, min=min(self.prefix, n))
