"""The policy fetch's own TLS layer (adapters/http11.py ``TlsExchange``), against real TLS
servers on loopback that end connections in the ways a hostile or broken policy host can: a
close in the middle of the handshake, no TLS at all, a body cut short with and without
close_notify, a body spread over many TLS records. Each must give a clear fetch error or
the exact body, never a hang. Servers listen on 127.205.0.0/16."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from mxguard.adapters.https import FetchResult, fetch_policy
from mxguard.lab.pki import LabPKI
from mxguard.protocol.results import ResultType

DOMAIN = "tls-layer.test"
_numbers = itertools.count(1)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


def serve_and_fetch(pki: LabPKI, handler: Handler, *, tls: bool = True) -> FetchResult:
    async def body() -> FetchResult:
        address = f"127.205.0.{next(_numbers)}"
        ctx = pki.issue(f"mta-sts.{DOMAIN}").server_context() if tls else None
        server = await asyncio.start_server(handler, address, 8443, ssl=ctx)
        try:
            return await fetch_policy(
                DOMAIN, connect_to=address, port=8443, ca_file=pki.ca_file, timeout=5.0
            )
        finally:
            server.close()

    return asyncio.run(body())


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


def _head(length: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\n\r\n".encode()
    )


POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.tls-layer.test\r\nmax_age: 86400\r\n"


def test_a_policy_over_many_tls_records_arrives_exactly(pki: LabPKI) -> None:
    text = POLICY + "".join(f"mx: mx{i}.tls-layer.test\r\n" for i in range(1500))  # ~40 KB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        data = text.encode()
        writer.write(_head(len(data)))
        for at in range(0, len(data), 1000):  # one TLS record per write
            writer.write(data[at : at + 1000])
            await writer.drain()
        writer.close()

    result = serve_and_fetch(pki, handler)
    assert result.ok, result.detail
    assert result.text == text
    assert result.certificate  # the peer's certificate, as the report needs it


def test_a_body_ended_by_close_notify_is_the_whole_body(pki: LabPKI) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        writer.write(POLICY.encode())
        writer.close()  # TLS close_notify, then TCP close: the end of a body without length
        await writer.wait_closed()

    result = serve_and_fetch(pki, handler)
    assert result.ok, result.detail
    assert result.text == POLICY


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "tcp_close_only"])
def test_a_body_cut_short_is_a_fetch_error_not_a_policy(pki: LabPKI, close_notify: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 500\r\n\r\n")
        writer.write(POLICY.encode())  # fewer than 500 bytes
        await writer.drain()
        if close_notify:
            writer.close()
        else:
            writer.transport.abort()  # no close_notify: a truncation attack looks like this

    result = serve_and_fetch(pki, handler)
    assert not result.ok and result.text is None
    assert result.result_type is ResultType.STS_POLICY_FETCH_ERROR
    assert "without sending complete message body" in result.detail, result.detail


def test_a_close_during_the_handshake_is_a_quick_fetch_error(pki: LabPKI) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)  # the start of the ClientHello, then gone
        writer.transport.abort()

    result = serve_and_fetch(pki, handler, tls=False)
    assert result.result_type is ResultType.STS_POLICY_FETCH_ERROR
    assert result.elapsed < 4  # not the 5 s deadline: the close is noticed
    assert result.status is None


def test_a_host_that_answers_without_tls_is_a_fetch_error_naming_tls(pki: LabPKI) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    result = serve_and_fetch(pki, handler, tls=False)
    # Not sts-webpki-invalid: no certificate was ever presented.
    assert result.result_type is ResultType.STS_POLICY_FETCH_ERROR
    assert "SSL" in result.detail or "TLS" in result.detail, result.detail
    assert result.elapsed < 4


def test_an_untrusted_certificate_is_webpki_invalid(
    pki: LabPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = LabPKI(tmp_path_factory.mktemp("other"))  # a CA the fetch does not trust

    async def body() -> FetchResult:
        address = f"127.205.0.{next(_numbers)}"
        ctx = other.issue(f"mta-sts.{DOMAIN}").server_context()
        server = await asyncio.start_server(lambda r, w: None, address, 8443, ssl=ctx)
        try:
            return await fetch_policy(
                DOMAIN, connect_to=address, port=8443, ca_file=pki.ca_file, timeout=5.0
            )
        finally:
            server.close()

    result = asyncio.run(body())
    assert result.result_type is ResultType.STS_WEBPKI_INVALID
    assert f"mta-sts.{DOMAIN}" in result.detail


def test_a_fetch_reads_with_a_record_sized_buffer_not_asyncios_256_kib(
    pki: LabPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio's TLS transport allocates max_size (256 KiB) per connection; after a burst of
    # concurrent fetches the allocator keeps that heap (RSS after the cold benchmark).
    import asyncio.sslproto

    from mxguard.adapters import http11

    made: list[object] = []
    original = asyncio.sslproto.SSLProtocol.__init__

    def counting(self: object, *args: object, **kwargs: object) -> None:
        made.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "__init__", counting)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        data = POLICY.encode()
        writer.write(_head(len(data)) + data)
        writer.close()

    result = serve_and_fetch(pki, handler)
    assert result.ok, result.detail
    server_side = 1  # the test's own server uses asyncio's TLS transport
    assert len(made) == server_side, "the fetch used asyncio's SSLProtocol"
    assert http11.RAW_SLICE <= 17 * 1024
