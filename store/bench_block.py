"""Size and read cost of blocks: ``python3 -m store.bench_block [--series N] [--rounds R]``.

Generates the shared bench's node_exporter-like data (``../shared/bench/rwload.py``:
counters, gauges, byte gauges and constants scraped every 15 s with per-target
phase and ±5 ms jitter), writes it as one block to a filesystem bucket and
prints bytes per sample (data file, index, total; and pyarrow's default Parquet
settings on the same rows for comparison), write and verify throughput, and what
a cold and a warm single-series ``select`` fetch (range GETs and bytes). Then
downsamples the same data to 5m and 1h blocks (format version 2) and prints their
size per raw sample and against the raw block (``--no-downsample`` skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import tempfile
import time
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.aggregates import downsample_raw
from store.block import DATA_FILE, INDEX_FILE, BlockReader, verify_block, write_aggregate_block, write_block
from store.bucket import FilesystemBucket
from store.labels import Labels
from store.matchers import Matcher, MatchType

DEFAULT_RWLOAD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "rwload.py")


def load_rwload(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("rwload", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def generate(rw: types.ModuleType, n_series: int, rounds: int, seed: int, start_ms: int):
    """Series as rwload sends them (same labels, values and timestamps), sorted by labels."""
    g = rw.Generator(types.SimpleNamespace(seed=seed, series=n_series, per_request=2000, start_ms=start_ms))
    labels = []
    host = 0
    while len(labels) < n_series:
        base = {"instance": f"node-{host:05d}:9100", "job": "node"}
        for dim, _kind, names in rw.FAMILIES:
            for name in names:
                for extra in rw.dimensions(dim, host):
                    labels.append(Labels.from_dict({"__name__": name, **base, **extra}))
        host += 1
    ts = np.empty((rounds, g.n), dtype=np.int64)
    vs = np.empty((rounds, g.n), dtype=np.float64)
    for r in range(rounds):
        jitter = g.rng.integers(-5, 6, g.hosts)
        ts[r] = (start_ms + r * rw.SCRAPE_MS + g.host_offset + jitter)[g.host_of]
        vs[r] = g.next_values()
    order = sorted(range(g.n), key=labels.__getitem__)
    return [(labels[k], np.ascontiguousarray(ts[:, k]), np.ascontiguousarray(vs[:, k])) for k in order]


class CountingBucket(FilesystemBucket):
    """Counts reads; ``FilesystemBucket.get`` goes through ``get_range``, so both are counted once."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.calls = 0
        self.bytes = 0

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = super().get_range(name, offset, length)
        self.calls += 1
        self.bytes += len(data)
        return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=6_720, help="scrapes per series (6720 = 28 h at 15 s)")
    parser.add_argument("--rows-per-group", type=int, default=None)
    parser.add_argument("--compression-level", type=int, default=None)
    parser.add_argument("--rwload", default=DEFAULT_RWLOAD, help="path of the shared bench's rwload.py")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-downsample", action="store_true", help="skip the 5m and 1h blocks")
    args = parser.parse_args()

    rw = load_rwload(args.rwload)
    start_ms = 1_700_000_000_000
    t0 = time.perf_counter()
    series = generate(rw, args.series, args.rounds, args.seed, start_ms)
    n = sum(len(t) for _, t, _ in series)
    print(f"{len(series)} series x {args.rounds} rounds = {n} samples (generated in {time.perf_counter() - t0:.1f} s)")
    kw = {}
    if args.rows_per_group:
        kw["rows_per_group"] = args.rows_per_group
    if args.compression_level is not None:
        kw["compression_level"] = args.compression_level
    with tempfile.TemporaryDirectory() as d:
        bucket = CountingBucket(d)
        mint = min(int(t[0]) for _, t, _ in series)
        maxt = max(int(t[-1]) for _, t, _ in series) + 1
        t0 = time.perf_counter()
        meta = write_block(bucket, series, min_time=mint, max_time=maxt, **kw)
        dt = time.perf_counter() - t0
        data, index = meta.file(DATA_FILE).size_bytes, meta.file(INDEX_FILE).size_bytes
        print(f"write: {dt:.1f} s, {n / dt / 1e6:.2f} M samples/s")
        print(f"bytes/sample: data {data / n:.3f}, index {index / n:.4f}, total {(data + index) / n:.3f} "
              f"(data {data / 1e6:.1f} MB, index {index / 1e3:.1f} kB = {index / len(series):.1f} B/series)")

        ref = np.concatenate([np.full(len(t), i, np.uint32) for i, (_, t, _) in enumerate(series)])
        table = pa.table({"ref": ref, "t": np.concatenate([t for _, t, _ in series]),
                          "v": np.concatenate([v for _, _, v in series])})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        print(f"pyarrow defaults (snappy, dictionary, plain) on the same rows: {len(buf.getvalue()) / n:.3f} bytes/sample")
        del table, ref, buf

        t0 = time.perf_counter()
        verify_block(bucket, meta.ulid)
        dt = time.perf_counter() - t0
        print(f"verify: {dt:.1f} s, {n / dt / 1e6:.2f} M samples/s")

        rng = np.random.default_rng(0)
        picks = rng.choice(len(series), size=20, replace=False)
        bucket.calls = bucket.bytes = 0
        reader = BlockReader(bucket, meta.ulid)
        labels = series[int(picks[0])][0]
        t0 = time.perf_counter()
        reader.select([Matcher(MatchType.EQ, k, v) for k, v in labels], mint, maxt)
        dt = time.perf_counter() - t0
        print(f"cold single-series select (meta.json, index, footer, columns): {bucket.calls} GETs, "
              f"{bucket.bytes / 1e3:.1f} kB, {dt * 1e3:.0f} ms")
        calls, nbytes, total = [], [], 0.0
        for k in picks[1:]:
            bucket.calls = bucket.bytes = 0
            labels = series[int(k)][0]
            t0 = time.perf_counter()
            got = reader.select([Matcher(MatchType.EQ, a, b) for a, b in labels], mint, maxt)
            total += time.perf_counter() - t0
            assert len(got) == 1 and np.array_equal(got[0].samples()[0], series[int(k)][1])
            calls.append(bucket.calls)
            nbytes.append(bucket.bytes)
        print(f"warm single-series select: {np.mean(calls):.1f} GETs, {np.mean(nbytes) / 1e3:.1f} kB "
              f"(max {max(nbytes) / 1e3:.1f} kB), {total / len(nbytes) * 1e3:.1f} ms on average")
        bucket.calls = bucket.bytes = 0
        t0 = time.perf_counter()
        got = reader.select([Matcher(MatchType.EQ, "__name__", "node_cpu_seconds_total")], mint, mint + 3_600_000)
        dt = time.perf_counter() - t0
        print(f"node_cpu_seconds_total over the first hour: {len(got)} series, {bucket.calls} GETs, "
              f"{bucket.bytes / 1e6:.2f} MB, {dt * 1e3:.0f} ms")
        if not args.no_downsample:
            downsample(bucket, series, n, mint, maxt, data + index, kw)


def downsample(bucket: CountingBucket, series, n: int, mint: int, maxt: int, raw_bytes: int, kw: dict) -> None:
    """5m and 1h blocks of ``series``: size per raw sample, against raw, and read cost."""
    for res, name in ((300_000, "5m"), (3_600_000, "1h")):
        t0 = time.perf_counter()
        aggs = [(lb, downsample_raw(t, v, res)) for lb, t, v in series]
        dt_agg = time.perf_counter() - t0
        t0 = time.perf_counter()
        meta = write_aggregate_block(bucket, aggs, resolution=res, min_time=mint, max_time=maxt, **kw)
        dt = time.perf_counter() - t0
        size = sum(f.size_bytes for f in meta.files)
        print(f"{name}: {meta.num_samples} aggregate rows ({n / meta.num_samples:.1f} raw samples each), "
              f"{size / 1e6:.2f} MB = {size / n:.4f} bytes per raw sample, {size / meta.num_samples:.2f} bytes "
              f"per row, {raw_bytes / size:.1f}x smaller than raw; aggregate {dt_agg:.1f} s, write {dt:.1f} s")
        reader = BlockReader(bucket, meta.ulid)
        bucket.calls = bucket.bytes = 0
        t0 = time.perf_counter()
        got = reader.select([Matcher(MatchType.EQ, "__name__", "node_cpu_seconds_total")], mint, maxt)
        dt = time.perf_counter() - t0
        print(f"{name}: node_cpu_seconds_total over the whole block, cold: {len(got)} series, {bucket.calls} GETs, "
              f"{bucket.bytes / 1e6:.2f} MB, {dt * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
