"""Run a plan: first the machine's yardstick (its own GEMM and copy rates) once per device and
dtype, then each case isolated in a worker, each record (with its share of the yardstick)
appended to records.jsonl as soon as its case ends, failed series skip their larger sizes, and
the reports written at the end (also after Ctrl-C, for what finished). Where a case runs is the
executor's business (measure/executors: local, ray, slurm); the sequencing is this module's."""

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
    in ``worker`` (a worker.Worker, or a local executor), or here where it is None. Each is added
    to environment.json's "yardstick" under "device/dtype" unless that already has it (a resumed
    run keeps the first run's there; its new records carry their own). One that fails is a
    warning, and null."""
    from sparsebench.measure import worker as workers
    from sparsebench.measure import yardstick

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for device, dtype in pairs:
        got = worker.yardstick(device, dtype, YARDSTICK_TIMEOUT_S) if worker else workers.yardstick(device, dtype)
        if "gemm_tflops" in got:
            out[(device, dtype)] = got
        elif warn:
            why = got.get("error") or f"{got.get('status')}: {got.get('reason')}"
            warn(f"yardstick of {yardstick.key(device, dtype)} not measured ({why}); its fractions stay null")
    store_yardsticks(folder, {yardstick.key(*k): v for k, v in out.items()}, warn)
    return out


def store_yardsticks(folder: Path, found: dict[str, dict[str, Any]], warn: Callable[[str], None] | None = None) -> None:
    """Add yardsticks (by their environment.json name) that environment.json lacks."""
    from sparsebench.results import folder as results

    env = results.read_environment(folder, warn)
    if env is None or not found:
        return
    stored = env.get("yardstick") if isinstance(env.get("yardstick"), dict) else {}
    new = {k: v for k, v in found.items() if k not in stored}
    if new:
        env["yardstick"] = {**stored, **new}
        results.atomic_write(folder / results.ENVIRONMENT, json.dumps(env, indent=2) + "\n")


def yardstick_name(device: str, dtype: str, host: str | None, driver: str) -> str:
    """environment.json's name of a yardstick: "device/dtype" where it was measured on the machine
    that ran the driver, "host device/dtype" where a remote executor's worker measured it on
    another (each host has its own: the yardstick is per device and dtype on the hardware the cases
    run on)."""
    from sparsebench.measure import yardstick

    key = yardstick.key(device, dtype)
    return key if host in (None, driver) else f"{host} {key}"


def _store_host(folder: Path, host: str | None, info: dict[str, Any] | None, warn=None) -> None:
    """environment.json's "hosts": each remote host's own environment, as its worker sent it once."""
    from sparsebench.results import folder as results

    if not host or not info:
        return
    env = results.read_environment(folder, warn)
    if env is None:
        return
    hosts = env.get("hosts") if isinstance(env.get("hosts"), dict) else {}
    if host not in hosts:
        env["hosts"] = {**hosts, host: info}
        results.atomic_write(folder / results.ENVIRONMENT, json.dumps(env, indent=2) + "\n")


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
    executor: Any = None,
) -> RunResult:
    """Run ``plan`` into ``folder`` through ``executor`` (measure/executors: local, ray, slurm;
    None: the local one, in worker processes unless ``isolate`` is False). The sequencing is
    here, whatever the executor: rounds one after another (each in fresh workers), a series' sizes
    in order (its next size is submitted once the smaller one has ended, so a failure skips the
    larger sizes as in a sequential run, and parallelism comes from different series), every record
    appended as its case ends, a job whose worker, node or job the engine lost retried once
    elsewhere (its record then says retries 1; lost twice: crashed with the engine's reason)."""
    from sparsebench.measure import environment, slowdown
    from sparsebench.measure.executors.local import LocalExecutor
    from sparsebench.results import folder as results

    slowdown.factor()  # a bad SPARSEBENCH_TEST_SLOWDOWN stops the run before it starts
    folder = Path(folder)
    executor = executor or LocalExecutor(1, isolate=isolate)
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
                "executor": executor.describe(),
            },
        )

    records: list[dict[str, Any]] = list(done.values())
    state = _State(plan, folder, executor, done, records, warn)
    interrupted = False
    try:
        executor.start(folder)
        state.go(on_start, on_record)
    except KeyboardInterrupt:
        interrupted = True
        executor.cancel()
    finally:
        executor.close()
    kept = len(records)
    records = results.merge_rounds(records)
    if finalize:
        finalize(folder, records)
    result = RunResult(folder, records, interrupted)
    if interrupted:
        raise Interrupted(f"interrupted: {kept} records kept in {folder}")
    return result


class _State:
    """One run's progress: what is done, what failed, what is in flight; ``go`` runs the rest."""

    def __init__(self, plan: Plan, folder: Path, executor: Any, done: dict, records: list, warn) -> None:
        import socket

        self.plan, self.folder, self.executor, self.done, self.records, self.warn = (
            plan,
            folder,
            executor,
            done,
            records,
            warn,
        )
        self.rounds = plan.scenario.rounds
        self.total = len(plan.cases) * self.rounds
        self.count = len(done)  # records written so far (a resumed run starts where it stopped)
        self.failed: dict[tuple, tuple[int, str]] = {}
        for rec in records:
            if rec.get("status") in FAIL_STATUSES and rec.get("round", 1) == 1:
                key = schema.series_key(rec)
                self.failed[key] = min(
                    self.failed.get(key, (rec["seq_len"], rec["status"])), (rec["seq_len"], rec["status"])
                )
        self.first_ok = {cid for (cid, r), rec in done.items() if r == 1 and rec.get("status") == "ok"}
        self.static = _Static()
        self.yardsticks: dict[tuple[str, str], dict[str, Any]] = {}
        self.driver = socket.gethostname()
        self.seq = 0

    def go(self, on_start, on_record) -> None:
        from sparsebench.results import folder as results

        todo = [[c for c in self.plan.cases if (c.case_id, r) not in self.done] for r in range(1, self.rounds + 1)]
        if self.executor.up_front:
            # the machine's own GEMM and copy rates, once per device and dtype still to measure
            pairs = sorted({(c.device, c.dtype) for cases in todo for c in cases})
            self.yardsticks = measure_yardsticks(pairs, self.executor, self.folder, self.warn)
        with results.RecordWriter(self.folder, warn=self.warn) as writer:
            self.writer = writer
            for r, cases in enumerate(todo, 1):
                # later rounds measure again only what the first measured ok
                cases = [c for c in cases if r == 1 or c.case_id in self.first_ok]
                if not cases:
                    continue
                if r > 1:
                    self.executor.new_round()  # each round in fresh worker processes
                self._round(r, cases, on_start, on_record)

    def _round(self, r: int, queue: list[Case], on_start, on_record) -> None:
        from sparsebench.measure.executors.base import Job

        in_flight: dict[int, Job] = {}
        while queue or in_flight:
            capacity = self.executor.capacity
            if capacity == 0 and not in_flight:
                raise SparsebenchError(
                    f"{self.executor.name}: no worker left to run the {len(queue)} remaining cases of round {r}; "
                    "continue with --resume"
                )
            busy = {schema.series_key(schema.identity(j.case)) for j in in_flight.values()}
            for case in list(queue):
                series = schema.series_key(schema.identity(case))
                if series in busy:
                    continue  # a series' sizes in order: the next once the smaller one has ended
                busy.add(series)
                rec, info = self._record(case, r)
                why = self._skip(case, r, series, info)
                if not why and capacity is not None and len(in_flight) >= capacity:
                    break
                queue.remove(case)
                if on_start:
                    on_start(case, self.count, self.total)
                if why:
                    rec.update(status="skipped", reason=why, **self.executor.here(case))
                    self._finish(rec, case, r, on_record)
                    continue
                # round 1 checked the output against dense attention; later rounds only time it
                # (the same inputs, the same kernel): a round costs the calls, not the check
                job_case = case if r == 1 else dataclasses.replace(case, check=False)
                self.seq += 1
                job = Job(
                    self.seq,
                    job_case,
                    round=r,
                    precheck=r == 1 and not self.executor.up_front,
                    est_mem_bytes=info.get("est_mem_bytes"),
                )
                in_flight[job.seq] = job
                self.executor.submit(job)
            if not in_flight:
                continue
            for done in self.executor.wait(0.5):
                job = in_flight.pop(done.job.seq, None)
                if job is None:
                    continue  # an answer to a job no longer wanted (never written twice)
                if done.lost is not None and job.attempt == 0:
                    self.seq += 1  # lost with its worker, node or job: once more, elsewhere
                    retry = dataclasses.replace(job, seq=self.seq, attempt=1, lost_on=done.where)
                    if self.warn:
                        self.warn(f"{_name(job.case)}: {done.lost}; retrying it once on another worker")
                    in_flight[retry.seq] = retry
                    self.executor.submit(retry)
                    continue
                case = next(c for c in self.plan.cases if c.case_id == job.case.case_id)
                rec, _ = self._record(case, r)
                fields = dict(done.fields)
                if done.lost is not None:
                    fields = {"status": "crashed", "reason": f"lost twice: {done.lost}"}
                ys = fields.pop("yardstick", None)
                host_env = fields.pop("environment", None)
                rec.update(fields)
                rec["retries"] = job.attempt
                if ys and "gemm_tflops" in ys:
                    name = yardstick_name(case.device, case.dtype, rec.get("host"), self.driver)
                    store_yardsticks(self.folder, {name: ys}, self.warn)
                    rec.update(gemm_tflops=ys.get("gemm_tflops"), copy_bytes_per_s=ys.get("copy_bytes_per_s"))
                if rec.get("host") not in (None, self.driver):
                    _store_host(self.folder, rec.get("host"), host_env, self.warn)
                self._finish(rec, case, r, on_record)

    def _record(self, case: Case, r: int) -> tuple[dict[str, Any], dict[str, Any]]:
        rec = schema.identity(case)
        if case.backend != "block_sparse":
            rec["tile"] = None  # the others have no tiles
        if self.rounds > 1:
            rec["round"] = r
        # a case the scenario itself skips (a parameter that does not fit this length) has
        # no static figures to compute: the pattern may not even be defined at this n
        info = self.static.fields(case) if not case.skip_reason else {}
        rec.update(info)
        rec["executor"] = self.executor.label()
        rec["retries"] = 0
        return rec, info

    def _skip(self, case: Case, r: int, series: tuple, info: dict[str, Any]) -> str | None:
        """Why ``case`` is not run (skipped), or None. Later rounds measure again what round 1
        measured ok, whatever failed since. A remote executor checks the device where the case
        lands (the job's precheck), the local one here."""
        if case.skip_reason:
            return case.skip_reason
        if r == 1 and series in self.failed and case.seq_len > self.failed[series][0]:
            n0, st = self.failed[series]
            return f"this series ended with {st} at n={n0}"
        if r == 1 and self.executor.up_front:
            return _precheck(case, info)
        return None

    def _finish(self, rec: dict[str, Any], case: Case, r: int, on_record) -> None:
        from sparsebench.results import folder as results

        rec.setdefault("status", "ok")
        rec.setdefault("reason", "")
        if rec.get("gemm_tflops") is None and rec.get("copy_bytes_per_s") is None:
            ys = self.yardsticks.get((case.device, case.dtype), {})
            rec.update(gemm_tflops=ys.get("gemm_tflops"), copy_bytes_per_s=ys.get("copy_bytes_per_s"))
        schema.complete(rec)  # null for what was not measured; no field the schema lacks
        rec["tflops"] = results.tflops(rec)
        rec.update(results.fractions(rec))
        rec["timestamp"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.writer.append(rec)
        self.records.append(rec)
        if r == 1 and rec["status"] == "ok":
            self.first_ok.add(case.case_id)
        if r == 1 and rec["status"] in FAIL_STATUSES:
            self.failed.setdefault(schema.series_key(rec), (case.seq_len, rec["status"]))
        if on_record:
            on_record(rec, self.count, self.total)
        self.count += 1


def _name(case: Case) -> str:
    return f"{case.pattern_label} · {case.backend} at n={case.seq_len}"
