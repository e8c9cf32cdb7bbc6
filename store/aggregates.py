"""Downsampling arithmetic: per-interval aggregates of raw samples or of finer aggregates.

The functions take and return arrays and do no I/O; the compactor's
``Downsampler`` uses them to write downsampled blocks (format version 2,
``store/docs/format/block.md``) and the querier to join counters across
blocks. Rules:

* An interval is ``((k - 1) * resolution, k * resolution]``, aligned to the
  Unix epoch and right-closed like PromQL's windows ``(t - range, t]``
  (``store.block.interval_of``), so a query window ending on an interval
  boundary covers whole intervals; a row exists for every interval holding at
  least one sample, at the timestamp of the interval's last sample (Thanos'
  rule; Thanos' intervals are left-closed).
* ``count``, ``sum``, ``min`` and ``max`` are those of the interval's samples;
  NaN samples (stale markers included) are left out.
* ``start_t``/``start_counter`` are the timestamp of the interval's first sample
  and the counter there, so a rate over a single interval has two points.
* ``counter`` reads the series as a counter: it starts at the block's first
  value and adds every increase since, a decrease counting as a reset to zero
  (Prometheus' ``increase`` arithmetic), so it never decreases and equals the
  raw value wherever the series had no reset.
* Across blocks, ``join_counters`` continues a counter using each block's first
  and last raw value (``first_v``/``last_v``), as Thanos' counter series
  iterator does across chunks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from store.block import Aggregates, interval_of

RES_5M = 300_000  # the downsampled resolutions (ms): 5 minutes and 1 hour
RES_1H = 3_600_000


def reset_adjusted(values: np.ndarray) -> np.ndarray:
    """Counter values made monotonic: after a decrease (a reset) every later value is raised by
    the value before it, so increases add up as Prometheus' ``increase`` counts them.

    Exact for series without resets (the values themselves).
    """
    vs = np.asarray(values, dtype=np.float64)
    if len(vs) < 2:
        return vs.copy()
    drops = np.where(vs[1:] < vs[:-1], vs[:-1], 0.0)
    return vs + np.concatenate(([0.0], np.cumsum(drops)))


def _intervals(ts: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last row of every run of ``ts`` in one aligned interval of ``resolution``."""
    k = interval_of(ts, resolution)
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    ends = np.concatenate((starts[1:], [len(ts)])) - 1
    return starts, ends


def _aggregate(ts: np.ndarray, count: np.ndarray, sum_: np.ndarray, min_: np.ndarray, max_: np.ndarray,
               counter: np.ndarray, resolution: int, first_t: int, first_v: float, last_v: float,
               start_t: np.ndarray, start_counter: np.ndarray) -> Aggregates:
    starts, ends = _intervals(ts, resolution)
    with np.errstate(invalid="ignore"):  # inf - inf in a sum is NaN, as in raw sum_over_time
        sums = np.add.reduceat(sum_, starts)
    return Aggregates(ts[ends], np.add.reduceat(count, starts), sums, np.minimum.reduceat(min_, starts),
                      np.maximum.reduceat(max_, starts), counter[ends], first_t, first_v, last_v,
                      start_t[starts], start_counter[starts])


def downsample_raw(ts: np.ndarray, vs: np.ndarray, resolution: int) -> Aggregates | None:
    """Aggregates of raw samples per aligned interval of ``resolution`` ms (None if all are NaN).

    ``counter`` starts at the first sample's value and adds every increase since
    (``reset_adjusted``), so it equals the raw value wherever the series had no reset.
    """
    ts = np.asarray(ts, dtype=np.int64)
    vs = np.asarray(vs, dtype=np.float64)
    keep = ~np.isnan(vs)
    if not keep.all():
        ts, vs = ts[keep], vs[keep]
    if not len(ts):
        return None
    counter = reset_adjusted(vs)
    return _aggregate(ts, np.ones(len(ts), dtype=np.int64), vs, vs, vs, counter, resolution,
                      int(ts[0]), float(vs[0]), float(vs[-1]), ts, counter)


def counter_offsets(pieces: Sequence[Aggregates]) -> list[float]:
    """What ``join_counters`` adds to each piece's counter."""
    out: list[float] = []
    offset = 0.0
    prev: Aggregates | None = None
    for p in pieces:
        if prev is not None and len(prev.t):
            offset += float(prev.counter[-1]) - prev.last_v  # resets inside the previous piece
            if p.first_v < prev.last_v:
                offset += prev.last_v  # a reset between the pieces
        out.append(offset)
        prev = p
    return out


def join_counters(pieces: Sequence[Aggregates]) -> list[np.ndarray]:
    """The ``counter`` of consecutive pieces of one series made one continuous reset-adjusted counter.

    Each piece is a whole block's aggregates in time order (its counter starts at its
    ``first_v``): piece ``i`` is raised by what the pieces before it added through resets,
    and by their last value again if its first sample is below the previous piece's last
    (a reset between blocks). Returns the joined counter of every piece; the first piece's
    is unchanged.
    """
    return [p.counter + off if off else p.counter for p, off in zip(pieces, counter_offsets(pieces))]


def trim_overlaps(pieces: Sequence[Aggregates]) -> list[Aggregates]:
    """Pieces sorted by first sample; rows at or before an earlier piece's last row dropped."""
    out: list[Aggregates] = []
    last = None
    for p in sorted(pieces, key=lambda p: (p.first_t, int(p.t[0]) if len(p.t) else 0)):
        if last is not None and len(p.t) and p.t[0] <= last:
            i = int(np.searchsorted(p.t, last, "right"))
            if i == len(p.t):
                continue
            p = p.rows(i, len(p.t))
        if len(p.t):
            out.append(p)
            last = int(p.t[-1])
    return out


def downsample_aggregates(pieces: Sequence[Aggregates], resolution: int) -> Aggregates | None:
    """Aggregates of a finer resolution (one series' blocks, whole) re-aggregated to ``resolution``.

    Counts and sums add up, minima and maxima fold, the counter is joined across the
    pieces (``join_counters``) and taken at each interval's last row; each interval's
    timestamp stays that of its last raw sample.
    """
    pieces = trim_overlaps(pieces)
    if not pieces:
        return None
    offsets = counter_offsets(pieces)
    cat = lambda name: np.concatenate([getattr(p, name) for p in pieces])  # noqa: E731
    counter = np.concatenate([p.counter + off for p, off in zip(pieces, offsets)])
    start_t = np.concatenate([p.starts()[0] for p in pieces])
    start_counter = np.concatenate([p.starts()[1] + off for p, off in zip(pieces, offsets)])
    return _aggregate(cat("t"), cat("count"), cat("sum"), cat("min"), cat("max"), counter,
                      resolution, pieces[0].first_t, pieces[0].first_v, pieces[-1].last_v, start_t, start_counter)
