"""What mxguard tells Postfix: a ``DeliveryPolicy`` as an ``smtp_tls_policy_maps`` answer.

Pure functions, no I/O. The contract (postconf(5) ``smtp_tls_policy_maps``, socketmap_table(5),
docs/rfc-notes.md "Postfix's lookup-table contract"):

- **Requests** are ``<map name> <key>``. Keys as Postfix sends them: ``example.com`` (the
  next-hop domain), ``.example.com`` (a parent-domain lookup), ``[mx.example.com]`` and
  ``[mx.example.com]:587`` (a next-hop host, no MX lookup), ``example.com:587`` and IP
  literals ``[192.0.2.1]``.
- **Replies** are ``OK <level and attributes>``, ``NOTFOUND``, ``TEMP <reason>`` or
  ``PERM <reason>``.

Decisions (each one is argued where it is made; docs/postfix.md has the table):

- Usable DANE (RFC 7672 §2.2) -> ``dane-only``: Postfix verifies DANE itself through its own
  validating resolver; MTA-STS never overrides DANE (RFC 8461 §2).
- Only unusable TLSA (RFC 7672 §3.1) -> ``encrypt`` (``dane`` with ``unusable_tlsa="dane"``).
- MTA-STS ``enforce`` (RFC 8461 §4, §5) and static-list ``enforce`` ->
  ``secure match=<patterns> servername=hostname``. Postfix's ``.example.com`` matches any
  depth where MTA-STS's ``*.example.com`` matches one label; Postfix >= 3.10.5 enforces the
  exact MTA-STS semantics from the ``mx_host_pattern`` attributes (opt-in, below).
- MTA-STS ``testing`` (RFC 8461 §5: deliver anyway) -> ``NOTFOUND``, so that Postfix's own
  default level applies (answering ``may`` would *lower* an operator's ``encrypt`` default).
  With TLS-RPT attributes on, an entry must exist to carry them: ``may`` plus the attributes.
  ``strict_testing`` answers ``encrypt``: STRIPTLS is refused, certificate failures are
  tolerated (not RFC 8461 behaviour, hence opt-in).
- Local floors: ``tls`` -> ``encrypt``; ``verified`` -> ``secure match=hostname
  servername=hostname``; ``dane`` -> ``dane-only``.
- Learned levels in ``enforce`` mode (docs/learned.md), like local floors: a learned ``tls``
  -> ``encrypt``, a learned ``webpki`` -> ``secure match=hostname servername=hostname``; once
  the defer window has passed with ``after_window = bounce``, ``encrypt`` (Postfix returns the
  mail after its own queue lifetime: a policy table cannot make it bounce).
- Temporary or DNSSEC failure -> ``TEMP`` (never a weaker level). No policy -> ``NOTFOUND``.
  Null MX and nonexistent domains -> ``NOTFOUND``: Postfix bounces those on its own.
- Parent-domain keys (``.example.com``) -> ``NOTFOUND``: MTA-STS and DANE policies belong to
  exactly one domain (RFC 8461 §4, RFC 7672 §2.2); a parent's policy says nothing about
  ``sub.example.com``, and Postfix asks about ``sub.example.com`` itself first anyway.
- ``[host]`` / ``[host]:port`` / ``host:port`` (port other than 25) -> ``NOTFOUND`` unless a
  local rule names the host: MTA-STS and DANE policies are about a domain's MX hosts on port
  25, and no recipient domain is known for a literal next hop.
- IP literals -> ``NOTFOUND`` (no name, so no DANE or MTA-STS policy can apply).
- Invalid keys (``a..b``, over 253 octets, invalid UTF-8, control characters, spaces) ->
  ``PERM <reason>``: mxguard never says "no policy" about a name it could not evaluate. Postfix
  treats the lookup error as a reason to defer, and logs the reason.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from mxguard.engine.policy import Auth, DeliveryPolicy, Mode, MxPolicy, Source, Status, Tls
from mxguard.engine.resolve import DomainError, normalise_domain
from mxguard.learned.model import FloorState
from mxguard.postfix.netstring import pct_encode
from mxguard.protocol import localrules
from mxguard.protocol.results import ResultType

MAX_REASON = 200  # TEMP/PERM reasons end up in Postfix's log lines: keep them short


class Kind(enum.StrEnum):
    """socketmap_table(5) reply kinds."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Answer:
    """One reply. ``text`` is the level and attributes (OK) or the reason (TEMP, PERM)."""

    kind: Kind
    text: str = ""

    @property
    def label(self) -> str:
        """For metrics: the level of an OK answer (``dane-only``, ``secure``...), else the kind."""
        if self.kind is Kind.OK:
            return self.text.split(" ", 1)[0]
        return self.kind.value.lower()

    def socketmap(self) -> bytes:
        """The netstring payload (socketmap_table(5)); NOTFOUND carries an empty reason."""
        return f"{self.kind.value} {self.text}".encode()

    def tcp_table(self) -> bytes:
        """The tcp_table(5) reply line: 200 found, 500 not found, 400 failed."""
        code = {Kind.OK: b"200", Kind.NOTFOUND: b"500"}.get(self.kind, b"400")
        text = self.text or self.kind.value.lower()
        return code + b" " + pct_encode(text) + b"\n"


def temp(reason: str) -> Answer:
    return Answer(Kind.TEMP, _reason(reason))


def perm(reason: str) -> Answer:
    return Answer(Kind.PERM, _reason(reason))


NOTFOUND = Answer(Kind.NOTFOUND)


def _reason(text: str) -> str:
    """One printable ASCII line of at most MAX_REASON characters (it goes into a log line)."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= MAX_REASON else clean[: MAX_REASON - 3] + "..."


@dataclass(frozen=True, slots=True)
class Options:
    """How policies are translated; all off by default (safe for Postfix 3.7)."""

    tlsrpt_attributes: bool = False  # Postfix >= 3.10: policy_type, policy_domain, ...
    strict_testing: bool = False  # MTA-STS testing -> encrypt instead of Postfix's default
    unusable_tlsa: str = "encrypt"  # or "dane": let Postfix apply its own DANE rules
    map_names: frozenset[str] = frozenset({"postfix"})


# --- keys ---------------------------------------------------------------------------------


class KeyKind(enum.StrEnum):
    DOMAIN = "domain"  # example.com (or example.com:25)
    PARENT = "parent"  # .example.com
    NEXTHOP = "nexthop"  # [mx.example.com], [mx.example.com]:587, example.com:587
    IP_LITERAL = "ip-literal"  # [192.0.2.1], [ipv6:2001:db8::1], 192.0.2.1


@dataclass(frozen=True, slots=True)
class Key:
    kind: KeyKind
    name: str  # normalised (lower-case A-labels), or the address of an IP literal
    port: int | None = None


class InvalidKey(ValueError):
    """The key is not something Postfix could look up; the message says why."""


def parse_request(payload: bytes, options: Options) -> Key | Answer:
    """socketmap ``<map name> <key>`` -> the parsed key, or the answer to an invalid request."""
    name, sep, raw = payload.partition(b" ")
    if not sep:
        return perm("request is not '<map name> <key>'")
    if name.decode("utf-8", "replace") not in options.map_names:
        known = ", ".join(sorted(options.map_names))
        return perm(f"unknown map {name[:64].decode('utf-8', 'replace')!r}; known: {known}")
    return parse_key_bytes(raw)


def parse_key_bytes(raw: bytes) -> Key | Answer:
    """A key as received (UTF-8 bytes) -> the parsed key, or the PERM answer saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return perm(f"invalid key: not valid UTF-8 (byte {exc.start})")
    try:
        return parse_key(text)
    except InvalidKey as exc:
        return perm(f"invalid key: {exc}")


def parse_key(raw: str) -> Key:
    if not raw:
        raise InvalidKey("empty key")
    bad = next((c for c in raw if c <= " " or c == "\x7f"), None)
    if bad is not None:
        raise InvalidKey(f"control character or space U+{ord(bad):04X} in key")
    key = raw.lower()
    if key.startswith("["):
        host, close, rest = key[1:].partition("]")
        if not close:
            raise InvalidKey(f"{raw!r} has '[' without ']'")
        port = _port(rest[1:], raw) if rest.startswith(":") else None
        if rest and port is None:
            raise InvalidKey(f"{raw!r}: only ':PORT' may follow ']'")
        address = _ip(host.removeprefix("ipv6:"))
        if address is not None:
            return Key(KeyKind.IP_LITERAL, address, port)
        return Key(KeyKind.NEXTHOP, _domain(host), port)
    if key.startswith("."):
        return Key(KeyKind.PARENT, _domain(key[1:]))
    address = _ip(key)
    if address is not None:
        return Key(KeyKind.IP_LITERAL, address)
    name, colon, port_text = key.rpartition(":")
    if colon:
        port = _port(port_text, raw)
        # Port 25 is where MTA-STS and DANE policies apply (RFC 8461 §4, RFC 7672 §2.2).
        return Key(KeyKind.DOMAIN if port == 25 else KeyKind.NEXTHOP, _domain(name), port)
    return Key(KeyKind.DOMAIN, _domain(key))


def _port(text: str, raw: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidKey(f"{raw!r}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _domain(text: str) -> str:
    try:
        return normalise_domain(text)
    except DomainError as exc:
        raise InvalidKey(str(exc)) from None


def key_answer(key: Key, rules: localrules.Rules | None) -> Answer | None:
    """The answer for a key that needs no policy resolution; None for a domain to resolve."""
    if key.kind is KeyKind.DOMAIN:
        return None
    if key.kind is KeyKind.NEXTHOP and rules:
        rule = localrules.floor_for(rules, key.name)
        if rule is not None:
            return floor_answer(rule.floor)
    return NOTFOUND


def floor_answer(floor: localrules.Floor) -> Answer:
    """A local floor on its own (for literal next hops)."""
    if floor is localrules.Floor.DANE:
        return Answer(Kind.OK, "dane-only")
    if floor is localrules.Floor.VERIFIED:
        return Answer(Kind.OK, "secure match=hostname servername=hostname")
    if floor is localrules.Floor.TLS:
        return Answer(Kind.OK, "encrypt")
    return NOTFOUND


# --- policies -----------------------------------------------------------------------------


class _Level(enum.IntEnum):
    MAY = 0
    ENCRYPT = 1
    SECURE = 2
    DANE_ONLY = 3


def policy_answer(
    policy: DeliveryPolicy,
    options: Options | None = None,
    *,
    list_patterns: Sequence[str] = (),
) -> Answer:
    """The answer for a resolved domain. ``list_patterns``: the list entry's MX patterns."""
    options = options or Options()
    if policy.learned is not None and policy.learned.state is FloorState.BOUNCE:
        # docs/learned.md: a table lookup cannot make Postfix bounce; "encrypt" keeps the mail
        # out of plain text, and Postfix returns it after its maximal_queue_lifetime.
        return Answer(Kind.OK, "encrypt")
    if policy.status is Status.FAIL:
        # Null MX (RFC 7505) or no such domain: Postfix bounces these without our help.
        return NOTFOUND
    if policy.status is Status.DEFER:
        return _deferred_answer(policy)

    usable = policy.usable_mx
    levels = [_host_level(m.tls, m.auth) for m in usable]
    top = max(levels, default=_Level.MAY)
    # Hosts mxguard must skip because a DNSSEC or lookup failure hides their TLSA or address
    # (RFC 7672 §2.2). One answer covers the whole domain, so Postfix cannot be told to skip
    # just them: never answer a level that would let Postfix use them unauthenticated.
    skipped = [
        m
        for m in policy.mx
        if m.allowed and m.defer is not None and m.defer.result_type is not ResultType.DANE_REQUIRED
    ]
    if skipped and top is _Level.MAY:
        # Postfix's per-host "dane" does exactly what mxguard does: it looks the TLSA records
        # up itself, skips a host whose lookup fails, and uses the others as they are.
        return Answer(Kind.OK, "dane")
    if skipped and top is _Level.ENCRYPT:
        return temp(_defer_reason(policy))
    if top is _Level.DANE_ONLY:
        return Answer(Kind.OK, _dane_level(usable, levels))
    if top is _Level.SECURE:
        return Answer(Kind.OK, _secure(policy, options, list_patterns))
    if top is _Level.ENCRYPT:
        only_tlsa = all(m.source is Source.DANE for m in usable if m.tls is Tls.REQUIRED)
        if only_tlsa and options.unusable_tlsa == "dane":
            return Answer(Kind.OK, "dane")
        return Answer(Kind.OK, "encrypt")
    return _opportunistic_answer(policy, options)


def _deferred_answer(policy: DeliveryPolicy) -> Answer:
    """A domain the engine defers: ``TEMP``, except under a local ``dane`` floor."""
    deferred = [m.defer for m in policy.mx if m.defer is not None]
    if (
        policy.local_floor == localrules.Floor.DANE.value
        and deferred
        and all(d.result_type is ResultType.DANE_REQUIRED for d in deferred)
    ):
        # A local "dane" floor without usable TLSA: Postfix's dane-only defers the same
        # way, and it re-checks DNS on every attempt without waiting for our cache.
        return Answer(Kind.OK, "dane-only")
    return temp(_defer_reason(policy))


def _dane_level(usable: Sequence[MxPolicy], levels: Sequence[_Level]) -> str:
    """``dane`` or ``dane-only`` for a domain where at least one host is DANE-authenticated.

    Postfix's "dane" applies DANE per host (usable TLSA: verified; only unusable TLSA:
    encrypt; no TLSA: may). That equals our per-host decision when every other host is
    opportunistic or DANE-unusable; anything stricter (an MTA-STS or local floor on the other
    hosts) must not be lowered, and MTA-STS must not override DANE (RFC 8461 §2): then only
    DANE hosts may be used: dane-only.
    """
    others_fit = all(
        lv is _Level.MAY or (lv is _Level.ENCRYPT and m.source is Source.DANE)
        for m, lv in zip(usable, levels, strict=True)
        if lv is not _Level.DANE_ONLY
    )
    mixed = any(lv is not _Level.DANE_ONLY for lv in levels)
    return "dane" if mixed and others_fit else "dane-only"


def _opportunistic_answer(policy: DeliveryPolicy, options: Options) -> Answer:
    """Opportunistic everywhere: MTA-STS/list testing, or no policy at all."""
    if policy.source in (Source.MTA_STS, Source.LIST) and policy.mode is Mode.TESTING:
        level = "encrypt" if options.strict_testing else "may"
        attrs = _sts_attributes(policy) if options.tlsrpt_attributes else ""
        if options.strict_testing or attrs:
            return Answer(Kind.OK, level + attrs)
        return NOTFOUND  # Postfix's own default applies (RFC 8461 §5: deliver anyway)
    # A failed MTA-STS fetch with nothing cached is no policy (RFC 8461 §5): NOTFOUND, with
    # TLS-RPT attributes too. Postfix 3.10 would take `may policy_type=sts policy_domain=…
    # policy_failure=sts-policy-fetch-error`, but it reports such sessions as an `sts` policy
    # without policy lines that succeeded (it uses policy_failure only to rename a certificate
    # failure, which `may` never has: tls_verify.c), and smtp(8) before 3.10.6 crashes on an
    # `sts` answer without policy_string and mx_host_pattern attributes.
    return NOTFOUND


def _host_level(tls: Tls, auth: Auth) -> _Level:
    if auth is Auth.DANE:
        return _Level.DANE_ONLY
    if auth is Auth.PKIX:
        return _Level.SECURE
    if tls is Tls.REQUIRED:
        return _Level.ENCRYPT
    return _Level.MAY


def _secure(policy: DeliveryPolicy, options: Options, list_patterns: Sequence[str]) -> str:
    """``secure`` with ``match=`` the MX host names the policy allows, as mxguard resolved them.

    Postfix checks the certificate against *any* ``match=`` entry. With the policy's patterns
    (``.example.com``) a certificate for any name below the domain would pass on a connection
    to ``mx1.example.com``, which RFC 8461 §4.2 forbids (the certificate must be valid for the
    MX host itself); with ``match=hostname`` alone a spoofed MX pointing at the attacker's own
    host, with a certificate valid for that host, would pass. The allowed hosts' own names
    close both: an impostor needs a certificate for one of the domain's real, policy-approved
    MX hosts.
    """
    allowed = [m.host for m in policy.mx if m.allowed and m.auth is Auth.PKIX]
    sts_or_list = policy.source is Source.MTA_STS or (
        policy.source is Source.LIST and bool(list_patterns)
    )
    if not sts_or_list or not allowed:
        # A local "verified" floor: the certificate must be valid for the MX host name, as
        # mxguard's own delivery checks it.
        return "secure match=hostname servername=hostname"
    text = f"secure match={':'.join(dict.fromkeys(allowed))} servername=hostname"
    if options.tlsrpt_attributes and policy.source is Source.MTA_STS:
        text += _sts_attributes(policy)
    return text


def _sts_attributes(policy: DeliveryPolicy) -> str:
    """Postfix >= 3.10 TLS-RPT attributes for an MTA-STS policy (RFC 8460 §4.4)."""
    sts = policy.mta_sts
    if policy.source is not Source.MTA_STS or sts is None:
        return ""
    parts = [" policy_type=sts", f"policy_domain={policy.domain}"]
    parts += [f"mx_host_pattern={p}" for p in sts.mx]
    for line in sts.policy_strings:
        # Postfix's "{ name = value }" form carries values with spaces. A brace inside a
        # policy line cannot be expressed: drop the line rather than corrupt the entry.
        if "{" not in line and "}" not in line and line.isprintable():
            parts.append(f"{{ policy_string = {line} }}")
    return " ".join(parts)


def _defer_reason(policy: DeliveryPolicy) -> str:
    failure = next(iter(policy.errors), None)
    if failure is not None:
        return f"{policy.domain}: {failure}"  # a DNS error names no result type
    return f"{policy.domain}: no MX host may be used now ({'; '.join(policy.explanation)})"
