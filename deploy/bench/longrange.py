"""Long-range dashboard benchmark (issue 5): the qload dashboard over 7 days, cold and warm,
Flashback (bucket tier in SeaweedFS) against Prometheus holding the same data.

    nice -n 10 python3 deploy/bench/longrange.py                       # everything
    python3 deploy/bench/longrange.py --only flashback                 # Flashback again (new code),
                                                                        #   against the stored Prometheus run
    python3 deploy/bench/longrange.py --only flashback --reuse-flashback --wait-downsampled
    python3 deploy/bench/longrange.py --only prometheus --reuse-prometheus   # re-time Prometheus only

Phases, all state under ``--work`` (default /tmp/bench/longrange):

1. **dump** (once; reused while ``dump/meta.json`` matches ``--series`` and ``--days``):
   ``../shared/bench/rwload.py --series N --rounds R --start T --dump WORK/dump`` with
   R = days × 5760 rounds of 15 s plus ``--margin-rounds``, ending about two minutes before now.
2. **prometheus**: a fresh Prometheus 2.42 (``peers.sh``, remote-write receiver) in
   WORK/prometheus, the dump replayed in order (every sample must get a 2xx), then restarted so
   its process is cold, and the dashboard timed (below). The answers are kept in
   WORK/prometheus-answers/ and the timings in WORK/prometheus-phase.json, so a later
   ``--only flashback`` run compares against them without starting Prometheus.
   ``--reuse-prometheus`` skips the replay and reuses WORK/prometheus/data.
3. **flashback**: SeaweedFS (``weed mini``, tests/s3server.py) in WORK/flashback/seaweedfs with
   bucket ``flashback``; ``flashback up`` on WORK/flashback/data with that bucket. The dump is
   replayed with the compactor *off*: the compactor persists every window that is closed by
   the wall clock, so running it while seven days are backfilled would persist windows half
   written and then reject the rest of them as out of bounds. Flashback is then restarted with
   the compactor on (``--compactor-interval``) and the harness waits until the persisted
   watermark (``flashback_compactor_persisted_watermark_seconds``) reaches the end of the last
   closed window that holds data and one whole compactor pass writes no block; with
   ``--wait-downsampled`` also until ``flashback bucket ls`` lists blocks of every resolution
   in ``--resolutions`` (default 5m and 1h) and a pass writes nothing; then until the head has
   dropped the persisted data older than its retention (a ``head truncated`` log line; the
   checkpoint interval is 15 s in this phase), so that the head holds what it would hold in
   steady state. One untimed dashboard pass follows (``--no-prime`` skips it): it fills numba's
   on-disk cache, which a deployment fills once, not at every restart. Then Flashback is
   restarted (cold caches; SeaweedFS keeps running) and, once its first compactor pass is over,
   the dashboard is timed. ``--reuse-flashback`` skips the replay (the compactor waits still
   run, so downsampling of an existing bucket by newer code can be waited for).
   ``--flashback-src DIR`` runs Flashback from another checkout (e.g. ``git archive`` of one
   commit, so that half-finished edits in the working tree are not measured);
   ``--flashback-config YAML`` is merged into the generated config (e.g. downsampling keys).
4. **measure**: qload's 22 ``QUERIES`` (imported from qload.py) as POST query_range over the
   last ``--days`` of the data, start/end aligned to a step of about window/250 (qload's
   ``time_range``: 2419 s for 7 days). Each query runs once right after the restart (cold), then
   the whole dashboard once more (warm), one query at a time. Reported per query and as
   p50/p90: cold and warm latency, cold/warm speed-up, Flashback/Prometheus ratios, the
   server's CPU seconds per query and per pass (steadier than wall-clock on a shared machine;
   ``other_cpu_s`` and the load average show the other load), and how Flashback's cold and warm
   answers differ from Prometheus' (qload's ``diff`` with ``--rel-tol``, default 5 % because
   downsampled answers are approximations, "identical" at qload's own 1e-9, and the largest
   relative difference of any point).

Results: WORK/results-<UTC time>/longrange.json and table.txt. Servers bind 127.0.0.1 only;
heavy children run under ``nice -n --nice`` (default 10) because the machine is shared.
Prometheus' restart empties its process but not the OS page cache (the bucket's files are in
the same page cache), so "cold" means cold processes, not cold disks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.environ.get("BENCH", os.path.join(os.path.dirname(ROOT), "shared", "bench"))
SCRAPE_S = 15
ROUNDS_PER_DAY = 86400 // SCRAPE_S
BUCKET = "flashback"
_RESOLUTION_MS = {"raw": 0, "5m": 300_000, "1h": 3_600_000}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:9]))
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def metric_sum(text: str, name: str) -> float | None:
    """Sum of every sample of ``name`` (any labels) in a text exposition; None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


# -- phase 1: the dump ------------------------------------------------------------------------


def ensure_dump(args: argparse.Namespace) -> dict:
    path = os.path.join(args.work, "dump")
    rounds = args.days * ROUNDS_PER_DAY + args.margin_rounds
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta["rounds"] == rounds and meta.get("requested_series") == args.series:
            log(f"dump: reusing {path} ({meta['samples']} samples, {meta['series']} series)")
            return meta
        if args.only != "dump" and not args.regenerate:
            sys.exit(f"{path} holds another dump (rounds {meta['rounds']}, series {meta.get('requested_series')}); "
                     "pass --regenerate or another --work")
    shutil.rmtree(path, ignore_errors=True)
    start = int(time.time()) - rounds * SCRAPE_S - 120
    cmd = nice(args) + [sys.executable, os.path.join(BENCH, "rwload.py"), "--series", str(args.series),
                        "--rounds", str(rounds), "--start", str(start), "--dump", path]
    log("dump: " + " ".join(cmd))
    t0 = time.monotonic()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    meta = json.loads(out.strip().splitlines()[-1])
    meta["requested_series"] = args.series
    meta["generate_wall_s"] = round(time.monotonic() - t0, 1)
    meta["command"] = " ".join(cmd)
    json.dump(meta, open(meta_path, "w"))
    log(f"dump: {meta['samples']} samples in {meta['generate_wall_s']} s")
    return meta


def nice(args: argparse.Namespace) -> list[str]:
    return ["nice", "-n", str(args.nice)] if args.nice else []


def replay(args: argparse.Namespace, url: str, pid: int, meta: dict) -> dict:
    """Sends the dump in order; exits if any request failed or any sample was not accepted."""
    cmd = nice(args) + [sys.executable, os.path.join(BENCH, "rwload.py"), "--url", url, "--replay",
                        os.path.join(args.work, "dump"), "--concurrency", str(args.concurrency),
                        "--server-pid", str(pid)]
    log("replay: " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"rwload failed ({p.returncode}): {p.stderr[-2000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(cmd)
    if result["non_2xx"] or result["samples_accepted"] != meta["samples"]:
        sys.exit(f"replay into {url}: {result['samples_accepted']} of {meta['samples']} samples accepted, "
                 f"non-2xx {result['non_2xx']}")
    log(f"replay: {result['samples_accepted']} samples, {result['samples_per_s']}/s, "
        f"server cpu {result['server_cpu_s']} s, other cpu {result['other_cpu_s']} s")
    return result


# -- phase 4: measuring -----------------------------------------------------------------------


def query_range(meta: dict, days: int, step: int = 0) -> tuple[float, float, int]:
    """qload's range (step ~ window/250), or with ``step`` (s) start and end aligned to that step."""
    import qload

    if step:
        end = math.floor(meta["last_ts_ms"] / 1000 / step) * step
        return end - step * math.ceil(days * 86400 / step), end, step
    ns = argparse.Namespace(end=meta["last_ts_ms"] / 1000, meta=None, window=days * 86400, points=250)
    return qload.time_range(ns)


def dashboard_pass(url: str, pid: int, rng: tuple[float, float, int], params: Sequence[tuple[str, str]] = ()) -> dict:
    """Every query once, one at a time; latency, status and answer per query, the server's CPU.
    ``params`` are added to every request (e.g. ``max_source_resolution``)."""
    import qload

    client = qload.Client(url)
    start, end, step = rng
    per_query, bodies = {}, {}
    cpu0, busy0, t0 = cpu_seconds(pid), machine_busy_seconds(), time.perf_counter()
    for name, q in qload.QUERIES.items():
        c0, q0 = cpu_seconds(pid), time.perf_counter()
        form = qload.form(q, start, end, step)
        if params:
            form += b"&" + urllib.parse.urlencode(list(params)).encode()
        status, body = client.query_range(form)
        seconds = time.perf_counter() - q0
        # The server's CPU during the query: steadier than wall-clock on a shared machine (it
        # includes the server's background threads, e.g. Flashback's compactor and checkpoints).
        entry = {"seconds": round(seconds, 4), "server_cpu_s": round(cpu_seconds(pid) - c0, 2), "status": status,
                 "bytes": len(body)}
        try:
            doc = json.loads(body)
            entry["ok"] = status == 200 and doc.get("status") == "success"
            if entry["ok"]:
                entry["series"] = len(doc["data"]["result"])
            else:
                entry["error"] = str(doc.get("error"))[:300]
            for key in ("warnings", "infos"):
                if doc.get(key):
                    entry[key] = doc[key][:5]
            extra = {k: v for k, v in doc.items() if k not in ("status", "data", "warnings", "infos", "error",
                                                                 "errorType")}
            if extra:  # e.g. which resolution answered, once the querier says so
                entry["extra"] = extra
        except ValueError:
            entry["ok"], entry["error"] = False, body[:300].decode(errors="replace")
        per_query[name] = entry
        bodies[name] = body
        log(f"  {name}: {seconds:.3f} s (server cpu {entry['server_cpu_s']} s) "
            f"{'ok' if entry['ok'] else entry.get('error', status)}")
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    busy = machine_busy_seconds() - busy0
    ok = [e["seconds"] for e in per_query.values() if e["ok"]]
    ok_cpu = np.array([e["server_cpu_s"] for e in per_query.values() if e["ok"]] or [np.nan])
    return {"per_query": per_query, "wall_s": round(wall, 2), "server_cpu_s": round(cpu, 2),
            "other_cpu_s": round(busy - cpu, 2), "load_avg_1m": os.getloadavg()[0],
            "errors": len(per_query) - len(ok), **percentiles(ok),
            "cpu_p50_s": round(float(np.percentile(ok_cpu, 50)), 3),
            "cpu_p90_s": round(float(np.percentile(ok_cpu, 90)), 3)}, bodies


def percentiles(seconds: list[float]) -> dict:
    a = np.array(seconds or [np.nan])
    return {"p50_s": round(float(np.percentile(a, 50)), 4), "p90_s": round(float(np.percentile(a, 90)), 4),
            "max_s": round(float(a.max()), 4)}


def measure(url: str, pid: int, meta: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    rng = query_range(meta, args.days, args.step)
    log(f"measure {url}: range {rng[0]:.0f}..{rng[1]:.0f} step {rng[2]} s; cold pass")
    cold, cold_bodies = dashboard_pass(url, pid, rng, args.param)
    log("warm pass")
    warm, warm_bodies = dashboard_pass(url, pid, rng, args.param)
    return ({"range": {"start": rng[0], "end": rng[1], "step": rng[2]}, "cold": cold, "warm": warm},
            {"cold": cold_bodies, "warm": warm_bodies})


def compare(ref: dict[str, bytes], got: dict[str, bytes], rel_tol: float, abs_tol: float) -> dict:
    """Per query: qload's diff at ``rel_tol`` and the largest relative difference of any point."""
    import qload

    out = {}
    for name in qload.QUERIES:
        maps = []
        for side, bodies in (("prometheus", ref), ("flashback", got)):
            try:
                maps.append(qload.series_map(bodies[name]))
            except (KeyError, ValueError) as e:
                out[name] = {"verdict": "error", "error": f"{side}: {type(e).__name__}: {str(e)[:200]}"}
                break
        if len(maps) < 2:
            continue
        a, b = maps
        if a.keys() != b.keys():  # compare without __name__ if that is the only difference
            strip = lambda m: {tuple(kv for kv in k if kv[0] != "__name__"): v for k, v in m.items()}
            sa, sb = strip(a), strip(b)
            if sa.keys() == sb.keys() and len(sa) == len(a) == len(b):
                a, b = sa, sb
        max_rel, points = 0.0, 0
        for key in a.keys() & b.keys():
            pa, pb = a[key], b[key]
            for t in pa.keys() & pb.keys():
                x, y = pa[t], pb[t]
                points += 1
                if x == y or (math.isnan(x) and math.isnan(y)):
                    continue
                max_rel = max(max_rel, abs(x - y) / max(abs(x), abs(y), abs_tol))
        ra, rb = maps
        d = qload.diff(ra, rb, rel_tol, abs_tol)
        exact = qload.diff(ra, rb, 1e-9, 1e-12)  # qload --compare's own tolerances
        out[name] = {"verdict": ("identical" if exact is None else "within tol") if d is None else "differs",
                     "why": d and d["why"], "why_strict": exact and exact["why"],
                     "series_prometheus": len(a), "series_flashback": len(b), "points_compared": points,
                     "max_rel_diff": float(f"{max_rel:.3g}")}
    return out


def save_bodies(path: str, bodies: dict[str, bytes]) -> None:
    os.makedirs(path, exist_ok=True)
    for name, body in bodies.items():
        with open(os.path.join(path, f"{name}.json"), "wb") as f:
            f.write(body)


def load_bodies(path: str) -> dict[str, bytes]:
    import qload

    out = {}
    for name in qload.QUERIES:
        p = os.path.join(path, f"{name}.json")
        if os.path.exists(p):
            out[name] = open(p, "rb").read()
    return out


# -- phase 2: Prometheus ----------------------------------------------------------------------


def peers(args: argparse.Namespace, cmd: str, port: int, directory: str) -> dict:
    p = subprocess.run(nice(args) + [os.path.join(BENCH, "peers.sh"), cmd, "prometheus", str(port), directory],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"peers.sh {cmd} prometheus: {p.stderr.strip()}")
    return dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)


def run_prometheus(args: argparse.Namespace, meta: dict) -> dict:
    d = os.path.join(args.work, "prometheus")
    port = args.prom_port or free_port()
    phase: dict = {"dir": d, "port": port, "wall_s": {}}
    if not args.reuse_prometheus:
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.monotonic()
        env = peers(args, "start", port, d)
        phase["replay"] = replay(args, env["WRITE_URL"], int(env["PID"]), meta)
        peers(args, "stop", port, d)
        phase["wall_s"]["replay"] = round(time.monotonic() - t0, 1)
    elif not os.path.isdir(os.path.join(d, "data")):
        sys.exit(f"--reuse-prometheus: no {d}/data")
    else:  # keep the replay figures of the run that loaded the data
        previous = os.path.join(args.work, "prometheus-phase.json")
        if os.path.exists(previous):
            old = json.load(open(previous))
            if old.get("replay"):
                phase["replay"] = {**old["replay"], "from_earlier_run": old.get("finished")}
                phase["wall_s"]["replay"] = old["wall_s"].get("replay")
    t0 = time.monotonic()
    env = peers(args, "start", port, d)
    phase["wall_s"]["restart_to_ready"] = round(time.monotonic() - t0, 1)
    try:
        t0 = time.monotonic()
        phase["measure"], bodies = measure(env["QUERY_URL"], int(env["PID"]), meta, args)
        phase["wall_s"]["measure"] = round(time.monotonic() - t0, 1)
        phase["data_dir_mib"] = round(du(os.path.join(d, "data")) / 2**20, 1)
    finally:
        peers(args, "stop", port, d)
    save_bodies(os.path.join(args.work, "prometheus-answers"), bodies["warm"])
    phase["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    json.dump(phase, open(os.path.join(args.work, "prometheus-phase.json"), "w"), indent=1)
    return phase


def du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


# -- phase 3: Flashback -----------------------------------------------------------------------


class Flashback:
    """One ``flashback up`` process from ``src`` on a data dir, with a generated config."""

    def __init__(self, args: argparse.Namespace, src: str, base: str, objstore: dict) -> None:
        self.args, self.src, self.base, self.objstore = args, src, base, objstore
        self.port = args.fb_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(base, "log")
        self.log_offset = 0

    def truncated_before_ms(self) -> int:
        """The latest ``before_ms`` of "head truncated" logged by this process (0 if none)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            found = re.findall(rb"msg='head truncated' before_ms=(-?\d+)", f.read())
        return max(map(int, found), default=0)

    def config(self, compactor: bool, checkpoint_interval: str | None = None) -> dict:
        cfg = {"bucket": self.objstore, "compactor": {"enabled": compactor,
                                                      "interval": f"{self.args.compactor_interval}s"},
               "query": {"timeout": self.args.query_timeout}}
        if checkpoint_interval:
            cfg["wal"] = {"checkpoint_interval": checkpoint_interval}
        extra = yaml.safe_load(self.args.flashback_config) if self.args.flashback_config else {}
        for k, v in (extra or {}).items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        return cfg

    def start(self, compactor: bool, name: str, checkpoint_interval: str | None = None) -> float:
        """Starts and waits until ready; returns the seconds that took."""
        cfg_path = os.path.join(self.base, f"config-{name}.yml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(self.config(compactor, checkpoint_interval), f)
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        cmd = nice(self.args) + [sys.executable, "-m", "flashback", "up", "--config", cfg_path, "--data-dir",
                                 os.path.join(self.base, "data"), "--listen", f"127.0.0.1:{self.port}"]
        log(f"flashback: {' '.join(cmd)} (cwd {self.src})")
        env = dict(os.environ, PYTHONPATH=self.src)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.src, env=env, stdin=subprocess.DEVNULL,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while http_get(self.url + "/-/ready", 2)[0] != 200:
            if self.proc.poll() is not None:
                sys.exit(f"flashback exited with {self.proc.returncode}; see {self.base}/log")
            if time.monotonic() - t0 > 1800:
                sys.exit(f"flashback not ready after 30 min; see {self.base}/log")
            time.sleep(0.2)
        return round(time.monotonic() - t0, 2)

    def stop(self) -> float:
        if self.proc is None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            log("flashback ignored SIGTERM for 5 min; killing it")
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return round(time.monotonic() - t0, 2)

    def metrics(self) -> str:
        status, body = http_get(self.url + "/metrics", 30)
        if status != 200:
            raise RuntimeError(f"GET /metrics: {status} {body[:200]!r}")
        return body.decode()

    def compactor_state(self) -> dict:
        text = self.metrics()
        return {k: metric_sum(text, f"flashback_compactor_{k}") for k in
                ("runs_total", "blocks_written_total", "failures_total", "persisted_watermark_seconds",
                 "samples_written_total", "last_success_timestamp_seconds")}

    def wait_pass_without_writes(self, deadline: float) -> dict:
        """Until one whole compactor pass (started after now) wrote no block."""
        state = self.compactor_state()
        while True:
            runs0, written0 = state["runs_total"] or 0, state["blocks_written_total"] or 0
            while (state := self.compactor_state())["runs_total"] is None or state["runs_total"] < runs0 + 2:
                self.check_alive(deadline)
                time.sleep(2)
            if (state["blocks_written_total"] or 0) == written0:
                return state

    def check_alive(self, deadline: float) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            sys.exit(f"flashback exited with {self.proc.returncode}; see {self.base}/log")
        if time.monotonic() > deadline:
            sys.exit(f"flashback: timed out waiting for the compactor; see {self.base}/log")

    def bucket_blocks(self) -> list[dict]:
        cmd = [sys.executable, "-m", "flashback", "bucket", "ls", "-o", "json",
               "--objstore.config", json.dumps(self.objstore)]
        p = subprocess.run(cmd, cwd=self.src, env=dict(os.environ, PYTHONPATH=self.src), capture_output=True,
                           text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"flashback bucket ls: {p.stderr[-500:]}")
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def summarize_blocks(blocks: list[dict]) -> dict:
    """Visible (unmarked, not hidden) blocks per resolution: count, samples, bytes, levels."""
    out: dict = {}
    for b in blocks:
        if "resolution" not in b or b.get("deletionTime") or b.get("hiddenBy"):
            continue
        r = out.setdefault(str(b["resolution"]), {"blocks": 0, "samples": 0, "bytes": 0, "levels": {}})
        r["blocks"] += 1
        r["samples"] += b["numSamples"]
        r["bytes"] += b["sizeBytes"] or 0
        r["levels"][str(b["level"])] = r["levels"].get(str(b["level"]), 0) + 1
    for r in out.values():
        r["bytes_per_sample"] = round(r["bytes"] / r["samples"], 3) if r["samples"] else None
    return out


def watermark_target(meta: dict, cfg: dict) -> int:
    """End (ms) of the last window the compactor will persist: closed by now and holding data."""
    from flashback.config import parse_duration_ms

    comp = cfg.get("compactor", {})
    w = parse_duration_ms(comp.get("window", "28h"), "window")
    grace = parse_duration_ms(comp.get("grace", "1h"), "grace")
    now = int(time.time() * 1000)
    last_closed_end = (now - grace - 1) // w * w  # a window [s, e) is closed once e + grace < now
    return min(last_closed_end, (meta["last_ts_ms"] // w + 1) * w)


def run_flashback(args: argparse.Namespace, meta: dict) -> dict:
    sys.path.insert(0, ROOT)
    from tests.s3server import SeaweedFS

    base = os.path.join(args.work, "flashback")
    src = os.path.abspath(args.flashback_src or ROOT)
    phase: dict = {"src": src, "wall_s": {}}
    try:
        phase["commit"] = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip() or open(os.path.join(src, "COMMIT")).read().strip()
    except OSError:
        phase["commit"] = None
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True)
    phase["uncommitted_changes"] = dirty.stdout.count("\n") if dirty.returncode == 0 else None
    if not args.reuse_flashback:
        shutil.rmtree(base, ignore_errors=True)
    elif not os.path.isdir(os.path.join(base, "data")):
        sys.exit(f"--reuse-flashback: no {base}/data")
    os.makedirs(os.path.join(base, "seaweedfs"), exist_ok=True)
    s3 = SeaweedFS(os.path.join(base, "seaweedfs"))
    s3.start()
    fb = None
    try:
        s3.create_bucket(BUCKET)
        fb = Flashback(args, src, base, s3.objstore_config(BUCKET))
        if not args.reuse_flashback:
            t0 = time.monotonic()
            fb.start(compactor=False, name="replay")
            phase["replay"] = replay(args, fb.url + "/api/v1/write", fb.proc.pid, meta)
            phase["wall_s"]["replay"] = round(time.monotonic() - t0, 1)
            phase["wall_s"]["stop_after_replay"] = fb.stop()
        t0 = time.monotonic()
        # A short checkpoint interval, so that the head drops the persisted windows (and the
        # checkpoint holds only the last 28 h) soon after they are in the bucket.
        phase["wall_s"]["start_compactor_to_ready"] = fb.start(compactor=True, name="compaction",
                                                               checkpoint_interval="15s")
        target = watermark_target(meta, fb.config(True))
        log(f"compactor: waiting for the persisted watermark to reach {target} ms")
        deadline = time.monotonic() + args.compaction_timeout
        while True:
            state = fb.compactor_state()
            if (state["persisted_watermark_seconds"] or 0) * 1000 >= target:
                break
            fb.check_alive(deadline)
            time.sleep(5)
        state = fb.wait_pass_without_writes(deadline)
        phase["wall_s"]["compaction"] = round(time.monotonic() - t0, 1)
        phase["compactor"] = state
        if args.wait_downsampled:
            t0 = time.monotonic()
            want = {str(_RESOLUTION_MS[r]) for r in args.resolutions.split(",")}
            log(f"compactor: waiting for blocks of resolution(s) {sorted(want)} ms")
            deadline = time.monotonic() + args.downsample_timeout
            while not want <= set(summarize_blocks(fb.bucket_blocks())):
                fb.check_alive(deadline)
                time.sleep(10)
            phase["compactor"] = fb.wait_pass_without_writes(deadline)
            phase["wall_s"]["downsampling"] = round(time.monotonic() - t0, 1)
        from flashback.config import parse_duration_ms

        head_cfg = fb.config(True).get("head", {})
        chunk_range = parse_duration_ms(head_cfg.get("chunk_range", "2h"), "chunk_range")
        keep = parse_duration_ms(head_cfg.get("retention", "28h"), "retention")
        want = min(target, int(time.time() * 1000) - keep) // chunk_range * chunk_range
        log(f"head: waiting until it drops the persisted data before {want} ms")
        deadline = time.monotonic() + 1800
        while fb.truncated_before_ms() < want:
            fb.check_alive(deadline)
            time.sleep(2)
        phase["head_after_truncation"] = {k: metric_sum(fb.metrics(), f"flashback_head_{k}")
                                          for k in ("series", "chunks", "chunk_bytes")}
        phase["blocks"] = summarize_blocks(fb.bucket_blocks())
        log(f"bucket: {json.dumps(phase['blocks'])}")
        if args.prime:
            # One untimed pass before the cold restart: numba compiles the query kernels into its
            # on-disk cache (__pycache__) the first time a checkout runs them, as any deployment
            # does once; without this pass the first checkout's "cold" numbers include compiling.
            t0 = time.monotonic()
            phase["prime"], _ = dashboard_pass(fb.url, fb.proc.pid, query_range(meta, args.days, args.step),
                                               args.param)
            phase["wall_s"]["prime"] = round(time.monotonic() - t0, 1)
        phase["wall_s"]["stop_before_cold"] = fb.stop()
        # Cold: a new process. Its first compactor pass (catalog refresh, watermark) is left to
        # finish first, so that the cold pass measures queries rather than the compactor.
        phase["wall_s"]["restart_to_ready"] = fb.start(compactor=True, name="query")
        text = fb.metrics()
        phase["wal_replay_duration_seconds"] = metric_sum(text, "flashback_wal_replay_duration_seconds")
        started, deadline = time.time(), time.monotonic() + 600
        while ((st := fb.compactor_state())["last_success_timestamp_seconds"] or 0) < started \
                and not st["failures_total"]:
            fb.check_alive(deadline)
            time.sleep(0.5)
        t0 = time.monotonic()
        phase["measure"], bodies = measure(fb.url, fb.proc.pid, meta, args)
        phase["wall_s"]["measure"] = round(time.monotonic() - t0, 1)
        phase["rss_mib"] = rss_mib(fb.proc.pid)
        for p in ("cold", "warm"):
            save_bodies(os.path.join(args.work, "flashback-answers", p), bodies[p])
        phase["data_dir_mib"] = round(du(os.path.join(base, "data")) / 2**20, 1)
        phase["bucket_dir_mib"] = round(du(os.path.join(base, "seaweedfs")) / 2**20, 1)
    finally:
        if fb is not None:
            fb.stop()
        s3.stop()
    return phase


def rss_mib(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


# -- the report -------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def report(args: argparse.Namespace, meta: dict, prom: dict | None, fb: dict | None, cmp: dict | None) -> dict:
    import qload

    rows = {}
    for name in qload.QUERIES:
        row = {}
        for side, phase in (("prometheus", prom), ("flashback", fb)):
            if phase and "measure" in phase:
                c, w = (phase["measure"][p]["per_query"][name] for p in ("cold", "warm"))
                row[side] = {"cold_s": c["seconds"] if c["ok"] else None, "warm_s": w["seconds"] if w["ok"] else None,
                             "cold_cpu_s": c.get("server_cpu_s"), "warm_cpu_s": w.get("server_cpu_s"),
                             "series": w.get("series"), "error": c.get("error") or w.get("error")}
                row[side]["speedup"] = ratio(row[side]["cold_s"], row[side]["warm_s"])
        if "prometheus" in row and "flashback" in row:
            row["fb_over_prom_cold"] = ratio(row["flashback"]["cold_s"], row["prometheus"]["cold_s"])
            row["fb_over_prom_warm"] = ratio(row["flashback"]["warm_s"], row["prometheus"]["warm_s"])
        if cmp:
            row["compare"] = cmp["warm"][name]
            row["compare_cold"] = cmp["cold"][name]
        rows[name] = row
    summary = {}
    for side, phase in (("prometheus", prom), ("flashback", fb)):
        if phase and "measure" in phase:
            m = phase["measure"]
            summary[side] = {p: {k: m[p].get(k) for k in ("p50_s", "p90_s", "max_s", "cpu_p50_s", "cpu_p90_s", "wall_s",
                                                          "server_cpu_s", "other_cpu_s", "load_avg_1m", "errors")}
                             for p in ("cold", "warm")}
            summary[side]["speedup_p50"] = ratio(m["cold"]["p50_s"], m["warm"]["p50_s"])
            summary[side]["speedup_p90"] = ratio(m["cold"]["p90_s"], m["warm"]["p90_s"])
    if "prometheus" in summary and "flashback" in summary:
        p, f = summary["prometheus"], summary["flashback"]
        summary["fb_over_prom"] = {f"{pas}_{k}": ratio(f[pas][k], p[pas][k]) for pas in ("cold", "warm")
                                   for k in ("p50_s", "p90_s", "server_cpu_s", "wall_s")}
    if "flashback" in summary:
        f = summary["flashback"]
        summary["targets"] = {"cold_p50_below_2s": f["cold"]["p50_s"] < 2,
                              "warm_10x_faster_p50": (f["speedup_p50"] or 0) >= 10}
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
            "load_avg_at_end": os.getloadavg(), "dump": meta, "summary": summary, "queries": rows,
            "prometheus": prom, "flashback": fb}


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and 0 < abs(v) < 1e-3:
        return f"{v:.2g}"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.0f}"
    return str(v)


def table(doc: dict) -> str:
    cols = ["query", "prom cold s", "prom warm s", "fb cold s", "fb warm s", "fb cold/warm", "fb/prom cold",
            "fb/prom warm", "fb cpu cold", "fb cpu warm", "series p/f", "max rel diff", "verdict", "cold verdict"]
    lines = ["  ".join(f"{c:>13}" if i else f"{c:<24}" for i, c in enumerate(cols))]
    for name, r in doc["queries"].items():
        p, f, c = r.get("prometheus", {}), r.get("flashback", {}), r.get("compare") or {}
        vals = [p.get("cold_s"), p.get("warm_s"), f.get("cold_s"), f.get("warm_s"), f.get("speedup"),
                r.get("fb_over_prom_cold"), r.get("fb_over_prom_warm"), f.get("cold_cpu_s"), f.get("warm_cpu_s"),
                f"{c.get('series_prometheus', '-')}/{c.get('series_flashback', '-')}", c.get("max_rel_diff"),
                c.get("verdict"), (r.get("compare_cold") or {}).get("verdict")]
        lines.append("  ".join([f"{name:<24}"] + [f"{fmt(v):>13}" for v in vals]))
    lines.append("")
    for side, s in doc["summary"].items():
        lines.append(f"{side}: {json.dumps(s)}")
    for side in ("prometheus", "flashback"):
        ph = doc.get(side)
        if ph:
            lines.append(f"{side} wall s: {json.dumps(ph.get('wall_s'))}")
            if ph.get("replay"):
                r = ph["replay"]
                lines.append(f"{side} replay: {r['samples_accepted']} samples, {r['samples_per_s']}/s, server cpu "
                             f"{r['server_cpu_s']} s ({r['server_cpu_s'] / r['samples_accepted'] * 1e6:.2f} s per "
                             f"M samples), other cpu {r['other_cpu_s']} s, non-2xx {r['non_2xx']}")
    if doc.get("flashback", {}) and doc["flashback"].get("blocks"):
        lines.append(f"flashback blocks: {json.dumps(doc['flashback']['blocks'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", default="/tmp/bench/longrange")
    ap.add_argument("--series", type=int, default=5000, help="rwload --series (default 5000: 5241 series)")
    ap.add_argument("--days", type=int, default=7, help="days of data, and the dashboard's range")
    ap.add_argument("--margin-rounds", type=int, default=240, help="rounds beyond --days (default 240 = 1 h)")
    ap.add_argument("--regenerate", action="store_true", help="replace a dump of another shape")
    ap.add_argument("--only", choices=["dump", "prometheus", "flashback"])
    ap.add_argument("--reuse-prometheus", action="store_true", help="restart and time the existing Prometheus data")
    ap.add_argument("--reuse-flashback", action="store_true",
                    help="no replay: restart the existing Flashback data and bucket (compactor waits still apply)")
    ap.add_argument("--flashback-src", help="checkout to run Flashback from (default: this repository)")
    ap.add_argument("--flashback-config", help="YAML merged into the generated flashback config")
    ap.add_argument("--compactor-interval", type=int, default=10, help="seconds (default 10)")
    ap.add_argument("--compaction-timeout", type=float, default=7200)
    ap.add_argument("--wait-downsampled", action="store_true", help="also wait for downsampled blocks")
    ap.add_argument("--resolutions", default="5m,1h", help="with --wait-downsampled (default 5m,1h)")
    ap.add_argument("--downsample-timeout", type=float, default=7200)
    ap.add_argument("--no-prime", dest="prime", action="store_false",
                    help="skip the untimed dashboard pass before Flashback's cold restart (it fills numba's cache)")
    ap.add_argument("--query-timeout", default="10m", help="flashback query.timeout (default 10m)")
    ap.add_argument("--concurrency", type=int, default=2, help="rwload connections (default 2)")
    ap.add_argument("--step", type=int, default=0,
                    help="query step in s, start/end aligned to it (default: qload's, ~window/250: 2419 s)")
    ap.add_argument("--param", action="append", default=[], type=lambda kv: tuple(kv.split("=", 1)),
                    metavar="NAME=VALUE", help="added to every query, e.g. max_source_resolution=5m "
                    "(Prometheus ignores it)")
    ap.add_argument("--rel-tol", type=float, default=0.05, help="answers compared within this (default 0.05)")
    ap.add_argument("--abs-tol", type=float, default=1e-9)
    ap.add_argument("--prom-port", type=int)
    ap.add_argument("--fb-port", type=int)
    ap.add_argument("--nice", type=int, default=10, help="niceness of servers and loaders (0: none)")
    args = ap.parse_args()
    sys.path.insert(0, BENCH)
    os.makedirs(args.work, exist_ok=True)
    meta = ensure_dump(args)
    if args.only == "dump":
        return
    prom = fb = None
    if args.only in (None, "prometheus"):
        prom = run_prometheus(args, meta)
    else:
        path = os.path.join(args.work, "prometheus-phase.json")
        prom = json.load(open(path)) if os.path.exists(path) else None
    cmp = None
    if args.only in (None, "flashback"):
        fb = run_flashback(args, meta)
        ref = load_bodies(os.path.join(args.work, "prometheus-answers"))
        if ref:
            cmp = {p: compare(ref, load_bodies(os.path.join(args.work, "flashback-answers", p)), args.rel_tol,
                              args.abs_tol) for p in ("cold", "warm")}
    doc = report(args, meta, prom, fb, cmp)
    out = os.path.join(args.work, "results-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(out)
    json.dump(doc, open(os.path.join(out, "longrange.json"), "w"), indent=1)
    text = table(doc)
    open(os.path.join(out, "table.txt"), "w").write(text)
    print(text)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
