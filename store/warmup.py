"""Loads the write path's compiled kernels before a process serves, not on its first write.

The first call of a numba kernel in a process loads its machine code from numba's cache (or
compiles it) and, for the first kernel, numba's typing machinery: about half a second of CPU
for the scanner alone, more for all of the write path. Without a warm-up the first requests
after a start pay for it, and with a cluster's nine head replicas starting together, the
writes right after a start wait for all of them. ``ingest_kernels`` runs the write path once
on a few synthetic series with a throwaway head: the protobuf scanner, a columns record
(``store.shardrecord``), series creation (also of labels out of order), appends to known
series, a chunk cut, rejected samples, and the label checks of both name validations. The
process's metrics are not touched (the head has a private registry).
"""

from __future__ import annotations

from store import shardrecord, writerequest
from store.head import Head, HeadOptions


def _request(n_series: int, first_t: int, n_samples: int) -> bytes:
    return writerequest.encode(
        ([("__name__", "flashback_warm_up"), ("series", str(i))],
         [(first_t + 1000 * k, float(k)) for k in range(n_samples)]) for i in range(n_series))


def ingest_kernels() -> None:
    """Runs the write path once (see the module docstring); returns when its kernels are loaded."""
    t0 = 1_000_000_000_000
    for validation in ("utf8", "legacy"):
        head = Head(HeadOptions(name_validation=validation))
        # New series, then known ones with enough samples to cut a chunk (120 samples).
        first = writerequest.decode(_request(3, t0, 1))
        head.append(first, t0)
        more = writerequest.decode(_request(3, t0 + 1000, 130))
        head.append(more, t0 + 131_000)
        # A replica's columns record of the same series, later samples.
        later = writerequest.decode(_request(3, t0 + 201_000, 130))
        _, columns = shardrecord.decode_record(shardrecord.encode_record(t0, shardrecord.encode_series(later)))
        Head(HeadOptions(name_validation=validation)).append(columns, t0 + 400_000)
        head.append(columns, t0 + 400_000)
        # Labels out of order and without a metric name take the slow path; samples out of
        # order and duplicates are rejected.
        odd = writerequest.encode([([("series", "odd"), ("__name__", "flashback_warm_up")], [(t0, 1.0), (t0, 2.0)]),
                                   ([("series", "1")], [(t0, 1.0)])])
        head.append(writerequest.decode(odd), t0 + 400_000)
