"""SDPA with the pattern's boolean n x n mask: sparse semantics, dense work. A reference: with
grouped-query inputs (k and v with fewer heads than q) it repeats k and v for every query head."""

from __future__ import annotations

from sparsebench.backends.base import BACKENDS, Backend, Problem, repeat_kv


@BACKENDS.register
class SdpaMasked(Backend):
    name = "sdpa_masked"
    summary = "SDPA with the pattern's boolean mask: sparse semantics, dense work"

    def prepare(self, p: Problem):
        import torch.nn.functional as F

        mask = p.pattern.mask(p.seq_len, p.causal, device=p.device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, *repeat_kv(q, k, v), attn_mask=mask)

    def estimate_bytes(self, p: Problem) -> int:
        """Inputs and output (and gradients) and the boolean mask, with the larger of what comes
        and goes beside them: the temporaries of building the mask (setup), or SDPA's additive
        copy of it in the input dtype (each call); with grouped-query inputs, k and v repeated for
        every query head (backward: their gradients too)."""
        n2 = p.seq_len * p.seq_len
        build = p.pattern.mask_build_bytes(p.seq_len)
        repeated = 0 if p.group == 1 else 2 * p.q_bytes * (2 if p.mode == "backward" else 1)
        return p.io_bytes * (3 if p.mode == "backward" else 1) + repeated + n2 + max(n2 * p.elem_bytes, build)
