"""The textbook: QK^T, mask, softmax, V, materialising the n x n scores. A reference: with
grouped-query inputs (k and v with fewer heads than q) it repeats k and v for every query head."""

from __future__ import annotations

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem, masked_softmax_attention, repeat_kv
from sparsebench.patterns.selection import content_selected, selecting_call, selection_mask_bytes


@BACKENDS.register
class Naive(Backend):
    name = "naive"
    summary = "QK^T, mask, softmax, V with the n x n score matrix (the textbook)"

    def prepare(self, p: Problem):
        if content_selected(p.pattern):  # each call selects, then masks with the (batch, heads, n, n) selection
            return selecting_call(
                p.pattern, lambda q, k, v, sel: masked_softmax_attention(q, *repeat_kv(q, k, v), sel.mask())
            )
        if p.pattern.name == "dense" and not p.causal:
            mask = torch.ones((), dtype=torch.bool, device=p.device)
        else:
            mask = p.pattern.mask(p.seq_len, p.causal, device=p.device)
        return lambda q, k, v: masked_softmax_attention(q, *repeat_kv(q, k, v), mask)

    def estimate_bytes(self, p: Problem) -> int:
        """Forward: three score-sized tensors alive at once (scores, masked scores, probabilities
        and their cleaned copy overlap); backward (autograd keeps them, plus their gradients):
        five, and the gradients of q, k, v. Plus the boolean mask and the temporaries of building
        it, and with grouped-query inputs k and v repeated for every query head (backward: their
        gradients too). A content-selected pattern: its selection and the (batch, heads, n, n)
        mask made from it each call, instead of the (n, n) one."""
        scores = p.batch * p.heads * p.seq_len * p.seq_len * p.elem_bytes
        io, live = (3 * p.io_bytes, 5) if p.mode == "backward" else (p.io_bytes, 3)
        repeated = 0 if p.group == 1 else 2 * p.q_bytes * (2 if p.mode == "backward" else 1)
        if content_selected(p.pattern):  # a mask per batch and head, made each call from the selection
            return io + repeated + live * scores + selection_mask_bytes(p)
        return io + repeated + live * scores + p.seq_len * p.seq_len + p.pattern.mask_build_bytes(p.seq_len)
