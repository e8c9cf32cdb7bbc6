"""Block verification shared by the compactor and the downsampler.

Each keeps one ``BlockVerifier``: a block is read back and checked (``store.block.verify_block``)
at most once per process, failures are counted, and a block just written that fails is deleted
at once so that no reader ever sees it.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

from store.block import BlockMeta, verify_block
from store.bucket import Bucket
from store.catalog import delete_block
from store.errors import CorruptBlock, IncompleteBlock


class BlockVerifier:
    """Args:
        bucket: where the blocks are.
        failures: counts blocks that failed verification.
        deleted: counts blocks ``verify_written`` deleted (None: not counted).
        tmp_dir: directory for the files being verified.
    """

    def __init__(self, bucket: Bucket, failures: Counter, *, deleted: Counter | None = None,
                 tmp_dir: str | None = None) -> None:
        self._bucket = bucket
        self._failures = failures
        self._deleted = deleted
        self._tmp_dir = tmp_dir
        self._verified: set[str] = set()

    def __contains__(self, ulid: str) -> bool:
        """Whether block ``ulid`` was verified by this process."""
        return ulid in self._verified

    def verify(self, meta: BlockMeta) -> None:
        """Verifies ``meta``'s block unless it already was.

        Raises:
            CorruptBlock, IncompleteBlock: it failed (counted).
        """
        if meta.ulid in self._verified:
            return
        try:
            verify_block(self._bucket, meta.ulid, tmp_dir=self._tmp_dir)
        except (CorruptBlock, IncompleteBlock):
            self._failures.inc()
            raise
        self._verified.add(meta.ulid)

    def verify_written(self, meta: BlockMeta, log: logging.Logger, what: str) -> None:
        """Verifies a block just written (``what`` names it in the log); a corrupt one is deleted
        at once and the error raised."""
        try:
            self.verify(meta)
        except CorruptBlock:
            log.error(f"{what} just written fails verification: deleting it", exc_info=True,
                      extra={"block": meta.ulid})
            delete_block(self._bucket, meta.ulid)
            if self._deleted is not None:
                self._deleted.inc()
            raise
