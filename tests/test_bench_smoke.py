"""The Postfix policy benchmark (bench/postfix_policy.py) still runs: a tiny configuration.

This guards the benchmark code against rot, not the numbers: it asserts that every
measurement ran against a real server process, got the answers the lab's policies call for,
and produced numbers. It never asserts timings (those belong in bench/README.md, measured on
one machine in one run).
"""

from __future__ import annotations

import importlib.util
import math
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mxguard.lab.bulk import bulk_scenario
from mxguard.lab.lab import Lab

pytestmark = pytest.mark.lab

BENCH = Path(__file__).resolve().parent.parent / "bench" / "postfix_policy.py"
HOST = "127.211.1.1"  # this suite's own loopback address for the servers under test


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_postfix_policy", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load()

TINY = bench.Config(
    domains=3, warm_domains=3, warm_lookups=60, warm_seconds=1.0, connections=(1, 4),
    cold_connections=2, herd=6, fail_lookups=8, fail_seconds=0.4, fail_connections=2,
    stall_others=2, fetch_timeout=0.5, cold_seconds=20.0, paced_rate=200.0,
    paced_connections=2,
)  # fmt: skip


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def bench_lab(lab: Lab) -> Iterator[Lab]:
    """The session lab switched to the benchmark's scenario (conftest puts it back)."""
    lab.apply(bench.scenario(TINY.domains, TINY.stall_others))
    yield lab


def numbers(summary: dict[str, Any]) -> list[float]:
    return [summary["per_second"], summary["p50_ms"], summary["p99_ms"], summary["max_ms"]]


def test_every_measurement_runs_against_mxguard_and_yields_numbers(
    bench_lab: Lab, tmp_path: Path
) -> None:
    server = bench.Mxguard(bench_lab, tmp_path, (HOST, free_port(HOST)), TINY.fetch_timeout)
    results = bench.run(bench_lab, [server], TINY)
    got = results["servers"]["mxguard"]
    assert got["version"]
    for n in TINY.connections:
        warm = got["warm"][f"c{n}"]
        assert warm["lookups"] > 0 and warm["replies"] == {bench.EXPECTED: warm["lookups"]}
        assert all(math.isfinite(x) and x > 0 for x in numbers(warm))
    # Paced at 200/s, the 60 lookups take about 0.3 s; as fast as replies come, a few ms.
    paced = got["warm"]["paced"]
    assert paced["lookups"] == TINY.warm_lookups
    assert paced["replies"] == {bench.EXPECTED: paced["lookups"]}
    assert 0.2 < paced["seconds"] < 1.0 and paced["per_second"] < 300
    assert got["warm"]["rss_kib"] > 0
    assert got["cold"]["replies"] == {bench.EXPECTED: TINY.domains}
    assert got["cold"]["fetches"] == TINY.domains
    assert got["herd"]["replies"] == {bench.EXPECTED: TINY.herd}
    assert got["herd"]["fetches"] >= 1
    assert got["failing"]["replies"] == {"NOTFOUND": TINY.fail_lookups}
    assert got["failing"]["fetches"] >= 1
    stalled = got["stalled"]
    assert stalled["others"]["replies"] == {bench.EXPECTED: TINY.stall_others}
    assert stalled["fetches"] >= 1 and stalled["first_ms"] > 0 and stalled["retry_ms"] > 0
    table = bench.markdown(results)
    assert "| warm lookups/s, 4 connection(s) (higher is better) |" in table
    assert server.proc is None  # every fresh process was stopped


def test_the_competitor_runs_against_the_same_lab(bench_lab: Lab, tmp_path: Path) -> None:
    why = bench.Competitor.available()
    if why:
        pytest.skip(why)
    server = bench.Competitor(bench_lab, tmp_path, (HOST, free_port(HOST)), TINY.fetch_timeout)
    results = bench.run(bench_lab, [server], TINY, only=["warm", "herd"])
    got = results["servers"][server.name]
    assert got["version"]
    # Its DNS went through the lab's resolver and its fetch trusted the lab CA: it answers
    # with the lab domain's enforce policy.
    assert got["warm"]["c1"]["replies"] == {bench.EXPECTED: got["warm"]["c1"]["lookups"]}
    assert got["herd"]["replies"] == {bench.EXPECTED: TINY.herd}
    assert got["herd"]["fetches"] >= 1
    assert all(math.isfinite(x) and x > 0 for x in numbers(got["warm"]["c4"]))


# --- bench/check_bulk.py: the bulk audit, tiny ----------------------------------------------

BULK_BENCH = BENCH.parent / "check_bulk.py"


def _load_bulk() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_check_bulk", BULK_BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_bulk_audit_benchmark_runs_mxguard_and_checkdmarc(lab: Lab, tmp_path: Path) -> None:
    bulk = _load_bulk()
    lab.apply(bulk_scenario(12, 3))  # conftest's `lab` puts the standard scenario back
    cfg = bulk.Config(domains=12, hosts=3, concurrency=(4,), history_concurrency=4,
                      run_seconds=60.0)  # fmt: skip
    results = bulk.run(lab, tmp_path, cfg)
    runs = results["mxguard"] + results["history"]
    assert [r["history"] for r in results["history"]] == ["none", "sqlite, new", "sqlite, again"]
    for r in runs:
        # A real mxguard process audited every domain once, with numbers and no problem.
        assert r["problems"] == [], r
        assert r["output"]["domains"] == 12 and sum(r["output"]["verdicts"].values()) == 12
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["lab"]["smtp_connections"] == r["mxguard_smtp_connections"] > 0
        assert r["lab"]["most_open_to_one_address"] <= 2  # the --per-address default
    assert results["history"][2]["store_mib"] > 0
    table = bulk.markdown(results)
    assert "| concurrency 4, --no-history |" in table and "Goal ≥ 1000" in table
    comp = results["competitor"]
    why = bulk.Checkdmarc.available(lab)
    if why:
        assert comp == {"skipped": why}
        return
    # checkdmarc saw the lab: every domain, its MTA-STS policies (fetched through the private
    # resolv.conf and the lab CA) and, with --check-mx-tls, STARTTLS on every MX host.
    default, tls = comp["runs"]
    for r in (default, tls):
        assert r["problems"] == [], r
        assert r["output"]["domains"] == 12
        assert r["output"]["mta_sts_policies"] == results["lab"]["mta_sts_domains"]
        assert r["lab"]["policy_fetches"] == results["lab"]["mta_sts_domains"]
    assert default["lab"]["smtp_connections"] == 0
    assert tls["output"]["starttls_hosts"] == 3
    assert "ratio to checkdmarc default" in table


def _floor() -> Any:
    path = Path(__file__).resolve().parent.parent / "bench" / "floor.py"
    spec = importlib.util.spec_from_file_location("bench_floor", path)
    assert spec is not None and spec.loader is not None
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    return floor


@pytest.mark.parametrize("design", ["asyncio", "epoll", "threads"])
def test_the_floor_benchmark_runs_each_design_and_yields_numbers(design: str) -> None:
    got = _floor().measure(0.3, host=HOST, port=free_port(HOST), design=design)
    assert got["lookups"] > 10
    assert got["server_cpu_us_per_lookup"] == pytest.approx(
        got["server_user_us_per_lookup"] + got["server_system_us_per_lookup"], abs=0.2
    )


def test_the_floor_benchmark_drives_several_connections_from_load_workers() -> None:
    got = _floor().measure(0.5, host=HOST, port=free_port(HOST), connections=2)
    assert got["connections"] == 2 and got["lookups"] > 10
    assert got["server_cpu_us_per_lookup"] > 0


def test_rounds_report_the_median_of_each_figure() -> None:
    rounds = [
        {"seconds": 3.0, "replies": {"OK": 5}, "c1": {"p99_ms": 9.0}},
        {"seconds": 1.0, "replies": {"OK": 5}, "c1": {"p99_ms": 1.0}},
        {"seconds": 2.0, "replies": {"OK": 4}, "c1": {"p99_ms": 4.0}},
    ]
    got = bench._median_of(rounds)
    assert got["seconds"] == 2.0 and got["c1"]["p99_ms"] == 4.0
    assert got["replies"] == {"OK": 5}  # counts are numbers too: their median


def test_a_measurement_runs_in_rounds(bench_lab: Lab, tmp_path: Path) -> None:
    server = bench.Mxguard(bench_lab, tmp_path, (HOST, free_port(HOST)), TINY.fetch_timeout)
    results = bench.run(bench_lab, [server], TINY, only=["cold"], rounds=2)
    assert results["rounds"] == 2
    cold = results["servers"]["mxguard"]["cold"]
    assert cold["replies"] == {bench.EXPECTED: TINY.domains}
    assert cold["fetches"] == TINY.domains  # each round's fresh server fetched each once
