"""The typer app and what every command shares: the one place where a SparsebenchError becomes
one red line on stderr and an exit code (``guarded`` / ``fail``), warnings (``warn``), the
consoles, the ``-p KEY=VALUE`` parser and ``--plugin``. The commands live in run.py (run,
validate), inspect.py (list, show, env), report.py (plot, compare) and kv.py (kv), which import
their helpers from here; the package (``sparsebench/cli/__init__.py``, imported before this
module) adds them to ``app``, so that no module imports in a circle. Heavy imports (torch, pandas,
matplotlib) happen inside the commands, so that ``sparsebench --help`` stays instant."""

from __future__ import annotations

import contextlib
import os
from typing import Any, NoReturn

import typer

from sparsebench.errors import ScenarioError, SparsebenchError

app = typer.Typer(
    name="sparsebench",
    help="Benchmark dense against sparse attention: time, peak memory, KV cache and correctness "
    "across sequence lengths, patterns and backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ------------------------------------------------------------------------------ consoles, errors
def console(stderr: bool = False):
    """A rich console on stdout (or stderr): as wide as the terminal, or COLUMNS when set; logs
    and pipes get 160 columns, wide enough for the results table."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(stderr=stderr, highlight=False, width=160)
    return out


def fail(exc: SparsebenchError) -> NoReturn:
    """``error: <message>`` on stderr, one line, and the error's exit code."""
    from rich.markup import escape

    console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def guarded():
    """Run a command's body: a SparsebenchError raised inside ends the command through ``fail``."""
    try:
        yield
    except SparsebenchError as exc:
        fail(exc)


def warn(msg: str) -> None:
    """``warning: <message>`` on stderr; the command goes on."""
    from rich.markup import escape

    console(stderr=True).print(f"[yellow]warning:[/] {escape(msg)}", soft_wrap=True)


# ------------------------------------------------------------------------------ shared options
PLUGIN_HELP = "Python file registering extra patterns or backends (repeatable; runs its code)."


def load_plugins(paths) -> None:
    """Load the ``--plugin`` files (if any) before a command looks up patterns or backends."""
    if paths:
        from sparsebench import plugins

        plugins.load(paths)


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """Pattern parameters from ``-p key=value`` options (show, kv): each value is read as a YAML
    scalar or list (``window=256``, ``global_tokens=[0,7]``); ``key=`` is None."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScenarioError(f"-p {item!r}: expected key=value (e.g. -p window=4096)")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ScenarioError(f"-p {item!r}: the value is not a YAML scalar or list") from None
    return out


def main() -> None:  # console script
    app()
