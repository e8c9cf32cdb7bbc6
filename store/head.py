"""The in-memory head: recent series, their XOR chunks, and the postings index.

Appends arrive as whole decoded remote-write requests (``store.writerequest``)
and are applied by compiled loops (``store.headkernels``) under one lock;
per-series rules are Prometheus': a timestamp before the series' last one is
out of order, the same timestamp with another value is a duplicate (with the
same value it is silently dropped), and a timestamp outside the accepted window
is out of bounds. Chunks are cut at 120 samples and at aligned
``chunk_range_ms`` boundaries, as Prometheus cuts them.

The head implements ``store.storage.Querier``. A selection captures, under the
lock, which chunks each series had and copies its open chunk; decoding happens
afterwards without the lock, since cut chunks never change.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import re2
import xxhash
from prometheus_client import CollectorRegistry, Counter, Gauge

from store import headkernels as K
from store.chunks import Chunk
from store.errors import CorruptChunk, UnsupportedVersion
from store.labels import METRIC_NAME, Labels
from store.matchers import Matcher
from store.postings import MemPostings
from store.changes import ChangeTracker
from store.storage import SampleBudget, SelectHints
from store.writerequest import (HAS_HISTOGRAMS, NEEDS_SLOW_PATH, S_FLAGS, S_HIST, S_KEY_LEN, S_KEY_OFF, S_SMP_N,
                               S_SMP_START, WriteRequest)
from store.xorfast import encode as xor_encode

INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max
_LEGACY_NAME = re2.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

# Prometheus' error texts (storage.Err*), the first words of our messages.
REASON_TEXT = {
    "out_of_order": "out of order sample",
    "duplicate_timestamp": "duplicate sample for timestamp",
    "out_of_bounds": "out of bounds",
    "invalid_labels": "invalid labels",
    "native_histograms": "native histograms are not supported",
}
_NOT_CREATED = -2  # ref of a new series none of whose samples could be appended
_VALIDATE = -3  # a new canonical series that failed the compiled checks: validated in Python

_STATUS_REASON = {K.OUT_OF_ORDER: "out_of_order", K.DUPLICATE: "duplicate_timestamp", K.OUT_OF_BOUNDS: "out_of_bounds"}


@dataclass(frozen=True, slots=True)
class HeadOptions:
    """``out_of_bounds_window_ms``: samples older than the head's newest sample minus this
    are out of bounds; ``max_ahead_ms``: samples further ahead of the writer's clock are
    out of bounds (Prometheus' remote-write receiver allows 10 minutes);
    ``name_validation``: ``utf8`` (Prometheus 3's default) or ``legacy`` (``[a-zA-Z_][a-zA-Z0-9_]*``)."""

    chunk_range_ms: int = 2 * 3600 * 1000
    out_of_bounds_window_ms: int = 28 * 3600 * 1000
    max_ahead_ms: int = 10 * 60 * 1000
    name_validation: str = "utf8"

    def __post_init__(self) -> None:
        if self.name_validation not in ("utf8", "legacy"):
            raise ValueError(f"name_validation must be utf8 or legacy, not {self.name_validation!r}")
        if self.chunk_range_ms <= 0:
            raise ValueError("chunk_range_ms must be positive")


@dataclass(slots=True)
class AppendResult:
    """What happened to one request: samples appended, and per rejection reason
    the number of samples and a message about the first one."""

    appended: int = 0
    rejected: dict[str, tuple[int, str]] = field(default_factory=dict)

    def reject(self, reason: str, count: int, example: str) -> None:
        n, first = self.rejected.get(reason, (0, example))
        self.rejected[reason] = (n + count, first)

    def message(self) -> str:
        """A readable summary, one line per reason, Prometheus' error text first."""
        return "\n".join(f"{REASON_TEXT[r]}: {n} sample(s) rejected; first: {ex}"
                         for r, (n, ex) in sorted(self.rejected.items()))


def validate_labels(pairs: list[tuple[bytes, bytes]], name_validation: str = "utf8") -> tuple[Labels | None, str]:
    """Labels of a new series as Prometheus 3 checks them, or an error message: UTF-8, no empty
    or duplicate names, a metric name, and legacy name syntax if ``name_validation`` says so.
    Empty values drop their label, as in Prometheus."""
    out = []
    for n, v in pairs:
        try:
            name, value = n.decode("utf-8"), v.decode("utf-8")
        except UnicodeDecodeError:
            return None, f"label {n!r}={v!r} is not valid UTF-8"
        if not name:
            return None, f"empty label name (with value {value!r})"
        if name_validation == "legacy" and not _LEGACY_NAME.fullmatch(name):
            return None, f"invalid label name {name!r}"
        if value:
            out.append((name, value))
    out.sort()
    for a, b in zip(out, out[1:]):
        if a[0] == b[0]:
            return None, f'duplicate label name "{a[0]}" in series {{{_fmt(out)}}}'
    labels = Labels.sorted_unchecked(out)
    if not labels.get(METRIC_NAME):
        return None, f"missing metric name (__name__ label) in series {{{_fmt(out)}}}"
    if name_validation == "legacy" and not _LEGACY_NAME.fullmatch(labels.name.replace(":", "_")):
        return None, f"invalid metric name {labels.name!r}"
    return labels, ""


class Head:
    """Thread-safe in-memory storage of recent series (see module docstring)."""

    def __init__(self, options: HeadOptions = HeadOptions(), registry: CollectorRegistry | None = None) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._labels: list[Labels] = []
        self._postings = MemPostings()
        self._max_t = INT64_MIN
        self._min_valid = INT64_MIN  # appends older than this are out of bounds (persisted windows)
        self.changes = ChangeTracker()  # where appends changed the data, for results caches
        n = 1024
        # Series table (power-of-two size, at most half full).
        self._table = K.new_table(2 * n)
        # The series' canonical keys back to back (a table row says where each one is).
        self._keys = np.zeros(64 * n, dtype=np.uint8)
        self._keys_used = 0
        self._open_ts = np.zeros((n, K.MAX_SAMPLES), dtype=np.int64)
        self._open_vb = np.zeros((n, K.MAX_SAMPLES), dtype=np.uint64)
        self._open_n = np.zeros(n, dtype=np.int64)
        self._last_ts = np.full(n, INT64_MIN, dtype=np.int64)
        self._last_vb = np.zeros(n, dtype=np.uint64)
        self._s_mint = np.full(n, INT64_MIN, dtype=np.int64)
        self._s_first = np.full(n, -1, dtype=np.int64)
        self._s_last = np.full(n, -1, dtype=np.int64)
        # Per closed chunk, and the arena of their bytes.
        self._c_mint = np.zeros(4 * n, dtype=np.int64)
        self._c_maxt = np.zeros(4 * n, dtype=np.int64)
        self._c_off = np.zeros(4 * n, dtype=np.int64)
        self._c_len = np.zeros(4 * n, dtype=np.int64)
        self._c_next = np.full(4 * n, -1, dtype=np.int64)
        self._n_chunks = 0
        self._arena = np.zeros(1 << 20, dtype=np.uint8)
        self._arena_used = 0
        self._init_metrics(registry)

    def _init_metrics(self, registry: CollectorRegistry | None) -> None:
        self._m_appended = self._m_rejected = None
        if registry is None:
            return
        self._m_appended = Counter("flashback_head_samples_appended_total",
                                   "Samples appended to the head.", registry=registry)
        self._m_rejected = Counter("flashback_head_samples_rejected_total",
                                   "Samples the head rejected, by reason.", ["reason"], registry=registry)
        for reason in REASON_TEXT:
            self._m_rejected.labels(reason)
        Gauge("flashback_head_series", "Series in the head.", registry=registry).set_function(self.num_series)
        Gauge("flashback_head_chunks", "Cut chunks in the head.", registry=registry).set_function(
            lambda: self._n_chunks)
        Gauge("flashback_head_chunk_bytes", "Bytes of cut chunks in the head.", registry=registry).set_function(
            lambda: self._arena_used)

    # ---- sizes -------------------------------------------------------------

    def num_series(self) -> int:
        return len(self._labels)

    def tsdb_stats(self, limit: int = 10) -> dict:
        """The ``data`` of Prometheus' ``/api/v1/status/tsdb`` for this head."""
        st = self._postings.stats(limit)
        with self._lock:
            n = len(self._labels)
            mints = self._s_mint[:n]
            mints = mints[mints != INT64_MIN]
            min_t = int(mints.min()) if len(mints) else 0
            max_t = self._max_t if n else 0
            chunks = self._n_chunks + int(np.count_nonzero(self._open_n[:n]))

        def named(items: list[tuple[str, int]]) -> list[dict]:
            return [{"name": k, "value": v} for k, v in items]

        return {"headStats": {"numSeries": n, "numLabelPairs": st["num_pairs"][0][1], "chunkCount": chunks,
                              "minTime": min_t, "maxTime": max_t},
                "seriesCountByMetricName": named(st["series_by_metric"]),
                "labelValueCountByLabelName": named(st["values_by_name"]),
                "memoryInBytesByLabelName": named(st["bytes_by_name"]),
                "seriesCountByLabelValuePair": named(st["series_by_pair"])}

    @property
    def max_time(self) -> int:
        """Newest sample timestamp (ms), or the minimum int64 when empty."""
        return self._max_t

    # ---- appending ---------------------------------------------------------

    def append(self, req: WriteRequest, now_ms: int, change_seq: int | None = None) -> AppendResult:
        """Applies a decoded request; deterministic given the head's state and ``now_ms``.
        ``change_seq``: the sequence ``changes`` records the request's samples under (a head
        replica's log sequence), by default the tracker's next."""
        result = AppendResult()
        with self._lock:
            bounds = self._bounds(now_ms)
            refs = self._resolve(req, result, bounds)
            self._append_samples(req, refs, bounds, result, change_seq)
        if self._m_appended is not None:
            self._m_appended.inc(result.appended)
            for reason, (n, _) in result.rejected.items():
                self._m_rejected.labels(reason).inc(n)
        return result

    def _bounds(self, now_ms: int) -> tuple[int, int]:
        """The oldest and newest timestamps an append may have now (ms)."""
        o = self.options
        min_valid = INT64_MIN if self._max_t == INT64_MIN else self._max_t - o.out_of_bounds_window_ms
        return max(min_valid, self._min_valid), now_ms + o.max_ahead_ms

    def _resolve(self, req: WriteRequest, result: AppendResult, bounds: tuple[int, int]) -> np.ndarray:
        """Series refs of the request, creating new series; -1 for rejected series, _NOT_CREATED
        for new series none of whose samples is within ``bounds`` (as Prometheus checks the
        minimum valid time before it creates a series)."""
        ns = req.num_series
        refs = np.empty(ns, dtype=np.int64)
        ser = req.series
        missing = K.lookup(self._table, self._keys, req.hashes, ser[:, S_KEY_OFF], ser[:, S_KEY_LEN], req.keys, refs)
        if not missing and (req.canonical or not ser[:, S_FLAGS].any()):
            return refs  # known series only, canonical, no histograms: nothing to create, check or reject
        slow = (ser[:, S_FLAGS] & NEEDS_SLOW_PATH) != 0
        new = np.flatnonzero((refs < 0) & ~slow)
        if len(new):
            self._create_canonical(req, new, refs, bounds)
        for i in np.flatnonzero(slow | (refs == _VALIDATE)).tolist():
            labels, err = self._validate(req.label_pairs(i))
            if err:
                refs[i] = -1
                if ser[i, S_SMP_N]:
                    result.reject("invalid_labels", int(ser[i, S_SMP_N]), err)
                continue
            if refs[i] < 0:  # new: only if a sample may be appended
                a, n = int(ser[i, S_SMP_START]), int(ser[i, S_SMP_N])
                t = req.ts[a:a + n]
                if n and not ((t >= bounds[0]) & (t <= bounds[1])).any():
                    refs[i] = _NOT_CREATED
                    continue
            refs[i] = self._get_or_create(labels)
        hist = np.flatnonzero((ser[:, S_FLAGS] & HAS_HISTOGRAMS) != 0)
        if len(hist):
            i = int(hist[0])
            pairs = ", ".join(f"{n.decode(errors='replace')}={v.decode(errors='replace')!r}"
                              for n, v in req.label_pairs(i))
            result.reject("native_histograms", int(ser[hist, S_HIST].sum()), f"series {{{pairs}}}")
        return refs

    def _create_canonical(self, req: WriteRequest, idx: np.ndarray, refs: np.ndarray,
                          bounds: tuple[int, int]) -> None:
        """Creates the new series ``idx`` of ``req`` whose keys the scanner found canonical, all at
        once: the same checks as ``validate_labels`` run compiled over the keys, and a key that
        fails them is marked ``_VALIDATE`` for the Python path, which words the error."""
        ser = req.series
        key_off, key_len = ser[:, S_KEY_OFF], ser[:, S_KEY_LEN]
        ok = np.empty(len(idx), dtype=np.int8)
        K.check_new_keys(req.keys, key_off, key_len, idx, self.options.name_validation == "legacy", ok)
        bad = ok != K.KEY_OK
        if bad.any():
            refs[idx[bad]] = _VALIDATE
            idx = idx[~bad]
        in_bounds = np.empty(len(idx), dtype=np.bool_)
        K.any_in_bounds(req.ts, ser[:, S_SMP_START], ser[:, S_SMP_N], idx, bounds[0], bounds[1], in_bounds)
        if not in_bounds.all():
            refs[idx[~in_bounds]] = _NOT_CREATED
            idx = idx[in_bounds]
        if not len(idx):
            return
        first = len(self._labels)
        self._reserve(first + len(idx), int(key_len[idx].sum()))
        created = np.empty(len(idx), dtype=np.int64)
        n, self._keys_used, nc = K.insert_new(
            self._table, self._keys, self._keys_used, first, req.hashes, key_off, key_len, req.keys, idx, refs, created)
        keys = req.keys
        new = [Labels.from_canonical(keys[o:o + m].tobytes())
               for o, m in zip(key_off[created[:nc]].tolist(), key_len[created[:nc]].tolist())]
        self._labels.extend(new)
        self._postings.add_many(first, new)
        assert n == len(self._labels)

    def _reserve(self, n_series: int, key_bytes: int) -> None:
        """Room for ``n_series`` series in all and ``key_bytes`` more key bytes."""
        while n_series > self._open_n.shape[0]:
            self._grow_series()
        if self._keys_used + key_bytes > self._keys.shape[0]:
            self._keys = _grown(self._keys, self._keys_used + key_bytes)
        size = self._table.shape[0]
        while 2 * n_series > size:
            size *= 2
        if size != self._table.shape[0]:
            self._rehash(size)

    def _validate(self, pairs: list[tuple[bytes, bytes]]) -> tuple[Labels | None, str]:
        return validate_labels(pairs, self.options.name_validation)

    def _get_or_create(self, labels: Labels) -> int:
        key = labels.canonical()
        h = xxhash.xxh64_intdigest(key)
        kb = np.frombuffer(key, dtype=np.uint8)
        out = np.empty(1, dtype=np.int64)
        K.lookup(self._table, self._keys, np.array([h], dtype=np.uint64), np.zeros(1, np.int64),
                 np.array([len(key)]), kb, out)
        if out[0] >= 0:
            return int(out[0])
        return self._create(labels, key, h)

    def _create(self, labels: Labels, key: bytes, h: int) -> int:
        ref = len(self._labels)
        self._reserve(ref + 1, len(key))
        self._keys[self._keys_used:self._keys_used + len(key)] = np.frombuffer(key, dtype=np.uint8)
        K.insert(self._table, np.uint64(h), ref, self._keys_used, len(key))
        self._keys_used += len(key)
        self._labels.append(labels)
        self._postings.add(ref, labels)
        return ref

    def _grow_series(self) -> None:
        n = 2 * self._open_n.shape[0]
        for name in ("_open_n", "_last_vb"):
            setattr(self, name, _resized(getattr(self, name), n, 0))
        for name in ("_last_ts", "_s_mint"):
            setattr(self, name, _resized(getattr(self, name), n, INT64_MIN))
        for name in ("_s_first", "_s_last"):
            setattr(self, name, _resized(getattr(self, name), n, -1))
        for name in ("_open_ts", "_open_vb"):
            old = getattr(self, name)
            new = np.zeros((n, K.MAX_SAMPLES), dtype=old.dtype)
            new[:old.shape[0]] = old
            setattr(self, name, new)

    def _rehash(self, size: int) -> None:
        table = K.new_table(size)
        K.rehash(self._table, table)
        self._table = table

    def _append_samples(self, req: WriteRequest, refs: np.ndarray, bounds: tuple[int, int],
                        result: AppendResult, change_seq: int | None) -> None:
        n = req.num_samples
        if n == 0:
            return
        srefs = refs[req.sample_series] if req.num_series else np.empty(0, np.int64)
        status = np.empty(n, dtype=np.int8)
        o = self.options
        min_valid, max_valid = bounds
        i = 0
        appended, lo, hi = 0, INT64_MAX, INT64_MIN
        while True:
            i, self._n_chunks, self._arena_used, ok, ok_lo, ok_hi = K.append(
                srefs, req.ts, req.vbits, i, min_valid, max_valid, o.chunk_range_ms,
                self._open_ts, self._open_vb, self._open_n, self._last_ts, self._last_vb, self._s_mint,
                self._s_first, self._s_last, self._c_mint, self._c_maxt, self._c_off, self._c_len, self._c_next,
                self._n_chunks, self._arena, self._arena_used, status)
            appended, lo, hi = appended + ok, min(lo, ok_lo), max(hi, ok_hi)
            if i >= n:
                break
            self._grow_chunks()
        result.appended = appended
        if appended:
            self._max_t = max(self._max_t, hi)
            self.changes.record(lo, hi, change_seq)
        if appended == n:
            return
        not_created = srefs == _NOT_CREATED
        if not_created.any():
            status[not_created] = K.OUT_OF_BOUNDS
        counts = np.bincount(status, minlength=6)
        for code, reason in _STATUS_REASON.items():
            if counts[code]:
                j = int(np.argmax(status == code))
                result.reject(reason, int(counts[code]), self._example(code, req, int(req.sample_series[j]),
                                                                        srefs[j], int(req.ts[j]), min_valid,
                                                                        max_valid))

    def _example(self, code: int, req: WriteRequest, i: int, ref: int, t: int, min_valid: int, max_valid: int) -> str:
        if ref >= 0:
            lbls = str(self._labels[ref])
        else:  # not created: the request's labels, validated and so printable as Prometheus prints them
            lbls, _ = self._validate(req.label_pairs(i))
        s = f"series {lbls} timestamp {t}"
        if code == K.OUT_OF_ORDER:
            return f"{s} is before the series' last sample at {int(self._last_ts[ref])}"
        if code == K.DUPLICATE:
            return f"{s} already has a sample with another value"
        if t > max_valid:
            return f"{s} is more than {self.options.max_ahead_ms // 1000}s ahead of the server's clock"
        return f"{s} is older than the accepted minimum {min_valid}"

    def _grow_chunks(self) -> None:
        if self._n_chunks + 1 >= self._c_mint.shape[0]:
            n = 2 * self._c_mint.shape[0]
            for name in ("_c_mint", "_c_maxt", "_c_off", "_c_len"):
                setattr(self, name, _resized(getattr(self, name), n, 0))
            self._c_next = _resized(self._c_next, n, -1)
        if self._arena_used + 4096 > self._arena.shape[0]:
            self._arena = _grown(self._arena, self._arena.shape[0] + 4096)

    # ---- querying ----------------------------------------------------------

    def select(self, matchers: Sequence[Matcher], mint: int, maxt: int,
               hints: SelectHints | None = None) -> list["HeadSeries"]:
        with self._lock:
            refs = self._matching(matchers, mint, maxt)
            sel = _Selection(
                refs=refs, mint=mint, maxt=maxt, last_chunk=self._s_last[refs],
                open_ts=self._open_ts[refs], open_vb=self._open_vb[refs], open_n=self._open_n[refs],
                s_first=self._s_first, c_mint=self._c_mint, c_maxt=self._c_maxt, c_off=self._c_off,
                c_len=self._c_len, c_next=self._c_next, arena=self._arena,
                budget=hints.budget if hints is not None else None)
            labels = [self._labels[r] for r in refs.tolist()]
        order = sorted(range(len(labels)), key=labels.__getitem__)
        return [HeadSeries(labels[k], sel, k) for k in order]

    def _matching(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> np.ndarray:
        n = len(self._labels)
        refs = self._postings.select(matchers, np.arange(n, dtype=np.int64))
        keep = (self._s_mint[refs] <= maxt) & (self._last_ts[refs] >= mint)
        return refs[keep]

    def label_names(self, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        with self._lock:
            if not matchers and self._overlaps(mint, maxt):
                return self._postings.label_names()
            refs = self._matching(matchers, mint, maxt)
            known = len(self._postings.label_names())
            names: set[str] = set()
            for r in refs.tolist():
                names.update(n for n, _ in self._labels[r])
                if len(names) == known:  # every name there is: the rest cannot add one
                    break
        return sorted(names)

    def label_values(self, name: str, matchers: Sequence[Matcher], mint: int, maxt: int) -> list[str]:
        with self._lock:
            if not matchers and self._overlaps(mint, maxt):
                return self._postings.label_values(name)
            refs = self._matching(matchers, mint, maxt)
            values = {self._labels[r].get(name) for r in refs.tolist()}
        values.discard("")
        return sorted(values)

    def _overlaps(self, mint: int, maxt: int) -> bool:
        n = len(self._labels)
        return n > 0 and int(self._s_mint[:n].min()) <= maxt and self._max_t >= mint

    # ---- persisted windows -------------------------------------------------

    @property
    def min_valid_time(self) -> int:
        """Appends older than this (ms) are rejected as out of bounds."""
        return self._min_valid

    def set_min_valid_time(self, t_ms: int) -> None:
        """Rejects appends older than ``t_ms`` from now on (a window up to it is in the bucket).

        Only moves forward, like Prometheus' ``minValidTime`` after a block is written.
        """
        with self._lock:
            self._min_valid = max(self._min_valid, t_ms)

    def truncate(self, before_ms: int) -> int:
        """Drops the samples older than ``before_ms`` that whole chunks hold, and the series left
        without samples; returns the number of series removed.

        Cut chunks whose newest sample is older than ``before_ms`` go; a chunk straddling it stays
        whole (queries clip by time anyway). The head is rebuilt under its lock, so appends and
        selects wait for it (proportional to the head's size; it runs once per persisted window).
        Series refs change: selections taken before keep their own copies.
        """
        with self._lock:
            n = len(self._labels)
            snap = _Selection(
                refs=np.arange(n, dtype=np.int64), mint=before_ms, maxt=np.iinfo(np.int64).max,
                last_chunk=self._s_last[:n], open_ts=self._open_ts[:n], open_vb=self._open_vb[:n],
                open_n=self._open_n[:n], s_first=self._s_first, c_mint=self._c_mint, c_maxt=self._c_maxt,
                c_off=self._c_off, c_len=self._c_len, c_next=self._c_next, arena=self._arena)
            fresh = Head(self.options)
            removed = 0
            for k, lbls in enumerate(self._labels):
                chunks = list(snap.stored_chunks(k))
                on = int(self._open_n[k])
                if not chunks and (on == 0 or int(self._last_ts[k]) < before_ms):
                    removed += 1
                    continue
                key = lbls.canonical()
                ref = fresh._create(lbls, key, xxhash.xxh64_intdigest(key))
                for c in chunks:
                    fresh._add_chunk(ref, c.mint, c.maxt, c.data)
                fresh._open_ts[ref, :on] = self._open_ts[k, :on]
                fresh._open_vb[ref, :on] = self._open_vb[k, :on]
                fresh._open_n[ref] = on
                fresh._last_ts[ref], fresh._last_vb[ref] = self._last_ts[k], self._last_vb[k]
                fresh._s_mint[ref] = chunks[0].mint if chunks else int(self._open_ts[k, 0])
            keep = {"options", "_lock", "_max_t", "_min_valid", "changes", "_m_appended", "_m_rejected"}
            for name, value in vars(fresh).items():
                if name not in keep:
                    setattr(self, name, value)
            return removed

    # ---- checkpoints -------------------------------------------------------

    def checkpoint_items(self) -> Iterator[tuple[bytes, bytes]]:
        """Consistent snapshot of the head as (key, value) items, captured when called.

        Format (version 1), see ``store/docs/format/checkpoint.md``.
        """
        with self._lock:
            n = len(self._labels)
            labels = list(self._labels)
            snap = _Selection(
                refs=np.arange(n, dtype=np.int64), mint=INT64_MIN, maxt=np.iinfo(np.int64).max,
                last_chunk=self._s_last[:n].copy(), open_ts=self._open_ts[:n].copy(),
                open_vb=self._open_vb[:n].copy(), open_n=self._open_n[:n].copy(), s_first=self._s_first,
                c_mint=self._c_mint, c_maxt=self._c_maxt, c_off=self._c_off, c_len=self._c_len,
                c_next=self._c_next, arena=self._arena)
            last_ts, last_vb, s_mint = self._last_ts[:n].copy(), self._last_vb[:n].copy(), self._s_mint[:n].copy()
            max_t, min_valid = self._max_t, self._min_valid
        return self._checkpoint_iter(labels, snap, last_ts, last_vb, s_mint, max_t, min_valid)

    @staticmethod
    def _checkpoint_iter(labels, snap, last_ts, last_vb, s_mint, max_t, min_valid) -> Iterator[tuple[bytes, bytes]]:
        yield b"h", struct.pack("<Bqq", CHECKPOINT_VERSION, max_t, min_valid)
        for k, lbls in enumerate(labels):
            key = lbls.canonical()
            parts = [struct.pack("<BI", CHECKPOINT_VERSION, len(key)), key,
                     struct.pack("<qqQ", int(s_mint[k]), int(last_ts[k]), int(last_vb[k]))]
            chunks = list(snap.stored_chunks(k))
            parts.append(struct.pack("<I", len(chunks)))
            for c in chunks:
                parts.append(struct.pack("<qqI", c.mint, c.maxt, len(c.data)))
                parts.append(c.data)
            on = int(snap.open_n[k])
            parts.append(struct.pack("<H", on))
            parts.append(snap.open_ts[k, :on].tobytes())
            parts.append(snap.open_vb[k, :on].tobytes())
            yield b"s" + struct.pack(">Q", k), b"".join(parts)

    def load_checkpoint(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Restores a checkpoint into an empty head."""
        if self._labels:
            raise RuntimeError("load_checkpoint needs an empty head")
        with self._lock:
            for key, value in items:
                if value[0] != CHECKPOINT_VERSION:
                    raise UnsupportedVersion(f"head checkpoint item version {value[0]} (this reader knows "
                                             f"{CHECKPOINT_VERSION})")
                if key == b"h":
                    self._max_t = struct.unpack_from("<q", value, 1)[0]
                    if len(value) >= 17:  # written since the minimum valid time was kept
                        self._min_valid = max(self._min_valid, struct.unpack_from("<q", value, 9)[0])
                elif key[:1] == b"s":
                    self._load_series(value)

    def _load_series(self, value: bytes) -> None:
        _, klen = struct.unpack_from("<BI", value, 0)
        p = 5
        key = value[p:p + klen]
        p += klen
        pairs = key.split(b"\xff")[:-1]
        labels = Labels.sorted_unchecked((pairs[i].decode(), pairs[i + 1].decode()) for i in range(0, len(pairs), 2))
        ref = self._create(labels, key, xxhash.xxh64_intdigest(key))
        self._s_mint[ref], self._last_ts[ref], self._last_vb[ref] = struct.unpack_from("<qqQ", value, p)
        p += 24
        (nc,) = struct.unpack_from("<I", value, p)
        p += 4
        for _ in range(nc):
            mint, maxt, ln = struct.unpack_from("<qqI", value, p)
            p += 20
            self._add_chunk(ref, mint, maxt, value[p:p + ln])
            p += ln
        (on,) = struct.unpack_from("<H", value, p)
        p += 2
        self._open_ts[ref, :on] = np.frombuffer(value, dtype=np.int64, count=on, offset=p)
        p += 8 * on
        self._open_vb[ref, :on] = np.frombuffer(value, dtype=np.uint64, count=on, offset=p)
        self._open_n[ref] = on

    def _add_chunk(self, ref: int, mint: int, maxt: int, data: bytes) -> None:
        while self._n_chunks + 1 >= self._c_mint.shape[0] or self._arena_used + len(data) > self._arena.shape[0]:
            self._grow_chunks()
            if self._arena_used + len(data) > self._arena.shape[0]:
                self._arena = _grown(self._arena, self._arena_used + len(data))
        c = self._n_chunks
        self._arena[self._arena_used:self._arena_used + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._c_mint[c], self._c_maxt[c], self._c_off[c], self._c_len[c] = mint, maxt, self._arena_used, len(data)
        self._c_next[c] = -1
        if self._s_last[ref] >= 0:
            self._c_next[self._s_last[ref]] = c
        else:
            self._s_first[ref] = c
        self._s_last[ref] = c
        self._arena_used += len(data)
        self._n_chunks += 1


CHECKPOINT_VERSION = 1


@dataclass(slots=True)
class _Selection:
    """Series captured by one ``select``: per-series state copied, chunk arrays shared."""

    refs: np.ndarray
    mint: int
    maxt: int
    last_chunk: np.ndarray
    open_ts: np.ndarray
    open_vb: np.ndarray
    open_n: np.ndarray
    s_first: np.ndarray
    c_mint: np.ndarray
    c_maxt: np.ndarray
    c_off: np.ndarray
    c_len: np.ndarray
    c_next: np.ndarray
    arena: np.ndarray
    budget: SampleBudget | None = None
    _decoded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    _decode_lock: threading.Lock = field(default_factory=threading.Lock)

    def gather(self, series: Sequence["HeadSeries"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``store.storage.Gatherer``: the samples of ``series`` of this selection, in their order,
        from one decoding of the whole selection."""
        ks = np.fromiter((s._k for s in series), dtype=np.int64, count=len(series))
        ts, vals, starts = self.decoded()
        lens = starts[ks + 1] - starts[ks]
        offsets = np.zeros(len(series) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        idx = np.repeat(starts[ks] - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
        return ts[idx], vals[idx], offsets

    def decoded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All selected series' samples at once (one compiled call): ts, values, per-series offsets."""
        with self._decode_lock:
            if self._decoded is None:
                args = (self.refs, self.last_chunk, self.open_n, self.mint, self.maxt, self.s_first,
                        self.c_mint, self.c_maxt, self.c_off, self.c_next, self.arena)
                cap = K.count_samples(*args)
                if self.budget is not None:
                    self.budget.take(cap)
                ts = np.empty(cap, dtype=np.int64)
                vb = np.empty(cap, dtype=np.uint64)
                starts = np.empty(len(self.refs) + 1, dtype=np.int64)
                n = K.collect(self.refs, self.last_chunk, self.open_ts, self.open_vb, self.open_n, self.mint,
                              self.maxt, self.s_first, self.c_mint, self.c_maxt, self.c_off, self.c_len,
                              self.c_next, self.arena, ts, vb, starts)
                if n < 0:
                    raise CorruptChunk("a head chunk does not decode")
                self._decoded = (ts[:n], vb[:n].view(np.float64), starts)
            return self._decoded

    def samples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        ts, vals, starts = self.decoded()
        a, b = starts[k], starts[k + 1]
        return ts[a:b], vals[a:b]

    def stored_chunks(self, k: int) -> Iterator[Chunk]:
        """Cut chunks of series ``k`` overlapping the selection, then its open samples as a chunk."""
        stop = int(self.last_chunk[k])
        c = int(self.s_first[self.refs[k]]) if stop >= 0 else -1
        while c >= 0:
            mint, maxt = int(self.c_mint[c]), int(self.c_maxt[c])
            if maxt >= self.mint and mint <= self.maxt:
                o = int(self.c_off[c])
                yield Chunk(mint, maxt, self.arena[o:o + int(self.c_len[c])].tobytes())
            if c == stop:
                break
            c = int(self.c_next[c])

    def chunks(self, k: int) -> Iterator[Chunk]:
        yield from self.stored_chunks(k)
        n = int(self.open_n[k])
        if n:
            ts = self.open_ts[k, :n]
            if ts[-1] >= self.mint and ts[0] <= self.maxt:
                yield Chunk(int(ts[0]), int(ts[-1]), xor_encode(ts, self.open_vb[k, :n].view(np.float64)))


class HeadSeries:
    """A series of a head selection (``store.storage.Series``)."""

    __slots__ = ("labels", "_sel", "_k")

    def __init__(self, labels: Labels, sel: _Selection, k: int) -> None:
        self.labels = labels
        self._sel = sel
        self._k = k

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        return self._sel.samples(self._k)

    def chunks(self) -> Iterator[Chunk]:
        return self._sel.chunks(self._k)

    @property
    def selection(self) -> "_Selection":
        """The selection this series is of (a ``store.storage.Gatherer``)."""
        return self._sel

    def __repr__(self) -> str:
        return f"HeadSeries({self.labels})"


def _fmt(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f'{n}="{v}"' for n, v in pairs)


def truncation_point(persisted_through_ms: int, now_ms: int, retention_ms: int, chunk_range_ms: int) -> int:
    """Before what time a head may drop its data: what is persisted and older than the retention,
    rounded down to a chunk-range boundary (as Prometheus truncates its head: one rebuild per
    boundary, not per call). Shared by the single node and the head replicas."""
    before = min(persisted_through_ms, now_ms - retention_ms)
    return before // chunk_range_ms * chunk_range_ms


def _resized(a: np.ndarray, n: int, fill: int) -> np.ndarray:
    new = np.full(n, fill, dtype=a.dtype)
    new[:a.shape[0]] = a
    return new


def _grown(a: np.ndarray, at_least: int) -> np.ndarray:
    n = a.shape[0]
    while n < at_least:
        n *= 2
    new = np.zeros(n, dtype=a.dtype)
    new[:a.shape[0]] = a
    return new


NowFn = Callable[[], int]
