"""Typed errors of the storage engine.

Applications map these to HTTP status codes in one place each (see
``adapter/errors.py`` and ``querier/errors.py``); messages never start with
"failed to" and carry the context a user needs (series, timestamp, key).
"""


class StorageError(Exception):
    """Base class of every error raised by ``store``."""


class InvalidMatcher(StorageError, ValueError):
    """A label matcher that cannot be compiled (bad regular expression)."""


class SampleRejected(StorageError):
    """A sample the head will not take; subclasses name the reason (a metric label)."""

    reason = "rejected"


class OutOfOrderSample(SampleRejected):
    reason = "out_of_order"


class DuplicateSample(SampleRejected):
    """Same timestamp as the series' last sample but a different value."""

    reason = "duplicate_timestamp"


class OutOfBounds(SampleRejected):
    """Timestamp outside the window the head accepts (too old or too far ahead)."""

    reason = "out_of_bounds"


class InvalidLabels(SampleRejected):
    """Empty/duplicate label names, invalid UTF-8, missing metric name."""

    reason = "invalid_labels"


class SampleLimitExceeded(StorageError):
    """A selection would load more samples than the query's ``SampleBudget`` allows."""


class CorruptChunk(StorageError, ValueError):
    """Chunk bytes that do not decode."""


class DecodeError(StorageError, ValueError):
    """Bytes of a wire format (protobuf, snappy, WAL record) that do not decode."""


class UnsupportedVersion(StorageError, ValueError):
    """A persisted format with a version this reader does not know."""


class WALError(StorageError):
    """The write-ahead log could not persist or read records; retrying may help."""


class LogUnavailable(WALError):
    """The replicated log cannot take or serve records right now: no server reachable, no
    quorum, or a stream-leader election under way. The same request may succeed when retried
    (the adapter answers 503 so that Prometheus retries)."""


class LogTruncated(WALError):
    """Records a reader needs were already removed from the log (purged below a checkpoint
    or dropped by the stream's age/size limits); the reader needs a newer checkpoint."""


class BucketError(StorageError):
    """An object storage operation did not succeed; the message names the bucket and object.

    Not retryable as such (bad credentials, a missing bucket, an invalid name); transient
    failures raise the subclass :class:`BucketUnavailable`.
    """


class BucketUnavailable(BucketError):
    """A transient object storage failure (unreachable endpoint, timeout, 5xx, throttling).

    Retrying later may help; ``RetryingBucket`` retries exactly these.
    """


class BucketConfigError(BucketError, ValueError):
    """An objstore configuration that cannot be used (unknown type, missing field)."""


class ObjectNotFound(StorageError, KeyError):
    """The object does not exist in the bucket."""

    def __str__(self) -> str:
        # KeyError.__str__ shows the repr of its argument; a message reads better as is.
        return Exception.__str__(self)


class BlockError(StorageError):
    """A block in the bucket cannot be read; the message names the block and the file."""


class IncompleteBlock(BlockError):
    """The block has no ``meta.json``: it does not exist, its upload has not finished, or its
    deletion has begun. Readers skip such blocks; they are not an error of the data."""


class CorruptBlock(BlockError, ValueError):
    """A block file that does not decode, is missing although ``meta.json`` lists it, or does not
    match ``meta.json`` (size, checksum, counts)."""


class TruncatedBlock(CorruptBlock):
    """A block file shorter than ``meta.json`` says it is."""


class UnsupportedBlockVersion(BlockError, UnsupportedVersion):
    """A block whose ``meta.json`` or files declare a format or version this reader does not know."""


class DeletionMarkError(BlockError):
    """A block's ``deletion-mark.json`` exists but cannot be used; the block is not deleted on its
    account (see ``store/docs/format/deletion-mark.md``)."""


class CorruptDeletionMark(DeletionMarkError, ValueError):
    """A ``deletion-mark.json`` that is not valid JSON, lacks a field, has a field of the wrong type,
    or names another block."""


class UnsupportedDeletionMarkVersion(DeletionMarkError, UnsupportedVersion):
    """A ``deletion-mark.json`` whose ``version`` this reader does not know (it knows 1)."""


class CheckpointMismatch(WALError):
    """A head replica's local checkpoint does not fit its log: it was taken from another stream,
    or it covers sequences the stream does not have (the stream was deleted and created again,
    or lost acknowledged records). Applying the stream on top of it would corrupt the head; the
    replica needs a fresh data directory, and then starts from a peer's checkpoint."""


class ReplicaError(StorageError):
    """A head replica answered a gRPC call with an error of its own (``INTERNAL`` and the like);
    the message names the replica's address and the method. Another replica of the shard may
    still answer."""


class ReplicaUnavailable(ReplicaError):
    """A head replica cannot answer now: unreachable, not ready (still catching up), shutting
    down, or the call timed out (gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``CANCELLED``,
    ``RESOURCE_EXHAUSTED``). The caller should ask another replica of the shard."""
