"""Cluster mode: each role in its own process (``flashback adapter|store|querier|compactor``).

Every role reads the same topology file, serves ``/metrics``, ``/-/healthy`` and ``/-/ready``
on ``--listen`` and stops cleanly on SIGTERM. The wiring only: the parts live in store/
(``replica``, ``headrpc``, ``natslog``), adapter/ (``sharded_write``), querier/ (``cluster``,
``tiered``, ``api``) and compactor/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flashback.config import parse_bytes, parse_duration_ms
from store.httpserver import HTTPServer, Request, Response, Router
from store.topology import Topology, TopologyError
from store.topology import load as _load_topology

log = logging.getLogger(__name__)


def load_topology(path: str) -> Topology:
    """The topology file, or exit with its error (status 2) instead of a traceback."""
    try:
        return _load_topology(path)
    except TopologyError as e:
        raise SystemExit(f"flashback: {e}") from None


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise SystemExit(f"flashback: {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class Role:
    """The HTTP side every role has; ``ready`` decides ``/-/ready``."""

    def __init__(self, name: str, listen: str, registry: CollectorRegistry, router: Router,
                 ready: Callable[[], bool]) -> None:
        self.name = name
        self.registry = registry
        self._ready = ready
        router.route("/metrics", lambda _: Response(200, generate_latest(registry), CONTENT_TYPE_LATEST),
                     name="metrics")
        router.route("/-/healthy", lambda _: Response(200, f"Flashback {name} is Healthy.\n".encode()),
                     ("GET", "HEAD"), name="healthy")
        router.route("/-/ready", self._readiness, ("GET", "HEAD"), name="ready")
        host, port = _hostport(listen)
        self.server = HTTPServer(router, host, port, registry)

    def _readiness(self, _: Request) -> Response:
        if self._ready():
            return Response(200, f"Flashback {self.name} is Ready.\n".encode())
        return Response(503, b"Service Unavailable\n")


def _serve(role: Role, close: Callable[[], None]) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    role.server.start()
    host, port = role.server.address
    log.info("listening", extra={"role": role.name, "address": f"{host}:{port}"})
    stop.wait()
    role.server.close()
    close()
    return 0


def _replica_clients(topology: Topology, timeout_s: float):
    from querier.cluster import ShardReplicas
    from store.headrpc import RemoteHead

    return [ShardReplicas(s.name, [(r.name, RemoteHead(r.grpc, timeout_s=timeout_s)) for r in s.replicas])
            for s in topology.shards]


def _status_route(router: Router, shards, pool: ThreadPoolExecutor) -> None:
    from querier.cluster import cluster_status

    def handler(_: Request) -> Response:
        body = json.dumps({"status": "success", "data": {"shards": cluster_status(shards, pool)}})
        return Response(200, body.encode(), "application/json")

    router.route("/api/v1/status/cluster", handler, ("GET",), name="status_cluster")


def cmd_store(args: argparse.Namespace) -> int:
    from store.head import HeadOptions
    from store.headrpc import HeadService, peer_checkpoint
    from store.errors import LogUnavailable, ReplicaUnavailable
    from store import warmup
    from store.replica import HeadReplica

    topology = load_topology(args.topology)
    shard = topology.shard(args.shard)
    me = shard.replica(args.replica)
    args.listen = args.listen or me.http
    args.grpc_listen = args.grpc_listen or me.grpc
    peers = [(r.name, r.grpc) for r in shard.replicas if r.name != args.replica]
    warmup.ingest_kernels()
    registry = CollectorRegistry()
    deadline = time.monotonic() + args.start_timeout
    while True:  # NATS may be electing a leader or restarting: keep trying, as a supervisor would
        try:
            replica = HeadReplica(list(topology.nats), shard.stream, args.replica, args.data_dir,
                                  head_options=HeadOptions(chunk_range_ms=args.chunk_range_ms),
                                  retention_ms=args.retention_ms, stream_replicas=topology.stream_replicas,
                                  peers=[r.name for r in shard.replicas],
                                  checkpoint_interval_s=args.checkpoint_interval_s, registry=registry,
                                  peer_checkpoint=lambda need: peer_checkpoint(peers, need))
            break
        except (LogUnavailable, ReplicaUnavailable, TimeoutError, OSError) as e:  # a peer lost mid-checkpoint too
            if time.monotonic() > deadline:
                raise
            log.warning("log not reachable yet, retrying", extra={"err": f"{type(e).__name__}: {e}"})
            registry = CollectorRegistry()  # the failed attempt registered its metrics
            time.sleep(1)
    service = HeadService(replica.head, lambda: dict(replica.status(), shard=shard.name), address=args.grpc_listen,
                          ready=lambda: replica.ready, registry=registry, checkpoint=replica.serve_checkpoint,
                          changes=replica.changes)
    service.start()
    role = Role(f"store {shard.name}/{args.replica}", args.listen, registry, Router(), lambda: replica.ready)

    def close() -> None:
        service.close()
        replica.close()

    return _serve(role, close)


def cmd_adapter(args: argparse.Namespace) -> int:
    from adapter.sharded_write import ShardedWriteHandler
    from store.natslog import NatsConnection, NatsLog

    topology = load_topology(args.topology)
    registry = CollectorRegistry()
    # One connection for all shards: a request's parts then wake one event loop, not one per shard.
    connection = NatsConnection(list(topology.nats), "adapter")
    logs = [NatsLog(list(topology.nats), s.stream, replicas=topology.stream_replicas, registry=None,
                    connection=connection) for s in topology.shards]
    router = Router()
    handler = ShardedWriteHandler(topology, logs, max_body_bytes=args.max_body_bytes, registry=registry)
    handler.warm_up()
    handler.route(router)
    pool = ThreadPoolExecutor(8)
    shards = _replica_clients(topology, timeout_s=2.0)
    _status_route(router, shards, pool)
    role = Role("adapter", args.listen, registry, router, lambda: True)

    def close() -> None:
        for lg in logs:
            lg.close()
        connection.close()
        pool.shutdown()

    return _serve(role, close)


def cmd_querier(args: argparse.Namespace) -> int:
    from adapter.remote_read import RemoteReadHandler
    from querier.api import QueryAPI, ServerInfo
    from querier.cluster import PersistedHeads, ReplicaChanges, ShardedQuerier
    from querier.engine import Engine
    from querier.frontend import AllChanges, BlockChanges, QueryFrontend
    from querier.tiered import BucketBlocks, TieredQuerier
    from store.block import BlockCaches
    from store.bucket import MetricsBucket, RetryingBucket, bucket_from_config
    from store.cache import CacheMetrics

    topology = load_topology(args.topology)
    registry = CollectorRegistry()
    cache_metrics = CacheMetrics(registry)
    pool = ThreadPoolExecutor(16)
    shards = _replica_clients(topology, timeout_s=args.replica_timeout)
    blocks = None
    bucket = None
    if args.objstore_config_file:
        with open(args.objstore_config_file) as f:
            bucket = MetricsBucket(RetryingBucket(bucket_from_config(f.read())), registry)
        blocks = BucketBlocks(bucket, refresh_s=args.sync_block_s, caches=BlockCaches(metrics=cache_metrics))

    def querier():
        heads = ShardedQuerier(shards, pool)
        return TieredQuerier(heads, blocks) if blocks is not None else heads

    router = Router()
    RemoteReadHandler(querier, registry=registry).route(router)
    engine = Engine(lookback_delta_ms=args.lookback_delta_ms, delayed_name_removal=False)
    info = ServerInfo(config_yaml=open(args.topology).read(), flags={"topology": args.topology, "listen": args.listen},
                      start_time=time.time(), cwd=os.getcwd())
    # The heads live in other processes: answers are kept while no record of the shards' logs
    # wrote into the ranges they read (every replica answers by log sequence), ranges before the
    # persisted watermark while the bucket's blocks there stay the same (querier/cluster.py
    # ReplicaChanges and PersistedHeads, querier/frontend.py).
    feeds = [ReplicaChanges(shards, pool, PersistedHeads(shards, pool))]
    if blocks is not None:
        feeds.append(BlockChanges(blocks.live))
    frontend = QueryFrontend(engine, changes=AllChanges(feeds), cache_bytes=args.results_cache_bytes,
                             registry=registry, cache_metrics=cache_metrics)
    router.include(QueryAPI(querier, engine, time.time, info, frontend).router())
    _status_route(router, shards, pool)
    role = Role("querier", args.listen, registry, router, lambda: True)

    def close() -> None:
        pool.shutdown()
        if bucket is not None:
            bucket.close()

    return _serve(role, close)


def cmd_compactor(args: argparse.Namespace) -> int:
    from compactor.compactor import Compactor
    from compactor.downsample import Downsampler
    from querier.cluster import ShardedQuerier
    from store.bucket import MetricsBucket, RetryingBucket, bucket_from_config
    from store.db import encode_persisted
    from store.natslog import NatsLog

    topology = load_topology(args.topology)
    shard = topology.shard(args.shard)
    registry = CollectorRegistry()
    pool = ThreadPoolExecutor(2)
    (replicas,) = [s for s in _replica_clients(topology, timeout_s=60.0) if s.name == shard.name]
    with open(args.objstore_config_file) as f:
        bucket = MetricsBucket(RetryingBucket(bucket_from_config(f.read())), registry)
    os.makedirs(args.data_dir, exist_ok=True)
    shard_log = NatsLog(list(topology.nats), shard.stream, replicas=topology.stream_replicas)

    def persisted(through_ms: int) -> None:
        # Through the shard's log, so every replica moves its min-valid time at the same position.
        shard_log.append(encode_persisted(through_ms), msg_id=f"persisted-{through_ms}")

    levels = tuple(args.levels)
    downsampler = Downsampler(bucket, external_labels={"shard": shard.name}, registry=registry, tmp_dir=args.data_dir,
                              min_span_1h_ms=args.window_ms * levels[1] if len(levels) > 1 else None)
    compactor = Compactor(ShardedQuerier([replicas], pool), bucket, window_ms=args.window_ms, grace_ms=args.grace_ms,
                          external_labels={"shard": shard.name}, levels=args.levels, on_persisted=persisted,
                          registry=registry, tmp_dir=args.data_dir, downsampler=downsampler)
    compactor.start(args.interval_s)
    role = Role(f"compactor {shard.name}", args.listen, registry, Router(), lambda: True)

    def close() -> None:
        compactor.close()
        shard_log.close()
        pool.shutdown()
        bucket.close()

    return _serve(role, close)


def configure(sub: argparse._SubParsersAction) -> None:
    """Adds the role subcommands and ``cluster up`` to the ``flashback`` parser."""

    def duration(v: str) -> int:
        try:
            return parse_duration_ms(v, "duration")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def positive_duration(v: str) -> int:
        ms = duration(v)
        if ms <= 0:
            raise argparse.ArgumentTypeError(f"{v!r}: must be positive")
        return ms

    def size(v: str) -> int:
        try:
            return parse_bytes(v, "size")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def levels(v: str) -> tuple[int, ...]:
        try:
            out = tuple(int(x) for x in v.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a comma-separated list of window counts") from None
        if out[0] != 1 or any(b <= a or b % a for a, b in zip(out, out[1:])):
            raise argparse.ArgumentTypeError(f"{v!r}: window counts start with 1, each a multiple of the one before")
        return out

    def common(p: argparse.ArgumentParser, api: str = "", listen_default: str | None = None) -> None:
        p.add_argument("--topology", required=True, help="cluster topology file (store/docs/format/topology.md)")
        p.add_argument("--listen", required=listen_default is None,
                       help=f"HOST:PORT of {api}/metrics, /-/healthy and /-/ready"
                            + (f" (default: {listen_default})" if listen_default else ""))

    st = sub.add_parser("store", help="run one head replica of a shard (cluster mode)")
    common(st, listen_default="the replica's http address in the topology")
    st.add_argument("--shard", required=True)
    st.add_argument("--replica", required=True, help="this replica's name in the topology")
    st.add_argument("--data-dir", required=True, help="where the replica keeps its head checkpoints")
    st.add_argument("--grpc-listen", help="HOST:PORT of the head gRPC service (default: the replica's grpc "
                                          "address in the topology)")
    # Replicas of a shard apply the same records the same way only with the same head settings.
    st.add_argument("--head.chunk-range", dest="chunk_range_ms", type=positive_duration, default=2 * 3600_000,
                    help="time range of a head chunk (default 2h; the same on every replica of a shard)")
    st.add_argument("--head.retention", dest="retention_ms", type=positive_duration, default=28 * 3600_000,
                    help="persisted data stays in the head until it is this old by the log's clock "
                         "(default 28h; the same on every replica of a shard)")
    st.add_argument("--checkpoint-interval", dest="checkpoint_interval_s", type=lambda v: positive_duration(v) / 1000,
                    default=300.0, help="how often the head is checkpointed, after which the shard's log is purged "
                                        "below the lowest checkpoint of its replicas (default 5m, as the single "
                                        "node's wal.checkpoint_interval)")
    st.add_argument("--start-timeout", type=float, default=300.0,
                    help="seconds to keep retrying while NATS cannot be reached at start")
    st.set_defaults(func=cmd_store)

    ad = sub.add_parser("adapter", help="run a remote-write adapter (cluster mode)")
    common(ad, "/api/v1/write, /api/v1/status/cluster, ")
    ad.add_argument("--max-body-bytes", type=int, default=32 << 20)
    ad.set_defaults(func=cmd_adapter)

    qu = sub.add_parser("querier", help="run a querier: Prometheus API and remote read (cluster mode)")
    common(qu, "the Prometheus API, /api/v1/read, ")
    qu.add_argument("--objstore.config-file", dest="objstore_config_file", help="bucket (Thanos objstore YAML)")
    qu.add_argument("--lookback-delta", dest="lookback_delta_ms", type=duration, default=300_000)
    qu.add_argument("--replica-timeout", type=float, default=10.0, help="seconds before trying another replica")
    qu.add_argument("--sync-block-duration", dest="sync_block_s", type=lambda v: duration(v) / 1000, default=30.0,
                    help="how often the bucket's list of blocks is refreshed (default 30s)")
    qu.add_argument("--query.results-cache-size", dest="results_cache_bytes", default=256 << 20, type=size,
                    help="bytes of cached range-query answers (default 256MiB; 0 turns the cache off)")
    qu.set_defaults(func=cmd_querier)

    co = sub.add_parser("compactor", help="run the compactor of one shard (cluster mode)")
    common(co)
    co.add_argument("--shard", required=True)
    co.add_argument("--objstore.config-file", dest="objstore_config_file", required=True)
    co.add_argument("--data-dir", required=True, help="scratch space for blocks being written")
    co.add_argument("--window", dest="window_ms", type=duration, default=28 * 3600_000)
    co.add_argument("--grace", dest="grace_ms", type=duration, default=3600_000)
    co.add_argument("--interval", dest="interval_s", type=lambda v: duration(v) / 1000, default=60.0)
    co.add_argument("--levels", type=levels, default=(1, 6, 24),
                    help="windows per block at each compaction level, comma-separated (default 1,6,24)")
    co.set_defaults(func=cmd_compactor)

    cl = sub.add_parser("cluster", help="run a whole cluster on loopback (developers, tests)")
    clsub = cl.add_subparsers(dest="cluster_command", required=True)
    up = clsub.add_parser("up", help="start NATS, head replicas, adapter, querier and compactors")
    up.add_argument("--dir", default="./cluster", help="directory for data, logs and the topology")
    up.add_argument("--shards", type=int, default=3, help="number of shards (default 3)")
    up.add_argument("--replicas", type=int, default=3, help="head replicas per shard (default 3)")
    up.add_argument("--adapter-listen", default="127.0.0.1:9201",
                    help="HOST:PORT of the adapter, Prometheus' remote_write URL (default 127.0.0.1:9201, "
                         "as flashback up)")
    up.add_argument("--querier-listen", default="127.0.0.1:9202",
                    help="HOST:PORT of the querier, Grafana's data source and remote_read (default 127.0.0.1:9202)")
    up.add_argument("--no-restart", action="store_true",
                    help="leave a process that exits down (by default it is restarted, as Kubernetes would)")

    def cluster_up(a: argparse.Namespace) -> int:
        from flashback.launcher import run

        return run(a)

    up.set_defaults(func=cluster_up)
