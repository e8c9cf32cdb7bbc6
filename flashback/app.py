"""Wiring of ``flashback up``: every component in one process, on one HTTP port."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from adapter.remote_read import RemoteReadHandler
from adapter.remote_write import RemoteWriteHandler
from compactor.compactor import Compactor
from compactor.downsample import Downsampler
from compactor.retention import RetentionKeeper, RetentionMetrics, RetentionOptions
from flashback.config import Options
from querier.api import QueryAPI, ServerInfo
from querier.engine import Engine
from querier.frontend import AllChanges, BlockChanges, HeadChanges, QueryFrontend
from querier.tiered import BucketBlocks, TieredQuerier
from store import warmup
from store.block import BlockCaches
from store.cache import CacheMetrics
from store.bucket import MetricsBucket, RetryingBucket, bucket_from_config
from store.db import DB
from store.httpserver import HTTPServer, Request, Response, Router

log = logging.getLogger(__name__)


class App:
    """The all-in-one server. ``start`` serves; ``close`` checkpoints and stops."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.registry = CollectorRegistry()
        self._ready = False
        os.makedirs(options.data_dir, exist_ok=True)
        self.db = DB.open(options.data_dir, options.db, registry=self.registry)
        self.bucket = MetricsBucket(RetryingBucket(bucket_from_config(options.bucket_config())), self.registry)
        cache_metrics = CacheMetrics(self.registry)
        q = options.query
        blocks = BucketBlocks(self.bucket, caches=BlockCaches(q.index_cache_bytes, q.chunks_cache_bytes, cache_metrics,
                                                              q.metadata_cache_bytes))

        def querier() -> TieredQuerier:
            return TieredQuerier(self.db.head, blocks)

        self.compactor: Compactor | None = None
        self.retention: RetentionKeeper | None = None
        self._stop = threading.Event()
        self._retention_thread: threading.Thread | None = None
        if options.compactor.enabled and options.compactor.retention_ms:
            self.retention = RetentionKeeper(self.bucket, RetentionOptions(
                dict(options.compactor.retention_ms), delete_delay_s=options.compactor.delete_delay_s),
                metrics=RetentionMetrics(self.registry))
        if options.compactor.enabled:
            downsampler = (Downsampler(self.bucket, min_span_1h_ms=options.compactor.min_span_1h_ms,
                                       registry=self.registry) if options.compactor.downsampling else None)
            self.compactor = Compactor(self.db.head, self.bucket, window_ms=options.compactor.window_ms,
                                       grace_ms=options.compactor.grace_ms, levels=options.compactor.levels,
                                       on_persisted=self.db.persisted,
                                       registry=self.registry, downsampler=downsampler)
        router = Router()
        RemoteWriteHandler(self.db.append, max_body_bytes=options.max_body_bytes).route(router)
        RemoteReadHandler(querier, registry=self.registry).route(router)
        engine = Engine(lookback_delta_ms=options.query.lookback_delta_ms, max_samples=options.query.max_samples,
                        timeout_s=options.query.timeout_s,
                        # Prometheus 3's server default (the promql-delayed-name-removal flag off).
                        delayed_name_removal=False)
        info = ServerInfo(config_yaml=yaml.safe_dump(dataclasses.asdict(options), sort_keys=False),
                          flags={"listen": f"{options.listen_host}:{options.listen_port}",
                                 "data-dir": options.data_dir},
                          start_time=time.time(), cwd=os.getcwd(),
                          tsdb_stats=lambda limit: self.db.head.tsdb_stats(limit))
        frontend = QueryFrontend(
            engine, changes=AllChanges([HeadChanges(self.db.head.changes), BlockChanges(blocks.live)]),
            split_interval_ms=q.split_interval_ms, cache_bytes=q.results_cache_bytes,
            max_concurrency=q.max_concurrency, align_queries_with_step=q.align_queries_with_step,
            registry=self.registry, cache_metrics=cache_metrics)
        router.include(QueryAPI(querier, engine, time.time, info, frontend).router())
        router.route("/metrics", self._metrics, name="metrics")
        router.route("/-/healthy", lambda _: Response(200, b"Flashback is Healthy.\n"), ("GET", "HEAD"),
                     name="healthy")
        router.route("/-/ready", self._readiness, ("GET", "HEAD"), name="ready")
        self.server = HTTPServer(router, options.listen_host, options.listen_port, self.registry)

    def _retention_loop(self) -> None:
        """Retention beside the compactor, at its interval (failures are logged and retried)."""
        while not self._stop.wait(self.options.compactor.interval_s):
            try:
                self.retention.run(int(time.time() * 1000))
            except Exception:
                log.exception("retention run failed")

    def _metrics(self, _: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def _readiness(self, _: Request) -> Response:
        if self._ready:
            return Response(200, b"Flashback is Ready.\n")
        return Response(503, b"Service Unavailable\n")

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> None:
        warmup.ingest_kernels()  # before the first write, not during it
        self.db.start()
        if self.compactor is not None:
            self.compactor.start(self.options.compactor.interval_s)
        if self.retention is not None:
            self._retention_thread = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
            self._retention_thread.start()
        self.server.start()
        self._ready = True
        host, port = self.address
        log.info("listening", extra={"address": f"{host}:{port}", "data_dir": self.options.data_dir})

    def close(self) -> None:
        self._ready = False
        self.server.close()
        self._stop.set()
        if self._retention_thread is not None:
            self._retention_thread.join()
        if self.compactor is not None:
            self.compactor.close()
        self.db.close()
        self.bucket.close()
