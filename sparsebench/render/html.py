"""A single self-contained report.html beside summary.md: figures embedded as data URIs,
tables as HTML, the environment shown. Nothing is fetched when it is opened (a CI artifact
can be opened straight from the archive)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable

from sparsebench.analysis.scaling import Analysis
from sparsebench.render import analysis as words
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
    ("reason", "reason", str),
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6rem 0;font-size:13px}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;vertical-align:top}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.bad td{background:#fff4e5}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}.note{color:#555;font-size:13px;max-width:60rem}.warn{color:#a15c00;max-width:60rem}
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
    body = [
        f"<h1>sparsebench report: {_e(name)}</h1>",
        f"<p class=sub>{_e(_subtitle(df, env, meta))}</p>",
        '<nav><a href="#analysis">analysis</a><a href="#figures">figures</a>'
        '<a href="#results">results</a><a href="#environment">environment</a></nav>',
        '<h2 id="status">Status</h2>',
        _status_table(df),
        '<h2 id="analysis">Analysis</h2>',
    ]
    for t in words.tables(analysis, df=df):
        body.append(f"<h3>{_e(t.title)}</h3>")
        body.append(html_table(t.columns, t.rows))
        if t.note:
            body.append(f"<p class=note>{_e(t.note)}</p>")
    drift = words.drift_note(analysis)
    if drift:  # as in summary.md: how far the machine's speed moved during the run
        body.append("<h3>Machine speed</h3>")
        body.append(f"<p{' class=warn' if analysis.drifted else ''}>{_e(drift)}</p>")
    body.append('<h2 id="figures">Figures</h2>')
    body += _figures(figures) or ["<p>No figures (run with plots, or <code>sparsebench plot</code>).</p>"]
    body.append('<h2 id="results">Results</h2>')
    body.append(_results_table(df))
    body.append('<h2 id="environment">Environment</h2>')
    if env:
        body.append(html_table(("key", "value"), [(k, _value(v)) for k, v in env.items()]))
    elif (folder / ENVIRONMENT).exists():
        body.append(f"<p>The result folder's {ENVIRONMENT} could not be read.</p>")
    else:
        body.append(f"<p>No {ENVIRONMENT} in the result folder.</p>")
    if meta:
        body.append("<h3>Run</h3>")
        body.append(html_table(("key", "value"), [(k, _value(v)) for k, v in meta.items()]))
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


def _figures(paths: Iterable[Path]) -> list[str]:
    """One <figure> per figure name: the PNG if there is one, else the SVG, as a data URI."""
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
        caption = stem.replace("_", " ")
        out.append(
            f'<figure id="fig-{_e(stem)}"><img alt="{_e(caption)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return out


def _status_table(df) -> str:
    if df is None or len(df) == 0 or "status" not in df:
        return "<p>No records.</p>"
    counts = df["status"].value_counts()
    return html_table(("status", "cases"), [(k, int(v)) for k, v in counts.items()])


def _results_table(df) -> str:
    if df is None or len(df) == 0:
        return "<p>No records.</p>"
    cols = [c for c in RESULT_COLUMNS if c[0] in df.columns and df[c[0]].notna().any()]  # no empty columns
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
    table = html_table([h for _, h, _ in cols], rows, classes)
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
