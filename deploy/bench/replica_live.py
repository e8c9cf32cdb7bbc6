"""CPU of one head replica applying records as they arrive, against catching up on them.

    python3 deploy/bench/replica_live.py DUMP_DIR [--rate 190] [--rounds 30]

Starts a 1-shard x 1-replica local cluster (``flashback cluster up``'s LocalCluster), publishes
shard 0's columns records of the first ``--rounds`` rounds of a ``../shared/bench/rwload.py``
dump straight into the shard's stream (the first round before measuring, so that the series
exist), once at ``--rate`` records per second (190/s is what each replica receives in the 3x3
cluster benchmark) and once all at once into a fresh cluster, and prints the replica process's
CPU microseconds per sample for both, until it applied everything (``/proc/<pid>/stat``).

Measured on the 2-core box, 30 rounds (0.97 M samples): live 0.66-0.70 us per sample, catch-up 0.41-0.42
(session of 2026-11-30, fourth). With the consumer pulling records itself (``store.natslog._Reader``,
one request per fetch instead of nats-py's two and an ``asyncio.wait_for`` per message), in
alternating runs on a quiet machine: before 0.47 and 0.42 live, 0.25 and 0.35 catch-up; after
0.42 live, 0.27 catch-up (two earlier runs, 0.55-0.60 against 0.77-0.80, were not alternated and
flattered the change; in the 3x3 benchmark, alternating, the replicas' CPU fell from 2.06-2.16 to
1.76-1.77 s per million samples). Most of the rest is the memory the head touches per sample:
the same records applied in one tight loop in-process cost 0.21-0.25 us per sample, 0.36-0.56
when applied in batches with pauses in between, or with 5 ms of other Python work between
records (the head's per-series state falls out of the caches meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchlib import cpu_s, wait_caught_up  # noqa: E402 (beside this script)


def run(records: list[bytes], per_round: int, samples: int, rate: float) -> float:
    from flashback.launcher import LocalCluster
    from store.natslog import NatsLog, wait_future

    work = tempfile.mkdtemp(prefix="fb-replica-live-")
    cluster = LocalCluster(os.path.join(work, "c"), shards=1, replicas=1)
    cluster.start(timeout=300)
    try:
        pid = cluster.processes["store-shard-0-r0"].proc.pid
        lg = NatsLog(cluster.nats.urls, cluster.topology.shards[0].stream, replicas=3)
        try:
            for i, r in enumerate(records[:per_round]):
                wait_future(lg.publish_async(r, f"first-{i}"), 30, "publish")
            time.sleep(3)  # the series are created
            c0, t0 = cpu_s(pid), time.monotonic()
            fut = None
            for i, r in enumerate(records[per_round:]):
                fut = lg.publish_async(r, f"rest-{i}")
                if rate:
                    wait_future(fut, 30, "publish")
                    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
            if fut is not None:
                wait_future(fut, 30, "publish")
            last = lg.last_seq()
        finally:
            lg.close()
        wait_caught_up(cluster.processes["querier"].http, through=last)
        return (cpu_s(pid) - c0) * 1e6 / samples
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump")
    ap.add_argument("--rate", type=float, default=190.0)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    import numpy as np

    from store import writerequest
    from store.bench_head import columns_records, load_bodies

    per_round = json.load(open(os.path.join(args.dump, "meta.json")))["chunks_per_round"]
    reqs = [writerequest.decode(b) for b in load_bodies(args.dump, per_round * args.rounds)]
    records = columns_records(reqs, 3, max(int(r.ts.max()) for r in reqs if r.num_samples))
    samples = sum(int((r.hashes[r.sample_series] % np.uint64(3) == 0).sum()) for r in reqs[per_round:])
    live = run(records, per_round, samples, args.rate)
    catch_up = run(records, per_round, samples, 0)
    print(json.dumps({"records": len(records) - per_round, "samples": samples, "rate": args.rate,
                      "live_us_per_sample": round(live, 3), "catch_up_us_per_sample": round(catch_up, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
