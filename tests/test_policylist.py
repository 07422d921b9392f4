"""The STARTTLS Everywhere policy list, as specifications (format of EFF's policy.json)."""

from __future__ import annotations

import contextlib
import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.protocol.mtasts import Mode
from mxguard.protocol.policylist import (
    PolicyList,
    PolicyListError,
    choose_list,
    parse_list,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# Written for these tests in the shape of EFF's list: an alias, a direct entry, suffix entries.
BASE: dict[str, Any] = {
    "timestamp": "2024-04-30T12:00:00.123456789-07:00",
    "expires": "2024-05-14T12:00:00Z",
    "version": "0.1",
    "author": "mxguard tests",
    "pinsets": {},
    "policy-aliases": {"bigmail": {"mode": "enforce", "mxs": [".mx.bigmail.example"]}},
    "policies": {
        "bigmail.example": {"policy-alias": "bigmail"},
        "alias-of-bigmail.example": {"policy-alias": "bigmail"},
        "small.example": {
            "mode": "testing",
            "mxs": ["mail.small.example", ".backup.example"],
            "report": ["mailto:tlsrpt@small.example"],
        },
    },
}


def doc(**changes: Any) -> str:
    """BASE with top-level keys replaced (None deletes the key), as JSON text."""
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data)


def with_policy(domain: str, policy: object) -> str:
    return doc(policies={**BASE["policies"], domain: policy})


def test_parses_eff_shaped_list() -> None:
    plist = parse_list(doc(), now=NOW)
    assert plist.timestamp == datetime(2024, 4, 30, 19, 0, 0, 123456, tzinfo=UTC)
    assert plist.expires == datetime(2024, 5, 14, 12, 0, tzinfo=UTC)
    small = plist.lookup("small.example")
    assert small is not None
    assert small.mode is Mode.TESTING
    assert small.mxs == ("mail.small.example", "*.backup.example")
    assert small.report == ("mailto:tlsrpt@small.example",)
    assert plist.lookup("alias-of-bigmail.example") == plist.lookup("bigmail.example")


TIMES = [
    # (rule, value, expected UTC time)
    ("unix_seconds", 1714564800, datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
    ("rfc3339_z", "2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
    ("rfc3339_lower_case_t_and_z", "2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ("rfc3339_offset", "2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
    (
        "rfc3339_nanoseconds_truncated",
        "2024-05-01T12:00:00.000001999Z",
        datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize(("value", "expected"), [r[1:] for r in TIMES], ids=[r[0] for r in TIMES])
def test_timestamp_formats(value: object, expected: datetime) -> None:
    assert parse_list(doc(timestamp=value), now=NOW).timestamp == expected


BAD_TIMES = [
    ("offset_required", "2024-05-01T12:00:00", "RFC 3339"),
    ("date_only_refused", "2024-05-01", "RFC 3339"),
    ("space_separator_refused", "2024-05-01 12:00:00Z", "RFC 3339"),
    ("impossible_date", "2024-02-30T12:00:00Z", "not a valid date"),
    ("negative_unix_seconds", -1, "must not be negative"),
    ("boolean_is_not_a_time", True, "Unix seconds or an RFC 3339"),
    ("float_is_not_a_time", 1.5, "Unix seconds or an RFC 3339"),
    ("absurd_unix_seconds", 10**20, "out of range"),
]


@pytest.mark.parametrize(
    ("value", "reason"), [r[1:] for r in BAD_TIMES], ids=[r[0] for r in BAD_TIMES]
)
def test_timestamp_refused(value: object, reason: str) -> None:
    with pytest.raises(PolicyListError) as info:
        parse_list(doc(timestamp=value), now=NOW)
    assert reason in info.value.reason


EXPIRY = [
    # (rule, now, accepted)
    ("before_expiry_accepted", datetime(2024, 5, 14, 11, 59, 59, tzinfo=UTC), True),
    ("at_expiry_refused", datetime(2024, 5, 14, 12, 0, tzinfo=UTC), False),
    ("after_expiry_refused", datetime(2024, 6, 1, tzinfo=UTC), False),
]


@pytest.mark.parametrize(("now", "accepted"), [r[1:] for r in EXPIRY], ids=[r[0] for r in EXPIRY])
def test_expired_list_refused(now: datetime, accepted: bool) -> None:
    if accepted:
        assert not parse_list(doc(), now=now).is_expired(now)
    else:
        with pytest.raises(PolicyListError, match="expired"):
            parse_list(doc(), now=now)


def test_is_expired_tells_the_engine_to_fall_back() -> None:
    plist = parse_list(doc(), now=NOW)
    assert not plist.is_expired(NOW)
    assert plist.is_expired(plist.expires)


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_list(doc(), now=datetime(2024, 5, 1))


LOOKUPS = [
    # (rule, domain, found)
    ("exact_domain", "small.example", True),
    ("case_insensitive", "SMALL.Example", True),
    ("trailing_dot_ignored", "small.example.", True),
    ("subdomain_not_covered", "lists.small.example", False),
    ("parent_not_covered", "example", False),
    ("unknown_domain", "other.example", False),
    ("invalid_name_is_not_found", "bad..name", False),
]


@pytest.mark.parametrize(("domain", "found"), [r[1:] for r in LOOKUPS], ids=[r[0] for r in LOOKUPS])
def test_lookup_is_exact(domain: str, found: bool) -> None:
    assert (parse_list(doc(), now=NOW).lookup(domain) is not None) is found


def test_lookup_of_u_label_domain() -> None:
    plist = parse_list(
        with_policy("bücher.example", {"mode": "enforce", "mxs": ["mx.b.example"]}), now=NOW
    )
    assert plist.lookup("xn--bcher-kva.example") is not None
    assert plist.lookup("BÜCHER.example") is not None


ALLOWS = [
    # (rule, domain, host, allowed)
    ("exact_mxs_entry", "small.example", "mail.small.example", True),
    ("exact_entry_is_anchored", "small.example", "xmail.small.example", False),
    ("leading_dot_matches_one_label", "small.example", "b1.backup.example", True),
    ("leading_dot_does_not_match_the_suffix_itself", "small.example", "backup.example", False),
    ("leading_dot_does_not_match_two_labels", "small.example", "a.b1.backup.example", False),
    ("alias_policy_applies", "bigmail.example", "in1.mx.bigmail.example", True),
    ("matching_is_case_insensitive", "bigmail.example", "IN1.MX.bigmail.example.", True),
]


@pytest.mark.parametrize(
    ("domain", "host", "allowed"), [r[1:] for r in ALLOWS], ids=[r[0] for r in ALLOWS]
)
def test_list_policy_allows(domain: str, host: str, allowed: bool) -> None:
    policy = parse_list(doc(), now=NOW).lookup(domain)
    assert policy is not None
    assert policy.allows(host) is allowed


INVALID = [
    # (rule, document, fragment of the reason)
    ("not_json", "{", "not valid JSON"),
    ("top_level_object_required", "[]", "JSON object"),
    ("timestamp_required", doc(timestamp=None), "'timestamp'"),
    ("expires_required", doc(expires=None), "'expires'"),
    ("policies_required", doc(policies=None), "'policies'"),
    ("expires_after_timestamp", doc(expires="2024-04-01T00:00:00Z"), "not after timestamp"),
    ("policies_is_an_object", doc(policies=[]), "policies must be an object"),
    ("aliases_is_an_object", doc(policy_aliases=[]), "policy-aliases must be an object"),
    ("unknown_alias", with_policy("x.example", {"policy-alias": "nope"}), "not in policy-aliases"),
    (
        "mode_enforce_or_testing",
        with_policy("x.example", {"mode": "none", "mxs": ["a.example"]}),
        "'enforce' or 'testing'",
    ),
    ("mode_required", with_policy("x.example", {"mxs": ["a.example"]}), "'enforce' or 'testing'"),
    ("mxs_required", with_policy("x.example", {"mode": "enforce"}), "non-empty list"),
    ("mxs_not_empty", with_policy("x.example", {"mode": "enforce", "mxs": []}), "non-empty list"),
    (
        "mxs_entries_are_strings",
        with_policy("x.example", {"mode": "enforce", "mxs": [1]}),
        "not a string",
    ),
    (
        "mxs_no_star_wildcards",
        with_policy("x.example", {"mode": "enforce", "mxs": ["*.a.example"]}),
        "not with '*'",
    ),
    (
        "mxs_valid_names",
        with_policy("x.example", {"mode": "enforce", "mxs": ["a..example"]}),
        "empty label",
    ),
    ("mxs_lone_dot", with_policy("x.example", {"mode": "enforce", "mxs": ["."]}), "invalid"),
    ("policy_is_an_object", with_policy("x.example", "enforce"), "must be an object"),
    (
        "domain_is_a_name",
        with_policy("bad_domain.example", {"mode": "enforce", "mxs": ["a.example"]}),
        "not a mail domain",
    ),
    (
        "domain_listed_once_after_normalising",
        with_policy("SMALL.example", {"mode": "enforce", "mxs": ["a.example"]}),
        "listed twice",
    ),
    (
        "report_is_a_list_of_strings",
        with_policy("x.example", {"mode": "enforce", "mxs": ["a.example"], "report": "x"}),
        "report",
    ),
    ("duplicate_json_keys_refused", '{"timestamp": 1, "timestamp": 2}', "appears twice"),
]


@pytest.mark.parametrize(("data", "reason"), [r[1:] for r in INVALID], ids=[r[0] for r in INVALID])
def test_invalid_list_refused(data: str, reason: str) -> None:
    with pytest.raises(PolicyListError) as info:
        parse_list(data, now=NOW)
    assert reason in info.value.reason


def test_bytes_must_be_utf8() -> None:
    with pytest.raises(PolicyListError, match="not UTF-8"):
        parse_list(b'{"timestamp": "\xff"}', now=NOW)


def test_bytes_accepted() -> None:
    assert parse_list(doc().encode(), now=NOW).lookup("small.example") is not None


def _list_at(timestamp: datetime) -> PolicyList:
    return parse_list(
        doc(timestamp=timestamp.isoformat(), expires=(timestamp + timedelta(days=14)).isoformat()),
        now=NOW,
    )


CHOICES = [
    # (rule, current timestamp or None, candidate timestamp, accepted)
    ("first_list_accepted", None, NOW - timedelta(days=1), True),
    ("newer_list_accepted", NOW - timedelta(days=2), NOW - timedelta(days=1), True),
    ("same_timestamp_accepted", NOW - timedelta(days=1), NOW - timedelta(days=1), True),
    ("older_list_refused_no_rollback", NOW - timedelta(days=1), NOW - timedelta(days=2), False),
]


@pytest.mark.parametrize(
    ("current", "candidate", "accepted"), [r[1:] for r in CHOICES], ids=[r[0] for r in CHOICES]
)
def test_choose_list(current: datetime | None, candidate: datetime, accepted: bool) -> None:
    cur = _list_at(current) if current else None
    cand = _list_at(candidate)
    if accepted:
        assert choose_list(cur, cand, NOW) is cand
    else:
        with pytest.raises(PolicyListError, match="older than the list in use"):
            choose_list(cur, cand, NOW)


def test_choose_list_refuses_an_expired_candidate() -> None:
    cand = _list_at(NOW - timedelta(days=1))
    with pytest.raises(PolicyListError, match="expired"):
        choose_list(None, cand, cand.expires + timedelta(seconds=1))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.binary())
def test_arbitrary_bytes_raise_only_policy_list_error(data: bytes) -> None:
    with contextlib.suppress(PolicyListError):
        parse_list(data, now=NOW)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "timestamp": st.one_of(st.integers(), st.text(max_size=30), _json_values),
            "expires": st.one_of(st.integers(), st.just("2030-01-01T00:00:00Z"), _json_values),
            "policy-aliases": st.dictionaries(st.text(max_size=5), _json_values, max_size=2),
            "policies": st.dictionaries(
                st.text(max_size=15),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "mode": st.sampled_from(["enforce", "testing", "none", 1]),
                        "mxs": st.lists(st.text(max_size=15), max_size=3),
                        "policy-alias": st.text(max_size=5),
                        "report": _json_values,
                    },
                ),
                max_size=3,
            ),
        },
    )
)
def test_structured_garbage_raises_only_policy_list_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(PolicyListError):
        parse_list(json.dumps(data), now=NOW)
