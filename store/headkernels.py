"""Compiled loops of the head: the series hash table, appending, and reading chunks.

The head keeps its state in flat numpy arrays so that these numba functions
can work on whole requests and selections at once:

* series table: open addressing by xxHash64 of the canonical label bytes, with
  linear probing; equal hashes of different label sets (collisions) simply sit
  in consecutive slots and are told apart by comparing the bytes (memcmp); a
  slot's row holds the hash, the series ref and where its key is;
* per series: the open (not yet cut) chunk as raw timestamps and value bits,
  last timestamp/value, first timestamp, first/last closed chunk;
* per closed chunk: mint, maxt, offset and length in a byte arena of
  Prometheus XOR chunks, and the next chunk of the same series.

Nothing here locks; the head serialises calls.
"""

from __future__ import annotations

import numba
import numpy as np

from store.bytesops import bytes_equal as _bytes_equal
from store.xorfast import decode_into, encode_into, max_chunk_bytes

MAX_SAMPLES = 120  # Prometheus cuts XOR chunks at 120 samples

# Append status per sample.
OK = 0
OUT_OF_ORDER = 1
DUPLICATE = 2
OUT_OF_BOUNDS = 3
IGNORED_SAME = 4  # same timestamp and value as the last sample: dropped silently, as Prometheus does
SKIPPED = 5  # series rejected before appending (invalid labels)


# Columns of the series table: one row per slot.
T_HASH, T_REF, T_KEY_OFF, T_KEY_LEN = range(4)
TABLE_COLUMNS = 4


def new_table(size: int) -> np.ndarray:
    """An empty series table of ``size`` slots (a power of two)."""
    t = np.zeros((size, TABLE_COLUMNS), dtype=np.int64)
    t[:, T_REF] = -1
    return t


@numba.njit(cache=True, inline="always")
def _probe(table, s_keys, h, keys, ko, kn):
    """(ref of the series with key keys[ko:ko+kn] and hash h, or -1; the slot where it is or
    where it would go)."""
    mask = table.shape[0] - 1
    hh = np.int64(h)
    slot = np.int64(h & np.uint64(mask))
    while True:
        r = table[slot, T_REF]
        if r < 0:
            return -1, slot
        if table[slot, T_HASH] == hh and _bytes_equal(s_keys, table[slot, T_KEY_OFF], table[slot, T_KEY_LEN],
                                                      keys, ko, kn):
            return r, slot
        slot = (slot + 1) & mask


@numba.njit(cache=True, nogil=True)
def lookup(table, s_keys, hashes, key_off, key_len, keys, out):
    """out[i] = ref of the series whose canonical key is keys[key_off[i]:+key_len[i]], or -1;
    returns how many were not found."""
    missing = 0
    for i in range(hashes.shape[0]):
        out[i], _ = _probe(table, s_keys, hashes[i], keys, key_off[i], key_len[i])
        if out[i] < 0:
            missing += 1
    return missing


@numba.njit(cache=True, nogil=True)
def insert(table, h, ref, key_off, key_len):
    """Puts ``ref`` (key at s_keys[key_off:+key_len]) in the first free slot of its probe
    sequence (the table must have room)."""
    mask = table.shape[0] - 1
    slot = np.int64(h & np.uint64(mask))
    while table[slot, T_REF] >= 0:
        slot = (slot + 1) & mask
    table[slot, T_HASH] = np.int64(h)
    table[slot, T_REF] = ref
    table[slot, T_KEY_OFF] = key_off
    table[slot, T_KEY_LEN] = key_len


# Why ``check_new_keys`` sends a new series to the Python validation (which words the error).
KEY_OK = 0
KEY_INVALID = 1


@numba.njit(cache=True, inline="always")
def _utf8_ok(b, a, end):
    """Whether b[a:end] is valid UTF-8 as Python decodes it (no surrogates, overlongs, > U+10FFFF)."""
    p = a
    while p < end:
        c = b[p]
        if c < 0x80:
            p += 1
            continue
        if 0xC2 <= c <= 0xDF:
            n, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            n, lo, hi = 2, 0xA0, 0xBF
        elif c == 0xED:
            n, lo, hi = 2, 0x80, 0x9F
        elif 0xE1 <= c <= 0xEF:
            n, lo, hi = 2, 0x80, 0xBF
        elif c == 0xF0:
            n, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            n, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            n, lo, hi = 3, 0x80, 0x8F
        else:
            return False
        if p + n >= end:
            return False
        if not (lo <= b[p + 1] <= hi):
            return False
        for k in range(2, n + 1):
            if not (0x80 <= b[p + k] <= 0xBF):
                return False
        p += n + 1
    return True


@numba.njit(cache=True, inline="always")
def legacy_name_ok(b, a, end, colon):
    """Whether b[a:end] matches [a-zA-Z_][a-zA-Z0-9_]* (with ``colon``, ':' allowed anywhere too)."""
    if a == end:
        return False
    for p in range(a, end):
        c = b[p]
        if (0x61 <= c <= 0x7A) or (0x41 <= c <= 0x5A) or c == 0x5F or (colon and c == 0x3A):
            continue
        if p > a and 0x30 <= c <= 0x39:
            continue
        return False
    return True


@numba.njit(cache=True, nogil=True)
def check_new_keys(keys, key_off, key_len, idx, legacy, out):
    """out[j] = KEY_OK if the canonical key of series idx[j] passes what a new series must
    (every name and value valid UTF-8, a ``__name__``, and with ``legacy`` the legacy name
    syntax), else KEY_INVALID. Keys come from the scanner's fast path: names sorted, unique and
    non-empty, values non-empty, every name and value followed by 0xff."""
    for j in range(idx.shape[0]):
        i = idx[j]
        p = key_off[i]
        end = p + key_len[i]
        ok = True
        has_name = False
        while p < end and ok:
            q = p
            while q < end and keys[q] != 0xFF:
                q += 1
            v = q + 1
            w = v
            while w < end and keys[w] != 0xFF:
                w += 1
            if w >= end:  # not name 0xff value 0xff: not a key this check knows
                ok = False
                break
            is_metric = (q - p == 8 and keys[p] == 0x5F and keys[p + 1] == 0x5F and keys[p + 2] == 0x6E
                         and keys[p + 3] == 0x61 and keys[p + 4] == 0x6D and keys[p + 5] == 0x65
                         and keys[p + 6] == 0x5F and keys[p + 7] == 0x5F)
            if is_metric:
                has_name = True
            if not (_utf8_ok(keys, p, q) and _utf8_ok(keys, v, w)):
                ok = False
            elif legacy and not legacy_name_ok(keys, p, q, False):
                ok = False
            elif legacy and is_metric and not legacy_name_ok(keys, v, w, True):
                ok = False
            p = w + 1
        out[j] = KEY_OK if ok and has_name else KEY_INVALID


@numba.njit(cache=True, nogil=True)
def any_in_bounds(ts, smp_start, smp_n, idx, lo, hi, out):
    """out[j]: series idx[j] has no samples, or one within [lo, hi]."""
    for j in range(idx.shape[0]):
        i = idx[j]
        a = smp_start[i]
        n = smp_n[i]
        ok = n == 0
        for k in range(a, a + n):
            if lo <= ts[k] <= hi:
                ok = True
                break
        out[j] = ok


@numba.njit(cache=True, nogil=True)
def insert_new(table, s_keys, keys_used, n_series, hashes, key_off, key_len, keys, idx, refs, created):
    """Resolves series idx[j] of a request that ``lookup`` did not find: one created earlier in
    this call (the same series twice in a request) is found, any other gets ref ``n_series``,
    ``n_series + 1``, ... with its key copied to the head's keys and inserted in the table.

    The caller makes room first (key bytes, a table at most half full after).
    Returns (n_series, keys_used, number created); created[:number] are the request indexes of
    the new series in ref order.
    """
    nc = 0
    for j in range(idx.shape[0]):
        i = idx[j]
        o = key_off[i]
        n = key_len[i]
        found, slot = _probe(table, s_keys, hashes[i], keys, o, n)
        if found >= 0:
            refs[i] = found
            continue
        ref = n_series
        n_series += 1
        s_keys[keys_used:keys_used + n] = keys[o:o + n]
        table[slot, T_HASH] = np.int64(hashes[i])
        table[slot, T_REF] = ref
        table[slot, T_KEY_OFF] = keys_used
        table[slot, T_KEY_LEN] = n
        keys_used += n
        refs[i] = ref
        created[nc] = i
        nc += 1
    return n_series, keys_used, nc


@numba.njit(cache=True, nogil=True)
def rehash(old, table):
    """Inserts every entry of the ``old`` table into the new, empty one."""
    mask = table.shape[0] - 1
    for k in range(old.shape[0]):
        if old[k, T_REF] < 0:
            continue
        slot = old[k, T_HASH] & mask
        while table[slot, T_REF] >= 0:
            slot = (slot + 1) & mask
        table[slot, :] = old[k, :]


@numba.njit(cache=True, inline="always")
def _range_end(t, chunk_range):
    # End (exclusive) of the aligned range holding t; floor division works for negative t.
    return (t // chunk_range + 1) * chunk_range


@numba.njit(cache=True, nogil=True)
def _cut(ref, open_ts, open_vb, open_n, s_first, s_last, c_mint, c_maxt, c_off, c_len, c_next, n_chunks,
         arena, used):
    n = open_n[ref]
    nb = encode_into(open_ts[ref], open_vb[ref], n, arena[used:])
    c = n_chunks
    c_mint[c] = open_ts[ref, 0]
    c_maxt[c] = open_ts[ref, n - 1]
    c_off[c] = used
    c_len[c] = nb
    c_next[c] = -1
    if s_last[ref] >= 0:
        c_next[s_last[ref]] = c
    else:
        s_first[ref] = c
    s_last[ref] = c
    open_n[ref] = 0
    return used + nb


@numba.njit(cache=True, nogil=True)
def append(refs, ts, vbits, start, min_valid, max_valid, chunk_range,
           open_ts, open_vb, open_n, last_ts, last_vb, s_mint, s_first, s_last,
           c_mint, c_maxt, c_off, c_len, c_next, n_chunks, arena, used, status):
    """Appends samples ``start..`` in order; returns (next sample, n_chunks, arena bytes used,
    samples appended, their lowest and highest timestamp).

    Stops early (next sample < len) when the chunk arrays or the arena are
    full: the caller grows them and calls again from the returned index.
    """
    need = max_chunk_bytes(MAX_SAMPLES)
    cap = c_mint.shape[0]
    ok = 0
    lo = np.iinfo(np.int64).max
    hi = np.iinfo(np.int64).min
    for i in range(start, refs.shape[0]):
        if n_chunks + 1 >= cap or used + need > arena.shape[0]:
            return i, n_chunks, used, ok, lo, hi
        ref = refs[i]
        if ref < 0:
            status[i] = SKIPPED
            continue
        t = ts[i]
        v = vbits[i]
        if t < min_valid or t > max_valid:
            status[i] = OUT_OF_BOUNDS
            continue
        lt = last_ts[ref]
        if t < lt:
            status[i] = OUT_OF_ORDER
            continue
        if t == lt:
            status[i] = IGNORED_SAME if v == last_vb[ref] else DUPLICATE
            continue
        n = open_n[ref]
        if n > 0 and t >= _range_end(open_ts[ref, 0], chunk_range):
            used = _cut(ref, open_ts, open_vb, open_n, s_first, s_last, c_mint, c_maxt, c_off, c_len, c_next,
                        n_chunks, arena, used)
            n_chunks += 1
            n = 0
        open_ts[ref, n] = t
        open_vb[ref, n] = v
        open_n[ref] = n + 1
        if lt == np.iinfo(np.int64).min:
            s_mint[ref] = t
        last_ts[ref] = t
        last_vb[ref] = v
        status[i] = OK
        ok += 1
        lo = min(lo, t)
        hi = max(hi, t)
        if n + 1 == MAX_SAMPLES:
            used = _cut(ref, open_ts, open_vb, open_n, s_first, s_last, c_mint, c_maxt, c_off, c_len, c_next,
                        n_chunks, arena, used)
            n_chunks += 1
    return refs.shape[0], n_chunks, used, ok, lo, hi


@numba.njit(cache=True, nogil=True)
def count_samples(refs, last_chunk, open_n, mint, maxt, s_first, c_mint, c_maxt, c_off, c_next, arena):
    """Upper bound of the samples the selected series hold in [mint, maxt], for allocating."""
    total = 0
    for k in range(refs.shape[0]):
        c = s_first[refs[k]] if last_chunk[k] >= 0 else -1
        while c >= 0:
            if c_maxt[c] >= mint and c_mint[c] <= maxt:
                total += (np.int64(arena[c_off[c]]) << 8) | np.int64(arena[c_off[c] + 1])
            if c == last_chunk[k]:
                break
            c = c_next[c]
        total += open_n[k]
    return total


@numba.njit(cache=True, nogil=True)
def collect(refs, last_chunk, open_ts, open_vb, open_n, mint, maxt, s_first, c_mint, c_maxt, c_off, c_len,
            c_next, arena, out_ts, out_vb, out_start):
    """Decodes the selected series' samples in [mint, maxt] into out_*; series k is out_start[k]:out_start[k+1].

    ``last_chunk``/``open_*`` are per selected series, captured under the head
    lock; chunks are immutable once cut, so the rest is read without it.
    Returns -1 if a chunk does not decode.
    """
    pos = 0
    for k in range(refs.shape[0]):
        out_start[k] = pos
        c = s_first[refs[k]] if last_chunk[k] >= 0 else -1
        while c >= 0:
            if c_maxt[c] >= mint and c_mint[c] <= maxt:
                o = c_off[c]
                n = decode_into(arena[o:o + c_len[c]], out_ts[pos:], out_vb[pos:])
                if n < 0:
                    return -1
                w = pos
                for j in range(pos, pos + n):
                    t = out_ts[j]
                    if mint <= t <= maxt:
                        out_ts[w] = t
                        out_vb[w] = out_vb[j]
                        w += 1
                pos = w
            if c == last_chunk[k]:
                break
            c = c_next[c]
        for j in range(open_n[k]):
            t = open_ts[k, j]
            if mint <= t <= maxt:
                out_ts[pos] = t
                out_vb[pos] = open_vb[k, j]
                pos += 1
    out_start[refs.shape[0]] = pos
    return pos
