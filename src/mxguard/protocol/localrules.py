"""Operator rules: the minimum transport security the administrator demands per destination.

Like Exim's `hosts_require_tls` or Postfix's `smtp_tls_policy_maps` entries, a local rule says
"mail to this domain must at least use ...". Rules only raise the bar: the engine combines a
rule's floor with DANE, MTA-STS and the policy list and never lets a rule lower them
(docs/design.md, "Precedence"). No RFC defines these rules; the result type vocabulary is
RFC 8460 §4.3.

Configuration shape (a TOML table): `{"example.com": "verified", ".corp.example": "tls"}`.

- `example.com` matches exactly that domain.
- `.corp.example` matches every subdomain at any depth (`a.corp.example`, `a.b.corp.example`)
  but not `corp.example` itself; write both keys to cover both. This is Postfix's meaning of a
  leading dot, which operators know, and deliberately not MTA-STS's one-label `*.`.
- The most specific rule wins: an exact rule beats any suffix, a longer suffix beats a shorter.
- Floors, ordered: `none < tls < verified < dane`. `tls`: encryption required, any
  certificate. `verified`: authenticated TLS required (DANE or WebPKI). `dane`: DANE required;
  when the destination has no usable DANE TLSA records the failure is `dane-required`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mxguard.protocol.names import HostNameError, normalise_host
from mxguard.protocol.results import ResultType


class RuleError(ValueError):
    """A local rule in the configuration is invalid; `.reason` names the key and the fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Floor(enum.Enum):
    """The minimum security a rule demands. The value is the configuration spelling; floors are
    ordered `none < tls < verified < dane`, so they compare with < and combine with max()."""

    NONE = "none"
    TLS = "tls"
    VERIFIED = "verified"
    DANE = "dane"

    @property
    def rank(self) -> int:
        """Position in the order none < tls < verified < dane."""
        return _RANK[self]

    @property
    def label(self) -> str:
        """The configuration spelling: none, tls, verified, dane."""
        return self.value

    @classmethod
    def from_label(cls, label: str) -> Floor:
        """The floor spelled `label` in the configuration (exact, lower-case)."""
        for floor in cls:
            if floor.value == label:
                return floor
        known = ", ".join(f.value for f in cls)
        raise ValueError(f"unknown floor {label!r}; use one of: {known}")

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Floor):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Floor):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Floor):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Floor):
            return NotImplemented
        return self.rank >= other.rank


_RANK = {floor: rank for rank, floor in enumerate(Floor)}

# The RFC 8460 §4.3.2 result type when a `dane` floor finds no usable DANE records.
DANE_UNAVAILABLE = ResultType.DANE_REQUIRED


@dataclass(frozen=True, slots=True)
class Rule:
    """One operator rule: `domain` (normalised), whether it covers subdomains only, the floor."""

    domain: str
    suffix: bool
    floor: Floor

    @property
    def pattern(self) -> str:
        """The rule as written in the configuration (normalised): `example.com`, `.corp.example`."""
        return "." + self.domain if self.suffix else self.domain

    def covers(self, domain: str) -> bool:
        """Whether this rule applies to the normalised `domain`."""
        if self.suffix:
            return domain.endswith("." + self.domain)
        return domain == self.domain


Rules = tuple[Rule, ...]
"""A parsed set of operator rules, as `parse_rules` returns it."""


def parse_rules(mapping: Mapping[str, object]) -> Rules:
    """Rules from the TOML table `{domain-or-.suffix: floor}`, with errors naming the key."""
    rules: dict[str, Rule] = {}
    for raw_key, raw_floor in mapping.items():
        if not isinstance(raw_key, str):
            raise RuleError(f"rule key {raw_key!r} must be a string")
        if raw_key.startswith("*."):
            raise RuleError(
                f"rule {raw_key!r}: write '.{raw_key[2:]}' for its subdomains ('*' is not used)"
            )
        suffix = raw_key.startswith(".")
        name = raw_key[1:] if suffix else raw_key
        try:
            domain = normalise_host(name)
        except HostNameError as exc:
            raise RuleError(
                f"rule {raw_key!r}: not a domain ({exc}); write 'example.com' or '.example.com'"
            ) from None
        if not isinstance(raw_floor, str):
            raise RuleError(
                f"rule {raw_key!r}: the floor must be a string (none, tls, verified, dane), "
                f"not {raw_floor!r}"
            )
        try:
            floor = Floor.from_label(raw_floor)
        except ValueError as exc:
            raise RuleError(f"rule {raw_key!r}: {exc}") from None
        rule = Rule(domain=domain, suffix=suffix, floor=floor)
        if rule.pattern in rules:
            raise RuleError(
                f"rule {raw_key!r} duplicates {rules[rule.pattern].pattern!r} (names are compared "
                "case-insensitively, as A-labels)"
            )
        rules[rule.pattern] = rule
    return tuple(rules.values())


def floor_for(rules: Sequence[Rule], domain: str) -> Rule | None:
    """The most specific rule covering `domain`, or None (also for an invalid domain name).

    An exact rule beats any suffix rule; among suffixes the longest (most labels) wins.
    """
    try:
        name = normalise_host(domain)
    except HostNameError:
        return None
    best: Rule | None = None
    for rule in rules:
        if not rule.covers(name):
            continue
        if not rule.suffix:
            return rule
        if best is None or rule.domain.count(".") > best.domain.count("."):
            best = rule
    return best
