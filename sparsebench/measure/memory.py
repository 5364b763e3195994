"""Peak memory of one case, measured: the CUDA allocator's peak, or on CPU the process's peak
resident set size (Linux VmHWM, reset per case through /proc/self/clear_refs) above the RSS
just before the case; and the CPU allocator's policy during a case (``freed_memory_reused``)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")

# How far a backend's estimate_bytes may stray from the peak it measures (n >= 2048): the
# estimate is what --max-memory and limits.memory skip cases by.
ESTIMATE_BAND = (0.7, 1.5)


def estimate_ratio(estimate: int, peak: int) -> float:
    """estimate / measured peak (inf where nothing was measured)."""
    return estimate / peak if peak > 0 else float("inf")


# SPARSEBENCH_ALLOCATOR=system leaves PyTorch's CPU allocator as it is (freed_memory_reused).
ALLOCATOR_ENV = "SPARSEBENCH_ALLOCATOR"


def allocator_policy() -> str:
    """How the CPU allocator runs during a case: "reuse" (``freed_memory_reused``) or "system"
    (SPARSEBENCH_ALLOCATOR=system: PyTorch's own, as it is)."""
    return "system" if os.environ.get(ALLOCATOR_ENV, "reuse").strip().lower() == "system" else "reuse"


_caching = False  # whether block_sparse's caching CPU allocator is on (inside freed_memory_reused)


@contextlib.contextmanager
def freed_memory_reused(device) -> Iterator[bool]:
    """Within a case on the CPU, keep freed blocks of 1 MiB or more for the next request of the
    same size, as a caching allocator (CUDA's, jemalloc, tcmalloc) does. glibc's default gives a
    large block a mapping of its own, unmapped when freed, so every call that returns a large
    output or gradient would pay its page faults anew: a cost that weighs on a fast sparse kernel
    and hardly on a slow dense one. Every backend runs the same way. A request that no kept block
    fits first frees kept blocks of at least its size (or all), so the resident memory never exceeds what was in use at
    some moment: peaks read the same as without it. The allocator is part of the native
    extension: without it (no compiler, SPARSEBENCH_NATIVE=0) or with
    SPARSEBENCH_ALLOCATOR=system nothing changes. Yields whether it is in force.

    It also pins glibc's mmap threshold at 1 MiB for the rest of the process (``_pin_mmap``): glibc
    raises that threshold to the size of every mapped block freed (up to 32 MiB), after which
    large blocks come from its heaps, stay resident when freed and are reused or not depending on
    which thread's heap they were in, so a case's peak moved by a block (a 2048-token topk_keys
    case read 34-38 MiB or 50-57 MiB in the same process, run after run)."""
    global _caching
    import torch

    on = False
    if not _caching and torch.device(device).type == "cpu" and allocator_policy() == "reuse":
        from sparsebench.backends import block_sparse

        _pin_mmap()
        on = _caching = block_sparse.cache_cpu_allocations(True)
    try:
        yield on
    finally:
        if on:
            _caching = False
            block_sparse.cache_cpu_allocations(False)
            _trim()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # the caching allocator's smallest kept block, as its kMinBytes
_pinned = False


def _pin_mmap() -> None:
    """Blocks of MMAP_THRESHOLD bytes or more get a mapping of their own, unmapped when freed,
    for the rest of this process (glibc's M_MMAP_THRESHOLD, which also stops its dynamic raising);
    nothing elsewhere."""
    global _pinned
    if _pinned or not sys.platform.startswith("linux"):
        return
    _pinned = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


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
        self._kept: int | None = 0  # the peak before one_time(keep_peak=True) restarted it

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
        has handed freed memory back (else what setup freed would still count), the blocks
        ``freed_memory_reused`` keeps included."""
        self._settle()
        self._reset_peak()

    @contextlib.contextmanager
    def one_time(self, keep_peak: bool = False) -> Iterator[None]:
        """``with pm.one_time(): first_call()``: what the block leaves resident beyond what was
        in use before it is a one-time cost of the process, not of the case: added to the
        baseline (a compiled kernel's code and the compiler's caches; on a process's first
        backward pass, heap the C library keeps from then on). The peak restarts after the
        block; ``keep_peak``: the peak so far (setup and the block, less that residue) still
        counts, else the block's scratch and what came before it are out of the peak too (a
        compiled backend's first call, whose scratch is compilation: compile_s). What the block
        leaves that belongs to the case (gradients) must be dropped inside it; the calls after
        it make it again."""
        setup = self._peak_now() if keep_peak else 0
        before = self._settle()
        self._reset_peak()
        yield
        after = self._settle()
        residue = max(0, after - before)
        block = self._peak_now() if keep_peak else 0
        if setup is not None and block is not None:
            self._kept = max(setup, block - residue)
        self._base += residue
        self._reset_peak()

    def _settle(self) -> int:
        """Hand freed memory back (the blocks ``freed_memory_reused`` keeps included) and return
        what is in use now: RSS on the CPU, allocated bytes on CUDA (0 elsewhere)."""
        import torch

        if _caching:
            from sparsebench.backends import block_sparse

            block_sparse.cache_cpu_allocations(True)  # already on: frees the kept blocks
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.device.type == "cpu":
            return (_status_kib("VmRSS") or 0) * 1024
        return 0

    def _reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            try:
                _CLEAR.write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                pass

    def _peak_now(self) -> int | None:
        """The peak since the last restart, above the baseline (None where unmeasurable)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.device.type == "cpu":
            hwm = _status_kib("VmHWM")
            return None if hwm is None else max(0, hwm * 1024 - self._base)
        return None

    def __exit__(self, *exc) -> None:
        peak = self._peak_now()
        self.peak_bytes = None if peak is None else max(peak, self._kept or 0)


def available_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return None
