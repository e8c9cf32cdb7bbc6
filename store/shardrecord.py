"""A shard's part of a remote-write request as decoded columns: log record version 2.

In cluster mode the adapter has already decoded each request (``store.writerequest``: series
keys, their hashes, timestamps and values) to route its series; every head replica of the
shard would decode its part again, and with three replicas per shard that decoding is the
largest cost of the cluster. A *columns* record carries the decoded columns instead of the
protobuf, so a replica turns it into a ``WriteRequest`` with a few array views and appends it
with ``Head.append`` exactly as the protobuf would have been (same series, same order, same
samples). Format (``store/docs/format/natslog.md``), integers little-endian::

    record: u8 2 | i64 now_ms | snappy block-compressed block
    block:  u32 n_series | u32 n_samples | u32 keys_len | u32 0
            | u32 key_len[n_series] | u32 samples[n_series]
            | i64 t[n_samples] | u64 value_bits[n_samples] | keys[keys_len]

``keys`` are the canonical label bytes of the series back to back (``name 0xff value 0xff
...``, ``store/labels.py``), ``samples`` how many of the samples belong to each series, in
series order. The reader hashes the keys itself (XXH64, the series id): hashes do not
compress and would make the record a third larger. Only series whose labels the scanner found
canonical and without native histograms are written this way (the writer falls back to
protobuf records otherwise), so the labels of a series can be read back from its key. The
module does no I/O.
"""

from __future__ import annotations

import struct

import cramjam
import numba
import numpy as np

from store.bytesops import memcpy
from store.errors import DecodeError
from store.xxhash64 import xxh64
from store.writerequest import SERIES_COLUMNS, S_KEY_LEN, S_KEY_OFF, S_SMP_N, S_SMP_START, WriteRequest

RECORD_COLUMNS = 2
_RECORD = struct.Struct("<Bq")
_BLOCK = struct.Struct("<IIII")
_HEADER = _BLOCK.size


def encode_block(key_len: np.ndarray, samples: np.ndarray, ts: np.ndarray, vbits: np.ndarray,
                 keys: np.ndarray) -> bytes:
    """The uncompressed block of a columns record (see the module docstring)."""
    return b"".join((_BLOCK.pack(len(key_len), len(ts), len(keys), 0),
                     key_len.astype("<u4").tobytes(), samples.astype("<u4").tobytes(),
                     ts.astype("<i8", copy=False).tobytes(), vbits.astype("<u8", copy=False).tobytes(),
                     keys.tobytes()))


def encode_series(req: WriteRequest, series: np.ndarray | None = None) -> bytes:
    """The uncompressed block of the series ``series`` of ``req`` (indexes in the order to write,
    all of them if ``None``), whose keys must be canonical. For tools, tests and the warm-up; the
    adapter gathers its blocks with compiled kernels (``adapter.sharded_write``)."""
    ser = req.series if series is None else req.series[series]
    key_off, key_len, first, n = ser[:, S_KEY_OFF], ser[:, S_KEY_LEN], ser[:, S_SMP_START], ser[:, S_SMP_N]
    keys = np.concatenate([req.keys[o:o + k] for o, k in zip(key_off.tolist(), key_len.tolist())]) \
        if len(ser) else np.empty(0, np.uint8)
    starts = np.zeros(len(ser) + 1, dtype=np.int64)
    np.cumsum(n, out=starts[1:])
    idx = np.repeat(first - starts[:-1], n) + np.arange(int(starts[-1]), dtype=np.int64)
    return encode_block(key_len, n, req.ts[idx], req.vbits[idx], keys)


@numba.njit(cache=True, nogil=True)
def _put_u32(buf, p, x):
    buf[p] = x & 0xFF
    buf[p + 1] = (x >> 8) & 0xFF
    buf[p + 2] = (x >> 16) & 0xFF
    buf[p + 3] = (x >> 24) & 0xFF


@numba.njit(cache=True, nogil=True)
def _blocks(series, keys, ts_bytes, vbits_bytes, shard, idx, n_shards, limit):
    """See ``encode_blocks``; ``ts_bytes``/``vbits_bytes`` are the request's timestamps and value
    bits as bytes (a series' samples are contiguous there)."""
    n = idx.shape[0]
    first = np.zeros(n_shards + 1, dtype=np.int64)  # counting sort by shard, stable
    for j in range(n):
        first[shard[idx[j]] + 1] += 1
    for k in range(n_shards):
        first[k + 1] += first[k]
    order = np.empty(n, dtype=np.int64)
    fill = first[:-1].copy()
    for j in range(n):
        i = idx[j]
        order[fill[shard[i]]] = i
        fill[shard[i]] += 1
    blocks = np.empty((n, 5), dtype=np.int64)  # shard, first and end position in order, samples, key bytes
    nb = 0
    total = 0
    for k in range(n_shards):
        a, end = first[k], first[k + 1]
        while a < end:
            b, size, samples, key_bytes = a, 0, 0, 0
            while b < end:
                i = order[b]
                kl, ns = series[i, S_KEY_LEN], series[i, S_SMP_N]
                s = 8 + kl + 16 * ns
                if b > a and size + s > limit:
                    break
                size += s
                samples += ns
                key_bytes += kl
                b += 1
            blocks[nb, 0], blocks[nb, 1], blocks[nb, 2], blocks[nb, 3], blocks[nb, 4] = k, a, b, samples, key_bytes
            nb += 1
            total += _HEADER + size
            a = b
    buf = np.empty(total, dtype=np.uint8)
    out = np.empty((nb, 5), dtype=np.int64)
    p = 0
    for bi in range(nb):
        k, a, b, samples, key_bytes = blocks[bi, 0], blocks[bi, 1], blocks[bi, 2], blocks[bi, 3], blocks[bi, 4]
        start = p
        _put_u32(buf, p, b - a)
        _put_u32(buf, p + 4, samples)
        _put_u32(buf, p + 8, key_bytes)
        _put_u32(buf, p + 12, 0)
        p += _HEADER
        for j in range(a, b):
            _put_u32(buf, p, series[order[j], S_KEY_LEN])
            p += 4
        for j in range(a, b):
            _put_u32(buf, p, series[order[j], S_SMP_N])
            p += 4
        for src in (ts_bytes, vbits_bytes):
            for j in range(a, b):
                nbytes = 8 * series[order[j], S_SMP_N]
                memcpy(buf, p, src, 8 * series[order[j], S_SMP_START], nbytes)
                p += nbytes
        for j in range(a, b):
            i = order[j]
            memcpy(buf, p, keys, series[i, S_KEY_OFF], series[i, S_KEY_LEN])
            p += series[i, S_KEY_LEN]
        out[bi, 0], out[bi, 1], out[bi, 2], out[bi, 3], out[bi, 4] = k, start, p, b - a, samples
    return buf, out


def encode_blocks(req: WriteRequest, shard: np.ndarray, idx: np.ndarray, n_shards: int,
                  limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The blocks of the series ``idx`` of ``req`` (whose keys must be canonical) by shard
    (``shard[i]`` in ``0..n_shards-1`` for series ``i``), shard after shard and in request order
    within a shard, cut so that no block's body (past its header) exceeds ``limit`` bytes unless
    one series does: ``(buf, blocks)``, the blocks back to back in ``buf`` (uint8) and per block
    a row ``(shard, start, end, series, samples)``. One compiled pass (the adapter's write path);
    each block equals ``encode_block`` of its series."""
    return _blocks(req.series, req.keys, req.ts.view(np.uint8), req.vbits.view(np.uint8), shard, idx, n_shards,
                   limit)


def block_size(n_series: int, n_samples: int, keys_len: int) -> int:
    return _BLOCK.size + 8 * n_series + 16 * n_samples + keys_len


def encode_record(now_ms: int, block: bytes) -> bytes:
    return _RECORD.pack(RECORD_COLUMNS, now_ms) + bytes(cramjam.snappy.compress_raw(block))


def is_columns(record: bytes) -> bool:
    return len(record) >= _RECORD.size and record[0] == RECORD_COLUMNS


@numba.njit(cache=True, nogil=True)
def _index(counts, keys, series, hashes, sample_series):
    """Fills the request's arrays from the block's per-series key lengths and sample counts
    (``counts``: u32 key_len[n] then u32 samples[n]) in one pass: key offsets and lengths,
    sample starts and counts (the other columns 0), each key's XXH64 and each sample's series.
    Returns 0, or 1 if the counts do not add up to the header's, or 2 if a key cannot be
    canonical label bytes."""
    n = series.shape[0]
    koff = 0
    soff = 0
    for i in range(n):
        klen = np.int64(counts[i])
        smp = np.int64(counts[n + i])
        if koff + klen > keys.shape[0] or soff + smp > sample_series.shape[0]:
            return 1
        if klen < 2 or keys[koff + klen - 1] != 0xFF:
            return 2
        # Element by element: a slice would be an array view, reference-counted atomically.
        for c in range(series.shape[1]):
            series[i, c] = 0
        series[i, S_KEY_OFF] = koff
        series[i, S_KEY_LEN] = klen
        series[i, S_SMP_START] = soff
        series[i, S_SMP_N] = smp
        hashes[i] = xxh64(keys, koff, klen)
        for j in range(soff, soff + smp):
            sample_series[j] = i
        koff += klen
        soff += smp
    if koff != keys.shape[0] or soff != sample_series.shape[0]:
        return 1
    return 0


class ColumnsRequest(WriteRequest):
    """A ``WriteRequest`` read from a columns block: ``buf`` is the keys, there is no protobuf."""

    __slots__ = ()
    canonical = True  # the adapter writes canonical keys and no histograms; decode_block leaves S_FLAGS 0

    def label_pairs(self, i: int) -> list[tuple[bytes, bytes]]:
        p = self.key(i).split(b"\xff")
        return list(zip(p[0:-1:2], p[1:-1:2]))


def decode_record(record: bytes) -> tuple[int, ColumnsRequest]:
    """(now_ms, request) of a columns record.

    Raises:
        DecodeError: the record is not a well-formed columns record.
    """
    if not is_columns(record):
        raise DecodeError(f"log record of {len(record)} bytes is not a columns record")
    (_, now_ms) = _RECORD.unpack_from(record)
    body = memoryview(record)[_RECORD.size:]
    try:
        # Copied into a writable array: numba types read-only arrays the slow way, on every call
        # (~8 us per array), while the copy costs ~5 us (decompress_raw_into is slower still).
        block = np.frombuffer(cramjam.snappy.decompress_raw(body), dtype=np.uint8).copy()
    except cramjam.DecompressionError as e:
        raise DecodeError(f"columns record: snappy: {e}") from e
    return now_ms, decode_block(block)


def decode_block(block) -> ColumnsRequest:
    """The request of an uncompressed columns block (any buffer; the arrays are views of it).

    Raises:
        DecodeError: sizes that do not add up, or keys that are not canonical label bytes.
    """
    buf = np.frombuffer(block, dtype=np.uint8)
    if len(buf) < _BLOCK.size:
        raise DecodeError(f"columns block of {len(buf)} bytes is shorter than its header")
    ns, nsm, nk, zero = _BLOCK.unpack_from(buf)
    if zero != 0 or block_size(ns, nsm, nk) != len(buf):
        raise DecodeError(f"columns block of {len(buf)} bytes does not hold {ns} series, {nsm} samples and "
                          f"{nk} key bytes")
    p = _BLOCK.size
    counts = buf[p:p + 8 * ns].view("<u4")
    p += 8 * ns
    ts = buf[p:p + 8 * nsm].view("<i8")
    p += 8 * nsm
    vbits = buf[p:p + 8 * nsm].view("<u8")
    keys = buf[p + 8 * nsm:]
    series = np.empty((ns, SERIES_COLUMNS), dtype=np.int64)  # the kernel zeroes the other columns
    hashes = np.empty(ns, dtype=np.uint64)
    sample_series = np.empty(nsm, dtype=np.int64)
    err = _index(counts, keys, series, hashes, sample_series)
    if err == 1:
        raise DecodeError(f"columns block: the per-series counts do not add up to the header's {nsm} samples "
                          f"and {nk} key bytes")
    if err:
        raise DecodeError("columns block: a series key is not canonical label bytes")
    return ColumnsRequest(keys, series, hashes, np.empty((0, 4), dtype=np.int64), keys, ts, vbits, sample_series)
