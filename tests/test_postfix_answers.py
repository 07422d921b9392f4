"""What mxguard answers Postfix: one row per kind of policy, and per kind of key.

The first tables build ``DeliveryPolicy`` objects directly (the translation is pure); the
last one goes end to end through the lab, where Unbound, the policy hosts and the static list
decide the policy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from mxguard.config import load
from mxguard.engine.context import engine
from mxguard.engine.policy import (
    Auth,
    DeliveryPolicy,
    Mode,
    MxPolicy,
    Source,
    Status,
    StsState,
    Tls,
)
from mxguard.lab.lab import Lab
from mxguard.postfix.answers import (
    Answer,
    Key,
    KeyKind,
    Kind,
    Options,
    key_answer,
    parse_key_bytes,
    parse_request,
    policy_answer,
)
from mxguard.postfix.query import query
from mxguard.protocol import localrules
from mxguard.protocol.results import Failure, ResultType

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def mx(host: str, tls: Tls = Tls.OPPORTUNISTIC, auth: Auth = Auth.NONE, **kw: object) -> MxPolicy:
    return MxPolicy(host=host, preference=10, tls=tls, auth=auth, addresses=("192.0.2.1",),
                    **kw)  # type: ignore[arg-type]  # fmt: skip


def sts_state(mode: str, patterns: tuple[str, ...], error: Failure | None = None) -> StsState:
    lines = ("version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in patterns), "max_age: 86400")
    return StsState("id1", mode, 86400, patterns, lines, NOW, NOW + dt.timedelta(days=1),
                    from_cache=False, error=error)  # fmt: skip


def policy(source: Source, mode: Mode, *hosts: MxPolicy, status: Status = Status.OK,
           **kw: object) -> DeliveryPolicy:  # fmt: skip
    return DeliveryPolicy(domain="a.test", source=source, mode=mode, status=status, mx=hosts,
                          **kw)  # type: ignore[arg-type]  # fmt: skip


DANE_HOST = mx("mx.a.test", Tls.REQUIRED, Auth.DANE, source=Source.DANE)
UNUSABLE_TLSA = mx("mx.a.test", Tls.REQUIRED, Auth.NONE, source=Source.DANE)
STS_HOST = mx("mx1.a.test", Tls.REQUIRED, Auth.PKIX, source=Source.MTA_STS)
PLAIN = mx("mx2.a.test")
ENFORCE = sts_state("enforce", ("*.a.test", "mail.b.test"))
TESTING = sts_state("testing", ("*.a.test",))
# The allowed MX hosts' own names, never the wildcard patterns (a certificate for any name
# under the domain must not pass for mx1), and never hostname alone (a spoofed MX must not).
SECURE = "secure match=mx1.a.test servername=hostname"
FETCH_ERROR = Failure(ResultType.STS_POLICY_FETCH_ERROR, "timed out")
BOGUS = Failure(ResultType.DNSSEC_INVALID, "MX lookup: DNSSEC validation failed")

CASES = [
    # (rule, policy, options, expected reply)
    ("usable DANE -> dane-only", policy(Source.DANE, Mode.ENFORCE, DANE_HOST), Options(),
     "OK dane-only"),
    ("DANE beats MTA-STS (RFC 8461 §2)",
     policy(Source.DANE, Mode.ENFORCE, DANE_HOST, mta_sts=ENFORCE), Options(), "OK dane-only"),
    ("DANE hosts beside MTA-STS-verified hosts: only the DANE hosts (dane-only)",
     policy(Source.DANE, Mode.ENFORCE, DANE_HOST, STS_HOST, mta_sts=ENFORCE), Options(),
     "OK dane-only"),
    ("DANE hosts beside hosts without TLSA: Postfix's per-host dane",
     policy(Source.DANE, Mode.ENFORCE, DANE_HOST, PLAIN), Options(), "OK dane"),
    ("a host skipped for a failed TLSA lookup beside opportunistic ones -> dane, never may",
     policy(Source.NONE, Mode.NONE, PLAIN, mx("mx1.a.test", defer=BOGUS)), Options(), "OK dane"),
    ("a host skipped for a failed TLSA lookup beside encrypt-only ones -> TEMP",
     policy(Source.LOCAL, Mode.ENFORCE, mx("mx2.a.test", Tls.REQUIRED, source=Source.LOCAL),
            mx("mx1.a.test", defer=BOGUS), local_floor="tls", errors=(BOGUS,)),
     Options(), "TEMP a.test: dnssec-invalid: MX lookup: DNSSEC validation failed"),
    ("only unusable TLSA -> encrypt", policy(Source.DANE, Mode.ENFORCE, UNUSABLE_TLSA),
     Options(), "OK encrypt"),
    ("only unusable TLSA, option dane -> dane", policy(Source.DANE, Mode.ENFORCE, UNUSABLE_TLSA),
     Options(unusable_tlsa="dane"), "OK dane"),
    ("MTA-STS enforce -> secure match=the allowed MX hosts",
     policy(Source.MTA_STS, Mode.ENFORCE, STS_HOST, mta_sts=ENFORCE), Options(), f"OK {SECURE}"),
    ("MTA-STS enforce with TLS-RPT attributes (Postfix >= 3.10)",
     policy(Source.MTA_STS, Mode.ENFORCE, STS_HOST, mta_sts=ENFORCE),
     Options(tlsrpt_attributes=True),
     f"OK {SECURE} policy_type=sts policy_domain=a.test mx_host_pattern=*.a.test "
     "mx_host_pattern=mail.b.test { policy_string = version: STSv1 } "
     "{ policy_string = mode: enforce } { policy_string = mx: *.a.test } "
     "{ policy_string = mx: mail.b.test } { policy_string = max_age: 86400 }"),
    ("MTA-STS testing -> NOTFOUND: Postfix's own default level applies",
     policy(Source.MTA_STS, Mode.TESTING, mx("mx1.a.test", report_only=True), mta_sts=TESTING),
     Options(), "NOTFOUND "),
    ("MTA-STS testing, strict -> encrypt",
     policy(Source.MTA_STS, Mode.TESTING, mx("mx1.a.test", report_only=True), mta_sts=TESTING),
     Options(strict_testing=True), "OK encrypt"),
    ("MTA-STS testing with TLS-RPT attributes -> may plus the attributes",
     policy(Source.MTA_STS, Mode.TESTING, mx("mx1.a.test", report_only=True), mta_sts=TESTING),
     Options(tlsrpt_attributes=True),
     "OK may policy_type=sts policy_domain=a.test mx_host_pattern=*.a.test "
     "{ policy_string = version: STSv1 } { policy_string = mode: testing } "
     "{ policy_string = mx: *.a.test } { policy_string = max_age: 86400 }"),
    # RFC 8461 §5: no policy. Postfix 3.10 would report a policy_failure answer as a successful
    # `sts` policy without policy lines, and smtp(8) before 3.10.6 crashes on one.
    ("failed fetch, nothing cached, attributes on -> NOTFOUND (no policy, RFC 8461 §5)",
     policy(Source.NONE, Mode.NONE, PLAIN,
            mta_sts=StsState(None, None, None, (), (), None, None, False, FETCH_ERROR)),
     Options(tlsrpt_attributes=True), "NOTFOUND "),
    ("static list enforce -> secure match=the allowed MX hosts",
     policy(Source.LIST, Mode.ENFORCE, mx("mx.a.test", Tls.REQUIRED, Auth.PKIX,
                                          source=Source.LIST)),
     Options(), "OK secure match=mx.a.test servername=hostname"),
    ("local floor tls -> encrypt",
     policy(Source.LOCAL, Mode.ENFORCE, mx("mx.a.test", Tls.REQUIRED, source=Source.LOCAL),
            local_floor="tls"), Options(), "OK encrypt"),
    ("local floor verified -> secure match=hostname",
     policy(Source.LOCAL, Mode.ENFORCE, mx("mx.a.test", Tls.REQUIRED, Auth.PKIX,
                                           source=Source.LOCAL), local_floor="verified"),
     Options(), "OK secure match=hostname servername=hostname"),
    ("local floor dane without usable TLSA -> dane-only (Postfix defers by itself)",
     policy(Source.LOCAL, Mode.ENFORCE,
            mx("mx.a.test", defer=Failure(ResultType.DANE_REQUIRED, "no TLSA")),
            status=Status.DEFER, local_floor="dane"), Options(), "OK dane-only"),
    ("DNSSEC failure -> TEMP, never a weaker level",
     policy(Source.NONE, Mode.NONE, status=Status.DEFER, errors=(BOGUS,)), Options(),
     "TEMP a.test: dnssec-invalid: MX lookup: DNSSEC validation failed"),
    ("no policy -> NOTFOUND", policy(Source.NONE, Mode.NONE, PLAIN), Options(), "NOTFOUND "),
    ("null MX or no such domain -> NOTFOUND (Postfix bounces on its own)",
     policy(Source.NONE, Mode.NONE, status=Status.FAIL), Options(), "NOTFOUND "),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "p", "options", "expected"), CASES, ids=[c[0] for c in CASES])
def test_policy_answer(rule: str, p: DeliveryPolicy, options: Options, expected: str) -> None:
    patterns = ("*.a.test",) if p.source is Source.LIST else ()
    assert policy_answer(p, options, list_patterns=patterns).socketmap().decode() == expected


def test_temp_reasons_are_one_bounded_printable_line() -> None:
    p = policy(Source.NONE, Mode.NONE, status=Status.DEFER,
               errors=(Failure(ResultType.VALIDATION_FAILURE, "x\n\x00" * 300),))  # fmt: skip
    reason = policy_answer(p).text
    assert len(reason) <= 200
    assert reason.isprintable()


# --- keys ----------------------------------------------------------------------------------

RULES = localrules.parse_rules({"relay.test": "verified", "tls-only.test": "tls"})

KEYS = [
    # (rule, request payload, parsed key or the reply)
    ("a domain", b"postfix Example.TEST", Key(KeyKind.DOMAIN, "example.test")),
    ("a trailing dot is dropped", b"postfix example.test.", Key(KeyKind.DOMAIN, "example.test")),
    ("a U-label becomes an A-label", "postfix bücher.test".encode(),
     Key(KeyKind.DOMAIN, "xn--bcher-kva.test")),
    ("domain:25 is the domain", b"postfix example.test:25",
     Key(KeyKind.DOMAIN, "example.test", 25)),
    ("a parent-domain lookup", b"postfix .example.test", Key(KeyKind.PARENT, "example.test")),
    ("a next-hop host", b"postfix [mx.example.test]", Key(KeyKind.NEXTHOP, "mx.example.test")),
    ("a next-hop host and port", b"postfix [mx.example.test]:587",
     Key(KeyKind.NEXTHOP, "mx.example.test", 587)),
    ("a domain with another port", b"postfix example.test:587",
     Key(KeyKind.NEXTHOP, "example.test", 587)),
    ("an IPv4 literal", b"postfix [192.0.2.1]", Key(KeyKind.IP_LITERAL, "192.0.2.1")),
    ("an IPv6 literal", b"postfix [ipv6:2001:DB8::1]:25",
     Key(KeyKind.IP_LITERAL, "2001:db8::1", 25)),
    ("a bare address", b"postfix 192.0.2.1", Key(KeyKind.IP_LITERAL, "192.0.2.1")),
    ("an empty label", b"postfix a..b", "PERM invalid key: 'a..b' is not a valid domain name"),
    ("over 253 octets", b"postfix " + b"a." * 127 + b"test", "PERM invalid key"),
    ("a label over 63 octets", b"postfix " + b"a" * 64 + b".test", "PERM invalid key"),
    ("invalid UTF-8", b"postfix \xff\xfe.test", "PERM invalid key: not valid UTF-8"),
    ("a control character", b"postfix a\x01.test", "PERM invalid key: control character"),
    ("a space in the key", b"postfix a b", "PERM invalid key: control character or space"),
    ("an empty key", b"postfix ", "PERM invalid key: empty key"),
    ("'[' without ']'", b"postfix [mx.test", "PERM invalid key"),
    ("a port out of range", b"postfix [mx.test]:99999", "PERM invalid key"),
    ("no map name", b"example.test", "PERM request is not '<map name> <key>'"),
    ("an unknown map", b"other example.test", "PERM unknown map 'other'"),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "payload", "expected"), KEYS, ids=[k[0] for k in KEYS])
def test_request_keys(rule: str, payload: bytes, expected: Key | str) -> None:
    parsed = parse_request(payload, Options())
    if isinstance(expected, Key):
        assert parsed == expected
    else:
        assert isinstance(parsed, Answer)
        assert parsed.socketmap().decode().startswith(expected)


@pytest.mark.parametrize(
    ("rule", "key", "expected"),
    [
        ("a parent-domain lookup is NOTFOUND: policies belong to one domain",
         b".relay.test", "NOTFOUND "),
        ("an IP literal is NOTFOUND", b"[192.0.2.1]", "NOTFOUND "),
        ("a next hop no rule names is NOTFOUND", b"[mx.other.test]:587", "NOTFOUND "),
        ("a next hop a local rule names gets the rule's level", b"[relay.test]:587",
         "OK secure match=hostname servername=hostname"),
        ("a local tls rule on a next hop", b"tls-only.test:2525", "OK encrypt"),
    ],
)  # fmt: skip
def test_keys_answered_without_a_policy(rule: str, key: bytes, expected: str) -> None:
    parsed = parse_key_bytes(key)
    assert isinstance(parsed, Key)
    answer = key_answer(parsed, RULES)
    assert answer is not None
    assert answer.socketmap().decode() == expected


def test_a_domain_key_needs_a_policy() -> None:
    assert key_answer(Key(KeyKind.DOMAIN, "relay.test"), RULES) is None


# --- end to end through the lab ------------------------------------------------------------

LAB_CASES = [
    (
        "sts-enforce.test",
        "OK secure match=mx1.sts-enforce.test:mx2.sts-enforce.test servername=hostname",
    ),
    ("sts-testing.test", "NOTFOUND "),
    ("dane-ee.test", "OK dane-only"),
    ("dane-sts.test", "OK dane-only"),
    ("dane-unusable.test", "OK encrypt"),
    ("dane-bogus.test", "TEMP dane-bogus.test: dnssec-invalid"),
    ("nopolicy.test", "NOTFOUND "),
    ("list.test", "OK secure match=mx.list.test servername=hostname"),
    ("local-rule.test", "OK secure match=hostname servername=hostname"),
    ("nullmx.test", "NOTFOUND "),
]


@pytest.mark.lab
def test_answers_through_the_lab(lab: Lab, tmp_path: Path) -> None:
    settings = load(lab.config_file).with_overrides(store=f"sqlite:///{tmp_path / 's.db'}")

    async def run() -> list[tuple[str, str]]:
        async with engine(settings) as e:
            out = []
            for domain, _ in LAB_CASES:
                answer, _policy = await query(e, domain)
                out.append((domain, answer.socketmap().decode()))
            return out

    got = asyncio.run(run())
    # TEMP reasons carry the resolver's wording after the result type: compare the start.
    assert [(d, a[: len(e)]) for (d, a), (_, e) in zip(got, LAB_CASES, strict=True)] == LAB_CASES


def test_answer_kinds_map_to_tcp_table_codes() -> None:
    assert Answer(Kind.OK, "dane-only").tcp_table() == b"200 dane-only\n"
    assert Answer(Kind.NOTFOUND).tcp_table() == b"500 notfound\n"
    assert Answer(Kind.TEMP, "try later").tcp_table() == b"400 try%20later\n"
    assert Answer(Kind.PERM, "bad key").tcp_table() == b"400 bad%20key\n"
