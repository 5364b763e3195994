"""What measuring needs from torch about a device and a dtype: the dtype names of a scenario,
waiting for a device's queued work, so that a clock read after it includes that work, and the
CPU's intra-op thread count for a block."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sparsebench.units import COMPUTE_DTYPES

# a scenario's dtype names -> torch dtypes
TORCH_DTYPES = {name: getattr(torch, torch_name) for name, torch_name in COMPUTE_DTYPES.items()}


def sync(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover
        torch.mps.synchronize()


@contextmanager
def intra_op_threads(n: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads and restore the count afterwards (None, or
    a device other than the CPU: as set)."""
    if n is None or (device is not None and device.type != "cpu"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
