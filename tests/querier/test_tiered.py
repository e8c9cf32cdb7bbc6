"""The head + bucket querier: same answers whichever tier holds the data, overlaps deduplicated,
bucket failures as warnings or errors."""

from __future__ import annotations

import numpy as np
import pytest

from querier.engine import Engine
from querier.tiered import BucketBlocks, TieredQuerier
from store.block import write_block
from store.bucket import FilesystemBucket
from store.errors import BucketUnavailable
from store.head import Head, HeadOptions
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.writerequest import decode, encode

MIN, MAX = -(2**63), 2**63 - 1
NAMES = ["a", "b", "c"]


def _series(name: str, ts: np.ndarray) -> tuple[Labels, np.ndarray, np.ndarray]:
    # Values are a function of the name and the timestamp: any tier gives the same sample.
    return Labels.from_dict({"__name__": name, "job": "j"}), ts, ts / 1000.0 + NAMES.index(name)


def _head(ts: np.ndarray, names=NAMES) -> Head:
    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    data = [(list(lb), list(zip(t.tolist(), v.tolist()))) for lb, t, v in (_series(n, ts) for n in names)]
    assert head.append(decode(encode(data)), int(ts[-1])).appended == len(ts) * len(names)
    return head


def _block(bucket, lo: int, hi: int, names=NAMES, step: int = 15_000):
    ts = np.arange(lo, hi, step, dtype=np.int64)
    return write_block(bucket, [_series(n, ts) for n in names], min_time=lo, max_time=hi)


class _FailingBucket(FilesystemBucket):
    """Lists fine, fails every read: a bucket going away after the blocks were listed."""

    fail = False

    def get_range(self, name, offset, length):
        if self.fail:
            raise BucketUnavailable(f"bucket: get {name}: connection refused")
        return super().get_range(name, offset, length)

    def get(self, name):
        if self.fail and not name.endswith(".json"):
            raise BucketUnavailable(f"bucket: get {name}: connection refused")
        return super().get(name)


@pytest.fixture
def everything():
    """All samples of 0..3 h at 15 s, for the reference head."""
    return np.arange(0, 3 * 3600_000, 15_000, dtype=np.int64)


def _answers(q, t_end: int) -> dict:
    eng = Engine()
    out = {}
    for expr in ("a", "rate(b[5m])", "sum by (job) (c)", "count_over_time(a[1h])", 'max({job="j"})'):
        res = eng.range(q, expr, 0, t_end, 60_000)
        out[expr] = [(s.labels, s.timestamps.tolist(), s.values.tolist()) for s in res.data]
    return out


def test_same_answers_whichever_tier_holds_the_data(tmp_path, everything):
    ref = _answers(_head(everything), 3 * 3600_000)
    bucket = FilesystemBucket(tmp_path / "b")
    _block(bucket, 0, 3600_000)
    _block(bucket, 3600_000, 2 * 3600_000)
    # The head still holds the second window too (not yet truncated), plus the third.
    head = _head(everything[everything >= 3600_000])
    q = TieredQuerier(head, BucketBlocks(bucket))
    assert _answers(q, 3 * 3600_000) == ref
    assert q.warnings == []
    # Two overlapping blocks of the same window (a retried upload) count once.
    _block(bucket, 0, 3600_000)
    q = TieredQuerier(head, BucketBlocks(bucket))
    assert _answers(q, 3 * 3600_000) == ref
    sel = q.select([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX)
    ts, _ = sel[0].samples()
    assert len(ts) == len(everything) and np.all(np.diff(ts) > 0)


def test_labels_from_both_tiers(tmp_path, everything):
    bucket = FilesystemBucket(tmp_path / "b")
    _block(bucket, 0, 3600_000, names=["a"])
    head = _head(everything[everything >= 3600_000], names=["b"])
    q = TieredQuerier(head, BucketBlocks(bucket))
    assert q.label_values("__name__", [], MIN, MAX) == ["a", "b"]
    assert q.label_values("__name__", [], 2 * 3600_000, MAX) == ["b"]
    assert q.label_names([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX) == ["__name__", "job"]


def test_bucket_failure_is_a_warning_or_an_error(tmp_path, everything):
    bucket = _FailingBucket(tmp_path / "b")
    _block(bucket, 0, 3600_000)
    head = _head(everything[everything >= 3600_000])
    blocks = BucketBlocks(bucket)
    blocks.refresh()
    bucket.fail = True
    q = TieredQuerier(head, blocks)
    series = q.select([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX)
    assert series[0].samples()[0][0] == 3600_000  # what the head has
    assert len(q.warnings) == 1 and "connection refused" in q.warnings[0]
    q = TieredQuerier(head, blocks, partial_response=False)
    with pytest.raises(BucketUnavailable, match="connection refused"):
        q.select([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX)


def test_an_unlistable_bucket_leaves_the_head_answering(tmp_path, everything):
    class Unlistable(FilesystemBucket):
        def iter(self, prefix="", recursive=False):
            raise BucketUnavailable("bucket: list: timeout")

    head = _head(everything)
    q = TieredQuerier(head, BucketBlocks(Unlistable(tmp_path / "b")))
    assert len(q.select([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX)) == 1
    assert q.warnings == ["partial response: listing the bucket failed: bucket: list: timeout"]


def test_corrupt_and_incomplete_blocks_do_not_break_queries(tmp_path, everything):
    bucket = FilesystemBucket(tmp_path / "b")
    bad = _block(bucket, 0, 3600_000)
    gone = _block(bucket, 3600_000, 2 * 3600_000)
    data = tmp_path / "b" / bad.ulid / "data.parquet"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # a flipped byte inside the column data
    data.write_bytes(bytes(raw))
    (tmp_path / "b" / gone.ulid / "meta.json").unlink()  # an upload that never finished
    head = _head(everything[everything >= 2 * 3600_000])
    q = TieredQuerier(head, BucketBlocks(bucket))
    series = q.select([Matcher(MatchType.EQ, "__name__", "a")], MIN, MAX)
    ts = series[0].samples()[0]
    assert ts[0] == 2 * 3600_000  # the head's part; the corrupt block is skipped, the incomplete one unseen
    assert len(q.warnings) == 1 and bad.ulid in q.warnings[0]
    assert sorted((tmp_path / "b").iterdir())  # nothing was deleted
    assert data.exists()
