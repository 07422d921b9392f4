"""TLS-RPT `_smtp._tls` TXT records, as specifications (RFC 8460 §3)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.protocol.tlsrpt import (
    TlsRptRecord,
    TlsRptRecordError,
    lint_record,
    parse_record,
    select_record,
)

MAILTO = "mailto:tlsrpt@example.com"
HTTPS = "https://reports.example.com/tlsrpt"

VALID = [
    # (rule, record, rua, extensions)
    ("mailto_uri", f"v=TLSRPTv1; rua={MAILTO}", (MAILTO,), ()),
    ("https_uri", f"v=TLSRPTv1;rua={HTTPS}", (HTTPS,), ()),
    ("comma_list_in_order", f"v=TLSRPTv1; rua={HTTPS},{MAILTO}", (HTTPS, MAILTO), ()),
    ("whitespace_around_commas", f"v=TLSRPTv1; rua={MAILTO} ,\t{HTTPS}", (MAILTO, HTTPS), ()),
    ("trailing_semicolon", f"v=TLSRPTv1; rua={MAILTO};", (MAILTO,), ()),
    ("whitespace_before_semicolon", f"v=TLSRPTv1 ; rua={MAILTO}", (MAILTO,), ()),
    (
        "scheme_is_case_insensitive",
        "v=TLSRPTv1; rua=MAILTO:a@example.com",
        ("MAILTO:a@example.com",),
        (),
    ),
    (
        "mailto_with_query",
        "v=TLSRPTv1; rua=mailto:a@example.com?subject=x",
        ("mailto:a@example.com?subject=x",),
        (),
    ),
    (
        "mailto_percent_encoded_address",
        "v=TLSRPTv1; rua=mailto:a%2Bb@example.com",
        ("mailto:a%2Bb@example.com",),
        (),
    ),
    (
        "https_with_port_and_query",
        "v=TLSRPTv1; rua=https://r.example:8443/x?y=1",
        ("https://r.example:8443/x?y=1",),
        (),
    ),
    (
        "extension_fields_kept",
        f"v=TLSRPTv1; x-opt=1; rua={MAILTO}; z=2",
        (MAILTO,),
        (("x-opt", "1"), ("z", "2")),
    ),
    ("repeated_rua_fields_all_used", f"v=TLSRPTv1; rua={MAILTO}; rua={HTTPS}", (MAILTO, HTTPS), ()),
    (
        "quoted_local_part_may_hold_a_space",
        "v=TLSRPTv1; rua=mailto:%22a%20b%22@example.com",
        ("mailto:%22a%20b%22@example.com",),
        (),
    ),
    ("address_literal", "v=TLSRPTv1; rua=mailto:a@[192.0.2.1]", ("mailto:a@[192.0.2.1]",), ()),
]


@pytest.mark.parametrize(
    ("text", "rua", "extensions"), [r[1:] for r in VALID], ids=[r[0] for r in VALID]
)
def test_record_accepted(
    text: str, rua: tuple[str, ...], extensions: tuple[tuple[str, str], ...]
) -> None:
    record = parse_record(text)
    assert record.rua == rua
    assert record.extensions == extensions


INVALID = [
    # (rule, record, fragment of the reason)
    ("empty_record", "", "begin with"),
    ("version_is_case_sensitive", f"v=tlsrptv1; rua={MAILTO}", "begin with"),
    ("version_must_be_followed_by_semicolon", f"v=TLSRPTv1 rua={MAILTO}", "followed by ';'"),
    ("rua_required", "v=TLSRPTv1; x=1", "no rua"),
    ("rua_name_is_case_sensitive", f"v=TLSRPTv1; RUA={MAILTO}", "case-sensitive"),
    ("rua_not_empty", "v=TLSRPTv1; rua=", "empty value"),
    ("no_empty_entry_between_commas", f"v=TLSRPTv1; rua={MAILTO},,{HTTPS}", "empty entry"),
    ("no_trailing_comma", f"v=TLSRPTv1; rua={MAILTO},", "empty entry"),
    ("only_mailto_and_https", "v=TLSRPTv1; rua=http://r.example/x", "only mailto: and https:"),
    ("ftp_is_not_allowed", "v=TLSRPTv1; rua=ftp://r.example/x", "only mailto: and https:"),
    ("uri_needs_a_scheme", "v=TLSRPTv1; rua=tlsrpt@example.com", "no scheme"),
    ("mailto_needs_an_at_sign", "v=TLSRPTv1; rua=mailto:tlsrpt", "needs an address"),
    ("mailto_needs_a_local_part", "v=TLSRPTv1; rua=mailto:@example.com", "needs an address"),
    ("mailto_needs_a_domain", "v=TLSRPTv1; rua=mailto:a@", "needs an address"),
    ("mailto_domain_must_be_a_name", "v=TLSRPTv1; rua=mailto:a@exa_mple.com", "bad mail domain"),
    ("https_needs_a_host", "v=TLSRPTv1; rua=https:///path", "needs a host"),
    ("https_needs_an_authority", "v=TLSRPTv1; rua=https:r.example/x", "needs a host"),
    ("https_port_must_be_numeric", "v=TLSRPTv1; rua=https://r.example:x/", "malformed"),
    (
        "exclamation_point_must_be_encoded",
        "v=TLSRPTv1; rua=mailto:a@example.com!10m",
        "percent-encoded",
    ),
    ("no_spaces_inside_a_uri", "v=TLSRPTv1; rua=https://r.example/a b", "may not"),
    (
        "decoded_crlf_cannot_inject_headers",
        "v=TLSRPTv1; rua=mailto:a%0D%0ABcc:%20victim@evil.example%0D%0A@example.com",
        "control characters",
    ),
    ("decoded_nul_is_refused", "v=TLSRPTv1; rua=mailto:a%00b@example.com", "control characters"),
    ("decoded_address_has_one_at_sign", "v=TLSRPTv1; rua=mailto:a%40b@example.com", "dot-string"),
    ("decoded_space_outside_quotes", "v=TLSRPTv1; rua=mailto:a%20b@example.com", "dot-string"),
    ("no_angle_brackets", "v=TLSRPTv1; rua=mailto:a%3E%3Cb@example.com", "dot-string"),
    ("no_empty_dot_atom", "v=TLSRPTv1; rua=mailto:a..b@example.com", "dot-string"),
    ("address_literal_is_an_ip", "v=TLSRPTv1; rua=mailto:a@[evil]", "address literal"),
    ("percent_encoding_is_utf_8", "v=TLSRPTv1; rua=mailto:a%FF@example.com", "not UTF-8"),
    ("local_part_at_most_64_octets", f"v=TLSRPTv1; rua=mailto:{'a' * 65}@example.com", "too long"),
    ("extension_value_without_equals", f"v=TLSRPTv1; rua={MAILTO}; x=a=b", "printable ASCII"),
]


@pytest.mark.parametrize(("text", "reason"), [r[1:] for r in INVALID], ids=[r[0] for r in INVALID])
def test_record_rejected(text: str, reason: str) -> None:
    with pytest.raises(TlsRptRecordError) as info:
        parse_record(text)
    assert reason in info.value.reason


# A URI with characters it may not hold: the reason names the characters actually there (never
# "commas and '!'" for a URI that has neither) and says what to write instead.
BAD_CHARACTERS = [
    # (rule, rua, fragments of the reason, fragments it must not contain)
    (
        "placeholder_pasted_as_is",
        "mailto:tls@<your_domain>",
        ("'<' and '>' are not allowed", "replace the placeholder <your_domain> with your domain"),
        ("comma", "'!'"),
    ),
    (
        "other_placeholder",
        "mailto:<user>@example.com",
        ("'<' and '>' are not allowed", "replace the placeholder <user>"),
        ("comma", "'!'"),
    ),
    (
        "brace_placeholder",
        "mailto:tlsrpt@{domain}",
        ("'{' and '}' are not allowed", "replace the placeholder {domain} with your domain"),
        ("comma",),
    ),
    (
        "address_in_angle_brackets",
        "mailto:<tlsrpt@example.com>",
        ("'<' and '>' are not allowed", "without the angle brackets: mailto:tlsrpt@example.com"),
        ("placeholder",),
    ),
    (
        "uri_in_angle_brackets",
        "<mailto:tlsrpt@example.com>",
        ("'<' and '>' are not allowed", "without the angle brackets: mailto:tlsrpt@example.com"),
        ("placeholder",),
    ),
    ("stray_bracket", "mailto:tlsrpt@example.com>", ("'>' is not allowed", "%3E"), ("'<'",)),
    ("exclamation_point", "mailto:a!b@example.com", ("'!'", "%21", "RFC 8460 §3"), ("comma",)),
    ("space", "https://r.example/a b", ("a space", "%20"), ("comma", "'!'")),
    ("double_quote", 'mailto:"a"@example.com', ("'\"'", "%22"), ("comma", "'!'")),
    ("non_ascii", "mailto:tlsrpt@exämple.com", ("'ä'", "%C3%A4"), ("comma", "'!'")),
    ("several_listed_once_each", "https://r.example/a b!c d", ("a space and '!'",), ()),
]


@pytest.mark.parametrize(
    ("rua", "fragments", "absent"),
    [r[1:] for r in BAD_CHARACTERS],
    ids=[r[0] for r in BAD_CHARACTERS],
)
def test_bad_characters_in_a_uri_are_named(
    rua: str, fragments: tuple[str, ...], absent: tuple[str, ...]
) -> None:
    _, errors, _ = lint_record(f"v=TLSRPTv1; rua={rua}")
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0]
    for fragment in absent:
        assert fragment not in errors[0], errors[0]


SELECT_NONE = [
    ("no_records", []),
    ("only_other_records", ["v=spf1 -all", "v=STSv1; id=1"]),
    ("version_must_come_first", [f"rua={MAILTO}; v=TLSRPTv1"]),
    ("version_without_semicolon_discarded", ["v=TLSRPTv1"]),
]


@pytest.mark.parametrize("records", [r[1] for r in SELECT_NONE], ids=[r[0] for r in SELECT_NONE])
def test_select_record_finds_none(records: list[str]) -> None:
    assert select_record(records) is None


def test_select_record_picks_the_only_candidate() -> None:
    assert select_record(["v=spf1 -all", f"v=TLSRPTv1; rua={MAILTO}"]) == TlsRptRecord(
        rua=(MAILTO,)
    )


SELECT_ERRORS = [
    ("exactly_one_candidate", [f"v=TLSRPTv1; rua={MAILTO}", f"v=TLSRPTv1; rua={HTTPS}"], "one"),
    ("candidate_must_be_valid", ["v=TLSRPTv1; rua=ftp://x"], "mailto: and https:"),
]


@pytest.mark.parametrize(
    ("records", "reason"), [r[1:] for r in SELECT_ERRORS], ids=[r[0] for r in SELECT_ERRORS]
)
def test_select_record_refuses(records: list[str], reason: str) -> None:
    with pytest.raises(TlsRptRecordError) as info:
        select_record(records)
    assert reason in info.value.reason


def test_lint_warns_about_repeated_rua_and_extensions() -> None:
    fields, errors, warnings = lint_record(f"v=TLSRPTv1; rua={MAILTO}; rua={HTTPS}; x=1")
    assert errors == []
    assert fields == {"rua": [MAILTO, HTTPS], "extensions": {"x": "1"}}
    assert any("rua appears 2 times" in w for w in warnings)
    assert any("'x'" in w for w in warnings)


def test_lint_explains_presentation_format() -> None:
    _, errors, _ = lint_record(f'"v=TLSRPTv1; rua={MAILTO}"')
    assert "presentation format" in errors[0]


_texts = st.one_of(
    st.text(),
    st.lists(
        st.one_of(
            st.sampled_from(
                ["v=TLSRPTv1", "rua=", f"rua={MAILTO}", " , ", ",", HTTPS, "mailto:", "x=y"]
            ),
            st.text(max_size=10),
        ),
        max_size=6,
    ).map(";".join),
)


@given(_texts)
def test_parse_record_raises_only_its_error(text: str) -> None:
    try:
        record = parse_record(text)
    except TlsRptRecordError as exc:
        assert exc.reason
    else:
        assert parse_record(record.to_text()) == record


@given(st.lists(st.binary(max_size=60), max_size=3))
def test_select_record_on_decoded_bytes_raises_only_its_error(records: list[bytes]) -> None:
    with contextlib.suppress(TlsRptRecordError):
        select_record([r.decode("utf-8", errors="replace") for r in records])


MAILBOXES = [
    # (rule, uri, the address mail goes to, or None: no mail at all)
    ("plain", "mailto:tlsrpt@example.com", "tlsrpt@example.com"),
    ("percent_decoded", "mailto:a%2Bb@example.com", "a+b@example.com"),
    ("headers_in_the_uri_are_ignored", "mailto:a@example.com?bcc=x@evil.example", "a@example.com"),
    ("crlf_injection", "mailto:a%0D%0ABcc:%20victim@evil.example%0D%0A@example.com", None),
    ("lf_alone", "mailto:a%0ABcc:x@evil.example@example.com", None),
    ("not_mailto", "https://example.com/x", None),
]


@pytest.mark.parametrize(
    ("uri", "address"), [r[1:] for r in MAILBOXES], ids=[r[0] for r in MAILBOXES]
)
def test_report_mail_goes_only_to_a_valid_rfc5321_mailbox(uri: str, address: str | None) -> None:
    from mxguard.tlsrpt.reporter import mailto_address

    assert mailto_address(uri) == address


def test_atext_is_rfc5322_atext_plus_everything_beyond_ascii() -> None:
    """The local part's atext class is written as a negation (fast to compile); it must accept
    exactly RFC 5322 §3.2.3 atext and, for RFC 6531 §3.3, every code point beyond ASCII."""
    import re

    from mxguard.protocol import tlsrpt

    symbols = set("!#$%&'*+-/=?^_`{|}~")
    atext = re.compile(tlsrpt._ATEXT)
    for code in range(0x110000):
        c = chr(code)
        expected = code >= 0x80 or (c.isascii() and c.isalnum()) or c in symbols
        assert bool(atext.fullmatch(c)) == expected, f"U+{code:04X}"
