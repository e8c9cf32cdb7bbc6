"""RocksLog: numbering, replay, truncation, group commit, checkpoints, corruption, real crashes."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from rocksdict import Options, Rdict

from store.errors import DecodeError, UnsupportedVersion, WALError
from store.wal import (CHECKPOINT_PREFIX, MANIFEST_KEY, Manifest, RocksLog, decode_manifest,
                       decode_record, encode_manifest, encode_record, log_key)

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wal_crash_writer.py")


def metric(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


def payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (i % 7 + 1)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "wal")


def fill(wal: RocksLog, n: int) -> list[int]:
    seqs = [wal.append(payload(i)) for i in range(n)]
    wal.wait_durable(seqs[-1])
    return seqs


def raw_keys(path: str, prefix: bytes) -> list[bytes]:
    db = Rdict(path, options=Options(raw_mode=True))
    try:
        return [k for k in db.keys() if k.startswith(prefix)]
    finally:
        db.close()
        del db


class Gate:
    """Wraps the Rdict under a RocksLog to hold or break commits (fault injection)."""

    def __init__(self, db, fail_writes: int = 0) -> None:
        self._db = db
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.fail_writes = fail_writes

    def write(self, wb, opts=None):
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise OSError("injected write error")
        return self._db.write(wb, opts)

    def flush_wal(self, sync):
        self.entered.set()
        self.hold.wait()
        return self._db.flush_wal(sync)

    def __getattr__(self, name):
        return getattr(self._db, name)


# --- codecs ------------------------------------------------------------------------------------


@given(st.binary(max_size=4096))
def test_record_roundtrip(data):
    assert decode_record(1, encode_record(data)) == data


@given(st.binary(min_size=1, max_size=512), st.data())
def test_record_detects_any_changed_byte(data, draw):
    value = bytearray(encode_record(data))
    i = draw.draw(st.integers(1, len(value) - 1))  # byte 0 is the version, tested below
    value[i] ^= draw.draw(st.integers(1, 255))
    with pytest.raises(DecodeError, match="WAL record 42"):
        decode_record(42, bytes(value))


def test_record_truncated_header():
    with pytest.raises(DecodeError, match="WAL record 7"):
        decode_record(7, encode_record(b"abc")[:4])


def test_record_unknown_version():
    value = bytes([2]) + encode_record(b"abc")[1:]
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_record(1, value)


def test_manifest_roundtrip_and_errors():
    m = Manifest(generation=3, seq=2**40, count=123456)
    raw = encode_manifest(m)
    assert decode_manifest(raw) == m
    with pytest.raises(DecodeError):
        decode_manifest(raw[:-1])
    with pytest.raises(DecodeError):
        decode_manifest(raw[:5] + bytes([raw[5] ^ 1]) + raw[6:])
    with pytest.raises(UnsupportedVersion):
        decode_manifest(bytes([9]) + raw[1:])


def test_log_keys_sort_by_sequence():
    seqs = [1, 2, 255, 256, 65535, 65536, 2**32, 2**63]
    assert sorted(log_key(s) for s in seqs) == [log_key(s) for s in seqs]


# --- log ---------------------------------------------------------------------------------------


def test_sequence_numbers_persist_across_reopen(path):
    wal = RocksLog(path)
    assert wal.last_seq() == 0
    assert fill(wal, 10) == list(range(1, 11))
    assert wal.last_seq() == 10
    wal.close()

    wal = RocksLog(path)
    try:
        assert wal.last_seq() == 10
        assert wal.append(b"next") == 11
        wal.wait_durable(11)
        assert list(wal.replay(0)) == [(i + 1, payload(i)) for i in range(10)] + [(11, b"next")]
    finally:
        wal.close()


def test_close_makes_queued_records_durable(path):
    wal = RocksLog(path)
    seqs = [wal.append(payload(i)) for i in range(50)]
    wal.close()
    wal.wait_durable(seqs[-1])  # durable before close returned: no error
    wal = RocksLog(path)
    try:
        assert [s for s, _ in wal.replay(0)] == seqs
    finally:
        wal.close()


@pytest.mark.parametrize("after,expected", [(0, range(1, 11)), (3, range(4, 11)), (9, [10]), (10, []),
                                            (100, []), (-5, range(1, 11))],
                         ids=["all", "after-3", "last-one", "none", "beyond", "negative"])
def test_replay_after(path, after, expected):
    wal = RocksLog(path)
    try:
        fill(wal, 10)
        assert list(wal.replay(after)) == [(s, payload(s - 1)) for s in expected]
    finally:
        wal.close()


def test_truncate(path):
    wal = RocksLog(path)
    fill(wal, 10)
    wal.truncate(4)
    assert [s for s, _ in wal.replay(0)] == list(range(5, 11))
    wal.truncate(2)  # older than what is already gone: nothing happens
    assert [s for s, _ in wal.replay(0)] == list(range(5, 11))
    wal.close()

    wal = RocksLog(path)
    assert [s for s, _ in wal.replay(0)] == list(range(5, 11))
    wal.truncate(10)
    assert list(wal.replay(0)) == []
    wal.close()

    # Everything truncated: numbering still continues after a restart.
    wal = RocksLog(path)
    try:
        assert wal.last_seq() == 10
        assert wal.append(b"x") == 11
        wal.wait_durable(11)
        assert list(wal.replay(0)) == [(11, b"x")]
    finally:
        wal.close()


def test_truncate_beyond_last_does_not_move_numbering(path):
    wal = RocksLog(path)
    fill(wal, 3)
    wal.truncate(1000)
    assert list(wal.replay(0)) == []
    wal.close()
    wal = RocksLog(path)
    try:
        assert wal.last_seq() == 3
        assert wal.append(b"x") == 4
    finally:
        wal.close()


def test_concurrent_appenders(path):
    registry = CollectorRegistry()
    wal = RocksLog(path, registry=registry)
    threads_n, per_thread = 16, 60
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    errors = []

    def work(t):
        try:
            last = 0
            for i in range(per_thread):
                data = f"{t}:{i}:".encode() + os.urandom(i * 13 % 500)
                seq = wal.append(data)
                assert seq > last  # a thread's own records are numbered in its call order
                last = seq
                wal.wait_durable(seq)
                with lock:
                    acked[seq] = data
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total = threads_n * per_thread
    replayed = list(wal.replay(0))
    wal.close()
    assert [s for s, _ in replayed] == list(range(1, total + 1))
    assert dict(replayed) == acked
    assert metric(registry, "flashback_wal_records_total") == total
    assert metric(registry, "flashback_wal_bytes_total") == sum(len(v) for v in acked.values())
    commits = metric(registry, "flashback_wal_commits_total")
    assert 1 <= commits < total, "group commit should put several concurrent records in one commit"
    assert metric(registry, "flashback_wal_fsync_duration_seconds_count") == commits
    assert metric(registry, "flashback_wal_commit_errors_total") == 0


def test_group_commit_batches_records_queued_during_a_sync(path):
    registry = CollectorRegistry()
    wal = RocksLog(path, registry=registry)
    gate = Gate(wal._db)
    wal._db = gate
    try:
        gate.hold.clear()
        first = wal.append(b"first")
        assert gate.entered.wait(10), "the committer did not start a commit"
        rest = [wal.append(payload(i)) for i in range(99)]
        gate.hold.set()
        wal.wait_durable(rest[-1])
        wal.wait_durable(first)
        assert metric(registry, "flashback_wal_records_total") == 100
        assert metric(registry, "flashback_wal_commits_total") <= 2
        assert [s for s, _ in wal.replay(0)] == list(range(1, 101))
    finally:
        gate.hold.set()
        wal.close()


def test_max_batch_bytes_splits_commits(path):
    registry = CollectorRegistry()
    wal = RocksLog(path, registry=registry, max_batch_bytes=1000)
    gate = Gate(wal._db)
    wal._db = gate
    try:
        gate.hold.clear()
        wal.append(b"first")
        assert gate.entered.wait(10)
        seqs = [wal.append(b"x" * 300) for _ in range(20)]  # 20 x 305 stored bytes: >= 6 commits of <= 4
        gate.hold.set()
        wal.wait_durable(seqs[-1])
        assert metric(registry, "flashback_wal_commits_total") >= 1 + 6
        assert [s for s, _ in wal.replay(0)] == list(range(1, 22))
    finally:
        gate.hold.set()
        wal.close()


def test_commit_error_fails_that_batch_only(path):
    registry = CollectorRegistry()
    wal = RocksLog(path, registry=registry)
    gate = Gate(wal._db, fail_writes=1)
    wal._db = gate
    try:
        bad = wal.append(b"lost")
        with pytest.raises(WALError, match="injected write error"):
            wal.wait_durable(bad)
        assert metric(registry, "flashback_wal_commit_errors_total") == 1
        good = wal.append(b"kept")
        wal.wait_durable(good)
        with pytest.raises(WALError):  # still failed, also after a later success
            wal.wait_durable(bad)
        assert list(wal.replay(0)) == [(good, b"kept")]
        assert metric(registry, "flashback_wal_commits_total") == 1
    finally:
        wal.close()


def test_wait_durable_timeout(path):
    wal = RocksLog(path)
    gate = Gate(wal._db)
    wal._db = gate
    try:
        gate.hold.clear()
        seq = wal.append(b"slow")
        with pytest.raises(WALError, match="not durable"):
            wal.wait_durable(seq, timeout=0.05)
        gate.hold.set()
        wal.wait_durable(seq, timeout=30)
    finally:
        gate.hold.set()
        wal.close()


class Crash(BaseException):
    pass


def test_committer_dying_answers_waiters(path):
    wal = RocksLog(path)
    gate = Gate(wal._db)
    wal._db = gate

    def die(wb, opts=None):
        raise Crash()

    gate.write = die
    seq = wal.append(b"a")
    with pytest.raises(WALError, match="closed before record 1"):
        wal.wait_durable(seq, timeout=30)
    with pytest.raises(WALError, match="closed"):
        wal.append(b"b")
    wal.close()


def test_wait_for_unassigned_sequence(path):
    wal = RocksLog(path)
    try:
        wal.wait_durable(0)
        with pytest.raises(ValueError):
            wal.wait_durable(1)
    finally:
        wal.close()


def test_errors_after_close(path):
    wal = RocksLog(path)
    seq = wal.append(b"a")
    wal.close()
    wal.close()  # idempotent
    wal.wait_durable(seq)
    with pytest.raises(WALError, match="closed"):
        wal.append(b"b")
    with pytest.raises(WALError, match="closed"):
        wal.replay(0)
    with pytest.raises(WALError, match="closed"):
        wal.truncate(1)
    with pytest.raises(WALError, match="closed"):
        wal.save_checkpoint(1, [])
    with pytest.raises(WALError, match="closed"):
        wal.load_checkpoint()


def test_close_ends_open_iterators(path):
    wal = RocksLog(path)
    fill(wal, 5)
    wal.save_checkpoint(2, [(b"a", b"1"), (b"b", b"2")])
    it = wal.replay(0)
    next(it)
    _, items = wal.load_checkpoint()
    next(items)
    wal.close()
    wal = RocksLog(path)  # would fail on RocksDB's LOCK if an iterator kept the database open
    wal.close()


# --- corruption --------------------------------------------------------------------------------


def tamper(path: str, key: bytes, change) -> None:
    db = Rdict(path, options=Options(raw_mode=True))
    try:
        db[key] = change(db[key])
    finally:
        db.close()
        del db


def test_corrupt_record_names_its_sequence(path):
    wal = RocksLog(path)
    fill(wal, 5)
    wal.close()
    tamper(path, log_key(3), lambda v: v[:-1] + bytes([v[-1] ^ 0x40]))
    wal = RocksLog(path)
    try:
        it = wal.replay(0)
        assert [next(it)[0], next(it)[0]] == [1, 2]
        with pytest.raises(DecodeError, match=r"WAL record 3\b"):
            next(it)
        assert list(wal.replay(3)) == [(4, payload(3)), (5, payload(4))]
    finally:
        wal.close()


def test_unknown_record_version(path):
    wal = RocksLog(path)
    fill(wal, 2)
    wal.close()
    tamper(path, log_key(2), lambda v: bytes([7]) + v[1:])
    wal = RocksLog(path)
    try:
        with pytest.raises(UnsupportedVersion, match=r"WAL record 2\b.*version 7"):
            list(wal.replay(0))
    finally:
        wal.close()


def test_unknown_manifest_version(path):
    wal = RocksLog(path)
    wal.save_checkpoint(1, [(b"a", b"1")])
    wal.close()
    tamper(path, MANIFEST_KEY, lambda v: bytes([2]) + v[1:])
    with pytest.raises(UnsupportedVersion, match="manifest"):
        RocksLog(path)
    tamper(path, MANIFEST_KEY, lambda v: v)  # the failed open released the database


# --- checkpoints -------------------------------------------------------------------------------


def items_of(wal: RocksLog) -> tuple[int, list[tuple[bytes, bytes]]]:
    seq, items = wal.load_checkpoint()
    return seq, list(items)


def test_no_checkpoint(path):
    wal = RocksLog(path)
    try:
        assert items_of(wal) == (0, [])
    finally:
        wal.close()


def test_checkpoint_save_load_replace(path):
    wal = RocksLog(path)
    fill(wal, 10)
    first = [(b"h", b"head"), (b"s\x00\x01", b"one"), (b"", b"empty key")]
    wal.save_checkpoint(6, first)
    assert items_of(wal) == (6, sorted(first))
    assert [s for s, _ in wal.replay(0)] == [7, 8, 9, 10]  # truncated through the checkpoint
    wal.close()

    wal = RocksLog(path)
    assert items_of(wal) == (6, sorted(first))
    second = [(b"s%04d" % i, os.urandom(i % 100)) for i in range(500)]
    wal.save_checkpoint(9, iter(second))
    assert items_of(wal) == (9, second)
    assert [s for s, _ in wal.replay(0)] == [10]
    wal.close()

    # The replaced generation is gone from disk, not just hidden.
    keys = raw_keys(path, CHECKPOINT_PREFIX)
    assert len(keys) == 500
    wal = RocksLog(path)
    try:
        assert items_of(wal) == (9, second)
        wal.save_checkpoint(10, [])
        assert items_of(wal) == (10, [])
    finally:
        wal.close()


def test_checkpoint_written_in_many_batches(path):
    wal = RocksLog(path, checkpoint_batch_bytes=4096)
    items = [(struct.pack(">I", i), os.urandom(1000)) for i in range(2000)]
    try:
        wal.save_checkpoint(5, items)
        assert items_of(wal) == (5, items)
    finally:
        wal.close()


def test_checkpoint_sequence_beyond_local_log(path):
    """A replicated log's sequence may be checkpointed while the local log is unused."""
    wal = RocksLog(path)
    wal.save_checkpoint(12345, [(b"k", b"v")])
    wal.close()
    wal = RocksLog(path)
    try:
        assert items_of(wal) == (12345, [(b"k", b"v")])
        assert wal.last_seq() == 0
    finally:
        wal.close()


def test_checkpoint_interrupted_while_writing_items(path):
    wal = RocksLog(path, checkpoint_batch_bytes=1024)
    old = [(b"a", b"old-a"), (b"b", b"old-b")]
    fill(wal, 10)
    wal.save_checkpoint(4, old)

    def crashing():
        for i in range(300):
            yield b"n%03d" % i, b"x" * 100
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        wal.save_checkpoint(8, crashing())
    assert items_of(wal) == (4, old)
    assert [s for s, _ in wal.replay(0)] == list(range(5, 11))  # not truncated either
    wal.close()
    assert len(raw_keys(path, CHECKPOINT_PREFIX)) == 2  # the partial generation was removed
    wal = RocksLog(path)
    try:
        assert items_of(wal) == (4, old)
    finally:
        wal.close()


@pytest.mark.parametrize("manifest_written", [False, True], ids=["before-manifest", "after-manifest"])
def test_checkpoint_crash_consistency(path, manifest_written):
    """State on disk after a crash between the steps of save_checkpoint, made with a raw Rdict."""
    wal = RocksLog(path)
    old = [(b"a", b"old-a"), (b"b", b"old-b")]
    wal.save_checkpoint(4, old)
    wal.close()
    new = [(b"a", b"new-a"), (b"c", b"new-c"), (b"d", b"new-d")]

    db = Rdict(path, options=Options(raw_mode=True))
    manifest = decode_manifest(db[MANIFEST_KEY])
    gen_prefix = CHECKPOINT_PREFIX + struct.pack(">Q", manifest.generation + 1)
    for k, v in new:
        db[gen_prefix + k] = v
    if manifest_written:
        db[MANIFEST_KEY] = encode_manifest(Manifest(manifest.generation + 1, 9, len(new)))
    db.close()
    del db

    wal = RocksLog(path)
    expected = (9, new) if manifest_written else (4, old)
    assert items_of(wal) == expected
    wal.close()
    # Opening removed the generation that is not current.
    assert len(raw_keys(path, CHECKPOINT_PREFIX)) == len(expected[1])
    wal = RocksLog(path)
    try:
        newest = [(b"z", b"z")]
        wal.save_checkpoint(20, newest)
        assert items_of(wal) == (20, newest)
    finally:
        wal.close()


def test_checkpoint_with_missing_items_is_an_error(path):
    wal = RocksLog(path)
    wal.save_checkpoint(3, [(b"a", b"1"), (b"b", b"2")])
    wal.close()
    db = Rdict(path, options=Options(raw_mode=True))
    gen = decode_manifest(db[MANIFEST_KEY]).generation
    del db[CHECKPOINT_PREFIX + struct.pack(">Q", gen) + b"b"]
    db.close()
    del db
    wal = RocksLog(path)
    try:
        seq, items = wal.load_checkpoint()
        with pytest.raises(DecodeError, match="has 1 items, its manifest says 2"):
            list(items)
    finally:
        wal.close()


def test_checkpoint_concurrent_with_appends(path):
    registry = CollectorRegistry()
    wal = RocksLog(path, registry=registry, checkpoint_batch_bytes=64 << 10)
    stop = threading.Event()
    acked = []
    errors = []

    def appender():
        try:
            while not stop.is_set():
                seq = wal.append(b"r")
                wal.wait_durable(seq)
                acked.append(seq)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=appender) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            while len(acked) < 20 * (round_ + 1):
                time.sleep(0.001)
            seq = wal.last_seq()
            items = [(struct.pack(">I", i), struct.pack(">Q", seq) * 50) for i in range(2000)]
            wal.save_checkpoint(seq, items)
            got_seq, got = items_of(wal)
            assert got_seq == seq and got == items
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    ckpt_seq, _ = wal.load_checkpoint()
    replayed = [s for s, _ in wal.replay(ckpt_seq)]
    wal.close()
    assert replayed == list(range(ckpt_seq + 1, max(acked) + 1))


# --- real crash --------------------------------------------------------------------------------


def run_and_kill(path: str, seconds: float, *extra: str) -> list[list[str]]:
    proc = subprocess.Popen([sys.executable, WRITER, path, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines: list[bytes] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while sum(ln.startswith(b"ack") for ln in lines) < 20 and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        time.sleep(seconds)
        assert proc.poll() is None, f"writer exited early: {proc.stderr.read().decode()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
    return [ln.decode().split() for ln in lines if ln.endswith(b"\n")]


@pytest.mark.parametrize("extra", [[], ["--checkpoint"]], ids=["appends", "appends-and-checkpoints"])
def test_sigkill_loses_no_acknowledged_record(tmp_path, extra):
    path = str(tmp_path / "wal")
    acked: dict[int, tuple[str, int]] = {}
    checkpoints: list[tuple[int, int]] = []
    for _ in range(2):  # kill, reopen in the writer, kill again
        for line in run_and_kill(path, 1.0, *extra):
            if line[0] == "ack":
                acked[int(line[1])] = (line[2], int(line[3]))
            elif line[0] == "ckpt":
                checkpoints.append((int(line[1]), int(line[2])))
    assert len(acked) >= 20

    wal = RocksLog(path)
    try:
        ckpt_seq, items = wal.load_checkpoint()
        items = list(items)
        if extra:
            assert checkpoints, "no checkpoint was acknowledged"
            assert ckpt_seq >= max(s for s, _ in checkpoints)
            assert len(items) >= 1
            for _, value in items:
                assert struct.unpack_from(">QI", value) == (ckpt_seq, len(items))
        replayed = {seq: (hashlib.sha256(data).hexdigest(), len(data)) for seq, data in wal.replay(ckpt_seq)}
        missing = [s for s in acked if s > ckpt_seq and s not in replayed]
        assert missing == []
        for seq, want in acked.items():
            if seq > ckpt_seq:
                assert replayed[seq] == want, f"record {seq} differs"
        assert wal.last_seq() >= max(acked)
        assert wal.append(b"after") > max(acked)
    finally:
        wal.close()
