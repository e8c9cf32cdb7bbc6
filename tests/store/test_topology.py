import pytest

from store.topology import TopologyError, parse, shard_of

GOOD = """
nats: [nats://127.0.0.1:4222]
stream_replicas: 1
shards:
  - name: s0
    stream: fb-s0
    replicas: [{name: r0, grpc: "127.0.0.1:1", http: "127.0.0.1:2"}, {name: r1, grpc: "127.0.0.1:3"}]
  - name: s1
    stream: fb-s1
    replicas: [{name: r0, grpc: "127.0.0.1:4"}]
"""


def test_parse_round_trip_and_shard_mapping():
    t = parse(GOOD)
    assert [s.name for s in t.shards] == ["s0", "s1"] and t.stream_replicas == 1
    assert t.shard("s0").replica("r1").grpc == "127.0.0.1:3" and t.shard("s0").replica("r0").http == "127.0.0.1:2"
    assert parse(t.to_yaml()) == t
    # series id modulo the number of shards
    assert [t.shard_index(i) for i in (0, 1, 2, 2**64 - 1)] == [0, 1, 0, 1]
    assert shard_of(10, 3) == 1


@pytest.mark.parametrize("text,msg", [
    ("[]", "expected a mapping"),
    ("nats: []\nshards: []", "'nats' must list"),
    ("nats: [x]\nshards: []", "'shards' must list"),
    ("nats: [x]\nversion: 2\nshards: []", "version 2 is not supported"),
    ("nats: [x]\nshards: [{name: a, stream: s, replicas: []}]", "at least one replica"),
    ("nats: [x]\nshards: [{name: 'a b', stream: s, replicas: [{name: r, grpc: 'h:1'}]}]", "name 'a b'"),
    ("nats: [x]\nshards: [{name: a, stream: s, replicas: [{name: r, grpc: 'nohost'}]}]", "not HOST:PORT"),
    ("nats: [x]\nshards: [{name: a, stream: s, replicas: [{name: r, grpc: 'h:1'}, {name: r, grpc: 'h:2'}]}]",
     "replica names must be unique"),
    ("nats: [x]\nshards: [{name: a, stream: s, replicas: [{name: r, grpc: 'h:1'}]}, "
     "{name: b, stream: s, replicas: [{name: r, grpc: 'h:2'}]}]", "used twice"),
    ("nats: [x]\nshards: [{name: a, stream: s, replicas: [{name: r, grpc: 'h:1'}]}, "
     "{name: b, stream: t, replicas: [{name: r, grpc: 'h:1'}]}]", "address h:1 used twice"),
    ("nats: [x]\nstream_replicas: 9\nshards: []", "stream_replicas"),
    ("nats: [x]\ncolour: red\nshards: []", "unknown keys"),
    ("nats: [x]\nshards: [{name: a, stream: s}]", "'replicas' is missing"),
])
def test_bad_topologies(text, msg):
    with pytest.raises(TopologyError, match=msg):
        parse(text)
