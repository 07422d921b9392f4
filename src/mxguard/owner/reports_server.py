"""`mxguard serve reports`: receive TLS reports over HTTPS and show them (RFC 8460 §5.4).

A domain whose `_smtp._tls` record has an `https:` rua gets its reports POSTed there once a
day by every sender that delivers to it (RFC 8460 §3, §5.4). This is that endpoint, and a
read-only dashboard of what arrived, in one process over one store (`ReportInbox`, and
`CheckLog` for the latest `mxguard check` verdict beside each domain). docs/reports.md is the
operator's guide and the security model.

The report endpoint, ``POST /tlsrpt``:

- takes ``application/tlsrpt+gzip`` and ``application/tlsrpt+json`` (RFC 8460 §5.2, §5.4; also
  the generic gzip, JSON and octet-stream types senders use by mistake; what the body is
  decides, as in `tlsrpt_ingest.decode`), parses it with the one tolerant, bounded reader
  (`protocol/tlsrpt_ingest.py`) and stores it once by its dedupe key;
- answers ``201 Created`` for a report stored, ``200 OK`` for one already stored (a resend,
  RFC 8460 §5.5: still a success, so the sender stops retrying), both a "successful response"
  in the sense of RFC 8460 §5.4; a refusal is a 4xx that says why, and changes nothing:
  400 (not a report: not gzip or JSON, truncated, bad CRC, not an RFC 8460 §4.4 report),
  403 (a report for a domain this receiver does not collect, with ``--domain``), 404, 405,
  408 (the body did not arrive in time), 413 (body, or what it decompresses to, too big),
  415 (a media type that is no report), 429 (per-address rate or concurrency); 503 with
  ``Retry-After`` when the server is saturated or the store fails (the sender retries);
- never lets the world hold more than it is given: the connection gate (`web_guard`) counts
  connections in all and per address before the TLS handshake, every connection has a head
  deadline and a lifetime, requests are rate-limited per address, bodies are capped on the
  wire, in total memory and after decompression, parsing runs on two worker threads with a
  bounded queue, and store writes are bounded the same way, so a flood of reports or
  connections leaves the dashboard, the other endpoints and the store responsive. Every
  refusal is counted in ``/metrics``.

The dashboard (its own listener, loopback by default) is `Dashboard` over the pages of
`owner/dashboard.py`: per domain and UTC day the successful and failed sessions, failures by
result type (explained, with the fix), by sending organisation and by receiving MX host, the
reports of a day with their failure details, and the latest audit verdict. Every response
carries a strict Content-Security-Policy (no inline script or style), ``nosniff``,
``Cache-Control: no-store``, ``Referrer-Policy: no-referrer`` and ``frame-ancestors 'none'``.
Listening on anything but loopback needs authentication (a bearer token, or an HTTP basic
user with a scrypt hash); without authentication the Host header must be an address or
``localhost`` (or a configured name), so that a web page cannot reach the dashboard by DNS
rebinding. ``/healthz`` answers without credentials, ``/metrics`` (Prometheus text) with.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import math
import resource
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn

from mxguard.adapters.store import (
    CheckLog,
    ReceivedRecord,
    ReportInbox,
    ReportSource,
    StoreError,
)
from mxguard.config import reject_unknown_keys
from mxguard.owner import dashboard as pages
from mxguard.owner.mta_sts_server import (
    CertificateError,
    CertificatePair,
    Certificates,
    Listen,
    ListenError,
    QuietUvicorn,
    bind_all,
    parse_listen,
    socket_address,
)
from mxguard.owner.web_guard import (
    AuthConfigError,
    Authenticator,
    Counts,
    Gate,
    GateLimits,
    PasswordHash,
    TokenBuckets,
    address_key,
    guarded_protocol,
    parse_password_hash,
    read_token,
)
from mxguard.protocol import names, tlsrpt_ingest
from mxguard.protocol.tlsrpt_report import MEDIA_TYPE_GZIP, MEDIA_TYPE_JSON

log = logging.getLogger(__name__)

REPORT_PATH = "/tlsrpt"
DEFAULT_PORT = 443
DASHBOARD_PORT = 8025
MiB = 1024 * 1024

# What a report body may be labelled: the RFC 8460 §5.4 types, and the generic ones senders
# use instead; no label at all counts as octet-stream (RFC 9110 §8.3).
ACCEPTED_TYPES = frozenset(
    {
        MEDIA_TYPE_GZIP,
        MEDIA_TYPE_JSON,
        "application/gzip",
        "application/x-gzip",
        "application/json",
        "application/octet-stream",
        "",
    }
)
ACCEPTED_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip"})

# The dashboard's Content-Security-Policy: its own script and style files only, nothing
# inline, no plugins, no framing, no base-URL tricks, no string-to-script sinks.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'none'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
)


class ReportsConfigError(ValueError):
    """The settings of `serve reports` cannot be used; the message says which and why."""


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of `serve reports` (docs/reports.md, "Limits")."""

    max_body: int = 1 * MiB  # bytes of a POST body on the wire, gzip or JSON
    max_decompressed: int = tlsrpt_ingest.MAX_JSON_SIZE  # bytes of JSON a body may inflate to
    request_timeout: float = 10.0  # seconds for a request head, and again for its body
    connection_lifetime: float = 60.0  # seconds a connection lives at most
    concurrency: int = 1024  # report requests in flight at once
    evict_after: float = 0.5  # seconds of body reading after which a request may be cut off
    per_address: int = 16  # connections, and report requests in flight, per client address
    rate: float = 0.2  # report requests per second per client address, sustained
    burst: int = 60  # report requests one client address may make at once
    max_connections: int = 4096  # report listener connections open at once
    body_memory: int = 32 * MiB  # bytes of request bodies held at once, all requests together
    parse_workers: int = 2  # threads that decompress and parse
    parse_queue: int = 256  # bodies waiting for a parse thread
    store_writers: int = 4  # store writes at once
    store_queue: int = 256  # reports waiting for the store
    store_timeout: float = 30.0  # seconds a store write may take
    dashboard_connections: int = 256  # dashboard connections open at once
    dashboard_per_address: int = 32
    dashboard_reads: int = 4  # store reads for pages at once
    listed_reports: int = 50  # reports a day's page lists at most (each with its body)

    def __post_init__(self) -> None:
        positive = (
            "max_body", "max_decompressed", "concurrency", "per_address", "burst",
            "max_connections", "body_memory", "parse_workers", "store_writers",
            "dashboard_connections", "dashboard_per_address", "dashboard_reads",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ReportsConfigError(f"limit {name} must be at least 1")
        if not self.rate > 0 or not math.isfinite(self.rate):
            raise ReportsConfigError("the rate must be a positive number of requests per second")
        if self.max_body > self.body_memory:
            raise ReportsConfigError("max_body cannot exceed body_memory")

    def report_gate(self) -> GateLimits:
        return GateLimits(
            max_connections=self.max_connections,
            per_address=self.per_address,
            head_timeout=self.request_timeout,
            lifetime=self.connection_lifetime,
            handshake_timeout=self.request_timeout,
        )

    def dashboard_gate(self) -> GateLimits:
        return GateLimits(
            max_connections=self.dashboard_connections,
            per_address=self.dashboard_per_address,
            head_timeout=self.request_timeout,
            lifetime=self.connection_lifetime,
            handshake_timeout=self.request_timeout,
        )


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ReportsConfig:
    """Everything `Server` needs, checked (`config_from` builds it from flags and the
    ``[reports]`` table of the config file)."""

    listen: tuple[Listen, ...]
    certificates: tuple[CertificatePair, ...] = ()
    plain_http: bool = False  # the report endpoint without TLS (behind a reverse proxy)
    dashboard_listen: tuple[Listen, ...] = ()  # empty: no dashboard
    token_file: Path | None = None
    user: str | None = None
    password_hash: PasswordHash | None = None
    domains: frozenset[str] = frozenset()  # empty: reports for any domain are taken
    trusted_proxies: frozenset[str] = frozenset()
    dashboard_hosts: frozenset[str] = frozenset()  # Host names accepted without auth
    limits: Limits = field(default_factory=Limits)

    @property
    def dashboard_exposed(self) -> bool:
        """Whether the dashboard listens on anything but loopback."""
        return any(not _is_loopback(x.host) for x in self.dashboard_listen)

    @property
    def has_auth(self) -> bool:
        return self.token_file is not None or self.password_hash is not None

    def check(self) -> None:
        """ReportsConfigError when the combination is unsafe or contradictory."""
        if not self.listen:
            raise ReportsConfigError("give at least one --listen address for reports")
        if self.plain_http and self.certificates:
            raise ReportsConfigError(
                "--plain-http and --cert contradict each other: serve HTTPS with --cert/--key, "
                "or plain HTTP behind a reverse proxy that terminates TLS with --plain-http"
            )
        if not self.plain_http and not self.certificates:
            raise ReportsConfigError(
                "an https rua needs TLS: give --cert FILE --key FILE, or --plain-http when a "
                "reverse proxy in front terminates TLS (docs/reports.md)"
            )
        if self.dashboard_exposed and not self.has_auth:
            where = ", ".join(str(x) for x in self.dashboard_listen)
            raise ReportsConfigError(
                f"the dashboard would listen on {where}, which is not loopback, without "
                "authentication: give --token-file FILE, or user and password_hash in "
                "[reports] (mxguard serve reports --hash-password prints one), or listen on "
                "127.0.0.1 behind an authenticating reverse proxy (docs/reports.md)"
            )


_TABLE_KEYS = {
    "listen": 'an address or a list of them, e.g. "0.0.0.0:443"',
    "dashboard_listen": 'an address or a list of them, e.g. "127.0.0.1:8025"',
    "token_file": "the path of a file holding the dashboard's bearer token",
    "user": "the dashboard's HTTP basic user name",
    "password_hash": "its password hash, as `mxguard serve reports --hash-password` prints",
    "domains": 'the domains to accept reports for, e.g. ["example.org"]',
    "trusted_proxies": 'reverse proxies whose X-Forwarded-For is believed, e.g. ["127.0.0.1"]',
    "dashboard_hosts": 'Host names the dashboard answers to without auth, e.g. ["reports.lan"]',
}


def _strings(value: Any, key: str, source: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ReportsConfigError(f"{source}: reports.{key}: expected {_TABLE_KEYS[key]}")
    return list(value)


def config_from(
    table: Mapping[str, Any],
    source: str,
    *,
    listen: Sequence[str] = (),
    certs: Sequence[Path] = (),
    keys: Sequence[Path] = (),
    plain_http: bool = False,
    dashboard_listen: Sequence[str] = (),
    no_dashboard: bool = False,
    token_file: Path | None = None,
    domains: Sequence[str] = (),
    trusted_proxies: Sequence[str] = (),
    dashboard_hosts: Sequence[str] = (),
    limits: Limits | None = None,
) -> ReportsConfig:
    """The settings from the command line, then the ``[reports]`` table, then the defaults;
    ReportsConfigError says what is wrong."""
    reject_unknown_keys(table, _TABLE_KEYS, f"{source}: reports", ReportsConfigError)
    if len(certs) != len(keys):
        raise ReportsConfigError(
            f"{len(certs)} --cert and {len(keys)} --key given: give one --key per --cert"
        )
    listen_specs = list(listen) or (
        _strings(table["listen"], "listen", source) if "listen" in table else []
    )
    try:
        if listen_specs:
            listens = tuple(parse_listen(x) for x in listen_specs)
        else:
            listens = (parse_listen("0.0.0.0:443"), parse_listen("[::]:443", required=False))
        dash_specs = list(dashboard_listen) or (
            _strings(table["dashboard_listen"], "dashboard_listen", source)
            if "dashboard_listen" in table
            else [f"127.0.0.1:{DASHBOARD_PORT}"]
        )
        dash = (
            ()
            if no_dashboard
            else tuple(parse_listen(x, default_port=DASHBOARD_PORT) for x in dash_specs)
        )
    except ListenError as exc:
        raise ReportsConfigError(str(exc)) from None
    token = token_file
    if token is None and "token_file" in table:
        token = Path(_strings(table["token_file"], "token_file", source)[0])
    user = table.get("user")
    if user is not None and not isinstance(user, str):
        raise ReportsConfigError(f"{source}: reports.user: expected {_TABLE_KEYS['user']}")
    hashed = None
    if "password_hash" in table:
        if not isinstance(table["password_hash"], str):
            raise ReportsConfigError(
                f"{source}: reports.password_hash: expected {_TABLE_KEYS['password_hash']}"
            )
        try:
            hashed = parse_password_hash(table["password_hash"])
        except AuthConfigError as exc:
            raise ReportsConfigError(f"{source}: reports.password_hash: {exc}") from None
    if (user is None) != (hashed is None):
        raise ReportsConfigError(
            f"{source}: reports: give both user and password_hash for HTTP basic "
            "authentication, or neither"
        )
    wanted = list(domains) or (
        _strings(table["domains"], "domains", source) if "domains" in table else []
    )
    normalised = set()
    for d in wanted:
        try:
            normalised.add(names.normalise_host(d))
        except names.HostNameError as exc:
            raise ReportsConfigError(f"domain {d!r} is not a domain name: {exc}") from None
    proxies = set()
    proxy_specs = list(trusted_proxies) or (
        _strings(table["trusted_proxies"], "trusted_proxies", source)
        if "trusted_proxies" in table
        else []
    )
    for p in proxy_specs:
        try:
            proxies.add(str(ipaddress.ip_address(p)))
        except ValueError:
            raise ReportsConfigError(f"trusted proxy {p!r} is not an IP address") from None
    hosts = list(dashboard_hosts) or (
        _strings(table["dashboard_hosts"], "dashboard_hosts", source)
        if "dashboard_hosts" in table
        else []
    )
    config = ReportsConfig(
        listen=listens,
        certificates=tuple(CertificatePair(c, k) for c, k in zip(certs, keys, strict=True)),
        plain_http=plain_http,
        dashboard_listen=dash,
        token_file=token,
        user=user,
        password_hash=hashed,
        domains=frozenset(normalised),
        trusted_proxies=frozenset(proxies),
        dashboard_hosts=frozenset(h.lower().rstrip(".") for h in hosts),
        limits=limits or Limits(),
    )
    config.check()
    return config


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- metrics


_HELP = {
    "mxguard_reports_requests_total": "Requests to the report endpoint, by status code.",
    "mxguard_reports_received_total": "Reports accepted: stored, or a duplicate of one stored.",
    "mxguard_reports_refused_total": "Report requests refused, by reason.",
    "mxguard_reports_refused_connections_total":
        "Connections refused, by listener and reason: closed on arrival, before TLS "
        "(capacity: max connections open; per-address: the client address has its share "
        "open), or answered 400 and closed (malformed: not HTTP/1.1).",
    "mxguard_reports_connection_timeouts_total":
        "Connections dropped by a deadline, by listener and reason (head: no request head "
        "in time; lifetime: open too long).",
    "mxguard_reports_tls_failures_total": "TLS handshakes that failed, by listener.",
    "mxguard_dashboard_requests_total": "Dashboard requests, by status code.",
    "mxguard_dashboard_auth_failures_total":
        "Dashboard requests with missing or wrong credentials.",
}  # fmt: skip


class Metrics:
    """Counters by name and labels, rendered in the Prometheus text format with the gauges
    read at that moment. No I/O."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    def count(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self._counters[key] = self._counters.get(key, 0) + 1

    def value(self, name: str, **labels: str) -> int:
        """One counter's value (0 when never counted), for tests and logs."""
        return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def total(self, name: str) -> int:
        return sum(v for (n, _), v in self._counters.items() if n == name)

    def render(self, gauges: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]]) -> str:
        out: list[str] = []
        for name, help_ in _HELP.items():
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} counter")
            counted = sorted((k[1], v) for k, v in self._counters.items() if k[0] == name)
            out.extend(f"{name}{_labels(labels)} {v}" for labels, v in counted)
        for name, values in sorted(gauges.items()):
            out.append(f"# TYPE {name} gauge")
            out.extend(f"{name}{_labels(labels)} {v:g}" for labels, v in sorted(values.items()))
        return "\n".join(out) + "\n"


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    pairs = [
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    ]
    return "{" + ",".join(pairs) + "}" if pairs else ""


# --------------------------------------------------------------------------- the endpoint


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    doc: dict[str, Any]
    reason: str | None = None  # the refusal's label in the metrics; None for a success
    retry_after: int | None = None
    close: bool = False
    allow: str | None = None


class _Refused(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.doc.get("reason"))
        self.answer = answer


def refusal(status: int, reason: str, text: str, *, retry_after: int | None = None) -> Answer:
    """A refusal: its status, its label in ``mxguard_reports_refused_total``, and the
    sentence for the sender's log. The connection is closed after it (a body may be unread)."""
    doc = {"status": "refused", "reason": text}
    return Answer(status, doc, reason, retry_after, close=True)


class Receiver:
    """The ASGI application of the report listener: ``POST /tlsrpt`` (module docstring)."""

    def __init__(
        self,
        inbox: ReportInbox,
        metrics: Metrics,
        limits: Limits,
        *,
        domains: frozenset[str] = frozenset(),
        trusted_proxies: frozenset[str] = frozenset(),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.inbox = inbox
        self.metrics = metrics
        self.limits = limits
        self.domains = domains
        self.trusted_proxies = trusted_proxies
        self._clock = clock
        self._rates = TokenBuckets(limits.rate, limits.burst)
        self._per_address = Counts()
        self._reading: dict[int, _Reading] = {}  # bodies being read, oldest first
        self.body_bytes = 0  # held by requests now
        self._parsers = ThreadPoolExecutor(limits.parse_workers, "mxguard-report-parse")
        self._parse_slots: asyncio.Semaphore | None = None
        self._parse_waiting = 0
        self._store_slots: asyncio.Semaphore | None = None
        self._store_waiting = 0

    @property
    def in_flight(self) -> int:
        return self._per_address.total

    def close(self) -> None:
        self._parsers.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started = time.monotonic()
        client = self._client(scope)
        try:
            answer = await self._handle(scope, receive, client, started)
        except _Refused as exc:
            answer = exc.answer
        except _Gone:
            self.metrics.count("mxguard_reports_refused_total", reason="disconnected")
            return
        self.metrics.count("mxguard_reports_requests_total", status=str(answer.status))
        if answer.reason is not None:
            self.metrics.count("mxguard_reports_refused_total", reason=answer.reason)
        log.info(
            "%s %s %s: %d%s in %.1f ms", client, scope["method"], _printable(scope["path"]),
            answer.status, f" ({answer.reason})" if answer.reason else "",
            (time.monotonic() - started) * 1000,
        )  # fmt: skip
        await _send_json(send, answer)

    def _client(self, scope: dict[str, Any]) -> str:
        peer = scope.get("client")
        host = str(peer[0]) if peer else ""
        if host in self.trusted_proxies:
            forwarded = _header(scope, b"x-forwarded-for")
            if forwarded:
                last = forwarded.rsplit(",", 1)[-1].strip()
                with contextlib.suppress(ValueError):
                    host = str(ipaddress.ip_address(last))
        return address_key(host)

    async def _handle(
        self, scope: dict[str, Any], receive: Any, client: str, started: float
    ) -> Answer:
        limits = self.limits
        if scope["path"] != REPORT_PATH:
            return refusal(404, "not-found", f"nothing here; TLS reports go to POST {REPORT_PATH}")
        if scope["method"] != "POST":
            only = f"only POST (RFC 8460 §5.4); reports go to POST {REPORT_PATH}"
            return replace(refusal(405, "method", only), allow="POST")
        wait = self._rates.take(client)
        if wait:
            return refusal(
                429, "rate-limited",
                f"too many reports from {client}: at most {limits.burst} at once and "
                f"{limits.rate:g} per second; try again later",
                retry_after=max(1, math.ceil(wait)),
            )  # fmt: skip
        if self._per_address.get(client) >= limits.per_address:
            return refusal(
                429, "address-busy",
                f"{client} already has {limits.per_address} reports in flight; send one at a time",
                retry_after=5,
            )  # fmt: skip
        media_type = _header(scope, b"content-type").partition(";")[0].strip().lower()
        if media_type not in ACCEPTED_TYPES:
            return refusal(
                415, "media-type",
                f"{media_type[:60]!r} is not a TLS report; send {MEDIA_TYPE_GZIP} or "
                f"{MEDIA_TYPE_JSON} (RFC 8460 §5.4)",
            )  # fmt: skip
        encoding = _header(scope, b"content-encoding").strip().lower()
        if encoding not in ACCEPTED_ENCODINGS:
            return refusal(
                415, "media-type",
                f"Content-Encoding {encoding[:40]!r} is not accepted; send the gzip body as "
                f"{MEDIA_TYPE_GZIP} (RFC 8460 §5.2)",
            )  # fmt: skip
        declared = _header(scope, b"content-length").strip()
        if declared:
            if not declared.isdigit() or len(declared) > 18:
                return refusal(400, "bad-request", "Content-Length is not a number of bytes")
            if int(declared) > limits.max_body:
                return refusal(
                    413, "body-too-large",
                    f"the body is {int(declared):,} bytes; reports are accepted up to "
                    f"{limits.max_body:,} bytes (gzip them, RFC 8460 §5.2)",
                )  # fmt: skip
        if self._per_address.total >= limits.concurrency and not self._evict():
            return refusal(503, "busy", "the receiver is busy; try again later", retry_after=30)
        self._per_address.add(client)
        held = [0]
        try:
            body = await self._read_body(receive, started, held)
            report = await self._parse(body, media_type)
            if self.domains and not set(report.policy_domains) & self.domains:
                named = ", ".join(report.policy_domains[:5]) or "no domain"
                return refusal(
                    403, "domain",
                    f"this receiver collects reports for {', '.join(sorted(self.domains)[:5])}; "
                    f"this one is about {named}",
                )  # fmt: skip
            record = ReceivedRecord(report, body, self._clock(), ReportSource.HTTPS)
            stored = await self._store(record)
        finally:
            self._per_address.remove(client)
            self.body_bytes -= held[0]
        self.metrics.count(
            "mxguard_reports_received_total", outcome="stored" if stored else "duplicate"
        )
        doc = {
            "status": "stored" if stored else "duplicate",
            "report_id": report.report_id,
            "policy_domains": list(report.policy_domains),
            "notes": len(report.notes),
        }
        return Answer(201 if stored else 200, doc)

    def _evict(self) -> bool:
        """Make room when every slot is taken: cut off the request that has been reading its
        body longest, if that is longer than `evict_after` (a sender's body comes at once; a
        slow one is an attacker's, or hopeless). False when nothing could be cut off."""
        now = time.monotonic()
        for reading in self._reading.values():
            if reading.evicted or now - reading.since < self.limits.evict_after:
                continue
            if reading.deadline is None:
                continue
            reading.evicted = True
            reading.deadline.reschedule(asyncio.get_running_loop().time())
            return True
        return False

    async def _read_body(self, receive: Any, started: float, held: list[int]) -> bytes:
        limits = self.limits
        chunks: list[bytes] = []
        size = 0
        left = limits.request_timeout - (time.monotonic() - started)
        reading = _Reading(started)
        self._reading[id(reading)] = reading
        try:
            async with asyncio.timeout(max(left, 0.001)) as deadline:
                reading.deadline = deadline
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Gone
                    chunk = message.get("body", b"")
                    if size + len(chunk) > limits.max_body:
                        raise _Refused(refusal(
                            413, "body-too-large",
                            f"the body is over {limits.max_body:,} bytes; reports are accepted "
                            f"up to {limits.max_body:,} bytes (gzip them, RFC 8460 §5.2)",
                        ))  # fmt: skip
                    if self.body_bytes + len(chunk) > limits.body_memory:
                        raise _Refused(refusal(
                            503, "memory", "the receiver holds too many reports at once; try "
                            "again later", retry_after=30,
                        ))  # fmt: skip
                    self.body_bytes += len(chunk)
                    held[0] += len(chunk)
                    chunks.append(chunk)
                    size += len(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            if reading.evicted:
                raise _Refused(refusal(
                    408, "evicted",
                    f"cut off: the receiver is full and the body came too slowly ({size:,} "
                    "bytes); send it at once",
                )) from None  # fmt: skip
            raise _Refused(refusal(
                408, "timeout",
                f"the body did not arrive within {limits.request_timeout:g} s ({size:,} bytes "
                "came); send it at once",
            )) from None  # fmt: skip
        finally:
            del self._reading[id(reading)]
        return b"".join(chunks)

    async def _parse(self, body: bytes, media_type: str) -> tlsrpt_ingest.ReceivedReport:
        limits = self.limits
        if self._parse_waiting >= limits.parse_workers + limits.parse_queue:
            raise _Refused(refusal(503, "busy", "the receiver is busy; try again later",
                                   retry_after=30))  # fmt: skip
        if self._parse_slots is None:
            self._parse_slots = asyncio.Semaphore(limits.parse_workers)
        max_size = limits.max_decompressed

        def work() -> tlsrpt_ingest.ReceivedReport:
            text = tlsrpt_ingest.decode(body, content_type=media_type or None, filename=None,
                                        max_size=max_size)  # fmt: skip
            return tlsrpt_ingest.parse(text, max_size=max_size)

        self._parse_waiting += 1
        try:
            async with self._parse_slots:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._parsers, work)
        except tlsrpt_ingest.ReportRejected as exc:
            # A body that inflates past the bound is "too large", whatever else it is.
            big = "decompresses to more than" in exc.reason
            raise _Refused(refusal(
                413 if big else 400, "decompressed-too-large" if big else "not-a-report",
                exc.reason,
            )) from None  # fmt: skip
        finally:
            self._parse_waiting -= 1

    async def _store(self, record: ReceivedRecord) -> bool:
        limits = self.limits
        if self._store_waiting >= limits.store_writers + limits.store_queue:
            raise _Refused(refusal(503, "store-busy", "the store is busy; try again later",
                                   retry_after=60))  # fmt: skip
        if self._store_slots is None:
            self._store_slots = asyncio.Semaphore(limits.store_writers)
        self._store_waiting += 1
        try:
            async with self._store_slots:
                async with asyncio.timeout(limits.store_timeout):
                    return await self.inbox.add_received(record)
        except (StoreError, TimeoutError) as exc:
            log.error("cannot store a received report: %s", exc or "the store did not answer")
            raise _Refused(refusal(
                503, "store-error", "the report could not be stored; try again later",
                retry_after=60,
            )) from None  # fmt: skip
        finally:
            self._store_waiting -= 1


@dataclass(slots=True)
class _Reading:
    """A request whose body is being read: since when, and the deadline that cuts it off."""

    since: float
    deadline: asyncio.Timeout | None = None
    evicted: bool = False


class _Gone(Exception):
    """The client went away before its request was read."""


def _header(scope: dict[str, Any], name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def _printable(value: str, limit: int = 120) -> str:
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value[:limit])
    return out + ("…" if len(value) > limit else "")


async def _send_json(send: Any, answer: Answer) -> None:
    body = (json.dumps(answer.doc, ensure_ascii=True) + "\n").encode("ascii")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    ]
    if answer.retry_after is not None:
        headers.append((b"retry-after", str(answer.retry_after).encode()))  # RFC 9110 §10.2.3
    if answer.allow is not None:
        headers.append((b"allow", answer.allow.encode()))
    if answer.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the dashboard


def _static(name: str) -> bytes:
    return resources.files("mxguard.owner").joinpath("static", name).read_bytes()


class Dashboard:
    """The ASGI application of the dashboard listener (module docstring)."""

    MAX_QUERY = 4096

    def __init__(
        self,
        store: Any,
        metrics: Metrics,
        auth: Authenticator,
        limits: Limits,
        *,
        domains: frozenset[str] = frozenset(),
        hosts: frozenset[str] = frozenset(),
        gauges: Callable[[], Mapping[str, Mapping[tuple[tuple[str, str], ...], float]]] = dict,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.inbox: ReportInbox = store
        self.checks: CheckLog = store
        self.metrics = metrics
        self.auth = auth
        self.limits = limits
        self.domains = domains
        self.hosts = hosts
        self._gauges = gauges
        self._clock = clock
        self._failures = TokenBuckets(0.2, 20)  # failed logins per address: 20, then 1 per 5 s
        self._reads: asyncio.Semaphore | None = None
        self._listing: asyncio.Semaphore | None = None  # a day's whole reports: one at a time
        self._waiting = 0
        self._files = {
            "/static/dashboard.css": (_static("dashboard.css"), b"text/css; charset=utf-8"),
            "/static/dashboard.js": (_static("dashboard.js"), b"text/javascript; charset=utf-8"),
            "/static/favicon.svg": (_static("favicon.svg"), b"image/svg+xml"),
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, ctype, body, extra = await self._respond(scope)
        self.metrics.count("mxguard_dashboard_requests_total", status=str(status))
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            *SECURITY_HEADERS,
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _respond(
        self, scope: dict[str, Any]
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        path = scope["path"]
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            return (*self._html(405, "Method not allowed", "The dashboard is read-only."),
                    [(b"allow", b"GET, HEAD")])  # fmt: skip
        if path == "/healthz":
            return 200, b"text/plain; charset=utf-8", b"ok\n", []
        client = address_key(str((scope.get("client") or ("",))[0]))
        if not self.auth.enabled and not self._host_ok(_header(scope, b"host")):
            return (*self._html(
                403, "Wrong host name",
                "This dashboard answers only to its own address, localhost or a name listed in "
                "dashboard_hosts (a defence against DNS rebinding). Open it by its address.",
            ), [])  # fmt: skip
        if self.auth.enabled:
            refused = await self._authenticate(scope, client)
            if refused is not None:
                return refused
        if path in self._files:
            data, ctype = self._files[path]
            return 200, ctype, data, []
        if path == "/metrics":
            text = self.metrics.render(self._gauges())
            return 200, b"text/plain; version=0.0.4; charset=utf-8", text.encode(), []
        raw_query = bytes(scope.get("query_string", b""))
        if len(raw_query) > self.MAX_QUERY:
            return (*self._html(414, "Address too long", "The query is too long."), [])
        try:
            query = parse_qs(raw_query.decode("latin-1"), max_num_fields=20)
        except ValueError:
            return (*self._html(400, "Bad query", "The query has too many fields."), [])
        try:
            if path == "/":
                return (*await self._read(self._overview(query)), [])
            if path.startswith("/domain/"):
                return (*await self._read(self._domain(path[len("/domain/") :], query)), [])
        except _PageError as exc:
            return (*self._html(exc.status, exc.title, exc.detail), [])
        except StoreError as exc:
            log.error("dashboard: the store failed: %s", exc)
            unavailable = "The store could not be read; try again in a moment."
            return (*self._html(503, "Store unavailable", unavailable), [])
        if path == "/leave":
            url = (query.get("url") or [""])[0]
            if not url:
                return (*self._html(400, "No address", "The warning page needs ?url=."), [])
            return 200, b"text/html; charset=utf-8", pages.leave_page(url).encode(), []
        return (*self._html(404, "Not found", "There is no such page."), [])

    def _host_ok(self, host_header: str) -> bool:
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        host = host.rstrip(".")
        if host == "localhost" or host in self.hosts:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    async def _authenticate(
        self, scope: dict[str, Any], client: str
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]] | None:
        header = _header(scope, b"authorization")
        if header and not self._failures.available(client):
            return (*self._html(429, "Too many attempts",
                                "Too many failed logins from this address; wait a minute."),
                    [(b"retry-after", b"60")])  # fmt: skip
        ok = await self.auth.verify(header or None)
        if ok is None:
            return (*self._html(503, "Busy", "Too many logins at once; try again."),
                    [(b"retry-after", b"5")])  # fmt: skip
        if ok:
            return None
        self.metrics.count("mxguard_dashboard_auth_failures_total")
        if header:
            self._failures.take(client)
        challenges = [(b"www-authenticate", c.encode()) for c in self.auth.challenges()]
        return (*self._html(401, "Authentication required",
                            "This dashboard needs credentials (docs/reports.md)."),
                challenges)  # fmt: skip

    def _html(self, status: int, title: str, detail: str) -> tuple[int, bytes, bytes]:
        return status, b"text/html; charset=utf-8", pages.error_page(status, title, detail).encode()

    async def _read(self, work: Coroutine[Any, Any, str]) -> tuple[int, bytes, bytes]:
        """Run a page's store reads, at most `dashboard_reads` pages at once."""
        limit = self.limits.dashboard_reads
        if self._waiting >= limit * 8:
            work.close()
            return self._html(503, "Busy", "Too many pages at once; try again in a moment.")
        if self._reads is None:
            self._reads = asyncio.Semaphore(limit)
        self._waiting += 1
        try:
            async with self._reads:
                html_text: str = await work
        finally:
            self._waiting -= 1
        return 200, b"text/html; charset=utf-8", html_text.encode()

    def _range(self, query: Mapping[str, list[str]]) -> tuple[int, dt.date, dt.date]:
        raw = (query.get("days") or ["30"])[0]
        if not raw.isdigit() or not 1 <= int(raw) <= 400:
            raise _PageError(400, "Bad range", "days must be a number from 1 to 400.")
        days = int(raw)
        today = self._clock().astimezone(dt.UTC).date()
        return days, today - dt.timedelta(days=days - 1), today

    async def _overview(self, query: Mapping[str, list[str]]) -> str:
        days, first, last = self._range(query)
        start, end = _utc(first), _utc(last + dt.timedelta(days=1))
        if self.domains:
            listed = sorted(self.domains)
        else:
            listed = await self.inbox.received_domains(start, end)
        more = max(0, len(listed) - 100)
        rows = []
        for domain in listed[:100]:
            totals = await self.inbox.report_totals(domain, start, end, top=1)
            check = await self.checks.last_check(domain)
            rows.append(pages.DomainRow(domain, totals, check.verdict if check else None,
                                        check.at if check else None))  # fmt: skip
        return pages.overview_page(
            rows, days=days, start=first, end=last, more=more, restricted=bool(self.domains)
        )

    async def _domain(self, name: str, query: Mapping[str, list[str]]) -> str:
        try:
            domain = names.normalise_host(name)
        except names.HostNameError:
            raise _PageError(404, "Not a domain", "The address does not name a domain.") from None
        days, first, last = self._range(query)
        day = None
        if query.get("day"):
            try:
                day = dt.date.fromisoformat(query["day"][0][:10])
            except ValueError:
                raise _PageError(400, "Bad day", "day must be a date, YYYY-MM-DD.") from None
        start, end = _utc(first), _utc(last + dt.timedelta(days=1))
        totals = await self.inbox.report_totals(domain, start, end)
        day_totals = None
        reports = None
        if day is not None:
            day_start = _utc(day)
            day_end = day_start + dt.timedelta(days=1)
            day_totals = await self.inbox.report_totals(domain, day_start, day_end)
            if day_totals.reports <= self.limits.listed_reports:
                # Whole records, raw bodies included (up to listed_reports x max_body bytes):
                # one such read at a time, however many pages are asked for.
                if self._listing is None:
                    self._listing = asyncio.Semaphore(1)
                async with self._listing:
                    reports = await self.inbox.received_between(domain, day_start, day_end)
        verdict = pages.verdict_of(await self.checks.last_check(domain))
        return pages.domain_page(
            totals, verdict, days=days, start=first, end=last, day=day, day_totals=day_totals,
            reports=reports, listed_at_most=self.limits.listed_reports,
        )  # fmt: skip


class _PageError(Exception):
    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def _utc(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- the server


def raise_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed` (within the hard limit); the soft limit now.
    systemd starts services with a soft limit of 1024, too few for thousands of connections,
    and a process out of descriptors stops accepting altogether."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit to %d: %s", target, exc)
        return soft
    if target < needed:
        log.warning(
            "the open-files limit is %d, fewer than the %d the connection limits need: raise "
            "it (systemd: LimitNOFILE=)", target, needed,
        )  # fmt: skip
    return target


class Server:
    """`serve reports`: ``await start()``, ``reload()`` on SIGHUP, ``await stop()``."""

    def __init__(self, store: Any, config: ReportsConfig) -> None:
        config.check()
        self.config = config
        self.store = store
        self.metrics = Metrics()
        self.certificates = Certificates(config.certificates) if config.certificates else None
        token = read_token(config.token_file) if config.token_file else None
        self.auth = Authenticator(token=token, user=config.user,
                                  password_hash=config.password_hash)  # fmt: skip
        limits = config.limits
        self.receiver = Receiver(
            store, self.metrics, limits, domains=config.domains,
            trusted_proxies=config.trusted_proxies,
        )  # fmt: skip
        self.dashboard = Dashboard(
            store, self.metrics, self.auth, limits, domains=config.domains,
            hosts=config.dashboard_hosts, gauges=self._gauges,
        )  # fmt: skip
        report_tls = self._tls if self.certificates is not None else None
        self.report_gate = Gate(
            "reports", limits.report_gate(), tls=report_tls, events=self._event,
            exempt=config.trusted_proxies,
        )  # fmt: skip
        dashboard_tls = report_tls if config.dashboard_exposed else None
        self.dashboard_gate = Gate(
            "dashboard", limits.dashboard_gate(), tls=dashboard_tls, events=self._event,
        )  # fmt: skip
        self.addresses: list[str] = []
        self.dashboard_addresses: list[str] = []
        self._servers: list[tuple[QuietUvicorn, asyncio.Task[None]]] = []

    def _tls(self) -> Any:
        assert self.certificates is not None
        return self.certificates.listener_context

    def _event(self, listener: str, what: str, reason: str) -> None:
        if what == "refused":
            self.metrics.count(
                "mxguard_reports_refused_connections_total", listener=listener, reason=reason
            )
        elif what == "timeout":
            self.metrics.count(
                "mxguard_reports_connection_timeouts_total", listener=listener, reason=reason
            )
        else:
            self.metrics.count("mxguard_reports_tls_failures_total", listener=listener)

    def _gauges(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        return {
            "mxguard_reports_open_connections": {
                (("listener", "reports"),): self.report_gate.open,
                (("listener", "dashboard"),): self.dashboard_gate.open,
            },
            "mxguard_reports_in_flight": {(): self.receiver.in_flight},
            "mxguard_reports_body_bytes": {(): self.receiver.body_bytes},
        }

    @property
    def scheme(self) -> str:
        return "http" if self.config.plain_http else "https"

    async def start(self) -> None:
        """Bind every address and serve; OSError when a required address cannot be bound."""
        limits = self.config.limits
        raise_open_files(limits.max_connections + limits.dashboard_connections + 256)
        report_sockets = bind_all(self.config.listen, 1024)
        try:
            dash_sockets = (
                bind_all(self.config.dashboard_listen, 128) if self.config.dashboard_listen else []
            )
        except BaseException:
            for s in report_sockets:
                s.close()
            raise
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # uvicorn warns about every malformed request: a flood of them would flood the log
            # (they are counted in the metrics instead).
            logging.getLogger("uvicorn").setLevel(logging.ERROR)
        self.addresses = [socket_address(s) for s in report_sockets]
        self.dashboard_addresses = [socket_address(s) for s in dash_sockets]
        groups: list[tuple[Any, Gate, list[socket.socket]]] = [
            (self.receiver, self.report_gate, report_sockets)
        ]
        if dash_sockets:
            groups.append((self.dashboard, self.dashboard_gate, dash_sockets))
        for app, gate, sockets in groups:
            config = uvicorn.Config(
                app,
                http=guarded_protocol(gate),
                ws="none",
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                proxy_headers=False,
                limit_concurrency=None,  # the gate and the receiver do it, and count it
                timeout_keep_alive=5,
                h11_max_incomplete_event_size=16 * 1024,
                timeout_graceful_shutdown=5,
            )
            config.load()
            server = QuietUvicorn(config)
            task = asyncio.create_task(server.serve(sockets=sockets))
            self._servers.append((server, task))
        for server, task in self._servers:
            while not server.started:
                if task.done():
                    await task
                    raise OSError("the server stopped while starting")
                await asyncio.sleep(0.01)

    def reload(self) -> bool:
        """SIGHUP: reload the certificates and the token file; False when something kept its
        old value."""
        ok = True
        if self.certificates is not None:
            for problem in self.certificates.reload():
                log.error("certificate reload: %s", problem)
                ok = False
        if self.config.token_file is not None:
            try:
                self.auth.replace_token(read_token(self.config.token_file))
            except AuthConfigError as exc:
                log.error("token reload: %s; keeping the token read before", exc)
                ok = False
        if ok:
            log.info("reloaded certificates and credentials")
        return ok

    async def stop(self) -> None:
        for gate in (self.report_gate, self.dashboard_gate):
            gate.abort_handshakes()
        for server, _ in self._servers:
            server.should_exit = True
        for _, task in self._servers:
            await task
        self._servers = []
        self.receiver.close()

    async def wait(self) -> None:
        """Until a server stops on its own (or after ``stop``)."""
        if self._servers:
            await asyncio.wait(
                [asyncio.shield(t) for _, t in self._servers], return_when=asyncio.FIRST_COMPLETED
            )


__all__ = [
    "ACCEPTED_TYPES",
    "CSP",
    "REPORT_PATH",
    "SECURITY_HEADERS",
    "Answer",
    "CertificateError",
    "Dashboard",
    "Limits",
    "Metrics",
    "Receiver",
    "ReportsConfig",
    "ReportsConfigError",
    "Server",
    "config_from",
    "raise_open_files",
]
