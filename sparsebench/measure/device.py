"""What measuring needs from torch about a device and a dtype: the dtype names of a scenario and
waiting for a device's queued work, so that a clock read after it includes that work."""

from __future__ import annotations

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
