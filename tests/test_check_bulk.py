"""Bulk `mxguard check` over a lab where many domains share a few MX hosts (lab/bulk.py):
each MX address is probed once per run however many domains use it, never with more
connections open at once than --per-address allows, and two nodes sharing one PostgreSQL
store split a run between them, each domain checked once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import open_store
from mxguard.audit.auditor import Auditor, InputError, RunStats
from mxguard.audit.model import DomainCheck
from mxguard.config import load
from mxguard.lab.bulk import bulk_domains, bulk_scenario, write_domain_list
from mxguard.lab.lab import Lab
from test_store_conformance import postgres_database

pytest_plugins = ["servers"]

NET = "127.89"
DOMAINS, HOSTS = 240, 8


@pytest.fixture(scope="module")
def bulk_lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(bulk_scenario(DOMAINS, HOSTS), net=NET) as lab:
        yield lab


def test_each_mx_address_is_probed_once_and_never_beyond_the_per_address_limit(
    bulk_lab: Lab,
) -> None:
    settings = load(bulk_lab.config_file)
    bulk_lab.clear_records()
    stats = RunStats()

    async def run() -> tuple[list[DomainCheck | InputError], Auditor]:
        auditor = Auditor(settings, per_address=1, timeout=10)
        items = [(f"line {i}", d) for i, d in enumerate(bulk_domains(DOMAINS), 1)]
        return [r async for r in auditor.run(items, concurrency=40, stats=stats)], auditor

    results, auditor = asyncio.run(run())
    checks = [r for r in results if isinstance(r, DomainCheck)]
    assert len(checks) == DOMAINS and stats.errors == 0
    addresses = {a.address for c in checks for h in c.observations.hosts for a in h.addresses}
    seen_by_lab = sum(bulk_lab.smtp_connections().values())
    # One session per MX address (all hosts are used), plus the RCPT probes of the distinct
    # TLS-RPT mailboxes; nothing per domain.
    mailboxes = {r.uri for c in checks for r in c.observations.rua}
    assert len(addresses) == HOSTS
    assert auditor.prober.smtp_connections == seen_by_lab
    assert seen_by_lab <= HOSTS + len(mailboxes) < DOMAINS
    assert max(auditor.prober.most_open.values()) == 1
    verdicts = {c.verdict.value for c in checks}
    assert {"protected", "partial", "unprotected"} <= verdicts


def test_two_nodes_on_one_postgresql_store_check_each_domain_once(
    bulk_lab: Lab, postgres_server: Any, tmp_path: Path
) -> None:
    url = postgres_database(postgres_server)
    listing = tmp_path / "domains.txt"
    domains = bulk_domains(DOMAINS)[:60]
    write_domain_list(listing, len(domains))
    command = [
        sys.executable, "-m", "mxguard", "--config", str(bulk_lab.config_file), "--store", url,
        "check", "--file", str(listing), "--json", "--run", "pg-shared", "--concurrency", "5",
    ]  # fmt: skip
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    per_node = [len(out.splitlines()) for out, _ in outputs]
    # Each domain checked once in all (which node took how many depends on timing).
    seen = sorted(json.loads(line)["domain"] for out, _ in outputs for line in out.splitlines())
    assert seen == sorted(domains), (per_node, outputs[0][1][-500:])

    async def progress() -> tuple[int, int]:
        store = await open_store(url)
        try:
            return await store.run_progress("pg-shared")
        finally:
            await store.close()

    assert asyncio.run(progress()) == (len(domains), len(domains))


def test_distinct_probes_of_one_address_wait_for_the_per_address_limit(bulk_lab: Lab) -> None:
    settings = load(bulk_lab.config_file)
    host = "mx1.provider1.test"
    address = bulk_lab.address_of(host)
    bulk_lab.clear_records()

    async def run() -> Auditor:
        auditor = Auditor(settings, per_address=2, timeout=10)
        names = [f"name{i}.provider1.test" for i in range(10)]  # ten distinct probes
        probes = await asyncio.gather(*(auditor.prober.smtp(address, n) for n in names))
        assert all(p.connected and p.tls is not None for p in probes)
        return auditor

    auditor = asyncio.run(run())
    assert bulk_lab.smtp_connections()[host] == 10
    assert auditor.prober.most_open[address] == 2
