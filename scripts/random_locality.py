"""How much of random attention's CPU time is locality: the same kernel and pair count (65 keys per
query, 8 heads, d 64, fp32, causal, n = 16384) with each query's keys drawn from all earlier
positions (the `random` pattern), or only from the last 2048 or 512 (fewer chunk visits per row,
K and V rows hot in L2), or the last 64 (K and V rows in L1: the arithmetic alone).

    python scripts/random_locality.py [--rounds 3]

Prints the median forward time of each, per round, with dense SDPA's for the efficiency scale,
and the cost of one query-key pair on one thread (time x threads / pairs); with
OMP_NUM_THREADS=1 those costs are free of the other core's share of the caches.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from sparsebench.backends.block_sparse import execute as _execute
from sparsebench.backends.block_sparse import plan as _plan
from sparsebench.measure.memory import freed_memory_reused
from sparsebench.patterns.geometry import Table

N, H, D, R = 16384, 8, 64, 65


def table(span: int, gen: torch.Generator) -> torch.Tensor:
    """R key slots per query i drawn from [i - span, i], with replacement (the first is i itself;
    -1 pads rows with fewer than R earlier positions): the kernel's work is per slot."""
    i = torch.arange(N)[:, None]
    lo = (i - span).clamp(min=0)
    width = i - lo + 1
    keys = (torch.rand(N, R, generator=gen) * width).long() + lo
    keys[:, 0] = i[:, 0]
    return torch.where(torch.arange(R)[None, :] < width, keys, -1)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    plans, pairs = {}, {}
    for name, span in (("all earlier", N), ("last 2048", 2047), ("last 512", 511), ("last 64", 63)):
        bld = _plan.Planner(N, True, H, torch.device("cpu"), torch.float32, D)
        keys = table(span, gen)
        bld.table(Table(keys))
        plans[name] = bld.finish(1.0 / math.sqrt(D))
        pairs[name] = H * int((keys >= 0).sum())
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    per_pair = 1e6 * torch.get_num_threads()  # ms -> ns, times the threads sharing the work
    with freed_memory_reused("cpu"):
        for r in range(a.rounds):
            dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3)
            ideal = dense / (N * (N + 1) / 2 / (N * R))  # the time at efficiency 1
            cols = [f"dense {dense:.0f} ms ({dense * per_pair / (H * N * (N + 1) / 2):.1f} ns/pair)"]
            for name, plan in plans.items():
                ms = median_ms(lambda: _execute.run_forward(plan, q, k, v), 7)
                cols.append(f"{name} {ms:.1f} ms (eff {ideal / ms:.2f}, {ms * per_pair / pairs[name]:.1f} ns/pair)")
            print(f"round {r + 1}: " + "  ".join(cols))


if __name__ == "__main__":
    main()
