"""`sparsebench merge` (issue 22): result folders from different machines combined into one, hardware
(host, device_name) a dimension, the same case on the same hardware refused in one line; `compare
--by device` lines up the same cases across devices; summary.md warns where a series mixes hardware."""

from __future__ import annotations

import json

import pytest
import typer
from report_fixtures import ENV, make_records, write_result
from typer.testing import CliRunner

from sparsebench.analysis.compare import compare_by
from sparsebench.cli.merge import register as register_merge
from sparsebench.cli.report import register as register_report
from sparsebench.errors import ResultsError
from sparsebench.render.summary import mixed_hardware_lines
from sparsebench.results import folder as results

SW = "sliding_window(window=256)"


def _on(records, host, name, scale=1.0):
    out = []
    for r in records:
        r = dict(r, host=host, device_name=name)
        if r.get("time_median_s"):
            r.update(time_median_s=r["time_median_s"] * scale, time_min_s=r["time_min_s"] * scale)
        out.append(r)
    return out


def _app():
    app = typer.Typer()
    register_merge(app)
    register_report(app)
    return app


def _two(tmp_path):
    a = write_result(
        tmp_path / "a", _on(make_records(), "node-a", "NVIDIA H100 80GB HBM3"), dict(ENV, hostname="node-a")
    )
    b = write_result(
        tmp_path / "b", _on(make_records(), "node-b", "NVIDIA H200", 0.5), dict(ENV, hostname="node-b", gpu="H200")
    )
    return a, b


def test_two_folders_merge_with_hardware_as_a_dimension(tmp_path):
    a, b = _two(tmp_path)
    res = CliRunner().invoke(_app(), ["merge", str(a), str(b), "--output", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    recs = results.read_records(tmp_path / "m")
    assert len(recs) == 2 * len(make_records())
    assert {(r["host"], r["device_name"]) for r in recs} == {
        ("node-a", "NVIDIA H100 80GB HBM3"),
        ("node-b", "NVIDIA H200"),
    }
    env = json.loads((tmp_path / "m" / results.ENVIRONMENT).read_text())
    assert set(env["hosts"]) == {"node-a", "node-b"} and env["hosts"]["node-b"]["gpu"] == "H200"
    assert "gpu" not in env  # the hosts differ on it: only what they share is top-level
    meta = json.loads((tmp_path / "m" / results.META).read_text())
    assert [m["folder"] for m in meta["merged_from"]] == [str(a), str(b)]
    assert "compare" in res.output and "--by device" in res.output  # the same cases on two GPUs
    # the speedup of each row is against the dense baseline of its own hardware
    df = results.load_frame(tmp_path / "m")
    ok = df[(df["pattern_label"] == SW) & (df["status"] == "ok")]
    by_host = {h: g["speedup"].round(9).tolist() for h, g in ok.groupby("host")}
    assert by_host["node-a"] == by_host["node-b"]  # both machines 2x apart on every case, so the same ratios


def test_a_duplicate_is_refused_in_one_line(tmp_path):
    a, _ = _two(tmp_path)
    again = write_result(tmp_path / "again", results.read_records(a), dict(ENV, hostname="node-a"))
    res = CliRunner().invoke(_app(), ["merge", str(a), str(again), "--output", str(tmp_path / "m")])
    assert res.exit_code == 2, res.output
    [line] = [x for x in res.output.splitlines() if x.strip()]
    assert "is also in" in line and "merge refuses duplicates" in line and "node-a" in line
    assert not (tmp_path / "m").exists()
    with pytest.raises(ResultsError, match="at least two"):
        results.merge_folders([a], tmp_path / "m2")


def test_folders_of_different_cases_on_one_machine_merge_with_the_usual_reports(tmp_path):
    recs = _on(make_records(), "node-a", "AMD EPYC")
    a = write_result(tmp_path / "a", [r for r in recs if r["seq_len"] <= 1024])
    b = write_result(tmp_path / "b", [r for r in recs if r["seq_len"] > 1024])
    res = CliRunner().invoke(_app(), ["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "summary.md").is_file() and (tmp_path / "m" / "results.csv").is_file()
    assert len(results.read_records(tmp_path / "m")) == len(recs)


def test_compare_by_device_lines_up_the_same_cases_across_gpus(tmp_path):
    a, b = _two(tmp_path)
    results.merge_folders([a, b], tmp_path / "m")
    by = compare_by(results.load_frame(tmp_path / "m"), by="device")
    assert by.values == ("NVIDIA H100 80GB HBM3 @ node-a", "NVIDIA H200 @ node-b")
    key, cells = next((k, c) for k, c in by.rows if k[0] == SW and k[-1] == 8192)
    (_, t_a, s_a), (_, t_b, s_b) = cells
    assert s_a == s_b == "ok" and t_b == pytest.approx(t_a * 0.5)
    res = CliRunner().invoke(_app(), ["compare", str(tmp_path / "m"), "--by", "device"])
    assert res.exit_code == 0, res.output
    assert "NVIDIA H200 @ node-b" in res.output


def test_summary_warns_where_a_series_mixes_hardware():
    recs = _on(make_records(), "node-a", "NVIDIA H100")
    assert mixed_hardware_lines(recs) == []
    mixed = [
        dict(r, device_name="NVIDIA A100") if r["pattern_label"] == SW and r["seq_len"] == 8192 else r for r in recs
    ]
    lines = mixed_hardware_lines(mixed)
    assert any(
        f"{SW} · block_sparse ran on more than one kind of hardware (NVIDIA A100, NVIDIA H100)" in x for x in lines
    )
    elsewhere = [dict(r, device_name="NVIDIA A100") if r["pattern_label"] == SW else r for r in recs]
    assert any("its dense baseline on NVIDIA H100" in x for x in mixed_hardware_lines(elsewhere))
