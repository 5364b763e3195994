"""The command line. Thin commands; the only place a SparsebenchError becomes one red line on
stderr and an exit code. Heavy imports (torch, pandas, matplotlib) happen inside commands."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from sparsebench.errors import SparsebenchError

app = typer.Typer(
    name="sparsebench",
    help="Benchmark dense against sparse attention: time, peak memory, KV cache and correctness "
    "across sequence lengths, patterns and backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # logs and pipes: wide enough for the results table
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def fail(exc: SparsebenchError) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def guarded():
    try:
        yield
    except SparsebenchError as exc:
        fail(exc)


def warn(msg: str) -> None:
    _console(stderr=True).print(f"[yellow]warning:[/] {msg}", soft_wrap=True)


PLUGIN_HELP = "Python file registering extra patterns or backends (repeatable; runs its code)."


def load_plugins(paths) -> None:
    if paths:
        from sparsebench import plugins

        plugins.load(paths)


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """-p key=value pairs; values parsed as YAML scalars or lists (window=256, g=[0,7])."""
    import yaml

    from sparsebench.errors import ScenarioError

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ScenarioError(f"-p {item!r}: expected key=value")
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ScenarioError(f"-p {item!r}: value is not a YAML scalar or list") from None
    return out


# --------------------------------------------------------------------------------------- run
@app.command()
def run(
    scenario: Optional[Path] = typer.Argument(None, help="Scenario YAML. Omitted: the built-in quickstart."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Result folder (default results/<timestamp>-<name>)."),
    results_root: Path = typer.Option(Path("results"), "--results-root", help="Where default result folders go."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run in this result folder."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the plots (records, tables and summary still written)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run cases in this process instead of an isolated worker."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Skip cases whose estimate exceeds this (e.g. 8GiB)."),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP, metavar="FILE.py"),
) -> None:
    """Run a scenario: every case timed, memory-measured and checked against dense attention.

    Records are appended to RESULT/records.jsonl as each case ends; results.csv, summary.md, plots/ and report.html follow. The last line printed is the result folder."""
    with guarded():
        load_plugins(plugin)
        _run(scenario, output, results_root, resume, no_plots, in_process, max_memory)


def _run(scenario, output, results_root, resume, no_plots, in_process, max_memory) -> None:
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sparsebench import scenario as sc_mod
    from sparsebench.render import summary as report
    from sparsebench.measure import runner
    from sparsebench.results.folder import merge_rounds
    from sparsebench.errors import ScenarioError

    if resume is not None:
        if scenario is not None or output is not None:
            raise ScenarioError("--resume takes the scenario and folder from RESULT; give no SCENARIO or --output")
        src = resume / "scenario.yaml"
        if not resume.is_dir():
            raise ScenarioError(f"{resume}: no such folder to resume")
        if not src.is_file():
            raise ScenarioError(f"{resume}: no scenario.yaml here; not a sparsebench result folder")
        text = sc_mod.read_text(src)
        sc, source = sc_mod.parse(text, str(src)), str(src)
        folder = resume
    else:
        sc, text, source = sc_mod.load(scenario)
        folder = output or runner.default_folder(results_root, sc.name)
    for line in sc.warnings:
        warn(line)
    plan = sc_mod.expand(sc, source)
    if max_memory:
        try:
            budget = sc_mod.parse_size(max_memory)
        except ValueError as exc:
            raise ScenarioError(f"--max-memory: {exc}") from None
        plan = replace(plan, cases=[replace(c, memory_budget=min(budget, c.memory_budget or budget)) for c in plan.cases])
    out = _console()
    for dev, why in plan.skipped_devices.items():
        warn(f"{why}; its cases are skipped")
    rounds = f" x {sc.rounds} rounds" if sc.rounds > 1 else ""
    out.print(f"[bold]{sc.name}[/]: {len(plan.cases)} cases{rounds}{' (resuming)' if resume else ''}  [dim]{source}[/]")
    if not plan.cases:
        raise ScenarioError(f"{source}: no case can run here (every device is absent)")
    if any(c.device == "cpu" for c in plan.cases):
        from sparsebench.backends.block_sparse import native as _native

        if _native.enabled() and not _native.built():
            out.print("[dim]First run here: the first case builds the native CPU kernels (once, about a minute).[/]")

    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=out, transient=True,
    )
    task = progress.add_task("starting", total=len(plan.cases) * sc.rounds)

    def on_start(case, i, total):
        where = f" (round {i // len(plan.cases) + 1}/{sc.rounds})" if sc.rounds > 1 else ""
        progress.update(task, completed=i, description=f"{case.pattern_label} {case.backend} n={case.seq_len}{where}")

    def on_record(rec, i, total):
        progress.update(task, completed=i + 1)
        if rec["status"] not in ("ok", "skipped"):
            progress.console.print(f"[red]{rec['status']}[/] {rec['pattern_label']} {rec['backend']} n={rec['seq_len']}: {rec['reason']}")

    extra: list = []

    def finalize(folder, records):
        progress.stop()
        report.finalize(folder, records, plots=not no_plots, warn=warn, renderables=extra)

    prev = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with progress:
            result = runner.run(plan, folder, scenario_text=text, isolate=not in_process, resume=resume is not None,
                                on_start=on_start, on_record=on_record, warn=warn, finalize=finalize)
    except runner.Interrupted as exc:
        out.print(report.rich_table(merge_rounds(_read(folder)), title="finished before the interrupt"))
        out.print(f"[yellow]{exc}[/]")
        out.print(str(folder))
        raise typer.Exit(130)
    finally:
        signal.signal(signal.SIGTERM, prev)
    out.print(report.rich_table(result.records, title=f"{sc.name}: {len(result.records)} cases"))
    for r in extra:
        out.print(r)
    out.print(str(result.folder))


def _read(folder):
    from sparsebench.results.folder import read_records

    try:
        return read_records(folder)
    except SparsebenchError:
        return []


def _sigterm(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------- validate
@app.command()
def validate(
    scenario: Path = typer.Argument(..., help="Scenario YAML to check."),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP, metavar="FILE.py"),
) -> None:
    """Check a scenario file and print how many cases it expands to."""
    with guarded():
        load_plugins(plugin)
        from sparsebench import scenario as sc_mod

        sc, _, source = sc_mod.load(scenario)
        for line in sc.warnings:
            warn(line)
        plan = sc_mod.expand(sc, source)
        for dev, why in plan.skipped_devices.items():
            warn(f"{why}; its cases would be skipped")
        _console().print(f"{source}: ok, {_case_count_text(plan)}" + (f", each measured in {sc.rounds} rounds" if sc.rounds > 1 else ""))


def _plural(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _case_count_text(plan) -> str:
    """'36 cases (4 sequence lengths x 9 pattern-backend pairs; sdpa runs only dense, the
    baseline)': how the count multiplies out."""
    cases = plan.cases
    if not cases and plan.skipped_devices:
        return f"0 cases on this machine (absent: {', '.join(sorted(plan.skipped_devices))})"
    lengths = {c.seq_len for c in cases}
    pairs = {(c.pattern_label, c.backend) for c in cases}
    setups = {(c.device, c.dtype, c.mode) for c in cases}
    parts = [_plural(len(lengths), "sequence length"), _plural(len(pairs), "pattern-backend pair")]
    if len(setups) > 1:
        parts.append(_plural(len(setups), "device-dtype-mode combination"))
    text = f"{_plural(len(cases), 'case')} ({' x '.join(parts)}"
    if len(lengths) * len(pairs) * len(setups) != len(cases):
        text += "; not every combination applies"
    dense_only = sorted({c.backend for c in cases} - {c.backend for c in cases if c.pattern != "dense"})
    if dense_only and any(c.pattern != "dense" for c in cases):
        text += f"; {', '.join(dense_only)} {'runs' if len(dense_only) == 1 else 'run'} only dense, the baseline"
    return text + ")"


# -------------------------------------------------------------------------------------- list
@app.command("list")
def list_cmd(plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP, metavar="FILE.py")) -> None:
    """Patterns (with their parameters) and backends (available here, or why not)."""
    with guarded():
        load_plugins(plugin)
        import dataclasses

        from rich.table import Table

        from sparsebench.backends.base import BACKENDS
        from sparsebench.patterns.base import PATTERNS

        t = Table(title="patterns", header_style="bold")
        for c in ("pattern", "allowed (i, j)", "parameters"):
            t.add_column(c, overflow="fold")
        for name, cls in PATTERNS.items():
            params = []
            for f in cls.parameters():
                default = "" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING else (
                    f" = {f.default if f.default is not dataclasses.MISSING else f.default_factory()}"
                )
                params.append(f"{f.name}{default}: {f.metadata.get('help', '')}")
            t.add_row(name, cls.rule, "\n".join(params) or "-")
        b = Table(title="backends", header_style="bold")
        for c in ("backend", "what", "here"):
            b.add_column(c, overflow="fold")
        for name, cls in BACKENDS.items():
            why = cls.unavailable()
            b.add_row(name, cls.summary, "[green]available[/]" if why is None else f"[yellow]{why}[/]")
        out = _console()
        out.print(t)
        out.print(b)


# -------------------------------------------------------------------------------------- show
@app.command()
def show(
    pattern: str = typer.Argument(..., help="Pattern name (see `sparsebench list`)."),
    seq_len: int = typer.Option(..., "--seq-len", "-n", help="Sequence length."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Pattern parameter key=value (repeatable).", metavar="KEY=VALUE"),
    tile: Optional[int] = typer.Option(None, "--tile", help="Also show the block layout for this tile size."),
    old_block: Optional[int] = typer.Option(None, "--block", hidden=True, help="Old name of --tile."),
    bidirectional: bool = typer.Option(False, "--bidirectional", help="Non-causal pattern (default causal)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a drawing."),
) -> None:
    """Draw a pattern's mask (small n) with keys per query, nnz, density and KV retention."""
    with guarded():
        from sparsebench.errors import ScenarioError
        from sparsebench.patterns.base import PATTERNS

        if seq_len < 1:
            raise ScenarioError(f"--seq-len must be >= 1, got {seq_len}")
        if old_block is not None:
            if tile is not None:
                raise ScenarioError("--block is the old name of --tile; give --tile only")
            warn("--block is now --tile (the tile size of the block layout); read as --tile")
            tile = old_block
        if tile is not None and tile < 1:
            raise ScenarioError(f"--tile must be >= 1, got {tile}")
        causal = not bidirectional
        pat = PATTERNS.get(pattern).from_params(parse_params(param))
        pat.check(seq_len, causal)
        kpq = pat.keys_per_query(seq_len, causal)
        nnz = int(kpq.sum())
        info: dict[str, Any] = {
            "pattern": pat.label(),
            "seq_len": seq_len,
            "causal": causal,
            "keys_per_query": kpq.tolist(),
            "nnz": nnz,
            "density": nnz / seq_len**2,
            "kv_retained": pat.kv_retained(seq_len),
        }
        layout = pat.block_layout(seq_len, tile, causal) if tile else None
        if layout is not None:
            info["block_layout"] = layout.dense().tolist()
        if as_json:
            sys.stdout.write(json.dumps(info) + "\n")
            return
        out = _console()
        out.print(f"[bold]{pat.label()}[/]  n={seq_len}  {'causal' if causal else 'bidirectional'}")
        if seq_len <= 96:
            m = pat.mask(seq_len, causal)
            for i in range(seq_len):
                out.print("".join("█" if x else "·" for x in m[i].tolist()), highlight=False)
        else:
            out.print("[dim](mask drawn for n <= 96)[/]")
        kf = kpq.double()
        out.print(
            f"keys per query: min {int(kpq.min())}, mean {float(kf.mean()):.2f}, max {int(kpq.max())}\n"
            f"nnz: {nnz}   density: {nnz / seq_len**2:.4f}   KV retained: {info['kv_retained']} of {seq_len} tokens"
        )
        if layout is not None:
            out.print(f"block layout (tile={tile}, {layout.nnz_blocks} of {layout.num_blocks**2} tiles):")
            if layout.num_blocks <= 96:
                for row in layout.dense().tolist():
                    out.print("".join("█" if x else "·" for x in row), highlight=False)


# --------------------------------------------------------------------------------------- env
@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Versions, CPU, threads, GPU and whether torch.compile has a compiler here."""
    with guarded():
        from sparsebench.measure.environment import collect

        info = collect()
        if as_json:
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
            return
        from rich.table import Table

        t = Table(show_header=False)
        t.add_column("key", style="bold")
        t.add_column("value")
        for k, v in info.items():
            t.add_row(k, "-" if v is None else str(v))
        t.add_row("torch.compile on CPU", "yes" if info.get("cxx_compiler") else "no (no C++ compiler on PATH)")
        _console().print(t)


def _register_optional() -> None:
    for mod in ("sparsebench.cli.report", "sparsebench.cli.kv"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:  # pragma: no cover
            continue
        module.register(app)


_register_optional()


def main() -> None:  # console script
    app()


if __name__ == "__main__":
    main()
