"""A parsed PromQL expression as the JSON tree of ``/api/v1/parse_query``.

The shape is Prometheus' (``web/api/v1/translate_ast.go``, the tree view of
its UI): every node has a ``type`` (``aggregation``, ``binaryExpr``,
``call``, ``matrixSelector``, ``subquery``, ``numberLiteral``, ``parenExpr``,
``stringLiteral``, ``unaryExpr``, ``vectorSelector``); durations are
milliseconds; selectors list their matchers with the metric-name matcher
last, as Prometheus' parser appends it.
"""

from __future__ import annotations

import datetime

import promql_parser as pp

from querier.aggregations import format_value

_MATCH_TYPES = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}
_CARD = {"OneToOne": "one-to-one", "ManyToOne": "many-to-one", "OneToMany": "one-to-many",
         "ManyToMany": "many-to-many"}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _ms(d: datetime.timedelta | None) -> int:
    if d is None:
        return 0
    return (d.days * 86_400_000_000 + d.seconds * 1_000_000 + d.microseconds) // 1000


def _enum(v: object) -> str:
    return str(v).rsplit(".", 1)[-1]


def _at(at) -> tuple[int | None, str | None]:
    """(timestamp ms, "start"/"end") of an ``@`` modifier."""
    if at is None:
        return None, None
    kind = _enum(at.type)
    if kind == "Start":
        return None, "start"
    if kind == "End":
        return None, "end"
    return _ms(at.at - _EPOCH), None


def _matchers(vs: pp.VectorSelector) -> list[dict]:
    out = [{"name": m.name, "value": m.value, "type": _MATCH_TYPES[_enum(m.op)]} for m in vs.matchers.matchers]
    if vs.name:
        out.append({"name": "__name__", "value": vs.name, "type": "="})
    return out


def _is_vector(node) -> bool:
    """Whether ``node`` evaluates to an instant vector (the operands ``VectorMatching`` is kept for)."""
    while isinstance(node, pp.ParenExpr):
        node = node.expr
    if isinstance(node, (pp.VectorSelector, pp.AggregateExpr)):
        return True
    if isinstance(node, pp.Call):
        return _enum(node.func.return_type) == "Vector"
    if isinstance(node, pp.UnaryExpr):
        return _is_vector(node.expr)
    if isinstance(node, pp.BinaryExpr):
        return _is_vector(node.lhs) or _is_vector(node.rhs)
    return False


def translate(node) -> dict | None:
    """The JSON-ready tree of ``node`` (a promql_parser expression)."""
    if node is None:
        return None
    if isinstance(node, pp.AggregateExpr):
        mod = node.modifier
        return {"type": "aggregation", "op": str(node.op), "expr": translate(node.expr),
                "param": translate(node.param), "grouping": list(mod.labels) if mod else [],
                "without": bool(mod and _enum(mod.type) == "Without")}
    if isinstance(node, pp.BinaryExpr):
        mod = node.modifier
        matching = None
        if _is_vector(node.lhs) and _is_vector(node.rhs):
            m = mod.matching if mod else None
            matching = {"card": _CARD[_enum(mod.card)] if mod else "one-to-one",
                        "labels": list(m.labels) if m else [],
                        "on": bool(m and _enum(m.type) == "Include"),
                        "include": list(mod.group_labels) if mod and mod.group_labels else []}
        return {"type": "binaryExpr", "op": str(node.op), "lhs": translate(node.lhs), "rhs": translate(node.rhs),
                "matching": matching, "bool": bool(mod and mod.return_bool)}
    if isinstance(node, pp.Call):
        f = node.func
        return {"type": "call",
                "func": {"name": f.name, "argTypes": [_enum(t).lower() for t in f.arg_types],
                         "variadic": int(f.variadic), "returnType": _enum(f.return_type).lower()},
                "args": [translate(a) for a in node.args]}
    if isinstance(node, pp.MatrixSelector):
        vs = node.vector_selector
        ts, soe = _at(vs.at)
        return {"type": "matrixSelector", "name": vs.name or "", "range": _ms(node.range), "offset": _ms(vs.offset),
                "matchers": _matchers(vs), "timestamp": ts, "startOrEnd": soe}
    if isinstance(node, pp.SubqueryExpr):
        ts, soe = _at(node.at)
        return {"type": "subquery", "expr": translate(node.expr), "range": _ms(node.range),
                "offset": _ms(node.offset), "step": _ms(node.step), "timestamp": ts, "startOrEnd": soe}
    if isinstance(node, pp.NumberLiteral):
        return {"type": "numberLiteral", "val": format_value(node.val)}
    if isinstance(node, pp.ParenExpr):
        return {"type": "parenExpr", "expr": translate(node.expr)}
    if isinstance(node, pp.StringLiteral):
        return {"type": "stringLiteral", "val": node.val}
    if isinstance(node, pp.UnaryExpr):
        return {"type": "unaryExpr", "op": "-", "expr": translate(node.expr)}
    if isinstance(node, pp.VectorSelector):
        ts, soe = _at(node.at)
        return {"type": "vectorSelector", "name": node.name or "", "offset": _ms(node.offset),
                "matchers": _matchers(node), "timestamp": ts, "startOrEnd": soe}
    raise TypeError(f"unsupported node type {type(node).__name__}")
