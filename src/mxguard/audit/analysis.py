"""From what a check saw to what it means: findings, the verdict, one sentence (pure).

Nothing here does I/O: ``judge_address`` applies the sender's own certificate check
(``engine.deliver.authenticate``, the code ``send`` runs) to a probe that already happened,
and ``analyse`` turns ``Observations`` into findings and a verdict. Every finding says what a
compliant sender does because of it and what to change (docs/check.md lists the codes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from mxguard.audit.model import (
    AddressCheck,
    Finding,
    HostCheck,
    Observations,
    Protection,
    Severity,
    SmtpProbe,
    Verdict,
)
from mxguard.engine.deliver import authenticate
from mxguard.engine.policy import Auth, MxPolicy, Source, Tls
from mxguard.protocol import dane, mtasts, pkix, tlsrpt
from mxguard.protocol.mtasts import Mode
from mxguard.protocol.results import ResultType
from mxguard.protocol.txtfields import begins_with

EXPIRY_WARNING_DAYS = 21  # certificates that expire sooner are flagged
SHORT_MAX_AGE = 604800  # one week: an enforce policy cached for less is flagged

# The catalogue of finding codes: code -> what it means. docs/check.md explains each one,
# and tests/test_check_analysis.py checks that nothing else is ever emitted.
CODES: dict[str, str] = {
    "domain-not-found": "the domain does not exist (NXDOMAIN)",
    "mx-lookup-failed": "the MX lookup failed (no usable answer)",
    "dnssec-bogus": "a DNSSEC-signed answer fails validation",
    "null-mx": "the domain publishes a null MX: it accepts no mail (RFC 7505)",
    "mx-implicit": "no MX records: senders use the domain's own address records",
    "mx-no-address": "an MX host has no address records",
    "mx-deferred": "a sender cannot use an MX host now (a lookup for it failed)",
    "no-working-mx": "no MX host accepts honest mail from a compliant sender",
    "smtp-unreachable": "an MX address does not answer SMTP",
    "starttls-missing": "an MX address does not offer STARTTLS",
    "starttls-failed": "STARTTLS or the TLS handshake failed",
    "certificate-expired": "the MX certificate has expired (WebPKI)",
    "certificate-host-mismatch": "the MX certificate is not valid for the MX host name",
    "certificate-not-trusted": "the MX certificate does not chain to a trusted root",
    "certificate-invalid": "the MX certificate fails WebPKI validation otherwise",
    "certificate-expiring": "a certificate expires within 21 days",
    "dane-mismatch": "no usable TLSA record matches the certificate the MX host presents",
    "dane-tlsa-unusable": "the MX host's TLSA records are all unusable",
    "dane-tlsa-unsigned": "TLSA records exist but are not DNSSEC-signed: senders ignore them",
    "dane-rollover-unready": "a key or certificate change would break DANE",
    "dane-partial": "DANE protects some MX hosts of the domain but not this one",
    "dnssec-unsigned": "the zone is not DNSSEC-signed: DANE is not possible",
    "dane-mx-unsigned": "DANE protects the MX hosts, but the MX records are not signed",
    "no-protection": "neither DANE nor MTA-STS: stripping STARTTLS works",
    "sts-record-lookup-failed": "the _mta-sts TXT lookup failed",
    "sts-record-invalid": "the _mta-sts TXT record is invalid",
    "sts-record-warning": "the _mta-sts TXT record has a problem that senders tolerate",
    "sts-policy-http-status": "the policy URL answers with another status than 200",
    "sts-policy-redirect": "the policy URL redirects; senders do not follow redirects",
    "sts-policy-content-type": "the policy is not served as text/plain",
    "sts-policy-too-large": "the policy is larger than senders read (64 KiB)",
    "sts-policy-unreachable": "the policy host cannot be reached",
    "sts-policy-host-certificate": "the policy host's certificate fails WebPKI",
    "sts-policy-invalid": "the policy body is invalid",
    "sts-policy-warning": "the policy body has a problem that senders tolerate",
    "sts-policy-line-endings": "the policy's lines end in LF only, not CRLF",
    "sts-certificate-expiring": "the policy host's certificate expires within 21 days",
    "sts-testing": "the policy is in testing mode: failures are reported, mail still flows",
    "sts-ready-for-enforce": "every MX host passes what enforce demands",
    "sts-mode-none": "the policy is mode none: the domain withdrew MTA-STS",
    "sts-mx-not-covered": "an MX host matches no pattern of the policy",
    "sts-no-mx-covered": "the policy's patterns match none of the MX hosts",
    "sts-pattern-unused": "a policy pattern matches none of the MX hosts",
    "sts-max-age-short": "the enforce policy's max_age is shorter than a week",
    "sts-id-unchanged": "the policy body changed but the TXT id did not",
    "tlsrpt-lookup-failed": "the _smtp._tls TXT lookup failed",
    "tlsrpt-missing": "no TLS-RPT record: nobody tells the domain about failures",
    "tlsrpt-invalid": "the TLS-RPT record is invalid: senders send no reports",
    "tlsrpt-rua-unreachable": "a TLS-RPT rua cannot receive reports",
}

_CERT_CODES = {
    ResultType.CERTIFICATE_EXPIRED: "certificate-expired",
    ResultType.CERTIFICATE_HOST_MISMATCH: "certificate-host-mismatch",
    ResultType.CERTIFICATE_NOT_TRUSTED: "certificate-not-trusted",
}

_CERT_FIX = {
    "certificate-expired": "renew the certificate and install it on the MX host",
    "certificate-host-mismatch": "install a certificate whose subjectAltName lists the MX host "
    "name {host} as a DNS name (RFC 8461 §4.2 ignores the CN)",
    "certificate-not-trusted": "install a certificate from a public CA and send the "
    "intermediate certificates with it",
    "certificate-invalid": "install a certificate a current OpenSSL accepts (e.g. RSA of 2048 "
    "bits or more, or EC; signed with SHA-256 or better)",
}


def judge_address(
    m: MxPolicy, probe: SmtpProbe, *, roots: Sequence[Any], now: dt.datetime
) -> AddressCheck:
    """What a compliant sender does at one probed address of MX host ``m``: the same
    certificate check ``send`` runs (``authenticate``), plus the WebPKI verdict for the MX
    host name whatever the policy (for the advice)."""
    tls = probe.tls
    certs = tuple(pkix.summarize(d) for d in tls.ders) if tls else ()
    webpki = (
        pkix.verify_pkix(tls.ders or tls.chain, name=m.host, roots=roots, now=now) if tls else None
    )
    auth = authenticate(m, tls, roots=roots, now=now) if tls else None

    def check(honest: bool, outcome: str, rt: ResultType | None = None) -> AddressCheck:
        return AddressCheck(probe.address, probe, auth, webpki, honest, outcome, rt, certs)

    if not m.allowed:
        return check(False, "not an MX host the policy allows: senders never connect to it")
    if m.defer is not None:
        return check(False, f"senders cannot use this host now: {m.defer.detail}")
    if not probe.connected:
        return check(False, f"no SMTP session: {probe.error}; senders try the next address")
    required = m.tls is Tls.REQUIRED
    if tls is None:
        if not probe.starttls:
            if required:
                return check(
                    False,
                    "STARTTLS is not offered: a compliant sender refuses to send here "
                    "(its policy requires TLS)",
                    ResultType.STARTTLS_NOT_SUPPORTED,
                )
            return check(
                True,
                "STARTTLS is not offered: senders deliver in plain text",
                ResultType.STARTTLS_NOT_SUPPORTED if m.report_only else None,
            )
        rt = probe.error_result_type or ResultType.STARTTLS_NOT_SUPPORTED
        if required:
            return check(False, f"{probe.error}: a compliant sender refuses to send here", rt)
        # A refused STARTTLS leaves the session in plain text; a failed handshake closes it.
        plain = rt is ResultType.STARTTLS_NOT_SUPPORTED
        outcome = "senders go on in plain text" if plain else "senders try the next address"
        return check(plain, f"{probe.error}: {outcome}", rt if m.report_only else None)
    assert auth is not None
    if auth.ok:
        how = {"pkix": "WebPKI-verified", None: "unauthenticated"}.get(
            auth.verified, f"{auth.verified}-verified"
        )
        return check(True, f"{tls.version}, {how}: delivered")
    if auth.enforced:
        return check(
            False,
            f"{auth.label} fails ({auth.detail}): a compliant sender refuses to send here",
            auth.result_type,
        )
    return check(
        True,
        f"{auth.label} fails ({auth.detail}): testing mode, so senders deliver and report it",
        auth.result_type,
    )


def protection_of(o: Observations) -> Protection:
    if o.policy.source is Source.DANE:
        return Protection.DANE
    if o.policy.source is Source.MTA_STS and o.policy.mode in (Mode.ENFORCE, Mode.TESTING):
        return Protection.MTA_STS
    return Protection.NONE


def analyse(
    o: Observations, extra: Iterable[Finding] = ()
) -> tuple[Verdict, Protection, str, tuple[Finding, ...]]:
    """The verdict, the protection, a one-sentence summary and every finding."""
    protection = protection_of(o)
    found = _Findings()
    _dns(o, found)
    sts_mode = _sts(o, found)
    for h in o.hosts:
        _host(o, h, protection, sts_mode, found)
    _working(o, protection, found)
    _tlsrpt(o, protection, found)
    if protection is Protection.NONE and o.mx_lookup.kind in ("hosts", "implicit"):
        found.add(
            "no-protection", Severity.ERROR,
            f"{o.domain} publishes neither usable DANE records nor an MTA-STS policy",
            "an attacker on the path deletes STARTTLS from the EHLO reply and senders deliver "
            "in plain text, without noticing",
            "publish an MTA-STS policy (start with mode: testing and a TLS-RPT record), or "
            "sign the zones of the domain and of its MX hosts and publish TLSA records (DANE)",
        )  # fmt: skip
    if protection is Protection.DANE and not o.policy.mx_secure:
        found.add(
            "dane-mx-unsigned", Severity.WARNING,
            f"the MX records of {o.domain} are not DNSSEC-signed, though its MX hosts have DANE",
            "senders use DANE for the MX hosts they are given, but an attacker who forges the "
            "MX answer sends them to a host of his own (RFC 7672 §2.2.1)",
            f"sign the zone {o.domain} (or publish an MTA-STS policy listing the MX hosts)",
        )  # fmt: skip
    if protection is Protection.MTA_STS and sts_mode is Mode.TESTING:
        _rollout(o, found)
    found.items.extend(extra)
    findings = tuple(found.items)
    verdict = _verdict(o, protection, sts_mode, findings)
    return verdict, protection, _summary(o, verdict, protection, findings), findings


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []

    def add(
        self,
        code: str,
        severity: Severity,
        detail: str,
        sender: str,
        fix: str,
        *,
        result_type: ResultType | None = None,
        mx: str | None = None,
        breaks: bool = False,
    ) -> None:
        assert code in CODES, code
        f = Finding(code, severity, detail, sender, fix, result_type, mx, breaks)
        if f not in self.items:
            self.items.append(f)


# --- DNS ------------------------------------------------------------------------------------


def _dns(o: Observations, found: _Findings) -> None:
    mx = o.mx_lookup
    if mx.kind == "nxdomain":
        found.add(
            "domain-not-found", Severity.ERROR, f"{o.domain} does not exist (NXDOMAIN)",
            "senders bounce mail for it at once", "register the domain or publish its zone",
            breaks=True,
        )  # fmt: skip
    elif mx.kind == "bogus":
        found.add(
            "dnssec-bogus", Severity.ERROR, f"the MX records of {o.domain} fail DNSSEC "
            f"validation: {mx.detail}",
            "validating senders defer all mail to the domain (and report dnssec-invalid)",
            "fix the zone's signatures or the DS record in the parent zone (a key rollover "
            "that left a stale DS is the usual cause)",
            result_type=ResultType.DNSSEC_INVALID, breaks=True,
        )  # fmt: skip
    elif mx.kind == "failed":
        found.add(
            "mx-lookup-failed", Severity.ERROR, f"the MX lookup of {o.domain} failed: {mx.detail}",
            "senders defer mail and try again later; if this lasts, they bounce it",
            "make the domain's name servers answer (check them from outside your network)",
            breaks=True,
        )  # fmt: skip
    elif mx.kind == "null":
        found.add(
            "null-mx", Severity.INFO, f"{o.domain} publishes a null MX (RFC 7505)",
            "senders bounce mail for the domain at once: there is no session to downgrade",
            "nothing, if the domain is not meant to receive mail",
        )  # fmt: skip
    elif mx.kind == "implicit":
        found.add(
            "mx-implicit", Severity.WARNING, f"{o.domain} has no MX records",
            "senders deliver to the domain's own address records (RFC 5321 §5.1)",
            "publish an MX record naming the host that receives mail",
        )  # fmt: skip
    if mx.dnssec == "insecure" and mx.kind in ("hosts", "implicit"):
        found.add(
            "dnssec-unsigned", Severity.INFO, f"the zone {o.domain} is not DNSSEC-signed",
            "senders cannot use DANE for the domain; MTA-STS is the defence available",
            "to use DANE, sign the zone (and the MX hosts' zones) and publish a DS record",
        )  # fmt: skip


# --- MTA-STS --------------------------------------------------------------------------------

_NO_POLICY_SENDER = (
    "a sender that has not cached your policy treats the domain as having none, so an attacker "
    "can strip STARTTLS; a sender that cached it keeps it until its max_age runs out"
)


def _sts(o: Observations, found: _Findings) -> Mode | None:
    """MTA-STS findings about the record and the fetch; the mode of the policy fetched."""
    txt = o.sts_txt
    if o.mx_lookup.kind in ("bogus", "failed", "nxdomain", "null"):
        return None  # said already: the zone itself cannot be used (or takes no mail)
    if txt.outcome == "error":
        found.add(
            "sts-record-lookup-failed", Severity.WARNING,
            f"the lookup of {txt.name} TXT failed: {txt.detail}", _NO_POLICY_SENDER,
            "make the domain's name servers answer TXT queries for _mta-sts",
        )  # fmt: skip
        return None
    try:
        record = mtasts.select_record(list(txt.texts))
    except mtasts.StsRecordError as exc:
        found.add(
            "sts-record-invalid", Severity.ERROR, f"{txt.name} TXT is invalid: {exc.reason}",
            _NO_POLICY_SENDER,
            "publish exactly one TXT record 'v=STSv1; id=YYYYMMDDhhmmss;' at " + txt.name,
        )  # fmt: skip
        return None
    if record is None:
        return None
    candidates = [t for t in txt.texts if begins_with(t, mtasts.STS_VERSION)]
    for warning in mtasts.lint_record(candidates[0])[2] if candidates else []:
        found.add(
            "sts-record-warning", Severity.INFO, f"{txt.name} TXT: {warning}",
            "senders accept the record", "nothing required",
        )  # fmt: skip
    _fetch(o, found)
    sts = o.policy.mta_sts
    if o.policy_text is None or sts is None or sts.mode is None:
        return None
    _policy_text(o, found)
    if sts.mode is Mode.NONE:
        found.add(
            "sts-mode-none", Severity.WARNING, f"the policy of {o.domain} is mode: none",
            "senders forget any policy they cached for the domain: no MTA-STS protection",
            "publish mode: testing (then enforce) if you meant to protect the domain",
        )  # fmt: skip
        return sts.mode
    _coverage(o, sts.mode, sts.mx, found)
    if sts.mode is Mode.ENFORCE and (sts.max_age or 0) < SHORT_MAX_AGE:
        found.add(
            "sts-max-age-short", Severity.WARNING,
            f"max_age is {sts.max_age} s, less than a week",
            "a sender trusts the cached policy only that long after its last fetch; an attacker "
            "who blocks the fetch after that can strip STARTTLS again",
            "raise max_age to one to several weeks (604800 to 31557600) once enforce works",
        )  # fmt: skip
    if sts.mode is Mode.TESTING:
        found.add(
            "sts-testing", Severity.WARNING, f"the policy of {o.domain} is in mode: testing",
            "senders check the policy and report failures (TLS-RPT) but deliver anyway, even "
            "when STARTTLS was stripped",
            "read the TLS reports; when they show no failures, publish mode: enforce with a new "
            "id in the TXT record",
        )  # fmt: skip
    return sts.mode


def _fetch(o: Observations, found: _Findings) -> None:
    f = o.fetch
    error = o.policy.mta_sts.error if o.policy.mta_sts else None
    if f is not None and f.ok and error is not None:
        found.add(
            "sts-policy-invalid", Severity.ERROR, error.detail, _NO_POLICY_SENDER,
            "correct the policy (mxguard sts check-policy FILE)", result_type=error.result_type,
        )  # fmt: skip
        return
    if f is None or f.ok:
        if f is not None and f.certificate:
            _expiring(
                (pkix.summarize(f.certificate),), o.at, found, "sts-certificate-expiring",
                f"mta-sts.{o.domain}", "the policy host's certificate",
            )  # fmt: skip
        return
    rt = f.result_type or ResultType.STS_POLICY_FETCH_ERROR
    url = f"https://mta-sts.{o.domain}/.well-known/mta-sts.txt"
    if rt is ResultType.STS_WEBPKI_INVALID:
        code, fix = (
            "sts-policy-host-certificate",
            (
                f"give mta-sts.{o.domain} a certificate from a public CA for that name, with its "
                "intermediates"
            ),
        )
    elif rt is ResultType.STS_POLICY_INVALID:
        code, fix = "sts-policy-invalid", "correct the policy (mxguard sts check-policy FILE)"
    elif f.status is not None and 300 <= f.status < 400:
        code, fix = "sts-policy-redirect", f"serve the policy at {url} itself (RFC 8461 §3.3)"
    elif f.status is not None and f.status != 200:
        code, fix = "sts-policy-http-status", f"serve the policy at {url} with status 200"
    elif f.status == 200 and "text/plain" not in (f.content_type or "").lower():
        code, fix = "sts-policy-content-type", "serve the policy with Content-Type: text/plain"
    elif f.status == 200 and "larger than the limit" in f.detail:
        code, fix = "sts-policy-too-large", "keep the policy small (a few lines)"
    elif f.status == 200:
        code, fix = (
            "sts-policy-unreachable",
            (f"serve the whole policy at {url} promptly and uncompressed"),
        )
    else:
        code, fix = (
            "sts-policy-unreachable",
            (f"make mta-sts.{o.domain} resolvable and answer HTTPS on port 443"),
        )
    found.add(code, Severity.ERROR, f.detail, _NO_POLICY_SENDER, fix, result_type=rt)


def _policy_text(o: Observations, found: _Findings) -> None:
    text = o.policy_text or ""
    _, errors, warnings = mtasts.lint_policy(text)
    for w in [*errors, *warnings]:
        found.add(
            "sts-policy-warning", Severity.WARNING, f"policy: {w}", "senders accept the policy",
            "correct the policy (mxguard sts check-policy FILE)",
        )  # fmt: skip
    bare = text.replace("\r\n", "")
    if "\n" in bare:
        found.add(
            "sts-policy-line-endings", Severity.WARNING,
            "the policy's lines end in LF, not CRLF",
            "mxguard accepts LF (RFC 8461 erratum 6253), but a sender that reads RFC 8461 §3.2 "
            "to the letter rejects the policy and treats the domain as having none",
            "serve the policy with CRLF line endings",
        )  # fmt: skip


def _coverage(o: Observations, mode: Mode, patterns: Sequence[str], found: _Findings) -> None:
    hosts = [h for h in o.hosts]
    if not hosts:
        return
    enforce = mode is Mode.ENFORCE
    uncovered = [h for h in hosts if h.covered is False]
    for h in uncovered:
        found.add(
            "sts-mx-not-covered", Severity.ERROR if enforce else Severity.WARNING,
            f"MX host {h.host} matches no mx pattern of the policy ({', '.join(patterns)})",
            "senders never deliver to this host (RFC 8461 §4.1)"
            if enforce
            else "senders report a failure (testing) and deliver; under enforce they would "
            "never use this host",
            f"add 'mx: {h.host}' (or a wildcard covering it) to the policy and change the id",
            result_type=ResultType.VALIDATION_FAILURE, mx=h.host, breaks=enforce,
        )  # fmt: skip
    if len(uncovered) == len(hosts):
        found.add(
            "sts-no-mx-covered", Severity.ERROR if enforce else Severity.WARNING,
            "the policy lists no MX host the domain has",
            "senders defer all mail to the domain" if enforce else "senders report every "
            "session as a failure; under enforce they would defer all mail",
            "list the real MX hosts in the policy's mx lines and change the id",
            breaks=enforce,
        )  # fmt: skip
    for p in patterns:
        if not any(mtasts.matches(p, h.host) for h in hosts):
            found.add(
                "sts-pattern-unused", Severity.WARNING,
                f"the policy's pattern {p!r} matches none of the MX hosts",
                "senders ignore it", "remove it, or publish the MX record it was meant for",
            )  # fmt: skip


def _rollout(o: Observations, found: _Findings) -> None:
    """In testing mode: would enforce work today? (RFC 8461 §5: testing is for this.)"""
    blocking = [
        f for f in found.items if f.severity is not Severity.INFO and f.code not in _NOT_BLOCKING
    ]
    if blocking:
        return
    found.add(
        "sts-ready-for-enforce", Severity.INFO,
        "every MX host passes what mode: enforce demands (policy match, STARTTLS, a "
        "WebPKI-valid certificate for its name)",
        "in testing mode senders still deliver when STARTTLS is stripped",
        "switch the policy to mode: enforce and publish a new id in the TXT record; keep "
        "reading the TLS reports",
    )  # fmt: skip


_NOT_BLOCKING = {
    "sts-testing", "tlsrpt-missing", "tlsrpt-rua-unreachable", "certificate-expiring",
    "sts-certificate-expiring", "sts-policy-line-endings", "sts-policy-warning",
    "sts-pattern-unused", "dane-tlsa-unsigned", "mx-implicit", "smtp-unreachable",
}  # fmt: skip


# --- MX hosts -------------------------------------------------------------------------------


def _host(
    o: Observations, h: HostCheck, protection: Protection, sts_mode: Mode | None, found: _Findings
) -> None:
    m = h.policy
    if m.defer is not None:
        bogus = m.defer.result_type is ResultType.DNSSEC_INVALID
        found.add(
            "dnssec-bogus" if bogus else "mx-deferred",
            Severity.ERROR if bogus else Severity.WARNING,
            f"{m.host}: {m.defer.detail}",
            "validating senders never use this host (RFC 7672 §2.2) and report dnssec-invalid"
            if bogus
            else "senders defer mail for this host and try again later",
            "fix the DNSSEC signatures of the host's zone" if bogus
            else "make the host's name servers answer its address and TLSA queries",
            result_type=m.defer.result_type, mx=m.host, breaks=bogus,
        )  # fmt: skip
    elif not m.addresses:
        found.add(
            "mx-no-address", Severity.ERROR, f"MX host {m.host} has no address records",
            "senders skip this host", f"publish A/AAAA records for {m.host} or remove the MX",
            mx=m.host,
        )  # fmt: skip
    if h.tlsa_insecure:
        found.add(
            "dane-tlsa-unsigned", Severity.WARNING,
            f"{m.host} has TLSA records but its zone is not DNSSEC-signed",
            "senders ignore TLSA records without DNSSEC (RFC 7672 §2.2): no DANE for this host",
            "sign the zone of the MX host, or remove the TLSA records",
            mx=m.host,
        )  # fmt: skip
    if m.tlsa_unusable and not m.tlsa:
        found.add(
            "dane-tlsa-unusable", Severity.WARNING,
            f"every TLSA record of {m.host} is unusable for SMTP: "
            + ", ".join(t.to_text()[:40] for t in m.tlsa_unusable),
            "senders require TLS but do not authenticate the host (RFC 7672 §3.1.3): an "
            "attacker can intercept with any certificate",
            "publish '3 1 1' (your key) and/or '2 1 1' (your CA's key) records (RFC 7672 §3.1)",
            mx=m.host,
        )  # fmt: skip
    if m.auth is Auth.DANE:
        if not any(t.usage == 2 for t in m.tlsa) and not _next_key_published(h):
            found.add(
                "dane-rollover-unready", Severity.WARNING,
                f"{m.host} has one DANE-EE association and no DANE-TA record",
                "when the key changes before the TLSA records do, senders refuse the host",
                "publish the TLSA record of the next key now (or a '2 1 1' for your CA), and "
                "change the key only after the new record's TTL has passed",
                mx=m.host,
            )  # fmt: skip
    elif protection is Protection.DANE and m.allowed and m.defer is None and not m.tlsa_unusable:
        found.add(
            "dane-partial", Severity.WARNING,
            f"{m.host} is not protected by DANE (its addresses are not DNSSEC-signed or it "
            "has no TLSA records)",
            "senders deliver to it with opportunistic TLS: an attacker can strip STARTTLS on "
            "this host",
            f"sign the zone of {m.host} and publish TLSA records for it",
            mx=m.host,
        )  # fmt: skip
    for a in h.addresses:
        _address(o, m, a, sts_mode, found)
    seen: set[str] = set()
    for a in h.addresses:
        fresh = tuple(c for c in a.certificates if c.sha256 not in seen)
        seen.update(c.sha256 for c in fresh)
        _expiring(fresh, o.at, found, "certificate-expiring", m.host, f"{m.host}'s certificate")


def _next_key_published(h: HostCheck) -> bool:
    """Whether a DANE-EE record names a key other than the one the host presents now (the
    next key, published ahead of a rollover). Records of one key in several forms (``3 1 1``
    and ``3 0 1``) are one key. Without a presented certificate, two distinct records count."""
    ee = [t for t in h.policy.tlsa if t.usage == 3]
    leaves = [a.probe.tls.chain[0] for a in h.addresses if a.probe.tls and a.probe.tls.chain]
    if not leaves:
        return len({(t.selector, t.matching_type, t.data) for t in ee}) > 1
    current = leaves[0]
    try:
        return any(
            t.data != dane.association_data(current, t.selector, t.matching_type) for t in ee
        )
    except (ValueError, TypeError):  # a certificate cryptography cannot take apart
        return False


def _address(
    o: Observations, m: MxPolicy, a: AddressCheck, sts_mode: Mode | None, found: _Findings
) -> None:
    p = a.probe
    where = f"{m.host} [{a.address}]"
    if not m.allowed or m.defer is not None:
        return
    if not p.connected:
        found.add(
            "smtp-unreachable", Severity.WARNING, f"{where}: {p.error}",
            "senders try the next address or host, and defer if none answers",
            "make the host answer on port 25 from the internet", mx=m.host,
        )  # fmt: skip
        return
    required = m.tls is Tls.REQUIRED
    if p.tls is None:
        code = "starttls-missing" if not p.starttls else "starttls-failed"
        detail = f"{where}: " + ("STARTTLS is not offered" if not p.starttls else f"{p.error}")
        found.add(
            code, Severity.ERROR, detail, a.outcome,
            "offer STARTTLS with a certificate for the MX host name (Postfix: "
            "smtpd_tls_security_level = may, smtpd_tls_chain_files)",
            result_type=a.result_type or p.error_result_type or ResultType.STARTTLS_NOT_SUPPORTED,
            mx=m.host, breaks=required and not a.honest,
        )  # fmt: skip
        return
    auth = a.auth
    if auth is not None and auth.checked is Auth.DANE and not auth.ok:
        found.add(
            "dane-mismatch", Severity.ERROR, f"{where}: {auth.detail}", a.outcome,
            "publish TLSA records for the certificate the host presents now (mxguard dane "
            "match), or install the certificate the records name",
            result_type=auth.result_type, mx=m.host, breaks=True,
        )  # fmt: skip
    w = a.webpki
    if w is None or w.ok:
        return
    code = _CERT_CODES.get(w.result_type or ResultType.VALIDATION_FAILURE, "certificate-invalid")
    fix = _CERT_FIX[code].format(host=m.host)
    if auth is not None and auth.checked is Auth.PKIX:
        enforced = auth.enforced
        found.add(
            code, Severity.ERROR if enforced else Severity.WARNING, f"{where}: {w.detail}",
            a.outcome if enforced else a.outcome + "; under enforce senders would refuse it",
            fix if enforced else fix + ", before switching the policy to enforce",
            result_type=w.result_type, mx=m.host, breaks=enforced and not a.honest,
        )  # fmt: skip
    elif m.auth is Auth.DANE and sts_mode is Mode.ENFORCE:
        found.add(
            code, Severity.ERROR, f"{where}: {w.detail}",
            "senders without DANE apply the MTA-STS policy and refuse this host",
            fix, result_type=w.result_type, mx=m.host, breaks=True,
        )  # fmt: skip
    else:
        found.add(
            code, Severity.INFO, f"{where}: {w.detail}",
            "no sender checks it now (DANE or no policy decides)",
            fix + ", before publishing an MTA-STS policy", result_type=w.result_type, mx=m.host,
        )  # fmt: skip


def _expiring(
    certs: Iterable[pkix.CertSummary],
    now: dt.datetime,
    found: _Findings,
    code: str,
    mx: str,
    what: str,
) -> None:
    for c in certs:
        try:
            not_after = dt.datetime.strptime(c.not_after, "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=dt.UTC
            )
        except ValueError:
            continue
        left = not_after - now
        if dt.timedelta(0) < left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
            days = left.total_seconds() / 86400
            found.add(
                code, Severity.WARNING,
                f"{what} ({c.subject}) expires on {c.not_after}, in {days:.0f} days",
                "after that, senders that check it refuse the host (certificate-expired)",
                "renew it now and make sure renewal is automatic",
                mx=mx,
            )  # fmt: skip


def _working(o: Observations, protection: Protection, found: _Findings) -> None:
    if o.mx_lookup.kind not in ("hosts", "implicit") or not o.hosts:
        return
    if any(a.honest for h in o.hosts for a in h.addresses):
        return
    if any(f.code == "sts-no-mx-covered" and f.breaks for f in found.items):
        return  # said already, with its reason
    found.add(
        "no-working-mx", Severity.ERROR,
        "no MX host accepted a session that a compliant sender would deliver honest mail on",
        "senders defer mail to the domain and bounce it after some days",
        "fix the errors listed for the MX hosts",
        breaks=True,
    )  # fmt: skip


# --- TLS-RPT --------------------------------------------------------------------------------


def _tlsrpt(o: Observations, protection: Protection, found: _Findings) -> None:
    if o.mx_lookup.kind in ("null", "nxdomain", "bogus", "failed"):
        return
    txt = o.rpt_txt
    if txt.outcome == "error":
        found.add(
            "tlsrpt-lookup-failed", Severity.WARNING,
            f"the lookup of {txt.name} TXT failed: {txt.detail}",
            "senders cannot find where to send TLS reports",
            "make the name servers answer TXT queries for _smtp._tls",
        )  # fmt: skip
        return
    try:
        record = tlsrpt.select_record(list(txt.texts))
    except tlsrpt.TlsRptRecordError as exc:
        found.add(
            "tlsrpt-invalid", Severity.ERROR, f"{txt.name} TXT is invalid: {exc}",
            "senders send no TLS reports: failures at your MX hosts stay unknown to you",
            f"publish one record 'v=TLSRPTv1; rua=mailto:tlsrpt@{o.domain}' at {txt.name}",
        )  # fmt: skip
        return
    if record is None:
        found.add(
            "tlsrpt-missing", Severity.INFO if protection is Protection.NONE else Severity.WARNING,
            f"{o.domain} has no TLS-RPT record at {txt.name}",
            "senders do not tell you when TLS to your MX hosts fails or is downgraded",
            f"publish 'v=TLSRPTv1; rua=mailto:tlsrpt@{o.domain}' at {txt.name} (RFC 8460)",
        )  # fmt: skip
        return
    for r in o.rua:
        if not r.ok:
            found.add(
                "tlsrpt-rua-unreachable", Severity.WARNING, f"rua {r.uri}: {r.detail}",
                "senders' reports to this address are lost",
                "make the address receive mail (or the URL accept HTTPS POSTs)",
            )  # fmt: skip


# --- verdict --------------------------------------------------------------------------------


def _verdict(
    o: Observations, protection: Protection, sts_mode: Mode | None, findings: Sequence[Finding]
) -> Verdict:
    if any(f.breaks for f in findings):
        return Verdict.BROKEN
    if o.mx_lookup.kind == "null":
        return Verdict.PROTECTED
    if protection is Protection.NONE:
        return Verdict.UNPROTECTED
    if protection is Protection.MTA_STS and sts_mode is Mode.TESTING:
        return Verdict.PARTIAL
    if protection is Protection.DANE and (
        not o.policy.mx_secure or any(m.allowed and m.auth is not Auth.DANE for m in o.policy.mx)
    ):
        return Verdict.PARTIAL
    return Verdict.PROTECTED


def _summary(
    o: Observations, verdict: Verdict, protection: Protection, findings: Sequence[Finding]
) -> str:
    if verdict is Verdict.BROKEN:
        first = next(f for f in findings if f.breaks)
        return f"a compliant sender defers or refuses honest mail: {first.detail}"
    if o.mx_lookup.kind == "null":
        return "the domain accepts no mail (null MX): there is nothing to downgrade"
    if verdict is Verdict.UNPROTECTED:
        return "no DANE and no MTA-STS: an attacker who strips STARTTLS gets the mail in plain text"
    if verdict is Verdict.PARTIAL:
        if protection is Protection.MTA_STS:
            return "MTA-STS in testing mode: senders report a downgrade but deliver anyway"
        if not o.policy.mx_secure:
            return "DANE protects the MX hosts, but unsigned MX records can be forged"
        return "DANE protects only some of the MX hosts; the others can be downgraded"
    how = "DANE" if protection is Protection.DANE else "MTA-STS enforce"
    return f"protected by {how}: a compliant sender refuses a downgrade, and honest mail flows"
