import numpy as np
import pytest
import xxhash
from hypothesis import given, strategies as st

from store.labels import Labels
from store.xxhash64 import xxh64


def test_from_pairs_sorts_and_drops_empty_values():
    ls = Labels.from_pairs([("job", "x"), ("__name__", "up"), ("empty", "")])
    assert list(ls) == [("__name__", "up"), ("job", "x")]
    assert ls.name == "up" and ls.get("job") == "x" and ls.get("nope") == ""


def test_hash_is_prometheus_labels_hash():
    # Prometheus' labels.Hash(): xxhash64 over name 0xff value 0xff for each pair, in name order.
    ls = Labels.from_dict({"job": "node", "__name__": "up", "instance": "a:9100"})
    expected = xxhash.xxh64_intdigest(b"__name__\xffup\xffinstance\xffa:9100\xffjob\xffnode\xff")
    assert ls.hash() == expected


def test_hash_is_stable_across_versions():
    # A pinned value: the series id is part of the on-disk and sharding contract and must never change.
    assert Labels.from_dict({"__name__": "up", "job": "x"}).hash() == xxhash.xxh64_intdigest(
        b"__name__\xffup\xffjob\xffx\xff")


def test_string_format_matches_prometheus():
    ls = Labels.from_dict({"__name__": "up", "path": 'a"b\\c'})
    assert str(ls) == '{__name__="up", path="a\\"b\\\\c"}'


def test_with_without_keep():
    ls = Labels.from_dict({"__name__": "up", "a": "1", "b": "2"})
    assert ls.without_name() == Labels.from_dict({"a": "1", "b": "2"})
    assert ls.keep(["a"]) == Labels.from_dict({"a": "1"})
    assert ls.with_label("a", "") == Labels.from_dict({"__name__": "up", "b": "2"})
    assert ls.with_label("c", "3").get("c") == "3"


@given(st.binary(max_size=300), st.integers(0, 16))
def test_numba_xxh64_equals_reference(data, offset):
    buf = np.frombuffer(b"\x00" * offset + data + b"\x07", dtype=np.uint8)
    assert int(xxh64(buf, offset, len(data))) == xxhash.xxh64_intdigest(data)
