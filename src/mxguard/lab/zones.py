"""The lab's DNS data: zones built from a scenario, signed with DNSSEC or deliberately not.

A scenario (``mxguard.lab.scenario``) describes mail domains; this module turns it into the
zones an authoritative server (``mxguard.lab.dns_server``) serves and a validating resolver
(``mxguard.lab.unbound``) checks against the lab's trust anchor:

- the lab root zone ``<tld>.``, always signed, delegates every top-level domain zone with NS
  and, for a signed child, a DS (RFC 4034 §5); an unsigned child gets no DS, and the NSEC at
  the delegation point proves that (RFC 4035 §5.2); a bogus child gets a DS for a key it is
  not signed with, so its chain of trust breaks (RFC 4035 §5.5);
- one zone per mail domain: SOA, NS, MX (RFC 7505 null MX), A, CNAME, ``_mta-sts`` TXT
  (RFC 8461 §3.1), ``_smtp._tls`` TXT (RFC 8460 §3), TLSA at ``_25._tcp.<host>``
  (RFC 7672 §2.2, RFC 6698 §2.1) and extra records;
- ``attacker.<tld>``, unsigned, home of the attacker's mail host ``mx.attacker.<tld>``.

A zone whose name lies below another lab zone is delegated by that zone, not by the root.

DNS attacks (``DnsAttack``) model an on-path attacker who rewrites answers: they are applied
*after* signing, so the original RRSIGs stay and no longer match the forged data. In an
unsigned zone the forgery succeeds; in a signed zone it validates as bogus — which is the
point DANE for SMTP rests on (RFC 7672 §2.1).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dns.dnssec
import dns.dnssectypes
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.DS
import dns.rdtypes.ANY.RRSIG
import dns.rdtypes.ANY.TXT
import dns.rdtypes.dnskeybase
import dns.transaction
import dns.zone
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import (
    ATTACKER_DOMAIN,
    CertKind,
    DnsAttack,
    Dnssec,
    Domain,
    Host,
    Scenario,
)
from mxguard.protocol import names
from mxguard.protocol.dane import association_data

TTL = 60  # short, so that scenario switches reach resolvers quickly
_IN = dns.rdataclass.IN
_ALGORITHM = dns.dnssectypes.Algorithm.ECDSAP256SHA256  # RFC 6605; algorithm 13
# RFC 4034 §2.1.1: flags 257 = Zone Key + Secure Entry Point. One key per zone signs
# everything (a "combined signing key"), which validators accept.
_KSK_FLAGS = dns.rdtypes.dnskeybase.Flag.ZONE | dns.rdtypes.dnskeybase.Flag.SEP
_MAX_CHARACTER_STRING = 255  # RFC 1035 §3.3: one <character-string> holds at most 255 octets


class ZoneBuildError(ValueError):
    """The scenario cannot be turned into zones; the message names the record and why."""


@dataclass(frozen=True)
class ZoneKey:
    """A DNSSEC signing key of one zone: the private key and its DNSKEY record."""

    zone: str  # absolute-free zone name, e.g. "example.test"
    private_key: ec.EllipticCurvePrivateKey
    dnskey: dns.rdtypes.ANY.DNSKEY.DNSKEY

    def ds(self) -> dns.rdtypes.ANY.DS.DS:
        """The DS record a parent publishes for this key (RFC 4034 §5.1.4, SHA-256)."""
        return dns.dnssec.make_ds(_absolute(self.zone), self.dnskey, "SHA256")


class LabKeys:
    """DNSSEC keys of the lab, generated on first use and cached by zone name.

    The root zone's key is the trust anchor handed to the resolver; because it is cached, it
    stays the same when the lab switches scenarios, so the resolver need not restart.
    """

    def __init__(self, tld: str = "test") -> None:
        self.tld = _plain(tld)
        self._keys: dict[str, ZoneKey] = {}
        self._decoys: dict[str, ZoneKey] = {}

    def key(self, zone: str) -> ZoneKey:
        """The key ``zone`` is signed with."""
        return self._get(self._keys, zone)

    def decoy(self, zone: str) -> ZoneKey:
        """A key ``zone`` is never signed with: its DS makes the zone bogus."""
        return self._get(self._decoys, zone)

    def trust_anchor(self) -> str:
        """The root zone's DNSKEY as one zone-file line, for Unbound's ``trust-anchor-file``."""
        root = self.key(self.tld)
        return f"{_absolute(self.tld).to_text()} {TTL} IN DNSKEY {root.dnskey.to_text()}\n"

    @staticmethod
    def _get(cache: dict[str, ZoneKey], zone: str) -> ZoneKey:
        zone = _plain(zone)
        found = cache.get(zone)
        if found is None:
            private_key = ec.generate_private_key(ec.SECP256R1())
            dnskey = dns.dnssec.make_dnskey(private_key.public_key(), _ALGORITHM, flags=_KSK_FLAGS)
            found = ZoneKey(zone, private_key, dnskey)
            cache[zone] = found
        return found


# --- building -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ZonePlan:
    name: str
    dnssec: Dnssec
    domain: Domain | None  # None for the root and the attacker zone


def attacker_host(tld: str) -> str:
    """The attacker's own mail host name, ``mx.attacker.<tld>``."""
    return f"mx.{ATTACKER_DOMAIN}.{tld}"


def build_zones(
    scenario: Scenario,
    addresses: Mapping[str, str],
    pki: LabPKI,
    keys: LabKeys,
    *,
    ns_address: str,
    now: dt.datetime | None = None,
) -> dict[str, dns.zone.Zone]:
    """All zones of ``scenario``, keyed by zone name without trailing dot.

    ``addresses`` maps host names (no trailing dot) to IPv4 addresses: every MX host,
    ``mta-sts.<domain>`` and ``mx.attacker.<tld>``. ``ns_address`` is the authoritative
    server, published as ``ns.<tld>``. Signatures are valid from ``now`` minus one day to
    ``now`` plus 30 days.
    """
    tld = _plain(scenario.tld)
    if tld != keys.tld:
        raise ZoneBuildError(
            f"scenario {scenario.name!r} uses TLD {tld!r} but the keys (and the resolver's trust "
            f"anchor) belong to {keys.tld!r}; make LabKeys({tld!r})"
        )
    now = now or dt.datetime.now(dt.UTC)
    plans = [_ZonePlan(tld, Dnssec.SIGNED, None)]
    attacker_zone = f"{ATTACKER_DOMAIN}.{tld}"
    for d in scenario.domains:
        if _plain(d.name) == attacker_zone:
            raise ZoneBuildError(f"domain {d.name!r}: this name is reserved for the attacker")
        plans.append(_ZonePlan(_plain(d.name), d.dnssec, d))
    plans.append(_ZonePlan(attacker_zone, Dnssec.UNSIGNED, None))

    zones = {p.name: _new_zone(p.name, tld) for p in plans}
    records: list[tuple[dns.name.Name, dns.rdata.Rdata]] = []
    ns_name = _absolute(f"ns.{tld}")
    records.append((ns_name, _rdata("A", ns_address)))

    aliases = {_plain(a) for d in scenario.domains for h in d.hosts for a in h.aliases}
    for host, address in addresses.items():
        if _plain(host) not in aliases:
            records.append((_absolute(host), _rdata("A", address)))
    for d in scenario.domains:
        records += _domain_records(d, addresses, pki)

    _add_all(zones, records)

    # Delegations (RFC 1034 §4.2.1): NS in the closest enclosing zone, plus DS when the child
    # is meant to validate (RFC 4035 §5.2) or to fail validation (bogus).
    index = _zone_index(zones)
    for p in plans[1:]:
        parent = _parent_zone(p.name, index)
        owner = _absolute(p.name)
        with zones[parent].writer() as txn:
            txn.add(owner, TTL, _rdata("NS", ns_name.to_text()))
            if p.dnssec is Dnssec.SIGNED:
                txn.add(owner, TTL, keys.key(p.name).ds())
            elif p.dnssec is Dnssec.BOGUS:
                txn.add(owner, TTL, keys.decoy(p.name).ds())

    inception = now - dt.timedelta(days=1)
    expiration = now + dt.timedelta(days=30)
    for p in plans:
        if p.dnssec is not Dnssec.UNSIGNED:
            key = keys.key(p.name)
            with zones[p.name].writer() as txn:
                dns.dnssec.sign_zone(
                    zones[p.name],
                    txn=txn,
                    keys=[(key.private_key, key.dnskey)],
                    add_dnskey=True,
                    dnskey_ttl=TTL,
                    inception=inception,
                    expiration=expiration,
                )
        if p.domain is not None and p.domain.dns_attack is not DnsAttack.NONE:
            _apply_attack(zones[p.name], p.domain, tld, pki)
    return zones


def _new_zone(name: str, tld: str) -> dns.zone.Zone:
    origin = _absolute(name)
    zone = dns.zone.Zone(origin, relativize=False)
    with zone.writer() as txn:
        # SOA minimum = TTL: the negative-caching TTL (RFC 2308 §4) and the NSEC TTL.
        soa = f"ns.{tld}. hostmaster.{name}. 1 3600 600 86400 {TTL}"
        txn.add(origin, TTL, _rdata("SOA", soa))
        txn.add(origin, TTL, _rdata("NS", f"ns.{tld}."))
    return zone


def _domain_records(
    d: Domain, addresses: Mapping[str, str], pki: LabPKI
) -> list[tuple[dns.name.Name, dns.rdata.Rdata]]:
    apex = _absolute(d.name)
    out: list[tuple[dns.name.Name, dns.rdata.Rdata]] = []
    for pref, host in d.mx_hosts():
        # RFC 7505 §3: a null MX is preference 0 and the root name "."
        target = "." if host == "." else _absolute(host).to_text()
        out.append((apex, _rdata("MX", f"{pref} {target}")))
    for h in d.hosts:
        if _plain(h.name) not in addresses:
            raise ZoneBuildError(
                f"host {h.name!r} of domain {d.name!r} has no address; "
                "add it to the addresses mapping"
            )
        for alias in h.aliases:
            out.append((_absolute(alias), _rdata("CNAME", _absolute(h.name).to_text())))
        # RFC 7672 §2.2 / RFC 6698 §3: TLSA for SMTP on port 25 lives at _25._tcp.<host>.
        tlsa_owner = dns.name.from_text(f"_25._tcp.{_plain(h.name)}.")
        for spec in h.tlsa:
            tlsa = _tlsa(h, spec, pki)
            if tlsa is not None:
                out.append((tlsa_owner, tlsa))
    if d.mta_sts is not None:
        # RFC 8461 §3.1: the policy record; each configured string is one TXT record.
        for text in d.mta_sts.txt:
            out.append((dns.name.from_text(f"_mta-sts.{d.name}."), txt_rdata(text)))
    for text in d.tlsrpt:
        # RFC 8460 §3: the reporting policy record.
        out.append((dns.name.from_text(f"_smtp._tls.{d.name}."), txt_rdata(text)))
    out += _extra_records(d)
    return out


def txt_rdata(text: str) -> dns.rdtypes.ANY.TXT.TXT:
    """One TXT record holding ``text``, split into 255-octet character-strings (RFC 1035 §3.3)."""
    data = text.encode("utf-8")
    chunks = [
        data[i : i + _MAX_CHARACTER_STRING] for i in range(0, len(data), _MAX_CHARACTER_STRING)
    ] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(_IN, dns.rdatatype.TXT, chunks)


def _tlsa(host: Host, spec: str, pki: LabPKI) -> dns.rdata.Rdata | None:
    words = spec.split()
    wrong = bool(words) and words[0] == "wrong"
    if wrong:
        words = words[1:]
    if len(words) not in (3, 4) or not all(w.isdigit() for w in words[:3]):
        raise ZoneBuildError(
            f"host {host.name!r}: tlsa {spec!r} is not 'U S M', 'U S M HEX' or 'wrong U S M'"
        )
    usage, selector, mtype = (int(w) for w in words[:3])
    if max(usage, selector, mtype) > 255:
        raise ZoneBuildError(f"host {host.name!r}: tlsa {spec!r}: fields are 0-255")
    if len(words) == 4:
        try:
            data = bytes.fromhex(words[3])
        except ValueError:
            raise ZoneBuildError(
                f"host {host.name!r}: tlsa {spec!r}: association data must be hexadecimal"
            ) from None
    elif not host.starttls:
        return None  # no TLS, no certificate to pin
    else:
        if wrong:
            # A real certificate nobody presents: well-formed data of the right length for
            # every selector and matching type, and it matches nothing.
            cert = pki.issue(f"tlsa-decoy.{_plain(host.name)}", CertKind.SELF_SIGNED).leaf
        else:
            cert = _tlsa_certificate(host, usage, pki)
        try:
            data = association_data(cert, selector, mtype)
        except ValueError as exc:
            raise ZoneBuildError(f"host {host.name!r}: tlsa {spec!r}: {exc}") from None
    return _tlsa_rdata(usage, selector, mtype, data)


def _tlsa_rdata(usage: int, selector: int, mtype: int, data: bytes) -> dns.rdata.Rdata:
    return _rdata("TLSA", f"{usage} {selector} {mtype} {data.hex()}")


def _tlsa_certificate(host: Host, usage: int, pki: LabPKI) -> x509.Certificate:
    identity = pki.issue(_plain(host.name), host.cert)
    # RFC 6698 §2.1.1: usages 1 and 3 name the end-entity certificate, usages 0 and 2 a CA.
    return identity.leaf if usage in (1, 3) else identity.issuer


def _extra_records(d: Domain) -> list[tuple[dns.name.Name, dns.rdata.Rdata]]:
    if not d.extra:
        return []
    text = f"$ORIGIN {_plain(d.name)}.\n$TTL {TTL}\n" + "\n".join(d.extra) + "\n"
    try:
        parsed = dns.zone.from_text(
            text, origin=_absolute(d.name), relativize=False, check_origin=False
        )
    except dns.exception.DNSException as exc:
        raise ZoneBuildError(
            f"domain {d.name!r}: extra records are not valid zone-file lines: {exc}"
        ) from None
    return [(name, rdata) for name, _, rdata in parsed.iterate_rdatas()]


def _apply_attack(zone: dns.zone.Zone, d: Domain, tld: str, pki: LabPKI) -> None:
    apex = _absolute(d.name)
    with zone.writer() as txn:
        if d.dns_attack is DnsAttack.DROP_STS_TXT:
            owner = dns.name.from_text(f"_mta-sts.{_plain(d.name)}.")
            txn.delete(owner, dns.rdatatype.TXT)
            txn.delete(owner, dns.rdatatype.RRSIG, dns.rdatatype.TXT)
            # An unsigned zone loses the name; a signed zone keeps its NSEC, which still
            # lists TXT, so the forged denial is caught (RFC 4035 §5.4).
            node = txn.get_node(owner)
            if node is not None and not node.rdatasets:
                txn.delete(owner)
        elif d.dns_attack is DnsAttack.SPOOF_MX:
            mx = _rdata("MX", f"10 {attacker_host(tld)}.")
            txn.replace(apex, dns.rdataset.from_rdata(TTL, mx))
        elif d.dns_attack is DnsAttack.SPOOF_TLSA:
            cert = pki.issue(attacker_host(tld), CertKind.VALID).leaf
            fake = _tlsa_rdata(3, 1, 1, association_data(cert, 1, 1))
            owners = [n for n, rds in txn.iterate_rdatasets() if rds.rdtype == dns.rdatatype.TLSA]
            for owner in owners:
                txn.replace(owner, dns.rdataset.from_rdata(TTL, fake))
        elif d.dns_attack is DnsAttack.BREAK_SIGNATURES:
            _corrupt_signatures(txn)


def _corrupt_signatures(txn: dns.transaction.Transaction) -> None:
    # Every RRSIG over the zone's data (all but the DNSKEY set, so the key itself still
    # validates from the DS) gets its signature bits inverted: the data validates as bogus.
    broken: list[tuple[dns.name.Name, dns.rdataset.Rdataset]] = []
    for name, rds in txn.iterate_rdatasets():
        if rds.rdtype != dns.rdatatype.RRSIG or rds.covers == dns.rdatatype.DNSKEY:
            continue
        bad = dns.rdataset.Rdataset(_IN, dns.rdatatype.RRSIG, rds.covers, rds.ttl)
        for sig in rds:
            assert isinstance(sig, dns.rdtypes.ANY.RRSIG.RRSIG)
            bad.add(sig.replace(signature=bytes(b ^ 0xFF for b in sig.signature)))
        broken.append((name, bad))
    for name, bad in broken:
        txn.replace(name, bad)


# --- names --------------------------------------------------------------------------------


def _plain(name: str) -> str:
    return names.dns_name(name.strip())


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(_plain(name) + ".")


def _rdata(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(_IN, dns.rdatatype.from_text(rdtype), text)


def enclosing_zone(name: dns.name.Name, zone_names: Iterable[str]) -> str | None:
    """The deepest of ``zone_names`` at or above ``name``, or None."""
    return _enclosing(name, _zone_index(zone_names))


def _zone_index(zone_names: Iterable[str]) -> dict[dns.name.Name, str]:
    return {_absolute(z): z for z in zone_names}


def _enclosing(name: dns.name.Name, index: Mapping[dns.name.Name, str]) -> str | None:
    # Walk up from the name itself: the first ancestor that is a zone is the deepest one.
    # (A dict lookup per label, so that thousands of zones do not cost thousands per record.)
    while True:
        found = index.get(name)
        if found is not None:
            return found
        if len(name.labels) <= 1:
            return None
        name = name.parent()


def _parent_zone(zone: str, index: Mapping[dns.name.Name, str]) -> str:
    parent = _enclosing(_absolute(zone).parent(), index)
    if parent is None:  # the root zone encloses every planned zone; this would be a bug
        raise ZoneBuildError(f"zone {zone!r} has no enclosing lab zone")
    return parent


def _add_all(
    zones: Mapping[str, dns.zone.Zone], records: Iterable[tuple[dns.name.Name, dns.rdata.Rdata]]
) -> None:
    # Each record goes to the deepest zone that encloses its owner name, so a host of a domain
    # that has a lab zone below it lands in that zone.
    by_zone: dict[str, list[tuple[dns.name.Name, dns.rdata.Rdata]]] = {}
    index = _zone_index(zones)
    for owner, rdata in records:
        zone_name = _enclosing(owner, index)
        if zone_name is None:
            raise ZoneBuildError(
                f"record {owner} {dns.rdatatype.to_text(rdata.rdtype)} is outside the lab's "
                "zones; names must end in the scenario's TLD"
            )
        by_zone.setdefault(zone_name, []).append((owner, rdata))
    for zone_name, items in by_zone.items():
        with zones[zone_name].writer() as txn:
            for owner, rdata in items:
                txn.add(owner, TTL, rdata)


__all__ = [
    "TTL",
    "LabKeys",
    "ZoneBuildError",
    "ZoneKey",
    "attacker_host",
    "build_zones",
    "enclosing_zone",
    "txt_rdata",
]
