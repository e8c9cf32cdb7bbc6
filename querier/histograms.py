"""Classic histograms: ``histogram_quantile(s)`` and ``histogram_fraction`` over ``le`` buckets.

A classic histogram is a set of float series that differ only in their ``le``
label (the cumulative count of observations at or below that upper bound).
``group_buckets`` gathers them into one ``(buckets, steps)`` matrix per
histogram; ``bucket_quantile`` and ``bucket_fraction`` then walk the buckets in
order with every step of the query at once, following Prometheus'
``BucketQuantile`` and ``BucketFraction`` (``promql/quantile.go``). A bucket
series can be absent at some steps; the steps are split by which buckets are
present, so each set is computed on exactly the buckets Prometheus would see.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from querier import annotations
from querier.values import Vector
from store.labels import METRIC_NAME, Labels

BUCKET_LABEL = "le"
_SMALL_DELTA_TOLERANCE = 1e-12
_MIN_NORMAL = 2.2250738585072014e-308
_MAX_FLOAT = 1.7976931348623157e308

# What Go's strconv.ParseFloat accepts: decimal and hexadecimal floats, inf/infinity/nan
# in any case, an optional sign; no spaces and no underscores without a base prefix.
_GO_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_GO_HEX = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?\d+")
_GO_SPECIAL = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
               "+infinity": math.inf, "-infinity": -math.inf, "nan": math.nan, "+nan": math.nan, "-nan": math.nan}


def parse_upper_bound(le: str) -> float | None:
    """The value of an ``le`` label as Go's ``strconv.ParseFloat``; None where that fails."""
    special = _GO_SPECIAL.get(le.lower())
    if special is not None:
        return special
    if _GO_DECIMAL.fullmatch(le):
        return float(le)
    if _GO_HEX.fullmatch(le):
        sign = -1.0 if le.startswith("-") else 1.0
        return sign * float.fromhex(le.lstrip("+-"))
    return None


@dataclass(slots=True)
class BucketGroup:
    """One classic histogram: its labels without ``le`` and its buckets by ascending upper bound.

    Upper bounds that parse to the same number (``le="1"`` and ``le="1.0"``)
    are one bucket whose count is the sum of theirs, as Prometheus coalesces
    them. ``present[i, k]`` tells whether any series of bucket ``i`` has a
    sample at step ``k``.
    """

    labels: Labels
    uppers: np.ndarray
    counts: np.ndarray
    present: np.ndarray

    def column_sets(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(bucket rows, step columns)`` for every distinct set of present buckets."""
        any_present = self.present.any(axis=0)
        if not any_present.any():
            return
        if self.present[:, any_present].all():
            yield np.arange(len(self.uppers)), np.flatnonzero(any_present)
            return
        patterns, inverse = np.unique(self.present.T, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        for k, pattern in enumerate(patterns):
            if pattern.any():
                yield np.flatnonzero(pattern), np.flatnonzero(inverse == k)


def group_buckets(vec: Vector, warn: Callable[[str], None]) -> list[BucketGroup]:
    """Gathers the classic histograms of ``vec``; warns about present series without a valid ``le``."""
    rows_by_key: dict[Labels, list[tuple[float, int]]] = {}
    for i, lb in enumerate(vec.labels):
        le = lb.get(BUCKET_LABEL)
        upper = parse_upper_bound(le)
        if upper is None:
            if vec.present[i].any():
                warn(annotations.bad_bucket_label(lb.get(METRIC_NAME), le))
            continue
        rows_by_key.setdefault(lb.without((BUCKET_LABEL,)), []).append((upper, i))
    groups = []
    for key, buckets in rows_by_key.items():
        uppers = np.array([b[0] for b in buckets])
        rows = np.array([b[1] for b in buckets], dtype=np.int64)
        unique, which = np.unique(uppers, return_inverse=True)
        pres = vec.present[rows]
        if len(unique) == len(uppers):
            order = np.argsort(uppers, kind="stable")
            counts, present = vec.values[rows[order]], pres[order]
        else:
            counts = np.zeros((len(unique), pres.shape[1]))
            present = np.zeros((len(unique), pres.shape[1]), dtype=bool)
            np.add.at(counts, which, np.where(pres, vec.values[rows], 0.0))
            np.logical_or.at(present, which, pres)
        groups.append(BucketGroup(key, unique, counts, present))
    return groups


def _almost_equal(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Prometheus' ``almost.Equal`` element-wise (two NaNs are equal)."""
    with np.errstate(all="ignore"):
        abs_sum = np.abs(a) + np.abs(b)
        diff = np.abs(a - b)
        tiny = (a == 0) | (b == 0) | (abs_sum < _MIN_NORMAL)
        close = np.where(tiny, diff < eps * _MIN_NORMAL, diff / np.minimum(abs_sum, _MAX_FLOAT) < eps)
    return (np.isnan(a) & np.isnan(b)) | (a == b) | close


def _search(counts: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Go's ``sort.Search(len(counts)-1, counts[i] >= rank)`` per column (a binary search, as Prometheus)."""
    n = counts.shape[0] - 1
    cols = np.arange(counts.shape[1])
    lo = np.zeros(counts.shape[1], dtype=np.int64)
    hi = np.full(counts.shape[1], n, dtype=np.int64)
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) // 2
        ok = counts[np.minimum(mid, max(n - 1, 0)), cols] >= rank
        lo = np.where(open_ & ~ok, mid + 1, lo)
        hi = np.where(open_ & ok, mid, hi)


def bucket_quantile(q: np.ndarray, uppers: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``q`` quantile of one classic histogram at every column, and where monotonicity was forced.

    Args:
        q: the quantile per column.
        uppers: ascending, distinct upper bounds.
        counts: cumulative counts, shape ``(len(uppers), columns)``.
    """
    ncol = counts.shape[1]
    forced = np.zeros(ncol, dtype=bool)
    special = np.where(np.isnan(q), np.nan, np.where(q < 0, -np.inf, np.inf))
    is_special = np.isnan(q) | (q < 0) | (q > 1)
    if not (len(uppers) and uppers[-1] == np.inf):
        return np.where(is_special, special, np.nan), forced
    c = counts.copy()
    prev = c[0].copy()
    for i in range(1, len(uppers)):
        cur = c[i]
        differs = cur != prev
        small = differs & _almost_equal(prev, cur, _SMALL_DELTA_TOLERANCE)
        down = differs & ~small & (cur < prev)
        forced |= down & ~is_special
        c[i] = np.where(small | down, prev, cur)
        prev = c[i].copy()
    if len(uppers) < 2:
        return np.where(is_special, special, np.nan), forced
    observations = c[-1]
    with np.errstate(all="ignore"):
        rank = q * observations
        b = _search(c, rank)
        cols = np.arange(ncol)
        end = uppers[b]
        count = c[b, cols]
        start = np.where(b > 0, uppers[np.maximum(b - 1, 0)], 0.0)
        below = np.where(b > 0, c[np.maximum(b - 1, 0), cols], 0.0)
        res = start + (end - start) * ((rank - below) / (count - below))
    last = len(uppers) - 1
    res = np.where(b == last, uppers[-2], res)
    res = np.where((b == 0) & (uppers[0] <= 0), uppers[0], res)
    res = np.where(observations == 0, np.nan, res)
    return np.where(is_special, special, res), forced


def bucket_fraction(lower: np.ndarray, upper: np.ndarray, uppers: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The share of observations in ``[lower, upper]`` of one classic histogram at every column.

    Interpolates linearly inside a bucket; a bucket with an infinite bound
    contributes nothing when only partly covered.
    """
    ncol = counts.shape[1]
    if not (len(uppers) and uppers[-1] == np.inf):
        return np.full(ncol, np.nan)
    total = counts[-1]
    rank = np.zeros(ncol)
    lower_rank = np.zeros(ncol)
    upper_rank = np.zeros(ncol)
    lower_set = np.zeros(ncol, dtype=bool)
    upper_set = np.zeros(ncol, dtype=bool)
    done = np.zeros(ncol, dtype=bool)
    with np.errstate(all="ignore"):
        for i, ub in enumerate(uppers):
            lb = uppers[i - 1] if i > 0 else (0.0 if uppers[0] > 0 else -np.inf)
            cnt = counts[i]

            def interpolate(v: np.ndarray) -> np.ndarray:
                if lb == -np.inf:
                    return cnt
                return rank + (cnt - rank) * (v - lb) / (ub - lb)

            hit = ~done & ~lower_set & (lb >= lower)
            lower_rank = np.where(hit, rank, lower_rank)
            lower_set |= hit
            hit = ~done & ~upper_set & (lb >= upper)
            upper_rank = np.where(hit, rank, upper_rank)
            upper_set |= hit
            done |= lower_set & upper_set
            hit = ~done & ~lower_set & (lb < lower) & (ub > lower)
            lower_rank = np.where(hit, interpolate(lower), lower_rank)
            lower_set |= hit
            hit = ~done & ~upper_set & (lb < upper) & (ub > upper)
            upper_rank = np.where(hit, interpolate(upper), upper_rank)
            upper_set |= hit
            done |= lower_set & upper_set
            rank = np.where(done, rank, cnt)
        lower_rank = np.where(~lower_set | (lower_rank > total), total, lower_rank)
        upper_rank = np.where(~upper_set | (upper_rank > total), total, upper_rank)
        res = (upper_rank - lower_rank) / total
    res = np.where(lower >= upper, 0.0, res)
    return np.where((total == 0) | np.isnan(lower) | np.isnan(upper), np.nan, res)
