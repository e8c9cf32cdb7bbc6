"""Select throughput of the head gRPC API on loopback: 10k series x 120 samples."""
import gc, multiprocessing as mp, sys, time
import numpy as np

NOW = 10**13

def build():
    from store.head import Head
    from store.writerequest import decode, encode
    rng = np.random.default_rng(1)
    h = Head()
    ser = [([("__name__", "http_requests_total"), ("instance", f"host-{i % 100}:9100"), ("job", "node"), ("i", str(i))],
            [(NOW - 15000 * j + int(rng.integers(-50, 50)), float(rng.normal(100, 10))) for j in range(119, -1, -1)])
           for i in range(10000)]
    h.append(decode(encode(ser)), NOW)
    del ser
    gc.collect()
    return h

def serve(q):
    from store.headrpc import HeadService
    h = build()
    svc = HeadService(h, lambda: {"ready": True}, address="127.0.0.1:0").start()
    q.put(svc.port)
    time.sleep(3600)

def main():
    from store.headrpc import RemoteHead, HeadService
    from store.matchers import Matcher, MatchType
    m = [Matcher(MatchType.EQ, "__name__", "http_requests_total")]
    mode = sys.argv[1] if len(sys.argv) > 1 else "process"
    if mode == "process":
        q = mp.get_context("spawn").Queue()
        p = mp.get_context("spawn").Process(target=serve, args=(q,), daemon=True)
        p.start()
        port = q.get(timeout=120)
    else:
        h = build()
        svc = HeadService(h, lambda: {"ready": True}, address="127.0.0.1:0").start()
        port = svc.port
    c = RemoteHead(f"127.0.0.1:{port}", timeout_s=60)
    c.select(m, 0, 2**63 - 1)
    import gc as _gc
    if "nogc" in sys.argv: _gc.disable()
    for _ in range(5):
        t = time.perf_counter()
        s = c.select(m, 0, 2**63 - 1)
        d = time.perf_counter() - t
        nb = sum(len(ch.data) for x in s for ch in x.chunks())
        t2 = time.perf_counter()
        n = sum(len(x.samples()[0]) for x in s)
        d2 = time.perf_counter() - t2
        print(f"{mode}: {len(s)} series in {d*1000:.0f} ms: {len(s)/d:,.0f} series/s, {len(s)*120/d/1e6:.1f} M samples/s, "
              f"{nb/d/1e6:.1f} MB/s chunk bytes ({nb/1e6:.1f} MB); samples() of all: {d2*1000:.0f} ms ({n/d2/1e6:.1f} M samples/s)")

if __name__ == "__main__":
    main()
