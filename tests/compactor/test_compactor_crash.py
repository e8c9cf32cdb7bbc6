"""Crash safety of the compactor (issue 4): killed at any point, restarted, it loses nothing.

Two ways to die:

* In process: a ``FaultyBucket`` raises BucketUnavailable at bucket operation N and
  at every one after it (the process is as good as dead), for every N from 1 to the
  number of operations an undisturbed pass makes; once more with the operation
  carried out before the error for every mutating one (an upload that landed but
  whose answer was lost). A fresh ``Compactor`` (or, for every third N, the same one:
  a transient fault) then finishes the work against the healthy bucket.
* A real ``kill -9`` of a compactor subprocess at a random moment, against a
  filesystem bucket.

The source is a real head behind ``TruncatingSource``, which drops every sample
older than the watermark the compactor passed on, as the real head will: a
watermark passed on too early loses samples and fails the test. After each crash,
before the restart, everything visible to a querier (``BlockCatalog.blocks()``)
must hold no sample twice and, together with what the head still holds, every
sample. After the restart: every complete block verifies, the visible blocks hold
every input sample exactly once (no raw duplicates across blocks), the final
layout is the one an undisturbed run produces, and no unmarked block is left
hidden behind another.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from compactor.compactor import Compactor
from store.block import verify_block
from store.bucket import FilesystemBucket
from store.catalog import BlockCatalog
from store.errors import BucketUnavailable
from tests.compactor.compactor_helpers import (
    ANY, WINDOW, Clock, FaultyBucket, TruncatingSource, count, dataset, expected, make_head, read_live,
)

GRACE = 1_000
LEVELS = (1, 2, 4)
WINDOWS = 4
NOW = (WINDOWS + 1) * WINDOW + GRACE + 1
MUTATING = ("upload", "delete")


@pytest.fixture
def fast_dir(tmp_path):
    """A directory in memory if there is one: the filesystem bucket fsyncs every upload, and
    these tests upload thousands of objects."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(prefix="flashback-compactor-crash-", dir="/dev/shm")
        yield pathlib.Path(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def _compactor(source, bucket, clock) -> Compactor:
    return Compactor(source, bucket, window_ms=WINDOW, grace_ms=GRACE, levels=LEVELS,
                     on_persisted=source.on_persisted, now=clock)


def _source_samples(source) -> dict:
    if source.min_valid is None:
        mint = -(1 << 63)
    else:
        mint = source.min_valid
    out = {}
    for s in source.head.select([ANY], mint, 1 << 62):
        ts, vs = s.samples()
        out[s.labels] = dict(zip(ts.tolist(), vs.tolist()))
    return out


def check_crash_state(bucket, source, want) -> None:
    """What a querier sees now: no duplicates, nothing lost (blocks plus what the head still holds)."""
    got, raw, _ = read_live(bucket)
    assert raw == count(got), "a sample is visible in two blocks"
    head = _source_samples(source)
    for labels, samples in want.items():
        for t, v in samples.items():
            held = got.get(labels, {}).get(t, head.get(labels, {}).get(t))
            assert held == v, f"sample {labels} @{t} lost (watermark {source.min_valid})"


def check_final_state(bucket, source, want) -> None:
    catalog = BlockCatalog(bucket)
    catalog.refresh()
    assert not catalog.errors
    for b in catalog.all_blocks():
        verify_block(bucket, b.ulid)
    got, raw, metas = read_live(bucket)
    assert got == want
    assert raw == count(want), "duplicated samples across live blocks"
    # The layout of an undisturbed run: one block of the top level over the whole range.
    assert [(m.level, m.min_time, m.max_time) for m in metas] == [(3, 0, WINDOWS * WINDOW)]
    # Garbage collected: every block but the visible one is marked for deletion.
    assert all(b.marked for b in catalog.all_blocks() if b.ulid != metas[0].ulid)
    assert source.calls == sorted(source.calls)
    assert source.min_valid == WINDOWS * WINDOW


def _total_ops(tmp_path) -> FaultyBucket:
    data = dataset(WINDOWS)
    source = TruncatingSource(make_head(data))
    bucket = FaultyBucket(FilesystemBucket(tmp_path / "reference"))
    _compactor(source, bucket, Clock(NOW)).run_once()
    check_final_state(bucket.inner, source, expected(data))
    return bucket


def test_crash_at_every_bucket_operation(fast_dir):
    tmp_path = fast_dir
    reference = _total_ops(tmp_path)
    total = reference.ops
    points = [(n, False) for n in range(1, total + 1)]
    points += [(n, True) for n in range(1, total + 1) if reference.log[n - 1][0] in MUTATING]
    assert total >= 60 and len(points) >= 80
    print(f"{total} bucket operations in an undisturbed pass; {len(points)} crash runs")
    data = dataset(WINDOWS)
    want = expected(data)
    head = make_head(data)
    for n, after in points:
        source = TruncatingSource(head)
        inner = FilesystemBucket(tmp_path / f"b{n}-{int(after)}")
        faulty = FaultyBucket(inner, fail_at=n, after=after)
        clock = Clock(NOW)
        first = _compactor(source, faulty, clock)
        with pytest.raises(BucketUnavailable, match="injected fault"):
            first.run_once()
        check_crash_state(inner, source, want)
        if n % 3 == 0:
            faulty.fail_at = None  # a transient fault: the same process carries on
            restarted = first
        else:
            restarted = _compactor(source, FaultyBucket(inner), clock)
        restarted.run_once()
        check_final_state(inner, source, want)
        again = restarted.run_once()
        assert not again.written and not again.marked, f"fault at {n}: second pass not idempotent"
        inner.close()


def test_crash_points_across_passes(fast_dir):
    """Passes as windows close one by one (merges happen in later passes), faults at random points."""
    data = dataset(WINDOWS)
    want = expected(data)
    times = [(k + 1) * WINDOW + GRACE + 1 for k in range(1, WINDOWS + 1)]

    def timeline(bucket, source):
        clock = Clock(times[0])
        c = _compactor(source, bucket, clock)
        for t in times:
            clock.ms = t
            c.run_once()
            check_crash_state(bucket.inner, source, want)

    tmp_path = fast_dir
    ref = FaultyBucket(FilesystemBucket(tmp_path / "ref"))
    ref_source = TruncatingSource(make_head(data))
    timeline(ref, ref_source)
    check_final_state(ref.inner, ref_source, want)
    total = ref.ops
    rng = random.Random(4)
    head = make_head(data)
    for n in sorted(rng.sample(range(1, total + 1), 12)):
        source = TruncatingSource(head)
        inner = FilesystemBucket(tmp_path / f"t{n}")
        faulty = FaultyBucket(inner, fail_at=n, after=rng.random() < 0.5)
        clock = Clock(times[0])
        c = _compactor(source, faulty, clock)
        crashed_at = None
        for i, t in enumerate(times):
            clock.ms = t
            try:
                c.run_once()
            except BucketUnavailable:
                crashed_at = i
                break
        assert crashed_at is not None
        check_crash_state(inner, source, want)
        # Restart at the moment of the crash, then let time go on.
        clock2 = Clock(times[crashed_at])
        c2 = _compactor(source, inner, clock2)
        for t in times[crashed_at:]:
            clock2.ms = t
            c2.run_once()
            check_crash_state(inner, source, want)
        check_final_state(inner, source, want)


# ---------------------------------------------------------------------------------------------
# kill -9


CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from compactor.compactor import Compactor
    from store.bucket import FilesystemBucket
    from tests.compactor.compactor_helpers import TruncatingSource, Clock, dataset, make_head

    class SlowBucket(FilesystemBucket):
        # Stretches the pass so that a random kill lands inside it.
        def upload(self, name, data):
            time.sleep(0.01)
            return super().upload(name, data)

    bucket_dir, watermark_file = sys.argv[1], sys.argv[2]
    source = TruncatingSource(make_head(dataset({windows}, series=6)))

    def on_persisted(end):
        # The head's minimum valid time, persisted before it takes effect (as a head checkpoint would).
        with open(watermark_file + ".tmp", "w") as f:
            json.dump(end, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(watermark_file + ".tmp", watermark_file)
        source.on_persisted(end)

    c = Compactor(source, SlowBucket(bucket_dir), window_ms={window}, grace_ms={grace}, levels={levels},
                  on_persisted=on_persisted, now=Clock({now}))
    print("ready", flush=True)
    c.run_once()
    print("done", flush=True)
""")


def test_kill_9_at_random_moments(tmp_path):
    rng = random.Random(9)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=root, windows=WINDOWS, window=WINDOW, grace=GRACE, levels=LEVELS,
                                   now=NOW))
    data = dataset(WINDOWS, series=6)
    want = expected(data)
    killed_mid_pass = 0
    for run in range(4):
        bucket_dir = tmp_path / f"bucket{run}"
        watermark_file = tmp_path / f"watermark{run}"
        proc = subprocess.Popen([sys.executable, str(script), str(bucket_dir), str(watermark_file)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.02, 0.4))
            os.kill(proc.pid, signal.SIGKILL)
            rest = proc.stdout.read()
        finally:
            proc.wait()
        if "done" not in rest:
            killed_mid_pass += 1
        # Restart: the head comes back (its WAL) with the minimum valid time it had persisted.
        min_valid = json.loads(watermark_file.read_text()) if watermark_file.exists() else None
        source = TruncatingSource(make_head(data), min_valid)
        bucket = FilesystemBucket(bucket_dir)
        check_crash_state(bucket, source, want)
        _compactor(source, bucket, Clock(NOW)).run_once()
        check_final_state(bucket, source, want)
    print(f"{killed_mid_pass} of 4 kills landed inside the pass")
    assert killed_mid_pass >= 2, "the kills should land inside the pass"
