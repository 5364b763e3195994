"""Quest (Tang et al. 2024): each query keeps its own page and the earlier pages whose score
bound is highest, up to a token budget."""

from __future__ import annotations

from dataclasses import dataclass

from sparsebench.patterns.base import PATTERNS, param, require_positive
from sparsebench.patterns.selection import ContentSelected


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Quest(ContentSelected):
    name = "quest"
    rule = (
        "keys in pages of P; per page the elementwise min and max of its keys; query i keeps its own page "
        "(keys j <= i) and the T // P - 1 earlier pages with the highest bound sum_d max(q_d min_d, q_d max_d) "
        "(all earlier pages when there are fewer): the own page counts as P tokens of the budget T, whatever its "
        "fill; fp32 scores, ties to the lowest page; causal only"
    )
    _sized = ("page_size",)
    page_size: int = param("keys per page (P)")
    token_budget: int = param("tokens per query in whole pages, its own page included (T)")

    def validate(self):
        require_positive(self, "page_size", "token_budget")

    summary = "minmax"
    score_bytes = 16  # the previous block's scores, two products and their sum (selection.score_bytes)
    score_kind = "bound"  # the bound (score below), for the native selection

    @property
    def unit(self):
        return self.page_size

    @property
    def earlier_units(self):
        """Earlier pages a query keeps besides its own: the budget in whole pages, less the own."""
        return max(0, self.token_budget // self.page_size - 1)

    def row_bytes(self, head_dim):  # the block's fp32 rows and one clamp of them at a time
        return 8 * head_dim

    def score(self, rows, summaries, m):  # sum_d max(q_d min_d, q_d max_d): two products
        lo, hi = summaries
        return rows.clamp(min=0) @ hi[:, :, :m].transpose(-1, -2) + rows.clamp(max=0) @ lo[:, :, :m].transpose(-1, -2)
