"""Broadcasting of tensor shapes in plain Python: ``torch.broadcast_shapes`` imports sympy on
first use (tens of MiB of resident memory and some time), which the first measured case of a
process would otherwise pay."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The shape the given shapes broadcast to (NumPy rules); ValueError where they do not. Under
    torch.compile (FlexAttention's mask_mod is traced) torch's own, which the compiler
    understands (sympy is loaded there anyway)."""
    if torch.compiler.is_compiling():
        return torch.broadcast_shapes(*shapes)
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for dims in zip(*[(1,) * (rank - len(s)) + tuple(s) for s in shapes]):
        sizes = {int(d) for d in dims if int(d) != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)
