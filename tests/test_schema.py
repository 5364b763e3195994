"""The record schema (sparsebench/results/schema.py): a real run writes exactly its fields, the
README lists the same ones, a folder of an older schema version is read (migrated) and a newer
one refused; environment.json has one reader, and the switches that change which kernels run are
recorded and compared."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from report_fixtures import ENV, make_records, write_result
from typer.testing import CliRunner

from sparsebench.analysis.compare import env_warnings
from sparsebench.cli.app import app
from sparsebench.errors import ResultsError
from sparsebench.results import folder as results
from sparsebench.results import schema

ROOT = Path(__file__).resolve().parents[1]

EVERY_FIELD = """\
name: every-field
seq_lens: [64]
patterns:
  - name: sliding_window
    params: {window: 16}
  - name: moba
    params: {chunk: 16, topk: 2}
backends: [naive]
mode: [forward, backward, decode]
heads: 2
head_dim: 16
warmup: 0
repeats: 2
rounds: 2
decode_tokens: 2
check: {exact_max_elems: 0, sample_rows: 4}
"""

JSON_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "list[float]": list, "object": dict}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    scen = root / "every.yaml"
    scen.write_text(EVERY_FIELD)
    out = root / "run"
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    return out


def test_a_real_run_writes_exactly_the_schema_fields(real_run):
    recs = [json.loads(line) for line in (real_run / "records.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in recs} == {"forward", "backward", "decode"} and {r["status"] for r in recs} == {"ok"}
    written = set().union(*recs)
    # select_s: a content-selected pattern's selection time, null for a pattern fixed by positions
    assert all((r["select_s"] is not None) == (r["pattern"] == "moba" and r["mode"] != "decode") for r in recs)
    assert written == set(schema.RECORD_FIELDS), (
        f"written, not in the schema: {sorted(written - set(schema.RECORD_FIELDS))}; "
        f"in the schema, never written: {sorted(set(schema.RECORD_FIELDS) - written)}"
    )
    always = {f.name for f in schema.FIELDS if f.where == schema.RECORD and f.always}
    for rec in recs:
        assert always <= set(rec), sorted(always - set(rec))
        assert rec["schema_version"] == schema.SCHEMA_VERSION
        for name, value in rec.items():
            if value is not None:
                assert isinstance(value, JSON_TYPES[schema.BY_NAME[name].type]), (name, value)
    # results.csv: the records' fields, rounds merged, and the derived columns; nothing else
    csv = pd.read_csv(real_run / "results.csv")
    extra = {f.name for f in schema.FIELDS if f.where != schema.RECORD}
    assert set(csv.columns) == (written - {"round"}) | extra


def test_a_field_the_schema_does_not_name_is_refused():
    rec = {"status": "ok", "reason": ""}
    schema.complete(rec)
    assert rec["time_median_s"] is None and "probe_s" not in rec  # null where always; absent where not
    with pytest.raises(KeyError, match="time_medain_s"):
        schema.complete({"status": "ok", "time_medain_s": 1.0})
    with pytest.raises(KeyError, match="speedup"):  # a derived column is never stored
        schema.check_names(["speedup"])


def test_the_case_key_has_defaults_and_the_series_key_follows_from_it():
    assert schema.CASE_KEY == (
        "pattern_label",
        "backend",
        "device",
        "dtype",
        "mode",
        "batch",
        "heads",
        "kv_heads",
        "head_dim",
        "seq_len",
        "causal",
        "inputs",
    )
    assert schema.SERIES_KEY == tuple(c for c in schema.CASE_KEY if c != "seq_len")
    assert set(schema.KEY_DEFAULTS) == set(schema.CASE_KEY)
    assert all(schema.BY_NAME[c].where == schema.RECORD for c in schema.CASE_KEY)
    assert results.CASE_KEY == schema.CASE_KEY and results.SCHEMA_VERSION == schema.SCHEMA_VERSION
    # a record lacking a key field (written before it joined the key) pairs under its default
    rec = {c: i for i, c in enumerate(schema.CASE_KEY) if c != "causal"}
    migrated = schema.migrate(rec, schema.SCHEMA_VERSION)
    assert migrated["causal"] == schema.KEY_DEFAULTS["causal"] and "causal" not in rec
    assert schema.case_key(rec) == schema.case_key(migrated)
    assert len({f.name for f in schema.FIELDS}) == len(schema.FIELDS)
    assert all(f.type in JSON_TYPES and f.meaning for f in schema.FIELDS)
    # a version-3 record ran on seeded random normals: it reads inputs = "random"
    old = {c: i for i, c in enumerate(schema.CASE_KEY) if c != "inputs"}
    assert schema.migrate(old, 3)["inputs"] == "random"


def _records_bullet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## What a run writes\n", 1)[1].split("\n## ", 1)[0]
    start = section.index("- `records.jsonl`")
    end = section.index("\n- ", start + 1)  # the next top-level bullet
    return section[start:end]


def test_readme_lists_the_schema_fields():
    bullet = _records_bullet()
    words = set(re.findall(r"[a-z][a-z0-9_]*", bullet))
    missing = [f.name for f in schema.FIELDS if f.name not in words]
    assert not missing, f"schema fields the README's records.jsonl bullet does not name: {missing}"
    prose = re.sub(r"`[^`]*`", " ", bullet)  # code spans (paths, calls, values) are not field names
    named = set(re.findall(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", prose))
    unknown = sorted(named - set(schema.BY_NAME))
    assert not unknown, f"fields the README names that the schema does not have: {unknown}"


# -- migration -----------------------------------------------------------------------------------


def _v1(rec: dict) -> dict:
    """A record as schema version 1 wrote it: the tile size was ``block``."""
    old = {("block" if k == "tile" else k): v for k, v in rec.items()}
    old["schema_version"] = 1
    return old


def _write_v1(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(_v1(r)) + "\n" for r in records))
    (folder / "environment.json").write_text(json.dumps(ENV))
    (folder / "meta.json").write_text(json.dumps({"schema_version": 1, "scenario": "synthetic"}))
    return folder


def test_a_version_1_folder_is_read_compared_and_plotted(tmp_path):
    old = _write_v1(tmp_path / "old", make_records())
    assert "block" in (old / "records.jsonl").read_text()
    recs = results.read_records(old)
    assert all("block" not in r and r["schema_version"] == schema.SCHEMA_VERSION for r in recs)
    assert {r["tile"] for r in recs if r["backend"] == "block_sparse"} == {64}
    new = write_result(tmp_path / "new", make_records(scale=1.5))
    res = CliRunner().invoke(app, ["compare", str(old), str(new), "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["cases"] and not out["only_base"] and not out["only_new"]  # every case pairs across versions
    assert {r["verdict"] for r in out["cases"] if r["base_status"] == "ok" == r["new_status"]} == {"slower"}
    res = CliRunner().invoke(app, ["plot", str(old)])
    assert res.exit_code == 0, res.output
    assert (old / "report.html").exists() and list((old / "plots").glob("*.png"))
    df = results.load_frame(old)
    assert "tile" in df.columns and "block" not in df.columns
    assert df[df["backend"] == "block_sparse"]["speedup"].notna().all()  # the baseline pairs as before


def test_a_version_1_folder_is_resumed(real_run, tmp_path):
    """--resume on a folder an older sparsebench began: what it measured is kept (migrated on
    reading), only the missing cases run, and every record reads back under the new names."""
    import shutil

    folder = Path(shutil.copytree(real_run, tmp_path / "v1"))
    recs = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    kept = [_v1(r) for r in recs[:-1]]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "schema_version": 1}))
    res = CliRunner().invoke(app, ["run", "--resume", str(folder), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    again = results.read_records(folder)
    assert [(r["case_id"], r["round"]) for r in again] == [(r["case_id"], r["round"]) for r in recs]
    assert all("block" not in r and "tile" in r for r in again)
    assert json.loads((folder / "records.jsonl").read_text().splitlines()[0]) == kept[0]  # the old lines stay


def test_a_newer_schema_version_is_refused_in_one_line(tmp_path):
    folder = write_result(tmp_path / "future", make_records(sizes=(256,)))
    (folder / "meta.json").write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION + 1}))
    with pytest.raises(ResultsError, match="newer than this sparsebench reads"):
        results.read_records(folder)
    res = CliRunner().invoke(app, ["plot", str(folder)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and f"schema version {schema.SCHEMA_VERSION + 1}" in lines[0], res.output
    # a record of a newer version in a folder of this one is refused too
    folder = write_result(tmp_path / "mixed", make_records(sizes=(256,)))
    with open(folder / "records.jsonl", "a") as fh:
        fh.write(json.dumps({**make_records(sizes=(512,))[0], "schema_version": 99}) + "\n")
    with pytest.raises(ResultsError, match="schema version 99"):
        results.read_records(folder)


# -- environment.json ----------------------------------------------------------------------------


def test_environment_json_has_one_reader_and_one_policy(tmp_path):
    warned: list[str] = []
    folder = write_result(tmp_path / "r", make_records(sizes=(256, 512)))
    assert results.read_environment(folder, warned.append)["cpu"] == ENV["cpu"] and not warned
    (folder / "environment.json").unlink()
    assert results.read_environment(folder, warned.append) is None and not warned  # absent: no warning
    for text in ("{not json", "[1, 2]"):
        (folder / "environment.json").write_text(text)
        assert results.read_environment(folder, warned.append) is None
        assert len(warned) == 1 and str(folder / "environment.json") in warned.pop()
    # the three readers: summary.md, report.html and compare go on without it, and say so
    from sparsebench.render.html import write_report
    from sparsebench.render.summary import summary_markdown

    recs = results.read_records(folder)
    assert "- machine: ?" in summary_markdown(folder, recs, warn=warned.append)
    assert len(warned) == 1 and "environment.json: not a JSON object" in warned.pop()
    html = write_report(folder, results.frame(recs), None, [], warn=warned.append).read_text()
    assert "environment.json could not be read" in html and len(warned) == 1 and "environment.json" in warned.pop()
    res = CliRunner().invoke(app, ["compare", str(folder), str(folder)])
    assert res.exit_code == 0, res.output
    assert "environment.json: not a JSON object" in res.output
    (folder / "environment.json").unlink()
    html = write_report(folder, results.frame(recs), None, [], warn=warned.append).read_text()
    assert "No environment.json in the result folder" in html and not warned


def test_switches_are_recorded(monkeypatch):
    from sparsebench.measure import environment

    for name in environment.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARSEBENCH_NATIVE", "0")
    monkeypatch.setenv("SPARSEBENCH_ALLOCATOR", "system")
    assert environment.switches() == {"SPARSEBENCH_NATIVE": "0", "SPARSEBENCH_ALLOCATOR": "system"}
    assert environment.collect()["switches"] == {"SPARSEBENCH_NATIVE": "0", "SPARSEBENCH_ALLOCATOR": "system"}


def test_every_kernel_switch_the_code_reads_is_recorded():
    """A variable sparsebench reads that changes which kernels run (or how they are timed) is in
    environment.SWITCHES; the plugin list only registers names, which the records carry."""
    from sparsebench.measure import environment
    from sparsebench.plugins import ENV as PLUGINS

    read = set()
    for path in (ROOT / "sparsebench").rglob("*.py"):
        read |= set(re.findall(r"[\"']((?:SPARSEBENCH|TRITON)_[A-Z_]+)[\"']", path.read_text(encoding="utf-8")))
    assert {"SPARSEBENCH_NATIVE", "SPARSEBENCH_TRITON", "SPARSEBENCH_ALLOCATOR"} <= read
    assert read - {PLUGINS} == set(environment.SWITCHES)


def test_compare_warns_when_switches_differ():
    native_off = {**ENV, "switches": {"SPARSEBENCH_NATIVE": "0"}}
    default = {**ENV, "switches": {}}
    (warning,) = env_warnings(native_off, default, "a", "b")
    assert "SPARSEBENCH_NATIVE 0 vs unset" in warning and "environments differ" in warning
    assert not list(env_warnings(native_off, dict(native_off)))
    assert not list(env_warnings(ENV, default))  # an older run did not record them: nothing to say


def test_compare_cli_warns_when_switches_differ(tmp_path):
    a = write_result(tmp_path / "a", make_records(sizes=(256, 512)), env={**ENV, "switches": {}})
    b = write_result(
        tmp_path / "b", make_records(sizes=(256, 512)), env={**ENV, "switches": {"SPARSEBENCH_TRITON": "0"}}
    )
    res = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert "SPARSEBENCH_TRITON unset vs 0" in res.output


# -- measure/: one sync, one IQR, one dtype table ------------------------------------------------


def test_measuring_has_one_sync_one_iqr_and_one_dtype_table():
    import torch

    from sparsebench import stats
    from sparsebench.measure import decode, device, harness
    from sparsebench.patterns.base import PATTERNS

    assert harness.sync is device.sync and decode.sync is device.sync
    assert harness.TORCH_DTYPES is device.TORCH_DTYPES
    assert not hasattr(decode, "_sync") and not hasattr(decode, "_iqr") and not hasattr(decode, "_DTYPES")
    times = (1.0, 1.2, 1.1, 3.0, 0.9)
    assert harness.Measurement(times).iqr == stats.iqr(times) and harness.Measurement(times).noisy
    rec = decode.measure_decode(
        PATTERNS.get("sliding_window")(window=8),
        16,
        tokens=2,
        heads=1,
        head_dim=8,
        dtype="bfloat16",
        warmup_s=0,
        min_time_s=0,
    )
    assert rec["time_iqr_s"] == stats.iqr(rec["times_s"])
    assert decode._resolve_dtype("fp16") is torch.float16
