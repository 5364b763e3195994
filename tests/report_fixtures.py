"""Synthetic result folders for the analysis, plot and compare tests (no benchmark is run).

Series (causal, cpu, fp32, forward, B=1 H=8 D=64, n = 256 .. 8192):
* dense · sdpa            ~ n^2 (the baseline)
* dense · naive           3x the baseline, OOM at the largest n
* sliding_window · block_sparse   ~ n, beats dense from n ~ 680
* sliding_window · sdpa_masked    1.3x dense: never beats it
* sliding_window · flex   ~ n with a compile time
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from sparsebench.results.schema import SCHEMA_VERSION

SIZES = (256, 512, 1024, 2048, 4096, 8192)
WINDOW = 256
BATCH, HEADS, HEAD_DIM = 1, 8, 64
JITTER = (-0.02, -0.01, 0.0, 0.004, 0.01, 0.015, 0.03)

ENV = {
    "torch": "2.13.0",
    "python": "3.12.3",
    "sparsebench": "0.1.0",
    "cpu": "Synthetic CPU",
    "threads": 16,
    "gpu": None,
    "platform": "Linux-6.8-x86_64",
    "git_commit": "abc1234",
}


def dense_time(n: int) -> float:
    return 2e-5 + 1.5e-9 * n * n


def nnz_dense(n: int) -> int:
    return n * (n + 1) // 2


def nnz_window(n: int, w: int = WINDOW) -> int:
    w = min(w, n)
    return w * (w + 1) // 2 + (n - w) * w


def record(
    pattern: str,
    backend: str,
    n: int,
    t: float | None,
    *,
    status: str = "ok",
    params: dict | None = None,
    label: str | None = None,
    mem: float | None = None,
    compile_s: float = 0.0,
    scale: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    params = params or {}
    label = label or (pattern if not params else f"{pattern}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")")
    nnz = nnz_dense(n) if pattern == "dense" else nnz_window(n, params.get("window", WINDOW))
    retained = n if pattern == "dense" else min(n, params.get("window", WINDOW))
    flops = 4 * BATCH * HEADS * nnz * HEAD_DIM
    ok = status == "ok"
    t = t * scale if (ok and t is not None) else None
    times = [t * (1 + JITTER[(i + n // 256) % len(JITTER)]) for i in range(len(JITTER))] if ok else None
    rec = {
        "scenario": "synthetic",
        "case_id": f"{label}-{backend}-{n}",
        "pattern": pattern,
        "pattern_label": label,
        "params": params,
        "backend": backend,
        "device": "cpu",
        "dtype": "fp32",
        "mode": "forward",
        "batch": BATCH,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "seq_len": n,
        "causal": True,
        "tile": 64 if backend in ("block_sparse", "flex") else None,
        "status": status,
        "reason": "" if ok else f"synthetic {status}",
        "time_median_s": t,
        "time_iqr_s": (t * 0.02) if ok else None,
        "time_min_s": min(times) if ok else None,
        "times_s": times,
        "noisy": False,
        "tflops": flops / t / 1e12 if ok else None,
        "flops": flops,
        "peak_mem_bytes": mem if ok else None,
        "est_mem_bytes": mem * 0.9 if mem else None,
        "nnz": nnz,
        "density": nnz / (n * n),
        "kv_retained": retained,
        "kv_cache_bytes": 2 * HEADS * HEAD_DIM * 4 * BATCH * retained,
        "max_abs_err": 1e-6 if ok else None,
        "check": "exact" if ok else "none",
        "setup_s": 0.01,
        "compile_s": compile_s,
        "timestamp": "2025-01-01T00:00:00Z",
    }
    rec.update(extra)
    return rec


def make_records(scale: float = 1.0, sizes=SIZES, where: Callable[[dict], bool] | None = None) -> list[dict]:
    """All synthetic series. ``scale`` multiplies every time (1.5 = 50% slower)."""
    sw = {"window": WINDOW}
    qkv = 3 * BATCH * HEADS * HEAD_DIM * 4  # bytes per token of q, k, v
    out = []
    for n in sizes:
        d = dense_time(n)
        out.append(record("dense", "sdpa", n, d, mem=1e6 + 2 * qkv * n, scale=scale))
        if n == max(sizes) and len(sizes) > 1:
            out.append(record("dense", "naive", n, None, status="oom"))
        else:
            out.append(record("dense", "naive", n, 3 * d, mem=1e6 + 4 * HEADS * n * n, scale=scale))
        out.append(
            record("sliding_window", "block_sparse", n, 3e-5 + 1e-6 * n, params=sw, mem=1e6 + 3 * qkv * n, scale=scale)
        )
        out.append(
            record(
                "sliding_window", "sdpa_masked", n, 1.3 * d, params=sw, mem=1e6 + 4 * HEADS * n * n + n * n, scale=scale
            )
        )
        out.append(
            record(
                "sliding_window",
                "flex",
                n,
                1e-5 + 8e-7 * n,
                params=sw,
                mem=1e6 + 2.5 * qkv * n,
                compile_s=4.0,
                scale=scale,
            )
        )
    if where:
        out = [r for r in out if where(r)]
    return out


def write_result(folder: Path, records: list[dict], env: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "records.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    (folder / "environment.json").write_text(json.dumps(env if env is not None else ENV, indent=2))
    (folder / "meta.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "scenario": "synthetic"}))
    return folder


def approx_crossover() -> float:
    """Where 3e-5 + 1e-6 n = 2e-5 + 1.5e-9 n^2 (block_sparse meets dense; for a loose check)."""
    a, b, c = 1.5e-9, -1e-6, -1e-5
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def above_ideal_records(dense_path: bool = True) -> list[dict]:
    """dense · sdpa, and sliding_window · block_sparse 3.3x faster than make_records' (above its
    ideal from n = 1024 on: 250% of it at 8192), with (``dense_path``) dense · block_sparse 2.5x
    faster than dense · sdpa: the baseline is slower per pair than block_sparse's own dense path."""
    sw = {"window": WINDOW}
    qkv = 3 * BATCH * HEADS * HEAD_DIM * 4
    out = []
    for n in SIZES:
        d = dense_time(n)
        out.append(record("dense", "sdpa", n, d, mem=1e6 + 2 * qkv * n))
        if dense_path:
            out.append(record("dense", "block_sparse", n, d / 2.5, mem=1e6 + 2 * qkv * n))
        out.append(record("sliding_window", "block_sparse", n, (3e-5 + 1e-6 * n) * 0.3, params=sw, mem=1e6 + qkv * n))
    return out
