"""The compiled kernels (querier/kernels.py) against the numpy reference implementations, bit for bit.

Random range vectors cover counters with resets, gauges with NaN, ±Inf and
-0.0, empty and one-sample windows, long windows (numpy's pairwise summation
switches strategy at 8 and 128 elements), non-monotone step grids (``@``)
and subquery-like regular samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querier import aggregations, functions, kernels
from querier.engine import Engine, eval_matrix_selector, parse
from querier.values import STALE_NAN_BITS, RangeVector, Scalar, window_indices, window_indices_reference
from store.labels import Labels
from tests.querier.fakequerier import FakeQuerier

COMPILED = sorted(name for name, fn in functions._RANGE.items() if fn is not functions._RANGE_REFERENCE[name])
SPECIALS = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e308, -1e308, 5e-324])


class Ctx:
    """What the range functions read from an evaluation context."""

    def __init__(self, steps: np.ndarray) -> None:
        self.steps = steps
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def info(self, msg: str) -> None:
        self.infos.append(msg)


def random_series_values(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "counter":
        v = np.cumsum(rng.exponential(10.0, n))
        for at in rng.integers(0, max(n, 1), rng.integers(0, 4)) if n else []:  # resets
            v[at:] -= v[at] - rng.uniform(0, 5)
        return v
    if kind == "integers":
        return rng.integers(-50, 50, n).astype(np.float64)
    if kind == "constant":
        return np.full(n, rng.choice([1.5, -0.0, np.inf, 7.0]))
    v = rng.normal(0, 10 ** rng.uniform(-3, 12), n)
    special = rng.random(n) < rng.choice([0.0, 0.05, 0.3])
    v[special] = rng.choice(SPECIALS, special.sum())
    return v


def random_range_vector(seed: int) -> tuple[RangeVector, np.ndarray]:
    """A range vector over a random step grid, and the grid (ms)."""
    rng = np.random.default_rng(seed)
    series = int(rng.integers(0, 6))
    horizon = 600_000
    ts_parts, val_parts = [], []
    regular = rng.random() < 0.3
    for _ in range(series):
        n = int(rng.choice([0, 1, 2, 3, 10, 40, 200, 700]))
        if regular:
            step = int(rng.choice([1000, 15_000]))
            t = np.arange(n, dtype=np.int64) * step + int(rng.integers(0, 1000))
        else:
            t = np.unique(rng.integers(0, horizon, n)).astype(np.int64)
        ts_parts.append(t)
        val_parts.append(random_series_values(rng, len(t), str(rng.choice(["counter", "gauge", "integers", "constant"]))))
    offsets = np.zeros(series + 1, dtype=np.int64)
    np.cumsum([len(t) for t in ts_parts], out=offsets[1:])
    ts = np.concatenate(ts_parts) if ts_parts else np.zeros(0, dtype=np.int64)
    values = np.concatenate(val_parts) if val_parts else np.zeros(0)
    nsteps = int(rng.integers(1, 40))
    if rng.random() < 0.2:  # @ or an unordered grid: bounds that do not increase
        ref = rng.integers(-10_000, horizon + 10_000, nsteps).astype(np.int64)
        if rng.random() < 0.5:
            ref[:] = ref[0]
    else:
        ref = int(rng.integers(-10_000, horizon // 2)) + np.arange(nsteps, dtype=np.int64) * int(rng.integers(1, 30_000))
    range_ms = int(rng.choice([1, 1000, 30_000, 60_000, 300_000, 3_600_000]))
    rv = RangeVector([Labels.from_dict({"i": str(i)}) for i in range(series)], ts, values, offsets,
                     ref - range_ms, ref, range_ms)
    return rv, ref


def assert_same(got: np.ndarray, want: np.ndarray, where: np.ndarray, signed_zero: bool = True) -> None:
    """Bit-for-bit equality where ``where`` (any NaN equals any NaN)."""
    g, w = got[where], want[where]
    same = (g.view(np.uint64) == w.view(np.uint64)) | (np.isnan(g) & np.isnan(w))
    if not signed_zero:
        same |= (g == 0) & (w == 0)
    bad = np.flatnonzero(~same)
    assert not len(bad), f"{len(bad)} differ, e.g. got {g[bad[:5]]} want {w[bad[:5]]}"


def args_for(name: str, steps: int, rng: np.random.Generator) -> list:
    if name == "quantile_over_time":
        q = rng.choice([0.0, 0.5, 0.95, 1.0, 0.33, -1.0, 2.0, np.nan], steps)
        return [Scalar(q)]
    if name == "predict_linear":
        return [Scalar(np.full(steps, float(rng.choice([0.0, 3600.0, -60.5]))))]
    return []


# Where the reference is not Prometheus' recurrence, the kernel follows Prometheus: these may differ in
# the sign of a zero (the reference's plain sum of a window holding only -0.0 keeps -0.0; Prometheus'
# Kahan sum starting at 0 gives +0.0; min/max of equal -0.0 and 0.0 keep the first).
_SIGNED_ZERO_LOOSE = {"sum_over_time", "avg_over_time", "min_over_time", "max_over_time"}
# The reference computes the variance of few long windows in two passes, which "agrees with Welford's
# recurrence to the last bit or so"; the kernel runs the recurrence as Prometheus does.
_APPROXIMATE = {"stddev_over_time", "stdvar_over_time"}


def check_function(name: str, seed: int) -> None:
    rv, ref = random_range_vector(seed)
    rng = np.random.default_rng(seed + 1)
    args = args_for(name, len(ref), rng)
    ctx_k, ctx_r = Ctx(ref), Ctx(ref)
    with np.errstate(all="ignore"):
        got, got_ok = functions._RANGE[name](rv, args, ctx_k)
        want, want_ok = functions._RANGE_REFERENCE[name](rv, args, ctx_r)
    np.testing.assert_array_equal(got_ok, want_ok)
    assert got.shape == want.shape
    assert ctx_k.warnings == ctx_r.warnings
    if name in _APPROXIMATE and _two_pass_in_reference(rv):
        np.testing.assert_allclose(got[got_ok], want[got_ok], rtol=1e-9, atol=1e-300, equal_nan=True)
        return
    assert_same(got, want, got_ok, signed_zero=name not in _SIGNED_ZERO_LOOSE)


def _two_pass_in_reference(rv: RangeVector) -> bool:
    return functions._Scan(rv).deep


@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("seed", range(60))
def test_range_function_matches_reference(name, seed):
    check_function(name, seed)


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_range_function_matches_reference_property(name, seed):
    check_function(name, seed)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_window_indices_match_reference(seed):
    rv, _ = random_range_vector(seed)
    lo, hi = window_indices(rv.ts, rv.offsets, rv.left, rv.right)
    lo_r, hi_r = window_indices_reference(rv.ts, rv.offsets, rv.left, rv.right)
    nonempty = hi_r > lo_r
    np.testing.assert_array_equal(hi - lo, hi_r - lo_r)
    np.testing.assert_array_equal(lo[nonempty], lo_r[nonempty])


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 127, 128, 129, 130, 255, 256, 257, 1000, 5000])
def test_reduceat_sum_is_numpy_add_reduceat(n):
    rng = np.random.default_rng(n)
    a = rng.normal(0, 1, n + 3) * 10.0 ** rng.integers(-8, 8, n + 3)
    want = np.add.reduceat(a, [1, n + 1])[0]
    assert kernels._reduceat_sum(a, 1, n + 1) == want


@pytest.mark.parametrize("op", ["sum", "avg", "count", "quantile"])
@pytest.mark.parametrize("seed", range(40))
def test_group_kernels_match_reference(op, seed):
    rng = np.random.default_rng(seed)
    rows, steps = int(rng.integers(1, 60)), int(rng.integers(1, 20))
    groups = int(rng.integers(1, rows + 1))
    gid = rng.integers(0, groups, rows)
    gid[:groups] = np.arange(groups)  # every group has a row
    values = random_series_values(rng, rows * steps, "gauge").reshape(rows, steps)
    present = rng.random((rows, steps)) < rng.choice([0.3, 0.9, 1.0])
    order = np.argsort(gid, kind="stable")
    counts = np.bincount(gid, minlength=groups)
    starts = np.zeros(groups, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    vals, pres = values[order], present[order]
    with np.errstate(all="ignore"):
        want_n = np.add.reduceat(pres.astype(np.float64), starts, axis=0)
        if op in ("sum", "avg"):
            n, total, comp = kernels.group_sum(values, present, gid, groups)
            got = np.where(np.isinf(total), total, total + comp)
            want = aggregations.kahan_group_sum(np.where(pres, vals, 0.0), starts, counts)
            np.testing.assert_array_equal(n, want_n)
            assert_same(got, want, want_n > 0)
        elif op == "count":
            np.testing.assert_array_equal(kernels.group_count(present, gid, groups), want_n)
        else:
            q = rng.choice([0.0, 0.25, 0.5, 0.9, 1.0, np.nan, -0.5, 1.5], steps)
            got = kernels.group_quantile(vals, pres, starts, counts, q)
            want = aggregations._group_quantile(vals, pres, order, gid, groups, q)
            assert_same(got, want, np.ones_like(pres[:groups], dtype=bool))


def test_stale_markers_are_removed_before_range_functions():
    stale = np.array([STALE_NAN_BITS], dtype=np.uint64).view(np.float64)[0]
    q = FakeQuerier({Labels.from_dict({"__name__": "c_total"}): ([0, 15_000, 30_000, 45_000, 60_000],
                                                                    [1.0, 2.0, stale, 4.0, stale])})
    from querier.engine import EvalContext
    ctx = EvalContext(q, np.array([60_000], dtype=np.int64), 60_000, 60_000, 0, 300_000, math.inf, 10**9, 60_000)
    rv = eval_matrix_selector(parse("c_total[1m]"), ctx)
    assert rv.values.tolist() == [2.0, 4.0]
    assert rv.offsets.tolist() == [0, 2]
    res = Engine().instant(q, "rate(c_total[1m])", 60_000)
    want, _ = functions._RANGE_REFERENCE["rate"](rv, [], ctx)
    assert res.data[0].value == want[0, 0]
