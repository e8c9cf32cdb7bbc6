"""Block catalog and deletion marks: which blocks are complete, read, hidden, partial; mark format.

Blocks are written with ``write_block`` into a filesystem bucket; the
visibility rules are Thanos' (deduplicate by sources, marked blocks still
read). Deletion-mark documents are compared with the field names of Thanos'
``metadata.DeletionMark``.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from store import ulid as ulids
from store.aggregates import downsample_raw
from store.block import META_FILE, BlockMeta, write_aggregate_block, write_block
from store.bucket import Bucket, FilesystemBucket, ObjectAttributes
from store.catalog import (
    DELETION_MARK_FILE, BlockCatalog, DeletionMark, delete_block, mark_for_deletion, read_deletion_mark,
)
from store.errors import (
    BlockError, BucketError, BucketUnavailable, CorruptBlock, CorruptDeletionMark, DeletionMarkError,
    UnsupportedBlockVersion, UnsupportedDeletionMarkVersion, UnsupportedVersion,
)
from store.labels import Labels

H = 3_600_000
T0 = 1_700_006_400_000  # 2023-11-15T00:00:00Z
NOW_S = 1_750_000_000


def uid(ms: int, n: int = 0) -> str:
    """A deterministic ULID with time ``ms``; ``n`` orders ULIDs of the same time."""
    return ulids.encode(ms.to_bytes(6, "big") + n.to_bytes(10, "big"))


def series(mint: int, maxt: int, n: int = 2) -> list:
    out = []
    for i in range(n):
        ts = np.arange(mint, maxt, 60_000, dtype=np.int64)
        out.append((Labels.from_dict({"__name__": "up", "instance": f"h{i}"}), ts, np.ones(len(ts))))
    return out


def block(bucket: Bucket, mint: int, maxt: int, *, n: int = 0, level: int = 1, sources=(), resolution: int = 0,
          ulid: str | None = None) -> BlockMeta:
    if resolution:  # a downsampled block (format version 2) of the same samples
        aggs = [(ls, downsample_raw(ts, vs, resolution)) for ls, ts, vs in series(mint, maxt)]
        return write_aggregate_block(bucket, aggs, resolution=resolution, min_time=mint, max_time=maxt,
                                     level=level, sources=sources, ulid=ulid or uid(maxt, n))
    return write_block(bucket, series(mint, maxt), min_time=mint, max_time=maxt, level=level, sources=sources,
                       ulid=ulid or uid(maxt, n))


class RecordingBucket:
    """Passes calls through and records (operation, name); optionally fails some of them."""

    def __init__(self, inner: Bucket, fail=None) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []
        self.fail = fail or (lambda op, name: None)

    def _rec(self, op: str, name: str) -> None:
        self.calls.append((op, name))
        err = self.fail(op, name)
        if err is not None:
            raise err

    def get(self, name):
        self._rec("get", name)
        return self.inner.get(name)

    def get_range(self, name, offset, length):
        self._rec("get_range", name)
        return self.inner.get_range(name, offset, length)

    def iter(self, prefix="", recursive=False):
        self._rec("iter", prefix)
        return self.inner.iter(prefix, recursive)

    def exists(self, name):
        self._rec("exists", name)
        return self.inner.exists(name)

    def upload(self, name, data):
        self._rec("upload", name)
        self.inner.upload(name, data)

    def delete(self, name):
        self._rec("delete", name)
        self.inner.delete(name)

    def attributes(self, name) -> ObjectAttributes:
        self._rec("attributes", name)
        return self.inner.attributes(name)

    def close(self):
        self.inner.close()


@pytest.fixture
def fs(tmp_path) -> FilesystemBucket:
    return FilesystemBucket(tmp_path / "bkt")


def catalog(bucket: Bucket, now_ms: int | None = None) -> BlockCatalog:
    c = BlockCatalog(bucket, now=lambda: now_ms) if now_ms is not None else BlockCatalog(bucket)
    c.refresh()
    return c


# ---------------------------------------------------------------------------------------------
# Deletion mark format


def test_deletion_mark_json_has_thanos_field_names():
    u = uid(T0)
    mark = DeletionMark(id=u, deletion_time=NOW_S, details="past retention")
    doc = json.loads(mark.to_json())
    assert doc == {"id": u, "version": 1, "details": "past retention", "deletion_time": NOW_S}
    assert list(doc) == ["id", "version", "details", "deletion_time"]  # Thanos' struct order
    assert "details" not in json.loads(DeletionMark(id=u, deletion_time=NOW_S).to_json())  # omitempty
    assert DeletionMark.from_json(mark.to_json()) == mark


def test_deletion_mark_reads_a_thanos_written_mark():
    # As Thanos' MarkForDeletion writes it: json.Marshal, no spaces, details omitted when empty.
    u = uid(T0)
    data = json.dumps({"id": u, "version": 1, "deletion_time": 1600000000}, separators=(",", ":")).encode()
    assert DeletionMark.from_json(data) == DeletionMark(id=u, deletion_time=1600000000, version=1, details="")
    extra = json.dumps({"id": u, "version": 1, "deletion_time": 5, "future_key": [1]}).encode()
    assert DeletionMark.from_json(extra).deletion_time == 5


@pytest.mark.parametrize("doc,err,match", [
    (b"{", CorruptDeletionMark, "not valid JSON"),
    (b"\xff\xfe", CorruptDeletionMark, "not valid JSON"),
    (b"[]", CorruptDeletionMark, "not a JSON object"),
    ({"id": "X", "deletion_time": 1}, CorruptDeletionMark, "'version' is None"),
    ({"version": "1"}, CorruptDeletionMark, "not an integer"),
    ({"version": True}, CorruptDeletionMark, "not an integer"),
    ({"version": 2, "id": 5}, UnsupportedDeletionMarkVersion, "version 2 is not supported"),
    ({"version": 0}, UnsupportedDeletionMarkVersion, "version 0"),
    ({"version": 1, "deletion_time": 1}, CorruptDeletionMark, "'id' is None"),
    ({"version": 1, "id": "01abc", "deletion_time": 1}, CorruptDeletionMark, "not a ULID"),
    ({"version": 1, "id": "ID", "deletion_time": 1.5}, CorruptDeletionMark, "not Unix seconds"),
    ({"version": 1, "id": "ID", "deletion_time": -1}, CorruptDeletionMark, "not Unix seconds"),
    ({"version": 1, "id": "ID", "deletion_time": 1_750_000_000_000}, CorruptDeletionMark, "not Unix seconds"),
    ({"version": 1, "id": "ID", "deletion_time": "1"}, CorruptDeletionMark, "not Unix seconds"),
    ({"version": 1, "id": "ID"}, CorruptDeletionMark, "'deletion_time' is None"),
    ({"version": 1, "id": "ID", "deletion_time": 1, "details": 3}, CorruptDeletionMark, "'details'"),
], ids=["truncated", "not-utf8", "array", "no-version", "version-string", "version-bool", "version-2",
        "version-0", "no-id", "lowercase-id", "time-float", "time-negative", "time-in-ms", "time-string",
        "no-time", "details-number"])
def test_deletion_mark_rejects(doc, err, match):
    if isinstance(doc, dict):
        doc = json.dumps({k: (uid(T0) if v == "ID" else v) for k, v in doc.items()}).encode()
    with pytest.raises(err, match=match) as exc:
        DeletionMark.from_json(doc)
    assert isinstance(exc.value, DeletionMarkError) and isinstance(exc.value, BlockError)
    if err is UnsupportedDeletionMarkVersion:
        assert isinstance(exc.value, UnsupportedVersion)


def test_read_deletion_mark(fs):
    u = uid(T0)
    assert read_deletion_mark(fs, u) is None
    fs.upload(f"{u}/{DELETION_MARK_FILE}", DeletionMark(u, NOW_S, details="x").to_json())
    assert read_deletion_mark(fs, u) == DeletionMark(u, NOW_S, details="x")
    other = uid(T0, 1)
    fs.upload(f"{other}/{DELETION_MARK_FILE}", DeletionMark(u, NOW_S).to_json())
    with pytest.raises(CorruptDeletionMark, match=f"block {other}: deletion-mark.json names block {u}"):
        read_deletion_mark(fs, other)
    with pytest.raises(ValueError, match="invalid block ULID"):
        read_deletion_mark(fs, "../etc")


def test_read_deletion_mark_bucket_failure_propagates(fs):
    bad = RecordingBucket(fs, fail=lambda op, name: BucketUnavailable("down") if op == "get" else None)
    with pytest.raises(BucketUnavailable):
        read_deletion_mark(bad, uid(T0))


def test_mark_for_deletion_is_idempotent_and_never_moves_the_time(fs):
    m = block(fs, T0, T0 + H)
    mark, created = mark_for_deletion(fs, m.ulid, "retention", NOW_S)
    assert created and mark == DeletionMark(m.ulid, NOW_S, details="retention")
    assert read_deletion_mark(fs, m.ulid) == mark
    again, created = mark_for_deletion(fs, m.ulid, "other reason", NOW_S + 1000)
    assert not created and again == mark
    assert read_deletion_mark(fs, m.ulid) == mark


def test_mark_for_deletion_replaces_a_corrupt_mark_but_not_an_unknown_version(fs):
    u = uid(T0)
    fs.upload(f"{u}/{DELETION_MARK_FILE}", b'{"id": "trunc')
    mark, created = mark_for_deletion(fs, u, "r", NOW_S)
    assert created and read_deletion_mark(fs, u) == mark
    future = json.dumps({"id": u, "version": 2, "deletion_time": 1}).encode()
    fs.upload(f"{u}/{DELETION_MARK_FILE}", future)
    with pytest.raises(UnsupportedDeletionMarkVersion):
        mark_for_deletion(fs, u, "r", NOW_S)
    assert fs.get(f"{u}/{DELETION_MARK_FILE}") == future


@pytest.mark.parametrize("now", [NOW_S * 1000, -1, 1.5, True], ids=["milliseconds", "negative", "float", "bool"])
def test_mark_for_deletion_wants_unix_seconds(fs, now):
    with pytest.raises(ValueError, match="Unix seconds"):
        mark_for_deletion(fs, uid(T0), "r", now)
    assert list(fs.iter()) == []


def test_mark_for_deletion_rejects_invalid_ulid(fs):
    with pytest.raises(ValueError, match="invalid block ULID"):
        mark_for_deletion(fs, "nope", "r", NOW_S)


# ---------------------------------------------------------------------------------------------
# delete_block


def test_delete_block_deletes_meta_first_and_mark_last(fs):
    m = block(fs, T0, T0 + H)
    fs.upload(f"{m.ulid}/extra/debug.txt", b"x")
    mark_for_deletion(fs, m.ulid, "r", NOW_S)
    other = block(fs, T0, T0 + H, n=1)
    rec = RecordingBucket(fs)
    deleted = delete_block(rec, m.ulid)
    order = [name for op, name in rec.calls if op == "delete"]
    assert order == deleted
    assert order[0] == f"{m.ulid}/{META_FILE}" and order[-1] == f"{m.ulid}/{DELETION_MARK_FILE}"
    assert set(order) == {f"{m.ulid}/{f}" for f in ("meta.json", "data.parquet", "index.parquet",
                                                    "extra/debug.txt", DELETION_MARK_FILE)}
    assert list(fs.iter()) == [f"{other.ulid}/"]
    assert delete_block(fs, m.ulid) == []  # idempotent


def test_delete_block_skips_objects_deleted_meanwhile(fs):
    m = block(fs, T0, T0 + H)

    def race(op, name):
        if op == "delete" and name.endswith("data.parquet"):
            fs.delete(name)  # another deleter got there first
        return None

    deleted = delete_block(RecordingBucket(fs, fail=race), m.ulid)
    assert f"{m.ulid}/data.parquet" not in deleted and list(fs.iter()) == []


def test_delete_block_interrupted_leaves_an_invisible_marked_block_that_a_rerun_finishes(fs):
    m = block(fs, T0, T0 + H)
    mark_for_deletion(fs, m.ulid, "r", NOW_S)
    failing = RecordingBucket(fs, fail=lambda op, name: BucketError("boom")
                              if op == "delete" and name.endswith("index.parquet") else None)
    with pytest.raises(BucketError):
        delete_block(failing, m.ulid)
    c = catalog(fs)
    assert c.all_blocks() == [] and c.blocks() == []
    assert read_deletion_mark(fs, m.ulid) is not None
    delete_block(fs, m.ulid)
    assert list(fs.iter()) == []


def test_delete_block_rejects_invalid_ulid(fs):
    with pytest.raises(ValueError):
        delete_block(fs, "")


# ---------------------------------------------------------------------------------------------
# Catalog: listing


def test_refresh_sorts_directories_into_complete_unreadable_and_partial(fs):
    good = block(fs, T0, T0 + H)
    partial = uid(T0, 7)
    fs.upload(f"{partial}/data.parquet", b"half")
    corrupt = uid(T0, 8)
    fs.upload(f"{corrupt}/meta.json", b"{not json")
    future = uid(T0, 9)
    fs.upload(f"{future}/meta.json", json.dumps({"format": "flashback-block", "version": 3}).encode())
    thanos = uid(T0, 10)
    fs.upload(f"{thanos}/meta.json", json.dumps({"ulid": thanos, "version": 1}).encode())
    wrong = uid(T0, 11)
    fs.upload(f"{wrong}/meta.json", fs.get(f"{good.ulid}/meta.json"))
    fs.upload("debug/meta.json", b"{}")  # not a ULID: ignored
    fs.upload("README", b"hi")
    fs.upload(f"{uid(T0, 12).lower()}/meta.json", b"{}")  # lower case: not a canonical ULID, ignored

    c = catalog(fs)
    assert [b.ulid for b in c.all_blocks()] == [good.ulid]
    assert c.get(good.ulid).meta == good and c.get(partial) is None
    errors = c.errors
    assert set(errors) == {corrupt, future, thanos, wrong}
    assert isinstance(errors[corrupt], CorruptBlock)
    assert isinstance(errors[future], UnsupportedBlockVersion)
    assert isinstance(errors[thanos], UnsupportedBlockVersion)
    assert isinstance(errors[wrong], CorruptBlock) and "names block" in str(errors[wrong])
    assert [p.ulid for p in c.partial_blocks(0)] == [partial]
    assert c.blocks() == [good]


def test_empty_and_missing_bucket(tmp_path):
    c = catalog(FilesystemBucket(tmp_path / "nothing"))
    assert c.all_blocks() == [] and c.blocks() == [] and c.errors == {} and c.partial_blocks(0) == []


def test_catalog_is_empty_before_the_first_refresh(fs):
    block(fs, T0, T0 + H)
    assert BlockCatalog(fs).blocks() == []


def test_refresh_failure_keeps_the_previous_snapshot(fs):
    m = block(fs, T0, T0 + H)
    down = {"on": False}
    bucket = RecordingBucket(fs, fail=lambda op, name: BucketUnavailable("unreachable") if down["on"] else None)
    c = BlockCatalog(bucket)
    c.refresh()
    down["on"] = True
    block(fs, T0 + H, T0 + 2 * H)
    with pytest.raises(BucketUnavailable):
        c.refresh()
    assert c.blocks() == [m]


def test_refresh_failure_reading_meta_propagates(fs):
    block(fs, T0, T0 + H)
    bucket = RecordingBucket(fs, fail=lambda op, name: BucketError("denied") if op == "get" else None)
    with pytest.raises(BucketError, match="denied"):
        BlockCatalog(bucket).refresh()


def test_refresh_reads_each_meta_and_mark_once(fs):
    blocks_ = [block(fs, T0 + i * H, T0 + (i + 1) * H) for i in range(5)]
    mark_for_deletion(fs, blocks_[0].ulid, "r", NOW_S)
    rec = RecordingBucket(fs)
    c = BlockCatalog(rec, concurrency=3)
    c.refresh()
    gets = sorted(name for op, name in rec.calls if op == "get")
    assert gets == sorted([f"{b.ulid}/meta.json" for b in blocks_] + [f"{blocks_[0].ulid}/{DELETION_MARK_FILE}"])
    rec.calls.clear()
    c.refresh()
    assert rec.calls == [("iter", "")]  # one listing, everything else cached
    mark_for_deletion(fs, blocks_[1].ulid, "r", NOW_S)
    delete_block(fs, blocks_[0].ulid)
    rec.calls.clear()
    c.refresh()
    assert [name for op, name in rec.calls if op == "get"] == [f"{blocks_[1].ulid}/{DELETION_MARK_FILE}"]
    assert [b.ulid for b in c.all_blocks()] == [b.ulid for b in blocks_[1:]]
    assert c.get(blocks_[1].ulid).marked


def test_unmarking_is_seen(fs):
    m = block(fs, T0, T0 + H)
    mark_for_deletion(fs, m.ulid, "r", NOW_S)
    c = catalog(fs)
    assert c.get(m.ulid).marked
    fs.delete(f"{m.ulid}/{DELETION_MARK_FILE}")
    c.refresh()
    assert not c.get(m.ulid).marked


def test_corrupt_meta_is_read_again_on_refresh(fs):
    u = uid(T0 + H)
    fs.upload(f"{u}/meta.json", b"{")
    c = catalog(fs)
    assert u in c.errors
    good = block(fs, T0, T0 + H, ulid=u)  # rewritten (e.g. by hand)
    c.refresh()
    assert c.errors == {} and c.blocks() == [good]


def test_refresh_concurrent_with_readers(fs):
    for i in range(6):
        block(fs, T0 + i * H, T0 + (i + 1) * H)
    c = catalog(fs)
    seen: list[int] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(len(c.blocks()))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(20):
        c.refresh()
    stop.set()
    t.join()
    assert set(seen) == {6}


def test_concurrency_must_be_positive(fs):
    with pytest.raises(ValueError):
        BlockCatalog(fs, concurrency=0)


# ---------------------------------------------------------------------------------------------
# Catalog: what queriers read


def test_blocks_time_range_bounds(fs):
    a = block(fs, T0, T0 + H)            # samples t in [T0, T0+H)
    b = block(fs, T0 + H, T0 + 2 * H)
    c = catalog(fs)
    assert c.blocks() == [a, b]
    assert c.blocks(T0, T0) == [a]
    assert c.blocks(T0 + H - 1, T0 + H - 1) == [a]        # last possible sample of a
    assert c.blocks(T0 + H, T0 + H) == [b]                # maxTime is exclusive
    assert c.blocks(T0 - 10, T0 - 1) == []
    assert c.blocks(None, T0 + H - 1) == [a]
    assert c.blocks(T0 + H, None) == [b]
    assert c.blocks(T0 + 2 * H, None) == []


def test_blocks_by_resolution(fs):
    raw = block(fs, T0, T0 + H)
    down = block(fs, T0, T0 + H, n=1, resolution=300_000, sources=[raw.ulid])
    c = catalog(fs)
    assert c.blocks() == [raw]  # the same sources at another resolution hide nothing
    assert c.blocks(resolution=300_000) == [down]
    assert c.blocks(resolution=3_600_000) == []


def test_blocks_held_by_a_merged_block_are_hidden(fs):
    a = block(fs, T0, T0 + H)
    b = block(fs, T0 + H, T0 + 2 * H)
    lone = block(fs, T0 + 2 * H, T0 + 3 * H)
    merged = block(fs, T0, T0 + 2 * H, level=2, sources=[a.ulid, b.ulid], ulid=uid(T0 + 5 * H))
    c = catalog(fs)
    assert c.blocks() == [merged, lone]
    assert c.get(a.ulid).hidden_by == merged.ulid and c.get(b.ulid).hidden_by == merged.ulid
    assert c.get(merged.ulid).hidden_by is None
    assert len(c.all_blocks()) == 4


def test_hidden_by_names_the_outermost_block(fs):
    ones = [block(fs, T0 + i * H, T0 + (i + 1) * H) for i in range(4)]
    two = block(fs, T0, T0 + 2 * H, level=2, sources=[ones[0].ulid, ones[1].ulid], ulid=uid(T0 + 9 * H))
    three = block(fs, T0, T0 + 4 * H, level=3, sources=[o.ulid for o in ones], ulid=uid(T0 + 10 * H))
    c = catalog(fs)
    assert c.blocks() == [three]
    assert {c.get(u).hidden_by for u in [o.ulid for o in ones] + [two.ulid]} == {three.ulid}


def test_identical_sources_keep_the_smallest_ulid(fs):
    # Thanos: of blocks with the same sources, the smallest ULID is read, whatever the levels.
    a = block(fs, T0, T0 + H, ulid=uid(T0 + 5 * H))
    x = block(fs, T0, T0 + H, level=1, sources=[a.ulid], ulid=uid(T0 + 3 * H, 1))
    y = block(fs, T0, T0 + H, level=2, sources=[a.ulid], ulid=uid(T0 + 3 * H, 2))
    c = catalog(fs)
    assert c.blocks() == [x]
    assert c.get(y.ulid).hidden_by == x.ulid and c.get(a.ulid).hidden_by == x.ulid


def test_overlapping_blocks_without_containment_are_both_read(fs):
    # A retried upload: two level-1 blocks of the same window, each its own source.
    first = block(fs, T0, T0 + H, n=1)
    retry = block(fs, T0, T0 + H, n=2)
    partly = block(fs, T0 + H // 2, T0 + 2 * H, n=3)
    c = catalog(fs)
    assert c.blocks() == [first, retry, partly]
    assert [(p[0].ulid, p[1].ulid) for p in c.overlaps()] == [
        (first.ulid, retry.ulid), (first.ulid, partly.ulid), (retry.ulid, partly.ulid)]
    assert c.overlaps(resolution=300_000) == []


def test_partially_overlapping_sources_do_not_hide(fs):
    a, b, d = (block(fs, T0 + i * H, T0 + (i + 1) * H) for i in range(3))
    ab = block(fs, T0, T0 + 2 * H, level=2, sources=[a.ulid, b.ulid], ulid=uid(T0 + 8 * H, 1))
    bd = block(fs, T0 + H, T0 + 3 * H, level=2, sources=[b.ulid, d.ulid], ulid=uid(T0 + 8 * H, 2))
    c = catalog(fs)
    assert c.blocks() == [ab, bd]  # both read: the reader deduplicates b's samples


def test_marked_blocks_are_still_read_and_still_hide(fs):
    a = block(fs, T0, T0 + H)
    b = block(fs, T0, T0 + H, n=1)
    merged = block(fs, T0, T0 + H, level=2, sources=[a.ulid, b.ulid], ulid=uid(T0 + 4 * H))
    other = block(fs, T0 + H, T0 + 2 * H)
    mark_for_deletion(fs, merged.ulid, "r", NOW_S)
    mark_for_deletion(fs, other.ulid, "r", NOW_S)
    c = catalog(fs)
    assert c.blocks() == [merged, other]
    assert c.get(a.ulid).hidden_by == merged.ulid
    assert c.get(other.ulid).deletion_mark.deletion_time == NOW_S


def test_an_incomplete_merged_block_hides_nothing(fs):
    a, b = block(fs, T0, T0 + H), block(fs, T0 + H, T0 + 2 * H)
    merged = block(fs, T0, T0 + 2 * H, level=2, sources=[a.ulid, b.ulid], ulid=uid(T0 + 4 * H))
    assert catalog(fs).blocks() == [merged]
    fs.delete(f"{merged.ulid}/meta.json")  # upload not finished (or deletion begun)
    c = catalog(fs)
    assert c.blocks() == [a, b] and c.get(a.ulid).hidden_by is None


def test_an_unreadable_merged_block_hides_nothing(fs):
    a, b = block(fs, T0, T0 + H), block(fs, T0 + H, T0 + 2 * H)
    merged = block(fs, T0, T0 + 2 * H, level=2, sources=[a.ulid, b.ulid], ulid=uid(T0 + 4 * H))
    fs.upload(f"{merged.ulid}/meta.json", b"garbage")
    c = catalog(fs)
    assert c.blocks() == [a, b] and merged.ulid in c.errors


def test_empty_sources_count_as_the_block_itself(fs):
    a = block(fs, T0, T0 + H)
    b = block(fs, T0, T0 + H, n=1)
    doc = json.loads(fs.get(f"{b.ulid}/meta.json"))
    doc["compaction"]["sources"] = []
    fs.upload(f"{b.ulid}/meta.json", json.dumps(doc).encode())
    c = catalog(fs)
    assert [m.ulid for m in c.blocks()] == [a.ulid, b.ulid]  # an empty set is in every set: not used


def test_block_with_a_bad_mark_is_listed_with_the_error(fs):
    a = block(fs, T0, T0 + H)
    b = block(fs, T0 + H, T0 + 2 * H)
    fs.upload(f"{a.ulid}/{DELETION_MARK_FILE}", b"{")
    fs.upload(f"{b.ulid}/{DELETION_MARK_FILE}", json.dumps({"id": b.ulid, "version": 9, "deletion_time": 1}).encode())
    c = catalog(fs)
    assert c.blocks() == [a, b]
    assert isinstance(c.get(a.ulid).mark_error, CorruptDeletionMark) and not c.get(a.ulid).marked
    assert isinstance(c.get(b.ulid).mark_error, UnsupportedDeletionMarkVersion) and not c.get(b.ulid).marked


# ---------------------------------------------------------------------------------------------
# Catalog: partial blocks


def test_partial_blocks_by_age(fs):
    now = int(time.time() * 1000)
    old_ulid = uid(now - 10 * H)
    fs.upload(f"{old_ulid}/data.parquet", b"x")  # written just now, so not old whatever its ULID says
    young_ulid = uid(now)
    fs.upload(f"{young_ulid}/data.parquet", b"x")
    future_ulid = uid(now + 100 * H)
    fs.upload(f"{future_ulid}/data.parquet", b"x")

    assert catalog(fs, now_ms=now).partial_blocks(3600) == []
    later = BlockCatalog(fs, now=lambda: now + 2 * H)
    later.refresh()
    got = later.partial_blocks(3600)
    assert [p.ulid for p in got] == sorted([old_ulid, young_ulid])
    assert got[0].objects == (f"{got[0].ulid}/data.parquet",) and got[0].deletion_mark is None
    assert now - 5000 <= got[0].last_activity_ms <= now + 5000
    assert [p.ulid for p in later.partial_blocks(0)] == sorted([old_ulid, young_ulid])
    with pytest.raises(ValueError):
        later.partial_blocks(-1)


def test_partial_block_that_completes_after_the_refresh_is_not_listed(fs):
    now = int(time.time() * 1000)
    u = uid(now - 10 * H)
    fs.upload(f"{u}/data.parquet", b"x")
    c = BlockCatalog(fs, now=lambda: now + 10 * H)
    c.refresh()
    fs.upload(f"{u}/meta.json", b"{}")
    assert c.partial_blocks(60) == []


def test_partial_block_with_a_mark_is_an_interrupted_deletion(fs):
    m = block(fs, T0, T0 + H)
    mark_for_deletion(fs, m.ulid, "r", NOW_S)
    fs.delete(f"{m.ulid}/meta.json")
    c = BlockCatalog(fs, now=lambda: int(time.time() * 1000) + 10 * H)
    c.refresh()
    (p,) = c.partial_blocks(60)
    assert p.ulid == m.ulid and p.deletion_mark == read_deletion_mark(fs, m.ulid)
    assert f"{m.ulid}/{DELETION_MARK_FILE}" in p.objects
    fs.upload(f"{m.ulid}/{DELETION_MARK_FILE}", b"{")  # corrupt: listed, without its mark
    (p,) = c.partial_blocks(60)
    assert p.deletion_mark is None


def test_partial_block_objects_vanishing_meanwhile(fs):
    u = uid(T0)
    fs.upload(f"{u}/data.parquet", b"x")
    c = BlockCatalog(fs, now=lambda: int(time.time() * 1000) + 10 * H)
    c.refresh()
    fs.delete(f"{u}/data.parquet")
    assert c.partial_blocks(60) == []
