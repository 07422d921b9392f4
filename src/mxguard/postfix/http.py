"""The Postfix policy server's small HTTP endpoint: ``/healthz`` and Prometheus ``/metrics``.

One request per connection, ``GET`` only, answered and closed. The request head is bounded
(8 KiB, 5 s) and nothing of it is used but the method and the path. What the answers say comes
from the caller: ``problem()`` (None while the server is up and its store works, else what is
wrong: stopping, a store error) and ``metrics()`` (the text to serve), both called only when
their path is asked for. Touches only the one connection it
is given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

MAX_HEAD = 8192  # bytes of request line and header fields
HEAD_TIMEOUT = 5.0  # seconds to receive them


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    problem: Callable[[], str | None],
    metrics: Callable[[], str],
) -> None:
    """Answer the one request on this connection and close it."""
    head = await _read_head(reader)
    response = None if head is None else _respond(*head, problem=problem, metrics=metrics)
    if response is None:
        writer.close()
        return
    status, body = response
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, int] | None:
    """``(request line, bytes read)``, or None when the client was too slow or went away.

    The head ends with an empty line; lines may end in CRLF or a bare LF (RFC 9112 §2.2 lets a
    server accept both). Reading stops past ``MAX_HEAD`` bytes.
    """
    request_line = b""
    size = 0
    try:
        async with asyncio.timeout(HEAD_TIMEOUT):
            while True:
                line = await reader.readline()
                size += len(line)
                if not line or size > MAX_HEAD:
                    break
                if not request_line:
                    request_line = line
                elif line in (b"\r\n", b"\n"):
                    break
    except (TimeoutError, ValueError, ConnectionError):
        return None
    return request_line, size


def _respond(
    request_line: bytes,
    size: int,
    *,
    problem: Callable[[], str | None],
    metrics: Callable[[], str],
) -> tuple[str, str] | None:
    """``(status, body)`` for the request, or None: no request at all, close without a word."""
    parts = request_line.strip().split(b" ")
    path = parts[1].decode("ascii", "replace").partition("?")[0] if len(parts) >= 2 else ""
    if size > MAX_HEAD:
        return "431 Request Header Fields Too Large", "request head over 8 KiB\n"
    if not request_line.strip():
        return None
    if parts[0] != b"GET":
        return "405 Method Not Allowed", "only GET\n"
    if path == "/healthz":
        wrong = problem()
        return ("200 OK", "ok\n") if wrong is None else ("503 Service Unavailable", f"{wrong}\n")
    if path == "/metrics":
        return "200 OK", metrics()
    return "404 Not Found", "try /healthz or /metrics\n"
