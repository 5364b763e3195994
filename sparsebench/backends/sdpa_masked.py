"""SDPA with the pattern's boolean n x n mask: sparse semantics, dense work. A reference: with
grouped-query inputs (k and v with fewer heads than q) it repeats k and v for every query head."""

from __future__ import annotations

from sparsebench.backends.base import BACKENDS, Backend, Problem, repeat_kv
from sparsebench.patterns.selection import content_selected, selecting_call, selection_mask_bytes


@BACKENDS.register
class SdpaMasked(Backend):
    name = "sdpa_masked"
    summary = "SDPA with the pattern's boolean mask: sparse semantics, dense work"

    def prepare(self, p: Problem):
        import torch.nn.functional as F

        if content_selected(p.pattern):  # each call selects, then masks with the (batch, heads, n, n) selection
            return selecting_call(
                p.pattern,
                lambda q, k, v, sel: F.scaled_dot_product_attention(q, *repeat_kv(q, k, v), attn_mask=sel.mask()),
            )
        mask = p.pattern.mask(p.seq_len, p.causal, device=p.device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, *repeat_kv(q, k, v), attn_mask=mask)

    def estimate_bytes(self, p: Problem) -> int:
        """Inputs and output (and gradients) and the boolean mask, with the larger of what comes
        and goes beside them: the temporaries of building the mask (setup), or SDPA's additive
        copy of it in the input dtype (each call); with grouped-query inputs, k and v repeated for
        every query head (backward: their gradients too). A content-selected pattern: its
        selection, the (batch, heads, n, n) mask made from it each call and SDPA's copy of it."""
        n2 = p.seq_len * p.seq_len
        repeated = 0 if p.group == 1 else 2 * p.q_bytes * (2 if p.mode == "backward" else 1)
        if content_selected(p.pattern):  # a mask per batch and head, made each call from the selection
            io = p.io_bytes * (3 if p.mode == "backward" else 1) + repeated
            return io + selection_mask_bytes(p) + p.batch * p.heads * n2 * p.elem_bytes
        build = p.pattern.mask_build_bytes(p.seq_len)
        return p.io_bytes * (3 if p.mode == "backward" else 1) + repeated + n2 + max(n2 * p.elem_bytes, build)
