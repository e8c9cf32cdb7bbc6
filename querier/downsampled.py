"""Reading downsampled data: which resolution answers a selection, and what it reads.

Resolution choice (Thanos' ``max_source_resolution`` and auto-downsampling):

* The request sets the coarsest resolution it accepts: ``max_source_resolution``
  = ``raw`` (or ``0s``), ``5m``, ``1h`` (any duration, as Thanos) or ``auto``
  (default). ``auto`` is at most a fifth of the evaluation step (Thanos' rule:
  at least five raw samples' worth of step per downsampled point), raw for
  instant queries, and unlike Thanos it reads downsampled data only where the
  answer stays within the tight tolerances (``_auto_resolution``): rates and
  ``*_over_time`` over windows of whole intervals; plain selectors, ``irate``,
  other functions and windows cutting intervals read raw. An explicit
  resolution accepts Thanos' approximations:
* For ``rate``/``increase``/``irate`` a resolution may equal the range; for
  ``count|sum|avg|min|max_over_time`` too when the windows are made of whole
  intervals (``aligned``), else at most half the range; other functions read
  interval averages and need at least two intervals per window, and a plain
  selector (no range) reads at most 5m, the default lookback.
* Per time range the coarsest live downsampled block at or below that
  resolution answers; ranges no such block covers read raw data (head and raw
  blocks) as before. A query without downsampled blocks takes the raw path
  unchanged.

What a downsampled selection returns depends on the function applied to it
(``SelectHints.func``), so that the engine's own functions give answers close
to raw ones (tolerances in ``store/docs/format/block.md``):

* ``rate``, ``increase``, ``irate``: the counter aggregate, one reset-adjusted
  counter continued across blocks and raw ranges (``store.aggregates``), at
  each interval's first and last sample: two points per interval, so a rate
  over a window of one interval works (Thanos' one point per interval gives
  none) and, when windows are made of whole intervals (range, step and first
  evaluation time multiples of the resolution, as with Grafana's aligned
  steps), matches raw. When windows cut intervals, a point at each window's
  first and last millisecond is added, interpolated linearly between those.
  Raw ranges and finer blocks in the same selection are aggregated on the fly
  to the selection's coarsest resolution, so points are evenly spaced.
* ``max_over_time``/``min_over_time``/``sum_over_time``: the max/min/sum
  aggregate.
* ``count_over_time`` and ``avg_over_time``: the count (and sum) aggregate
  with the counts as ``weights``: the engine sums counts, and divides summed
  sums by summed counts, where Thanos counts points and averages averages.
* anything else, plain selectors included: the interval average
  ``sum / count`` (Thanos' default).

Raw points in such a selection count as one sample each. Only the query API
asks for downsampled data (``TieredQuerier.max_source_resolution`` is raw
otherwise), since these views are shaped for our engine: remote read returns
raw samples to the other engine. Which downsampled
resolutions answered is added to ``SelectHints.notes``; the API reports them
as ``infos``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from querier.values import is_stale
from store.aggregates import RES_1H, RES_5M, counter_offsets, downsample_aggregates, downsample_raw, trim_overlaps
from store.block import Aggregates, BlockReader
from store.labels import Labels
from store.storage import ArraySeries, SelectHints

RESOLUTIONS = (0, RES_5M, RES_1H)
MIN_RESOLUTION = RES_5M  # below it a selection reads raw data without looking at downsampled blocks
NAMES = {0: "raw", RES_5M: "5m", RES_1H: "1h"}
PLAIN_MAX_RESOLUTION = RES_5M
COUNTER_FUNCS = frozenset(("rate", "increase", "irate"))
WEIGHTED_FUNCS = frozenset(("count_over_time", "avg_over_time"))
# Functions answered exactly (or, for counters, from two points) by a window of one whole interval.
WHOLE_INTERVAL_FUNCS = COUNTER_FUNCS | WEIGHTED_FUNCS | {"max_over_time", "min_over_time", "sum_over_time"}


def parse_max_source_resolution(value: str, duration: Callable[[str], int]) -> int | None:
    """Thanos' ``max_source_resolution``: ``auto`` (or empty) is None; ``raw`` 0; otherwise a
    non-negative duration (``0s``, ``5m``, ``1h``, ``10m``, or seconds as Thanos' query
    frontend sends them, ``300``) parsed by ``duration`` into ms.

    Raises:
        ValueError: anything else.
    """
    v = value.strip()
    if v in ("", "auto"):
        return None
    if v == "raw":
        return 0
    try:
        ms = duration(v)
    except ValueError:
        raise ValueError(f"cannot parse {value!r}: expected auto, raw or a duration such as 0s, 5m or 1h") from None
    if ms < 0:
        raise ValueError(f"{value!r} is negative")
    return ms


def aligned(hints: SelectHints, resolution: int) -> bool:
    """Whether every window ``(t - range, t]`` of the selection's evaluation starts and ends on
    interval boundaries of ``resolution``: the range and the step are multiples of it, and so is
    the first evaluation time (``hints.start + range - 1``, as the engine selects)."""
    if hints.range <= 0 or hints.range % resolution:
        return False
    if hints.step > 0:
        return hints.step % resolution == 0 and (hints.start + hints.range - 1) % resolution == 0
    return hints.end % resolution == 0


AUTO_FUNCS = frozenset(("rate", "increase")) | WEIGHTED_FUNCS | {"max_over_time", "min_over_time", "sum_over_time"}


def max_resolution(hints: SelectHints | None, requested: int | None) -> int:
    """The coarsest resolution (ms) a selection with ``hints`` may read; 0 for raw only."""
    if hints is None:
        return 0
    if requested is None:
        return _auto_resolution(hints)
    res = requested
    if res <= 0:
        return 0
    if hints.range <= 0:
        return min(res, PLAIN_MAX_RESOLUTION)
    if hints.func not in WHOLE_INTERVAL_FUNCS:
        return min(res, hints.range // 2)
    # A window of whole intervals is answered from them (for counters from each interval's first
    # and last sample); one cutting intervals needs at least two of them, except for counters,
    # which get points at the windows' edges (``view``).
    for r in (RES_1H, RES_5M):
        whole = aligned(hints, r) or hints.func in COUNTER_FUNCS
        if r <= res and r <= (hints.range if whole else hints.range // 2):
            return r
    return 0


def _auto_resolution(hints: SelectHints) -> int:
    """``auto``: downsampled data only where the answer stays as close to raw as documented (exact
    for ``*_over_time``, rates within 5%): at most a fifth of the step, and only for
    ``count|sum|avg|min|max_over_time``, ``rate`` and ``increase`` over windows of whole intervals
    (Grafana's aligned steps with ranges a multiple of the resolution). Everything else reads raw:
    plain selectors (an interval's average is not its last sample), ``irate``, other functions,
    and windows cutting intervals (interpolated edges are far off for sparse counters).
    ``max_source_resolution`` set explicitly gives Thanos' approximations for those too.
    """
    res = hints.step // 5 if hints.step > 0 else 0
    if res <= 0 or hints.range <= 0 or hints.func not in AUTO_FUNCS:
        return 0
    for r in (RES_1H, RES_5M):
        if r <= res and r <= hints.range and aligned(hints, r):
            return r
    return 0


class Segment(NamedTuple):
    """``[start, end)`` answered at ``resolution`` by ``readers`` (none for raw data)."""

    start: int
    end: int
    resolution: int
    readers: tuple[BlockReader, ...]


def plan_resolutions(readers: Sequence[BlockReader], mint: int, maxt: int,
                     raw: Sequence[BlockReader] = ()) -> list[Segment]:
    """Cuts ``[mint, maxt]`` into segments, each answered by the coarsest resolution whose blocks
    cover it whole, or raw (0); adjacent segments of one resolution are joined.

    Blocks of every set of external labels (shard) among ``readers`` and the ``raw`` blocks
    overlapping a segment must cover it at that resolution, so a shard whose downsampling
    lags behind is read raw rather than missed.
    """
    if not readers:
        return []
    end = maxt + 1
    bounds = {mint, end}
    for r in readers:
        for t in (r.meta.min_time, r.meta.max_time):
            if mint < t < end:
                bounds.add(t)
    cuts = sorted(bounds)
    by_res = sorted({r.meta.resolution for r in readers}, reverse=True)
    out: list[Segment] = []
    for a, b in zip(cuts, cuts[1:]):
        shards = {r.meta.labels for r in (*readers, *raw) if r.meta.min_time < b and r.meta.max_time > a}
        res, cover = 0, ()
        for candidate in by_res:
            c = tuple(r for r in readers if r.meta.resolution == candidate
                      and r.meta.min_time <= a and r.meta.max_time >= b)
            if c and {r.meta.labels for r in c} >= shards:
                res, cover = candidate, c
                break
        if out and out[-1].resolution == res:
            prev = out[-1]
            merged = prev.readers + tuple(r for r in cover if r not in prev.readers)
            out[-1] = Segment(prev.start, b, res, merged)
        else:
            out.append(Segment(a, b, res, cover))
    return out


def resolution_note(resolution: int) -> str:
    """The info annotation saying that downsampled data of ``resolution`` answered."""
    name = NAMES.get(resolution, f"{resolution}ms")
    return (f"flashback info: downsampled data at resolution {name} answered part of this query "
            "(max_source_resolution=raw for raw samples only)")


class Piece(NamedTuple):
    """Part of one series' selection: raw samples (``ts``, ``vs``) or a block's ``aggregates``."""

    resolution: int
    ts: np.ndarray | None
    vs: np.ndarray | None
    aggregates: Aggregates | None


class ViewSeries(ArraySeries):
    """A selection over downsampled data as the function needs it; ``weights`` (or None) is the
    number of raw samples each point stands for, for ``count_over_time``/``avg_over_time``."""

    __slots__ = ("weights",)

    def __init__(self, labels: Labels, ts: np.ndarray, vs: np.ndarray, weights: np.ndarray | None) -> None:
        super().__init__(labels, ts, vs)
        self.weights = weights


def _not_stale(ts: np.ndarray, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stale = is_stale(vs)
    if stale.any():
        return ts[~stale], vs[~stale]
    return ts, vs


def window_edges(hints: SelectHints) -> np.ndarray:
    """The first and last millisecond of every window ``(t - range, t]`` of the selection's
    evaluation (times as the engine selects: the first ``t`` is ``hints.start + range - 1``)."""
    if hints.step > 0:
        ts = np.arange(hints.start + hints.range - 1, hints.end + 1, hints.step, dtype=np.int64)
    else:
        ts = np.array([hints.end], dtype=np.int64)
    return np.unique(np.concatenate((ts - hints.range + 1, ts)))


def view(labels: Labels, pieces: list[Piece], func: str, mint: int, maxt: int,
         edges: np.ndarray | None = None) -> ViewSeries:
    """One series' pieces (in time order) as the points function ``func`` reads.

    Counters get a point at each interval's first and last sample, so a window of whole
    intervals, even of one, has its first and last sample as raw data has. ``edges``, for
    windows that cut intervals, adds a point at each window's first and last millisecond,
    interpolated linearly between those: otherwise such a window would hold a pair of points
    a scrape apart around an interval boundary, and rate's extrapolation, which measures gaps
    in average point spacings, would extrapolate it by seconds instead of minutes.
    """
    if func in COUNTER_FUNCS:
        return _counter_view(labels, pieces, mint, maxt, edges)
    ts_parts, v_parts, w_parts = [], [], []
    for p in pieces:
        if p.aggregates is None:
            ts = np.asarray(p.ts, dtype=np.int64)
            vs = np.asarray(p.vs, dtype=np.float64)
            if func:
                ts, vs = _not_stale(ts, vs)
            ts_parts.append(ts)
            v_parts.append(np.ones(len(ts)) if func == "count_over_time" else vs)
            w_parts.append(np.ones(len(ts)))
            continue
        a = p.aggregates
        count = a.count.astype(np.float64)
        if func == "max_over_time":
            vals = a.max
        elif func == "min_over_time":
            vals = a.min
        elif func in ("sum_over_time", "avg_over_time"):
            vals = a.sum
        elif func == "count_over_time":
            vals = count
        else:
            with np.errstate(all="ignore"):
                vals = a.sum / count
        ts_parts.append(a.t)
        v_parts.append(vals)
        w_parts.append(count)
    ts = np.concatenate(ts_parts) if ts_parts else np.zeros(0, dtype=np.int64)
    vs = np.concatenate(v_parts) if v_parts else np.zeros(0)
    ws = np.concatenate(w_parts) if w_parts else np.zeros(0)
    if len(ts) > 1 and not (np.diff(ts) > 0).all():
        order = np.argsort(ts, kind="stable")  # overlapping blocks: the earlier piece wins a tie
        ts, vs, ws = ts[order], vs[order], ws[order]
        keep = np.concatenate(([True], ts[1:] != ts[:-1]))
        ts, vs, ws = ts[keep], vs[keep], ws[keep]
    return ViewSeries(labels, ts, vs, ws if func in WEIGHTED_FUNCS else None)


def _counter_view(labels: Labels, pieces: list[Piece], mint: int, maxt: int,
                  edges: np.ndarray | None) -> ViewSeries:
    # Every piece at the coarsest resolution among them (raw samples and finer blocks aggregated
    # on the fly), so points are evenly spaced: rate's extrapolation, which measures the gap to
    # the window's edges in average point spacings, would otherwise extrapolate a window that
    # starts in 5m data and ends in raw data by seconds instead of minutes.
    target = max(p.resolution for p in pieces)
    aggs: list[Aggregates] = []
    for p in pieces:
        if p.aggregates is not None:
            a = p.aggregates
            if len(a.t) and p.resolution < target:
                a = downsample_aggregates([a], target)
            if a is not None and len(a.t):
                aggs.append(a)
            continue
        a = downsample_raw(p.ts, p.vs, target)
        if a is not None:
            aggs.append(a)
    aggs = trim_overlaps(aggs)
    if not aggs:
        return ViewSeries(labels, np.zeros(0, dtype=np.int64), np.zeros(0), None)
    offsets = counter_offsets(aggs)
    end_t = np.concatenate([a.t for a in aggs]) if len(aggs) > 1 else aggs[0].t
    end_c = np.concatenate([a.counter + off if off else a.counter for a, off in zip(aggs, offsets)])
    starts = [a.starts() for a in aggs]
    start_t = np.concatenate([st for st, _ in starts]) if len(aggs) > 1 else starts[0][0]
    start_c = np.concatenate([sc + off if off else sc for (_, sc), off in zip(starts, offsets)])
    # Two points per interval, at its first and its last sample (one if they are the same), so a
    # window of one interval still has two points for rate().
    both = start_t != end_t
    last = np.arange(len(end_t)) + np.cumsum(both)
    t = np.empty(len(end_t) + int(last[-1] - len(end_t) + 1), dtype=np.int64)
    v = np.empty(len(t))
    t[last], v[last] = end_t, end_c
    first = last[both] - 1
    t[first], v[first] = start_t[both], start_c[both]
    if edges is not None and len(t) > 1:
        extra = edges[np.searchsorted(edges, t[0], "right"):np.searchsorted(edges, t[-1], "left")]
        at = np.searchsorted(t, extra)  # edges sorted and unique, strictly inside t's range
        new = t[at] != extra
        extra, at = extra[new], at[new]
        if len(extra):
            ev = np.interp(extra, t, v)
            t, v = np.insert(t, at, extra), np.insert(v, at, ev)
    return ViewSeries(labels, t, v, None)
