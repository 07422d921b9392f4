"""Host names: the one place where mxguard normalises, validates and matches them.

Every name that mxguard compares (a mail domain, an MX host, an MTA-STS `mx` pattern, a
certificate's DNS-ID, a local rule, a policy-list key) goes through this module, so that one
name has one form everywhere: lower-case A-labels without the trailing dot of the root. No
other module lower-cases names, strips their dots or encodes their labels (the model is
dnspython's `dns/name.py`, which owns names for the DNS library).

Rules, each with its `Rule` in `HostNameError`:

- IDNA 2008 (RFC 5890, RFC 5891): a name with non-ASCII characters is first mapped with
  UTS #46 (non-transitional: case folding, full-width forms and dots; `ß` stays `ß`), then
  every U-label becomes its A-label (RFC 5891 §5.4, §5.5: the lookup side). An ASCII name is
  only lower-cased: its labels are checked as LDH labels, not decoded, so `xn--` labels pass
  as they are.
- One trailing dot (the root label, RFC 1034 §3.1) is removed; a second is an empty label.
- At most 253 characters for the name and 63 for each label (RFC 1035 §2.3.4); every label
  a host name label of letters, digits and inner hyphens (RFC 5321 §4.1.2, RFC 1035 §2.3.1).
- MTA-STS `mx` patterns (RFC 8461 §3.2): `["*."] Domain`, the wildcard only as the whole
  left-most label, once.
- Matching a presented identifier against a reference identifier (RFC 6125 §6.4): both as
  A-labels, compared case-insensitively (§6.4.1, §6.4.2); a wildcard is the whole left-most
  label and stands for exactly one label (§6.4.3), never part of a label, never zero or two
  labels. This is the rule of MTA-STS MX matching (RFC 8461 §4.1) and of the certificate
  check it asks for (RFC 8461 §4.2), and of DANE-TA name checks (RFC 7672 §3.2.3). For
  certificates a wildcard directly above a top-level label (`*.com`) covers nothing, as in
  OpenSSL; an MTA-STS pattern `*.com` is grammatical and does match `a.com`.

`dns_name` is the lenient form for DNS owner names that are not host names
(`_25._tcp.mx.example`): the same case, dot and IDNA rules, no LDH check.
"""

from __future__ import annotations

import enum
import re

import idna

MAX_NAME_LENGTH = 253  # RFC 1035 §2.3.4: 255 octets on the wire, 253 characters in text
MAX_LABEL_LENGTH = 63  # RFC 1035 §2.3.4
# RFC 5321 §4.1.2 sub-domain (RFC 1035 §2.3.1 preferred name syntax), in lower case.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?")


class Rule(enum.StrEnum):
    """The rule a name broke, as `HostNameError.rule`."""

    EMPTY = "empty"
    IDNA = "idna"
    NAME_LENGTH = "name-length"
    EMPTY_LABEL = "empty-label"
    LABEL_LENGTH = "label-length"
    LDH = "ldh"
    WILDCARD = "wildcard"


class HostNameError(ValueError):
    """A name is not a host name (or pattern); `.rule` says which rule failed, `.reason` how."""

    def __init__(self, rule: Rule, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


def _to_ascii(name: str) -> str:
    """`name` with every U-label as an A-label (RFC 5891 §5, after UTS #46 mapping)."""
    if name.isascii():
        return name.lower()  # ASCII only: no Unicode case rules apply
    try:
        # UTS #46 non-transitional mapping, then IDNA 2008 (RFC 5891 §5.4, §5.5) per label.
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise HostNameError(
            Rule.IDNA,
            f"{name!r} is not a valid internationalised name (IDNA 2008, RFC 5891): {exc}",
        ) from None


def normalise_host(name: str) -> str:
    """`name` as lower-case A-labels without a trailing dot; `HostNameError` says what is wrong.

    Accepts A-labels and U-labels (RFC 5890 §2.3.2.1). This is the form in which names are
    compared everywhere: MTA-STS (RFC 8461 §4.1), certificates (RFC 6125 §6.4.2), DANE, the
    policy list and local rules.
    """
    name = _to_ascii(name)
    if name.endswith("."):
        name = name[:-1]  # after the mapping, which turns full-width dots into "."
    if not name:
        raise HostNameError(Rule.EMPTY, "empty host name")
    if len(name) > MAX_NAME_LENGTH:
        raise HostNameError(
            Rule.NAME_LENGTH,
            f"host name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH} "
            "(RFC 1035 §2.3.4)",
        )
    for label in name.split("."):
        if not label:
            raise HostNameError(Rule.EMPTY_LABEL, f"{name!r} has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise HostNameError(
                Rule.LABEL_LENGTH,
                f"label {label!r} of {name!r} is not a host name label: it is "
                f"{len(label)} characters long, the limit is {MAX_LABEL_LENGTH} "
                "(RFC 1035 §2.3.4)",
            )
        if not _LDH_LABEL.fullmatch(label):
            raise HostNameError(
                Rule.LDH,
                f"label {label!r} of {name!r} is not a host name label (letters, digits and "
                "inner hyphens, RFC 5321 §4.1.2)",
            )
    return name


def normalise_pattern(pattern: str) -> str:
    """An MTA-STS `mx` pattern (`host` or `*.host`) normalised like `normalise_host`.

    RFC 8461 §3.2: sts-policy-mx-value = ["*."] Domain, so `*` may only be the whole left-most
    label, and at most once. Certificate DNS-IDs follow the same shape (RFC 6125 §6.4.3).
    """
    if pattern.startswith("*."):
        rest = pattern[2:]
        if "*" in rest:
            raise HostNameError(
                Rule.WILDCARD, f"{pattern!r}: '*' may appear only once, as the left-most label"
            )
        try:
            return "*." + normalise_host(rest)
        except HostNameError as exc:
            raise HostNameError(exc.rule, f"{pattern!r}: {exc.reason}") from None
    if "*" in pattern:
        raise HostNameError(
            Rule.WILDCARD,
            f"{pattern!r}: '*' must be the whole left-most label followed by '.', "
            "e.g. '*.example.com'",
        )
    try:
        return normalise_host(pattern)
    except HostNameError as exc:
        raise HostNameError(exc.rule, f"{pattern!r}: {exc.reason}") from None


def identifier_matches(presented: str, reference: str, *, tld_wildcard: bool = False) -> bool:
    """Whether the presented identifier `presented` covers the reference `reference`.

    RFC 6125 §6.4: both are normalised to A-labels and compared case-insensitively, anchored
    at both ends (§6.4.1, §6.4.2); `*.` as the whole left-most label stands for exactly one
    label (§6.4.3). A partial wildcard (`m*.example.com`) or a wildcard anywhere else matches
    nothing, nor does a reference that is itself a pattern, or any name that is invalid.

    `tld_wildcard`: whether `*.` directly above a single label (`*.com`) may match; False for
    certificates (as OpenSSL), True for MTA-STS patterns, where it is grammatical
    (RFC 8461 §3.2).
    """
    try:
        pattern = normalise_pattern(presented)
        name = normalise_host(reference)
    except HostNameError:
        return False
    if not pattern.startswith("*."):
        return pattern == name
    base = pattern[2:]
    if not tld_wildcard and "." not in base:
        return False
    # RFC 6125 §6.4.3 and RFC 8461 §4.1: exactly one label, never zero or several.
    _, dot, rest = name.partition(".")
    return bool(dot) and rest == base


def dns_name(name: str) -> str:
    """Any DNS owner name in the form mxguard queries and caches it.

    Lower-case ASCII without the trailing dot; non-ASCII labels become A-labels (UTS #46,
    then RFC 5891 §5.5), ASCII labels stay as they are, so `_25._tcp.mx.example` and other
    names that are not host names pass. Not a validity check: the DNS library rejects what
    cannot be a DNS name. `HostNameError` (rule `idna`) for a label that has no A-label.
    """
    if not name.isascii():
        try:
            name = idna.uts46_remap(name, std3_rules=False)
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise HostNameError(
                Rule.IDNA, f"{name!r} is not a valid internationalised name (UTS #46): {exc}"
            ) from None
    if name.endswith("."):
        name = name[:-1]
    if name.isascii():
        return name.lower()
    return ".".join(_to_ascii(label) for label in name.split("."))


__all__ = [
    "MAX_LABEL_LENGTH",
    "MAX_NAME_LENGTH",
    "HostNameError",
    "Rule",
    "dns_name",
    "identifier_matches",
    "normalise_host",
    "normalise_pattern",
]
