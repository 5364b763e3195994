"""`sparsebench history DIR...`: one scenario's result folders lined up over time, as a table (or
Markdown, JSON, CSV) and a figure. The data is analysis/history.py's, the drawing
render/history.py's; pandas and matplotlib are imported inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sparsebench.cli.app import guarded, warn
from sparsebench.cli.report import _check_plot_path, _emit, _files_as_results_errors, _write_figure
from sparsebench.errors import ScenarioError


def register(app: typer.Typer) -> None:
    """Add the `history` command to ``app``."""
    app.command("history")(history)


def history(
    dirs: List[Path] = typer.Argument(
        ..., metavar="DIR...", help="Result folders of one scenario, in any order (ordered by commit date)."
    ),
    threshold: str = typer.Option(
        "10%", "--threshold", help="A step: slower or faster than this beyond the noise: 10%, 0.1 or 10."
    ),
    fmt: str = typer.Option("table", "--format", help="table, markdown, json or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result to this file."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write the figure here (.png or .svg)."),
) -> None:
    """One scenario's result folders over time: each case's time per commit, and its steps.

    Each cell is a case's median time with its 95% interval in one folder; a step is a case
    slower or faster than in the folder before, beyond --threshold and the noise."""
    with guarded(), _files_as_results_errors(""):
        from sparsebench.analysis.compare import parse_threshold
        from sparsebench.analysis.history import history_of
        from sparsebench.registry import unknown_choice
        from sparsebench.render.history import FORMATS, render, renderables

        if fmt not in FORMATS:
            raise ScenarioError(unknown_choice("format", fmt, FORMATS))
        limit = parse_threshold(threshold)
        if plot_path is not None:
            _check_plot_path(plot_path)
        h = history_of(dirs, limit, warn=warn)
        _emit(h, fmt, output, render, renderables)
        if plot_path is not None:
            _write_plot(h, plot_path)


def _write_plot(h, path: Path) -> None:
    from sparsebench.render.history import fig_history

    _write_figure(fig_history(h), path, "no case has a time: no history figure written")
