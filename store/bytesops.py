"""C's memcmp and memcpy, and unaligned little-endian loads, on byte arrays, for compiled loops
(numba intrinsics).

numba compiles a byte-by-byte loop with an early exit into one comparison per byte; on label
keys of ~100 bytes libc's vectorised routines are several times faster (series lookup in the
head: 0.18 -> 0.04 us per series). Likewise a word assembled from eight byte reads stays eight
loads (XXH64 of label keys: 50 -> 15 ns per key). All take contiguous uint8 arrays and offsets,
and do no bounds checks: callers pass ranges inside the arrays.

Kernels in other modules inline these functions, and numba's on-disk cache does not notice
when this file changes: after editing it, delete the ``__pycache__/*.nbi``/``*.nbc`` files
(a fresh clone, or an install into a new environment, has none).
"""

from __future__ import annotations

import sys

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


def _byte_arrays(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.dtype == types.uint8 and a.layout == "C" and a.ndim == 1
               for a in arrays)


def _address(context, builder, array_type, array, offset_type, offset):
    arr = context.make_array(array_type)(context, builder, array)
    at = builder.gep(arr.data, [context.cast(builder, offset, offset_type, types.int64)])
    return builder.bitcast(at, ir.IntType(8).as_pointer())


@intrinsic
def memcmp(typingctx, a, ao, b, bo, n):
    """memcmp(a + ao, b + bo, n): negative, 0 or positive as a[ao:ao+n] sorts before, equal to or
    after b[bo:bo+n]."""
    if not _byte_arrays(a, b):
        return None
    sig = types.int32(a, ao, b, bo, n)

    def codegen(context, builder, signature, args):
        t = signature.args
        ptr = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), [ptr, ptr, ir.IntType(64)]), "memcmp")
        return builder.call(fn, [_address(context, builder, t[0], args[0], t[1], args[1]),
                                 _address(context, builder, t[2], args[2], t[3], args[3]),
                                 context.cast(builder, args[4], t[4], types.int64)])

    return sig, codegen


@intrinsic
def memcpy(typingctx, dst, do, src, so, n):
    """dst[do:do+n] = src[so:so+n] (the ranges must not overlap)."""
    if not _byte_arrays(dst, src):
        return None
    sig = types.void(dst, do, src, so, n)

    def codegen(context, builder, signature, args):
        t = signature.args
        cgutils.raw_memcpy(builder, _address(context, builder, t[0], args[0], t[1], args[1]),
                           _address(context, builder, t[2], args[2], t[3], args[3]),
                           context.cast(builder, args[4], t[4], types.int64), 1)
        return context.get_dummy_value()

    return sig, codegen


def _load(bits: int):
    @intrinsic
    def load(typingctx, a, p):
        if not _byte_arrays(a):
            return None
        sig = types.uint64(a, p)

        def codegen(context, builder, signature, args):
            t = signature.args
            ptr = builder.bitcast(_address(context, builder, t[0], args[0], t[1], args[1]),
                                  ir.IntType(bits).as_pointer())
            v = builder.load(ptr, align=1)
            if sys.byteorder != "little":
                v = builder.call(cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.IntType(bits), [ir.IntType(bits)]), f"llvm.bswap.i{bits}"), [v])
            return builder.zext(v, ir.IntType(64)) if bits < 64 else v

        return sig, codegen

    return load


load_u64le = _load(64)
load_u64le.__doc__ = "a[p:p+8] as a little-endian uint64 (any alignment)."
load_u32le = _load(32)
load_u32le.__doc__ = "a[p:p+4] as a little-endian uint32, widened to uint64 (any alignment)."


@numba.njit(cache=True)
def bytes_equal(a, ao, an, b, bo, bn):
    """a[ao:ao+an] == b[bo:bo+bn]."""
    return an == bn and memcmp(a, ao, b, bo, an) == 0


_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)
_LOWS = np.uint64(0x7F7F7F7F7F7F7F7F)


@numba.njit(cache=True, nogil=True)
def any_non_ascii(a, off, n):
    """Whether a[off:off+n] holds a byte >= 0x80 (eight bytes at a time)."""
    i = 0
    while i + 8 <= n:
        if load_u64le(a, off + i) & _HIGHS:
            return True
        i += 8
    while i < n:
        if a[off + i] >= 0x80:
            return True
        i += 1
    return False


@numba.njit(cache=True, nogil=True)
def any_ff(a, off, n):
    """Whether a[off:off+n] holds a 0xff byte (eight bytes at a time: a zero byte of ~word)."""
    i = 0
    while i + 8 <= n:
        x = ~load_u64le(a, off + i)
        if (x - _ONES) & ~x & _HIGHS:
            return True
        i += 8
    while i < n:
        if a[off + i] == 0xFF:
            return True
        i += 1
    return False


@numba.njit(cache=True, nogil=True)
def any_high_but_ff(a, off, n):
    """Whether a[off:off+n] holds a byte >= 0x80 other than 0xff (eight bytes at a time): a
    non-ASCII byte in a canonical key, whose separators are 0xff."""
    i = 0
    while i + 8 <= n:
        w = load_u64le(a, off + i)
        x = ~w  # 0xff bytes of w are the zero bytes of x; exactly those get their high bit in ff:
        ff = ~(((x & _LOWS) + _LOWS) | x) & _HIGHS
        if w & _HIGHS & ~ff:
            return True
        i += 8
    while i < n:
        c = a[off + i]
        if 0x80 <= c < 0xFF:
            return True
        i += 1
    return False
