"""Benchmark: a real query while idle or slow connections flood the Postfix policy server.

docs/postfix.md ("Connections") promises that connections which do not ask cannot keep
Postfix out. This script checks the promise with numbers: it starts the lab (the standard
scenario, on loopback) and ``mxguard serve postfix`` as a process of its own with its default
connection policy, then, for each kind of flood, opens ``--connections`` connections (2,000
by default) and meanwhile asks real queries, each on a new connection, as a Postfix smtp
process does after ``max_idle``:

- ``silent``: connections that send nothing (the issue's flood);
- ``trickle``: connections that send an incomplete request, one byte per connection per
  second, for ``--trickle-seconds``;
- ``held``: connections that ask once and then hold the connection.

Measured for each (a fresh server process each time):

- the time from ``connect()`` to the complete reply of a real query: while the flood is
  being opened (one query every 20 ms), and after it is open (a cache hit, ``dane-ee.test``,
  and a cold lookup of a new name each time, which the lab's DNS answers NXDOMAIN);
- whether any query failed (reset, closed, wrong answer), and how;
- the server's RSS (VmRSS) before the flood (after one warm-up lookup), with the flood open,
  and after the flood's connections are closed; VmHWM, the peak;
- the server's own counters from ``/metrics`` (evicted, refused, timed-out connections).

``repeated``: ``--rounds`` silent floods one after the other on one server process, RSS
after each (memory that keeps growing would show here).

Everything is bounded (at most 10,000 connections, a time limit on every loop) and stays on
127.0.0.0/8. Run by hand (needs root for the lab's ports 53/443, and Unbound)::

    .venv/bin/python bench/connections.py [--connections 2000] [--json FILE]

``--server-pythonpath DIR`` runs the server from another source tree (e.g. an older
checkout's ``src``), to compare. The figures of one run are in bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import named
from mxguard.postfix.netstring import NetstringDecoder, Request, encode

KINDS = ("silent", "trickle", "held")
MEASUREMENTS = (*KINDS, "repeated")
WARM_KEY, WARM_ANSWER = "dane-ee.test", "OK dane-only"
COLD_ANSWER = "NOTFOUND "
TIMEOUT = 30.0  # any one socket operation; the server answers far sooner or not at all
MAX_CONNECTIONS = 10_000


@dataclass
class Config:
    connections: int = 2000
    queries_after: int = 20  # warm and cold, each, once the flood is open
    during_interval: float = 0.02  # seconds between queries while the flood is opened
    trickle_seconds: float = 12.0  # past the 10 s first-request timeout
    catch_up: float = 1.0  # "during" goes on this long after the flood's last connect()
    settle: float = 2.0  # seconds after closing the flood before the last RSS reading
    rounds: int = 10  # "repeated": silent floods, one after the other, on one server process


# --- one query ----------------------------------------------------------------------------


@dataclass
class Timings:
    ms: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)  # of those: until connect() returned
    failures: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        ms = sorted(self.ms)
        out: dict[str, Any] = {"answered": len(ms), "failed": dict(self.failures)}
        if ms:
            out |= {
                "p50_ms": round(statistics.median(ms), 3),
                "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
                "max_ms": round(ms[-1], 3),
                "connect_max_ms": round(max(self.connect_ms), 3),
            }
        return out


def ask(address: tuple[str, int], key: str, expected: str, into: Timings) -> None:
    """One query on a new connection, timed from connect() to the complete reply."""
    started = time.perf_counter()
    try:
        with socket.create_connection(address, timeout=TIMEOUT) as sock:
            connected = time.perf_counter()
            sock.sendall(encode(b"postfix " + key.encode()))
            decoder = NetstringDecoder()
            while True:
                data = sock.recv(65536)
                if not data:
                    into.failures["closed before the reply"] += 1
                    return
                events = decoder.feed(data)
                if events:
                    break
        took = (time.perf_counter() - started) * 1000
        event = events[0]
        reply = event.payload.decode() if isinstance(event, Request) else repr(event)
        if reply != expected:
            into.failures[f"answer {reply!r}"] += 1
            return
        into.ms.append(took)
        into.connect_ms.append((connected - started) * 1000)
    except OSError as exc:
        into.failures[type(exc).__name__] += 1


# --- the flood ----------------------------------------------------------------------------


class Flood:
    """``n`` connections of one kind, opened on a thread (``open()``), closed by ``close()``."""

    def __init__(self, kind: str, address: tuple[str, int], n: int) -> None:
        self.kind, self.address, self.n = kind, address, n
        self.socks: list[socket.socket] = []
        self.errors: Counter[str] = Counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._open, name=f"flood-{kind}")

    def start(self) -> None:
        self.thread.start()

    def _open(self) -> None:
        try:
            for _ in range(self.n):
                try:
                    sock = socket.create_connection(self.address, timeout=TIMEOUT)
                except OSError as exc:
                    self.errors[f"connect: {type(exc).__name__}"] += 1
                    continue
                self.socks.append(sock)
                try:
                    if self.kind == "trickle":
                        sock.sendall(b"4")  # "4000:" and 4000 bytes, never completed in time
                    elif self.kind == "held":
                        sock.sendall(encode(b"postfix " + WARM_KEY.encode()))
                        sock.recv(4096)
                except OSError as exc:
                    self.errors[f"{self.kind}: {type(exc).__name__}"] += 1
        finally:
            self.done.set()

    def trickle(self, seconds: float, stop: threading.Event) -> None:
        """One more byte on each connection per second, for ``seconds``."""
        data = b"000:" + b"x" * 4000
        deadline = time.monotonic() + seconds
        for i in range(len(data)):
            started = time.monotonic()
            if started >= deadline or stop.is_set():
                return
            for sock in self.socks:
                with contextlib.suppress(OSError):  # evicted or timed out: closed
                    sock.send(data[i : i + 1])
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    def close(self) -> None:
        self.thread.join(timeout=TIMEOUT * 2)
        for sock in self.socks:
            sock.close()


# --- the server process -------------------------------------------------------------------


class Server:
    """``mxguard serve postfix`` as a process of its own, with its default policy."""

    def __init__(self, lab: Lab, workdir: Path, host: str, pythonpath: str | None = None) -> None:
        self.lab, self.workdir, self.host, self.pythonpath = lab, workdir, host, pythonpath
        self.address = (host, free_port(host))
        self.metrics_address = (host, free_port(host))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        cmd = [
            sys.executable, "-m", "mxguard", "--config", str(self.lab.config_file),
            "--store", f"sqlite:///{self.workdir / f'state-{self.runs}.db'}", "serve", "postfix",
            "--listen", f"inet:{self.address[0]}:{self.address[1]}",
            "--metrics", f"inet:{self.metrics_address[0]}:{self.metrics_address[1]}",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}:\n" + "\n".join(tail)
                )
            with contextlib.suppress(OSError), socket.create_connection(self.address, timeout=1):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not listen on {self.address} within 30 s")
            time.sleep(0.05)

    def status_kib(self, field_name: str) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1])
        return None

    def metrics(self) -> dict[str, float]:
        """The unlabelled and labelled samples of /metrics, by their full name."""
        host, port = self.metrics_address
        out: dict[str, float] = {}
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=TIMEOUT) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # only the process this object started
                self.proc.wait(timeout=5)
        self.proc = None


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- the measurement ----------------------------------------------------------------------

CONNECTION_METRICS = (
    "mxguard_postfix_connections",
    "mxguard_postfix_evicted_connections_total",
    "mxguard_postfix_refused_connections_total",
    'mxguard_postfix_connection_timeouts_total{reason="no-request"}',
    'mxguard_postfix_connection_timeouts_total{reason="idle"}',
    'mxguard_postfix_connection_timeouts_total{reason="send"}',
)


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (all
    listeners of the machine, since boot; the difference over one measurement is used)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        head, values = [
            line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
            if line.startswith("TcpExt:")
        ][:2]  # fmt: skip
        return int(values[head.index("ListenOverflows")])
    return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def measure(server: Server, kind: str, cfg: Config) -> dict[str, Any]:
    server.start()
    try:
        address = server.address
        warm_up = Timings()
        ask(address, WARM_KEY, WARM_ANSWER, warm_up)  # resolved once, a cache hit from now on
        ask(address, WARM_KEY, WARM_ANSWER, warm_up)
        time.sleep(0.5)
        rss_before = server.status_kib("VmRSS")
        flood = Flood(kind, address, cfg.connections)
        during, warm, cold = Timings(), Timings(), Timings()
        overflows = listen_overflows()
        opened = time.perf_counter()
        open_seconds = float("nan")
        flood.start()
        # During: from the first connection of the flood until catch_up seconds after the
        # last (the server is still working through the kernel's listen queue then).
        deadline = time.monotonic() + 120
        until = deadline
        while time.monotonic() < min(until, deadline):
            ask(address, WARM_KEY, WARM_ANSWER, during)
            time.sleep(cfg.during_interval)
            if until == deadline and flood.done.is_set():
                open_seconds = time.perf_counter() - opened
                until = time.monotonic() + cfg.catch_up
        flood.done.wait(timeout=max(0.0, deadline - time.monotonic()))
        rss_open = server.status_kib("VmRSS")
        stop = threading.Event()
        trickler = None
        if kind == "trickle":
            trickler = threading.Thread(target=flood.trickle, args=(cfg.trickle_seconds, stop))
            trickler.start()
        for i in range(cfg.queries_after):
            ask(address, WARM_KEY, WARM_ANSWER, warm)
            ask(address, f"cold{i}-{kind}-{server.runs}.test", COLD_ANSWER, cold)
            time.sleep(cfg.trickle_seconds / cfg.queries_after if trickler else 0.02)
        if trickler is not None:
            stop.set()
            trickler.join()
        rss_held = server.status_kib("VmRSS")
        overflowed = listen_overflows()
        counters = server.metrics()
        flood.close()
        time.sleep(cfg.settle)
        return {
            "connections": cfg.connections,
            "opened": len(flood.socks),
            "open_seconds": round(open_seconds, 2),
            "flood_errors": dict(flood.errors),
            "listen_overflows": None
            if overflows is None or overflowed is None
            else overflowed - overflows,
            "during": during.summary(),
            "after_warm": warm.summary(),
            "after_cold": cold.summary(),
            "rss_mib": {
                "before": mib(rss_before),
                "flood_open": mib(rss_open),
                "flood_held": mib(rss_held),
                "after_close": mib(server.status_kib("VmRSS")),
                "peak": mib(server.status_kib("VmHWM")),
            },
            "metrics": {
                k.replace("mxguard_postfix_", ""): counters.get(k) for k in CONNECTION_METRICS
            },
        }
    finally:
        server.stop()


def repeated(server: Server, cfg: Config) -> dict[str, Any]:
    """``rounds`` silent floods on one server process: does RSS keep growing?"""
    server.start()
    try:
        address = server.address
        warm_up = Timings()
        ask(address, WARM_KEY, WARM_ANSWER, warm_up)
        time.sleep(0.5)
        rounds: list[dict[str, Any]] = []
        before = server.status_kib("VmRSS")
        for _ in range(cfg.rounds):
            socks = []
            with contextlib.ExitStack() as stack:
                for _ in range(cfg.connections):
                    with contextlib.suppress(OSError):
                        socks.append(
                            stack.enter_context(socket.create_connection(address, timeout=30))
                        )
                query = Timings()
                ask(address, WARM_KEY, WARM_ANSWER, query)
                held = server.status_kib("VmRSS")
            time.sleep(1.0)
            rounds.append(
                {
                    "opened": len(socks),
                    "query": query.summary(),
                    "rss_mib_held": mib(held),
                    "rss_mib_after": mib(server.status_kib("VmRSS")),
                }
            )
        return {"connections": cfg.connections, "rss_mib_before": mib(before), "rounds": rounds}
    finally:
        server.stop()


def run(
    server: Server, cfg: Config, kinds: Sequence[str], progress: Callable[[str], None]
) -> dict[str, Any]:
    results: dict[str, Any] = {"config": cfg.__dict__, "kinds": {}}
    for kind in kinds:
        if kind in KINDS:
            progress(f"{kind}: {cfg.connections} connections")
            results["kinds"][kind] = measure(server, kind, cfg)
    if "repeated" in kinds:
        progress(f"repeated: {cfg.rounds} silent floods of {cfg.connections} connections")
        results["repeated"] = repeated(server, cfg)
    return results


def count(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "| flood | queries during the flood: answered / failed, p50 / max ms "
        "| after, cache hit: p50 / max ms | after, cold lookup: p50 / max ms "
        "| RSS MiB: before → flood open → after close (peak) | evicted / refused / timed out |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in results["kinds"].items():

        def cell(s: dict[str, Any], with_counts: bool = False) -> str:
            failed = sum(s["failed"].values())
            times = f"{s.get('p50_ms', '–')} / {s.get('max_ms', '–')}"
            why = f" ({', '.join(f'{k} ×{v}' for k, v in s['failed'].items())})" if failed else ""
            return f"{s['answered']} / {failed}, {times}{why}" if with_counts else f"{times}{why}"

        rss = r["rss_mib"]
        m = r["metrics"]
        timed_out = sum(v or 0 for k, v in m.items() if k.startswith("connection_timeouts_total"))
        rows.append(
            f"| {kind}, {r['connections']} | {cell(r['during'], True)} | {cell(r['after_warm'])} "
            f"| {cell(r['after_cold'])} | {rss['before']} → {rss['flood_open']} → "
            f"{rss['after_close']} ({rss['peak']}) | {count(m['evicted_connections_total'])} / "
            f"{count(m['refused_connections_total'])} / {count(timed_out)} |"
        )
    out = "\n".join(rows) + "\n"
    rep = results.get("repeated")
    if rep:
        held = ", ".join(str(r["rss_mib_held"]) for r in rep["rounds"])
        after = ", ".join(str(r["rss_mib_after"]) for r in rep["rounds"])
        worst = max(r["query"].get("max_ms", float("nan")) for r in rep["rounds"])
        failed = sum(sum(r["query"]["failed"].values()) for r in rep["rounds"])
        out += (
            f"\nRepeated: {len(rep['rounds'])} silent floods of {rep['connections']} on one "
            f"process; RSS MiB before {rep['rss_mib_before']}; with each flood held: {held}; "
            f"after each: {after}. A query right behind each flood's last connect(): "
            f"slowest {worst} ms, {failed} failed.\n"
        )
    return out


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


@contextlib.contextmanager
def open_files(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        raise SystemExit(f"needs {n} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--connections", type=int, default=2000, help="per flood (default 2000)")
    p.add_argument("--only", nargs="*", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    p.add_argument("--rounds", type=int, default=10, help="repeated floods (default 10)")
    p.add_argument("--trickle-seconds", type=float, default=12.0)
    p.add_argument("--lab-net", default="127.216", help="the lab's 127.N network")
    p.add_argument("--listen", default="127.215.0.1", help="the server's loopback address")
    p.add_argument("--server-pythonpath", help="PYTHONPATH for the server process")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        p.error(f"--connections: expected 1 to {MAX_CONNECTIONS}")
    if not 0 < args.trickle_seconds <= 60:
        p.error("--trickle-seconds: expected more than 0, at most 60")
    if not ipaddress.ip_address(args.listen).is_loopback:
        p.error("--listen: expected an address in 127.0.0.0/8")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds: expected 1 to 20")
    cfg = Config(
        connections=args.connections, trickle_seconds=args.trickle_seconds, rounds=args.rounds
    )

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with (
        open_files(args.connections + 1000),
        tempfile.TemporaryDirectory(prefix="mxguard-bench-conn-") as tmp,
        Lab(named("standard"), net=args.lab_net) as lab,
    ):
        server = Server(lab, Path(tmp), args.listen, args.server_pythonpath)
        results = run(server, cfg, args.only, progress)
    results["machine"] = machine()
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    progress(f"done in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
