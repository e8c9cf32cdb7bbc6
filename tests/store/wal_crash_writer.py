"""Helper process for the WAL crash test: writes until it is killed.

Usage: ``python3 wal_crash_writer.py PATH [--threads N] [--size BYTES] [--checkpoint]``

Several threads append random records and, after ``wait_durable`` returns,
print ``ack SEQ SHA256 LEN`` (one write per line, flushed). With
``--checkpoint`` another thread keeps saving checkpoints at the newest
sequence, each item's value naming that sequence, and prints
``ckpt SEQ COUNT`` after ``save_checkpoint`` returns. The test kills the
process with SIGKILL and checks every printed promise against the reopened log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from store.wal import RocksLog  # noqa: E402

_out_lock = threading.Lock()


def emit(line: str) -> None:
    data = (line + "\n").encode()
    with _out_lock:
        # One write(2) per line: a line is in the pipe whole or not at all when the kill comes.
        os.write(1, data)


def appender(wal: RocksLog, size: int) -> None:
    rng = random.Random()
    while True:
        payload = rng.randbytes(rng.randint(1, size))
        seq = wal.append(payload)
        wal.wait_durable(seq)
        emit(f"ack {seq} {hashlib.sha256(payload).hexdigest()} {len(payload)}")


def checkpointer(wal: RocksLog) -> None:
    rng = random.Random()
    while True:
        seq = wal.last_seq()
        count = rng.randint(1, 3000)
        items = ((struct.pack(">I", i), struct.pack(">QI", seq, count) + rng.randbytes(rng.randint(0, 2000)))
                 for i in range(count))
        wal.save_checkpoint(seq, items)
        emit(f"ckpt {seq} {count}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--size", type=int, default=30000)
    ap.add_argument("--checkpoint", action="store_true")
    args = ap.parse_args()
    wal = RocksLog(args.path, checkpoint_batch_bytes=256 << 10)
    emit(f"ready {wal.last_seq()}")
    threads = [threading.Thread(target=appender, args=(wal, args.size), daemon=True) for _ in range(args.threads)]
    if args.checkpoint:
        threads.append(threading.Thread(target=checkpointer, args=(wal,), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
