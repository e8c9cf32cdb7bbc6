"""``POST /api/v1/read``: Prometheus remote read, as ``storage/remote/read_handler.go`` serves it.

The body is a snappy block-compressed ``prometheus.ReadRequest`` (see
:mod:`adapter.prompb`). The response type is the first of the request's
``accepted_response_types`` this server supports, in the client's order;
``SAMPLES`` when the list is empty:

* ``SAMPLES``: one snappy-compressed ``ReadResponse`` with a ``QueryResult``
  per query, ``Content-Type: application/x-protobuf``, ``Content-Encoding:
  snappy``. A query returning more than ``max_samples_per_query`` samples
  fails the request (400, "exceeded sample limit (N)").
* ``STREAMED_XOR_CHUNKS``: a chunked HTTP body of CRC-32C framed
  ``ChunkedReadResponse`` messages, each holding one series (a series whose
  chunks exceed ``max_bytes_in_frame`` continues in further frames) and the
  index of its query. Chunks are the stored XOR chunks overlapping the query's
  time range; one reaching outside the range is re-encoded with only the
  samples inside it, as Prometheus' TSDB trims chunks at the query's edges, so
  both response types carry the same samples. Prometheus applies no sample
  limit to this response type, and neither do we.

The time range is the query's ``[start_timestamp_ms, end_timestamp_ms]``; the
hints go to the querier as ``SelectHints`` (which may use them to read less) but
do not narrow the range, whereas Prometheus' TSDB clips to the hints' range when
hints are present. Prometheus' own client sends hints no wider than the query.

Status codes: 400 for undecodable snappy or protobuf, unsupported response
types, unknown matcher types, invalid regular expressions and the sample
limit; 500 when the querier fails. Prometheus answers 500 for the two matcher
errors; they are the client's fault, so we say so. All queries are selected
before the first byte is sent, so every error of a streamed response still
gets its status code; an error while a stream is under way (a corrupt chunk)
aborts the connection so the client sees a truncated response.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Sequence

import cramjam
from prometheus_client import CollectorRegistry, Counter, Gauge

from adapter import prompb
from adapter.prompb import MatcherType, ReadRequest, ResponseType
from adapter.remote_write import snappy_message
from store import xorfast
from store.chunks import ENCODING_XOR, Chunk
from store.errors import DecodeError, InvalidMatcher
from store.httpserver import Request, Response, Router
from store.matchers import Matcher, MatchType
from store.storage import Querier, SelectHints, Series

log = logging.getLogger(__name__)

DECODE_READ_LIMIT = 32 << 20  # Prometheus' decodeReadLimit, for the body and its decoded size.

SAMPLES_CONTENT_TYPE = "application/x-protobuf"
STREAMED_CONTENT_TYPE = "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"

_SUPPORTED = (ResponseType.SAMPLES, ResponseType.STREAMED_XOR_CHUNKS)

_MATCH_TYPES = {
    MatcherType.EQ: MatchType.EQ,
    MatcherType.NEQ: MatchType.NEQ,
    MatcherType.RE: MatchType.RE,
    MatcherType.NRE: MatchType.NRE,
}


class BadReadRequest(ValueError):
    """A request the client must change: answered with 400 and this message."""


class RemoteReadHandler:
    """Serves remote read from the queriers ``querier_factory`` returns, one per request.

    Args:
        querier_factory: returns the ``Querier`` a request reads from (the head in one process).
        max_samples_per_query: the ``SAMPLES`` response fails with 400 when one query
            selects more samples; 0 or less means no limit (Prometheus'
            ``--storage.remote.read-sample-limit``, same default).
        max_bytes_in_frame: a streamed frame is closed once its chunks reach this many
            bytes (Prometheus' ``--storage.remote.read-max-bytes-in-frame``, same default).
        registry: where the handler's metrics are registered; ``None`` registers nowhere.
    """

    def __init__(self, querier_factory: Callable[[], Querier], *, max_samples_per_query: int = 50_000_000,
                 max_bytes_in_frame: int = 1 << 20, registry: CollectorRegistry | None = None) -> None:
        self._querier_factory = querier_factory
        self.max_samples_per_query = max_samples_per_query
        self.max_bytes_in_frame = max_bytes_in_frame
        self._in_flight = Gauge("flashback_remote_read_queries",
                                "Remote read requests being answered, streams included.", registry=registry)
        self._requests = Counter("flashback_remote_read_requests_total",
                                 "Remote read requests by negotiated response type and status code.",
                                 ["response_type", "code"], registry=registry)
        self._samples = Counter("flashback_remote_read_samples_total",
                                "Samples sent in SAMPLES remote read responses.", registry=registry)
        self._chunks = Counter("flashback_remote_read_chunks_total",
                               "Chunks sent in streamed remote read responses.", registry=registry)

    def route(self, router: Router) -> None:
        """Registers ``POST /api/v1/read`` on ``router``."""
        router.route("/api/v1/read", self, ("POST",), name="remote_read", max_body=DECODE_READ_LIMIT)

    def __call__(self, req: Request) -> Response:
        rtype = "unknown"
        try:
            read = _decode_body(req.body)
            response_type = negotiate_response_type(read.accepted_response_types)
            rtype = response_type.name.lower()
            if response_type is ResponseType.STREAMED_XOR_CHUNKS:
                resp = self._streamed(read)
            else:
                resp = self._samples_response(read)
        except BadReadRequest as e:
            resp = Response(400, f"{e}\n".encode())
        except Exception as e:  # noqa: BLE001 - any querier failure is the server's: 500
            log.error("remote read query", extra={"err": repr(e)})
            resp = Response(500, f"{str(e) or type(e).__name__}\n".encode())
        self._requests.labels(rtype, str(resp.status)).inc()
        return resp

    def _samples_response(self, read: ReadRequest) -> Response:
        self._in_flight.inc()
        try:
            querier = self._querier_factory()
            results = []
            for query in read.queries:
                series = _select(querier, query)
                results.append(self._query_result(series))
            body = cramjam.snappy.compress_raw(prompb.encode_read_response(results))
        finally:
            self._in_flight.dec()
        return Response(200, bytes(body), SAMPLES_CONTENT_TYPE, {"Content-Encoding": "snappy"})

    def _query_result(self, series: Sequence[Series]) -> bytes:
        limit = self.max_samples_per_query
        total = 0
        selected = []
        for s in series:
            ts, vals = s.samples()
            total += len(ts)
            if 0 < limit < total:
                raise BadReadRequest(f"exceeded sample limit ({limit})")
            selected.append((s.labels, ts, vals))
        self._samples.inc(total)
        return prompb.encode_query_result(selected)

    def _streamed(self, read: ReadRequest) -> Response:
        querier = self._querier_factory()
        selected = [(query, _select(querier, query)) for query in read.queries]
        return Response(200, self._frames(selected), STREAMED_CONTENT_TYPE)

    def _frames(self, selected: list[tuple[prompb.Query, list[Series]]]) -> Iterator[bytes]:
        self._in_flight.inc()
        try:
            for index, (query, series) in enumerate(selected):
                for s in series:
                    yield from self._series_frames(s, index, query.start_timestamp_ms, query.end_timestamp_ms)
        except Exception as e:
            # The status line is gone; dropping the connection is the only way left to say so.
            log.error("remote read stream", extra={"err": repr(e)})
            raise
        finally:
            self._in_flight.dec()

    def _series_frames(self, series: Series, index: int, mint: int, maxt: int) -> Iterator[bytes]:
        """Frames of one series, cut as Prometheus' ``StreamChunkedReadResponses`` cuts them.

        A frame gets chunks until the label and chunk message sizes reach
        ``max_bytes_in_frame`` (it may exceed it by up to one chunk).
        """
        labels = prompb.encode_labels(series.labels)
        max_data = self.max_bytes_in_frame - prompb.labels_size(series.labels)
        left = max_data
        pending: list[bytes] = []
        chunks = trim_chunks(series.chunks(), mint, maxt)
        chunk = next(chunks, None)
        while chunk is not None:
            body = prompb.encode_chunk(chunk)
            pending.append(body)
            left -= len(body)
            chunk = next(chunks, None)
            if left > 0 and chunk is not None:
                continue
            self._chunks.inc(len(pending))
            yield prompb.frame(prompb.encode_chunked_read_response(labels, pending, index))
            pending = []
            left = max_data


def trim_chunks(chunks: Iterable[Chunk], mint: int, maxt: int) -> Iterator[Chunk]:
    """The chunks overlapping ``[mint, maxt]``, those reaching outside it cut to the samples inside.

    A cut chunk is re-encoded and its ``mint``/``maxt`` become those of its first
    and last remaining sample; one with no sample left is dropped (Prometheus
    ``tsdb/querier.go`` trims with deletion intervals before and after the range).

    Raises:
        CorruptChunk: a chunk that needs cutting does not decode.
    """
    for c in chunks:
        if c.maxt < mint or c.mint > maxt:
            continue
        if (c.mint >= mint and c.maxt <= maxt) or c.encoding != ENCODING_XOR:
            yield c
            continue
        ts, vals = xorfast.decode(bytes(c.data))
        keep = (ts >= mint) & (ts <= maxt)
        if not keep.any():
            continue
        ts, vals = ts[keep], vals[keep]
        yield Chunk(int(ts[0]), int(ts[-1]), xorfast.encode(ts, vals), ENCODING_XOR)


def negotiate_response_type(accepted: Sequence[int]) -> ResponseType:
    """The first of ``accepted`` this server supports; ``SAMPLES`` for an empty list.

    Raises:
        BadReadRequest: none of them is supported.
    """
    if not accepted:
        return ResponseType.SAMPLES
    for t in accepted:
        if t in _SUPPORTED:
            return ResponseType(t)
    names = ", ".join(ResponseType(t).name if t in _SUPPORTED else str(t) for t in accepted)
    raise BadReadRequest(f"server does not support any of the requested response types: [{names}]; "
                         f"supported: [SAMPLES, STREAMED_XOR_CHUNKS]")


def to_matchers(matchers: Sequence[prompb.LabelMatcher]) -> list[Matcher]:
    """Matchers of the store from protobuf ones.

    Raises:
        BadReadRequest: an unknown matcher type or an invalid regular expression.
    """
    out = []
    for m in matchers:
        if m.type not in _MATCH_TYPES.keys():
            raise BadReadRequest(f"invalid matcher type {m.type} for label {m.name!r}")
        try:
            out.append(Matcher(_MATCH_TYPES[MatcherType(m.type)], m.name, m.value))
        except InvalidMatcher as e:
            raise BadReadRequest(str(e)) from None
    return out


def _decode_body(body: bytes) -> ReadRequest:
    try:
        size = cramjam.snappy.decompress_raw_len(body)
    except cramjam.DecompressionError as e:
        raise BadReadRequest(snappy_message(e)) from None
    if size > DECODE_READ_LIMIT:
        raise BadReadRequest(f"snappy: decoded length {size} exceeds limit {DECODE_READ_LIMIT}")
    try:
        raw = cramjam.snappy.decompress_raw(body).read()
    except cramjam.DecompressionError as e:
        raise BadReadRequest(snappy_message(e)) from None
    try:
        return prompb.decode_read_request(raw)
    except DecodeError as e:
        raise BadReadRequest(f"invalid protobuf ReadRequest: {e}") from None


def _select(querier: Querier, query: prompb.Query) -> list[Series]:
    matchers = to_matchers(query.matchers)
    hints = None
    if query.hints is not None:
        h = query.hints
        hints = SelectHints(start=h.start_ms, end=h.end_ms, step=h.step_ms, range=h.range_ms, func=h.func)
    return querier.select(matchers, query.start_timestamp_ms, query.end_timestamp_ms, hints)
