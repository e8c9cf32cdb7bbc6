"""The per-query sample budget: every source charges what it loads before decoding it, so a
runaway selection stops with Prometheus' error while other queries keep working."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from querier.engine import Engine
from querier.errors import TooManySamples
from querier.tiered import BucketBlocks, TieredQuerier
from store.block import BlockReader, write_block
from store.bucket import FilesystemBucket
from store.errors import SampleLimitExceeded
from store.head import Head, HeadOptions
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.storage import SampleBudget, SelectHints
from store.writerequest import decode, encode

MSG = "query processing would load too many samples into memory in query execution"
TS = np.arange(0, 3600_000, 15_000, dtype=np.int64)  # 240 samples per series
NAMES = [f"m{i}" for i in range(10)]
ALL = [Matcher(MatchType.RE, "__name__", "m.*")]


def _series(name: str) -> tuple[Labels, np.ndarray, np.ndarray]:
    return Labels.from_dict({"__name__": name, "job": "j"}), TS, TS / 1000.0


def _head() -> Head:
    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    data = [(list(lb), list(zip(t.tolist(), v.tolist()))) for lb, t, v in map(_series, NAMES)]
    assert head.append(decode(encode(data)), int(TS[-1])).appended == len(TS) * len(NAMES)
    return head


def test_budget_counts_and_raises_past_its_limit():
    b = SampleBudget(10)
    b.take(4)
    b.take(6)
    assert b.taken == 10
    with pytest.raises(SampleLimitExceeded, match="more than 10 samples"):
        b.take(1)


def test_head_charges_a_selection_before_decoding_it():
    head = _head()
    budget = SampleBudget(10**6)
    series = head.select(ALL, 0, 1800_000 - 1, SelectHints(0, 1800_000 - 1, budget=budget))
    assert budget.taken == 0  # nothing decoded yet
    n = sum(len(s.samples()[0]) for s in series)
    assert n == 10 * 120
    # Charged from the chunks the selection covers: at least what it returns, not the whole head.
    assert n <= budget.taken < 10 * 240

    small = SampleBudget(100)
    series = head.select(ALL, 0, 1800_000 - 1, SelectHints(0, 1800_000 - 1, budget=small))
    with pytest.raises(SampleLimitExceeded):
        series[0].samples()


def test_block_reader_charges_each_series_it_materialises(tmp_path):
    bucket = FilesystemBucket(str(tmp_path))
    meta = write_block(bucket, map(_series, NAMES), min_time=0, max_time=3600_000)
    reader = BlockReader(bucket, meta.ulid)
    budget = SampleBudget(10**6)
    series = reader.select(ALL, 600_000, 1200_000, SelectHints(600_000, 1200_000, budget=budget))
    assert budget.taken == sum(len(s.samples()[0]) for s in series) == 10 * 41
    with pytest.raises(SampleLimitExceeded):
        reader.select(ALL, 0, 3600_000, SelectHints(0, 3600_000, budget=SampleBudget(500)))


def test_tiered_querier_lets_the_limit_through_instead_of_a_partial_response(tmp_path):
    bucket = FilesystemBucket(str(tmp_path))
    write_block(bucket, map(_series, NAMES), min_time=0, max_time=3600_000)
    empty = Head(HeadOptions())
    q = TieredQuerier(empty, BucketBlocks(bucket))
    with pytest.raises(SampleLimitExceeded):
        q.select(ALL, 0, 3600_000, SelectHints(0, 3600_000, budget=SampleBudget(500)))
    assert q.warnings == []


@pytest.mark.parametrize("source", ["head", "bucket"])
def test_runaway_query_fails_with_prometheus_error_and_others_keep_working(tmp_path, source):
    if source == "head":
        head = _head()
        querier = lambda: head  # noqa: E731
    else:
        bucket = FilesystemBucket(str(tmp_path))
        write_block(bucket, map(_series, NAMES), min_time=0, max_time=3600_000)
        blocks = BucketBlocks(bucket)
        empty = Head(HeadOptions())
        querier = lambda: TieredQuerier(empty, blocks)  # noqa: E731
    engine = Engine(max_samples=1000)
    results: dict[str, object] = {}

    def run(name: str, expr: str) -> None:
        try:
            results[name] = engine.range(querier(), expr, 0, 3600_000, 60_000)
        except TooManySamples as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=("runaway", 'sum(rate({__name__=~"m.*"}[1h]))'))]
    threads += [threading.Thread(target=run, args=(f"small{i}", f"m{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["runaway"], TooManySamples) and str(results["runaway"]) == MSG
    for i in range(4):
        res = results[f"small{i}"]
        assert not isinstance(res, Exception), res
        (s,) = res.data
        assert s.labels.get("__name__") == f"m{i}" and len(s.timestamps) == 61
