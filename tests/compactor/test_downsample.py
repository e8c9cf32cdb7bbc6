"""Downsampling: the aggregates against a hand-written reference, the Downsampler in the
compactor's pass (5m per raw block, 1h per 7-day range), idempotence, crashes, corrupt blocks,
duplicates, retention per resolution and the size of downsampled blocks."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from compactor.compactor import Compactor
from compactor.downsample import RES_1H, RES_5M, Downsampler
from compactor.retention import RetentionKeeper, RetentionOptions
from store.aggregates import downsample_aggregates, downsample_raw, join_counters, reset_adjusted
from store.block import (
    DATA_FILE, AggregateSeries, Aggregates, BlockReader, read_meta, verify_block, write_aggregate_block,
)
from store.bucket import FilesystemBucket
from store.catalog import BlockCatalog
from store.errors import CorruptBlock
from store.labels import Labels
from tests.compactor.compactor_helpers import ANY, Clock, FaultyBucket, make_head

HOUR = 3_600_000
DAY = 24 * HOUR
STALE = float(np.array([0x7FF0000000000002], dtype=np.uint64).view(np.float64)[0])


# ---------------------------------------------------------------------------------------------
# Data: counters with resets and gauges, scraped every 15 s with jitter


def counter_with_resets(ts: np.ndarray, rng, resets: int = 3, at_times: tuple[int, ...] = ()) -> np.ndarray:
    """A counter growing ~0.33/s that restarts near zero ``resets`` times, and at the first
    sample at or after each of ``at_times``."""
    inc = rng.uniform(0, 10, len(ts))
    vs = np.cumsum(inc)
    where = set(rng.choice(np.arange(10, len(ts) - 10), resets, replace=False).tolist())
    where |= {int(np.searchsorted(ts, t)) for t in at_times}
    for at in sorted(where):
        vs[at:] -= vs[at] - rng.uniform(0, 3)  # the counter restarts near zero
    return vs


def gauge(ts: np.ndarray, rng) -> np.ndarray:
    return 50 + 30 * np.sin(ts / 3_600_000) + rng.normal(0, 5, len(ts))


def scrape_times(start: int, end: int, rng, step: int = 15_000) -> np.ndarray:
    ts = np.arange(start, end, step) + rng.integers(0, 2_000, len(range(start, end, step)))
    return ts[ts < end]


def dataset(start: int, end: int, seed: int = 7, reset_at: tuple[int, ...] = ()) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(2):
        ts = scrape_times(start, end, rng)
        out.append(([("__name__", "requests_total"), ("instance", f"h{i}")], ts,
                    counter_with_resets(ts, rng, at_times=reset_at)))
        ts = scrape_times(start, end, rng)
        out.append(([("__name__", "temperature"), ("instance", f"h{i}")], ts, gauge(ts, rng)))
    return [(ls, [(int(t), float(v)) for t, v in zip(ts, vs)]) for ls, ts, vs in out]


# ---------------------------------------------------------------------------------------------
# Aggregates against a reference written sample by sample


def reference(ts, vs, resolution):
    """Per interval: (t of the last sample, count, sum, min, max, counter), NaN skipped."""
    rows = {}
    counter = None
    last = None
    for t, v in zip(ts.tolist(), vs.tolist()):
        if math.isnan(v):
            continue
        if counter is None:
            counter = v
        elif v < last:
            counter += v  # a reset: the counter went on from zero
        else:
            counter += v - last
        last = v
        k = -(-t // resolution)  # intervals ((k - 1) * res, k * res]
        r = rows.get(k)
        if r is None:
            rows[k] = [t, 1, v, v, v, counter, t, counter]
        else:
            r[0] = t
            r[1] += 1
            r[2] += v
            r[3] = min(r[3], v)
            r[4] = max(r[4], v)
            r[5] = counter
    return [rows[k] for k in sorted(rows)]


def _assert_same_aggregates(got, want) -> None:
    """Aggregates equal: times, counts and extremes exactly, sums and counters within 1e-12."""
    for name in ("t", "count", "min", "max", "start_t"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
    assert got.sum == pytest.approx(want.sum, rel=1e-12)
    assert got.counter == pytest.approx(want.counter, rel=1e-12)
    assert got.start_counter == pytest.approx(want.start_counter, rel=1e-12)


@pytest.mark.parametrize("kind", ["counter-with-resets", "gauge", "with-nan-and-stale", "one-sample"])
@pytest.mark.parametrize("resolution", [RES_5M, RES_1H], ids=["5m", "1h"])
def test_raw_aggregates_match_the_reference(kind, resolution):
    rng = np.random.default_rng(3)
    ts = scrape_times(-2 * HOUR, 10 * HOUR, rng)  # negative times: intervals still aligned to the epoch
    vs = counter_with_resets(ts, rng, 5) if kind != "gauge" else gauge(ts, rng)
    if kind == "with-nan-and-stale":
        vs[[5, 6, 400]] = np.nan
        vs[[7, 900]] = STALE
    if kind == "one-sample":
        ts, vs = ts[:1], vs[:1]
    agg = downsample_raw(ts, vs, resolution)
    ref = reference(ts, vs, resolution)
    assert [int(t) for t in agg.t] == [r[0] for r in ref]
    assert agg.count.tolist() == [r[1] for r in ref]
    assert agg.sum.tolist() == pytest.approx([r[2] for r in ref], rel=1e-12)
    assert agg.min.tolist() == [r[3] for r in ref]
    assert agg.max.tolist() == [r[4] for r in ref]
    assert agg.counter.tolist() == pytest.approx([r[5] for r in ref], rel=1e-12)
    assert agg.start_t.tolist() == [r[6] for r in ref]
    assert agg.start_counter.tolist() == pytest.approx([r[7] for r in ref], rel=1e-12)
    keep = ~np.isnan(vs)
    assert (agg.first_t, agg.first_v, agg.last_v) == (int(ts[keep][0]), float(vs[keep][0]), float(vs[keep][-1]))


def test_counter_equals_raw_values_without_resets():
    vs = np.array([1.0, 2.5, 2.5, 10.0, 11.25])
    assert reset_adjusted(vs).tolist() == vs.tolist()
    assert reset_adjusted(np.array([5.0, 7.0, 1.0, 4.0, 0.5])).tolist() == [5.0, 7.0, 8.0, 11.0, 11.5]


def test_all_nan_is_nothing():
    assert downsample_raw(np.array([1, 2]), np.array([np.nan, STALE]), RES_5M) is None


def test_counters_joined_across_blocks_with_resets_inside_and_between():
    rng = np.random.default_rng(11)
    ts = scrape_times(0, 12 * HOUR, rng)
    vs = counter_with_resets(ts, rng, 4)
    # A reset exactly at a block boundary, too.
    cut = np.searchsorted(ts, 6 * HOUR)
    vs[cut:] -= vs[cut] - 0.5
    whole = downsample_raw(ts, vs, RES_5M)
    blocks = [downsample_raw(ts[m], vs[m], RES_5M) for m in (ts < 3 * HOUR, (ts >= 3 * HOUR) & (ts < 6 * HOUR),
                                                            ts >= 6 * HOUR)]
    joined = np.concatenate(join_counters(blocks))
    assert joined == pytest.approx(whole.counter, rel=1e-12)
    hourly = downsample_aggregates(blocks, RES_1H)
    direct = downsample_raw(ts, vs, RES_1H)
    _assert_same_aggregates(hourly, direct)
    assert (hourly.first_t, hourly.first_v, hourly.last_v) == (direct.first_t, direct.first_v, direct.last_v)


# ---------------------------------------------------------------------------------------------
# The downsampler in the compactor's pass


WINDOW = 6 * HOUR
LEVELS = (1, 4)  # a level-2 block spans a day; with min_span_1h_ms=DAY it gets a 1h block


@pytest.fixture
def bucket(tmp_path):
    return FilesystemBucket(tmp_path / "bkt")


def run(bucket, head, clock, *, registry=None, downsampler=None):
    ds = downsampler or Downsampler(bucket, min_span_1h_ms=DAY, now=clock, registry=registry)
    comp = Compactor(head, bucket, window_ms=WINDOW, grace_ms=60_000, levels=LEVELS, now=clock, downsampler=ds)
    return comp.run_once(), ds


def live(bucket, resolution):
    cat = BlockCatalog(bucket)
    cat.refresh()
    return cat.blocks(resolution=resolution)


def test_backfill_gets_5m_and_1h_blocks_in_one_pass_and_a_second_pass_does_nothing(bucket):
    data = dataset(0, 2 * DAY)
    head = make_head(data)
    clock = Clock(3 * DAY)
    registry = CollectorRegistry()
    result, _ = run(bucket, head, clock, registry=registry)
    raw, fives, hours = live(bucket, 0), live(bucket, RES_5M), live(bucket, RES_1H)
    assert [(m.min_time, m.max_time, m.level) for m in raw] == [(0, DAY, 2), (DAY, 2 * DAY, 2)]
    # Every window got its 5m block from its level-1 block, before the windows were merged.
    assert [(m.min_time, m.max_time, m.level) for m in fives] == [(w, w + WINDOW, 1) for w in range(0, 2 * DAY, WINDOW)]
    assert set().union(*(m.sources for m in fives)) == set().union(*(m.sources for m in raw))
    # Every merged day got its 1h block, made from the 5m blocks.
    assert [(m.min_time, m.max_time, m.level, m.sources) for m in hours] == \
        [(r.min_time, r.max_time, r.level, r.sources) for r in raw]
    for res, blocks in ((RES_5M, fives), (RES_1H, hours)):
        for m in blocks:
            assert m.version == 2 and m.resolution == res
            verify_block(bucket, m.ulid)
    assert {m.ulid for m in result.downsampled} == {m.ulid for m in fives + hours}
    assert registry.get_sample_value("flashback_downsampler_blocks_written_total", {"resolution": "300000"}) == 8
    assert registry.get_sample_value("flashback_downsampler_blocks_written_total", {"resolution": "3600000"}) == 2

    # The 5m data equals the reference of the raw samples.
    samples = {Labels.from_pairs(ls): smp for ls, smp in data}
    reader = BlockReader(bucket, fives[1].ulid)
    for s in reader.select([ANY], WINDOW, 2 * WINDOW - 1):
        assert isinstance(s, AggregateSeries)
        smp = [(t, v) for t, v in samples[s.labels] if WINDOW <= t < 2 * WINDOW]
        ref = reference(np.array([t for t, _ in smp]), np.array([v for _, v in smp]), RES_5M)
        assert s.aggregates.t.tolist() == [r[0] for r in ref]
        assert s.aggregates.counter == pytest.approx([r[5] for r in ref], rel=1e-12)
        assert s.aggregates.max.tolist() == [r[4] for r in ref]
        assert s.aggregates.start_t.tolist() == [r[6] for r in ref]
        assert s.aggregates.start_counter == pytest.approx([r[7] for r in ref], rel=1e-12)

    before = sorted(bucket.iter("", recursive=True))
    result, _ = run(bucket, head, clock)
    assert result.downsampled == [] and sorted(bucket.iter("", recursive=True)) == before


def test_windows_downsampled_as_they_close_are_not_downsampled_again_when_merged(bucket):
    data = dataset(0, DAY)
    head = make_head(data)
    clock = Clock(2 * WINDOW + 120_000)  # two windows closed
    ds = Downsampler(bucket, min_span_1h_ms=DAY, now=clock)
    run(bucket, head, clock, downsampler=ds)
    assert len(live(bucket, RES_5M)) == 2 and live(bucket, RES_1H) == []
    clock.ms = DAY + 120_000  # the day closes: 4 windows merge into one level-2 block
    result, _ = run(bucket, head, clock, downsampler=ds)
    fives = live(bucket, RES_5M)
    assert [len(m.sources) for m in fives] == [1, 1, 1, 1]  # no 5m block made again from the merged raw block
    hours = live(bucket, RES_1H)
    assert len(hours) == 1 and set(hours[0].sources) == {s for m in fives for s in m.sources}
    # 1h from the four 5m blocks equals 1h from the raw data.
    direct = {}
    for ls, smp in data:
        a = downsample_raw(np.array([t for t, _ in smp]), np.array([v for _, v in smp]), RES_1H)
        direct[Labels.from_pairs(ls)] = a
    for s in BlockReader(bucket, hours[0].ulid).select([ANY], 0, DAY):
        d = direct[s.labels]
        assert s.aggregates.t.tolist() == d.t.tolist() and s.aggregates.count.tolist() == d.count.tolist()
        assert s.aggregates.counter == pytest.approx(d.counter, rel=1e-12)
        assert s.aggregates.sum == pytest.approx(d.sum, rel=1e-12)


def test_downsampled_blocks_are_smaller_than_raw(bucket):
    head = make_head(dataset(0, DAY))
    run(bucket, head, Clock(2 * DAY))
    size = {res: sum(f.size_bytes for m in live(bucket, res) for f in m.files) for res in (0, RES_5M, RES_1H)}
    assert size[RES_1H] < size[RES_5M] < size[0] / 2, size


@pytest.mark.parametrize("fail_at", [1, 3, 5, 8, 12, 20, 30])
def test_crash_at_any_bucket_operation_then_a_fresh_downsampler_completes(tmp_path, fail_at):
    inner = FilesystemBucket(tmp_path / "bkt")
    clock = Clock(2 * DAY)
    head = make_head(dataset(0, DAY))
    Compactor(head, inner, window_ms=WINDOW, grace_ms=60_000, levels=LEVELS, now=clock).run_once()  # raw only
    faulty = FaultyBucket(inner, fail_at)
    try:
        Downsampler(faulty, min_span_1h_ms=DAY, now=clock).run_once()
    except Exception:  # noqa: BLE001 - the injected fault, wherever it hit
        pass
    Downsampler(inner, min_span_1h_ms=DAY, now=clock).run_once()
    fives, hours = live(inner, RES_5M), live(inner, RES_1H)
    assert len(fives) == 1 and len(hours) == 1
    for m in fives + hours:
        verify_block(inner, m.ulid)
    assert Downsampler(inner, min_span_1h_ms=DAY, now=clock).run_once().written == []


def test_a_duplicate_downsampled_block_is_hidden_then_marked(bucket):
    clock = Clock(2 * DAY)
    head = make_head(dataset(0, WINDOW))
    _, ds = run(bucket, head, clock)
    (raw,) = live(bucket, 0)
    ds._downsample_raw(raw)  # as a second downsampler racing the first would
    cat = BlockCatalog(bucket)
    cat.refresh()
    fives = [b for b in cat.all_blocks() if b.meta.resolution == RES_5M]
    assert len(fives) == 2 and sum(b.hidden_by is not None for b in fives) == 1
    result = Downsampler(bucket, now=clock).run_once()
    hidden = next(b for b in fives if b.hidden_by is not None)
    assert result.marked == [hidden.ulid] and result.written == []


def test_corrupt_downsampled_block_is_an_error_for_readers_and_verify(bucket):
    head = make_head(dataset(0, WINDOW))
    run(bucket, head, Clock(2 * DAY))
    (m,) = live(bucket, RES_5M)
    name = f"{m.ulid}/{DATA_FILE}"
    data = bytearray(bucket.get(name))
    col = pq.read_metadata(io.BytesIO(bytes(data))).row_group(0).column(3)  # the sum aggregate
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF
    bucket.upload(name, bytes(data))
    with pytest.raises(CorruptBlock):
        verify_block(bucket, m.ulid)
    with pytest.raises(CorruptBlock):
        BlockReader(bucket, m.ulid).select([ANY], 0, DAY)


def test_verify_rejects_aggregates_that_break_the_rules(bucket):
    ok = Aggregates(np.array([10, 400_000]), np.array([2, 1]), np.array([3.0, 1.0]), np.array([1.0, 1.0]),
                    np.array([2.0, 1.0]), np.array([5.0, 6.0]), 0, 4.0, 6.0)
    meta = write_aggregate_block(bucket, [(Labels.from_pairs([("__name__", "a")]), ok)], resolution=RES_5M,
                                 min_time=0, max_time=HOUR)
    verify_block(bucket, meta.ulid)
    assert read_meta(bucket, meta.ulid).version == 2
    bad = [ok._replace(t=np.array([10, 20])), ok._replace(count=np.array([0, 1])),
           ok._replace(min=np.array([3.0, 1.0])), ok._replace(first_t=20),
           ok._replace(start_t=np.array([11, 400_000])), ok._replace(start_t=np.array([5, 300_000])),
           ok._replace(start_t=np.array([5, 399_000]))]
    for a in bad:
        with pytest.raises(ValueError):
            write_aggregate_block(bucket, [(Labels.from_pairs([("__name__", "a")]), a)], resolution=RES_5M,
                                  min_time=0, max_time=HOUR)


def test_retention_per_resolution_keeps_5m_after_raw_expires(bucket):
    clock = Clock(2 * DAY)
    run(bucket, make_head(dataset(0, DAY)), clock)
    keeper = RetentionKeeper(bucket, RetentionOptions({0: DAY, RES_5M: 30 * DAY}, delete_delay_s=0))
    report = keeper.run(3 * DAY)
    marked = {a.resolution for a in report.marked}
    assert marked == {0}
    keeper.run(3 * DAY + 1000)
    assert live(bucket, 0) == [] and len(live(bucket, RES_5M)) == 4 and len(live(bucket, RES_1H)) == 1


def test_config_downsampling_switch_and_1h_span(tmp_path):
    from flashback.config import ConfigError, load

    path = tmp_path / "c.yaml"
    assert load(None).compactor.downsampling is True
    assert load(None).compactor.min_span_1h_ms == 7 * DAY  # the second level: 6 windows of 28 h
    path.write_text("compactor: {downsampling: false, levels: [1]}\n")
    opts = load(str(path)).compactor
    assert opts.downsampling is False and opts.min_span_1h_ms is None
    path.write_text("compactor: {downsampling: maybe}\n")
    with pytest.raises(ConfigError, match="downsampling"):
        load(str(path))


def test_without_1h_span_only_5m_blocks_are_made(bucket):
    clock = Clock(2 * DAY)
    run(bucket, make_head(dataset(0, DAY)), clock, downsampler=Downsampler(bucket, min_span_1h_ms=None, now=clock))
    assert len(live(bucket, RES_5M)) == 4 and live(bucket, RES_1H) == []


def test_bucket_inspect_and_verify_understand_downsampled_blocks(tmp_path):
    import argparse
    import io as _io

    from compactor import bucketcli

    data_dir = tmp_path / "data"
    bucket = FilesystemBucket(data_dir / "bucket")
    run(bucket, make_head(dataset(0, DAY)), Clock(2 * DAY))
    (hour,) = live(bucket, RES_1H)
    parser = argparse.ArgumentParser()
    bucketcli.configure_parser(parser)

    def cli(*argv):
        out = _io.StringIO()
        code = bucketcli.run(parser.parse_args([*argv, "--data-dir", str(data_dir)]), out)
        return code, out.getvalue()

    code, out = cli("verify")
    assert code == 0 and "FAIL" not in out and out.count(" 5m aggregate rows") == 4, out
    assert f"{hour.ulid}  4 series, {hour.num_samples} 1h aggregate rows" in out
    code, out = cli("inspect", hour.ulid)
    assert code == 0 and "count, sum, min, max, counter per series and 1h interval" in out
    assert "flashback-block version 2" in out and "label cardinality: 4 series" in out
    # A corrupt downsampled block fails verify.
    name = f"{hour.ulid}/{DATA_FILE}"
    bucket.upload(name, bucket.get(name)[:-10])
    code, out = cli("verify")
    assert code != 0 and f"FAIL     {hour.ulid}" in out


def test_a_corrupt_duplicate_hiding_a_sound_block_is_deleted(bucket):
    clock = Clock(2 * DAY)
    _, ds = run(bucket, make_head(dataset(0, WINDOW)), clock)
    (raw,) = live(bucket, 0)
    ds._downsample_raw(raw)
    registry = CollectorRegistry()
    cat = BlockCatalog(bucket)
    cat.refresh()
    fives = [b for b in cat.all_blocks() if b.meta.resolution == RES_5M]
    visible = next(b for b in fives if b.hidden_by is None)
    hidden = next(b for b in fives if b.hidden_by is not None)
    name = f"{visible.ulid}/{DATA_FILE}"
    bucket.upload(name, bucket.get(name)[:-20])
    fresh = Downsampler(bucket, now=clock, registry=registry)
    assert fresh.run_once().marked == []
    assert [m.ulid for m in live(bucket, RES_5M)] == [hidden.ulid]
    assert registry.get_sample_value("flashback_downsampler_verify_failures_total") == 1
    assert fresh.run_once().written == [] and [m.ulid for m in live(bucket, RES_5M)] == [hidden.ulid]


@pytest.mark.parametrize("changes,match", [
    ({"version": 1}, "version 1 with resolution 300000"),
    ({"version": 1, "resolution": 0}, "format version 2, meta.json says 1"),
    ({"resolution": 0}, "version 2 with resolution 0"),
], ids=["v1-downsampled", "v1-meta-over-v2-files", "v2-raw"])
def test_version_and_resolution_must_agree(bucket, changes, match):
    import json as _json

    run(bucket, make_head(dataset(0, WINDOW)), Clock(2 * DAY))
    (m,) = live(bucket, RES_5M)
    doc = _json.loads(bucket.get(f"{m.ulid}/meta.json"))
    doc.update(changes)
    bucket.upload(f"{m.ulid}/meta.json", _json.dumps(doc).encode())
    with pytest.raises(CorruptBlock, match=match):
        BlockReader(bucket, m.ulid).select([ANY], 0, DAY)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 47), min_size=0, max_size=6, unique=True),
       resets=st.integers(0, 8))
def test_any_split_into_blocks_joins_back_to_the_whole(seed, cuts, resets):
    """Property: 5m aggregates of a series cut into blocks at any window boundaries, joined and
    re-aggregated to 1h, equal the 1h aggregates of the whole series."""
    rng = np.random.default_rng(seed)
    ts = scrape_times(0, 48 * HOUR // 4, rng)  # 12 h
    vs = counter_with_resets(ts, rng, resets)
    edges = [0] + sorted(c * HOUR // 4 for c in cuts) + [48 * HOUR // 4]
    blocks = [downsample_raw(ts[(ts >= a) & (ts < b)], vs[(ts >= a) & (ts < b)], RES_5M)
              for a, b in zip(edges, edges[1:])]
    hourly = downsample_aggregates([b for b in blocks if b is not None], RES_1H)
    _assert_same_aggregates(hourly, downsample_raw(ts, vs, RES_1H))


def test_flashback_up_downsamples_and_answers_long_steps_from_5m_data(tmp_path):
    """``flashback up`` with the default compactor options (but a short interval): a raw block
    in its bucket gets a 5m block, and a query with a long step reads it and says so."""
    import time as _time

    from flashback.app import App
    from flashback.config import CompactorOptions, Options
    from store.block import write_block
    from tests.e2e.harness import get_json, wait_until

    bucket_dir = tmp_path / "bucket"
    bucket = FilesystemBucket(bucket_dir)
    window = 28 * HOUR
    now = int(_time.time() * 1000)
    start = now // window * window - 2 * window  # a closed 28 h window, aligned as the compactor's
    data = dataset(start, start + window)
    series = sorted((Labels.from_pairs(ls), np.array([t for t, _ in smp]), np.array([v for _, v in smp]))
                    for ls, smp in data)
    raw = write_block(bucket, series, min_time=start, max_time=start + window)
    app = App(Options(listen_port=0, data_dir=str(tmp_path / "data"),
                      bucket={"type": "FILESYSTEM", "config": {"directory": str(bucket_dir)}},
                      compactor=CompactorOptions(interval_s=0.2)))
    app.start()
    try:
        wait_until(lambda: len(live(bucket, RES_5M)) == 1, 30, "a 5m block of the raw block")
        (five,) = live(bucket, RES_5M)
        assert five.sources == raw.sources and (five.min_time, five.max_time) == (raw.min_time, raw.max_time)
        port = app.address[1]
        params = {"query": "sum(rate(requests_total[5m]))", "start": (start + HOUR) / 1000,
                  "end": (start + window - HOUR) / 1000, "step": 2400}

        def answered() -> bool:  # the querier lists the bucket again every 30 s
            return any("resolution 5m" in i for i in get_json(port, "/api/v1/query_range", params).get("infos", []))

        wait_until(answered, 45, "the query to read the 5m block")
        raw_answer = get_json(port, "/api/v1/query_range", {**params, "max_source_resolution": "raw"})
        down = get_json(port, "/api/v1/query_range", params)
        a = [float(v) for _, v in raw_answer["data"]["result"][0]["values"]]
        b = [float(v) for _, v in down["data"]["result"][0]["values"]]
        assert len(a) == len(b) > 30 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-9
    finally:
        app.close()
