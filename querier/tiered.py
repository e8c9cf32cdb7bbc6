"""One ``Querier`` over the head and the bucket's blocks: merged per series, deduplicated.

The head holds the recent hours, blocks hold closed windows; around a
window's end both may hold the same samples (the head keeps persisted data
until it is older than its retention), and two blocks may overlap (a retried
upload before the compactor merged them). A series present in several
sources is merged in time order, keeping one sample per timestamp (the
first source's: the head, then blocks by ULID, so answers are
deterministic). Results are the same whichever tier holds the data.

Downsampled blocks: a selection may read 5m or 1h blocks for the time they
cover, up to ``max_source_resolution`` (auto: a fifth of the step); the rules
and what such a selection returns per function are in ``querier/downsampled.py``.

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

from querier.downsampled import (
    COUNTER_FUNCS, MIN_RESOLUTION, RESOLUTIONS, Piece, Segment, aligned, max_resolution, plan_resolutions,
    resolution_note, view, window_edges,
)
from store.block import BlockCaches, BlockReader
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
    arrays = [a for a in (p.samples() for p in parts) if len(a[0])]
    if not arrays:
        return parts[0]
    # Parts that do not overlap (consecutive blocks, the head after them) need no sort and have
    # no timestamp in common: concatenated by time, whatever their priority.
    by_time = sorted(arrays, key=lambda a: int(a[0][0]))
    if all(by_time[i][0][-1] < by_time[i + 1][0][0] for i in range(len(by_time) - 1)):
        return ArraySeries(parts[0].labels, np.concatenate([a[0] for a in by_time]),
                           np.concatenate([a[1] for a in by_time]))
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
                 clock: Callable[[], float] = time.monotonic, caches: BlockCaches | None = None) -> None:
        self._catalog = BlockCatalog(bucket, meta_cache=caches.meta if caches is not None else None)
        self._caches = caches  # decoded meta.json, indexes, footers and column chunks, shared by the readers
        self._bucket = bucket
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._readers: dict[str, BlockReader] = {}
        self._loaded_at: float | None = None

    def refresh(self) -> None:
        """Re-lists the bucket now. Raises BucketError when it cannot be listed."""
        self._catalog.refresh()
        live = {m.ulid: m for res in RESOLUTIONS for m in self._catalog.blocks(resolution=res)}
        with self._lock:
            self._readers = {u: self._readers.get(u) or BlockReader(self._bucket, u, meta=m, caches=self._caches)
                             for u, m in live.items()}
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

    def downsampled(self, mint: int, maxt: int, max_resolution: int) -> list[BlockReader]:
        """Readers of the live downsampled blocks with ``0 < resolution <= max_resolution``
        overlapping ``[mint, maxt]``, by minTime then ULID."""
        self._refresh_if_due()
        with self._lock:
            out = [r for r in self._readers.values()
                   if 0 < r.meta.resolution <= max_resolution and r.meta.min_time <= maxt and r.meta.max_time > mint]
        return sorted(out, key=lambda r: (r.meta.min_time, r.ulid))


class TieredQuerier:
    """Head plus blocks for one request (``store.storage.Querier``); collects ``warnings``."""

    def __init__(self, head: Querier, blocks: BucketBlocks | None, *, partial_response: bool = True,
                 max_source_resolution: int | None = 0) -> None:
        """Args:
            head: the recent data (or the sharded heads).
            blocks: the bucket's blocks, if any.
            partial_response: skip failing blocks with a warning instead of failing.
            max_source_resolution: the coarsest downsampled data (ms) selections may read;
                0 (the default) raw only; None (auto) a fifth of the evaluation step, raw for
                instant queries. Raw by default because what a downsampled selection returns
                is shaped for our engine (e.g. ``avg_over_time`` reads sums with counts as
                weights): remote read and other callers get samples; the query API sets it per
                request (``auto`` unless ``max_source_resolution`` says otherwise).
        """
        self._head = head
        self._blocks = blocks
        self.partial_response = partial_response
        self.max_source_resolution = max_source_resolution
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
        max_res = max_resolution(hints, self.max_source_resolution)
        if max_res >= MIN_RESOLUTION and self._blocks is not None:
            try:
                plan = plan_resolutions(self._blocks.downsampled(mint, maxt, max_res), mint, maxt,
                                        raw=self._blocks.readers(mint, maxt))
            except BucketError as e:
                self._failed("listing the bucket", e)
                plan = []
            if any(seg.resolution for seg in plan):
                return self._select_downsampled(matchers, mint, maxt, hints, plan)
        return self._select_raw(matchers, mint, maxt, hints)

    def _select_raw(self, matchers: Sequence[Matcher], mint: int, maxt: int,
                    hints: SelectHints | None) -> list[Series]:
        results = self._each(mint, maxt, lambda q: q.select(matchers, mint, maxt, hints))
        return merge_selections(results)

    def _select_downsampled(self, matchers: Sequence[Matcher], mint: int, maxt: int, hints: SelectHints | None,
                            plan: list[Segment]) -> list[Series]:
        """A selection answered per time range by the plan's resolutions, as the view ``hints.func``
        needs (``querier/downsampled.py``)."""
        pieces: dict[Labels, list[Piece]] = {}
        for seg in plan:
            lo, hi = max(seg.start, mint), min(seg.end - 1, maxt)
            if lo > hi:
                continue
            if seg.resolution == 0:
                for s in self._select_raw(matchers, lo, hi, hints):
                    ts, vs = s.samples()
                    pieces.setdefault(s.labels, []).append(Piece(0, ts, vs, None))
                continue
            for r in seg.readers:
                try:
                    sel = r.select(matchers, lo, hi, hints)
                except (BucketError, StorageError) as e:
                    if isinstance(e, SampleLimitExceeded):
                        raise
                    self._failed(f"reading block {r.ulid}", e)
                    continue
                for s in sel:
                    pieces.setdefault(s.labels, []).append(Piece(seg.resolution, None, None, s.aggregates))
            if hints is not None and hints.notes is not None:
                note = resolution_note(seg.resolution)
                if note not in hints.notes:
                    hints.notes.append(note)
        func = hints.func if hints is not None else ""
        edges = None
        if hints is not None and hints.func in COUNTER_FUNCS and not aligned(hints, max(s.resolution for s in plan)):
            edges = window_edges(hints)
        return [view(lb, pieces[lb], func, mint, maxt, edges) for lb in sorted(pieces)]

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
