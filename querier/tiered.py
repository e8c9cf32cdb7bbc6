"""One ``Querier`` over the head and the bucket's blocks: merged per series, deduplicated.

The head holds the recent hours, blocks hold closed windows; around a
window's end both may hold the same samples (the head keeps persisted data
until it is older than its retention), and two blocks may overlap (a retried
upload before the compactor merged them). A series present in several
sources is merged in time order, keeping one sample per timestamp (the
first source's: the head, then blocks by ULID, so answers are
deterministic). Results are the same whichever tier holds the data.

Bucket failures: with ``partial_response`` (the default, as Thanos) the
blocks that failed are skipped and a warning says which; the API puts it in
the response's ``warnings``. Without it the failure raises
``BucketUnavailable`` and the query fails.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from store.block import BlockReader
from store.bucket import Bucket
from store.catalog import BlockCatalog
from store.errors import BucketError, BucketUnavailable, SampleLimitExceeded, StorageError
from store.labels import Labels
from store.matchers import Matcher
from store.storage import ArraySeries, Querier, SelectHints, Series

log = logging.getLogger(__name__)


def merge_series(parts: list[Series]) -> Series:
    """One series from the same series' parts, in priority order: one sample per timestamp."""
    if len(parts) == 1:
        return parts[0]
    arrays = [p.samples() for p in parts]
    ts = np.concatenate([a[0] for a in arrays])
    vs = np.concatenate([a[1] for a in arrays])
    order = np.argsort(ts, kind="stable")  # stable: an earlier part wins a tie
    ts, vs = ts[order], vs[order]
    keep = np.ones(len(ts), dtype=bool)
    keep[1:] = ts[1:] != ts[:-1]
    return ArraySeries(parts[0].labels, ts[keep], vs[keep])


def merge_selections(results: list[list[Series]]) -> list[Series]:
    """Selections of several sources as one, sorted by labels; the same series merged, the first
    source winning a timestamp (``merge_series``)."""
    if len(results) == 1:
        return results[0]
    parts: dict[Labels, list[Series]] = {}
    for res in results:
        for s in res:
            parts.setdefault(s.labels, []).append(s)
    return [merge_series(parts[lb]) for lb in sorted(parts)]


class BucketBlocks:
    """The bucket's live blocks and a reader for each, refreshed at most every ``refresh_s``.

    Shared by all queries (thread-safe); readers are kept while their block is live.
    """

    def __init__(self, bucket: Bucket, refresh_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._catalog = BlockCatalog(bucket)
        self._bucket = bucket
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._readers: dict[str, BlockReader] = {}
        self._loaded_at: float | None = None

    def refresh(self) -> None:
        """Re-lists the bucket now. Raises BucketError when it cannot be listed."""
        self._catalog.refresh()
        live = {m.ulid: m for m in self._catalog.blocks(resolution=0)}
        with self._lock:
            self._readers = {u: self._readers.get(u) or BlockReader(self._bucket, u, meta=m) for u, m in live.items()}
            self._loaded_at = self._clock()

    def _refresh_if_due(self) -> None:
        if self._loaded_at is None or self._clock() - self._loaded_at >= self._refresh_s:
            self.refresh()

    def live(self) -> list[tuple[str, int, int]]:
        """(ULID, minTime, maxTime) of the live blocks, refreshed as ``readers`` does; the last
        known list when the bucket cannot be listed (for the results cache's ``BlockChanges``)."""
        try:
            self._refresh_if_due()
        except BucketError as e:
            log.warning("cannot list the bucket", extra={"err": str(e)})
        with self._lock:
            return [(u, r.meta.min_time, r.meta.max_time) for u, r in self._readers.items()]

    def readers(self, mint: int, maxt: int) -> list[BlockReader]:
        """Readers of the live raw blocks overlapping ``[mint, maxt]``, by ULID."""
        if self._loaded_at is None or self._clock() - self._loaded_at >= self._refresh_s:
            self.refresh()
        with self._lock:
            out = [r for r in self._readers.values()
                   if r.meta.resolution == 0 and r.meta.min_time <= maxt and r.meta.max_time > mint]
        return sorted(out, key=lambda r: r.ulid)


class TieredQuerier:
    """Head plus blocks for one request (``store.storage.Querier``); collects ``warnings``."""

    def __init__(self, head: Querier, blocks: BucketBlocks | None, *, partial_response: bool = True) -> None:
        self._head = head
        self._blocks = blocks
        self.partial_response = partial_response
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def _sources(self, mint: int, maxt: int) -> list[Querier]:
        if self._blocks is None:
            return [self._head]
        try:
            return [self._head, *self._blocks.readers(mint, maxt)]
        except BucketError as e:
            self._failed("listing the bucket", e)
            return [self._head]

    def _failed(self, what: str, err: Exception) -> None:
        if not self.partial_response:
            raise BucketUnavailable(f"{what}: {err}") from err
        log.warning("bucket read failed", extra={"what": what, "err": str(err)})
        msg = f"partial response: {what} failed: {err}"
        with self._lock:
            if msg not in self.warnings:
                self.warnings.append(msg)

    def _each(self, mint: int, maxt: int, fn: Callable[[Querier], list]) -> list[list]:
        out = []
        for src in self._sources(mint, maxt):
            try:
                out.append(fn(src))
            except (BucketError, StorageError) as e:
                if src is self._head or isinstance(e, SampleLimitExceeded):
                    raise
                self._failed(f"reading block {getattr(src, 'ulid', '?')}", e)
        return out

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[Series]:
        results = self._each(mint, maxt, lambda q: q.select(matchers, mint, maxt, hints))
        return merge_selections(results)

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        names: set[str] = set()
        for res in self._each(mint, maxt, lambda q: q.label_names(matchers, mint, maxt)):
            names.update(res)
        return sorted(names)

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        values: set[str] = set()
        for res in self._each(mint, maxt, lambda q: q.label_values(name, matchers, mint, maxt)):
            values.update(res)
        return sorted(values)
