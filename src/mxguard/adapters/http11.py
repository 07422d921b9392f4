"""The HTTP/1.1 exchange of the MTA-STS policy fetch (adapters/https.py): one request and its
response on one TLS connection, read with h11. A module of its own so that h11 is imported
by the fetch that needs it, not by every command that imports the fetch's module.

TLS is done here (``TlsExchange``, OpenSSL through ``ssl.MemoryBIO``), not by asyncio's
``SSLProtocol``: that one allocates a 256 KiB read buffer per connection, 3 % of the CPU of a
burst of cold lookups, and heap the allocator keeps after it (tens of MiB of RSS after 32
concurrent fetches); a policy fetch reads a few hundred bytes."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import h11

from mxguard.adapters.https import BODY_SLICE, MAX_HEAD, POLICY_PATH, FetchAbort
from mxguard.protocol.results import ResultType

if TYPE_CHECKING:
    from mxguard.adapters.https import _Request as Request


class Head:
    """A response head as ``check_response`` reads it (like ``httpx.Response``'s)."""

    def __init__(self, response: h11.Response) -> None:
        self.status_code = response.status_code
        # Header names are case-insensitive (h11 gives them in lower case); a repeated field
        # keeps its first value.
        self.headers: dict[str, str] = {}
        for name, value in response.headers:
            self.headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))


class Exchange(asyncio.BufferedProtocol):
    """One HTTP/1.1 request and its response on one TLS connection, read with h11.

    The TLS layer decrypts into a buffer of ``BODY_SLICE`` bytes, and reading pauses after
    every piece until the fetch has taken what h11 made of it, so that an over-long body is
    abandoned at the cap, not decrypted to its end."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self._wake: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        self._buffer = memoryview(bytearray(BODY_SLICE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        if self.transport is not None:
            self.transport.pause_reading()
        self._wakeup()

    def eof_received(self) -> None:
        self.h11.receive_data(b"")
        self._wakeup()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("the connection closed before the response ended")
        self._wakeup()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def send(self, request: Request) -> None:
        assert self.transport is not None
        try:
            head = h11.Request(
                method="GET", target=POLICY_PATH, headers=list(request.headers.items())
            )
            self._write(self.h11.send(head) + (self.h11.send(h11.EndOfMessage()) or b""))
        except h11.ProtocolError as exc:  # a header h11 will not write: no request goes out
            raise ConnectionError(f"HTTP/1.1 request not sent: {exc}") from None

    async def _event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise FetchAbort(
                    ResultType.STS_POLICY_FETCH_ERROR, f"the response is not HTTP/1.1: {exc}"
                ) from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            if self._lost is not None:
                raise self._lost
            assert self.transport is not None
            self._wake = asyncio.get_running_loop().create_future()
            self.transport.resume_reading()
            await self._wake

    async def head(self) -> Head:
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                return Head(event)
            if isinstance(event, h11.InformationalResponse):
                continue  # 1xx: the real response follows
            raise ConnectionError("the connection closed before the response head")

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._event()
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                for at in range(0, len(data), BODY_SLICE):
                    yield data[at : at + BODY_SLICE]
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ConnectionError("the connection closed before the body ended")


# Ciphertext read per call: one TLS record at most (16 KiB of data and its overhead).
RAW_SLICE = 16 * 1024 + 512


class TlsExchange(Exchange):
    """``Exchange`` over TLS on a plain TCP connection: ``handshake`` completes (or raises
    what OpenSSL raised: ``ssl.SSLCertVerificationError`` for a certificate it refused) before
    the request is sent. The certificate is checked by ``ctx`` for ``server_hostname``, which
    is also the SNI. A close without close_notify ends the response as a TCP close would,
    as asyncio's TLS transport treats it; h11 then tells a truncated body from a whole one."""

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._raw = memoryview(bytearray(RAW_SLICE))
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False  # the TLS stream ended (close_notify, TCP close or an error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._advance()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._raw

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(self._raw[:nbytes])
        self._advance()

    def eof_received(self) -> None:
        self._incoming.write_eof()
        self._advance()
        if not self._closed:  # the EOF came during the handshake: h11 hears the end too
            self._closed = True
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(
                exc or ConnectionResetError("the connection closed during the TLS handshake")
            )
        super().connection_lost(exc)

    def _write(self, data: bytes) -> None:
        self.tls.write(data)
        self._send_out()

    def _send_out(self) -> None:
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _advance(self) -> None:
        """Go on with the handshake, or decrypt what has arrived and hand it to h11."""
        if not self.handshake.done():
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_out()
                return
            except (ssl.SSLError, OSError) as exc:
                self._send_out()  # the alert, if OpenSSL made one
                self.handshake.set_exception(exc)
                return
            self._send_out()
            self.handshake.set_result(None)
        if self._closed:
            return
        pieces: list[bytes] = []
        ended: Exception | None = None
        finished = False
        while True:
            try:
                piece = self.tls.read(BODY_SLICE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                finished = True  # close_notify, or a TCP close without it
                break
            except ssl.SSLError as exc:
                ended = exc
                break
            if not piece:
                finished = True
                break
            pieces.append(piece)
        self._send_out()  # TLS 1.3 may answer (a key update)
        if pieces:
            super().data_received(b"".join(pieces))
        if ended is not None:
            self._closed = True
            self._lost = ended
            self._wakeup()
        elif finished:
            self._closed = True
            super().eof_received()
