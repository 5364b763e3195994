"""PyTorch FlexAttention with a BlockMask, under torch.compile (CPU needs a C++ compiler).
Building the BlockMask is setup (recorded as setup_s); the first compiled call is recorded as
compile_s, apart from the steady state."""

from __future__ import annotations

import shutil

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem

FLEX_BLOCK = 128


@BACKENDS.register
class Flex(Backend):
    name = "flex"
    summary = "FlexAttention + BlockMask under torch.compile"
    sparse = True
    compiled = True

    @classmethod
    def unavailable(cls, device=None):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the torch build
            return f"torch {torch.__version__} has no FlexAttention ({exc})"
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu" and not (shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")):
            return "FlexAttention on CPU needs torch.compile and a C++ compiler (none on PATH)"
        if dev.type == "mps":
            return "FlexAttention does not run on MPS"
        return None

    def unsupported(self, p: Problem):
        if p.dtype == torch.float16 and p.device.type == "cpu":
            return "FlexAttention on CPU does not support fp16"
        if p.mode == "backward" and p.device.type == "cpu":
            return "FlexAttention has no backward pass on CPU"
        return super().unsupported(p)

    def prepare(self, p: Problem):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # A worker runs many cases: past dynamo's recompile limit torch.compile would silently
        # fall back to eager flex_attention, which materialises the full score matrix (slow,
        # and out of memory at long lengths). Each case compiles afresh instead.
        torch._dynamo.reset()
        n = p.seq_len
        allowed = p.pattern.mask_fn(n, p.causal, p.device)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(q_idx, kv_idx)

        block_mask = create_block_mask(
            mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=str(p.device), BLOCK_SIZE=FLEX_BLOCK, _compile=True
        )
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)

    def estimate_bytes(self, p: Problem) -> int:
        nb = -(-p.seq_len // FLEX_BLOCK)
        return p.io_bytes * (3 if p.mode == "backward" else 1) + 4 * nb * nb * 4
