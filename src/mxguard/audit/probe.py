"""The audit's own probes: SMTP sessions to MX addresses and reachability of TLS-RPT ``rua``s.

One ``Prober`` serves a whole run. Hosting is concentrated (one MX host serves thousands of
domains), so every probe is kept for the run, keyed by what it depends on (the address and
the TLS server name; the ``rua`` URI), and concurrent askers share one probe. At most
``per_address`` connections are open to any one address at a time. A probe never sends mail:
connect, EHLO, STARTTLS, EHLO, QUIT (for a ``mailto:`` rua: MAIL FROM:<> and RCPT TO, then
QUIT, RFC 5321 §3.3 — a server answers RCPT before any message exists).
"""

from __future__ import annotations

import asyncio
import functools
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx

from mxguard.adapters import https
from mxguard.adapters.dns import DnsOutcome, DnsResolver
from mxguard.adapters.smtp import SmtpClient, SmtpError, SmtpErrorKind
from mxguard.audit.model import RuaCheck, SmtpProbe
from mxguard.protocol import names, tlsrpt

T = TypeVar("T")


class Prober:
    def __init__(
        self,
        dns: DnsResolver,
        *,
        helo_name: str,
        smtp_port: int = 25,
        https_port: int = 443,
        ca_file: Path | None = None,
        timeout: float = 30.0,
        per_address: int = 2,
    ) -> None:
        if per_address < 1:
            raise ValueError("per_address must be at least 1")
        self.dns = dns
        self.helo_name = helo_name
        self.smtp_port = smtp_port
        self.https_port = https_port
        self.ca_file = ca_file
        self.timeout = timeout
        self.per_address = per_address
        self._probes: dict[tuple[str, str], asyncio.Task[SmtpProbe]] = {}
        self._rua: dict[str, asyncio.Task[RuaCheck]] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}
        self.connections = 0  # SMTP and HTTPS connections opened (for progress and benchmarks)
        self.smtp_connections = 0  # of which SMTP
        self.most_open: dict[str, int] = {}  # the most connections open at once, per address
        self._open: dict[str, int] = {}

    # --- limits ------------------------------------------------------------------------------

    async def _limited(self, address: str, work: Callable[[], Awaitable[T]]) -> T:
        limit = self._limits.setdefault(address, asyncio.Semaphore(self.per_address))
        async with limit:
            self.connections += 1
            self._open[address] = self._open.get(address, 0) + 1
            self.most_open[address] = max(self.most_open.get(address, 0), self._open[address])
            try:
                return await work()
            finally:
                self._open[address] -= 1

    # --- SMTP ----------------------------------------------------------------------------------

    async def smtp(self, address: str, server_name: str) -> SmtpProbe:
        """The probe of ``address`` with SNI ``server_name``: once per run, shared."""
        key = (address, server_name)
        task = self._probes.get(key)
        if task is None:
            task = asyncio.ensure_future(
                self._limited(address, lambda: self._smtp(address, server_name))
            )
            self._probes[key] = task
        return await asyncio.shield(task)

    async def _smtp(self, address: str, server_name: str) -> SmtpProbe:
        start = time.monotonic()
        self.smtp_connections += 1
        client = SmtpClient()
        probe = SmtpProbe(address, server_name)
        try:
            try:
                banner = await client.connect(
                    address, self.smtp_port, helo_name=self.helo_name, timeout=self.timeout
                )
            except SmtpError as exc:
                return _probe_failed(probe, exc, start, connected=exc.step != "connect")
            probe = SmtpProbe(
                address, server_name, connected=True, banner=str(banner),
                starttls=client.starttls_offered,
            )  # fmt: skip
            if not client.starttls_offered:
                await client.quit()
                return _done(probe, start)
            try:
                info = await client.starttls(server_name)
            except SmtpError as exc:
                return _probe_failed(probe, exc, start, connected=True)
            probe = SmtpProbe(
                address, server_name, connected=True, banner=probe.banner, starttls=True,
                tls=info,
            )  # fmt: skip
            await client.quit()
            return _done(probe, start)
        except SmtpError as exc:  # after TLS (the second EHLO, QUIT): the probe stands
            if probe.tls is not None:
                return _done(probe, start)
            return _probe_failed(probe, exc, start, connected=probe.connected)
        finally:
            await client.close()

    # --- TLS-RPT rua ----------------------------------------------------------------------------

    async def rua(self, uri: str) -> RuaCheck:
        """Whether ``uri`` can receive reports, as far as can be seen without sending one."""
        task = self._rua.get(uri)
        if task is None:
            task = asyncio.ensure_future(self._rua_check(uri))
            self._rua[uri] = task
        return await asyncio.shield(task)

    async def _rua_check(self, uri: str) -> RuaCheck:
        try:
            tlsrpt.check_uri(uri)
            mailbox = tlsrpt.mailbox_of(uri) if uri.lower().startswith("mailto:") else None
        except tlsrpt.TlsRptRecordError as exc:
            return RuaCheck(uri, False, str(exc))
        if mailbox is not None:
            return await self._mailbox(uri, mailbox)
        return await self._https_rua(uri)

    async def _mailbox(self, uri: str, mailbox: str) -> RuaCheck:
        _, _, domain = mailbox.rpartition("@")
        try:
            domain = names.normalise_host(domain)
        except ValueError as exc:
            return RuaCheck(uri, False, f"the mailbox's domain is not valid: {exc}")
        answer = await self.dns.query(domain, "MX")
        if answer.failed:
            return RuaCheck(uri, False, f"the MX lookup of {domain} failed: {answer.detail}")
        if answer.outcome is DnsOutcome.NXDOMAIN:
            return RuaCheck(uri, False, f"{domain} does not exist")
        hosts = sorted((int(r.preference), str(r.exchange).rstrip(".")) for r in answer.records)
        if any(h == "" for _, h in hosts):
            return RuaCheck(uri, False, f"{domain} publishes a null MX: it accepts no mail")
        targets = [h for _, h in hosts] or [domain]
        problems: list[str] = []
        for host in targets[:3]:
            a = await self.dns.query(host, "A")
            addresses = [str(r.address) for r in a.records] if a.outcome is DnsOutcome.OK else []
            if not addresses:
                problems.append(f"{host} has no address")
                continue
            ok, detail = await self._limited(
                addresses[0], functools.partial(self._rcpt, addresses[0], host, mailbox)
            )
            if ok:
                return RuaCheck(uri, True, detail)
            problems.append(detail)
        return RuaCheck(uri, False, "; ".join(problems) or f"{domain} has no MX host")

    async def _rcpt(self, ip: str, host: str, mailbox: str) -> tuple[bool, str]:
        self.smtp_connections += 1
        client = SmtpClient()
        try:
            await client.connect(ip, self.smtp_port, helo_name=self.helo_name, timeout=self.timeout)
            if client.starttls_offered:
                await client.starttls(host)
            await client.mail_from("")
            reply = await client.rcpt_to(mailbox)
            await client.quit()
        except SmtpError as exc:
            return False, f"{host} [{ip}]: {exc}"
        finally:
            await client.close()
        if 200 <= reply.code < 300:
            return True, f"{host} [{ip}] accepts RCPT TO:<{mailbox}> ({reply.code})"
        return False, f"{host} [{ip}] refuses RCPT TO:<{mailbox}>: {reply}"

    async def _https_rua(self, uri: str) -> RuaCheck:
        parsed = urllib.parse.urlsplit(uri)
        host = parsed.hostname or ""
        answer = await self.dns.query(host, "A")
        if answer.outcome is not DnsOutcome.OK:
            return RuaCheck(uri, False, f"{host} has no address: {answer.detail}")
        address = str(answer.records[0].address)
        port = parsed.port or self.https_port
        path = parsed.path or "/"

        async def head() -> RuaCheck:
            try:
                ctx = https.client_context(self.ca_file)
                async with https.strict_client(ctx, self.timeout) as client:
                    response = await client.request(
                        "HEAD", f"https://{address}:{port}{path}",
                        headers={"Host": host}, extensions={"sni_hostname": host},
                    )  # fmt: skip
            except (httpx.HTTPError, OSError) as exc:
                return RuaCheck(uri, False, f"no HTTPS response from {host}: {exc}")
            if response.status_code >= 500:
                return RuaCheck(uri, False, f"{host} answers {response.status_code}")
            return RuaCheck(
                uri, True, f"{host} answers HTTPS with a valid certificate "
                f"({response.status_code} to HEAD)",
            )  # fmt: skip

        return await self._limited(address, head)


def _done(probe: SmtpProbe, start: float) -> SmtpProbe:
    return SmtpProbe(
        probe.address, probe.server_name, probe.connected, probe.banner, probe.starttls,
        probe.tls, probe.error, probe.error_step, probe.error_result_type,
        time.monotonic() - start,
    )  # fmt: skip


def _probe_failed(probe: SmtpProbe, exc: SmtpError, start: float, *, connected: bool) -> SmtpProbe:
    kind = "timed out" if exc.kind is SmtpErrorKind.TIMEOUT else ""
    return SmtpProbe(
        probe.address, probe.server_name, connected, probe.banner, probe.starttls, None,
        f"{exc}" + (f" ({kind})" if kind and "timed out" not in str(exc) else ""),
        exc.step, exc.result_type, time.monotonic() - start,
    )  # fmt: skip
