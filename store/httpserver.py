"""A small threaded HTTP/1.1 server with a router, shared by every component's API.

Handlers are plain functions ``Request -> Response``; they do no socket I/O.
Components register routes on a ``Router``; the wiring (``flashback/``) mounts
several components' routes on one server. The server records
``flashback_http_request_duration_seconds{handler,code}`` in an injected
registry and enforces per-route body limits before reading a body (413).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)  # path parameters, e.g. label name
    _disconnected: Callable[[], bool] = lambda: False

    def form(self) -> dict[str, list[str]]:
        """Query-string arguments merged with a ``application/x-www-form-urlencoded`` body."""
        merged = {k: list(v) for k, v in self.query.items()}
        ctype = self.headers.get("content-type", "")
        if self.method == "POST" and ctype.split(";")[0].strip() == "application/x-www-form-urlencoded":
            for k, v in urllib.parse.parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True).items():
                merged.setdefault(k, []).extend(v)
        return merged

    def disconnected(self) -> bool:
        """True once the client has closed its connection (a query may stop working)."""
        return self._disconnected()


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes | Iterable[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


@dataclass(slots=True)
class Route:
    name: str
    handler: Handler
    methods: frozenset[str]
    max_body: int | None


class Router:
    """Exact paths, and prefixes ending in ``/`` whose remainder becomes ``params['rest']``."""

    def __init__(self) -> None:
        self._exact: dict[str, Route] = {}
        self._prefix: list[tuple[str, Route]] = []

    def route(self, path: str, handler: Handler, methods: Iterable[str] = ("GET",), *,
              name: str | None = None, prefix: bool = False, max_body: int | None = None) -> None:
        r = Route(name or path, handler, frozenset(methods), max_body)
        if prefix:
            self._prefix.append((path, r))
            self._prefix.sort(key=lambda p: -len(p[0]))
        else:
            self._exact[path] = r

    def include(self, other: "Router") -> None:
        self._exact.update(other._exact)
        self._prefix = sorted(self._prefix + other._prefix, key=lambda p: -len(p[0]))

    def match(self, path: str) -> tuple[Route | None, dict[str, str]]:
        r = self._exact.get(path)
        if r is not None:
            return r, {}
        for p, r in self._prefix:
            if path.startswith(p):
                return r, {"rest": path[len(p):]}
        return None, {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Flashback"
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body are separate writes: without TCP_NODELAY, Nagle's algorithm holds the
        # body of a small response until the client's delayed ACK of the headers (~40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        start = time.perf_counter()
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        route, params = self.server.router.match(path)
        name = route.name if route else "other"
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = -1
        if route is None:
            resp = Response(404, b"404 page not found\n")
        elif self.command not in route.methods and not (self.command == "HEAD" and "GET" in route.methods):
            resp = Response(405, b"method not allowed\n", headers={"Allow": ", ".join(sorted(route.methods))})
        elif length < 0 or "chunked" in headers.get("transfer-encoding", ""):
            resp = Response(411, b"a request body needs a valid Content-Length\n")
            self.close_connection = True
        elif route.max_body is not None and length > route.max_body:
            resp = Response(413, f"request body of {length} bytes exceeds the limit of {route.max_body} bytes\n".encode())
            self.close_connection = True  # the unread body makes the connection unusable
        else:
            body = self.rfile.read(length) if length else b""
            req = Request(self.command, path, urllib.parse.parse_qs(url.query, keep_blank_values=True),
                          headers, body, params, self._client_gone)
            try:
                resp = route.handler(req)
            except Exception:  # a handler bug must not kill the connection silently
                log.exception("handler raised", extra={"handler": name})
                resp = Response(500, b"internal server error\n")
        self._write(resp)
        self.server.duration.labels(name, str(resp.status)).observe(time.perf_counter() - start)

    def _client_gone(self) -> bool:
        try:
            self.connection.setblocking(False)
            try:
                data = self.connection.recv(1, socket.MSG_PEEK)
            finally:
                self.connection.setblocking(True)
            return data == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _write(self, resp: Response) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            if isinstance(resp.body, (bytes, bytearray, memoryview)):
                self.send_header("Content-Length", str(len(resp.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(resp.body)
            else:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in resp.body:
                    if part:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], router: Router, duration: Histogram) -> None:
        self.router = router
        self.duration = duration
        super().__init__(addr, _Handler)


class HTTPServer:
    """Serves a ``Router`` on ``host:port`` in background threads until ``close()``."""

    def __init__(self, router: Router, host: str, port: int, registry: CollectorRegistry) -> None:
        duration = Histogram("flashback_http_request_duration_seconds",
                             "Latency of HTTP requests by handler and status code.",
                             ["handler", "code"], registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self._server = _Server((host, port), router, duration)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
