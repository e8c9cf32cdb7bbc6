"""Gorilla XOR chunks compiled with numba: the head's and the query path's codec.

Byte for byte the same format as :mod:`store.xor` (the readable reference,
tested against the same Prometheus vectors); see
``store/docs/format/chunks.md``. Values travel as uint64 bit patterns so NaN
payloads and the stale marker survive.

The njit kernels are called directly from other compiled code (the head):

* :func:`encode_into` ``(ts int64[:], vbits uint64[:], n, out uint8[:]) -> nbytes``
* :func:`decode_into` ``(data uint8[:], ts_out int64[:], vbits_out uint64[:]) -> n``
  (negative on corrupt input, see the ``ERR_*`` codes)
* :func:`max_chunk_bytes` ``(n) -> bytes`` that ``out`` must have room for.

The Python wrappers :func:`encode`, :func:`decode` and :func:`decode_many`
take and return numpy arrays and raise :class:`store.errors.CorruptChunk`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from store.errors import CorruptChunk

MAX_SAMPLES = 0xFFFF  # The sample count is a big-endian uint16 header.

# Results of decode_into / encode_into below zero.
ERR_TRUNCATED = -1  # The bits end before the header's sample count is read.
ERR_OUTPUT_TOO_SMALL = -2  # decode: ts_out/vbits_out shorter than the count; encode: out too short.
ERR_VARINT = -3  # A varint longer than 64 bits.
ERR_WINDOW = -4  # leading zeros + significant bits > 64.
ERR_HEADER = -5  # Fewer than the 2 header bytes.
ERR_ARGUMENT = -6  # encode: n < 0, n > 65535 or n larger than the input arrays.

_MESSAGES = {
    ERR_TRUNCATED: "chunk truncated: the bytes end before all samples are read",
    ERR_OUTPUT_TOO_SMALL: "output arrays are shorter than the chunk's sample count",
    ERR_VARINT: "chunk corrupt: a timestamp varint overflows 64 bits",
    ERR_WINDOW: "chunk corrupt: a value's leading zeros and significant bits exceed 64",
    ERR_HEADER: "chunk has no 2-byte sample count header",
}

@numba.njit(cache=True, nogil=True)
def max_chunk_bytes(n):
    """An upper bound of the encoded size of ``n`` samples.

    Header 2, first sample at most 10 + 8, second at most 10 + 10 (77 bits),
    every later one at most 68 + 77 bits (< 19 bytes), 1 padding byte.
    """
    return 41 + 19 * max(n - 2, 0)


# --- bit writer -------------------------------------------------------------
# State: out position (bytes), accumulator of pending bits and their count
# (< 32 between calls); whole 32-bit words are stored as they fill up and the
# rest by _flush. Every output byte is stored once, so ``out`` need not be zeroed.


@numba.njit(cache=True, nogil=True, inline="always")
def _put(out, pos, acc, nacc, value, nbits):
    """Appends the nbits (1..32) low bits of value; returns (pos, acc, nacc)."""
    acc = (acc << np.uint64(nbits)) | (value & ((np.uint64(1) << np.uint64(nbits)) - np.uint64(1)))
    nacc += nbits
    if nacc >= 32:
        nacc -= 32
        word = acc >> np.uint64(nacc)
        out[pos] = np.uint8((word >> np.uint64(24)) & np.uint64(0xFF))
        out[pos + 1] = np.uint8((word >> np.uint64(16)) & np.uint64(0xFF))
        out[pos + 2] = np.uint8((word >> np.uint64(8)) & np.uint64(0xFF))
        out[pos + 3] = np.uint8(word & np.uint64(0xFF))
        pos += 4
    return pos, acc, nacc


@numba.njit(cache=True, nogil=True, inline="always")
def _flush(out, pos, acc, nacc):
    """Stores the pending bits, zero-padded to whole bytes; returns pos."""
    while nacc >= 8:
        nacc -= 8
        out[pos] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
        pos += 1
    if nacc > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
        pos += 1
    return pos


@numba.njit(cache=True, nogil=True, inline="always")
def _put_wide(out, pos, acc, nacc, value, nbits):
    """Appends the nbits (1..64) low bits of value; returns (pos, acc, nacc)."""
    if nbits > 32:
        pos, acc, nacc = _put(out, pos, acc, nacc, value >> np.uint64(32), nbits - 32)
        return _put(out, pos, acc, nacc, value & np.uint64(0xFFFFFFFF), 32)
    return _put(out, pos, acc, nacc, value, nbits)


@numba.njit(cache=True, nogil=True, inline="always")
def _put_uvarint(out, pos, acc, nacc, x):
    while x >= np.uint64(0x80):
        pos, acc, nacc = _put(out, pos, acc, nacc, (x & np.uint64(0x7F)) | np.uint64(0x80), 8)
        x >>= np.uint64(7)
    return _put(out, pos, acc, nacc, x, 8)


@intrinsic
def _clz64(typingctx, x):
    """Leading zero bits of a uint64 (64 for 0): LLVM's ctlz, one instruction on x86-64."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@intrinsic
def _ctz64(typingctx, x):
    """Trailing zero bits of a uint64 (64 for 0): LLVM's cttz."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def encode_into(ts, vbits, n, out):
    """Encodes samples ``0..n-1`` into ``out``; returns the bytes written.

    Args:
        ts: int64 timestamps in milliseconds.
        vbits: uint64 bit patterns of the values.
        n: samples to encode, 0..65535.
        out: uint8 buffer of at least ``max_chunk_bytes(n)`` bytes (need not be zeroed).

    Returns:
        Bytes written, or ERR_ARGUMENT / ERR_OUTPUT_TOO_SMALL (negative).
    """
    if n < 0 or n > 0xFFFF or n > ts.shape[0] or n > vbits.shape[0]:
        return ERR_ARGUMENT
    if out.shape[0] < max_chunk_bytes(n):
        return ERR_OUTPUT_TOO_SMALL
    out[0] = np.uint8(n >> 8)
    out[1] = np.uint8(n & 0xFF)
    if n == 0:
        return 2
    pos = 2
    acc = np.uint64(0)
    nacc = 0
    t_prev = ts[0]
    v_prev = vbits[0]
    # Zig-zag varint timestamp, then the raw value.
    zz = (np.uint64(t_prev) << np.uint64(1)) ^ np.uint64(t_prev >> 63)
    pos, acc, nacc = _put_uvarint(out, pos, acc, nacc, zz)
    pos, acc, nacc = _put_wide(out, pos, acc, nacc, v_prev, 64)
    last_bits = 64  # Width of the last write: Go leaves a zero byte after an aligned whole-byte write.
    delta_prev = np.uint64(0)
    leading = 255  # Go's 0xff: no window yet.
    trailing = 0
    for i in range(1, n):
        t = ts[i]
        delta = np.uint64(t) - np.uint64(t_prev)
        if i == 1:
            pos, acc, nacc = _put_uvarint(out, pos, acc, nacc, delta)
        else:
            dod = np.int64(delta - delta_prev)
            if dod == 0:
                pos, acc, nacc = _put(out, pos, acc, nacc, np.uint64(0), 1)
            # Prefix and payload in one write: 10 + 14 bits, 110 + 17, 1110 + 20 (Prometheus' bitRange).
            elif -8191 <= dod <= 8192:
                word = np.uint64(0b10 << 14) | (np.uint64(dod) & np.uint64(0x3FFF))
                pos, acc, nacc = _put(out, pos, acc, nacc, word, 16)
            elif -65535 <= dod <= 65536:
                word = np.uint64(0b110 << 17) | (np.uint64(dod) & np.uint64(0x1FFFF))
                pos, acc, nacc = _put(out, pos, acc, nacc, word, 20)
            elif -524287 <= dod <= 524288:
                word = np.uint64(0b1110 << 20) | (np.uint64(dod) & np.uint64(0xFFFFF))
                pos, acc, nacc = _put(out, pos, acc, nacc, word, 24)
            else:
                pos, acc, nacc = _put(out, pos, acc, nacc, np.uint64(0b1111), 4)
                pos, acc, nacc = _put_wide(out, pos, acc, nacc, np.uint64(dod), 64)
        v = vbits[i]
        x = v ^ v_prev
        if x == np.uint64(0):
            pos, acc, nacc = _put(out, pos, acc, nacc, np.uint64(0), 1)
            last_bits = 1
        else:
            new_leading = _clz64(x)
            if new_leading > 31:
                new_leading = 31
            new_trailing = _ctz64(x)
            if leading != 255 and new_leading >= leading and new_trailing >= trailing:
                # Reuse the previous window: control bits 10.
                pos, acc, nacc = _put(out, pos, acc, nacc, np.uint64(0b10), 2)
                last_bits = 64 - leading - trailing
                pos, acc, nacc = _put_wide(out, pos, acc, nacc, x >> np.uint64(trailing), last_bits)
            else:
                leading = new_leading
                trailing = new_trailing
                sigbits = 64 - leading - trailing
                # Control bits 11, 5 bits leading, 6 bits sigbits (64 written as 0).
                head = np.uint64(0b11 << 11) | (np.uint64(leading) << np.uint64(6)) | np.uint64(sigbits & 0x3F)
                pos, acc, nacc = _put(out, pos, acc, nacc, head, 13)
                last_bits = sigbits
                pos, acc, nacc = _put_wide(out, pos, acc, nacc, x >> np.uint64(trailing), sigbits)
        t_prev = t
        v_prev = v
        delta_prev = delta
    aligned = nacc % 8 == 0
    pos = _flush(out, pos, acc, nacc)
    if aligned and last_bits % 8 == 0:
        out[pos] = 0
        pos += 1
    return pos


# --- bit reader -------------------------------------------------------------
# State: next byte to load, a 64-bit buffer and how many of its low bits are
# still unread (``valid``). ``valid`` < 0 after a read past the end.


@numba.njit(cache=True, nogil=True, inline="always")
def _refill(data, pos):
    """Loads up to 8 bytes at pos; returns (pos, buffer, valid bits)."""
    size = data.shape[0]
    if pos + 8 <= size:
        buf = np.uint64(0)
        for k in range(8):
            buf = (buf << np.uint64(8)) | np.uint64(data[pos + k])
        return pos + 8, buf, 64
    buf = np.uint64(0)
    k = 0
    while pos + k < size:
        buf = (buf << np.uint64(8)) | np.uint64(data[pos + k])
        k += 1
    return pos + k, buf, 8 * k


@numba.njit(cache=True, nogil=True, inline="always")
def _get(data, pos, buf, valid, nbits):
    """Reads nbits (1..64); returns (value, pos, buf, valid) with valid = -1 past the end."""
    if nbits <= valid:
        valid -= nbits
        if nbits == 64:
            return buf, pos, buf, valid
        return (buf >> np.uint64(valid)) & ((np.uint64(1) << np.uint64(nbits)) - np.uint64(1)), pos, buf, valid
    # Take what is left, then the rest from the next load.
    need = nbits - valid
    high = np.uint64(0)
    if valid > 0:
        high = buf & ((np.uint64(1) << np.uint64(valid)) - np.uint64(1))
    pos, buf, valid = _refill(data, pos)
    if valid < need:
        return np.uint64(0), pos, buf, -1
    valid -= need
    if need == 64:
        return buf, pos, buf, valid
    low = (buf >> np.uint64(valid)) & ((np.uint64(1) << np.uint64(need)) - np.uint64(1))
    return (high << np.uint64(need)) | low, pos, buf, valid


@numba.njit(cache=True, nogil=True, inline="always")
def _get_uvarint(data, pos, buf, valid):
    """Reads a varint; returns (value, pos, buf, valid) with valid = -1 past the end, -3 on overflow."""
    x = np.uint64(0)
    for i in range(10):
        b, pos, buf, valid = _get(data, pos, buf, valid, 8)
        if valid < 0:
            return x, pos, buf, ERR_TRUNCATED
        if b < np.uint64(0x80):
            if i == 9 and b > np.uint64(1):
                return x, pos, buf, ERR_VARINT
            return x | (b << np.uint64(7 * i)), pos, buf, valid
        x |= (b & np.uint64(0x7F)) << np.uint64(7 * i)
    return x, pos, buf, ERR_VARINT


@numba.njit(cache=True, nogil=True)
def decode_into(data, ts_out, vbits_out):
    """Decodes a chunk into ts_out / vbits_out; returns the sample count or a negative ERR_* code.

    Never reads or writes out of bounds: a count larger than the output arrays
    gives ERR_OUTPUT_TOO_SMALL before anything is decoded.
    """
    if data.shape[0] < 2:
        return ERR_HEADER
    n = (np.int64(data[0]) << 8) | np.int64(data[1])
    if n > ts_out.shape[0] or n > vbits_out.shape[0]:
        return ERR_OUTPUT_TOO_SMALL
    if n == 0:
        return 0
    pos = 2
    buf = np.uint64(0)
    valid = 0
    zz, pos, buf, valid = _get_uvarint(data, pos, buf, valid)
    if valid < 0:
        return valid
    t = np.int64(zz >> np.uint64(1))
    if zz & np.uint64(1):
        t = ~t
    v, pos, buf, valid = _get(data, pos, buf, valid, 64)
    if valid < 0:
        return ERR_TRUNCATED
    ts_out[0] = t
    vbits_out[0] = v
    delta = np.uint64(0)
    leading = 0
    trailing = 0
    for i in range(1, n):
        if i == 1:
            delta, pos, buf, valid = _get_uvarint(data, pos, buf, valid)
            if valid < 0:
                return valid
        else:
            bit, pos, buf, valid = _get(data, pos, buf, valid, 1)
            if valid < 0:
                return ERR_TRUNCATED
            if bit != np.uint64(0):
                # Prefix 1, 10, 110, 1110 or 1111.
                width = 64
                for w in (14, 17, 20):
                    bit, pos, buf, valid = _get(data, pos, buf, valid, 1)
                    if valid < 0:
                        return ERR_TRUNCATED
                    if bit == np.uint64(0):
                        width = w
                        break
                raw, pos, buf, valid = _get(data, pos, buf, valid, width)
                if valid < 0:
                    return ERR_TRUNCATED
                if width == 64:
                    delta += raw
                else:
                    half = np.uint64(1) << np.uint64(width - 1)
                    if raw > half:
                        # Negative dod: sign-extend from width bits.
                        raw |= ~((np.uint64(1) << np.uint64(width)) - np.uint64(1))
                    delta += raw
        t = np.int64(np.uint64(t) + delta)
        bit, pos, buf, valid = _get(data, pos, buf, valid, 1)
        if valid < 0:
            return ERR_TRUNCATED
        if bit != np.uint64(0):
            bit, pos, buf, valid = _get(data, pos, buf, valid, 1)
            if valid < 0:
                return ERR_TRUNCATED
            if bit != np.uint64(0):
                head, pos, buf, valid = _get(data, pos, buf, valid, 11)
                if valid < 0:
                    return ERR_TRUNCATED
                leading = np.int64(head >> np.uint64(6))
                sigbits = np.int64(head & np.uint64(0x3F))
                if sigbits == 0:
                    sigbits = 64
                if leading + sigbits > 64:
                    return ERR_WINDOW
                trailing = 64 - leading - sigbits
            sig, pos, buf, valid = _get(data, pos, buf, valid, 64 - leading - trailing)
            if valid < 0:
                return ERR_TRUNCATED
            v ^= sig << np.uint64(trailing)
        ts_out[i] = t
        vbits_out[i] = v
    return n


@numba.njit(cache=True, nogil=True)
def _sample_starts(buf, offsets, starts):
    """starts[k] = samples in chunks before k by their headers; returns the total, or -1 - k if chunk k has none."""
    total = 0
    for k in range(offsets.shape[0] - 1):
        starts[k] = total
        o = offsets[k]
        if offsets[k + 1] - o < 2:
            return -1 - k
        total += (np.int64(buf[o]) << 8) | np.int64(buf[o + 1])
    starts[offsets.shape[0] - 1] = total
    return total


@numba.njit(cache=True, nogil=True)
def _decode_many(buf, offsets, starts, mint, maxt, ts_out, vbits_out):
    """Decodes chunk k = buf[offsets[k]:offsets[k+1]] to its place starts[k], keeping mint <= t <= maxt.

    Each chunk is decoded at a position known in advance (the CPU overlaps
    consecutive chunks), then its kept samples are moved down to the end of
    the previous ones. Returns (samples kept, -1) or (ERR_* code, index of the bad chunk).
    """
    kept = 0
    for k in range(offsets.shape[0] - 1):
        s = starts[k]
        e = starts[k + 1]
        n = decode_into(buf[offsets[k]:offsets[k + 1]], ts_out[s:e], vbits_out[s:e])
        if n < 0:
            return n, k
        for j in range(s, e):
            t = ts_out[j]
            if mint <= t <= maxt:
                ts_out[kept] = t
                vbits_out[kept] = vbits_out[j]
                kept += 1
    return kept, -1


def _error(code: int, context: str) -> CorruptChunk:
    return CorruptChunk(f"{context}: {_MESSAGES.get(code, f'error {code}')}")


def encode(ts: np.ndarray, vals: np.ndarray) -> bytes:
    """Encodes timestamps (ms) and float64 values into a Prometheus XOR chunk.

    Args:
        ts: int64 timestamps, one per value.
        vals: float64 values (their bit patterns are kept, NaN payloads too).

    Raises:
        ValueError: lengths differ or more than 65535 samples.
    """
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    vbits = np.ascontiguousarray(vals, dtype=np.float64).view(np.uint64)
    n = vbits.shape[0]
    if ts.shape[0] != n:
        raise ValueError(f"{ts.shape[0]} timestamps but {n} values")
    if n > MAX_SAMPLES:
        raise ValueError(f"{n} samples exceed the {MAX_SAMPLES} an XOR chunk can count")
    out = np.empty(max_chunk_bytes(n), dtype=np.uint8)
    nbytes = encode_into(ts, vbits, n, out)
    return out[:nbytes].tobytes()


def _as_u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def num_samples(data: bytes) -> int:
    """The sample count from the chunk header; CorruptChunk without one."""
    if len(data) < 2:
        raise _error(ERR_HEADER, f"chunk of {len(data)} bytes")
    return (data[0] << 8) | data[1]


def decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a chunk into (int64 timestamps, float64 values).

    Raises:
        CorruptChunk: the bytes do not decode.
    """
    n = num_samples(data)
    ts = np.empty(n, dtype=np.int64)
    vbits = np.empty(n, dtype=np.uint64)
    got = decode_into(_as_u8(data), ts, vbits)
    if got < 0:
        raise _error(got, f"chunk of {len(data)} bytes with {n} samples")
    return ts, vbits.view(np.float64)


def decode_many(chunks: Sequence[bytes], mint: int, maxt: int) -> tuple[np.ndarray, np.ndarray]:
    """Decodes chunks in order into one series' samples with ``mint <= t <= maxt``.

    Args:
        chunks: the XOR chunks of one series, in time order.
        mint: first timestamp to keep (ms, inclusive).
        maxt: last timestamp to keep (ms, inclusive).

    Returns:
        (int64 timestamps, float64 values), concatenated in chunk order.

    Raises:
        CorruptChunk: a chunk does not decode (its index is in the message).
    """
    lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = _as_u8(b"".join(chunks))
    starts = np.empty(len(chunks) + 1, dtype=np.int64)
    total = _sample_starts(buf, offsets, starts)
    if total < 0:
        k = -1 - total
        raise _error(ERR_HEADER, f"chunk {k} of {len(chunks)}, {len(chunks[k])} bytes")
    ts = np.empty(total, dtype=np.int64)
    vbits = np.empty(total, dtype=np.uint64)
    kept, bad = _decode_many(buf, offsets, starts, np.int64(mint), np.int64(maxt), ts, vbits)
    if kept < 0:
        raise _error(kept, f"chunk {bad} of {len(chunks)}")
    return ts[:kept], vbits[:kept].view(np.float64)
