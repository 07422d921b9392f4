"""Postfix 3.10's TLSRPT datagrams (libtlsrpt's protocol) and mxguard's receiver of them.

Three kinds of test:

- the datagrams a real Postfix 3.10.13 with Debian 13's libtlsrpt 0.5.0rc1 sent into the lab
  (tests/fixtures/tlsrpt-datagrams/, captured with tests/postfix310_harness.py: STS success,
  STARTTLS stripped, a certificate for the wrong name, STS testing, DANE success, and an
  MTA-STS domain answered without the TLS-RPT attributes), and
  datagrams built here the way libtlsrpt's writer builds them (libtlsrpt.c: the `dpv` of
  0.5.0 and later, every failure-detail member, its JSON escapes) — each read into the event
  and the session results they stand for;
- malformed, truncated, oversized and random datagrams: each a DatagramError, never an
  exception;
- the receiver on a real UNIX datagram socket: permissions, stale and live sockets, batches,
  counts, rate-limited warnings, a store that refuses; and, when the trixie root can be built
  (root, a Debian mirror), a real Postfix 3.10 delivering through mxguard's policy server
  (with TLS-RPT attributes) to the lab while the receiver records what it reports.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.adapters.store import SessionResult, StoreError, check_result
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.config import load
from mxguard.engine.spool import ResultSpool
from mxguard.lab.lab import Lab
from mxguard.postfix.options import options_from
from mxguard.postfix.server import PolicyServer
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy
from mxguard.tlsrpt import datagram as module
from mxguard.tlsrpt.datagram import (
    MAX_DATAGRAM,
    DatagramError,
    DatagramFailure,
    DatagramReceiver,
    Event,
    ReceiverError,
    collect,
    parse_datagram,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tlsrpt-datagrams"
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
T = TypeVar("T")

STS_LINES = ("version: STSv1", "mode: enforce", "mx: *.sts-enforce.test", "max_age: 86400")
STS_RUA = ("mailto:tlsrpt@sts-enforce.test",)


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.dgram").read_bytes()


def event(data: bytes) -> Event:
    parsed = parse_datagram(data)
    assert isinstance(parsed, Event), parsed
    return parsed


def error(data: bytes) -> DatagramError:
    parsed = parse_datagram(data)
    assert isinstance(parsed, DatagramError), parsed
    return parsed


# --- a writer that builds datagrams the way libtlsrpt does ----------------------------------


def escape(value: bytes) -> bytes:
    """libtlsrpt's JSON escaping: short escapes for \\b \\t \\n \\f \\r, \\uXXXX for the other
    control characters and DEL, backslash and quote escaped, bytes from 0x80 up copied."""
    short = {8: b"\\b", 9: b"\\t", 10: b"\\n", 12: b"\\f", 13: b"\\r", 34: b'\\"', 92: b"\\\\"}
    out = b""
    for c in value:
        if c in short:
            out += short[c]
        elif c < 32 or c == 127:
            out += b"\\u%04x" % c
        else:
            out += bytes([c])
    return out


def attr(name: str, value: str | bytes, *, first: bool = False) -> bytes:
    """`"name": "value"`: libtlsrpt puts a space after the colon of text members only."""
    raw = value.encode() if isinstance(value, str) else value
    return (b"" if first else b",") + f'"{name}": "'.encode() + escape(raw) + b'"'


def strings(values: Sequence[str | bytes]) -> bytes:
    return b",".join(b'"' + escape(v.encode() if isinstance(v, str) else v) + b'"' for v in values)


@dataclass
class Fail:
    code: int
    s: str | bytes | None = None
    n: str | bytes | None = None
    h: str | bytes | None = None
    r: str | bytes | None = None
    a: str | bytes | None = None
    f: str | bytes | None = None

    def build(self) -> bytes:
        out = b'{"c":%d' % self.code
        for key in "snhraf":
            value = getattr(self, key)
            if value is not None:
                out += attr(key, value)
        return out + b"}"


def policy(
    *,
    policy_type: int = 2,
    policy_domain: str | None = "example.com",
    policy_strings: Sequence[str | bytes] = (),
    mx: Sequence[str | bytes] = (),
    failures: Sequence[Fail] = (),
) -> bytes:
    """One `policies` entry, member by member as libtlsrpt writes it."""
    out = b"{" + b'"policy-type":%d' % policy_type
    if policy_domain is not None:
        out += attr("policy-domain", policy_domain)
    if policy_strings:
        out += b',"policy-string":[' + strings(policy_strings) + b"]"
    if mx:
        out += b',"mx-host":[' + strings(mx) + b"]"
    if failures:
        out += b',"failure-details":[' + b",".join(f.build() for f in failures) + b"]"
    return out + b',"t":%d,"f":%d}' % (len(failures), 1 if failures else 0)


def build(
    *,
    domain: str | bytes = "example.com",
    record: str = "v=TLSRPTv1; rua=mailto:tlsrpt@example.com",
    dpv: bool = True,
    policies: Sequence[bytes] = (),
    **one: Any,
) -> bytes:
    """One datagram: `policies`, or the one policy that `one` describes (see `policy`)."""
    out = b"{"
    if dpv:
        out += attr("dpv", "1", first=True) + attr("d", domain)
    else:
        out += attr("d", domain, first=True)
    out += attr("pr", record)
    return out + b',"policies":[' + b",".join(policies or [policy(**one)]) + b"]}"


# --- the real datagrams of Postfix 3.10 --------------------------------------------------------


def test_a_successful_sts_session_names_the_policy_but_no_mx_host() -> None:
    e = event(fixture("sts-enforce-success"))
    assert e.version is None  # libtlsrpt 0.5.0rc1 sends no dpv
    assert (e.domain, e.rua) == ("sts-enforce.test", STS_RUA)
    (p,) = e.policies
    assert p.policy_type is PolicyType.STS
    assert (p.policy_domain, p.policy_strings) == ("sts-enforce.test", STS_LINES)
    assert p.mx_patterns == ("*.sts-enforce.test",) and not p.failed
    (r,) = e.results(NOW)
    assert r.policy == ReportedPolicy(PolicyType.STS, STS_LINES, ("*.sts-enforce.test",), STS_RUA)
    assert (r.policy_domain, r.at, r.result_type, r.is_report) == (
        "sts-enforce.test", NOW, None, False)  # fmt: skip
    # A success carries no failure details: Postfix does not say which MX host it reached.
    assert (r.receiving_mx, r.receiving_ip, r.sending_ip, r.receiving_helo) == (None,) * 4


@pytest.mark.parametrize(
    ("name", "result_type", "mx", "ip"),
    [
        ("sts-enforce-starttls-not-supported-mx1", ResultType.STARTTLS_NOT_SUPPORTED,
         "mx1.sts-enforce.test", "127.85.1.4"),
        ("sts-enforce-starttls-not-supported-mx2", ResultType.STARTTLS_NOT_SUPPORTED,
         "mx2.sts-enforce.test", "127.85.1.5"),
        ("sts-enforce-host-mismatch-mx1", ResultType.CERTIFICATE_HOST_MISMATCH,
         "mx1.sts-enforce.test", "127.85.1.4"),
        ("sts-enforce-host-mismatch-mx2", ResultType.CERTIFICATE_HOST_MISMATCH,
         "mx2.sts-enforce.test", "127.85.1.5"),
    ],
)  # fmt: skip
def test_a_failed_session_names_the_mx_host_and_what_failed(
    name: str, result_type: ResultType, mx: str, ip: str
) -> None:
    e = event(fixture(name))
    (p,) = e.policies
    (f,) = p.failures
    assert (f.result_type, f.receiving_mx, f.receiving_ip, f.sending_ip) == (
        result_type, mx, ip, "127.85.200.1")  # fmt: skip
    # Postfix passes the whole EHLO reply; the result keeps the announced name, like ours.
    assert f.receiving_ehlo is not None and f.receiving_ehlo.startswith(f"250-{mx} at your")
    assert "\r\n250-PIPELINING\r\n" in f.receiving_ehlo
    (r,) = e.results(NOW)
    assert (r.result_type, r.receiving_mx, r.receiving_ip, r.receiving_helo) == (
        result_type, mx, ip, mx)  # fmt: skip
    assert r.policy.policy_strings == STS_LINES and r.detail == "Postfix TLSRPT"


def test_sts_testing_success() -> None:
    (r,) = event(fixture("sts-testing-success")).results(NOW)
    assert r.policy.policy_strings[1] == "mode: testing" and r.result_type is None


def test_a_dane_session_is_tlsa_with_mxguards_spelling_of_the_records() -> None:
    e = event(fixture("tlsa-success"))
    (p,) = e.policies
    assert p.policy_type is PolicyType.TLSA
    # Postfix names the TLSA base domain (the MX host), and writes the hex in upper case.
    assert p.policy_domain == "mx.dane-ee.test"
    assert b"808743BC798C" in fixture("tlsa-success")
    assert p.policy_strings == (
        "3 1 1 808743bc798c1d8ea0e85416dbf156a4a4daad91bf9fb83b4e077602dcd0a8c1",
    )
    (r,) = e.results(NOW)
    assert (r.policy_domain, r.policy.policy_type, r.policy.mx_patterns) == (
        "dane-ee.test", PolicyType.TLSA, ())  # fmt: skip


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.dgram")))
def test_every_truncation_of_a_real_datagram_is_an_error(name: str) -> None:
    data = fixture(name)
    for end in range(len(data)):
        assert isinstance(parse_datagram(data[:end]), DatagramError), data[:end]


# --- datagrams as libtlsrpt builds them ----------------------------------------------------------


def test_version_1_with_every_failure_member() -> None:
    data = build(
        policy_strings=("version: STSv1", "mode: enforce", "mx: mx.example.com", "max_age: 60"),
        mx=("mx.example.com",),
        failures=[Fail(203, s="2001:DB8::1", n="MX.Example.COM", h="250 mx.example.com hi",
                       r="2001:db8:0:0::25", a="chain ends in an unknown root",
                       f="X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT")],
    )  # fmt: skip
    assert data.startswith(b'{"dpv": "1","d": "example.com","pr": "v=TLSRPTv1;')
    e = event(data)
    assert e.version == "1"
    (f,) = e.policies[0].failures
    assert f == DatagramFailure(
        ResultType.CERTIFICATE_NOT_TRUSTED,
        sending_ip="2001:db8::1",
        receiving_mx="mx.example.com",
        receiving_ehlo="250 mx.example.com hi",
        receiving_ip="2001:db8::25",
        additional_information="chain ends in an unknown root",
        failure_reason_code="X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT",
    )
    (r,) = e.results(NOW)
    assert r.detail == (
        "Postfix TLSRPT; failure reason: X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT; "
        "chain ends in an unknown root"
    )
    assert (r.sending_ip, r.receiving_helo) == ("2001:db8::1", "mx.example.com")


@pytest.mark.parametrize(("code", "result_type"), sorted(module.RESULT_TYPES.items()))
def test_every_libtlsrpt_failure_code(code: int, result_type: ResultType) -> None:
    (r,) = event(build(failures=[Fail(code, n="mx.example.com")])).results(NOW)
    assert r.result_type is result_type and r.result_text == result_type.value


def test_a_dane_certificate_no_tlsa_record_matches_is_a_validation_failure() -> None:
    # Postfix 3.10 reports it as certificate-not-trusted (203); mxguard's sender and the log
    # collector call the same session validation-failure, and a report must count it once.
    tlsa = policy(
        policy_type=1,
        policy_domain="mx.example.com",
        policy_strings=["3 1 1 AB"],
        failures=[Fail(203, n="mx.example.com", s="192.0.2.1", r="192.0.2.25")],
    )
    sts = policy(failures=[Fail(203, n="mx.example.com")])  # fmt: skip
    dane, pkix = event(build(policies=[tlsa, sts])).results(NOW)
    assert dane.result_type is ResultType.VALIDATION_FAILURE
    assert dane.detail == "Postfix TLSRPT; Postfix reported certificate-not-trusted"
    assert (dane.receiving_mx, dane.receiving_ip) == ("mx.example.com", "192.0.2.25")
    assert pkix.result_type is ResultType.CERTIFICATE_NOT_TRUSTED  # under sts: as reported


@pytest.mark.parametrize("name", ["success", "starttls-not-supported-mx1"])
def test_without_the_policy_maps_attributes_postfix_reports_no_policy_found(name: str) -> None:
    # mxguard answered `secure match=…` without policy_type=sts: Postfix enforces it but
    # cannot name the policy.
    (r,) = event(fixture(f"no-attributes-sts-enforce-{name}")).results(NOW)
    assert r.policy == ReportedPolicy(PolicyType.NO_POLICY_FOUND, rua=STS_RUA)
    if name == "success":
        assert r.result_type is None and r.receiving_mx is None
    else:
        assert (r.result_type, r.receiving_mx) == (
            ResultType.STARTTLS_NOT_SUPPORTED, "mx1.sts-enforce.test")  # fmt: skip


def test_no_policy_found_has_no_policy_strings_and_an_unknown_own_address() -> None:
    # Postfix before 3.10.x sent no policy-domain with no-policy-found; it sends "" as its own
    # address when getsockname() failed.
    data = build(policy_type=9, policy_domain=None, failures=[Fail(201, s="", n="mx.example.com")])
    (r,) = event(data).results(NOW)
    rua = ("mailto:tlsrpt@example.com",)
    assert r.policy == ReportedPolicy(PolicyType.NO_POLICY_FOUND, rua=rua)
    assert (r.result_type, r.sending_ip) == (ResultType.STARTTLS_NOT_SUPPORTED, None)


def test_several_policies_and_failures() -> None:
    data = build(
        policies=[
            policy(policy_type=1, policy_domain="mx1.example.com",
                   policy_strings=["3 1 1 ABCD"],
                   failures=[Fail(202, n="mx1.example.com"), Fail(204, n="mx1.example.com")]),
            policy(failures=[Fail(202, n="mx1.example.com")]),
        ]
    )  # fmt: skip
    e = event(data)
    assert e.policies[0].policy_strings == ("3 1 1 abcd",)
    assert [p.policy_type for p in e.policies] == [PolicyType.TLSA, PolicyType.STS]
    results = e.results(NOW)
    assert [r.result_type for r in results] == [ResultType.CERTIFICATE_HOST_MISMATCH] * 2
    assert results[0].detail == "Postfix TLSRPT; also reported: certificate-expired"


def test_escapes_and_raw_bytes_in_texts() -> None:
    ehlo = b'250-mx.example.com \xff\xfe caf\xc3\xa9 \x7f\x01\r\n250 "8BITMIME" \\'
    e = event(build(failures=[Fail(201, n="mx.example.com", h=ehlo, a="a\tb\x00c")]))
    (f,) = e.policies[0].failures
    # Valid UTF-8 stays, undecodable bytes and NUL become escapes the store can keep.
    assert f.receiving_ehlo == '250-mx.example.com \\xff\\xfe café \x7f\x01\r\n250 "8BITMIME" \\'
    assert f.additional_information == "a\tb\\x00c"
    (r,) = e.results(NOW)
    assert r.receiving_helo == "mx.example.com"


def test_an_internationalised_domain_is_stored_as_a_labels() -> None:
    e = event(build(domain="bücher.example".encode(), failures=[Fail(201, n="MX.bücher.example")]))
    assert e.domain == "xn--bcher-kva.example"
    assert e.policies[0].failures[0].receiving_mx == "mx.xn--bcher-kva.example"


def test_unknown_members_are_ignored_and_a_record_without_rua_keeps_the_session() -> None:
    data = build(record="v=TLSRPTv1; ruf=nothing").replace(b'"t":0', b'"x-new":[1,{}],"t":0')
    e = event(data.replace(b"{", b'{"later": {"a": null},', 1))
    assert e.rua == () and e.policy_record == "v=TLSRPTv1; ruf=nothing"
    assert len(e.results(NOW)) == 1


# --- malformed -----------------------------------------------------------------------------------


GOOD = build(failures=[Fail(201, s="192.0.2.1", n="mx.example.com", r="192.0.2.25")])

MALFORMED: dict[str, tuple[bytes, str, str]] = {
    "empty": (b"", "empty", "empty"),
    "white space": (b" \n", "empty", "empty"),
    "too large": (b" " * (MAX_DATAGRAM + 1), "too-large", "65537 bytes"),
    "not JSON": (b"hello", "not-json", "not a JSON text"),
    "trailing garbage": (GOOD + b"x", "not-json", "not a JSON text"),
    "two objects": (GOOD + GOOD, "not-json", "not a JSON text"),
    "an array": (b"[]", "invalid", "array, not an object"),
    "nested deeply": (b"[" * 60000, "not-json", "not a JSON text"),
    "NaN": (GOOD.replace(b'"t":1', b'"t":NaN'), "not-json", "NaN is not a JSON number"),
    "a duplicate member": (GOOD.replace(b'"t":1', b'"t":1,"t":1'), "invalid", "appears twice"),
    "version 2": (GOOD.replace(b'"dpv": "1"', b'"dpv": "2"'), "version", "version '2'"),
    "version as a number": (GOOD.replace(b'"dpv": "1"', b'"dpv": 1'), "version", "version 1;"),
    "no domain": (GOOD.replace(b'"d": "example.com",', b""), "invalid", "has no d"),
    "null domain": (GOOD.replace(b'"d": "example.com"', b'"d": null'), "invalid", "d is null"),
    "a number for the domain": (GOOD.replace(b'"d": "example.com"', b'"d": 7'), "invalid",
                                "d is a JSON number, not a string"),
    "an invalid domain": (build(domain="a..b"), "invalid", "is not a host name"),
    "a domain with a raw 0xff": (build(domain=b"ex\xffample.com"), "invalid", "not UTF-8"),
    "no record": (GOOD.replace(b'"pr": "v=TLSRPTv1; rua=mailto:tlsrpt@example.com",', b""),
                  "invalid", "has no pr"),
    "no policies": (b'{"d": "example.com","pr": "v=TLSRPTv1; rua=mailto:a@b.c"}', "invalid",
                    "has no policies"),
    "no policy": (b'{"d": "example.com","pr": "","policies":[]}', "invalid", "policies is empty"),
    "a policy that is a string": (b'{"d": "e.com","pr": "","policies":["x"]}', "invalid",
                                  "policies[0] is a JSON string"),
    "policy type 3": (GOOD.replace(b'"policy-type":2', b'"policy-type":3'), "invalid",
                      "policy-type 3 is none of"),
    "policy type true": (GOOD.replace(b'"policy-type":2', b'"policy-type":true'), "invalid",
                         "boolean, not an integer"),
    "policy type 2.0": (GOOD.replace(b'"policy-type":2', b'"policy-type":2.0'), "invalid",
                        "number, not an integer"),
    "an invalid policy domain": (build(policy_domain="-x-"), "invalid", "policy-domain"),
    "a policy string that is a number": (
        GOOD.replace(b'"t":1', b'"policy-string":[1],"t":1'), "invalid",
        "policy-string[0] is a JSON number"),
    "mx-host an object": (GOOD.replace(b'"t":1', b'"mx-host":{},"t":1'), "invalid",
                          "mx-host is a JSON object, not an array"),
    "a failure count that does not match": (GOOD.replace(b'"t":1', b'"t":2'), "invalid",
                                            "t says 2 failure(s), failure-details has 1"),
    "no failure count": (GOOD.replace(b'"t":1,', b""), "invalid", "has no t"),
    "final result 2": (GOOD.replace(b'"f":1}', b'"f":2}'), "invalid", "f 2 is neither"),
    "a failure reported as success": (GOOD.replace(b'"f":1}', b'"f":0}'), "invalid",
                                      "f 0 contradicts its 1 failure detail(s)"),
    "a failure without details": (build().replace(b'"f":0}', b'"f":1}'), "invalid",
                                  "f 1 contradicts its 0"),
    "an unknown failure code": (build(failures=[Fail(999)]), "invalid",
                                "c 999 is no TLS-RPT result type"),
    "the internal code 901": (build(failures=[Fail(901)]), "invalid", "c 901"),
    "no failure code": (GOOD.replace(b'"c":201,', b""), "invalid", "has no c"),
    "a sending address that is none": (build(failures=[Fail(201, s="localhost")]), "invalid",
                                       ".s 'localhost' is not an IP address"),
    "a receiving address that is none": (build(failures=[Fail(201, r="1.2.3")]), "invalid",
                                         ".r '1.2.3' is not an IP address"),
    "an invalid MX host": (build(failures=[Fail(201, n="mx..example")]), "invalid",
                           ".n 'mx..example' is not a host name"),
    "a detail that is a number": (GOOD.replace(b'"c":201', b'"c":201,"a":5'), "invalid",
                                  ".a is a JSON number"),
    "too many policies": (
        GOOD.replace(b'"policies":[', b'"policies":[' + b"{}," * 16), "limit", "17 policies"),
    "too many MX patterns": (build(mx=["mx.example.com"] * 1001), "limit",
                             "mx-host has 1001 entries"),
    "an over-long text": (build(failures=[Fail(201, a="x" * 8193)]), "limit",
                          ".a has 8193 characters"),
    "an over-long policy string": (build(policy_strings=["y" * 8193]), "limit",
                                   "policy-string[0] has 8193 characters"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_datagrams_are_errors_saying_why(name: str) -> None:
    data, kind, reason = MALFORMED[name]
    assert isinstance(parse_datagram(GOOD), Event)
    e = error(data)
    assert e.kind == kind, e
    assert reason in e.reason, e


@given(st.binary(max_size=2000))
def test_any_bytes_are_an_event_or_an_error(data: bytes) -> None:
    assert isinstance(parse_datagram(data), Event | DatagramError)


@given(st.data())
def test_damaged_real_datagrams_are_an_event_or_an_error(data: st.DataObject) -> None:
    original = bytearray(fixture("sts-enforce-starttls-not-supported-mx1"))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(original) - 1))
        original[i] = data.draw(st.integers(0, 255))
    parsed = parse_datagram(bytes(original))
    assert isinstance(parsed, Event | DatagramError)
    if isinstance(parsed, Event):
        for r in parsed.results(NOW):
            check_result(r)  # whatever is read, the store can keep


@given(
    ehlo=st.binary(max_size=200),
    info=st.binary(max_size=100),
    reason=st.binary(max_size=50),
    lines=st.lists(st.binary(max_size=60), max_size=5),
    record=st.binary(max_size=80),
)
def test_any_bytes_in_the_texts_of_a_well_formed_datagram_are_kept_storably(
    ehlo: bytes, info: bytes, reason: bytes, lines: list[bytes], record: bytes
) -> None:
    data = build(
        record=record.decode("latin-1"),  # any code points below 256
        policy_strings=lines,
        mx=lines,
        failures=[Fail(205, n="mx.example.com", h=ehlo, a=info, f=reason)],
    )
    (r,) = event(data).results(NOW)
    check_result(r)
    assert r.result_type is ResultType.VALIDATION_FAILURE and len(r.policy.policy_strings) == len(
        lines
    )


MEMBERS = ["d", "pr", "dpv", "policies", "policy-type", "policy-domain", "policy-string",
           "mx-host", "failure-details", "t", "f", "c", "s", "n", "h", "r", "a"]  # fmt: skip


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(MEMBERS), inner, max_size=6)
        ),
        max_leaves=30,
    )
)
def test_any_json_is_an_event_or_an_error(value: Any) -> None:
    parsed = parse_datagram(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    assert isinstance(parsed, Event | DatagramError)
    if isinstance(parsed, Event):
        for r in parsed.results(NOW):
            check_result(r)


# --- the receiver ---------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def stored(store: SQLiteStore) -> list[SessionResult]:
    far = dt.timedelta(days=3650)
    return await store.results_between(NOW - far, NOW + far, unreported_only=False)


def send(path: Path, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, str(path))


async def settle(receiver: DatagramReceiver, datagrams: int) -> None:
    deadline = time.monotonic() + 10
    while receiver.counts.datagrams < datagrams:
        assert time.monotonic() < deadline, receiver.counts
        await asyncio.sleep(0.01)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A folder whose socket paths fit in sun_path (pytest's tmp_path can be too long)."""
    folder = Path(tempfile.mkdtemp(prefix="mxg-dg-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_receiver_records_what_arrives_in_batches(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "tlsrpt.sock"

    async def go() -> tuple[list[SessionResult], module.Counts, int]:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            receiver = DatagramReceiver(path, store, batch_size=2, flush_interval=30,
                                        clock=lambda: NOW)  # fmt: skip
            async with receiver:
                mode = stat.S_IMODE(os.stat(path).st_mode)
                send(path, fixture("sts-enforce-success"), b"junk",
                     fixture("sts-enforce-starttls-not-supported-mx1"),
                     fixture("tlsa-success"))  # fmt: skip
                await settle(receiver, 4)
                # Two made a batch at once; the third waits for the next (or the stop).
                deadline = time.monotonic() + 10
                while receiver.counts.written < 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                assert receiver.counts.written == 2
            assert not path.exists()  # removed on stop
            return await stored(store), receiver.counts, mode
        finally:
            await store.close()

    results, counts, mode = run(go())
    assert mode == 0o660
    assert [(r.policy.policy_type, r.result_text) for r in results] == [
        (PolicyType.STS, None),
        (PolicyType.STS, "starttls-not-supported"),
        (PolicyType.TLSA, None),
    ]
    assert counts.to_json() == {
        "datagrams": 4, "events": 3, "results": {"starttls-not-supported": 1, "success": 2},
        "malformed": {"not-json": 1}, "dropped": 0, "written": 3, "batches": 2,
    }  # fmt: skip


def test_results_are_written_after_the_flush_interval(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "t.sock"

    async def go() -> float:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            async with DatagramReceiver(path, store, flush_interval=0.2) as receiver:
                start = time.monotonic()
                send(path, fixture("sts-enforce-success"))
                while not await stored(store):
                    assert time.monotonic() - start < 10
                    await asyncio.sleep(0.02)
                assert receiver.counts.batches == 1
                return time.monotonic() - start
        finally:
            await store.close()

    assert run(go()) >= 0.15


def test_socket_permissions_for_postfix(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "sub" / "tlsrpt.sock"  # the folder is made
    gid = os.getgid() if os.geteuid() != 0 else 12345

    async def go() -> os.stat_result:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            async with DatagramReceiver(path, store, mode=0o620, group=gid):
                return os.stat(path)
        finally:
            await store.close()

    st_ = run(go())
    assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o620
    assert st_.st_gid == gid


def test_an_unknown_group_is_an_error(sock_dir: Path, tmp_path: Path) -> None:
    async def go() -> None:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            async with DatagramReceiver(sock_dir / "t.sock", store, group="no-such-group-x"):
                pass
        finally:
            await store.close()

    with pytest.raises(ReceiverError, match="no group named 'no-such-group-x'"):
        run(go())


def test_a_stale_socket_is_replaced_a_live_one_or_a_file_is_not(
    sock_dir: Path, tmp_path: Path
) -> None:
    folder = sock_dir
    stale = folder / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(stale))  # closed without removing it: nobody receives there
    live = folder / "live.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(str(live))
    plain = folder / "file"
    plain.write_text("keep me")

    async def open_on(path: Path) -> None:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            async with DatagramReceiver(path, store):
                send(path, fixture("tlsa-success"))
        finally:
            await store.close()

    try:
        run(open_on(stale))
        with pytest.raises(ReceiverError, match="another process is receiving"):
            run(open_on(live))
        with pytest.raises(ReceiverError, match="exists and is not a socket"):
            run(open_on(plain))
        assert plain.read_text() == "keep me" and live.exists()
    finally:
        other.close()


def test_collect_runs_until_stopped_and_writes_what_is_pending(
    sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "t.sock"

    async def go() -> tuple[module.Counts, list[SessionResult]]:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            stop = asyncio.Event()

            def ready(receiver: DatagramReceiver) -> None:
                send(path, fixture("sts-enforce-success"), fixture("sts-testing-success"))

                async def later() -> None:
                    await settle(receiver, 2)
                    stop.set()

                asyncio.get_running_loop().create_task(later())

            counts = await collect(path, store, stop=stop, ready=ready, flush_interval=60)
            return counts, await stored(store)
        finally:
            await store.close()

    counts, results = run(go())
    assert (counts.events, counts.written, len(results)) == (2, 2, 2)


def test_collect_cancelled_still_writes_what_is_pending(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "t.sock"

    async def go() -> list[SessionResult]:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            got: list[DatagramReceiver] = []
            started = asyncio.Event()

            def ready(receiver: DatagramReceiver) -> None:
                got.append(receiver)
                started.set()

            task = asyncio.create_task(collect(path, store, ready=ready, flush_interval=60))
            await started.wait()
            send(path, fixture("sts-enforce-success"))
            await settle(got[0], 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not path.exists()
            return await stored(store)
        finally:
            await store.close()

    assert len(run(go())) == 1


def test_malformed_datagrams_are_counted_and_logged_at_most_once_a_minute(
    sock_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]

    async def go() -> module.Counts:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            receiver = DatagramReceiver(sock_dir / "t.sock", store, monotonic=lambda: clock[0])
            for data in (b"", b"[]", b"{", b"{}"):  # not started: fed directly
                receiver.received(data)
            clock[0] += 61
            receiver.received(b"x" * (MAX_DATAGRAM + 1))
            return receiver.counts
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="mxguard.tlsrpt.datagram"):
        counts = run(go())
    assert counts.malformed == {"empty": 1, "invalid": 2, "not-json": 1, "too-large": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0] == "ignored a malformed TLSRPT datagram: an empty datagram"
    assert messages[1].startswith(
        "ignored a malformed TLSRPT datagram (3 more since the last warning): 65537 bytes"
    )


def test_results_beyond_the_backlog_are_dropped_and_counted(sock_dir: Path, tmp_path: Path) -> None:
    async def go() -> module.Counts:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            receiver = DatagramReceiver(sock_dir / "t.sock", store, max_pending=2)
            for _ in range(5):
                receiver.received(fixture("tlsa-success"))
            await receiver.flush()
            assert len(await stored(store)) == 2
            return receiver.counts
        finally:
            await store.close()

    counts = run(go())
    assert (counts.events, counts.dropped, counts.written) == (5, 3, 2)


class RefusingStore(SQLiteStore):
    async def add_results(self, results: Sequence[SessionResult]) -> None:
        raise StoreError("the store is down")


def test_results_the_store_refuses_go_to_the_spool(sock_dir: Path, tmp_path: Path) -> None:
    async def go() -> list[SessionResult]:
        store = await RefusingStore.open(str(tmp_path / "s.db"))
        spool = ResultSpool(tmp_path / "spool")
        try:
            receiver = DatagramReceiver(sock_dir / "t.sock", store, spool=spool)
            receiver.received(fixture("sts-enforce-starttls-not-supported-mx2"))
            await receiver.flush()
            kept = await SQLiteStore.open(str(spool.path))
            try:
                return await stored(kept)
            finally:
                await kept.close()
        finally:
            await store.close()

    (r,) = run(go())
    assert (r.receiving_mx, r.result_text) == ("mx2.sts-enforce.test", "starttls-not-supported")


# --- a real Postfix 3.10 (trixie root) -----------------------------------------------------------

pytest.register_assert_rewrite("postfix310_harness")

from postfix310_harness import (  # noqa: E402
    Postfix310Instance,
    mail_version,
    postfix_gid,
    skip_reason,
    trixie_root,
)


def suite_address(lab: Lab, host: int) -> str:
    """127.<the lab's second octet>.200.<host>: beside the lab's peers, apart from the
    Postfix 3.7 suite's 127.208.N.x."""
    return f"{lab.resolver_address.rsplit('.', 2)[0]}.200.{host}"


class RecordingReceiver(DatagramReceiver):
    """Keeps every datagram as it arrived, besides recording it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: list[bytes] = []

    def received(self, data: bytes) -> None:
        self.raw.append(data)
        super().received(data)


class ReceiverThread:
    """A RecordingReceiver with its own SQLite store, on an event loop of its own thread."""

    def __init__(self, socket_path: Path, db: Path, group: int) -> None:
        self.socket_path, self.db, self.group = socket_path, db, group
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.receiver: RecordingReceiver | None = None
        self.store: SQLiteStore | None = None

    def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)

    def __enter__(self) -> ReceiverThread:
        self.thread.start()

        async def start() -> None:
            self.store = await SQLiteStore.open(str(self.db))
            self.receiver = RecordingReceiver(
                self.socket_path, self.store, group=self.group, flush_interval=0.1
            )
            await self.receiver.start()

        self.call(start)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self.receiver is not None:
                await self.receiver.stop()
            if self.store is not None:
                await self.store.close()

        try:
            self.call(stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def counts(self) -> module.Counts:
        assert self.receiver is not None
        return self.receiver.counts

    def results(self, events: int) -> list[SessionResult]:
        """Once `events` events have arrived (waits), everything stored, in order."""
        deadline = time.monotonic() + 20
        while self.counts.events < events:
            assert time.monotonic() < deadline, (self.counts, self.raw_since(0))
            time.sleep(0.05)

        async def read() -> list[SessionResult]:
            assert self.receiver is not None and self.store is not None
            await self.receiver.flush()
            return await stored(self.store)

        return self.call(read)

    def raw_since(self, n: int) -> list[bytes]:
        assert self.receiver is not None
        return self.receiver.raw[n:]


@dataclass
class Rig:
    postfix: Postfix310Instance
    receiver: ReceiverThread
    version: str


@pytest.fixture(scope="module")
def rig(session_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if session_lab.ports.smtp != 25:
        pytest.skip("Postfix delivers to port 25: the lab must run as root")
    root = trixie_root()
    state = tmp_path_factory.mktemp("postfix310")
    settings = load(session_lab.config_file).with_overrides(store=f"sqlite:///{state / 'p.db'}")
    options = options_from(settings, tlsrpt_attributes=True)
    # Under /tmp with a short name: Postfix's daemons must enter it (pytest's folders are
    # 0700), and the socket's path must fit in sun_path.
    workdir = Path(tempfile.mkdtemp(prefix="mxg-pf310-"))
    socket_path = workdir / "tlsrpt.sock"
    listen = f"inet:{suite_address(session_lab, 2)}:0"
    with (
        PolicyServer(settings, listen=listen, options=options) as server,
        ReceiverThread(socket_path, state / "tlsrpt.db", postfix_gid(root)) as receiver,
    ):
        host, port = server.socketmap_address
        with Postfix310Instance(
            root,
            workdir,
            address=suite_address(session_lab, 1),
            resolver=session_lab.resolver_address,
            ca_file=session_lab.ca_file,
            tlsrpt_socket=socket_path,
            tls_policy_maps=f"socketmap:inet:{host}:{port}:postfix",
        ) as postfix:
            yield Rig(postfix, receiver, mail_version(root))


@pytest.mark.lab
@pytest.mark.slow
def test_postfix_310_reports_an_sts_session_that_the_receiver_records(rig: Rig, lab: Lab) -> None:
    assert rig.version.startswith("3.10.")
    before = rig.receiver.counts.events
    raw_before = len(rig.receiver.raw_since(0))
    stored_before = len(rig.receiver.results(before))
    _, outcome = rig.postfix.deliver("postmaster@sts-enforce.test")
    assert outcome.status == "sent" and outcome.verified, outcome.text()
    results = rig.receiver.results(before + 1)[stored_before:]
    assert len(results) == 1, results
    (r,) = results
    assert r.policy_domain == "sts-enforce.test" and r.result_type is None
    assert r.policy == ReportedPolicy(PolicyType.STS, STS_LINES, ("*.sts-enforce.test",), STS_RUA)
    # What Postfix sent is exactly the datagram kept in the fixtures.
    assert rig.receiver.raw_since(raw_before) == [fixture("sts-enforce-success")]
    assert not rig.receiver.counts.malformed


@pytest.mark.lab
@pytest.mark.slow
def test_postfix_310_reports_each_stripped_session_with_its_mx_host(rig: Rig, lab: Lab) -> None:
    hosts = [h.name for h in lab.scenario.domain("sts-enforce.test").hosts]
    for host in hosts:
        lab.set_attack(host, "strip")
    before = rig.receiver.counts.events
    stored_before = len(rig.receiver.results(before))
    _, outcome = rig.postfix.deliver("postmaster@sts-enforce.test")
    assert outcome.status == "deferred", outcome.text()
    results = rig.receiver.results(before + len(hosts))[stored_before:]
    assert sorted((r.receiving_mx, r.receiving_ip, r.result_text) for r in results) == sorted(
        (h, lab.address_of(h), "starttls-not-supported") for h in hosts
    )
    assert {(r.sending_ip, r.policy.policy_type) for r in results} == {
        (rig.postfix.address, PolicyType.STS)
    }
    assert {r.receiving_helo for r in results} == set(hosts)
