"""promtool, Prometheus' own command-line client, queries Flashback (issue "Full PromQL")."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests import prompb_ref
from tests.e2e.harness import Flashback, remote_write

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
pytestmark = pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="needs promtool from the Debian prometheus package")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fb = Flashback(str(tmp_path_factory.mktemp("promtool"))).start()
    now = int(time.time()) * 1000
    series = [([("__name__", "tool_requests_total"), ("job", "api"), ("code", code)],
               [(now - 60_000 + 15_000 * i, float(10 * i + n)) for i in range(5)])
              for n, code in enumerate(("200", "500"))]
    status, body = remote_write(fb.port, prompb_ref.write_request(series))
    assert status == 204, body
    try:
        yield fb, now
    finally:
        fb.stop()


def promtool(*args: str) -> str:
    p = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_query_instant(server):
    fb, now = server
    out = promtool("query", "instant", f"--time={now // 1000}", f"http://127.0.0.1:{fb.port}",
                   "sum by (code) (tool_requests_total)")
    # promtool prints one "labels => value @[time]" line per sample.
    assert sorted(out.strip().splitlines()) == [f'{{code="200"}} => 40 @[{now // 1000}]',
                                                f'{{code="500"}} => 41 @[{now // 1000}]']


def test_query_range(server):
    fb, now = server
    out = promtool("query", "range", f"--start={now // 1000 - 60}", f"--end={now // 1000}", "--step=30s",
                   f"http://127.0.0.1:{fb.port}", 'tool_requests_total{code="200"}')
    # Samples 0,10,20,30,40 at -60s,-45s,...,0s; steps at -60s, -30s, 0s see 0, 20, 40.
    assert "0 @[" in out and "20 @[" in out and "40 @[" in out
    assert 'code="200"' in out and 'code="500"' not in out


def test_query_series_and_labels(server):
    fb, _ = server
    out = promtool("query", "series", "--match=tool_requests_total", f"http://127.0.0.1:{fb.port}")
    assert sorted(out.strip().splitlines()) == [
        '{__name__="tool_requests_total", code="200", job="api"}',
        '{__name__="tool_requests_total", code="500", job="api"}']
    out = promtool("query", "labels", f"http://127.0.0.1:{fb.port}", "code")
    assert out.strip().splitlines() == ["200", "500"]
