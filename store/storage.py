"""The narrow read interfaces every data source implements (Prometheus ``storage/interface.go``).

The head, blocks, the merged view and the gRPC client of a remote head all
implement ``Querier``; the PromQL engine, remote read and the compactor only
ever see this interface.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from store.chunks import MAX_SAMPLES_PER_CHUNK, Chunk
from store.errors import SampleLimitExceeded
from store.labels import Labels
from store.matchers import Matcher


class SampleBudget:
    """How many samples one query may still load into memory, shared by every source a
    selection reads (thread-safe).

    Sources call ``take`` with the number of samples they are about to materialise, before
    decoding them, so a runaway selection stops before it has allocated its samples instead of
    after; ``take`` raises ``SampleLimitExceeded`` once the total passes ``limit``.
    """

    __slots__ = ("limit", "_taken", "_lock")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._taken = 0
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        return self._taken

    def take(self, n: int) -> None:
        with self._lock:
            self._taken += n
            over = self._taken > self.limit
        if over:
            raise SampleLimitExceeded(f"selection would load more than {self.limit} samples")


@dataclass(frozen=True, slots=True)
class SelectHints:
    """What the caller will do with the data; implementations may use it to read less.

    ``start``/``end`` bound the samples needed (ms); ``step`` and ``range`` are
    those of the PromQL evaluation (ms, 0 when not applicable), ``func`` the
    function applied to the selection, if any. ``budget``, when set, must be
    charged with the samples a source materialises, before it decodes them.
    ``notes``, when set, collects info annotations a source makes about how it
    answered (e.g. that downsampled data did); the engine reports them as ``infos``.
    """

    start: int
    end: int
    step: int = 0
    range: int = 0
    func: str = ""
    budget: SampleBudget | None = None
    notes: list[str] | None = None


class Series(Protocol):
    """One series of a selection. ``labels`` is immutable; the data methods may be called repeatedly."""

    labels: Labels

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Timestamps (int64 ms, strictly increasing) and values (float64) in the selected range."""

    def chunks(self) -> Iterator[Chunk]:
        """Encoded chunks covering the selected range, in time order, as stored (not re-cut)."""


class Gatherer(Protocol):
    """A selection that reads the samples of several of its series in one step (the head's)."""

    def gather(self, series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The samples of ``series`` (all of this selection, any order) end to end: timestamps,
        values and per-series offsets (series ``i`` owns ``[offsets[i], offsets[i+1])``)."""


def common_gatherer(series: Sequence[Series]) -> Gatherer | None:
    """The selection every one of ``series`` comes from, if it is a ``Gatherer`` (series expose it
    as their ``selection``); None otherwise, and the caller reads the series one by one."""
    if not series:
        return None
    sel = getattr(series[0], "selection", None)
    if sel is None or not hasattr(sel, "gather"):
        return None
    for s in series:
        if getattr(s, "selection", None) is not sel:
            return None
    return sel


class Querier(Protocol):
    """Reads series by label matchers and time.

    Thread-safe: a querier may be used by many queries at once. Results are a
    consistent snapshot of what was committed when ``select`` returned; later
    appends do not change a returned series.
    """

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list[Series]:
        """Series matching all ``matchers`` with samples in ``[mint, maxt]``, sorted by labels."""

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        """Sorted label names of the series matching ``matchers`` with samples in ``[mint, maxt]``
        (all series if none; then an implementation may answer for more). With matchers, exactly
        the series ``select`` would return are named: the compactor asks whether a window holds data so."""

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        """Sorted values of label ``name`` among the series matching ``matchers``."""


class ArraySeries:
    """A ``Series`` whose samples are in memory (a block's, or several sources merged)."""

    __slots__ = ("labels", "_ts", "_vs")

    def __init__(self, labels: Labels, ts: np.ndarray, vs: np.ndarray) -> None:
        self.labels = labels
        self._ts = ts
        self._vs = vs

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ts, self._vs

    def chunks(self) -> Iterator[Chunk]:
        """XOR chunks of up to 120 samples, encoded on the fly."""
        from store import xorfast

        ts, vs = self._ts, self._vs
        for a in range(0, len(ts), MAX_SAMPLES_PER_CHUNK):
            b = min(a + MAX_SAMPLES_PER_CHUNK, len(ts))
            yield Chunk(int(ts[a]), int(ts[b - 1]), xorfast.encode(ts[a:b], vs[a:b]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.labels}, {len(self._ts)} samples)"
