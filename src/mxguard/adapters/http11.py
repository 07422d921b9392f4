"""The HTTP/1.1 exchange of the MTA-STS policy fetch (adapters/https.py): one request and its
response on one TLS connection, read with h11. A module of its own so that h11 is imported
by the fetch that needs it, not by every command that imports the fetch's module."""

from __future__ import annotations

import asyncio
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

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def send(self, request: Request) -> None:
        assert self.transport is not None
        try:
            head = h11.Request(
                method="GET", target=POLICY_PATH, headers=list(request.headers.items())
            )
            self.transport.write(self.h11.send(head) + (self.h11.send(h11.EndOfMessage()) or b""))
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
