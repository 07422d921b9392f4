"""Benchmark: mxguard's Postfix policy server against postfix-mta-sts-resolver.

Both servers answer Postfix's ``smtp_tls_policy_maps`` over the socketmap protocol
(netstrings, http://cr.yp.to/proto/netstrings.txt; Postfix socketmap_table(5)). This script
runs, in one process and against one lab (a simulated mail internet on loopback, see
``mxguard.lab``), the same measurements against each server as a separate process:

1. warm cache: lookups per second and p50/p99 latency with 1 and with 32 connections;
2. cold cache: 500 MTA-STS domains, each looked up once (fresh process, fresh cache file,
   flushed resolver);
3. thundering herd: 50 concurrent lookups of one uncached domain; policy fetches counted at
   the lab's policy host;
4. a failing policy host (404) under load: fetches caused by 200 lookups over a few seconds;
5. a stalled policy host: latency of the first lookup, of its retry, and of concurrent
   lookups of other (uncached) domains.

Like Postfix, the load generator keeps one request in flight per connection. Each server
gets a fresh process and a fresh cache file for each measurement, so both start from the
same cache state. Everything is bounded: fixed counts and a time limit on every loop, traffic
only to loopback.

The competitor uses the system resolver (c-ares reads /etc/resolv.conf): it runs in a
private mount namespace (``unshare -m``) with a bind-mounted resolv.conf naming the lab's
Unbound, and trusts the lab CA through ``SSL_CERT_FILE`` (a bundle of the system CAs and the
lab CA). The machine's own /etc/resolv.conf is never touched.

Run: ``bench/run`` (creates bench/.venv-competitor and calls this file), or
``.venv/bin/python bench/postfix_policy.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Dnssec, Domain, Host, MtaSts, PolicyBehaviour, Scenario

ROOT = Path(__file__).resolve().parent.parent
COMPETITOR_VENV = ROOT / "bench" / ".venv-competitor"
MAX_REPLY = 4096  # a socketmap reply longer than this is a broken server (Postfix: 100000)
REQUEST_TIMEOUT = 30.0  # no single lookup may take longer; both servers give up well before
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of utime and stime in /proc/PID/stat
EVENT_LOOPS = ("asyncio", "uvloop")

MX_DOMAIN = "benchmx.test"
MX_HOST = f"mx.{MX_DOMAIN}"
HERD_DOMAIN = "herd.test"
FAIL_DOMAIN = "fail404.test"
STALL_DOMAIN = "stall.test"


# --- the lab scenario ------------------------------------------------------------------------


def sts_domain(i: int) -> str:
    return f"sts{i:04d}.test"


def other_domain(i: int) -> str:
    return f"other{i:03d}.test"


def scenario(domains: int, others: int = 20) -> Scenario:
    """``domains`` MTA-STS enforce domains plus the herd, 404, stall and other domains.

    Policy hosts are cheap: every domain is an unsigned zone whose MX is the one shared host
    ``mx.benchmx.test`` (no SMTP receiver per domain), and each policy names that host.
    """

    def sts(name: str, behaviour: PolicyBehaviour = PolicyBehaviour.SERVE) -> Domain:
        return Domain(
            name=name,
            dnssec=Dnssec.UNSIGNED,
            mx=(f"10 {MX_HOST}",),
            mta_sts=MtaSts(mode="enforce", mx=(MX_HOST,), behaviour=behaviour),
        )

    shared = Domain(
        name=MX_DOMAIN, dnssec=Dnssec.SIGNED, mx=(f"10 {MX_HOST}",), hosts=(Host(name=MX_HOST),)
    )
    return Scenario(
        name="bench-postfix-policy",
        description=f"{domains} MTA-STS domains for the policy server benchmark",
        domains=(
            shared,
            *(sts(sts_domain(i)) for i in range(domains)),
            *(sts(other_domain(i)) for i in range(others)),
            sts(HERD_DOMAIN),
            sts(FAIL_DOMAIN, PolicyBehaviour.NOT_FOUND),
            sts(STALL_DOMAIN, PolicyBehaviour.STALL),
        ),
    ).validate()


# The lab resolver's TTL caps in the benchmark (see main()).
RESOLVER_TTL_CAP = 3600

EXPECTED = f"OK secure match={MX_HOST} servername=hostname"  # both servers' enforce answer


# --- the load generator: an asyncio netstring client -----------------------------------------


class ProtocolError(RuntimeError):
    """The server's reply is not a netstring (or is longer than MAX_REPLY)."""


class SocketmapClient:
    """One connection, one request in flight (as Postfix's smtp processes do)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, map_name: str
    ) -> None:
        self.reader, self.writer, self.map_name = reader, writer, map_name

    @classmethod
    async def connect(cls, address: tuple[str, int], map_name: str = "postfix") -> SocketmapClient:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer, map_name)

    async def ask(self, key: str) -> tuple[str, float]:
        """The reply to ``<map name> key`` and how long it took (seconds)."""
        payload = f"{self.map_name} {key}".encode()
        started = time.perf_counter()
        self.writer.write(b"%d:%s," % (len(payload), payload))
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await self.writer.drain()
            head = await self.reader.readuntil(b":")
            if not head[:-1].isdigit() or len(head) > 6:
                raise ProtocolError(f"reply length {head[:10]!r} is not a netstring length")
            size = int(head[:-1])
            if size > MAX_REPLY:
                raise ProtocolError(f"reply of {size} bytes is longer than {MAX_REPLY}")
            body = await self.reader.readexactly(size + 1)
        if body[-1:] != b",":
            raise ProtocolError("reply is not followed by ','")
        return body[:-1].decode(errors="replace"), time.perf_counter() - started

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Samples:
    """Latencies (seconds) and replies of a batch of lookups."""

    latencies: list[float] = field(default_factory=list)
    replies: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    def add(self, reply: str, seconds: float) -> None:
        self.latencies.append(seconds)
        self.replies[_kind(reply)] += 1

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        return {
            "lookups": n,
            "seconds": round(self.elapsed, 3),
            "per_second": round(n / self.elapsed, 1) if self.elapsed else None,
            "p50_ms": round(self.percentile(50) * 1000, 3),
            "p99_ms": round(self.percentile(99) * 1000, 3),
            "max_ms": round(max(self.latencies, default=float("nan")) * 1000, 3),
            "replies": dict(self.replies),
        }


def _kind(reply: str) -> str:
    """A reply reduced to what it means: ``OK secure…`` stays whole, TEMP/PERM lose detail."""
    if reply == EXPECTED or reply.startswith("NOTFOUND"):
        return reply.strip()
    return reply.split(" ", 1)[0] + (" " + reply.split(" ", 2)[1] if " " in reply else "")


async def lookups(
    address: tuple[str, int],
    keys: Sequence[str],
    connections: int,
    time_limit: float,
    map_name: str = "postfix",
) -> Samples:
    """Look up ``keys`` (in order, shared by all connections) with ``connections`` clients."""
    samples = Samples()
    clients = [await SocketmapClient.connect(address, map_name) for _ in range(connections)]
    position = 0
    deadline = time.monotonic() + time_limit

    async def worker(client: SocketmapClient) -> None:
        nonlocal position
        while position < len(keys) and time.monotonic() < deadline:
            key = keys[position]
            position += 1
            reply, seconds = await client.ask(key)
            samples.add(reply, seconds)

    started = time.perf_counter()
    try:
        async with asyncio.timeout(time_limit + REQUEST_TIMEOUT), asyncio.TaskGroup() as tg:
            for c in clients:
                tg.create_task(worker(c))
    finally:
        samples.elapsed = time.perf_counter() - started
        for c in clients:
            await c.close()
    return samples


# --- warm load from several processes --------------------------------------------------------
#
# A warm hit costs a server tens of microseconds, about what an asyncio client spends on it,
# so one client process would measure itself. The warm runs start ``load_processes`` worker
# processes (this file with ``--load-worker``), each with its share of the connections; each
# connects, says "ready", waits for "go" on stdin, runs until its lookups or the time are
# used up and prints its samples as JSON. The server's CPU time is read from /proc between
# "go" and the last worker's answer.


def _split_reply(buffer: bytes) -> tuple[bytes | None, bytes]:
    """The first whole socketmap reply in ``buffer`` and what follows it, or None and
    ``buffer`` while the reply is incomplete; ProtocolError for one over MAX_REPLY."""
    head, colon, rest = buffer.partition(b":")
    if not colon:
        return None, buffer
    size = int(head)
    if size > MAX_REPLY:
        raise ProtocolError(f"reply of {size} bytes is longer than {MAX_REPLY}")
    if len(rest) < size + 1:
        return None, buffer
    return rest[:size], rest[size + 1 :]


class _WorkerConnection(asyncio.Protocol):
    """One connection of a load worker: one request in flight, the next sent on the reply."""

    def __init__(self, keys: Sequence[bytes], start: int, budget: int, out: dict[str, Any]):
        self.keys, self.position, self.left, self.out = keys, start, budget, out
        self.buffer = b""
        self.sent_at = 0.0
        self.deadline = float("inf")
        self.interval = 0.0
        self.due = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def go(self, deadline: float, interval: float = 0.0, first: float = 0.0) -> None:
        """Start; with ``interval`` a request is due every ``interval`` seconds from
        ``first`` (perf_counter), not on each reply, and its latency counts from when it was
        due, so that a slow reply delays the next request's clock, never hides it."""
        self.deadline = deadline
        self.interval = interval
        self.due = first
        if interval:
            asyncio.get_running_loop().call_later(max(0.0, first - time.perf_counter()), self._send)
        else:
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.left <= 0 or time.monotonic() >= self.deadline:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.left -= 1
        key = self.keys[self.position % len(self.keys)]
        self.position += 1
        self.sent_at = self.due if self.interval else time.perf_counter()
        self.transport.write(key)

    def _next(self) -> None:
        if not self.interval:
            self._send()
            return
        self.due += self.interval
        wait = self.due - time.perf_counter()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._send)
        else:
            self._send()  # behind schedule: at once (the latency shows the lag)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            reply, self.buffer = _split_reply(self.buffer)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if reply is None:
            return
        self.out["latencies"].append(time.perf_counter() - self.sent_at)
        replies: Counter[bytes] = self.out["replies"]
        replies[reply] += 1
        self._next()

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"closed by the server ({exc})"))


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = spec["address"]
    keys = [encode_request(k, spec["map_name"]) for k in spec["keys"]]
    out: dict[str, Any] = {"latencies": [], "replies": Counter()}
    conns: list[_WorkerConnection] = []
    for i, budget in enumerate(spec["budgets"]):
        start = spec["offset"] + i * 7  # connections do not ask for the same key in step
        async with asyncio.timeout(10):
            _, proto = await loop.create_connection(
                lambda b=budget, s=start: _WorkerConnection(keys, s, b, out), host, port
            )
        conns.append(proto)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    cpu_before = _own_cpu()
    started = time.perf_counter()
    deadline = time.monotonic() + spec["seconds"]
    interval = spec.get("interval", 0.0)  # per connection; 0: closed loop, as fast as replies
    for i, c in enumerate(conns):
        # Paced connections start spread over one interval, not all at once.
        c.go(deadline, interval, started + interval * (i + 0.5) / len(conns))
    async with asyncio.timeout(spec["seconds"] + REQUEST_TIMEOUT):
        await asyncio.gather(*(c.done for c in conns))
    elapsed = time.perf_counter() - started
    cpu = _own_cpu() - cpu_before
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return {
        "latencies": out["latencies"],
        "replies": {k.decode(errors="replace"): v for k, v in out["replies"].items()},
        "elapsed": elapsed,
        "cpu_s": cpu,
    }


def _closed_loop_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The closed loop (no ``interval``) without asyncio: one ``select.epoll`` loop over the
    worker's connections, one request in flight on each, the next sent on its reply, the
    latency taken as the reply is read. Against bench/floor.py's asyncio server, 8
    connections: 8.5 to 10.1 µs of client CPU per lookup, where the asyncio worker spent 10.4
    to 11.4 µs, and a p99 of 0.17 against 0.19 ms. With the asyncio workers the p99 at 32
    connections was their own: 2.1 to 2.9 times the competitor's for the faster server, 0.35
    to 0.96 times with this loop (bench/README.md). The paced row keeps the asyncio worker
    (its timers)."""
    host, port = spec["address"]
    keys = [encode_request(k, spec["map_name"]) for k in spec["keys"]]
    latencies: list[float] = []
    replies: Counter[bytes] = Counter()
    # Per connection: socket, next key's position, lookups left, when the request left,
    # what has arrived of the reply.
    conns: dict[int, list[Any]] = {}
    for i, budget in enumerate(spec["budgets"]):
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conns[sock.fileno()] = [sock, spec["offset"] + i * 7, budget, 0.0, b""]
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    cpu_before = _own_cpu()
    started = time.perf_counter()
    deadline = started + spec["seconds"]
    give_up = deadline + REQUEST_TIMEOUT
    poller = select.epoll()
    active = 0

    def ask(c: list[Any]) -> bool:
        if c[2] <= 0 or time.perf_counter() >= deadline:
            return False
        c[2] -= 1
        request = keys[c[1] % len(keys)]
        c[1] += 1
        c[3] = time.perf_counter()
        if c[0].send(request) != len(request):
            raise ProtocolError("a request did not fit the socket buffer")
        return True

    try:
        for fd, c in conns.items():
            poller.register(fd, select.EPOLLIN)
            active += ask(c)
        while active:
            if time.perf_counter() > give_up:
                raise ProtocolError(f"no reply within {REQUEST_TIMEOUT:g} s")
            for fd, _ in poller.poll(1.0):
                c = conns[fd]
                data = c[0].recv(65536)
                now = time.perf_counter()
                if not data:
                    raise ConnectionError("closed by the server")
                reply, c[4] = _split_reply(c[4] + data)
                if reply is None:
                    continue
                latencies.append(now - c[3])
                replies[reply] += 1
                if not ask(c):
                    poller.unregister(fd)
                    active -= 1
        elapsed = time.perf_counter() - started
        cpu = _own_cpu() - cpu_before
    finally:
        poller.close()
        for c in conns.values():
            c[0].close()
    return {
        "latencies": latencies,
        "replies": {k.decode(errors="replace"): v for k, v in replies.items()},
        "elapsed": elapsed,
        "cpu_s": cpu,
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def encode_request(key: str, map_name: str = "postfix") -> bytes:
    payload = f"{map_name} {key}".encode()
    return b"%d:%s," % (len(payload), payload)


def load_worker_main(spec_json: str) -> int:
    """``--load-worker SPEC``: one load worker process (see above)."""
    spec = json.loads(spec_json)
    paced = spec.get("interval", 0.0)
    result = asyncio.run(_worker(spec)) if paced else _closed_loop_worker(spec)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` nearly equal non-negative integers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def multi_process_lookups(
    server: Server,
    keys: Sequence[str],
    connections: int,
    processes: int,
    seconds: float,
    max_lookups: int,
    rate: float = 0.0,
) -> tuple[Samples, dict[str, Any]]:
    """Warm load from ``processes`` worker processes; the samples and the CPU figures. With
    ``rate`` the connections together ask that many lookups per second, each at a fixed
    pace; without, each asks again as soon as it has its reply."""
    processes = max(1, min(processes, connections))
    per_process = spread(connections, processes)
    lookups_per_conn = spread(max_lookups, connections)
    workers: list[subprocess.Popen[str]] = []
    samples = Samples()
    at = 0
    try:
        for n in per_process:
            spec = {
                "address": list(server.address),
                "keys": list(keys),
                "budgets": lookups_per_conn[at : at + n],
                "offset": at * 13,
                "seconds": seconds,
                "map_name": server.map_name,
                "interval": connections / rate if rate else 0.0,
            }
            at += n
            workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--load-worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a load worker did not start: {line!r}")
        cpu_before = server.cpu_seconds()
        started = time.perf_counter()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        results = []
        for w in workers:
            out, _ = w.communicate(timeout=seconds + 2 * REQUEST_TIMEOUT)
            if w.returncode != 0:
                raise RuntimeError(f"a load worker failed with {w.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        samples.elapsed = time.perf_counter() - started
        cpu_after = server.cpu_seconds()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()  # only the workers this function started
                w.wait(timeout=5)
    for r in results:
        samples.latencies.extend(r["latencies"])
        for reply, count in r["replies"].items():
            samples.replies[_kind(reply)] += count
    n = len(samples.latencies)
    server_cpu = (
        cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    )
    cpu = {
        "processes": processes,
        "server_cpu_s": round(server_cpu, 3) if server_cpu is not None else None,
        "server_cpu_us_per_lookup": round(server_cpu / n * 1e6, 2) if server_cpu and n else None,
        "load_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
    }
    return samples, cpu


# --- memory with many cached policies --------------------------------------------------------
#
# A lab of 100,000 policy hosts (certificates, listeners) is beyond this machine, so the
# "memory" measurement fills a real server's caches the way its resolutions would: a child
# process (``--memory-child N``) starts ``mxguard.postfix.server.PolicyServer`` with the lab
# config and a fresh SQLite store, and for N synthetic domains puts into it what one cold
# lookup leaves behind: the DNS answers (MX, _mta-sts TXT, _smtp._tls TXT, the policy host's
# A record) through the resolver's own cache code, the policy in the store (put_policy, as
# the MTA-STS layer writes it), the answer in the answer cache (``_store``) and the served
# policy in the recorder (``offer``). The policy objects are those of one real resolution
# of a lab domain, copied per domain. It then asks the listening server for a sample of the
# domains (each must be a hit) and reports its RSS.


async def _memory_fill(config: Path, store: Path, address: tuple[str, int], n: int) -> dict:
    import dataclasses as dc
    import datetime as dtm

    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    from mxguard.adapters.dns import DnsAnswer, DnsOutcome, DnssecStatus
    from mxguard.adapters.store import CachedPolicy
    from mxguard.config import load as load_settings
    from mxguard.postfix.served import served_record
    from mxguard.postfix.server import PolicyServer

    settings = load_settings(config).with_overrides(store=f"sqlite:///{store}")
    server = PolicyServer(settings, listen=f"inet:{address[0]}:{address[1]}")
    await server.start()
    try:
        e = server.engine
        first = sts_domain(0)
        template = await e.resolver.resolve(first)  # one real resolution, against the lab
        answer = await server.lookup(first)
        sts_text = (await e.store.get_policy(first)).policy_text  # type: ignore[union-attr]
        rss_before = _own_rss_kib()
        now = dtm.datetime.now(dtm.UTC)

        def rd(rdtype: str, text: str) -> Any:
            return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)

        def fake(name: str, rdtype: str) -> DnsAnswer:
            records: tuple[Any, ...] = {
                "MX": lambda: (rd("MX", f"10 {MX_HOST}."),),
                "TXT": lambda: (rd("TXT", f'"v=STSv1; id={name[-12:]}"'),),
                "A": lambda: (rd("A", "127.221.0.9"),),
            }[rdtype]()
            return DnsAnswer(
                name, rdtype, DnsOutcome.OK, DnssecStatus.INSECURE, records, name, (), 300
            )

        async def answer_for(name: str, rdtype: str) -> DnsAnswer:
            return fake(name, rdtype)

        e.dns._query = answer_for  # type: ignore[method-assign]  # the cache code stays real
        started = time.perf_counter()
        for i in range(n):
            d = f"mem{i:06d}.test"
            for name, rdtype in (
                (d, "MX"), (f"_mta-sts.{d}", "TXT"), (f"_smtp._tls.{d}", "TXT"),
                (f"mta-sts.{d}", "A"),
            ):  # fmt: skip
                await e.dns.query(name, rdtype)
            await e.store.put_policy(
                CachedPolicy(d, f"id{i}", sts_text, now, now + dtm.timedelta(days=7))
            )
            policy = dc.replace(template, domain=d)
            server._store(d, dc.replace(answer, text=answer.text), policy)
            server.recorder.offer(served_record(d, policy, answer, now))
        fill_s = time.perf_counter() - started
        await server.recorder.flush()
        sample = [f"mem{i:06d}.test" for i in range(0, n, max(1, n // 100))]
        got = await lookups(address, sample, 4, 60.0)
        import gc

        gc.collect()
        return {
            "policies": n,
            "fill_seconds": round(fill_s, 1),
            "rss_before_kib": rss_before,
            "rss_kib": _own_rss_kib(),
            "hwm_kib": _own_rss_kib("VmHWM"),
            "answer_cache": len(server._cache),
            "dns_cache": len(e.dns.cache or {}),
            "sample": got.summary(),
            "hits": server.metrics.cache_hits,
        }
    finally:
        await server.stop()


def _own_rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def memory_child_main(spec_json: str) -> int:
    """``--memory-child SPEC``: fill a policy server's caches and report (see above)."""
    spec = json.loads(spec_json)
    result = asyncio.run(
        _memory_fill(Path(spec["config"]), Path(spec["store"]), tuple(spec["address"]), spec["n"])
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def memory(lab: Lab, workdir: Path, address: tuple[str, int], n: int) -> dict[str, Any]:
    """RSS of a policy server process holding ``n`` cached policies."""
    mx = Mxguard(lab, workdir, address, 4.0)
    spec = {
        "config": str(mx.config),
        "store": str(workdir / "memory.db"),
        "address": list(address),
        "n": n,
    }
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the memory child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the servers under test ------------------------------------------------------------------


class Server:
    """A policy server as a separate process, started fresh with an empty cache file."""

    name = ""
    slug = ""  # for file names
    map_name = "postfix"  # the socketmap name in its requests

    def __init__(self, lab: Lab, workdir: Path, address: tuple[str, int]) -> None:
        self.lab, self.workdir, self.address = lab, workdir, address
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.slug}.log"
        self.runs = 0

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self.runs += 1
        cache = self.workdir / f"{self.slug}-cache-{self.runs}.db"
        cmd, env = self.command(cache)
        with self.log.open("ab") as log:
            log.write(f"--- run {self.runs}: {' '.join(cmd)}\n".encode())
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: see {self.log}"
                )
            with contextlib.suppress(OSError), socket.create_connection(self.address, timeout=1):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen on {self.address} within 30 s")
            time.sleep(0.05)

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the server process so far, all its threads
        (``/proc/PID/stat`` fields 14 and 15, in clock ticks)."""
        return process_cpu_seconds(self.proc.pid) if self.proc is not None else None

    def rss_kib(self) -> int | None:
        """Resident set size of the server process (VmRSS, KiB)."""
        if self.proc is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # only the process this object started
                self.proc.wait(timeout=5)
        self.proc = None

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Server]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class Mxguard(Server):
    name = slug = "mxguard"

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        address: tuple[str, int],
        fetch_timeout: float,
        event_loop: str = "asyncio",
    ) -> None:
        super().__init__(lab, workdir, address)
        self.event_loop = event_loop
        # The lab's client config, with the same policy fetch timeout as the competitor's.
        text = lab.config_file.read_text(encoding="utf-8")
        lines = [ln for ln in text.splitlines() if not ln.startswith("fetch_timeout")]
        at = lines.index("[local_rules]") if "[local_rules]" in lines else len(lines)
        lines.insert(at, f"fetch_timeout = {fetch_timeout}")
        self.config = workdir / "mxguard.toml"
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        host, port = self.address
        args = [
            "--config", str(self.config), "--store", f"sqlite:///{cache}", "serve", "postfix",
            "--listen", f"inet:{host}:{port}",
        ]  # fmt: skip
        if self.event_loop == "asyncio":
            cmd = [sys.executable, "-m", "mxguard", *args]
        else:
            # The CLI has no --event-loop option (yet): the policy server's own switch,
            # set before the CLI's asyncio.run() makes its loop.
            code = (
                "import sys; from mxguard.postfix.server import use_event_loop; "
                f"use_event_loop({self.event_loop!r}); "
                "from mxguard.cli import main; sys.argv[0] = 'mxguard'; main()"
            )
            cmd = [sys.executable, "-c", code, *args]
        return cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}

    def version(self) -> str:
        return metadata.version("mxguard")


class MxguardBefore(Mxguard):
    """mxguard's server from another tree (``--mxguard-before SRC``), for before/after."""

    name = "mxguard (before)"
    slug = "mxguard-before"

    def __init__(self, *args: Any, pythonpath: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pythonpath = pythonpath.resolve()

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command(cache)
        return cmd, {**env, "PYTHONPATH": str(self.pythonpath)}

    def version(self) -> str:
        return f"{metadata.version('mxguard')} from {self.pythonpath}"


def _competitor_has_uvloop(venv: Path) -> bool:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import uvloop"], capture_output=True, timeout=60
    )
    return done.returncode == 0


class Competitor(Server):
    """postfix-mta-sts-resolver's ``mta-sts-daemon``: its default configuration (the
    in-memory cache, ``CACHE_BACKEND = "internal"`` in its defaults.py) or, with
    ``cache="sqlite"``, its SQLite cache; otherwise its defaults."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        address: tuple[str, int],
        fetch_timeout: float,
        venv: Path = COMPETITOR_VENV,
        cache: str = "internal",
        event_loop: str = "asyncio",
    ) -> None:
        self.name = "postfix-mta-sts-resolver" + ("" if cache == "internal" else f" ({cache})")
        self.slug = "competitor" + ("" if cache == "internal" else f"-{cache}")
        super().__init__(lab, workdir, address)
        self.venv = venv
        self.cache = cache
        self.event_loop = event_loop
        self.fetch_timeout = fetch_timeout
        self.resolv_conf, self.ca_bundle = _private_resolver_and_ca(lab, workdir)

    @staticmethod
    def available(venv: Path = COMPETITOR_VENV, event_loop: str = "asyncio") -> str | None:
        """None if the competitor can run here, else why not."""
        if not (venv / "bin" / "mta-sts-daemon").exists():
            return f"{venv}/bin/mta-sts-daemon is missing: run bench/run (it installs it)"
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return "the competitor needs root and unshare(1) for its private resolv.conf"
        if event_loop == "uvloop" and not _competitor_has_uvloop(venv):
            return f"uvloop is not installed in {venv}: bench/run --event-loop uvloop installs it"
        return None

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        host, port = self.address
        cfg = self.workdir / f"{self.slug}-{self.runs}.yml"
        config: dict[str, Any] = {
            "host": host,
            "port": port,
            "reuse_port": True,  # False crashes 1.5.1 at start (opts unset)
            "default_zone": {"strict_testing": False, "timeout": self.fetch_timeout},
        }
        if self.cache != "internal":  # else its default: the in-memory cache
            config["cache"] = {"type": self.cache, "options": {"filename": str(cache)}}
        cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
        if self.lab.ports.dns != 53:
            raise RuntimeError("the competitor can only reach a lab resolver on port 53 (root)")
        daemon = [str(self.venv / "bin" / "mta-sts-daemon"), "-c", str(cfg), "-v", "warn"]
        if self.event_loop == "asyncio":
            daemon.append("--disable-uvloop")  # it switches uvloop on whenever it can import it
        return _in_private_namespace(self.resolv_conf, daemon, self.ca_bundle)

    def version(self) -> str:
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c",
             "from importlib import metadata as m; print(m.version('postfix-mta-sts-resolver'))"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip()


class Tlspol(Server):
    """postfix-tlspol (Go), a binary given with ``--tlspol``: its default configuration
    (configs/config.default.yaml: prefetch on, its cache file) with the lab's resolver."""

    name = "postfix-tlspol"
    slug = "tlspol"
    map_name = "QUERY"  # its README's smtp_tls_policy_maps (QUERYwithTLSRPT: with attributes)

    def __init__(self, lab: Lab, workdir: Path, address: tuple[str, int], binary: Path) -> None:
        super().__init__(lab, workdir, address)
        self.binary = binary
        self.resolv_conf, self.ca_bundle = _private_resolver_and_ca(lab, workdir)

    @staticmethod
    def available(binary: Path) -> str | None:
        if not os.access(binary, os.X_OK):
            return f"{binary} is not an executable"
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return "postfix-tlspol needs root and unshare(1) for its private resolv.conf"
        return None

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        host, port = self.address
        cfg = self.workdir / f"{self.slug}-{self.runs}.yaml"
        config = {
            "server": {
                "address": f"{host}:{port}",
                "log-level": "warn",
                "prefetch": True,
                "cache-file": str(cache),
            },
            "dns": {"address": f"{self.lab.resolver_address}:{self.lab.ports.dns}"},
        }
        cfg.write_text(json.dumps(config, indent=2))
        return _in_private_namespace(
            self.resolv_conf, [str(self.binary), "-config", str(cfg)], self.ca_bundle
        )

    def version(self) -> str:
        out = subprocess.run(
            [str(self.binary), "-version"], capture_output=True, text=True, timeout=30
        )
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else ""


def _private_resolver_and_ca(lab: Lab, workdir: Path) -> tuple[Path, Path]:
    """A resolv.conf naming the lab's Unbound and a CA bundle (system CAs + the lab CA)."""
    resolv_conf = workdir / "resolv.conf"
    resolv_conf.write_text(
        "# the lab's validating resolver, for the competitors only\n"
        f"nameserver {lab.resolver_address}\noptions trust-ad\n"
    )
    ca_bundle = workdir / "ca-bundle.pem"
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    bundle = system.read_text() if system.exists() else ""
    ca_bundle.write_text(bundle + lab.ca_file.read_text())
    return resolv_conf, ca_bundle


def _in_private_namespace(
    resolv_conf: Path, command: list[str], ca_bundle: Path
) -> tuple[list[str], dict[str, str]]:
    """``command`` in a private mount namespace whose /etc/resolv.conf is ``resolv_conf``.

    ``unshare`` (without --fork) and ``sh -c 'exec …'`` replace themselves, so the process
    started is the server itself (its PID is the one whose CPU and RSS are read)."""
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(resolv_conf), *command]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "PYTHONPATH"}
    return cmd, {**env, "SSL_CERT_FILE": str(ca_bundle), "PYTHONUNBUFFERED": "1"}


# --- the measurements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    domains: int = 500  # cold lookups
    warm_domains: int = 50  # the warm set cycled through
    warm_lookups: int = 1_000_000  # per connection count, at most
    warm_seconds: float = 5.0  # per connection count, at most
    connections: tuple[int, ...] = (1, 32)
    # Also a warm run at a fixed offered rate both servers can carry: at full speed the
    # tail is mostly the load generator and the scheduler (5 busy processes on 2 cores),
    # so latency is compared at equal load as well. 0: left out.
    paced_rate: float = 10_000.0
    paced_connections: int = 32
    load_processes: int = 4  # warm load: worker processes, at most one per connection
    cold_connections: int = 32
    herd: int = 50
    fail_lookups: int = 200
    fail_seconds: float = 4.0
    fail_connections: int = 10
    stall_others: int = 20
    fetch_timeout: float = 4.0  # both servers (the competitor's default)
    cold_seconds: float = 120.0


def _fetches(lab: Lab, domains: Sequence[str]) -> int:
    return sum(lab.policy_host(d).fetches for d in domains)


def _per_lookup_us(cpu: float | None, n: int) -> float | None:
    return round(cpu / n * 1e6, 2) if cpu is not None and n else None


async def warm(server: Server, cfg: Config) -> dict[str, Any]:
    keys = [sts_domain(i) for i in range(min(cfg.warm_domains, cfg.domains))]
    primed = await lookups(server.address, keys, 8, cfg.cold_seconds, server.map_name)
    out: dict[str, Any] = {"prime": primed.summary()}
    for n in cfg.connections:
        samples, cpu = await asyncio.to_thread(
            multi_process_lookups,
            server, keys, n, cfg.load_processes, cfg.warm_seconds, cfg.warm_lookups,
        )  # fmt: skip
        out[f"c{n}"] = {**samples.summary(), **cpu}
    if cfg.paced_rate:
        samples, cpu = await asyncio.to_thread(
            multi_process_lookups,
            server, keys, cfg.paced_connections, cfg.load_processes, cfg.warm_seconds,
            cfg.warm_lookups, cfg.paced_rate,
        )  # fmt: skip
        out["paced"] = {**samples.summary(), **cpu}
    out["rss_kib"] = server.rss_kib()
    return out


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of process ``pid`` so far, all its threads
    (``/proc/PID/stat`` fields 14 and 15, in clock ticks); None once it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return None


def _lab_cpu_seconds(lab: Lab) -> float | None:
    """CPU seconds of this process (the lab's DNS servers and policy hosts, and the client
    that asks) and of the lab's Unbound: the work a server's lookups cost the simulated
    internet, on the cores the server shares with it."""
    pid = lab.resolver_pid
    unbound = process_cpu_seconds(pid) if pid is not None else None
    return None if unbound is None else _own_cpu() + unbound


async def cold(server: Server, cfg: Config) -> dict[str, Any]:
    keys = [sts_domain(i) for i in range(cfg.domains)]
    before = _fetches(server.lab, keys)
    cpu_before, lab_before = server.cpu_seconds(), _lab_cpu_seconds(server.lab)
    s = await lookups(server.address, keys, cfg.cold_connections, cfg.cold_seconds, server.map_name)
    cpu_after, lab_after = server.cpu_seconds(), _lab_cpu_seconds(server.lab)
    cpu = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None
    lab = lab_after - lab_before if lab_after is not None and lab_before is not None else None
    return {
        **s.summary(),
        "fetches": _fetches(server.lab, keys) - before,
        "server_cpu_s": round(cpu, 3) if cpu is not None else None,
        "server_cpu_us_per_lookup": _per_lookup_us(cpu, len(s.latencies)),
        "lab_cpu_us_per_lookup": _per_lookup_us(lab, len(s.latencies)),
        "rss_kib": server.rss_kib(),
    }


async def herd(server: Server, cfg: Config) -> dict[str, Any]:
    host = server.lab.policy_host(HERD_DOMAIN)
    before = host.fetches
    clients = [
        await SocketmapClient.connect(server.address, server.map_name) for _ in range(cfg.herd)
    ]
    samples = Samples()
    go = asyncio.Event()

    async def one(c: SocketmapClient) -> None:
        await go.wait()
        samples.add(*await c.ask(HERD_DOMAIN))

    started = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT + 5), asyncio.TaskGroup() as tg:
            for c in clients:
                tg.create_task(one(c))
            go.set()
    finally:
        samples.elapsed = time.perf_counter() - started
        for c in clients:
            await c.close()
    return {**samples.summary(), "fetches": host.fetches - before}


async def failing(server: Server, cfg: Config) -> dict[str, Any]:
    """Lookups of a domain whose policy host answers 404, paced over ``fail_seconds``."""
    host = server.lab.policy_host(FAIL_DOMAIN)
    before = host.fetches
    per_conn = cfg.fail_lookups // cfg.fail_connections
    pause = cfg.fail_seconds / per_conn
    samples = Samples()

    async def worker() -> None:
        client = await SocketmapClient.connect(server.address, server.map_name)
        try:
            for _ in range(per_conn):
                started = time.monotonic()
                samples.add(*await client.ask(FAIL_DOMAIN))
                await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
        finally:
            await client.close()

    started = time.perf_counter()
    async with asyncio.timeout(cfg.fail_seconds + 2 * REQUEST_TIMEOUT), asyncio.TaskGroup() as tg:
        for _ in range(cfg.fail_connections):
            tg.create_task(worker())
    samples.elapsed = time.perf_counter() - started
    return {**samples.summary(), "fetches": host.fetches - before}


async def stalled(server: Server, cfg: Config) -> dict[str, Any]:
    """A policy host that never answers: its first lookup, its retry, and everyone else."""
    host = server.lab.policy_host(STALL_DOMAIN)
    before = host.fetches
    first = await SocketmapClient.connect(server.address, server.map_name)
    others = [
        await SocketmapClient.connect(server.address, server.map_name)
        for _ in range(cfg.stall_others)
    ]
    other_samples = Samples()
    try:
        async with asyncio.timeout(3 * REQUEST_TIMEOUT):
            first_task = asyncio.create_task(first.ask(STALL_DOMAIN))
            await asyncio.sleep(0.1)  # the stalled fetch is under way

            async def other(i: int, c: SocketmapClient) -> None:
                other_samples.add(*await c.ask(other_domain(i)))

            started = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for i, c in enumerate(others):
                    tg.create_task(other(i, c))
            other_samples.elapsed = time.perf_counter() - started
            first_reply, first_seconds = await first_task
            # Postfix defers the message and retries: the same lookup again, right away.
            retry_reply, retry_seconds = await first.ask(STALL_DOMAIN)
    finally:
        for c in [first, *others]:
            await c.close()
    return {
        "first_ms": round(first_seconds * 1000, 1),
        "first_reply": first_reply.strip(),
        "retry_ms": round(retry_seconds * 1000, 1),
        "retry_reply": retry_reply.strip(),
        "others": other_samples.summary(),
        "fetches": host.fetches - before,
    }


Measurement = Callable[["Server", "Config"], Coroutine[Any, Any, dict[str, Any]]]

MEASUREMENTS: dict[str, Measurement] = {
    "warm": warm,
    "cold": cold,
    "herd": herd,
    "failing": failing,
    "stalled": stalled,
}


async def _warm_lab(lab: Lab, domains: Sequence[str], connections: int = 32) -> None:
    """Fetch each domain's policy once, straight from its policy host, before any server is
    measured. A lab's first burst of TLS handshakes is slower than later ones (up to twice the
    latency), and without this whichever server is measured first would pay for it. The
    servers' own fetch counts are taken as differences, so these do not show."""
    from mxguard.adapters.https import fetch_policy

    gate = asyncio.Semaphore(connections)

    async def one(domain: str) -> None:
        host = lab.policy_host(domain)
        async with gate:
            await fetch_policy(
                domain, connect_to=host.address, port=host.port, ca_file=lab.pki.ca_file,
                timeout=10.0,
            )  # fmt: skip

    await asyncio.gather(*(one(d) for d in domains))


def run(
    lab: Lab,
    servers: Sequence[Server],
    cfg: Config,
    only: Sequence[str] = tuple(MEASUREMENTS),
    progress: Callable[[str], None] = lambda _: None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Every measurement against every server (fresh process, fresh cache, flushed resolver).

    With ``rounds`` above 1 each measurement is made that many times, the servers taking
    turns (in reverse order every other round), and every figure is the median of its
    rounds (this machine's speed drifts by a fifth from minute to minute; turns and medians
    keep the drift out of the ratios).
    The lab must run ``scenario(cfg.domains, cfg.stall_others)``.
    """
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "servers": {}}
    for s in servers:
        results["servers"][s.name] = {"version": s.version()}
    progress("warming the lab's policy hosts")
    asyncio.run(_warm_lab(lab, [sts_domain(i) for i in range(cfg.domains)]))
    results["rounds"] = rounds
    for name in only:
        made: dict[str, list[Any]] = {s.name: [] for s in servers}
        for r in range(rounds):
            # Odd rounds in the reverse order: no server is always the first after the flush.
            for s in servers if r % 2 == 0 else list(reversed(servers)):
                lab.flush_resolver()
                progress(
                    f"{name}: {s.name}" + (f" (round {r + 1} of {rounds})" if rounds > 1 else "")
                )
                with s.fresh():
                    made[s.name].append(asyncio.run(MEASUREMENTS[name](s, cfg)))
        for s in servers:
            results["servers"][s.name][name] = _median_of(made[s.name])
    return results


def _median_of(rounds: list[Any]) -> Any:
    """One result from several rounds of it: numbers by their median, dictionaries key by key,
    anything else (replies, texts) as the first round had it."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    if isinstance(first, dict):
        return {
            k: _median_of([r[k] for r in rounds if isinstance(r, dict) and k in r]) for k in first
        }
    if isinstance(first, int | float) and not isinstance(first, bool):
        numbers = [r for r in rounds if isinstance(r, int | float) and not isinstance(r, bool)]
        middle = statistics.median(numbers)
        whole = isinstance(first, int) and middle == int(middle)
        return int(middle) if whole else middle  # counts stay counts: 500, not 500.0
    return first


# --- the report ------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or a != a or b != b:
        return "–"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def markdown(results: dict[str, Any]) -> str:
    """The results table: mxguard, the competitor, and mxguard ÷ competitor."""
    servers = results["servers"]
    names = list(servers)
    rows: list[tuple[str, list[Any], str]] = []  # label, values per server, how to read

    def get(server: str, *path: str) -> Any:
        v: Any = servers[server]
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return v

    def row(label: str, path: tuple[str, ...], better: str, fmt: str = "{:.1f}") -> None:
        values = [get(n, *path) for n in names]
        rows.append((label, [fmt.format(v) if v is not None else "–" for v in values], better))
        raw_rows.append((label, values))

    raw_rows: list[tuple[str, list[Any]]] = []
    cfg = results["config"]
    for c in cfg["connections"]:
        row(f"warm lookups/s, {c} connection(s)", ("warm", f"c{c}", "per_second"), "higher")
        row(f"warm p50 ms, {c} connection(s)", ("warm", f"c{c}", "p50_ms"), "lower", "{:.3f}")
        row(f"warm p99 ms, {c} connection(s)", ("warm", f"c{c}", "p99_ms"), "lower", "{:.3f}")
        row(
            f"warm server CPU µs per lookup, {c} connection(s)",
            ("warm", f"c{c}", "server_cpu_us_per_lookup"), "lower",
        )  # fmt: skip
    if cfg.get("paced_rate"):
        at = f"{cfg['paced_rate']:,.0f}/s offered, {cfg['paced_connections']} connections"
        row(f"warm at {at}: lookups/s", ("warm", "paced", "per_second"), "higher")
        row(f"warm at {at}: p50 ms", ("warm", "paced", "p50_ms"), "lower", "{:.3f}")
        row(f"warm at {at}: p99 ms", ("warm", "paced", "p99_ms"), "lower", "{:.3f}")
        row(
            f"warm at {at}: server CPU µs per lookup",
            ("warm", "paced", "server_cpu_us_per_lookup"), "lower",
        )  # fmt: skip
    row("RSS after the warm run, MiB", ("warm", "rss_kib"), "lower")
    row(f"cold: {cfg['domains']} domains, seconds", ("cold", "seconds"), "lower", "{:.2f}")
    row("cold: lookups/s", ("cold", "per_second"), "higher")
    row("cold: p50 ms", ("cold", "p50_ms"), "lower")
    row("cold: p99 ms", ("cold", "p99_ms"), "lower")
    row("cold: server CPU ms per lookup", ("cold", "server_cpu_us_per_lookup"), "lower", "{:.2f}")
    row(
        "cold: lab CPU ms per lookup (its DNS, Unbound, policy hosts and the client)",
        ("cold", "lab_cpu_us_per_lookup"), "lower", "{:.2f}",
    )  # fmt: skip
    row("cold: policy fetches", ("cold", "fetches"), "lower", "{}")
    row("RSS after the cold run, MiB", ("cold", "rss_kib"), "lower")
    row(f"herd: fetches for {cfg['herd']} concurrent lookups", ("herd", "fetches"), "lower", "{}")
    row("herd: p50 ms", ("herd", "p50_ms"), "lower")
    row("herd: p99 ms", ("herd", "p99_ms"), "lower")
    row(
        f"404 host: fetches for {cfg['fail_lookups']} lookups in {cfg['fail_seconds']:.0f} s",
        ("failing", "fetches"), "lower", "{}",
    )  # fmt: skip
    row("404 host: p50 ms", ("failing", "p50_ms"), "lower")
    row("404 host: p99 ms", ("failing", "p99_ms"), "lower")
    row("stalled host: first lookup ms", ("stalled", "first_ms"), "lower")
    row("stalled host: retry ms", ("stalled", "retry_ms"), "lower")
    row(
        f"stalled host: {cfg['stall_others']} other uncached domains meanwhile, p50 ms",
        ("stalled", "others", "p50_ms"), "lower",
    )  # fmt: skip
    row(
        f"stalled host: {cfg['stall_others']} other uncached domains meanwhile, max ms",
        ("stalled", "others", "max_ms"), "lower",
    )  # fmt: skip
    row("stalled host: fetches", ("stalled", "fetches"), "lower", "{}")

    def scaled(label: str, values: list[Any]) -> list[Any]:
        if "MiB" in label:
            return [v / 1024 if v is not None else None for v in values]
        if "CPU ms" in label:  # recorded in µs
            return [v / 1000 if v is not None else None for v in values]
        return values

    # mxguard first, then each other server with the ratio mxguard ÷ that server.
    others = names[1:]
    head = f"| measurement | {names[0]} | " + "".join(f"{o} | ratio | " for o in others)
    head = head.rstrip() + "\n|---|---:|" + "---:|---:|" * len(others) + "\n"
    lines = []
    for (label, shown, better), (_, values) in zip(rows, raw_rows, strict=True):
        values = scaled(label, values)
        if "MiB" in label or "CPU ms" in label:
            fmt = "{:.1f}" if "MiB" in label else "{:.2f}"
            shown = [fmt.format(v) if v is not None else "–" for v in values]
        cells = [shown[0]]
        for i in range(1, len(names)):
            cells += [shown[i], _ratio(values[0], values[i])]
        lines.append(f"| {label} ({better} is better) | " + " | ".join(cells) + " |")
    replies = []
    for n in names:
        for m in ("cold", "herd", "failing"):
            got = get(n, m, "replies")
            if got:
                replies.append(f"- {n}, {m}: " + ", ".join(f"`{k}` ×{v}" for k, v in got.items()))
        st = get(n, "stalled")
        if st:
            replies.append(
                f"- {n}, stalled: first `{st['first_reply']}`, retry `{st['retry_reply']}`"
            )
    out = head + "\n".join(lines) + "\n\nReplies:\n\n" + "\n".join(replies) + "\n"
    mem = results.get("memory")
    if mem:
        out += (
            f"\nmxguard holding {mem['policies']} cached policies: RSS "
            f"{mem['rss_kib'] / 1024:.1f} MiB (peak {mem['hwm_kib'] / 1024:.1f} MiB; "
            f"{mem['rss_before_kib'] / 1024:.1f} MiB before filling); answer cache "
            f"{mem['answer_cache']} entries, DNS cache {mem['dns_cache']}; a sample of "
            f"{mem['sample']['lookups']} of them answered {mem['sample']['replies']}.\n"
        )
    return out


def load() -> dict[str, Any]:
    """The machine's load averages (1, 5, 15 min), to say how quiet it was."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--domains", type=int, default=500, help="cold lookups (default 500)")
    p.add_argument("--warm-seconds", type=float, default=5.0)
    p.add_argument(
        "--load-processes", type=int, default=4, help="warm load: worker processes (default 4)"
    )
    p.add_argument("--lab-net", default="127.221", help="the lab's 127.N network")
    p.add_argument(
        "--listen", default="127.211.0", help="servers listen on PREFIX.1, .2, ... (one each)"
    )
    p.add_argument("--only", nargs="*", choices=list(MEASUREMENTS), default=list(MEASUREMENTS))
    p.add_argument(
        "--rounds", type=int, default=1,
        help="make each measurement N times, servers taking turns, and report medians",
    )  # fmt: skip
    p.add_argument("--without-competitor", action="store_true")
    p.add_argument(
        "--without-sqlite", action="store_true", help="not the competitor's SQLite column"
    )
    p.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default="asyncio",
        help="the event loop of both Python servers (default asyncio: the competitor's venv "
        "has no uvloop unless bench/run --event-loop uvloop installed it)",
    )  # fmt: skip
    p.add_argument("--tlspol", type=Path, help="also measure this postfix-tlspol binary")
    p.add_argument(
        "--mxguard-before", type=Path, metavar="SRC",
        help="also measure the mxguard server of another tree (its src/ folder)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--render", type=Path, help="only print the table of a --json results file")
    p.add_argument(
        "--memory", type=int, default=0, metavar="N",
        help="also measure mxguard's RSS holding N cached policies (e.g. 100000)",
    )  # fmt: skip
    p.add_argument("--load-worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_worker:
        return load_worker_main(args.load_worker)
    if args.memory_child:
        return memory_child_main(args.memory_child)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    if not 1 <= args.domains <= 2000:
        p.error("--domains: expected 1 to 2000")
    cfg = Config(
        domains=args.domains, warm_seconds=args.warm_seconds, load_processes=args.load_processes
    )
    why = None if args.without_competitor else Competitor.available(event_loop=args.event_loop)
    if not why and args.tlspol:
        why = Tlspol.available(args.tlspol)
    if why:
        p.error(why)

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    load_before = load()
    with tempfile.TemporaryDirectory(prefix="mxguard-bench-") as tmp:
        workdir = Path(tmp)
        progress(f"starting the lab ({cfg.domains} + {cfg.stall_others + 3} domains)")
        # The zones' own TTLs (60 s, lab/zones.py), not the lab resolver's few seconds: a
        # real resolver keeps an MX host's records for their TTL, and so does mxguard.
        ttls = (RESOLVER_TTL_CAP, RESOLVER_TTL_CAP)
        with Lab(
            scenario(cfg.domains, cfg.stall_others), net=args.lab_net, resolver_ttls=ttls
        ) as lab:
            progress(f"lab ready after {time.perf_counter() - started:.1f} s")
            addresses = ((f"{args.listen}.{i}", 8461) for i in range(1, 10))
            timeout = cfg.fetch_timeout
            servers: list[Server] = [
                Mxguard(lab, workdir, next(addresses), timeout, args.event_loop)
            ]
            if not args.without_competitor:
                servers.append(
                    Competitor(lab, workdir, next(addresses), timeout, event_loop=args.event_loop)
                )
                if not args.without_sqlite:
                    sqlite = Competitor(
                        lab, workdir, next(addresses), timeout, cache="sqlite",
                        event_loop=args.event_loop,
                    )  # fmt: skip
                    servers.append(sqlite)
            if args.tlspol:
                servers.append(Tlspol(lab, workdir, next(addresses), args.tlspol))
            if args.mxguard_before:
                before = MxguardBefore(
                    lab, workdir, next(addresses), timeout, args.event_loop,
                    pythonpath=args.mxguard_before,
                )  # fmt: skip
                servers.append(before)
            results = run(lab, servers, cfg, args.only, progress, args.rounds)
            if args.memory:
                progress(f"memory: mxguard with {args.memory} cached policies")
                lab.flush_resolver()
                results["memory"] = memory(lab, workdir, (f"{args.listen}.9", 8461), args.memory)
    results["event_loop"] = args.event_loop
    results["load"] = {"before": load_before, "after": load()}
    results["machine"] = machine()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["command"] = "bench/run " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    progress(f"done in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
