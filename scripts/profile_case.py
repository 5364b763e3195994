"""Profile one case with torch.profiler: where a backend's call spends its time.

    python scripts/profile_case.py sliding_window '{"window": 1024}' --n 32768 --device cuda \
        --dtype bf16 --backend block_sparse --mode backward

Prints the wall time per call and the operators (CPU and, on a GPU, CUDA time) by total time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsebench.backends.base import BACKENDS, Problem
from sparsebench.patterns.base import PATTERNS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern")
    ap.add_argument("params", nargs="?", default="{}", help="pattern parameters as JSON")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--backend", default="block_sparse")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--mode", choices=["forward", "backward"], default="forward")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    a = ap.parse_args()

    dev, dt = torch.device(a.device), DTYPES[a.dtype]
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_case: no CUDA device here")
    pat = PATTERNS.get(a.pattern).from_params(json.loads(a.params))
    p = Problem(pat, a.n, True, 1, a.heads, a.head_dim, dt, dev, mode=a.mode, block=a.block)
    fn = BACKENDS.get(a.backend)().prepare(p)
    q, k, v = (torch.randn(1, a.heads, a.n, a.head_dim, device=dev, dtype=dt) for _ in range(3))
    grad = torch.randn_like(q)
    if a.mode == "backward":
        for t in (q, k, v):
            t.requires_grad_(True)

    def call():
        out = fn(q, k, v)
        if a.mode == "backward":
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()

    call()
    call()
    t0 = time.perf_counter()
    for _ in range(a.calls):
        call()
    per = (time.perf_counter() - t0) / a.calls
    print(f"{a.backend} {a.pattern} {a.params} n={a.n} {a.dtype} {a.mode} on {dev}: {per * 1e3:.2f} ms per call")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.calls):
            call()
    key = "cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
