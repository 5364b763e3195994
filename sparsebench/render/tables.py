"""One table model, three renderings: a ``TableSpec`` (title, columns, rows of text, a note)
becomes a Markdown table (summary.md, ``compare --format markdown``), a rich table (the
terminal) or an HTML table (report.html). rich is imported when a rich table is drawn."""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class TableSpec:
    """A renderer-neutral table: Markdown, rich and HTML are drawn from the same cells."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""
    wrap: tuple[int, ...] = (0,)  # columns that may wrap in a narrow terminal (others stay whole)
    left: tuple[int, ...] = (0,)  # columns aligned left in the terminal (text); the others right (numbers)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table, one line per row ending in a newline; ``|`` in a cell is
    escaped and a line break becomes a space, so that no cell can break the table."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_section(t: TableSpec, heading: str = "###") -> list[str]:
    """A table as a markdown section: its title under ``heading``, the table, then its note."""
    parts = [f"{heading} {t.title}", "", markdown_table(t.columns, t.rows).rstrip("\n"), ""]
    return parts + [t.note, ""] if t.note else parts


def rich_table(t: TableSpec, row_styles: Sequence[str | None] | None = None):
    """The table for the terminal: the columns of ``t.left`` (the first) left, the others right;
    the columns of ``t.wrap`` fold in a narrow terminal, the others keep whole and are cut with an
    ellipsis."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=t.title,
        caption=t.note or None,
        caption_justify="left",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        title_style="bold",
    )
    for i, c in enumerate(t.columns):
        wraps = i in t.wrap
        table.add_column(
            c,
            justify="left" if i in t.left else "right",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width=16 if i == 0 else None,
        )
    for i, r in enumerate(t.rows):
        table.add_row(*[str(v) for v in r], style=row_styles[i] if row_styles else None)
    return table


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table on one line, every cell escaped; ``row_classes`` (one per row, "" for
    none) sets each row's class."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    out = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_plain(renderables: list, width: int = 160) -> str:
    """rich renderables as plain text (no colour), as wide as ``width``."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, highlight=False, soft_wrap=False)
    for r in renderables:
        console.print(r)
    return buf.getvalue()


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)
