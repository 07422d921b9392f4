"""The bulk lab scenario: many customer domains on a few providers' MX hosts.

The first tests are pure (the scenario as data); the last ones start a bulk lab and look at
it from the outside, as an audit would: MX and TLSA through the validating resolver, the
MTA-STS policy over HTTPS from the shared policy listener, and SMTP connections counted per
MX host.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from lab_dns_helpers import authenticated, data, query
from mxguard.adapters.https import fetch_policy
from mxguard.lab.bulk import (
    bulk_domains,
    bulk_scenario,
    customer_name,
    provider_name,
    write_domain_list,
)
from mxguard.lab.lab import SHARED_POLICY_LISTENER_ABOVE, Lab
from mxguard.lab.scenario import CertKind, Dnssec, Domain, Scenario
from mxguard.protocol import names
from mxguard.protocol.dane import association_data

LAB_NET = "127.93"  # this file's own lab network (the session lab uses MXGUARD_TEST_LAB_NET)


def customers(s: Scenario) -> list[Domain]:
    return [d for d in s.domains if not d.hosts]


def kind(d: Domain) -> str:
    if d.mta_sts is not None:
        return d.mta_sts.mode
    return "tlsrpt" if d.tlsrpt else "none"


# --- the scenario as data -----------------------------------------------------------------


def test_bulk_scenario_is_deterministic_and_depends_on_the_seed() -> None:
    assert bulk_scenario(300, 12, seed=7) == bulk_scenario(300, 12, seed=7)
    assert bulk_scenario(300, 12, seed=7) != bulk_scenario(300, 12, seed=8)


def test_bulk_scenario_is_valid_with_valid_names() -> None:
    s = bulk_scenario(2000, 40)
    assert s.validate() is s
    for d in s.domains:
        assert names.dns_name(d.name) == d.name
        for _, host in d.mx_hosts():
            assert names.dns_name(host) == host


@pytest.mark.parametrize(("domains", "hosts"), [(2000, 40), (200, 8), (10, 10), (7, 3)])
def test_bulk_scenario_has_the_requested_counts(domains: int, hosts: int) -> None:
    s = bulk_scenario(domains, hosts)
    assert len(s.hosts()) == hosts
    providers = [d for d in s.domains if d.hosts]
    assert [d.name for d in providers] == [provider_name(i + 1) for i in range(min(4, hosts))]
    sizes = [len(d.hosts) for d in providers]
    assert max(sizes) - min(sizes) <= 1
    assert [d.name for d in customers(s)] == bulk_domains(domains)
    assert customer_name(1, domains) == "d0001.test"
    host_names = {h.name for h in s.hosts()}
    for d in customers(s):
        mx = d.mx_hosts()
        # Two MX hosts of one provider; one only if the provider has no more.
        size = len(s.domain(mx[0][1].split(".", 1)[1]).hosts)
        assert [pref for pref, _ in mx] == ([10, 20] if size >= 2 else [10])
        assert len({h for _, h in mx}) == len(mx)
        assert {h for _, h in mx} <= host_names
        # Both MX hosts belong to one provider, which the MTA-STS policy names.
        zones = {h.split(".", 1)[1] for _, h in mx}
        assert len(zones) == 1
        if d.mta_sts is not None:
            assert d.mta_sts.mx == (f"*.{zones.pop()}",)


def test_bulk_scenario_has_the_requested_mix() -> None:
    s = bulk_scenario(2000, 40, seed=3)
    counts = Counter(kind(d) for d in customers(s))
    assert counts == {"enforce": 800, "testing": 200, "tlsrpt": 200, "none": 800}
    assert kind(s.domain("d0001.test")) == "enforce"
    for d in customers(s):
        if kind(d) == "tlsrpt":
            assert d.tlsrpt == (f"v=TLSRPTv1; rua=mailto:tlsrpt@{d.name}",)
        else:
            assert d.tlsrpt == ()
    signed = sum(1 for d in customers(s) if d.dnssec is Dnssec.SIGNED)
    assert signed == 400
    assert all(d.dnssec in (Dnssec.SIGNED, Dnssec.UNSIGNED) for d in s.domains)
    # Customers spread over every provider, and the MX hosts are shared by many domains.
    used = Counter(h for d in customers(s) for _, h in d.mx_hosts())
    assert set(used) == {h.name for h in s.hosts()}
    assert min(used.values()) >= 20


def test_providers_alternate_signed_with_dane_and_unsigned() -> None:
    s = bulk_scenario(100, 10)
    for i in range(1, 5):
        p = s.domain(provider_name(i))
        signed = i % 2 == 1
        assert p.dnssec is (Dnssec.SIGNED if signed else Dnssec.UNSIGNED)
        assert all(h.tlsa == (("3 1 1",) if signed else ()) for h in p.hosts)
        assert all(h.starttls for h in p.hosts)
    # One certificate that expires soon, on the last host of the last provider.
    kinds = [(h.name, h.cert) for h in s.hosts() if h.cert is not CertKind.VALID]
    assert kinds == [("mx2.provider4.test", CertKind.EXPIRING)]


def test_bulk_scenario_other_tld_and_wide_names() -> None:
    s = bulk_scenario(12000, 4, tld="example")
    assert s.tld == "example"
    assert customers(s)[0].name == "d00001.example"
    assert customers(s)[-1].name == "d12000.example"


def test_write_domain_list(tmp_path: Path) -> None:
    path = write_domain_list(tmp_path / "domains.txt", 25)
    assert path.read_text(encoding="utf-8").splitlines() == bulk_domains(25)
    s = bulk_scenario(5, 2, tld="example")
    text = write_domain_list(tmp_path / "from-scenario.txt", s).read_text(encoding="utf-8")
    assert text == "".join(f"d000{i}.example\n" for i in range(1, 6))


def test_bulk_scenario_refuses_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="hosts"):
        bulk_scenario(10, 0)
    with pytest.raises(ValueError, match="domains"):
        bulk_scenario(-1, 4)


def test_many_policy_hosts_share_one_address(tmp_path: Path) -> None:
    # Decided when the Lab is made (nothing is started here): above the threshold every
    # mta-sts.<domain> has the same address; at or below it each has its own.
    many = bulk_scenario(2 * SHARED_POLICY_LISTENER_ABOVE + 10, 4)
    lab = Lab(many, workdir=tmp_path / "many", net=LAB_NET)
    assert lab.address_of("mta-sts.d0001.test") == lab.address_of("mta-sts.d0002.test")
    few = bulk_scenario(20, 4)
    lab = Lab(few, workdir=tmp_path / "few", net=LAB_NET)
    assert lab.address_of("mta-sts.d0001.test") != lab.address_of("mta-sts.d0002.test")
    lab = Lab(few, workdir=tmp_path / "forced", net=LAB_NET, shared_policy_listener=True)
    assert lab.address_of("mta-sts.d0001.test") == lab.address_of("mta-sts.d0002.test")


# --- a running bulk lab -------------------------------------------------------------------

BULK = bulk_scenario(250, 8)  # 125 MTA-STS domains: above the threshold, so a shared listener


@pytest.fixture(scope="module")
def bulk_lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None and shutil.which("/usr/sbin/unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(BULK, net=LAB_NET) as lab:
        yield lab


def address(lab: Lab, name: str) -> str:
    answer = data(query(name, "A", lab.resolver), "A")
    assert answer, f"no A record for {name}"
    return str(answer[0][0].address)


@pytest.mark.lab
def test_bulk_lab_answers_mx_through_the_resolver(bulk_lab: Lab) -> None:
    for d in (customers(BULK)[0], customers(BULK)[-1]):
        response = query(d.name, "MX", bulk_lab.resolver)
        assert response.rcode() == dns.rcode.NOERROR
        mx = sorted(
            (r.preference, r.exchange.to_text(omit_final_dot=True))
            for rrset in data(response, "MX")
            for r in rrset
        )
        assert mx == d.mx_hosts()
        assert authenticated(response) is (d.dnssec is Dnssec.SIGNED)
        # The MX hosts resolve to the attackers in front of the receivers.
        for _, host in mx:
            assert address(bulk_lab, host) == bulk_lab.address_of(host)


@pytest.mark.lab
def test_bulk_lab_serves_policies_from_one_shared_listener(bulk_lab: Lab) -> None:
    listener = bulk_lab.policy_listener
    assert listener is not None
    sts = [d for d in customers(BULK) if d.mta_sts is not None]
    assert len(listener.hosts) == len(sts) > SHARED_POLICY_LISTENER_ABOVE
    testing = next(d for d in sts if d.mta_sts is not None and d.mta_sts.mode == "testing")
    for d in (BULK.domain("d0001.test"), testing):
        assert d.mta_sts is not None
        connect_to = address(bulk_lab, f"mta-sts.{d.name}")
        assert connect_to == listener.address
        host = bulk_lab.policy_host(d.name)
        before = host.fetches
        result = asyncio.run(
            fetch_policy(
                d.name,
                ca_file=bulk_lab.ca_file,
                port=bulk_lab.ports.https,
                connect_to=connect_to,
            )
        )
        assert result.ok, result.detail
        assert result.text == d.mta_sts.body(d.name)
        assert host.fetches == before + 1
        assert host.requests[-1].sni == f"mta-sts.{d.name}"
    # A domain without MTA-STS has no policy host name in DNS.
    plain = next(d for d in customers(BULK) if d.mta_sts is None)
    assert query(f"mta-sts.{plain.name}", "A", bulk_lab.resolver).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.lab
def test_shared_listener_refuses_a_name_it_does_not_host(bulk_lab: Lab) -> None:
    listener = bulk_lab.policy_listener
    assert listener is not None
    ctx = ssl.create_default_context(cafile=str(bulk_lab.ca_file))
    for name in ("mta-sts.nowhere.test", None):
        with (
            socket.create_connection((listener.address, bulk_lab.ports.https), timeout=5) as raw,
            pytest.raises((ssl.SSLError, ConnectionError)),
        ):
            if name is None:  # no SNI at all
                ctx.check_hostname = False
            ctx.wrap_socket(raw, server_hostname=name)
    # ... and goes on serving the names it hosts.
    with (
        socket.create_connection((listener.address, bulk_lab.ports.https), timeout=5) as raw,
        ssl.create_default_context(cafile=str(bulk_lab.ca_file)).wrap_socket(
            raw, server_hostname="mta-sts.d0001.test"
        ) as tls,
    ):
        tls.sendall(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.d0001.test\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200 ")


@pytest.mark.lab
def test_bulk_lab_publishes_tlsa_for_signed_providers_only(bulk_lab: Lab) -> None:
    dane_host = BULK.domain(provider_name(1)).hosts[0].name
    response = query(f"_25._tcp.{dane_host}", "TLSA", bulk_lab.resolver)
    assert authenticated(response)
    records = [r for rrset in data(response, "TLSA") for r in rrset]
    identity = bulk_lab.receiver(dane_host).identity
    assert identity is not None
    assert [(r.usage, r.selector, r.mtype, r.cert) for r in records] == [
        (3, 1, 1, association_data(identity.leaf, 1, 1))
    ]
    plain_host = BULK.domain(provider_name(2)).hosts[0].name
    response = query(f"_25._tcp.{plain_host}", "TLSA", bulk_lab.resolver)
    assert not data(response, "TLSA")
    assert not authenticated(response)


@pytest.mark.lab
def test_bulk_lab_counts_smtp_connections_per_host(bulk_lab: Lab) -> None:
    bulk_lab.clear_records()
    host = BULK.domain(provider_name(4)).hosts[-1]
    assert host.cert is CertKind.EXPIRING
    counts = bulk_lab.smtp_connections()
    assert set(counts) == {h.name for h in BULK.hosts()} | {bulk_lab.attacker_host}
    assert not any(counts.values())
    for _ in range(2):
        with smtplib.SMTP(bulk_lab.address_of(host.name), bulk_lab.ports.smtp, timeout=10) as s:
            s.ehlo("audit.mxguard.test")
            assert s.has_extn("starttls")
    counts = bulk_lab.smtp_connections()
    assert counts[host.name] == 2
    assert sum(counts.values()) == 2
    assert len(bulk_lab.attacker(host.name).sessions) == 2
