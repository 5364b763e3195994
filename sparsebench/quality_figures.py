"""Quality against full attention: what a pattern gives up, the definitions in one place.

A case's output O is set against full attention O_full, dense attention with the case's
causality on the same q, k and v (k and v repeated per query head under grouped-query
attention, as the same-mask check repeats them), computed here in fp32 (float64 inputs stay
float64):

* ``full_rel_err`` = ||O - O_full||_F / ||O_full||_F, one Frobenius norm over the whole output
  tensor (batch, heads, the query rows covered, head_dim);
* ``recall_mean``: the share of full attention's softmax mass that falls on the keys the case
  attended, sum over those keys of softmax(q_i . k_j / sqrt(d)) under the case's causality,
  averaged over batch, heads and query rows; ``recall_min``: the least such row;
* ``full_grad_rel_err`` (backward): the same norm over the query gradient, dQ of the case against
  dQ_full of full attention for the same output gradient;
* ``quality_rows``: the query rows these cover: n (every row: exact) or the sampled rows. A row's
  output and query gradient depend on that row alone, so sampled rows give the exact figures of
  those rows.

Memory: full attention's scores are never held for more than a band of query rows at once
(``BAND_ELEMENTS`` scores over batch and heads, a few MiB of temporaries), whatever n.

This module knows nothing of cases or backends: the harness (``harness.case_quality``) calls
``measure`` once per case, after its timed calls, with the keys the case attended
(``harness.attended``: the pattern's mask, or a content-selected call's selection); the Python
API (``sparsebench.quality``) calls it with the pattern's own masked attention as O. (Its name is
not ``quality``: importing a module ``sparsebench.quality`` would rebind the package's attribute,
the API function, to the module.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from sparsebench.patterns.base import MASK_CHUNK_ELEMENTS

# Scores (batch x heads x rows x n) computed at once: the mask's band size, so that a band's
# temporaries (scores, probabilities, their product with the mask) are about 1 MiB each in fp32.
BAND_ELEMENTS = MASK_CHUNK_ELEMENTS

# The record fields this module fills (results/schema.py defines them).
FIELDS = ("full_rel_err", "recall_mean", "recall_min", "quality_rows", "full_grad_rel_err", "quality_note")


@dataclass(frozen=True)
class Quality:
    """The quality figures of one case (see the module docstring); ``full_grad_rel_err`` only in
    backward mode."""

    full_rel_err: float
    recall_mean: float
    recall_min: float
    quality_rows: int
    full_grad_rel_err: float | None = None

    def fields(self) -> dict[str, float | int | str | None]:
        """The record's quality fields (``quality_note`` null: the figures were measured)."""
        return {**asdict(self), "quality_note": None}


def not_measured(note: str) -> dict[str, float | int | str | None]:
    """The record's quality fields where the figures do not apply: null, and why."""
    return {**{name: None for name in FIELDS}, "quality_note": note}


def sampled_rows(n: int, count: int, seed: int, device=None) -> torch.Tensor:
    """The query rows a sampled check covers, and with it the quality figures (the harness'
    ``_check_rows``, the API's ``rows=count``): distinct and sorted, the first, the last and
    ``count`` seeded random ones."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.unique(torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (count,), generator=g)]))
    return rows.to(device)


def band_rows(batch: int, heads: int, n: int) -> int:
    """Query rows per band: ``BAND_ELEMENTS`` scores over batch and heads (at least one row)."""
    return max(1, BAND_ELEMENTS // max(1, batch * heads * n))


def measure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attended: Callable[[torch.Tensor], torch.Tensor],
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    dq: torch.Tensor | None = None,
) -> Quality:
    """The quality of an attention output against full attention.

    q (batch, heads, n, d); k and v (batch, kv_heads, n, d), kv_heads dividing heads (query head
    h reads key/value head h // (heads / kv_heads)). ``attended(rows)``: the keys attended by the
    given query rows (a 1-D index tensor), a bool mask that broadcasts to (batch, heads, rows, n).
    ``out``: the output (batch, heads, n, d) to judge; None: the masked attention of ``attended``
    itself (softmax over the attended keys only; a row with none gives zeros). ``rows``: the query
    rows to cover (a 1-D index tensor of distinct rows), or None for every row (exact). ``grad``
    and ``dq``: an output gradient and the query gradient to judge for it (both or neither), for
    ``full_grad_rel_err``."""
    if (grad is None) != (dq is None):
        raise ValueError("grad and dq come together: the output gradient and the query gradient it gave")
    work = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.detach().to(work) for t in (q, k, v))
    group = qf.shape[1] // kf.shape[1]
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    batch, heads, n, d = qf.shape
    scale = 1.0 / math.sqrt(d)
    idx = torch.arange(n, device=q.device) if rows is None else rows.to(q.device)
    keys = torch.arange(n, device=q.device)
    step = band_rows(batch, heads, n)

    err2 = ref2 = gerr2 = gref2 = 0.0
    recall_sum, recall_min = 0.0, math.inf
    for r in idx.split(step):
        s = (qf[:, :, r] @ kf.transpose(-1, -2)) * scale  # (batch, heads, rows, n)
        if causal:
            s.masked_fill_(keys[None, :] > r[:, None], float("-inf"))
        mask = attended(r)
        p_full = torch.softmax(s, dim=-1)  # every row has a key (itself, at least): no NaN
        o_full = p_full @ vf
        # 1 - the mass on the keys not attended: the same share, exactly 1 where nothing is missed
        recall = 1.0 - (p_full * ~mask).sum(-1)  # (batch, heads, rows)
        recall_sum += float(recall.double().sum())
        recall_min = min(recall_min, float(recall.min()))
        if out is None:
            p_own = torch.nan_to_num(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1), nan=0.0)
            o = p_own @ vf
            del p_own
        else:
            o = out.detach()[:, :, r].to(work)
        err2 += float((o - o_full).double().pow(2).sum())
        ref2 += float(o_full.double().pow(2).sum())
        if grad is not None:
            # dQ of softmax attention for output gradient dO: dS = P * (dO V^T - rowsum(dO * O)),
            # dQ = dS K / sqrt(d) (the backward of O = softmax(Q K^T / sqrt(d)) V)
            g = grad.detach()[:, :, r].to(work)
            ds = p_full * (g @ vf.transpose(-1, -2) - (g * o_full).sum(-1, keepdim=True))
            dq_full = (ds @ kf) * scale
            gerr2 += float((dq.detach()[:, :, r].to(work) - dq_full).double().pow(2).sum())
            gref2 += float(dq_full.double().pow(2).sum())
        del s, p_full, o_full, mask
    rows_covered = int(idx.numel())
    return Quality(
        full_rel_err=_ratio(err2, ref2),
        recall_mean=recall_sum / (batch * heads * rows_covered),
        recall_min=recall_min,
        quality_rows=rows_covered,
        full_grad_rel_err=None if grad is None else _ratio(gerr2, gref2),
    )


def _ratio(err2: float, ref2: float) -> float:
    """sqrt(err2 / ref2), the reference's norm floored at 1e-30 (a zero output: 0 for a zero error)."""
    return math.sqrt(err2) / max(math.sqrt(ref2), 1e-30)
