"""The lab's MTA-STS policy host: the HTTPS server of ``mta-sts.<domain>`` (RFC 8461 §3.3).

A domain that publishes MTA-STS serves its policy at
``https://mta-sts.<domain>/.well-known/mta-sts.txt``. The lab needs that server in every way a
real one can go wrong, so that mxguard's fetch (adapters/https.py) is tested against a real
TLS peer: the certificate comes from the lab PKI in any ``CertKind`` variant, and the answer
follows ``MtaSts.behaviour`` (serve, 404, redirect, wrong content type, oversize, stall).

The server is a small HTTP/1.1 implementation on asyncio streams: one request per
connection, ``Connection: close`` after every answer, request head bounded to 8 KiB and POST
bodies bounded too (untrusted input is bounded everywhere: docs/design.md, "Conventions"). It
also accepts POST to any other path and keeps what it received, for the TLS-RPT ``https:``
report endpoint (RFC 8460 §5.4).

Each policy host normally listens on an address of its own. A lab with very many MTA-STS
domains can instead put them behind one ``SharedPolicyListener``: one HTTPS listener at one
address that picks the policy host, and with it the certificate, by the server name of the
ClientHello (SNI, RFC 6066 §3) — as a provider that hosts many domains' policies does. A
policy host behind it behaves and records exactly as one with its own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from mxguard.lab.pki import Identity
from mxguard.lab.scenario import MtaSts, PolicyBehaviour

POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
REDIRECT_TARGET = "/policy/mta-sts.txt"  # where the `redirect` behaviour points: it serves too
MAX_HEAD = 8192  # request line plus headers
MAX_POST_BODY = 4 * 1024 * 1024  # TLS-RPT reports arrive gzipped; this is generous
OVERSIZE_BODY = 100 * 1024  # RFC 8461 §3.3 lets clients stop at 64 KiB; this is well past it
_IO_TIMEOUT = 10.0  # handshake, request head and POST body; a lab client that idles is gone

_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
}


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the host received it (for tests: what did the client really send?)."""

    method: str
    path: str
    host: str | None  # the Host header
    sni: str | None  # the server name the client sent in its TLS ClientHello
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order


@dataclass(frozen=True, slots=True)
class Post:
    """A POST body and the request it came with (a TLS-RPT report, RFC 8460 §5.4)."""

    request: Request
    body: bytes

    @property
    def path(self) -> str:
        return self.request.path

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.request.headers if k == name), None)


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class PolicyHost:
    """The HTTPS server of ``mta-sts.<domain>`` at ``address:port``.

    ``fetches`` counts GET requests for the policy path, whatever the behaviour; ``requests``
    lists every request received and ``posts`` every POST body.
    """

    def __init__(
        self, domain: str, mta_sts: MtaSts, identity: Identity, address: str, port: int
    ) -> None:
        self.domain = domain
        self.address = address
        self.port = port
        self.fetches = 0
        self.requests: list[Request] = []
        self.posts: list[Post] = []
        self._mta_sts = mta_sts
        self._identity = identity
        self._context = identity.server_context()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._sni: dict[int, str | None] = {}

    @property
    def name(self) -> str:
        return f"mta-sts.{self.domain}"

    @property
    def mta_sts(self) -> MtaSts:
        return self._mta_sts

    @property
    def identity(self) -> Identity:
        return self._identity

    def policy_url(self, path: str = POLICY_PATH) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{self.name}{port}{path}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"policy host {self.name} is already running")
        self._server = await asyncio.start_server(
            self._on_connection,
            self.address,
            self.port,
            ssl=self._make_listener_context(),
            ssl_handshake_timeout=_IO_TIMEOUT,
            limit=MAX_HEAD,
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None and not self._handlers:
            return  # not started (or behind a shared listener, with no connection open)
        if server is not None:
            server.close()
        # Python 3.11's Server.wait_closed() does not wait for open connections, so a stalled
        # one would live on: end each connection; its handler then sees EOF or an error.
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._sni.clear()

    def update(self, mta_sts: MtaSts, identity: Identity) -> None:
        """New behaviour and certificate, effective for the next request / connection."""
        self._context = identity.server_context()
        self._mta_sts = mta_sts
        self._identity = identity

    def clear(self) -> None:
        self.fetches = 0
        self.requests.clear()
        self.posts.clear()

    # --- connection handling --------------------------------------------------------------

    def _make_listener_context(self) -> ssl.SSLContext:
        # The listener's context only picks the current identity's context for each
        # handshake (OpenSSL calls this for every ClientHello, with or without SNI), so that
        # update() changes the certificate for the next connection without a restart.
        ctx = self._identity.server_context()

        def choose(obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            self._select(obj, name)

        ctx.sni_callback = choose
        return ctx

    def _select(self, obj: ssl.SSLObject, name: str | None) -> None:
        # Keyed by id(): a reused id belongs to a new handshake, which overwrites it first.
        self._sni[id(obj)] = name
        obj.context = self._context

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # we run as the task asyncio made for this connection
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._serve_connection(reader, writer)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away, or stop() ended the connection: nothing to answer
        finally:
            writer.close()
            # Closing TLS waits for the peer's close_notify; stop() aborts the wait.
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(_IO_TIMEOUT):
                    await writer.wait_closed()
            self._handlers.discard(task)
            self._writers.discard(writer)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        sni = self._sni.pop(id(sslobj), None)
        try:
            async with asyncio.timeout(_IO_TIMEOUT):
                request = await _read_head(reader, sni)
        except _BadRequest as exc:
            await _respond(writer, exc.status, "text/plain", f"{exc}\n".encode())
            return
        self.requests.append(request)
        if request.method == "POST" and request.path != POLICY_PATH:
            await self._handle_post(reader, writer, request)
        elif request.method != "GET":
            await _respond(writer, 405, "text/plain", b"only GET here\n", allow="GET")
        elif request.path == POLICY_PATH:
            self.fetches += 1
            await self._answer_policy(reader, writer)
        elif request.path == REDIRECT_TARGET:
            await _respond(writer, 200, "text/plain", self._policy_bytes())
        else:
            await _respond(writer, 404, "text/plain", b"not found\n")

    async def _answer_policy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        behaviour = self._mta_sts.behaviour
        body = self._policy_bytes()
        if behaviour is PolicyBehaviour.SERVE:
            await _respond(writer, 200, "text/plain", body)
        elif behaviour is PolicyBehaviour.NOT_FOUND:
            await _respond(writer, 404, "text/plain", b"not found\n")
        elif behaviour is PolicyBehaviour.REDIRECT:
            target = self.policy_url(REDIRECT_TARGET)
            await _respond(writer, 301, "text/plain", b"moved\n", location=target)
        elif behaviour is PolicyBehaviour.WRONG_CONTENT_TYPE:
            await _respond(writer, 200, "text/html", body)
        elif behaviour is PolicyBehaviour.OVERSIZE:
            # Begins like a policy, so only the size can be the reason for a rejection. No
            # Content-Length (the body ends when the connection does, RFC 9112 §6.3), so a
            # client cannot refuse it up front and must cap what it reads.
            padding = b"x" * (OVERSIZE_BODY - len(body) - 1) + b"\n"
            await _respond(writer, 200, "text/plain", body + padding, content_length=False)
        elif behaviour is PolicyBehaviour.STALL:
            # Say nothing; wait for the client to give up (EOF) or for stop() to cancel us.
            while await reader.read(4096):
                pass
        else:  # pragma: no cover - a new enum member needs a branch here
            raise AssertionError(f"unhandled policy behaviour {behaviour!r}")

    def _policy_bytes(self) -> bytes:
        # Lone surrogates in a scenario's policy text become the raw bytes they escape, so a
        # scenario can serve invalid UTF-8 (e.g. "\udcff" is the byte 0xff).
        return self._mta_sts.body(self.domain).encode("utf-8", "surrogateescape")

    async def _handle_post(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request
    ) -> None:
        headers = dict(request.headers)
        if "transfer-encoding" in headers:
            await _respond(writer, 411, "text/plain", b"send Content-Length, not chunked\n")
            return
        raw_length = headers.get("content-length")
        if raw_length is None or not raw_length.isdigit():
            await _respond(writer, 411, "text/plain", b"Content-Length required\n")
            return
        length = int(raw_length)
        if length > MAX_POST_BODY:
            await _respond(writer, 413, "text/plain", f"limit {MAX_POST_BODY} bytes\n".encode())
            return
        async with asyncio.timeout(_IO_TIMEOUT):
            body = await reader.readexactly(length)
        self.posts.append(Post(request, body))
        await _respond(writer, 200, "text/plain", b"received\n")


class SharedPolicyListener:
    """One HTTPS listener at ``address``:``port`` for many policy hosts, chosen by SNI.

    Add each ``PolicyHost`` (made with the same address and port, never started itself)
    before clients connect to it. A ClientHello whose server name is none of theirs, or that
    names no server, fails the handshake (the callback asks for an ``unrecognized_name``
    alert, RFC 6066 §3, but asyncio closes the connection without sending it).
    """

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._hosts: dict[str, PolicyHost] = {}
        self._chosen: dict[int, PolicyHost] = {}  # by id() of the handshake's SSLObject
        self._server: asyncio.Server | None = None

    @property
    def hosts(self) -> dict[str, PolicyHost]:
        """The policy hosts behind this listener, by host name (``mta-sts.<domain>``)."""
        return dict(self._hosts)

    def add(self, host: PolicyHost) -> None:
        if (host.address, host.port) != (self.address, self.port):
            raise ValueError(
                f"policy host {host.name} is at {host.address}:{host.port}, "
                f"not at the shared listener's {self.address}:{self.port}"
            )
        self._hosts[host.name.lower()] = host

    async def remove(self, host: PolicyHost) -> None:
        """Take ``host`` off the listener and end its open connections."""
        if self._hosts.get(host.name.lower()) is host:
            del self._hosts[host.name.lower()]
        await host.stop()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"shared policy listener {self.address} is already running")
        # No certificate of its own: every handshake switches to the chosen host's context.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.sni_callback = self._choose
        self._server = await asyncio.start_server(
            self._on_connection,
            self.address,
            self.port,
            ssl=ctx,
            ssl_handshake_timeout=_IO_TIMEOUT,
            limit=MAX_HEAD,
        )

    async def stop(self) -> None:
        """Stop listening, then stop every policy host behind the listener."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for host in list(self._hosts.values()):
            await host.stop()
        if server is not None:
            await server.wait_closed()
        self._chosen.clear()

    def _choose(self, obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> int | None:
        host = self._hosts.get((name or "").rstrip(".").lower())
        if host is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        self._chosen[id(obj)] = host  # as in PolicyHost: a new handshake overwrites a reused id
        host._select(obj, name)
        return None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host = self._chosen.pop(id(writer.get_extra_info("ssl_object")), None)
        if host is None or self._hosts.get(host.name.lower()) is not host:
            writer.transport.abort()  # its host was removed during the handshake
            return
        await host._on_connection(reader, writer)


async def _read_head(reader: asyncio.StreamReader, sni: str | None) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"request head longer than {MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if len(exc.partial) >= MAX_HEAD:
            raise _BadRequest(431, f"request head longer than {MAX_HEAD} bytes") from None
        raise
    if len(head) > MAX_HEAD:
        raise _BadRequest(431, f"request head longer than {MAX_HEAD} bytes")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    request_line, *header_lines = text[:-4].split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"malformed request line {request_line!r}")
    method, target, _version = parts
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, f"malformed header line {line!r}")
        headers.append((name.lower(), value.strip()))
    path = target.split("?", 1)[0]
    host = next((v for k, v in headers if k == "host"), None)
    return Request(method, path, host, sni, tuple(headers))


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    *,
    location: str | None = None,
    allow: str | None = None,
    content_length: bool = True,
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}"]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    if location is not None:
        lines.append(f"Location: {location}")
    if allow is not None:
        lines.append(f"Allow: {allow}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)
    await writer.drain()


__all__ = [
    "MAX_HEAD",
    "OVERSIZE_BODY",
    "POLICY_PATH",
    "REDIRECT_TARGET",
    "PolicyHost",
    "Post",
    "Request",
    "SharedPolicyListener",
]
