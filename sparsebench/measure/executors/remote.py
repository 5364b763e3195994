"""The worker side of a remote executor: what a Ray task or a Slurm task runs for one job, in the
process the engine gave it. The case itself runs in a worker.Worker child process, as locally, so
that the isolation, the memory guard and the timeouts are the same; the Worker stays up across the
jobs this process serves (a fresh one per round, as locally). Before a job's first case of a device
and dtype this process measures that yardstick in its Worker, and every answer carries it, with
the host and device the case ran on (and, once per process, this host's environment)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from sparsebench.scenario import Case

_worker: Any = None
_worker_key: tuple = ()
_yardsticks: dict[tuple[str, str], dict[str, Any]] = {}
_env_sent = False
YARDSTICK_TIMEOUT_S = 120.0


def _test_kill(spec: dict[str, Any] | None, case_id: str) -> None:
    """The test-only hook (executors.base.TestKill): SIGKILL this process before the case."""
    if not spec or spec.get("case_id") != case_id:
        return
    marks = Path(spec["marker_dir"])
    marks.mkdir(parents=True, exist_ok=True)
    fired = len(list(marks.glob("kill-*")))
    if fired < int(spec.get("times", 1)):
        (marks / f"kill-{fired + 1}-{os.getpid()}").write_text(case_id)
        os.kill(os.getpid(), signal.SIGKILL)


def serve_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one job (executors.base.Job.payload) here: the fields of its record."""
    global _worker, _worker_key, _env_sent
    from sparsebench.measure import runner
    from sparsebench.measure import worker as workers

    case = Case(**payload["case"])
    _test_kill(payload.get("test_kill"), case.case_id)
    env = dict(payload.get("env") or {})
    for name, value in env.items():  # this process too: a plugin's patterns for the precheck
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if env.get("SPARSEBENCH_PLUGINS"):
        from sparsebench import plugins

        plugins.load_from_env()
    key = (payload.get("round", 1), tuple(sorted(env.items(), key=lambda kv: kv[0])))
    if _worker is None or key != _worker_key:
        if _worker is not None:
            _worker.close()  # a new round (or other switches): a fresh worker process
        _worker, _worker_key = workers.Worker(env=env), key
    out: dict[str, Any] = dict(workers.where(case.device))
    if not _env_sent:
        from sparsebench.measure import environment

        out["environment"] = environment.collect()
        _env_sent = True
    if payload.get("precheck"):  # the device, its backends and its memory are this machine's
        why = runner._precheck(case, {"est_mem_bytes": payload.get("est_mem_bytes")})
        if why:
            return {**out, "status": "skipped", "reason": why}
    pair = (case.device, case.dtype)
    if pair not in _yardsticks:
        _yardsticks[pair] = _worker.yardstick(case.device, case.dtype, YARDSTICK_TIMEOUT_S)
    out["yardstick"] = _yardsticks[pair]
    out.update(_worker.run(case, payload.get("timeout") or case.timeout_s))
    return out
