"""Benchmark: `mxguard relay` as a smarthost, messages per second accepted and delivered with
its durable queue (SQLite, WAL, synchronous=FULL), and CPU per message; next to the host's
Postfix as a plain relay into the same lab MX hosts (bench/README.md, "relay.py").

One lab (net 127.124 by default) with `--domains` MTA-STS `enforce` domains, each with one MX
host with a valid certificate. For each relay: `--connections` client processes each open one
SMTP session to the relay and send their share of `--messages` messages in it, one after
another (as an MTA handing mail to its smarthost would); then the run waits until the lab's
MX hosts hold every message. Reported:

- accepted/s: messages / (first MAIL FROM to the last 250 after DATA);
- delivered/s: messages / (first MAIL FROM to the last message received by the lab);
- CPU ms per message: the relay's own CPU time (utime+stime; for Postfix, every process of
  the instance plus what its master reaped) over the run, per message.

    .venv/bin/python bench/relay.py [--messages 2000] [--connections 4] [--domains 4]
        [--no-postfix] [--net 127.124] [--json FILE]

Needs root (the lab's ports 25, 53, 443) and Unbound; Postfix (/usr/sbin/postfix) for the
comparison (tests/postfix_harness.py runs it as a throw-away instance).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Dnssec, Domain, Host, MtaSts, Scenario

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def scenario(domains: int) -> Scenario:
    return Scenario(
        name="relay-bench",
        domains=tuple(
            Domain(f"d{i}.test", dnssec=Dnssec.UNSIGNED, mx=(f"10 mx.d{i}.test",),
                   hosts=(Host(f"mx.d{i}.test"),), mta_sts=MtaSts(mode="enforce"))
            for i in range(domains)
        ),
    )  # fmt: skip


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICKS


def client(args: tuple[str, int, int, int, int]) -> tuple[int, float]:
    """One SMTP session sending ``count`` messages; (accepted, time of the last 250)."""
    address, port, first, count, domains = args
    accepted = 0
    with smtplib.SMTP(address, port, timeout=60) as c:
        c.ehlo("bench.client.test")
        for n in range(first, first + count):
            body = f"Subject: bench-{n}\r\nFrom: <s@client.test>\r\n\r\n" + ("x" * 98 + "\r\n") * 10
            c.sendmail("s@client.test", [f"r{n}@d{n % domains}.test"], body.encode())
            accepted += 1
    return accepted, time.time()


def received(lab: Lab, domains: int) -> int:
    return sum(len(lab.receiver(f"mx.d{i}.test").messages) for i in range(domains))


def load(lab: Lab, address: str, port: int, messages: int, connections: int,
         domains: int) -> dict[str, float]:  # fmt: skip
    per = messages // connections
    jobs = [(address, port, i * per, per, domains) for i in range(connections)]
    total = per * connections
    start = time.time()
    with multiprocessing.get_context("fork").Pool(connections) as pool:
        results = pool.map(client, jobs)
    accepted_at = max(t for _, t in results)
    deadline = time.monotonic() + 600
    while received(lab, domains) < total and time.monotonic() < deadline:
        time.sleep(0.02)
    delivered_at = time.time()
    got = received(lab, domains)
    return {
        "messages": total,
        "accepted": sum(a for a, _ in results),
        "delivered": got,
        "accept_seconds": accepted_at - start,
        "deliver_seconds": delivered_at - start,
        "accepted_per_s": total / (accepted_at - start),
        "delivered_per_s": got / (delivered_at - start),
    }


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def bench_mxguard(lab: Lab, net: str, options: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mxguard-relay-bench-"))
    address = f"{net}.0.120"
    port = free_port(address)
    command = [sys.executable, "-m", "mxguard", "--config", str(lab.config_file),
               "--store", f"sqlite:///{work / 'state.db'}", "relay", "serve", "--json",
               "--listen", f"{address}:{port}"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    text = b""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("mxguard relay did not start")
        text += line
        try:
            json.loads(text)
            break
        except ValueError:
            continue
    try:
        lab.clear_records()
        before = cpu_seconds(proc.pid)
        result = load(lab, address, port, options.messages, options.connections, options.domains)
        result["cpu_ms_per_message"] = 1000 * (cpu_seconds(proc.pid) - before) / result["messages"]
        result["store"] = "SQLite file (WAL, synchronous=FULL) in " + str(work.parent)
    finally:
        proc.terminate()
        proc.wait(60)
    return result


def bench_postfix(lab: Lab, net: str, options: argparse.Namespace) -> dict[str, Any] | None:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import postfix_harness
    except ImportError:
        return None
    why = postfix_harness.skip_reason()
    if why:
        return {"skipped": why}
    postconf = ["/usr/sbin/postconf", "-d", "-h", "mail_version"]
    version = subprocess.run(postconf, capture_output=True, text=True, check=False).stdout.strip()
    address = f"{net}.0.121"
    # A plain relay with Postfix's defaults where the harness does not need its own:
    # opportunistic TLS (Debian's main.cf: `may`), connection cache on demand, no policy maps.
    extra = {"smtp_connection_cache_on_demand": "yes"}
    with postfix_harness.PostfixInstance(
        address=address, resolver=lab.resolver_address, ca_file=lab.ca_file,
        security_level="may", extra_main_cf=extra,
    ) as pf:  # fmt: skip
        lab.clear_records()
        pids = pf.pids()
        master = pf.master_pid or 0
        before = sum(cpu_seconds(p) for p in pids) + cpu_seconds(master, children=True) - \
            cpu_seconds(master)  # fmt: skip
        result = load(lab, address, postfix_harness.SUBMIT_PORT, options.messages,
                      options.connections, options.domains)  # fmt: skip
        after_pids = pf.pids()
        after = sum(cpu_seconds(p) for p in after_pids) + cpu_seconds(master, children=True) - \
            cpu_seconds(master)  # fmt: skip
        result["cpu_ms_per_message"] = 1000 * (after - before) / result["messages"]
        result["version"] = version
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--net", default="127.124")
    parser.add_argument("--no-postfix", action="store_true")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    with Lab(scenario(options.domains), net=options.net) as lab:
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "options": {k: v for k, v in vars(options).items() if k != "json"},
            "mxguard_relay": bench_mxguard(lab, options.net, options),
        }
        if not options.no_postfix:
            results["postfix"] = bench_postfix(lab, options.net, options)
    text = json.dumps(results, indent=2, default=str)
    if options.json:
        options.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
