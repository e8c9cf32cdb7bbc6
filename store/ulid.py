"""ULIDs: the names of blocks (https://github.com/ulid/spec, as Prometheus and Thanos use them).

A ULID is 128 bits: a 48-bit Unix time in milliseconds followed by 80 random
bits, written as 26 characters of Crockford's base32
(``0123456789ABCDEFGHJKMNPQRSTVWXYZ``), most significant first; the first
character carries only 3 bits, so it is at most ``7``. ULIDs made in different
milliseconds sort by time, as strings and as numbers. Flashback writes and
accepts only the canonical upper-case form, since ULIDs name objects in a
bucket and two spellings of one ULID must not name two blocks.
"""

from __future__ import annotations

import os
from typing import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = 26
MAX_TIME = (1 << 48) - 1

_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def new(ms: int, entropy: Callable[[int], bytes] = os.urandom) -> str:
    """A ULID for Unix time ``ms`` (milliseconds) with 80 bits from ``entropy``.

    Raises:
        ValueError: ``ms`` outside ``[0, 2**48)``.
    """
    if not 0 <= ms <= MAX_TIME:
        raise ValueError(f"ULID time {ms} ms outside [0, {MAX_TIME}]")
    rand = entropy(10)
    if len(rand) != 10:
        raise ValueError(f"ULID entropy must be 10 bytes, got {len(rand)}")
    return encode(ms.to_bytes(6, "big") + rand)


def encode(raw: bytes) -> str:
    """The 26-character string of 16 raw bytes."""
    if len(raw) != 16:
        raise ValueError(f"a ULID is 16 bytes, got {len(raw)}")
    n = int.from_bytes(raw, "big")
    return "".join(ALPHABET[(n >> (5 * i)) & 31] for i in range(LENGTH - 1, -1, -1))


def decode(s: str) -> bytes:
    """The 16 raw bytes of a canonical ULID string.

    Raises:
        ValueError: not 26 characters of the upper-case alphabet, or above ``7ZZ...Z``.
    """
    if not isinstance(s, str) or len(s) != LENGTH:
        raise ValueError(f"invalid ULID {s!r}: want {LENGTH} characters")
    n = 0
    for c in s:
        v = _VALUE.get(c)
        if v is None:
            raise ValueError(f"invalid ULID {s!r}: character {c!r} is not in the (upper-case) base32 alphabet")
        n = (n << 5) | v
    if n >> 128:
        raise ValueError(f"invalid ULID {s!r}: larger than 128 bits")
    return n.to_bytes(16, "big")


def is_valid(s: object) -> bool:
    """Whether ``s`` is a canonical ULID string."""
    try:
        decode(s)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def timestamp(s: str) -> int:
    """The Unix time in milliseconds of a ULID."""
    return int.from_bytes(decode(s)[:6], "big")
