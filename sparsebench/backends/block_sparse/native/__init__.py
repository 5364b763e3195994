"""Small C++ kernels for the CPU (fp32 arithmetic), used where they beat the PyTorch path:

* ``window_forward`` / ``window_backward``: attention of query blocks against key windows with
  one contiguous key range per row (bands, block bands). ATen's flash kernel runs such small units
  through MKL calls made for large matrices; this one packs each run of overlapping
  windows' keys once into 32-key tiles and computes 8 x 32 register blocks, each 8-row block only
  over the tiles its keys touch (AVX-512 only). ``gather_forward``: the same with gathered keys
  (rows copied once, into the packed tiles). Given the plan's log-sum-exps of the rows, a call
  merges into what earlier calls wrote (no output chunk, no merge pass in PyTorch).
* ``table_forward`` / ``table_backward``: per-query key tables (random attention), each query's R
  keys read in place. Gathering R rows per query (R = 64: 4 GiB at n = 16384, 8 heads) is slower
  than dense attention in PyTorch; reading the rows where they lie costs a fraction of that.
  ``table_forward_blocked`` (AVX-512): the keys sorted per query and taken chunk by chunk of K and
  V rows that stay in L2, with an online softmax, instead of each query reading its rows from
  wherever they lie.

The AVX-512 kernels (windows, gathered keys, blocked tables, forward and backward) also take bf16
and fp16 q, k, v, widened to fp32 as they are loaded (fp32 output and gradients); the others are
fp32 only.

The same module carries ``cache_cpu_allocations`` (allocator.cpp, a file of its own: it has
nothing to do with the kernels): a caching CPU allocator, on during a case (see
``sparsebench.measure.memory.freed_memory_reused``).

Built on first use with torch.utils.cpp_extension from native.cpp and allocator.cpp (needs a C++
compiler; the build is cached, so only the first use waits for it). ``kernel()`` returns None
where it cannot be built or is switched off (SPARSEBENCH_NATIVE=0); callers then use PyTorch /
ATen.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

# The C++ sources, built into one module on first use (the build is cached by source and name):
# the kernels (which also bind the module's functions) and the caching CPU allocator.
_SOURCES = (Path(__file__).with_name("native.cpp"), Path(__file__).with_name("allocator.cpp"))

# Part of the module's name: a new version never loads a cached build of older sources.
_VERSION = 32
_lock = threading.Lock()
_module = None
_failed: str | None = None


def capability() -> str:
    """The CPU's instruction set as PyTorch names it ("AVX512", "AVX2", "DEFAULT"...): the build
    targets it, and the window kernels exist only on "AVX512"."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - older torch
        return "DEFAULT"


def _name() -> str:
    """The module name carries the instruction set it is built for: a cached AVX-512 build is
    never loaded on a CPU without AVX-512 (the cache may be shared between machines)."""
    return f"sparsebench_native_v{_VERSION}_{capability().lower()}"


def _flags() -> list[str]:
    cap = capability()
    isa = {
        "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-mavx2"],
        "AVX2": ["-mavx2", "-mfma"],
    }.get(cap, [])
    return ["-O3", "-fopenmp", *isa]


def _folder() -> str | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(_name(), verbose=False)
    except Exception:  # pragma: no cover - private helper moved
        return None


def _marker() -> str | None:
    folder = _folder()
    return None if folder is None else os.path.join(folder, "BUILD_FAILED")


def enabled() -> bool:
    """Whether a build can be tried here (a compiler, not switched off, no failed build of this
    version cached: each worker process would otherwise retry it); cheap, builds nothing."""
    global _failed
    if os.environ.get("SPARSEBENCH_NATIVE", "1") == "0" or _failed is not None:
        return False
    if not (shutil.which("c++") or shutil.which("g++")):
        return False
    marker = _marker()
    if _module is None and marker is not None and os.path.exists(marker):
        with open(marker) as fh:
            _failed = fh.read().strip() or "an earlier build failed"
        return False
    return True


def kernel():
    """The compiled module (``window_forward``, ``gather_forward``, ``window_backward``,
    ``has_window``, ``table_forward``, ``table_backward``, ``table_forward_blocked``,
    ``table_backward_blocked``, the content-selected patterns' ``select_top_keys``,
    ``select_top_units``, ``unit_forward``, ``table_forward_selected``, ``table_backward_selected``
    and ``table_bounds``, ``cache_cpu_allocations``), or None where it cannot be built."""
    global _module, _failed
    if _module is not None or not enabled():
        return _module
    with _lock:
        missing = [str(path) for path in _SOURCES if not path.is_file()]
        if _module is None and _failed is None and missing:
            # a broken install, not a failed build: no BUILD_FAILED marker, a reinstall fixes it
            _failed = f"the kernel source {missing[0]} is missing (reinstall sparsebench)"
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load

                _module = load(
                    name=_name(),
                    sources=[str(path) for path in _SOURCES],
                    extra_cflags=_flags(),
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as exc:  # pragma: no cover - depends on the toolchain
                text = str(exc).strip().splitlines()
                _failed = f"{type(exc).__name__}: {text[0] if text else ''}"
                marker = _marker()
                try:
                    if marker is not None:
                        os.makedirs(os.path.dirname(marker), exist_ok=True)
                        with open(marker, "w") as fh:
                            fh.write(_failed + " (delete this file to retry)\n")
                except OSError:
                    pass
    return _module


def built() -> bool:
    """Whether the kernels are loaded or already compiled in the extension cache (cheap to load)."""
    if _module is not None:
        return True
    folder = _folder()
    return folder is not None and os.path.exists(os.path.join(folder, _name() + ".so"))


def why_not() -> str | None:
    """Why ``kernel()`` is None (after a call), else None."""
    return _failed
