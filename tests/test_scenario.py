"""Scenario validation: every user mistake is one ScenarioError line naming file and field;
through the CLI it is exit code 2 and no traceback."""

from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from sparsebench import scenario as sc_mod
from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError

GOOD = """\
name: t
seq_lens: [64, 128]
patterns:
  - name: sliding_window
    params: {window: 16}
backends: [block_sparse]
"""


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load_plan(path):
    sc, _, source = sc_mod.load(path)
    return sc_mod.expand(sc, source)


def test_good_scenario_expands_with_baseline(tmp_path):
    plan = load_plan(write(tmp_path, GOOD))
    pairs = {(c.pattern, c.backend, c.seq_len) for c in plan.cases}
    assert pairs == {
        ("dense", "sdpa", 64),
        ("dense", "sdpa", 128),
        ("sliding_window", "block_sparse", 64),
        ("sliding_window", "block_sparse", 128),
    }
    assert [c.seq_len for c in plan.cases] == sorted(c.seq_len for c in plan.cases)


def test_a_pattern_may_be_named_alone(tmp_path):
    # "- dense" is {name: dense}; a misspelt name still fails, naming it
    plan = load_plan(write(tmp_path, GOOD.replace("  - name: sliding_window\n    params: {window: 16}", "  - dense")))
    assert {c.pattern for c in plan.cases} == {"dense"}
    with pytest.raises(ScenarioError, match="dens"):
        load_plan(write(tmp_path, GOOD.replace("  - name: sliding_window\n    params: {window: 16}", "  - dens")))


def test_power_of_two_range(tmp_path):
    p = write(tmp_path, GOOD.replace("seq_lens: [64, 128]", "seq_lens: {min: 1000, max: 9000}"))
    sc, _, _ = sc_mod.load(p)
    assert sc.lengths == [1024, 2048, 4096, 8192]


BAD = [
    ("seq_lens: [64, 128]", "seq_lens: [64, 0]", "seq_lens", "outside"),
    ("seq_lens: [64, 128]", "seq_lens: []", "seq_lens", "at least one"),
    ("seq_lens: [64, 128]", "seq_lens: [64, 64]", "seq_lens", "repeats"),
    ("seq_lens: [64, 128]", "seq_lens: [8, 12]", "patterns[0].params", "larger than the sequence length 12"),
    ("name: t", "name: t\nbatch: 0", "batch", "greater than or equal to 1"),
    ("name: t", "name: t\nheads: many", "heads", "valid integer"),
    ("name: t", "name: t\nwarmpu: 3", "warmpu", "did you mean 'warmup'"),
    ("name: t", "name: ../../etc", "name", "letters, digits"),
    ("name: t", "name: t\ndtypes: [fp64]", "dtypes[0]", "fp32"),
    ("name: t", "name: t\nmode: sideways", "mode", "forward"),
    ("name: t", "name: t\ndevices: [tpu]", "devices[0]", "unknown device 'tpu'"),
    ("backends: [block_sparse]", "backends: [blocksparse]", "backends[0]", "did you mean 'block_sparse'"),
    ("backends: [block_sparse]", "backends: []", "backends", "at least 1"),
    ("- name: sliding_window", "- name: slidingwindow", "patterns[0].name", "unknown pattern"),
    ("params: {window: 16}", "params: {window: -3}", "patterns[0].params", "must be >= 1"),
    ("params: {window: 16}", "params: {widow: 16}", "patterns[0].params", "did you mean 'window'"),
    ("params: {window: 16}", "window: 16", "patterns[0].window", "parameters go under params (params: {window: ...})"),
    ("name: t\n", "", "name", "required field is missing"),
    ("name: t", "name: t\ntile: 128", "tile", "larger than the shortest sequence length 64"),
]


@pytest.mark.parametrize("old,new,field,msg", BAD)
def test_bad_scenarios_name_file_and_field(tmp_path, old, new, field, msg):
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ScenarioError) as info:
        load_plan(p)
    text = str(info.value)
    assert str(p) in text and f"'{field}'" in text and msg in text, text
    assert "\n" not in text


def test_line_numbers_where_known(tmp_path):
    p = write(tmp_path, GOOD.replace("params: {window: 16}", "params: {window: 500}"))
    with pytest.raises(ScenarioError, match=r"s\.yaml:5: field 'patterns\[0\]\.params'"):
        load_plan(p)


@pytest.mark.parametrize(
    "content,msg",
    [
        ("name: [unclosed", "malformed YAML"),
        ("", "empty scenario"),
        ("- just\n- a list\n", "YAML mapping"),
        (b"name: \xff\xfe", "not UTF-8"),
        (
            "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(f"b{i}: &b{i} [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n" for i in range(9)),
            "alias",
        ),
    ],
)
def test_unreadable_files(tmp_path, content, msg):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ScenarioError, match=msg):
        sc_mod.load(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ScenarioError, match="no such scenario file"):
        sc_mod.load(tmp_path / "nope.yaml")
    with pytest.raises(ScenarioError, match="is a directory"):
        sc_mod.load(tmp_path)


def test_absent_device_is_skipped_with_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    plan = load_plan(write(tmp_path, GOOD.replace("name: t", "name: t\ndevices: [cpu, cuda]")))
    assert "cuda" in plan.skipped_devices and "absent" in plan.skipped_devices["cuda"]
    assert {c.device for c in plan.cases} == {"cpu"}


def test_cli_validate_error_is_one_line_exit_2(tmp_path):
    p = write(tmp_path, GOOD.replace("window: 16", "window: 1000"))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "window" in lines[0]


def test_cli_validate_ok(tmp_path):
    res = CliRunner().invoke(app, ["validate", str(write(tmp_path, GOOD))])
    assert res.exit_code == 0, res.output
    # the count multiplies out, and says why sdpa adds fewer cases than the other backends
    assert "4 cases (2 sequence lengths x 2 pattern-backend pairs; sdpa runs only dense, the baseline)" in res.output
    one = write(
        tmp_path,
        GOOD.replace("[64, 128]", "[64]").replace("[block_sparse]", "[block_sparse]\nbaseline: false"),
        "one.yaml",
    )
    res = CliRunner().invoke(app, ["validate", str(one)])
    assert res.exit_code == 0, res.output
    assert "ok, 1 case (1 sequence length x 1 pattern-backend pair)" in res.output


def test_shipped_scenarios_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "scenarios"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"quickstart.yaml", "cpu-scaling.yaml", "patterns-tour.yaml", "gpu-scaling.yaml"}
    for f in files:
        sc, _, source = sc_mod.load(f)
        sc_mod.expand(sc, source)
    assert (root / "quickstart.yaml").read_text() == sc_mod.builtin_path().read_text()


def test_memory_budget_values():
    """limits.memory: text with a unit, or a plain integer of bytes (YAML may read 1.5e10 as a
    float); a tiny plain number is a forgotten unit, refused with the fix."""
    from sparsebench.scenario import parse_size

    assert parse_size("8GiB") == 8 * 2**30 and parse_size(2**30) == 2**30 and parse_size(1.5e10) == 15 * 10**9
    for bad, needle in (
        (16, "16 bytes is too small for a memory budget; write 16GiB"),
        ("16", "has no unit"),
        (1.5, "not a size"),
        (True, "not a size"),
    ):
        with pytest.raises(ValueError, match=needle):
            parse_size(bad)


def test_cli_validate_counts_no_case_where_every_device_is_absent(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = write(tmp_path, GOOD + "devices: [cuda]\n")
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 0, res.output
    assert "0 cases on this machine (absent: cuda)" in res.output
