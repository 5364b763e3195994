"""``kind: random``: seeded standard normals, the default inputs. On such q and k attention is
nearly uniform, so a pattern's recall of full attention is about its density: the baseline that
the synthetic and recorded inputs are read against."""

from __future__ import annotations


def generate(*, seed: int, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype=None, device=None):
    """q (batch, heads, n, d), k and v (batch, kv_heads, n, d), drawn in fp32 on the CPU in that
    order from one generator seeded by ``seed`` (the tensors every run measured before inputs
    had kinds), each converted to ``dtype`` on ``device`` before the next is drawn."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(batch, h, seq_len, head_dim) for h in (heads, kv_heads, kv_heads)]
    return [torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype) for s in shapes]
