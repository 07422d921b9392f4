"""DKIM signatures of mailed TLS reports (RFC 8460 §3, §5.3).

"Reports sent via SMTP MUST contain a valid DKIM signature by the reporting domain", without
`l=`, and the key record should declare the `tlsrpt` service type. mxguard signs with the key
and selector of `[tlsrpt] dkim_key` / `dkim_selector`, as `dkim_domain` (by default the
submitter). Checked here with dkimpy's own verifier, strict about the service type: on a
built message with the key handed over directly, and on a report mxguard really sent to a lab
receiver, with the key published in a lab zone and looked up through the lab's resolver.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import email
import email.policy
import subprocess
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mxguard.adapters.store import PendingReport, SessionResult
from mxguard.config import ConfigError, from_mapping
from mxguard.engine.context import Engine, engine
from mxguard.lab.lab import Lab
from mxguard.protocol import tlsrpt_report as tr
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy
from mxguard.tlsrpt.reporter import DkimSigner, ReporterConfig, build_email, reporter_for
from tlsrpt_helpers import lab_settings

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
RUA = ("mailto:tlsrpt@example.com",)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, pkcs8: bool = True) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8
        if pkcs8
        else serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def key_record(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; s=tlsrpt; p={base64.b64encode(der).decode()}"


def answering(name: str, record: str) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` that knows one TXT record."""

    def lookup(qname: bytes | str, timeout: float = 5) -> bytes | None:
        text = qname.decode() if isinstance(qname, bytes) else qname
        return record.encode() if text.rstrip(".").lower() == name else None

    return lookup


def a_report(domain: str = "example.com") -> tuple[tr.Report, PendingReport]:
    result = SessionResult(
        id=1, at=NOW, policy_domain=domain,
        policy=ReportedPolicy(PolicyType.STS, ("version: STSv1", "mode: enforce"),
                              ("mx.example.com",), RUA),
        result_type=None, sending_ip="192.0.2.1", receiving_mx="mx.example.com",
        receiving_ip="192.0.2.25", receiving_helo="mx.example.com", detail=None,
        is_report=False, reported=None,
    )  # fmt: skip
    [report] = tr.aggregate([result], day=NOW.date(), organization_name="Example",
                            contact_info="t@example.org", unique={domain: "u1"})  # fmt: skip
    pending = PendingReport(
        report_id=report.report_id, policy_domain=domain, start=report.start,
        filename=tr.filename(report, "mail.example.org", "u1"), body=report.to_gzip(),
        rua=RUA, result_ids=(1,), created_at=NOW, next_attempt_at=NOW,
    )  # fmt: skip
    return report, pending


def config(signer: DkimSigner | None) -> ReporterConfig:
    return ReporterConfig("Example", "t@example.org", "mail.example.org",
                          "tlsrpt@example.org", dkim=signer)  # fmt: skip


# --- configuration ----------------------------------------------------------------------------


def test_the_dkim_keys_of_the_tlsrpt_table() -> None:
    s = from_mapping({"helo_name": "mx.example.org", "tlsrpt": {
        "submitter": "mail.example.org", "dkim_key": "/etc/mxguard/dkim.pem",
        "dkim_selector": "tlsrpt2026"}}, "t.toml")  # fmt: skip
    assert (s.tlsrpt.dkim_key, s.tlsrpt.dkim_selector) == (Path("/etc/mxguard/dkim.pem"),
                                                           "tlsrpt2026")  # fmt: skip
    assert s.report_dkim_domain == "mail.example.org"  # the submitter, unless told
    s = from_mapping({"tlsrpt": {"dkim_key": "k.pem", "dkim_selector": "a.b",
                                 "dkim_domain": "example.org"}}, "t.toml")  # fmt: skip
    assert s.report_dkim_domain == "example.org"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"dkim_key": "k.pem"}, "dkim_key and dkim_selector go together"),
        ({"dkim_selector": "s"}, "dkim_key and dkim_selector go together"),
        ({"dkim_domain": "example.org"}, "dkim_domain: set dkim_key and dkim_selector too"),
        ({"dkim_key": "k.pem", "dkim_selector": "a_b"}, "is not a DKIM selector"),
        ({"dkim_key": "k.pem", "dkim_selector": "-a"}, "is not a DKIM selector"),
        ({"dkim_key": "k.pem", "dkim_selector": "s", "dkim_domain": "a..b"},
         "is not a domain name"),
        ({"dkim_key": "", "dkim_selector": "s"}, "dkim_key: expected a non-empty string"),
        ({"dkim_key": "k.pem", "dkim_selector": 7}, "dkim_selector: expected a non-empty"),
    ],
)  # fmt: skip
def test_dkim_settings_that_cannot_work_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping({"tlsrpt": table}, "t.toml")


def test_a_key_that_cannot_sign_is_refused_when_the_reporter_is_set_up(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    def load(data: bytes | None) -> None:
        path = tmp_path / "k.pem"
        path.unlink(missing_ok=True)
        if data is not None:
            path.write_bytes(data)
        DkimSigner.from_file(path, selector="s", domain="example.org")

    with pytest.raises(ConfigError, match="No such file"):
        load(None)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load(b"hello")
    with pytest.raises(ConfigError, match="not an RSA key"):
        load(pem(ec.generate_private_key(ec.SECP256R1())))
    small = subprocess.run(["openssl", "genrsa", "768"], capture_output=True, check=True)
    with pytest.raises(ConfigError, match="768-bit RSA"):
        load(small.stdout)
    load(pem(rsa_key, pkcs8=False))  # PKCS#1 works too


# --- the signature ------------------------------------------------------------------------------


def test_a_signed_report_email_verifies_as_a_tls_report(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    (tmp_path / "k.pem").write_bytes(pem(rsa_key))  # PKCS#8, as `openssl genpkey` writes
    signer = DkimSigner.from_file(tmp_path / "k.pem", selector="tlsrpt", domain="example.org")
    report, pending = a_report()
    message = build_email(pending, report, config(signer), ["tlsrpt@example.com"], NOW)
    lookup = answering("tlsrpt._domainkey.example.org", key_record(rsa_key))
    # 'strict': the key record must name the tlsrpt service type (RFC 8460 §3).
    assert dkim.verify(message, dnsfunc=lookup, tlsrpt="strict")
    msg = email.message_from_bytes(message, policy=email.policy.default)
    tags = dict(
        t.strip().split("=", 1) for t in str(msg["DKIM-Signature"]).replace("\r\n", "").split(";")
        if "=" in t
    )  # fmt: skip
    assert (tags["d"], tags["s"], tags["a"], tags["c"]) == (
        "example.org", "tlsrpt", "rsa-sha256", "relaxed/relaxed")  # fmt: skip
    assert "l" not in tags  # RFC 8460 §3: MUST NOT limit the body length
    signed = {h.strip() for h in tags["h"].replace(" ", "").split(":")}
    assert {"from", "to", "subject", "date", "message-id", "tls-report-domain",
            "tls-report-submitter", "content-type"} <= signed  # fmt: skip
    # The signature covers what a receiver files the report by.
    forged = message.replace(b"TLS-Report-Domain: example.com", b"TLS-Report-Domain: evil.com")
    assert forged != message and not dkim.verify(forged, dnsfunc=lookup, tlsrpt="strict")
    attached = message.replace(b"\r\n--", b"\r\nappended\r\n--", 1)
    assert not dkim.verify(attached, dnsfunc=lookup, tlsrpt="strict")


def test_without_a_key_report_emails_are_unsigned() -> None:
    report, pending = a_report()
    message = build_email(pending, report, config(None), ["tlsrpt@example.com"], NOW)
    assert b"DKIM-Signature" not in message


# --- through the lab ----------------------------------------------------------------------------


def lab_lookup(lab: Lab) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` asking the lab's resolver (over UDP, like any DKIM verifier)."""
    address, port = lab.resolver

    def lookup(qname: bytes | str, timeout: float = 5) -> bytes | None:
        name = qname.decode() if isinstance(qname, bytes) else qname
        answer = dns.query.udp(dns.message.make_query(name, "TXT"), address, timeout, port)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rdata in rrset:
                    return b"".join(rdata.strings)
        return None

    return lookup


@pytest.mark.lab
def test_a_report_mxguard_mails_to_the_lab_verifies_with_the_key_in_lab_dns(
    lab: Lab, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The reporting domain is a lab zone: its key is published there, as an operator would.
    reporting = "nopolicy.test"
    d = lab.scenario.domain(reporting)
    record = key_record(rsa_key)
    chunks = " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))
    lab.update_domain(dataclasses.replace(d, extra=(*d.extra, f"tlsrpt._domainkey TXT {chunks}")))
    (tmp_path / "dkim.pem").write_bytes(pem(rsa_key))
    s = lab_settings(lab, tmp_path)
    tlsrpt = dataclasses.replace(
        s.tlsrpt, submitter=reporting, dkim_key=tmp_path / "dkim.pem", dkim_selector="tlsrpt"
    )
    s = dataclasses.replace(s, tlsrpt=tlsrpt)

    async def work(e: Engine) -> None:
        await e.sender().deliver("a@client.mxguard.test", ["b@sts-enforce.test"], b"Hi\r\n")
        r = reporter_for(e)
        assert r.config.dkim is not None and r.config.dkim.domain == reporting
        [built] = await r.build(dt.datetime.now(dt.UTC).date())
        [delivery] = await r.deliver_due()
        assert delivery.delivered_to == "mailto:tlsrpt@sts-enforce.test", delivery
        assert built.stored

    async def run() -> None:
        async with engine(s) as e:
            await work(e)

    asyncio.run(run())
    [report] = [m for m in lab.receiver("mx1.sts-enforce.test").messages
                if m.rcpt_tos == ("tlsrpt@sts-enforce.test",)]  # fmt: skip
    assert dkim.verify(report.data, dnsfunc=lab_lookup(lab), tlsrpt="strict")
    msg = email.message_from_bytes(report.data, policy=email.policy.default)
    assert f"d={reporting};" in str(msg["DKIM-Signature"]).replace(" ", "")
    assert msg["TLS-Report-Submitter"] == reporting
    # Without the key in DNS the same message does not verify: the lab lookup is what counts.
    lab.update_domain(d)
    lab.flush_resolver()
    assert not dkim.verify(report.data, dnsfunc=lab_lookup(lab), tlsrpt="strict")
