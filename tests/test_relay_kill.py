"""kill -9 of `mxguard relay` at random points loses no accepted message (lab net 127.121).

A real relay process delivers to a lab MTA-STS `enforce` MX host over TLS while messages are
submitted to it one after another; a timer SIGKILLs it at a seeded random moment, so that the
kill falls anywhere: while a message is being received, between the queue's commit and the
250, while deliveries are in flight, between the remote 250 and the queue's record of it.
The relay is started again on the same queue, the round repeats, and at the end a last relay
drains the queue and is stopped cleanly. Then:

- every message that got a 250 reached the MX host at least once;
- a message reached it more than once only when its first copy arrived while a relay that
  was then killed was running (SMTP's at-least-once: the kill fell between the remote 250
  and the queue's commit), never from the relay that stopped cleanly.
"""

from __future__ import annotations

import random
import re
import shutil
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxguard.lab.lab import Lab
from relay_helpers import RelayProcess, relay_scenario, wait_for

pytestmark = pytest.mark.lab

NET = "127.121"
ADDRESS = "127.124.0.103"
ROUNDS = 12
SEED = 20261202


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(relay_scenario("relay-kill"), net=NET) as lab:
        yield lab


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        return int(s.getsockname()[1])


def submit(port: int, n: int) -> bool:
    """Message ``n``; True when the relay answered 250 to its DATA."""
    data = f"Subject: kill-{n}\r\nMessage-ID: <kill-{n}@client.test>\r\n\r\nbody {n}\r\n"
    try:
        with smtplib.SMTP(ADDRESS, port, timeout=10) as c:
            c.sendmail("a@client.test", [f"r{n}@enforce.test"], data.encode())
        return True
    except (OSError, smtplib.SMTPException):
        return False


def test_kill_9_at_random_points_loses_nothing_accepted(lab: Lab, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    store = f"sqlite:///{tmp_path / 'queue.db'}"
    port = free_port()
    args = ["--retry-first", "0.2s", "--retry-max", "0.5s", "--lifetime", "1h"]
    accepted: set[int] = set()
    killed_runs: list[tuple[float, float]] = []  # (start, kill) of each killed relay
    n = 0
    for _ in range(ROUNDS):
        relay = RelayProcess(lab, store, tmp_path, args=args, address=ADDRESS)
        relay.port = port
        relay.start()
        started = time.time()
        delay = rng.uniform(0.05, 1.2)
        killer = threading.Timer(delay, relay.kill)
        killer.start()
        while killer.is_alive():
            n += 1
            if submit(port, n):
                accepted.add(n)
        killer.join()
        killed_runs.append((started, time.time()))
    # A last relay drains the queue and stops cleanly.
    final = RelayProcess(lab, store, tmp_path, args=args, address=ADDRESS)
    final.port = port
    with final:
        wait_for("a drained queue", lambda: final.queue()["count"] == 0, within=120)
    received = lab.receiver("mx.enforce.test").messages
    copies: Counter[int] = Counter()
    first_at: dict[int, float] = {}
    for m in received:
        match = re.search(rb"Subject: kill-(\d+)", m.data)
        assert match, m.data[:200]
        k = int(match.group(1))
        copies[k] += 1
        first_at.setdefault(k, m.received_at.timestamp())
        assert m.tls, "delivered without TLS to an MTA-STS enforce domain"
    assert len(accepted) > ROUNDS, f"too few messages accepted to test anything: {accepted}"
    lost = sorted(accepted - set(copies))
    assert not lost, f"accepted with 250 but never delivered: {lost}"
    duplicated = [k for k, c in copies.items() if c > 1]
    for k in duplicated:
        assert any(start <= first_at[k] <= kill for start, kill in killed_runs), (
            f"message {k} delivered {copies[k]} times, the first copy not by a killed relay"
        )
    print(
        f"{ROUNDS} kills, {n} submissions, {len(accepted)} accepted, "
        f"{len(copies)} delivered, {len(duplicated)} delivered twice"
    )
