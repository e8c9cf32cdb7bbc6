"""The S3 bucket (boto3), for AWS S3 and S3-compatible servers (MinIO, SeaweedFS, Ceph).

Configured with the keys of Thanos objstore's S3 provider::

    type: S3
    config:
      bucket: flashback            # required
      endpoint: 127.0.0.1:8333     # required, host[:port] without scheme
      region: ""                   # "" means us-east-1
      access_key: ""               # both keys, or neither (then boto3's chain:
      secret_key: ""               #   env AWS_ACCESS_KEY_ID..., profiles, IAM)
      session_token: ""
      insecure: false              # true: plain http
      max_retries: 2               # retries inside one request (botocore "standard" mode)
      part_size: 67108864          # multipart part size for streamed uploads, >= 5 MiB
      disable_multipart: false
      send_content_md5: true       # Content-MD5 on single-part uploads
      put_user_metadata: {}
      bucket_lookup_type: path     # auto|path; virtual-hosted is not supported
      http_config:
        response_header_timeout: 2m   # read timeout of one request
        insecure_skip_verify: false
        tls_config: {ca_file: "", cert_file: "", key_file: "", insecure_skip_verify: false}
        connect_timeout: 10s          # Flashback extension (objstore has no such key)

Keys of objstore that change nothing here (``trace``, ``idle_conn_timeout``,
``list_objects_version`` ...) are accepted; keys for features Flashback lacks
(SSE, STS, signature v2) are rejected when set, so nobody believes them in
effect.

Requests use path-style addressing and signature v4. The bucket's existence and
the credentials are checked on first use (one ``HeadBucket``) so that a missing
bucket or a wrong key gives a clear BucketError instead of an object that seems
absent.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Mapping

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from store.bucket import DIR_DELIM, ObjectAttributes, check_name, check_range, dir_prefix
from store.errors import BucketConfigError, BucketError, BucketUnavailable, ObjectNotFound

_MIN_PART_SIZE = 5 * 1024 * 1024

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h|d|w|y)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
                   "d": 86400.0, "w": 604800.0, "y": 31536000.0}

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "RequestLimitExceeded", "OperationAborted"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
               "ExpiredToken", "AuthorizationHeaderMalformed", "403"}


def parse_duration(value: Any, key: str) -> float:
    """Seconds in a Prometheus/Go duration (``90s``, ``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(value, bool):
        raise BucketConfigError(f"S3 config: {key} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for m in _DURATION_RE.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return total
    raise BucketConfigError(f"S3 config: {key} must be a duration like 10s or 2m, got {value!r}")


@dataclass(frozen=True, slots=True)
class S3Options:
    """Validated settings of one S3 bucket; build with ``from_config``."""

    bucket: str
    endpoint: str
    region: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    insecure: bool = False
    max_retries: int = 2
    part_size: int = 64 * 1024 * 1024
    disable_multipart: bool = False
    send_content_md5: bool = True
    put_user_metadata: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    verify: bool | str = True
    client_cert: tuple[str, str] | None = None
    max_pool_connections: int = 32

    @property
    def url(self) -> str:
        """The endpoint URL requests go to."""
        return f"{'http' if self.insecure else 'https'}://{self.endpoint}"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "S3Options":
        """Options from the ``config`` mapping of an objstore ``type: S3`` document.

        Raises:
            BucketConfigError: a required key is missing or a value is invalid.
        """
        known = {"bucket", "endpoint", "region", "access_key", "secret_key", "session_token", "insecure",
                 "max_retries", "part_size", "disable_multipart", "send_content_md5", "put_user_metadata",
                 "bucket_lookup_type", "http_config", "aws_sdk_auth", "signature_version2", "sse_config",
                 "sts_endpoint", "trace", "list_objects_version", "disable_dualstack"}
        unknown = set(config) - known
        if unknown:
            raise BucketConfigError(f"S3 config: unknown keys {sorted(unknown)}")

        def text(key: str) -> str:
            value = config.get(key)
            if value is None:
                return ""
            if not isinstance(value, str):
                raise BucketConfigError(f"S3 config: {key} must be a string, got {value!r}")
            return value

        def flag(key: str, default: bool, src: Mapping[str, Any] = config) -> bool:
            value = src.get(key, default)
            if value is None:
                return default
            if not isinstance(value, bool):
                raise BucketConfigError(f"S3 config: {key} must be true or false, got {value!r}")
            return value

        def integer(key: str, default: int) -> int:
            value = config.get(key, default)
            if value is None or value == 0:
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BucketConfigError(f"S3 config: {key} must be a non-negative integer, got {value!r}")
            return value

        bucket = text("bucket")
        if not bucket:
            raise BucketConfigError("S3 config: no bucket specified ('bucket' is missing)")
        endpoint = text("endpoint")
        if not endpoint:
            raise BucketConfigError(f"S3 config of bucket {bucket!r}: no endpoint specified (e.g. s3.amazonaws.com)")
        if "://" in endpoint or "/" in endpoint:
            raise BucketConfigError(f"S3 config of bucket {bucket!r}: endpoint {endpoint!r} must be host[:port] "
                                    "without scheme or path; set insecure: true for plain http")
        access_key, secret_key = text("access_key"), text("secret_key")
        if bool(access_key) != bool(secret_key):
            missing = "secret_key" if access_key else "access_key"
            raise BucketConfigError(f"S3 config of bucket {bucket!r}: {missing} is missing; set both access_key "
                                    "and secret_key, or neither to use the environment (AWS_ACCESS_KEY_ID ...)")
        if flag("aws_sdk_auth", False) and access_key:
            raise BucketConfigError("S3 config: aws_sdk_auth and access_key are mutually exclusive")
        if flag("signature_version2", False):
            raise BucketConfigError("S3 config: signature_version2 is not supported (signature v4 only)")
        sse = config.get("sse_config") or {}
        if not isinstance(sse, Mapping) or sse.get("type"):
            raise BucketConfigError("S3 config: sse_config is not supported")
        if config.get("sts_endpoint"):
            raise BucketConfigError("S3 config: sts_endpoint is not supported")
        lookup = (config.get("bucket_lookup_type") or "auto")
        if lookup not in ("auto", "path"):
            raise BucketConfigError(f"S3 config: bucket_lookup_type {lookup!r} is not supported (auto or path; "
                                    "requests always use path-style addressing)")
        version = config.get("list_objects_version") or "v2"
        if version not in ("v1", "v2"):
            raise BucketConfigError(f"S3 config: list_objects_version {version!r} is not v1 or v2")
        part_size = integer("part_size", 64 * 1024 * 1024)
        if part_size < _MIN_PART_SIZE:
            raise BucketConfigError(f"S3 config: part_size {part_size} is below the S3 minimum of {_MIN_PART_SIZE}")
        max_retries = config.get("max_retries", 2)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise BucketConfigError(f"S3 config: max_retries must be a non-negative integer, got {max_retries!r}")
        metadata = config.get("put_user_metadata") or {}
        if not isinstance(metadata, Mapping):
            raise BucketConfigError("S3 config: put_user_metadata must be a mapping")

        http = config.get("http_config") or {}
        if not isinstance(http, Mapping):
            raise BucketConfigError("S3 config: http_config must be a mapping")
        http_known = {"idle_conn_timeout", "response_header_timeout", "insecure_skip_verify",
                      "tls_handshake_timeout", "expect_continue_timeout", "max_idle_conns",
                      "max_idle_conns_per_host", "max_conns_per_host", "tls_config", "disable_compression",
                      "connect_timeout"}
        unknown = set(http) - http_known
        if unknown:
            raise BucketConfigError(f"S3 config: unknown http_config keys {sorted(unknown)}")
        read_timeout = parse_duration(http.get("response_header_timeout") or "2m", "response_header_timeout")
        connect_timeout = parse_duration(http.get("connect_timeout") or "10s", "connect_timeout")
        if read_timeout <= 0 or connect_timeout <= 0:
            raise BucketConfigError("S3 config: timeouts must be positive")
        tls = http.get("tls_config") or {}
        if not isinstance(tls, Mapping):
            raise BucketConfigError("S3 config: http_config.tls_config must be a mapping")
        unknown = set(tls) - {"ca_file", "cert_file", "key_file", "server_name", "insecure_skip_verify"}
        if unknown:
            raise BucketConfigError(f"S3 config: unknown tls_config keys {sorted(unknown)}")
        if tls.get("server_name"):
            raise BucketConfigError("S3 config: tls_config.server_name is not supported")
        verify: bool | str = True
        if tls.get("ca_file"):
            verify = str(tls["ca_file"])
        if flag("insecure_skip_verify", False, http) or flag("insecure_skip_verify", False, tls):
            verify = False
        client_cert = None
        if tls.get("cert_file") or tls.get("key_file"):
            if not (tls.get("cert_file") and tls.get("key_file")):
                raise BucketConfigError("S3 config: tls_config needs both cert_file and key_file")
            client_cert = (str(tls["cert_file"]), str(tls["key_file"]))
        pool = http.get("max_conns_per_host") or http.get("max_idle_conns_per_host") or 32

        return cls(bucket=bucket, endpoint=endpoint, region=text("region"), access_key=access_key,
                   secret_key=secret_key, session_token=text("session_token"),
                   insecure=flag("insecure", False), max_retries=max_retries, part_size=part_size,
                   disable_multipart=flag("disable_multipart", False),
                   send_content_md5=flag("send_content_md5", True),
                   put_user_metadata=tuple(sorted((str(k), str(v)) for k, v in metadata.items())),
                   connect_timeout=connect_timeout, read_timeout=read_timeout, verify=verify,
                   client_cert=client_cert, max_pool_connections=int(pool))


class S3Bucket:
    """A Bucket in S3 or an S3-compatible server.

    Thread-safe: one boto3 client (thread-safe) is shared by all calls; its
    connection pool holds ``max_pool_connections`` connections.

    Semantics beyond plain S3, to match the contract: ``delete`` of a missing
    object raises ObjectNotFound (checked with a HEAD first, so a concurrent
    delete may still both succeed); non-recursive ``iter`` lists only
    sub-directories that still hold objects (filer-backed servers such as
    SeaweedFS keep emptied directories as common prefixes), at the cost of one
    extra LIST per sub-directory.
    """

    def __init__(self, options: S3Options) -> None:
        self._opts = options
        self._checked = False
        self._check_lock = threading.Lock()
        session = boto3.session.Session()
        config = botocore.config.Config(
            region_name=options.region or "us-east-1",
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            retries={"mode": "standard", "total_max_attempts": options.max_retries + 1},
            max_pool_connections=options.max_pool_connections,
            client_cert=options.client_cert,
            # S3-compatible servers differ in their support of the newer default
            # (CRC trailers with aws-chunked bodies); Content-MD5 covers uploads.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="flashback",
        )
        self._client = session.client(
            "s3", endpoint_url=options.url, verify=options.verify, config=config,
            aws_access_key_id=options.access_key or None,
            aws_secret_access_key=options.secret_key or None,
            aws_session_token=options.session_token or None)

    def __repr__(self) -> str:
        return f"S3Bucket({self._opts.bucket!r} at {self._opts.url})"

    @property
    def options(self) -> S3Options:
        return self._opts

    # -- errors ----------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"bucket {self._opts.bucket!r} at {self._opts.url}"

    def _translate(self, op: str, name: str, err: Exception) -> BucketError:
        if not op:
            what = self._where()
        elif name:
            what = f"{op} {name!r} in {self._where()}"
        else:
            what = f"{op} in {self._where()}"
        if isinstance(err, botocore.exceptions.ClientError):
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = error.get("Message") or code
            if code in ("NoSuchKey", "NotFound") or (status == 404 and code == "404"):
                return ObjectNotFound(f"object {name!r} not found in {self._where()}")
            if code == "NoSuchBucket":
                return BucketError(f"{what}: the bucket does not exist")
            if code in _AUTH_CODES or status == 403:
                return BucketError(f"{what}: access denied ({code}: {message}); check access_key, "
                                   "secret_key and the bucket's policy")
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return BucketUnavailable(f"{what}: {code}: {message} (HTTP {status})")
            return BucketError(f"{what}: {code}: {message} (HTTP {status})")
        if isinstance(err, botocore.exceptions.NoCredentialsError):
            return BucketError(f"{what}: no credentials; set access_key and secret_key or AWS_ACCESS_KEY_ID "
                               "and AWS_SECRET_ACCESS_KEY")
        if isinstance(err, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                            botocore.exceptions.ResponseStreamingError, urllib3.exceptions.HTTPError,
                            ConnectionError, TimeoutError)):
            return BucketUnavailable(f"{what}: endpoint unreachable or not answering: {err}")
        return BucketError(f"{what}: {err}")

    def _ensure_bucket(self) -> None:
        """Check once that the bucket exists and the credentials are accepted."""
        if self._checked:
            return
        with self._check_lock:
            if self._checked:
                return
            try:
                self._client.head_bucket(Bucket=self._opts.bucket)
            except botocore.exceptions.ClientError as err:
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status == 404:
                    raise BucketError(f"{self._where()}: the bucket does not exist") from None
                if status in (401, 403):
                    raise BucketError(f"{self._where()}: access denied (HTTP {status}); check access_key, "
                                      "secret_key and the bucket's policy") from None
                raise self._translate("", "", err) from err
            except Exception as err:  # noqa: BLE001 - every failure is translated
                raise self._translate("", "", err) from err
            self._checked = True

    def _call(self, op: str, name: str, method: str, **kwargs: Any) -> Any:
        self._ensure_bucket()
        try:
            return getattr(self._client, method)(Bucket=self._opts.bucket, **kwargs)
        except Exception as err:  # noqa: BLE001 - every failure is translated
            raise self._translate(op, name, err) from err

    # -- Bucket ----------------------------------------------------------------------------------

    def get(self, name: str) -> bytes:
        check_name(name)
        resp = self._call("get", name, "get_object", Key=name)
        return self._read_body("get", name, resp)

    def _read_body(self, op: str, name: str, resp: Mapping[str, Any]) -> bytes:
        try:
            with resp["Body"] as body:
                return body.read()
        except Exception as err:  # noqa: BLE001 - every failure is translated
            raise self._translate(op, name, err) from err

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_name(name)
        check_range(name, offset, length)
        if length == 0:
            self._call("get_range", name, "head_object", Key=name)
            return b""
        end = "" if length == -1 else str(offset + length - 1)
        try:
            resp = self._call("get_range", name, "get_object", Key=name, Range=f"bytes={offset}-{end}")
        except BucketError as err:
            cause = err.__cause__
            if (isinstance(cause, botocore.exceptions.ClientError)
                    and cause.response.get("Error", {}).get("Code") == "InvalidRange"):
                # 416: the object exists (else 404) but the range starts at or
                # past its end, which includes every range of an empty object.
                return b""
            raise
        data = self._read_body("get_range", name, resp)
        if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 and not resp.get("ContentRange"):
            # A server that ignored the Range header sent the whole object.
            data = data[offset:] if length == -1 else data[offset:offset + length]
        return data

    def exists(self, name: str) -> bool:
        check_name(name)
        try:
            self._call("exists", name, "head_object", Key=name)
        except ObjectNotFound:
            return False
        return True

    def attributes(self, name: str) -> ObjectAttributes:
        check_name(name)
        resp = self._call("attributes", name, "head_object", Key=name)
        modified = resp.get("LastModified")
        ms = int(modified.timestamp() * 1000) if modified is not None else 0
        return ObjectAttributes(int(resp.get("ContentLength", 0)), ms)

    def upload(self, name: str, data: bytes | BinaryIO) -> None:
        check_name(name)
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._put(name, bytes(data))
            return
        if self._opts.disable_multipart:
            self._put(name, _read_all(data))
            return
        first = _read_full(data, self._opts.part_size)
        if len(first) < self._opts.part_size:
            self._put(name, first)
            return
        self._multipart(name, first, data)

    def _put(self, name: str, data: bytes) -> None:
        kwargs: dict[str, Any] = {"Key": name, "Body": data}
        if self._opts.send_content_md5:
            kwargs["ContentMD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        if self._opts.put_user_metadata:
            kwargs["Metadata"] = dict(self._opts.put_user_metadata)
        self._call("upload", name, "put_object", **kwargs)

    def _multipart(self, name: str, first: bytes, rest: BinaryIO) -> None:
        kwargs: dict[str, Any] = {"Key": name}
        if self._opts.put_user_metadata:
            kwargs["Metadata"] = dict(self._opts.put_user_metadata)
        upload_id = self._call("upload", name, "create_multipart_upload", **kwargs)["UploadId"]
        try:
            parts = []
            chunk, number = first, 1
            while chunk:
                extra: dict[str, Any] = {}
                if self._opts.send_content_md5:
                    extra["ContentMD5"] = base64.b64encode(hashlib.md5(chunk).digest()).decode()
                resp = self._call("upload", name, "upload_part", Key=name, UploadId=upload_id,
                                  PartNumber=number, Body=chunk, **extra)
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
                chunk, number = _read_full(rest, self._opts.part_size), number + 1
            self._call("upload", name, "complete_multipart_upload", Key=name, UploadId=upload_id,
                       MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self._opts.bucket, Key=name, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original error matters; the server expires the rest
                pass
            raise

    def delete(self, name: str) -> None:
        check_name(name)
        self._call("delete", name, "head_object", Key=name)
        self._call("delete", name, "delete_object", Key=name)

    def iter(self, prefix: str = "", recursive: bool = False) -> Iterator[str]:
        pdir = dir_prefix(prefix)
        self._ensure_bucket()
        kwargs: dict[str, Any] = {"Bucket": self._opts.bucket, "Prefix": pdir}
        if not recursive:
            kwargs["Delimiter"] = DIR_DELIM
        pages = self._client.get_paginator("list_objects_v2").paginate(**kwargs)
        it = iter(pages)
        while True:
            try:
                page = next(it)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - every failure is translated
                raise self._translate("iter", pdir, err) from err
            names = [o["Key"] for o in page.get("Contents", ())
                     if o["Key"] != pdir and not o["Key"].endswith(DIR_DELIM)]
            names.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()) if self._has_objects(p["Prefix"]))
            names.sort()
            yield from names

    def _has_objects(self, pdir: str) -> bool:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._opts.bucket, Prefix=pdir, PaginationConfig={"PageSize": 100})
        try:
            for page in pages:
                if any(not o["Key"].endswith(DIR_DELIM) for o in page.get("Contents", ())):
                    return True
        except Exception as err:  # noqa: BLE001 - every failure is translated
            raise self._translate("iter", pdir, err) from err
        return False

    def close(self) -> None:
        self._client.close()


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of ``f`` (``read`` may return short counts)."""
    chunks, have = [], 0
    while have < n:
        chunk = f.read(n - have)
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _read_all(f: BinaryIO) -> bytes:
    data = f.read()
    return bytes(data) if data is not None else b""
