"""After a case of a series ends in oom, timeout or crashed, the runner skips the larger sizes of that
series (each record says which failure at which n) and goes on with every other series; a resumed run
reads the failure back from disk and skips the same sizes."""

from __future__ import annotations

import pytest

from sparsebench import scenario as sc_mod
from sparsebench.backends.base import BACKENDS
from sparsebench.measure import runner
from sparsebench.measure import worker as worker_mod
from sparsebench.results import folder as results

SCENARIO = """\
name: series-skip
seq_lens: [64, 128, 256]
patterns:
  - name: sliding_window
    params: {window: 16}
    label: window
  - name: dense
backends: [naive, block_sparse]
baseline: false
tile: 16
heads: 2
head_dim: 16
warmup: 0
repeats: 1
max_repeats: 1
check: {exact_max_elems: 0, sample_rows: 4}
"""
FAILING = ("window", "naive")  # the series that fails: (pattern_label, backend)
# what a worker reports for a failed case (sparsebench.measure.worker: Worker.run, and classify for oom)
FAILED = {
    "oom": {"status": "oom", "reason": "out of memory: no room for the scores"},
    "timeout": {"status": "timeout", "reason": "no result within the 60 s case limit; worker killed"},
    "crashed": {"status": "crashed", "reason": "worker died with SIGSEGV"},
}
MEASURED = {"time_median_s": 1e-3, "time_min_s": 1e-3, "times_s": [1e-3]}  # what it reports for an ok case


def _plan(text: str = SCENARIO) -> sc_mod.Plan:
    return sc_mod.expand(sc_mod.parse(text, "series-skip.yaml"), "series-skip.yaml")


def _by_series(records: list[dict]) -> dict[tuple, dict[int, dict]]:
    out: dict[tuple, dict[int, dict]] = {}
    for rec in records:
        out.setdefault((rec["pattern_label"], rec["backend"]), {})[rec["seq_len"]] = rec
    return out


def _lose_the_series(monkeypatch, status: str) -> list[int]:
    """A stand-in worker that fails every case of the FAILING series with ``status`` and reports every other
    case as measured (the runner is under test here, not the measurement). Returns the sizes of the FAILING
    series it was asked to run."""
    tried: list[int] = []

    class LosingWorker:
        def run(self, case, timeout):
            if (case.pattern_label, case.backend) == FAILING:
                tried.append(case.seq_len)
                return dict(FAILED[status])
            return dict(MEASURED)

        def yardstick(self, device, dtype, timeout):
            return {"gemm_tflops": 1.0, "copy_bytes_per_s": 1e10}  # the machine's rates, as the worker reports

        def close(self):
            pass

    monkeypatch.setattr(worker_mod, "Worker", LosingWorker)
    return tried


@pytest.mark.parametrize("status", ["oom", "timeout", "crashed"])
def test_a_failed_series_skips_its_larger_sizes_and_the_others_go_on(tmp_path, monkeypatch, status):
    tried = _lose_the_series(monkeypatch, status)
    out = tmp_path / "run"
    res = runner.run(_plan(), out, scenario_text=SCENARIO)

    assert tried == [64]  # the larger sizes of the failed series were never run
    series = _by_series(results.read_records(out))
    assert series == _by_series(res.records)  # what the run returned is what it wrote
    failed = series.pop(FAILING)
    assert failed[64]["status"] == status and failed[64]["reason"] == FAILED[status]["reason"]
    for n in (128, 256):
        assert failed[n]["status"] == "skipped", failed[n]
        assert failed[n]["reason"] == f"this series ended with {status} at n=64"
        assert failed[n]["time_median_s"] is None
    # every other series (the same pattern on block_sparse, the same backend on dense) ran every size
    assert set(series) == {("window", "block_sparse"), ("dense", "naive"), ("dense", "block_sparse")}
    for key, sizes in series.items():
        assert sorted(sizes) == [64, 128, 256], key
        assert all(rec["status"] == "ok" for rec in sizes.values()), (key, sizes)


def test_a_resumed_run_reads_the_failure_back_and_skips_the_same_sizes(tmp_path, monkeypatch):
    tried = _lose_the_series(monkeypatch, "crashed")
    out = tmp_path / "run"
    first = SCENARIO.replace("seq_lens: [64, 128, 256]", "seq_lens: [64]")
    runner.run(_plan(first), out, scenario_text=first)  # as if interrupted after the smallest size
    assert tried == [64]

    runner.run(_plan(), out, scenario_text=SCENARIO, resume=True)

    assert tried == [64]  # the resumed run did not try the failed series again
    series = _by_series(results.read_records(out))
    assert series[FAILING][64]["status"] == "crashed"
    for n in (128, 256):
        assert series[FAILING][n]["status"] == "skipped"
        assert series[FAILING][n]["reason"] == "this series ended with crashed at n=64"
    assert all(rec["status"] == "ok" for key, sizes in series.items() if key != FAILING for rec in sizes.values())
    assert all(sorted(sizes) == [64, 128, 256] for sizes in series.values())


def test_a_real_out_of_memory_in_process_skips_the_larger_sizes(tmp_path, monkeypatch):
    """End to end in this process: the naive backend runs out of memory at the smallest size (its prepare
    raises MemoryError), the case is measured as oom, the next size is skipped, block_sparse measures both."""
    tried: list[int] = []
    naive = BACKENDS.get("naive")

    def out_of_memory(self, p):
        tried.append(p.seq_len)
        raise MemoryError("no room for the scores")

    monkeypatch.setattr(naive, "prepare", out_of_memory)
    text = SCENARIO.replace("seq_lens: [64, 128, 256]", "seq_lens: [64, 128]").replace("  - name: dense\n", "")
    out = tmp_path / "run"
    runner.run(_plan(text), out, scenario_text=text, isolate=False)

    assert tried == [64]  # the larger size was never run
    series = _by_series(results.read_records(out))
    assert set(series) == {FAILING, ("window", "block_sparse")}
    assert series[FAILING][64]["status"] == "oom" and series[FAILING][64]["reason"] == FAILED["oom"]["reason"]
    assert series[FAILING][128]["status"] == "skipped"
    assert series[FAILING][128]["reason"] == "this series ended with oom at n=64"
    for n, rec in series[("window", "block_sparse")].items():
        assert rec["status"] == "ok" and rec["time_median_s"] > 0, (n, rec)


def test_each_round_runs_in_a_fresh_worker(tmp_path, monkeypatch):
    """What a worker process settles into (where its memory lies, its threads) is not repeated
    across the rounds of a case: the runner closes its worker between rounds."""
    events: list[str] = []

    class CountingWorker:
        def run(self, case, timeout):
            events.append("run")
            return dict(MEASURED)

        def yardstick(self, device, dtype, timeout):
            return {"gemm_tflops": 1.0, "copy_bytes_per_s": 1e10}

        def close(self):
            events.append("close")

    monkeypatch.setattr(worker_mod, "Worker", CountingWorker)
    runner.run(_plan(SCENARIO + "rounds: 3\n"), tmp_path / "run", scenario_text=SCENARIO)
    cases = len(_plan().cases)
    rounds = "".join("c" if e == "close" else "r" for e in events).split("c")
    assert [len(r) for r in rounds] == [cases, cases, cases, 0]  # three rounds, then the final close
