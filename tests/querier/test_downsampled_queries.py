"""Queries over downsampled blocks through the real engine: answers within the documented
tolerance of raw answers (rate, increase, avg/max/min/sum/count_over_time on counters with
resets and gauges), the resolution choice, ``max_source_resolution`` and its reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compactor.compactor import Compactor
from compactor.downsample import RES_1H, RES_5M, Downsampler
from querier.api import QueryAPI
from querier.downsampled import max_resolution, parse_max_source_resolution, plan_resolutions, resolution_note
from querier.engine import Engine
from querier.tiered import BucketBlocks, TieredQuerier
from store.bucket import FilesystemBucket
from store.head import Head, HeadOptions
from store.storage import SelectHints
from tests.compactor.compactor_helpers import Clock, make_head
from tests.compactor.test_downsample import DAY, HOUR, LEVELS, WINDOW, dataset
from tests.querier.test_api import call

STEP = 40 * 60_000  # a Grafana step for a 7-day panel
END = 3 * DAY


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    """A bucket with 3 days of raw, 5m and 1h blocks; the head holding all of it as well."""
    data = dataset(0, END, seed=5)
    bucket = FilesystemBucket(tmp_path_factory.mktemp("ds") / "bkt")
    head = make_head(data)
    clock = Clock(END + DAY)
    ds = Downsampler(bucket, min_span_1h_ms=DAY, now=clock)
    Compactor(head, bucket, window_ms=WINDOW, grace_ms=60_000, levels=LEVELS, now=clock, downsampler=ds).run_once()
    return bucket, head


def queriers(tiers, resolution):
    bucket, head = tiers
    empty = Head(HeadOptions())
    blocks = BucketBlocks(bucket)
    return TieredQuerier(empty, blocks, max_source_resolution=0), TieredQuerier(empty, blocks,
                                                                                 max_source_resolution=resolution)


def run_both(tiers, expr, step=STEP, start=2 * HOUR, end=END - 1, resolution=None):
    raw_q, ds_q = queriers(tiers, resolution)
    engine = Engine()
    raw = engine.range(raw_q, expr, start, end, step)
    ds = engine.range(ds_q, expr, start, end, step)
    return raw, ds


def matrix(res):
    return {s.labels: dict(zip(s.timestamps.tolist(), s.values.tolist())) for s in res.data}


def compare(raw, ds):
    """Pairs of (raw, downsampled) values at the same series and step; every raw point present."""
    r, d = matrix(raw), matrix(ds)
    assert r.keys() == d.keys()
    out = []
    for lb, pts in r.items():
        assert pts.keys() == d[lb].keys(), lb
        out += [(v, d[lb][t]) for t, v in pts.items()]
    return np.array(out)


# Tolerances documented in store/docs/format/block.md ("Querying downsampled data").
@pytest.mark.parametrize("expr,rel", [
    ("rate(requests_total[1h])", 0.05),
    ("increase(requests_total[2h])", 0.05),
    ("sum(rate(requests_total[1h]))", 0.05),
    ("avg_over_time(temperature[1h])", 1e-9),
    ("max_over_time(temperature[1h])", 1e-12),
    ("min_over_time(temperature[1h])", 1e-12),
    ("sum_over_time(temperature[1h])", 1e-9),
    ("count_over_time(temperature[1h])", 0),
    ("max_over_time(requests_total[1h])", 1e-12),
    # A window of one interval: rate from the interval's first and last sample, as raw.
    ("rate(requests_total[5m])", 1e-9),
    ("max_over_time(temperature[5m])", 1e-12),
    ("avg_over_time(temperature[5m])", 1e-9),
], ids=["rate", "increase", "sum-rate", "avg", "max", "min", "sum", "count", "max-counter", "rate-5m",
        "max-5m", "avg-5m"])
def test_5m_answers_within_tolerance_of_raw(tiers, expr, rel):
    raw, ds = run_both(tiers, expr)
    assert resolution_note(RES_5M) in ds.infos and resolution_note(RES_5M) not in raw.infos
    pairs = compare(raw, ds)
    assert len(pairs) > 100
    err = np.abs(pairs[:, 1] - pairs[:, 0]) / np.maximum(np.abs(pairs[:, 0]), 1e-9)
    assert err.max() <= rel, (expr, float(err.max()), float(np.median(err)))


@pytest.mark.parametrize("expr,rel", [
    ("rate(requests_total[3h])", 0.05),
    ("avg_over_time(temperature[3h])", 1e-9),
    ("max_over_time(temperature[3h])", 1e-12),
    ("count_over_time(temperature[3h])", 0),
], ids=["rate", "avg", "max", "count"])
def test_1h_answers_within_tolerance_of_raw(tiers, expr, rel):
    raw, ds = run_both(tiers, expr, step=5 * HOUR, start=3 * HOUR)  # auto: 5h / 5 = 1h
    assert resolution_note(RES_1H) in ds.infos
    pairs = compare(raw, ds)
    err = np.abs(pairs[:, 1] - pairs[:, 0]) / np.maximum(np.abs(pairs[:, 0]), 1e-9)
    assert err.max() <= rel, (expr, float(err.max()))


def test_unaligned_steps_stay_within_one_interval_of_raw(tiers):
    """Steps not on interval boundaries: the downsampled window may reach up to one
    resolution further back and miss the last partial interval."""
    start = 2 * HOUR + 150_000
    raw, ds = run_both(tiers, "max_over_time(temperature[1h])", start=start, resolution=RES_5M)
    assert resolution_note(RES_5M) in ds.infos
    wide = Engine().range(queriers(tiers, 0)[0], "max_over_time(temperature[65m])", start, END - 1, STEP)
    narrow = Engine().range(queriers(tiers, 0)[0], "max_over_time(temperature[55m] offset 5m)", start, END - 1, STEP)
    d, w, n = matrix(ds), matrix(wide), matrix(narrow)
    for lb, pts in d.items():
        for t, v in pts.items():
            assert n[lb][t] <= v <= w[lb][t]
    pairs = compare(*run_both(tiers, "rate(requests_total[1h])", start=start, resolution=RES_5M))
    assert (np.abs(pairs[:, 1] - pairs[:, 0]) / pairs[:, 0]).max() <= 0.05


@pytest.mark.parametrize("expr,median,worst", [
    ("rate(requests_total[5m])", 0.10, 0.60),
    ("increase(requests_total[10m])", 0.05, 0.30),
    ("rate(requests_total[1h])", 0.01, 0.05),
], ids=["rate-5m", "increase-10m", "rate-1h"])
def test_unaligned_counter_windows_read_5m_data_with_interpolated_edges(tiers, expr, median, worst):
    """A step of 2419 s (qload's for 7 days) cuts intervals: counters asked for 5m data read it,
    with points at the windows' edges; the test counter's increments are uniform in [0, 10) per
    scrape, so a 5m window's own rate varies by ~13 % around the interval's."""
    raw, ds = run_both(tiers, expr, step=2_419_000, start=2 * HOUR + 17_000, resolution=RES_5M)
    assert resolution_note(RES_5M) in ds.infos
    pairs = compare(raw, ds)
    err = np.abs(pairs[:, 1] - pairs[:, 0]) / pairs[:, 0]
    assert np.median(err) <= median and err.max() <= worst, (float(np.median(err)), float(err.max()))


@pytest.mark.parametrize("expr,reads_5m", [
    ("rate(requests_total[5m])", False),
    ("increase(requests_total[10m])", False),
    ("max_over_time(temperature[30m])", False),
    ("rate(requests_total[1h])", False),
], ids=["rate-5m", "increase-10m", "max-30m", "rate-1h"])
def test_auto_reads_windows_cutting_intervals_raw(tiers, expr, reads_5m):
    raw, ds = run_both(tiers, expr, step=2_419_000, start=2 * HOUR + 17_000)
    assert (resolution_note(RES_5M) in ds.infos) == reads_5m
    if not reads_5m:
        assert matrix(ds) == matrix(raw)


def test_unaligned_over_time_windows_of_one_interval_read_raw(tiers):
    raw, ds = run_both(tiers, "avg_over_time(temperature[5m])", step=2_419_000, start=2 * HOUR + 17_000)
    assert matrix(ds) == matrix(raw) and resolution_note(RES_5M) not in ds.infos


def test_raw_tail_from_the_head_joins_the_downsampled_counter(tmp_path):
    """5m blocks for the first day, the head for the second; resets inside and at the boundary."""
    data = dataset(0, 2 * DAY, seed=9, reset_at=(DAY,))  # a reset right at the boundary, too
    bucket = FilesystemBucket(tmp_path / "bkt")
    clock = Clock(DAY + 2 * HOUR)
    head = make_head(data)
    ds = Downsampler(bucket, min_span_1h_ms=DAY, now=clock)
    Compactor(head, bucket, window_ms=WINDOW, grace_ms=60_000, levels=LEVELS, now=clock, downsampler=ds).run_once()
    blocks = BucketBlocks(bucket)
    engine = Engine()
    for expr in ("rate(requests_total[1h])", "increase(requests_total[3h])", "avg_over_time(temperature[1h])"):
        raw = engine.range(TieredQuerier(head, None), expr, 2 * HOUR, 2 * DAY - 1, STEP)
        mixed = engine.range(TieredQuerier(head, blocks, max_source_resolution=None), expr, 2 * HOUR, 2 * DAY - 1,
                             STEP)
        assert resolution_note(RES_5M) in mixed.infos
        pairs = compare(raw, mixed)
        err = np.abs(pairs[:, 1] - pairs[:, 0]) / np.maximum(np.abs(pairs[:, 0]), 1e-9)
        assert err.max() <= 0.05, (expr, float(err.max()))


def test_resolution_choice():
    def hints(step, rng=0, func="", first=10 * DAY):
        # As the engine selects: from the first window's start; ``first`` is the first step.
        return SelectHints(first - rng + 1, first + DAY, step, rng, func)

    assert max_resolution(None, None) == 0
    # auto: downsampled only where answers stay close to raw.
    assert max_resolution(hints(0, HOUR, "rate"), None) == 0  # instant queries read raw data
    assert max_resolution(hints(STEP, HOUR, "avg_over_time"), None) == RES_5M  # aligned windows
    assert max_resolution(hints(5 * HOUR, 3 * HOUR, "sum_over_time"), None) == RES_1H  # a fifth of the step
    assert max_resolution(hints(STEP, 300_000, "rate"), None) == RES_5M  # one whole interval
    assert max_resolution(hints(2_419_000, 300_000, "rate"), None) == 0  # cut intervals, few of them
    assert max_resolution(hints(2_419_000, HOUR, "increase"), None) == 0  # cut, even if many intervals
    assert max_resolution(hints(2_419_000, HOUR, "max_over_time"), None) == 0  # cut: not for over_time
    assert max_resolution(hints(STEP, HOUR, "quantile_over_time"), None) == 0  # interval averages: raw
    assert max_resolution(hints(STEP, HOUR, "irate"), None) == 0
    assert max_resolution(hints(5 * HOUR), None) == 0  # plain selectors: raw
    assert max_resolution(hints(STEP, HOUR, "avg_over_time", first=10 * DAY + 60_000), None) == 0  # off the boundaries
    # explicit: Thanos' rules and approximations.
    assert max_resolution(hints(STEP, 300_000, "quantile_over_time"), RES_5M) == 150_000  # averages: half
    assert max_resolution(hints(5 * HOUR), RES_5M) == RES_5M  # plain selectors: at most the lookback
    assert max_resolution(hints(5 * HOUR, 3 * HOUR), RES_5M) == RES_5M  # the request's cap
    assert max_resolution(hints(5 * HOUR, 3 * HOUR), 0) == 0
    assert max_resolution(hints(0, 3 * HOUR), RES_1H) == RES_1H  # an explicit resolution, instant too
    from querier.api import parse_duration

    for v, want in (("raw", 0), ("0s", 0), ("5m", RES_5M), ("1h", RES_1H), ("auto", None), ("", None),
                    ("300", RES_5M), ("3600", RES_1H), ("10m", 600_000)):
        assert parse_max_source_resolution(v, parse_duration) == want
    for bad in ("fast", "-5m", "-300", "5x"):
        with pytest.raises(ValueError):
            parse_max_source_resolution(bad, parse_duration)


def test_plan_prefers_the_coarsest_covering_resolution(tiers):
    bucket, _ = tiers
    blocks = BucketBlocks(bucket)
    readers = blocks.downsampled(0, END + DAY, RES_1H)
    plan = plan_resolutions(readers, 0, END + DAY)
    assert [(s.start, s.end, s.resolution) for s in plan] == [(0, END, RES_1H), (END, END + DAY + 1, 0)]
    plan = plan_resolutions(blocks.downsampled(0, END + DAY, RES_5M), HOUR, END + DAY)
    assert [(s.start, s.end, s.resolution) for s in plan] == [(HOUR, END, RES_5M), (END, END + DAY + 1, 0)]


def test_small_ranges_and_instant_queries_read_raw_data(tiers):
    raw, ds = run_both(tiers, "quantile_over_time(0.5, temperature[5m])")  # averages: at most 2.5m, i.e. raw
    assert ds.infos == raw.infos and matrix(ds) == matrix(raw)
    _, q = queriers(tiers, None)
    res = Engine().instant(q, "rate(requests_total[1h])", END - HOUR)
    assert resolution_note(RES_5M) not in res.infos


def test_max_source_resolution_raw_answers_exactly_as_raw(tiers):
    raw, ds = run_both(tiers, "avg_over_time(temperature[1h])", resolution=0)
    assert matrix(ds) == matrix(raw) and ds.infos == raw.infos


def test_plain_selectors_and_other_functions_read_interval_averages_when_asked(tiers):
    raw, ds = run_both(tiers, "temperature", resolution=RES_5M)
    pairs = compare(raw, ds)
    # A plain selector reads the average of the last interval instead of the last sample.
    assert np.abs(pairs[:, 1] - pairs[:, 0]).max() <= 40
    raw, ds = run_both(tiers, "stddev_over_time(temperature[1h])", resolution=RES_5M)
    assert resolution_note(RES_5M) in ds.infos and matrix(ds).keys() == matrix(raw).keys()
    # auto keeps them raw: exact answers.
    for expr in ("temperature", "stddev_over_time(temperature[1h])", "irate(requests_total[1h])"):
        raw, ds = run_both(tiers, expr)
        assert matrix(ds) == matrix(raw) and resolution_note(RES_5M) not in ds.infos


def test_api_max_source_resolution_and_infos(tiers):
    bucket, _ = tiers
    blocks = BucketBlocks(bucket)
    router = QueryAPI(lambda: TieredQuerier(Head(HeadOptions()), blocks), Engine(), lambda: END / 1000).router()
    params = [("query", "avg_over_time(temperature[1h])"), ("start", str(2 * HOUR / 1000)),
              ("end", str((END - 1) / 1000)), ("step", "2400")]
    status, body = call(router, "/api/v1/query_range", params)
    assert status == 200 and resolution_note(RES_5M) in body["infos"]
    status, raw = call(router, "/api/v1/query_range", params + [("max_source_resolution", "raw")])
    assert status == 200 and "infos" not in raw
    status, five = call(router, "/api/v1/query_range", params + [("max_source_resolution", "5m")])
    assert status == 200 and five["data"] == body["data"]
    status, err = call(router, "/api/v1/query_range", params + [("max_source_resolution", "10x")])
    assert status == 400 and err["errorType"] == "bad_data" and "max_source_resolution" in err["error"]
    status, err = call(router, "/api/v1/query", [("query", "up"), ("max_source_resolution", "nope")])
    assert status == 400 and err["errorType"] == "bad_data"
    json.dumps(body)


def test_corrupt_downsampled_block_is_a_partial_response_warning(tiers, tmp_path):
    import shutil

    bucket, _ = tiers
    copy = FilesystemBucket(tmp_path / "copy")
    shutil.copytree(bucket._root if hasattr(bucket, "_root") else tmp_path, tmp_path / "copy", dirs_exist_ok=True)
    five = next(m for m in BucketBlocks(copy).downsampled(0, END, RES_5M))
    name = f"{five.ulid}/data.parquet"
    copy.upload(name, copy.get(name)[:100])  # truncated
    q = TieredQuerier(Head(HeadOptions()), BucketBlocks(copy), max_source_resolution=None)
    res = Engine().range(q, "avg_over_time(temperature[1h])", 2 * HOUR, END - 1, STEP)
    assert any(five.ulid in w for w in q.warnings)
    q = TieredQuerier(Head(HeadOptions()), BucketBlocks(copy), partial_response=False, max_source_resolution=None)
    with pytest.raises(Exception, match=five.ulid):
        Engine().range(q, "avg_over_time(temperature[1h])", 2 * HOUR, END - 1, STEP)
    assert res.data


def test_a_shard_without_downsampled_blocks_is_read_raw(tmp_path):
    """Two shards' blocks in one bucket; only shard a is downsampled: its 5m blocks must not
    stand for shard b's raw data."""
    bucket = FilesystemBucket(tmp_path / "bkt")
    clock = Clock(2 * DAY)
    for shard, seed in (("a", 1), ("b", 2)):
        head = make_head(dataset(0, DAY, seed=seed))
        ds = Downsampler(bucket, external_labels={"shard": shard}, min_span_1h_ms=DAY, now=clock) if shard == "a" else None
        Compactor(head, bucket, window_ms=WINDOW, grace_ms=60_000, levels=(1,), now=clock,
                  external_labels={"shard": shard}, downsampler=ds).run_once()
    blocks = BucketBlocks(bucket)
    plan = plan_resolutions(blocks.downsampled(0, DAY, RES_5M), 0, DAY - 1, raw=blocks.readers(0, DAY - 1))
    assert [s.resolution for s in plan] == [0]
    only_a = plan_resolutions(blocks.downsampled(0, DAY, RES_5M), 0, DAY - 1)
    assert [s.resolution for s in only_a] == [RES_5M]


def test_remote_read_and_other_callers_get_raw_samples_by_default(tiers):
    """Without the query API's per-request setting a TieredQuerier reads raw data, whatever the
    hints say: remote read hands samples to another PromQL engine, which knows no weights."""
    bucket, _ = tiers
    q = TieredQuerier(Head(HeadOptions()), BucketBlocks(bucket))
    notes: list[str] = []
    hints = SelectHints(0, END, STEP, HOUR, "avg_over_time", notes=notes)
    from store.matchers import Matcher, MatchType

    sel = q.select([Matcher(MatchType.EQ, "__name__", "temperature")], 0, END, hints)
    assert notes == [] and all(getattr(s, "weights", None) is None for s in sel)
    assert sum(len(s.samples()[0]) for s in sel) > 10_000  # raw samples, not 5m rows


def test_downsampled_row_groups_come_from_the_shared_chunk_cache(tiers):
    from store.block import BlockCaches

    class Counting(FilesystemBucket):
        reads = 0

        def get_range(self, name, offset, length):
            if name.endswith("/data.parquet"):
                Counting.reads += 1
            return super().get_range(name, offset, length)

    bucket, _ = tiers
    blocks = BucketBlocks(Counting(bucket._root), caches=BlockCaches(64 << 20, 64 << 20))

    def query():
        return Engine().range(TieredQuerier(Head(HeadOptions()), blocks, max_source_resolution=None),
                              "avg_over_time(temperature[1h])", 2 * HOUR, END - 1, STEP)

    first = query()
    cold = Counting.reads
    again = query()
    assert cold > 0 and Counting.reads == cold  # the second query reads no data file
    assert matrix(again) == matrix(first) and resolution_note(RES_5M) in again.infos
