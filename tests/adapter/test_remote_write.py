"""Remote write through the real HTTP server of ``flashback up``: status codes, messages, and that
nothing valid next to bad input is lost."""

from __future__ import annotations

import math
import os
import struct
import time

import cramjam
import pytest

from flashback.app import App
from flashback.config import Options
from tests import prompb_ref
from tests.e2e.harness import get_json, remote_write, request

STALE = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]


@pytest.fixture
def app(tmp_path):
    a = App(Options(listen_port=0, data_dir=str(tmp_path / "data"), max_body_bytes=64 * 1024))
    a.start()
    yield a
    a.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _series(app, selector: str) -> dict:
    doc = get_json(app.address[1], "/api/v1/query", {"query": f"{selector}[1y]", "time": time.time() + 60})
    return {tuple(sorted(s["metric"].items())): [(round(float(t) * 1000), v) for t, v in s["values"]]
            for s in doc["data"]["result"]}


def _write(app, series, **headers):
    return remote_write(app.address[1], prompb_ref.write_request(series), **headers)


def test_valid_request_is_204_and_queryable(app):
    t = _now_ms()
    status, body = _write(app, [([("__name__", "ok"), ("job", "a")], [(t, 1.5), (t + 1000, 2.5)])])
    assert status == 204, body
    assert _series(app, "ok") == {(("__name__", "ok"), ("job", "a")): [(t, "1.5"), (t + 1000, "2.5")]}


def test_garbage_protobuf_is_400(app):
    status, body, _ = request(app.address[1], "POST", "/api/v1/write", bytes(cramjam.snappy.compress_raw(b"\x0a\xff")),
                              {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy"})
    assert status == 400 and b"invalid protobuf WriteRequest" in body


def test_bad_snappy_is_400(app):
    status, body, _ = request(app.address[1], "POST", "/api/v1/write", b"\x10not snappy at all",
                              {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy"})
    assert status == 400 and body.startswith(b"snappy:") and b"snappy: snappy" not in body


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json"},
    {"Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request"},
    {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
], ids=["json", "remote_write_2", "gzip"])
def test_unsupported_content_type_is_415(app, headers):
    status, body, _ = request(app.address[1], "POST", "/api/v1/write",
                              bytes(cramjam.snappy.compress_raw(prompb_ref.write_request([]))), headers)
    assert status == 415 and b"unsupported content" in body


def test_oversized_body_is_413(app):
    # Random hex does not compress: the snappy body itself is above the limit.
    big = prompb_ref.write_request([([("__name__", "big"), ("pad", os.urandom(50_000).hex())], [(_now_ms(), 1.0)])])
    status, body = remote_write(app.address[1], big)
    assert status == 413 and b"exceeds the limit of 65536 bytes" in body
    # The server keeps serving after refusing to read the body.
    assert _write(app, [([("__name__", "after")], [(_now_ms(), 1.0)])])[0] == 204


def test_unsorted_labels_are_accepted_like_prometheus(app):
    t = _now_ms()
    assert _write(app, [([("job", "a"), ("__name__", "unsorted")], [(t, 1.0)])])[0] == 204
    assert _series(app, "unsorted") == {(("__name__", "unsorted"), ("job", "a")): [(t, "1")]}


@pytest.mark.parametrize("labels,message", [
    ([("__name__", "bad"), ("job", "a"), ("job", "b")], b'duplicate label name "job"'),
    ([("__name__", ""), ("job", "a")], b"missing metric name"),
    ([("job", "a")], b"missing metric name"),
    ([("__name__", "bad"), ("", "v")], b"empty label name"),
], ids=["duplicate_names", "empty_metric_name", "no_metric_name", "empty_label_name"])
def test_invalid_labels_400_and_valid_series_kept(app, labels, message):
    t = _now_ms()
    status, body = _write(app, [(labels, [(t, 1.0)]), ([("__name__", "good")], [(t, 7.0)])])
    assert status == 400 and b"invalid labels: 1 sample(s) rejected" in body and message in body
    assert _series(app, "good") == {(("__name__", "good"),): [(t, "7")]}


def test_nan_inf_and_stale_values_are_stored(app):
    t = _now_ms()
    vals = [math.nan, math.inf, -math.inf, -0.0]
    assert _write(app, [([("__name__", "special")], [(t + i, v) for i, v in enumerate(vals)])])[0] == 204
    assert [v for _, v in _series(app, "special")[(("__name__", "special"),)]] == ["NaN", "+Inf", "-Inf", "-0"]
    # A stale marker ends the series for instant queries, as in Prometheus.
    assert _write(app, [([("__name__", "special")], [(t + 10, STALE)])])[0] == 204
    doc = get_json(app.address[1], "/api/v1/query", {"query": "special", "time": (t + 20) / 1000})
    assert doc["data"]["result"] == []


def test_out_of_order_and_duplicates_400_and_rest_kept(app):
    t = _now_ms()
    assert _write(app, [([("__name__", "ooo")], [(t, 1.0)])])[0] == 204
    status, body = _write(app, [([("__name__", "ooo")], [(t - 1000, 2.0), (t, 3.0), (t + 1000, 4.0)]),
                                ([("__name__", "other")], [(t, 5.0)])])
    assert status == 400
    assert b"out of order sample: 1 sample(s) rejected" in body
    assert b"duplicate sample for timestamp: 1 sample(s) rejected" in body
    assert _series(app, "ooo") == {(("__name__", "ooo"),): [(t, "1"), (t + 1000, "4")]}
    assert _series(app, "other") == {(("__name__", "other"),): [(t, "5")]}
    # Resending the newest stored sample unchanged (a retry) is fine, as in Prometheus.
    assert _write(app, [([("__name__", "ooo")], [(t + 1000, 4.0)])])[0] == 204


def test_timestamps_far_in_the_past_and_future_are_out_of_bounds(app):
    t = _now_ms()
    assert _write(app, [([("__name__", "recent")], [(t, 1.0)])])[0] == 204
    status, body = _write(app, [([("__name__", "far")], [(t - 30 * 3600_000, 1.0), (t + 3600_000, 2.0), (t, 3.0)])])
    assert status == 400 and b"out of bounds: 2 sample(s) rejected" in body
    assert _series(app, "far") == {(("__name__", "far"),): [(t, "3")]}


def test_native_histograms_rejected_with_message_float_samples_kept(app):
    r = prompb_ref.WriteRequest()
    ts = r.timeseries.add()
    ts.labels.add(name="__name__", value="hist")
    t = _now_ms()
    ts.samples.add(timestamp=t, value=1.0)
    ts.histograms.add(timestamp=t)
    status, body = remote_write(app.address[1], r.SerializeToString())
    assert status == 400 and b"native histograms are not supported" in body
    assert _series(app, "hist") == {(("__name__", "hist"),): [(t, "1")]}


def test_get_is_405(app):
    assert request(app.address[1], "GET", "/api/v1/write")[0] == 405


def test_metrics_count_rejections_by_reason(app):
    t = _now_ms()
    _write(app, [([("__name__", "m")], [(t, 1.0)])])
    _write(app, [([("__name__", "m")], [(t - 1, 1.0)])])
    _, body, _ = request(app.address[1], "GET", "/metrics")
    text = body.decode()
    assert 'flashback_head_samples_rejected_total{reason="out_of_order"} 1.0' in text
    assert "flashback_head_samples_appended_total 1.0" in text
    assert "flashback_head_series 1.0" in text
    assert 'flashback_http_request_duration_seconds_count{code="204",handler="remote_write"} 1.0' in text
    assert "flashback_wal_commits_total" in text and "flashback_wal_fsync_duration_seconds" in text
