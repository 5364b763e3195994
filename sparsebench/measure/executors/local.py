"""The local executor: cases on this machine, each in a worker process (measure/worker.py), or in
this process (``--in-process``). ``--parallel N`` runs N workers at once, worker i on CUDA device i
alone (CUDA_VISIBLE_DEVICES); ``auto`` is one worker per CUDA device when the plan has CUDA cases,
else one: a CPU case uses the whole machine. N > 1 with CPU cases is allowed with a warning (their
times are then those of a machine shared with the other workers' cases), so that a functional run
can go faster; N above the CUDA devices of a CUDA plan is refused (two cases would share one)."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from sparsebench.errors import ScenarioError
from sparsebench.measure.executors.base import Done, Executor, Job, Options, parse_parallel, register
from sparsebench.scenario import Case

CPU_SHARED = (
    "--parallel {n} with CPU cases: {n} workers share this machine's cores, so a CPU case's time is not that of "
    "a machine to itself (fine for a functional run, not for figures to keep)"
)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def workers_for(parallel: Any, plan, warn: Callable[[str], None] | None = None) -> int:
    """How many workers ``--parallel`` asks for on this machine, for ``plan``."""
    parallel = parse_parallel(parallel)
    uses_cuda = any(c.device.startswith("cuda") for c in plan.cases)
    uses_cpu = any(c.device == "cpu" for c in plan.cases)
    gpus = _cuda_devices() if uses_cuda else 0
    if parallel in (None, "auto"):
        n = max(1, gpus) if uses_cuda and not uses_cpu else 1
    else:
        n = int(parallel)
        if uses_cuda and n > max(gpus, 1):
            raise ScenarioError(
                f"--parallel {n}: this machine has {gpus} CUDA device(s); one worker per device at most, "
                "so that no two cases share a GPU"
            )
        if uses_cpu and n > 1 and warn:
            warn(CPU_SHARED.format(n=n))
    return n


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int = 1, isolate: bool = True, gpus: int = 0) -> None:
        if workers > 1 and not isolate:
            raise ScenarioError("--in-process runs one case at a time; it cannot be combined with --parallel")
        self.capacity = workers
        self._isolate = isolate
        self._gpus = gpus
        self._workers: list[Any] = []
        self._queue: list[Job] = []  # one worker: run on wait(), in this thread
        self._free: list[int] = list(range(workers))
        self._done: queue.Queue = queue.Queue()
        self._where: dict[tuple[int, str], dict[str, Any]] = {}

    def label(self) -> str:
        return self.name if self.capacity == 1 else f"{self.name} x{self.capacity}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "parallel": self.capacity, "isolate": self._isolate}

    # one worker process per slot, started lazily, slot i on CUDA device i when there are devices
    def _worker(self, slot: int):
        from sparsebench.measure import worker as workers

        while len(self._workers) <= slot:
            i = len(self._workers)
            env = {"CUDA_VISIBLE_DEVICES": str(i)} if self.capacity > 1 and i < self._gpus else None
            self._workers.append(workers.Worker(env=env) if env else workers.Worker())
        return self._workers[slot]

    def _place(self, slot: int, device: str) -> dict[str, Any]:
        from sparsebench.measure import worker as workers

        key = (slot, device)
        if key not in self._where:
            if device.startswith("cuda") and self.capacity > 1 and slot < self._gpus:
                device = f"cuda:{slot}"  # the device the slot's CUDA_VISIBLE_DEVICES shows it
            self._where[key] = workers.where(device)
        return self._where[key]

    def _run(self, slot: int, job: Job) -> Done:
        from sparsebench.measure import worker as workers

        if self._isolate:
            fields = self._worker(slot).run(job.case, job.case.timeout_s)
        else:
            fields = workers.execute(job.case)
        return Done(job, {**self._place(slot, job.case.device), **fields}, where=f"worker {slot}")

    def here(self, case: Case) -> dict[str, Any]:
        return self._place(0, case.device)

    def submit(self, job: Job) -> None:
        if self.capacity == 1:
            self._queue.append(job)
            return
        slot = self._free.pop(0)

        def go() -> None:
            try:
                self._done.put((slot, self._run(slot, job)))
            except BaseException as exc:  # noqa: BLE001 - a thread must report, never die silently
                self._done.put((slot, Done(job, {"status": "crashed", "reason": f"{type(exc).__name__}: {exc}"})))

        threading.Thread(target=go, daemon=True, name=f"sparsebench-worker-{slot}").start()

    def wait(self, timeout: float) -> list[Done]:
        if self.capacity == 1:
            out = [self._run(0, job) for job in self._queue]
            self._queue.clear()
            return out
        out = []
        try:
            slot, done = self._done.get(timeout=timeout)
        except queue.Empty:
            return out
        while True:
            self._free.append(slot)
            out.append(done)
            try:
                slot, done = self._done.get_nowait()
            except queue.Empty:
                return out

    def yardstick(self, device: str, dtype: str, timeout: float) -> dict[str, Any]:
        from sparsebench.measure import worker as workers

        if not self._isolate:
            return workers.yardstick(device, dtype)
        return self._worker(0).yardstick(device, dtype, timeout)

    def new_round(self) -> None:
        # each round in fresh worker processes: what a process settles into (where its memory
        # lies, its threads) is not repeated across the rounds of a case
        for w in self._workers:
            w.close()

    def cancel(self) -> None:
        for w in self._workers:
            kill = getattr(w, "kill", None)
            if kill:
                kill()

    def close(self) -> None:
        for w in self._workers:
            w.close()


@register("local")
def create(options: Options, plan, warn=None) -> LocalExecutor:
    n = workers_for(options.parallel, plan, warn)
    gpus = _cuda_devices() if n > 1 and any(c.device.startswith("cuda") for c in plan.cases) else 0
    return LocalExecutor(n, isolate=options.isolate, gpus=gpus)
