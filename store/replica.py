"""A head replica of cluster mode: a ``Head`` fed by its shard's NATS JetStream stream.

Every replica of a shard reads the same stream through its own durable consumer and
applies each record in stream order exactly as ``store.db`` applies its local WAL
(``decode_record`` -> snappy -> ``writerequest.decode`` -> ``Head.append`` with the
writer's clock from the record), or, for the adapter's columns records
(``store.shardrecord``), with the request read from the record's columns. ``Head.append`` is deterministic given the head and
``now_ms``, so replicas that applied the same sequences hold the same data, the same
rejections included.

Lifecycle:

1. Open the replica's own RocksDB under ``data_dir`` (a ``RocksLog`` used purely as a
   checkpoint store) and load the head checkpoint with the last applied stream
   sequence ``S``.
2. Create the stream if it does not exist yet, and check that the checkpoint fits it
   (same stream, ``S`` not beyond the stream's last sequence).
3. Create the durable consumer ``<stream>-<replica>`` at ``S + 1``, deleting an older
   one first (JetStream cannot move a consumer's start). If the stream no longer holds
   ``S + 1`` the replica raises ``LogTruncated``: it never skips records.
4. An apply thread fetches and applies records; a watcher thread polls the stream's last
   sequence for ``lag`` and ``ready``; a checkpoint thread saves head and ``S``
   atomically every ``checkpoint_interval_s``, then records ``S`` in the JetStream KV
   bucket ``flashback-checkpoints`` and purges the stream below the lowest checkpoint of
   the shard's replicas once every one of them has recorded one.

Head retention, deterministically: a compactor's *persisted* record (``store.db``) moves the
head's minimum valid time at its log position. Like the single node's
``DB.truncate_expired``, a replica then drops persisted data once it is older than
``retention_ms`` -- but with the clock of the log instead of its own: after applying any
record, ``before = min(persisted_through, writer's clock of the newest write record -
retention_ms)``, rounded down to the head's chunk range, and whenever that passes the last
truncation the head is truncated there and a checkpoint is taken soon after. Every replica
sees the same records in the same order, so they truncate at the same log position and stay
identical; the three values involved are saved with each checkpoint, so a restarted replica
continues exactly where its peers are.

Checkpoint contents and the KV entries are documented in ``store/docs/format/replica.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import cramjam
import nats.js.errors
from nats.js import api
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from store import shardrecord, writerequest
from store.db import DBOptions, decode_record, persisted_through
from store.errors import CheckpointMismatch, DecodeError, LogTruncated, LogUnavailable, UnsupportedVersion, WALError
from store.head import Head, HeadOptions, truncation_point
from store.natslog import _STREAM_NAME_IN_USE, NatsConsumer, StreamState, NatsConnection, default_subject
from store.wal import RocksLog

log = logging.getLogger(__name__)

CHECKPOINT_BUCKET = "flashback-checkpoints"
META_KEY = b"r"  # the replica's item in a checkpoint, beside the head's items
META_VERSION = 2  # 1: stream and replica names only
INT64_MIN = -(2**63)
MARK_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def consumer_name(stream: str, replica: str) -> str:
    """The durable consumer of ``replica`` on ``stream``: ``<stream>-<replica>``."""
    return f"{stream}-{replica}"


def mark_key(stream: str, replica: str) -> str:
    """The KV key of a replica's checkpoint sequence: ``<stream>.<replica>``."""
    return f"{stream}.{replica}"


@dataclass(frozen=True, slots=True)
class ReplicaMeta:
    """The replica's own item of a checkpoint (``store/docs/format/replica.md``).

    ``persisted_through_ms``: the head's minimum valid time (the newest persisted watermark
    applied); ``clock_ms``: the writer's clock of the newest write record applied;
    ``truncated_before_ms``: where the head was last truncated. All three are the minimum
    int64 when unknown (version 1 items, or nothing applied yet).
    """

    stream: str
    replica: str
    persisted_through_ms: int = INT64_MIN
    clock_ms: int = INT64_MIN
    truncated_before_ms: int = INT64_MIN


def encode_meta(meta: ReplicaMeta) -> bytes:
    s, r = meta.stream.encode(), meta.replica.encode()
    return (struct.pack("<BH", META_VERSION, len(s)) + s + struct.pack("<H", len(r)) + r
            + struct.pack("<qqq", meta.persisted_through_ms, meta.clock_ms, meta.truncated_before_ms))


def decode_meta(value: bytes) -> ReplicaMeta:
    """The replica item of a checkpoint, version 1 or 2."""
    try:
        if value[0] not in (1, META_VERSION):
            raise UnsupportedVersion(f"replica checkpoint meta version {value[0]} (this reader knows 1 and "
                                     f"{META_VERSION})")
        (n,) = struct.unpack_from("<H", value, 1)
        stream = value[3:3 + n].decode()
        (m,) = struct.unpack_from("<H", value, 3 + n)
        replica = value[5 + n:5 + n + m].decode()
        p = 5 + n + m
        times: tuple[int, ...] = ()
        if value[0] >= 2:
            times = struct.unpack_from("<qqq", value, p)
            p += 24
        if p != len(value):
            raise ValueError(f"{len(value) - p} trailing bytes" if p < len(value) else "truncated")
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, UnsupportedVersion):
            raise
        raise DecodeError(f"replica checkpoint meta item of {len(value)} bytes: {e}") from e
    return ReplicaMeta(stream, replica, *times)


def encode_mark(seq: int, time_ms: int) -> bytes:
    return json.dumps({"version": MARK_VERSION, "seq": seq, "time_ms": time_ms}, separators=(",", ":")).encode()


def decode_mark(value: bytes) -> int:
    """The checkpoint sequence of a KV entry."""
    try:
        doc = json.loads(value)
        version, seq = doc["version"], doc["seq"]
    except (ValueError, KeyError, TypeError) as e:
        raise DecodeError(f"checkpoint mark {value[:100]!r}: {e}") from e
    if version != MARK_VERSION:
        raise UnsupportedVersion(f"checkpoint mark version {version} (this reader knows {MARK_VERSION})")
    if not isinstance(seq, int) or seq < 0:
        raise DecodeError(f"checkpoint mark {value[:100]!r}: seq is not a non-negative integer")
    return seq


class CheckpointMarks:
    """Each replica's newest checkpoint sequence, in a JetStream key/value bucket shared by all shards.

    Keys are ``mark_key(stream, replica)``, values ``encode_mark``. The bucket is created on
    first use (``replicas`` copies, history 1). Thread-safe; every call is bounded by
    ``timeout_s`` and raises ``LogUnavailable`` when NATS does not answer in time.
    """

    def __init__(self, client: NatsConnection, bucket: str = CHECKPOINT_BUCKET, *, replicas: int = 3,
                 timeout_s: float = 10.0) -> None:
        self._client = client
        self.bucket = bucket
        self._replicas = replicas
        self._timeout_s = timeout_s
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is not None:
            return self._kv
        js = self._client.js
        try:
            self._kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = api.KeyValueConfig(bucket=self.bucket, history=1, replicas=self._replicas,
                                        storage=api.StorageType.FILE)
            try:
                self._kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError as e:
                if e.err_code != _STREAM_NAME_IN_USE:  # another replica created it meanwhile
                    raise
                self._kv = await js.key_value(self.bucket)
        return self._kv

    def _run(self, fn: Callable[[], Any], what: str) -> Any:
        c = self._client
        return c.run(c.retry(fn, time.monotonic() + self._timeout_s, self._timeout_s, what), self._timeout_s + 1, what)

    def put(self, stream: str, replica: str, seq: int, time_ms: int) -> None:
        async def put() -> None:
            await (await self._bucket()).put(mark_key(stream, replica), encode_mark(seq, time_ms))

        self._run(put, f"record checkpoint {seq} of replica {replica} of stream {stream} in KV {self.bucket}")

    def get(self, stream: str, replica: str) -> int | None:
        """The recorded checkpoint sequence of ``replica``, ``None`` if it never recorded one."""
        async def get() -> bytes | None:
            try:
                entry = await (await self._bucket()).get(mark_key(stream, replica))
            except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is a subclass
                return None
            return entry.value

        value = self._run(get, f"read checkpoint of replica {replica} of stream {stream} from KV {self.bucket}")
        return None if value is None else decode_mark(value)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied_seq = Gauge("flashback_replica_applied_sequence", "Stream sequence of the last record "
                                 "applied to the head.", registry=registry)
        self.last_seq = Gauge("flashback_replica_stream_last_sequence", "Newest sequence of the shard's stream, "
                              "as last observed.", registry=registry)
        self.lag = Gauge("flashback_replica_lag_records", "Records in the stream not yet applied (last observed "
                         "stream sequence minus the applied sequence).", registry=registry)
        self.ready = Gauge("flashback_replica_ready", "1 once the replica has caught up with its stream after "
                           "starting (and has not stopped on an error).", registry=registry)
        self.records = Counter("flashback_replica_records_applied_total", "Stream records applied to the head.",
                               registry=registry)
        self.samples = Counter("flashback_replica_samples_applied_total", "Samples in the applied records, "
                               "appended or rejected by the head.", registry=registry)
        self.bootstraps = Counter("flashback_replica_bootstraps_total", "Starts that replaced a checkpoint older "
                                  "than the stream's first record by a peer's.", registry=registry)
        self.skipped = Counter("flashback_replica_records_skipped_total", "Records whose request does not decode; "
                               "every replica skips them alike.", registry=registry)
        self.fetch_errors = Counter("flashback_replica_fetch_errors_total", "Fetches from the stream that failed "
                                    "and were retried.", registry=registry)
        self.checkpoint = Histogram("flashback_replica_checkpoint_seconds", "Time to save a head checkpoint.",
                                    registry=registry, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.checkpoint_seq = Gauge("flashback_replica_checkpoint_sequence", "Stream sequence of the newest "
                                    "saved checkpoint.", registry=registry)
        self.checkpoint_failures = Counter("flashback_replica_checkpoint_failures_total", "Checkpoints that could "
                                           "not be saved.", registry=registry)
        self.truncations = Counter("flashback_replica_head_truncations_total", "Times the head dropped persisted "
                                   "data older than the retention (by the log's clock).", registry=registry)
        self.purged_below = Gauge("flashback_replica_purged_below_sequence", "The stream was last purged by this "
                                  "replica below this sequence (the lowest checkpoint of the shard's replicas "
                                  "+ 1).", registry=registry)
        self.restore = Gauge("flashback_replica_restore_seconds", "Time the last start spent loading the "
                             "checkpoint.", registry=registry)
        self.stream_reachable = Gauge("flashback_replica_stream_reachable", "1 while the last poll of the "
                                      "stream's state succeeded, 0 while it fails (all NATS servers down, an "
                                      "election); the replica serves what it applied meanwhile.", registry=registry)
        self.catch_up = Gauge("flashback_replica_catch_up_seconds", "Time from the last start until the replica "
                              "was first caught up (ready).", registry=registry)


class HeadReplica:
    """One head replica of a shard: applies the shard's stream to a ``Head``, checkpoints it.

    Construction restores the checkpoint, (re)creates the durable consumer and starts the
    apply, watcher and checkpoint threads. ``head`` may be queried at any time (it is
    thread-safe); before ``ready`` it holds an older state. All properties and methods are
    thread-safe.

    An idle replica costs little: a fetch waits up to ``FETCH_WAIT_S`` for records (they are
    delivered as soon as they arrive), and the stream is polled every ``poll_interval_s``;
    while records flow, each delivery tells how many follow it, which keeps ``lag`` current
    without polling. (An idle 3x3 cluster with 0.5 s polls and fetch waits used 0.18-0.28 cores,
    0.23 on average over four runs, and 0.15-0.27, 0.19 on average, with these, in alternating
    runs on the shared 2-core box: ``cluster_ingest.py --idle-seconds``.)

    Args:
        servers: NATS client URLs.
        stream: the shard's stream; created like ``NatsLog`` does if it does not exist yet.
        replica_name: this replica's name in the topology (letters, digits, ``-``, ``_``).
        data_dir: the replica's own directory; the checkpoint database is ``data_dir/checkpoint``.
        head_options: options of the head; must be the same on every replica of the shard.
        retention_ms: persisted data stays in the head until it is this old by the log's clock
            (see the module docstring); must be the same on every replica of the shard.
        peers: names of every replica of the shard (this one is added if missing). The stream
            is purged below the lowest of their recorded checkpoints + 1 once all recorded
            one; without peers this replica records its checkpoints but never purges.
        peer_checkpoint: asked on start when the stream no longer holds the records after this
            replica's checkpoint (its disk was lost, or it is new to a shard whose stream was
            purged): called with the lowest sequence it could continue from, it returns
            ``(peer name, sequence, items)`` of a peer's checkpoint at or above it (see
            ``serve_checkpoint``), or ``None``; that checkpoint then replaces this replica's.
            Without it (or with ``None``), such a start raises ``LogTruncated``.
        stream_replicas: replicas of the stream (if created here) and of the KV bucket.
        checkpoint_interval_s: pause between periodic checkpoints.
        poll_interval_s: how often the stream's last sequence is polled (``lag`` while no
            records come, stall detection, purging).
        fetch_batch: records per fetch.
        fetch_linger_s: after a fetch that returned fewer than ``fetch_batch`` records, wait
            this long before the next one, so that a replica keeping up fetches several
            records at a time instead of one: each fetch costs pull requests on the servers and
            Python work here (measured with one shard at 150 records/s and 3 replicas, NATS
            servers' CPU per million samples: no replicas 1.8 s, linger 0 3.9 s, 20 ms 2.8 s,
            100 ms 2.1 s; at 3 shards x 3 replicas, 250 ms took the replicas' own CPU from 4.0-4.1
            to 3.7 s per million samples against 100 ms). It delays what queries see by as much,
            next to the seconds that Prometheus' remote write batches samples for; a replica
            that is behind fetches full batches without lingering.
        timeout_s: bound of every control call to NATS (create, state, KV, purge).
        stall_timeout_s: a consumer that delivers nothing this long while the stream holds
            unapplied records is recreated after the last applied record (its NATS server
            failed: consumers live in memory on one server, ``store.natslog``).
        checkpoint_bucket: the KV bucket holding the checkpoint sequences.
        registry: where the ``flashback_replica_*`` and ``flashback_head_*`` metrics go; kept
            private if ``None``.
        now: the clock (seconds), for the time recorded with a checkpoint mark.

    Raises:
        LogTruncated: the stream no longer holds the records after the checkpoint.
        CheckpointMismatch: the checkpoint belongs to another stream or is ahead of it.
        LogUnavailable: NATS did not answer in time.
        WALError: the checkpoint database could not be opened or read.
    """

    FETCH_WAIT_S = 1.0

    def __init__(self, servers: list[str], stream: str, replica_name: str, data_dir: str, *,
                 head_options: HeadOptions = HeadOptions(), retention_ms: int = DBOptions().retention_ms,
                 peers: Sequence[str] = (), stream_replicas: int = 3,
                 checkpoint_interval_s: float = DBOptions().checkpoint_interval_s, poll_interval_s: float = 2.0,
                 fetch_batch: int = 64,
                 fetch_linger_s: float = 0.25,
                 timeout_s: float = 10.0, stall_timeout_s: float = 5.0, checkpoint_bucket: str = CHECKPOINT_BUCKET,
                 registry: CollectorRegistry | None = None, now: Callable[[], float] = time.time,
                 peer_checkpoint: Callable[[int], tuple[str, int, Iterator[tuple[bytes, bytes]]] | None] | None = None
                 ) -> None:
        for what, name in (("stream", stream), ("replica", replica_name), *(("peer", p) for p in peers)):
            if not _NAME.match(name):
                raise ValueError(f"{what} name {name!r}: letters, digits, '-' and '_' only (1-64)")
        if min(checkpoint_interval_s, poll_interval_s, fetch_batch, timeout_s, stall_timeout_s, retention_ms) <= 0:
            raise ValueError("checkpoint_interval_s, poll_interval_s, fetch_batch, timeout_s, stall_timeout_s and "
                             "retention_ms must be positive")
        self.stream = stream
        self.name = replica_name
        self.data_dir = data_dir
        self.peers = tuple(sorted(set(peers) | {replica_name})) if peers else ()
        self.head_options = head_options
        self.retention_ms = retention_ms
        # The log's clock and the last truncation (see the module docstring), changed with the head.
        self._clock_ms = INT64_MIN
        self._truncated_before = INT64_MIN
        self._checkpoint_due = threading.Event()  # a truncation asks the checkpoint thread for one now
        self._meta: ReplicaMeta | None = None  # the replica item of the loaded checkpoint
        self._checkpoint_bucket = checkpoint_bucket
        self._servers = list(servers)
        self._stream_replicas = stream_replicas
        self._checkpoint_interval_s = checkpoint_interval_s
        self._poll_interval_s = poll_interval_s
        self._fetch_batch = fetch_batch
        self._fetch_linger_s = max(0.0, fetch_linger_s)
        self._timeout_s = timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._now = now
        self._peer_checkpoint = peer_checkpoint
        self._m = _Metrics(registry if registry is not None else CollectorRegistry(auto_describe=False))
        self._apply_lock = threading.Lock()  # head.append and _applied change together
        self._checkpoint_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # asks the watcher to poll the stream now
        self._changed = threading.Condition()  # ready or failed
        self._ready = False
        self._error: BaseException | None = None
        self._closed = False
        self._state: StreamState | None = None
        self._stream_error: str | None = None  # why the last poll of the stream's state failed
        self._last_seen = 0  # the newest stream sequence known to exist (polls and deliveries)
        self._threads: list[threading.Thread] = []
        self._store: RocksLog | None = None
        self._client: NatsConnection | None = None
        self._consumer: NatsConsumer | None = None
        self._started = time.monotonic()
        try:
            self._open(registry)
        except BaseException:
            self._close_resources()
            raise
        for target, name in ((self._apply_loop, "apply"), (self._watch_loop, "watch"),
                             (self._checkpoint_loop, "checkpoint")):
            t = threading.Thread(target=target, name=f"replica {name} {stream}/{replica_name}", daemon=True)
            t.start()
            self._threads.append(t)

    # --- start -------------------------------------------------------------------------------

    def _open(self, registry: CollectorRegistry | None) -> None:
        start = time.monotonic()
        self._store = RocksLog(os.path.join(self.data_dir, "checkpoint"))
        self._client = NatsConnection(self._servers, f"replica {self.stream}/{self.name}", self._timeout_s, 0.25)
        self._marks = CheckpointMarks(self._client, self._checkpoint_bucket, replicas=self._stream_replicas,
                                      timeout_s=self._timeout_s)
        self._ensure_stream()
        state = self.stream_state()
        seq, items = self._store.load_checkpoint()
        if seq < state.first_seq - 1 and seq < state.last_seq and self._peer_checkpoint is not None:
            seq, items = self._bootstrap(seq, state)
        self._head = Head(self.head_options, registry=registry)
        self._head.load_checkpoint(self._head_items(seq, items))
        # The head's change tracker counts in log sequences, as on every replica of the shard;
        # what the records up to the checkpoint changed is not known here (store.changes).
        self._head.changes.floor = seq
        meta = self._meta
        if meta is not None:
            self._head.set_min_valid_time(meta.persisted_through_ms)
            self._clock_ms, self._truncated_before = meta.clock_ms, meta.truncated_before_ms
        self._applied = self._checkpointed = seq
        restore_s = time.monotonic() - start
        self._m.restore.set(restore_s)
        self._m.applied_seq.set(seq)
        self._m.checkpoint_seq.set(seq)
        if seq > state.last_seq:
            raise CheckpointMismatch(
                f"replica {self.name} checkpointed stream {self.stream} at sequence {seq}, but the stream ends at "
                f"{state.last_seq}: the stream was deleted and created again or lost records. Move {self.data_dir} "
                f"away: the replica then starts from a peer's checkpoint (asked for on start), or from the stream if it "
                f"still starts at 1")
        self._consumer = self._open_consumer(seq)
        # Recording the checkpoint now (even 0 for a new replica) keeps peers from purging
        # records this replica still needs.
        self._record_mark(seq)
        log.info("replica restored", extra={"stream": self.stream, "replica": self.name, "checkpoint_seq": seq,
                                            "series": self._head.num_series(), "seconds": round(restore_s, 3),
                                            "stream_last_seq": state.last_seq})

    def _bootstrap(self, seq: int, state: StreamState) -> tuple[int, Iterator[tuple[bytes, bytes]]]:
        """Replaces the local checkpoint (at ``seq``, older than the stream's first record) by a
        peer's that the stream can continue, and returns it loaded: the peer's checkpoint is the
        head after the same records, and a checkpoint names its stream, not its replica."""
        need = state.first_seq - 1
        got = self._peer_checkpoint(need)  # type: ignore[misc]
        if got is None:
            log.warning("replica bootstrap: no peer checkpoint", extra={
                "stream": self.stream, "replica": self.name, "checkpoint_seq": seq, "needed": need})
            return self._store.load_checkpoint()  # type: ignore[union-attr]
        peer, peer_seq, items = got
        if peer_seq < need:
            raise ValueError(f"peer {peer} offered checkpoint {peer_seq}, below the {need} asked for")
        start = time.monotonic()
        checked = self._head_items(peer_seq, items, keep_meta=True, where=f"peer {peer}'s checkpoint")
        self._store.save_checkpoint(peer_seq, checked)  # type: ignore[union-attr]
        self._m.bootstraps.inc()
        log.info("replica bootstrapped from a peer's checkpoint", extra={
            "stream": self.stream, "replica": self.name, "peer": peer, "checkpoint_seq": peer_seq,
            "previous_seq": seq, "stream_first_seq": state.first_seq, "seconds": round(time.monotonic() - start, 3)})
        return self._store.load_checkpoint()  # type: ignore[union-attr]

    def serve_checkpoint(self) -> tuple[int, Iterator[tuple[bytes, bytes]]]:
        """This replica's latest durable checkpoint ``(stream sequence, items)``, for a peer that
        lost its own (``store.headrpc.HeadService``'s ``Checkpoint``); read from a snapshot, so
        checkpoints saved meanwhile do not disturb it."""
        store = self._store
        if store is None:
            raise WALError(f"checkpoint of closed replica {self.name} of stream {self.stream}")
        return store.load_checkpoint()

    def _head_items(self, seq: int, items: Iterable[tuple[bytes, bytes]], keep_meta: bool = False,
                    where: str = "") -> Iterator[tuple[bytes, bytes]]:
        """The head's items of a checkpoint, after checking its meta item names this stream (in
        ``where``'s words); the meta item goes to ``self._meta``, or with ``keep_meta`` is passed on
        with the others (a peer's checkpoint being saved as this replica's)."""
        where = where or f"checkpoint in {self.data_dir}"
        seen_meta = False
        for key, value in items:
            if key == META_KEY:
                meta = decode_meta(value)
                if meta.stream != self.stream:
                    raise CheckpointMismatch(f"{where} (sequence {seq}, replica {meta.replica}) "
                                             f"is of stream {meta.stream}, not {self.stream}")
                seen_meta = True
                if keep_meta:
                    yield key, value
                else:
                    self._meta = meta
                continue
            if not seen_meta and seq > 0 and key > META_KEY:
                raise CheckpointMismatch(f"{where} (sequence {seq}) is not a head replica's: it has no replica item")
            yield key, value
        if seq > 0 and not seen_meta:
            raise CheckpointMismatch(f"{where} (sequence {seq}) is not a head replica's: it has no replica item")

    def _ensure_stream(self) -> None:
        """Creates the stream as ``NatsLog`` would if it does not exist; leaves an existing one alone."""
        c = self._client
        config = api.StreamConfig(
            name=self.stream, subjects=[default_subject(self.stream)], retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE, num_replicas=self._stream_replicas, max_age=0, max_bytes=-1,
            discard=api.DiscardPolicy.OLD, duplicate_window=120)

        async def ensure() -> None:
            try:
                await c.jsm.stream_info(self.stream)
                return
            except nats.js.errors.NotFoundError:
                pass
            try:
                await c.jsm.add_stream(config)
            except nats.js.errors.BadRequestError as e:
                if e.err_code != _STREAM_NAME_IN_USE:  # created by another process meanwhile
                    raise
            # Created here or by a peer just now: done once the stream answers (right after its
            # creation a server may still answer "stream not found").
            raise LogUnavailable(f"stream {self.stream} was just created")

        c.run(c.retry(ensure, time.monotonic() + self._timeout_s, self._timeout_s, f"create stream {self.stream}"),
              self._timeout_s + 1, f"create stream {self.stream}")

    # --- applying ----------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        pause = 0.1
        progress = time.monotonic()  # when a record was last applied, or the consumer (re)created
        while not self._stop.is_set():
            try:
                if self._consumer is None:
                    self._consumer = self._open_consumer(self._applied)
                    progress = time.monotonic()
                batch = self._consumer.fetch(self._fetch_batch, self.FETCH_WAIT_S)
            except LogUnavailable as e:
                # A stream or consumer leader election, or the server we are connected to went
                # away: the client reconnects and the consumer resumes where it was.
                self._m.fetch_errors.inc()
                log.warning("replica fetch", extra={"stream": self.stream, "replica": self.name, "error": str(e)})
                self._stop.wait(pause)
                pause = min(pause * 2, 0.5)
                if self._stalled(progress):
                    self._drop_consumer()
                continue
            except (LogTruncated, DecodeError, UnsupportedVersion) as e:
                self._fail(e)
                return
            except WALError as e:
                # Anything else the servers answered (e.g. the consumer was deleted): start over
                # with a new consumer after the last applied record.
                self._m.fetch_errors.inc()
                log.warning("replica fetch, recreating consumer", extra={
                    "stream": self.stream, "replica": self.name, "error": str(e)})
                self._drop_consumer()
                self._stop.wait(pause)
                pause = min(pause * 2, 0.5)
                continue
            except BaseException as e:
                self._fail(e)
                return
            pause = 0.1
            if not batch:
                if not self._ready:
                    self._wake.set()  # nothing to read: maybe caught up, ask the stream now
                if self._stalled(progress):
                    self._drop_consumer()
                continue
            try:
                for seq, record in batch:
                    self._apply(seq, record)
            except BaseException as e:
                self._fail(e)
                return
            self._observe(batch[-1][0] + self._consumer.pending)
            progress = time.monotonic()
            if len(batch) < self._fetch_batch and self._fetch_linger_s:
                self._stop.wait(self._fetch_linger_s)

    def _stalled(self, progress: float) -> bool:
        """Whether the stream holds records the consumer has not delivered for ``stall_timeout_s``
        (the consumer was lost or is stuck): then a new consumer after the last applied record
        picks them up."""
        if self.lag > 0 and time.monotonic() - progress > self._stall_timeout_s:
            log.warning("replica stalled, recreating consumer", extra={
                "stream": self.stream, "replica": self.name, "applied_seq": self._applied, "lag": self.lag})
            return True
        return False

    def _open_consumer(self, after: int) -> NatsConsumer:
        """The replica's durable consumer, (re)created to start after sequence ``after``."""
        try:
            return NatsConsumer(self._servers, self.stream, consumer_name(self.stream, self.name), after + 1,
                                timeout_s=self._timeout_s, connect_timeout_s=self._timeout_s)
        except LogTruncated as e:
            raise LogTruncated(
                f"replica {self.name} of stream {self.stream} needs records from {after + 1} on (it applied "
                f"through {after}), but they were purged: {e}. It cannot catch up from the stream, and "
                + ("no peer served a checkpoint it could continue from" if self._peer_checkpoint is not None
                   else "it was given no peers to ask for a checkpoint") + ". Start it again once a peer is up, "
                f"or copy a peer's {os.path.basename(self.data_dir)}/checkpoint while that peer is stopped") from e

    def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    def _apply(self, seq: int, record: bytes) -> None:
        through = persisted_through(record)
        if through is not None:  # a compactor's watermark: at the same log position on every replica
            with self._apply_lock:
                self._head.set_min_valid_time(through)
                self._truncate_expired(seq)
                self._applied = seq
            self._m.records.inc()
            self._m.applied_seq.set(seq)
            return
        try:
            if shardrecord.is_columns(record):  # the adapter's decoded columns: nothing to scan
                now_ms, req = shardrecord.decode_record(record)
            else:
                # UnsupportedVersion is not caught: the replica stops, it needs an upgrade.
                now_ms, body = decode_record(record)
                req = writerequest.decode(cramjam.snappy.decompress_raw(body).read())
        except (DecodeError, cramjam.DecompressionError) as e:
            # The same bytes fail the same way on every replica, so skipping keeps them alike.
            self._m.skipped.inc()
            log.error("replica skips record", extra={"stream": self.stream, "replica": self.name, "seq": seq,
                                                     "error": f"{type(e).__name__}: {e}"})
            req = None
        with self._apply_lock:
            if req is not None:
                self._head.append(req, now_ms, change_seq=seq)
                if now_ms > self._clock_ms:
                    self._clock_ms = now_ms
                    self._truncate_expired(seq)
            self._applied = seq
        if req is not None:
            self._m.samples.inc(req.num_samples)
        self._m.records.inc()
        self._m.applied_seq.set(seq)

    def _truncate_expired(self, seq: int) -> None:
        """Drops persisted data older than the retention by the log's clock, at chunk-range
        boundaries (as ``DB.truncate_expired``); called under the apply lock after record ``seq``,
        so every replica does it at the same record."""
        if self._clock_ms == INT64_MIN:
            return
        before = truncation_point(self._head.min_valid_time, self._clock_ms, self.retention_ms,
                                  self.head_options.chunk_range_ms)
        if before <= self._truncated_before:
            return
        start = time.monotonic()
        removed = self._head.truncate(before)
        self._truncated_before = before
        self._m.truncations.inc()
        self._checkpoint_due.set()
        log.info("head truncated", extra={"stream": self.stream, "replica": self.name, "seq": seq,
                                          "before_ms": before, "series_removed": removed,
                                          "seconds": round(time.monotonic() - start, 3)})

    def _fail(self, e: BaseException) -> None:
        log.error("replica stopped applying", extra={"stream": self.stream, "replica": self.name,
                                                     "applied_seq": self._applied,
                                                     "error": f"{type(e).__name__}: {e}"})
        with self._changed:
            self._error = e
            self._m.ready.set(0)
            self._changed.notify_all()

    # --- lag and readiness -------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._wake.wait(self._poll_interval_s)
            self._wake.clear()

    def _poll(self) -> None:
        try:
            state = self.stream_state()
        except Exception as e:  # LogUnavailable during elections; the watcher must not die of anything
            error = f"{type(e).__name__}: {e}"
            if self._stream_error is None:  # once per outage, not once per poll
                log.warning("replica cannot read its stream's state; it serves what it has applied",
                            extra={"stream": self.stream, "replica": self.name, "error": error,
                                   "applied_seq": self._applied})
            self._stream_error = error
            self._m.stream_reachable.set(0)
            return
        if self._stream_error is not None:
            log.info("replica reads its stream's state again", extra={"stream": self.stream, "replica": self.name})
            self._stream_error = None
        self._m.stream_reachable.set(1)
        self._state = state
        self._observe(state.last_seq)

    def _observe(self, last_seq: int) -> None:
        """Takes note that the stream reached ``last_seq`` (polled, or delivered with the number of
        records after it): updates lag, and readiness once everything known is applied."""
        applied = self._applied
        self._last_seen = last_seq = max(self._last_seen, last_seq)
        self._m.last_seq.set(last_seq)
        self._m.lag.set(max(0, last_seq - applied))
        if applied >= last_seq and not self._ready and self._error is None:
            catch_up_s = time.monotonic() - self._started
            self._m.catch_up.set(catch_up_s)
            log.info("replica ready", extra={"stream": self.stream, "replica": self.name, "applied_seq": applied,
                                             "seconds": round(catch_up_s, 3)})
            with self._changed:
                self._ready = True
                self._m.ready.set(1)
                self._changed.notify_all()

    def stream_state(self) -> StreamState:
        """The stream's sequences and leader, asked now. Raises ``LogUnavailable`` if it does not answer."""
        c = self._client
        return c.run(c.stream_state(self.stream, self._timeout_s), self._timeout_s + 1,
                     f"read state of stream {self.stream}")

    # --- checkpoints and purging -------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        while True:
            due = self._checkpoint_due.wait(self._checkpoint_interval_s)
            if self._stop.is_set():
                return
            self._checkpoint_due.clear()
            try:
                self.checkpoint(force=due)
            except Exception:
                log.exception("replica checkpoint", extra={"stream": self.stream, "replica": self.name})

    def checkpoint(self, force: bool = False) -> int:
        """Saves the head and the applied sequence atomically, then records the sequence in
        the KV bucket and purges the stream if every peer has recorded one; returns the sequence.

        Does nothing if nothing was applied since the last checkpoint, unless ``force``. A
        failure to record or purge is logged (the next checkpoint tries again).

        Raises:
            WALError: the checkpoint could not be saved locally.
        """
        with self._checkpoint_lock:
            if self._store is None:
                raise WALError(f"checkpoint of closed replica {self.name} of stream {self.stream}")
            with self._apply_lock:
                seq = self._applied
                items = self._head.checkpoint_items()
                meta = ReplicaMeta(self.stream, self.name, self._head.min_valid_time, self._clock_ms,
                                   self._truncated_before)
            if seq == self._checkpointed and not force:
                return seq
            start = time.monotonic()
            try:
                self._store.save_checkpoint(seq, itertools.chain([(META_KEY, encode_meta(meta))], items))
            except BaseException:
                self._m.checkpoint_failures.inc()
                raise
            took = time.monotonic() - start
            self._checkpointed = seq
        self._m.checkpoint.observe(took)
        self._m.checkpoint_seq.set(seq)
        log.info("replica checkpoint written", extra={"stream": self.stream, "replica": self.name, "seq": seq,
                                                      "seconds": round(took, 3)})
        try:
            self._record_mark(seq)
            self._purge()
        except WALError as e:
            log.warning("replica checkpoint mark or purge", extra={"stream": self.stream, "replica": self.name,
                                                                  "seq": seq, "error": str(e)})
        return seq

    def _record_mark(self, seq: int) -> None:
        self._marks.put(self.stream, self.name, seq, int(self._now() * 1000))

    def _purge(self) -> None:
        """Purges the stream below the lowest recorded checkpoint of the peers + 1, if all have one."""
        if not self.peers:
            return
        marks = {}
        for peer in self.peers:
            m = self._marks.get(self.stream, peer)
            if m is None:
                log.debug("replica purge waits", extra={"stream": self.stream, "replica": self.name, "peer": peer})
                return
            marks[peer] = m
        below = min(marks.values()) + 1
        state = self.stream_state()
        if below <= state.first_seq:
            return
        c = self._client
        c.run(c.purge_below(self.stream, below, self._timeout_s), self._timeout_s + 1,
              f"purge stream {self.stream} below {below}")
        self._m.purged_below.set(below)
        log.info("stream purged", extra={"stream": self.stream, "replica": self.name, "below": below,
                                         "checkpoints": marks})

    # --- state -------------------------------------------------------------------------------

    @property
    def head(self) -> Head:
        """The replica's head, a ``Querier``; thread-safe. It holds all records through
        ``applied_seq``; before ``ready`` that may be older than what the stream holds."""
        return self._head

    @property
    def applied_seq(self) -> int:
        """Stream sequence of the last record applied to the head (0: none)."""
        return self._applied

    @property
    def checkpoint_seq(self) -> int:
        """Stream sequence of the newest saved checkpoint."""
        return self._checkpointed

    @property
    def lag(self) -> int:
        """Records the stream holds beyond ``applied_seq``, as far as known: from the last poll of
        the stream, or from the last delivery (which tells how many records followed it)."""
        return max(0, self._last_seen - self._applied)

    @property
    def ready(self) -> bool:
        """The replica caught up with the stream once since it started (lag 0 observed) and
        has not stopped on an error; it stays ready while it lags behind later."""
        return self._ready and self._error is None

    @property
    def healthy(self) -> bool:
        """The replica is applying (it has not stopped on an error and is not closed)."""
        return self._error is None and not self._closed

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the replica from applying, if any."""
        return self._error

    def wait_ready(self, timeout_s: float) -> bool:
        """Waits until ``ready``; returns False after ``timeout_s``.

        Raises:
            WALError: the replica stopped applying (the error that stopped it).
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self._error is not None:
                    raise self._error
                if self._ready:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    def changes(self, ranges: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """``(applied log sequence, highest log sequence that wrote into any of ranges)``, taken
        together: what a querier keeps cached answers by (``store.headrpc``'s ``Changes``)."""
        with self._apply_lock:
            tracker = self._head.changes
            last = max((tracker.last_change(a, b) for a, b in ranges), default=tracker.floor)
            return self._applied, last

    def status(self) -> dict[str, Any]:
        """The replica's state for the gRPC ``Status`` call and ``/api/v1/status/cluster``."""
        state = self._state
        return {
            "stream": self.stream,
            "replica": self.name,
            "applied_seq": self._applied,
            "checkpoint_seq": self._checkpointed,
            "stream_first_seq": state.first_seq if state else None,
            "stream_last_seq": max(state.last_seq, self._last_seen) if state else None,
            "stream_leader": state.leader if state else None,
            # Set while the stream's state cannot be read (every NATS server down, an election):
            # the replica still serves what it applied, its lag is as last known.
            "stream_error": self._stream_error,
            "lag": self.lag,
            "ready": self.ready,
            "healthy": self.healthy,
            "error": None if self._error is None else f"{type(self._error).__name__}: {self._error}",
            "series": self._head.num_series(),
            # Samples older than this are refused (persisted by the compactor): what a querier's
            # results cache may rely on (querier/cluster.py PersistedHeads).
            "min_valid_time_ms": self._head.min_valid_time,
        }

    # --- closing -----------------------------------------------------------------------------

    def close(self, checkpoint: bool = True) -> None:
        """Stops applying, saves a final checkpoint (unless ``checkpoint`` is False, as after a
        crash) and closes the connections and the database. Idempotent.

        Raises:
            WALError: the final checkpoint could not be saved (everything is closed anyway).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._checkpoint_due.set()
        for t in self._threads:
            t.join(self._timeout_s + 5)
            if t.is_alive():
                log.warning("replica thread still running at close", extra={"stream": self.stream,
                                                                            "replica": self.name, "thread": t.name})
        try:
            if checkpoint:
                self.checkpoint()
        finally:
            self._close_resources()
        with self._changed:
            self._m.ready.set(0)
            self._changed.notify_all()

    def _close_resources(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._client is not None:
            self._client.close()
            self._client = None
        with self._checkpoint_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> "HeadReplica":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
