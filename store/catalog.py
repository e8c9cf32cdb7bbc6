"""The blocks of a bucket: which are complete, which a querier reads, which are marked for deletion.

A ``BlockCatalog`` is a snapshot of a bucket's block directories, taken by
``refresh`` with one recursive listing plus a GET of every ``meta.json`` and
``deletion-mark.json`` it has not read before (both are immutable once
written, so they are cached across refreshes). It sorts every directory named
by a ULID into one of three kinds:

* complete: ``meta.json`` is present and decodes (``CatalogBlock``);
* unreadable: ``meta.json`` is present but does not decode or has an unknown
  version (``errors``); nobody may read or delete such a block on the strength
  of a metadata file nobody understands;
* partial: no ``meta.json`` (an upload in progress or aborted, or a deletion
  under way); ``partial_blocks`` lists those old enough to clean up.

Which complete blocks a querier reads (``blocks``) follows Thanos' rules
(``pkg/block/fetcher.go``: the deduplicate filter, not the deletion-mark one):

* A block marked for deletion is still read: its mark only says it will go once
  the delay has passed, and until then it may be the only copy of its data
  (a compactor marks the sources of a merged block only after uploading it).
* A block whose data another complete block of the same resolution holds is
  hidden: its ``compaction.sources`` are a subset of the other's (a level-1
  block listed in a merged block's sources, or two blocks with identical
  sources). Of blocks with identical sources the one with the smallest ULID is
  read. A block with empty ``sources`` counts as its own only source.
* Blocks that overlap in time without one containing the other (two level-1
  blocks of one window, e.g. from a retried upload or two compactors) are
  both read; the reader merges their series and drops samples with equal
  timestamps (the querier's merge), and the compactor merges them later.

Deletion marks use Thanos' ``deletion-mark.json`` format, specified in
``store/docs/format/deletion-mark.md``. A block is deleted (``delete_block``)
in Thanos' order: ``meta.json`` first, so the block becomes incomplete and
invisible in one step; then its other files; the deletion mark last, so an
interrupted deletion still carries its mark.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

from store import ulid as ulids
from store.block import META_FILE, BlockMeta
from store.bucket import DIR_DELIM, Bucket
from store.cache import Cache
from store.errors import (
    BlockError, CorruptBlock, CorruptDeletionMark, DeletionMarkError, ObjectNotFound,
    UnsupportedDeletionMarkVersion,
)

DELETION_MARK_FILE = "deletion-mark.json"
DELETION_MARK_VERSION = 1

# Unix seconds beyond this are surely milliseconds passed by mistake (the year 5138).
_MAX_UNIX_SECONDS = 100_000_000_000


def _wall_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# Deletion marks


@dataclass(frozen=True, slots=True)
class DeletionMark:
    """The contents of ``<ULID>/deletion-mark.json`` (Thanos' ``metadata.DeletionMark``).

    ``deletion_time`` is when the block was marked, in Unix seconds; the block
    may be deleted once a delay has passed since then. ``details`` is a
    human-readable reason, possibly empty.
    """

    id: str
    deletion_time: int
    version: int = DELETION_MARK_VERSION
    details: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, object] = {"id": self.id, "version": self.version}
        if self.details:
            doc["details"] = self.details
        doc["deletion_time"] = self.deletion_time
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, context: str = DELETION_MARK_FILE) -> "DeletionMark":
        """Parses and validates a deletion-mark.json document.

        Raises:
            UnsupportedDeletionMarkVersion: a ``version`` other than 1.
            CorruptDeletionMark: not a JSON object, or a field is missing or of the wrong type.
        """
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptDeletionMark(f"{context}: not valid JSON: {err}") from None
        if not isinstance(doc, dict):
            raise CorruptDeletionMark(f"{context}: not a JSON object")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise CorruptDeletionMark(f"{context}: 'version' is {version!r}, not an integer")
        if version != DELETION_MARK_VERSION:
            raise UnsupportedDeletionMarkVersion(f"{context}: version {version} is not supported "
                                                 f"(this reader knows version {DELETION_MARK_VERSION})")
        ident, when, details = doc.get("id"), doc.get("deletion_time"), doc.get("details", "")
        if not ulids.is_valid(ident):
            raise CorruptDeletionMark(f"{context}: 'id' is {ident!r}, not a ULID")
        if isinstance(when, bool) or not isinstance(when, int) or not 0 <= when < _MAX_UNIX_SECONDS:
            raise CorruptDeletionMark(f"{context}: 'deletion_time' is {when!r}, not Unix seconds")
        if not isinstance(details, str):
            raise CorruptDeletionMark(f"{context}: 'details' is {details!r}, not a string")
        return cls(id=ident, deletion_time=when, version=version, details=details)


def deletion_mark_name(ulid: str) -> str:
    """The object name of block ``ulid``'s deletion mark."""
    return ulid + DIR_DELIM + DELETION_MARK_FILE


def read_deletion_mark(bucket: Bucket, ulid: str) -> DeletionMark | None:
    """The deletion mark of block ``ulid``, or None if it has none.

    Raises:
        CorruptDeletionMark: the mark does not decode or names another block.
        UnsupportedDeletionMarkVersion: the mark has another version.
        BucketError: the bucket failed.
    """
    if not ulids.is_valid(ulid):
        raise ValueError(f"invalid block ULID {ulid!r}")
    try:
        data = bucket.get(deletion_mark_name(ulid))
    except ObjectNotFound:
        return None
    return _decode_mark(ulid, data)


def _decode_mark(ulid: str, data: bytes) -> DeletionMark:
    mark = DeletionMark.from_json(data, f"block {ulid}: {DELETION_MARK_FILE}")
    if mark.id != ulid:
        raise CorruptDeletionMark(f"block {ulid}: {DELETION_MARK_FILE} names block {mark.id}")
    return mark


def mark_for_deletion(bucket: Bucket, ulid: str, reason: str, now: int) -> tuple[DeletionMark, bool]:
    """Uploads a deletion mark for block ``ulid`` unless it already has a valid one.

    An existing valid mark is kept as it is, so marking twice never postpones
    (or advances) a deletion. A corrupt mark is replaced: the delay then runs
    from ``now``, which only ever postpones the deletion. A mark of an unknown
    version is left alone (a newer tool wrote it).

    Args:
        bucket: the bucket holding the block.
        ulid: the block.
        reason: why, recorded as ``details``.
        now: the current time in Unix seconds (not milliseconds).

    Returns:
        The mark in effect, and whether this call uploaded it.

    Raises:
        ValueError: an invalid ULID, or ``now`` that is not plausible Unix seconds.
        UnsupportedDeletionMarkVersion: the block has a mark of another version.
        BucketError: the bucket failed.
    """
    if not ulids.is_valid(ulid):
        raise ValueError(f"invalid block ULID {ulid!r}")
    if isinstance(now, bool) or not isinstance(now, int) or not 0 <= now < _MAX_UNIX_SECONDS:
        raise ValueError(f"now must be Unix seconds, got {now!r}")
    try:
        existing = read_deletion_mark(bucket, ulid)
    except CorruptDeletionMark:
        existing = None
    if existing is not None:
        return existing, False
    mark = DeletionMark(id=ulid, deletion_time=now, details=reason)
    bucket.upload(deletion_mark_name(ulid), mark.to_json())
    return mark, True


def delete_block(bucket: Bucket, ulid: str) -> list[str]:
    """Deletes every object of block ``ulid``: meta.json first, the deletion mark last.

    Deleting meta.json first makes the block incomplete, so readers skip it from
    then on; keeping the mark to the end means an interrupted deletion leaves a
    marked, incomplete block that a later run finishes. Objects that vanish
    meanwhile (another deleter) are skipped. Idempotent.

    Returns:
        The names of the objects this call deleted.

    Raises:
        ValueError: an invalid ULID.
        BucketError: the bucket failed; the deletion may be partly done.
    """
    if not ulids.is_valid(ulid):
        raise ValueError(f"invalid block ULID {ulid!r}")
    prefix = ulid + DIR_DELIM
    meta, mark = prefix + META_FILE, prefix + DELETION_MARK_FILE
    names = list(bucket.iter(prefix, recursive=True))
    order = ([meta] if meta in names else []) + [n for n in names if n not in (meta, mark)]
    if mark in names:
        order.append(mark)
    deleted = []
    for name in order:
        try:
            bucket.delete(name)
        except ObjectNotFound:
            continue
        deleted.append(name)
    return deleted


# ---------------------------------------------------------------------------------------------
# The catalog


@dataclass(frozen=True, slots=True)
class CatalogBlock:
    """A complete block as the catalog saw it.

    ``deletion_mark`` is its valid mark, if any; ``mark_error`` the error of a
    mark that exists but cannot be used (the block then counts as unmarked, so
    it is never deleted on that mark's account). ``hidden_by`` is the ULID of
    the complete block of the same resolution whose sources include all of this
    block's, if any: queriers read that one instead.
    """

    meta: BlockMeta
    deletion_mark: DeletionMark | None = None
    mark_error: DeletionMarkError | None = None
    hidden_by: str | None = None

    @property
    def ulid(self) -> str:
        return self.meta.ulid

    @property
    def marked(self) -> bool:
        return self.deletion_mark is not None


class PartialBlock(NamedTuple):
    """A block directory without meta.json.

    ``objects`` are its object names; ``last_activity_ms`` is the later of its
    ULID's time and its newest object's modification time; ``deletion_mark`` is
    set when the directory still holds a valid mark (an interrupted deletion).
    """

    ulid: str
    objects: tuple[str, ...]
    last_activity_ms: int
    deletion_mark: DeletionMark | None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    complete: dict[str, CatalogBlock]
    errors: dict[str, BlockError]
    partial: dict[str, tuple[str, ...]]  # ULID -> object names


class BlockCatalog:
    """A snapshot of the blocks in a bucket, renewed by ``refresh``.

    Thread-safety: ``refresh`` may run in one thread while others call the
    read methods; those see the previous snapshot until the new one is
    complete, never a mix. Concurrent ``refresh`` calls are serialised.
    Before the first ``refresh`` the catalog is empty.
    """

    def __init__(self, bucket: Bucket, *, now: Callable[[], int] = _wall_ms, concurrency: int = 8,
                 meta_cache: Cache | None = None) -> None:
        """Args:
            bucket: the bucket whose root holds the block directories.
            now: the clock in ms since the Unix epoch (for the age of partial blocks).
            concurrency: metadata files fetched at once by ``refresh``.
            meta_cache: a bounded cache for the decoded meta.json files (e.g. a querier's, with
                metrics); without one they are kept while their block is listed.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._bucket = bucket
        self._now = now
        self._concurrency = concurrency
        self._refresh_lock = threading.Lock()
        self._snapshot = _Snapshot({}, {}, {})
        # meta.json and valid deletion marks never change once written: cached by ULID.
        self._meta_cache: dict[str, BlockMeta] | Cache = meta_cache if meta_cache is not None else {}
        self._mark_cache: dict[str, DeletionMark] = {}

    def __repr__(self) -> str:
        s = self._snapshot
        return f"BlockCatalog({self._bucket!r}: {len(s.complete)} complete, {len(s.partial)} partial)"

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Lists the bucket and reads the metadata of blocks not seen before.

        Directories at the root not named by a ULID, and objects at the root,
        are ignored (as Thanos does).

        Raises:
            BucketError: the bucket failed; the previous snapshot stays in place.
        """
        with self._refresh_lock:
            dirs: dict[str, list[str]] = {}
            for name in self._bucket.iter("", recursive=True):
                head, sep, _ = name.partition(DIR_DELIM)
                if sep and ulids.is_valid(head):
                    dirs.setdefault(head, []).append(name)
            with_meta = [u for u, names in dirs.items() if u + DIR_DELIM + META_FILE in names]
            with_mark = [u for u in with_meta if deletion_mark_name(u) in dirs[u]]
            metas = self._fetch(with_meta, self._read_meta, self._meta_cache)
            marks = self._fetch(with_mark, self._read_mark, self._mark_cache)

            complete: dict[str, CatalogBlock] = {}
            errors: dict[str, BlockError] = {}
            partial: dict[str, tuple[str, ...]] = {}
            for u, names in dirs.items():
                meta = metas.get(u)
                if u not in with_meta or isinstance(meta, ObjectNotFound):
                    partial[u] = tuple(names)  # meta.json vanished since the listing: deletion begun
                elif isinstance(meta, BlockError):
                    errors[u] = meta
                else:
                    assert isinstance(meta, BlockMeta)
                    mark = marks.get(u)
                    if isinstance(mark, ObjectNotFound):
                        mark = None
                    if isinstance(mark, DeletionMarkError):
                        complete[u] = CatalogBlock(meta, mark_error=mark)
                    else:
                        complete[u] = CatalogBlock(meta, deletion_mark=mark)
            _hide_contained(complete)
            if isinstance(self._meta_cache, dict):  # a bounded Cache forgets on its own
                self._meta_cache = {u: m for u, m in self._meta_cache.items() if u in complete}
            self._mark_cache = {u: m for u, m in self._mark_cache.items()
                                if u in complete and complete[u].deletion_mark is not None}
            self._snapshot = _Snapshot(complete, errors, partial)

    def _read_meta(self, ulid: str) -> BlockMeta:
        data = self._bucket.get(ulid + DIR_DELIM + META_FILE)
        meta = BlockMeta.from_json(data, f"block {ulid}: {META_FILE}")
        if meta.ulid != ulid:
            raise CorruptBlock(f"block {ulid}: {META_FILE} names block {meta.ulid}")
        return meta

    def _read_mark(self, ulid: str) -> DeletionMark:
        return _decode_mark(ulid, self._bucket.get(deletion_mark_name(ulid)))

    def _fetch(self, ulids_: list[str], read: Callable[[str], object], cache: dict | Cache) -> dict[str, object]:
        """``read(u)`` for every ULID not in ``cache``, run concurrently; results or the errors
        ObjectNotFound and BlockError (other errors, BucketError included, propagate)."""
        out: dict[str, object] = {}
        todo = []
        for u in ulids_:
            hit = cache.get(u)
            if hit is None:
                todo.append(u)
            else:
                out[u] = hit
        put = cache.put if isinstance(cache, Cache) else cache.__setitem__

        def one(u: str) -> object:
            try:
                value = read(u)
            except (ObjectNotFound, BlockError) as err:
                return err
            put(u, value)
            return value

        if len(todo) <= 1 or self._concurrency == 1:
            results: Iterable[object] = map(one, todo)
            out.update(zip(todo, results))
        else:
            with ThreadPoolExecutor(min(self._concurrency, len(todo))) as pool:
                out.update(zip(todo, pool.map(one, todo)))
        return out

    # -- reading ------------------------------------------------------------------------------

    def all_blocks(self) -> list[CatalogBlock]:
        """Every complete block, hidden and marked ones included, by resolution, minTime, ULID."""
        return sorted(self._snapshot.complete.values(),
                      key=lambda b: (b.meta.resolution, b.meta.min_time, b.ulid))

    def get(self, ulid: str) -> CatalogBlock | None:
        """The complete block ``ulid``, or None."""
        return self._snapshot.complete.get(ulid)

    @property
    def errors(self) -> dict[str, BlockError]:
        """Blocks whose meta.json exists but cannot be used, with the error (CorruptBlock or
        UnsupportedBlockVersion). They are neither read nor deleted."""
        return dict(self._snapshot.errors)

    def blocks(self, mint: int | None = None, maxt: int | None = None, resolution: int = 0) -> list[BlockMeta]:
        """The blocks a querier reads for samples with ``mint <= t <= maxt`` at ``resolution``.

        Complete, not hidden by a block holding their data (deletion-marked ones
        included), with samples possibly in the range (``minTime <= maxt`` and
        ``maxTime > mint``, maxTime being exclusive). Blocks returned may overlap
        in time; the reader deduplicates samples by timestamp. Sorted by minTime,
        then ULID.

        Args:
            mint, maxt: inclusive bounds in ms; None: unbounded.
            resolution: 0 for raw data, else the downsampling resolution in ms.
        """
        out = []
        for b in self._snapshot.complete.values():
            m = b.meta
            if b.hidden_by is not None or m.resolution != resolution:
                continue
            if maxt is not None and m.min_time > maxt:
                continue
            if mint is not None and m.max_time <= mint:
                continue
            out.append(m)
        out.sort(key=lambda m: (m.min_time, m.ulid))
        return out

    def overlaps(self, resolution: int = 0) -> list[tuple[BlockMeta, BlockMeta]]:
        """Pairs of blocks that ``blocks`` returns and whose time ranges overlap, by minTime.

        Not an error: the reader deduplicates them and the compactor merges them.
        """
        live = self.blocks(resolution=resolution)
        pairs = []
        for i, a in enumerate(live):
            for b in live[i + 1:]:
                if b.min_time >= a.max_time:
                    break
                pairs.append((a, b))
        return pairs

    def partial_blocks(self, min_age_s: float) -> list[PartialBlock]:
        """Block directories without meta.json with no activity for at least ``min_age_s``.

        Activity is the later of the ULID's time and the newest object's
        modification time, so neither an upload in progress with an old,
        deterministic ULID nor one with a fresh ULID is listed. Reads the
        objects' attributes, and checks that meta.json is still absent.
        Sorted by ULID.

        Raises:
            BucketError: the bucket failed.
        """
        if min_age_s < 0:
            raise ValueError(f"min_age_s must not be negative, got {min_age_s}")
        cutoff = self._now() - int(min_age_s * 1000)
        out = []
        for u, names in sorted(self._snapshot.partial.items()):
            if ulids.timestamp(u) > cutoff:
                continue
            newest = ulids.timestamp(u)
            present = []
            for name in names:
                try:
                    newest = max(newest, self._bucket.attributes(name).last_modified)
                except ObjectNotFound:
                    continue
                present.append(name)
            if newest > cutoff or not present or self._bucket.exists(u + DIR_DELIM + META_FILE):
                continue
            mark = None
            if deletion_mark_name(u) in present:
                try:
                    mark = read_deletion_mark(self._bucket, u)
                except DeletionMarkError:
                    mark = None
            out.append(PartialBlock(u, tuple(present), newest, mark))
        return out


def _hide_contained(complete: dict[str, CatalogBlock]) -> None:
    """Sets ``hidden_by`` of every block whose sources another block of its resolution includes.

    Thanos' deduplicate filter: blocks are visited by number of sources
    (descending), then ULID; a block is hidden by the first visited block
    whose sources include all of its own.
    """
    def sources(b: CatalogBlock) -> frozenset[str]:
        return frozenset(b.meta.sources) or frozenset((b.ulid,))

    order = sorted(complete.values(), key=lambda b: (b.meta.resolution, -len(sources(b)), b.ulid))
    holders: dict[tuple[int, str], list[CatalogBlock]] = {}  # (resolution, source) -> visited blocks
    for b in order:
        src = sources(b)
        any_source = next(iter(src))
        container = None
        for cand in holders.get((b.meta.resolution, any_source), ()):
            if src <= sources(cand):
                container = cand
                break
        if container is not None:
            # The container's own container (if any) came earlier and would have matched first.
            complete[b.ulid] = CatalogBlock(b.meta, b.deletion_mark, b.mark_error, container.ulid)
        for s in src:
            holders.setdefault((b.meta.resolution, s), []).append(b)
