"""Columns records (``store.shardrecord``): a request read back from its columns equals the
request decoded from its protobuf, and malformed blocks are ``DecodeError``s."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from store import shardrecord, writerequest
from store.errors import DecodeError
from store.writerequest import S_SMP_N

T0 = 1_700_000_000_000


def protobuf() -> bytes:
    return writerequest.encode([([("__name__", f"m{i}"), ("job", "j"), ("zone", "zürich")],
                                 [(T0 + j * 1000, float(i * j)) for j in range(i % 4)]) for i in range(50)])


def columns(req: writerequest.WriteRequest) -> bytes:
    return shardrecord.encode_series(req)


def test_round_trip_equals_the_protobuf_decoding():
    want = writerequest.decode(protobuf())
    now, got = shardrecord.decode_record(shardrecord.encode_record(T0 + 5, columns(want)))
    assert now == T0 + 5 and got.num_series == 50 and got.num_samples == want.num_samples
    assert [got.key(i) for i in range(50)] == [want.key(i) for i in range(50)]
    assert [got.label_pairs(i) for i in range(50)] == [want.label_pairs(i) for i in range(50)]
    for name in ("hashes", "ts", "vbits", "sample_series"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert np.array_equal(got.series[:, S_SMP_N], want.series[:, S_SMP_N])


def test_empty_block():
    _, req = shardrecord.decode_record(shardrecord.encode_record(T0, columns(writerequest.decode(b""))))
    assert (req.num_series, req.num_samples) == (0, 0)


def corrupt(block: bytes, what: str) -> bytes:
    ns, nsm, nk, _ = struct.unpack_from("<IIII", block)
    if what == "short":
        return block[:10]
    if what == "sizes":
        return block[:-1]
    if what == "header":
        return struct.pack("<IIII", ns, nsm + 1, nk, 0) + block[16:]
    if what == "reserved":
        return struct.pack("<IIII", ns, nsm, nk, 1) + block[16:]
    if what == "counts":  # the first series claims one sample more than the header holds
        b = bytearray(block)
        p = 16 + 4 * ns
        struct.pack_into("<I", b, p, struct.unpack_from("<I", b, p)[0] + 1)
        return bytes(b)
    if what == "key":  # the last key byte is not 0xff
        return block[:-1] + b"x"
    raise AssertionError(what)


@pytest.mark.parametrize("what, message", [
    ("short", "shorter than its header"), ("sizes", "does not hold"), ("header", "does not hold"),
    ("reserved", "does not hold"), ("counts", "counts do not add up"), ("key", "not canonical label bytes")])
def test_malformed_blocks_are_decode_errors(what, message):
    block = columns(writerequest.decode(protobuf()))
    shardrecord.decode_block(block)
    with pytest.raises(DecodeError, match=message):
        shardrecord.decode_block(corrupt(block, what))


def test_records_that_are_not_columns_or_not_snappy():
    with pytest.raises(DecodeError):
        shardrecord.decode_record(b"\x01" + bytes(8) + b"x")
    with pytest.raises(DecodeError):
        shardrecord.decode_record(b"\x02" + bytes(8) + b"\xff\xff\xff")
    assert not shardrecord.is_columns(b"\x02") and shardrecord.is_columns(shardrecord.encode_record(T0, b""))
