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
import shutil
import signal
import socket
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


EXPECTED = f"OK secure match={MX_HOST} servername=hostname"  # both servers' enforce answer


# --- the load generator: an asyncio netstring client -----------------------------------------


class ProtocolError(RuntimeError):
    """The server's reply is not a netstring (or is longer than MAX_REPLY)."""


class SocketmapClient:
    """One connection, one request in flight (as Postfix's smtp processes do)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> SocketmapClient:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def ask(self, key: str, map_name: str = "postfix") -> tuple[str, float]:
        """The reply to ``map_name key`` and how long it took (seconds)."""
        payload = f"{map_name} {key}".encode()
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
    address: tuple[str, int], keys: Sequence[str], connections: int, time_limit: float
) -> Samples:
    """Look up ``keys`` (in order, shared by all connections) with ``connections`` clients."""
    samples = Samples()
    clients = [await SocketmapClient.connect(address) for _ in range(connections)]
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


# --- the servers under test ------------------------------------------------------------------


class Server:
    """A policy server as a separate process, started fresh with an empty cache file."""

    name = ""

    def __init__(self, lab: Lab, workdir: Path, address: tuple[str, int]) -> None:
        self.lab, self.workdir, self.address = lab, workdir, address
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"
        self.runs = 0

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self.runs += 1
        cache = self.workdir / f"{self.name}-cache-{self.runs}.db"
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
    name = "mxguard"

    def __init__(
        self, lab: Lab, workdir: Path, address: tuple[str, int], fetch_timeout: float
    ) -> None:
        super().__init__(lab, workdir, address)
        # The lab's client config, with the same policy fetch timeout as the competitor's.
        text = lab.config_file.read_text(encoding="utf-8")
        lines = [ln for ln in text.splitlines() if not ln.startswith("fetch_timeout")]
        at = lines.index("[local_rules]") if "[local_rules]" in lines else len(lines)
        lines.insert(at, f"fetch_timeout = {fetch_timeout}")
        self.config = workdir / "mxguard.toml"
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        host, port = self.address
        cmd = [
            sys.executable, "-m", "mxguard", "--config", str(self.config),
            "--store", f"sqlite:///{cache}", "serve", "postfix",
            "--listen", f"inet:{host}:{port}",
        ]  # fmt: skip
        return cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}

    def version(self) -> str:
        return metadata.version("mxguard")


class Competitor(Server):
    """postfix-mta-sts-resolver's ``mta-sts-daemon`` (sqlite cache, default settings)."""

    name = "postfix-mta-sts-resolver"

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        address: tuple[str, int],
        fetch_timeout: float,
        venv: Path = COMPETITOR_VENV,
    ) -> None:
        super().__init__(lab, workdir, address)
        self.venv = venv
        self.fetch_timeout = fetch_timeout
        self.resolv_conf = workdir / "resolv.conf"
        self.resolv_conf.write_text(
            f"# the lab's validating resolver, for {self.name} only\n"
            f"nameserver {lab.resolver_address}\noptions trust-ad\n"
        )
        self.ca_bundle = workdir / "ca-bundle.pem"
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle = system.read_text() if system.exists() else ""
        self.ca_bundle.write_text(bundle + lab.ca_file.read_text())

    @staticmethod
    def available(venv: Path = COMPETITOR_VENV) -> str | None:
        """None if the competitor can run here, else why not."""
        if not (venv / "bin" / "mta-sts-daemon").exists():
            return f"{venv}/bin/mta-sts-daemon is missing: run bench/run (it installs it)"
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return "the competitor needs root and unshare(1) for its private resolv.conf"
        return None

    def command(self, cache: Path) -> tuple[list[str], dict[str, str]]:
        host, port = self.address
        cfg = self.workdir / f"competitor-{self.runs}.yml"
        cfg.write_text(
            json.dumps(  # JSON is YAML
                {
                    "host": host,
                    "port": port,
                    "reuse_port": True,  # False crashes 1.5.1 at start (opts unset)
                    "cache": {"type": "sqlite", "options": {"filename": str(cache)}},
                    "default_zone": {"strict_testing": False, "timeout": self.fetch_timeout},
                },
                indent=2,
            )
        )
        if self.lab.ports.dns != 53:
            raise RuntimeError("the competitor can only reach a lab resolver on port 53 (root)")
        script = 'mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3" -v warn'
        daemon = str(self.venv / "bin" / "mta-sts-daemon")
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(self.resolv_conf), daemon, str(cfg)]
        env = {
            k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "PYTHONPATH"
        }
        return cmd, {**env, "SSL_CERT_FILE": str(self.ca_bundle), "PYTHONUNBUFFERED": "1"}

    def version(self) -> str:
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c",
             "from importlib import metadata as m; print(m.version('postfix-mta-sts-resolver'))"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip()


# --- the measurements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    domains: int = 500  # cold lookups
    warm_domains: int = 50  # the warm set cycled through
    warm_lookups: int = 20000  # per connection count, at most
    warm_seconds: float = 5.0  # per connection count, at most
    connections: tuple[int, ...] = (1, 32)
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


async def warm(server: Server, cfg: Config) -> dict[str, Any]:
    keys = [sts_domain(i) for i in range(min(cfg.warm_domains, cfg.domains))]
    primed = await lookups(server.address, keys, 8, cfg.cold_seconds)
    out: dict[str, Any] = {"prime": primed.summary()}
    for n in cfg.connections:
        cycle = [keys[i % len(keys)] for i in range(cfg.warm_lookups)]
        out[f"c{n}"] = (await lookups(server.address, cycle, n, cfg.warm_seconds)).summary()
    out["rss_kib"] = server.rss_kib()
    return out


async def cold(server: Server, cfg: Config) -> dict[str, Any]:
    keys = [sts_domain(i) for i in range(cfg.domains)]
    before = _fetches(server.lab, keys)
    s = await lookups(server.address, keys, cfg.cold_connections, cfg.cold_seconds)
    return {
        **s.summary(),
        "fetches": _fetches(server.lab, keys) - before,
        "rss_kib": server.rss_kib(),
    }


async def herd(server: Server, cfg: Config) -> dict[str, Any]:
    host = server.lab.policy_host(HERD_DOMAIN)
    before = host.fetches
    clients = [await SocketmapClient.connect(server.address) for _ in range(cfg.herd)]
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
        client = await SocketmapClient.connect(server.address)
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
    first = await SocketmapClient.connect(server.address)
    others = [await SocketmapClient.connect(server.address) for _ in range(cfg.stall_others)]
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


def run(
    lab: Lab,
    servers: Sequence[Server],
    cfg: Config,
    only: Sequence[str] = tuple(MEASUREMENTS),
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every measurement against every server (fresh process, fresh cache, flushed resolver).

    The lab must run ``scenario(cfg.domains, cfg.stall_others)``.
    """
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "servers": {}}
    for s in servers:
        results["servers"][s.name] = {"version": s.version()}
    for name in only:
        for s in servers:
            lab.flush_resolver()
            progress(f"{name}: {s.name}")
            with s.fresh():
                results["servers"][s.name][name] = asyncio.run(MEASUREMENTS[name](s, cfg))
    return results


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
    row("RSS after the warm run, MiB", ("warm", "rss_kib"), "lower")
    row(f"cold: {cfg['domains']} domains, seconds", ("cold", "seconds"), "lower", "{:.2f}")
    row("cold: lookups/s", ("cold", "per_second"), "higher")
    row("cold: p50 ms", ("cold", "p50_ms"), "lower")
    row("cold: p99 ms", ("cold", "p99_ms"), "lower")
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

    def mib(label: str, values: list[Any]) -> list[Any]:
        return [v / 1024 if ("MiB" in label and v is not None) else v for v in values]

    head = "| measurement | " + " | ".join(names) + " | ratio |\n"
    head += "|---|" + "---:|" * len(names) + "---:|\n"
    lines = []
    for (label, shown, better), (_, values) in zip(rows, raw_rows, strict=True):
        values = mib(label, values)
        if "MiB" in label:
            shown = [f"{v:.1f}" if v is not None else "–" for v in values]
        ratio = _ratio(values[0], values[1]) if len(values) == 2 else "–"
        lines.append(f"| {label} ({better} is better) | " + " | ".join(shown) + f" | {ratio} |")
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
    return head + "\n".join(lines) + "\n\nReplies:\n\n" + "\n".join(replies) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--domains", type=int, default=500, help="cold lookups (default 500)")
    p.add_argument("--warm-seconds", type=float, default=5.0)
    p.add_argument("--lab-net", default="127.221", help="the lab's 127.N network")
    p.add_argument("--listen", default="127.211.0", help="servers listen on PREFIX.1 and .2")
    p.add_argument("--only", nargs="*", choices=list(MEASUREMENTS), default=list(MEASUREMENTS))
    p.add_argument("--without-competitor", action="store_true")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--render", type=Path, help="only print the table of a --json results file")
    args = p.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    if not 1 <= args.domains <= 2000:
        p.error("--domains: expected 1 to 2000")
    cfg = Config(domains=args.domains, warm_seconds=args.warm_seconds)
    why = None if args.without_competitor else Competitor.available()
    if why:
        p.error(why)

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mxguard-bench-") as tmp:
        workdir = Path(tmp)
        progress(f"starting the lab ({cfg.domains} + {cfg.stall_others + 3} domains)")
        with Lab(scenario(cfg.domains, cfg.stall_others), net=args.lab_net) as lab:
            progress(f"lab ready after {time.perf_counter() - started:.1f} s")
            servers: list[Server] = [
                Mxguard(lab, workdir, (f"{args.listen}.1", 8461), cfg.fetch_timeout)
            ]
            if not args.without_competitor:
                servers.append(
                    Competitor(lab, workdir, (f"{args.listen}.2", 8461), cfg.fetch_timeout)
                )
            results = run(lab, servers, cfg, args.only, progress)
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
