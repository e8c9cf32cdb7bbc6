import math
import struct

import numpy as np
import pytest

from store import xor
from store.head import Head, HeadOptions
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.writerequest import decode
from tests import prompb_ref

MIN, MAX = -(2**63), 2**63 - 1
NOW = 10**13
STALE = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]


def _append(head, series, now=NOW):
    """series: list of (label dict or pair list, [(t, v), ...])."""
    req = [(sorted(d.items()) if isinstance(d, dict) else d, s) for d, s in series]
    return head.append(decode(prompb_ref.write_request(req)), now)


def _bits(vals):
    return [struct.unpack("<Q", struct.pack("<d", v))[0] for v in vals]


def _eq(name):
    return [Matcher(MatchType.EQ, "__name__", name)]


def test_append_and_select_round_trip_across_many_chunks():
    head = Head()
    ts = list(range(0, 500 * 15_000, 15_000))
    vals = [float(i) * 1.5 for i in range(500)]
    res = _append(head, [({"__name__": "a", "job": "x"}, list(zip(ts, vals)))])
    assert res.appended == 500 and not res.rejected
    [s] = head.select(_eq("a"), MIN, MAX)
    assert s.labels == Labels.from_dict({"__name__": "a", "job": "x"})
    got_t, got_v = s.samples()
    assert got_t.tolist() == ts and got_v.tolist() == vals
    chunks = list(s.chunks())
    assert all(xor.num_samples(c.data) <= 120 for c in chunks)
    # Chunks decode (with the reference decoder) to exactly the samples, in order.
    dt, dv = [], []
    for c in chunks:
        t, v = xor.decode(c.data)
        assert (c.mint, c.maxt) == (t[0], t[-1])
        dt += t
        dv += v
    assert dt == ts and dv == vals


def test_chunks_cut_at_chunk_range_boundaries():
    head = Head(HeadOptions(chunk_range_ms=100_000))
    _append(head, [({"__name__": "a"}, [(t, 1.0) for t in range(0, 300_000, 10_000)])])
    [s] = head.select(_eq("a"), MIN, MAX)
    assert [(c.mint, c.maxt) for c in s.chunks()] == [(0, 90_000), (100_000, 190_000), (200_000, 290_000)]


def test_select_clips_to_time_range():
    head = Head()
    _append(head, [({"__name__": "a"}, [(t, t / 1000) for t in range(0, 1_000_000, 1000)])])
    [s] = head.select(_eq("a"), 250_500, 300_000)
    t, v = s.samples()
    assert t[0] == 251_000 and t[-1] == 300_000 and len(t) == 50
    assert head.select(_eq("a"), 2_000_000, 3_000_000) == []


def test_special_values_are_kept_bit_for_bit():
    head = Head()
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000123))[0]
    vals = [math.inf, -math.inf, -0.0, STALE, nan_payload, 1e308, 5e-324]
    _append(head, [({"__name__": "a"}, [(i, v) for i, v in enumerate(vals)])])
    [s] = head.select(_eq("a"), MIN, MAX)
    assert _bits(s.samples()[1].tolist()) == _bits(vals)


def test_out_of_order_duplicate_and_same_value_rules():
    head = Head()
    _append(head, [({"__name__": "a"}, [(1000, 1.0), (2000, 2.0)])])
    res = _append(head, [({"__name__": "a"}, [(1500, 9.0), (2000, 2.0), (2000, 3.0), (3000, 4.0)])])
    assert res.appended == 1
    assert res.rejected["out_of_order"][0] == 1
    assert res.rejected["duplicate_timestamp"][0] == 1
    assert "timestamp 1500" in res.rejected["out_of_order"][1] and "a" in res.rejected["out_of_order"][1]
    [s] = head.select(_eq("a"), MIN, MAX)
    assert s.samples()[0].tolist() == [1000, 2000, 3000]
    assert s.samples()[1].tolist() == [1.0, 2.0, 4.0]


def test_out_of_bounds_too_old_and_too_far_ahead():
    head = Head(HeadOptions(out_of_bounds_window_ms=3_600_000, max_ahead_ms=600_000))
    _append(head, [({"__name__": "a"}, [(NOW, 1.0)])])
    res = _append(head, [({"__name__": "b"}, [(NOW - 3_600_001, 1.0), (NOW - 3_600_000, 2.0),
                                               (NOW + 600_000, 3.0), (NOW + 600_001, 4.0)])])
    assert res.appended == 2 and res.rejected["out_of_bounds"][0] == 2
    [s] = head.select(_eq("b"), MIN, MAX)
    assert s.samples()[1].tolist() == [2.0, 3.0]


def test_a_new_series_whose_samples_are_all_out_of_bounds_is_not_created():
    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=600_000))
    head.set_min_valid_time(10_000)
    res = _append(head, [({"__name__": f"old{i}"}, [(500, 1.0), (600, 2.0)]) for i in range(3)]
                  + [({"__name__": "mixed"}, [(500, 1.0), (20_000, 2.0)]),
                     ({"__name__": "ahead"}, [(NOW + 600_001, 1.0)])])
    assert res.appended == 1
    n, example = res.rejected["out_of_bounds"]
    assert n == 8 and 'series {__name__="old0"} timestamp 500 is older than the accepted minimum 10000' == example
    assert head.num_series() == 1  # only "mixed": as Prometheus, no empty series for rejected samples
    [s] = head.select([Matcher(MatchType.RE, "__name__", ".+")], MIN, MAX)
    assert s.labels.name == "mixed" and s.samples()[0].tolist() == [20_000]
    # A later, valid sample creates the series as usual.
    assert _append(head, [({"__name__": "old0"}, [(30_000, 3.0)])]).appended == 1
    assert head.num_series() == 2


@pytest.mark.parametrize("pairs,why", [
    ([("__name__", "a"), ("job", "x"), ("job", "y")], "duplicate label name"),
    ([("job", "x")], "missing metric name"),
    ([("__name__", ""), ("job", "x")], "missing metric name"),
    ([("__name__", "a"), ("", "x")], "empty label name"),
], ids=["duplicate", "no_name", "empty_name_value", "empty_label_name"])
def test_invalid_series_rejected_and_valid_ones_kept(pairs, why):
    head = Head()
    res = _append(head, [(pairs, [(1, 1.0), (2, 2.0)]), ({"__name__": "ok"}, [(1, 1.0)])])
    assert res.appended == 1
    n, msg = res.rejected["invalid_labels"]
    assert n == 2 and why in msg
    assert [s.labels.name for s in head.select([Matcher(MatchType.RE, "__name__", ".+")], MIN, MAX)] == ["ok"]


def test_invalid_utf8_rejected():
    body = prompb_ref.write_request([([("__name__", "a")], [(1, 1.0)])]).replace(b"\x01a", b"\x01\xff")
    res = Head().append(decode(body), NOW)
    assert "not valid UTF-8" in res.rejected["invalid_labels"][1]


def test_legacy_name_validation():
    head = Head(HeadOptions(name_validation="legacy"))
    res = _append(head, [({"__name__": "a.b"}, [(1, 1.0)]), ({"__name__": "a", "bad-name": "x"}, [(1, 1.0)]),
                         ({"__name__": "ok:rate5m"}, [(1, 1.0)])])
    assert res.appended == 1 and res.rejected["invalid_labels"][0] == 2
    assert Head().append(decode(prompb_ref.write_request([([("__name__", "a.b")], [(1, 1.0)])])), NOW).appended == 1


def test_unsorted_labels_are_the_same_series_as_sorted():
    head = Head()
    _append(head, [([("job", "x"), ("__name__", "a")], [(1, 1.0)])])
    _append(head, [([("__name__", "a"), ("job", "x")], [(2, 2.0)])])
    _append(head, [([("__name__", "a"), ("empty", ""), ("job", "x")], [(3, 3.0)])])
    assert head.num_series() == 1
    [s] = head.select(_eq("a"), MIN, MAX)
    assert s.samples()[0].tolist() == [1, 2, 3]


def test_many_series_grow_tables_and_stay_distinct():
    head = Head()
    n = 5000
    _append(head, [({"__name__": "m", "i": str(i)}, [(1, float(i))]) for i in range(n)])
    _append(head, [({"__name__": "m", "i": str(i)}, [(2, float(-i))]) for i in range(n)])
    assert head.num_series() == n
    got = {s.labels.get("i"): s.samples()[1].tolist() for s in head.select(_eq("m"), MIN, MAX)}
    assert got == {str(i): [float(i), float(-i)] for i in range(n)}


def test_select_is_a_snapshot():
    head = Head()
    _append(head, [({"__name__": "a"}, [(t, 1.0) for t in range(0, 200)])])
    [s] = head.select(_eq("a"), MIN, MAX)
    _append(head, [({"__name__": "a"}, [(t, 2.0) for t in range(200, 400)])])
    assert len(s.samples()[0]) == 200 and len(list(s.chunks())) == 2


def test_label_names_and_values_with_matchers_and_time():
    head = Head()
    _append(head, [({"__name__": "a", "job": "x"}, [(1000, 1.0)]), ({"__name__": "b", "env": "p"}, [(5000, 1.0)])])
    assert head.label_names([], MIN, MAX) == ["__name__", "env", "job"]
    assert head.label_names(_eq("a"), MIN, MAX) == ["__name__", "job"]
    assert head.label_values("__name__", [], MIN, MAX) == ["a", "b"]
    assert head.label_values("__name__", [], 4000, 6000) == ["a", "b"]  # whole head overlaps: as Prometheus
    assert head.label_values("__name__", [Matcher(MatchType.RE, "__name__", ".+")], 4000, 6000) == ["b"]
    assert head.label_values("job", _eq("b"), MIN, MAX) == []


def test_checkpoint_round_trip():
    head = Head()
    _append(head, [({"__name__": "a", "i": str(i)}, [(t, t * 0.5 + i) for t in range(0, 130 * 1000, 1000)])
                   for i in range(10)])
    restored = Head()
    restored.load_checkpoint(list(head.checkpoint_items()))
    assert restored.num_series() == 10 and restored.max_time == head.max_time
    m = [Matcher(MatchType.RE, "__name__", ".+")]
    for a, b in zip(head.select(m, MIN, MAX), restored.select(m, MIN, MAX)):
        assert a.labels == b.labels
        assert a.samples()[0].tolist() == b.samples()[0].tolist()
        assert _bits(a.samples()[1].tolist()) == _bits(b.samples()[1].tolist())
        assert list(a.chunks()) == list(b.chunks())
    # The restored head keeps enforcing ordering.
    res = _append(restored, [({"__name__": "a", "i": "0"}, [(5, 1.0)])])
    assert res.rejected["out_of_order"][0] == 1


def test_tsdb_stats_count_series_pairs_and_chunks():
    head = Head()
    assert head.tsdb_stats()["headStats"] == {"numSeries": 0, "numLabelPairs": 0, "chunkCount": 0,
                                              "minTime": 0, "maxTime": 0}
    _append(head, [([("__name__", "up"), ("job", "a")], [(NOW - 1000, 1.0), (NOW, 1.0)]),
                   ([("__name__", "up"), ("job", "bb")], [(NOW, 1.0)]),
                   ([("__name__", "go"), ("job", "a")], [(NOW - 2000, 1.0)])])
    st = head.tsdb_stats(limit=2)
    # Pairs: __name__=up, __name__=go, job=a, job=bb. One open chunk per series.
    assert st["headStats"] == {"numSeries": 3, "numLabelPairs": 4, "chunkCount": 3,
                               "minTime": NOW - 2000, "maxTime": NOW}
    assert st["seriesCountByMetricName"] == [{"name": "up", "value": 2}, {"name": "go", "value": 1}]
    assert st["labelValueCountByLabelName"] == [{"name": "__name__", "value": 2}, {"name": "job", "value": 2}]
    # Bytes of distinct values: __name__ "up"+"go" = 4, job "a"+"bb" = 3.
    assert st["memoryInBytesByLabelName"] == [{"name": "__name__", "value": 4}, {"name": "job", "value": 3}]
    assert st["seriesCountByLabelValuePair"] == [{"name": "__name__=up", "value": 2}, {"name": "job=a", "value": 2}]


def test_truncate_drops_old_chunks_and_empty_series_and_keeps_the_rest():
    head = Head(HeadOptions(chunk_range_ms=1000 * 120, out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    old = [(t * 1000, float(t)) for t in range(0, 300)]  # 300 samples: chunks cut at 120 samples
    _append(head, [([("__name__", "a")], old), ([("__name__", "gone")], [(5000, 1.0)])])
    _append(head, [([("__name__", "b")], [(10**6 + i, 2.0) for i in range(3)])])
    removed = head.truncate(before_ms=200_000)
    assert removed == 1  # "gone" had its only sample at 5 s
    assert head.num_series() == 2
    (a,) = head.select(_eq("a"), MIN, MAX)
    ts, vals = a.samples()
    # Chunks of samples 0-119 and 120-239 s: the first ends before 200 s and goes, the second stays
    # whole (it reaches 239 s); the open chunk 240-299 s stays.
    assert ts[0] == 120_000 and ts[-1] == 299_000 and len(ts) == 180
    assert np.array_equal(vals, np.arange(120, 300, dtype=float))
    (b,) = head.select(_eq("b"), MIN, MAX)
    assert b.samples()[0].tolist() == [10**6, 10**6 + 1, 10**6 + 2]
    assert head.label_values("__name__", [], MIN, MAX) == ["a", "b"]
    # Appending continues after the rebuild, to old and new series.
    assert _append(head, [([("__name__", "a")], [(300_000, 300.0)]), ([("__name__", "c")], [(1, 1.0)])]).appended == 2


def test_min_valid_time_rejects_older_appends_as_out_of_bounds():
    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    head.set_min_valid_time(1000)
    head.set_min_valid_time(500)  # never moves back
    assert head.min_valid_time == 1000
    res = _append(head, [([("__name__", "a")], [(999, 1.0), (1000, 2.0)])])
    assert res.appended == 1 and res.rejected["out_of_bounds"][0] == 1


def test_a_head_selection_gathers_its_series_in_the_given_order():
    from store.storage import common_gatherer

    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    _append(head, [([("__name__", n)], [(t, float(i * 1000 + t)) for t in range(i + 1)])
                   for i, n in enumerate(["c", "a", "b"])])
    series = head.select([Matcher(MatchType.RE, "__name__", ".+")], MIN, MAX)
    series = [series[2], series[0], series[1]]  # any order: c, a, b
    gatherer = common_gatherer(series)
    assert gatherer is not None
    ts, vals, offsets = gatherer.gather(series)
    assert offsets.tolist() == [0, 1, 3, 6]
    assert ts.tolist() == [0, 0, 1, 0, 1, 2]
    assert vals.tolist() == [0.0, 1000.0, 1001.0, 2000.0, 2001.0, 2002.0]  # c, a, b as given
    assert common_gatherer([]) is None
    # Series of two selections (or of another kind) are read one by one.
    other = head.select([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX)
    assert common_gatherer(series + other) is None


# ---- creating new series in bulk (the compiled checks of canonical keys) ---------------

_UTF8_EDGES = [b"a", b"\x7f", b"\xc2\x80", b"\xc1\xbf", b"\xdf\xbf", b"\xe0\xa0\x80", b"\xe0\x9f\xbf",
               b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf0\x8f\xbf\xbf",
               b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\x80", b"\xc3", b"\xe2\x82",
               b"\xf0\x9f\x98", b"\xc3\x28", b":", b"-", b"0", b"_", b"."]


def _raw_series(pairs, t, v):
    """A TimeSeries field with label bytes as given (protobuf's own encoder insists on UTF-8)."""
    def field(num, payload):
        return bytes([num << 3 | 2, len(payload)]) + payload
    labels = b"".join(field(1, field(1, n) + field(2, v)) for n, v in pairs)
    sample = b"\x09" + struct.pack("<d", v) + b"\x10" + bytes([t])
    return field(1, labels + field(2, sample))


def test_compiled_key_checks_agree_with_validate_labels():
    """Every byte string built from UTF-8 edge cases (overlongs, surrogates, truncated and
    out-of-range sequences) as a label name and value, both name validations: the head
    creates exactly the series ``validate_labels`` accepts, with its labels."""
    from store.head import validate_labels
    rng = np.random.default_rng(7)
    for mode in ("utf8", "legacy"):
        pieces = []
        for _ in range(400):
            k = rng.integers(1, 4)
            pieces.append(b"".join(_UTF8_EDGES[j] for j in rng.integers(0, len(_UTF8_EDGES), k)))
        cases = []
        for i, p in enumerate(pieces):
            q = pieces[(i * 7 + 3) % len(pieces)]
            cases.append([(b"__name__", b"m" + p), (b"zz", q)] if i % 3 else
                         [(b"__name__", q), (b"l" + p, b"v")])
        head = Head(HeadOptions(name_validation=mode))
        body = b"".join(_raw_series(pairs, 1, 1.0) for pairs in cases)
        req = decode(body)
        assert not (req.series[:, 6] & 1).any()  # every key canonical: all go the compiled way
        res = head.append(req, NOW)
        want = {}
        for pairs in cases:
            labels, err = validate_labels(list(pairs), mode)
            if not err:
                want[labels] = None
        got = {s.labels for s in head.select([Matcher(MatchType.RE, "__name__", ".*")], MIN, MAX)}
        assert got == set(want)
        assert res.appended == len(want) and res.rejected.get("invalid_labels", (0, ""))[0] == len(cases) - len(want)
        assert 0 < len(want) < len(cases)


@pytest.mark.parametrize("mode", ["utf8", "legacy"])
def test_a_0xff_byte_in_a_label_is_refused_not_read_as_a_separator(mode):
    """0xff separates names and values in a canonical key; a name or value holding one (never
    valid UTF-8) must not turn into other labels (it made ``{a="0123456789abcdef", =""}``)."""
    from store.head import validate_labels
    bad = [[(b"__name__", b"m"), (b"a", b"0123456789abcdef\xff")],
           [(b"__name__", b"m"), (b"a", b"\xff")],
           [(b"__name__", b"m"), (b"b", b"x\xffy")],
           [(b"__name__", b"m"), (b"label_name_0123\xff", b"1")],
           [(b"__name__", b"m\xff"), (b"c", b"1")]]
    good = [[(b"__name__", b"ok"), (b"i", str(i).encode())] for i in range(3)]
    head = Head(HeadOptions(name_validation=mode))
    res = head.append(decode(b"".join(_raw_series(p, 1, 1.0) for p in bad + good)), NOW)
    assert all(validate_labels(list(p), mode)[1] for p in bad)
    assert res.appended == len(good) and res.rejected["invalid_labels"][0] == len(bad)
    assert "not valid UTF-8" in res.rejected["invalid_labels"][1]
    assert {s.labels for s in head.select([Matcher(MatchType.RE, "__name__", ".*")], MIN, MAX)} == \
        {validate_labels(list(p), mode)[0] for p in good}


def test_a_new_series_twice_in_one_request_is_one_series():
    head = Head()
    res = _append(head, [({"__name__": "a", "i": "1"}, [(1, 1.0)]), ({"__name__": "b"}, [(1, 1.0)]),
                         ({"__name__": "a", "i": "1"}, [(2, 2.0)]),
                         ([("i", "1"), ("__name__", "a")], [(3, 3.0)])])  # the slow path, same series
    assert res.appended == 4 and head.num_series() == 2
    [s] = head.select(_eq("a"), MIN, MAX)
    assert s.labels == Labels.from_dict({"__name__": "a", "i": "1"}) and s.samples()[0].tolist() == [1, 2, 3]
    assert [x.labels.name for x in head.select([Matcher(MatchType.EQ, "i", "1")], MIN, MAX)] == ["a"]


@pytest.mark.parametrize("columns", [False, True])
def test_appends_to_known_series_count_and_record_what_they_appended(columns):
    # Known series with nothing to reject take a shorter path (no masks, counts from the kernel):
    # it must still count every sample, move max_time and mark the change tracker, also when
    # the chunk arrays grow in the middle of the request (the kernel is called again).
    from store import shardrecord

    def append(head, series):
        req = decode(prompb_ref.write_request(series))
        if columns:
            req = shardrecord.decode_block(shardrecord.encode_series(req))
        return head.append(req, NOW)

    names = [[("__name__", "m"), ("i", str(i))] for i in range(300)]
    head = Head()
    assert append(head, [(n, [(1000, 1.0)]) for n in names]).appended == 300
    before = head.changes.last_change(0, 10**9)
    grows = head._c_mint.shape[0]
    # 300 series x 2000 samples: 16 cuts per series, more closed chunks than the arrays hold.
    res = append(head, [(n, [(2000 + 1000 * k, float(k)) for k in range(2000)]) for n in names])
    assert head._c_mint.shape[0] > grows
    assert res.appended == 300 * 2000 and not res.rejected
    assert head.max_time == 2000 + 1000 * 1999
    assert head.changes.last_change(2000, 2000) > before and head.changes.last_change(2_001_000, 2_001_000) > before
    [s] = head.select([Matcher(MatchType.EQ, "i", "7")], MIN, MAX)
    assert s.samples()[0].tolist() == [1000] + [2000 + 1000 * k for k in range(2000)]
    # The same series again with one sample out of order among new ones: the general path.
    res = append(head, [(n, [(5_000_000, 1.0)]) for n in names[:2]] + [(names[2], [(1500, 1.0)])])
    assert res.appended == 2 and res.rejected["out_of_order"][0] == 1
    assert head.max_time == 5_000_000
