"""DB: the head behind the WAL; persisted windows leave the head and do not come back on restart."""

from __future__ import annotations

import cramjam

from store.db import DB, DBOptions
from store.head import Head, HeadOptions
from store.matchers import Matcher, MatchType
from store.writerequest import decode
from tests import prompb_ref

HOUR = 3600_000
MIN, MAX = -(2**63), 2**63 - 1


def _write(db: DB, name: str, points, now_ms: int):
    body = prompb_ref.write_request([([("__name__", name)], points)])
    return db.append(bytes(cramjam.snappy.compress_raw(body)), decode(body), now_ms)


def _times(db: DB, name: str) -> list[int]:
    series = db.head.select([Matcher(MatchType.EQ, "__name__", name)], MIN, MAX)
    return [int(t) for s in series for t in s.samples()[0]]


def test_persisted_data_is_truncated_after_retention_and_not_replayed(tmp_path):
    clock = [100 * HOUR / 1000]
    opts = DBOptions(head=HeadOptions(chunk_range_ms=HOUR, out_of_bounds_window_ms=2**62, max_ahead_ms=2**62),
                     retention_ms=28 * HOUR)
    db = DB.open(str(tmp_path), opts, now=lambda: clock[0])
    now = 100 * HOUR
    # Samples every 10 min from 0 h to 99 h; chunks are cut at every hour boundary.
    assert _write(db, "m", [(t, 1.0) for t in range(0, 99 * HOUR + 1, 600_000)], now).appended == 99 * 6 + 1
    assert _write(db, "old", [(HOUR, 1.0)], now).appended == 1
    db.persisted(48 * HOUR)
    # Older than the persisted end: out of bounds now.
    assert _write(db, "m2", [(47 * HOUR, 1.0)], now).rejected["out_of_bounds"][0] == 1
    db.truncate_expired()  # before = min(48 h, 100 h - 28 h) = 48 h
    assert min(_times(db, "m")) == 48 * HOUR and max(_times(db, "m")) == 99 * HOUR
    assert _times(db, "old") == []
    db.close(checkpoint=False)  # a crash right after: the forced checkpoint already holds the truncation
    db = DB.open(str(tmp_path), opts, now=lambda: clock[0])
    assert min(_times(db, "m")) == 48 * HOUR and _times(db, "old") == []
    # The persisted watermark came back with the checkpoint: old samples are still refused, before
    # the compactor has looked at the bucket again (no window is written twice, nothing acked is lost).
    assert db.head.min_valid_time == 48 * HOUR
    assert _write(db, "late", [(47 * HOUR, 1.0)], now).rejected["out_of_bounds"][0] == 1
    assert db.head.num_series() == 1
    db.close()


def test_checkpoints_without_the_min_valid_time_still_load(tmp_path):
    import struct

    head = Head(HeadOptions())
    head.set_min_valid_time(5 * HOUR)
    items = list(head.checkpoint_items())
    assert items[0][0] == b"h" and len(items[0][1]) == 17
    old = [(b"h", items[0][1][:9])] + items[1:]  # as written before the field existed
    restored = Head(HeadOptions())
    restored.load_checkpoint(old)
    assert restored.min_valid_time == MIN
    restored = Head(HeadOptions())
    restored.load_checkpoint(items)
    assert restored.min_valid_time == 5 * HOUR and struct.unpack_from("<q", items[0][1], 9)[0] == 5 * HOUR


def test_truncation_waits_for_retention(tmp_path):
    opts = DBOptions(head=HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62), retention_ms=28 * HOUR)
    db = DB.open(str(tmp_path), opts, now=lambda: 30 * HOUR / 1000)
    _write(db, "m", [(t, 1.0) for t in range(0, 29 * HOUR, HOUR)], 30 * HOUR)
    db.persisted(28 * HOUR)
    db.truncate_expired()  # before = min(28 h, 30 h - 28 h) = 2 h: only what is older than 2 h may go
    assert max(_times(db, "m")) == 28 * HOUR and 2 * HOUR in _times(db, "m")
    db.close()


def test_persisted_record_moves_the_min_valid_time_in_log_order():
    from store.db import apply_record, encode_persisted, encode_record, persisted_through

    head = Head(HeadOptions(out_of_bounds_window_ms=2**62, max_ahead_ms=2**62))
    body = prompb_ref.write_request([([("__name__", "m")], [(500, 1.0)])])
    write = encode_record(10_000, bytes(cramjam.snappy.compress_raw(body)))
    assert persisted_through(write) is None and persisted_through(encode_persisted(1000)) == 1000
    assert apply_record(head, encode_persisted(1000)) is None
    res = apply_record(head, write)  # 500 < 1000: out of bounds on every replica alike
    assert res.appended == 0 and res.rejected["out_of_bounds"][0] == 1
