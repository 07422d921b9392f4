"""A bounded flood against `mxguard serve reports`, run as a process of its own by
tests/test_owner_reports_server.py (so that the flood and the measurements beside it do not
share one interpreter).

    python tests/report_flood.py --target 127.76.0.4:8443 --ca CA.pem --name reports.test \
        --slow-body 1500 --slow-head 500 --oversize 200 --sources 127.76 --third 10

Connections come from source addresses 127.76.10.1, .2, … (`--sources`, `--third`), at most
`--per-source` connections each, so that per-address limits are what a real flood from
several hosts meets. Slow bodies send a request head and then one byte a second; slow heads
send one byte of their head a second; oversize requests declare a 10 MB body, or stream one
chunked; valid ones (`--valid`) are small real reports, all sent at once. Without `--ca` it
speaks plain HTTP. After every connection has been tried it prints ``ready`` and a JSON line
of what happened so far, keeps the slow ones dripping until a line arrives on standard input,
then closes everything and prints the final JSON line: for each kind, how many connected and
what each got (a status code, "closed" or "reset").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import gzip
import json
import resource
import ssl
import sys
import time

SLOW_BODY_HEAD = (
    b"POST /tlsrpt HTTP/1.1\r\nHost: reports.test\r\nContent-Type: application/tlsrpt+gzip\r\n"
    b"Content-Length: 50000\r\n\r\n"
)
SLOW_HEAD = (
    b"POST /tlsrpt HTTP/1.1\r\nHost: reports.test\r\nContent-Type: application/tlsrpt+gzip\r\n"
)
BIG_DECLARED = (
    b"POST /tlsrpt HTTP/1.1\r\nHost: reports.test\r\nContent-Type: application/tlsrpt+gzip\r\n"
    b"Content-Length: 10000000\r\n\r\n"
)
BIG_CHUNKED = (
    b"POST /tlsrpt HTTP/1.1\r\nHost: reports.test\r\nContent-Type: application/tlsrpt+gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def valid_report(index: int) -> bytes:
    """A small valid report (RFC 8460 §4.4) with a report-id of its own, gzipped."""
    day = dt.datetime.now(dt.UTC).date()
    doc = {
        "organization-name": "Flood Sender",
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": "flood@sender.example",
        "report-id": f"flood-{index}",
        "policies": [{
            "policy": {"policy-type": "sts", "policy-domain": "flood.example",
                       "policy-string": ["version: STSv1", "mode: testing"],
                       "mx-host": ["*.flood.example"]},
            "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0},
        }],
    }  # fmt: skip
    body = gzip.compress(json.dumps(doc).encode())
    head = (
        "POST /tlsrpt HTTP/1.1\r\nHost: reports.test\r\nContent-Type: application/tlsrpt+gzip\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        host, _, port = args.target.rpartition(":")
        self.host, self.port = host, int(port)
        self.ctx: ssl.SSLContext | None = None
        if args.ca:
            self.ctx = ssl.create_default_context(cafile=args.ca)
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.stop = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.tried = 0  # slow connections tried, connected or not
        self._sources = self._addresses()

    def _addresses(self) -> list[str]:
        out = []
        for third in range(self.args.third, 256):
            for fourth in range(1, 255):
                out.append(f"{self.args.sources}.{third}.{fourth}")
        return out

    async def connect(
        self, kind: str, index: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        source = self._sources[index // self.args.per_source]
        try:
            return await self._connect(kind, source)
        finally:
            if kind.startswith("slow"):
                self.tried += 1

    async def _connect(
        self, kind: str, source: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host, self.port, ssl=self.ctx, local_addr=(source, 0),
                    server_hostname=self.args.name if self.ctx else None,
                ),
                30,
            )  # fmt: skip
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.outcomes[kind][f"connect-failed:{type(exc).__name__}"] += 1
            return None
        self.outcomes[kind]["connected"] += 1
        self.writers.append(writer)
        return reader, writer

    async def answer(self, reader: asyncio.StreamReader, seconds: float) -> str | None:
        """The status code of the answer, "closed", "reset", or None (nothing yet)."""
        try:
            line = await asyncio.wait_for(reader.readline(), seconds)
        except TimeoutError:
            return None
        except (ConnectionError, ssl.SSLError, OSError):
            return "reset"
        if not line:
            return "closed"
        parts = line.split()
        return parts[1].decode() if len(parts) > 1 else "garbage"

    async def slow(self, kind: str, index: int, head: bytes) -> None:
        conn = await self.connect(kind, index)
        if conn is None:
            return
        reader, writer = conn
        drip = b"x"
        try:
            if kind == "slow-body":
                writer.write(head)
            else:
                writer.write(head[:10])
                head = head[10:]
            await writer.drain()
        except (ConnectionError, OSError):
            self.outcomes[kind]["reset"] += 1
            return
        while not self.stop.is_set():
            got = await self.answer(reader, 1.0)
            if got is not None:
                self.outcomes[kind][got] += 1
                return
            try:
                if kind == "slow-head" and head:
                    drip, head = head[:1], head[1:]
                writer.write(drip)
            except (ConnectionError, OSError, RuntimeError):
                self.outcomes[kind]["reset"] += 1
                return
        self.outcomes[kind]["still-open"] += 1

    async def valid(self, index: int, number: int) -> None:
        conn = await self.connect("valid", index)
        if conn is None:
            return
        reader, writer = conn
        try:
            writer.write(valid_report(number))
            await writer.drain()
        except (ConnectionError, OSError):
            self.outcomes["valid"]["reset"] += 1
            return
        got = await self.answer(reader, 60.0)
        self.outcomes["valid"][got or "no-answer"] += 1

    async def oversize(self, index: int) -> None:
        kind = "oversize-declared" if index % 2 == 0 else "oversize-chunked"
        conn = await self.connect(kind, index)
        if conn is None:
            return
        reader, writer = conn
        try:
            if kind == "oversize-declared":
                writer.write(BIG_DECLARED)
                await writer.drain()
                got = await self.answer(reader, 20.0)
                self.outcomes[kind][got or "no-answer"] += 1
                return
            writer.write(BIG_CHUNKED)
            chunk = b"%x\r\n%s\r\n" % (65536, b"\x1f" * 65536)
            sent = 0
            read = asyncio.ensure_future(reader.readline())
            try:
                while sent < 10_000_000 and not read.done():
                    writer.write(chunk)
                    sent += 65536
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(writer.drain(), 0.5)
                    await asyncio.sleep(0)
            except (ConnectionError, OSError, ssl.SSLError):
                pass  # the server hung up; its answer may still be readable
            try:
                line = await asyncio.wait_for(read, 20.0)
                got = line.split()[1].decode() if line else "closed"
            except (ConnectionError, OSError, ssl.SSLError, IndexError, TimeoutError):
                got = "reset"
            self.outcomes[kind][got] += 1
        except (ConnectionError, OSError, ssl.SSLError):
            self.outcomes[kind]["reset"] += 1

    async def run(self) -> None:
        args = self.args
        tasks = []
        index = 0
        started = time.monotonic()
        for _ in range(args.slow_body):
            i = index
            tasks.append(asyncio.ensure_future(self.slow("slow-body", i, SLOW_BODY_HEAD)))
            index += 1
            if index % args.batch == 0:
                await asyncio.sleep(0.05)
        index = ((index + args.per_source - 1) // args.per_source) * args.per_source
        for _ in range(args.slow_head):
            i = index
            tasks.append(asyncio.ensure_future(self.slow("slow-head", i, SLOW_HEAD)))
            index += 1
            if index % args.batch == 0:
                await asyncio.sleep(0.05)
        index = ((index + args.per_source - 1) // args.per_source) * args.per_source
        big = [asyncio.ensure_future(self.oversize(index + i)) for i in range(args.oversize)]
        index += ((args.oversize + args.per_source - 1) // args.per_source) * args.per_source
        big += [asyncio.ensure_future(self.valid(index + i, i)) for i in range(args.valid)]
        # ready: every connection tried (its head sent), the oversize ones answered
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tried = self.tried >= args.slow_body + args.slow_head
            if tried and all(t.done() for t in big):
                break
            await asyncio.sleep(0.05)
        ready = {"seconds": round(time.monotonic() - started, 2), "outcomes": self.snapshot()}
        print("ready", json.dumps(ready), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        final_open = self.snapshot()
        self.stop.set()
        await asyncio.gather(*tasks, *big, return_exceptions=True)
        for w in self.writers:
            w.transport.abort()
        print(json.dumps({"before_stop": final_open, "outcomes": self.snapshot()}), flush=True)

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in sorted(self.outcomes.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--name", default="reports.test")
    parser.add_argument("--slow-body", type=int, default=1500)
    parser.add_argument("--slow-head", type=int, default=500)
    parser.add_argument("--oversize", type=int, default=200)
    parser.add_argument("--valid", type=int, default=0)
    parser.add_argument("--sources", default="127.76")
    parser.add_argument("--third", type=int, default=10)
    parser.add_argument("--per-source", type=int, default=16)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.slow_body + args.slow_head + args.oversize + args.valid + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    asyncio.run(Flood(args).run())


if __name__ == "__main__":
    main()
