"""The TLS-RPT report sender: daily aggregation, delivery to every `rua`, retries (RFC 8460).

The work is durable and lives in the store, not in memory:

1. `build(day)` aggregates the day's session results that no report covers yet, per policy
   domain (protocol/tlsrpt_report.py), and stores each report as a `PendingReport`, with a
   first delivery time spread at random over the configured delay window (§4.1 asks senders
   to spread the load). Storing a report gives it its results in the same transaction, so no
   session is ever in two reports, even with several reporters on one store. Results that
   arrive after their day was built (a collector lagging behind) go into a further report
   for that day, with its own report-id (§4.4: each report has a unique report-id).
2. `build_due()` builds every complete UTC day from the oldest result not yet in a report up
   to the last day whose grace period has passed (at most `backfill_days` back): a reporter
   that was down over midnight catches up, and a day is built only `grace` seconds after it
   ended, when the late results of a lagging collector are in.
3. `deliver_due(now)` delivers every report whose time has come, up to `concurrency` at a
   time. Each report is first claimed in the store (its next attempt moves `lease` seconds
   ahead, atomically), so two reporters on one store never send the same report. It goes to
   each `rua` in turn, `mailto:` through mxguard's own `Sender(is_report=True)` (§5.3; those
   sessions are then left out of the next report) and `https:` as a POST of the gzip body
   (§5.4). When some `rua` accepted it, the report is marked delivered and its results
   reported, in one transaction; when none did, it is tried again later with exponential
   back-off and jitter (§5: keep the data until accepted) — unless every `rua` refused it for
   good (SMTP 5xx, HTTP 4xx other than 408 and 429, an unusable URI) or it stayed
   undeliverable for `give_up_after`: then it is dropped. A crash between the steps loses
   nothing: the report, or the results it covers, are still in the store.
4. `run(stop)` does 2 and 3 until `stop` is set.

Report e-mails are DKIM-signed (`DkimSigner`) when `[tlsrpt] dkim_key` and `dkim_selector` are
configured: RFC 8460 §3 wants "a valid DKIM signature by the reporting domain" and tells
receivers to ignore reports without one; `d=` is `dkim_domain`, by default the submitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import ipaddress
import logging
import random
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from mxguard.adapters import https
from mxguard.adapters.dns import DnsOutcome, DnsResolver
from mxguard.adapters.store import PendingReport, SessionResult, Store
from mxguard.config import ConfigError, Settings
from mxguard.engine.context import Engine
from mxguard.engine.deliver import DeliveryStatus
from mxguard.protocol import tlsrpt_report
from mxguard.protocol.tlsrpt import TlsRptRecordError, mailbox_of
from mxguard.protocol.tlsrpt_report import MEDIA_TYPE_GZIP, Report, ReportError

log = logging.getLogger(__name__)

RETRY_BASE = 300.0  # seconds before the first retry
RETRY_MAX = 6 * 3600.0  # back-off cap
POST_TIMEOUT = 30.0
MAX_ERROR = 2000  # characters of the last delivery error kept in the store
GRACE = 3600.0  # seconds after midnight before a day is built: longer than collector lag
BACKFILL_DAYS = 31  # how far back unbuilt days are still built
LEASE = 1800.0  # seconds a claimed report is left to the reporter that claimed it
GIVE_UP_AFTER = 7 * 86400.0  # seconds after building an undeliverable report is dropped
CONCURRENCY = 8  # reports delivered at the same time
MAX_RESPONSE = 4096  # bytes of an HTTPS report endpoint's answer that are read
# RFC 9110 §15.5: 4xx means the request is wrong and repeating it will not help, except 408
# (Request Timeout) and 429 (Too Many Requests, RFC 6585 §4), which ask to try again.
RETRYABLE_4XX = frozenset({408, 429})


class MailSender(Protocol):
    """What delivers a report e-mail: mxguard.engine.deliver.Sender(is_report=True)."""

    async def deliver(self, mail_from: str, recipients: Sequence[str], data: bytes) -> object:
        """Returns a DeliveryResult (its `.status` is DeliveryStatus.DELIVERED on success)."""
        ...


MIN_DKIM_BITS = 1024  # RFC 8301 §3.2: verifiers must accept 1024 to 4096 bits
# The header fields a report e-mail's DKIM signature covers, of those it has: RFC 6376 §5.4's
# usual ones, and RFC 8460 §5.3's, which a receiver files the report by.
DKIM_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "tls-report-domain",
    "tls-report-submitter",
    "tls-required",
    "auto-submitted",
)


@dataclass(frozen=True, slots=True)
class DkimSigner:
    """DKIM-signs report e-mails (RFC 8460 §3: "a valid DKIM signature by the reporting
    domain", without `l=`) with `d=domain`, `s=selector`; the public key belongs at
    `selector._domainkey.domain`, and its record should say `s=tlsrpt`. RSA-SHA256, relaxed
    canonicalization of header and body (a relay that refolds a line breaks nothing)."""

    domain: str
    selector: str
    key: bytes = field(repr=False)  # PEM

    @classmethod
    def from_file(cls, path: Path, *, selector: str, domain: str) -> DkimSigner:
        """The signer for the RSA private key in the PEM file `path` (PKCS#8, as `openssl
        genpkey` writes it, or PKCS#1); ConfigError when it cannot sign."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        where = f"tlsrpt.dkim_key {path}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{where}: not an RSA key (DKIM signs with RSA-SHA256 here)")
        if key.key_size < MIN_DKIM_BITS:
            raise ConfigError(
                f"{where}: {key.key_size}-bit RSA; verifiers refuse keys under "
                f"{MIN_DKIM_BITS} bits (RFC 8301 §3.2), use 2048"
            )
        # dkimpy reads PKCS#1 only.
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return cls(domain, selector, pem)

    def sign(self, message: bytes) -> bytes:
        """`message` with its DKIM-Signature header field in front."""
        import dkim  # type: ignore[import-untyped]

        head = message.split(b"\r\n\r\n", 1)[0]
        present = {
            line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            for line in head.split(b"\r\n")
            if line and line[:1] not in (b" ", b"\t")
        }
        header: bytes = dkim.sign(
            message,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[h.encode("ascii") for h in DKIM_HEADERS if h in present],
            tlsrpt=True,
        )
        return header + message


@dataclass(frozen=True, slots=True)
class ReporterConfig:
    organization_name: str
    contact_info: str
    submitter: str  # RFC 8460 §5.3 TLS-Report-Submitter
    sender: str  # MAIL FROM and From: of report e-mails
    dkim: DkimSigner | None = None  # signs report e-mails (RFC 8460 §3); None: unsigned
    delay_window: float = 4 * 3600.0  # first delivery at random within this after building
    retry_base: float = RETRY_BASE
    retry_max: float = RETRY_MAX
    grace: float = GRACE
    backfill_days: int = BACKFILL_DAYS
    lease: float = LEASE
    give_up_after: float = GIVE_UP_AFTER
    concurrency: int = CONCURRENCY


@dataclass(frozen=True, slots=True)
class Built:
    """A report built for one policy domain and day, with what travels."""

    report: Report
    pending: PendingReport
    stored: bool  # False: a dry run, or another reporter took these results first

    def email(self, config: ReporterConfig, date: dt.datetime) -> bytes:
        mailto = [a for a in (mailto_address(u) for u in self.pending.rua) if a]
        return build_email(self.pending, self.report, config, mailto, date)


@dataclass(frozen=True, slots=True)
class Attempt:
    uri: str
    ok: bool
    detail: str
    permanent: bool = False  # this rua will never accept it: SMTP 5xx, HTTP 4xx, a bad URI


@dataclass(frozen=True, slots=True)
class Delivery:
    report_id: str
    policy_domain: str
    delivered_to: str | None  # the accepting rua, or None when every one failed
    attempts: tuple[Attempt, ...]
    next_attempt_at: dt.datetime | None
    dropped: bool = False  # given up: no further attempt


@dataclass(frozen=True, slots=True)
class PostOutcome:
    """What an `https:` rua answered: accepted, or not and whether trying again could help."""

    ok: bool
    detail: str
    permanent: bool = False


def mailto_address(uri: str) -> str | None:
    """The RFC 5321 mailbox of a `mailto:` rua; None for another scheme or a bad address
    (one that could, percent-decoded, smuggle headers into the report e-mail)."""
    try:
        return mailbox_of(uri)
    except TlsRptRecordError:
        return None


def build_email(
    pending: PendingReport,
    report: Report,
    config: ReporterConfig,
    recipients: Sequence[str],
    date: dt.datetime,
) -> bytes:
    unique = pending.filename.rsplit("!", 1)[-1].split(".", 1)[0]
    message = tlsrpt_report.email_message(
        report,
        submitter=config.submitter,
        mail_from=config.sender,
        recipients=recipients,
        unique=unique,
        date=date,
        message_id=email.utils.make_msgid(domain=config.submitter),
    )
    return config.dkim.sign(message) if config.dkim is not None else message


@dataclass
class HttpsPoster:
    """POSTs a gzipped report to an `https:` rua (RFC 8460 §5.4): `Content-Type:
    application/tlsrpt+gzip`, WebPKI (system store plus the configured CA file), no redirects,
    one deadline; any 2xx is success. Host names are resolved through mxguard's resolver."""

    dns: DnsResolver
    ca_file: Path | None = None
    timeout: float = POST_TIMEOUT

    async def post(self, uri: str, body: bytes) -> PostOutcome:
        try:
            parts = urlsplit(uri)
            host, port = parts.hostname, parts.port or 443
        except ValueError as exc:
            return PostOutcome(False, f"{uri} is not a usable URL: {exc}", permanent=True)
        if parts.scheme.lower() != "https" or not host:
            return PostOutcome(False, f"{uri} is not an https: URL with a host", permanent=True)
        address = await self._address(host)
        if address is None:
            return PostOutcome(False, f"{host} has no address (resolver: {self.dns.servers})")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return PostOutcome(False, f"{host} resolved to {address!r}, not an IP address")
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        path = parts.path or "/"
        target = f"https://{literal}:{port}{path}" + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": MEDIA_TYPE_GZIP,
            "Host": host if port == 443 else f"{host}:{port}",
            "Connection": "close",
        }
        try:
            ctx = https.client_context(self.ca_file)
            async with asyncio.timeout(self.timeout):
                async with https.strict_client(ctx, self.timeout) as client:
                    request = client.build_request(
                        "POST",
                        target,
                        content=body,
                        headers=headers,
                        extensions={"sni_hostname": host},
                    )
                    # Stream: the answer is the endpoint's to choose, and only its status
                    # matters; read a few KiB for the log, then hang up.
                    response = await client.send(request, stream=True)
                    try:
                        answer = await _read_some(response, MAX_RESPONSE)
                    finally:
                        await response.aclose()
        except TimeoutError:
            return PostOutcome(False, f"POST {uri}: no answer within {self.timeout:g} s")
        except (httpx.HTTPError, OSError) as exc:
            return PostOutcome(False, f"POST {uri}: {type(exc).__name__}: {exc}")
        status = response.status_code
        if 200 <= status < 300:
            return PostOutcome(True, f"POST {uri}: {status}")
        text = answer[:200].decode("utf-8", "replace").strip()
        text = "".join(c if c.isprintable() else " " for c in text)
        detail = f"POST {uri}: HTTP {status} (only 2xx counts, RFC 8460 §5.4)"
        detail += f": {text}" if text else ""
        permanent = 400 <= status < 500 and status not in RETRYABLE_4XX
        return PostOutcome(False, detail, permanent=permanent)

    async def _address(self, host: str) -> str | None:
        try:
            return str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            pass
        for rdtype in ("A", "AAAA"):
            answer = await self.dns.query(host, rdtype)
            if answer.outcome is DnsOutcome.OK and answer.records:
                return str(answer.records[0].address)
            if answer.failed:
                return None
        return None


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """At most about `limit` bytes of the body (as sent: no decompression), then stop."""
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


class Poster(Protocol):
    async def post(self, uri: str, body: bytes) -> PostOutcome: ...


@dataclass
class Reporter:
    store: Store
    config: ReporterConfig
    mail: MailSender | None = None
    poster: Poster | None = None
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    rng: random.Random = field(default_factory=random.SystemRandom)

    # --- 1. aggregation ----------------------------------------------------------------------

    async def build(self, day: dt.date, *, store: bool = True) -> list[Built]:
        """The day's reports over the results no report covers yet, one per policy domain that
        has a `rua`; stored unless told not to (a dry run). A day built before gets a further
        report only for the results recorded since. Results of domains without a `rua` stay
        in the store, unreported."""
        start, end = tlsrpt_report.day_range(day)
        results = await self.store.results_between(
            start, end, unreported_only=True, unbuilt_only=True
        )
        by_domain: dict[str, list[SessionResult]] = {}
        for r in results:
            if not r.is_report:  # RFC 8460 §5.3
                by_domain.setdefault(r.policy_domain, []).append(r)
        now = self.clock()
        built = []
        for domain, rs in sorted(by_domain.items()):
            # The record at the most recent session is the one the domain wants now.
            rua = next((r.rua for r in reversed(rs) if r.rua), ())
            if not rua:
                continue
            unique = secrets.token_hex(8)
            [report] = tlsrpt_report.aggregate(
                rs,
                day=day,
                organization_name=self.config.organization_name,
                contact_info=self.config.contact_info,
                unique={domain: unique},
            )
            pending = PendingReport(
                report_id=report.report_id,
                policy_domain=domain,
                start=start,
                filename=tlsrpt_report.filename(report, self.config.submitter, unique),
                body=report.to_gzip(),
                rua=rua,
                result_ids=tuple(r.id for r in rs if r.id is not None),
                created_at=now,
                next_attempt_at=now
                + dt.timedelta(seconds=self.rng.uniform(0, self.config.delay_window)),
            )
            stored = await self.store.add_report(pending) if store else False
            if store and not stored:
                log.info("another reporter built the results of %s on %s first", domain, day)
            built.append(Built(report, pending, stored))
        return built

    def last_complete_day(self, now: dt.datetime) -> dt.date:
        """The latest UTC day that ended at least `grace` seconds before `now`."""
        return (now - dt.timedelta(seconds=self.config.grace)).date() - dt.timedelta(days=1)

    async def build_due(self) -> list[Built]:
        """Build every complete day that has results no report covers yet, oldest first, from
        at most `backfill_days` back up to `last_complete_day` (downtime over midnight skips
        nothing; results recorded late get a further report for their day)."""
        last = self.last_complete_day(self.clock())
        first = last - dt.timedelta(days=max(1, self.config.backfill_days) - 1)
        since, end = tlsrpt_report.day_range(first)[0], tlsrpt_report.day_range(last)[1]
        built: list[Built] = []
        while since < end:
            oldest = await self.store.oldest_unbuilt(since, end)
            if oldest is None:
                break
            day = oldest.date()
            built += await self.build(day)
            since = tlsrpt_report.day_range(day)[1]  # on to the next day, whatever happened
        return built

    # --- 2. delivery -------------------------------------------------------------------------

    async def deliver_due(
        self, *, force: bool = False, only: Collection[str] | None = None
    ) -> list[Delivery]:
        """Deliver every pending report whose time has come (all of them with `force`; only
        the report-ids in `only` if given), `concurrency` at a time. A report another
        reporter on the same store has claimed is left to it."""
        now = self.clock()
        due = [
            p
            for p in await self.store.reports(pending_only=True)
            if (force or p.next_attempt_at <= now) and (only is None or p.report_id in only)
        ]
        done: dict[int, Delivery] = {}
        queue = iter(enumerate(due))

        async def worker() -> None:
            for n, pending in queue:  # one shared iterator: each report goes to one worker
                try:
                    claimed = await self.store.claim_report(
                        pending.report_id,
                        now=self.clock(),
                        until=self.clock() + dt.timedelta(seconds=self.config.lease),
                        force=force,
                    )
                    if claimed is not None:
                        done[n] = await self.deliver(claimed)
                except Exception as exc:  # one report's trouble must not stop the others
                    log.error("delivering TLS report %s failed: %s", pending.report_id, exc)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(len(due), max(1, self.config.concurrency))):
                tg.create_task(worker())
        return [done[n] for n in sorted(done)]

    async def deliver(self, pending: PendingReport) -> Delivery:
        """One delivery attempt of a report (claimed by the caller): each rua in turn until
        one accepts it; then record success, a retry, or giving up."""
        attempts: list[Attempt] = []
        try:
            report = tlsrpt_report.parse_report(pending.body)
        except ReportError as exc:
            attempts.append(Attempt("", False, f"the stored report is unreadable: {exc}", True))
        else:
            # Finish well inside the lease, so that no other reporter takes it meanwhile.
            budget = self.config.lease * 0.8
            try:
                async with asyncio.timeout(budget):
                    for uri in pending.rua:
                        attempt = await self._send(pending, report, uri)
                        attempts.append(attempt)
                        log.info("TLS report %s to %s: %s", pending.report_id, uri, attempt.detail)
                        if attempt.ok:
                            await self.store.report_delivered(pending.report_id, uri, self.clock())
                            return Delivery(
                                pending.report_id, pending.policy_domain, uri, tuple(attempts), None
                            )
            except TimeoutError:
                attempts.append(Attempt("", False, f"no rua accepted it within {budget:g} s"))
        now = self.clock()
        error = "; ".join(a.detail for a in attempts)[:MAX_ERROR] or "no rua to deliver to"
        age = (now - pending.created_at).total_seconds()
        if all(a.permanent for a in attempts):  # also: no rua at all
            reason = f"dropped, every rua refused it for good: {error}"
        elif age >= self.config.give_up_after:
            reason = f"dropped, undeliverable for {age / 86400:.1f} days: {error}"
        else:
            delay = min(
                self.config.retry_max, self.config.retry_base * 2 ** min(pending.attempts, 30)
            )
            # Jitter: reports that failed together must not all retry together.
            next_at = now + dt.timedelta(seconds=delay * self.rng.uniform(0.5, 1.5))
            await self.store.report_failed(pending.report_id, error, next_at)
            return Delivery(
                pending.report_id, pending.policy_domain, None, tuple(attempts), next_at
            )
        log.warning("TLS report %s %s", pending.report_id, reason)
        await self.store.report_dropped(pending.report_id, reason[:MAX_ERROR], now)
        return Delivery(
            pending.report_id, pending.policy_domain, None, tuple(attempts), None, dropped=True
        )

    async def _send(self, pending: PendingReport, report: Report, uri: str) -> Attempt:
        scheme = uri.partition(":")[0].lower()
        if scheme == "mailto":
            address = mailto_address(uri)
            if not address:
                return Attempt(uri, False, "not an RFC 5321 address (RFC 8460 §3)", True)
            if self.mail is None:
                return Attempt(uri, False, "no mail sender configured")
            data = build_email(pending, report, self.config, [address], self.clock())
            try:
                result = await self.mail.deliver(self.config.sender, [address], data)
            except Exception as exc:  # one bad rua must not stop the others
                return Attempt(uri, False, f"mail delivery failed: {exc}")
            status = str(getattr(result, "status", ""))
            if status == DeliveryStatus.DELIVERED:
                return Attempt(uri, True, f"delivered to {address}")
            # FAILED is a permanent refusal (5xx, null MX); DEFERRED may pass later.
            failed = status == DeliveryStatus.FAILED
            return Attempt(uri, False, f"mail to {address} {status or 'not delivered'}", failed)
        if scheme == "https":
            if self.poster is None:
                return Attempt(uri, False, "no HTTPS poster configured")
            outcome = await self.poster.post(uri, pending.body)
            return Attempt(uri, outcome.ok, outcome.detail, outcome.permanent and not outcome.ok)
        return Attempt(
            uri, False, f"scheme {scheme!r} is not mailto: or https: (RFC 8460 §3)", True
        )

    # --- 3. the long-running loop --------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, poll: float = 60.0) -> None:
        """Build every complete day not built yet (`build_due`) and deliver what is due, until
        `stop` is set. Safe to restart at any time, and to run on several nodes sharing one
        store: all state is in the store."""
        while not stop.is_set():
            try:
                await self.build_due()
            except Exception as exc:  # the loop must survive a store hiccup
                log.error("building TLS reports failed: %s", exc)
            try:
                await self.deliver_due()
            except Exception as exc:
                log.error("delivering TLS reports failed: %s", exc)
            try:
                wait = await self._seconds_until_next(poll)
            except Exception as exc:
                log.error("reading pending TLS reports failed: %s", exc)
                wait = poll
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def _seconds_until_next(self, poll: float) -> float:
        now = self.clock()
        grace = dt.timedelta(seconds=self.config.grace)
        # The next moment a day becomes complete: a midnight plus the grace period.
        shifted = now - grace
        next_day = dt.datetime.combine(
            shifted.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC
        )
        wait = min(poll, (next_day + grace - now).total_seconds() + 1)
        pending = await self.store.reports(pending_only=True)
        if pending:
            wait = min(wait, max(0.0, (pending[0].next_attempt_at - now).total_seconds()))
        return max(wait, 0.05)


def config_from(settings: Settings) -> ReporterConfig:
    """The reporter's configuration from mxguard's settings (the `[tlsrpt]` table); reads the
    DKIM key when one is configured (ConfigError when it cannot sign)."""
    t = settings.tlsrpt
    dkim = None
    if t.dkim_key is not None and t.dkim_selector is not None:
        dkim = DkimSigner.from_file(
            t.dkim_key, selector=t.dkim_selector, domain=settings.report_dkim_domain
        )
    return ReporterConfig(
        organization_name=settings.report_organization,
        contact_info=settings.report_contact,
        submitter=settings.report_submitter,
        sender=settings.report_sender,
        dkim=dkim,
        delay_window=t.delay_window,
    )


def reporter_for(e: Engine) -> Reporter:
    """A reporter on an engine: its store, its resolver and mxguard's own report sender."""
    return Reporter(
        e.store,
        config_from(e.settings),
        mail=e.sender(is_report=True),
        poster=HttpsPoster(e.dns, e.settings.ca_file),
    )
