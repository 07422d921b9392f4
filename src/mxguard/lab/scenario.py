"""Lab scenarios: the description of a simulated mail internet.

A scenario lists mail domains. Each domain is one DNS zone under the lab's top-level domain
(signed, unsigned or deliberately bogus), with its MX records, the MX hosts that live in the
zone (each an SMTP receiver with a certificate variant and, optionally, TLSA records and an
attacker in front of it), an MTA-STS setup (TXT record, policy body, policy host certificate
and behaviour) and TLS-RPT records. Scenarios come from TOML files or are built in Python.

This module only describes; ``mxguard.lab.lab`` brings a scenario to life.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mxguard.protocol import names


class ScenarioError(ValueError):
    """A scenario file or object is invalid; the message names the field and what is allowed."""


class Dnssec(enum.StrEnum):
    SIGNED = "signed"  # chain of trust from the lab root via DS
    UNSIGNED = "unsigned"  # insecure delegation: NS in the parent, provably no DS
    BOGUS = "bogus"  # the parent's DS names a key the zone is not signed with


class CertKind(enum.StrEnum):
    """Certificate variants of lab TLS servers (SMTP receivers and MTA-STS policy hosts)."""

    VALID = "valid"  # issued by the lab root CA for the host name
    INTERMEDIATE = "intermediate"  # issued by the lab intermediate CA; the chain is sent
    EXPIRED = "expired"  # lab root CA, right name, validity ended in the past
    EXPIRING = "expiring"  # lab root CA, right name, valid now but only for another 10 days
    WRONG_NAME = "wrong-name"  # lab root CA, valid, but for another name
    SELF_SIGNED = "self-signed"  # for the host name, signed by its own key
    UNTRUSTED = "untrusted"  # right name, issued by a CA that is not in the lab CA file
    # Odd but real issuances (lab/certprofiles.py), each one change from a public CA's profile;
    # the comment says what OpenSSL, and so Postfix and mxguard, make of it.
    NO_AKI = "no-aki"  # no authorityKeyIdentifier: accepted
    LEAF_CA = "leaf-ca"  # the leaf has cA=TRUE: accepted
    NC_LEADING_DOT = "nc-leading-dot"  # intermediate's name constraint ".zone": accepted
    NEGATIVE_SERIAL = "negative-serial"  # accepted
    EMPTY_SUBJECT = "empty-subject"  # empty subject, non-critical SAN: accepted
    RSA1024 = "rsa1024"  # below security level 2 (RFC 7525 §4.3): validation-failure
    AKI_MISMATCH = "aki-mismatch"  # AKI names another key than the issuer's: not trusted
    SHA1 = "sha1"  # signed with SHA-1: validation-failure
    CN_ONLY = "cn-only"  # name only in the CN, no SAN: host mismatch (RFC 8461 §4.2)
    IP_SAN_ONLY = "ip-san-only"  # only an IP address SAN: host mismatch (RFC 8461 §4.2)


class AttackMode(enum.StrEnum):
    """What the on-path attacker in front of an MX host does to SMTP sessions."""

    PASS = "pass"  # forward everything unchanged (an honest path)
    STRIP = "strip"  # delete STARTTLS from the EHLO reply, leave every other line alone
    REFUSE_454 = "454"  # answer STARTTLS with 454 itself
    INTERCEPT_SELF_SIGNED = "intercept-self-signed"  # terminate TLS with a self-signed cert
    INTERCEPT_WRONG_NAME = "intercept-wrong-name"  # terminate TLS with a lab-CA cert, other name


class DnsAttack(enum.StrEnum):
    """What the attacker does to a domain's DNS answers (applied at the authoritative side)."""

    NONE = "none"
    DROP_STS_TXT = "drop-sts-txt"  # the _mta-sts TXT record disappears
    SPOOF_MX = "spoof-mx"  # MX points at the attacker's own mail host
    SPOOF_TLSA = "spoof-tlsa"  # TLSA records pin the attacker's certificate instead
    BREAK_SIGNATURES = "break-signatures"  # RRSIGs of the zone no longer verify


class PolicyBehaviour(enum.StrEnum):
    """How the HTTPS host mta-sts.<domain> answers GET /.well-known/mta-sts.txt."""

    SERVE = "serve"  # 200, text/plain, the policy
    NOT_FOUND = "404"
    REDIRECT = "redirect"  # 301 to another URL that would serve the policy
    WRONG_CONTENT_TYPE = "content-type"  # 200 with text/html
    OVERSIZE = "oversize"  # 200 with a body larger than 64 KiB
    STALL = "stall"  # accept the connection and the request, then never answer


ATTACKER_DOMAIN = "attacker"  # label under the lab TLD of the attacker's own zone
DEFAULT_STS_TXT = ("v=STSv1; id=20261129T000000;",)


@dataclass(frozen=True, slots=True)
class Host:
    """An MX host: an SMTP receiver at its own loopback address.

    ``tlsa`` entries are ``"U S M"`` (association data computed from the host's real
    certificate; for usage 2 from the CA that issued it), ``"U S M HEX"`` (given literally) or
    ``"wrong U S M"`` (well-formed data that matches nothing).
    """

    name: str
    starttls: bool = True
    cert: CertKind = CertKind.VALID
    tlsa: tuple[str, ...] = ()
    attack: AttackMode = AttackMode.PASS
    aliases: tuple[str, ...] = ()  # names that are CNAMEs of this host
    rcpt_reply: str | None = None  # e.g. "550 5.1.1 no such user": refuse every recipient
    requiretls: bool = False  # offer REQUIRETLS (RFC 8689) after STARTTLS, as Postfix 3.11 can


@dataclass(frozen=True, slots=True)
class MtaSts:
    """A domain's MTA-STS publication: TXT records, the policy body and the policy host."""

    txt: tuple[str, ...] = DEFAULT_STS_TXT
    mode: str = "enforce"
    mx: tuple[str, ...] = ()  # patterns; empty means "*.<domain>"
    max_age: int = 86400
    policy: str | None = None  # raw body that overrides mode/mx/max_age
    cert: CertKind = CertKind.VALID
    behaviour: PolicyBehaviour = PolicyBehaviour.SERVE

    def body(self, domain: str) -> str:
        if self.policy is not None:
            return self.policy
        lines = ["version: STSv1", f"mode: {self.mode}"]
        lines += [f"mx: {p}" for p in (self.mx or (f"*.{domain}",))]
        lines.append(f"max_age: {self.max_age}")
        return "\r\n".join(lines) + "\r\n"


@dataclass(frozen=True, slots=True)
class Domain:
    """A mail domain and the DNS zone of the same name.

    ``mx`` holds ``"PREF HOST"`` strings; ``("0 .",)`` is a null MX (RFC 7505) and ``None``
    publishes no MX at all (implicit MX: the domain's own address records).
    """

    name: str
    description: str = ""
    dnssec: Dnssec = Dnssec.SIGNED
    mx: tuple[str, ...] | None = ()
    hosts: tuple[Host, ...] = ()
    mta_sts: MtaSts | None = None
    tlsrpt: tuple[str, ...] = ()  # TXT records at _smtp._tls.<domain>
    extra: tuple[str, ...] = ()  # further records, zone-file syntax, names relative to the zone
    dns_attack: DnsAttack = DnsAttack.NONE
    demonstrates: str = ""  # one line for `mxguard lab up`: what this domain shows
    # Client-side protections the lab writes into the config it gives clients:
    listed: str | None = None  # mode of an entry in the lab's static policy list
    local_rule: str | None = None  # floor of a local rule ("tls", "verified", "dane")

    def mx_hosts(self) -> list[tuple[int, str]]:
        out = []
        for entry in self.mx or ():
            pref, _, host = entry.partition(" ")
            out.append((int(pref), host.strip()))
        return out


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str = ""
    tld: str = "test"
    domains: tuple[Domain, ...] = ()

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r} in scenario {self.name!r}")

    def hosts(self) -> list[Host]:
        return [h for d in self.domains for h in d.hosts]

    def host(self, name: str) -> Host:
        for h in self.hosts():
            if h.name == name or name in h.aliases:
                return h
        raise KeyError(f"no host {name!r} in scenario {self.name!r}")

    def with_domain(self, domain: Domain) -> Scenario:
        """A copy with ``domain`` replacing the domain of the same name (or added)."""
        others = tuple(d for d in self.domains if d.name != domain.name)
        return replace(self, domains=(*others, domain))

    def validate(self) -> Scenario:
        seen: set[str] = set()
        suffix = "." + self.tld
        for d in self.domains:
            if not d.name.endswith(suffix) or d.name == self.tld:
                raise ScenarioError(f"domain {d.name!r}: must be a name under .{self.tld}")
            if d.name in seen:
                raise ScenarioError(f"domain {d.name!r} is listed twice")
            seen.add(d.name)
            for entry in d.mx or ():
                pref, _, host = entry.partition(" ")
                if not pref.isdigit() or not host.strip():
                    raise ScenarioError(
                        f"domain {d.name!r}: mx entry {entry!r} is not 'PREFERENCE HOST'"
                    )
            for h in d.hosts:
                for n in (h.name, *h.aliases):
                    if n != d.name and not n.endswith("." + d.name):
                        raise ScenarioError(
                            f"host {n!r} is listed under domain {d.name!r} but is not in its zone"
                        )
                for t in h.tlsa:
                    _check_tlsa_spec(h.name, t)
        return self


def _name(value: Any, where: str) -> str:
    try:
        return names.dns_name(str(value))
    except names.HostNameError as exc:
        raise ScenarioError(f"{where}: name {str(value)[:80]!r}: {exc}") from None


def _check_tlsa_spec(host: str, spec: str) -> None:
    words = spec.split()
    if words and words[0] == "wrong":
        words = words[1:]
    if len(words) not in (3, 4) or not all(w.isdigit() for w in words[:3]):
        raise ScenarioError(
            f"host {host!r}: tlsa {spec!r} is not 'U S M', 'U S M HEX' or 'wrong U S M'"
        )


# --- TOML ---------------------------------------------------------------------------------


def _enum(cls: type[enum.StrEnum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ScenarioError(f"{where}: {value!r} is not one of {allowed}") from None


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ScenarioError(f"{where}: expected a string or a list of strings")
    return tuple(value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _host(t: Mapping[str, Any], where: str) -> Host:
    _check_keys(
        t,
        {"name", "starttls", "cert", "tlsa", "attack", "aliases", "rcpt_reply", "requiretls"},
        where,
    )
    rcpt_reply = t.get("rcpt_reply")
    if rcpt_reply is not None and not (
        isinstance(rcpt_reply, str) and rcpt_reply[:3].isdigit() and rcpt_reply[0] in "45"
    ):
        raise ScenarioError(f"{where}.rcpt_reply: expected an SMTP refusal such as '550 5.1.1 ...'")
    if "name" not in t:
        raise ScenarioError(f"{where}: 'name' is required")
    return Host(
        name=_name(t["name"], where),
        starttls=bool(t.get("starttls", True)),
        cert=_enum(CertKind, t.get("cert", "valid"), f"{where}.cert"),
        tlsa=_strings(t.get("tlsa", []), f"{where}.tlsa"),
        attack=_enum(AttackMode, t.get("attack", "pass"), f"{where}.attack"),
        aliases=_strings(t.get("aliases", []), f"{where}.aliases"),
        rcpt_reply=rcpt_reply,
        requiretls=bool(t.get("requiretls", False)),
    )


def _mta_sts(t: Mapping[str, Any], where: str) -> MtaSts:
    _check_keys(t, {"txt", "mode", "mx", "max_age", "policy", "cert", "behaviour"}, where)
    return MtaSts(
        txt=_strings(t.get("txt", list(DEFAULT_STS_TXT)), f"{where}.txt"),
        mode=str(t.get("mode", "enforce")),
        mx=_strings(t.get("mx", []), f"{where}.mx"),
        max_age=int(t.get("max_age", 86400)),
        policy=t.get("policy"),
        cert=_enum(CertKind, t.get("cert", "valid"), f"{where}.cert"),
        behaviour=_enum(PolicyBehaviour, t.get("behaviour", "serve"), f"{where}.behaviour"),
    )


def _domain(t: Mapping[str, Any], where: str) -> Domain:
    keys = {
        "name",
        "description",
        "demonstrates",
        "dnssec",
        "mx",
        "host",
        "mta_sts",
        "tlsrpt",
        "extra",
        "dns_attack",
        "listed",
        "local_rule",
    }
    _check_keys(t, keys, where)
    if "name" not in t:
        raise ScenarioError(f"{where}: 'name' is required")
    name = _name(t["name"], where)
    mx = _strings(t["mx"], f"{where}.mx") if "mx" in t else None
    hosts = t.get("host", [])
    if not isinstance(hosts, list):
        raise ScenarioError(f"{where}.host: expected [[domain.host]] tables")
    return Domain(
        name=name,
        description=str(t.get("description", "")),
        demonstrates=str(t.get("demonstrates", "")),
        dnssec=_enum(Dnssec, t.get("dnssec", "signed"), f"{where}.dnssec"),
        mx=mx,
        hosts=tuple(_host(h, f"{where}.host[{i}]") for i, h in enumerate(hosts)),
        mta_sts=_mta_sts(t["mta_sts"], f"{where}.mta_sts") if "mta_sts" in t else None,
        tlsrpt=_strings(t.get("tlsrpt", []), f"{where}.tlsrpt"),
        extra=_strings(t.get("extra", []), f"{where}.extra"),
        dns_attack=_enum(DnsAttack, t.get("dns_attack", "none"), f"{where}.dns_attack"),
        listed=_choice(t.get("listed"), ("enforce", "testing"), f"{where}.listed"),
        local_rule=_choice(t.get("local_rule"), ("tls", "verified", "dane"), f"{where}.local_rule"),
    )


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str | None:
    if value is None:
        return None
    if value not in allowed:
        raise ScenarioError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    return str(value)


def from_toml(text: str, *, source: str = "<scenario>") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    _check_keys(data, {"name", "description", "tld", "domain"}, source)
    domains = data.get("domain", [])
    if not isinstance(domains, list):
        raise ScenarioError(f"{source}: 'domain' must be [[domain]] tables")
    try:
        scenario = Scenario(
            name=str(data.get("name", Path(source).stem)),
            description=str(data.get("description", "")),
            tld=str(data.get("tld", "test")).strip(".").lower(),
            domains=tuple(_domain(d, f"{source}: domain[{i}]") for i, d in enumerate(domains)),
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ScenarioError):
            raise
        raise ScenarioError(f"{source}: {exc}") from None
    return scenario.validate()


SCENARIO_DIR = Path(__file__).parent / "scenarios"


def builtin_names() -> list[str]:
    """The names of the scenarios that ship with mxguard."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def named(name_or_path: str) -> Scenario:
    """A built-in scenario by name, or a scenario TOML file by path."""
    if name_or_path in builtin_names():
        return load(SCENARIO_DIR / f"{name_or_path}.toml")
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        raise ScenarioError(
            f"no built-in scenario {name_or_path!r} (there are: {', '.join(builtin_names())}) "
            "and no such file"
        )
    return load(path)


def load(path: Path) -> Scenario:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
    return from_toml(text, source=str(path))


__all__ = [
    "ATTACKER_DOMAIN",
    "AttackMode",
    "CertKind",
    "DnsAttack",
    "Dnssec",
    "Domain",
    "Host",
    "MtaSts",
    "PolicyBehaviour",
    "Scenario",
    "ScenarioError",
    "from_toml",
    "load",
]
