"""Every sample answered 2xx survives ``kill -9`` of Flashback during a write load."""

from __future__ import annotations

import threading
import time

from tests import prompb_ref
from tests.e2e.harness import Flashback, get_json, remote_write

WRITERS = 4
SERIES_PER_REQUEST = 50


def _writer(port: int, w: int, stop: threading.Event, acked: list, errors: list) -> None:
    # Recent timestamps: the compactor persists (and then refuses) windows that closed long ago.
    t = int(time.time() * 1000) - 600_000
    i = 0
    while not stop.is_set():
        t += 1000
        i += 1
        series = [([("__name__", "durable"), ("s", str(s)), ("w", str(w))], [(t, float(i))])
                  for s in range(SERIES_PER_REQUEST)]
        try:
            status, body = remote_write(port, prompb_ref.write_request(series))
        except OSError:
            continue  # the server is gone: nothing was acknowledged
        if status == 204:
            acked.append((w, t, float(i)))
        elif status != 503:
            errors.append((status, body))
            return


def test_acknowledged_samples_survive_kill_9(tmp_path):
    fb = Flashback(str(tmp_path / "data")).start()
    try:
        for rnd in range(2):  # kill twice: the second restart replays over a checkpoint-less WAL again
            stop = threading.Event()
            acked: list = []
            errors: list = []
            threads = [threading.Thread(target=_writer, args=(fb.port, w + 10 * rnd, stop, acked, errors))
                       for w in range(WRITERS)]
            for th in threads:
                th.start()
            time.sleep(3)
            fb.kill()  # SIGKILL while requests are in flight
            stop.set()
            for th in threads:
                th.join()
            assert not errors, errors[:3]
            assert len(acked) > 20, "the load generator got too few acknowledgements to prove anything"
            fb.start()
            doc = get_json(fb.port, "/api/v1/query", {"query": 'durable{w=~"%s"}[3h]' % "|".join(
                str(w + 10 * rnd) for w in range(WRITERS)), "time": time.time() + 3600})
            stored = {}
            for s in doc["data"]["result"]:
                for t, v in s["values"]:
                    stored[(int(s["metric"]["w"]), s["metric"]["s"], round(float(t) * 1000))] = float(v)
            missing = [(w, s, t) for w, t, v in acked for s in map(str, range(SERIES_PER_REQUEST))
                       if stored.get((w, s, t)) != v]
            assert not missing, f"{len(missing)} acknowledged samples lost, e.g. {missing[:3]}"
    finally:
        fb.stop()
