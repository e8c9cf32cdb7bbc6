import http.client

import pytest
from prometheus_client import CollectorRegistry

from store.httpserver import HTTPServer, Response, Router


@pytest.fixture
def server():
    r = Router()
    r.route("/echo", lambda req: Response(200, req.body + repr(sorted(req.form().items())).encode()), ("GET", "POST"),
            max_body=100)
    r.route("/stream", lambda req: Response(200, iter([b"a", b"", b"bc"])))
    r.route("/boom", lambda req: 1 / 0)
    r.route("/label/", lambda req: Response(200, req.params["rest"].encode()), prefix=True)
    s = HTTPServer(r, "127.0.0.1", 0, CollectorRegistry())
    s.start()
    yield s
    s.close()


def _req(server, method, path, body=None, headers=None):
    c = http.client.HTTPConnection(*server.address, timeout=5)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read()


def test_form_merges_query_and_urlencoded_body(server):
    status, body = _req(server, "POST", "/echo?a=1", b"b=2&a=3", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and body.endswith(b"[('a', ['1', '3']), ('b', ['2'])]")


def test_body_limit_413_before_reading(server):
    assert _req(server, "POST", "/echo", b"x" * 101)[0] == 413


def test_streamed_body_is_chunked(server):
    assert _req(server, "GET", "/stream") == (200, b"abc")


def test_unknown_path_404_method_405_handler_error_500(server):
    assert _req(server, "GET", "/nope")[0] == 404
    assert _req(server, "DELETE", "/echo")[0] == 405
    assert _req(server, "GET", "/boom")[0] == 500


def test_prefix_route_passes_rest(server):
    assert _req(server, "GET", "/label/job/values") == (200, b"job/values")


def test_keep_alive_serves_several_requests_on_one_connection(server):
    c = http.client.HTTPConnection(*server.address, timeout=5)
    for _ in range(3):
        c.request("GET", "/stream")
        assert c.getresponse().read() == b"abc"
