"""Downsampling: raw blocks become 5m blocks, long 5m ranges become 1h blocks.

A downsampled block (format version 2, ``store/docs/format/block.md``) holds,
per series and per aligned interval of its resolution that has samples, the
samples' ``count``, ``sum``, ``min``, ``max`` and ``counter`` (the value read
as a counter, reset-adjusted), at the timestamp of the interval's last sample
(Thanos' rule), and the first sample's timestamp and counter. Intervals are
right-closed, ``((k - 1) * R, k * R]``. NaN samples, stale markers included,
are not aggregated.

The aggregation arithmetic is ``store/aggregates.py`` (no I/O, shared with the
querier, which joins counters across blocks); the ``Downsampler`` here reads
blocks and writes blocks.

State
-----
As the compactor, the downsampler keeps no state: it derives what to do from
the complete blocks of its external labels in the bucket, comparing
``compaction.sources`` (the level-1 raw blocks whose data a block holds; a
downsampled block records those of the raw data it was made from):

1. **garbage**: a downsampled block hidden by another unmarked block of its
   resolution (its sources a subset of the other's; ``store.catalog``) is
   marked for deletion once the other block is verified (a corrupt other
   block is deleted instead: the hidden one holds its data).
2. **5m**: every live raw block whose sources are not all among the sources of
   5m blocks becomes a 5m block with the same time range, level and sources.
   So each closed window gets its 5m block as soon as its level-1 raw block is
   uploaded (a 7-day backfill gets 5m data for every closed window at once,
   without waiting for Thanos' 40 h of raw range), and a raw block merged later
   from windows already downsampled is not downsampled again.
3. **1h**: every live raw block spanning at least ``min_span_1h_ms`` (default
   7 days: the second compaction level) whose sources are all among those of
   5m blocks but not all among those of 1h blocks becomes a 1h block, computed
   from those 5m blocks (not from raw data), with the raw block's time range,
   level and sources.

Every block written is uploaded ``meta.json`` last and verified
(``verify_block``) before the pass goes on; a block that fails verification is
deleted at once and the error raised. A crash at any point leaves either an
incomplete block (no ``meta.json``: invisible, cleaned up by retention) or a
complete one that the next pass counts as done; two downsamplers racing make
blocks with equal sources, of which readers use one and the next pass marks
the other. Retention per resolution is ``compactor/retention.py``'s; since a
1h block is made when its raw second-level block exists, a raw retention
shorter than that level's range (7 days by default) leaves no 1h blocks (as
Thanos needs raw data kept for its downsampling ranges). The downsampler runs
inside the compactor's pass (``Compactor(downsampler=...)``), right after new
windows are persisted and again at the end.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter

from compactor.compactor import _merged_series, _series_groups, _sources
from compactor.verify import BlockVerifier
from store import ulid as ulids
from store.aggregates import RES_1H, RES_5M, downsample_aggregates, downsample_raw
from store.block import (
    AggregateData, Aggregates, AggregateSeries, BlockMeta, BlockReader, write_aggregate_block,
)
from store.bucket import Bucket
from store.catalog import BlockCatalog, CatalogBlock, delete_block, mark_for_deletion
from store.errors import CorruptBlock
from store.labels import Labels
from store.storage import SelectHints

DEFAULT_MIN_SPAN_1H_MS = 7 * 24 * 3_600_000


def _wall_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# The downsampler


@dataclass(slots=True)
class DownsampleResult:
    """What one pass wrote and marked."""

    written: list[BlockMeta] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)


class Downsampler:
    """Makes 5m and 1h blocks of one set of external labels (see the module docstring).

    Thread-safety: one pass at a time (the compactor runs it as the last step of its pass).
    The bucket belongs to the caller.
    """

    def __init__(self, bucket: Bucket, *, external_labels: Mapping[str, str] | None = None,
                 min_span_1h_ms: int | None = DEFAULT_MIN_SPAN_1H_MS, registry: CollectorRegistry | None = None,
                 now: Callable[[], int] = _wall_ms, logger: logging.Logger | None = None,
                 tmp_dir: str | None = None, rows_per_group: int | None = None) -> None:
        """Args:
            bucket: where raw blocks are read and downsampled blocks go.
            external_labels: labels of the blocks this downsampler reads and writes (a shard).
            min_span_1h_ms: raw blocks spanning at least this long get a 1h block; None: no 1h blocks.
            registry: where the ``flashback_downsampler_*`` metrics go (default: a private one).
            now: the clock, ms since the epoch (new ULIDs, deletion marks).
            logger: default ``logging.getLogger("compactor.downsample")``.
            tmp_dir: directory for block files being written or verified.
            rows_per_group: data file row group size (default: the block format's).
        """
        if min_span_1h_ms is not None and min_span_1h_ms <= 0:
            raise ValueError(f"min_span_1h_ms must be positive, got {min_span_1h_ms}")
        self._bucket = bucket
        self._labels = Labels.from_dict(external_labels or {})
        self._min_span_1h = min_span_1h_ms
        self._now = now
        self._log = logger or logging.getLogger(__name__)
        self._tmp_dir = tmp_dir
        self._write_opts = {} if rows_per_group is None else {"rows_per_group": rows_per_group}
        self._catalog = BlockCatalog(bucket, now=now)
        registry = registry if registry is not None else CollectorRegistry()
        self._m_written = Counter("flashback_downsampler_blocks_written",
                                  "Downsampled blocks uploaded and verified, by resolution (ms).", ["resolution"],
                                  registry=registry)
        self._m_rows = Counter("flashback_downsampler_rows_written",
                               "Aggregate rows written into downsampled blocks.", registry=registry)
        self._m_marked = Counter("flashback_downsampler_blocks_marked_for_deletion",
                                 "Downsampled blocks marked for deletion because another block holds their data.",
                                 registry=registry)
        self._m_verify_failures = Counter("flashback_downsampler_verify_failures",
                                          "Downsampled blocks that failed verification.", registry=registry)
        for res in (RES_5M, RES_1H):
            self._m_written.labels(str(res))
        self._verifier = BlockVerifier(bucket, self._m_verify_failures, tmp_dir=tmp_dir)

    def _ours(self) -> list[CatalogBlock]:
        self._catalog.refresh()
        return [b for b in self._catalog.all_blocks() if b.meta.labels == self._labels]

    def run_once(self) -> DownsampleResult:
        """One pass: mark redundant downsampled blocks, then make missing 5m and 1h blocks.

        Raises:
            BucketError, BlockError: a step failed; blocks written so far are complete and
                verified, the next pass continues from the bucket's state.
        """
        result = DownsampleResult()
        blocks = self._ours()
        if self._collect_garbage(result, blocks):
            blocks = self._ours()  # a block was deleted
        live_raw = [b.meta for b in blocks if b.meta.resolution == 0 and b.hidden_by is None]
        covered5 = set().union(*(_sources(b.meta) for b in blocks if b.meta.resolution == RES_5M))
        for m in sorted(live_raw, key=lambda m: (m.min_time, m.ulid)):
            if _sources(m) <= covered5:
                continue
            meta = self._downsample_raw(m)
            if meta is not None:
                result.written.append(meta)
            covered5 |= _sources(m)
        if result.written:
            blocks = self._ours()  # the 5m blocks just written feed the 1h step
        covered1h = set().union(*(_sources(b.meta) for b in blocks if b.meta.resolution == RES_1H))
        fives = [b.meta for b in blocks if b.meta.resolution == RES_5M and b.hidden_by is None]
        for m in sorted(live_raw, key=lambda m: (m.min_time, m.ulid)):
            src = _sources(m)
            if (self._min_span_1h is None or m.max_time - m.min_time < self._min_span_1h or src <= covered1h
                    or not src <= covered5):
                continue
            inputs = [f for f in fives if _sources(f) <= src and f.min_time < m.max_time and f.max_time > m.min_time]
            meta = self._downsample_5m(m, inputs)
            if meta is not None:
                result.written.append(meta)
            covered1h |= src
        return result

    # -- steps ----------------------------------------------------------------------------------

    def _collect_garbage(self, result: DownsampleResult, listed: list[CatalogBlock]) -> bool:
        """Marks downsampled blocks another one holds; returns whether a block was deleted."""
        blocks = {b.ulid: b for b in listed}
        for b in blocks.values():
            if b.meta.resolution == 0 or b.hidden_by is None or b.marked:
                continue
            container = blocks.get(b.hidden_by)
            if container is None or container.marked:
                continue
            try:
                self._verifier.verify(container.meta)
            except CorruptBlock:
                # Its data is in the block it hides (or in raw blocks, to downsample again):
                # deleting it shows the hidden block to readers and lets the next pass redo it.
                self._log.error("corrupt downsampled block hides a sound one: deleting it", exc_info=True,
                                extra={"block": container.ulid, "hidden": b.ulid})
                delete_block(self._bucket, container.ulid)
                return True
            _, uploaded = mark_for_deletion(self._bucket, b.ulid, f"its data is in block {container.ulid}",
                                            self._now() // 1000)
            if uploaded:
                self._m_marked.inc()
                result.marked.append(b.ulid)
                self._log.info("downsampled block marked for deletion",
                               extra={"block": b.ulid, "reason": f"contained in {container.ulid}"})
        return False

    def _downsample_raw(self, raw: BlockMeta) -> BlockMeta | None:
        reader = BlockReader(self._bucket, raw.ulid, meta=raw)

        def series() -> Iterator[AggregateData]:
            for labels, ts, vs in _merged_series([reader], raw.min_time, raw.max_time - 1):
                agg = downsample_raw(ts, vs, RES_5M)
                if agg is not None:
                    yield labels, agg

        return self._write(series(), raw, RES_5M, [raw.ulid])

    def _downsample_5m(self, raw: BlockMeta, inputs: list[BlockMeta]) -> BlockMeta | None:
        readers = [BlockReader(self._bucket, m.ulid, meta=m) for m in sorted(inputs, key=lambda m: m.min_time)]

        def series() -> Iterator[AggregateData]:
            for labels, pieces in _merged_aggregates(readers, raw.min_time, raw.max_time - 1):
                agg = downsample_aggregates(pieces, RES_1H)
                if agg is not None:
                    yield labels, agg

        return self._write(series(), raw, RES_1H, [m.ulid for m in inputs])

    def _write(self, series: Iterator[AggregateData], raw: BlockMeta, resolution: int,
               inputs: list[str]) -> BlockMeta | None:
        first = next(series, None)
        if first is None:
            return None

        def chained() -> Iterator[AggregateData]:
            yield first
            yield from series

        block = ulids.new(self._now())
        meta = write_aggregate_block(self._bucket, chained(), resolution=resolution, min_time=raw.min_time,
                                     max_time=raw.max_time, level=raw.level, sources=sorted(_sources(raw)),
                                     external_labels=dict(self._labels), ulid=block, now=self._now,
                                     tmp_dir=self._tmp_dir, **self._write_opts)
        self._verifier.verify_written(meta, self._log, "downsampled block")
        self._m_written.labels(str(resolution)).inc()
        self._m_rows.inc(meta.num_samples)
        self._log.info("block downsampled", extra={"block": meta.ulid, "resolution": resolution,
                                                   "mint": meta.min_time, "maxt": meta.max_time,
                                                   "inputs": inputs, "series": meta.num_series,
                                                   "rows": meta.num_samples})
        return meta


def _merged_aggregates(readers: Sequence[BlockReader], mint: int,
                       maxt: int) -> Iterator[tuple[Labels, list[Aggregates]]]:
    """Every series of the downsampled ``readers``, in label order, with its aggregates per block."""
    hints = SelectHints(mint, maxt)
    for matchers in _series_groups(readers, mint, maxt):
        selections = [r.select(matchers, mint, maxt, hints) for r in readers]
        merged = heapq.merge(*([(s.labels, i, s) for s in sel] for i, sel in enumerate(selections)),
                             key=lambda x: (x[0], x[1]))
        current: Labels | None = None
        pieces: list[Aggregates] = []
        for labels, _i, s in merged:
            if current is not None and labels != current:
                yield current, pieces
                pieces = []
            current = labels
            assert isinstance(s, AggregateSeries)
            pieces.append(s.aggregates)
        if current is not None:
            yield current, pieces
