"""resolve() rules for DNS outcomes the lab cannot easily stage (one lookup of a pair timing
out). The DNS adapter is replaced by a script of answers; everything above it is real."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mxguard.adapters.dns import DnsAnswer, DnsOutcome, DnsResolver, DnssecStatus
from mxguard.adapters.store import Store, open_store
from mxguard.engine.policy import DeliveryPolicy
from mxguard.engine.resolve import Resolver
from mxguard.engine.sts import StsResolver

SECURE, INSECURE, INDET = DnssecStatus.SECURE, DnssecStatus.INSECURE, DnssecStatus.INDETERMINATE


class ScriptedDns(DnsResolver):
    def __init__(self, script: dict[tuple[str, str], DnsAnswer]) -> None:
        super().__init__([("127.0.0.1", 9)])
        self.script = script

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        return self.script.get((name, rdtype)) or DnsAnswer(
            name, rdtype, DnsOutcome.NXDOMAIN, INSECURE, canonical=name
        )


def rr(rdtype: str, text: str) -> object:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


def ok(name: str, rdtype: str, *texts: str, status: DnssecStatus = INSECURE) -> DnsAnswer:
    records = tuple(rr(rdtype, t) for t in texts)
    return DnsAnswer(name, rdtype, DnsOutcome.OK, status, records, canonical=name, ttl=60)


def nodata(name: str, rdtype: str, status: DnssecStatus = INSECURE) -> DnsAnswer:
    return DnsAnswer(name, rdtype, DnsOutcome.NODATA, status, canonical=name, ttl=60)


def error(name: str, rdtype: str) -> DnsAnswer:
    return DnsAnswer(name, rdtype, DnsOutcome.ERROR, INDET, canonical=name, detail="timed out")


@pytest.fixture
def store() -> Iterator[Store]:
    s = asyncio.run(open_store("sqlite:///:memory:"))
    yield s
    asyncio.run(s.close())


def resolve(store: Store, answers: list[DnsAnswer], domain: str = "example.test") -> DeliveryPolicy:
    dns = ScriptedDns({(a.name, a.rdtype): a for a in answers})
    return asyncio.run(Resolver(dns, StsResolver(dns, store)).resolve(domain))


MX = ok("example.test", "MX", "10 mx.example.test.")

H = "mx.example.test"
ADDRESS_CASES = [
    # (A, AAAA, expected status, expected defer type)
    (error(H, "A"), nodata(H, "AAAA"), "defer", "validation-failure"),
    (nodata(H, "A"), error(H, "AAAA"), "defer", "validation-failure"),
    (nodata(H, "A"), nodata(H, "AAAA"), "fail", None),
    (ok(H, "A", "192.0.2.1"), error(H, "AAAA"), "ok", None),
]


@pytest.mark.parametrize(("a", "aaaa", "status", "defer"), ADDRESS_CASES)
def test_a_temporary_address_failure_defers_and_only_proof_of_no_address_fails(
    store: Store, a: DnsAnswer, aaaa: DnsAnswer, status: str, defer: str | None
) -> None:
    p = resolve(store, [MX, a, aaaa])
    assert p.status == status
    assert [(m.defer.result_type if m.defer else None) for m in p.mx] == [defer]


def test_a_failed_tlsa_lookup_defers_the_host_instead_of_dropping_dane(store: Store) -> None:
    p = resolve(
        store,
        [
            ok("example.test", "MX", "10 mx1.example.test.", "20 mx2.example.test.", status=SECURE),
            ok("mx1.example.test", "A", "192.0.2.1", status=SECURE),
            nodata("mx1.example.test", "AAAA", status=SECURE),
            error("_25._tcp.mx1.example.test", "TLSA"),
            ok("mx2.example.test", "A", "192.0.2.2"),
            nodata("mx2.example.test", "AAAA"),
        ],
    )
    assert [(m.host, m.usable, m.defer.result_type if m.defer else None) for m in p.mx] == [
        ("mx1.example.test", False, "validation-failure"),
        ("mx2.example.test", True, None),
    ]


# --- DANE only from DNSSEC-secure data (RFC 7672 §2.2) ------------------------------------

M = "mx.example.test"
SECURE_HOST = [
    ok(M, "A", "192.0.2.1", status=SECURE),
    nodata(M, "AAAA", status=SECURE),
]


def tlsa(status: DnssecStatus) -> DnsAnswer:
    return ok("_25._tcp." + M, "TLSA", "3 1 1 " + "ab" * 32, status=status)


def test_tlsa_records_that_are_not_signed_never_make_a_host_dane(store: Store) -> None:
    # Signed address records, but the TLSA answer is not validated (an unsigned delegation
    # below the host, or a forgery): DANE must not apply, let alone win over other policy.
    p = resolve(store, [ok("example.test", "MX", "10 mx.example.test.", status=SECURE),
                        *SECURE_HOST, tlsa(INSECURE)])  # fmt: skip
    (m,) = p.mx
    assert (m.auth, m.tls, m.tlsa) == ("none", "opportunistic", ())
    assert any("not DNSSEC-signed" in n for n in m.notes)


def test_a_bogus_tlsa_answer_defers_the_host(store: Store) -> None:
    bogus = DnsAnswer("_25._tcp." + M, "TLSA", DnsOutcome.ERROR, DnssecStatus.BOGUS,
                      canonical="_25._tcp." + M, detail="DNSSEC validation failed")  # fmt: skip
    p = resolve(store, [ok("example.test", "MX", "10 mx.example.test.", status=SECURE),
                        *SECURE_HOST, bogus])  # fmt: skip
    (m,) = p.mx
    assert m.defer is not None and m.defer.result_type == "dnssec-invalid"
    assert p.status == "defer"


@pytest.mark.parametrize(("mx_status", "domain_is_a_name"), [(SECURE, True), (INSECURE, False)])
def test_the_next_hop_domain_is_a_reference_name_only_under_a_signed_mx(
    store: Store, mx_status: DnssecStatus, domain_is_a_name: bool
) -> None:
    # RFC 7672 §3.2.2: with an unsigned MX RRset an attacker chose the MX host, so only the
    # host's own name (the TLSA base domain) may be matched by a DANE-TA certificate.
    p = resolve(store, [ok("example.test", "MX", "10 mx.example.test.", status=mx_status),
                        *SECURE_HOST, tlsa(SECURE)])  # fmt: skip
    (m,) = p.mx
    assert m.auth == "dane"
    assert m.names[0] == M
    assert ("example.test" in m.names) is domain_is_a_name
