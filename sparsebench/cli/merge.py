"""``sparsebench merge RESULT... --output DIR``: result folders from different machines or
executors combined into one (results/folder.py: merge_folders); hardware (host, device_name)
becomes a dimension, and ``compare DIR --by device`` lines the same cases up across it."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from sparsebench.cli.app import console, guarded, warn


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


def merge(
    results: List[Path] = typer.Argument(..., metavar="RESULT...", help="Result folders to combine (two or more)."),
    output: Path = typer.Option(..., "--output", "-o", help="The merged result folder (new, or empty)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the plots (records, tables and summary written)."),
) -> None:
    """Combine result folders (other machines, other executors) into one: every record keeps its host
    and device_name; the same case on the same hardware in two folders is refused."""
    with guarded():
        from sparsebench.render import summary
        from sparsebench.results import folder as store

        merged = store.merge_folders(results, output, warn=warn)
        records = store.merge_rounds(store.read_records(merged.folder, warn=warn))
        out = console()
        kinds = ", ".join(f"{name or '?'} @ {host or '?'}" for host, name in merged.hardware)
        out.print(f"merged {len(results)} folders, {merged.records} records on {kinds}", soft_wrap=True)
        if merged.one_per_case:
            summary.finalize(merged.folder, records, plots=not no_plots, warn=warn)
        else:  # the same case on several machines: the tables and figures of one run do not apply
            df = store.frame(records)
            store.write_csv(merged.folder, df)
            out.print(
                "the same cases ran on more than one piece of hardware: line them up with "
                f"sparsebench compare {merged.folder} --by device",
                soft_wrap=True,
            )
    console().print(str(merged.folder))
