"""Cluster-mode remote write: splitting requests by shard and publishing the parts.

Unit tests use an in-memory log per shard; the last tests publish to a real 3-node NATS
JetStream cluster (``store.natscluster``) and read back with ``NatsConsumer``.
"""

from __future__ import annotations

import concurrent.futures
import struct
import time

import cramjam
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from adapter.sharded_write import ShardedWriteHandler, msg_id
from store import shardrecord, writerequest
from store.db import decode_record
from store.errors import LogUnavailable, WALError
from store.head import Head, HeadOptions
from store.httpserver import Request, Router
from store.labels import Labels
from store.topology import Replica, Shard, Topology
from store.writerequest import S_SPAN_END, S_SPAN_START
from tests import prompb_ref

T0 = 1_700_000_000_000
NOW_S = T0 / 1000


def topology(n: int) -> Topology:
    return Topology(("nats://127.0.0.1:4222",), tuple(
        Shard(f"shard-{i}", f"fb-test-{i}", (Replica("r0", f"127.0.0.1:{19300 + i}"),)) for i in range(n)))


class FakeLog:
    """A shard's log in memory: stores a record once per message id, as JetStream does
    within its duplicate window; ``fail`` makes publishes fail with that error."""

    def __init__(self) -> None:
        self.records: list[tuple[str | None, bytes]] = []
        self.ids: dict[str, int] = {}
        self.publishes = 0
        self.fail: WALError | None = None
        self.fail_sync: WALError | None = None

    def publish_async(self, record: bytes, msg_id: str | None = None) -> concurrent.futures.Future[int]:
        if self.fail_sync is not None:
            raise self.fail_sync
        self.publishes += 1
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self.fail is not None:
            fut.set_exception(self.fail)
        elif msg_id is not None and msg_id in self.ids:
            fut.set_result(self.ids[msg_id])
        else:
            self.records.append((msg_id, record))
            if msg_id is not None:
                self.ids[msg_id] = len(self.records)
            fut.set_result(len(self.records))
        return fut

    def bodies(self) -> list[bytes]:
        """The uncompressed WriteRequest of every stored record."""
        out = []
        for _, rec in self.records:
            now_ms, snappy = decode_record(rec)
            assert now_ms > 0
            out.append(bytes(cramjam.snappy.decompress_raw(snappy).read()))
        return out


def make_handler(n_shards: int = 3, **kw) -> tuple[ShardedWriteHandler, list[FakeLog], CollectorRegistry]:
    """A handler on in-memory logs; protobuf records unless ``record_format`` says otherwise,
    so that tests can compare the parts with the request byte for byte."""
    logs = [FakeLog() for _ in range(n_shards)]
    reg = CollectorRegistry()
    kw.setdefault("now", lambda: NOW_S)
    kw.setdefault("record_format", "protobuf")
    return ShardedWriteHandler(topology(n_shards), logs, registry=reg, **kw), logs, reg


def post(handler: ShardedWriteHandler, protobuf: bytes, *, raw: bytes | None = None, **headers: str):
    h = {"content-type": "application/x-protobuf", "content-encoding": "snappy"}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    body = raw if raw is not None else bytes(cramjam.snappy.compress_raw(protobuf))
    return handler(Request("POST", "/api/v1/write", {}, h, body))


def many_series(n: int = 300, samples: int = 3) -> list:
    return [([("__name__", f"m{i % 7}"), ("instance", f"host-{i}:9100"), ("job", "node")],
             [(T0 + 15_000 * k, float(i * 10 + k)) for k in range(samples)]) for i in range(n)]


def label_field(name: bytes, value: bytes) -> bytes:
    return writerequest._field(1, writerequest._field(1, name) + writerequest._field(2, value))


def raw_series(pairs: list[tuple[bytes, bytes]], samples: list[tuple[int, float]]) -> bytes:
    """A TimeSeries field with label bytes as given (possibly invalid UTF-8)."""
    parts = [label_field(n, v) for n, v in pairs]
    for t, v in samples:
        parts.append(writerequest._field(2, b"\x09" + struct.pack("<d", v) + b"\x10" + writerequest._uvarint(t)))
    return writerequest._field(1, b"".join(parts))


def series_spans(body: bytes) -> dict[bytes, bytes]:
    """Canonical label bytes -> the bytes of its whole TimeSeries field, for every series of ``body``."""
    req = writerequest.decode(body)
    out = {}
    for i in range(req.num_series):
        labels = Labels.from_pairs((n.decode(), v.decode()) for n, v in req.label_pairs(i))
        out[labels.canonical()] = body[req.series[i, S_SPAN_START]:req.series[i, S_SPAN_END]]
    return out


def sample_value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


# ---- spans of the scanner ------------------------------------------------------------------


def test_scanner_spans_are_whole_timeseries_fields():
    r = prompb_ref.WriteRequest()
    for i in range(5):
        ts = r.timeseries.add()
        ts.labels.add(name="__name__", value=f"m{i}")
        ts.samples.add(timestamp=T0 + i, value=i)
        if i == 2:
            ts.exemplars.add(value=3, timestamp=5).labels.add(name="trace_id", value="abc")
        r.metadata.add(type=1, metric_family_name=f"m{i}", help="help")  # interleaved top-level fields
    body = r.SerializeToString()
    req = writerequest.decode(body)
    for i in range(5):
        span = body[req.series[i, S_SPAN_START]:req.series[i, S_SPAN_END]]
        one = prompb_ref.WriteRequest.FromString(span)
        assert list(one.timeseries) == [r.timeseries[i]]


# ---- splitting -----------------------------------------------------------------------------


def test_split_sends_each_shard_exactly_its_series_byte_for_byte():
    h, logs, reg = make_handler(3)
    body = prompb_ref.write_request(many_series(300))
    resp = post(h, body)
    assert resp.status == 204, resp.body
    want = series_spans(body)
    topo = topology(3)
    union: dict[bytes, bytes] = {}
    for k, lg in enumerate(logs):
        assert len(lg.records) == 1
        (part,) = lg.bodies()
        got = series_spans(part)
        assert got, f"shard {k} got no series"
        for key, span in got.items():
            assert topo.shard_index(series_id(key)) == k
            assert span == want[key]  # copied, not re-encoded
        assert part == b"".join(got.values())  # nothing but TimeSeries fields
        assert not union.keys() & got.keys()
        union.update(got)
    assert union == want
    assert sum(sample_value(reg, "flashback_remote_write_shard_samples_total", shard=f"shard-{k}")
               for k in range(3)) == 900
    assert sample_value(reg, "flashback_remote_write_shard_requests_total", shard="shard-0") == 1


def series_id(canonical: bytes) -> int:
    items = [x.decode() for x in canonical.split(b"\xff")[:-1]]
    labels = Labels.from_pairs(zip(items[0::2], items[1::2]))
    assert labels.canonical() == canonical
    return labels.hash()


def test_series_with_unsorted_labels_go_to_the_shard_of_their_canonical_id():
    h, logs, _ = make_handler(4)
    series = [([("job", "a"), ("__name__", f"u{i}"), ("env", "x")], [(T0, 1.0)]) for i in range(40)]
    assert post(h, prompb_ref.write_request(series)).status == 204
    topo = topology(4)
    for k, lg in enumerate(logs):
        for part in lg.bodies():
            req = writerequest.decode(part)
            for i in range(req.num_series):
                labels = Labels.from_pairs((n.decode(), v.decode()) for n, v in req.label_pairs(i))
                assert topo.shard_index(labels.hash()) == k


def test_retry_of_the_same_body_uses_the_same_message_ids_and_is_stored_once():
    clock = [NOW_S]
    h, logs, _ = make_handler(3, now=lambda: clock[0])
    body = prompb_ref.write_request(many_series(100))
    assert post(h, body).status == 204
    first = [[mid for mid, _ in lg.records] for lg in logs]
    clock[0] += 7.5  # a retry comes later: the clock must not be part of the id
    assert post(h, body).status == 204
    assert [[mid for mid, _ in lg.records] for lg in logs] == first
    assert all(lg.publishes == 2 for lg in logs)
    for k, lg in enumerate(logs):
        (mid, rec), = lg.records
        part = bytes(cramjam.snappy.decompress_raw(decode_record(rec)[1]).read())
        assert mid == msg_id(part, f"shard-{k}")
    # One more series changes only its own shard's part; the other parts are the same bytes
    # as before, and storing them once is right: they are the same samples.
    other = prompb_ref.write_request(many_series(101))
    assert post(h, other).status == 204
    assert sorted(len(lg.records) for lg in logs) == [1, 1, 2]


def test_same_part_bytes_on_two_shards_have_different_ids():
    assert msg_id(b"abc", "shard-0") != msg_id(b"abc", "shard-1")
    assert msg_id(b"abc", "shard-0") == msg_id(np.frombuffer(b"abc", np.uint8), "shard-0")


def test_large_parts_are_cut_between_series():
    h, logs, _ = make_handler(2, max_part_bytes=2000)
    body = prompb_ref.write_request(many_series(200, samples=5))
    assert post(h, body).status == 204
    want = series_spans(body)
    union = {}
    for lg in logs:
        assert len(lg.records) > 1
        assert len({mid for mid, _ in lg.records}) == len(lg.records)
        for part in lg.bodies():
            got = series_spans(part)
            assert len(part) <= 2000 or len(got) == 1
            union.update(got)
    assert union == want


@pytest.mark.parametrize("series", [[], [([("__name__", "x")], [])]], ids=["no_series", "no_samples"])
def test_empty_request_is_204(series):
    h, logs, _ = make_handler(3)
    assert post(h, prompb_ref.write_request(series)).status == 204
    assert sum(len(lg.records) for lg in logs) == len(series)


# ---- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["future_fails", "publish_raises"])
def test_one_shard_unavailable_is_503_with_retry_after_and_the_retry_dedups(sync):
    h, logs, reg = make_handler(3, retry_after_s=3)
    err = LogUnavailable("publish to stream fb-test-1: no answer within 5s")
    if sync:
        logs[1].fail_sync = err
    else:
        logs[1].fail = err
    body = prompb_ref.write_request(many_series(90))
    resp = post(h, body)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"
    assert b"shard shard-1" in resp.body and b"no answer within 5s" in resp.body
    assert len(logs[0].records) == len(logs[2].records) == 1 and not logs[1].records
    assert sample_value(reg, "flashback_remote_write_shard_publish_failures_total",
                        shard="shard-1", reason="unavailable") == 1
    # The leader is back; Prometheus retries the same body.
    logs[1].fail = logs[1].fail_sync = None
    assert post(h, body).status == 204
    assert [len(lg.records) for lg in logs] == [1, 1, 1]
    assert set(series_spans(body)) == {k for lg in logs for part in lg.bodies() for k in series_spans(part)}


def test_permanent_log_error_is_503_too():
    h, logs, reg = make_handler(2)
    for lg in logs:
        lg.fail = WALError("record of 2000000 bytes exceeds the NATS max_payload")
    resp = post(h, prompb_ref.write_request(many_series(10)))
    assert resp.status == 503 and b"max_payload" in resp.body
    assert sample_value(reg, "flashback_remote_write_shard_publish_failures_total", shard="shard-0",
                        reason="error") == 1


# ---- validation ----------------------------------------------------------------------------


BAD = [
    ([(b"job", b"x")], "missing_name"),
    ([(b"__name__", b"m"), (b"a", b"1"), (b"a", b"2")], "duplicate_name"),
    ([(b"__name__", b"m"), (b"", b"1")], "empty_name"),
    ([(b"__name__", b"m"), (b"a", b"\xff\xfe")], "invalid_utf8"),
    ([(b"__name__", b"m\xc3"), (b"a", b"1")], "invalid_utf8_name_value"),
    # non-ASCII bytes past the first words of a label (the check reads eight bytes at a time)
    ([(b"__name__", b"m"), (b"a", b"0123456789abcdef\xff")], "invalid_utf8_long_value"),
    ([(b"__name__", b"m"), (b"label_name_long\xc3", b"1")], "invalid_utf8_long_name"),
    ([(b"a", b"1"), (b"__name__", b"")], "empty_metric_name"),
    ([], "no_labels"),
]
GOOD = [
    ([(b"__name__", b"ok"), (b"a", b"1")], "plain"),
    ([(b"b", b"1"), (b"__name__", b"ok2")], "unsorted"),
    ([(b"__name__", b"ok3"), (b"a", b"")], "empty_value_dropped"),
    ([(b"__name__", "ünïcode".encode()), (b"l", "välue".encode())], "utf8"),
    ([(b"A", b"1"), (b"__name__", b"caps")], "name_not_first"),
    ([(b"__name__", b"dotted.name"), (b"a-b", b"1")], "utf8_names"),
    ([(b"__name__", b"ok4"), (b"long", "0123456789abcdefé".encode())], "utf8_long_value"),
]


@pytest.mark.parametrize("name_validation", ["utf8", "legacy"])
def test_invalid_series_are_400_as_the_head_says_and_valid_ones_still_published(name_validation):
    h, logs, reg = make_handler(3, name_validation=name_validation)
    series = [(pairs, [(T0 + j, float(j)) for j in range(i % 3 + 1)]) for i, (pairs, _) in enumerate(BAD + GOOD)]
    body = b"".join(raw_series(p, s) for p, s in series)
    head = Head(HeadOptions(name_validation=name_validation))
    want = head.append(writerequest.decode(body), T0)
    resp = post(h, body)
    assert resp.status == 400
    assert resp.body.decode() == want.message() + "\n"
    # Exactly the series the head accepted were published.
    stored = Head(HeadOptions(name_validation=name_validation))
    published = 0
    for lg in logs:
        for part in lg.bodies():
            res = stored.append(writerequest.decode(part), T0)
            assert not res.rejected
            published += res.appended
    assert published == want.appended
    assert stored.num_series() == head.num_series()
    assert sample_value(reg, "flashback_remote_write_samples_rejected_total", reason="invalid_labels") == \
        want.rejected["invalid_labels"][0]


@pytest.mark.parametrize("pairs", [p for p, _ in GOOD], ids=[i for _, i in GOOD])
def test_valid_series_alone_is_204(pairs):
    h, logs, _ = make_handler(2)
    assert post(h, raw_series(pairs, [(T0, 1.0)])).status == 204
    assert sum(len(lg.records) for lg in logs) == 1


@pytest.mark.parametrize("pairs", [p for p, _ in BAD], ids=[i for _, i in BAD])
def test_invalid_series_alone_is_400_and_nothing_published(pairs):
    h, logs, _ = make_handler(2)
    resp = post(h, raw_series(pairs, [(T0, 1.0)]))
    assert resp.status == 400 and resp.body.startswith(b"invalid labels: 1 sample(s) rejected")
    assert all(not lg.records for lg in logs)


@pytest.mark.parametrize("pairs, ok", [
    ([(b"__name__", b"ns:metric_1"), (b"job", b"x")], True),
    ([(b"__name__", b"a.b")], False),
    ([(b"__name__", b"1a")], False),
    ([(b"__name__", b"m"), (b"la-bel", b"x")], False),
    ([(b"__name__", b"m"), (b"l:b", b"x")], False),
    ([(b"__name__", b"m"), (b"_9", b"x")], True),
], ids=["colon_in_metric", "dot_in_metric", "digit_first", "dash_in_name", "colon_in_name", "underscore_digit"])
def test_legacy_name_validation(pairs, ok):
    h, _, _ = make_handler(1, name_validation="legacy")
    head = Head(HeadOptions(name_validation="legacy"))
    body = raw_series(pairs, [(T0, 1.0)])
    assert (not head.append(writerequest.decode(body), T0).rejected) == ok
    assert post(h, body).status == (204 if ok else 400)


def _float_and_histogram_request() -> bytes:
    """One series ``h`` with a float sample and a native histogram at T0."""
    r = prompb_ref.WriteRequest()
    ts = r.timeseries.add()
    ts.labels.add(name="__name__", value="h")
    ts.samples.add(timestamp=T0, value=1.5)
    ts.histograms.add(timestamp=T0)
    return r.SerializeToString()


def test_native_histograms_are_400_but_the_series_floats_are_published():
    h, logs, _ = make_handler(2)
    body = _float_and_histogram_request()
    resp = post(h, body)
    want = Head().append(writerequest.decode(body), T0)
    assert resp.status == 400 and resp.body.decode() == want.message() + "\n"
    assert sum(len(lg.records) for lg in logs) == 1


# ---- HTTP contract shared with the single node ---------------------------------------------


@pytest.mark.parametrize("headers", [
    {"content_type": "application/json"},
    {"content_type": "application/x-protobuf;proto=io.prometheus.write.v2.Request"},
    {"content_encoding": "gzip"},
], ids=["json", "remote_write_2", "gzip"])
def test_unsupported_content_is_415(headers):
    h, logs, _ = make_handler(2)
    resp = post(h, prompb_ref.write_request(many_series(3)), **headers)
    assert resp.status == 415
    assert all(not lg.records for lg in logs)


def test_decoded_size_limit_is_413():
    h, logs, _ = make_handler(2, max_decoded_bytes=1000)
    resp = post(h, prompb_ref.write_request(many_series(50)))
    assert resp.status == 413 and b"exceeds the limit of 1000 bytes" in resp.body


@pytest.mark.parametrize("raw, text", [
    (b"\x10not snappy at all", b"snappy:"),
    (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"snappy: corrupt input"),
    (bytes(cramjam.snappy.compress_raw(b"\x0a\xff")), b"invalid protobuf WriteRequest"),
], ids=["bad_snappy", "bad_length", "bad_protobuf"])
def test_undecodable_bodies_are_400(raw, text):
    h, logs, _ = make_handler(2)
    resp = post(h, b"", raw=raw)
    assert resp.status == 400 and resp.body.startswith(text), resp.body
    assert all(not lg.records for lg in logs)


def test_route_limits_the_body_size():
    h, _, _ = make_handler(2, max_body_bytes=4096)
    router = Router()
    h.route(router)
    route, _ = router.match("/api/v1/write")
    assert route.handler is h and route.max_body == 4096 and route.methods == {"POST"}


def test_logs_must_match_the_shards():
    with pytest.raises(ValueError):
        ShardedWriteHandler(topology(3), [FakeLog()])


# ---- against a real NATS JetStream cluster -------------------------------------------------


def test_publishes_to_replicated_streams_and_a_retry_is_stored_once(nats_cluster):
    from store.natslog import NatsConsumer, NatsLog

    topo = Topology(tuple(nats_cluster.urls), tuple(
        Shard(f"shard-{i}", f"fb-sw-{i}", (Replica("r0", f"127.0.0.1:{19300 + i}"),)) for i in range(3)))
    logs = [NatsLog(list(topo.nats), s.stream, replicas=3, timeout_s=10) for s in topo.shards]
    try:
        h = ShardedWriteHandler(topo, logs, registry=CollectorRegistry(), record_format="protobuf")
        body = prompb_ref.write_request(many_series(200))
        other = prompb_ref.write_request(many_series(5, samples=1))
        for b in (body, body, other):  # the second: Prometheus' retry after a lost answer
            resp = post(h, b)
            assert resp.status == 204, resp.body
        want = series_spans(body)
        got: dict[bytes, bytes] = {}
        for k, (shard, lg) in enumerate(zip(topo.shards, logs)):
            state = lg.state()
            assert state.replicas == 3, state
            records = []
            c = NatsConsumer(list(topo.nats), shard.stream, "r0", 1)
            try:
                deadline = time.monotonic() + 60
                while c.next_seq <= state.last_seq:
                    assert time.monotonic() < deadline, f"stream {shard.stream} stuck at {c.next_seq}"
                    try:
                        records += c.fetch(100, 1.0)
                    except LogUnavailable:  # a consumer right after the streams' elections: retried
                        time.sleep(0.2)
            finally:
                c.close()
            assert [s for s, _ in records] == list(range(1, state.last_seq + 1))
            # One record for the first body (its retry was a duplicate), at most one for the other.
            assert state.last_seq in (1, 2), state
            first = bytes(cramjam.snappy.decompress_raw(decode_record(records[0][1])[1]).read())
            for key, span in series_spans(first).items():
                assert topo.shard_index(series_id(key)) == k
                got[key] = span
        assert got == want
    finally:
        for lg in logs:
            lg.close()


# ---- columns records (the default) -----------------------------------------------------------


def apply_records(head: Head, records) -> list:
    """Appends log records of either format as a head replica does; returns the rejections."""
    out = []
    for rec in records:
        if shardrecord.is_columns(rec):
            now_ms, req = shardrecord.decode_record(rec)
        else:
            now_ms, snappy = decode_record(rec)
            req = writerequest.decode(bytes(cramjam.snappy.decompress_raw(snappy).read()))
        r = head.append(req, now_ms)
        out.append((r.appended, dict(r.rejected)))
    return out


def head_dump(head: Head) -> list:
    from store.matchers import Matcher, MatchType

    out = []
    for s in head.select([Matcher(MatchType.RE, "__name__", ".+")], -(2**63), 2**63 - 1):
        ts, vs = s.samples()
        out.append((tuple(s.labels), ts.tolist(), np.asarray(vs, dtype=np.float64).view(np.uint64).tolist(),
                    [(c.mint, c.maxt, bytes(c.data)) for c in s.chunks()]))
    return sorted(out)


def mixed_requests() -> list[bytes]:
    """Requests whose samples a head accepts and rejects in every way the data allows: several
    samples per series, out of order, duplicate timestamps with other values, NaN and stale
    markers, non-ASCII label values, labels the adapter rejects, series without samples."""
    stale = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
    reqs = []
    for k in range(6):
        series = [([("__name__", f"m{i % 5}"), ("instance", f"h{i}"), ("zone", "zürich" if i % 3 else "a")],
                   [(T0 + 15_000 * (k - 2 if k == 4 else k) + j * 1000, float(i + k) if j else float("nan"))
                    for j in range(1 + i % 3)]) for i in range(120)]
        series.append(([("__name__", "stale")], [(T0 + 15_000 * k, stale)]))
        series.append(([("__name__", "empty")], []))
        reqs.append(prompb_ref.write_request(series))
    bad = raw_series([(b"__name__", b"bad"), (b"l", b"\xff\xfe")], [(T0, 1.0)])  # invalid UTF-8: 400
    reqs.append(bad + prompb_ref.write_request([([("__name__", "ok")], [(T0, 2.0)])]))
    return reqs


def test_columns_records_append_exactly_as_the_protobuf_parts():
    hc, cols, _ = make_handler(3, record_format="columns")
    hp, pbs, _ = make_handler(3, record_format="protobuf")
    statuses = []
    for body in mixed_requests():
        a, b = post(hc, body), post(hp, body)
        assert (a.status, a.body) == (b.status, b.body)
        statuses.append(a.status)
    assert statuses == [204] * 6 + [400]
    for c, p in zip(cols, pbs):
        assert c.records and all(shardrecord.is_columns(rec) for _, rec in c.records)
        assert not any(shardrecord.is_columns(rec) for _, rec in p.records)
        hc_, hp_ = Head(), Head()
        rc, rp = apply_records(hc_, [rec for _, rec in c.records]), apply_records(hp_, [rec for _, rec in p.records])
        assert rc == rp and any(r for _, r in rc)  # the same rejections, and there are some
        assert head_dump(hc_) == head_dump(hp_) and head_dump(hc_)


def test_columns_blocks_are_the_reference_encoding_of_each_shards_series():
    h, logs, _ = make_handler(3, record_format="columns")
    body = prompb_ref.write_request([([("__name__", f"m{i % 7}"), ("i", str(i)), ("job", "j")],
                                      [(T0 + 1000 * j, float(i * j)) for j in range(i % 4)]) for i in range(300)])
    assert post(h, body).status == 204
    req = writerequest.decode(body)
    for k, lg in enumerate(logs):
        (mid, rec), = lg.records
        assert shardrecord.is_columns(rec)
        mine = np.flatnonzero([topology(3).shard_index(series_id(req.key(i))) == k for i in range(req.num_series)])
        expected = shardrecord.encode_series(req, mine)  # the series of shard k, in request order
        assert bytes(cramjam.snappy.decompress_raw(rec[9:]).read()) == expected
        assert mid == msg_id(expected, f"shard-{k}")


def test_columns_records_are_smaller_than_max_part_bytes_and_retries_keep_their_ids():
    clock = [NOW_S]
    h, logs, _ = make_handler(2, record_format="columns", max_part_bytes=3000, now=lambda: clock[0])
    body = prompb_ref.write_request(many_series(200, samples=5))
    assert post(h, body).status == 204
    first = [[mid for mid, _ in lg.records] for lg in logs]
    keys = set()
    for k, lg in enumerate(logs):
        assert len(lg.records) > 1
        for mid, rec in lg.records:
            block = bytes(cramjam.snappy.decompress_raw(rec[9:]).read())
            assert len(block) <= 3000 and mid == msg_id(block, f"shard-{k}")
            _, req = shardrecord.decode_record(rec)
            for i in range(req.num_series):
                keys.add(req.key(i))
                assert topology(2).shard_index(series_id(req.key(i))) == k
    assert keys == set(series_spans(body))
    clock[0] += 7.5  # Prometheus' retry, later: the same ids, stored once
    assert post(h, body).status == 204
    assert [[mid for mid, _ in lg.records] for lg in logs] == first


@pytest.mark.parametrize("unsorted", [True, False], ids=["unsorted_labels", "native_histograms"])
def test_requests_the_columns_cannot_carry_go_as_protobuf(unsorted):
    h, logs, _ = make_handler(2, record_format="columns")
    if unsorted:
        body = prompb_ref.write_request([([("job", "a"), ("__name__", "u")], [(T0, 1.0)])])
    else:
        body = _float_and_histogram_request()
    post(h, body)
    records = [rec for lg in logs for _, rec in lg.records]
    assert len(records) == 1 and not shardrecord.is_columns(records[0])
