"""PromQL values evaluated over the whole step grid at once.

An instant vector is columnar: ``labels[i]`` names row ``i`` of
``values``/``present`` (shape ``(series, steps)``). A value is only meaningful
where ``present`` is true; NaN is a valid sample value, so presence is kept
apart. A range vector (matrix selector or subquery) keeps the raw samples of
every series in one flat array with per-series offsets, plus the window
``(left, right]`` of every step. Results handed to callers are plain
NamedTuples (``Sample``, ``RangeSeries``) inside a ``Result``.

A series whose metric name an operation has dropped keeps its name until
the query finishes (Prometheus 3's delayed ``__name__`` removal): its labels
are a ``DropNameLabels``, which equals the plain label set and carries the
``DropName`` mark of Prometheus' ``Series``/``Sample`` along with the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Union

import numpy as np

from querier import kernels
from store.labels import METRIC_NAME, Labels

STALE_NAN_BITS = 0x7FF0000000000002


def is_stale(values: np.ndarray) -> np.ndarray:
    """True where a value carries the stale-marker NaN payload."""
    return values.view(np.uint64) == np.uint64(STALE_NAN_BITS)


METADATA_LABELS = (METRIC_NAME, "__type__", "__unit__")
_LAST_METADATA = max(METADATA_LABELS)


class DropNameLabels(Labels):
    """Labels whose metric name (and ``__type__``/``__unit__``) is removed when the query finishes.

    It is Prometheus' ``DropName`` flag riding on the label set: it compares
    and hashes like the plain labels (series are matched and merged by labels
    alone, as in Prometheus), so it only matters where the name is finally
    removed. Setting a label keeps the mark, except setting ``__name__``
    itself (``label_replace``/``label_join`` to ``__name__`` keep the name);
    every other label operation returns plain ``Labels``.
    """

    __slots__ = ()

    def with_label(self, name: str, value: str) -> Labels:
        out = Labels.with_label(self, name, value)
        return out if name == METRIC_NAME else DropNameLabels.sorted_unchecked(out)

    def __repr__(self) -> str:
        return f"DropNameLabels({str(self)})"


def mark_drop_name(lbls: Labels) -> Labels:
    """``lbls`` marked for name removal at the end of the query (unchanged if it has no metadata label)."""
    if isinstance(lbls, DropNameLabels) or not has_metadata(lbls):
        return lbls
    return DropNameLabels.sorted_unchecked(lbls)


def has_metadata(lbls: Labels) -> bool:
    """Whether ``lbls`` has ``__name__``, ``__type__`` or ``__unit__``."""
    for n, _ in lbls:
        if n in METADATA_LABELS:
            return True
        if n > _LAST_METADATA:  # the pairs are sorted by name; no metadata label follows
            return False
    return False


def strip_name(lbls: Labels) -> Labels:
    """Plain labels without ``__name__``, ``__type__`` and ``__unit__`` (the removal itself)."""
    if has_metadata(lbls):
        return Labels.sorted_unchecked(p for p in lbls if p[0] not in METADATA_LABELS)
    return Labels.sorted_unchecked(lbls) if type(lbls) is not Labels else lbls


def finish_name(lbls: Labels) -> Labels:
    """The labels a series ends the query with: stripped if marked, else as they are."""
    return strip_name(lbls) if isinstance(lbls, DropNameLabels) else lbls


@dataclass(slots=True)
class Vector:
    """An instant vector at every step: ``values``/``present`` have shape ``(len(labels), steps)``."""

    labels: list[Labels]
    values: np.ndarray
    present: np.ndarray

    @classmethod
    def empty(cls, steps: int) -> "Vector":
        return cls([], np.zeros((0, steps)), np.zeros((0, steps), dtype=bool))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray | list[int]) -> "Vector":
        rows = np.asarray(rows, dtype=np.int64)
        return Vector([self.labels[i] for i in rows], self.values[rows], self.present[rows])

    def compact(self) -> "Vector":
        """Drops rows present at no step."""
        keep = np.flatnonzero(self.present.any(axis=1))
        return self if len(keep) == len(self.labels) else self.take(keep)


@dataclass(slots=True)
class Scalar:
    """A scalar at every step (always present)."""

    values: np.ndarray


@dataclass(slots=True)
class String:
    value: str


@dataclass(slots=True)
class RangeVector:
    """Samples of many series in one flat array, and the window of every step.

    Series ``i`` owns ``ts[offsets[i]:offsets[i+1]]`` (strictly increasing,
    no stale markers). Step ``k`` sees the samples with
    ``left[k] < t <= right[k]``; ``range_ms`` is the selector's range.

    ``weights`` is set when the samples are downsampled aggregates (``querier/downsampled.py``):
    each point's number of raw samples, so that ``count_over_time`` and ``avg_over_time`` count
    and average raw samples rather than points.
    """

    labels: list[Labels]
    ts: np.ndarray
    values: np.ndarray
    offsets: np.ndarray
    left: np.ndarray
    right: np.ndarray
    range_ms: int
    weights: np.ndarray | None = None
    _windows: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """``lo, hi`` of shape ``(series, steps)``: step ``k`` of series ``i`` is ``[lo, hi)`` of the flat arrays."""
        if self._windows is None:
            self._windows = window_indices(self.ts, self.offsets, self.left, self.right)
        return self._windows


Value = Union[Vector, Scalar, String, RangeVector]


def window_indices(ts: np.ndarray, offsets: np.ndarray, left: np.ndarray,
                   right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat index ranges ``[lo, hi)`` of the samples with ``left[k] < t <= right[k]``, per series and step.

    Compiled (``kernels.window_bounds``); ``window_indices_reference`` is the
    numpy version it must agree with.
    """
    n = len(offsets) - 1
    lo = np.empty((max(n, 0), len(left)), dtype=np.int64)
    hi = np.empty_like(lo)
    i64 = np.int64
    kernels.window_bounds(np.ascontiguousarray(ts, dtype=i64), np.ascontiguousarray(offsets, dtype=i64),
                          np.ascontiguousarray(left, dtype=i64), np.ascontiguousarray(right, dtype=i64), lo, hi)
    return lo, hi


def window_indices_reference(ts: np.ndarray, offsets: np.ndarray, left: np.ndarray,
                             right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``window_indices`` in numpy.

    Series are laid end to end in one sorted key space (series index times a
    span, plus the timestamp relative to the earliest one) so a single
    ``searchsorted`` answers every (series, step) pair.
    """
    n = len(offsets) - 1
    steps = len(left)
    if n == 0:
        z = np.zeros((0, steps), dtype=np.int64)
        return z, z
    if len(ts) == 0:
        z = np.zeros((n, steps), dtype=np.int64)
        return z, z
    base = min(int(ts.min()), int(left.min())) - 1
    top = int(max(ts.max(), int(right.max()))) + 1
    span = top - base + 2
    if span * n < 2**62:
        sid = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        keys = sid * span + (ts - base)
        rows = (np.arange(n, dtype=np.int64) * span)[:, None]
        lo = np.searchsorted(keys, rows + (left - base)[None, :], side="right")
        hi = np.searchsorted(keys, rows + (right - base)[None, :], side="right")
        return lo.astype(np.int64), hi.astype(np.int64)
    lo = np.empty((n, steps), dtype=np.int64)
    hi = np.empty((n, steps), dtype=np.int64)
    for i in range(n):
        a, b = int(offsets[i]), int(offsets[i + 1])
        s = ts[a:b]
        lo[i] = a + np.searchsorted(s, left, side="right")
        hi[i] = a + np.searchsorted(s, right, side="right")
    return lo, hi


def window_reduce(ufunc: np.ufunc, arr: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``ufunc`` folded over ``arr[lo:hi]`` for every window; undefined where ``lo >= hi`` (mask it)."""
    if lo.size == 0:
        return np.zeros(lo.shape, dtype=arr.dtype)
    a = np.append(arr, arr.dtype.type(0))
    idx = np.empty(lo.size * 2, dtype=np.int64)
    idx[0::2] = lo.ravel()
    idx[1::2] = hi.ravel()
    np.minimum(idx, len(a) - 1, out=idx)
    return ufunc.reduceat(a, idx)[0::2].reshape(lo.shape)


class Sample(NamedTuple):
    """One element of an instant-vector result."""

    labels: Labels
    t: int
    value: float


class RangeSeries(NamedTuple):
    """One series of a matrix result: int64 ms timestamps and float64 values."""

    labels: Labels
    timestamps: np.ndarray
    values: np.ndarray


@dataclass(slots=True)
class Result:
    """A query result as the HTTP API returns it.

    ``result_type`` is ``matrix``, ``vector``, ``scalar`` or ``string``;
    ``data`` is a list of ``RangeSeries``, a list of ``Sample``, a
    ``(t_ms, float)`` or a ``(t_ms, str)`` respectively.
    """

    result_type: str
    data: object
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    samples: int = 0  # samples read from storage
    peak_samples: int = 0  # samples and points the evaluation held (what ``max_samples`` limits)
