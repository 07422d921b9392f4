"""The TLS-RPT report sender: daily aggregation, delivery to every `rua`, retries (RFC 8460).

The work is durable and lives in the store, not in memory:

1. `build(day)` aggregates the day's unreported session results per policy domain
   (protocol/tlsrpt_report.py) and stores each report as a `PendingReport`, with a first
   delivery time spread at random over the configured delay window (§4.1 asks senders to
   spread the load). A day is built once per domain (the store refuses a second report).
2. `deliver_due(now)` tries every report whose time has come: each `rua` in turn, `mailto:`
   through mxguard's own `Sender(is_report=True)` (§5.3; those sessions are then left out of
   the next report) and `https:` as a POST of the gzip body (§5.4). When some `rua` accepted
   it, the report is marked delivered and its results reported, in one transaction; when none
   did, it is tried again later with exponential back-off and jitter (§5: keep the data
   until accepted). A crash between the two steps loses nothing: the report, or the results
   it covers, are still in the store.
3. `run(stop)` does both forever: after each UTC midnight it builds the previous day, and it
   delivers whatever is due, until `stop` is set.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import httpx

from mxguard.adapters import https
from mxguard.adapters.dns import DnsResolver, Outcome
from mxguard.adapters.store import PendingReport, SessionResult, Store
from mxguard.config import Settings
from mxguard.engine.context import Engine
from mxguard.protocol import tlsrpt_report
from mxguard.protocol.tlsrpt_report import MEDIA_TYPE_GZIP, Report

log = logging.getLogger(__name__)

RETRY_BASE = 300.0  # seconds before the first retry
RETRY_MAX = 6 * 3600.0  # back-off cap
POST_TIMEOUT = 30.0
MAX_ERROR = 2000  # characters of the last delivery error kept in the store


class MailSender(Protocol):
    """What delivers a report e-mail: mxguard.engine.deliver.Sender(is_report=True)."""

    async def deliver(self, mail_from: str, recipients: Sequence[str], data: bytes) -> object:
        """Returns a DeliveryResult (its `.status` is "delivered" on success)."""
        ...


@dataclass(frozen=True, slots=True)
class ReporterConfig:
    organization_name: str
    contact_info: str
    submitter: str  # RFC 8460 §5.3 TLS-Report-Submitter
    sender: str  # MAIL FROM and From: of report e-mails
    delay_window: float = 4 * 3600.0  # first delivery at random within this after building
    retry_base: float = RETRY_BASE
    retry_max: float = RETRY_MAX


@dataclass(frozen=True, slots=True)
class Built:
    """A report built for one policy domain and day, with what travels."""

    report: Report
    pending: PendingReport
    stored: bool  # False: a report for this domain and day already existed (nothing stored)

    def email(self, config: ReporterConfig, date: dt.datetime) -> bytes:
        mailto = [a for a in (mailto_address(u) for u in self.pending.rua) if a]
        return build_email(self.pending, self.report, config, mailto, date)


@dataclass(frozen=True, slots=True)
class Attempt:
    uri: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Delivery:
    report_id: str
    policy_domain: str
    delivered_to: str | None  # the accepting rua, or None when every one failed
    attempts: tuple[Attempt, ...]
    next_attempt_at: dt.datetime | None


def mailto_address(uri: str) -> str | None:
    scheme, _, rest = uri.partition(":")
    if scheme.lower() != "mailto":
        return None
    return unquote(rest.partition("?")[0]) or None


def build_email(
    pending: PendingReport,
    report: Report,
    config: ReporterConfig,
    recipients: Sequence[str],
    date: dt.datetime,
) -> bytes:
    unique = pending.filename.rsplit("!", 1)[-1].split(".", 1)[0]
    return tlsrpt_report.email_message(
        report,
        submitter=config.submitter,
        mail_from=config.sender,
        recipients=recipients,
        unique=unique,
        date=date,
        message_id=email.utils.make_msgid(domain=config.submitter),
    )


@dataclass
class HttpsPoster:
    """POSTs a gzipped report to an `https:` rua (RFC 8460 §5.4): `Content-Type:
    application/tlsrpt+gzip`, WebPKI (system store plus the configured CA file), no redirects,
    one deadline; any 2xx is success. Host names are resolved through mxguard's resolver."""

    dns: DnsResolver
    ca_file: Path | None = None
    timeout: float = POST_TIMEOUT

    async def post(self, uri: str, body: bytes) -> tuple[bool, str]:
        try:
            parts = urlsplit(uri)
            host, port = parts.hostname, parts.port or 443
        except ValueError as exc:
            return False, f"{uri} is not a usable URL: {exc}"
        if parts.scheme.lower() != "https" or not host:
            return False, f"{uri} is not an https: URL with a host"
        address = await self._address(host)
        if address is None:
            return False, f"{host} has no address (resolver: {self.dns.servers})"
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False, f"{host} resolved to {address!r}, not an IP address"
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
                async with httpx.AsyncClient(
                    verify=ctx,
                    follow_redirects=False,
                    trust_env=False,
                    timeout=httpx.Timeout(self.timeout),
                ) as client:
                    request = client.build_request(
                        "POST",
                        target,
                        content=body,
                        headers=headers,
                        extensions={"sni_hostname": host},
                    )
                    response = await client.send(request)
        except TimeoutError:
            return False, f"POST {uri}: no answer within {self.timeout:g} s"
        except (httpx.HTTPError, OSError) as exc:
            return False, f"POST {uri}: {type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return True, f"POST {uri}: {response.status_code}"
        return False, f"POST {uri}: HTTP {response.status_code} (only 2xx counts, RFC 8460 §5.4)"

    async def _address(self, host: str) -> str | None:
        try:
            return str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            pass
        for rdtype in ("A", "AAAA"):
            answer = await self.dns.query(host, rdtype)
            if answer.outcome is Outcome.OK and answer.records:
                return str(answer.records[0].address)
            if answer.failed:
                return None
        return None


class Poster(Protocol):
    async def post(self, uri: str, body: bytes) -> tuple[bool, str]: ...


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
        """The day's reports, one per policy domain that has a `rua`; stored unless told not
        to (a dry run). Results of domains without a `rua` stay in the store, unreported."""
        start, end = tlsrpt_report.day_range(day)
        results = await self.store.results_between(start, end, unreported_only=True)
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
                log.info("a report for %s on %s exists already; not building another", domain, day)
            built.append(Built(report, pending, stored))
        return built

    # --- 2. delivery -------------------------------------------------------------------------

    async def deliver_due(self, *, force: bool = False) -> list[Delivery]:
        """Try every undelivered report whose time has come (all of them with `force`)."""
        now = self.clock()
        out = []
        for pending in await self.store.reports(pending_only=True):
            if force or pending.next_attempt_at <= now:
                out.append(await self.deliver(pending))
        return out

    async def deliver(self, pending: PendingReport) -> Delivery:
        report = tlsrpt_report.parse_report(pending.body)
        attempts: list[Attempt] = []
        for uri in pending.rua:
            attempt = await self._send(pending, report, uri)
            attempts.append(attempt)
            log.info("TLS report %s to %s: %s", pending.report_id, uri, attempt.detail)
            if attempt.ok:
                await self.store.report_delivered(pending.report_id, uri, self.clock())
                return Delivery(
                    pending.report_id, pending.policy_domain, uri, tuple(attempts), None
                )
        delay = min(self.config.retry_max, self.config.retry_base * 2 ** min(pending.attempts, 30))
        # Jitter: reports that failed together must not all retry together.
        next_at = self.clock() + dt.timedelta(seconds=delay * self.rng.uniform(0.5, 1.5))
        error = "; ".join(a.detail for a in attempts)[:MAX_ERROR] or "no rua to deliver to"
        await self.store.report_failed(pending.report_id, error, next_at)
        return Delivery(pending.report_id, pending.policy_domain, None, tuple(attempts), next_at)

    async def _send(self, pending: PendingReport, report: Report, uri: str) -> Attempt:
        scheme = uri.partition(":")[0].lower()
        if scheme == "mailto":
            address = mailto_address(uri)
            if self.mail is None or not address:
                return Attempt(uri, False, "no mail sender configured" if address else "bad URI")
            data = build_email(pending, report, self.config, [address], self.clock())
            try:
                result = await self.mail.deliver(self.config.sender, [address], data)
            except Exception as exc:  # one bad rua must not stop the others
                return Attempt(uri, False, f"mail delivery failed: {exc}")
            status = str(getattr(result, "status", ""))
            if status == "delivered":
                return Attempt(uri, True, f"delivered to {address}")
            return Attempt(uri, False, f"mail to {address} {status or 'not delivered'}")
        if scheme == "https":
            if self.poster is None:
                return Attempt(uri, False, "no HTTPS poster configured")
            ok, detail = await self.poster.post(uri, pending.body)
            return Attempt(uri, ok, detail)
        return Attempt(uri, False, f"scheme {scheme!r} is not mailto: or https: (RFC 8460 §3)")

    # --- 3. the long-running loop --------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, poll: float = 60.0) -> None:
        """Build yesterday's reports after each UTC midnight and deliver what is due, until
        `stop` is set. Safe to restart at any time: all state is in the store."""
        built_day: dt.date | None = None
        while not stop.is_set():
            yesterday = self.clock().date() - dt.timedelta(days=1)
            if built_day != yesterday:
                try:
                    await self.build(yesterday)
                    built_day = yesterday
                except Exception as exc:  # the loop must survive a store hiccup
                    log.error("building the reports of %s failed: %s", yesterday, exc)
            try:
                await self.deliver_due()
            except Exception as exc:
                log.error("delivering TLS reports failed: %s", exc)
            wait = await self._seconds_until_next(poll)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def _seconds_until_next(self, poll: float) -> float:
        now = self.clock()
        midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
        wait = min(poll, (midnight - now).total_seconds() + 1)
        pending = await self.store.reports(pending_only=True)
        if pending:
            wait = min(wait, max(0.0, (pending[0].next_attempt_at - now).total_seconds()))
        return max(wait, 0.05)


def config_from(settings: Settings) -> ReporterConfig:
    """The reporter's configuration from mxguard's settings (the `[tlsrpt]` table)."""
    return ReporterConfig(
        organization_name=settings.report_organization,
        contact_info=settings.report_contact,
        submitter=settings.report_submitter,
        sender=settings.report_sender,
        delay_window=settings.tlsrpt.delay_window,
    )


def reporter_for(e: Engine) -> Reporter:
    """A reporter on an engine: its store, its resolver and mxguard's own report sender."""
    return Reporter(
        e.store,
        config_from(e.settings),
        mail=e.sender(is_report=True),
        poster=HttpsPoster(e.dns, e.settings.ca_file),
    )
