"""Host names, as specifications: one normaliser, one pattern form, one matcher.

IDNA 2008 with UTS #46 mapping (RFC 5890, RFC 5891), the host name rules (RFC 1035 §2.3.4,
RFC 5321 §4.1.2), MTA-STS patterns (RFC 8461 §3.2) and identifier matching (RFC 6125 §6.4,
RFC 8461 §4.1). Each row is one rule and is named after it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.adapters.https import policy_host
from mxguard.engine.resolve import normalise_domain
from mxguard.protocol import localrules, mtasts, pkix, policylist
from mxguard.protocol.names import (
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    HostNameError,
    Rule,
    dns_name,
    identifier_matches,
    normalise_host,
    normalise_pattern,
)

LABEL_63 = "a" * MAX_LABEL_LENGTH
NAME_253 = ".".join([LABEL_63] * 3 + ["b" * 61])  # 3 * 64 + 61 = 253 characters
assert len(NAME_253) == MAX_NAME_LENGTH

# --------------------------------------------------------------------------- normalise_host

VALID = [
    # (rule, name, normalised)
    ("ascii_is_lower_cased", "MX.Example.COM", "mx.example.com"),
    ("one_trailing_dot_is_removed", "mx.example.com.", "mx.example.com"),
    ("a_labels_are_kept", "mx.xn--bcher-kva.example", "mx.xn--bcher-kva.example"),
    ("a_labels_are_lower_cased", "MX.XN--BCHER-KVA.example", "mx.xn--bcher-kva.example"),
    # RFC 5891 §5.5: every U-label is converted to its A-label.
    ("u_labels_become_a_labels", "mx.bücher.example", "mx.xn--bcher-kva.example"),
    ("uts46_maps_case_first", "MX.BÜCHER.example", "mx.xn--bcher-kva.example"),
    ("uts46_maps_full_width_letters", "ＭＸ.example", "mx.example"),
    ("uts46_maps_ideographic_full_stops", "mx。bücher。example", "mx.xn--bcher-kva.example"),
    ("u_label_name_loses_its_trailing_dot", "mx.bücher.example.", "mx.xn--bcher-kva.example"),
    # RFC 5891 (IDNA 2008, UTS #46 non-transitional): "ß" is a letter of its own, not "ss" as
    # in IDNA 2003. dane and pkix used the IDNA 2003 codec before and now get this too.
    ("idna_2008_keeps_sharp_s", "mx.straße.example", "mx.xn--strae-oqa.example"),
    ("digits_and_inner_hyphens_are_ldh", "mx-1.0example.com", "mx-1.0example.com"),
    ("ascii_labels_are_not_decoded", "ab--cd.xn--zz.example", "ab--cd.xn--zz.example"),
    ("single_label_is_a_host_name", "localhost", "localhost"),
    ("label_of_63_characters", LABEL_63 + ".example", LABEL_63 + ".example"),
    ("name_of_253_characters", NAME_253, NAME_253),
]


@pytest.mark.parametrize(("name", "expected"), [r[1:] for r in VALID], ids=[r[0] for r in VALID])
def test_normalise_host(name: str, expected: str) -> None:
    assert normalise_host(name) == expected
    assert normalise_host(expected) == expected  # idempotent


INVALID = [
    # (rule, name, the rule that fails, words of the message)
    ("empty_name", "", Rule.EMPTY, "empty host name"),
    ("lone_dot_is_empty", ".", Rule.EMPTY, "empty host name"),
    ("second_trailing_dot_is_an_empty_label", "mx.example..", Rule.EMPTY_LABEL, "empty label"),
    ("no_empty_label_inside", "mx..example", Rule.EMPTY_LABEL, "empty label"),
    ("no_leading_dot", ".example", Rule.EMPTY_LABEL, "empty label"),
    # RFC 1035 §2.3.4: 63 octets per label, 255 per name on the wire (253 in text).
    ("label_at_most_63", "a" * 64 + ".example", Rule.LABEL_LENGTH, "limit is 63"),
    ("name_at_most_253", "c." + NAME_253, Rule.NAME_LENGTH, "limit is 253"),
    # RFC 5321 §4.1.2: letters, digits and inner hyphens.
    ("ldh_no_underscore", "mx_1.example", Rule.LDH, "not a host name label"),
    ("ldh_no_leading_hyphen", "-mx.example", Rule.LDH, "not a host name label"),
    ("ldh_no_trailing_hyphen", "mx-.example", Rule.LDH, "not a host name label"),
    ("ldh_no_space", "exa mple.com", Rule.LDH, "not a host name label"),
    ("ldh_no_surrounding_whitespace", " mx.example ", Rule.LDH, "not a host name label"),
    ("ldh_no_nul", "mx\x00.example", Rule.LDH, "not a host name label"),
    ("ldh_no_wildcard_in_a_host", "*.example.com", Rule.LDH, "not a host name label"),
    ("ldh_no_port", "mx.example:25", Rule.LDH, "not a host name label"),
    # RFC 5891 §5.4: IDNA 2008 refuses what IDNA 2003 mapped or allowed.
    ("idna_2008_disallows_symbols", "☃.example", Rule.IDNA, "IDNA 2008"),
    ("idna_u_label_hyphens_3_and_4", "ab--cü.example", Rule.IDNA, "IDNA 2008"),
    ("idna_joiner_needs_context", "a\u200d.example", Rule.IDNA, "IDNA 2008"),
    ("idna_label_at_most_63", "é" * 64 + ".example", Rule.IDNA, "IDNA 2008"),
    ("idna_no_lone_surrogates", "\ud800.example", Rule.IDNA, "IDNA 2008"),
]


@pytest.mark.parametrize(
    ("name", "rule", "words"), [r[1:] for r in INVALID], ids=[r[0] for r in INVALID]
)
def test_normalise_host_refuses(name: str, rule: Rule, words: str) -> None:
    with pytest.raises(HostNameError, match=words) as caught:
        normalise_host(name)
    assert caught.value.rule is rule
    assert isinstance(caught.value, ValueError) and caught.value.reason == str(caught.value)


# --------------------------------------------------------------------------- normalise_pattern

PATTERNS = [
    # (rule, pattern, normalised)  RFC 8461 §3.2: ["*."] Domain
    ("host_is_a_pattern", "MX.Example.com", "mx.example.com"),
    ("wildcard_is_the_whole_left_most_label", "*.Example.COM.", "*.example.com"),
    ("wildcard_over_u_labels", "*.bücher.example", "*.xn--bcher-kva.example"),
    ("wildcard_over_a_single_label_is_grammatical", "*.com", "*.com"),
]


@pytest.mark.parametrize(
    ("pattern", "expected"), [r[1:] for r in PATTERNS], ids=[r[0] for r in PATTERNS]
)
def test_normalise_pattern(pattern: str, expected: str) -> None:
    assert normalise_pattern(pattern) == expected


BAD_PATTERNS = [
    # (rule, pattern, the rule that fails, words of the message)
    ("wildcard_only_once", "*.*.example.com", Rule.WILDCARD, "only once"),
    ("wildcard_never_partial", "mx*.example.com", Rule.WILDCARD, "whole left-most label"),
    ("wildcard_never_a_label_prefix", "*mx.example.com", Rule.WILDCARD, "whole left-most label"),
    ("wildcard_only_left_most", "mail.*.example.com", Rule.WILDCARD, "whole left-most label"),
    ("bare_star_is_no_pattern", "*", Rule.WILDCARD, "whole left-most label"),
    ("wildcard_needs_a_domain", "*.", Rule.EMPTY, "empty host name"),
    ("pattern_domain_is_a_host_name", "*.a..example", Rule.EMPTY_LABEL, "'\\*.a..example'"),
    ("pattern_host_is_a_host_name", "mx_1.example", Rule.LDH, "'mx_1.example'"),
]


@pytest.mark.parametrize(
    ("pattern", "rule", "words"), [r[1:] for r in BAD_PATTERNS], ids=[r[0] for r in BAD_PATTERNS]
)
def test_normalise_pattern_refuses(pattern: str, rule: Rule, words: str) -> None:
    with pytest.raises(HostNameError, match=words) as caught:
        normalise_pattern(pattern)
    assert caught.value.rule is rule


# --------------------------------------------------------------------------- identifier_matches

MATCHES = [
    # (rule, presented identifier, reference identifier, expected)  RFC 6125 §6.4
    ("exact_name", "mx.example.com", "mx.example.com", True),
    ("case_insensitive", "MX.Example.COM", "mx.EXAMPLE.com", True),
    ("trailing_dots_ignored", "mx.example.com.", "mx.example.com.", True),
    ("anchored_left", "mx.example.com", "xmx.example.com", False),
    ("anchored_right", "mx.example.com", "mx.example.com.evil.test", False),
    ("no_suffix_match", "example.com", "mx.example.com", False),
    ("sibling_does_not_match", "mx2.example.com", "mx.example.com", False),
    # RFC 6125 §6.4.3: the wildcard is one whole left-most label.
    ("wildcard_covers_exactly_one_label", "*.example.com", "mx.example.com", True),
    ("wildcard_never_covers_zero_labels", "*.example.com", "example.com", False),
    ("wildcard_never_covers_two_labels", "*.example.com", "a.mx.example.com", False),
    ("wildcard_is_label_aligned", "*.example.com", "mxexample.com", False),
    ("partial_wildcard_matches_nothing", "m*.example.com", "mx.example.com", False),
    ("inner_wildcard_matches_nothing", "mx.*.com", "mx.example.com", False),
    ("certificate_wildcard_not_over_a_top_level_label", "*.com", "example.com", False),
    ("reference_is_never_a_pattern", "*.example.com", "*.example.com", False),
    ("invalid_presented_matches_nothing", "mx_1.example.com", "mx_1.example.com", False),
    ("invalid_reference_matches_nothing", "*.example.com", "mx..example.com", False),
    ("empty_reference_matches_nothing", "*.example.com", "", False),
    # RFC 6125 §6.4.2: a U-label reference is compared as its A-label.
    ("u_label_reference_matches_a_label", "mx.xn--bcher-kva.example", "mx.Bücher.example", True),
    ("u_label_wildcard_base", "*.xn--bcher-kva.example", "mx.bücher.example", True),
    # RFC 5891: IDNA 2008 (dane and pkix used IDNA 2003 before, which turned "ß" into "ss").
    (
        "idna_2008_sharp_s_matches_its_a_label",
        "mx.xn--strae-oqa.example",
        "mx.straße.example",
        True,
    ),
    ("idna_2003_form_of_sharp_s_does_not_match", "mx.strasse.example", "mx.straße.example", False),
]


@pytest.mark.parametrize(
    ("presented", "reference", "expected"), [r[1:] for r in MATCHES], ids=[r[0] for r in MATCHES]
)
def test_identifier_matches(presented: str, reference: str, expected: bool) -> None:
    assert identifier_matches(presented, reference) is expected


TLD_WILDCARD = [
    # (rule, pattern, host, expected)  RFC 8461 §3.2 makes "*.com" a pattern, §4.1 matches it
    ("mta_sts_wildcard_over_a_top_level_label", "*.com", "example.com", True),
    ("mta_sts_tld_wildcard_still_one_label", "*.com", "a.example.com", False),
    ("mta_sts_tld_wildcard_not_the_label_itself", "*.com", "com", False),
]


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [r[1:] for r in TLD_WILDCARD],
    ids=[r[0] for r in TLD_WILDCARD],
)
def test_mta_sts_patterns_may_cover_a_top_level_label(
    pattern: str, host: str, expected: bool
) -> None:
    assert identifier_matches(pattern, host, tld_wildcard=True) is expected
    assert mtasts.matches(pattern, host) is expected


# --------------------------------------------------------------------------- dns_name

DNS_NAMES = [
    # (rule, name, query form)
    ("dns_name_lower_cases_ascii", "_MTA-STS.Example.COM", "_mta-sts.example.com"),
    ("dns_name_drops_the_root_dot", "_25._tcp.mx.example.", "_25._tcp.mx.example"),
    ("dns_name_keeps_non_ldh_labels", "_25._tcp.mx.example", "_25._tcp.mx.example"),
    (
        "dns_name_a_labels_for_u_labels",
        "_25._tcp.mx.Bücher.example",
        "_25._tcp.mx.xn--bcher-kva.example",
    ),
    ("dns_name_idna_2008_sharp_s", "_mta-sts.straße.example", "_mta-sts.xn--strae-oqa.example"),
]


@pytest.mark.parametrize(
    ("name", "expected"), [r[1:] for r in DNS_NAMES], ids=[r[0] for r in DNS_NAMES]
)
def test_dns_name(name: str, expected: str) -> None:
    assert dns_name(name) == expected


def test_dns_name_refuses_a_u_label_without_a_label() -> None:
    with pytest.raises(HostNameError) as caught:
        dns_name("_25._tcp.☃.example")
    assert caught.value.rule is Rule.IDNA


# --------------------------------------------------------------------------- one form everywhere

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _policy_list_key(name: str) -> str:
    data = {
        "timestamp": 0,
        "expires": 2**31,
        "policies": {name: {"mode": "enforce", "mxs": ["mx.example"]}},
    }
    return next(iter(policylist.parse_list(json.dumps(data), now=NOW).policies))


def _policy_mx(name: str) -> str:
    text = f"version: STSv1\nmode: enforce\nmx: {name}\nmax_age: 86400\n"
    return mtasts.parse_policy(text).mx[0]


CALLERS: list[tuple[str, Callable[[str], str | None]]] = [
    ("mtasts_policy_mx_pattern", _policy_mx),
    ("engine_normalise_domain", normalise_domain),
    ("pkix_reference_name", pkix.reference_name),
    ("https_policy_host", lambda name: policy_host(name).removeprefix("mta-sts.")),
    ("localrules_rule_domain", lambda name: localrules.parse_rules({name: "tls"})[0].domain),
    ("policylist_domain_key", _policy_list_key),
    ("dns_query_name", dns_name),
]


@pytest.mark.parametrize("normalise", [c[1] for c in CALLERS], ids=[c[0] for c in CALLERS])
def test_every_caller_gets_idna_2008(normalise: Callable[[str], str | None]) -> None:
    # RFC 5891: one IDNA everywhere, so a name means the same host in every part of mxguard.
    assert normalise("MX.Straße.example.") == "mx.xn--strae-oqa.example"


# --------------------------------------------------------------------------- properties


@given(st.text(max_size=80))
def test_normalise_host_raises_only_host_name_error_and_is_idempotent(name: str) -> None:
    try:
        result = normalise_host(name)
    except HostNameError as exc:
        assert exc.reason and exc.rule in Rule
    else:
        assert result.isascii() and result == result.lower() and not result.endswith(".")
        assert normalise_host(result) == result


_label = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,8}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=2, max_size=4).map(".".join)


@given(_label, _domain)
def test_a_wildcard_covers_one_label_never_zero_or_two(label: str, domain: str) -> None:
    assert identifier_matches("*." + domain, f"{label}.{domain}")
    assert not identifier_matches("*." + domain, domain)
    assert not identifier_matches("*." + domain, f"{label}.{label}.{domain}")


@given(st.text(max_size=40), st.text(max_size=40))
def test_identifier_matches_never_raises(presented: str, reference: str) -> None:
    assert identifier_matches(presented, reference) in (True, False)
