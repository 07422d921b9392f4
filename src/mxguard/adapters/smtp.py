"""An asyncio SMTP client that can be trusted with a TLS policy (RFC 5321, RFC 3207).

The engine delivers a message to an MX host with this client and decides for itself, after the
handshake, whether the certificate is good enough (DANE, RFC 7672; or WebPKI, RFC 8461 §4.2).
So the client does the protocol and nothing else:

- ``starttls()`` upgrades the connection **without verifying anything inside the handshake**
  and hands back what the server presented (``TlsInfo``: chain, version, cipher); then it
  forgets the plain-text capabilities and sends EHLO again (RFC 3207 §4.2).
- With ``require_tls=True`` it refuses to send MAIL, RCPT, DATA or AUTH before TLS is up, as
  a last line of defence: no bug elsewhere can make it leak a message in plain text.
- Untrusted input is bounded: a reply line of more than ``MAX_LINE`` bytes, a reply of more
  than ``MAX_REPLY_LINES`` lines, or a step that takes longer than the step timeout is an
  ``SmtpError``, never a hang or an unbounded buffer.
- ``transcript`` records commands and reply lines (never message bodies or credentials) for
  people to read.

Error style: a method returns the server's ``Reply`` when the server answered the command it
was asked to send (a 550 to RCPT is the server's decision, not a client failure). It raises
``SmtpError`` when the step could not do what it is for: no connection, a timeout, a broken
reply, STARTTLS refused or failed, the TLS guard. ``SmtpError.result_type`` carries the RFC 8460
result type when the failure is one TLS-RPT reports name.

Reply parsing, dot-stuffing and the mailbox check are pure and live in ``protocol/smtp.py``;
this module re-exports them (``Reply``, ``ReplyError``, ``parse_reply``, ``parse_reply_line``,
``dot_stuff``, ``address_problem``, ``MAX_REPLY_LINES``) for the code that imports them from
here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import functools
import ssl
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from mxguard.protocol import names
from mxguard.protocol.results import ResultType
from mxguard.protocol.smtp import (
    MAX_REPLY_LINES,
    DotStuffer,
    Reply,
    ReplyError,
    address_problem,
    dot_stuff,
    parse_reply,
    parse_reply_line,
)

if TYPE_CHECKING:
    from cryptography import x509

# RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets, but real servers exceed it; this is
# the bound past which we stop believing we talk to an SMTP server.
MAX_LINE = 4096
MAX_CHAIN = 16  # certificates kept from the presented chain
DEFAULT_TIMEOUT = 60.0
TRANSCRIPT_LIMIT = 1000  # entries kept (the latest ones)
_TRANSCRIPT_TEXT = 300  # characters kept of one entry
_READ_HIGH_WATER = 64 * 1024  # stop reading from the socket while this much is unread
_CLOSE_GRACE = 2.0


class SmtpErrorKind(enum.StrEnum):
    """Why a step failed; one value per way an SMTP session can go wrong for a client."""

    CONNECT = "connect"  # no TCP connection
    TIMEOUT = "timeout"  # the step did not finish within its timeout
    CLOSED = "closed"  # the server closed the connection (or it was closed earlier)
    PROTOCOL = "protocol"  # the server broke RFC 5321 reply syntax or a bound
    REFUSED = "refused"  # the server answered with a refusal where we needed a yes
    NOT_OFFERED = "not-offered"  # the server does not offer the extension the step needs
    TLS = "tls"  # the TLS handshake failed
    TLS_REQUIRED = "tls-required"  # the require_tls guard stopped a plain-text command
    USAGE = "usage"  # the caller asked for something impossible (wrong order, bad argument)


class SmtpError(Exception):
    """A session step failed. ``step`` names it ("STARTTLS", "RCPT TO", ...), ``reply`` is the
    server's reply when there was one, ``result_type`` the RFC 8460 result type if any."""

    def __init__(
        self,
        kind: SmtpErrorKind,
        step: str,
        message: str,
        *,
        reply: Reply | None = None,
        result_type: ResultType | None = None,
    ) -> None:
        super().__init__(f"{step}: {message}")
        self.kind = kind
        self.step = step
        self.message = message
        self.reply = reply
        self.result_type = result_type


@dataclass(frozen=True)
class TlsInfo:
    """What the TLS handshake established; the chain is *unverified* (leaf first)."""

    server_name: str  # sent as SNI
    version: str  # "TLSv1.3"
    cipher: str
    ders: tuple[bytes, ...] = ()  # every certificate presented (up to MAX_CHAIN), as DER

    @functools.cached_property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """``ders`` parsed, up to the first certificate that is not: made when a check needs
        it (DANE, MTA-STS), not for every opportunistic session (cryptography's import
        costs a per-message ``mxguard send`` about 35 ms)."""
        return _parsed_chain(self.ders)


@dataclass(frozen=True, slots=True)
class TranscriptEntry:
    """One line of a session transcript: "C" sent, "S" received, "*" an event."""

    direction: str
    text: str

    def __str__(self) -> str:
        return f"{self.direction}: {self.text}"


def _client_tls_context() -> ssl.SSLContext:
    # No verification in the handshake: the caller verifies the presented chain afterwards
    # by DANE (RFC 7672) or WebPKI (RFC 8461 §4.2), which a TLS library cannot do for it. An
    # unverified session is still encrypted, which is what opportunistic TLS needs.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996; RFC 8461 §3.3 for MTA-STS
    return ctx


def _presented_ders(ssl_object: Any) -> tuple[bytes, ...]:
    """The certificates the server sent, leaf first, as DER."""
    getter = getattr(ssl_object, "get_unverified_chain", None)  # public from Python 3.13
    if getter is None:
        # Python 3.11/3.12: undocumented but present (see docs/lab-notes.md).
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    ders: list[bytes] = []
    if getter is not None:
        for cert in (getter() or [])[:MAX_CHAIN]:
            ders.append(ssl.PEM_cert_to_DER_cert(cert.public_bytes()))
    if not ders:
        leaf = ssl_object.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return tuple(ders)


def _parsed_chain(ders: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    """``ders`` parsed, until the first one cryptography cannot parse."""
    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    chain: list[x509.Certificate] = []
    for der in ders:
        try:
            with warnings.catch_warnings():
                # A serial number RFC 5280 forbids (negative, zero): OpenSSL accepts it.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            # Keep the prefix only: dropping a middle element would make the next one look
            # like it was sent in its place.
            break
    return tuple(chain)


def _tls_info(transport: asyncio.Transport, sni: str) -> TlsInfo:
    """What the handshake on ``transport`` established, and the chain the server presented."""
    ssl_object = transport.get_extra_info("ssl_object")
    cipher = ssl_object.cipher() if ssl_object is not None else None
    ders = _presented_ders(ssl_object) if ssl_object is not None else ()
    return TlsInfo(
        server_name=sni,
        version=str(ssl_object.version()) if ssl_object is not None else "unknown",
        cipher=str(cipher[0]) if cipher else "unknown",
        ders=ders,
    )


class _Stream(asyncio.Protocol):
    """The client's end of the connection: a bounded receive buffer and write flow control.

    A protocol of our own rather than asyncio streams because STARTTLS needs to know exactly
    which bytes arrived before the handshake (RFC 3207 §4.2: none of them may be taken as
    part of the protected session), and StreamReader does not say.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None  # let asyncio close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._writable.set()
        self._wake()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # used by SmtpClient
    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection is closed")
        self.transport.write(data)
        await self._writable.wait()
        if self.closed:
            raise ConnectionError("the connection closed while sending")

    async def read_line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n", 0, MAX_LINE + 2)
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                self._maybe_resume()
                if len(line.rstrip(b"\r\n")) > MAX_LINE:
                    raise ReplyError(f"reply line longer than {MAX_LINE} bytes")
                return line
            if len(self.buffer) > MAX_LINE + 1:
                raise ReplyError(f"reply line longer than {MAX_LINE} bytes")
            if self.closed:
                what = "in the middle of a reply line" if self.buffer else "instead of replying"
                raise ConnectionError(f"the server closed the connection {what}")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _maybe_resume(self) -> None:
        if self._reading_paused and len(self.buffer) < _READ_HIGH_WATER // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()


class SmtpClient:
    """One SMTP client session with one server.

    ``require_tls``: refuse MAIL, RCPT, DATA and AUTH unless STARTTLS has succeeded. Use as
    ``async with SmtpClient(...) as client:`` (closes on exit) or call ``close()`` yourself.
    """

    def __init__(self, *, require_tls: bool = False, transcript_limit: int = TRANSCRIPT_LIMIT):
        self.require_tls = require_tls
        self._stream: _Stream | None = None
        self._timeout = DEFAULT_TIMEOUT
        self._helo_name = ""
        self._peer: tuple[str, int] | None = None
        self._banner: Reply | None = None
        self._ehlo: Reply | None = None
        self._capabilities: dict[str, str] = {}
        self._tls: TlsInfo | None = None
        self._transcript: deque[TranscriptEntry] = deque(maxlen=max(1, transcript_limit))
        self._transcript_dropped = 0

    async def __aenter__(self) -> SmtpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._stream is not None and not self._stream.closed

    @property
    def peer(self) -> tuple[str, int] | None:
        return self._peer

    @property
    def local_address(self) -> str | None:
        """Our own address on this connection (the TLS-RPT ``sending-mta-ip``)."""
        if self._stream is None or self._stream.transport is None:
            return None
        sockname = self._stream.transport.get_extra_info("sockname")
        return str(sockname[0]) if sockname else None

    @property
    def banner(self) -> Reply | None:
        return self._banner

    @property
    def ehlo_reply(self) -> Reply | None:
        """The reply to the latest EHLO (or HELO); after STARTTLS, the one sent over TLS."""
        return self._ehlo

    @property
    def capabilities(self) -> Mapping[str, str]:
        """EHLO keywords (upper case) and their parameters, from the latest EHLO reply."""
        return MappingProxyType(self._capabilities)

    @property
    def starttls_offered(self) -> bool:
        return "STARTTLS" in self._capabilities

    @property
    def requiretls_offered(self) -> bool:
        """The latest EHLO reply lists REQUIRETLS (RFC 8689 §2); only the one sent over TLS
        means anything, since a plain-text one may have been written by the attacker."""
        return "REQUIRETLS" in self._capabilities

    @property
    def tls(self) -> TlsInfo | None:
        """The TLS session, once ``starttls()`` succeeded."""
        return self._tls

    @property
    def transcript(self) -> tuple[TranscriptEntry, ...]:
        """The latest ``TRANSCRIPT_LIMIT`` entries; ``transcript_dropped`` counts older ones."""
        return tuple(self._transcript)

    @property
    def transcript_dropped(self) -> int:
        return self._transcript_dropped

    def _note(self, direction: str, text: str) -> None:
        if len(self._transcript) == self._transcript.maxlen:
            self._transcript_dropped += 1
        if len(text) > _TRANSCRIPT_TEXT:
            text = text[:_TRANSCRIPT_TEXT] + f"... ({len(text)} characters)"
        self._transcript.append(TranscriptEntry(direction, text))

    # --- the session ------------------------------------------------------------------------

    async def connect(
        self,
        address: str,
        port: int = 25,
        *,
        helo_name: str,
        # Not this call's deadline but every step's, for the whole session: hence a parameter.
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> Reply:
        """Connect, read the banner, send EHLO (HELO if EHLO gets a 5xx); return the banner.

        ``timeout`` (seconds) bounds every later step of the session too.
        """
        if self._stream is not None:
            raise SmtpError(SmtpErrorKind.USAGE, "connect", "this client is already connected")
        _check_argument("connect", "helo_name", helo_name)
        if not helo_name:
            raise SmtpError(SmtpErrorKind.USAGE, "connect", "helo_name must not be empty")
        self._timeout, self._helo_name = timeout, helo_name
        self._note("*", f"connecting to {address}:{port}")
        self._stream, self._peer = await _open(address, port, timeout), (address, port)
        banner = await self._exchange(None, "banner")
        self._banner = banner
        if banner.code != 220:
            # RFC 5321 §3.1: a 554 greeting means "no service here"; the client should QUIT.
            await self.quit()
            raise SmtpError(
                SmtpErrorKind.REFUSED, "banner", f"server greeted with {banner}", reply=banner
            )
        try:
            await self._greet()
        except SmtpError as exc:
            if exc.kind is SmtpErrorKind.REFUSED:
                await self.quit()  # RFC 5321 §4.1.1.10: end a session we cannot use politely
            raise
        return banner

    async def _greet(self) -> None:
        self._capabilities = {}
        reply = await self._exchange(f"EHLO {self._helo_name}", "EHLO")
        if reply.code == 250:
            self._ehlo = reply
            for line in reply.lines[1:]:  # RFC 5321 §4.1.1.1: the first line is the greeting
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self._capabilities[keyword.upper()] = params.strip()
            return
        if reply.permanent:
            # RFC 5321 §3.2: a server that does not know EHLO answers 5xx; fall back to HELO.
            reply = await self._exchange(f"HELO {self._helo_name}", "HELO")
            if reply.code == 250:
                self._ehlo = reply
                return
        raise SmtpError(
            SmtpErrorKind.REFUSED, "EHLO", f"server refused our greeting: {reply}", reply=reply
        )

    async def starttls(self, server_name: str) -> TlsInfo:
        """Upgrade to TLS (RFC 3207) with SNI ``server_name``; verification is the caller's.

        Raises ``SmtpError`` with ``result_type`` ``starttls-not-supported`` when the server
        does not answer 220 (the session stays usable in plain text), ``validation-failure``
        when the handshake fails (the connection is closed).
        """
        if self._tls is not None:
            raise SmtpError(SmtpErrorKind.USAGE, "STARTTLS", "TLS is already active")
        sni = _server_name_indication(server_name)
        reply = await self._exchange(
            "STARTTLS", "STARTTLS", result_type=ResultType.STARTTLS_NOT_SUPPORTED
        )
        if reply.code != 220:
            raise SmtpError(
                SmtpErrorKind.REFUSED,
                "STARTTLS",
                f"server answered STARTTLS with {reply}",
                reply=reply,
                result_type=ResultType.STARTTLS_NOT_SUPPORTED,
            )
        stream = self._stream
        assert stream is not None and stream.transport is not None  # _exchange checked it
        if stream.buffer:
            # RFC 3207 §4.2: nothing received before the handshake belongs to the TLS session.
            # A server does not talk after its 220; bytes here were injected on the path.
            self._abort()
            raise SmtpError(
                SmtpErrorKind.PROTOCOL,
                "STARTTLS",
                f"{len(stream.buffer)} bytes of plain text arrived after the 220 reply, before "
                "the TLS handshake (an injection attempt, or a broken server)",
                result_type=ResultType.VALIDATION_FAILURE,
            )
        stream.transport = await self._handshake(stream, sni, server_name)
        info = _tls_info(stream.transport, sni)
        self._tls = info
        self._note("*", f"TLS established: {info.version}, {info.cipher}, SNI {sni}")
        # RFC 3207 §4.2: forget everything learnt in plain text and ask again.
        self._ehlo = None
        await self._greet()
        return info

    async def _handshake(self, stream: _Stream, sni: str, server_name: str) -> asyncio.Transport:
        """The TLS handshake on ``stream``'s transport; on failure the connection is aborted."""
        assert stream.transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                transport = await loop.start_tls(
                    stream.transport,
                    stream,
                    _client_tls_context(),
                    server_hostname=sni,
                    ssl_handshake_timeout=self._timeout,
                )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._abort()
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            raise SmtpError(
                SmtpErrorKind.TLS,
                "STARTTLS",
                f"TLS handshake with {server_name} {what}",
                result_type=ResultType.VALIDATION_FAILURE,
            ) from None
        if transport is None:
            self._abort()
            raise SmtpError(
                SmtpErrorKind.CLOSED,
                "STARTTLS",
                "the connection closed during the TLS handshake",
                result_type=ResultType.VALIDATION_FAILURE,
            )
        return transport

    async def auth(self, username: str, password: str) -> Reply:
        """AUTH PLAIN (RFC 4954 §4, RFC 4616) with an initial response; returns the reply."""
        self._guard("AUTH")
        mechanisms = self._capabilities.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms:
            raise SmtpError(
                SmtpErrorKind.NOT_OFFERED,
                "AUTH",
                f"server offers no AUTH PLAIN (offers: {', '.join(mechanisms) or 'no AUTH'})",
            )
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
        return await self._exchange(f"AUTH PLAIN {token}", "AUTH", shown="AUTH PLAIN ********")

    async def mail_from(self, address: str, params: Sequence[str] = ()) -> Reply:
        """MAIL FROM:<address> (RFC 5321 §4.1.1.2); "" is the null reverse-path."""
        self._guard("MAIL FROM")
        _check_address("MAIL FROM", address)
        words = list(params)
        for word in words:
            _check_argument("MAIL FROM", "parameter", word)
        if not address.isascii() and "SMTPUTF8" in self._capabilities:
            words.append("SMTPUTF8")  # RFC 6531 §3.4
        tail = "".join(" " + w for w in words)
        return await self._exchange(f"MAIL FROM:<{address}>{tail}", "MAIL FROM")

    async def rcpt_to(self, address: str) -> Reply:
        """RCPT TO:<address> (RFC 5321 §4.1.1.3)."""
        self._guard("RCPT TO")
        _check_address("RCPT TO", address)
        if not address:
            raise SmtpError(SmtpErrorKind.USAGE, "RCPT TO", "the recipient must not be empty")
        return await self._exchange(f"RCPT TO:<{address}>", "RCPT TO")

    async def data(self, message: bytes | Iterable[bytes]) -> Reply:
        """DATA, then ``message`` dot-stuffed (RFC 5321 §4.5.2); the reply to the final ".".

        ``message``: the bytes, or an iterable of chunks, which is sent as it is read (bounded
        memory, whatever its size). When the server does not answer DATA with 354 its reply is
        returned and nothing of the message is sent.
        """
        self._guard("DATA")
        reply = await self._exchange("DATA", "DATA")
        if reply.code != 354:
            return reply
        if isinstance(message, bytes):
            payload = dot_stuff(message)
            self._note("C", f"<message, {len(payload)} bytes on the wire>")
            return await self._exchange(payload, "end of data", shown=".")
        stuffer = DotStuffer()
        sent = 0
        for chunk in message:
            out = stuffer.feed(chunk)
            if out:
                await self._send_part(out, "DATA")
                sent += len(out)
        tail = stuffer.finish()
        self._note("C", f"<message, {sent + len(tail)} bytes on the wire>")
        return await self._exchange(tail, "end of data", shown=".")

    async def _send_part(self, data: bytes, step: str) -> None:
        """Write part of a command's data within the step timeout (progress, not the whole)."""
        stream = self._stream
        if stream is None or stream.closed:
            raise SmtpError(SmtpErrorKind.CLOSED, step, "not connected")
        try:
            async with asyncio.timeout(self._timeout):
                await stream.write(data)
        except TimeoutError:
            self._abort()
            raise SmtpError(
                SmtpErrorKind.TIMEOUT, step, f"could not send within {self._timeout:g} s"
            ) from None
        except (ConnectionError, OSError) as exc:
            self._abort()
            raise SmtpError(SmtpErrorKind.CLOSED, step, str(exc) or repr(exc)) from None

    async def noop(self) -> Reply:
        """NOOP (RFC 5321 §4.1.1.9): a round trip that proves the server is still there."""
        return await self._exchange("NOOP", "NOOP")

    async def quit(self) -> Reply | None:
        """QUIT politely and close; a server that does not answer in time is just cut off."""
        reply = None
        if self.connected:
            with contextlib.suppress(SmtpError):
                reply = await self._exchange("QUIT", "QUIT")
        await self.close()
        return reply

    async def close(self) -> None:
        """Close the connection (no QUIT); waits briefly for the close to complete."""
        stream, self._stream = self._stream, None
        if stream is None or stream.transport is None:
            return
        if not stream.closed:
            stream.transport.close()
            for _ in range(int(_CLOSE_GRACE / 0.01)):
                if stream.closed:
                    break
                await asyncio.sleep(0.01)
            else:
                stream.transport.abort()  # e.g. a TLS peer that never answers close_notify
        self._note("*", "connection closed")

    # --- internals --------------------------------------------------------------------------

    def _guard(self, step: str) -> None:
        if self.require_tls and self._tls is None:
            # Checked before anything is written: the command must not reach the wire.
            raise SmtpError(
                SmtpErrorKind.TLS_REQUIRED,
                step,
                "refusing to send this in plain text: the session requires TLS and STARTTLS "
                "has not succeeded (RFC 3207; policy: require_tls)",
            )

    def _abort(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and stream.transport is not None:
            stream.transport.abort()
            self._note("*", "connection aborted")

    async def _exchange(
        self,
        command: str | bytes | None,
        step: str,
        *,
        shown: str | None = None,
        result_type: ResultType | None = None,
    ) -> Reply:
        """Send ``command`` (a line without CRLF, or raw bytes) and read one reply, within
        the step timeout. Any failure closes the connection: its state is unknown."""
        stream = self._stream
        if stream is None or stream.closed:
            raise SmtpError(SmtpErrorKind.CLOSED, step, "not connected")
        if isinstance(command, str):
            _check_argument(step, "command", command)
            self._note("C", shown or command)
            data: bytes | None = command.encode("utf-8") + b"\r\n"
        else:
            if shown is not None:
                self._note("C", shown)
            data = command
        try:
            async with asyncio.timeout(self._timeout):
                if data is not None:
                    await stream.write(data)
                return await self._read_reply(stream)
        except TimeoutError:
            self._abort()
            raise SmtpError(
                SmtpErrorKind.TIMEOUT,
                step,
                f"no complete reply within {self._timeout:g} s",
                result_type=result_type,
            ) from None
        except ReplyError as exc:
            self._abort()
            raise SmtpError(
                SmtpErrorKind.PROTOCOL, step, f"malformed reply: {exc}", result_type=result_type
            ) from None
        except (ConnectionError, OSError) as exc:
            self._abort()
            raise SmtpError(
                SmtpErrorKind.CLOSED, step, str(exc) or repr(exc), result_type=result_type
            ) from None

    async def _read_reply(self, stream: _Stream) -> Reply:
        """One complete reply, each line noted in the transcript as it arrives."""
        lines: list[bytes] = []
        while True:
            raw = await stream.read_line()
            self._note("S", raw.rstrip(b"\r\n").decode("utf-8", "replace"))
            lines.append(raw)
            _, last, _ = parse_reply_line(raw)
            if last:
                break
            if len(lines) >= MAX_REPLY_LINES:
                raise ReplyError(f"reply has more than {MAX_REPLY_LINES} lines and is not finished")
        return parse_reply(lines)


async def _open(address: str, port: int, within: float) -> _Stream:
    """A TCP connection to ``address``:``port`` within ``within`` seconds, or SmtpError."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            _, stream = await loop.create_connection(_Stream, address, port)
    except TimeoutError:
        raise SmtpError(
            SmtpErrorKind.TIMEOUT,
            "connect",
            f"no connection to {address}:{port} within {within:g} s",
        ) from None
    except OSError as exc:
        raise SmtpError(
            SmtpErrorKind.CONNECT, "connect", f"cannot connect to {address}:{port}: {exc}"
        ) from None
    return stream


def _check_argument(step: str, what: str, value: str) -> None:
    # RFC 5321 §2.3.8: CR and LF only as the line ending; in an argument they would let the
    # caller's data inject commands.
    if "\r" in value or "\n" in value or "\0" in value:
        raise SmtpError(SmtpErrorKind.USAGE, step, f"{what} {value[:60]!r} contains CR, LF or NUL")


def _server_name_indication(server_name: str) -> str:
    """``server_name`` as SNI: RFC 6066 §3, a DNS host name without the trailing dot."""
    _check_argument("STARTTLS", "server_name", server_name)
    try:
        sni = names.dns_name(server_name)
    except names.HostNameError:
        sni = ""
    if not sni or sni.startswith(".") or sni != sni.strip():
        raise SmtpError(
            SmtpErrorKind.USAGE,
            "STARTTLS",
            f"server_name {server_name!r} is not a host name to send as SNI (e.g. mx.example.com)",
        )
    return sni


def _check_address(step: str, address: str) -> None:
    problem = address_problem(address)
    if problem is not None:
        raise SmtpError(SmtpErrorKind.USAGE, step, problem)


__all__ = [
    "MAX_LINE",
    "MAX_REPLY_LINES",
    "Reply",
    "ReplyError",
    "SmtpClient",
    "SmtpError",
    "SmtpErrorKind",
    "TlsInfo",
    "TranscriptEntry",
    "address_problem",
    "dot_stuff",
    "parse_reply",
    "parse_reply_line",
]
