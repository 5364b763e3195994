"""Tile size of block_sparse's Triton kernels on a GPU: forward and forward + backward times of
one pattern for each tile size, against dense SDPA (flash), with the launch settings that the
autotuner chose. bf16, batch 1.

    python scripts/triton_tiles.py --n 16384 32768 --heads 16 --head-dim 128 --window 1024
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sparsebench.backends.block_sparse import triton as _triton
from sparsebench.patterns.base import PATTERNS


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of fn() over reps calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    pat = PATTERNS.get("sliding_window").from_params({"window": args.window})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, sliding_window {args.window}, causal, bf16")
    for n in args.n:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, args.heads, n, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(3)
        )
        do = torch.randn_like(q)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def dense_fb():
            F.scaled_dot_product_attention(*leaves, is_causal=True).backward(do)

        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        dense_b = timed(dense_fb)
        print(f"n={n}: dense sdpa forward {dense:.3f} ms, forward+backward {dense_b:.3f} ms")
        for block in args.blocks:
            t0 = time.perf_counter()
            plan = _triton.build(pat, n, True, args.head_dim, "cuda", block)
            torch.cuda.synchronize()
            setup = time.perf_counter() - t0
            fn = _triton.attention_fn(plan)
            t0 = time.perf_counter()
            out = fn(q, k, v)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0

            def fb():
                fn(*leaves).backward(do)

            fwd, both = timed(lambda: fn(q, k, v)), timed(fb)
            err = (
                (
                    (out.float() - F.scaled_dot_product_attention(q, k, v, attn_mask=pat.mask(n, True, "cuda")).float())
                    .abs()
                    .max()
                ).item()
                if n <= 16384
                else float("nan")
            )
            best = {
                name: str(getattr(getattr(_triton, name), "best_config", None))
                for name in ("_forward", "_backward_kv", "_backward_q")
            }
            print(
                f"  block {block}: setup {setup:.3f} s, first call {first:.1f} s, "
                f"forward {fwd:.3f} ms ({dense / fwd:.2f}x dense), "
                f"forward+backward {both:.3f} ms ({dense_b / both:.2f}x), max err {err:.1e}, tiles {plan.col.numel()}, "
                f"partial {plan.bits.shape[0]}; configs {best}"
            )  # fmt: skip


if __name__ == "__main__":
    main()
