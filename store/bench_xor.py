"""Throughput of the XOR chunk codecs: ``python3 -m store.bench_xor``.

Encodes and decodes full 120-sample chunks of a scrape-like mix (15 s
interval with millisecond jitter; counters, random gauges and constants) and
prints millions of samples per second for the compiled kernels called from
compiled code (as the head does), the Python wrappers, ``decode_many`` (the
query path) and the pure-Python reference.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from store import xor, xorfast

SAMPLES_PER_CHUNK = 120


def make_series(n_chunks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps and value bits of ``n_chunks`` chunks, one row per chunk."""
    rng = np.random.default_rng(seed)
    shape = (n_chunks, SAMPLES_PER_CHUNK)
    jitter = rng.integers(-5, 6, size=shape) * (rng.random(shape) < 0.3)
    ts = 1_700_000_000_000 + np.cumsum(np.full(shape, 15_000) + jitter, axis=1)
    kind = rng.integers(0, 3, size=(n_chunks, 1))
    counters = np.cumsum(rng.integers(0, 50, size=shape), axis=1).astype(np.float64)
    gauges = np.round(rng.random(shape) * 100, 2)
    constants = np.ones(shape)
    vals = np.where(kind == 0, counters, np.where(kind == 1, gauges, constants))
    return ts.astype(np.int64), vals.astype(np.float64).view(np.uint64)


# Not cached: numba's cache does not notice changes in xorfast, and a stale
# copy of its kernels would be measured.
@numba.njit(nogil=True)
def _encode_all(ts, vbits, arena, offsets):
    pos = 0
    for k in range(ts.shape[0]):
        offsets[k] = pos
        pos += xorfast.encode_into(ts[k], vbits[k], ts.shape[1], arena[pos:])
    offsets[ts.shape[0]] = pos
    return pos


@numba.njit(nogil=True)
def _decode_all(arena, offsets, ts_out, vbits_out):
    total = 0
    for k in range(offsets.shape[0] - 1):
        total += xorfast.decode_into(arena[offsets[k]:offsets[k + 1]], ts_out[k], vbits_out[k])
    return total


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    """Runs the benchmark and prints one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000, help="chunks of 120 samples (default 20000)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    ts, vbits = make_series(args.chunks, seed=1)
    n = ts.size
    arena = np.empty(args.chunks * xorfast.max_chunk_bytes(SAMPLES_PER_CHUNK), dtype=np.uint8)
    offsets = np.zeros(args.chunks + 1, dtype=np.int64)
    _encode_all(ts[:1], vbits[:1], arena, offsets[:2])  # compile
    size = _encode_all(ts, vbits, arena, offsets)
    ts_out = np.empty_like(ts)
    vb_out = np.empty_like(vbits)
    _decode_all(arena, offsets, ts_out, vb_out)
    assert np.array_equal(ts_out, ts) and np.array_equal(vb_out, vbits)

    def report(name: str, samples: int, seconds: float) -> None:
        print(f"{name:<44} {samples / seconds / 1e6:8.1f} M samples/s")

    print(f"{args.chunks} chunks x {SAMPLES_PER_CHUNK} samples, {size / n:.2f} bytes/sample")
    report("numba encode_into (from njit)", n, _best(lambda: _encode_all(ts, vbits, arena, offsets), args.repeat))
    report("numba decode_into (from njit)", n, _best(lambda: _decode_all(arena, offsets, ts_out, vb_out), args.repeat))

    chunks = [arena[offsets[k]:offsets[k + 1]].tobytes() for k in range(args.chunks)]
    vals = vbits.view(np.float64)
    sub = min(args.chunks, 2_000)
    report("xorfast.encode (Python wrapper, per chunk)", sub * SAMPLES_PER_CHUNK,
           _best(lambda: [xorfast.encode(ts[k], vals[k]) for k in range(sub)], args.repeat))
    report("xorfast.decode (Python wrapper, per chunk)", sub * SAMPLES_PER_CHUNK,
           _best(lambda: [xorfast.decode(c) for c in chunks[:sub]], args.repeat))
    mint, maxt = int(ts.min()), int(ts.max())
    report("xorfast.decode_many (all chunks, one call)", n,
           _best(lambda: xorfast.decode_many(chunks, mint, maxt), args.repeat))

    ref = min(args.chunks, 100)
    tl, vl = ts[:ref].tolist(), vbits[:ref].tolist()
    report("xor.encode_bits (pure Python)", ref * SAMPLES_PER_CHUNK,
           _best(lambda: [xor.encode_bits(tl[k], vl[k]) for k in range(ref)], 1))
    report("xor.decode_bits (pure Python)", ref * SAMPLES_PER_CHUNK,
           _best(lambda: [xor.decode_bits(c) for c in chunks[:ref]], 1))


if __name__ == "__main__":
    main()
