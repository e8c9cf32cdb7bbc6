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

from store.errors import DecodeError
from store.xxhash64 import xxh64
from store.writerequest import SERIES_COLUMNS, S_KEY_LEN, S_KEY_OFF, S_SMP_N, S_SMP_START, WriteRequest

RECORD_COLUMNS = 2
_RECORD = struct.Struct("<Bq")
_BLOCK = struct.Struct("<IIII")


def encode_block(key_len: np.ndarray, samples: np.ndarray, ts: np.ndarray, vbits: np.ndarray,
                 keys: np.ndarray) -> bytes:
    """The uncompressed block of a columns record (see the module docstring)."""
    return b"".join((_BLOCK.pack(len(key_len), len(ts), len(keys), 0),
                     key_len.astype("<u4").tobytes(), samples.astype("<u4").tobytes(),
                     ts.astype("<i8", copy=False).tobytes(), vbits.astype("<u8", copy=False).tobytes(),
                     keys.tobytes()))


def block_size(n_series: int, n_samples: int, keys_len: int) -> int:
    return _BLOCK.size + 8 * n_series + 16 * n_samples + keys_len


def encode_record(now_ms: int, block: bytes) -> bytes:
    return _RECORD.pack(RECORD_COLUMNS, now_ms) + bytes(cramjam.snappy.compress_raw(block))


def is_columns(record: bytes) -> bool:
    return len(record) >= _RECORD.size and record[0] == RECORD_COLUMNS


@numba.njit(cache=True, nogil=True)
def _hash_keys(keys, off, length, out):
    for i in range(off.shape[0]):
        out[i] = xxh64(keys, off[i], length[i])


class ColumnsRequest(WriteRequest):
    """A ``WriteRequest`` read from a columns block: ``buf`` is the keys, there is no protobuf."""

    __slots__ = ()

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
    try:
        block = cramjam.snappy.decompress_raw(memoryview(record)[_RECORD.size:])
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
    key_len = buf[p:p + 4 * ns].view("<u4").astype(np.int64)
    p += 4 * ns
    samples = buf[p:p + 4 * ns].view("<u4").astype(np.int64)
    p += 4 * ns
    ts = buf[p:p + 8 * nsm].view("<i8")
    p += 8 * nsm
    vbits = buf[p:p + 8 * nsm].view("<u8")
    keys = buf[p + 8 * nsm:]
    series = np.zeros((ns, SERIES_COLUMNS), dtype=np.int64)
    if ns:
        np.cumsum(key_len[:-1], out=series[1:, S_KEY_OFF])
        np.cumsum(samples[:-1], out=series[1:, S_SMP_START])
    series[:, S_KEY_LEN] = key_len
    series[:, S_SMP_N] = samples
    if int(samples.sum()) != nsm or int(key_len.sum()) != nk:
        raise DecodeError(f"columns block: per-series counts add up to {int(samples.sum())} samples and "
                          f"{int(key_len.sum())} key bytes, the header says {nsm} and {nk}")
    if ns and (key_len.min() < 2 or (keys[series[:, S_KEY_OFF] + key_len - 1] != 0xFF).any()):
        raise DecodeError("columns block: a series key is not canonical label bytes")
    hashes = np.empty(ns, dtype=np.uint64)
    _hash_keys(keys, series[:, S_KEY_OFF].copy(), key_len, hashes)
    sample_series = np.repeat(np.arange(ns, dtype=np.int64), samples)
    return ColumnsRequest(keys, series, hashes, np.empty((0, 4), dtype=np.int64), keys, ts, vbits, sample_series)
