"""``sparsebench list``, ``show`` and ``env``: what is registered and available here, one
pattern's mask and numbers, and the machine. ``register(app)`` adds the commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from sparsebench.cli.app import PLUGIN_HELP, console, guarded, load_plugins, parse_params, warn


def register(app: typer.Typer) -> None:
    app.command("list")(list_cmd)
    app.command()(show)
    app.command()(env)


# -------------------------------------------------------------------------------------- list
def list_cmd(
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP, metavar="FILE.py"),
) -> None:
    """Patterns by family (with their parameters) and backends (available here, or why not)."""
    with guarded():
        load_plugins(plugin)
        import dataclasses

        from rich.table import Table

        from sparsebench.backends.base import BACKENDS
        from sparsebench.patterns.base import PATTERNS, by_family

        t = Table(title="patterns, by family", header_style="bold")
        for c in ("family", "pattern", "allowed (i, j)", "parameters"):
            t.add_column(c, overflow="fold")
        for family, entries in by_family(PATTERNS.items()):
            for k, (name, cls) in enumerate(entries):
                params = []
                for f in cls.parameters():
                    default = (
                        ""
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                        else (f" = {f.default if f.default is not dataclasses.MISSING else f.default_factory()}")
                    )
                    params.append(f"{f.name}{default}: {f.metadata.get('help', '')}")
                t.add_row(
                    family if k == 0 else "",
                    name,
                    cls.rule,
                    "\n".join(params) or "-",
                    end_section=k == len(entries) - 1,
                )
        b = Table(title="backends", header_style="bold")
        for c in ("backend", "what", "here"):
            b.add_column(c, overflow="fold")
        for name, cls in BACKENDS.items():
            why = cls.unavailable()
            b.add_row(name, cls.summary, "[green]available[/]" if why is None else f"[yellow]{why}[/]")
        out = console()
        out.print(t)
        out.print(b)


# -------------------------------------------------------------------------------------- show
def show(
    pattern: str = typer.Argument(..., help="Pattern name (see `sparsebench list`)."),
    seq_len: str = typer.Option(..., "--seq-len", "-n", help="Sequence length: 4096 or 4k."),
    param: Optional[List[str]] = typer.Option(
        None, "--param", "-p", help="Pattern parameter key=value (repeatable).", metavar="KEY=VALUE"
    ),
    tile: Optional[int] = typer.Option(None, "--tile", help="Also show the block layout for this tile size."),
    old_block: Optional[int] = typer.Option(None, "--block", hidden=True, help="Old name of --tile."),
    bidirectional: bool = typer.Option(
        False,
        "--bidirectional",
        help="Non-causal pattern (default causal; a pattern whose own parameter sets its causality keeps it).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a drawing."),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP, metavar="FILE.py"),
) -> None:
    """Draw a pattern's mask (small n) with keys per query, nnz, density and KV retention."""
    with guarded():
        load_plugins(plugin)
        import torch

        from sparsebench.errors import ScenarioError
        from sparsebench.patterns.base import PATTERNS
        from sparsebench.patterns.selection import SEEDED, content_selected, seeded_selection, tile_counts
        from sparsebench.units import parse_tokens

        try:
            seq_len = parse_tokens(seq_len)  # type: ignore[assignment]
        except ScenarioError as exc:
            raise ScenarioError(f"--seq-len: {exc}") from None
        if old_block is not None:
            if tile is not None:
                raise ScenarioError("--block is the old name of --tile; give --tile only")
            warn("--block is now --tile (the tile size of the block layout); read as --tile")
            tile = old_block
        if tile is not None and tile < 1:
            raise ScenarioError(f"--tile must be >= 1, got {tile}")
        pat = PATTERNS.get(pattern).from_params(parse_params(param))
        asked = not bidirectional
        causal = pat.causality(asked)  # a pattern whose own parameter sets it runs as it says
        own = f" ({pat.causality_reason()}, where {'causal' if asked else '--bidirectional'} was asked)"
        own = own if causal != asked else ""
        pat.check(seq_len, causal)
        # a content-selected pattern has no mask of its own: one selection, for seeded random inputs
        selection = seeded_selection(pat, seq_len) if content_selected(pat) else None
        kpq = pat.keys_per_query(seq_len, causal) if selection is None else selection.keys_per_query()[0, 0]
        nnz = int(kpq.sum())
        info: dict[str, Any] = {
            "pattern": pat.label(),
            "seq_len": seq_len,
            "causal": causal,
            "causality_note": own.strip(" ()") or None,
            "keys_per_query": kpq.tolist(),
            "nnz": nnz,
            "density": nnz / seq_len**2,
            "kv_retained": pat.kv_retained(seq_len),
        }
        if selection is not None:
            info["selection"] = SEEDED
        tiles = None
        if tile and selection is not None:
            tiles = (tile_counts(selection, tile) > 0).to(torch.int8)
        elif tile:
            tiles = pat.block_layout(seq_len, tile, causal).dense()
        if tiles is not None:
            info["block_layout"] = tiles.tolist()
        if as_json:
            sys.stdout.write(json.dumps(info) + "\n")
            return
        from rich.markup import escape

        out = console()
        how = "causal" if causal else "bidirectional"
        out.print(f"[bold]{escape(pat.label())}[/]  n={seq_len}  {how}{escape(own)}", soft_wrap=True)
        if selection is not None:
            out.print(f"keys {SEEDED}: other q and k select other keys (the counts are the same)", soft_wrap=True)
        if seq_len <= 96:
            m = pat.mask(seq_len, causal) if selection is None else selection.mask()[0, 0]
            for i in range(seq_len):
                out.print("".join("█" if x else "·" for x in m[i].tolist()), highlight=False)
        else:
            out.print("[dim](mask drawn for n <= 96)[/]")
        kf = kpq.double()
        out.print(
            f"keys per query: min {int(kpq.min())}, mean {float(kf.mean()):.2f}, max {int(kpq.max())}\n"
            f"nnz: {nnz}   density: {nnz / seq_len**2:.4f}   KV retained: {info['kv_retained']} of {seq_len} tokens"
        )
        if tiles is not None:
            out.print(f"block layout (tile={tile}, {int(tiles.sum())} of {tiles.shape[0] ** 2} tiles):")
            if tiles.shape[0] <= 96:
                for row in tiles.tolist():
                    out.print("".join("█" if x else "·" for x in row), highlight=False)


# --------------------------------------------------------------------------------------- env
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
        console().print(t)
