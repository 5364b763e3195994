"""Quest (Tang et al. 2024): each query keeps its own page and the earlier pages whose score
bound is highest, up to a token budget."""

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

    @property
    def earlier_pages(self) -> int:
        """Earlier pages a query keeps besides its own: the budget in whole pages, less the own."""
        return max(0, self.token_budget // self.page_size - 1)

    def keys_per_query(self, n, causal):
        return own_and_earlier_units(n, self.page_size, self.earlier_pages)

    @property
    def unit(self):
        return self.page_size

    def slots(self, n):
        return min(self.earlier_pages, -(-n // self.page_size) - 1) + 1

    def select(self, q, k) -> Selection:
        lo, hi = (_per_query_head(t, q.shape[1]) for t in unit_summaries(k, self.page_size, "minmax"))

        def bound(qb, m):  # sum_d max(q_d min_d, q_d max_d): two products
            return qb.clamp(min=0) @ hi[:, :, :m].transpose(-1, -2) + qb.clamp(max=0) @ lo[:, :, :m].transpose(-1, -2)

        return select_units(q, self.page_size, self.earlier_pages, bound)
