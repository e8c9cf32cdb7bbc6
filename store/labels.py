"""Label sets and series identity.

A series is identified by its label set. ``Labels`` is an immutable tuple of
``(name, value)`` pairs sorted by name, the way Prometheus' ``labels.Labels``
is. Its 64-bit identity is ``Labels.hash()``: xxHash64 (seed 0) over the
canonical encoding ``name 0xff value 0xff`` of each pair in name order. This is
exactly Prometheus' ``labels.Labels.Hash()``, so it is stable across processes,
machines and versions; see ``store/docs/format/series-id.md``.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

import xxhash

METRIC_NAME = "__name__"
SEP = b"\xff"


class Labels(tuple):
    """Sorted, immutable label pairs. Build with ``Labels.from_pairs``/``from_dict``."""

    __slots__ = ()

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> "Labels":
        """Labels from pairs in any order; empty values are dropped as in Prometheus."""
        return tuple.__new__(cls, sorted((n, v) for n, v in pairs if v != ""))

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> "Labels":
        return cls.from_pairs(d.items())

    @classmethod
    def sorted_unchecked(cls, pairs: Iterable[tuple[str, str]]) -> "Labels":
        """Labels from pairs already sorted by name with no empty values."""
        return tuple.__new__(cls, pairs)

    @classmethod
    def from_canonical(cls, key: bytes) -> "Labels":
        """The labels of a canonical key (``canonical()``'s bytes, valid UTF-8 between the 0xff
        separators)."""
        # 0xff never occurs in UTF-8: decoded with surrogateescape it is the separator "\udcff".
        parts = iter(key.decode("utf-8", "surrogateescape").split("\udcff"))
        return tuple.__new__(cls, zip(parts, parts))

    def get(self, name: str, default: str = "") -> str:
        for n, v in self:
            if n == name:
                return v
        return default

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self)

    @property
    def name(self) -> str:
        """The metric name, ``""`` if there is none."""
        return self.get(METRIC_NAME)

    def names(self) -> list[str]:
        return [n for n, _ in self]

    def to_dict(self) -> dict[str, str]:
        return dict(self)

    def canonical(self) -> bytes:
        """The bytes the series id hashes: ``name 0xff value 0xff`` per pair."""
        return b"".join(n.encode() + SEP + v.encode() + SEP for n, v in self)

    def hash(self) -> int:
        """The 64-bit series id (unsigned), equal to Prometheus' ``labels.Hash()``."""
        return xxhash.xxh64_intdigest(self.canonical())

    def without(self, names: Iterable[str]) -> "Labels":
        drop = set(names)
        return tuple.__new__(Labels, (p for p in self if p[0] not in drop))

    def keep(self, names: Iterable[str]) -> "Labels":
        keep = set(names)
        return tuple.__new__(Labels, (p for p in self if p[0] in keep))

    def with_label(self, name: str, value: str) -> "Labels":
        """A copy with ``name`` set to ``value`` (removed when ``value`` is empty)."""
        return Labels.from_pairs([p for p in self if p[0] != name] + [(name, value)])

    def without_name(self) -> "Labels":
        return self.without((METRIC_NAME,))

    def __str__(self) -> str:
        # Prometheus' labels.String(): {a="b", c="d"} with Go-quoted values.
        return "{" + ", ".join(f"{n}={json.dumps(v, ensure_ascii=False)}" for n, v in self) + "}"

    def __repr__(self) -> str:
        return f"Labels({str(self)})"


EMPTY = Labels()
