"""CPU of the nine head replicas of a 3x3 cluster, fed without an adapter, by how they are hosted.

    python3 deploy/bench/replica_hosts.py DUMP_DIR [--hosts 9x1|3x3] [--rounds 100] [--rate 216]
                                                   [--replica-options JSON]

Starts a 3-node NATS cluster (``store.natscluster``) with three R3 streams, publishes each
shard's columns records of the first ``--rounds`` rounds of a ``../shared/bench/rwload.py``
dump into its stream (the first round before measuring, so that the series exist) at
``--rate`` requests per second (one record per shard each; 216/s is what the 3x3 cluster
benchmark reaches, 432 k samples/s), and measures the CPU of the processes hosting the
replicas until every replica applied everything, and of the NATS servers, per million samples.

``--hosts 9x1``: nine processes, one ``HeadReplica`` each (as ``flashback store``);
``3x3``: three processes, one replica of every shard each (as Kafka brokers host partitions).
``--replica-options``: keyword arguments for every ``HeadReplica``, e.g.
``'{"fetch_linger_s": 1.0, "fetch_batch": 256}'``.

Measured on the 2-core box (session of 2026-11-30, seventh), 100 rounds (9.9 M samples),
alternating, load 3-4; replicas' CPU seconds per million samples:

    9x1                                      1.10  1.15  1.21  1.05  1.08  0.99
    3x3                                      1.09  1.18  1.10  0.99
    9x1, fetch_linger_s 1.0, fetch_batch 256 1.00  1.00

Hosting three replicas per process changes nothing: the cost is each replica's own work per
record, not the number of processes. A 1 s linger saves ~6% at a second more of staleness.
Without the adapter and the load generator beside them, the nine replicas cost 1.0-1.2 s per
million samples (0.33-0.40 us per sample each); in the full benchmark (``cluster_ingest.py``) they cost 1.4-1.9.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchlib import cpu_s  # noqa: E402 (beside this script)


def host(urls: list[str], spec: list[list[str]], work: str, control: str, options: dict) -> None:
    """A process hosting the replicas of ``spec`` ([stream, replica name] pairs): every 0.5 s it
    reads the target sequences from ``control`` and writes whether all replicas reached them."""
    from store.replica import HeadReplica

    replicas = [HeadReplica(urls, stream, name, os.path.join(work, f"{stream}-{name}"),
                            peers=["r0", "r1", "r2"], stream_replicas=3, **options) for stream, name in spec]
    while True:
        time.sleep(0.5)
        try:
            with open(control) as f:
                target = json.load(f)
        except (OSError, ValueError):
            continue
        if target["stop"]:
            break
        done = all(r.applied_seq >= target["seq"] for r in replicas)
        with open(f"{control}.{os.getpid()}", "w") as f:
            json.dump({"done": done, "step": target["step"]}, f)
    for r in replicas:
        r.close(checkpoint=False)


def run(dump: str, hosts: str, rounds: int, rate: float, options: dict) -> dict:
    import numpy as np

    from store import shardrecord, writerequest
    from store.bench_head import load_bodies
    from store.natscluster import NatsCluster
    from store.natslog import NatsLog, wait_future

    per_round = json.load(open(os.path.join(dump, "meta.json")))["chunks_per_round"]
    reqs = [writerequest.decode(b) for b in load_bodies(dump, per_round * rounds)]
    now = max(int(r.ts.max()) for r in reqs if r.num_samples)
    records = [[shardrecord.encode_record(now, shardrecord.encode_series(
        r, np.flatnonzero(r.hashes % np.uint64(3) == k))) for r in reqs] for k in range(3)]
    samples = sum(r.num_samples for r in reqs[per_round:])
    streams = [f"bench-{k}" for k in range(3)]
    work = tempfile.mkdtemp(prefix="fb-replica-hosts-")
    nats = NatsCluster(os.path.join(work, "nats"))
    nats.start()
    procs: list[subprocess.Popen] = []
    logs = [NatsLog(nats.urls, s, replicas=3) for s in streams]
    control = os.path.join(work, "control")

    def command(seq: int, step: int, stop: bool = False) -> None:
        with open(control + ".tmp", "w") as f:
            json.dump({"seq": seq, "step": step, "stop": stop}, f)
        os.rename(control + ".tmp", control)

    def wait_done(step: int) -> None:
        while True:
            done = 0
            for p in procs:
                try:
                    with open(f"{control}.{p.pid}") as f:
                        st = json.load(f)
                    done += st["done"] and st["step"] == step
                except (OSError, ValueError):
                    pass
            if done == len(procs):
                return
            time.sleep(0.1)

    try:
        for k in range(3):
            for f in [logs[k].publish_async(r, f"first-{i}") for i, r in enumerate(records[k][:per_round])]:
                wait_future(f, 30, "publish")
        command(per_round, 1)
        if hosts == "9x1":
            specs = [[[s, f"r{j}"]] for s in streams for j in range(3)]
        else:
            specs = [[[s, f"r{j}"] for s in streams] for j in range(3)]
        for spec in specs:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--host", json.dumps(nats.urls),
                                           json.dumps(spec), work, control, json.dumps(options)]))
        wait_done(1)
        time.sleep(2)
        pids, nats_pids = [p.pid for p in procs], [nats.pid(i) for i in range(nats.size)]
        c0, n0, t0 = sum(map(_cpu_s, pids)), sum(map(_cpu_s, nats_pids)), time.monotonic()
        pending = []
        for i in range(per_round, len(reqs)):
            pending += [logs[k].publish_async(records[k][i], f"rest-{i}") for k in range(3)]
            if len(pending) > 12:  # at most four requests' records in flight
                for f in pending[:-6]:
                    wait_future(f, 30, "publish")
                pending = pending[-6:]
            time.sleep(max(0.0, t0 + (i - per_round + 1) / rate - time.monotonic()))
        for f in pending:
            wait_future(f, 30, "publish")
        command(len(reqs), 2)
        wait_done(2)
        elapsed = time.monotonic() - t0
        replicas_cpu, nats_cpu = sum(map(_cpu_s, pids)) - c0, sum(map(_cpu_s, nats_pids)) - n0
        command(0, 3, stop=True)
        for p in procs:
            p.wait(30)
        return {"hosts": hosts, "options": options, "samples": samples, "seconds": round(elapsed, 1),
                "replicas_cpu_s_per_m_samples": round(replicas_cpu * 1e6 / samples, 3),
                "nats_cpu_s_per_m_samples": round(nats_cpu * 1e6 / samples, 3)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for lg in logs:
            lg.close()
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if sys.argv[1:2] == ["--host"]:
        urls, spec, work, control, options = sys.argv[2:7]
        host(json.loads(urls), json.loads(spec), work, control, json.loads(options))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump")
    ap.add_argument("--hosts", choices=("9x1", "3x3"), default="9x1")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--rate", type=float, default=216.0)
    ap.add_argument("--replica-options", default="{}")
    args = ap.parse_args()
    print(json.dumps(run(args.dump, args.hosts, args.rounds, args.rate, json.loads(args.replica_options))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
