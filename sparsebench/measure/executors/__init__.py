"""Executors: where the cases of a run execute. ``local`` (this machine, one worker process or
``--parallel N``), ``ray`` (a Ray task per case) and ``slurm`` (a submitit job array whose tasks
take cases one after another). Each module registers itself in ``base.EXECUTORS``; the run's
sequencing (plan, skipping, records, rounds, retries, resume) is measure/runner.py's."""

from __future__ import annotations

from typing import Callable

from sparsebench.errors import ScenarioError
from sparsebench.measure.executors.base import EXECUTORS, Executor, Options


def create(options: Options, plan, warn: Callable[[str], None] | None = None) -> Executor:
    """The executor ``options`` name, for ``plan``; an unknown name or a missing extra is a
    ScenarioError (one line, exit 2)."""
    from sparsebench.measure.executors import local, ray, slurm  # noqa: F401 - each registers itself

    factory = EXECUTORS.get(options.name)
    if factory is None:
        raise ScenarioError(f"--executor {options.name!r}: unknown; expected one of: {', '.join(sorted(EXECUTORS))}")
    if options.name != "local" and not options.isolate:
        raise ScenarioError(f"--in-process runs cases here; it cannot be combined with --executor {options.name}")
    return factory(options, plan, warn)
