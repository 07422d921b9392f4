"""Benchmark: the least server CPU an asyncio server can spend per request on one connection.

A server that does nothing but answer each request with a fixed socketmap reply (an
``asyncio.Protocol`` whose ``data_received`` writes the reply) is measured the way
``postfix_policy.py`` measures the policy servers: one connection, the next request sent on
each reply, the server's user and system CPU read from /proc. What it spends is the floor
below which no asyncio server on this machine can answer a warm hit on one connection,
whatever its own work; most of it is the kernel's (the wake-up, the loopback send and
receive), which a faster Python program does not change.

    .venv/bin/python bench/floor.py [--seconds S] [--port P] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

REPLY = b"47:OK secure match=mx.benchmx.test servername=hostname,"
REQUEST = b"24:postfix sts0001.test,"  # a socketmap request as Postfix sends it


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(REPLY)


def _serve(host: str, port: int, ready: Any) -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_server(_Answer, host, port)
        ready.set()
        await asyncio.sleep(3600)

    asyncio.run(main())


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(seconds: float = 3.0, host: str = "127.0.0.1", port: int = 18461) -> dict[str, Any]:
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(host, port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the floor server did not start")
        with socket.create_connection((host, port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(500):  # warm up
                s.sendall(REQUEST)
                s.recv(4096)
            assert server.pid is not None
            user0, sys0 = _cpu(server.pid)
            started, n = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                s.sendall(REQUEST)
                if not s.recv(4096):
                    raise RuntimeError("the floor server closed the connection")
                n += 1
            elapsed = time.perf_counter() - started
            user1, sys1 = _cpu(server.pid)
    finally:
        server.kill()
        server.join(5)
    return {
        "lookups": n,
        "per_second": round(n / elapsed, 1),
        "server_cpu_us_per_lookup": round((user1 - user0 + sys1 - sys0) / n * 1e6, 1),
        "server_user_us_per_lookup": round((user1 - user0) / n * 1e6, 1),
        "server_system_us_per_lookup": round((sys1 - sys0) / n * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--port", type=int, default=18461)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    got = measure(args.seconds, port=args.port)
    print(
        f"asyncio floor, 1 connection: {got['per_second']:.0f} requests/s, server CPU "
        f"{got['server_cpu_us_per_lookup']} µs per request (user "
        f"{got['server_user_us_per_lookup']}, system {got['server_system_us_per_lookup']})"
    )
    if args.json:
        args.json.write_text(json.dumps(got, indent=2) + "\n")


if __name__ == "__main__":
    main()
