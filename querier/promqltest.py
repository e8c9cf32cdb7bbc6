"""Runner for Prometheus' PromQL test scripts (``promql/promqltest`` format).

Reads ``load``/``clear``/``eval`` scripts (see FORMAT.md beside the files in
``../shared/conformance/promql``), loads the data into a real ``Head`` and
evaluates every ``eval`` with our ``Engine``. Each eval passes, fails (with
the reason) or is skipped; skips are only for evals whose data or expected
values are native histograms, which Flashback does not store yet.

Settings as upstream: lookback delta 5 m, values equal within a relative
error of 1e-6 (NaN equals NaN, the stale marker never appears in results).
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import promql_parser

from store.head import Head, HeadOptions
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.writerequest import decode, encode

STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
EPSILON = 1e-6

_NUM = r"[-+]?(?:[Ii]nf|NaN|nan|0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_RE_STEP = re.compile(rf"^({_NUM})([-+])((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)x(\d+)$")
_RE_REPEAT = re.compile(rf"^({_NUM})x(\d+)$")
_RE_BLANKS = re.compile(r"^_x(\d+)$")
_RE_NUM = re.compile(rf"^{_NUM}$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "y": 31_536_000_000}

OMITTED = object()
HISTOGRAM = object()


class ScriptError(ValueError):
    """A test script line this runner cannot parse."""


def parse_number(tok: str) -> float:
    t = tok.lstrip("+-")
    sign = -1.0 if tok.startswith("-") else 1.0
    if t.lower() == "inf":
        return sign * math.inf
    if t.lower() == "nan":
        return math.nan
    if t[:2].lower() == "0x":
        return sign * int(t, 16)
    return float(tok)


def parse_time_ms(tok: str) -> int:
    """``50m``, ``1m30s``, ``0``, ``-10s`` or plain seconds, as milliseconds."""
    sign = -1 if tok.startswith("-") else 1
    s = tok.lstrip("-")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return sign * round(float(s) * 1000)
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            raise ScriptError(f"bad duration {tok!r}")
        total += float(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ScriptError(f"bad duration {tok!r}")
    return sign * round(total)


def _tokens(text: str) -> list[str]:
    """Whitespace-separated tokens, keeping ``{{ ... }}`` histograms whole."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        if text.startswith("{{", i):
            j = text.find("}}", i)
            if j < 0:
                raise ScriptError(f"unterminated histogram in {text!r}")
            j += 2
            if text[j:j + 3] in ("+{{", "-{{"):  # a+bxn with histograms
                k = text.find("}}", j)
                if k < 0:
                    raise ScriptError(f"unterminated histogram in {text!r}")
                j = k + 2
            m = re.match(r"x\d+", text[j:])
            if m:
                j += m.end()
            out.append(text[i:j])
            i = j
            continue
        j = i
        while j < n and not text[j].isspace():
            j += 1
        out.append(text[i:j])
        i = j
    return out


def expand_points(text: str) -> list:
    """promtool's series notation: values, ``a+bxn``, ``axn``, ``_``, ``_xn``, ``stale``, histograms."""
    out: list = []
    for tok in _tokens(text):
        if tok.startswith("{{"):
            m = re.search(r"\}\}x(\d+)$", tok)
            out.extend([HISTOGRAM] * (int(m.group(1)) + 1 if m else 1))
        elif tok == "_":
            out.append(OMITTED)
        elif tok == "stale":
            out.append(STALE_NAN)
        elif m := _RE_BLANKS.match(tok):
            out.extend([OMITTED] * int(m.group(1)))
        elif m := _RE_STEP.match(tok):
            a, sign, b, n = parse_number(m.group(1)), m.group(2), float(m.group(3)), int(m.group(4))
            b = b if sign == "+" else -b
            out.extend(a + i * b for i in range(n + 1))
        elif m := _RE_REPEAT.match(tok):
            out.extend([parse_number(m.group(1))] * (int(m.group(2)) + 1))
        elif _RE_NUM.match(tok):
            out.append(parse_number(tok))
        else:
            raise ScriptError(f"bad value {tok!r}")
    return out


def split_series(line: str) -> tuple[str, str]:
    """``metric{a="b"} 1 2 3`` -> (``metric{a="b"}``, ``1 2 3``)."""
    brace = line.find("{")
    space = next((i for i, c in enumerate(line) if c.isspace()), len(line))
    if brace < 0 or space < brace:
        return line[:space], line[space:]
    i, quote = brace + 1, ""
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c == "}":
            return line[:i + 1], line[i + 1:]
        i += 1
    raise ScriptError(f"unterminated label set in {line!r}")


def parse_labels(text: str) -> Labels:
    if re.fullmatch(r"\{\s*\}", text):
        return Labels()
    try:
        sel = promql_parser.parse(text)
    except ValueError as e:
        raise ScriptError(f"bad series {text!r}: {e}") from None
    pairs = [(m.name, m.value) for m in sel.matchers.matchers]
    if sel.name:
        pairs.append(("__name__", sel.name))
    return Labels.from_pairs(pairs)


@dataclass
class Expectation:
    kind: str  # fail | warn | info | no_warn | no_info | ordered | string | range_vector
    match: str = ""  # msg | regex | ""
    text: str = ""


@dataclass
class Eval:
    line: int
    expr: str
    instant: bool
    start: int
    end: int = 0
    step: int = 0
    expects: list[Expectation] = field(default_factory=list)
    series: list[tuple[Labels | None, list]] = field(default_factory=list)  # None = scalar

    def expect(self, kind: str) -> list[Expectation]:
        return [e for e in self.expects if e.kind == kind]


@dataclass
class Outcome:
    file: str
    line: int
    expr: str
    status: str  # passed | failed | skipped
    reason: str = ""


_EVAL_INSTANT = re.compile(r"^eval(?:_(fail|warn|info|ordered))?\s+instant\s+at\s+(\S+)\s+(.+)$")
_EVAL_RANGE = re.compile(r"^eval(?:_(fail|warn|info|ordered))?\s+range\s+from\s+(\S+)\s+to\s+(\S+)\s+step\s+(\S+)\s+(.+)$")
_EXPECT = re.compile(r"^expect\s+(fail|warn|info|no_warn|no_info|ordered)(?:\s+(msg|regex)\s*:\s*(.*))?$")


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        return s[1:-1] if s[0] == "`" else bytes(s[1:-1], "utf-8").decode("unicode_escape")
    return s


Evaluate = Callable[[Head, Eval], "EvalResult"]


@dataclass
class EvalResult:
    """What an eval produced: an error, or a value; plus annotations."""

    error: str | None = None
    kind: str = ""  # vector | matrix | scalar | string
    # vector: [(labels, t_ms, value)]; matrix: [(labels, [(t_ms, value)])]; scalar: (t, v); string: str
    value: object = None
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)


class Runner:
    """Runs scripts with ``evaluate`` (the engine adapter) and collects ``Outcome``s."""

    def __init__(self, evaluate: Evaluate) -> None:
        self._evaluate = evaluate

    def run_file(self, path: str) -> list[Outcome]:
        with open(path) as f:
            return self.run_text(f.read(), path)

    def run_text(self, text: str, name: str = "<script>") -> list[Outcome]:
        lines = [("" if ln.strip().startswith("#") else ln.strip()) for ln in text.split("\n")]
        head = _new_head()
        hist_series: list[Labels] = []
        outcomes: list[Outcome] = []
        i = 0
        while i < len(lines):
            ln = lines[i]
            if not ln:
                i += 1
                continue
            word = ln.split()[0]
            body_end = i + 1
            # ``clear`` is a line of its own; the next command may follow without a blank line.
            while word != "clear" and body_end < len(lines) and lines[body_end]:
                body_end += 1
            body = [(k + 1, lines[k]) for k in range(i + 1, body_end)]
            try:
                if word == "clear":
                    head, hist_series = _new_head(), []
                elif word in ("load", "load_with_nhcb"):
                    self._load(head, hist_series, ln, body, word == "load_with_nhcb")
                elif word.startswith("eval"):
                    ev = self._parse_eval(i + 1, ln, body)
                    outcomes.append(self._run_eval(name, head, hist_series, ev))
                else:
                    raise ScriptError(f"unknown command {word!r}")
            except ScriptError as e:
                outcomes.append(Outcome(name, i + 1, ln, "failed", f"script error: {e}"))
            i = body_end
        return outcomes

    @staticmethod
    def _load(head: Head, hist_series: list[Labels], ln: str, body: list, nhcb: bool) -> None:
        parts = ln.split()
        if len(parts) != 2:
            raise ScriptError(f"bad load command {ln!r}")
        interval = parse_time_ms(parts[1])
        merged: dict[Labels, dict[int, float]] = {}  # a series given twice: later values win, as upstream
        for _, line in body:
            sel, points = split_series(line)
            labels = parse_labels(sel)
            values = expand_points(points)
            if any(v is HISTOGRAM for v in values):
                hist_series.append(labels)
            points = merged.setdefault(labels, {})
            points.update((k * interval, v) for k, v in enumerate(values) if v is not OMITTED and v is not HISTOGRAM)
            if nhcb and labels.name.endswith(("_bucket", "_sum", "_count")):
                base = labels.name.rsplit("_", 1)[0]
                hist_series.append(labels.without(("le",)).with_label("__name__", base))
        series = [(list(lbls), sorted(points.items())) for lbls, points in merged.items()]
        res = head.append(decode(encode(series)), 0)
        if res.rejected:
            raise ScriptError(f"load rejected samples: {res.message()}")

    @staticmethod
    def _parse_eval(lineno: int, ln: str, body: list) -> Eval:
        if m := _EVAL_INSTANT.match(ln):
            ev = Eval(lineno, m.group(3), True, parse_time_ms(m.group(2)))
        elif m := _EVAL_RANGE.match(ln):
            ev = Eval(lineno, m.group(5), False, parse_time_ms(m.group(2)), parse_time_ms(m.group(3)),
                      parse_time_ms(m.group(4)))
        else:
            raise ScriptError(f"bad eval command {ln!r}")
        if m.group(1):
            ev.expects.append(Expectation(m.group(1)))
        for _, line in body:
            if line.startswith("expected_fail_message"):
                ev.expects.append(Expectation("fail", "msg", line.split(None, 1)[1] if " " in line else ""))
            elif line.startswith("expected_fail_regexp"):
                ev.expects.append(Expectation("fail", "regex", line.split(None, 1)[1] if " " in line else ""))
            elif line.startswith("expect string"):
                ev.expects.append(Expectation("string", "", _unquote(line[len("expect string"):])))
            elif line.startswith("expect range vector"):
                m2 = re.match(r"expect range vector from (\S+) to (\S+) step (\S+)$", line)
                if not m2:
                    raise ScriptError(f"bad line {line!r}")
                ev.expects.append(Expectation("range_vector", "", " ".join(m2.groups())))
            elif line.startswith("expect"):
                m2 = _EXPECT.match(line)
                if not m2:
                    raise ScriptError(f"bad expect line {line!r}")
                text = m2.group(3) or ""
                ev.expects.append(Expectation(m2.group(1), m2.group(2) or "", _unquote(text) if text else ""))
            elif _RE_NUM.match(line.split()[0]) and not line.startswith("{"):
                ev.series.append((None, expand_points(line)))
            else:
                sel, points = split_series(line)
                ev.series.append((parse_labels(sel), expand_points(points)))
        return ev

    def _run_eval(self, name: str, head: Head, hist_series: list[Labels], ev: Eval) -> Outcome:
        def out(status: str, reason: str = "") -> Outcome:
            return Outcome(name, ev.line, ev.expr, status, reason)

        if any(v is HISTOGRAM for _, vals in ev.series for v in vals):
            return out("skipped", "expected values are native histograms")
        if hist_series and _touches(ev.expr, hist_series):
            return out("skipped", "selects series holding native histograms")
        res = self._evaluate(head, ev)
        fails = ev.expect("fail")
        if res.error is not None:
            if not fails:
                return out("failed", f"unexpected error: {res.error}")
            for e in fails:
                if e.match == "msg" and res.error != e.text:
                    return out("failed", f"error {res.error!r}, want {e.text!r}")
                if e.match == "regex" and not re.search(e.text, res.error):
                    return out("failed", f"error {res.error!r} does not match {e.text!r}")
            return out("passed")
        if fails:
            return out("failed", "expected an error, query succeeded")
        why = _check_annotations(ev, res) or _compare(ev, res)
        return out("failed", why) if why else out("passed")


def _new_head() -> Head:
    big = 2**62
    return Head(HeadOptions(out_of_bounds_window_ms=big, max_ahead_ms=big))


def _selectors(node, acc: list) -> list:
    if isinstance(node, promql_parser.VectorSelector):
        acc.append(node)
        return acc
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            _selectors(child, acc)
    for child in getattr(node, "args", None) or ():
        _selectors(child, acc)
    return acc


def _touches(expr: str, hist_series: list[Labels]) -> bool:
    try:
        ast = promql_parser.parse(expr)
    except Exception:
        return False
    for vs in _selectors(ast, []):
        ms = [Matcher(MatchType(_OPS[str(m.op).split(".")[-1]]), m.name, m.value) for m in vs.matchers.matchers]
        if vs.name:
            ms.append(Matcher(MatchType.EQ, "__name__", vs.name))
        for lbls in hist_series:
            if all(m.matches(lbls.get(m.name)) for m in ms):
                return True
    return False


_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def _check_annotations(ev: Eval, res: EvalResult) -> str:
    for kind, got in (("warn", res.warnings), ("info", res.infos)):
        want = ev.expect(kind)
        if ev.expect(f"no_{kind}") and got:
            return f"unexpected {kind} annotations: {got}"
        if not want:
            continue
        if not got:
            return f"expected a {kind} annotation, got none"
        for e in want:
            if e.match == "msg" and e.text not in got:
                return f"{kind} {e.text!r} not in {got}"
            if e.match == "regex" and not any(re.search(e.text, g) for g in got):
                return f"no {kind} matches {e.text!r}: {got}"
    return ""


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    if math.isinf(a) or math.isinf(b):
        return False
    return abs(a - b) <= EPSILON * max(abs(a), abs(b)) or abs(a - b) < 1e-300


def _compare(ev: Eval, res: EvalResult) -> str:
    strings = ev.expect("string")
    if strings:
        if res.kind != "string" or res.value != strings[0].text:
            return f"got {res.kind} {res.value!r}, want string {strings[0].text!r}"
        return ""
    if res.kind == "scalar":
        want = [v for lbls, vals in ev.series if lbls is None for v in vals]
        if len(ev.series) != 1 or ev.series[0][0] is not None or len(want) != 1:
            return f"got scalar {res.value}, want {len(ev.series)} series"
        return "" if _close(res.value[1], want[0]) else f"scalar {res.value[1]}, want {want[0]}"
    if ev.instant and res.kind == "vector":
        got = [(lbls, v) for lbls, _, v in res.value]
        want = []
        for lbls, vals in ev.series:
            if lbls is None or len(vals) != 1:
                return f"expected series {lbls} must have exactly one value for an instant vector"
            want.append((lbls, vals[0]))
        return _match_rows(got, want, bool(ev.expect("ordered")), lambda a, b: _close(a, b))
    if res.kind == "matrix":
        if ev.instant:
            rv = ev.expect("range_vector")
            if not rv:
                return "got a range vector without 'expect range vector'"
            s, e, st = (parse_time_ms(x) for x in rv[0].text.split())
            grid = list(range(s, e + 1, st))
        else:
            grid = list(range(ev.start, ev.end + 1, ev.step)) if ev.step > 0 else [ev.start]
        got = [(lbls, dict(points)) for lbls, points in res.value]
        want = []
        for lbls, vals in ev.series:
            if lbls is None:
                return "a scalar expectation for a matrix result"
            pts = {grid[k]: v for k, v in enumerate(vals) if k < len(grid) and v is not OMITTED}
            if len(vals) > len(grid):
                return f"{lbls}: {len(vals)} expected points for {len(grid)} steps"
            want.append((lbls, pts))

        def same(a: dict, b: dict) -> bool:
            return a.keys() == b.keys() and all(_close(a[t], b[t]) for t in a)

        return _match_rows(got, want, False, same)
    return f"result type {res.kind} not expected here"


def _match_rows(got: list, want: list, ordered: bool, same: Callable) -> str:
    if len(got) != len(want):
        return f"got {len(got)} series, want {len(want)}: got {[str(g[0]) for g in got][:5]}"
    if ordered:
        for (gl, gv), (wl, wv) in zip(got, want):
            if gl != wl or not same(gv, wv):
                return f"ordered: got {gl} {gv}, want {wl} {wv}"
        return ""
    by_labels = {}
    for gl, gv in got:
        if gl in by_labels:
            return f"duplicate series {gl} in result"
        by_labels[gl] = gv
    for wl, wv in want:
        if wl not in by_labels:
            return f"missing series {wl}; got {[str(g[0]) for g in got][:5]}"
        if not same(by_labels[wl], wv):
            return f"{wl}: got {_short(by_labels[wl])}, want {_short(wv)}"
    return ""


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) < 300 else s[:300] + "..."


def summarize(outcomes: Iterable[Outcome]) -> tuple[int, int, int]:
    p = f = s = 0
    for o in outcomes:
        if o.status == "passed":
            p += 1
        elif o.status == "failed":
            f += 1
        else:
            s += 1
    return p, f, s


def engine_evaluator(engine) -> Evaluate:
    """The ``Evaluate`` function running evals through ``engine`` (a ``querier.engine.Engine``)."""
    from querier.errors import QueryError

    def evaluate(head: Head, ev: Eval) -> EvalResult:
        try:
            if ev.instant:
                res = engine.instant(head, ev.expr, ev.start)
            else:
                res = engine.range(head, ev.expr, ev.start, ev.end, ev.step)
        except QueryError as e:
            return EvalResult(error=str(e))
        if res.result_type == "vector":
            value = [(s.labels, s.t, s.value) for s in res.data]
        elif res.result_type == "matrix":
            value = [(s.labels, list(zip(s.timestamps.tolist(), s.values.tolist()))) for s in res.data]
        elif res.result_type == "string":
            value = res.data[1]
        else:
            value = res.data
        return EvalResult(None, res.result_type, value, list(res.warnings), list(res.infos))

    return evaluate


def main(paths: list[str], evaluate: Evaluate, verbose: bool = False, out=sys.stdout) -> int:
    """Runs files; prints every failure and skip with its reason, then per file and in total
    ``N passed, M failed, K skipped``; returns the number of failures."""
    total: list[Outcome] = []
    for path in paths:
        outcomes = Runner(evaluate).run_file(path)
        total += outcomes
        for o in outcomes:
            if o.status != "passed" or verbose:
                print(f"  {o.status.upper()} {path}:{o.line}: {o.expr}" + (f"\n      {o.reason}" if o.reason else ""),
                      file=out)
        p, f, s = summarize(outcomes)
        print(f"{path}: {p} passed, {f} failed, {s} skipped", file=out)
    p, f, s = summarize(total)
    print(f"total: {p} passed, {f} failed, {s} skipped", file=out)
    return f
