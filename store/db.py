"""A head behind a log: what the log acknowledged is what the head holds after any restart.

Every write is one log record (format below) applied to the head in log order,
so replaying records from the last checkpoint rebuilds the same head, the same
rejections included. The record keeps the writer's clock, because what counts
as "too far in the future" depends on it. Record formats::

    write (version 1):     u8 1    | i64 little-endian now_ms | snappy block-compressed WriteRequest
    persisted (kind 0x80): u8 0x80 | i64 little-endian through_ms

A *persisted* record says that every sample before ``through_ms`` is in the bucket: from that
point in the log on, the head rejects appends older than it (``Head.set_min_valid_time``). In
cluster mode a shard's compactor publishes it into the shard's log, so that every replica
applies it at the same position and replicas keep rejecting exactly the same samples.

Periodically, and on close, the head is checkpointed together with the last
applied sequence; the log is then truncated through it, which bounds replay.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import cramjam
from prometheus_client import CollectorRegistry, Gauge

from store import writerequest
from store.errors import DecodeError, UnsupportedVersion
from store.head import AppendResult, Head, HeadOptions, truncation_point
from store.wal import Log, RocksLog

log = logging.getLogger(__name__)

INT64_MIN = -(2**63)

RECORD_VERSION = 1
RECORD_PERSISTED = 0x80


def encode_record(now_ms: int, snappy_body: bytes) -> bytes:
    return struct.pack("<Bq", RECORD_VERSION, now_ms) + snappy_body


def encode_persisted(through_ms: int) -> bytes:
    """A record saying every sample before ``through_ms`` is in the bucket."""
    return struct.pack("<Bq", RECORD_PERSISTED, through_ms)


def persisted_through(record: bytes) -> int | None:
    """``through_ms`` of a persisted record; None for any other record."""
    if len(record) == 9 and record[0] == RECORD_PERSISTED:
        return struct.unpack_from("<q", record, 1)[0]
    return None


def apply_record(head: Head, record: bytes) -> AppendResult | None:
    """Applies one log record to ``head`` (replay and replicas): a write's samples, or a persisted
    watermark (returns None). Raises UnsupportedVersion or DecodeError for records it cannot read."""
    through = persisted_through(record)
    if through is not None:
        head.set_min_valid_time(through)
        return None
    now_ms, body = decode_record(record)
    return head.append(writerequest.decode(cramjam.snappy.decompress_raw(body).read()), now_ms)


def decode_record(record: bytes) -> tuple[int, bytes]:
    """(now_ms, snappy-compressed WriteRequest) of a log record."""
    if len(record) < 9:
        raise DecodeError(f"log record of {len(record)} bytes is shorter than its header")
    if record[0] != RECORD_VERSION:
        raise UnsupportedVersion(f"log record version {record[0]} (this reader knows {RECORD_VERSION})")
    return struct.unpack_from("<q", record, 1)[0], record[9:]


@dataclass(frozen=True, slots=True)
class DBOptions:
    head: HeadOptions = field(default_factory=HeadOptions)
    checkpoint_interval_s: float = 300.0
    # Persisted data stays in the head until it is this old (the head's "28 h").
    retention_ms: int = 28 * 3600_000


class DB:
    """Single-node storage: a ``Head`` fed through a durable ``Log``.

    ``append`` is thread-safe; concurrent callers are committed to disk
    together (group commit) and each returns once its record is durable.
    """

    def __init__(self, head: Head, wal: Log, options: DBOptions = DBOptions(),
                 now: Callable[[], float] = time.time) -> None:
        self.head = head
        self.wal = wal
        self.options = options
        self._now = now
        self._apply_lock = threading.Lock()
        self._applied = wal.last_seq()
        self._checkpointed = self._applied
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._persisted_through = INT64_MIN  # every sample before this is in the bucket
        self._truncated_before = INT64_MIN

    @classmethod
    def open(cls, directory: str, options: DBOptions = DBOptions(),
             registry: CollectorRegistry | None = None, now: Callable[[], float] = time.time) -> "DB":
        """Opens (or creates) the WAL under ``directory``, loads the checkpoint and replays the rest."""
        os.makedirs(directory, exist_ok=True)
        wal = RocksLog(os.path.join(directory, "wal"), registry=registry)
        head = Head(options.head, registry=registry)
        start = time.monotonic()
        seq, items = wal.load_checkpoint()
        head.load_checkpoint(items)
        replayed = 0
        for rseq, record in wal.replay(seq):
            apply_record(head, record)
            replayed += 1
        db = cls(head, wal, options, now)
        db._checkpointed = seq
        if registry is not None:
            Gauge("flashback_wal_replay_duration_seconds", "Time the last start spent loading the checkpoint "
                  "and replaying the log.", registry=registry).set(time.monotonic() - start)
        log.info("head restored", extra={"checkpoint_seq": seq, "replayed": replayed,
                                         "series": head.num_series(), "seconds": round(time.monotonic() - start, 3)})
        return db

    def append(self, snappy_body: bytes, req: writerequest.WriteRequest, now_ms: int | None = None) -> AppendResult:
        """Logs and applies one request; returns once it is durable. Raises ``WALError`` if it is not."""
        if now_ms is None:
            now_ms = int(self._now() * 1000)
        record = encode_record(now_ms, snappy_body)
        with self._apply_lock:
            seq = self.wal.append(record)
            result = self.head.append(req, now_ms)
            self._applied = seq
        self.wal.wait_durable(seq)
        return result

    def checkpoint(self, force: bool = False) -> int:
        """Checkpoints the head at the last applied record and truncates the log; returns that sequence."""
        with self._apply_lock:
            seq = self._applied
            items = self.head.checkpoint_items()
        if seq == self._checkpointed and not force:
            return seq
        self.wal.save_checkpoint(seq, items)
        self._checkpointed = seq
        return seq

    def persisted(self, through_ms: int) -> None:
        """Every sample before ``through_ms`` is in the bucket: the head rejects older appends from
        now on and drops that data once it is older than ``retention_ms`` (``truncate_expired``)."""
        self.head.set_min_valid_time(through_ms)
        self._persisted_through = max(self._persisted_through, through_ms)

    def truncate_expired(self) -> int:
        """Drops persisted head data older than the retention, then checkpoints so that a restart
        does not replay it; returns the number of series removed."""
        before = truncation_point(self._persisted_through, int(self._now() * 1000), self.options.retention_ms,
                                  self.options.head.chunk_range_ms)
        if before <= self._truncated_before:
            return 0
        with self._apply_lock:
            removed = self.head.truncate(before)
        self._truncated_before = before
        self.checkpoint(force=True)
        log.info("head truncated", extra={"before_ms": before, "series_removed": removed})
        return removed

    def start(self) -> None:
        """Starts periodic checkpoints."""
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.options.checkpoint_interval_s):
            try:
                self.truncate_expired()
                before = self._checkpointed
                seq = self.checkpoint()
                if seq != before:
                    log.info("checkpoint written", extra={"seq": seq})
            except Exception:
                log.exception("checkpoint")

    def close(self, checkpoint: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if checkpoint:
            self.checkpoint()
        self.wal.close()
