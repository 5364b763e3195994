"""``sparsebench kv``: KV-cache bytes per pattern for a model and a context, and with a budget
the longest context and the largest batch that fit. ``register(app)`` adds the command; torch
(through the patterns) is imported only when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sparsebench.cli.app import console, guarded, parse_params
from sparsebench.errors import ScenarioError


def _model(name: str | None, path: Path | None):
    from sparsebench.kv import planner as kvcache

    if (name is None) == (path is None):
        raise ScenarioError(f"give exactly one of --model NAME ({', '.join(kvcache.PRESETS)}) or --model-file FILE")
    return kvcache.load_preset(name) if name is not None else kvcache.load_model_file(path)  # type: ignore[arg-type]


def _fmt_context(row, kvcache) -> str:
    if row.context_unbounded:
        return "unbounded"
    if row.max_context == 0:
        return "none"
    from sparsebench.units import short_tokens

    return short_tokens(row.max_context)


def pattern_lines(row) -> list[str]:
    """The pattern cell, one line each: the name, then each parameter on its own indented line,
    so that a narrow terminal never breaks one ("sliding_window", "  window=4096"); the model's
    own attention as "model default", then its pattern and parameters indented."""
    name, _, inner = row.label.partition("(")
    params = [p for p in inner.removesuffix(")").split(", ") if p]  # a list value has no ", "
    if row.pattern == "model default":
        return ["model default", f"  {name}", *(f"    {p}" for p in params)]
    return [row.pattern, *(f"  {p}" for p in params)]


def fit_lines(lines: list[str], width: int) -> list[str]:
    """Lines no wider than ``width`` where they can be: a longer one is broken at its '=' or
    after a list's commas (the rest indented further), never inside a name or a number."""
    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        while len(line) > width:
            # where a line may be cut: before or after an '=', after a comma
            cuts = [i for i, ch in enumerate(line) if ch == "="] + [i + 1 for i, ch in enumerate(line) if ch in "=,"]
            cut = max((c for c in cuts if len(indent) < c <= width), default=None)
            if cut is None:
                break  # one name or number longer than the room: it stays whole
            out.append(line[:cut])
            line = indent + line[cut:]
        out.append(line)
    return out


def register(app: typer.Typer) -> None:
    @app.command("kv")
    def kv(
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Model preset (listed above)."),
        model_file: Optional[Path] = typer.Option(
            None, "--model-file", help="YAML model file (name, layers, heads, kv_heads, head_dim, ...)."
        ),
        context: str = typer.Option(..., "--context", "-n", help="Context length: 131072 or 128k."),
        batch: int = typer.Option(1, "--batch", "-b", help="Sequences in the batch."),
        dtype: str = typer.Option("fp16", "--dtype", help="Cache dtype: fp32, fp16, bf16, fp8, int8, int4."),
        pattern: Optional[str] = typer.Option(None, "--pattern", help="One pattern (default: a standard set)."),
        params: list[str] = typer.Option([], "--param", "-p", help="Pattern parameter key=value (repeatable)."),
        budget: Optional[str] = typer.Option(None, "--budget", help="Memory budget, e.g. 24GiB or 80GB."),
        page: Optional[int] = typer.Option(None, "--page", help="Paged cache: round up to pages of P tokens."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
    ) -> None:
        """KV-cache bytes per attention pattern (grouped-query attention counted by KV heads)."""
        with guarded():
            _run_kv(model, model_file, context, batch, dtype, pattern, params, budget, page, as_json)

    kv.__doc__ = (kv.__doc__ or "") + "\n\nPresets: " + ", ".join(_preset_names()) + "."


def _preset_names() -> tuple[str, ...]:
    from sparsebench.kv.planner import PRESETS

    return PRESETS


def _run_kv(model_name, model_file, context, batch, dtype, pattern, params, budget, page, as_json) -> None:
    from sparsebench import units
    from sparsebench.kv import planner as kvcache

    spec = _model(model_name, model_file)
    n = units.parse_tokens(context)
    dtype = kvcache.canonical_dtype(dtype)
    if batch < 1:
        raise ScenarioError(f"--batch must be at least 1, got {batch}")
    if page is not None and page < 1:
        raise ScenarioError(f"--page must be at least 1, got {page}")
    limit = units.parse_bytes(budget) if budget is not None else None
    if params and pattern is None:
        raise ScenarioError("-p/--param needs --pattern NAME")
    chosen = None
    if pattern is not None:
        chosen = [kvcache.make_pattern(pattern, parse_params(params))]
    rows = kvcache.kv_table(spec, n, chosen, batch=batch, dtype=dtype, page=page, budget=limit)

    notes = []
    if spec.max_context and n > spec.max_context:
        notes.append(f"context {n} is longer than the model's trained context of {spec.max_context}")
    if spec.sliding_window:
        notes.append(
            f"'model default' is the model's own attention (sliding window {spec.sliding_window}); "
            "'dense' keeps every token"
        )
    if as_json:
        doc = {
            "model": {
                "name": spec.name,
                "layers": spec.layers,
                "heads": spec.heads,
                "kv_heads": spec.kv_heads,
                "head_dim": spec.head_dim,
                "sliding_window": spec.sliding_window,
                "max_context": spec.max_context,
                "attention": spec.attention,
            },
            "context": n,
            "batch": batch,
            "dtype": dtype,
            "page": page,
            "budget_bytes": limit,
            "rows": [r.to_dict() for r in rows],
            "notes": notes,
        }
        typer.echo(json.dumps(doc, indent=2))
        return

    from rich import box
    from rich.table import Table

    title = f"KV cache: {spec.describe()}\ncontext {kvcache.format_tokens(n)}, batch {batch}, {dtype}"
    if page:
        title += f", pages of {page}"
    if limit is not None:
        title += f"\nbudget {kvcache.format_bytes(limit)}: max context at batch {batch}, max batch at context {n}"
    from rich.markup import escape

    from sparsebench.units import short_tokens

    headers = ["retained\ntokens", "bytes", "vs\ndense"] + (["max\ncontext", "max\nbatch"] if limit is not None else [])
    numbers = []
    for r in rows:
        cells = [short_tokens(r.retained_tokens), kvcache.format_bytes(r.bytes), f"{100 * r.vs_dense:.1f}%"]
        if limit is not None:
            cells += [_fmt_context(r, kvcache), str(r.max_batch)]
        numbers.append(cells)
    # the numeric columns as narrow as their numbers (two-line headers); the pattern column gets
    # the rest of the terminal, one parameter a line, broken only where one is longer than that
    widths = [max(len(x) for x in [*h.split("\n"), *(c[k] for c in numbers)]) for k, h in enumerate(headers)]
    out = console()
    room = out.width - (sum(widths) + 3 * len(widths))  # each column: 2 of padding, 1 of rule
    lines_of = [fit_lines(pattern_lines(r), max(12, room)) for r in rows]
    table = Table(title=title, box=box.SIMPLE_HEAVY, pad_edge=False, show_edge=False)
    table.add_column("pattern", no_wrap=True, min_width=max(len(x) for lines in lines_of for x in lines))
    for h in headers:
        table.add_column(h, justify="right", no_wrap=True)
    for lines, cells in zip(lines_of, numbers):
        table.add_row(escape("\n".join(lines)), *cells)
    out.print(table)
    for note in notes:
        out.print(f"note: {note}")
