"""Block-sparse attention in plain PyTorch: only the pattern's non-empty (query block, key
block) tiles are computed. Query blocks with the same number of tiles are batched together:
their key tiles are gathered into one contiguous tensor, scored with one batched matmul, masked
where a tile is partial, and soft-maxed over all their keys at once. Work and memory grow with
the number of non-empty tiles, not with n^2. Any sequence length works: the last block is
padded and the padding is masked out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem, scale

# Upper bound on score elements (batch * heads * queries * keys) computed in one step.
_CHUNK_SCORES = 1 << 21


@dataclass(frozen=True, eq=False)
class _Group:
    rows: torch.Tensor  # (R,) query block indices
    tokens: torch.Tensor  # (R, c*b) key token indices (into the padded sequence)
    blocked: torch.Tensor | None  # (R, b, c*b) bool, True where masked out; None when all tiles are full


def plan(p: Problem) -> tuple[list[_Group], torch.Tensor | None, int]:
    """Group the layout's query blocks by tile count and build their masks (setup work)."""
    n, b, dev = p.seq_len, p.block, p.device
    layout = p.pattern.block_layout(n, b, p.causal)
    nb = layout.num_blocks
    per_row = layout.crow[1:] - layout.crow[:-1]
    groups: list[_Group] = []
    ar = torch.arange(b)
    for c in torch.unique(per_row).tolist():
        if c == 0:
            continue
        rows = torch.nonzero(per_row == c).flatten()
        idx = layout.crow[rows][:, None] + torch.arange(c)  # (R, c) positions in col/full
        kb = layout.col[idx]
        tokens = (kb[:, :, None] * b + ar).reshape(rows.numel(), c * b)
        q = rows[:, None] * b + ar  # (R, b)
        need_mask = not bool(layout.full[idx].all()) or bool((tokens >= n).any()) or bool((q >= n).any())
        mask = None
        if need_mask:
            mask = torch.empty(rows.numel(), b, c * b, dtype=torch.bool)
            step = max(1, (1 << 22) // (b * c * b))
            for s in range(0, rows.numel(), step):
                qs, ks = q[s : s + step], tokens[s : s + step]
                m = p.pattern.allowed(qs.clamp(max=n - 1)[:, :, None], ks.clamp(max=n - 1)[:, None, :], n, p.causal)
                m = (m & (ks < n)[:, None, :]) | (qs >= n)[:, :, None]  # padded query rows: any finite row, discarded later
                mask[s : s + step] = m
            mask = (~mask).to(dev)
        groups.append(_Group(rows.to(dev), tokens.to(dev), mask))
    empty = torch.nonzero(per_row == 0).flatten()
    return groups, (empty.to(dev) if empty.numel() else None), nb


@BACKENDS.register
class BlockSparse(Backend):
    name = "block_sparse"
    summary = "PyTorch block-sparse: only non-empty tiles, grouped batched matmuls"
    sparse = True

    def prepare(self, p: Problem):
        groups, empty, nb = plan(p)
        b, n = p.block, p.seq_len
        sc = scale(p.head_dim)
        order = torch.cat([g.rows for g in groups] + ([empty] if empty is not None else []))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)

        def fn(q, k, v):
            B, H, _, d = q.shape
            pad = nb * b - n
            if pad:
                q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            qb = q.view(B, H, nb, b, d)
            outs = []
            for g in groups:
                R, cb = g.tokens.shape
                step = max(1, _CHUNK_SCORES // (B * H * b * cb))
                for s in range(0, R, step):
                    rows, tok = g.rows[s : s + step], g.tokens[s : s + step]
                    r = rows.numel()
                    qg = qb.index_select(2, rows)  # (B, H, r, b, d)
                    kg = k.index_select(2, tok.flatten()).view(B, H, r, cb, d)
                    vg = v.index_select(2, tok.flatten()).view(B, H, r, cb, d)
                    att = torch.matmul(qg, kg.transpose(-1, -2)).mul_(sc)
                    if g.blocked is not None:
                        att.masked_fill_(g.blocked[s : s + step], float("-inf"))
                    outs.append(torch.softmax(att, dim=-1) @ vg)
            if empty is not None:
                outs.append(q.new_zeros(B, H, empty.numel(), b, d))
            out = torch.cat(outs, dim=2).index_select(2, inverse)
            return out.reshape(B, H, nb * b, d)[:, :, :n]

        return fn

    def estimate_bytes(self, p: Problem) -> int:
        layout_tiles = max(1, p.pattern.nnz(p.seq_len, p.causal) // max(1, p.block))  # ~ tiles * b
        b = p.block
        per_elem = p.elem_bytes
        # padded copies + output copies, one chunk of scores, gathered K/V of a chunk, masks
        chunk = _CHUNK_SCORES * per_elem * 2
        masks = layout_tiles * b
        extra = 0
        if p.mode == "backward":
            # autograd keeps every chunk's probabilities and gathered K/V
            extra = p.batch * p.heads * layout_tiles * b * per_elem * 2
        return p.io_bytes * (3 if p.mode == "backward" else 2) + chunk + masks + extra
