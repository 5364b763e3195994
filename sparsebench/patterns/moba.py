"""MoBA (Lu et al. 2025): each query keeps its own chunk and the earlier chunks its gate picks."""

from __future__ import annotations

from dataclasses import dataclass

from sparsebench.patterns.base import PATTERNS, param, require_positive
from sparsebench.patterns.selection import (
    ContentSelected,
    Selection,
    _per_query_head,
    own_and_earlier_units,
    select_units,
    unit_summaries,
)


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Moba(ContentSelected):
    name = "moba"
    rule = (
        "keys in chunks of C; query i keeps its own chunk (keys j <= i) and the K-1 earlier chunks with the "
        "highest gate score q_i . mean(keys of the chunk) (all earlier chunks when there are fewer), per batch "
        "and query head; fp32 scores, ties to the lowest chunk; causal only"
    )
    _sized = ("chunk",)
    chunk: int = param("keys per chunk (C)")
    topk: int = param("chunks per query, its own included (K)")

    def validate(self):
        require_positive(self, "chunk", "topk")

    def keys_per_query(self, n, causal):
        return own_and_earlier_units(n, self.chunk, self.topk - 1)

    @property
    def unit(self):
        return self.chunk

    def slots(self, n):
        return min(self.topk - 1, -(-n // self.chunk) - 1) + 1

    def select(self, q, k) -> Selection:
        means = _per_query_head(unit_summaries(k, self.chunk, "mean"), q.shape[1])

        def gate(qb, m):
            return qb @ means[:, :, :m].transpose(-1, -2)

        return select_units(q, self.chunk, self.topk - 1, gate)
