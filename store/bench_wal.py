"""Throughput of ``RocksLog`` group commit: concurrent appenders that each wait for durability.

Run: ``python3 -m store.bench_wal [--threads 4] [--size 30000] [--seconds 5] [--dir DIR]
[--checkpoint-items N]``

Each appender loops ``append`` + ``wait_durable`` with random (incompressible)
records of ``--size`` bytes, about one snappy-compressed remote-write request
of 2000 samples. With ``--checkpoint-items`` a checkpoint of that many 2 KB
items is saved in the middle of the run, to show its effect on appenders.
Prints records/s, MB/s, records per commit and the sync time per commit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

from prometheus_client import CollectorRegistry

from store.wal import RocksLog


def run(directory: str, threads: int, size: int, seconds: float, checkpoint_items: int) -> dict[str, float]:
    """Runs the benchmark in ``directory`` and returns its figures."""
    registry = CollectorRegistry()
    wal = RocksLog(os.path.join(directory, "wal"), registry=registry)
    records = [os.urandom(size) for _ in range(64)]
    stop = threading.Event()
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def appender(t: int) -> None:
        i = t
        while not stop.is_set():
            start = time.perf_counter()
            seq = wal.append(records[i % len(records)])
            wal.wait_durable(seq)
            latencies[t].append(time.perf_counter() - start)
            counts[t] += 1
            i += 1

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    checkpoint_s = 0.0
    if checkpoint_items:
        time.sleep(seconds / 3)
        value = os.urandom(2048)
        c0 = time.perf_counter()
        wal.save_checkpoint(wal.last_seq(), ((b"s%08d" % i, value) for i in range(checkpoint_items)))
        checkpoint_s = time.perf_counter() - c0
        time.sleep(max(0.0, start + seconds - time.perf_counter()))
    else:
        time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    wal.close()

    n = sum(counts)
    commits = registry.get_sample_value("flashback_wal_commits_total") or 0.0
    sync_sum = registry.get_sample_value("flashback_wal_fsync_duration_seconds_sum") or 0.0
    lat = sorted(x for per in latencies for x in per)
    return {
        "records_per_s": n / elapsed,
        "mb_per_s": n * size / elapsed / 1e6,
        "records_per_commit": n / commits if commits else 0.0,
        "commits_per_s": commits / elapsed,
        "sync_ms_per_commit": 1000 * sync_sum / commits if commits else 0.0,
        "latency_p50_ms": 1000 * lat[len(lat) // 2] if lat else 0.0,
        "latency_p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else 0.0,
        "checkpoint_s": checkpoint_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--size", type=int, default=30000, help="record size in bytes")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--dir", help="directory for the database (default: a temporary one, removed after)")
    ap.add_argument("--checkpoint-items", type=int, default=0)
    args = ap.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="bench_wal")
    try:
        r = run(directory, args.threads, args.size, args.seconds, args.checkpoint_items)
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"threads={args.threads} size={args.size}B: {r['records_per_s']:.0f} records/s, "
          f"{r['mb_per_s']:.1f} MB/s, {r['records_per_commit']:.2f} records/commit, "
          f"{r['commits_per_s']:.0f} commits/s, sync {r['sync_ms_per_commit']:.2f} ms/commit, "
          f"latency p50 {r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms"
          + (f", checkpoint of {args.checkpoint_items} items {r['checkpoint_s']:.2f} s" if args.checkpoint_items
             else ""))


if __name__ == "__main__":
    main()
