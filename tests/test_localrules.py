"""Operator rules (minimum security per destination), as specifications."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.protocol.localrules import (
    DANE_UNAVAILABLE,
    Floor,
    Rule,
    RuleError,
    floor_for,
    parse_rules,
)
from mxguard.protocol.results import ResultType


def test_floors_are_ordered_none_tls_verified_dane() -> None:
    labels = ["dane", "none", "verified", "tls"]
    ordered = sorted(Floor.from_label(label) for label in labels)
    assert [f.label for f in ordered] == ["none", "tls", "verified", "dane"]
    assert max(Floor.TLS, Floor.VERIFIED) is Floor.VERIFIED
    assert Floor.DANE > Floor.VERIFIED >= Floor.VERIFIED > Floor.TLS > Floor.NONE


def test_missing_dane_is_reported_as_dane_required() -> None:
    # RFC 8460 §4.3.2: the result type for "DANE required but not available".
    assert DANE_UNAVAILABLE is ResultType.DANE_REQUIRED


PARSED = [
    # (rule, key, floor, expected Rule)
    ("exact_domain", "example.com", "verified", Rule("example.com", False, Floor.VERIFIED)),
    ("leading_dot_is_a_suffix", ".corp.example", "tls", Rule("corp.example", True, Floor.TLS)),
    ("domain_lower_cased", "Example.COM", "dane", Rule("example.com", False, Floor.DANE)),
    ("trailing_dot_removed", "example.com.", "none", Rule("example.com", False, Floor.NONE)),
    (
        "u_label_to_a_label",
        "bücher.example",
        "tls",
        Rule("xn--bcher-kva.example", False, Floor.TLS),
    ),
]


@pytest.mark.parametrize(
    ("key", "floor", "expected"), [r[1:] for r in PARSED], ids=[r[0] for r in PARSED]
)
def test_parse_rule(key: str, floor: str, expected: Rule) -> None:
    assert parse_rules({key: floor}) == (expected,)


def test_rule_key_round_trips() -> None:
    rules = parse_rules({"example.com": "tls", ".corp.example": "dane"})
    assert {r.pattern: r.floor.label for r in rules} == {
        "example.com": "tls",
        ".corp.example": "dane",
    }


INVALID = [
    # (rule, mapping, fragment of the reason)
    ("unknown_floor_lists_the_valid_ones", {"example.com": "secure"}, "none, tls, verified, dane"),
    ("floor_spelling_is_exact", {"example.com": "Verified"}, "unknown floor"),
    ("floor_is_a_string", {"example.com": 2}, "must be a string"),
    ("star_wildcard_suggests_leading_dot", {"*.example.com": "tls"}, "'.example.com'"),
    ("empty_key", {"": "tls"}, "not a domain"),
    ("lone_dot", {".": "tls"}, "not a domain"),
    ("empty_label", {"a..example": "tls"}, "not a domain"),
    ("no_spaces", {"exa mple.com": "tls"}, "not a domain"),
    ("duplicates_after_normalising", {"example.com": "tls", "EXAMPLE.com.": "dane"}, "duplicates"),
    ("suffix_duplicates_too", {".a.example": "tls", ".A.example": "tls"}, "duplicates"),
]


@pytest.mark.parametrize(
    ("mapping", "reason"), [r[1:] for r in INVALID], ids=[r[0] for r in INVALID]
)
def test_invalid_rules_refused(mapping: dict[str, object], reason: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(mapping)
    assert reason in info.value.reason


RULES = parse_rules(
    {
        "example.com": "dane",
        ".example.com": "tls",
        ".eu.example.com": "verified",
        "corp.example": "verified",
    }
)

LOOKUPS = [
    # (rule, domain, expected key of the winning rule or None)
    ("exact_rule_applies", "example.com", "example.com"),
    ("exact_beats_suffix", "corp.example", "corp.example"),
    ("suffix_covers_a_subdomain", "mail.example.com", ".example.com"),
    ("suffix_covers_any_depth", "a.b.c.example.com", ".example.com"),
    ("longer_suffix_beats_shorter", "x.eu.example.com", ".eu.example.com"),
    ("suffix_does_not_cover_its_own_domain", "eu.example.com", ".example.com"),
    ("suffix_is_label_aligned", "notexample.com", None),
    ("exact_rule_does_not_cover_subdomains", "mail.corp.example", None),
    ("no_rule", "other.example", None),
    ("lookup_is_case_insensitive", "MAIL.Example.COM.", ".example.com"),
    ("invalid_domain_has_no_rule", "bad..example.com", None),
]


@pytest.mark.parametrize(
    ("domain", "expected"), [r[1:] for r in LOOKUPS], ids=[r[0] for r in LOOKUPS]
)
def test_floor_for(domain: str, expected: str | None) -> None:
    rule = floor_for(RULES, domain)
    assert (rule.pattern if rule else None) == expected


def test_most_specific_wins_whatever_the_order() -> None:
    for rules in (RULES, tuple(reversed(RULES))):
        rule = floor_for(rules, "x.eu.example.com")
        assert rule is not None
        assert rule.floor is Floor.VERIFIED


@given(st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=10), st.integers())))
def test_arbitrary_mappings_raise_only_local_rules_error(mapping: dict[str, object]) -> None:
    with contextlib.suppress(RuleError):
        rules = parse_rules(mapping)
        for rule in rules:
            assert floor_for(rules, rule.domain if not rule.suffix else "x." + rule.domain)
