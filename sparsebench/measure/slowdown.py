"""``SPARSEBENCH_TEST_SLOWDOWN=F``, for testing a regression gate only: every timed call (the
repeats of a case, each decode step) takes F times as long as it did, because extra work is done
inside the timed region until F times its own duration has passed. The machine-speed probe is
left alone, so the run reads as a slower program on an unchanged machine: the honest way to make
a run slower without renaming its cases (``scripts/gate_check.py`` uses it). environment.json
records the variable among its switches, and ``compare`` warns when two runs differ in it."""

from __future__ import annotations

import os
import time

from sparsebench.errors import ScenarioError

VARIABLE = "SPARSEBENCH_TEST_SLOWDOWN"


def factor() -> float:
    """F from the environment (1.0 when unset); a value that is not a number >= 1 is an error."""
    text = os.environ.get(VARIABLE, "").strip()
    if not text:
        return 1.0
    try:
        f = float(text)
    except ValueError:
        f = float("nan")
    if not (f >= 1.0) or f == float("inf"):
        raise ScenarioError(f"{VARIABLE}={text!r}: expected a factor of 1 or more, like 1.3")
    return f


def stretch(t0: float, f: float) -> None:
    """Called right after a timed call that began at ``perf_counter() == t0`` (and was synced):
    work until ``f`` times its duration has passed since ``t0``."""
    if f <= 1.0:
        return
    deadline = t0 + (time.perf_counter() - t0) * f
    x = 0
    while time.perf_counter() < deadline:
        for i in range(200):  # real work, checked against the clock every ~10 microseconds
            x = (x * 31 + i) % 1_000_003
