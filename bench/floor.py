"""Benchmark: the least server CPU a Python server can spend per request, by I/O design.

A server that does nothing but answer each request with a fixed socketmap reply is measured
the way ``postfix_policy.py`` measures the policy servers: the next request sent on each
reply, the server's user and system CPU read from /proc. Three designs:

- ``asyncio``: an ``asyncio.BufferedProtocol`` that reads into one buffer, as mxguard's
  server does, and writes the reply, on asyncio's own event loop (what mxguard's and the
  competitor's servers are built on);
- ``epoll``: one thread running a bare ``select.epoll`` loop (accept, recv, send);
- ``threads``: a thread per connection, blocking ``recv`` and ``send``.

At 1 connection one blocking client in this process asks; at more (``--connections``),
``postfix_policy.py``'s load workers do (4 processes). What a design spends is the floor
below which no server of that design on this machine answers a warm hit, whatever its own
work. Most of it is the kernel's (the wake-up, the loopback send and receive), which a
faster Python program does not change; the rest is the design's own machinery.

    .venv/bin/python bench/floor.py [--seconds S] [--connections 1 32] [--designs ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

DESIGNS = ("asyncio", "epoll", "threads")
PAYLOAD = b"OK secure match=mx.benchmx.test servername=hostname"
REPLY = b"%d:%s," % (len(PAYLOAD), PAYLOAD)  # a socketmap reply (a netstring)
REQUEST = b"24:postfix sts0001.test,"  # a socketmap request as Postfix sends it


_BUFFER = memoryview(bytearray(65536))


class _Answer(asyncio.BufferedProtocol):
    # A BufferedProtocol reading into one buffer, as mxguard's server does: a plain Protocol
    # gets a new 256 KiB bytes object per read, which in a small process makes the C heap
    # grow and shrink (brk, page faults) on every request, half again the floor's CPU.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(REPLY)


def _listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _serve_asyncio(host: str, port: int, ready: Any) -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_server(_Answer, host, port)
        ready.set()
        await asyncio.sleep(3600)

    asyncio.run(main())


def _serve_epoll(host: str, port: int, ready: Any) -> None:
    listener = _listener(host, port)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    ready.set()
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                conn, _ = listener.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            if data:
                conn.send(REPLY)
            else:
                poller.unregister(fd)
                del conns[fd]
                conn.close()


def _serve_threads(host: str, port: int, ready: Any) -> None:
    threading.stack_size(256 * 1024)
    listener = _listener(host, port)
    ready.set()

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while conn.recv(4096):
                conn.send(REPLY)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


_SERVERS = {"asyncio": _serve_asyncio, "epoll": _serve_epoll, "threads": _serve_threads}


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class _Target:
    """What postfix_policy.multi_process_lookups needs to know of a server."""

    map_name = "postfix"

    def __init__(self, pid: int, address: tuple[str, int]) -> None:
        self.pid, self.address = pid, address

    def cpu_seconds(self) -> float:
        user, system = _cpu(self.pid)
        return user + system


def _one_connection(
    pid: int, host: str, port: int, seconds: float
) -> tuple[int, float, float, float]:
    """Requests answered, seconds, and the server's user and system CPU per request."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(500):  # warm up
            s.sendall(REQUEST)
            s.recv(4096)
        user0, sys0 = _cpu(pid)
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            s.sendall(REQUEST)
            if not s.recv(4096):
                raise RuntimeError("the floor server closed the connection")
            n += 1
        elapsed = time.perf_counter() - started
        user1, sys1 = _cpu(pid)
    return n, elapsed, (user1 - user0) / n, (sys1 - sys0) / n


def measure(
    seconds: float = 3.0,
    host: str = "127.0.0.1",
    port: int = 18461,
    design: str = "asyncio",
    connections: int = 1,
) -> dict[str, Any]:
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_SERVERS[design], args=(host, port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"the {design} floor server did not start")
        assert server.pid is not None
        if connections == 1:
            n, elapsed, user, system = _one_connection(server.pid, host, port, seconds)
            total = user + system
        else:
            here = str(Path(__file__).resolve().parent)
            if here not in sys.path:
                sys.path.insert(0, here)  # postfix_policy.py, whose load workers ask
            from postfix_policy import multi_process_lookups

            target = _Target(server.pid, (host, port))
            keys = [f"sts{i:04d}.test" for i in range(50)]
            samples, cpu = multi_process_lookups(
                target,
                keys,
                connections,
                4,
                seconds,
                10**8,  # type: ignore[arg-type]
            )
            n, elapsed = len(samples.latencies), samples.elapsed
            user = system = 0.0  # /proc gives the sum only once the workers have ended
            if not n or cpu["server_cpu_s"] is None:
                raise RuntimeError("no lookup was answered")
            total = cpu["server_cpu_s"] / n
    finally:
        server.kill()
        server.join(5)
    got: dict[str, Any] = {
        "design": design,
        "connections": connections,
        "lookups": n,
        "per_second": round(n / elapsed, 1),
        "server_cpu_us_per_lookup": round(total * 1e6, 1),
    }
    if connections == 1:
        got["server_user_us_per_lookup"] = round(user * 1e6, 1)
        got["server_system_us_per_lookup"] = round(system * 1e6, 1)
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--port", type=int, default=18461)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    port = args.port
    for connections in args.connections:
        for design in args.designs:  # a new port each: no TIME_WAIT trouble between servers
            got = measure(args.seconds, port=port, design=design, connections=connections)
            port += 1
            results.append(got)
            split = (
                f" (user {got['server_user_us_per_lookup']}, system "
                f"{got['server_system_us_per_lookup']})"
                if connections == 1
                else ""
            )
            print(
                f"{design:>8}, {connections:>2} connection(s): {got['per_second']:>8.0f} "
                f"requests/s, server CPU {got['server_cpu_us_per_lookup']} µs per request{split}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
