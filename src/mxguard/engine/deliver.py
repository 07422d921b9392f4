"""``deliver()``: the one place where a delivery policy is enforced on live SMTP sessions.

For each recipient domain: resolve its policy, then try the MX hosts it allows in preference
order and each of their addresses (RFC 5321 §5.1). On every session:

- STARTTLS when offered (or required); a fresh EHLO after TLS (RFC 3207 §4.2);
- the certificate is authenticated the way the MX host's policy says: DANE (RFC 7672 §3),
  WebPKI for the MX host name (RFC 8461 §4.2), or not at all (opportunistic);
- when TLS is required, MAIL, RCPT and DATA are never sent in plain text: the session is
  abandoned before them, and the SMTP client refuses them anyway (``require_tls``);
- a report-only (``testing``) policy checks everything, records what failed, and delivers.

Every failed attempt is classified with an RFC 8460 result type, and every session's outcome
is recorded in the store for TLS reporting. Exit codes of ``mxguard send``, decided over all
recipients (sendmail's sysexits.h convention): 75 (EX_TEMPFAIL) while any recipient is still
deferred, since the caller must try those again; otherwise 69 (EX_UNAVAILABLE) when some
recipient failed for good (null MX, no such domain, 5xx); 0 when every recipient got it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mxguard.adapters.smtp import (
    Reply,
    SmtpClient,
    SmtpError,
    SmtpErrorKind,
    TlsInfo,
    address_problem,
)
from mxguard.adapters.store import SessionResult, Store
from mxguard.engine import spool as result_spool
from mxguard.engine.message import Message
from mxguard.engine.policy import Auth, DeliveryPolicy, MxPolicy, Source, Status, Tls
from mxguard.engine.resolve import Resolver, normalise_domain
from mxguard.learned.learner import Learner
from mxguard.protocol import dane
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import PolicyType

if TYPE_CHECKING:
    # pkix (and cryptography) come with the first session whose chain a policy checks.
    from mxguard.protocol import pkix

log = logging.getLogger(__name__)


class DeliveryStatus(enum.StrEnum):
    """What became of a message for one recipient domain (or one recipient): ``send --json``
    ``status``, and the exit status of ``mxguard send`` (0, 75, 69)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # try again later
    FAILED = "failed"  # for good


# `mxguard send` exits 0, 75 (EX_TEMPFAIL) or 69 (EX_UNAVAILABLE): docs/design.md, "Commands".
_EXIT_CODES = {DeliveryStatus.DELIVERED: 0, DeliveryStatus.DEFERRED: 75, DeliveryStatus.FAILED: 69}


def overall(statuses: Iterable[DeliveryStatus]) -> DeliveryStatus:
    """The status of several recipients together: deferred while any of them is (the caller
    must try those again, whatever became of the others), else failed if any failed for good,
    else delivered. Which recipient had which outcome is reported per recipient."""
    states = set(statuses)
    if DeliveryStatus.DEFERRED in states:
        return DeliveryStatus.DEFERRED
    if DeliveryStatus.FAILED in states:
        return DeliveryStatus.FAILED
    return DeliveryStatus.DELIVERED


def refusal_status(reply: str) -> DeliveryStatus:
    """A recipient refused in a session that delivered to others: a 5xx reply fails it for
    good, anything else leaves it to be tried again (RFC 5321 §4.2.1)."""
    return DeliveryStatus.FAILED if reply.startswith("5") else DeliveryStatus.DEFERRED


class AddressError(ValueError):
    """The sender address cannot go into MAIL FROM; found before any connection is made. The
    message says why (``problem``); ``address`` is the address as given."""

    def __init__(self, address: str, problem: str) -> None:
        super().__init__(f"sender address: {problem}")
        self.address = address
        self.problem = problem


@dataclass(frozen=True)
class Attempt:
    """One MX host address tried (or deliberately not tried), and what happened."""

    mx: str
    ip: str | None
    starttls: bool | None = None  # offered in the (untrusted) EHLO reply
    tls_version: str | None = None
    cipher: str | None = None
    verified: str | None = None  # dane-ee | dane-ta | pkix | None
    result_type: ResultType | None = None  # a TLS or policy failure, also in testing mode
    detail: str = ""
    smtp_reply: str | None = None
    delivered: bool = False
    plaintext: bool = False  # the message travelled without TLS
    ehlo: tuple[str, ...] = ()  # the EHLO reply as received before TLS
    helo: str | None = None  # the host name the server announced
    sending_ip: str | None = None
    session: bool = False  # a TCP session took place (it counts for TLS-RPT)
    refused: tuple[tuple[str, str], ...] = ()  # recipients the server refused: (address, reply)
    # What TLS-RPT may tell the receiving domain (and whoever runs its rua): TLS facts only,
    # never SMTP replies, which can carry addresses.
    tls_detail: str = ""
    presented: tuple[bytes, ...] = ()  # the chain the server presented (DER, leaf first)
    cert_problems: tuple[str, ...] = ()  # every WebPKI problem found, when WebPKI was checked
    # REQUIRETLS (RFC 8689) ruled this host out for good: no DANE or MTA-STS policy
    # authenticates it, or it did not offer REQUIRETLS over TLS.
    requiretls_refused: bool = False

    @property
    def certificates(self) -> tuple[pkix.CertSummary, ...]:
        """The presented chain summarised for people (made only when shown)."""
        from mxguard.protocol import pkix

        return tuple(pkix.summarize(d) for d in self.presented)

    def to_json(self) -> dict[str, Any]:
        return {
            "mx": self.mx,
            "ip": self.ip,
            "starttls": self.starttls,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "verified": self.verified,
            "result_type": self.result_type.value if self.result_type else None,
            "detail": self.detail,
            "smtp_reply": self.smtp_reply,
            "delivered": self.delivered,
            "plaintext": self.plaintext,
            "certificates": [c.to_json() for c in self.certificates],
            "certificate_problems": list(self.cert_problems),
        }


@dataclass(frozen=True)
class DomainResult:
    domain: str
    status: DeliveryStatus
    recipients: tuple[str, ...]
    policy: DeliveryPolicy | None
    attempts: tuple[Attempt, ...] = ()
    result_type: ResultType | None = None
    detail: str = ""
    # The enhanced status code (RFC 3463) that says why, when deliver() decided it itself
    # (REQUIRETLS: 5.7.30); a relay's bounce uses it.
    status_code: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is DeliveryStatus.DELIVERED

    def recipient_outcomes(self) -> list[tuple[str, str, str | None]]:
        """(address, delivered|deferred|failed, the server's refusal if any) per recipient."""
        return [(r, status.value, reply) for r, status, reply in self.recipient_statuses()]

    def recipient_statuses(self) -> list[tuple[str, DeliveryStatus, str | None]]:
        """(address, status, the server's refusal if any) per recipient."""
        done = next((a for a in self.attempts if a.delivered), None)
        if done is None:
            return [(r, self.status, None) for r in self.recipients]
        refused = dict(done.refused)
        out: list[tuple[str, DeliveryStatus, str | None]] = []
        for r in self.recipients:
            reply = refused.get(r)
            if reply is None:
                out.append((r, DeliveryStatus.DELIVERED, None))
            else:
                out.append((r, refusal_status(reply), reply))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "status": self.status.value,
            "delivered": self.delivered,
            "recipients": [
                {"address": r, "status": status, "reply": reply}
                for r, status, reply in self.recipient_outcomes()
            ],
            "policy": {
                "source": self.policy.source.value if self.policy else None,
                "mode": self.policy.mode.value if self.policy else None,
            },
            "result_type": self.result_type.value if self.result_type else None,
            "detail": self.detail,
            "attempts": [a.to_json() for a in self.attempts],
        }


@dataclass(frozen=True)
class DeliveryResult:
    domains: tuple[DomainResult, ...]

    @property
    def status(self) -> DeliveryStatus:
        """Over every recipient of every domain: deferred while any is (``overall``)."""
        return overall(s for d in self.domains for _, s, _ in d.recipient_statuses())

    @property
    def exit_code(self) -> int:
        """75 while any recipient is deferred, else 69 if any failed for good, else 0."""
        return _EXIT_CODES[self.status]

    def counts(self) -> dict[DeliveryStatus, int]:
        """How many recipients ended in each status."""
        out = dict.fromkeys(DeliveryStatus, 0)
        for d in self.domains:
            for _, status, _ in d.recipient_statuses():
                out[status] += 1
        return out

    def to_json(self) -> dict[str, Any] | list[dict[str, Any]]:
        """One domain: the object docs/design.md describes; several: a list of them."""
        if len(self.domains) == 1:
            return self.domains[0].to_json()
        return [d.to_json() for d in self.domains]


@dataclass
class Sender:
    """Delivers messages under policy. One instance can serve many deliveries."""

    resolver: Resolver
    store: Store | None = None
    helo_name: str = "localhost"
    smtp_port: int = 25
    roots: Sequence[Any] = ()  # trusted roots for WebPKI: DER (roots.load_ders) or parsed
    timeout: float = 60.0
    is_report: bool = False  # these messages are TLS reports (RFC 8460 §5.3: not counted)
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    spool: result_spool.ResultSpool | None = None  # where results wait if the store refuses
    learner: Learner | None = None  # learns each session's security level (docs/learned.md)

    async def deliver(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes | Message,
        *,
        requiretls: bool = False,
        tls_optional: bool = False,
    ) -> DeliveryResult:
        """Deliver ``data`` to ``recipients`` under their domains' policies. A recipient that is
        not an address fails for good in the result; a sender that is not is ``AddressError``;
        a message with a line over 998 octets is ``MessageError`` (RFC 5322 §2.1.1), before
        any connection. ``data`` may be a ``Message`` read from a file (bounded memory).

        ``requiretls`` (RFC 8689 §4.2.1): only to MX hosts that a DANE or MTA-STS (enforce)
        policy authenticates, over TLS with that authentication, and that offer REQUIRETLS
        after STARTTLS; MAIL FROM carries REQUIRETLS. A domain where no host can qualify fails
        for good (``status_code`` 5.7.30); TLS failures at a qualifying host defer.
        ``tls_optional`` (the message says ``TLS-Required: No``, RFC 8689 §4.2.2): the
        domain's DANE or MTA-STS policy is not enforced, TLS stays opportunistic; a local rule
        still is (never below it). ``requiretls`` wins when both are set.
        """
        message = data if isinstance(data, Message) else Message.from_bytes(data)
        # A bad address is the caller's mistake, found before any connection: it fails for
        # good (never "deferred", which would make callers retry it forever).
        problem = address_problem(mail_from)
        if problem is not None:
            raise AddressError(mail_from, problem)
        by_domain: dict[str, list[str]] = {}
        bad: list[DomainResult] = []
        for rcpt in recipients:
            local, at, domain = rcpt.rpartition("@")
            try:
                if not at or not local:
                    raise ValueError("no local part and domain")
                problem = address_problem(rcpt)
                if problem is not None:
                    raise ValueError(problem)
                by_domain.setdefault(normalise_domain(domain), []).append(rcpt)
            except ValueError as exc:
                bad.append(
                    DomainResult(
                        domain or rcpt,
                        DeliveryStatus.FAILED,
                        (rcpt,),
                        None,
                        detail=f"recipient {rcpt!r} is not an address: {exc}",
                    )
                )
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._domain(d, mail_from, rcpts, message, requiretls, tls_optional))
                for d, rcpts in by_domain.items()
            ]
        return DeliveryResult((*bad, *(t.result() for t in tasks)))

    # --- one domain ------------------------------------------------------------------------

    async def _domain(
        self,
        domain: str,
        mail_from: str,
        rcpts: list[str],
        data: Message,
        requiretls: bool = False,
        tls_optional: bool = False,
    ) -> DomainResult:
        policy = await self.resolver.resolve(domain)
        if policy.status is Status.FAIL:
            why = "; ".join(policy.explanation) or "the domain accepts no mail"
            return DomainResult(domain, DeliveryStatus.FAILED, tuple(rcpts), policy, detail=why)
        attempts: list[Attempt] = []
        outcome = DeliveryStatus.DEFERRED
        final_detail = ""
        for m in policy.mx:
            if self.is_report and m.addresses:
                # RFC 8460 §5.3 / RFC 8689 (TLS-Required: No): a report must get through even
                # when the receiver's TLS is broken, for that is what it reports. Every MX host
                # is tried, with opportunistic TLS and no certificate checks.
                m = replace(m, allowed=True, defer=None, tls=Tls.OPPORTUNISTIC, auth=Auth.NONE,
                            report_only=False)  # fmt: skip
            if requiretls:
                m, refusal = requiretls_host(m)
                if refusal is not None:
                    attempts.append(refusal)
                    continue
            elif tls_optional and policy.local_floor is None and m.addresses:
                # RFC 8689 §4.2.2: the sender asked for the recipient's policy to be ignored;
                # TLS is still used when offered. A local rule is the operator's, not the
                # recipient's: a domain under one keeps its requirements. Under MTA-STS the
                # host is treated as in `testing` mode, so that what failed is still reported
                # (RFC 8460) rather than counted as a success.
                m = replace(m, allowed=True, defer=None, tls=Tls.OPPORTUNISTIC, auth=Auth.NONE,
                            report_only=m.source is Source.MTA_STS)  # fmt: skip
            skipped = _not_contacted(m)
            if skipped is not None:
                attempts.append(skipped)
                continue
            for ip in m.addresses:
                attempt, permanent = await self._attempt(
                    policy, m, ip, mail_from, rcpts, data, requiretls
                )
                attempts.append(attempt)
                if attempt.delivered:
                    outcome = DeliveryStatus.DELIVERED
                    break
                if permanent:
                    outcome, final_detail = DeliveryStatus.FAILED, attempt.detail
                    break
            if outcome is not DeliveryStatus.DEFERRED:
                break
        await self._record(policy, attempts)
        status_code = None
        if (
            requiretls
            and outcome is DeliveryStatus.DEFERRED
            and attempts
            and all(a.requiretls_refused for a in attempts)
        ):
            # No host can ever take it under REQUIRETLS: waiting would not help (RFC 8689 §5).
            outcome, status_code = DeliveryStatus.FAILED, "5.7.30"
            final_detail = "REQUIRETLS support required: " + "; ".join(
                f"{a.mx}: {a.detail}" for a in attempts
            )
        result_type = None
        if outcome is not DeliveryStatus.DELIVERED:
            failed = [a.result_type for a in attempts if a.result_type is not None]
            # A DNS error has no result type (Failure.dns_error): its detail says what happened.
            failed += [
                e.reported_type
                for e in policy.errors
                if policy.status is Status.DEFER and e.reported_type is not None
            ]
            result_type = failed[0] if failed else None
            if not final_detail:
                final_detail = (
                    "no MX host accepted the message under the policy"
                    if attempts
                    else "; ".join(policy.explanation) or "no MX host may be used now"
                )
        elif any(a.result_type for a in attempts):
            result_type = next(a.result_type for a in attempts if a.result_type)
        if outcome is DeliveryStatus.DELIVERED:
            # Recipients the server refused while accepting others are not delivered: a 5xx
            # fails them for good, a 4xx leaves them to be tried again (RFC 5321 §4.2.1).
            done = next(a for a in attempts if a.delivered)
            if done.refused:
                # Deferred while any of them is: those must be tried again (``overall``).
                outcome = overall(refusal_status(reply) for _, reply in done.refused)
                final_detail = (
                    f"delivered to {len(rcpts) - len(done.refused)} of {len(rcpts)} recipients; "
                    + "; ".join(f"{a} refused: {reply}" for a, reply in done.refused)
                )
        return DomainResult(
            domain, outcome, tuple(rcpts), policy, tuple(attempts), result_type, final_detail,
            status_code,
        )  # fmt: skip

    # --- one session -------------------------------------------------------------------------

    async def _attempt(
        self,
        policy: DeliveryPolicy,
        m: MxPolicy,
        ip: str,
        mail_from: str,
        rcpts: list[str],
        data: Message,
        requiretls: bool = False,
    ) -> tuple[Attempt, bool]:
        """Try one address. Returns the attempt and whether its failure is permanent."""
        tls_required = m.tls is Tls.REQUIRED
        client = SmtpClient(require_tls=tls_required)
        base = Attempt(m.host, ip)
        try:
            try:
                await client.connect(
                    ip, self.smtp_port, helo_name=self.helo_name, timeout=self.timeout
                )
            except SmtpError as exc:
                return _with(base, detail=f"{exc}", smtp_reply=_reply(exc.reply)), False
            ehlo = client.ehlo_reply
            base = _with(
                base,
                session=True,
                starttls=client.starttls_offered,
                ehlo=tuple(ehlo.lines) if ehlo else (),
                helo=_announced_name(client),
                sending_ip=client.local_address,
            )
            base, may_send = await self._secure(client, m, base)
            if may_send and requiretls and not client.requiretls_offered:
                # Checked on the EHLO reply sent over TLS: a plain-text one proves nothing.
                detail = f"REQUIRETLS: {m.host} does not offer REQUIRETLS over TLS: not delivered"
                base, may_send = _with(base, detail=detail, requiretls_refused=True), False
            if not may_send:
                if client.connected:
                    await client.quit()
                return base, False
            return await self._transaction(client, base, mail_from, rcpts, data, requiretls)
        except SmtpError as exc:
            # The client's own guard firing means a bug upstream tried to send in plain text.
            if exc.kind is SmtpErrorKind.TLS_REQUIRED:
                log.error("refused to send in plain text to %s: %s", m.host, exc)
            return _with(
                base,
                result_type=exc.result_type or base.result_type,
                detail=str(exc),
                # Only a TLS failure's own words may go into a report, never an SMTP reply.
                tls_detail=exc.message
                if exc.result_type and exc.reply is None
                else base.tls_detail,
                smtp_reply=_reply(exc.reply),
            ), False
        except Exception as exc:  # a bug of ours must defer the message, never crash or leak
            log.exception("unexpected error while delivering to %s [%s]", m.host, ip)
            return _with(base, detail=f"internal error, deferred: {exc!r}"), False
        finally:
            await client.close()

    async def _secure(self, client: SmtpClient, m: MxPolicy, base: Attempt) -> tuple[Attempt, bool]:
        """STARTTLS and authentication as the policy says: (the attempt so far, may send)."""
        enforced = m.tls is Tls.REQUIRED
        if not client.starttls_offered:
            detail = "STARTTLS not offered (stripped on the way, or not supported)"
            if enforced:
                return _stop(base, ResultType.STARTTLS_NOT_SUPPORTED, detail + ": not delivered")
            if m.report_only:
                return _go(base, ResultType.STARTTLS_NOT_SUPPORTED, detail + " (testing: reported)")
            return _go(base, None, detail)
        try:
            info = await client.starttls(m.tlsa_name or m.host)
        except SmtpError as exc:
            result = exc.result_type or ResultType.STARTTLS_NOT_SUPPORTED
            detail = f"{exc}"
            if enforced or not client.connected:
                return _stop(base, result, detail + (": not delivered" if enforced else ""))
            return _go(base, result if m.report_only else None, detail)
        base = _with(
            base,
            tls_version=info.version,
            cipher=info.cipher,
            presented=info.ders,
        )
        verdict = authenticate(m, info, roots=self.roots, now=self.clock())
        base = _with(base, cert_problems=verdict.problems)
        if verdict.ok:
            return _with(base, verified=verdict.verified), True
        if verdict.enforced:
            return _stop(
                base,
                verdict.result_type or ResultType.VALIDATION_FAILURE,
                f"{verdict.label}: {verdict.detail}: not delivered",
            )
        return _go(
            base, verdict.result_type, f"{verdict.label}: {verdict.detail} (testing: reported)"
        )

    async def _transaction(
        self,
        client: SmtpClient,
        base: Attempt,
        mail_from: str,
        rcpts: list[str],
        data: Message,
        requiretls: bool = False,
    ) -> tuple[Attempt, bool]:
        size = client.capabilities.get("SIZE")
        if size is not None:
            limit = _size_limit(size)
            if limit and data.size > limit:
                # RFC 1870 §6.1: a client that knows the message is too big does not send it.
                await client.quit()
                return _with(
                    base,
                    detail=f"not sent: the message is {data.size} octets and {base.mx} accepts "
                    f"at most {limit} (its SIZE, RFC 1870)",
                ), True
            params: tuple[str, ...] = (f"SIZE={data.size}",)  # RFC 1870 §6
        else:
            params = ()
        if requiretls:
            params += ("REQUIRETLS",)  # RFC 8689 §2: the next hop must keep requiring TLS
        reply = await client.mail_from(mail_from, params)
        if not reply.positive:
            return _with(
                base, detail=f"MAIL FROM refused: {reply}", smtp_reply=str(reply)
            ), reply.permanent
        accepted: list[str] = []
        refusals: list[tuple[str, Reply]] = []
        for rcpt in rcpts:
            r = await client.rcpt_to(rcpt)
            if r.positive:
                accepted.append(rcpt)
            else:
                refusals.append((rcpt, r))
        refused = tuple((address, str(r)) for address, r in refusals)
        base = _with(base, refused=refused)
        if not accepted:
            worst = refusals[-1][1]
            permanent = all(r.permanent for _, r in refusals)
            return _with(
                base, detail=f"every recipient refused: {worst}", smtp_reply=str(worst)
            ), permanent
        reply = await client.data(data.chunks())
        if not reply.positive:
            return _with(
                base, detail=f"message refused: {reply}", smtp_reply=str(reply)
            ), reply.permanent
        await client.quit()
        how = "over " + base.tls_version if base.tls_version else "IN PLAIN TEXT"
        detail = f"delivered {how}" + (f"; {base.detail}" if base.detail else "")
        return _with(
            base,
            delivered=True,
            plaintext=base.tls_version is None,
            smtp_reply=str(reply),
            detail=detail,
        ), False

    # --- TLS-RPT -------------------------------------------------------------------------

    async def _record(self, policy: DeliveryPolicy, attempts: list[Attempt]) -> None:
        """One durable result per session that took place (RFC 8460 §4: sessions count); and
        each session's security level, learned (docs/learned.md; it never raises)."""
        if self.learner is not None:
            await self.learner.observe_attempts(
                policy.domain, attempts, roots=self.roots, now=self.clock(),
                published=policy.source not in (Source.NONE, Source.LEARNED),
            )  # fmt: skip
        if self.store is None:
            return
        reported = policy.reported()
        # RFC 8460 §4.3.2.2: a failed MTA-STS discovery or fetch is a policy failure of every
        # session made without the policy, even when the session itself went well.
        sts_failure = next(
            (e for e in policy.errors if e.result_type.is_sts_policy_failure), None
        ) if reported.policy_type is PolicyType.NO_POLICY_FOUND else None  # fmt: skip
        now = self.clock()
        results = [
            SessionResult(
                id=None,
                at=now,
                policy_domain=policy.domain,
                policy=reported,
                result_type=a.result_type or (sts_failure.result_type if sts_failure else None),
                sending_ip=a.sending_ip,
                receiving_mx=a.mx,
                receiving_ip=a.ip,
                receiving_helo=storable(a.helo),
                detail=storable(
                    (sts_failure.detail if sts_failure and not a.result_type else a.tls_detail)
                    or None
                ),
                is_report=self.is_report,
                reported=None,
            )
            for a in attempts
            if a.session
        ]
        if results:
            await result_spool.record(self.store, self.spool, results)


@dataclass(frozen=True, slots=True)
class Authentication:
    """A compliant sender's verdict on the certificate an MX host presented, under the host's
    policy: which check ran (``checked``), whether it passed, and whether a failure stops the
    delivery (``enforced``) or is only reported (``testing``)."""

    checked: Auth
    ok: bool
    enforced: bool
    result_type: ResultType | None = None
    detail: str = ""
    verified: str | None = None  # "dane-ee", "dane-ta" or "pkix" when a check passed
    problems: tuple[str, ...] = ()  # every WebPKI problem found, when WebPKI was checked

    @property
    def label(self) -> str:
        return "DANE" if self.checked is Auth.DANE else "WebPKI"


def authenticate(
    m: MxPolicy, info: TlsInfo, *, roots: Sequence[Any], now: dt.datetime
) -> Authentication:
    """Judge the chain in ``info`` the way ``deliver()`` does for an MX host with policy ``m``:
    DANE against its usable TLSA records (RFC 7672 §3), WebPKI for the MX host name
    (RFC 8461 §4.2; also under ``testing``, to report), or no check (opportunistic TLS).
    Pure apart from the verifier: ``mxguard check`` calls it to say what a sender would do."""
    checks = m.auth if m.auth is not Auth.NONE else (Auth.PKIX if m.report_only else Auth.NONE)
    if checks is Auth.NONE:
        return Authentication(Auth.NONE, ok=True, enforced=False)
    if checks is Auth.DANE:
        dv = dane.verify_chain(m.tlsa, info.chain, names=m.names, now=now)
        if dv.ok:
            return Authentication(
                Auth.DANE, ok=True, enforced=True, detail=dv.detail,
                verified=str(dv.method or "dane"),
            )  # fmt: skip
        return Authentication(
            Auth.DANE, ok=False, enforced=True,
            result_type=dv.result_type or ResultType.VALIDATION_FAILURE, detail=dv.detail,
        )  # fmt: skip
    from mxguard.protocol import pkix

    pk = pkix.verify_pkix(info.ders or info.chain, name=m.host, roots=roots, now=now)
    return Authentication(
        Auth.PKIX,
        ok=pk.ok,
        enforced=m.auth is Auth.PKIX,
        result_type=pk.result_type,
        detail=pk.detail,
        verified="pkix" if pk.ok else None,
        problems=pk.problems,
    )


def requiretls_host(m: MxPolicy) -> tuple[MxPolicy, Attempt | None]:
    """``m`` as a REQUIRETLS message may use it (RFC 8689 §4.2.1): TLS required and the
    certificate authenticated by DANE or by an MTA-STS policy in ``enforce`` mode, which also
    vouches for the MX host name. Any other host is refused: (``m``, the attempt that says
    why). A ``testing`` policy does not qualify: it promises nothing yet."""
    authenticated = (m.source is Source.DANE and m.auth is Auth.DANE) or (
        m.source is Source.MTA_STS and m.auth is Auth.PKIX and not m.report_only
    )
    if not authenticated:
        how = f"{m.source.value} policy, {m.auth.value} authentication"
        if m.report_only:
            how += ", testing only"
        detail = (
            f"REQUIRETLS: not contacted: no DANE or MTA-STS enforce policy authenticates this "
            f"MX host ({how})"
        )
        return m, Attempt(m.host, None, detail=detail, requiretls_refused=True)
    return replace(m, tls=Tls.REQUIRED, report_only=False), None


def _not_contacted(m: MxPolicy) -> Attempt | None:
    """The attempt that says why ``m`` is not contacted at all; None when it may be."""
    if not m.allowed:
        detail = f"not contacted: the {m.source.value} policy does not list this MX host"
        return Attempt(m.host, None, result_type=ResultType.VALIDATION_FAILURE, detail=detail)
    if m.defer is not None:
        detail = f"not contacted: {m.defer.detail}"
        return Attempt(m.host, None, result_type=m.defer.reported_type, detail=detail)
    if not m.addresses:
        return Attempt(m.host, None, detail="not contacted: no address")
    return None


def _with(a: Attempt, **changes: Any) -> Attempt:
    return replace(a, **changes)


def _stop(a: Attempt, result: ResultType, detail: str) -> tuple[Attempt, bool]:
    """The message must not be sent over this session."""
    return _with(a, result_type=result, detail=detail, tls_detail=detail), False


def _go(a: Attempt, result: ResultType | None, detail: str) -> tuple[Attempt, bool]:
    """Carry on (opportunistic or report-only), keeping what was seen."""
    return _with(a, result_type=result, detail=detail, tls_detail=detail), True


def _reply(r: Reply | None) -> str | None:
    return str(r) if r else None


def storable(text: str | None) -> str | None:
    """``text`` as the store can keep it: the peer chose parts of it (its HELO name, the names
    in its certificate), and a NUL or an undecodable byte must not cost the session its
    TLS-RPT record. Both are written as backslash escapes."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _size_limit(value: str) -> int | None:
    """The fixed maximum of an EHLO ``SIZE`` parameter (RFC 1870 §4); 0 or none: no limit."""
    text = value.strip()
    return int(text) if text.isdigit() and len(text) < 20 else None


def _announced_name(client: SmtpClient) -> str | None:
    reply = client.ehlo_reply or client.banner
    if reply is None or not reply.lines:
        return None
    first = reply.lines[0].split()
    return first[0] if first else None


def message_with_headers(mail_from: str, recipients: Sequence[str], body: str) -> bytes:
    """A minimal RFC 5322 message, for ``mxguard send`` without ``--data``."""
    lines = [
        f"From: <{mail_from}>",
        "To: " + ",\r\n\t".join(f"<{r}>" for r in recipients),  # folded (RFC 5322 §2.2.3)
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: {email.utils.make_msgid(domain='mxguard.invalid')}",
        "Subject: mxguard test message",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        body,
    ]
    # errors="replace": an address that is not UTF-8 is refused by deliver() in any case.
    return "\r\n".join(lines).encode("utf-8", errors="replace") + b"\r\n"
