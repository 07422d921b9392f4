"""The lab's DNS: zones built from a scenario, the authoritative server, Unbound validating.

Unit tests of the zone builder need no network. The rest runs the real thing on loopback
(127.201.0.0/16): ``AuthServer`` at 127.201.0.1:53 and Unbound at 127.201.0.53:53, queried
with dnspython the way mxguard's DNS adapter will query it (DO and AD set).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.zone
import pytest

from lab_dns_helpers import LoopThread, authenticated, data, extended_errors, query
from mxguard.lab.dns_server import AuthServer
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import (
    CertKind,
    DnsAttack,
    Dnssec,
    Domain,
    Host,
    MtaSts,
    Scenario,
)
from mxguard.lab.unbound import Unbound, UnboundError, unbound_path
from mxguard.lab.zones import LabKeys, ZoneBuildError, attacker_host, build_zones
from mxguard.protocol.dane import association_data

AUTH = ("127.201.0.1", 53)
RESOLVER = ("127.201.0.53", 53)
TLD = "test"

LONG_STS = "v=STSv1; id=20261129T000000; " + "ext=" + "a" * 600 + ";"
LITERAL_TLSA = "3 1 1 " + "ab" * 32
BIG_TXT = tuple(f'big 60 IN TXT "{i:02d}{"z" * 200}"' for i in range(12))

SCENARIO = Scenario(
    name="lab-dns",
    tld=TLD,
    domains=(
        Domain(
            "signed.test",
            mx=("10 mx1.signed.test", "20 mail.signed.test"),
            hosts=(
                Host("mx1.signed.test", tlsa=("3 1 1", "2 0 1", "3 0 2", "wrong 3 1 1")),
                Host("mx2.signed.test", aliases=("mail.signed.test",), tlsa=(LITERAL_TLSA,)),
            ),
            mta_sts=MtaSts(txt=(LONG_STS,)),
            tlsrpt=("v=TLSRPTv1; rua=mailto:tlsrpt@signed.test",),
            extra=BIG_TXT,
        ),
        Domain(
            "sub.signed.test", mx=("10 mx.sub.signed.test",), hosts=(Host("mx.sub.signed.test"),)
        ),
        Domain("nullmx.test", mx=("0 .",)),
        Domain("nomx.test", mx=None),
        Domain(
            "plain.test",
            dnssec=Dnssec.UNSIGNED,
            mx=("10 mx.plain.test",),
            hosts=(Host("mx.plain.test", starttls=False, tlsa=("3 1 1", LITERAL_TLSA)),),
            mta_sts=MtaSts(),
        ),
        Domain(
            "bogus.test",
            dnssec=Dnssec.BOGUS,
            mx=("10 mx.bogus.test",),
            hosts=(Host("mx.bogus.test"),),
        ),
        Domain(
            "broken.test",
            mx=("10 mx.broken.test",),
            hosts=(Host("mx.broken.test"),),
            dns_attack=DnsAttack.BREAK_SIGNATURES,
        ),
    ),
).validate()


def addresses_for(scenario: Scenario) -> dict[str, str]:
    names = [h.name for h in scenario.hosts()] + [attacker_host(scenario.tld)]
    names += [f"mta-sts.{d.name}" for d in scenario.domains if d.mta_sts]
    return {n: f"127.201.1.{i}" for i, n in enumerate(names, start=10)}


ADDRESSES = addresses_for(SCENARIO)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys() -> LabKeys:
    return LabKeys(TLD)


def build(scenario: Scenario, pki: LabPKI, keys: LabKeys) -> dict[str, dns.zone.Zone]:
    return build_zones(scenario, addresses_for(scenario), pki, keys, ns_address=AUTH[0])


@pytest.fixture(scope="module")
def zones(pki: LabPKI, keys: LabKeys) -> dict[str, dns.zone.Zone]:
    return build(SCENARIO, pki, keys)


def rdatas(zone: dns.zone.Zone, name: str, rdtype: str, covers: str = "NONE") -> list[Any]:
    rds = zone.get_rdataset(
        dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdatatype.from_text(covers)
    )
    return list(rds) if rds is not None else []


def with_attack(scenario: Scenario, domain: str, attack: DnsAttack) -> Scenario:
    return scenario.with_domain(dataclasses.replace(scenario.domain(domain), dns_attack=attack))


# --- zone builder: no network ------------------------------------------------------------


@pytest.mark.parametrize(
    ("child", "parent", "ds"),
    [
        ("signed.test", "test", "own key"),  # RFC 4035 §5: DS links the chain of trust
        ("plain.test", "test", "none"),  # insecure delegation: NS only, NSEC proves no DS
        ("bogus.test", "test", "decoy key"),  # DS for a key the child is not signed with
        ("attacker.test", "test", "none"),  # the attacker's zone is always unsigned
        ("sub.signed.test", "signed.test", "own key"),  # a zone below a zone: parent delegates
    ],
)
def test_delegation_carries_the_ds_the_child_dnssec_mode_asks_for(
    zones: dict[str, dns.zone.Zone], keys: LabKeys, child: str, parent: str, ds: str
) -> None:
    owner = child + "."
    assert [r.to_text() for r in rdatas(zones[parent], owner, "NS")] == ["ns.test."]
    expected = {"own key": [keys.key(child).ds()], "decoy key": [keys.decoy(child).ds()]}
    assert rdatas(zones[parent], owner, "DS") == expected.get(ds, [])
    for other, zone in zones.items():
        if other != parent:
            assert rdatas(zone, owner, "DS") == [] or other == child


def test_child_zone_is_signed_by_the_key_its_ds_names(
    zones: dict[str, dns.zone.Zone], keys: LabKeys
) -> None:
    zone = zones["signed.test"]
    origin = dns.name.from_text("signed.test.")
    mx = zone.find_rrset(origin, "MX")
    sigs = zone.find_rrset(origin, "RRSIG", "MX")
    dnskeys = zone.find_rdataset(origin, "DNSKEY")
    dns.dnssec.validate(mx, sigs, {origin: dnskeys})  # raises if the signature is wrong
    assert keys.key("signed.test").dnskey in list(dnskeys)
    assert keys.decoy("signed.test").dnskey not in list(dnskeys)


def test_break_signatures_leaves_rrsigs_that_do_not_verify(zones: dict[str, dns.zone.Zone]) -> None:
    zone = zones["broken.test"]
    origin = dns.name.from_text("broken.test.")
    dnskeys = zone.find_rdataset(origin, "DNSKEY")
    for name, rdtype in [
        ("broken.test.", "MX"),
        ("mx.broken.test.", "A"),
        ("broken.test.", "NSEC"),
    ]:
        owner = dns.name.from_text(name)
        with pytest.raises(dns.exception.ValidationFailure):
            dns.dnssec.validate(
                zone.find_rrset(owner, rdtype),
                zone.find_rrset(owner, "RRSIG", rdtype),
                {origin: dnskeys},
            )
    # The key set still validates: the failure is in the data, not in the chain of trust.
    dns.dnssec.validate(
        zone.find_rrset(origin, "DNSKEY"),
        zone.find_rrset(origin, "RRSIG", "DNSKEY"),
        {origin: dnskeys},
    )


def test_unsigned_zones_have_no_dnssec_records(zones: dict[str, dns.zone.Zone]) -> None:
    for name in ("plain.test", "attacker.test"):
        types = {rds.rdtype for _, rds in zones[name].iterate_rdatasets()}
        assert types.isdisjoint({dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.DNSKEY})


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("signed.test", ["10 mx1.signed.test.", "20 mail.signed.test."]),
        ("nullmx.test", ["0 ."]),  # RFC 7505 §3
        ("nomx.test", []),  # mx None publishes no MX record
    ],
)
def test_mx_records_follow_the_scenario(
    zones: dict[str, dns.zone.Zone], domain: str, expected: list[str]
) -> None:
    assert sorted(r.to_text() for r in rdatas(zones[domain], domain + ".", "MX")) == expected


def test_hosts_get_addresses_and_aliases_get_cnames(zones: dict[str, dns.zone.Zone]) -> None:
    zone = zones["signed.test"]
    for name in ("mx1.signed.test", "mx2.signed.test", "mta-sts.signed.test"):
        assert [r.to_text() for r in rdatas(zone, name + ".", "A")] == [ADDRESSES[name]]
    assert [r.to_text() for r in rdatas(zone, "mail.signed.test.", "CNAME")] == ["mx2.signed.test."]
    assert rdatas(zone, "mail.signed.test.", "A") == []  # CNAME and other data never mix
    assert rdatas(zones["attacker.test"], "mx.attacker.test.", "A")


def _tlsa(zone: dns.zone.Zone, host: str) -> dict[tuple[int, int, int], list[bytes]]:
    out: dict[tuple[int, int, int], list[bytes]] = {}
    for r in rdatas(zone, f"_25._tcp.{host}.", "TLSA"):
        out.setdefault((r.usage, r.selector, r.mtype), []).append(r.cert)
    return out


@pytest.mark.parametrize(
    ("usage", "selector", "mtype", "certificate"),
    [
        (3, 1, 1, "leaf"),  # DANE-EE: the host's own key (RFC 7672 §3.1.1)
        (2, 0, 1, "issuer"),  # DANE-TA: the CA that issued it (RFC 7672 §3.1.2)
        (3, 0, 2, "leaf"),  # full certificate, SHA-512
    ],
)
def test_tlsa_data_is_computed_from_the_hosts_certificate(
    zones: dict[str, dns.zone.Zone],
    pki: LabPKI,
    usage: int,
    selector: int,
    mtype: int,
    certificate: str,
) -> None:
    identity = pki.issue("mx1.signed.test", CertKind.VALID)
    cert = identity.leaf if certificate == "leaf" else identity.issuer
    found = _tlsa(zones["signed.test"], "mx1.signed.test")[(usage, selector, mtype)]
    assert association_data(cert, selector, mtype) in found


def test_wrong_tlsa_has_the_right_length_and_matches_nothing(
    zones: dict[str, dns.zone.Zone], pki: LabPKI
) -> None:
    leaf = pki.issue("mx1.signed.test", CertKind.VALID).leaf
    real = association_data(leaf, 1, 1)
    entries = _tlsa(zones["signed.test"], "mx1.signed.test")[(3, 1, 1)]
    assert len(entries) == 2 and real in entries
    (wrong,) = [e for e in entries if e != real]
    assert len(wrong) == len(real)
    assert wrong != association_data(pki.issue("mx1.signed.test").issuer, 1, 1)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("mx2.signed.test", {(3, 1, 1): [bytes.fromhex("ab" * 32)]}),  # literal, as given
        ("mx.plain.test", {(3, 1, 1): [bytes.fromhex("ab" * 32)]}),  # no STARTTLS: literal only
        ("mx.bogus.test", {}),  # no specs, no records
    ],
)
def test_literal_tlsa_is_published_as_given(
    zones: dict[str, dns.zone.Zone], host: str, expected: dict[tuple[int, int, int], list[bytes]]
) -> None:
    zone_name = host.split(".", 1)[1]
    assert _tlsa(zones[zone_name], host) == expected


def test_long_txt_strings_are_split_into_255_octet_character_strings(
    zones: dict[str, dns.zone.Zone],
) -> None:
    (record,) = rdatas(zones["signed.test"], "_mta-sts.signed.test.", "TXT")
    assert isinstance(record, dns.rdtypes.ANY.TXT.TXT)
    assert len(record.strings) > 1
    assert all(len(s) <= 255 for s in record.strings)
    assert b"".join(record.strings).decode() == LONG_STS  # RFC 8461 §3.1: join with nothing
    (rpt,) = rdatas(zones["signed.test"], "_smtp._tls.signed.test.", "TXT")
    assert b"".join(rpt.strings).decode() == SCENARIO.domain("signed.test").tlsrpt[0]


def test_extra_records_are_added_in_zone_file_syntax(zones: dict[str, dns.zone.Zone]) -> None:
    assert len(rdatas(zones["signed.test"], "big.signed.test.", "TXT")) == len(BIG_TXT)


@pytest.mark.parametrize(
    ("domain", "attack", "owner", "rdtype", "expected"),
    [
        ("plain.test", DnsAttack.SPOOF_MX, "plain.test.", "MX", ["10 mx.attacker.test."]),
        ("plain.test", DnsAttack.DROP_STS_TXT, "_mta-sts.plain.test.", "TXT", []),
        ("signed.test", DnsAttack.DROP_STS_TXT, "_mta-sts.signed.test.", "TXT", []),
    ],
)
def test_dns_attacks_rewrite_the_records(
    pki: LabPKI,
    keys: LabKeys,
    domain: str,
    attack: DnsAttack,
    owner: str,
    rdtype: str,
    expected: list[str],
) -> None:
    zone = build(with_attack(SCENARIO, domain, attack), pki, keys)[domain]
    assert [r.to_text() for r in rdatas(zone, owner, rdtype)] == expected


def test_dropped_txt_in_a_signed_zone_is_still_listed_by_its_nsec(
    pki: LabPKI, keys: LabKeys
) -> None:
    # The attacker rewrites answers; it cannot re-sign them (RFC 4035 §5.4 catches the denial).
    zone = build(with_attack(SCENARIO, "signed.test", DnsAttack.DROP_STS_TXT), pki, keys)[
        "signed.test"
    ]
    (nsec,) = rdatas(zone, "_mta-sts.signed.test.", "NSEC")
    assert "TXT" in nsec.to_text().split()


def test_spoof_tlsa_pins_the_attackers_certificate(pki: LabPKI, keys: LabKeys) -> None:
    zone = build(with_attack(SCENARIO, "signed.test", DnsAttack.SPOOF_TLSA), pki, keys)[
        "signed.test"
    ]
    attacker = association_data(pki.issue(attacker_host(TLD), CertKind.VALID).leaf, 1, 1)
    for host in ("mx1.signed.test", "mx2.signed.test"):
        assert _tlsa(zone, host) == {(3, 1, 1): [attacker]}


def test_trust_anchor_is_the_root_dnskey_and_survives_rebuilds(
    zones: dict[str, dns.zone.Zone], pki: LabPKI, keys: LabKeys
) -> None:
    anchor = keys.trust_anchor()
    rebuilt = build(with_attack(SCENARIO, "plain.test", DnsAttack.SPOOF_MX), pki, keys)
    for z in (zones, rebuilt):
        (dnskey,) = rdatas(z[TLD], "test.", "DNSKEY")
        assert anchor.split(None, 4)[:4] == ["test.", "60", "IN", "DNSKEY"]
        assert anchor.split(None, 4)[4].strip() == dnskey.to_text()
    assert keys.trust_anchor() == anchor


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s, a: (s, {k: v for k, v in a.items() if k != "mx1.signed.test"}),
            "has no address",
        ),
        (
            lambda s, a: (s.with_domain(Domain("x.test", extra=("www IN A not-an-ip",))), a),
            "not valid zone-file lines",
        ),
        (
            lambda s, a: (dataclasses.replace(s, tld="lab", domains=()), a),
            "make LabKeys('lab')",
        ),
    ],
    ids=["host-without-address", "bad-extra-record", "keys-of-another-tld"],
)
def test_unbuildable_scenarios_say_what_is_wrong(
    pki: LabPKI, keys: LabKeys, change: object, message: str
) -> None:
    scenario, addresses = change(SCENARIO, addresses_for(SCENARIO))  # type: ignore[operator]
    with pytest.raises(ZoneBuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_zones(scenario, addresses, pki, keys, ns_address=AUTH[0])


def test_ds_at_a_zone_apex_comes_from_the_parent_and_unheld_zones_get_referrals(
    zones: dict[str, dns.zone.Zone],
) -> None:
    root_only = AuthServer({TLD: zones[TLD]}, *AUTH)
    q = dns.message.make_query("mx1.signed.test", "A", want_dnssec=True)
    r = root_only.answer(q)
    assert not r.flags & dns.flags.AA and not r.answer  # RFC 1034 §4.3.2 step 3b
    assert {rr.rdtype for rr in r.authority} == {
        dns.rdatatype.NS,
        dns.rdatatype.DS,
        dns.rdatatype.RRSIG,
    }
    assert [rr.to_text() for rr in r.additional] == [f"ns.test. 60 IN A {AUTH[0]}"]  # glue
    insecure = root_only.answer(dns.message.make_query("plain.test", "A", want_dnssec=True))
    assert dns.rdatatype.NSEC in {rr.rdtype for rr in insecure.authority}  # proves "no DS"

    full = AuthServer(zones, *AUTH)
    ds = full.answer(dns.message.make_query("signed.test", "DS", want_dnssec=True))
    assert ds.flags & dns.flags.AA
    (sig,) = [rr for rr in ds.answer if rr.rdtype == dns.rdatatype.RRSIG]
    assert sig[0].signer == dns.name.from_text("test.")  # RFC 4035 §3.1.4.1


# --- the running lab: AuthServer + Unbound -----------------------------------------------


@dataclasses.dataclass
class LabDns:
    loop: LoopThread
    auth: AuthServer
    unbound: Unbound
    pki: LabPKI
    keys: LabKeys

    def switch(self, scenario: Scenario) -> None:
        self.auth.update(build(scenario, self.pki, self.keys))
        self.loop.run(self.unbound.flush())


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory,
    pki: LabPKI,
    keys: LabKeys,
    zones: dict[str, dns.zone.Zone],
) -> Iterator[LabDns]:
    try:
        unbound_path()
    except UnboundError as exc:
        pytest.skip(str(exc))
    loop = LoopThread()
    auth = AuthServer(zones, *AUTH)
    workdir: Path = tmp_path_factory.mktemp("unbound")
    unbound = Unbound(workdir, *RESOLVER, TLD, *AUTH, keys.trust_anchor())
    try:
        loop.run(auth.start())
        loop.run(unbound.start())
        yield LabDns(loop, auth, unbound, pki, keys)
    finally:
        loop.run(unbound.stop())
        loop.run(auth.stop())
        loop.close()


def _answer_texts(response: dns.message.Message, rdtype: str) -> list[str]:
    return sorted(r.to_text() for rrset in data(response, rdtype) for r in rrset)


@pytest.mark.lab
@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "secure", "answer"),
    [
        # secure positive answers (RFC 4035 §3.2.3: AD only when every RRset validated)
        ("mx1.signed.test", "A", "NOERROR", True, [ADDRESSES["mx1.signed.test"]]),
        ("signed.test", "MX", "NOERROR", True, ["10 mx1.signed.test.", "20 mail.signed.test."]),
        ("nullmx.test", "MX", "NOERROR", True, ["0 ."]),  # RFC 7505 null MX, validated
        ("sub.signed.test", "MX", "NOERROR", True, ["10 mx.sub.signed.test."]),  # zone below zone
        ("mail.signed.test", "A", "NOERROR", True, [ADDRESSES["mx2.signed.test"]]),  # via CNAME
        # secure denials (RFC 4035 §3.1.3)
        ("nothing.signed.test", "A", "NXDOMAIN", True, []),
        ("mx1.signed.test", "AAAA", "NOERROR", True, []),  # NODATA
        ("nomx.test", "MX", "NOERROR", True, []),
        ("_tcp.mx1.signed.test", "TLSA", "NOERROR", True, []),  # empty non-terminal
        ("_25._tcp.mx1.signed.test", "TLSA", "NOERROR", True, None),  # below it: secure data
        # insecure delegation: answered, never AD (RFC 4035 §5.2)
        ("mx.plain.test", "A", "NOERROR", False, [ADDRESSES["mx.plain.test"]]),
        ("nothing.plain.test", "A", "NXDOMAIN", False, []),
        # bogus: SERVFAIL, the data never reaches the client (RFC 4035 §5.5)
        ("mx.bogus.test", "A", "SERVFAIL", False, []),
        ("mx.broken.test", "A", "SERVFAIL", False, []),
        ("nothing.broken.test", "A", "SERVFAIL", False, []),
    ],
)
def test_resolver_validates_lab_answers(
    lab: LabDns, name: str, rdtype: str, rcode: str, secure: bool, answer: list[str] | None
) -> None:
    r = query(name, rdtype, RESOLVER)
    assert dns.rcode.to_text(r.rcode()) == rcode
    assert authenticated(r) is secure
    if answer is not None:
        assert _answer_texts(r, "A" if rdtype == "A" else rdtype) == sorted(answer)


@pytest.mark.lab
def test_cname_chain_is_returned_whole_and_secure(lab: LabDns) -> None:
    r = query("mail.signed.test", "A", RESOLVER)
    assert _answer_texts(r, "CNAME") == ["mx2.signed.test."]
    assert authenticated(r)


@pytest.mark.lab
@pytest.mark.parametrize("domain", ["bogus.test", "broken.test"])
def test_bogus_answers_carry_a_dnssec_extended_error(lab: LabDns, domain: str) -> None:
    r = query(f"mx.{domain}", "A", RESOLVER)
    assert r.rcode() == dns.rcode.SERVFAIL
    # RFC 8914 §4: the DNSSEC failure codes — 6 DNSSEC Bogus, 7/8 signature expired/not yet
    # valid, 9 DNSKEY Missing (Unbound's word for "no key matches the DS"), 10 RRSIGs Missing.
    # The text is optional (and Unbound leaves it out of cached failures).
    codes = {e.code for e in extended_errors(r)}
    assert codes and codes <= {6, 7, 8, 9, 10}


@pytest.mark.lab
def test_tlsa_through_the_resolver_equals_the_certificates_association_data(lab: LabDns) -> None:
    r = query("_25._tcp.mx1.signed.test", "TLSA", RESOLVER)
    assert authenticated(r)
    identity = lab.pki.issue("mx1.signed.test", CertKind.VALID)
    records = {(t.usage, t.selector, t.mtype, t.cert) for rrset in data(r, "TLSA") for t in rrset}
    for usage, selector, mtype, cert in [(3, 1, 1, identity.leaf), (2, 0, 1, identity.issuer)]:
        assert (usage, selector, mtype, association_data(cert, selector, mtype)) in records


@pytest.mark.lab
def test_long_txt_round_trips_through_the_resolver(lab: LabDns) -> None:
    r = query("_mta-sts.signed.test", "TXT", RESOLVER)
    assert authenticated(r)
    (rrset,) = data(r, "TXT")
    assert [b"".join(t.strings).decode() for t in rrset] == [LONG_STS]


@pytest.mark.lab
@pytest.mark.parametrize(
    ("domain", "attack", "name", "rdtype", "rcode", "answer"),
    [
        # Unsigned: the forgery works (this is what MTA-STS and DANE exist for).
        ("plain.test", DnsAttack.DROP_STS_TXT, "_mta-sts.plain.test", "TXT", "NXDOMAIN", []),
        ("plain.test", DnsAttack.SPOOF_MX, "plain.test", "MX", "NOERROR", ["10 mx.attacker.test."]),
        # Signed: the forgery is caught and becomes SERVFAIL (RFC 7672 §2.1: defer).
        ("signed.test", DnsAttack.DROP_STS_TXT, "_mta-sts.signed.test", "TXT", "SERVFAIL", []),
        ("signed.test", DnsAttack.SPOOF_MX, "signed.test", "MX", "SERVFAIL", []),
        ("signed.test", DnsAttack.SPOOF_TLSA, "_25._tcp.mx1.signed.test", "TLSA", "SERVFAIL", []),
    ],
)
def test_dns_attacks_take_effect_after_update_and_flush(
    lab: LabDns,
    domain: str,
    attack: DnsAttack,
    name: str,
    rdtype: str,
    rcode: str,
    answer: list[str],
) -> None:
    before = query(name, rdtype, RESOLVER)
    assert before.rcode() == dns.rcode.NOERROR and data(before, rdtype)
    lab.switch(with_attack(SCENARIO, domain, attack))
    try:
        after = query(name, rdtype, RESOLVER)
        assert dns.rcode.to_text(after.rcode()) == rcode
        assert _answer_texts(after, rdtype) == answer
        assert not authenticated(after)
    finally:
        lab.switch(SCENARIO)
    assert data(query(name, rdtype, RESOLVER), rdtype)


# --- the authoritative server directly --------------------------------------------------


@pytest.mark.lab
def test_large_answer_is_truncated_over_udp_and_whole_over_tcp(lab: LabDns) -> None:
    udp = query("big.signed.test", "TXT", AUTH, dnssec=False)
    assert udp.flags & dns.flags.TC and not udp.answer  # 512 octets without EDNS
    udp_edns = query("big.signed.test", "TXT", AUTH, dnssec=False, payload=4096)
    assert not udp_edns.flags & dns.flags.TC  # RFC 6891 §6.2.5: the advertised size counts
    tcp = query("big.signed.test", "TXT", AUTH, dnssec=True, tcp=True)
    assert not tcp.flags & dns.flags.TC
    assert len(data(tcp, "TXT")[0]) == len(BIG_TXT)
    assert any(rr.rdtype == dns.rdatatype.RRSIG for rr in tcp.answer)


@pytest.mark.lab
def test_names_outside_the_servers_zones_are_refused(lab: LabDns) -> None:
    r = query("example.com", "A", AUTH)
    assert r.rcode() == dns.rcode.REFUSED and not r.answer


@pytest.mark.lab
@pytest.mark.parametrize(
    ("packet", "reply_rcode"),
    [
        (b"", None),  # nothing at all
        (b"\x12\x34\x01", None),  # shorter than a header: nothing to answer
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07", "FORMERR"),  # cut-off name
        (b"\x12\x34" + b"\xff" * 40, None),  # QR set: a "response", never answered
        (b"\x12\x34\x01\x00" + b"\x00\x05" + b"\x00" * 6 + b"\x01", "FORMERR"),  # counts lie
    ],
)
def test_malformed_packets_do_not_break_the_server(
    lab: LabDns, packet: bytes, reply_rcode: str | None
) -> None:
    before = lab.auth.queries
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(packet, AUTH)
        try:
            reply: bytes | None = s.recv(4096)
        except TimeoutError:
            reply = None
    if reply_rcode is None:
        assert reply is None
    else:
        assert reply is not None
        assert reply[:2] == packet[:2]
        assert dns.rcode.to_text(dns.rcode.Rcode(reply[3] & 0x0F)) == reply_rcode
    r = query("mx1.signed.test", "A", AUTH)  # still serving
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert lab.auth.queries >= before + 2


def _covers(nsec: Any, owner: dns.name.Name, name: dns.name.Name) -> bool:
    # RFC 4034 §4.1.1: an NSEC covers the names between its owner and its next name.
    nxt: dns.name.Name = nsec.next
    return bool(owner < name < nxt or (nxt <= owner and (name > owner or name < nxt)))


@pytest.mark.lab
@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "proof"),
    [
        ("mx1.signed.test", "AAAA", "NOERROR", "own NSEC"),  # RFC 4035 §3.1.3.1
        ("_tcp.mx1.signed.test", "TLSA", "NOERROR", "covering NSEC"),  # ENT, RFC 8020
        ("nothing.signed.test", "A", "NXDOMAIN", "covering NSEC and wildcard"),  # §3.1.3.2
    ],
)
def test_negative_answers_carry_their_nsec_proofs(
    lab: LabDns, name: str, rdtype: str, rcode: str, proof: str
) -> None:
    r = query(name, rdtype, AUTH)
    assert dns.rcode.to_text(r.rcode()) == rcode and r.flags & dns.flags.AA and not r.answer
    qname = dns.name.from_text(name)
    soa = [rr for rr in r.authority if rr.rdtype == dns.rdatatype.SOA]
    nsecs = [(rr.name, rr[0]) for rr in r.authority if rr.rdtype == dns.rdatatype.NSEC]
    assert soa and nsecs  # RFC 2308 §3 and RFC 4035 §3.1.3
    if proof == "own NSEC":
        ((owner, nsec),) = nsecs
        assert owner == qname and rdtype not in nsec.to_text().split()[1:]
    else:
        assert any(_covers(nsec, owner, qname) for owner, nsec in nsecs)
    if proof.endswith("wildcard"):
        wildcard = dns.name.from_text("*.signed.test.")
        assert any(_covers(nsec, owner, wildcard) for owner, nsec in nsecs)
    assert all(
        any(
            s.rdtype == dns.rdatatype.RRSIG and s.covers == dns.rdatatype.NSEC and s.name == o
            for s in r.authority
        )
        for o, _ in nsecs
    )
    plain = query(name, rdtype, AUTH, dnssec=False)  # without DO: no DNSSEC records (RFC 3225)
    assert {rr.rdtype for rr in plain.authority} == {dns.rdatatype.SOA}
