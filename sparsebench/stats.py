"""The statistics sparsebench uses, as pure functions of numbers (no scipy; numpy only inside
``fit_power``): quantiles and the interquartile range, the two-sided Mann-Whitney U test, the
least-squares power law ``y = a * n**k`` with its 95% interval, and Student's t distribution (its
quantiles and p-values make the intervals of ``analysis.noise.RatioError``, for compare and history).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

# -- quantiles ----------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear between the two nearest order statistics
    (numpy's default, and ``statistics.quantiles(method="inclusive")``)."""
    s = sorted(values)
    if not s:
        raise ValueError("quantile of no values")
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(first, third) quartile, linear quantiles as ``quantile``; needs two values or more."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def iqr(values: Sequence[float]) -> float:
    """The interquartile range (third minus first quartile); 0.0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    q1, q3 = quartiles(values)
    return q3 - q1


# -- the rank test ------------------------------------------------------------------------------


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (exact without ties for m + n <= 50, else the
    normal approximation with tie correction and continuity correction)."""
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
        dist = u_distribution(m, n)
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


def u_distribution(m: int, n: int) -> list[int]:
    """Counts of U = 0..m*n over all arrangements of samples of m and n (the Gaussian binomial
    coefficient)."""
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


# -- Student's t --------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1 - math.exp(ln) * _betacf(b, a, 1 - x) / b


def t_cdf(x: float, dof: float) -> float:
    """P(T <= x) for Student's t with ``dof`` degrees of freedom."""
    tail = 0.5 * _betainc(dof / 2, 0.5, dof / (dof + x * x))
    return 1 - tail if x > 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile (0 < p < 1) of Student's t with ``dof`` >= 1 degrees of freedom
    (bisection on ``t_cdf``; scipy is not a dependency)."""
    if not 0 < p < 1:
        raise ValueError(f"quantile of p={p}")
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (inf below 1)."""
    if dof < 1:
        return math.inf
    return t_quantile(0.975, dof)


# -- the power law ------------------------------------------------------------------------------

# A leading size whose y grows slower than n**FLOOR_SLOPE up to the next size is taken to be
# dominated by fixed overhead (launch, dispatch, Python) and left out of the fit.
FLOOR_SLOPE = 0.5
MIN_FIT_POINTS = 3


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

    @property
    def half_width(self) -> float | None:
        """Half the 95% interval of the exponent (it is symmetric about the slope); None
        without one."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2

    def describe(self) -> str:
        """ "1.98 ± 0.07", or "2.00 (2 sizes, no CI)"."""
        if self.half_width is None:
            return f"{self.exponent:.2f} (2 sizes, no CI)"
        return f"{self.exponent:.2f} ± {self.half_width:.2f}"


def fit_power(
    ns: Iterable[float], ys: Iterable[float], floor_slope: float = FLOOR_SLOPE, min_points: int = MIN_FIT_POINTS
) -> Fit | None:
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
