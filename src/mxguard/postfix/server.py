"""``mxguard serve postfix``: the socketmap (and tcp_table) policy server for Postfix.

Postfix asks ``smtp_tls_policy_maps`` once per delivery attempt and waits for the answer, so
this server's first duty is **never to stall Postfix**:

- an in-memory answer cache keyed by domain: a hit answers at once, without DNS queries;
  an answer lives ``answer_ttl`` seconds (never past the MTA-STS policy's expiry, RFC 8461
  §5); ``TEMP`` answers only ``temp_ttl`` seconds;
- a miss resolves within ``budget`` seconds; past it the reply is ``TEMP policy lookup in
  progress`` while the resolution goes on in the background and fills the cache (Postfix
  retries the message later; the retry is a hit);
- concurrent misses for one domain share one resolution (and the MTA-STS layer shares one
  fetch, with back-off after failures);
- a refresher re-resolves domains used within ``hot_window`` before their answer expires,
  so hot domains never miss;
- per connection (an asyncio protocol, ``_Connection``): a cache hit is answered inside the
  read callback, from reply bytes made when the answer was cached — no task, no timer, no
  stream, no parsing of a request seen before; a miss becomes a task. Bounded buffers (see
  ``netstring``; one read of the transport, ``WRITE_HIGH`` bytes of replies not yet taken),
  pipelined requests answered in order (at most ``max_pipeline`` resolving at once), a
  defined reply to every request, malformed ones included;
- connections that do not ask cannot keep out one that does (``connections.py``): past
  ``max_connections`` a new connection evicts the oldest connection without a request, else
  the one idle longest; deadlines for the first request, for idleness after the last reply
  and for a client to take its replies.

What was served is recorded for TLS reporting (``served.py``): each resolution whose answer
Postfix delivers under is offered to a ``ServedRecorder``, which never delays or changes an
answer.

Operations: ``/healthz`` and Prometheus ``/metrics`` on a small HTTP listener (``http.py``,
``metrics.py``); ``reload()`` (SIGHUP) opens a new engine from re-read settings and keeps the
answer cache (its entries are refreshed soon); ``stop()`` (SIGTERM) stops accepting, answers
what was already received, closes the connections and the engine.

Tests and the Postfix integration harness run it on a background thread (``harness.py``)::

    with PolicyServer(settings, listen="inet:127.0.0.1:0") as server:
        host, port = server.socketmap_address

The other modules of this package: ``listen.py`` (listen addresses), ``cache.py`` (the answer
cache), ``connections.py`` (which connection to close, and when), ``query.py`` (one answer
without the server: ``serve postfix --query``), ``options.py`` (``Options`` from the config),
``netstring.py`` (framing), ``answers.py`` (policy to answer). This module touches sockets
(its listeners and their connections), the engine it opens or is given, the process's
open-files limit (raised to fit ``max_connections``) and nothing else;
``mxguard.postfix.server`` still exports the names that moved out of it (``__all__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from mxguard.adapters.store import StoreError
from mxguard.config import Settings
from mxguard.engine.context import Engine, engine
from mxguard.engine.policy import DeliveryPolicy
from mxguard.engine.resolve import DomainError
from mxguard.engine.sts import StoreFaults
from mxguard.postfix import answers, http
from mxguard.postfix.answers import Answer, Key, Options
from mxguard.postfix.cache import AnswerCache, lifetime
from mxguard.postfix.connections import ConnectionTable
from mxguard.postfix.harness import ThreadHarness
from mxguard.postfix.listen import Listen, ListenError, bound
from mxguard.postfix.metrics import Metrics
from mxguard.postfix.netstring import (
    MAX_REQUEST,
    LineDecoder,
    Malformed,
    NetstringDecoder,
    PercentError,
    Request,
    encode,
    pct_decode,
)
from mxguard.postfix.options import options_from
from mxguard.postfix.query import policy_answer, query
from mxguard.postfix.served import ServedRecorder, served_record

log = logging.getLogger(__name__)

IN_PROGRESS = "policy lookup in progress"
LEARNED_EVERY = 5.0  # seconds between readings of the learned levels for /metrics

# Per connection, bytes of replies the transport may hold that the client has not taken yet;
# past it the connection reads no more and send_timeout runs. What it may hold of requests:
# one read of the transport (decoded MAX_REQUEST bytes at a time, as the pipeline allows).
WRITE_HIGH = 16384
# A burst of connections waits in the kernel's listen queue (up to LISTEN_QUEUE; the kernel
# caps it at net.core.somaxconn) rather than being dropped, which would cost each dropped
# client a SYN retransmission (1 s); asyncio accepts at most ACCEPT_BATCH of them per turn of
# the loop, so a burst holds at most a few batches of descriptors beyond max_connections.
LISTEN_QUEUE = 4096
ACCEPT_BATCH = 128
FD_RESERVE = 256  # descriptors beside the connections: store, DNS, policy fetches, listeners
RECORDER_KNOWN = 20_000


# What a protocol's "answer now" function gives for a request: the reply bytes, or the
# coroutine that will give them (a resolution).
Later = Coroutine[Any, Any, bytes]
SOCKETMAP_FAILED = encode(answers.temp("internal error").socketmap())
TCP_TABLE_FAILED = answers.temp("internal error").tcp_table()


_READ_BUFFER = memoryview(bytearray(65536))


class _Connection(asyncio.BufferedProtocol):
    """One socketmap or tcp_table connection, as an asyncio protocol.

    A request that can be answered at once (a cache hit, a malformed request, a key that
    needs no policy) is answered inside ``data_received``: no task, no timer, no stream. A
    request that needs a resolution becomes a task. Replies leave in request order: while
    one is outstanding, later ones wait in ``_pending`` behind it. Bounded: at most
    ``max_pipeline`` requests outstanding (then reading pauses and the rest of what was read
    waits, undecoded or decoded, until replies have left), and nothing more is read while
    the client does not take its replies (the transport's write buffer is over
    ``WRITE_HIGH``; ``send_timeout`` then runs, in the server's one sweeper).
    """

    def __init__(
        self,
        server: PolicyServer,
        decoder: NetstringDecoder | LineDecoder,
        now: Callable[[Request | Malformed, float], bytes | Later],
        failed: bytes,
        hit: Callable[[bytes, float], bytes | None] | None = None,
    ) -> None:
        self.server = server
        self.table = server._connections
        self.decoder = decoder
        self.answer_now = now
        self.failed = failed
        # The reply to a request payload whose answer is cached, else None: the hot path,
        # taken for a read that is one whole netstring with nothing before it in flight.
        self.hit = hit if isinstance(decoder, NetstringDecoder) else None
        self.transport: asyncio.Transport | None = None
        # Replies in request order: bytes ready to go, or the task that will make them.
        self._pending: deque[bytes | asyncio.Task[bytes]] = deque()
        self._events: deque[Request | Malformed] = deque()  # decoded, not yet started
        self._unread = b""  # received, not yet decoded (reading is paused meanwhile)
        self._paused = False  # reading paused by us
        self._blocked = False  # writing paused by the transport: the client is slow
        self._finishing = False  # EOF, lost framing or stop: close once everything is out
        self._lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.BufferedProtocol ------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        # Every connection reads into the one buffer of the process: what was read is copied
        # out in buffer_updated before the loop reads anything else. A plain Protocol gets a
        # new 256 KiB bytes object per read, which the allocator keeps after a burst of
        # connections (tens of MiB of RSS for requests of a few dozen bytes).
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(_READ_BUFFER[:nbytes])
        hit = self.hit
        if hit is not None and not (
            self._pending or self._events or self._unread or self._paused or self._finishing
        ):
            assert isinstance(self.decoder, NetstringDecoder) and self.transport is not None
            payload = self.decoder.whole(data)
            if payload is not None:
                now = time.monotonic()
                reply = hit(payload, now)
                if reply is not None:
                    self.transport.write(reply)
                    self.table.answered_at_once(self, now)
                    return
        self.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.server._admit(self):
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        if self._finishing or self._lost:
            return
        if self._unread or self._events or self._paused:
            self._unread += data  # cannot happen while paused; kept in order if it does
            return
        self._take(data)

    def eof_received(self) -> bool:
        # Answer what was asked, then close (a client may half-close after its requests).
        self._finishing = True
        self._close_when_done()
        return True

    def pause_writing(self) -> None:
        self._blocked = True
        self.server._send_blocked(self, True)
        self._pause()

    def resume_writing(self) -> None:
        self._blocked = False
        self.server._send_blocked(self, False)
        self._more()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for item in self._pending:
            if isinstance(item, asyncio.Task):
                item.cancel()  # a shared resolution is shielded: only this wait ends
        self._pending.clear()
        self._events.clear()
        self._unread = b""
        self.server._closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- the server's side --------------------------------------------------------------

    def abort(self) -> None:
        """Close at once, dropping unsent replies (the client is not taking them anyway)."""
        if self.transport is not None:
            self.transport.abort()

    def finish(self) -> None:
        """Read no more; close once what was received is answered (the server stops)."""
        self._finishing = True
        self._pause()
        self._close_when_done()

    # --- inside ---------------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """Decode and answer ``data``, a slice at a time, while the limits allow."""
        at = 0
        while at < len(data):
            if self._full():
                self._unread = data[at:]
                self._pause()
                return
            chunk = data[at : at + MAX_REQUEST] if len(data) - at > MAX_REQUEST else data[at:]
            at += len(chunk)
            self._events.extend(self.decoder.feed(chunk))
            self._start()
            if self.decoder.dead:
                self._finishing = True
                self._pause()
                self._close_when_done()
                return

    def _full(self) -> bool:
        return self._blocked or len(self._pending) >= self.server.max_pipeline

    def _start(self) -> None:
        """Answer or start the decoded requests, in order, while the limits allow."""
        events, pending, table, transport = self._events, self._pending, self.table, self.transport
        assert transport is not None
        now = time.monotonic()
        while events and not self._full():
            event = events.popleft()
            got = self.answer_now(event, now)
            if isinstance(got, bytes):
                if not pending:
                    transport.write(got)  # the hot path: a hit with nothing before it
                    table.answered_at_once(self, now)
                    continue
                table.received(self)
                pending.append(got)
                continue
            table.received(self)
            task = asyncio.create_task(got)
            self.server._tasks.add(task)
            task.add_done_callback(self._done)
            pending.append(task)
        if events:
            self._pause()

    def _done(self, task: asyncio.Task[bytes]) -> None:
        self.server._tasks.discard(task)
        if self._lost:
            return
        self._flush()
        self._more()

    def _flush(self) -> None:
        """Write the replies at the head of the queue that are ready."""
        pending, transport = self._pending, self.transport
        assert transport is not None
        now = None
        while pending:
            head = pending[0]
            if isinstance(head, asyncio.Task):
                if not head.done():
                    break
                try:
                    data = head.result()
                except asyncio.CancelledError:
                    data = b""  # cancelled at the end of stop()'s grace: nothing to send
                except Exception:
                    log.exception("answering a request failed")
                    data = self.failed
            else:
                data = head
            pending.popleft()
            if data and not transport.is_closing():
                transport.write(data)
            now = time.monotonic() if now is None else now
            self.table.answered(self, now)

    def _more(self) -> None:
        """Go on with what waits (decoded requests, unread bytes), then read again."""
        if self._lost:
            return
        if self._events and not self._full():
            self._start()
        if self._unread and not self._events and not self._full() and not self._finishing:
            data, self._unread = self._unread, b""
            self._take(data)
        if self._finishing:
            self._close_when_done()
        elif self._paused and not self._full() and not self._events and not self._unread:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def _close_when_done(self) -> None:
        if self._lost or self.transport is None:
            return
        if self._events and not self._full():
            self._start()
        if not self._pending and not self._events:
            self.transport.close()


class PolicyServer(ThreadHarness):
    """The Postfix policy server. ``source``: settings (the server opens and owns the engine)
    or an already open ``Engine`` (the caller owns it; ``reload()`` then needs settings)."""

    def __init__(
        self,
        source: Settings | Engine,
        *,
        listen: str | Sequence[str] | None = "inet:127.0.0.1:8461",
        tcp_table: str | None = None,
        metrics: str | None = None,
        options: Options | None = None,
        budget: float = 5.0,
        answer_ttl: float = 300.0,
        temp_ttl: float = 10.0,
        hot_window: float = 3600.0,
        refresh_interval: float = 1.0,
        max_entries: int = 100_000,
        max_pipeline: int = 64,
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        first_request_timeout: float = 10.0,
        send_timeout: float = 10.0,
        grace: float = 10.0,
    ) -> None:
        specs = [listen] if isinstance(listen, str) else list(listen or [])
        self.listen = [Listen.parse(s) for s in specs]
        self.tcp_table = Listen.parse(tcp_table) if tcp_table else None
        self.metrics_listen = Listen.parse(metrics) if metrics else None
        self.options = options or Options()
        self.budget = budget
        self.answer_ttl = answer_ttl
        self.temp_ttl = temp_ttl
        self.hot_window = hot_window
        self.refresh_interval = refresh_interval
        self._learned_next = 0.0  # when /metrics may read the learned levels again
        self._learned_gauges: dict[str, float] = {}
        self._alarm_enforcing = False
        self.max_pipeline = max_pipeline
        # The connection policy (connections.py, docs/postfix.md "Connections"): past
        # max_connections a new connection evicts the oldest waiting or idle one; a connection
        # without a complete request is closed after first_request_timeout, an idle one
        # idle_timeout after its last reply, one that does not take its replies after
        # send_timeout. Postfix's socketmap client sends its request as soon as it connects,
        # closes its connection after 10 s idle and retries a lookup once on a new connection
        # when the old one was closed, so none of this costs Postfix an answer.
        if min(max_connections, idle_timeout, first_request_timeout, send_timeout) <= 0:
            raise ValueError("connection limits and timeouts must be positive")
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.first_request_timeout = first_request_timeout
        self.send_timeout = send_timeout
        self.grace = grace
        self.metrics = Metrics()
        # Kept across reloads: every engine this server opens reports its store faults here.
        self.store_faults = StoreFaults()
        # The recorder remembers what it last wrote for at most RECORDER_KNOWN domains (a
        # domain it forgot is compared with the store instead): 100,000 cached answers then
        # fit in 150 MB (bench/README.md).
        self.recorder = ServedRecorder(
            lambda: self.engine.store, self.metrics, max_known=RECORDER_KNOWN
        )
        self._settings = source if isinstance(source, Settings) else None
        self._engine: Engine | None = source if isinstance(source, Engine) else None
        self._owned: contextlib.AsyncExitStack | None = None
        self._cache = AnswerCache(max_entries)
        self._resolving: dict[str, asyncio.Task[Answer]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._connections: ConnectionTable[_Connection] = ConnectionTable(
            max_connections=max_connections,
            first_request_timeout=first_request_timeout,
            idle_timeout=idle_timeout,
        )
        self._open: set[_Connection] = set()  # socketmap and tcp_table connections
        self._send_deadlines: dict[_Connection, float] = {}  # clients not taking replies
        self._keys: dict[bytes, str] = {}  # socketmap request payload -> its domain
        self._refresher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._recording: asyncio.Task[None] | None = None
        self._stopping = False
        self.socketmap_addresses: list[Any] = []
        self.tcp_table_address: Any = None
        self.metrics_address: Any = None

    # --- life cycle -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the policy server is not started")
        return self._engine

    @property
    def socketmap_address(self) -> Any:
        """The first socketmap listener's bound address: (host, port) or a socket path."""
        return self.socketmap_addresses[0]

    async def start(self) -> None:
        if self._engine is None:
            if self._settings is None:
                raise RuntimeError("PolicyServer needs settings or an engine")
            self._owned = contextlib.AsyncExitStack()
            self._engine = await self._owned.enter_async_context(
                engine(self._settings, dns_cache=True)
            )
        self._adopt(self._engine)
        self._engine.sts.prepare()
        self._connections.max_connections = self.max_connections = _descriptors_for(
            self.max_connections
        )
        try:
            for where in self.listen:
                server = await self._listen(where, self._socketmap_client)
                self.socketmap_addresses.append(bound(server, where))
            if self.tcp_table is not None:
                server = await self._listen(self.tcp_table, self._tcp_table_client)
                self.tcp_table_address = bound(server, self.tcp_table)
            if self.metrics_listen is not None:
                server = await self._listen(self.metrics_listen, self._http_protocol)
                self.metrics_address = bound(server, self.metrics_listen)
        except BaseException:
            await self.stop()
            raise
        self._refresher = asyncio.create_task(self._refresh_loop(), name="mxguard-refresher")
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="mxguard-connections")
        self._recording = asyncio.create_task(self.recorder.run(), name="mxguard-served")
        log.info(
            "serving Postfix socketmap on %s%s",
            ", ".join(str(x) for x in self.listen),
            f", tcp_table on {self.tcp_table}" if self.tcp_table else "",
        )

    async def _listen(
        self, where: Listen, factory: Callable[[], asyncio.BaseProtocol]
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        if where.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if where.path.is_socket():
                    where.path.unlink()  # a stale socket from a previous run
            server = await loop.create_unix_server(
                factory, path=str(where.path), backlog=ACCEPT_BATCH
            )
            os.chmod(where.path, 0o666)  # Postfix's smtp processes run as another user
        else:
            server = await loop.create_server(factory, where.host, where.port, backlog=ACCEPT_BATCH)
        self._servers.append(server)
        for sock in server.sockets:
            # asyncio listens with the accept batch as the backlog; a second listen() only
            # lengthens the kernel's queue (the socket is shared with the duplicate).
            with contextlib.closing(sock.dup()) as same:
                same.listen(LISTEN_QUEUE)
        return server

    async def stop(self) -> None:
        """Stop accepting, answer what was received, close connections, close the engine."""
        self._stopping = True
        for server in self._servers:
            server.close()
        # Each connection answers what it has received, then closes; it reads no more.
        for conn in list(self._open):
            conn.finish()
        waiting = [conn.closed for conn in self._open if not conn.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=self.grace)
        for conn in list(self._open):
            conn.abort()  # past the grace: its replies are dropped, its requests cancelled
        late = [conn.closed for conn in self._open if not conn.closed.done()]
        if late:
            await asyncio.wait(late, timeout=1)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        self._servers.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._refresher is not None:
            self._refresher.cancel()
        for task in [*self._tasks, *([self._refresher] if self._refresher else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._refresher is not None:
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._recording is not None:
            self._recording.cancel()
            await asyncio.gather(self._recording, return_exceptions=True)
            self._recording = None
        if self._engine is not None:
            await self.recorder.flush()  # what was served until now, before the store closes
        for where in [*self.listen, *([self.tcp_table] if self.tcp_table else [])]:
            if where.path is not None:
                with contextlib.suppress(OSError):
                    where.path.unlink()
        if self._owned is not None:
            if self._engine is not None:
                # Fetches the cancelled resolutions left behind (a stalled policy host):
                # cancelled, and the cache writes finished, before the store closes.
                await self._engine.sts.close()
                self._engine.dns.close()  # its shared UDP sockets
            await self._owned.aclose()
            self._owned = None
            self._engine = None

    async def reload(self, settings: Settings, options: Options | None = None) -> None:
        """Swap in an engine built from ``settings``; keep the cache, refresh it soon."""
        stack = contextlib.AsyncExitStack()
        try:
            new = await stack.enter_async_context(engine(settings, dns_cache=True))
        except BaseException:
            await stack.aclose()
            raise
        await self.recorder.flush()  # into the store it was served from
        old_stack, self._owned = self._owned, stack
        old_engine = self._engine
        self._adopt(new)
        self._engine, self._settings = new, settings
        if options is not None:
            self.options = options
        self._keys.clear()  # parsed under the old options (map names)
        # The refresher re-resolves hot domains under the new config.
        self._cache.refresh_all(time.monotonic())
        if old_stack is not None:
            pending = list(self._resolving.values())
            if pending:
                await asyncio.wait(pending, timeout=self.grace)
            if old_engine is not None:
                old_engine.dns.close()
            await old_stack.aclose()
        log.info("configuration reloaded from %s", settings.source)

    def _adopt(self, e: Engine) -> None:
        """Count ``e``'s store faults here, and never let a cache write hold up an answer
        for more than a fraction of the budget (engine/sts.py)."""
        e.sts.faults = self.store_faults
        e.sts.write_wait = min(e.sts.write_wait, self.budget / 5)

    # --- answering ----------------------------------------------------------------------

    async def answer_socketmap(self, payload: bytes) -> Answer:
        parsed = answers.parse_request(payload, self.options)
        return await self._answer_parsed(parsed)

    async def answer_key(self, raw: bytes) -> Answer:
        return await self._answer_parsed(answers.parse_key_bytes(raw))

    async def _answer_parsed(self, parsed: Key | Answer) -> Answer:
        started = time.perf_counter()
        if isinstance(parsed, Answer):
            self.metrics.malformed += 1
            answer = parsed
        else:
            immediate = answers.key_answer(parsed, self.engine.resolver.local_rules)
            answer = immediate if immediate is not None else await self.lookup(parsed.name)
        self.metrics.answer(answer, time.perf_counter() - started)
        return answer

    async def lookup(self, domain: str) -> Answer:
        """The answer for a (normalised) domain: from the cache, or resolved within budget."""
        hit = self._cache.hit(domain, time.monotonic())
        if hit is not None:
            self.metrics.cache_hits += 1
            return hit
        return await self._miss(domain)

    async def _miss(self, domain: str) -> Answer:
        """The answer for a domain that was not in the cache: resolved within budget."""
        self.metrics.cache_misses += 1
        task = self._resolve(domain)
        try:
            async with asyncio.timeout(self.budget):
                # shield: this caller giving up must not cancel the shared resolution.
                return await asyncio.shield(task)
        except TimeoutError:
            self.metrics.budget_expired += 1
            return answers.temp(IN_PROGRESS)

    def _resolve(self, domain: str) -> asyncio.Task[Answer]:
        """The one resolution of ``domain`` in flight, started if there is none."""
        task = self._resolving.get(domain)
        if task is None:
            task = asyncio.create_task(self._resolve_once(domain), name=f"resolve {domain}")
            self._resolving[domain] = task
            self._tasks.add(task)

            def done(t: asyncio.Task[Answer]) -> None:
                self._tasks.discard(t)
                if self._resolving.get(domain) is t:
                    del self._resolving[domain]

            task.add_done_callback(done)
        return task

    async def _resolve_once(self, domain: str) -> Answer:
        self.metrics.resolutions += 1
        e = self.engine
        policy: DeliveryPolicy | None = None
        try:
            policy = await e.resolver.resolve(domain)
        except DomainError as exc:
            answer = answers.perm(f"invalid key: {exc}")
        except Exception as exc:
            store = _store_error(exc)
            if store is not None:
                # Counted and logged (rate-limited) where it happened, engine/sts.py. Defer,
                # naming the problem: without the cache nobody knows which policy applies.
                answer = answers.temp(f"{domain}: store error: {store.detail}")
            else:
                # An engine bug must not take the server down; defer, never downgrade.
                log.exception("resolving %s failed", domain)
                answer = answers.temp(f"internal error resolving {domain}: {type(exc).__name__}")
        else:
            answer = policy_answer(e, domain, policy, self.options)
            if policy.learned is not None:
                state = policy.learned.state.value
                self.metrics.learned[state] = self.metrics.learned.get(state, 0) + 1
            for failure in policy.errors:
                if failure.reported_type is None:
                    continue  # a DNS error is no RFC 8460 failure; the TEMP answer counts it
                key = failure.reported_type.value
                self.metrics.failures[key] = self.metrics.failures.get(key, 0) + 1
        self._store(domain, answer, policy)
        if policy is not None and answer.kind in (answers.Kind.OK, answers.Kind.NOTFOUND):
            try:
                self.recorder.offer(served_record(domain, policy, answer, dt.datetime.now(dt.UTC)))
            except Exception:  # recording must never change the answer
                self.metrics.served_failures += 1
                log.exception("recording the policy served for %s failed", domain)
        return answer

    def _store(self, domain: str, answer: Answer, policy: DeliveryPolicy | None) -> None:
        ttl = lifetime(answer, policy, answer_ttl=self.answer_ttl, temp_ttl=self.temp_ttl)
        self._cache.put(domain, answer, ttl, time.monotonic())

    async def _refresh_loop(self) -> None:
        """Re-resolve hot domains before their answer expires; drop cold expired entries."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self._learned_snapshot()
            due = self._cache.due(
                time.monotonic(),
                hot_window=self.hot_window,
                busy=self._resolving,
                retry_in=self.temp_ttl,
            )
            for domain in due:
                self.metrics.refreshes += 1
                self._resolve(domain)

    def cached(self, domain: str) -> Answer | None:
        """The cached, unexpired answer for ``domain`` (for tests and debugging)."""
        return self._cache.peek(domain, time.monotonic())

    # --- protocols ----------------------------------------------------------------------

    def _socketmap_hit(self, payload: bytes, now: float) -> bytes | None:
        """The socketmap reply to a request already seen for a domain whose answer is
        cached, else None (``_socketmap_now`` then parses the request and decides)."""
        started = time.perf_counter()
        domain = self._keys.get(payload)
        if domain is None:
            return None
        entry = self._cache.hit_entry(domain, now)
        if entry is None:
            return None
        self.metrics.cache_hits += 1
        self.metrics.count(entry.label, time.perf_counter() - started)
        return entry.socketmap

    def _socketmap_now(self, event: Request | Malformed, now: float) -> bytes | Later:
        """The socketmap reply to ``event`` if it can be given at once (a cache hit, a key
        that needs no resolution, a malformed request), else the coroutine that gives it."""
        if isinstance(event, Malformed):
            self.metrics.malformed += 1
            answer = answers.perm(event.reason)
            self.metrics.answer(answer, 0.0)
            return encode(answer.socketmap())
        reply = self._socketmap_hit(event.payload, now)
        if reply is not None:
            return reply
        domain = self._keys.get(event.payload)
        if domain is None:
            started = time.perf_counter()
            parsed = answers.parse_request(event.payload, self.options)
            if isinstance(parsed, Answer):
                self.metrics.malformed += 1
                self.metrics.answer(parsed, time.perf_counter() - started)
                return encode(parsed.socketmap())
            immediate = answers.key_answer(parsed, self.engine.resolver.local_rules)
            if immediate is not None:
                self.metrics.answer(immediate, time.perf_counter() - started)
                return encode(immediate.socketmap())
            domain = parsed.name
            # Only keys that are domains, whose answer is the domain's: the same request
            # then needs no parsing again (forgotten on reload, and when it grows too big).
            if len(self._keys) >= self._cache.max_entries:
                self._keys.clear()
            self._keys[event.payload] = domain
            reply = self._socketmap_hit(event.payload, now)
            if reply is not None:
                return reply
        return self._socketmap_later(domain)

    async def _socketmap_later(self, domain: str) -> bytes:
        started = time.perf_counter()
        answer = await self._miss(domain)
        self.metrics.answer(answer, time.perf_counter() - started)
        return encode(answer.socketmap())

    def _tcp_table_now(self, event: Request | Malformed, now: float) -> bytes | Later:
        """The tcp_table reply to ``event`` if it is malformed, else the coroutine that
        gives it (tcp_table is rare: no fast path; a hit is answered there)."""
        if isinstance(event, Malformed):
            self.metrics.malformed += 1
            return answers.perm(event.reason).tcp_table()
        verb, _, key = event.payload.partition(b" ")
        if verb != b"get":
            self.metrics.malformed += 1
            return answers.perm("only 'get KEY' requests are supported").tcp_table()
        try:
            raw = pct_decode(key)
        except PercentError as exc:
            self.metrics.malformed += 1
            return answers.perm(f"invalid key encoding: {exc}").tcp_table()
        return self._tcp_table_later(raw)

    async def _tcp_table_later(self, raw: bytes) -> bytes:
        return (await self.answer_key(raw)).tcp_table()

    def _socketmap_client(self) -> _Connection:
        return _Connection(
            self, NetstringDecoder(), self._socketmap_now, SOCKETMAP_FAILED, self._socketmap_hit
        )

    def _tcp_table_client(self) -> _Connection:
        return _Connection(self, LineDecoder(), self._tcp_table_now, TCP_TABLE_FAILED)

    def _admit(self, conn: _Connection) -> bool:
        """Take a new connection into the table; False if it was closed instead."""
        if self._stopping:
            conn.abort()
            return False
        admission = self._connections.admit(conn, time.monotonic())
        if not admission.admitted:
            self.metrics.refused_connections += 1
            conn.abort()
            return False
        if admission.evicted is not None:
            self.metrics.evicted_connections += 1
            admission.evicted.abort()
        self._open.add(conn)
        return True

    def _send_blocked(self, conn: _Connection, blocked: bool) -> None:
        """The client stopped (or resumed) taking its replies: send_timeout runs meanwhile."""
        if blocked:
            self._send_deadlines[conn] = time.monotonic() + self.send_timeout
        else:
            self._send_deadlines.pop(conn, None)

    def _closed(self, conn: _Connection) -> None:
        self._connections.remove(conn)
        self._send_deadlines.pop(conn, None)
        self._open.discard(conn)

    async def _sweep_loop(self) -> None:
        """Close the connections whose deadline passed (``ConnectionTable.expired``, and
        the send deadlines of clients that do not take their replies): one timer for all
        connections, none per request or read."""
        # Never sleep longer than the shortest timeout: a connection admitted meanwhile
        # cannot be due before that.
        longest = min(1.0, self.first_request_timeout, self.idle_timeout, self.send_timeout)
        while True:
            now = time.monotonic()
            for conn, reason in self._connections.expired(now):
                self.metrics.connection_timeouts[reason] += 1
                conn.abort()
            for conn, deadline in list(self._send_deadlines.items()):
                if deadline <= now:
                    del self._send_deadlines[conn]
                    self._connections.remove(conn)
                    self.metrics.connection_timeouts["send"] += 1
                    conn.abort()
            due = self._connections.next_deadline()
            if self._send_deadlines:
                first = min(self._send_deadlines.values())
                due = first if due is None else min(due, first)
            await asyncio.sleep(longest if due is None else min(longest, max(due - now, 0.001)))

    # --- health and metrics -------------------------------------------------------------

    def _http_protocol(self) -> asyncio.Protocol:
        """The HTTP endpoint's connections: streams (rare, and http.py reads them so)."""
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self._http_client)

    async def _http_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await http.serve(reader, writer, problem=self._problem, metrics=self.render_metrics)

    def _problem(self) -> str | None:
        """What ``/healthz`` reports as wrong: None while serving with a working store."""
        if self._stopping or self._engine is None:
            return "stopping"
        file_problem = getattr(self._engine.store, "file_problem", None)
        removed = file_problem() if callable(file_problem) else None
        return removed or self.store_faults.problem

    async def _learned_snapshot(self) -> None:
        """The stripping alarm and the drops of its window, as gauges (read from the shared
        store at most every LEARNED_EVERY seconds; a store error leaves the last reading)."""
        now = time.monotonic()
        learner = self._engine.learner if self._engine is not None else None
        if learner is None or now < self._learned_next:
            return
        self._learned_next = now + LEARNED_EVERY
        try:
            alarm = await learner.active_alarm()
            start = learner.clock() - dt.timedelta(seconds=learner.settings.alarm_window)
            drops = await learner.store.drops_since(start)
        except StoreError as exc:
            log.debug("learned levels not read for /metrics: %s", exc)
            return
        enforcing = bool(alarm and alarm.enforce)
        if enforcing != self._alarm_enforcing:
            # The alarm switched enforcement on (or an operator cleared it): answers cached
            # before it no longer say what applies.
            self._alarm_enforcing = enforcing
            if enforcing:
                self._cache.clear()  # no answer from before may be served again
            else:
                self._cache.refresh_all(now)
        self._learned_gauges = {
            "mxguard_learned_alarm_active": float(alarm is not None),
            "mxguard_learned_alarm_domains": float(len(alarm.domains) if alarm else 0),
            "mxguard_learned_alarm_enforce": float(bool(alarm and alarm.enforce)),
            "mxguard_learned_window_drops": float(len(drops)),
            "mxguard_learned_window_stripped_domains": float(
                len({d.domain for d in drops if d.stripped})
            ),
        }

    def render_metrics(self) -> str:
        gauges: dict[str, float] = {
            "mxguard_postfix_cache_entries": len(self._cache),
            "mxguard_postfix_connections": len(self._connections),
            "mxguard_postfix_connections_waiting": self._connections.waiting,
            "mxguard_postfix_connections_idle": self._connections.idle,
            "mxguard_postfix_max_connections": self._connections.max_connections,
            "mxguard_postfix_resolutions_in_flight": len(self._resolving),
        }
        if self._engine is not None:
            gauges["mxguard_sts_fetches_total"] = self._engine.sts.fetches
            gauges["mxguard_dns_queries_total"] = self._engine.dns.queries
        gauges.update(self._learned_gauges)
        return self.metrics.render(gauges, self.store_faults.counts)


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def use_event_loop(choice: str = "auto") -> str:
    """Make the event loops created from now on (``asyncio.run``) ``choice``'s; the one used.

    ``uvloop`` (the optional extra ``mxguard[fast]``) costs a cache hit less CPU than
    asyncio's loop (bench/README.md); ``auto`` takes it when installed, else asyncio's.
    Call it before the loop is made: the CLI's ``serve postfix`` would, given an
    ``--event-loop`` option."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop {choice!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        asyncio.set_event_loop_policy(None)
        return "asyncio"
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        if choice == "uvloop":
            raise ValueError("uvloop is not installed: pip install 'mxguard[fast]'") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _store_error(exc: BaseException) -> StoreError | None:
    """The StoreError behind ``exc`` (the engine's task groups wrap it), if any."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _store_error(inner)
            if found is not None:
                return found
    return None


def _descriptors_for(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE so that ``max_connections`` fit; the number that fit.

    A process that runs out of descriptors stops accepting for a second (asyncio's answer to
    EMFILE), which would keep Postfix out exactly when a flood fills the table. Besides the
    admitted connections there are the ones accepted but not yet admitted, or evicted but not
    yet closed (a few accept batches during a burst), and the engine's own descriptors.
    systemd starts services with a soft limit of 1024 and a far higher hard limit, which is
    why the soft one is raised here.
    """
    # Measured: a burst of 2,000 to 10,000 connections took max_connections + 4 batches (and
    # the engine's few); twice that is asked for, and half of it is the least left over.
    needed = max_connections + 8 * ACCEPT_BATCH + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    fit = max(16, soft - 4 * ACCEPT_BATCH - FD_RESERVE)
    log.warning(
        "the open-files limit (%d) is too low for max_connections=%d: serving at most %d "
        "connections; raise it (systemd: LimitNOFILE=) to %d",
        soft, max_connections, min(fit, max_connections), needed,
    )  # fmt: skip
    return min(fit, max_connections)


__all__ = [
    "EVENT_LOOPS",
    "IN_PROGRESS",
    "Listen",
    "ListenError",
    "Metrics",
    "PolicyServer",
    "ServedRecorder",
    "options_from",
    "query",
    "served_record",
    "use_event_loop",
]
