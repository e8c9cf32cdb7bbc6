"""Blocks: immutable, columnar files of one time range in a bucket (format versions 1 and 2).

A block is the long-term form of a closed window of the head: under ``<ULID>/`` in
a bucket, a Parquet data file of samples, a Parquet index of the series, and
``meta.json``, uploaded last so that its presence means "complete" (Thanos' rule).
The byte format is specified in ``store/docs/format/block.md``; in short:

* ``data.parquet``: columns ``ref`` (series), ``t`` (ms) and ``v``, one row per
  sample, sorted by series then time, cut into row groups of a fixed row count;
  zstd with DELTA_BINARY_PACKED ``ref``/``t`` and BYTE_STREAM_SPLIT ``v``, CRC32
  on every page, min/max statistics on ``t``.
* ``index.parquet``: one row per series in label order: ``ref``, series ``id``
  (``Labels.hash()``), canonical label bytes, first and last timestamp, and the
  series' first row and row count in the data file.
* ``meta.json``: ULID, ``[minTime, maxTime)``, counts, resolution, compaction
  level and sources, external labels, and every file's size and SHA-256.

``write_block`` streams series into temporary files and uploads them;
``encode_block`` is the codec underneath, writing into file objects. A
``BlockReader`` implements ``store.storage.Querier``: it reads ``meta.json`` when
opened, the index and the data file's footer once on first use, and for each
``select`` only the ``t`` and ``v`` column chunks of the row groups that hold the
selected series in the selected time range, by coalesced range GETs. Every byte
it uses is checked: the index against ``meta.json``'s SHA-256, the data footer
against a SHA-256 in the index, data pages by their CRC32. ``verify_block``
checks everything, for ``flashback bucket verify`` and the compactor.

Version 2 blocks hold downsampled data (resolution > 0): per series and interval
the ``count``, ``sum``, ``min``, ``max`` and ``counter`` aggregates
(``Aggregates``), written by ``write_aggregate_block`` and selected as
``AggregateSeries``; the index adds each series' first and last raw value.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store import ulid as ulids
from store.bucket import DIR_DELIM, Bucket
from store.cache import Cache, CacheMetrics
from store.errors import (
    BlockError, CorruptBlock, IncompleteBlock, ObjectNotFound, TruncatedBlock,
    UnsupportedBlockVersion,
)
from store.labels import SEP, Labels
from store.matchers import Matcher
from store.postings import MemPostings
from store.storage import ArraySeries, SelectHints

FORMAT = "flashback-block"
VERSION = 1  # raw samples (resolution 0)
AGGREGATE_VERSION = 2  # downsampled aggregates (resolution > 0)
VERSIONS = (VERSION, AGGREGATE_VERSION)

META_FILE = "meta.json"
DATA_FILE = "data.parquet"
INDEX_FILE = "index.parquet"

DEFAULT_ROWS_PER_GROUP = 65_536
DEFAULT_COMPRESSION_LEVEL = 3

KV_VERSION = b"flashback.block.version"
KV_FOOTER_BYTES = b"flashback.block.data_footer_bytes"
KV_FOOTER_SHA256 = b"flashback.block.data_footer_sha256"

DATA_SCHEMA = pa.schema([
    pa.field("ref", pa.uint32(), nullable=False),
    pa.field("t", pa.int64(), nullable=False),
    pa.field("v", pa.float64(), nullable=False),
])
INDEX_SCHEMA = pa.schema([
    pa.field("ref", pa.uint32(), nullable=False),
    pa.field("id", pa.uint64(), nullable=False),
    pa.field("labels", pa.binary(), nullable=False),
    pa.field("mint", pa.int64(), nullable=False),
    pa.field("maxt", pa.int64(), nullable=False),
    pa.field("first_row", pa.int64(), nullable=False),
    pa.field("num_rows", pa.int64(), nullable=False),
])

# Version 2 (downsampled): one row per series and interval of ``resolution`` ms that holds samples.
AGGREGATE_DATA_SCHEMA = pa.schema([
    pa.field("ref", pa.uint32(), nullable=False),
    pa.field("t", pa.int64(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
    pa.field("sum", pa.float64(), nullable=False),
    pa.field("min", pa.float64(), nullable=False),
    pa.field("max", pa.float64(), nullable=False),
    pa.field("counter_xor_max", pa.float64(), nullable=False),
    pa.field("start_t", pa.int64(), nullable=False),
    pa.field("start_counter_xor_min", pa.float64(), nullable=False),
])
AGGREGATE_COLUMNS = ("count", "sum", "min", "max", "counter")
AGGREGATE_INDEX_SCHEMA = pa.schema(list(INDEX_SCHEMA) + [
    pa.field("first_t", pa.int64(), nullable=False),
    pa.field("first_v", pa.float64(), nullable=False),
    pa.field("last_v", pa.float64(), nullable=False),
])

# pyarrow reads this much of a file's end to find its footer.
_FOOTER_READ_SIZE = 64 * 1024
# Byte ranges of a select closer than this are fetched with one range GET.
_COALESCE_GAP = 16 * 1024
# Chunk size of streamed downloads (verify).
_DOWNLOAD_CHUNK = 16 * 1024 * 1024
_MIN_INT64 = -(1 << 63)
_MAX_INT64 = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# meta.json


@dataclass(frozen=True, slots=True)
class BlockFile:
    """One file of a block: its name relative to the block directory, size and SHA-256 (hex)."""

    rel_path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """The contents of a block's ``meta.json`` (see ``store/docs/format/block.md``).

    ``min_time``/``max_time`` bound the block's samples as Prometheus' do:
    ``min_time <= t < max_time`` (ms). ``resolution`` is the sample spacing of
    downsampled data in ms, 0 for raw samples. ``sources`` are the ULIDs of the
    level-1 blocks whose data this block holds (itself for a level-1 block).
    ``labels`` are external labels shared by all series of the block (shard,
    replica, tenant), not part of the series' labels. ``version`` 1 blocks hold
    raw samples (resolution 0), version 2 blocks per-interval aggregates
    (resolution > 0); ``num_samples`` counts data rows (aggregates for version 2).
    """

    ulid: str
    min_time: int
    max_time: int
    num_series: int
    num_samples: int
    resolution: int = 0
    level: int = 1
    sources: tuple[str, ...] = ()
    labels: Labels = field(default_factory=Labels)
    files: tuple[BlockFile, ...] = ()
    version: int = VERSION

    def file(self, rel_path: str) -> BlockFile:
        """The entry of ``rel_path``; raises CorruptBlock if meta.json does not list it."""
        for f in self.files:
            if f.rel_path == rel_path:
                return f
        raise CorruptBlock(f"block {self.ulid}: meta.json lists no file {rel_path!r}")

    def to_json(self) -> bytes:
        doc = {
            "ulid": self.ulid,
            "minTime": self.min_time,
            "maxTime": self.max_time,
            "stats": {"numSeries": self.num_series, "numSamples": self.num_samples},
            "compaction": {"level": self.level, "sources": list(self.sources)},
            "resolution": self.resolution,
            "labels": dict(self.labels),
            "files": [{"relPath": f.rel_path, "sizeBytes": f.size_bytes, "sha256": f.sha256} for f in self.files],
            "format": FORMAT,
            "version": self.version,
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, context: str = "meta.json") -> "BlockMeta":
        """Parses and validates a meta.json document.

        Raises:
            UnsupportedBlockVersion: another format or a version other than 1.
            CorruptBlock: not JSON, or a field is missing or of the wrong type.
        """
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptBlock(f"{context}: not valid JSON: {err}") from None
        if not isinstance(doc, dict):
            raise CorruptBlock(f"{context}: not a JSON object")
        fmt, version = doc.get("format"), doc.get("version")
        if fmt != FORMAT:
            raise UnsupportedBlockVersion(f"{context}: format {fmt!r} is not {FORMAT!r} "
                                          "(a Prometheus TSDB block, or not a block at all?)")
        if version not in VERSIONS or not isinstance(version, int) or isinstance(version, bool):
            raise UnsupportedBlockVersion(f"{context}: format version {version!r} is not supported "
                                          f"(this reader knows versions {', '.join(map(str, VERSIONS))})")
        try:
            stats, compaction = doc["stats"], doc["compaction"]
            files = tuple(BlockFile(_str(f["relPath"]), _int(f["sizeBytes"]), _sha(f["sha256"]))
                          for f in _list(doc["files"]))
            labels = doc.get("labels") or {}
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                raise TypeError("labels must map names to strings")
            meta = cls(
                ulid=_ulid(doc["ulid"]),
                min_time=_int(doc["minTime"]),
                max_time=_int(doc["maxTime"]),
                num_series=_int(stats["numSeries"]),
                num_samples=_int(stats["numSamples"]),
                resolution=_int(doc.get("resolution", 0)),
                level=_int(compaction["level"]),
                sources=tuple(_ulid(s) for s in _list(compaction["sources"])),
                labels=Labels.from_dict(labels),
                files=files,
                version=version,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptBlock(f"{context}: invalid field: {type(err).__name__}: {err}") from None
        if meta.min_time >= meta.max_time:
            raise CorruptBlock(f"{context}: minTime {meta.min_time} is not below maxTime {meta.max_time}")
        if (meta.version == AGGREGATE_VERSION) != (meta.resolution > 0) or meta.resolution < 0:
            raise CorruptBlock(f"{context}: version {meta.version} with resolution {meta.resolution} "
                               "(version 1 holds raw samples, resolution 0; version 2 aggregates, resolution > 0)")
        for name in (DATA_FILE, INDEX_FILE):
            meta.file(name)
        return meta


def _int(x: object) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < _MIN_INT64 or x > _MAX_INT64:
        raise TypeError(f"{x!r} is not a 64-bit integer")
    return x


def _str(x: object) -> str:
    if not isinstance(x, str) or not x:
        raise TypeError(f"{x!r} is not a non-empty string")
    return x


def _list(x: object) -> list:
    if not isinstance(x, list):
        raise TypeError(f"{x!r} is not a list")
    return x


def _sha(x: object) -> str:
    if not isinstance(x, str) or len(x) != 64 or any(c not in "0123456789abcdef" for c in x):
        raise TypeError(f"{x!r} is not a lower-case hex SHA-256")
    return x


def _ulid(x: object) -> str:
    if not ulids.is_valid(x):
        raise ValueError(f"{x!r} is not a ULID")
    return x  # type: ignore[return-value]


def read_meta(bucket: Bucket, ulid: str) -> BlockMeta:
    """The meta.json of block ``ulid``.

    Raises:
        IncompleteBlock: there is no meta.json.
        UnsupportedBlockVersion, CorruptBlock: it cannot be used.
        BucketError: the bucket failed.
    """
    name = ulid + DIR_DELIM + META_FILE
    try:
        data = bucket.get(name)
    except ObjectNotFound:
        raise IncompleteBlock(f"block {ulid}: no {META_FILE} (not uploaded completely, being deleted, "
                              "or no such block)") from None
    meta = BlockMeta.from_json(data, f"block {ulid}: {META_FILE}")
    if meta.ulid != ulid:
        raise CorruptBlock(f"block {ulid}: {META_FILE} names block {meta.ulid}")
    return meta


def list_blocks(bucket: Bucket) -> list[str]:
    """ULIDs of the complete blocks (with a meta.json) at the root of ``bucket``, sorted."""
    out = []
    for entry in bucket.iter(""):
        if entry.endswith(DIR_DELIM) and ulids.is_valid(entry[:-1]):
            if bucket.exists(entry + META_FILE):
                out.append(entry[:-1])
    return out


# ---------------------------------------------------------------------------------------------
# Writing


SeriesData = tuple[Labels, np.ndarray, np.ndarray]


class EncodedFile(NamedTuple):
    """Size and SHA-256 of an encoded file, and its last 8 bytes (the Parquet trailer)."""

    size: int
    sha256: str
    trailer: bytes


class EncodedBlock(NamedTuple):
    num_series: int
    num_samples: int
    data: EncodedFile
    index: EncodedFile


class _HashingWriter(io.RawIOBase):
    """Passes writes through to ``out`` while counting and hashing them."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self._size = 0
        self._tail = b""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        self._out.write(view)
        self._hash.update(view)
        self._size += len(view)
        self._tail = bytes(view[-8:]) if len(view) >= 8 else (self._tail + bytes(view))[-8:]
        return len(view)

    def tell(self) -> int:
        return self._size

    def close(self) -> None:
        # The caller owns ``out``; pyarrow may close this wrapper.
        super().close()

    def result(self) -> EncodedFile:
        return EncodedFile(self._size, self._hash.hexdigest(), self._tail)


def interval_of(ts: np.ndarray, resolution: int) -> np.ndarray:
    """The number ``k`` of the downsampling interval ``((k - 1) * resolution, k * resolution]`` of
    each timestamp: intervals are right-closed like PromQL's range windows ``(t - range, t]``, so
    a window ending on an interval boundary holds whole intervals."""
    return -((-ts) // resolution)


def _xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The float64 whose bit pattern is ``a``'s XOR ``b``'s: how ``counter`` and ``start_counter``
    are stored (against ``max`` and ``min``, which they equal for counters without resets, so
    most stored values are zero and cost next to nothing compressed). Its own inverse, lossless."""
    return (np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)
            ^ np.ascontiguousarray(b, dtype=np.float64).view(np.uint64)).view(np.float64)


def _decode_counters(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``counter`` and ``start_counter`` from their stored XOR forms."""
    cols["counter"] = _xor(cols.pop("counter_xor_max"), cols["max"])
    cols["start_counter"] = _xor(cols.pop("start_counter_xor_min"), cols["min"])
    return cols


class Aggregates(NamedTuple):
    """Per-interval aggregates of one series in one downsampled block (format version 2).

    Row ``i`` summarises the samples of interval ``((k - 1) * resolution, k * resolution]``
    (``interval_of``) with ``t[i]`` the timestamp of its last sample: their ``count``, ``sum``, ``min`` and
    ``max``, and ``counter``, the series' value read as a counter, reset-adjusted from the
    block's first sample on (``first_v`` plus every increase since, a decrease counting as a
    reset to zero). ``first_t``/``first_v`` are the block's first sample of the series and
    ``last_v`` the value of its last (at ``t[-1]``): readers join counters across blocks with
    them (``store/docs/format/block.md``). ``start_t`` and ``start_counter`` are the
    timestamp of each interval's first sample and the counter there (None: every interval
    holds one sample, so they equal ``t`` and ``counter``): with them a rate over a single
    interval has two points, as raw data has.
    """

    t: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    min: np.ndarray
    max: np.ndarray
    counter: np.ndarray
    first_t: int
    first_v: float
    last_v: float
    start_t: np.ndarray | None = None
    start_counter: np.ndarray | None = None

    def starts(self) -> tuple[np.ndarray, np.ndarray]:
        """``start_t`` and ``start_counter``, defaulting to ``t`` and ``counter``."""
        return (self.t if self.start_t is None else self.start_t,
                self.counter if self.start_counter is None else self.start_counter)

    def rows(self, i: int, j: int) -> "Aggregates":
        """Rows ``i`` to ``j`` (exclusive), the block's first and last values unchanged."""
        st, sc = self.starts()
        return Aggregates(self.t[i:j], self.count[i:j], self.sum[i:j], self.min[i:j], self.max[i:j],
                          self.counter[i:j], self.first_t, self.first_v, self.last_v, st[i:j], sc[i:j])


AggregateData = tuple[Labels, Aggregates]

_RAW_ENCODING = {"ref": "DELTA_BINARY_PACKED", "t": "DELTA_BINARY_PACKED", "v": "BYTE_STREAM_SPLIT"}
_AGGREGATE_ENCODING = {"ref": "DELTA_BINARY_PACKED", "t": "DELTA_BINARY_PACKED", "count": "DELTA_BINARY_PACKED",
                       "sum": "BYTE_STREAM_SPLIT", "min": "BYTE_STREAM_SPLIT", "max": "BYTE_STREAM_SPLIT",
                       "counter_xor_max": "BYTE_STREAM_SPLIT", "start_t": "DELTA_BINARY_PACKED",
                       "start_counter_xor_min": "BYTE_STREAM_SPLIT"}


def encode_block(series: Iterable[SeriesData], data_out: BinaryIO, index_out: BinaryIO, *,
                 min_time: int, max_time: int, rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> EncodedBlock:
    """Encodes series into a data file and an index file (the codec under ``write_block``).

    Args:
        series: ``(labels, timestamps, values)`` sorted by labels, each label set once;
            timestamps (int64 ms) strictly increasing within ``[min_time, max_time)``,
            values float64 of the same length. Series without samples are left out.
        data_out, index_out: binary files the two Parquet files are written to, not closed;
            ``data_out`` must also be readable and seekable: the footer is read back to hash it
            into the index, which lets readers trust the footer without reading the whole file.
        rows_per_group: samples per row group of the data file, the unit a reader fetches.
        compression_level: zstd level.

    Raises:
        ValueError: the series break one of the rules above.
    """
    def rows() -> Iterator[tuple[Labels, np.ndarray, list[np.ndarray], tuple]]:
        for labels, ts, vs in series:
            ts, vs = _check_series(labels, ts, vs, min_time, max_time)
            if len(ts):
                yield labels, ts, [vs], ()

    return _encode(rows(), data_out, index_out, VERSION, DATA_SCHEMA, _RAW_ENCODING, INDEX_SCHEMA,
                   min_time=min_time, max_time=max_time, rows_per_group=rows_per_group,
                   compression_level=compression_level)


def encode_aggregate_block(series: Iterable[AggregateData], data_out: BinaryIO, index_out: BinaryIO, *,
                           resolution: int, min_time: int, max_time: int,
                           rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
                           compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> EncodedBlock:
    """Encodes downsampled series (format version 2) into a data file and an index file.

    Args:
        series: ``(labels, aggregates)`` sorted by labels, each label set once; at most one row
            per interval of ``resolution`` ms, rows in time order within ``[min_time, max_time)``,
            ``count >= 1``, ``min <= max``, ``first_t <= t[0]``. Series without rows are left out.
        resolution: the interval length in ms (> 0).
        The rest as for ``encode_block``.

    Raises:
        ValueError: the series break one of the rules above.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")

    def rows() -> Iterator[tuple[Labels, np.ndarray, list[np.ndarray], tuple]]:
        for labels, a in series:
            ts = np.asarray(a.t)
            if not isinstance(a, Aggregates):
                raise ValueError(f"series {labels}: aggregates must be Aggregates, got {type(a).__name__}")
            ts, _ = _check_series(labels, ts, np.asarray(a.sum), min_time, max_time)
            if not len(ts):
                continue
            start_t, start_counter = a.starts()
            mn, mx = np.asarray(a.min, dtype=np.float64), np.asarray(a.max, dtype=np.float64)
            cols = ([np.asarray(a.count, dtype=np.int64), np.asarray(a.sum, dtype=np.float64), mn, mx,
                     _xor(np.asarray(a.counter, dtype=np.float64), mx)]
                    + [np.asarray(start_t, dtype=np.int64), _xor(np.asarray(start_counter, dtype=np.float64), mn)])
            if any(len(c) != len(ts) for c in cols):
                raise ValueError(f"series {labels}: aggregate columns of different lengths")
            k = interval_of(ts, resolution)
            if len(k) > 1 and not (np.diff(k) > 0).all():
                raise ValueError(f"series {labels}: two rows in one interval of {resolution} ms")
            st = cols[5]
            if (st > ts).any() or (interval_of(st, resolution) != k).any() or ((cols[0] == 1) & (st != ts)).any():
                raise ValueError(f"series {labels}: a start_t after t, in another interval, or not t for one sample")
            if (cols[0] < 1).any() or (cols[2] > cols[3]).any():
                raise ValueError(f"series {labels}: a row with count < 1 or min > max")
            if not min_time <= a.first_t <= int(ts[0]):
                raise ValueError(f"series {labels}: first_t {a.first_t} outside [{min_time}, {int(ts[0])}]")
            yield labels, ts, cols, (int(a.first_t), float(a.first_v), float(a.last_v))

    return _encode(rows(), data_out, index_out, AGGREGATE_VERSION, AGGREGATE_DATA_SCHEMA, _AGGREGATE_ENCODING,
                   AGGREGATE_INDEX_SCHEMA, min_time=min_time, max_time=max_time,
                   rows_per_group=rows_per_group, compression_level=compression_level)


def _check_series(labels: Labels, ts, vs, min_time: int, max_time: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(labels, Labels):
        raise ValueError(f"series labels must be Labels, got {type(labels).__name__}")
    ts = np.asarray(ts)
    vs = np.asarray(vs)
    if ts.ndim != 1 or vs.ndim != 1 or len(ts) != len(vs):
        raise ValueError(f"series {labels}: timestamps and values must be 1-D of one length, "
                         f"got shapes {ts.shape} and {vs.shape}")
    if len(ts) == 0:
        return ts, vs
    if ts.dtype.kind not in "iu" or vs.dtype.kind != "f":
        raise ValueError(f"series {labels}: want integer timestamps and float values, "
                         f"got {ts.dtype} and {vs.dtype}")
    ts = ts.astype(np.int64, copy=False)
    vs = vs.astype(np.float64, copy=False)
    if len(ts) > 1 and not (np.diff(ts) > 0).all():
        raise ValueError(f"series {labels}: timestamps are not strictly increasing")
    first, last = int(ts[0]), int(ts[-1])
    if first < min_time or last >= max_time:
        raise ValueError(f"series {labels}: samples from {first} to {last} outside the block's "
                         f"[{min_time}, {max_time})")
    return ts, vs


def _encode(rows: Iterable[tuple[Labels, np.ndarray, list[np.ndarray], tuple]], data_out: BinaryIO,
            index_out: BinaryIO, version: int, data_schema: pa.Schema, encoding: dict[str, str],
            index_schema: pa.Schema, *, min_time: int, max_time: int, rows_per_group: int,
            compression_level: int) -> EncodedBlock:
    """The encoder of both layouts: ``rows`` yields (labels, t, value columns, extra index values)."""
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be positive, got {rows_per_group}")
    if min_time >= max_time:
        raise ValueError(f"min_time {min_time} must be below max_time {max_time}")
    data_w = _HashingWriter(data_out)
    writer = pq.ParquetWriter(
        data_w, data_schema, compression="zstd", compression_level=compression_level, use_dictionary=False,
        column_encoding=encoding, write_statistics=["t"], write_page_checksum=True, store_schema=False)
    ids: list[int] = []
    keys: list[bytes] = []
    mints: list[int] = []
    maxts: list[int] = []
    counts: list[int] = []
    extras: list[tuple] = []
    pending: list[list[np.ndarray]] = []
    buffered = 0
    prev: Labels | None = None

    def flush(final: bool) -> None:
        nonlocal pending, buffered
        cols = [np.concatenate([p[i] for p in pending]) for i in range(len(data_schema))]
        n = len(cols[0])
        full = n if final else n - n % rows_per_group
        if full:
            table = pa.Table.from_arrays([pa.array(c[:full]) for c in cols], schema=data_schema)
            writer.write_table(table, row_group_size=rows_per_group)
        pending = [[c[full:] for c in cols]] if full < n else []
        buffered = n - full

    try:
        for labels, ts, values, extra in rows:
            if prev is not None and not prev < labels:
                raise ValueError(f"series are not sorted by labels: {labels} after {prev}")
            prev = labels
            ref = len(keys)
            ids.append(labels.hash())
            keys.append(labels.canonical())
            mints.append(int(ts[0]))
            maxts.append(int(ts[-1]))
            counts.append(len(ts))
            extras.append(extra)
            pending.append([np.full(len(ts), ref, dtype=np.uint32), ts, *values])
            buffered += len(ts)
            if buffered >= rows_per_group:
                flush(False)
        if pending:
            flush(True)
        writer.add_key_value_metadata({KV_VERSION: str(version)})
    finally:
        writer.close()
    data = data_w.result()
    footer_bytes = int.from_bytes(data.trailer[:4], "little") + 8
    data_out.flush()

    counts_a = np.array(counts, dtype=np.int64)
    first_rows = np.concatenate(([0], np.cumsum(counts_a)[:-1])).astype(np.int64) if counts else counts_a
    columns = [
        pa.array(np.arange(len(keys), dtype=np.uint32)),
        pa.array(np.array(ids, dtype=np.uint64)),
        pa.array(keys, type=pa.binary()),
        pa.array(np.array(mints, dtype=np.int64)),
        pa.array(np.array(maxts, dtype=np.int64)),
        pa.array(first_rows),
        pa.array(counts_a),
    ]
    index_encoding = {"ref": "DELTA_BINARY_PACKED", "mint": "DELTA_BINARY_PACKED", "maxt": "DELTA_BINARY_PACKED",
                      "first_row": "DELTA_BINARY_PACKED", "num_rows": "DELTA_BINARY_PACKED"}
    for j, f in enumerate(list(index_schema)[len(INDEX_SCHEMA):]):
        columns.append(pa.array([e[j] for e in extras], type=f.type))
        if f.type == pa.int64():
            index_encoding[f.name] = "DELTA_BINARY_PACKED"
    index = pa.Table.from_arrays(columns, schema=index_schema)
    index_w = _HashingWriter(index_out)
    iw = pq.ParquetWriter(
        index_w, index_schema, compression="zstd", compression_level=compression_level,
        use_dictionary=False, write_statistics=False, write_page_checksum=True, store_schema=False,
        column_encoding=index_encoding)
    try:
        iw.write_table(index, row_group_size=max(1, len(keys)))
        iw.add_key_value_metadata({KV_VERSION: str(version), KV_FOOTER_BYTES: str(footer_bytes),
                                   KV_FOOTER_SHA256: _footer_sha(data_out, data.size, footer_bytes)})
    finally:
        iw.close()
    return EncodedBlock(len(keys), int(counts_a.sum()), data, index_w.result())


def _footer_sha(data_out: BinaryIO, size: int, footer_bytes: int) -> str:
    """SHA-256 of the last ``footer_bytes`` of the data file, read back from ``data_out``."""
    pos = data_out.tell()
    data_out.seek(size - footer_bytes)
    digest = hashlib.sha256(data_out.read(footer_bytes)).hexdigest()
    data_out.seek(pos)
    return digest


def _wall_ms() -> int:
    return int(time.time() * 1000)


def write_block(bucket: Bucket, series: Iterable[SeriesData], *, min_time: int, max_time: int,
                resolution: int = 0, level: int = 1, sources: Sequence[str] = (),
                external_labels: Mapping[str, str] | None = None, ulid: str | None = None,
                now: Callable[[], int] = _wall_ms, rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
                compression_level: int = DEFAULT_COMPRESSION_LEVEL, tmp_dir: str | None = None) -> BlockMeta:
    """Writes a block of ``series`` to ``bucket`` under ``<ULID>/``; ``meta.json`` is uploaded last.

    Args:
        bucket: where the block goes.
        series: as for ``encode_block``: sorted by labels, samples in ``[min_time, max_time)``.
        min_time, max_time: the block's time range in ms, ``max_time`` exclusive.
        resolution: must be 0 (raw samples); kept for compatibility of calls.
        level: compaction level, 1 for a block made from a head window.
        sources: ULIDs of the level-1 blocks merged into this one; empty: the block itself.
        external_labels: labels of the whole block (shard, replica); recorded in meta.json.
        ulid: the block's ULID; default a new one for ``now()``.
        now: the clock (ms) for a new ULID.
        rows_per_group, compression_level: see ``encode_block``.
        tmp_dir: directory for the temporary files (default: the system's).

    Returns:
        The uploaded meta.json's contents.

    Raises:
        ValueError: invalid arguments or series.
        BucketError: an upload failed; the block has no meta.json then and stays invisible.
    """
    block = ulid if ulid is not None else ulids.new(now())
    if not ulids.is_valid(block):
        raise ValueError(f"invalid block ULID {block!r}")
    for s in sources:
        if not ulids.is_valid(s):
            raise ValueError(f"invalid source ULID {s!r}")
    if level < 1 or resolution < 0:
        raise ValueError(f"level must be at least 1 and resolution not negative, got {level} and {resolution}")
    if resolution:
        raise ValueError(f"raw samples are resolution 0, got {resolution}; downsampled blocks are written "
                         "by write_aggregate_block")

    def encode(data_f: BinaryIO, index_f: BinaryIO) -> EncodedBlock:
        return encode_block(series, data_f, index_f, min_time=min_time, max_time=max_time,
                            rows_per_group=rows_per_group, compression_level=compression_level)

    return _write(bucket, encode, VERSION, block, min_time, max_time, resolution, level, sources,
                  external_labels, tmp_dir)


def write_aggregate_block(bucket: Bucket, series: Iterable[AggregateData], *, resolution: int, min_time: int,
                          max_time: int, level: int = 1, sources: Sequence[str] = (),
                          external_labels: Mapping[str, str] | None = None, ulid: str | None = None,
                          now: Callable[[], int] = _wall_ms, rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
                          compression_level: int = DEFAULT_COMPRESSION_LEVEL,
                          tmp_dir: str | None = None) -> BlockMeta:
    """Writes a downsampled block (format version 2) of ``series`` at ``resolution`` ms.

    Arguments as for ``write_block`` and ``encode_aggregate_block``; ``meta.json`` is uploaded last.
    """
    block = ulid if ulid is not None else ulids.new(now())
    if not ulids.is_valid(block):
        raise ValueError(f"invalid block ULID {block!r}")
    for s in sources:
        if not ulids.is_valid(s):
            raise ValueError(f"invalid source ULID {s!r}")
    if level < 1 or resolution <= 0:
        raise ValueError(f"level must be at least 1 and resolution positive, got {level} and {resolution}")

    def encode(data_f: BinaryIO, index_f: BinaryIO) -> EncodedBlock:
        return encode_aggregate_block(series, data_f, index_f, resolution=resolution, min_time=min_time,
                                      max_time=max_time, rows_per_group=rows_per_group,
                                      compression_level=compression_level)

    return _write(bucket, encode, AGGREGATE_VERSION, block, min_time, max_time, resolution, level, sources,
                  external_labels, tmp_dir)


def _write(bucket: Bucket, encode: Callable[[BinaryIO, BinaryIO], EncodedBlock], version: int, block: str,
           min_time: int, max_time: int, resolution: int, level: int, sources: Sequence[str],
           external_labels: Mapping[str, str] | None, tmp_dir: str | None) -> BlockMeta:
    with tempfile.TemporaryFile(dir=tmp_dir) as data_f, tempfile.TemporaryFile(dir=tmp_dir) as index_f:
        enc = encode(data_f, index_f)
        meta = BlockMeta(
            ulid=block, min_time=min_time, max_time=max_time, num_series=enc.num_series,
            num_samples=enc.num_samples, resolution=resolution, level=level,
            sources=tuple(sources) or (block,), labels=Labels.from_dict(external_labels or {}),
            files=(BlockFile(DATA_FILE, enc.data.size, enc.data.sha256),
                   BlockFile(INDEX_FILE, enc.index.size, enc.index.sha256)), version=version)
        for f, name in ((data_f, DATA_FILE), (index_f, INDEX_FILE)):
            f.seek(0)
            bucket.upload(block + DIR_DELIM + name, f)
    bucket.upload(block + DIR_DELIM + META_FILE, meta.to_json())
    return meta


# ---------------------------------------------------------------------------------------------
# Reading


class _RangeFile(io.RawIOBase):
    """A read-only file of ``size`` bytes served from prefetched segments.

    Reads that no single segment covers call ``fetch(offset, length)``; the
    reader prefetches everything pyarrow will ask for, so that is a fallback.
    """

    def __init__(self, size: int, segments: Iterable[tuple[int, bytes]],
                 fetch: Callable[[int, int], bytes]) -> None:
        self._size = size
        segs = sorted(segments)
        self._starts = [s for s, _ in segs]
        self._segs = [d for _, d in segs]
        self._fetch = fetch
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        pos = self._pos
        n = self._size - pos if n < 0 else min(n, self._size - pos)
        if n <= 0:
            return b""
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and pos + n <= self._starts[i] + len(self._segs[i]):
            off = pos - self._starts[i]
            out = self._segs[i][off:off + n]
        else:
            out = self._fetch(pos, n)
        self._pos = pos + n
        return out

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


@dataclass(slots=True)
class _Index:
    labels: list[Labels]
    postings: MemPostings
    all_refs: np.ndarray
    mint: np.ndarray
    maxt: np.ndarray
    first_row: np.ndarray
    num_rows: np.ndarray
    ids: np.ndarray
    footer_bytes: int
    footer_sha256: str
    version: int = VERSION
    # Version 2 only: each series' first sample (time, value) and the value of its last.
    first_t: np.ndarray | None = None
    first_v: np.ndarray | None = None
    last_v: np.ndarray | None = None


@dataclass(slots=True)
class _Footer:
    metadata: pq.FileMetaData
    rg_start: np.ndarray  # first row of each row group, plus the total at the end
    rg_tmin: np.ndarray
    rg_tmax: np.ndarray
    col_range: np.ndarray  # [row group, column (t, v; or t and the aggregates), (offset, length)]


@dataclass(slots=True)
class _RowPlan:
    """The row groups a selection reads, and where each selected series' rows are in their
    decoded concatenation (shared by raw and downsampled selections)."""

    groups: np.ndarray  # row groups to read, ascending
    starts: np.ndarray  # per selected series: first and end row in the file
    ends: np.ndarray
    lo: np.ndarray  # per selected series: first and last row group holding its rows
    hi: np.ndarray
    pos: np.ndarray  # per row group: where its rows start in the concatenation, -1 if not read
    rg_start: np.ndarray

    @classmethod
    def of(cls, footer: _Footer, index: _Index, refs: np.ndarray, mint: int, maxt: int) -> "_RowPlan | None":
        """The plan for series ``refs`` over ``[mint, maxt]``; None when no row group qualifies."""
        starts = index.first_row[refs]
        ends = starts + index.num_rows[refs]
        lo = np.searchsorted(footer.rg_start, starts, "right") - 1
        hi = np.searchsorted(footer.rg_start, ends - 1, "right") - 1
        wanted = np.zeros(len(footer.rg_tmin), dtype=bool)
        for a, b in zip(lo.tolist(), hi.tolist()):
            wanted[a:b + 1] = True
        wanted &= (footer.rg_tmin <= maxt) & (footer.rg_tmax >= mint)
        groups = np.flatnonzero(wanted)
        if not len(groups):
            return None
        pos = np.full(len(footer.rg_tmin), -1, dtype=np.int64)
        pos[groups] = np.concatenate(([0], np.cumsum(np.diff(footer.rg_start)[groups])[:-1]))
        return cls(groups, starts, ends, lo, hi, pos, footer.rg_start)

    def spans(self, k: int) -> list[tuple[int, int]]:
        """``[a, b)`` ranges of selected series ``k``'s rows in the concatenation, in order."""
        s, e = int(self.starts[k]), int(self.ends[k])
        rg_start, out = self.rg_start, []
        for g in range(int(self.lo[k]), int(self.hi[k]) + 1):
            p = self.pos[g]
            if p >= 0:
                first = int(rg_start[g])
                out.append((max(s, first) - first + p, min(e, int(rg_start[g + 1])) - first + p))
        return out


def _joined(a: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """``a`` over ``spans``: a view for one span, a concatenation for several."""
    if len(spans) == 1:
        return a[spans[0][0]:spans[0][1]]
    return np.concatenate([a[x:y] for x, y in spans])


def decode_index(data: bytes, context: str) -> _Index:
    """Decodes an index file (its bytes, already checked against meta.json).

    Raises:
        UnsupportedBlockVersion, CorruptBlock.
    """
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        kv = pf.metadata.metadata or {}
        version = _check_version(kv, context)
        table = pf.read()
    except BlockError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CorruptBlock(f"{context}: does not decode: {err}") from None
    schema = AGGREGATE_INDEX_SCHEMA if version == AGGREGATE_VERSION else INDEX_SCHEMA
    if not table.schema.equals(schema, check_metadata=False):
        raise CorruptBlock(f"{context}: unexpected schema {table.schema}")
    try:
        footer_bytes = int(kv[KV_FOOTER_BYTES])
        footer_sha = kv[KV_FOOTER_SHA256].decode()
    except (KeyError, ValueError) as err:
        raise CorruptBlock(f"{context}: missing or invalid key {err}") from None
    cols = {name: table.column(name).to_numpy() for name in ("ref", "id", "mint", "maxt", "first_row", "num_rows")}
    n = table.num_rows
    if not np.array_equal(cols["ref"], np.arange(n)):
        raise CorruptBlock(f"{context}: series refs are not 0..{n - 1}")
    postings = MemPostings()
    labels: list[Labels] = []
    for ref, key in enumerate(table.column("labels").to_pylist()):
        ls = _parse_labels(key, context)
        postings.add(ref, ls)
        labels.append(ls)
    extra = {}
    if version == AGGREGATE_VERSION:
        extra = {"first_t": table.column("first_t").to_numpy().astype(np.int64),
                 "first_v": table.column("first_v").to_numpy().astype(np.float64),
                 "last_v": table.column("last_v").to_numpy().astype(np.float64)}
    return _Index(labels=labels, postings=postings, all_refs=np.arange(n, dtype=np.int64),
                  mint=cols["mint"].astype(np.int64), maxt=cols["maxt"].astype(np.int64),
                  first_row=cols["first_row"].astype(np.int64), num_rows=cols["num_rows"].astype(np.int64),
                  ids=cols["id"], footer_bytes=footer_bytes, footer_sha256=footer_sha, version=version, **extra)


def _parse_labels(key: bytes, context: str) -> Labels:
    parts = key.split(SEP)
    if len(parts) % 2 != 1 or parts[-1] != b"":
        raise CorruptBlock(f"{context}: label bytes {key[:80]!r} are not name 0xff value 0xff pairs")
    try:
        pairs = [(parts[i].decode(), parts[i + 1].decode()) for i in range(0, len(parts) - 1, 2)]
    except UnicodeDecodeError:
        raise CorruptBlock(f"{context}: label bytes {key[:80]!r} are not UTF-8") from None
    for i in range(1, len(pairs)):
        if not pairs[i - 1][0] < pairs[i][0]:
            raise CorruptBlock(f"{context}: label names of {key[:80]!r} are not sorted and unique")
    return Labels.sorted_unchecked(pairs)


def _check_version(kv: Mapping[bytes, bytes], context: str) -> int:
    """The file's format version (1 or 2); raises UnsupportedBlockVersion for any other."""
    version = kv.get(KV_VERSION)
    for v in VERSIONS:
        if version == str(v).encode():
            return v
    raise UnsupportedBlockVersion(f"{context}: format version {version!r} is not supported "
                                  f"(this reader knows versions {', '.join(map(str, VERSIONS))})")


def decode_footer(metadata: pq.FileMetaData, meta: BlockMeta, context: str) -> _Footer:
    """Checks the data file's Parquet metadata against meta.json and extracts what reads need."""
    version = _check_version(metadata.metadata or {}, context)
    if version != meta.version:
        raise CorruptBlock(f"{context}: format version {version}, meta.json says {meta.version}")
    schema = AGGREGATE_DATA_SCHEMA if version == AGGREGATE_VERSION else DATA_SCHEMA
    if not metadata.schema.to_arrow_schema().equals(schema, check_metadata=False):
        raise CorruptBlock(f"{context}: unexpected schema {metadata.schema.to_arrow_schema()}")
    if metadata.num_rows != meta.num_samples:
        raise CorruptBlock(f"{context}: {metadata.num_rows} rows, meta.json counts {meta.num_samples} samples")
    n = metadata.num_row_groups
    rg_start = np.zeros(n + 1, dtype=np.int64)
    tmin = np.empty(n, dtype=np.int64)
    tmax = np.empty(n, dtype=np.int64)
    ncols = len(schema) - 1  # every column but ``ref``: t, v (version 1) or t and the aggregates
    col_range = np.empty((n, ncols, 2), dtype=np.int64)
    for i in range(n):
        rg = metadata.row_group(i)
        rg_start[i + 1] = rg_start[i] + rg.num_rows
        st = rg.column(1).statistics
        if st is None or not st.has_min_max:
            raise CorruptBlock(f"{context}: row group {i} has no statistics of t")
        tmin[i], tmax[i] = st.min, st.max
        for j, col in enumerate(range(1, ncols + 1)):
            c = rg.column(col)
            start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
            col_range[i, j] = (start, c.total_compressed_size)
    return _Footer(metadata, rg_start, tmin, tmax, col_range)


class BlockSeries(ArraySeries):
    """A series of a block selection (``store.storage.Series``); its samples are already read,
    its chunks encoded on the fly (blocks store columns, not chunks)."""

    __slots__ = ()


class AggregateSeries(ArraySeries):
    """A series of a downsampled block's selection (``store.storage.Series``).

    ``aggregates`` holds its rows in the selected range (``Aggregates``; ``first_t``,
    ``first_v`` and ``last_v`` are the block's, whether or not the range includes them);
    ``samples()`` are the interval averages ``sum / count`` at each row's ``t``, what a
    reader that knows nothing of aggregates gets (Thanos' default for a plain selector).
    """

    __slots__ = ("aggregates", "resolution")

    def __init__(self, labels: Labels, aggregates: Aggregates, resolution: int) -> None:
        with np.errstate(all="ignore"):
            avg = aggregates.sum / aggregates.count
        super().__init__(labels, aggregates.t, avg)
        self.aggregates = aggregates
        self.resolution = resolution


def _index_bytes(x: "_Index | _Footer") -> int:
    """Roughly the memory of a decoded index (its arrays, labels and postings) or footer."""
    if isinstance(x, _Footer):
        return (x.metadata.serialized_size * 4 + x.rg_start.nbytes + x.rg_tmin.nbytes + x.rg_tmax.nbytes
                + x.col_range.nbytes)
    arrays = sum(a.nbytes for a in (x.all_refs, x.mint, x.maxt, x.first_row, x.num_rows, x.ids,
                                    x.first_t, x.first_v, x.last_v) if a is not None)
    return arrays + sum(120 + sum(len(n) + len(v) + 100 for n, v in lbls) for lbls in x.labels)


def _meta_bytes(m: BlockMeta) -> int:
    return 1000 + 100 * (len(m.sources) + len(m.files) + len(m.labels))


class BlockCaches:
    """Caches shared by all readers of a bucket, each bounded by bytes (``store.cache``):
    ``meta`` holds decoded meta.json files (for ``store.catalog``), ``index`` decoded index files
    and data-file footers, ``chunks`` decoded column chunks per row group (``t``/``v``, or a
    downsampled block's aggregates). Blocks never change, so entries never go stale."""

    def __init__(self, index_bytes: int = 256 << 20, chunks_bytes: int = 512 << 20,
                 metrics: CacheMetrics | None = None, meta_bytes: int = 16 << 20) -> None:
        self.meta: Cache = Cache("block-meta", meta_bytes, _meta_bytes, metrics)
        self.index: Cache = Cache("block-index", index_bytes, _index_bytes, metrics)
        self.chunks: Cache = Cache("block-chunks", chunks_bytes, lambda p: p[0].nbytes + p[1].nbytes, metrics)


class BlockReader:
    """Reads one block from a bucket; implements ``store.storage.Querier``.

    Opening reads ``meta.json`` (raising IncompleteBlock, UnsupportedBlockVersion
    or CorruptBlock). The index and the data file's footer are read once, on
    first use, and kept in memory. Thread-safe; a block never changes, so any
    number of queries may share one reader. Bucket failures propagate as
    BucketError; bytes that do not check out raise CorruptBlock (TruncatedBlock
    when a file is shorter than meta.json says).
    """

    def __init__(self, bucket: Bucket, ulid: str, *, meta: BlockMeta | None = None,
                 caches: "BlockCaches | None" = None) -> None:
        """Args:
            bucket: the bucket holding the block.
            ulid: the block's ULID (its directory).
            meta: its meta.json if already read (e.g. when listing blocks).
            caches: caches shared by the readers of a bucket; without, the reader keeps its
                index and footer itself and caches no data.
        """
        if not ulids.is_valid(ulid):
            raise ValueError(f"invalid block ULID {ulid!r}")
        self._bucket = bucket
        self._ulid = ulid
        self._meta = meta if meta is not None else read_meta(bucket, ulid)
        self._lock = threading.Lock()
        self._index: _Index | None = None
        self._footer: _Footer | None = None
        self._caches = caches

    def __repr__(self) -> str:
        return f"BlockReader({self._ulid})"

    @property
    def meta(self) -> BlockMeta:
        return self._meta

    @property
    def ulid(self) -> str:
        return self._ulid

    def _ctx(self, rel_path: str) -> str:
        return f"block {self._ulid}: {rel_path}"

    def _get_range(self, rel_path: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``, as meta.json's size promises them."""
        try:
            data = self._bucket.get_range(self._ulid + DIR_DELIM + rel_path, offset, length)
        except ObjectNotFound:
            raise CorruptBlock(f"{self._ctx(rel_path)}: listed in meta.json but missing") from None
        if len(data) != length:
            raise TruncatedBlock(f"{self._ctx(rel_path)}: {len(data)} bytes at offset {offset} instead of "
                                 f"{length}; meta.json says the file has {self._meta.file(rel_path).size_bytes}")
        return data

    def _load_index(self) -> _Index:
        """The decoded index: from the shared cache when there is one, else kept by the reader."""
        if self._caches is None:
            return self._read_index()
        key = (self._ulid, INDEX_FILE)
        index = self._caches.index.get(key)
        if index is None:
            index = self._read_index()
            if _index_bytes(index) <= self._caches.index.max_bytes:
                with self._lock:
                    self._index = None  # held by the (bounded) cache instead
                self._caches.index.put(key, index)
            # else larger than the whole cache: the reader keeps it, as without a cache, rather
            # than reading it again for every selection
        return index

    def _load_footer(self, index: _Index) -> _Footer:
        """The data file's decoded footer, cached like the index."""
        if self._caches is None:
            return self._read_footer(index)
        key = (self._ulid, DATA_FILE)
        footer = self._caches.index.get(key)
        if footer is None:
            footer = self._read_footer(index)
            if _index_bytes(footer) <= self._caches.index.max_bytes:
                with self._lock:
                    self._footer = None
                self._caches.index.put(key, footer)
        return footer

    def _read_groups(self, footer: _Footer, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded ``t`` and ``v`` of the given row groups, concatenated in order."""
        t, v = self._cached_groups(footer, groups, "raw",
                                   lambda gs: tuple(self._read_columns(footer, gs, ("t", "v")).values()))
        return t, v

    def _cached_groups(self, footer: _Footer, groups: np.ndarray, kind: str,
                       decode: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        """Arrays whose last axis runs over the rows of ``groups``, in order: each row group's
        from the shared chunk cache when there is one, the missing ones decoded together by
        ``decode(row groups)`` and cached per row group (``kind`` tells raw from aggregates).

        The cache holds read-only views, not copies: row groups decoded together share their
        arrays, which live until the last of them is evicted (so the cache may briefly hold more
        than its bytes, never more than one selection's worth)."""
        cache = self._caches.chunks if self._caches is not None else None
        if cache is None or cache.max_bytes == 0:
            return decode(groups)
        parts: dict[int, tuple[np.ndarray, ...]] = {}
        missing = []
        for g in groups.tolist():
            hit = cache.get((self._ulid, kind, g))
            if hit is None:
                missing.append(g)
            else:
                parts[g] = hit
        if missing:
            arrays = decode(np.asarray(missing, dtype=np.int64))
            for a in arrays:
                a.flags.writeable = False  # shared by the cache and every selection
            o = 0
            for g, n in zip(missing, np.diff(footer.rg_start)[missing].tolist()):
                parts[g] = tuple(a[..., o:o + n] for a in arrays)
                cache.put((self._ulid, kind, g), parts[g])
                o += n
            if len(missing) == len(groups):
                return arrays  # all decoded just now, already in order
        if len(parts) == 1:
            return next(iter(parts.values()))
        order = groups.tolist()
        return tuple(np.concatenate([parts[g][k] for g in order], axis=-1) for k in range(len(parts[order[0]])))

    def _read_index(self) -> _Index:
        with self._lock:
            if self._index is None:
                f = self._meta.file(INDEX_FILE)
                try:
                    data = self._bucket.get(self._ulid + DIR_DELIM + INDEX_FILE)
                except ObjectNotFound:
                    raise CorruptBlock(f"{self._ctx(INDEX_FILE)}: listed in meta.json but missing") from None
                if len(data) < f.size_bytes:
                    raise TruncatedBlock(f"{self._ctx(INDEX_FILE)}: {len(data)} bytes, meta.json says {f.size_bytes}")
                if len(data) != f.size_bytes:
                    raise CorruptBlock(f"{self._ctx(INDEX_FILE)}: {len(data)} bytes, meta.json says {f.size_bytes}")
                if hashlib.sha256(data).hexdigest() != f.sha256:
                    raise CorruptBlock(f"{self._ctx(INDEX_FILE)}: SHA-256 differs from meta.json")
                index = decode_index(data, self._ctx(INDEX_FILE))
                if len(index.labels) != self._meta.num_series:
                    raise CorruptBlock(f"{self._ctx(INDEX_FILE)}: {len(index.labels)} series, "
                                       f"meta.json counts {self._meta.num_series}")
                self._index = index
            return self._index

    def _read_footer(self, index: _Index) -> _Footer:
        with self._lock:
            if self._footer is None:
                size = self._meta.file(DATA_FILE).size_bytes
                if not 12 <= index.footer_bytes <= size:
                    raise CorruptBlock(f"{self._ctx(INDEX_FILE)}: data footer of {index.footer_bytes} bytes "
                                       f"does not fit a data file of {size}")
                n = min(size, max(index.footer_bytes, _FOOTER_READ_SIZE))
                tail = self._get_range(DATA_FILE, size - n, n)
                if hashlib.sha256(tail[n - index.footer_bytes:]).hexdigest() != index.footer_sha256:
                    raise CorruptBlock(f"{self._ctx(DATA_FILE)}: footer SHA-256 differs from the index's")
                rf = _RangeFile(size, [(size - n, tail)], lambda o, k: self._get_range(DATA_FILE, o, k))
                try:
                    md = pq.read_metadata(rf)
                except BlockError:
                    raise
                except (pa.ArrowException, OSError, ValueError) as err:
                    raise CorruptBlock(f"{self._ctx(DATA_FILE)}: footer does not decode: {err}") from None
                self._footer = decode_footer(md, self._meta, self._ctx(DATA_FILE))
            return self._footer

    def _matching(self, index: _Index, matchers: Sequence[Matcher], mint: int, maxt: int) -> np.ndarray:
        refs = index.postings.select(matchers, index.all_refs)
        return refs[(index.mint[refs] <= maxt) & (index.maxt[refs] >= mint)]

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[BlockSeries]:
        """Series matching all ``matchers`` with samples in ``[mint, maxt]``, sorted by labels.

        Reads only the ``t`` and ``v`` column chunks of the row groups that hold
        samples of the matching series and whose ``t`` range meets ``[mint, maxt]``.
        """
        if mint > self._meta.max_time - 1 or maxt < self._meta.min_time:
            return []
        if self._meta.version == AGGREGATE_VERSION:
            return self._select_aggregates(matchers, mint, maxt, hints)
        index = self._load_index()
        refs = self._matching(index, matchers, mint, maxt)
        if not len(refs):
            return []
        footer = self._load_footer(index)
        plan = _RowPlan.of(footer, index, refs, mint, maxt)
        if plan is None:
            return []
        ts, vs = self._read_groups(footer, plan.groups)
        out: list[BlockSeries] = []
        budget = hints.budget if hints is not None else None
        for k, ref in enumerate(refs.tolist()):
            spans = plan.spans(k)
            if not spans:
                continue
            st, sv = _joined(ts, spans), _joined(vs, spans)
            i, j = np.searchsorted(st, mint, "left"), np.searchsorted(st, maxt, "right")
            if i < j:
                if budget is not None:
                    budget.take(int(j - i))
                # Views of the decoded (and cached) row groups: nothing writes into them.
                out.append(BlockSeries(index.labels[ref], st[i:j], sv[i:j]))
        return out

    def _select_aggregates(self, matchers: Sequence[Matcher], mint: int, maxt: int,
                           hints: SelectHints | None) -> list[AggregateSeries]:
        """``select`` of a downsampled block: the rows with ``mint <= t <= maxt`` as ``AggregateSeries``."""
        index = self._load_index()
        if index.version != self._meta.version or index.first_t is None:
            raise CorruptBlock(f"{self._ctx(INDEX_FILE)}: format version {index.version}, "
                               f"meta.json says {self._meta.version}")
        refs = self._matching(index, matchers, mint, maxt)
        if not len(refs):
            return []
        footer = self._load_footer(index)
        plan = _RowPlan.of(footer, index, refs, mint, maxt)
        if plan is None:
            return []
        cols = self._read_aggregate_groups(footer, plan.groups)
        budget = hints.budget if hints is not None else None
        out: list[AggregateSeries] = []
        for k, ref in enumerate(refs.tolist()):
            spans = plan.spans(k)
            if not spans:
                continue
            parts = {name: _joined(c, spans) for name, c in cols.items()}
            st = parts["t"]
            i, j = np.searchsorted(st, mint, "left"), np.searchsorted(st, maxt, "right")
            if i < j:
                if budget is not None:
                    budget.take(int(j - i))
                agg = Aggregates(st[i:j].copy(), *(parts[n][i:j].copy() for n in AGGREGATE_COLUMNS),
                                 first_t=int(index.first_t[ref]), first_v=float(index.first_v[ref]),
                                 last_v=float(index.last_v[ref]), start_t=parts["start_t"][i:j].copy(),
                                 start_counter=parts["start_counter"][i:j].copy())
                out.append(AggregateSeries(index.labels[ref], agg, self._meta.resolution))
        return out

    def _read_aggregate_groups(self, footer: _Footer, groups: np.ndarray) -> dict[str, np.ndarray]:
        """Decoded columns (but ``ref``) of the given row groups of a version 2 block, concatenated
        in order, through the chunk cache as ``_read_groups`` (packed as an int64 ``(3, rows)`` and
        a float64 ``(5, rows)`` array)."""
        ints = ("t", "count", "start_t")
        floats = ("sum", "min", "max", "counter_xor_max", "start_counter_xor_min")

        def decode(gs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            cols = self._read_columns(footer, gs, ints + floats)
            return np.stack([cols[n] for n in ints]), np.stack([cols[n] for n in floats])

        i_cat, f_cat = self._cached_groups(footer, groups, "aggregates", decode)
        out = {n: i_cat[k] for k, n in enumerate(ints)}
        out.update({n: f_cat[k] for k, n in enumerate(floats)})
        return _decode_counters(out)

    def _read_columns(self, footer: _Footer, groups: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """Decoded ``columns`` of the given row groups, concatenated in order (fetches every
        column chunk but ``ref`` of those row groups)."""
        ranges = sorted((int(o), int(n)) for o, n in footer.col_range[groups].reshape(-1, 2))
        segments: list[tuple[int, bytes]] = []
        cur_start, cur_end = ranges[0][0], ranges[0][0] + ranges[0][1]
        for o, n in ranges[1:]:
            if o - cur_end <= _COALESCE_GAP:
                cur_end = max(cur_end, o + n)
            else:
                segments.append((cur_start, self._get_range(DATA_FILE, cur_start, cur_end - cur_start)))
                cur_start, cur_end = o, o + n
        segments.append((cur_start, self._get_range(DATA_FILE, cur_start, cur_end - cur_start)))
        size = self._meta.file(DATA_FILE).size_bytes
        rf = _RangeFile(size, segments, lambda o, k: self._get_range(DATA_FILE, o, k))
        try:
            pf = pq.ParquetFile(rf, metadata=footer.metadata, page_checksum_verification=True, pre_buffer=False)
            table = pf.read_row_groups(groups.tolist(), columns=list(columns), use_threads=False)
        except BlockError:
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CorruptBlock(f"{self._ctx(DATA_FILE)}: row groups {groups.tolist()[:10]} do not decode: {err}") from None
        out = {}
        for name in columns:
            dtype = np.int64 if name in ("t", "count", "start_t") else np.float64
            out[name] = table.column(name).to_numpy().astype(dtype, copy=False)
        return out

    def label_names(self, matchers: Sequence[Matcher] = (), mint: int = _MIN_INT64,
                    maxt: int = _MAX_INT64) -> list[str]:
        """Sorted label names of the series matching ``matchers`` with samples in ``[mint, maxt]``."""
        index = self._load_index()
        refs = self._matching(index, matchers, mint, maxt)
        if not matchers and len(refs) == len(index.labels):
            return index.postings.label_names()
        return sorted({n for r in refs.tolist() for n, _ in index.labels[r]})

    def label_values(self, name: str, matchers: Sequence[Matcher] = (), mint: int = _MIN_INT64,
                     maxt: int = _MAX_INT64) -> list[str]:
        """Sorted values of label ``name`` among the series matching ``matchers`` in ``[mint, maxt]``."""
        index = self._load_index()
        refs = self._matching(index, matchers, mint, maxt)
        if not matchers and len(refs) == len(index.labels):
            return index.postings.label_values(name)
        values = {index.labels[r].get(name) for r in refs.tolist()}
        values.discard("")
        return sorted(values)

    def close(self) -> None:
        """Drops the cached index and footer; the bucket belongs to the caller."""
        with self._lock:
            self._index = None
            self._footer = None


# ---------------------------------------------------------------------------------------------
# Verification


def verify_block(bucket: Bucket, ulid: str, *, tmp_dir: str | None = None) -> BlockMeta:
    """Checks a whole block: every file's size and SHA-256, and that all of it decodes consistently.

    Beyond what a reader checks, it decodes every row of the data file and
    checks that rows are sorted by series then time, that each series' rows are
    where the index says with the first and last timestamps it records, that
    every sample is inside ``[minTime, maxTime)``, that labels are sorted and
    unique and that series ids are ``Labels.hash()``. The data file is streamed
    to a temporary file in ``tmp_dir``.

    Returns:
        The block's meta.json.

    Raises:
        IncompleteBlock, UnsupportedBlockVersion, CorruptBlock (TruncatedBlock), BucketError.
    """
    meta = read_meta(bucket, ulid)
    reader = BlockReader(bucket, ulid, meta=meta)
    for f in meta.files:
        name = ulid + DIR_DELIM + f.rel_path
        try:
            size = bucket.attributes(name).size
        except ObjectNotFound:
            raise CorruptBlock(f"block {ulid}: {f.rel_path}: listed in meta.json but missing") from None
        if size < f.size_bytes:
            raise TruncatedBlock(f"block {ulid}: {f.rel_path}: {size} bytes, meta.json says {f.size_bytes}")
        if size != f.size_bytes:
            raise CorruptBlock(f"block {ulid}: {f.rel_path}: {size} bytes, meta.json says {f.size_bytes}")
    index = reader._load_index()
    data = meta.file(DATA_FILE)
    with tempfile.TemporaryFile(dir=tmp_dir) as tmp:
        digest = hashlib.sha256()
        for off in range(0, data.size_bytes, _DOWNLOAD_CHUNK):
            chunk = reader._get_range(DATA_FILE, off, min(_DOWNLOAD_CHUNK, data.size_bytes - off))
            digest.update(chunk)
            tmp.write(chunk)
        if digest.hexdigest() != data.sha256:
            raise CorruptBlock(f"block {ulid}: {DATA_FILE}: SHA-256 differs from meta.json")
        footer = reader._load_footer(index)
        tmp.seek(0)
        _verify_rows(pa.PythonFile(tmp, mode="r"), meta, index, footer, f"block {ulid}: {DATA_FILE}")
    return meta


def _verify_aggregates(table: pa.Table, t: np.ndarray, same: np.ndarray, last_counter: float, resolution: int,
                       context: str) -> float:
    """Checks one row group of aggregates; ``t`` and ``same`` include the previous row (see the caller).

    Returns the last row's counter, the previous row of the next row group.
    """
    count = table.column("count").to_numpy()
    mn, mx = table.column("min").to_numpy(), table.column("max").to_numpy()
    counter = _xor(table.column("counter_xor_max").to_numpy(), mx)
    if (count < 1).any():
        raise CorruptBlock(f"{context}: a row with count < 1")
    if (mn > mx).any():
        raise CorruptBlock(f"{context}: a row with min > max")
    k = interval_of(t, resolution)
    if (same & ~(k[1:] > k[:-1])).any():
        raise CorruptBlock(f"{context}: two rows of a series in one interval of {resolution} ms")
    start = table.column("start_t").to_numpy()
    if ((start > t[1:]) | (interval_of(start, resolution) != k[1:]) | ((count == 1) & (start != t[1:]))).any():
        raise CorruptBlock(f"{context}: a start_t after its row's t, in another interval, or not t for one sample")
    # The counter aggregate never decreases for a counter, but does for a gauge's negative
    # values (a reset adds the negative value before it): nothing to check there.
    return float(counter[-1]) if len(counter) else last_counter


def _verify_rows(source, meta: BlockMeta, index: _Index, footer: _Footer, context: str) -> None:
    for i in range(1, len(index.labels)):
        if not index.labels[i - 1] < index.labels[i]:
            raise CorruptBlock(f"{context}: series {i} {index.labels[i]} is not after {index.labels[i - 1]}")
    for ref, ls in enumerate(index.labels):
        if int(index.ids[ref]) != ls.hash():
            raise CorruptBlock(f"{context}: series {ref} {ls}: id {index.ids[ref]} is not its labels' hash")
    expected_first = np.concatenate(([0], np.cumsum(index.num_rows)[:-1])) if len(index.labels) else index.first_row
    if not np.array_equal(index.first_row, expected_first) or (index.num_rows <= 0).any():
        raise CorruptBlock(f"{context}: the index's row ranges do not tile the data file")
    if int(index.num_rows.sum()) != meta.num_samples:
        raise CorruptBlock(f"{context}: the index counts {int(index.num_rows.sum())} samples, "
                           f"meta.json {meta.num_samples}")
    try:
        if meta.version == AGGREGATE_VERSION:
            if index.first_t is None or (index.first_t > index.mint).any() or (index.first_t < meta.min_time).any():
                raise CorruptBlock(f"{context}: the index's first_t is not within [minTime, first row's t]")
        pf = pq.ParquetFile(source, metadata=footer.metadata, page_checksum_verification=True)
        last_ref, last_t, last_counter = -1, 0, 0.0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            refs = table.column("ref").to_numpy().astype(np.int64)
            ts = table.column("t").to_numpy()
            a = int(footer.rg_start[g])
            rows = np.arange(a, a + len(refs))
            want = np.searchsorted(index.first_row, rows, "right") - 1
            if not np.array_equal(refs, want):
                raise CorruptBlock(f"{context}: row group {g}: series refs differ from the index's row ranges")
            if len(ts) and (ts.min() < meta.min_time or ts.max() >= meta.max_time):
                raise CorruptBlock(f"{context}: row group {g}: samples outside [{meta.min_time}, {meta.max_time})")
            if len(ts) and (int(ts.min()) != footer.rg_tmin[g] or int(ts.max()) != footer.rg_tmax[g]):
                raise CorruptBlock(f"{context}: row group {g}: statistics of t differ from its samples")
            r = np.concatenate(([last_ref], refs))
            t = np.concatenate(([last_t], ts))
            same = r[1:] == r[:-1]
            if (same & ~(t[1:] > t[:-1])).any():
                raise CorruptBlock(f"{context}: row group {g}: timestamps of a series not strictly increasing")
            if meta.version == AGGREGATE_VERSION:
                last_counter = _verify_aggregates(table, t, same, last_counter, meta.resolution,
                                                  f"{context}: row group {g}")
            for col, rows_of in (("mint", index.first_row), ("maxt", index.first_row + index.num_rows - 1)):
                inside = np.flatnonzero((rows_of >= a) & (rows_of < a + len(refs)))
                if not np.array_equal(ts[rows_of[inside] - a], getattr(index, col)[inside]):
                    raise CorruptBlock(f"{context}: row group {g}: the index's {col} differs from the samples")
            if len(refs):
                last_ref, last_t = int(refs[-1]), int(ts[-1])
    except BlockError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CorruptBlock(f"{context}: does not decode: {err}") from None
