"""A single self-contained report.html beside summary.md: figures embedded as data URIs,
tables as HTML, the environment shown. Nothing is fetched when it is opened (a CI artifact
can be opened straight from the archive)."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from sparsebench.analysis.scaling import Analysis
from sparsebench.render import analysis as words
from sparsebench.render import quality
from sparsebench.render.quality import error_text, recall_text
from sparsebench.render.tables import html_table
from sparsebench.results.folder import ENVIRONMENT, META, atomic_write, read_environment
from sparsebench.units import format_bytes, format_percent, format_ratio, format_time

REPORT = "report.html"

# Columns of the full results table: (column, header, formatter).
RESULT_COLUMNS = (
    ("pattern_label", "pattern", str),
    ("backend", "backend", str),
    ("device", "device", str),
    ("dtype", "dtype", str),
    ("mode", "mode", str),
    ("inputs", "inputs", str),  # shown where a run has more than one kind
    ("seq_len", "n", lambda v: str(int(v))),
    ("status", "status", str),
    ("time_median_s", "median", format_time),
    ("time_iqr_s", "IQR", format_time),
    ("tflops", "TFLOP/s", lambda v: f"{v:.3g}"),
    ("peak_mem_bytes", "peak mem", format_bytes),
    ("est_mem_bytes", "est. mem", format_bytes),
    ("kv_cache_bytes", "KV cache", format_bytes),
    ("density", "density", lambda v: f"{100 * v:.3g}%"),
    ("speedup", "speedup", format_ratio),
    ("efficiency", "efficiency", format_percent),
    ("gemm_fraction", "of GEMM", format_percent),  # the yardstick: measure/yardstick.py
    ("bandwidth_fraction", "of copy bw", format_percent),
    ("max_abs_err", "max |err|", lambda v: f"{v:.2g}"),
    ("grad_err", "grad err (rel.)", lambda v: f"{v:.2g}"),
    ("recall_mean", "recall vs full", recall_text),  # quality against full attention (render/quality.py)
    ("full_rel_err", "rel. err vs full", error_text),
    ("full_grad_rel_err", "grad rel. err vs full", error_text),
    ("reason", "reason", str),
)

# One sentence per figure (render.plots names them): what it shows and how to read it.
FIGURE_CAPTIONS = {
    "time_vs_seqlen": (
        "Median time of one attention call against the sequence length n, both axes logarithmic, one line"
        " per pattern and backend (dense sdpa, the baseline, in bold black): the lower line is the faster at"
        " that n, and a line's slope is how its time grows with n, about 2 for dense attention and 1 for a"
        " sparse kernel, against the dotted O(n) and dashed O(n²) guides."
    ),
    "per_token_latency_vs_context": (
        "Time to generate one token after a prefill of n tokens, against n (log-log), one line per"
        " pattern and backend (dense on sdpa thick black): a decoder that reads every cached key (dense)"
        " should rise like n and one that keeps a bounded ring of keys (a window) should stay flat, and each"
        " legend entry's exponent with its interval says how far this run bears that out."
    ),
    "memory_vs_seqlen": (
        "Measured peak memory of one call against n (log-log), one line per pattern and backend, with each"
        " backend's analytic estimate dashed without markers: a line as steep as dense's means the backend"
        " holds something n² in size, and the dashed line is what --max-memory compares with its budget."
    ),
    "speedup_vs_seqlen": (
        "Speedup over dense sdpa at the same n (the baseline's time divided by the series' time) against n,"
        " log scale, with the black line at 1x the baseline and the grey dashed lines each pattern's ideal"
        " (the pairs dense attends over the pairs the pattern attends): above 1x is faster than dense, and a"
        " series near its ideal gets the pattern's whole saving."
    ),
    "kv_cache_vs_seqlen": (
        "Bytes of keys and values one layer's decoder must keep after n tokens of context, per pattern"
        " (log scale, measured where a decode run allocated the cache): a flat line is a pattern that can"
        " drop old keys, a rising one keeps every key however sparse its attention."
    ),
    "masks": (
        "Each panel is one pattern's attention mask, queries down and keys across, black where the query"
        " attends the key and grey where a cell holds only some such pairs, at the length the title gives"
        " (zoomed onto the first tokens of a long run), with global and sink keys marked in vermillion and"
        " random keys as blue dots, listed under the panel: compare the panels to see which keys each"
        " pattern keeps and which it drops."
    ),
}

# memory_vs_seqlen of a run with decode cases only: a case is a decoder, not one call
DECODE_MEMORY_CAPTION = (
    "Measured peak memory of each decoder (its KV cache, the prompt prefilled into it a chunk at a time,"
    " and the generated tokens) against the context length n (log-log), with the analytic estimate dashed"
    " without markers: a ring cache's line stays flat and a dense cache's grows like n, as their KV bytes do."
)

# A short cell that holds a number (with its unit or a short note: "3.6e-07", "256-512 (2)",
# "GEMM 74%") is never broken across lines: browsers break at hyphens and spaces. Longer cells
# are sentences (a reason, a JSON value): they wrap, left-aligned, in a column wide enough to read.
NUMBER_CELL_MAX = 24
TEXT_CELL_MIN = 25

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#666;margin-top:0}
.table-wrap{overflow-x:auto;max-width:100%;margin:.6rem 0}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;vertical-align:top}
th{background:#f4f4f4;white-space:nowrap}td:first-child,th:first-child{text-align:left}
td{white-space:nowrap}td.text{white-space:normal;text-align:left;min-width:14rem;overflow-wrap:anywhere}
.kv td,.kv th{text-align:left}
tr.bad td{background:#fff4e5}
.table-wrap td:first-child{position:sticky;left:0;background:#fff}.table-wrap tr.bad td:first-child{background:#fff4e5}
.table-wrap th:first-child{position:sticky;left:0}
figure{margin:1.2rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:13px;max-width:60rem;margin-top:.3rem}
.note{color:#555;font-size:13px;max-width:60rem}.warn{color:#a15c00;max-width:60rem}
nav a{margin-right:1rem}
"""


def write_report(folder: Path, df, analysis: Analysis | None, figures: Iterable[Path], warn=None) -> Path:
    """Write ``folder/report.html`` and return its path (``warn``: told of an unreadable
    environment.json)."""
    folder = Path(folder)
    if analysis is None:
        from sparsebench.analysis.scaling import analyze

        analysis = analyze(df)
    env = read_environment(folder, warn) or {}
    meta = _read_json(folder / META)
    name = str(meta.get("scenario") or _first(df, "scenario") or folder.name)
    figures = list(figures)
    quality_tables = quality.tables(df) if df is not None and len(df) else []
    body = [
        f"<h1>sparsebench report: {_e(name)}</h1>",
        f"<p class=sub>{_e(_subtitle(df, env, meta))}</p>",
        "<nav>"
        + ('<a href="#quality">quality</a>' if quality_tables else "")
        + '<a href="#analysis">analysis</a><a href="#figures">figures</a>'
        '<a href="#results">results</a><a href="#environment">environment</a></nav>',
        '<h2 id="status">Status</h2>',
        _status_table(df),
    ]
    if quality_tables:  # speed and quality side by side, where a reader decides
        body.append(f'<h2 id="quality">{_e(quality.TITLE)}</h2>')
        for i, t in enumerate(quality_tables):
            if i:
                body.append(f"<h3>{_e(t.title)}</h3>")
            elif t.title != quality.TITLE:
                body.append(f"<p class=sub>{_e(t.title.removeprefix(quality.TITLE).strip(' ()'))}</p>")
            body.append(_table(t.columns, t.rows))
            if t.note:
                body.append(f"<p class=note>{_e(t.note)}</p>")
        if any(Path(f).stem == quality.FIGURE for f in figures):
            body.append(f'<p><a href="#fig-{quality.FIGURE}">the quality-vs-speedup figure</a></p>')
    body.append('<h2 id="analysis">Analysis</h2>')
    for t in words.tables(analysis, df=df):
        body.append(f"<h3>{_e(t.title)}</h3>")
        body.append(_table(t.columns, t.rows))
        if t.note:
            body.append(f"<p class=note>{_e(t.note)}</p>")
    drift = words.drift_note(analysis)
    if drift:  # as in summary.md: how far the machine's speed moved during the run
        body.append("<h3>Machine speed</h3>")
        body.append(f"<p{' class=warn' if analysis.drifted else ''}>{_e(drift)}</p>")
    body.append('<h2 id="figures">Figures</h2>')
    body += _figures(figures, df) or ["<p>No figures (run with plots, or <code>sparsebench plot</code>).</p>"]
    body.append('<h2 id="results">Results</h2>')
    body.append(_results_table(df))
    body.append('<h2 id="environment">Environment</h2>')
    if env:
        body.append(_table(("key", "value"), [(k, _value(v)) for k, v in env.items()], kind="kv"))
    elif (folder / ENVIRONMENT).exists():
        body.append(f"<p>The result folder's {ENVIRONMENT} could not be read.</p>")
    else:
        body.append(f"<p>No {ENVIRONMENT} in the result folder.</p>")
    if meta:
        body.append("<h3>Run</h3>")
        body.append(_table(("key", "value"), [(k, _value(v)) for k, v in meta.items()], kind="kv"))
    page = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>sparsebench: {_e(name)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = folder / REPORT
    atomic_write(path, page)
    _readable(path)
    return path


# ----------------------------------------------------------------------------------------------


def _readable(path: Path) -> None:
    """atomic_write's temporary file is private (0600); a report is meant to be shared."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _figures(paths: Iterable[Path], df=None) -> list[str]:
    """One <figure> per figure name: the PNG if there is one, else the SVG, as a data URI, and
    under it a one-sentence caption (``figure_caption``)."""
    by_stem: dict[str, dict[str, Path]] = {}
    for p in paths:
        p = Path(p)
        by_stem.setdefault(p.stem, {})[p.suffix.lower().lstrip(".")] = p
    out = []
    for stem, files in by_stem.items():
        path = files.get("png") or files.get("svg")
        if path is None or not path.exists():
            continue
        mime = "image/png" if path.suffix.lower() == ".png" else "image/svg+xml"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = figure_caption(stem, df)
        out.append(
            f'<figure id="fig-{_e(stem)}"><img alt="{_e(stem.replace("_", " "))}" src="data:{mime};base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return out


def figure_caption(stem: str, df=None) -> str:
    """One sentence under figure ``stem``: what it shows and how to read it.

    Hook: where ``render.plots`` defines ``figure_caption(name, df) -> str | None`` (the module
    that draws a figure knows what this run's figure holds: the length the masks are drawn at,
    which exponents are findings), its sentence is used; otherwise FIGURE_CAPTIONS', and for a
    figure neither knows, a sentence built from its name."""
    from sparsebench.render import plots

    own = getattr(plots, "figure_caption", None)
    text = own(stem, df) if callable(own) else None
    if text:
        return str(text)
    if stem == "memory_vs_seqlen" and _decode_only(df):
        return DECODE_MEMORY_CAPTION
    if stem in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[stem]
    what = stem.replace("_vs_", " against ").replace("_", " ")
    return f"The {what} of this run's series, one line each; the legend names them."


def _decode_only(df) -> bool:
    return df is not None and "mode" in getattr(df, "columns", ()) and len(df) > 0 and set(df["mode"]) == {"decode"}


def _table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None, kind: str = ""
) -> str:
    """``html_table`` in a box that scrolls sideways when the table is wider than the page, its
    number cells marked ``num`` and its long text cells ``text``: every cell but a ``text`` one
    stays on one line, a ``text`` one wraps, left-aligned. ``kind`` "kv": a key/value table,
    its values left-aligned."""
    table = html_table(columns, rows, row_classes)
    cls = f"table-wrap {kind}".strip()
    return f'<div class="{cls}">{_CELL.sub(_mark_cell, table)}</div>'


_CELL = re.compile(r"<td>([^<]*)</td>")  # html_table escapes every cell: no "<" inside one


def _mark_cell(m: re.Match) -> str:
    text = html.unescape(m.group(1))
    if len(text) <= NUMBER_CELL_MAX and any(c.isdigit() for c in text):
        return f'<td class="num">{m.group(1)}</td>'
    if len(text) >= TEXT_CELL_MIN:
        return f'<td class="text">{m.group(1)}</td>'
    return m.group(0)


def _status_table(df) -> str:
    if df is None or len(df) == 0 or "status" not in df:
        return "<p>No records.</p>"
    counts = df["status"].value_counts()
    return _table(("status", "cases"), [(k, int(v)) for k, v in counts.items()])


def _results_table(df) -> str:
    if df is None or len(df) == 0:
        return "<p>No records.</p>"
    cols = [c for c in RESULT_COLUMNS if c[0] in df.columns and df[c[0]].notna().any()]  # no empty columns
    if "inputs" in df.columns and df["inputs"].astype(str).nunique() < 2:  # one kind: said once, in the title
        cols = [c for c in cols if c[0] != "inputs"]
    sort = [c for c in ("device", "dtype", "mode", "pattern_label", "backend", "seq_len") if c in df.columns]
    names = [c for c, _, _ in cols]
    status_at = names.index("status") if "status" in names else None
    rows, classes = [], []
    for _, r in df.sort_values(sort).iterrows():
        cells = [_cell(r.get(c), f) for c, _, f in cols]
        noisy = r.get("noisy") == True  # noqa: E712 - a numpy bool, or NaN where not recorded
        if noisy and r.get("status") == "ok" and status_at is not None:
            cells[status_at] = "ok (noisy)"  # as in summary.md
        rows.append(cells)
        classes.append("" if r.get("status") == "ok" else "bad")
    table = _table([h for _, h, _ in cols], rows, classes)
    if {"gemm_fraction", "bandwidth_fraction"} & set(names):
        table += (
            "<p class=note>of GEMM: the case's useful FLOP/s over this machine's own torch GEMM rate "
            "for the dtype (a fixed square matmul, measured once per run); of copy bw (decode): its "
            "KV cache read per second over a large tensor copy's bandwidth. Both yardsticks are the "
            "library's own on this machine, so a kernel can exceed 100%.</p>"
        )
    return table


def _cell(v: Any, f) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    try:
        return f(v)
    except (TypeError, ValueError):
        return str(v)


def _subtitle(df, env: dict, meta: dict) -> str:
    bits = []
    if df is not None and len(df):
        bits.append(f"{len(df)} cases")
    for key in ("timestamp", "started", "finished"):
        if meta.get(key):
            bits.append(str(meta[key]))
            break
    if env.get("gpu"):
        bits.append(str(env["gpu"]))
    elif env.get("cpu"):
        bits.append(f"{env['cpu']} ({env.get('threads', '?')} threads)")
    if env.get("torch"):
        bits.append(f"torch {env['torch']}")
    return " · ".join(bits)


def _first(df, col: str) -> Any:
    if df is None or col not in getattr(df, "columns", ()) or len(df) == 0:
        return None
    return df[col].iloc[0]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "-" if v is None else str(v)


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)
