"""sparsebench.stats: quantiles, the rank test, the power-law fit, t quantiles."""

from __future__ import annotations

import math
import statistics

import pytest

from sparsebench.stats import (
    Fit,
    fit_power,
    iqr,
    mann_whitney,
    min_p_value,
    quantile,
    quartiles,
    t975,
    u_distribution,
)


def test_overhead_floor_is_left_out_of_the_fit():
    ns = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    ts = [1e-3 + 1e-11 * n * n for n in ns]  # flat until ~ 10K: overhead-dominated
    fit = fit_power(ns, ts)
    assert fit.excluded[:3] == (128, 256, 512)
    assert fit.points >= 3 and fit.sizes[-1] == 16384
    naive = fit_power(ns, ts, floor_slope=-math.inf)
    assert naive.excluded == ()
    assert fit.exponent > naive.exponent + 0.3


def test_fit_edge_cases():
    assert fit_power([256], [1.0]) is None
    assert fit_power([], []) is None
    two = fit_power([256, 512], [1.0, 4.0])
    assert two.exponent == pytest.approx(2.0) and two.ci_low is None and "no CI" in two.describe()
    exact = fit_power([1, 2, 4, 8], [3, 6, 12, 24])
    assert exact.exponent == pytest.approx(1.0) and exact.ci_low == pytest.approx(1.0)
    assert exact.predict(16) == pytest.approx(48)
    assert isinstance(exact, Fit)
    assert t975(1) == pytest.approx(12.706, abs=1e-3) and 1.96 < t975(1000) < 1.97 and t975(0) == math.inf


def test_mann_whitney():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [5.0, 6.0, 7.0, 8.0]
    assert mann_whitney(a, b) == pytest.approx(2 / math.comb(8, 4))
    assert mann_whitney(b, a) == pytest.approx(2 / math.comb(8, 4))
    assert mann_whitney(a, a) == pytest.approx(1.0)  # all ties: normal approximation, p = 1
    interleaved = [1.0, 3.0, 5.0, 7.0]
    assert mann_whitney(interleaved, [2.0, 4.0, 6.0, 8.0]) > 0.5
    # large samples: the normal approximation agrees with the obvious answer
    big_a = [float(i) for i in range(40)]
    assert mann_whitney(big_a, [x + 100 for x in big_a]) < 1e-10
    assert mann_whitney(big_a, [x + 0.5 for x in big_a]) > 0.5
    assert min_p_value(3, 3) == pytest.approx(0.1) and min_p_value(7, 7) < 0.001


# -- the library ----------------------------------------------------------------------------


def test_u_distribution_counts_every_arrangement():
    dist = u_distribution(3, 4)
    assert sum(dist) == math.comb(7, 3) and len(dist) == 3 * 4 + 1
    assert dist == dist[::-1]  # symmetric about m * n / 2


def test_quantiles_and_iqr():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert quantile(values, 0.0) == 1.0 and quantile(values, 1.0) == 5.0 and quantile(values, 0.5) == 3.0
    assert quantile([1.0, 2.0], 0.25) == pytest.approx(1.25)  # linear between order statistics
    assert quartiles(values) == (2.0, 4.0) and iqr(values) == 2.0
    times = [0.1, 0.4, 0.35, 0.2, 0.9, 0.15]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")  # what the harness records
    assert iqr(times) == q3 - q1
    assert quartiles(times) == pytest.approx((quantile(times, 0.25), quantile(times, 0.75)))
    assert iqr([1.0]) == 0.0 and iqr([]) == 0.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_t_distribution_matches_published_quantiles():
    from sparsebench.stats import t_cdf, t_quantile

    # two-sided 95% and 99.9% quantiles from printed tables
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(0.9995, 10) == pytest.approx(4.587, abs=1e-3)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.960, abs=1e-3)
    assert t_cdf(0.0, 7) == pytest.approx(0.5) and t_cdf(2.365, 7) == pytest.approx(0.975, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
