"""What the benchmark scripts beside this file share: process CPU from ``/proc``, and a local
cluster's replicas as its querier reports them (``/api/v1/status/cluster``)."""

from __future__ import annotations

import json
import os
import time
import urllib.request


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_shards(http: str) -> list[dict]:
    """Every shard with its replicas' status, from the adapter or querier at ``http`` (HOST:PORT)."""
    with urllib.request.urlopen(f"http://{http}/api/v1/status/cluster", timeout=30) as r:
        return json.loads(r.read())["data"]["shards"]


def wait_caught_up(http: str, through: int | None = None) -> float:
    """Waits until every replica has applied everything its stream holds (``through``: at least
    that sequence); returns the seconds waited."""
    t0 = time.monotonic()
    while not all(rep.get("lag") == 0 and rep.get("applied_seq") == rep.get("stream_last_seq")
                  and (through is None or rep["applied_seq"] >= through)
                  for s in cluster_shards(http) for rep in s["replicas"]):
        time.sleep(0.2)
    return time.monotonic() - t0
