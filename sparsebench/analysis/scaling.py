"""What the records say: scaling exponents, crossover lengths, speedup and efficiency over the
dense baseline, and how far each series got before it ran out of memory or time.

``analyze(df)`` takes the tidy frame of ``results.load_frame`` and returns a frozen
``Analysis``; ``to_markdown()`` and ``rich_renderables()`` render the same tables (built once,
in ``tables()``) for summary.md and the terminal. numpy and rich are imported lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from sparsebench.results.folder import BASELINE_BACKEND, BASELINE_PATTERN, CASE_KEY, SERIES_KEY

# Statuses that end a series: the largest n that ran is the one just below the first of these.
FAILURES = ("oom", "timeout", "crashed", "error")
# Dimensions that a baseline must share with a series (the series key less pattern and backend).
SHAPE_KEY = tuple(c for c in SERIES_KEY if c not in ("pattern_label", "backend"))
# A leading size whose time grows slower than n**FLOOR_SLOPE up to the next size is taken to be
# dominated by fixed overhead (launch, dispatch, Python) and left out of the fit.
FLOOR_SLOPE = 0.5
MIN_FIT_POINTS = 3
# a probe spread above this is reported as machine-speed drift
DRIFT = 1.15

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (scipy is not a
# dependency); beyond 30 the normal-ish tail below is within 1% of the exact value.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(dof: int) -> float:
    if dof < 1:
        return math.inf
    if dof <= len(_T975):
        return _T975[dof - 1]
    return 1.95996 + 2.37 / dof


# ----------------------------------------------------------------------------------------------
# data


FIRST_CALL_TITLE = "First call"


@dataclass(frozen=True)
class Fit:
    """``log(y) = exponent * log(n) + intercept`` over ``sizes`` (those above the overhead
    floor). ``ci_low``/``ci_high`` bound the exponent at 95%; None with only two points."""

    exponent: float
    intercept: float
    ci_low: float | None
    ci_high: float | None
    sizes: tuple[int, ...]
    excluded: tuple[int, ...] = ()  # leading sizes below the overhead floor

    @property
    def points(self) -> int:
        return len(self.sizes)

    def predict(self, n: float) -> float:
        return math.exp(self.intercept) * n**self.exponent

    def describe(self) -> str:
        """"1.98 ± 0.07" (the 95% interval is symmetric about the slope)."""
        if self.ci_low is None or self.ci_high is None:
            return f"{self.exponent:.2f} (2 sizes, no CI)"
        return f"{self.exponent:.2f} ± {(self.ci_high - self.ci_low) / 2:.2f}"


@dataclass(frozen=True)
class Crossover:
    """Where a sparse series starts to beat the dense baseline.

    ``n`` is the interpolated crossover length (log-log between the two measured sizes around
    the sign change), the smallest common size when the series is faster everywhere, or None
    when it is never faster within the measured range."""

    n: float | None
    below_range: bool = False  # faster already at the smallest common size
    compared: int = 0  # sizes measured by both the series and the baseline

    def describe(self) -> str:
        if self.compared == 0:
            return "no common sizes with the baseline"
        if self.n is None:
            return "not within the measured range"
        if self.below_range:
            return f"<= {fmt_n(self.n)} (faster at every measured n)"
        return f"~{fmt_n(self.n)}"


@dataclass(frozen=True)
class FirstCall:
    """What a series' first call cost at its largest measured n, apart from the steady state:
    ``setup_s`` builds the pattern's layout or mask (before any call), ``first_call_s`` is the
    first call (compilation, autotuning, a native kernel's load, first touch of fresh memory),
    ``steady_s`` the median of the timed calls."""

    seq_len: int
    setup_s: float | None
    first_call_s: float | None
    steady_s: float
    # the largest first-call extra over all sizes, where it is at another n (a compile cache
    # filled by a smaller n, the native kernels loaded by the first case of the process)
    worst_extra_s: float | None = None
    worst_n: int | None = None

    @property
    def extra_s(self) -> float | None:
        """The first call's time beyond a steady call (negative: no slower, within the noise)."""
        return None if self.first_call_s is None else self.first_call_s - self.steady_s


@dataclass(frozen=True)
class Failure:
    seq_len: int
    status: str
    reason: str = ""


@dataclass(frozen=True)
class SeriesSummary:
    key: tuple[Any, ...]  # values of SERIES_KEY
    label: str  # display label, naming only the dimensions that vary in the frame
    is_baseline: bool
    time_fit: Fit | None
    mem_fit: Fit | None
    crossover: Crossover | None  # None for dense series
    largest_n: int | None  # the largest n with a speedup (ok here and in the baseline)
    speedup: float | None  # at largest_n
    ideal_speedup: float | None
    efficiency: float | None
    best_speedup: float | None
    best_speedup_n: int | None
    max_ok_n: int | None  # the longest n that ran before the first failure
    failure: Failure | None  # the first oom/timeout/crash/error
    sizes: tuple[int, ...] = ()  # all sizes with an ok measurement
    compile_s: float | None = None  # largest compile time seen (flex)
    first_call: FirstCall | None = None  # at the largest ok n
    wrong_sizes: tuple[int, ...] = ()  # sizes whose output disagreed with the reference

    @property
    def shown_label(self) -> str:
        """The label in tables, the baseline named as such."""
        return self.label + (" (baseline)" if self.is_baseline else "")

    def problems(self) -> str:
        bits = []
        if self.failure:
            bits.append(f"{self.failure.status} at {fmt_n(self.failure.seq_len)}")
        if self.wrong_sizes:
            bits.append("wrong result at " + ", ".join(fmt_n(n) for n in self.wrong_sizes))
        return "; ".join(bits) or "-"

    def get(self, column: str) -> Any:
        return self.key[SERIES_KEY.index(column)]

    @property
    def pattern_label(self) -> str:
        return self.get("pattern_label")

    @property
    def backend(self) -> str:
        return self.get("backend")


@dataclass(frozen=True)
class TableSpec:
    """A renderer-neutral table: Markdown, rich and HTML are drawn from the same cells."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""
    wrap: tuple[int, ...] = (0,)  # columns that may wrap in a narrow terminal (others stay whole)


@dataclass(frozen=True)
class Analysis:
    series: tuple[SeriesSummary, ...] = field(default_factory=tuple)
    #: fastest and slowest time of the machine probe (harness.probe) over the run's cases
    probe: tuple[float, float] | None = None

    @property
    def drifted(self) -> bool:
        """Whether the machine probe moved by more than DRIFT during the run."""
        return self.probe is not None and self.probe[1] / self.probe[0] > DRIFT

    def drift_note(self) -> str | None:
        """One line on how the machine's speed moved during the run (None without probes)."""
        if self.probe is None:
            return None
        lo, hi = self.probe
        text = (f"a fixed matmul probe took {fmt_time(lo)} to {fmt_time(hi)} between cases "
                f"({hi / lo:.2f}x)")
        if self.drifted:
            return (f"Machine speed varied during the run: {text}. A ratio of two cases measured at "
                    "different times (speedup, efficiency) includes that drift (a short probe "
                    "exaggerates it; long cases feel less); rerun, or compare runs, before trusting "
                    "a small difference.")
        return f"Machine speed was steady during the run: {text}."

    def find(self, pattern_label: str, backend: str, **dims: Any) -> SeriesSummary | None:
        for s in self.series:
            if s.pattern_label == pattern_label and s.backend == backend and all(
                s.get(k) == v for k, v in dims.items()
            ):
                return s
        return None

    def by_key(self) -> dict[tuple[Any, ...], SeriesSummary]:
        return {s.key: s for s in self.series}

    # -- tables -------------------------------------------------------------------------------
    def tables(self, compact: bool = False) -> list[TableSpec]:
        """The summary tables; ``compact`` (for an 80-column terminal) drops the fit range and
        the best speedup columns, and the first-call table."""
        out = self._tables()
        if not compact:
            return out
        out = [t for t in out if t.title != FIRST_CALL_TITLE]
        drop = {"fit range", "best"}
        short = []
        for t in out:
            keep = [i for i, c in enumerate(t.columns) if c not in drop]
            rows = tuple(tuple(("not in range" if v == "not within the measured range" else v)
                               for i, v in enumerate(r) if i in keep) for r in t.rows)
            wrap = tuple(keep.index(i) for i in t.wrap if i in keep)
            note = t.note.replace(" best: the highest speedup and where.", "").replace(", over the fit range (sizes used)", "")
            short.append(TableSpec(t.title, tuple(t.columns[i] for i in keep), rows, note, wrap))
        return short

    def _tables(self) -> list[TableSpec]:
        if not self.series:
            return [TableSpec("Scaling", ("note",), (("no successful measurements to analyse",),))]
        scaling = []
        for s in self.series:
            scaling.append(
                (
                    s.shown_label,
                    s.time_fit.describe() if s.time_fit else _no_fit(s.sizes),
                    _fit_range(s.time_fit),
                    s.mem_fit.describe() if s.mem_fit else "-",
                    fmt_n(s.max_ok_n) if s.max_ok_n else "-",
                    s.problems(),
                )
            )
        out = [
            TableSpec(
                "Scaling",
                ("series", "time exp.", "fit range", "memory exp.", "max ok n", "problems"),
                tuple(scaling),
                "Exponent k of time ∝ n^k (and of peak memory): least-squares slope of log(time) on "
                "log(n) ± its 95% confidence interval, over the fit range (sizes used). Leading sizes "
                f"whose time grows slower than n^{FLOOR_SLOPE} are overhead-dominated and left out. "
                "Dense attention should read about 2, a sparse kernel about 1. max ok n: the longest "
                "sequence that ran before the first oom/timeout/crash/error.",
                wrap=(0, 2, 5),
            )
        ]
        others = [s for s in self.series if not s.is_baseline]
        if others:
            rows = []
            for s in others:
                rows.append(
                    (
                        s.label,
                        s.crossover.describe() if s.crossover else "- (dense)",
                        fmt_n(s.largest_n) if s.largest_n else "-",
                        fmt_ratio(s.speedup),
                        fmt_ratio(s.ideal_speedup),
                        fmt_pct(s.efficiency),
                        f"{fmt_ratio(s.best_speedup)} at {fmt_n(s.best_speedup_n)}" if s.best_speedup else "-",
                    )
                )
            out.append(
                TableSpec(
                    "Against the dense baseline (dense · sdpa)",
                    ("series", "crossover n", "at n", "speedup", "ideal", "efficiency", "best"),
                    tuple(rows),
                    "Crossover: the smallest n from which on the series beats dense sdpa at every measured size, interpolated in "
                    "log space. At the largest n both ran: speedup = dense sdpa median / series "
                    "median (same shape), ideal = nnz(dense) / nnz(pattern), efficiency = speedup / "
                    "ideal (above 100%: faster per allowed pair than dense sdpa is per pair, as a "
                    "kernel faster than SDPA on the dense pattern itself reads). best: the highest "
                    "speedup and where.",
                    wrap=(0, 1, 6),
                )
            )
        firsts = [s for s in self.series if s.first_call is not None
                  and (s.first_call.setup_s is not None or s.first_call.first_call_s is not None)]
        if firsts:
            out.append(
                TableSpec(
                    FIRST_CALL_TITLE,
                    ("series", "at n", "setup", "first call", "steady", "first call - steady", "most, at n"),
                    tuple(
                        (
                            s.shown_label,
                            fmt_n(f.seq_len),
                            fmt_time(f.setup_s),
                            fmt_time(f.first_call_s),
                            fmt_time(f.steady_s),
                            fmt_time(f.extra_s),
                            f"{fmt_time(f.worst_extra_s)} at {fmt_n(f.worst_n)}" if f.worst_n else "-",
                        )
                        for s in firsts
                        for f in (s.first_call,)
                    ),
                    "At each series' largest measured n (its first round): setup builds the pattern's "
                    "layout or mask before any call; the first call includes compilation and "
                    "autotuning (flex, Triton), loading the native CPU kernels, and the first touch "
                    "of fresh memory; steady is the median of the timed calls (a negative difference: "
                    "the first call was no slower, within the noise). Setup and the first call's "
                    "extra time are not in the steady-state figures above (records: setup_s, "
                    "first_call_s, compile_s). most, at n: the largest first-call extra of the "
                    "series where it fell on a smaller n and stands out (costs paid once per process, such as "
                    "loading the native kernels or a cold compile cache, fall on the first case "
                    "that needs them); records.jsonl has every case's.",
                    wrap=(0,),
                )
            )
        return out

    def to_markdown(self) -> str:
        parts = []
        for t in self.tables():
            parts.append(f"## {t.title}\n")
            parts.append(markdown_table(t.columns, t.rows))
            if t.note:
                parts.append(f"\n{t.note}\n")
        note = self.drift_note()
        if note:
            parts.append(f"## Machine speed\n\n{note}\n")
        return "\n".join(parts).rstrip() + "\n"

    def rich_renderables(self) -> list:
        out: list = [rich_table(t) for t in self.tables(compact=True)]
        note = self.drift_note()
        if note:
            from rich.text import Text

            out.append(Text(note, style="yellow" if self.drifted else "dim"))
        return out

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return {"series": [dataclasses.asdict(s) for s in self.series]}


# ----------------------------------------------------------------------------------------------
# analysis


def analyze(df, floor_slope: float = FLOOR_SLOPE, min_points: int = MIN_FIT_POINTS) -> Analysis:
    """Fit, compare with the baseline and summarise every series of a results frame."""
    if df is None or len(df) == 0:
        return Analysis(())
    df = ensure_derived(df)
    labels = series_labels(df)
    baselines = {}
    groups = []
    for key, g in iter_groups(df, SERIES_KEY):
        g = g.sort_values("seq_len")
        groups.append((key, g))
        if is_baseline_key(key):
            baselines[_shape_of(key)] = g
    out = []
    for key, g in groups:
        base = baselines.get(_shape_of(key))
        # a decode window's per-token latency is flat by design: no overhead floor to drop
        floor = float("-inf") if dict(zip(SERIES_KEY, key)).get("mode") == "decode" else floor_slope
        out.append(_summarise(key, g, labels[key], base, floor, min_points))
    out.sort(key=lambda s: (not s.is_baseline, s.get("device"), s.get("dtype"), s.get("mode"), s.label))
    return Analysis(tuple(out), _probe_spread(df))


def _probe_spread(df) -> tuple[float, float] | None:
    """(fastest, slowest) machine probe of the device where it moved most (probes of different
    devices are different workloads), or None with fewer than two probes."""
    if "probe_s" not in df:
        return None
    import pandas as pd

    ok = df[positive_mask(df, "probe_s")]
    worst = None
    for _, g in (ok.groupby("device") if "device" in ok else [(None, ok)]):
        p = pd.to_numeric(g["probe_s"], errors="coerce")
        if len(p) >= 2 and (worst is None or p.max() / p.min() > worst[1] / worst[0]):
            worst = (float(p.min()), float(p.max()))
    return worst


def _summarise(key, g, label, base, floor_slope, min_points) -> SeriesSummary:
    import numpy as np

    baseline = is_baseline_key(key)
    ok = g[(g["status"] == "ok") & positive_mask(g, "time_median_s")]
    sizes = tuple(int(n) for n in ok["seq_len"])
    time_fit = fit_power(ok["seq_len"], ok["time_median_s"], floor_slope, min_points)
    mem_ok = g[(g["status"] == "ok") & positive_mask(g, "peak_mem_bytes")] if "peak_mem_bytes" in g else g.iloc[0:0]
    mem_fit = fit_power(mem_ok["seq_len"], mem_ok["peak_mem_bytes"], floor_slope, min_points)

    failed = g[g["status"].isin(FAILURES)]
    failure = None
    if len(failed):
        first = failed.iloc[0]
        failure = Failure(int(first["seq_len"]), str(first["status"]), _text(first.get("reason")))
        before = ok[ok["seq_len"] < failure.seq_len]["seq_len"]
        max_ok_n = int(before.max()) if len(before) else None
    else:
        max_ok_n = max(sizes) if sizes else None

    crossover = None
    largest_n = speedup = ideal = eff = best = best_n = None
    if key[SERIES_KEY.index("pattern_label")] != BASELINE_PATTERN and _pattern_of(g) != BASELINE_PATTERN:
        crossover = find_crossover(ok, base)
    if not baseline and "speedup" in g:
        sp = ok[np.isfinite(ok["speedup"].astype(float))]
        if len(sp):
            last = sp.iloc[-1]
            largest_n = int(last["seq_len"])
            speedup = _num(last["speedup"])
            ideal = _num(last.get("ideal_speedup"))
            eff = _num(last.get("efficiency"))
            top = sp.loc[sp["speedup"].astype(float).idxmax()]
            best, best_n = _num(top["speedup"]), int(top["seq_len"])
    compile_s = None
    if "compile_s" in g:
        c = g["compile_s"].dropna()
        c = c[c.astype(float) > 0] if len(c) else c
        compile_s = float(c.max()) if len(c) else None
    first_call = None
    if len(ok) and ("setup_s" in ok or "first_call_s" in ok):
        last = ok.iloc[-1]
        first_call = FirstCall(int(last["seq_len"]), _num(last.get("setup_s")), _num(last.get("first_call_s")),
                               float(last["time_median_s"]))
        extras = [(f - float(r["time_median_s"]), int(r["seq_len"])) for _, r in ok.iterrows()
                  if (f := _num(r.get("first_call_s"))) is not None]
        if extras:
            worst, n_worst = max(extras)
            # named where it stands out of the noise: beyond the largest n's own extra by half of
            # that n's steady time and 10 ms
            here = max(0.0, first_call.extra_s or 0.0)
            if n_worst != first_call.seq_len and worst > here + max(0.5 * first_call.steady_s, 0.01):
                first_call = replace(first_call, worst_extra_s=worst, worst_n=n_worst)
    return SeriesSummary(
        key=key,
        label=label,
        is_baseline=baseline,
        time_fit=time_fit,
        mem_fit=mem_fit,
        crossover=crossover,
        largest_n=largest_n,
        speedup=speedup,
        ideal_speedup=ideal,
        efficiency=eff,
        best_speedup=best,
        best_speedup_n=best_n,
        max_ok_n=max_ok_n,
        failure=failure,
        sizes=sizes,
        compile_s=compile_s,
        first_call=first_call,
        wrong_sizes=tuple(int(n) for n in g[g["status"] == "wrong"]["seq_len"]),
    )


def fit_power(ns: Iterable[float], ys: Iterable[float], floor_slope: float = FLOOR_SLOPE,
              min_points: int = MIN_FIT_POINTS) -> Fit | None:
    """Least-squares power law through (n, y) above the overhead floor; None for < 2 sizes.

    Duplicate sizes are averaged in log space. Leading sizes are dropped while the local slope
    to the next size is below ``floor_slope`` and more than ``min_points`` sizes remain."""
    import numpy as np

    pairs: dict[float, list[float]] = {}
    for n, y in zip(ns, ys):
        n, y = float(n), float(y)
        if n > 0 and y > 0 and math.isfinite(y):
            pairs.setdefault(n, []).append(math.log(y))
    if len(pairs) < 2:
        return None
    n_sorted = sorted(pairs)
    x = np.log(np.array(n_sorted))
    y = np.array([sum(pairs[n]) / len(pairs[n]) for n in n_sorted])
    start = 0
    while len(x) - start > min_points and (y[start + 1] - y[start]) / (x[start + 1] - x[start]) < floor_slope:
        start += 1
    xs, ysl = x[start:], y[start:]
    k = len(xs)
    xm, ym = xs.mean(), ysl.mean()
    sxx = float(((xs - xm) ** 2).sum())
    slope = float(((xs - xm) * (ysl - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    lo = hi = None
    if k > 2:
        resid = ysl - (slope * xs + intercept)
        se = math.sqrt(float((resid**2).sum()) / (k - 2) / sxx)
        half = t975(k - 2) * se
        lo, hi = slope - half, slope + half
    return Fit(
        exponent=slope,
        intercept=intercept,
        ci_low=lo,
        ci_high=hi,
        sizes=tuple(int(round(n)) for n in n_sorted[start:]),
        excluded=tuple(int(round(n)) for n in n_sorted[:start]),
    )


def find_crossover(ok, base) -> Crossover:
    """Smallest n from which on ``ok`` (a sparse series' ok rows) beats ``base`` (the
    baseline's) at every larger measured size; a faster-then-slower blip at small n is not a
    crossover."""
    if base is None:
        return Crossover(None, compared=0)
    b = base[(base["status"] == "ok") & positive_mask(base, "time_median_s")]
    bt = b.groupby("seq_len")["time_median_s"].median()
    st = ok.groupby("seq_len")["time_median_s"].median()
    common = sorted(set(bt.index) & set(st.index))
    if not common:
        return Crossover(None, compared=0)
    ratios = [(float(n), float(st[n]) / float(bt[n])) for n in common]
    # where sparse starts to pay *for good*: faster at this size and at every larger one
    if ratios[-1][1] >= 1.0:
        return Crossover(None, compared=len(common))
    last_slower = max((i for i, (_, r) in enumerate(ratios) if r >= 1.0), default=None)
    if last_slower is None:
        return Crossover(ratios[0][0], below_range=True, compared=len(common))
    (n0, r0), (n1, r1) = ratios[last_slower], ratios[last_slower + 1]
    lr0, lr1 = math.log(r0), math.log(r1)
    frac = lr0 / (lr0 - lr1) if lr0 != lr1 else 0.0
    return Crossover(math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))), compared=len(common))


# ----------------------------------------------------------------------------------------------
# helpers shared with plots, compare and the HTML report


def ensure_derived(df):
    if "speedup" not in df.columns:
        from sparsebench.results.folder import add_derived

        df = add_derived(df)
    return df


def is_baseline_key(key: Sequence[Any]) -> bool:
    return key[SERIES_KEY.index("pattern_label")] == BASELINE_PATTERN and key[SERIES_KEY.index("backend")] == BASELINE_BACKEND


def is_baseline_row(row) -> bool:
    return row.get("pattern") == BASELINE_PATTERN and row.get("backend") == BASELINE_BACKEND


def _shape_of(key: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(key[SERIES_KEY.index(c)] for c in SHAPE_KEY)


def _pattern_of(g) -> str:
    return str(g["pattern"].iloc[0]) if "pattern" in g and len(g) else ""


def iter_groups(df, keys: Sequence[str]):
    """groupby that keeps None/NaN keys and yields plain tuples, in first-seen order."""
    for key, g in df.groupby(list(keys), dropna=False, sort=False):
        if not isinstance(key, tuple):
            key = (key,)
        yield tuple(_plain(k) for k in key), g


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def positive_mask(g, col: str):
    import pandas as pd

    if col not in g:
        return pd.Series(False, index=g.index)
    v = pd.to_numeric(g[col], errors="coerce")
    return v.notna() & (v > 0)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _no_fit(sizes: tuple[int, ...]) -> str:
    if not sizes:
        return "no ok measurement"
    return "one size, no fit" if len(set(sizes)) == 1 else "-"


def _fit_range(fit: Fit | None) -> str:
    if fit is None:
        return "-"
    return f"{fmt_n(fit.sizes[0])}-{fmt_n(fit.sizes[-1])} ({fit.points})"


def varying_dims(df, dims: Sequence[str]) -> list[str]:
    """The columns of ``dims`` that take more than one value in ``df``."""
    return [c for c in dims if c in df.columns and df[c].astype(str).nunique() > 1]


def dim_text(column: str, value: Any) -> str:
    if column == "causal":
        return "causal" if value else "bidirectional"
    if column in ("batch", "heads", "head_dim"):
        short = {"batch": "B", "heads": "H", "head_dim": "D"}[column]
        return f"{short}={value}"
    if column == "seq_len":
        return f"n={value}"
    return str(value)


def series_labels(df) -> dict[tuple[Any, ...], str]:
    """"pattern_label · backend", plus the other series dimensions that vary in the frame."""
    extra = varying_dims(df, SERIES_KEY[2:])
    out = {}
    for key, _ in iter_groups(df, SERIES_KEY):
        row = dict(zip(SERIES_KEY, key))
        bits = [f"{row['pattern_label']} · {row['backend']}"] + [dim_text(c, row[c]) for c in extra]
        out[key] = ", ".join(bits)
    return out


def case_label(key: Sequence[Any], show: Sequence[str]) -> str:
    row = dict(zip(CASE_KEY, key))
    bits = [f"{row['pattern_label']} · {row['backend']}"] + [dim_text(c, row[c]) for c in show]
    return ", ".join(bits)


def fmt_n(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    return f"{int(round(n))}"


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def fmt_bytes(b: float | None) -> str:
    if b is None or not math.isfinite(b):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def fmt_pct(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{100 * r:.0f}%"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rich_table(t: TableSpec, row_styles: Sequence[str | None] | None = None):
    from rich import box
    from rich.table import Table

    table = Table(title=t.title, caption=t.note or None, caption_justify="left", title_justify="left",
                  box=box.SIMPLE_HEAD, title_style="bold")
    for i, c in enumerate(t.columns):
        wraps = i in t.wrap
        table.add_column(c, justify="left" if i == 0 else "right", no_wrap=not wraps,
                         overflow="fold" if wraps else "ellipsis", min_width=16 if i == 0 else None)
    for i, r in enumerate(t.rows):
        table.add_row(*[str(v) for v in r], style=row_styles[i] if row_styles else None)
    return table
