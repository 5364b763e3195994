"""`sparsebench compare`: verdicts from the raw times, the threshold and the exit code, cases on
one side only, environment warnings, output formats, --by, and the ratio plot."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import statistics

import pytest
import typer
from report_fixtures import ENV, make_records, record, write_result
from typer.testing import CliRunner

from sparsebench.analysis.compare import compare, compare_by, metric_time, parse_threshold
from sparsebench.analysis.noise import Noise, samples
from sparsebench.cli.report import register
from sparsebench.errors import ResultsError, ScenarioError
from sparsebench.render.compare import fig_ratio, render, to_csv, to_json, to_markdown
from sparsebench.results.folder import frame

SW = "sliding_window(window=256)"


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def run(*args: str):
    return CliRunner().invoke(app(), ["compare", *map(str, args)])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    return {
        "base": write_result(root / "base", make_records()),
        "same": write_result(root / "same", make_records()),
        "slow": write_result(root / "slow", make_records(scale=1.5)),
        "env": write_result(root / "env", make_records(), env={**ENV, "threads": 8, "torch": "2.12.0"}),
        "partial": write_result(
            root / "partial",
            make_records(where=lambda r: r["backend"] != "flex") + [record("dense", "sdpa", 16384, 0.4)],
        ),
        # every case ran but the block-sparse ones were skipped (a memory budget, say)
        "skips": write_result(
            root / "skips",
            [
                {**r, "status": "skipped", "reason": "over budget", "time_median_s": None, "times_s": None}
                if r["backend"] == "block_sparse"
                else r
                for r in make_records()
            ],
        ),
        "other": write_result(root / "other", [record("dense", "sdpa", 123, 0.1)]),
        # a CI box without the device: every case skipped
        "allskipped": write_result(
            root / "allskipped",
            [
                {**r, "status": "skipped", "reason": "no cuda", "time_median_s": None, "times_s": None}
                for r in make_records()
            ],
        ),
    }


# -- options and statistics ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value", [("10%", 0.10), ("0.1", 0.10), ("10", 0.10), ("2.5%", 0.025), (" 5 % ", 0.05), ("0", 0.0)]
)
def test_parse_threshold(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["junk", "-5%", "10%%", "", "ten"])
def test_parse_threshold_rejects_junk(text):
    with pytest.raises(ScenarioError, match="--threshold"):
        parse_threshold(text)


def test_identical_is_same():
    c = compare(frame(make_records()), frame(make_records()))
    assert c.rows and all(r.verdict in ("same", "failed in both") for r in c.rows)
    assert c.regressions() == [] and c.only_base == () and c.only_new == ()


def test_fifty_percent_slower_is_a_regression():
    c = compare(frame(make_records()), frame(make_records(scale=1.5)))
    ok = [r for r in c.rows if r.ratio is not None]
    assert ok and all(r.verdict == "slower" and r.ratio == pytest.approx(1.5) for r in ok)
    assert all(1.1 < r.low <= r.ratio <= r.high for r in ok)  # the whole interval above the threshold
    assert len(c.regressions()) == len(ok)
    faster = compare(frame(make_records(scale=1.5)), frame(make_records()))
    assert {r.verdict for r in faster.rows if r.ratio} == {"faster"} and not faster.regressions()


def test_threshold_decides():
    base, new = frame(make_records()), frame(make_records(scale=1.08))
    assert not compare(base, new, threshold=0.10).regressions()  # 8% < 10%
    assert compare(base, new, threshold=0.01).regressions()  # 8% > 1%, the whole interval beyond it


def _case(times=None, rounds=None, probe=None, n=1024):
    """One dense sdpa case with these raw calls (one round) or these round medians."""
    r = dict(record("dense", "sdpa", n, 1.0), times_s=list(times or rounds))
    if rounds is not None:
        r.update(round_medians_s=list(rounds), rounds=len(rounds))
    if probe is not None:
        r["probe_s"] = probe
    return dict(r, time_median_s=statistics.median(r["times_s"]), time_min_s=min(r["times_s"]))


def test_noise_decides():
    """A 30% slower median with wildly overlapping samples is not a regression; tight rounds 1.5x
    apart are; the verdict rests on the interval of the ratio, not on a test of pooled calls."""
    base = frame([_case([1.0, 0.5, 2.0, 0.7, 1.6, 0.9, 1.4])])
    new = frame([_case([1.3, 0.6, 2.1, 0.8, 1.9, 1.2, 1.5])])
    (row,) = compare(base, new, metric="median").rows
    assert row.ratio == pytest.approx(1.3) and row.verdict == "same" and row.low < 1.1 < 1.3 < row.high
    (row,) = compare(
        frame([_case(rounds=[1.0, 1.01, 0.99])]), frame([_case(rounds=[1.5, 1.51, 1.49])]), metric="median"
    ).rows
    assert row.verdict == "slower" and row.low > 1.1
    (row,) = compare(
        frame([_case(rounds=[1.0, 1.01, 0.99])]), frame([_case(rounds=[0.7, 1.2, 1.6])]), metric="median"
    ).rows
    assert row.ratio == pytest.approx(1.2) and row.verdict == "same"  # 1.2x, but within the noise


def test_rounds_not_pooled_calls_are_the_samples():
    """Two rounds that disagree: 30 tight calls each would make a rank test over pooled calls
    certain; the rounds' medians show the spread that two runs of the same program have."""
    calls = [1.0 + 0.001 * i for i in range(10)] + [1.3 + 0.001 * i for i in range(10)]
    base = dict(_case(rounds=[1.0, 1.3]), times_s=calls)
    new = dict(_case(rounds=[1.3, 1.45]), times_s=[t * 1.15 for t in calls])
    (row,) = compare(frame([base]), frame([new]), metric="median").rows
    assert row.verdict == "same" and row.low < 1.1
    assert samples(base) == [1.0, 1.3]
    one_round = dict(record("dense", "sdpa", 1024, 1.0), times_s=[float(i) for i in range(1, 11)])
    assert samples(one_round) == [1.5, 3.5, 5.5, 7.5, 9.5]  # five blocks of two calls, their medians


def test_a_tight_case_gets_the_runs_typical_spread():
    """Three rounds cannot show a case's spread: a case that happened to be tight is judged with
    the run's typical spread weighing in, so its interval is not much narrower than its
    neighbours'; a case noisier than the rest keeps most of its own spread."""
    noisy = [_case(rounds=[1.0, 1.2, 0.85], n=n) for n in (256, 512, 2048, 4096)]
    tight = _case(rounds=[1.0, 1.0001, 0.9999])
    noise = Noise.of([*noisy, tight])
    assert noise.dof == 10
    sd, dof = noise.case_sd(samples(tight), samples(tight))
    assert dof == 8 + 4 and sd == pytest.approx(noise.sd * math.sqrt(8 / 12), rel=1e-3)
    wild = _case(rounds=[1.0, 2.0, 0.5])
    sd_wild, _ = noise.case_sd(samples(wild), samples(wild))
    assert sd_wild > 2 * noise.sd
    c = compare(frame([*noisy, tight]), frame([*noisy, dict(tight, round_medians_s=[1.3, 1.3001, 1.2999],
                                                             time_median_s=1.3)]), metric="median")  # fmt: skip
    row = next(r for r in c.rows if r.get("seq_len") == 1024)
    assert row.ratio == pytest.approx(1.3) and row.verdict == "same" and row.low < 1.1


def test_false_alarms_are_controlled_over_the_whole_comparison():
    """Simulated A/A pairs of 36 cases (3 rounds, 3% log-normal noise) with no threshold at all:
    with each interval at 1 - 5%/36 the chance of any false verdict in a pair is about 5%; at a
    per-case 95% it would be most pairs. And a 1.3x slowdown is found in nearly every case."""
    rng = random.Random(7)

    def run(scale=1.0):
        return [
            _case(rounds=[scale * math.exp(rng.gauss(0, 0.03)) for _ in range(3)], n=256 * (i + 1)) for i in range(36)
        ]

    def alarm(c) -> bool:  # a case, or the run as a whole, called slower or faster
        return c.shift_verdict != "same" or any(r.verdict != "same" for r in c.rows)

    pairs = 200
    alarms = sum(1 for _ in range(pairs) if alarm(compare(frame(run()), frame(run()), threshold=0)))
    assert alarms <= 0.08 * pairs  # expected about 5% (a median absolute deviation at 35 degrees of freedom: 11%)
    caught = [r.verdict == "slower" for _ in range(5) for r in compare(frame(run()), frame(run(1.3))).rows]
    assert sum(caught) >= 0.9 * len(caught)


def test_holm_holds_a_common_slowdown_to_less_than_the_strictest_level():
    """36 cases all 1.3x slower, their ratios scattered by 4%: at Bonferroni's 1 - 5%/36 for every
    case a quarter of the intervals would reach below 1.1; Holm's step-down judges the i-th most extreme at
    1 - 5%/(36 - i + 1), so once the clearest are found the rest are too. The family-wise control
    holds all the same (test_false_alarms_are_controlled_over_the_whole_comparison)."""
    from statistics import NormalDist

    from sparsebench.analysis.compare import family_level
    from sparsebench.analysis.noise import RatioError

    m = 36
    zs = [NormalDist().inv_cdf((i + 0.5) / m) for i in range(m)]
    base = [_case(rounds=[1.0, 1.0, 1.0], n=256 * (i + 1)) for i in range(m)]
    new = [_case(rounds=[1.3 * math.exp(0.04 * z)] * 3, n=256 * (i + 1)) for i, z in enumerate(zs)]
    c = compare(frame(base), frame(new))
    assert c.spread is not None and c.spread.sd == pytest.approx(0.04 * 1.4826 * NormalDist().inv_cdf(0.75), rel=0.1)
    slower = [r for r in c.rows if r.verdict == "slower"]
    strict = family_level(m + 1)  # the cases and their common shift
    bonferroni = [r for r in c.rows if RatioError(c.spread.sd, c.spread.dof).interval(r.ratio, strict).low > 1.1]
    assert len(bonferroni) <= 0.8 * m and len(slower) >= 0.9 * m
    # the common shift, the most extreme of all, took Holm's first step (1 - 5%/37), the clearest case the next
    assert strict == pytest.approx(1 - 0.05 / (m + 1)) and c.shift_verdict == "slower"
    assert max(r.level for r in c.rows) == pytest.approx(1 - 0.05 / m) and min(r.level for r in slower) < strict
    assert all(r.low > 1.1 for r in slower) and "Holm" in c.control


def test_a_slowdown_common_to_every_case_is_caught_as_a_run_where_no_case_can_be(tmp_path):
    """36 cases all 1.2x slower, their ratios scattered by 8%: a case that moved alone must move
    about 1.45x to be told from noise (none is called slower), but the median of 36 ratios is
    known to about 1.7%: the run as a whole is slower and fails the gate, in words and in the exit
    code. The same scatter around 1 (an A/A pair) reads same, and a probe that moved 1.5x in every
    case withholds it."""
    from statistics import NormalDist

    m = 36
    zs = [NormalDist().inv_cdf((i + 0.5) / m) for i in range(m)]

    def side(scale: float, probe: float = 0.010, sd: float = 0.08):
        return [_case(rounds=[scale * math.exp(sd * z)] * 3, probe=probe, n=256 * (i + 1)) for i, z in enumerate(zs)]

    base = side(1.0, sd=0.0)
    c = compare(frame(base), frame(side(1.2)))
    assert not any(r.verdict == "slower" for r in c.rows)  # no case on its own
    assert c.shift is not None and c.shift.ratio == pytest.approx(1.2, rel=0.01) and c.shift.cases == m
    assert c.shift_verdict == "slower" and c.shift_interval.low > 1.1 and c.gate_failed()
    assert "the run as a whole is slower" in c.failure_message() and "and their common shift" in c.control
    assert json.loads(to_json(c))["shift"]["verdict"] == "slower"
    (line,) = [ln for ln in fig_ratio(c).axes[0].get_lines() if ln.get_gid() == "shift:ratio"]  # drawn, and named
    assert line.get_ydata()[0] == pytest.approx(c.shift.ratio) and "the run as a whole: 1.20x" in line.get_label()
    assert "slower" in line.get_label()
    a, b = write_result(tmp_path / "a", base), write_result(tmp_path / "b", side(1.2))
    res = run(a, b, "--fail-on-regression")
    assert res.exit_code == 1 and "the run as a whole is slower" in " ".join(res.output.split())
    aa = compare(frame(base), frame(side(1.0)))
    assert aa.shift_verdict == "same" and not aa.gate_failed()
    moved = compare(frame(base), frame(side(1.2, probe=0.015)))
    assert moved.shift_verdict == "withheld" and moved.shift_probe == pytest.approx(1.5)
    assert not moved.gate_failed()


def _rounds_case(mins, probe=0.010, n=1024):
    """One dense sdpa case measured in rounds whose fastest calls were ``mins``."""
    return dict(_case(rounds=list(mins), probe=probe, n=n), round_mins_s=list(mins))


def test_the_gate_time_is_the_fastest_half_of_the_rounds():
    """Five rounds, one of them lucky (all its calls 30% faster, as a fresh worker on a shared
    machine sometimes runs): the fastest call over the rounds is that round; the gate's time, the
    geometric mean of the three fastest rounds, moves by a third as much. Two runs of the same
    program with rounds scattered by 3%, one run with the lucky round: "min" calls the case about
    1.4x slower, the default reads it within the noise."""
    from sparsebench.analysis.noise import fast_time

    lucky = _rounds_case([1.0, 1.02, 0.98, 1.01, 0.7])
    assert fast_time(lucky) == pytest.approx((0.7 * 0.98 * 1.0) ** (1 / 3))
    assert fast_time(_rounds_case([2.0, 1.0])) == pytest.approx(1.0)  # the fastest half of two rounds: one
    assert fast_time(_case([3.0, 1.0, 2.0])) == pytest.approx(2**0.5)  # one round: its fastest calls, two of three
    bare = {k: v for k, v in _case([3.0, 1.0, 2.0]).items() if k != "times_s"}  # a record without its calls
    assert fast_time(bare) is None and metric_time(bare, "fast") == pytest.approx(1.0)

    def run(seed, lucky_at=None):
        rng = random.Random(seed)
        out = []
        for i in range(36):
            mins = [math.exp(rng.gauss(0, 0.03)) for _ in range(5)]
            if i == lucky_at:
                mins[4] = 0.7
            out.append(_rounds_case(mins, n=256 * (i + 1)))
        return out

    # under MIN_CASES cases each is judged from its own rounds: the fastest half of five is as
    # uncertain as a mean of three of them, not of five
    (one,) = compare(frame([_rounds_case([1.0, 1.1, 0.9, 1.05, 0.95])]), frame([_rounds_case([1.0] * 5)])).rows
    sd, dof = Noise.of([_rounds_case([1.0, 1.1, 0.9, 1.05, 0.95]), _rounds_case([1.0] * 5)], "fast").case_sd(
        [1.0, 1.1, 0.9, 1.05, 0.95], [1.0] * 5
    )
    half = math.log(one.high / one.ratio)
    assert half == pytest.approx(math.log(one.ratio / one.low))
    from sparsebench.stats import t_quantile

    assert half == pytest.approx(t_quantile(1 - (1 - one.level) / 2, dof) * sd * math.sqrt(1 / 3 + 1 / 3))

    base, new = frame(run(5, lucky_at=3)), frame(run(6))
    by_min = next(r for r in compare(base, new, metric="min").rows if r.get("seq_len") == 1024)
    assert by_min.ratio > 1.3 and by_min.verdict == "slower"
    c = compare(base, new)
    assert c.metric == "fast" and not c.regressions() and c.shift_verdict == "same"


def test_ratios_are_adjusted_for_the_machines_speed(tmp_path):
    """A shared machine drifts: NEW ran on a machine 15% slower, its probe (a fixed matmul timed
    around every case) and every case with it. Adjusted (the default), every ratio is divided by
    the probes' ratio and the two runs read the same; --no-adjust judges the times as measured and
    calls the run slower. A real slowdown leaves the probe where it was and is caught either way.
    Under MIN_CASES cases the probes of a few moments are not the machine of a run: no adjustment."""
    m = 36

    def side(scale: float, probe: float):
        rng = random.Random(11)
        return [
            _rounds_case([scale * math.exp(rng.gauss(0, 0.01)) for _ in range(5)], probe=probe, n=256 * (i + 1))
            for i in range(m)
        ]

    base = side(1.0, 0.010)
    drift = side(1.15, 0.0115)
    c = compare(frame(base), frame(drift))
    assert c.machine == pytest.approx(1.15) and c.shift.ratio == pytest.approx(1.0, abs=0.01)
    assert not c.gate_failed() and "ran 1.150x as long in new" in c.machine_text
    assert "1.150x as long" in render(c, "markdown") and json.loads(to_json(c))["machine_ratio"] == pytest.approx(1.15)
    raw = compare(frame(base), frame(drift), adjust=False)
    assert raw.machine is None and raw.shift_verdict == "slower" and raw.gate_failed()
    slow = compare(frame(base), frame(side(1.3, 0.010)))
    assert slow.machine == pytest.approx(1.0) and slow.shift_verdict == "slower" and len(slow.regressions()) == m
    a, b = write_result(tmp_path / "a", base), write_result(tmp_path / "b", drift)
    assert run(a, b, "--fail-on-regression").exit_code == 0
    res = run(a, b, "--fail-on-regression", "--no-adjust")
    assert res.exit_code == 1 and "the run as a whole is slower" in " ".join(res.output.split())
    few = compare(frame(base[:5]), frame(drift[:5]))
    assert few.machine is None and "not adjusted" in few.machine_text


def test_the_spread_is_qn_with_the_degrees_of_freedom_of_its_efficiency():
    """Qn of 0, 1, ..., 9 by hand: h = 6, k = 15; the distances 1 (nine of them) and 2 (eight) put
    the 15th smallest at 2; times 2.2219 and 10 / 13.8. Three of ten values thrown far away do not
    move it beyond a factor of two (the standard deviation grows 20-fold). 36 cases: 29 degrees
    of freedom (0.82 of 35)."""
    from sparsebench.analysis.noise import Spread, qn_scale

    vals = [float(i) for i in range(10)]
    assert qn_scale(vals) == pytest.approx(2.2219 * 2 * 10 / 13.8)
    wild = vals[:7] + [100.0, 200.0, 300.0]
    assert qn_scale(wild) < 2 * qn_scale(vals) and statistics.stdev(wild) > 20 * statistics.stdev(vals)
    assert qn_scale(wild) == pytest.approx(2.2219 * 3 * 10 / 13.8)  # the clean seven's 15th distance: 3
    s = Spread.of([math.exp(0.01 * i) for i in range(36)])
    assert s.dof == 29 and s.cases == 36


def test_own_errors_by_hand():
    """Case A: the base's fastest half of six rounds' fastest calls has logs 0, 0.1, 0.2
    (variance 0.01, three averaged: 2 degrees of freedom), the new's of four rounds 0, 0
    (variance 0, two: 1); case B: logs 0, 0.2, 0.4 in both (0.04, three). The typical variance is
    the median of 0.01, 0, 0.04, 0.04: 0.025, weighing PRIOR_DOF = 8. A: (8 * 0.025 + 2 * 0.01 +
    1 * 0) / 11 = 0.02, times 1/3 + 1/2: sqrt(0.016667) = 0.1291 at 11 degrees of freedom. B:
    (8 * 0.025 + 2 * 2 * 0.04) / 12 = 0.03, times 2/3: sqrt(0.02) = 0.1414 at 12. A case with one
    round has no variance of its own: the typical one (beside A alone, the median of 0.01 and 0:
    0.005), 8 degrees of freedom, times 1 + 1."""
    from sparsebench.analysis.noise import PRIOR_DOF, fast_log_var, own_errors

    e = math.exp

    def rec(mins):
        return dict(_case(rounds=mins), round_mins_s=mins)

    a_base, a_new = rec([1.0, e(0.1), e(0.2), e(0.3), 5.0, 6.0]), rec([1.0, 1.0, 2.0, 3.0])
    b = rec([1.0, e(0.2), e(0.4), 9.0, 9.0])
    assert PRIOR_DOF == 8
    assert fast_log_var(a_base) == (pytest.approx(0.01), 3) and fast_log_var(b) == (pytest.approx(0.04), 3)
    own = own_errors({"A": (a_base, a_new), "B": (b, b)})
    assert own["A"] == (pytest.approx(0.1291, abs=1e-4), 11) and own["B"] == (pytest.approx(0.1414, abs=1e-4), 12)
    lone = dict(_case(times=[1.0]), round_mins_s=[1.0])
    assert fast_log_var(lone) is None
    assert own_errors({"A": (a_base, a_new), "L": (lone, lone)})["L"] == (pytest.approx(0.1), 8)


def test_a_noisy_case_is_judged_by_its_own_noise_and_a_quiet_one_by_its_own():
    """36 cases of twenty rounds, 8 of them five times as noisy round to round (10% against 2%,
    as strided block_sparse against dense SDPA on a shared CPU). One spread for all judges the
    noisy cases too narrowly and the quiet ones too widely; each case's own error, scaled by the
    comparison, does neither: simulated A/A pairs at threshold 0 raise an alarm in about 5% of
    pairs (Holm's level), the noisy cases' intervals are about five times as wide, and a 1.3x
    slowdown of the quiet cases alone is found in nearly all of them."""
    rng = random.Random(11)
    m, noisy = 36, set(range(0, 36, 4)) - {32}  # 8 noisy cases

    def run(scale=1.0, scaled=()):
        out = []
        for i in range(m):
            sd = 0.10 if i in noisy else 0.02
            f = scale if i in scaled else 1.0
            mins = [f * math.exp(rng.gauss(0, sd)) for _ in range(20)]
            out.append(dict(_case(rounds=mins, n=256 * (i + 1)), round_mins_s=mins))
        return out

    pairs, alarms = 100, 0
    for _ in range(pairs):
        c = compare(frame(run()), frame(run()), threshold=0)
        alarms += c.shift_verdict != "same" or any(r.verdict != "same" for r in c.rows)
    assert alarms <= 0.08 * pairs
    assert c.spread.factor is not None and "each case's own" in c.noise_text
    width = {i: math.log(r.high / r.low) for i, r in enumerate(sorted(c.rows, key=lambda r: r.get("seq_len")))}
    loud = statistics.median(width[i] for i in noisy)
    calm = statistics.median(w for i, w in width.items() if i not in noisy)
    assert 3 < loud / calm < 8
    quiet = [i for i in range(m) if i not in noisy]
    caught = 0
    for _ in range(5):
        rows = sorted(compare(frame(run()), frame(run(1.3, quiet))).rows, key=lambda r: r.get("seq_len"))
        caught += sum(rows[i].verdict == "slower" for i in quiet)
        assert not any(rows[i].verdict == "slower" for i in noisy)
    assert caught >= 0.9 * 5 * len(quiet)


def test_a_comparison_too_noisy_for_its_threshold_says_so():
    """The cases' ratios scatter by 2% in one pair and 8% in another: the second cannot tell a
    case that moved alone by less than about 1.4x from noise, and warns; the first does not."""
    from statistics import NormalDist

    m = 36
    zs = [NormalDist().inv_cdf((i + 0.5) / m) for i in range(m)]
    base = [_case(rounds=[1.0, 1.0, 1.0], n=256 * (i + 1)) for i in range(m)]
    for sd, noisy in ((0.02, False), (0.08, True)):
        new = [_case(rounds=[math.exp(sd * z)] * 3, n=256 * (i + 1)) for i, z in enumerate(zs)]
        c = compare(frame(base), frame(new))
        assert (c.resolvable > 1.3) is noisy and any("noisy comparison" in w for w in c.warnings) is noisy
        assert f"told from noise from about {c.resolvable:.2f}x" in c.noise_text


def test_a_moving_machine_withholds_the_verdict(tmp_path):
    base = [_case(rounds=[1.0, 1.01, 0.99], probe=0.010, n=n) for n in (512, 1024)]
    new = [_case(rounds=[1.5, 1.51, 1.49], probe=0.010 * (1.5 if n == 512 else 1.02), n=n) for n in (512, 1024)]
    c = compare(frame(base), frame(new))
    by_n = {r.get("seq_len"): r for r in c.rows}
    assert by_n[512].verdict == "withheld" and by_n[512].probe_ratio == pytest.approx(1.5)
    assert by_n[1024].verdict == "slower"
    assert any("machine unstable: verdict withheld for 1 case(s)" in w for w in c.warnings)
    a, b = write_result(tmp_path / "a", base), write_result(tmp_path / "b", new)
    res = run(a, b, "--fail-on-regression")
    assert (
        res.exit_code == 1 and "1 case(s) regressed" in res.output and "withheld" not in res.output.split("error")[-1]
    )
    new_ok = [
        dict(r, time_median_s=1.0, time_min_s=0.99, round_medians_s=[1.0, 1.01, 0.99], times_s=[1.0, 1.01, 0.99])
        if r["seq_len"] == 1024
        else r
        for r in new
    ]
    b2 = write_result(tmp_path / "b2", new_ok)
    assert run(a, b2, "--fail-on-regression").exit_code == 0  # withheld alone does not fail the gate
    res = run(a, b2, "--fail-on-regression", "--fail-on-unstable")
    assert res.exit_code == 1 and "machine unstable" in res.output


def test_metric_min():
    c = compare(frame(make_records()), frame(make_records(scale=1.5)), metric="min")
    r = next(r for r in c.rows if r.get("backend") == "sdpa" and r.get("seq_len") == 256)
    assert c.metric == "min" and r.base == pytest.approx(min(make_records()[0]["times_s"]))
    assert r.base < r.new and r.verdict == "slower"
    with pytest.raises(ScenarioError, match="expected one of: fast, min, median"):
        compare(frame(make_records()), frame(make_records()), metric="mean")


def test_new_failure_is_a_regression():
    base = [record("dense", "sdpa", 1024, 0.01)]
    new = [record("dense", "sdpa", 1024, None, status="oom")]
    (row,) = compare(frame(base), frame(new)).rows
    assert row.verdict == "now failing" and row.is_regression
    (row,) = compare(frame(new), frame(base)).rows
    assert row.verdict == "now ok" and not row.is_regression


def test_renderers():
    c = compare(frame(make_records()), frame(make_records(scale=1.5)), base_name="A", new_name="B")
    md = to_markdown(c)
    assert md.startswith("### sparsebench compare: B vs A") and "| case |" in md and "**slower**" in md
    data = json.loads(to_json(c))
    assert data["regressions"] == len(c.regressions()) and data["cases"][0]["verdict"]
    rows = list(csv.DictReader(io.StringIO(to_csv(c))))
    assert len(rows) == len(c.rows) and {"ratio", "verdict", "seq_len"} <= set(rows[0])
    text = render(c, "table")
    assert "slower" in text and "1.50x" in text


def test_ratio_plot():
    c = compare(frame(make_records()), frame(make_records(scale=1.5)))
    fig = fig_ratio(c)
    lines = {
        ln.get_gid().split(":", 1)[1]: ln for ln in fig.axes[0].get_lines() if (ln.get_gid() or "").startswith("ratio:")
    }
    assert f"{SW} · block_sparse" in lines and "dense · sdpa" in lines
    assert all(y == pytest.approx(1.5) for y in lines["dense · sdpa"].get_ydata())
    assert (
        fig_ratio(
            compare(
                frame([record("dense", "sdpa", 256, None, status="oom")]),
                frame([record("dense", "sdpa", 256, None, status="oom")]),
            )
        )
        is None
    )


def test_compare_by_backend():
    by = compare_by(frame(make_records()), by="backend")
    assert by.values[:2] == ("dense · sdpa", "sdpa")
    assert {"block_sparse", "flex", "sdpa_masked", "naive"} <= set(by.values)
    assert "seq_len" in by.dims and "backend" not in by.dims
    md = to_markdown(by)
    assert "| pattern | n | dense · sdpa | sdpa |" in md and "(best)" in md
    flex_row = next(cells for key, cells in by.rows if key[0] == SW and key[-1] == 8192)
    assert dict((v, t) for v, t, _ in flex_row)["flex"] == pytest.approx(1e-5 + 8e-7 * 8192, rel=0.05)
    assert json.loads(to_json(by))["by"] == "backend"
    with pytest.raises(ScenarioError, match="expected one of"):
        compare_by(frame(make_records()), by="colour")
    with pytest.raises(ResultsError, match="only one"):
        compare_by(frame(make_records()), by="device")


# -- the command ----------------------------------------------------------------------------


def test_cli_identical_passes(folders):
    res = run(folders["base"], folders["same"], "--fail-on-regression")
    assert res.exit_code == 0, res.output
    assert "same" in res.stdout and "error" not in res.stderr
    assert "same folder" not in res.stderr
    # one folder twice: compared, with a warning that nothing can differ
    twice = run(folders["base"], folders["base"])
    assert twice.exit_code == 0 and "BASE and NEW are the same folder" in twice.stderr


def test_cli_fifty_percent_slower_fails(folders):
    res = run(folders["base"], folders["slow"], "--fail-on-regression", "--threshold", "10%")
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "regressed beyond 10%" in err[0]
    # without the flag the comparison is reported but the exit code stays 0
    assert run(folders["base"], folders["slow"]).exit_code == 0
    # a threshold above the slowdown passes
    assert run(folders["base"], folders["slow"], "--fail-on-regression", "--threshold", "60%").exit_code == 0


def test_cli_lists_one_sided_cases(folders):
    res = run(folders["base"], folders["partial"], "--format", "markdown", "--fail-on-regression", "--allow-missing")
    assert res.exit_code == 0, res.output
    assert "**Only in base** (6):" in res.stdout
    assert f"- {SW} · flex, n=256" in res.stdout
    assert "**Only in partial** (1):" in res.stdout and "dense · sdpa, n=16384" in res.stdout


@pytest.mark.parametrize(
    "new,needle",
    [
        ("partial", f"6 case(s) of base not measured in partial (first: {SW} · flex, n=256"),
        ("skips", "not measured in skips"),
        ("other", "no case of base is in other: nothing was compared"),
        ("allskipped", "no case was measured in both base and allskipped: nothing was compared"),
    ],
)
def test_cli_gate_fails_when_new_did_not_measure_what_base_did(folders, new, needle):
    """An interrupted, partial or skipped run must not pass --fail-on-regression by measuring less."""
    res = run(folders["base"], folders[new], "--fail-on-regression")
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], res.stderr
    # reported, not gated, without the flag
    assert run(folders["base"], folders[new]).exit_code == 0
    # --allow-missing accepts the missing cases, but not an empty comparison
    allowed = run(folders["base"], folders[new], "--fail-on-regression", "--allow-missing")
    assert allowed.exit_code == (1 if new in ("other", "allskipped") else 0), allowed.output
    # markdown (a PR comment) and JSON say what the exit code says
    md = run(folders["base"], folders[new], "--format", "markdown").stdout
    assert "✅" not in md and f"not measured in {new}" in md, md
    data = json.loads(run(folders["base"], folders[new], "--format", "json").stdout)
    assert data["missing"] and data["missing"][0]["backend"]


def test_a_case_base_did_not_measure_is_not_missing():
    """Only cases BASE measured can be missing from NEW: an oom in BASE alone is no gap in NEW."""
    base = make_records() + [record("dense", "naive", 99999, None, status="oom")]
    c = compare(frame(base), frame(make_records()))
    assert not c.missing() and not c.gate_failed()
    assert c.only_base and "99999" in str(c.only_base[0])


def test_cli_warns_when_environments_differ(folders):
    res = run(folders["base"], folders["env"], "--format", "json")
    assert res.exit_code == 0
    assert (
        "environments differ" in res.stderr
        and "threads 16 vs 8" in res.stderr
        and "torch 2.13.0 vs 2.12.0" in res.stderr
    )
    assert json.loads(res.stdout)["warnings"]
    table = run(folders["base"], folders["env"])
    assert "environments differ" in table.stdout


def test_cli_formats_output_and_plot(folders, tmp_path):
    out, png = tmp_path / "cmp.csv", tmp_path / "ratio.png"
    res = run(folders["base"], folders["slow"], "--format", "csv", "--output", out, "--plot", png, "--metric", "min")
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("pattern_label,backend,")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_by(folders):
    res = run(folders["base"], "--by", "backend", "--format", "markdown")
    assert res.exit_code == 0, res.output
    assert "| pattern | n | dense · sdpa | sdpa | block_sparse | flex | naive | sdpa_masked |" in res.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["{base}", "{same}", "--threshold", "lots"], "--threshold"),
        (["{base}", "{same}", "--format", "xml"], "expected one of: table, markdown, json, csv"),
        (["{base}", "{same}", "--metric", "mean"], "expected one of: fast, min, median"),
        (["{base}", "{same}", "--by", "backend"], "not both"),
        (["{base}"], "needs NEW"),
        (["{base}", "--by", "colour"], "expected one of"),
        (["{base}", "{missing}"], "no such result folder"),
        (["{base}", "{same}", "--plot", "{tmp}/r.gif"], "must end in"),
    ],
)
def test_cli_errors_are_one_line(folders, tmp_path, args, needle):
    names = {k: str(v) for k, v in folders.items()} | {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path)}
    res = run(*[a.format(**names) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_fewer_rounds_in_new_is_warned():
    """A multi-round run interrupted after its first round has every case, in fewer rounds."""
    base = [dict(r, rounds=3) for r in make_records()]
    c = compare(frame(base), frame([dict(r, rounds=1) for r in make_records()]))
    assert any("measured in fewer rounds in new than in base" in w for w in c.warnings)
    assert not any("fewer rounds" in w for w in compare(frame(base), frame(base)).warnings)
