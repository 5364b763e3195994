"""Executors (issue 22): the same scenario through local (one worker, --parallel), Ray (a local
cluster, one Ray task per case) and Slurm (submitit's local executor: the job array, its tasks
taking cases from the driver, results streaming back); a lost worker retried once (retries 1, one
record), lost twice crashed with the engine's reason and the larger sizes of its series skipped;
resume after a cancelled job array (and, in the same test, a killed Slurm task retried on another); one
line for a missing extra."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from sparsebench import scenario as sc_mod
from sparsebench.errors import ScenarioError
from sparsebench.measure import runner
from sparsebench.measure.executors import base, local
from sparsebench.results import folder as results

TINY = """\
name: tiny-executors
seq_lens: [64, 128]
patterns:
  - dense
  - name: sliding_window
    params: {window: 16}
backends: [sdpa, naive]
heads: 2
head_dim: 16
warmup: 0
repeats: 2
check: {exact_max_elems: 0, sample_rows: 4}
"""
SW = "sliding_window(window=16)"


def _plan(text: str = TINY) -> sc_mod.Plan:
    return sc_mod.expand(sc_mod.parse(text, "tiny.yaml"), "tiny.yaml")


def _ids(records) -> list[str]:
    return sorted(r["case_id"] for r in records)


def _case(plan, label, n):
    return next(c for c in plan.cases if c.pattern_label == label and c.backend == "naive" and c.seq_len == n)


@pytest.fixture(scope="module")
def local_ids(tmp_path_factory):
    """The case keys of a local run of TINY (in this process: the quickest)."""
    out = tmp_path_factory.mktemp("local") / "run"
    runner.run(_plan(), out, scenario_text=TINY, isolate=False)
    recs = results.read_records(out)
    assert {r["executor"] for r in recs} == {"local"} and {r["status"] for r in recs} == {"ok"}
    return _ids(recs)


# ----------------------------------------------------------------------------------------- local
def test_parallel_auto_is_one_worker_on_a_cpu_and_n_warns_that_cpu_cases_share_cores():
    warned: list[str] = []
    assert local.workers_for("auto", _plan(), warned.append) == 1 and not warned
    assert local.workers_for(None, _plan(), warned.append) == 1
    assert local.workers_for(2, _plan(), warned.append) == 2
    assert len(warned) == 1 and "share this machine's cores" in warned[0]
    with pytest.raises(ScenarioError, match="positive integer or auto"):
        base.parse_parallel("0")


@pytest.mark.slow
def test_local_parallel_runs_every_case_once_and_names_where(tmp_path, local_ids):
    out = tmp_path / "run"
    res = runner.run(_plan(), out, scenario_text=TINY, executor=local.LocalExecutor(2))
    recs = results.read_records(out)
    assert _ids(recs) == local_ids  # none lost, none twice
    assert {r["status"] for r in recs} == {"ok"} and {r["executor"] for r in recs} == {"local x2"}
    assert all(r["host"] and r["device_name"] and r["retries"] == 0 for r in recs)
    assert len(res.records) == len(local_ids)
    assert json.loads((out / results.META).read_text())["executor"] == {"name": "local", "parallel": 2, "isolate": True}


def test_a_series_runs_its_sizes_in_order_and_a_failure_skips_the_larger_ones(tmp_path):
    """With room for every case at once, the runner still submits a series' next size only once the
    smaller one has ended: the failure at 64 skips 128, which is never submitted."""
    submitted: list[tuple[str, int]] = []

    class Everything(base.Executor):
        capacity = None  # as many at once as there are

        def __init__(self):
            self.jobs = []

        def submit(self, job):
            submitted.append((job.case.pattern_label, job.case.seq_len))
            self.jobs.append(job)

        def wait(self, timeout):
            jobs, self.jobs = self.jobs, []
            fail = {"status": "crashed", "reason": "worker died with SIGSEGV"}
            ok = {"status": "ok", "time_median_s": 1e-3, "time_min_s": 1e-3, "times_s": [1e-3]}
            return [base.Done(j, dict(fail if j.case.pattern_label == SW else ok)) for j in jobs]

        def yardstick(self, device, dtype, timeout):
            return {"gemm_tflops": 1.0, "copy_bytes_per_s": 1e10}

    out = tmp_path / "run"
    runner.run(_plan(), out, scenario_text=TINY, executor=Everything())
    assert submitted[:3] == [("dense", 64), ("dense", 64), (SW, 64)]  # the first size of every series at once
    assert (SW, 128) not in submitted
    [big] = [r for r in results.read_records(out) if r["pattern_label"] == SW and r["seq_len"] == 128]
    assert big["status"] == "skipped" and big["reason"] == "this series ended with crashed at n=64"


def test_a_lost_job_is_retried_once_and_lost_twice_is_crashed(tmp_path):
    """The runner's retry, whatever the engine: lost once -> one record, the retry's, retries 1;
    lost twice -> crashed with the engine's reason, retries 1."""

    class Losing(base.Executor):
        capacity = 1

        def __init__(self, losses):
            self.losses, self.jobs, self.seen = losses, [], []

        def submit(self, job):
            self.jobs.append(job)

        def wait(self, timeout):
            job = self.jobs.pop(0)
            self.seen.append((job.case.case_id, job.attempt))
            if self.losses.get(job.case.case_id, 0) > job.attempt:
                return [base.Done(job, lost="node n3 died", where="node n3")]
            return [base.Done(job, {"status": "ok", "time_median_s": 1e-3, "time_min_s": 1e-3, "times_s": [1e-3]})]

        def yardstick(self, device, dtype, timeout):
            return {"gemm_tflops": 1.0, "copy_bytes_per_s": 1e10}

    plan = _plan()
    once, twice = _case(plan, "dense", 64).case_id, _case(plan, SW, 64).case_id
    ex = Losing({once: 1, twice: 2})
    runner.run(plan, tmp_path / "run", scenario_text=TINY, executor=ex)
    recs = {r["case_id"]: r for r in results.read_records(tmp_path / "run")}
    assert len(recs) == len(plan.cases)  # one record per case
    assert recs[once]["status"] == "ok" and recs[once]["retries"] == 1
    assert recs[twice]["status"] == "crashed" and recs[twice]["reason"] == "lost twice: node n3 died"
    assert recs[twice]["retries"] == 1
    assert recs[_case(plan, SW, 128).case_id]["status"] == "skipped"
    assert all(r["retries"] == 0 for cid, r in recs.items() if cid not in (once, twice))
    assert ex.seen.count((once, 1)) == 1 and ex.seen.count((twice, 1)) == 1  # retried once, never more


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_ray(name, *a, **k):
        if name in ("ray", "submitit"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_ray)
    from sparsebench.measure import executors

    for name in ("ray", "slurm"):
        with pytest.raises(ScenarioError) as err:
            executors.create(base.Options(name=name), _plan())
        assert f"pip install -e '.[{name}]'" in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_bad_executor_options(tmp_path):
    from sparsebench.cli.run import register

    app = typer.Typer()
    register(app)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    for args, text in (
        (["--executor", "dask"], "--executor 'dask': unknown; expected one of: local, ray, slurm"),
        (["--address", "auto"], "--address is the Ray cluster to join; it needs --executor ray"),
        (["--slurm-partition", "gpu"], "--slurm-partition needs --executor slurm"),
        (["--parallel", "many"], "--parallel 'many': expected a positive integer or auto"),
        (["--executor", "ray", "--in-process"], "cannot be combined with --executor ray"),
    ):
        res = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "out"), *args])
        assert res.exit_code == 2, (args, res.output)
        assert text in res.output and "Traceback" not in res.output


def test_slurm_time_limits():
    from sparsebench.measure.executors.slurm import minutes

    assert [minutes(v) for v in (90, "90", "1:00:00", "30:00", "1-0", "0:01:30")] == [90, 90, 60, 30, 1440, 2]
    with pytest.raises(ScenarioError, match="slurm time"):
        minutes("an hour")
    with pytest.raises(ScenarioError, match="at least 1 minute"):
        minutes("0:00:30")


# ------------------------------------------------------------------------------------------- ray
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for every Ray test: starting one costs seconds."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_runs_the_scenario_end_to_end(tmp_path, ray_cluster, local_ids):
    from sparsebench.measure.executors.ray import RayExecutor

    out = tmp_path / "run"
    runner.run(_plan(), out, scenario_text=TINY, executor=RayExecutor())
    recs = results.read_records(out)
    assert _ids(recs) == local_ids  # the same cases as a local run: none lost, none twice
    assert {r["status"] for r in recs} == {"ok"} and {r["executor"] for r in recs} == {"ray"}
    assert all(r["host"] and r["device_name"] and r["retries"] == 0 for r in recs)
    assert all(r["gemm_tflops"] for r in recs)  # the yardstick measured by the Ray worker
    assert "cpu/fp32" in json.loads((out / results.ENVIRONMENT).read_text())["yardstick"]
    assert ray_cluster.is_initialized()  # a cluster it did not start is left as it was


@pytest.mark.slow
@pytest.mark.parametrize("times", [1, 2])
def test_a_killed_ray_worker_is_retried_once_and_killed_twice_is_crashed(tmp_path, ray_cluster, times):
    from sparsebench.measure.executors.ray import RayExecutor

    plan = _plan()
    victim = _case(plan, SW, 64)
    kill = base.TestKill(victim.case_id, str(tmp_path / "marks"), times)
    out = tmp_path / "run"
    warned: list[str] = []
    runner.run(plan, out, scenario_text=TINY, executor=RayExecutor(test_kill=kill), warn=warned.append)
    recs = results.read_records(out)
    assert len(list((tmp_path / "marks").glob("kill-*"))) == times  # the worker really died, that often
    assert _ids(recs) == sorted(c.case_id for c in plan.cases)  # one record per case
    [rec] = [r for r in recs if r["case_id"] == victim.case_id]
    assert rec["retries"] == 1
    assert any("retrying it once on another worker" in w for w in warned)
    bigger = next(r for r in recs if r["pattern_label"] == SW and r["seq_len"] == 128)
    if times == 1:
        assert rec["status"] == "ok" and bigger["status"] == "ok"
    else:
        assert rec["status"] == "crashed" and rec["reason"].startswith("lost twice: ray: ")
        assert bigger["status"] == "skipped" and bigger["reason"] == "this series ended with crashed at n=64"
    assert all(r["status"] == "ok" for r in recs if r["pattern_label"] != SW)


# ----------------------------------------------------------------------------------------- slurm
def _slurm(tasks: int = 2, test_kill=None):
    pytest.importorskip("submitit")
    from sparsebench.measure.executors.slurm import SlurmExecutor

    return SlurmExecutor({"cluster": "local", "time": 10}, tasks, test_kill=test_kill)


@pytest.mark.slow
def test_slurm_job_array_end_to_end_resume_after_a_cancelled_array_and_a_killed_task_retried(tmp_path, local_ids):
    """One test, two job arrays (each array's tasks start Python, torch and a worker: the costly part):
    the first is cancelled after two records; the resumed run's array loses a task to a SIGKILL
    (a lost job) while it holds a case, which is retried once on another task while a fresh job
    replaces the lost one."""
    out = tmp_path / "run"
    seen: list[str] = []

    def stop_after_two(rec, i, total):
        seen.append(rec["case_id"])
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C: the array's jobs are cancelled, what finished is kept

    ex = _slurm()
    with pytest.raises(runner.Interrupted):
        runner.run(_plan(), out, scenario_text=TINY, executor=ex, on_record=stop_after_two)
    assert all(job.done() for job in ex.jobs)  # cancelled, none left running
    kept = results.read_records(out)
    assert len(kept) == 2 and {r["executor"] for r in kept} == {"slurm"}
    [queue] = (out / "slurm").iterdir()
    assert sorted(p.name for p in queue.iterdir() if p.name.startswith("task-")) == ["task-0", "task-1"]  # an array

    plan = _plan()
    # a series' larger size runs only after its smaller one: the two records kept are of n = 64
    victim = _case(plan, SW, 128)
    assert victim.case_id not in {r["case_id"] for r in kept}
    ex = _slurm(test_kill=base.TestKill(victim.case_id, str(tmp_path / "marks"), 1))
    runner.run(plan, out, scenario_text=TINY, resume=True, executor=ex)
    recs = results.read_records(out)
    assert _ids(recs) == local_ids  # the rest ran, nothing twice
    assert {r["status"] for r in recs} == {"ok"} and all(r["host"] and r["device_name"] for r in recs)
    assert len(list((out / "slurm").iterdir())) == 2  # the resumed run's own queue beside the first
    # the killed task: its case retried once on another task, a fresh job in place of the lost one
    assert len(list((tmp_path / "marks").glob("kill-*"))) == 1  # the task really died
    by_id = {r["case_id"]: r for r in recs}
    assert by_id[victim.case_id]["retries"] == 1 and len(ex.jobs) == 3
    assert all(r["retries"] == 0 for cid, r in by_id.items() if cid != victim.case_id)
