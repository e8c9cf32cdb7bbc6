"""`flashback up` wiring: the retention job runs beside the compactor when configured."""

from __future__ import annotations

import time

import numpy as np

from flashback.app import App
from flashback.config import CompactorOptions, Options
from store.block import list_blocks, write_block
from store.bucket import FilesystemBucket
from store.labels import Labels
from tests.e2e.harness import wait_until

HOUR = 3600_000


def test_retention_runs_in_the_server_and_keeps_recent_blocks(tmp_path):
    bucket_dir = tmp_path / "bucket"
    bucket = FilesystemBucket(bucket_dir)
    now = int(time.time() * 1000) // HOUR * HOUR
    ts = np.arange(0, HOUR, 60_000, dtype=np.int64)
    series = [(Labels.from_dict({"__name__": "m"}), ts, np.ones(len(ts)))]
    old = write_block(bucket, [(lb, t + now - 10 * HOUR, v) for lb, t, v in series],
                      min_time=now - 10 * HOUR, max_time=now - 9 * HOUR)
    recent = write_block(bucket, [(lb, t + now - 2 * HOUR, v) for lb, t, v in series],
                         min_time=now - 2 * HOUR, max_time=now - HOUR)
    opts = Options(listen_port=0, data_dir=str(tmp_path / "data"),
                   bucket={"type": "FILESYSTEM", "config": {"directory": str(bucket_dir)}},
                   compactor=CompactorOptions(interval_s=0.2, retention_ms=((0, 5 * HOUR),), delete_delay_s=0))
    app = App(opts)
    app.start()
    try:
        wait_until(lambda: old.ulid not in list_blocks(bucket), 30, "the expired block to be deleted")
        assert recent.ulid in list_blocks(bucket)
    finally:
        app.close()
