"""Fault suite: what `serve postfix` answers while its resolver and policy hosts break.

Run as root (the lab's ports), by hand:  .venv/bin/python bench/faults.py [--json]

A real lab, a real policy server on a thread, and a resolver in between that the run can
switch between passing queries to the lab's Unbound and each fault: no answer at all,
SERVFAIL, truncated UDP with TCP refused. Unbound itself is also frozen (SIGSTOP) and thawed,
and MTA-STS policy hosts stall or vanish. For each fault and domain the table says what
Postfix was told, how long it took, whether the answer was weaker than the domain's policy
(it must never be), and whether the server recovered without a restart once the fault ended.
Every query is bounded (the server's 5 s budget); the run takes about a minute and talks to
127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
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
    with Lab(named("standard"), net=NET) as lab:
        resolver = FaultyResolver(lab.resolver, RESOLVER)
        settings = load(lab.config_file).with_overrides(
            store=f"sqlite:///{work / 'state.db'}", resolvers=((RESOLVER, 53),)
        )
        try:
            with PolicyServer(settings, listen=f"inet:{HOST}:0", budget=5.0) as server:
                client = Client(server.socketmap_address)
                normal = {d: client.ask(d)[0] for d in DOMAINS}

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
        finally:
            resolver.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
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


if __name__ == "__main__":
    main()
