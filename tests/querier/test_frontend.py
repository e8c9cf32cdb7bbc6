"""The query front: split-and-merge answers equal unsplit ones, cached answers are reused until a
write lands in the range they read (and only then), identical work is done once, and the
concurrency limit queues queries up to their deadline."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from querier.api import QueryAPI
from querier.engine import Engine
from querier.errors import QueryCanceled, QueryTimeout, TooManySamples
from querier.frontend import (AllChanges, BlockChanges, HeadChanges, QueryFrontend, QueryGate, merge, splits,
                              trim)
from querier.tiered import BucketBlocks, TieredQuerier
from store.block import write_block
from store.bucket import FilesystemBucket
from store.changes import ChangeTracker
from store.head import Head, HeadOptions
from store.labels import Labels
from store.writerequest import decode, encode
from tests.querier.test_api import call

H = 3600_000
DAY = 24 * H
T0 = 20_000 * DAY  # a UTC midnight
END = T0 + 3 * DAY


def _head(rng: np.random.Generator, mint: int = T0 - H, maxt: int = END, n_hosts: int = 4) -> Head:
    """Counters with resets, gauges and a series with a gap, every 30 s (jittered)."""
    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    ts = np.arange(mint, maxt, 30_000, dtype=np.int64) + rng.integers(0, 500, (maxt - mint) // 30_000)
    data = []
    for h in range(n_hosts):
        inc = rng.integers(0, 50, len(ts)).astype(float)
        counter = np.cumsum(inc)
        for r in rng.integers(0, len(ts), 3):
            counter[r:] -= counter[r]  # resets
        gauge = np.cumsum(rng.normal(0, 1, len(ts)))
        base = {"job": "node", "instance": f"h{h}"}
        data.append(({"__name__": "reqs_total", "code": "200", **base}, ts, counter))
        data.append(({"__name__": "reqs_total", "code": "500", **base}, ts, counter / 7))
        data.append(({"__name__": "temp", **base}, ts, gauge))
        gap = (ts < T0 + DAY + 2 * H) | (ts > T0 + DAY + 9 * H)
        data.append(({"__name__": "flaky", **base}, ts[gap], gauge[gap]))
    for lb, t, v in data:
        req = encode([(sorted(lb.items()), list(zip(t.tolist(), v.tolist())))])
        assert head.append(decode(req), int(maxt)).appended == len(t)
    return head


@pytest.fixture(scope="module")
def head() -> Head:
    return _head(np.random.default_rng(7))


QUERIES = [
    "reqs_total",
    "rate(reqs_total[5m])",
    "sum by (code) (increase(reqs_total[1h]))",
    "avg_over_time(temp[30m]) > 0",
    "max_over_time(flaky[10m])",
    "absent(flaky{instance='h0'})",
    "topk(2, temp)",
    "time() - timestamp(temp)",
    "deriv(temp[1h]) * on(instance) group_left temp",
    "max_over_time(rate(reqs_total[5m])[1h:5m])",
    "temp offset 6h",
    "scalar(sum(temp))",
    "histogram_quantile(0.9, sum by (le) (rate(reqs_total[5m])))",
    "count(temp @ " + str((T0 + DAY) // 1000) + ")",
]


def _same(a, b, rtol: float = 0.0) -> None:
    assert a.result_type == b.result_type == "matrix"
    assert [s.labels for s in a.data] == [s.labels for s in b.data]
    for x, y in zip(a.data, b.data):
        np.testing.assert_array_equal(x.timestamps, y.timestamps)
        if rtol:
            np.testing.assert_allclose(x.values, y.values, rtol=rtol, atol=1e-12)
        else:
            np.testing.assert_array_equal(x.values, y.values)  # NaN equals NaN here
    assert a.warnings == b.warnings and a.infos == b.infos


def test_splits_cut_the_steps_at_interval_boundaries():
    assert splits(0, 100, 10, 1000) == [(0, 100)]
    assert splits(950, 2050, 100, 1000) == [(950, 950), (1050, 1950), (2050, 2050)]
    # A step longer than the interval: one step per split, none lost or repeated.
    assert splits(0, 5000, 2500, 1000) == [(0, 0), (2500, 2500), (5000, 5000)]
    steps = np.arange(7, 10_000, 37)
    got = [t for s, e in splits(7, 9999, 37, 1000) for t in range(s, e + 1, 37)]
    assert got == steps.tolist()


@pytest.mark.parametrize("expr", QUERIES)
@pytest.mark.parametrize("start,end,step", [
    (T0 - 1000, END - 1, 300_000),           # three days and a bit, unaligned start
    (T0 + 7 * H + 13_000, T0 + 2 * DAY + 5 * H, 60_000),
    (T0 + 5 * H, T0 + 6 * H, 15_000),         # inside one day: one split
    (T0, END, 5 * H),                         # steps longer than ... a fifth of a day
])
def test_split_and_merged_answers_equal_unsplit(head, expr, start, end, step):
    engine = Engine()
    front = QueryFrontend(engine, changes=HeadChanges(head.changes), split_interval_ms=DAY)
    # The regression of deriv() sums times and values relative to the selection's first sample
    # (querier/functions.py), so its last bits depend on where the selection starts.
    rtol = 1e-9 if "deriv" in expr else 0.0
    want = engine.range(head, expr, start, end, step)
    _same(front.range(lambda: head, expr, start, end, step), want, rtol)
    _same(front.range(lambda: head, expr, start, end, step), want, rtol)  # from the cache
    # A later refresh over a shorter range is trimmed from the cached splits.
    later = start + 7 * step
    if later <= end:
        _same(front.range(lambda: head, expr, later, end, step), engine.range(head, expr, later, end, step), rtol)


def test_at_start_and_end_are_neither_split_nor_cached(head):
    engine = Engine()
    evals = []
    front = QueryFrontend(engine, changes=HeadChanges(head.changes), split_interval_ms=DAY)
    expr = "temp @ start() - temp @ end()"
    want = engine.range(head, expr, T0, END, H)
    _same(front.range(lambda: evals.append(1) or head, expr, T0, END, H), want)
    assert len(evals) == 1
    front.range(lambda: evals.append(1) or head, expr, T0, END, H)
    assert len(evals) == 2


class Counting:
    """A querier factory that counts evaluations (each evaluated split calls it once)."""

    def __init__(self, q) -> None:
        self.q = q
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.q


def _write(head: Head, labels: dict, t: int, v: float) -> None:
    assert head.append(decode(encode([(sorted(labels.items()), [(t, v)])])), END).appended == 1


def test_a_late_write_invalidates_exactly_the_answers_that_read_its_range():
    head = _head(np.random.default_rng(1), n_hosts=2)
    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), split_interval_ms=DAY)
    f = Counting(head)
    expr = "sum by (instance) (count_over_time({job='node'}[10m]))"
    first = front.range(f, expr, T0, END - 1, 600_000)
    assert f.calls == 3
    front.range(f, expr, T0, END - 1, 600_000)
    assert f.calls == 3  # all three days from the cache

    # A new series backfilled into the middle of the second day.
    late = T0 + DAY + 12 * H
    _write(head, {"__name__": "late_series", "job": "node", "instance": "h9"}, late, 1.0)
    again = front.range(f, expr, T0, END - 1, 600_000)
    assert f.calls == 4  # only the second day was evaluated again
    assert Labels.from_dict({"instance": "h9"}) not in [s.labels for s in first.data]
    (h9,) = [s for s in again.data if s.labels == Labels.from_dict({"instance": "h9"})]
    # The sample counts in the 10-minute windows that contain it, nowhere else.
    assert h9.timestamps.min() >= late and h9.timestamps.max() < late + 600_000
    _same(again, Engine().range(head, expr, T0, END - 1, 600_000))


def test_a_write_next_to_a_cached_range_keeps_it():
    head = _head(np.random.default_rng(2), n_hosts=1)
    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), split_interval_ms=DAY)
    f = Counting(head)
    front.range(f, "temp", T0 + H, T0 + 2 * H, 60_000)
    # 5 minutes of lookback before the range: a write 10 minutes before it is not read by it.
    _write(head, {"__name__": "late", "job": "node"}, T0 + H - 600_000, 1.0)
    front.range(f, "temp", T0 + H, T0 + 2 * H, 60_000)
    assert f.calls == 1
    # Inside the lookback window it is.
    _write(head, {"__name__": "late2", "job": "node"}, T0 + H - 120_000, 1.0)
    front.range(f, "temp", T0 + H, T0 + 2 * H, 60_000)
    assert f.calls == 2


def test_a_write_during_the_evaluation_is_not_cached_over():
    head = _head(np.random.default_rng(3), n_hosts=1)
    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), split_interval_ms=DAY)

    def writing():  # a write lands between the token and the evaluation
        _write(head, {"__name__": "temp", "job": "node", "instance": "new"}, T0 + 30 * 60_000, 5.0)
        return head

    res = front.range(writing, "temp", T0, T0 + H, 60_000)
    assert any(s.labels.get("instance") == "new" for s in res.data)
    f = Counting(head)
    front.range(f, "temp", T0, T0 + H, 60_000)
    assert f.calls == 1  # evaluated again: the first answer was not kept


def test_block_changes_invalidate_the_ranges_they_cover():
    blocks = [("A", T0, T0 + DAY)]
    feed = BlockChanges(lambda: list(blocks))
    token = feed.token()
    blocks.append(("B", T0 + 2 * DAY, T0 + 3 * DAY))
    assert not feed.changed(token, [(T0, T0 + DAY - 1)])
    assert feed.changed(token, [(T0 + 2 * DAY + 5, T0 + 2 * DAY + 10)])
    token = feed.token()
    blocks.remove(("A", T0, T0 + DAY))  # retention deleted it
    assert feed.changed(token, [(T0 + 5, T0 + 10)])
    assert not feed.changed(token, [(T0 + 2 * DAY, T0 + 2 * DAY)])


def test_cached_answers_follow_blocks_through_the_tiered_querier(tmp_path):
    bucket = FilesystemBucket(str(tmp_path))
    labels = Labels.from_dict({"__name__": "m", "job": "j"})
    ts = np.arange(T0, T0 + 2 * H, 15_000, dtype=np.int64)
    write_block(bucket, [(labels, ts, ts / 1000.0)], min_time=T0, max_time=T0 + 2 * H)
    head = Head(HeadOptions())
    blocks = BucketBlocks(bucket, refresh_s=0)
    front = QueryFrontend(Engine(), changes=AllChanges([HeadChanges(head.changes), BlockChanges(blocks.live)]),
                          split_interval_ms=DAY)
    f = Counting(None)
    f.q = TieredQuerier(head, blocks)
    (s,) = front.range(f, "m", T0, T0 + 3 * H, 60_000).data
    assert s.timestamps[-1] == T0 + 2 * H + 4 * 60_000  # lookback past the block's end
    front.range(f, "m", T0, T0 + 3 * H, 60_000)
    assert f.calls == 1
    ts2 = np.arange(T0 + 2 * H, T0 + 3 * H, 15_000, dtype=np.int64)
    write_block(bucket, [(labels, ts2, ts2 / 1000.0)], min_time=T0 + 2 * H, max_time=T0 + 3 * H)
    f.q = TieredQuerier(head, blocks)
    (s,) = front.range(f, "m", T0, T0 + 3 * H, 60_000).data
    assert f.calls == 2 and s.timestamps[-1] == T0 + 3 * H


def test_answers_with_storage_warnings_are_not_cached(head):
    class Warned:
        warnings = ["partial response: reading block X failed: boom"]

        def select(self, *a):
            return head.select(*a)

    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), split_interval_ms=DAY)
    f = Counting(Warned())
    res = front.range(f, "temp", T0, T0 + H, 60_000)
    assert res.warnings == Warned.warnings
    front.range(f, "temp", T0, T0 + H, 60_000)
    assert f.calls == 2


def test_without_a_change_feed_nothing_is_cached(head):
    front = QueryFrontend(Engine(), changes=None, split_interval_ms=DAY)
    f = Counting(head)
    front.range(f, "temp", T0, T0 + 2 * DAY, H)
    front.range(f, "temp", T0, T0 + 2 * DAY, H)
    assert f.calls == 6


def test_cache_is_bounded_by_bytes_and_counts_evictions(head):
    reg = CollectorRegistry()
    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), split_interval_ms=DAY,
                          cache_bytes=40_000, registry=reg)
    for i in range(8):
        front.range(lambda: head, f"temp + {i}", T0, T0 + 6 * H, 60_000)
    assert front.cache.size_bytes <= 40_000
    assert front.cache.evictions > 0
    assert reg.get_sample_value("flashback_cache_evictions_total", {"name": "query-results"}) == front.cache.evictions
    assert reg.get_sample_value("flashback_cache_bytes", {"name": "query-results"}) == front.cache.size_bytes
    front.range(lambda: head, "temp + 7", T0, T0 + 6 * H, 60_000)
    assert reg.get_sample_value("flashback_cache_hits_total", {"name": "query-results"}) == 1
    assert reg.get_sample_value("flashback_query_frontend_splits_total", {"source": "cache"}) == 1


class Blocking:
    """A querier whose selections wait until released (an evaluation held in flight)."""

    def __init__(self, q) -> None:
        self.q = q
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self

    def select(self, *a):
        self.entered.set()
        assert self.release.wait(10)
        return self.q.select(*a)


def _wait_for_waiters(front: QueryFrontend, n: int) -> None:
    deadline = time.monotonic() + 30
    while sum(f.waiters for f in list(front._flights.values())) < n:
        assert time.monotonic() < deadline, "the followers never waited for the shared evaluation"
        time.sleep(0.005)


def test_identical_concurrent_queries_are_evaluated_once(head):
    front = QueryFrontend(Engine(), changes=None, split_interval_ms=DAY)
    b = Blocking(head)
    out = []
    threads = [threading.Thread(target=lambda: out.append(front.range(b, "rate(reqs_total[5m])", T0, T0 + H,
                                                                       60_000))) for _ in range(3)]
    threads[0].start()
    assert b.entered.wait(10)
    for t in threads[1:]:
        t.start()
    _wait_for_waiters(front, 2)
    b.release.set()
    for t in threads:
        t.join(10)
    assert len(out) == 3 and b.calls == 1
    for r in out[1:]:
        _same(r, out[0])


def test_errors_of_a_shared_evaluation_reach_every_waiter(head):
    class Failing(Blocking):
        def select(self, *a):
            self.entered.set()
            assert self.release.wait(10)
            raise RuntimeError("boom")

    front = QueryFrontend(Engine(), changes=None, split_interval_ms=DAY)
    b = Failing(head)
    errors = []

    def run():
        try:
            front.range(b, "temp", T0, T0 + H, 60_000)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    assert b.entered.wait(10)
    threads[1].start()
    _wait_for_waiters(front, 1)
    b.release.set()
    for t in threads:
        t.join(10)
    assert [str(e) for e in errors] == ["boom", "boom"]
    assert front._flights == {}


def test_a_leader_cancelled_by_its_own_client_does_not_fail_its_followers(head):
    front = QueryFrontend(Engine(), changes=None, split_interval_ms=DAY)
    b = Blocking(head)
    out, errors = [], []

    def leader():
        try:
            # Its client goes away while it evaluates (the engine checks after each selection).
            front.range(b, "temp", T0, T0 + H, 60_000, cancelled=b.release.is_set)
        except QueryCanceled as e:
            errors.append(e)

    t1 = threading.Thread(target=leader)
    t1.start()
    assert b.entered.wait(10)
    t2 = threading.Thread(target=lambda: out.append(front.range(b, "temp", T0, T0 + H, 60_000)))
    t2.start()
    _wait_for_waiters(front, 1)
    b.release.set()
    t1.join(10)
    t2.join(10)
    assert len(errors) == 1 and len(out) == 1 and b.calls == 2  # the follower evaluated it itself
    _same(out[0], Engine().range(head, "temp", T0, T0 + H, 60_000))


def test_a_follower_stops_waiting_when_its_own_client_goes_away(head):
    front = QueryFrontend(Engine(), changes=None, split_interval_ms=DAY)
    b = Blocking(head)
    t = threading.Thread(target=lambda: front.range(b, "temp", T0, T0 + H, 60_000))
    t.start()
    assert b.entered.wait(10)
    with pytest.raises(QueryCanceled, match="query was canceled in query queue"):
        front.range(b, "temp", T0, T0 + H, 60_000, cancelled=lambda: True)
    with pytest.raises(QueryTimeout, match="query timed out in query queue"):
        front.range(b, "temp", T0, T0 + H, 60_000, timeout_s=0.2)
    b.release.set()
    t.join(10)
    assert b.calls == 1


def test_the_merged_answer_is_held_to_max_samples(head):
    engine = Engine(max_samples=2000)
    front = QueryFrontend(engine, changes=HeadChanges(head.changes), split_interval_ms=DAY)
    front.range(lambda: head, "vector(1)", T0, T0 + DAY - 60_000, 60_000)  # 1440 points: fine
    with pytest.raises(TooManySamples, match="query processing would load too many samples"):
        front.range(lambda: head, "vector(1)", T0, T0 + 3 * DAY - 60_000, 60_000)  # 3 x 1440


def test_gate_queues_up_to_the_deadline_and_cache_hits_pass_it(head):
    reg = CollectorRegistry()
    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), split_interval_ms=DAY, max_concurrency=1,
                          registry=reg)
    front.range(lambda: head, "temp", T0, T0 + H, 60_000)  # cached
    b = Blocking(head)
    t = threading.Thread(target=lambda: front.range(b, "reqs_total", T0, T0 + H, 60_000))
    t.start()
    assert b.entered.wait(10)
    assert reg.get_sample_value("flashback_query_active") == 1
    with pytest.raises(QueryTimeout, match="query timed out in query queue"):
        front.range(lambda: head, "temp * 2", T0, T0 + H, 60_000, timeout_s=0.2)
    # A cached answer needs no slot.
    _same(front.range(lambda: head, "temp", T0, T0 + H, 60_000, timeout_s=0.2),
          Engine().range(head, "temp", T0, T0 + H, 60_000))
    # A queued query runs once the slot frees.
    waiter = []
    t2 = threading.Thread(target=lambda: waiter.append(front.range(lambda: head, "temp * 3", T0, T0 + H, 60_000)))
    t2.start()
    deadline = time.monotonic() + 30
    while reg.get_sample_value("flashback_query_queued") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    b.release.set()
    t.join(10)
    t2.join(10)
    assert len(waiter) == 1 and reg.get_sample_value("flashback_query_active") == 0


def test_gate_rejects_a_non_positive_limit():
    with pytest.raises(ValueError):
        QueryGate(0)


def test_align_queries_with_step_rounds_start_and_end_down(head):
    front = QueryFrontend(Engine(), changes=HeadChanges(head.changes), align_queries_with_step=True)
    res = front.range(lambda: head, "temp", T0 + 7_000, T0 + H + 59_000, 60_000)
    _same(res, Engine().range(head, "temp", T0, T0 + H, 60_000))


def test_merge_and_trim_keep_series_order_and_annotations(head):
    e = Engine()
    a = e.range(head, "rate(temp[5m])", T0, T0 + H, 60_000)
    b = e.range(head, "rate(temp[5m])", T0 + H + 60_000, T0 + 2 * H, 60_000)
    m = merge([a, b])
    _same(m, e.range(head, "rate(temp[5m])", T0, T0 + 2 * H, 60_000))
    assert m.infos  # rate() over a gauge-named metric: the info annotation survives
    _same(trim(m, T0 + H + 60_000, T0 + 2 * H), b)


def test_change_tracker_marks_buckets_and_folds_the_oldest():
    c = ChangeTracker(resolution_ms=1000, max_buckets=2000)
    assert c.last_change(0, 10**9) == 0
    c.record(5_500, 7_200)
    assert c.seq == 1
    assert c.last_change(5_000, 5_999) == 1 and c.last_change(6_000, 6_999) == 1  # the batch's span
    assert c.last_change(0, 4_999) == 0 and c.last_change(8_000, 50_000) == 0
    c.record(10_000, 90_000)
    assert c.last_change(50_000, 60_000) == 2 and c.last_change(91_000, 10**6) == 0
    c.record(3_000_000, 3_000_000)  # beyond max_buckets: the oldest fold into the first bucket
    assert c.last_change(3_000_000, 3_000_000) == 3
    assert c.last_change(0, 1_000) == 2  # folded: stands for everything before it
    assert c.last_change(3_001_000, 3_500_000) == 0


def test_change_tracker_counts_in_given_sequences_above_a_floor():
    """A head replica numbers batches by log sequence and, restarted from a checkpoint at 40,
    answers at least 40 for any range: what records up to 40 wrote is not known to it."""
    c = ChangeTracker(resolution_ms=1000)
    c.floor = 40
    assert c.last_change(0, 10**9) == 40  # nothing recorded yet: the floor
    c.record(5_000, 5_000, seq=41)
    c.record(9_000, 9_500, seq=47)  # records 42-46 appended nothing
    assert c.seq == 47
    assert c.last_change(5_000, 5_999) == 41 and c.last_change(9_000, 9_000) == 47
    assert c.last_change(6_000, 8_999) == 40 and c.last_change(-10**9, -1) == 40
    c.record(5_500, 5_500)  # without a sequence: the next
    assert c.last_change(5_000, 5_999) == 48
    with pytest.raises(ValueError, match="change sequence 48 after 48"):
        c.record(0, 0, seq=48)


@pytest.mark.parametrize("batches", [
    [(0, 2), (14, 14)],                       # a jump past the whole array: nothing old is kept
    [(100, 100), (0, 0), (5000, 5000)],       # growing down, then a jump up
    [(10**6, 10**6), (0, 10**6)],             # a batch wider than max_buckets
    [(0, 0)] + [(t, t) for t in range(1, 3000, 7)],  # minute after minute
])
def test_change_tracker_never_forgets_a_write(batches):
    """Whatever the jumps, a range a batch wrote into reports that batch or a later one."""
    c = ChangeTracker(resolution_ms=1, max_buckets=10)
    for seq, (lo, hi) in enumerate(batches, 1):
        c.record(lo, hi)
        for s, (a, b) in enumerate(batches[:seq], 1):
            assert c.last_change(a, b) >= s
        assert c.last_change(lo, hi) == seq
        assert c.last_change(hi + 10**7, hi + 2 * 10**7) == 0


def test_api_range_queries_go_through_the_front(head):
    engine = Engine()
    front = QueryFrontend(engine, changes=HeadChanges(head.changes), split_interval_ms=DAY)
    f = Counting(head)
    plain = QueryAPI(lambda: head, engine, lambda: END / 1000).router()
    fronted = QueryAPI(f, engine, lambda: END / 1000, frontend=front).router()
    params = [("query", "sum by (code) (rate(reqs_total[5m]))"), ("start", str(T0 / 1000)),
              ("end", str((T0 + 2 * DAY) / 1000)), ("step", "3600")]
    s1, want = call(plain, "/api/v1/query_range", params)
    s2, got = call(fronted, "/api/v1/query_range", params)
    s3, again = call(fronted, "/api/v1/query_range", params)
    assert s1 == s2 == s3 == 200 and got == want == again
    calls = f.calls
    # Another value of a parameter that may change answers is another cache entry.
    call(fronted, "/api/v1/query_range", params + [("max_source_resolution", "raw")])
    assert f.calls > calls
    # The front's queue limit applies to instant queries too.
    status, body = call(fronted, "/api/v1/query", [("query", "temp"), ("time", str(END / 1000))])
    assert status == 200 and len(body["data"]["result"]) == 4
