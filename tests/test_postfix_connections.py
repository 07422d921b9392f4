"""Connections that do not ask cannot keep Postfix out (docs/postfix.md, "Connections").

The policy (``mxguard.postfix.connections``): past ``max_connections`` a new connection is
admitted and an old one is closed in its place: one that has waited over a second without
a complete request, else the one inactive longest (waiting since its accept, idle since its
last reply); only when every connection has a request in flight is the new one refused. A
connection without a complete request is closed after ``first_request_timeout`` (bytes that
do not complete a request do not count), an idle one ``idle_timeout`` after its last reply,
one that does not take its replies after ``send_timeout``.

First the rules on the bare table (no sockets, no clock), then the real server on real
loopback sockets: a flood of 2,000 silent connections, clients sending a byte at a time,
clients holding a connection after one request, a client that never reads its replies, and a
table where every connection is busy. No test here asserts how fast anything is; the figures
are bench/connections.py's (bench/README.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxguard.config import Settings, load
from mxguard.lab.lab import Lab
from mxguard.postfix.connections import IDLE, NO_REQUEST, ConnectionTable
from mxguard.postfix.netstring import NetstringDecoder, Request, encode
from mxguard.postfix.server import PolicyServer

HOST = "127.214.0.1"  # this suite's own loopback address
FLOOD = 2000


# --- the rules, on the table alone ---------------------------------------------------------


def table(n: int = 3) -> ConnectionTable[str]:
    return ConnectionTable(max_connections=n, first_request_timeout=10, idle_timeout=60)


def test_a_full_table_evicts_a_silent_connection_first() -> None:
    t = table()
    for i, name in enumerate(["asked", "w1", "w2"]):
        assert t.admit(name, float(i)).admitted
    t.received("asked")
    t.answered("asked", 3)
    # "asked" has been idle longest, but a connection silent for over a second goes first.
    admission = t.admit("new", 4)
    assert admission.admitted and admission.evicted == "w1"
    assert t.admit("newer", 5).evicted == "w2"
    assert t.admit("newest", 6).evicted == "new"
    assert "asked" in t and len(t) == 3


def test_a_connection_just_accepted_is_not_the_first_to_go() -> None:
    # Postfix sends its request as soon as it is connected; until the server has read it,
    # its connection is waiting. Within the grace (1 s) it is evicted only after every
    # connection that has been inactive longer.
    t = table()
    for name in ["a", "b"]:
        t.admit(name, 0)
        t.received(name)
        t.answered(name, 10)  # idle since 10
    t.admit("postfix", 20)
    assert t.admit("new", 20.5).evicted == "a"  # "postfix" waited 0.5 s: idle "a" goes
    assert t.admit("newer", 20.6).evicted == "b"
    # Now only waiting connections are left: the one accepted first goes, in its grace or not.
    assert t.admit("newest", 20.7).evicted == "postfix"
    t.received("new")
    t.answered("new", 21)  # idle since 21: more recent than "newer" was accepted (20.6)
    assert t.admit("x", 21.2).evicted == "newer"


def test_without_waiting_connections_the_one_idle_longest_goes() -> None:
    t = table()
    for i, name in enumerate(["a", "b", "c"]):
        t.admit(name, float(i))
        t.received(name)
    for now, name in [(10.0, "b"), (11.0, "c"), (12.0, "a")]:
        t.answered(name, now)
    t.received("b")  # b asks again: busy, then idle since 14, the most recent
    t.answered("b", 14)
    assert t.admit("new", 15).evicted == "c"
    t.received("new")
    assert t.admit("newer", 17).evicted == "a"


def test_busy_connections_are_never_evicted_and_a_full_busy_table_refuses() -> None:
    t = table(2)
    for name in ["a", "b"]:
        t.admit(name, 0)
        t.received(name)
        t.received(name)  # two requests in flight
    assert not t.admit("new", 1).admitted
    t.answered("a", 2)
    assert not t.admit("new", 3).admitted  # one reply is still due on "a"
    t.answered("a", 4)
    admission = t.admit("new", 5)
    assert admission.admitted and admission.evicted == "a"
    assert (t.busy, t.waiting, t.idle) == (1, 1, 0)


def test_deadlines_first_request_and_idle() -> None:
    t = table(10)
    t.admit("silent", 0)
    t.admit("asked", 1)
    t.received("asked")
    assert t.next_deadline() == 10  # only "silent" can expire: "asked" is busy
    t.answered("asked", 3)
    assert t.expired(9.9) == []
    assert t.expired(10) == [("silent", NO_REQUEST)]
    assert t.next_deadline() == 63
    assert t.expired(62.9) == []
    assert t.expired(63) == [("asked", IDLE)]
    assert len(t) == 0 and t.next_deadline() is None


def test_a_busy_connection_has_no_deadline_and_a_new_request_restarts_idleness() -> None:
    t = table(10)
    t.admit("c", 0)
    t.received("c")
    assert t.expired(1000) == []
    t.answered("c", 1000)
    t.received("c")
    t.answered("c", 1055)
    assert t.expired(1114) == []
    assert t.expired(1115) == [("c", IDLE)]


def test_events_for_a_connection_the_table_gave_up_are_ignored() -> None:
    t = table(1)
    t.admit("old", 0)
    assert t.admit("new", 1).evicted == "old"
    # The old connection's handler is still finishing: it must not come back.
    t.received("old")
    t.answered("old", 3)
    t.remove("old")
    t.remove("old")
    assert list(t) == ["new"] and len(t) == 1


# --- the open-files limit -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ((1024, 3000), "1024 2304"),  # like systemd's default: the soft limit is raised
        ((1024, 1500), "732 1500"),  # the hard limit is too low: fewer places, and a warning
        ((5000, 6000), "1024 5000"),  # enough already: left as it is
    ],
    ids=["raised", "hard-limit-too-low", "enough"],
)
def test_the_open_files_limit_is_raised_to_fit_the_connections(
    limits: tuple[int, int], expected: str
) -> None:
    # In a child process: this one's limits stay as they are.
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, {limits})\n"
        "from mxguard.postfix.server import _descriptors_for\n"
        "fit = _descriptors_for(1024)\n"
        "print(fit, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < limits[1]:
        pytest.skip(f"the hard limit here is {hard}")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == expected.split()
    assert ("too low for max_connections=1024" in done.stderr) == (limits[1] == 1500)


# --- the server, on real sockets -----------------------------------------------------------


def lab_settings(lab: Lab, tmp_path: Path) -> Settings:
    return load(lab.config_file).with_overrides(store=f"sqlite:///{tmp_path / 'state.db'}")


@contextlib.contextmanager
def open_files(n: int) -> Iterator[None]:
    """At least ``n`` open files for this process (soft RLIMIT_NOFILE), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"needs {n} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Client:
    """A blocking socketmap client: one netstring request, one netstring reply."""

    def __init__(self, address: Any) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.decoder = NetstringDecoder()
        self.pending: list[str] = []

    def ask(self, key: str) -> str:
        self.sock.sendall(encode(b"postfix " + key.encode()))
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            for event in self.decoder.feed(data):
                assert isinstance(event, Request), event
                self.pending.append(event.payload.decode())
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


class PostfixClient:
    """Postfix's socketmap client (dict_sockmap.c): one connection, kept between lookups;
    when it turns out closed, the lookup is retried once on a new connection."""

    def __init__(self, address: Any) -> None:
        self.address = address
        self.client: Client | None = None
        self.reconnects = 0

    def ask(self, key: str) -> str:
        for attempt in range(2):
            if self.client is None:
                self.client = Client(self.address)
            try:
                return self.client.ask(key)
            except OSError:  # ConnectionError included: EOF, reset, broken pipe
                self.client.close()
                self.client = None
                if attempt:
                    raise
                self.reconnects += 1
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def closed_by_server(sock: socket.socket) -> bool:
    """True if the server has closed ``sock`` (EOF or reset), False if it is still open."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    finally:
        sock.setblocking(True)


def wait_until(what: str, condition: Any, limit: float = 30.0) -> None:
    """Poll ``condition()`` until it is true; fail after ``limit`` seconds (a hang, not a
    timing requirement: the limit is far above anything the server needs)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


async def _table_state(server: PolicyServer) -> tuple[int, int, int, int]:
    t = server._connections
    return len(t), t.waiting, t.busy, t.idle


def table_state(server: PolicyServer) -> tuple[int, int, int, int]:
    """(connections, waiting, busy, idle), read on the server's own loop."""
    return server.call(_table_state(server))


def metrics_lines(server: PolicyServer) -> list[str]:
    host, port = server.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        return str(r.read().decode()).splitlines()


@pytest.mark.lab
def test_two_thousand_silent_connections_and_a_real_query_is_answered(
    lab: Lab, tmp_path: Path
) -> None:
    # The issue: 1,024 silent connections filled the server and every later connection,
    # Postfix's included, was closed at once (ConnectionResetError) for up to 60 s. Now the
    # flood evicts itself. first_request_timeout is long here so that only eviction acts.
    with open_files(3 * FLOOD + 1000), PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", metrics=f"inet:{HOST}:0",
        first_request_timeout=300,
    ) as server:  # fmt: skip
        address = server.socketmap_address
        flood = [socket.create_connection(address, timeout=30) for _ in range(FLOOD)]
        try:
            client = Client(address)
            assert client.ask("dane-ee.test") == "OK dane-only"  # a resolution, not a hit
            assert client.ask("sts-enforce.test").startswith("OK secure match=mx1.sts-enforce")
            # Every connection before the query's was admitted before it (accepted in order):
            # the table is full, the oldest silent ones were closed, the newest are still open.
            cap = server.max_connections
            assert table_state(server) == (cap, cap - 1, 0, 1)
            assert server.metrics.evicted_connections == FLOOD + 1 - cap
            assert server.metrics.refused_connections == 0
            assert all(closed_by_server(s) for s in flood[: FLOOD + 1 - cap])
            assert not any(closed_by_server(s) for s in flood[FLOOD + 1 - cap :])
            lines = metrics_lines(server)
            assert f"mxguard_postfix_evicted_connections_total {FLOOD + 1 - cap}" in lines
            assert "mxguard_postfix_refused_connections_total 0" in lines
            assert f"mxguard_postfix_connections {cap}" in lines
            assert f"mxguard_postfix_connections_waiting {cap - 1}" in lines
            assert 'mxguard_postfix_connection_timeouts_total{reason="no-request"} 0' in lines
            # A second flood, faster than one connection per second and place, evicts the
            # first one's survivors and then, as the connection inactive longest, perhaps the
            # client's too. Postfix's client retries on a new connection; it is answered.
            postfix = PostfixClient(address)
            postfix.client = client
            flood += [socket.create_connection(address, timeout=30) for _ in range(FLOOD)]
            assert postfix.ask("dane-ee.test") == "OK dane-only"
            assert server.metrics.refused_connections == 0
            postfix.close()
        finally:
            for s in flood:
                s.close()


class Trickler:
    """A client that sends an incomplete request a byte at a time (every 20 ms) on a thread,
    until the server closes its connection or ``stop()``."""

    def __init__(self, address: Any) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.stopping = threading.Event()
        self.closed_by_server = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        data = b"4000:" + b"x" * 4000  # announces a request that never completes in time
        try:
            for i in range(len(data)):
                if self.stopping.is_set():
                    return
                self.sock.sendall(data[i : i + 1])
                time.sleep(0.02)
        except OSError:
            self.closed_by_server.set()  # the server closed it while it kept sending

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


@pytest.mark.lab
def test_clients_sending_a_byte_at_a_time_cannot_keep_a_real_query_out(
    lab: Lab, tmp_path: Path
) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", max_connections=4,
        first_request_timeout=300,
    ) as server:  # fmt: skip
        address = server.socketmap_address
        tricklers = [Trickler(address) for _ in range(4)]
        wait_until("4 trickling connections", lambda: table_state(server) == (4, 4, 0, 0))
        client = Client(address)
        assert client.ask("dane-ee.test") == "OK dane-only"
        client.close()
        assert server.metrics.evicted_connections == 1
        wait_until("the oldest trickler closed", tricklers[0].closed_by_server.is_set)
        for t in tricklers:
            t.stop()


@pytest.mark.lab
def test_bytes_that_complete_no_request_do_not_keep_a_connection_open(
    lab: Lab, tmp_path: Path
) -> None:
    # Under the old policy each byte renewed a per-read idle timeout, so a trickler held its
    # place for ever. Now the first-request deadline counts from the connection's start.
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", first_request_timeout=0.5,
    ) as server:  # fmt: skip
        tricklers = [Trickler(server.socketmap_address) for _ in range(3)]
        for t in tricklers:
            wait_until("closed while still sending", t.closed_by_server.is_set)
            t.stop()
        assert server.metrics.connection_timeouts[NO_REQUEST] == 3
        assert server.metrics.evicted_connections == 0


@pytest.mark.lab
def test_clients_holding_a_connection_after_one_request_cannot_keep_postfix_out(
    lab: Lab, tmp_path: Path
) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", max_connections=4,
    ) as server:  # fmt: skip
        address = server.socketmap_address
        held = [Client(address) for _ in range(4)]
        for c in held:
            assert c.ask("dane-ee.test") == "OK dane-only"
        assert table_state(server) == (4, 0, 0, 4)
        # A new client gets in; the connection idle longest (held[0]) makes room.
        client = Client(address)
        assert client.ask("nopolicy.test") == "NOTFOUND "
        assert closed_by_server(held[0].sock)
        assert held[1].ask("dane-ee.test") == "OK dane-only"
        assert server.metrics.evicted_connections == 1
        # Postfix's own client keeps its connection between lookups and, when it finds it
        # closed, retries once on a new one: while holders keep filling the table, every
        # lookup is answered, some after a reconnect.
        postfix = PostfixClient(address)
        for _ in range(10):
            assert postfix.ask("dane-ee.test") == "OK dane-only"
            for _ in range(4):
                held.append(Client(address))
                assert held[-1].ask("dane-ee.test") == "OK dane-only"
        assert postfix.reconnects >= 1
        postfix.close()
        for c in [*held, client]:
            c.close()


@pytest.mark.lab
def test_idle_connections_time_out_after_their_last_reply(lab: Lab, tmp_path: Path) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", idle_timeout=0.5,
        first_request_timeout=0.5,
    ) as server:  # fmt: skip
        address = server.socketmap_address
        asked = Client(address)
        assert asked.ask("dane-ee.test") == "OK dane-only"
        silent = socket.create_connection(address, timeout=30)
        wait_until("both closed", lambda: closed_by_server(asked.sock) and closed_by_server(silent))
        assert server.metrics.connection_timeouts == {NO_REQUEST: 1, IDLE: 1, "send": 0}
        assert table_state(server) == (0, 0, 0, 0)
        asked.close()
        silent.close()
        fresh = Client(address)
        assert fresh.ask("dane-ee.test") == "OK dane-only"
        fresh.close()


@pytest.mark.lab
def test_when_every_connection_has_a_request_in_flight_a_new_one_is_refused(
    lab: Lab, tmp_path: Path
) -> None:
    # Busy connections are never evicted: their answers are due within the budget.
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", max_connections=2, budget=2.0,
    ) as server:  # fmt: skip
        address = server.socketmap_address
        busy = [socket.create_connection(address, timeout=30) for _ in range(2)]
        for sock in busy:  # the stalled policy host holds these lookups for the budget
            sock.sendall(encode(b"postfix sts-stall.test"))
        wait_until("two busy connections", lambda: table_state(server)[2] == 2)
        extra = socket.create_connection(address, timeout=30)
        wait_until("the extra connection refused", lambda: closed_by_server(extra))
        extra.close()
        assert server.metrics.refused_connections == 1
        assert server.metrics.evicted_connections == 0
        for sock in busy:
            reply = sock.recv(100)
            assert reply == encode(b"TEMP policy lookup in progress"), reply
            sock.close()


@pytest.mark.lab
def test_a_client_that_does_not_read_its_replies_is_closed(lab: Lab, tmp_path: Path) -> None:
    with PolicyServer(
        lab_settings(lab, tmp_path), listen=f"inet:{HOST}:0", send_timeout=0.5,
    ) as server:  # fmt: skip
        address = server.socketmap_address
        first = Client(address)
        assert first.ask("dane-ee.test") == "OK dane-only"  # cached from now on
        first.close()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address)
        sock.settimeout(1.0)
        burst = encode(b"postfix dane-ee.test") * 1000
        sent = 0
        with contextlib.suppress(OSError):  # blocked (timeout), then reset by the server
            for _ in range(2000):  # at most 60 MB, far more than the buffers hold
                sock.sendall(burst)
                sent += len(burst)
        wait_until("the send timeout", lambda: server.metrics.connection_timeouts["send"] == 1)
        sock.close()
        # Meanwhile and afterwards, everyone else is served.
        other = Client(address)
        assert other.ask("dane-ee.test") == "OK dane-only"
        other.close()
        assert sent > 0


# --- bench/connections.py still runs --------------------------------------------------------


def _load_bench() -> Any:
    path = Path(__file__).resolve().parent.parent / "bench" / "connections.py"
    spec = importlib.util.spec_from_file_location("bench_connections", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.lab
def test_the_connections_benchmark_runs(lab: Lab, tmp_path: Path) -> None:
    # A tiny configuration: the answers and that numbers came out, never how fast.
    bench = _load_bench()
    cfg = bench.Config(
        connections=40, queries_after=3, trickle_seconds=0.3, catch_up=0.1, settle=0.1, rounds=2
    )
    server = bench.Server(lab, tmp_path, HOST)
    results = bench.run(server, cfg, bench.MEASUREMENTS, lambda _: None)
    for kind in bench.KINDS:
        got = results["kinds"][kind]
        for phase in ("during", "after_warm", "after_cold"):
            assert got[phase]["failed"] == {} and got[phase]["answered"] > 0, (kind, phase)
            assert got[phase]["max_ms"] > 0
        assert got["opened"] == 40 and got["rss_mib"]["flood_open"] > 0
        assert got["metrics"]["refused_connections_total"] == 0
    assert [r["query"]["answered"] for r in results["repeated"]["rounds"]] == [1, 1]
    assert "| silent, 40 |" in bench.markdown(results)
    assert server.proc is None  # every server process was stopped


def test_a_request_answered_at_once_is_received_and_answered_in_one_step() -> None:
    t = table(10)
    t.admit("new", 0)
    t.answered_at_once("new", 1)  # waiting -> idle since 1
    t.admit("other", 2)
    t.received("other")
    t.answered_at_once("other", 3)  # a request is still in flight on it: nothing changes
    assert (t.waiting, t.busy, t.idle) == (0, 1, 1)
    t.answered("other", 4)
    t.answered_at_once("new", 5)  # idle again, now since 5: the most recent
    assert t.expired(64) == [("other", IDLE)]
    assert t.expired(65) == [("new", IDLE)]
    t.answered_at_once("gone", 6)  # not (or no longer) in the table: ignored
    assert len(t) == 0
