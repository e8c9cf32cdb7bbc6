"""Write-ahead log and checkpoint store in one RocksDB (``rocksdict``, raw mode).

``Log`` is the narrow interface the head's owner (``store.db``) writes through;
``RocksLog`` implements it locally with group commit, and a replicated log
(NATS JetStream) implements the same Protocol in cluster mode.

Group commit: ``append`` only queues a record and hands out its sequence
number. One committer thread takes everything queued since its last commit,
writes it as one ``WriteBatch`` and syncs RocksDB's own WAL once, then wakes
every ``wait_durable`` caller whose record it covered. A sync costs about as
much for one record as for a hundred, so concurrent writers share it.

rocksdict holds the GIL for the whole of ``Rdict.write`` (fsync included) but
releases it in ``Rdict.flush_wal``; a commit therefore writes without sync and
then calls ``flush_wal(sync=True)``, so other Python threads keep running
while the disk syncs. The difference RocksDB documents between the two (a
record is visible to readers slightly before it is durable) does not matter
here: only acknowledged records are promised, and acknowledgement waits for
the sync.

The checkpoint store lives in the same database under its own key prefix. The
key/value layout and both value formats are documented in
``store/docs/format/wal.md``.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from typing import Generator, Iterable, Iterator, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from rocksdict import Options, ReadOptions, Rdict, WriteBatch, WriteOptions

from store.errors import DecodeError, UnsupportedVersion, WALError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

RECORD_VERSION = 1
MANIFEST_VERSION = 1

LOG_PREFIX = b"w"
CHECKPOINT_PREFIX = b"c"
MANIFEST_KEY = b"m"
TRUNCATED_KEY = b"t"

_U64 = struct.Struct(">Q")
_RECORD_HEADER = struct.Struct(">BI")  # version, CRC-32 of the payload
_MANIFEST = struct.Struct(">BQQQ")  # version, generation, seq, item count; then CRC-32 of these
_MANIFEST_LEN = _MANIFEST.size + 4


class Log(Protocol):
    """An ordered, durable sequence of opaque records numbered 1, 2, 3, ...

    Thread-safety: every method may be called from any thread. ``append``
    numbers records in the order its calls take effect; callers that need log
    order to equal the order they apply records in hold their own lock around
    ``append`` and the apply (``store.db.DB`` does).

    Lifetime: after ``close`` no method but ``last_seq`` and ``close`` may be
    used; ``append`` and ``replay`` raise ``WALError``, and ``wait_durable``
    raises it for records that were not durable by then.
    """

    def append(self, record: bytes) -> int:
        """Queues a record and returns its sequence number; it is not durable yet.

        Sequence numbers are strictly increasing in call order and continue
        after a restart.
        """
        ...

    def wait_durable(self, seq: int, timeout: float | None = None) -> None:
        """Blocks until record ``seq`` is durable (synced to disk or replicated).

        Raises:
            WALError: the write of that record failed, the log was closed before
                it became durable, or ``timeout`` seconds passed.
        """
        ...

    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """Yields ``(seq, record)`` for records with sequence > ``after``, in order."""
        ...

    def truncate(self, through: int) -> None:
        """Drops records with sequence <= ``through`` (a checkpoint covers them)."""
        ...

    def last_seq(self) -> int:
        """Sequence number of the newest appended record; 0 if there never was one."""
        ...

    def close(self) -> None:
        """Makes queued records durable, stops accepting new ones and releases the log."""
        ...


class CheckpointStore(Protocol):
    """Keeps the latest checkpoint: a set of (key, value) items at a log sequence number.

    Thread-safety: ``save_checkpoint`` calls are serialised by the store and
    may run concurrently with appends.
    """

    def save_checkpoint(self, seq: int, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Atomically replaces the checkpoint with ``items`` at ``seq`` and truncates the log through ``seq``."""
        ...

    def load_checkpoint(self) -> tuple[int, Iterator[tuple[bytes, bytes]]]:
        """``(seq, items)`` of the latest complete checkpoint, or ``(0, empty)`` if there is none."""
        ...


# --- codecs (no I/O) -------------------------------------------------------------------------


def log_key(seq: int) -> bytes:
    """Key of log record ``seq``: the prefix and the big-endian sequence number."""
    return LOG_PREFIX + _U64.pack(seq)


def encode_record(payload: bytes) -> bytes:
    """Stored value of a log record: ``u8 version | u32 crc32(payload) | payload``."""
    return _RECORD_HEADER.pack(RECORD_VERSION, zlib.crc32(payload)) + payload


def decode_record(seq: int, value: bytes) -> bytes:
    """Payload of the stored value of record ``seq``.

    Raises:
        UnsupportedVersion: the record has a version this reader does not know.
        DecodeError: the value is truncated or its checksum does not match.
    """
    if len(value) < _RECORD_HEADER.size:
        raise DecodeError(f"WAL record {seq}: {len(value)} bytes is shorter than the record header")
    version, crc = _RECORD_HEADER.unpack_from(value)
    if version != RECORD_VERSION:
        raise UnsupportedVersion(f"WAL record {seq}: version {version} (this reader knows {RECORD_VERSION})")
    payload = value[_RECORD_HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise DecodeError(f"WAL record {seq}: checksum mismatch ({len(payload)} payload bytes)")
    return payload


@dataclass(frozen=True, slots=True)
class Manifest:
    """Which checkpoint generation is complete, the log sequence it covers and its item count."""

    generation: int
    seq: int
    count: int


def encode_manifest(m: Manifest) -> bytes:
    """``u8 version | u64 generation | u64 seq | u64 count | u32 crc32 of the preceding bytes``."""
    head = _MANIFEST.pack(MANIFEST_VERSION, m.generation, m.seq, m.count)
    return head + struct.pack(">I", zlib.crc32(head))


def decode_manifest(value: bytes) -> Manifest:
    """Inverse of ``encode_manifest``.

    Raises:
        UnsupportedVersion: unknown manifest version.
        DecodeError: wrong length or checksum mismatch.
    """
    if len(value) >= 1 and value[0] != MANIFEST_VERSION:
        raise UnsupportedVersion(f"checkpoint manifest version {value[0]} (this reader knows {MANIFEST_VERSION})")
    if len(value) != _MANIFEST_LEN:
        raise DecodeError(f"checkpoint manifest of {len(value)} bytes, expected {_MANIFEST_LEN}")
    if zlib.crc32(value[:_MANIFEST.size]) != struct.unpack_from(">I", value, _MANIFEST.size)[0]:
        raise DecodeError("checkpoint manifest: checksum mismatch")
    _, generation, seq, count = _MANIFEST.unpack_from(value)
    return Manifest(generation, seq, count)


def _generation_prefix(generation: int) -> bytes:
    return CHECKPOINT_PREFIX + _U64.pack(generation)


def _prefix_end(prefix: bytes) -> bytes:
    """Smallest key greater than every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("a prefix of only 0xff bytes has no end key")
    return stripped[:-1] + bytes([stripped[-1] + 1])


# --- RocksDB implementation ------------------------------------------------------------------


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.commits = Counter("flashback_wal_commits_total", "Group commits written and synced to disk.",
                               registry=registry)
        self.fsync = Histogram("flashback_wal_fsync_duration_seconds", "Time one group commit spent syncing the "
                               "log to disk.", registry=registry,
                               buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5))
        self.records = Counter("flashback_wal_records_total", "Log records made durable.", registry=registry)
        self.bytes = Counter("flashback_wal_bytes_total", "Payload bytes of log records made durable.",
                             registry=registry)
        self.errors = Counter("flashback_wal_commit_errors_total", "Group commits that could not be written; "
                              "their records were answered with WALError.", registry=registry)


class RocksLog:
    """``Log`` and ``CheckpointStore`` in one RocksDB directory, with group commit.

    Args:
        path: database directory, created if missing. One process opens it at a time.
        registry: where the ``flashback_wal_*`` metrics are registered (one log per
            registry); they are kept private if ``None``.
        max_batch_bytes: a group commit takes queued records up to this many bytes
            (always at least one record); the rest wait for the next commit.
        checkpoint_batch_bytes: checkpoint items are written in batches of about this size.
        min_blob_size: values of at least this many bytes are kept in RocksDB blob
            files, so compactions do not rewrite them; 0 turns blob files off.
    """

    def __init__(self, path: str, *, registry: CollectorRegistry | None = None,
                 max_batch_bytes: int = 16 << 20, checkpoint_batch_bytes: int = 4 << 20,
                 min_blob_size: int = 4096) -> None:
        if max_batch_bytes <= 0 or checkpoint_batch_bytes <= 0:
            raise ValueError("max_batch_bytes and checkpoint_batch_bytes must be positive")
        self.path = path
        self._max_batch_bytes = max_batch_bytes
        self._checkpoint_batch_bytes = checkpoint_batch_bytes
        self._metrics = _Metrics(registry if registry is not None else CollectorRegistry(auto_describe=False))

        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        # Start writing WAL data back in the background every MiB, so that a sync after a large
        # checkpoint (written without sync) does not have to push hundreds of MB at once.
        opts.set_wal_bytes_per_sync(1 << 20)
        if min_blob_size > 0:
            opts.set_enable_blob_files(True)
            opts.set_min_blob_size(min_blob_size)
            opts.set_enable_blob_gc(True)
        os.makedirs(path, exist_ok=True)
        try:
            self._db = Rdict(path, options=opts)
        except Exception as e:  # rocksdict raises plain Exception subclasses
            raise WALError(f"open WAL database {path}: {e}") from e
        self._nosync = WriteOptions()
        self._nosync.sync = False
        try:
            self._truncated = self._read_truncated()
            self._manifest = self._read_manifest()
            self._next_generation = self._remove_orphan_generations() + 1
            last = max(self._newest_record(), self._truncated)
        except BaseException:
            self._db.close()
            raise

        self._cond = threading.Condition(threading.Lock())
        self._pending: list[tuple[int, bytes, int]] = []  # (seq, stored value, payload length)
        self._pending_bytes = 0
        self._last = last  # newest assigned sequence
        self._processed = last  # newest sequence whose commit was attempted
        self._failed: list[tuple[int, int, str]] = []  # (first, last, error) of failed commits
        self._closed = False
        self._committer_done = False
        self._checkpoint_lock = threading.Lock()
        self._truncate_lock = threading.Lock()
        self._iterators: weakref.WeakSet[Generator] = weakref.WeakSet()
        self._committer = threading.Thread(target=self._commit_loop, name=f"wal-committer {path}", daemon=True)
        self._committer.start()

    # --- Log ---------------------------------------------------------------------------------

    def append(self, record: bytes) -> int:
        """See ``Log.append``. Raises ``WALError`` after ``close``."""
        value = encode_record(bytes(record))
        with self._cond:
            if self._closed:
                raise WALError(f"append to closed WAL {self.path}")
            self._last += 1
            seq = self._last
            self._pending.append((seq, value, len(value) - _RECORD_HEADER.size))
            self._pending_bytes += len(value)
            if len(self._pending) == 1:
                self._cond.notify_all()
        return seq

    def wait_durable(self, seq: int, timeout: float | None = None) -> None:
        """See ``Log.wait_durable``.

        A record whose own commit failed is never durable: waiting for it raises
        ``WALError`` even if later records were committed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if seq > self._last:
                raise ValueError(f"wait for WAL record {seq}, but the newest is {self._last}")
            while self._processed < seq:
                if self._committer_done:
                    raise WALError(f"WAL {self.path} closed before record {seq} was durable")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WALError(f"WAL record {seq} not durable after {timeout}s")
                self._cond.wait(remaining)
            if self._failed:
                i = bisect.bisect_right(self._failed, (seq, float("inf"))) - 1
                if i >= 0 and self._failed[i][0] <= seq <= self._failed[i][1]:
                    first, last, err = self._failed[i]
                    raise WALError(f"WAL records {first}..{last} not written: {err}")

    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """See ``Log.replay``. Raises ``DecodeError``/``UnsupportedVersion`` at a bad record."""
        self._check_open("replay")
        return self._track(self._replay(min(max(after, 0), 2**64 - 2)))

    def _replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        ro = ReadOptions()
        ro.set_iterate_upper_bound(_prefix_end(LOG_PREFIX))
        it = self._db.iter(ro)
        it.seek(log_key(after + 1))
        while it.valid():
            key = it.key()
            seq = _U64.unpack_from(key, 1)[0]
            yield seq, decode_record(seq, it.value())
            it.next()
        it.status()  # raises if the iteration stopped on an I/O error rather than at the end

    def truncate(self, through: int) -> None:
        """See ``Log.truncate``. Sequence numbers keep counting after truncation, also
        across restarts. Waits until the commit of records up to ``through`` is over,
        so that no record it covers is written after it."""
        with self._truncate_lock:
            with self._cond:
                self._check_open("truncate")
                through = min(through, self._last)
                if through <= self._truncated:
                    return
                while self._processed < through and not self._committer_done:
                    self._cond.wait()
            wb = WriteBatch(raw_mode=True)
            wb.delete_range(LOG_PREFIX, log_key(through + 1))
            wb.put(TRUNCATED_KEY, _U64.pack(through))
            self._write(wb, f"truncate WAL {self.path} through {through}")
            with self._cond:
                self._truncated = through
                self._failed = [f for f in self._failed if f[1] > through]

    def last_seq(self) -> int:
        """See ``Log.last_seq``: includes records appended but not yet durable."""
        with self._cond:
            return self._last

    def close(self) -> None:
        """See ``Log.close``. Idempotent. Checkpoints must not be saved concurrently."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._committer.join()
        for gen in list(self._iterators):
            try:
                gen.close()
            except ValueError:  # running in another thread right now; nothing safe to do
                log.warning("WAL iterator still in use at close", extra={"path": self.path})
        with self._checkpoint_lock:
            try:
                self._db.close()
            except Exception as e:
                raise WALError(f"close WAL database {self.path}: {e}") from e

    # --- CheckpointStore ---------------------------------------------------------------------

    def save_checkpoint(self, seq: int, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Atomically replaces the checkpoint, then truncates the log through ``seq``.

        Items go under a new generation in batches of ``checkpoint_batch_bytes``
        without sync; then the manifest naming that generation is written and
        synced (RocksDB recovers a prefix of its own WAL, so a durable manifest
        implies durable items); only then is the previous generation deleted.
        A crash, or an exception from ``items``, at any point leaves the old or
        the new checkpoint complete. Appends keep being committed meanwhile.

        Raises:
            WALError: RocksDB could not write the checkpoint.
        """
        with self._checkpoint_lock:
            self._check_open("save checkpoint to")
            generation = self._next_generation
            self._next_generation += 1
            prefix = _generation_prefix(generation)
            count = 0
            try:
                wb, size = WriteBatch(raw_mode=True), 0
                for key, value in items:
                    wb.put(prefix + key, value)
                    count += 1
                    size += len(key) + len(value) + len(prefix)
                    if size >= self._checkpoint_batch_bytes:
                        self._write(wb, f"write checkpoint generation {generation}")
                        wb, size = WriteBatch(raw_mode=True), 0
                wb.put(MANIFEST_KEY, encode_manifest(Manifest(generation, seq, count)))
                self._write(wb, f"write checkpoint generation {generation}", sync=True)
            except BaseException:
                self._delete_generation_quietly(generation)
                raise
            old, self._manifest = self._manifest, Manifest(generation, seq, count)
            if old is not None:
                self._delete_generation_quietly(old.generation)
        log.debug("checkpoint saved", extra={"seq": seq, "generation": generation, "items": count})
        self.truncate(seq)

    def load_checkpoint(self) -> tuple[int, Iterator[tuple[bytes, bytes]]]:
        """See ``CheckpointStore.load_checkpoint``.

        Items are read lazily from a snapshot, so a checkpoint saved meanwhile does
        not disturb them. The iterator raises ``DecodeError`` at its end if it
        found a different number of items than the manifest names.
        """
        self._check_open("load checkpoint from")
        snap = self._db.snapshot()
        # Snapshot.__getitem__ raises a bare Exception for a missing key; an iterator tells apart.
        it = snap.iter(ReadOptions())
        it.seek(MANIFEST_KEY)
        if not (it.valid() and it.key() == MANIFEST_KEY):
            return 0, iter(())
        manifest = decode_manifest(it.value())
        return manifest.seq, self._track(self._checkpoint_items(snap, manifest))

    def _checkpoint_items(self, snap, manifest: Manifest) -> Iterator[tuple[bytes, bytes]]:
        prefix = _generation_prefix(manifest.generation)
        ro = ReadOptions()
        ro.set_iterate_upper_bound(_prefix_end(prefix))
        it = snap.iter(ro)
        it.seek(prefix)
        n = 0
        while it.valid():
            yield it.key()[len(prefix):], it.value()
            n += 1
            it.next()
        it.status()
        if n != manifest.count:
            raise DecodeError(f"checkpoint generation {manifest.generation} at seq {manifest.seq} has {n} items, "
                              f"its manifest says {manifest.count}")

    # --- internals ---------------------------------------------------------------------------

    def _commit_loop(self) -> None:
        try:
            self._commit_until_closed()
        except BaseException:
            log.exception("WAL committer stopped", extra={"path": self.path})
        finally:
            with self._cond:
                # Normally everything queued was committed; after an unexpected error the rest
                # is answered with WALError instead of leaving its waiters blocked forever.
                self._closed = True
                self._committer_done = True
                self._cond.notify_all()

    def _commit_until_closed(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, size = self._take_batch()
            first, last = batch[0][0], batch[-1][0]
            err = None
            sync_s = 0.0
            try:
                wb = WriteBatch(raw_mode=True)
                for seq, value, _ in batch:
                    wb.put(log_key(seq), value)
                self._db.write(wb, self._nosync)
                start = time.perf_counter()
                self._db.flush_wal(True)
                sync_s = time.perf_counter() - start
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                log.error("WAL commit", extra={"first": first, "last": last, "error": err})
            m = self._metrics
            if err is None:
                m.commits.inc()
                m.fsync.observe(sync_s)
                m.records.inc(len(batch))
                m.bytes.inc(sum(n for _, _, n in batch))
            else:
                m.errors.inc()
            with self._cond:
                if err is not None:
                    self._failed.append((first, last, err))
                self._processed = last
                self._cond.notify_all()

    def _take_batch(self) -> tuple[list[tuple[int, bytes, int]], int]:
        """Removes and returns queued records up to ``max_batch_bytes``; caller holds the lock."""
        if self._pending_bytes <= self._max_batch_bytes:
            batch, size = self._pending, self._pending_bytes
            self._pending, self._pending_bytes = [], 0
            return batch, size
        size = len(self._pending[0][1])
        n = 1
        while n < len(self._pending) and size + len(self._pending[n][1]) <= self._max_batch_bytes:
            size += len(self._pending[n][1])
            n += 1
        batch = self._pending[:n]
        del self._pending[:n]
        self._pending_bytes -= size
        return batch, size

    def _write(self, wb: WriteBatch, what: str, sync: bool = False) -> None:
        try:
            self._db.write(wb, self._nosync)
            if sync:
                self._db.flush_wal(True)
        except Exception as e:
            raise WALError(f"{what}: {e}") from e

    def _track(self, gen: Iterator[_T]) -> Iterator[_T]:
        """Remembers an iterator over the database so ``close`` can end it: an open
        rocksdict iterator keeps RocksDB open, and the directory locked, after ``close``."""
        self._iterators.add(gen)
        return gen

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise WALError(f"{what} closed WAL {self.path}")

    def _newest_record(self) -> int:
        it = self._db.iter(ReadOptions())
        it.seek_for_prev(LOG_PREFIX + b"\xff" * 8)
        if it.valid() and it.key()[:1] == LOG_PREFIX:
            return _U64.unpack_from(it.key(), 1)[0]
        return 0

    def _read_truncated(self) -> int:
        raw = self._db.get(TRUNCATED_KEY)
        return 0 if raw is None else _U64.unpack(raw)[0]

    def _read_manifest(self) -> Manifest | None:
        raw = self._db.get(MANIFEST_KEY)
        return None if raw is None else decode_manifest(raw)

    def _remove_orphan_generations(self) -> int:
        """Deletes checkpoint items of generations other than the manifest's (left by a crash
        during a save); returns the highest generation seen."""
        current = self._manifest.generation if self._manifest else 0
        highest = current
        it = self._db.iter(ReadOptions())
        it.seek_for_prev(_prefix_end(CHECKPOINT_PREFIX))
        if it.valid() and it.key()[:1] == CHECKPOINT_PREFIX:
            highest = max(highest, _U64.unpack_from(it.key(), 1)[0])
        it.seek(CHECKPOINT_PREFIX)
        lowest = _U64.unpack_from(it.key(), 1)[0] if it.valid() and it.key()[:1] == CHECKPOINT_PREFIX else current
        del it
        wb = WriteBatch(raw_mode=True)
        if lowest < current:
            wb.delete_range(CHECKPOINT_PREFIX, _generation_prefix(current))
        if highest > current:
            wb.delete_range(_generation_prefix(current + 1), _prefix_end(CHECKPOINT_PREFIX))
        if not wb.is_empty():
            log.info("removing incomplete checkpoints", extra={"generation": current, "highest": highest})
            self._write(wb, f"remove incomplete checkpoints of {self.path}")
        return highest

    def _delete_generation_quietly(self, generation: int) -> None:
        prefix = _generation_prefix(generation)
        wb = WriteBatch(raw_mode=True)
        wb.delete_range(prefix, _prefix_end(prefix))
        try:
            self._write(wb, f"delete checkpoint generation {generation}")
        except WALError:
            # Left behind, it is removed the next time the log is opened.
            log.warning("checkpoint generation not deleted", extra={"generation": generation}, exc_info=True)
