"""Writes vectors.json: XOR chunks made by a real Prometheus, with the samples they hold.

Run from the repository root (needs /usr/bin/prometheus, Debian's 2.42)::

    python3 tests/testdata/xor/make_vectors.py

It starts Prometheus on 127.0.0.1 (free port, temporary data directory, remote
write receiver on, nothing scraped), remote-writes a fixed, seeded set of
series in one request, then reads them back with remote read as
STREAMED_XOR_CHUNKS. Every chunk Prometheus returns is written out with the
samples it covers (taken from what was sent, by the chunk's min/max time; no
Flashback code decodes anything here), so the vectors test our codec against
Prometheus' encoder and not against itself.

The protobuf messages are encoded and parsed by hand (a few fields of
prompb's remote.proto and types.proto) so this script needs nothing but
cramjam.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time

import cramjam

PROMETHEUS = "/usr/bin/prometheus"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors.json")

HOUR = 3_600_000
DAY = 24 * HOUR
CHUNK_RANGE = 2 * HOUR
# 2024-01-01T00:00:00Z, a multiple of the 2 h chunk range: chunks start on the boundary.
BASE = 1_704_067_200_000

STALE_NAN = 0x7FF0000000000002


# --- protobuf, by hand --------------------------------------------------------


def _uvarint(x: int) -> bytes:
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _field_varint(num: int, x: int) -> bytes:
    return _uvarint(num << 3) + _uvarint(x & ((1 << 64) - 1))


def _field_bytes(num: int, b: bytes) -> bytes:
    return _uvarint((num << 3) | 2) + _uvarint(len(b)) + b


def _field_fixed64(num: int, x: int) -> bytes:
    return _uvarint((num << 3) | 1) + struct.pack("<Q", x)


def _label(name: str, value: str) -> bytes:
    return _field_bytes(1, name.encode()) + _field_bytes(2, value.encode())


def write_request(series: list[tuple[dict[str, str], list[int], list[int]]]) -> bytes:
    """WriteRequest{1: repeated TimeSeries{1: Label, 2: Sample{1 fixed64 value, 2 varint ts}}}."""
    out = bytearray()
    for labels, ts, vbits in series:
        body = bytearray()
        for name in sorted(labels):
            body += _field_bytes(1, _label(name, labels[name]))
        for t, v in zip(ts, vbits):
            body += _field_bytes(2, _field_fixed64(1, v) + _field_varint(2, t))
        out += _field_bytes(1, bytes(body))
    return bytes(out)


def read_request(start: int, end: int, matchers: list[tuple[str, str]]) -> bytes:
    """ReadRequest{1: Query{1 start, 2 end, 3 LabelMatcher{1 EQ, 2 name, 3 value}}, 2: [STREAMED_XOR_CHUNKS]}."""
    q = _field_varint(1, start) + _field_varint(2, end)
    for name, value in matchers:
        q += _field_bytes(3, _field_varint(1, 0) + _field_bytes(2, name.encode()) + _field_bytes(3, value.encode()))
    return _field_bytes(1, q) + _field_varint(2, 1)


def _read_uvarint(b: bytes, pos: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[pos]
        pos += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            return x, pos
        shift += 7


def _fields(b: bytes):
    """Yields (field number, wire type, value) of a protobuf message."""
    pos = 0
    while pos < len(b):
        key, pos = _read_uvarint(b, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _read_uvarint(b, pos)
        elif wt == 1:
            v = b[pos:pos + 8]
            pos += 8
        elif wt == 2:
            n, pos = _read_uvarint(b, pos)
            v = b[pos:pos + n]
            pos += n
        elif wt == 5:
            v = b[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"wire type {wt}")
        yield num, wt, v


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(b: bytes) -> int:
    c = 0xFFFFFFFF
    for x in b:
        c = _CRC_TABLE[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def parse_chunked_response(body: bytes) -> list[tuple[dict[str, str], list[dict]]]:
    """Frames of uvarint size, big-endian CRC32C, ChunkedReadResponse; returns (labels, chunks) per frame."""
    out = []
    pos = 0
    while pos < len(body):
        size, pos = _read_uvarint(body, pos)
        (crc,) = struct.unpack(">I", body[pos:pos + 4])
        pos += 4
        msg = body[pos:pos + size]
        pos += size
        if crc32c(msg) != crc:
            raise ValueError("CRC32C mismatch in a remote read frame")
        for num, _, series in _fields(msg):
            if num != 1:
                continue
            labels: dict[str, str] = {}
            chunks = []
            for snum, _, sval in _fields(series):
                if snum == 1:
                    kv = {n: v for n, _, v in _fields(sval)}
                    labels[kv.get(1, b"").decode()] = kv.get(2, b"").decode()
                elif snum == 2:
                    c = {"min_time_ms": 0, "max_time_ms": 0, "type": 0, "data": b""}
                    for cnum, _, cval in _fields(sval):
                        key = {1: "min_time_ms", 2: "max_time_ms", 3: "type", 4: "data"}.get(cnum)
                        if key:
                            c[key] = cval
                    for key in ("min_time_ms", "max_time_ms"):
                        if c[key] >> 63:
                            c[key] -= 1 << 64
                    chunks.append(c)
            out.append((labels, chunks))
    return out


# --- the series -----------------------------------------------------------------


def f2b(v: float) -> int:
    return struct.unpack(">Q", struct.pack(">d", v))[0]


def build_series(rng: random.Random) -> list[tuple[str, list[int], list[int]]]:
    """(name, timestamps, value bits) of every series, timestamps strictly increasing."""
    series: list[tuple[str, list[int], list[int]]] = []

    def add(name: str, ts: list[int], vbits: list[int]) -> None:
        assert len(ts) == len(vbits) and all(a < b for a, b in zip(ts, ts[1:])), name
        series.append((name, ts, vbits))

    def scrape_times(start: int, n: int, interval: int = 15_000, jitter: int = 0) -> list[int]:
        return [start + i * interval + (rng.randint(-jitter, jitter) if jitter else 0) for i in range(n)]

    # First in the request, at the smallest timestamp: Prometheus' head takes
    # samples no older than its first sample minus 1 h.
    add("anchor", [BASE], [f2b(1.0)])

    ts = scrape_times(BASE, 300, jitter=40)
    add("regular_jitter", ts, [f2b(float(i)) for i in range(300)])

    total = 0.0
    vals = []
    for _ in range(250):
        total += rng.choice([0, 1, 1, 2, 5, 17, 1000])
        vals.append(f2b(total))
    add("counter", scrape_times(BASE + 7, 250, jitter=3), vals)

    # A counter with a reset and fractional increments.
    total, vals = 0.0, []
    for i in range(130):
        total = 0.0 if i == 70 else total + rng.random() * 3
        vals.append(f2b(total))
    add("counter_reset", scrape_times(BASE, 130, interval=30_000), vals)

    add("gauge_random", scrape_times(BASE, 240, jitter=500), [f2b(rng.uniform(-1e6, 1e6)) for _ in range(240)])
    add("gauge_small_steps", scrape_times(BASE, 121),
        [f2b(0.5 + i * 2.0 ** -40) for i in range(121)])
    add("gauge_random_bits", scrape_times(BASE, 100, interval=10_000, jitter=2000),
        [rng.getrandbits(64) for _ in range(100)])
    add("constant", scrape_times(BASE, 200), [f2b(42.0)] * 200)
    add("constant_zero", scrape_times(BASE, 50, interval=60_000), [f2b(0.0)] * 50)

    # Exactly 120 samples at 15 s from a chunk range boundary: one full chunk, then one sample.
    add("full_120", scrape_times(BASE + CHUNK_RANGE, 121), [f2b(rng.random()) for _ in range(121)])

    add("one_sample", [BASE + 123_456], [f2b(3.14)])
    add("two_samples", [BASE + 1000, BASE + 16_000], [f2b(1.0), f2b(2.5)])
    add("two_samples_equal", [BASE + 1000, BASE + 61_000], [f2b(7.0), f2b(7.0)])

    special = [
        0x7FF8000000000001, 0xFFF8000000000000, 0x7FF4000000000000, 0x7FF0000000000001,
        0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FF8DEADBEEF0000, STALE_NAN,
        f2b(float("inf")), f2b(float("-inf")), f2b(-0.0), f2b(0.0),
        f2b(5e-324), f2b(-5e-324), f2b(1.7976931348623157e308), 0x8000000000000001,
    ]
    add("nan_payloads", scrape_times(BASE, 12),
        [0x7FF8000000000001, f2b(1.0), 0xFFF8000000000000, 0x7FF4000000000000, 0x7FF4000000000000,
         0x7FF0000000000001, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FF8DEADBEEF0000, f2b(2.0),
         0x7FF8000000000000, 0x7FF8000000000001])
    add("infinities_zeros", scrape_times(BASE, 10),
        [f2b(float("inf")), f2b(float("-inf")), f2b(-0.0), f2b(0.0), f2b(-0.0), f2b(float("inf")),
         f2b(float("inf")), f2b(1.0), f2b(float("-inf")), f2b(-0.0)])
    add("stale_markers", scrape_times(BASE, 20),
        [STALE_NAN if i % 5 == 4 else f2b(10.0 + i) for i in range(20)])
    add("specials_shuffled", scrape_times(BASE, 60, jitter=7), [rng.choice(special) for _ in range(60)])

    # XOR windows: leading zeros >= 32 (clamped to 31), 64 significant bits (written as 0),
    # reuse of the previous window, and windows that shrink and grow.
    one = f2b(1.0)
    add("xor_windows", scrape_times(BASE, 12),
        [one, one ^ 1, one, one ^ (1 << 63) ^ 1, one, one ^ 0xFF00, one ^ 0x0F00, one ^ 0xFFFF_0000_0000,
         one ^ 0x1, one ^ (0xFF << 56), one ^ (0xFF << 56) ^ 0x80, one])

    # Delta-of-delta buckets at their edges: 14 bits [-8191, 8192], 17 [-65535, 65536],
    # 20 [-524287, 524288], else 64; and decreasing intervals (60 s then 1 ms).
    deltas = [1000, 1000, 9192, 1001, 9194, 1002, 66538, 1003, 66540, 1004, 525292, 1005, 525294,
              1006, HOUR, 1, 60_000, 1, 2, 60_000, 1]
    ts = [BASE + 2 * CHUNK_RANGE]
    for d in deltas:
        ts.append(ts[-1] + d)
    add("dod_buckets", ts, [f2b(float(i % 3)) for i in range(len(ts))])

    # Random intervals inside one chunk range, from 1 ms to 15 minutes.
    ts = [BASE + 3 * CHUNK_RANGE]
    for _ in range(60):
        ts.append(ts[-1] + rng.choice([1, 2, rng.randint(1, 100), rng.randint(1, 20_000), rng.randint(1, 900_000)]))
    ts = [t for t in ts if t < BASE + 4 * CHUNK_RANGE]
    add("irregular", ts, [f2b(rng.uniform(0, 100)) for _ in ts])

    # Jumps of days and of more than 2**32 ms (a new chunk each, one sample or a few).
    ts = [BASE + 5_000]
    for d in [15_000, 15_000, DAY, 15_000, 3 * DAY + 1, 2 * DAY + 7, 15_000, 30_000, (1 << 32) + 12_345, 15_000]:
        ts.append(ts[-1] + d)
    add("day_jumps", ts, [f2b(float(i) * 1.5) for i in range(len(ts))])

    # A series of 2-sample chunks, each crossing into the next chunk range.
    ts = []
    for k in range(6):
        start = BASE + (10 + k) * CHUNK_RANGE + CHUNK_RANGE - 30_000 - 1000 * k
        ts.extend([start, start + 15_000 + k])
    add("two_per_range", ts, [rng.getrandbits(64) for _ in ts])

    # Short random series: some of them end exactly on a byte boundary after a
    # whole-byte write, where Prometheus 2.x leaves an extra zero byte.
    for k in range(40):
        n = rng.randint(2, 9)
        start = BASE + rng.randint(0, 3) * CHUNK_RANGE + rng.randint(0, 1000)
        ts = [start]
        for _ in range(n - 1):
            ts.append(ts[-1] + rng.choice([15_000, 15_000, rng.randint(1, 40_000)]))
        vbits = []
        v = rng.getrandbits(64)
        for _ in range(n):
            r = rng.random()
            if r < 0.5:
                v ^= rng.getrandbits(rng.randint(1, 64)) << rng.randint(0, 8)
                v &= (1 << 64) - 1
            elif r < 0.7:
                v = rng.getrandbits(64)
            vbits.append(v)
        add(f"short_{k:02d}", ts, vbits)

    return series


# --- Prometheus ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def prometheus_version() -> str:
    out = subprocess.run([PROMETHEUS, "--version"], capture_output=True, text=True, check=True)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def run(tmp: str) -> dict:
    rng = random.Random(20240101)
    series = build_series(rng)
    config = os.path.join(tmp, "prometheus.yml")
    with open(config, "w") as f:
        f.write("global: {}\nscrape_configs: []\n")
    port = free_port()
    log = open(os.path.join(tmp, "prometheus.log"), "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(tmp, 'data')}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-remote-write-receiver",
         "--storage.tsdb.retention.time=100y"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_request(port, "GET", "/-/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"Prometheus did not become ready; see {log.name}")
            time.sleep(0.2)

        job = {"job": "xorvec"}
        req = write_request([({"__name__": "xorvec", **job, "case": name}, ts, vb) for name, ts, vb in series])
        status, body = http_request(port, "POST", "/api/v1/write", bytes(cramjam.snappy.compress_raw(req)), {
            "Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
            "X-Prometheus-Remote-Write-Version": "0.1.0"})
        if status // 100 != 2:
            raise RuntimeError(f"remote write: {status} {body!r}")

        start = min(t for _, ts, _ in series for t in ts)
        end = max(t for _, ts, _ in series for t in ts)
        rreq = read_request(start, end, [("job", "xorvec")])

        def read() -> list:
            status, body = http_request(port, "POST", "/api/v1/read", bytes(cramjam.snappy.compress_raw(rreq)), {
                "Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                "X-Prometheus-Remote-Read-Version": "0.1.0"})
            if status != 200:
                raise RuntimeError(f"remote read: {status} {body!r}")
            return parse_chunked_response(body)

        # The write makes the head compactable (it spans days); wait until the
        # chunks Prometheus serves stop changing.
        frames = read()
        for _ in range(30):
            time.sleep(2)
            again = read()
            if again == frames:
                break
            frames = again
        else:
            raise RuntimeError("remote read results kept changing")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    sent = {name: (ts, vb) for name, ts, vb in series}
    vectors = []
    seen: dict[str, int] = {}
    for labels, chunks in frames:
        name = labels["case"]
        ts, vb = sent[name]
        for c in chunks:
            if c["type"] != 1:
                raise RuntimeError(f"{name}: chunk encoding {c['type']} is not XOR")
            idx = [i for i, t in enumerate(ts) if c["min_time_ms"] <= t <= c["max_time_ms"]]
            count = (c["data"][0] << 8) | c["data"][1]
            if len(idx) != count:
                raise RuntimeError(f"{name}: chunk header counts {count} samples, {len(idx)} sent in its range")
            k = seen.get(name, 0)
            seen[name] = k + 1
            vectors.append({
                "id": f"{name}/{k}",
                "min_time_ms": c["min_time_ms"],
                "max_time_ms": c["max_time_ms"],
                "data": c["data"].hex(),
                "timestamps": [ts[i] for i in idx],
                "values": [f"{vb[i]:016x}" for i in idx],
            })
    missing = set(sent) - set(seen)
    if missing:
        raise RuntimeError(f"series not returned: {sorted(missing)}")
    for name, (ts, _) in sent.items():
        covered = sum(len(v["timestamps"]) for v in vectors if v["id"].startswith(name + "/"))
        if covered != len(ts):
            raise RuntimeError(f"{name}: {covered} of {len(ts)} samples in the returned chunks")
    return {
        "about": "Prometheus XOR chunks (remote read, STREAMED_XOR_CHUNKS) of samples remote-written to a "
                 "real Prometheus; timestamps in ms, values as IEEE 754 bit patterns in hex. "
                 "Regenerate with tests/testdata/xor/make_vectors.py.",
        "prometheus": prometheus_version(),
        "vectors": vectors,
    }


def main() -> None:
    if not os.path.exists(PROMETHEUS):
        sys.exit(f"{PROMETHEUS} not found")
    with tempfile.TemporaryDirectory(prefix="xorvec-") as tmp:
        doc = run(tmp)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(doc['vectors'])} chunks to {OUT}")


if __name__ == "__main__":
    main()
