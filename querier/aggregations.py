"""PromQL aggregation operators (``sum``, ``avg``, ``topk``, ... ``by``/``without``) over all steps at once.

Each input row is assigned a group; a group's value at a step folds the
rows present at that step (``ufunc.reduceat`` over rows sorted by group).
Semantics as Prometheus' ``promql/engine.go`` aggregation(): NaN is the
result of ``min``/``max`` only when every input is NaN, ``topk`` ranks NaN
below every number, ``stddev``/``stdvar`` use Welford's online update in
input order, output labels are the grouping labels (the input labels for
``topk``/``bottomk``/``limitk``/``limit_ratio``). A group's output is marked
for metric-name removal if an input marked so was aggregated at the group's
last step (Prometheus' ``DropName`` of the output series).
"""

from __future__ import annotations

import math

import numpy as np
import promql_parser as pp

from querier import annotations, kernels
from querier import engine as _engine
from querier.errors import ExecutionError, Unsupported
from querier.functions import _quantiles
from querier.values import DropNameLabels, Scalar, String, Vector, mark_drop_name
from store.labels import METRIC_NAME, Labels

_LABEL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def grouping(node: pp.AggregateExpr) -> tuple[bool, list[str]]:
    """(without?, label names) of the aggregation's modifier; ``by ()`` when there is none."""
    mod = node.modifier
    if mod is None:
        return False, []
    return str(mod.type).endswith("Without"), list(mod.labels)


def group_labels(lbls: Labels, without: bool, names: list[str]) -> Labels:
    if without:
        return lbls.without(names + [METRIC_NAME])
    return lbls.keep(names)


def evaluate_aggregate(node: pp.AggregateExpr, ctx: "_engine.EvalContext") -> Vector:
    op = str(node.op).lower()
    param = _engine.evaluate(node.param, ctx) if node.param is not None else None
    vec = _engine.evaluate(node.expr, ctx)
    if not isinstance(vec, Vector):
        raise ExecutionError(f"expected an instant vector in aggregation {op}")
    without, names = grouping(node)
    steps = len(ctx.steps)
    if op == "count_values":
        if not isinstance(param, String):
            raise ExecutionError("count_values needs a string parameter")
        return _count_values(vec, param.value, without, names, steps)
    keys: dict[Labels, int] = {}
    gid = np.empty(len(vec), dtype=np.int64)
    for i, lb in enumerate(vec.labels):
        gid[i] = keys.setdefault(group_labels(lb, without, names), len(keys))
    labels = list(keys)
    if op in ("topk", "bottomk", "limitk"):
        if not isinstance(param, Scalar):
            raise ExecutionError(f"{op} needs a scalar parameter")
        k = _k_param(param.values)
        if k is None or len(vec) == 0:
            return Vector.empty(steps)
        if op == "limitk":
            return _limitk(vec, gid, len(labels), k)
        return _topk(vec, gid, len(labels), k, op == "topk")
    if op == "limit_ratio":
        if not isinstance(param, Scalar):
            raise ExecutionError(f"{op} needs a scalar parameter")
        r = _ratio_param(param.values, ctx)
        if r is None or len(vec) == 0:
            return Vector.empty(steps)
        return _limit_ratio(vec, r)
    if op == "quantile" and isinstance(param, Scalar):
        _check_quantile(param.values, ctx)
    if len(vec) == 0:
        return Vector.empty(steps)
    G = len(labels)
    rows = _GroupRows(vec, gid, G)
    with np.errstate(all="ignore"):
        if op in ("sum", "avg"):
            n, total, comp = kernels.group_sum(rows.values, rows.present, gid, G)
            total = np.where(np.isinf(total), total, total + comp)  # kahan_group_sum of the present rows
            if op == "sum":
                out = total
            else:
                mean = total / np.maximum(n, 1)
                if np.isinf(mean).any():
                    vals, pres, starts, counts = rows.sorted()
                    overflow = np.isinf(mean) & ~np.isinf(np.fmax.reduceat(np.where(pres, np.abs(vals), 0.0), starts, axis=0))
                    if overflow.any():
                        # The sum left the float range although no input is infinite: average x/n instead.
                        scaled = np.where(pres, vals / np.repeat(np.maximum(n, 1), counts, axis=0), 0.0)
                        mean = np.where(overflow, kahan_group_sum(scaled, starts, counts), mean)
                out = mean
        else:
            n = kernels.group_count(rows.present, gid, G)
            if op in ("stddev", "stdvar"):
                out = welford_group_variance(*rows.sorted())
                if op == "stddev":
                    out = np.sqrt(out)
            elif op == "count":
                out = n
            elif op == "group":
                out = np.ones_like(n)
            elif op == "min":
                vals, pres, starts, _ = rows.sorted()
                out = np.fmin.reduceat(np.where(pres, vals, np.nan), starts, axis=0)
            elif op == "max":
                vals, pres, starts, _ = rows.sorted()
                out = np.fmax.reduceat(np.where(pres, vals, np.nan), starts, axis=0)
            elif op == "quantile":
                if not isinstance(param, Scalar):
                    raise ExecutionError("quantile needs a scalar parameter")
                vals, pres, starts, counts = rows.sorted()
                out = kernels.group_quantile(vals, pres, starts, counts,
                                             np.ascontiguousarray(param.values, dtype=np.float64))
            else:
                raise Unsupported(f"aggregation {op} is not supported")
    present = n > 0
    marked = np.array([isinstance(lb, DropNameLabels) for lb in vec.labels])
    if marked.any():
        labels = _mark_groups(labels, kernels.group_any(rows.present, gid, G, marked), present)
    return Vector(labels, out, present)


class _GroupRows:
    """The rows of an aggregation's input, and on demand sorted by group (stably) with the groups' starts and sizes."""

    def __init__(self, vec: Vector, gid: np.ndarray, groups: int) -> None:
        self.values = np.ascontiguousarray(vec.values, dtype=np.float64)
        self.present = np.ascontiguousarray(vec.present, dtype=np.bool_)
        self.gid, self.groups = gid, groups
        self._sorted = None

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(values, present, starts, counts)`` with the rows ordered by group."""
        if self._sorted is None:
            order = np.argsort(self.gid, kind="stable")
            counts = np.bincount(self.gid, minlength=self.groups)
            starts = np.zeros(self.groups, dtype=np.int64)
            np.cumsum(counts[:-1], out=starts[1:])
            self._sorted = self.values[order], self.present[order], starts, counts
        return self._sorted


def _mark_groups(labels: list[Labels], any_marked: np.ndarray, present: np.ndarray) -> list[Labels]:
    """Marks the groups that aggregated a marked input (``any_marked`` per group and step) at their last present step."""
    T = present.shape[1]
    last = T - 1 - np.argmax(present[:, ::-1], axis=1)
    drop = any_marked[np.arange(len(labels)), last] & present.any(axis=1)
    return [mark_drop_name(lb) if d else lb for lb, d in zip(labels, drop.tolist())]


def welford_group_variance(vals: np.ndarray, pres: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per group (consecutive rows from ``starts``), the population variance of the present rows.

    Welford's online update in row order, as Prometheus' stdvar: the first
    value sets the mean (and makes the result NaN if it is NaN or infinite),
    each further one moves the mean by ``delta / n`` and adds
    ``delta * (x - new mean)``. Identical inputs give exactly 0.
    """
    G, T = len(starts), vals.shape[1]
    n = np.zeros((G, T))
    mean = np.zeros((G, T))
    m2 = np.zeros((G, T))
    with np.errstate(all="ignore"):
        for r in range(int(counts.max()) if G else 0):
            groups = np.flatnonzero(counts > r)
            x = vals[starts[groups] + r]
            p = pres[starts[groups] + r]
            cnt = n[groups] + p
            first = p & (cnt == 1)
            later = p & (cnt > 1)
            mu, acc = mean[groups], m2[groups]
            delta = x - mu
            new_mu = mu + delta / np.maximum(cnt, 1)
            acc = np.where(later, acc + delta * (x - new_mu), acc)
            acc = np.where(first, np.where(np.isfinite(x), 0.0, np.nan), acc)
            mean[groups] = np.where(first, x, np.where(later, new_mu, mu))
            m2[groups] = acc
            n[groups] = cnt
        return m2 / np.maximum(n, 1)


def _check_quantile(q: np.ndarray, ctx: "_engine.EvalContext") -> None:
    """Prometheus' warnings for a quantile parameter outside [0, 1] at any step (NaN included)."""
    if np.isnan(q).any():
        ctx.warn(annotations.invalid_quantile(math.nan))
        return  # a NaN makes Go's running min and max NaN, so no other warning follows
    if q.max() > 1:
        ctx.warn(annotations.invalid_quantile(float(q.max())))
    if q.min() < 0:
        ctx.warn(annotations.invalid_quantile(float(q.min())))


_MIN_INT64 = -9223372036854775808.0
_MAX_INT64 = 9223372036854774784.0  # the largest float64 below 2**63


def _k_param(k: np.ndarray) -> np.ndarray | None:
    """The per-step ``k`` of topk/bottomk/limitk, truncated toward zero; None if every k is below 1.

    Checked over all steps at once, in Prometheus' order: all below one gives
    an empty result, then NaN and int64 overflow are errors.
    """
    if len(k) == 0 or k.max() < 1:  # a NaN makes max() NaN, so it reaches the NaN check
        return None
    if np.isnan(k).any():
        raise ExecutionError("Parameter value is NaN")
    if k.min() <= _MIN_INT64:
        raise ExecutionError(f"Scalar value {annotations.go_float(float(k.min()))} underflows int64")
    if k.max() >= _MAX_INT64:
        raise ExecutionError(f"Scalar value {annotations.go_float(float(k.max()))} overflows int64")
    return np.trunc(k)


def _ratio_param(r: np.ndarray, ctx: "_engine.EvalContext") -> np.ndarray | None:
    """The per-step ratio of limit_ratio capped to [-1, 1]; None if every ratio is 0."""
    if len(r) == 0 or (r.max() == 0 and r.min() == 0):
        return None
    if np.isnan(r).any():
        raise ExecutionError("Ratio value is NaN")
    if r.max() > 1:
        ctx.warn(_invalid_ratio(float(r.max()), 1.0))
    if r.min() < -1:
        ctx.warn(_invalid_ratio(float(r.min()), -1.0))
    return np.clip(r, -1.0, 1.0)


def _invalid_ratio(r: float, to: float) -> str:
    """Prometheus' NewInvalidRatioWarning text."""
    return (f"PromQL warning: ratio value should be between -1 and 1, got {annotations.go_float(r)}, "
            f"capping to {annotations.go_float(to)}")


def _limitk(vec: Vector, gid: np.ndarray, G: int, k: np.ndarray) -> Vector:
    """The first ``k`` series present at each step in every group, in input order, unchanged."""
    order = np.argsort(gid, kind="stable")
    pres = vec.present[order]
    seen = np.cumsum(pres, axis=0)  # present rows up to and including this one, counted over all groups
    counts = np.bincount(gid, minlength=G)
    starts = np.zeros(G, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    before = np.where(starts[:, None] > 0, seen[np.maximum(starts - 1, 0)], 0)  # present rows of earlier groups
    rank = seen - np.repeat(before, counts, axis=0)  # 1-based rank within the group where present
    selected = np.zeros_like(vec.present)
    selected[order] = pres & (rank <= k[None, :])
    return Vector(list(vec.labels), vec.values, selected).compact()


def ratio_offset(lbls: Labels) -> float:
    """Where a series falls in [0, 1] for limit_ratio: its label hash over the largest uint64, as Prometheus."""
    return float(lbls.hash()) / float(2**64 - 1)


def _limit_ratio(vec: Vector, r: np.ndarray) -> Vector:
    """The series whose ratio offset is below ``r`` (``r >= 0``) or at least ``1 + r`` (``r < 0``), per step.

    The choice depends on the labels only, so ``limit_ratio(r, x)`` and
    ``limit_ratio(r - 1, x)`` are complements (``r`` in (0, 1)).
    """
    off = np.array([ratio_offset(lb) for lb in vec.labels])[:, None]
    rr = r[None, :]
    keep = ((rr >= 0) & (off < rr)) | ((rr < 0) & (off >= 1.0 + rr))  # r == 0 keeps nothing
    return Vector(list(vec.labels), vec.values, vec.present & keep).compact()


def kahan_group_sum(vals: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per group (consecutive rows from ``starts``), the Kahan-Neumaier sum of the rows, as Prometheus sums.

    Iterates over the position within the group, so the Python loop runs as
    many times as the largest group has rows; each pass is one array operation.
    """
    G, T = len(starts), vals.shape[1]
    total = np.zeros((G, T))
    comp = np.zeros((G, T))
    with np.errstate(all="ignore"):
        for r in range(int(counts.max()) if G else 0):
            groups = np.flatnonzero(counts > r)
            inc = vals[starts[groups] + r]
            s = total[groups]
            t = s + inc
            c = np.where(np.abs(s) >= np.abs(inc), (s - t) + inc, (inc - t) + s)
            comp[groups] = np.where(np.isinf(t), 0.0, comp[groups] + c)
            total[groups] = t
        out = total + comp
    return np.where(np.isinf(total), total, out)


def _group_quantile(vals, pres, order, gid, G, q) -> np.ndarray:
    T = vals.shape[1]
    g_sorted = gid[order]
    rows, cols = np.nonzero(pres)
    x = vals[rows, cols]
    wid = g_sorted[rows] * T + cols
    cnt = np.bincount(wid, minlength=G * T)
    starts = np.zeros(G * T, dtype=np.int64)
    np.cumsum(cnt[:-1], out=starts[1:])
    qq = np.broadcast_to(q[None, :], (G, T)).ravel()
    return _quantiles(x, wid, starts, cnt, qq).reshape(G, T)


def _topk(vec: Vector, gid: np.ndarray, G: int, k: np.ndarray, top: bool) -> Vector:
    kk = np.where(k >= 1, np.minimum(k, len(vec)), 0)
    selected = np.zeros_like(vec.present)
    for g in range(G):
        rows = np.flatnonzero(gid == g)
        v, p = vec.values[rows], vec.present[rows]
        # NaN ranks below every number for topk and above every number for bottomk.
        key = np.where(np.isnan(v), -np.inf, v) if top else -np.where(np.isnan(v), np.inf, v)
        nan_last = np.isnan(v)
        order = np.lexsort((nan_last.T, -key.T, ~p.T))  # shape (T, m): rows by presence, value, NaN
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(len(rows))[None, :].repeat(order.shape[0], axis=0), axis=1)
        selected[rows] = p & (rank.T < kk[None, :])
    return Vector(list(vec.labels), vec.values, selected).compact()


def format_value(v: float) -> str:
    """A float as Go's ``strconv.FormatFloat(v, 'f', -1, 64)`` (and Prometheus' ``+Inf``/``-Inf``/``NaN``)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    s = repr(v)
    if "e" in s or "E" in s:
        from decimal import Decimal

        s = format(Decimal(s), "f")
    if s.endswith(".0"):
        s = s[:-2]
    return s


def _count_values(vec: Vector, label: str, without: bool, names: list[str], steps: int) -> Vector:
    if not label or label[0].isdigit() or not set(label) <= _LABEL_NAME_CHARS:
        raise ExecutionError(f'invalid label name "{label}"')
    if not without:
        names = names + [label]
    rows, cols = np.nonzero(vec.present)
    out: dict[Labels, np.ndarray] = {}
    strs: dict[float, str] = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        v = float(vec.values[r, c])
        s = strs.get(v) if not math.isnan(v) else "NaN"
        if s is None:
            s = strs[v] = format_value(v)
        key = group_labels(vec.labels[r].with_label(label, s), without, names)
        if without:
            key = key.with_label(label, s)
        arr = out.get(key)
        if arr is None:
            arr = out[key] = np.zeros(steps)
        arr[c] += 1
    if not out:
        return Vector.empty(steps)
    labels = list(out)
    values = np.array([out[lb] for lb in labels])
    return Vector(labels, values, values > 0)
