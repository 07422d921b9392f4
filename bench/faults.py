"""Fault suite: what `serve postfix` answers while its resolver and policy hosts break.

Run as root (the lab's ports), by hand:  .venv/bin/python bench/faults.py [--json]

A real lab, a real policy server on a thread, and a resolver in between that the run can
switch between passing queries to the lab's Unbound and each fault: no answer at all,
SERVFAIL, truncated UDP with TCP refused. Unbound itself is also frozen (SIGSTOP) and thawed;
MTA-STS policy hosts stall, answer 404, reset connections or answer the TLS handshake with
garbage; PostgreSQL and Redis, as the store, are shut down and started again while queries
keep coming. For each fault and domain the table says what
Postfix was told, how long it took, whether the answer was weaker than the domain's policy
(it must never be), and whether the server recovered without a restart once the fault ended.
Every query is bounded (the server's 5 s budget); the run takes about a minute and talks to
127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode

from mxguard.config import load
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import PolicyBehaviour, named
from mxguard.postfix.server import PolicyServer

NET = "127.87"
HOST = f"{NET}.250.1"
RESOLVER = f"{NET}.250.2"
# What each domain must get when all is well; the suite checks nothing weaker ever comes back.
DOMAINS = ("dane-ee.test", "sts-enforce.test", "nopolicy.test", "sts-testing.test")
STRONG = ("OK dane-only", "OK secure")


class FaultyResolver:
    """A DNS resolver on loopback that passes queries to Unbound, or fails as told."""

    MODES = ("pass", "blackhole", "servfail", "truncate")

    def __init__(self, upstream: tuple[str, int], address: str) -> None:
        self.upstream = upstream
        self.address = address
        self.mode = "pass"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(self.address, 53)
        )
        self.tcp = await asyncio.start_server(self._tcp, self.address, 53)

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to ``wire`` under the current mode (None: no reply at all)."""
        if self.mode == "blackhole":
            return None
        query = dns.message.from_wire(wire)
        if self.mode in ("servfail", "truncate"):
            reply = dns.message.make_response(query)
            if self.mode == "servfail":
                reply.set_rcode(dns.rcode.SERVFAIL)
            else:
                reply.flags |= dns.flags.TC
            return reply.to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(4)
            s.sendto(wire, self.upstream)
            try:
                return s.recv(65535)
            except TimeoutError:
                return None

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.mode in ("blackhole", "truncate"):
                return  # refused in effect: closed at once
            size = int.from_bytes(await reader.readexactly(2), "big")
            wire = await reader.readexactly(size)
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(None, self._tcp_upstream, wire)
            if reply is not None:
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _tcp_upstream(self, wire: bytes) -> bytes | None:
        if self.mode == "servfail":
            return self.answer(wire)
        try:
            with socket.create_connection(self.upstream, timeout=4) as s:
                s.sendall(len(wire).to_bytes(2, "big") + wire)
                size = int.from_bytes(s.recv(2), "big")
                data = b""
                while len(data) < size:
                    chunk = s.recv(size - len(data))
                    if not chunk:
                        return None
                    data += chunk
                return data
        except OSError:
            return None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.udp.close)
        self.loop.call_soon_threadsafe(self.tcp.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: FaultyResolver) -> None:
        self.resolver = resolver

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()

        def reply() -> None:
            answer = self.resolver.answer(data)
            if answer is not None:
                loop.call_soon_threadsafe(self.transport.sendto, answer, addr)  # type: ignore[attr-defined]

        loop.run_in_executor(None, reply)


class Client:
    """Postfix's side of the socketmap: one connection, netstring requests."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address

    def ask(self, key: str) -> tuple[str, float]:
        payload = f"postfix {key}".encode()
        started = time.perf_counter()
        with socket.create_connection(self.address, timeout=15) as s:
            s.sendall(f"{len(payload)}:".encode() + payload + b",")
            data = b""
            while not data.endswith(b","):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        text = data.partition(b":")[2][:-1].decode()
        return text, (time.perf_counter() - started) * 1000


@dataclasses.dataclass
class Row:
    fault: str
    domain: str
    normal: str
    during: str
    ms: float
    after: str
    weaker: bool
    recovered: bool
    recovery_s: float  # from the end of the fault to the normal answer (or giving up)


def classify(normal: str, answer: str) -> bool:
    """Whether ``answer`` is weaker than ``normal`` (a TEMP never is: Postfix retries later)."""
    if answer.startswith("TEMP") or answer == normal:
        return False
    return any(normal.startswith(s) for s in STRONG)


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class HostilePolicyHost:
    """Takes the place of a lab policy host: resets every connection, or answers the TLS
    ClientHello with bytes that are not TLS."""

    def __init__(self, lab: Lab, domain: str, how: str) -> None:
        self.lab, self.domain, self.how = lab, domain, how
        self.host = lab.policy_host(domain)
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()
            return
        await reader.read(1024)  # the ClientHello
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nversion: STSv1\r\nmode: none\r\n" * 20)
        await writer.drain()
        writer.close()

    def start(self) -> None:
        async def go() -> None:
            await self.host.stop()
            self.server = await asyncio.start_server(
                self._handle, self.host.address, self.host.port
            )

        self.lab._call(go())

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
            await self.host.start()

        self.lab._call(go())


class StoreServers:
    """PostgreSQL and Redis on loopback that the run can shut down and start again."""

    def __init__(self, work: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import servers  # the test suite's helpers: binaries, an unprivileged account

        self.servers = servers
        self.work = work
        self.pg: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None
        self.pg_port = servers.free_port(servers.POSTGRES_HOST, 5432)
        self.redis_port = servers.free_port(servers.REDIS_HOST, 6379)
        account = servers._unprivileged_user()
        self.run_as: dict[str, object] = {}
        work.chmod(0o755)  # the unprivileged account PostgreSQL runs as must reach its folder
        self.pg_dir = work / "pg"
        self.pg_dir.mkdir()
        if account is not None:
            os.chown(self.pg_dir, account.pw_uid, account.pw_gid)
            self.run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        initdb = servers.find_binary("initdb")
        subprocess.run(
            [initdb, "-D", str(self.pg_dir / "data"), "-U", "mxguard", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, cwd=self.pg_dir, **self.run_as,
        )  # fmt: skip

    def start_pg(self) -> None:
        s = self.servers
        self.pg = subprocess.Popen(
            [s.find_binary("postgres"), "-D", str(self.pg_dir / "data"), "-p", str(self.pg_port),
             "-c", f"listen_addresses={s.POSTGRES_HOST}", "-c",
             f"unix_socket_directories={self.pg_dir}", "-c", "fsync=off"],
            cwd=self.pg_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **self.run_as,
        )  # fmt: skip
        self._wait(s.POSTGRES_HOST, self.pg_port)
        time.sleep(1.0)  # listening is not yet accepting logins

    def start_redis(self) -> None:
        s = self.servers
        self.redis = subprocess.Popen(
            ["redis-server", "--bind", s.REDIS_HOST, "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(self.work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait(s.REDIS_HOST, self.redis_port)

    @staticmethod
    def _wait(host: str, port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listens on {host}:{port}")

    def stop_pg(self) -> None:
        if self.pg is not None:
            self.pg.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            self.pg.wait(30)
            self.pg = None

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(30)
            self.redis = None

    def pg_url(self) -> str:
        return f"postgresql://mxguard@{self.servers.POSTGRES_HOST}:{self.pg_port}/postgres"

    def redis_url(self) -> str:
        return f"redis://{self.servers.REDIS_HOST}:{self.redis_port}/0"

    def close(self) -> None:
        self.stop_pg()
        self.stop_redis()


def under_load(client: Client, seconds: float) -> list[tuple[str, str, float]]:
    """Ask every domain again and again for ``seconds``: (domain, answer, ms) each time."""
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for d in DOMAINS:
            answer, ms = client.ask(d)
            seen.append((d, answer, ms))
    return seen


def store_restart(
    name: str,
    lab: Lab,
    settings: object,
    url: str,
    stop: Callable[[], None],
    start: Callable[[], None],
) -> list[Row]:
    """A policy server on the store at ``url``; the store stops and starts under load."""
    rows = []
    with PolicyServer(
        settings.with_overrides(store=url),
        listen=f"inet:{HOST}:0",
        budget=5.0,  # type: ignore[attr-defined]
    ) as server:
        client = Client(server.socketmap_address)
        normal = {d: client.ask(d)[0] for d in DOMAINS}
        stop()
        forget(server)
        during = under_load(client, 3.0)
        start()
        ended = time.perf_counter()
        forget(server)
        for d in DOMAINS:
            while True:
                after = client.ask(d)[0]
                if after == normal[d] or time.perf_counter() - ended > 30:
                    break
                time.sleep(0.5)
            mine = [(a, ms) for dd, a, ms in during if dd == d]
            kinds = sorted({a.split(":")[0][:60] for a, _ in mine})
            rows.append(
                Row(
                    fault=f"{name} ({len(mine)} queries)",
                    domain=d,
                    normal=normal[d],
                    during=" / ".join(kinds),
                    ms=max(ms for _, ms in mine),
                    after=after,
                    weaker=any(classify(normal[d], a) for a, _ in mine),
                    recovered=after == normal[d],
                    recovery_s=time.perf_counter() - ended,
                )
            )
    return rows


def forget(server: PolicyServer) -> None:
    """Nothing cached: no answers, no DNS answers (the MTA-STS store keeps its policies)."""
    server._cache.clear()
    dns = server.engine.dns
    if dns.cache is not None:
        dns.cache.clear()


def run_fault(
    name: str,
    lab: Lab,
    server: PolicyServer,
    client: Client,
    normal: dict[str, str],
    fault: Callable[[], object],
    undo: Callable[[], None],
    *,
    fresh: bool,
) -> list[Row]:
    """Apply ``fault``, ask every domain (``fresh``: with nothing cached), undo, ask again."""
    rows = []
    if fresh:
        forget(server)
        lab.flush_resolver()
    fault()
    during = {d: client.ask(d) for d in DOMAINS}
    undo()
    lab.flush_resolver()
    forget(server)  # recovery means resolving anew
    ended = time.perf_counter()
    after: dict[str, str] = {}
    recovery: dict[str, float] = {}
    for d in DOMAINS:
        # A resolution that began during the fault may still be running (one per domain):
        # ask again, as Postfix does after a TEMP, until the normal answer or 30 s.
        while True:
            after[d] = client.ask(d)[0]
            if after[d] == normal[d] or time.perf_counter() - ended > 30:
                break
            time.sleep(0.5)
        recovery[d] = time.perf_counter() - ended
    for d in DOMAINS:
        answer, ms = during[d]
        rows.append(
            Row(
                name,
                d,
                normal[d],
                answer,
                ms,
                after[d],
                classify(normal[d], answer),
                after[d] == normal[d],
                recovery[d],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the lab serves DNS on port 53 and SMTP on 25")
    work = Path(tempfile.mkdtemp(prefix="mxguard-faults-"))
    rows: list[Row] = []
    rss: list[tuple[str, float]] = []
    with Lab(named("standard"), net=NET) as lab:
        resolver = FaultyResolver(lab.resolver, RESOLVER)
        settings = load(lab.config_file).with_overrides(
            store=f"sqlite:///{work / 'state.db'}", resolvers=((RESOLVER, 53),)
        )
        try:
            with PolicyServer(settings, listen=f"inet:{HOST}:0", budget=5.0) as server:
                client = Client(server.socketmap_address)
                normal = {d: client.ask(d)[0] for d in DOMAINS}
                rss.append(("before the faults", rss_mib()))

                def mode(m: str) -> Callable[[], None]:
                    return lambda: setattr(resolver, "mode", m)

                for m in ("blackhole", "servfail", "truncate"):
                    for fresh in (False, True):
                        label = f"resolver {m}" + (", nothing cached" if fresh else "")
                        rows += run_fault(
                            label, lab, server, client, normal, mode(m), mode("pass"),
                            fresh=fresh,
                        )  # fmt: skip
                pid = lab._unbound.pid if lab._unbound else None
                if pid:
                    holder: list[object] = []

                    def freeze() -> None:
                        holder.append(frozen(pid))
                        holder[0].__enter__()  # type: ignore[attr-defined]

                    def thaw() -> None:
                        holder.pop().__exit__(None, None, None)  # type: ignore[attr-defined]

                    rows += run_fault("Unbound frozen (SIGSTOP)", lab, server, client, normal,
                                      freeze, thaw, fresh=True)  # fmt: skip
                unbound = lab._unbound
                if unbound is not None:
                    rows += run_fault(
                        "Unbound stopped, then started again", lab, server, client, normal,
                        lambda: lab._call(unbound.stop()), lambda: lab._call(unbound.start()),
                        fresh=True,
                    )  # fmt: skip
                domain = lab.scenario.domain("sts-enforce.test")
                assert domain.mta_sts is not None
                for behaviour in (PolicyBehaviour.STALL, PolicyBehaviour.NOT_FOUND):
                    broken = dataclasses.replace(
                        domain,
                        mta_sts=dataclasses.replace(domain.mta_sts, behaviour=behaviour),
                    )
                    rows += run_fault(
                        f"policy host {behaviour.value}, policy in the store only", lab, server,
                        client,
                        normal, lambda b=broken: lab.update_domain(b),
                        lambda: lab.update_domain(domain), fresh=True,
                    )  # fmt: skip
                for how in ("reset", "garbage-tls"):
                    hostile = HostilePolicyHost(lab, "sts-enforce.test", how)
                    rows += run_fault(
                        f"policy host {how}, policy in the store only", lab, server, client,
                        normal, hostile.start, hostile.stop, fresh=True,
                    )  # fmt: skip
            rss.append(("after the resolver and policy-host faults", rss_mib()))
            stores = StoreServers(work)
            try:
                stores.start_pg()
                stores.start_redis()
                pg, redis = stores.pg_url(), stores.redis_url()
                rows += store_restart(
                    "PostgreSQL shut down and restarted", lab, settings, pg,
                    stores.stop_pg, stores.start_pg,
                )  # fmt: skip
                rows += store_restart(
                    "Redis shut down and restarted", lab, settings, redis,
                    stores.stop_redis, stores.start_redis,
                )  # fmt: skip
                rss.append(("after the store restarts", rss_mib()))
            finally:
                stores.close()
        finally:
            resolver.close()
    if args.json:
        print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "rss_mib": rss}, indent=2))
        return
    print("| fault | domain | normal answer | during the fault | ms | weaker? | recovered after |")
    print("|---|---|---|---|---:|---|---:|")
    for r in rows:
        weaker = "**YES**" if r.weaker else "no"
        recovered = f"{r.recovery_s:.1f} s" if r.recovered else "**NO**"
        print(
            f"| {r.fault} | {r.domain} | `{r.normal[:40]}` | `{r.during[:60]}` | {r.ms:.0f} "
            f"| {weaker} | {recovered} |"
        )
    weaker = sum(r.weaker for r in rows)
    stuck = sum(not r.recovered for r in rows)
    print(f"\n{len(rows)} answers: {weaker} weaker than the policy, {stuck} not recovered")
    print("RSS of the process (lab and server): " + ", ".join(f"{w} {m:.0f} MiB" for w, m in rss))


if __name__ == "__main__":
    main()
