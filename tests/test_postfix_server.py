"""The Postfix policy server on real sockets, against the lab.

Specification rows: every request gets a defined reply and the connection keeps serving;
many connections at once share one resolution per domain; a stalled policy host delays only
its own first lookup, and only up to the budget; cache hits need no DNS; metrics count what
happened; stopping (and SIGTERM) leaves nothing running; what was served is recorded in the
store when it changed, and a store that fails never touches the answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import ServedPolicy, StoreError
from mxguard.config import Settings, load
from mxguard.lab.lab import Lab
from mxguard.postfix.answers import Options
from mxguard.postfix.netstring import NetstringDecoder, Request, encode
from mxguard.postfix.server import PolicyServer

pytestmark = pytest.mark.lab

HOST = "127.207.0.1"  # this suite's own loopback range


def lab_settings(lab: Lab, tmp_path: Path, **overrides: Any) -> Settings:
    return load(lab.config_file).with_overrides(
        store=f"sqlite:///{tmp_path / 'state.db'}", **overrides
    )


@pytest.fixture
def server(lab: Lab, tmp_path: Path) -> Iterator[PolicyServer]:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", tcp_table=f"inet:{HOST}:0",
        metrics=f"inet:{HOST}:0", budget=2.0,
    ) as s:  # fmt: skip
        yield s


class Client:
    """A blocking socketmap client, like Postfix's: netstring requests, netstring replies."""

    def __init__(self, address: Any) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.decoder = NetstringDecoder()
        self.pending: list[bytes] = []

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def replies(self, n: int) -> list[str]:
        while len(self.pending) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed after {len(self.pending)} of {n} replies")
            for event in self.decoder.feed(data):
                assert isinstance(event, Request), event
                self.pending.append(event.payload)
        out, self.pending = self.pending[:n], self.pending[n:]
        return [r.decode() for r in out]

    def ask(self, key: str) -> str:
        self.send(encode(b"postfix " + key.encode()))
        return self.replies(1)[0]

    def close(self) -> None:
        self.sock.close()


# (what is sent, what the reply starts with)
HOSTILE = [
    (b"abc,", "PERM netstring length expected digits"),
    (b":,", "PERM netstring has no length"),
    (b"3:abcX,", "PERM netstring payload is not followed by ','"),
    (b"9999:" + b"x" * 9999 + b",", "PERM request of 9999 bytes is longer than the limit"),
    (encode(b"postfix " + b"a" * 300 + b".test"), "PERM invalid key"),
    (encode(b"postfix \xff\xfe.test"), "PERM invalid key: not valid UTF-8"),
    (encode(b"postfix a..b"), "PERM invalid key: 'a..b' is not a valid domain name"),
    (encode(b"postfix [192.0.2.1]"), "NOTFOUND "),
    (encode(b"postfix [ipv6:2001:db8::1]"), "NOTFOUND "),
    (encode(b"postfix [mx1.sts-enforce.test]:587"), "NOTFOUND "),
    (encode(b"postfix .sts-enforce.test"), "NOTFOUND "),
    (encode(b"nosuchmap sts-enforce.test"), "PERM unknown map"),
    (encode(b"postfix"), "PERM request is not '<map name> <key>'"),
    (encode(b"postfix sts-enforce.test"), "OK secure match=mx1.sts-enforce.test:"),
    (encode(b"postfix dane-ee.test"), "OK dane-only"),
]


def test_every_request_gets_a_defined_reply_and_the_connection_keeps_serving(
    server: PolicyServer,
) -> None:
    client = Client(server.socketmap_address)
    # One at a time, then all of it again pipelined in a single write.
    for raw, expected in HOSTILE:
        client.send(raw)
        assert client.replies(1)[0].startswith(expected), raw[:40]
    client.send(b"".join(raw for raw, _ in HOSTILE))
    got = client.replies(len(HOSTILE))
    assert [g[: len(e)] for g, (_, e) in zip(got, HOSTILE, strict=True)] == [e for _, e in HOSTILE]
    assert client.ask("nopolicy.test") == "NOTFOUND "
    client.close()


def test_tcp_table_protocol(server: PolicyServer) -> None:
    sock = socket.create_connection(server.tcp_table_address, timeout=10)
    sock.sendall(b"get dane-ee.test\nget bad%zz\nput x y\nget sts-enforce.test\nget .x.test\n")
    data = b""
    while data.count(b"\n") < 5:
        data += sock.recv(65536)
    sock.close()
    assert data.decode().splitlines() == [
        "200 dane-only",
        "400 invalid%20key%20encoding:%20'%25'%20at%20offset%203%20is%20not%20followed%20by"
        "%20two%20hex%20digits",
        "400 only%20'get%20KEY'%20requests%20are%20supported",
        "200 secure%20match=mx1.sts-enforce.test:mx2.sts-enforce.test%20servername=hostname",
        "500 notfound",
    ]


def test_fifty_connections_share_one_resolution_and_one_fetch(server: PolicyServer) -> None:
    barrier = threading.Barrier(50)

    def one(_: int) -> str:
        client = Client(server.socketmap_address)
        barrier.wait()
        try:
            return client.ask("sts-enforce.test")
        finally:
            client.close()

    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(one, range(50)))
    assert set(got) == {
        "OK secure match=mx1.sts-enforce.test:mx2.sts-enforce.test servername=hostname"
    }
    assert server.engine.sts.fetches == 1
    assert server.metrics.resolutions == 1


def test_cache_hits_answer_without_dns_queries(server: PolicyServer) -> None:
    client = Client(server.socketmap_address)
    assert client.ask("dane-ee.test") == "OK dane-only"
    queries = server.engine.dns.queries
    for _ in range(200):
        assert client.ask("dane-ee.test") == "OK dane-only"
    client.close()
    # Speed is bench/'s business; here: no DNS query and no resolution for a hit.
    assert server.engine.dns.queries == queries
    assert server.metrics.cache_hits >= 200


def test_a_hit_keeps_its_place_behind_a_lookup_and_when_split_over_reads(
    server: PolicyServer,
) -> None:
    # A read that is one whole cached request is answered on the spot, unless something
    # is in flight before it or the decoder holds part of a request: then it waits its turn.
    client = Client(server.socketmap_address)
    assert client.ask("dane-ee.test") == "OK dane-only"  # cached from now on
    # A miss whose policy host stalls (answered when the lab's 3 s fetch timeout ends),
    # then, in a read of its own while that lookup is in flight, a hit.
    client.send(encode(b"postfix sts-stall.test"))
    time.sleep(0.1)
    client.send(encode(b"postfix dane-ee.test"))
    miss, hit = client.replies(2)
    assert miss != "OK dane-only"
    assert hit == "OK dane-only"
    raw = encode(b"postfix dane-ee.test")
    client.send(raw[:5])
    time.sleep(0.05)  # the first part is read on its own
    client.send(raw[5:])
    assert client.replies(1) == ["OK dane-only"]
    client.close()
    assert server.metrics.cache_hits == 2


def test_stop_leaves_no_policy_fetch_running(lab: Lab, tmp_path: Path) -> None:
    # A lookup of a domain whose policy host stalls is in flight when the server stops: its
    # resolution is cancelled after the grace, and so is the fetch it started (which is
    # shared, and was left running until the event loop ended).
    server = PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", budget=5.0, grace=0.2
    )
    server.start_in_thread()
    client = Client(server.socketmap_address)
    client.send(encode(b"postfix sts-stall.test"))
    sts = server.engine.sts
    deadline = time.monotonic() + 5
    while not sts._inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    (fetch,) = sts._inflight.values()
    server.stop_in_thread()
    client.close()
    assert fetch.cancelled()
    assert not sts._inflight


def test_a_stalled_policy_host_delays_only_its_own_first_lookup(lab: Lab, tmp_path: Path) -> None:
    settings = lab_settings(lab, tmp_path, fetch_timeout=1.5)
    with PolicyServer(settings, listen=f"inet:{HOST}:0", budget=0.5) as server:
        stalled, other = Client(server.socketmap_address), Client(server.socketmap_address)
        timings: dict[str, tuple[float, str]] = {}

        def timed(name: str, client: Client, key: str) -> None:
            started = time.perf_counter()
            reply = client.ask(key)
            timings[name] = (time.perf_counter() - started, reply)

        t = threading.Thread(target=timed, args=("stalled", stalled, "sts-stall.test"))
        t.start()
        time.sleep(0.05)
        timed("other", other, "nopolicy.test")
        t.join()
        took, reply = timings["stalled"]
        assert reply == "TEMP policy lookup in progress"
        # Answered at the budget (0.5 s), not after the fetch timeout (1.5 s): generous
        # bounds, for a loaded machine; the order of events is what is tested.
        assert 0.4 < took < 1.45
        other_took, other_reply = timings["other"]
        assert other_reply == "NOTFOUND " and other_took < took  # not queued behind the stall
        # The resolution went on in the background; Postfix's retry is a cache hit.
        deadline = time.monotonic() + 5
        while server.call(_cached(server, "sts-stall.test")) is None:
            assert time.monotonic() < deadline, "the background resolution never finished"
            time.sleep(0.1)
        hits = server.metrics.cache_hits
        assert stalled.ask("sts-stall.test") == "NOTFOUND "
        assert server.metrics.cache_hits == hits + 1
        assert server.metrics.budget_expired == 1
        assert server.metrics.failures.get("sts-policy-fetch-error") == 1
        stalled.close()
        other.close()


async def _cached(server: PolicyServer, domain: str) -> Any:
    return server.cached(domain)


def test_the_refresher_keeps_hot_domains_in_the_cache(lab: Lab, tmp_path: Path) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", answer_ttl=1.0,
        refresh_interval=0.1,
    ) as server:  # fmt: skip
        client = Client(server.socketmap_address)
        assert client.ask("dane-ee.test") == "OK dane-only"
        for _ in range(12):  # 2.4 s: more than two answer lifetimes
            time.sleep(0.2)
            assert client.ask("dane-ee.test") == "OK dane-only"
        client.close()
        assert server.metrics.cache_misses == 1
        assert server.metrics.refreshes >= 2


def test_metrics_and_health(server: PolicyServer) -> None:
    client = Client(server.socketmap_address)
    client.ask("dane-ee.test")
    client.ask("dane-ee.test")
    client.ask("dane-bogus.test")
    client.send(b"xx,")
    client.replies(1)
    client.close()
    host, port = server.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read() == b"ok\n"
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in [
        'mxguard_postfix_answers_total{kind="dane-only"} 2',
        'mxguard_postfix_answers_total{kind="temp"} 1',
        'mxguard_postfix_answers_total{kind="perm"} 1',
        "mxguard_postfix_cache_hits_total 1",
        "mxguard_postfix_cache_misses_total 2",
        "mxguard_postfix_malformed_requests_total 1",
        'mxguard_policy_failures_total{result_type="dnssec-invalid"} 1',
        'mxguard_postfix_lookup_seconds_bucket{le="+Inf"} 4',
        "mxguard_postfix_lookup_seconds_count 4",
    ]:
        assert line in text.splitlines(), line


def test_stop_answers_what_was_received_and_leaves_nothing_running(
    lab: Lab, tmp_path: Path
) -> None:
    path = tmp_path / "policy.sock"
    server = PolicyServer(lab_settings(lab, tmp_path), listen=f"unix:{path}").start_in_thread()
    thread = server._thread
    client = Client(str(path))
    assert client.ask("dane-ee.test") == "OK dane-only"
    client.send(encode(b"postfix sts-enforce.test"))
    server.stop_in_thread()
    assert client.replies(1)[0].startswith("OK secure")
    assert client.sock.recv(10) == b""  # closed after the reply
    client.close()
    assert not path.exists()
    # Its own thread is gone (other tests' servers may still be running).
    assert thread is not None and not thread.is_alive()


def test_sigterm_exits_0_and_sighup_reloads(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "cli.sock"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mxguard", "--config", str(lab.config_file), "--store",
         f"sqlite:///{tmp_path / 'cli.db'}", "serve", "postfix", "--listen", f"unix:{path}"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = Client(str(path))
        assert client.ask("dane-ee.test") == "OK dane-only"
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert client.ask("dane-ee.test") == "OK dane-only"
        assert client.ask("nopolicy.test") == "NOTFOUND "
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_options_reach_the_answers(lab: Lab, tmp_path: Path) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0",
        options=Options(strict_testing=True, map_names=frozenset({"tls"})),
    ) as server:  # fmt: skip
        client = Client(server.socketmap_address)
        client.send(encode(b"tls sts-testing.test"))
        assert client.replies(1) == ["OK encrypt"]
        client.close()


# The connection policy (caps, eviction, deadlines) is tested in test_postfix_connections.py.


# --- what was served is recorded ---------------------------------------------------------


def served_rows(db: Path, domain: str) -> list[tuple[str, str, str]]:
    """(policy type, rua, answer) of each record of `domain` in the store, oldest first."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT policy_type, rua, answer FROM served_policies WHERE domain = ? ORDER BY at, id",
            (domain,),
        ).fetchall()


def flushed(server: PolicyServer) -> None:
    """Wait for the recorder's next write (it writes every half second)."""
    server.call(server.recorder.flush())


def test_a_resolution_is_recorded_and_a_cache_hit_is_not(
    server: PolicyServer, lab: Lab, tmp_path: Path
) -> None:
    client = Client(server.socketmap_address)
    answer = client.ask("sts-enforce.test")
    flushed(server)
    for _ in range(20):
        assert client.ask("sts-enforce.test") == answer  # cache hits
    assert client.ask("nopolicy.test") == "NOTFOUND "
    assert client.ask("dane-bogus.test").startswith("TEMP")  # Postfix makes no session: none
    flushed(server)
    client.close()
    assert served_rows(tmp_path / "state.db", "sts-enforce.test") == [
        ("sts", '["mailto:tlsrpt@sts-enforce.test"]', answer.rstrip())
    ]
    assert served_rows(tmp_path / "state.db", "nopolicy.test") == [("no-policy-found", "[]",
                                                                    "NOTFOUND")]  # fmt: skip
    assert served_rows(tmp_path / "state.db", "dane-bogus.test") == []
    now = dt.datetime.now(dt.UTC)
    record = server.call(server.engine.store.served_at("sts-enforce.test", now))
    assert record is not None and record.at < now
    assert record.policy_strings[0] == "version: STSv1" and record.mx_patterns
    hosts = ("mx1.sts-enforce.test", "mx2.sts-enforce.test")
    assert record.mx_hosts == hosts
    assert record.mx_addresses == tuple(sorted(lab.address_of(h) for h in hosts))
    assert server.metrics.served_recorded == 2


def test_an_unchanged_refresh_writes_nothing_and_a_changed_one_does(
    lab: Lab, tmp_path: Path
) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", answer_ttl=0.4,
        refresh_interval=0.05,
    ) as server:  # fmt: skip
        client = Client(server.socketmap_address)
        assert client.ask("dane-ee.test") == "OK dane-only"
        for _ in range(8):  # 1.6 s: four answer lifetimes, each refreshed
            time.sleep(0.2)
            client.ask("dane-ee.test")
        refreshes = server.metrics.refreshes
        flushed(server)
        assert refreshes >= 3
        assert len(served_rows(tmp_path / "state.db", "dane-ee.test")) == 1
        # The domain's TLS-RPT record changes; the next refresh sees it (DNS cache emptied).
        d = lab.scenario.domain("dane-ee.test")
        lab.update_domain(
            dataclasses.replace(d, tlsrpt=("v=TLSRPTv1; rua=mailto:changed@dane-ee.test",))
        )
        server.call(_clear_dns_cache(server))
        deadline = time.monotonic() + 5
        while len(served_rows(tmp_path / "state.db", "dane-ee.test")) < 2:
            assert time.monotonic() < deadline, "the changed policy was never recorded"
            client.ask("dane-ee.test")
            time.sleep(0.1)
        client.close()
        assert [rua for _, rua, _ in served_rows(tmp_path / "state.db", "dane-ee.test")] == [
            '["mailto:tlsrpt@dane-ee.test"]',
            '["mailto:changed@dane-ee.test"]',
        ]


async def _clear_dns_cache(server: PolicyServer) -> None:
    if server.engine.dns.cache is not None:
        server.engine.dns.cache.clear()


def test_a_record_survives_a_restart_and_is_not_written_again_unchanged(
    lab: Lab, tmp_path: Path
) -> None:
    for _ in range(2):
        with PolicyServer(lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0") as server:
            client = Client(server.socketmap_address)
            assert client.ask("dane-ee.test") == "OK dane-only"
            client.close()
        # stop() wrote what was queued before closing the store.
    assert served_rows(tmp_path / "state.db", "dane-ee.test") == [
        ("tlsa", '["mailto:tlsrpt@dane-ee.test"]', "OK dane-only")
    ]
    assert server.metrics.served_recorded == 0  # the second server found it already recorded


class StalledStore:
    """Stands in for a store that hangs (add_served) or refuses (served_at)."""

    async def served_at(self, domain: str, at: dt.datetime) -> ServedPolicy | None:
        raise StoreError("the store is down")

    async def add_served(self, records: list[ServedPolicy]) -> None:
        await asyncio.sleep(3600)

    async def prune_served(self, before: dt.datetime) -> int:
        await asyncio.sleep(3600)
        return 0


def test_a_failing_store_never_delays_or_changes_an_answer_and_failures_are_counted(
    lab: Lab, tmp_path: Path
) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", metrics=f"inet:{HOST}:0"
    ) as server:
        server.recorder.timeout = 0.3
        server.recorder._store = StalledStore  # type: ignore[assignment]
        client = Client(server.socketmap_address)
        assert client.ask("dane-ee.test") == "OK dane-only"  # refused by served_at
        flushed(server)
        assert client.ask("sts-enforce.test").startswith("OK secure match=")
        server.recorder._known.clear()  # no comparison with the store: add_served hangs
        assert client.ask("nopolicy.test") == "NOTFOUND "
        flushed(server)  # the stalled write gives up after the recorder's timeout
        assert client.ask("dane-ee.test") == "OK dane-only"
        client.close()
        host, port = server.metrics_address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode().splitlines()
    failures = next(ln for ln in text if ln.startswith("mxguard_postfix_served_record_failures"))
    assert int(failures.split()[1]) >= 2
    assert "mxguard_postfix_served_recorded_total 0" in text


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /healthz HTTP/1.0\n\n", b"200"),  # bare line feeds (RFC 9112 §2.2)
        (b"GET /metrics?name=x HTTP/1.1\r\nHost: a\r\n\r\n", b"200"),  # a query is ignored
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    ],
    ids=["bare-lf", "query", "huge-header", "post"],
)
def test_metrics_listener_answers_odd_requests(
    server: PolicyServer, request_bytes: bytes, status: bytes
) -> None:
    assert server.metrics_listen is not None
    host, port = server.metrics_address
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request_bytes)
        reply = sock.recv(200)
    assert reply.split(b" ")[1] == status, reply
