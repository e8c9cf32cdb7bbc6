import numpy as np

from store.labels import Labels
from store.matchers import Matcher, MatchType
from store.postings import MemPostings

SERIES = [
    {"__name__": "up", "job": "a", "instance": "1"},
    {"__name__": "up", "job": "b", "instance": "2"},
    {"__name__": "up", "job": "a"},
    {"__name__": "down", "job": "c", "instance": "1"},
]


def _postings():
    p = MemPostings()
    for ref, d in enumerate(SERIES):
        p.add(ref, Labels.from_dict(d))
    return p


def _brute(matchers):
    return [ref for ref, d in enumerate(SERIES) if all(m.matches(d.get(m.name, "")) for m in matchers)]


CASES = {
    "eq": [Matcher(MatchType.EQ, "__name__", "up")],
    "eq_and_neq": [Matcher(MatchType.EQ, "__name__", "up"), Matcher(MatchType.NEQ, "job", "a")],
    "neq_only_includes_missing": [Matcher(MatchType.NEQ, "instance", "1")],
    "empty_eq_selects_missing": [Matcher(MatchType.EQ, "instance", "")],
    "re": [Matcher(MatchType.RE, "job", "a|c")],
    "nre": [Matcher(MatchType.NRE, "job", "a.*")],
    "re_matching_empty": [Matcher(MatchType.RE, "instance", "1|")],
    "re_not_empty": [Matcher(MatchType.RE, "instance", ".+")],
    "unknown_label": [Matcher(MatchType.EQ, "nope", "x")],
    "nre_everything": [Matcher(MatchType.NRE, "__name__", ".*")],
}


def test_select_agrees_with_brute_force():
    p = _postings()
    all_refs = np.arange(len(SERIES))
    for name, ms in CASES.items():
        assert p.select(ms, all_refs).tolist() == _brute(ms), name


def test_label_names_and_values():
    p = _postings()
    assert p.label_names() == ["__name__", "instance", "job"]
    assert p.label_values("job") == ["a", "b", "c"]
    assert p.label_values("nope") == []
