"""PromQL annotation texts, worded exactly as Prometheus' ``util/annotations``.

Annotations are the warnings and infos a query returns beside its result.
Prometheus appends the position of the offending expression (`` (1:7)``) when
it renders them for the API; this engine has no positions and returns the text
without it, which is also what Prometheus' own test scripts compare. Numbers are
formatted as Go's ``%g`` and ``strconv.FormatFloat(f, 'g', -1, 64)`` do, so the
texts match byte for byte.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

_WARNING = "PromQL warning"
_INFO = "PromQL info"


def go_float(x: float, prec: int = -1) -> str:
    """``x`` as Go's ``%g`` (``prec`` < 0: the shortest repr that round-trips, else ``%.<prec>g``)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, x) < 0 else ""
    x = abs(x)
    if x == 0:
        return sign + "0"
    shortest = prec < 0
    if shortest:
        tup = Decimal(repr(x)).as_tuple()
    else:
        tup = Decimal(format(x, f".{max(prec, 1) - 1}e")).as_tuple()
    digits = "".join(map(str, tup.digits)).rstrip("0") or "0"
    dp = len(tup.digits) + tup.exponent  # decimal point position relative to the digits
    nd = len(digits)
    eprec = 6 if shortest else max(prec, 1)
    if not shortest and eprec > nd and nd >= dp:
        eprec = nd
    exp = dp - 1
    if exp < -4 or exp >= eprec:
        mant = digits[0] + ("." + digits[1:] if nd > 1 else "")
        return f"{sign}{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{sign}0.{'0' * -dp}{digits}"
    if dp >= nd:
        return sign + digits + "0" * (dp - nd)
    return f"{sign}{digits[:dp]}.{digits[dp:]}"


def openmetrics_float(x: float) -> str:
    """``x`` as Prometheus' ``labels.FormatOpenMetricsFloat``: Go's shortest ``%g`` with a ``.0`` on integers."""
    s = go_float(x)
    if math.isnan(x) or math.isinf(x) or "e" in s or "." in s:
        return s
    return s + ".0"


def _quote(s: str) -> str:
    """Go's ``%q`` for the label values and metric names we quote (valid UTF-8)."""
    return json.dumps(s, ensure_ascii=False)


def _for_metric(text: str, metric_name: str) -> str:
    return f"{text} for metric name {_quote(metric_name)}" if metric_name else text


def invalid_quantile(q: float) -> str:
    return f"{_WARNING}: quantile value should be between 0 and 1, got {go_float(q)}"


def bad_bucket_label(metric_name: str, le: str) -> str:
    return _for_metric(f'{_WARNING}: bucket label "le" is missing or has a malformed value of {_quote(le)}', metric_name)


def possible_non_counter(metric_name: str) -> str:
    return (f"{_INFO}: metric might not be a counter, name does not end in _total/_sum/_count/_bucket: "
            f"{_quote(metric_name)}")


def forced_monotonicity(metric_name: str) -> str:
    return _for_metric(f"{_INFO}: input to histogram_quantile needed to be fixed for monotonicity (see "
                       "https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile)",
                       metric_name)
