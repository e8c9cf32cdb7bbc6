"""Gorilla XOR chunks, byte for byte as Prometheus writes them (reference implementation).

This is the readable twin of :mod:`store.xorfast`: both produce and accept
exactly the bytes of Prometheus' ``chunkenc.XORChunk`` (encoding ``EncXOR`` =
1), as documented in ``store/docs/format/chunks.md``. Values are handled as
their IEEE 754 bit patterns (unsigned 64-bit integers) throughout, so NaN
payloads, the stale marker, ``-0.0`` and the infinities round-trip exactly.

Timestamp arithmetic wraps at 64 bits like Go's ``int64``/``uint64``, so any
sequence of int64 timestamps round-trips, even decreasing ones; the head only
ever encodes increasing timestamps.

The codec does no I/O: it takes and returns bytes and raises
:class:`store.errors.CorruptChunk` for input it cannot decode.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from store.errors import CorruptChunk

MAX_SAMPLES = 0xFFFF  # The sample count is a big-endian uint16 header.

_MASK64 = (1 << 64) - 1
_LEADING_MAX = 31  # Leading zeros are written in 5 bits.

# Delta-of-delta buckets after the first two samples: (prefix bits, prefix width, value width).
# A value width w holds dod in [-(2**(w-1) - 1), 2**(w-1)], Prometheus' bitRange.
_DOD_BUCKETS = ((0b10, 2, 14), (0b110, 3, 17), (0b1110, 4, 20))


def float_to_bits(v: float) -> int:
    """The IEEE 754 bit pattern of ``v`` as an unsigned 64-bit integer."""
    return struct.unpack(">Q", struct.pack(">d", v))[0]


def bits_to_float(b: int) -> float:
    """The float whose IEEE 754 bit pattern is ``b`` (payloads of NaN preserved)."""
    return struct.unpack(">d", struct.pack(">Q", b))[0]


def _signed64(x: int) -> int:
    """Reinterprets the low 64 bits of ``x`` as a two's complement int64."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _uvarint(x: int) -> bytes:
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _leading_zeros64(x: int) -> int:
    return 64 - x.bit_length()


def _trailing_zeros64(x: int) -> int:
    return (x & -x).bit_length() - 1


def _in_bit_range(x: int, nbits: int) -> bool:
    return -((1 << (nbits - 1)) - 1) <= x <= 1 << (nbits - 1)


class _BitWriter:
    """Appends bit strings most significant bit first, like Go's ``bstream``.

    Prometheus 2.x's ``bstream.writeByte`` always appends a fresh byte after
    the one it completes. When a write that ends in whole bytes (``writeBits``
    with a width divisible by 8, or a varint byte) leaves the stream
    byte-aligned, the stream therefore ends in one extra zero byte, and the
    chunk Prometheus stores and serves keeps it. :meth:`finish` reproduces it.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self._acc = 0  # Pending bits, fewer than 8 after each write.
        self._nacc = 0
        self._ends_with_byte = False

    def write(self, value: int, nbits: int) -> None:
        """Appends the ``nbits`` low bits of ``value`` (1 <= nbits <= 64)."""
        self._acc = (self._acc << nbits) | (value & ((1 << nbits) - 1))
        self._nacc += nbits
        while self._nacc >= 8:
            self._nacc -= 8
            self._out.append((self._acc >> self._nacc) & 0xFF)
        self._acc &= (1 << self._nacc) - 1
        # Go's writeBits ends in writeByte exactly when nbits is a multiple of 8.
        self._ends_with_byte = nbits % 8 == 0

    def finish(self) -> bytes:
        """The written bits, zero-padded to whole bytes, plus Go's extra byte if due."""
        out = bytearray(self._out)
        if self._nacc:
            out.append((self._acc << (8 - self._nacc)) & 0xFF)
        elif self._ends_with_byte:
            out.append(0)
        return bytes(out)


class _BitReader:
    """Reads bit strings most significant bit first; running out raises CorruptChunk."""

    def __init__(self, data: bytes, start_bit: int) -> None:
        self._data = data
        self._pos = start_bit
        self._end = 8 * len(data)

    def read(self, nbits: int, what: str) -> int:
        """The next ``nbits`` bits as an unsigned integer; ``what`` names them in errors."""
        if self._pos + nbits > self._end:
            raise CorruptChunk(
                f"chunk truncated: reading {what} needs {nbits} bits at bit {self._pos}, "
                f"only {self._end - self._pos} left"
            )
        first = self._pos >> 3
        last = (self._pos + nbits + 7) >> 3
        window = int.from_bytes(self._data[first:last], "big")
        self._pos += nbits
        return (window >> (8 * last - self._pos)) & ((1 << nbits) - 1)

    def read_uvarint(self, what: str) -> int:
        """A protobuf/Go unsigned varint of at most 10 bytes."""
        x = 0
        for i in range(10):
            byte = self.read(8, what)
            if byte < 0x80:
                if i == 9 and byte > 1:
                    break
                return x | (byte << (7 * i))
            x |= (byte & 0x7F) << (7 * i)
        raise CorruptChunk(f"chunk corrupt: {what} varint overflows 64 bits")


def _check_lengths(ts: Sequence[int], n: int) -> None:
    if len(ts) != n:
        raise ValueError(f"{len(ts)} timestamps but {n} values")
    if n > MAX_SAMPLES:
        raise ValueError(f"{n} samples exceed the {MAX_SAMPLES} an XOR chunk can count")


def encode_bits(ts: Sequence[int], vbits: Sequence[int]) -> bytes:
    """Encodes samples given as timestamps (ms) and value bit patterns into an XOR chunk.

    Args:
        ts: int64 timestamps in milliseconds, normally strictly increasing.
        vbits: the values as IEEE 754 bit patterns (unsigned 64-bit integers).

    Returns:
        The chunk bytes, identical to Prometheus' ``XORChunk.Bytes()``.

    Raises:
        ValueError: lengths differ or there are more than 65535 samples.
    """
    n = len(vbits)
    _check_lengths(ts, n)
    if n == 0:
        return b"\x00\x00"
    w = _BitWriter()
    t_prev = int(ts[0])
    v_prev = int(vbits[0]) & _MASK64
    # First sample: zig-zag varint timestamp, then the raw 64 value bits.
    for byte in _uvarint(((t_prev << 1) ^ (t_prev >> 63)) & _MASK64):
        w.write(byte, 8)
    w.write(v_prev, 64)
    delta_prev = 0
    leading, trailing = -1, 0  # -1: no leading/trailing window chosen yet (Go's 0xff).
    for i in range(1, n):
        t = int(ts[i])
        delta = (t - t_prev) & _MASK64
        if i == 1:
            for byte in _uvarint(delta):
                w.write(byte, 8)
        else:
            dod = _signed64(delta - delta_prev)
            if dod == 0:
                w.write(0, 1)
            else:
                for prefix, prefix_bits, value_bits in _DOD_BUCKETS:
                    if _in_bit_range(dod, value_bits):
                        w.write(prefix, prefix_bits)
                        w.write(dod, value_bits)
                        break
                else:
                    w.write(0b1111, 4)
                    w.write(dod, 64)
        v = int(vbits[i]) & _MASK64
        leading, trailing = _write_xor(w, v ^ v_prev, leading, trailing)
        t_prev, v_prev, delta_prev = t, v, delta
    data = bytearray(w.finish())
    data[0:0] = n.to_bytes(2, "big")
    return bytes(data)


def _write_xor(w: _BitWriter, xor: int, leading: int, trailing: int) -> tuple[int, int]:
    """Writes one value as its XOR with the previous value; returns the new (leading, trailing)."""
    if xor == 0:
        w.write(0, 1)
        return leading, trailing
    new_leading = min(_leading_zeros64(xor), _LEADING_MAX)
    new_trailing = _trailing_zeros64(xor)
    if leading >= 0 and new_leading >= leading and new_trailing >= trailing:
        # The meaningful bits fit in the previous window: control bits 10.
        w.write(0b10, 2)
        w.write(xor >> trailing, 64 - leading - trailing)
        return leading, trailing
    # A new window: control bits 11, 5 bits leading zeros, 6 bits length (64 is written as 0).
    sigbits = 64 - new_leading - new_trailing
    w.write(0b11, 2)
    w.write(new_leading, 5)
    w.write(sigbits & 0x3F, 6)
    w.write(xor >> new_trailing, sigbits)
    return new_leading, new_trailing


def encode(ts: Sequence[int], vals: Sequence[float]) -> bytes:
    """Encodes samples (timestamps in ms, float values) into an XOR chunk.

    See :func:`encode_bits`; values are converted to their bit patterns first.
    """
    return encode_bits(ts, [float_to_bits(v) for v in vals])


def num_samples(data: bytes) -> int:
    """The sample count from the chunk header.

    Raises:
        CorruptChunk: fewer than the 2 header bytes.
    """
    if len(data) < 2:
        raise CorruptChunk(f"chunk of {len(data)} bytes has no 2-byte sample count header")
    return (data[0] << 8) | data[1]


def decode_bits(data: bytes) -> tuple[list[int], list[int]]:
    """Decodes an XOR chunk into timestamps and value bit patterns.

    Bytes after the last sample (Prometheus' padding) are ignored.

    Raises:
        CorruptChunk: the bytes end before the header's sample count is read,
            or hold an impossible varint or value window.
    """
    data = bytes(data)
    n = num_samples(data)
    ts: list[int] = []
    vbits: list[int] = []
    if n == 0:
        return ts, vbits
    r = _BitReader(data, 16)
    ux = r.read_uvarint("first timestamp")
    t = _signed64((ux >> 1) ^ -(ux & 1))
    v = r.read(64, "first value")
    ts.append(t)
    vbits.append(v)
    delta = 0
    leading, trailing = 0, 0  # Go's iterator starts from zero, not from "unset".
    for i in range(1, n):
        if i == 1:
            delta = r.read_uvarint("second timestamp delta")
        else:
            dod = 0
            if r.read(1, f"timestamp of sample {i}"):
                for prefix, prefix_bits, value_bits in _DOD_BUCKETS:
                    if not r.read(1, f"timestamp of sample {i}"):
                        raw = r.read(value_bits, f"timestamp of sample {i}")
                        dod = raw - (1 << value_bits) if raw > 1 << (value_bits - 1) else raw
                        break
                else:
                    dod = _signed64(r.read(64, f"timestamp of sample {i}"))
            delta = (delta + dod) & _MASK64
        t = _signed64(t + delta)
        if r.read(1, f"value of sample {i}"):
            if r.read(1, f"value of sample {i}"):
                leading = r.read(5, f"value of sample {i}")
                sigbits = r.read(6, f"value of sample {i}") or 64
                if leading + sigbits > 64:
                    raise CorruptChunk(
                        f"chunk corrupt: sample {i} has {leading} leading zeros and {sigbits} significant bits"
                    )
                trailing = 64 - leading - sigbits
            sigbits = 64 - leading - trailing
            v ^= r.read(sigbits, f"value of sample {i}") << trailing
        ts.append(t)
        vbits.append(v)
    return ts, vbits


def decode(data: bytes) -> tuple[list[int], list[float]]:
    """Decodes an XOR chunk into timestamps (ms) and float values.

    Values are built from their bit patterns, so NaN payloads survive.

    Raises:
        CorruptChunk: see :func:`decode_bits`.
    """
    ts, vbits = decode_bits(data)
    return ts, [bits_to_float(b) for b in vbits]
