"""Remote read: the hand-written codec against Google's protobuf runtime, the handler against a fake
querier, and end to end against the real Prometheus 2.42 as client and as reference server."""

from __future__ import annotations

import math
import os
import struct
import time
from typing import Iterator

import cramjam
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from prometheus_client import CollectorRegistry

from adapter import prompb
from adapter.remote_read import RemoteReadHandler, trim_chunks
from store import xor as xor_ref
from store.chunks import Chunk
from store.errors import CorruptChunk, DecodeError
from store.httpserver import HTTPServer, Request, Router
from store.labels import Labels
from store.storage import SelectHints
from tests import prompb_ref
from tests.e2e.harness import PROMETHEUS, Prometheus, get_json, remote_write, request, wait_until

try:
    from store.xorfast import encode as xor_encode
except ImportError:  # pragma: no cover - the numba codec is the one the head uses
    xor_encode = xor_ref.encode

STALE = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
NAN_PAYLOAD = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000123))[0]
SAMPLES, STREAMED = 0, 1

# --- an independent implementation: Google's protobuf runtime with prompb's remote.proto -------

F = descriptor_pb2.FieldDescriptorProto


def _pool() -> descriptor_pool.DescriptorPool:
    fd = descriptor_pb2.FileDescriptorProto(name="flashback_test_remote_read.proto", package="prometheus",
                                            syntax="proto3")
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def msg(name, *fields, enums=()):
        m = fd.message_type.add(name=name)
        for e_name, values in enums:
            e = m.enum_type.add(name=e_name)
            for number, v in values:
                e.value.add(name=v, number=number)
        for number, fname, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    msg("Label", (1, "name", F.TYPE_STRING, opt, None), (2, "value", F.TYPE_STRING, opt, None))
    msg("Sample", (1, "value", F.TYPE_DOUBLE, opt, None), (2, "timestamp", F.TYPE_INT64, opt, None))
    msg("TimeSeries", (1, "labels", F.TYPE_MESSAGE, rep, ".prometheus.Label"),
        (2, "samples", F.TYPE_MESSAGE, rep, ".prometheus.Sample"))
    msg("LabelMatcher", (1, "type", F.TYPE_INT32, opt, None), (2, "name", F.TYPE_STRING, opt, None),
        (3, "value", F.TYPE_STRING, opt, None))
    msg("ReadHints", (1, "step_ms", F.TYPE_INT64, opt, None), (2, "func", F.TYPE_STRING, opt, None),
        (3, "start_ms", F.TYPE_INT64, opt, None), (4, "end_ms", F.TYPE_INT64, opt, None),
        (5, "grouping", F.TYPE_STRING, rep, None), (6, "by", F.TYPE_BOOL, opt, None),
        (7, "range_ms", F.TYPE_INT64, opt, None))
    msg("Query", (1, "start_timestamp_ms", F.TYPE_INT64, opt, None), (2, "end_timestamp_ms", F.TYPE_INT64, opt, None),
        (3, "matchers", F.TYPE_MESSAGE, rep, ".prometheus.LabelMatcher"),
        (4, "hints", F.TYPE_MESSAGE, opt, ".prometheus.ReadHints"))
    # accepted_response_types as int32: the same varints as the enum, and unknown numbers stay visible.
    msg("ReadRequest", (1, "queries", F.TYPE_MESSAGE, rep, ".prometheus.Query"),
        (2, "accepted_response_types", F.TYPE_INT32, rep, None))
    msg("QueryResult", (1, "timeseries", F.TYPE_MESSAGE, rep, ".prometheus.TimeSeries"))
    msg("ReadResponse", (1, "results", F.TYPE_MESSAGE, rep, ".prometheus.QueryResult"))
    msg("Chunk", (1, "min_time_ms", F.TYPE_INT64, opt, None), (2, "max_time_ms", F.TYPE_INT64, opt, None),
        (3, "type", F.TYPE_INT32, opt, None), (4, "data", F.TYPE_BYTES, opt, None))
    msg("ChunkedSeries", (1, "labels", F.TYPE_MESSAGE, rep, ".prometheus.Label"),
        (2, "chunks", F.TYPE_MESSAGE, rep, ".prometheus.Chunk"))
    msg("ChunkedReadResponse", (1, "chunked_series", F.TYPE_MESSAGE, rep, ".prometheus.ChunkedSeries"),
        (2, "query_index", F.TYPE_INT64, opt, None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return pool


_POOL = _pool()


def _cls(name):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"prometheus.{name}"))


PbReadRequest = _cls("ReadRequest")
PbReadResponse = _cls("ReadResponse")
PbChunkedReadResponse = _cls("ChunkedReadResponse")
PbLabel = _cls("Label")
PbChunk = _cls("Chunk")


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time, straight from the polynomial."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def read_request(queries, accepted=(), packed=True) -> bytes:
    """``queries``: (start, end, [(type, name, value)], hints dict or None)."""
    req = PbReadRequest()
    for start, end, matchers, hints in queries:
        q = req.queries.add(start_timestamp_ms=start, end_timestamp_ms=end)
        for t, n, v in matchers:
            q.matchers.add(type=t, name=n, value=v)
        if hints is not None:
            q.hints.CopyFrom(_cls("ReadHints")(**hints))
    data = req.SerializeToString()
    if accepted:
        if packed:
            data += b"\x12" + prompb.uvarint(len(b"".join(prompb.uvarint(t) for t in accepted))) + \
                b"".join(prompb.uvarint(t) for t in accepted)
        else:
            data += b"".join(b"\x10" + prompb.uvarint(t) for t in accepted)
    return data


def parse_frames(body: bytes) -> list[tuple[int, bytes]]:
    """Frames of a streamed response as (crc in the frame, message); checks each CRC independently."""
    out, pos = [], 0
    while pos < len(body):
        n = shift = 0
        while True:
            b = body[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        crc = struct.unpack(">I", body[pos:pos + 4])[0]
        msg = body[pos + 4:pos + 4 + n]
        assert len(msg) == n, "truncated frame"
        assert crc == crc32c_bitwise(msg), "frame CRC mismatch"
        out.append((crc, msg))
        pos += 4 + n
    return out


def streamed(body: bytes) -> list:
    return [PbChunkedReadResponse.FromString(m) for _, m in parse_frames(body)]


# --- a fake querier holding samples and the chunks they are stored in ------------------------------


class FakeSeries:
    def __init__(self, labels: Labels, ts: np.ndarray, vals: np.ndarray, chunks: list[Chunk]) -> None:
        self.labels = labels
        self._ts, self._vals, self._chunks = ts, vals, chunks

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ts, self._vals

    def chunks(self) -> Iterator[Chunk]:
        return iter(self._chunks)


class FakeQuerier:
    """Series in memory; ``select`` clips samples to ``[mint, maxt]`` and returns every stored chunk."""

    def __init__(self) -> None:
        self.series: dict[Labels, tuple[np.ndarray, np.ndarray, list[Chunk]]] = {}
        self.selects: list[tuple[list, int, int, SelectHints | None]] = []
        self.fail: Exception | None = None

    def add(self, labels: dict[str, str], ts, vals, chunks: list[Chunk] | None = None) -> Labels:
        lb = Labels.from_dict(labels)
        ts = np.asarray(ts, dtype=np.int64)
        vals = np.asarray(vals, dtype=np.float64)
        if chunks is None:
            chunks = [Chunk(int(ts[i]), int(ts[min(i + 120, len(ts)) - 1]), xor_encode(ts[i:i + 120], vals[i:i + 120]))
                      for i in range(0, len(ts), 120)]
        self.series[lb] = (ts, vals, chunks)
        return lb

    def select(self, matchers, mint, maxt, hints=None):
        self.selects.append((list(matchers), mint, maxt, hints))
        if self.fail is not None:
            raise self.fail
        out = []
        for lb in sorted(self.series):
            if not all(m.matches(lb.get(m.name)) for m in matchers):
                continue
            ts, vals, chunks = self.series[lb]
            keep = (ts >= mint) & (ts <= maxt)
            if keep.any():
                out.append(FakeSeries(lb, ts[keep], vals[keep], chunks))
        return out

    def label_names(self, matchers, mint, maxt):
        raise NotImplementedError

    def label_values(self, name, matchers, mint, maxt):
        raise NotImplementedError


def _post(handler, data: bytes, compress: bool = True):
    body = bytes(cramjam.snappy.compress_raw(data)) if compress else data
    resp = handler(Request("POST", "/api/v1/read", {}, {"content-encoding": "snappy"}, body))
    if not isinstance(resp.body, (bytes, bytearray)):
        resp.body = b"".join(resp.body)
    return resp


def _samples_result(resp) -> list[dict]:
    """Per query: {labels tuple: [(t, value bits)]}."""
    assert resp.status == 200, resp.body
    assert resp.content_type == "application/x-protobuf"
    assert resp.headers.get("Content-Encoding") == "snappy"
    msg = PbReadResponse.FromString(bytes(cramjam.snappy.decompress_raw(resp.body)))
    return [{tuple((lb.name, lb.value) for lb in ts.labels):
             [(s.timestamp, struct.pack("<d", s.value)) for s in ts.samples] for ts in qr.timeseries}
            for qr in msg.results]


def _expected(q: FakeQuerier, names: list[Labels], mint: int, maxt: int) -> dict:
    out = {}
    for lb in names:
        ts, vals, _ = q.series[lb]
        keep = (ts >= mint) & (ts <= maxt)
        out[tuple(lb)] = [(int(t), struct.pack("<d", v)) for t, v in zip(ts[keep], vals[keep])]
    return out


@pytest.fixture
def data():
    q = FakeQuerier()
    odd = [0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, NAN_PAYLOAD, STALE, 5e-324, 1.7976931348623157e308]
    a = q.add({"__name__": "up", "job": "api", "instance": "a:1"}, np.arange(0, 300) * 15000 - 15000 * 5,
              [odd[i % len(odd)] for i in range(300)])
    b = q.add({"__name__": "up", "job": "db", "instance": "b:1"}, np.arange(0, 50) * 60000 + 7, np.arange(50) * 0.5)
    c = q.add({"__name__": "temp", "job": "api", "room": "ü 1"}, [1000, 2000, 3000], [20.5, 21.0, 21.5])
    return q, {"a": a, "b": b, "c": c}


# --- codec ---------------------------------------------------------------------------------------


def test_crc32c_known_vector_and_independent_implementation():
    assert prompb.crc32c(b"123456789") == 0xE3069283
    assert prompb.crc32c(b"") == 0
    rng = np.random.default_rng(1)
    for n in (1, 7, 8, 9, 63, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert prompb.crc32c(data) == crc32c_bitwise(data), n


@pytest.mark.parametrize("packed", [True, False], ids=["packed-types", "unpacked-types"])
def test_decode_hand_built_read_request(packed):
    hints = {"step_ms": 15000, "func": "rate", "start_ms": -5, "end_ms": 99, "grouping": ["job", "ü"],
             "by": True, "range_ms": 300000}
    data = read_request([
        (-1000, 1 << 45, [(0, "__name__", "up"), (1, "job", ""), (2, "instance", "a.*"), (3, "x", "y|z")], hints),
        (0, 0, [], None),
    ], accepted=(1, 0, 7), packed=packed)
    req = prompb.decode_read_request(data)
    assert req.accepted_response_types == (1, 0, 7)
    q0, q1 = req.queries
    assert (q0.start_timestamp_ms, q0.end_timestamp_ms) == (-1000, 1 << 45)
    assert q0.matchers == (prompb.LabelMatcher(0, "__name__", "up"), prompb.LabelMatcher(1, "job", ""),
                           prompb.LabelMatcher(2, "instance", "a.*"), prompb.LabelMatcher(3, "x", "y|z"))
    assert q0.hints == prompb.ReadHints(step_ms=15000, func="rate", start_ms=-5, end_ms=99, grouping=("job", "ü"),
                                        by=True, range_ms=300000)
    assert q1 == prompb.Query(0, 0, (), None)


def test_encode_read_request_parses_with_google_protobuf():
    req = prompb.ReadRequest(
        (prompb.Query(-7, 10**12, (prompb.LabelMatcher(3, "a", "b"), prompb.LabelMatcher(0, "c", "")),
                      prompb.ReadHints(step_ms=1, func="sum", grouping=("x",), by=True, range_ms=-2)),),
        (1, 0))
    msg = PbReadRequest.FromString(prompb.encode_read_request(req))
    assert list(msg.accepted_response_types) == [1, 0]
    q = msg.queries[0]
    assert (q.start_timestamp_ms, q.end_timestamp_ms) == (-7, 10**12)
    assert [(m.type, m.name, m.value) for m in q.matchers] == [(3, "a", "b"), (0, "c", "")]
    h = q.hints
    assert (h.step_ms, h.func, list(h.grouping), h.by, h.range_ms) == (1, "sum", ["x"], True, -2)
    assert prompb.decode_read_request(prompb.encode_read_request(req)) == req


def test_unknown_fields_are_skipped():
    data = read_request([(1, 2, [(0, "a", "b")], None)])
    extra = b"\x19" + b"\x00" * 8 + b"\x25" + b"\x00" * 4 + b"\x58\x05" + b"\x62\x03abc"  # fields 3, 4, 11, 12
    req = prompb.decode_read_request(extra + data + extra)
    assert req.queries == (prompb.Query(1, 2, (prompb.LabelMatcher(0, "a", "b"),), None),)


@pytest.mark.parametrize("data", [
    pytest.param(b"\x0a\xff", id="length-past-end"),
    pytest.param(b"\x0a\x02\x08", id="truncated-nested"),
    pytest.param(b"\x08\x01", id="wrong-wire-type"),
    pytest.param(b"\x0a\x02\x08\xff", id="truncated-varint"),
    pytest.param(b"\x0a\x0b\x08" + b"\xff" * 10, id="varint-overflow"),
    pytest.param(b"\x0b", id="group"),
    pytest.param(b"\x0a\x04\x1a\x02", id="cut-matcher"),
    pytest.param(b"\x0a\x05\x1a\x03\x12\x01\xff", id="invalid-utf8"),
])
def test_decode_rejects_malformed(data):
    with pytest.raises(DecodeError):
        prompb.decode_read_request(data)


def test_samples_encoding_matches_google_protobuf():
    rng = np.random.default_rng(7)
    ts = np.concatenate([[0, -1, 1, 127, 128, -(1 << 63), (1 << 63) - 1], rng.integers(-(1 << 62), 1 << 62, 200)])
    vals = np.concatenate([[0.0, -0.0, math.nan, NAN_PAYLOAD, STALE, math.inf, 1.0], rng.normal(size=200)])
    body = prompb.encode_timeseries(Labels.from_dict({"__name__": "x", "a": "b"}), ts, vals)
    msg = _cls("TimeSeries").FromString(body)
    assert [(lb.name, lb.value) for lb in msg.labels] == [("__name__", "x"), ("a", "b")]
    assert [s.timestamp for s in msg.samples] == ts.tolist()
    assert [struct.pack("<d", s.value) for s in msg.samples] == [struct.pack("<d", v) for v in vals]
    # Byte for byte too, except for -0.0, which Google's runtime drops like any zero and we keep.
    keep = vals.view(np.uint64) != np.float64(-0.0).view(np.uint64)
    ref = _cls("TimeSeries")()
    for t, v in zip(ts[keep].tolist(), vals[keep].tolist()):
        ref.samples.add(timestamp=t, value=v)
    assert prompb.encode_samples(ts[keep], vals[keep]) == ref.SerializeToString()


def test_frame_layout():
    f = prompb.frame(b"x" * 300)
    assert f[:2] == b"\xac\x02" and struct.unpack(">I", f[2:6])[0] == crc32c_bitwise(b"x" * 300) and f[6:] == b"x" * 300


# --- handler: SAMPLES ------------------------------------------------------------------------------


def test_samples_response_all_series(data):
    q, s = data
    h = RemoteReadHandler(lambda: q)
    resp = _post(h, read_request([(-10**6, 10**9, [(2, "__name__", ".+")], None)]))
    assert _samples_result(resp) == [_expected(q, [s["c"], s["a"], s["b"]], -10**6, 10**9)]


def test_multiple_queries_clip_to_each_range(data):
    q, s = data
    h = RemoteReadHandler(lambda: q)
    resp = _post(h, read_request([
        (0, 60000, [(0, "__name__", "up")], None),
        (2000, 2500, [(0, "job", "api")], None),
        (10**9, 2 * 10**9, [(0, "__name__", "up")], None),
    ]))
    got = _samples_result(resp)
    assert got == [_expected(q, [s["a"], s["b"]], 0, 60000), _expected(q, [s["c"]], 2000, 2500), {}]
    assert [(sel[1], sel[2]) for sel in q.selects] == [(0, 60000), (2000, 2500), (10**9, 2 * 10**9)]


@pytest.mark.parametrize("matchers,want", [
    ([(0, "job", "api")], ["a", "c"]),
    ([(1, "job", "api")], ["b"]),
    ([(2, "instance", "[ab]:1")], ["a", "b"]),
    ([(2, "instance", "a")], []),  # anchored
    ([(3, "instance", "a:.*")], ["b", "c"]),  # a missing label matches as ""
    ([(0, "__name__", "up"), (3, "job", "db|web")], ["a"]),
    ([(0, "room", "ü 1")], ["c"]),
], ids=["eq", "neq", "re", "re-anchored", "nre-missing-label", "eq-and-nre", "utf8"])
def test_label_matcher_types(data, matchers, want):
    q, s = data
    h = RemoteReadHandler(lambda: q)
    got = _samples_result(_post(h, read_request([(-10**6, 10**9, matchers, None)])))[0]
    assert set(got) == {tuple(s[k]) for k in want}


def test_hints_passed_on_and_do_not_change_results(data):
    q, _ = data
    h = RemoteReadHandler(lambda: q)
    m = [(0, "__name__", "up")]
    plain = _post(h, read_request([(0, 10**7, m, None)]))
    hinted = _post(h, read_request([(0, 10**7, m, {"step_ms": 15000, "func": "rate", "start_ms": 1, "end_ms": 2,
                                                   "grouping": ["job"], "by": True, "range_ms": 60000})]))
    assert _samples_result(plain) == _samples_result(hinted)
    assert q.selects[0][3] is None
    assert q.selects[1][3] == SelectHints(start=1, end=2, step=15000, range=60000, func="rate")


def test_sample_limit(data):
    q, s = data
    total = sum(len(v) for v in _expected(q, [s["a"], s["b"]], 0, 10**9).values())
    req = read_request([(0, 10**9, [(0, "__name__", "up")], None)])
    assert _post(RemoteReadHandler(lambda: q, max_samples_per_query=total), req).status == 200
    resp = _post(RemoteReadHandler(lambda: q, max_samples_per_query=total - 1), req)
    assert resp.status == 400 and resp.body == f"exceeded sample limit ({total - 1})\n".encode()
    # The limit is per query, as in Prometheus.
    two = read_request([(0, 10**9, [(0, "__name__", "up")], None)] * 2)
    assert _post(RemoteReadHandler(lambda: q, max_samples_per_query=total), two).status == 200
    # The streamed response has no sample limit in Prometheus.
    streamed_req = read_request([(0, 10**9, [(0, "__name__", "up")], None)], accepted=(STREAMED,))
    assert _post(RemoteReadHandler(lambda: q, max_samples_per_query=1), streamed_req).status == 200


# --- negotiation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("accepted,want", [
    ((), "samples"),
    ((SAMPLES,), "samples"),
    ((STREAMED,), "streamed"),
    ((STREAMED, SAMPLES), "streamed"),
    ((SAMPLES, STREAMED), "samples"),
    ((9, STREAMED, SAMPLES), "streamed"),
    ((9,), 400),
], ids=["empty", "samples", "streamed", "streamed-first", "samples-first", "unknown-then-streamed", "only-unknown"])
def test_negotiation(data, accepted, want):
    q, _ = data
    resp = _post(RemoteReadHandler(lambda: q), read_request([(0, 10**6, [(0, "job", "api")], None)], accepted=accepted))
    if want == 400:
        assert resp.status == 400 and b"does not support any of the requested response types" in resp.body
    elif want == "samples":
        assert resp.content_type == "application/x-protobuf"
        _samples_result(resp)
    else:
        assert resp.status == 200
        assert resp.content_type == "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"
        assert streamed(resp.body)


# --- handler: STREAMED_XOR_CHUNKS ---------------------------------------------------------------------


def test_streamed_chunks_and_query_index(data):
    q, s = data
    h = RemoteReadHandler(lambda: q)
    # Query 0 overlaps only the second and third chunk of series a ([1725000, 3510000] and later).
    resp = _post(h, read_request([
        (1725000 + 100, 1800000, [(0, "job", "api"), (0, "__name__", "up")], None),
        (-10**6, 10**9, [(2, "__name__", "up|temp")], None),
    ], accepted=(STREAMED,)))
    assert resp.status == 200
    msgs = streamed(resp.body)
    got = [(m.query_index, [(lb.name, lb.value) for lb in cs.labels],
            [(c.min_time_ms, c.max_time_ms, c.type, c.data) for c in cs.chunks])
           for m in msgs for cs in m.chunked_series]
    assert all(len(m.chunked_series) == 1 for m in msgs)

    def chunks(lb):
        return [(c.mint, c.maxt, 1, c.data) for c in q.series[lb][2]]

    a, b, c = s["a"], s["b"], s["c"]
    # The one chunk of a reaching outside query 0 is cut to the samples inside, as Prometheus' TSDB does.
    ts, vals, _ = q.series[a]
    inside = (ts >= 1725100) & (ts <= 1800000)
    cut = (1740000, 1800000, 1, xor_ref.encode(ts[inside].tolist(), vals[inside].tolist()))
    assert inside.sum() == 5
    assert got == [
        (0, list(a), [cut]),
        (1, list(c), chunks(c)),
        (1, list(a), chunks(a)),
        (1, list(b), chunks(b)),
    ]
    assert len(got[2][2]) == 3
    # The chunks carry the stored samples, read back with the reference decoder.
    ts, vals, _ = q.series[a]
    dec = [xor_ref.decode_bits(ch[3]) for ch in got[2][2]]
    assert sum((d[0] for d in dec), []) == ts.tolist()
    assert sum((d[1] for d in dec), []) == vals.view(np.uint64).tolist()


@pytest.mark.parametrize("max_bytes", [1, 150, 400, 1 << 20], ids=["1B", "150B", "400B", "1MiB"])
def test_streamed_frames_cut_like_prometheus(data, max_bytes):
    q, s = data
    lb = q.add({"__name__": "long", "k": "v"}, np.arange(1000) * 1000, np.sin(np.arange(1000)))
    resp = _post(RemoteReadHandler(lambda: q, max_bytes_in_frame=max_bytes),
                 read_request([(0, 10**9, [(0, "__name__", "long")], None)], accepted=(STREAMED,)))
    msgs = streamed(resp.body)
    # The rule of Prometheus' StreamChunkedReadResponses, with sizes from Google's runtime.
    stored = q.series[lb][2]
    budget = max_bytes - sum(PbLabel(name=n, value=v).ByteSize() for n, v in lb)
    want, cur, left = [], [], budget
    for i, c in enumerate(stored):
        cur.append(c.data)
        left -= PbChunk(min_time_ms=c.mint, max_time_ms=c.maxt, type=1, data=c.data).ByteSize()
        if left > 0 and i + 1 < len(stored):
            continue
        want.append(cur)
        cur, left = [], budget
    assert [[c.data for c in m.chunked_series[0].chunks] for m in msgs] == want
    assert all([(x.name, x.value) for x in m.chunked_series[0].labels] == list(lb) for m in msgs)
    if max_bytes == 1:
        assert len(msgs) == len(stored)
    if max_bytes == 1 << 20:
        assert len(msgs) == 1


def test_streamed_empty_selection_is_empty_body(data):
    q, _ = data
    req = read_request([(0, 10, [(0, "job", "none")], None)], accepted=(STREAMED,))
    resp = _post(RemoteReadHandler(lambda: q), req)
    assert resp.status == 200 and resp.body == b""


def test_trim_chunks_edges():
    ts = np.array([10, 20, 30, 40, 50], dtype=np.int64)
    vals = np.array([1.0, NAN_PAYLOAD, 3.0, STALE, 5.0])
    whole = Chunk(10, 50, xor_encode(ts, vals))
    other = Chunk(60, 70, b"not decoded when inside", 7)
    got = list(trim_chunks([whole, other], 20, 70))
    assert got[1] is other
    assert got[0] == Chunk(20, 50, xor_ref.encode([20, 30, 40, 50], vals[1:].tolist()))
    assert list(trim_chunks([whole], 0, 100)) == [whole]
    assert list(trim_chunks([whole], 21, 29)) == []  # overlaps, but no sample inside
    assert list(trim_chunks([whole], 51, 60)) == []
    assert list(trim_chunks([whole], 30, 30)) == [Chunk(30, 30, xor_ref.encode([30], [3.0]))]


@pytest.mark.parametrize("seed", range(5))
def test_both_response_types_carry_the_same_samples(data, seed):
    q, _ = data
    rng = np.random.default_rng(seed)
    lo, hi = sorted(rng.integers(-100000, 4_500_000, 2).tolist())
    req = [(lo, hi, [(2, "__name__", ".+")], None)]
    (samples,) = _samples_result(_post(RemoteReadHandler(lambda: q), read_request(req)))
    chunked: dict = {}
    resp = _post(RemoteReadHandler(lambda: q, max_bytes_in_frame=100), read_request(req, accepted=(STREAMED,)))
    for m in streamed(resp.body):
        cs = m.chunked_series[0]
        for c in cs.chunks:
            t, vb = xor_ref.decode_bits(c.data)
            assert (c.min_time_ms, c.max_time_ms) == (t[0], t[-1])
            chunked.setdefault(tuple((x.name, x.value) for x in cs.labels), []).extend(
                (ti, struct.pack("<Q", v)) for ti, v in zip(t, vb))
    assert chunked == samples


def test_corrupt_chunk_aborts_the_stream(data):
    q, s = data
    ts, vals, chunks = q.series[s["a"]]
    q.series[s["a"]] = (ts, vals, [Chunk(c.mint, c.maxt, c.data[:5]) for c in chunks])
    reg = CollectorRegistry()
    resp = RemoteReadHandler(lambda: q, registry=reg)(Request("POST", "/api/v1/read", {}, {}, bytes(
        cramjam.snappy.compress_raw(read_request([(0, 10**9, [(0, "job", "api")], None)], accepted=(STREAMED,))))))
    assert resp.status == 200  # sent before the first frame
    with pytest.raises(CorruptChunk):
        b"".join(resp.body)
    assert reg.get_sample_value("flashback_remote_read_queries") == 0


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accepted", [(), (STREAMED,)], ids=["samples", "streamed"])
@pytest.mark.parametrize("body,compress,status,text", [
    (b"\x10not snappy at all", False, 400, b"snappy"),
    (b"", False, 400, b"snappy"),
    (b"\x0a\xff", True, 400, b"invalid protobuf ReadRequest"),
    (None, True, 400, b"invalid regular expression"),
    ("badtype", True, 400, b"invalid matcher type 7"),
], ids=["bad-snappy", "empty-body", "bad-protobuf", "bad-regex", "unknown-matcher-type"])
def test_bad_requests(data, accepted, body, compress, status, text):
    q, _ = data
    if body is None:
        body = read_request([(0, 10, [(2, "job", "a(")], None)], accepted=accepted)
    elif body == "badtype":
        body = read_request([(0, 10, [(7, "job", "a")], None)], accepted=accepted)
    resp = _post(RemoteReadHandler(lambda: q), body, compress=compress)
    assert resp.status == status and text in resp.body, resp.body
    assert resp.body.endswith(b"\n")


@pytest.mark.parametrize("accepted", [(), (STREAMED,)], ids=["samples", "streamed"])
def test_querier_error_is_500(data, accepted):
    q, _ = data
    q.fail = RuntimeError("replica unreachable")
    reg = CollectorRegistry()
    req = read_request([(0, 10, [(0, "job", "a")], None)], accepted=accepted)
    resp = _post(RemoteReadHandler(lambda: q, registry=reg), req)
    assert resp.status == 500 and b"replica unreachable" in resp.body
    rtype = "streamed_xor_chunks" if accepted else "samples"
    assert reg.get_sample_value("flashback_remote_read_requests_total", {"response_type": rtype, "code": "500"}) == 1
    assert reg.get_sample_value("flashback_remote_read_queries") == 0


def test_metrics(data):
    q, s = data
    reg = CollectorRegistry()
    h = RemoteReadHandler(lambda: q, registry=reg)
    _post(h, read_request([(0, 10**9, [(0, "job", "api")], None)]))
    _post(h, read_request([(0, 10**9, [(0, "job", "api")], None)], accepted=(STREAMED,)))
    n = len(_expected(q, [s["a"]], 0, 10**9)[tuple(s["a"])]) + 3
    assert reg.get_sample_value("flashback_remote_read_samples_total") == n
    assert reg.get_sample_value("flashback_remote_read_chunks_total") == 3 + 1
    assert reg.get_sample_value("flashback_remote_read_requests_total",
                                {"response_type": "samples", "code": "200"}) == 1
    assert reg.get_sample_value("flashback_remote_read_queries") == 0


# --- through the HTTP server ------------------------------------------------------------------------


@pytest.fixture
def served():
    """``(querier, port)``: the handler behind the real HTTP server on a free port."""
    q = FakeQuerier()
    q.requests = []
    router = Router()
    handler = RemoteReadHandler(lambda: q)

    def recording(req):
        q.requests.append(prompb.decode_read_request(bytes(cramjam.snappy.decompress_raw(req.body))))
        return handler(req)

    router.route("/api/v1/read", recording, ("POST",))
    srv = HTTPServer(router, "127.0.0.1", 0, CollectorRegistry())
    srv.start()
    yield q, srv.address[1]
    srv.close()


def test_streamed_over_http_is_chunked(served):
    q, port = served
    q.add({"__name__": "m", "i": "1"}, np.arange(500) * 1000, np.arange(500.0))
    q.add({"__name__": "m", "i": "2"}, np.arange(10) * 1000, np.arange(10.0))
    status, body, headers = request(port, "POST", "/api/v1/read", bytes(cramjam.snappy.compress_raw(
        read_request([(0, 10**7, [(0, "__name__", "m")], None)], accepted=(STREAMED,)))))
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"
    msgs = streamed(body)
    got = [(m.chunked_series[0].labels[1].value, len(m.chunked_series[0].chunks)) for m in msgs]
    assert got == [("1", 5), ("2", 1)]


# --- end to end with the real Prometheus 2.42 ----------------------------------------------------------

needs_prometheus = pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason=f"Prometheus binary {PROMETHEUS} absent")


def _now_aligned() -> int:
    return (int(time.time() * 1000) // 15000) * 15000


@needs_prometheus
def test_prometheus_reads_through_remote_read(served, tmp_path):
    """Prometheus as the remote-read client: PromQL results over our handler equal the fake data.

    Prometheus 2.42's client sends no accepted_response_types, so this exercises SAMPLES;
    the streamed type is checked against Prometheus as a server below.
    """
    q, port = served
    end = _now_aligned()
    ts = end - np.arange(240)[::-1] * 15000
    vals_a = np.round(np.sin(np.arange(240)) * 1000, 3)
    vals_b = np.arange(240) * 1.25 - 100
    q.add({"__name__": "rr_metric", "job": "a", "instance": "x:1"}, ts, vals_a)
    q.add({"__name__": "rr_metric", "job": "b", "instance": "y:1"}, ts, vals_b)
    q.add({"__name__": "rr_other", "job": "a"}, ts, np.full(240, 42.0))
    prom = Prometheus(str(tmp_path / "prom"), f"""
global: {{scrape_interval: 1h, evaluation_interval: 1h}}
scrape_configs: []
remote_read:
  - url: http://127.0.0.1:{port}/api/v1/read
    read_recent: true
""").start()
    try:
        # The window edge falls between samples, so it does not matter whether it is open or closed.
        doc = get_json(prom.port, "/api/v1/query", {"query": 'rr_metric{job=~"a|b"}[10m]', "time": (end + 7000) / 1000})
        got = {s["metric"]["job"]: [(round(float(t) * 1000), float(v)) for t, v in s["values"]]
               for s in doc["data"]["result"]}
        window = ts > end + 7000 - 600000
        assert got == {"a": list(zip(ts[window].tolist(), vals_a[window].tolist())),
                       "b": list(zip(ts[window].tolist(), vals_b[window].tolist()))}
        start = int(ts[100])
        doc = get_json(prom.port, "/api/v1/query_range", {"query": 'rr_metric{job!="b"}', "start": start / 1000,
                                                          "end": end / 1000, "step": 15})
        (series,) = doc["data"]["result"]
        assert series["metric"] == {"__name__": "rr_metric", "job": "a", "instance": "x:1"}
        assert [(round(float(t) * 1000), float(v)) for t, v in series["values"]] == \
            list(zip(ts[100:].tolist(), vals_a[100:].tolist()))
        doc = get_json(prom.port, "/api/v1/query", {"query": "sum(rr_metric) + on() rr_other", "time": end / 1000})
        assert float(doc["data"]["result"][0]["value"][1]) == pytest.approx(vals_a[-1] + vals_b[-1] + 42.0)
        assert q.requests, "Prometheus never called the remote read endpoint"
        # Prometheus 2.42's client names no response type, so it gets SAMPLES (streaming came in 2.55).
        assert all(r.accepted_response_types == () for r in q.requests)
    finally:
        prom.stop()


def _prom_read(port: int, data: bytes) -> tuple[int, bytes, dict]:
    return request(port, "POST", "/api/v1/read", bytes(cramjam.snappy.compress_raw(data)),
                   {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                    "X-Prometheus-Remote-Read-Version": "0.1.0"})


@needs_prometheus
def test_byte_identical_to_prometheus_read_handler(tmp_path):
    """Prometheus as the reference server: the same data and request give the same response bytes.

    Samples go into a real Prometheus by remote write; its streamed answer supplies the stored
    chunks for our fake querier, so frame cutting, framing, CRCs and message layout are compared
    byte for byte (SAMPLES after decompression, since snappy encoders may differ).
    """
    frame_limit = 300
    prom = Prometheus(str(tmp_path / "prom"), "global: {scrape_interval: 1h}\nscrape_configs: []\n",
                      ("--web.enable-remote-write-receiver", f"--storage.remote.read-max-bytes-in-frame={frame_limit}"))
    prom.start()
    try:
        end = _now_aligned()
        n = 400
        ts = (end - np.arange(n)[::-1] * 15000).tolist()
        series = {
            (("__name__", "ref_metric"), ("instance", "x:1"), ("job", "a")):
                [math.sin(i) * 100 for i in range(n)],
            (("__name__", "ref_metric"), ("instance", "y:1"), ("job", "b")):
                [float(i // 7) for i in range(n)],
            (("__name__", "ref_other"), ("job", "a")): [1e300 * (i % 3) - 5 for i in range(n)],
        }
        status, body = remote_write(prom.port, prompb_ref.write_request(
            [(list(lb), list(zip(ts, vals))) for lb, vals in series.items()]))
        assert status == 204, body
        queries = [
            (ts[0] - 1000, end, [(2, "__name__", "ref_.*")], {"step_ms": 15000, "start_ms": ts[0], "end_ms": end}),
            (ts[150], ts[260], [(0, "__name__", "ref_metric"), (1, "job", "b")], None),
            (ts[10], end, [(3, "job", "a"), (0, "__name__", "ref_metric")], None),
            (end + 10**6, end + 2 * 10**6, [(0, "__name__", "ref_metric")], None),
        ]
        wait_until(lambda: _prom_read(prom.port, read_request(queries[:1], accepted=(STREAMED,)))[1], 10,
                   "Prometheus to serve the written series")

        status, prom_stream, headers = _prom_read(prom.port, read_request(queries, accepted=(STREAMED,)))
        assert status == 200, prom_stream
        msgs = streamed(prom_stream)
        assert len(msgs) > 4  # the small frame limit splits series
        chunks: dict[tuple, list[Chunk]] = {}
        for m in msgs:
            if m.query_index == 0:
                cs = m.chunked_series[0]
                chunks.setdefault(tuple((x.name, x.value) for x in cs.labels), []).extend(
                    Chunk(c.min_time_ms, c.max_time_ms, c.data, c.type) for c in cs.chunks)
        assert set(chunks) == set(series)
        q = FakeQuerier()
        for lb, vals in series.items():
            dec = [xor_ref.decode(c.data) for c in chunks[lb]]  # Prometheus stored what was written
            assert sum((d[0] for d in dec), []) == ts and sum((d[1] for d in dec), []) == vals
            q.add(dict(lb), ts, vals, chunks[lb])

        ours = _post(RemoteReadHandler(lambda: q, max_bytes_in_frame=frame_limit),
                     read_request(queries, accepted=(STREAMED,)))
        assert ours.content_type == headers["content-type"]
        assert ours.body == prom_stream

        status, prom_samples, headers = _prom_read(prom.port, read_request(queries, accepted=(SAMPLES,)))
        assert status == 200, prom_samples
        ours = _post(RemoteReadHandler(lambda: q), read_request(queries))
        assert ours.content_type == headers["content-type"]
        assert ours.headers["Content-Encoding"] == headers["content-encoding"]
        assert bytes(cramjam.snappy.decompress_raw(ours.body)) == bytes(cramjam.snappy.decompress_raw(prom_samples))
    finally:
        prom.stop()
