"""Object storage: the narrow ``Bucket`` interface, the filesystem bucket and the wrappers.

The vocabulary and semantics are those of Thanos' ``objstore`` (``objstore.go``)
so that blocks, tools and configuration read side by side with Thanos':

* names are ``/``-separated keys (``01H.../chunks/000001``); ``iter`` lists the
  entries directly under a directory, sub-directories as ``"dir/"``, or every
  object below it when ``recursive``; entries come sorted by name.
* ``upload`` overwrites; readers see either the old or the new object, never a
  part of one.
* a missing object raises :class:`~store.errors.ObjectNotFound`; everything else
  raises :class:`~store.errors.BucketError`, transient failures its subclass
  :class:`~store.errors.BucketUnavailable`.

Metrics, key prefixes and retries are wrappers around the interface
(``MetricsBucket``, ``PrefixedBucket``, ``RetryingBucket``), as objstore's
``WrapWithMetrics`` and ``NewPrefixedBucket`` are.

Configuration uses objstore's YAML format (``bucket_from_config``)::

    type: FILESYSTEM            # or S3; case-insensitive
    config:
      directory: /var/lib/flashback/bucket
    prefix: ""                  # optional, as in objstore's BucketConfig

The S3 keys are documented in ``store.s3bucket``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import time
import uuid
from typing import Any, BinaryIO, Callable, Iterator, Mapping, NamedTuple, Protocol

import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram

from store.errors import BucketConfigError, BucketError, BucketUnavailable, ObjectNotFound

DIR_DELIM = "/"


class ObjectAttributes(NamedTuple):
    """Size in bytes and last modification time (ms since the Unix epoch) of an object."""

    size: int
    last_modified: int


class Bucket(Protocol):
    """Read and write access to one object storage bucket (objstore ``Bucket``).

    Thread-safety: every method may be called from many threads at once; an
    implementation holds no per-call state. Consistency: strong read-after-write
    for a single object is assumed, as objstore does (S3, MinIO, SeaweedFS and
    a local filesystem provide it). There are no cross-object transactions:
    callers that need "complete or invisible" write their marker object last
    (``meta.json``). Lifetime: ``close`` releases connections; no method may be
    called afterwards.
    """

    def get(self, name: str) -> bytes:
        """The whole object. Raises ObjectNotFound if it does not exist."""

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (``-1``: to the end).

        A range reaching past the end returns the bytes that exist (an offset
        at or past the end returns ``b""``). Raises ObjectNotFound if the
        object does not exist.
        """

    def iter(self, prefix: str = "", recursive: bool = False) -> Iterator[str]:
        """Full names of the entries under directory ``prefix``, sorted.

        ``prefix`` is a directory with or without its trailing ``/`` (``""``
        is the root). Not recursive: objects directly under it and
        sub-directories holding objects, the latter with a trailing ``/``.
        Recursive: every object below it. A missing directory yields nothing.
        Errors may be raised while iterating.
        """

    def exists(self, name: str) -> bool:
        """Whether the object exists."""

    def upload(self, name: str, data: bytes | BinaryIO) -> None:
        """Store ``data`` (bytes or a binary file read to its end) as ``name``, replacing any object."""

    def delete(self, name: str) -> None:
        """Remove the object. Raises ObjectNotFound if it does not exist."""

    def attributes(self, name: str) -> ObjectAttributes:
        """Size and modification time. Raises ObjectNotFound if the object does not exist."""

    def close(self) -> None:
        """Release connections and other resources."""


def check_name(name: str) -> None:
    """Raise BucketError unless ``name`` is a valid object name.

    Valid names are non-empty ``/``-separated paths without empty, ``.`` or
    ``..`` components, leading or trailing ``/``, or NUL characters: the names
    both a filesystem and S3 can store the same way.
    """
    if not isinstance(name, str) or not name:
        raise BucketError(f"invalid object name {name!r}: empty")
    if "\x00" in name:
        raise BucketError(f"invalid object name {name!r}: contains NUL")
    for part in name.split(DIR_DELIM):
        if part in ("", ".", ".."):
            raise BucketError(f"invalid object name {name!r}: empty, '.' or '..' path component")


def dir_prefix(prefix: str) -> str:
    """``prefix`` as a directory key prefix: ``""`` for the root, else ending in ``/``."""
    prefix = prefix.rstrip(DIR_DELIM)
    if not prefix:
        return ""
    check_name(prefix)
    return prefix + DIR_DELIM


def check_range(name: str, offset: int, length: int) -> None:
    """Raise BucketError unless ``offset >= 0`` and ``length >= -1``."""
    if offset < 0 or length < -1:
        raise BucketError(f"invalid range of {name!r}: offset {offset}, length {length}")


# ---------------------------------------------------------------------------------------------
# Filesystem


_TMP_RE = re.compile(r"^\.tmp\.[0-9a-f]{32}$")


class FilesystemBucket:
    """A bucket in a local directory: object ``a/b`` is the file ``DIRECTORY/a/b``.

    Uploads write a temporary file (``.tmp.<hex>``, never listed) in the target
    directory, fsync it and rename it over the target, so readers see the old or
    the new object whole and a crash leaves no partial object. Deleting an
    object removes directories it leaves empty, so ``iter`` does not list them.
    The directory is created on the first upload. Thread-safe.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Args:
            directory: root directory of the bucket; need not exist yet.
        """
        if not os.fspath(directory):
            raise BucketConfigError("filesystem bucket: directory is empty")
        self._root = os.path.abspath(os.fspath(directory))

    def __repr__(self) -> str:
        return f"FilesystemBucket({self._root!r})"

    def _path(self, name: str) -> str:
        check_name(name)
        parts = name.split(DIR_DELIM)
        if _TMP_RE.match(parts[-1]):
            raise BucketError(f"invalid object name {name!r}: reserved for temporary files")
        return os.path.join(self._root, *parts)

    def _error(self, op: str, name: str, err: OSError) -> BucketError:
        return BucketError(f"{op} {name!r} in filesystem bucket {self._root}: {err}")

    def _not_found(self, name: str) -> ObjectNotFound:
        return ObjectNotFound(f"object {name!r} not found in filesystem bucket {self._root}")

    def get(self, name: str) -> bytes:
        return self.get_range(name, 0, -1)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        check_range(name, offset, length)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(name) from None
        except OSError as err:
            raise self._error("read", name, err) from err

    def exists(self, name: str) -> bool:
        path = self._path(name)
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as err:
            raise self._error("stat", name, err) from err

    def attributes(self, name: str) -> ObjectAttributes:
        path = self._path(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        except OSError as err:
            raise self._error("stat", name, err) from err
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(name)
        return ObjectAttributes(st.st_size, st.st_mtime_ns // 1_000_000)

    def upload(self, name: str, data: bytes | BinaryIO) -> None:
        path = self._path(name)
        parent = os.path.dirname(path)
        tmp = os.path.join(parent, f".tmp.{uuid.uuid4().hex}")
        try:
            # A concurrent delete may remove the freshly created parent directory
            # (it removes directories it leaves empty) before our temporary file
            # is in it; creating the directory again is enough.
            for attempt in range(10):
                os.makedirs(parent, exist_ok=True)
                try:
                    f = open(tmp, "xb")
                    break
                except FileNotFoundError:
                    if attempt == 9:
                        raise
            try:
                with f:
                    if isinstance(data, (bytes, bytearray, memoryview)):
                        f.write(data)
                    else:
                        shutil.copyfileobj(data, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(parent)
        except OSError as err:
            raise self._error("upload", name, err) from err

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(name) from None
        except PermissionError as err:
            # Linux unlink() of a directory answers EISDIR, other systems EPERM.
            if os.path.isdir(path):
                raise self._not_found(name) from None
            raise self._error("delete", name, err) from err
        except OSError as err:
            raise self._error("delete", name, err) from err
        parent = os.path.dirname(path)
        while parent != self._root and parent.startswith(self._root):
            try:
                os.rmdir(parent)  # only succeeds if empty
            except OSError:
                break
            parent = os.path.dirname(parent)

    def iter(self, prefix: str = "", recursive: bool = False) -> Iterator[str]:
        pdir = dir_prefix(prefix)
        absdir = os.path.join(self._root, *pdir.split(DIR_DELIM)) if pdir else self._root
        names: list[str] = []
        try:
            if recursive:
                for dirpath, _dirs, files in os.walk(absdir, onerror=_raise):
                    rel = os.path.relpath(dirpath, self._root)
                    base = "" if rel == "." else rel.replace(os.sep, DIR_DELIM) + DIR_DELIM
                    names.extend(base + f for f in files if not _TMP_RE.match(f))
            else:
                with os.scandir(absdir) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=True):
                            if _has_objects(e.path):
                                names.append(pdir + e.name + DIR_DELIM)
                        elif not _TMP_RE.match(e.name):
                            names.append(pdir + e.name)
        except (FileNotFoundError, NotADirectoryError):
            return iter(())
        except OSError as err:
            raise self._error("iter", prefix, err) from err
        names.sort()
        return iter(names)

    def close(self) -> None:
        pass


def _raise(err: OSError) -> None:
    raise err


def _has_objects(directory: str) -> bool:
    for _dirpath, _dirs, files in os.walk(directory):
        if any(not _TMP_RE.match(f) for f in files):
            return True
    return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Wrappers


class PrefixedBucket:
    """Every name is stored under ``prefix/`` of the wrapped bucket (objstore ``PrefixedBucket``).

    Names passed in and returned are relative to the prefix. Thread-safe if the
    wrapped bucket is.
    """

    def __init__(self, bucket: Bucket, prefix: str) -> None:
        self._bucket = bucket
        self._prefix = dir_prefix(prefix.strip(DIR_DELIM))

    def __repr__(self) -> str:
        return f"PrefixedBucket({self._bucket!r}, {self._prefix!r})"

    def _name(self, name: str) -> str:
        check_name(name)
        return self._prefix + name

    def get(self, name: str) -> bytes:
        return self._bucket.get(self._name(name))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self._bucket.get_range(self._name(name), offset, length)

    def iter(self, prefix: str = "", recursive: bool = False) -> Iterator[str]:
        pdir = self._prefix + dir_prefix(prefix)
        n = len(self._prefix)
        return (name[n:] for name in self._bucket.iter(pdir, recursive))

    def exists(self, name: str) -> bool:
        return self._bucket.exists(self._name(name))

    def upload(self, name: str, data: bytes | BinaryIO) -> None:
        self._bucket.upload(self._name(name), data)

    def delete(self, name: str) -> None:
        self._bucket.delete(self._name(name))

    def attributes(self, name: str) -> ObjectAttributes:
        return self._bucket.attributes(self._name(name))

    def close(self) -> None:
        self._bucket.close()


OPERATIONS = ("get", "get_range", "iter", "exists", "upload", "delete", "attributes")


class MetricsBucket:
    """Counts and times every operation of the wrapped bucket (objstore ``WrapWithMetrics``).

    Metrics, labelled by ``operation`` (``get``, ``get_range``, ``iter``,
    ``exists``, ``upload``, ``delete``, ``attributes``):
    ``flashback_bucket_operations_total``,
    ``flashback_bucket_operation_failures_total`` (an ObjectNotFound is an
    answer, not a failure, as in objstore) and
    ``flashback_bucket_operation_duration_seconds`` (an ``iter`` lasts until
    its iterator is exhausted or closed). Thread-safe if the wrapped bucket is.
    """

    def __init__(self, bucket: Bucket, registry: CollectorRegistry) -> None:
        self._bucket = bucket
        self._ops = Counter("flashback_bucket_operations", "Bucket operations started.",
                            ["operation"], registry=registry)
        self._failures = Counter("flashback_bucket_operation_failures",
                                 "Bucket operations that raised an error other than ObjectNotFound.",
                                 ["operation"], registry=registry)
        self._duration = Histogram("flashback_bucket_operation_duration_seconds",
                                   "Duration of bucket operations, successful or not.", ["operation"],
                                   buckets=(0.001, 0.01, 0.1, 0.3, 0.6, 1, 3, 6, 9, 20, 30, 60, 90, 120),
                                   registry=registry)
        for op in OPERATIONS:
            self._ops.labels(op)
            self._failures.labels(op)
            self._duration.labels(op)

    def __repr__(self) -> str:
        return f"MetricsBucket({self._bucket!r})"

    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        self._ops.labels(op).inc()
        start = time.perf_counter()
        try:
            return fn(*args)
        except ObjectNotFound:
            raise
        except BaseException:
            self._failures.labels(op).inc()
            raise
        finally:
            self._duration.labels(op).observe(time.perf_counter() - start)

    def get(self, name: str) -> bytes:
        return self._call("get", self._bucket.get, name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self._call("get_range", self._bucket.get_range, name, offset, length)

    def iter(self, prefix: str = "", recursive: bool = False) -> Iterator[str]:
        self._ops.labels("iter").inc()
        start = time.perf_counter()
        try:
            yield from self._bucket.iter(prefix, recursive)
        except GeneratorExit:
            raise
        except ObjectNotFound:
            raise
        except BaseException:
            self._failures.labels("iter").inc()
            raise
        finally:
            self._duration.labels("iter").observe(time.perf_counter() - start)

    def exists(self, name: str) -> bool:
        return self._call("exists", self._bucket.exists, name)

    def upload(self, name: str, data: bytes | BinaryIO) -> None:
        self._call("upload", self._bucket.upload, name, data)

    def delete(self, name: str) -> None:
        self._call("delete", self._bucket.delete, name)

    def attributes(self, name: str) -> ObjectAttributes:
        return self._call("attributes", self._bucket.attributes, name)

    def close(self) -> None:
        self._bucket.close()


class RetryingBucket:
    """Retries operations of the wrapped bucket that raise BucketUnavailable.

    Other errors (ObjectNotFound, BucketError) are answers and pass through at
    once. Waits ``backoff * 2**n`` seconds (capped at ``max_backoff``) before
    retry ``n + 1``; after ``attempts`` tries the last error propagates. An
    interrupted ``iter`` restarts and skips the names it already yielded (names
    come sorted), so callers see no duplicates. An upload from a file object is
    retried only if the file is seekable (it is rewound). Thread-safe if the
    wrapped bucket is.
    """

    def __init__(self, bucket: Bucket, attempts: int = 3, backoff: float = 0.2, *,
                 max_backoff: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """Args:
            bucket: the bucket to wrap.
            attempts: tries per operation, at least 1.
            backoff: seconds before the first retry; doubled for each further one.
            max_backoff: longest wait between tries.
            sleep: waits the given seconds (injectable for tests).
        """
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self._bucket = bucket
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"RetryingBucket({self._bucket!r}, attempts={self._attempts})"

    def _wait(self, attempt: int) -> None:
        self._sleep(min(self._backoff * (2 ** attempt), self._max_backoff))

    def _call(self, fn: Callable[..., Any], *args: Any, rewind: Callable[[], None] | None = None) -> Any:
        for attempt in range(self._attempts):
            try:
                return fn(*args)
            except BucketUnavailable:
                if attempt + 1 >= self._attempts:
                    raise
            self._wait(attempt)
            if rewind is not None:
                rewind()
        raise AssertionError("unreachable")

    def get(self, name: str) -> bytes:
        return self._call(self._bucket.get, name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self._call(self._bucket.get_range, name, offset, length)

    def iter(self, prefix: str = "", recursive: bool = False) -> Iterator[str]:
        last: str | None = None
        for attempt in range(self._attempts):
            try:
                for name in self._bucket.iter(prefix, recursive):
                    if last is not None and name <= last:
                        continue
                    last = name
                    yield name
                return
            except BucketUnavailable:
                if attempt + 1 >= self._attempts:
                    raise
            self._wait(attempt)

    def exists(self, name: str) -> bool:
        return self._call(self._bucket.exists, name)

    def upload(self, name: str, data: bytes | BinaryIO) -> None:
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._call(self._bucket.upload, name, data)
            return
        seekable = False
        try:
            seekable = data.seekable()
        except (AttributeError, io.UnsupportedOperation):
            pass
        if not seekable:
            self._bucket.upload(name, data)
            return
        pos = data.tell()
        self._call(self._bucket.upload, name, data, rewind=lambda: data.seek(pos))

    def delete(self, name: str) -> None:
        self._call(self._bucket.delete, name)

    def attributes(self, name: str) -> ObjectAttributes:
        return self._call(self._bucket.attributes, name)

    def close(self) -> None:
        self._bucket.close()


# ---------------------------------------------------------------------------------------------
# Configuration


_TOP_KEYS = {"type", "config", "prefix"}


def bucket_from_config(doc: Mapping[str, Any] | str) -> Bucket:
    """A bucket from an objstore configuration (a mapping or its YAML text).

    ``type`` is ``FILESYSTEM`` or ``S3`` (any case); ``config`` holds the
    provider's keys; an optional ``prefix`` wraps the bucket in a
    PrefixedBucket. Unknown keys are rejected as objstore's strict parsing
    does. The S3 bucket is checked on first use (its existence and the
    credentials), not here, so configuration needs no network.

    Raises:
        BucketConfigError: the document is not a valid configuration.
    """
    if isinstance(doc, str):
        try:
            doc = yaml.safe_load(doc)
        except yaml.YAMLError as err:
            raise BucketConfigError(f"objstore config is not valid YAML: {err}") from err
    if not isinstance(doc, Mapping):
        raise BucketConfigError(f"objstore config must be a mapping with 'type' and 'config', got {type(doc).__name__}")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise BucketConfigError(f"objstore config: unknown keys {sorted(unknown)} (known: {sorted(_TOP_KEYS)})")
    kind = doc.get("type")
    if not isinstance(kind, str) or not kind:
        raise BucketConfigError("objstore config: 'type' is missing (FILESYSTEM or S3)")
    config = doc.get("config") or {}
    if not isinstance(config, Mapping):
        raise BucketConfigError(f"objstore config: 'config' must be a mapping, got {type(config).__name__}")
    prefix = doc.get("prefix") or ""
    if not isinstance(prefix, str):
        raise BucketConfigError(f"objstore config: 'prefix' must be a string, got {prefix!r}")

    kind = kind.upper()
    bucket: Bucket
    if kind == "FILESYSTEM":
        unknown = set(config) - {"directory"}
        if unknown:
            raise BucketConfigError(f"FILESYSTEM config: unknown keys {sorted(unknown)} (known: ['directory'])")
        directory = config.get("directory")
        if not isinstance(directory, str) or not directory:
            raise BucketConfigError("FILESYSTEM config: 'directory' is missing")
        bucket = FilesystemBucket(directory)
    elif kind == "S3":
        # Imported here so that filesystem-only processes do not load boto3.
        from store.s3bucket import S3Bucket, S3Options

        bucket = S3Bucket(S3Options.from_config(config))
    else:
        raise BucketConfigError(f"objstore config: unsupported bucket type {doc.get('type')!r} "
                                "(supported: FILESYSTEM, S3)")
    if prefix.strip(DIR_DELIM):
        try:
            bucket = PrefixedBucket(bucket, prefix)
        except BucketError as err:
            raise BucketConfigError(f"objstore config: invalid prefix {prefix!r}: {err}") from err
    return bucket
