"""Ingest benchmark of cluster mode against a single node, in the same run (issue "Cluster mode").

    python3 deploy/bench/cluster_ingest.py DUMP_DIR [--requests N] [--shards 3] [--replicas 3]
                                                    [--concurrency 2] [--idle-seconds S]

Replays a ``../shared/bench/rwload.py`` dump (or its first N requests) into a single-node
``flashback up`` and then into a local cluster (``flashback cluster up``'s LocalCluster), each on
a fresh directory, with rwload's own timing; waits until every head replica has applied
everything; prints samples/s, write p50/p99, the cluster/single ratio, and per replica its RSS
and head series (RSS per active series per replica, in all and above the RSS of the replica
before the replay, with an empty head). CPU seconds per million samples are read
from ``/proc/<pid>/stat`` of every process (single node; cluster per role and per process, NATS
servers included), once when the replay ends and once when every replica has caught up: unlike
wall-clock figures they hardly depend on what else runs on the machine. rwload's own CPU
(``client_cpu_s_per_m_samples``) comes out of the same cores.

Measured on the 2-core box with --requests 3060 (6.0 M samples, 100 k series), warm numba
caches, other sessions' load 3-16 (CPU seconds per million samples, single node 1.7-1.8):

    cluster write path          adapter  NATS  9 replicas  total  samples/s  ratio
    protobuf parts, ack/fetch      2.46  4.12        9.34  15.94    108 150  0.18
    columns, batched acks,         2.12  2.23        4.81   9.18    129 764  0.18
      100 ms fetch linger          2.19  2.23        4.83   9.26    138 306  0.35
    the same, --concurrency 8      1.90  1.25        4.40   7.55    220 611  0.39

Session of 2026-11-30 (third), same command; "before" is commit 757b3f9 on a quiet machine
(load 0.5), "after" has the bulk series creation, memcmp lookups and one shared adapter
connection (load 1-8; runs 1 and 2 with the 100 ms fetch linger, the others with 250 ms). CPU
seconds per million samples:

    run                       adapter  NATS  9 replicas  total  samples/s  single: samples/s  CPU  ratio
    before                       2.31  2.06        5.45   9.84    193 959            559 287  2.24  0.35
    after, run 1                 2.12  2.07        4.00   8.21    212 349            760 930  1.52  0.28
    after, run 2                 2.23  2.21        4.08   8.53    202 374            717 784  1.57  0.28
    after, 250 ms linger         2.23  2.10        3.73   8.07    213 749            738 559  1.54  0.29
    after, --concurrency 8       2.10  1.46        3.47   7.04    253 514            866 710  1.49  0.29
    after, quiet (load 1)        2.05  1.83        3.39   7.28    248 900            794 667  1.53  0.31
    + R1 in-memory consumers
      without acks (load 2.6)    1.92  1.36        3.13   6.42    284 677            800 490  1.53  0.36
    the same, whole dump         1.87  1.35        2.41   5.63    323 107            984 091  1.27  0.33
      (30.1 M samples, no --requests; load 5.6)

Session of 2026-11-30 (fourth): kernels warmed up before a role serves, replica checkpoints
every 5 min (as the single node) instead of 1 min, columns records indexed by one kernel with a
faster XXH64, NATS with GOMAXPROCS = cores / 3, replicas polling the stream every 2 s (lag from
deliveries) and fetching with 1 s waits, cheaper label checks in the adapter:

    run                       adapter  NATS  9 replicas  total  samples/s  single: samples/s  CPU  ratio
    --requests 3060 (load 2.1)   1.88  1.27        2.34   5.50    325 437            816 500  1.47  0.40
    whole dump (load 0.8)        1.79  1.23        1.75   4.78    369 526          1 108 968  1.14  0.33
    whole dump (load 1.1)        1.91  1.65        2.27   5.84    303 192            794 714  1.51  0.38
    whole dump (load 4.5)        1.95  1.39        2.05   5.40    323 911            949 949  1.30  0.34

Session of 2026-11-30 (fifth): replicas pull records themselves (one request per fetch), the
adapter publishes without a task per publish, builds its columns blocks in one kernel and checks
labels on the canonical key, requests decode without page faults. Whole dump, the commit before
(c17810c, "old") and after (996c79d, "new"), load 0.7-6.4, in this order: old, 2377e5f (the
first two changes: 4.71), old, 2377e5f (4.74); new, 2377e5f (4.24), new; old, new, old, new:

    run                       adapter  NATS  9 replicas  total  samples/s  single: samples/s  CPU  ratio
    old                          1.67  1.60        2.16   5.44    307 135            837 278  1.43  0.367
    old                          1.63  1.26        2.06   4.96    360 002            966 280  1.26  0.373
    old                          1.67  1.08        1.71   4.46    396 785          1 091 485  1.15  0.364
    old                          1.64  1.08        1.73   4.46    397 532          1 042 794  1.19  0.381
    new                          1.55  1.16        1.55   4.27    414 904          1 048 571  1.18  0.396
    new                          1.44  1.12        1.56   4.12    430 943          1 078 565  1.15  0.400
    new                          1.40  1.06        1.50   3.97    441 047          1 092 252  1.15  0.404
    new                          1.62  1.21        1.72   4.56    385 075            997 068  1.24  0.386

On average 4.83 -> 4.23 CPU seconds per million samples and a ratio of 0.371 -> 0.397; runs
swing by +-0.3 with the machine's load, so single pairs say little.

Session of 2026-11-30 (sixth), on a busier machine (load 0.8-7.1): the scanner's helpers no
longer inlined by numba (an atomic reference count per field read), glibc keeping request-sized
buffers (``flashback/malloc.py``), appends of known series without masks, the block index kernel
without slice views. "base" is f29d932, "new" 0f11f03 (runs 1-2), 4a24044 (3) and bd41675 (4-5),
alternating base, new:

    run                       adapter  NATS  9 replicas  total  samples/s  single: samples/s  CPU  ratio
    base                         1.90  1.99        2.66   6.57    271 375            671 942  1.75  0.404
    base                         1.95  1.84        2.48   6.28    282 768            739 967  1.61  0.382
    base                         1.86  1.60        2.28   5.75    307 396            814 599  1.47  0.377
    base                         1.86  1.81        2.29   5.98    274 792            666 516  1.47  0.412
    base                         1.63  1.24        1.79   4.68    376 916            941 248  1.32  0.400
    new                          1.50  1.95        2.43   5.91    295 957            804 013  1.37  0.368
    new                          1.34  1.71        2.08   5.15    340 341            899 274  1.22  0.378
    new                          1.26  1.63        1.94   4.85    360 930            823 034  1.35  0.439
    new                          1.12  1.33        1.66   4.12    424 709            983 396  1.13  0.432
    new                          1.11  1.33        1.58   4.03    431 695          1 201 869  0.95  0.359

The cluster's CPU per sample fell by a sixth (mean 5.85 -> 4.81), and so did the single node's
(1.52 -> 1.20): the scanner and the allocator serve both, so the ratio stayed where it was
(0.395 both). Replica RSS after the whole dump 349-356 MiB (was 369-375), 10.8-10.9 KiB per
series per replica.

In the fourth session the single node gained more than the cluster (the kernels made faster are
a larger share of its CPU), so the ratio fell while both got faster. On a whole dump the cluster needs about 4.8
CPU seconds per million samples and is CPU-bound on the two cores (16 processes and the load
generator); the single node, at 1.1-1.5, is bound by the latency of two connections. For 0.5
the cluster would need ~3.2, i.e. about two thirds of what the three replicas, the R3 log and
the adapter's splitting and publishing cost together now. What the cluster adds is mostly per message:
a NATS R3 publish of a 12 KB record costs the three servers 0.76 ms of CPU with no consumer
and 1.25 ms with three durable R3 consumers (0.95 ms with in-memory R1 consumers without
acknowledgements), i.e. 1.2-1.9 s per million samples at ~650 samples per record; 49 KB records
cost 1.66 ms (2.2x the CPU for 4x the samples). Measured with ``nats_publish_cost.py``.

Session of 2026-11-30 (seventh), at 308a839 on a quiet machine (load 2.7): cluster 3.51 CPU
seconds per million samples (adapter 1.01, NATS 1.11, replicas 1.38), 496 682 samples/s; single
node 0.87, 1 315 135 samples/s; ratio 0.378. rwload itself took 0.15 s per million samples in
both. The single node used 1.35 of the 2 cores with rwload: it is bound by the latency of two
connections. For 0.5 the cluster would have had to take 658 k samples/s on the 1.90 cores left
by rwload, 2.89 s per million samples; each role alone costs more than that together: the
adapter 1.0 (0.75-0.80 for HTTP, decoding and splitting with a log that acknowledges at once,
sixth session, plus ~0.26 for publishing), NATS 1.1 (three R3 messages per 2000-sample
request), the nine replicas fed straight into the streams 0.99-1.21 (``replica_hosts.py``; the
same with three replicas per process). Longer replica batches (``fetch_linger_s`` 1 s,
``fetch_batch`` 256) took the replicas from 1.62-1.88 to 1.53-1.55 in two alternating pairs
(store column) and did not move the ratio (0.36-0.41 against 0.37-0.38). At d0f7f00 (load 0.2):
cluster 3.37 (adapter 0.99, NATS 1.03, replicas 1.35), 518 293 samples/s; single node 0.87,
1 309 304 samples/s; ratio 0.396. (From 16:56 UTC on 2026-11-30 the dump's timestamps lie in a
closed 28 h window: the compactors then read it from the first replica of each shard during the
run, which adds ~70 MiB to those replicas' RSS.)

Session of 2026-11-30 (eighth): the compactors ask label names, not a selection, to learn whether
a window holds data (3861a9b). With the old dump (its window closed) the first replicas were at
11.0 KiB per series against 10.7-10.8 (12.7-13.0 before); with a dump made anew (data ending
now, /tmp/bench/dump-100k-b) every replica is at 10.4-10.6 KiB (4.3-4.5 above empty). Whole dump:

    run (load before)        adapter  NATS  9 replicas  total  samples/s  p50/p99 ms  single: samples/s  CPU  ratio
    old dump (3.3)              0.99  1.11        1.44   3.59    492 182   6.5 / 27          1 256 636  0.91  0.392
    new dump (0.5)              1.13  1.54        1.57   4.25    411 297   7.9 / 32          1 183 906  0.95  0.347
    new dump (3.1)              0.99  1.16        1.31   3.46    514 848   6.4 / 25          1 350 806  0.84  0.381

At 2 connections the cluster is CPU-bound here (16 processes and the load generator on 2 cores):
latency p50 14-15 ms per request against 4 ms for the single node.
Replica RSS: ~300 MiB with 33.5 k series after the run, ~128 MiB of it before (an empty head).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchlib import cluster_shards, cpu_s, wait_caught_up  # noqa: E402 (beside this script)
BENCH = os.environ.get("BENCH", os.path.join(os.path.dirname(ROOT), "shared", "bench"))


def _truncated_dump(src: str, n: int, dst: str) -> str:
    """A copy of the dump with only its first ``n`` requests (all of them if n <= 0)."""
    if n <= 0:
        return src
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "payloads.bin"), "rb") as f, open(os.path.join(dst, "payloads.bin"), "wb") as out:
        for _ in range(n):
            head = f.read(8)
            if len(head) < 8:
                break
            length, _ = struct.unpack("<II", head)
            out.write(head + f.read(length))
    meta = json.load(open(os.path.join(src, "meta.json")))
    meta["requests"] = n
    json.dump(meta, open(os.path.join(dst, "meta.json"), "w"))
    return dst


def _replay(url: str, dump: str, concurrency: int) -> dict:
    """rwload's result, with its own CPU seconds per million samples accepted (the load
    generator shares the machine's cores with what it measures)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, os.path.join(BENCH, "rwload.py"), "--url", url, "--replay", dump,
                        "--concurrency", str(concurrency)], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    samples = result.get("samples_accepted") or 0
    result["client_cpu_s_per_m_samples"] = round(cpu * 1e6 / samples, 3) if samples else None
    return result


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _role(name: str) -> str:
    """The role of a process name: adapter, querier, store (head replica), compactor or nats."""
    return name.split("-", 1)[0]


def _cpu_by_role(pids: dict[str, int], before: dict[str, float], samples: int) -> dict:
    """CPU seconds per million samples since ``before``: per role (summed) and per process."""
    per_proc = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    roles: dict[str, float] = {}
    for name, s in per_proc.items():
        roles[_role(name)] = roles.get(_role(name), 0.0) + s
    per_m = 1e6 / samples
    return {"cpu_s_per_m_samples": {r: round(s * per_m, 2) for r, s in sorted(roles.items())},
            "cpu_s_per_m_samples_total": round(sum(roles.values()) * per_m, 2),
            "cpu_s_per_m_samples_per_process": {n: round(s * per_m, 2) for n, s in sorted(per_proc.items())}}


def _loadavg() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--idle-seconds", type=float, default=0,
                    help="before the replay, measure the idle cluster's CPU (cores by role) for this long")
    args = ap.parse_args()
    from flashback.launcher import LocalCluster, Process, _free_port

    work = tempfile.mkdtemp(prefix="fb-cluster-bench-")
    dump = _truncated_dump(args.dump, args.requests, os.path.join(work, "dump"))
    try:
        http = f"127.0.0.1:{_free_port()}"
        single = Process("single", ["up", "--listen", http, "--data-dir", os.path.join(work, "single")], http,
                         os.path.join(work, "single.log"))
        single.start()
        try:  # the single node must not outlive a failed replay (it would load the next runs)
            while not single.ready():
                if single.proc.poll() is not None:
                    raise SystemExit(f"single node exited with {single.proc.returncode}: {single.log()}")
                time.sleep(0.2)
            load_before = _loadavg()
            cpu0 = cpu_s(single.proc.pid)
            one = _replay(f"http://{http}/api/v1/write", dump, args.concurrency)
            one_cpu = round((cpu_s(single.proc.pid) - cpu0) * 1e6 / one["samples_accepted"], 2)
        finally:
            single.stop()

        cluster = LocalCluster(os.path.join(work, "cluster"), shards=args.shards, replicas=args.replicas)
        cluster.start(timeout=300)
        try:
            pids = {name: p.proc.pid for name, p in cluster.processes.items()}
            pids.update({f"nats-{i}": cluster.nats.pid(i) for i in range(cluster.nats.size)})
            idle = None
            if args.idle_seconds > 0:
                time.sleep(5)  # past the start
                c0 = {name: cpu_s(pid) for name, pid in pids.items()}
                time.sleep(args.idle_seconds)
                idle_roles: dict[str, float] = {}
                for name, pid in pids.items():
                    used = (cpu_s(pid) - c0[name]) / args.idle_seconds
                    idle_roles[_role(name)] = idle_roles.get(_role(name), 0.0) + used
                idle = {"cores_by_role": {r: round(c, 3) for r, c in sorted(idle_roles.items())},
                        "cores": round(sum(idle_roles.values()), 3)}
            before = {name: cpu_s(pid) for name, pid in pids.items()}
            rss_empty = {name: _rss_mib(pid) for name, pid in pids.items() if name.startswith("store-")}
            many = _replay(cluster.write_url, dump, args.concurrency)
            during = _cpu_by_role(pids, before, many["samples_accepted"])
            port = cluster.processes["querier"].http
            caught_up_s = wait_caught_up(port)
            total = _cpu_by_role(pids, before, many["samples_accepted"])
            shards = cluster_shards(port)
            per_replica = []
            for s in shards:
                for rep in s["replicas"]:
                    proc = cluster.processes[f"store-{s['shard']}-{rep['name']}"].proc
                    rss = _rss_mib(proc.pid)
                    per_replica.append((s["shard"], rep["name"], rep.get("series", 0), rss,
                                        rss_empty[f"store-{s['shard']}-{rep['name']}"]))
        finally:
            cluster.stop()
        print(json.dumps({"single": {**{k: one[k] for k in ("samples_accepted", "samples_per_s", "latency_ms",
                                                       "client_cpu_s_per_m_samples")},
                                     "cpu_s_per_m_samples": one_cpu},
                          "cluster": {k: many[k] for k in ("samples_accepted", "samples_per_s", "latency_ms",
                                                           "client_cpu_s_per_m_samples")},
                          "cluster_cpu_during_replay": during,
                          "cluster_cpu_until_caught_up": total,
                          "cluster_idle": idle,
                          "loadavg_1m_before": load_before,
                          "ratio_samples_per_s": round(many["samples_per_s"] / one["samples_per_s"], 3),
                          "replicas_caught_up_after_s": round(caught_up_s, 1),
                          "replicas": [{"shard": s, "replica": r, "series": n, "rss_mib": round(m, 1),
                                        "rss_empty_mib": round(e, 1),
                                        "kib_per_series": round(m * 1024 / n, 1) if n else None,
                                        "kib_per_series_above_empty": round((m - e) * 1024 / n, 1) if n else None}
                                       for s, r, n, m, e in per_replica]}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
