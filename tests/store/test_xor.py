"""XOR chunk codecs: Prometheus' own chunks, reference vs compiled, corruption, decode_many."""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import xor, xorfast
from store.errors import CorruptChunk

VECTORS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "testdata", "xor", "vectors.json")
with open(VECTORS_PATH) as _f:
    VECTORS = json.load(_f)["vectors"]

STALE_NAN = 0x7FF0000000000002
MASK64 = (1 << 64) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def vec_samples(v: dict) -> tuple[list[int], list[int]]:
    return v["timestamps"], [int(x, 16) for x in v["values"]]


def f2b(v: float) -> int:
    return struct.unpack(">Q", struct.pack(">d", v))[0]


def fast_encode_bits(ts: list[int], vbits: list[int], fill: int = 0xA5) -> bytes:
    """encode_into on a buffer full of garbage, exactly as large as max_chunk_bytes says."""
    n = len(ts)
    out = np.full(xorfast.max_chunk_bytes(n), fill, dtype=np.uint8)
    nb = xorfast.encode_into(np.array(ts, dtype=np.int64), np.array(vbits, dtype=np.uint64), n, out)
    assert nb >= 2
    return out[:nb].tobytes()


def fast_decode_bits(data: bytes) -> tuple[list[int], list[int]]:
    ts, vals = xorfast.decode(data)
    assert ts.dtype == np.int64 and vals.dtype == np.float64
    return ts.tolist(), vals.view(np.uint64).tolist()


def decodes_to(data: bytes, want: tuple[list[int], list[int]]) -> bool:
    try:
        return xor.decode_bits(data) == want
    except CorruptChunk:
        return False


def trailing_extra_byte(ts: list[int], vbits: list[int]) -> bool:
    """Whether Prometheus' chunk for these samples ends in Go's extra zero byte (computed independently)."""
    # Count the bits each field takes (see store/docs/format/chunks.md) and remember the last width.
    def uvarint_len(x: int) -> int:
        return max(1, (x.bit_length() + 6) // 7)

    bits = 8 * uvarint_len(((ts[0] << 1) ^ (ts[0] >> 63)) & MASK64) + 64
    last = 64
    window = None
    for i in range(1, len(ts)):
        delta = (ts[i] - ts[i - 1]) & MASK64
        if i == 1:
            bits += 8 * uvarint_len(delta)
        else:
            dod = (delta - ((ts[i - 1] - ts[i - 2]) & MASK64)) & MASK64
            dod = dod - (1 << 64) if dod >> 63 else dod
            if dod == 0:
                bits += 1
            elif -8191 <= dod <= 8192:
                bits += 16
            elif -65535 <= dod <= 65536:
                bits += 20
            elif -524287 <= dod <= 524288:
                bits += 24
            else:
                bits += 68
        x = vbits[i] ^ vbits[i - 1]
        if x == 0:
            bits += 1
            last = 1
            continue
        lead = min(64 - x.bit_length(), 31)
        trail = (x & -x).bit_length() - 1
        if window and lead >= window[0] and trail >= window[1]:
            last = 64 - window[0] - window[1]
            bits += 2 + last
        else:
            window = (lead, trail)
            last = 64 - lead - trail
            bits += 13 + last
    return bits % 8 == 0 and last % 8 == 0


# --- Prometheus' chunks ------------------------------------------------------------


def test_vectors_cover_the_cases():
    ids = {v["id"].split("/")[0] for v in VECTORS}
    assert len(VECTORS) >= 50
    assert {"dod_buckets", "nan_payloads", "stale_markers", "infinities_zeros", "day_jumps", "full_120",
            "one_sample", "two_samples", "constant", "counter", "gauge_random"} <= ids
    counts = [len(v["timestamps"]) for v in VECTORS]
    assert 1 in counts and 2 in counts and 120 in counts
    # Go's extra zero byte appears after one sample and after longer chunks too.
    extra = [v for v in VECTORS if trailing_extra_byte(*vec_samples(v))]
    assert any(len(v["timestamps"]) == 1 for v in extra)
    assert any(len(v["timestamps"]) > 2 for v in extra)
    values = {b for v in VECTORS for b in vec_samples(v)[1]}
    assert {STALE_NAN, 0x7FF8000000000001, f2b(float("inf")), f2b(float("-inf")), f2b(-0.0)} <= values


@pytest.mark.parametrize("vec", VECTORS, ids=[v["id"] for v in VECTORS])
def test_reference_matches_prometheus(vec):
    data = bytes.fromhex(vec["data"])
    ts, vbits = vec_samples(vec)
    assert xor.num_samples(data) == len(ts)
    assert xor.decode_bits(data) == (ts, vbits)
    assert xor.encode_bits(ts, vbits) == data
    # The float API keeps the bits, NaN payloads included.
    got_ts, got_vals = xor.decode(data)
    assert got_ts == ts and [f2b(v) for v in got_vals] == vbits
    assert xor.encode(ts, [xor.bits_to_float(b) for b in vbits]) == data


@pytest.mark.parametrize("vec", VECTORS, ids=[v["id"] for v in VECTORS])
def test_fast_matches_prometheus(vec):
    data = bytes.fromhex(vec["data"])
    ts, vbits = vec_samples(vec)
    assert xorfast.num_samples(data) == len(ts)
    assert fast_decode_bits(data) == (ts, vbits)
    assert fast_encode_bits(ts, vbits) == data
    assert fast_encode_bits(ts, vbits, fill=0x00) == data
    vals = np.array(vbits, dtype=np.uint64).view(np.float64)
    assert xorfast.encode(np.array(ts), vals) == data
    # Go's extra zero byte is there exactly when the field widths say so.
    assert trailing_extra_byte(ts, vbits) == (data[-1] == 0 and decodes_to(data[:-1], (ts, vbits)))


def test_empty_chunk():
    assert xor.encode([], []) == b"\x00\x00"
    assert xorfast.encode(np.array([], dtype=np.int64), np.array([])) == b"\x00\x00"
    assert xor.decode(b"\x00\x00") == ([], [])
    ts, vals = xorfast.decode(b"\x00\x00")
    assert ts.size == 0 and vals.size == 0


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError):
        xor.encode([1, 2], [1.0])
    with pytest.raises(ValueError):
        xorfast.encode(np.array([1, 2]), np.array([1.0]))
    n = xor.MAX_SAMPLES + 1
    with pytest.raises(ValueError):
        xor.encode_bits(range(n), [0] * n)
    with pytest.raises(ValueError):
        xorfast.encode(np.arange(n), np.zeros(n))
    ts = np.arange(3, dtype=np.int64)
    vb = np.zeros(3, dtype=np.uint64)
    assert xorfast.encode_into(ts, vb, 4, np.zeros(200, dtype=np.uint8)) < 0
    assert xorfast.encode_into(ts, vb, 3, np.zeros(xorfast.max_chunk_bytes(3) - 1, dtype=np.uint8)) < 0


# --- properties ---------------------------------------------------------------------

SPECIAL_BITS = [STALE_NAN, 0x7FF8000000000000, 0x7FF8000000000001, 0xFFF8000000000000, 0x7FF4000000000000,
                0x7FF0000000000001, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, f2b(float("inf")),
                f2b(float("-inf")), f2b(-0.0), 0, 1, 0x8000000000000001, f2b(1.0), f2b(15.0)]


@st.composite
def samples(draw):
    n = draw(st.integers(0, 150))
    if draw(st.booleans()):
        # Arbitrary int64 timestamps: deltas and their differences wrap around.
        ts = draw(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=n, max_size=n))
    else:
        t = draw(st.integers(-(1 << 62), 1 << 62))
        step = st.one_of(
            st.just(15_000), st.integers(14_990, 15_010), st.integers(1, 10),
            st.sampled_from([8192, 8193, 65536, 65537, 524288, 524289, 3_600_000, 1 << 32, (1 << 32) + 1]),
            st.integers(1, 1 << 40),
        )
        ts = []
        for _ in range(n):
            ts.append(t)
            t += draw(step)
    vbits = []
    v = draw(st.integers(0, MASK64))
    for _ in range(n):
        kind = draw(st.integers(0, 5))
        if kind == 1:
            v = draw(st.integers(0, MASK64))
        elif kind == 2:
            v = draw(st.sampled_from(SPECIAL_BITS))
        elif kind == 3:
            # A change of any width at any position: every leading/trailing zero count.
            change = draw(st.integers(1, MASK64)) >> draw(st.integers(0, 63))
            v ^= (change << draw(st.integers(0, 63))) & MASK64
        elif kind == 4:
            v = f2b(draw(st.floats(allow_nan=True, allow_infinity=True)))
        vbits.append(v)
    return ts, vbits


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(samples())
def test_reference_and_fast_agree_and_round_trip(case):
    ts, vbits = case
    ref = xor.encode_bits(ts, vbits)
    assert fast_encode_bits(ts, vbits) == ref
    assert xor.num_samples(ref) == len(ts)
    assert xor.decode_bits(ref) == (ts, vbits)
    assert fast_decode_bits(ref) == (ts, vbits)
    assert len(ref) <= xorfast.max_chunk_bytes(len(ts))
    if ts:
        assert trailing_extra_byte(ts, vbits) == (ref[-1] == 0 and decodes_to(ref[:-1], (ts, vbits)))


@settings(max_examples=100)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=130))
def test_float_api_keeps_bits(vals):
    ts = list(range(1_000, 1_000 + 15_000 * len(vals), 15_000))
    data = xor.encode(ts, vals)
    assert xorfast.encode(np.array(ts, dtype=np.int64), np.array(vals, dtype=np.float64)) == data
    got_ts, got_vals = xor.decode(data)
    assert got_ts == ts and [f2b(v) for v in got_vals] == [f2b(v) for v in vals]
    fts, fvals = xorfast.decode(data)
    assert fts.tolist() == ts and fvals.view(np.uint64).tolist() == [f2b(v) for v in vals]


# --- corrupt input -----------------------------------------------------------------


def both_reject(data: bytes) -> None:
    with pytest.raises(CorruptChunk):
        xor.decode_bits(data)
    with pytest.raises(CorruptChunk):
        xorfast.decode(data)
    n = (data[0] << 8 | data[1]) if len(data) >= 2 else 0
    ts = np.empty(n, dtype=np.int64)
    vb = np.empty(n, dtype=np.uint64)
    assert xorfast.decode_into(np.frombuffer(data, dtype=np.uint8), ts, vb) < 0


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x01", b"\x00\x01\x02", b"\x00\x02" + bytes(9),
                                  b"\xff\xff" + bytes(40), b"\x00\x01" + b"\xff" * 11 + bytes(8)],
                         ids=["empty", "one-byte", "count-1-no-body", "count-1-short", "count-2-short",
                              "count-65535", "varint-overflow"])
def test_corrupt_inputs_raise(data):
    both_reject(data)


def test_window_overflow_is_corrupt():
    # Second value: control 11, leading 31, sigbits 40: 71 bits do not fit in 64.
    head = b"\x00\x02\x02" + bytes(8) + b"\x01"  # ts 1, value 0, delta 1
    bits = "11" + format(31, "05b") + format(40, "06b") + "1" * 40
    bits += "0" * (-len(bits) % 8)
    data = head + int(bits, 2).to_bytes(len(bits) // 8, "big")
    both_reject(data)
    with pytest.raises(CorruptChunk, match="leading zeros"):
        xor.decode_bits(data)
    out = np.empty(2, dtype=np.int64), np.empty(2, dtype=np.uint64)
    assert xorfast.decode_into(np.frombuffer(data, dtype=np.uint8), *out) == xorfast.ERR_WINDOW


def test_error_codes():
    def code(data: bytes) -> int:
        return xorfast.decode_into(np.frombuffer(data, dtype=np.uint8), np.empty(3, dtype=np.int64),
                                   np.empty(3, dtype=np.uint64))

    assert code(b"\x00") == xorfast.ERR_HEADER
    assert code(b"\x00\x01" + b"\xff" * 11 + bytes(8)) == xorfast.ERR_VARINT
    assert code(b"\x00\x01\x02" + bytes(7)) == xorfast.ERR_TRUNCATED
    assert code(b"\x00\x04" + bytes(100)) == xorfast.ERR_OUTPUT_TOO_SMALL
    with pytest.raises(CorruptChunk, match="overflows"):
        xor.decode_bits(b"\x00\x01" + b"\xff" * 11 + bytes(8))


@pytest.mark.parametrize("vec", [v for v in VECTORS if len(v["timestamps"]) >= 2][:12],
                         ids=lambda v: v["id"])
def test_truncated_vectors_raise(vec):
    data = bytes.fromhex(vec["data"])
    want = vec_samples(vec)
    # The last byte holding sample bits is the last or (Go's extra zero byte) the one before.
    for cut in range(len(data) - 1):
        both_reject(data[:cut])
    short = data[:-1]
    try:
        got = xor.decode_bits(short)
    except CorruptChunk:
        both_reject(short)
    else:
        assert got == want and fast_decode_bits(short) == want


@settings(max_examples=300)
@given(st.integers(0, 300), st.binary(max_size=200))
def test_garbage_never_crashes_and_both_agree(count, body):
    data = count.to_bytes(2, "big") + body
    try:
        want = xor.decode_bits(data)
    except CorruptChunk:
        both_reject(data)
    else:
        assert fast_decode_bits(data) == want


def test_decode_into_checks_output_size():
    vec = next(v for v in VECTORS if len(v["timestamps"]) == 120)
    data = np.frombuffer(bytes.fromhex(vec["data"]), dtype=np.uint8)
    ts = np.zeros(119, dtype=np.int64)
    vb = np.zeros(200, dtype=np.uint64)
    assert xorfast.decode_into(data, ts, vb) == xorfast.ERR_OUTPUT_TOO_SMALL
    assert not ts.any() and not vb.any()
    assert xorfast.decode_into(data, np.zeros(120, dtype=np.int64), np.zeros(119, dtype=np.uint64)) < 0
    assert xorfast.decode_into(data, np.zeros(121, dtype=np.int64), np.zeros(121, dtype=np.uint64)) == 120


# --- decode_many -------------------------------------------------------------------------


def make_chunks(seed: int, n_chunks: int) -> tuple[list[bytes], list[int], list[int]]:
    rng = random.Random(seed)
    t = 1_700_000_000_000
    chunks, all_ts, all_vb = [], [], []
    for _ in range(n_chunks):
        n = rng.choice([1, 2, 7, 120])
        ts, vb = [], []
        for _ in range(n):
            t += rng.choice([15_000, 15_000, rng.randint(1, 100_000)])
            ts.append(t)
            vb.append(rng.choice([rng.getrandbits(64), f2b(rng.random()), STALE_NAN]))
        chunks.append(xor.encode_bits(ts, vb))
        all_ts += ts
        all_vb += vb
    return chunks, all_ts, all_vb


@pytest.mark.parametrize("seed", range(5))
def test_decode_many_filters_inclusive(seed):
    chunks, ts, vb = make_chunks(seed, 8)
    rng = random.Random(seed)
    bounds = [(ts[0], ts[-1]), (ts[0] - 1, ts[-1] + 1), (ts[3], ts[3]), (ts[-1] + 1, ts[-1] + 10),
              (INT64_MIN, INT64_MAX), (ts[-1], ts[0])]
    for _ in range(10):
        a, b = sorted(rng.sample(ts, 2))
        bounds.append((a, b))
    for mint, maxt in bounds:
        got_ts, got_vals = xorfast.decode_many(chunks, mint, maxt)
        keep = [i for i, t in enumerate(ts) if mint <= t <= maxt]
        assert got_ts.dtype == np.int64 and got_vals.dtype == np.float64
        assert got_ts.tolist() == [ts[i] for i in keep]
        assert got_vals.view(np.uint64).tolist() == [vb[i] for i in keep]


def test_decode_many_prometheus_chunks_in_order():
    vecs = [v for v in VECTORS if v["id"].startswith("regular_jitter/")]
    assert len(vecs) >= 3
    ts = [t for v in vecs for t in v["timestamps"]]
    vb = [b for v in vecs for b in vec_samples(v)[1]]
    got_ts, got_vals = xorfast.decode_many([bytes.fromhex(v["data"]) for v in vecs], INT64_MIN, INT64_MAX)
    assert got_ts.tolist() == ts and got_vals.view(np.uint64).tolist() == vb


def test_decode_many_empty_and_corrupt():
    ts, vals = xorfast.decode_many([], 0, 10)
    assert ts.size == 0 and vals.size == 0
    chunks, _, _ = make_chunks(7, 4)
    bad = list(chunks)
    bad[2] = bad[2][: len(bad[2]) // 2] if len(bad[2]) > 4 else b"\x00\x05\x01"
    with pytest.raises(CorruptChunk, match="chunk 2 of 4"):
        xorfast.decode_many(bad, INT64_MIN, INT64_MAX)
    with pytest.raises(CorruptChunk):
        xorfast.decode_many([chunks[0], b"\x00"], INT64_MIN, INT64_MAX)
