"""Throughput of ``NatsLog``: acknowledged publishes per second to a local 3-node JetStream cluster.

Run: ``python3 -m store.bench_natslog [--replicas 3] [--size 49152] [--threads 8] [--seconds 5]``

Starts a ``NatsCluster`` of three nodes on loopback in a temporary directory,
then ``--threads`` threads each loop ``NatsLog.append`` (blocking until the
PubAck) with random (incompressible) records of ``--size`` bytes and a fresh
message id. Prints acknowledged publishes/s, MB/s and append latency
percentiles. Numbers swing with whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

from store.natscluster import NatsCluster
from store.natslog import NatsLog


def run(urls: list[str], replicas: int, size: int, threads: int, seconds: float) -> dict[str, float]:
    """Publishes for ``seconds`` to a new stream and returns the figures."""
    stream = f"bench_r{replicas}_{os.getpid()}_{int(time.time())}"
    lg = NatsLog(urls, stream, replicas=replicas, timeout_s=10)
    records = [os.urandom(size) for _ in range(16)]
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def appender(t: int) -> None:
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            lg.append(records[i % len(records)], msg_id=f"{t}-{i}")
            latencies[t].append(time.perf_counter() - start)
            i += 1

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    lg.close()
    lat = sorted(x for per in latencies for x in per)
    n = len(lat)
    return {
        "publishes_per_s": n / elapsed,
        "mb_per_s": n * size / elapsed / 1e6,
        "p50_ms": lat[n // 2] * 1e3 if n else 0.0,
        "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1e3 if n else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--size", type=int, default=48 << 10, help="record bytes")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    base = tempfile.mkdtemp(prefix="bench-natslog-")
    try:
        with NatsCluster(base, size=max(3, args.replicas)) as cluster:
            r = run(cluster.urls, args.replicas, args.size, args.threads, args.seconds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"R{args.replicas}, {args.size} B records, {args.threads} threads: {r['publishes_per_s']:.0f} acked "
          f"publishes/s, {r['mb_per_s']:.1f} MB/s, append p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
