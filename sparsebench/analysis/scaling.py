"""What the records say: scaling exponents, crossover lengths, speedup and efficiency over the
dense baseline, and how far each series got before it ran out of memory or time.

``analyze(df)`` takes the tidy frame of ``results.load_frame`` and returns a frozen
``Analysis``: data only. ``render.analysis`` turns it into tables and sentences (summary.md,
the terminal, report.html). numpy and pandas are imported lazily."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from sparsebench.results.schema import BASELINE_BACKEND, BASELINE_PATTERN, CASE_KEY, SERIES_KEY
from sparsebench.stats import FLOOR_SLOPE, MIN_FIT_POINTS, Fit, fit_power

# Statuses that end a series: the largest n that ran is the one just below the first of these.
FAILURES = ("oom", "timeout", "crashed", "error")
# Dimensions that a baseline must share with a series (the series key less pattern and backend).
SHAPE_KEY = tuple(c for c in SERIES_KEY if c not in ("pattern_label", "backend"))
# a probe spread above this is reported as machine-speed drift
DRIFT = 1.15
# An exponent is a finding only where its 95% interval is narrower than +-FINDING_HALF_WIDTH
# and at least FINDING_SIZES sizes lie above the overhead floor; otherwise every renderer shows
# it with its ``fit_status`` beside the value and the analysis text does not cite it.
FINDING_HALF_WIDTH = 0.25
FINDING_SIZES = 3
FINDING = "finding"
TOO_FEW_SIZES = "too few sizes"
TOO_NOISY = "too noisy"


# ----------------------------------------------------------------------------------------------
# data


def fit_status(fit: Fit | None) -> str | None:
    """What an exponent may be read as: FINDING, TOO_FEW_SIZES (fewer than FINDING_SIZES sizes
    above the overhead floor, or no interval) or TOO_NOISY (its 95% interval is as wide as
    +-FINDING_HALF_WIDTH or wider); None without a fit. The one place this is decided."""
    if fit is None:
        return None
    if fit.points < FINDING_SIZES or fit.half_width is None:
        return TOO_FEW_SIZES
    if not fit.half_width < FINDING_HALF_WIDTH:
        return TOO_NOISY
    return FINDING


@dataclass(frozen=True)
class Crossover:
    """Where a sparse series starts to beat the dense baseline.

    ``n`` is the interpolated crossover length (log-log between the two measured sizes around
    the sign change), the smallest common size when the series is faster everywhere, or None
    when it is never faster within the measured range."""

    n: float | None
    below_range: bool = False  # faster already at the smallest common size
    compared: int = 0  # sizes measured by both the series and the baseline


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
    """The first size at which a series did not run (oom, timeout, crashed, error), and why."""

    seq_len: int
    status: str
    reason: str = ""


@dataclass(frozen=True)
class SeriesSummary:
    """One series (a pattern on a backend at one device, dtype, mode and shape) over its sizes:
    its fits, how it stands against the dense baseline, how far it ran, its first call."""

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
    # the highest efficiency over the sizes and where (above 1: the series beat its ideal there)
    peak_efficiency: float | None = None
    peak_efficiency_n: int | None = None
    # speedup over the baseline of dense attention on this series' own backend (its dense path)
    # at peak_efficiency_n; None where the scenario did not run dense on that backend
    dense_path_speedup: float | None = None

    @property
    def time_status(self) -> str | None:
        """``fit_status`` of the time exponent."""
        return fit_status(self.time_fit)

    @property
    def mem_status(self) -> str | None:
        """``fit_status`` of the memory exponent."""
        return fit_status(self.mem_fit)

    @property
    def above_ideal(self) -> bool:
        """Whether a sparse series beat its ideal speedup at some size (efficiency above 100% at
        peak_efficiency_n): faster per allowed pair than the dense baseline is per pair."""
        return (
            self.pattern_label != BASELINE_PATTERN and self.peak_efficiency is not None and self.peak_efficiency > 1.0
        )

    @property
    def own_dense_efficiency(self) -> float | None:
        """The efficiency at peak_efficiency_n against the series' own backend's dense path
        instead of the baseline: speedup / (ideal x dense_path_speedup); None without that path."""
        if self.peak_efficiency is None or not self.dense_path_speedup:
            return None
        return self.peak_efficiency / self.dense_path_speedup

    @property
    def shown_label(self) -> str:
        """The label in tables, the baseline named as such."""
        return self.label + (" (baseline)" if self.is_baseline else "")

    def get(self, column: str) -> Any:
        return self.key[SERIES_KEY.index(column)]

    @property
    def pattern_label(self) -> str:
        return self.get("pattern_label")

    @property
    def backend(self) -> str:
        return self.get("backend")


@dataclass(frozen=True)
class Analysis:
    """Every series of a results frame (the baseline first), and the machine probe's spread."""

    series: tuple[SeriesSummary, ...] = field(default_factory=tuple)
    #: fastest and slowest time of the machine probe (harness.probe) over the run's cases
    probe: tuple[float, float] | None = None

    @property
    def drifted(self) -> bool:
        """Whether the machine probe moved by more than DRIFT during the run."""
        return self.probe is not None and self.probe[1] / self.probe[0] > DRIFT

    def find(self, pattern_label: str, backend: str, **dims: Any) -> SeriesSummary | None:
        for s in self.series:
            if (
                s.pattern_label == pattern_label
                and s.backend == backend
                and all(s.get(k) == v for k, v in dims.items())
            ):
                return s
        return None

    def by_key(self) -> dict[tuple[Any, ...], SeriesSummary]:
        return {s.key: s for s in self.series}

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
    dense_paths = {}  # (shape, backend) -> the dense series on that backend
    groups = []
    for key, g in iter_groups(df, SERIES_KEY):
        g = g.sort_values("seq_len")
        groups.append((key, g))
        if is_baseline_key(key):
            baselines[_shape_of(key)] = g
        if key[SERIES_KEY.index("pattern_label")] == BASELINE_PATTERN:
            dense_paths[(_shape_of(key), key[SERIES_KEY.index("backend")])] = g
    out = []
    for key, g in groups:
        base = baselines.get(_shape_of(key))
        # a decode window's per-token latency is flat by design: no overhead floor to drop
        floor = float("-inf") if dict(zip(SERIES_KEY, key)).get("mode") == "decode" else floor_slope
        s = _summarise(key, g, labels[key], base, floor, min_points)
        path = dense_paths.get((_shape_of(key), key[SERIES_KEY.index("backend")]))
        if s.peak_efficiency_n is not None and path is not None and not s.is_baseline:
            s = replace(s, dense_path_speedup=_speedup_at(path, s.peak_efficiency_n))
        out.append(s)
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
    for _, g in ok.groupby("device") if "device" in ok else [(None, ok)]:
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
    largest_n = speedup = ideal = eff = best = best_n = peak_eff = peak_eff_n = None
    if key[SERIES_KEY.index("pattern_label")] != BASELINE_PATTERN and _pattern_of(g) != BASELINE_PATTERN:
        crossover = find_crossover(ok, base)
    if not baseline and "speedup" in g:
        sp = ok[np.isfinite(ok["speedup"].astype(float))]
        if len(sp):
            last = sp.iloc[-1]
            largest_n = int(last["seq_len"])
            speedup = finite_or_none(last["speedup"])
            ideal = finite_or_none(last.get("ideal_speedup"))
            eff = finite_or_none(last.get("efficiency"))
            top = sp.loc[sp["speedup"].astype(float).idxmax()]
            best, best_n = finite_or_none(top["speedup"]), int(top["seq_len"])
            effs = sp["efficiency"].astype(float) if "efficiency" in sp else None
            if effs is not None and effs.notna().any():
                at = effs.idxmax()
                peak_eff, peak_eff_n = finite_or_none(effs[at]), int(sp.loc[at, "seq_len"])
    compile_s = None
    if "compile_s" in g:
        c = g["compile_s"].dropna()
        c = c[c.astype(float) > 0] if len(c) else c
        compile_s = float(c.max()) if len(c) else None
    first_call = None
    if len(ok) and ("setup_s" in ok or "first_call_s" in ok):
        last = ok.iloc[-1]
        first_call = FirstCall(
            int(last["seq_len"]),
            finite_or_none(last.get("setup_s")),
            finite_or_none(last.get("first_call_s")),
            float(last["time_median_s"]),
        )
        extras = [
            (f - float(r["time_median_s"]), int(r["seq_len"]))
            for _, r in ok.iterrows()
            if (f := finite_or_none(r.get("first_call_s"))) is not None
        ]
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
        peak_efficiency=peak_eff,
        peak_efficiency_n=peak_eff_n,
        max_ok_n=max_ok_n,
        failure=failure,
        sizes=sizes,
        compile_s=compile_s,
        first_call=first_call,
        wrong_sizes=tuple(int(n) for n in g[g["status"] == "wrong"]["seq_len"]),
    )


def _speedup_at(g, n: int) -> float | None:
    """The ok speedup of series rows ``g`` at n, or None."""
    if "speedup" not in g:
        return None
    at = g[(g["status"] == "ok") & (g["seq_len"] == n)]["speedup"]
    return finite_or_none(at.iloc[-1]) if len(at) else None


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
    return (
        key[SERIES_KEY.index("pattern_label")] == BASELINE_PATTERN
        and key[SERIES_KEY.index("backend")] == BASELINE_BACKEND
    )


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
        yield tuple(plain_value(k) for k in key), g


def plain_value(v: Any) -> Any:
    """A numpy scalar as its Python value, NaN as None (a frame cell as a key or a record field)."""
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


def finite_or_none(v: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, inf, text)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def varying_dims(df, dims: Sequence[str]) -> list[str]:
    """The columns of ``dims`` that take more than one value in ``df``."""
    return [c for c in dims if c in df.columns and df[c].astype(str).nunique() > 1]


def dim_text(column: str, value: Any) -> str:
    if column == "causal":
        return "causal" if value else "bidirectional"
    if column in ("batch", "heads", "kv_heads", "head_dim"):
        short = {"batch": "B", "heads": "H", "kv_heads": "KV", "head_dim": "D"}[column]
        return f"{short}={value}"
    if column == "seq_len":
        return f"n={value}"
    return str(value)


def series_labels(df) -> dict[tuple[Any, ...], str]:
    """ "pattern_label · backend", plus the other series dimensions that vary in the frame."""
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
