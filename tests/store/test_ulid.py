"""ULIDs against the vectors of the ULID specification (github.com/ulid/spec and ulid/javascript)."""

from __future__ import annotations

import pytest

from store import ulid


def test_spec_vector_timestamp():
    # ulid/javascript README: ulid(1469918176385) // "01ARYZ6S41TSV4RRFFQ69G5FAV"
    assert ulid.timestamp("01ARYZ6S41TSV4RRFFQ69G5FAV") == 1469918176385
    assert ulid.new(1469918176385).startswith("01ARYZ6S41")


@pytest.mark.parametrize("raw,text", [
    (bytes(16), "00000000000000000000000000"),
    (b"\xff" * 16, "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"),
    (b"\x00" * 15 + b"\x01", "00000000000000000000000001"),
    (b"\x00" * 15 + b"\x20", "00000000000000000000000010"),
], ids=["zero", "max", "one", "thirty-two"])
def test_encode_decode_vectors(raw, text):
    assert ulid.encode(raw) == text
    assert ulid.decode(text) == raw


def test_new_uses_entropy_and_time():
    u = ulid.new(1_700_000_000_000, entropy=lambda n: b"\xab" * n)
    assert ulid.decode(u) == (1_700_000_000_000).to_bytes(6, "big") + b"\xab" * 10
    assert ulid.timestamp(u) == 1_700_000_000_000
    assert ulid.new(1) < ulid.new(2) < ulid.new(1 << 40)


@pytest.mark.parametrize("text", [
    "", "01ARYZ6S41TSV4RRFFQ69G5FA", "01ARYZ6S41TSV4RRFFQ69G5FAVV", "01arYZ6S41TSV4RRFFQ69G5FAV",
    "01ARYZ6S41TSV4RRFFQ69G5FAU", "80000000000000000000000000", None,
], ids=["empty", "short", "long", "lower-case", "letter-U", "above-128-bits", "not-a-string"])
def test_invalid(text):
    assert not ulid.is_valid(text)
    with pytest.raises(ValueError):
        ulid.decode(text)


@pytest.mark.parametrize("ms", [-1, 1 << 48], ids=["negative", "past-48-bits"])
def test_time_out_of_range(ms):
    with pytest.raises(ValueError):
        ulid.new(ms)
