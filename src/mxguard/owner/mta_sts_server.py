"""`mxguard serve mta-sts`: the HTTPS server of ``mta-sts.<domain>`` (RFC 8461 §3.3).

Senders fetch a domain's policy from ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` and
are strict about it (adapters/https.py is the sender side): a 200 only, no redirect,
``text/plain``, at most 64 KiB, a certificate valid for ``mta-sts.<domain>`` under WebPKI,
TLS 1.2 or newer. A policy host that gets one of these wrong has no policy at all as far as
senders are concerned. This server serves policy files written by ``mxguard sts publish``
(``ROOT/<domain>/.well-known/mta-sts.txt``) for any number of domains and gets all of it
right:

- the domain comes from the Host header (``mta-sts.<domain>``, any port); anything else, and
  any other path, is a 404; other methods than GET (and HEAD) a 405;
- the file is served as stored but with CRLF line ends (RFC 8461 §3.2), ``text/plain``, with
  ``Cache-Control: no-cache``: senders do not use HTTP caches (§3.3), and a cache between them
  and this server must not hand out an old body under a new TXT ``id``;
- a file that does not parse (``mtasts.parse_policy``), is not UTF-8 or is larger than senders
  read is answered with a 500 and logged, never served: garbage would be cached by no sender
  but would hide the real problem;
- files are read when asked for (their stat is the cache key), so a new policy needs no
  restart;
- TLS 1.2 or newer (RFC 8461 §3.3, RFC 8996); one or several certificate files, each chosen
  for the SNI names it covers; SIGHUP (``Server.reload``) loads them again: the listening
  context's ``sni_callback`` hands each new handshake the current context, and a file that
  fails to load leaves the context it would have replaced in place (and is logged);
- bounded: uvicorn's concurrency limit (503 beyond it), keep-alive timeout and head size,
  and a lifetime for each connection, so a client that never finishes its request does not
  keep its connection.

One log line per request, at INFO (shown with ``-v``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from mxguard.adapters import https
from mxguard.protocol import mtasts, names

log = logging.getLogger(__name__)

POLICY_PATH = https.POLICY_PATH
MAX_POLICY_SIZE = https.DEFAULT_MAX_SIZE  # what senders read at most (RFC 8461 §3.3)
CACHE_CONTROL = "no-cache"
CONTENT_TYPE = "text/plain"
DEFAULT_PORT = 443


class CertificateError(ValueError):
    """A certificate or key file cannot be used; the message says which and why."""


class ListenError(ValueError):
    """A listen address is not ``ADDRESS[:PORT]``."""


# --------------------------------------------------------------------------- policy files


@dataclass(frozen=True, slots=True)
class Served:
    """What the server answers for one request: a status and, for 200, the body."""

    status: int
    body: bytes = b""
    domain: str | None = None
    problem: str | None = None  # why a 500, for the log


def domain_of(host_header: str) -> str | None:
    """The policy domain a Host header names (``mta-sts.<domain>[:port]``), or None."""
    host = host_header.strip()
    if host.startswith("["):
        return None  # an IP literal is no policy host name
    host = host.rpartition(":")[0] if ":" in host else host
    try:
        name = names.normalise_host(host)
    except names.HostNameError:
        return None
    prefix, dot, domain = name.partition(".")
    if prefix != "mta-sts" or not dot or "." not in domain:
        return None
    return domain


def with_crlf(text: str) -> str:
    """``text`` with every line ending in CRLF (RFC 8461 §3.2); a missing final line end
    stays missing, nothing else changes."""
    return "\r\n".join(line.removesuffix("\r") for line in text.split("\n"))


class PolicyFiles:
    """The policy files under ``root``: ``root/<domain>/.well-known/mta-sts.txt``.

    A file is read and checked once per version (its stat); a broken one is logged once per
    version, and answered with 500 every time.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, tuple[tuple[int, int, int], Served]] = {}

    def path(self, domain: str) -> Path:
        return self.root / domain / POLICY_PATH.lstrip("/")

    def domains(self) -> list[str]:
        """The domains that have a policy file now."""
        try:
            entries = sorted(self.root.iterdir())
        except OSError:
            return []
        return [e.name for e in entries if (e / POLICY_PATH.lstrip("/")).is_file()]

    def get(self, domain: str) -> Served:
        path = self.path(domain)
        try:
            st = path.stat()
        except OSError:
            return Served(404, domain=domain)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        served = self._load(domain, path)
        if served.problem is not None:
            log.error("not serving %s: %s", path, served.problem)
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        self._cache[path] = (key, served)
        return served

    def _load(self, domain: str, path: Path) -> Served:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_POLICY_SIZE + 1)
        except IsADirectoryError:
            return Served(404, domain=domain)
        except OSError as exc:
            return Served(500, domain=domain, problem=f"cannot read it: {exc.strerror or exc}")
        if len(data) > MAX_POLICY_SIZE:
            return Served(
                500, domain=domain, problem=f"it is larger than {MAX_POLICY_SIZE} bytes, the most "
                "senders read (RFC 8461 §3.3)",
            )  # fmt: skip
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Served(500, domain=domain, problem=f"it is not UTF-8 (byte {exc.start})")
        try:
            mtasts.parse_policy(text)
        except mtasts.PolicyError as exc:
            return Served(500, domain=domain, problem=f"it is not a valid policy: {exc}")
        return Served(200, with_crlf(text).encode("utf-8"), domain)


# --------------------------------------------------------------------------- the app


def create_app(files: PolicyFiles) -> ASGIApp:
    """The ASGI application: the policy route, 404 elsewhere, one log line per request."""

    async def policy(request: Request) -> Response:
        domain = domain_of(request.headers.get("host", ""))
        if domain is None:
            return PlainTextResponse("Not Found\n", 404)
        served = files.get(domain)
        if served.status != 200:
            text = "Not Found\n" if served.status == 404 else "Policy unavailable\n"
            return PlainTextResponse(text, served.status)
        return Response(
            served.body,
            200,
            headers={
                # Exactly the media type of RFC 8461 §3.2, without the charset Starlette
                # would add: some senders compare the whole header.
                "Content-Type": CONTENT_TYPE,
                "Cache-Control": CACHE_CONTROL,
                "X-Content-Type-Options": "nosniff",
            },
        )

    app = Starlette(routes=[Route(POLICY_PATH, policy, methods=["GET"])])
    return RequestLog(app)


def _printable(value: str, limit: int = 120) -> str:
    """Untrusted text for a log line: control characters escaped, length bounded."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value[:limit])
    return out + ("…" if len(value) > limit else "")


class RequestLog:
    """ASGI middleware: one INFO line per request (client, method, host, path, status,
    bytes, milliseconds)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        size = 0

        async def sending(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        start = time.monotonic()
        try:
            await self.app(scope, receive, sending)
        finally:
            if log.isEnabledFor(logging.INFO):
                host = next((v for k, v in scope["headers"] if k == b"host"), b"")
                client = scope.get("client") or ("-", 0)
                log.info(
                    "%s %s %s %s %d %d bytes %.1f ms",
                    client[0],
                    scope["method"],
                    _printable(host.decode("latin-1")),
                    _printable(scope["path"]),
                    status,
                    size,
                    (time.monotonic() - start) * 1000,
                )


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True, slots=True)
class CertificatePair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    pair: CertificatePair
    context: ssl.SSLContext
    names: tuple[str, ...]  # the leaf's subjectAltName DNS names
    serial: int
    not_after: dt.datetime

    def covers(self, host: str) -> bool:
        return any(names.identifier_matches(n, host) for n in self.names)


def server_context() -> ssl.SSLContext:
    """TLS settings of every connection: TLS 1.2 or newer (RFC 8461 §3.3 requires RFC 7525;
    RFC 8996 retires older versions), HTTP/1.1 by ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def load_certificate(pair: CertificatePair) -> LoadedCertificate:
    """A context serving ``pair``; ``CertificateError`` says what is wrong with the files."""
    try:
        pem = pair.cert.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {pair.cert}: {exc.strerror or exc}") from None
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError as exc:
        raise CertificateError(f"{pair.cert} holds no PEM certificate: {exc}") from None
    ctx = server_context()
    try:
        ctx.load_cert_chain(pair.cert, pair.key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise CertificateError(
            f"cannot use {pair.cert} with the key {pair.key}: {reason}"
        ) from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    return LoadedCertificate(pair, ctx, dns_names, leaf.serial_number, leaf.not_valid_after_utc)


class Certificates:
    """The certificates served, chosen per handshake by SNI; ``reload`` replaces them.

    The listening context is created once and never changes; its ``sni_callback`` (called
    for every ClientHello, with or without SNI) switches the connection to the context of
    the first certificate covering the server name, else to the first certificate's. A
    reload builds new contexts from the files and swaps each one in only when it loaded.
    """

    def __init__(self, pairs: Sequence[CertificatePair]) -> None:
        if not pairs:
            raise CertificateError("give at least one certificate and key")
        self.loaded = [load_certificate(p) for p in pairs]  # the first load's errors are fatal
        self._listener = server_context()
        self._listener.sni_callback = self._choose
        self._warn_expiry()

    @property
    def listener_context(self) -> ssl.SSLContext:
        return self._listener

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            for c in self.loaded:
                if c.covers(server_name):
                    return c.context
        return self.loaded[0].context

    def covers(self, host: str) -> bool:
        return any(c.covers(host) for c in self.loaded)

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        connection.context = self.context_for(server_name)

    def reload(self) -> list[str]:
        """Load every certificate again; the problems (each keeps its old one), for the log."""
        problems = []
        fresh = []
        for old in self.loaded:
            try:
                fresh.append(load_certificate(old.pair))
            except CertificateError as exc:
                problems.append(f"{exc}; still serving the certificate loaded before")
                fresh.append(old)
        self.loaded = fresh  # new handshakes see the new list; current ones keep theirs
        self._warn_expiry()
        return problems

    def _warn_expiry(self) -> None:
        now = dt.datetime.now(dt.UTC)
        for c in self.loaded:
            if c.not_after <= now:
                log.warning(
                    "the certificate %s expired on %s: senders refuse it",
                    c.pair.cert,
                    c.not_after.strftime("%Y-%m-%d %H:%M UTC"),
                )


# --------------------------------------------------------------------------- listening


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int
    required: bool = True  # False: skipped when the address family is not available

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(spec: str, *, required: bool = True, default_port: int = DEFAULT_PORT) -> Listen:
    """``ADDRESS[:PORT]`` or ``[IPV6][:PORT]``; the port is ``default_port`` (443) unless
    given."""
    text = spec.strip()
    port_text = ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ListenError(f"listen address {spec!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    try:
        ipaddress.ip_address(host)
        port = int(port_text) if port_text else default_port
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise ListenError(
            f"listen address {spec!r} is not ADDRESS[:PORT] (an IP address, optionally with a "
            "port; IPv6 as [ADDRESS]:PORT)"
        ) from None
    return Listen(host, port, required)


def bind_all(listens: Sequence[Listen], backlog: int) -> list[socket.socket]:
    """A listening socket for each of ``listens``; one that is not ``required`` is skipped when
    the system cannot have that address (no IPv6). OSError names the address that failed, and
    when none could be used; nothing stays open after an error."""
    sockets: list[socket.socket] = []
    try:
        for listen in listens:
            try:
                sockets.append(_bind(listen, backlog))
            except OSError as exc:
                unavailable = exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
                if listen.required or not unavailable:
                    raise OSError(exc.errno, f"{listen}: {exc.strerror or exc}") from None
                log.info("not listening on %s: %s", listen, exc.strerror or exc)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, "no listen address could be used")
    return sockets


def _bind(listen: Listen, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on request handling (uvicorn's, and the connection lifetime)."""

    concurrency: int = 200  # connections open at once; a request on one more gets a 503
    keep_alive: int = 5  # seconds an idle connection is kept open
    connection_lifetime: float = 30.0  # seconds a connection lives at most, whatever it does
    max_head: int = 16 * 1024  # bytes of request line and headers
    backlog: int = 128


def _bounded_protocol(lifetime: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing each connection after ``lifetime`` seconds: uvicorn
    has no timeout for a request that never completes."""

    class Bounded(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(lifetime, self._expire)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _expire(self) -> None:
            log.info("dropping a connection from %s after %g s", self.client, lifetime)
            # abort, not close: a TLS close waits for the peer's close_notify, and the
            # connection would count against the concurrency limit until it came.
            self.transport.abort()

    return Bounded


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the commands install their own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The command installs its own handlers (SIGTERM, SIGINT: stop; SIGHUP: reload);
        # uvicorn's would re-raise the signal at exit and turn a clean stop into a kill.
        yield


class Server:
    """The MTA-STS policy server: ``await start()``, ``reload()`` on SIGHUP, ``await stop()``."""

    def __init__(
        self,
        root: Path,
        certificates: Sequence[CertificatePair],
        listen: Sequence[Listen],
        *,
        limits: Limits | None = None,
    ) -> None:
        self.files = PolicyFiles(root)
        self.certificates = Certificates(certificates)
        self.listen = list(listen)
        self.limits = limits or Limits()
        self.addresses: list[str] = []
        self._server: QuietUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind every address and serve; OSError when a required address cannot be bound."""
        sockets = bind_all(self.listen, self.limits.backlog)
        limits = self.limits
        config = uvicorn.Config(
            create_app(self.files),
            http=_bounded_protocol(limits.connection_lifetime),
            lifespan="off",
            log_config=None,
            access_log=False,  # RequestLog writes the one line per request
            server_header=False,
            proxy_headers=False,
            # uvicorn counts the asking connection itself: N + 1 lets N connections be served.
            limit_concurrency=limits.concurrency + 1,
            timeout_keep_alive=limits.keep_alive,
            h11_max_incomplete_event_size=limits.max_head,
            backlog=limits.backlog,
            timeout_graceful_shutdown=5,
        )
        config.load()
        # The context is ours, not one uvicorn builds from file names: its sni_callback is
        # what lets SIGHUP swap certificates for new connections (see Certificates).
        config.ssl = self.certificates.listener_context
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("uvicorn").setLevel(logging.WARNING)
        self._server = QuietUvicorn(config)
        self.addresses = [socket_address(s) for s in sockets]
        self._task = asyncio.create_task(self._server.serve(sockets=sockets))
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what went wrong
                raise OSError("the server stopped while starting")
            await asyncio.sleep(0.01)
        self._check_files()

    def reload(self) -> bool:
        """Reload the certificates (SIGHUP); False when some file kept its old certificate."""
        problems = self.certificates.reload()
        for problem in problems:
            log.error("certificate reload: %s", problem)
        if not problems:
            log.info(
                "certificates reloaded: %s",
                ", ".join(f"{c.pair.cert} (serial {c.serial:x})" for c in self.certificates.loaded),
            )
        self._check_files()
        return not problems

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None

    async def wait(self) -> None:
        """Until the server stops (after ``stop``, or when uvicorn ends on its own)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def _check_files(self) -> None:
        """Warn about domains no certificate covers, and policy files that will not be served."""
        for domain in self.files.domains():
            host = f"mta-sts.{domain}"
            if not self.certificates.covers(host):
                log.warning("no certificate covers %s: senders cannot fetch its policy", host)
            self.files.get(domain)  # logs a file that does not parse


def socket_address(sock: socket.socket) -> str:
    """``HOST:PORT`` (``[V6]:PORT``) that ``sock`` listens on."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "CACHE_CONTROL",
    "CONTENT_TYPE",
    "POLICY_PATH",
    "CertificateError",
    "CertificatePair",
    "Certificates",
    "Limits",
    "Listen",
    "ListenError",
    "LoadedCertificate",
    "PolicyFiles",
    "QuietUvicorn",
    "Served",
    "Server",
    "bind_all",
    "create_app",
    "domain_of",
    "load_certificate",
    "parse_listen",
    "socket_address",
    "with_crlf",
]
