"""MTA-STS DNS records, policy bodies and MX matching (RFC 8461 §3.1, §3.2, §4.1).

A domain announces MTA-STS with a `_mta-sts.<domain>` TXT record (`v=STSv1; id=...`) and
serves the policy itself over HTTPS. This module only parses, validates, serialises and matches;
fetching lives in the HTTPS adapter, caching in the engine. Everything here is pure.

Decisions where the RFC leaves room (see also docs/rfc-notes.md, "MTA-STS"):

- `select_record` returns None when no TXT record begins with `v=STSv1;` (no policy announced)
  and raises `StsRecordError` when several do or the single one is malformed: both mean "no
  usable record" (§3.1), but the reason is kept for logs, lint output and TLS-RPT.
- The record grammar is applied strictly (§3.1), by `txtfields.split_fields`, which the TLS-RPT
  record shares: `*WSP ";" *WSP` between fields, an optional trailing `;`, no whitespace inside
  a field. Whitespace before `;` is accepted (erratum 6285); whitespace at the very end is
  tolerated too, as it cannot change the meaning.
- Policy bodies (§3.2): lines end in LF or CRLF (erratum 6253). Whitespace is allowed after the
  `:` and at the end of a line, nowhere else. Blank lines are outside the grammar but carry no
  meaning, so they are skipped with a warning rather than invalidating the policy.
- A field other than `mx` given twice: the first one counts and a warning says so. Unknown
  fields are ignored for enforcement but kept, in order, for the TLS-RPT `policy-string`.
- `max_age` above 31557600 (erratum 7282) is capped, with a warning.
- `mx` patterns follow `["*." ] Domain` (§3.2, RFC 5321 §4.1.2). `*.com` is grammatical (a
  one-label Domain), so it is accepted; `lint_policy` warns about it. A trailing dot is outside
  the grammar but unambiguous: it is removed with a warning (`lint_policy` makes it an error:
  other senders may keep it and then match nothing, RFC 8461 §4.1). U-labels are converted to
  A-labels. Names and patterns are normalised and matched by `names` (IDNA 2008, RFC 6125
  §6.4).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mxguard.protocol import names
from mxguard.protocol.txtfields import (
    FIELD_NAME,
    WSP,
    begins_with,
    case_hint,
    presentation_format_error,
    split_fields,
)

# RFC 8461 §3.1: sts-id = %s"id=" 1*32(ALPHA / DIGIT). ASCII only: `\w` would admit Unicode.
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# RFC 8461 §3.2: sts-policy-max-age-value = 1*10(DIGIT). ASCII digits only (`\d` is Unicode).
_MAX_AGE = re.compile(r"[0-9]{1,10}")

STS_VERSION = "STSv1"
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2 as corrected by erratum 7282: one year.


class StsRecordError(ValueError):
    """The `_mta-sts` TXT record violates RFC 8461 §3.1; `.reason` says which rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PolicyError(ValueError):
    """The policy body violates RFC 8461 §3.2; `.reason` is the first problem, `.errors` all."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        self.reason = self.errors[0] if self.errors else "invalid policy"
        super().__init__("; ".join(self.errors) or self.reason)


class Mode(enum.StrEnum):
    """RFC 8461 §3.2 policy modes (case-sensitive on the wire)."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


# --------------------------------------------------------------------------- host names


def matches(pattern: str, host: str) -> bool:
    """Whether MX host `host` matches `mx` pattern `pattern` (RFC 8461 §4.1).

    `names.identifier_matches` with the MTA-STS grammar: case-insensitive, IDNA-aware, a
    trailing dot on either side is ignored, anchored, and `*.example.com` matches exactly one
    extra left-most label. `*.com` is a valid pattern (RFC 8461 §3.2) and matches `a.com`.
    Invalid input matches nothing.
    """
    return names.identifier_matches(pattern, host, tld_wildcard=True)


# --------------------------------------------------------------------------- TXT record


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A parsed `_mta-sts` TXT record: the policy `id` and any extension fields, in order."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()

    def to_text(self) -> str:
        fields = [f"id={self.id}", *(f"{k}={v}" for k, v in self.extensions)]
        return "; ".join([f"v={STS_VERSION}", *fields])


def parse_record(text: str) -> StsRecord:
    """Parse one `_mta-sts` TXT record (its strings already joined without separators)."""
    fields = split_fields(text, STS_VERSION, StsRecordError)
    ids = [value for name, value in fields if name == "id"]
    if not ids:
        raise StsRecordError(
            "the record has no id field; RFC 8461 §3.1 requires one" + case_hint(fields, "id")
        )
    if len(ids) > 1:
        # Ambiguous: the id decides whether a cached policy is refetched (§3.1, §5.1).
        raise StsRecordError(f"the record has {len(ids)} id fields; exactly one is allowed")
    if not _STS_ID.fullmatch(ids[0]):
        raise StsRecordError(f"id {ids[0]!r} must be 1 to 32 letters and digits (RFC 8461 §3.1)")
    extensions = tuple((n, v) for n, v in fields if n != "id")
    return StsRecord(id=ids[0], extensions=extensions)


def select_record(txt_strings: Sequence[str]) -> StsRecord | None:
    """Choose the MTA-STS record among all TXT records at `_mta-sts.<domain>` (RFC 8461 §3.1).

    Each element is one TXT record, its character-strings joined with nothing between them.
    Records not beginning with `v=STSv1;` are dropped. None: no candidate (no policy
    announced). StsRecordError: several candidates, or the only one is malformed.
    """
    candidates = [t for t in txt_strings if begins_with(t, STS_VERSION)]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise StsRecordError(
            f"{len(candidates)} TXT records begin with 'v={STS_VERSION};'; "
            "RFC 8461 §3.1 requires exactly one"
        )
    return parse_record(candidates[0])


def lint_record(text: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(fields, errors, warnings) for one `_mta-sts` TXT record, for the command line."""
    warnings: list[str] = []
    quoted = presentation_format_error(text)
    if quoted:
        return {}, [quoted], warnings
    try:
        record = parse_record(text)
    except StsRecordError as exc:
        return {}, [exc.reason], warnings
    for name, _ in record.extensions:
        warnings.append(f"extension field {name!r} is not defined by RFC 8461 and is ignored")
    fields: dict[str, Any] = {"id": record.id, "extensions": dict(record.extensions)}
    return fields, [], warnings


# --------------------------------------------------------------------------- policy body


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated MTA-STS policy (RFC 8461 §3.2).

    `mx` holds normalised patterns (lower-case A-labels, no trailing dot). `lines` are the
    non-blank lines as received, for TLS-RPT; `lines` and `warnings` do not take part in
    equality, so a policy equals its canonical re-serialisation.
    """

    version: str
    mode: Mode
    max_age: int
    mx: tuple[str, ...]
    extensions: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)
    lines: tuple[str, ...] = field(default=(), compare=False)

    def to_text(self) -> str:
        """Canonical serialisation: version, mode, mx lines, max_age, extensions; CRLF lines."""
        out = [f"version: {self.version}", f"mode: {self.mode.value}"]
        out += [f"mx: {pattern}" for pattern in self.mx]
        out.append(f"max_age: {self.max_age}")
        out += [f"{key}: {value}" for key, value in self.extensions]
        return "".join(line + "\r\n" for line in out)

    def policy_strings(self) -> list[str]:
        """The policy lines as TLS-RPT `policy-string` wants them (RFC 8460 §4.4): as received.

        A policy built in code rather than parsed has no received lines; its canonical lines
        are used then.
        """
        if self.lines:
            return list(self.lines)
        return self.to_text().split("\r\n")[:-1]

    def matching_pattern(self, host: str) -> str | None:
        """The first `mx` pattern that `host` matches, or None."""
        for pattern in self.mx:
            if matches(pattern, host):
                return pattern
        return None

    def allows(self, host: str) -> bool:
        """Whether `host` may be used as MX under this policy (RFC 8461 §4.1).

        Mode is not considered here: a `none` policy has usually no patterns and allows nothing;
        what to do with that is the engine's decision.
        """
        return self.matching_pattern(host) is not None


_KNOWN_POLICY_KEYS = ("version", "mode", "max_age", "mx")
_CTL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True)
class _Scan:
    """What a pass over a policy body found; partial when there are errors."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first: dict[str, tuple[int, str]] = field(default_factory=dict)
    mx: list[tuple[int, str]] = field(default_factory=list)
    extensions: list[tuple[str, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    # mx lines ending in a dot: (line number, value as written, the warning parse_policy gives)
    trailing_dots: list[tuple[int, str, str]] = field(default_factory=list)


def _split_lines(text: str) -> list[str]:
    # RFC 8461 §3.2 with erratum 6253: sts-policy-term = LF / CRLF. Never str.splitlines(),
    # which also splits on VT, FF, NEL, U+2028 and friends that are not line ends here.
    lines = text.split("\n")
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _scan_policy(text: str) -> _Scan:
    scan = _Scan()
    if not text.strip(" \t\r\n"):
        scan.errors.append("the policy is empty")
        return scan
    lines = _split_lines(text)
    if lines and lines[-1] == "":
        lines.pop()  # the optional final line terminator
    for number, line in enumerate(lines, start=1):
        where = f"line {number}"
        if line.strip(WSP) == "":
            scan.warnings.append(f"{where} is blank; RFC 8461 §3.2 has no blank lines (ignored)")
            continue
        scan.lines.append(line)
        if line[0] in WSP:
            scan.errors.append(f"{where} starts with whitespace; write 'key: value'")
            continue
        key, colon, value = line.partition(":")
        if not colon:
            scan.errors.append(f"{where} ({line!r}) is not 'key: value'")
            continue
        if key != key.rstrip(WSP):
            # §3.2: sts-policy-field-delim = ":" *WSP, so nothing may sit between key and ":".
            scan.errors.append(f"{where}: no whitespace is allowed before ':' ({line!r})")
            continue
        if not FIELD_NAME.fullmatch(key):
            scan.errors.append(
                f"{where}: {key!r} is not a field name (a letter or digit, then up to 31 "
                "letters, digits, '_', '-' or '.')"
            )
            continue
        value = value.strip(WSP)  # §3.2: *WSP after ":" and before the line end
        if not value:
            scan.errors.append(f"{where}: {key!r} has no value")
            continue
        if _CTL.search(value):
            scan.errors.append(f"{where}: the value of {key!r} contains control characters")
            continue
        if key == "mx":
            scan.mx.append((number, value))
        elif key in _KNOWN_POLICY_KEYS:
            if key in scan.first:
                # mxguard's rule (docs/rfc-notes.md): for fields other than mx the first counts.
                scan.warnings.append(
                    f"{where}: {key!r} repeated; the first value (line {scan.first[key][0]}) counts"
                )
            else:
                scan.first[key] = (number, value)
        else:
            if key.lower() in _KNOWN_POLICY_KEYS:
                scan.warnings.append(
                    f"{where}: {key!r} is treated as an unknown field: field names are "
                    f"case-sensitive (did you mean {key.lower()!r}?)"
                )
            # §3.2: unknown fields are ignored; kept for the TLS-RPT policy-string.
            scan.extensions.append((key, value))
    return scan


def _version(scan: _Scan, fields: dict[str, Any]) -> None:
    version = scan.first.get("version")
    if version is None:
        scan.errors.append("'version' is missing; RFC 8461 §3.2 requires 'version: STSv1'")
    elif version[1] != STS_VERSION:
        scan.errors.append(
            f"line {version[0]}: version is {version[1]!r}; it must be exactly 'STSv1'"
        )
    else:
        fields["version"] = version[1]


def _mode(scan: _Scan, fields: dict[str, Any]) -> Mode | None:
    raw_mode = scan.first.get("mode")
    if raw_mode is None:
        scan.errors.append("'mode' is missing; RFC 8461 §3.2 requires enforce, testing or none")
        return None
    try:
        mode = Mode(raw_mode[1])  # exact, case-sensitive (§3.2 uses %s strings)
    except ValueError:
        scan.errors.append(
            f"line {raw_mode[0]}: mode is {raw_mode[1]!r}; it must be exactly 'enforce', "
            "'testing' or 'none'"
        )
        return None
    fields["mode"] = mode.value
    return mode


def _max_age(scan: _Scan, fields: dict[str, Any]) -> int | None:
    raw_age = scan.first.get("max_age")
    if raw_age is None:
        scan.errors.append("'max_age' is missing; RFC 8461 §3.2 requires it (seconds)")
        return None
    if not _MAX_AGE.fullmatch(raw_age[1]):
        scan.errors.append(
            f"line {raw_age[0]}: max_age is {raw_age[1]!r}; it must be 1 to 10 digits "
            "(no sign, decimals or separators)"
        )
        return None
    max_age = int(raw_age[1])
    if max_age > MAX_AGE_LIMIT:
        scan.warnings.append(
            f"max_age {max_age} exceeds the maximum {MAX_AGE_LIMIT} (RFC 8461 §3.2, "
            f"erratum 7282); using {MAX_AGE_LIMIT}"
        )
        max_age = MAX_AGE_LIMIT
    fields["max_age"] = max_age
    return max_age


def _patterns(scan: _Scan, fields: dict[str, Any]) -> list[str]:
    patterns: list[str] = []
    for number, raw in scan.mx:
        dotted = _has_trailing_dot(raw)
        if dotted:
            # Outside the §3.2 grammar but unambiguous; `normalise_pattern` removes it. The
            # sender is liberal here; `lint_policy` calls it an error, as others may not be.
            warning = f"line {number}: trailing dot removed from mx {raw!r}"
            scan.warnings.append(warning)
        try:
            pattern = names.normalise_pattern(raw)
        except ValueError as exc:
            scan.errors.append(f"line {number}: invalid mx pattern: {exc}")
            continue
        if dotted:
            scan.trailing_dots.append((number, raw, warning))
        if pattern in patterns:
            scan.warnings.append(f"line {number}: mx {raw!r} repeats an earlier pattern")
            continue
        patterns.append(pattern)
    fields["mx"] = patterns
    return patterns


def _build_policy(scan: _Scan) -> tuple[Policy | None, dict[str, Any]]:
    """Validate the scanned fields; append to scan.errors/warnings; return the policy if valid."""
    fields: dict[str, Any] = {}
    _version(scan, fields)
    mode = _mode(scan, fields)
    max_age = _max_age(scan, fields)
    patterns = _patterns(scan, fields)
    if not scan.mx and mode is not None and mode is not Mode.NONE:
        # §3.2: mx is required at least once unless mode is "none".
        scan.errors.append(f"mode {mode.value!r} requires at least one 'mx' line")
    fields["extensions"] = dict(scan.extensions)
    if scan.errors or mode is None or max_age is None:
        return None, fields
    policy = Policy(
        version=STS_VERSION,
        mode=mode,
        max_age=max_age,
        mx=tuple(patterns),
        extensions=tuple(scan.extensions),
        warnings=tuple(scan.warnings),
        lines=tuple(scan.lines),
    )
    return policy, fields


def _has_trailing_dot(pattern: str) -> bool:
    return pattern.endswith(".") and not pattern.endswith(("..", "*."))


def trailing_dot_problem(pattern: str) -> str:
    """Why an `mx` pattern written with a trailing dot is a mistake, and what to write."""
    return (
        f"mx {pattern!r} ends with a dot: RFC 8461 §4.1 compares patterns with MX host names "
        "without the trailing dot, so other senders may match no MX host with this pattern "
        "(under enforce they then deliver no mail; mxguard removes the dot); "
        f"write 'mx: {pattern.rstrip('.')}'"
    )


def trailing_dot_patterns(policy: Policy) -> list[str]:
    """The `mx` values of a parsed policy as written with a trailing dot (from `lines`)."""
    found = []
    for line in policy.lines:
        key, colon, value = line.partition(":")
        if colon and key == "mx" and _has_trailing_dot(value.strip(WSP)):
            found.append(value.strip(WSP))
    return found


def parse_policy(text: str) -> Policy:
    """Parse and validate a policy body (RFC 8461 §3.2); PolicyError lists every problem."""
    scan = _scan_policy(text)
    policy, _ = _build_policy(scan)
    if policy is None:
        raise PolicyError(scan.errors)
    return policy


def lint_policy(text: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(fields, errors, warnings) for a policy body, for the command line.

    Adds advice that does not make a policy invalid (very short max_age, `*.tld` patterns),
    and is stricter than `parse_policy` where other senders are: an `mx` pattern with a
    trailing dot, which mxguard's sender accepts (and removes), is an error here.
    """
    scan = _scan_policy(text)
    policy, fields = _build_policy(scan)
    errors = list(scan.errors)
    dotted = {warning for _, _, warning in scan.trailing_dots}
    warnings = [w for w in scan.warnings if w not in dotted]
    errors += [f"line {n}: {trailing_dot_problem(raw)}" for n, raw, _ in scan.trailing_dots]
    if policy is not None:
        if policy.max_age < 86400:
            # §3.2: max_age is expected to be weeks or more to resist attacks at refresh time.
            warnings.append(
                f"max_age {policy.max_age} is under one day; RFC 8461 §3.2 expects weeks"
            )
        for pattern in policy.mx:
            if pattern.startswith("*.") and "." not in pattern[2:]:
                warnings.append(
                    f"mx {pattern!r} matches every host directly under a top-level domain"
                )
        if policy.mode is Mode.NONE and policy.mx:
            warnings.append("mode 'none' withdraws the policy; its mx lines have no effect")
    return fields, errors, warnings
