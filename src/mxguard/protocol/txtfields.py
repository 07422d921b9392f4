"""The `v=<version>; name=value; ...` grammar of MTA-STS and TLS-RPT TXT records.

RFC 8461 §3.1 (`_mta-sts` records) and RFC 8460 §3 (`_smtp._tls` records) share one grammar:
the version field first, then fields separated by `*WSP ";" *WSP`, an optional trailing `;`,
field names of the form `(ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")` and, for fields
without a syntax of their own, values of printable ASCII without `=`, `;` or spaces. This
module splits a record into its fields; what the fields mean is for `mtasts` and `tlsrpt`.

Decisions: whitespace before a `;` is accepted (erratum 6285 to RFC 8461), and so is
whitespace at the very end of a record, which cannot change its meaning.
Field names are case-sensitive (both RFCs use `%s` strings); `case_hint` says so when a record
spells a required name in another case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence

# RFC 8461 §3.1 sts-ext-name / RFC 8460 §3 tlsrpt-ext-name (also RFC 8461 §3.2 policy keys):
# (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
# RFC 8461 §3.1 sts-ext-value / RFC 8460 §3 tlsrpt-ext-value = 1*(%x21-3A / %x3C / %x3E-7E):
# no "=", ";", SP or CTLs.
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
WSP = " \t"


def begins_with(text: str, version: str) -> bool:
    """Whether a TXT record begins with `v=<version>;` (RFC 8461 §3.1, RFC 8460 §3).

    Records that do not are someone else's and are dropped before anything is parsed;
    erratum 6285 allows whitespace before the `;`.
    """
    return re.match(re.escape("v=" + version) + r"[ \t]*;", text) is not None


def split_fields(
    text: str,
    version: str,
    error: Callable[[str], ValueError],
    own_syntax: Collection[str] = (),
) -> list[tuple[str, str]]:
    """Split a `v=<version>; name=value; ...` TXT record into its fields after the version.

    The grammar shared by RFC 8461 §3.1 and RFC 8460 §3: the version first, then one or more
    fields separated by `*WSP ";" *WSP`, then an optional `;`. Field names and values are
    checked for the generic extension syntax, except the values of fields named in
    `own_syntax` (e.g. TLS-RPT `rua`, whose URIs may contain "="): the caller checks those.
    Every problem is raised as `error(reason)`.
    """
    prefix = "v=" + version
    if not text.startswith(prefix):
        raise error(f"the record must begin with {prefix!r}")
    rest = text[len(prefix) :]
    if not rest.lstrip(WSP).startswith(";"):
        raise error(f"{prefix!r} must be followed by ';' and at least one field")
    parts = rest.split(";")
    # parts[0] is what sits between the version and the first ";": whitespace only.
    body = parts[1:]
    if body and body[-1].strip(WSP) == "":
        body = body[:-1]  # the optional trailing delimiter
    if not body:
        raise error(f"no fields after {prefix!r}")
    fields: list[tuple[str, str]] = []
    for raw in body:
        item = raw.strip(WSP)
        if not item:
            raise error("empty field between two ';'")
        name, eq, value = item.partition("=")
        if not eq:
            raise error(f"field {item!r} is not name=value")
        if not FIELD_NAME.fullmatch(name):
            raise error(
                f"field name {name!r} is invalid (a letter or digit, then up to 31 letters, "
                "digits, '_', '-' or '.')"
            )
        if name in own_syntax:
            if not value:
                raise error(f"{name!r} has an empty value")
        elif not _EXT_VALUE.fullmatch(value):
            raise error(
                f"value of {name!r} is {value!r}: values must be non-empty printable ASCII "
                "without spaces, '=' or ';'"
            )
        fields.append((name, value))
    return fields


def case_hint(fields: Sequence[tuple[str, str]], name: str) -> str:
    """A hint for an error about a missing field `name` that the record has in another case."""
    if any(other.lower() == name for other, _ in fields):
        return f" (field names are case-sensitive: write '{name}=')"
    return ""


def presentation_format_error(text: str) -> str | None:
    """The common mistake of pasting a TXT record as `dig` shows it, quotes and all."""
    if text.startswith('"'):
        return (
            "the record starts with a quote: pass the TXT content, not its presentation "
            "format (join the strings with nothing between them)"
        )
    return None


__all__ = [
    "FIELD_NAME",
    "WSP",
    "begins_with",
    "case_hint",
    "presentation_format_error",
    "split_fields",
]
