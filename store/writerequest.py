"""Decoder of Prometheus remote-write 1.0 ``prometheus.WriteRequest`` into columns.

The hot path of ingestion: a numba-compiled scanner walks the raw protobuf
once, without building Python objects, and produces

* per series: where its labels and samples are, the byte span of its whole
  TimeSeries field, the canonical label bytes (``name 0xff value 0xff ...``,
  see ``store/labels.py``) and their xxHash64;
* per sample: timestamp (int64 ms), value bit pattern (uint64) and series index.

Series whose labels are not already canonical (unsorted or duplicate names,
empty names or values) are flagged for the slow path, which builds ``Labels``
in Python. Exemplars and metadata are skipped; native histograms are counted
so that they can be rejected with a clear message. The module does no I/O.
Wire schema (field numbers): WriteRequest{1 timeseries, 3 metadata};
TimeSeries{1 labels, 2 samples, 3 exemplars, 4 histograms}; Label{1 name,
2 value}; Sample{1 value double, 2 timestamp int64}.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Iterable

import numba
import numpy as np

from store.bytesops import any_ff, memcmp, memcpy
from store.errors import DecodeError
from store.xxhash64 import xxh64

# Series flags.
NEEDS_SLOW_PATH = 1  # labels not in canonical form: sort, check and hash in Python
HAS_HISTOGRAMS = 2

# Series row layout. S_SPAN_START/S_SPAN_END delimit the whole TimeSeries field in the body (its tag
# and length included), so that the concatenated spans of any subset of series are a valid
# WriteRequest on their own (the cluster-mode adapter splits requests by shard this way).
S_LAB_START, S_LAB_N, S_SMP_START, S_SMP_N, S_KEY_OFF, S_KEY_LEN, S_FLAGS, S_HIST, S_SPAN_START, S_SPAN_END = range(10)
SERIES_COLUMNS = 10

CAPACITY = 9  # output arrays too small: the caller retries with worst-case sizes

_ERRORS = {
    1: "truncated varint",
    2: "length-delimited field runs past the end of its message",
    3: "unsupported wire type",
    4: "field has the wrong wire type",
    5: "truncated fixed-size field",
}


# The helpers below take the request's array and are left to LLVM to inline. Inlined by numba
# (``inline="always"``) every call became an array variable of its own, with an atomic NRT
# reference count increment and decrement per field read: half of the scanner's time
# (0.75 -> 0.36 us per series, ``python3 -m store.bench_head DUMP``). The same holds for the
# byte scans of ``store.bytesops``.
@numba.njit(cache=True)
def _varint(buf, p, end):
    """Returns (value as uint64, new position); position -1 when truncated."""
    result = np.uint64(0)
    shift = np.uint64(0)
    while p < end:
        b = buf[p]
        p += 1
        result |= np.uint64(b & 0x7F) << shift
        if b < 0x80:
            return result, p
        shift += np.uint64(7)
        if shift >= np.uint64(70):
            return result, -1
    return result, -1


@numba.njit(cache=True)
def _skip(buf, p, end, wt):
    """Skips a field's payload; returns new position or a negative error code."""
    if wt == 0:
        _, p = _varint(buf, p, end)
        return p if p >= 0 else -1
    if wt == 1:
        return p + 8 if p + 8 <= end else -5
    if wt == 5:
        return p + 4 if p + 4 <= end else -5
    if wt == 2:
        n, p = _varint(buf, p, end)
        if p < 0:
            return -1
        if n > np.uint64(end - p):
            return -2
        return p + np.int64(n)
    return -3


@numba.njit(cache=True)
def _cmp(buf, a, alen, b, blen):
    c = memcmp(buf, a, buf, b, min(alen, blen))
    if c != 0:
        return -1 if c < 0 else 1
    if alen == blen:
        return 0
    return -1 if alen < blen else 1


@numba.njit(cache=True, nogil=True)
def _scan(buf, ser, hashes, lab, smp_t, smp_v, smp_s, keys):
    """Fills the output arrays; returns (n_series, n_labels, n_samples, error_code, error_pos)."""
    end = buf.shape[0]
    p = 0
    ns = 0
    nl = 0
    nsm = 0
    nk = 0
    while p < end:
        field_start = p
        tag, p = _varint(buf, p, end)
        if p < 0:
            return ns, nl, nsm, 1, end
        field = tag >> np.uint64(3)
        wt = np.int64(tag & np.uint64(7))
        if field != np.uint64(1):
            q = _skip(buf, p, end, wt)
            if q < 0:
                return ns, nl, nsm, -q, p
            p = q
            continue
        if wt != 2:
            return ns, nl, nsm, 4, p
        ln, p = _varint(buf, p, end)
        if p < 0:
            return ns, nl, nsm, 1, end
        if ln > np.uint64(end - p):
            return ns, nl, nsm, 2, p
        send = p + np.int64(ln)
        # One TimeSeries in buf[p:send].
        if ns >= ser.shape[0]:
            return ns, nl, nsm, CAPACITY, p
        s = ns
        ns += 1
        ser[s, S_LAB_START] = nl
        ser[s, S_SMP_START] = nsm
        ser[s, S_SPAN_START] = field_start
        ser[s, S_SPAN_END] = send
        flags = 0
        nhist = 0
        while p < send:
            tag, p = _varint(buf, p, send)
            if p < 0:
                return ns, nl, nsm, 1, send
            f = tag >> np.uint64(3)
            wt = np.int64(tag & np.uint64(7))
            if f == np.uint64(1) or f == np.uint64(2):
                if wt != 2:
                    return ns, nl, nsm, 4, p
                ln, p = _varint(buf, p, send)
                if p < 0:
                    return ns, nl, nsm, 1, send
                if ln > np.uint64(send - p):
                    return ns, nl, nsm, 2, p
                mend = p + np.int64(ln)
                if f == np.uint64(1):  # Label
                    no = p
                    nln = 0
                    vo = p
                    vln = 0
                    while p < mend:
                        tag, p = _varint(buf, p, mend)
                        if p < 0:
                            return ns, nl, nsm, 1, mend
                        lf = tag >> np.uint64(3)
                        lwt = np.int64(tag & np.uint64(7))
                        if lf == np.uint64(1) or lf == np.uint64(2):
                            if lwt != 2:
                                return ns, nl, nsm, 4, p
                            sl, p = _varint(buf, p, mend)
                            if p < 0:
                                return ns, nl, nsm, 1, mend
                            if sl > np.uint64(mend - p):
                                return ns, nl, nsm, 2, p
                            if lf == np.uint64(1):
                                no = p
                                nln = np.int64(sl)
                            else:
                                vo = p
                                vln = np.int64(sl)
                            p += np.int64(sl)
                        else:
                            q = _skip(buf, p, mend, lwt)
                            if q < 0:
                                return ns, nl, nsm, -q, p
                            p = q
                    if nl >= lab.shape[0] or nk + nln + vln + 2 > keys.shape[0]:
                        return ns, nl, nsm, CAPACITY, p
                    nk += nln + vln + 2  # reserve key space; written below
                    if nln == 0 or vln == 0 or any_ff(buf, no, nln) or any_ff(buf, vo, vln):
                        # Empty names and values are dropped or refused; a 0xff byte (never in
                        # valid UTF-8) would read as a separator in the canonical key.
                        flags |= NEEDS_SLOW_PATH
                    if nl > ser[s, S_LAB_START]:
                        c = _cmp(buf, lab[nl - 1, 0], lab[nl - 1, 1], no, nln)
                        if c >= 0:
                            flags |= NEEDS_SLOW_PATH
                    lab[nl, 0] = no
                    lab[nl, 1] = nln
                    lab[nl, 2] = vo
                    lab[nl, 3] = vln
                    nl += 1
                else:  # Sample
                    v = np.uint64(0)
                    t = np.uint64(0)
                    while p < mend:
                        tag, p = _varint(buf, p, mend)
                        if p < 0:
                            return ns, nl, nsm, 1, mend
                        sf = tag >> np.uint64(3)
                        swt = np.int64(tag & np.uint64(7))
                        if sf == np.uint64(1):
                            if swt != 1:
                                return ns, nl, nsm, 4, p
                            if p + 8 > mend:
                                return ns, nl, nsm, 5, p
                            v = np.uint64(0)
                            for i in range(7, -1, -1):
                                v = (v << np.uint64(8)) | np.uint64(buf[p + i])
                            p += 8
                        elif sf == np.uint64(2):
                            if swt != 0:
                                return ns, nl, nsm, 4, p
                            t, p = _varint(buf, p, mend)
                            if p < 0:
                                return ns, nl, nsm, 1, mend
                        else:
                            q = _skip(buf, p, mend, swt)
                            if q < 0:
                                return ns, nl, nsm, -q, p
                            p = q
                    if nsm >= smp_t.shape[0]:
                        return ns, nl, nsm, CAPACITY, p
                    smp_t[nsm] = np.int64(t)
                    smp_v[nsm] = v
                    smp_s[nsm] = s
                    nsm += 1
                p = mend
            else:
                if f == np.uint64(4):
                    nhist += 1
                    flags |= HAS_HISTOGRAMS
                q = _skip(buf, p, send, wt)
                if q < 0:
                    return ns, nl, nsm, -q, p
                p = q
        ser[s, S_LAB_N] = nl - ser[s, S_LAB_START]
        ser[s, S_SMP_N] = nsm - ser[s, S_SMP_START]
        ser[s, S_FLAGS] = flags
        ser[s, S_HIST] = nhist
        # Canonical key: name 0xff value 0xff per label (space was reserved while scanning).
        nk = ser[s - 1, S_KEY_OFF] + ser[s - 1, S_KEY_LEN] if s > 0 else 0
        ser[s, S_KEY_OFF] = nk
        for li in range(ser[s, S_LAB_START], nl):
            memcpy(keys, nk, buf, lab[li, 0], lab[li, 1])
            nk += lab[li, 1]
            keys[nk] = 0xFF
            nk += 1
            memcpy(keys, nk, buf, lab[li, 2], lab[li, 3])
            nk += lab[li, 3]
            keys[nk] = 0xFF
            nk += 1
        ser[s, S_KEY_LEN] = nk - ser[s, S_KEY_OFF]
        hashes[s] = xxh64(keys, ser[s, S_KEY_OFF], ser[s, S_KEY_LEN])
    return ns, nl, nsm, 0, 0


@dataclass(slots=True)
class WriteRequest:
    """A decoded WriteRequest: column arrays over the raw protobuf ``buf``."""

    buf: np.ndarray  # uint8, the protobuf bytes the offsets point into
    series: np.ndarray  # int64[n_series, SERIES_COLUMNS], see S_* columns
    hashes: np.ndarray  # uint64[n_series]
    labels: np.ndarray  # int64[n_labels, 4]: name_off, name_len, value_off, value_len
    keys: np.ndarray  # uint8, canonical label bytes of every series
    ts: np.ndarray  # int64[n_samples]
    vbits: np.ndarray  # uint64[n_samples]
    sample_series: np.ndarray  # int64[n_samples]: index into series
    # Whether every series is known to have canonical labels and no histograms (no S_FLAGS set)
    # without looking: true of columns records (``store.shardrecord``).
    canonical: ClassVar[bool] = False

    @property
    def num_series(self) -> int:
        return self.series.shape[0]

    @property
    def num_samples(self) -> int:
        return self.ts.shape[0]

    def label_pairs(self, i: int) -> list[tuple[bytes, bytes]]:
        """Raw (name, value) byte pairs of series ``i`` as sent."""
        b = self.buf
        a, n = self.series[i, S_LAB_START], self.series[i, S_LAB_N]
        return [(b[no:no + nln].tobytes(), b[vo:vo + vln].tobytes())
                for no, nln, vo, vln in self.labels[a:a + n].tolist()]

    def key(self, i: int) -> bytes:
        o, n = self.series[i, S_KEY_OFF], self.series[i, S_KEY_LEN]
        return self.keys[o:o + n].tobytes()


def decode(body: bytes) -> WriteRequest:
    """Decodes uncompressed protobuf bytes; raises ``DecodeError`` on malformed input."""
    buf = np.frombuffer(body, dtype=np.uint8)
    n = len(body)
    # Typical encodings take >= 32 bytes per series (a metric name and a sample), >= 8 per
    # label and >= 12 per sample; if a request packs tighter, scan again with looser bounds and
    # at last the true one (every item takes >= 2 bytes). Arrays sized for the worst case at
    # once would be several times larger than the request, and allocating them anew from the
    # operating system cost ~70 page faults per 2000-series request (7% of its decoding).
    for series_cap, label_cap, sample_cap in ((n // 32 + 16, n // 8 + 16, n // 12 + 16),
                                              (n // 12 + 16, n // 4 + 16, n // 12 + 16),
                                              (n // 2 + 1, n // 2 + 1, n // 2 + 1)):
        ser = np.empty((series_cap, SERIES_COLUMNS), dtype=np.int64)
        hashes = np.empty(series_cap, dtype=np.uint64)
        lab = np.empty((label_cap, 4), dtype=np.int64)
        smp_t = np.empty(sample_cap, dtype=np.int64)
        smp_v = np.empty(sample_cap, dtype=np.uint64)
        smp_s = np.empty(sample_cap, dtype=np.int64)
        keys = np.empty(n + 2 * label_cap, dtype=np.uint8)
        ns, nl, nsm, err, pos = _scan(buf, ser, hashes, lab, smp_t, smp_v, smp_s, keys)
        if err != CAPACITY:
            break
    if err:
        raise DecodeError(f"invalid protobuf WriteRequest: {_ERRORS.get(err, 'malformed')} at byte {pos}")
    return WriteRequest(buf, ser[:ns], hashes[:ns], lab[:nl], keys, smp_t[:nsm], smp_v[:nsm], smp_s[:nsm])


def _uvarint(x: int) -> bytes:
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _uvarint(num << 3 | 2) + _uvarint(len(payload)) + payload


def encode(series: Iterable[tuple[Iterable[tuple[str, str]], Iterable[tuple[int, float]]]]) -> bytes:
    """Encodes ``[(label pairs, [(t_ms, value), ...]), ...]`` as a WriteRequest (uncompressed).

    For tools and for loading data in-process; labels are written in the given order.
    """
    out = []
    for labels, samples in series:
        parts = [_field(1, _field(1, n.encode()) + _field(2, v.encode())) for n, v in labels]
        for t, v in samples:
            body = b"\x09" + struct.pack("<d", v) + b"\x10" + _uvarint(t & 0xFFFFFFFFFFFFFFFF)
            parts.append(_field(2, body))
        out.append(_field(1, b"".join(parts)))
    return b"".join(out)
