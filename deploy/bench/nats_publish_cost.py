"""NATS servers' CPU per acknowledged publish of a log record, by consumer setup.

    python3 deploy/bench/nats_publish_cost.py [--size 12400] [--messages 3000]

Starts a 3-node JetStream cluster on loopback (``store.natscluster``), then, on a new R3
stream per setup, publishes ``--messages`` records of ``--size`` random bytes through
``NatsLog`` from two threads (as the adapter at two connections), with three pull consumers
reading along (as a shard's three head replicas):

* ``none``: no consumer;
* ``r3-ack``: replicated like the stream, cumulative acknowledgements (what the head replicas
  used until they moved to ``r1-mem-noack``);
* ``r3-noack``: the same without acknowledgements;
* ``r1-mem-noack``: in-memory single-replica consumers without acknowledgements (what the head
  replicas use, ``store.natslog``).

Prints the servers' CPU milliseconds per message (``/proc/<pid>/stat``, their idle CPU
subtracted) and messages per second. The CPU figure is what to compare: a record of the
cluster's write path carries ~650 samples at 12.4 KB.

The servers run with ``GOMAXPROCS`` = cores / 3 unless the environment sets it
(``store.natscluster.NatsCluster``). On the 2-core box, ``r1-mem-noack``: 1.03-1.04 ms per
message with ``GOMAXPROCS=1`` against 1.24-1.33 ms with Go's default (2), in alternating runs
(``GOMAXPROCS=2 python3 deploy/bench/nats_publish_cost.py --setups r1-mem-noack``); a 1 KB
message still costs ~0.6-0.7 ms: the cost is per message, not per byte.

``--connect leader,follower``: the publisher connected to the stream leader's server or to
another one (then every publish and PubAck crosses a route). Session of 2026-11-30 (seventh),
``--setups none --connect leader,follower,leader,follower,leader,follower --messages 2000``:
0.54-0.57 ms per message against 0.58-0.60 (an earlier script, 3000 messages: 0.49-0.56 against
0.56-0.59). At three records per 2000-sample request that is 0.05-0.09 s per million samples of
the cluster's write path.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchlib import cpu_s  # noqa: E402 (beside this script)

_RUNS = itertools.count()
SETUPS = ("none", "r3-ack", "r3-noack", "r1-mem-noack")


def measure(urls: list[str], names: list[str], cpu, idle_per_s: float, setup: str, size: int, n: int,
            connect: str = "any") -> dict:
    from nats.js import api

    from store.natslog import NatsConnection, NatsLog, wait_future

    stream = f"cost_{setup.replace('-', '_')}_{connect}_{os.getpid()}_{next(_RUNS)}"
    lg = NatsLog(urls, stream, replicas=3, timeout_s=10)
    if connect != "any":
        leader = names.index(lg.state().leader)
        lg.close()
        lg = NatsLog([urls[leader if connect == "leader" else (leader + 1) % len(urls)]], stream, replicas=3,
                     timeout_s=10)
    readers = []
    if setup != "none":
        for i in range(3):
            conn = NatsConnection(urls, f"reader {i}")
            ack = setup == "r3-ack"
            cfg = api.ConsumerConfig(
                name=f"r{i}", durable_name=f"r{i}", deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.ALL if ack else api.AckPolicy.NONE, max_ack_pending=10000 if ack else None,
                mem_storage=True if setup.startswith("r1") else None, num_replicas=1 if setup.startswith("r1") else None)

            async def bind(conn=conn, cfg=cfg):
                info = await conn.jsm.add_consumer(stream, cfg)
                return await conn.js.pull_subscribe_bind(consumer=info.name, stream=stream)

            readers.append((conn, conn.run(bind(), 10, "create consumer"), ack))
    got = [0] * len(readers)
    stop = threading.Event()

    def read(i: int) -> None:
        conn, sub, ack = readers[i]

        async def fetch() -> int:
            try:
                msgs = await sub.fetch(batch=256, timeout=0.5)
            except Exception:
                return 0
            if ack and msgs:
                await msgs[-1].ack()
            return len(msgs)

        while not stop.is_set():
            k = conn.run(fetch(), 5, "fetch")
            got[i] += k
            if k < 256:
                time.sleep(0.1)  # the replicas' fetch linger

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(readers))]
    for t in threads:
        t.start()
    record = os.urandom(size)
    c0, t0 = cpu(), time.monotonic()

    def write(w: int) -> None:
        for i in range(n // 2):
            wait_future(lg.publish_async(record, f"{w}-{i}"), 10, "publish")

    writers = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    while got and min(got) < n // 2 * 2 and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    used = cpu() - c0 - idle_per_s * elapsed
    stop.set()
    for t in threads:
        t.join()
    for conn, _, _ in readers:
        conn.close()
    lg.close()
    return {"setup": setup, "connect": connect, "cpu_ms_per_message": round(used * 1000 / n, 3), "messages_per_s": round(n / elapsed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=12400)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--connect", default="any",
                    help="which server the publisher connects to: any, leader (the stream leader's), follower; "
                         "comma-separated to measure several, alternating")
    args = ap.parse_args()
    from store.natscluster import NatsCluster

    work = tempfile.mkdtemp(prefix="fb-nats-cost-")
    cluster = NatsCluster(work)
    cluster.start()
    try:
        pids = [cluster.pid(i) for i in range(cluster.size)]

        def cpu() -> float:
            return sum(cpu_s(p) for p in pids)

        time.sleep(3)
        c0 = cpu()
        time.sleep(8)
        idle = (cpu() - c0) / 8
        results = [measure(cluster.urls, cluster.names, cpu, idle, s, args.size, args.messages, c)
                   for s in args.setups.split(",") for c in args.connect.split(",")]
        print(json.dumps({"size": args.size, "messages": args.messages, "idle_cpu_s_per_s": round(idle, 3),
                          "results": results}, indent=1))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
