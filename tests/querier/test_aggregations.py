"""Aggregation and metric-name tests with hand-computed expectations from Prometheus' documented semantics.

limitk(k, v) keeps at most k series of every group per step, unchanged;
which ones is up to the engine. limit_ratio(r, v) keeps a series when
``hash(labels) / (2**64 - 1)`` is below r (r >= 0) or at least 1 + r (r < 0),
hash being xxHash64 over ``name 0xff value 0xff`` of every label (Prometheus'
labels.Hash and HashRatioSampler). Delayed name removal: functions and
operators mark the metric name for removal, label_replace/label_join and
``by (__name__)`` still see it, it is removed when the query ends.
"""

from __future__ import annotations

import math

import pytest
import xxhash

from querier.engine import Engine
from querier.errors import ExecutionError
from store.labels import Labels
from tests.querier.fakequerier import FakeQuerier

S = 1000
M = 60 * S


def L(**kw: str) -> Labels:
    return Labels.from_dict({("__name__" if k == "name" else k): v for k, v in kw.items()})


def instant(q, expr, t_ms, **engine_kw):
    res = Engine(**engine_kw).instant(q, expr, t_ms)
    assert res.result_type == "vector", res.result_type
    return {s.labels: s.value for s in res.data}


def ranged(q, expr, start, end, step, **engine_kw):
    res = Engine(**engine_kw).range(q, expr, start, end, step)
    return {s.labels: dict(zip(s.timestamps.tolist(), s.values.tolist())) for s in res.data}


def prom_offset(lbls: dict[str, str]) -> float:
    """HashRatioSampler.SampleOffset, computed from the definition (not from our Labels class)."""
    raw = b"".join(n.encode() + b"\xff" + v.encode() + b"\xff" for n, v in sorted(lbls.items()))
    return float(xxhash.xxh64_intdigest(raw)) / float(2**64 - 1)


@pytest.fixture
def requests():
    """Six series in two groups; value = 10 * instance + (100 for canary), constant over 0..10 min."""
    q = FakeQuerier()
    for group, n in (("production", 2), ("canary", 4)):
        for i in range(n):
            base = 100 if group == "canary" else 0
            q.add(L(name="http_requests", group=group, instance=str(i)), [m * M for m in range(11)],
                  [base + 10 * i] * 11)
    return q


def all_series(q) -> dict[Labels, float]:
    return {lb: float(v[0]) for lb, (_, v) in q.series.items()}


# ---- limitk ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, per_group", [(1, {"production": 1, "canary": 1}), (2, {"production": 2, "canary": 2}),
                                          (3, {"production": 2, "canary": 3}), (1.9, {"production": 1, "canary": 1}),
                                          (100, {"production": 2, "canary": 4})],
                         ids=["k1", "k2", "k3-caps-small-group", "k-truncated", "k-above-size"])
def test_limitk_keeps_k_series_per_group_unchanged(requests, k, per_group):
    got = instant(requests, f"limitk by (group) ({k}, http_requests)", 5 * M)
    inputs = all_series(requests)
    # Every output is an input series with its labels (name included) and value untouched.
    assert all(lb in inputs and inputs[lb] == v for lb, v in got.items())
    counts: dict[str, int] = {}
    for lb in got:
        counts[lb.get("group")] = counts.get(lb.get("group"), 0) + 1
    assert counts == per_group


@pytest.mark.parametrize("k", ["0", "-1", "0.99"], ids=["zero", "negative", "below-one"])
def test_limitk_below_one_is_empty_without_error(requests, k):
    assert instant(requests, f"limitk({k}, http_requests)", 5 * M) == {}


def test_limitk_per_step_k_and_presence():
    q = FakeQuerier()
    # k follows foo: 0, 1, 2, 3 at minutes 0..3; three series, "c" only from minute 2 on.
    q.add(L(name="foo"), [0, M, 2 * M, 3 * M], [0, 1, 2, 3])
    q.add(L(name="x", s="a"), [0, M, 2 * M, 3 * M], [1, 1, 1, 1])
    q.add(L(name="x", s="b"), [0, M, 2 * M, 3 * M], [2, 2, 2, 2])
    q.add(L(name="x", s="c"), [2 * M, 3 * M], [3, 3])
    got = ranged(q, "count(limitk(scalar(foo), x))", 0, 3 * M, M)
    # Minute 0: k=0 -> nothing. Minute 1: 1 of 2. Minute 2: 2 of 3. Minute 3: 3 of 3.
    assert got == {Labels(): {M: 1, 2 * M: 2, 3 * M: 3}}
    # At minute 1 with k=5 only the two series present are returned: limitk never invents samples.
    assert set(instant(q, "limitk(5, x)", M)) == {L(name="x", s="a"), L(name="x", s="b")}


@pytest.mark.parametrize("expr", ["limitk(NaN, nothing)", "topk(NaN, nothing)", "bottomk(NaN, nothing)"],
                         ids=["limitk", "topk", "bottomk"])
def test_k_nan_is_an_error_even_without_input(requests, expr):
    with pytest.raises(ExecutionError, match="^Parameter value is NaN$"):
        Engine().instant(requests, expr, 5 * M)


def test_k_overflowing_int64_is_an_error(requests):
    # Go formats the float with %v: 1e+19.
    with pytest.raises(ExecutionError, match=r"^Scalar value 1e\+19 overflows int64$"):
        Engine().instant(requests, "topk(1e19, http_requests)", 5 * M)
    with pytest.raises(ExecutionError, match=r"^Scalar value 1e\+19 overflows int64$"):
        Engine().instant(requests, "limitk(1e19, http_requests)", 5 * M)


# ---- limit_ratio ----------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0.2, 0.5, 0.8, -0.3, -0.5, -0.9], ids=lambda r: f"r={r}")
def test_limit_ratio_selects_by_label_hash(requests, r):
    want = set()
    for lb in requests.series:
        off = prom_offset(lb.to_dict())
        if (r >= 0 and off < r) or (r < 0 and off >= 1 + r):
            want.add(lb)
    assert set(instant(requests, f"limit_ratio({r}, http_requests)", 5 * M)) == want


@pytest.mark.parametrize("r", [0.2, 0.5, 0.7], ids=lambda r: f"r={r}")
def test_limit_ratio_and_its_negative_complement_partition_the_input(requests, r):
    a = set(instant(requests, f"limit_ratio({r}, http_requests)", 5 * M))
    b = set(instant(requests, f"limit_ratio({r - 1}, http_requests)", 5 * M))
    assert a | b == set(requests.series)
    assert not a & b


def test_limit_ratio_bounds_and_errors(requests):
    assert instant(requests, "limit_ratio(0, http_requests)", 5 * M) == {}
    for r in ("1", "-1"):
        assert set(instant(requests, f"limit_ratio({r}, http_requests)", 5 * M)) == set(requests.series)
    res = Engine().instant(requests, "limit_ratio(1.1, http_requests)", 5 * M)
    assert len(res.data) == 6
    assert res.warnings == ["PromQL warning: ratio value should be between -1 and 1, got 1.1, capping to 1"]
    res = Engine().instant(requests, "limit_ratio(-1.1, http_requests)", 5 * M)
    assert len(res.data) == 6
    assert res.warnings == ["PromQL warning: ratio value should be between -1 and 1, got -1.1, capping to -1"]
    with pytest.raises(ExecutionError, match="^Ratio value is NaN$"):
        Engine().instant(requests, "limit_ratio(NaN, nothing)", 5 * M)


def test_limit_ratio_per_step_ratio():
    q = FakeQuerier()
    # The ratio follows bar: 0, 1, -1, 0; zero keeps nothing, +-1 keep everything.
    q.add(L(name="bar"), [0, M, 2 * M, 3 * M], [0, 1, -1, 0])
    q.add(L(name="x", s="a"), [0, M, 2 * M, 3 * M], [1, 1, 1, 1])
    q.add(L(name="x", s="b"), [0, M, 2 * M, 3 * M], [2, 2, 2, 2])
    assert ranged(q, "count(limit_ratio(scalar(bar), x))", 0, 3 * M, M) == {Labels(): {M: 2, 2 * M: 2}}


# ---- stddev / stdvar / quantile ---------------------------------------------------------------------

def test_stddev_of_equal_values_is_exactly_zero():
    q = FakeQuerier()
    for i in range(3):
        q.add(L(name="m", i=str(i)), [0], [13.3])  # 0 + 1.33 x 10, as in aggregators.test
    assert instant(q, "stddev(m)", 0) == {Labels(): 0.0}
    assert instant(q, "stdvar(m)", 0) == {Labels(): 0.0}


def test_stdvar_population_variance():
    q = FakeQuerier()
    # 2 4 4 4 5 5 7 9: mean 5, squared deviations 9 1 1 1 0 0 4 16 -> 32 / 8 = 4.
    for i, v in enumerate([2, 4, 4, 4, 5, 5, 7, 9]):
        q.add(L(name="m", i=str(i), g="a" if i < 4 else "b"), [0], [v])
    assert instant(q, "stdvar(m)", 0) == {Labels(): pytest.approx(4)}
    assert instant(q, "stddev(m)", 0) == {Labels(): pytest.approx(2)}
    # Group a: 2 4 4 4, mean 3.5, deviations 2.25 .25 .25 .25 -> 0.75. Group b: 5 5 7 9, mean 6.5 -> 11/4.
    assert instant(q, "stdvar by (g) (m)", 0) == {L(g="a"): pytest.approx(0.75), L(g="b"): pytest.approx(2.75)}


def test_stddev_with_infinity_or_nan_is_nan():
    q = FakeQuerier()
    q.add(L(name="m", i="1"), [0], [math.inf])
    q.add(L(name="m", i="2"), [0], [1])
    assert math.isnan(instant(q, "stddev(m)", 0)[Labels()])


def test_quantile_out_of_range_warns(requests):
    res = Engine().instant(requests, "quantile(NaN, http_requests)", 5 * M)
    assert res.warnings == ["PromQL warning: quantile value should be between 0 and 1, got NaN"]
    res = Engine().instant(requests, "quantile(1.5, http_requests)", 5 * M)
    assert res.warnings == ["PromQL warning: quantile value should be between 0 and 1, got 1.5"]
    assert Engine().instant(requests, "quantile(0.5, http_requests)", 5 * M).warnings == []


def test_sort_in_range_query_warns(requests):
    msg = "PromQL warning: sort is ineffective for range queries since results are always ordered by labels"
    assert Engine().range(requests, "sum(sort(http_requests))", 0, 2 * M, M).warnings == [msg]
    assert Engine().instant(requests, "sort(http_requests)", M).warnings == []


# ---- delayed __name__ removal -----------------------------------------------------------------------

@pytest.fixture
def two_metrics():
    q = FakeQuerier()
    # Both counters grow 60 per 5 min (0.2/s).
    q.add(L(name="metric_total", env="1"), [0, 5 * M, 10 * M], [0, 60, 120])
    q.add(L(name="another_metric_total", env="1"), [0, 5 * M, 10 * M], [60, 120, 180])
    return q


def test_functions_and_operators_drop_the_name(two_metrics):
    t = 10 * M
    assert instant(two_metrics, 'rate(metric_total{env="1"}[10m])', t) == {L(env="1"): pytest.approx(0.2)}
    assert instant(two_metrics, "-metric_total", t) == {L(env="1"): -120}
    assert instant(two_metrics, "metric_total * 2", t) == {L(env="1"): 240}
    assert instant(two_metrics, "metric_total <= bool another_metric_total", t) == {L(env="1"): 1}
    assert instant(two_metrics, "metric_total <= another_metric_total", t) == {L(name="metric_total", env="1"): 120}
    assert instant(two_metrics, 'last_over_time(metric_total{env="1"}[10m])', t) == {
        L(name="metric_total", env="1"): 120}
    # The subquery's series were marked by abs(); last_over_time keeps the mark.
    assert instant(two_metrics, 'last_over_time(abs(metric_total{env="1"})[10m:])', t) == {L(env="1"): 120}


def test_label_functions_see_the_name_to_be_dropped(two_metrics):
    t = 10 * M
    got = instant(two_metrics, 'label_replace(rate({env="1"}[10m]), "my_name", "rate_$1", "__name__", "(.+)")', t)
    assert got == {L(env="1", my_name="rate_metric_total"): pytest.approx(0.2),
                   L(env="1", my_name="rate_another_metric_total"): pytest.approx(0.2)}
    # Writing __name__ itself keeps the (new) name.
    got = instant(two_metrics, 'label_join(rate({env="1"}[10m]), "__name__", "_", "__name__", "env")', t)
    assert got == {L(name="metric_total_1", env="1"): pytest.approx(0.2),
                   L(name="another_metric_total_1", env="1"): pytest.approx(0.2)}


def test_aggregation_by_name_and_name_marks(two_metrics):
    t = 10 * M
    # Grouped by a name that is removed at the end: two groups collapse to {} -> error.
    with pytest.raises(ExecutionError, match="same labelset"):
        Engine().instant(two_metrics, 'sum by (__name__) (rate({env="1"}[10m]))', t)
    # Without __name__ in the grouping both rates land in one group: 0.2 + 0.2.
    assert instant(two_metrics, 'sum by (env) (rate({env="1"}[10m]))', t) == {L(env="1"): pytest.approx(0.4)}
    assert instant(two_metrics, 'sum by (__name__, env) (metric_total{env="1"})', t) == {
        L(name="metric_total", env="1"): 120}
    # topk keeps the mark of its input.
    assert instant(two_metrics, 'topk(10, sum by (__name__, env) (rate(metric_total{env="1"}[10m])))', t) == {
        L(env="1"): pytest.approx(0.2)}


def test_group_is_marked_if_any_input_is():
    q = FakeQuerier()
    q.add(L(name="metric_total", env="1"), [m * M for m in range(11)], [m for m in range(11)])
    q.add(L(name="metric_total", env="2"), [m * M for m in range(11)], [3 * m for m in range(11)])
    t = 10 * M
    # rate over 5m of a counter growing 3/min: 0.05/s; the plain series is 10 at 10m.
    assert instant(q, 'sum by (__name__) (metric_total{env="1"})', t) == {L(name="metric_total"): 10}
    assert instant(q, 'sum by (__name__) (rate(metric_total{env="2"}[5m]))', t) == {Labels(): pytest.approx(0.05)}
    for expr in ('sum by (__name__) (metric_total{env="1"} or rate(metric_total{env="2"}[5m]))',
                 'sum by (__name__) (rate(metric_total{env="2"}[5m]) or metric_total{env="1"})'):
        assert instant(q, expr, t) == {Labels(): pytest.approx(10.05)}
    got = instant(q, 'label_replace(sum by (__name__) (rate(metric_total{env="2"}[5m])), '
                     '"__name__", "$1", "__name__", "(.+)")', t)
    assert got == {L(name="metric_total"): pytest.approx(0.05)}


def test_series_equal_after_removal_merge_in_range_queries():
    q = FakeQuerier()
    q.add(L(name="metric_a"), [0], [1])
    q.add(L(name="metric_b"), [0, 10 * M], [3, 4])
    # At 0 `or` takes -metric_a (same signature without names), at 10m only -metric_b exists, at 20m nothing;
    # both become {} and do not overlap, so they merge into one series.
    assert ranged(q, "-metric_a or -metric_b", 0, 20 * M, 10 * M) == {Labels(): {0: -1, 10 * M: -4}}


def test_eager_name_removal(two_metrics):
    t = 10 * M
    # The name is gone right after rate(): both rates have labels {env="1"} -> error.
    with pytest.raises(ExecutionError, match="same labelset"):
        Engine(delayed_name_removal=False).instant(two_metrics, 'rate({env="1"}[10m])', t)
    # label_replace no longer sees a name: "(.+)" does not match "", nothing is set.
    got = instant(two_metrics, 'label_replace(rate(metric_total[10m]), "my_name", "$1", "__name__", "(.+)")', t,
                  delayed_name_removal=False)
    assert got == {L(env="1"): pytest.approx(0.2)}
