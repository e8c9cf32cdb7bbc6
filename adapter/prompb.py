"""The remote-read messages of Prometheus' ``prompb`` (remote.proto, types.proto), hand-written.

A protobuf wire codec without I/O and without generated code: the request side
(``ReadRequest`` and what it holds) is decoded into frozen values, the response
side (``ReadResponse`` for ``SAMPLES``, ``ChunkedReadResponse`` frames for
``STREAMED_XOR_CHUNKS``) is encoded straight from labels, numpy sample arrays
and stored chunks. Field numbers and wire types::

    ReadRequest         1 queries: Query (repeated)   2 accepted_response_types: enum (repeated, packed or not)
    Query               1 start_timestamp_ms: int64   2 end_timestamp_ms: int64
                        3 matchers: LabelMatcher (repeated)   4 hints: ReadHints
    LabelMatcher        1 type: enum (EQ=0, NEQ=1, RE=2, NRE=3)   2 name: string   3 value: string
    ReadHints           1 step_ms  2 func: string  3 start_ms  4 end_ms  5 grouping: string (repeated)
                        6 by: bool  7 range_ms   (the *_ms fields are int64)
    ReadResponse        1 results: QueryResult (repeated)
    QueryResult         1 timeseries: TimeSeries (repeated)
    TimeSeries          1 labels: Label (repeated)   2 samples: Sample (repeated)
    Label               1 name: string   2 value: string
    Sample              1 value: double   2 timestamp: int64
    ChunkedReadResponse 1 chunked_series: ChunkedSeries (repeated)   2 query_index: int64
    ChunkedSeries       1 labels: Label (repeated)   2 chunks: Chunk (repeated)
    Chunk               1 min_time_ms: int64  2 max_time_ms: int64  3 type: enum (XOR=1)  4 data: bytes

int64 fields are plain varints of the two's-complement value (negative numbers
take 10 bytes), not zigzag. As proto3 does, encoders leave out scalar fields
holding their zero value; unlike gogo-protobuf, which Prometheus uses, a
``-0.0`` sample value is written (its bits are not zero), so the sign survives.

A streamed response is a sequence of frames: ``uvarint(len(msg))``, the
big-endian CRC-32C (Castagnoli) of ``msg``, then ``msg`` (Prometheus
``storage/remote/chunked.go``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import numba
import numpy as np

from store.chunks import Chunk
from store.errors import DecodeError

# Wire types.
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

_U64 = (1 << 64) - 1


class ResponseType(enum.IntEnum):
    """``ReadRequest.ResponseType``."""

    SAMPLES = 0
    STREAMED_XOR_CHUNKS = 1


class MatcherType(enum.IntEnum):
    """``LabelMatcher.Type``; a decoded matcher may carry a number outside this enum."""

    EQ = 0
    NEQ = 1
    RE = 2
    NRE = 3


@dataclass(frozen=True, slots=True)
class LabelMatcher:
    type: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReadHints:
    step_ms: int = 0
    func: str = ""
    start_ms: int = 0
    end_ms: int = 0
    grouping: tuple[str, ...] = ()
    by: bool = False
    range_ms: int = 0


@dataclass(frozen=True, slots=True)
class Query:
    start_timestamp_ms: int
    end_timestamp_ms: int
    matchers: tuple[LabelMatcher, ...] = ()
    hints: ReadHints | None = None


@dataclass(frozen=True, slots=True)
class ReadRequest:
    queries: tuple[Query, ...] = ()
    accepted_response_types: tuple[int, ...] = ()


# --- wire primitives ----------------------------------------------------------


_ONE_BYTE = [bytes((i,)) for i in range(128)]


def uvarint(x: int) -> bytes:
    """The base-128 varint of an unsigned 64-bit integer."""
    if x < 0x80:
        return _ONE_BYTE[x]
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _int64(x: int) -> bytes:
    """An int64 field's varint: the two's-complement bits as unsigned."""
    return uvarint(x & _U64)


def _key(field: int, wire: int) -> bytes:
    return uvarint((field << 3) | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + uvarint(len(payload)) + payload


def _read_uvarint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("unexpected end of message inside a varint")
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise DecodeError("varint overflows 64 bits")
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _fields(buf: bytes, pos: int, end: int, message: str):
    """Yields ``(field, wire, value)`` of one message; ``value`` is an int or a (start, stop) slice.

    Fields of unknown numbers are yielded too, so callers skip them; groups are rejected.
    """
    while pos < end:
        key, pos = _read_uvarint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise DecodeError(f"{message}: illegal field number 0")
        if wire == _VARINT:
            value, pos = _read_uvarint(buf, pos, end)
        elif wire == _I64:
            if pos + 8 > end:
                raise DecodeError(f"{message}: unexpected end of message in a fixed64 field")
            value, pos = (pos, pos + 8), pos + 8
        elif wire == _LEN:
            n, pos = _read_uvarint(buf, pos, end)
            if n > end - pos:
                raise DecodeError(f"{message}: field {field} has length {n} but only {end - pos} bytes remain")
            value, pos = (pos, pos + n), pos + n
        elif wire == _I32:
            if pos + 4 > end:
                raise DecodeError(f"{message}: unexpected end of message in a fixed32 field")
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise DecodeError(f"{message}: unsupported wire type {wire} for field {field}")
        yield field, wire, value


def _expect(message: str, field: int, wire: int, want: int) -> None:
    if wire != want:
        raise DecodeError(f"{message}: wrong wire type {wire} for field {field}")


def _string(buf: bytes, span: tuple[int, int], what: str) -> str:
    try:
        return buf[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not valid UTF-8") from None


# --- request decoding -----------------------------------------------------------


def decode_read_request(data: bytes) -> ReadRequest:
    """Decodes a (decompressed) ``prometheus.ReadRequest``.

    Raises:
        DecodeError: the bytes are not a valid ReadRequest; the message says where.
    """
    data = bytes(data)
    queries: list[Query] = []
    types: list[int] = []
    for field, wire, v in _fields(data, 0, len(data), "ReadRequest"):
        if field == 1:
            _expect("ReadRequest", field, wire, _LEN)
            queries.append(_decode_query(data, *v, len(queries)))
        elif field == 2:
            if wire == _VARINT:
                types.append(_signed(v))
            elif wire == _LEN:  # packed
                pos, stop = v
                while pos < stop:
                    t, pos = _read_uvarint(data, pos, stop)
                    types.append(_signed(t))
            else:
                _expect("ReadRequest", field, wire, _VARINT)
    return ReadRequest(tuple(queries), tuple(types))


def _decode_query(buf: bytes, start: int, stop: int, index: int) -> Query:
    what = f"ReadRequest.queries[{index}]"
    mint = maxt = 0
    matchers: list[LabelMatcher] = []
    hints: list[bytes] = []
    for field, wire, v in _fields(buf, start, stop, what):
        if field in (1, 2):
            _expect(what, field, wire, _VARINT)
            if field == 1:
                mint = _signed(v)
            else:
                maxt = _signed(v)
        elif field == 3:
            _expect(what, field, wire, _LEN)
            matchers.append(_decode_matcher(buf, *v, f"{what}.matchers[{len(matchers)}]"))
        elif field == 4:
            _expect(what, field, wire, _LEN)
            hints.append(buf[v[0]:v[1]])
    # A message field seen more than once is merged, which for protobuf equals decoding the concatenation.
    h = _decode_hints(b"".join(hints), f"{what}.hints") if hints else None
    return Query(mint, maxt, tuple(matchers), h)


def _decode_matcher(buf: bytes, start: int, stop: int, what: str) -> LabelMatcher:
    mtype = 0
    name = value = ""
    for field, wire, v in _fields(buf, start, stop, what):
        if field == 1:
            _expect(what, field, wire, _VARINT)
            mtype = _signed(v)
        elif field == 2:
            _expect(what, field, wire, _LEN)
            name = _string(buf, v, f"{what}.name")
        elif field == 3:
            _expect(what, field, wire, _LEN)
            value = _string(buf, v, f"{what}.value")
    return LabelMatcher(mtype, name, value)


def _decode_hints(buf: bytes, what: str) -> ReadHints:
    ints = {1: 0, 3: 0, 4: 0, 7: 0}
    func = ""
    grouping: list[str] = []
    by = False
    for field, wire, v in _fields(buf, 0, len(buf), what):
        if field in ints:
            _expect(what, field, wire, _VARINT)
            ints[field] = _signed(v)
        elif field == 2:
            _expect(what, field, wire, _LEN)
            func = _string(buf, v, f"{what}.func")
        elif field == 5:
            _expect(what, field, wire, _LEN)
            grouping.append(_string(buf, v, f"{what}.grouping"))
        elif field == 6:
            _expect(what, field, wire, _VARINT)
            by = v != 0
    return ReadHints(step_ms=ints[1], func=func, start_ms=ints[3], end_ms=ints[4],
                     grouping=tuple(grouping), by=by, range_ms=ints[7])


def encode_read_request(req: ReadRequest) -> bytes:
    """Encodes a ``ReadRequest`` (the client side; tools and tests use it). Response types are packed."""
    out = [_len_field(1, _encode_query(q)) for q in req.queries]
    if req.accepted_response_types:
        out.append(_len_field(2, b"".join(_int64(t) for t in req.accepted_response_types)))
    return b"".join(out)


def _encode_query(q: Query) -> bytes:
    out = []
    if q.start_timestamp_ms:
        out.append(_key(1, _VARINT) + _int64(q.start_timestamp_ms))
    if q.end_timestamp_ms:
        out.append(_key(2, _VARINT) + _int64(q.end_timestamp_ms))
    for m in q.matchers:
        mtype = _key(1, _VARINT) + _int64(m.type) if m.type else b""
        body = mtype + _string_field(2, m.name) + _string_field(3, m.value)
        out.append(_len_field(3, body))
    if q.hints is not None:
        h = q.hints
        body = b"".join([
            _key(1, _VARINT) + _int64(h.step_ms) if h.step_ms else b"",
            _string_field(2, h.func),
            _key(3, _VARINT) + _int64(h.start_ms) if h.start_ms else b"",
            _key(4, _VARINT) + _int64(h.end_ms) if h.end_ms else b"",
            *(_len_field(5, g.encode()) for g in h.grouping),
            _key(6, _VARINT) + b"\x01" if h.by else b"",
            _key(7, _VARINT) + _int64(h.range_ms) if h.range_ms else b"",
        ])
        out.append(_len_field(4, body))
    return b"".join(out)


def _string_field(field: int, s: str) -> bytes:
    return _len_field(field, s.encode()) if s else b""


# --- response encoding ------------------------------------------------------------


def encode_label(name: str, value: str) -> bytes:
    """One ``Label`` message's body (without its field key and length)."""
    return _string_field(1, name) + _string_field(2, value)


def labels_size(labels: Iterable[tuple[str, str]]) -> int:
    """The summed sizes of the ``Label`` message bodies, as Prometheus counts them to cut frames."""
    total = 0
    for name, value in labels:
        nb, vb = len(name.encode()), len(value.encode())
        total += (nb + len(uvarint(nb)) + 1 if nb else 0) + (vb + len(uvarint(vb)) + 1 if vb else 0)
    return total


def encode_labels(labels: Iterable[tuple[str, str]]) -> bytes:
    """Repeated ``Label`` fields (field 1 of TimeSeries and ChunkedSeries)."""
    out = []
    for name, value in labels:
        nb, vb = name.encode(), value.encode()
        size = len(nb) + len(vb) + 4
        if size < 128 and nb and vb:  # The usual case: every length fits one varint byte.
            out.append(bytes((0x0A, size, 0x0A, len(nb))) + nb + bytes((0x12, len(vb))) + vb)
        else:
            out.append(_len_field(1, encode_label(name, value)))
    return b"".join(out)


@numba.njit(cache=True, nogil=True, inline="always")
def _sample_size(t, vb):
    """Bytes of one Sample message's body: value unless its bits are 0, timestamp unless 0."""
    size = 0
    if vb != np.uint64(0):
        size += 9
    if t != np.uint64(0):
        size += 2
        x = t >> np.uint64(7)
        while x != np.uint64(0):
            size += 1
            x >>= np.uint64(7)
    return size


@numba.njit(cache=True, nogil=True, inline="always")
def _put_uvarint(out, pos, x):
    while x >= np.uint64(0x80):
        out[pos] = np.uint8((x & np.uint64(0x7F)) | np.uint64(0x80))
        x >>= np.uint64(7)
        pos += 1
    out[pos] = np.uint8(x)
    return pos + 1


@numba.njit(cache=True, nogil=True)
def _samples_into(ts, vbits, lo, hi, out, pos):
    """Writes ``TimeSeries.samples`` (field 2) of samples ``lo:hi`` into ``out`` from ``pos``; returns the end."""
    for i in range(lo, hi):
        vb = vbits[i]
        t = np.uint64(ts[i])
        out[pos] = 0x12
        out[pos + 1] = _sample_size(t, vb)  # At most 20: one length byte.
        pos += 2
        if vb != np.uint64(0):
            out[pos] = 0x09
            for k in range(8):
                out[pos + 1 + k] = np.uint8((vb >> np.uint64(8 * k)) & np.uint64(0xFF))
            pos += 9
        if t != np.uint64(0):
            out[pos] = 0x10
            pos = _put_uvarint(out, pos + 1, t)
    return pos


@numba.njit(cache=True, nogil=True)
def _query_result_into(lab, lab_off, ts, vbits, smp_off, out):
    """Writes a QueryResult body: per series a TimeSeries field of its labels and samples."""
    pos = 0
    for s in range(lab_off.shape[0] - 1):
        a, b = smp_off[s], smp_off[s + 1]
        size = lab_off[s + 1] - lab_off[s]
        for i in range(a, b):
            size += 2 + _sample_size(np.uint64(ts[i]), vbits[i])
        out[pos] = 0x0A
        pos = _put_uvarint(out, pos + 1, np.uint64(size))
        for k in range(lab_off[s], lab_off[s + 1]):
            out[pos] = lab[k]
            pos += 1
        pos = _samples_into(ts, vbits, a, b, out, pos)
    return pos


MAX_SAMPLE_BYTES = 22  # The longest encoding of one Sample field in a TimeSeries.


def encode_samples(ts: np.ndarray, vals: np.ndarray) -> bytes:
    """Repeated ``Sample`` fields (field 2 of TimeSeries) of int64 ms timestamps and float64 values."""
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    vbits = np.ascontiguousarray(vals, dtype=np.float64).view(np.uint64)
    if ts.shape[0] != vbits.shape[0]:
        raise ValueError(f"{ts.shape[0]} timestamps but {vbits.shape[0]} values")
    out = np.empty(MAX_SAMPLE_BYTES * ts.shape[0], dtype=np.uint8)
    return out[:_samples_into(ts, vbits, 0, ts.shape[0], out, 0)].tobytes()


def encode_timeseries(labels: Iterable[tuple[str, str]], ts: np.ndarray, vals: np.ndarray) -> bytes:
    """One ``TimeSeries`` message's body."""
    return encode_labels(labels) + encode_samples(ts, vals)


def encode_query_result(series: Sequence[tuple[Iterable[tuple[str, str]], np.ndarray, np.ndarray]]) -> bytes:
    """A ``QueryResult`` body: one ``TimeSeries`` per ``(labels, timestamps, values)``, in one compiled pass.

    Raises:
        ValueError: a series has more timestamps than values or the reverse.
    """
    n = len(series)
    if n == 0:
        return b""
    labels = [encode_labels(lb) for lb, _, _ in series]
    ts_parts = [np.asarray(t, dtype=np.int64) for _, t, _ in series]
    val_parts = [np.asarray(v, dtype=np.float64) for _, _, v in series]
    counts = np.fromiter((p.shape[0] for p in ts_parts), dtype=np.int64, count=n)
    if any(t.shape != v.shape for t, v in zip(ts_parts, val_parts)):
        raise ValueError("a series has a different number of timestamps and values")
    lab_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, labels), dtype=np.int64, count=n), out=lab_off[1:])
    smp_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=smp_off[1:])
    ts = np.concatenate(ts_parts)
    vbits = np.concatenate(val_parts).view(np.uint64)
    lab = np.frombuffer(b"".join(labels), dtype=np.uint8)
    out = np.empty(lab.shape[0] + MAX_SAMPLE_BYTES * ts.shape[0] + 11 * n, dtype=np.uint8)
    return out[:_query_result_into(lab, lab_off, ts, vbits, smp_off, out)].tobytes()


def encode_read_response(results: Sequence[bytes]) -> bytes:
    """A ``ReadResponse`` from ``QueryResult`` bodies, one per query in order."""
    return b"".join(_len_field(1, r) for r in results)


def encode_chunk(chunk: Chunk) -> bytes:
    """One ``Chunk`` message's body."""
    out = []
    if chunk.mint:
        out.append(_key(1, _VARINT) + _int64(chunk.mint))
    if chunk.maxt:
        out.append(_key(2, _VARINT) + _int64(chunk.maxt))
    if chunk.encoding:
        out.append(_key(3, _VARINT) + _int64(chunk.encoding))
    if chunk.data:
        out.append(_len_field(4, bytes(chunk.data)))
    return b"".join(out)


def encode_chunked_read_response(labels_field: bytes, chunks: Iterable[bytes], query_index: int) -> bytes:
    """A ``ChunkedReadResponse`` holding one series.

    Args:
        labels_field: the series' labels as :func:`encode_labels` returns them.
        chunks: ``Chunk`` bodies (:func:`encode_chunk`).
        query_index: index of the query in the request.
    """
    series = labels_field + b"".join(_len_field(2, c) for c in chunks)
    out = _len_field(1, series)
    if query_index:
        out += _key(2, _VARINT) + _int64(query_index)
    return out


# --- framing ------------------------------------------------------------------------


def _crc32c_table() -> np.ndarray:
    poly = 0x82F63B78  # Castagnoli, reflected.
    table = np.zeros((8, 256), dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[0, i] = c
    for i in range(256):
        c = int(table[0, i])
        for k in range(1, 8):
            c = int(table[0, c & 0xFF]) ^ (c >> 8)
            table[k, i] = c
    return table


_CRC_TABLE = _crc32c_table()


@numba.njit(cache=True, nogil=True)
def _crc32c(data, table):
    """CRC-32C of a uint8 array, eight bytes per step ("slicing-by-8")."""
    crc = np.uint32(0xFFFFFFFF)
    n = data.shape[0]
    i = 0
    while i + 8 <= n:
        lo = crc ^ (np.uint32(data[i]) | (np.uint32(data[i + 1]) << np.uint32(8))
                    | (np.uint32(data[i + 2]) << np.uint32(16)) | (np.uint32(data[i + 3]) << np.uint32(24)))
        crc = (table[7, lo & np.uint32(0xFF)] ^ table[6, (lo >> np.uint32(8)) & np.uint32(0xFF)]
               ^ table[5, (lo >> np.uint32(16)) & np.uint32(0xFF)] ^ table[4, lo >> np.uint32(24)]
               ^ table[3, data[i + 4]] ^ table[2, data[i + 5]] ^ table[1, data[i + 6]] ^ table[0, data[i + 7]])
        i += 8
    while i < n:
        crc = table[0, (crc ^ np.uint32(data[i])) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
        i += 1
    return crc ^ np.uint32(0xFFFFFFFF)


def crc32c(data: bytes) -> int:
    """The CRC-32C (Castagnoli) checksum Prometheus' chunked stream uses."""
    return int(_crc32c(np.frombuffer(data, dtype=np.uint8), _CRC_TABLE))


def frame(msg: bytes) -> bytes:
    """One frame of a streamed response: uvarint length, big-endian CRC-32C, then ``msg``."""
    return uvarint(len(msg)) + struct.pack(">I", crc32c(msg)) + msg
