"""The STARTTLS Everywhere policy list: a preloaded list of MTA-STS-like policies (JSON).

A list closes MTA-STS's trust-on-first-use gap: a sender that has never fetched a domain's
policy still knows it must use verified TLS. The format is the one of EFF's STARTTLS
Everywhere `policy.json` (its `policy.schema.json` and POLICY_LIST.md); what mxguard accepts:

- Top level: `timestamp` and `expires` (required), `policies` (required), `policy-aliases`
  (optional). `version`, `author`, `pinsets` and unknown keys are ignored.
- Times: Unix seconds (a non-negative integer) or an RFC 3339 date-time with `T`, seconds and
  an explicit offset (`Z` or `±hh:mm`); fractions of any length are accepted (EFF's own files
  carry nanoseconds; we keep microseconds).
- `policies`: mail domain -> a policy `{"mode": "enforce"|"testing", "mxs": [...]}` (plus
  optional `report` URIs and `pin`, kept but not interpreted here), or `{"policy-alias": name}`
  naming an entry of `policy-aliases` (other keys beside `policy-alias` are ignored, as the
  schema says). Domains are compared as lower-case A-labels. Duplicate JSON keys are an error
  (a JSON decoder would otherwise silently keep the last one).
- `lookup` is exact: a list entry for `example.com` says nothing about `lists.example.com`
  (the schema: "Matching of mail domains is on an exact-match basis").
- `mxs` entries: `mx.example.com` is an exact MX name; `.example.com` is turned into the
  MTA-STS wildcard `*.example.com`, which matches exactly one extra label (RFC 8461 §4.1).
  EFF's POLICY_LIST.md says suffixes match one label; its schema text says "arbitrarily deep";
  mxguard follows the one-label rule, so list and MTA-STS semantics are the same.
- An expired list is refused by `parse_list`; a list older than the one in use is refused by
  `choose_list` (no rollback). When the only list available has expired, the engine falls back
  to opportunistic TLS and warns loudly (`is_expired`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from mxguard.protocol.mtasts import Mode, matches
from mxguard.protocol.names import HostNameError, normalise_host, normalise_pattern

# RFC 3339 §5.6 date-time, strictly: "T", seconds, and an offset are required.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class PolicyListError(ValueError):
    """The policy list is malformed, expired or older than the current one; `.reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ListPolicy:
    """One domain's policy from the list. `mxs` holds MTA-STS patterns (`*.` for suffixes)."""

    mode: Mode
    mxs: tuple[str, ...]
    report: tuple[str, ...] = ()
    pin: str | None = None

    def matching_pattern(self, host: str) -> str | None:
        """The first `mxs` pattern that `host` matches (RFC 8461 §4.1 semantics), or None."""
        for pattern in self.mxs:
            if matches(pattern, host):
                return pattern
        return None

    def allows(self, host: str) -> bool:
        """Whether MX host `host` is one the list allows for this domain."""
        return self.matching_pattern(host) is not None


@dataclass(frozen=True, slots=True)
class PolicyList:
    """A parsed, unexpired policy list. `policies` maps normalised domains to policies."""

    timestamp: datetime
    expires: datetime
    policies: Mapping[str, ListPolicy]

    def lookup(self, domain: str) -> ListPolicy | None:
        """The policy for exactly `domain` (parent domains do not count), or None."""
        try:
            return self.policies.get(normalise_host(domain))
        except HostNameError:
            return None

    def is_expired(self, now: datetime) -> bool:
        """Whether the list has expired at `now` (an aware datetime)."""
        return _aware(now) >= self.expires


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime, e.g. datetime.now(UTC)")
    return now


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PolicyListError(f"JSON key {key!r} appears twice in one object")
        out[key] = value
    return out


def _parse_time(value: object, what: str) -> datetime:
    # bool is an int in Python; JSON true/false is not a time.
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise PolicyListError(f"{what} is {value}; Unix seconds must not be negative")
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise PolicyListError(f"{what} {value} is out of range") from None
    if isinstance(value, str):
        if not _RFC3339.fullmatch(value):
            raise PolicyListError(
                f"{what} {value!r} is not an RFC 3339 date-time like 2024-05-01T12:00:00Z"
            )
        text = value.upper()
        head, dot, tail = text.partition(".")
        if dot:
            # datetime.fromisoformat wants at most 6 fraction digits; keep microseconds.
            digits = re.match(r"[0-9]+", tail)
            assert digits is not None  # guaranteed by _RFC3339
            text = f"{head}.{digits.group()[:6]}{tail[digits.end() :]}"
        try:
            return datetime.fromisoformat(text).astimezone(UTC)
        except (ValueError, OverflowError):
            raise PolicyListError(f"{what} {value!r} is not a valid date and time") from None
    raise PolicyListError(f"{what} must be Unix seconds or an RFC 3339 string, not {value!r}")


def _parse_policy(obj: object, where: str) -> ListPolicy:
    if not isinstance(obj, dict):
        raise PolicyListError(f"{where} must be an object with 'mode' and 'mxs'")
    mode_value = obj.get("mode")
    if mode_value not in (Mode.ENFORCE.value, Mode.TESTING.value):
        raise PolicyListError(f"{where}: mode is {mode_value!r}; it must be 'enforce' or 'testing'")
    mxs = obj.get("mxs")
    if not isinstance(mxs, list) or not mxs:
        raise PolicyListError(f"{where}: mxs must be a non-empty list of host names")
    patterns: list[str] = []
    for entry in mxs:
        if not isinstance(entry, str):
            raise PolicyListError(f"{where}: mxs entry {entry!r} is not a string")
        # A leading dot means "one label below" and becomes the MTA-STS wildcard.
        candidate = "*" + entry if entry.startswith(".") else entry
        if "*" in entry:
            raise PolicyListError(
                f"{where}: mxs entry {entry!r}: write suffixes as '.example.com', not with '*'"
            )
        try:
            pattern = normalise_pattern(candidate)
        except HostNameError as exc:
            raise PolicyListError(f"{where}: mxs entry {entry!r} is invalid: {exc}") from None
        if pattern not in patterns:
            patterns.append(pattern)
    report = obj.get("report", [])
    if not isinstance(report, list) or not all(isinstance(r, str) for r in report):
        raise PolicyListError(f"{where}: report must be a list of URI strings")
    pin = obj.get("pin")
    if pin is not None and not isinstance(pin, str):
        raise PolicyListError(f"{where}: pin must be a string naming a pinset")
    return ListPolicy(mode=Mode(mode_value), mxs=tuple(patterns), report=tuple(report), pin=pin)


def parse_list(data: bytes | str, *, now: datetime) -> PolicyList:
    """Parse and validate a policy list; refuse it if it has expired at `now`."""
    _aware(now)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        top = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise PolicyListError(f"the list is not UTF-8: {exc}") from None
    except RecursionError:
        raise PolicyListError("the list is nested too deeply") from None
    except PolicyListError:
        raise
    except ValueError as exc:  # JSONDecodeError, and over-long integers
        raise PolicyListError(f"the list is not valid JSON: {exc}") from None
    if not isinstance(top, dict):
        raise PolicyListError("the list must be a JSON object")
    for key in ("timestamp", "expires", "policies"):
        if key not in top:
            raise PolicyListError(f"the list has no {key!r}")
    timestamp = _parse_time(top["timestamp"], "timestamp")
    expires = _parse_time(top["expires"], "expires")
    if expires <= timestamp:
        raise PolicyListError(
            f"expires ({expires.isoformat()}) is not after timestamp ({timestamp.isoformat()})"
        )
    if now >= expires:
        raise PolicyListError(f"the list expired at {expires.isoformat()}; fetch a fresh one")

    raw_aliases = top.get("policy-aliases", {})
    if not isinstance(raw_aliases, dict):
        raise PolicyListError("policy-aliases must be an object of name -> policy")
    aliases = {
        name: _parse_policy(obj, f"policy-aliases[{name!r}]") for name, obj in raw_aliases.items()
    }

    raw_policies = top["policies"]
    if not isinstance(raw_policies, dict):
        raise PolicyListError("policies must be an object of domain -> policy")
    policies: dict[str, ListPolicy] = {}
    for domain, obj in raw_policies.items():
        where = f"policies[{domain!r}]"
        try:
            key = normalise_host(domain)
        except HostNameError as exc:
            raise PolicyListError(f"{where}: not a mail domain: {exc}") from None
        if key in policies:
            raise PolicyListError(f"{where}: {key!r} is listed twice")
        if isinstance(obj, dict) and "policy-alias" in obj:
            alias = obj["policy-alias"]
            if not isinstance(alias, str) or alias not in aliases:
                known = ", ".join(sorted(aliases)) or "none defined"
                raise PolicyListError(
                    f"{where}: policy-alias {alias!r} is not in policy-aliases ({known})"
                )
            policies[key] = aliases[alias]
        else:
            policies[key] = _parse_policy(obj, where)
    return PolicyList(timestamp=timestamp, expires=expires, policies=MappingProxyType(policies))


def choose_list(current: PolicyList | None, candidate: PolicyList, now: datetime) -> PolicyList:
    """The list to use after fetching `candidate`: it, unless expired or older than `current`.

    Refusing an older list stops an attacker (or a stale mirror) from rolling the list back to
    a version without a domain's entry. An equal timestamp is accepted (a re-fetch).
    """
    if candidate.is_expired(now):
        raise PolicyListError(
            f"the candidate list expired at {candidate.expires.isoformat()}; keeping the current"
        )
    if current is not None and candidate.timestamp < current.timestamp:
        raise PolicyListError(
            f"the candidate list (timestamp {candidate.timestamp.isoformat()}) is older than "
            f"the list in use ({current.timestamp.isoformat()}); refusing the rollback"
        )
    return candidate
