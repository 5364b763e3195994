"""The analysis in words and tables: the scaling, baseline, decode and first-call tables with
their notes, and the machine-speed sentence, for summary.md (``to_markdown``), the terminal
(``renderables``) and report.html (``tables``, ``drift_note``).

``compact`` tables (an 80-column terminal) leave out the fit range and best-speedup columns
and the first-call table; their notes leave out what explains the columns left out. Given the
results frame, the baseline table also shows each series' share of the machine's yardstick (its
own GEMM rate, or in decode its copy bandwidth: measure/yardstick.py) beside the efficiency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from sparsebench.analysis.scaling import (
    FINDING,
    FINDING_HALF_WIDTH,
    FINDING_SIZES,
    Analysis,
    Crossover,
    SeriesSummary,
    ensure_derived,
    finite_or_none,
    fit_status,
    iter_groups,
)
from sparsebench.render.tables import TableSpec, markdown_table, rich_table
from sparsebench.results.schema import DECODE, SERIES_KEY
from sparsebench.stats import FLOOR_SLOPE, Fit
from sparsebench.units import EMPTY, format_bytes, format_percent, format_ratio, format_time, format_tokens

FIRST_CALL_TITLE = "First call"
BASELINE_TITLE = "Against the dense baseline (dense · sdpa)"
DECODE_TITLE = "Decode: time per generated token"
# The backend of decode records written before decode ran through the backends (one KV-cache
# decoder of its own, SDPA over its slots). Old result folders say so; they load and plot, their
# series named by their pattern.
LEGACY_DECODE_BACKEND = "kv_cache"


@dataclass(frozen=True)
class Column:
    """A column of a series table: its header, its cell for one series, whether it may wrap
    in a narrow terminal, and whether compact tables leave it out."""

    name: str
    cell: Callable[[SeriesSummary, bool], str]  # (series, compact) -> text
    wrap: bool = False
    full_only: bool = False


def series_table(
    title: str, columns: Sequence[Column], series: Sequence[SeriesSummary], note: str, compact: bool = False
) -> TableSpec:
    """One row per series, the columns that the table's form (compact or not) shows."""
    shown = [c for c in columns if not (compact and c.full_only)]
    return TableSpec(
        title,
        tuple(c.name for c in shown),
        tuple(tuple(c.cell(s, compact) for c in shown) for s in series),
        note,
        wrap=tuple(i for i, c in enumerate(shown) if c.wrap),
    )


# -- cells ----------------------------------------------------------------------------------------


def crossover_text(c: Crossover, compact: bool = False) -> str:
    """ "~1234", "<= 256 (faster at every measured n)", or why there is no crossover."""
    if c.compared == 0:
        return "no common sizes with the baseline"
    if c.n is None:
        return "not in range" if compact else "not within the measured range"
    if c.below_range:
        return f"<= {format_tokens(c.n)} (faster at every measured n)"
    return f"~{format_tokens(c.n)}"


def problems_text(s: SeriesSummary) -> str:
    """ "oom at 8192; wrong result at 1024, 2048", or "-"."""
    bits = []
    if s.failure:
        bits.append(f"{s.failure.status} at {format_tokens(s.failure.seq_len)}")
    if s.wrong_sizes:
        bits.append("wrong result at " + ", ".join(format_tokens(n) for n in s.wrong_sizes))
    return "; ".join(bits) or "-"


def exponent_text(fit: Fit, compact: bool = False) -> str:
    """ "1.98 ± 0.07" where the exponent is a finding; otherwise the value with why it is not:
    "1.66 ± 1.11 (too noisy)", "1.66 (too few sizes: 2)" (``compact``: the why on a line of its
    own, so that a narrow terminal folds the cell between the two, never inside either)."""
    status = fit_status(fit)
    value = f"{fit.exponent:.2f}" + (f" ± {fit.half_width:.2f}" if fit.half_width is not None else "")
    if status == FINDING:
        return value
    why = f"({status}" + (f": {fit.points})" if fit.points < FINDING_SIZES else ")")
    return value + ("\n" if compact else " ") + why


def exponent_caveat(fit: Fit | None) -> str:
    """ "" for a finding (or no fit), else "too noisy" / "too few sizes" (legends)."""
    status = fit_status(fit)
    return "" if status in (None, FINDING) else status


def _fit_text(fit: Fit | None, sizes: tuple[int, ...], compact: bool = False) -> str:
    if fit is not None:
        return exponent_text(fit, compact)
    if not sizes:
        return "no ok measurement"
    return "one size, no fit" if len(set(sizes)) == 1 else "-"


def _fit_range(fit: Fit | None) -> str:
    if fit is None:
        return "-"
    return f"{format_tokens(fit.sizes[0])}-{format_tokens(fit.sizes[-1])} ({fit.points})"


def _at(value: str, n: int | None) -> str:
    return f"{value} at {format_tokens(n)}"


def yardstick_text(gemm_fraction: Any, bandwidth_fraction: Any) -> str:
    """ "GEMM 71%" (useful FLOP/s over the machine's own GEMM rate), "copy 40%" (decode: the KV
    cache read per second over a copy's bandwidth), or "-"."""
    gemm, bw = finite_or_none(gemm_fraction), finite_or_none(bandwidth_fraction)
    if gemm is not None:
        return f"GEMM {_percent(gemm)}"
    if bw is not None:
        return f"copy {_percent(bw)}"
    return EMPTY


def _percent(f: float) -> str:
    """71%, 213%; below 10% two digits (7.1%, 0.42%), so that a small share does not read 0%."""
    return f"{100 * f:.2g}%" if abs(f) < 0.1 else format_percent(f)


# Each series' yardstick cell by n: {series key (as analyze has it): {n: "GEMM 71%"}}.
Yardsticks = Mapping[tuple, Mapping[int, str]]


def yardsticks(df) -> dict[tuple, dict[int, str]]:
    """The yardstick cells of a results frame (rounds merged), by series and n; empty where no
    record has a fraction (a run from before the yardstick, or one that could not measure it)."""
    cols = [c for c in ("gemm_fraction", "bandwidth_fraction") if df is not None and c in df.columns]
    if not cols or not df[cols].notna().any().any():
        return {}
    out: dict[tuple, dict[int, str]] = {}
    for key, g in iter_groups(df, SERIES_KEY):
        for _, r in g.iterrows():
            text = yardstick_text(r.get("gemm_fraction"), r.get("bandwidth_fraction"))
            if text != EMPTY:
                out.setdefault(key, {})[int(r["seq_len"])] = text
    return out


# -- tables ---------------------------------------------------------------------------------------

SCALING_COLUMNS = (
    Column("series", lambda s, _: s.shown_label, wrap=True),
    Column("time exp.", lambda s, compact: _fit_text(s.time_fit, s.sizes, compact), wrap=True),
    Column("fit range", lambda s, _: _fit_range(s.time_fit), wrap=True, full_only=True),
    Column("memory exp.", lambda s, compact: exponent_text(s.mem_fit, compact) if s.mem_fit else "-", wrap=True),
    Column("max ok n", lambda s, _: format_tokens(s.max_ok_n) if s.max_ok_n else "-"),
    Column("problems", lambda s, _: problems_text(s), wrap=True),
)

BASELINE_COLUMNS = (
    Column("series", lambda s, _: s.label, wrap=True),
    Column(
        "crossover n",
        lambda s, compact: crossover_text(s.crossover, compact) if s.crossover else "- (dense)",
        wrap=True,
    ),
    Column("at n", lambda s, _: format_tokens(s.largest_n) if s.largest_n else "-"),
    Column("speedup", lambda s, _: format_ratio(s.speedup)),
    Column("ideal", lambda s, _: format_ratio(s.ideal_speedup)),
    Column("efficiency", lambda s, _: format_percent(s.efficiency)),
    Column(
        "best",
        lambda s, _: _at(format_ratio(s.best_speedup), s.best_speedup_n) if s.best_speedup else "-",
        wrap=True,
        full_only=True,
    ),
)

FIRST_CALL_COLUMNS = (
    Column("series", lambda s, _: s.shown_label, wrap=True),
    Column("at n", lambda s, _: format_tokens(s.first_call.seq_len)),
    Column("setup", lambda s, _: format_time(s.first_call.setup_s)),
    Column("first call", lambda s, _: format_time(s.first_call.first_call_s)),
    Column("steady", lambda s, _: format_time(s.first_call.steady_s)),
    Column("first call - steady", lambda s, _: format_time(s.first_call.extra_s)),
    Column(
        "most, at n",
        lambda s, _: (
            _at(format_time(s.first_call.worst_extra_s), s.first_call.worst_n) if s.first_call.worst_n else "-"
        ),
    ),
)


def scaling_note(compact: bool = False) -> str:
    fit_range = "" if compact else ", over the fit range (sizes used)"
    return (
        "Exponent k of time ∝ n^k (and of peak memory): least-squares slope of log(time) on "
        f"log(n) ± its 95% confidence interval{fit_range}. Leading sizes "
        f"whose time grows slower than n^{FLOOR_SLOPE} are overhead-dominated and left out. "
        "Dense attention should read about 2, a sparse kernel about 1. An exponent is a finding only "
        f"where its interval is narrower than ±{FINDING_HALF_WIDTH} over at least {FINDING_SIZES} sizes; "
        '"too few sizes" or "too noisy" beside a value: it cannot say more than its interval. '
        "max ok n: the longest sequence that ran before the first oom/timeout/crash/error."
    )


def scaling_findings(analysis: Analysis) -> str:
    """The exponents that are findings, in one sentence, and how many are not ("" without fits):
    what the analysis text may cite."""
    found, withheld = [], 0
    for s in analysis.series:
        bits = []
        for what, fit in (("time", s.time_fit), ("memory", s.mem_fit)):
            if fit is None:
                continue
            if fit_status(fit) == FINDING:
                bits.append(f"{what} n^{fit.exponent:.2f} ± {fit.half_width:.2f}")
            else:
                withheld += 1
        if bits:
            found.append(f"{s.shown_label}: {', '.join(bits)}")
    if not found and not withheld:
        return ""
    text = ("Findings: " + "; ".join(found) + ".") if found else "No exponent is a finding."
    if withheld:
        text += f" {withheld} exponent{'s' if withheld > 1 else ''} marked too few sizes or too noisy: not findings."
    return text


def baseline_note(compact: bool = False, yardstick: str | None = None) -> str:
    """The baseline table's note; ``yardstick`` (where the table has that column): what the
    baselines themselves reached ("" where they have no figure)."""
    best = "" if compact else " best: the highest speedup and where."
    ys = ""
    if yardstick is not None:
        ys = (
            " yardstick (at n, or where named): the series' useful FLOP/s as a share of this "
            "machine's own torch GEMM rate for the dtype (GEMM: a fixed square matmul, measured once "
            "per run), in decode the KV cache it reads per second as a share of a large tensor "
            "copy's bandwidth (copy); both "
            "are the library's rates on this machine, not the hardware's peak, so a kernel can "
            "exceed 100%." + (f" The baseline itself: {yardstick}." if yardstick else "")
        )
    return (
        "Crossover: the smallest n from which on the series beats dense sdpa at every measured size, "
        "interpolated in log space. At the largest n both ran: speedup = dense sdpa median / series "
        "median (same shape), ideal = nnz(dense) / nnz(pattern), efficiency = speedup / "
        "ideal (above 100%: faster per allowed pair than dense sdpa is per pair, as a "
        f"kernel faster than SDPA on the dense pattern itself reads).{best}{ys}"
    )


def above_ideal_text(series: Sequence[SeriesSummary]) -> str:
    """Says, per backend, which series beat their ideal speedup, where (their highest efficiency)
    and why ("" where none did): the dense baseline is slower per pair there than that backend's
    own dense path where the scenario ran dense on it (with each series' efficiency against that
    path), or the kernel is faster per pair on the pattern than on dense where that path is no
    faster than the baseline."""
    by_backend: dict[str, list[SeriesSummary]] = {}
    for s in series:
        if s.above_ideal:
            by_backend.setdefault(s.backend, []).append(s)
    parts = []
    for backend, group in by_backend.items():
        path = f"dense · {backend}"
        names = []
        for s in group:
            own = s.own_dense_efficiency
            against = f" ({format_percent(own)} against {path})" if own is not None else ""
            names.append(
                f"{s.label} {format_percent(s.peak_efficiency)} of its ideal at {format_tokens(s.peak_efficiency_n)}"
                f"{against}"
            )
        with_path = [s for s in group if s.dense_path_speedup is not None]
        faster = [s for s in with_path if s.dense_path_speedup > 1.0]
        if faster:
            at = [
                f"{format_ratio(s.dense_path_speedup)} at {format_tokens(n)}"
                for n, s in sorted({s.peak_efficiency_n: s for s in faster}.items())
            ]
            more = f" ({', '.join(at[1:])})" if len(at) > 1 else ""
            ratio, n = at[0].split(" at ")
            why = (
                f"The dense sdpa baseline is slower per pair than {backend}'s own dense path: {path} is "
                f"{ratio} as fast as dense · sdpa at {n}{more}."
            )
        elif with_path:
            why = (
                f"{backend}'s own dense path is no faster than the baseline there ({path}: "
                f"{format_ratio(with_path[0].dense_path_speedup)}): the kernel is faster per allowed pair on "
                "the pattern than on dense attention."
            )
        else:
            why = (
                f"The dense sdpa baseline is slower per pair than this kernel (the scenario did not run "
                f"{path}, which would show {backend}'s own dense path)."
            )
        parts.append(f"Above the ideal speedup (efficiency over 100%): {'; '.join(names)}. {why}")
    return " ".join(parts)


def below_one_ideal_text(series: Sequence[SeriesSummary]) -> str:
    """Says which patterns have an ideal speedup below 1 at their largest n ("" where none has):
    more allowed pairs than the dense baseline they are set against (prefix_lm: causal dense
    attention plus the pairs above the diagonal inside its prefix). A real figure, not an error."""
    below: dict[str, tuple[float, int | None]] = {}
    for s in series:
        if not s.is_baseline and s.ideal_speedup is not None and s.ideal_speedup < 1.0:
            pattern = str(s.key[SERIES_KEY.index("pattern_label")])
            below.setdefault(pattern, (s.ideal_speedup, s.largest_n))
    if not below:
        return ""
    names = "; ".join(
        f"{p} {format_ratio(ideal)}" + (f" at {format_tokens(n)}" if n else "") for p, (ideal, n) in below.items()
    )
    return (
        f"An ideal below 1x is real: {names}. Such a pattern allows more (query, key) pairs than the dense "
        "sdpa baseline it is set against (a prefix LM keeps the pairs above the diagonal inside its prefix, "
        "which causal dense attention leaves out), so a kernel as fast per pair as the baseline is slower "
        "than it; efficiency = speedup / ideal still compares the two per allowed pair."
    )


def baseline_columns(yard: Yardsticks) -> tuple[Column, ...]:
    """BASELINE_COLUMNS, with the yardstick at the series' ``at n`` after the efficiency where
    ``yard`` has any."""
    if not yard:
        return BASELINE_COLUMNS
    at = [c.name for c in BASELINE_COLUMNS].index("efficiency") + 1
    col = Column("yardstick", lambda s, _: _yardstick_cell(s, yard.get(s.key, {})))
    return BASELINE_COLUMNS[:at] + (col,) + BASELINE_COLUMNS[at:]


def _yardstick_cell(s: SeriesSummary, cells: Mapping[int, str]) -> str:
    """The series' yardstick at its ``at n``; where it has none (no size in common with the
    baseline: a decode series), at its own largest n, which the cell names."""
    if s.largest_n is not None:
        return cells.get(s.largest_n, EMPTY)
    if not cells:
        return EMPTY
    n = max(cells)
    return f"{cells[n]} at {format_tokens(n)}"


def baselines_yardstick(analysis: Analysis, yard: Yardsticks) -> str:
    """ "dense · sdpa GEMM 75% at 16K" for each baseline series, at its largest n with a figure."""
    bits = []
    for s in analysis.series:
        cells = yard.get(s.key, {})
        if s.is_baseline and cells:
            n = max(cells)
            bits.append(f"{s.label} {cells[n]} at {format_tokens(n)}")
    return "; ".join(bits)


FIRST_CALL_NOTE = (
    "At each series' largest measured n (its first round): setup builds the pattern's "
    "layout or mask before any call; the first call includes compilation and "
    "autotuning (flex, Triton), loading the native CPU kernels, and the first touch "
    "of fresh memory; steady is the median of the timed calls (a negative difference: "
    "the first call was no slower, within the noise). Setup and the first call's "
    "extra time are not in the steady-state figures above (records: setup_s, "
    "first_call_s, compile_s). most, at n: the largest first-call extra of the "
    "series where it fell on a smaller n and stands out (costs paid once per process, such as "
    "loading the native kernels or a cold compile cache, fall on the first case "
    "that needs them); records.jsonl has every case's."
)


DECODE_NOTE = (
    "Decode: after a prompt of n tokens (the context, prefilled into the KV cache a chunk at a "
    "time, untimed), each generated token is one step on the named backend: its K and V written "
    "into the cache, one query attending the cached keys its pattern allows. per token: the "
    "median time of a step (every timed step of the case); vs dense · sdpa: the dense decoder on "
    "sdpa at the same n and shape, its time per token over this one (above 1x: faster); time exp.: "
    "of the time per token against n (a dense cache ~1, a ring ~0); KV cache: the bytes one layer "
    "keeps (kv_heads heads); peak: the decoder's own measured peak (its cache, one prefill chunk, "
    "the steps)."
)


def decode_table(analysis: Analysis, df, compact: bool = False) -> TableSpec | None:
    """One row per decode series, at its largest context n that ran: the time per generated
    token, against dense on sdpa, its exponent, KV-cache bytes and peak memory (None without
    decode records)."""
    series = [s for s in analysis.series if s.key[SERIES_KEY.index("mode")] == DECODE]
    if not series or df is None or "mode" not in df:
        return None
    df = ensure_derived(df)
    ok = df[(df["mode"].astype(str) == DECODE) & (df["status"] == "ok")]
    rows = dict(iter_groups(ok, SERIES_KEY))
    out = []
    for s in series:
        g = rows.get(s.key)
        if g is None or g.empty:
            continue
        r = g.sort_values("seq_len").iloc[-1]
        backend = s.key[SERIES_KEY.index("backend")]
        out.append(
            (
                s.shown_label if backend != LEGACY_DECODE_BACKEND else f"{s.shown_label} (one decoder of its own)",
                format_tokens(int(r["seq_len"])),
                format_time(finite_or_none(r.get("time_median_s"))),
                format_ratio(finite_or_none(r.get("speedup"))),
                _fit_text(s.time_fit, s.sizes, compact),
                format_bytes(finite_or_none(r.get("kv_cache_bytes"))),
                format_bytes(finite_or_none(r.get("peak_mem_bytes"))),
            )
        )
    if not out:
        return None
    columns = ("series", "context n", "per token", "vs dense · sdpa", "time exp.", "KV cache", "peak")
    return TableSpec(DECODE_TITLE, columns, tuple(out), DECODE_NOTE, wrap=(0, 4))


def tables(analysis: Analysis, compact: bool = False, df=None) -> list[TableSpec]:
    """The summary tables; ``compact`` (for an 80-column terminal) drops the fit range and
    the best speedup columns, and the first-call table; ``df`` (the frame ``analysis`` came
    from) adds the yardstick column to the baseline table."""
    if not analysis.series:
        return [TableSpec("Scaling", ("note",), (("no successful measurements to analyse",),))]
    note = scaling_note(compact)
    if any(s.key[SERIES_KEY.index("mode")] == DECODE for s in analysis.series):
        note += " Decode series: the time is per generated token, n the context length."
    if not compact:
        note = " ".join(t for t in (note, scaling_findings(analysis)) if t)
    out = [series_table("Scaling", SCALING_COLUMNS, analysis.series, note, compact)]
    # a decoder has no dense sdpa call to be set against (its dense decoder is in the scaling
    # table and the per-token latency figure): decode series are left out of this table
    others = [s for s in analysis.series if not s.is_baseline and s.key[SERIES_KEY.index("mode")] != DECODE]
    # nor is a model's stack (its reference is its all-dense twin: the model stack table)
    others = [s for s in others if s.key[SERIES_KEY.index("pattern_label")] not in stack_labels(df)]
    if others:
        yard = yardsticks(df)
        note = baseline_note(compact, baselines_yardstick(analysis, yard) if yard else None)
        lead = " ".join(t for t in (above_ideal_text(others), below_one_ideal_text(others)) if t)
        note = f"{lead} {note}" if lead else note
        out.append(series_table(BASELINE_TITLE, baseline_columns(yard), others, note, compact))
    decode = decode_table(analysis, df, compact)
    if decode is not None:
        out.append(decode)
    firsts = [
        s
        for s in analysis.series
        if s.first_call is not None and (s.first_call.setup_s is not None or s.first_call.first_call_s is not None)
    ]
    if firsts and not compact:
        out.append(series_table(FIRST_CALL_TITLE, FIRST_CALL_COLUMNS, firsts, FIRST_CALL_NOTE))
    return out


def stack_labels(df) -> set[str]:
    """The series labels of a frame's model-stack cases (render/stack.py)."""
    from sparsebench.render.stack import stack_records

    stacks = stack_records(df)
    return set() if stacks is None else set(stacks["pattern_label"].astype(str))


def drift_note(analysis: Analysis) -> str | None:
    """One line on how the machine's speed moved during the run (None without probes)."""
    if analysis.probe is None:
        return None
    lo, hi = analysis.probe
    text = f"a fixed matmul probe took {format_time(lo)} to {format_time(hi)} between cases ({hi / lo:.2f}x)"
    if analysis.drifted:
        return (
            f"Machine speed varied during the run: {text}. A ratio of two cases measured at "
            "different times (speedup, efficiency) includes that drift (a short probe "
            "exaggerates it; long cases feel less); rerun, or compare runs, before trusting "
            "a small difference."
        )
    return f"Machine speed was steady during the run: {text}."


def to_markdown(analysis: Analysis, df=None) -> str:
    """The analysis section of summary.md: each table under its heading, then its note (``df``:
    as for ``tables``)."""
    parts = []
    for t in tables(analysis, df=df):
        parts.append(f"## {t.title}\n")
        parts.append(markdown_table(t.columns, t.rows))
        if t.note:
            parts.append(f"\n{t.note}\n")
    note = drift_note(analysis)
    if note:
        parts.append(f"## Machine speed\n\n{note}\n")
    return "\n".join(parts).rstrip() + "\n"


def renderables(analysis: Analysis, df=None) -> list:
    """The compact tables and the machine-speed line, for the terminal (rich; ``df``: as for
    ``tables``)."""
    out: list = [rich_table(t) for t in tables(analysis, compact=True, df=df)]
    note = drift_note(analysis)
    if note:
        from rich.text import Text

        out.append(Text(note, style="yellow" if analysis.drifted else "dim"))
    return out
