"""PromQL functions, each evaluated over all steps at once.

Range functions (``rate``, ``*_over_time``, ...) receive a ``RangeVector``
and its ``[lo, hi)`` window indices per (series, step) and fold the flat
sample arrays with ``ufunc.reduceat`` or gather single samples (first,
last). The functions queries use most run as compiled kernels
(``kernels.py``, the ``_RANGE`` table); the numpy versions here
(``_RANGE_REFERENCE``) are their readable reference and are tested against
them. Folds Prometheus defines sample by sample (Kahan sums, running means,
smoothing) walk all windows at once, one sample position per step
(``_Scan``), or, for a few long windows, one window at a time. Instant
functions map arrays element-wise; classic histograms are in
``histograms.py``. The semantics (counter resets, extrapolation, NaN
handling) and annotations are those of Prometheus' ``promql/functions.go``.
"""

from __future__ import annotations

import dataclasses

import functools
import math
from typing import Callable

import numpy as np
import promql_parser as pp
import re2

from querier import annotations, histograms, kernels
from querier import engine as _engine
from querier.errors import ExecutionError, Unsupported
from querier.values import RangeVector, Scalar, String, Vector, window_reduce
from store.labels import METRIC_NAME, Labels

_DUP = "vector cannot contain metrics with the same labelset"


def evaluate_call(node: pp.Call, ctx: "_engine.EvalContext"):
    name = node.func.name
    args = list(node.args)
    special = _SPECIAL.get(name)
    if special is not None:
        return special(node, args, ctx)
    vals = [_engine.evaluate(a, ctx) for a in args]
    if name in _RANGE:
        rv = next((v for v in vals if isinstance(v, RangeVector)), None)
        if rv is None:
            raise ExecutionError(f"expected a range vector argument in call to function {name!r}")
        others = [v for v in vals if v is not rv]
        values, present = _RANGE[name](rv, others, ctx)
        if name in ("rate", "increase"):
            _check_counter_names(rv, present, ctx)
        keep_name = name in ("last_over_time", "first_over_time")
        labels = rv.labels if keep_name else [_engine.drop_name(lb) for lb in rv.labels]
        vec = Vector(labels, values, present)
        return _engine.merge_same_labels(vec, _DUP) if not keep_name else vec
    if name in _MATH:
        vec = _vector_arg(vals[0], name)
        with np.errstate(all="ignore"):
            out = _MATH[name](vec.values)
        return _with_values(vec, out, vec.present)
    if name in _INSTANT:
        return _INSTANT[name](vals, ctx)
    raise Unsupported(f"function {name!r} is not supported")


def _check_counter_names(rv: RangeVector, present: np.ndarray, ctx) -> None:
    """Prometheus' info for ``rate``/``increase`` of a named series whose name does not read as a counter's."""
    seen = set()
    for i in np.flatnonzero(present.any(axis=1)).tolist():
        lbls = rv.labels[i]
        # The name usually sorts first; Labels.get is the general case.
        metric = lbls[0][1] if lbls and lbls[0][0] == METRIC_NAME else lbls.get(METRIC_NAME)
        if metric in seen:
            continue
        seen.add(metric)
        if metric and not metric.endswith(_COUNTER_SUFFIXES):
            ctx.info(annotations.possible_non_counter(metric))


_COUNTER_SUFFIXES = ("_total", "_sum", "_count", "_bucket")


def _vector_arg(v, name: str) -> Vector:
    if not isinstance(v, Vector):
        raise ExecutionError(f"expected an instant vector argument in call to function {name!r}")
    return v


def _scalar_arg(v) -> np.ndarray:
    if isinstance(v, Scalar):
        return v.values
    raise ExecutionError("expected a scalar argument")


def _with_values(vec: Vector, values: np.ndarray, present: np.ndarray, keep_name: bool = False) -> Vector:
    labels = vec.labels if keep_name else [_engine.drop_name(lb) for lb in vec.labels]
    out = Vector(labels, values, present)
    return out if keep_name else _engine.merge_same_labels(out, _DUP)


# ---- range functions -------------------------------------------------------------------------

def _basics(rv: RangeVector):
    lo, hi = rv.windows()
    count = hi - lo
    nonempty = count > 0
    last = np.where(nonempty, hi - 1, 0)
    return lo, hi, count, nonempty, last


def _gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if len(arr) == 0:
        return np.zeros(idx.shape, dtype=arr.dtype)
    return arr[np.minimum(idx, len(arr) - 1)]


def _extrapolated(is_counter: bool, is_rate: bool):
    def fn(rv: RangeVector, _args, ctx):
        lo, hi, count, _, last = _basics(rv)
        ok = count >= 2
        first = np.where(ok, lo, 0)
        v, ts = rv.values, rv.ts
        v_first, v_last = _gather(v, first), _gather(v, last)
        t_first, t_last = _gather(ts, first), _gather(ts, last)
        result = v_last - v_first
        if is_counter and len(v) > 1:
            prev = np.empty_like(v)
            prev[0] = 0
            prev[1:] = v[:-1]
            corr = np.where(v < prev, prev, 0.0)
            corr[rv.offsets[:-1][np.diff(rv.offsets) > 0]] = 0.0  # a series' first sample resets nothing
            result = result + np.where(ok, window_reduce(np.add, corr, np.where(ok, lo + 1, 0), np.where(ok, hi, 1)), 0.0)
        right = rv.right[None, :]
        left = rv.left[None, :]
        with np.errstate(all="ignore"):
            to_start = (t_first - left) / 1000.0
            to_end = (right - t_last) / 1000.0
            sampled = (t_last - t_first) / 1000.0
            avg = sampled / np.maximum(count - 1, 1)
            threshold = avg * 1.1
            to_start = np.where(to_start >= threshold, avg / 2, to_start)
            if is_counter:
                to_zero = np.where((result > 0) & (v_first >= 0), sampled * (v_first / result), to_start)
                to_start = np.where(to_zero < to_start, to_zero, to_start)
            to_end = np.where(to_end >= threshold, avg / 2, to_end)
            factor = np.where(sampled != 0, (sampled + to_start + to_end) / sampled, 1.0)
            if is_rate:
                factor = factor / (rv.range_ms / 1000.0)
            result = result * factor
        return result, ok
    return fn


def _instant_delta(is_rate: bool):
    def fn(rv: RangeVector, _args, ctx):
        lo, hi, count, _, last = _basics(rv)
        ok = count >= 2
        prev = np.where(ok, hi - 2, 0)
        v_last, v_prev = _gather(rv.values, last), _gather(rv.values, prev)
        if not is_rate:
            return v_last - v_prev, ok
        dt = (_gather(rv.ts, last) - _gather(rv.ts, prev)) / 1000.0
        ok &= dt != 0
        with np.errstate(all="ignore"):
            res = np.where(v_last < v_prev, v_last, v_last - v_prev) / dt
        return res, ok
    return fn


def _fold(ufunc: np.ufunc):
    def fn(rv: RangeVector, _args, ctx):
        lo, hi, _, nonempty, _ = _basics(rv)
        return window_reduce(ufunc, rv.values, lo, hi), nonempty
    return fn


class _Scan:
    """Visits the samples of every window in time order, all windows at once.

    For the folds Prometheus defines sample by sample (Kahan sums, running
    means, smoothing). Windows are ordered longest first, so the windows that
    still have a ``j``-th sample are a prefix of that order; state arrays are
    kept in it (``arg`` puts per-step arguments there, ``result`` puts a state
    array back in ``(series, steps)`` shape). Iterating yields ``(j, m, idx)``:
    the first ``m`` windows have a ``j``-th sample, at flat indices ``idx``.
    ``subset`` restricts the scan to some windows (flat indices into the
    ``(series, steps)`` grid); ``result`` then fills the others with NaN.
    """

    def __init__(self, rv: RangeVector, subset: np.ndarray | None = None) -> None:
        lo, hi = rv.windows()
        self.shape = lo.shape
        count = (hi - lo).ravel()
        lo = lo.ravel()
        self.windows = np.arange(len(count)) if subset is None else subset
        order = np.argsort(-count[self.windows], kind="stable")
        self.windows = self.windows[order]
        self.count = count[self.windows]
        self.lo = lo[self.windows]
        self.size = len(self.windows)

    @property
    def deep(self) -> bool:
        """Few long windows: a Python step per window is cheaper than one per sample position."""
        return self.size > 0 and int(self.count[0]) > 2 * self.size

    def slices(self):
        """``(w, lo, hi)`` of every window in scan order, for folds done one window at a time."""
        for w, (lo, n) in enumerate(zip(self.lo.tolist(), self.count.tolist())):
            yield w, lo, lo + n

    def __iter__(self):
        longest = int(self.count[0]) if self.size else 0
        desc = -self.count
        for j in range(longest):
            m = int(np.searchsorted(desc, -j, side="left"))
            yield j, m, self.lo[:m] + j

    def arg(self, per_step: np.ndarray) -> np.ndarray:
        return np.broadcast_to(per_step[None, :], self.shape).ravel()[self.windows]

    def result(self, state: np.ndarray) -> np.ndarray:
        out = np.full(int(np.prod(self.shape)), np.nan)
        out[self.windows] = state
        return out.reshape(self.shape)


def _kahan_inc(inc: np.ndarray, total: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of Prometheus' Kahan-Babuska-Neumaier sum (``kahansum.Inc``): the new sum and compensation."""
    t = total + inc
    big = np.abs(total) >= np.abs(inc)
    c = np.where(np.isinf(t), 0.0, c + np.where(big, (total - t) + inc, (inc - t) + total))
    return t, c


class _KahanSums:
    """Neumaier-compensated running sums of many windows, updated in place (``kahansum.Inc`` per window).

    The rounding error of every addition is found with Knuth's branch-free
    TwoSum, which is exactly the error ``kahansum.Inc`` gets from its
    ``|sum| >= |inc|`` branches as long as the sum stays finite. Prometheus
    also resets the compensation when the sum overflows; windows whose sum is
    not finite must be redone with ``_kahan_inc`` (or ignore the compensation).
    """

    def __init__(self, n: int) -> None:
        self.sum, self.c = np.zeros(n), np.zeros(n)
        self._t, self._z = np.empty(n), np.empty(n)

    def add(self, m: int, inc: np.ndarray) -> None:
        """Adds ``inc`` to the first ``m`` sums; ``inc`` is clobbered."""
        s, c, t, z = self.sum[:m], self.c[:m], self._t[:m], self._z[:m]
        np.add(s, inc, out=t)
        np.subtract(t, s, out=z)
        np.subtract(inc, z, out=inc)
        np.subtract(t, z, out=z)
        np.subtract(s, z, out=z)
        np.add(z, inc, out=z)
        c += z
        s[...] = t

    def value(self, m: int) -> np.ndarray:
        return self.sum[:m] + self.c[:m]


def _kahan_sums(rv: RangeVector, scan: _Scan) -> tuple[np.ndarray, np.ndarray]:
    """Neumaier sums and compensations of every window of ``scan`` (compensation unusable where not finite)."""
    if scan.deep:
        return _kahan_sums_by_window(rv, scan)
    acc = _KahanSums(scan.size)
    v = np.empty(scan.size)
    with np.errstate(all="ignore"):
        for _, m, idx in scan:
            acc.add(m, np.take(rv.values, idx, out=v[:m]))
    return acc.sum, acc.c


def _kahan_sums_by_window(rv: RangeVector, scan: _Scan) -> tuple[np.ndarray, np.ndarray]:
    """``_kahan_sums`` one window at a time (see ``_neumaier``)."""
    total, c = np.zeros(scan.size), np.zeros(scan.size)
    for w, lo, hi in scan.slices():
        total[w], c[w] = _neumaier(rv.values[lo:hi])
    return total, c


def _neumaier(x: np.ndarray) -> tuple[float, float]:
    """``kahansum.Inc`` folded over ``x`` in a few array operations: the sum and its compensation.

    The running sums are plain left-to-right float sums, which
    ``np.add.accumulate`` computes in order; the rounding error of every
    addition then follows element-wise (TwoSum), and the compensation is
    their left-to-right sum. The compensation is meaningless where the sum is
    not finite.
    """
    with np.errstate(all="ignore"):
        running = np.add.accumulate(np.concatenate(([0.0], x)))
        prev, t = running[:-1], running[1:]
        z = t - prev
        err = (prev - (t - z)) + (x - z)
        return float(running[-1]), float(np.add.accumulate(np.concatenate(([0.0], err)))[-1])


def _exact_naive_sums(rv: RangeVector, lo: np.ndarray, hi: np.ndarray) -> bool:
    """True when plain window sums are exact (integers whose magnitudes sum below 2**52), so Kahan is moot."""
    v = rv.values
    if len(v) == 0:
        return True
    if not np.all(v == np.trunc(v)):
        return False
    nonempty = hi > lo
    with np.errstate(over="ignore"):
        abs_sums = window_reduce(np.add, np.abs(v), lo, hi)
    return bool(np.all(abs_sums[nonempty] <= 2.0**52))


def _sum_over_time(rv, _args, ctx):
    lo, hi, _, nonempty, _ = _basics(rv)
    if _exact_naive_sums(rv, lo, hi):
        return window_reduce(np.add, rv.values, lo, hi), nonempty
    scan = _Scan(rv)
    total, c = _kahan_sums(rv, scan)
    return scan.result(np.where(np.isfinite(total), total + c, total)), nonempty


def _avg_over_time(rv, _args, ctx):
    """Kahan-summed mean; an incremental mean where the running sum would overflow (as Prometheus)."""
    lo, hi, count, nonempty, _ = _basics(rv)
    with np.errstate(all="ignore"):
        if _exact_naive_sums(rv, lo, hi):
            return window_reduce(np.add, rv.values, lo, hi) / np.maximum(count, 1), nonempty
        scan = _Scan(rv)
        total, c = _kahan_sums(rv, scan)
        cnt = np.maximum(scan.count, 1)
        out = scan.result(total / cnt + c / cnt)
        # A running sum that left the finite range never comes back; redo those windows the long way.
        redo = scan.windows[~np.isfinite(total)]
        if len(redo):
            out.ravel()[redo] = _incremental_mean(rv, _Scan(rv, redo)).ravel()[redo]
    return out, nonempty


def _incremental_mean(rv: RangeVector, scan: _Scan) -> np.ndarray:
    """Prometheus' avg_over_time sample by sample: a Kahan sum until it overflows, then a running mean."""
    n = scan.size
    total, c, mean = np.zeros(n), np.zeros(n), np.zeros(n)
    incremental = np.zeros(n, dtype=bool)
    for j, m, idx in scan:
        v = rv.values[idx]
        if j == 0:
            total[:m] = v
            continue
        k = float(j + 1)
        new_total, new_c = _kahan_inc(v, total[:m], c[:m])
        inc = incremental[:m]
        stay = ~inc & ~np.isinf(new_total)
        switch = ~inc & ~stay
        total[:m] = np.where(stay, new_total, total[:m])
        c_m = np.where(stay, new_c, c[:m])
        mean_m = np.where(switch, total[:m] / (k - 1), mean[:m])
        c_m = np.where(switch, c_m / (k - 1), c_m)
        inc = inc | switch
        q = (k - 1) / k
        upd_mean, upd_c = _kahan_inc(v / k, q * mean_m, q * c_m)
        mean[:m] = np.where(inc, upd_mean, mean_m)
        c[:m] = np.where(inc, upd_c, c_m)
        incremental[:m] = inc
    cnt = np.maximum(scan.count, 1).astype(np.float64)
    return scan.result(np.where(incremental, mean + c, total / cnt + c / cnt))


def _count_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, _ = _basics(rv)
    return count.astype(np.float64), nonempty


def _last_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, last = _basics(rv)
    return _gather(rv.values, last), nonempty


def _first_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, _ = _basics(rv)
    return _gather(rv.values, np.where(nonempty, lo, 0)), nonempty


def _present_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, _ = _basics(rv)
    return np.ones(count.shape), nonempty


def _pairwise_count(pred: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    def fn(rv, _args, ctx):
        lo, hi, count, nonempty, _ = _basics(rv)
        v = rv.values
        ind = np.zeros(len(v))
        if len(v) > 1:
            ind[1:] = pred(v[1:], v[:-1])
        return window_reduce(np.add, ind, np.where(nonempty, lo + 1, 0), np.where(nonempty, hi, 0)) * (count > 1), nonempty
    return fn


def _expand(rv: RangeVector):
    """Every window's samples laid out one after another: (values, window id, window starts, mask)."""
    lo, hi, count, nonempty, _ = _basics(rv)
    flat_lo, flat_cnt = lo.ravel(), count.ravel()
    total = int(flat_cnt.sum())
    starts = np.zeros(len(flat_cnt), dtype=np.int64)
    np.cumsum(flat_cnt[:-1], out=starts[1:])
    wid = np.repeat(np.arange(len(flat_cnt)), flat_cnt)
    idx = np.repeat(flat_lo, flat_cnt) + (np.arange(total) - np.repeat(starts, flat_cnt))
    return rv.values[idx] if total else np.zeros(0), wid, starts, flat_cnt, nonempty


def _welford(rv: RangeVector, scan: _Scan) -> np.ndarray:
    """Welford's variance with Kahan-compensated mean and sum of squares (Prometheus' ``varianceOverTime``)."""
    n = scan.size
    mean, aux = _KahanSums(n), _KahanSums(n)
    v, delta, x = np.empty(n), np.empty(n), np.empty(n)
    for j, m, idx in scan:
        vm, dm, xm = np.take(rv.values, idx, out=v[:m]), delta[:m], x[:m]
        np.subtract(vm, mean.value(m), out=dm)
        mean.add(m, np.divide(dm, j + 1, out=xm))
        np.subtract(vm, mean.value(m), out=xm)
        aux.add(m, np.multiply(dm, xm, out=xm))
    return aux.value(n) / np.maximum(scan.count, 1)


def _two_pass_variance(rv: RangeVector, scan: _Scan) -> np.ndarray:
    """The variance of few long windows, one window at a time: Kahan-summed mean, then squared deviations.

    Agrees with Welford's recurrence to the last bit or so (not always bit
    for bit): NaN where a window holds NaN or Inf, exactly 0 for a constant
    window. Non-finite results (overflowing squares) are redone by the caller
    with the exact recurrence.
    """
    out = np.zeros(scan.size)
    for w, lo, hi in scan.slices():
        if hi <= lo:
            continue  # an empty window (masked by the caller)
        x = rv.values[lo:hi]
        lowest, highest = x.min(), x.max()
        if not (np.isfinite(lowest) and np.isfinite(highest)):
            out[w] = np.nan  # Welford turns any NaN or Inf into NaN (Inf - Inf)
            continue
        if lowest == highest:
            continue
        mean = sum(_neumaier(x)) / len(x)
        dev = x - mean
        out[w] = sum(_neumaier(dev * dev)) / len(x)
    return out


def _welford_exact(rv: RangeVector, scan: _Scan) -> np.ndarray:
    """``_welford`` with ``kahansum.Inc``'s reset of the compensation on overflow, for windows that overflow."""
    n = scan.size
    mean, c_mean, aux, c_aux = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for j, m, idx in scan:
        v = rv.values[idx]
        delta = v - (mean[:m] + c_mean[:m])
        mean[:m], c_mean[:m] = _kahan_inc(delta / (j + 1), mean[:m], c_mean[:m])
        aux[:m], c_aux[:m] = _kahan_inc(delta * (v - (mean[:m] + c_mean[:m])), aux[:m], c_aux[:m])
    return (aux + c_aux) / np.maximum(scan.count, 1)


def _variance(rv: RangeVector) -> tuple[np.ndarray, np.ndarray]:
    """Welford's running variance with Kahan-compensated mean and sum of squares, as Prometheus."""
    _, _, _, nonempty, _ = _basics(rv)
    scan = _Scan(rv)
    with np.errstate(all="ignore"):
        var = _two_pass_variance(rv, scan) if scan.deep else _welford(rv, scan)
        out = scan.result(var)
        # Where a running sum overflowed, Prometheus' reset of the compensation matters: redo exactly.
        redo = scan.windows[~np.isfinite(var)]
        if len(redo):
            sub = _Scan(rv, redo)
            out.ravel()[sub.windows] = _welford_exact(rv, sub)
    return out, nonempty


def _stdvar_over_time(rv, _args, ctx):
    return _variance(rv)


def _stddev_over_time(rv, _args, ctx):
    var, ok = _variance(rv)
    return np.sqrt(var), ok


def _quantiles(x: np.ndarray, wid: np.ndarray, starts: np.ndarray, cnt: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Prometheus' quantile (linear interpolation, NaN sorted first) of every window; ``q`` per window."""
    out = np.full(len(cnt), np.nan)
    if len(x) == 0:
        return out
    order = np.lexsort((np.where(np.isnan(x), -np.inf, x), ~np.isnan(x), wid))
    xs = x[order]
    with np.errstate(all="ignore"):
        rank = q * (cnt - 1)
        lower = np.clip(np.floor(np.nan_to_num(rank)), 0, None)
        upper = np.minimum(cnt - 1, lower + 1)
        weight = rank - np.floor(rank)
        has = cnt > 0
        li = np.where(has, starts + lower.astype(np.int64), 0)
        ui = np.where(has, starts + np.maximum(upper, 0).astype(np.int64), 0)
        res = xs[np.minimum(li, len(xs) - 1)] * (1 - weight) + xs[np.minimum(ui, len(xs) - 1)] * weight
    res = np.where(np.isnan(q), np.nan, np.where(q < 0, -np.inf, np.where(q > 1, np.inf, res)))
    out[has] = res[has]
    return out


def _warn_invalid_quantiles(q: np.ndarray, ctx) -> None:
    """Warns once per quantile value outside [0, 1] (or NaN), as Prometheus at every step it evaluates."""
    bad = q[np.isnan(q) | (q < 0) | (q > 1)]
    if len(bad):
        if np.isnan(bad).any():
            ctx.warn(annotations.invalid_quantile(math.nan))
        for v in np.unique(bad[~np.isnan(bad)]):
            ctx.warn(annotations.invalid_quantile(float(v)))


def _quantile_over_time(rv, args, ctx):
    q = _scalar_arg(args[0])
    x, wid, starts, cnt, nonempty = _expand(rv)
    _warn_invalid_quantiles(q[nonempty.any(axis=0)] if nonempty.size else q[:0], ctx)
    qq = np.broadcast_to(q[None, :], nonempty.shape).ravel()
    return _quantiles(x, wid, starts, cnt, qq).reshape(nonempty.shape), nonempty


def _mad_over_time(rv, args, ctx):
    x, wid, starts, cnt, nonempty = _expand(rv)
    half = np.full(len(cnt), 0.5)
    med = _quantiles(x, wid, starts, cnt, half)
    dev = np.abs(x - med[wid]) if len(x) else x
    out = _quantiles(dev, wid, starts, cnt, half)
    # A NaN sample makes the median, and so the deviation, undefined.
    has_nan = np.bincount(wid, weights=np.isnan(x), minlength=len(cnt)) > 0 if len(x) else np.zeros(len(cnt), bool)
    out[has_nan] = np.nan
    return out.reshape(nonempty.shape), nonempty


def _ts_of_extreme(largest: bool):
    """Timestamp (s) of the largest/smallest sample, the latest among equals; NaN only where all are NaN.

    Prometheus keeps the first sample and replaces it by every later one that
    is ``>=`` (``<=``) or when the kept one is NaN; so the latest non-NaN
    extreme wins, and the last sample where all are NaN.
    """
    def better(cur: np.ndarray, best: np.ndarray) -> np.ndarray:
        return cur >= best if largest else cur <= best

    def fn(rv, _args, ctx):
        _, _, _, nonempty, _ = _basics(rv)
        scan = _Scan(rv)
        best, best_ts = np.zeros(scan.size), np.zeros(scan.size, dtype=np.int64)
        if scan.deep:
            for w, lo, hi in scan.slices():
                v = rv.values[lo:hi]
                numbers = np.flatnonzero(~np.isnan(v))
                at = hi - 1
                if len(numbers):
                    cand = v[numbers]
                    at = lo + numbers[np.flatnonzero(cand == (cand.max() if largest else cand.min()))[-1]]
                best_ts[w] = rv.ts[at]
            return scan.result(best_ts / 1000.0), nonempty
        for j, m, idx in scan:
            v, t = rv.values[idx], rv.ts[idx]
            take = (better(v, best[:m]) | np.isnan(best[:m])) if j else np.ones(m, dtype=bool)
            best[:m] = np.where(take, v, best[:m])
            best_ts[:m] = np.where(take, t, best_ts[:m])
        return scan.result(best_ts / 1000.0), nonempty
    return fn


def _ts_of_first_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, _ = _basics(rv)
    return _gather(rv.ts, np.where(nonempty, lo, 0)) / 1000.0, nonempty


def _ts_of_last_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, last = _basics(rv)
    return _gather(rv.ts, last) / 1000.0, nonempty


def _double_exponential_smoothing(rv, args, ctx):
    """Holt's linear smoothing of every window (Prometheus' ``double_exponential_smoothing``)."""
    sf, tf = _scalar_arg(args[0]), _scalar_arg(args[1])
    lo, hi, count, nonempty, _ = _basics(rv)
    used = nonempty.any(axis=0) if nonempty.size else np.zeros(len(sf), dtype=bool)
    for name, f, short in (("smoothing", sf, "sf"), ("trend", tf, "tf")):
        bad = used & ~((f > 0) & (f < 1))
        if bad.any():
            got = float(f[np.argmax(bad)])
            shown = annotations.go_float(got) if not math.isfinite(got) else f"{got:.6f}"
            raise ExecutionError(f"invalid {name} factor. Expected: 0 < {short} < 1, got: {shown}")
    scan = _Scan(rv)
    sfw, tfw = scan.arg(sf), scan.arg(tf)
    n = scan.size
    s0, s1, b = np.zeros(n), np.zeros(n), np.zeros(n)
    with np.errstate(all="ignore"):
        for j, m, idx in scan:
            v = rv.values[idx]
            if j == 0:
                s1[:m] = v
                continue
            if j == 1:
                b[:m] = v - s1[:m]
            else:
                b[:m] = tfw[:m] * (s1[:m] - s0[:m]) + (1 - tfw[:m]) * b[:m]
            smoothed = sfw[:m] * v + (1 - sfw[:m]) * (s1[:m] + b[:m])
            s0[:m] = s1[:m]
            s1[:m] = smoothed
    return scan.result(s1), count >= 2


def _regression(rv: RangeVector, intercept_ms: np.ndarray):
    """Least-squares slope (per second) and intercept at ``intercept_ms`` of every window, as Prometheus."""
    lo, hi, count, nonempty, last = _basics(rv)
    ok = count >= 2
    v = rv.values
    base, x, y, shift = _regression_terms(rv)
    n = np.maximum(count, 1).astype(np.float64)
    with np.errstate(all="ignore"):
        sx = window_reduce(np.add, x, lo, hi)
        sy = window_reduce(np.add, y, lo, hi)
        sxy = window_reduce(np.add, x * y, lo, hi)
        sx2 = window_reduce(np.add, x * x, lo, hi)
        cov = sxy - sx * sy / n
        var = sx2 - sx * sx / n
        slope = cov / var
        y_shift = _gather(shift, np.where(nonempty, lo, 0))
        xi = (intercept_ms - base) / 1000.0
        intercept = sy / n + y_shift - slope * (sx / n - xi)
        vmin = window_reduce(np.fmin, v, lo, hi)
        vmax = window_reduce(np.fmax, v, lo, hi)
        nans = window_reduce(np.add, np.isnan(v).astype(np.float64), lo, hi)
        first = _gather(v, np.where(nonempty, lo, 0))
        const = (vmin == vmax) & (nans == 0)
        inf_const = const & np.isinf(first)
        slope = np.where(const, 0.0, slope)
        intercept = np.where(const, first, intercept)
        slope = np.where(inf_const, np.nan, slope)
        intercept = np.where(inf_const, np.nan, intercept)
    return slope, intercept, ok


def _regression_terms(rv: RangeVector) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(base, x, y, shift)``: times in seconds from the first sample, values minus their series' first finite one."""
    ts, v = rv.ts, rv.values
    base = int(ts[0]) if len(ts) else 0
    x = (ts - base) / 1000.0
    shift = np.zeros(len(v))
    if len(v):
        sizes = np.diff(rv.offsets)
        firsts = v[rv.offsets[:-1][sizes > 0]]
        shift = np.repeat(np.where(np.isfinite(firsts), firsts, 0.0), sizes[sizes > 0])
    with np.errstate(all="ignore"):
        y = v - shift
    return base, x, y, shift


def _regression_compiled(rv: RangeVector, intercept_ms: np.ndarray):
    """``_regression`` with ``kernels.regression``."""
    base, x, y, shift = _regression_terms(rv)
    with np.errstate(all="ignore"):
        xy, x2 = x * y, x * x
    xi = np.ascontiguousarray(np.broadcast_to(((intercept_ms - base) / 1000.0).ravel(), (len(rv.left),)))
    return kernels.regression(rv.ts, x, y, xy, x2, rv.values, shift, rv.offsets, rv.left, rv.right, xi)


def _linear(regression):
    def deriv(rv, _args, ctx):
        slope, _, ok = regression(rv, np.zeros(1))
        return slope, ok

    def predict_linear(rv, args, ctx):
        horizon = _scalar_arg(args[0])[None, :]
        slope, intercept, ok = regression(rv, ctx.steps[None, :])
        with np.errstate(all="ignore"):
            return intercept + slope * horizon, ok
    return deriv, predict_linear


_deriv, _predict_linear = _linear(_regression)
_deriv_compiled, _predict_linear_compiled = _linear(_regression_compiled)


# ---- compiled range functions (kernels.py); the numpy versions above are their reference ---------

def _extrapolated_compiled(is_counter: bool, is_rate: bool):
    def fn(rv: RangeVector, _args, ctx):
        return kernels.extrapolated(rv.ts, rv.values, rv.offsets, rv.left, rv.right, rv.range_ms, is_counter, is_rate)
    return fn


def _instant_delta_compiled(is_rate: bool):
    def fn(rv: RangeVector, _args, ctx):
        return kernels.instant_delta(rv.ts, rv.values, rv.offsets, rv.left, rv.right, is_rate)
    return fn


def _windowed(kernel):
    def fn(rv: RangeVector, _args, ctx):
        return kernel(rv.ts, rv.values, rv.offsets, rv.left, rv.right)
    return fn


def _extreme_compiled(largest: bool):
    def fn(rv: RangeVector, _args, ctx):
        return kernels.extreme(rv.ts, rv.values, rv.offsets, rv.left, rv.right, largest)
    return fn


def _stddev_compiled(rv, _args, ctx):
    var, ok = kernels.variance_over_time(rv.ts, rv.values, rv.offsets, rv.left, rv.right)
    return np.sqrt(var), ok


def _quantile_over_time_compiled(rv, args, ctx):
    q = np.ascontiguousarray(_scalar_arg(args[0]), dtype=np.float64)
    out, ok = kernels.quantile_over_time(rv.ts, rv.values, rv.offsets, rv.left, rv.right, q)
    _warn_invalid_quantiles(q[ok.any(axis=0)] if ok.size else q[:0], ctx)
    return out, ok


def _absent_over_time_values(rv, _args, ctx):
    raise AssertionError("handled as a special function")


_RANGE_REFERENCE = {
    "rate": _extrapolated(True, True),
    "increase": _extrapolated(True, False),
    "delta": _extrapolated(False, False),
    "irate": _instant_delta(True),
    "idelta": _instant_delta(False),
    "sum_over_time": _sum_over_time,
    "min_over_time": _fold(np.fmin),
    "max_over_time": _fold(np.fmax),
    "avg_over_time": _avg_over_time,
    "count_over_time": _count_over_time,
    "last_over_time": _last_over_time,
    "first_over_time": _first_over_time,
    "present_over_time": _present_over_time,
    "stddev_over_time": _stddev_over_time,
    "stdvar_over_time": _stdvar_over_time,
    "quantile_over_time": _quantile_over_time,
    "mad_over_time": _mad_over_time,
    "changes": _pairwise_count(lambda cur, prev: ~((cur == prev) | (np.isnan(cur) & np.isnan(prev)))),
    "resets": _pairwise_count(lambda cur, prev: cur < prev),
    "ts_of_min_over_time": _ts_of_extreme(largest=False),
    "ts_of_max_over_time": _ts_of_extreme(largest=True),
    "ts_of_first_over_time": _ts_of_first_over_time,
    "ts_of_last_over_time": _ts_of_last_over_time,
    "double_exponential_smoothing": _double_exponential_smoothing,
    "deriv": _deriv,
    "predict_linear": _predict_linear,
}

def _of_raw_samples(name: str, plain):
    """``count_over_time``/``avg_over_time`` that, over downsampled data (``rv.weights``: each
    point's raw sample count, values: the sum aggregate), count and average the raw samples:
    the summed counts, and the summed sums over the summed counts, rather than the number of
    points or the average of the points' averages (as Thanos does)."""
    def fn(rv, args, ctx):
        if rv.weights is None:
            return plain(rv, args, ctx)
        sum_over_time = _RANGE["sum_over_time"]
        counts, nonempty = sum_over_time(dataclasses.replace(rv, values=rv.weights, weights=None), [], ctx)
        if name == "count_over_time":
            return counts, nonempty
        sums, _ = sum_over_time(dataclasses.replace(rv, weights=None), [], ctx)
        with np.errstate(all="ignore"):
            return sums / np.where(counts > 0, counts, 1), nonempty
    return fn


_RANGE = {
    **_RANGE_REFERENCE,
    "rate": _extrapolated_compiled(True, True),
    "increase": _extrapolated_compiled(True, False),
    "delta": _extrapolated_compiled(False, False),
    "irate": _instant_delta_compiled(True),
    "idelta": _instant_delta_compiled(False),
    "sum_over_time": _windowed(kernels.sum_over_time),
    "avg_over_time": _windowed(kernels.avg_over_time),
    "min_over_time": _extreme_compiled(False),
    "max_over_time": _extreme_compiled(True),
    "stdvar_over_time": _windowed(kernels.variance_over_time),
    "stddev_over_time": _stddev_compiled,
    "quantile_over_time": _quantile_over_time_compiled,
    "deriv": _deriv_compiled,
    "predict_linear": _predict_linear_compiled,
}
_RANGE["count_over_time"] = _of_raw_samples("count_over_time", _RANGE["count_over_time"])
_RANGE["avg_over_time"] = _of_raw_samples("avg_over_time", _RANGE["avg_over_time"])


# ---- element-wise functions ------------------------------------------------------------------

_MATH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "sqrt": np.sqrt, "exp": np.exp,
    "ln": np.log, "log2": np.log2, "log10": np.log10, "sgn": np.sign,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh, "asinh": np.arcsinh, "acosh": np.arccosh,
    "atanh": np.arctanh, "deg": np.degrees, "rad": np.radians,
}


def _round(vals, ctx):
    vec = _vector_arg(vals[0], "round")
    to = _scalar_arg(vals[1]) if len(vals) > 1 else np.ones(len(ctx.steps))
    with np.errstate(all="ignore"):
        inv = 1.0 / to
        out = np.floor(vec.values * inv[None, :] + 0.5) / inv[None, :]
    return _with_values(vec, out, vec.present)


def _clamp_min(vals, ctx):
    vec = _vector_arg(vals[0], "clamp_min")
    lo = _scalar_arg(vals[1])[None, :]
    return _with_values(vec, np.where(np.isnan(vec.values) | np.isnan(lo), np.nan, np.maximum(vec.values, lo)), vec.present)


def _clamp_max(vals, ctx):
    vec = _vector_arg(vals[0], "clamp_max")
    hi = _scalar_arg(vals[1])[None, :]
    return _with_values(vec, np.where(np.isnan(vec.values) | np.isnan(hi), np.nan, np.minimum(vec.values, hi)), vec.present)


def _clamp(vals, ctx):
    vec = _vector_arg(vals[0], "clamp")
    lo = _scalar_arg(vals[1])[None, :]
    hi = _scalar_arg(vals[2])[None, :]
    with np.errstate(all="ignore"):
        out = np.maximum(lo, np.minimum(hi, vec.values))
    return _with_values(vec, out, vec.present & ~(hi < lo))


def _time(vals, ctx):
    return Scalar(ctx.steps / 1000.0)


def _pi(vals, ctx):
    return Scalar(np.full(len(ctx.steps), math.pi))


def _vector(vals, ctx):
    s = _scalar_arg(vals[0])
    return Vector([Labels()], s[None, :].copy(), np.ones((1, len(s)), dtype=bool))


def _scalar(vals, ctx):
    vec = _vector_arg(vals[0], "scalar")
    n = vec.present.sum(axis=0)
    one = n == 1
    which = np.argmax(vec.present, axis=0) if len(vec) else np.zeros(len(ctx.steps), dtype=np.int64)
    v = vec.values[which, np.arange(len(ctx.steps))] if len(vec) else np.zeros(len(ctx.steps))
    return Scalar(np.where(one, v, np.nan))


def _sort(vals, ctx):
    return _vector_arg(vals[0], "sort")


def _date(part: str):
    def fn(vals, ctx):
        if vals:
            vec = _vector_arg(vals[0], part)
        else:
            vec = _vector([Scalar(ctx.steps / 1000.0)], ctx)
        v = vec.values
        finite = np.isfinite(v)
        secs = np.where(finite, np.floor(np.where(finite, v, 0)), 0).astype(np.int64)
        d = secs.astype("datetime64[s]")
        days = d.astype("datetime64[D]")
        months = d.astype("datetime64[M]")
        years = d.astype("datetime64[Y]")
        if part == "year":
            out = years.astype(np.int64) + 1970
        elif part == "month":
            out = months.astype(np.int64) % 12 + 1
        elif part == "day_of_month":
            out = (days - months.astype("datetime64[D]")).astype(np.int64) + 1
        elif part == "day_of_year":
            out = (days - years.astype("datetime64[D]")).astype(np.int64) + 1
        elif part == "day_of_week":
            out = (days.astype(np.int64) + 4) % 7
        elif part == "days_in_month":
            out = ((months + 1).astype("datetime64[D]") - months.astype("datetime64[D]")).astype(np.int64)
        elif part == "hour":
            out = secs // 3600 % 24
        else:
            out = secs // 60 % 60
        return _with_values(vec, np.where(finite, out.astype(np.float64), np.nan), vec.present)
    return fn


def _classic_histograms(vec: Vector, ctx) -> list[histograms.BucketGroup]:
    return histograms.group_buckets(vec, ctx.warn)


def _forced_monotonicity(group: histograms.BucketGroup, forced: np.ndarray, ctx) -> None:
    if forced.any():
        ctx.info(annotations.forced_monotonicity(group.labels.get(METRIC_NAME)))


def _group_quantiles(groups: list[histograms.BucketGroup], q: np.ndarray, ctx) -> list[tuple[Labels, np.ndarray, np.ndarray]]:
    """``(labels without le, values, present)`` of the ``q`` quantile of every classic histogram."""
    steps = len(ctx.steps)
    out = []
    for g in groups:
        res = np.full(steps, np.nan)
        present = np.zeros(steps, dtype=bool)
        for rows, cols in g.column_sets():
            vals, forced = histograms.bucket_quantile(q[cols], g.uppers[rows], g.counts[np.ix_(rows, cols)])
            res[cols] = vals
            present[cols] = True
            _forced_monotonicity(g, forced, ctx)
        out.append((g.labels, res, present))
    return out


def _vector_of(rows: list[tuple[Labels, np.ndarray, np.ndarray]], steps: int) -> Vector:
    if not rows:
        return Vector.empty(steps)
    vec = Vector([_engine.drop_name(r[0]) for r in rows], np.array([r[1] for r in rows]),
                 np.array([r[2] for r in rows]))
    return _engine.merge_same_labels(vec, _DUP)


def _histogram_quantile(vals, ctx):
    q = _scalar_arg(vals[0])
    vec = _vector_arg(vals[1], "histogram_quantile")
    _warn_invalid_quantiles(q, ctx)
    return _vector_of(_group_quantiles(_classic_histograms(vec, ctx), q, ctx), len(ctx.steps))


def _histogram_quantiles(node, args, ctx):
    """``histogram_quantiles(v, "label", q...)``: one series per histogram and quantile, the quantile in ``label``."""
    vec = _vector_arg(_engine.evaluate(args[0], ctx), "histogram_quantiles")
    label = _string_arg(args[1], ctx)
    qs = [_scalar_arg(_engine.evaluate(a, ctx)) for a in args[2:]]
    for q in qs:
        _warn_invalid_quantiles(q, ctx)
    groups = _classic_histograms(vec, ctx)
    rows = []
    for q in qs:
        per_group = _group_quantiles(groups, q, ctx)
        # The quantile may differ between steps; each value is its own series.
        nan = np.isnan(q)
        values = ([math.nan] if nan.any() else []) + [float(v) for v in np.unique(q[~nan])]
        for v in values:
            at = nan if math.isnan(v) else q == v
            text = annotations.openmetrics_float(v)
            for lbls, res, present in per_group:
                rows.append((lbls.with_label(label, text), res, present & at))
    return _vector_of(rows, len(ctx.steps))


def _histogram_fraction(vals, ctx):
    lower, upper = _scalar_arg(vals[0]), _scalar_arg(vals[1])
    vec = _vector_arg(vals[2], "histogram_fraction")
    steps = len(ctx.steps)
    rows = []
    for g in _classic_histograms(vec, ctx):
        res = np.full(steps, np.nan)
        present = np.zeros(steps, dtype=bool)
        for brows, cols in g.column_sets():
            res[cols] = histograms.bucket_fraction(lower[cols], upper[cols], g.uppers[brows],
                                                   g.counts[np.ix_(brows, cols)])
            present[cols] = True
        rows.append((g.labels, res, present))
    return _vector_of(rows, steps)


def _min_of(vals, ctx):
    a, b = _scalar_arg(vals[0]), _scalar_arg(vals[1])
    # Go's math.Min: NaN wins, and -0 is below +0.
    out = np.where((a == 0) & (b == 0), np.where(np.signbit(a), a, b), np.minimum(a, b))
    return Scalar(out)


def _max_of(vals, ctx):
    a, b = _scalar_arg(vals[0]), _scalar_arg(vals[1])
    out = np.where((a == 0) & (b == 0), np.where(np.signbit(a), b, a), np.maximum(a, b))
    return Scalar(out)


def _query_start(vals, ctx):
    return Scalar(np.full(len(ctx.steps), ctx.query_start / 1000.0))


def _query_end(vals, ctx):
    return Scalar(np.full(len(ctx.steps), ctx.query_end / 1000.0))


def _query_range(vals, ctx):
    return Scalar(np.full(len(ctx.steps), (ctx.query_end - ctx.query_start) / 1000.0))


def _query_step(vals, ctx):
    # Prometheus folds step() into the query's step (0 for an instant query). Inside a
    # subquery ctx.interval is the subquery's step; the context does not carry the query's.
    step = 0 if ctx.query_start == ctx.query_end else ctx.interval
    return Scalar(np.full(len(ctx.steps), step / 1000.0))


_INSTANT = {
    "round": _round, "clamp_min": _clamp_min, "clamp_max": _clamp_max, "clamp": _clamp,
    "time": _time, "pi": _pi, "vector": _vector, "scalar": _scalar,
    "sort": _sort, "sort_desc": _sort,
    "histogram_quantile": _histogram_quantile,
    "histogram_fraction": _histogram_fraction,
    "min_of": _min_of, "max_of": _max_of,
    "start": _query_start, "end": _query_end, "range": _query_range, "step": _query_step,
    **{p: _date(p) for p in ("year", "month", "day_of_month", "day_of_year", "day_of_week",
                             "days_in_month", "hour", "minute")},
}


# ---- functions that need the AST of their arguments ------------------------------------------

def _timestamp(node, args, ctx):
    arg = args[0]
    while isinstance(arg, pp.ParenExpr):
        arg = arg.expr
    if isinstance(arg, pp.VectorSelector):
        vec, sts = _engine.eval_vector_selector(arg, ctx)
        return _with_values(vec, sts / 1000.0, vec.present)
    vec = _vector_arg(_engine.evaluate(arg, ctx), "timestamp")
    return _with_values(vec, np.broadcast_to(ctx.steps / 1000.0, vec.values.shape).copy(), vec.present)


def _absent_labels(arg) -> Labels:
    while isinstance(arg, pp.ParenExpr):
        arg = arg.expr
    if isinstance(arg, pp.MatrixSelector):
        arg = arg.vector_selector
    if not isinstance(arg, pp.VectorSelector):
        return Labels()
    out: dict[str, str] = {}
    seen: set[str] = set()
    for m in _engine.selector_matchers(arg):
        if m.name == METRIC_NAME:
            continue
        if m.type.value == "=" and m.name not in seen:
            out[m.name] = m.value
            seen.add(m.name)
        else:
            out.pop(m.name, None)
    return Labels.from_dict(out)


def _absent(node, args, ctx):
    val = _vector_arg(_engine.evaluate(args[0], ctx), "absent")
    missing = ~val.present.any(axis=0) if len(val) else np.ones(len(ctx.steps), dtype=bool)
    return Vector([_absent_labels(args[0])], np.ones((1, len(ctx.steps))), missing[None, :])


def _absent_over_time(node, args, ctx):
    rv = _engine.evaluate(args[0], ctx)
    if not isinstance(rv, RangeVector):
        raise ExecutionError("expected a range vector argument in call to function 'absent_over_time'")
    lo, hi = rv.windows()
    missing = ~(hi > lo).any(axis=0) if len(rv.labels) else np.ones(len(ctx.steps), dtype=bool)
    return Vector([_absent_labels(args[0])], np.ones((1, len(ctx.steps))), missing[None, :])


def _string_arg(node, ctx) -> str:
    v = _engine.evaluate(node, ctx)
    if not isinstance(v, String):
        raise ExecutionError("expected a string argument")
    return v.value


_LABEL_NAME = re2.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TEMPLATE = re2.compile(r"\$(?:\$|\{([a-zA-Z0-9_]+)\}|([a-zA-Z0-9_]+))")


def _expand_template(template: str, match) -> str:
    """Go's Regexp.Expand: ``$1``, ``${1}``, ``$name``, ``${name}``, ``$$``; unknown groups expand to ""."""
    out, pos = [], 0
    for m in _TEMPLATE.finditer(template):
        out.append(template[pos:m.start()])
        pos = m.end()
        if m.group(0) == "$$":
            out.append("$")
            continue
        ref = m.group(1) or m.group(2)
        try:
            g = match.group(int(ref)) if ref.isdigit() else match.group(ref)
        except (IndexError, KeyError, ValueError):
            g = None
        out.append(g or "")
    out.append(template[pos:])
    return "".join(out)


def _label_replace(node, args, ctx):
    vec = _vector_arg(_engine.evaluate(args[0], ctx), "label_replace")
    dst, repl, src, regex = (_string_arg(a, ctx) for a in args[1:5])
    try:
        rx = re2.compile("^(?s:" + regex + ")$")
    except re2.error as e:
        raise ExecutionError(f"invalid regular expression in label_replace(): {regex}") from e
    if not _LABEL_NAME.match(dst):
        raise ExecutionError(f"invalid destination label name in label_replace(): {dst}")
    labels = []
    for lb in vec.labels:
        m = rx.match(lb.get(src))
        if m is not None:
            lb = lb.with_label(dst, _expand_template(repl, m))
        labels.append(lb)
    return _engine.merge_same_labels(Vector(labels, vec.values, vec.present), _DUP)


def _label_join(node, args, ctx):
    vec = _vector_arg(_engine.evaluate(args[0], ctx), "label_join")
    dst = _string_arg(args[1], ctx)
    sep = _string_arg(args[2], ctx)
    srcs = [_string_arg(a, ctx) for a in args[3:]]
    if not _LABEL_NAME.match(dst):
        raise ExecutionError(f"invalid destination label name in label_join(): {dst}")
    labels = [lb.with_label(dst, sep.join(lb.get(s) for s in srcs)) for lb in vec.labels]
    return _engine.merge_same_labels(Vector(labels, vec.values, vec.present), _DUP)


def natural_less(a: str, b: str) -> bool:
    """Whether ``a`` sorts before ``b`` in natural order: digit runs compare as numbers (facette/natsort)."""
    x, y = a.encode(), b.encode()
    i = j = 0
    while True:
        if i >= len(x):
            return j < len(y)
        if j >= len(y):
            return False
        cx, cy = x[i], y[j]
        if 48 <= cx <= 57 and 48 <= cy <= 57:
            # A run of digits, leading zeros skipped (but a final zero kept), compares by length then text.
            while cx == 48 and i + 1 < len(x) and 48 <= x[i + 1] <= 57:
                i += 1
                cx = x[i]
            while cy == 48 and j + 1 < len(y) and 48 <= y[j + 1] <= 57:
                j += 1
                cy = y[j]
            ni = 1
            while i + ni < len(x) and 48 <= x[i + ni] <= 57:
                ni += 1
            nj = 1
            while j + nj < len(y) and 48 <= y[j + nj] <= 57:
                nj += 1
            if ni != nj:
                return ni < nj
            ra, rb = x[i:i + ni], y[j:j + nj]
            if ra != rb:
                return ra < rb
            i += ni
            j += nj
            continue
        if cx != cy:
            return cx < cy
        i += 1
        j += 1


def _sort_by_label(node, args, ctx):
    vec = _vector_arg(_engine.evaluate(args[0], ctx), node.func.name)
    names = [_string_arg(a, ctx) for a in args[1:]]
    desc = node.func.name.endswith("_desc")

    def cmp(i: int, j: int) -> int:
        a, b = vec.labels[i], vec.labels[j]
        for n in names:
            va, vb = a.get(n), b.get(n)
            if va != vb:
                return -1 if natural_less(va, vb) else 1
        return (a > b) - (a < b)

    order = sorted(range(len(vec)), key=functools.cmp_to_key(cmp), reverse=desc)
    return vec.take(order)


_SPECIAL = {
    "timestamp": _timestamp,
    "absent": _absent,
    "absent_over_time": _absent_over_time,
    "label_replace": _label_replace,
    "label_join": _label_join,
    "histogram_quantiles": _histogram_quantiles,
    "sort_by_label": _sort_by_label,
    "sort_by_label_desc": _sort_by_label,
}
