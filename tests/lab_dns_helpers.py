"""Helpers for the lab DNS tests: an event loop in a thread, and short query functions.

The lab's servers are asyncio objects; the tests are plain functions. ``LoopThread`` runs one
event loop in a daemon thread for a whole module, so servers stay up between tests, and
``run()`` executes a coroutine there and waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import dns.rrset

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def query(
    name: str,
    rdtype: str,
    server: tuple[str, int],
    *,
    dnssec: bool = True,
    tcp: bool = False,
    payload: int | None = None,
) -> dns.message.Message:
    """One query; ``dnssec`` sets DO and AD (RFC 6840 §5.7), as a DANE client does."""
    if dnssec:
        q = dns.message.make_query(name, rdtype, want_dnssec=True, payload=payload or 1232)
        q.flags |= dns.flags.AD
    elif payload is not None:
        q = dns.message.make_query(name, rdtype, use_edns=0, payload=payload)
    else:
        q = dns.message.make_query(name, rdtype, use_edns=False)
    address, port = server
    if tcp:
        return dns.query.tcp(q, address, port=port, timeout=5)
    return dns.query.udp(q, address, port=port, timeout=5, ignore_trailing=True)


def authenticated(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


def data(response: dns.message.Message, rdtype: str) -> list[dns.rrset.RRset]:
    """The answer RRsets of ``rdtype`` (RRSIGs left out)."""
    wanted = dns.rdatatype.from_text(rdtype)
    return [r for r in response.answer if r.rdtype == wanted]


def extended_errors(response: dns.message.Message) -> list[dns.edns.EDEOption]:
    return [o for o in response.options if isinstance(o, dns.edns.EDEOption)]
