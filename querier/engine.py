"""The PromQL engine: parses an expression and evaluates it over the whole step grid with numpy.

Every node evaluates once for all steps of the query (see ``values.py``):
a vector selector is one ``searchsorted`` over all series' samples, range
functions work on per-step windows ``(t - range, t]`` of flat sample arrays,
aggregations and binary operators are array operations over
``(series, steps)`` matrices. Semantics follow Prometheus 3
(``promql/engine.go``): lookback delta with a left-open window, stale markers,
``offset`` and ``@`` (including ``start()``/``end()``), subqueries aligned to
their step, the metric name dropped by functions and arithmetic.

The metric name is dropped the way Prometheus 3 does with delayed name
removal: an operation that drops it only marks the series (``drop_name``
returns ``DropNameLabels``), so ``label_replace`` can still read or keep it
and ``sum by (__name__)`` still groups by it; the marked names are removed
when the query finishes (``finish_names``). With ``delayed_name_removal``
off, marked names are removed right after every node instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import promql_parser as pp

from querier import aggregations, binops, functions
from querier.errors import QueryCanceled, ExecutionError, ParseError, QueryTimeout, TooManySamples, Unsupported
from querier.values import (DropNameLabels, RangeSeries, RangeVector, Result, Sample, Scalar, String, Value,
                            Vector, finish_name, is_stale, mark_drop_name, window_indices)
from store.labels import METRIC_NAME, Labels
from store.matchers import Matcher, MatchType
from store.errors import SampleLimitExceeded
from store.storage import Querier, SampleBudget, SelectHints, common_gatherer

_MATCH_OPS = {"MatchOp.Equal": MatchType.EQ, "MatchOp.NotEqual": MatchType.NEQ,
              "MatchOp.Re": MatchType.RE, "MatchOp.NotRe": MatchType.NRE}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_DUP = "vector cannot contain metrics with the same labelset"
_SORT_FUNCTIONS = ("sort", "sort_desc", "sort_by_label", "sort_by_label_desc")
_SORT_IN_RANGE = "PromQL warning: sort is ineffective for range queries since results are always ordered by labels"


def duration_ms(d: datetime.timedelta | None) -> int:
    """A parser duration in whole milliseconds (0 for none)."""
    if d is None:
        return 0
    return (d.days * 86_400_000_000 + d.seconds * 1_000_000 + d.microseconds) // 1000


# promql-parser's type errors, reworded as Prometheus' parser words them (documented type names,
# function names in double quotes, "aggregation parameter" for an aggregation's scalar or string).
_TYPE_NAMES = {"matrix": "range vector", "vector": "instant vector"}
_EXPECTED_TYPE = re.compile(r"expected type (\w+) in (call to function '([^']*)'|aggregation expression), got (\w+)")
_EXPECTED_ARGS = re.compile(r"(expected \d+ argument\(s\) in call to )'([^']*)'")
_UNARY = re.compile(r"(unary expression only allowed on expressions of type scalar or )vector, got: (\w+)")


def _documented(t: str) -> str:
    return _TYPE_NAMES.get(t, t)


def _expected_type(m: re.Match) -> str:
    want, got = _documented(m[1]), _documented(m[4])
    if m[3] is not None:
        where = f"call to function {json.dumps(m[3])}"
    else:
        where = "aggregation parameter" if want in ("scalar", "string") else "aggregation expression"
    return f"expected type {want} in {where}, got {got}"


def prometheus_wording(msg: str) -> str:
    """A promql-parser error message in Prometheus' words, where they differ only in wording."""
    msg = _EXPECTED_TYPE.sub(_expected_type, msg)
    msg = _EXPECTED_ARGS.sub(lambda m: f"{m[1]}{json.dumps(m[2])}", msg)
    return _UNARY.sub(lambda m: f"{m[1]}instant vector, got {json.dumps(_documented(m[2]))}", msg)


def parse(expr: str) -> pp.Expr:
    """Parses ``expr``; raises ``ParseError`` with Prometheus' ``parse error: ...`` wording (but
    without its ``line:column:`` position, which promql-parser does not report)."""
    try:
        return pp.parse(expr)
    except ValueError as e:
        raise ParseError(f"parse error: {prometheus_wording(str(e))}") from None
    except BaseException as e:  # the Rust parser may panic on odd input
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ParseError(f"parse error: {e}") from None


def selector_matchers(vs: pp.VectorSelector) -> list[Matcher]:
    """Our matchers for a parsed vector selector; the metric name becomes a ``__name__`` matcher."""
    if vs.matchers.or_matchers:
        raise Unsupported("'or' inside a vector selector is not supported")
    out = []
    if vs.name:
        out.append(Matcher(MatchType.EQ, METRIC_NAME, vs.name))
    for m in vs.matchers.matchers:
        out.append(Matcher(_MATCH_OPS[str(m.op)], m.name, m.value))
    return out


TOO_MANY_SAMPLES = "query processing would load too many samples into memory in query execution"


@dataclass
class EvalContext:
    """What every node's evaluation needs: the step grid, the data and the limits."""

    querier: Querier
    steps: np.ndarray  # int64 ms, the evaluation timestamps
    query_start: int  # for @ start()
    query_end: int  # for @ end()
    interval: int  # step of the grid (ms); 0 for an instant evaluation
    lookback: int
    deadline: float
    max_samples: int
    subquery_step: int
    delayed_name_removal: bool = True
    cancelled: Callable[[], bool] | None = None  # e.g. the client has gone away
    samples: int = 0  # samples and points held, what max_samples limits
    loaded: int = 0  # samples read from storage
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    call: str = ""  # the function whose arguments are being evaluated (``SelectHints.func`` of a range selector)

    def warn(self, msg: str) -> None:
        """Adds a warning annotation (``warnings`` in the API response), once."""
        if msg not in self.warnings:
            self.warnings.append(msg)

    def info(self, msg: str) -> None:
        """Adds an info annotation (``infos`` in the API response), once."""
        if msg not in self.infos:
            self.infos.append(msg)

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise QueryTimeout("query timed out in expression evaluation")
        if self.cancelled is not None and self.cancelled():
            raise QueryCanceled("query was canceled in expression evaluation")

    def account(self, n: int) -> None:
        """Counts ``n`` samples held in memory against ``max_samples``."""
        self.samples += n
        if self.samples > self.max_samples:
            raise TooManySamples(TOO_MANY_SAMPLES)

    def on_grid(self, steps: np.ndarray, interval: int) -> "EvalContext":
        # The annotation lists are shared with the outer context on purpose.
        return dataclasses.replace(self, steps=steps, interval=interval)


class Engine:
    """Evaluates PromQL against a ``Querier``.

    Thread-safe: an engine holds only its options; every query gets its own
    ``EvalContext``.

    Args:
        lookback_delta_ms: how far back an instant selector looks for a sample.
        max_samples: most samples a query may hold at once (``TooManySamples``).
        timeout_s: default deadline of a query.
        subquery_step_ms: step of subqueries written without one (``x[5m:]``).
        delayed_name_removal: remove the metric name dropped by functions and
            operators only when the query finishes (Prometheus' feature flag
            ``promql-delayed-name-removal``, on in its PromQL test suite).
    """

    def __init__(self, lookback_delta_ms: int = 300_000, max_samples: int = 50_000_000,
                 timeout_s: float = 120, subquery_step_ms: int = 60_000,
                 delayed_name_removal: bool = True) -> None:
        self.lookback_delta_ms = lookback_delta_ms
        self.max_samples = max_samples
        self.timeout_s = timeout_s
        self.subquery_step_ms = subquery_step_ms
        self.delayed_name_removal = delayed_name_removal

    def instant(self, querier: Querier, expr: str, t_ms: int, *, timeout_s: float | None = None,
                lookback_delta_ms: int | None = None, cancelled: Callable[[], bool] | None = None) -> Result:
        """Evaluates ``expr`` at ``t_ms``: a vector, scalar, string or (for a range selector) matrix."""
        ast = parse(expr)
        ctx = self._context(querier, np.array([t_ms], dtype=np.int64), t_ms, t_ms, 0, timeout_s, lookback_delta_ms)
        ctx.cancelled = cancelled
        val = finish_names(evaluate(ast, ctx))
        if isinstance(val, Scalar):
            return Result("scalar", (t_ms, float(val.values[0])), ctx.warnings, ctx.infos, ctx.loaded, ctx.samples)
        if isinstance(val, String):
            return Result("string", (t_ms, val.value), ctx.warnings, ctx.infos, ctx.loaded, ctx.samples)
        if isinstance(val, RangeVector):
            lo, hi = val.windows()
            out = []
            for i, lbls in enumerate(val.labels):
                a, b = int(lo[i, 0]), int(hi[i, 0])
                if b > a:
                    out.append(RangeSeries(lbls, val.ts[a:b].copy(), val.values[a:b].copy()))
            out.sort(key=lambda s: s.labels)
            return Result("matrix", out, ctx.warnings, ctx.infos, ctx.loaded, ctx.samples)
        rows = [i for i in range(len(val.labels)) if val.present[i, 0]]
        order = _instant_order(ast)
        if order is None:
            rows.sort(key=lambda i: val.labels[i])
        elif order != "engine":
            vals = val.values[:, 0]
            desc = order == "desc"
            # NaN sorts last either way, as Prometheus' sort functions do.
            rows.sort(key=lambda i: (np.isnan(vals[i]), -vals[i] if desc else vals[i]))
        return Result("vector", [Sample(val.labels[i], t_ms, float(val.values[i, 0])) for i in rows], ctx.warnings, ctx.infos, ctx.loaded, ctx.samples)

    def range(self, querier: Querier, expr: str, start_ms: int, end_ms: int, step_ms: int, *,
              timeout_s: float | None = None, lookback_delta_ms: int | None = None,
              cancelled: Callable[[], bool] | None = None) -> Result:
        """Evaluates ``expr`` at ``start_ms, start_ms + step_ms, ... <= end_ms``; always a matrix."""
        if step_ms <= 0:
            raise ExecutionError("zero or negative query resolution step widths are not accepted. Try a positive integer")
        if end_ms < start_ms:
            raise ExecutionError("end timestamp must not be before start time")
        ast = parse(expr)
        steps = np.arange(start_ms, end_ms + 1, step_ms, dtype=np.int64)
        ctx = self._context(querier, steps, start_ms, end_ms, step_ms, timeout_s, lookback_delta_ms)
        ctx.cancelled = cancelled
        val = finish_names(evaluate(ast, ctx))
        if isinstance(val, RangeVector):
            raise ExecutionError('invalid expression type "range vector" for range query, must be Scalar or instant Vector')
        if isinstance(val, String):
            raise ExecutionError('invalid expression type "string" for range query, must be Scalar or instant Vector')
        if isinstance(val, Scalar):
            return Result("matrix", [RangeSeries(Labels(), steps.copy(), val.values.copy())], ctx.warnings, ctx.infos, ctx.loaded, ctx.samples)
        val = merge_same_labels(val, _DUP)
        out = []
        for i, lbls in enumerate(val.labels):
            p = val.present[i]
            if p.any():
                out.append(RangeSeries(lbls, steps[p], val.values[i][p]))
        out.sort(key=lambda s: s.labels)
        return Result("matrix", out, ctx.warnings, ctx.infos, ctx.loaded, ctx.samples)

    def _context(self, querier: Querier, steps: np.ndarray, start: int, end: int, interval: int,
                 timeout_s: float | None, lookback_delta_ms: int | None) -> EvalContext:
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        return EvalContext(querier, steps, start, end, interval,
                           lookback_delta_ms or self.lookback_delta_ms, time.monotonic() + timeout,
                           self.max_samples, self.subquery_step_ms, self.delayed_name_removal)


def _instant_order(ast: pp.Expr) -> str | None:
    """How an instant vector result is ordered: None (by labels), "asc"/"desc" (by value) or "engine"."""
    while isinstance(ast, pp.ParenExpr):
        ast = ast.expr
    if isinstance(ast, pp.Call):
        name = ast.func.name
        if name == "sort":
            return "asc"
        if name == "sort_desc":
            return "desc"
        if name in ("sort_by_label", "sort_by_label_desc"):
            return "engine"
    if isinstance(ast, pp.AggregateExpr):
        op = str(ast.op)
        if op == "topk":
            return "desc"
        if op == "bottomk":
            return "asc"
    return None


def evaluate(node: pp.Expr, ctx: EvalContext) -> Value:
    """Evaluates one AST node over ``ctx.steps``."""
    val = _evaluate(node, ctx)
    if not ctx.delayed_name_removal:
        val = finish_names(val)
    return val


def _evaluate(node: pp.Expr, ctx: EvalContext) -> Value:
    ctx.check()
    if isinstance(node, pp.NumberLiteral):
        return Scalar(np.full(len(ctx.steps), float(node.val)))
    if isinstance(node, pp.StringLiteral):
        return String(node.val)
    if isinstance(node, pp.ParenExpr):
        return evaluate(node.expr, ctx)
    if isinstance(node, pp.VectorSelector):
        return eval_vector_selector(node, ctx)[0]
    if isinstance(node, pp.MatrixSelector):
        return eval_matrix_selector(node, ctx)
    if isinstance(node, pp.SubqueryExpr):
        return eval_subquery(node, ctx)
    if isinstance(node, pp.UnaryExpr):
        val = evaluate(node.expr, ctx)
        if isinstance(val, Scalar):
            return Scalar(-val.values)
        if isinstance(val, Vector):
            return merge_same_labels(Vector([drop_name(lb) for lb in val.labels], -val.values, val.present), _DUP)
        raise ExecutionError("unary minus needs a scalar or an instant vector")
    if isinstance(node, pp.BinaryExpr):
        return binops.evaluate_binary(node, ctx)
    if isinstance(node, pp.AggregateExpr):
        return aggregations.evaluate_aggregate(node, ctx)
    if isinstance(node, pp.Call):
        name = node.func.name
        if name in _SORT_FUNCTIONS and len(ctx.steps) > 1:
            ctx.warn(_SORT_IN_RANGE)
        outer, ctx.call = ctx.call, name
        try:
            return functions.evaluate_call(node, ctx)
        finally:
            ctx.call = outer
    raise Unsupported(f"unsupported expression type {type(node).__name__}")


def reference_times(ctx: EvalContext, at: pp.AtModifier | None, offset: datetime.timedelta | None) -> np.ndarray:
    """The timestamp each step reads data at: the step time (or the ``@`` time) minus the offset."""
    base = ctx.steps
    if at is not None:
        kind = str(at.type)
        if kind.endswith("Start"):
            t = ctx.query_start
        elif kind.endswith("End"):
            t = ctx.query_end
        else:
            try:
                when = at.at
            except BaseException as e:  # the parser cannot represent times before 1970
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                raise Unsupported("@ timestamps before 1970 are not supported") from None
            t = duration_ms(when - _EPOCH)
        base = np.full(len(ctx.steps), t, dtype=np.int64)
    return base - duration_ms(offset)


@dataclass(slots=True)
class Selection:
    """The raw samples of a selector, series end to end (see ``RangeVector``)."""

    labels: list[Labels]
    ts: np.ndarray
    values: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = None  # raw samples per point, for downsampled data (see below)


def select(ctx: EvalContext, vs: pp.VectorSelector, mint: int, maxt: int, range_ms: int, func: str) -> Selection:
    """Reads the series of ``vs`` with samples in ``[mint, maxt]`` from the querier."""
    # The sources charge what they load to the query's remaining budget before decoding it.
    hints = SelectHints(mint, maxt, ctx.interval, range_ms, func, SampleBudget(ctx.max_samples - ctx.samples),
                        notes=ctx.infos)
    try:
        series = ctx.querier.select(selector_matchers(vs), mint, maxt, hints)
        labels = [s.labels for s in series]
        gatherer = common_gatherer(series)  # e.g. a head selection: one decoding for all its series
        flat = gatherer.gather(series) if gatherer is not None else None
    except SampleLimitExceeded:
        raise TooManySamples(TOO_MANY_SAMPLES) from None
    if flat is not None:
        ts, vals, offsets = flat
    else:
        ts_parts, val_parts = [], []
        for s in series:
            t, v = s.samples()
            ts_parts.append(np.asarray(t, dtype=np.int64))
            val_parts.append(np.asarray(v, dtype=np.float64))
        offsets = np.zeros(len(labels) + 1, dtype=np.int64)
        if labels:
            np.cumsum([len(t) for t in ts_parts], out=offsets[1:])
            ts = np.concatenate(ts_parts)
            vals = np.concatenate(val_parts)
        else:
            ts, vals = np.zeros(0, dtype=np.int64), np.zeros(0)
    ctx.account(len(ts))
    ctx.loaded += len(ts)
    ctx.check()
    return Selection(labels, ts, vals, offsets, _weights(series) if flat is None else None)


def _weights(series: list) -> np.ndarray | None:
    """The ``weights`` of a selection of downsampled data (``querier/downsampled.py``), else None."""
    if not series or all(getattr(s, "weights", None) is None for s in series):
        return None
    return np.concatenate([np.asarray(s.weights) if getattr(s, "weights", None) is not None
                           else np.ones(len(s.samples()[0])) for s in series])


def eval_vector_selector(vs: pp.VectorSelector, ctx: EvalContext) -> tuple[Vector, np.ndarray]:
    """The instant vector of ``vs`` and the timestamp (ms) of every selected sample."""
    ref = reference_times(ctx, vs.at, vs.offset)
    if len(ref) == 0:
        return Vector.empty(0), np.zeros((0, 0), dtype=np.int64)
    sel = select(ctx, vs, int(ref.min()) - ctx.lookback + 1, int(ref.max()), 0, "")
    lo, hi = window_indices(sel.ts, sel.offsets, ref - ctx.lookback, ref)
    present = hi > lo
    idx = np.where(present, hi - 1, 0)
    if len(sel.ts):
        vals = sel.values[idx]
        sts = sel.ts[idx]
        present &= ~is_stale(vals)
    else:
        vals = np.zeros(idx.shape)
        sts = np.zeros(idx.shape, dtype=np.int64)
    ctx.account(int(present.sum()))
    return Vector(sel.labels, vals, present), sts


def eval_matrix_selector(ms: pp.MatrixSelector, ctx: EvalContext) -> RangeVector:
    """The range vector of ``ms``, read with ``ctx.call`` as the hints' function (with the
    ``weights`` of downsampled data)."""
    vs = ms.vector_selector
    range_ms = duration_ms(ms.range)
    ref = reference_times(ctx, vs.at, vs.offset)
    if len(ref) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return RangeVector([], empty, np.zeros(0), np.zeros(1, dtype=np.int64), ref, ref, range_ms)
    sel = select(ctx, vs, int(ref.min()) - range_ms + 1, int(ref.max()), range_ms, ctx.call)
    stale = is_stale(sel.values)
    if stale.any():
        keep = ~stale
        counts = np.add.reduceat(keep.astype(np.int64), sel.offsets[:-1]) if len(keep) else np.zeros(0, np.int64)
        # reduceat gives a wrong count for empty series; recompute those from offsets.
        counts = np.where(np.diff(sel.offsets) == 0, 0, counts)
        offsets = np.zeros_like(sel.offsets)
        np.cumsum(counts, out=offsets[1:])
        weights = sel.weights[keep] if sel.weights is not None else None
        sel = Selection(sel.labels, sel.ts[keep], sel.values[keep], offsets, weights)
    return RangeVector(sel.labels, sel.ts, sel.values, sel.offsets, ref - range_ms, ref, range_ms, sel.weights)


def eval_subquery(sq: pp.SubqueryExpr, ctx: EvalContext) -> RangeVector:
    """Evaluates the inner expression on its own aligned grid and windows it like a range selector."""
    range_ms = duration_ms(sq.range)
    step = duration_ms(sq.step) or ctx.subquery_step
    ref = reference_times(ctx, sq.at, sq.offset)
    if len(ref) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return RangeVector([], empty, np.zeros(0), np.zeros(1, dtype=np.int64), ref, ref, range_ms)
    first = (int(ref.min()) - range_ms) // step * step + step  # first multiple of step after the window start
    last = int(ref.max())
    steps = np.arange(first, last + 1, step, dtype=np.int64)
    inner = evaluate(sq.expr, ctx.on_grid(steps, step))
    if isinstance(inner, Scalar):
        inner = Vector([Labels()], inner.values[None, :], np.ones((1, len(steps)), dtype=bool))
    if not isinstance(inner, Vector):
        raise ExecutionError("subquery is only allowed on instant vector or scalar")
    counts = inner.present.sum(axis=1)
    offsets = np.zeros(len(inner.labels) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    grid = np.broadcast_to(steps, inner.present.shape)
    ts = grid[inner.present]
    vals = inner.values[inner.present]
    return RangeVector(list(inner.labels), ts, vals, offsets, ref - range_ms, ref, range_ms)


def drop_name(lbls: Labels) -> Labels:
    """Drops the metric name (and ``__type__``/``__unit__``) of a function's or operator's result.

    The labels are only marked (``DropNameLabels``); ``finish_names`` removes
    the name when the query finishes, or right after the node when delayed
    name removal is off.
    """
    return mark_drop_name(lbls)


def finish_names(val: Value) -> Value:
    """Removes the marked metric names (Prometheus' cleanupMetricLabels).

    Series that become equal are merged; for an instant vector two of them
    present at one step are an error, as in Prometheus.
    """
    if isinstance(val, Vector):
        if not any(isinstance(lb, DropNameLabels) for lb in val.labels):
            return val
        return merge_same_labels(Vector([finish_name(lb) for lb in val.labels], val.values, val.present), _DUP)
    if isinstance(val, RangeVector):
        if not any(isinstance(lb, DropNameLabels) for lb in val.labels):
            return val
        return _merge_range_series(val, [finish_name(lb) for lb in val.labels])
    return val


def _merge_range_series(rv: RangeVector, labels: list[Labels]) -> RangeVector:
    """``rv`` relabelled; series with equal labels get their samples merged in time order."""
    groups: dict[Labels, list[int]] = {}
    for i, lb in enumerate(labels):
        groups.setdefault(lb, []).append(i)
    if len(groups) == len(labels):
        return dataclasses.replace(rv, labels=labels, _windows=None)
    ts_parts, val_parts, out_labels = [], [], []
    for lb, rows in groups.items():
        t = np.concatenate([rv.ts[rv.offsets[i]:rv.offsets[i + 1]] for i in rows])
        v = np.concatenate([rv.values[rv.offsets[i]:rv.offsets[i + 1]] for i in rows])
        order = np.argsort(t, kind="stable")
        ts_parts.append(t[order])
        val_parts.append(v[order])
        out_labels.append(lb)
    offsets = np.zeros(len(out_labels) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in ts_parts], out=offsets[1:])
    return RangeVector(out_labels, np.concatenate(ts_parts), np.concatenate(val_parts), offsets,
                       rv.left, rv.right, rv.range_ms)


def merge_same_labels(vec: Vector, message: str) -> Vector:
    """Merges rows with equal labels into one; raises ``ExecutionError(message)`` if two are present at one step."""
    first: dict[Labels, int] = {}
    dups = False
    for i, lb in enumerate(vec.labels):
        if lb in first:
            dups = True
        else:
            first[lb] = i
    if not dups:
        return vec
    groups: dict[Labels, list[int]] = {}
    for i, lb in enumerate(vec.labels):
        groups.setdefault(lb, []).append(i)
    labels, values, present = [], [], []
    for lb, rows in groups.items():
        if len(rows) == 1:
            labels.append(lb)
            values.append(vec.values[rows[0]])
            present.append(vec.present[rows[0]])
            continue
        p = vec.present[rows]
        if (p.sum(axis=0) > 1).any():
            raise ExecutionError(message)
        which = np.argmax(p, axis=0)
        labels.append(lb)
        values.append(vec.values[rows][which, np.arange(p.shape[1])])
        present.append(p.any(axis=0))
    return Vector(labels, np.array(values).reshape(len(labels), -1), np.array(present).reshape(len(labels), -1))
