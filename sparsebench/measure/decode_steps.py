"""How one decode step attends, per backend: the query of the generated position over the slots
its plan names (``decode.Step``), on the backend the scenario named.

A decode step is one query row per head over the cached keys, so no backend's ``prepare`` (an
n x n problem) applies as it is; each backend has its decode counterpart here, built from that
backend's own public pieces:

* ``sdpa``: ``scaled_dot_product_attention`` of the query over the slots the pattern needs: the
  cache read in place where they are contiguous (a dense prefix, a ring), else the slots gathered
  by index (``enable_gqa`` where the cache has fewer heads than the queries).
* ``sdpa_masked`` and ``naive``: the reference-style paths: every slot of the cache, with a
  boolean row of the allowed slots as the mask (SDPA with ``attn_mask``; the textbook
  ``masked_softmax_attention``, its scores materialised).
* ``block_sparse``: its fused attention call (``block_sparse.attend.forward``: on the CPU ATen's
  flash kernel with the log-sum-exp its plans merge through) over the planned slots, read in place
  where contiguous, else gathered; the queries of one KV group are that call's rows, so grouped
  heads share their K/V rows without a copy. Its native C++ kernels are not used: they work on
  blocks of 8 query rows over planned key windows and tables of an n x n plan, not on one
  query row over a cache's slots.
* ``flex``: ``flex_attention`` under ``torch.compile`` (``dynamic=False``: one cache size per
  case, so one compilation per case, counted as compile_s and never in a step) with a BlockMask
  over the cache, one query block: the blocks holding an allowed slot, full where every slot of
  the block is allowed, and a ``mask_mod`` reading a boolean row of the allowed slots. The row
  and the BlockMask of a position are made before the clock (``prepare``), as a plan is.

A step object: ``prepare(i)`` (untimed; idempotent), then ``__call__(i)`` (timed) returns the
(B, H, 1, D) output of generated position i. Grouped-query heads: query head h reads KV head
h // (heads / kv_heads), as ``repeat_interleave`` and ``enable_gqa`` pair them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sparsebench.errors import BackendUnavailable

if TYPE_CHECKING:
    from sparsebench.measure.decode import Decoder

FLEX_BLOCK = 128  # the flex backend's block size (backends/flex.py), also over the cache


def kv_heads_of(obj: Any) -> int:
    """The KV heads of a Case or Problem (grouped-query attention: fewer than its ``heads``)."""
    return obj.kv_heads


class StepAttention:
    """One backend's decode step over a prefilled ``Decoder``."""

    backend = ""
    compiled = False  # the first call compiles (its extra time is compile_s)

    def __init__(self, dec: "Decoder") -> None:
        self.dec = dec
        b, h, _, d = dec.q.shape
        self.shape = (b, h, 1, d)
        self.kv_heads = dec.cache.k.shape[1]
        self.group = h // self.kv_heads

    def prepare(self, i: int) -> None:
        """Untimed work for position i (a mask row, a BlockMask); nothing by default."""

    def renew(self, i: int) -> None:
        """The work of ``prepare`` again for keys that the step itself just chose (a
        content-selected pattern's, per batch and head), inside the clock."""
        self.prepare(i)

    def per_head(self, i: int) -> bool:
        """Whether position i attends keys of its own per batch and head (batch, heads, keys)."""
        keys = self.dec.steps[i].keys
        return isinstance(keys, torch.Tensor) and keys.dim() == 3

    def __call__(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def query(self, i: int) -> torch.Tensor:
        return self.dec.q[:, :, i : i + 1]

    def grouped(self, i: int) -> torch.Tensor:
        """The query of position i as (B, kv_heads, group, D): a group's heads as rows."""
        b, _, _, d = self.shape
        return self.query(i).reshape(b, self.kv_heads, self.group, d)

    def keys(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The planned slots' K and V: in place when contiguous, else gathered."""
        keys, c = self.dec.steps[i].keys, self.dec.cache
        if isinstance(keys, slice):
            return c.k[:, :, keys], c.v[:, :, keys]
        if keys.dim() == 3:  # per batch and query head: (batch, heads, keys, d), gathered per KV head
            b, h, t = keys.shape
            d = c.k.shape[-1]
            idx = keys.reshape(b, self.kv_heads, self.group * t, 1).expand(-1, -1, -1, d)
            return (x.gather(2, idx).reshape(b, h, t, d) for x in (c.k, c.v))
        return c.k.index_select(2, keys), c.v.index_select(2, keys)


class _Masked(StepAttention):
    """A boolean row of the slots position i may attend, made before the clock."""

    def __init__(self, dec: "Decoder") -> None:
        super().__init__(dec)
        self.live = torch.zeros(dec.cache.size, dtype=torch.bool, device=dec.cache.k.device)
        self.row = self.live.view(1, -1)  # as a (1 query, slots) mask
        self._ready: int | None = None

    def prepare(self, i: int) -> None:
        if self._ready == i:
            return
        if self.per_head(i):  # (batch, heads, 1, slots): each query head's own keys
            b, h = self.shape[:2]
            live = torch.zeros(b, h, self.dec.cache.size, dtype=torch.bool, device=self.live.device)
            self.row = live.scatter_(-1, self.dec.steps[i].keys, True)[:, :, None]
        else:
            self.live.zero_()
            self.live[self.dec.steps[i].keys] = True
        self._ready = i

    def renew(self, i: int) -> None:
        self._ready = None
        self.prepare(i)


class SdpaStep(StepAttention):
    backend = "sdpa"

    def __call__(self, i: int) -> torch.Tensor:
        kk, vv = self.keys(i)
        if self.group > 1 and not self.per_head(i):
            return F.scaled_dot_product_attention(self.query(i), kk, vv, enable_gqa=True)
        return F.scaled_dot_product_attention(self.query(i), kk, vv)


class SdpaMaskedStep(_Masked):
    backend = "sdpa_masked"

    def __call__(self, i: int) -> torch.Tensor:
        c = self.dec.cache
        if self.group > 1:
            return F.scaled_dot_product_attention(self.query(i), c.k, c.v, attn_mask=self.row, enable_gqa=True)
        return F.scaled_dot_product_attention(self.query(i), c.k, c.v, attn_mask=self.row)


class NaiveStep(_Masked):
    backend = "naive"

    def __call__(self, i: int) -> torch.Tensor:
        from sparsebench.backends.base import masked_softmax_attention

        c = self.dec.cache
        b, _, _, d = self.shape
        row = self.row.reshape(b, self.kv_heads, self.group, -1) if self.per_head(i) else self.row
        return masked_softmax_attention(self.grouped(i), c.k, c.v, row).reshape(self.shape)


class BlockSparseStep(StepAttention):
    backend = "block_sparse"

    def __init__(self, dec: "Decoder") -> None:
        super().__init__(dec)
        from sparsebench.backends.block_sparse import attend

        self._forward = attend.forward
        self.scale = self.shape[-1] ** -0.5

    def __call__(self, i: int) -> torch.Tensor:
        kk, vv = self.keys(i)
        rows = self.query(i) if self.per_head(i) else self.grouped(i)  # per head: its own keys
        out, _ = self._forward(rows, kk, vv, None, False, self.scale)
        return out.reshape(self.shape)


class FlexStep(_Masked):
    backend = "flex"
    compiled = True

    def __init__(self, dec: "Decoder") -> None:
        if getattr(dec, "selector", None) is not None:
            raise BackendUnavailable(
                f"flex: no decode step for {dec.pattern.name} (its keys differ per batch and head; the flex "
                "decode step reads one row of slots)"
            )
        super().__init__(dec)
        from torch.nn.attention.flex_attention import flex_attention

        # as the flex backend does: each case compiles afresh (past dynamo's recompile limit
        # torch.compile would fall back to eager flex_attention, which materialises every score)
        torch._dynamo.reset()
        live = self.live

        def mask_mod(b, h, q_idx, kv_idx):
            return live[kv_idx]

        self.mask_mod = mask_mod
        size = dec.cache.size
        self.nb = -(-size // FLEX_BLOCK)
        # blocks whose every slot exists (a short last block is padded by FlexAttention: never full)
        self.whole = torch.arange(self.nb, device=live.device) < size // FLEX_BLOCK
        self.block_mask = None
        self._compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    def prepare(self, i: int) -> None:
        if self._ready == i:
            return
        super().prepare(i)
        from torch.nn.attention.flex_attention import BlockMask

        size, nb, dev = self.dec.cache.size, self.nb, self.live.device
        padded = torch.zeros(nb * FLEX_BLOCK, dtype=torch.bool, device=dev)
        padded[:size] = self.live
        per_block = padded.view(nb, FLEX_BLOCK).sum(dim=1)
        full = (per_block == FLEX_BLOCK) & self.whole
        part = (per_block > 0) & ~full

        def table(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.zeros(1, 1, 1, nb, dtype=torch.int32, device=dev)
            cols = torch.nonzero(which).flatten().to(torch.int32)
            idx[0, 0, 0, : cols.numel()] = cols
            return torch.tensor([[[cols.numel()]]], dtype=torch.int32, device=dev), idx

        # FlexAttention's CPU kernel needs the full-block tables even where they are empty
        self.block_mask = BlockMask.from_kv_blocks(
            *table(part), *table(full), BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK), mask_mod=self.mask_mod,
            seq_lengths=(1, size),
        )  # fmt: skip

    def __call__(self, i: int) -> torch.Tensor:
        c = self.dec.cache
        kw = {"enable_gqa": True} if self.group > 1 else {}
        return self._compiled(self.query(i), c.k, c.v, block_mask=self.block_mask, **kw)


STEPS: dict[str, type[StepAttention]] = {
    s.backend: s for s in (SdpaStep, SdpaMaskedStep, NaiveStep, BlockSparseStep, FlexStep)
}


def unsupported(backend: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot decode on ``device`` in ``dtype`` (the case is then skipped), or None."""
    from sparsebench.backends.base import BACKENDS

    device = torch.device(device)
    if backend not in STEPS:
        return f"backend {backend!r} has no decode step (decode runs on {', '.join(sorted(STEPS))})"
    why = BACKENDS.get(backend).unavailable(device)
    if why:
        return why
    if backend == "flex" and device.type == "cpu" and dtype == torch.float16:
        return "FlexAttention on CPU does not support fp16"
    return None


def make(backend: str, dec: "Decoder") -> StepAttention:
    """The decode step of ``backend`` over ``dec``; BackendUnavailable where it cannot decode."""
    why = unsupported(backend, dec.cache.k.device, dec.cache.k.dtype)
    if why:
        raise BackendUnavailable(why)
    return STEPS[backend](dec)
