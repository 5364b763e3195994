"""The timing protocol of a case: the first call timed apart, then ``warmup`` untimed calls, then
the timed ones."""

from __future__ import annotations

import dataclasses

import pytest

from sparsebench.backends.base import BACKENDS, Backend
from sparsebench.measure import harness
from sparsebench.scenario import Case


@pytest.fixture
def protocol_case(make_case):
    """``protocol_case(warmup)``: a dense case of the test's "counting" backend, timed three times, unchecked."""

    def build(warmup: int) -> Case:
        return make_case(
            scenario="protocol",
            backend="counting",
            tile=64,
            warmup=warmup,
            repeats=3,
            max_repeats=3,
            check=False,
            exact_max_elems=0,
        )

    return build


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_warmup_counts_the_untimed_calls_after_the_first(monkeypatch, compiled, protocol_case):
    calls: list[int] = []

    class Counting(Backend):
        name = "counting"

        def prepare(self, p):
            def fn(q, k, v):
                calls.append(1)
                return q.clone()

            return fn

    Counting.compiled = compiled
    monkeypatch.setattr(BACKENDS, "get", lambda name: Counting)
    counts = {}
    for w in (0, 1, 3):
        calls.clear()
        rec = harness.run_case(protocol_case(w))
        assert rec.get("status", "ok") == "ok" and len(rec["times_s"]) == 3, rec
        assert rec["first_call_s"] > 0
        counts[w] = len(calls)
    # warmup 0: the first call and the timed ones only; each warm-up call is one more, untimed;
    # an unchecked case (a later round) makes no untimed check call
    assert counts[1] - counts[0] == 1 and counts[3] - counts[0] == 3
    assert counts[0] == 1 + 3
    calls.clear()
    rec = harness.run_case(dataclasses.replace(protocol_case(0), check=True))
    assert rec["check"] != "none" and len(calls) == 1 + 3 + 1  # checked: one call more, whose output is judged


def test_a_failing_warm_up_does_not_fail_the_case(monkeypatch, protocol_case):
    """harness.warm_process is best effort: whatever goes wrong there, the case still runs."""
    import torch

    from sparsebench.measure.worker import execute

    def broken():
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(harness, "_warmed", False)
    monkeypatch.setattr(harness, "_warm", broken)
    state = torch.random.get_rng_state()
    c = dataclasses.replace(protocol_case(0), backend="sdpa")
    rec = execute(c)
    assert rec.get("status", "ok") == "ok" and rec["times_s"], rec
    assert harness._warmed
    # and a working warm-up leaves the global random state alone
    monkeypatch.undo()
    torch.random.set_rng_state(state)
    harness._warm()
    assert torch.equal(torch.random.get_rng_state(), state)
