"""PromQL aggregation operators (``sum``, ``avg``, ``topk``, ... ``by``/``without``) over all steps at once.

Each input row is assigned a group; a group's value at a step folds the
rows present at that step (``ufunc.reduceat`` over rows sorted by group).
Semantics as Prometheus' ``promql/engine.go`` aggregation(): NaN is the
result of ``min``/``max`` only when every input is NaN, ``topk`` ranks NaN
below every number, output labels are the grouping labels (the input
labels for ``topk``/``bottomk``).
"""

from __future__ import annotations

import math

import numpy as np
import promql_parser as pp

from querier import engine as _engine
from querier.errors import ExecutionError, Unsupported
from querier.functions import _quantiles
from querier.values import Scalar, String, Vector
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
    if op in ("topk", "bottomk"):
        if not isinstance(param, Scalar):
            raise ExecutionError(f"{op} needs a scalar parameter")
        return _topk(vec, gid, len(labels), param.values, op == "topk")
    if op in ("limitk", "limit_ratio"):
        raise Unsupported(f"aggregation {op} is not supported")
    if len(vec) == 0:
        return Vector.empty(steps)
    G = len(labels)
    order = np.argsort(gid, kind="stable")
    counts = np.bincount(gid, minlength=G)
    starts = np.zeros(G, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    vals = vec.values[order]
    pres = vec.present[order]
    n = np.add.reduceat(pres.astype(np.float64), starts, axis=0)
    present = n > 0
    with np.errstate(all="ignore"):
        if op in ("sum", "avg", "stddev", "stdvar"):
            total = kahan_group_sum(np.where(pres, vals, 0.0), starts, counts)
            if op == "sum":
                out = total
            else:
                mean = total / np.maximum(n, 1)
                overflow = np.isinf(mean) & ~np.isinf(np.fmax.reduceat(np.where(pres, np.abs(vals), 0.0), starts, axis=0))
                if overflow.any():
                    # The sum left the float range although no input is infinite: average x/n instead.
                    scaled = np.where(pres, vals / np.repeat(np.maximum(n, 1), counts, axis=0), 0.0)
                    mean = np.where(overflow, kahan_group_sum(scaled, starts, counts), mean)
                if op == "avg":
                    out = mean
                else:
                    dev = np.where(pres, vals - np.repeat(mean, counts, axis=0), 0.0)
                    out = np.add.reduceat(dev * dev, starts, axis=0) / np.maximum(n, 1)
                    if op == "stddev":
                        out = np.sqrt(out)
        elif op == "count":
            out = n
        elif op == "group":
            out = np.ones_like(n)
        elif op == "min":
            out = np.fmin.reduceat(np.where(pres, vals, np.nan), starts, axis=0)
        elif op == "max":
            out = np.fmax.reduceat(np.where(pres, vals, np.nan), starts, axis=0)
        elif op == "quantile":
            if not isinstance(param, Scalar):
                raise ExecutionError("quantile needs a scalar parameter")
            out = _group_quantile(vals, pres, order, gid, G, param.values)
        else:
            raise Unsupported(f"aggregation {op} is not supported")
    return Vector(labels, out, present)


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
    if np.isnan(k).any():
        raise ExecutionError("Parameter value is NaN")
    if len(vec) == 0:
        return vec
    kk = np.where(k >= 1, np.floor(np.minimum(k, 2**31)), 0)
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
