"""Peak memory of one case, measured: the CUDA allocator's peak, or on CPU the process's peak
resident set size (Linux VmHWM, reset per case through /proc/self/clear_refs) above the RSS
just before the case."""

from __future__ import annotations

import ctypes
import gc
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """with PeakMemory(device) as pm: ...; pm.peak_bytes (None where it cannot be measured)."""

    def __init__(self, device) -> None:
        import torch

        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        self.restart()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            self._base = (_status_kib("VmRSS") or 0) * 1024
        return self

    def restart(self) -> None:
        """Forget the peak so far (not the baseline): what follows is measured on top of what is
        allocated now. On the CPU the peak restarts from the current RSS, after the allocator
        has handed freed memory back (else what setup freed would still count)."""
        import torch

        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            try:
                _CLEAR.write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.device.type == "cpu":
            hwm = _status_kib("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm * 1024 - self._base)


def available_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return None
