"""The query front: range queries split by day, results cached per split and kept exactly as long
as the data under them is unchanged, identical concurrent work done once, and a limit on how many
queries evaluate at once.

Splitting
---------
A range query's steps ``start, start + step, ... <= end`` are cut at multiples of
``split_interval_ms`` since the epoch (UTC days by default): each split is the run of steps inside
one interval, evaluated as a range query of its own, and the splits' series are concatenated.
Every step of a range query is evaluated independently of the others, so the merged answer equals
the unsplit one. Queries using ``@ start()`` or ``@ end()`` depend on the whole query's range and
are neither split nor cached.

Caching
-------
A split's answer is cached under its query, step, the steps' phase (``start mod step``), the
lookback delta, the interval's number and whatever else the caller says changes answers (e.g. the
resolution chosen for downsampled data), together with the steps it covers: a later query whose
steps of that interval lie inside them is answered by trimming (a dashboard refreshed a minute
later shares all complete days and most of the first one). Grafana aligns ``start`` to the step,
so consecutive refreshes have the same phase; ``align_queries_with_step`` rounds start and end
down to a multiple of the step for clients that do not.

No freshness window is guessed. While a split is evaluated, the time ranges its selections read
are recorded; the answer is kept together with a ``ChangeFeed`` token taken before the evaluation
and is used again only while the feed reports no change in those ranges since then. For the head,
a ``store.changes.ChangeTracker`` marks where each append wrote, so a late write into a cached
range invalidates exactly the answers that read it; for the bucket, the set of blocks overlapping
those ranges must be unchanged (a new, compacted or deleted block invalidates them). Answers with
storage warnings (a partial response) are not cached. Without a change feed nothing is cached;
splitting and deduplication still apply. A querier of a cluster, whose heads live in other
processes, uses ``querier.cluster.ReplicaChanges``: the replicas' change trackers count in log
sequences, the same on every replica of a shard.

Identical work at once
----------------------
A split that another request is already evaluating (same cache key and steps) is waited for and
shared, not evaluated twice.

Concurrency
-----------
``QueryGate`` lets at most ``max_concurrency`` evaluations run at once (cache hits do not count);
the others wait in line until a slot frees or their deadline passes (``QueryTimeout``: "query timed
out in query queue", as Prometheus' engine says).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import Callable, Hashable, Iterator, Protocol, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from querier.engine import TOO_MANY_SAMPLES, Engine
from querier.errors import QueryCanceled, QueryTimeout, TooManySamples
from querier.values import RangeSeries, Result
from store.cache import Cache, CacheMetrics
from store.labels import Labels
from store.matchers import Matcher
from store.storage import Querier, SelectHints, Series

DAY_MS = 86_400_000
_AT_START_END = re.compile(r"@\s*(start|end)\s*\(\s*\)")


class ChangeFeed(Protocol):
    """Tells whether the data of some time ranges changed since a token was taken. Thread-safe."""

    def token(self) -> object:
        """A token describing the data now; taken before an evaluation."""

    def changed(self, token: object, ranges: Sequence[tuple[int, int]]) -> bool:
        """Whether any of ``ranges`` (``[mint, maxt]`` ms) may have changed since ``token``."""


class HeadChanges:
    """``ChangeFeed`` of a head: its ``ChangeTracker``'s write sequence."""

    def __init__(self, tracker) -> None:
        self._tracker = tracker

    def token(self) -> int:
        return self._tracker.seq

    def changed(self, token: object, ranges: Sequence[tuple[int, int]]) -> bool:
        return any(self._tracker.last_change(a, b) > token for a, b in ranges)


class BlockChanges:
    """``ChangeFeed`` of a bucket's blocks: the blocks overlapping a range must stay the same.

    ``blocks`` returns the (ULID, mint, maxt) of the live blocks, ``maxt`` exclusive."""

    def __init__(self, blocks: Callable[[], Sequence[tuple[str, int, int]]]) -> None:
        self._blocks = blocks

    def token(self) -> frozenset[tuple[str, int, int]]:
        return frozenset(self._blocks())

    def changed(self, token: object, ranges: Sequence[tuple[int, int]]) -> bool:
        def overlapping(blocks) -> set[str]:
            return {u for u, lo, hi in blocks if any(lo <= b and hi > a for a, b in ranges)}
        return overlapping(token) != overlapping(self._blocks())  # type: ignore[arg-type]


class AllChanges:
    """Several feeds as one: changed when any of them changed."""

    def __init__(self, feeds: Sequence[ChangeFeed]) -> None:
        self._feeds = list(feeds)

    def token(self) -> tuple:
        return tuple(f.token() for f in self._feeds)

    def changed(self, token: object, ranges: Sequence[tuple[int, int]]) -> bool:
        return any(f.changed(t, ranges) for f, t in zip(self._feeds, token))  # type: ignore[arg-type]


class QueryGate:
    """At most ``max_concurrency`` evaluations at once; the others queue until their deadline."""

    def __init__(self, max_concurrency: int, registry: CollectorRegistry | None = None) -> None:
        if max_concurrency <= 0:
            raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self._sem = threading.BoundedSemaphore(max_concurrency)
        self._m_active = self._m_queued = None
        if registry is not None:
            self._m_active = Gauge("flashback_query_active", "Queries evaluating now.", registry=registry)
            self._m_queued = Gauge("flashback_query_queued", "Queries waiting for an evaluation slot.",
                                   registry=registry)
            Gauge("flashback_query_max_concurrency", "Most queries evaluating at once.",
                  registry=registry).set(max_concurrency)

    def acquire(self, deadline: float) -> float:
        """Waits for a slot until ``deadline`` (``time.monotonic``); returns the seconds waited."""
        began = time.monotonic()
        if self._m_queued is not None:
            self._m_queued.inc()
        try:
            ok = self._sem.acquire(timeout=max(0.0, deadline - began))
        finally:
            if self._m_queued is not None:
                self._m_queued.dec()
        if not ok:
            raise QueryTimeout("query timed out in query queue")
        if self._m_active is not None:
            self._m_active.inc()
        return time.monotonic() - began

    def release(self) -> None:
        if self._m_active is not None:
            self._m_active.dec()
        self._sem.release()


class _RecordingQuerier:
    """Passes a querier through and records the time range of every selection."""

    def __init__(self, inner: Querier) -> None:
        self._inner = inner
        self.ranges: list[tuple[int, int]] = []

    @property
    def warnings(self) -> list[str]:
        return list(getattr(self._inner, "warnings", ()))

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[Series]:
        self.ranges.append((mint, maxt))
        return self._inner.select(matchers, mint, maxt, hints)

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        return self._inner.label_names(matchers, mint, maxt)

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        return self._inner.label_values(name, matchers, mint, maxt)


@dataclasses.dataclass(frozen=True, slots=True)
class _Extent:
    """A cached answer of one split: the steps ``[start, end]`` it covers and what it read."""

    start: int
    end: int
    result: Result
    token: object
    ranges: tuple[tuple[int, int], ...]
    nbytes: int


def _result_bytes(r: Result) -> int:
    n = 200
    for s in r.data:  # type: ignore[union-attr]
        n += s.timestamps.nbytes + s.values.nbytes + 100 + sum(len(k) + len(v) + 16 for k, v in s.labels)
    return n


def trim(result: Result, start: int, end: int) -> Result:
    """The answer restricted to the steps in ``[start, end]``."""
    out = []
    for s in result.data:  # type: ignore[union-attr]
        ts = s.timestamps
        i, j = np.searchsorted(ts, start, "left"), np.searchsorted(ts, end, "right")
        if i < j:
            out.append(s if i == 0 and j == len(ts) else RangeSeries(s.labels, ts[i:j], s.values[i:j]))
    return dataclasses.replace(result, data=out, warnings=list(result.warnings), infos=list(result.infos))


def merge(parts: Sequence[Result]) -> Result:
    """Consecutive splits' answers as one matrix, series sorted by labels."""
    if len(parts) == 1:
        return parts[0]
    by: dict[Labels, list[RangeSeries]] = {}
    warnings: list[str] = []
    infos: list[str] = []
    for r in parts:
        for s in r.data:  # type: ignore[union-attr]
            by.setdefault(s.labels, []).append(s)
        warnings += [w for w in r.warnings if w not in warnings]
        infos += [i for i in r.infos if i not in infos]
    data = []
    for lbls in sorted(by):
        pieces = by[lbls]
        if len(pieces) == 1:
            data.append(pieces[0])
        else:
            data.append(RangeSeries(lbls, np.concatenate([p.timestamps for p in pieces]),
                                    np.concatenate([p.values for p in pieces])))
    return Result("matrix", data, warnings, infos, sum(r.samples for r in parts),
                  max(r.peak_samples for r in parts))


def splits(start: int, end: int, step: int, interval: int) -> list[tuple[int, int]]:
    """The steps of ``[start, end]`` cut at multiples of ``interval``: (first, last) step per split."""
    out = []
    t = start
    while t <= end:
        boundary = (t // interval + 1) * interval
        last = min(end, t + (boundary - 1 - t) // step * step)
        out.append((t, last))
        t = last + step
    return out


class _Flight:
    __slots__ = ("done", "result", "error", "waiters")

    def __init__(self) -> None:
        self.waiters = 0  # requests waiting for this evaluation besides its own
        self.done = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None


class QueryFrontend:
    """Splits, caches and deduplicates range queries in front of an ``Engine`` (see module doc).

    Args:
        engine: evaluates each split.
        changes: what tells cached answers from stale ones; None disables the results cache.
        split_interval_ms: splits are cut at multiples of this (0: no splitting).
        cache_bytes: most bytes of cached answers.
        max_concurrency: most evaluations at once (a ``QueryGate``); 0 for no limit.
        align_queries_with_step: round start and end down to a multiple of the step.
    """

    def __init__(self, engine: Engine, *, changes: ChangeFeed | None = None, split_interval_ms: int = DAY_MS,
                 cache_bytes: int = 256 << 20, max_concurrency: int = 20, align_queries_with_step: bool = False,
                 registry: CollectorRegistry | None = None, cache_metrics: CacheMetrics | None = None) -> None:
        self.engine = engine
        self._changes = changes
        self._interval = split_interval_ms
        self._align = align_queries_with_step
        self.gate = QueryGate(max_concurrency, registry) if max_concurrency > 0 else None
        if cache_metrics is None and registry is not None:
            cache_metrics = CacheMetrics(registry)
        self.cache: Cache[list[_Extent]] = Cache("query-results", cache_bytes if changes is not None else 0,
                                                 lambda xs: sum(x.nbytes for x in xs), cache_metrics)
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}
        self._m_splits = self._m_queue = None
        if registry is not None:
            self._m_splits = Counter("flashback_query_frontend_splits_total",
                                     "Splits of range queries, by where their answer came from.", ["source"],
                                     registry=registry)
            self._m_queue = Histogram("flashback_query_queue_seconds", "Time queries waited for a slot.",
                                      buckets=(0.001, 0.01, 0.1, 1, 10, 60), registry=registry)

    def range(self, querier: Callable[[], Querier], expr: str, start: int, end: int, step: int, *,
              timeout_s: float | None = None, lookback_delta_ms: int | None = None,
              cancelled: Callable[[], bool] | None = None, key: Hashable = ()) -> Result:
        """The range query's answer. ``querier`` is called once per evaluated split; ``key`` is
        whatever else makes answers differ (e.g. the data resolution)."""
        if self._align:
            start, end = start // step * step, end // step * step
        timeout = self.engine.timeout_s if timeout_s is None else min(timeout_s, self.engine.timeout_s)
        deadline = time.monotonic() + timeout
        lookback = lookback_delta_ms or self.engine.lookback_delta_ms
        if self._interval <= 0 or _AT_START_END.search(expr):
            return self._evaluate(querier, expr, start, end, step, deadline, lookback, cancelled)[0]
        base = (expr, step, start % step, lookback, key)
        parts = []
        for s, e in splits(start, end, step, self._interval):
            if cancelled is not None and cancelled():
                raise QueryCanceled("query was canceled in query queue")
            parts.append(self._split(base + (s // self._interval,), querier, expr, s, e, step, deadline, lookback,
                                     cancelled))
        result = merge(parts)
        # Each split kept within max_samples; the answer they make up together must too.
        if sum(len(s.timestamps) for s in result.data) > self.engine.max_samples:  # type: ignore[union-attr]
            raise TooManySamples(TOO_MANY_SAMPLES)
        return result

    def _split(self, key: tuple, querier, expr: str, start: int, end: int, step: int, deadline: float,
               lookback: int, cancelled) -> Result:
        flight_key = (key, start, end)
        while True:
            hit = self._lookup(key, start, end)
            if hit is not None:
                self._count("cache")
                return hit
            with self._lock:
                flight = self._flights.get(flight_key)
                leader = flight is None
                if leader:
                    flight = self._flights[flight_key] = _Flight()
                else:
                    flight.waiters += 1
            if leader:
                break
            self._follow(flight, deadline, cancelled)
            if isinstance(flight.error, (QueryCanceled, QueryTimeout)):
                continue  # the leader's own client went away or its deadline passed, not ours: try again
            if flight.error is not None:
                raise flight.error
            self._count("shared")
            return flight.result  # type: ignore[return-value]
        try:
            token = self._changes.token() if self._changes is not None else None
            result, rec = self._evaluate(querier, expr, start, end, step, deadline, lookback, cancelled)
            self._count("evaluated")
            if self._changes is not None and not rec.warnings and rec.ranges:
                ranges = tuple(_coalesce(rec.ranges))
                if not self._changes.changed(token, ranges):  # nothing written while it ran
                    self._store(key, _Extent(start, end, result, token, ranges, _result_bytes(result)))
            flight.result = result
            return result
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[flight_key]
            flight.done.set()

    @staticmethod
    def _follow(flight: _Flight, deadline: float, cancelled: Callable[[], bool] | None) -> None:
        """Waits for another request's evaluation, until this request's deadline or cancellation."""
        while not flight.done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise QueryTimeout("query timed out in query queue")
            if cancelled is not None and cancelled():
                raise QueryCanceled("query was canceled in query queue")

    def _evaluate(self, querier, expr, start, end, step, deadline, lookback, cancelled
                  ) -> tuple[Result, _RecordingQuerier]:
        if self.gate is not None:
            waited = self.gate.acquire(deadline)
            if self._m_queue is not None:
                self._m_queue.observe(waited)
        try:
            rec = _RecordingQuerier(querier())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueryTimeout("query timed out in query queue")
            result = self.engine.range(rec, expr, start, end, step, timeout_s=remaining,
                                       lookback_delta_ms=lookback, cancelled=cancelled)
        finally:
            if self.gate is not None:
                self.gate.release()
        storage = [w for w in rec.warnings if w not in result.warnings]
        if storage:
            result = dataclasses.replace(result, warnings=result.warnings + storage)
        return result, rec

    def _lookup(self, key: tuple, start: int, end: int) -> Result | None:
        extents = self.cache.get(key)
        if not extents:
            return None
        for x in extents:
            if x.start <= start and x.end >= end:
                if self._changes is not None and self._changes.changed(x.token, x.ranges):
                    self._drop(key, x)
                    return None
                return trim(x.result, start, end)
        return None

    def _store(self, key: tuple, extent: _Extent) -> None:
        with self._lock:
            old = self.cache.peek(key) or []
            kept = [x for x in old if not (extent.start <= x.start and x.end <= extent.end)]
            self.cache.put(key, kept + [extent])

    def _drop(self, key: tuple, extent: _Extent) -> None:
        with self._lock:
            old = self.cache.peek(key) or []
            kept = [x for x in old if x is not extent]
            if kept:
                self.cache.put(key, kept)
            else:
                self.cache.pop(key)

    def _count(self, source: str) -> None:
        if self._m_splits is not None:
            self._m_splits.labels(source).inc()


def _coalesce(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Overlapping or touching ranges merged, in order."""
    cur = None
    for a, b in sorted(ranges):
        if cur is not None and a <= cur[1] + 1:
            cur = (cur[0], max(cur[1], b))
        else:
            if cur is not None:
                yield cur
            cur = (a, b)
    if cur is not None:
        yield cur
