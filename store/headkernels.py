"""Compiled loops of the head: the series hash table, appending, and reading chunks.

The head keeps its state in flat numpy arrays so that these numba functions
can work on whole requests and selections at once:

* series table: open addressing by xxHash64 of the canonical label bytes, with
  linear probing; equal hashes of different label sets (collisions) simply sit
  in consecutive slots and are told apart by comparing the bytes;
* per series: the open (not yet cut) chunk as raw timestamps and value bits,
  last timestamp/value, first timestamp, first/last closed chunk;
* per closed chunk: mint, maxt, offset and length in a byte arena of
  Prometheus XOR chunks, and the next chunk of the same series.

Nothing here locks; the head serialises calls.
"""

from __future__ import annotations

import numba
import numpy as np

from store.xorfast import decode_into, encode_into, max_chunk_bytes

MAX_SAMPLES = 120  # Prometheus cuts XOR chunks at 120 samples

# Append status per sample.
OK = 0
OUT_OF_ORDER = 1
DUPLICATE = 2
OUT_OF_BOUNDS = 3
IGNORED_SAME = 4  # same timestamp and value as the last sample: dropped silently, as Prometheus does
SKIPPED = 5  # series rejected before appending (invalid labels)


@numba.njit(cache=True, inline="always")
def _bytes_equal(a, ao, an, b, bo, bn):
    if an != bn:
        return False
    for i in range(an):
        if a[ao + i] != b[bo + i]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def lookup(t_hash, t_ref, s_key_off, s_key_len, s_keys, hashes, key_off, key_len, keys, out):
    """out[i] = ref of the series whose canonical key is keys[key_off[i]:+key_len[i]], or -1."""
    mask = t_hash.shape[0] - 1
    for i in range(hashes.shape[0]):
        h = hashes[i]
        slot = np.int64(h & np.uint64(mask))
        out[i] = -1
        while True:
            r = t_ref[slot]
            if r < 0:
                break
            if t_hash[slot] == h and _bytes_equal(s_keys, s_key_off[r], s_key_len[r], keys, key_off[i], key_len[i]):
                out[i] = r
                break
            slot = (slot + 1) & mask


@numba.njit(cache=True, nogil=True)
def insert(t_hash, t_ref, h, ref):
    """Puts ``ref`` in the first free slot of its probe sequence (the table must have room)."""
    mask = t_hash.shape[0] - 1
    slot = np.int64(h & np.uint64(mask))
    while t_ref[slot] >= 0:
        slot = (slot + 1) & mask
    t_hash[slot] = h
    t_ref[slot] = ref


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
    """Appends samples ``start..`` in order; returns (next sample, n_chunks, arena bytes used).

    Stops early (next sample < len) when the chunk arrays or the arena are
    full: the caller grows them and calls again from the returned index.
    """
    need = max_chunk_bytes(MAX_SAMPLES)
    cap = c_mint.shape[0]
    for i in range(start, refs.shape[0]):
        if n_chunks + 1 >= cap or used + need > arena.shape[0]:
            return i, n_chunks, used
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
        if n + 1 == MAX_SAMPLES:
            used = _cut(ref, open_ts, open_vb, open_n, s_first, s_last, c_mint, c_maxt, c_off, c_len, c_next,
                        n_chunks, arena, used)
            n_chunks += 1
    return refs.shape[0], n_chunks, used


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
