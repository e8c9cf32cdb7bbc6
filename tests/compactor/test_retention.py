"""Retention: marking past retention, deleting after the delay, partial blocks, dry runs, errors.

Runs against a filesystem bucket with blocks written by ``write_block``; the
clock is passed in (``now_ms``). The CLI test runs one retention against a real
SeaweedFS (``tests/compactor/test_bucketcli.py``).
"""

from __future__ import annotations

import json
import logging
import random
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from compactor.retention import (
    RetentionMetrics, RetentionOptions, apply_retention, format_duration, rfc3339,
)
from store import ulid as ulids
from store.aggregates import downsample_raw
from store.block import write_aggregate_block, write_block
from store.bucket import Bucket, FilesystemBucket
from store.catalog import DELETION_MARK_FILE, BlockCatalog, mark_for_deletion, read_deletion_mark
from store.errors import BucketError, BucketUnavailable
from store.labels import Labels

H = 3_600_000
D = 24 * H
T0 = 1_700_006_400_000
RAW, M5, H1 = 0, 300_000, 3_600_000


def uid(ms: int, n: int = 0) -> str:
    return ulids.encode(ms.to_bytes(6, "big") + n.to_bytes(10, "big"))


def block(bucket: Bucket, mint: int, maxt: int, *, n: int = 0, resolution: int = 0, level: int = 1, sources=()):
    ts = np.arange(mint, maxt, 600_000, dtype=np.int64)
    s = [(Labels.from_dict({"__name__": "up", "job": "x"}), ts, np.ones(len(ts)))]
    if resolution:  # a downsampled block (format version 2) of the same samples
        aggs = [(ls, downsample_raw(t, v, resolution)) for ls, t, v in s]
        return write_aggregate_block(bucket, aggs, resolution=resolution, min_time=mint, max_time=maxt, level=level,
                                     sources=sources, ulid=uid(maxt, n * 16 + resolution // 300_000))
    return write_block(bucket, s, min_time=mint, max_time=maxt, level=level,
                       sources=sources, ulid=uid(maxt, n * 16 + resolution // 300_000))


def objects(bucket: Bucket) -> dict[str, bytes]:
    return {name: bucket.get(name) for name in bucket.iter("", recursive=True)}


class FlakyBucket:
    """Delegates to ``inner``; ``fail(op, name)`` returning an exception makes that call raise it."""

    def __init__(self, inner: Bucket, fail) -> None:
        self.inner, self.fail = inner, fail

    def __getattr__(self, op):
        fn = getattr(self.inner, op)

        def call(*args, **kw):
            err = self.fail(op, args[0] if args else "")
            if err is not None:
                raise err
            return fn(*args, **kw)
        return call


@pytest.fixture
def fs(tmp_path) -> FilesystemBucket:
    return FilesystemBucket(tmp_path / "bkt")


@pytest.fixture
def now_ms() -> int:
    # Real time: partial blocks are judged by their files' modification times.
    return int(time.time() * 1000)


def ulids_of(actions) -> list[str]:
    return sorted(a.ulid for a in actions)


# ---------------------------------------------------------------------------------------------
# Marking


def test_marks_exactly_the_blocks_past_retention(fs, now_ms):
    ret = 10 * D
    edge = block(fs, now_ms - ret - H, now_ms - ret)                   # maxTime == now - retention: expired
    just_inside = block(fs, now_ms - ret - H + 1, now_ms - ret + 1)    # one ms younger: kept
    old = block(fs, now_ms - 30 * D, now_ms - 29 * D)
    fresh = block(fs, now_ms - 2 * H, now_ms - H)
    r = apply_retention(fs, {RAW: ret}, 48 * 3600, now_ms)
    assert ulids_of(r.marked) == sorted([edge.ulid, old.ulid])
    assert r.deleted == () and r.ok
    for m in (edge, old):
        mark = read_deletion_mark(fs, m.ulid)
        assert mark.deletion_time == now_ms // 1000 and "past retention" in mark.details
    for m in (just_inside, fresh):
        assert read_deletion_mark(fs, m.ulid) is None
    assert ulids_of(r.pending) == sorted([edge.ulid, old.ulid])


def test_retention_per_resolution_and_resolutions_without_retention_are_kept_forever(fs, now_ms):
    raw = block(fs, now_ms - 40 * D, now_ms - 39 * D, resolution=RAW)
    five = block(fs, now_ms - 40 * D, now_ms - 39 * D, resolution=M5)
    hour = block(fs, now_ms - 400 * D, now_ms - 399 * D, resolution=H1)
    r = apply_retention(fs, {RAW: 30 * D, M5: 90 * D}, 0, now_ms)
    assert ulids_of(r.deleted) == [raw.ulid]  # delay 0: marked and deleted in one run
    assert {a.ulid: a.resolution for a in r.marked} == {raw.ulid: RAW}
    remaining = {b.ulid for b in _catalog(fs).all_blocks()}
    assert remaining == {five.ulid, hour.ulid}


def test_delete_after_the_delay(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    keep = block(fs, now_ms - D, now_ms - D + H)
    delay = 48 * 3600
    r1 = apply_retention(fs, {RAW: 30 * D}, delay, now_ms)
    assert ulids_of(r1.marked) == [old.ulid] and r1.deleted == ()
    r2 = apply_retention(fs, {RAW: 30 * D}, delay, now_ms + delay * 1000 - 1000)
    assert r2.marked == () and r2.deleted == () and ulids_of(r2.pending) == [old.ulid]
    r3 = apply_retention(fs, {RAW: 30 * D}, delay, now_ms + delay * 1000)
    assert ulids_of(r3.deleted) == [old.ulid] and r3.pending == ()
    assert not any(name.startswith(old.ulid) for name in fs.iter("", recursive=True))
    assert [b.ulid for b in _catalog(fs).all_blocks()] == [keep.ulid]
    r4 = apply_retention(fs, {RAW: 30 * D}, delay, now_ms + delay * 1000)
    assert (r4.marked, r4.deleted, r4.errors) == ((), (), ())


def test_rerun_never_moves_a_mark(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    apply_retention(fs, {RAW: 30 * D}, 3600, now_ms)
    first = read_deletion_mark(fs, old.ulid)
    r = apply_retention(fs, {RAW: 30 * D}, 3600, now_ms + 1000 * 1000)
    assert r.marked == () and read_deletion_mark(fs, old.ulid) == first


def test_delete_order_meta_first_mark_last(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    deletes: list[str] = []

    def record(op, name):
        if op == "delete":
            deletes.append(name)
        return None

    apply_retention(FlakyBucket(fs, record), {RAW: 30 * D}, 0, now_ms)
    assert deletes[0] == f"{old.ulid}/meta.json" and deletes[-1] == f"{old.ulid}/{DELETION_MARK_FILE}"
    assert len(deletes) == 4


# ---------------------------------------------------------------------------------------------
# Marked blocks that are not past retention


def test_marked_source_of_a_merged_block_is_deleted_after_the_delay(fs, now_ms):
    a = block(fs, now_ms - 3 * D, now_ms - 2 * D)
    b = block(fs, now_ms - 2 * D, now_ms - D)
    merged = block(fs, now_ms - 3 * D, now_ms - D, level=2, sources=[a.ulid, b.ulid], n=5)
    for m in (a, b):  # what the compactor does after uploading the merged block
        mark_for_deletion(fs, m.ulid, "compacted", now_ms // 1000)
    r = apply_retention(fs, {RAW: 30 * D}, 3600, now_ms + 3600 * 1000)
    assert ulids_of(r.deleted) == sorted([a.ulid, b.ulid]) and r.marked == ()
    assert all("its data is in block " + merged.ulid in a_.reason for a_ in r.deleted)
    assert [x.ulid for x in _catalog(fs).all_blocks()] == [merged.ulid]


def test_marked_block_neither_expired_nor_held_elsewhere_is_kept(fs, now_ms, caplog):
    m = block(fs, now_ms - 2 * D, now_ms - D)
    mark_for_deletion(fs, m.ulid, "by hand", 1)
    with caplog.at_level(logging.WARNING, logger="compactor.retention"):
        r = apply_retention(fs, {RAW: 30 * D}, 0, now_ms)
    assert r.deleted == () and ulids_of(r.kept) == [m.ulid] and r.ok
    assert "by hand" in r.kept[0].reason
    assert _catalog(fs).get(m.ulid) is not None
    assert any(getattr(rec, "block", None) == m.ulid for rec in caplog.records)
    # Without any retention configured, nothing is past retention.
    assert apply_retention(fs, {}, 0, now_ms).deleted == ()


# ---------------------------------------------------------------------------------------------
# Bad metadata


def test_unreadable_meta_is_never_touched(fs, now_ms):
    bad = uid(now_ms - 100 * D)
    fs.upload(f"{bad}/meta.json", b"{broken")
    fs.upload(f"{bad}/data.parquet", b"data")
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    before = fs.get(f"{bad}/data.parquet")
    r = apply_retention(fs, {RAW: D}, 0, now_ms + 10 * D, partial_age_s=1)
    assert [e.ulid for e in r.errors] == [bad] and "meta.json unreadable" in r.errors[0].message
    assert not r.ok
    assert ulids_of(r.deleted) == [old.ulid]  # the others are still handled
    assert fs.get(f"{bad}/meta.json") == b"{broken" and fs.get(f"{bad}/data.parquet") == before
    assert not fs.exists(f"{bad}/{DELETION_MARK_FILE}")


def test_corrupt_mark_on_an_expired_block_is_replaced(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    fs.upload(f"{old.ulid}/{DELETION_MARK_FILE}", b'{"id": "')
    r = apply_retention(fs, {RAW: 30 * D}, 3600, now_ms)
    assert ulids_of(r.marked) == [old.ulid] and "replaced a corrupt deletion mark" in r.marked[0].reason
    assert read_deletion_mark(fs, old.ulid).deletion_time == now_ms // 1000
    assert r.deleted == ()  # the delay runs from now


def test_corrupt_mark_on_a_live_block_is_an_error_and_left_alone(fs, now_ms):
    m = block(fs, now_ms - 2 * D, now_ms - D)
    fs.upload(f"{m.ulid}/{DELETION_MARK_FILE}", b"{")
    r = apply_retention(fs, {RAW: 30 * D}, 0, now_ms)
    assert [e.ulid for e in r.errors] == [m.ulid] and r.deleted == () and r.marked == ()
    assert fs.get(f"{m.ulid}/{DELETION_MARK_FILE}") == b"{"


def test_mark_of_unknown_version_is_an_error_and_left_alone(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    doc = json.dumps({"id": old.ulid, "version": 2, "deletion_time": 1}).encode()
    fs.upload(f"{old.ulid}/{DELETION_MARK_FILE}", doc)
    r = apply_retention(fs, {RAW: 30 * D}, 0, now_ms)
    assert [e.ulid for e in r.errors] == [old.ulid] and "version 2" in r.errors[0].message
    assert r.deleted == () and fs.get(f"{old.ulid}/{DELETION_MARK_FILE}") == doc
    assert _catalog(fs).get(old.ulid) is not None


# ---------------------------------------------------------------------------------------------
# Partial blocks


def test_partial_blocks_are_deleted_after_their_age(fs, now_ms):
    aborted = uid(now_ms - 10 * D)
    fs.upload(f"{aborted}/data.parquet", b"half an upload")
    keep = block(fs, now_ms - 2 * D, now_ms - D)
    r = apply_retention(fs, {}, 0, now_ms, partial_age_s=3600)
    assert r.partial_deleted == ()  # just written
    r = apply_retention(fs, {}, 0, now_ms + 2 * H, partial_age_s=3600)
    assert [p.ulid for p in r.partial_deleted] == [aborted]
    assert list(fs.iter()) == [f"{keep.ulid}/"]
    r = apply_retention(fs, {}, 0, now_ms + 200 * D, partial_age_s=None)
    assert r.partial_deleted == () and list(fs.iter()) == [f"{keep.ulid}/"]


def test_interrupted_deletion_is_finished(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    fail = {"on": True}

    def flaky(op, name):
        if fail["on"] and op == "delete" and name.endswith("index.parquet"):
            return BucketUnavailable("timeout")
        return None

    r = apply_retention(FlakyBucket(fs, flaky), {RAW: 30 * D}, 0, now_ms)
    assert [e.ulid for e in r.errors] == [old.ulid] and "next run continues" in r.errors[0].message
    assert not fs.exists(f"{old.ulid}/meta.json")  # already invisible
    assert fs.exists(f"{old.ulid}/{DELETION_MARK_FILE}")
    assert _catalog(fs).blocks() == []
    fail["on"] = False
    r = apply_retention(fs, {RAW: 30 * D}, 0, now_ms + 3 * D, partial_age_s=86400)
    assert [p.ulid for p in r.partial_deleted] == [old.ulid] and r.partial_deleted[0].deletion_mark is not None
    assert list(fs.iter()) == []


def test_partial_block_completing_before_deletion_is_kept(fs, now_ms):
    u = uid(now_ms - 10 * D)
    fs.upload(f"{u}/data.parquet", b"x")

    def complete_it(op, name):
        if op == "exists" and name == f"{u}/meta.json":
            fs.upload(f"{u}/meta.json", b"{}")  # the upload finishes right now
        return None

    r = apply_retention(FlakyBucket(fs, complete_it), {}, 0, now_ms + 5 * D, partial_age_s=3600)
    assert r.partial_deleted == () and fs.exists(f"{u}/data.parquet")


# ---------------------------------------------------------------------------------------------
# Dry run, failures, metrics, options


def test_dry_run_changes_nothing_and_reports_what_a_real_run_does(fs, now_ms):
    block(fs, now_ms - 40 * D, now_ms - 39 * D)
    marked_old = block(fs, now_ms - 50 * D, now_ms - 49 * D)
    block(fs, now_ms - 2 * D, now_ms - D)
    mark_for_deletion(fs, marked_old.ulid, "r", (now_ms - 5 * D) // 1000)
    aborted = uid(now_ms - 10 * D)
    fs.upload(f"{aborted}/data.parquet", b"x")
    later = now_ms + 3 * D
    before = objects(fs)
    registry = CollectorRegistry()
    dry = apply_retention(fs, {RAW: 30 * D}, 48 * 3600, later, dry_run=True, partial_age_s=3600,
                          metrics=RetentionMetrics(registry))
    assert objects(fs) == before
    assert registry.get_sample_value("flashback_retention_runs_total") == 0
    real = apply_retention(fs, {RAW: 30 * D}, 48 * 3600, later, partial_age_s=3600)
    assert dry.dry_run and not real.dry_run
    for field in ("marked", "deleted", "pending", "kept", "errors"):
        assert getattr(dry, field) == getattr(real, field), field
    assert [p.ulid for p in dry.partial_deleted] == [p.ulid for p in real.partial_deleted] == [aborted]
    assert ulids_of(dry.deleted) == [marked_old.ulid]


def test_dry_run_with_zero_delay_reports_deletion_of_what_it_would_mark(fs, now_ms):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    r = apply_retention(fs, {RAW: 30 * D}, 0, now_ms, dry_run=True)
    assert ulids_of(r.marked) == ulids_of(r.deleted) == [old.ulid]
    assert read_deletion_mark(fs, old.ulid) is None


def test_listing_failure_raises_and_changes_nothing(fs, now_ms):
    block(fs, now_ms - 40 * D, now_ms - 39 * D)
    before = objects(fs)
    registry = CollectorRegistry()
    bad = FlakyBucket(fs, lambda op, name: BucketUnavailable("no route to host") if op == "iter" else None)
    with pytest.raises(BucketUnavailable):
        apply_retention(bad, {RAW: 30 * D}, 0, now_ms, metrics=RetentionMetrics(registry))
    assert objects(fs) == before
    assert registry.get_sample_value("flashback_retention_runs_total") == 1
    assert registry.get_sample_value("flashback_retention_run_failures_total") == 1


def test_upload_failure_of_a_mark_is_reported_and_others_go_on(fs, now_ms):
    a = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    b = block(fs, now_ms - 38 * D, now_ms - 37 * D)
    bad = FlakyBucket(fs, lambda op, name: BucketError("denied")
                      if op == "upload" and name.startswith(a.ulid) else None)
    r = apply_retention(bad, {RAW: 30 * D}, 3600, now_ms)
    assert [e.ulid for e in r.errors] == [a.ulid] and "marking for deletion" in r.errors[0].message
    assert ulids_of(r.marked) == [b.ulid]


def test_metrics_and_logs(fs, now_ms, caplog):
    old = block(fs, now_ms - 40 * D, now_ms - 39 * D)
    five = block(fs, now_ms - 400 * D, now_ms - 399 * D, resolution=M5)
    block(fs, now_ms - 2 * D, now_ms - D)
    fs.upload(f"{uid(now_ms - 10 * D)}/x", b"x")
    registry = CollectorRegistry()
    metrics = RetentionMetrics(registry)
    with caplog.at_level(logging.INFO, logger="compactor.retention"):
        apply_retention(fs, {RAW: 30 * D, M5: 90 * D}, 3600, now_ms, metrics=metrics)
        apply_retention(fs, {RAW: 30 * D, M5: 90 * D}, 3600, now_ms + 2 * H, metrics=metrics, partial_age_s=60)
    v = registry.get_sample_value
    assert v("flashback_retention_blocks_marked_total", {"resolution": "0"}) == 1
    assert v("flashback_retention_blocks_marked_total", {"resolution": "300000"}) == 1
    assert v("flashback_retention_blocks_deleted_total", {"resolution": "0"}) == 1
    assert v("flashback_retention_blocks_deleted_total", {"resolution": "300000"}) == 1
    assert v("flashback_retention_partial_blocks_deleted_total") == 1
    assert v("flashback_retention_runs_total") == 2 and v("flashback_retention_run_failures_total") == 0
    assert v("flashback_retention_blocks_pending_deletion") == 0
    assert v("flashback_retention_last_success_timestamp_seconds") > 0
    marked_logs = [r for r in caplog.records if r.getMessage() == "block marked for deletion"]
    assert {r.block for r in marked_logs} == {old.ulid, five.ulid}
    assert all(hasattr(r, "mint") and hasattr(r, "maxt") and hasattr(r, "resolution") for r in marked_logs)
    assert not any(old.ulid in r.getMessage() for r in caplog.records)  # values in keys, not messages


@pytest.mark.parametrize("kwargs,match", [
    ({"retention_ms_by_resolution": {RAW: 0}}, "positive"),
    ({"retention_ms_by_resolution": {RAW: -5}}, "positive"),
    ({"retention_ms_by_resolution": {-1: 5}}, "resolution"),
    ({"retention_ms_by_resolution": {RAW: 1.5}}, "positive"),
    ({"delete_delay_s": -1}, "delay"),
    ({"partial_age_s": 0}, "partial"),
], ids=["zero-retention", "negative-retention", "negative-resolution", "float-retention", "negative-delay",
        "zero-partial-age"])
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetentionOptions(**kwargs)


def test_apply_retention_validates_before_touching_the_bucket(fs, now_ms):
    block(fs, now_ms - 40 * D, now_ms - 39 * D)
    before = objects(fs)
    with pytest.raises(ValueError):
        apply_retention(fs, {RAW: 0}, 0, now_ms)
    assert objects(fs) == before


def test_never_deletes_a_block_before_retention_and_delay(tmp_path, now_ms):
    """Random buckets and clocks: every deleted block was past retention (or held by a live
    block) and marked at least the delay before."""
    rng = random.Random(7)
    for trial in range(5):
        fs = FilesystemBucket(tmp_path / f"b{trial}")
        metas = {}
        for i in range(12):
            start = now_ms - rng.randrange(0, 60) * D
            m = block(fs, start, start + rng.choice([2 * H, D]), n=i, resolution=rng.choice([RAW, M5, H1]))
            metas[m.ulid] = m
        retention = {RAW: rng.choice([10, 20, 30]) * D, M5: rng.choice([25, 45]) * D}
        delay_s = rng.choice([0, 3600, 2 * 86400])
        clock = now_ms
        marked_at: dict[str, int] = {}
        for _ in range(6):
            r = apply_retention(fs, retention, delay_s, clock)
            assert r.ok
            for a in r.marked:
                marked_at[a.ulid] = clock // 1000
            for a in r.deleted:
                m = metas[a.ulid]
                assert m.resolution in retention and m.max_time <= clock - retention[m.resolution]
                assert marked_at[a.ulid] * 1000 + delay_s * 1000 <= clock
            clock += rng.choice([H, D, 3 * D])
        live = {b.ulid for b in _catalog(fs).all_blocks()}
        for u, m in metas.items():
            if m.resolution not in retention or m.max_time > clock - retention[m.resolution]:
                assert u in live


def test_formatting_helpers():
    assert rfc3339(T0) == "2023-11-15T00:00:00Z"
    assert rfc3339(T0 + 5) == "2023-11-15T00:00:00.005Z"
    assert rfc3339(-(1 << 63)).endswith("Z") and rfc3339((1 << 63) - 1).endswith("Z")  # any int64 formats
    assert [format_duration(x) for x in (0, 1500, 28 * H, 30 * D, 365 * D, 90 * D + 90_000, -H)] == [
        "0s", "1s500ms", "1d4h", "30d", "1y", "90d1m30s", "-1h"]


def _catalog(bucket: Bucket) -> BlockCatalog:
    c = BlockCatalog(bucket)
    c.refresh()
    return c

