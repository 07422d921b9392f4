"""What ``mxguard check`` makes of what it saw, as specifications: one row per rule, no network.

``analysis.judge_address`` applies the sender's own certificate check to a probe that already
happened, and ``analysis.analyse`` turns ``Observations`` into findings and a verdict; both are
pure, so the probes and lookups are written down here and the certificates are made here (a
test CA, leaves for the MX host names, an expired one, one for another name, a self-signed one,
one with a critical extension nobody knows). The lab test (tests/test_check_lab.py) checks the
same verdicts against real peers.

The rows: first what a compliant sender does at one address (policy × probe), then one row per
verdict rule and per finding code, then properties every row must have (codes from the
catalogue, a ``sender`` and a ``fix``, ``broken`` exactly when some finding breaks), and the
catalogue against docs/check.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from mxguard.adapters.dns import DnssecStatus
from mxguard.adapters.https import FetchResult
from mxguard.adapters.smtp import TlsInfo
from mxguard.audit import history
from mxguard.audit.analysis import CODES, EXPIRY_WARNING_DAYS, SHORT_MAX_AGE, analyse, judge_address
from mxguard.audit.model import (
    AddressCheck,
    DomainCheck,
    Finding,
    HostCheck,
    MxLookupView,
    Observations,
    Protection,
    RuaCheck,
    Severity,
    SmtpProbe,
    TxtLookup,
    Verdict,
)
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
from mxguard.protocol import mtasts
from mxguard.protocol.dane import Tlsa, association_data
from mxguard.protocol.pkix import der
from mxguard.protocol.results import Failure, ResultType

D = "example.test"
MX1, MX2 = "mx1.example.test", "mx2.example.test"
ADDRESS = {MX1: "192.0.2.1", MX2: "192.0.2.2", D: "192.0.2.10"}
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
STS_ID = "20260501T000000"
RPT = f"v=TLSRPTv1; rua=mailto:tlsrpt@{D}"
RUA_OK = RuaCheck(f"mailto:tlsrpt@{D}", True, "mx1.example.test [192.0.2.1] accepts RCPT TO")
POLICY_URL = f"https://mta-sts.{D}/.well-known/mta-sts.txt"

SNS = ResultType.STARTTLS_NOT_SUPPORTED
VF = ResultType.VALIDATION_FAILURE
EXPIRED = ResultType.CERTIFICATE_EXPIRED
MISMATCH = ResultType.CERTIFICATE_HOST_MISMATCH
UNTRUSTED = ResultType.CERTIFICATE_NOT_TRUSTED
FETCH_ERROR = ResultType.STS_POLICY_FETCH_ERROR

# --- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mxguard tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def issue(
    cn: str,
    *,
    issuer: Issued | None,
    names: tuple[str, ...] = (),
    begin: dt.datetime = NOW - 30 * DAY,
    end: dt.datetime = NOW + 365 * DAY,
    ca: bool = False,
    unknown_critical: bool = False,
) -> Issued:
    """A certificate for ``names`` (SAN dNSNames) signed by ``issuer`` (self-signed: None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if unknown_critical:
        # OpenSSL refuses a certificate with a critical extension it does not know
        # (X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION): neither expired, nor untrusted, nor for
        # another name, so the plain validation-failure.
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.32473.1"), b"\x05\x00"),
            critical=True,
        )
    return Issued(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


CA = issue(
    "mxguard test root CA", issuer=None, begin=NOW - 365 * DAY, end=NOW + 3650 * DAY, ca=True
)
ROOTS = (CA.cert,)

# What a server presents; "valid", "expired", "wrong-name", "self-signed" are the rows of the
# sender's check, the others serve single findings.
CERT_KINDS = (
    "valid",
    "expired",
    "wrong-name",
    "self-signed",
    "invalid",
    "expiring-10d",
    "expiring-30d",
)


def leaf(kind: str, host: str = MX1) -> x509.Certificate:
    """The leaf certificate of ``kind`` for ``host``, the same object on every call."""
    return _leaf(kind, host)


@functools.cache
def _leaf(kind: str, host: str) -> x509.Certificate:
    if kind == "valid":
        return issue(host, issuer=CA, names=(host,)).cert
    if kind == "expired":
        return issue(host, issuer=CA, names=(host,), begin=NOW - 90 * DAY, end=NOW - 2 * DAY).cert
    if kind == "wrong-name":
        return issue("other.example.net", issuer=CA, names=("other.example.net",)).cert
    if kind == "self-signed":
        return issue(host, issuer=None, names=(host,)).cert
    if kind == "invalid":
        return issue(host, issuer=CA, names=(host,), unknown_critical=True).cert
    if kind == "expiring-10d":
        return issue(host, issuer=CA, names=(host,), end=NOW + 10 * DAY).cert
    if kind == "expiring-30d":
        return issue(host, issuer=CA, names=(host,), end=NOW + 30 * DAY).cert
    raise ValueError(kind)


def tls_info(cert: x509.Certificate, host: str) -> TlsInfo:
    return TlsInfo(host, "TLSv1.3", "TLS_AES_128_GCM_SHA256", ders=(der(cert),))


def ee(cert: x509.Certificate) -> Tlsa:
    """The ``3 1 1`` record of ``cert``'s key (DANE-EE, SPKI, SHA-256)."""
    return Tlsa(3, 1, 1, association_data(cert, 1, 1))


def ee_full_cert(cert: x509.Certificate) -> Tlsa:
    """The ``3 0 1`` record of ``cert`` (DANE-EE, whole certificate, SHA-256)."""
    return Tlsa(3, 0, 1, association_data(cert, 0, 1))


def ta(cert: x509.Certificate) -> Tlsa:
    """The ``2 1 1`` record of a CA's key (DANE-TA, SPKI, SHA-256)."""
    return Tlsa(2, 1, 1, association_data(cert, 1, 1))


# --- probes and MX policies -----------------------------------------------------------------

PROBE_KINDS = (
    "unreachable",
    "no-starttls",
    "starttls-refused",
    "handshake-failed",
    "valid",
    "expired",
    "wrong-name",
    "self-signed",
)


def probe(kind: str, host: str = MX1, address: str | None = None) -> SmtpProbe:
    """One SMTP session to ``host``'s address as the prober records it."""
    ip = address or ADDRESS[host]
    banner = f"220 {host} ESMTP"
    if kind == "unreachable":
        return SmtpProbe(
            ip, host, error=f"cannot connect to {ip} port 25: connection refused",
            error_step="connect",
        )  # fmt: skip
    if kind == "no-starttls":
        return SmtpProbe(ip, host, connected=True, banner=banner, starttls=False)
    if kind == "starttls-refused":
        # The server answers STARTTLS with 454: the session goes on, in plain text.
        return SmtpProbe(
            ip, host, connected=True, banner=banner, starttls=True,
            error="STARTTLS refused: 454 4.7.0 TLS not available due to local problem",
            error_step="STARTTLS", error_result_type=SNS,
        )  # fmt: skip
    if kind == "handshake-failed":
        # The handshake fails: the connection is closed.
        return SmtpProbe(
            ip, host, connected=True, banner=banner, starttls=True,
            error="TLS handshake failed: sslv3 alert handshake failure",
            error_step="STARTTLS", error_result_type=VF,
        )  # fmt: skip
    return SmtpProbe(
        ip, host, connected=True, banner=banner, starttls=True,
        tls=tls_info(leaf(kind, host), host),
    )  # fmt: skip


def presented(p: SmtpProbe) -> x509.Certificate | None:
    return p.tls.chain[0] if p.tls and p.tls.chain else None


POLICY_KINDS = ("enforce", "testing", "none", "dane", "dane-mismatch", "not-allowed", "deferred")


def mx_policy(
    kind: str, host: str = MX1, *, cert: x509.Certificate | None = None, pref: int = 10
) -> MxPolicy:
    """The requirements ``resolve()`` gives an MX host; ``cert``: the one DANE pins."""
    base = MxPolicy(host, pref, addresses=(ADDRESS[host],))
    if kind == "enforce":  # MTA-STS enforce, the host matches a pattern (RFC 8461 §4.2)
        return replace(base, tls=Tls.REQUIRED, auth=Auth.PKIX, source=Source.MTA_STS)
    if kind == "testing":  # MTA-STS testing: checked and reported, never enforced (§5)
        return replace(base, report_only=True, source=Source.MTA_STS)
    if kind == "none":  # no policy: opportunistic STARTTLS
        return base
    if kind in ("dane", "dane-mismatch"):
        pinned = ee(cert or leaf("valid", host))
        record = pinned if kind == "dane" else Tlsa(3, 1, 1, bytes(32))
        return replace(
            base, tls=Tls.REQUIRED, auth=Auth.DANE, tlsa=(record,), tlsa_name=host,
            names=(host,), dnssec=DnssecStatus.SECURE, source=Source.DANE,
        )  # fmt: skip
    if kind == "not-allowed":  # MTA-STS enforce, the host matches no pattern (§4.1)
        return replace(base, allowed=False, source=Source.MTA_STS)
    if kind == "deferred":  # a lookup for the host failed: not used now
        return replace(base, defer=Failure.dns_lookup(f"the A lookup of {host} timed out"))
    raise ValueError(kind)


# --- 1. judge_address: what a compliant sender does at one address -------------------------

NO = (False, None)
YES = (True, None)

# policy -> what a compliant sender does for each probe of PROBE_KINDS: (honest, result type)
#   unreachable, no STARTTLS, STARTTLS refused, handshake failed,
#   valid certificate, expired, for another name, self-signed
SENDER: dict[str, tuple[tuple[bool, ResultType | None], ...]] = {
    "enforce": (NO, (False, SNS), (False, SNS), (False, VF),
                YES, (False, EXPIRED), (False, MISMATCH), (False, UNTRUSTED)),
    # testing: delivers and reports; only a closed connection (failed handshake) stops it.
    "testing": (NO, (True, SNS), (True, SNS), (False, VF),
                YES, (True, EXPIRED), (True, MISMATCH), (True, UNTRUSTED)),
    # no policy: plain text after a refused STARTTLS, nothing checked, nothing reported.
    "none": (NO, YES, YES, NO, YES, YES, YES, YES),
    # DANE-EE pins the key: names and dates do not count (RFC 7672 §3.1.1).
    "dane": (NO, (False, SNS), (False, SNS), (False, VF), YES, YES, YES, YES),
    "dane-mismatch": (NO, (False, SNS), (False, SNS), (False, VF),
                      (False, VF), (False, VF), (False, VF), (False, VF)),
    "not-allowed": (NO,) * 8,
    "deferred": (NO,) * 8,
}  # fmt: skip

CHECKED = {
    "enforce": (Auth.PKIX, True),
    "testing": (Auth.PKIX, False),
    "none": (Auth.NONE, False),
    "dane": (Auth.DANE, True),
    "dane-mismatch": (Auth.DANE, True),
    "not-allowed": (Auth.NONE, False),
    "deferred": (Auth.NONE, False),
}


def _sender_id(policy: str, kind: str, honest: bool, rt: ResultType | None) -> str:
    does = "delivers" if honest else "does_not_deliver"
    reports = f"_reports_{rt.value}" if rt else ""
    return f"{policy}_{kind}_{does}{reports}".replace("-", "_")


SENDER_ROWS = [
    pytest.param(policy, kind, honest, rt, id=_sender_id(policy, kind, honest, rt))
    for policy, outcomes in SENDER.items()
    for kind, (honest, rt) in zip(PROBE_KINDS, outcomes, strict=True)
]


def judged(policy: str, kind: str, host: str = MX1) -> AddressCheck:
    p = probe(kind, host)
    m = mx_policy(policy, host, cert=presented(p))
    return judge_address(m, p, roots=ROOTS, now=NOW)


@pytest.mark.parametrize(("policy", "kind", "honest", "result_type"), SENDER_ROWS)
def test_what_a_compliant_sender_does_at_one_address(
    policy: str, kind: str, honest: bool, result_type: ResultType | None
) -> None:
    a = judged(policy, kind)
    assert (a.honest, a.result_type) == (honest, result_type), a.outcome
    assert a.outcome.strip() and "None" not in a.outcome, a.outcome
    assert a.address == ADDRESS[MX1] and a.probe.address == a.address
    if a.probe.tls is None:
        assert (a.auth, a.webpki, a.certificates) == (None, None, ())
        return
    # TLS came up: the sender's check ran under the host's policy, and the WebPKI verdict
    # for the MX host name is there whatever the policy.
    assert a.auth is not None and a.webpki is not None
    assert (a.auth.checked, a.auth.enforced) == CHECKED[policy]
    assert a.webpki.ok is (kind == "valid")
    (summary,) = a.certificates
    assert summary.sha256 == hashlib.sha256(a.probe.tls.ders[0]).hexdigest()


def test_every_policy_and_probe_has_a_row() -> None:
    assert set(SENDER) == set(POLICY_KINDS)
    assert len(SENDER_ROWS) == len(POLICY_KINDS) * len(PROBE_KINDS)


def test_testing_mode_names_what_it_would_refuse() -> None:
    a = judged("testing", "expired")
    assert a.honest and "testing" in a.outcome
    b = judged("enforce", "expired")
    assert not b.honest and "refuses" in b.outcome


def test_dane_outcome_names_the_method() -> None:
    assert "dane-ee" in judged("dane", "valid").outcome
    assert "WebPKI" in judged("enforce", "valid").outcome


# --- 2. analyse: one row per verdict rule and per finding code -----------------------------


def host(
    policy: str = "none",
    kind: str = "valid",
    name: str = MX1,
    *,
    covered: bool | str | None = "auto",
    tlsa_insecure: tuple[str, ...] = (),
    pref: int = 10,
    **changes: Any,
) -> HostCheck:
    """One MX host as a check saw it: its policy (``changes`` on top), one probed address."""
    p = probe(kind, name) if kind in PROBE_KINDS else probe_with(kind, name)
    m = replace(mx_policy(policy, name, cert=presented(p), pref=pref), **changes)
    if covered == "auto":
        covered = {"enforce": True, "testing": True, "not-allowed": False}.get(policy)
    assert covered is None or isinstance(covered, bool)
    addresses = tuple(
        judge_address(m, replace(p, address=ip), roots=ROOTS, now=NOW) for ip in m.addresses
    )
    return HostCheck(m, covered, addresses, tlsa_insecure)


def probe_with(kind: str, name: str) -> SmtpProbe:
    """A TLS probe presenting the certificate ``kind`` (one of CERT_KINDS)."""
    assert kind in CERT_KINDS, kind
    return replace(probe("valid", name), tls=tls_info(leaf(kind, name), name))


def ok_fetch(body: str, certificate: bytes | None = None) -> FetchResult:
    return FetchResult(
        True, body, None, f"fetched {len(body)} bytes from {POLICY_URL}", 200, "text/plain",
        0.05, certificate,
    )  # fmt: skip


def failed_fetch(
    detail: str,
    status: int | None,
    content_type: str | None = None,
    result_type: ResultType = FETCH_ERROR,
) -> FetchResult:
    return FetchResult(False, None, result_type, detail, status, content_type, 0.05)


def observe(
    *hosts: HostCheck,
    kind: str = "hosts",
    dnssec: str = "insecure",
    sts: str | None = None,
    patterns: tuple[str, ...] | None = None,
    max_age: int = 2592000,
    body: str | None = None,
    fetch: FetchResult | None = None,
    invalid: str | None = None,
    record: tuple[str, ...] | None = None,
    record_outcome: str | None = None,
    dane: bool = False,
    mx_secure: bool = False,
    tlsrpt: tuple[str, ...] = (RPT,),
    tlsrpt_outcome: str | None = None,
    rua: tuple[RuaCheck, ...] | None = None,
) -> Observations:
    """What one check of ``example.test`` saw.

    ``sts``: the mode of the policy fetched (None: none fetched); ``fetch``: a failed fetch
    instead, or a successful one with other details; ``invalid``: the fetched body is invalid,
    for this reason. ``patterns`` default to the hosts' names, the body to the policy's
    canonical text (CRLF).
    """
    mode = Mode(sts) if sts else None
    state: StsState | None = None
    text: str | None = None
    if mode is not None:
        patterns = tuple(h.host for h in hosts) if patterns is None else patterns
        policy = mtasts.Policy("STSv1", mode, max_age, patterns)
        text = policy.to_text() if body is None else body
        fetch = fetch or ok_fetch(text)
        state = StsState(
            STS_ID, mode, max_age, patterns, tuple(policy.policy_strings()), NOW,
            NOW + dt.timedelta(seconds=max_age), False, None,
        )  # fmt: skip
    elif invalid is not None:
        text = body or "version: STSv1\r\nmode: sometimes\r\n"
        fetch = ok_fetch(text)
        failure = Failure(ResultType.STS_POLICY_INVALID, invalid)
        state = StsState(None, None, None, (), (), None, None, False, failure)
    elif fetch is not None:
        failure = Failure(fetch.result_type or FETCH_ERROR, fetch.detail)
        state = StsState(None, None, None, (), (), None, None, False, failure)
    if record is None:
        record = (f"v=STSv1; id={STS_ID};",) if state is not None else ()
    source, domain_mode = Source.NONE, Mode.NONE
    if dane:
        source, domain_mode = Source.DANE, Mode.ENFORCE
    elif mode in (Mode.ENFORCE, Mode.TESTING):
        assert mode is not None
        source, domain_mode = Source.MTA_STS, mode
    status = {"hosts": Status.OK, "implicit": Status.OK, "null": Status.FAIL}.get(kind)
    status = status or (Status.FAIL if kind == "nxdomain" else Status.DEFER)
    delivery = DeliveryPolicy(
        D, source, domain_mode, status, mx=tuple(h.policy for h in hosts), mta_sts=state,
        tlsrpt_rua=(RUA_OK.uri,) if tlsrpt else (), mx_secure=mx_secure, resolved_at=NOW,
    )  # fmt: skip
    sts_txt = TxtLookup(
        f"_mta-sts.{D}",
        record,
        record_outcome or ("ok" if record else "nodata"),
        detail="SERVFAIL" if record_outcome == "error" else "",
    )
    rpt_txt = TxtLookup(
        f"_smtp._tls.{D}",
        tlsrpt,
        tlsrpt_outcome or ("ok" if tlsrpt else "nodata"),
        detail="SERVFAIL" if tlsrpt_outcome == "error" else "",
    )
    return Observations(
        domain=D,
        at=NOW,
        policy=delivery,
        mx_lookup=MxLookupView(kind, dnssec, "" if kind == "hosts" else f"MX lookup: {kind}"),
        hosts=hosts,
        sts_txt=sts_txt,
        fetch=fetch,
        policy_text=text,
        rpt_txt=rpt_txt,
        rua=(RUA_OK,) if rua is None and tlsrpt else rua or (),
    )


ANY: Any = object()


@dataclass(frozen=True)
class Want:
    """What every finding of one code must say (ANY: not checked)."""

    severity: Severity
    breaks: bool = False
    result_type: ResultType | None = ANY
    mx: str | None = ANY


ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO


@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[], Observations]
    verdict: Verdict
    protection: Protection
    has: Mapping[str, Want] = field(default_factory=dict)
    lacks: tuple[str, ...] = ()
    # The previous check had another policy body under the same TXT id (history.compare).
    body_changed_since_last_check: bool = False
    bug: str | None = None  # a known bug in src/: the row is xfail(strict) with this reason


BROKEN, UNPROTECTED = Verdict.BROKEN, Verdict.UNPROTECTED
PARTIAL, PROTECTED = Verdict.PARTIAL, Verdict.PROTECTED
DANE, STS, NONE = Protection.DANE, Protection.MTA_STS, Protection.NONE

LF_POLICY = f"version: STSv1\nmode: enforce\nmx: {MX1}\nmax_age: 2592000\n"
BLANK_LINE_POLICY = f"version: STSv1\r\nmode: testing\r\n\r\nmx: {MX1}\r\nmax_age: 2592000\r\n"


def expiring_policy_host(days: int) -> bytes:
    cert = issue(f"mta-sts.{D}", issuer=CA, names=(f"mta-sts.{D}",), end=NOW + days * DAY).cert
    return der(cert)


def enforce_fetch_with_certificate(days: int) -> Observations:
    body = mtasts.Policy("STSv1", Mode.ENFORCE, 2592000, (MX1,)).to_text()
    return observe(host("enforce"), sts="enforce", fetch=ok_fetch(body, expiring_policy_host(days)))


ROWS: list[Row] = [
    # --- the MX lookup -------------------------------------------------------------------
    Row("nxdomain_is_broken", lambda: observe(kind="nxdomain"), BROKEN, NONE,
        {"domain-not-found": Want(ERROR, breaks=True)},
        lacks=("no-protection", "tlsrpt-missing", "dnssec-unsigned")),
    Row("bogus_mx_is_broken_and_reports_dnssec_invalid",
        lambda: observe(kind="bogus", dnssec="bogus"), BROKEN, NONE,
        {"dnssec-bogus": Want(ERROR, breaks=True, result_type=ResultType.DNSSEC_INVALID)},
        lacks=("no-protection",)),
    Row("failed_mx_lookup_is_broken", lambda: observe(kind="failed", dnssec="indeterminate"),
        BROKEN, NONE, {"mx-lookup-failed": Want(ERROR, breaks=True)}, lacks=("no-protection",)),
    Row("null_mx_is_protected_without_protection", lambda: observe(kind="null", tlsrpt=()),
        PROTECTED, NONE, {"null-mx": Want(INFO)},
        lacks=("no-protection", "tlsrpt-missing", "dnssec-unsigned", "no-working-mx")),
    Row("implicit_mx_without_policy_is_unprotected",
        lambda: observe(host("none", name=D, pref=0), kind="implicit"), UNPROTECTED, NONE,
        {"mx-implicit": Want(WARNING), "no-protection": Want(ERROR),
         "dnssec-unsigned": Want(INFO)}),
    Row("no_dane_no_mta_sts_is_unprotected", lambda: observe(host("none")), UNPROTECTED, NONE,
        {"no-protection": Want(ERROR), "dnssec-unsigned": Want(INFO)},
        lacks=("tlsrpt-missing", "sts-testing")),
    Row("signed_zone_without_tlsa_is_still_unprotected",
        lambda: observe(host("none"), dnssec="secure", mx_secure=True), UNPROTECTED, NONE,
        {"no-protection": Want(ERROR)}, lacks=("dnssec-unsigned",)),
    # --- MTA-STS enforce -------------------------------------------------------------------
    Row("enforce_with_honest_mx_is_protected",
        lambda: observe(host("enforce"), host("enforce", name=MX2, pref=20), sts="enforce"),
        PROTECTED, STS, {"dnssec-unsigned": Want(INFO)},
        lacks=("sts-testing", "sts-max-age-short", "sts-mx-not-covered", "sts-pattern-unused",
               "no-protection", "sts-ready-for-enforce", "sts-policy-line-endings")),
    Row("enforce_with_an_uncovered_mx_is_broken",
        lambda: observe(host("enforce"), host("not-allowed", name=MX2, pref=20),
                        sts="enforce", patterns=(MX1,)),
        BROKEN, STS,
        {"sts-mx-not-covered": Want(ERROR, breaks=True, mx=MX2,
                                    result_type=ResultType.VALIDATION_FAILURE)},
        lacks=("sts-no-mx-covered", "no-working-mx", "sts-pattern-unused")),
    Row("enforce_covering_no_mx_is_broken_once",
        lambda: observe(host("not-allowed"), host("not-allowed", name=MX2, pref=20),
                        sts="enforce", patterns=("mx.elsewhere.test",)),
        BROKEN, STS,
        {"sts-no-mx-covered": Want(ERROR, breaks=True),
         "sts-mx-not-covered": Want(ERROR, breaks=True),
         "sts-pattern-unused": Want(WARNING)},
        lacks=("no-working-mx",)),
    Row("enforce_pattern_matching_no_mx_is_unused",
        lambda: observe(host("enforce"), sts="enforce", patterns=(MX1, "old.example.test")),
        PROTECTED, STS, {"sts-pattern-unused": Want(WARNING)}),
    Row("enforce_wildcard_pattern_covers_the_mx",
        lambda: observe(host("enforce"), sts="enforce", patterns=(f"*.{D}",)),
        PROTECTED, STS, lacks=("sts-pattern-unused", "sts-mx-not-covered")),
    Row("enforce_max_age_under_a_week_is_short",
        lambda: observe(host("enforce"), sts="enforce", max_age=2 * 86400), PROTECTED, STS,
        {"sts-max-age-short": Want(WARNING)}, lacks=("sts-policy-warning",)),
    Row("enforce_max_age_of_a_week_is_not_short",
        lambda: observe(host("enforce"), sts="enforce", max_age=SHORT_MAX_AGE), PROTECTED, STS,
        lacks=("sts-max-age-short",)),
    Row("lf_line_endings_are_flagged",
        lambda: observe(host("enforce"), sts="enforce", body=LF_POLICY), PROTECTED, STS,
        {"sts-policy-line-endings": Want(WARNING)}, lacks=("sts-policy-warning",)),
    Row("enforce_with_starttls_missing_is_broken",
        lambda: observe(host("enforce", "no-starttls"), sts="enforce"), BROKEN, STS,
        {"starttls-missing": Want(ERROR, breaks=True, result_type=SNS, mx=MX1),
         "no-working-mx": Want(ERROR, breaks=True)}),
    Row("enforce_refused_starttls_on_one_mx_is_broken",
        lambda: observe(host("enforce", "starttls-refused"),
                        host("enforce", name=MX2, pref=20), sts="enforce"),
        BROKEN, STS, {"starttls-failed": Want(ERROR, breaks=True, result_type=SNS, mx=MX1)},
        lacks=("no-working-mx", "starttls-missing")),
    # --- MTA-STS testing: partial, and ready for enforce only when nothing blocks ----------
    Row("testing_with_honest_mx_is_partial_and_ready",
        lambda: observe(host("testing"), sts="testing"), PARTIAL, STS,
        {"sts-testing": Want(WARNING), "sts-ready-for-enforce": Want(INFO)},
        lacks=("sts-max-age-short",)),
    Row("testing_short_max_age_is_not_flagged",
        lambda: observe(host("testing"), sts="testing", max_age=2 * 86400), PARTIAL, STS,
        {"sts-ready-for-enforce": Want(INFO)}, lacks=("sts-max-age-short",)),
    Row("testing_without_tlsrpt_is_still_ready",
        lambda: observe(host("testing"), sts="testing", tlsrpt=()), PARTIAL, STS,
        {"tlsrpt-missing": Want(WARNING), "sts-ready-for-enforce": Want(INFO)}),
    Row("testing_policy_warnings_do_not_block",
        lambda: observe(host("testing"), sts="testing", body=BLANK_LINE_POLICY), PARTIAL, STS,
        {"sts-policy-warning": Want(WARNING), "sts-ready-for-enforce": Want(INFO)}),
    Row("testing_with_an_uncovered_mx_is_not_ready",
        lambda: observe(host("testing"), host("testing", name=MX2, pref=20, covered=False),
                        sts="testing", patterns=(MX1,)),
        PARTIAL, STS, {"sts-mx-not-covered": Want(WARNING, mx=MX2)},
        lacks=("sts-ready-for-enforce", "sts-no-mx-covered")),
    Row("testing_covering_no_mx_warns_but_delivers",
        lambda: observe(host("testing", covered=False), sts="testing",
                        patterns=("mx.elsewhere.test",)),
        PARTIAL, STS,
        {"sts-no-mx-covered": Want(WARNING), "sts-mx-not-covered": Want(WARNING)},
        lacks=("sts-ready-for-enforce", "no-working-mx")),
    Row("testing_without_starttls_is_not_ready",
        lambda: observe(host("testing", "no-starttls"), sts="testing"), PARTIAL, STS,
        {"starttls-missing": Want(ERROR, result_type=SNS)}, lacks=("sts-ready-for-enforce",)),
    Row("testing_with_failed_handshake_on_only_mx_is_broken",
        lambda: observe(host("testing", "handshake-failed"), sts="testing"), BROKEN, STS,
        {"starttls-failed": Want(ERROR, result_type=VF), "no-working-mx": Want(ERROR, True)},
        lacks=("sts-ready-for-enforce",)),
    Row("mode_none_withdraws_the_policy",
        lambda: observe(host("none"), sts="none", patterns=()), UNPROTECTED, NONE,
        {"sts-mode-none": Want(WARNING), "no-protection": Want(ERROR)},
        lacks=("sts-testing", "sts-no-mx-covered", "sts-mx-not-covered")),
    # --- the _mta-sts record ---------------------------------------------------------------
    Row("sts_record_lookup_failure_is_no_policy",
        lambda: observe(host("none"), record=(), record_outcome="error"), UNPROTECTED, NONE,
        {"sts-record-lookup-failed": Want(WARNING), "no-protection": Want(ERROR)}),
    Row("two_sts_records_are_invalid",
        lambda: observe(host("none"), record=("v=STSv1; id=1;", "v=STSv1; id=2;")),
        UNPROTECTED, NONE, {"sts-record-invalid": Want(ERROR), "no-protection": Want(ERROR)}),
    Row("sts_record_warning_of_the_record_senders_use",
        lambda: observe(host("enforce"), sts="enforce",
                        record=("v=STSv1 id=2025", f"v=STSv1; id={STS_ID}; ext=1")),
        PROTECTED, STS, {"sts-record-warning": Want(INFO)}),
    Row("sts_record_extension_is_tolerated",
        lambda: observe(host("enforce"), sts="enforce",
                        record=(f"v=STSv1; id={STS_ID}; ext=1",)),
        PROTECTED, STS, {"sts-record-warning": Want(INFO)}),
    # --- the policy fetch: what a sender's fetch saw ------------------------------------------
    Row("policy_404_is_no_policy",
        lambda: observe(host("none"), fetch=failed_fetch(f"HTTP 404 from {POLICY_URL}", 404)),
        UNPROTECTED, NONE,
        {"sts-policy-http-status": Want(ERROR, result_type=FETCH_ERROR),
         "no-protection": Want(ERROR)}),
    Row("policy_redirect_is_not_followed",
        lambda: observe(host("none"), fetch=failed_fetch(f"HTTP 301 redirect from {POLICY_URL}",
                                                         301, "text/html")),
        UNPROTECTED, NONE, {"sts-policy-redirect": Want(ERROR, result_type=FETCH_ERROR)},
        lacks=("sts-policy-http-status", "sts-policy-content-type")),
    Row("policy_served_as_html_is_refused",
        lambda: observe(host("none"), fetch=failed_fetch(
            f"{POLICY_URL} answered with Content-Type 'text/html'", 200, "text/html")),
        UNPROTECTED, NONE, {"sts-policy-content-type": Want(ERROR, result_type=FETCH_ERROR)}),
    Row("policy_too_large_is_refused",
        lambda: observe(host("none"), fetch=failed_fetch(
            f"the policy from {POLICY_URL} is larger than the limit of 65536 bytes", 200,
            "text/plain; charset=utf-8")),
        UNPROTECTED, NONE, {"sts-policy-too-large": Want(ERROR, result_type=FETCH_ERROR)}),
    Row("policy_host_unreachable",
        lambda: observe(host("none"), fetch=failed_fetch(
            f"cannot fetch {POLICY_URL}: connection refused", None)),
        UNPROTECTED, NONE, {"sts-policy-unreachable": Want(ERROR, result_type=FETCH_ERROR)}),
    Row("policy_host_certificate_fails_webpki",
        lambda: observe(host("none"), fetch=failed_fetch(
            f"the certificate of mta-sts.{D} failed WebPKI validation", None,
            result_type=ResultType.STS_WEBPKI_INVALID)),
        UNPROTECTED, NONE,
        {"sts-policy-host-certificate": Want(ERROR, result_type=ResultType.STS_WEBPKI_INVALID)}),
    Row("invalid_policy_body_is_no_policy",
        lambda: observe(host("none"), invalid="line 2: mode 'sometimes' is not a mode"),
        UNPROTECTED, NONE,
        {"sts-policy-invalid": Want(ERROR, result_type=ResultType.STS_POLICY_INVALID)},
        lacks=("sts-policy-warning", "sts-mode-none")),
    Row("policy_body_cut_short_by_the_deadline_is_unreachable_not_too_large",
        lambda: observe(host("none"), fetch=failed_fetch(
            f"no complete answer from {POLICY_URL} within 10 s", 200, "text/plain")),
        UNPROTECTED, NONE, {"sts-policy-unreachable": Want(ERROR, result_type=FETCH_ERROR)},
        lacks=("sts-policy-too-large",)),
    Row("compressed_policy_is_not_called_too_large",
        lambda: observe(host("none"), fetch=failed_fetch(
            f"{POLICY_URL} answered with Content-Encoding 'gzip' although identity was asked",
            200, "text/plain")),
        UNPROTECTED, NONE, {"no-protection": Want(ERROR)}, lacks=("sts-policy-too-large",)),
    Row("policy_host_certificate_expiring_in_10_days",
        lambda: enforce_fetch_with_certificate(10), PROTECTED, STS,
        {"sts-certificate-expiring": Want(WARNING, mx=f"mta-sts.{D}")}),
    Row("policy_host_certificate_expiring_in_30_days_is_fine",
        lambda: enforce_fetch_with_certificate(30), PROTECTED, STS,
        lacks=("sts-certificate-expiring",)),
    # --- certificates: the severity follows the policy that uses them ------------------------
    Row("enforce_expired_certificate_breaks",
        lambda: observe(host("enforce"), host("enforce", "expired", name=MX2, pref=20),
                        sts="enforce"),
        BROKEN, STS,
        {"certificate-expired": Want(ERROR, breaks=True, result_type=EXPIRED, mx=MX2)},
        lacks=("no-working-mx", "certificate-expiring")),
    Row("enforce_certificate_for_another_name_breaks",
        lambda: observe(host("enforce", "wrong-name"), sts="enforce"), BROKEN, STS,
        {"certificate-host-mismatch": Want(ERROR, breaks=True, result_type=MISMATCH),
         "no-working-mx": Want(ERROR, breaks=True)}),
    Row("enforce_self_signed_certificate_breaks",
        lambda: observe(host("enforce", "self-signed"), sts="enforce"), BROKEN, STS,
        {"certificate-not-trusted": Want(ERROR, breaks=True, result_type=UNTRUSTED)}),
    Row("enforce_otherwise_invalid_certificate_breaks",
        lambda: observe(host("enforce", "invalid"), sts="enforce"), BROKEN, STS,
        {"certificate-invalid": Want(ERROR, breaks=True, result_type=VF)}),
    Row("testing_certificate_problem_is_a_warning",
        lambda: observe(host("testing", "wrong-name"), sts="testing"), PARTIAL, STS,
        {"certificate-host-mismatch": Want(WARNING, result_type=MISMATCH)},
        lacks=("sts-ready-for-enforce",)),
    Row("testing_expired_certificate_is_a_warning",
        lambda: observe(host("testing", "expired"), sts="testing"), PARTIAL, STS,
        {"certificate-expired": Want(WARNING, result_type=EXPIRED)},
        lacks=("sts-ready-for-enforce",)),
    Row("no_policy_certificate_problem_is_information",
        lambda: observe(host("none", "self-signed")), UNPROTECTED, NONE,
        {"certificate-not-trusted": Want(INFO, result_type=UNTRUSTED)}),
    Row("dane_certificate_problem_is_information",
        lambda: observe(host("dane", "expired"), dnssec="secure", mx_secure=True, dane=True),
        PROTECTED, DANE, {"certificate-expired": Want(INFO)}),
    Row("dane_host_under_mta_sts_enforce_needs_webpki_too",
        lambda: observe(host("dane", "self-signed", covered=True), dnssec="secure",
                        mx_secure=True, dane=True, sts="enforce"),
        BROKEN, DANE, {"certificate-not-trusted": Want(ERROR, breaks=True)},
        lacks=("dane-mismatch",)),
    Row("certificate_expiring_in_10_days",
        lambda: observe(host("none", "expiring-10d")), UNPROTECTED, NONE,
        {"certificate-expiring": Want(WARNING, mx=MX1)}),
    Row("certificate_expiring_in_30_days_is_fine",
        lambda: observe(host("none", "expiring-30d")), UNPROTECTED, NONE,
        lacks=("certificate-expiring",)),
    # --- MX hosts ----------------------------------------------------------------------------
    # A host a sender cannot use now (a lookup failed) while another works: mail flows, as
    # precedence decides (test_precedence: one usable host is enough).
    Row("deferred_mx_is_a_warning_while_another_host_works",
        lambda: observe(host("none"), host("deferred", name=MX2, pref=20)), UNPROTECTED, NONE,
        {"mx-deferred": Want(WARNING, breaks=False, result_type=VF, mx=MX2)},
        lacks=("no-working-mx", "smtp-unreachable")),
    Row("bogus_mx_host_breaks",
        lambda: observe(host("none"), host("none", name=MX2, pref=20, defer=Failure(
            ResultType.DNSSEC_INVALID, "TLSA lookup: DNSSEC validation failed"))),
        BROKEN, NONE,
        {"dnssec-bogus": Want(ERROR, breaks=True, result_type=ResultType.DNSSEC_INVALID,
                              mx=MX2)}),
    Row("mx_host_without_address_is_skipped",
        lambda: observe(host("none"), host("none", name=MX2, pref=20, addresses=())),
        UNPROTECTED, NONE, {"mx-no-address": Want(ERROR, mx=MX2)}, lacks=("no-working-mx",)),
    Row("unreachable_address_is_a_warning",
        lambda: observe(host("none", "unreachable"), host("none", name=MX2, pref=20)),
        UNPROTECTED, NONE, {"smtp-unreachable": Want(WARNING, mx=MX1)},
        lacks=("no-working-mx",)),
    Row("no_address_answering_is_broken",
        lambda: observe(host("enforce", "unreachable"),
                        host("enforce", "unreachable", name=MX2, pref=20), sts="enforce"),
        BROKEN, STS, {"smtp-unreachable": Want(WARNING), "no-working-mx": Want(ERROR, True)}),
    Row("no_policy_without_starttls_is_plain_text",
        lambda: observe(host("none", "no-starttls")), UNPROTECTED, NONE,
        {"starttls-missing": Want(ERROR, result_type=SNS)}, lacks=("no-working-mx",)),
    Row("no_policy_refused_starttls_goes_on_in_plain_text",
        lambda: observe(host("none", "starttls-refused")), UNPROTECTED, NONE,
        {"starttls-failed": Want(ERROR, result_type=SNS)}, lacks=("no-working-mx",)),
    Row("no_policy_failed_handshake_tries_the_next_mx",
        lambda: observe(host("none", "handshake-failed"), host("none", name=MX2, pref=20)),
        UNPROTECTED, NONE, {"starttls-failed": Want(ERROR, result_type=VF, mx=MX1)},
        lacks=("no-working-mx",)),
    # --- DANE --------------------------------------------------------------------------------
    Row("dane_with_rollover_records_is_protected",
        lambda: observe(host("dane", tlsa=(ee(leaf("valid")), ta(CA.cert))), dnssec="secure",
                        mx_secure=True, dane=True),
        PROTECTED, DANE, {},
        lacks=("dane-rollover-unready", "dane-mx-unsigned", "dane-partial", "no-protection",
               "dnssec-unsigned", "certificate-not-trusted")),
    Row("dane_with_two_ee_keys_is_ready_for_a_rollover",
        lambda: observe(host("dane", tlsa=(ee(leaf("valid")), ee(leaf("self-signed")))),
                        dnssec="secure", mx_secure=True, dane=True),
        PROTECTED, DANE, lacks=("dane-rollover-unready",)),
    Row("dane_with_two_ee_records_of_one_key_is_rollover_unready",
        lambda: observe(host("dane", tlsa=(ee(leaf("valid")), ee_full_cert(leaf("valid")))),
                        dnssec="secure", mx_secure=True, dane=True),
        PROTECTED, DANE, {"dane-rollover-unready": Want(WARNING, mx=MX1)}),
    Row("dane_with_a_single_ee_record_is_rollover_unready",
        lambda: observe(host("dane"), dnssec="secure", mx_secure=True, dane=True),
        PROTECTED, DANE, {"dane-rollover-unready": Want(WARNING, mx=MX1)}),
    Row("dane_with_unsigned_mx_rrset_is_partial",
        lambda: observe(host("dane"), dane=True, mx_secure=False), PARTIAL, DANE,
        {"dane-mx-unsigned": Want(WARNING)}),
    Row("dane_mismatch_breaks",
        lambda: observe(host("dane-mismatch"), dnssec="secure", mx_secure=True, dane=True),
        BROKEN, DANE, {"dane-mismatch": Want(ERROR, breaks=True, result_type=VF, mx=MX1),
                       "no-working-mx": Want(ERROR, breaks=True)}),
    Row("dane_on_some_mx_hosts_is_partial",
        lambda: observe(host("dane"), host("none", name=MX2, pref=20), dnssec="secure",
                        mx_secure=True, dane=True),
        PARTIAL, DANE, {"dane-partial": Want(WARNING, mx=MX2)}),
    Row("only_unusable_tlsa_is_partial",
        lambda: observe(host("none", tls=Tls.REQUIRED, source=Source.DANE,
                             tlsa_unusable=(Tlsa(1, 1, 1, bytes(32)),)),
                        dnssec="secure", mx_secure=True, dane=True),
        PARTIAL, DANE, {"dane-tlsa-unusable": Want(WARNING, mx=MX1)},
        lacks=("dane-partial", "dane-rollover-unready")),
    Row("unsigned_tlsa_is_ignored",
        lambda: observe(host("none", tlsa_insecure=(ee(leaf("valid")).to_text(),))),
        UNPROTECTED, NONE, {"dane-tlsa-unsigned": Want(WARNING, mx=MX1)}),
    # --- TLS-RPT -----------------------------------------------------------------------------
    Row("tlsrpt_missing_under_enforce_is_a_warning",
        lambda: observe(host("enforce"), sts="enforce", tlsrpt=()), PROTECTED, STS,
        {"tlsrpt-missing": Want(WARNING)}),
    Row("tlsrpt_missing_without_protection_is_information",
        lambda: observe(host("none"), tlsrpt=()), UNPROTECTED, NONE,
        {"tlsrpt-missing": Want(INFO)}),
    Row("tlsrpt_without_rua_is_invalid",
        lambda: observe(host("enforce"), sts="enforce",
                        tlsrpt=(f"v=TLSRPTv1; ruf=mailto:tlsrpt@{D}",), rua=()),
        PROTECTED, STS, {"tlsrpt-invalid": Want(ERROR)}, lacks=("tlsrpt-missing",)),
    Row("tlsrpt_lookup_failure_is_a_warning",
        lambda: observe(host("enforce"), sts="enforce", tlsrpt=(), tlsrpt_outcome="error"),
        PROTECTED, STS, {"tlsrpt-lookup-failed": Want(WARNING)}, lacks=("tlsrpt-missing",)),
    Row("tlsrpt_rua_that_cannot_receive",
        lambda: observe(host("enforce"), sts="enforce", rua=(
            RuaCheck(f"mailto:tlsrpt@{D}", False, "mx1.example.test refuses RCPT TO"),)),
        PROTECTED, STS, {"tlsrpt-rua-unreachable": Want(WARNING)}),
    # --- history: the body changed, the id did not ---------------------------------------------
    Row("changed_body_under_the_same_id_is_an_error",
        lambda: observe(host("enforce"), sts="enforce"), PROTECTED, STS,
        {"sts-id-unchanged": Want(ERROR)}, body_changed_since_last_check=True),
]  # fmt: skip


def judge(row: Row) -> tuple[Observations, Verdict, Protection, str, tuple[Finding, ...]]:
    """``analyse`` as ``Auditor.check`` runs it: once, then again with the history's findings."""
    o = row.build()
    verdict, protection, summary, findings = analyse(o)
    if row.body_changed_since_last_check:
        now = DomainCheck(D, verdict, protection, summary, o, findings).to_json()
        previous = json.loads(json.dumps(now))
        previous["mta_sts"]["policy_sha256"] = hashlib.sha256(b"an older body").hexdigest()
        _, more = history.compare(previous, now)
        verdict, protection, summary, findings = analyse(o, more)
    return o, verdict, protection, summary, findings


def _param(row: Row) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=row.bug)] if row.bug else []
    return pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_analysis_rule(row: Row) -> None:
    _, verdict, protection, summary, findings = judge(row)
    shown = [(f.code, f.severity.value, f.breaks) for f in findings]
    assert (verdict, protection) == (row.verdict, row.protection), shown
    assert summary.strip(), row.id
    for code, want in row.has.items():
        of_code = [f for f in findings if f.code == code]
        assert of_code, f"{code} missing from {shown}"
        for f in of_code:
            assert (f.severity, f.breaks) == (want.severity, want.breaks), f
            if want.result_type is not ANY:
                assert f.result_type == want.result_type, f
            if want.mx is not ANY:
                assert f.mx == want.mx, f
    unexpected = {f.code for f in findings} & set(row.lacks)
    assert not unexpected, shown


def test_row_names_are_unique() -> None:
    names = [r.id for r in ROWS]
    assert len(names) == len(set(names))


def test_changed_body_gives_sts_id_unchanged_once() -> None:
    (row,) = [r for r in ROWS if r.body_changed_since_last_check]
    findings = judge(row)[4]
    assert [f.code for f in findings].count("sts-id-unchanged") == 1


# --- 3. properties of every row ------------------------------------------------------------


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_findings_are_from_the_catalogue_and_say_what_to_do(row: Row) -> None:
    o, verdict, protection, summary, findings = judge(row)
    for f in findings:
        assert f.code in CODES, f
        assert f.detail.strip() and f.sender.strip() and f.fix.strip(), f
        assert "None" not in f.detail, f
        if f.breaks:
            assert verdict is Verdict.BROKEN, f
    # broken exactly when a compliant sender defers or refuses honest mail because of a finding
    assert (verdict is Verdict.BROKEN) == any(f.breaks for f in findings)
    # the JSON of check --json is JSON, findings included, in order
    doc = json.loads(
        json.dumps(DomainCheck(D, verdict, protection, summary, o, findings).to_json())
    )
    assert [f["code"] for f in doc["findings"]] == [f.code for f in findings]
    assert doc["verdict"] == verdict.value and doc["protection"] == protection.value


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_analysis_is_pure(row: Row) -> None:
    """The same observations give the same answer, and nothing in them changes."""
    o = row.build()
    before = dataclasses.astuple(o.mx_lookup), o.hosts, o.policy
    assert analyse(o) == analyse(o)
    assert (dataclasses.astuple(o.mx_lookup), o.hosts, o.policy) == before


def test_every_catalogue_code_has_a_row() -> None:
    emitted = {f.code for r in ROWS if not r.bug for f in judge(r)[4]}
    assert emitted == set(CODES), sorted(set(CODES) - emitted)


def test_expiry_window_is_what_the_rows_assume() -> None:
    assert 10 < EXPIRY_WARNING_DAYS < 30
    assert 2 * 86400 < SHORT_MAX_AGE <= 604800


# --- 4. every code is documented ---------------------------------------------------------

CHECK_DOC = Path(__file__).resolve().parent.parent / "docs" / "check.md"


@pytest.mark.skipif(not CHECK_DOC.exists(), reason="docs/check.md is not written yet")
@pytest.mark.parametrize("code", sorted(CODES))
def test_code_is_documented(code: str) -> None:
    text = CHECK_DOC.read_text(encoding="utf-8")
    assert re.search(rf"`{re.escape(code)}`", text), f"docs/check.md does not explain `{code}`"
