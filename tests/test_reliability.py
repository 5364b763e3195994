"""Faults and bad input: crashes, kills, timeouts, interrupts and truncated files lose nothing
already measured, and every user mistake is one line with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from sparsebench.cli.app import app
from sparsebench.errors import ResultsError
from sparsebench.measure.worker import Worker
from sparsebench.results import folder as results

SLOW = """\
name: slow
seq_lens: [64, 128, 256, 512, 1024, 2048]
patterns:
  - name: sliding_window
    params: {window: 32}
backends: [naive, block_sparse]
heads: 2
head_dim: 16
warmup: 0
repeats: 40
min_time_s: 0.4
check: {exact_max_elems: 0, sample_rows: 4}
"""


@pytest.mark.slow
def test_worker_survives_a_killed_case_and_a_timeout(make_case):
    w = Worker()
    try:
        assert w.run(make_case(), 60).get("status", "ok") == "ok"
        pid = w.pid
        # a case that runs long; kill the worker with SIGKILL while it runs
        import threading

        slow = make_case(seq_len=4096, heads=8, repeats=1000, max_repeats=1000)
        threading.Timer(1.5, lambda: os.kill(pid, signal.SIGKILL)).start()
        rec = w.run(slow, 120)
        assert rec["status"] == "crashed" and "SIGKILL" in rec["reason"]
        # the next case gets a fresh worker
        assert w.run(make_case(), 60).get("status", "ok") == "ok"
        assert w.pid != pid
        rec = w.run(slow, 1.0)
        assert rec["status"] == "timeout" and "worker killed" in rec["reason"]
        assert w.run(make_case(), 60).get("status", "ok") == "ok"
    finally:
        w.close()


def _records(folder: Path) -> list[dict]:
    path = folder / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]


def _start_run(scen: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sparsebench", "run", str(scen), "--output", str(out), "--no-plots"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_records(out: Path, count: int, proc: subprocess.Popen, limit: float = 120) -> None:
    t0 = time.time()
    while len(_records(out)) < count:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < limit
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    scen = tmp_path / "slow.yaml"
    scen.write_text(SLOW)
    out = tmp_path / "r"
    proc = _start_run(scen, out)
    _wait_for_records(out, 4, proc)
    parent = psutil.Process(proc.pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()
    proc.wait(30)
    before = _records(out)
    assert len(before) >= 4
    res = CliRunner().invoke(app, ["run", "--resume", str(out), "--no-plots"])
    assert res.exit_code == 0, res.output
    after = _records(out)
    ids = [r["case_id"] for r in after]
    print(f"\nrecords before resume: {len(before)}, after: {len(after)}")
    assert len(ids) == len(set(ids)) == 6 * 3  # every case exactly once
    assert [r["case_id"] for r in after[: len(before)]] == [r["case_id"] for r in before]
    assert (out / "summary.md").is_file() and (out / "results.csv").is_file()


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_exit_130(tmp_path):
    scen = tmp_path / "slow.yaml"
    scen.write_text(SLOW)
    out = tmp_path / "r"
    proc = _start_run(scen, out)
    _wait_for_records(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert "interrupted" in output
    kept = _records(out)
    assert len(kept) >= 2
    summary = (out / "summary.md").read_text()
    assert f"cases: {len(kept)}" in summary


@pytest.mark.slow
def test_truncated_last_record_is_skipped_with_a_warning(tmp_path):
    scen = tmp_path / "t.yaml"
    scen.write_text(
        SLOW.replace("[64, 128, 256, 512, 1024, 2048]", "[64, 128]")
        .replace("repeats: 40", "repeats: 2")
        .replace("min_time_s: 0.4", "min_time_s: 0")
    )
    out = tmp_path / "r"
    assert (
        CliRunner().invoke(app, ["run", str(scen), "--output", str(out), "--no-plots", "--in-process"]).exit_code == 0
    )
    path = out / "records.jsonl"
    full = path.read_text()
    path.write_text(full + full.splitlines()[0][:40])  # a record cut short by a kill
    warnings = []
    recs = results.read_records(out, warn=warnings.append)
    assert len(recs) == len(full.splitlines()) and "truncated" in warnings[0]
    res = CliRunner().invoke(app, ["plot", str(out)])
    assert res.exit_code == 0, res.output
    # resuming drops the partial line and leaves valid JSON lines only
    res = CliRunner().invoke(app, ["run", "--resume", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    assert pd.read_json(path, lines=True).shape[0] == len(full.splitlines())


@pytest.mark.slow
def test_other_schema_version_is_refused(tmp_path):
    scen = tmp_path / "t.yaml"
    scen.write_text(
        SLOW.replace("[64, 128, 256, 512, 1024, 2048]", "[64]")
        .replace("repeats: 40", "repeats: 2")
        .replace("min_time_s: 0.4", "min_time_s: 0")
    )
    out = tmp_path / "r"
    assert (
        CliRunner().invoke(app, ["run", str(scen), "--output", str(out), "--no-plots", "--in-process"]).exit_code == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    meta["schema_version"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ResultsError, match="schema version 99"):
        results.read_records(out)
    for args in (["compare", str(out), str(out)], ["plot", str(out)], ["run", "--resume", str(out)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "schema version 99" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "args,msg",
    [
        (["compare", "/nonexistent/a", "/nonexistent/b"], "no such result folder"),
        (["plot", "/nonexistent/a"], "no such result folder"),
        (["run", "/nonexistent.yaml"], "no such scenario file"),
        (["run", "--resume", "/nonexistent"], "/nonexistent: no such folder to resume"),
        (["run", "--resume", "/"], "no scenario.yaml"),
        (["kv", "--model", "gpt2", "--context", "4k", "--budget", "24"], "size '24' has no unit"),
        (["show", "sliding_window", "--seq-len", "0", "-p", "window=2"], "--seq-len"),
        (["show", "sliding_window", "--seq-len", "9", "-p", "window"], "key=value"),
        (["kv", "--model", "llama-9", "--context", "4k"], "llama"),
        (["kv", "--model", "gpt2", "--context", "lots"], "lots"),
    ],
)
def test_bad_arguments_are_one_line(args, msg):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert len([x for x in res.output.splitlines() if x.strip()]) == 1, res.output


def test_empty_records_file(tmp_path):
    (tmp_path / "records.jsonl").write_text("")
    res = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert res.exit_code == 2 and "no records" in res.output


@pytest.mark.slow
def test_plugin_only_with_explicit_flag(tmp_path):
    plugin = tmp_path / "my_pattern.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from sparsebench.patterns.base import PATTERNS, Pattern\n"
        "@PATTERNS.register\n@dataclass(frozen=True, kw_only=True)\n"
        "class Diagonal(Pattern):\n    name = 'my_diagonal'\n    rule = 'j == i'\n"
        "    def _allowed(self, q, k, n, causal):\n        return q == k\n"
    )
    scen = tmp_path / "s.yaml"
    scen.write_text("name: p\nseq_lens: [64]\npatterns: [{name: my_diagonal}]\nbackends: [block_sparse]\n")
    res = CliRunner().invoke(app, ["validate", str(scen)])
    assert res.exit_code == 2 and "unknown pattern 'my_diagonal'" in res.output
    code = (
        "from sparsebench.cli.app import app; from typer.testing import CliRunner; import sys; "
        f"r = CliRunner().invoke(app, ['run', {str(scen)!r}, '--plugin', {str(plugin)!r}, '--output', "
        f"{str(tmp_path / 'out')!r}, '--no-plots']); print(r.output); sys.exit(r.exit_code)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    df = pd.read_json(tmp_path / "out" / "records.jsonl", lines=True)
    assert set(df.pattern) == {"dense", "my_diagonal"} and (df.status == "ok").all()
