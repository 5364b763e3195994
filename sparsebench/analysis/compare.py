"""Compare two result folders case by case, or one folder along one dimension.

``compare(base_df, new_df)`` joins on ``CASE_KEY`` and gives each case measured in both the
ratio new / base of its reported time with a confidence interval, and a verdict from the interval
against the threshold: *slower* when the whole interval lies above 1 + threshold, *faster* when
it lies below 1 / (1 + threshold), else *same* (within the noise).

The time compared is, by default, the geometric mean of the fastest half of a case's rounds'
fastest calls (``GATE_METRIC`` "fast", ``noise.fast_time``: interference on a shared machine only
adds time, and half the rounds do not rest on one lucky round), with ``metric="min"`` the fastest
call over all its rounds, with ``metric="median"`` the median of its rounds' medians.

Each ratio is adjusted for the machine's speed: divided by ``machine_ratio``, the median of NEW's
machine-speed probes over BASE's (a fixed matmul timed around every case), where at least
``noise.MIN_CASES`` cases have one in both runs. A shared machine drifts over minutes (other
tenants): the cases of a run move together, by up to 9% (their median) between two runs of the
same program, and the probe moves with them (a correlation of 0.88-0.96 over 21 runs; the README
gives the figures). ``adjust=False`` compares the times as measured; a change of the library's
matmul itself moves the probe too, and runs whose environments differ are compared with a warning.

The noise is read from the comparison itself (``noise.Spread``): how the cases' log ratios
scatter around their common shift, a robust standard deviation (Qn) that a minority of changed
cases does not move, while a change common to all (a slower build) still counts against 1. For
the gate's "fast" time each case has its own noise (``Spread.scaled``): how far its fastest
rounds scatter in the two runs (``noise.own_errors``), scaled by the comparison to how far the
cases' ratios scatter in those units; a small memory-bound kernel that the machine's moments move
four times as far as dense SDPA is judged by an interval four times as wide. For the median, a
case whose own rounds scatter more is judged by its own spread (``noise.robust_se``). With fewer
than ``noise.MIN_CASES`` cases, each case is judged from its own samples (its rounds, or blocks
of its calls with one round; never the pooled calls).

The false alarms of a whole comparison are controlled family-wise (Holm's step-down): with m
cases compared, in order of how far beyond the threshold they lie (their p-values), the i-th is
judged at level 1 - FAMILY_ALPHA / (m - i + 1) as long as every earlier one was beyond it, so two
runs of the same program raise an alarm anywhere with a chance of at most FAMILY_ALPHA at
threshold 0 (far less at the default 10%), as with Bonferroni, while a slowdown common to many
cases is not held to the strictest level case after case.
Where the machine-speed probe moved between the two runs by more than PROBE_SLACK times the
threshold (as factors), the case's verdict is *withheld*: the machine, not the program, may have
changed.

The run as a whole is judged too (``noise.Shift``): the median of the cases' ratios, with an
interval from the comparison's spread over the square root of the number of cases, one more
member of Holm's family, *slower* (failing the gate) or *faster* when the whole interval is beyond
the threshold, withheld where the probe's median ratio moved beyond the slack. A slowdown common
to every case (a slower build) is told from noise where no single case can be: at a 6% spread one
case must move about 1.37x, the median of 36 about 1.15x.

Quality beside time: where either run recorded a case's quality against full attention
(``recall_mean``, ``full_rel_err``), the case carries both runs' figures and a quality verdict
(``judge_quality``): *worse* where the recall fell by more than RECALL_DROP (absolute) or the
relative error rose by more than ERR_RISE (relative, and ERR_FLOOR absolute: below it is rounding),
*better* where it moved as far the other way, else *same*. The figures are deterministic on seeded
inputs, so two runs of one program read *same*; a kernel that got faster by computing something
else reads *worse*, and fails the gate as a slower one does.

``compare_by(df, "backend")`` puts one run side by side along one dimension.

Both return frozen data; ``render.compare`` draws them as a table, Markdown, JSON, CSV or the
ratio figure.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

from sparsebench.analysis.noise import (
    MIN_CASES,
    Interval,
    Noise,
    RatioError,
    Shift,
    Spread,
    fast_time,
    holm_levels,
    own_errors,
)
from sparsebench.analysis.scaling import (
    case_label,
    finite_or_none,
    iter_groups,
    plain_value,
    varying_dims,
)
from sparsebench.errors import ResultsError, ScenarioError
from sparsebench.registry import unknown_choice
from sparsebench.results.folder import ENVIRONMENT, read_environment
from sparsebench.results.schema import BASELINE_BACKEND, BASELINE_PATTERN, CASE_KEY

# what a case's time is, for a comparison (``metric_time``)
METRICS = {
    "fast": "the geometric mean of the fastest half of the rounds' fastest calls",
    "min": "the fastest call over the rounds",
    "median": "the median of the rounds' medians",
}
# Two runs are compared on the fastest half of the rounds' fastest calls by default: interference
# on a shared machine only adds time, so a round's fastest call moves least between two runs of
# the same program, and the fastest half of the rounds does not rest on one lucky round, as the
# fastest call over them does (the README gives the figures).
GATE_METRIC = "fast"
BY_DIMENSIONS = {
    "backend": "backend",
    "pattern": "pattern_label",
    "device": "hardware",  # device_name (or device), @ host where hosts differ: results.folder.hardware_column
    "dtype": "dtype",
    "mode": "mode",
    "causal": "causal",
}
FAMILY_ALPHA = 0.05  # the chance of any false alarm over a whole comparison (Holm)
SHIFT_KEY = ("(common shift)",)  # the common shift's place among the cases in Holm's family
NOISY_FACTOR = 3  # a comparison that cannot tell this many thresholds from noise is called noisy
PROBE_SLACK = 2  # a case's verdict is withheld where the probe moved by more than (1 + threshold) ** this
# environment.json keys whose difference makes timings hard to compare (and every entry of its
# "switches": the SPARSEBENCH_* variables that change which kernels run)
ENV_KEYS = ("gpu", "cpu", "torch", "threads", "python")
REGRESSIONS = ("slower", "now failing")
WITHHELD = "withheld"
FAILED = ("oom", "timeout", "error", "crashed", "wrong")
# Quality against full attention (deterministic on seeded inputs): a move beyond these is a change.
QUALITY_FIELDS = ("recall_mean", "full_rel_err")
RECALL_DROP = 0.01  # recall_mean, absolute
ERR_RISE = 0.10  # full_rel_err, relative
ERR_FLOOR = 1e-3  # full_rel_err, absolute: a smaller move is rounding, whatever its ratio
QUALITY_WORSE = "worse"
# compare_by(df, "backend"): the dense baseline's column (the baseline at the row's n, dtype, ...),
# and what its cell says on the dense pattern's own rows, where the baseline is the sdpa cell
BASELINE_COLUMN = f"{BASELINE_PATTERN} · {BASELINE_BACKEND}"
SAME_AS_BASELINE = f"= {BASELINE_BACKEND}"


# ----------------------------------------------------------------------------------------------
# options


def parse_threshold(text: str | float) -> float:
    """ "10%" -> 0.10; "0.1" -> 0.10 (a fraction below 1); "10" -> 0.10 (a percentage)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, pct = float(text), False
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise ScenarioError(f"--threshold: expected a percentage like 10% or a fraction like 0.1, got {text!r}")
        value, pct = float(m.group(1)), bool(m.group(2))
    if pct or value >= 1:
        value /= 100.0
    if not (0 <= value < 10) or not math.isfinite(value):
        raise ScenarioError(f"--threshold: {text!r} is out of range (use e.g. 5% or 0.05)")
    return value


def check_choice(kind: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ScenarioError that lists them."""
    if value not in choices:
        raise ScenarioError(unknown_choice(kind, value, choices))
    return value


# ----------------------------------------------------------------------------------------------
# two folders


@dataclass(frozen=True)
class CaseDiff:
    """One case measured in both folders (or in one, and failed or skipped in the other) and
    its verdict."""

    key: tuple[Any, ...]  # values of CASE_KEY
    base: float | None
    new: float | None
    ratio: float | None  # new / base
    # faster | slower | same | withheld | now failing | now ok | failed in both | skipped
    verdict: str
    low: float | None = None  # the ratio's confidence interval, at ``level``
    high: float | None = None
    probe_ratio: float | None = None  # the machine-speed probe's time, new / base
    base_status: str = "ok"
    new_status: str = "ok"
    # quality against full attention, each run's (None where it has none), and its verdict:
    # worse | better | same, or None where the two runs do not both have a figure
    base_recall_mean: float | None = None
    new_recall_mean: float | None = None
    base_full_rel_err: float | None = None
    new_full_rel_err: float | None = None
    quality: str | None = None
    quality_change: str = ""  # what moved, in words ("recall 0.912 -> 0.850")
    level: float | None = None  # the interval's confidence level (Holm's step for this case)

    FIELDS: ClassVar[tuple[str, ...]] = (
        "base",
        "new",
        "ratio",
        "low",
        "high",
        "level",
        "verdict",
        "probe_ratio",
        "base_status",
        "new_status",
        "base_recall_mean",
        "new_recall_mean",
        "base_full_rel_err",
        "new_full_rel_err",
        "quality",
        "quality_change",
    )

    def get(self, column: str) -> Any:
        return self.key[CASE_KEY.index(column)]

    def to_dict(self) -> dict[str, Any]:
        """The case key's columns, then the measured fields (FIELDS), flat: one JSON case or CSV row."""
        return {**dict(zip(CASE_KEY, self.key)), **{f: getattr(self, f) for f in self.FIELDS}}

    @property
    def is_regression(self) -> bool:
        return self.verdict in REGRESSIONS

    @property
    def quality_worse(self) -> bool:
        return self.quality == QUALITY_WORSE

    @property
    def has_quality(self) -> bool:
        """Either run recorded a quality figure for the case."""
        return any(
            v is not None
            for v in (self.base_recall_mean, self.new_recall_mean, self.base_full_rel_err, self.new_full_rel_err)
        )

    @property
    def interval(self) -> str:
        """ "[1.18, 1.45]", or "" without one."""
        if self.low is None or self.high is None:
            return ""
        return Interval(self.low, self.high, 0).text()


@dataclass(frozen=True)
class Comparison:
    """Two folders case by case: the common cases with their verdicts, the cases only one of
    them has, and warnings about how comparable they are."""

    rows: tuple[CaseDiff, ...]
    only_base: tuple[tuple[Any, ...], ...] = ()
    only_new: tuple[tuple[Any, ...], ...] = ()
    warnings: tuple[str, ...] = ()
    threshold: float = 0.10
    metric: str = GATE_METRIC
    base_name: str = "base"
    new_name: str = "new"
    shown_dims: tuple[str, ...] = field(default=())  # case-key columns that vary (shown)
    only_base_ok: tuple[tuple[Any, ...], ...] = ()  # those of only_base that BASE measured (ok)
    level: float = 1 - FAMILY_ALPHA  # the strictest interval level (Holm's first step)
    noise: Noise | None = None  # the typical spread of a case's samples, both runs pooled
    spread: Spread | None = None  # how the cases' ratios scatter (None: judged from their samples)
    shift: Shift | None = None  # the median of the cases' ratios (None: fewer than noise.MIN_CASES)
    shift_verdict: str | None = None  # slower, faster, same or withheld
    shift_interval: Interval | None = None
    shift_probe: float | None = None  # the median of the cases' probe ratios
    # how much slower the machine ran NEW (machine_ratio): every ratio is divided by it (None: raw)
    machine: float | None = None

    def regressions(self) -> list[CaseDiff]:
        return [r for r in self.rows if r.is_regression]

    def quality_regressions(self) -> list[CaseDiff]:
        """The cases whose quality against full attention got worse beyond the tolerance."""
        return [r for r in self.rows if r.quality_worse]

    @property
    def has_quality(self) -> bool:
        return any(r.has_quality for r in self.rows)

    def withheld(self) -> list[CaseDiff]:
        return [r for r in self.rows if r.verdict == WITHHELD]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.verdict] = out.get(r.verdict, 0) + 1
        return out

    def missing(self) -> list[tuple[Any, ...]]:
        """Cases that BASE measured (ok) and NEW did not: absent from NEW, or skipped there."""
        skipped = [r.key for r in self.rows if r.verdict == "skipped" and r.base_status == "ok"]
        return sorted([*self.only_base_ok, *skipped], key=_sort_key)

    def compared(self) -> list[CaseDiff]:
        """The cases with a verdict from measurements: measured in both, or ok in one and failed
        in the other."""
        return [r for r in self.rows if r.verdict not in ("skipped", "failed in both")]

    @property
    def family(self) -> int:
        """The cases judged by an interval (measured ok in both): the family of the control."""
        return sum(1 for r in self.rows if r.low is not None)

    @property
    def shift_verdict_text(self) -> str | None:
        """The run's verdict in words: "slower", "same within noise", "withheld (the machine-speed
        probe moved 1.50x)"; None without a shift."""
        verdict = self.shift_verdict
        if verdict == "same":
            return "same within noise"
        if verdict == WITHHELD and self.shift_probe is not None:
            return f"withheld (the machine-speed probe moved {self.shift_probe:.2f}x)"
        return verdict

    @property
    def shift_text(self) -> str | None:
        """The run as a whole in words: "the median of the 36 cases' ratios: 1.34x [1.29, 1.40],
        slower"; None without a shift."""
        if self.shift is None or self.shift_interval is None:
            return None
        return (
            f"the run as a whole (the median of the {self.shift.cases} cases' ratios): {self.shift.ratio:.2f}x "
            f"{self.shift_interval.text()}, {self.shift_verdict_text}"
        )

    @property
    def control(self) -> str:
        """How the false alarms are controlled, in words."""
        members = f"{self.family} case(s)" + (" and their common shift" if self.shift_interval else "")
        return (
            f"{1 - FAMILY_ALPHA:.0%} family-wise over {members} (Holm: the i-th most extreme of m "
            f"cases at 1 - {FAMILY_ALPHA:.0%}/(m - i + 1), {self.level_span}); slower or faster only when the whole "
            "interval is beyond the threshold"
        )

    @property
    def level_span(self) -> str:
        """The intervals' levels in words: "each at 99.86%", or "from 99.86% to 99.5%"."""
        levels = [r.level for r in self.rows if r.low is not None and r.level is not None] or [self.level]
        strict, loose = level_text(max(levels)), level_text(min(levels))
        return f"each at {strict}" if strict == loose else f"from {strict} to {loose}"

    @property
    def ratio_name(self) -> str:
        """ "adj. ratio" where the ratios are adjusted for the machine's speed (not the new / base of
        the two times shown beside them), else "ratio"."""
        return "ratio" if self.machine is None else "adj. ratio"

    @property
    def adjusted_text(self) -> str:
        """ "adjusted for the machine's speed (÷ 1.037)", or "" where the ratios are as measured."""
        return "" if self.machine is None else f"adjusted for the machine's speed (÷ {self.machine:.3f})"

    @property
    def machine_text(self) -> str:
        """How the ratios were adjusted for the machine's speed, in words."""
        if self.machine is None:
            return (
                "ratios as measured, not adjusted for the machine's speed (--no-adjust, or fewer than "
                f"{MIN_CASES} cases with a probe in both runs)"
            )
        return (
            f"ratios adjusted for the machine's speed: its probe (a fixed matmul timed around every case) ran "
            f"{self.machine:.3f}x as long in {self.new_name} as in {self.base_name} (the median of each run's), "
            "and each ratio new / base is divided by that"
        )

    @property
    def noise_text(self) -> str:
        """Where the intervals' noise comes from, in words."""
        if self.spread is not None and self.spread.factor is not None:
            low, high = self.spread.span
            return (
                f"the noise is each case's own: how far its fastest rounds scatter in the two runs, scaled by "
                f"{self.spread.factor:.2f} to how the {self.spread.cases} cases' ratios scatter around their common "
                f"shift (sd {low:.1%} to {high:.1%}, typically {self.spread.typical:.1%}: a typical case that "
                f"moved alone is told from noise from about {self.resolvable:.2f}x)"
            )
        if self.spread is not None:
            return (
                f"the noise is the spread of the {self.spread.cases} cases' ratios around their common shift "
                f"(robust sd {self.spread.sd:.1%}: a case that moved alone is told from noise from about "
                f"{self.resolvable:.2f}x)"
            )
        return "the noise is each case's spread over its rounds (or blocks of its calls), with the runs' typical spread"

    def unstable_message(self) -> str | None:
        """ "machine unstable: verdict withheld for N cases (...)", or None."""
        held = self.withheld()
        if not held:
            return None
        worst = max(held, key=lambda r: abs(math.log(r.probe_ratio or 1.0)))
        return (
            f"machine unstable: verdict withheld for {len(held)} case(s): the machine-speed probe moved "
            f"by more than {(1 + self.threshold) ** PROBE_SLACK - 1:.0%} between the two runs "
            f"(up to {worst.probe_ratio:.2f}x at {key_text(worst.key, self.shown_dims)}); rerun on a quiet machine"
        )

    @property
    def resolvable(self) -> float | None:
        """The smallest ratio a typical case (``Spread.typical``) can be called slower at when it is
        the most extreme (the first, strictest level): 1 + threshold times the interval's
        half-width; None without a comparison spread."""
        if self.spread is None:
            return None
        return (1 + self.threshold) * self.spread.typical_error().interval(1.0, self.level).high

    def noisy_message(self) -> str | None:
        """A warning where the comparison's own noise hides changes of NOISY_FACTOR times the
        threshold: the cases' ratios scatter so much that a case must move further than that to be
        told from noise (``resolvable``). Nothing is withheld (a larger change still shows); the
        reader learns why a smaller one did not."""
        r = self.resolvable
        if r is None or r <= 1 + NOISY_FACTOR * self.threshold:
            return None
        return (
            f"noisy comparison: a typical case's ratio is uncertain by {self.spread.typical:.1%} (sd), so a "
            f"case that moved alone must be about {r:.2f}x slower (or faster) to be told from noise; rerun both on "
            "a quieter machine or with more rounds"
        )

    def gate_failed(self, allow_missing: bool = False, fail_on_unstable: bool = False) -> bool:
        """Whether ``--fail-on-regression`` fails: a regression, nothing compared, (unless
        ``allow_missing``) a case of BASE that NEW did not measure, so that an interrupted,
        partial or skipped run cannot pass the gate, or (with ``fail_on_unstable``) a withheld
        verdict."""
        return (
            bool(self.regressions())
            or self.shift_verdict == "slower"
            or bool(self.quality_regressions())
            or not self.compared()
            or (not allow_missing and bool(self.missing()))
            or (fail_on_unstable and bool(self.withheld()))
        )

    def failure_message(self, allow_missing: bool = False, fail_on_unstable: bool = False) -> str:
        bits = []
        if self.shift_verdict == "slower":
            bits.append(
                f"the run as a whole is slower beyond {self.threshold:.0%} and the noise (the median of the "
                f"{self.shift.cases} cases' ratios: {self.shift.ratio:.2f}x {self.shift_interval.text()})"
            )
        bad = self.regressions()
        if bad:
            first = max(bad, key=lambda r: r.ratio or 0.0)
            what = f"{case_label(first.key, self.shown_dims)}, n={first.get('seq_len')}"
            bits.append(
                f"{len(bad)} case(s) regressed beyond {self.threshold:.0%} and the noise "
                f"(worst: {what}, {ratio_text(first)} {first.interval})"
            )
        worse = self.quality_regressions()
        if worse:
            first = worse[0]
            bits.append(
                f"{len(worse)} case(s) moved away from full attention ({quality_tolerance()}; first: "
                f"{key_text(first.key, self.shown_dims)}, {first.quality_change})"
            )
        if not self.rows:
            bits.append(f"no case of {self.base_name} is in {self.new_name}: nothing was compared")
        elif not self.compared():
            bits.append(f"no case was measured in both {self.base_name} and {self.new_name}: nothing was compared")
        elif not allow_missing and (gone := self.missing()):
            bits.append(
                f"{len(gone)} case(s) of {self.base_name} not measured in {self.new_name} "
                f"(first: {key_text(gone[0], self.shown_dims)}; --allow-missing accepts that)"
            )
        if fail_on_unstable and self.withheld():
            bits.append(f"{self.unstable_message()} (--fail-on-unstable)")
        return "; ".join(bits) or "no regressions"

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base_name,
            "new": self.new_name,
            "metric": self.metric,
            "threshold": self.threshold,
            "control": self.control,
            "interval_level": self.level,
            "family": self.family,
            "noise": self.noise_text,
            "ratio_spread_sd": self.spread.sd if self.spread else None,
            "own_error_factor": self.spread.factor if self.spread else None,
            "typical_sd": self.spread.typical if self.spread else None,
            "machine_ratio": self.machine,
            "adjusted": self.machine is not None,
            "shift": None
            if self.shift is None
            else {
                "ratio": self.shift.ratio,
                "low": self.shift_interval.low if self.shift_interval else None,
                "high": self.shift_interval.high if self.shift_interval else None,
                "level": self.shift_interval.level if self.shift_interval else None,
                "verdict": self.shift_verdict,
                "probe_ratio": self.shift_probe,
                "cases": self.shift.cases,
            },
            "warnings": list(self.warnings),
            "counts": self.counts(),
            "regressions": len(self.regressions()),
            "quality_regressions": len(self.quality_regressions()),
            "quality_tolerance": quality_tolerance(),
            "withheld": len(self.withheld()),
            "compared": len(self.compared()),
            "missing": [dict(zip(CASE_KEY, k)) for k in self.missing()],
            "cases": [r.to_dict() for r in self.rows],
            "only_base": [dict(zip(CASE_KEY, k)) for k in self.only_base],
            "only_new": [dict(zip(CASE_KEY, k)) for k in self.only_new],
        }


def level_text(level: float) -> str:
    """0.95 -> "95%", 0.99861 -> "99.86%"."""
    text = f"{level * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def compare(
    base_df,
    new_df,
    threshold: float = 0.10,
    metric: str = GATE_METRIC,
    base_env: dict | None = None,
    new_env: dict | None = None,
    base_name: str = "base",
    new_name: str = "new",
    adjust: bool = True,
) -> Comparison:
    """Join two results frames on the case key and judge each common case; ``adjust``: each
    ratio divided by how much slower the machine ran NEW (``machine_ratio``)."""
    check_choice("metric", metric, tuple(METRICS))
    base = _latest(base_df)
    new = _latest(new_df)
    common = [k for k in base if k in new]
    machine = machine_ratio(base, new) if adjust else None
    ratios = case_ratios(base, new, metric, machine)
    noise = Noise.of([*base.values(), *new.values()], metric)
    spread = Spread.of(ratios.values())
    if spread is not None and metric == "fast":  # each case its own error, scaled by the comparison
        spread = spread.scaled(ratios, own_errors({k: (base[k], new[k]) for k in ratios}))
    shift = Shift.of(ratios.values(), spread)
    level = family_level(len(ratios) + (shift is not None))
    levels = case_levels(base, new, ratios, threshold, noise, metric, spread, shift)
    rows = [
        _judge(k, base[k], new[k], metric, threshold, noise, levels.get(k, level), spread, ratios.get(k))
        for k in common
    ]
    shift_verdict, shift_iv, shift_probe = (
        judge_shift(shift, [r.probe_ratio for r in rows if r.ratio is not None], threshold, levels[SHIFT_KEY])
        if shift is not None
        else (None, None, None)
    )
    rows.sort(key=lambda r: _sort_key(r.key))
    only_base = tuple(sorted((k for k in base if k not in new), key=_sort_key))
    base_measured = tuple(k for k in only_base if str(base[k].get("status")) == "ok")
    only_new = tuple(sorted((k for k in new if k not in base), key=_sort_key))
    import pandas as pd

    both = pd.concat([base_df, new_df], ignore_index=True) if len(base_df) or len(new_df) else base_df
    shown = tuple(c for c in varying_dims(both, CASE_KEY[2:]) if c != "seq_len")
    warnings = list(env_warnings(base_env, new_env, base_name, new_name))
    if not common:
        warnings.append(f"no case is in both {base_name} and {new_name}; is this the same scenario?")
    fewer = [
        k for k in common if (finite_or_none(new[k].get("rounds")) or 1) < (finite_or_none(base[k].get("rounds")) or 1)
    ]
    if fewer:  # an interrupted multi-round run: every case is there, with fewer rounds
        warnings.append(
            f"{len(fewer)} case(s) measured in fewer rounds in {new_name} than in {base_name} "
            f"(first: {key_text(fewer[0], ())}); was the run interrupted?"
        )
    result = Comparison(
        tuple(rows),
        only_base,
        only_new,
        tuple(warnings),
        threshold,
        metric,
        base_name,
        new_name,
        shown,
        base_measured,
        level,
        noise,
        spread,
        shift,
        shift_verdict,
        shift_iv,
        shift_probe,
        machine,
    )
    more = [m for m in (result.unstable_message(), result.noisy_message()) if m]
    return replace(result, warnings=(*result.warnings, *more)) if more else result


def compare_folders(
    base: Path, new: Path, threshold: float = 0.10, metric: str = GATE_METRIC, warn=None, adjust: bool = True
) -> Comparison:
    from sparsebench.results.folder import load_frame

    base, new = Path(base), Path(new)
    if base.resolve() == new.resolve() and warn is not None:
        warn(f"BASE and NEW are the same folder ({base}): every case compares with itself")
    names = (base.name or str(base), new.name or str(new))
    if names[0] == names[1]:
        names = (str(base), str(new))
    return compare(
        load_frame(base, warn=warn),
        load_frame(new, warn=warn),
        threshold=threshold,
        metric=metric,
        base_env=read_environment(base, warn),
        new_env=read_environment(new, warn),
        base_name=names[0],
        new_name=names[1],
        adjust=adjust,
    )


def env_warnings(base_env: dict | None, new_env: dict | None, base_name: str = "base", new_name: str = "new"):
    """The warnings about two runs' environments (``env_differences`` of the two)."""
    yield from env_differences([(base_name, base_env), (new_name, new_env)])


def env_differences(named: Sequence[tuple[str, dict | None]]) -> list[str]:
    """One warning naming what differs between the environments (ENV_KEYS and every switch,
    "a vs b" for two runs, "a in X, b in Y, ..." for more), and one for runs without one."""
    out = []
    missing = [name for name, env in named if env is None]
    if missing:
        out.append(f"no {ENVIRONMENT} in {', '.join(missing)}: cannot check that the environments match")
        if len(named) == 2:
            return out
    envs = [(name, env) for name, env in named if env is not None]
    if len(envs) < 2:
        return out

    def differ(what: str, values: list) -> None:
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            if len(values) == 2:
                diffs.append(f"{what} {values[0]} vs {values[1]}")
            else:
                diffs.append(f"{what} " + ", ".join(f"{v} in {name}" for (name, _), v in zip(envs, values)))

    diffs: list[str] = []
    for k in ENV_KEYS:
        differ(k, [env.get(k) if env.get(k) is not None else "none" for _, env in envs])
    if all(isinstance(env.get("switches"), dict) for _, env in envs):  # older runs did not record them
        for k in sorted({k for _, env in envs for k in env["switches"]}):
            differ(k, [env["switches"].get(k, "unset") for _, env in envs])
    if diffs:
        out.append("environments differ (" + "; ".join(diffs) + "): timings may not be comparable")
    return out


def family_level(members: int) -> float:
    """The strictest interval level of a family of ``members`` (the cases, and their common shift
    where there is one: Holm's first step, and Bonferroni's for every member): any false alarm
    with a chance of at most FAMILY_ALPHA."""
    return 1 - FAMILY_ALPHA / max(1, members)


def case_levels(
    base: dict[tuple, dict],
    new: dict[tuple, dict],
    ratios: dict[tuple, float],
    threshold: float,
    noise: Noise,
    metric: str,
    spread: Spread | None,
    shift: Shift | None = None,
) -> dict[tuple, float]:
    """Each compared case's interval level under Holm's control at FAMILY_ALPHA over the cases
    of ``ratios`` and their common ``shift`` (under SHIFT_KEY) where there is one
    (``noise.holm_levels``, from each ratio's p-value of lying beyond the threshold)."""
    p_values = {}
    for k, r in ratios.items():
        err = RatioError.of(base[k], new[k], noise, metric, spread, k)
        p_values[k] = err.p_beyond(r, threshold) if err is not None and math.isfinite(r) else 1.0
    if shift is not None:
        p_values[SHIFT_KEY] = shift.error.p_beyond(shift.ratio, threshold)
    return holm_levels(p_values, FAMILY_ALPHA)


def judge_shift(
    shift: Shift, probes: Sequence[float | None], threshold: float, level: float
) -> tuple[str, Interval, float | None]:
    """(verdict, interval, the probe's median ratio) of the run as a whole: withheld where the
    median of the cases' probe ratios moved beyond the slack (the machine, not the program, may
    have changed), else slower or faster where the whole ``level`` interval of the cases' median
    ratio is beyond the threshold, else same."""
    iv = shift.error.interval(shift.ratio, level)
    known = [p for p in probes if p is not None and p > 0]
    probe = statistics.median(known) if known else None
    return _verdict(iv, probe, threshold), iv, probe


def _verdict(iv: Interval | None, probe: float | None, threshold: float) -> str:
    """withheld where the probe's ratio is beyond PROBE_SLACK times the threshold (as factors),
    slower or faster where the whole interval is beyond the threshold, else same."""
    slack = (1 + threshold) ** PROBE_SLACK
    if probe is not None and not (1 / slack <= probe <= slack):
        return WITHHELD
    if iv is not None and iv.low > 1 + threshold:
        return "slower"
    if iv is not None and iv.high < 1 / (1 + threshold):
        return "faster"
    return "same"


def metric_time(rec: dict, metric: str) -> float | None:
    """A record's time for ``metric`` (METRICS): "fast" ``noise.fast_time`` (time_min_s for a
    record without its calls), "min" time_min_s, "median" time_median_s; None where it has none."""
    if metric == "fast":
        fast = finite_or_none(fast_time(rec))
        if fast is not None:
            return fast
    return finite_or_none(rec.get("time_median_s" if metric == "median" else "time_min_s"))


def machine_ratio(base: dict[tuple, dict], new: dict[tuple, dict]) -> float | None:
    """How much slower the machine ran NEW than BASE: the median of NEW's machine-speed probes
    (``probe_s``, a fixed matmul timed around every case) over the median of BASE's, over the
    cases measured ok in both with a probe in both; None for fewer than ``noise.MIN_CASES`` such
    cases (a few cases' probes are the machine of a few moments, not of the run)."""
    pb, pn = [], []
    for k, b in base.items():
        n = new.get(k)
        if n is None or not (_ok(b) and _ok(n)):
            continue
        vb, vn = finite_or_none(b.get("probe_s")), finite_or_none(n.get("probe_s"))
        if vb and vn and vb > 0 and vn > 0:
            pb.append(vb)
            pn.append(vn)
    return statistics.median(pn) / statistics.median(pb) if len(pb) >= MIN_CASES else None


def case_ratios(
    base: dict[tuple, dict], new: dict[tuple, dict], metric: str, machine: float | None = None
) -> dict[tuple, float]:
    """new / base of ``metric`` for the cases measured ok in both (records by case key), divided
    by ``machine`` (``machine_ratio``) where given."""
    out = {}
    for k, b in base.items():
        n = new.get(k)
        if n is None or not (_ok(b) and _ok(n)):
            continue
        bv, nv = metric_time(b, metric), metric_time(n, metric)
        if bv is not None and nv is not None and bv > 0:
            out[k] = nv / bv / (machine or 1.0)
    return out


def judge_ratio(
    base: dict,
    new: dict,
    ratio: float,
    threshold: float,
    noise: Noise,
    level: float,
    metric: str = "median",
    spread: Spread | None = None,
    key: Any = None,
) -> tuple[str, Interval | None, float | None]:
    """(verdict, the ratio's interval, the probe's ratio) for the case ``key``, measured ok in both:
    withheld where the machine-speed probe moved by more than the threshold can absorb (PROBE_SLACK
    times the threshold: the probe is a short measurement with noise of its own), slower or faster
    where the whole ``level`` interval is beyond the threshold, else same. The interval is
    ``noise.RatioError``'s: from the comparison's ``spread`` where it has one (MIN_CASES cases or
    more; scaled, the case's own), else from the case's own samples and the runs' ``noise``."""
    err = RatioError.of(base, new, noise, metric, spread, key)
    iv = err.interval(ratio, level) if err is not None and ratio > 0 and math.isfinite(ratio) else None
    pb, pn = finite_or_none(base.get("probe_s")), finite_or_none(new.get("probe_s"))
    probe = pn / pb if pb and pn and pb > 0 else None
    return _verdict(iv, probe, threshold), iv, probe


def quality_tolerance() -> str:
    """The quality tolerance in words."""
    return (
        f"quality worse: recall_mean down by more than {RECALL_DROP:g}, or full_rel_err up by more than "
        f"{ERR_RISE:.0%} of itself and {ERR_FLOOR:g}"
    )


def judge_quality(base: dict, new: dict) -> tuple[str | None, str]:
    """(verdict, what moved) of a case's quality against full attention between two runs:
    worse where recall_mean fell by more than RECALL_DROP or full_rel_err rose by more than
    ERR_RISE of itself and ERR_FLOOR, better where one moved as far the other way and none got
    worse, same otherwise; (None, "") where the two runs do not both have a figure."""
    br, nr = finite_or_none(base.get("recall_mean")), finite_or_none(new.get("recall_mean"))
    be, ne = finite_or_none(base.get("full_rel_err")), finite_or_none(new.get("full_rel_err"))
    worse, better = [], []
    if br is not None and nr is not None:
        text = f"recall {br:.3f} -> {nr:.3f}"
        if br - nr > RECALL_DROP:
            worse.append(text)
        elif nr - br > RECALL_DROP:
            better.append(text)
    if be is not None and ne is not None:
        text = f"rel. err {be:.3g} -> {ne:.3g}"
        if ne - be > max(ERR_RISE * be, ERR_FLOOR):
            worse.append(text)
        elif be - ne > max(ERR_RISE * ne, ERR_FLOOR):
            better.append(text)
    if (br is None or nr is None) and (be is None or ne is None):
        return None, ""
    if worse:
        return QUALITY_WORSE, "; ".join(worse)
    if better:
        return "better", "; ".join(better)
    return "same", ""


def _quality_fields(b: dict, n: dict) -> dict[str, Any]:
    """The CaseDiff fields of a case's quality in the two runs."""
    verdict, change = judge_quality(b, n)
    return {
        **{f"base_{c}": finite_or_none(b.get(c)) for c in QUALITY_FIELDS},
        **{f"new_{c}": finite_or_none(n.get(c)) for c in QUALITY_FIELDS},
        "quality": verdict,
        "quality_change": change,
    }


def _ok(rec: dict) -> bool:
    return str(rec.get("status")) == "ok"


def _judge(
    key,
    b: dict,
    n: dict,
    metric: str,
    threshold: float,
    noise: Noise,
    level: float,
    spread: Spread | None,
    ratio: float | None = None,
) -> CaseDiff:
    """The verdict of one common case; ``ratio``: its ratio from ``case_ratios`` (None where that
    has none: a case not ok in both, or a base time of 0)."""
    bs, ns = str(b.get("status")), str(n.get("status"))
    bv, nv = metric_time(b, metric), metric_time(n, metric)
    if bs != "ok" or ns != "ok" or bv is None or nv is None:
        if bs == "ok" and ns in FAILED:
            verdict = "now failing"
        elif ns == "ok" and bs in FAILED:
            verdict = "now ok"
        elif bs in FAILED and ns in FAILED:
            verdict = "failed in both"
        else:
            verdict = "skipped"
        return CaseDiff(
            key,
            bv if bs == "ok" else None,
            nv if ns == "ok" else None,
            None,
            verdict,
            base_status=bs,
            new_status=ns,
            **_quality_fields(b, n),
        )
    ratio = math.inf if ratio is None else ratio  # ok in both: case_ratios has it unless the base time is 0
    verdict, iv, probe = judge_ratio(b, n, ratio, threshold, noise, level, metric, spread, key)
    return CaseDiff(
        key,
        bv,
        nv,
        ratio,
        verdict,
        iv.low if iv else None,
        iv.high if iv else None,
        probe,
        bs,
        ns,
        **_quality_fields(b, n),
        level=iv.level if iv else None,
    )


def _latest(df) -> dict[tuple, dict]:
    """Records by case key (the last one wins when a case was measured twice)."""
    out: dict[tuple, dict] = {}
    if df is None or len(df) == 0:
        return out
    for rec in df.to_dict("records"):
        out[tuple(plain_value(rec.get(c)) for c in CASE_KEY)] = rec
    return out


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v)) for v in key)


def ratio_text(r: CaseDiff) -> str:
    """ "1.23x (+23%)", or "-" without a ratio."""
    if r.ratio is None:
        return "-"
    return f"{r.ratio:.2f}x ({(r.ratio - 1) * 100:+.0f}%)"


def key_text(key: tuple, shown: Sequence[str]) -> str:
    """A case: its series label with the ``shown`` dimensions, and its n."""
    return f"{case_label(key, shown)}, n={key[CASE_KEY.index('seq_len')]}"


# ----------------------------------------------------------------------------------------------
# one folder along one dimension


@dataclass(frozen=True)
class ByComparison:
    """One folder along one dimension: per row (the other case-key columns) each value's time,
    or its status where it did not run ok. Along backends, the first value is BASELINE_COLUMN:
    the dense baseline at the row's n (and dtype, mode, ...), so that a sparse pattern, which
    never runs on sdpa, is seen against dense; on the dense pattern's own rows that cell reads
    SAME_AS_BASELINE."""

    by: str  # the user's word: backend, pattern, ...
    column: str  # the frame column
    values: tuple[str, ...]  # one table column each
    dims: tuple[str, ...]  # row columns (the case key less `column`, varying ones only)
    rows: tuple[tuple[tuple[Any, ...], tuple[tuple[str, float | None, str], ...]], ...]
    metric: str = "median"

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "metric": self.metric,
            "rows": [
                {**dict(zip(self.dims, key)), **{v: {"time_s": t, "status": s} for v, t, s in cells}}
                for key, cells in self.rows
            ],
        }


def compare_by(df, by: str = "backend", metric: str = "median") -> ByComparison:
    """One run side by side along ``by`` (backend, pattern, device, dtype, mode, causal)."""
    check_choice("dimension for --by", by, tuple(BY_DIMENSIONS))
    check_choice("metric", metric, tuple(METRICS))
    column = BY_DIMENSIONS[by]
    if df is None or len(df) == 0:
        raise ResultsError("no records to compare")
    if by == "device":  # the same cases across GPUs or CPUs (and machines): cpu and cuda are hardware too
        from sparsebench.results.folder import hardware_column

        df = hardware_column(df)
    rest = [c for c in CASE_KEY if c != column and not (by == "device" and c == "device")]
    dims = [c for c in varying_dims(df, rest) if c != "seq_len"] + ["seq_len"]
    if by != "pattern" and "pattern_label" not in dims:
        dims.insert(0, "pattern_label")
    if by != "backend" and "backend" not in dims:
        dims.insert(1 if dims[0] == "pattern_label" else 0, "backend")
    values = sorted({str(plain_value(v)) for v in df[column]}, key=lambda v: (v != "sdpa", v))
    if len(values) < 2:
        raise ResultsError(
            f"only one {by} ({values[0] if values else 'none'}) in these results: nothing to put side by side"
        )
    baseline = _baseline_cells(df, metric) if by == "backend" else {}
    if baseline:
        values.insert(0, BASELINE_COLUMN)
    rows = []
    for key, g in iter_groups(df, rest):
        cells = {}
        if baseline:
            row = dict(zip(rest, key))
            cells[BASELINE_COLUMN] = (
                (None, SAME_AS_BASELINE)
                if row["pattern_label"] == BASELINE_PATTERN
                else baseline.get(tuple(row[c] for c in rest if c != "pattern_label"), (None, ""))
            )
        for rec in g.to_dict("records"):
            ok = rec.get("status") == "ok"
            cells[str(plain_value(rec.get(column)))] = (
                metric_time(rec, metric) if ok else None,
                str(rec.get("status")),
            )
        filled = tuple((v, *cells.get(v, (None, ""))) for v in values)
        if sum(1 for _, _, s in filled if s and s != SAME_AS_BASELINE) < 2:
            continue  # nothing to compare on this row
        row = dict(zip(rest, key))
        rows.append((tuple(row[c] for c in dims), filled))
    if not rows:
        raise ResultsError(f"no case was measured with two different {by} values")
    rows.sort(key=lambda r: _sort_key(r[0]))
    return ByComparison(by, column, tuple(values), tuple(dims), tuple(rows), metric)


def _baseline_cells(df, metric: str) -> dict[tuple, tuple[float | None, str]]:
    """The dense baseline's (time, status) by its case key less pattern and backend."""
    rest = [c for c in CASE_KEY if c not in ("pattern_label", "backend")]
    base = df[(df["pattern_label"].astype(str) == BASELINE_PATTERN) & (df["backend"].astype(str) == BASELINE_BACKEND)]
    out = {}
    for key, g in iter_groups(base, rest):
        rec = g.to_dict("records")[-1]  # the last one wins when a case was measured twice
        ok = rec.get("status") == "ok"
        out[key] = (metric_time(rec, metric) if ok else None, str(rec.get("status")))
    return out
