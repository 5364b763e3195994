"""The test-only slowdown switch that ``scripts/gate_check.py`` measures the gate with:
``SPARSEBENCH_TEST_SLOWDOWN=F`` stretches every timed call by real extra work, leaves the
machine-speed probe alone, is recorded in environment.json, and a bad value is one clear line;
and the script's judging of recorded runs by fewer rounds or calls."""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError
from sparsebench.measure import environment, harness, slowdown


def test_factor_reads_the_variable(monkeypatch):
    monkeypatch.delenv(slowdown.VARIABLE, raising=False)
    assert slowdown.factor() == 1.0
    monkeypatch.setenv(slowdown.VARIABLE, "1.3")
    assert slowdown.factor() == pytest.approx(1.3)
    for bad in ("0.5", "abc", "inf", "-2"):
        monkeypatch.setenv(slowdown.VARIABLE, bad)
        with pytest.raises(ScenarioError, match=slowdown.VARIABLE):
            slowdown.factor()


def test_every_timed_call_takes_f_times_as_long(monkeypatch):
    """A call that sleeps 5 ms is timed at 15 ms or more with F = 3 (a lower bound: a loaded
    machine can only make it longer; no upper bound is asserted, that would be a timing test).
    The extra time was spent, not a number multiplied: the wall clock says so."""
    monkeypatch.setenv(slowdown.VARIABLE, "3")
    t0 = time.perf_counter()
    m = harness.time_calls(lambda: time.sleep(0.005), torch.device("cpu"), repeats=4, min_time_s=0.0, max_repeats=4)
    wall = time.perf_counter() - t0
    assert len(m.times) == 4 and min(m.times) >= 0.015
    assert wall >= sum(m.times)  # the recorded times were spent, not multiplied


def test_the_probe_and_the_untimed_calls_are_left_alone(monkeypatch, make_case):
    stretched = []
    monkeypatch.setattr(slowdown, "stretch", lambda t0, f: stretched.append(f))
    monkeypatch.setenv(slowdown.VARIABLE, "1.5")
    fields = harness.run_case(make_case(repeats=3, max_repeats=3, warmup=2))
    assert len(fields["times_s"]) == 3 and stretched == [1.5] * 3  # the timed calls only, not the probe


def test_environment_records_the_switch(monkeypatch):
    monkeypatch.setenv(slowdown.VARIABLE, "1.3")
    assert environment.switches()[slowdown.VARIABLE] == "1.3"
    assert slowdown.VARIABLE in environment.SWITCHES


def test_a_bad_value_stops_the_run_with_one_line(tmp_path, monkeypatch):
    scen = tmp_path / "s.yaml"
    scen.write_text("name: s\nseq_lens: [64]\npatterns: [{name: dense}]\nbackends: [naive]\nheads: 1\nhead_dim: 8\n")
    monkeypatch.setenv(slowdown.VARIABLE, "fast")
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "SPARSEBENCH_TEST_SLOWDOWN='fast'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def _gate_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gate_check.py"
    spec = importlib.util.spec_from_file_location("gate_check", path)
    gate_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate_check)
    return gate_check


def test_gate_check_judges_a_run_by_its_first_rounds_and_calls():
    """``--rounds K --calls C``: each run as if it had timed K rounds of C calls (the calls of a
    round come one after another, so its first C are those a run of C calls times)."""
    gate_check = _gate_check()
    recs = [
        {"case_id": "a", "round": r, "status": "ok", "times_s": [3.0 + r, 1.0 + r, 2.0 + r], "time_min_s": 1.0 + r}
        for r in (1, 2, 3)
    ] + [{"case_id": "b", "round": 1, "status": "error", "times_s": []}]
    got = list(gate_check._first(recs, rounds=2, calls=2))
    assert [r["round"] for r in got] == [1, 2, 1]
    assert got[0]["times_s"] == [4.0, 2.0] and got[0]["time_min_s"] == 2.0 and got[0]["time_median_s"] == 3.0
    assert got[2]["status"] == "error"
    assert recs[0]["times_s"] == [4.0, 2.0, 3.0]  # the records read are left as they were
    assert [r["times_s"] for r in gate_check._first(recs, None, None)] == [r["times_s"] for r in recs]


def test_gate_check_joins_runs_as_one_of_all_their_rounds():
    """``--join K``: K recorded runs judged as one run of their rounds, numbered one run after another."""
    gate_check = _gate_check()
    one = [{"case_id": c, "round": r, "times_s": [r]} for r in (1, 2) for c in "ab"]
    two = [{"case_id": "a", "round": 1, "times_s": [5]}, {"case_id": "a", "round": 3, "times_s": [7]}]
    got = gate_check._joined([one, two, one])
    assert [(r["case_id"], r["round"]) for r in got] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("a", 5),
        ("a", 6),
        ("b", 6),
        ("a", 7),
        ("b", 7),
    ]
    assert [r["times_s"] for r in got[4:6]] == [[5], [7]] and one[0]["round"] == 1  # the records read are kept
    # judged by their first rounds, joined runs give the first runs' rounds
    assert {r["round"] for r in gate_check._first(got, rounds=3, calls=None)} == {1, 2, 3}
