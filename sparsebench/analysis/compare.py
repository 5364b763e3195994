"""Compare two result folders case by case, or one folder along one dimension.

``compare(base_df, new_df)`` joins on ``CASE_KEY`` and gives each case a verdict from the raw
times, not from one number: a two-sided Mann-Whitney U test (exact for small samples, normal
approximation with tie correction otherwise; no scipy) where the samples are large enough for
it to reach the significance level, else IQR overlap. A case is *slower* only when its ratio
exceeds 1 + threshold AND the difference is beyond the noise; *faster* symmetrically (ratio
below 1 / (1 + threshold)).

``compare_by(df, "backend")`` puts one run side by side along one dimension.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sparsebench.analysis.scaling import (
    TableSpec,
    case_label,
    dim_text,
    fmt_time,
    iter_groups,
    markdown_table,
    rich_table,
    varying_dims,
)
from sparsebench.errors import ResultsError, ScenarioError
from sparsebench.registry import unknown_choice
from sparsebench.results.folder import CASE_KEY, ENVIRONMENT, read_environment

METRICS = {"median": "time_median_s", "min": "time_min_s"}
FORMATS = ("table", "markdown", "json", "csv")
BY_DIMENSIONS = {"backend": "backend", "pattern": "pattern_label", "device": "device", "dtype": "dtype",
                 "mode": "mode", "causal": "causal"}
ALPHA = 0.05
RING = "#000000"  # marks a regression in the ratio plot
# environment.json keys whose difference makes timings hard to compare (and every entry of its
# "switches": the SPARSEBENCH_* variables that change which kernels run)
ENV_KEYS = ("gpu", "cpu", "torch", "threads", "python")
REGRESSIONS = ("slower", "now failing")
FAILED = ("oom", "timeout", "error", "crashed", "wrong")


# ----------------------------------------------------------------------------------------------
# options


def parse_threshold(text: str | float) -> float:
    """"10%" -> 0.10; "0.1" -> 0.10 (a fraction below 1); "10" -> 0.10 (a percentage)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, pct = float(text), False
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise ScenarioError(
                f"--threshold: expected a percentage like 10% or a fraction like 0.1, got {text!r}"
            )
        value, pct = float(m.group(1)), bool(m.group(2))
    if pct or value >= 1:
        value /= 100.0
    if not (0 <= value < 10) or not math.isfinite(value):
        raise ScenarioError(f"--threshold: {text!r} is out of range (use e.g. 5% or 0.05)")
    return value


def check_choice(kind: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ScenarioError(unknown_choice(kind, value, choices))
    return value


# ----------------------------------------------------------------------------------------------
# statistics


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (exact without ties for m + n <= 50)."""
    m, n = len(a), len(b)
    if m == 0 or n == 0:
        return 1.0
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    ties = []
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    r1 = sum(r for r, (_, side) in zip(ranks, pooled) if side == 0)
    u = r1 - m * (m + 1) / 2
    if not ties and m + n <= 50:
        dist = _u_distribution(m, n)
        total = sum(dist)
        k = int(round(u))
        lower = sum(dist[: k + 1]) / total
        upper = sum(dist[k:]) / total
        return min(1.0, 2 * min(lower, upper))
    mu = m * n / 2
    tie_term = sum(t**3 - t for t in ties) / ((m + n) * (m + n - 1)) if ties else 0.0
    var = m * n / 12 * ((m + n + 1) - tie_term)
    if var <= 0:
        return 1.0
    z = (abs(u - mu) - 0.5) / math.sqrt(var)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


def _u_distribution(m: int, n: int) -> list[int]:
    """Counts of U = 0..m*n over all arrangements (the Gaussian binomial coefficient)."""
    # f[j] for the current i: counts for (i, j) samples; f(i, j) = f(i-1, j) shifted by j + f(i, j-1)
    prev = [[1] for _ in range(n + 1)]  # i = 0: U is 0
    for i in range(1, m + 1):
        cur = [[1]]  # j = 0: U is 0
        for j in range(1, n + 1):
            a = [0] * j + prev[j]  # the largest value is from sample 1: adds j
            b = cur[j - 1]
            size = max(len(a), len(b))
            cur.append([(a[k] if k < len(a) else 0) + (b[k] if k < len(b) else 0) for k in range(size)])
        prev = cur
    return prev[n]


def min_p_value(m: int, n: int) -> float:
    """The smallest two-sided p-value the exact test can reach with samples of m and n."""
    if m == 0 or n == 0:
        return 1.0
    return min(1.0, 2 / math.comb(m + n, m))


def _iqr(times: Sequence[float] | None, median: float | None, iqr: float | None) -> tuple[float, float] | None:
    if times and len(times) >= 2:
        s = sorted(times)
        return _quantile(s, 0.25), _quantile(s, 0.75)
    if median is not None and iqr is not None:
        return median - iqr / 2, median + iqr / 2
    return None


def _quantile(s: Sequence[float], q: float) -> float:
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def beyond_noise(base: dict, new: dict) -> tuple[bool, str, float | None]:
    """(different?, which test, p-value or None) from the raw times of two ok records."""
    a, b = _times(base), _times(new)
    if a and b and min_p_value(len(a), len(b)) < ALPHA:
        p = mann_whitney(a, b)
        return p < ALPHA, "U test", p
    ia = _iqr(a, _f(base.get("time_median_s")), _f(base.get("time_iqr_s")))
    ib = _iqr(b, _f(new.get("time_median_s")), _f(new.get("time_iqr_s")))
    if ia is None or ib is None:
        return True, "no spread recorded", None
    apart = ia[1] < ib[0] or ib[1] < ia[0]
    return apart, "IQRs apart" if apart else "IQRs overlap", None


# ----------------------------------------------------------------------------------------------
# two folders


@dataclass(frozen=True)
class CaseDiff:
    key: tuple[Any, ...]  # values of CASE_KEY
    base: float | None
    new: float | None
    ratio: float | None  # new / base
    verdict: str  # faster | slower | same | now failing | now ok | failed in both | skipped
    test: str = ""
    p_value: float | None = None
    base_status: str = "ok"
    new_status: str = "ok"

    def get(self, column: str) -> Any:
        return self.key[CASE_KEY.index(column)]

    @property
    def is_regression(self) -> bool:
        return self.verdict in REGRESSIONS


@dataclass(frozen=True)
class Comparison:
    rows: tuple[CaseDiff, ...]
    only_base: tuple[tuple[Any, ...], ...] = ()
    only_new: tuple[tuple[Any, ...], ...] = ()
    warnings: tuple[str, ...] = ()
    threshold: float = 0.10
    metric: str = "median"
    base_name: str = "base"
    new_name: str = "new"
    shown_dims: tuple[str, ...] = field(default=())  # case-key columns that vary (shown)
    only_base_ok: tuple[tuple[Any, ...], ...] = ()  # those of only_base that BASE measured (ok)

    def regressions(self) -> list[CaseDiff]:
        return [r for r in self.rows if r.is_regression]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.verdict] = out.get(r.verdict, 0) + 1
        return out

    def summary_line(self) -> str:
        c = self.counts()
        parts = [f"{v} {k}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])]
        if self.only_base:
            parts.append(f"{len(self.only_base)} only in {self.base_name}")
        if self.only_new:
            parts.append(f"{len(self.only_new)} only in {self.new_name}")
        return (f"{len(self.rows)} common cases ({', '.join(parts) or 'none'}); "
                f"threshold {self.threshold:.0%} on the {self.metric}")

    def missing(self) -> list[tuple[Any, ...]]:
        """Cases that BASE measured (ok) and NEW did not: absent from NEW, or skipped there."""
        skipped = [r.key for r in self.rows if r.verdict == "skipped" and r.base_status == "ok"]
        return sorted([*self.only_base_ok, *skipped], key=_sort_key)

    def compared(self) -> list[CaseDiff]:
        """The cases with a verdict from measurements: measured in both, or ok in one and failed
        in the other."""
        return [r for r in self.rows if r.verdict not in ("skipped", "failed in both")]

    def gate_failed(self, allow_missing: bool = False) -> bool:
        """Whether ``--fail-on-regression`` fails: a regression, nothing compared, or (unless
        ``allow_missing``) a case of BASE that NEW did not measure, so that an interrupted,
        partial or skipped run cannot pass the gate."""
        return (bool(self.regressions()) or not self.compared()
                or (not allow_missing and bool(self.missing())))

    def failure_message(self, allow_missing: bool = False) -> str:
        bits = []
        bad = self.regressions()
        if bad:
            first = bad[0]
            what = f"{case_label(first.key, self.shown_dims)}, n={first.get('seq_len')}"
            bits.append(f"{len(bad)} case(s) regressed beyond {self.threshold:.0%} and the noise "
                        f"(first: {what}, {_ratio_text(first)})")
        if not self.rows:
            bits.append(f"no case of {self.base_name} is in {self.new_name}: nothing was compared")
        elif not self.compared():
            bits.append(f"no case was measured in both {self.base_name} and {self.new_name}: nothing was compared")
        elif not allow_missing and (gone := self.missing()):
            bits.append(f"{len(gone)} case(s) of {self.base_name} not measured in {self.new_name} "
                        f"(first: {_key_text(gone[0], self.shown_dims)}; --allow-missing accepts that)")
        return "; ".join(bits) or "no regressions"

    # -- renderers ----------------------------------------------------------------------------
    def table_spec(self) -> TableSpec:
        cols = ("case",) + tuple(self.shown_dims) + ("n", "base", "new", "ratio", "verdict", "noise")
        rows = []
        for r in self.rows:
            rows.append(
                (f"{r.get('pattern_label')} · {r.get('backend')}",)
                + tuple(dim_text(c, r.get(c)) for c in self.shown_dims)
                + (str(r.get("seq_len")), _side(r.base, r.base_status), _side(r.new, r.new_status),
                   _ratio_text(r), r.verdict, _noise_text(r))
            )
        return TableSpec(f"{self.metric} time, new = {self.new_name} vs base = {self.base_name}", cols,
                         tuple(rows), self.summary_line(), wrap=(0,))

    def rich_renderables(self) -> list:
        from rich.text import Text

        out: list = [Text(f"warning: {w}", style="yellow") for w in self.warnings]
        colours = {"slower": "red", "now failing": "red", "faster": "green", "now ok": "green"}
        out.append(rich_table(self.table_spec(), [colours.get(r.verdict) for r in self.rows]))
        for title, keys in ((f"only in {self.base_name}", self.only_base), (f"only in {self.new_name}", self.only_new)):
            if keys:
                out.append(Text(f"{title} ({len(keys)}):", style="bold"))
                for k in keys:
                    out.append(Text(f"  {_key_text(k, self.shown_dims)}"))
        return out

    def to_markdown(self) -> str:
        t = self.table_spec()
        bad = self.regressions()
        gone = self.missing()
        head = "❌ " if bad or not self.compared() else ("⚠️ " if gone else "✅ ")
        extra = f" {len(gone)} case(s) of {self.base_name} not measured in {self.new_name}." if gone else ""
        if self.rows and not self.compared():
            extra += " Nothing was measured in both."
        parts = [f"### sparsebench compare: {self.new_name} vs {self.base_name}\n",
                 f"{head}{len(bad)} regression(s).{extra} {self.summary_line()}.\n"]
        for w in self.warnings:
            parts.append(f"> **Warning:** {w}\n")
        rows = [tuple(f"**{v}**" if (i == len(r) - 2 and v in REGRESSIONS) else v for i, v in enumerate(r)) for r in t.rows]
        parts.append(markdown_table(t.columns, rows))
        for title, keys in ((f"Only in {self.base_name}", self.only_base), (f"Only in {self.new_name}", self.only_new)):
            if keys:
                parts.append(f"\n**{title}** ({len(keys)}):\n")
                parts += [f"- {_key_text(k, self.shown_dims)}" for k in keys]
                parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base_name,
            "new": self.new_name,
            "metric": self.metric,
            "threshold": self.threshold,
            "warnings": list(self.warnings),
            "counts": self.counts(),
            "regressions": len(self.regressions()),
            "compared": len(self.compared()),
            "missing": [dict(zip(CASE_KEY, k)) for k in self.missing()],
            "cases": [
                {**dict(zip(CASE_KEY, r.key)), "base": r.base, "new": r.new, "ratio": r.ratio, "verdict": r.verdict,
                 "test": r.test, "p_value": r.p_value, "base_status": r.base_status, "new_status": r.new_status}
                for r in self.rows
            ],
            "only_base": [dict(zip(CASE_KEY, k)) for k in self.only_base],
            "only_new": [dict(zip(CASE_KEY, k)) for k in self.only_new],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = list(CASE_KEY) + ["side", "base", "new", "ratio", "verdict", "test", "p_value", "base_status", "new_status"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({**dict(zip(CASE_KEY, r.key)), "side": "both", "base": r.base, "new": r.new, "ratio": r.ratio,
                        "verdict": r.verdict, "test": r.test, "p_value": r.p_value, "base_status": r.base_status,
                        "new_status": r.new_status})
        for side, keys in (("base only", self.only_base), ("new only", self.only_new)):
            for k in keys:
                w.writerow({**dict(zip(CASE_KEY, k)), "side": side})
        return buf.getvalue()

    def render(self, fmt: str) -> str:
        """Text in one of FORMATS ('table' is the rich table as plain text)."""
        fmt = check_choice("format", fmt, FORMATS)
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "json":
            return self.to_json()
        if fmt == "csv":
            return self.to_csv()
        return render_plain(self.rich_renderables())


def compare(base_df, new_df, threshold: float = 0.10, metric: str = "median", base_env: dict | None = None,
            new_env: dict | None = None, base_name: str = "base", new_name: str = "new") -> Comparison:
    """Join two results frames on the case key and judge each common case."""
    check_choice("metric", metric, tuple(METRICS))
    col = METRICS[metric]
    base = _latest(base_df)
    new = _latest(new_df)
    common = [k for k in base if k in new]
    rows = []
    for k in common:
        rows.append(_judge(k, base[k], new[k], col, threshold))
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
    fewer = [k for k in common if (_f(new[k].get("rounds")) or 1) < (_f(base[k].get("rounds")) or 1)]
    if fewer:  # an interrupted multi-round run: every case is there, with fewer rounds
        warnings.append(f"{len(fewer)} case(s) measured in fewer rounds in {new_name} than in {base_name} "
                        f"(first: {_key_text(fewer[0], ())}); was the run interrupted?")
    return Comparison(tuple(rows), only_base, only_new, tuple(warnings), threshold, metric, base_name, new_name, shown,
                      base_measured)


def compare_folders(base: Path, new: Path, threshold: float = 0.10, metric: str = "median", warn=None) -> Comparison:
    from sparsebench.results.folder import load_frame

    base, new = Path(base), Path(new)
    if base.resolve() == new.resolve() and warn is not None:
        warn(f"BASE and NEW are the same folder ({base}): every case compares with itself")
    names = (base.name or str(base), new.name or str(new))
    if names[0] == names[1]:
        names = (str(base), str(new))
    return compare(
        load_frame(base, warn=warn), load_frame(new, warn=warn), threshold=threshold, metric=metric,
        base_env=read_environment(base, warn), new_env=read_environment(new, warn),
        base_name=names[0], new_name=names[1],
    )


def env_warnings(base_env: dict | None, new_env: dict | None, base_name: str = "base", new_name: str = "new"):
    if base_env is None or new_env is None:
        missing = [n for n, e in ((base_name, base_env), (new_name, new_env)) if e is None]
        if missing:
            yield f"no {ENVIRONMENT} in {', '.join(missing)}: cannot check that the environments match"
        return
    diffs = []
    for k in ENV_KEYS:
        a, b = base_env.get(k), new_env.get(k)
        if a != b:
            diffs.append(f"{k} {a if a is not None else 'none'} vs {b if b is not None else 'none'}")
    a_sw, b_sw = base_env.get("switches"), new_env.get("switches")
    if isinstance(a_sw, dict) and isinstance(b_sw, dict):  # older runs did not record them
        for k in sorted(set(a_sw) | set(b_sw)):
            if a_sw.get(k) != b_sw.get(k):
                diffs.append(f"{k} {a_sw.get(k, 'unset')} vs {b_sw.get(k, 'unset')}")
    if diffs:
        yield "environments differ (" + "; ".join(diffs) + "): timings may not be comparable"


def _judge(key, b: dict, n: dict, col: str, threshold: float) -> CaseDiff:
    bs, ns = str(b.get("status")), str(n.get("status"))
    bv, nv = _f(b.get(col)), _f(n.get(col))
    if bs != "ok" or ns != "ok" or bv is None or nv is None:
        if bs == "ok" and ns in FAILED:
            verdict = "now failing"
        elif ns == "ok" and bs in FAILED:
            verdict = "now ok"
        elif bs in FAILED and ns in FAILED:
            verdict = "failed in both"
        else:
            verdict = "skipped"
        return CaseDiff(key, bv if bs == "ok" else None, nv if ns == "ok" else None, None, verdict,
                        base_status=bs, new_status=ns)
    ratio = nv / bv if bv > 0 else math.inf
    different, test, p = beyond_noise(b, n)
    if ratio > 1 + threshold and different:
        verdict = "slower"
    elif ratio < 1 / (1 + threshold) and different:
        verdict = "faster"
    else:
        verdict = "same"
    return CaseDiff(key, bv, nv, ratio, verdict, test, p, bs, ns)


def _latest(df) -> dict[tuple, dict]:
    """Records by case key (the last one wins when a case was measured twice)."""
    out: dict[tuple, dict] = {}
    if df is None or len(df) == 0:
        return out
    for rec in df.to_dict("records"):
        out[tuple(_plain(rec.get(c)) for c in CASE_KEY)] = rec
    return out


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v)) for v in key)


def _times(rec: dict) -> list[float]:
    t = rec.get("times_s")
    if isinstance(t, str):
        try:
            t = json.loads(t)
        except json.JSONDecodeError:
            return []
    if not isinstance(t, (list, tuple)):
        return []
    return [float(x) for x in t if _f(x) is not None]


def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _side(v: float | None, status: str) -> str:
    return fmt_time(v) if status == "ok" and v is not None else status


def _ratio_text(r: CaseDiff) -> str:
    if r.ratio is None:
        return "-"
    return f"{r.ratio:.2f}x ({(r.ratio - 1) * 100:+.0f}%)"


def _noise_text(r: CaseDiff) -> str:
    if r.p_value is not None:
        return f"p={r.p_value:.2g} ({r.test})"
    return r.test or "-"


def _key_text(key: tuple, shown: Sequence[str]) -> str:
    return f"{case_label(key, shown)}, n={key[CASE_KEY.index('seq_len')]}"


def render_plain(renderables: list, width: int = 160) -> str:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, highlight=False, soft_wrap=False)
    for r in renderables:
        console.print(r)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# one folder along one dimension


@dataclass(frozen=True)
class ByComparison:
    by: str  # the user's word: backend, pattern, ...
    column: str  # the frame column
    values: tuple[str, ...]  # one table column each
    dims: tuple[str, ...]  # row columns (the case key less `column`, varying ones only)
    rows: tuple[tuple[tuple[Any, ...], tuple[tuple[str, float | None, str], ...]], ...]
    metric: str = "median"

    def table_spec(self) -> TableSpec:
        out = []
        for key, cells in self.rows:
            times = [t for _, t, _ in cells if t is not None]
            best = min(times) if times else None
            row = [dim_text(c, v) if c != "seq_len" else str(v) for c, v in zip(self.dims, key)]
            for _, t, status in cells:
                if t is None:
                    row.append(status or "-")
                elif best is not None and t == best:
                    row.append(f"{fmt_time(t)} (best)" if len(times) > 1 else fmt_time(t))
                else:
                    row.append(f"{fmt_time(t)} ({t / best:.2f}x)")
            out.append(tuple(row))
        return TableSpec(
            f"{self.metric} time by {self.by}",
            tuple({"seq_len": "n", "pattern_label": "pattern"}.get(c, c) for c in self.dims) + self.values,
            tuple(out),
            "(best) marks the fastest in each row; (k x) is the time relative to it.",
        )

    def rich_renderables(self) -> list:
        return [rich_table(self.table_spec())]

    def to_markdown(self) -> str:
        t = self.table_spec()
        rows = [tuple(f"**{v}**" if v.endswith("(best)") else v for v in r) for r in t.rows]
        return f"### {t.title}\n\n" + markdown_table(t.columns, rows) + f"\n{t.note}\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "metric": self.metric,
            "rows": [
                {**dict(zip(self.dims, key)), **{v: {"time_s": t, "status": s} for v, t, s in cells}}
                for key, cells in self.rows
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(self.dims) + list(self.values))
        for key, cells in self.rows:
            w.writerow(list(key) + [t if t is not None else s for _, t, s in cells])
        return buf.getvalue()

    def render(self, fmt: str) -> str:
        fmt = check_choice("format", fmt, FORMATS)
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "json":
            return self.to_json()
        if fmt == "csv":
            return self.to_csv()
        return render_plain(self.rich_renderables())


def compare_by(df, by: str = "backend", metric: str = "median") -> ByComparison:
    """One run side by side along ``by`` (backend, pattern, device, dtype, mode, causal)."""
    check_choice("dimension for --by", by, tuple(BY_DIMENSIONS))
    check_choice("metric", metric, tuple(METRICS))
    column, tcol = BY_DIMENSIONS[by], METRICS[metric]
    if df is None or len(df) == 0:
        raise ResultsError("no records to compare")
    rest = [c for c in CASE_KEY if c != column]
    dims = [c for c in varying_dims(df, rest) if c != "seq_len"] + ["seq_len"]
    if by != "pattern" and "pattern_label" not in dims:
        dims.insert(0, "pattern_label")
    if by != "backend" and "backend" not in dims:
        dims.insert(1 if dims[0] == "pattern_label" else 0, "backend")
    values = sorted({str(_plain(v)) for v in df[column]}, key=lambda v: (v != "sdpa", v))
    if len(values) < 2:
        raise ResultsError(f"only one {by} ({values[0] if values else 'none'}) in these results: nothing to put side by side")
    rows = []
    for key, g in iter_groups(df, rest):
        cells = {}
        for rec in g.to_dict("records"):
            ok = rec.get("status") == "ok"
            cells[str(_plain(rec.get(column)))] = (_f(rec.get(tcol)) if ok else None, str(rec.get("status")))
        filled = tuple((v, *cells.get(v, (None, ""))) for v in values)
        if sum(1 for _, _, s in filled if s) < 2:
            continue  # nothing to compare on this row
        row = dict(zip(rest, key))
        rows.append((tuple(row[c] for c in dims), filled))
    if not rows:
        raise ResultsError(f"no case was measured with two different {by} values")
    rows.sort(key=lambda r: _sort_key(r[0]))
    return ByComparison(by, column, tuple(values), tuple(dims), tuple(rows), metric)


# ----------------------------------------------------------------------------------------------
# figure


def fig_ratio(cmp: Comparison, styles=None):
    """new/base ratio against n per series (log-log), the threshold band shaded, slower cases
    ringed. Returns a matplotlib Figure, or None when no case has a ratio."""
    rows = [r for r in cmp.rows if r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0]
    if not rows:
        return None
    import pandas as pd
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from sparsebench.analysis.scaling import is_baseline_key
    from sparsebench.render.plots import finish_axes, outside_legend, wrap_label, styles_for

    df = pd.DataFrame([{**dict(zip(CASE_KEY, r.key)), "ratio": r.ratio, "verdict": r.verdict} for r in rows])
    styles = styles or styles_for(df)
    fig = Figure(figsize=(11.5, 4.8), layout="constrained")
    fig.suptitle(f"{cmp.metric} time ratio, {cmp.new_name} / {cmp.base_name}", fontweight="bold")
    ax = fig.add_subplot()
    t = cmp.threshold
    ax.axhspan(1 / (1 + t), 1 + t, color="#eeeeee", zorder=0, label=f"within ±{t:.0%}")
    ax.axhline(1.0, color="#777777", linewidth=1.5, zorder=1, label="no change")
    keys = [c for c in CASE_KEY if c != "seq_len"]
    for key, g in iter_groups(df, keys):
        g = g.sort_values("seq_len")
        row = dict(zip(keys, key))
        label = f"{row['pattern_label']} · {row['backend']}"
        extra = [dim_text(c, row[c]) for c in cmp.shown_dims]
        if extra:
            label += ", " + ", ".join(extra)
        ax.plot(g["seq_len"], g["ratio"], label=wrap_label(label), gid=f"ratio:{label}",
                **styles.line(row["pattern_label"], row["backend"], is_baseline_key(key)))
        slow = g[g["verdict"] == "slower"]
        if len(slow):
            ax.plot(slow["seq_len"], slow["ratio"], linestyle="none", marker="o", markersize=13,
                    markerfacecolor="none", markeredgecolor=RING, markeredgewidth=1.6,
                    zorder=6, label="_slower")
    finish_axes(ax, f"threshold {t:.0%}; a ring marks a case slower beyond the threshold and the noise",
            "sequence length n (tokens)", f"{cmp.metric} time ratio (new / base)", y="ratio")
    extra = []
    if (df["verdict"] == "slower").any():
        extra.append(Line2D([], [], linestyle="none", marker="o", markersize=10, markerfacecolor="none",
                            markeredgecolor=RING, markeredgewidth=1.6, label="slower (regression)"))
    outside_legend(ax, extra)
    return fig
