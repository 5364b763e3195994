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


def _retained_cell(row) -> str:
    """Tokens per layer ("4k"), or blank where the row's groups keep different counts (then each
    group line below says its own)."""
    from sparsebench.units import short_tokens

    return short_tokens(row.retained_tokens) if row.retained_tokens is not None else ""


def _group_entries(row, columns: int, kvcache) -> list[tuple[list[str], list[str]]]:
    """One line per group of identical layers under a row whose layers differ (a uniform model's
    row is its one group): '52 sliding', '10 full', '36 linear' (a state), '12 replaced' (by the
    row's pattern), short so that a group line never wraps at 80 columns."""
    from sparsebench.kv.config import SHORT
    from sparsebench.units import short_tokens

    if len(row.groups) < 2:
        return []
    out = []
    for g in row.groups:
        label = f"  {g.layers} " + ("replaced" if g.replaced else SHORT[g.type])
        kept = "state" if g.retained_tokens is None else short_tokens(g.retained_tokens)
        size = "not counted" if g.bytes is None else kvcache.format_bytes(g.bytes)
        out.append(([label], [kept, size] + [""] * (columns - 2)))
    return out


def register(app: typer.Typer) -> None:
    @app.command("kv")
    def kv(
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Model preset (listed above)."),
        model_file: Optional[Path] = typer.Option(
            None,
            "--model-file",
            help="A model's Hugging Face config.json (layer types, text_config, MLA read from it), "
            "or a YAML file (name, layers, heads, kv_heads, head_dim, ...).",
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

    notes = kvcache.kv_notes(spec, n, dtype)
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
                "layer_types": spec.counts(),
                "chunk": spec.chunk,
                "mla_latent": spec.latent if spec.mla else None,
                "mtp_layers_not_counted": spec.mtp_layers,
                "source": spec.source or None,
            },
            "context": n,
            "batch": batch,
            "dtype": dtype,
            "page": page,
            "budget_bytes": limit,
            "groups": [g.to_dict() for g in rows[0].groups],  # the model's own attention
            "total_bytes": rows[0].bytes,
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

    headers = ["retained\ntokens", "bytes", "vs\ndense"] + (["max\ncontext", "max\nbatch"] if limit is not None else [])
    entries = []  # (pattern lines, number cells): each row, then its groups' lines
    for r in rows:
        cells = [_retained_cell(r), kvcache.format_bytes(r.bytes)]
        cells.append(f"{100 * r.vs_dense:.1f}%" if r.vs_dense is not None else "-")
        if limit is not None:
            cells += [_fmt_context(r, kvcache), str(r.max_batch)]
        entries.append((pattern_lines(r), cells))
        entries += _group_entries(r, len(headers), kvcache)
    numbers = [cells for _, cells in entries]
    # the numeric columns as narrow as their numbers (two-line headers); the pattern column gets
    # the rest of the terminal, one parameter a line, broken only where one is longer than that
    widths = [max(len(x) for x in [*h.split("\n"), *(c[k] for c in numbers)]) for k, h in enumerate(headers)]
    out = console()
    room = out.width - (sum(widths) + 3 * len(widths))  # each column: 2 of padding, 1 of rule
    lines_of = [fit_lines(lines, max(12, room)) for lines, _ in entries]
    # the title above the table, left-aligned and wrapped at the terminal (a title centred over
    # a narrow table would be broken into short lines)
    table = Table(box=box.SIMPLE_HEAVY, pad_edge=False, show_edge=False)
    table.add_column("pattern", no_wrap=True, min_width=max(len(x) for lines in lines_of for x in lines))
    for h in headers:
        table.add_column(h, justify="right", no_wrap=True)
    for lines, cells in zip(lines_of, numbers):
        table.add_row(escape("\n".join(lines)), *cells)
    out.print(escape(title), highlight=False)
    out.print(table)
    for note in notes:
        out.print(f"note: {note}")
