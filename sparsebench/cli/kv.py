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


def _pattern_cell(row) -> str:
    """The name, then its parameters on an indented line: "sliding_window\\n  window=4096"."""
    from rich.markup import escape

    if row.pattern == "model default":
        return f"model default\n  {escape(row.label)}"
    inner = row.label[len(row.pattern) + 1 : -1] if row.label != row.pattern else ""
    return row.pattern + (f"\n  {escape(inner.replace(', ', ' '))}" if inner else "")


def _retained_cell(row) -> str:
    """Tokens per layer, or blank where the row's groups keep different counts (then each group
    line below says its own)."""
    return str(row.retained_tokens) if row.retained_tokens is not None else ""


def _group_label(spec, g) -> str:
    """'52 sliding', '10 full', '36 linear' (a state), '12 replaced' (by the row's pattern): short,
    so that a group line never wraps at 80 columns (the sizes are in the title and the notes)."""
    from sparsebench.kv.config import SHORT

    return f"  {g.layers} " + ("replaced" if g.replaced else SHORT[g.type])


def _add_group_rows(table, spec, row, with_budget: bool, kvcache) -> None:
    """One line per group of identical layers under a row whose layers differ (a uniform model's
    row is its one group)."""
    if len(row.groups) < 2:
        return
    for g in row.groups:
        kept = "state" if g.retained_tokens is None else str(g.retained_tokens)
        size = "not counted" if g.bytes is None else kvcache.format_bytes(g.bytes)
        table.add_row(_group_label(spec, g), kept, size, "", *([""] * (2 if with_budget else 0)))


def register(app: typer.Typer) -> None:
    @app.command("kv")
    def kv(
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Model preset (listed below)."),
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
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    table.add_column("pattern", overflow="fold")
    table.add_column("retained", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("vs dense", justify="right", no_wrap=True)
    if limit is not None:
        table.add_column("max context", justify="right", no_wrap=True)
        table.add_column("max batch", justify="right", no_wrap=True)
    for r in rows:
        cells = [_pattern_cell(r), _retained_cell(r), kvcache.format_bytes(r.bytes)]
        cells.append(f"{100 * r.vs_dense:.1f}%" if r.vs_dense is not None else "-")
        if limit is not None:
            cells += [_fmt_context(r, kvcache), str(r.max_batch)]
        table.add_row(*cells)
        _add_group_rows(table, spec, r, limit is not None, kvcache)
    out = console()
    out.print(table)
    for note in notes:
        out.print(f"note: {note}")
