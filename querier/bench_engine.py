"""Benchmark: ``sum by (instance) (rate(m[5m]))`` over 10k series x 240 samples, 250 steps.

Run ``python3 -m querier.bench_engine``; prints the best wall time of a few
runs and the time of selecting the data alone. Not a test.
"""

from __future__ import annotations

import time

import numpy as np

from querier.engine import Engine
from store.labels import Labels

SERIES = 10_000
SAMPLES = 240
INTERVAL = 15_000
STEPS = 250


class _Series:
    def __init__(self, labels: Labels, ts: np.ndarray, values: np.ndarray) -> None:
        self.labels, self._ts, self._values = labels, ts, values

    def samples(self):
        return self._ts, self._values

    def chunks(self):
        raise NotImplementedError


class _MemQuerier:
    """Every series matches; samples clipped to the requested range."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        ts = np.arange(SAMPLES, dtype=np.int64) * INTERVAL
        self.series = []
        for i in range(SERIES):
            lbls = Labels.from_dict({"__name__": "m", "instance": f"host-{i % 100}", "job": "bench", "idx": str(i)})
            vals = np.cumsum(rng.integers(0, 100, SAMPLES)).astype(np.float64)
            self.series.append(_Series(lbls, ts, vals))

    def select(self, matchers, mint, maxt, hints=None):
        out = []
        for s in self.series:
            ts, vs = s.samples()
            a, b = np.searchsorted(ts, mint), np.searchsorted(ts, maxt, side="right")
            out.append(_Series(s.labels, ts[a:b], vs[a:b]))
        return out

    def label_names(self, matchers, mint, maxt):
        return []

    def label_values(self, name, matchers, mint, maxt):
        return []


def main() -> None:
    q = _MemQuerier()
    engine = Engine()
    end = (SAMPLES - 1) * INTERVAL
    start = 5 * 60_000
    step = (end - start) // (STEPS - 1)
    expr = "sum by (instance) (rate(m[5m]))"
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        res = engine.range(q, expr, start, end, step)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    q.select([], start, end)
    sel = time.perf_counter() - t0
    points = sum(len(s.timestamps) for s in res.data)
    print(f"{expr}: {SERIES} series x {SAMPLES} samples, {STEPS} steps -> {len(res.data)} series, "
          f"{points} points; best of 3: {best * 1000:.0f} ms (select alone {sel * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
