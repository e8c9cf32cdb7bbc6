"""Label matchers with Prometheus' semantics.

Regular expressions use RE2 syntax (google-re2, the library Go's regexp mirrors)
and are fully anchored with ``.`` matching newlines, as Prometheus compiles them
(``^(?s:expr)$``). A matcher applies to a missing label as to the empty value,
so ``{foo=""}`` selects series without ``foo``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import re2

from store.errors import InvalidMatcher


class MatchType(enum.Enum):
    EQ = "="
    NEQ = "!="
    RE = "=~"
    NRE = "!~"


_OPTIONS = re2.Options()
_OPTIONS.dot_nl = True
_OPTIONS.log_errors = False


@dataclass(frozen=True, slots=True)
class Matcher:
    type: MatchType
    name: str
    value: str
    _re: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.type in (MatchType.RE, MatchType.NRE):
            try:
                compiled = re2.compile(self.value, _OPTIONS)
            except re2.error as e:
                raise InvalidMatcher(f"invalid regular expression {self.value!r} in matcher for {self.name!r}: {e}") from None
            object.__setattr__(self, "_re", compiled)

    @classmethod
    def parse_op(cls, op: str, name: str, value: str) -> "Matcher":
        return cls(MatchType(op), name, value)

    def matches(self, value: str) -> bool:
        t = self.type
        if t is MatchType.EQ:
            return value == self.value
        if t is MatchType.NEQ:
            return value != self.value
        hit = self._re.fullmatch(value) is not None
        return hit if t is MatchType.RE else not hit

    def matches_empty(self) -> bool:
        return self.matches("")

    def __str__(self) -> str:
        import json

        return f"{self.name}{self.type.value}{json.dumps(self.value, ensure_ascii=False)}"
