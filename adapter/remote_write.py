"""``POST /api/v1/write``: Prometheus remote write 1.0.

Status contract (the remote-write spec; Prometheus retries 5xx and 429 only):

* 204 once every accepted sample is durably stored;
* 400 with a readable body for undecodable bodies (snappy, protobuf) and for
  rejected samples (invalid labels, out of order, duplicate timestamp, out of
  bounds, native histograms). Valid samples of the same request are kept;
* 413 above the configured body size (checked before reading), 415 for a
  content type or encoding other than protobuf + snappy;
* 503 when the write-ahead log cannot persist (a retry can help).
"""

from __future__ import annotations

import logging
from typing import Callable

import cramjam

from store import writerequest
from store.errors import DecodeError, WALError
from store.head import AppendResult
from store.httpserver import Request, Response, Router

log = logging.getLogger(__name__)

AppendFn = Callable[[bytes, writerequest.WriteRequest], AppendResult]

_V1_PROTO = {"", "prometheus.WriteRequest"}


def _uvarint(b: bytes) -> int | None:
    result = shift = 0
    for i, byte in enumerate(b[:10]):
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result
        shift += 7
    return None


class RemoteWriteHandler:
    """Decodes requests and hands them to ``append`` (``store.db.DB.append`` in one process)."""

    def __init__(self, append: AppendFn, *, max_body_bytes: int = 32 << 20,
                 max_decoded_bytes: int = 256 << 20) -> None:
        self._append = append
        self.max_body_bytes = max_body_bytes
        self.max_decoded_bytes = max_decoded_bytes

    def route(self, router: Router) -> None:
        router.route("/api/v1/write", self, ("POST",), name="remote_write", max_body=self.max_body_bytes)

    def __call__(self, req: Request) -> Response:
        decoded = decode_request(req, self.max_decoded_bytes)
        if isinstance(decoded, Response):
            return decoded
        try:
            result = self._append(req.body, decoded)
        except WALError as e:
            log.error("write-ahead log", extra={"err": str(e)})
            return Response(503, f"storage unavailable, retry: {e}\n".encode())
        if result.rejected:
            return _bad(result.message())
        return Response(204)


def check_headers(req: Request) -> str:
    """The reason a request is not remote write 1.0 (content type, encoding), or ''."""
    ctype = req.headers.get("content-type", "")
    if ctype:
        base, _, params = ctype.partition(";")
        proto = ""
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.lower() == "proto":
                proto = v.strip()
        if base.strip().lower() != "application/x-protobuf" or proto not in _V1_PROTO:
            return (f"unsupported content type {ctype!r}: this server accepts remote write 1.0, "
                    f"application/x-protobuf (proto=prometheus.WriteRequest)\n")
    enc = req.headers.get("content-encoding", "")
    if enc and enc.lower() != "snappy":
        return f"unsupported content encoding {enc!r}: remote write bodies are snappy block-compressed\n"
    return ""


def decode_request(req: Request, max_decoded_bytes: int) -> writerequest.WriteRequest | Response:
    """The decoded WriteRequest of a remote-write 1.0 request, or the response refusing it:
    415 (content type or encoding), 400 (snappy, protobuf), 413 (decoded size)."""
    err = check_headers(req)
    if err:
        return Response(415, err.encode())
    size = _uvarint(req.body)
    if size is None:
        return _bad("snappy: corrupt input: the block does not start with its decoded length")
    if size > max_decoded_bytes:
        return Response(413, f"decompressed request of {size} bytes exceeds the limit of "
                             f"{max_decoded_bytes} bytes\n".encode())
    try:
        body = cramjam.snappy.decompress_raw(req.body).read()
    except cramjam.DecompressionError as e:
        return _bad(snappy_message(e))
    try:
        return writerequest.decode(body)
    except DecodeError as e:
        return _bad(str(e))


def snappy_message(e: Exception) -> str:
    """The text of a snappy error, starting with ``snappy:`` once (cramjam's own texts do)."""
    msg = str(e)
    return msg if msg.startswith("snappy") else f"snappy: {msg}"


def _bad(msg: str) -> Response:
    return Response(400, (msg.rstrip("\n") + "\n").encode())
