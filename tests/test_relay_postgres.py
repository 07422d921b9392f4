"""The relay queue in a real PostgreSQL, shared by several relay nodes (lab net 127.122).

- Claims by two nodes at the same moment never overlap (`FOR UPDATE SKIP LOCKED`), and a
  recipient claimed by a node is not claimed by another until its lease runs out.
- Two relay processes on one queue deliver every message exactly once.
- A node SIGKILLed with deliveries claimed leaves them to the other node once its leases run
  out: every message it accepted is delivered.
- A queue that cannot store a message (its table gone) makes the relay answer 451 to DATA,
  so that the client keeps the message; once the table is back the next message is taken.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxguard.lab.lab import Lab
from mxguard.relay.queue import DELIVERED, Decision, NewMessage, PostgresQueue, open_queue
from relay_helpers import RelayProcess, relay_scenario, wait_for

pytest_plugins = ["servers"]
pytestmark = pytest.mark.lab

NET = "127.122"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(relay_scenario("relay-pg"), net=NET) as lab:
        yield lab


@pytest.fixture
def pg_url(postgres_server: Any) -> str:
    url: str = postgres_server.create_database()
    return url


def test_concurrent_claims_never_overlap_and_leases_hold(pg_url: str) -> None:
    async def run() -> None:
        a, b = await open_queue(pg_url), await open_queue(pg_url)
        assert isinstance(a, PostgresQueue)
        try:
            now = time.time()
            for i in range(30):
                await a.add(NewMessage("s@client.test", (f"r{i}@d{i % 3}.test",), b"x\r\n"), now)
            claims = await asyncio.gather(
                *(q.claim(node, now + 1, 60) for _ in range(20) for q, node in
                  ((a, "node-a"), (b, "node-b")))
            )  # fmt: skip
            got = [c for c in claims if c is not None]
            # A claim can find every due row locked by the other's claim at that moment.
            while (more := await a.claim("node-a", now + 1, 60)) is not None:
                got.append(more)
            ids = [(c.message_id, r) for c in got for r in c.recipients]
            assert len(ids) == len(set(ids)) == 30
            assert await a.claim("node-a", now + 1, 60) is None  # all leased
            # After the leases end, another node may take the work.
            again = await b.claim("node-b", now + 62, 60)
            assert again is not None
            await b.finish(again, [Decision(again.recipients[0], DELIVERED)], None, now + 62)
            assert len(await a.entries()) == 29
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def copies(lab: Lab, prefix: str) -> Counter[int]:
    out: Counter[int] = Counter()
    for m in lab.receiver("mx.enforce.test").messages:
        match = re.search(rf"Subject: {prefix}-(\d+)".encode(), m.data)
        if match:
            out[int(match.group(1))] += 1
    return out


def submit_many(relay: RelayProcess, prefix: str, count: int) -> set[int]:
    accepted = set()
    for n in range(count):
        data = f"Subject: {prefix}-{n}\r\n\r\nbody\r\n".encode()
        code, _ = relay.submit("a@client.test", [f"r{n}@enforce.test"], data)
        if code == 250:
            accepted.add(n)
    return accepted


def test_two_nodes_deliver_each_message_once(lab: Lab, pg_url: str, tmp_path: Path) -> None:
    lab.clear_records()
    args = ["--retry-first", "0.2s", "--lifetime", "1h"]
    a = RelayProcess(lab, pg_url, tmp_path, args=args, address="127.124.0.104", node_id="node-a")
    b = RelayProcess(lab, pg_url, tmp_path, args=args, address="127.124.0.105", node_id="node-b")
    with a, b:
        accepted = submit_many(a, "two", 15) | {100 + n for n in submit_many(b, "two1", 15)}
        assert len(accepted) == 30
        wait_for("a drained queue", lambda: a.queue()["count"] == 0)
    got = copies(lab, "two") + Counter({100 + k: v for k, v in copies(lab, "two1").items()})
    assert set(got) == accepted
    assert set(got.values()) == {1}


def held_by(url: str, node: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM relay_recipients WHERE claimed_by = %s AND state = 'queued'",
            (node,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_dead_nodes_messages_go_to_the_other(lab: Lab, pg_url: str, tmp_path: Path) -> None:
    lab.clear_records()
    # One delivery at a time on node A, so that the queue is not drained when it dies.
    args = ["--retry-first", "0.2s", "--lifetime", "1h", "--lease", "2s"]
    slow = [*args, "--concurrency", "1", "--per-domain", "1"]
    a = RelayProcess(lab, pg_url, tmp_path, args=slow, address="127.124.0.106", node_id="node-a")
    with a:
        accepted = submit_many(a, "dead", 25)
        wait_for("a delivery claimed by node A", lambda: held_by(pg_url, "node-a"))
        a.kill()  # SIGKILL: its lease is left in the queue
    left = a.queue()["messages"]
    assert left, "node A delivered everything before it died: nothing was left to take over"
    b = RelayProcess(lab, pg_url, tmp_path, args=args, address="127.124.0.107", node_id="node-b")
    with b:
        wait_for("a drained queue", lambda: b.queue()["count"] == 0)
    got = copies(lab, "dead")
    assert accepted and accepted <= set(got)
    assert {r["address"] for m in left for r in m["recipients"]} <= {
        f"r{k}@enforce.test" for k in got
    }


def test_a_queue_that_cannot_store_answers_451_and_the_relay_recovers(
    lab: Lab, pg_url: str, tmp_path: Path
) -> None:
    import psycopg

    lab.clear_records()
    r = RelayProcess(lab, pg_url, tmp_path, args=["--lifetime", "1h"], address="127.124.0.111")
    with r:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE relay_messages RENAME TO relay_messages_away")
            try:
                code, reply = r.submit(
                    "a@client.test", ["q@enforce.test"], b"Subject: q1\r\n\r\nx\r\n"
                )
                assert code == 451 and b"4.3.0" in reply, reply  # the client keeps the message
            finally:
                conn.execute("ALTER TABLE relay_messages_away RENAME TO relay_messages")
        code, reply = r.submit("a@client.test", ["q@enforce.test"], b"Subject: q2\r\n\r\nx\r\n")
        assert code == 250, reply
        received = lab.receiver("mx.enforce.test").messages
        wait_for("delivery", lambda: [m for m in received if b"Subject: q2" in m.data])
