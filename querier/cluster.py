"""Cluster mode's read path: one healthy head replica per shard, merged into one ``Querier``.

Every shard's replicas hold the same data (they apply the same log in order), so a query reads
each shard from one replica: the last one that answered, else the next in the topology's
order. A replica that fails (unreachable, timeout, not ready) is skipped for ``cooldown_s`` and
the query goes to the shard's next replica. Only when every replica of a shard fails does the
query fail (``ShardUnavailable``) -- or, with ``partial_response``, answer from the other
shards with a warning. Shards are read concurrently; their series are disjoint, but a series
seen in two shards (a topology change) is merged like the tiers are.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

from querier.tiered import merge_selections
from store.errors import ReplicaError, StorageError
from store.headrpc import STATUS_FIELDS
from store.matchers import Matcher
from store.storage import Querier, SelectHints, Series

log = logging.getLogger(__name__)


class ShardUnavailable(StorageError):
    """No replica of a shard could answer; retrying later may help."""


class ReplicaClient(Querier, Protocol):
    """A head replica as the querier sees it (``store.headrpc.RemoteHead``)."""

    def status(self) -> dict: ...

    def changes(self, ranges: Sequence[tuple[int, int]], timeout_s: float | None = None) -> tuple[int, int]: ...


class ShardReplicas:
    """The replicas of one shard, with the memory of which answered last and which failed."""

    def __init__(self, name: str, replicas: Sequence[tuple[str, ReplicaClient]], cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not replicas:
            raise ValueError(f"shard {name}: no replicas")
        self.name = name
        self.replicas = list(replicas)
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._preferred = 0
        self._failed_until: dict[int, float] = {}
        self._serial = 0  # numbers the calls made to replicas
        self._served: dict[str, int] = {}  # replica -> serial of the latest call it answered

    def _order(self) -> list[int]:
        now = self._clock()
        with self._lock:
            start = self._preferred
            failed = {i for i, t in self._failed_until.items() if t > now}
        order = [(start + k) % len(self.replicas) for k in range(len(self.replicas))]
        # Replicas in their cooldown go last, not away: when all failed recently, still try them.
        return [i for i in order if i not in failed] + [i for i in order if i in failed]

    def call(self, fn: Callable[[ReplicaClient], object]) -> object:
        """``fn`` on one replica, falling back to the others in turn."""
        return self.call_named(fn)[1]

    def call_named(self, fn: Callable[[ReplicaClient], object], *, serves: bool = True) -> tuple[str, object]:
        """``(replica name, fn's result)`` of the replica that answered, as ``call``. ``serves``
        False: the call reads no data (``served_since`` does not count it)."""
        errors = []
        for i in self._order():
            name, client = self.replicas[i]
            with self._lock:
                self._serial += 1
                serial = self._serial
            try:
                out = fn(client)
            except ReplicaError as e:  # not e.g. InvalidMatcher: another replica would say the same
                errors.append(f"{name}: {e}")
                log.warning("replica failed, trying the next", extra={"shard": self.name, "replica": name,
                                                                      "err": str(e)})
                with self._lock:
                    self._failed_until[i] = self._clock() + self._cooldown_s
                continue
            with self._lock:
                self._preferred = i
                self._failed_until.pop(i, None)
                if serves:
                    self._served[name] = max(self._served.get(name, 0), serial)
            return name, out
        raise ShardUnavailable(f"shard {self.name}: no replica answered ({'; '.join(errors)})")

    @property
    def serial(self) -> int:
        """The number of the latest call made (``served_since`` counts calls after it)."""
        with self._lock:
            return self._serial

    def served_since(self, serial: int) -> set[str]:
        """Replicas that answered a call made after call number ``serial``."""
        with self._lock:
            return {name for name, s in self._served.items() if s > serial}


class ShardedQuerier:
    """All shards of a cluster as one ``Querier`` for one request; collects ``warnings``."""

    def __init__(self, shards: Sequence[ShardReplicas], pool: ThreadPoolExecutor, *,
                 partial_response: bool = False) -> None:
        self._shards = list(shards)
        self._pool = pool
        self.partial_response = partial_response
        self.warnings: list[str] = []

    def _all(self, fn: Callable[[ReplicaClient], list]) -> list[list]:
        futures = [self._pool.submit(s.call, fn) for s in self._shards]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except ShardUnavailable as e:
                if not self.partial_response:
                    raise
                self.warnings.append(f"partial response: {e}")
        return out

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[Series]:
        results = self._all(lambda c: c.select(matchers, mint, maxt, hints))
        return merge_selections(results)

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        return sorted({n for res in self._all(lambda c: c.label_names(matchers, mint, maxt)) for n in res})

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        return sorted({v for res in self._all(lambda c: c.label_values(name, matchers, mint, maxt)) for v in res})


def cluster_status(shards: Sequence[ShardReplicas], pool: ThreadPoolExecutor) -> list[dict]:
    """Every shard's replicas with their health and replication lag (``/api/v1/status/cluster``)."""

    def one(shard: str, name: str, client: ReplicaClient) -> dict:
        try:
            st = dict(client.status())
            st.update(name=name, healthy=True)
            return st
        except StorageError as e:
            return {**dict.fromkeys(STATUS_FIELDS), "shard": shard, "replica": name, "name": name, "ready": False,
                    "healthy": False, "error": str(e)}

    futures = [[pool.submit(one, s.name, n, c) for n, c in s.replicas] for s in shards]
    return [{"shard": s.name, "replicas": [f.result() for f in fs]} for s, fs in zip(shards, futures)]


INT64_MIN = -(2**63)


class PersistedHeads:
    """``ChangeFeed`` (querier/frontend.py) of head replicas in other processes: a range is
    unchanged only while it lies wholly before every shard's *minimum valid time*.

    A replica refuses samples older than its minimum valid time (the compactor's newest persisted
    watermark, applied at the same log record on every replica), so data before it can only
    change in the bucket, which ``BlockChanges`` watches. Everything newer counts as changed
    (``ReplicaChanges`` asks the replicas about those ranges). The watermark is the lowest over
    every shard's ready replicas (the replicas queries are read from); it is asked at most every
    ``ttl_s``, and a stale watermark is only lower, which keeps fewer answers, never a wrong one.
    ``None`` (a shard with no ready replica answering) keeps nothing.
    """

    def __init__(self, shards: Sequence[ShardReplicas], pool: ThreadPoolExecutor, ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._shards = list(shards)
        self._pool = pool
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, int | None] | None = None

    def token(self) -> None:
        return None

    def changed(self, token: object, ranges: Sequence[tuple[int, int]]) -> bool:
        watermark = self.watermark()
        return watermark is None or any(hi >= watermark for _, hi in ranges)

    def watermark(self) -> int | None:
        """The lowest minimum valid time (ms) of the shards' ready replicas, None if unknown."""
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._ttl_s:
                return self._cached[1]
        lowest: int | None = None
        for shard in cluster_status(self._shards, self._pool):
            ready = [r.get("min_valid_time_ms") for r in shard["replicas"] if r.get("healthy") and r.get("ready")]
            if not ready or not all(isinstance(t, int) for t in ready):
                lowest = None  # unknown for this shard: nothing may be kept
                break
            lowest = min(ready) if lowest is None else min(lowest, min(ready))
        if lowest is not None and lowest == INT64_MIN:
            lowest = None
        with self._lock:
            self._cached = (now, lowest)
        return lowest


class ReplicaChanges:
    """``ChangeFeed`` (querier/frontend.py) of head replicas in other processes, by log sequence:
    answers over the head's recent days are kept as long as no record wrote into the ranges they
    read, as the single node keeps them (``store.changes``).

    Every replica of a shard applies the same records, numbered by their log sequence, and
    answers ``changes(ranges)`` with its applied sequence and the highest sequence that wrote into
    the ranges (``store.headrpc``'s ``Changes``; a replica restarted from a checkpoint at C
    answers at least C). One replica per shard is asked, the one queries read first
    (``ShardReplicas``' order, with its fallback and its memory of failed replicas), within
    ``timeout_s``.

    ``token``: per shard, the replica that answered, its applied sequence T and the number of the
    shard's latest call. The evaluation that follows reads the shard from that replica, which
    holds every record up to T, unless it fails meanwhile: ``changed`` then says changed if
    another replica served a call since (it may have applied less). Otherwise an answer is
    changed once any replica of the shard applied a record after T that wrote into its ranges,
    or if no replica of a shard answers. A replica that lags tells of a write later, as a query
    read from it would show it later. Ranges wholly before every shard's persisted watermark are
    left to ``persisted`` (they change only in the bucket).
    """

    def __init__(self, shards: Sequence[ShardReplicas], pool: ThreadPoolExecutor,
                 persisted: PersistedHeads | None = None, timeout_s: float = 2.0) -> None:
        self._shards = list(shards)
        self._pool = pool
        self._persisted = persisted
        self._timeout_s = timeout_s

    def _ask(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[str, tuple[int, int]] | None]:
        """Per shard, ``(replica, its changes answer)``, None if no replica answered."""
        def one(shard: ShardReplicas) -> tuple[str, tuple[int, int]] | None:
            try:
                return shard.call_named(lambda c: c.changes(ranges, self._timeout_s), serves=False)  # type: ignore[return-value]
            except StorageError:
                return None

        return list(self._pool.map(one, self._shards))

    def token(self) -> tuple | None:
        serials = [s.serial for s in self._shards]
        token = []
        for answer, serial in zip(self._ask(()), serials):
            if answer is None:
                return None  # a shard nobody answers for: nothing evaluated now may be kept
            name, (applied, _) = answer
            token.append((applied, name, serial))
        return tuple(token)

    def changed(self, token: object, ranges: Sequence[tuple[int, int]]) -> bool:
        if token is None:
            return True
        if self._persisted is not None and not self._persisted.changed(None, ranges):
            return False  # before every shard's persisted watermark: the heads no longer change there
        for shard, answer, (applied, name, serial) in zip(self._shards, self._ask(ranges), token):  # type: ignore[misc]
            if answer is None or not shard.served_since(serial) <= {name}:
                return True
            if answer[1][1] > applied:
                return True
        return False
