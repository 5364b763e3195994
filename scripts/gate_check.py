"""Measure the regression gate on this machine: how often two runs of the same program fail it
(false alarms), and how much of a real slowdown it catches.

    python scripts/gate_check.py [SCENARIO] [--pairs 10] [--slowdown 1.3] [--threshold 10%] [--out DIR]
    python scripts/gate_check.py --judge DIR     # judge the runs already in DIR again (no run)
    python scripts/gate_check.py --judge DIR --rounds 5   # ... as if each had run its first 5 rounds
    python scripts/gate_check.py --judge DIR --rounds 7 --calls 2   # ... of their first 2 timed calls
    python scripts/gate_check.py --judge DIR --join 3   # ... three runs joined as one of their rounds

Runs the scenario (default: the built-in quickstart, as `sparsebench run` runs it) 2 * pairs + 1
times, in this order: B0, S1, B1, S2, B2, ...; S runs have SPARSEBENCH_TEST_SLOWDOWN set, so
every timed call takes that factor longer while the machine-speed probe does not. Then:

* A/A pairs (B(i-1), B(i)): any case called slower is a false alarm; a pair whose gate fails on
  a regression is a false alarm of the gate.
* slowdown pairs (B(i-1), S(i)): the share of compared cases called slower (caught). A case
  whose verdict is withheld (machine unstable) or that was not measured counts as not caught,
  and is counted apart.
* the run as a whole (compare's common shift, the median of the cases' ratios): an A/A pair
  whose shift is called slower is a false alarm; a slowdown pair whose shift is called slower
  is caught as a run, whatever its single cases read.

Prints one line per pair and a summary, and writes gate_check.json in --out. Each run takes as
long as the scenario does (the quickstart: about five minutes on a 2-core CPU, so 21 runs take
about an hour and three quarters).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_once(scenario: str | None, out: Path, slowdown: float | None) -> Path:
    env = dict(os.environ)
    env.pop("SPARSEBENCH_TEST_SLOWDOWN", None)
    if slowdown is not None:
        env["SPARSEBENCH_TEST_SLOWDOWN"] = str(slowdown)
    cmd = [sys.executable, "-m", "sparsebench", "run", *([scenario] if scenario else []), "--output", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    print(f"  ran {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def judge(
    base: list[Path], new: list[Path], threshold: float, rounds: int | None = None, calls: int | None = None
) -> dict:
    """compare's verdicts on a pair of runs, each one folder or several joined (``_joined``);
    ``rounds``: of each run's records only its first rounds, ``calls``: of each round only its
    first timed calls (a run with fewer rounds or calls, judged from the same recorded calls: the
    calls of a round come one after another, so its first C are what a run of C calls would have
    timed)."""
    from sparsebench.analysis.compare import compare, compare_folders
    from sparsebench.results.folder import frame, read_environment, read_records

    base_name, new_name = ("+".join(f.name for f in run) for run in (base, new))
    if rounds is None and calls is None and len(base) == len(new) == 1:
        c = compare_folders(base[0], new[0], threshold=threshold)
    else:
        first = [frame(_first(_joined([read_records(f) for f in run]), rounds, calls)) for run in (base, new)]
        c = compare(
            *first,
            threshold=threshold,
            base_env=read_environment(base[0]),
            new_env=read_environment(new[0]),
            base_name=base_name,
            new_name=new_name,
        )
    counts = c.counts()
    compared = [r for r in c.rows if r.base_status == "ok"]
    return {
        "base": base_name,
        "new": new_name,
        "cases": len(compared),
        "slower": counts.get("slower", 0),
        "faster": counts.get("faster", 0),
        "same": counts.get("same", 0),
        "withheld": counts.get("withheld", 0),
        "missing": len(c.missing()),
        "gate_failed": c.gate_failed(),
        "shift": c.shift.ratio if c.shift else None,
        "shift_verdict": c.shift_verdict,
        "worst_ratio": max((r.ratio for r in c.rows if r.ratio), default=None),
        "noise_sd": c.noise.sd if c.noise else None,
        "spread_sd": c.spread.sd if c.spread else None,
        "typical_sd": c.spread.typical if c.spread else None,  # a typical case's own error, scaled
        "machine": c.machine,
        "control": c.control,
    }


def _joined(runs: list[list[dict]]) -> list[dict]:
    """Several runs' records as one run's: the rounds of each after those of the runs before it
    (what a run of their rounds together would have recorded, spread over a longer time)."""
    out, before = [], 0
    for records in runs:
        out += [{**rec, "round": rec.get("round", 1) + before} for rec in records]
        before += max((rec.get("round", 1) for rec in records), default=0)
    return out


def _first(records, rounds: int | None, calls: int | None):
    """The records of a run's first ``rounds`` rounds, each with its first ``calls`` timed calls."""
    import statistics

    for rec in records:
        if rounds is not None and rec.get("round", 1) > rounds:
            continue
        times = rec.get("times_s") or []
        if calls is not None and rec.get("status") == "ok" and len(times) > calls:
            times = times[:calls]
            rec = {**rec, "times_s": times, "time_min_s": min(times), "time_median_s": statistics.median(times)}
        yield rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default=None, help="a scenario file (default: the built-in quickstart)")
    ap.add_argument("--pairs", type=int, default=10, help="A/A pairs and slowdown pairs each (default 10: 21 runs)")
    ap.add_argument(
        "--slowdown", type=float, default=1.3, help="SPARSEBENCH_TEST_SLOWDOWN of the slowed runs (default 1.3)"
    )
    ap.add_argument("--threshold", default="10%", help="compare's --threshold (default: compare's default)")
    ap.add_argument(
        "--out", type=Path, default=Path("gate-check"), help="folder of the runs B0.., S1.. and gate_check.json"
    )
    ap.add_argument("--judge", type=Path, default=None, help="judge the runs already in this folder again")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="with --judge: judge each run by its first ROUNDS rounds only (what fewer rounds would have given)",
    )
    ap.add_argument(
        "--calls",
        type=int,
        default=None,
        help="with --judge: judge each round by its first CALLS timed calls only (what fewer repeats would have given)",
    )
    ap.add_argument(
        "--join",
        type=int,
        default=1,
        help="with --judge: JOIN consecutive runs judged as one run of all their rounds (what more rounds would "
        "have given, spread over a longer time): B0..B(JOIN-1) against S1..SJOIN and against BJOIN..B(2 JOIN-1), ...",
    )
    args = ap.parse_args()
    if args.join < 1 or (args.join > 1 and args.judge is None):
        ap.error("--join takes 1 or more, and judges recorded runs (--judge DIR)")
    from sparsebench.analysis.compare import parse_threshold

    threshold = parse_threshold(args.threshold)
    if args.judge is not None:
        args.out = args.judge
        done = lambda name: (args.out / name / "summary.md").exists()  # noqa: E731 - a finished run
        args.pairs = max((i for i in range(1, 1000) if done(f"B{i}") and done(f"S{i}")), default=0)
    args.out.mkdir(parents=True, exist_ok=True)
    k = args.join
    if args.judge:  # runs B0..B(k-1) joined as the first base, S1..Sk as the first slowdown ...
        base = [[args.out / f"B{k * j + m}" for m in range(k)] for j in range((args.pairs + 1) // k)]
    else:
        base = [[run_once(args.scenario, args.out / "B0", None)]]
    aa, slow = [], []
    for i in range(1, args.pairs // k + 1):
        if args.judge:
            s = [args.out / f"S{k * (i - 1) + m + 1}" for m in range(k)]
        else:
            s = [run_once(args.scenario, args.out / f"S{i}", args.slowdown)]
        slow.append(judge(base[i - 1], s, threshold, args.rounds, args.calls))
        if not args.judge:
            base.append([run_once(args.scenario, args.out / f"B{i}", None)])
        if i < len(base):
            aa.append(judge(base[i - 1], base[i], threshold, args.rounds, args.calls))
        d = slow[-1]
        a = aa[-1] if i < len(base) else None
        line = f"pair {i}: {args.slowdown}x: {d['slower']} caught, {d['withheld']} withheld, {d['missing']} missing"
        line += f" of {d['cases']}, as a whole {d['shift'] or 0:.2f}x {d['shift_verdict']}"
        if a is not None:
            line += (
                f"; A/A {a['slower']} slower, {a['faster']} faster, {a['withheld']} withheld of {a['cases']}"
                f" (gate {'FAILS' if a['gate_failed'] else 'passes'}), as a whole {a['shift'] or 0:.2f}x"
                f" {a['shift_verdict']}; machine (probe) A/A {a['machine'] or 1:.3f}x"
            )
        print(line + f", {args.slowdown}x {d['machine'] or 1:.3f}x", flush=True)
    cases = sum(d["cases"] for d in slow)
    summary = {
        "scenario": args.scenario or "quickstart (built in)",
        "threshold": threshold,
        "slowdown": args.slowdown,
        "rounds_judged": args.rounds,
        "calls_judged": args.calls,
        "runs_joined": args.join,
        "pairs": args.pairs,
        "aa_pairs": len(aa),
        "slowdown_pairs": len(slow),
        "aa_pairs_gate_failed": sum(a["gate_failed"] for a in aa),
        "aa_false_alarm_cases": sum(a["slower"] for a in aa),
        "aa_faster_cases": sum(a["faster"] for a in aa),
        "aa_withheld_cases": sum(a["withheld"] for a in aa),
        "aa_cases": sum(a["cases"] for a in aa),
        "slowdown_caught": sum(d["slower"] for d in slow),
        "slowdown_withheld": sum(d["withheld"] for d in slow),
        "slowdown_missing": sum(d["missing"] for d in slow),
        "slowdown_cases": cases,
        "caught_share": sum(d["slower"] for d in slow) / cases if cases else None,
        "aa_runs_called_slower": sum(a["shift_verdict"] == "slower" for a in aa),
        "slowdown_runs_caught": sum(d["shift_verdict"] == "slower" for d in slow),
        "aa": aa,
        "slow": slow,
    }
    named = ((args.rounds, "rounds"), (args.calls, "calls"), (args.join if args.join > 1 else None, "joined"))
    judged = "".join(f"-{n}-{what}" for n, what in named if n is not None)
    written = args.out / f"gate_check{judged}.json"
    written.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\nA/A: {summary['aa_pairs_gate_failed']} of {len(aa)} pairs failed the gate "
        f"({summary['aa_false_alarm_cases']} slower and {summary['aa_faster_cases']} faster cases of "
        f"{summary['aa_cases']}; {summary['aa_withheld_cases']} withheld)\n"
        f"{args.slowdown}x: {summary['slowdown_caught']} of {cases} cases caught "
        f"({(summary['caught_share'] or 0):.0%}); {summary['slowdown_withheld']} withheld and "
        f"{summary['slowdown_missing']} missing, counted as not caught\n"
        f"the runs as a whole: {summary['aa_runs_called_slower']} of {len(aa)} A/A pairs called slower, "
        f"{summary['slowdown_runs_caught']} of {len(slow)} {args.slowdown}x pairs caught\n"
        f"control: {aa[0]['control'] if aa else '-'}\nwrote {written}"
    )


if __name__ == "__main__":
    main()
