"""Shared pieces of the compactor tests: a dataset, a head as the source, fault-injecting buckets,
and a reader of everything the bucket's live blocks hold."""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from store import writerequest
from store.block import BlockReader
from store.bucket import Bucket, ObjectAttributes
from store.catalog import BlockCatalog
from store.errors import BucketUnavailable
from store.head import Head, HeadOptions
from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.storage import SelectHints

ANY = Matcher(MatchType.RE, "__name__", ".+")
WINDOW = 60_000

Dataset = list[tuple[list[tuple[str, str]], list[tuple[int, float]]]]


def dataset(windows: int, *, series: int = 3, step: int = 5_000, start: int = 0, window: int = WINDOW,
            seed: int = 1) -> Dataset:
    """``series`` series with a sample every ``step`` ms (jittered) over ``windows`` windows."""
    rng = np.random.default_rng(seed)
    out: Dataset = []
    for i in range(series):
        labels = [("__name__", f"metric_{i % 2}"), ("instance", f"host-{i}"), ("job", "test")]
        ts = np.arange(start, start + windows * window, step) + rng.integers(0, step // 2, 1)
        ts = ts[ts < start + windows * window]
        out.append((labels, [(int(t), float(i * 1000 + k) + 0.5) for k, t in enumerate(ts)]))
    return out


def make_head(data: Dataset) -> Head:
    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    res = head.append(writerequest.decode(writerequest.encode(data)), 0)
    assert not res.rejected, res.message()
    return head


def expected(data: Dataset) -> dict[Labels, dict[int, float]]:
    return {Labels.from_pairs(ls): {t: v for t, v in smp} for ls, smp in data}


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


class TruncatingSource:
    """A head that, like the real one, drops what the compactor said is persisted.

    ``on_persisted(end)`` raises the head's minimum valid time: selections see no
    sample older than it any more. So a watermark passed on too early shows up as
    samples missing from the bucket.
    """

    def __init__(self, head, min_valid: int | None = None) -> None:
        self.head = head
        self.min_valid = min_valid
        self.calls: list[int] = []
        self.selects = 0
        self.fail_at: int | None = None  # raise on the N-th select (1-based)
        self.fail_when = None  # or on every select for which fail_when(matchers, mint, maxt) is true

    def on_persisted(self, end: int) -> None:
        self.calls.append(end)
        if self.min_valid is None or end > self.min_valid:
            self.min_valid = end

    def _clip(self, mint: int) -> int:
        return mint if self.min_valid is None else max(mint, self.min_valid)

    def select(self, matchers, mint, maxt, hints=None):
        self.selects += 1
        if self.fail_at is not None and self.selects == self.fail_at:
            raise RuntimeError("injected source failure")
        if self.fail_when is not None and self.fail_when(matchers, mint, maxt):
            raise RuntimeError("injected source failure")
        mint = self._clip(mint)
        if mint > maxt:
            return []
        return self.head.select(matchers, mint, maxt, hints)

    def label_names(self, matchers, mint, maxt):
        mint = self._clip(mint)
        return [] if mint > maxt else self.head.label_names(matchers, mint, maxt)

    def label_values(self, name, matchers, mint, maxt):
        mint = self._clip(mint)
        return [] if mint > maxt else self.head.label_values(name, matchers, mint, maxt)


OPS = ("get", "get_range", "iter", "exists", "upload", "delete", "attributes")


class FaultyBucket:
    """Counts bucket operations and raises BucketUnavailable at operation ``fail_at`` (1-based).

    ``after=True`` performs the operation first (a write that succeeded but whose answer
    was lost); with ``sticky`` every operation from ``fail_at`` on fails (the process is gone).
    """

    def __init__(self, inner: Bucket, fail_at: int | None = None, *, after: bool = False,
                 sticky: bool = True) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.after = after
        self.sticky = sticky
        self.ops = 0
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _tick(self, op: str, name: str) -> bool:
        with self._lock:
            self.ops += 1
            self.log.append((op, name))
            n = self.ops
        if self.fail_at is None:
            return False
        return n == self.fail_at or (self.sticky and n > self.fail_at)

    def _call(self, op: str, name: str, fn, *args):
        fail = self._tick(op, name)
        if fail and not self.after:
            raise BucketUnavailable(f"injected fault at operation {self.ops}: {op} {name}")
        out = fn(*args)
        if fail:
            raise BucketUnavailable(f"injected fault after operation {self.ops}: {op} {name}")
        return out

    def get(self, name):
        return self._call("get", name, self.inner.get, name)

    def get_range(self, name, offset, length):
        return self._call("get_range", name, self.inner.get_range, name, offset, length)

    def iter(self, prefix="", recursive=False) -> Iterator[str]:
        return iter(self._call("iter", prefix, lambda: list(self.inner.iter(prefix, recursive))))

    def exists(self, name):
        return self._call("exists", name, self.inner.exists, name)

    def upload(self, name, data):
        return self._call("upload", name, self.inner.upload, name, data)

    def delete(self, name):
        return self._call("delete", name, self.inner.delete, name)

    def attributes(self, name) -> ObjectAttributes:
        return self._call("attributes", name, self.inner.attributes, name)

    def close(self):
        self.inner.close()


def read_live(bucket: Bucket) -> tuple[dict[Labels, dict[int, float]], int, list]:
    """Samples of the blocks a querier reads (``BlockCatalog.blocks()``), deduplicated by
    timestamp across blocks; also the raw sample count (duplicates counted) and the metas."""
    catalog = BlockCatalog(bucket)
    catalog.refresh()
    metas = catalog.blocks()
    out: dict[Labels, dict[int, float]] = {}
    raw = 0
    for m in metas:
        for s in BlockReader(bucket, m.ulid, meta=m).select([ANY], m.min_time, m.max_time - 1):
            ts, vs = s.samples()
            raw += len(ts)
            d = out.setdefault(s.labels, {})
            for t, v in zip(ts.tolist(), vs.tolist()):
                d.setdefault(t, v)
    return out, raw, metas


def count(d: dict[Labels, dict[int, float]]) -> int:
    return sum(len(x) for x in d.values())


def selected(source, mint: int, maxt: int) -> int:
    return sum(len(s.samples()[0]) for s in source.select([ANY], mint, maxt, SelectHints(mint, maxt)))
