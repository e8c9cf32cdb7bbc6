"""Where in time the head's data changed, and in which order: what lets a results cache keep an
answer exactly as long as the data under it is unchanged.

Time is cut into buckets of ``resolution_ms``. Every batch of appended samples gets the next
sequence number, and each bucket remembers the last sequence that wrote into it. A cache takes
``seq`` before it evaluates a query, records the time ranges the evaluation read, and later keeps
its answer while ``last_change`` over those ranges is still at most that sequence. A late write into
a range invalidates exactly the answers that read that range (to the bucket's resolution; a batch
marks every bucket between its oldest and newest sample).

A head replica of a cluster numbers its batches by the log sequence of the record that wrote
them (``record(..., seq=)``), which is the same on every replica of the shard, and after a
restart from a checkpoint at sequence C knows nothing of earlier batches: ``floor = C`` makes
every range count as changed by C at least.

The buckets form one array over the time span seen so far, growing at either end up to
``max_buckets``. Past that the oldest buckets are folded into the first one, which then stands for
everything before it (answers over those old ranges are invalidated more often, never less).
"""

from __future__ import annotations

import threading

import numpy as np

class ChangeTracker:
    """Last write sequence per time bucket (thread-safe; ``record`` is cheap enough for every append)."""

    def __init__(self, resolution_ms: int = 60_000, max_buckets: int = 1 << 20) -> None:
        if resolution_ms <= 0 or max_buckets <= 0:
            raise ValueError("resolution_ms and max_buckets must be positive")
        self.resolution_ms = resolution_ms
        self.max_buckets = max_buckets
        self._lock = threading.Lock()
        self._seq = 0
        self.floor = 0  # every range changed at least this late (batches before it are unknown)
        self._base = 0  # bucket number of _last[0]
        self._last = np.zeros(0, dtype=np.int64)
        self._folded = False  # _last[0] also stands for every bucket before it

    @property
    def seq(self) -> int:
        """The sequence of the latest recorded batch (0 before the first)."""
        return self._seq

    def record(self, mint: int, maxt: int, seq: int | None = None) -> None:
        """Marks the buckets of one batch of appended samples, whose timestamps (ms) span
        ``[mint, maxt]``: every bucket in between (marking too much is safe, only less cached).
        The batch gets sequence ``seq`` (increasing from call to call), by default the next."""
        r = self.resolution_ms
        lo, hi = mint // r, maxt // r
        with self._lock:
            if seq is not None and seq <= self._seq:
                raise ValueError(f"change sequence {seq} after {self._seq}: sequences increase")
            self._cover(lo, hi)
            self._seq = self._seq + 1 if seq is None else seq
            if lo < self._base:
                self._folded = True
            a, b = self._clamp(lo), self._clamp(hi)
            self._last[a:b + 1] = self._seq

    def last_change(self, mint: int, maxt: int) -> int:
        """The sequence of the latest batch that wrote into ``[mint, maxt]`` (ms); ``floor`` (0
        by default) if none did since."""
        r = self.resolution_ms
        with self._lock:
            n = len(self._last)
            lo, hi = mint // r - self._base, maxt // r - self._base
            if n == 0 or maxt < mint or lo >= n:
                return self.floor
            if hi < 0:
                return max(self.floor, int(self._last[0])) if self._folded else self.floor
            return max(self.floor, int(self._last[max(lo, 0):hi + 1].max()))

    def _clamp(self, bucket: int) -> int:
        return min(max(bucket - self._base, 0), len(self._last) - 1)

    def _cover(self, lo: int, hi: int) -> None:
        """Grows the array to cover ``[lo, hi]`` (bucket numbers), with room to spare so that it
        is not copied at every new bucket; keeps the newest ``max_buckets``, folding older buckets
        into the first."""
        n = len(self._last)
        end = self._base + n - 1
        if n and lo >= self._base and hi <= end:
            return
        new_lo, new_hi = (min(lo, self._base), max(hi, end)) if n else (lo, hi)
        slack = max(1024, (new_hi - new_lo + 1) // 4)
        if not n or hi > end:
            new_hi += slack
        if n and lo < self._base:
            new_lo -= slack
        if new_hi - new_lo + 1 > self.max_buckets:
            new_lo = new_hi - self.max_buckets + 1
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        if n:
            keep_from = max(self._base, new_lo)  # the first old bucket still in range
            k = min(keep_from - self._base, n)  # old buckets that fall below it
            if k < n:
                grown[keep_from - new_lo:keep_from - new_lo + n - k] = self._last[k:]
            if k > 0:
                grown[0] = max(int(grown[0]), int(self._last[:k].max()))
                self._folded = True
        self._base, self._last = new_lo, grown
