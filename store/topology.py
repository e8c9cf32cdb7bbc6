"""The cluster's topology: shards, their log streams and head replicas, in one YAML file.

Format (version 1; see ``store/docs/format/topology.md``)::

    version: 1
    nats: [nats://127.0.0.1:4222, nats://127.0.0.1:4223, nats://127.0.0.1:4224]
    stream_replicas: 3            # JetStream replicas of every shard's stream
    shards:
      - name: shard-0
        stream: flashback-shard-0
        replicas:                 # head replicas: gRPC address of each
          - {name: r0, grpc: 127.0.0.1:19300, http: 127.0.0.1:19400}
          - {name: r1, grpc: 127.0.0.1:19301, http: 127.0.0.1:19401}
          - {name: r2, grpc: 127.0.0.1:19302, http: 127.0.0.1:19402}

Series to shard: ``shard_of(series_id, n) = series_id % n`` where ``series_id`` is the series'
64-bit id (``store/docs/format/series-id.md``) and ``n`` the number of shards, in file order.
Changing the number of shards moves series between shards; resharding is not supported yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from store.errors import StorageError

VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ADDR = re.compile(r"^[^\s:]+:\d{1,5}$")


class TopologyError(StorageError, ValueError):
    """A topology file that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Replica:
    name: str
    grpc: str  # HOST:PORT of its head gRPC service
    http: str = ""  # HOST:PORT of its /metrics, /-/healthy, /-/ready (optional)


@dataclass(frozen=True, slots=True)
class Shard:
    name: str
    stream: str
    replicas: tuple[Replica, ...]

    def replica(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name:
                return r
        raise TopologyError(f"shard {self.name}: no replica {name!r}")


@dataclass(frozen=True, slots=True)
class Topology:
    nats: tuple[str, ...]
    shards: tuple[Shard, ...]
    stream_replicas: int = 3

    def shard(self, name: str) -> Shard:
        for s in self.shards:
            if s.name == name:
                return s
        raise TopologyError(f"no shard {name!r} (shards: {', '.join(s.name for s in self.shards)})")

    def shard_index(self, series_id: int) -> int:
        """The index in ``shards`` of the shard holding ``series_id``."""
        return shard_of(series_id, len(self.shards))

    def to_yaml(self) -> str:
        doc = {"version": VERSION, "nats": list(self.nats), "stream_replicas": self.stream_replicas,
               "shards": [{"name": s.name, "stream": s.stream,
                           "replicas": [{"name": r.name, "grpc": r.grpc, **({"http": r.http} if r.http else {})}
                                        for r in s.replicas]} for s in self.shards]}
        return yaml.safe_dump(doc, sort_keys=False)


def shard_of(series_id: int, n_shards: int) -> int:
    """The documented mapping: series id modulo the number of shards."""
    return series_id % n_shards


def _get(d: dict, key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise TopologyError(f"{where}: {key!r} is missing")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise TopologyError(f"{where}: {key!r} must be a {kind.__name__}, got {v!r}")
    return v


def parse(text: str) -> Topology:
    """A topology from its YAML text; raises TopologyError naming what is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(f"topology is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise TopologyError("topology: expected a mapping at the top level")
    unknown = set(doc) - {"version", "nats", "stream_replicas", "shards"}
    if unknown:
        raise TopologyError(f"topology: unknown keys {sorted(unknown)}")
    if doc.get("version", VERSION) != VERSION:
        raise TopologyError(f"topology: version {doc.get('version')!r} is not supported (this reader knows {VERSION})")
    nats = _get(doc, "nats", list, "topology")
    if not nats or not all(isinstance(u, str) and u for u in nats):
        raise TopologyError("topology: 'nats' must list at least one server URL")
    stream_replicas = doc.get("stream_replicas", 3)
    if not isinstance(stream_replicas, int) or isinstance(stream_replicas, bool) or not 1 <= stream_replicas <= 5:
        raise TopologyError("topology: 'stream_replicas' must be an integer from 1 to 5")
    shards_doc = _get(doc, "shards", list, "topology")
    if not shards_doc:
        raise TopologyError("topology: 'shards' must list at least one shard")
    shards, names, streams, addrs = [], set(), set(), set()
    for i, sd in enumerate(shards_doc):
        where = f"shards[{i}]"
        if not isinstance(sd, dict):
            raise TopologyError(f"{where}: expected a mapping")
        unknown = set(sd) - {"name", "stream", "replicas"}
        if unknown:
            raise TopologyError(f"{where}: unknown keys {sorted(unknown)}")
        name, stream = _get(sd, "name", str, where), _get(sd, "stream", str, where)
        for what, v in (("name", name), ("stream", stream)):
            if not _NAME.match(v):
                raise TopologyError(f"{where}: {what} {v!r} must be 1-64 letters, digits, '-' or '_'")
        if name in names or stream in streams:
            raise TopologyError(f"{where}: shard name {name!r} or stream {stream!r} used twice")
        names.add(name)
        streams.add(stream)
        reps = []
        for j, rd in enumerate(_get(sd, "replicas", list, where)):
            rwhere = f"{where}.replicas[{j}]"
            if not isinstance(rd, dict):
                raise TopologyError(f"{rwhere}: expected a mapping")
            unknown = set(rd) - {"name", "grpc", "http"}
            if unknown:
                raise TopologyError(f"{rwhere}: unknown keys {sorted(unknown)}")
            rname, grpc = _get(rd, "name", str, rwhere), _get(rd, "grpc", str, rwhere)
            http = rd.get("http", "")
            if not _NAME.match(rname):
                raise TopologyError(f"{rwhere}: name {rname!r} must be 1-64 letters, digits, '-' or '_'")
            for what, a in (("grpc", grpc), ("http", http)):
                if a and not _ADDR.match(a):
                    raise TopologyError(f"{rwhere}: {what} address {a!r} is not HOST:PORT")
                if a and a in addrs:
                    raise TopologyError(f"{rwhere}: address {a} used twice")
                if a:
                    addrs.add(a)
            reps.append(Replica(rname, grpc, http))
        if not reps:
            raise TopologyError(f"{where}: at least one replica is needed")
        if len({r.name for r in reps}) != len(reps):
            raise TopologyError(f"{where}: replica names must be unique within the shard")
        shards.append(Shard(name, stream, tuple(reps)))
    return Topology(tuple(nats), tuple(shards), stream_replicas)


def load(path: str) -> Topology:
    try:
        with open(path) as f:
            return parse(f.read())
    except OSError as e:
        raise TopologyError(f"read topology {path}: {e.strerror}") from None
