"""Chunk values shared by the head, blocks, remote read and the gRPC API."""

from __future__ import annotations

from typing import NamedTuple

MAX_SAMPLES_PER_CHUNK = 120  # Prometheus cuts XOR chunks at 120 samples.

ENCODING_XOR = 1  # Prometheus chunkenc.EncXOR; the remote-read Chunk.Encoding XOR value.


class Chunk(NamedTuple):
    """One encoded chunk: samples with ``mint <= t <= maxt`` (milliseconds)."""

    mint: int
    maxt: int
    data: bytes
    encoding: int = ENCODING_XOR
