import pytest

from store.errors import InvalidMatcher
from store.matchers import Matcher, MatchType


@pytest.mark.parametrize("op,value,subject,want", [
    ("=", "a", "a", True),
    ("=", "a", "b", False),
    ("!=", "a", "a", False),
    ("!=", "a", "", True),
    ("=~", "a.*", "abc", True),
    ("=~", "b", "abc", False),           # fully anchored
    ("=~", "a|b", "a", True),
    ("=~", "a.b", "a\nb", True),         # . matches newline, as Prometheus' (?s:...)
    ("=~", ".*", "", True),
    ("!~", "a.*", "abc", False),
    ("!~", "a.*", "", True),
    ("=~", "\\pL+", "äbc", True),          # RE2 Unicode classes
], ids=lambda v: repr(v))
def test_matches(op, value, subject, want):
    assert Matcher(MatchType(op), "l", value).matches(subject) is want


def test_invalid_regex_is_a_typed_error():
    with pytest.raises(InvalidMatcher, match="invalid regular expression"):
        Matcher(MatchType.RE, "l", "(")


def test_re2_rejects_backreferences():
    with pytest.raises(InvalidMatcher):
        Matcher(MatchType.RE, "l", "(a)\\1")


def test_str():
    assert str(Matcher(MatchType.NRE, "job", 'a"b')) == 'job!~"a\\"b"'
