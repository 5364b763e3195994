"""``rounds: R``: the whole scenario measured R times over, each case's time the median of its
rounds' medians; every round's record kept on disk, one merged row per case everywhere else."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest
from typer.testing import CliRunner

from sparsebench.cli.app import app
from sparsebench.results.folder import merge_rounds

TINY = """\
name: tiny-rounds
seq_lens: [64, 128]
patterns:
  - name: sliding_window
    params: {window: 16}
backends: [naive]
heads: 2
head_dim: 16
warmup: 0
repeats: 2
rounds: 3
check: {exact_max_elems: 0, sample_rows: 4}
"""


def _rec(case_id, rnd, med, status="ok", **kw):
    rec = dict(
        case_id=case_id,
        round=rnd,
        status=status,
        time_median_s=med,
        time_min_s=med * 0.9,
        time_iqr_s=0.01 * rnd,
        times_s=[med, med],
        noisy=False,
        peak_mem_bytes=100 * rnd,
        max_abs_err=1e-7 * rnd,
        probe_s=0.004,
        flops=2e9,
    )
    rec.update(kw)
    return rec


def test_merge_takes_the_median_of_round_medians():
    recs = [
        _rec("a", 1, 1.0),
        _rec("b", 1, 5.0),
        _rec("a", 2, 9.0),
        _rec("b", 2, 5.0, status="wrong"),
        _rec("a", 3, 2.0),
    ]
    merged = {r["case_id"]: r for r in merge_rounds(recs)}
    a = merged["a"]
    assert a["time_median_s"] == 2.0  # a burst in round 2 (9 s) is outvoted
    assert a["round_medians_s"] == [1.0, 9.0, 2.0] and a["rounds"] == 3 and "round" not in a
    assert a["time_min_s"] == 0.9 and len(a["times_s"]) == 6
    assert a["peak_mem_bytes"] == 300 and a["max_abs_err"] == 3e-7
    assert a["noisy"] and a["time_iqr_s"] > 1.0  # the rounds disagree: the spread of every call shows it
    assert a["tflops"] == 2e9 / 2.0 / 1e12
    assert merged["b"]["status"] == "wrong"  # a round that went wrong stands for the case
    # records without rounds pass through untouched, even with the same case_id
    plain = [dict(case_id="x", status="ok", time_median_s=1.0), dict(case_id="x", status="ok", time_median_s=2.0)]
    assert merge_rounds(plain) == plain


@pytest.mark.slow
def test_run_with_rounds_keeps_every_round_and_resumes_the_missing_ones(tmp_path):
    scen = tmp_path / "tiny.yaml"
    scen.write_text(TINY)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    assert "x 3 rounds" in res.output
    lines = (out / "records.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    cases = {r["case_id"] for r in recs}
    assert len(cases) == 4  # dense baseline + the window, two sizes
    assert sorted((r["case_id"], r["round"]) for r in recs) == sorted((c, k) for c in cases for k in (1, 2, 3))
    assert "- rounds: 3; a case's time is the median of its rounds' medians" in (out / "summary.md").read_text()
    # round 1 checks each output against dense attention; the later rounds only time the calls
    assert {r["check"] for r in recs if r["round"] == 1} == {"sampled"}
    assert {r["check"] for r in recs if r["round"] > 1} == {"none"}
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 4 and set(csv["rounds"]) == {3} and set(csv["check"]) == {"sampled"}
    assert csv["max_abs_err"].notna().all()
    for cid, row in csv.set_index("case_id").iterrows():
        meds = [r["time_median_s"] for r in recs if r["case_id"] == cid]
        assert abs(row["time_median_s"] - statistics.median(meds)) < 1e-12
    # a run cut short in its last round: resume measures only the (case, round) pairs missing
    (out / "records.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    res = CliRunner().invoke(app, ["run", "--resume", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    again = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert again[:-2] == recs[:-2]
    assert sorted((r["case_id"], r["round"]) for r in again) == sorted((r["case_id"], r["round"]) for r in recs)


def test_a_skip_or_failure_in_a_later_round_keeps_the_measured_rounds():
    """A later round's failure stands for its case (it happened), but the runner does not skip the
    larger sizes in later rounds because of it, and an old 'skipped' round is no measurement."""
    recs = [_rec("a", 1, 1.0), _rec("a", 2, 2.0, status="skipped", time_median_s=None), _rec("a", 3, 3.0)]
    (a,) = merge_rounds(recs)
    assert a["status"] == "ok" and a["time_median_s"] == 2.0 and a["rounds"] == 2
    (b,) = merge_rounds([_rec("b", 1, 1.0), _rec("b", 2, 1.0, status="timeout")])
    assert b["status"] == "timeout"
    # noisy: the spread over every call of every round, so rounds that disagree count
    calm = merge_rounds([_rec("c", 1, 1.0, times_s=[1.0, 1.0]), _rec("c", 2, 1.0, times_s=[1.0, 1.01])])[0]
    apart = merge_rounds([_rec("d", 1, 1.0, times_s=[1.0, 1.0]), _rec("d", 2, 2.0, times_s=[2.0, 2.0])])[0]
    assert not calm["noisy"] and apart["noisy"] and apart["time_iqr_s"] > 0.5


def test_rounds_flag_overrides_the_scenario_and_the_kept_scenario_says_so(tmp_path):
    scen = tmp_path / "tiny.yaml"
    scen.write_text(TINY)
    out = tmp_path / "r"
    res = CliRunner().invoke(
        app, ["run", str(scen), "--rounds", "2", "--output", str(out), "--no-plots", "--in-process"]
    )
    assert res.exit_code == 0, res.output
    assert "x 2 rounds" in res.output
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["round"] for r in recs} == {1, 2}
    kept = (out / "scenario.yaml").read_text()
    assert "rounds: 2  # sparsebench run --rounds 2 (the file: 3)\n" in kept and "rounds: 3" not in kept
    # a resume runs what the folder says, and refuses a flag that would change it
    res = CliRunner().invoke(app, ["run", "--resume", str(out), "--rounds", "4"])
    assert res.exit_code != 0 and "give no SCENARIO, --output or --rounds" in res.output
    assert "Traceback" not in res.output


def test_with_rounds_adds_the_line_or_refuses_in_one_line():
    from sparsebench.errors import ScenarioError
    from sparsebench.scenario import MAX_ROUNDS, with_rounds

    no_rounds = TINY.replace("rounds: 3\n", "")
    sc, text = with_rounds(no_rounds, 5, "tiny.yaml")
    assert sc.rounds == 5 and text.startswith(no_rounds) and text.endswith("rounds: 5  # sparsebench run --rounds 5\n")
    sc, _ = with_rounds(no_rounds.rstrip("\n"), 2, "tiny.yaml")  # a last line without its newline
    assert sc.rounds == 2
    for bad in (0, MAX_ROUNDS + 1):
        with pytest.raises(ScenarioError, match=rf"--rounds {bad}: expected 1 to {MAX_ROUNDS}"):
            with_rounds(TINY, bad, "tiny.yaml")
    flow = TINY.replace("rounds: 3\n", "rounds:\n  3\n")
    with pytest.raises(ScenarioError, match=r"--rounds: tiny.yaml:\d+ gives rounds in a form"):
        with_rounds(flow, 2, "tiny.yaml")
