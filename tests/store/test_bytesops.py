"""The memcmp/memcpy/load intrinsics against Python's own byte comparisons, slicing and int.from_bytes."""

import numba
import numpy as np

from store.bytesops import any_ff, any_high_but_ff, any_non_ascii, bytes_equal, load_u32le, load_u64le, memcmp, memcpy


@numba.njit
def _cmp(a, ao, b, bo, n):
    return memcmp(a, ao, b, bo, n)


@numba.njit
def _copy(dst, do, src, so, n):
    memcpy(dst, do, src, so, n)


@numba.njit
def _eq(a, ao, an, b, bo, bn):
    return bytes_equal(a, ao, an, b, bo, bn)


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def test_memcmp_orders_like_python_bytes():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 400, dtype=np.uint8)  # few symbols: many equal prefixes
    b = rng.integers(0, 4, 400, dtype=np.uint8)
    for _ in range(2000):
        ao, bo = rng.integers(0, 200, 2)
        n = int(rng.integers(0, 100))
        x, y = a[ao:ao + n].tobytes(), b[bo:bo + n].tobytes()
        assert _sign(_cmp(a, ao, b, bo, n)) == (x > y) - (x < y)
        assert _eq(a, ao, n, b, bo, n) == (x == y)
        assert not _eq(a, ao, n, b, bo, n + 1)
    assert _cmp(a, 5, a, 5, 50) == 0 and _cmp(a, 0, b, 0, 0) == 0
    assert _cmp(np.array([0xFF], np.uint8), 0, np.array([0x01], np.uint8), 0, 1) > 0  # unsigned bytes


def test_memcpy_copies_exactly_the_range():
    src = np.arange(256, dtype=np.uint8)
    for do, so, n in [(0, 0, 0), (3, 10, 7), (100, 0, 156), (0, 255, 1)]:
        dst = np.zeros(256, dtype=np.uint8)
        _copy(dst, do, src, so, n)
        want = np.zeros(256, dtype=np.uint8)
        want[do:do + n] = src[so:so + n]
        assert (dst == want).all()


@numba.njit
def _loads(a, p):
    return load_u64le(a, p), load_u32le(a, p)


def test_unaligned_loads_read_little_endian_words():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, 64, dtype=np.uint8)
    for p in range(0, 56):  # every alignment
        u64, u32 = _loads(a, p)
        assert u64 == int.from_bytes(a[p:p + 8].tobytes(), "little")
        assert u32 == int.from_bytes(a[p:p + 4].tobytes(), "little")


@numba.njit
def _scans(a, off, n):
    return any_non_ascii(a, off, n), any_ff(a, off, n), any_high_but_ff(a, off, n)


def test_word_scans_find_high_and_0xff_bytes_anywhere():
    rng = np.random.default_rng(11)
    for _ in range(3000):
        a = rng.integers(0, 0x80, 48, dtype=np.uint8)
        for _ in range(int(rng.integers(0, 4))):  # maybe high bytes or 0xff, anywhere, next to each other too
            a[rng.integers(0, 48)] = rng.choice([0x80, 0xC3, 0xFE, 0xFF, 0xFF])
        off, n = int(rng.integers(0, 20)), int(rng.integers(0, 28))
        part = a[off:off + n].tobytes()
        assert _scans(a, off, n) == (any(b >= 0x80 for b in part), 0xFF in part,
                                     any(0x80 <= b < 0xFF for b in part))
