"""Engine tests with hand-computed expectations (see the comment of each case for the math)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from querier.engine import Engine, parse
from querier.errors import ExecutionError, ParseError, QueryTimeout, TooManySamples
from store.labels import Labels
from tests.querier.fakequerier import FakeQuerier

STALE = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
S = 1000


def L(**kw: str) -> Labels:
    return Labels.from_dict({("__name__" if k == "name" else k): v for k, v in kw.items()})


def instant(q, expr, t_ms, **engine_kw):
    res = Engine(**engine_kw).instant(q, expr, t_ms)
    assert res.result_type == "vector", res.result_type
    return {s.labels: s.value for s in res.data}


def one(q, expr, t_ms):
    got = instant(q, expr, t_ms)
    assert len(got) == 1, got
    return next(iter(got.values()))


@pytest.fixture
def counter():
    q = FakeQuerier()
    # A counter with a reset between 30 s and 45 s.
    q.add(L(name="c"), [0, 15 * S, 30 * S, 45 * S, 60 * S], [0, 10, 20, 5, 15])
    return q


def test_rate_counter_reset_and_left_open_window(counter):
    # Window (0, 60s] holds 15..60 s: 10 20 5 15. Increase 5 + reset correction 20 = 25.
    # First sample 15 s after the window start: under 1.1 x 15 s, so extrapolate fully (15 s);
    # zero point 45 * 10/25 = 18 s is farther, no clipping. Factor (45 + 15 + 0) / 45.
    assert one(counter, "increase(c[1m])", 60 * S) == pytest.approx(25 * 60 / 45)
    assert one(counter, "rate(c[1m])", 60 * S) == pytest.approx(25 * 60 / 45 / 60)
    assert one(counter, "resets(c[1m])", 60 * S) == 1
    assert one(counter, "count_over_time(c[1m])", 60 * S) == 4  # t=0 is outside (left-open)


def test_extrapolation_limited_to_half_interval():
    q = FakeQuerier()
    q.add(L(name="c"), [30 * S, 40 * S, 50 * S], [1, 2, 3])
    # Sampled 20 s, average 10 s, threshold 11 s. Start gap 30 s -> 5 s; zero point 20*1/2 = 10 s
    # (farther than 5 s). End gap 10 s < 11 s -> 10 s. Factor (20+5+10)/20 on an increase of 2.
    assert one(q, "increase(c[1m])", 60 * S) == pytest.approx(3.5)
    assert one(q, "delta(c[1m])", 60 * S) == pytest.approx(3.5)


def test_counter_not_extrapolated_below_zero():
    q = FakeQuerier()
    q.add(L(name="c"), [10 * S, 20 * S, 30 * S], [1, 11, 21])
    # Window (0, 30s]: start gap 10 s, zero point 20 * 1/20 = 1 s -> 1 s. Factor (20+1+0)/20.
    assert one(q, "increase(c[30s])", 30 * S) == pytest.approx(21)
    # delta() is not a counter function: it extrapolates the full 10 s.
    assert one(q, "delta(c[30s])", 30 * S) == pytest.approx(30)


def test_irate_idelta_and_single_sample(counter):
    # Last two samples 5 -> 15 over 15 s.
    assert one(counter, "irate(c[1m])", 60 * S) == pytest.approx(10 / 15)
    assert one(counter, "idelta(c[1m])", 60 * S) == 10
    # At 45 s the last two are 20 -> 5: a reset, irate takes the last value.
    assert one(counter, "irate(c[1m])", 45 * S) == pytest.approx(5 / 15)
    assert instant(counter, "rate(c[10s])", 60 * S) == {}  # one sample is not enough


def test_over_time_functions(counter):
    t = 60 * S  # window 10 20 5 15
    assert one(counter, "sum_over_time(c[1m])", t) == 50
    assert one(counter, "avg_over_time(c[1m])", t) == 12.5
    assert one(counter, "min_over_time(c[1m])", t) == 5
    assert one(counter, "max_over_time(c[1m])", t) == 20
    assert one(counter, "last_over_time(c[1m])", t) == 15
    assert one(counter, "present_over_time(c[1m])", t) == 1
    assert one(counter, "changes(c[1m])", t) == 3
    assert one(counter, "stdvar_over_time(c[1m])", t) == pytest.approx(((2.5**2) + 7.5**2 + 7.5**2 + 2.5**2) / 4)
    assert one(counter, "stddev_over_time(c[1m])", t) == pytest.approx(math.sqrt(31.25))
    # Sorted 5 10 15 20: rank 0.5*3 = 1.5 -> 10 + 0.5*(15-10).
    assert one(counter, "quantile_over_time(0.5, c[1m])", t) == 12.5
    assert list(instant(counter, "last_over_time(c[1m])", t)) == [L(name="c")]  # keeps the name
    assert list(instant(counter, "sum_over_time(c[1m])", t)) == [Labels()]


def test_lookback_and_staleness():
    q = FakeQuerier()
    q.add(L(name="m", s="stale"), [0, 60 * S, 120 * S], [1, 2, STALE])
    q.add(L(name="m", s="plain"), [0], [7])
    got = instant(q, "m", 100 * S)
    assert got == {L(name="m", s="stale"): 2, L(name="m", s="plain"): 7}
    # The stale marker ends the series at 120 s; the lookback window (t-5m, t] is left-open.
    assert instant(q, "m", 130 * S) == {L(name="m", s="plain"): 7}
    assert instant(q, "m", 300 * S - 1) == {L(name="m", s="plain"): 7}
    assert instant(q, "m", 300 * S) == {}
    assert instant(q, "m", 100 * S, lookback_delta_ms=50 * S) == {L(name="m", s="stale"): 2}
    assert instant(q, "m", 100 * S, lookback_delta_ms=40 * S) == {}
    # Stale markers are not samples of a range selection.
    assert one(q, 'count_over_time(m{s="stale"}[5m])', 130 * S) == 2


def test_offset_and_at(counter):
    assert one(counter, "c offset 30s", 60 * S) == 20
    assert one(counter, "c @ 45", 1000 * S) == 5
    assert one(counter, "c @ 45 offset 15s", 1000 * S) == 20
    res = Engine().range(counter, "c @ start()", 15 * S, 60 * S, 15 * S)
    assert res.data[0].values.tolist() == [10, 10, 10, 10]
    res = Engine().range(counter, "c @ end()", 15 * S, 60 * S, 15 * S)
    assert res.data[0].values.tolist() == [15, 15, 15, 15]


@pytest.fixture
def jobs():
    q = FakeQuerier()
    for job, inst, v in (("a", "1", 1), ("a", "2", 2), ("b", "1", 4)):
        q.add(L(name="up", job=job, inst=inst), [0], [v])
    return q


def test_aggregations(jobs):
    t = 10 * S
    assert instant(jobs, "sum by (job) (up)", t) == {L(job="a"): 3, L(job="b"): 4}
    assert instant(jobs, "sum without (inst) (up)", t) == {L(job="a"): 3, L(job="b"): 4}
    assert instant(jobs, "avg by (job) (up)", t) == {L(job="a"): 1.5, L(job="b"): 4}
    assert instant(jobs, "count(up)", t) == {Labels(): 3}
    assert instant(jobs, "max by (inst) (up)", t) == {L(inst="1"): 4, L(inst="2"): 2}
    assert instant(jobs, "min(up)", t) == {Labels(): 1}
    assert instant(jobs, "quantile(0.5, up)", t) == {Labels(): 2}
    assert instant(jobs, "stddev(up)", t) == {Labels(): pytest.approx(math.sqrt((16 / 9 + 1 / 9 + 25 / 9) / 3))}
    assert instant(jobs, 'count_values("v", up)', t) == {L(v="1"): 1, L(v="2"): 1, L(v="4"): 1}


def test_kahan_sum():
    q = FakeQuerier()
    for i, v in enumerate([1e100, 1.0, -1e100, 1.0]):
        q.add(L(name="k", i=str(i)), [0], [v])
    assert one(q, "sum(k)", 0) == 2.0


def test_topk_bottomk_order(jobs):
    res = Engine().instant(jobs, "topk(2, up)", 0)
    assert [(s.labels.get("job"), s.labels.get("inst"), s.value) for s in res.data] == [("b", "1", 4), ("a", "2", 2)]
    res = Engine().instant(jobs, "bottomk by (job) (1, up)", 0)
    assert {(s.labels.get("job"), s.value) for s in res.data} == {("a", 1), ("b", 4)}


def test_comparisons(jobs):
    assert instant(jobs, "up > 1", 0) == {L(name="up", job="a", inst="2"): 2, L(name="up", job="b", inst="1"): 4}
    assert instant(jobs, "up > bool 1", 0) == {L(job="a", inst="1"): 0, L(job="a", inst="2"): 1, L(job="b", inst="1"): 1}
    # A scalar on the left still returns the vector's value.
    assert instant(jobs, "3 < up", 0) == {L(name="up", job="b", inst="1"): 4}
    assert Engine().instant(jobs, "1 < bool 2", 0).data == (0, 1.0)


def test_arithmetic_and_matching():
    q = FakeQuerier()
    q.add(L(name="errors", job="a", code="500"), [0], [2])
    q.add(L(name="errors", job="a", code="404"), [0], [1])
    q.add(L(name="errors", job="b", code="500"), [0], [3])
    q.add(L(name="total", job="a"), [0], [10])
    q.add(L(name="total", job="b"), [0], [30])
    q.add(L(name="info", job="a", team="x"), [0], [1])
    assert instant(q, "errors / ignoring(code) group_left total", 0) == {
        L(job="a", code="500"): 0.2, L(job="a", code="404"): 0.1, L(job="b", code="500"): 0.1}
    assert instant(q, 'errors{code="500"} / on(job) total', 0) == {L(job="a"): 0.2, L(job="b"): 0.1}
    assert instant(q, 'errors{code="500"} - ignoring(code) total', 0) == {L(job="a"): -8, L(job="b"): -27}
    with pytest.raises(ExecutionError, match="multiple matches for labels"):
        Engine().instant(q, "errors / ignoring(code) total", 0)
    with pytest.raises(ExecutionError, match="found duplicate series for the match group"):
        Engine().instant(q, "total / ignoring(code) errors", 0)
    assert instant(q, "total * on(job) group_left(team) info", 0) == {L(job="a", team="x"): 10}
    assert instant(q, "-total", 0) == {L(job="a"): -10, L(job="b"): -30}
    assert instant(q, "total % 7 ^ 2", 0) == {L(job="a"): 10.0, L(job="b"): 30.0}
    assert instant(q, "2 ^ 3 ^ 2 * total", 0) == {L(job="a"): 5120, L(job="b"): 15360}
    assert instant(q, 'total and on(job) errors{code="404"}', 0) == {L(name="total", job="a"): 10}
    assert instant(q, 'total unless on(job) errors{code="404"}', 0) == {L(name="total", job="b"): 30}
    assert set(instant(q, 'total{job="a"} or info', 0)) == {L(name="total", job="a"), L(name="info", job="a", team="x")}


def test_functions_drop_name_and_math(jobs):
    assert instant(jobs, "sqrt(up)", 0) == {L(job="a", inst="1"): 1, L(job="a", inst="2"): math.sqrt(2), L(job="b", inst="1"): 2}
    assert instant(jobs, "clamp_max(up, 2)", 0)[L(job="b", inst="1")] == 2
    assert instant(jobs, "clamp_min(up, 3)", 0)[L(job="a", inst="1")] == 3
    assert instant(jobs, "clamp(up, 5, 1)", 0) == {}
    assert Engine().instant(jobs, "scalar(sum(up))", 0).data == (0, 7.0)
    assert Engine().instant(jobs, "scalar(up)", 0).data[1] != Engine().instant(jobs, "scalar(up)", 0).data[1]  # NaN
    assert instant(jobs, "vector(time())", 5 * S) == {Labels(): 5}
    assert instant(jobs, 'absent(nothing{job="z"})', 0) == {L(job="z"): 1}
    assert instant(jobs, "absent(up)", 0) == {}
    assert instant(jobs, 'label_replace(up{job="b"}, "dst", "x-$1", "job", "(.*)")', 0) == {
        L(name="up", job="b", inst="1", dst="x-b"): 4}
    assert instant(jobs, "timestamp(up)", 10 * S) == {L(job="a", inst="1"): 0, L(job="a", inst="2"): 0, L(job="b", inst="1"): 0}


def test_deriv_and_predict_linear():
    q = FakeQuerier()
    q.add(L(name="g"), [0, 10 * S, 20 * S, 30 * S], [5, 7, 9, 11])  # slope 0.2/s
    assert one(q, "deriv(g[1m])", 30 * S) == pytest.approx(0.2)
    # Regression line at t=30 s is 11; 60 s later 11 + 12.
    assert one(q, "predict_linear(g[1m], 60)", 30 * S) == pytest.approx(23)


def test_histogram_quantile():
    q = FakeQuerier()
    for le, v in (("0.1", 10), ("0.5", 30), ("+Inf", 40)):
        q.add(L(name="h_bucket", le=le, job="a"), [0], [v])
    # rank 0.5*40 = 20 falls in (0.1, 0.5]: 0.1 + 0.4 * (20-10)/(30-10).
    assert instant(q, "histogram_quantile(0.5, h_bucket)", 0) == {L(job="a"): pytest.approx(0.3)}
    # rank 38 is beyond the last finite bucket: its upper bound.
    assert instant(q, "histogram_quantile(0.95, h_bucket)", 0) == {L(job="a"): 0.5}


def test_range_query_matrix(counter):
    res = Engine().range(counter, "c", 0, 60 * S, 30 * S)
    assert res.result_type == "matrix"
    (s,) = res.data
    assert s.timestamps.tolist() == [0, 30 * S, 60 * S] and s.values.tolist() == [0, 20, 15]
    res = Engine().range(counter, "c > 12", 0, 60 * S, 15 * S)
    assert res.data[0].timestamps.tolist() == [30 * S, 60 * S]
    res = Engine().range(counter, "1 + 1", 0, 30 * S, 15 * S)
    assert res.data[0].labels == Labels() and res.data[0].values.tolist() == [2, 2, 2]


def test_subquery(counter):
    # Inner steps at 15 s multiples in (0, 60s]: c = 10 20 5 15.
    assert one(counter, "max_over_time(c[1m:15s])", 60 * S) == 20
    assert one(counter, "count_over_time(c[1m:15s])", 60 * S) == 4
    assert one(counter, "sum_over_time((c * 2)[30s:15s])", 60 * S) == 40


def test_instant_range_selector_result(counter):
    res = Engine().instant(counter, "c[30s]", 60 * S)
    assert res.result_type == "matrix"
    assert res.data[0].timestamps.tolist() == [45 * S, 60 * S]


def test_scalar_and_string_results(counter):
    assert Engine().instant(counter, "1 + 2 * 3", 7 * S).data == (7 * S, 7.0)
    assert Engine().instant(counter, '"hi"', 7 * S).data == (7 * S, "hi")


def test_errors(counter):
    with pytest.raises(ParseError, match="^parse error: "):
        Engine().instant(counter, "sum(", 0)
    with pytest.raises(TooManySamples):
        Engine(max_samples=3).instant(counter, "c[1m]", 60 * S)
    with pytest.raises(QueryTimeout):
        Engine(timeout_s=-1).instant(counter, "c", 0)
    with pytest.raises(ExecutionError, match="range vector"):
        Engine().range(counter, "c[1m]", 0, 60 * S, 15 * S)


def test_matchers_and_regex():
    q = FakeQuerier()
    q.add(L(name="m", a="foo"), [0], [1])
    q.add(L(name="m", a="bar"), [0], [2])
    q.add(L(name="m"), [0], [3])
    assert set(instant(q, 'm{a=~"f.*"}', 0).values()) == {1}
    assert set(instant(q, 'm{a=~"o"}', 0).values()) == set()  # anchored
    assert set(instant(q, 'm{a=""}', 0).values()) == {3}
    assert set(instant(q, '{__name__="m", a!="foo"}', 0).values()) == {2, 3}


@pytest.mark.parametrize("expr,message", [
    ("rate(up)", 'expected type range vector in call to function "rate", got instant vector'),
    ("sum(x[5m])", "expected type instant vector in aggregation expression, got range vector"),
    ("-x[5m]", 'unary expression only allowed on expressions of type scalar or instant vector, got "range vector"'),
    ("topk(x, y)", "expected type scalar in aggregation parameter, got instant vector"),
    ('label_replace(x, 1, "a", "b", "c")', 'expected type string in call to function "label_replace", got scalar'),
    ("count_values(1, x)", "expected type string in aggregation parameter, got scalar"),
    ("time(1)", 'expected 0 argument(s) in call to "time", got 1'),
    ("vector(x)", 'expected type scalar in call to function "vector", got instant vector'),
    ("x[5m] + 1", "binary expression must contain only scalar and instant vector types"),
], ids=["function-arg", "aggregation-expr", "unary", "aggregation-param", "string-arg", "count-values-param",
        "argument-count", "vector-arg", "binary"])
def test_parse_errors_read_as_prometheus_words_them(expr, message):
    # Prometheus 2.42's answers to the same queries, without their "line:column: " position.
    with pytest.raises(ParseError) as e:
        parse(expr)
    assert str(e.value) == f"parse error: {message}"
