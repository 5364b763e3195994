"""The run's own reports: the terminal results table, results.csv and summary.md, and the
hand-off to analysis, plots and report.html. Nothing here measures anything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

COLUMNS = (
    "pattern", "backend", "n", "median ms", "TFLOP/s", "peak MiB", "density", "speedup", "yardstick", "max err",
    "status",
)  # fmt: skip

STATUS_STYLE = {
    "ok": "green",
    "wrong": "bold red",
    "oom": "red",
    "timeout": "red",
    "error": "red",
    "crashed": "bold red",
    "skipped": "dim",
}


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def row_cells(r: dict[str, Any]) -> list[str]:
    from sparsebench.render.analysis import yardstick_text

    ys = yardstick_text(r.get("gemm_fraction"), r.get("bandwidth_fraction"))
    med, tf, peak = _num(r.get("time_median_s")), _num(r.get("tflops")), _num(r.get("peak_mem_bytes"))
    dens, sp, err = _num(r.get("density")), _num(r.get("speedup")), _num(r.get("max_abs_err"))
    status = r.get("status", "")
    if r.get("noisy") and status == "ok":
        status = "ok (noisy)"
    if r.get("reason") and r.get("status") != "ok":
        status = f"{status}: {r['reason']}"
    return [
        str(r.get("pattern_label", "")),
        str(r.get("backend", ""))
        + ("" if r.get("dtype") in (None, "fp32") else f" {r['dtype']}")
        + ("" if r.get("mode") in (None, "forward") else f" {r['mode']}")
        + ("" if r.get("device") in (None, "cpu") else f" @{r['device']}")
        + ("" if r.get("inputs") in (None, "random") else f" inputs={r['inputs']}"),
        str(r.get("seq_len", "")),
        "" if med is None else f"{med * 1e3:.2f}",
        "" if tf is None else f"{tf:.3f}",
        "" if peak is None else f"{peak / 2**20:.0f}",
        "" if dens is None else f"{dens:.4f}",
        "" if sp is None else f"{sp:.2f}x",
        "" if ys == "-" else ys,
        "" if err is None else f"{err:.1e}",
        status,
    ]


def with_speedup(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records plus the derived speedup column (records themselves stay as measured)."""
    from sparsebench.results.folder import frame

    records = list(records)
    if not records:
        return []
    df = frame(records)
    return df.astype(object).where(df.notna(), None).to_dict("records")


def rich_table(records: list[dict[str, Any]], title: str | None = None):
    from rich.table import Table

    table = Table(title=title, header_style="bold", show_lines=False)
    for c in COLUMNS:
        table.add_column(
            c,
            justify="left" if c in ("pattern", "backend", "status") else "right",
            overflow="fold",
            max_width=48 if c == "status" else None,
        )
    for r in with_speedup(records):
        table.add_row(*row_cells(r), style=STATUS_STYLE.get(r.get("status"), None) if r.get("status") != "ok" else None)
    return table


def results_markdown(records: list[dict[str, Any]]) -> str:
    """The results table of summary.md, one row per record (no trailing newline)."""
    from sparsebench.render.tables import markdown_table

    return markdown_table(COLUMNS, [row_cells(r) for r in with_speedup(records)]).rstrip("\n")


def _rounds_line(records: list[dict[str, Any]]) -> list[str]:
    counts = [r.get("rounds") or 1 for r in records if "rounds" in r]
    if not counts:
        return []
    lo, hi = min(counts), max(counts)
    rounds = str(hi) if lo == hi else f"{lo} to {hi} (not every case ran every round)"
    return [f"- rounds: {rounds}; a case's time is the median of its rounds' medians (records.jsonl keeps each round)"]


def yardstick_lines(env: dict[str, Any]) -> list[str]:
    """summary.md's line on the machine's yardstick (environment.json's "yardstick"), if any."""
    from sparsebench.units import format_bytes

    ys = env.get("yardstick")
    if not isinstance(ys, dict) or not ys:
        return []
    bits = []
    for name, y in ys.items():
        if not isinstance(y, dict):
            continue
        gemm, bw = _num(y.get("gemm_tflops")), _num(y.get("copy_bytes_per_s"))
        if gemm is None and bw is None:
            continue
        size, gt, ct = y.get("gemm_size"), y.get("gemm_threads"), y.get("copy_threads")
        threads = f", {gt} threads" if gt else ""
        gemm_text = "?" if gemm is None else f"{gemm:.3g} TFLOP/s ({size}x{size}{threads})"
        threads = f" ({ct} thread{'' if ct == 1 else 's'})" if ct else ""
        bw_text = "?" if bw is None else f"{format_bytes(bw)}/s{threads}"
        bits.append(f"{name} GEMM {gemm_text}, copy {bw_text}")
    return [f"- yardstick (this machine's own torch rates): {'; '.join(bits)}"] if bits else []


def mixed_hardware_lines(records: list[dict[str, Any]]) -> list[str]:
    """summary.md's warning where a series ran on more than one kind of hardware (device_name), or
    on other hardware than its dense baseline: its ratios then mix machines."""
    from sparsebench.results import schema
    from sparsebench.results.folder import hardware_of

    kinds: dict[tuple, set[str]] = {}
    base: dict[tuple, set[str]] = {}
    for r in records:
        name = hardware_of(r)[1]
        if not name or r.get("status") == "skipped":
            continue
        kinds.setdefault(schema.series_key(r), set()).add(name)
        if r.get("pattern") == schema.BASELINE_PATTERN and r.get("backend") == schema.BASELINE_BACKEND:
            base.setdefault(tuple(r.get(c) for c in ("device", "dtype", "mode", "causal")), set()).add(name)
    lines = []
    for key, names in kinds.items():
        rec = dict(zip(schema.SERIES_KEY, key))
        label = f"{rec.get('pattern_label')} · {rec.get('backend')}"
        other = base.get(tuple(rec.get(c) for c in ("device", "dtype", "mode", "causal")), set())
        if len(names) > 1:
            lines.append(f"- warning: {label} ran on more than one kind of hardware ({', '.join(sorted(names))})")
        elif other and other != names:
            lines.append(
                f"- warning: {label} ran on {', '.join(sorted(names))}, its dense baseline on "
                f"{', '.join(sorted(other))}"
            )
    return lines


def summary_markdown(folder: Path, records: list[dict[str, Any]], analysis_md: str = "", warn=None) -> str:
    from sparsebench.results.folder import read_environment

    env = read_environment(folder, warn) or {}
    scen = records[0].get("scenario", "") if records else ""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    parts = [
        f"# sparsebench: {scen}",
        "",
        f"- cases: {len(records)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})",
        *_rounds_line(records),
        f"- machine: {env.get('cpu', '?')}, {env.get('threads', '?')} threads, GPU: {env.get('gpu') or 'none'}",
        f"- software: sparsebench {env.get('sparsebench', '?')}, torch {env.get('torch', '?')}, "
        f"python {env.get('python', '?')}",
        f"- commit: {env.get('git_commit') or 'n/a'} "
        f"(sparsebench source: {env.get('sparsebench_commit') or 'installed package'})",
        *yardstick_lines(env),
        *mixed_hardware_lines(records),
        "",
        "Speedup is over dense `sdpa` on the same device, dtype, mode and shape; max err is the",
        "largest absolute difference from dense attention under the same mask. yardstick: the",
        "useful FLOP/s as a share of the machine's own GEMM rate for the dtype (GEMM), in decode the",
        "KV cache read per second as a share of a tensor copy's bandwidth (copy); a kernel can exceed 100%.",
        "",
        "## Results",
        "",
        results_markdown(records),
        "",
    ]
    parts += _quality_lines(records, warn)
    parts += _stack_lines(records)
    if analysis_md:
        parts += [analysis_md.strip(), ""]
    return "\n".join(parts)


def _quality_lines(records: list[dict[str, Any]], warn=None) -> list[str]:
    """summary.md's section on quality against full attention (render/quality.py), if the run
    recorded any."""
    from sparsebench.render import quality
    from sparsebench.results.folder import frame

    if not any(r.get(c) is not None for r in records for c in (*quality.VALUES, "quality_note")):
        return []  # a run without them (an old folder) reads as before
    try:
        text = quality.markdown(frame(records))
    except Exception as exc:  # noqa: BLE001 - summary.md must not be lost for one section
        if warn:
            warn(f"quality table skipped: {type(exc).__name__}: {exc}")
        return []
    return [text, ""] if text else []


def _stack_lines(records: list[dict[str, Any]]) -> list[str]:
    """summary.md's section on a model scenario's stacks (render/stack.py), if any."""
    if not any(r.get("model") for r in records):
        return []
    from sparsebench.render import stack
    from sparsebench.results.folder import frame

    text = stack.markdown(frame(records))
    return [text, ""] if text else []


def finalize(
    folder: Path,
    records: list[dict[str, Any]],
    *,
    plots: bool = True,
    warn: Callable[[str], None] | None = None,
    renderables: list | None = None,
) -> list[Path]:
    """Write results.csv, summary.md, and (when asked) plots/ and report.html. A failure in an
    optional report is a warning: the records are already safe on disk."""
    from sparsebench.results import folder as results

    folder = Path(folder)
    written: list[Path] = []
    if not records:
        results.atomic_write(folder / "summary.md", summary_markdown(folder, records, warn=warn))
        return [folder / "summary.md"]
    df = results.frame(records)
    results.write_csv(folder, df)
    written.append(folder / "results.csv")
    analysis = None
    analysis_md = ""
    first = len(renderables) if renderables is not None else 0
    try:
        from sparsebench.analysis.scaling import analyze
        from sparsebench.render import analysis as words

        analysis = analyze(df)
        analysis_md = words.to_markdown(analysis, df)
        if renderables is not None:
            renderables.extend(words.renderables(analysis, df))
            from sparsebench.render import stack

            renderables.extend(stack.renderables(df))
    except Exception as exc:  # noqa: BLE001 - reports must not lose a run
        if warn:
            warn(f"analysis skipped: {type(exc).__name__}: {exc}")
    if renderables is not None:
        try:  # the quality tables first, right under the results table: speed and quality together
            from sparsebench.render import quality

            renderables[first:first] = quality.renderables(df)
        except Exception as exc:  # noqa: BLE001
            if warn:
                warn(f"quality table skipped: {type(exc).__name__}: {exc}")
    results.atomic_write(folder / "summary.md", summary_markdown(folder, records, analysis_md, warn=warn))
    written.append(folder / "summary.md")
    figures: list[Path] = []
    if plots:
        try:
            from sparsebench.render.plots import render_all

            figures = render_all(folder, df, analysis=analysis)
            written += figures
        except Exception as exc:  # noqa: BLE001
            if warn:
                warn(f"plots skipped: {type(exc).__name__}: {exc}")
    try:
        from sparsebench.render.html import write_report

        written.append(write_report(folder, df, analysis, figures))
    except Exception as exc:  # noqa: BLE001
        if warn:
            warn(f"report.html skipped: {type(exc).__name__}: {exc}")
    return written
