"""Processes for end-to-end tests: Flashback itself and the real Prometheus, on loopback."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import cramjam

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            timeout: float = 30) -> tuple[int, bytes, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def get_json(port: int, path: str, params: dict | list | None = None) -> dict:
    q = "?" + urllib.parse.urlencode(params or {}, doseq=True) if params else ""
    status, body, _ = request(port, "GET", path + q)
    doc = json.loads(body)
    if status != 200:
        raise AssertionError(f"GET {path}{q}: {status} {doc}")
    return doc


def query_api(port: int, path: str, params: dict | list | None = None) -> tuple[int, dict]:
    """GET a JSON API path; unlike ``get_json``, an error answer is returned, not raised."""
    q = "?" + urllib.parse.urlencode(params or {}, doseq=True) if params else ""
    status, body, _ = request(port, "GET", path + q)
    return status, json.loads(body)


def remote_write(port: int, protobuf: bytes, **headers) -> tuple[int, bytes]:
    h = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
         "X-Prometheus-Remote-Write-Version": "0.1.0"}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    status, body, _ = request(port, "POST", "/api/v1/write", bytes(cramjam.snappy.compress_raw(protobuf)), h)
    return status, body


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (OSError, http.client.HTTPException) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Flashback:
    """``flashback up`` in a child process."""

    def __init__(self, data_dir: str, port: int | None = None, config: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(data_dir + ".log")

    def start(self, timeout: float = 120) -> "Flashback":
        args = [sys.executable, "-m", "flashback", "up", "--listen", f"127.0.0.1:{self.port}",
                "--data-dir", self.data_dir]
        if self.config:
            args += ["--config", self.config]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
        wait_until(self._ready, timeout, f"flashback on port {self.port} to be ready (log {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"flashback exited with {self.proc.returncode}: {self.log()}")
        return request(self.port, "GET", "/-/ready", timeout=2)[0] == 200

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


class Prometheus:
    """The real Prometheus (Debian package) with a given configuration."""

    def __init__(self, workdir: str, config: str, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        os.makedirs(workdir, exist_ok=True)
        self.config_path = os.path.join(workdir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            f.write(config.replace("$PORT", str(self.port)))
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Prometheus":
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.workdir, "log"), "ab"))
        wait_until(lambda: request(self.port, "GET", "/-/ready", timeout=2)[0] == 200, timeout,
                   f"prometheus on port {self.port}")
        return self

    def log(self) -> str:
        with open(os.path.join(self.workdir, "log"), errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
