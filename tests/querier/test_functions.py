"""PromQL function tests with hand-computed expectations (the comment of each case shows the math)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from querier.annotations import go_float, openmetrics_float
from querier.engine import Engine
from querier.errors import ExecutionError
from querier.functions import natural_less
from querier.histograms import parse_upper_bound
from store.labels import Labels
from tests.querier.fakequerier import FakeQuerier

S = 1000


def L(**kw: str) -> Labels:
    return Labels.from_dict({("__name__" if k == "name" else k): v for k, v in kw.items()})


def instant(q, expr, t_ms):
    res = Engine().instant(q, expr, t_ms)
    assert res.result_type in ("vector", "scalar"), res.result_type
    if res.result_type == "scalar":
        return res.data[1]
    return {s.labels: s.value for s in res.data}


def one(q, expr, t_ms):
    got = instant(q, expr, t_ms)
    assert len(got) == 1, got
    return next(iter(got.values()))


def range_values(q, expr, start, end, step):
    """The values of a range query with exactly one series."""
    res = Engine().range(q, expr, start, end, step)
    assert len(res.data) == 1, res.data
    return res.data[0].values.tolist()


def series(*values: float, name: str = "m", step_s: int = 10) -> FakeQuerier:
    q = FakeQuerier()
    q.add(L(name=name), [i * step_s * S for i in range(len(values))], list(values))
    return q


# ---- Kahan-summed folds ----------------------------------------------------------------------

def test_sum_and_avg_over_time_keep_small_terms_next_to_huge_ones():
    # 1 + 1e100 + 1 - 1e100: a plain float sum loses both ones (0); the compensated sum is exact (2).
    q = series(1, 1e100, 1, -1e100)
    assert one(q, "sum_over_time(m[1m])", 30 * S) == 2
    assert one(q, "avg_over_time(m[1m])", 30 * S) == 0.5


@pytest.mark.parametrize("steps", [1, 40], ids=["few-long-windows", "many-windows"])
def test_sum_over_time_is_correctly_rounded(steps):
    # 0.1 + 0.2 + 0.3 in doubles is 0.6000000000000000055...; the nearest double is 0.6
    # (a left-to-right float sum gives 0.6000000000000001). Both evaluation strategies agree.
    q = series(0.1, 0.2, 0.3)
    start = 20 * S
    vals = range_values(q, "sum_over_time(m[1m])", start, start + (steps - 1) * 100, 100)
    assert vals == [0.6] * steps


def test_avg_over_time_switches_to_a_running_mean_on_overflow():
    # 1e308 + 1e308 overflows; Prometheus continues with mean 1e308 * 1/2 + 1e308 / 2 = 1e308.
    q = series(1e308, 1e308)
    assert one(q, "avg_over_time(m[1m])", 10 * S) == 1e308
    assert one(q, "sum_over_time(m[1m])", 10 * S) == math.inf


@pytest.mark.parametrize("steps", [1, 40], ids=["few-long-windows", "many-windows"])
def test_variance_of_a_constant_is_exactly_zero(steps):
    # Welford: the first delta makes the mean the constant, every later delta is 0.
    q = series(1.5990505637277868, 1.5990505637277868, 1.5990505637277868)
    start = 20 * S
    assert range_values(q, "stdvar_over_time(m[1m])", start, start + (steps - 1) * 100, 100) == [0.0] * steps
    assert range_values(q, "stddev_over_time(m[1m])", start, start + (steps - 1) * 100, 100) == [0.0] * steps


@pytest.mark.parametrize("steps", [1, 40], ids=["few-long-windows", "many-windows"])
def test_variance_values(steps):
    # 2, 4, 4, 4, 5, 5, 7, 9: mean 5, squared deviations 9 1 1 1 0 0 4 16 = 32, / 8 = 4.
    q = series(2, 4, 4, 4, 5, 5, 7, 9)
    start = 70 * S
    assert range_values(q, "stdvar_over_time(m[2m])", start, start + (steps - 1) * 100, 100) == [4.0] * steps
    assert one(q, "stddev_over_time(m[2m])", start) == 2.0


def test_mad_over_time_is_nan_with_a_nan_sample():
    # Median of 1 2 NaN 4 is undefined; Prometheus returns NaN rather than skipping the NaN.
    assert math.isnan(one(series(1, 2, math.nan, 4), "mad_over_time(m[1m])", 30 * S))
    # 1 2 3 4 5: median 3, deviations 2 1 0 1 2, their median 1.
    assert one(series(1, 2, 3, 4, 5), "mad_over_time(m[1m])", 40 * S) == 1


# ---- timestamps of samples -------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 40], ids=["few-long-windows", "many-windows"])
def test_ts_of_min_and_max_take_the_latest_of_equal_extremes(steps):
    # Samples at 0 10 20 30 40 s: 3 NaN 1 3 1. Max 3 last at 30 s, min 1 last at 40 s.
    q = series(3, math.nan, 1, 3, 1)
    start = 40 * S
    end = start + (steps - 1) * 100
    assert range_values(q, "ts_of_max_over_time(m[1m])", start, end, 100) == [30.0] * steps
    assert range_values(q, "ts_of_min_over_time(m[1m])", start, end, 100) == [40.0] * steps


def test_ts_of_extremes_of_only_nans_is_the_last_sample():
    q = series(math.nan, math.nan)
    assert one(q, "ts_of_max_over_time(m[1m])", 10 * S) == 10


def test_ts_of_first_and_last_over_time():
    # Window (10 s, 70 s] of samples every 10 s from 0 to 40 s: first at 20 s, last at 40 s.
    q = series(1, 2, 3, 4, 5)
    assert one(q, "ts_of_first_over_time(m[1m])", 70 * S) == 20
    assert one(q, "ts_of_last_over_time(m[1m])", 70 * S) == 40


# ---- double_exponential_smoothing ------------------------------------------------------------

def test_double_exponential_smoothing():
    # 0 10 40, sf = tf = 0.5. s = 0, trend 10 (10 - 0).
    # Sample 10: s = 0.5*10 + 0.5*(0 + 10) = 10.
    # Sample 40: trend = 0.5*(10 - 0) + 0.5*10 = 10; s = 0.5*40 + 0.5*(10 + 10) = 30.
    q = series(0, 10, 40)
    assert one(q, "double_exponential_smoothing(m[1m], 0.5, 0.5)", 20 * S) == 30
    assert instant(series(5), "double_exponential_smoothing(m[1m], 0.5, 0.5)", 0) == {}  # needs two samples


def test_double_exponential_smoothing_rejects_factors_outside_0_1():
    with pytest.raises(ExecutionError, match=r"invalid smoothing factor. Expected: 0 < sf < 1, got: 1.000000"):
        instant(series(0, 10), "double_exponential_smoothing(m[1m], 1, 0.5)", 10 * S)
    with pytest.raises(ExecutionError, match=r"invalid trend factor. Expected: 0 < tf < 1, got: 0.000000"):
        instant(series(0, 10), "double_exponential_smoothing(m[1m], 0.5, 0)", 10 * S)


# ---- classic histograms ----------------------------------------------------------------------

@pytest.fixture
def hist():
    q = FakeQuerier()
    # Cumulative counts at 0 and 60 s: le=1 -> 1, le=2 -> 3, le=+Inf -> 4. le="2" has no sample at 60 s.
    q.add(L(name="h_bucket", le="1"), [0, 60 * S], [1, 1])
    q.add(L(name="h_bucket", le="2"), [0], [3])
    q.add(L(name="h_bucket", le="+Inf"), [0, 60 * S], [4, 4])
    return q


def test_histogram_quantile_interpolates_and_uses_the_buckets_present_at_each_step(hist):
    # t=0: rank 0.5*4 = 2 falls in (1, 2] holding 3-1 = 2; 1 + (2-1) * (2-1)/2 = 1.5.
    # t=60s without le=2: rank 2 is above le=1 (1), so it falls in the +Inf bucket; the answer
    # is the highest finite bound, 1.
    res = Engine(lookback_delta_ms=30 * S).range(hist, "histogram_quantile(0.5, h_bucket)", 0, 60 * S, 60 * S)
    assert [(s.labels, s.values.tolist()) for s in res.data] == [(Labels(), [1.5, 1.0])]


def test_histogram_quantile_warns_about_invalid_quantiles(hist):
    res = Engine().instant(hist, "histogram_quantile(1.5, h_bucket)", 0)
    assert [s.value for s in res.data] == [math.inf]
    assert res.warnings == ["PromQL warning: quantile value should be between 0 and 1, got 1.5"]


def test_histogram_quantiles_labels_each_quantile(hist):
    # q=0.5 as above (1.5); q=1: rank 4 is reached only by +Inf, so the highest finite bound, 2.
    got = instant(hist, 'histogram_quantiles(h_bucket, "q", 0.5, 1)', 0)
    assert got == {L(q="0.5"): 1.5, L(q="1.0"): 2.0}


def test_histogram_fraction(hist):
    # [0, 1.5]: all of (0, 1] (1 observation) and half of (1, 2] (2 observations) -> 2 of 4.
    assert one(hist, "histogram_fraction(0, 1.5, h_bucket)", 0) == 0.5
    # The +Inf bucket (1 observation above 2) counts when wholly inside the range, and not at
    # all when only partly: [2, +Inf] -> 1 of 4, [2, 5] -> 0 of 4.
    assert one(hist, "histogram_fraction(2, +Inf, h_bucket)", 0) == 0.25
    assert one(hist, "histogram_fraction(2, 5, h_bucket)", 0) == 0.0


def test_histogram_quantile_fixes_decreasing_buckets_and_says_so():
    q = FakeQuerier()
    # le=1 -> 2, le=2 -> 1 (decrease, taken as 2), le=+Inf -> 4. rank 2 is reached at le=1:
    # (0, 1] holds 2, so 0 + 1 * 2/2 = 1.
    q.add(L(name="h_bucket", le="1"), [0], [2])
    q.add(L(name="h_bucket", le="2"), [0], [1])
    q.add(L(name="h_bucket", le="+Inf"), [0], [4])
    res = Engine().instant(q, "histogram_quantile(0.5, h_bucket)", 0)
    assert [s.value for s in res.data] == [1.0]
    assert res.infos == ["PromQL info: input to histogram_quantile needed to be fixed for monotonicity (see "
                         "https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile) "
                         'for metric name "h_bucket"']


def test_histogram_functions_warn_about_a_bad_le_label():
    q = FakeQuerier()
    q.add(L(name="h", le="Hello World"), [0], [2])
    res = Engine().instant(q, "histogram_quantile(0.5, h)", 0)
    assert res.data == []
    assert res.warnings == ['PromQL warning: bucket label "le" is missing or has a malformed value of '
                            '"Hello World" for metric name "h"']


@pytest.mark.parametrize("le,want", [
    ("+Inf", math.inf), ("Inf", math.inf), ("-inf", -math.inf), ("1e3", 1000.0), (".5", 0.5),
    ("0x1p-2", 0.25), (" 1", None), ("1_0", None), ("", None), ("abc", None),
], ids=["plus-inf", "inf", "minus-inf", "exponent", "leading-dot", "hex", "space", "underscore", "empty", "text"])
def test_parse_upper_bound_follows_go_parse_float(le, want):
    assert parse_upper_bound(le) == want


# ---- other functions -------------------------------------------------------------------------

def test_rate_of_a_name_without_counter_suffix_adds_an_info():
    q = FakeQuerier()
    q.add(L(name="requests", job="a"), [0, 10 * S], [0, 10])
    q.add(L(name="requests_total", job="b"), [0, 10 * S], [0, 10])
    res = Engine().instant(q, "rate({__name__=~'requests.*'}[1m])", 10 * S)
    assert res.infos == ['PromQL info: metric might not be a counter, name does not end in '
                         '_total/_sum/_count/_bucket: "requests"']


def test_quantile_over_time_warns_about_invalid_quantiles():
    res = Engine().instant(series(1, 2), "quantile_over_time(-1, m[1m])", 10 * S)
    assert [s.value for s in res.data] == [-math.inf]
    assert res.warnings == ["PromQL warning: quantile value should be between 0 and 1, got -1"]


def test_min_of_and_max_of():
    q = FakeQuerier()
    assert instant(q, "min_of(3, 5)", 0) == 3
    assert instant(q, "max_of(-2, -5)", 0) == -2
    assert math.isnan(instant(q, "max_of(NaN, 3)", 0))


def test_query_context_functions():
    # Range query 10 s .. 40 s every 10 s: start 10, end 40, range 30, step 10.
    q = FakeQuerier()
    assert range_values(q, "start()", 10 * S, 40 * S, 10 * S) == [10.0] * 4
    assert range_values(q, "end()", 10 * S, 40 * S, 10 * S) == [40.0] * 4
    assert range_values(q, "range()", 10 * S, 40 * S, 10 * S) == [30.0] * 4
    assert range_values(q, "step()", 10 * S, 40 * S, 10 * S) == [10.0] * 4
    # An instant query has no range and no step.
    assert instant(q, "step()", 100 * S) == 0
    assert instant(q, "range()", 100 * S) == 0
    assert instant(q, "end()", 100 * S) == 100


@pytest.mark.parametrize("a,b,want", [
    ("2", "10", True), ("10", "2", False), ("4m5", "4m600", True), ("4m600", "4m1000", True),
    ("1.2.3", "1.11.3", True), ("a", "b", True), ("ab", "abc", True), ("abc", "ab", False), ("x", "x", False),
], ids=["numbers", "numbers-reversed", "mixed", "mixed-longer", "versions", "letters", "prefix", "longer", "equal"])
def test_natural_less(a, b, want):
    assert natural_less(a, b) is want


def test_sort_by_label_is_natural():
    q = FakeQuerier()
    for cpu in ("10", "2", "1"):
        q.add(L(name="c", cpu=cpu), [0], [1])
    res = Engine().instant(q, 'sort_by_label(c, "cpu")', 0)
    assert [s.labels.get("cpu") for s in res.data] == ["1", "2", "10"]


@pytest.mark.parametrize("x,want", [
    (1e6, "1e+06"), (123456.0, "123456"), (1234567.0, "1.234567e+06"), (0.0001, "0.0001"),
    (1e-05, "1e-05"), (-0.1, "-0.1"), (math.nan, "NaN"), (-math.inf, "-Inf"), (2.0, "2"),
], ids=["million", "six-digits", "seven-digits", "small", "smaller", "negative", "nan", "minus-inf", "integer"])
def test_go_float(x, want):
    assert go_float(x) == want


@pytest.mark.parametrize("x,want", [
    (0.0, "0.0"), (1.0, "1.0"), (100.0, "100.0"), (0.25, "0.25"), (1e6, "1e+06"), (math.inf, "+Inf"),
], ids=["zero", "one", "hundred", "fraction", "exponent", "inf"])
def test_openmetrics_float(x, want):
    assert openmetrics_float(x) == want


def test_deep_and_wide_scans_agree_on_random_data():
    # The two evaluation strategies (per window, and all windows per sample position) must give
    # bit-identical sums: both are kahansum.Inc folded left to right.
    rng = np.random.default_rng(7)
    vals = (rng.random(300) - 0.5) * 10.0 ** rng.integers(-5, 5, 300)
    q = series(*vals.tolist(), step_s=1)
    t = 299 * S
    deep = one(q, "sum_over_time(m[5m])", t)
    wide = range_values(q, "sum_over_time(m[5m])", t, t + 999, 1)
    assert wide == [deep] * 1000


@pytest.mark.parametrize("a,b", [("a0b", "a1b"), ("api-0:8080", "api-4:8080"), ("x0", "x00a"), ("v2", "v10"),
                                 ("a", "a0"), ("b-007", "b-8")])
def test_natural_order(a, b):
    from querier.functions import natural_less

    assert natural_less(a, b) and not natural_less(b, a)
