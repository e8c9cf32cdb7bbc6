"""Bounded in-memory caches with Thanos-style metrics, shared by the querier's caches.

A ``Cache`` is an LRU (cachetools) bounded by the bytes of its values, as measured by the
``sizeof`` it is given; an item larger than the whole cache is not kept. Every cache reports
``flashback_cache_requests_total``, ``flashback_cache_hits_total``,
``flashback_cache_evictions_total`` (items dropped to make room), ``flashback_cache_items`` and
``flashback_cache_bytes``, labelled by the cache's ``name``. Thread-safe.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

import cachetools
from prometheus_client import CollectorRegistry, Counter, Gauge

V = TypeVar("V")


class CacheMetrics:
    """The metric families of all caches of one registry (create once per registry)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry}
        self.requests = Counter("flashback_cache_requests_total", "Cache lookups.", ["name"], **kw)
        self.hits = Counter("flashback_cache_hits_total", "Cache lookups that found the item.", ["name"], **kw)
        self.evictions = Counter("flashback_cache_evictions_total",
                                 "Items dropped from a cache to make room for others.", ["name"], **kw)
        self.items = Gauge("flashback_cache_items", "Items in a cache.", ["name"], **kw)
        self.bytes = Gauge("flashback_cache_bytes", "Bytes of the items in a cache.", ["name"], **kw)
        self.max_bytes = Gauge("flashback_cache_max_bytes", "Most bytes a cache holds.", ["name"], **kw)


class _LRU(cachetools.LRUCache):
    def __init__(self, maxsize: int, getsizeof: Callable, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize, getsizeof=getsizeof)
        self._on_evict = on_evict

    def popitem(self):
        item = super().popitem()
        self._on_evict()
        return item


class Cache(Generic[V]):
    """An LRU of at most ``max_bytes`` (by ``sizeof(value)``); ``get`` returns None on a miss."""

    def __init__(self, name: str, max_bytes: int, sizeof: Callable[[V], int],
                 metrics: CacheMetrics | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache {name}: max_bytes must not be negative, got {max_bytes}")
        self.name = name
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._lock = threading.Lock()
        self.evictions = 0
        self._lru = _LRU(max(max_bytes, 1), lambda v: max(1, sizeof(v)), self._evicted)
        self._m = None
        if metrics is not None:
            self._m = (metrics.requests.labels(name), metrics.hits.labels(name), metrics.evictions.labels(name),
                       metrics.items.labels(name), metrics.bytes.labels(name))
            metrics.max_bytes.labels(name).set(max_bytes)

    def _evicted(self) -> None:
        self.evictions += 1
        if self._m is not None:
            self._m[2].inc()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._lru.get(key)
        if self._m is not None:
            self._m[0].inc()
            if value is not None:
                self._m[1].inc()
        return value

    def peek(self, key: Hashable) -> V | None:
        """Like ``get``, without counting a request or refreshing the item's recency."""
        with self._lock:
            try:
                return cachetools.Cache.__getitem__(self._lru, key)  # the base class: no LRU update
            except KeyError:
                return None

    def put(self, key: Hashable, value: V) -> None:
        """Keeps ``value`` unless it alone is larger than the cache (or the cache has size 0)."""
        if self.max_bytes == 0 or self._sizeof(value) > self.max_bytes:
            return
        with self._lock:
            self._lru[key] = value
            n, size = len(self._lru), self._lru.currsize
        if self._m is not None:
            self._m[3].set(n)
            self._m[4].set(size)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._lru.pop(key, None)
            n, size = len(self._lru), self._lru.currsize
        if self._m is not None:
            self._m[3].set(n)
            self._m[4].set(size)

    @property
    def size_bytes(self) -> int:
        return self._lru.currsize

    def __len__(self) -> int:
        return len(self._lru)
