"""An absolute yardstick beside speedup and efficiency, which are relative to dense SDPA and so
depend on how good SDPA is on the machine: the device's own torch GEMM rate for a dtype (TFLOP/s)
and its copy bandwidth (bytes/s), measured once per run in the process that runs the cases.

GEMM: square products ``a @ b`` of the dtype (on CUDA fp16 and bf16 run on the tensor cores;
fp32 as torch's matmul precision setting has it, as for the cases). The size doubles from 256
until one product takes ``STEP_S`` (or reaches the device's largest size), so that a slow dtype
(fp16 on a CPU without native fp16 arithmetic) stays small and a fast one reaches the library's
large-matrix rate. Each size's first product is an untimed warm-up: it carries one-off costs (the
library's setup, its kernel choice, the output's first touch) that would otherwise stop the ladder
at its first rung (on an H200 the first bf16 product took over 2 ms at size 256, and the rate read
1.07 TFLOP/s; with the warm-up, 688 at size 8192). At the size reached the device then warms for ``WARM_S``
(a GPU's clock rises from idle under load), and the best of ``ROUNDS`` products (at least
``MIN_ROUNDS``: fewer where they would take more than ``BUDGET_S``) gives the rate, 2 size^3
FLOPs each, with the intra-op threads the forward and backward cases run with (torch's setting in
this process). About 0.2-0.7 s per dtype on a 2-core CPU.

Copy: STREAM's copy, ``dst.copy_(src)`` of a tensor far larger than the CPU's last-level cache
(or CUDA's L2), counting the bytes read and the bytes written per second; the best of
``ROUNDS`` after one untimed copy (first touch). On the CPU it runs with the intra-op threads
the decode steps run with (one: see measure/decode.py), since decode is what it is a yardstick
for.

Best, not median (as STREAM reports): it is the rate the machine can give, so a case's share of
it is a lower bound when the machine was busy. The inputs are made without the global random
generator (a seeded ``torch.Generator``; ``torch.ones``), so measuring leaves the random state
of the run as it was. A kernel can exceed 1 on either: the yardstick is the library's own, not
the hardware's peak.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from sparsebench.measure.device import TORCH_DTYPES, intra_op_threads, sync

ROUNDS = 5
MIN_ROUNDS = 3
BUDGET_S = 0.25  # of timed GEMM rounds, past MIN_ROUNDS
MIN_SIZE = 256
MAX_SIZE = {"cuda": 8192}  # other devices: MAX_SIZE_OTHER
MAX_SIZE_OTHER = 2048
STEP_S = {"cuda": 0.002}  # one product this long is large enough; other devices: STEP_S_OTHER
STEP_S_OTHER = 0.02
WARM_S = {"cuda": 0.2}  # products run untimed at the size reached first; other devices: none
COPY_BYTES = {"cuda": 1 << 30}  # the source tensor; other devices: COPY_BYTES_OTHER
COPY_BYTES_OTHER = 128 << 20


def decode_threads() -> int | None:
    """The intra-op threads decode steps run with on the CPU: measure_decode's own default
    (read from its signature, so that the two cannot drift apart)."""
    import inspect

    from sparsebench.measure.decode import measure_decode

    return inspect.signature(measure_decode).parameters["threads"].default


def _time(call: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - t0


def _best(call: Callable[[], Any], device: torch.device, rounds: int, budget_s: float = float("inf")) -> float:
    """The fastest of ``rounds`` timed calls, stopping early (after MIN_ROUNDS) past ``budget_s``."""
    times: list[float] = []
    while len(times) < rounds and (len(times) < MIN_ROUNDS or sum(times) < budget_s):
        times.append(_time(call, device))
    return min(times)


def gemm(device: str | torch.device, dtype: str, rounds: int = ROUNDS) -> tuple[float, int]:
    """(TFLOP/s, size): the best of up to ``rounds`` square products of the size the ladder reached."""
    dev = torch.device(device)
    tdtype = TORCH_DTYPES[dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    max_size = MAX_SIZE.get(dev.type, MAX_SIZE_OTHER)
    step_s = STEP_S.get(dev.type, STEP_S_OTHER)
    size = MIN_SIZE
    while True:
        a, b = (torch.randn(size, size, generator=g, device=dev).to(tdtype) for _ in range(2))
        c = torch.empty_like(a)  # the output is written in place: no allocation is timed

        def product() -> None:
            torch.matmul(a, b, out=c)

        product()  # untimed warm-up: one-off setup, kernel choice, first touch of c
        if size >= max_size or _time(product, dev) >= step_s:
            break
        size *= 2
    warm_until = time.perf_counter() + WARM_S.get(dev.type, 0.0)
    while time.perf_counter() < warm_until:
        _time(product, dev)
    best = _best(product, dev, rounds, BUDGET_S)
    return 2.0 * size**3 / best / 1e12, size


def copy(device: str | torch.device, dtype: str, threads: int | None = None, rounds: int = ROUNDS) -> tuple[float, int]:
    """(bytes/s, source bytes): the best of ``rounds`` copies of a large tensor, bytes read +
    written per second, on ``threads`` intra-op threads (CPU; None: torch's setting)."""
    dev = torch.device(device)
    tdtype = TORCH_DTYPES[dtype]
    nbytes = COPY_BYTES.get(dev.type, COPY_BYTES_OTHER)
    src = torch.ones(nbytes // torch.empty((), dtype=tdtype).element_size(), dtype=tdtype, device=dev)
    dst = torch.empty_like(src)
    with intra_op_threads(threads, dev):
        dst.copy_(src)  # untimed: first touch of dst
        best = _best(lambda: dst.copy_(src), dev, rounds)
    return 2.0 * src.nbytes / best, src.nbytes


def measure(device: str, dtype: str) -> dict[str, Any]:
    """The yardstick of ``device`` and ``dtype`` (a scenario's dtype name) in this process:
    ``gemm_tflops``, ``copy_bytes_per_s``, and how they were measured (``gemm_size``,
    ``gemm_threads``, ``copy_bytes``, ``copy_threads``, ``rounds``; threads null on CUDA)."""
    dev = torch.device(device)
    tflops, size = gemm(dev, dtype)
    threads = decode_threads() if dev.type == "cpu" else None
    bandwidth, nbytes = copy(dev, dtype, threads)
    return {
        "gemm_tflops": tflops,
        "copy_bytes_per_s": bandwidth,
        "gemm_size": size,
        "gemm_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "copy_bytes": nbytes,
        "copy_threads": threads,
        "rounds": ROUNDS,
    }


def key(device: str, dtype: str) -> str:
    """The yardstick's name in environment.json: "cpu/fp32"."""
    return f"{device}/{dtype}"
