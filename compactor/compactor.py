"""The compactor: closed windows of the head become blocks, blocks become larger blocks.

One ``Compactor`` serves one source (a head, or a head replica's client) and the
blocks of one set of external labels (a shard) in one bucket. ``run_once`` makes
one pass; ``start`` runs passes periodically in a thread.

Time is cut into windows of ``window_ms`` (default 28 h) aligned to multiples of
``window_ms`` since the Unix epoch. A window ``[start, end)`` is *closed* once
``end + grace_ms < now``. Compaction levels are aligned ranges of
``levels[i] * window_ms`` (default 1, 6 and 24 windows: 28 h, 7 d, 28 d).

State
-----
The compactor keeps no state of its own: everything it needs to resume is in
the bucket, so a fresh process (or a second compactor) picks up where a killed
one stopped. Per run it derives from the complete blocks (``meta.json``
present) whose external labels are ``external_labels`` and whose resolution is
0 ("our blocks"):

* a window is *persisted* when one of our blocks (marked for deletion or not)
  covers it: ``minTime <= start`` and ``maxTime >= end``;
* the *persisted watermark* is the largest ``maxTime`` of our blocks: every
  window before it that held data is in the bucket. ``on_persisted(watermark)``
  tells the head that it may reject appends older than the watermark and drop
  those windows. It is called after every window this process persists, and
  whenever the watermark derived from the bucket moves past the last value
  passed on (so on the first run of a restarted process). Before the watermark
  moves past a block the head still holds data of, that block has been
  verified (``verify_block``) by this process;
* *active* blocks are our blocks that are neither marked for deletion nor
  *contained* in another unmarked block of ours (their ``compaction.sources``
  a subset of its sources; of blocks with equal sources the smallest ULID is
  kept, as ``store.catalog`` shows queriers).

Only the ULIDs this process verified, and the last watermark passed on, are
remembered in memory.

The source is asked only through ``Querier``: whether it holds samples in a
range is a ``select`` with ``__name__=~".+"`` whose series are not decoded, and a
window is read one group of series at a time (series grouped by their first
label pair, i.e. by metric name for ordinary series, which keeps label order),
so neither the window nor a merge is held in memory whole. Appends that reach
the head for a window while it is being written are not in the block: the
grace period exists to make that unlikely, as in Prometheus.

A pass (``run_once``)
---------------------
Each step is idempotent, and each step's effects are ordered so that a crash
between any two bucket operations leaves a state the next pass completes::

    sync ──> persist windows ──> (downsample) ──> collect garbage ──> merge overlaps ──> compact levels
         ──> sync ──> (downsample)
     │            │                    │                    │                 │
     │            ▼                    ▼                    ▼                 ▼
     │     for each closed        contained blocks:    overlapping       per level, each
     │     window from the        verify container,    active blocks:    closed aligned
     │     watermark on, with     then mark them       merge into one    range with >= 2
     │     data, not persisted:                        block, verify,    active blocks:
     │     select -> write block                       then mark the     merge, verify,
     │     (meta.json last) ->                         inputs            mark the inputs
     │     verify -> on_persisted
     ▼
    refresh the catalog; verify our blocks the source still holds data of,
    then on_persisted(watermark) if it moved. The downsampler, if given, makes the
    5m and 1h blocks of our raw blocks (``compactor/downsample.py``): right after
    persisting, so each window's 5m block is made from its level-1 block before
    the window is merged, and at the end, for the 1h blocks of merged ranges

1. **persist**: windows are visited in time order from the watermark (from the
   source's first sample when the bucket holds none of our blocks, found by
   bisecting on "the source has a sample at or before t"); a window
   that is closed, not persisted and has samples in the source becomes a
   level-1 block (``sources = [its own ULID]``). The block is uploaded data,
   index, ``meta.json`` last (``write_block``), verified, then
   ``on_persisted(end)`` is called. The first failure ends the pass, so the
   watermark never passes a window that held data and is not in the bucket.
   A crash before ``meta.json`` leaves an invisible partial block and the
   window is written again (a new ULID); a crash after it leaves a complete
   block that covers the window, verified by the next pass before the
   watermark passes it.
2. **collect garbage**: an unmarked block contained in another unmarked block
   (the sources of an interrupted merge, or a block merged twice) is marked
   for deletion, after its container was verified.
3. **merge overlaps**: active blocks whose time ranges overlap (two level-1
   blocks of one window from two compactors; a late level-1 block inside a
   merged range) are merged into one block spanning all of them, at the highest
   of their levels, with the union of their sources; then they are marked.
4. **compact levels**: from the lowest level up, every closed aligned range of
   level ``i`` holding at least two active blocks, all inside it, becomes one
   block of level ``i + 1`` spanning the range, with the union of the
   sources; it is uploaded and verified, then its inputs are marked for
   deletion (``deletion-mark.json``, ``store.catalog.mark_for_deletion``).

A merged block is complete before any input is marked, and until the inputs are
marked the catalog already hides them behind it (their sources are contained in
its sources), so a reader sees every sample once at every point. Merging
deduplicates samples by timestamp: of equal timestamps the value of the input
with the highest compaction level, then the highest ULID, is kept.

The compactor never deletes a block's files, with one exception: a block this
process just wrote that fails verification, or a merged block that fails
verification while all its sources are intact in other blocks, is deleted at
once (``store.catalog.delete_block``) and written again. Deleting marked
blocks after their delay is retention's job (``compactor/retention.py``), as is
cleaning up partial blocks. A corrupt block whose data exists nowhere else is
left alone, logged and counted at every pass
(``flashback_compactor_corrupt_blocks``), and the watermark stays below it.

Errors: every failed pass logs the step and error and counts it
(``flashback_compactor_failures_total{step}``), then re-raises; the next pass
retries. Bucket failures stay ``store.errors.BucketError`` (``BucketUnavailable``
when transient), block errors ``store.errors.BlockError``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from compactor.verify import BlockVerifier
from store import ulid as ulids
from store.block import BlockMeta, BlockReader, SeriesData, write_block
from store.bucket import Bucket
from store.catalog import BlockCatalog, CatalogBlock, delete_block, mark_for_deletion
from store.errors import CorruptBlock, StorageError
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.storage import Querier, SelectHints

if TYPE_CHECKING:
    from compactor.downsample import Downsampler

HOUR_MS = 3600_000
DEFAULT_WINDOW_MS = 28 * HOUR_MS
DEFAULT_GRACE_MS = HOUR_MS
DEFAULT_LEVELS = (1, 6, 24)  # 28 h, 7 d, 28 d with the default window

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# Every series has a metric name: this matcher selects all of them (an empty matcher set is not
# allowed by the Querier contract).
ANY_SERIES = Matcher(MatchType.RE, "__name__", ".+")

STEPS = ("sync", "persist", "garbage", "overlaps", "levels", "downsample")


def _wall_ms() -> int:
    return int(time.time() * 1000)


class CompactorError(Exception):
    """Base class of the compactor's own errors."""


class SourceError(CompactorError):
    """The source (head) failed while the compactor read a window from it; retried next pass."""


def _says_what_failed(err: BaseException) -> bool:
    """Whether the message of a failed pass says all there is (a storage error: a shard with no
    replica up, an unreachable bucket, a corrupt block, also as the cause of a ``SourceError``):
    a traceback is logged only for what nobody anticipated."""
    if isinstance(err, SourceError):
        err = err.__cause__ or err
    return isinstance(err, StorageError)


@dataclass(slots=True)
class RunResult:
    """What one pass did (ULIDs of the blocks written and marked, the watermark passed on)."""

    persisted: list[BlockMeta] = field(default_factory=list)
    merged: list[BlockMeta] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    downsampled: list[BlockMeta] = field(default_factory=list)
    watermark: int | None = None

    @property
    def written(self) -> list[BlockMeta]:
        return self.persisted + self.merged


class Compactor:
    """Rolls closed windows of a source into blocks and compacts blocks (see the module docstring).

    Thread-safety: ``run_once`` may be called from any thread; passes are
    serialised by a lock. ``start`` runs passes in a background thread until
    ``close``. The bucket and the source belong to the caller and stay open.
    """

    def __init__(self, source: Querier, bucket: Bucket, *, window_ms: int = DEFAULT_WINDOW_MS,
                 grace_ms: int = DEFAULT_GRACE_MS, external_labels: Mapping[str, str] | None = None,
                 levels: Sequence[int] = DEFAULT_LEVELS, on_persisted: Callable[[int], None] | None = None,
                 registry: CollectorRegistry | None = None, now: Callable[[], int] = _wall_ms,
                 logger: logging.Logger | None = None, tmp_dir: str | None = None,
                 rows_per_group: int | None = None, downsampler: "Downsampler | None" = None) -> None:
        """Args:
            source: where closed windows are read from (the head); ``select`` with ``__name__=~".+"``.
            bucket: where blocks go.
            window_ms: length of a window (a level-1 block), aligned to multiples since the epoch.
            grace_ms: a window is closed once its end is more than this in the past.
            external_labels: labels of every block this compactor writes and compacts (shard);
                blocks with other labels are not touched.
            levels: range of each compaction level in windows, ascending, starting with 1, each
                dividing the next: ``(1, 6, 24)`` is 28 h, 7 d, 28 d.
            on_persisted: called with a window end (ms) once every window before it that held
                data is verified in the bucket; values only increase within a process.
            registry: where the ``flashback_compactor_*`` metrics go (default: a private one).
            now: the clock, ms since the epoch.
            logger: default ``logging.getLogger("compactor.compactor")``.
            tmp_dir: directory for block files being written or verified.
            rows_per_group: data file row group size (default: the block format's).
            downsampler: run as the last step of every pass (``compactor/downsample.py``), so
                every block this pass wrote is downsampled in the same pass.
        """
        if window_ms <= 0:
            raise ValueError(f"window_ms must be positive, got {window_ms}")
        if grace_ms < 0:
            raise ValueError(f"grace_ms must not be negative, got {grace_ms}")
        levels = tuple(levels)
        if not levels or levels[0] != 1:
            raise ValueError(f"levels must start with 1 (one window), got {levels}")
        for a, b in zip(levels, levels[1:]):
            if b <= a or b % a:
                raise ValueError(f"each level must be a larger multiple of the one before, got {levels}")
        self._source = source
        self._bucket = bucket
        self._window = window_ms
        self._grace = grace_ms
        self._labels = Labels.from_dict(external_labels or {})
        self._ranges = tuple(n * window_ms for n in levels)
        self._on_persisted = on_persisted
        self._downsampler = downsampler
        self._now = now
        self._log = logger or logging.getLogger(__name__)
        self._tmp_dir = tmp_dir
        self._write_opts = {} if rows_per_group is None else {"rows_per_group": rows_per_group}
        self._catalog = BlockCatalog(bucket, now=now)
        self._lock = threading.Lock()
        self._notified: int | None = None
        self._step = "sync"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._init_metrics(registry if registry is not None else CollectorRegistry())
        self._verifier = BlockVerifier(bucket, self._m_verify_failures, deleted=self._m_deleted, tmp_dir=tmp_dir)

    def _init_metrics(self, registry: CollectorRegistry) -> None:
        self._m_runs = Counter("flashback_compactor_runs", "Compactor passes started.", registry=registry)
        self._m_failures = Counter("flashback_compactor_failures",
                                   "Compactor passes that ended with an error, by the step that failed.",
                                   ["step"], registry=registry)
        self._m_written = Counter("flashback_compactor_blocks_written",
                                  "Blocks uploaded and verified, by compaction level.", ["level"],
                                  registry=registry)
        self._m_samples = Counter("flashback_compactor_samples_written",
                                  "Samples written into blocks (merged blocks included).", registry=registry)
        self._m_marked = Counter("flashback_compactor_blocks_marked_for_deletion",
                                 "Blocks this compactor marked for deletion, by reason.", ["reason"],
                                 registry=registry)
        self._m_overlaps = Counter("flashback_compactor_overlaps_merged",
                                   "Groups of overlapping blocks merged into one block.", registry=registry)
        self._m_verify_failures = Counter("flashback_compactor_verify_failures",
                                          "Blocks that failed verification.", registry=registry)
        self._m_deleted = Counter("flashback_compactor_corrupt_blocks_deleted",
                                  "Corrupt blocks deleted because their data is held elsewhere.",
                                  registry=registry)
        self._m_corrupt = Gauge("flashback_compactor_corrupt_blocks",
                                "Corrupt or unreadable blocks whose data exists nowhere else (need an operator).",
                                registry=registry)
        self._m_last_success = Gauge("flashback_compactor_last_success_timestamp_seconds",
                                     "When the last pass completed without error.", registry=registry)
        self._m_watermark = Gauge("flashback_compactor_persisted_watermark_seconds",
                                  "Every window before this time that held data is in the bucket.",
                                  registry=registry)
        self._m_duration = Histogram("flashback_compactor_run_duration_seconds", "Duration of compactor passes.",
                                     buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600), registry=registry)
        for step in STEPS:
            self._m_failures.labels(step)
        for i in range(len(self._ranges)):
            self._m_written.labels(str(i + 1))
        for reason in ("compacted", "overlap", "contained"):
            self._m_marked.labels(reason)

    def __repr__(self) -> str:
        return f"Compactor({self._bucket!r}, labels={self._labels}, window_ms={self._window})"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, interval_s: float) -> None:
        """Runs ``run_once`` now and then every ``interval_s`` seconds in a thread until ``close``.

        A failed pass is logged and counted (by ``run_once``) and retried at the next interval.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if self._thread is not None:
            raise RuntimeError("compactor already started")
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # noqa: BLE001 - logged and counted by run_once; retried next time
                    pass
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, name="flashback-compactor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops the background thread (after the pass under way, if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- one pass -------------------------------------------------------------------------------

    def run_once(self) -> RunResult:
        """One pass: persist closed windows, collect garbage, merge overlaps, compact levels.

        Raises:
            BucketError, BlockError, SourceError: a step failed; what was done so far stays
                done (and consistent), the next pass continues from the bucket's state.
        """
        with self._lock:
            self._m_runs.inc()
            result = RunResult()
            started = time.perf_counter()
            try:
                self._step = "sync"
                self._sync(result)
                self._step = "persist"
                self._persist_windows(result)
                if self._downsampler is not None:
                    # Before the windows just persisted are merged, so their 5m blocks are made
                    # from them and not from the merged block later.
                    self._step = "downsample"
                    result.downsampled += self._downsampler.run_once().written
                self._step = "garbage"
                self._collect_garbage(result)
                self._step = "overlaps"
                self._merge_overlaps(result)
                self._step = "levels"
                self._compact_levels(result)
                self._step = "sync"
                self._sync(result)
                if self._downsampler is not None:
                    self._step = "downsample"
                    result.downsampled += self._downsampler.run_once().written
            except Exception as err:
                self._m_failures.labels(self._step).inc()
                self._log.error("compactor pass failed", exc_info=not _says_what_failed(err),
                                extra={"step": self._step, "error": f"{type(err).__name__}: {err}"})
                raise
            finally:
                self._m_duration.observe(time.perf_counter() - started)
            self._m_last_success.set(self._now() / 1000)
            result.watermark = self._notified
            return result

    # -- state from the bucket ------------------------------------------------------------------

    def _ours(self, b: CatalogBlock) -> bool:
        return b.meta.resolution == 0 and b.meta.labels == self._labels

    def _refresh(self) -> list[CatalogBlock]:
        """Refreshes the catalog; our complete blocks (marked ones included), by minTime."""
        self._catalog.refresh()
        return [b for b in self._catalog.all_blocks() if self._ours(b)]

    @staticmethod
    def _active(blocks: list[CatalogBlock]) -> list[BlockMeta]:
        """Blocks neither marked nor contained in another unmarked block, by minTime then ULID."""
        unmarked = [b.meta for b in blocks if not b.marked]
        return [m for m in unmarked if _container(m, unmarked) is None]

    def _closed(self, end: int) -> bool:
        return end + self._grace < self._now()

    def _has_data(self, mint: int, maxt: int) -> bool:
        """Whether the source holds a series with samples in ``[mint, maxt]``.

        Asked as the label names of those series, which ``select`` would return: a head replica
        answers with a few names instead of streaming every series with its chunks.
        """
        try:
            return bool(self._source.label_names([ANY_SERIES], mint, maxt))
        except Exception as err:
            raise SourceError(f"label names from the source over [{mint}, {maxt}]: {type(err).__name__}: {err}") from err

    def _sync(self, result: RunResult) -> None:
        """Refreshes the catalog and passes the watermark on, after verifying what the head holds."""
        blocks = self._refresh()
        corrupt = {u: e for u, e in self._catalog.errors.items()}
        for u, err in corrupt.items():
            self._log.error("block unreadable: its meta.json cannot be used; left alone",
                            extra={"block": u, "error": str(err)})
        cap = INT64_MAX
        # Only active blocks need checking: a marked or contained block's range is covered by
        # the active block holding its data. Newest first: once the source holds nothing before
        # a block's end, it holds nothing of any older block either.
        for m in sorted(self._active(blocks), key=lambda m: m.max_time, reverse=True):
            if m.ulid in self._verifier or (self._notified is not None and m.max_time <= self._notified):
                continue
            if not self._has_data(INT64_MIN, m.max_time - 1):
                break
            if not self._has_data(m.min_time, m.max_time - 1):
                continue
            try:
                self._verifier.verify(m)
            except CorruptBlock as err:
                if self._delete_if_redundant(m, blocks, result):
                    continue
                corrupt[m.ulid] = err
                cap = min(cap, m.min_time)
                self._log.error("block corrupt and its data held nowhere else: left alone; "
                                "the head keeps its windows", extra=_block_extra(m, error=str(err)))
        self._m_corrupt.set(len(corrupt))
        blocks = [b for b in blocks if b.ulid not in result.deleted]
        if blocks:
            self._notify(min(max(b.meta.max_time for b in blocks), cap))

    def _notify(self, watermark: int) -> None:
        if self._notified is not None and watermark <= self._notified:
            return
        if self._on_persisted is not None:
            self._on_persisted(watermark)
        self._notified = watermark
        self._m_watermark.set(watermark / 1000)
        self._log.info("persisted watermark advanced", extra={"maxt": watermark})

    def _delete_if_redundant(self, meta: BlockMeta, blocks: list[CatalogBlock], result: RunResult) -> bool:
        """Deletes corrupt block ``meta`` if other unmarked blocks hold all of its sources."""
        held = set()
        for b in blocks:
            if b.ulid != meta.ulid and not b.marked:
                held.update(_sources(b.meta))
        if not _sources(meta) <= held:
            return False
        self._log.warning("deleting a corrupt block whose sources are intact in other blocks",
                          extra=_block_extra(meta))
        delete_block(self._bucket, meta.ulid)
        self._m_deleted.inc()
        result.deleted.append(meta.ulid)
        return True

    # -- step 1: persist closed windows ---------------------------------------------------------

    def _persist_windows(self, result: RunResult) -> None:
        blocks = self._refresh()
        w = self._window
        if blocks:
            lo = max(b.meta.max_time for b in blocks)
        else:
            lo = self._first_window_with_data()
            if lo is None:
                return
        covered = [(b.meta.min_time, b.meta.max_time) for b in blocks]
        start = lo // w * w
        while self._closed(start + w):
            end = start + w
            if not any(a <= start and end <= b for a, b in covered) and self._has_data(start, end - 1):
                meta = self._persist_window(start, end)
                if meta is not None:
                    result.persisted.append(meta)
                    covered.append((start, end))
            start = end

    def _first_window_with_data(self) -> int | None:
        """Start of the first closed window the source holds a sample in, or None."""
        w = self._window
        hi = (self._now() - self._grace) // w - 1  # the last window that may be closed
        if not self._has_data(INT64_MIN, (hi + 1) * w - 1):
            return None
        # Smallest k with a sample at or before the end of window k: "has data up to t" only
        # grows with t, so bisect (each probe is a selection, nothing is decoded).
        lo = INT64_MIN // w + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._has_data(INT64_MIN, (mid + 1) * w - 1):
                hi = mid
            else:
                lo = mid + 1
        return lo * w

    def _persist_window(self, start: int, end: int) -> BlockMeta | None:
        series = _peek(self._read_source(start, end))
        if series is None:
            return None  # series overlapped the window without a sample in it
        block = ulids.new(self._now())
        meta = write_block(self._bucket, series, min_time=start, max_time=end, level=1, sources=[block],
                           external_labels=dict(self._labels), ulid=block, now=self._now,
                           tmp_dir=self._tmp_dir, **self._write_opts)
        self._after_write(meta)
        self._log.info("window persisted", extra=_block_extra(meta))
        self._notify(end)
        return meta

    def _read_source(self, start: int, end: int) -> Iterator[SeriesData]:
        try:
            yield from _merged_series([self._source], start, end - 1)
        except Exception as err:
            raise SourceError(f"read window [{start}, {end}) from the source: {type(err).__name__}: {err}") from err

    def _after_write(self, meta: BlockMeta) -> None:
        """Verifies a block just written; a corrupt one is deleted at once and the error raised."""
        self._verifier.verify_written(meta, self._log, "block")
        self._m_written.labels(str(meta.level)).inc()
        self._m_samples.inc(meta.num_samples)

    # -- step 2: garbage ------------------------------------------------------------------------

    def _collect_garbage(self, result: RunResult) -> None:
        blocks = self._refresh()
        unmarked = [b.meta for b in blocks if not b.marked]
        for m in unmarked:
            container = _container(m, unmarked)
            if container is None:
                continue
            if container.ulid not in self._verifier:
                try:
                    self._verifier.verify(container)
                except CorruptBlock:
                    if not self._delete_if_redundant(container, blocks, result):
                        raise
                    return  # the containment changed; the next pass looks again
            self._mark(m, "contained", f"its data is in block {container.ulid}", result)

    def _mark(self, meta: BlockMeta, reason: str, details: str, result: RunResult) -> None:
        _, uploaded = mark_for_deletion(self._bucket, meta.ulid, details, self._now() // 1000)
        if uploaded:
            self._m_marked.labels(reason).inc()
            result.marked.append(meta.ulid)
            self._log.info("block marked for deletion", extra=_block_extra(meta, reason=details))

    # -- step 3: overlaps -----------------------------------------------------------------------

    def _merge_overlaps(self, result: RunResult) -> None:
        active = self._active(self._refresh())
        group: list[BlockMeta] = []
        group_end = INT64_MIN
        groups = []
        for m in sorted(active, key=lambda m: (m.min_time, m.ulid)):
            if group and m.min_time < group_end:
                group.append(m)
                group_end = max(group_end, m.max_time)
            else:
                if len(group) > 1:
                    groups.append(group)
                group, group_end = [m], m.max_time
        if len(group) > 1:
            groups.append(group)
        for g in groups:
            self._log.warning("overlapping blocks: merging them into one",
                              extra={"blocks": [m.ulid for m in g], "mint": min(m.min_time for m in g),
                                     "maxt": max(m.max_time for m in g)})
            merged = self._merge(g, min(m.min_time for m in g), max(m.max_time for m in g),
                                 max(m.level for m in g), "overlap", result)
            self._m_overlaps.inc()
            result.merged.append(merged)

    # -- step 4: levels -------------------------------------------------------------------------

    def _compact_levels(self, result: RunResult) -> None:
        for level, size in enumerate(self._ranges[1:], start=2):
            groups: dict[int, list[BlockMeta]] = {}
            for m in self._active(self._refresh()):
                k = m.min_time // size
                if m.max_time <= (k + 1) * size and m.level < level:
                    groups.setdefault(k, []).append(m)
            for k, g in sorted(groups.items()):
                start, end = k * size, (k + 1) * size
                if len(g) < 2 or not self._closed(end):
                    continue
                merged = self._merge(g, start, end, level, "compacted", result)
                result.merged.append(merged)

    # -- merging --------------------------------------------------------------------------------

    def _merge(self, inputs: list[BlockMeta], min_time: int, max_time: int, level: int, reason: str,
               result: RunResult) -> BlockMeta:
        """Writes one block of ``inputs``' samples, verifies it, then marks the inputs."""
        # Preferred first: of equal timestamps the first input's value is kept.
        inputs = sorted(inputs, key=lambda m: (m.level, m.ulid), reverse=True)
        readers = [BlockReader(self._bucket, m.ulid, meta=m) for m in inputs]
        sources = sorted(set().union(*(_sources(m) for m in inputs)))
        series = _merged_series(readers, min_time, max_time - 1)
        block = ulids.new(self._now())
        meta = write_block(self._bucket, series, min_time=min_time, max_time=max_time, level=level,
                           sources=sources, external_labels=dict(self._labels), ulid=block, now=self._now,
                           tmp_dir=self._tmp_dir, **self._write_opts)
        self._after_write(meta)
        self._log.info("blocks merged", extra=_block_extra(meta, inputs=[m.ulid for m in inputs]))
        for m in inputs:
            self._mark(m, reason, f"merged into block {block} ({reason})", result)
        return meta


# ---------------------------------------------------------------------------------------------
# Helpers


def _sources(meta: BlockMeta) -> frozenset[str]:
    return frozenset(meta.sources) or frozenset((meta.ulid,))


def _container(meta: BlockMeta, blocks: Iterable[BlockMeta]) -> BlockMeta | None:
    """The block of ``blocks`` that holds all of ``meta``'s data, if any.

    As ``store.catalog`` decides it: a block whose sources include all of ``meta``'s, preferring
    more sources, then the smaller ULID; of two blocks with equal sources the smaller ULID holds
    the other.
    """
    src = _sources(meta)
    best = None
    for c in blocks:
        if c.ulid == meta.ulid:
            continue
        cs = _sources(c)
        if not src <= cs:
            continue
        if cs == src and c.ulid > meta.ulid:
            continue
        if best is None or (-len(cs), c.ulid) < (-len(_sources(best)), best.ulid):
            best = c
    return best


def _block_extra(meta: BlockMeta, **more: object) -> dict:
    extra = {"block": meta.ulid, "mint": meta.min_time, "maxt": meta.max_time, "compaction_level": meta.level,
             "series": meta.num_series, "samples": meta.num_samples}
    extra.update(more)
    return extra


def _peek(it: Iterator[SeriesData]) -> Iterator[SeriesData] | None:
    """``it`` unchanged, or None if it yields nothing (reads its first item)."""
    for first in it:
        def chained() -> Iterator[SeriesData]:
            yield first
            yield from it
        return chained()
    return None


def _series_groups(queriers: Sequence[Querier], mint: int, maxt: int) -> Iterator[list[Matcher]]:
    """Matcher sets that partition the series of ``queriers`` into groups in label order.

    A label set's order is decided by its first pair (the smallest label name and its value)
    first, so grouping series by their first pair and visiting the groups by that pair visits
    series in order: group ``(n, v)`` is ``n="v"`` plus ``m=""`` (absent) for every name
    ``m < n``. For ordinary series that is one group per metric name, which bounds how much a
    merge holds in memory.
    """
    names = sorted(set().union(*(q.label_names([], mint, maxt) for q in queriers)))
    absent: list[Matcher] = []
    for name in names:
        values = sorted(set().union(*(q.label_values(name, absent, mint, maxt) for q in queriers)))
        for value in values:
            yield absent + [Matcher(MatchType.EQ, name, value)]
        absent = absent + [Matcher(MatchType.EQ, name, "")]


def _merged_series(queriers: Sequence[Querier], mint: int, maxt: int) -> Iterator[SeriesData]:
    """Every series of ``queriers`` in ``[mint, maxt]``, sorted by labels, samples deduplicated.

    Of samples with equal timestamps in several queriers, the first querier's is kept.
    """
    hints = SelectHints(mint, maxt)
    for matchers in _series_groups(queriers, mint, maxt):
        selections = [q.select(matchers, mint, maxt, hints) for q in queriers]
        merged = heapq.merge(*([(s.labels, i, s) for s in sel] for i, sel in enumerate(selections)),
                             key=lambda x: (x[0], x[1]))
        current: Labels | None = None
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for labels, _i, s in merged:
            if current is not None and labels != current:
                out = _combine(current, parts)
                if out is not None:
                    yield out
                parts = []
            current = labels
            parts.append(s.samples())
        if current is not None:
            out = _combine(current, parts)
            if out is not None:
                yield out


def _combine(labels: Labels, parts: list[tuple[np.ndarray, np.ndarray]]) -> SeriesData | None:
    """One series from its parts (preferred first): sorted by time, one sample per timestamp."""
    parts = [(np.asarray(t, dtype=np.int64), np.asarray(v, dtype=np.float64)) for t, v in parts if len(t)]
    if not parts:
        return None
    if len(parts) == 1:
        return labels, parts[0][0], parts[0][1]
    ts = np.concatenate([p[0] for p in parts])
    vs = np.concatenate([p[1] for p in parts])
    # np.unique's return_index gives each timestamp's first occurrence: the preferred part's.
    uts, idx = np.unique(ts, return_index=True)
    return labels, uts, vs[idx]
