"""TLS-RPT DNS records: where a domain wants its TLS reports sent (RFC 8460 §3).

A domain publishes `_smtp._tls.<domain>` TXT `v=TLSRPTv1; rua=<uri>[,<uri>...]`. This module
parses and validates that record; building and sending the reports (§4, §5) lives elsewhere.

The record grammar is the one of MTA-STS records (RFC 8461 §3.1, shared via
`txtfields.split_fields`): the version first, fields separated by `*WSP ";" *WSP`, an optional
trailing `;`. Decisions:

- `select_record` returns None when no TXT record begins with `v=TLSRPTv1;` and raises
  `TlsRptRecordError` when several do or the single one is malformed (§3: both mean the domain
  does not implement TLS-RPT, but the reason is worth showing).
- The grammar allows `rua` more than once (`1*(field-delim tlsrpt-field)`); mxguard then uses
  every URI, in order, and `lint_record` warns.
- Each URI is checked: `mailto:` needs, once percent-decoded, one RFC 5321 §4.1.2 mailbox
  (`mailbox_of`): a dot-string local part (or a quoted string of printable characters), one
  `@`, a host name or address literal, no control characters or spaces (a decoded CR LF
  would otherwise write headers into the report e-mail); `https:` needs a host. Other
  schemes are errors (§3: only these two are defined). Commas and `!` inside a URI must be
  percent-encoded (§3), which the comma split enforces naturally. A URI with characters no URI
  may hold is refused with those characters named, and a template placeholder pasted as it is
  (`mailto:tlsrpt@<your_domain>`) is called one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from mxguard.protocol import names
from mxguard.protocol.txtfields import (
    begins_with,
    case_hint,
    presentation_format_error,
    split_fields,
)

TLSRPT_VERSION = "TLSRPTv1"
# RFC 3986 §2: the characters a URI may contain, minus "," and "!" (RFC 8460 §3 requires them
# percent-encoded) and ";" (the record's field separator).
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@$&'()*+=%]+")


class TlsRptRecordError(ValueError):
    """The `_smtp._tls` TXT record violates RFC 8460 §3; `.reason` says which rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A parsed TLS-RPT record: report URIs in order, and extension fields in order."""

    rua: tuple[str, ...]
    extensions: tuple[tuple[str, str], ...] = ()

    def to_text(self) -> str:
        fields = [f"rua={','.join(self.rua)}", *(f"{k}={v}" for k, v in self.extensions)]
        return "; ".join([f"v={TLSRPT_VERSION}", *fields])


# RFC 5321 §4.1.2 Dot-string: atext (RFC 5322 §3.2.3) with single inner dots; RFC 6531 §3.3
# adds UTF-8 beyond ASCII. Quoted-string: printable ASCII (qtextSMTP, or a quoted-pair).
# atext is printable ASCII but for the specials ()<>[]:;@\,." -- written as what it is not,
# with everything beyond ASCII allowed: the same set as listing the symbols and adding
# \u0080-\U0010ffff, which takes `re` 11 ms to compile at every start of every command.
_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1 (octets)
MAX_MAILBOX = 254  # RFC 5321 §4.5.3.1.3 path limit (256) minus the angle brackets


def mailbox_of(uri: str) -> str:
    """The mailbox a `mailto:` rua names, percent-decoded and checked against RFC 5321
    §4.1.2; TlsRptRecordError says what is wrong. The `?` part (RFC 6068 headers) is ignored:
    a report goes to the address, never with headers the record chose."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != "mailto":
        raise TlsRptRecordError(f"rua URI {uri!r} is not a mailto: URI")
    try:
        address = unquote(rest.partition("?")[0], errors="strict")
    except UnicodeDecodeError:
        raise TlsRptRecordError(
            f"rua URI {uri!r}: the percent-encoded address is not UTF-8"
        ) from None
    # A decoded CR LF would end the address and start a header in the report e-mail.
    controls = [c for c in address if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0]
    if controls:
        raise TlsRptRecordError(
            f"rua URI {uri!r}: the address contains control characters "
            f"({''.join(controls)!r}); RFC 5321 §4.1.2 allows none"
        )
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise TlsRptRecordError(
            f"rua URI {uri!r}: a mailto: URI needs an address like mailto:tlsrpt@example.com"
        )
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise TlsRptRecordError(
            f"rua URI {uri!r}: local part {local!r} is not an RFC 5321 §4.1.2 dot-string or "
            "quoted string (one '@' only; no spaces, brackets or commas outside quotes)"
        )
    if len(local.encode()) > MAX_LOCAL_PART or len(address.encode()) > MAX_MAILBOX:
        raise TlsRptRecordError(
            f"rua URI {uri!r}: the address is too long (RFC 5321 §4.5.3.1: local part at most "
            f"{MAX_LOCAL_PART} octets, the whole address at most {MAX_MAILBOX})"
        )
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            # RFC 5321 §4.1.3: IPv4 dotted quad, or "IPv6:" and an IPv6 address.
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise TlsRptRecordError(
                f"rua URI {uri!r}: bad address literal {domain!r}; use [192.0.2.1] or "
                "[IPv6:2001:db8::1] (RFC 5321 §4.1.3)"
            ) from None
    else:
        try:
            names.normalise_host(domain)
        except names.HostNameError as exc:
            raise TlsRptRecordError(f"rua URI {uri!r}: bad mail domain: {exc}") from None
    return address


# Template placeholders pasted as they are: `<your_domain>`, `{domain}`.
_PLACEHOLDER = re.compile(r"<[^<>]*>|\{[^{}]*\}")
_BRACKETS = "<>{}"


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _shown(char: str) -> str:
    return {" ": "a space", "\t": "a tab"}.get(char, repr(char))


def _bad_characters(uri: str) -> str:
    """What is wrong with a URI holding characters outside `_URI_CHARS`: which ones it holds
    and what to write instead."""
    bad = list(dict.fromkeys(c for c in uri if not _URI_CHARS.fullmatch(c)))
    problems = []
    brackets = [c for c in bad if c in _BRACKETS]
    if brackets:
        placeholders = list(dict.fromkeys(_PLACEHOLDER.findall(uri)))
        if uri.startswith("<") and uri.endswith(">") and not _PLACEHOLDER.search(uri[1:-1]):
            advice = f"write the URI without the angle brackets: {uri[1:-1]}"
        elif len(placeholders) == 1 and "@" in placeholders[0]:
            bare = uri.replace(placeholders[0], placeholders[0][1:-1])
            advice = f"write the address without the angle brackets: {bare}"
        elif placeholders:
            replace = [
                f"{p} with {'your domain' if 'domain' in p.lower() else 'the real value'}"
                for p in placeholders
            ]
            plural = "s" if len(placeholders) > 1 else ""
            advice = f"replace the placeholder{plural} {_listed(replace)}"
        else:
            encoded = ", ".join(f"{c!r} as {quote(c, safe='')}" for c in brackets)
            advice = (
                f"remove {'it' if len(brackets) == 1 else 'them'} (or percent-encode: {encoded})"
            )
        verb = "is" if len(brackets) == 1 else "are"
        problems.append(
            f"{_listed([repr(c) for c in brackets])} {verb} not allowed in a rua URI: {advice}"
        )
    others = [c for c in bad if c not in _BRACKETS]
    if others:
        encoded = ", ".join(f"{_shown(c)} as {quote(c, safe='')}" for c in others)
        # RFC 3986 §2 allows '!' (a sub-delim); RFC 8460 §3 requires it percent-encoded.
        rule = "RFC 8460 §3" if others == ["!"] else "RFC 3986 §2"
        if "!" in others and len(others) > 1:
            rule += ", RFC 8460 §3"
        if any(ord(c) > 0x7F for c in others):
            encoded += "; or write a domain name as its A-label (xn--...)"
        problems.append(
            f"it contains {_listed([_shown(c) for c in others])}, which a rua URI may not "
            f"contain as is ({rule}); write {'it' if len(others) == 1 else 'them'} "
            f"percent-encoded: {encoded}"
        )
    return f"rua URI {uri!r}: " + "; ".join(problems)


def check_uri(uri: str) -> str:
    """Validate one `rua` URI (RFC 8460 §3); return it unchanged or raise TlsRptRecordError."""
    if not _URI_CHARS.fullmatch(uri):
        raise TlsRptRecordError(_bad_characters(uri))
    scheme, colon, rest = uri.partition(":")
    if not colon or not scheme:
        raise TlsRptRecordError(f"rua URI {uri!r} has no scheme; use mailto: or https:")
    scheme = scheme.lower()  # RFC 3986 §3.1: schemes are case-insensitive
    if scheme == "mailto":
        mailbox_of(uri)
        return uri
    if scheme == "https":
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError as exc:
            raise TlsRptRecordError(f"rua URI {uri!r} is malformed: {exc}") from None
        if not rest.startswith("//") or not parts.hostname:
            raise TlsRptRecordError(
                f"rua URI {uri!r}: an https: URI needs a host, like https://example.com/tlsrpt"
            )
        return uri
    raise TlsRptRecordError(
        f"rua URI {uri!r} uses scheme {scheme!r}; RFC 8460 §3 defines only mailto: and https:"
    )


def _split_rua(value: str) -> list[str]:
    # RFC 8460 §3: tlsrpt-rua = %s"rua=" tlsrpt-uri *(*WSP "," *WSP tlsrpt-uri). Field values
    # reach us without spaces (split_fields), so only the commas are left to split on.
    uris = value.split(",")
    if any(not u for u in uris):
        raise TlsRptRecordError(f"rua {value!r} has an empty entry between commas")
    return [check_uri(u) for u in uris]


def _rejoin_rua_whitespace(text: str) -> str:
    # The generic field syntax forbids spaces in values, but rua allows *WSP around its commas.
    # Remove exactly that whitespace, inside rua fields only, before the generic split.
    parts = text.split(";")
    for i, part in enumerate(parts):
        if part.lstrip(" \t").startswith("rua="):
            parts[i] = re.sub(r"[ \t]*,[ \t]*", ",", part)
    return ";".join(parts)


def parse_record(text: str) -> TlsRptRecord:
    """Parse one `_smtp._tls` TXT record (its strings already joined without separators)."""
    fields = split_fields(
        _rejoin_rua_whitespace(text), TLSRPT_VERSION, TlsRptRecordError, own_syntax=("rua",)
    )
    rua: list[str] = []
    seen_rua = False
    for name, value in fields:
        if name == "rua":  # %s"rua=": case-sensitive
            seen_rua = True
            rua.extend(_split_rua(value))
    if not seen_rua:
        raise TlsRptRecordError(
            "the record has no rua field; RFC 8460 §3 requires one" + case_hint(fields, "rua")
        )
    extensions = tuple((n, v) for n, v in fields if n != "rua")
    return TlsRptRecord(rua=tuple(rua), extensions=extensions)


def select_record(txt_strings: Sequence[str]) -> TlsRptRecord | None:
    """Choose the TLS-RPT record among the TXT records at `_smtp._tls.<domain>` (RFC 8460 §3).

    Records not beginning with `v=TLSRPTv1;` are dropped. None: no candidate. TlsRptRecordError:
    several candidates, or the only one is malformed.
    """
    candidates = [t for t in txt_strings if begins_with(t, TLSRPT_VERSION)]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise TlsRptRecordError(
            f"{len(candidates)} TXT records begin with 'v={TLSRPT_VERSION};'; "
            "RFC 8460 §3 requires exactly one"
        )
    return parse_record(candidates[0])


def lint_record(text: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(fields, errors, warnings) for one `_smtp._tls` TXT record, for the command line."""
    warnings: list[str] = []
    quoted = presentation_format_error(text)
    if quoted:
        return {}, [quoted], warnings
    try:
        record = parse_record(text)
    except TlsRptRecordError as exc:
        return {}, [exc.reason], warnings
    rua_fields = sum(1 for part in text.split(";") if part.strip(" \t").startswith("rua="))
    if rua_fields > 1:
        warnings.append(f"rua appears {rua_fields} times; all {len(record.rua)} URIs are used")
    for name, _ in record.extensions:
        warnings.append(f"extension field {name!r} is not defined by RFC 8460 and is ignored")
    fields: dict[str, Any] = {"rua": list(record.rua), "extensions": dict(record.extensions)}
    return fields, [], warnings
