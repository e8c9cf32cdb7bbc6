"""The head replicas' gRPC API: ``HeadService`` serves a ``Querier``, ``RemoteHead`` is its client.

In cluster mode every head replica serves its head through ``HeadService``; queriers and the
compactor read it through ``RemoteHead``, which implements ``store.storage.Querier`` like the
head itself (VictoriaMetrics' ``vmselect`` -> ``vmstorage`` split: one interface, in process or
over the network).

The service is ``flashback.head.v1.Head`` on grpcio with generic handlers: messages are not
protobuf but the small binary codec of ``store/docs/format/headrpc.md`` (version 1), encoded
and decoded here by functions without I/O. Selected series travel as their stored XOR chunks,
copied byte for byte, in messages of about ``BATCH_BYTES``; the client decodes samples only
when asked (``RemoteSeries.samples``).

Errors: the service answers ``INVALID_ARGUMENT`` for requests it cannot use (bad matcher,
undecodable request, unknown version), ``UNAVAILABLE`` while the replica is not ready, and
``INTERNAL`` for anything else, with the error's class name in the trailing metadata key
``flashback-error``. The client raises ``InvalidMatcher``/``DecodeError``/``UnsupportedVersion``
for the first, ``ReplicaUnavailable`` when the replica cannot answer now (also for timeouts
and connection errors), ``ReplicaError`` otherwise.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from concurrent import futures
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from store import xorfast
from store.chunks import ENCODING_XOR, Chunk
from store.errors import (CorruptChunk, DecodeError, InvalidMatcher, ReplicaError, ReplicaUnavailable,
                          StorageError, UnsupportedVersion)
from store.labels import SEP, Labels
from store.matchers import Matcher, MatchType
from store.storage import Querier, SelectHints

log = logging.getLogger(__name__)

VERSION = 1
SERVICE = "flashback.head.v1.Head"
BATCH_BYTES = 1 << 20  # a Select/Series/label response message is cut once it reaches this size
ERROR_KEY = "flashback-error"  # trailing metadata: the class name of the server-side error

MATCH_TYPES = (MatchType.EQ, MatchType.NEQ, MatchType.RE, MatchType.NRE)  # wire codes 0..3
_MATCH_CODE = {t: i for i, t in enumerate(MATCH_TYPES)}

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_BATCH = struct.Struct("<BI")  # version, count
_RANGE = struct.Struct("<qq")  # mint, maxt
_HINTS = struct.Struct("<qqqq")  # start, end, step, range
_CHUNK = struct.Struct("<qqBI")  # mint, maxt, encoding, length
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

# The client's error classes for INVALID_ARGUMENT, by the server's ``flashback-error``.
_ARGUMENT_ERRORS: dict[str, type[StorageError]] = {
    "InvalidMatcher": InvalidMatcher, "DecodeError": DecodeError, "UnsupportedVersion": UnsupportedVersion}
_UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})

_MAX_REQUEST_BYTES = 16 << 20  # matchers with very long regular expressions still fit
_MAX_RESPONSE_BYTES = 256 << 20  # a batch exceeds BATCH_BYTES by at most one series

# ---- codec (no I/O) ---------------------------------------------------------------------------


class _Reader:
    """Reads the primitives of the codec from ``data``; truncation raises ``DecodeError``."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what
        version = self.u8()
        if version != VERSION:
            raise UnsupportedVersion(f"{what}: version {version}, this reader knows {VERSION}")

    def _take(self, n: int) -> int:
        p = self.pos
        if p + n > len(self.data):
            raise DecodeError(f"{self.what}: truncated at byte {p} of {len(self.data)} (wanted {n} more)")
        self.pos = p + n
        return p

    def unpack(self, s: struct.Struct) -> tuple:
        return s.unpack_from(self.data, self._take(s.size))

    def u8(self) -> int:
        return self.data[self._take(1)]

    def u32(self) -> int:
        return _U32.unpack_from(self.data, self._take(4))[0]

    def blob(self) -> bytes:
        n = self.u32()
        p = self._take(n)
        return self.data[p:p + n]

    def text(self) -> str:
        b = self.blob()
        try:
            return b.decode()
        except UnicodeDecodeError as e:
            raise DecodeError(f"{self.what}: a string is not valid UTF-8: {e}") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{self.what}: {len(self.data) - self.pos} bytes left over after byte {self.pos}")


def _str(s: str) -> bytes:
    b = s.encode()
    return _U32.pack(len(b)) + b


def _matchers(matchers: Sequence[Matcher]) -> bytes:
    parts = [_U32.pack(len(matchers))]
    for m in matchers:
        parts += (_U8.pack(_MATCH_CODE[m.type]), _str(m.name), _str(m.value))
    return b"".join(parts)


def _read_matchers(r: _Reader) -> list[Matcher]:
    out = []
    for _ in range(r.u32()):
        code = r.u8()
        if code >= len(MATCH_TYPES):
            raise DecodeError(f"{r.what}: unknown matcher type {code}")
        name, value = r.text(), r.text()
        out.append(Matcher(MATCH_TYPES[code], name, value))  # InvalidMatcher for a bad regex
    return out


def _clamp(t: int) -> int:
    # Callers may pass "everything" as Python ints beyond int64; clamp rather than refuse.
    return min(max(t, _I64_MIN), _I64_MAX)


def _range(mint: int, maxt: int) -> bytes:
    return _RANGE.pack(_clamp(mint), _clamp(maxt))


def encode_select_request(matchers: Sequence[Matcher], mint: int, maxt: int,
                          hints: SelectHints | None = None) -> bytes:
    """The request of ``Select`` and ``Series``."""
    parts = [_U8.pack(VERSION), _range(mint, maxt), _matchers(matchers)]
    if hints is None:
        parts.append(_U8.pack(0))
    else:
        parts += (_U8.pack(1), _HINTS.pack(hints.start, hints.end, hints.step, hints.range), _str(hints.func))
    return b"".join(parts)


def decode_select_request(data: bytes) -> tuple[list[Matcher], int, int, SelectHints | None]:
    """(matchers, mint, maxt, hints) of a ``Select``/``Series`` request.

    Raises:
        DecodeError, UnsupportedVersion: the bytes are not such a request.
        InvalidMatcher: a matcher's regular expression does not compile.
    """
    r = _Reader(data, "select request")
    mint, maxt = r.unpack(_RANGE)
    matchers = _read_matchers(r)
    hints = None
    flag = r.u8()
    if flag == 1:
        start, end, step, rng = r.unpack(_HINTS)
        hints = SelectHints(start, end, step, rng, r.text())
    elif flag != 0:
        raise DecodeError(f"select request: hints flag {flag}")
    r.end()
    return matchers, mint, maxt, hints


def encode_labels_request(name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> bytes:
    """The request of ``LabelNames`` (``name`` empty) and ``LabelValues``."""
    return b"".join((_U8.pack(VERSION), _str(name), _range(mint, maxt), _matchers(matchers)))


def decode_labels_request(data: bytes) -> tuple[str, list[Matcher], int, int]:
    """(name, matchers, mint, maxt) of a ``LabelNames``/``LabelValues`` request."""
    r = _Reader(data, "label request")
    name = r.text()
    mint, maxt = r.unpack(_RANGE)
    matchers = _read_matchers(r)
    r.end()
    return name, matchers, mint, maxt


def encode_series_batches(series: Iterable[Any], *, chunks: bool = True,
                          batch_bytes: int = BATCH_BYTES) -> Iterator[bytes]:
    """``SeriesBatch`` messages of ``series`` (``store.storage.Series``) in the given order.

    Each series carries its canonical label bytes and, if ``chunks``, its chunks as
    ``Series.chunks()`` yields them (bytes copied, never re-encoded). A message is closed once it
    holds ``batch_bytes``; an empty selection is one message with no series.
    """
    parts: list[bytes] = [b""]
    size = n = 0
    pack_u32, pack_chunk = _U32.pack, _CHUNK.pack
    no_chunks = pack_u32(0)
    for s in series:
        lb = s.labels.canonical()
        parts += (pack_u32(len(lb)), lb)
        size += 8 + len(lb)
        if chunks:
            cs = list(s.chunks())
            parts.append(pack_u32(len(cs)))
            for c in cs:
                parts += (pack_chunk(c.mint, c.maxt, c.encoding, len(c.data)), c.data)
                size += 21 + len(c.data)
        else:
            parts.append(no_chunks)
        n += 1
        if size >= batch_bytes:
            parts[0] = _BATCH.pack(VERSION, n)
            yield b"".join(parts)
            parts, size, n = [b""], 0, 0
    if n or size == 0:
        parts[0] = _BATCH.pack(VERSION, n)
        yield b"".join(parts)


def _labels(blob: bytes) -> Labels:
    # UTF-8 never contains 0xff, so the canonical encoding splits unambiguously.
    parts = blob.split(SEP)
    if parts[-1] or len(parts) % 2 != 1:
        raise DecodeError(f"series batch: label bytes {blob[:64]!r} are not name 0xff value 0xff pairs")
    try:
        s = [p.decode() for p in parts]
    except UnicodeDecodeError as e:
        raise DecodeError(f"series batch: a label is not valid UTF-8: {e}") from None
    return Labels.sorted_unchecked(zip(s[0:-1:2], s[1::2]))


def decode_series_batch(data: bytes) -> list[tuple[Labels, list[Chunk]]]:
    """The (labels, chunks) of one ``SeriesBatch`` message, in message order.

    Raises:
        DecodeError, UnsupportedVersion: the bytes are not such a message.
    """
    r = _Reader(data, "series batch")
    (n,) = r.unpack(_U32)
    out = []
    unpack_u32, unpack_chunk = _U32.unpack_from, _CHUNK.unpack_from
    end = len(data)
    pos = r.pos
    try:
        for _ in range(n):
            (ll,) = unpack_u32(data, pos)
            pos += 4
            labels = _labels(data[pos:pos + ll])
            pos += ll
            (nc,) = unpack_u32(data, pos)
            pos += 4
            cs = []
            for _ in range(nc):
                mint, maxt, enc, cl = unpack_chunk(data, pos)
                pos += 21
                cs.append(Chunk(mint, maxt, data[pos:pos + cl], enc))
                pos += cl
            if pos > end:
                raise struct.error("past the end")
            out.append((labels, cs))
    except struct.error:
        raise DecodeError(f"series batch: truncated ({end} bytes, {n} series announced, {len(out)} read)") from None
    r.pos = pos
    r.end()
    return out


def encode_string_batches(strings: Sequence[str], *, batch_bytes: int = BATCH_BYTES) -> Iterator[bytes]:
    """``StringBatch`` messages of ``strings`` in order; at least one message."""
    parts: list[bytes] = [b""]
    size = n = 0
    for s in strings:
        b = _str(s)
        parts.append(b)
        size += len(b)
        n += 1
        if size >= batch_bytes:
            parts[0] = _BATCH.pack(VERSION, n)
            yield b"".join(parts)
            parts, size, n = [b""], 0, 0
    if n or size == 0:
        parts[0] = _BATCH.pack(VERSION, n)
        yield b"".join(parts)


def decode_string_batch(data: bytes) -> list[str]:
    r = _Reader(data, "string batch")
    out = [r.text() for _ in range(r.u32())]
    r.end()
    return out


_CHECKPOINT = struct.Struct("<BQI")  # after the version byte: last flag, checkpoint sequence, item count


def encode_checkpoint_batches(seq: int, items: Iterable[tuple[bytes, bytes]], *,
                              batch_bytes: int = BATCH_BYTES) -> Iterator[bytes]:
    """``CheckpointBatch`` messages of a replica's checkpoint at stream sequence ``seq``; the
    last one (possibly without items) has the last flag set."""
    parts: list[bytes] = []
    count = size = 0
    for key, value in items:
        parts += (_U32.pack(len(key)), key, _U32.pack(len(value)), value)
        count += 1
        size += 8 + len(key) + len(value)
        if size >= batch_bytes:
            yield b"".join((_U8.pack(VERSION), _CHECKPOINT.pack(0, seq, count), *parts))
            parts, count, size = [], 0, 0
    yield b"".join((_U8.pack(VERSION), _CHECKPOINT.pack(1, seq, count), *parts))


def decode_checkpoint_batch(data: bytes) -> tuple[int, bool, list[tuple[bytes, bytes]]]:
    """``(seq, last, items)`` of a ``CheckpointBatch``."""
    r = _Reader(data, "checkpoint batch")  # checks the version
    last, seq, count = r.unpack(_CHECKPOINT)
    if last > 1:
        raise DecodeError(f"checkpoint batch: last flag {last}")
    items = [(r.blob(), r.blob()) for _ in range(count)]
    r.end()
    return seq, bool(last), items


def encode_changes_request(ranges: Sequence[tuple[int, int]]) -> bytes:
    """A ``Changes`` request: the time ranges (ms, inclusive) whose last change is asked for."""
    return _U8.pack(VERSION) + _U32.pack(len(ranges)) + b"".join(_range(a, b) for a, b in ranges)


def decode_changes_request(data: bytes) -> list[tuple[int, int]]:
    r = _Reader(data, "changes request")
    n = r.u32()
    ranges = [r.unpack(_RANGE) for _ in range(n)]
    r.end()
    return ranges


_CHANGES = struct.Struct("<qq")  # applied sequence, last change


def encode_changes(applied: int, last_change: int) -> bytes:
    """A ``Changes`` response: the replica's applied log sequence and the highest log sequence
    that wrote into any of the ranges asked about."""
    return _U8.pack(VERSION) + _CHANGES.pack(applied, last_change)


def decode_changes(data: bytes) -> tuple[int, int]:
    r = _Reader(data, "changes")
    applied, last = r.unpack(_CHANGES)
    r.end()
    return applied, last


# The fields of a head replica's status (``store.replica.HeadReplica.status``); a querier or
# adapter reports a replica it cannot reach with the same fields, unknown ones null.
STATUS_FIELDS = ("stream", "replica", "applied_seq", "checkpoint_seq", "stream_first_seq", "stream_last_seq",
                 "stream_leader", "stream_error", "lag", "ready", "healthy", "error", "series", "min_valid_time_ms")


def encode_status(status: dict) -> bytes:
    """A ``Status`` response: a JSON object of the replica's status (strings, numbers, booleans)."""
    return _U8.pack(VERSION) + json.dumps(status, sort_keys=True, default=str).encode()


def decode_status(data: bytes) -> dict:
    r = _Reader(data, "status")
    try:
        status = json.loads(data[r.pos:])
    except ValueError as e:
        raise DecodeError(f"status: not JSON: {e}") from None
    if not isinstance(status, dict):
        raise DecodeError(f"status: a JSON {type(status).__name__}, not an object")
    return status


# ---- server -----------------------------------------------------------------------------------


class _NotReady(Exception):
    """The replica's status says it is not ready; answered with UNAVAILABLE."""


def _status_of(e: Exception) -> tuple[grpc.StatusCode, str, str]:
    """The gRPC status code, details and ``flashback-error`` value answering ``e``."""
    if isinstance(e, (InvalidMatcher, DecodeError, UnsupportedVersion)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e), type(e).__name__
    if isinstance(e, _NotReady):
        return grpc.StatusCode.UNAVAILABLE, str(e), "NotReady"
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", type(e).__name__


class HeadService:
    """Serves ``querier`` (a head replica's head) and ``status`` over gRPC at ``address``.

    Args:
        querier: what ``Select``, ``Series``, ``LabelNames`` and ``LabelValues`` read.
        status: the replica's status (replica name, shard, applied and last stream sequence,
            lag, ``ready``, series count: a flat dict of strings, numbers and booleans).
        ready: checked before every data request; while it returns False those are answered
            with ``UNAVAILABLE``. Without it, ``status()`` is called instead and its ``ready``
            key (True if missing) decides, so it must then be cheap.
        address: ``HOST:PORT`` to bind; port 0 picks a free one (see ``port``).
        registry: where to register ``flashback_headrpc_*`` metrics (none if None).
        workers: threads answering calls; each running call holds one.
        batch_bytes: size at which a response message is closed.
        checkpoint: the replica's latest durable checkpoint, ``(stream sequence, items)``,
            served by ``Checkpoint`` to a peer that lost its own (answered whether or not
            the replica is ready); without it ``Checkpoint`` is not served.
        changes: ``(applied log sequence, highest log sequence that wrote into any of the
            ranges)`` for ``Changes`` (a querier's results cache; answered whether or not the
            replica is ready); without it ``Changes`` is not served.

    ``start`` binds and serves; ``close`` stops, letting running calls finish for ``grace_s``.
    """

    def __init__(self, querier: Querier, status: Callable[[], dict], *, address: str,
                 registry: CollectorRegistry | None = None, ready: Callable[[], bool] | None = None,
                 workers: int = 8, batch_bytes: int = BATCH_BYTES,
                 checkpoint: Callable[[], tuple[int, Iterable[tuple[bytes, bytes]]]] | None = None,
                 changes: Callable[[Sequence[tuple[int, int]]], tuple[int, int]] | None = None) -> None:
        self._querier = querier
        self._checkpoint = checkpoint
        self._changes = changes
        self._ready = ready
        self._batch_bytes = batch_bytes
        self._status = status
        self.address = address
        self._workers = workers
        self._server: grpc.Server | None = None
        self._port = 0
        self._m_requests = self._m_duration = self._m_sent = None
        if registry is not None:
            self._m_requests = Counter("flashback_headrpc_requests_total",
                                       "gRPC calls answered by the head service, by method and status code.",
                                       ["method", "code"], registry=registry)
            self._m_duration = Histogram("flashback_headrpc_request_duration_seconds",
                                         "Time to answer a head service call, including streaming the response.",
                                         ["method"], registry=registry)
            self._m_sent = Counter("flashback_headrpc_sent_bytes_total",
                                   "Response message bytes sent by the head service.", ["method"], registry=registry)

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        return self._port

    def start(self) -> "HeadService":
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Select": grpc.unary_stream_rpc_method_handler(self._wrap_stream("Select", self._select)),
            "Series": grpc.unary_stream_rpc_method_handler(self._wrap_stream("Series", self._series)),
            "LabelNames": grpc.unary_stream_rpc_method_handler(self._wrap_stream("LabelNames", self._label_names)),
            "LabelValues": grpc.unary_stream_rpc_method_handler(self._wrap_stream("LabelValues", self._label_values)),
            "Status": grpc.unary_unary_rpc_method_handler(self._wrap_unary("Status", self._status_call)),
            **({"Checkpoint": grpc.unary_stream_rpc_method_handler(
                self._wrap_stream("Checkpoint", self._checkpoint_call))} if self._checkpoint else {}),
            **({"Changes": grpc.unary_unary_rpc_method_handler(
                self._wrap_unary("Changes", self._changes_call))} if self._changes else {}),
        })
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="headrpc"),
            handlers=[handler],
            options=[("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
                     ("grpc.max_receive_message_length", _MAX_REQUEST_BYTES),
                     ("grpc.max_send_message_length", _MAX_RESPONSE_BYTES)])
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as e:
            port, cause = 0, e
        else:
            cause = None
        if not port:
            server.stop(None)
            raise OSError(f"head gRPC service cannot bind {self.address}: {cause or 'address in use?'}")
        server.start()
        self._server, self._port = server, port
        log.info("head gRPC service listening", extra={"address": self.address, "port": port})
        return self

    def close(self, grace_s: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()

    def __enter__(self) -> "HeadService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Handlers take the request bytes and return/yield response bytes; errors are mapped by the
    # wrappers in one place.

    def _check_ready(self) -> None:
        if self._ready is not None and self._ready():
            return
        st = self._status()
        if self._ready is not None or not st.get("ready", True):
            where = " ".join(f"{k}={st[k]}" for k in ("replica", "shard", "lag") if k in st)
            raise _NotReady(f"head replica is not ready ({where or 'catching up'})")

    def _select(self, request: bytes) -> Iterator[bytes]:
        self._check_ready()
        matchers, mint, maxt, hints = decode_select_request(request)
        return encode_series_batches(self._querier.select(matchers, mint, maxt, hints),
                                     batch_bytes=self._batch_bytes)

    def _series(self, request: bytes) -> Iterator[bytes]:
        self._check_ready()
        matchers, mint, maxt, hints = decode_select_request(request)
        return encode_series_batches(self._querier.select(matchers, mint, maxt, hints), chunks=False,
                                     batch_bytes=self._batch_bytes)

    def _label_names(self, request: bytes) -> Iterator[bytes]:
        self._check_ready()
        _, matchers, mint, maxt = decode_labels_request(request)
        return encode_string_batches(self._querier.label_names(matchers, mint, maxt), batch_bytes=self._batch_bytes)

    def _label_values(self, request: bytes) -> Iterator[bytes]:
        self._check_ready()
        name, matchers, mint, maxt = decode_labels_request(request)
        return encode_string_batches(self._querier.label_values(name, matchers, mint, maxt),
                                     batch_bytes=self._batch_bytes)

    def _checkpoint_call(self, request: bytes) -> Iterator[bytes]:
        _Reader(request, "checkpoint request").end()
        assert self._checkpoint is not None
        seq, items = self._checkpoint()
        return encode_checkpoint_batches(seq, items, batch_bytes=self._batch_bytes)

    def _changes_call(self, request: bytes) -> bytes:
        assert self._changes is not None
        return encode_changes(*self._changes(decode_changes_request(request)))

    def _status_call(self, request: bytes) -> bytes:
        _Reader(request, "status request").end()
        return encode_status(self._status())

    def _fail(self, method: str, e: Exception, context: grpc.ServicerContext) -> None:
        code, details, kind = _status_of(e)
        if code is grpc.StatusCode.INTERNAL:
            log.error("head gRPC call failed", exc_info=e, extra={"method": method})
        context.set_trailing_metadata(((ERROR_KEY, kind),))
        context.abort(code, details)  # raises

    def _record(self, method: str, code: str, start: float, sent: int) -> None:
        if self._m_requests is not None:
            self._m_requests.labels(method, code).inc()
            self._m_duration.labels(method).observe(time.perf_counter() - start)
            self._m_sent.labels(method).inc(sent)

    def _wrap_stream(self, method: str, body: Callable[[bytes], Iterator[bytes]]):
        def handle(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            start = time.perf_counter()
            code, sent = "CANCELLED", 0  # unless the stream ends or fails
            try:
                for msg in body(request):
                    sent += len(msg)
                    yield msg
                code = "OK"
            except Exception as e:
                code = _status_of(e)[0].name
                self._fail(method, e, context)
            finally:
                self._record(method, code, start, sent)
        return handle

    def _wrap_unary(self, method: str, body: Callable[[bytes], bytes]):
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            start = time.perf_counter()
            code, sent = "OK", 0
            try:
                msg = body(request)
                sent = len(msg)
                return msg
            except Exception as e:
                code = _status_of(e)[0].name
                self._fail(method, e, context)
            finally:
                self._record(method, code, start, sent)
        return handle


# ---- client -----------------------------------------------------------------------------------


class RemoteSeries:
    """A series received from a head replica (``store.storage.Series``): its chunks as the head
    stores them, decoded on each ``samples()`` call and clipped to the selected range."""

    __slots__ = ("labels", "_chunks", "_mint", "_maxt")

    def __init__(self, labels: Labels, chunks: list[Chunk], mint: int, maxt: int) -> None:
        self.labels = labels
        self._chunks = chunks
        self._mint = mint
        self._maxt = maxt

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._chunks:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        for c in self._chunks:
            if c.encoding != ENCODING_XOR:
                raise CorruptChunk(f"series {self.labels}: chunk encoding {c.encoding} is not XOR")
        if len(self._chunks) == 1:  # the common case, without decode_many's set-up
            ts, vals = xorfast.decode(self._chunks[0].data)
            if ts.shape[0] and (ts[0] < self._mint or ts[-1] > self._maxt):
                keep = (ts >= self._mint) & (ts <= self._maxt)
                ts, vals = ts[keep], vals[keep]
            return ts, vals
        return xorfast.decode_many([c.data for c in self._chunks], self._mint, self._maxt)

    def chunks(self) -> Iterator[Chunk]:
        return iter(self._chunks)

    def __repr__(self) -> str:
        return f"RemoteSeries({self.labels})"


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", _MAX_REQUEST_BYTES),
    ("grpc.enable_http_proxy", 0),
    # A restarted replica should be used again within about a second, not after gRPC's default
    # exponential backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class RemoteHead:
    """A head replica's ``Querier`` over gRPC, plus its ``status`` and ``series``.

    Thread-safe; one channel (connection) per instance, opened lazily and reconnected as needed.
    Every call is bounded by ``timeout_s`` (the whole stream of a ``select``). Errors are
    ``store.errors`` types: ``ReplicaUnavailable`` (unreachable, not ready, timed out; ask
    another replica), ``ReplicaError`` (the replica failed otherwise), ``InvalidMatcher``,
    ``DecodeError``, ``UnsupportedVersion``. ``close`` releases the channel.
    """

    def __init__(self, address: str, *, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        stream = self._channel.unary_stream
        self._select_rpc = stream(f"/{SERVICE}/Select")
        self._series_rpc = stream(f"/{SERVICE}/Series")
        self._label_names_rpc = stream(f"/{SERVICE}/LabelNames")
        self._label_values_rpc = stream(f"/{SERVICE}/LabelValues")
        self._status_rpc = self._channel.unary_unary(f"/{SERVICE}/Status")
        self._checkpoint_rpc = stream(f"/{SERVICE}/Checkpoint")
        self._changes_rpc = self._channel.unary_unary(f"/{SERVICE}/Changes")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RemoteHead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteHead({self.address!r})"

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[RemoteSeries]:
        req = encode_select_request(matchers, mint, maxt, hints)
        mint, maxt = _clamp(mint), _clamp(maxt)
        budget = hints.budget if hints is not None else None
        out: list[RemoteSeries] = []
        for msg in self._stream("Select", self._select_rpc, req):
            batch = decode_series_batch(msg)
            if budget is not None:  # charged per streamed batch, before anything is decoded
                budget.take(sum(xorfast.num_samples(c.data) for _, chunks in batch for c in chunks))
            out.extend(RemoteSeries(labels, chunks, mint, maxt) for labels, chunks in batch)
        return out

    def series(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[Labels]:
        """Label sets of the series ``select`` would return, without their data, sorted."""
        req = encode_select_request(matchers, mint, maxt)
        return [labels for msg in self._stream("Series", self._series_rpc, req)
                for labels, _ in decode_series_batch(msg)]

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        req = encode_labels_request("", matchers, mint, maxt)
        return [s for msg in self._stream("LabelNames", self._label_names_rpc, req) for s in decode_string_batch(msg)]

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        req = encode_labels_request(name, matchers, mint, maxt)
        return [s for msg in self._stream("LabelValues", self._label_values_rpc, req)
                for s in decode_string_batch(msg)]

    def status(self) -> dict:
        """The replica's status as its ``HeadService`` was given it (answers while not ready too)."""
        try:
            msg = self._status_rpc(_U8.pack(VERSION), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._error("Status", e) from None
        return decode_status(msg)

    def changes(self, ranges: Sequence[tuple[int, int]], timeout_s: float | None = None) -> tuple[int, int]:
        """``(applied log sequence, highest log sequence that wrote into any of ranges)`` of the
        replica (answers while not ready too), within ``timeout_s`` (default ``self.timeout_s``)."""
        req = encode_changes_request([(_clamp(a), _clamp(b)) for a, b in ranges])
        try:
            msg = self._changes_rpc(req, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as e:
            raise self._error("Changes", e) from None
        return decode_changes(msg)

    def checkpoint(self, timeout_s: float = 600.0) -> tuple[int, Iterator[tuple[bytes, bytes]]]:
        """The replica's latest durable checkpoint: ``(stream sequence, items)``.

        The items are streamed as they are iterated (all within ``timeout_s``); the iterator
        raises ``DecodeError`` if the stream ends without its last message or changes its
        sequence, and the errors of the other calls if the replica fails meanwhile.
        """
        messages = self._stream("Checkpoint", self._checkpoint_rpc, _U8.pack(VERSION), timeout_s)
        try:
            seq, last, first = decode_checkpoint_batch(next(messages))
        except StopIteration:
            raise DecodeError(f"Checkpoint on head replica {self.address}: empty stream") from None
        except BaseException:
            messages.close()
            raise

        def items() -> Iterator[tuple[bytes, bytes]]:
            done = last
            try:
                yield from first
                for msg in messages:
                    if done:
                        raise DecodeError(f"Checkpoint on head replica {self.address}: messages after the last")
                    s, done, batch = decode_checkpoint_batch(msg)
                    if s != seq:
                        raise DecodeError(f"Checkpoint on head replica {self.address}: sequence {s} after {seq}")
                    yield from batch
                if not done:
                    raise DecodeError(f"Checkpoint on head replica {self.address}: stream ended before its last "
                                      f"message")
            finally:
                messages.close()

        return seq, items()

    def _stream(self, method: str, rpc: grpc.UnaryStreamMultiCallable, request: bytes,
                timeout_s: float | None = None) -> Iterator[bytes]:
        call = rpc(request, timeout=timeout_s or self.timeout_s)
        try:
            yield from call
        except grpc.RpcError as e:
            raise self._error(method, e) from None
        finally:
            call.cancel()  # no-op once the stream has ended; frees it if the caller stopped early

    def _error(self, method: str, e: grpc.RpcError) -> StorageError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else None) or str(code)
        kind = ""
        if hasattr(e, "trailing_metadata"):
            kind = dict(e.trailing_metadata() or ()).get(ERROR_KEY, "")
        msg = f"{method} on head replica {self.address}: {details}"
        if code in _UNAVAILABLE_CODES:
            return ReplicaUnavailable(f"{msg} ({code.name})")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return _ARGUMENT_ERRORS.get(kind, InvalidMatcher)(msg)
        return ReplicaError(f"{msg} ({code.name})")


def peer_checkpoint(peers: Sequence[tuple[str, str]], need: int, *, timeout_s: float = 10.0
                    ) -> tuple[str, int, Iterator[tuple[bytes, bytes]]] | None:
    """The checkpoint of the first of ``peers`` (``(name, HOST:PORT)`` of head replicas of the
    same shard) that serves one at stream sequence ``need`` or above, as ``(name, seq, items)``;
    ``None`` if none does. Unreachable peers and older checkpoints are skipped (logged). The
    items are streamed as they are iterated; the channel closes with the iterator."""
    for name, address in peers:
        client = RemoteHead(address, timeout_s=timeout_s)
        try:
            seq, items = client.checkpoint()
        except (ReplicaError, DecodeError, UnsupportedVersion) as e:
            client.close()
            log.warning("peer checkpoint not available", extra={"peer": name, "address": address, "err": str(e)})
            continue
        if seq < need:
            items.close()  # type: ignore[attr-defined]
            client.close()
            log.warning("peer checkpoint too old", extra={"peer": name, "seq": seq, "needed": need})
            continue

        def closing(items: Iterator[tuple[bytes, bytes]] = items, client: RemoteHead = client
                    ) -> Iterator[tuple[bytes, bytes]]:
            try:
                yield from items
            finally:
                client.close()

        return name, seq, closing()
    return None
