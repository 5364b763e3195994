"""report.html (issue 17, finding 7): tables fit or scroll inside their own box, numbers are never
broken across lines, and each figure has a one-sentence caption that says what it shows and how
to read it (not its file name). The layout itself was looked at in headless Chromium at 1400
and 800 px (see the issue's note); these tests hold the structure that layout rests on."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from report_fixtures import make_records, record, write_result

from sparsebench.analysis.scaling import analyze
from sparsebench.render import plots
from sparsebench.render.html import CSS, FIGURE_CAPTIONS, figure_caption, write_report
from sparsebench.results.folder import load_frame

REASON = "estimated 36 MiB exceeds the memory budget of 20 MiB (the estimate counts the block layout)"


class Page(HTMLParser):
    """The parts of the page the tests look at: each table's enclosing element, each cell's
    class and text, each figure's caption."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.table_parents: list[tuple[str, dict]] = []
        self.cells: list[tuple[str | None, str]] = []
        self.figures: list[dict] = []
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table_parents.append(self.stack[-1] if self.stack else ("", {}))
        if tag == "td":
            self._cell = []
            self._cell_class = attrs.get("class")
        if tag == "figure":
            self.figures.append({"id": attrs.get("id"), "captions": []})
        if tag == "img" and self.figures:
            self.figures[-1]["alt"] = attrs.get("alt")
        if tag == "figcaption":
            self._caption = []
        if tag not in ("img", "meta", "br"):
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell_class, "".join(self._cell)))
            self._cell = None
        if tag == "figcaption" and self._caption is not None:
            self.figures[-1]["captions"].append("".join(self._caption))
            self._caption = None
        if self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_data(self, data):
        for part in (self._cell, self._caption):
            if part is not None:
                part.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    recs = make_records()
    recs.append(record("dense", "naive", 256, 1e-3, max_abs_err=3.6e-07, mem=2e6))
    recs.append(record("sliding_window", "block_sparse", 16384, None, status="skipped", reason=REASON))
    out = write_result(tmp_path_factory.mktemp("html"), recs)
    (out / "plots").mkdir()
    figures = []
    for name in (*plots.FIGURES, *plots.DECODE_FIGURES):
        path = out / "plots" / f"{name}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)  # the report embeds the bytes, it does not read them
        figures.append(path)
    df = load_frame(out)
    html = write_report(out, df, analyze(df), figures).read_text()
    parsed = Page()
    parsed.feed(html)
    return html, parsed


def test_every_table_is_in_a_box_that_scrolls(page):
    html, p = page
    assert len(p.table_parents) >= 5  # status, the analysis tables, results, environment, run
    for tag, attrs in p.table_parents:
        assert tag == "div" and "table-wrap" in attrs.get("class", "").split()
    assert re.search(r"\.table-wrap\{[^}]*overflow-x:auto", CSS)


def test_numbers_are_never_broken(page):
    html, p = page
    assert re.search(r"(^|\})td\{white-space:nowrap\}", CSS.replace("\n", ""))  # every cell but a .text one
    numbers = [
        (cls, text) for cls, text in p.cells if len(text) <= 24 and re.fullmatch(r"[-~<=]*\s?\d[\w.%µ\- ()]*", text)
    ]
    assert numbers and all(cls == "num" for cls, _ in numbers), [t for c, t in numbers if c != "num"][:5]
    assert ("num", "3.6e-07") in p.cells  # broke as "3.6e-/07" before
    assert ("text", REASON) in p.cells  # the reason wraps as text, inside the box
    assert not re.search(r"td\.num\{[^}]*white-space:normal", CSS)


def test_one_caption_per_figure_that_says_what_it_shows(page):
    html, p = page
    assert len(p.figures) == len(plots.FIGURES) + len(plots.DECODE_FIGURES)
    seen = set()
    for fig in p.figures:
        assert len(fig["captions"]) == 1, fig["id"]
        caption = fig["captions"][0]
        stem = fig["id"].removeprefix("fig-")
        assert caption.lower() not in (stem, stem.replace("_", " "), f"{stem}.png")
        assert len(caption.split()) >= 12 and caption.endswith(".")
        assert not re.search(r"[.!?]\s+[A-Z]", caption), caption  # one sentence
        seen.add(caption)
    assert len(seen) == len(p.figures)  # each its own
    assert set(FIGURE_CAPTIONS) == {*plots.FIGURES, *plots.DECODE_FIGURES}  # a figure added later gets one too


def test_a_figure_without_a_written_caption_still_gets_a_sentence():
    text = figure_caption("flops_vs_seqlen")
    assert text.endswith(".") and "flops against seqlen" in text


def test_a_decode_runs_memory_figure_is_captioned_as_the_decoders_peak():
    import pandas as pd

    decode = pd.DataFrame({"mode": ["decode", "decode"]})
    forward = pd.DataFrame({"mode": ["forward", "decode"]})
    assert "decoder" in figure_caption("memory_vs_seqlen", decode)
    assert figure_caption("memory_vs_seqlen", forward) == FIGURE_CAPTIONS["memory_vs_seqlen"]
