"""Block caches shared by the readers of a bucket: the index, footer and decoded column chunks are
read once, answers are the same with and without them, and every cache stays within its bytes."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from store.block import BlockCaches, BlockReader, write_block
from store.bucket import FilesystemBucket
from store.cache import CacheMetrics
from store.labels import Labels
from store.matchers import Matcher, MatchType

ALL = [Matcher(MatchType.RE, "__name__", ".+")]


class CountingBucket(FilesystemBucket):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, name):
        self.reads.append(name)
        return super().get(name)

    def get_range(self, name, offset, length):
        self.reads.append(name)
        return super().get_range(name, offset, length)


def _block(bucket, n_series: int = 50, rows_per_group: int = 2_000):
    ts = np.arange(0, 3600_000, 15_000, dtype=np.int64)
    series = [(Labels.from_dict({"__name__": f"m{i:03d}", "job": "j"}), ts, ts / 1000.0 + i) for i in range(n_series)]
    return write_block(bucket, series, min_time=0, max_time=3600_000, rows_per_group=rows_per_group)


def _samples(series):
    return [(s.labels, s.samples()[0].tolist(), s.samples()[1].tolist()) for s in series]


def test_cached_reads_go_to_the_bucket_once_and_answer_the_same(tmp_path):
    bucket = CountingBucket(str(tmp_path))
    meta = _block(bucket)
    reg = CollectorRegistry()
    caches = BlockCaches(metrics=CacheMetrics(reg))
    plain = BlockReader(bucket, meta.ulid, meta=meta)
    want = _samples(plain.select(ALL, 600_000, 1800_000))

    reader = BlockReader(bucket, meta.ulid, meta=meta, caches=caches)
    bucket.reads.clear()
    assert _samples(reader.select(ALL, 600_000, 1800_000)) == want
    assert bucket.reads  # index, footer and data were read
    bucket.reads.clear()
    # Another reader of the same block (e.g. after a refresh) shares the caches.
    again = BlockReader(bucket, meta.ulid, meta=meta, caches=caches)
    assert _samples(again.select(ALL, 600_000, 1800_000)) == want
    assert bucket.reads == []
    # A narrower selection needs a subset of the cached row groups.
    one = [Matcher(MatchType.EQ, "__name__", "m007")]
    want_one = _samples(plain.select(one, 900_000, 1000_000))
    bucket.reads.clear()
    assert _samples(again.select(one, 900_000, 1000_000)) == want_one
    assert bucket.reads == []
    assert reg.get_sample_value("flashback_cache_hits_total", {"name": "block-chunks"}) > 0
    assert reg.get_sample_value("flashback_cache_hits_total", {"name": "block-index"}) >= 2


def test_caches_stay_within_their_bytes_and_count_evictions(tmp_path):
    bucket = CountingBucket(str(tmp_path))
    meta = _block(bucket, n_series=100, rows_per_group=1_000)
    reg = CollectorRegistry()
    caches = BlockCaches(index_bytes=10**6, chunks_bytes=40_000, metrics=CacheMetrics(reg))
    reader = BlockReader(bucket, meta.ulid, meta=meta, caches=caches)
    plain = BlockReader(bucket, meta.ulid, meta=meta)
    for i in range(0, 100, 10):
        m = [Matcher(MatchType.RE, "__name__", f"m{i:02d}.")]
        assert _samples(reader.select(m, 0, 3600_000)) == _samples(plain.select(m, 0, 3600_000))
    assert caches.chunks.size_bytes <= 40_000
    assert caches.chunks.evictions > 0
    assert reg.get_sample_value("flashback_cache_evictions_total", {"name": "block-chunks"}) == caches.chunks.evictions
    assert reg.get_sample_value("flashback_cache_bytes", {"name": "block-chunks"}) == caches.chunks.size_bytes


def test_an_index_larger_than_its_cache_stays_with_its_reader(tmp_path):
    bucket = CountingBucket(str(tmp_path))
    meta = _block(bucket)
    caches = BlockCaches(index_bytes=100, chunks_bytes=0)
    reader = BlockReader(bucket, meta.ulid, meta=meta, caches=caches)
    want = _samples(reader.select(ALL, 0, 3600_000))
    bucket.reads.clear()
    assert _samples(reader.select(ALL, 0, 3600_000)) == want
    assert not any(r.endswith("index.parquet") for r in bucket.reads)  # not read again
    assert len(caches.index) == 0 and caches.index.size_bytes == 0  # and not in the cache


def test_catalog_keeps_meta_json_in_a_bounded_cache(tmp_path):
    from store.catalog import BlockCatalog

    bucket = CountingBucket(str(tmp_path))
    metas = [_block(bucket, n_series=2) for _ in range(3)]
    reg = CollectorRegistry()
    caches = BlockCaches(metrics=CacheMetrics(reg))
    catalog = BlockCatalog(bucket, meta_cache=caches.meta, concurrency=1)
    catalog.refresh()
    assert {b.ulid for b in catalog.blocks(resolution=0)} == {m.ulid for m in metas}
    bucket.reads.clear()
    catalog.refresh()
    assert not any(r.endswith("meta.json") for r in bucket.reads)  # listed, not read again
    assert reg.get_sample_value("flashback_cache_hits_total", {"name": "block-meta"}) == 3
    # Too small for one meta.json: nothing kept, every refresh reads them again, answers unchanged.
    small = BlockCatalog(bucket, meta_cache=BlockCaches(meta_bytes=10).meta, concurrency=1)
    bucket.reads.clear()
    small.refresh()
    first = sum(r.endswith("meta.json") for r in bucket.reads)
    bucket.reads.clear()
    small.refresh()
    assert first >= 3 and sum(r.endswith("meta.json") for r in bucket.reads) == first
    assert {b.ulid for b in small.blocks(resolution=0)} == {m.ulid for m in metas}
