"""`sparsebench plot` and `sparsebench compare`: thin commands over plots, html_report and
compare. Heavy modules (pandas, matplotlib, torch) are imported inside the command bodies so
that `sparsebench --help` stays fast; errors and warnings go through cli/app.py's handler."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from sparsebench.cli.app import console, fail, guarded, warn
from sparsebench.errors import ResultsError, ScenarioError, SparsebenchError

PLOT_FORMATS = ("png", "svg", "pdf")


def register(app: typer.Typer) -> None:
    """Add the `plot` and `compare` commands to ``app``."""
    app.command("plot")(plot)
    app.command("compare")(compare)


def plot(
    result_dir: Path = typer.Argument(..., metavar="RESULT_DIR", help="A result folder (holds records.jsonl)."),
    formats: str = typer.Option("png,svg", "--formats", help="Comma-separated: png, svg, pdf."),
) -> None:
    """Re-render the figures (into RESULT_DIR/plots) and report.html from the records."""
    with guarded(), _files_as_results_errors(result_dir):
        from sparsebench.analysis.scaling import analyze
        from sparsebench.render.html import write_report
        from sparsebench.render.plots import render_all
        from sparsebench.results.folder import load_frame

        fmts = _plot_formats(formats)
        df = load_frame(result_dir, warn=warn)
        analysis = analyze(df)
        paths = render_all(result_dir, df, formats=fmts, analysis=analysis)
        report = write_report(result_dir, df, analysis, paths, warn=warn)
    names = sorted({p.stem for p in paths})
    console().print(f"wrote {len(names)} figures ({', '.join(fmts)}) to {Path(result_dir) / 'plots'} and {report}")


def compare(
    base: Path = typer.Argument(..., metavar="BASE", help="The reference result folder (or the only one, with --by)."),
    new: Optional[Path] = typer.Argument(None, metavar="NEW", help="The result folder to judge against BASE."),
    by: Optional[str] = typer.Option(
        None,
        "--by",
        help="Put one run side by side along: backend, pattern, device, dtype, mode, causal "
        "(along backend, the dense baseline dense · sdpa beside every pattern).",
    ),
    threshold: str = typer.Option(
        "10%",
        "--threshold",
        help="A regression is a case whose whole confidence interval of new/base lies above 1 + this: 10%, 0.1 or 10.",
    ),
    metric: Optional[str] = typer.Option(
        None,
        "--metric",
        help="fast (the geometric mean of the fastest half of each case's rounds' fastest calls; the default for "
        "BASE NEW), min (the fastest call over its rounds) or median (the median of its rounds' medians; the "
        "default with --by).",
    ),
    adjust: bool = typer.Option(
        True,
        "--adjust/--no-adjust",
        help="Divide each ratio new/base by how much slower the machine ran NEW (the median of its machine-speed "
        "probes, a fixed matmul timed around every case, over BASE's); --no-adjust: the times as measured.",
    ),
    fail_on_regression: bool = typer.Option(
        False,
        "--fail-on-regression",
        help="Exit 1 when a case regressed (slower, or its quality against full attention worse: recall down by "
        "more than 0.01, rel. err up by more than 10%), or when NEW did not measure a case of BASE (a partial run).",
    ),
    fail_on_unstable: bool = typer.Option(
        False,
        "--fail-on-unstable",
        help="With --fail-on-regression: a verdict withheld because the machine's speed moved also fails.",
    ),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="With --fail-on-regression: cases of BASE missing from NEW do not fail."
    ),
    fmt: str = typer.Option("table", "--format", help="table, markdown, json or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result to this file."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write the ratio figure here (.png or .svg)."),
) -> None:
    """Compare two result folders case by case (BASE NEW), or one along a dimension (BASE --by DIM).

    Each case gets the ratio new/base of its time, adjusted for the machine's speed (its probe),
    with a confidence interval from how the cases' ratios scatter (or, under 8 cases, from its
    rounds), family-wise at 95% over all cases (Holm); "slower" or
    "faster" only when the whole interval is beyond the threshold, else "same within noise".
    Where the machine-speed probe moved by more than the threshold between the runs, the verdict
    is withheld (machine unstable), which fails the gate only with --fail-on-unstable. Where the
    runs recorded quality against full attention, each case shows its recall and rel. error in both
    beside the time, flagged worse when they moved beyond a small tolerance."""
    with guarded(), _files_as_results_errors(""):
        from sparsebench.analysis import compare as cmp_mod
        from sparsebench.render.compare import FORMATS

        cmp_mod.check_choice("format", fmt, FORMATS)
        metric = metric or ("median" if by is not None else cmp_mod.GATE_METRIC)
        cmp_mod.check_choice("metric", metric, tuple(cmp_mod.METRICS))
        limit = cmp_mod.parse_threshold(threshold)
        if new is not None and by is not None:
            raise ScenarioError("give either NEW (a second result folder) or --by DIM (one folder), not both")
        if new is None and by is None:
            raise ScenarioError(
                "compare needs NEW (a second result folder) or --by DIM to compare one run along a dimension"
            )
        if by is not None:
            if fail_on_regression or plot_path is not None:
                raise ScenarioError("--fail-on-regression and --plot need two result folders (BASE NEW)")
            from sparsebench.results.folder import load_frame

            result = cmp_mod.compare_by(load_frame(base, warn=warn), by=by, metric=metric)
        else:
            result = cmp_mod.compare_folders(base, new, threshold=limit, metric=metric, warn=warn, adjust=adjust)
        _emit(result, fmt, output)
        if plot_path is not None:
            _write_ratio_plot(result, plot_path)
    if by is None and fail_on_regression and result.gate_failed(allow_missing, fail_on_unstable):
        # exit 1: a regression, not a usage error
        fail(SparsebenchError(result.failure_message(allow_missing, fail_on_unstable)))


# ----------------------------------------------------------------------------------------------


def _emit(result, fmt: str, output: Optional[Path], render=None, renderables=None) -> None:
    """``result`` (a comparison, or a history with ``render``/``renderables`` of its own) to
    ``output`` or the terminal; its warnings to stderr where the table does not show them."""
    if render is None or renderables is None:
        from sparsebench.render.compare import render, renderables

    if fmt != "table" or output is not None:
        for w in getattr(result, "warnings", ()):
            warn(w)
    if output is not None:
        from sparsebench.results.folder import atomic_write

        atomic_write(output, render(result, fmt))
        console(stderr=True).print(f"wrote {output}")
    elif fmt == "table":
        out = console()
        for r in renderables(result):
            out.print(r)
    else:
        typer.echo(render(result, fmt), nl=False)


def _check_plot_path(path: Path) -> None:
    """A --plot file name must end in one of PLOT_FORMATS (checked before any work is done)."""
    if path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise ScenarioError(
            f"--plot {path}: the file name must end in one of: {', '.join('.' + f for f in PLOT_FORMATS)}"
        )


def _write_figure(fig, path: Path, empty: str) -> None:
    """Save ``fig`` to ``path`` and say so; where there is no figure, warn ``empty``."""
    from sparsebench.render.plots import save

    if fig is None:
        warn(empty)
        return
    save(fig, path)
    console(stderr=True).print(f"wrote {path}")


def _write_ratio_plot(result, path: Path) -> None:
    from sparsebench.render.compare import fig_ratio

    _check_plot_path(path)
    _write_figure(fig_ratio(result), path, "no common case with a ratio: no ratio plot written")


def _plot_formats(text: str) -> tuple[str, ...]:
    from sparsebench.registry import unknown_choice

    fmts = tuple(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip())
    for f in fmts:
        if f not in PLOT_FORMATS:
            raise ScenarioError(unknown_choice("plot format", f, PLOT_FORMATS))
    if not fmts:
        raise ScenarioError(f"--formats: give at least one of: {', '.join(PLOT_FORMATS)}")
    return fmts


@contextlib.contextmanager
def _files_as_results_errors(folder):
    """A file that cannot be read or written (OSError) is a ResultsError naming the file: one
    line through the error handler, not a traceback."""
    try:
        yield
    except OSError as e:
        raise ResultsError(f"{e.filename or folder}: {e.strerror or e}") from None
