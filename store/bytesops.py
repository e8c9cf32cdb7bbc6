"""C's memcmp and memcpy on byte arrays, for compiled loops (numba intrinsics).

numba compiles a byte-by-byte loop with an early exit into one comparison per byte; on label
keys of ~100 bytes libc's vectorised routines are several times faster (series lookup in the
head: 0.18 -> 0.04 us per series). Both take contiguous uint8 arrays and offsets, and do no
bounds checks: callers pass ranges inside the arrays.
"""

from __future__ import annotations

import numba
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


@numba.njit(cache=True, inline="always")
def bytes_equal(a, ao, an, b, bo, bn):
    """a[ao:ao+an] == b[bo:bo+bn]."""
    return an == bn and memcmp(a, ao, b, bo, an) == 0
