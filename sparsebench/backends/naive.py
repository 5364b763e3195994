"""The textbook: QK^T, mask, softmax, V, materialising the n x n scores."""

from __future__ import annotations

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem, masked_softmax_attention


@BACKENDS.register
class Naive(Backend):
    name = "naive"
    summary = "QK^T, mask, softmax, V with the n x n score matrix (the textbook)"

    def prepare(self, p: Problem):
        if p.pattern.name == "dense" and not p.causal:
            return lambda q, k, v: masked_softmax_attention(q, k, v, torch.ones((), dtype=torch.bool, device=q.device))
        mask = p.pattern.mask(p.seq_len, p.causal, device=p.device)
        return lambda q, k, v: masked_softmax_attention(q, k, v, mask)

    def estimate_bytes(self, p: Problem) -> int:
        n2 = p.batch * p.heads * p.seq_len * p.seq_len
        # scores and probabilities, plus the boolean mask
        factor = 3 if p.mode == "backward" else 1
        return p.io_bytes * factor + 2 * n2 * p.elem_bytes * factor + p.seq_len * p.seq_len
