"""The head gRPC API: codec, service and client, and the Querier contract on Head and RemoteHead."""

import functools
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from store import headrpc, xor
from store.errors import (DecodeError, InvalidMatcher, ReplicaError, ReplicaUnavailable, StorageError,
                          UnsupportedVersion)
from store.head import Head, HeadOptions
from store.headrpc import HeadService, RemoteHead
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.storage import SelectHints
from store.writerequest import decode, encode

MIN, MAX = -(2**63), 2**63 - 1
NOW = 10**13
T0 = NOW - 3 * 3600 * 1000
STEP = 15_000


def _f(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _bits(vals) -> list[int]:
    return np.asarray(vals, dtype=np.float64).view(np.uint64).tolist()


STALE = _f(0x7FF0000000000002)
SPECIAL = [float("inf"), float("-inf"), -0.0, STALE, _f(0x7FF8000000000123), float("nan"), 5e-324,
           1.7976931348623157e308]

JOBS = ["api", "db", "web"]


def _dataset() -> dict[Labels, tuple[list[int], list[float]]]:
    """60 series in 3 jobs, 300 samples each (several chunks), special values spread in."""
    rng = np.random.default_rng(7)
    data = {}
    for i in range(60):
        pairs = {"__name__": "requests_total" if i % 2 == 0 else "latency_seconds", "job": JOBS[i % 3],
                 "instance": f"host-{i:02d}"}
        if i % 5 == 0:
            pairs["zone"] = "eu" if i % 10 == 0 else "us"
        n = 300
        ts = (T0 + np.arange(n) * STEP + rng.integers(-500, 500, n) * (np.arange(n) % 2)).tolist()
        vals = rng.normal(100, 30, n).tolist()
        for k, v in enumerate(SPECIAL):
            vals[(i * 7 + k * 37) % n] = v
        data[Labels.from_dict(pairs)] = (ts, vals)
    return data


DATA = _dataset()


def _head(data=DATA) -> Head:
    head = Head(HeadOptions())
    res = head.append(decode(encode([(list(lb), list(zip(ts, vs))) for lb, (ts, vs) in data.items()])), NOW)
    assert not res.rejected
    return head


@pytest.fixture(scope="module")
def head() -> Head:
    return _head()


@pytest.fixture(scope="module")
def service(head):
    with HeadService(head, lambda: {"ready": True, "replica": "r0"}, address="127.0.0.1:0") as svc:
        yield svc


@pytest.fixture(scope="module")
def remote(service):
    with RemoteHead(f"127.0.0.1:{service.port}") as client:
        yield client


@pytest.fixture(params=["head", "remote"])
def querier(request, head, remote):
    """The same Querier contract on the head itself and on RemoteHead(HeadService(head))."""
    return head if request.param == "head" else remote


def _eq(name: str, value: str) -> Matcher:
    return Matcher(MatchType.EQ, name, value)


def _expected(pred, mint=MIN, maxt=MAX) -> list[tuple[Labels, list[int], list[int]]]:
    out = []
    for lb in sorted(DATA):
        if not pred(lb):
            continue
        ts, vs = DATA[lb]
        keep = [(t, v) for t, v in zip(ts, vs) if mint <= t <= maxt]
        if keep:
            out.append((lb, [t for t, _ in keep], _bits([v for _, v in keep])))
    return out


def _got(series) -> list[tuple[Labels, list[int], list[int]]]:
    out = []
    for s in series:
        ts, vs = s.samples()
        assert ts.dtype == np.int64 and vs.dtype == np.float64
        out.append((s.labels, ts.tolist(), _bits(vs)))
    return out


# ---- the Querier contract, on Head and on RemoteHead ------------------------------------------

MATCHER_CASES = [
    pytest.param([_eq("__name__", "requests_total")], lambda lb: lb.name == "requests_total", id="eq"),
    pytest.param([Matcher(MatchType.NEQ, "job", "db")], lambda lb: lb.get("job") != "db", id="neq"),
    pytest.param([Matcher(MatchType.RE, "instance", "host-(0.|1[0-4])")],
                 lambda lb: lb.get("instance") < "host-15", id="re"),
    pytest.param([Matcher(MatchType.NRE, "job", "api|web")], lambda lb: lb.get("job") == "db", id="nre"),
    pytest.param([_eq("__name__", "latency_seconds"), _eq("zone", "")],
                 lambda lb: lb.name == "latency_seconds" and not lb.has("zone"), id="eq-empty-means-missing"),
    pytest.param([Matcher(MatchType.RE, "zone", ".+"), Matcher(MatchType.NEQ, "zone", "eu")],
                 lambda lb: lb.get("zone") == "us", id="re-and-neq"),
    pytest.param([Matcher(MatchType.RE, "__name__", ".*")], lambda lb: True, id="all"),
]


@pytest.mark.parametrize("matchers,pred", MATCHER_CASES)
def test_select_matchers_sorted_and_bit_exact(querier, matchers, pred):
    got = _got(querier.select(matchers, MIN, MAX))
    assert got == _expected(pred)
    assert [g[0] for g in got] == sorted(g[0] for g in got)


def test_select_clips_samples_to_time_range(querier):
    mint, maxt = T0 + 100 * STEP + 1, T0 + 150 * STEP
    got = _got(querier.select([_eq("job", "api")], mint, maxt, SelectHints(mint, maxt, step=STEP)))
    assert got == _expected(lambda lb: lb.get("job") == "api", mint, maxt)
    assert all(mint <= t <= maxt for _, ts, _ in got for t in ts)


@pytest.mark.parametrize("matchers,mint,maxt", [
    pytest.param([_eq("__name__", "nope")], MIN, MAX, id="no-such-series"),
    pytest.param([_eq("job", "api")], NOW + 3600_000, NOW + 7200_000, id="after-the-data"),
    pytest.param([_eq("job", "api")], 0, T0 - 3600_000, id="before-the-data"),
])
def test_select_empty(querier, matchers, mint, maxt):
    assert querier.select(matchers, mint, maxt) == []


def test_chunks_decode_to_the_samples(querier):
    for s in querier.select([_eq("job", "web")], MIN, MAX):
        chunks = list(s.chunks())
        assert len(chunks) >= 3
        ts, vs = [], []
        for c in chunks:
            t, v = xor.decode(c.data)
            assert (c.mint, c.maxt) == (t[0], t[-1])
            ts += t
            vs += v
        got_t, got_v = s.samples()
        assert ts == got_t.tolist() and _bits(vs) == _bits(got_v)
        # The data methods may be called repeatedly.
        assert list(s.chunks()) == chunks


@pytest.mark.parametrize("matchers,expected", [
    pytest.param([], ["__name__", "instance", "job", "zone"], id="all"),
    pytest.param([_eq("job", "db"), Matcher(MatchType.RE, "instance", "host-0[0-4]")],
                 ["__name__", "instance", "job"], id="matched"),
    pytest.param([_eq("job", "nope")], [], id="none"),
])
def test_label_names(querier, matchers, expected):
    assert querier.label_names(matchers, MIN, MAX) == expected


@pytest.mark.parametrize("name,matchers,expected", [
    pytest.param("job", [], JOBS, id="all"),
    pytest.param("zone", [_eq("job", "api")], ["eu", "us"], id="matched"),
    pytest.param("zone", [_eq("__name__", "requests_total")], ["eu"], id="matched-one"),
    pytest.param("__name__", [Matcher(MatchType.NRE, "zone", "eu|us")], ["latency_seconds", "requests_total"],
                 id="nre"),
    pytest.param("nope", [], [], id="no-such-label"),
])
def test_label_values(querier, name, matchers, expected):
    assert querier.label_values(name, matchers, MIN, MAX) == expected


def test_label_names_with_matchers_follow_the_time_range_as_select_does(querier):
    """A series is named by ``label_names(matchers, mint, maxt)`` over just the ranges ``select``
    returns it for: the compactor asks label names to learn whether a window holds data."""
    first = min(ts[0] for ts, _ in DATA.values())
    last = max(ts[-1] for ts, _ in DATA.values())
    m = [_eq("job", "db")]
    for mint, maxt in [(MIN, first - 1), (MIN, first), (first - 60_000, first + 60_000), (last, MAX),
                       (last + 1, MAX), (T0 + 100 * STEP, T0 + 100 * STEP + 1)]:
        selected = querier.select(m, mint, maxt)
        names = querier.label_names(m, mint, maxt)
        assert names == (sorted({n for s in selected for n, _ in s.labels}) if selected else []), (mint, maxt)


def test_label_queries_outside_the_data_are_empty(querier):
    assert querier.label_names([], 0, 1000) == []
    assert querier.label_values("job", [], 0, 1000) == []


# ---- RemoteHead specifics ---------------------------------------------------------------------


def test_remote_chunks_are_the_heads_bytes(head, remote):
    m = [Matcher(MatchType.RE, "__name__", ".+")]
    local, got = head.select(m, T0 + 50 * STEP, MAX), remote.select(m, T0 + 50 * STEP, MAX)
    assert [s.labels for s in got] == [s.labels for s in local]
    for a, b in zip(local, got):
        assert list(b.chunks()) == list(a.chunks())


def test_series_are_label_sets_only(head, remote):
    m = [_eq("job", "db")]
    assert remote.series(m, MIN, MAX) == [s.labels for s in head.select(m, MIN, MAX)]
    assert remote.series([_eq("job", "nope")], MIN, MAX) == []


def test_status(remote):
    assert remote.status() == {"ready": True, "replica": "r0"}


@functools.lru_cache(maxsize=1)
def _big_head(n_series: int, n_samples: int) -> tuple[Head, dict]:
    rng = np.random.default_rng(3)
    data = {}
    for i in range(n_series):
        ts = (T0 + np.arange(n_samples) * STEP).tolist()
        data[Labels.from_dict({"__name__": "big", "i": f"{i:05d}", "pad": "x" * (i % 50)})] = (
            ts, rng.normal(0, 1e6, n_samples).tolist())
    return _head(data), data


@pytest.mark.parametrize("batch_bytes", [pytest.param(4096, id="4KiB"), pytest.param(headrpc.BATCH_BYTES, id="1MiB")])
def test_large_selection_spans_many_batches(batch_bytes):
    head, data = _big_head(2500, 240)
    series = head.select([_eq("__name__", "big")], MIN, MAX)
    msgs = list(headrpc.encode_series_batches(series, batch_bytes=batch_bytes))
    assert len(msgs) >= 3
    assert all(len(m) < batch_bytes + 4096 for m in msgs)
    with HeadService(head, lambda: {"ready": True}, address="127.0.0.1:0", batch_bytes=batch_bytes) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}") as client:
        got = client.select([_eq("__name__", "big")], MIN, MAX)
        assert [s.labels for s in got] == sorted(data)
        for s in got:
            ts, vs = s.samples()
            assert ts.tolist() == data[s.labels][0] and _bits(vs) == _bits(data[s.labels][1])
        assert len(client.label_values("i", [], MIN, MAX)) == 2500
        assert len(client.series([_eq("__name__", "big")], MIN, MAX)) == 2500


def test_concurrent_selects(head, remote):
    cases = [[_eq("job", j)] for j in JOBS] + [[Matcher(MatchType.RE, "instance", f"host-{d}.")] for d in range(6)]
    expected = [_got(head.select(m, MIN, MAX)) for m in cases]

    def run(k: int):
        m = cases[k % len(cases)]
        return k, _got(remote.select(m, MIN, MAX))

    with ThreadPoolExecutor(8) as pool:
        for k, got in pool.map(run, range(48)):
            assert got == expected[k % len(cases)]


def test_huge_time_bounds_are_clamped(remote, head):
    m = [_eq("job", "db")]
    assert _got(remote.select(m, -(2**70), 2**70)) == _got(head.select(m, MIN, MAX))


# ---- errors -----------------------------------------------------------------------------------


class RawMatcher(NamedTuple):
    """A matcher the client does not compile, to send what another client might."""

    type: MatchType
    name: str
    value: str


def test_bad_regex_is_invalid_argument(remote):
    with pytest.raises(InvalidMatcher, match=r"Select on head replica 127\.0\.0\.1:\d+: invalid regular expression"):
        remote.select([RawMatcher(MatchType.RE, "job", "a(b")], MIN, MAX)
    with pytest.raises(InvalidMatcher):
        remote.label_values("job", [RawMatcher(MatchType.NRE, "job", "[z-a]")], MIN, MAX)


def _raw_call(port: int, method: str, request: bytes, unary: bool = False):
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            if unary:
                ch.unary_unary(f"/{headrpc.SERVICE}/{method}")(request, timeout=5)
            else:
                list(ch.unary_stream(f"/{headrpc.SERVICE}/{method}")(request, timeout=5))
        return e.value


@pytest.mark.parametrize("request_bytes,kind", [
    pytest.param(b"", "DecodeError", id="empty"),
    pytest.param(b"\x02" + bytes(20), "UnsupportedVersion", id="version-2"),
    pytest.param(headrpc.encode_select_request([_eq("a", "b")], 0, 1)[:-3], "DecodeError", id="truncated"),
    pytest.param(headrpc.encode_select_request([], 0, 1) + b"x", "DecodeError", id="trailing-bytes"),
])
def test_undecodable_requests_are_invalid_argument(service, request_bytes, kind):
    import grpc

    err = _raw_call(service.port, "Select", request_bytes)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.trailing_metadata())[headrpc.ERROR_KEY] == kind


def test_not_ready_is_unavailable_but_status_answers(head):
    status = {"ready": False, "replica": "r1", "shard": "shard-0", "lag": 42}
    with HeadService(head, lambda: status, address="127.0.0.1:0") as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}") as client:
        for call in (lambda: client.select([_eq("job", "db")], MIN, MAX), lambda: client.label_names([], MIN, MAX),
                     lambda: client.label_values("job", [], MIN, MAX), lambda: client.series([], MIN, MAX)):
            with pytest.raises(ReplicaUnavailable, match=r"not ready \(replica=r1 shard=shard-0 lag=42\)"):
                call()
        assert client.status() == status
        status["ready"] = True
        assert len(client.select([_eq("job", "db")], MIN, MAX)) == 20


def test_changes_answers_applied_and_last_change_over_the_ranges_even_when_not_ready(head):
    from store.changes import ChangeTracker

    tracker = ChangeTracker(resolution_ms=1000)
    tracker.floor = 3
    tracker.record(10_000, 10_000, seq=5)
    tracker.record(50_000, 60_000, seq=9)
    asked = []

    def changes(ranges):
        asked.append(list(ranges))
        return 9, max((tracker.last_change(a, b) for a, b in ranges), default=tracker.floor)

    with HeadService(head, lambda: {"ready": False}, address="127.0.0.1:0", changes=changes) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}") as client:
        assert client.changes([(0, 1_000), (10_000, 10_999)]) == (9, 5)
        assert client.changes([(0, 1_000)]) == (9, 3)  # the floor
        assert client.changes([(0, 1_000), (55_000, MAX)]) == (9, 9)
        assert client.changes([]) == (9, 3)
    assert asked[-2] == [(0, 1_000), (55_000, MAX)] and asked[-1] == []


def test_changes_not_served_without_a_callable(remote):
    with pytest.raises(ReplicaError, match="Changes on head replica .*UNIMPLEMENTED"):
        remote.changes([(0, 1)])


@pytest.mark.parametrize("request_bytes,kind", [
    pytest.param(b"", "DecodeError", id="empty"),
    pytest.param(b"\x02" + bytes(4), "UnsupportedVersion", id="version-2"),
    pytest.param(headrpc.encode_changes_request([(0, 1), (2, 3)])[:-1], "DecodeError", id="truncated"),
    pytest.param(headrpc.encode_changes_request([(0, 1)]) + b"x", "DecodeError", id="trailing-bytes"),
])
def test_undecodable_changes_requests_are_invalid_argument(head, request_bytes, kind):
    import grpc

    with HeadService(head, lambda: {"ready": True}, address="127.0.0.1:0", changes=lambda r: (0, 0)) as svc:
        err = _raw_call(svc.port, "Changes", request_bytes, unary=True)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.trailing_metadata())[headrpc.ERROR_KEY] == kind


def test_changes_codec_round_trip_and_damage():
    assert headrpc.decode_changes_request(headrpc.encode_changes_request([(MIN, MAX), (5, 6)])) == [(MIN, MAX), (5, 6)]
    assert headrpc.decode_changes_request(headrpc.encode_changes_request([])) == []
    assert headrpc.decode_changes(headrpc.encode_changes(7, 3)) == (7, 3)
    with pytest.raises(DecodeError):
        headrpc.decode_changes(headrpc.encode_changes(7, 3)[:-1])
    with pytest.raises(UnsupportedVersion):
        headrpc.decode_changes(b"\x09" + bytes(16))


def test_ready_callable_decides_readiness(head):
    ready = [False]
    status = {"ready": True, "replica": "r2"}  # the callable wins over the status' key
    with HeadService(head, lambda: status, address="127.0.0.1:0", ready=lambda: ready[0]) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}") as client:
        with pytest.raises(ReplicaUnavailable, match=r"not ready \(replica=r2\)"):
            client.label_names([], MIN, MAX)
        ready[0] = True
        assert client.label_values("job", [], MIN, MAX) == JOBS


def test_stopped_server_is_replica_unavailable(head):
    svc = HeadService(head, lambda: {"ready": True}, address="127.0.0.1:0").start()
    client = RemoteHead(f"127.0.0.1:{svc.port}", timeout_s=5)
    assert client.label_values("job", [], MIN, MAX) == JOBS
    svc.close()
    with pytest.raises(ReplicaUnavailable, match="UNAVAILABLE"):
        client.select([_eq("job", "db")], MIN, MAX)
    with pytest.raises(ReplicaUnavailable):
        client.status()
    client.close()


def test_nothing_listening_is_replica_unavailable():
    svc = HeadService(Head(), lambda: {}, address="127.0.0.1:0").start()
    port = svc.port
    svc.close()
    with RemoteHead(f"127.0.0.1:{port}", timeout_s=5) as client, pytest.raises(ReplicaUnavailable):
        client.label_names([], MIN, MAX)


class _Slow:
    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def select(self, *args):
        time.sleep(self.delay_s)
        return self.inner.select(*args)

    def label_names(self, *args):
        time.sleep(self.delay_s)
        return self.inner.label_names(*args)


def test_timeout_is_replica_unavailable(head):
    with HeadService(_Slow(head, 1.0), lambda: {"ready": True}, address="127.0.0.1:0") as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}", timeout_s=0.2) as client:
        t = time.monotonic()
        with pytest.raises(ReplicaUnavailable, match="DEADLINE_EXCEEDED"):
            client.select([_eq("job", "db")], MIN, MAX)
        assert time.monotonic() - t < 0.9
        with pytest.raises(ReplicaUnavailable):
            client.label_names([], MIN, MAX)


class _Broken:
    def select(self, *args):
        raise RuntimeError("disk on fire")

    def label_names(self, *args):
        raise ValueError("no names today")


def test_other_errors_are_internal_and_counted(head):
    reg = CollectorRegistry()
    with HeadService(_Broken(), lambda: {"ready": True}, address="127.0.0.1:0", registry=reg) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}") as client:
        with pytest.raises(ReplicaError, match=r"RuntimeError: disk on fire \(INTERNAL\)") as e:
            client.select([_eq("job", "db")], MIN, MAX)
        assert not isinstance(e.value, ReplicaUnavailable) and isinstance(e.value, StorageError)
        with pytest.raises(ReplicaError, match="ValueError: no names today"):
            client.label_names([], MIN, MAX)
        client.status()
    assert reg.get_sample_value("flashback_headrpc_requests_total", {"method": "Select", "code": "INTERNAL"}) == 1
    assert reg.get_sample_value("flashback_headrpc_requests_total", {"method": "Status", "code": "OK"}) == 1


def test_metrics_count_requests_and_bytes(head):
    reg = CollectorRegistry()
    with HeadService(head, lambda: {"ready": True}, address="127.0.0.1:0", registry=reg) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}") as client:
        client.select([_eq("job", "db")], MIN, MAX)
        with pytest.raises(InvalidMatcher):
            client.select([RawMatcher(MatchType.RE, "job", "(")], MIN, MAX)
    assert reg.get_sample_value("flashback_headrpc_requests_total", {"method": "Select", "code": "OK"}) == 1
    assert reg.get_sample_value("flashback_headrpc_requests_total",
                                {"method": "Select", "code": "INVALID_ARGUMENT"}) == 1
    assert reg.get_sample_value("flashback_headrpc_sent_bytes_total", {"method": "Select"}) > 10_000
    assert reg.get_sample_value("flashback_headrpc_request_duration_seconds_count", {"method": "Select"}) == 2


def test_taken_port_is_refused(service):
    with pytest.raises(OSError, match="cannot bind"):
        HeadService(Head(), lambda: {}, address=f"127.0.0.1:{service.port}").start()


# ---- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hints", [
    pytest.param(None, id="no-hints"),
    pytest.param(SelectHints(5, 10, step=1, range=300, func="rate"), id="hints"),
    pytest.param(SelectHints(-5, 10, func="ünïcode"), id="hints-unicode"),
])
def test_select_request_round_trip(hints):
    matchers = [Matcher(t, f"n{i}", v) for i, (t, v) in
                enumerate([(MatchType.EQ, "a"), (MatchType.NEQ, ""), (MatchType.RE, "x|y\n"), (MatchType.NRE, "é.*")])]
    data = headrpc.encode_select_request(matchers, -7, MAX, hints)
    assert headrpc.decode_select_request(data) == (matchers, -7, MAX, hints)


def test_labels_request_round_trip():
    data = headrpc.encode_labels_request("job", [_eq("a", "b")], MIN, 9)
    assert headrpc.decode_labels_request(data) == ("job", [_eq("a", "b")], MIN, 9)


def test_series_batch_round_trip_and_damage():
    class S(NamedTuple):
        labels: Labels
        chunk_list: list

        def chunks(self):
            return iter(self.chunk_list)

    from store.chunks import Chunk

    series = [S(Labels.from_dict({"__name__": "a", "ü": "\x00v"}), [Chunk(1, 2, b"\x00\x01ab"), Chunk(3, 4, b"")]),
              S(Labels(), []), S(Labels.from_dict({"b": "c"}), [Chunk(MIN, MAX, bytes(range(256)))])]
    [msg] = headrpc.encode_series_batches(series)
    assert headrpc.decode_series_batch(msg) == [(s.labels, s.chunk_list) for s in series]
    [empty] = headrpc.encode_series_batches([])
    assert headrpc.decode_series_batch(empty) == []
    for cut in (1, 5, 20, len(msg) - 1):
        with pytest.raises(DecodeError):
            headrpc.decode_series_batch(msg[:cut])
    with pytest.raises(UnsupportedVersion):
        headrpc.decode_series_batch(b"\x09" + msg[1:])
    with pytest.raises(DecodeError):
        headrpc.decode_series_batch(msg + b"\x00")


def test_string_batches_and_status():
    strings = [f"value-{i}" for i in range(1000)] + ["", "ü\x00"]
    msgs = list(headrpc.encode_string_batches(strings, batch_bytes=1000))
    assert len(msgs) > 5
    assert [s for m in msgs for s in headrpc.decode_string_batch(m)] == strings
    st = {"replica": "r0", "shard": "shard-0", "applied_seq": 10, "last_seq": 12, "lag": 2, "ready": True,
          "series": 3}
    assert headrpc.decode_status(headrpc.encode_status(st)) == st
    with pytest.raises(DecodeError):
        headrpc.decode_status(b"\x01[1]")


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


@settings(max_examples=150)
@given(st.lists(st.tuples(st.dictionaries(_text.filter(bool), _text.filter(bool), max_size=5),
                          st.lists(st.tuples(st.integers(MIN, MAX), st.integers(MIN, MAX), st.binary(max_size=40)),
                                   max_size=4)), max_size=12),
       st.integers(1, 300))
def test_series_batches_round_trip_property(raw, batch_bytes):
    from store.chunks import Chunk

    class S(NamedTuple):
        labels: Labels
        chunk_list: list

        def chunks(self):
            return iter(self.chunk_list)

    series = [S(Labels.from_dict(d), [Chunk(a, b, data) for a, b, data in cs]) for d, cs in raw]
    msgs = list(headrpc.encode_series_batches(series, batch_bytes=batch_bytes))
    assert [x for m in msgs for x in headrpc.decode_series_batch(m)] == [(s.labels, s.chunk_list) for s in series]


@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(list(MatchType)), _text, _text.map(re.escape))),
       st.integers(MIN, MAX), st.integers(MIN, MAX))
def test_select_request_round_trip_property(raw, mint, maxt):
    matchers = [Matcher(t, n, v) for t, n, v in raw]
    data = headrpc.encode_select_request(matchers, mint, maxt)
    assert headrpc.decode_select_request(data) == (matchers, mint, maxt, None)


# ---- Checkpoint -------------------------------------------------------------------------------

CHECKPOINT_ITEMS = [(b"h", b"head"), (b"r", b"\x02meta"), *((b"s%05d" % i, bytes([i % 256]) * (i % 97))
                                                               for i in range(300))]


@pytest.mark.parametrize("batch_bytes", [1, 200, 1 << 20])
def test_checkpoint_batches_round_trip(batch_bytes):
    msgs = list(headrpc.encode_checkpoint_batches(42, iter(CHECKPOINT_ITEMS), batch_bytes=batch_bytes))
    decoded = [headrpc.decode_checkpoint_batch(m) for m in msgs]
    assert [last for _, last, _ in decoded] == [False] * (len(msgs) - 1) + [True]
    assert {seq for seq, _, _ in decoded} == {42}
    assert [item for _, _, items in decoded for item in items] == CHECKPOINT_ITEMS
    assert (len(msgs) > 100) == (batch_bytes == 1)
    # An empty checkpoint (a replica that never saved one) is one last message without items.
    assert [headrpc.decode_checkpoint_batch(m) for m in headrpc.encode_checkpoint_batches(0, [])] == [(0, True, [])]


def test_checkpoint_batch_errors():
    msg = next(headrpc.encode_checkpoint_batches(7, CHECKPOINT_ITEMS[:3]))
    with pytest.raises(DecodeError):
        headrpc.decode_checkpoint_batch(msg[:-1])
    with pytest.raises(DecodeError):
        headrpc.decode_checkpoint_batch(msg + b"x")
    with pytest.raises(DecodeError):
        headrpc.decode_checkpoint_batch(msg[:1] + b"\x02" + msg[2:])  # last flag 2
    with pytest.raises(UnsupportedVersion):
        headrpc.decode_checkpoint_batch(b"\x02" + msg[1:])


def test_checkpoint_is_streamed_to_a_client(head):
    ready = [False]  # served while not ready: a peer's durable checkpoint does not depend on it
    with HeadService(head, lambda: {}, address="127.0.0.1:0", ready=lambda: ready[0], batch_bytes=100,
                     checkpoint=lambda: (42, iter(CHECKPOINT_ITEMS))) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}", timeout_s=5) as client:
        seq, items = client.checkpoint()
        assert seq == 42 and list(items) == CHECKPOINT_ITEMS


def test_checkpoint_failing_on_the_server_fails_the_client(head):
    def broken():
        yield from CHECKPOINT_ITEMS[:100]
        raise DecodeError("checkpoint manifest names 302 items, found 100")

    with HeadService(head, lambda: {}, address="127.0.0.1:0", batch_bytes=100,
                     checkpoint=lambda: (42, broken())) as svc, \
            RemoteHead(f"127.0.0.1:{svc.port}", timeout_s=5) as client:
        seq, items = client.checkpoint()
        # The server's own DecodeError comes back as one (INVALID_ARGUMENT, see headrpc.md).
        with pytest.raises(DecodeError, match=r"Checkpoint on head replica .*302 items"):
            list(items)


@pytest.mark.parametrize("messages,error", [
    ([next(headrpc.encode_checkpoint_batches(42, CHECKPOINT_ITEMS, batch_bytes=10))], "before its last message"),
    ([next(headrpc.encode_checkpoint_batches(42, CHECKPOINT_ITEMS, batch_bytes=10)), b"\x01\x00" +
      struct.pack("<QI", 43, 0)], "sequence 43 after 42"),
    ([*headrpc.encode_checkpoint_batches(42, CHECKPOINT_ITEMS[:2]), b"\x01\x01" + struct.pack("<QI", 42, 0)],
     "messages after the last"),
], ids=["cut", "two-sequences", "after-the-last"])
def test_checkpoint_stream_that_breaks_the_protocol_is_refused(messages, error):
    import grpc

    server = grpc.server(ThreadPoolExecutor(2), handlers=[grpc.method_handlers_generic_handler(
        headrpc.SERVICE, {"Checkpoint": grpc.unary_stream_rpc_method_handler(lambda r, c: iter(messages))})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RemoteHead(f"127.0.0.1:{port}", timeout_s=5) as client:
            seq, items = client.checkpoint()
            assert seq == 42
            with pytest.raises(DecodeError, match=error):
                list(items)
    finally:
        server.stop(None)


def test_peer_checkpoint_skips_unreachable_and_older_peers(head):
    down = HeadService(Head(), lambda: {}, address="127.0.0.1:0").start()
    down_port = down.port
    down.close()
    with HeadService(head, lambda: {}, address="127.0.0.1:0") as no_checkpoints, \
            HeadService(head, lambda: {}, address="127.0.0.1:0", checkpoint=lambda: (9, iter(CHECKPOINT_ITEMS))) \
            as old, \
            HeadService(head, lambda: {}, address="127.0.0.1:0", checkpoint=lambda: (12, iter(CHECKPOINT_ITEMS))) \
            as good:
        peers = [("down", f"127.0.0.1:{down_port}"), ("unimplemented", f"127.0.0.1:{no_checkpoints.port}"),
                 ("old", f"127.0.0.1:{old.port}"), ("good", f"127.0.0.1:{good.port}")]
        name, seq, items = headrpc.peer_checkpoint(peers, 10, timeout_s=5)
        assert (name, seq, list(items)) == ("good", 12, CHECKPOINT_ITEMS)
        assert headrpc.peer_checkpoint(peers[:3], 10, timeout_s=5) is None
