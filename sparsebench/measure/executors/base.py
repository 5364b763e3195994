"""What every executor shares: a Job (one case of one round, sent to be run somewhere), what comes
back (Done: the case's fields, or the engine's reason for losing it), the Executor interface and
the registry of executors by name.

An executor only decides *where* a case runs. The plan, skipping, records, rounds, retries and
resume stay in measure/runner.py, which submits jobs while an executor has room and takes their
results as they end."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from sparsebench.errors import ScenarioError
from sparsebench.scenario import Case

# what a remote worker gets from the driver's environment: the switches that change which kernels
# run (environment.SWITCHES), the plugins, and the thread settings (a variable the driver does not
# set is removed there, so that torch picks its own default as it would here; Ray sets
# OMP_NUM_THREADS in its workers)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def forwarded_env() -> dict[str, str | None]:
    """The driver's environment variables a remote worker runs the cases with (None: unset there)."""
    from sparsebench import plugins
    from sparsebench.measure.environment import SWITCHES

    return {name: os.environ.get(name) for name in (*SWITCHES, plugins.ENV, *THREAD_VARS)}


@dataclass(frozen=True)
class TestKill:
    """Test only (a remote executor's constructor argument, never a flag): the process that hosts
    a case's worker on a remote executor (a Ray worker, a Slurm task) kills itself with SIGKILL
    before it runs the case ``case_id``, ``times`` times in all, one marker file per kill in
    ``marker_dir`` (so that the retry, in a fresh process, knows how often it already fired). It
    stands for a lost worker, node or job."""

    __test__ = False  # not a pytest class
    case_id: str
    marker_dir: str
    times: int = 1


@dataclass(frozen=True)
class Job:
    """One case of one round, as submitted: ``seq`` is unique within a run; ``attempt`` 1 is the
    retry of a case whose worker was lost; ``precheck`` asks the worker to check first whether the
    case can run there (remote executors: the device and memory are the worker's)."""

    seq: int
    case: Case
    round: int = 1
    attempt: int = 0
    precheck: bool = False
    est_mem_bytes: int | None = None
    lost_on: str | None = None  # where its first attempt was lost (a retry avoids it where it can)

    def payload(self, env: dict[str, str | None]) -> dict[str, Any]:
        """What a remote worker receives (plain data: JSON or pickle)."""
        return {
            "seq": self.seq,
            "case": self.case.as_dict(),
            "round": self.round,
            "timeout": self.case.timeout_s,
            "precheck": self.precheck,
            "est_mem_bytes": self.est_mem_bytes,
            "env": env,
            "test_kill": None,
        }


@dataclass(frozen=True)
class Done:
    """A job that ended: its fields (status, times, host, device_name, and from a remote worker
    the yardstick it measured) or, where the engine lost the worker, node or job, ``lost``: the
    engine's reason."""

    job: Job
    fields: dict[str, Any] = field(default_factory=dict)
    lost: str | None = None
    where: str | None = None  # the worker or job that ran it (for a retry elsewhere)


class Executor:
    """Runs jobs somewhere. ``capacity`` is how many jobs may be in flight at once (None: as many
    as the engine places); ``submit`` never blocks; ``wait`` returns the jobs that ended within
    ``timeout`` seconds (possibly none); ``new_round`` starts each round in fresh worker processes;
    ``cancel`` stops the jobs in flight (Ctrl-C); ``close`` releases everything.

    ``yardstick(device, dtype, timeout)`` measures the yardstick where the cases run, before them
    (up_front); a remote executor's jobs bring back the yardstick of the worker that ran them
    instead (up_front False)."""

    name = "local"
    up_front = True
    capacity: int | None = 1

    def label(self) -> str:
        """The record's ``executor`` field."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """meta.json's ``executor`` entry."""
        return {"name": self.name, "capacity": self.capacity}

    def start(self, folder) -> None:  # noqa: B027 - optional
        pass

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> list[Done]:
        raise NotImplementedError

    def new_round(self) -> None:  # noqa: B027 - optional
        pass

    def here(self, case: Case) -> dict[str, Any]:
        """host and device_name of a record that never reached a worker (skipped): where the run
        decided it (the local executor: this machine), or null (a remote one)."""
        return {"host": None, "device_name": None}

    def yardstick(self, device: str, dtype: str, timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    def cancel(self) -> None:  # noqa: B027 - optional
        pass

    def close(self) -> None:  # noqa: B027 - optional
        pass


EXECUTOR_NAMES = ("local", "ray", "slurm")  # each a module of this package that registers itself
# name -> a factory taking the run's options (cli/run.py: ExecutorOptions) and the plan
EXECUTORS: dict[str, Callable[..., Executor]] = {}


def register(name: str):
    def deco(factory):
        EXECUTORS[name] = factory
        return factory

    return deco


@dataclass(frozen=True)
class Options:
    """The executor the user chose, with its settings (flags, or the scenario's ray:/slurm: blocks)."""

    name: str = "local"
    parallel: str | int | None = None  # N, "auto", or None (the executor's default)
    address: str | None = None  # ray: auto or HOST:PORT; None: a local cluster for the run
    slurm: dict[str, Any] = field(default_factory=dict)  # flag values over the scenario's slurm:
    isolate: bool = True


def require(module: str, extra: str):
    """Import an optional engine, or say in one line which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ScenarioError(
            f"--executor {extra} needs {module}, which is not installed: pip install -e '.[{extra}]'"
        ) from None


def parse_parallel(value: str | int | None) -> int | str | None:
    """--parallel: a positive integer or 'auto' (None: not given)."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ScenarioError(f"--parallel {value!r}: expected a positive integer or auto")
    return n
