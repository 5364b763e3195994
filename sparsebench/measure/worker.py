"""Run cases in a persistent worker process, so that a segfault, the kernel's OOM killer or a
hung kernel ends only that case: the parent kills a worker past the case timeout and starts a
fresh one for the next case."""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from typing import Any

from sparsebench.scenario import Case

READY = "ready"
YARDSTICK = "yardstick"  # a request for the yardstick (measure/yardstick.py), not a case
START_GRACE_S = 120.0  # a fresh worker imports torch before its first case


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for an exception raised by a case."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = msg.lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or type(exc).__name__ == "OutOfMemoryError":
        return "oom", f"out of memory: {msg[:200]}"
    from sparsebench.errors import BackendUnavailable

    if isinstance(exc, BackendUnavailable):
        return "skipped", msg
    return "error", f"{type(exc).__name__}: {msg[:300]}"


def execute(case: Case) -> dict[str, Any]:
    """Run one case here; never raises for a case failure (returns status/reason instead)."""
    from sparsebench.measure import harness

    harness.warm_process()
    try:
        if case.model is not None:  # a model's attention stack (measure/stack.py)
            from sparsebench.measure import stack

            return stack.run_stack_case(case)
        if case.mode == "decode":  # its decoder on the case's backend
            from sparsebench.measure import decode_case

            return decode_case.run_case(case)
        return harness.run_case(case)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every case failure becomes a record
        status, reason = classify(exc)
        return {"status": status, "reason": reason}


def yardstick(device: str, dtype: str) -> dict[str, Any]:
    """Measure the yardstick of ``device`` and ``dtype`` here (measure/yardstick.py), after the
    process's warm-up, as a case would run; never raises (``{"error": ...}`` instead)."""
    from sparsebench.measure import harness
    from sparsebench.measure import yardstick as ys

    harness.warm_process()
    try:
        return ys.measure(device, dtype)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a run goes on without its yardstick
        return {"error": classify(exc)[1]}


def _handle(msg: Any) -> dict[str, Any]:
    """A request: a case (its fields), or ``(YARDSTICK, device, dtype)``."""
    if isinstance(msg, tuple) and msg and msg[0] == YARDSTICK:
        return yardstick(*msg[1:])
    return execute(Case(**msg))


def where(device: str) -> dict[str, Any]:
    """Where a case on ``device`` runs in this process: the machine's host name and the device's
    name (the GPU's, or the CPU's model), the record's ``host`` and ``device_name``."""
    import socket

    name = None
    if device.startswith("cuda"):
        try:
            import torch

            name = torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - no such device here: the name stays unknown
            name = None
    elif device == "cpu":
        from sparsebench.measure.environment import _cpu_model  # environment.json's "cpu"

        name = _cpu_model()
    else:
        name = device
    return {"host": socket.gethostname(), "device_name": name}


def _serve(conn, env: dict[str, str | None] | None = None) -> None:
    import os

    for name, value in (env or {}).items():  # before torch is imported: CUDA_VISIBLE_DEVICES, threads
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides on Ctrl-C
    from sparsebench import plugins
    from sparsebench.measure import harness  # noqa: F401 - import torch before the first case

    plugins.load_from_env()
    conn.send(READY)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            result = _handle(msg)
        except BaseException:  # pragma: no cover - last resort
            result = {"status": "error", "reason": traceback.format_exc().splitlines()[-1]}
        conn.send(result)


class Worker:
    """A lazily started child process; ``run`` returns the case's fields or a failure. ``env``:
    environment variables set (None: removed) in the child before it imports torch (a local
    executor's CUDA_VISIBLE_DEVICES, a remote one's forwarded switches)."""

    def __init__(self, env: dict[str, str | None] | None = None) -> None:
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._env = dict(env or {})

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self._env), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def run(self, case: Case, timeout: float) -> dict[str, Any]:
        return self._request(case.as_dict(), timeout)

    def yardstick(self, device: str, dtype: str, timeout: float) -> dict[str, Any]:
        """The yardstick of ``device`` and ``dtype``, measured in the worker (so with the threads
        its cases run with), or ``{"status": ..., "reason": ...}`` where the worker failed."""
        return self._request((YARDSTICK, device, dtype), timeout, "yardstick")

    def _request(self, msg: Any, timeout: float, what: str = "case") -> dict[str, Any]:
        if self._proc is None or not self._proc.is_alive():
            self._start()
            assert self._conn is not None
            if not self._conn.poll(START_GRACE_S):
                self.kill()
                return {"status": "crashed", "reason": f"worker did not start within {START_GRACE_S:g} s"}
            try:
                self._conn.recv()
            except EOFError:
                return self._died()
        assert self._conn is not None and self._proc is not None
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError):
            return self._died()
        if self._conn.poll(timeout):
            try:
                return self._conn.recv()
            except EOFError:
                return self._died()
        if not self._proc.is_alive():
            return self._died()
        self.kill()
        return {"status": "timeout", "reason": f"no result within the {timeout:g} s {what} limit; worker killed"}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _died(self) -> dict[str, Any]:
        proc = self._proc
        if proc is not None:
            proc.join(5)
        code = proc.exitcode if proc is not None else None
        self._proc = self._conn = None
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            if sig == "SIGKILL":
                return {"status": "crashed", "reason": "worker killed by SIGKILL (the kernel's OOM killer or a user)"}
            return {"status": "crashed", "reason": f"worker died with {sig}"}
        return {"status": "crashed", "reason": f"worker exited with code {code}"}

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = self._conn = None

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        self.kill()
