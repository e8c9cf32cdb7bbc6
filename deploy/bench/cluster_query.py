"""Dashboard query load on a local cluster's querier, over data still in the head replicas.

    python3 deploy/bench/cluster_query.py DUMP_DIR [--duration 20] [--concurrency 2]

Starts a 3-shard x 3-replica local cluster (``flashback cluster up``'s LocalCluster), replays a
``../shared/bench/rwload.py`` dump into its adapter, waits until every replica applied
everything, then runs ``../shared/bench/qload.py`` (Grafana-like range queries over the data's
last hour, one untimed warm-up pass) against the querier and prints qload's summary line.

Measured on the 2-core box (session of 2026-11-30, seventh) with ``/tmp/bench/dump-3060`` (3060
requests, 100 k series), 20 s at concurrency 2. The last hour is in the heads:

    querier's results cache                       queries/s   p50 ms   p99 ms
    only before the persisted watermark (0389555)      17.7     51.3    903.9
    by the replicas' log sequences (b2efba9)           51.9     30.8    109.8
      asking one replica per shard, not all (5ed3aa2)     64.5     22.5    129.8
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchlib import wait_caught_up  # noqa: E402 (beside this script)

BENCH = os.environ.get("BENCH", os.path.join(os.path.dirname(ROOT), "shared", "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    from flashback.launcher import LocalCluster

    work = tempfile.mkdtemp(prefix="fb-cluster-query-")
    cluster = LocalCluster(os.path.join(work, "cluster"), shards=3, replicas=3)
    cluster.start(timeout=300)
    try:
        subprocess.run([sys.executable, os.path.join(BENCH, "rwload.py"), "--url", cluster.write_url,
                        "--replay", args.dump], check=True, capture_output=True)
        querier = cluster.processes["querier"].http
        wait_caught_up(querier)
        p = subprocess.run([sys.executable, os.path.join(BENCH, "qload.py"), "--url", f"http://{querier}",
                            "--meta", os.path.join(os.path.abspath(args.dump), "meta.json"),
                            "--duration", str(args.duration), "--concurrency", str(args.concurrency)],
                           capture_output=True, text=True, cwd=BENCH, check=True)
        print(p.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
