"""MTA-STS records, policies and MX matching, as specifications (RFC 8461 §3.1, §3.2, §4.1)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.protocol.mtasts import (
    MAX_AGE_LIMIT,
    Mode,
    Policy,
    PolicyError,
    StsRecord,
    StsRecordError,
    lint_policy,
    lint_record,
    matches,
    parse_policy,
    parse_record,
    select_record,
)

# --------------------------------------------------------------------------- §3.1 record

VALID_RECORDS = [
    # (rule, record, id, extensions)
    ("minimal_record", "v=STSv1; id=20240501T000000", "20240501T000000", ()),
    ("no_space_after_semicolon", "v=STSv1;id=abc", "abc", ()),
    ("trailing_semicolon_allowed", "v=STSv1; id=abc;", "abc", ()),
    ("trailing_semicolon_with_spaces", "v=STSv1; id=abc ; ", "abc", ()),
    ("whitespace_before_semicolon_erratum_6285", "v=STSv1 ;id=abc", "abc", ()),
    ("tab_is_whitespace", "v=STSv1;\tid=abc", "abc", ()),
    ("id_of_32_characters", "v=STSv1; id=" + "a1" * 16, "a1" * 16, ()),
    (
        "extensions_kept_in_order",
        "v=STSv1; x=1; id=a; a.b-c_d=y",
        "a",
        (("x", "1"), ("a.b-c_d", "y")),
    ),
    ("uppercase_ID_is_an_extension_not_the_id", "v=STSv1; id=a; ID=b", "a", (("ID", "b"),)),
]


@pytest.mark.parametrize(
    ("text", "expected_id", "extensions"),
    [row[1:] for row in VALID_RECORDS],
    ids=[row[0] for row in VALID_RECORDS],
)
def test_record_accepted(
    text: str, expected_id: str, extensions: tuple[tuple[str, str], ...]
) -> None:
    record = parse_record(text)
    assert record.id == expected_id
    assert record.extensions == extensions


INVALID_RECORDS = [
    # (rule, record, fragment of the reason)
    ("empty_record", "", "begin with"),
    ("version_is_case_sensitive", "v=stsv1; id=abc", "begin with"),
    ("version_must_be_followed_by_semicolon", "v=STSv1 id=abc", "followed by ';'"),
    ("longer_version_is_another_version", "v=STSv10; id=abc", "followed by ';'"),
    ("only_the_version", "v=STSv1;", "no fields"),
    ("empty_field_between_semicolons", "v=STSv1;; id=abc", "empty field"),
    ("id_required", "v=STSv1; foo=bar", "no id"),
    ("id_name_is_case_sensitive", "v=STSv1; ID=abc", "case-sensitive"),
    ("id_at_most_32_characters", "v=STSv1; id=" + "a" * 33, "1 to 32"),
    ("id_letters_and_digits_only", "v=STSv1; id=abc-1", "1 to 32"),
    ("id_ascii_only", "v=STSv1; id=\u0661\u0662", "printable ASCII"),
    ("id_exactly_once", "v=STSv1; id=a; id=b", "2 id fields"),
    ("no_space_inside_a_value", "v=STSv1; id=a b", "printable ASCII"),
    ("field_must_be_name_equals_value", "v=STSv1; id=a; junk", "not name=value"),
    ("extension_value_without_equals_sign", "v=STSv1; id=a; x=b=c", "printable ASCII"),
    ("extension_value_not_empty", "v=STSv1; id=a; x=", "printable ASCII"),
    ("extension_name_at_most_32", "v=STSv1; id=a; " + "x" * 33 + "=1", "field name"),
    ("extension_name_starts_alphanumeric", "v=STSv1; id=a; _x=1", "field name"),
]


@pytest.mark.parametrize(
    ("text", "reason"),
    [row[1:] for row in INVALID_RECORDS],
    ids=[row[0] for row in INVALID_RECORDS],
)
def test_record_rejected(text: str, reason: str) -> None:
    with pytest.raises(StsRecordError) as info:
        parse_record(text)
    assert reason in info.value.reason


SELECT_NONE = [
    ("no_txt_records", []),
    ("only_unrelated_records", ["v=spf1 -all", "google-site-verification=x"]),
    ("version_must_come_first", ["id=abc; v=STSv1"]),
    ("version_without_semicolon_is_discarded", ["v=STSv1"]),
    ("leading_space_is_discarded", [" v=STSv1; id=abc"]),
]


@pytest.mark.parametrize("records", [r[1] for r in SELECT_NONE], ids=[r[0] for r in SELECT_NONE])
def test_select_record_finds_no_policy(records: list[str]) -> None:
    assert select_record(records) is None


def test_select_record_ignores_other_records() -> None:
    record = select_record(["v=spf1 -all", "v=STSv1; id=abc", "v=DMARC1; p=none"])
    assert record == StsRecord(id="abc")


SELECT_ERRORS = [
    ("more_than_one_candidate", ["v=STSv1; id=a", "v=STSv1; id=b"], "exactly one"),
    ("identical_duplicates_still_count_twice", ["v=STSv1; id=a", "v=STSv1; id=a"], "exactly one"),
    ("single_candidate_must_be_valid", ["v=STSv1; id=a-b"], "1 to 32"),
]


@pytest.mark.parametrize(
    ("records", "reason"), [r[1:] for r in SELECT_ERRORS], ids=[r[0] for r in SELECT_ERRORS]
)
def test_select_record_refuses(records: list[str], reason: str) -> None:
    with pytest.raises(StsRecordError) as info:
        select_record(records)
    assert reason in info.value.reason


def test_lint_record_explains_presentation_format() -> None:
    fields, errors, _ = lint_record('"v=STSv1; id=abc"')
    assert fields == {}
    assert "presentation format" in errors[0]


def test_lint_record_warns_about_extensions() -> None:
    fields, errors, warnings = lint_record("v=STSv1; id=abc; foo=bar")
    assert errors == []
    assert fields == {"id": "abc", "extensions": {"foo": "bar"}}
    assert any("'foo'" in w for w in warnings)


# --------------------------------------------------------------------------- §3.2 policy

GOOD = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 604800\n"


VALID_POLICIES = [
    # (rule, body, attribute, expected value)
    ("lf_line_endings", GOOD, "mode", Mode.ENFORCE),
    ("crlf_line_endings_erratum_6253", GOOD.replace("\n", "\r\n"), "max_age", 604800),
    (
        "mixed_line_endings",
        "version: STSv1\r\nmode: testing\nmx: a.example\r\nmax_age: 1",
        "mode",
        Mode.TESTING,
    ),
    ("final_line_terminator_optional", GOOD.rstrip("\n"), "mx", ("mx.example.com",)),
    (
        "no_space_after_colon",
        "version:STSv1\nmode:enforce\nmx:a.example\nmax_age:5\n",
        "max_age",
        5,
    ),
    (
        "tabs_and_spaces_after_colon",
        "version: \tSTSv1\nmode:\tenforce\nmx: a.example\nmax_age: 5\n",
        "mode",
        Mode.ENFORCE,
    ),
    (
        "trailing_whitespace_on_a_line",
        "version: STSv1 \nmode: enforce\t\nmx: a.example  \nmax_age: 5 \n",
        "mx",
        ("a.example",),
    ),
    (
        "every_mx_line_counts_in_order",
        GOOD + "mx: *.b.example\nmx: c.example\n",
        "mx",
        ("mx.example.com", "*.b.example", "c.example"),
    ),
    ("mode_none_needs_no_mx", "version: STSv1\nmode: none\nmax_age: 86400\n", "mx", ()),
    ("max_age_zero_is_digits", GOOD.replace("604800", "0"), "max_age", 0),
    ("max_age_ten_digits_with_leading_zeros", GOOD.replace("604800", "0000000042"), "max_age", 42),
    ("max_age_at_limit_kept", GOOD.replace("604800", str(MAX_AGE_LIMIT)), "max_age", MAX_AGE_LIMIT),
    (
        "max_age_above_limit_capped_erratum_7282",
        GOOD.replace("604800", "9999999999"),
        "max_age",
        MAX_AGE_LIMIT,
    ),
    ("mx_lower_cased", GOOD.replace("mx.example.com", "MX.Example.COM"), "mx", ("mx.example.com",)),
    (
        "mx_u_label_becomes_a_label",
        GOOD.replace("mx.example.com", "mx.bücher.example"),
        "mx",
        ("mx.xn--bcher-kva.example",),
    ),
    (
        "mx_trailing_dot_removed",
        GOOD.replace("mx.example.com", "mx.example.com."),
        "mx",
        ("mx.example.com",),
    ),
    (
        "mx_wildcard_over_single_label_domain_is_grammatical",
        GOOD.replace("mx.example.com", "*.com"),
        "mx",
        ("*.com",),
    ),
    ("repeated_mx_kept_once", GOOD + "mx: MX.example.com\n", "mx", ("mx.example.com",)),
    ("first_occurrence_wins_for_mode", GOOD + "mode: testing\n", "mode", Mode.ENFORCE),
    ("first_occurrence_wins_for_max_age", GOOD + "max_age: 1\n", "max_age", 604800),
    ("first_occurrence_wins_for_version", GOOD + "version: STSv2\n", "version", "STSv1"),
    (
        "unknown_fields_kept_in_order",
        "foo: 1\n" + GOOD + "bar: two words\nfoo: 3\n",
        "extensions",
        (("foo", "1"), ("bar", "two words"), ("foo", "3")),
    ),
    (
        "field_names_are_case_sensitive_so_Mode_is_unknown",
        GOOD + "Mode: testing\n",
        "extensions",
        (("Mode", "testing"),),
    ),
    (
        "extension_value_may_be_utf8",
        GOOD + "comment: grüße\n",
        "extensions",
        (("comment", "grüße"),),
    ),
    (
        "unicode_line_separator_is_not_a_line_end",
        GOOD + "note: a\u2028b\n",
        "extensions",
        (("note", "a\u2028b"),),
    ),
    ("blank_lines_skipped", "\n" + GOOD.replace("\n", "\n\n"), "mode", Mode.ENFORCE),
]


@pytest.mark.parametrize(
    ("body", "attribute", "expected"),
    [row[1:] for row in VALID_POLICIES],
    ids=[row[0] for row in VALID_POLICIES],
)
def test_policy_accepted(body: str, attribute: str, expected: object) -> None:
    assert getattr(parse_policy(body), attribute) == expected


WARNING_POLICIES = [
    # (rule, body, fragment of a warning)
    ("max_age_cap_is_reported", GOOD.replace("604800", "40000000"), "exceeds the maximum"),
    ("repeated_field_is_reported", GOOD + "mode: testing\n", "the first value (line 2)"),
    ("trailing_dot_is_reported", GOOD.replace("mx.example.com", "mx.example.com."), "trailing dot"),
    ("blank_line_is_reported", GOOD.replace("\n", "\n\n", 1), "line 2 is blank"),
    ("case_mistake_is_hinted", GOOD + "MAX_AGE: 5\n", "did you mean 'max_age'"),
]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [row[1:] for row in WARNING_POLICIES],
    ids=[row[0] for row in WARNING_POLICIES],
)
def test_policy_warning(body: str, fragment: str) -> None:
    policy = parse_policy(body)
    assert any(fragment in w for w in policy.warnings), policy.warnings


INVALID_POLICIES = [
    # (rule, body, fragment of an error)
    ("empty_body", "", "empty"),
    ("only_line_ends", "\r\n\n", "empty"),
    ("version_required", GOOD.replace("version: STSv1\n", ""), "'version' is missing"),
    ("version_exactly_STSv1", GOOD.replace("STSv1", "STSv2"), "exactly 'STSv1'"),
    ("version_value_case_sensitive", GOOD.replace("STSv1", "stsv1"), "exactly 'STSv1'"),
    ("mode_required", GOOD.replace("mode: enforce\n", ""), "'mode' is missing"),
    ("mode_values_exact", GOOD.replace("enforce", "Enforce"), "exactly 'enforce'"),
    ("mode_report_is_from_a_draft", GOOD.replace("enforce", "report"), "exactly 'enforce'"),
    ("mode_field_name_case_sensitive", GOOD.replace("mode:", "Mode:"), "'mode' is missing"),
    ("max_age_required", GOOD.replace("max_age: 604800\n", ""), "'max_age' is missing"),
    ("max_age_no_sign", GOOD.replace("604800", "+5"), "1 to 10 digits"),
    ("max_age_not_negative", GOOD.replace("604800", "-1"), "1 to 10 digits"),
    ("max_age_no_decimals", GOOD.replace("604800", "1.5"), "1 to 10 digits"),
    ("max_age_no_underscores", GOOD.replace("604800", "604_800"), "1 to 10 digits"),
    ("max_age_at_most_ten_digits", GOOD.replace("604800", "12345678901"), "1 to 10 digits"),
    ("max_age_ascii_digits_only", GOOD.replace("604800", "\u0663"), "1 to 10 digits"),
    (
        "mx_required_in_enforce",
        GOOD.replace("mx: mx.example.com\n", ""),
        "requires at least one 'mx'",
    ),
    (
        "mx_required_in_testing",
        GOOD.replace("mx: mx.example.com\n", "").replace("enforce", "testing"),
        "requires at least one 'mx'",
    ),
    ("no_whitespace_before_colon", GOOD.replace("mode:", "mode :"), "before ':'"),
    ("no_leading_whitespace", GOOD.replace("mode:", " mode:"), "starts with whitespace"),
    ("every_line_is_key_colon_value", GOOD + "just text\n", "not 'key: value'"),
    ("field_name_syntax", GOOD + "my key: x\n", "not a field name"),
    ("value_required", GOOD + "comment:\n", "has no value"),
    ("no_control_characters_in_values", GOOD + "comment: a\x00b\n", "control characters"),
    ("no_tab_inside_a_value", GOOD + "comment: a\tb\n", "control characters"),
    ("bare_cr_is_not_a_line_end", GOOD.replace("\n", "\r"), "control characters"),
    (
        "unicode_line_separator_does_not_split_fields",
        "version: STSv1\u2028mode: enforce\nmx: a.example\nmax_age: 5\n",
        "exactly 'STSv1'",
    ),
    ("mx_no_empty_label", GOOD.replace("mx.example.com", "mx..example.com"), "empty label"),
    ("mx_not_empty_after_wildcard", GOOD.replace("mx.example.com", "*."), "empty host name"),
    (
        "mx_wildcard_only_whole_left_label",
        GOOD.replace("mx.example.com", "mx*.example.com"),
        "whole left-most label",
    ),
    (
        "mx_wildcard_not_partial_left_label",
        GOOD.replace("mx.example.com", "*mx.example.com"),
        "whole left-most label",
    ),
    (
        "mx_wildcard_only_left_most",
        GOOD.replace("mx.example.com", "mail.*.example.com"),
        "whole left-most label",
    ),
    ("mx_wildcard_only_once", GOOD.replace("mx.example.com", "*.*.example.com"), "only once"),
    ("mx_bare_wildcard", GOOD.replace("mx.example.com", "*"), "whole left-most label"),
    (
        "mx_ldh_labels_only",
        GOOD.replace("mx.example.com", "mx_1.example.com"),
        "not a host name label",
    ),
    (
        "mx_no_leading_hyphen",
        GOOD.replace("mx.example.com", "-mx.example.com"),
        "not a host name label",
    ),
    (
        "mx_label_at_most_63",
        GOOD.replace("mx.example.com", "a" * 64 + ".example.com"),
        "not a host name label",
    ),
    ("mx_error_names_the_line", GOOD.replace("mx.example.com", "bad..name"), "line 3"),
]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [row[1:] for row in INVALID_POLICIES],
    ids=[row[0] for row in INVALID_POLICIES],
)
def test_policy_rejected(body: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(body)
    assert any(fragment in e for e in info.value.errors), info.value.errors
    assert info.value.reason == info.value.errors[0]


def test_policy_error_lists_every_problem() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("version: STSv2\nmode: enforced\nmax_age: x\n")
    assert [e.split(":")[0] for e in info.value.errors] == ["line 1", "line 2", "line 3"]


def test_policy_strings_are_the_lines_as_received() -> None:
    # RFC 8460 §4.4: policy-string carries the policy as published, not our normalised form.
    body = "version: STSv1\r\nmode: enforce\r\nmx: MX.Example.com.\r\n\r\nmax_age: 9999999999\n"
    assert parse_policy(body).policy_strings() == [
        "version: STSv1",
        "mode: enforce",
        "mx: MX.Example.com.",
        "max_age: 9999999999",
    ]


def test_policy_strings_of_a_constructed_policy_are_canonical() -> None:
    policy = Policy(version="STSv1", mode=Mode.TESTING, max_age=60, mx=("*.example.com",))
    assert policy.policy_strings() == [
        "version: STSv1",
        "mode: testing",
        "mx: *.example.com",
        "max_age: 60",
    ]


def test_to_text_reparses_to_the_same_policy() -> None:
    policy = parse_policy("foo: x y\n" + GOOD.replace("mx.example.com", "MX.bücher.example"))
    again = parse_policy(policy.to_text())
    assert again == policy
    assert again.to_text() == policy.to_text()


LINT_ADVICE = [
    ("short_max_age", GOOD.replace("604800", "3600"), "under one day"),
    ("wildcard_over_a_tld", GOOD.replace("mx.example.com", "*.com"), "top-level domain"),
    ("mode_none_with_mx", GOOD.replace("enforce", "none"), "withdraws"),
]


@pytest.mark.parametrize(
    ("body", "fragment"), [r[1:] for r in LINT_ADVICE], ids=[r[0] for r in LINT_ADVICE]
)
def test_lint_policy_advice(body: str, fragment: str) -> None:
    fields, errors, warnings = lint_policy(body)
    assert errors == []
    assert fields["version"] == "STSv1"
    assert any(fragment in w for w in warnings), warnings


def test_lint_policy_reports_partial_fields_and_errors() -> None:
    fields, errors, _ = lint_policy("version: STSv1\nmode: enforce\nmax_age: 60\n")
    assert fields["mode"] == "enforce"
    assert fields["max_age"] == 60
    assert any("mx" in e for e in errors)


TRAILING_DOTS = [
    # (rule, mx line as written, the pattern to write instead)
    ("host", "mx.example.com.", "mx.example.com"),
    ("wildcard", "*.example.com.", "*.example.com"),
    ("upper_case", "MX.Example.COM.", "MX.Example.COM"),
]


@pytest.mark.parametrize(
    ("written", "instead"), [r[1:] for r in TRAILING_DOTS], ids=[r[0] for r in TRAILING_DOTS]
)
def test_lint_policy_makes_a_trailing_dot_an_error(written: str, instead: str) -> None:
    # RFC 8461 §4.1 compares patterns with MX names without their trailing dot: many senders
    # take the pattern as written and then match no MX host. mxguard's own parser removes the
    # dot (sending is unchanged), but the linter must call the policy invalid, say why and
    # what to write.
    body = GOOD.replace("mx.example.com", written)
    fields, errors, warnings = lint_policy(body)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"line 3: mx {written!r} ends with a dot")
    assert "RFC 8461 §4.1" in errors[0] and "other senders" in errors[0]
    assert f"write 'mx: {instead}'" in errors[0]
    assert not any("trailing dot" in w for w in warnings), warnings  # said once, as an error
    assert fields["mx"] == [instead.lower()]
    assert fields["mode"] == "enforce"
    # The sender's side stays liberal: the same body parses, the dot removed, with a warning.
    policy = parse_policy(body)
    assert policy.mx == (instead.lower(),)
    assert policy.allows(instead.replace("*", "mx"))
    assert any("trailing dot" in w for w in policy.warnings)


def test_lint_policy_names_every_line_with_a_trailing_dot() -> None:
    body = GOOD + "mx: backup.example.net.\nmx: other.example.org\nmx: *.example.org.\n"
    _, errors, _ = lint_policy(body.replace("mx.example.com", "mx.example.com."))
    assert [e.split(":")[0] for e in errors] == ["line 3", "line 5", "line 7"]


# --------------------------------------------------------------------------- §4.1 matching

MATCHES = [
    # (rule, pattern, host, expected)
    ("exact_name", "mx.example.com", "mx.example.com", True),
    ("case_insensitive", "mx.example.com", "MX.Example.COM", True),
    ("host_trailing_dot_ignored", "mx.example.com", "mx.example.com.", True),
    ("pattern_trailing_dot_ignored", "mx.example.com.", "mx.example.com", True),
    ("exact_is_anchored_left", "mx.example.com", "xmx.example.com", False),
    ("exact_is_anchored_right", "mx.example.com", "mx.example.com.evil.test", False),
    ("exact_is_not_a_suffix_match", "example.com", "mx.example.com", False),
    ("wildcard_matches_exactly_one_label", "*.example.com", "mx.example.com", True),
    ("wildcard_does_not_match_zero_labels", "*.example.com", "example.com", False),
    ("wildcard_does_not_match_two_labels", "*.example.com", "a.b.example.com", False),
    ("wildcard_is_label_aligned", "*.example.com", "mxexample.com", False),
    ("wildcard_is_case_insensitive", "*.EXAMPLE.com", "Mx.example.COM", True),
    ("wildcard_with_host_trailing_dot", "*.example.com", "mx.example.com.", True),
    (
        "idna_u_label_host_matches_a_label_pattern",
        "mx.xn--bcher-kva.example",
        "mx.Bücher.example",
        True,
    ),
    (
        "idna_u_label_pattern_matches_a_label_host",
        "*.bücher.example",
        "mx.xn--bcher-kva.example",
        True,
    ),
    ("literal_star_host_is_not_a_name", "*.example.com", "*.example.com", False),
    ("empty_host_matches_nothing", "*.example.com", "", False),
    ("invalid_pattern_matches_nothing", "mx*.example.com", "mx1.example.com", False),
]


@pytest.mark.parametrize(
    ("pattern", "host", "expected"), [r[1:] for r in MATCHES], ids=[r[0] for r in MATCHES]
)
def test_matches(pattern: str, host: str, expected: bool) -> None:
    assert matches(pattern, host) is expected


def test_policy_allows_and_names_the_pattern() -> None:
    policy = parse_policy(GOOD + "mx: *.backup.example\n")
    assert policy.allows("mx.example.com")
    assert policy.matching_pattern("b1.backup.example") == "*.backup.example"
    assert not policy.allows("a.b1.backup.example")
    assert policy.matching_pattern("evil.test") is None


# --------------------------------------------------------------------------- properties

_label = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,8}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_pattern = st.one_of(_domain, _domain.map(lambda d: "*." + d))
_ext_key = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}", fullmatch=True).filter(
    lambda k: k not in ("version", "mode", "max_age", "mx")
)
_ext_value = (
    st.text(
        alphabet=st.characters(min_codepoint=0x20, blacklist_categories=("Cs", "Cc")), min_size=1
    )
    .map(lambda s: s.strip(" "))
    .filter(bool)
)

_policies = st.builds(
    Policy,
    version=st.just("STSv1"),
    mode=st.sampled_from(Mode),
    max_age=st.integers(0, MAX_AGE_LIMIT),
    mx=st.lists(_pattern, min_size=1, max_size=4, unique=True).map(tuple),
    extensions=st.lists(st.tuples(_ext_key, _ext_value), max_size=3).map(tuple),
)

_policy_lines = st.one_of(
    st.sampled_from(GOOD.splitlines()),
    _pattern.map(lambda p: "mx: " + p),
    st.tuples(_ext_key, _ext_value).map(lambda kv: f"{kv[0]}: {kv[1]}"),
    st.text(max_size=20),
)
_policy_texts = st.one_of(
    st.text(),
    st.tuples(st.lists(_policy_lines, max_size=8), st.sampled_from(["\n", "\r\n", "\r"])).map(
        lambda t: t[1].join(t[0])
    ),
)


@given(_policy_texts)
def test_parse_policy_raises_only_policy_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        assert exc.errors
    else:
        assert parse_policy(policy.to_text()) == policy


@given(st.binary())
def test_parse_policy_on_decoded_bytes_raises_only_policy_error(data: bytes) -> None:
    with contextlib.suppress(PolicyError):
        parse_policy(data.decode("utf-8", errors="replace"))


@given(_policies)
def test_serialised_policy_reparses_equal(policy: Policy) -> None:
    assert parse_policy(policy.to_text()) == policy


_record_texts = st.one_of(
    st.text(),
    st.lists(
        st.one_of(
            st.sampled_from(["v=STSv1", "id=abc", "id=", " ", ";", "x=y", "=", "id=a b"]),
            st.text(max_size=8),
        ),
        max_size=6,
    ).map(";".join),
)


@given(_record_texts)
def test_parse_record_raises_only_record_error(text: str) -> None:
    try:
        record = parse_record(text)
    except StsRecordError as exc:
        assert exc.reason
    else:
        assert parse_record(record.to_text()) == record


@given(st.lists(st.binary(max_size=40), max_size=4))
def test_select_record_raises_only_record_error(records: list[bytes]) -> None:
    with contextlib.suppress(StsRecordError):
        select_record([r.decode("utf-8", errors="replace") for r in records])


@given(_label, _domain)
def test_wildcard_matches_one_label_never_zero_or_two(label: str, domain: str) -> None:
    assert matches("*." + domain, f"{label}.{domain}")
    assert not matches("*." + domain, domain)
    assert not matches("*." + domain, f"{label}.{label}.{domain}")
