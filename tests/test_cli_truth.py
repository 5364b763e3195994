"""Issue 17, finding 8 and the scenario rules: what the command line says is true. A run that
measured nothing fails; an interrupted run says how to resume; sizes read alike everywhere;
required keys get did-you-mean; `list` groups patterns by family; kv tables fit 80 columns; a
sweep skips only the lengths a parameter does not fit; a pattern that sets its own causality runs
(and says it runs) as it says."""

from __future__ import annotations

import json
import re
import shlex
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from sparsebench import scenario as sc_mod
from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError

# naive keeps these runs free of the native kernels' one-time build; tiny shapes keep them fast
TINY = """\
name: truth
seq_lens: [32, 64]
patterns:
  - name: sliding_window
    params: {window: 8}
backends: [naive]
heads: 1
head_dim: 8
warmup: 0
repeats: 1
"""


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def records(folder):
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines() if line.strip()]


def plan_of(path):
    sc, _, source = sc_mod.load(path)
    return sc_mod.expand(sc, source)


# -- 1. exit codes -------------------------------------------------------------------------------
def test_a_run_that_measured_nothing_exits_non_zero_with_one_line_why(tmp_path):
    out = tmp_path / "r"
    big = TINY.replace("[32, 64]", "[1024, 2048]").replace("heads: 1\nhead_dim: 8", "heads: 8\nhead_dim: 64")
    res = CliRunner().invoke(
        app, ["run", str(write(tmp_path, big)), "-o", str(out), "--no-plots", "--in-process", "--max-memory", "1MiB"]
    )
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    why = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(why) == 1, res.output
    assert "nothing was measured" in why[0] and "4 skipped" in why[0] and "memory budget" in why[0], why
    assert {r["status"] for r in records(out)} == {"skipped"}  # the records say so too


def test_an_interrupted_run_prints_the_exact_resume_command_that_continues_it(tmp_path, monkeypatch):
    from sparsebench.measure import worker

    calls = []
    real = worker.execute

    def interrupted_after_one(case):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case)

    monkeypatch.setattr(worker, "execute", interrupted_after_one)
    out = tmp_path / "my run"  # a folder name a shell must quote
    res = CliRunner().invoke(app, ["run", str(write(tmp_path, TINY)), "-o", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 130, res.output
    cmd = next(line for line in res.output.splitlines() if "sparsebench run --resume" in line)
    expected = shlex.join(["sparsebench", "run", "--resume", str(out), "--in-process", "--no-plots"])
    assert cmd.endswith(expected), cmd
    assert len(records(out)) == 1
    # the printed command, as printed, continues the run
    monkeypatch.setattr(worker, "execute", real)
    args = shlex.split(cmd[cmd.index("sparsebench run") :])[1:]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(records(out)) == 4 and {r["status"] for r in records(out)} == {"ok"}


# -- 2. sizes ------------------------------------------------------------------------------------
def test_seq_lens_read_k_and_m_as_kv_context_does(tmp_path):
    from sparsebench import units

    p = write(tmp_path, TINY.replace("[32, 64]", "[1k, 2K, 3072]").replace("{window: 8}", "{window: 1k}"))
    plan = plan_of(p)
    assert sorted({c.seq_len for c in plan.cases}) == [1024, 2048, 3072]
    assert [units.parse_tokens(x) for x in ("1k", "2K")] == [1024, 2048]  # kv --context's reader
    assert {c.params["window"] for c in plan.cases if c.pattern == "sliding_window"} == {1024}
    sc, _, _ = sc_mod.load(write(tmp_path, TINY.replace("[32, 64]", "{min: 1k, max: 4k}"), "r.yaml"))
    assert sc.lengths == [1024, 2048, 4096]
    with pytest.raises(ScenarioError, match=r"seq_lens.*invalid token count '2q'"):
        plan_of(write(tmp_path, TINY.replace("[32, 64]", "[2q]"), "bad.yaml"))
    shown = CliRunner().invoke(app, ["show", "sliding_window", "-n", "1k", "-p", "window=256", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["seq_len"] == 1024


# -- 3. did-you-mean for required keys -----------------------------------------------------------
@pytest.mark.parametrize(
    "old,new,key,hint",
    [
        ("backends: [naive]", "backend: [naive]", "backend", "backends"),
        ("seq_lens: [32, 64]", "seq_len: [32, 64]", "seq_len", "seq_lens"),
        ("  - name: sliding_window", "  - nmae: sliding_window", "patterns[0].nmae", "name"),
    ],
)
def test_a_misspelt_required_key_gets_did_you_mean(tmp_path, old, new, key, hint):
    p = write(tmp_path, TINY.replace(old, new))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and f"field '{key}'" in line and f"did you mean {hint!r}" in line, line


# -- 4. list groups by family ----------------------------------------------------------------------
def test_list_groups_patterns_by_family_in_a_stable_order():
    from sparsebench.patterns.base import PATTERNS

    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    names = [n for n, _ in PATTERNS.items()]
    order = []
    for line in res.output.splitlines():
        cells = [c.strip() for c in line.split("│")]
        order += [c for c in cells[:3] if c in names][:1]
    assert sorted(order) == sorted(names)
    assert order.index("sliding_window") < order.index("longformer") < order.index("strided")
    assert order.index("random") < order.index("block_local") < order.index("ds_fixed") < order.index("dense")
    ds = [i for i, n in enumerate(order) if n.startswith("ds_")]
    assert ds == list(range(ds[0], ds[0] + 5))  # one family, together
    from sparsebench.patterns.base import FAMILIES

    families = [PATTERNS.get(n).family for n in order]
    assert all(f in FAMILIES for f in families), families  # every shipped pattern names its family
    ranks = [FAMILIES.index(f) for f in families]
    assert ranks == sorted(ranks), list(zip(order, families))  # grouped, in the families' order
    again = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["list"])
    assert again.output == res.output


# -- 5. kv at 80 columns -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["--model", "llama-3.1-8b", "--context", "128k", "--budget", "24GiB"],
        ["--model", "mistral-7b", "--context", "128k", "--budget", "24GiB", "--page", "16"],
        ["--model", "gpt2", "--context", "1k", "--budget", "1GiB", "--pattern", "ds_bigbird", "-p", "block=16"],
    ],
)
def test_kv_tables_fit_80_columns_without_breaking_a_parameter(args):
    from sparsebench.cli.kv import _model
    from sparsebench.kv import planner

    res = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["kv", *args])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, res.output
    words = {w for line in lines for w in line.split()}
    doc = json.loads(CliRunner().invoke(app, ["kv", *args, "--json"]).output)
    assert doc["rows"]
    for row in doc["rows"]:
        inner = row["label"].partition("(")[2].removesuffix(")")
        for param in filter(None, inner.split(", ")):
            assert param in words, (param, res.output)  # whole, on one line
    assert "…" not in res.output  # no column cropped
    assert _model and planner  # the table is the planner's rows


def test_kv_help_says_where_the_presets_are():
    res = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["kv", "--help"])
    assert res.exit_code == 0
    text = res.output
    presets = text.index("Presets:")
    model = text.index("--model ")
    assert "llama-3.1-8b" in text[presets:model]
    help_of_model = text[model : text.index("--model-file")]
    assert "below" not in help_of_model
    assert "above" in help_of_model  # and they are above it


# -- 6. a parameter longer than some lengths -----------------------------------------------------
def test_a_window_longer_than_the_shortest_length_skips_only_those_lengths(tmp_path):
    p = write(tmp_path, TINY.replace("{window: 8}", "{window: 48}").replace("[32, 64]", "[16, 32, 64]"))
    plan = plan_of(p)
    skipped = {(c.pattern, c.seq_len): c.skip_reason for c in plan.cases if c.skip_reason}
    assert set(skipped) == {("sliding_window", 16), ("sliding_window", 32)}
    assert "larger than the sequence length 16" in skipped[("sliding_window", 16)]
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 0, res.output
    assert "2 cases skipped" in res.output and "sliding_window(window=48) at n = 16, 32" in res.output
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    got = {(r["pattern"], r["seq_len"]): (r["status"], r["reason"]) for r in records(out)}
    assert got[("sliding_window", 16)][0] == got[("sliding_window", 32)][0] == "skipped"
    assert "larger than the sequence length 32" in got[("sliding_window", 32)][1]
    assert got[("sliding_window", 64)] == ("ok", "")
    assert all(got[("dense", n)][0] == "ok" for n in (16, 32, 64))
    # one that fits none of the lengths still refuses the scenario, naming the field
    with pytest.raises(ScenarioError, match=r"patterns\[0\]\.params.*larger than the sequence length 64"):
        plan_of(write(tmp_path, TINY.replace("{window: 8}", "{window: 100}"), "none.yaml"))


# -- 7. a pattern that sets its own causality ------------------------------------------------------
DS_BIDI = {"block": 8, "attention": "bidirectional"}


def test_a_pattern_that_sets_its_own_causality_runs_as_it_says_everywhere():
    from sparsebench.backends.base import Problem
    from sparsebench.patterns.base import PATTERNS, Pattern

    pat = PATTERNS.get("ds_bigbird").from_params(DS_BIDI)
    assert pat.fixed_causality() is False and pat.causality(True) is False
    assert PATTERNS.get("ds_bigbird").from_params({"block": 8}).fixed_causality() is None
    assert Pattern.fixed_causality(pat) is None  # the base rule: follow the caller
    p = Problem(pat, 64, True, 1, 1, 8, torch.float32, torch.device("cpu"))
    assert p.causal is False
    # DeepSpeed's bidirectional layout keeps the pairs above the diagonal
    lay = pat.ds_layout(64, causal=True)
    assert bool(torch.triu(lay, 1).any())


def test_ds_bidirectional_in_a_causal_api_call_computes_deepspeeds_layout():
    import sparsebench
    from sparsebench.backends.base import masked_softmax_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    pat = sparsebench.pattern("ds_bigbird", **DS_BIDI)
    out = sparsebench.attention(q, k, v, pattern="ds_bigbird", backend="naive", causal=True, **DS_BIDI)
    want = masked_softmax_attention(q, k, v, pat.mask(64, causal=False))
    cut = masked_softmax_attention(q, k, v, pat.mask(64, causal=True))
    assert torch.allclose(out, want, atol=1e-5)
    assert not torch.allclose(out, cut, atol=1e-3)


def test_show_draws_ds_bidirectional_bidirectional_without_the_flag_and_says_why():
    res = CliRunner().invoke(app, ["show", "ds_bigbird", "-n", "32", "-p", "block=8", "-p", "attention=bidirectional"])
    assert res.exit_code == 0, res.output
    head = res.output.splitlines()[0]
    assert "bidirectional" in head and "attention=bidirectional" in head.split("n=32")[1], head
    rows = [line for line in res.output.splitlines() if set(line) <= {"█", "·"} and len(line) == 32]
    assert len(rows) == 32 and any("█" in r[i + 1 :] for i, r in enumerate(rows))  # keys after the query
    doc = json.loads(
        CliRunner()
        .invoke(app, ["show", "ds_bigbird", "-n", "32", "-p", "block=8", "-p", "attention=bidirectional", "--json"])
        .output
    )
    bidi = json.loads(
        CliRunner()
        .invoke(
            app,
            [
                "show",
                "ds_bigbird",
                "-n",
                "32",
                "-p",
                "block=8",
                "-p",
                "attention=bidirectional",
                "--json",
                "--bidirectional",
            ],
        )
        .output
    )
    assert doc["causal"] is False and doc["nnz"] == bidi["nnz"]


def test_ds_bidirectional_in_a_causal_scenario_records_the_truth_against_a_baseline_of_its_causality(tmp_path):
    p = write(
        tmp_path,
        TINY.replace(
            "  - name: sliding_window\n    params: {window: 8}",
            "  - name: ds_bigbird\n    params: " + json.dumps(DS_BIDI),
        ).replace("[32, 64]", "[32]"),
    )
    plan = plan_of(p)
    assert any("runs bidirectional (its attention=bidirectional) where the scenario is causal" in n for n in plan.notes)
    by = {(c.pattern, c.backend, c.causal) for c in plan.cases}
    assert by == {("dense", "sdpa", False), ("ds_bigbird", "naive", False)}  # the baseline it is compared with
    with_causal = write(tmp_path, p.read_text().replace("patterns:\n", "patterns:\n  - name: dense\n"), "both.yaml")
    assert {(c.pattern, c.backend, c.causal) for c in plan_of(with_causal).cases} == by | {
        ("dense", "sdpa", True),
        ("dense", "naive", True),
    }
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    recs = {(r["pattern"], r["causal"]): r for r in records(out)}
    from sparsebench.patterns.base import PATTERNS

    ds = recs[("ds_bigbird", False)]
    assert ds["status"] == "ok" and ds["max_abs_err"] < 1e-5  # checked against dense under the same mask
    assert ds["nnz"] == PATTERNS.get("ds_bigbird").from_params(DS_BIDI).nnz(32, causal=False)
    assert recs[("dense", False)]["nnz"] == 32 * 32  # its baseline is bidirectional too
    import pandas as pd

    from sparsebench.results.folder import add_derived

    df = add_derived(pd.DataFrame(records(out)))
    row = df[df["pattern"] == "ds_bigbird"].iloc[0]
    assert row["ideal_speedup"] == pytest.approx(32 * 32 / ds["nnz"])
    assert row["speedup"] == row["speedup"]  # paired with a baseline (not NaN)
    text = re.sub(r"\s+", " ", res.output)
    assert "runs bidirectional" in text


def test_decode_skips_a_pattern_that_is_bidirectional_by_its_own_parameter(tmp_path):
    p = write(
        tmp_path,
        TINY.replace(
            "  - name: sliding_window\n    params: {window: 8}",
            "  - name: ds_bigbird\n    params: " + json.dumps(DS_BIDI),
        )
        + "mode: decode\n",
    )
    plan = plan_of(p)
    ds = [c for c in plan.cases if c.pattern == "ds_bigbird"]
    assert ds and all(c.skip_reason and "decode needs causal attention" in c.skip_reason for c in ds)
