"""Benchmark: a bulk audit, ``mxguard check --file``, of thousands of lab domains on a few MX hosts.

The issue's acceptance: a bulk audit of at least 2,000 lab domains sharing 40 MX hosts,
domains per minute on this machine and how many SMTP connections it made; the goal is at least
1,000 domains per minute. This script starts one bulk lab (``mxguard.lab.bulk``: 2,000
customer domains whose MX records point at 40 hosts of 4 providers, by default) and runs

    mxguard --config LAB --store sqlite:///TMP/state.db check --file DOMAINS --json
            --output TMP/out.jsonl --concurrency N

as a process of its own, as a user would (process start, imports and the store included),
for each ``--concurrency`` value. Per run it reports:

- wall seconds from ``Popen`` to the exit of the process, and domains per minute;
- CPU seconds of the mxguard process (``os.wait4``: the rusage of that one child), per domain,
  and its peak RSS (``VmHWM``, sampled; see ``measure_child``);
- the SMTP connections the lab's MX hosts accepted (``lab.smtp_connections()``, cleared
  before the run) against the count on mxguard's own stats line;
- the most connections open at once to one MX address, sampled at the lab every millisecond
  (``SmtpReceiver.open_connections``; each lab MX host has one address). mxguard keeps this
  figure (``Prober.most_open``) but prints it nowhere, so the lab's sample is what there is;
  a sample can miss a peak shorter than a millisecond;
- the verdict counts, per-domain check time (p50/p99, from each result's ``elapsed``), and
  sanity checks: every domain in the output exactly once, no ``error`` line, exit status 0
  or 1 (1: some domain is not protected, which the lab arranges);
- what the lab spent meanwhile: CPU of this process (the lab's DNS, SMTP and HTTPS peers
  run in a thread here) and of its Unbound, since both share the machine with mxguard.

History: the same audit with ``--no-history``, with a new SQLite store, and once more on the
store the first run filled (every domain then has a previous check to compare with).

The honest comparison: ``checkdmarc`` (PyPI; what a domain owner would pick instead: MX,
MTA-STS, TLS-RPT, and STARTTLS on each MX host with ``--check-mx-tls``) against the same
lab domains, in its default configuration and with ``--check-mx-tls``. It is installed,
pinned, into ``bench/.venv-checkdmarc`` (ignored by git through a ``.gitignore`` of its own).
Its DNS goes to the lab's resolver through its ``--nameserver`` option; its MTA-STS policy
fetch (requests) and its SMTP test (smtplib) resolve names through the system resolver, so it
runs in a private mount namespace (``unshare -m``) whose bind-mounted ``/etc/resolv.conf``
names the lab's Unbound, and it trusts the lab CA through ``REQUESTS_CA_BUNDLE`` and
``SSL_CERT_FILE`` (the system CAs plus the lab CA). No system file is changed.

Everything stays on 127.0.0.0/8: while this script runs, the lab's Unbound answers REFUSED
for every name outside the lab TLD (``unbound-control local_zone . refuse``, the TLD
``transparent``), so that no tool's query can make it ask the real root servers. Every run
has a time limit; the resolver's cache is flushed before each.

Needs root (the lab's ports 53, 25 and 443; the competitor's mount namespace) and Unbound::

    .venv/bin/python bench/check_bulk.py [--domains 2000] [--hosts 40] [--json FILE]

The figures of one run are in bench/README.md ("Bulk audit: ``mxguard check``").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mxguard.lab.bulk import bulk_scenario, write_domain_list
from mxguard.lab.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
CHECKDMARC_VENV = ROOT / "bench" / ".venv-checkdmarc"
CHECKDMARC_VERSION = "6.0.4"
GOAL_PER_MINUTE = 1000
SAMPLE_INTERVAL = 0.001  # seconds between samples of the lab's open SMTP connections
STATS_LINE = re.compile(
    r"checked (?P<checked>\d+) domains in (?P<seconds>[\d.]+) s \((?P<per_minute>\d+) per "
    r"minute\): (?P<verdicts>.*?); (?P<skipped>\d+) skipped, (?P<errors>\d+) errors; "
    r"(?P<smtp>\d+) SMTP connections"
)


@dataclass(frozen=True)
class Config:
    domains: int = 2000
    hosts: int = 40
    concurrency: tuple[int, ...] = (10, 50, 100)
    history_concurrency: int = 10  # mxguard's default; also the run compared with checkdmarc
    competitor: bool = True
    run_seconds: float = 900.0  # the time limit of any one run


# --- one process, measured ---------------------------------------------------------------------


@dataclass
class Child:
    """What one finished process cost: wall time, its own CPU, and its peak RSS."""

    returncode: int
    wall: float
    user: float
    system: float
    peak_rss_kib: int | None
    timed_out: bool
    children_cpu: float  # the RUSAGE_CHILDREN delta over the run: a cross-check of user+system

    @property
    def cpu(self) -> float:
        return self.user + self.system


def measure_child(
    cmd: Sequence[str], env: dict[str, str], log: Path, limit: float, cwd: Path
) -> Child:
    """Run ``cmd`` to its end (killed after ``limit`` seconds); stdout and stderr to ``log``.

    CPU: ``os.wait4`` gives the rusage of this one child, so nothing else this process reaps
    meanwhile is counted. Peak RSS: the child's ``VmHWM``, read from /proc every 20 ms while
    it runs (the last reading before it exits). Not ``ru_maxrss``: Linux records the RSS of
    the address space an ``exec`` replaces, and a child forked (or vforked) from this
    process, which holds the whole lab, would report this process's RSS.
    """
    before = _children_cpu()
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        killed, done = threading.Event(), threading.Event()
        peak: list[int] = []

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # only the process this function started

        def sample() -> None:
            while not done.is_set():
                hwm = status_kib(proc.pid, "VmHWM")
                if hwm is not None and (not peak or hwm > peak[0]):
                    peak[:] = [hwm]
                done.wait(0.02)

        timer = threading.Timer(limit, kill)
        sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
        timer.start()
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
            sampler.join(timeout=5)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Child(
        proc.returncode, wall, usage.ru_utime, usage.ru_stime, peak[0] if peak else None,
        killed.is_set(), _children_cpu() - before,
    )  # fmt: skip


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def status_kib(pid: int, name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (None once the process is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    return None


class LabWatch:
    """What the lab saw during one run: SMTP connections accepted, the most open at once per
    MX host (sampled), policy fetches, and the CPU of this process and of Unbound; and what
    the machine did meanwhile (all its CPU, steal, disk flushes), so that a run slowed down
    by someone else's load on the machine shows."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-sampler", daemon=True)
        self._started_self = 0.0
        self._started_unbound: float | None = None

    def _sample(self) -> None:
        receivers = dict(self.lab.receivers)
        while not self._stop.is_set():
            for name, receiver in receivers.items():
                n = receiver.open_connections
                if n > self.peak.get(name, 0):
                    self.peak[name] = n
            time.sleep(SAMPLE_INTERVAL)

    def __enter__(self) -> LabWatch:
        self.lab.flush_resolver()
        self.lab.clear_records()
        self._started_self = _self_cpu()
        self._started_unbound = unbound_cpu(self.lab)
        self._started_machine = machine_counters()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.self_cpu = _self_cpu() - self._started_self
        end = unbound_cpu(self.lab)
        start = self._started_unbound
        self.unbound_cpu = None if end is None or start is None else end - start
        self.smtp_connections = sum(self.lab.smtp_connections().values())
        self.fetches = sum(p.fetches for p in self.lab.policy_hosts.values())
        end_machine = machine_counters()
        self.machine = {k: end_machine[k] - self._started_machine[k] for k in end_machine}

    def machine_summary(self, child_cpu: float) -> dict[str, Any]:
        """The machine during the run; ``others_cpu_s``: CPU that neither the measured
        process, nor this one (the lab), nor Unbound used."""
        m = self.machine
        ours = child_cpu + self.self_cpu + (self.unbound_cpu or 0.0)
        flushes = int(m["disk_flushes"])
        return {
            "busy_cpu_s": round(m["busy_s"], 2),
            "others_cpu_s": round(max(0.0, m["busy_s"] - ours), 2),
            "steal_s": round(m["steal_s"], 2),
            "iowait_s": round(m["iowait_s"], 2),
            "disk_flushes": flushes,
            "disk_flush_ms_mean": round(m["disk_flush_ms"] / flushes, 2) if flushes else None,
        }

    def summary(self) -> dict[str, Any]:
        most = max(self.peak.values(), default=0)
        return {
            "smtp_connections": self.smtp_connections,
            "policy_fetches": self.fetches,
            "most_open_to_one_address": most,
            "hosts_at_most_open": sorted(h for h, n in self.peak.items() if n == most and most),
            "cpu_s": round(self.self_cpu, 2),
            "unbound_cpu_s": None if self.unbound_cpu is None else round(self.unbound_cpu, 2),
        }


def machine_counters() -> dict[str, float]:
    """Machine-wide counters from /proc: CPU seconds (busy, steal, iowait) and the flush
    requests of whole disks (what fsync costs), with the milliseconds spent on them."""
    out = dict.fromkeys(("busy_s", "steal_s", "iowait_s", "disk_flushes", "disk_flush_ms"), 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError, ValueError, IndexError):
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, iowait, irq, softirq, steal = cpu[:8]
        out["busy_s"] = (user + nice + system + irq + softirq + steal) / tick
        out["steal_s"], out["iowait_s"] = steal / tick, iowait / tick
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) >= 20 and re.fullmatch(r"(x?vd|sd)[a-z]+|nvme\d+n\d+", f[2]):
                out["disk_flushes"] += int(f[18])
                out["disk_flush_ms"] += int(f[19])
    return out


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def unbound_cpu(lab: Lab) -> float | None:
    """CPU seconds of the lab's Unbound so far (from /proc), or None."""
    pid = getattr(getattr(lab, "_unbound", None), "pid", None)  # the lab keeps it private
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def loopback_only(lab: Lab) -> Iterator[bool]:
    """While inside: the lab's Unbound refuses every name outside the lab TLD (which it would
    otherwise try to resolve from the real root servers). Put back on exit."""
    unbound = getattr(lab, "_unbound", None)  # the lab keeps it private; so does this
    if unbound is None:
        yield False
        return
    tld = lab.scenario.tld
    call: Callable[[Any], Any] = lab._call
    call(unbound.control("local_zone", ".", "refuse"))
    try:
        call(unbound.control("local_zone", f"{tld}.", "transparent"))
        yield True
    finally:
        with contextlib.suppress(Exception):
            call(unbound.control("local_zone_remove", f"{tld}."))
        call(unbound.control("local_zone_remove", "."))


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# --- mxguard --------------------------------------------------------------------------------


@dataclass
class Workload:
    lab: Lab
    workdir: Path
    domains_file: Path
    domains: list[str]
    sts_domains: int  # lab truth: customer domains publishing MTA-STS
    tlsrpt_domains: int  # ... publishing a TLS-RPT record
    limit: float
    stores: dict[str, Path] = field(default_factory=dict)
    runs: int = 0


def mxguard_run(
    w: Workload, label: str, concurrency: int, store: str | None, *, prefix: Sequence[str] = ()
) -> dict[str, Any]:
    """One ``mxguard check`` process. ``store``: a name (a new SQLite file the first time,
    the same file again after that) or None for ``--no-history``."""
    w.runs += 1
    out = w.workdir / f"mxguard-{w.runs}.jsonl"
    globals_: list[str] = ["--config", str(w.lab.config_file)]
    again = store is not None and store in w.stores
    if store is not None:
        db = w.stores.setdefault(store, w.workdir / f"state-{store}.db")
        globals_ += ["--store", f"sqlite:///{db}"]
    cmd = [
        *prefix, sys.executable, "-m", "mxguard", *globals_, "check",
        "--file", str(w.domains_file), "--json", "--output", str(out),
        "--concurrency", str(concurrency), "--no-progress",
        *(["--no-history"] if store is None else []),
    ]  # fmt: skip
    env = {**os.environ, "XDG_STATE_HOME": str(w.workdir / "xdg")}
    log = w.workdir / f"mxguard-{w.runs}.log"
    with LabWatch(w.lab) as watch:
        child = measure_child(cmd, env, log, w.limit, w.workdir)
    text = log.read_text(errors="replace")
    stats = STATS_LINE.search(text)
    result: dict[str, Any] = {
        "label": label,
        "tool": "mxguard",
        "concurrency": concurrency,
        "history": "none" if store is None else ("sqlite, again" if again else "sqlite, new"),
        "command": " ".join(cmd[len(prefix) :]),
        **_child_figures(child, len(w.domains)),
        "stats_line": stats.group(0) if stats else None,
        "mxguard_smtp_connections": int(stats.group("smtp")) if stats else None,
        "mxguard_per_minute": int(stats.group("per_minute")) if stats else None,
        "lab": watch.summary(),
        "machine": watch.machine_summary(child.cpu),
        "output": mxguard_output(out, w.domains),
    }
    if store is not None:
        db = w.stores[store]
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
        result["store_mib"] = round(size / 2**20, 1)
    result["problems"] = problems(result, child, text, ok_codes=(0, 1))
    return result


def _child_figures(child: Child, domains: int) -> dict[str, Any]:
    return {
        "returncode": child.returncode,
        "timed_out": child.timed_out,
        "wall_s": round(child.wall, 2),
        "per_minute": round(domains / child.wall * 60) if child.wall else None,
        "cpu_user_s": round(child.user, 2),
        "cpu_system_s": round(child.system, 2),
        "cpu_s": round(child.cpu, 2),
        "cpu_ms_per_domain": round(child.cpu / domains * 1000, 2) if domains else None,
        "rusage_children_delta_s": round(child.children_cpu, 2),
        "peak_rss_mib": mib(child.peak_rss_kib),
    }


def mxguard_output(path: Path, domains: Sequence[str]) -> dict[str, Any]:
    """Counts from mxguard's JSON lines, and whether each domain is there exactly once."""
    seen: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    errors: list[str] = []
    elapsed: list[float] = []
    sts = tlsrpt = 0
    starttls_hosts: set[str] = set()
    starttls_pairs = 0
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for line in lines:
        doc = json.loads(line)
        seen[doc.get("domain", "")] += 1
        if "error" in doc and "verdict" not in doc:
            errors.append(f"{doc.get('domain')}: {doc['error']}")
            continue
        verdicts[doc["verdict"]] += 1
        elapsed.append(float(doc.get("elapsed", 0.0)))
        fetch = (doc.get("mta_sts") or {}).get("fetch") or {}
        sts += bool(fetch.get("ok") and doc["mta_sts"].get("mode"))
        tlsrpt += bool(((doc.get("tlsrpt") or {}).get("record") or {}).get("records"))
        for host in doc.get("mx", []):
            if any(a["smtp"]["starttls"] and a["smtp"]["tls_version"] for a in host["addresses"]):
                starttls_hosts.add(host["host"])
                starttls_pairs += 1
    return _coverage(seen, domains) | {
        "errors": errors[:10],
        "error_lines": len(errors),
        "verdicts": dict(sorted(verdicts.items())),
        "check_p50_s": percentile(elapsed, 50),
        "check_p99_s": percentile(elapsed, 99),
        "check_max_s": max(elapsed, default=None),
        "mta_sts_policies": sts,
        "tlsrpt_records": tlsrpt,
        "starttls_hosts": len(starttls_hosts),
        "starttls_domain_hosts": starttls_pairs,
    }


def _coverage(seen: Counter[str], domains: Sequence[str]) -> dict[str, Any]:
    expected = set(domains)
    return {
        "lines": sum(seen.values()),
        "domains": len(set(seen) & expected),
        "missing": len(expected - set(seen)),
        "duplicates": sum(n - 1 for d, n in seen.items() if n > 1),
        "unexpected": len(set(seen) - expected),
    }


def problems(result: dict[str, Any], child: Child, log: str, ok_codes: Sequence[int]) -> list[str]:
    out = []
    o = result["output"]
    if child.timed_out:
        out.append(f"killed after the {result['wall_s']} s time limit")
    if child.returncode not in ok_codes:
        out.append(f"exit status {child.returncode}: " + " | ".join(log.splitlines()[-5:]))
    for key in ("missing", "duplicates", "unexpected", "error_lines"):
        if o.get(key):
            out.append(f"{o[key]} {key.replace('_', ' ')}")
    if result["tool"] == "mxguard":
        if result["stats_line"] is None:
            out.append("no stats line on standard error")
        elif result["mxguard_smtp_connections"] != result["lab"]["smtp_connections"]:
            out.append(
                f"mxguard counted {result['mxguard_smtp_connections']} SMTP connections, "
                f"the lab {result['lab']['smtp_connections']}"
            )
    return out


# --- checkdmarc -------------------------------------------------------------------------------


class Checkdmarc:
    """checkdmarc's command line, in its own venv, against the lab (see the module doc)."""

    name = "checkdmarc"

    def __init__(self, lab: Lab, workdir: Path, venv: Path = CHECKDMARC_VENV) -> None:
        self.lab, self.workdir, self.venv = lab, workdir, venv
        self.resolv_conf = workdir / "resolv.conf"
        self.resolv_conf.write_text(
            f"# the lab's resolver, for {self.name} only\nnameserver {lab.resolver_address}\n"
        )
        self.ca_bundle = workdir / "ca-bundle.pem"
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle = system.read_text() if system.exists() else ""
        self.ca_bundle.write_text(bundle + lab.ca_file.read_text())

    @staticmethod
    def available(lab: Lab, venv: Path = CHECKDMARC_VENV) -> str | None:
        """None if checkdmarc can run against ``lab`` here, else why not."""
        if not (venv / "bin" / "checkdmarc").exists():
            return f"{venv}/bin/checkdmarc is missing (bench/check_bulk.py installs it)"
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return "checkdmarc needs root and unshare(1) for its private resolv.conf"
        if (lab.ports.dns, lab.ports.smtp, lab.ports.https) != (53, 25, 443):
            return "checkdmarc only reaches a lab on the standard ports 53, 25 and 443 (root)"
        return None

    @staticmethod
    def install(venv: Path = CHECKDMARC_VENV) -> None:
        """The pinned checkdmarc in ``venv`` (created if needed; ignored by git through a
        ``.gitignore`` of its own, as bench/run's competitor venv is through the project's)."""
        python = venv / "bin" / "python"
        probe = "from importlib import metadata as m; print(m.version('checkdmarc'))"
        if python.exists():
            got = subprocess.run([python, "-c", probe], capture_output=True, text=True)
            if got.stdout.strip() == CHECKDMARC_VERSION:
                return
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("# created by bench/check_bulk.py\n*\n")
        log = venv / "pip.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [python, "-m", "pip", "install", "-q", f"checkdmarc=={CHECKDMARC_VERSION}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"installing checkdmarc {CHECKDMARC_VERSION} failed: see {log}")

    def version(self) -> str:
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c",
             "from importlib import metadata as m; print(m.version('checkdmarc'))"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def run(self, w: Workload, label: str, options: Sequence[str]) -> dict[str, Any]:
        w.runs += 1
        out = w.workdir / f"checkdmarc-{w.runs}.json"
        # The domain file first: checkdmarc's list options (-n, -o) take every word after them.
        tool = [
            str(self.venv / "bin" / "checkdmarc"), str(w.domains_file), *options,
            "-o", str(out), "-n", self.lab.resolver_address,
        ]  # fmt: skip
        script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(self.resolv_conf), *tool]
        env = {
            k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "PYTHONPATH"
        }
        env |= {"REQUESTS_CA_BUNDLE": str(self.ca_bundle), "SSL_CERT_FILE": str(self.ca_bundle)}
        log = w.workdir / f"checkdmarc-{w.runs}.log"
        with LabWatch(w.lab) as watch:
            child = measure_child(cmd, env, log, w.limit, w.workdir)
        text = log.read_text(errors="replace")
        result: dict[str, Any] = {
            "label": label,
            "tool": self.name,
            "options": list(options),
            "command": "checkdmarc " + " ".join(tool[1:]),
            **_child_figures(child, len(w.domains)),
            "lab": watch.summary(),
            "machine": watch.machine_summary(child.cpu),
            "output": checkdmarc_output(out, w.domains),
            "log_tail": text.splitlines()[-5:],
        }
        result["problems"] = problems(result, child, text, ok_codes=(0,))
        return result


def checkdmarc_output(path: Path, domains: Sequence[str]) -> dict[str, Any]:
    docs: list[dict[str, Any]] = []
    if path.exists():
        loaded = json.loads(path.read_text(encoding="utf-8"))
        docs = loaded if isinstance(loaded, list) else [loaded]
    seen: Counter[str] = Counter(d.get("domain", "") for d in docs)
    sts = sum(bool((d.get("mta_sts") or {}).get("valid")) for d in docs)
    tlsrpt = sum(bool((d.get("smtp_tls_reporting") or {}).get("valid")) for d in docs)
    hosts: set[str] = set()
    pairs = 0
    tested = 0
    for d in docs:
        for h in (d.get("mx") or {}).get("hosts", []):
            if "starttls" in h:
                tested += 1
            if h.get("starttls"):
                hosts.add(h["hostname"])
                pairs += 1
    return _coverage(seen, domains) | {
        "error_lines": 0,
        "mta_sts_policies": sts,
        "tlsrpt_records": tlsrpt,
        "starttls_tested": tested,
        "starttls_hosts": len(hosts),
        "starttls_domain_hosts": pairs,
    }


# --- the whole benchmark ------------------------------------------------------------------------


def workload(lab: Lab, workdir: Path, limit: float) -> Workload:
    """The customer domains of the lab's bulk scenario, written to a file."""
    listing = write_domain_list(workdir / "domains.txt", lab.scenario)
    customers = [d for d in lab.scenario.domains if not d.hosts]
    return Workload(
        lab, workdir, listing, [d.name for d in customers],
        sts_domains=sum(d.mta_sts is not None for d in customers),
        tlsrpt_domains=sum(bool(d.tlsrpt) for d in customers),
        limit=limit,
    )  # fmt: skip


def run(
    lab: Lab,
    workdir: Path,
    cfg: Config,
    progress: Callable[[str], None] = lambda _: None,
    py_spy: Path | None = None,
) -> dict[str, Any]:
    """Every run against ``lab``, which must run a ``bulk_scenario``."""
    w = workload(lab, workdir, cfg.run_seconds)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "lab": {
            "scenario": lab.scenario.name,
            "domains": len(w.domains),
            "mx_hosts": sum(len(d.hosts) for d in lab.scenario.domains),
            "mta_sts_domains": w.sts_domains,
            "tlsrpt_domains": w.tlsrpt_domains,
        },
        "versions": {"mxguard": metadata.version("mxguard"), "unbound": unbound_version()},
        "mxguard": [],
        "history": [],
        "competitor": {},
    }
    with loopback_only(lab) as guarded:
        results["lab"]["resolver_refuses_outside_names"] = guarded
        by_concurrency: dict[int, dict[str, Any]] = {}
        for c in cfg.concurrency:
            progress(f"mxguard check, concurrency {c}, new SQLite store")
            r = mxguard_run(w, f"concurrency {c}", c, f"c{c}")
            by_concurrency[c] = r
            results["mxguard"].append(r)
            progress(f"  {_brief(r)}")
        hc = cfg.history_concurrency
        progress(f"mxguard check, concurrency {hc}, --no-history")
        none = mxguard_run(w, "no history", hc, None)
        results["history"].append(none)
        progress(f"  {_brief(none)}")
        fresh = by_concurrency.get(hc)
        if fresh is None:
            progress(f"mxguard check, concurrency {hc}, new SQLite store")
            fresh = mxguard_run(w, f"concurrency {hc}", hc, f"c{hc}")
            progress(f"  {_brief(fresh)}")
        results["history"].append(fresh)
        progress(f"mxguard check, concurrency {hc}, the same store again")
        again = mxguard_run(w, "second run on the store", hc, f"c{hc}")
        results["history"].append(again)
        progress(f"  {_brief(again)}")
        if cfg.competitor:
            why = Checkdmarc.available(lab)
            if why:
                results["competitor"] = {"skipped": why}
                progress(f"checkdmarc skipped: {why}")
            else:
                cd = Checkdmarc(lab, workdir)
                results["versions"]["checkdmarc"] = cd.version()
                runs = []
                for label, options in (("default", []), ("--check-mx-tls", ["--check-mx-tls"])):
                    progress(f"checkdmarc, {label}")
                    runs.append(cd.run(w, label, options))
                    progress(f"  {_brief(runs[-1])}")
                results["competitor"] = {"mxguard": fresh, "runs": runs}
        if py_spy is not None:
            progress(f"mxguard check, concurrency {hc}, under py-spy (not a timing run)")
            results["profile"] = profile(w, hc, py_spy)
    return results


def _brief(r: dict[str, Any]) -> str:
    bad = f"; PROBLEMS: {r['problems']}" if r["problems"] else ""
    return (
        f"{r['wall_s']} s, {r['per_minute']}/min, CPU {r['cpu_s']} s, "
        f"{r['lab']['smtp_connections']} SMTP connections{bad}"
    )


def unbound_version() -> str | None:
    binary = shutil.which("unbound") or "/usr/sbin/unbound"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            if line.startswith("Version"):
                return line.split()[-1]
    return None


# --- profile ------------------------------------------------------------------------------------

_IDLE = ("concurrent/futures/thread.py:81", "threading.py:327", "selectors.py:468")


def profile(w: Workload, concurrency: int, py_spy: Path) -> dict[str, Any]:
    """One run under ``py-spy record`` (100 samples a second, every thread); the costliest
    functions of mxguard's event loop thread and of the whole process."""
    raw = w.workdir / "py-spy.txt"
    prefix = [str(py_spy), "record", "-r", "100", "--threads", "-f", "raw", "-o", str(raw), "--"]
    r = mxguard_run(w, "under py-spy", concurrency, "profile", prefix=prefix)
    total = 0
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()  # main thread, functions of mxguard
    leaf: Counter[str] = Counter()  # any thread, the function running
    idle = imports = failing_imports = 0
    for line in raw.read_text(errors="replace").splitlines() if raw.exists() else []:
        stack, _, n_text = line.rpartition(" ")
        if not n_text.isdigit():
            continue
        n = int(n_text)
        frames = stack.split(";")
        if len(frames) < 2 or any(mark in frames[-1] for mark in _IDLE):
            idle += n  # a thread waiting for work, or only the thread's own frame
            continue
        total += n
        thread = frames[0]
        main = "MainThread" in thread or any("_run_module_as_main" in f for f in frames[:3])
        threads["event loop (main thread)" if main else "other threads"] += n
        leaf[_function(frames[-1])] += n
        if any("_find_and_load " in f for f in frames):
            if any("current_async_library" in f for f in frames):
                failing_imports += n  # httpcore's `import sniffio`, on every request
            else:
                imports += n
        if main:
            for f in {_function(f) for f in frames if "mxguard/" in f and "<module>" not in f}:
                inclusive[f] += n
    return {
        "run": {k: r[k] for k in ("wall_s", "cpu_s", "per_minute", "problems")},
        "samples": total,
        "idle_samples_dropped": idle,
        "imports_pct": round(imports / total * 100, 1) if total else None,
        "import_sniffio_pct": round(failing_imports / total * 100, 1) if total else None,
        "threads": {k: round(v / total * 100, 1) for k, v in threads.items()} if total else {},
        "main_thread_inclusive": [
            (f, round(n / total * 100, 1)) for f, n in inclusive.most_common(15)
        ],
        "self": [(f, round(n / total * 100, 1)) for f, n in leaf.most_common(12)],
    }


def _function(frame: str) -> str:
    """``name (path/file.py:LINE)`` without the line, and the path from the package on."""
    name, _, where = frame.partition(" (")
    where = re.sub(r":\d+\)?$", "", where.rstrip(")"))
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# --- the report -----------------------------------------------------------------------------------


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


def _f(v: Any, fmt: str = "{}") -> str:
    return "–" if v is None else fmt.format(v)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def _load(r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    if not m:
        return "–"
    return f"{m['others_cpu_s']:.1f}; {m['disk_flushes']} ({_f(m['disk_flush_ms_mean'], '{:.1f}')})"


def _verdicts(v: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in v.items()) or "–"


def markdown(results: dict[str, Any]) -> str:
    lab = results["lab"]
    out = [
        f"mxguard check, {lab['domains']} domains on {lab['mx_hosts']} MX hosts "
        f"({lab['mta_sts_domains']} publish MTA-STS, {lab['tlsrpt_domains']} TLS-RPT only):",
        "",
        "| run | wall s | domains/min | CPU s (ms/domain) | peak RSS MiB "
        "| SMTP connections: lab / mxguard | most open to one address | check p50 / p99 s "
        "| lab CPU s (Unbound) | others' CPU s; disk flushes (mean ms) | verdicts | sane |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    runs = results["mxguard"] + [r for r in results["history"] if r not in results["mxguard"]]
    for r in runs:
        o, lw = r["output"], r["lab"]
        history = {"none": "--no-history", "sqlite, new": "new store"}.get(r["history"], "")
        history = history or "store of the first run"
        out.append(
            f"| concurrency {r['concurrency']}, {history} | {r['wall_s']:.1f} | "
            f"{_f(r['per_minute'])} | {r['cpu_s']:.1f} ({r['cpu_ms_per_domain']:.1f}) | "
            f"{_f(r['peak_rss_mib'])} | {lw['smtp_connections']} / "
            f"{_f(r['mxguard_smtp_connections'])} | {lw['most_open_to_one_address']} | "
            f"{_f(o['check_p50_s'], '{:.2f}')} / {_f(o['check_p99_s'], '{:.2f}')} | "
            f"{lw['cpu_s']:.1f} ({_f(lw['unbound_cpu_s'], '{:.1f}')}) | {_load(r)} | "
            f"{_verdicts(o['verdicts'])} | {'; '.join(r['problems']) or 'yes'} |"
        )
    best = max((r["per_minute"] or 0 for r in results["mxguard"]), default=0)
    worst = min((r["per_minute"] or 0 for r in runs), default=0)
    out += [
        "",
        f"Goal ≥ {GOAL_PER_MINUTE} domains/minute: "
        + ("met" if worst >= GOAL_PER_MINUTE else "NOT met")
        + f" (slowest run {worst}/min, fastest {best}/min).",
    ]
    hist = results["history"]
    if hist:
        base = hist[0]
        out += [
            "",
            f"What keeping history costs (concurrency {base['concurrency']}):",
            "",
            "| history | wall s | domains/min | CPU ms/domain | CPU vs --no-history | store MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        names = ["--no-history", "new SQLite store", "SQLite store holding the first run"]
        for name, r in zip(names, hist, strict=False):
            out.append(
                f"| {name} | {r['wall_s']:.1f} | {_f(r['per_minute'])} | "
                f"{r['cpu_ms_per_domain']:.1f} | {_ratio(r['cpu_s'], base['cpu_s'])} | "
                f"{_f(r.get('store_mib'))} |"
            )
    comp = results.get("competitor") or {}
    if comp.get("skipped"):
        out += ["", f"checkdmarc: not run ({comp['skipped']})."]
    elif comp.get("runs"):
        out += ["", *_comparison(results, comp["mxguard"], comp["runs"])]
    prof = results.get("profile")
    if prof:
        out += ["", *_profile_lines(prof)]
    return "\n".join(out) + "\n"


def _comparison(
    results: dict[str, Any], mx: dict[str, Any], runs: list[dict[str, Any]]
) -> list[str]:
    lab = results["lab"]
    names = [f"checkdmarc {r['label']}" for r in runs]
    head = (
        f"| measurement | mxguard (concurrency {mx['concurrency']}, store) | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"ratio to {n}" for n in names)
        + " |"
    )
    rows = [head, "|---|" + "---:|" * (1 + 2 * len(runs))]

    def row(label: str, get: Callable[[dict[str, Any]], Any], fmt: str = "{}") -> None:
        values = [get(mx), *(get(r) for r in runs)]
        shown = [_f(v, fmt) for v in values]
        ratios = [_ratio(values[0], v) for v in values[1:]]
        rows.append(f"| {label} | " + " | ".join(shown + ratios) + " |")

    row("wall seconds (lower is better)", lambda r: r["wall_s"], "{:.1f}")
    row("domains per minute (higher is better)", lambda r: r["per_minute"])
    row("CPU ms per domain (lower is better)", lambda r: r["cpu_ms_per_domain"], "{:.1f}")
    row("peak RSS MiB (lower is better)", lambda r: r["peak_rss_mib"])
    row("SMTP connections at the lab", lambda r: r["lab"]["smtp_connections"])
    row("MTA-STS policy fetches at the lab", lambda r: r["lab"]["policy_fetches"])
    row(
        f"domains with a valid MTA-STS policy found (lab: {lab['mta_sts_domains']})",
        lambda r: r["output"]["mta_sts_policies"],
    )
    row(
        f"domains with a TLS-RPT record found (lab: {lab['tlsrpt_domains']})",
        lambda r: r["output"]["tlsrpt_records"],
    )
    row(
        f"MX hosts found to offer working STARTTLS (lab: {lab['mx_hosts']})",
        lambda r: (
            r["output"]["starttls_hosts"]
            if r["tool"] == "mxguard" or r["output"].get("starttls_tested")
            else None
        ),
    )
    bad = [f"{r['label']}: {'; '.join(r['problems'])}" for r in runs if r["problems"]]
    if bad:
        rows += ["", "checkdmarc problems: " + " | ".join(bad)]
    return rows


def _profile_lines(prof: dict[str, Any]) -> list[str]:
    run = prof["run"]
    threads = ", ".join(f"{k} {v} %" for k, v in prof["threads"].items())
    lines = [
        f"Profile (py-spy, 100 Hz, one run at {run['per_minute']}/min, not a timing run): "
        f"{prof['samples']} busy samples: {threads}; importing modules at start-up "
        f"{prof['imports_pct']} %; httpcore's `import sniffio` (not installed: a failed "
        f"import, on every HTTPS request) {prof.get('import_sniffio_pct')} %.",
        "",
        "Event loop thread, mxguard functions (inclusive, % of busy samples):",
        "",
    ]
    lines += [f"- {pct} % `{f}`" for f, pct in prof["main_thread_inclusive"]]
    lines += ["", "Running at the sample (self, any thread):", ""]
    lines += [f"- {pct} % `{f}`" for f, pct in prof["self"]]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--domains", type=int, default=2000, help="customer domains (default 2000)")
    p.add_argument("--hosts", type=int, default=40, help="MX hosts they share (default 40)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument(
        "--history-concurrency", type=int, default=10,
        help="concurrency of the history runs and of the run compared with checkdmarc",
    )  # fmt: skip
    p.add_argument("--lab-net", default="127.87", help="the lab's 127.N network")
    p.add_argument("--without-competitor", action="store_true", help="mxguard alone")
    p.add_argument("--run-seconds", type=float, default=900.0, help="time limit of each run")
    p.add_argument("--py-spy", type=Path, metavar="BIN", help="also profile one run with py-spy")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    p.add_argument("--render", type=Path, help="only print the tables of a --json results file")
    args = p.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())), end="")
        return 0
    if not 1 <= args.domains <= 10_000:
        p.error("--domains: expected 1 to 10000")
    if not 1 <= args.hosts <= 1000:
        p.error("--hosts: expected 1 to 1000")
    if not all(1 <= c <= 1000 for c in [*args.concurrency, args.history_concurrency]):
        p.error("--concurrency: expected 1 to 1000")
    if not 1 <= args.run_seconds <= 3600:
        p.error("--run-seconds: expected 1 to 3600")
    cfg = Config(
        domains=args.domains,
        hosts=args.hosts,
        concurrency=tuple(args.concurrency),
        history_concurrency=args.history_concurrency,
        competitor=not args.without_competitor,
        run_seconds=args.run_seconds,
    )

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if cfg.competitor:
        progress(f"checkdmarc {CHECKDMARC_VERSION} in {CHECKDMARC_VENV}")
        Checkdmarc.install()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mxguard-bench-bulk-") as tmp:
        progress(f"starting the lab: {cfg.domains} domains on {cfg.hosts} MX hosts")
        with Lab(bulk_scenario(cfg.domains, cfg.hosts), net=args.lab_net) as lab:
            progress(f"lab ready after {time.perf_counter() - started:.1f} s")
            results = run(lab, Path(tmp), cfg, progress, args.py_spy)
    results["machine"] = machine()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["command"] = "bench/check_bulk.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = markdown(results)
    print(table, end="")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    progress(f"done in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
