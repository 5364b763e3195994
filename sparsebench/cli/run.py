"""``sparsebench run`` and ``sparsebench validate``: a scenario measured into a result folder, or
only checked and counted. ``register(app)`` adds the commands."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import List, Optional

import typer

from sparsebench.cli.app import PLUGIN_HELP, console, guarded, load_plugins, warn
from sparsebench.errors import SparsebenchError


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(validate)


# --------------------------------------------------------------------------------------- run
def run(
    scenario: Optional[Path] = typer.Argument(None, help="Scenario YAML. Omitted: the built-in quickstart."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Result folder (default results/<timestamp>-<name>)."
    ),
    results_root: Path = typer.Option(Path("results"), "--results-root", help="Where default result folders go."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run in this result folder."),
    no_plots: bool = typer.Option(
        False, "--no-plots", help="Skip the plots (records, tables and summary still written)."
    ),
    in_process: bool = typer.Option(
        False, "--in-process", help="Run cases in this process instead of an isolated worker."
    ),
    rounds: Optional[int] = typer.Option(
        None,
        "--rounds",
        help="Run every case this many times, each round in fresh workers (1 to 20): the scenario's "
        "rounds, overridden; the result folder's scenario.yaml says so. Fewer: a quick look; more: "
        "a steadier gate.",
    ),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory", help="Skip cases whose estimate exceeds this (e.g. 8GiB)."
    ),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP, metavar="FILE.py"),
    executor: str = typer.Option(
        "local",
        "--executor",
        help="Where the cases run: local (this machine), ray (a Ray task each) or slurm (a submitit job array).",
    ),
    parallel: Optional[str] = typer.Option(
        None,
        "--parallel",
        help="Cases at once: N or auto (local: one worker per CUDA device, 1 on a CPU; ray: as "
        "the cluster places them; slurm: array tasks, one per series up to 16).",
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="ray: the cluster to join (auto or HOST:PORT); omitted: a local cluster for the run."
    ),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="slurm: the partition."),
    slurm_account: Optional[str] = typer.Option(None, "--slurm-account", help="slurm: the account."),
    slurm_time: Optional[str] = typer.Option(None, "--slurm-time", help="slurm: each task's time limit (H:MM:SS)."),
    slurm_gpus_per_node: Optional[int] = typer.Option(None, "--slurm-gpus-per-node", help="slurm: GPUs per task."),
    slurm_cluster: Optional[str] = typer.Option(
        None, "--slurm-cluster", help="slurm (default), or local: submitit's local executor (try the path here)."
    ),
) -> None:
    """Run a scenario: every case timed, memory-measured and checked against dense attention.

    Records are appended to RESULT/records.jsonl as each case ends; results.csv, summary.md, plots/ and
    report.html follow. The last line printed is the result folder."""
    with guarded():
        load_plugins(plugin)
        slurm = {
            "partition": slurm_partition,
            "account": slurm_account,
            "time": slurm_time,
            "gpus_per_node": slurm_gpus_per_node,
            "cluster": slurm_cluster,
        }
        choice = _executor_options(executor, parallel, address, slurm, in_process)
        again = _resume_options(no_plots, in_process, max_memory, plugin, choice)
        _run(scenario, output, results_root, resume, no_plots, in_process, max_memory, again, choice, rounds)


def _executor_options(name, parallel, address, slurm, in_process):
    """The executor's options, checked (one line for a bad value; the extras are checked when it starts)."""
    from sparsebench.errors import ScenarioError
    from sparsebench.measure.executors.base import EXECUTOR_NAMES, Options, parse_parallel

    if name not in EXECUTOR_NAMES:
        raise ScenarioError(f"--executor {name!r}: unknown; expected one of: {', '.join(EXECUTOR_NAMES)}")
    if address is not None and name != "ray":
        raise ScenarioError("--address is the Ray cluster to join; it needs --executor ray")
    given = [f"--slurm-{k.replace('_', '-')}" for k, v in slurm.items() if v is not None]
    if given and name != "slurm":
        raise ScenarioError(f"{given[0]} needs --executor slurm")
    if slurm.get("cluster") not in (None, "slurm", "local", "debug"):
        raise ScenarioError(f"--slurm-cluster {slurm['cluster']!r}: expected slurm, local or debug")
    return Options(name=name, parallel=parse_parallel(parallel), address=address, slurm=slurm, isolate=not in_process)


def _resume_options(no_plots, in_process, max_memory, plugin, choice=None) -> list[str]:
    """The options of this run that a ``--resume`` of it must repeat to run the rest the same way."""
    out = [f"--plugin={p}" for p in plugin or []]
    if max_memory:
        out.append(f"--max-memory={max_memory}")
    if in_process:
        out.append("--in-process")
    if no_plots:
        out.append("--no-plots")
    if choice is not None and choice.name != "local":
        out.append(f"--executor={choice.name}")
    if choice is not None and choice.parallel is not None:
        out.append(f"--parallel={choice.parallel}")
    if choice is not None and choice.address:
        out.append(f"--address={choice.address}")
    for key, value in (choice.slurm if choice is not None else {}).items():
        if value is not None:
            out.append(f"--slurm-{key.replace('_', '-')}={value}")
    return out


def resume_command(folder: Path, options: list[str] | None = None) -> str:
    """The exact command that continues an interrupted run in ``folder``, quoted for a shell."""
    import shlex

    return shlex.join(["sparsebench", "run", "--resume", str(folder), *(options or [])])


# the statuses of a case that measured something (a wrong result was measured, and is reported)
MEASURED = ("ok", "wrong")


def nothing_measured(records: list[dict]) -> str | None:
    """Why a run measured nothing, in one line ('nothing was measured: of 4 cases, 4 skipped; 4
    for this reason, as dense · sdpa at n=1024: estimated 8.00 MiB exceeds the memory budget of
    1.00 MiB'), or None when some case measured."""
    if any(r.get("status") in MEASURED for r in records):
        return None
    if not records:
        return "nothing was measured: no case ran"
    import re
    from collections import Counter

    def why(r: dict) -> str:
        return str(r.get("reason") or r.get("status"))

    statuses = Counter(str(r.get("status")) for r in records)
    kinds = Counter(re.sub(r"\d+(?:\.\d+)?", "#", why(r)) for r in records)  # the same reason, other sizes
    kind, k = kinds.most_common(1)[0]
    first = next(r for r in records if re.sub(r"\d+(?:\.\d+)?", "#", why(r)) == kind)
    what = ", ".join(f"{v} {s}" for s, v in statuses.most_common())
    text = (
        f"nothing was measured: of {len(records)} cases, {what}; {k} for this reason, as "
        f"{first.get('pattern_label')} · {first.get('backend')} at n={first.get('seq_len')}: {why(first)}"
    )
    return text + ("" if k == len(records) else f" ({len(records) - k} for other reasons)")


def _run(scenario, output, results_root, resume, no_plots, in_process, max_memory, again, choice=None, rounds=None):
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sparsebench import scenario as sc_mod
    from sparsebench.errors import ScenarioError
    from sparsebench.measure import runner
    from sparsebench.render import summary as report
    from sparsebench.results.folder import merge_rounds

    if resume is not None:
        if scenario is not None or output is not None or rounds is not None:
            raise ScenarioError(
                "--resume takes the scenario, its rounds and the folder from RESULT; "
                "give no SCENARIO, --output or --rounds"
            )
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
        if rounds is not None:
            sc, text = sc_mod.with_rounds(text, rounds, source)
        folder = output or runner.default_folder(results_root, sc.name)
    for line in sc.warnings:
        warn(line)
    plan = sc_mod.expand(sc, source)
    if max_memory:
        try:
            budget = sc_mod.parse_size(max_memory)
        except ValueError as exc:
            raise ScenarioError(f"--max-memory: {exc}") from None
        plan = replace(
            plan, cases=[replace(c, memory_budget=min(budget, c.memory_budget or budget)) for c in plan.cases]
        )
    out = console()
    for dev, why in plan.skipped_devices.items():
        warn(f"{why}; its cases are skipped")
    in_rounds = f" x {sc.rounds} rounds" if sc.rounds > 1 else ""
    out.print(
        f"[bold]{sc.name}[/]: {len(plan.cases)} cases{in_rounds}{' (resuming)' if resume else ''}  [dim]{source}[/]"
    )
    _print_plan_notes(out, plan)
    if not plan.cases:
        raise ScenarioError(f"{source}: no case can run here (every device is absent)")
    if any(c.device == "cpu" for c in plan.cases):
        from sparsebench.backends import block_sparse

        if block_sparse.native_enabled() and not block_sparse.native_built():
            out.print("[dim]First run here: the first case builds the native CPU kernels (once, about a minute).[/]")

    from sparsebench.measure import executors
    from sparsebench.measure.executors.base import Options

    engine = executors.create(choice or Options(isolate=not in_process), plan, warn)
    if engine.name != "local" or engine.capacity != 1:
        out.print(f"[dim]executor: {engine.label()}[/]")

    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        transient=True,
    )
    task = progress.add_task("starting", total=len(plan.cases) * sc.rounds)

    def on_start(case, i, total):
        where = f" (round {i // len(plan.cases) + 1}/{sc.rounds})" if sc.rounds > 1 else ""
        progress.update(task, completed=i, description=f"{case.pattern_label} {case.backend} n={case.seq_len}{where}")

    def on_record(rec, i, total):
        progress.update(task, completed=i + 1)
        if rec["status"] not in ("ok", "skipped"):
            progress.console.print(
                f"[red]{rec['status']}[/] {rec['pattern_label']} {rec['backend']} n={rec['seq_len']}: {rec['reason']}"
            )

    extra: list = []

    def finalize(folder, records):
        progress.stop()
        report.finalize(folder, records, plots=not no_plots, warn=warn, renderables=extra)

    prev = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with progress:
            result = runner.run(
                plan,
                folder,
                scenario_text=text,
                isolate=not in_process,
                resume=resume is not None,
                executor=engine,
                on_start=on_start,
                on_record=on_record,
                warn=warn,
                finalize=finalize,
            )
    except runner.Interrupted as exc:
        out.print(report.rich_table(merge_rounds(_read(folder)), title="finished before the interrupt"))
        out.print(f"[yellow]{exc}[/]")
        out.print(f"to continue: {resume_command(folder, again)}", soft_wrap=True)
        out.print(str(folder))
        raise typer.Exit(130)
    finally:
        signal.signal(signal.SIGTERM, prev)
    out.print(report.rich_table(result.records, title=f"{sc.name}: {len(result.records)} cases"))
    for r in extra:
        out.print(r)
    out.print(str(result.folder))
    why = nothing_measured(result.records)
    if why:
        raise SparsebenchError(why)


def _print_plan_notes(out, plan) -> None:
    """What the expansion decided (a pattern's own causality, its baseline) and what it skips."""
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True, markup=False)
    skipped = plan.skipped_text()
    if skipped:
        out.print(f"note: {skipped}", soft_wrap=True, markup=False)


def _read(folder):
    from sparsebench.results.folder import read_records

    try:
        return read_records(folder)
    except SparsebenchError:
        return []


def _sigterm(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------- validate
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
        out = console()
        out.print(
            f"{source}: ok, {_case_count_text(plan)}"
            + (f", each measured in {sc.rounds} rounds" if sc.rounds > 1 else ""),
            soft_wrap=True,
            markup=False,
        )
        _print_plan_notes(out, plan)


def _plural(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _case_count_text(plan) -> str:
    """'36 cases (4 sequence lengths x 9 pattern-backend pairs; sdpa runs only dense, the
    baseline)': how the count multiplies out."""
    cases = plan.cases
    if not cases and plan.skipped_devices:
        return f"0 cases on this machine (absent: {', '.join(sorted(plan.skipped_devices))})"
    lengths = {c.seq_len for c in cases}
    pairs = {(c.pattern_label, c.backend, c.causal) for c in cases}
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
