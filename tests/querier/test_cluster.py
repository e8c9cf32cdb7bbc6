"""The cluster read path: one replica per shard, fallback to the next, merged shards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from store.headrpc import STATUS_FIELDS
from querier.cluster import PersistedHeads, ShardedQuerier, ShardReplicas, ShardUnavailable, cluster_status
from querier.engine import Engine
from store.errors import InvalidMatcher, ReplicaUnavailable
from store.head import Head, HeadOptions
from store.matchers import Matcher, MatchType
from store.topology import shard_of
from store.labels import Labels
from store.writerequest import decode, encode

MIN, MAX = -(2**63), 2**63 - 1
ALL = [Matcher(MatchType.RE, "__name__", ".+")]


class Replica:
    """A head replica stand-in: a real Head that can be switched off."""

    def __init__(self, head: Head, name: str) -> None:
        self.head, self.name, self.down, self.calls = head, name, False, 0

    def _check(self):
        self.calls += 1
        if self.down:
            raise ReplicaUnavailable(f"replica {self.name}: connection refused")

    def select(self, *a):
        self._check()
        return self.head.select(*a)

    def label_names(self, *a):
        self._check()
        return self.head.label_names(*a)

    def label_values(self, *a):
        self._check()
        return self.head.label_values(*a)

    def status(self):
        self._check()
        return {"applied": 7, "lag": 0}


def _series(n: int):
    return [([("__name__", "m"), ("i", str(i))], [(1000 * t, float(i * 100 + t)) for t in range(10)]) for i in range(n)]


def _heads(n_shards: int, series):
    """Per shard, the series whose id maps to it (as the adapter routes them)."""
    parts = [[] for _ in range(n_shards)]
    for lb, pts in series:
        parts[shard_of(Labels.from_pairs(lb).hash(), n_shards)].append((lb, pts))
    heads = []
    for part in parts:
        h = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
        h.append(decode(encode(part)), 10_000)
        heads.append(h)
    return heads


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as p:
        yield p


def test_sharded_answers_equal_a_single_head_and_fall_back(pool):
    series = _series(30)
    single = _heads(1, series)[0]
    heads = _heads(3, series)
    assert all(h.num_series() for h in heads)  # every shard got some
    shards = [ShardReplicas(f"s{k}", [(f"r{j}", Replica(h, f"s{k}r{j}")) for j in range(3)]) for k, h in enumerate(heads)]
    eng = Engine()
    want = eng.range(single, "sum(m) + on() group_left count(m)", 0, 9000, 1000)
    q = ShardedQuerier(shards, pool)
    got = eng.range(q, "sum(m) + on() group_left count(m)", 0, 9000, 1000)
    assert [(s.labels, s.values.tolist()) for s in got.data] == [(s.labels, s.values.tolist()) for s in want.data]
    assert [s.labels for s in q.select(ALL, MIN, MAX)] == [s.labels for s in single.select(ALL, MIN, MAX)]
    # The first replica of shard 0 goes down: the next answers, and stays preferred.
    r0 = shards[0].replicas[0][1]
    r0.down = True
    assert q.label_values("i", [], MIN, MAX) == single.label_values("i", [], MIN, MAX)
    before = r0.calls
    q.label_names([], MIN, MAX)
    assert r0.calls == before  # in its cooldown, not asked first


def test_errors_of_the_query_itself_are_not_retried_elsewhere(pool):
    heads = _heads(1, _series(3))
    reps = [Replica(heads[0], f"r{j}") for j in range(3)]

    def bad(*_):
        for r in reps:
            r.calls += 1
        raise InvalidMatcher("bad regex")

    reps[0].select = bad
    shard = ShardReplicas("s0", [(r.name, r) for r in reps])
    with pytest.raises(InvalidMatcher):
        ShardedQuerier([shard], pool).select(ALL, MIN, MAX)
    assert reps[1].calls == reps[2].calls == 1  # only the first replica was asked


def test_a_shard_with_no_replica_fails_the_query_or_warns(pool):
    heads = _heads(2, _series(10))
    shards = [ShardReplicas(f"s{k}", [(f"r{j}", Replica(h, f"s{k}r{j}")) for j in range(2)]) for k, h in enumerate(heads)]
    for _, r in shards[1].replicas:
        r.down = True
    with pytest.raises(ShardUnavailable, match="shard s1: no replica answered"):
        ShardedQuerier(shards, pool).select(ALL, MIN, MAX)
    q = ShardedQuerier(shards, pool, partial_response=True)
    assert len(q.select(ALL, MIN, MAX)) == heads[0].num_series()
    assert q.warnings and "shard s1" in q.warnings[0]
    st = cluster_status(shards, pool)
    assert st[0]["replicas"][0] == {"applied": 7, "lag": 0, "name": "r0", "healthy": True}
    down = st[1]["replicas"][1]
    assert down["healthy"] is False and down["ready"] is False and "connection refused" in down["error"]
    # The same fields as a replica that answers (store.replica.HeadReplica.status), unknown ones null.
    assert down["name"] == down["replica"] == "r1" and down["shard"] == "s1" and set(STATUS_FIELDS) <= set(down)
    assert down["lag"] is None and down["applied_seq"] is None


# ---- the results cache's change feed for heads in other processes ---------------------------

class StatusReplica(Replica):
    """A replica whose status says its minimum valid time and readiness."""

    def __init__(self, head: Head, name: str, min_valid: int, ready: bool = True) -> None:
        super().__init__(head, name)
        self.min_valid, self.ready = min_valid, ready

    def status(self):
        self._check()
        return {"ready": self.ready, "lag": 0, "min_valid_time_ms": self.min_valid}


def _shards(*min_valids):
    """One shard per tuple of replica minimum valid times."""
    return [ShardReplicas(f"s{k}", [(f"r{i}", StatusReplica(Head(), f"r{i}", mv)) for i, mv in enumerate(mvs)])
            for k, mvs in enumerate(min_valids)]


def test_persisted_heads_keep_only_ranges_before_every_shards_watermark(pool):
    shards = _shards((5_000, 5_000, 6_000), (7_000, 9_000, 7_000))
    now = [0.0]
    feed = PersistedHeads(shards, pool, ttl_s=5.0, clock=lambda: now[0])
    assert feed.watermark() == 5_000  # the lowest of every shard's ready replicas
    token = feed.token()
    assert not feed.changed(token, [(0, 1_000), (2_000, 4_999)])
    assert feed.changed(token, [(0, 1_000), (4_000, 5_000)])  # 5000 may still be written

    # Replicas that are down or not ready do not count; a shard with none left keeps nothing.
    shards[0].replicas[0][1].down = True
    shards[0].replicas[1][1].ready = False
    now[0] += 1.0
    assert feed.watermark() == 5_000  # within the TTL: the value asked before
    now[0] += 5.0
    assert feed.watermark() == 6_000
    for _, r in shards[1].replicas:
        r.down = True
    now[0] += 5.0
    assert feed.watermark() is None and feed.changed(token, [(0, 1)])


def test_persisted_heads_before_any_watermark_keep_nothing(pool):
    feed = PersistedHeads(_shards((MIN, MIN)), pool)
    assert feed.watermark() is None and feed.changed(None, [(MIN, MIN + 1)])
    missing = [ShardReplicas("s", [("r0", Replica(Head(), "r0"))])]  # a status without the field
    assert PersistedHeads(missing, pool).watermark() is None


def test_cluster_front_caches_days_before_the_watermark_and_evaluates_the_rest(pool):
    """The querier role's front (PersistedHeads + BlockChanges): old days come from the cache,
    the days the heads still take writes for are evaluated every time, and a new block in an
    old day makes that day evaluated again."""
    from querier.frontend import AllChanges, BlockChanges, QueryFrontend

    day = 24 * 3600_000
    t0 = 20_000 * day
    series = [([("__name__", "m"), ("i", str(i))], [(t0 + k * 600_000, float(k)) for k in range(3 * 144)])
              for i in range(6)]
    heads = _heads(2, series)
    shards = [ShardReplicas(f"s{k}", [("r0", StatusReplica(h, "r0", t0 + 2 * day))]) for k, h in enumerate(heads)]
    blocks = [("A", t0, t0 + day)]
    front = QueryFrontend(Engine(), changes=AllChanges([PersistedHeads(shards, pool, ttl_s=0),
                                                        BlockChanges(lambda: list(blocks))]), split_interval_ms=day)
    calls = []

    def querier():
        calls.append(1)
        return ShardedQuerier(shards, pool)

    expr = "sum(count_over_time(m[1h]))"
    first = front.range(querier, expr, t0, t0 + 3 * day - 1, 3600_000)
    assert len(calls) == 3
    again = front.range(querier, expr, t0, t0 + 3 * day - 1, 3600_000)
    assert len(calls) == 4  # days 1 and 2 cached; day 3 (after the watermark) evaluated again
    assert [s.values.tolist() for s in again.data] == [s.values.tolist() for s in first.data]
    blocks.append(("B", t0 + 2 * 3600_000, t0 + 6 * 3600_000))  # e.g. a backfilled block early in day 1
    front.range(querier, expr, t0, t0 + 3 * day - 1, 3600_000)
    assert len(calls) == 6  # day 1 (its blocks changed) and day 3


# ---- ReplicaChanges: answers over the heads' recent days, kept by log sequence -----------------

class LogReplica(Replica):
    """A replica applying numbered log records to its head, its change tracker counting in log
    sequences (as store.replica.HeadReplica does); ``changes`` answers as its Changes call."""

    def __init__(self, name: str, floor: int = 0) -> None:
        super().__init__(Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62)), name)
        self.applied = self.head.changes.floor = floor

    def apply(self, seq: int, series) -> None:
        self.head.append(decode(encode(series)), 10_000, change_seq=seq)
        self.applied = seq

    def changes(self, ranges, timeout_s=None):
        self._check()
        t = self.head.changes
        return self.applied, max((t.last_change(a, b) for a, b in ranges), default=t.floor)


def _log_cluster():
    """One shard, two replicas, three records (seq 1-3) of series m{i=0..2} at t = 0..9 s."""
    reps = [LogReplica("r0"), LogReplica("r1")]
    for seq in (1, 2, 3):
        for r in reps:
            r.apply(seq, [([("__name__", "m"), ("i", str(seq - 1))], [(1000 * t, 1.0) for t in range(10)])])
    return reps, [ShardReplicas("s0", [(r.name, r) for r in reps])]


def _front(shards, pool, before_evaluation=lambda: None):
    """``query()``: ``sum(m)`` from 0 to 60 s in 10 s steps through a front keeping answers by
    ``ReplicaChanges``; ``calls`` counts evaluations."""
    from querier.cluster import ReplicaChanges
    from querier.frontend import QueryFrontend

    front = QueryFrontend(Engine(), changes=ReplicaChanges(shards, pool))
    calls = []

    def querier():  # made after the front took its token
        calls.append(1)
        before_evaluation()
        return ShardedQuerier(shards, pool)

    def query():
        (series,) = front.range(querier, "sum(m)", 0, 60_000, 10_000).data
        return series.values.tolist()

    return query, calls


THREE = [3.0] * 7


def test_replica_changes_keep_answers_until_a_record_writes_into_their_ranges(pool):
    reps, shards = _log_cluster()
    query, calls = _front(shards, pool)
    assert query() == THREE
    assert query() == THREE and len(calls) == 1  # from the cache
    for r in reps:  # a record far outside the range read: still cached
        r.apply(4, [([("__name__", "other")], [(10**9, 1.0)])])
    assert query() == THREE and len(calls) == 1
    for r in reps:  # a late record into the range: evaluated again
        r.apply(5, [([("__name__", "m"), ("i", "new")], [(5000, 1.0)])])
    assert query() == [3.0] + [4.0] * 6 and len(calls) == 2
    assert query() == [3.0] + [4.0] * 6 and len(calls) == 2


def test_replica_changes_do_not_keep_what_a_replica_that_came_back_behind_answered(pool):
    """r1 is down when the front takes its token, comes back having applied less than r0 (as a
    replica restarted from an older checkpoint) and answers the evaluation, r0 being down by
    then: that answer is not kept, so it is not served once r1 caught up."""
    reps, shards = _log_cluster()
    r0, r1 = reps
    behind = LogReplica("r1")
    for seq in (1, 2):
        behind.apply(seq, [([("__name__", "m"), ("i", str(seq - 1))], [(1000 * t, 1.0) for t in range(10)])])
    shards[0].replicas[1] = ("r1", behind)
    behind.down = True
    flip = [True]

    def r1_comes_back_r0_goes():
        if flip[0]:
            r0.down, behind.down = True, False

    query, calls = _front(shards, pool, r1_comes_back_r0_goes)
    assert query() == [2.0] * 7  # r1's answer, behind
    flip[0] = False
    behind.apply(3, [([("__name__", "m"), ("i", "2")], [(1000 * t, 1.0) for t in range(10)])])
    assert query() == THREE and len(calls) == 2  # evaluated again, not r1's old answer


def test_replica_changes_keep_nothing_while_a_shard_has_no_replica(pool):
    from querier.cluster import ReplicaChanges

    reps, shards = _log_cluster()
    for r in reps:
        r.down = True
    feed = ReplicaChanges(shards, pool)
    assert feed.token() is None and feed.changed(None, [(0, 1)])


def test_replica_changes_after_a_restart_count_everything_up_to_the_checkpoint_as_changed(pool):
    reps, shards = _log_cluster()
    query, calls = _front(shards, pool)
    assert query() == THREE and query() == THREE and len(calls) == 1
    # Both replicas restarted from a checkpoint at 7 (records 4-7 went elsewhere in time): they
    # cannot tell what those wrote, so the cached answer counts as changed.
    for r in reps:
        r.head.changes.floor = r.applied = 7
    assert query() == THREE and len(calls) == 2
    assert query() == THREE and len(calls) == 2  # kept again, at 7


def test_replica_changes_ask_one_replica_per_shard_and_pass_over_a_dead_one(pool):
    """A lookup asks the replica queries read first; one that is down is passed over (and then
    tried last), so answers stay cached while a shard has a replica."""
    reps, shards = _log_cluster()
    r0, r1 = reps
    query, calls = _front(shards, pool)
    assert query() == THREE and len(calls) == 1
    before = r1.calls
    assert query() == THREE and len(calls) == 1
    assert r1.calls == before  # r0 answered for the shard
    r0.down = True
    assert query() == THREE and len(calls) == 1  # r1 answers in r0's place: still cached
    r1.apply(4, [([("__name__", "m"), ("i", "late")], [(5000, 1.0)])])  # a late write, r0 still down
    assert query() == [3.0] + [4.0] * 6 and len(calls) == 2
