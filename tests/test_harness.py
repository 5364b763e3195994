"""The timing protocol of a case: the first call timed apart, then ``warmup`` untimed calls, then
the timed ones."""

from __future__ import annotations

import dataclasses

import pytest

from sparsebench.measure import harness
from sparsebench.backends.base import BACKENDS, Backend
from sparsebench.scenario import Case


def _case(warmup: int) -> Case:
    return Case(scenario="protocol", pattern="dense", params={}, pattern_label="dense", backend="counting",
                device="cpu", dtype="fp32", mode="forward", batch=1, heads=2, head_dim=16, seq_len=64, causal=True,
                tile=64, warmup=warmup, repeats=3, min_time_s=0.0, max_repeats=3, timeout_s=60,
                memory_budget=None, check=False, exact_max_elems=0, sample_rows=4)


@pytest.mark.parametrize("compiled", [False, True])
def test_warmup_counts_the_untimed_calls_after_the_first(monkeypatch, compiled):
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
        rec = harness.run_case(_case(w))
        assert rec.get("status", "ok") == "ok" and len(rec["times_s"]) == 3, rec
        assert rec["first_call_s"] > 0
        counts[w] = len(calls)
    # warmup 0: the first call and the timed ones only; each warm-up call is one more, untimed
    assert counts[1] - counts[0] == 1 and counts[3] - counts[0] == 3
    assert counts[0] >= 1 + 3


def test_a_failing_warm_up_does_not_fail_the_case(monkeypatch):
    """harness.warm_process is best effort: whatever goes wrong there, the case still runs."""
    import torch

    from sparsebench.measure.worker import execute

    def broken():
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(harness, "_warmed", False)
    monkeypatch.setattr(harness, "_warm", broken)
    state = torch.random.get_rng_state()
    c = dataclasses.replace(_case(0), backend="sdpa")
    rec = execute(c)
    assert rec.get("status", "ok") == "ok" and rec["times_s"], rec
    assert harness._warmed
    # and a working warm-up leaves the global random state alone
    monkeypatch.undo()
    torch.random.set_rng_state(state)
    harness._warm()
    assert torch.equal(torch.random.get_rng_state(), state)
