"""The numba WriteRequest scanner against Google's protobuf encoder (tests/prompb_ref.py)."""

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from store.errors import DecodeError
from store.labels import Labels
from store.writerequest import HAS_HISTOGRAMS, NEEDS_SLOW_PATH, S_FLAGS, S_HIST, decode
from tests import prompb_ref

label_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.dictionaries(label_text, label_text, min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(-2**62, 2**62), st.floats(allow_nan=False)), max_size=4)), max_size=6))
def test_decodes_what_protobuf_encodes(series):
    body = prompb_ref.write_request([(sorted(d.items()), s) for d, s in series])
    req = decode(body)
    assert req.num_series == len(series)
    k = 0
    for i, (d, samples) in enumerate(series):
        pairs = sorted((n.encode(), v.encode()) for n, v in d.items())
        assert req.label_pairs(i) == pairs
        canonical = Labels.from_dict(d).canonical()
        if not req.series[i, S_FLAGS] & NEEDS_SLOW_PATH:
            assert req.key(i) == canonical
            assert int(req.hashes[i]) == xxhash.xxh64_intdigest(canonical)
        for t, v in samples:
            assert req.ts[k] == t
            assert req.vbits[k] == struct.unpack("<Q", struct.pack("<d", v))[0]
            assert req.sample_series[k] == i
            k += 1
    assert req.num_samples == k


def test_value_bits_preserved_for_nan_payloads_and_stale_marker():
    stale = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
    body = prompb_ref.write_request([([("__name__", "x")], [(1, stale), (2, float("-inf")), (3, -0.0)])])
    req = decode(body)
    assert req.vbits.tolist() == [0x7FF0000000000002, 0xFFF0000000000000, 0x8000000000000000]


@pytest.mark.parametrize("pairs", [
    [("b", "1"), ("a", "2")],       # unsorted
    [("a", "1"), ("a", "2")],       # duplicate name
    [("", "1"), ("a", "2")],        # empty name
    [("a", ""), ("b", "2")],        # empty value (Prometheus drops it)
], ids=["unsorted", "duplicate", "empty_name", "empty_value"])
def test_non_canonical_labels_take_the_slow_path(pairs):
    req = decode(prompb_ref.write_request([(pairs, [(1, 1.0)])]))
    assert req.series[0, S_FLAGS] & NEEDS_SLOW_PATH


def test_histograms_are_counted_and_exemplars_metadata_skipped():
    r = prompb_ref.WriteRequest()
    ts = r.timeseries.add()
    ts.labels.add(name="__name__", value="h")
    ts.samples.add(timestamp=5, value=1.5)
    ts.exemplars.add(value=3, timestamp=5).labels.add(name="trace_id", value="abc")
    ts.histograms.add(timestamp=5)
    ts.histograms.add(timestamp=6)
    r.metadata.add(type=1, metric_family_name="h", help="help")
    req = decode(r.SerializeToString())
    assert req.num_series == 1 and req.ts.tolist() == [5]
    assert req.series[0, S_FLAGS] & HAS_HISTOGRAMS and req.series[0, S_HIST] == 2


def test_empty_request():
    req = decode(b"")
    assert req.num_series == 0 and req.num_samples == 0


@pytest.mark.parametrize("body", [
    b"\x0a\x05\x0a\x03",              # length runs past the end
    b"\x0a",                          # truncated length varint
    b"\x0b",                          # group wire type
    b"\x08\x01",                      # timeseries field with varint wire type
    b"\x0a\x04\x12\x02\x09\x00",      # truncated fixed64 value
    b"\x0a\x02\x12\x80",              # truncated varint inside a sample
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # overlong varint
], ids=["overrun", "truncated_len", "group", "wrong_wire_type", "short_fixed64", "short_varint", "overlong"])
def test_malformed_protobuf_raises_decode_error(body):
    with pytest.raises(DecodeError, match="invalid protobuf WriteRequest"):
        decode(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data):
    try:
        req = decode(data)
    except DecodeError:
        return
    assert req.num_samples <= len(data)


@pytest.mark.parametrize("series", [
    pytest.param([([("a", "b")], [(1, 1.0)])] * 3000, id="series-under-32-bytes"),
    pytest.param([([(c, "") for c in "abcdefghijkl"], [(1, 1.0)])] * 500, id="labels-under-8-bytes"),
    pytest.param([([("__name__", "up")], [(1000 + i, 1.0) for i in range(4000)])], id="many-samples"),
    pytest.param([([("__name__", "up"), ("instance", f"host-{i}")], [(1700000000000, float(i))])
                  for i in range(3000)], id="typical"),
])
def test_requests_of_any_density_decode_whole(series):
    req = decode(prompb_ref.write_request(series))
    assert req.num_series == len(series) and req.num_samples == sum(len(s) for _, s in series)
    k = 0
    for i, (pairs, samples) in enumerate(series):
        assert req.label_pairs(i) == [(n.encode(), v.encode()) for n, v in pairs]
        for t, v in samples:
            assert (req.ts[k], req.vbits[k], req.sample_series[k]) == (t, struct.unpack("<Q", struct.pack("<d", v))[0], i)
            k += 1


def test_densely_packed_request_decodes_after_growing_buffers():
    # Default-valued samples encode as two bytes each, far below the typical size the first pass assumes.
    body = prompb_ref.write_request([([("__name__", "x")], [(0, 0.0)] * 5000)] + [([("a", "")], [])] * 3000)
    req = decode(body)
    assert req.num_samples == 5000 and req.num_series == 3001


@settings(max_examples=100)
@given(st.lists(st.tuples(st.lists(st.tuples(label_text, label_text), max_size=4),
                          st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.floats()), max_size=4)), max_size=5))
def test_encode_is_read_back_by_google_protobuf(series):
    from store.writerequest import encode
    msg = prompb_ref.WriteRequest.FromString(encode(series))
    got = [([(lb.name, lb.value) for lb in ts.labels], [(s.timestamp, s.value) for s in ts.samples])
           for ts in msg.timeseries]
    want = [(list(lbls), list(smps)) for lbls, smps in series]
    assert repr(got) == repr(want)  # repr: NaN == NaN, -0.0 != 0.0
