"""``POST /api/v1/write`` in cluster mode: split each request by shard and publish the parts.

Every series goes to the shard ``topology.shard_index(series_id)``. A shard's part of a
request is, by default, its series as the decoded columns the adapter has anyway (keys,
sample counts, timestamps, value bits; ``store.shardrecord``, record version 2), so that
none of the shard's head replicas has to decode protobuf again. Requests with labels that
are not canonical or with native histograms, or all requests with ``record_format =
"protobuf"``, are split into the concatenation of each shard's TimeSeries fields instead,
copied byte for byte from the incoming protobuf (no re-encoding: any run of TimeSeries
fields is a WriteRequest on its own), snappy-compressed and wrapped as a log record
(``store.db.encode_record``). The parts of all involved shards are published at once, each
to its shard's replicated log (``store.natslog.NatsLog``); head replicas consume them and
apply them in order.

Status contract, the same as the single node's (``adapter.remote_write``) where it can be:

* 204 once every involved shard's log acknowledged its part (JetStream PubAck: stored on
  a quorum of the stream's replicas);
* 400 for undecodable bodies (snappy, protobuf) and for series the adapter can reject by
  itself: invalid labels (Prometheus 3's rules, as the head checks them,
  ``store.head.validate_labels``) and native histograms. As Prometheus does, the other
  series of the request are still published, and the answer only comes after they are
  acknowledged;
* 413 above the body size (checked before reading) or the decoded size, 415 for a content
  type or encoding other than protobuf + snappy (checks shared with the single node);
* 503 with ``Retry-After`` when a shard's log did not acknowledge in time (no stream
  leader while JetStream elects one, 4-8 s after a server crash; no quorum; servers
  unreachable). Prometheus retries 5xx with the same body. Other shards may already hold
  their parts: every part is published with a message id derived from its bytes (before
  compression) and its shard (``msg_id``), not from the clock, so a retry within the
  stream's duplicate window is stored once.

What the adapter cannot know: out-of-order samples, duplicate timestamps and samples out
of the head's time bounds depend on the state of the head, which applies the record later
and asynchronously. Cluster mode therefore answers 204 for them; every head replica drops
them and counts them in ``flashback_head_samples_rejected_total{reason}``. Grafana Mimir's
ingest storage (Kafka between distributors and ingesters) behaves the same way: the write
path acknowledges once the record is in the log, and ingesters discard such samples when
they consume it.

A shard's part larger than ``max_part_bytes`` (uncompressed) is published as several
records, cut between series, so that every record fits the servers' message size
limit (NATS' default ``max_payload`` is 1 MiB).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import cramjam
import numba
import numpy as np
import xxhash
from prometheus_client import CollectorRegistry, Counter, Histogram

from adapter.remote_write import _bad, decode_request
from store import shardrecord, writerequest
from store.bytesops import any_high_but_ff, any_non_ascii, bytes_equal, memcpy
from store.headkernels import legacy_name_ok
from store.db import encode_record
from store.errors import LogUnavailable, WALError
from store.head import AppendResult, validate_labels
from store.httpserver import Request, Response, Router
from store.natslog import wait_future
from store.topology import Topology
from store.writerequest import (HAS_HISTOGRAMS, NEEDS_SLOW_PATH, S_FLAGS, S_HIST, S_KEY_LEN, S_KEY_OFF, S_LAB_N,
                                S_LAB_START, S_SMP_N, S_SMP_START, S_SPAN_END, S_SPAN_START)

log = logging.getLogger(__name__)

# Snappy's worst case expands n bytes to 32 + n + n/6, so 768 KiB of protobuf stays below
# NATS' default max_payload of 1 MiB even if it does not compress at all.
DEFAULT_MAX_PART_BYTES = 768 << 10


class ShardLog(Protocol):
    """The writer's side of a shard's replicated log (``store.natslog.NatsLog``).

    ``publish_async`` is thread-safe, returns at once, and the future resolves to the
    record's sequence once the log acknowledged it durably, or to a ``WALError``
    (``LogUnavailable`` when a retry with the same ``msg_id`` may succeed). Records with
    the same ``msg_id`` within the log's duplicate window are stored once.
    """

    def publish_async(self, record: bytes, msg_id: str | None = None) -> concurrent.futures.Future[int]: ...


def msg_id(part: bytes | np.ndarray, shard: str) -> str:
    """The message id of a shard's part: its shard name and the XXH3-128 of the part's bytes (its
    protobuf spans, or its uncompressed columns block).

    It does not depend on the time or on the adapter, so a retry of the same request (by
    Prometheus, to this or another adapter) publishes the same ids.
    """
    return f"{shard}-{xxhash.xxh3_128_hexdigest(part)}"


@numba.njit(cache=True, nogil=True)
def _suspects(buf, series, labels, keys, metric, legacy, out):
    """Marks series whose labels Python must check: non-canonical, non-ASCII bytes, no
    ``__name__``, or (legacy names) characters outside ``[a-zA-Z0-9_]`` (``:`` also allowed
    in the metric name). Unmarked series are valid; marked ones may be.

    Most series are told apart on their canonical key alone (``name 0xff value 0xff ...``, names
    sorted, no 0xff inside): one that starts with ``__name__`` and holds no other byte >= 0x80
    is valid with UTF-8 names; the others are checked label by label in the request."""
    m = metric.shape[0]
    for s in range(series.shape[0]):
        if series[s, S_FLAGS] & NEEDS_SLOW_PATH:
            out[s] = True
            continue
        ko, kn = series[s, S_KEY_OFF], series[s, S_KEY_LEN]
        if not legacy and kn > m and keys[ko + m] == 0xFF and bytes_equal(keys, ko, m, metric, 0, m) \
                and not any_high_but_ff(keys, ko, kn):
            out[s] = False
            continue
        bad = False
        seen = False
        for li in range(series[s, S_LAB_START], series[s, S_LAB_START] + series[s, S_LAB_N]):
            no, nln, vo, vln = labels[li, 0], labels[li, 1], labels[li, 2], labels[li, 3]
            if any_non_ascii(buf, no, nln) or any_non_ascii(buf, vo, vln):
                bad = True
                break
            is_metric = nln == metric.shape[0] and bytes_equal(buf, no, nln, metric, 0, nln)
            if is_metric:
                seen = True
            if legacy and not (legacy_name_ok(buf, no, no + nln, False) and
                               (not is_metric or legacy_name_ok(buf, vo, vo + vln, True))):
                bad = True
        out[s] = bad or not seen


@numba.njit(cache=True, nogil=True)
def _gather(buf, starts, ends, order, out):
    """Copies ``buf[starts[i]:ends[i]]`` for each ``i`` in ``order`` back to back into ``out``."""
    p = 0
    for i in order:
        n = ends[i] - starts[i]
        memcpy(out, p, buf, starts[i], n)
        p += n
    return p


@dataclass(frozen=True, slots=True)
class _Part:
    shard: int
    record: bytes
    msg_id: str
    series: int
    samples: int
    nbytes: int  # uncompressed bytes (protobuf or columns block)


class _Metrics:
    def __init__(self, registry: CollectorRegistry, shards: Sequence[str]) -> None:
        self.parts = Counter("flashback_remote_write_shard_requests_total", "Request parts acknowledged by a "
                             "shard's log, by shard.", ["shard"], registry=registry)
        self.samples = Counter("flashback_remote_write_shard_samples_total", "Samples in request parts "
                               "acknowledged by a shard's log, by shard.", ["shard"], registry=registry)
        self.bytes = Counter("flashback_remote_write_shard_bytes_total", "Uncompressed bytes of acknowledged "
                             "request parts (protobuf or columns), by shard.", ["shard"], registry=registry)
        self.failures = Counter("flashback_remote_write_shard_publish_failures_total", "Request parts a shard's "
                                "log did not acknowledge, by shard and reason (unavailable: retrying may help).",
                                ["shard", "reason"], registry=registry)
        self.duration = Histogram("flashback_remote_write_shard_publish_duration_seconds", "Time from publishing "
                                  "a request part to the log's acknowledgement, by shard.", ["shard"],
                                  registry=registry, buckets=(.001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5,
                                                              5, 10))
        self.rejected = Counter("flashback_remote_write_samples_rejected_total", "Samples the adapter rejected "
                                "before publishing, by reason.", ["reason"], registry=registry)
        for s in shards:
            for m in (self.parts, self.samples, self.bytes, self.duration):
                m.labels(s)
            for reason in ("unavailable", "error"):
                self.failures.labels(s, reason)
        for reason in ("invalid_labels", "native_histograms"):
            self.rejected.labels(reason)


class ShardedWriteHandler:
    """Splits remote-write requests by shard and publishes each part to its shard's log.

    Thread-safe: the HTTP server calls it from many threads at once.

    Args:
        topology: the shards, in the order of ``logs``.
        logs: one log per shard of ``topology.shards`` (``store.natslog.NatsLog``).
        max_body_bytes: larger request bodies are answered 413 before they are read.
        max_decoded_bytes: larger decompressed bodies are answered 413.
        max_part_bytes: a shard's part above this many protobuf bytes is published as
            several records (see the module docstring).
        publish_timeout_s: how long to wait for all acknowledgements of one request; the
            logs bound each publish themselves too.
        retry_after_s: the ``Retry-After`` of 503 answers.
        name_validation: ``utf8`` or ``legacy``, as ``HeadOptions.name_validation`` of the heads.
        registry: where the ``flashback_remote_write_*`` metrics go; private if ``None``.
        now: the clock (seconds) whose milliseconds go into each record.
        record_format: ``columns`` (default): each part as decoded columns
            (``store.shardrecord``), which the head replicas append without decoding the
            protobuf again; requests with non-canonical labels or native histograms still go
            as ``protobuf``, which writes every part as the TimeSeries bytes of the request.
    """

    def __init__(self, topology: Topology, logs: Sequence[ShardLog], *, max_body_bytes: int = 32 << 20,
                 max_decoded_bytes: int = 256 << 20, max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
                 publish_timeout_s: float = 15.0, retry_after_s: int = 2, name_validation: str = "utf8",
                 registry: CollectorRegistry | None = None, now: Callable[[], float] = time.time,
                 record_format: str = "columns") -> None:
        if record_format not in ("columns", "protobuf"):
            raise ValueError(f"record format {record_format!r}: columns or protobuf")
        self.record_format = record_format
        if len(logs) != len(topology.shards):
            raise ValueError(f"{len(logs)} logs for {len(topology.shards)} shards")
        if max_part_bytes <= 0 or publish_timeout_s <= 0:
            raise ValueError("max_part_bytes and publish_timeout_s must be positive")
        self.topology = topology
        self._logs = list(logs)
        self._names = [s.name for s in topology.shards]
        self.max_body_bytes = max_body_bytes
        self.max_decoded_bytes = max_decoded_bytes
        self.max_part_bytes = max_part_bytes
        self.publish_timeout_s = publish_timeout_s
        self.retry_after_s = retry_after_s
        self._name_validation = name_validation
        self._legacy = name_validation == "legacy"
        self._now = now
        self._metrics = _Metrics(registry if registry is not None else CollectorRegistry(auto_describe=False),
                                 self._names)

    def warm_up(self) -> None:
        """Loads the kernels of ``split`` (the scanner's among them) before the first request, as
        ``store.warmup`` does for the heads; publishes nothing."""
        t = 1_000_000_000_000
        for labels in ([("__name__", "flashback_warm_up"), ("series", "{}")],
                       [("series", "{}"), ("__name__", "flashback_warm_up")]):  # columns and protobuf parts
            # Several series: numba compiles column views of one row as contiguous arrays.
            body = writerequest.encode(([(n, v.format(i)) for n, v in labels], [(t, 1.0)]) for i in range(4))
            self.split(writerequest.decode(body), AppendResult(), t)

    def route(self, router: Router) -> None:
        router.route("/api/v1/write", self, ("POST",), name="remote_write", max_body=self.max_body_bytes)

    def __call__(self, req: Request) -> Response:
        decoded = decode_request(req, self.max_decoded_bytes)
        if isinstance(decoded, Response):
            return decoded
        result = AppendResult()
        parts = self.split(decoded, result, int(self._now() * 1000))
        failures = self._publish(parts)
        if failures:
            return Response(503, ("storage unavailable, retry: " + "; ".join(failures) + "\n").encode(),
                            headers={"Retry-After": str(self.retry_after_s)})
        for reason, (n, _) in result.rejected.items():
            self._metrics.rejected.labels(reason).inc(n)
        if result.rejected:
            return _bad(result.message())
        return Response(204)

    # ---- splitting ---------------------------------------------------------

    def split(self, req: writerequest.WriteRequest, result: AppendResult, now_ms: int) -> list[_Part]:
        """The records to publish for ``req``, in shard order; rejected series go to ``result``."""
        ns = req.num_series
        if ns == 0:
            return []
        ser = req.series
        # topology.shard_index for every series at once (series id modulo the number of shards); the
        # scanner's hash is the series id unless the labels are not canonical, fixed up below.
        shard = (req.hashes % np.uint64(len(self._logs))).astype(np.int64)
        keep = np.ones(ns, dtype=np.bool_)
        suspects = np.empty(ns, dtype=np.bool_)
        _suspects(req.buf, ser, req.labels, req.keys, _METRIC, self._legacy, suspects)
        for i in np.flatnonzero(suspects).tolist():
            labels, err = validate_labels(req.label_pairs(i), self._name_validation)
            if err:
                keep[i] = False
                if ser[i, S_SMP_N]:
                    result.reject("invalid_labels", int(ser[i, S_SMP_N]), err)
            else:
                shard[i] = self.topology.shard_index(labels.hash())
        hist = np.flatnonzero((ser[:, S_FLAGS] & HAS_HISTOGRAMS) != 0)
        if len(hist):
            # The head rejects the histograms and appends the float samples of these series,
            # so the series are published and the request is answered 400 (as one node does).
            i = int(hist[0])
            pairs = ", ".join(f"{n.decode(errors='replace')}={v.decode(errors='replace')!r}"
                              for n, v in req.label_pairs(i))
            result.reject("native_histograms", int(ser[hist, S_HIST].sum()), f"series {{{pairs}}}")
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            return []
        # Columns records need canonical labels (read back from the keys) and no histograms.
        if self.record_format == "columns" and not (ser[idx, S_FLAGS] & (NEEDS_SLOW_PATH | HAS_HISTOGRAMS)).any():
            return self._split_columns(req, idx, shard, now_ms)
        order = idx[np.argsort(shard[idx], kind="stable")]
        nsamples = ser[order, S_SMP_N]
        starts, ends = ser[:, S_SPAN_START], ser[:, S_SPAN_END]
        lengths = ends[order] - starts[order]
        cum = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cum[1:])
        out = np.empty(int(cum[-1]), dtype=np.uint8)
        _gather(req.buf, starts, ends, order, out)
        smp = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(nsamples, out=smp[1:])
        ordered_shards = shard[order]
        bounds = np.flatnonzero(np.diff(ordered_shards)) + 1
        parts = []
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(order)]):
            k = int(ordered_shards[a])
            while a < b:
                # The longest run of whole series within max_part_bytes, at least one series.
                j = int(np.searchsorted(cum, cum[a] + self.max_part_bytes, side="right")) - 1
                j = min(max(j, a + 1), b)
                piece = out[cum[a]:cum[j]]
                snappy = bytes(cramjam.snappy.compress_raw(piece))
                parts.append(_Part(k, encode_record(now_ms, snappy), msg_id(piece, self._names[k]),
                                   j - a, int(smp[j] - smp[a]), int(cum[j] - cum[a])))
                a = j
        return parts

    def _split_columns(self, req: writerequest.WriteRequest, idx: np.ndarray, shard: np.ndarray,
                       now_ms: int) -> list[_Part]:
        """``split`` into columns records (``store.shardrecord``): the series ``idx`` by shard (in
        request order within a shard), cut so that no block exceeds ``max_part_bytes``."""
        buf, blocks = shardrecord.encode_blocks(req, shard, idx, len(self._logs),
                                                self.max_part_bytes - shardrecord.block_size(0, 0, 0))
        parts = []
        for k, a, b, n_series, n_samples in blocks.tolist():
            block = buf[a:b]
            parts.append(_Part(k, shardrecord.encode_record(now_ms, block), msg_id(block, self._names[k]),
                               n_series, n_samples, b - a))
        return parts

    # ---- publishing --------------------------------------------------------

    def _publish(self, parts: list[_Part]) -> list[str]:
        """Publishes all parts at once and waits for every acknowledgement; returns what failed."""
        m = self._metrics
        deadline = time.monotonic() + self.publish_timeout_s
        pending: list[tuple[_Part, concurrent.futures.Future[int] | WALError]] = []
        for p in parts:
            try:
                fut = self._logs[p.shard].publish_async(p.record, p.msg_id)
            except WALError as e:
                pending.append((p, e))
                continue
            fut.add_done_callback(_observe_ack(m.duration.labels(self._names[p.shard]), time.monotonic()))
            pending.append((p, fut))
        failures = []
        for p, fut in pending:
            name = self._names[p.shard]
            try:
                if isinstance(fut, WALError):
                    raise fut
                wait_future(fut, max(0.0, deadline - time.monotonic()),
                            f"publish {p.series} series to shard {name} (msg id {p.msg_id})")
            except WALError as e:
                unavailable = isinstance(e, LogUnavailable)
                m.failures.labels(name, "unavailable" if unavailable else "error").inc()
                log.warning("publish", extra={"shard": name, "msg_id": p.msg_id, "err": str(e)})
                failures.append(f"shard {name}: {e}")
                continue
            m.parts.labels(name).inc()
            m.samples.labels(name).inc(p.samples)
            m.bytes.labels(name).inc(p.nbytes)
        return failures


def _observe_ack(hist: Histogram, t0: float) -> Callable[[concurrent.futures.Future[int]], None]:
    """A done-callback recording the publish latency of an acknowledged part (runs on the log's thread)."""
    def done(f: concurrent.futures.Future[int]) -> None:
        if not f.cancelled() and f.exception() is None:
            hist.observe(time.monotonic() - t0)
    return done


_METRIC = np.frombuffer(b"__name__", dtype=np.uint8)
