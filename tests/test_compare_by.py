"""`compare RUN --by backend` (issue 17, finding 6): the dense baseline stands beside every
pattern, so that a sparse pattern, which never runs on sdpa, is seen against dense."""

from __future__ import annotations

import json

import pytest
import typer
from report_fixtures import SIZES, dense_time, make_records, write_result
from typer.testing import CliRunner

from sparsebench.analysis.compare import BASELINE_COLUMN, SAME_AS_BASELINE, compare_by
from sparsebench.cli.report import register
from sparsebench.render.compare import to_csv, to_json, to_markdown
from sparsebench.results.folder import frame

SW = "sliding_window(window=256)"


def _cells(by, pattern, n):
    return next({v: (t, s) for v, t, s in cells} for key, cells in by.rows if key[0] == pattern and key[-1] == n)


def test_every_sparse_row_has_the_dense_baseline_at_its_n():
    by = compare_by(frame(make_records()), by="backend")
    assert by.values[0] == BASELINE_COLUMN == "dense · sdpa" and by.values[1] == "sdpa"
    for n in SIZES:
        sw = _cells(by, SW, n)
        assert sw["sdpa"] == (None, "")  # sliding_window never ran on sdpa ...
        assert sw[BASELINE_COLUMN] == (pytest.approx(dense_time(n)), "ok")  # ... but dense did, at this n
        # dense's own rows: the baseline is their sdpa cell, not repeated
        assert _cells(by, "dense", n)[BASELINE_COLUMN] == (None, SAME_AS_BASELINE)
    md = to_markdown(by)
    assert "| pattern | n | dense · sdpa | sdpa | block_sparse | flex | naive | sdpa_masked |" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {SW} | 8192 |"))
    # the baseline's time, relative to the row's fastest (flex here), not a "-"
    assert row.split(" | ")[2].endswith("x)") and "dense baseline" in md
    assert json.loads(to_json(by))["rows"][-1][BASELINE_COLUMN]["status"] == "ok"
    assert to_csv(by).splitlines()[0] == "pattern_label,seq_len,dense · sdpa,sdpa,block_sparse,flex,naive,sdpa_masked"


def test_a_sparse_pattern_on_one_backend_still_gets_a_row():
    """One sparse backend and the baseline are two things to put side by side."""
    recs = make_records(where=lambda r: r["backend"] in ("sdpa", "block_sparse"))
    by = compare_by(frame(recs), by="backend")
    assert by.values == (BASELINE_COLUMN, "sdpa", "block_sparse")
    assert {key[0] for key, _ in by.rows} == {SW}  # dense has sdpa only: nothing to compare on its rows
    assert _cells(by, SW, 4096)[BASELINE_COLUMN][1] == "ok"


def test_without_a_baseline_no_column():
    by = compare_by(frame(make_records(where=lambda r: r["backend"] != "sdpa")), by="backend")
    assert BASELINE_COLUMN not in by.values and "dense baseline" not in to_markdown(by)


def test_cli(tmp_path):
    app = typer.Typer()
    register(app)
    folder = write_result(tmp_path / "run", make_records())
    res = CliRunner().invoke(app, ["compare", str(folder), "--by", "backend"])
    assert res.exit_code == 0, res.output
    line = next(line for line in res.stdout.splitlines() if line.strip().startswith(SW) and " 8192 " in line)
    assert line.split()[2] != "-"  # the dense · sdpa column, after the pattern and n
