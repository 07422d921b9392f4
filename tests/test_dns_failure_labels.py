"""A DNS lookup that got no answer is called what it is, never a certificate failure.

RFC 8460 §4.3 names TLS outcomes. ``validation-failure`` is the general *negotiation* failure
(§4.3.3: a negotiation failure that fits no other type); a DNS timeout happens before any
negotiation, and since no session follows it there is nothing to report to TLS-RPT (§4: the
report counts sessions). So a DNS error has no result type: people read what happened
("DNS timeout looking up MX for slow.test (no answer from 127.0.0.1 within 0.3 s)"), and the
JSON ``result_type`` next to it is null, as it already is for a refused TCP connection.
A DNSSEC failure keeps ``dnssec-invalid`` (§4.3.2.1): that one is a policy failure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import threading
from collections.abc import Iterator
from functools import partial

import dns.message
import dns.rcode
import pytest
from click.testing import CliRunner

from mxguard.adapters.dns import DnsAnswer, DnsOutcome, DnsResolver, DnssecStatus
from mxguard.adapters.store import CachedPolicy, Store, open_store
from mxguard.cli import main
from mxguard.engine.policy import DeliveryPolicy
from mxguard.engine.resolve import Resolver
from mxguard.engine.sts import StsResolver
from mxguard.postfix.answers import policy_answer
from mxguard.protocol.results import Failure, ResultType

SECURE, INSECURE, INDET = DnssecStatus.SECURE, DnssecStatus.INSECURE, DnssecStatus.INDETERMINATE
D = "slow.test"


# --- the DNS adapter's words, against real sockets -------------------------------------------


@pytest.fixture
def silent() -> Iterator[tuple[str, int]]:
    """A UDP socket on loopback that receives queries and never answers them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield "127.0.0.1", s.getsockname()[1]


@pytest.fixture
def refusing() -> Iterator[tuple[str, int]]:
    """A resolver on loopback that answers every query with REFUSED."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.1)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    wire, peer = s.recvfrom(4096)
                except TimeoutError:
                    continue
                reply = dns.message.make_response(dns.message.from_wire(wire))
                reply.set_rcode(dns.rcode.REFUSED)
                s.sendto(reply.to_wire(), peer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        yield "127.0.0.1", s.getsockname()[1]
        stop.set()
        t.join()


def test_a_timeout_is_called_a_dns_timeout(silent: tuple[str, int]) -> None:
    addr, port = silent
    answer = asyncio.run(DnsResolver([silent], timeout=0.3).query(D, "MX"))
    assert (answer.outcome, answer.dnssec) == (DnsOutcome.ERROR, INDET)
    assert answer.detail == (
        f"DNS timeout looking up MX for {D} (no answer from {addr}:{port} within 0.3 s)"
    )


def test_a_refusal_is_a_dns_error_that_says_who_refused(refusing: tuple[str, int]) -> None:
    addr, port = refusing
    answer = asyncio.run(DnsResolver([refusing], timeout=2).query(D, "MX"))
    assert answer.outcome is DnsOutcome.ERROR
    assert answer.detail == f"DNS error looking up MX for {D}: {addr}:{port} answered REFUSED"


def test_one_resolver_silent_and_one_refusing_names_both(
    silent: tuple[str, int], refusing: tuple[str, int]
) -> None:
    answer = asyncio.run(DnsResolver([silent, refusing], timeout=0.3).query(D, "MX"))
    # The second resolver answered: its answer decides (the first that answers decides).
    assert answer.detail.endswith("answered REFUSED")


# --- what resolve() and the failure vocabulary make of it ------------------------------------


class ScriptedDns(DnsResolver):
    def __init__(self, script: dict[tuple[str, str], DnsAnswer]) -> None:
        super().__init__([("127.0.0.1", 9)])
        self.script = script

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        return self.script.get((name, rdtype)) or DnsAnswer(
            name, rdtype, DnsOutcome.NXDOMAIN, INSECURE, canonical=name
        )


def timeout(name: str, rdtype: str) -> DnsAnswer:
    detail = f"DNS timeout looking up {rdtype} for {name} (no answer from 127.0.0.1 within 5 s)"
    return DnsAnswer(name, rdtype, DnsOutcome.ERROR, INDET, canonical=name, detail=detail)


def bogus(name: str, rdtype: str) -> DnsAnswer:
    detail = f"DNSSEC validation failed for {name} {rdtype} (EDE 6 DNSSEC_BOGUS)"
    return DnsAnswer(name, rdtype, DnsOutcome.ERROR, DnssecStatus.BOGUS, canonical=name,
                     detail=detail)  # fmt: skip


def ok(name: str, rdtype: str, *texts: str, status: DnssecStatus = INSECURE) -> DnsAnswer:
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    records = tuple(
        dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), t) for t in texts
    )
    return DnsAnswer(name, rdtype, DnsOutcome.OK, status, records, canonical=name, ttl=60)


def nodata(name: str, rdtype: str, status: DnssecStatus = INSECURE) -> DnsAnswer:
    return DnsAnswer(name, rdtype, DnsOutcome.NODATA, status, canonical=name, ttl=60)


@pytest.fixture
def store() -> Iterator[Store]:
    s = asyncio.run(open_store("sqlite:///:memory:"))
    yield s
    asyncio.run(s.close())


def resolve(store: Store, *answers: DnsAnswer) -> DeliveryPolicy:
    dns_ = ScriptedDns({(a.name, a.rdtype): a for a in answers})
    return asyncio.run(Resolver(dns_, StsResolver(dns_, store)).resolve(D))


MX = ok(D, "MX", f"10 mx.{D}.")
H = f"mx.{D}"
SIGNED = (ok(D, "MX", f"10 {H}.", status=SECURE), ok(H, "A", "192.0.2.1", status=SECURE),
          nodata(H, "AAAA", status=SECURE))  # fmt: skip

# (rule, DNS answers, the failure as JSON, the line people read)
LABEL_ROWS = [
    (
        "mx_timeout_has_no_result_type",
        (timeout(D, "MX"),),
        {"result_type": None, "detail": timeout(D, "MX").detail},
        timeout(D, "MX").detail,
    ),
    (
        "address_timeout_has_no_result_type",
        (MX, timeout(H, "A"), nodata(H, "AAAA")),
        {"result_type": None, "detail": timeout(H, "A").detail},
        timeout(H, "A").detail,
    ),
    (
        "tlsa_timeout_has_no_result_type",
        (*SIGNED, timeout(f"_25._tcp.{H}", "TLSA")),
        {"result_type": None, "detail": timeout(f"_25._tcp.{H}", "TLSA").detail},
        timeout(f"_25._tcp.{H}", "TLSA").detail,
    ),
    # RFC 8460 §4.3.2.1: a DNSSEC validation failure is a DANE policy failure, and says so.
    (
        "bogus_mx_stays_dnssec_invalid",
        (bogus(D, "MX"),),
        {"result_type": "dnssec-invalid", "detail": "MX lookup: " + bogus(D, "MX").detail},
        "dnssec-invalid: MX lookup: " + bogus(D, "MX").detail,
    ),
]


@pytest.mark.parametrize(("rule", "answers", "as_json", "line"), LABEL_ROWS,
                         ids=[r[0] for r in LABEL_ROWS])  # fmt: skip
def test_what_a_failed_lookup_is_called(
    store: Store, rule: str, answers: tuple[DnsAnswer, ...], as_json: dict[str, str], line: str
) -> None:
    p = resolve(store, *answers)
    assert p.status == "defer"
    (failure,) = p.errors
    assert (failure.to_json(), str(failure)) == (as_json, line)
    assert p.to_json()["errors"] == [as_json]
    assert "validation-failure" not in json.dumps(p.to_json())


def test_the_domain_explanation_says_what_happened(store: Store) -> None:
    p = resolve(store, timeout(D, "MX"))
    assert p.explanation == (f"deferred: {timeout(D, 'MX').detail}",)


def test_the_failure_vocabulary_keeps_tls_failures_as_they_were() -> None:
    f = Failure(ResultType.CERTIFICATE_EXPIRED, "the certificate expired yesterday")
    assert (str(f), f.reported_type, f.to_json()["result_type"]) == (
        "certificate-expired: the certificate expired yesterday",
        ResultType.CERTIFICATE_EXPIRED,
        "certificate-expired",
    )
    dns_error = Failure.dns_lookup("DNS timeout looking up MX for a.test")
    assert (str(dns_error), dns_error.reported_type) == (
        "DNS timeout looking up MX for a.test",
        None,
    )


# --- MTA-STS discovery: RFC 8460 §4.3.2.2 ------------------------------------------------------

POLICY = "version: STSv1\nmode: enforce\nmx: *.slow.test\nmax_age: 86400\n"


def sts_lookup(store: Store, *, cached: bool) -> tuple[tuple[Failure, ...], bool, tuple[str, ...]]:
    dns_ = ScriptedDns({(f"_mta-sts.{D}", "TXT"): timeout(f"_mta-sts.{D}", "TXT")})
    now = dt.datetime.now(dt.UTC)
    if cached:
        entry = CachedPolicy(D, "1", POLICY, now, now + dt.timedelta(days=1))
        asyncio.run(store.put_policy(entry))
    outcome = asyncio.run(StsResolver(dns_, store).lookup(D))
    return outcome.errors, outcome.policy is not None, outcome.notes


@pytest.mark.parametrize("cached", [False, True], ids=["nothing_cached", "policy_cached"])
def test_a_timed_out_mta_sts_txt_lookup_is_no_sts_policy_fetch_error(
    store: Store, cached: bool
) -> None:
    """RFC 8460 §4.3.2.2: ``sts-policy-fetch-error`` is "a failure to retrieve an MTA-STS
    policy", e.g. the policy host unreachable: the HTTPS fetch of RFC 8461 §3.3. A TXT lookup
    that got no answer has not shown that there is a policy to retrieve (discovery, RFC 8461
    §3.1): with nothing cached the domain is treated as having no MTA-STS, with a cached policy
    that policy applies (RFC 8461 §5.1). Either way no MTA-STS result type is reported; the
    timeout is a note for people."""
    errors, has_policy, notes = sts_lookup(store, cached=cached)
    assert (errors, has_policy) == ((), cached)
    assert any(timeout(f"_mta-sts.{D}", "TXT").detail in n for n in notes), notes


# --- what people read: `mxguard send`, and Postfix's TEMP reason ------------------------------


@pytest.mark.usefixtures("quick_dns")
def test_send_says_dns_timeout_not_validation_failure(silent: tuple[str, int]) -> None:
    addr, port = silent
    args = ["--resolver", f"{addr}:{port}", "--store", "sqlite:///:memory:", "send",
            "--from", "me@sender.test", "--to", f"bob@{D}"]  # fmt: skip
    text = CliRunner().invoke(main, args, env={"MXGUARD_CONFIG": "/dev/null"})
    as_json = CliRunner().invoke(main, ["--json", *args], env={"MXGUARD_CONFIG": "/dev/null"})
    assert (text.exit_code, as_json.exit_code) == (75, 75)
    assert "validation-failure" not in text.output
    assert text.output.splitlines()[0] == (
        f"{D} (policy none/none): DEFERRED — deferred: DNS timeout looking up MX for {D} "
        f"(no answer from {addr}:{port} within 0.3 s)"
    )
    out = json.loads(as_json.output)
    assert (out["status"], out["result_type"], out["attempts"]) == ("deferred", None, [])


@pytest.fixture
def quick_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mxguard.engine.context.DnsResolver", partial(DnsResolver, timeout=0.3))


def test_postfix_temp_reason_says_dns_timeout(store: Store) -> None:
    p = resolve(store, timeout(D, "MX"))
    answer = policy_answer(p).socketmap().decode()
    assert answer == f"TEMP {D}: {timeout(D, 'MX').detail}"
