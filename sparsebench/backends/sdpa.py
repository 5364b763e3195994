"""torch's scaled_dot_product_attention, dense (is_causal when causal): the baseline. Grouped-query
inputs run with ``enable_gqa=True`` (ATen's CPU flash kernel reads each key/value head for its
group of query heads; no repeated k and v)."""

from __future__ import annotations

from sparsebench.backends.base import BACKENDS, Backend, Problem


@BACKENDS.register
class Sdpa(Backend):
    name = "sdpa"
    summary = "torch SDPA, dense (is_causal when causal): the baseline"

    def unsupported(self, p: Problem):
        if p.pattern.name != "dense":
            return "sdpa computes dense attention only; use sdpa_masked for a sparse pattern"
        return super().unsupported(p)

    def prepare(self, p: Problem):
        import torch.nn.functional as F

        causal = p.causal
        if p.group > 1:  # k and v shared by groups of query heads, read in place (no repeated copies)
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def estimate_bytes(self, p: Problem) -> int:
        """q, k, v and the output; backward also the output gradient and the gradients of q, k
        and v (ATen's flash attention works tile by tile: no n x n scores). A bf16 / fp16 forward
        holds one more operand-sized buffer (measured on ATen's CPU kernel)."""
        low = p.mode == "forward" and p.elem_bytes < 4
        return p.io_bytes * (3 if p.mode == "backward" else 1) + (p.io_bytes // 4 if low else 0)
