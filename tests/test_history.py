"""`sparsebench history`: folders ordered by commit date, each case's time with its interval per
folder, steps between consecutive folders judged on the ratio's interval (Bonferroni over the
cases of a pair, the noise pooled over both folders). Result folders are written by hand; no
benchmark runs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from report_fixtures import ENV, record
from typer.testing import CliRunner

from sparsebench.analysis.compare import family_level
from sparsebench.analysis.history import FASTER, SLOWER, Point, Step, history_of, judge_step
from sparsebench.analysis.noise import Interval, Noise
from sparsebench.cli.app import app
from sparsebench.errors import ResultsError
from sparsebench.render.history import cell, fig_history, render, to_csv, to_markdown
from sparsebench.results.schema import SCHEMA_VERSION

SW = {"window": 256}
SIZES = (256, 512, 1024, 2048)
TIGHT = (0.99, 1.0, 1.01)  # each round's time over the case's time: rounds agree within 1%
NOISY = (0.75, 1.0, 1.3)
COMMITS = {  # name on disk -> (commit, commit date, started): on disk out of date order
    "a-third": ("3333333" + "c" * 33, "2026-03-01T12:00:00+01:00", "2026-03-02T09:00:00"),
    "b-first": ("1111111" + "a" * 33, "2026-01-10T12:00:00+01:00", "2026-01-11T09:00:00"),
    "c-second": ("2222222" + "b" * 33, "2026-02-01T12:00:00+01:00", "2026-02-02T09:00:00"),
}
STEP_UP = ("sliding_window(window=256)", "block_sparse", 1024)  # 1.5x slower from the third commit
STEP_DOWN = ("dense", "sdpa", 256)  # 0.6x (faster) from the second commit
NOISY_CASE = ("sliding_window(window=256)", "sdpa_masked", 2048)  # noisy rounds, 1.3x at the third
STEADY = ("dense", "sdpa", 2048)  # identical rounds (no spread of its own), 1.15x at the third


def rounds(position: int, scenario: str = "synthetic") -> list[dict]:
    """Three rounds of 12 cases for the folder at ``position`` (0, 1, 2) in time."""
    out = []
    for n in SIZES:
        for pattern, backend, params, t in (
            ("dense", "sdpa", {}, 2e-5 + 1.5e-9 * n * n),
            ("sliding_window", "block_sparse", SW, 3e-5 + 1e-6 * n),
            ("sliding_window", "sdpa_masked", SW, 2.6e-5 + 2e-9 * n * n),
        ):
            label = pattern if not params else "sliding_window(window=256)"
            case = (label, backend, n)
            # each folder measures every case a little differently (+-3%), as two runs do
            scale, spread = 1.0 + 0.03 * ((SIZES.index(n) + len(backend) + position) % 3 - 1), TIGHT
            if case == STEP_UP:
                scale = 1.5 if position >= 2 else 1.0
            if case == STEP_DOWN:
                scale = 0.6 if position >= 1 else 1.0
            if case == NOISY_CASE:
                spread = NOISY
                scale = 1.3 if position >= 2 else 1.0
            if case == STEADY:
                spread = (1.0, 1.0, 1.0)
                scale = 1.15 if position >= 2 else 1.0
            for r, eps in enumerate(spread, 1):
                out.append(
                    record(pattern, backend, n, t * scale * eps, params=params, label=label, round=r, scenario=scenario)
                )
    return out


def write_folder(folder, records, commit=None, date=None, started=None, scenario="synthetic", env=None):
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = dict(env or ENV, git_commit=commit, git_commit_date=date, sparsebench_commit=None)
    (folder / "environment.json").write_text(json.dumps(env))
    meta = {"schema_version": SCHEMA_VERSION, "scenario": scenario}
    if started:
        meta["started"] = started
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hist")
    order = sorted(COMMITS, key=lambda name: COMMITS[name][1])
    out = []
    for name in sorted(COMMITS):  # the order on disk, and on the command line
        commit, date, started = COMMITS[name]
        switches = {"SPARSEBENCH_TEST_SLOWDOWN": "1.5"} if name == "a-third" else {}
        env = {**ENV, "switches": switches}
        out.append(write_folder(root / name, rounds(order.index(name)), commit, date, started, env=env))
    return out


@pytest.fixture(scope="module")
def hist(folders):
    return history_of(folders, 0.10)


def _step(h, case):
    return [s for s in h.steps if (s.key[0], s.key[1], s.key[CASE_SEQ]) == case]


CASE_SEQ = 9  # seq_len's place in CASE_KEY


def invoke(*args):
    return CliRunner().invoke(app, ["history", *map(str, args)])


# -- order ---------------------------------------------------------------------------------------


def test_folders_go_by_commit_date_not_by_name(hist):
    from sparsebench.results.schema import CASE_KEY

    assert CASE_KEY[CASE_SEQ] == "seq_len"
    assert [f.label for f in hist.folders] == ["1111111", "2222222", "3333333"]
    assert [f.name for f in hist.folders] == ["b-first", "c-second", "a-third"]
    assert hist.order.startswith("ordered by commit date, then start time")
    assert len(hist.cases) == 12 and all(len(c.points) == 3 for c in hist.cases)


def test_start_time_orders_without_commit_dates_and_repeated_commits_are_numbered(tmp_path):
    recs = rounds(0)
    late = write_folder(tmp_path / "late", recs, started="2026-05-02T10:00:00")
    early = write_folder(tmp_path / "early", recs, started="2026-05-01T10:00:00")
    h = history_of([late, early], 0.10)
    assert [f.name for f in h.folders] == ["early", "late"]
    assert "by start time" in h.order and "no folder records a commit date" in h.order
    # two runs of one commit: by start time, labelled #1 and #2
    c = "abcdef0" + "0" * 33
    second = write_folder(tmp_path / "r2", recs, c, "2026-05-01T00:00:00Z", "2026-05-03T10:00:00")
    first = write_folder(tmp_path / "r1", recs, c, "2026-05-01T00:00:00Z", "2026-05-02T10:00:00")
    h = history_of([second, first], 0.10)
    assert [(f.name, f.label) for f in h.folders] == [("r1", "abcdef0#1"), ("r2", "abcdef0#2")]
    assert not h.steps  # the same records: nothing changed
    # a folder without a commit date goes by its start time among the others, and the order says so
    h = history_of([second, late, first], 0.10)
    assert [f.name for f in h.folders] == ["r1", "r2", "late"]
    assert h.order.endswith("without a commit date, by start time: late")


# -- steps ---------------------------------------------------------------------------------------


def test_the_step_is_found_at_the_commit_where_it_appeared(hist):
    (up,) = _step(hist, STEP_UP)
    assert up.direction == SLOWER and up.index == 2 and hist.folders[up.index].label == "3333333"
    assert up.ratio == pytest.approx(1.5, rel=1e-9)
    assert 1.10 < up.interval.low < 1.5 < up.interval.high
    assert up.interval.level == pytest.approx(family_level(12)) == pytest.approx(1 - 0.05 / 12)
    (down,) = _step(hist, STEP_DOWN)
    assert down.direction == FASTER and down.index == 1 and down.ratio == pytest.approx(0.6)
    assert len(hist.steps) == 2
    assert hist.compared == (12, 12)


def test_a_noisy_case_is_not_a_step(hist):
    noisy = next(c for c in hist.cases if (c.key[0], c.key[1], c.key[CASE_SEQ]) == NOISY_CASE)
    assert noisy.points[2].time / noisy.points[1].time == pytest.approx(1.3)  # beyond the threshold...
    assert not _step(hist, NOISY_CASE)  # ...but not beyond the noise
    iv = noisy.points[2].interval
    assert iv.high / noisy.points[2].time > 1.15  # its own interval is wide


def test_a_case_without_spread_of_its_own_takes_the_folders_noise(hist):
    """Three identical rounds do not make a 1.15x change certain: the noise pooled over the two
    folders' cases stands in for the case's own."""
    steady = next(c for c in hist.cases if (c.key[0], c.key[1], c.key[CASE_SEQ]) == STEADY)
    assert steady.points[2].time / steady.points[1].time == pytest.approx(1.15)
    assert steady.points[1].interval.high > steady.points[1].time * 1.02  # the folder's noise, not zero
    assert not _step(hist, STEADY)


def test_the_threshold_decides(folders):
    h = history_of(folders, 0.60)
    assert not h.steps  # 1.5x is within 60%; 0.6x is within 1/1.6


def test_judge_step_uses_the_interval_not_the_ratio():
    def rec(t, spread):
        return {"status": "ok", "time_median_s": t, "round_medians_s": [t * s for s in spread]}

    tight = [rec(1.0, TIGHT), rec(1.2, TIGHT)]
    found = judge_step(*tight, Noise.of(tight), 0.10, 0.95)
    assert found and found[0] == SLOWER and found[1] == pytest.approx(1.2)
    assert judge_step(*tight, Noise.of(tight), 0.25, 0.95) is None  # within the threshold
    noisy = [rec(1.0, NOISY), rec(1.2, NOISY)]
    assert judge_step(*noisy, Noise.of(noisy), 0.10, 0.95) is None  # within the noise
    assert judge_step(rec(1.0, TIGHT), {"status": "oom"}, Noise.of(tight), 0.10, 0.95) is None


# -- output --------------------------------------------------------------------------------------


def test_table_markdown_json_csv_show_the_step(hist):
    line = "sliding_window(window=256) · block_sparse, n=1024: 1.50x ["
    table = render(hist, "table")
    assert "▲ 1.50x" in table and "▼ 0.60x" in table and line in table
    assert "slower at 3333333 (2026-03-01), after 2222222" in table
    assert "SPARSEBENCH_TEST_SLOWDOWN" in table  # the environments differ: a warning
    md = to_markdown(hist)
    assert line in md and "| sliding_window(window=256) · block_sparse, n=1024 |" in md
    assert "| case | 1111111 | 2222222 | 3333333 |" in md
    data = json.loads(render(hist, "json"))
    assert [f["label"] for f in data["folders"]] == ["1111111", "2222222", "3333333"]
    assert [(c["at"], c["cases"]) for c in data["compared"]] == [("2222222", 12), ("3333333", 12)]
    assert all(0.02 < c["noise_sd"] < 0.5 for c in data["compared"])  # pooled: the noisy case lifts it
    assert "12 cases, noise ±" in table
    assert {(s["case"], s["direction"], s["at"]) for s in data["steps"]} == {
        ("sliding_window(window=256) · block_sparse, n=1024", "slower", "3333333"),
        ("dense · sdpa, n=256", "faster", "2222222"),
    }
    rows = list(csv.DictReader(io.StringIO(to_csv(hist))))
    assert len(rows) == 12 * 3
    stepped = [r for r in rows if r["step"]]
    assert {(r["case"], r["folder"], r["step"]) for r in stepped} == {
        ("sliding_window(window=256) · block_sparse, n=1024", "3333333", "slower"),
        ("dense · sdpa, n=256", "2222222", "faster"),
    }


def test_cells():
    p = Point("ok", 0.0123, Interval(0.0123 / 1.04, 0.0123 * 1.04, 0.95))
    assert cell(p) == "12.3 ms ±4%"
    assert cell(p, Step((), "x", 1, SLOWER, 1.318, Interval(1.2, 1.4, 0.99))) == "▲ 1.32x  12.3 ms ±4%"
    assert cell(Point("absent")) == "-" and cell(Point("oom")) == "oom"


def test_figure_marks_the_steps(hist):
    fig = fig_history(hist)
    gids = {ln.get_gid() for ax in fig.axes for ln in ax.lines}
    assert "step:sliding_window(window=256) · block_sparse, n=1024" in gids
    assert "step:dense · sdpa, n=256" in gids
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3  # a panel per pattern · backend


# -- the command ---------------------------------------------------------------------------------


def test_cli_writes_the_output_and_the_figure(folders, tmp_path):
    md, png = tmp_path / "h.md", tmp_path / "h.png"
    res = invoke(*folders, "--format", "markdown", "--output", md, "--plot", png)
    assert res.exit_code == 0, res.output
    assert "1.50x" in md.read_text() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = invoke(*folders)
    assert res.exit_code == 0, res.output
    assert "▲ 1.50x" in res.stdout


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda t, f: [f[0], t / "empty"], "no records.jsonl here"),
        (lambda t, f: [f[0], t / "nope"], "no such result folder"),
        (lambda t, f: [f[0], f[0]], "given twice"),
        (lambda t, f: [*f, "--threshold", "lots"], "--threshold"),
        (lambda t, f: [*f, "--format", "html"], "expected one of: table, markdown, json, csv"),
        (lambda t, f: [*f, "--plot", t / "h.gif"], "must end in"),
    ],
)
def test_cli_errors_are_one_line(folders, tmp_path, make, needle):
    (tmp_path / "empty").mkdir()
    res = invoke(*make(tmp_path, folders))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_folders_of_two_scenarios_are_refused(folders, tmp_path):
    other = write_folder(tmp_path / "other", rounds(0, scenario="quickstart"), scenario="quickstart")
    with pytest.raises(ResultsError, match="2 scenarios"):
        history_of([*folders, other], 0.1)
    res = invoke(folders[0], other)
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert "synthetic" in line and "quickstart" in line and str(other) in line
