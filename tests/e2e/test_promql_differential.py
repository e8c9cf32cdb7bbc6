"""Differential test: Flashback and the real Prometheus answer the same PromQL the same way.

One hour of synthetic scrape data (about 380 series from eleven targets: counters
with resets, gauges with negative values and NaNs, two classic histograms, series
that start, end, go stale and come back, target outages and remote-write gaps,
jittered scrape intervals) is remote-written once, identically and in time order,
to a Debian Prometheus 2.42 (``--web.enable-remote-write-receiver``) and to a
Flashback. Each parametrized case then runs one instant or range query against
both HTTP APIs and compares the answers: result type, label sets, timestamps and
values (within 1e-9 relative, NaN equal to NaN; for ``sort``/``sort_desc`` also
the order of the values). A query Prometheus rejects must be rejected by
Flashback with the same ``errorType``; every other case asserts that Prometheus
returned data, unless the case is marked as expecting an empty answer, so no case
proves nothing.

The samples carry fixed timestamps (2023-11-30 23:20 to 2023-12-01 00:20 UTC, so
the date functions see a change of hour, day and month) rather than recent ones:
an empty Prometheus head accepts any timestamp, and the data are written in
10-minute slices ordered by time, so no sample is ever older than the head's
"newest sample minus one hour" bound, and the answers are the same on every run.

Where Prometheus 2.42 (the local reference) and Prometheus 3 (which Flashback
follows, see issue 3) differ, the data or the query avoid the difference, as
follows; nothing is compared more loosely than stated above.

* Range windows and the lookback are closed at the start in 2.42 ([t-r, t]) and
  left-open in 3.x ((t-r, t]). Every evaluation time here is a whole second plus
  500 ms and every range, offset and subquery step a whole number of seconds,
  while no sample timestamp ends in .000 or .500 seconds. So neither a window
  start nor a subquery's inner step (whole seconds) ever falls on a sample, and
  no outer window start (x.5 s) falls on a subquery's inner step. A subquery nested in
  another is evaluated at the outer one's steps, whole seconds: its range is therefore
  no multiple of its step ([270s:1m]), so its window starts between its steps.
* ``atan2`` keeps ``__name__`` in 2.42 and drops it in 3.x as the other arithmetic
  operators do: its cases aggregate (one series per group), which drops it in both.
* rate()/increase() extrapolation towards the window start: 3.x first caps it at
  half the average sample interval and then at the counter's zero point, 2.42
  does it the other way round. The two orders differ only when the zero point
  lies between 0.5 and 1.1 average intervals before the first sample, i.e. when
  ``first * (n - 1) / increase`` is in (0.5, 1.1) for a window of ``n`` samples.
  Counters here start high and restart (resets) at values far above their
  per-scrape increments, and ``_check_extrapolation_agrees`` proves for every
  counter series and every run of consecutive samples (any window of any
  length) that the ratio is outside that interval. The orders also agree
  whenever the first sample lies less than 1.1 average intervals after the
  window start, which always holds for rate() over a subquery (evenly spaced
  points, none missing here).
* ``holt_winters`` (2.42) is ``double_exponential_smoothing`` in 3.x (experimental
  there, same algorithm): those cases send each server its own name.
* Functions 2.42 does not have (mad_over_time, first_over_time, sort_by_label,
  limitk, limit_ratio, ts_of_*_over_time) and histogram_fraction (native
  histograms only in 2.42, classic buckets too in 3.x) are not compared.
  mad_over_time, sort_by_label(_desc), limitk, limit_ratio and histogram_fraction
  are checked on Flashback alone against values computed here from the written
  data (the ``test_*`` functions after the differential cases), and
  ``test_rate_extrapolation_follows_prometheus_3`` shows the rate() difference
  below on a gauge: 2.42 answers the 2.42 way, Flashback the 3.x way.
* ``__name__``: Flashback runs with delayed name removal off, Prometheus 3's
  default, where functions and arithmetic drop the name as 2.42 does; queries
  whose outcome depends on delayed removal (e.g. reading ``__name__`` after a
  function dropped it) are not used.
* Ties: the order of equal values after sort()/sort_desc() is unspecified in
  both; only the sequence of values is compared for order, the labels as a set.
  Instant vectors of other queries are compared as sets. Which of several equal
  values topk()/bottomk() pick is unspecified too, so their inputs are series
  without equal values (memory sizes, continuous ratios, nonzero rates, derivatives).
* histogram_quantile: 3.x treats bucket counts that differ by less than 1e-12
  relative as equal before forcing monotonicity, 2.42 does not. All bucket
  series of one histogram share their timestamps and have integer counts, so
  equal rates are bit-identical and different ones differ far more than that.
* sum/avg/sum_over_time/avg_over_time use Kahan summation in 3.x and plain or
  incremental summation in 2.42: temperatures are multiples of 1/4, queue depths
  and memory sizes whole numbers, so their sums are exact either way; the other
  sums (of rates, of the positive ratios) do not cancel, and their rounding
  differences stay far below the 1e-9 tolerance. Likewise predict_linear() is
  only applied to series whose prediction does not cancel to near zero.
* predict_linear() over a range selector with ``@`` in a range query: 2.42
  answers only some steps, with values off the regression line (a 2.42 bug); it
  is checked on Flashback alone (``test_predict_linear_with_at_in_a_range_query``).
* Annotations (warnings/infos such as "metric might not be a counter") are 3.x
  only and not compared.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from tests import prompb_ref
from tests.e2e.harness import PROMETHEUS, Flashback, Prometheus, query_api, remote_write

pytestmark = pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="needs the Debian prometheus package")

BASE_S = 1_701_386_400  # 2023-11-30T23:20:00Z; midnight (a new day and month) is at BASE_S + 2400
SPAN_S = 3600
STALE_BYTES = struct.pack("<Q", 0x7FF0000000000002)
STALE_NAN = struct.unpack("<d", STALE_BYTES)[0]
REAL_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
REL = 1e-9


# ---------------------------------------------------------------------------------------------
# The data


@dataclass(frozen=True)
class Target:
    job: str
    instance: str
    interval_s: int


TARGETS = ([Target("api", f"api-{i}:8080", 15) for i in range(5)]
           + [Target("web", f"web-{i}:9090", 10) for i in range(4)]
           + [Target("batch", f"batch-{i}:9100", 30) for i in range(2)])
# Seconds after BASE_S. Outage: the scrape fails, Prometheus writes stale markers for every
# series but fb_target_up, which reads 0. Gap: nothing arrives (lost remote-write batches).
OUTAGES = {"api-1:8080": (1500, 1920)}
GAPS = {"api-3:8080": (2300, 2500), "web-2:9090": (2000, 2600)}
RESTARTS = {"web-0:9090": (1200, 3000), "api-4:8080": (2100,)}
LIFETIMES = {"batch-0:9100": (0, 3000), "batch-1:9100": (1800, SPAN_S)}  # stale markers at the end
QUEUE_VANISH = (2700, 3300)  # fb_queue_depth{queue="q3"} of the web targets: stale, then back

DURATION_LE = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf")
SIZE_LE = ("100", "1000", "10000", "100000", "1e+06", "1e+07", "1e+08", "+Inf")


def _slots(rng: np.random.Generator, t: Target) -> np.ndarray:
    """Scrape timestamps (ms): the interval jittered by up to ±30 %, never at .000 or .500 s."""
    iv = t.interval_s * 1000
    k = np.arange(SPAN_S * 1000 // iv)
    ts = BASE_S * 1000 + int(rng.integers(1, iv)) + k * iv + rng.integers(-3 * iv // 10, 3 * iv // 10, len(k))
    ts = ts[(ts >= BASE_S * 1000) & (ts < (BASE_S + SPAN_S) * 1000)]
    ts[ts % 500 == 0] += 1
    return ts.astype(np.int64)


def _is_stale(v: float) -> bool:
    return struct.pack("<d", v) == STALE_BYTES


def _counter(rng, incs: np.ndarray, restarts: np.ndarray, base: float) -> np.ndarray:
    """Cumulative values from ``base`` on; at each restart index the counter drops and starts again.

    The start and restart values are kept far above one increment, so that rate()'s
    extrapolation agrees between 2.42 and 3.x (module docstring)."""
    max_inc = max(float(incs.max()), 1.0)
    v = max(base, 60 * max_inc) + np.cumsum(np.concatenate([[0], incs[1:]]))
    reset_base = 40 * max_inc + float(rng.integers(0, 50))
    for r in restarts:
        v[r:] = v[r:] - v[r] + reset_base
    return v


def generate() -> list[tuple[dict, list[tuple[int, float]]]]:
    """The series to write: (labels, [(t_ms, value)] in time order, stale markers included)."""
    rng = np.random.default_rng(20231130)
    out: list[tuple[dict, list[tuple[int, float]]]] = []
    for t in TARGETS:
        ts = _slots(rng, t)
        rel = (ts - BASE_S * 1000) / 1000
        n = len(ts)
        keep = np.ones(n, bool)  # something is written at this slot
        end_stale = np.zeros(n, bool)  # the target is gone: every series gets a stale marker
        lo, hi = LIFETIMES.get(t.instance, (0, SPAN_S))
        keep &= (rel >= lo) & (rel < hi)
        if hi < SPAN_S:
            end_stale[np.argmax(rel >= hi)] = keep[np.argmax(rel >= hi)] = True
        down = np.zeros(n, bool)
        if t.instance in OUTAGES:
            a, b = OUTAGES[t.instance]
            down = (rel >= a) & (rel < b)
        if t.instance in GAPS:
            a, b = GAPS[t.instance]
            keep &= ~((rel >= a) & (rel < b))
        restarts = np.array([int(np.argmax(rel >= r)) for r in RESTARTS.get(t.instance, ())], int)
        base = {"job": t.job, "instance": t.instance}

        def emit(name: str, values: np.ndarray, mask=None, **labels) -> None:
            samples: list[tuple[int, float]] = []
            for i in np.flatnonzero(keep):
                if end_stale[i] or (down[i] and name != "fb_target_up"):
                    # A stale marker where the series had a sample before: at the first failed
                    # scrape of an outage and when the target goes away, as Prometheus writes them.
                    if samples and not _is_stale(samples[-1][1]):
                        samples.append((int(ts[i]), STALE_NAN))
                elif down[i]:
                    samples.append((int(ts[i]), 0.0))
                elif mask is None or mask[i]:
                    if not (_is_stale(values[i]) and (not samples or _is_stale(samples[-1][1]))):
                        samples.append((int(ts[i]), float(values[i])))
            if samples:
                out.append(({"__name__": name, **base, **labels}, samples))

        dt = np.diff(ts, prepend=ts[0] - t.interval_s * 1000) / 1000
        up = np.where(down, 0.0, 1.0)
        emit("fb_target_up", up)
        version = {"web-0:9090": "1.4.0"}.get(t.instance)
        if version:  # the first restart upgrades web-0: a new fb_build_info series, the old one ends stale
            r = restarts[0]
            idx = np.arange(n)
            emit("fb_build_info", np.where(idx == r, STALE_NAN, 1.0), idx <= r, version="1.3.2", goversion="go1.21")
            emit("fb_build_info", np.ones(n), idx >= r, version=version, goversion="go1.21")
        else:
            emit("fb_build_info", np.ones(n), version="1.3.2", goversion="go1.21")
        for typ, scale in (("rss", 2e8), ("heap", 8e7), ("cache", 5e8)):
            walk = np.cumsum(rng.integers(-2000, 2100, n)) * 4096 + int(scale)
            emit("fb_memory_bytes", np.abs(walk).astype(float), type=typ)
        for cpu in ("0", "1"):
            for mode, frac in (("user", 0.35), ("system", 0.1), ("idle", 0.5)):
                incs = np.round(dt * frac * rng.uniform(0.5, 1.5, n) * 64) / 64
                emit("fb_cpu_seconds_total", _counter(rng, incs, np.array([], int), 1e4 * rng.uniform(1, 9)),
                     cpu=cpu, mode=mode)
        if t.job == "batch":
            for b in range(5):
                incs = rng.poisson(3 + 4 * b, n).astype(float)
                emit("fb_batch_items_processed_total", _counter(rng, incs, restarts, float(rng.integers(500, 5000))),
                     batch=f"b{b}")
            continue
        for method in ("GET", "POST"):
            for code, per_s in (("200", 20.0), ("404", 1.0), ("500", 0.05)):
                incs = rng.poisson(per_s * (1 if method == "GET" else 0.3) * dt).astype(float)
                emit("fb_http_requests_total", _counter(rng, incs, restarts, float(rng.integers(2000, 90000))),
                     method=method, code=code)
        for sensor, mean, sd in (("cpu", 45, 3), ("board", 35, 1.5), ("inlet", 2, 1.2), ("freezer", -18, 0.8)):
            walk = mean + np.cumsum(rng.normal(0, sd * 0.2, n))
            emit("fb_temperature_celsius", np.round(walk * 4) / 4, sensor=sensor)
        for q in range(4):
            depth = np.clip(np.cumsum(rng.integers(-3, 4, n)) + 20 * q + 10, 0, 100).astype(float)
            mask = None
            if q == 3 and t.job == "web":
                a, b = QUEUE_VANISH
                gone = (rel >= a) & (rel < b)
                stale_q = np.zeros(n, bool)
                stale_q[np.argmax(gone)] = True
                mask = ~gone | stale_q
                depth = np.where(stale_q, STALE_NAN, depth)
            emit("fb_queue_depth", depth, mask, queue=f"q{q}")
        if t.job == "api":
            for kind in ("a", "b"):
                ratio = rng.uniform(0, 1, n)  # continuous: no two equal values for topk/bottomk
                ratio[rng.uniform(0, 1, n) < 0.03] = REAL_NAN
                emit("fb_ratio", ratio, kind=kind)
            _histogram(rng, emit, "fb_request_duration_seconds", DURATION_LE, dt, restarts, 30.0, -2.5, 1.2)
        else:
            _histogram(rng, emit, "fb_response_size_bytes", SIZE_LE, dt, restarts, 12.0, 8.5, 2.0)
    return out


def _histogram(rng, emit, name: str, les: tuple[str, ...], dt: np.ndarray, restarts: np.ndarray,
               per_s: float, mu: float, sigma: float) -> None:
    """A classic histogram: per-bucket counters summed into cumulative ``le`` buckets, _sum, _count."""
    n = len(dt)
    bounds = np.array([float(x) for x in les])
    cdf = np.array([0.5 * (1 + math.erf((math.log(b) - mu) / (sigma * math.sqrt(2)))) if b < math.inf else 1.0
                    for b in bounds])
    probs = np.diff(np.concatenate([[0.0], cdf]))
    counts = rng.multinomial(rng.poisson(per_s * dt), probs)
    per_bucket = np.stack([_counter(rng, counts[:, k].astype(float), restarts, float(rng.integers(100, 3000)))
                           for k in range(len(les))], axis=1)
    cumulative = np.cumsum(per_bucket, axis=1)
    for k, le in enumerate(les):
        emit(name + "_bucket", cumulative[:, k], le=le)
    emit(name + "_count", cumulative[:, -1])
    mids = np.concatenate([bounds[:1] / 2, (bounds[:-1] + np.minimum(bounds[1:], bounds[:-1] * 4)) / 2])
    sum_incs = np.round(counts @ mids * 1024) / 1024
    emit(name + "_sum", _counter(rng, sum_incs, restarts, float(rng.integers(1000, 9000))))


def _check_extrapolation_agrees(series) -> int:
    """Asserts that no counter window hits the 2.42/3.x extrapolation difference (module docstring).

    For the samples i..j of a counter (stale markers skipped, as range selection does), with
    ``increase`` the reset-corrected increase, the zero point lies ``first * (j - i) / increase``
    average intervals before the first sample; the versions agree unless that is in (0.5, 1.1).
    Returns the number of counter series checked."""
    checked = 0
    for labels, samples in series:
        name = labels["__name__"]
        if not name.endswith(("_total", "_bucket", "_count", "_sum")):
            continue
        v = np.array([x for _, x in samples if not math.isnan(x)])
        inc = np.diff(v)
        inc = np.where(inc >= 0, inc, v[1:])
        cum = np.concatenate([[0.0], np.cumsum(inc)])
        i, j = np.triu_indices(len(v), 1)
        increase = cum[j] - cum[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = v[i] * (j - i) / increase
        bad = (increase > 0) & (ratio > 0.5 - 1e-6) & (ratio < 1.1 + 1e-6)
        assert not bad.any(), f"{labels}: window {i[bad][0]}..{j[bad][0]} extrapolates differently in 2.42 and 3.x"
        checked += 1
    return checked


def _write_requests(series, slice_s: int = 600) -> list[bytes]:
    """The data as write requests of ``slice_s`` seconds each, in time order."""
    reqs = []
    for lo in range(BASE_S * 1000, (BASE_S + SPAN_S) * 1000, slice_s * 1000):
        part = []
        for labels, samples in series:
            chunk = [(t, v) for t, v in samples if lo <= t < lo + slice_s * 1000]
            if chunk:
                part.append((sorted(labels.items()), chunk))
        reqs.append(prompb_ref.write_request(part))
    return reqs


# ---------------------------------------------------------------------------------------------
# The queries


@dataclass(frozen=True)
class Q:
    """One query. ``at`` names an instant evaluation time (see ``TIMES``) or a range (``RANGES``).

    ``expr`` may use ``<T seconds>`` (e.g. ``<T1800>``) for the timestamp ``BASE_S + seconds + 0.5``.
    ``ordered``: the order of values is significant (sort, sort_desc).
    ``empty``: Prometheus' answer is expected to be empty. ``error``: Prometheus rejects it.
    ``flashback_expr``: what Flashback is sent instead (a 3.x renaming)."""

    expr: str
    at: str = "mid"
    ordered: bool = False
    empty: bool = False
    error: bool = False
    flashback_expr: str | None = None


# Instant evaluation times, seconds after BASE_S (all at .5 s, see the module docstring).
TIMES = {
    "mid": 2400.5,  # api-3 in its short gap (lookback still finds it), web-2 in its long one (gone)
    "outage": 1700.5,  # api-1 down: its series are stale, fb_target_up reads 0
    "late": 3720.5,  # two minutes after the last scrape: lookback still returns the last samples
    "after": 4000.5,  # more than five minutes after the last scrape: nothing
}
# Range queries: (start, end, step) in seconds after BASE_S.
RANGES = {
    "range": (600.5, 3900.5, 60),
    "fine": (2200.5, 2800.5, 7),  # around the gaps and the vanishing queue, at a 7 s step
    "edge": (1400.5, 2000.5, 20),  # api-1's outage
    "full": (0.5, 3900.5, 10),  # every series at every 10 s
}


def _at_times(expr: str) -> str:
    """Replaces ``<T1800>`` by the timestamp BASE_S + 1800.5 (seconds)."""
    return re.sub(r"<T(-?\d+)>", lambda m: f"{BASE_S + int(m.group(1)) + 0.5:.3f}", expr)


def q(id_: str, expr: str, at: str = "mid", xfail: str | None = None, **kw):
    marks = [pytest.mark.xfail(strict=True, reason=f"Flashback bug: {xfail}")] if xfail else []
    return pytest.param(Q(expr, at, **kw), id=id_, marks=marks)


HTTP = "fb_http_requests_total"
TEMP = "fb_temperature_celsius"
QUEUE = "fb_queue_depth"
MEM = "fb_memory_bytes"
DUR = "fb_request_duration_seconds"
SIZE = "fb_response_size_bytes"

QUERIES = [
    # Selectors, lookback, stale markers, offset, @.
    q("selector_instant", HTTP),
    q("selector_range", HTTP + '{code!="200", method=~"P.*"}', "range"),
    q("selector_regex_name", '{__name__=~"fb_(temperature_celsius|queue_depth)", job="web"}'),
    q("selector_matrix", TEMP + '{instance=~"api-[01].*"}[3m]'),
    q("selector_matrix_stale", HTTP + '{instance="api-1:8080", code="200"}[10m]', "outage"),
    q("lookback_gaps_fine", QUEUE, "fine"),
    q("lookback_outage", HTTP + '{code="404"}', "edge"),
    q("lookback_late", MEM, "late"),
    q("lookback_after", MEM, "after", empty=True),
    q("stale_vanishing_series", QUEUE + '{queue="q3"}', "range"),
    q("series_churn_build_info", "fb_build_info", "range"),
    q("series_start_and_end", "fb_batch_items_processed_total", "range"),
    q("target_up_outage", "fb_target_up", "edge"),
    q("offset", "fb_cpu_seconds_total offset 10m"),
    q("offset_negative", "fb_cpu_seconds_total offset -10m", "outage"),
    q("offset_range", TEMP + '{sensor="inlet"} offset 7m', "range"),
    q("at_timestamp", MEM + " @ <T1800>", "late"),
    q("at_start", MEM + " @ start()", "range"),
    q("at_end", MEM + '{type="rss"} @ end()', "fine"),
    q("at_in_gap", QUEUE + " @ <T2450>", "late"),
    q("at_and_offset", QUEUE + '{queue="q0"} @ <T3000> offset 20m', "range"),
    q("at_before_data", MEM + " @ <T-900>", empty=True),
    # Counter and gauge range functions.
    q("rate_5m", f"rate({HTTP}[5m])", "range"),
    q("rate_1m", f"rate({HTTP}[1m])", "fine"),
    q("rate_outage", f"rate({HTTP}[2m])", "edge"),
    q("irate", f"irate({HTTP}[1m])", "range"),
    q("increase_10m", "increase(fb_cpu_seconds_total[10m])", "range"),
    q("increase_90s_instant", f"increase({HTTP}[90s])"),
    q("increase_series_start", "increase(fb_batch_items_processed_total[5m])", "range"),
    q("rate_offset", f"rate({HTTP}[5m] offset 5m)"),
    q("rate_offset_negative", f"rate({HTTP}[5m] offset -3m)"),
    q("rate_at_end", f"rate({HTTP}[5m] @ end())", "fine"),
    q("delta", f"delta({TEMP}[5m])", "range"),
    q("idelta", f"idelta({QUEUE}[2m])", "range"),
    q("deriv", f"deriv({TEMP}[10m])", "range"),
    q("predict_linear", f"predict_linear({MEM}[15m], 600)", "range"),
    q("resets", f"resets({HTTP}[30m])", "range"),
    q("resets_histogram", f"resets({DUR}_bucket[1h])", "late"),
    q("changes", f"changes({QUEUE}[10m])", "range"),
    q("changes_build_info", "changes(fb_build_info[1h])", "late"),
    # *_over_time.
    q("avg_over_time", f"avg_over_time({TEMP}[10m])", "range"),
    q("min_over_time", f"min_over_time({TEMP}[10m])", "range"),
    q("max_over_time", f"max_over_time({QUEUE}[10m])", "range"),
    q("sum_over_time", f"sum_over_time({QUEUE}[5m])", "range"),
    q("count_over_time", f"count_over_time({QUEUE}[5m])", "fine"),
    q("count_over_time_1h", "count_over_time(fb_target_up[1h])", "late"),
    q("last_over_time", "last_over_time(fb_build_info[10m])", "range"),
    q("present_over_time", f"present_over_time({QUEUE}[2m])", "fine"),
    q("quantile_over_time", f"quantile_over_time(0.9, {TEMP}[10m])", "range"),
    q("quantile_over_time_q0", f"quantile_over_time(0, {QUEUE}[5m])"),
    q("quantile_over_time_q1", f"quantile_over_time(1, {QUEUE}[5m])"),
    q("quantile_over_time_q_neg", f"quantile_over_time(-0.5, {QUEUE}[5m])"),
    q("quantile_over_time_q_big", f"quantile_over_time(1.5, {QUEUE}[5m])"),
    q("stddev_over_time", f"stddev_over_time({TEMP}[10m])", "range"),
    q("stdvar_over_time", f"stdvar_over_time({MEM}[10m])", "range"),
    q("over_time_with_nan", "max_over_time(fb_ratio[5m]) + min_over_time(fb_ratio[5m])"),
    q("avg_over_time_nan", "avg_over_time(fb_ratio[2m])", "fine"),
    q("holt_winters", f"holt_winters({TEMP}[10m], 0.5, 0.3)", "range",
      flashback_expr=f"double_exponential_smoothing({TEMP}[10m], 0.5, 0.3)"),
    q("absent_over_time_present", f"absent_over_time({QUEUE}[5m])", empty=True),
    q("absent_over_time_missing", 'absent_over_time(nonexistent{job="api", kind="x"}[5m])'),
    q("absent_over_time_vanishing", f'absent_over_time({QUEUE}{{queue="q3", instance="web-1:9090"}}[2m])',
      "range"),
    # absent.
    q("absent_present", "absent(fb_target_up)", empty=True),
    q("absent_labels", 'absent(nonexistent{job="api", instance=~"x.*", code="200"})'),
    q("absent_aggregate", "absent(sum(nonexistent))"),
    q("absent_range", f'absent({QUEUE}{{queue="q3", instance="web-1:9090"}})', "range"),
    # Classic histograms.
    q("histogram_quantile", f"histogram_quantile(0.9, rate({DUR}_bucket[5m]))", "range"),
    q("histogram_quantile_sum_by_le", f"histogram_quantile(0.5, sum by (le) (rate({DUR}_bucket[5m])))", "range"),
    q("histogram_quantile_by_job", f"histogram_quantile(0.99, sum by (job, le) (rate({SIZE}_bucket[10m])))"),
    q("histogram_quantile_raw", f"histogram_quantile(0.75, {DUR}_bucket)"),
    q("histogram_quantile_q0", f"histogram_quantile(0, rate({SIZE}_bucket[5m]))"),
    q("histogram_quantile_q1", f"histogram_quantile(1, rate({SIZE}_bucket[5m]))"),
    q("histogram_quantile_q_neg", f"histogram_quantile(-1, rate({DUR}_bucket[5m]))"),
    q("histogram_quantile_q_big", f"histogram_quantile(2, rate({DUR}_bucket[5m]))"),
    q("histogram_mean", f"rate({DUR}_sum[5m]) / rate({DUR}_count[5m])", "range"),
    # Labels.
    q("label_replace", 'label_replace(fb_target_up, "host", "$1", "instance", "(.*):.*")'),
    q("label_replace_no_match", 'label_replace(fb_target_up, "host", "$1", "instance", "nomatch(.*)")'),
    q("label_replace_name", f'label_replace(rate({HTTP}[5m]), "__name__", "http_rate", "", "")', "range"),
    q("label_replace_delete", f'label_replace({TEMP}, "sensor", "", "sensor", "cpu")'),
    q("label_replace_duplicate_error", f'label_replace({TEMP}, "sensor", "", "sensor", ".*")', error=True),
    q("label_join", 'label_join(fb_build_info, "id", "/", "job", "instance", "version")', "range"),
    # Sorting.
    q("sort", f"sort({TEMP})", ordered=True),
    q("sort_desc", f"sort_desc(sum by (instance) (rate({HTTP}[5m])))", ordered=True),
    q("sort_desc_ties", "sort_desc(fb_target_up)", "outage", ordered=True),
    # Math, clamping, rounding.
    q("clamp", f"clamp({TEMP}, -5, 30)"),
    q("clamp_inverted", f"clamp({TEMP}, 30, -5)", empty=True),
    q("clamp_min", f"clamp_min({TEMP}, 0)", "range"),
    q("clamp_max", f"clamp_max({QUEUE}, 40)", "range"),
    q("round", f"round({TEMP})"),
    q("round_to", f"round({TEMP}, 5)"),
    q("round_to_fraction", f"round({TEMP}, 0.3)"),
    q("abs_ceil_floor", f"abs({TEMP}) + ceil({TEMP}) - floor({TEMP})"),
    q("sqrt_negative", f"sqrt({TEMP})"),
    q("exp", f"exp({TEMP} / 10)"),
    q("ln_log", f"ln({MEM}) + log2({MEM}) + log10({MEM})"),
    q("ln_nonpositive", f"ln({TEMP})"),
    q("sgn", f"sgn({TEMP})", "range"),
    q("trig", f"sin({TEMP}) + cos({TEMP}) * tan({TEMP})"),
    q("inverse_trig", f"asin({TEMP} / 50) + acos({TEMP} / 50) + atan({TEMP})"),
    q("hyperbolic", f"sinh({TEMP} / 10) - cosh({TEMP} / 10) + tanh({TEMP})"),
    q("inverse_hyperbolic", f"asinh({TEMP}) + acosh({TEMP}) + atanh({TEMP} / 100)"),
    q("deg_rad_pi", f"deg({TEMP}) + rad({TEMP}) * pi()"),
    # atan2 keeps __name__ in 2.42 and drops it in 3.x like the other arithmetic operators; the
    # aggregation (one series per group) drops it in both.
    q("atan2", f'sum by (job, instance) ({TEMP}{{sensor="cpu"}} atan2 ignoring (sensor) {TEMP}{{sensor="freezer"}})'),
    q("atan2_scalar", f'sum by (job, instance, sensor) ({TEMP} atan2 10)', "range"),
    # Time, date, timestamp, vector, scalar.
    q("time", "time()", "range"),
    q("time_instant", "time()"),
    q("timestamp", f"timestamp({QUEUE})", "fine"),
    q("timestamp_offset", f"timestamp({QUEUE} offset 1m)"),
    q("timestamp_of_function", f"timestamp(abs({QUEUE}))"),
    q("date_minute_hour", "minute() + 100 * hour()", "range"),
    q("date_days", "day_of_week() + 10 * day_of_month() + 1000 * day_of_year()", "range"),
    q("date_month_year", "days_in_month() + 100 * month() + 10000 * year()", "range"),
    q("date_functions_arg", "hour(timestamp(fb_target_up)) + 24 * day_of_month(timestamp(fb_target_up))"
      " + 1000 * month(timestamp(fb_target_up))", "range"),
    q("date_functions_vector", "day_of_week(vector(1709251200)) + days_in_month(vector(1709251200))"
      " + day_of_year(vector(1709251200)) + year(vector(-1))"),
    q("vector", "vector(7)", "range"),
    q("vector_time", "vector(time())"),
    q("scalar", "scalar(sum(fb_target_up))", "range"),
    q("scalar_many", "scalar(fb_target_up)"),
    q("scalar_in_arithmetic", f"{MEM} / scalar(max({MEM}))"),
    # Aggregations.
    q("sum", f"sum({QUEUE})", "range"),
    q("sum_by", f"sum by (job, method) (rate({HTTP}[5m]))", "range"),
    q("sum_without", "sum without (instance, cpu) (rate(fb_cpu_seconds_total[5m]))", "range"),
    q("avg_by", f"avg by (sensor) ({TEMP})", "range"),
    q("avg_without", f"avg without (sensor) ({TEMP})"),
    q("min_max", f"min by (job) ({TEMP}) - max by (job) ({TEMP})", "range"),
    q("count_by", f"count by (instance) ({MEM})", "range"),
    q("count_without", f"count without (queue) ({QUEUE})", "fine"),
    q("group", "group by (job, version) (fb_build_info)", "range"),
    q("stddev", f"stddev by (sensor) ({TEMP})", "range"),
    q("stdvar", f"stdvar without (instance) ({QUEUE})"),
    # topk/bottomk pick any of several equal values (module docstring): their inputs here
    # (memory sizes, ratios, nonzero rates, derivatives) hold no two equal values.
    q("topk_by", f"topk by (job) (2, rate({HTTP}[5m]))", "range"),
    q("topk_range", f"topk(5, {MEM})", "range"),
    q("bottomk", f"bottomk(2, {MEM})"),
    q("bottomk_by_range", f"bottomk by (sensor) (1, deriv({TEMP}[10m]))", "range"),
    q("topk_scalar_param", f"topk(scalar(count(fb_build_info)) - 8, rate({HTTP}[5m]))"),
    q("quantile", f"quantile(0.5, {TEMP})"),
    q("quantile_by", f"quantile by (job) (0.9, rate({HTTP}[5m]))", "range"),
    q("quantile_out_of_range", f"quantile(1.2, {TEMP}) + quantile(-0.2, {TEMP})"),
    q("count_values", f'count_values("depth", {QUEUE})'),
    q("count_values_by", f'count_values by (job) ("version", fb_target_up)', "outage"),
    q("count_values_range", 'count_values("v", round(fb_ratio, 0.25))', "range"),
    q("aggregate_nan", "sum by (instance) (fb_ratio)", "range"),
    q("max_min_nan", "max(fb_ratio) - min(fb_ratio)", "range"),
    q("topk_nan", "topk(3, fb_ratio)", "range"),
    q("bottomk_nan", "bottomk(2, fb_ratio)", "range"),
    q("nested_aggregation", f"max(sum by (job) (rate({HTTP}[5m])))", "range"),
    # Binary operators, matching, precedence.
    q("arith_scalar", f"{MEM} / 1024 / 1024"),
    q("arith_precedence", "1 + 2 * 3 - 4 / 2 % 3 ^ 2 ^ 0.5"),
    q("arith_power_right_assoc", "2 ^ 3 ^ 2"),
    q("unary_minus_power", "-2 ^ 2"),
    q("unary_minus", f"-{TEMP}", "range"),
    q("unary_minus_aggregate", f"-sum by (job) ({QUEUE})"),
    q("modulo", f"{MEM} % 7"),
    q("power", f"{TEMP} ^ 2 - 2 ^ {TEMP}"),
    q("vector_vector_one_to_one", f"{MEM} - {MEM} offset 5m"),
    q("on", f'sum by (instance) (rate({HTTP}{{code="500"}}[5m])) / on (instance) '
      f'sum by (instance) (rate({HTTP}[5m]))', "range"),
    q("ignoring", f'{MEM}{{type="rss"}} / ignoring (type) {MEM}{{type="heap"}}', "range"),
    q("group_left", f"{HTTP} * on (job, instance) group_left (version) fb_build_info", "range"),
    q("group_right", f"fb_build_info * on (job, instance) group_right (version) {MEM}"),
    q("group_left_no_labels", f'{QUEUE} / on (instance) group_left {TEMP}{{sensor="board"}}'),
    q("many_to_many_error", f"{MEM} * on (job) {MEM}", error=True),
    q("comparison_filter", f"{TEMP} > 20", "range"),
    q("comparison_bool", f"{TEMP} > bool 20", "range"),
    q("comparison_scalar_left", f"20 < {TEMP}"),
    q("comparison_eq_ne", f"{QUEUE} == 10 or {QUEUE} != {QUEUE}", "range"),
    q("comparison_vectors", f'{TEMP}{{sensor="cpu"}} > ignoring (sensor) {TEMP}{{sensor="board"}} + 10'),
    q("comparison_vectors_bool_group", f'{TEMP} >= bool ignoring (sensor) group_left {TEMP}{{sensor="board"}}'),
    q("comparison_scalars_bool", "(1 > bool 2) + (3 >= bool 3) + (time() < bool 0)"),
    q("and", f'{QUEUE} and on (instance) ({TEMP}{{sensor="cpu"}} > 45)', "range"),
    q("or", f'{QUEUE}{{queue="q0"}} or {QUEUE}{{queue="q1"}} or vector(0)', "range"),
    q("or_precedence", f'{QUEUE} > 90 or {QUEUE} < 5 and {QUEUE} > 2', "range"),
    q("unless", f'{MEM} unless on (instance) {QUEUE}{{queue="q3"}}', "fine"),
    q("unless_outage", f'fb_target_up unless on (instance) {HTTP}', "edge"),
    q("set_ops_group_by_name", f'{TEMP} and {TEMP} offset 1m unless {TEMP} < 0'),
    q("precedence_mixed", f"sum({QUEUE}) + sum({QUEUE}) * 2 > 100 and sum({QUEUE}) < 1e9"),
    q("bool_group_left", f'({QUEUE} > bool 50) * on (instance) group_left () ({TEMP}{{sensor="cpu"}} > bool 46)',
      "range"),
    # Subqueries.
    q("subquery_max_rate", f"max_over_time(rate({HTTP}[1m])[10m:30s])", "range"),
    q("subquery_avg", f"avg_over_time({TEMP}[10m:1m])"),
    q("subquery_rate_of_sum", f"rate(sum by (job) ({HTTP})[5m:30s])", "range"),
    q("subquery_offset", f"min_over_time(deriv({MEM}[5m])[20m:2m] offset 5m)"),
    q("subquery_default_step", "sum_over_time(fb_target_up[30m:])", "late"),
    q("subquery_at", f"max_over_time(({QUEUE} > 50)[15m:1m] @ <T2400>)", "range"),
    # The inner subquery runs at the outer one's steps (whole seconds): its range is no multiple
    # of its step, so its window never starts on one of its own steps (module docstring).
    q("subquery_nested", f"avg_over_time(max_over_time({QUEUE}[270s:1m])[15m:5m])", "range"),
    q("subquery_count", f"count_over_time({QUEUE}[10m:45s])", "fine"),
    q("subquery_deriv", f"deriv(sum by (job) ({QUEUE})[10m:1m])", "range"),
    q("subquery_offset_negative", f"max_over_time({TEMP}[5m:1m] offset -5m)", "outage"),
    # Syntax corners and rejected queries (both must answer with the same errorType).
    q("suffix_by_clause", f"sum(rate({HTTP}[5m])) by (job)", "range"),
    q("without_nothing", f"sum without () ({QUEUE})"),
    q("compound_duration", f"rate({HTTP}[1m30s])", "fine"),
    q("number_literals", "vector(0x10) + 1e3 + 1.5e-1 - Inf + Inf", "range"),
    q("inf_nan_literals", "vector(Inf) + vector(-Inf) * vector(NaN)"),
    q("aggregate_by_name", 'count by (__name__) ({__name__=~"fb_.+_total"})', "range"),
    q("rate_regex_names", 'rate({__name__=~"fb_(http_requests|batch_items_processed)_total"}[5m])', "range"),
    q("and_on_nothing", "vector(1) and on () fb_target_up", "range"),
    q("topk_zero", f"topk(0, {QUEUE})", empty=True),
    q("empty_aggregation", "sum(nonexistent)", empty=True),
    q("label_replace_groups", 'label_replace(fb_target_up, "port", "${2}-$1", "instance", "([a-z]+)-[0-9]:([0-9]+)")'),
    q("over_time_1s_windows", f"max_over_time({QUEUE}[1s])", "fine"),
    q("quantile_over_time_nan", "quantile_over_time(0.5, fb_ratio[5m])", "range"),
    q("sort_nan", "sort(fb_ratio)", "outage", ordered=True),
    q("sort_desc_nan", "sort_desc(fb_ratio)", "outage", ordered=True),
    q("nan_comparison", "count(fb_ratio != fb_ratio) or vector(0)", "range"),
    q("histogram_quantile_no_inf", f'histogram_quantile(0.5, {DUR}_bucket{{le!="+Inf"}})'),
    q("histogram_quantile_only_inf", f'histogram_quantile(0.5, {DUR}_bucket{{le="+Inf"}})'),
    q("histogram_quantile_deltas", f"histogram_quantile(0.5, {DUR}_bucket - {DUR}_bucket offset 10m)", "range"),
    q("parse_error", "sum(fb_target_up", error=True),
    q("wrong_argument_type", "rate(fb_target_up)", error=True),
    q("group_left_not_unique", "fb_target_up * on (job) group_left fb_target_up", error=True),
    q("topk_nan_parameter", f"topk(NaN, {MEM})", error=True),
    q("bool_on_set_operator", "fb_target_up and bool fb_target_up", error=True),
    # Every series, every 10 s of the hour: lookback, stale markers, gaps, starts and ends.
    q("full_raw", '{__name__=~"fb_.+"}', "full"),
    q("full_rate", 'rate({__name__=~"fb_.+_total"}[1m])', "full"),
    q("full_last_over_time", 'last_over_time({__name__=~"fb_.+"}[45s])', "full"),
    # Dashboard-style expressions.
    q("error_ratio_percent", f'(sum(rate({HTTP}{{code=~"5.."}}[5m])) by (job) / sum(rate({HTTP}[5m])) by (job)) * 100',
      "range"),
    q("apdex_like", f'sum(increase({DUR}_bucket{{le="0.1"}}[5m])) by (job) / sum(increase({DUR}_count[5m])) by (job)',
      "range"),
    q("cpu_busy_percent", '100 * (1 - avg by (instance) (rate(fb_cpu_seconds_total{mode="idle"}[5m])))', "range"),
    q("histogram_quantile_two_histograms",
      'histogram_quantile(0.95, sum by (le, job) (rate({__name__=~"fb_re.+_bucket"}[5m])))', "range"),
    q("staleness_age", "time() - timestamp(fb_target_up)", "range"),
    q("flapping", "max_over_time(fb_target_up[10m]) - min_over_time(fb_target_up[10m])", "range"),
    q("upgrade_join", f'{HTTP}{{instance="web-0:9090"}} / on (instance) group_left (version) fb_build_info', "range"),
    q("batch_lifecycle", "sum(rate(fb_batch_items_processed_total[2m])) by (instance)", "range"),
    q("batch_absent_over_time", "absent_over_time(fb_batch_items_processed_total[5m])", "range"),
    q("batch_changes", "changes(fb_batch_items_processed_total[10m])", "range"),
    q("holt_winters_queue", f"holt_winters({QUEUE}[5m], 0.3, 0.3)", "range",
      flashback_expr=f"double_exponential_smoothing({QUEUE}[5m], 0.3, 0.3)"),
    q("holt_winters_nan", "holt_winters(fb_ratio[5m], 0.2, 0.6)", "range",
      flashback_expr="double_exponential_smoothing(fb_ratio[5m], 0.2, 0.6)"),
    q("matching_on_name", f"{MEM} / on (__name__, instance, type) {MEM} offset 1m", "range"),
    q("matching_two_names_group_left",
      '{__name__=~"fb_memory_bytes|fb_queue_depth"} * on (instance) group_left fb_target_up', "range"),
    q("aggregate_without_nothing_name", f"sum without (job, __name__) ({MEM})"),
    q("topk_without", f"topk without (instance) (1, {MEM})"),
    q("absent_duplicate_matchers", 'absent(nonexistent{job="a", job="b"})'),
    q("absent_of_function", 'absent(rate(nonexistent{job="x"}[5m]))'),
    q("absent_over_time_subquery", 'absent_over_time(nonexistent{job="x"}[5m:1m])'),
    q("count_values_formatting", f'count_values("value", {MEM} * 1e10) or count_values("value", {MEM} / 3e20)'),
    q("label_replace_named_group", 'label_replace(fb_target_up, "x", "$name", "instance", "(?P<name>[a-z]+).*")'),
    q("at_on_aggregation_error", "sum(fb_target_up) @ <T1600>", error=True),
    q("empty_matcher_error", 'count({__name__!~"fb_(cpu|http).*"})', "range", error=True),
    q("subquery_as_result", f'{QUEUE}{{instance="api-0:8080"}}[5m:1m]'),
    q("subquery_of_rate_as_result", f'rate({HTTP}{{instance="web-0:9090"}}[5m])[10m:1m]'),
]


# ---------------------------------------------------------------------------------------------
# Comparison


def _float(s: str) -> float:
    return float(s)


def _value_eq(x: str, y: str) -> bool:
    if x == y:
        return True
    fx, fy = _float(x), _float(y)
    return (math.isnan(fx) and math.isnan(fy)) or abs(fx - fy) <= REL * max(abs(fx), abs(fy))


def _key(metric: dict) -> tuple:
    return tuple(sorted(metric.items()))


def _ms(t) -> int:
    return round(float(t) * 1000)


def _diff(want: dict, got: dict, ordered: bool = False) -> str:
    """'' when two query results (the API's ``data``) agree, else the first difference."""
    if want["resultType"] != got["resultType"]:
        return f"result types {want['resultType']} vs {got['resultType']}"
    rt, a, b = want["resultType"], want["result"], got["result"]
    if rt in ("scalar", "string"):
        if _ms(a[0]) != _ms(b[0]) or not _value_eq(a[1], b[1]):
            return f"{a} vs {b}"
        return ""
    field = "value" if rt == "vector" else "values"
    sa = {_key(s["metric"]): s[field] for s in a}
    sb = {_key(s["metric"]): s[field] for s in b}
    if len(sa) != len(a) or len(sb) != len(b):
        return f"duplicate label sets: {len(a)} series with {len(sa)} distinct vs {len(b)} with {len(sb)}"
    if sa.keys() != sb.keys():
        only_a, only_b = sorted(sa.keys() - sb.keys()), sorted(sb.keys() - sa.keys())
        return (f"series differ ({len(sa)} vs {len(sb)}): only Prometheus {[dict(k) for k in only_a[:2]]}, "
                f"only Flashback {[dict(k) for k in only_b[:2]]}")
    for k in sorted(sa):
        pa, pb = (sa[k], sb[k]) if rt == "matrix" else ([sa[k]], [sb[k]])
        ta, tb = [_ms(p[0]) for p in pa], [_ms(p[0]) for p in pb]
        if ta != tb:
            missing, extra = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
            return (f"{dict(k)}: timestamps differ ({len(ta)} vs {len(tb)} points; only Prometheus "
                    f"{missing[:3]}, only Flashback {extra[:3]})")
        for (t, x), (_, y) in zip(pa, pb):
            if not _value_eq(x, y):
                return f"{dict(k)} at {t}: Prometheus {x} vs Flashback {y}"
    if ordered:
        va, vb = [s["value"][1] for s in a], [s["value"][1] for s in b]
        if not all(_value_eq(x, y) for x, y in zip(va, vb)):
            return f"order of values differs: Prometheus {va[:8]} vs Flashback {vb[:8]}"
    return ""


def _params(query: Q, expr: str) -> tuple[str, dict]:
    expr = _at_times(expr)
    if query.at in TIMES:
        return "/api/v1/query", {"query": expr, "time": f"{BASE_S + TIMES[query.at]:.3f}"}
    start, end, step = RANGES[query.at]
    return "/api/v1/query_range", {"query": expr, "start": f"{BASE_S + start:.3f}",
                                   "end": f"{BASE_S + end:.3f}", "step": step}


# ---------------------------------------------------------------------------------------------
# Fixture and tests


@dataclass
class Stack:
    prom: Prometheus
    fb: Flashback
    series: list


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promql-diff")
    series = generate()
    assert 300 <= len(series) <= 500, len(series)
    assert _check_extrapolation_agrees(series) > 150
    prom = Prometheus(str(tmp / "prom"), "global:\n  scrape_interval: 1h\nscrape_configs: []\n",
                      ("--web.enable-remote-write-receiver",))
    fb = Flashback(str(tmp / "flashback"))
    try:
        prom.start()
        fb.start()
        for body in _write_requests(series):
            for name, port in (("prometheus", prom.port), ("flashback", fb.port)):
                status, reply = remote_write(port, body)
                assert status in (200, 204), f"{name} rejected a write: {status} {reply[:300]!r}"
        yield Stack(prom, fb, series)
    finally:
        prom.stop()
        fb.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_both_hold_exactly_the_written_samples(stack):
    """Every written sample is stored (stale markers are not returned by range selection)."""
    want = {}
    for labels, samples in stack.series:
        want[_key(labels)] = [(t, v) for t, v in samples if not _is_stale(v)]
    params = {"query": '{__name__=~"fb_.+"}[2h]', "time": BASE_S + SPAN_S + 1}
    for name, port in (("prometheus", stack.prom.port), ("flashback", stack.fb.port)):
        status, doc = query_api(port, "/api/v1/query", params)
        assert status == 200, doc
        got = {_key(s["metric"]): [(_ms(t), float(v)) for t, v in s["values"]] for s in doc["data"]["result"]}
        assert got.keys() == want.keys(), name
        for k, samples in want.items():
            assert len(got[k]) == len(samples), (name, k)
            for (t, v), (gt, gv) in zip(samples, got[k]):
                assert t == gt and (v == gv or math.isnan(v) and math.isnan(gv)), (name, k, t, v, gt, gv)


@pytest.mark.parametrize("query", QUERIES)
def test_flashback_answers_like_prometheus(stack, query: Q):
    path, want_params = _params(query, query.expr)
    _, got_params = _params(query, query.flashback_expr or query.expr)
    ws, want = query_api(stack.prom.port, path, want_params)
    gs, got = query_api(stack.fb.port, path, got_params)
    if query.error:
        assert ws != 200, f"Prometheus accepted a query expected to fail: {want}"
        assert gs != 200, f"Flashback answered what Prometheus rejects ({want.get('error')}): {got}"
        assert got.get("errorType") == want.get("errorType"), (want, got)
        return
    assert ws == 200, f"Prometheus rejected the query: {want}"
    assert gs == 200, f"Flashback rejected the query: {got}"
    want, got = want["data"], got["data"]
    if query.empty:
        assert want["result"] == [], f"Prometheus' answer was expected to be empty: {str(want)[:300]}"
    else:
        assert want["result"], "Prometheus returned nothing; the comparison would prove nothing"
    assert _diff(want, got, query.ordered) == ""


# ---------------------------------------------------------------------------------------------
# Prometheus 3 only: Flashback against values computed here from the written data


def _series(stack: Stack, name: str, **labels) -> list[tuple[int, float]]:
    """The written samples (stale markers dropped) of the one series with these labels."""
    found = [s for lab, s in stack.series
             if lab["__name__"] == name and all(lab.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, len(found))
    return [(t, v) for t, v in found[0] if not _is_stale(v)]


def _window(samples, t_ms: int, range_ms: int) -> list[tuple[int, float]]:
    return [(t, v) for t, v in samples if t_ms - range_ms < t <= t_ms]


def _instant(port: int, expr: str, t_s: float) -> list:
    status, doc = query_api(port, "/api/v1/query", {"query": expr, "time": f"{t_s:.3f}"})
    assert status == 200, doc
    return doc["data"]["result"]


def _rate(window: list[tuple[int, float]], t_ms: int, range_ms: int, prometheus3: bool) -> float:
    """rate() of one window as Prometheus' extrapolatedRate computes it (``prometheus3``: 3.x order)."""
    (t0, v0), (t1, v1) = window[0], window[-1]
    increase = v1 - v0 + sum(a for (_, a), (_, b) in zip(window, window[1:]) if b < a)
    sampled = (t1 - t0) / 1000
    avg = sampled / (len(window) - 1)
    to_start, to_end = (t0 - (t_ms - range_ms)) / 1000, (t_ms - t1) / 1000
    to_zero = sampled * v0 / increase if increase > 0 and v0 >= 0 else math.inf
    if prometheus3:
        to_start = min(to_start if to_start < avg * 1.1 else avg / 2, to_zero)
    else:
        to_start = min(to_start, to_zero)
        to_start = to_start if to_start < avg * 1.1 else avg / 2
    to_end = to_end if to_end < avg * 1.1 else avg / 2
    return increase * (sampled + to_start + to_end) / sampled / (range_ms / 1000)


def test_rate_extrapolation_follows_prometheus_3(stack):
    """The one rate() difference the data avoids for counters, shown on a gauge: 2.42 answers with
    its order of the extrapolation limits, Flashback with 3.x's (module docstring)."""
    range_ms = 180_000
    for instance in (f"api-{i}:8080" for i in range(5)):
        samples = _series(stack, "fb_ratio", instance=instance, kind="b")
        for step in range(600, 3600, 7):
            t_ms = (BASE_S + step) * 1000 + 500
            w = _window(samples, t_ms, range_ms)
            if len(w) < 2 or any(math.isnan(v) for _, v in w):
                continue
            old, new = _rate(w, t_ms, range_ms, False), _rate(w, t_ms, range_ms, True)
            if abs(old - new) > 1e-6 * abs(new):
                expr = f'rate(fb_ratio{{instance="{instance}", kind="b"}}[3m])'
                [want] = _instant(stack.prom.port, expr, t_ms / 1000)
                [got] = _instant(stack.fb.port, expr, t_ms / 1000)
                assert _value_eq(want["value"][1], repr(old)), (want, old, new)
                assert _value_eq(got["value"][1], repr(new)), (got, old, new)
                return
    pytest.fail("the data hold no window where the versions differ")


def test_mad_over_time(stack):
    t_ms = (BASE_S + 2400) * 1000 + 500
    w = np.array([v for _, v in _window(_series(stack, TEMP, instance="api-0:8080", sensor="cpu"), t_ms, 600_000)])
    want = float(np.median(np.abs(w - np.median(w))))
    [got] = _instant(stack.fb.port, f'mad_over_time({TEMP}{{instance="api-0:8080", sensor="cpu"}}[10m])', t_ms / 1000)
    assert got["metric"] == {"job": "api", "instance": "api-0:8080", "sensor": "cpu"}
    assert _value_eq(got["value"][1], repr(want)), (got, want)


def test_histogram_fraction_of_classic_buckets(stack):
    """At a bucket boundary the fraction is exactly that bucket's share of all observations."""
    t_ms = (BASE_S + 2400) * 1000 + 500
    last = {le: _window(_series(stack, DUR + "_bucket", instance="api-0:8080", le=le), t_ms, 300_000)[-1][1]
            for le in ("0.1", "+Inf")}
    [got] = _instant(stack.fb.port, f'histogram_fraction(0, 0.1, {DUR}_bucket{{instance="api-0:8080"}})', t_ms / 1000)
    assert got["metric"] == {"job": "api", "instance": "api-0:8080"}
    assert _value_eq(got["value"][1], repr(last["0.1"] / last["+Inf"])), (got, last)


@pytest.mark.parametrize("desc", [False, True], ids=["asc", "desc"])
def test_sort_by_label(stack, desc):
    fn = "sort_by_label_desc" if desc else "sort_by_label"
    got = _instant(stack.fb.port, f'{fn}({MEM}, "type", "instance")', BASE_S + TIMES["mid"])
    keys = [(s["metric"]["type"], s["metric"]["instance"]) for s in got]
    assert len(keys) == 30 and keys == sorted(keys, reverse=desc)


def test_limitk_and_limit_ratio(stack):
    t = BASE_S + TIMES["mid"]
    every = {_key(s["metric"]): s["value"][1] for s in _instant(stack.fb.port, MEM, t)}
    two = _instant(stack.fb.port, f"limitk(2, {MEM})", t)
    assert len(two) == 2 and all(every[_key(s["metric"])] == s["value"][1] for s in two)
    # limit_ratio(-r) selects exactly the series limit_ratio(1 - r) leaves out.
    part = {_key(s["metric"]) for s in _instant(stack.fb.port, f"limit_ratio(0.4, {MEM})", t)}
    rest = {_key(s["metric"]) for s in _instant(stack.fb.port, f"limit_ratio(-0.6, {MEM})", t)}
    assert part and rest and not part & rest and part | rest == every.keys()


def test_diff_notices_differences():
    """The comparison itself: each kind of difference is reported, NaN equals NaN."""
    vec = lambda *pts: {"resultType": "vector", "result": [  # noqa: E731
        {"metric": m, "value": [1.5, v]} for m, v in pts]}
    a = vec(({"a": "1"}, "1"), ({"a": "2"}, "NaN"))
    assert _diff(a, vec(({"a": "2"}, "NaN"), ({"a": "1"}, "1.0000000000001"))) == ""
    assert _diff(a, vec(({"a": "1"}, "1.000001"), ({"a": "2"}, "NaN")))
    assert _diff(a, vec(({"a": "1"}, "1"), ({"a": "3"}, "NaN")))
    assert _diff(a, vec(({"a": "1"}, "1")))
    assert _diff(a, vec(({"a": "1"}, "1"), ({"a": "2"}, "0")))
    assert _diff(a, vec(({"a": "1"}, "1"), ({"a": "2"}, "NaN")), ordered=True) == ""
    assert _diff(a, vec(({"a": "2"}, "NaN"), ({"a": "1"}, "1")), ordered=True)
    assert _diff(vec(({"a": "1"}, "1"), ({"a": "2"}, "2")), vec(({"a": "2"}, "2"), ({"a": "1"}, "1")), ordered=True)
    mat = {"resultType": "matrix", "result": [{"metric": {}, "values": [[1, "1"], [2, "2"]]}]}
    assert _diff(mat, {"resultType": "matrix", "result": [{"metric": {}, "values": [[1, "1"]]}]})
    assert _diff(mat, {"resultType": "vector", "result": []})


def test_predict_linear_with_at_in_a_range_query(stack):
    """The regression line of the fixed window, evaluated ``duration`` after each step's time."""
    start, end, step = RANGES["range"]
    at_ms, range_ms, duration = (BASE_S + 1600) * 1000, 600_000, -300
    w = _window(_series(stack, TEMP, instance="api-0:8080", sensor="board"), at_ms, range_ms)
    x = np.array([t for t, _ in w], dtype=float) / 1000 - BASE_S
    slope, intercept = np.polyfit(x, np.array([v for _, v in w]), 1)
    expr = f'predict_linear({TEMP}{{instance="api-0:8080", sensor="board"}}[10m] @ {at_ms / 1000:.3f}, {duration})'
    status, doc = query_api(stack.fb.port, "/api/v1/query_range",
                            {"query": expr, "start": BASE_S + start, "end": BASE_S + end, "step": step})
    assert status == 200, doc
    [got] = doc["data"]["result"]
    assert len(got["values"]) == int((end - start) // step) + 1
    for t, v in got["values"]:
        want = intercept + slope * (float(t) - BASE_S + duration)
        assert abs(float(v) - want) <= 1e-9 * abs(want), (t, v, want)


def test_query_parameters_in_every_form(stack):
    """RFC 3339 times and duration steps give the same answers as unix seconds (both servers)."""
    expr = f"rate({HTTP}[5m])"
    forms = [{"start": f"{BASE_S + 600.5:.3f}", "end": f"{BASE_S + 1800.5:.3f}", "step": "60"},
             {"start": "2023-11-30T23:30:00.5Z", "end": "2023-12-01T00:40:00.500+00:50", "step": "1m"}]
    answers = []
    for port in (stack.prom.port, stack.fb.port):
        for form in forms:
            status, doc = query_api(port, "/api/v1/query_range", {"query": expr, **form})
            assert status == 200, doc
            answers.append(doc["data"])
    assert answers[0]["result"]
    for other in answers[1:]:
        assert _diff(answers[0], other) == ""
