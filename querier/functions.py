"""PromQL functions, each evaluated over all steps at once.

Range functions (``rate``, ``*_over_time``, ...) receive a ``RangeVector``
and its ``[lo, hi)`` window indices per (series, step) and fold the flat
sample arrays with ``ufunc.reduceat`` or gather single samples (first,
last); instant functions map arrays element-wise. The semantics (counter
resets, extrapolation, NaN handling) are those of Prometheus'
``promql/functions.go``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import promql_parser as pp
import re2

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


def _avg_over_time(rv, _args, ctx):
    lo, hi, count, nonempty, _ = _basics(rv)
    with np.errstate(all="ignore"):
        return window_reduce(np.add, rv.values, lo, hi) / np.maximum(count, 1), nonempty


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


def _variance(rv: RangeVector) -> tuple[np.ndarray, np.ndarray]:
    x, wid, starts, cnt, nonempty = _expand(rv)
    out = np.zeros(len(cnt))
    if len(x):
        sums = np.bincount(wid, weights=x, minlength=len(cnt))
        with np.errstate(all="ignore"):
            mean = sums / np.maximum(cnt, 1)
            dev = x - mean[wid]
            out = np.bincount(wid, weights=dev * dev, minlength=len(cnt)) / np.maximum(cnt, 1)
            # bincount drops NaN/Inf propagation subtleties; recompute windows holding non-finite values.
            bad = np.bincount(wid, weights=~np.isfinite(x), minlength=len(cnt)) > 0
            out[bad] = np.nan
    return out.reshape(nonempty.shape), nonempty


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


def _quantile_over_time(rv, args, ctx):
    q = _scalar_arg(args[0])
    x, wid, starts, cnt, nonempty = _expand(rv)
    qq = np.broadcast_to(q[None, :], nonempty.shape).ravel()
    return _quantiles(x, wid, starts, cnt, qq).reshape(nonempty.shape), nonempty


def _mad_over_time(rv, args, ctx):
    x, wid, starts, cnt, nonempty = _expand(rv)
    half = np.full(len(cnt), 0.5)
    med = _quantiles(x, wid, starts, cnt, half)
    dev = np.abs(x - med[wid]) if len(x) else x
    return _quantiles(dev, wid, starts, cnt, half).reshape(nonempty.shape), nonempty


def _regression(rv: RangeVector, intercept_ms: np.ndarray):
    """Least-squares slope (per second) and intercept at ``intercept_ms`` of every window, as Prometheus."""
    lo, hi, count, nonempty, last = _basics(rv)
    ok = count >= 2
    ts, v = rv.ts, rv.values
    base = int(ts[0]) if len(ts) else 0
    x = (ts - base) / 1000.0
    shift = np.zeros(len(v))
    if len(v):
        sizes = np.diff(rv.offsets)
        firsts = v[rv.offsets[:-1][sizes > 0]]
        shift = np.repeat(np.where(np.isfinite(firsts), firsts, 0.0), sizes[sizes > 0])
    y = v - shift
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


def _deriv(rv, _args, ctx):
    slope, _, ok = _regression(rv, np.zeros(1))
    return slope, ok


def _predict_linear(rv, args, ctx):
    horizon = _scalar_arg(args[0])[None, :]
    slope, intercept, ok = _regression(rv, ctx.steps[None, :])
    return intercept + slope * horizon, ok


def _absent_over_time_values(rv, _args, ctx):
    raise AssertionError("handled as a special function")


_RANGE = {
    "rate": _extrapolated(True, True),
    "increase": _extrapolated(True, False),
    "delta": _extrapolated(False, False),
    "irate": _instant_delta(True),
    "idelta": _instant_delta(False),
    "sum_over_time": _fold(np.add),
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
    "deriv": _deriv,
    "predict_linear": _predict_linear,
}


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


def _histogram_quantile(vals, ctx):
    q = _scalar_arg(vals[0])
    vec = _vector_arg(vals[1], "histogram_quantile")
    groups: dict[Labels, list[tuple[float, int]]] = {}
    for i, lb in enumerate(vec.labels):
        le = lb.get("le")
        try:
            upper = float(le.replace("Inf", "inf")) if le else None
        except ValueError:
            upper = None
        if upper is None:
            continue
        key = _engine.drop_name(lb.without(("le",)))
        groups.setdefault(key, []).append((upper, i))
    steps = len(ctx.steps)
    labels, out, present = [], [], []
    for key, buckets in groups.items():
        buckets.sort(key=lambda b: b[0])
        uppers = np.array([b[0] for b in buckets])
        rows = [b[1] for b in buckets]
        vals_g, pres_g = vec.values[rows], vec.present[rows]
        res = np.full(steps, np.nan)
        any_p = pres_g.any(axis=0)
        for k in np.flatnonzero(any_p):
            p = pres_g[:, k]
            res[k] = bucket_quantile(float(q[k]), uppers[p], vals_g[p, k])
        labels.append(key)
        out.append(res)
        present.append(any_p)
    if not labels:
        return Vector.empty(steps)
    return _engine.merge_same_labels(Vector(labels, np.array(out), np.array(present)), _DUP)


def _almost_equal(a: float, b: float, eps: float) -> bool:
    if a == b:
        return True
    min_normal = 2.2250738585072014e-308
    abs_sum = abs(a) + abs(b)
    diff = abs(a - b)
    if a == 0 or b == 0 or abs_sum < min_normal:
        return diff < eps * min_normal
    return diff / min(abs_sum, 1.7976931348623157e308) < eps


def bucket_quantile(q: float, uppers: np.ndarray, counts: np.ndarray) -> float:
    """The ``q`` quantile of a classic histogram (``uppers`` sorted ascending), as Prometheus' BucketQuantile."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if len(uppers) == 0 or not math.isinf(uppers[-1]) or uppers[-1] < 0:
        return math.nan
    ub: list[float] = []
    cnt: list[float] = []
    for u, c in zip(uppers.tolist(), counts.tolist()):
        if ub and ub[-1] == u:
            cnt[-1] += c
        else:
            ub.append(u)
            cnt.append(c)
    prev = cnt[0]
    for i in range(1, len(cnt)):
        cur = cnt[i]
        if cur == prev:
            continue
        if _almost_equal(prev, cur, 1e-12) or cur < prev:
            cnt[i] = prev
            continue
        prev = cur
    if len(ub) < 2:
        return math.nan
    observations = cnt[-1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(cnt) - 1) if cnt[i] >= rank), len(cnt) - 1)
    if b == len(cnt) - 1:
        return ub[-2]
    if b == 0 and ub[0] <= 0:
        return ub[0]
    start, end, count = 0.0, ub[b], cnt[b]
    if b > 0:
        start = ub[b - 1]
        count -= cnt[b - 1]
        rank -= cnt[b - 1]
    return start + (end - start) * (rank / count)


_INSTANT = {
    "round": _round, "clamp_min": _clamp_min, "clamp_max": _clamp_max, "clamp": _clamp,
    "time": _time, "pi": _pi, "vector": _vector, "scalar": _scalar,
    "sort": _sort, "sort_desc": _sort,
    "histogram_quantile": _histogram_quantile,
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


def _sort_by_label(node, args, ctx):
    vec = _vector_arg(_engine.evaluate(args[0], ctx), node.func.name)
    names = [_string_arg(a, ctx) for a in args[1:]]
    order = sorted(range(len(vec)), key=lambda i: ([vec.labels[i].get(n) for n in names], vec.labels[i]),
                   reverse=node.func.name.endswith("_desc"))
    return vec.take(order)


_SPECIAL = {
    "timestamp": _timestamp,
    "absent": _absent,
    "absent_over_time": _absent_over_time,
    "label_replace": _label_replace,
    "label_join": _label_join,
    "sort_by_label": _sort_by_label,
    "sort_by_label_desc": _sort_by_label,
}
