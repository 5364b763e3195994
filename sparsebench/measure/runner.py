"""Run a plan: first the machine's yardstick (its own GEMM and copy rates) once per device and
dtype, then each case isolated in a worker, each record (with its share of the yardstick)
appended to records.jsonl as soon as its case ends, failed series skip their larger sizes, and
the reports written at the end (also after Ctrl-C, for what finished)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sparsebench.errors import ScenarioError, SparsebenchError
from sparsebench.results import schema
from sparsebench.scenario import Case, Plan

FAIL_STATUSES = ("oom", "timeout", "crashed")
YARDSTICK_TIMEOUT_S = 120.0  # measuring one device and dtype takes about a second


class Interrupted(SparsebenchError):
    exit_code = 130


@dataclass(frozen=True)
class RunResult:
    folder: Path
    records: list[dict[str, Any]]
    interrupted: bool = False


def default_folder(root: Path, scenario: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(root) / f"{stamp}-{scenario}"
    i = 1
    while folder.exists():
        i += 1
        folder = Path(root) / f"{stamp}-{scenario}-{i}"
    return folder


class _Static:
    """Per-case figures that need no measurement (nnz, estimates), cached per series/size."""

    def __init__(self) -> None:
        self._nnz: dict[tuple, int] = {}

    def fields(self, case: Case) -> dict[str, Any]:
        from sparsebench.backends.base import BACKENDS
        from sparsebench.measure.harness import make_problem

        if case.model is not None:  # a model's attention stack, one pattern per layer group
            from sparsebench.measure import stack

            return stack.static_fields(case)
        p = make_problem(case)
        key = (case.pattern_label, case.seq_len, case.causal)
        if key not in self._nnz:
            self._nnz[key] = p.pattern.nnz(case.seq_len, case.causal) if case.mode != "decode" else 0
        nnz = self._nnz[key]
        retained = p.pattern.kv_retained(case.seq_len)
        out: dict[str, Any] = {
            "kv_retained": retained,
            "kv_cache_bytes": 2 * case.batch * case.kv_heads * case.head_dim * p.elem_bytes * retained,
        }
        if case.mode == "decode":
            out.update(
                nnz=None, density=None, flops=None, est_mem_bytes=out["kv_cache_bytes"] + p.io_bytes // case.seq_len * 4
            )
        else:
            from sparsebench.measure.harness import flops

            backend = BACKENDS.get(case.backend)()
            out.update(
                nnz=nnz,
                density=nnz / float(case.seq_len) ** 2,
                flops=flops(p, nnz),
                est_mem_bytes=int(backend.estimate_bytes(p)),
            )
        return out


def _precheck(case: Case, static: dict[str, Any]) -> str | None:
    """Why the case cannot run here (skipped), or None."""
    import torch

    from sparsebench.backends.base import BACKENDS
    from sparsebench.measure.harness import make_problem
    from sparsebench.measure.memory import available_bytes

    if case.model is not None:  # a model's stack: every layer group's problem
        from sparsebench.measure import stack

        why = stack.unsupported(case)
        if why:
            return why
    elif case.mode == "decode":  # a decode step of its own per backend (measure/decode_steps.py)
        from sparsebench.measure import decode_steps
        from sparsebench.measure.device import TORCH_DTYPES

        why = decode_steps.unsupported(case.backend, torch.device(case.device), TORCH_DTYPES[case.dtype])
        if why:
            return why
    else:
        backend = BACKENDS.get(case.backend)
        why = backend.unavailable(torch.device(case.device))
        if why:
            return why
        why = backend().unsupported(make_problem(case))
        if why:
            return why
    from sparsebench.kv.planner import format_bytes  # the KV table's two decimals

    est = static.get("est_mem_bytes") or 0
    if case.memory_budget and est > case.memory_budget:
        return f"estimated {format_bytes(est)} exceeds the memory budget of {format_bytes(case.memory_budget)}"
    avail = available_bytes() if case.device == "cpu" else None
    if avail is not None and est > 0.9 * avail:
        return f"estimated {format_bytes(est)} exceeds 90% of the {format_bytes(avail)} available"
    return None


def measure_yardsticks(
    pairs: list[tuple[str, str]], worker: Any, folder: Path, warn: Callable[[str], None] | None = None
) -> dict[tuple[str, str], dict[str, Any]]:
    """The yardstick (measure/yardstick.py) of each (device, dtype), measured where the cases run:
    in ``worker`` (a worker.Worker), or here where it is None. Each is added to environment.json's
    "yardstick" under "device/dtype" unless that already has it (a resumed run keeps the first
    run's there; its new records carry their own). One that fails is a warning, and null."""
    from sparsebench.measure import worker as workers
    from sparsebench.measure import yardstick
    from sparsebench.results import folder as results

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for device, dtype in pairs:
        got = worker.yardstick(device, dtype, YARDSTICK_TIMEOUT_S) if worker else workers.yardstick(device, dtype)
        if "gemm_tflops" in got:
            out[(device, dtype)] = got
        elif warn:
            why = got.get("error") or f"{got.get('status')}: {got.get('reason')}"
            warn(f"yardstick of {yardstick.key(device, dtype)} not measured ({why}); its fractions stay null")
    env = results.read_environment(folder, warn)
    if env is not None and out:
        stored = env.get("yardstick") if isinstance(env.get("yardstick"), dict) else {}
        new = {yardstick.key(*k): v for k, v in out.items() if yardstick.key(*k) not in stored}
        if new:
            env["yardstick"] = {**stored, **new}
            results.atomic_write(folder / results.ENVIRONMENT, json.dumps(env, indent=2) + "\n")
    return out


def run(
    plan: Plan,
    folder: Path,
    *,
    scenario_text: str,
    isolate: bool = True,
    resume: bool = False,
    on_start: Callable[[Case, int, int], None] | None = None,
    on_record: Callable[[dict[str, Any], int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    finalize: Callable[[Path, list[dict[str, Any]]], None] | None = None,
) -> RunResult:
    from sparsebench.measure import environment, slowdown
    from sparsebench.measure.worker import Worker, execute
    from sparsebench.results import folder as results

    slowdown.factor()  # a bad SPARSEBENCH_TEST_SLOWDOWN stops the run before it starts
    folder = Path(folder)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if resume:
        for rec in results.read_records(folder, warn=warn):
            done[(rec.get("case_id", ""), rec.get("round", 1))] = rec
    else:
        if folder.exists() and any(folder.iterdir()):
            raise ScenarioError(f"{folder}: output folder exists and is not empty (use --resume to continue it)")
        folder.mkdir(parents=True, exist_ok=True)
        results.atomic_write(folder / "scenario.yaml", scenario_text)
        results.atomic_write(folder / results.ENVIRONMENT, json.dumps(environment.collect(), indent=2) + "\n")
        results.write_meta(
            folder,
            {
                "scenario": plan.scenario.name,
                "source": plan.source,
                "skipped_devices": plan.skipped_devices,
                "started": _dt.datetime.now().isoformat(timespec="seconds"),
            },
        )

    records: list[dict[str, Any]] = list(done.values())
    failed: dict[tuple, tuple[int, str]] = {}
    for rec in records:
        if rec.get("status") in FAIL_STATUSES and rec.get("round", 1) == 1:
            key = schema.series_key(rec)
            failed[key] = min(failed.get(key, (rec["seq_len"], rec["status"])), (rec["seq_len"], rec["status"]))
    static = _Static()
    worker = Worker() if isolate else None
    rounds = plan.scenario.rounds
    total = len(plan.cases) * rounds
    first_ok = {cid for (cid, r), rec in done.items() if r == 1 and rec.get("status") == "ok"}
    interrupted = False
    try:
        # the machine's own GEMM and copy rates, once per device and dtype still to measure
        pairs = sorted(
            {(c.device, c.dtype) for c in plan.cases if any((c.case_id, r) not in done for r in range(1, rounds + 1))}
        )
        yardsticks = measure_yardsticks(pairs, worker, folder, warn)
        with results.RecordWriter(folder, warn=warn) as writer:
            in_round = 1
            for i, (r, case) in enumerate((r, c) for r in range(1, rounds + 1) for c in plan.cases):
                if (case.case_id, r) in done or (r > 1 and case.case_id not in first_ok):
                    continue  # later rounds measure again only what the first measured
                if worker and r != in_round:
                    # each round in a fresh worker process: what a process settles into (where its
                    # memory lies, its threads) is not repeated across the rounds of a case
                    worker.close()
                in_round = r
                if on_start:
                    on_start(case, i, total)
                rec = schema.identity(case)
                if case.backend != "block_sparse":
                    rec["tile"] = None  # the others have no tiles
                if rounds > 1:
                    rec["round"] = r
                # a case the scenario itself skips (a parameter that does not fit this length) has
                # no static figures to compute: the pattern may not even be defined at this n
                info = static.fields(case) if not case.skip_reason else {}
                rec.update(info)
                series = schema.series_key(rec)
                why = None  # later rounds measure again what round 1 measured ok, whatever failed since
                if case.skip_reason:
                    why = case.skip_reason
                elif r == 1 and series in failed and case.seq_len > failed[series][0]:
                    n0, st = failed[series]
                    why = f"this series ended with {st} at n={n0}"
                elif r == 1:
                    why = _precheck(case, info)
                if why:
                    rec.update(status="skipped", reason=why)
                else:
                    # round 1 checked the output against dense attention; later rounds only time it
                    # (the same inputs, the same kernel): a round costs the calls, not the check
                    job = case if r == 1 else dataclasses.replace(case, check=False)
                    rec.update(worker.run(job, job.timeout_s) if worker else execute(job))
                rec.setdefault("status", "ok")
                rec.setdefault("reason", "")
                ys = yardsticks.get((case.device, case.dtype), {})
                rec.update(gemm_tflops=ys.get("gemm_tflops"), copy_bytes_per_s=ys.get("copy_bytes_per_s"))
                schema.complete(rec)  # null for what was not measured; no field the schema lacks
                rec["tflops"] = results.tflops(rec)
                rec.update(results.fractions(rec))
                rec["timestamp"] = _dt.datetime.now().isoformat(timespec="seconds")
                writer.append(rec)
                records.append(rec)
                if r == 1 and rec["status"] == "ok":
                    first_ok.add(case.case_id)
                if r == 1 and rec["status"] in FAIL_STATUSES:
                    failed.setdefault(series, (case.seq_len, rec["status"]))
                if on_record:
                    on_record(rec, i, total)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if worker:
            worker.close()
    kept = len(records)
    records = results.merge_rounds(records)
    if finalize:
        finalize(folder, records)
    result = RunResult(folder, records, interrupted)
    if interrupted:
        raise Interrupted(f"interrupted: {kept} records kept in {folder}")
    return result
