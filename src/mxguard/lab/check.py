"""`mxguard lab check`: look at a running lab from the outside, as a client would.

Each check uses an independent client (dnspython through Unbound, Python's smtplib and ssl,
the policy fetch adapter) and says what it saw, so a failure points at the broken peer.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable

from mxguard.adapters import https
from mxguard.adapters.dns import DnsOutcome, DnsResolver, DnssecStatus
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode

Check = tuple[str, bool, str]


def _ehlo_features(lab: Lab, host: str) -> set[str]:
    with smtplib.SMTP(lab.address_of(host), lab.ports.smtp, timeout=10) as smtp:
        smtp.ehlo("check.mxguard.test")
        return set(smtp.esmtp_features)


def _dns_checks(lab: Lab) -> list[Check]:
    resolver = DnsResolver([lab.resolver])

    async def run() -> list[Check]:
        signed = await resolver.query("mx.dane-ee.test", "A")
        bogus = await resolver.query("mx.dane-bogus.test", "A")
        unsigned = await resolver.query("mx.nopolicy.test", "A")
        tlsa = await resolver.query("_25._tcp.mx.dane-ee.test", "TLSA")
        missing = await resolver.query("missing.dane-ee.test", "A")
        return [
            ("DNS: signed zone answers securely", signed.secure, signed.detail),
            ("DNS: bogus zone fails validation", bogus.dnssec is DnssecStatus.BOGUS, bogus.detail),
            (
                "DNS: unsigned zone answers insecurely",
                unsigned.outcome is DnsOutcome.OK and unsigned.dnssec is DnssecStatus.INSECURE,
                unsigned.detail,
            ),
            ("DNS: TLSA record is secure", tlsa.secure and bool(tlsa.records), tlsa.detail),
            (
                "DNS: NXDOMAIN is proven securely",
                missing.outcome is DnsOutcome.NXDOMAIN and missing.secure,
                missing.detail,
            ),
        ]

    return asyncio.run(run())


def _smtp_checks(lab: Lab) -> list[Check]:
    host = "mx.nopolicy.test"
    honest = _ehlo_features(lab, host)
    lab.set_attack(host, AttackMode.STRIP)
    try:
        stripped = _ehlo_features(lab, host)
    finally:
        lab.set_attack(host, AttackMode.PASS)
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    with smtplib.SMTP(lab.address_of(host), lab.ports.smtp, timeout=10) as smtp:
        # smtplib checks the certificate against the name it connected to; connect by
        # address, then name the host so that the lab certificate is checked for it.
        smtp._host = host  # type: ignore[attr-defined]
        smtp.starttls(context=ctx)
        smtp.ehlo("check.mxguard.test")
        version = smtp.sock.version() if isinstance(smtp.sock, ssl.SSLSocket) else None
    return [
        ("SMTP: honest receiver offers STARTTLS", "starttls" in honest, ", ".join(sorted(honest))),
        (
            "SMTP: the attacker strips STARTTLS and nothing else",
            stripped == honest - {"starttls"},
            ", ".join(sorted(stripped)),
        ),
        ("SMTP: STARTTLS verifies with the lab CA", version is not None, str(version)),
    ]


def _https_checks(lab: Lab) -> list[Check]:
    async def fetch(domain: str) -> https.FetchResult:
        return await https.fetch_policy(
            domain,
            ca_file=lab.ca_file,
            port=lab.ports.https,
            timeout=3,
            connect_to=lab.address_of(f"mta-sts.{domain}"),
        )

    good = asyncio.run(fetch("sts-enforce.test"))
    bad = asyncio.run(fetch("sts-expired-cert.test"))
    return [
        ("HTTPS: policy host serves the policy", good.ok, good.detail),
        (
            "HTTPS: expired policy-host certificate is refused",
            not bad.ok and bad.result_type is not None,
            bad.detail,
        ),
    ]


def run_checks(lab: Lab) -> list[Check]:
    out: list[Check] = []
    step: Callable[[Lab], list[Check]]
    for step in (_dns_checks, _smtp_checks, _https_checks):
        try:
            out += step(lab)
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            out.append((step.__name__.strip("_").replace("_", " "), False, repr(exc)))
    return out
