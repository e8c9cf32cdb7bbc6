"""The replicated log of cluster mode: one NATS JetStream stream per shard.

``NatsLog`` is the writer's side (the adapter) and implements the ``Log``
Protocol of ``store.wal``; ``NatsConsumer`` is a head replica's side, a
named pull consumer that yields ``(stream_sequence, record)`` in order.
Stream, subject, message and header layout are documented in
``store/docs/format/natslog.md``.

Sequence numbers are the stream's own: JetStream assigns them when the stream
leader has stored a message on a quorum of its replicas and answers with a
PubAck. A sequence is therefore only known once the record is durable, so
``NatsLog.append`` blocks until the PubAck and ``wait_durable`` has nothing left
to wait for. Concurrency comes from many threads appending at once (each has
one publish in flight on the shared connection) or from ``publish_async``,
which lets one thread publish to several shards and wait for all of them.

A caller that retries a record passes the same ``msg_id`` (``Nats-Msg-Id``
header): within the stream's duplicate window JetStream stores it once and
answers a retry with the first copy's sequence. While the stream elects a new
leader (4-8 s after a server crash) publishes fail; they raise
``LogUnavailable``, which callers map to HTTP 503.

nats-py is asyncio and the rest of Flashback is threaded, so a
``NatsConnection`` owns one event-loop thread, and the synchronous methods of
the objects using it submit coroutines to it and wait with timeouts; all
methods are thread-safe. Submissions made while the loop has not yet picked up
earlier ones wait in one queue and cost a single wake-up of the loop thread,
so the adapter, whose shard logs share one connection, wakes it once per
request rather than once per shard.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js import api
from prometheus_client import CollectorRegistry, Counter, Histogram

from store.errors import DecodeError, LogTruncated, LogUnavailable, WALError
from store.wal import decode_record, encode_record

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"

# Failures that say "not now" rather than "never": the connection is down or reconnecting, the
# request timed out, nobody answered (no stream leader), or the server says 503.
_UNAVAILABLE = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    ConnectionError,
    OSError,
)

# JetStream API error codes.
_STREAM_NAME_IN_USE = 10058  # a stream of that name exists with another configuration
_CONSUMER_NOT_FOUND = 10014


def default_subject(stream: str) -> str:
    """The subject a stream's records are published on: ``flashback.log.<stream>``."""
    return f"flashback.log.{stream}"


def _as_wal_error(e: BaseException, what: str) -> WALError:
    """The typed error for a nats-py failure: ``LogUnavailable`` if retrying may help."""
    if isinstance(e, WALError):
        return e
    if isinstance(e, _UNAVAILABLE) or (isinstance(e, nats.js.errors.APIError) and (e.code or 0) >= 500):
        return LogUnavailable(f"{what}: {type(e).__name__}: {e}".rstrip(": "))
    return WALError(f"{what}: {type(e).__name__}: {e}".rstrip(": "))


@dataclass(frozen=True, slots=True)
class StreamState:
    """What the stream leader reports about a stream (``StreamInfo``).

    ``first_seq`` is the oldest sequence still held (``last_seq + 1`` once everything was
    purged, 0 for a stream that never had a message); ``leader`` is the server name of the
    stream leader, ``None`` during an election.
    """

    first_seq: int
    last_seq: int
    messages: int
    bytes: int
    leader: str | None
    replicas: int


@dataclass(eq=False, slots=True)
class _Publish:
    """A record being published by ``NatsConnection.publish`` until its PubAck or its failure."""

    log: "NatsLog"
    payload: bytes
    headers: dict[str, str]
    msg_id: str | None
    fut: concurrent.futures.Future[int]
    start: float
    deadline: float
    attempt: int = 0
    timer: asyncio.TimerHandle | None = None

    def what(self) -> str:
        return (f"publish {len(self.payload)} bytes to stream {self.log.stream}" +
                (f" (msg id {self.msg_id})" if self.msg_id is not None else ""))


class NatsConnection:
    """One nats-py connection and the event-loop thread that runs it; shareable by several
    ``NatsLog``s (which then do not close it).

    Args:
        servers: client URLs (``nats://host:port``); the client reconnects to any of them.
        name: connection name shown by the servers, also the thread name.
        connect_timeout_s: how long the first connection may take before ``LogUnavailable``.
        reconnect_wait_s: pause between reconnection rounds; reconnection never gives up.
    """

    def __init__(self, servers: list[str], name: str, connect_timeout_s: float = 10.0,
                 reconnect_wait_s: float = 0.25) -> None:
        if not servers:
            raise ValueError("no NATS servers given")
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats {name}", daemon=True)
        self._thread.start()
        self._closed = False
        # Coroutines submitted and not yet started on the loop, and whether a wake-up is on its way.
        self._queue: collections.deque[tuple[Awaitable[Any], concurrent.futures.Future[Any]]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._wake_pending = False
        # Publishes waiting for their PubAck, by the last token of their reply subject
        # (``_ack_prefix`` + token); loop-thread state, see ``publish``.
        self._acks: dict[str, _Publish] = {}
        self._ack_prefix = ""
        self._next_token = 0
        self.nc = nats.NATS()
        try:
            self.run(self._connect(list(servers), connect_timeout_s, reconnect_wait_s), connect_timeout_s + 5,
                     f"connect to NATS {','.join(servers)}")
        except BaseException:
            self._stop_loop()
            raise
        self.js = self.nc.jetstream()
        self.jsm = self.nc.jsm()

    async def _connect(self, servers: list[str], timeout_s: float, reconnect_wait_s: float) -> None:
        async def on_error(e: Exception) -> None:
            log.debug("nats connection", extra={"client": self.name, "error": f"{type(e).__name__}: {e}"})

        async def on_disconnect() -> None:
            log.info("nats disconnected", extra={"client": self.name})

        async def on_reconnect() -> None:
            url = self.nc.connected_url  # a urllib ParseResult
            log.info("nats reconnected", extra={"client": self.name, "server": url.geturl() if url else None})

        try:
            # nats-py keeps retrying its first connection forever when reconnection is unlimited,
            # so the first connection is bounded here.
            await asyncio.wait_for(self.nc.connect(
                servers=servers, name=self.name, connect_timeout=min(2.0, timeout_s),
                max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait_s, allow_reconnect=True,
                error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect), timeout_s)
            self._ack_prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
        except BaseException as e:
            try:
                await self.nc.close()
            except Exception:
                pass
            raise _as_wal_error(e, f"connect to NATS {','.join(servers)} within {timeout_s}s") from e

    def submit(self, coro: Awaitable[_T]) -> concurrent.futures.Future[_T]:
        """Runs ``coro`` on the loop thread; its future is cancelled along with it."""
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()
        if not self._enqueue(coro, fut):
            coro.close()  # type: ignore[attr-defined]
            raise WALError(f"NATS client {self.name} is closed")
        return fut

    def publish(self, p: "_Publish") -> None:
        """Publishes ``p`` from the loop thread and settles ``p.fut`` with its stream sequence or
        its ``WALError`` (thread-safe).

        A leaner path than ``nc.request`` in a task per publish, for the adapter's hottest call:
        the PubAcks come to one wildcard subscription of this connection and are matched to
        their publish by a counter token, the publishes queued by one wake-up of the loop go
        out from one task, and an attempt's timeout is one timer. An attempt that fails in a
        way retrying may cure (no PubAck in ``attempt_timeout_s``, no responders, a 5xx from
        the stream) is made again with the same message id until the log's ``timeout_s``.
        """
        if not self._enqueue(p, None):
            raise WALError(f"NATS client {self.name} is closed")

    def _enqueue(self, item: Any, fut: concurrent.futures.Future[Any] | None) -> bool:
        with self._queue_lock:
            if self._closed:
                return False
            self._queue.append((item, fut))
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._loop.call_soon_threadsafe(self._start_queued)
        return True

    def _start_queued(self) -> None:
        """On the loop thread: starts every queued coroutine, and one task for the publishes."""
        with self._queue_lock:
            items = list(self._queue)
            self._queue.clear()
            self._wake_pending = False
        publishes = []
        for item, fut in items:
            if fut is None:
                publishes.append(item)
                continue
            if fut.cancelled():  # given up on before it started
                item.close()
                continue
            task = self._loop.create_task(item)
            task.add_done_callback(lambda t, f=fut: _settle(f, t))
            fut.add_done_callback(lambda f, t=task: f.cancelled() and self._cancel_soon(t))
        if publishes:
            self._loop.create_task(self._send_all(publishes))

    async def _send_all(self, publishes: list["_Publish"]) -> None:
        for p in publishes:
            await self._send(p)

    async def _send(self, p: "_Publish") -> None:
        """One attempt of ``p``: registers its token and timer, then publishes."""
        if p.fut.cancelled():  # its waiter gave up: no further attempt
            return
        self._next_token += 1
        token = str(self._next_token)
        p.attempt += 1
        self._acks[token] = p
        timeout = max(0.05, min(p.log.attempt_timeout_s, p.deadline - time.monotonic()))
        p.timer = self._loop.call_later(timeout, self._attempt_failed, p, token, None)
        try:
            await self.nc.publish(p.log.subject, p.payload, reply=self._ack_prefix + token, headers=p.headers)
        except Exception as e:
            p.timer.cancel()
            self._attempt_failed(p, token, _as_wal_error(e, p.what()))

    async def _on_ack(self, msg: Any) -> None:
        p = self._acks.pop(msg.subject[len(self._ack_prefix):], None)
        if p is None:
            return  # the answer to an attempt given up on (retried or failed meanwhile)
        if p.timer is not None:
            p.timer.cancel()
        headers = msg.headers
        if headers and headers.get(api.Header.STATUS) == "503":
            self._retry_or_fail(p, LogUnavailable(f"{p.what()}: no responders (no stream leader)"))
            return
        try:
            resp = json.loads(msg.data)
            err = resp.get("error")
            if err is not None:
                nats.js.errors.APIError.from_error(err)  # raises the typed error of the code
            seq, duplicate = resp["seq"], resp.get("duplicate", False)
        except Exception as e:
            error = _as_wal_error(e, p.what())
            if isinstance(error, LogUnavailable):
                self._retry_or_fail(p, error)
            else:
                p.log._failed(p, error)
            return
        p.log._acknowledged(p, seq, duplicate)

    def _attempt_failed(self, p: "_Publish", token: str, error: WALError | None) -> None:
        if self._acks.pop(token, None) is None:
            return  # answered meanwhile
        self._retry_or_fail(p, error or LogUnavailable(
            f"{p.what()}: no PubAck within {p.log.attempt_timeout_s}s (attempt {p.attempt})"))

    def _retry_or_fail(self, p: "_Publish", error: WALError) -> None:
        if p.fut.cancelled():
            return
        # Without a message id a retry could store the record twice.
        if not isinstance(error, LogUnavailable) or p.msg_id is None or self._closed \
                or time.monotonic() + 0.1 >= p.deadline:
            p.log._failed(p, error)
            return
        p.log._metrics.retries.inc()
        self._loop.call_later(min(0.05 * p.attempt, 0.25), lambda: self._loop.create_task(self._send(p)))

    def _cancel_soon(self, task: asyncio.Task[Any]) -> None:
        """Cancels ``task`` on the loop thread (from any thread); nothing to do once the loop is closed."""
        try:
            self._loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:  # the loop is closed: the task went with it
            pass

    def run(self, coro: Awaitable[_T], timeout_s: float, what: str) -> _T:
        """Runs ``coro`` on the loop thread and returns its result.

        Raises:
            LogUnavailable: no result within ``timeout_s`` (the coroutine is cancelled), or
                a failure that retrying may cure.
            WALError: any other failure of the NATS client.
        """
        fut = self.submit(coro)
        return wait_future(fut, timeout_s, what)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.run(self.nc.close(), 5.0, f"close NATS client {self.name}")
        except WALError as e:  # the servers are gone: nothing to flush to
            log.warning("nats close", extra={"client": self.name, "error": str(e)})
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        with self._queue_lock:
            self._closed = True
            items = list(self._queue)
            self._queue.clear()
        closed = WALError(f"NATS client {self.name} closed before the PubAck")
        for item, fut in items:
            if fut is None:
                item.log._failed(item, closed)
            else:
                item.close()
                fut.cancel()
        try:
            # nats-py leaves its subscriptions' tasks pending when it closes while reconnecting;
            # ended here, they do not complain later about a closed loop.
            asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(2.0)
        except Exception:  # the loop is stuck or gone: stopping it is all that is left
            log.debug("nats close: pending tasks", extra={"client": self.name}, exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
            pending, self._acks = list(self._acks.values()), {}
            for p in pending:
                p.log._failed(p, closed)

    async def call(self, fn: Callable[[], Awaitable[_T]], timeout_s: float, what: str) -> _T:
        """Awaits ``fn()`` within ``timeout_s``, translating failures into ``WALError``s."""
        try:
            return await asyncio.wait_for(fn(), timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise _as_wal_error(e, what) from e

    async def retry(self, fn: Callable[[], Awaitable[_T]], deadline: float, attempt_s: float, what: str) -> _T:
        """Calls ``fn`` until it succeeds, retrying ``LogUnavailable`` until ``deadline`` (monotonic)."""
        pause = 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await self.call(fn, max(0.05, min(attempt_s, remaining)), what)
            except LogUnavailable:
                if time.monotonic() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def stream_state(self, stream: str, timeout_s: float) -> StreamState:
        """The stream's state, asked until it answers within ``timeout_s``: the JetStream API may
        time out (nats-py's own 5 s) or answer 503 for a while under load or during an election."""
        info = await self.retry(lambda: self.jsm.stream_info(stream), time.monotonic() + timeout_s, timeout_s,
                                f"read state of stream {stream}")
        cluster = info.cluster
        return StreamState(first_seq=info.state.first_seq, last_seq=info.state.last_seq,
                           messages=info.state.messages, bytes=info.state.bytes,
                           leader=cluster.leader if cluster is not None else None,
                           replicas=info.config.num_replicas or 1)

    async def purge_below(self, stream: str, seq: int, timeout_s: float) -> None:
        if seq <= 1:
            return
        await self.retry(lambda: self.jsm.purge_stream(stream, seq=seq), time.monotonic() + timeout_s,
                         timeout_s, f"purge stream {stream} below {seq}")


def _settle(fut: concurrent.futures.Future[_T], task: asyncio.Future[_T]) -> None:
    """Copies the outcome of ``task`` (on the loop) to ``fut`` (waited on by other threads),
    unless ``fut`` was cancelled (it stays pending, and so cancellable, while the task runs)."""
    if task.cancelled():
        fut.cancel()
        return
    error = task.exception()  # retrieved even if nobody waits any more
    if not fut.set_running_or_notify_cancel():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(task.result())


def wait_future(fut: concurrent.futures.Future[_T], timeout_s: float, what: str) -> _T:
    """Result of a future from ``NatsLog.publish_async`` (or any client call) within ``timeout_s``.

    Raises:
        LogUnavailable: no result within ``timeout_s``; the operation is cancelled.
        WALError: the operation failed.
    """
    try:
        return fut.result(timeout_s)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise LogUnavailable(f"{what}: no answer within {timeout_s}s") from None
    except concurrent.futures.CancelledError:
        raise LogUnavailable(f"{what}: cancelled") from None
    except WALError:
        raise
    except Exception as e:
        raise _as_wal_error(e, what) from e


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.publishes = Counter("flashback_natslog_publishes_total", "Records acknowledged by the stream "
                                 "(PubAck received).", registry=registry)
        self.duplicates = Counter("flashback_natslog_duplicate_publishes_total", "Publishes the stream answered "
                                  "as duplicates of an earlier message id.", registry=registry)
        self.bytes = Counter("flashback_natslog_publish_bytes_total", "Payload bytes of acknowledged records.",
                             registry=registry)
        self.retries = Counter("flashback_natslog_publish_retries_total", "Publish attempts repeated with the "
                               "same message id after a retryable failure.", registry=registry)
        self.failures = Counter("flashback_natslog_publish_failures_total", "Appends that raised WALError.",
                                registry=registry)
        self.duration = Histogram("flashback_natslog_publish_duration_seconds", "Time from publish to PubAck, "
                                  "retries included.", registry=registry,
                                  buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10))


class NatsLog:
    """A shard's replicated log: the ``Log`` Protocol on a JetStream stream.

    Creates the stream if it does not exist (file storage, limits retention, ``replicas``
    copies) and updates its limits if they differ.

    Args:
        servers: NATS client URLs; the client reconnects to any of them.
        stream: stream name (letters, digits, ``-``, ``_``).
        subject: subject records are published on; ``default_subject(stream)`` if ``None``.
        replicas: stream replicas (3 in cluster mode: one server may fail).
        max_age_s: records older than this are dropped by the stream; 0 keeps them.
        max_bytes: the stream drops its oldest records beyond this size; -1 for no limit.
        duplicate_window_s: a message id seen within this window is not stored again.
        timeout_s: bound of one ``append`` including its retries, and of every other call.
        attempt_timeout_s: how long one publish attempt waits for its PubAck.
        connect_timeout_s: bound of the first connection and the stream setup.
        registry: where the ``flashback_natslog_*`` metrics go (one log per registry);
            kept private if ``None``.
        connection: a connection shared with other logs, used instead of opening one to
            ``servers``; ``close`` leaves it open (its owner closes it).

    Raises:
        LogUnavailable: no server reachable or the stream could not be set up in time.
        WALError: the servers refused the stream configuration.
    """

    def __init__(self, servers: list[str], stream: str, *, subject: str | None = None, replicas: int = 3,
                 max_age_s: float = 0, max_bytes: int = -1, duplicate_window_s: float = 120,
                 timeout_s: float = 5.0, attempt_timeout_s: float = 2.0, connect_timeout_s: float = 10.0,
                 registry: CollectorRegistry | None = None, connection: NatsConnection | None = None) -> None:
        if replicas < 1 or timeout_s <= 0 or attempt_timeout_s <= 0 or duplicate_window_s <= 0:
            raise ValueError("replicas, timeout_s, attempt_timeout_s and duplicate_window_s must be positive")
        self.stream = stream
        self.subject = subject or default_subject(stream)
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self._config = api.StreamConfig(
            name=stream, subjects=[self.subject], retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE, num_replicas=replicas, max_age=max_age_s, max_bytes=max_bytes,
            discard=api.DiscardPolicy.OLD, duplicate_window=duplicate_window_s)
        self._metrics = _Metrics(registry if registry is not None else CollectorRegistry(auto_describe=False))
        self._lock = threading.Lock()
        self._acked = 0  # highest sequence acknowledged to this client
        self._closed = False
        self._owns_client = connection is None
        self._client = connection or NatsConnection(servers, f"log {stream}", connect_timeout_s, 0.25)
        try:
            self._client.run(self._ensure_stream(connect_timeout_s), connect_timeout_s + 5,
                             f"set up stream {stream}")
        except BaseException:
            if self._owns_client:
                self._client.close()
            raise

    async def _ensure_stream(self, timeout_s: float) -> None:
        jsm = self._client.jsm

        async def create() -> None:
            try:
                await jsm.add_stream(self._config)
            except nats.js.errors.BadRequestError as e:
                if e.err_code != _STREAM_NAME_IN_USE:
                    raise
                await jsm.update_stream(self._config)

        await self._client.retry(create, time.monotonic() + timeout_s, min(timeout_s, 5.0),
                                 f"create stream {self.stream} on subject {self.subject}")

    # --- Log ---------------------------------------------------------------------------------

    def append(self, record: bytes, msg_id: str | None = None) -> int:
        """Publishes ``record`` and returns its stream sequence once the stream acknowledged it.

        Unlike ``RocksLog.append`` the record is already durable (stored on a quorum of the
        stream's replicas) when this returns; the stream assigns the number, in the order
        publishes reach its leader.

        Args:
            record: the record's bytes (opaque here).
            msg_id: a stable id for this record, the same on every retry of it (by this
                process or another): the stream stores it only once within its duplicate
                window and answers again with the first sequence. Without an id a failed
                publish is not retried here, since it might have been stored.

        Raises:
            LogUnavailable: not acknowledged within ``timeout_s`` (no leader, no quorum,
                servers unreachable); retry with the same ``msg_id``.
            WALError: rejected for good (too large, stream deleted) or the log is closed.
        """
        return wait_future(self.publish_async(record, msg_id), self.timeout_s + 1.0,
                           f"publish to stream {self.stream}")

    def publish_async(self, record: bytes, msg_id: str | None = None) -> concurrent.futures.Future[int]:
        """Starts ``append`` and returns a future of the sequence (or of its ``WALError``).

        Lets one thread publish the parts of a request to several shards at once; wait with
        ``wait_future``. The publish gives up after ``timeout_s`` on its own, and makes no
        further attempt once the future is cancelled (``wait_future`` cancels it when it gives up).
        """
        if self._closed:
            raise WALError(f"append to closed log {self.stream}")
        payload = encode_record(bytes(record))
        if len(payload) > self._client.nc.max_payload:
            raise WALError(f"record of {len(record)} bytes exceeds the NATS max_payload of "
                           f"{self._client.nc.max_payload} bytes (stream {self.stream})")
        headers = {EXPECTED_STREAM_HEADER: self.stream}
        if msg_id is not None:
            headers[MSG_ID_HEADER] = msg_id
        start = time.monotonic()
        p = _Publish(self, payload, headers, msg_id, concurrent.futures.Future(), start, start + self.timeout_s)
        self._client.publish(p)
        return p.fut

    def _acknowledged(self, p: "_Publish", seq: int, duplicate: bool) -> None:
        """On the loop thread: ``p`` was stored as ``seq``."""
        m = self._metrics
        m.duration.observe(time.monotonic() - p.start)
        m.publishes.inc()
        m.bytes.inc(len(p.payload))
        if duplicate:
            m.duplicates.inc()
        with self._lock:
            self._acked = max(self._acked, seq)
        if p.fut.set_running_or_notify_cancel():
            p.fut.set_result(seq)

    def _failed(self, p: "_Publish", error: WALError) -> None:
        self._metrics.failures.inc()
        if p.fut.set_running_or_notify_cancel():
            p.fut.set_exception(error)

    def wait_durable(self, seq: int, timeout: float | None = None) -> None:
        """See ``Log.wait_durable``: returns at once, ``append`` only returns acknowledged records.

        Raises:
            ValueError: ``seq`` was never returned to this client.
        """
        with self._lock:
            if seq > self._acked:
                raise ValueError(f"wait for record {seq} of stream {self.stream}, but the newest acknowledged "
                                 f"here is {self._acked}")

    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """Yields ``(seq, record)`` for records after ``after`` up to the stream's last sequence
        at the time of the call, through an ephemeral consumer.

        Raises:
            LogTruncated: records after ``after`` were already purged.
            LogUnavailable: the stream did not answer in time.
        """
        if self._closed:
            raise WALError(f"replay closed log {self.stream}")
        return self._replay(after)

    def _replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        end = self.last_seq()
        if end <= after:
            return
        reader = _Reader(self._client, self.stream, None, after + 1, self.timeout_s)
        try:
            while reader.next_seq <= end:
                batch = reader.fetch(min(256, end - reader.next_seq + 1), self.timeout_s)
                if not batch and not reader._recreate:
                    raise LogUnavailable(f"replay stream {self.stream}: record {reader.next_seq} of {end} not "
                                         f"delivered within {self.timeout_s}s")
                for seq, record in batch:
                    if seq > end:
                        return
                    yield seq, record
        finally:
            reader.delete_quietly()

    def truncate(self, through: int) -> None:
        """Purges records with sequence <= ``through`` from the stream (on every replica)."""
        self._client.run(self._client.purge_below(self.stream, through + 1, self.timeout_s),
                         self.timeout_s + 1, f"purge stream {self.stream}")

    def last_seq(self) -> int:
        """Sequence of the stream's newest record, as its leader reports it; 0 if none ever was.

        Unlike ``RocksLog`` this asks the servers, since other processes publish too, and so
        it cannot be used after ``close``.

        Raises:
            LogUnavailable: the stream did not answer within ``timeout_s``.
            WALError: the log is closed.
        """
        return self.state().last_seq

    def state(self) -> StreamState:
        """The stream's sequences, size and current leader. Raises ``LogUnavailable`` as ``last_seq``."""
        return self._client.run(self._client.stream_state(self.stream, self.timeout_s), self.timeout_s + 1,
                                f"read state of stream {self.stream}")

    def close(self) -> None:
        """Closes the connection unless it is shared; publishes still in flight on it fail with
        ``WALError``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()


class _Reader:
    """Reads a stream in order from ``next_seq`` through a pull consumer.

    ``durable`` names the consumer (a replica's: one that exists is deleted and created again,
    because a consumer's start sequence cannot be changed); ``None`` lets the server name it.

    The consumer is in memory on one server, without acknowledgements (``AckPolicy.NONE``):
    the reader knows its position (``next_seq``) and a replica its checkpoint, so nothing
    depends on the consumer's state. A replicated, acknowledged consumer made every delivery
    and acknowledgement a Raft proposal on three servers: the NATS servers spent 1.25 ms of CPU
    per 12 KB record with three such consumers, 0.95 ms with these
    (``deploy/bench/nats_publish_cost.py``). When the consumer's server fails, the consumer is
    gone: its reader sees no records while the stream has some, and recreates it (for a head
    replica after ``stall_timeout_s``), which places it on a live server. The server removes a
    consumer nobody fetched from for ``INACTIVE_S`` (a replica that went away for good).

    Each ``fetch`` that finds nothing buffered makes one pull request (``no_wait``) for up to
    ``prefetch`` records: the server sends what the stream holds at once, then a status that
    ends the request; the messages land in a buffer from a subscription callback on the loop
    thread, and the records past ``max_records`` wait there for the next calls. Only when the
    stream had nothing does a second request wait for the next record (one, so that records
    published while the caller works are not sent one message at a time; the next call picks
    them up together). A replica keeping up and lingering between calls thus costs one request
    and a few wake-ups per call, whatever it fetches. (nats-py's own ``fetch`` sent two requests
    per call, kept the second open and waited for every message through ``asyncio.wait_for``.)
    Every request has its own reply subject, so the late end of an earlier request (the expiry
    of one a previous call stopped waiting for) does not end the current one; a waiting request
    the server ends early (no responders while the consumer starts, a leadership change) is made
    again after ``RETRY_PAUSE_S``, until the caller's timeout.
    """

    INACTIVE_S = 600.0
    DELETE_ATTEMPT_S = 2.0  # deleting a consumer whose server died is not answered, yet done
    MIN_EXPIRES_S = 0.01  # the shortest wait for a next record worth a request
    RETRY_PAUSE_S = 0.05  # before asking again when the server ended a waiting request early

    def __init__(self, client: NatsConnection, stream: str, durable: str | None, start_seq: int,
                 timeout_s: float, prefetch: int = 256) -> None:
        if start_seq < 1:
            raise ValueError(f"start sequence {start_seq} of stream {stream}: sequences start at 1")
        if prefetch < 1:
            raise ValueError("prefetch must be positive")
        self._client = client
        self.stream = stream
        self.durable = durable
        self.next_seq = start_seq
        self.pending = 0  # records after the last one returned, when it was delivered
        self._timeout_s = timeout_s
        self._prefetch = prefetch
        self._consumer: str | None = None
        self._sub: Any = None
        self._recreate = False
        self._pull_subject = ""
        self._inbox = ""  # prefix of the requests' reply subjects: <inbox><request number>
        self._requests = 0
        self._reply = ""  # the reply subject of the last request: only its status ends a wait
        self._generation = 0
        # Delivered and not yet returned: (stream sequence, data, num_pending), appended on the
        # loop thread (records of any request: they come in stream order). ``_ended``: the last
        # request's status ended it; ``_error``: a status that ends the consumer.
        self._buf: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self._cond = threading.Condition()
        self._ended = False
        self._wake_at = 1
        self._error: Exception | None = None
        self._client.run(self._create(), timeout_s + 1, f"create consumer {durable or '(ephemeral)'} on {stream}")

    async def _create(self) -> None:
        """(Re)creates the consumer at ``next_seq``, after checking that no record it needs was purged."""
        c = self._client
        what = f"consumer {self.durable or '(ephemeral)'} of stream {self.stream} at {self.next_seq}"
        deadline = time.monotonic() + self._timeout_s
        await self._check_not_truncated(self.next_seq)
        self._generation += 1  # deliveries to the old consumer's inbox are dropped from now on
        with self._cond:
            self._buf.clear()
            self._error = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        old = self.durable or self._consumer
        if old is not None:
            async def delete() -> None:
                try:
                    await c.jsm.delete_consumer(self.stream, old)
                except nats.js.errors.NotFoundError:
                    pass

            await c.retry(delete, deadline, min(self._timeout_s, self.DELETE_ATTEMPT_S), f"delete {what}")
        config = api.ConsumerConfig(
            name=self.durable, durable_name=self.durable, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq, ack_policy=api.AckPolicy.NONE,
            inactive_threshold=self.INACTIVE_S if self.durable else 60.0, mem_storage=True, num_replicas=1)
        # Creating consumers sometimes answers 503 or times out under load: retry; creating
        # the same consumer again with the same configuration is idempotent.
        info = await c.retry(lambda: c.jsm.add_consumer(self.stream, config), deadline, self._timeout_s,
                             f"create {what}")
        self._consumer = info.name
        self._pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"
        self._inbox = c.nc.new_inbox() + "."
        generation = self._generation

        async def on_msg(msg: Any) -> None:
            if generation == self._generation:
                self._on_msg(msg)

        self._sub = await c.nc.subscribe(self._inbox + "*", cb=on_msg)

    async def _check_not_truncated(self, seq: int) -> None:
        state = await self._client.stream_state(self.stream, self._timeout_s)
        if seq < state.first_seq and seq <= state.last_seq:
            raise LogTruncated(f"stream {self.stream} no longer holds records {seq}..{state.first_seq - 1} "
                               f"(it starts at {state.first_seq})")

    # --- on the loop thread ------------------------------------------------------------------

    def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        status = headers.get(api.Header.STATUS) if headers else None
        with self._cond:
            if status is None:
                try:
                    seq, pending = _delivery(msg.reply)
                except DecodeError as e:
                    self._error = e
                else:
                    self._buf.append((seq, msg.data, pending))
                    if len(self._buf) < self._wake_at:
                        return  # the waiting fetch wants more, or the request's end
            elif status == "100":  # heartbeat or flow control: not asked for
                return
            elif status == "409" and "deleted" in headers.get(api.Header.DESCRIPTION, "").lower():
                self._error = WALError(f"consumer {self._consumer} of stream {self.stream}: "
                                       f"{headers.get(api.Header.DESCRIPTION)}")
            elif msg.subject != self._reply:
                # The end of an earlier request (e.g. the expiry of one the last fetch stopped
                # waiting for) arriving after the next was made: it does not end that one.
                return
            else:
                # 404 (nothing to send), 408 (expired) or another 409 (leadership change, limits):
                # the request is over; the next call makes another.
                self._ended = True
            self._cond.notify()

    def _publish_soon(self, payload: bytes, inbox: str) -> None:
        """Sends a pull request from the loop thread, its answers to ``inbox``; a failure
        (reconnecting) only means no records come for it, which the caller's timeout covers."""
        nc = self._client.nc
        subject = self._pull_subject

        async def send() -> None:
            try:
                await nc.publish(subject, payload, inbox)
            except Exception as e:
                log.debug("pull request", extra={"stream": self.stream, "error": f"{type(e).__name__}: {e}"})

        self._client._loop.create_task(send())

    # --- on the reader's thread --------------------------------------------------------------

    def _request(self, payload: bytes, wake_at: int) -> None:
        """Under ``_cond``: makes a pull request (a status of an earlier one no longer counts);
        its deliveries wake the waiting fetch once ``wake_at`` records are buffered (not at each
        one: a wake-up per record cost the replica's thread and the loop thread a GIL hand-over
        each), its end, or an error, at once."""
        self._ended = False
        self._wake_at = wake_at
        self._requests += 1
        self._reply = f"{self._inbox}{self._requests}"
        self._client._loop.call_soon_threadsafe(self._publish_soon, payload, self._reply)

    def _wait(self, deadline: float) -> None:
        """Under ``_cond``: waits until the last request's ``wake_at`` records are buffered, its
        end, an error or ``deadline``."""
        while self._error is None and not self._ended and len(self._buf) < self._wake_at:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _recreate_now(self) -> None:
        self._client.run(self._create(), self._timeout_s + 2, f"recreate consumer of stream {self.stream}")
        self._recreate = False

    def fetch(self, max_records: int, timeout_s: float) -> list[tuple[int, bytes]]:
        if max_records < 1:
            raise ValueError("max_records must be positive")
        if self._recreate:
            self._recreate_now()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if not self._buf and self._error is None:
                # What the stream holds now, up to ``prefetch``: all of it before returning.
                batch = self._prefetch
                self._request(b'{"batch":%d,"no_wait":true}' % batch, batch)
                self._wait(deadline)
                expires = deadline - time.monotonic()
                while not self._buf and self._error is None and expires >= self.MIN_EXPIRES_S:
                    # Nothing yet: wait for the next record. A request the server ends early
                    # (no responders while a new consumer starts, a leadership change) is made
                    # again after a pause, until the caller's timeout.
                    self._request(b'{"batch":1,"expires":%d}' % int(expires * 1e9), 1)
                    self._wait(deadline)
                    if self._buf or self._error is not None:
                        break
                    self._cond.wait(min(self.RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
                    expires = deadline - time.monotonic()
            if self._error is not None and not self._buf:
                error, self._error = self._error, None
                raise error
            taken = [self._buf.popleft() for _ in range(min(max_records, len(self._buf)))]
        out: list[tuple[int, bytes]] = []
        gap = False
        for seq, data, pending in taken:
            if seq < self.next_seq:
                continue  # delivered again (a consumer recreated at an earlier position)
            if seq > self.next_seq:
                gap = True
                break
            out.append((seq, decode_record(seq, data)))
            self.next_seq += 1
            self.pending = pending
        if gap:
            # A message was lost on its way, or the records were purged: start over at the first
            # missing one. The records read so far are returned first; the next call recreates
            # the consumer (and raises LogTruncated if the missing records are gone).
            log.info("consumer gap, recreating", extra={"stream": self.stream, "consumer": self._consumer,
                                                        "seq": self.next_seq})
            self._recreate = True
            if not out:
                self._recreate_now()
        return out

    def delete_quietly(self) -> None:
        """Stops reading and deletes the consumer; failures are only logged."""
        if self._consumer is None:
            return
        consumer = self._consumer

        async def delete() -> None:
            self._generation += 1
            if self._sub is not None:
                sub, self._sub = self._sub, None
                await sub.unsubscribe()
            await self._client.jsm.delete_consumer(self.stream, consumer)

        try:
            self._client.run(self._client.call(delete, self._timeout_s, "delete consumer"), self._timeout_s + 1,
                             "delete consumer")
        except WALError:
            log.debug("consumer delete", extra={"stream": self.stream, "consumer": consumer}, exc_info=True)
        self._consumer = None


async def _cancel_other_tasks(within_s: float = 1.5) -> None:
    """Cancels every other task of the running loop and waits (``within_s`` at most) until they
    ended. A task that swallowed its cancellation and went on (nats-py's reconnect loop does, when
    the cancel meets a connection attempt that just failed) is cancelled again."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    deadline = asyncio.get_running_loop().time() + within_s
    pending = set(tasks)
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(left, 0.1))
    for t in tasks:  # what they failed with while ending is no news: retrieved, not logged
        if t.done() and not t.cancelled():
            t.exception()


def _delivery(reply: str) -> tuple[int, int]:
    """``(stream sequence, num_pending)`` of a JetStream delivery, from its reply subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``, or
    the newer form with ``<domain>.<account hash>`` after ``$JS.ACK`` and a random token at the end."""
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:
            return int(tokens[7]), int(tokens[10])
    except ValueError:
        pass
    raise DecodeError(f"not a JetStream delivery: reply subject {reply!r}")


class NatsConsumer:
    """A head replica's reader: a named pull consumer yielding records in stream order.

    The consumer named ``durable_name`` is deleted (if it exists) and created again to start
    at ``start_seq`` (the replica's checkpoint + 1): JetStream cannot move a consumer's start.
    Every record from ``start_seq`` on is returned exactly once and in order by ``fetch``;
    messages delivered again are skipped, and a gap (a message lost in delivery) recreates the
    consumer at the first missing sequence. The consumer lives in memory on one NATS server and
    is not acknowledged (see ``_Reader``): if that server fails, ``fetch`` returns nothing and
    the caller recreates the reader at its position.

    Thread-safety: ``fetch`` must not be called from two threads at once; ``last_seq`` and
    ``purge_below`` may be called from any thread.

    Args:
        servers: NATS client URLs.
        stream: the stream to read; it must exist (``NatsLog`` creates it).
        durable_name: the consumer's name, unique per replica of the shard.
        start_seq: the first sequence to return (>= 1).
        timeout_s: bound of each control call (create, state, purge), retries included.
        connect_timeout_s: bound of the first connection.
        prefetch: records one pull request asks for; those beyond ``max_records`` wait for the
            next ``fetch`` (see ``_Reader``).

    Raises:
        LogTruncated: records from ``start_seq`` on were already purged.
        LogUnavailable: no server or no stream leader answered in time.
    """

    def __init__(self, servers: list[str], stream: str, durable_name: str, start_seq: int, *,
                 timeout_s: float = 10.0, connect_timeout_s: float = 10.0, prefetch: int = 256) -> None:
        self.stream = stream
        self.durable_name = durable_name
        self.timeout_s = timeout_s
        self._client = NatsConnection(servers, f"consumer {stream}/{durable_name}", connect_timeout_s, 0.25)
        try:
            self._reader = _Reader(self._client, stream, durable_name, start_seq, timeout_s, prefetch)
        except BaseException:
            self._client.close()
            raise

    @property
    def next_seq(self) -> int:
        """The sequence the next record returned by ``fetch`` will have."""
        return self._reader.next_seq

    @property
    def pending(self) -> int:
        """How many records the stream held after the last one ``fetch`` returned, when that one
        was delivered (JetStream's ``num_pending``): ``next_seq - 1 + pending`` is a sequence the
        stream has reached, known without asking it."""
        return self._reader.pending

    def fetch(self, max_records: int, timeout_s: float) -> list[tuple[int, bytes]]:
        """Up to ``max_records`` next ``(stream_sequence, record)``s, in order, without gaps.

        Waits up to ``timeout_s`` for the first record and returns ``[]`` if none came.

        Raises:
            LogTruncated: the next records were purged before this consumer read them.
            DecodeError, UnsupportedVersion: a message is not a log record of a known version.
            LogUnavailable: the consumer could not be recreated after a gap in time.
        """
        return self._reader.fetch(max_records, timeout_s)

    def last_seq(self) -> int:
        """The stream's newest sequence (0 if it never had a record); ``last_seq() - next_seq + 1``
        is this consumer's lag. Raises ``LogUnavailable`` if the stream does not answer."""
        return self.state().last_seq

    def state(self) -> StreamState:
        """The stream's sequences, size and current leader."""
        return self._client.run(self._client.stream_state(self.stream, self.timeout_s), self.timeout_s + 1,
                                f"read state of stream {self.stream}")

    def purge_below(self, seq: int) -> None:
        """Removes records with sequence < ``seq`` from the stream, on every replica.

        Call it with the lowest checkpoint + 1 over all replicas of the shard.
        """
        self._client.run(self._client.purge_below(self.stream, seq, self.timeout_s), self.timeout_s + 1,
                         f"purge stream {self.stream}")

    def close(self, delete: bool = False) -> None:
        """Closes the connection; with ``delete`` the durable consumer is removed from the stream too."""
        if delete:
            self._reader.delete_quietly()
        self._client.close()
