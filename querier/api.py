"""The Prometheus HTTP query API (``web/api/v1/api.go``) over a ``Querier`` and our ``Engine``.

Handlers parse parameters exactly as Prometheus does (unix or RFC 3339
times, float-seconds or duration steps), map typed errors to Prometheus'
``errorType`` and status code in one place (``_error_response``) and write
JSON in Prometheus' shape: sample values as strings formatted like Go's
``strconv.FormatFloat(v, 'f', -1, 64)``, timestamps as seconds with up to
three decimals.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import promql_parser as pp

from querier import astjson
from querier.aggregations import format_value
from querier.cluster import ShardUnavailable
from querier.downsampled import parse_max_source_resolution
from querier.engine import Engine, parse, selector_matchers
from querier.errors import QueryError
from querier.frontend import QueryFrontend
from querier.values import Result
from store.errors import BucketError, InvalidMatcher, StorageError
from store.httpserver import Request, Response, Router
from store.matchers import Matcher
from store.storage import Querier, SelectHints

VERSION = "0.1.0"
MIN_TIME_MS = (-(2**63) // 1000 + 62135596801) * 1000
MAX_TIME_MS = ((2**63 - 1) // 1000 - 62135596801) * 1000 + 999
MAX_POINTS = 11_000

_STATUS = {"bad_data": 400, "execution": 422, "canceled": 499, "timeout": 503, "internal": 500,
           "not_found": 404, "unavailable": 503}
_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_MS = (31_536_000_000, 604_800_000, 86_400_000, 3_600_000, 60_000, 1000, 1)
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class ApiError(Exception):
    """An error answered to the client with Prometheus' ``errorType``."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _bad(param: str, msg: str) -> ApiError:
    return ApiError("bad_data", f"invalid parameter {json.dumps(param)}: {msg}")


def parse_time(s: str) -> int:
    """Unix seconds (float) or RFC 3339 to ms, as Prometheus' parseTime; raises ``ValueError``."""
    try:
        t = float(s)
        if not math.isfinite(t):
            raise ValueError
        whole = math.trunc(t)
        return int(whole) * 1000 + int(round((t - whole) * 1000))
    except ValueError:
        pass
    m = _RFC3339.match(s)
    if m is None:
        raise ValueError(f"cannot parse {json.dumps(s)} to a valid timestamp")
    y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
    frac = m.group(7) or ""
    tz = m.group(8)
    try:
        dt = datetime(y, mo, d, h, mi, sec, tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"cannot parse {json.dumps(s)} to a valid timestamp") from None
    ms = int(dt.timestamp()) * 1000 + (int((frac[1:] + "000")[:3]) if frac else 0)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        ms -= sign * (int(tz[1:3]) * 3_600_000 + int(tz[4:6]) * 60_000)
    return ms


def parse_duration(s: str) -> int:
    """Float seconds or a Prometheus duration (``1m30s``) to ms; raises ``ValueError``."""
    try:
        d = float(s)
    except ValueError:
        m = _DURATION.match(s)
        if not s or m is None or not any(m.groups()):
            raise ValueError(f"cannot parse {json.dumps(s)} to a valid duration") from None
        return sum(int(g) * u for g, u in zip(m.groups(), _DURATION_MS) if g)
    if not math.isfinite(d) or abs(d * 1e9) >= 2**63:
        raise ValueError(f"cannot parse {json.dumps(s)} to a valid duration. It overflows int64")
    return int(round(d * 1000))


def format_timestamp(t: int) -> str:
    """Milliseconds as Prometheus writes them: ``1435781451.781``, ``1435781451``."""
    sign = "-" if t < 0 else ""
    t = abs(t)
    frac = t % 1000
    return f"{sign}{t // 1000}.{frac:03d}" if frac else f"{sign}{t // 1000}"


def _labels_json(lbls) -> str:
    return json.dumps(dict(lbls), ensure_ascii=False, separators=(",", ":"))


def result_json(res: Result, stats: dict | None = None) -> str:
    """The ``data`` object of a query response (with Prometheus' ``stats`` if given)."""
    rt = res.result_type
    if rt == "scalar" or rt == "string":
        t, v = res.data
        val = format_value(v) if rt == "scalar" else v
        return f'{{"resultType":"{rt}","result":[{format_timestamp(t)},{json.dumps(val)}]{_stats_json(stats)}}}'
    parts = []
    if rt == "vector":
        for s in res.data:
            parts.append(f'{{"metric":{_labels_json(s.labels)},"value":[{format_timestamp(s.t)},"{format_value(s.value)}"]}}')
    else:
        grid: tuple[np.ndarray, list[str]] | None = None  # range results share the step timestamps
        for s in res.data:
            if grid is not None and np.array_equal(grid[0], s.timestamps):
                prefixes = grid[1]
            else:
                prefixes = _point_prefixes(s.timestamps)
                grid = (s.timestamps, prefixes)
            parts.append(f'{{"metric":{_labels_json(s.labels)},"values":[{_points_json(prefixes, s.values)}]}}')
    return f'{{"resultType":"{rt}","result":[{",".join(parts)}]{_stats_json(stats)}}}'


def _stats_json(stats: dict | None) -> str:
    return "" if stats is None else ',"stats":' + json.dumps(stats)


def _point_prefixes(ts: np.ndarray) -> list[str]:
    """What precedes each value in ``[T,"V"],[T,"V"]``: ``[T,"`` first, then ``"],[T,"``."""
    tl = timestamps_json(ts)
    return [f'[{tl[0]},"'] + [f'"],[{t},"' for t in tl[1:]] if tl else []


def _points_json(prefixes: list[str], values: np.ndarray) -> str:
    """``[T,"V"],...`` from the prefixes and the values, joined in one C-level call."""
    if not prefixes:
        return ""
    out: list[str | None] = [None] * (2 * len(prefixes))
    out[0::2] = prefixes
    out[1::2] = values_json(values)
    return "".join(out) + '"]'


def timestamps_json(ts: np.ndarray) -> list[str]:
    """``format_timestamp`` of every element, without a Python call per element where it can."""
    if len(ts) and ts.min() >= 0:
        sec, frac = np.divmod(ts, 1000)
        if not frac.any():
            return str(sec.tolist())[1:-1].split(", ")
        return [f"{a}.{b:03d}" if b else str(a) for a, b in zip(sec.tolist(), frac.tolist())]
    return [format_timestamp(t) for t in ts.tolist()]


def values_json(values: np.ndarray) -> list[str]:
    """``format_value`` of every element. Python's float repr is the shortest round-trip form, as
    Go's ``FormatFloat(v, 'f', -1, 64)`` is; they differ only in exponents, NaN/Inf and a ``.0``."""
    if not len(values):
        return []
    body = str(values.tolist())[1:-1]
    if "e" in body or "n" in body:  # exponents, nan, inf: the exact per-element path
        return [format_value(v) for v in values.tolist()]
    return (body + ", ").replace(".0, ", ", ").split(", ")[:-1]


def _success(data_json: str, warnings: list[str] | None = None, infos: list[str] | None = None) -> Response:
    body = '{"status":"success","data":' + data_json
    if warnings:
        body += ',"warnings":' + json.dumps(warnings)
    if infos:
        body += ',"infos":' + json.dumps(infos)
    return Response(200, (body + "}").encode(), "application/json")


def _error_response(error_type: str, message: str) -> Response:
    body = json.dumps({"status": "error", "errorType": error_type, "error": message})
    return Response(_STATUS.get(error_type, 500), body.encode(), "application/json")


@dataclass
class ServerInfo:
    """What the status endpoints report about the running server (given by the wiring).

    ``tsdb_stats(limit)`` returns the ``data`` of ``/api/v1/status/tsdb`` (Prometheus' shape:
    ``headStats`` and the top-``limit`` cardinality lists); ``flags`` are the command-line flags
    and ``config_yaml`` the effective configuration.
    """

    config_yaml: str = ""
    flags: dict[str, str] = field(default_factory=dict)
    start_time: float = 0.0
    storage_retention: str = ""
    cwd: str = ""
    tsdb_stats: Callable[[int], dict] | None = None


class QueryAPI:
    """Serves Prometheus' HTTP query API under ``/api/v1/``.

    Queries (``query``, ``query_range``, ``format_query``, ``parse_query``), metadata
    (``series``, ``labels``, ``label/<name>/values``, ``metadata``, ``query_exemplars``),
    ``rules`` and ``alerts`` (empty: Flashback evaluates no rules) and
    ``status/buildinfo|config|flags|runtimeinfo|tsdb``.

    Args:
        querier_factory: returns the ``Querier`` a request reads from (called once per request).
        engine: evaluates PromQL.
        now: the clock, seconds since the epoch (default ``time`` of instant queries).
        info: what the status endpoints report.
    """

    def __init__(self, querier_factory: Callable[[], Querier], engine: Engine, now: Callable[[], float],
                 info: ServerInfo | None = None, frontend: QueryFrontend | None = None) -> None:
        self._querier_factory = querier_factory
        self._engine = engine
        self._frontend = frontend
        self._now = now
        self._info = info or ServerInfo(start_time=now())

    def router(self) -> Router:
        r = Router()
        both = ("GET", "POST")
        r.route("/api/v1/query", self._wrap(self.query), both, name="query", max_body=1 << 20)
        r.route("/api/v1/query_range", self._wrap(self.query_range), both, name="query_range", max_body=1 << 20)
        r.route("/api/v1/series", self._wrap(self.series), both, name="series", max_body=1 << 20)
        r.route("/api/v1/labels", self._wrap(self.labels), both, name="labels", max_body=1 << 20)
        r.route("/api/v1/label/", self._wrap(self.label_values), ("GET",), name="label_values", prefix=True)
        r.route("/api/v1/status/buildinfo", self._wrap(self.buildinfo), ("GET",), name="buildinfo")
        r.route("/api/v1/status/config", self._wrap(self.config), ("GET",), name="config")
        r.route("/api/v1/status/flags", self._wrap(self.flags), ("GET",), name="flags")
        r.route("/api/v1/status/runtimeinfo", self._wrap(self.runtimeinfo), ("GET",), name="runtimeinfo")
        r.route("/api/v1/status/tsdb", self._wrap(self.tsdb), ("GET",), name="tsdb")
        r.route("/api/v1/format_query", self._wrap(self.format_query), both, name="format_query", max_body=1 << 20)
        r.route("/api/v1/parse_query", self._wrap(self.parse_query), both, name="parse_query", max_body=1 << 20)
        r.route("/api/v1/metadata", self._wrap(self.metadata), ("GET",), name="metadata")
        r.route("/api/v1/query_exemplars", self._wrap(self.query_exemplars), both, name="query_exemplars",
                max_body=1 << 20)
        r.route("/api/v1/rules", self._wrap(self.rules), ("GET",), name="rules")
        r.route("/api/v1/alerts", self._wrap(self.alerts), ("GET",), name="alerts")
        return r

    def _wrap(self, fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def handler(req: Request) -> Response:
            try:
                return fn(req)
            except ApiError as e:
                return _error_response(e.error_type, str(e))
            except QueryError as e:
                return _error_response(e.error_type, str(e))
            except (BucketError, ShardUnavailable) as e:  # failures the request asked not to tolerate
                return _error_response("unavailable", str(e))
            except StorageError as e:
                return _error_response("internal", str(e))
        return handler

    # ---- parameters ----

    def _stats(self, form, res: Result, began: float) -> dict | None:
        """Prometheus' ``stats`` object when the request asks for it (``stats=all`` or any value).

        Timings are measured around the evaluation as a whole (queue, preparation and sorting
        are not separate steps here). ``totalQueryableSamples`` counts the samples read from
        storage; ``peakSamples`` is the engine's ``max_samples`` account: samples read plus the
        points of intermediate results, an upper bound of what was held at once.
        """
        if not self._param(form, "stats"):
            return None
        took = time.perf_counter() - began
        return {"timings": {"evalTotalTime": took, "resultSortTime": 0, "queryPreparationTime": 0,
                            "innerEvalTime": took, "execQueueTime": 0, "execTotalTime": took},
                "samples": {"totalQueryableSamples": res.samples, "peakSamples": res.peak_samples}}

    def _querier(self, form) -> Querier:
        """The request's querier; ``partial_response=false`` (Thanos' parameter) makes a failing
        bucket fail the request instead of answering from what could be read, with a warning;
        ``max_source_resolution`` (``auto``, ``raw`` or a duration: ``0s``, ``5m``, ``1h``) caps
        the resolution of downsampled data it reads (``querier/downsampled.py``)."""
        q = self._querier_factory()
        v = self._param(form, "partial_response").lower()
        if v and hasattr(q, "partial_response"):
            if v not in ("true", "false", "1", "0"):
                raise _bad("partial_response", f"cannot parse {json.dumps(v)} to a boolean")
            q.partial_response = v in ("true", "1")
        # Thanos' parameter: the coarsest downsampled data the query may read (auto: step / 5).
        v = self._param(form, "max_source_resolution")
        try:
            res = parse_max_source_resolution(v, parse_duration)
        except ValueError as e:
            raise _bad("max_source_resolution", str(e)) from None
        if hasattr(q, "max_source_resolution"):
            q.max_source_resolution = res
        return q

    @staticmethod
    def _param(form: dict[str, list[str]], name: str) -> str:
        v = form.get(name)
        return v[0] if v else ""

    def _time(self, form, name: str, default: int) -> int:
        s = self._param(form, name)
        if s == "":
            return default
        try:
            return parse_time(s)
        except ValueError as e:
            raise _bad(name, f"Invalid time value for '{name}': {e}") from None

    def _timeout(self, form) -> float | None:
        s = self._param(form, "timeout")
        if not s:
            return None
        try:
            return parse_duration(s) / 1000.0
        except ValueError as e:
            raise _bad("timeout", str(e)) from None

    def _lookback(self, form) -> int | None:
        s = self._param(form, "lookback_delta")
        if not s:
            return None
        try:
            return parse_duration(s)
        except ValueError as e:
            raise _bad("lookback_delta", str(e)) from None

    # ---- handlers ----

    def query(self, req: Request) -> Response:
        form = req.form()
        t = self._time(form, "time", int(self._now() * 1000))
        timeout = self._timeout(form)
        lookback = self._lookback(form)
        expr = self._param(form, "query")
        try:
            parse(expr)
        except QueryError as e:
            raise _bad("query", str(e)) from None
        q = self._querier(form)
        began = time.perf_counter()
        gate = self._frontend.gate if self._frontend is not None else None
        if gate is not None:
            gate.acquire(time.monotonic() + (timeout if timeout is not None else self._engine.timeout_s))
        try:
            res = self._engine.instant(q, expr, t, timeout_s=timeout, lookback_delta_ms=lookback,
                                       cancelled=req.disconnected)
        finally:
            if gate is not None:
                gate.release()
        return _success(result_json(res, self._stats(form, res, began)), res.warnings + _storage_warnings(q),
                        res.infos)

    def query_range(self, req: Request) -> Response:
        form = req.form()
        try:
            start = parse_time(self._param(form, "start"))
        except ValueError as e:
            raise _bad("start", str(e)) from None
        try:
            end = parse_time(self._param(form, "end"))
        except ValueError as e:
            raise _bad("end", str(e)) from None
        if end < start:
            raise _bad("end", "end timestamp must not be before start time")
        try:
            step = parse_duration(self._param(form, "step"))
        except ValueError as e:
            raise _bad("step", str(e)) from None
        if step <= 0:
            raise _bad("step", "zero or negative query resolution step widths are not accepted. Try a positive integer")
        if (end - start) // step > MAX_POINTS:
            raise ApiError("bad_data", "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)")
        timeout = self._timeout(form)
        lookback = self._lookback(form)
        expr = self._param(form, "query")
        try:
            ast = parse(expr)
        except QueryError as e:
            raise _bad("query", str(e)) from None
        if isinstance(_unparen(ast), (pp.MatrixSelector, pp.StringLiteral)):
            kind = "range vector" if isinstance(_unparen(ast), pp.MatrixSelector) else "string"
            raise _bad("query", f'invalid expression type "{kind}" for range query, must be Scalar or instant Vector')
        if self._frontend is not None:
            self._querier(form)  # validates the querier's parameters before anything is evaluated
            began = time.perf_counter()
            res = self._frontend.range(lambda: self._querier(form), expr, start, end, step, timeout_s=timeout,
                                       lookback_delta_ms=lookback, cancelled=req.disconnected,
                                       key=_answer_key(form))
            return _success(result_json(res, self._stats(form, res, began)), res.warnings, res.infos)
        q = self._querier(form)
        began = time.perf_counter()
        res = self._engine.range(q, expr, start, end, step, timeout_s=timeout,
                                 lookback_delta_ms=lookback, cancelled=req.disconnected)
        return _success(result_json(res, self._stats(form, res, began)), res.warnings + _storage_warnings(q),
                        res.infos)

    def _matcher_sets(self, form) -> list[list[Matcher]]:
        sets = []
        for s in form.get("match[]", []):
            try:
                ast = parse(s)
            except QueryError as e:
                raise _bad("match[]", str(e)) from None
            ast = _unparen(ast)
            if not isinstance(ast, pp.VectorSelector):
                raise _bad("match[]", "parse error: expected vector selector")
            try:
                sets.append(selector_matchers(ast))
            except (InvalidMatcher, QueryError) as e:
                raise _bad("match[]", str(e)) from None
        return sets

    def _range(self, form) -> tuple[int, int]:
        return self._time(form, "start", MIN_TIME_MS), self._time(form, "end", MAX_TIME_MS)

    def _limit(self, form) -> int:
        s = self._param(form, "limit")
        if not s:
            return 0
        try:
            n = int(s)
        except ValueError:
            raise _bad("limit", f"cannot parse {json.dumps(s)} to a valid limit") from None
        if n < 0:
            raise _bad("limit", "limit must be non-negative")
        return n

    def series(self, req: Request) -> Response:
        form = req.form()
        sets = self._matcher_sets(form)
        if not sets:
            raise ApiError("bad_data", "no match[] parameter provided")
        mint, maxt = self._range(form)
        limit = self._limit(form)
        q = self._querier(form)
        found = set()
        for ms in sets:
            for s in q.select(ms, mint, maxt, SelectHints(mint, maxt, func="series")):
                found.add(s.labels)
        out = sorted(found)
        warnings = _storage_warnings(q)
        if limit and len(out) > limit:
            out = out[:limit]
            warnings.append("results truncated due to limit")
        return _success("[" + ",".join(_labels_json(lb) for lb in out) + "]", warnings)

    def labels(self, req: Request) -> Response:
        form = req.form()
        sets = self._matcher_sets(form)
        mint, maxt = self._range(form)
        limit = self._limit(form)
        q = self._querier(form)
        names: set[str] = set()
        for ms in sets or [[]]:
            names.update(q.label_names(ms, mint, maxt))
        return self._string_list(sorted(names), limit, _storage_warnings(q))

    def label_values(self, req: Request) -> Response:
        rest = req.params.get("rest", "")
        if not rest.endswith("/values") or rest.count("/") != 1:
            return _error_response("not_found", "not found")
        name = rest[: -len("/values")]
        if not _LABEL_NAME.match(name):
            raise ApiError("bad_data", f"invalid label name: {json.dumps(name)}")
        form = req.form()
        sets = self._matcher_sets(form)
        mint, maxt = self._range(form)
        limit = self._limit(form)
        q = self._querier(form)
        values: set[str] = set()
        for ms in sets or [[]]:
            values.update(q.label_values(name, ms, mint, maxt))
        return self._string_list(sorted(values), limit, _storage_warnings(q))

    @staticmethod
    def _string_list(items: list[str], limit: int, warnings: list[str]) -> Response:
        if limit and len(items) > limit:
            items = items[:limit]
            warnings.append("results truncated due to limit")
        return _success(json.dumps(items, ensure_ascii=False), warnings)

    def buildinfo(self, req: Request) -> Response:
        info = {"version": VERSION, "revision": "", "branch": "", "buildUser": "", "buildDate": "",
                "goVersion": "flashback (python)"}
        return _success(json.dumps(info))

    def config(self, req: Request) -> Response:
        return _success(json.dumps({"yaml": self._info.config_yaml}))

    def flags(self, req: Request) -> Response:
        return _success(json.dumps(self._info.flags))

    def runtimeinfo(self, req: Request) -> Response:
        started = datetime.fromtimestamp(self._info.start_time, timezone.utc)
        info = {"startTime": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "CWD": self._info.cwd, "reloadConfigSuccess": True,
                "lastConfigTime": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "corruptionCount": 0, "goroutineCount": threading.active_count(), "GOMAXPROCS": os.cpu_count() or 1,
                "GOMEMLIMIT": 0, "GOGC": "", "GODEBUG": "", "storageRetention": self._info.storage_retention}
        return _success(json.dumps(info))

    def tsdb(self, req: Request) -> Response:
        form = req.form()
        limit = 10
        if self._param(form, "limit"):
            try:
                limit = int(self._param(form, "limit"))
            except ValueError:
                limit = 0
            if limit <= 0:
                raise ApiError("bad_data", "limit must be a positive number")
        if self._info.tsdb_stats is None:
            raise ApiError("unavailable", "TSDB status is not available on this server")
        return _success(json.dumps(self._info.tsdb_stats(limit), ensure_ascii=False))

    def format_query(self, req: Request) -> Response:
        expr = self._param(req.form(), "query")
        try:
            ast = parse(expr)
        except QueryError as e:
            raise _bad("query", str(e)) from None
        return _success(json.dumps(ast.prettify(), ensure_ascii=False))

    def parse_query(self, req: Request) -> Response:
        expr = self._param(req.form(), "query")
        try:
            ast = parse(expr)
        except QueryError as e:
            raise _bad("query", str(e)) from None
        return _success(json.dumps(astjson.translate(ast), ensure_ascii=False))

    def metadata(self, req: Request) -> Response:
        # Remote write 1.0 metadata is not stored yet: no metric has any.
        form = req.form()
        self._limit(form)
        return _success("{}")

    def query_exemplars(self, req: Request) -> Response:
        # Exemplars are not stored yet; the parameters are still checked as Prometheus does.
        form = req.form()
        try:
            parse(self._param(form, "query"))
        except QueryError as e:
            raise _bad("query", str(e)) from None
        start, end = self._range(form)
        if end < start:
            raise ApiError("bad_data", "end timestamp must not be before start timestamp")
        return _success("[]")

    def rules(self, req: Request) -> Response:
        return _success('{"groups":[]}')

    def alerts(self, req: Request) -> Response:
        return _success('{"alerts":[]}')


# Parameters of query_range that do not change the answer of a split (or are part of its key already).
_NOT_IN_KEY = frozenset({"query", "start", "end", "step", "timeout", "stats", "lookback_delta"})


def _answer_key(form: dict[str, list[str]]) -> tuple:
    """The other parameters of a range query, which may change its answer (e.g. the data's resolution)."""
    return tuple(sorted((k, tuple(v)) for k, v in form.items() if k not in _NOT_IN_KEY))


def _storage_warnings(q: Querier) -> list[str]:
    """Warnings the querier collected while reading (e.g. a partial response from the bucket)."""
    return list(getattr(q, "warnings", ()))


def _unparen(ast):
    while isinstance(ast, pp.ParenExpr):
        ast = ast.expr
    return ast
