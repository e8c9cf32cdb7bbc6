"""Compiled loops of the range functions: one pass over every (series, step) window.

A range vector keeps the samples of all series end to end in flat sorted
arrays (``values.RangeVector``); step ``k`` of series ``i`` sees the samples
with ``left[k] < t <= right[k]``. The range-function kernels take the flat
arrays, the per-series ``offsets`` and the step bounds, find each series'
windows in one merge with the step grid (``_series_windows``, into buffers of
one row) and fold every window right away, so no ``(series, steps)`` index
arrays are built. The numpy versions in ``functions.py`` and
``values.py`` fold all windows at once with ``ufunc.reduceat``, gathers and
masks; they stay as the readable reference, and ``tests/querier/test_kernels.py``
checks these kernels against them bit for bit. The kernels compute each
window's result directly, as Prometheus' ``promql/functions.go`` does sample
by sample, without the temporaries of the array versions.

Where the reference sums with ``np.add.reduceat`` (the counter corrections of
``rate``, the regression sums of ``deriv``/``predict_linear``), numpy adds
the first element of a window to the pairwise sum of the others
(``_reduceat_sum``, a copy of numpy's ``pairwise_sum``), and so do these
kernels, so that results do not change by an ulp. Where the reference
follows Prometheus' Kahan and Welford recurrences, the kernels run those
recurrences (``_kahan_inc`` is ``kahansum.Inc``).

Every range-function kernel returns ``(out, ok)`` of shape ``(series, steps)``;
``out`` is meaningless where ``ok`` is false. The aggregation kernels at the
end fold the rows of an instant vector by group. All release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np

_PW_BLOCKSIZE = 128  # numpy's PW_BLOCKSIZE


@numba.njit(cache=True, nogil=True, error_model="numpy")
def is_monotone(left, right):
    """Whether the window bounds never decrease from one step to the next (every grid without ``@``)."""
    for k in range(1, left.shape[0]):
        if left[k] < left[k - 1] or right[k] < right[k - 1]:
            return False
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _series_windows(ts, a0, b0, left, right, monotone, lo, hi):
    """Fills ``lo``/``hi`` (one per step) for the sorted samples ``ts[a0:b0]``: those with ``left[k] < t <= right[k]``.

    With monotone bounds the series is merged with the step grid in one
    pass; otherwise every bound is a binary search.
    """
    if monotone:
        a = a0
        b = a0
        for k in range(left.shape[0]):
            lk, rk = left[k], right[k]
            while a < b0 and ts[a] <= lk:
                a += 1
            if b < a:
                b = a
            while b < b0 and ts[b] <= rk:
                b += 1
            lo[k] = a
            hi[k] = b
    else:
        for k in range(left.shape[0]):
            lo[k] = a0 + np.searchsorted(ts[a0:b0], left[k], side="right")
            hi[k] = a0 + np.searchsorted(ts[a0:b0], right[k], side="right")


@numba.njit(cache=True, nogil=True, error_model="numpy")
def window_bounds(ts, offsets, left, right, lo, hi):
    """Fills ``lo``/``hi`` (shape ``(series, steps)``): the samples of series ``i`` with ``left[k] < t <= right[k]``."""
    monotone = is_monotone(left, right)
    for i in range(offsets.shape[0] - 1):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo[i], hi[i])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pairwise_sum(a, start, n):
    """numpy's ``pairwise_sum`` of ``a[start:start + n]``: the exact order of additions of ``np.add.reduce``."""
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += a[i]
        return res
    if n <= _PW_BLOCKSIZE:
        r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
        r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
        i = 8
        top = n - n % 8
        while i < top:
            j = start + i
            r0 += a[j]
            r1 += a[j + 1]
            r2 += a[j + 2]
            r3 += a[j + 3]
            r4 += a[j + 4]
            r5 += a[j + 5]
            r6 += a[j + 6]
            r7 += a[j + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[start + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a, start, n2) + _pairwise_sum(a, start + n2, n - n2)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _reduceat_sum(a, lo, hi):
    """``np.add.reduceat`` of one non-empty window ``a[lo:hi]``: the first element plus the pairwise sum of the rest."""
    acc = a[lo]
    if hi - lo > 1:
        acc += _pairwise_sum(a, lo + 1, hi - lo - 1)
    return acc


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _kahan_inc(inc, total, c):
    """Prometheus' ``kahansum.Inc``: the new Kahan-Babuska-Neumaier sum and compensation."""
    t = total + inc
    if np.isinf(t):
        c = 0.0
    elif abs(total) >= abs(inc):
        c += (total - t) + inc
    else:
        c += (inc - t) + total
    return t, c


@numba.njit(cache=True, nogil=True, error_model="numpy")
def extrapolated(ts, values, offsets, left, right, range_ms, is_counter, is_rate):
    """``rate``/``increase`` (``is_counter``) and ``delta``: Prometheus' extrapolatedRate of every window.

    Counter resets add the value before the reset, summed as the reference
    does (``_reduceat_sum`` of the per-sample corrections).
    """
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    longest = 0
    if is_counter:
        for i in range(n):
            longest = max(longest, offsets[i + 1] - offsets[i])
    # Per series: the value before a reset at every sample (else 0), and how many resets precede it.
    corr = np.zeros(longest)
    resets = np.zeros(longest + 1, dtype=np.int64)
    range_s = range_ms / 1000.0
    for i in range(n):
        a0 = offsets[i]
        _series_windows(ts, a0, offsets[i + 1], left, right, monotone, lo_i, hi_i)
        if is_counter:
            for j in range(1, offsets[i + 1] - a0):
                r = values[a0 + j] < values[a0 + j - 1]
                corr[j] = values[a0 + j - 1] if r else 0.0
                resets[j + 1] = resets[j] + (1 if r else 0)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            count = b - a
            if count < 2:
                continue
            ok[i, k] = True
            v_first, v_last = values[a], values[b - 1]
            t_first, t_last = ts[a], ts[b - 1]
            result = v_last - v_first
            if is_counter:
                if resets[b - a0] - resets[a + 1 - a0] > 0:
                    result = result + _reduceat_sum(corr, a + 1 - a0, b - a0)
                else:
                    result = result + 0.0
            to_start = (t_first - left[k]) / 1000.0
            to_end = (right[k] - t_last) / 1000.0
            sampled = (t_last - t_first) / 1000.0
            avg = sampled / (count - 1)
            threshold = avg * 1.1
            if to_start >= threshold:
                to_start = avg / 2
            if is_counter:
                to_zero = sampled * (v_first / result) if (result > 0 and v_first >= 0) else to_start
                if to_zero < to_start:
                    to_start = to_zero
            if to_end >= threshold:
                to_end = avg / 2
            factor = (sampled + to_start + to_end) / sampled if sampled != 0 else 1.0
            if is_rate:
                factor = factor / range_s
            out[i, k] = result * factor
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def instant_delta(ts, values, offsets, left, right, is_rate):
    """``irate`` and ``idelta``: the last two samples of every window."""
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            b = hi_i[k]
            if b - lo_i[k] < 2:
                continue
            v_last, v_prev = values[b - 1], values[b - 2]
            if not is_rate:
                out[i, k] = v_last - v_prev
                ok[i, k] = True
                continue
            dt = (ts[b - 1] - ts[b - 2]) / 1000.0
            if dt == 0:
                continue
            ok[i, k] = True
            out[i, k] = (v_last if v_last < v_prev else v_last - v_prev) / dt
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def extreme(ts, values, offsets, left, right, largest):
    """``max_over_time``/``min_over_time``: the first sample replaced by every later one that beats it or where it is NaN."""
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            if b <= a:
                continue
            ok[i, k] = True
            best = values[a]
            for j in range(a + 1, b):
                x = values[j]
                if (x > best if largest else x < best) or np.isnan(best):
                    best = x
            out[i, k] = best
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def sum_over_time(ts, values, offsets, left, right):
    """Kahan sum of every window (the sum alone where it is infinite), as Prometheus' sum_over_time."""
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            if b <= a:
                continue
            ok[i, k] = True
            total, c = 0.0, 0.0
            for j in range(a, b):
                total, c = _kahan_inc(values[j], total, c)
            out[i, k] = total if np.isinf(total) else total + c
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def avg_over_time(ts, values, offsets, left, right):
    """Prometheus' avg_over_time: a Kahan sum over the count, or a running mean once the sum overflows."""
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            if b <= a:
                continue
            ok[i, k] = True
            total, c, mean, count = 0.0, 0.0, 0.0, 0.0
            incremental = False
            for j in range(a, b):
                x = values[j]
                count += 1.0
                if not incremental:
                    new_total, new_c = _kahan_inc(x, total, c)
                    if count == 1.0 or not np.isinf(new_total):
                        total, c = new_total, new_c
                        continue
                    incremental = True
                    mean = total / (count - 1.0)
                    c = c / (count - 1.0)
                q = (count - 1.0) / count
                mean, c = _kahan_inc(x / count, q * mean, q * c)
            out[i, k] = mean + c if incremental else total / count + c / count
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def variance_over_time(ts, values, offsets, left, right):
    """Prometheus' varianceOverTime: Welford's update with Kahan-compensated mean and sum of squares."""
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            if b <= a:
                continue
            ok[i, k] = True
            count, mean, c_mean, aux, c_aux = 0.0, 0.0, 0.0, 0.0, 0.0
            for j in range(a, b):
                x = values[j]
                count += 1.0
                delta = x - (mean + c_mean)
                mean, c_mean = _kahan_inc(delta / count, mean, c_mean)
                aux, c_aux = _kahan_inc(delta * (x - (mean + c_mean)), aux, c_aux)
            out[i, k] = (aux + c_aux) / count
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _stable_sort(buf, idx, n):
    """Sorts ``buf[:n]`` ascending, stably (equal values such as -0.0 and 0.0 keep their order)."""
    if n <= 64:
        for j in range(1, n):
            x = buf[j]
            p = j - 1
            while p >= 0 and buf[p] > x:
                buf[p + 1] = buf[p]
                p -= 1
            buf[p + 1] = x
        return
    order = np.argsort(buf[:n], kind="mergesort")
    for j in range(n):
        idx[j] = buf[order[j]]
    buf[:n] = idx[:n]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sorted_window(values, a, b, buf, tmp):
    """The samples ``values[a:b]`` into ``buf``, NaN first and then ascending, as Prometheus' quantile sorts them."""
    nan = 0
    for j in range(a, b):
        if np.isnan(values[j]):
            buf[nan] = values[j]
            nan += 1
    m = nan
    for j in range(a, b):
        if not np.isnan(values[j]):
            buf[m] = values[j]
            m += 1
    _stable_sort(buf[nan:], tmp, m - nan)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _quantile_sorted(buf, cnt, q):
    """Prometheus' quantile (linear interpolation) of the sorted ``buf[:cnt]`` (``cnt`` > 0)."""
    if np.isnan(q):
        return np.nan
    if q < 0:
        return -np.inf
    if q > 1:
        return np.inf
    rank = q * (cnt - 1)
    lower = max(0.0, np.floor(rank))
    upper = min(float(cnt - 1), lower + 1)
    weight = rank - np.floor(rank)
    return buf[int(lower)] * (1 - weight) + buf[int(upper)] * weight


@numba.njit(cache=True, nogil=True, error_model="numpy")
def quantile_over_time(ts, values, offsets, left, right, q):
    """Prometheus' quantile of every window; ``q`` per step."""
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    out = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    longest = 0
    for i in range(n):
        longest = max(longest, offsets[i + 1] - offsets[i])
    buf = np.empty(longest)
    tmp = np.empty(longest)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            if b <= a:
                continue
            ok[i, k] = True
            qk = q[k]
            if np.isnan(qk) or qk < 0 or qk > 1:
                out[i, k] = _quantile_sorted(buf, 1, qk)
                continue
            _sorted_window(values, a, b, buf, tmp)
            out[i, k] = _quantile_sorted(buf, b - a, qk)
    return out, ok


@numba.njit(cache=True, nogil=True, error_model="numpy")
def group_quantile(values, present, starts, counts, q):
    """``quantile(q, v)`` per group of rows (consecutive from ``starts``) and step, of the present rows."""
    groups, steps = starts.shape[0], values.shape[1]
    out = np.full((groups, steps), np.nan)
    longest = 0
    for g in range(groups):
        longest = max(longest, counts[g])
    buf = np.empty(longest)
    tmp = np.empty(longest)
    col = np.empty(longest)
    for g in range(groups):
        s = starts[g]
        for k in range(steps):
            m = 0
            for r in range(s, s + counts[g]):
                if present[r, k]:
                    col[m] = values[r, k]
                    m += 1
            if m == 0:
                continue
            _sorted_window(col, 0, m, buf, tmp)
            out[g, k] = _quantile_sorted(buf, m, q[k])
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def regression(ts, x, y, xy, x2, values, shift, offsets, left, right, xi):
    """Slope and intercept at ``xi[k]`` of every window, as ``functions._regression`` computes them.

    ``x`` is time in seconds from a base, ``y`` the values minus their
    series' first finite value (``shift``); the sums are ``np.add.reduceat``'s.
    A window of equal values has slope 0 and that value as intercept (NaN
    for both if the value is infinite).
    """
    n, steps = offsets.shape[0] - 1, left.shape[0]
    monotone = is_monotone(left, right)
    lo_i = np.empty(steps, dtype=np.int64)
    hi_i = np.empty(steps, dtype=np.int64)
    slope = np.zeros((n, steps))
    intercept = np.zeros((n, steps))
    ok = np.zeros((n, steps), dtype=np.bool_)
    for i in range(n):
        _series_windows(ts, offsets[i], offsets[i + 1], left, right, monotone, lo_i, hi_i)
        for k in range(steps):
            a, b = lo_i[k], hi_i[k]
            if b - a < 2:
                continue
            ok[i, k] = True
            first = values[a]
            const = not np.isnan(first)
            for j in range(a + 1, b):
                if values[j] != first:
                    const = False
                    break
            if const:
                if np.isinf(first):
                    slope[i, k] = np.nan
                    intercept[i, k] = np.nan
                else:
                    intercept[i, k] = first
                continue
            cnt = float(b - a)
            sx = _reduceat_sum(x, a, b)
            sy = _reduceat_sum(y, a, b)
            sxy = _reduceat_sum(xy, a, b)
            sx2 = _reduceat_sum(x2, a, b)
            cov = sxy - sx * sy / cnt
            var = sx2 - sx * sx / cnt
            s = cov / var
            slope[i, k] = s
            intercept[i, k] = sy / cnt + shift[a] - s * (sx / cnt - xi[k])
    return slope, intercept, ok


# ---- aggregations over rows of an instant vector -----------------------------------------------

@numba.njit(cache=True, nogil=True, error_model="numpy")
def group_sum(values, present, gid, groups):
    """Per group and step: how many rows are present, and their Kahan sum and compensation in row order.

    ``aggregations.kahan_group_sum`` (the reference) also adds 0.0 for absent
    rows; that changes neither the sum nor, but for the sign of a zero, the
    compensation, and so not their total.
    """
    steps = values.shape[1]
    n = np.zeros((groups, steps))
    total = np.zeros((groups, steps))
    comp = np.zeros((groups, steps))
    for r in range(values.shape[0]):
        g = gid[r]
        for k in range(steps):
            if present[r, k]:
                n[g, k] += 1.0
                total[g, k], comp[g, k] = _kahan_inc(values[r, k], total[g, k], comp[g, k])
    return n, total, comp


@numba.njit(cache=True, nogil=True, error_model="numpy")
def group_count(present, gid, groups):
    """Per group and step: how many rows are present."""
    steps = present.shape[1]
    n = np.zeros((groups, steps))
    for r in range(present.shape[0]):
        g = gid[r]
        for k in range(steps):
            if present[r, k]:
                n[g, k] += 1.0
    return n


@numba.njit(cache=True, nogil=True, error_model="numpy")
def group_any(present, gid, groups, marked):
    """Per group and step: whether a present row is ``marked``."""
    steps = present.shape[1]
    out = np.zeros((groups, steps), dtype=np.bool_)
    for r in range(present.shape[0]):
        if marked[r]:
            g = gid[r]
            for k in range(steps):
                if present[r, k]:
                    out[g, k] = True
    return out
