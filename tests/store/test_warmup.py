"""``store.warmup.ingest_kernels`` loads every kernel the write path uses.

Checked in a fresh interpreter (in this one other tests have loaded kernels already): after
the warm-up, ingesting requests of another shape (new and known series, chunk cuts, rejected
samples, columns records, both name validations) adds no compiled signature to any numba
kernel of the store.
"""

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
import numba
from store import bytesops, headkernels, postings, shardrecord, writerequest, xorfast, xxhash64, warmup
from store.head import Head, HeadOptions

def signatures():
    out = {}
    for mod in (bytesops, headkernels, postings, shardrecord, writerequest, xorfast, xxhash64):
        for name, obj in vars(mod).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                out[f"{mod.__name__}.{name}"] = len(obj.signatures)
    return out

if sys.argv[1] == "warm":
    warmup.ingest_kernels()
before = signatures()
t0 = 1_700_000_000_000
for validation in ("utf8", "legacy"):
    head = Head(HeadOptions(name_validation=validation))
    for r in range(3):
        body = writerequest.encode(
            ([("__name__", "up"), ("job", "j"), ("instance", f"i{i}")],
             [(t0 + 15_000 * (r * 200 + k), float(k)) for k in range(200)]) for i in range(50))
        head.append(writerequest.decode(body), t0 + 15_000 * 600)
    # out of order and duplicate samples, a series with bad labels
    bad = writerequest.encode([([("__name__", "up"), ("job", "j"), ("instance", "i0")], [(t0, 5.0), (t0, 6.0)]),
                               ([("job", "no_name")], [(t0 + 15_000 * 601, 1.0)])])
    head.append(writerequest.decode(bad), t0 + 15_000 * 602)
    req = writerequest.decode(writerequest.encode(
        ([("__name__", "other"), ("k", str(i))], [(t0 + 15_000 * 700, 1.0)]) for i in range(40)))
    _, columns = shardrecord.decode_record(shardrecord.encode_record(t0, shardrecord.encode_series(req)))
    head.append(columns, t0 + 15_000 * 700)
    assert head.num_series() == 90, head.num_series()
after = signatures()
print(json.dumps({"before": before, "after": after}))
"""


ADAPTER = r"""
import json, sys
import numba
from adapter import sharded_write
from store import shardrecord, writerequest
from store.head import AppendResult
from store.topology import Replica, Shard, Topology

def signatures():
    return {f"{mod.__name__}.{name}": len(obj.signatures) for mod in (sharded_write, shardrecord, writerequest)
            for name, obj in vars(mod).items() if isinstance(obj, numba.core.registry.CPUDispatcher)}

topology = Topology(("nats://127.0.0.1:4222",), tuple(
    Shard(f"shard-{i}", f"s{i}", (Replica("r0", f"127.0.0.1:{19300 + i}"),)) for i in range(3)))
handler = sharded_write.ShardedWriteHandler(topology, [object()] * 3)
if sys.argv[1] == "warm":
    handler.warm_up()
before = signatures()
t0 = 1_700_000_000_000
for labels in ([("__name__", "up"), ("instance", "{}")], [("instance", "{}"), ("__name__", "up")], [("job", "{}")]):
    body = writerequest.encode(([(n, v.format(i)) for n, v in labels], [(t0, 1.0), (t0 + 1, 2.0)]) for i in range(30))
    handler.split(writerequest.decode(body), AppendResult(), t0)
after = signatures()
print(json.dumps({"before": before, "after": after}))
"""


def _run(mode: str, script: str = SCRIPT) -> dict:
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_up_loads_every_write_path_kernel():
    got = _run("warm")
    added = {k: (got["before"][k], n) for k, n in got["after"].items() if n != got["before"][k]}
    assert added == {}, f"kernels first loaded by a write after the warm-up: {added}"


def test_adapter_warm_up_loads_every_split_kernel():
    got = _run("warm", ADAPTER)
    added = {k: (got["before"][k], n) for k, n in got["after"].items() if n != got["before"][k]}
    assert added == {}, f"kernels first loaded by a split after the adapter's warm-up: {added}"
    cold = _run("cold", ADAPTER)
    assert sum(cold["after"].values()) > sum(cold["before"].values())


def test_without_warm_up_writes_load_kernels():
    # The check above can fail: without the warm-up the same writes load kernels.
    got = _run("cold")
    assert sum(got["after"].values()) > sum(got["before"].values()) + 5
