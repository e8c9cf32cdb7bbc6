"""HTTP API tests through the Router: status codes, JSON shape, error types, value formatting."""

from __future__ import annotations

import json
import math
import urllib.parse

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querier import api as api_mod
from querier.api import QueryAPI, ServerInfo, format_timestamp, parse_duration, parse_time
from querier.aggregations import format_value
from querier.engine import Engine
from store.httpserver import Request
from store.errors import BucketUnavailable
from store.labels import Labels
from tests.querier.fakequerier import FakeQuerier

NOW = 1_700_000_000.0


@pytest.fixture
def api():
    q = FakeQuerier()
    base = int(NOW * 1000)
    q.add(Labels.from_dict({"__name__": "up", "job": "api", "instance": "a"}), [base - 60_000, base], [1, 0.5])
    q.add(Labels.from_dict({"__name__": "up", "job": "db", "instance": "b"}), [base - 60_000, base], [1e21, 1e-7])
    q.add(Labels.from_dict({"__name__": "other", "job": "api", "zone": "z1"}), [base], [3])
    return QueryAPI(lambda: q, Engine(), lambda: NOW).router()


def call(router, path, params=(), method="GET"):
    route, extra = router.match(path)
    assert route is not None, path
    body = b""
    query: dict[str, list[str]] = {}
    headers = {}
    if method == "GET":
        for k, v in params:
            query.setdefault(k, []).append(v)
    else:
        body = urllib.parse.urlencode(list(params)).encode()
        headers["content-type"] = "application/x-www-form-urlencoded"
    resp = route.handler(Request(method, path, query, headers, body, extra))
    return resp.status, json.loads(resp.body)


def test_instant_query_vector(api):
    status, body = call(api, "/api/v1/query", [("query", "up"), ("time", "1700000000.5")])
    assert status == 200
    assert body["status"] == "success" and "warnings" not in body
    assert body["data"]["resultType"] == "vector"
    assert body["data"]["result"] == [
        {"metric": {"__name__": "up", "instance": "a", "job": "api"}, "value": [1700000000.5, "0.5"]},
        {"metric": {"__name__": "up", "instance": "b", "job": "db"}, "value": [1700000000.5, "0.0000001"]},
    ]


def test_instant_query_defaults_to_now_and_scalar(api):
    status, body = call(api, "/api/v1/query", [("query", "1/0")])
    assert status == 200
    assert body["data"] == {"resultType": "scalar", "result": [1700000000, "+Inf"]}


def test_range_query_post_form(api):
    params = [("query", 'up{job="db"}'), ("start", "1699999940"), ("end", "2023-11-14T22:13:20Z"), ("step", "1m")]
    status, body = call(api, "/api/v1/query_range", params, method="POST")
    assert status == 200
    (series,) = body["data"]["result"]
    assert body["data"]["resultType"] == "matrix"
    assert series["metric"] == {"__name__": "up", "instance": "b", "job": "db"}
    assert series["values"] == [[1699999940, "1000000000000000000000"], [1700000000, "0.0000001"]]


@pytest.mark.parametrize("params,message", [
    ([("query", "up"), ("start", "x"), ("end", "1"), ("step", "1")], 'invalid parameter "start": cannot parse "x" to a valid timestamp'),
    ([("query", "up"), ("end", "1"), ("step", "1")], 'invalid parameter "start": cannot parse "" to a valid timestamp'),
    ([("query", "up"), ("start", "10"), ("end", "5"), ("step", "1")], 'invalid parameter "end": end timestamp must not be before start time'),
    ([("query", "up"), ("start", "1"), ("end", "5"), ("step", "0")],
     'invalid parameter "step": zero or negative query resolution step widths are not accepted. Try a positive integer'),
    ([("query", "up"), ("start", "1"), ("end", "5"), ("step", "abc")], 'invalid parameter "step": cannot parse "abc" to a valid duration'),
    ([("query", "up"), ("start", "0"), ("end", "100000"), ("step", "1")],
     "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)"),
    ([("query", "sum("), ("start", "0"), ("end", "10"), ("step", "1")], 'invalid parameter "query": parse error: unclosed left parenthesis'),
    ([("query", "up[5m]"), ("start", "0"), ("end", "10"), ("step", "1")],
     'invalid parameter "query": invalid expression type "range vector" for range query, must be Scalar or instant Vector'),
], ids=["bad-start", "missing-start", "end-before-start", "zero-step", "bad-step", "too-many-points", "parse-error", "range-vector"])
def test_range_query_bad_data(api, params, message):
    status, body = call(api, "/api/v1/query_range", params)
    assert status == 400
    assert body == {"status": "error", "errorType": "bad_data", "error": message}


@pytest.mark.parametrize("path,params,message", [
    ("/api/v1/query", [("query", "up"), ("time", "notatime")],
     'invalid parameter "time": Invalid time value for \'time\': cannot parse "notatime" to a valid timestamp'),
    ("/api/v1/series", [("match[]", "up"), ("start", "abc")],
     'invalid parameter "start": Invalid time value for \'start\': cannot parse "abc" to a valid timestamp'),
    ("/api/v1/labels", [("end", "abc")],
     'invalid parameter "end": Invalid time value for \'end\': cannot parse "abc" to a valid timestamp'),
    ("/api/v1/label/job/values", [("start", "abc")],
     'invalid parameter "start": Invalid time value for \'start\': cannot parse "abc" to a valid timestamp'),
], ids=["query-time", "series-start", "labels-end", "label-values-start"])
def test_optional_time_parameters_bad_data(api, path, params, message):
    # Prometheus words optional time parameters (parseTimeParam) differently from query_range's
    # required start and end; the texts are Prometheus 2.42's answers to the same requests.
    status, body = call(api, path, params)
    assert status == 400
    assert body == {"status": "error", "errorType": "bad_data", "error": message}


def test_execution_and_timeout_errors():
    q = FakeQuerier()
    q.add(Labels.from_dict({"__name__": "a", "job": "x"}), [0], [1])
    q.add(Labels.from_dict({"__name__": "b", "job": "x"}), [0], [2])
    router = QueryAPI(lambda: q, Engine(), lambda: 0.0).router()
    status, body = call(router, "/api/v1/query", [("query", '-{job="x"}'), ("time", "0")])
    assert status == 422 and body["errorType"] == "execution"
    assert body["error"] == "vector cannot contain metrics with the same labelset"
    router = QueryAPI(lambda: q, Engine(timeout_s=-1), lambda: 0.0).router()
    status, body = call(router, "/api/v1/query", [("query", "a"), ("time", "0")])
    assert status == 503 and body["errorType"] == "timeout"
    status, body = call(router, "/api/v1/query", [("query", "a"), ("time", "0"), ("timeout", "zz")])
    assert status == 400 and body["error"] == 'invalid parameter "timeout": cannot parse "zz" to a valid duration'


def test_series(api):
    status, body = call(api, "/api/v1/series", [("match[]", "up"), ("match[]", '{zone="z1"}')], method="POST")
    assert status == 200
    assert body["data"] == [
        {"__name__": "other", "job": "api", "zone": "z1"},
        {"__name__": "up", "instance": "a", "job": "api"},
        {"__name__": "up", "instance": "b", "job": "db"},
    ]
    status, body = call(api, "/api/v1/series", [])
    assert status == 400 and body["error"] == "no match[] parameter provided"
    status, body = call(api, "/api/v1/series", [("match[]", "up{")])
    assert status == 400 and body["error"].startswith('invalid parameter "match[]": parse error')


def test_labels_and_values(api):
    assert call(api, "/api/v1/labels")[1]["data"] == ["__name__", "instance", "job", "zone"]
    assert call(api, "/api/v1/labels", [("match[]", "other")])[1]["data"] == ["__name__", "job", "zone"]
    assert call(api, "/api/v1/label/job/values")[1]["data"] == ["api", "db"]
    assert call(api, "/api/v1/label/job/values", [("match[]", "other")])[1]["data"] == ["api"]
    assert call(api, "/api/v1/label/__name__/values")[1]["data"] == ["other", "up"]
    assert call(api, "/api/v1/label/nothing/values")[1]["data"] == []
    status, body = call(api, "/api/v1/label/job/values", [("limit", "1")])
    assert body["data"] == ["api"] and body["warnings"] == ["results truncated due to limit"]
    status, body = call(api, "/api/v1/label/1bad/values")
    assert status == 400 and body["error"] == 'invalid label name: "1bad"'
    assert call(api, "/api/v1/label/job/other")[0] == 404


def test_buildinfo(api):
    status, body = call(api, "/api/v1/status/buildinfo")
    assert status == 200
    assert set(body["data"]) == {"version", "revision", "branch", "buildUser", "buildDate", "goVersion"}


@pytest.mark.parametrize("v,want", [
    (1.0, "1"), (0.5, "0.5"), (1e21, "1000000000000000000000"), (1e-7, "0.0000001"), (-2.5e-5, "-0.000025"),
    (float("nan"), "NaN"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (-0.0, "-0"),
    (123456789.125, "123456789.125"), (0.1 + 0.2, "0.30000000000000004"),
], ids=lambda x: str(x))
def test_format_value(v, want):
    assert format_value(v) == want


def test_timestamps_and_durations():
    assert format_timestamp(1435781451781) == "1435781451.781"
    assert format_timestamp(1435781451000) == "1435781451"
    assert format_timestamp(1435781451010) == "1435781451.010"
    assert format_timestamp(-1500) == "-1.500"
    assert parse_time("1435781451.781") == 1435781451781
    assert parse_time("2015-07-01T20:10:51.781Z") == 1435781451781
    assert parse_time("2015-07-01T22:10:51.781+02:00") == 1435781451781
    assert parse_duration("15s") == 15_000 and parse_duration("1m30s") == 90_000 and parse_duration("0.5") == 500
    with pytest.raises(ValueError):
        parse_time("yesterday")


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(-2**45, 2**45),
                          st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**6, 10**6).map(float)),
                max_size=30))
def test_bulk_json_formatting_equals_the_per_point_formatting(points):
    ts = np.array([t for t, _ in points], dtype=np.int64)
    vals = np.array([v for _, v in points], dtype=np.float64)
    assert api_mod.timestamps_json(ts) == [api_mod.format_timestamp(t) for t in ts.tolist()]
    assert api_mod.values_json(vals) == [format_value(v) for v in vals.tolist()]
    ms = np.abs(ts) // 1000 * 1000  # whole seconds: the split fast path
    assert api_mod.timestamps_json(ms) == [api_mod.format_timestamp(t) for t in ms.tolist()]


def test_rules_alerts_metadata_exemplars_are_empty_but_checked(api):
    assert call(api, "/api/v1/rules") == (200, {"status": "success", "data": {"groups": []}})
    assert call(api, "/api/v1/alerts") == (200, {"status": "success", "data": {"alerts": []}})
    assert call(api, "/api/v1/metadata") == (200, {"status": "success", "data": {}})
    assert call(api, "/api/v1/query_exemplars", [("query", "up")]) == (200, {"status": "success", "data": []})
    status, body = call(api, "/api/v1/query_exemplars", [("query", "up{")])
    assert status == 400 and body["errorType"] == "bad_data" and "parse error" in body["error"]
    status, body = call(api, "/api/v1/query_exemplars", [("query", "up"), ("start", "10"), ("end", "5")])
    assert status == 400 and body["error"] == "end timestamp must not be before start timestamp"


def test_format_query(api):
    status, body = call(api, "/api/v1/format_query", [("query", "sum(rate(x{a='b'}[5m]))by(job)")])
    assert (status, body["data"]) == (200, 'sum by (job) (rate(x{a="b"}[5m]))')
    status, body = call(api, "/api/v1/format_query", [("query", "sum(")], method="POST")
    assert status == 400 and body["error"].startswith('invalid parameter "query": parse error')


def test_parse_query_tree_has_prometheus_shape(api):
    status, body = call(api, "/api/v1/parse_query", [("query", 'rate(x{a="b"}[5m] offset 1m) > bool on(a) y @ end()')])
    assert status == 200
    assert body["data"] == {
        "type": "binaryExpr", "op": ">", "bool": True,
        "matching": {"card": "one-to-one", "labels": ["a"], "on": True, "include": []},
        "lhs": {"type": "call",
                "func": {"name": "rate", "argTypes": ["matrix"], "variadic": 0, "returnType": "vector"},
                "args": [{"type": "matrixSelector", "name": "x", "range": 300000, "offset": 60000,
                          "matchers": [{"name": "a", "value": "b", "type": "="},
                                       {"name": "__name__", "value": "x", "type": "="}],
                          "timestamp": None, "startOrEnd": None}]},
        "rhs": {"type": "vectorSelector", "name": "y", "offset": 0,
                "matchers": [{"name": "__name__", "value": "y", "type": "="}],
                "timestamp": None, "startOrEnd": "end"},
    }
    _, body = call(api, "/api/v1/parse_query", [("query", "topk(2, -x) + 1.5")])
    tree = body["data"]
    assert tree["matching"] is None and tree["rhs"] == {"type": "numberLiteral", "val": "1.5"}
    assert tree["lhs"]["type"] == "aggregation" and tree["lhs"]["param"] == {"type": "numberLiteral", "val": "2"}
    assert tree["lhs"]["expr"]["type"] == "unaryExpr" and tree["lhs"]["grouping"] == [] and not tree["lhs"]["without"]


def test_status_endpoints():
    stats = {"headStats": {"numSeries": 3}}
    info = ServerInfo(config_yaml="a: 1\n", flags={"listen": "127.0.0.1:9201"}, start_time=1_700_000_000.0,
                      tsdb_stats=lambda limit: dict(stats, limit=limit))
    router = QueryAPI(lambda: FakeQuerier(), Engine(), lambda: NOW, info).router()
    assert call(router, "/api/v1/status/config")[1]["data"] == {"yaml": "a: 1\n"}
    assert call(router, "/api/v1/status/flags")[1]["data"] == {"listen": "127.0.0.1:9201"}
    rt = call(router, "/api/v1/status/runtimeinfo")[1]["data"]
    assert rt["startTime"] == "2023-11-14T22:13:20.000Z" and rt["reloadConfigSuccess"] is True
    assert call(router, "/api/v1/status/tsdb")[1]["data"] == {"headStats": {"numSeries": 3}, "limit": 10}
    assert call(router, "/api/v1/status/tsdb", [("limit", "3")])[1]["data"]["limit"] == 3
    status, body = call(router, "/api/v1/status/tsdb", [("limit", "0")])
    assert status == 400 and body["error"] == "limit must be a positive number"


def test_a_query_stops_when_the_client_goes_away():
    q = FakeQuerier()
    q.add(Labels.from_dict({"__name__": "a"}), [0], [1])
    router = QueryAPI(lambda: q, Engine(), lambda: 0.0).router()
    route, _ = router.match("/api/v1/query")
    req = Request("GET", "/api/v1/query", {"query": ["sum(a) + a"], "time": ["0"]}, {}, b"", {}, lambda: True)
    resp = route.handler(req)
    body = json.loads(resp.body)
    assert resp.status == 499 and body["errorType"] == "canceled"


class _FlakyBucketQuerier(FakeQuerier):
    """A querier whose bucket part fails: a warning with partial responses, an error without."""

    def __init__(self) -> None:
        super().__init__()
        self.partial_response = True
        self.warnings: list[str] = []

    def select(self, matchers, mint, maxt, hints=None):
        if not self.partial_response:
            raise BucketUnavailable("bucket b: connection refused")
        self.warnings.append("partial response: reading block X failed: connection refused")
        return super().select(matchers, mint, maxt, hints)


def test_bucket_failures_are_warnings_or_errors_as_the_request_asks():
    q = _FlakyBucketQuerier()
    q.add(Labels.from_dict({"__name__": "a"}), [0], [1])
    router = QueryAPI(lambda: q, Engine(), lambda: 0.0).router()
    status, body = call(router, "/api/v1/query", [("query", "a"), ("time", "0")])
    assert status == 200 and body["data"]["result"][0]["value"] == [0, "1"]
    assert body["warnings"] == ["partial response: reading block X failed: connection refused"]
    q.warnings.clear()
    status, body = call(router, "/api/v1/query_range", [("query", "a"), ("start", "0"), ("end", "0"), ("step", "1"),
                                                        ("partial_response", "false")])
    assert status == 503 and body["errorType"] == "unavailable" and "connection refused" in body["error"]
    status, body = call(router, "/api/v1/series", [("match[]", "a"), ("partial_response", "maybe")])
    assert status == 400 and body["error"].startswith('invalid parameter "partial_response"')


def test_matrix_json_with_shared_and_different_timestamps():
    from querier.values import RangeSeries, Result

    grid = np.array([1000, 2500, 4000], dtype=np.int64)
    res = Result("matrix", [RangeSeries(Labels.from_dict({"a": "1"}), grid, np.array([1.0, 0.5, math.nan])),
                            RangeSeries(Labels.from_dict({"a": "2"}), grid, np.array([2.0, -0.0, 1e21])),
                            RangeSeries(Labels.from_dict({"a": "3"}), grid[1:], np.array([3.0, 4.0]))])
    assert json.loads(api_mod.result_json(res)) == {"resultType": "matrix", "result": [
        {"metric": {"a": "1"}, "values": [[1, "1"], [2.5, "0.5"], [4, "NaN"]]},
        {"metric": {"a": "2"}, "values": [[1, "2"], [2.5, "-0"], [4, "1000000000000000000000"]]},
        {"metric": {"a": "3"}, "values": [[2.5, "3"], [4, "4"]]}]}


def test_stats_parameter(api):
    _, body = call(api, "/api/v1/query", [("query", "up"), ("time", "1700000000")])
    assert "stats" not in body["data"]
    status, body = call(api, "/api/v1/query_range", [("query", "up"), ("start", "1699999940"), ("end", "1700000000"),
                                                     ("step", "60"), ("stats", "all")])
    assert status == 200
    st = body["data"]["stats"]
    # up: two series with samples at -60 s and 0 s: 4 samples read; the selector's result holds
    # 2 series x 2 steps = 4 points more.
    assert st["samples"] == {"totalQueryableSamples": 4, "peakSamples": 8}
    assert set(st["timings"]) == {"evalTotalTime", "resultSortTime", "queryPreparationTime", "innerEvalTime",
                                  "execQueueTime", "execTotalTime"}
    assert len(body["data"]["result"]) == 2
