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
- per connection: bounded buffers (see ``netstring``), pipelined requests answered in order
  (resolved concurrently), a defined reply to every request, malformed ones included.

What was served is recorded for TLS reporting: each resolution whose answer Postfix delivers
under (``OK``, ``NOTFOUND``; after a ``TEMP`` Postfix makes no session) becomes a ``ServedPolicy``
(the RFC 8460 §4.4 policy type, strings and MX patterns, the domain's TLS-RPT ``rua``, the MX
hosts and addresses the policy allowed, the answer text) when it differs from the domain's
last record. ``ServedRecorder`` writes them to the store in batches from its own task, so a
slow or failing store never delays or changes an answer (failures are counted in /metrics);
the log collector then reports each Postfix session under the policy in force when it ran.

Operations: ``/healthz`` and Prometheus ``/metrics`` on a small HTTP listener; ``reload()``
(SIGHUP) opens a new engine from re-read settings and keeps the answer cache (its entries are
refreshed soon); ``stop()`` (SIGTERM) stops accepting, answers what was already received,
closes the connections and the engine.

Tests and the Postfix integration harness run it on a background thread::

    with PolicyServer(settings, listen="inet:127.0.0.1:0") as server:
        host, port = server.socketmap_address
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mxguard.adapters.store import ServedPolicy, Store
from mxguard.config import ConfigError, Settings
from mxguard.engine.context import Engine, engine
from mxguard.engine.deliver import policy_for_report
from mxguard.engine.policy import DeliveryPolicy, Source
from mxguard.engine.resolve import DomainError
from mxguard.postfix import answers
from mxguard.postfix.answers import Answer, Key, KeyKind, Options
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

log = logging.getLogger(__name__)
T = TypeVar("T")

IN_PROGRESS = "policy lookup in progress"


class ListenError(ValueError):
    """A listen address is not ``inet:HOST:PORT`` or ``unix:PATH``."""


@dataclass(frozen=True, slots=True)
class Listen:
    """Where to listen: TCP (``inet:127.0.0.1:8461``, ``inet:[::1]:8461``) or a UNIX socket."""

    host: str | None = None
    port: int = 0
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> Listen:
        if spec.startswith("unix:"):
            if not spec[5:]:
                raise ListenError(f"{spec!r}: unix: needs a socket path, e.g. unix:/run/mx.sock")
            return cls(path=Path(spec[5:]))
        rest = spec.removeprefix("inet:")
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ListenError(
                f"{spec!r} is not a listen address; use inet:HOST:PORT (e.g. "
                "inet:127.0.0.1:8461) or unix:PATH"
            )
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"inet:[{self.host}]:{self.port}" if ":" in str(self.host) else (
            f"inet:{self.host}:{self.port}"
        )  # fmt: skip


# --- metrics ------------------------------------------------------------------------------

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and the lookup-latency histogram, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.answers: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.budget_expired = 0
        self.malformed = 0
        self.refused_connections = 0
        self.resolutions = 0
        self.refreshes = 0
        self.served_recorded = 0
        self.served_failures = 0
        self.served_dropped = 0
        self._buckets = [0] * (len(_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def answer(self, answer: Answer, seconds: float) -> None:
        self.answers[answer.label] = self.answers.get(answer.label, 0) + 1
        self._buckets[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self._sum += seconds
        self._count += 1

    def render(self, gauges: dict[str, float]) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in rows)

        metric(
            "mxguard_postfix_answers_total", "counter",
            "Answers given to Postfix, by level (OK) or kind (notfound, temp, perm).",
            [(f'{{kind="{k}"}}', v) for k, v in sorted(self.answers.items())],
        )  # fmt: skip
        metric("mxguard_postfix_cache_hits_total", "counter", "Lookups answered from the cache.",
               [("", self.cache_hits)])  # fmt: skip
        metric("mxguard_postfix_cache_misses_total", "counter",
               "Lookups that needed a resolution.", [("", self.cache_misses)])  # fmt: skip
        metric("mxguard_postfix_budget_expired_total", "counter",
               "Misses answered TEMP because the lookup budget ran out.",
               [("", self.budget_expired)])  # fmt: skip
        metric("mxguard_postfix_malformed_requests_total", "counter",
               "Requests that could not be framed or parsed.", [("", self.malformed)])  # fmt: skip
        metric("mxguard_postfix_refused_connections_total", "counter",
               "Connections closed at once because max_connections were open.",
               [("", self.refused_connections)])  # fmt: skip
        metric("mxguard_postfix_resolutions_total", "counter",
               "Policy resolutions (misses and refreshes).", [("", self.resolutions)])  # fmt: skip
        metric("mxguard_postfix_refreshes_total", "counter",
               "Background refreshes of hot domains.", [("", self.refreshes)])  # fmt: skip
        metric("mxguard_postfix_served_recorded_total", "counter",
               "Changed served policies written to the store.",
               [("", self.served_recorded)])  # fmt: skip
        metric("mxguard_postfix_served_record_failures_total", "counter",
               "Served policies that could not be written to the store (or pruned).",
               [("", self.served_failures)])  # fmt: skip
        metric("mxguard_postfix_served_dropped_total", "counter",
               "Served policies not recorded because too many were waiting.",
               [("", self.served_dropped)])  # fmt: skip
        metric(
            "mxguard_policy_failures_total", "counter",
            "Failures seen while resolving policies, by RFC 8460 result type.",
            [(f'{{result_type="{k}"}}', v) for k, v in sorted(self.failures.items())],
        )  # fmt: skip
        rows: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*_BUCKETS, float("inf")), self._buckets, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            rows.append((f'_bucket{{le="{le}"}}', running))
        rows += [("_sum", self._sum), ("_count", self._count)]
        out.append("# HELP mxguard_postfix_lookup_seconds Time from request to answer.")
        out.append("# TYPE mxguard_postfix_lookup_seconds histogram")
        out.extend(f"mxguard_postfix_lookup_seconds{suffix} {v:g}" for suffix, v in rows)
        for name, value in sorted(gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name} {value:g}")
        return "\n".join(out) + "\n"


# --- the answer cache ---------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    answer: Answer
    policy: DeliveryPolicy | None
    expires: float  # monotonic
    refresh_at: float
    last_used: float


# --- what was served ----------------------------------------------------------------------


def served_record(
    domain: str, policy: DeliveryPolicy, answer: Answer, at: dt.datetime
) -> ServedPolicy:
    """The record of serving ``answer`` for ``policy`` from ``at`` on."""
    kind, strings, patterns = policy_for_report(policy)
    allowed = [m for m in policy.mx if m.allowed]
    return ServedPolicy(
        domain=domain,
        at=at,
        policy_type=kind,
        policy_strings=strings,
        mx_patterns=patterns,
        rua=policy.tlsrpt_rua,
        # Sorted: DNS may list the same hosts and addresses in another order next time.
        mx_hosts=tuple(sorted({h for m in allowed for h in (m.host, m.canonical) if h})),
        mx_addresses=tuple(sorted({a for m in allowed for a in m.addresses})),
        answer=answer.socketmap().decode("utf-8", "replace").rstrip(),
    )


def _content(r: ServedPolicy) -> tuple[object, ...]:
    """What a record says, apart from when: equal content means nothing changed."""
    return (r.policy_type, r.policy_strings, r.mx_patterns, r.rua, r.mx_hosts, r.mx_addresses,
            r.answer)  # fmt: skip


class ServedRecorder:
    """Writes the changed served policies to the store, in batches, from its own task.

    ``offer()`` is called on the request path: it only compares with the domain's last record
    (kept in memory, at most ``max_known`` domains) and queues, never awaits. ``run()`` writes
    the queue every ``interval`` seconds in one transaction, each write bounded by
    ``timeout``; a domain not in memory (after a restart, or evicted) is first compared with
    its latest stored record, so an unchanged policy is not written again. A failed write is
    counted and forgotten from memory, so the next resolution of those domains writes again.
    Every ``prune_interval`` seconds records older than ``keep`` that are no longer in force
    are pruned.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        metrics: Metrics,
        *,
        interval: float = 0.5,
        timeout: float = 10.0,
        max_pending: int = 10_000,
        max_known: int = 100_000,
        keep: dt.timedelta = dt.timedelta(days=40),
        prune_interval: float = 86_400.0,
    ) -> None:
        self._store = store
        self.metrics = metrics
        self.interval, self.timeout = interval, timeout
        self.max_pending, self.max_known = max_pending, max_known
        self.keep, self.prune_interval = keep, prune_interval
        self._known: OrderedDict[str, tuple[object, ...]] = OrderedDict()
        self._pending: list[tuple[ServedPolicy, bool]] = []  # (record, compare with the store)
        self._last_error = ""
        self._writing = asyncio.Lock()  # one write at a time, in order

    def offer(self, record: ServedPolicy) -> None:
        """Queue ``record`` if it differs from the last one of its domain."""
        content = _content(record)
        known = self._known.get(record.domain)
        if known == content:
            self._known.move_to_end(record.domain)
            return
        if len(self._pending) >= self.max_pending:
            self.metrics.served_dropped += 1
            return
        self._pending.append((record, known is None))
        self._known[record.domain] = content
        self._known.move_to_end(record.domain)
        while len(self._known) > self.max_known:
            self._known.popitem(last=False)

    async def run(self) -> None:
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_interval
                await self.prune()

    async def flush(self) -> None:
        """Write what is queued (one transaction); on return, everything offered before the
        call was written or counted as failed."""
        async with self._writing:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        fresh: list[ServedPolicy] = []
        try:
            store = self._store()
            async with asyncio.timeout(self.timeout):
                for record, compare in batch:
                    if compare:
                        latest = await store.served_at(record.domain, record.at)
                        if latest is not None and _content(latest) == _content(record):
                            continue
                    fresh.append(record)
                await store.add_served(fresh)
        except Exception as exc:
            self.metrics.served_failures += len(batch)
            self._failed(f"could not record {len(batch)} served policies", exc)
            for record, _ in batch:
                if self._known.get(record.domain) == _content(record):
                    del self._known[record.domain]
            return
        self.metrics.served_recorded += len(fresh)

    async def prune(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._store().prune_served(dt.datetime.now(dt.UTC) - self.keep)
        except Exception as exc:
            self.metrics.served_failures += 1
            self._failed("could not prune served policies", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        # Once per distinct error: a store that refuses (Redis) must not flood the log.
        reason = str(exc) or type(exc).__name__
        level = logging.DEBUG if reason == self._last_error else logging.WARNING
        log.log(level, "%s: %s (answers to Postfix are not affected)", what, reason)
        self._last_error = reason


# --- the server ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)  # identity-hashed: kept in a set
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class PolicyServer:
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
        self.max_entries = max_entries
        self.max_pipeline = max_pipeline
        # Postfix keeps a handful of map connections per process and closes idle ones after
        # ipc_idle (5 s by default); more than this many, or a minute of silence, is not
        # Postfix, and must not be able to starve the clients that are.
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.grace = grace
        self.metrics = Metrics()
        self.recorder = ServedRecorder(lambda: self.engine.store, self.metrics)
        self._settings = source if isinstance(source, Settings) else None
        self._engine: Engine | None = source if isinstance(source, Engine) else None
        self._owned: contextlib.AsyncExitStack | None = None
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._resolving: dict[str, asyncio.Task[Answer]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._recording: asyncio.Task[None] | None = None
        self._stopping = False
        self.socketmap_addresses: list[Any] = []
        self.tcp_table_address: Any = None
        self.metrics_address: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

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
        try:
            for where in self.listen:
                server = await self._listen(where, self._socketmap_client)
                self.socketmap_addresses.append(_bound(server, where))
            if self.tcp_table is not None:
                server = await self._listen(self.tcp_table, self._tcp_table_client)
                self.tcp_table_address = _bound(server, self.tcp_table)
            if self.metrics_listen is not None:
                server = await self._listen(self.metrics_listen, self._http_client)
                self.metrics_address = _bound(server, self.metrics_listen)
        except BaseException:
            await self.stop()
            raise
        self._refresher = asyncio.create_task(self._refresh_loop(), name="mxguard-refresher")
        self._recording = asyncio.create_task(self.recorder.run(), name="mxguard-served")
        log.info(
            "serving Postfix socketmap on %s%s",
            ", ".join(str(x) for x in self.listen),
            f", tcp_table on {self.tcp_table}" if self.tcp_table else "",
        )

    async def _listen(self, where: Listen, handler: Callable[..., Any]) -> asyncio.Server:
        if where.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if where.path.is_socket():
                    where.path.unlink()  # a stale socket from a previous run
            server = await asyncio.start_unix_server(handler, path=str(where.path))
            os.chmod(where.path, 0o666)  # Postfix's smtp processes run as another user
        else:
            server = await asyncio.start_server(handler, where.host, where.port)
        self._servers.append(server)
        return server

    async def stop(self) -> None:
        """Stop accepting, answer what was received, close connections, close the engine."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            # Let each connection read what is already buffered, answer it, and end.
            transport = conn.writer.transport
            if isinstance(transport, asyncio.ReadTransport):
                transport.pause_reading()
            conn.reader.feed_eof()
        if self._handlers:
            _, late = await asyncio.wait(self._handlers, timeout=self.grace)
            for task in late:
                task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        self._servers.clear()
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
        self._engine, self._settings = new, settings
        if options is not None:
            self.options = options
        now = time.monotonic()
        for entry in self._cache.values():
            entry.refresh_at = now  # the refresher re-resolves hot domains under the new config
        if old_stack is not None:
            pending = list(self._resolving.values())
            if pending:
                await asyncio.wait(pending, timeout=self.grace)
            await old_stack.aclose()
        log.info("configuration reloaded from %s", settings.source)

    # --- running on a background thread (tests, the Postfix harness) ---------------------

    def start_in_thread(self) -> PolicyServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="mxguard-postfix", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self.call(self.start())
        except BaseException:
            self.stop_in_thread()
            raise
        return self

    def stop_in_thread(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self.call(self.stop(), timeout=self.grace + 15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the server's loop (server started with ``start_in_thread``)."""
        if self._loop is None:
            raise RuntimeError("the policy server is not running on a thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def __enter__(self) -> PolicyServer:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()

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
        now = time.monotonic()
        entry = self._cache.get(domain)
        if entry is not None and entry.expires > now:
            self.metrics.cache_hits += 1
            entry.last_used = now
            self._cache.move_to_end(domain)
            return entry.answer
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
            # An engine bug must not take the server down; defer, never downgrade.
            log.exception("resolving %s failed", domain)
            answer = answers.temp(f"internal error resolving {domain}: {type(exc).__name__}")
        else:
            patterns: tuple[str, ...] = ()
            if policy.source is Source.LIST and e.resolver.policy_list is not None:
                listed = e.resolver.policy_list.lookup(domain)
                patterns = listed.mxs if listed is not None else ()
            answer = answers.policy_answer(policy, self.options, list_patterns=patterns)
            for failure in policy.errors:
                key = failure.result_type.value
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
        now = time.monotonic()
        ttl = self.temp_ttl if answer.kind is not answers.Kind.OK and policy is None else None
        if answer.kind in (answers.Kind.TEMP, answers.Kind.TIMEOUT):
            ttl = self.temp_ttl
        if ttl is None:
            ttl = self.answer_ttl
            sts = policy.mta_sts if policy is not None else None
            if sts is not None and sts.expires_at is not None:
                # RFC 8461 §5: the policy is not valid past max_age from its fetch.
                left = (sts.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
                ttl = max(1.0, min(ttl, left))
        old = self._cache.pop(domain, None)
        self._cache[domain] = _Entry(
            answer=answer,
            policy=policy,
            expires=now + ttl,
            refresh_at=now + ttl * 0.75,
            last_used=old.last_used if old is not None else now,
        )
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)  # the least recently used

    async def _refresh_loop(self) -> None:
        """Re-resolve hot domains before their answer expires; drop cold expired entries."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            now = time.monotonic()
            for domain, entry in list(self._cache.items()):
                if now - entry.last_used > self.hot_window:
                    if entry.expires <= now:
                        del self._cache[domain]
                    continue
                if entry.refresh_at <= now and domain not in self._resolving:
                    entry.refresh_at = now + self.temp_ttl  # don't start it again next tick
                    self.metrics.refreshes += 1
                    self._resolve(domain)

    def cached(self, domain: str) -> Answer | None:
        """The cached, unexpired answer for ``domain`` (for tests and debugging)."""
        entry = self._cache.get(domain)
        return entry.answer if entry is not None and entry.expires > time.monotonic() else None

    # --- protocols ----------------------------------------------------------------------

    async def _socketmap_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve(reader, writer, NetstringDecoder(), self._socketmap_reply)

    async def _tcp_table_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve(reader, writer, LineDecoder(), self._tcp_table_reply)

    async def _socketmap_reply(self, event: Request | Malformed) -> bytes:
        if isinstance(event, Malformed):
            self.metrics.malformed += 1
            answer = answers.perm(event.reason)
            self.metrics.answer(answer, 0.0)
            return encode(answer.socketmap())
        return encode((await self.answer_socketmap(event.payload)).socketmap())

    async def _tcp_table_reply(self, event: Request | Malformed) -> bytes:
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
        return (await self.answer_key(raw)).tcp_table()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: NetstringDecoder | LineDecoder,
        reply: Callable[[Request | Malformed], Coroutine[Any, Any, bytes]],
    ) -> None:
        if self._stopping or len(self._connections) >= self.max_connections:
            if not self._stopping:
                self.metrics.refused_connections += 1
            writer.close()
            return
        conn = _Connection(reader, writer)
        self._connections.add(conn)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        # Replies leave in request order; requests are answered concurrently, at most
        # max_pipeline at a time per connection (reading pauses while the queue is full).
        queue: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(self.max_pipeline)
        sender = asyncio.create_task(self._send_replies(queue, writer))
        try:
            while not decoder.dead:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        data = await reader.read(MAX_REQUEST)
                except (TimeoutError, ConnectionError):
                    break
                if not data:
                    break
                for event in decoder.feed(data):
                    await queue.put(asyncio.create_task(reply(event)))
        finally:
            await queue.put(None)
            with contextlib.suppress(Exception):
                await sender
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._connections.discard(conn)
            if handler is not None:
                self._handlers.discard(handler)

    @staticmethod
    async def _send_replies(
        queue: asyncio.Queue[asyncio.Task[bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        broken = False
        while (task := await queue.get()) is not None:
            try:
                data = await task
            except Exception:
                log.exception("answering a request failed")
                data = encode(answers.temp("internal error").socketmap())
            if broken:
                continue
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:
                broken = True  # keep draining the queue so that no task is left behind

    # --- health and metrics -------------------------------------------------------------

    async def _http_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The request head ends with an empty line; lines may end in CRLF or a bare LF
        # (RFC 9112 §2.2 lets a server accept both). Bounded: 8 KiB, 5 s.
        request_line = b""
        size = 0
        try:
            async with asyncio.timeout(5):
                while True:
                    line = await reader.readline()
                    size += len(line)
                    if not line or size > 8192:
                        break
                    if not request_line:
                        request_line = line
                    elif line in (b"\r\n", b"\n"):
                        break
        except (TimeoutError, ValueError, ConnectionError):
            writer.close()
            return
        parts = request_line.strip().split(b" ")
        path = parts[1].decode("ascii", "replace").partition("?")[0] if len(parts) >= 2 else ""
        if size > 8192:
            status, body = "431 Request Header Fields Too Large", "request head over 8 KiB\n"
        elif not request_line.strip():
            writer.close()
            return
        elif parts[0] != b"GET":
            status, body = "405 Method Not Allowed", "only GET\n"
        elif path == "/healthz":
            ok = not self._stopping and self._engine is not None
            status, body = ("200 OK", "ok\n") if ok else ("503 Service Unavailable", "stopping\n")
        elif path == "/metrics":
            status, body = "200 OK", self.render_metrics()
        else:
            status, body = "404 Not Found", "try /healthz or /metrics\n"
        data = body.encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def render_metrics(self) -> str:
        gauges: dict[str, float] = {
            "mxguard_postfix_cache_entries": len(self._cache),
            "mxguard_postfix_connections": len(self._connections),
            "mxguard_postfix_resolutions_in_flight": len(self._resolving),
        }
        if self._engine is not None:
            gauges["mxguard_sts_fetches_total"] = self._engine.sts.fetches
            gauges["mxguard_dns_queries_total"] = self._engine.dns.queries
        return self.metrics.render(gauges)


def _bound(server: asyncio.Server, where: Listen) -> Any:
    if where.path is not None:
        return str(where.path)
    sockname = server.sockets[0].getsockname()
    return sockname[0], sockname[1]


async def query(e: Engine, key: str, options: Options | None = None) -> tuple[Answer, Any]:
    """``serve postfix --query``: the answer for ``key`` and the policy behind it (or None).

    The same engine and translation as the server, without cache or budget.
    """
    options = options or Options()
    parsed = answers.parse_key_bytes(key.encode("utf-8", "surrogateescape"))
    if isinstance(parsed, Answer):
        return parsed, None
    immediate = answers.key_answer(parsed, e.resolver.local_rules)
    if immediate is not None or parsed.kind is not KeyKind.DOMAIN:
        return immediate or answers.NOTFOUND, None
    policy = await e.resolver.resolve(parsed.name)
    patterns: tuple[str, ...] = ()
    if policy.source is Source.LIST and e.resolver.policy_list is not None:
        listed = e.resolver.policy_list.lookup(parsed.name)
        patterns = listed.mxs if listed is not None else ()
    return answers.policy_answer(policy, options, list_patterns=patterns), policy


def options_from(settings: Settings, **overrides: Any) -> Options:
    """``Options`` from the ``[postfix]`` table of the config, then the given overrides."""
    table = dict(settings.postfix)
    values: dict[str, Any] = {}
    for key in ("tlsrpt_attributes", "strict_testing"):
        if key in table:
            if not isinstance(table[key], bool):
                raise ConfigError(f"{settings.source}: postfix.{key}: expected true or false")
            values[key] = table[key]
    if "unusable_tlsa" in table:
        if table["unusable_tlsa"] not in ("encrypt", "dane"):
            raise ConfigError(
                f'{settings.source}: postfix.unusable_tlsa: expected "encrypt" or "dane"'
            )
        values["unusable_tlsa"] = table["unusable_tlsa"]
    if "map_names" in table:
        names = table["map_names"]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n and " " not in n for n in names)
        ):
            raise ConfigError(
                f'{settings.source}: postfix.map_names: expected a list of names, e.g. ["postfix"]'
            )
        values["map_names"] = frozenset(names)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Options(**values)
