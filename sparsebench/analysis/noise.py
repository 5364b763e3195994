"""How far a timed case can be trusted: its samples, the run's typical spread, and the confidence
interval of a case's time or of the ratio of two cases' times.

The samples of a case are what its reported time is the median of, as far as they are
independent: each round's median where the case ran in rounds (``round_medians_s``), else the
medians of up to ``BLOCKS`` blocks of consecutive calls. Calls of one round are not independent
samples (they share the machine's state of that moment), so pooling every call, as a rank test
over raw times does, makes two runs of the same program look different.

Spread is measured on log times (a slowdown is a factor). Two or three samples cannot show a
case's spread on their own, and the run's typical spread (``Noise``: pooled over every case of
the runs compared) misses a case that is noisier than the rest, so a case's variance is the two
combined, the typical one weighing as much as PRIOR_DOF degrees of freedom of the case's own
(the "moderated" variance of empirical Bayes), with PRIOR_DOF plus the case's own degrees of
freedom. An interval is Student's t on the log of the ratio, around the reported ratio:
``exp(log(new / base) +- t * sd * sqrt(1/n_base + 1/n_new))``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from sparsebench.stats import t_cdf, t_quantile

MIN_CASES = 8  # a comparison of fewer cases judges each from its own samples (``RatioError.of``)
BLOCKS = 5  # a case measured in one round: its calls in up to this many consecutive blocks
PRIOR_DOF = 8  # how much the typical spread weighs in a case's (in degrees of freedom): Noise, own_errors


def _floats(value: Any) -> list[float]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    if not isinstance(value, (list, tuple)):
        return []
    out = []
    for v in value:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            out.append(f)
    return out


def samples(rec: dict[str, Any], metric: str = "median") -> list[float]:
    """A case's samples of its time: with ``metric`` "median" the rounds' medians (two rounds or
    more), else the medians of up to BLOCKS blocks of consecutive calls (single calls when there
    are fewer); with "min" or "fast" the rounds' fastest calls, or the blocks' fastest."""
    fastest = metric != "median"
    per_round = _floats(rec.get("round_mins_s" if fastest else "round_medians_s"))
    if len(per_round) >= 2:
        return per_round
    times = _floats(rec.get("times_s"))
    k = min(BLOCKS, len(times))
    if k == 0:
        return []
    of = min if fastest else statistics.median
    size, extra = divmod(len(times), k)
    out, i = [], 0
    for b in range(k):
        j = i + size + (1 if b < extra else 0)
        out.append(of(times[i:j]))
        i = j
    return out


def fast_time(rec: dict[str, Any]) -> float | None:
    """A case's time for the gate ("fast"): the geometric mean of the fastest half (rounded up) of
    its rounds' fastest calls (with one round, of its blocks' fastest calls: ``samples``); None
    without samples. Interference on a shared machine only adds time, so a round's fastest call is
    its best moment; but the machine also has lucky moments (a round whose calls all ran 20-30%
    faster than every other round of both runs), and the fastest call over the rounds takes such a
    moment whole, in one run and not the other. The fastest half takes the machine's good moments
    without resting on one: of five rounds, the three fastest."""
    fast = _fastest_half(rec)
    if not fast:
        return None
    return math.exp(sum(math.log(v) for v in fast) / len(fast))


def _fastest_half(rec: dict[str, Any]) -> list[float]:
    """The fastest half (rounded up) of a case's rounds' fastest calls (of its blocks' with one
    round): what ``fast_time`` averages."""
    s = sorted(samples(rec, "min"))
    return s[: (len(s) + 1) // 2]


def _log_var(values: Sequence[float]) -> tuple[float, int]:
    """(sample variance of log values, degrees of freedom); (0, 0) for fewer than two."""
    if len(values) < 2:
        return 0.0, 0
    return statistics.variance([math.log(v) for v in values]), len(values) - 1


@dataclass(frozen=True)
class Noise:
    """The typical spread of a case's log-time samples in the runs it was pooled over: the
    variance pooled over cases (each weighted by its degrees of freedom), as a standard deviation,
    with its degrees of freedom and the number of cases that gave it."""

    sd: float
    dof: int
    cases: int

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]], metric: str = "median") -> "Noise":
        """Pooled over the ok records given (one run's, or two runs' together), of ``samples``
        for ``metric``."""
        total, dof, cases = 0.0, 0, 0
        for rec in records:
            if rec.get("status") != "ok":
                continue
            var, d = _log_var(samples(rec, metric))
            if d:
                total += var * d
                dof += d
                cases += 1
        return cls(math.sqrt(total / dof) if dof else 0.0, dof, cases)

    def case_sd(self, *sample_sets: Sequence[float]) -> tuple[float, int]:
        """(sd, dof) for a case with these samples (of one run, or of each of two runs): its own
        spread and the typical one combined, the typical one weighing min(PRIOR_DOF, its dof)."""
        total, dof = 0.0, 0
        for s in sample_sets:
            var, d = _log_var(s)
            total += var * d
            dof += d
        prior = min(PRIOR_DOF, self.dof)
        total += prior * self.sd**2
        dof += prior
        return (math.sqrt(total / dof) if dof else 0.0), dof


QN_EFFICIENCY = 0.82  # Qn's efficiency against a standard deviation on normal data (Rousseeuw and Croux)


def qn_scale(values: Sequence[float]) -> float:
    """Rousseeuw and Croux's Qn, a standard deviation robust to half of the values moving: 2.2219
    times the k-th smallest of the pairwise distances |x_i - x_j| (k = h(h-1)/2, h = n//2 + 1,
    about their first quartile), times its small-sample factor (n/(n+1.4) for odd n of 10 or more,
    n/(n+3.8) for even; tabulated below 10). As robust as 1.4826 times the median absolute deviation, with 82%
    of a standard deviation's efficiency on normal data where the MAD has 37%: judged as if from
    0.82 (n-1) degrees of freedom, not 0.37 (n-1). 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    h = n // 2 + 1
    k = h * (h - 1) // 2
    dists = sorted(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :])
    if n in _QN_SMALL:
        factor = _QN_SMALL[n]
    else:
        factor = n / (n + 1.4) if n % 2 else n / (n + 3.8)
    return 2.2219 * dists[k - 1] * factor


# Qn's small-sample factors below 10 values (Croux and Rousseeuw, 1992)
_QN_SMALL = {2: 0.399, 3: 0.994, 4: 0.512, 5: 0.844, 6: 0.611, 7: 0.857, 8: 0.669, 9: 0.872}


def fast_log_var(rec: dict[str, Any]) -> tuple[float, int] | None:
    """(the sample variance of the logs of what ``fast_time`` averages, how many it averages): the
    fastest half of a case's rounds' fastest calls (of its blocks' with one round); None for fewer
    than two."""
    fast = _fastest_half(rec)
    if len(fast) < 2:
        return None
    return statistics.variance([math.log(v) for v in fast]), len(fast)


def own_errors(pairs: dict[Any, tuple[dict[str, Any], dict[str, Any]]]) -> dict[Any, tuple[float, int]]:
    """Each case's own standard error of the log of its ratio of ``fast_time``, by key, from its
    (base, new) records: sqrt(v * (1 / k_base + 1 / k_new)), with k how many values each run's
    time averages and v the variance of their logs (``fast_log_var``) pooled over the case's two
    runs (a case is as noisy in both: the machine's moments move it, not the build), moderated
    toward the typical one (the median over the cases and runs) with PRIOR_DOF degrees of
    freedom: the variance of a few values is itself uncertain. Empty where no case has one."""
    found = {k: (fast_log_var(b), fast_log_var(n)) for k, (b, n) in pairs.items()}
    known = [v[0] for both in found.values() for v in both if v is not None]
    if not known:
        return {}
    typical = statistics.median(known)
    out = {}
    for key, both in found.items():
        total, dof, inverse = PRIOR_DOF * typical, PRIOR_DOF, 0.0
        for v in both:
            var, k = v if v is not None else (typical, 1)
            total += (k - 1) * var
            dof += k - 1
            inverse += 1 / k
        out[key] = (math.sqrt(total / dof * inverse) if dof else 0.0, dof)
    return out


@dataclass(frozen=True)
class Spread:
    """How the log ratios new / base of a comparison's cases scatter around their common shift:
    their Qn (``qn_scale``), a standard deviation that a minority of changed cases does not move,
    with the degrees of freedom of its efficiency, QN_EFFICIENCY (cases - 1). A median absolute
    deviation would be as robust but as uncertain as a standard deviation of 13 cases where there
    are 36: intervals from it at 35 degrees of freedom were too narrow (simulated A/A pairs of 36
    normal cases raised a false alarm in 10% of pairs where Holm's control states 5%).

    Cases are not equally noisy: on a shared 2-core CPU a small memory-bound kernel (Child et al.'s
    strided pattern on ``block_sparse``) moved between two runs of one program four to eight times
    as far as dense SDPA, and one spread for all judged it too narrowly (every false alarm of the
    recorded A/A pairs) and the quiet cases too widely. ``scaled`` gives each case its own error
    (``own_errors``, the gate metric's): its ``own`` standard error times ``factor``, the Qn of the
    cases' deviations from their common shift, each in units of its own error. How far a case's
    fastest rounds scatter within a run tells how far the machine's moments move it (the
    correlation was 0.96 over 36 cases), and the comparison itself tells by how much to scale that.

    This is the comparison's noise as the two runs show it, whatever its source (the machine,
    the rounds, the kernels); a change common to every case (a slower machine, a slower library)
    moves the median, not the spread, and is still judged against 1. A case's own rounds would
    overstate the noise of its reported time where the noise is one-sided: a slow round (another
    tenant, a descheduled thread) moves its round's figure but not the fastest calls of the run."""

    sd: float
    dof: int
    cases: int

    factor: float | None = None  # scaled: the Qn of the cases' deviations in units of their own errors
    own: dict[Any, tuple[float, int]] = field(default_factory=dict, compare=False)  # scaled: (error, dof) by case

    @classmethod
    def of(cls, ratios: Iterable[float]) -> "Spread | None":
        """From the cases' ratios; None for fewer than MIN_CASES (judge from samples instead)."""
        logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
        if len(logs) < MIN_CASES:
            return None
        return cls(qn_scale(logs), max(1, round(QN_EFFICIENCY * (len(logs) - 1))), len(logs))

    def scaled(self, ratios: dict[Any, float], own: dict[Any, tuple[float, int]]) -> "Spread":
        """This spread with each case's own error (``own``: by key, its standard error and degrees
        of freedom) scaled by the Qn of the cases' deviations from the median log ratio, each
        divided by its own error; unchanged where fewer than MIN_CASES cases have an own error
        above 0."""
        logs = {k: math.log(r) for k, r in ratios.items() if r > 0 and math.isfinite(r)}
        keys = [k for k in logs if k in own and own[k][0] > 0]
        if len(keys) < MIN_CASES:
            return self
        mid = statistics.median(logs.values())
        factor = qn_scale([(logs[k] - mid) / own[k][0] for k in keys])
        return replace(self, factor=factor, own={k: own[k] for k in keys})

    def error(self, key: Any = None) -> "RatioError":
        """The standard error of a case's log ratio: its own, scaled (``scaled``), where it has one,
        with the degrees of freedom of both estimates (1 / dof = 1 / the factor's + 1 / its own:
        a deviation divided by an uncertain error has heavier tails than a normal one), else the
        spread's."""
        if self.factor is not None and key in self.own:
            se, dof = self.own[key]
            return RatioError(self.factor * se, max(1, int(1 / (1 / self.dof + 1 / dof))))
        return RatioError(self.sd, self.dof)

    @property
    def typical(self) -> float:
        """A typical case's standard error: the median of the scaled own errors, else the spread."""
        return self.typical_error().se

    def typical_error(self) -> "RatioError":
        """A typical case's error: the case of the median own error where scaled, else the spread's."""
        if self.factor is None:
            return RatioError(self.sd, self.dof)
        ranked = sorted(self.own, key=lambda k: self.own[k][0])
        return self.error(ranked[len(ranked) // 2])

    @property
    def span(self) -> tuple[float, float]:
        """The smallest and largest case's standard error."""
        if self.factor is None:
            return self.sd, self.sd
        errors = [se for se, _ in self.own.values()]
        return self.factor * min(errors), self.factor * max(errors)


@dataclass(frozen=True)
class Shift:
    """The common shift of a comparison: the median of its cases' ratios (``ratio``), a whole run
    slower or faster (a slower build, a slower library, or a slower machine, which the probe
    tells), with the standard error of that median: 1.2533 times the comparison's spread over
    the square root of the number of cases (a median is less efficient than a mean). Where every
    case moved by about as much, the shift is known far better than any one case: over 36 cases
    at a 6% spread, to about 1.3% against 6%."""

    ratio: float
    error: RatioError
    cases: int

    @classmethod
    def of(cls, ratios: Iterable[float], spread: Spread | None) -> Shift | None:
        """From the cases' ratios and their spread; None without a spread (fewer than MIN_CASES)."""
        logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
        if spread is None or len(logs) < MIN_CASES:
            return None
        se = 1.2533 * spread.sd / math.sqrt(len(logs))
        return cls(math.exp(statistics.median(logs)), RatioError(se, spread.dof), len(logs))


def robust_se(a: Sequence[float], b: Sequence[float]) -> float:
    """A case's own standard error of the log ratio of its two runs' medians, from its samples,
    robust to one bad sample (a round that met a burst of load): 1.4826 times the median absolute
    deviation of the log samples from their run's median (the median itself left out), times
    1.2533 (a median is less efficient than a mean) and sqrt(1/n_a + 1/n_b). 0 without spread."""
    devs = []
    for s in (a, b):
        logs = [math.log(v) for v in s]
        if len(logs) < 2:
            continue
        mid = statistics.median(logs)
        d = sorted(abs(v - mid) for v in logs)
        devs += d[1:] if len(d) % 2 else d  # an odd sample's median deviates by 0 from itself
    if not devs or not a or not b:
        return 0.0
    return 1.4826 * statistics.median(devs) * 1.2533 * math.sqrt(1 / len(a) + 1 / len(b))


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a positive quantity (a time, or a ratio of times)."""

    low: float
    high: float
    level: float  # e.g. 0.95; for a family of cases, each one's level

    def text(self, digits: int = 2) -> str:
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _half_width(sd: float, dof: int, level: float, scale: float) -> float:
    if dof < 1:
        return math.inf
    return t_quantile(1 - (1 - level) / 2, dof) * sd * scale


@dataclass(frozen=True)
class RatioError:
    """The standard error of a ratio's log (``se``) with its degrees of freedom: what its interval
    and its p-value against a threshold are made from."""

    se: float
    dof: int

    @classmethod
    def of(
        cls,
        base: dict[str, Any],
        new: dict[str, Any],
        noise: Noise,
        metric: str = "median",
        spread: Spread | None = None,
        key: Any = None,
    ) -> "RatioError | None":
        """From the comparison's ``spread`` where it has one: the case's own error scaled where the
        spread has it (``Spread.scaled``, the case of ``key``), else the spread's, and for the
        median the case's own ``robust_se`` where that is larger (a case noisier than the rest is
        not judged by the rest's noise; a slow round does not move the fastest call over all
        rounds, so for the min its rounds would overstate its noise); else from the two records'
        samples for ``metric`` and the runs' ``noise``; None where a record has no samples."""
        if spread is not None:
            err = spread.error(key)
            own = robust_se(samples(base, metric), samples(new, metric)) if metric == "median" else 0.0
            return cls(max(err.se, own), err.dof)
        a, b = samples(base, metric), samples(new, metric)
        if not a or not b:
            return None
        sd, dof = noise.case_sd(a, b)
        na, nb = len(a), len(b)
        if metric == "fast":  # a mean of the fastest half: taken as uncertain as a mean of that many
            na, nb = (na + 1) // 2, (nb + 1) // 2  # samples (cautious: of five normal ones 0.25 sd^2, taken as 0.33)
        return cls(sd * math.sqrt(1 / na + 1 / nb), dof)

    def interval(self, ratio: float, level: float) -> Interval:
        """The ``level`` interval of ``ratio``: exp(log ratio +- t * se)."""
        hw = _half_width(self.se, self.dof, level, 1.0)
        if not math.isfinite(hw):
            return Interval(0.0, math.inf, level)
        return Interval(ratio * math.exp(-hw), ratio * math.exp(hw), level)

    def p_beyond(self, ratio: float, threshold: float) -> float:
        """The two-sided p-value of ``ratio`` lying beyond ``threshold`` (above 1 + threshold or
        below its inverse): the largest 1 - level at which the ``level`` interval lies wholly
        beyond it (1 where the ratio itself is within)."""
        excess = abs(math.log(ratio)) - math.log1p(threshold)
        if excess <= 0 or self.dof < 1:
            return 1.0
        if self.se <= 0:
            return 0.0
        return 2 * (1 - t_cdf(excess / self.se, self.dof))


def holm_levels(p_values: dict[Any, float], alpha: float) -> dict[Any, float]:
    """Each case's interval level under Holm's step-down control of the family-wise error at
    ``alpha``: the cases in order of their p-values, the i-th (from 0) of m at 1 - alpha / (m - i)
    while every earlier one was beyond the threshold; from the first that is not, every later case
    at that step's level (none of them is beyond it). As strict as Bonferroni for the most extreme
    case, less for the next ones: where many cases moved (a slower build), they are not all held
    to the strictest level."""
    m = len(p_values)
    out: dict[Any, float] = {}
    stopped = None
    for i, key in enumerate(sorted(p_values, key=lambda k: p_values[k])):
        if stopped is None:
            level = 1 - alpha / (m - i)
            if not p_values[key] < alpha / (m - i):
                stopped = level
        out[key] = stopped if stopped is not None else level
    return out


def time_interval(rec: dict[str, Any], time: float, noise: Noise, level: float = 0.95) -> Interval | None:
    """The ``level`` interval of a case's reported ``time`` from its samples; None without."""
    s = samples(rec)
    if not s or not (time > 0):
        return None
    sd, dof = noise.case_sd(s)
    hw = _half_width(sd, dof, level, math.sqrt(1 / len(s)))
    if not math.isfinite(hw):
        return Interval(0.0, math.inf, level)
    return Interval(time * math.exp(-hw), time * math.exp(hw), level)
