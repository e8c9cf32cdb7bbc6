"""Retention: mark blocks past their resolution's retention, delete marked blocks after a delay.

One run (``apply_retention``, or ``RetentionKeeper.run`` for a long-lived
compactor) does, in this order, what Thanos' compactor does in
``ApplyRetentionPolicyByResolution``, ``BlocksCleaner`` and
``BestEffortCleanAbortedPartialUploads``:

1. Mark: every complete block whose ``maxTime <= now - retention`` for its
   resolution gets a ``deletion-mark.json`` (``store/docs/format/deletion-mark.md``).
   A resolution without a retention is kept forever. Blocks whose
   ``meta.json`` cannot be read are never touched (their time range is unknown).
2. Delete: a block whose mark is at least ``delete_delay`` old is deleted
   (``store.catalog.delete_block``: ``meta.json`` first, the mark last) if it is
   past retention, or if its data is held by another complete block (the
   compactor marks the sources of a merged block). A marked block that is
   neither is kept and reported: nothing that is not past retention is deleted
   on the strength of a mark alone.
3. Clean: block directories without ``meta.json`` (aborted uploads, interrupted
   deletions) with no activity for ``partial_age`` are deleted.

Every step is idempotent and safe to interrupt: a valid mark is never
rewritten (so re-running never postpones a deletion), deletions skip objects
already gone, and the next run finishes what a killed one started. A dry run
reads the bucket and reports what a real run at the same ``now`` would mark
and delete, and changes nothing (not even metrics).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge

from store.aggregates import RES_1H, RES_5M
from store.block import META_FILE
from store.bucket import DIR_DELIM, Bucket
from store.catalog import BlockCatalog, DeletionMark, PartialBlock, delete_block, mark_for_deletion
from store.errors import BucketError, CorruptDeletionMark, UnsupportedDeletionMarkVersion

RESOLUTION_RAW = 0
RESOLUTION_5M = RES_5M
RESOLUTION_1H = RES_1H

# Thanos' PartialUploadThresholdAge: an upload silent for this long is taken as aborted.
DEFAULT_PARTIAL_AGE_S = 2 * 24 * 3600
DEFAULT_DELETE_DELAY_S = 48 * 3600

_log = logging.getLogger("compactor.retention")


class BlockAction(NamedTuple):
    """A block retention marked, deleted or kept, with the reason in words."""

    ulid: str
    resolution: int
    min_time: int
    max_time: int
    reason: str


class Problem(NamedTuple):
    """A block retention could not handle; the run went on with the others."""

    ulid: str
    message: str


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one run did (or, in a dry run, would do).

    ``marked``: blocks that got a deletion mark. ``deleted``: blocks deleted.
    ``pending``: marked blocks whose delay has not passed yet. ``kept``: marked
    blocks not deleted because they are neither past retention nor held by
    another block. ``partial_deleted``: block directories without meta.json
    removed. ``errors``: blocks that could not be handled (an unreadable
    meta.json or deletion mark, a bucket failure on that block).
    """

    now_ms: int
    dry_run: bool
    marked: tuple[BlockAction, ...] = ()
    deleted: tuple[BlockAction, ...] = ()
    pending: tuple[BlockAction, ...] = ()
    kept: tuple[BlockAction, ...] = ()
    partial_deleted: tuple[PartialBlock, ...] = ()
    errors: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


class RetentionMetrics:
    """The retention metrics, registered once per registry (create one per process/registry).

    ``flashback_retention_blocks_marked_total{resolution}``,
    ``flashback_retention_blocks_deleted_total{resolution}``,
    ``flashback_retention_partial_blocks_deleted_total``,
    ``flashback_retention_block_errors_total``,
    ``flashback_retention_runs_total``, ``flashback_retention_run_failures_total`` (a run
    that raised or had block errors), ``flashback_retention_blocks_pending_deletion``
    (marked blocks waiting for their delay after the last run) and
    ``flashback_retention_last_success_timestamp_seconds``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.marked = Counter("flashback_retention_blocks_marked", "Blocks marked for deletion by retention.",
                              ["resolution"], registry=registry)
        self.deleted = Counter("flashback_retention_blocks_deleted", "Marked blocks deleted.",
                               ["resolution"], registry=registry)
        self.partial_deleted = Counter("flashback_retention_partial_blocks_deleted",
                                       "Block directories without meta.json deleted.", registry=registry)
        self.block_errors = Counter("flashback_retention_block_errors",
                                    "Blocks a retention run could not handle.", registry=registry)
        self.runs = Counter("flashback_retention_runs", "Retention runs (not dry runs).", registry=registry)
        self.failures = Counter("flashback_retention_run_failures",
                                "Retention runs that raised or could not handle some block.", registry=registry)
        self.pending = Gauge("flashback_retention_blocks_pending_deletion",
                             "Marked blocks waiting for the deletion delay, as of the last run.", registry=registry)
        self.last_success = Gauge("flashback_retention_last_success_timestamp_seconds",
                                  "When the last retention run without errors finished.", registry=registry)
        for r in (RESOLUTION_RAW, RESOLUTION_5M, RESOLUTION_1H):
            self.marked.labels(str(r))
            self.deleted.labels(str(r))


@dataclass(frozen=True, slots=True)
class RetentionOptions:
    """Validated settings of retention.

    ``retention_ms_by_resolution`` maps a resolution (0 raw, 300000 5m,
    3600000 1h) to how long its blocks are kept after their ``maxTime``; a
    resolution not in it is kept forever. ``delete_delay_s`` is how long a
    marked block stays before deletion; ``partial_age_s`` how long a block
    directory without meta.json must be inactive before it is deleted (None:
    never).
    """

    retention_ms_by_resolution: Mapping[int, int] = field(default_factory=dict)
    delete_delay_s: float = DEFAULT_DELETE_DELAY_S
    partial_age_s: float | None = DEFAULT_PARTIAL_AGE_S

    def __post_init__(self) -> None:
        for res, ret in self.retention_ms_by_resolution.items():
            if isinstance(res, bool) or not isinstance(res, int) or res < 0:
                raise ValueError(f"resolution must be a non-negative integer (ms), got {res!r}")
            if isinstance(ret, bool) or not isinstance(ret, int) or ret <= 0:
                raise ValueError(f"retention of resolution {res} must be a positive number of ms, got {ret!r} "
                                 "(leave a resolution out to keep it forever)")
        if self.delete_delay_s < 0:
            raise ValueError(f"delete delay must not be negative, got {self.delete_delay_s}")
        if self.partial_age_s is not None and self.partial_age_s <= 0:
            raise ValueError(f"partial block age must be positive (or None: never), got {self.partial_age_s}")
        object.__setattr__(self, "retention_ms_by_resolution", dict(self.retention_ms_by_resolution))


class RetentionKeeper:
    """Applies retention to one bucket (Thanos' RetentionKeeper and Cleaner in one).

    Not thread-safe: run one ``run`` at a time per keeper. Several keepers (or
    processes) on one bucket are safe, if wasteful: every step is idempotent.
    """

    def __init__(self, bucket: Bucket, options: RetentionOptions, *, metrics: RetentionMetrics | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._bucket = bucket
        self._opts = options
        self._metrics = metrics
        self._log = logger or _log

    def run(self, now_ms: int, dry_run: bool = False) -> RetentionReport:
        """One retention run at time ``now_ms``; see the module docstring.

        Raises:
            BucketError: listing the bucket failed; nothing was changed. Failures on a
                single block are reported in ``RetentionReport.errors`` instead.
        """
        metrics = None if dry_run else self._metrics
        try:
            report = self._run(now_ms, dry_run)
        except BaseException:
            if metrics:
                metrics.runs.inc()
                metrics.failures.inc()
            raise
        if metrics:
            metrics.runs.inc()
            for a in report.marked:
                metrics.marked.labels(str(a.resolution)).inc()
            for a in report.deleted:
                metrics.deleted.labels(str(a.resolution)).inc()
            metrics.partial_deleted.inc(len(report.partial_deleted))
            metrics.block_errors.inc(len(report.errors))
            metrics.pending.set(len(report.pending))
            if report.ok:
                metrics.last_success.set(time.time())
            else:
                metrics.failures.inc()
        self._log.info("retention run finished", extra={
            "dry_run": dry_run, "marked": len(report.marked), "deleted": len(report.deleted),
            "pending": len(report.pending), "kept": len(report.kept),
            "partial_deleted": len(report.partial_deleted), "errors": len(report.errors)})
        return report

    def _run(self, now_ms: int, dry_run: bool) -> RetentionReport:
        catalog = BlockCatalog(self._bucket, now=lambda: now_ms)
        catalog.refresh()
        now_s = now_ms // 1000
        marked: list[BlockAction] = []
        deleted: list[BlockAction] = []
        pending: list[BlockAction] = []
        kept: list[BlockAction] = []
        errors: list[Problem] = []

        for ulid, err in sorted(catalog.errors.items()):
            self._log.warning("block skipped: meta.json unreadable", extra={"block": ulid, "err": str(err)})
            errors.append(Problem(ulid, f"meta.json unreadable, block left alone: {err}"))

        # Hidden blocks first: deleting a block that hides others before them would make them
        # visible again until their own deletion.
        for b in sorted(catalog.all_blocks(), key=lambda b: (b.hidden_by is None, b.meta.min_time, b.ulid)):
            m = b.meta
            retention = self._opts.retention_ms_by_resolution.get(m.resolution)
            expired = retention is not None and m.max_time <= now_ms - retention
            ctx = {"block": m.ulid, "resolution": m.resolution, "mint": m.min_time, "maxt": m.max_time,
                   "dry_run": dry_run}

            def action(reason: str) -> BlockAction:
                return BlockAction(m.ulid, m.resolution, m.min_time, m.max_time, reason)

            mark = b.deletion_mark
            if isinstance(b.mark_error, UnsupportedDeletionMarkVersion):
                self._log.warning("block skipped: deletion mark of unknown version", extra={**ctx, "err": str(b.mark_error)})
                errors.append(Problem(m.ulid, f"deletion mark unreadable, block left alone: {b.mark_error}"))
                continue
            if expired and mark is None:
                reason = (f"past retention: maxTime {rfc3339(m.max_time)} is more than {format_duration(retention)} "
                          f"before {rfc3339(now_ms)}")
                if isinstance(b.mark_error, CorruptDeletionMark):
                    reason += " (replaced a corrupt deletion mark)"
                if dry_run:
                    mark = DeletionMark(id=m.ulid, deletion_time=now_s, details=reason)
                else:
                    try:
                        mark, _ = mark_for_deletion(self._bucket, m.ulid, reason, now_s)
                    except (BucketError, UnsupportedDeletionMarkVersion) as err:
                        self._log.error("marking block for deletion", extra={**ctx, "err": str(err)})
                        errors.append(Problem(m.ulid, f"marking for deletion: {err}"))
                        continue
                self._log.info("block marked for deletion", extra={**ctx, "reason": reason})
                marked.append(action(reason))
            elif b.mark_error is not None:
                # A corrupt mark on a block that is not past retention: we cannot tell when (or by
                # whom) it was marked, so it is neither deleted nor re-marked.
                self._log.warning("block kept: corrupt deletion mark", extra={**ctx, "err": str(b.mark_error)})
                errors.append(Problem(m.ulid, f"corrupt deletion mark on a block not past retention, "
                                              f"block left alone: {b.mark_error}"))
                continue
            if mark is None:
                continue
            due_ms = (mark.deletion_time + self._opts.delete_delay_s) * 1000
            if now_ms < due_ms:
                pending.append(action(f"marked {rfc3339(mark.deletion_time * 1000)}, deletable from {rfc3339(int(due_ms))}"))
                continue
            if expired:
                why = "past retention"
            elif b.hidden_by is not None:
                why = f"marked; its data is in block {b.hidden_by}"
            else:
                self._log.warning("marked block kept: neither past retention nor held by another block",
                                  extra={**ctx, "details": mark.details})
                kept.append(action(f"marked ({mark.details or 'no reason given'}) but neither past retention "
                                   "nor held by another block: remove the mark or delete the block by hand"))
                continue
            if not dry_run:
                try:
                    delete_block(self._bucket, m.ulid)
                except BucketError as err:
                    self._log.error("deleting block", extra={**ctx, "err": str(err)})
                    errors.append(Problem(m.ulid, f"deleting: {err} (the next run continues)"))
                    continue
            self._log.info("block deleted", extra={**ctx, "reason": why})
            deleted.append(action(why))

        partial_deleted: list[PartialBlock] = []
        if self._opts.partial_age_s is not None:
            try:
                partials = catalog.partial_blocks(self._opts.partial_age_s)
            except BucketError as err:
                self._log.error("listing partial blocks", extra={"err": str(err)})
                errors.append(Problem("-", f"listing partial blocks: {err}"))
                partials = []
            for p in partials:
                ctx = {"block": p.ulid, "objects": len(p.objects), "last_activity": rfc3339(p.last_activity_ms),
                       "dry_run": dry_run}
                if not dry_run:
                    try:
                        # A last check: an upload may have completed since the listing.
                        if self._bucket.exists(p.ulid + DIR_DELIM + META_FILE):
                            continue
                        delete_block(self._bucket, p.ulid)
                    except BucketError as err:
                        self._log.error("deleting partial block", extra={**ctx, "err": str(err)})
                        errors.append(Problem(p.ulid, f"deleting partial block: {err}"))
                        continue
                self._log.info("partial block deleted", extra=ctx)
                partial_deleted.append(p)

        return RetentionReport(now_ms=now_ms, dry_run=dry_run, marked=tuple(marked), deleted=tuple(deleted),
                               pending=tuple(pending), kept=tuple(kept), partial_deleted=tuple(partial_deleted),
                               errors=tuple(errors))


def apply_retention(bucket: Bucket, retention_ms_by_resolution: Mapping[int, int], delete_delay_s: float,
                    now_ms: int, dry_run: bool = False, *, partial_age_s: float | None = DEFAULT_PARTIAL_AGE_S,
                    metrics: RetentionMetrics | None = None,
                    logger: logging.Logger | None = None) -> RetentionReport:
    """One retention run over ``bucket`` at ``now_ms``; see the module docstring.

    Args:
        bucket: the bucket.
        retention_ms_by_resolution: resolution (ms, 0 raw) -> retention (ms); missing: kept forever.
        delete_delay_s: how long a marked block stays before it is deleted.
        now_ms: the current time, ms since the Unix epoch.
        dry_run: change nothing; report what would be done.
        partial_age_s: inactivity after which a block directory without meta.json is deleted;
            None: never.
        metrics: where to count (``RetentionMetrics(registry)``, created once per registry).
        logger: default ``compactor.retention``.

    Raises:
        ValueError: invalid settings.
        BucketError: listing the bucket failed; nothing was changed.
    """
    options = RetentionOptions(dict(retention_ms_by_resolution), delete_delay_s, partial_age_s)
    return RetentionKeeper(bucket, options, metrics=metrics, logger=logger).run(now_ms, dry_run)


def rfc3339(ms: int) -> str:
    """``ms`` since the Unix epoch as RFC 3339 UTC (``2024-01-02T03:04:05Z``, ms if not whole seconds)."""
    try:
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
    except (OverflowError, OSError, ValueError):
        return f"{ms}ms"
    return base + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


def format_duration(ms: int) -> str:
    """A duration in ms in Prometheus' units, without weeks (``28h`` is ``1d4h``; ``30d``, ``1y``, ``1s500ms``)."""
    if ms <= 0:
        return "0s" if ms == 0 else "-" + format_duration(-ms)
    out = ""
    rest = ms
    for unit, size in (("y", 365 * 86_400_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000),
                       ("s", 1000), ("ms", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out
