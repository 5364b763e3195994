"""The Slurm executor, through submitit: a job array whose tasks each run a share of the cases,
with the results streaming back as each case ends.

The array's tasks take their cases one after another from the driver, through files in
``RESULT/slurm/<run>/`` (a folder on a filesystem the nodes share with the driver, as the result
folder is on a cluster): the driver writes a job into an idle task's inbox (``task-K/job-SEQ.json``),
the task runs it (remote.serve_job: the case in a worker.Worker child process) and writes
``task-K/result-SEQ.json``, which the driver appends to records.jsonl. So the share of each task
is decided as the run goes (a series' next size goes to whichever task is free once the smaller
one has ended), and the runner keeps its sequencing. A task whose job ends (failed, cancelled,
past its time limit, its node lost) while it holds a case has lost that case: the runner retries
it once on another task, and a fresh job replaces the lost one. A task stops when the driver
writes ``stop`` (end of the run), or when the driver's ``heartbeat`` file is older than
``ORPHAN_S`` (the driver was killed without cancelling). Ctrl-C cancels the jobs.

``slurm: {cluster: local}`` (or ``--slurm-cluster local``) runs the same code path through
submitit's local executor (processes on this machine): how the tests run it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from sparsebench.errors import ScenarioError
from sparsebench.measure.executors.base import Done, Executor, Job, Options, TestKill, forwarded_env, register, require

POLL_S = 0.2  # how often a task looks into its inbox
HEARTBEAT_S = 5.0  # how often the driver touches its heartbeat
ORPHAN_S = 600.0  # a task whose driver's heartbeat is older than this stops
STOP = "stop"
HEARTBEAT = "heartbeat"
# the scenario's slurm: keys -> submitit's parameters (AutoExecutor; the slurm_ ones are ignored
# by the local executor)
PARAMS = {
    "partition": "slurm_partition",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem": "slurm_mem",
    "constraint": "slurm_constraint",
    "setup": "slurm_setup",
    "additional": "slurm_additional_parameters",
}


def minutes(value: int | str) -> int:
    """A Slurm time limit as whole minutes: an integer (minutes), or MM:SS, H:MM:SS, D-H[:MM[:SS]]."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ScenarioError(f"slurm time {value!r}: expected at least 1 minute")
        return value
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ScenarioError(f"slurm time {value!r}: expected minutes, MM:SS, H:MM:SS or D-H:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-H, D-H:MM, D-H:MM:SS
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:MM:SS
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        secs = a * 60 + b
    else:  # minutes
        secs = a * 60
    if secs < 60:
        raise ScenarioError(f"slurm time {value!r}: expected at least 1 minute")
    return -(-secs // 60)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


def task_main(queue: str, task: int) -> int:
    """One array task: take jobs from ``queue/task-K/`` one after another until the driver says
    stop (or is gone); returns how many it ran."""
    from sparsebench.measure.executors import remote

    root = Path(queue)
    inbox = root / f"task-{task}"
    inbox.mkdir(parents=True, exist_ok=True)
    ran = 0
    while True:
        jobs = sorted(inbox.glob("job-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        if not jobs:
            if (root / STOP).exists():
                return ran
            beat = root / HEARTBEAT
            if beat.exists() and time.time() - beat.stat().st_mtime > ORPHAN_S:
                return ran
            time.sleep(POLL_S)
            continue
        path = jobs[0]
        payload = json.loads(path.read_text())
        result = remote.serve_job(payload)
        _write(inbox / f"result-{payload['seq']}.json", result)
        path.unlink()
        ran += 1


class SlurmExecutor(Executor):
    name = "slurm"
    up_front = False

    def __init__(self, settings: dict[str, Any], tasks: int, test_kill: TestKill | None = None) -> None:
        self._submitit = require("submitit", "slurm")
        self.settings = settings
        self.tasks = tasks
        self._test_kill = test_kill
        self._jobs: dict[int, Any] = {}  # task index -> its submitit job
        self._holding: dict[int, Job] = {}  # task index -> the job it holds
        self._dead: set[int] = set()
        self._backlog: list[Job] = []
        self._replacements = 0
        self._beat = 0.0
        self._root: Path | None = None
        self._executor = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": self.tasks, **{k: v for k, v in self.settings.items() if v}}

    def start(self, folder) -> None:
        from datetime import datetime

        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self._root = Path(folder).resolve() / "slurm" / stamp
        i = 1
        while self._root.exists():
            i += 1
            self._root = Path(folder).resolve() / "slurm" / f"{stamp}-{i}"
        self._root.mkdir(parents=True)
        self._touch()
        cluster = self.settings.get("cluster") or "slurm"
        ex = self._submitit.AutoExecutor(folder=str(self._root / "logs"), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": minutes(self.settings.get("time") or "1:00:00"), "name": "sparsebench"}
        for key, name in PARAMS.items():
            value = self.settings.get(key)
            if value not in (None, [], {}):
                params[name] = value
        if cluster == "slurm":
            params["slurm_array_parallelism"] = self.tasks
        ex.update_parameters(**params)
        self._executor = ex
        with ex.batch():  # one job array of `capacity` tasks
            pending = [ex.submit(task_main, str(self._root), k) for k in range(self.tasks)]
        for k, job in enumerate(pending):
            self._jobs[k] = job

    def _touch(self) -> None:
        assert self._root is not None
        (self._root / HEARTBEAT).touch()
        self._beat = time.monotonic()

    def _replace(self, k: int) -> None:
        """A fresh job in place of task k's lost one (a new task index: no stale files)."""
        self._dead.add(k)
        if self._replacements >= 2 * self.tasks:
            return  # jobs keep dying: the runner's retries end the cases as crashed
        self._replacements += 1
        new = max(self._jobs) + 1
        self._jobs[new] = self._executor.submit(task_main, str(self._root), new)

    def submit(self, job: Job) -> None:
        self._backlog.append(job)
        self._assign()

    def _assign(self) -> None:
        """Hand the waiting jobs to idle tasks (a retry may wait for a replacement task)."""
        while self._backlog:
            idle = [k for k in self._jobs if k not in self._dead and k not in self._holding]
            if not idle:
                return
            self._give(self._backlog.pop(0), idle)

    def _give(self, job: Job, idle: list[int]) -> None:
        if job.lost_on is not None:  # a retry: elsewhere where it can
            idle.sort(key=lambda k: f"task {k}" == job.lost_on)
        k = idle[0]
        payload = job.payload(forwarded_env())
        if self._test_kill is not None:
            payload["test_kill"] = vars(self._test_kill)
        assert self._root is not None
        inbox = self._root / f"task-{k}"
        inbox.mkdir(parents=True, exist_ok=True)
        _write(inbox / f"job-{job.seq}.json", payload)
        self._holding[k] = job

    def _result(self, k: int, job: Job) -> dict[str, Any] | None:
        assert self._root is not None
        path = self._root / f"task-{k}" / f"result-{job.seq}.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def wait(self, timeout: float) -> list[Done]:
        end = time.monotonic() + timeout
        while True:
            if time.monotonic() - self._beat > HEARTBEAT_S:
                self._touch()
            out: list[Done] = []
            for k, job in list(self._holding.items()):
                got = self._result(k, job)
                if got is not None:
                    del self._holding[k]
                    out.append(Done(job, got, where=f"task {k}"))
                elif self._jobs[k].done():
                    got = self._result(k, job)  # it may have written its result as it ended
                    del self._holding[k]
                    if got is not None:
                        out.append(Done(job, got, where=f"task {k}"))
                        continue
                    state = getattr(self._jobs[k], "state", "ended")
                    out.append(Done(job, lost=f"slurm job {self._jobs[k].job_id} ended ({state})", where=f"task {k}"))
                    self._replace(k)
            for k, sub in list(self._jobs.items()):  # an idle task whose job ended (its time limit)
                if k not in self._holding and k not in self._dead and sub.done():
                    self._replace(k)
            self._assign()
            if self._backlog and self.capacity == 0:  # every job died and none may replace them
                out += [Done(job, lost="slurm: no task of the array is left to run it") for job in self._backlog]
                self._backlog.clear()
            if out or time.monotonic() >= end:
                return out
            time.sleep(POLL_S)

    @property
    def jobs(self) -> list[Any]:
        """The submitit jobs: the array's tasks and any that replaced a lost one."""
        return list(self._jobs.values())

    @property
    def capacity(self) -> int:  # the tasks still alive (before start: the array's size)
        return len([k for k in self._jobs if k not in self._dead]) if self._jobs else self.tasks

    def cancel(self) -> None:
        for k, sub in self._jobs.items():
            if not sub.done():
                try:
                    sub.cancel(check=False)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self._holding.clear()
        self._backlog.clear()

    def close(self) -> None:
        if self._root is None:
            return
        (self._root / STOP).touch()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(sub.done() for sub in self._jobs.values()):
            time.sleep(POLL_S)
        self.cancel()


def settings(scenario_slurm: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The scenario's slurm: block with the --slurm-* flags over it."""
    out = dict(scenario_slurm)
    out.update({k: v for k, v in flags.items() if v is not None})
    minutes(out.get("time") or "1:00:00")  # a bad time limit stops the run before it starts
    return out


@register("slurm")
def create(options: Options, plan, warn=None) -> SlurmExecutor:
    from sparsebench.measure.executors.base import parse_parallel

    conf = settings(plan.scenario.slurm.model_dump(), options.slurm)
    n = parse_parallel(options.parallel)
    tasks = conf.pop("tasks", None) or (None if n in (None, "auto") else int(n))
    if tasks is None:  # auto: a task per series (each has work), at most 16
        from sparsebench.results import schema

        series = {schema.series_key(schema.identity(c)) for c in plan.cases if not c.skip_reason}
        tasks = max(1, min(len(series), 16))
    return SlurmExecutor(conf, tasks)
