"""In-memory postings index: label pair -> series refs (Prometheus ``index.MemPostings``).

Refs are assigned in increasing order, so every postings list is sorted and
unique and set operations are numpy merges. ``select`` implements Prometheus'
``PostingsForMatchers``: matchers that match the empty value also select
series without the label, so they are applied by subtraction.
"""

from __future__ import annotations

import threading
from array import array
from typing import Iterable, Sequence

import numpy as np

from store.labels import Labels
from store.matchers import Matcher, MatchType

_EMPTY = np.empty(0, dtype=np.int64)


class MemPostings:
    """Thread-safe: ``add`` takes a lock; readers copy what they use under it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, array]] = {}
        self._count = 0

    def add(self, ref: int, labels: Labels) -> None:
        """Registers series ``ref``; refs must be added in increasing order."""
        with self._lock:
            for name, value in labels:
                values = self._index.get(name)
                if values is None:
                    values = self._index[name] = {}
                lst = values.get(value)
                if lst is None:
                    lst = values[value] = array("q")
                lst.append(ref)
            self._count = max(self._count, ref + 1)

    def add_many(self, first_ref: int, labels: Sequence[Labels]) -> None:
        """Registers series ``first_ref``, ``first_ref + 1``, ... with ``labels`` (as ``add`` each)."""
        with self._lock:
            index = self._index
            for ref, lbls in enumerate(labels, first_ref):
                for name, value in lbls:
                    values = index.get(name)
                    if values is None:
                        values = index[name] = {}
                    lst = values.get(value)
                    if lst is None:
                        lst = values[value] = array("q")
                    lst.append(ref)
            if labels:
                self._count = max(self._count, first_ref + len(labels))

    def delete(self, refs: Iterable[int], labels_of: Sequence[Labels]) -> None:
        """Removes series (head truncation)."""
        with self._lock:
            for ref in refs:
                for name, value in labels_of[ref]:
                    lst = self._index[name][value]
                    del lst[lst.index(ref)]
                    if not lst:
                        del self._index[name][value]
                        if not self._index[name]:
                            del self._index[name]

    def stats(self, limit: int) -> dict[str, list[tuple[str, int]]]:
        """Cardinality, as Prometheus' ``/api/v1/status/tsdb`` reports it: the ``limit`` largest
        entries of each list, by count descending then name.

        ``series_by_metric``: series per ``__name__`` value; ``values_by_name``: distinct values per
        label name; ``bytes_by_name``: summed length of a name's distinct values; ``series_by_pair``:
        series per ``name=value`` pair; ``num_pairs``: distinct pairs in all.
        """
        with self._lock:
            by_metric = [(v, len(refs)) for v, refs in self._index.get("__name__", {}).items()]
            values = [(n, len(vs)) for n, vs in self._index.items()]
            size = [(n, sum(len(v.encode()) for v in vs)) for n, vs in self._index.items()]
            pairs = [(f"{n}={v}", len(refs)) for n, vs in self._index.items() for v, refs in vs.items()]

        def top(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
            items.sort(key=lambda kv: (-kv[1], kv[0]))
            return items[:limit]

        return {"num_pairs": [("", len(pairs))], "series_by_metric": top(by_metric), "values_by_name": top(values),
                "bytes_by_name": top(size), "series_by_pair": top(pairs)}

    def label_names(self) -> list[str]:
        with self._lock:
            return sorted(self._index)

    def label_values(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._index.get(name, ()))

    def _get(self, name: str, value: str) -> np.ndarray:
        lst = self._index.get(name, {}).get(value)
        return np.array(lst, dtype=np.int64) if lst else _EMPTY

    def _union(self, name: str, m: Matcher, want: bool) -> np.ndarray:
        """Refs having label ``name`` with a value for which ``m.matches(value) == want``."""
        values = self._index.get(name)
        if not values:
            return _EMPTY
        if m.type is MatchType.EQ and want:
            return self._get(name, m.value)
        if m.type is MatchType.NEQ and not want:
            return self._get(name, m.value)
        parts = [lst for v, lst in values.items() if m.matches(v) == want]
        if not parts:
            return _EMPTY
        if len(parts) == 1:
            return np.array(parts[0], dtype=np.int64)
        return np.unique(np.concatenate([np.frombuffer(p, dtype=np.int64) for p in parts]))

    def select(self, matchers: Sequence[Matcher], all_refs: np.ndarray) -> np.ndarray:
        """Sorted refs matching every matcher; ``all_refs`` are the live series."""
        with self._lock:
            positive: list[np.ndarray] = []
            negative: list[np.ndarray] = []
            for m in matchers:
                if m.matches_empty():
                    # Series without the label match too: remove those whose value does not.
                    negative.append(self._union(m.name, m, False))
                else:
                    positive.append(self._union(m.name, m, True))
        if positive:
            positive.sort(key=len)
            result = positive[0]
            for p in positive[1:]:
                if not len(result):
                    break
                result = np.intersect1d(result, p, assume_unique=True)
        else:
            result = all_refs
        for n in negative:
            if len(n) and len(result):
                result = np.setdiff1d(result, n, assume_unique=True)
        return result
