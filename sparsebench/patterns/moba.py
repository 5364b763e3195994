"""MoBA (Lu et al. 2025): each query keeps its own chunk and the earlier chunks its gate picks."""

from __future__ import annotations

from dataclasses import dataclass

from sparsebench.patterns.base import PATTERNS, param, require_positive
from sparsebench.patterns.selection import ContentSelected


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
    score_kind = "dot"  # the gate (score below), for the native selection
    chunk: int = param("keys per chunk (C)")
    topk: int = param("chunks per query, its own included (K)")

    def validate(self):
        require_positive(self, "chunk", "topk")

    @property
    def unit(self):
        return self.chunk

    @property
    def earlier_units(self):
        return self.topk - 1

    def score(self, rows, summaries, m):  # the gate: q_i . mean(keys of the chunk)
        return rows @ summaries[:, :, :m].transpose(-1, -2)
