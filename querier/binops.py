"""PromQL binary operators: arithmetic, comparisons (filtering or ``bool``) and set operators.

Vector/vector operations match series by signature (all labels but the
name, or the ``on``/``ignoring`` labels) and build one output row per
matched pair of input rows, so that a series whose partner changes over time
(``group_left`` labels) becomes several output series, as in Prometheus'
per-step evaluation. Duplicate checks happen per step, with Prometheus'
error messages (``promql/engine.go`` VectorBinop).
"""

from __future__ import annotations

import numpy as np
import promql_parser as pp

from querier import engine as _engine
from querier.errors import ExecutionError, Unsupported
from querier.values import Scalar, Vector, strip_name
from store.labels import METRIC_NAME, Labels

ARITHMETIC = {"+", "-", "*", "/", "%", "^", "atan2"}
COMPARISON = {"==", "!=", ">", "<", ">=", "<="}
SET = {"and", "or", "unless"}


def apply(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a op b`` element-wise with Go's float semantics (division by zero gives ±Inf/NaN)."""
    with np.errstate(all="ignore"):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        if op == "%":
            return np.fmod(a, b)
        if op == "^":
            return np.power(a, b)
        if op == "atan2":
            return np.arctan2(a, b)
        if op == "==":
            return a == b
        if op == "!=":
            return a != b
        if op == ">":
            return a > b
        if op == "<":
            return a < b
        if op == ">=":
            return a >= b
        if op == "<=":
            return a <= b
    raise Unsupported(f"binary operator {op!r} is not supported")


def evaluate_binary(node: pp.BinaryExpr, ctx: "_engine.EvalContext"):
    op = str(node.op).lower()
    mod = node.modifier
    return_bool = bool(mod is not None and mod.return_bool)
    if mod is not None and mod.fill_values is not None and (mod.fill_values.lhs is not None or mod.fill_values.rhs is not None):
        raise Unsupported("fill modifiers of binary operators are not supported")
    lhs = _engine.evaluate(node.lhs, ctx)
    rhs = _engine.evaluate(node.rhs, ctx)
    if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
        res = apply(op, lhs.values, rhs.values)
        return Scalar(res.astype(np.float64))
    if isinstance(lhs, Vector) and isinstance(rhs, Scalar):
        return _vector_scalar(op, lhs, rhs.values, False, return_bool)
    if isinstance(lhs, Scalar) and isinstance(rhs, Vector):
        return _vector_scalar(op, rhs, lhs.values, True, return_bool)
    if not (isinstance(lhs, Vector) and isinstance(rhs, Vector)):
        raise ExecutionError("binary expression must contain only scalar and instant vector types")
    if op in SET:
        return _set_op(op, lhs, rhs, mod)
    return _vector_vector(op, lhs, rhs, mod, return_bool)


def _vector_scalar(op: str, vec: Vector, s: np.ndarray, swap: bool, return_bool: bool) -> Vector:
    a, b = (s[None, :], vec.values) if swap else (vec.values, s[None, :])
    res = apply(op, a, b)
    if op in COMPARISON:
        if return_bool:
            return _named(vec.labels, res.astype(np.float64), vec.present, True)
        return Vector(vec.labels, vec.values, vec.present & res)
    return _named(vec.labels, res, vec.present, True)


def _named(labels: list[Labels], values: np.ndarray, present: np.ndarray, drop: bool) -> Vector:
    if drop:
        labels = [_engine.drop_name(lb) for lb in labels]
    return _engine.merge_same_labels(Vector(labels, values, present),
                                     "vector cannot contain metrics with the same labelset")


def _matching(mod) -> tuple[bool, list[str]]:
    """(on?, labels) of the modifier; no modifier means ``ignoring()``."""
    if mod is None or mod.matching is None:
        return False, []
    return str(mod.matching.type).endswith("Include"), list(mod.matching.labels)


def signature(lb: Labels, on: bool, names: list[str]) -> Labels:
    return lb.keep(names) if on else lb.without(names + [METRIC_NAME])


def _sig_ids(labels: list[Labels], on: bool, names: list[str], index: dict[Labels, int]) -> np.ndarray:
    out = np.empty(len(labels), dtype=np.int64)
    for i, lb in enumerate(labels):
        out[i] = index.setdefault(signature(lb, on, names), len(index))
    return out


def _any_by_sig(present: np.ndarray, sig: np.ndarray, nsig: int) -> np.ndarray:
    """Per signature and step: how many rows of that signature are present."""
    out = np.zeros((nsig, present.shape[1]), dtype=np.int64)
    np.add.at(out, sig, present.astype(np.int64))
    return out


def _set_op(op: str, lhs: Vector, rhs: Vector, mod) -> Vector:
    on, names = _matching(mod)
    index: dict[Labels, int] = {}
    ls = _sig_ids(lhs.labels, on, names, index)
    rs = _sig_ids(rhs.labels, on, names, index)
    n = len(index)
    if op == "and":
        r_any = _any_by_sig(rhs.present, rs, n) > 0
        return Vector(lhs.labels, lhs.values, lhs.present & r_any[ls]).compact()
    if op == "unless":
        r_any = _any_by_sig(rhs.present, rs, n) > 0
        return Vector(lhs.labels, lhs.values, lhs.present & ~r_any[ls]).compact()
    l_any = _any_by_sig(lhs.present, ls, n) > 0
    extra = rhs.present & ~l_any[rs]
    out = Vector(lhs.labels + rhs.labels, np.concatenate([lhs.values, rhs.values]),
                 np.concatenate([lhs.present, extra])).compact()
    return _engine.merge_same_labels(out, "vector cannot contain metrics with the same labelset")


def _vector_vector(op: str, lhs: Vector, rhs: Vector, mod, return_bool: bool) -> Vector:
    on, names = _matching(mod)
    card = str(mod.card) if mod is not None else "OneToOne"
    one_to_many = card.endswith("OneToMany")
    one_to_one = card.endswith("OneToOne")
    include = list(mod.group_labels) if mod is not None and not one_to_one else []
    many, one = (rhs, lhs) if one_to_many else (lhs, rhs)
    index: dict[Labels, int] = {}
    ms = _sig_ids(many.labels, on, names, index)
    os_ = _sig_ids(one.labels, on, names, index)
    nsig = len(index)
    sig_labels = list(index)
    steps = many.present.shape[1]

    # The "one" side must be unique per signature at every step where the other side has data.
    one_count = _any_by_sig(one.present, os_, nsig)
    many_any = _any_by_sig(many.present, ms, nsig) > 0
    bad = (one_count > 1) & many_any
    if bad.any():
        s = int(np.argwhere(bad)[0][0])
        k = int(np.argwhere(bad[s])[0][0])
        dup = sorted(str(one.labels[j]) for j in np.flatnonzero((os_ == s) & one.present[:, k]))[:2]
        side = "left" if one_to_many else "right"
        raise ExecutionError(f"found duplicate series for the match group {_match_str(sig_labels[s], on, names)} on the "
                             f"{side} hand-side of the operation: [{', '.join(dup)}];many-to-many matching not "
                             "allowed: matching labels must be unique on one side")

    by_sig: dict[int, list[int]] = {}
    for j, s in enumerate(os_.tolist()):
        by_sig.setdefault(s, []).append(j)
    pi, pj = [], []
    for i, s in enumerate(ms.tolist()):
        for j in by_sig.get(s, ()):
            pi.append(i)
            pj.append(j)
    if not pi:
        return Vector.empty(steps)
    I = np.array(pi, dtype=np.int64)
    J = np.array(pj, dtype=np.int64)
    both = many.present[I] & one.present[J]
    if one_to_one:
        matched = np.zeros((nsig, steps), dtype=np.int64)
        np.add.at(matched, ms[I], both.astype(np.int64))
        if (matched > 1).any():
            raise ExecutionError("multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)")
    lv, rv = (one.values[J], many.values[I]) if one_to_many else (many.values[I], one.values[J])
    res = apply(op, lv, rv)
    labels = [_result_labels(many.labels[i], one.labels[j], op in ARITHMETIC, one_to_one, on, names, include)
              for i, j in zip(pi, pj)]
    if return_bool:
        labels = [_engine.drop_name(lb) for lb in labels]
    if not one_to_one:
        seen: dict[tuple[int, Labels], int] = {}
        for p, lb in enumerate(labels):
            key = (int(ms[pi[p]]), lb)
            q = seen.setdefault(key, p)
            if q != p and (both[q] & both[p]).any():
                raise ExecutionError("multiple matches for labels: grouping labels must ensure unique matches")
    if op in COMPARISON:
        if return_bool:
            values, present = res.astype(np.float64), both
        else:
            values, present = lv, both & res
    else:
        values, present = res, both
    out = Vector(labels, values, present).compact()
    return _engine.merge_same_labels(out, "vector cannot contain metrics with the same labelset")


def _match_str(sig: Labels, on: bool, names: list[str]) -> str:
    return str(sig)


def _result_labels(many: Labels, one: Labels, arithmetic: bool, one_to_one: bool, on: bool,
                   names: list[str], include: list[str]) -> Labels:
    """Prometheus' resultMetric: the "many" side's labels, reduced by the matching and ``group_x`` modifiers.

    Arithmetic removes the metric name (and ``__type__``/``__unit__``) at once,
    even with delayed name removal; the result carries no removal mark, like
    every vector/vector result except ``bool`` comparisons.
    """
    lb = strip_name(many) if arithmetic else Labels.sorted_unchecked(many)
    if one_to_one:
        lb = lb.keep(names) if on else lb.without(names)
    if include:
        d = dict(lb)
        for name in include:
            v = one.get(name)
            if v:
                d[name] = v
            else:
                d.pop(name, None)
        lb = Labels.from_dict(d)
    return lb
