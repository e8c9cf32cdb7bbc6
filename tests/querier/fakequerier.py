"""An in-memory ``Querier`` for engine and API tests: labels -> numpy timestamps and values."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from store.chunks import Chunk
from store.labels import Labels
from store.matchers import Matcher
from store.storage import SelectHints


class FakeSeries:
    def __init__(self, labels: Labels, ts: np.ndarray, values: np.ndarray) -> None:
        self.labels = labels
        self._ts, self._values = ts, values

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ts, self._values

    def chunks(self) -> Iterator[Chunk]:
        raise NotImplementedError


class FakeQuerier:
    """Holds series in memory; ``select`` filters by matchers and clips samples to ``[mint, maxt]``."""

    def __init__(self, data: Mapping[Labels, tuple[Sequence[int], Sequence[float]]] | None = None) -> None:
        self.series: dict[Labels, tuple[np.ndarray, np.ndarray]] = {}
        self.selects: list[tuple[int, int, SelectHints | None]] = []
        for lbls, (ts, vs) in (data or {}).items():
            self.add(lbls, ts, vs)

    def add(self, labels: Labels | Mapping[str, str], ts: Sequence[int], values: Sequence[float]) -> None:
        if not isinstance(labels, Labels):
            labels = Labels.from_dict(labels)
        self.series[labels] = (np.asarray(ts, dtype=np.int64), np.asarray(values, dtype=np.float64))

    def _matching(self, matchers: Sequence[Matcher]) -> list[Labels]:
        return sorted(lb for lb in self.series if all(m.matches(lb.get(m.name)) for m in matchers))

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[FakeSeries]:
        self.selects.append((mint, maxt, hints))
        out = []
        for lb in self._matching(matchers):
            ts, vs = self.series[lb]
            keep = (ts >= mint) & (ts <= maxt)
            if keep.any():
                out.append(FakeSeries(lb, ts[keep], vs[keep]))
        return out

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        names = set()
        for s in self.select(matchers, mint, maxt):
            names.update(s.labels.names())
        return sorted(names)

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        vals = {s.labels.get(name) for s in self.select(matchers, mint, maxt)}
        vals.discard("")
        return sorted(vals)
