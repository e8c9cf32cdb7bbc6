"""xxHash64 (seed 0) as a numba function, for hashing label bytes inside compiled loops.

Equal to ``xxhash.xxh64_intdigest`` (the reference, used in Python paths and in
tests); the algorithm is the published XXH64 specification.

Kernels in other modules inline these functions, and numba's on-disk cache does not notice
when this file changes: after editing it, delete the ``__pycache__/*.nbi``/``*.nbc`` files
(a fresh clone, or an install into a new environment, has none).
"""

from __future__ import annotations

import numba
import numpy as np

from store.bytesops import load_u32le, load_u64le

P1 = np.uint64(0x9E3779B185EBCA87)
P2 = np.uint64(0xC2B2AE3D27D4EB4F)
P3 = np.uint64(0x165667B19E3779F9)
P4 = np.uint64(0x85EBCA77C2B2AE63)
P5 = np.uint64(0x27D4EB2F165667C5)


@numba.njit(cache=True, inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(cache=True, inline="always")
def _round(acc, lane):
    acc = acc + lane * P2
    acc = _rotl(acc, 31)
    return acc * P1


@numba.njit(cache=True, inline="always")
def _merge(acc, v):
    acc = acc ^ _round(np.uint64(0), v)
    return acc * P1 + P4


@numba.njit(cache=True, nogil=True)
def xxh64(buf, start, length):
    """xxHash64 with seed 0 of ``buf[start:start+length]`` (uint8 array)."""
    p = start
    end = start + length
    if length >= 32:
        v1 = P1 + P2
        v2 = P2
        v3 = np.uint64(0)
        v4 = np.uint64(0) - P1
        while p + 32 <= end:
            v1 = _round(v1, load_u64le(buf, p))
            v2 = _round(v2, load_u64le(buf, p + 8))
            v3 = _round(v3, load_u64le(buf, p + 16))
            v4 = _round(v4, load_u64le(buf, p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = P5
    h = h + np.uint64(length)
    while p + 8 <= end:
        h = h ^ _round(np.uint64(0), load_u64le(buf, p))
        h = _rotl(h, 27) * P1 + P4
        p += 8
    if p + 4 <= end:
        h = h ^ (load_u32le(buf, p) * P1)
        h = _rotl(h, 23) * P2 + P3
        p += 4
    while p < end:
        h = h ^ (np.uint64(buf[p]) * P5)
        h = _rotl(h, 11) * P1
        p += 1
    h = h ^ (h >> np.uint64(33))
    h = h * P2
    h = h ^ (h >> np.uint64(29))
    h = h * P3
    h = h ^ (h >> np.uint64(32))
    return h
