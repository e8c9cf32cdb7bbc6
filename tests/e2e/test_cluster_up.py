"""``flashback cluster up`` as a developer runs it: the adapter and querier on the addresses asked
for, a process killed with ``kill -9`` reported and restarted, Ctrl-C stopping everything,
the restarted process included, and a clear refusal when an address is taken."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

from flashback.launcher import _free_ports
from tests.e2e.harness import wait_until


pytestmark = pytest.mark.usefixtures("nats_required")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid``: their command lines."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                out[int(d)] = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return out


def _ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class _Lines:
    """Collects a pipe's lines on a thread."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(iter(pipe.readline, "")), daemon=True)
        self._t.start()

    def text(self) -> str:
        return "".join(self.lines)


def test_cluster_up_restarts_what_is_killed_and_stops_everything(tmp_path):
    adapter, querier = (f"127.0.0.1:{p}" for p in _free_ports(2))
    proc = subprocess.Popen([sys.executable, "-m", "flashback", "cluster", "up", "--dir", str(tmp_path / "c"),
                             "--shards", "1", "--replicas", "1", "--adapter-listen", adapter,
                             "--querier-listen", querier],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in err.text() or proc.poll() is not None, 180,
                   "cluster up to start")
        assert proc.poll() is None, err.text()
        assert f"http://{adapter}/api/v1/write" in out.text() and f"http://{querier}" in out.text()
        assert _ready(adapter) and _ready(querier)

        with open(tmp_path / "c" / "topology.yml") as f:
            replica_http = yaml.safe_load(f)["shards"][0]["replicas"][0]["http"]
        (store,) = [p for p, cmd in _children(proc.pid).items() if " store " in cmd]
        os.kill(store, signal.SIGKILL)
        wait_until(lambda: "store-shard-0-r0 restarted" in err.text(), 30, "the replica to be restarted")
        assert "store-shard-0-r0 exited with code -9" in err.text()
        wait_until(lambda: _ready(replica_http), 60, "the restarted replica to be ready")
        (again,) = [p for p, cmd in _children(proc.pid).items() if " store " in cmd]
        assert again != store

        (nats0,) = [p for p, cmd in _children(proc.pid).items() if "nats-server" in cmd and "n0.conf" in cmd]
        os.kill(nats0, signal.SIGKILL)
        wait_until(lambda: "nats-0 restarted" in err.text(), 60, "the NATS server to be restarted")

        children = list(_children(proc.pid))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, err.text()
        for pid in children:  # the restarted replica and NATS server too
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_restart_leaves_a_killed_replica_down_and_the_readme_command_runs_it(tmp_path):
    """With --no-restart a killed replica is reported and left down; the README's command,
    without --listen/--grpc-listen, runs it again where the topology says."""
    adapter, querier = (f"127.0.0.1:{p}" for p in _free_ports(2))
    cdir = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "flashback", "cluster", "up", "--dir", str(cdir), "--shards", "1",
                             "--replicas", "1", "--adapter-listen", adapter, "--querier-listen", querier,
                             "--no-restart"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    by_hand = None
    try:
        wait_until(lambda: "Ctrl-C stops everything" in err.text() or proc.poll() is not None, 180,
                   "cluster up to start")
        assert proc.poll() is None, err.text()
        assert "restarted" not in err.text()
        with open(cdir / "topology.yml") as f:
            replica_http = yaml.safe_load(f)["shards"][0]["replicas"][0]["http"]
        (store,) = [p for p, cmd in _children(proc.pid).items() if " store " in cmd]
        os.kill(store, signal.SIGKILL)
        wait_until(lambda: "store-shard-0-r0 exited with code -9" in err.text(), 30, "the exit to be reported")
        time.sleep(3)
        assert "store-shard-0-r0 restarted" not in err.text() and not _ready(replica_http)

        by_hand = subprocess.Popen([sys.executable, "-m", "flashback", "store", "--topology", str(cdir / "topology.yml"),
                                    "--shard", "shard-0", "--replica", "r0", "--data-dir", str(cdir / "store-shard-0-r0")],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _ready(replica_http), 60, "the replica run by hand to be ready")
    finally:
        for p in (by_hand, proc):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT if p is proc else signal.SIGTERM)
                try:
                    p.wait(120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def test_cluster_up_refuses_an_address_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        p = subprocess.run([sys.executable, "-m", "flashback", "cluster", "up", "--dir", str(tmp_path / "c"),
                            "--adapter-listen", address], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"cannot listen on {address}" in p.stderr and "(--adapter-listen)" in p.stderr
    assert not (tmp_path / "c").exists()  # nothing was started
