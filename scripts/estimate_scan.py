"""Every backend's memory estimate against its measured peak: the check behind `--max-memory`.

    python scripts/estimate_scan.py                       # all shipped patterns x backends x fp32/bf16
                                                          # x forward/backward at n = 2048 and 4096
    python scripts/estimate_scan.py --n 4096 --backends block_sparse flex --dtypes fp32 --modes forward

Each case runs as `sparsebench run` runs it (a worker process per backend, its cases one after the
other, one warm-up call, one timed call, no check) and its peak_mem_bytes is set beside
``backend.estimate_bytes(problem)``. The table prints estimate / peak / ratio per case and flags the
rows outside the band (measure.memory.ESTIMATE_BAND, 0.7x-1.5x); the exit status is 1 when any row
is outside it. The patterns and their parameters are those of scenarios/patterns-tour.yaml (every
shipped pattern); a pattern registered later and missing there runs with its defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sparsebench.backends.base import BACKENDS
from sparsebench.measure.harness import make_problem
from sparsebench.measure.memory import ESTIMATE_BAND, estimate_ratio
from sparsebench.measure.worker import Worker
from sparsebench.patterns.base import PATTERNS
from sparsebench.scenario import Case

TOUR = Path(__file__).resolve().parent.parent / "scenarios" / "patterns-tour.yaml"
MiB = 2**20


def shipped_patterns() -> list[tuple[str, dict]]:
    """(name, params) of every registered pattern: the tour's parameters, else the defaults."""
    tour = {p["name"]: p.get("params") or {} for p in yaml.safe_load(TOUR.read_text())["patterns"]}
    return [(name, tour.get(name, {})) for name in PATTERNS.names()]


def case(pattern: str, params: dict, backend: str, n: int, dtype: str, mode: str, a) -> Case:
    return Case(
        scenario="estimate-scan",
        pattern=pattern,
        params=params,
        pattern_label=PATTERNS.get(pattern).from_params(params).label(),
        backend=backend,
        device="cpu",
        dtype=dtype,
        mode=mode,
        batch=a.batch,
        heads=a.heads,
        head_dim=a.head_dim,
        seq_len=n,
        causal=True,
        tile=64,
        warmup=1,
        repeats=1,
        min_time_s=0.0,
        max_repeats=1,
        timeout_s=600.0,
        memory_budget=None,
        check=False,
        exact_max_elems=0,
        sample_rows=8,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--backends", nargs="+", default=None, help="default: every backend available here")
    ap.add_argument("--patterns", nargs="+", default=None, help="default: every shipped pattern")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["forward", "backward"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()

    backends = a.backends or [b for b, cls in BACKENDS.items() if cls.unavailable() is None]
    patterns = [(name, params) for name, params in shipped_patterns() if a.patterns is None or name in a.patterns]
    lo, hi = ESTIMATE_BAND
    print(f"{'backend':<13} {'pattern':<40} {'dtype':<5} {'mode':<8} {'n':>5} {'est MiB':>8} {'peak MiB':>8} ratio")
    outside = measured = 0
    for backend in backends:
        cls = BACKENDS.get(backend)
        if cls.unavailable() is not None:
            print(f"{backend}: {cls.unavailable()}", file=sys.stderr)
            continue
        cases = [
            case(name, params, backend, n, dtype, mode, a)
            for dtype in a.dtypes
            for mode in a.modes
            for name, params in patterns
            for n in sorted(a.n)
        ]
        worker = Worker()  # one process per backend, its cases one after another, as a run has them
        try:
            for c in cases:
                p = make_problem(c)
                if cls().unsupported(p) is not None:
                    continue
                est = cls().estimate_bytes(p)
                rec = worker.run(c, c.timeout_s)
                peak = rec.get("peak_mem_bytes")
                label = c.pattern_label[:40]
                head = f"{backend:<13} {label:<40} {c.dtype:<5} {c.mode:<8} {c.seq_len:>5} {est / MiB:>8.1f}"
                if rec.get("status", "ok") != "ok" or not peak:
                    print(f"{head} {'-':>8} {rec.get('status')}: {rec.get('reason')}", flush=True)
                    continue
                r = estimate_ratio(est, peak)
                flag = "" if lo <= r <= hi else f"  OUTSIDE {lo:g}-{hi:g}"
                measured += 1
                outside += bool(flag)
                print(f"{head} {peak / MiB:>8.1f} {r:5.2f}{flag}", flush=True)
        finally:
            worker.close()
    print(f"{measured} cases measured, {outside} outside the band {lo:g}x-{hi:g}x")
    return 1 if outside else 0


if __name__ == "__main__":
    raise SystemExit(main())
