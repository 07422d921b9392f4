"""Learned security levels against the lab's real peers (docs/learned.md), in a lab of its own
(net 127.130): five domains with no policy at all, each with one honest TLS MX host; a sixth
whose receiver really stops offering STARTTLS; a seventh whose MX set moves to a new host
that never had TLS.

First every domain is delivered to over TLS, so mxguard learns `webpki` for each MX host (the
lab CA is among the configured roots). Then the STRIPTLS attacker in front of the five strips
STARTTLS. In `report` mode every message is still delivered, in plain text, and one alarm names
the five domains and their MX addresses. In `enforce` mode every message is deferred: the
attacker sees EHLO and nothing after it, the receivers get nothing; once the attacker is gone
a retry of `mxguard send` delivers each message over TLS. One receiver dropping TLS on its own,
a first contact, an MX set moved to new hosts and a decayed level raise no alarm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.adapters.store import LevelSeen, StrippingAlarm, open_store
from mxguard.cli import main
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode, Dnssec, Domain, Host, Scenario
from mxguard.protocol.levels import SecurityLevel

pytestmark = pytest.mark.lab

NET = "127.130"
STRIPPED = tuple(f"d{n}.learned.test" for n in range(1, 6))
SOLO = "solo.learned.test"
MOVED = "moved.learned.test"


def _domain(name: str, *hosts: Host, mx: tuple[str, ...] | None = None) -> Domain:
    return Domain(
        name,
        dnssec=Dnssec.UNSIGNED,
        mx=mx or tuple(f"10 {h.name}" for h in hosts),
        hosts=hosts,
    )


def scenario() -> Scenario:
    return Scenario(
        name="learned",
        description="No-policy domains whose TLS is learned, then stripped.",
        domains=(
            *(_domain(d, Host(f"mx.{d}")) for d in STRIPPED),
            _domain(SOLO, Host(f"mx.{SOLO}")),
            _domain(
                MOVED,
                Host(f"mx-a.{MOVED}"),
                Host(f"mx-b.{MOVED}", starttls=False),
                mx=(f"10 mx-a.{MOVED}",),
            ),
        ),
    )


@pytest.fixture(scope="module")
def learned_lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(scenario(), net=NET) as lab:
        yield lab


@pytest.fixture
def lab(learned_lab: Lab) -> Iterator[Lab]:
    learned_lab.clear_records()
    yield learned_lab
    original = scenario()
    for d in original.domains:
        learned_lab.update_domain(d)
        for h in d.hosts:
            learned_lab.set_attack(h.name, AttackMode.PASS)
            learned_lab.receiver(h.name).host = h
    learned_lab.clear_records()


def config(lab: Lab, tmp_path: Path, **learned: Any) -> Path:
    """The lab's client config plus a [learned] section."""
    lines = [lab.config_file.read_text(encoding="utf-8"), "[learned]"]
    for key, value in learned.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = tmp_path / "mxguard.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli(cfg: Path, store: Path, *args: str, data: bytes | None = None) -> tuple[int, Any]:
    result = CliRunner().invoke(
        main, ["--config", str(cfg), "--store", f"sqlite://{store}", *args, "--json"], input=data
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def send(cfg: Path, store: Path, *domains: str) -> tuple[int, list[dict[str, Any]], bytes]:
    secret = f"password: hunter2-{secrets.token_hex(4)}".encode()
    message = b"Subject: learned\r\n\r\nHello.\r\n" + secret + b"\r\n"
    args = ["send", "--from", "alice@client.test", "--data", "-"]
    for d in domains:
        args += ["--to", f"bob@{d}"]
    code, out = cli(cfg, store, *args, data=message)
    return code, out if isinstance(out, list) else [out], secret


def strip(lab: Lab, *domains: str) -> None:
    for d in domains:
        lab.set_attack(f"mx.{d}", AttackMode.STRIP)


def alarm_of(store: Path) -> StrippingAlarm | None:
    async def read() -> StrippingAlarm | None:
        s = await open_store(f"sqlite://{store}")
        try:
            return await s.latest_alarm()
        finally:
            await s.close()

    return asyncio.run(read())


def learn_honestly(lab: Lab, cfg: Path, store: Path, *domains: str) -> None:
    code, results, _ = send(cfg, store, *domains)
    assert code == 0, results
    for r in results:
        assert [a["verified"] for a in r["attempts"]] == [None], r  # no policy checks anything
        assert all(not a["plaintext"] for a in r["attempts"])


def alarm_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "STRIPTLS ALARM" in r.getMessage()]


def test_report_mode_delivers_stripped_mail_and_raises_one_alarm_naming_the_domains(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, store = config(lab, tmp_path), tmp_path / "state.db"
    learn_honestly(lab, cfg, store, *STRIPPED)
    code, policy = cli(cfg, store, "policy", STRIPPED[0])
    assert (code, policy["learned"]["level"], policy["learned"]["state"]) == (0, "webpki", "report")
    assert policy["source"] == "none"  # report mode raises nothing

    strip(lab, *STRIPPED)
    caplog.set_level(logging.WARNING, logger="mxguard.learned")
    code, results, secret = send(cfg, store, *STRIPPED)
    assert code == 0
    assert [r["status"] for r in results] == ["delivered"] * len(STRIPPED)
    for d in STRIPPED:
        assert secret in lab.attacker(f"mx.{d}").client_bytes()  # report mode: read, and known
    # A second message while the alarm is active raises nothing more.
    send(cfg, store, *STRIPPED[:3])
    assert len(alarm_lines(caplog)) == 1
    alarm = alarm_of(store)
    assert alarm is not None and alarm.active
    assert alarm.domains == tuple(sorted(STRIPPED))
    addresses = sorted(f"{d} mx.{d} [{lab.address_of(f'mx.{d}')}]" for d in STRIPPED)
    assert list(alarm.hosts) == addresses
    # The loud line names the domains known when it was raised; later ones are added to it.
    logged = alarm_lines(caplog)[0] + " ".join(
        r.getMessage() for r in caplog.records if "lost STARTTLS too" in r.getMessage()
    )
    assert all(d in logged for d in STRIPPED)

    code, policy = cli(cfg, store, "policy", STRIPPED[0])
    assert [(d["seen"], d["stripped"]) for d in policy["learned"]["drops"]] == [("plain", True)] * 2
    code, status = cli(cfg, store, "status")
    assert status["alarm_active"] and status["alarm"]["domains"] == sorted(STRIPPED)
    assert status["drops"]["stripped"] == len(STRIPPED) + 3
    code, cleared = cli(cfg, store, "learned", "clear-alarm")
    assert cleared["cleared"] and not cli(cfg, store, "status")[1]["alarm_active"]


def test_enforce_defers_every_stripped_message_and_delivers_it_over_tls_after_the_attack(
    lab: Lab, tmp_path: Path
) -> None:
    cfg, store = config(lab, tmp_path, mode="enforce"), tmp_path / "state.db"
    learn_honestly(lab, cfg, store, *STRIPPED)
    lab.clear_records()
    strip(lab, *STRIPPED)
    code, results, secret = send(cfg, store, *STRIPPED)
    assert code == 75
    for r in results:
        assert r["status"] == "deferred" and r["result_type"] == "starttls-not-supported", r
        assert r["policy"] == {"source": "learned", "mode": "enforce"}
    for d in STRIPPED:
        host = f"mx.{d}"
        sessions = lab.attacker(host).sessions
        assert sessions and all(s.stripped for s in sessions)  # the attack really happened
        seen = lab.attacker(host).client_bytes().upper()
        assert not any(cmd in seen for cmd in (b"MAIL FROM", b"RCPT TO", b"DATA"))
        assert lab.receiver(host).messages == []
    alarm = alarm_of(store)
    assert alarm is not None and alarm.domains == tuple(sorted(STRIPPED))

    for d in STRIPPED:  # the attacker leaves; the sender tries again
        lab.set_attack(f"mx.{d}", AttackMode.PASS)
    code, results, _ = cli_retry(cfg, store, secret)
    assert code == 0 and [r["status"] for r in results] == ["delivered"] * len(STRIPPED)
    for d in STRIPPED:
        assert [m.tls for m in lab.receiver(f"mx.{d}").messages if secret in m.data] == [True]
        assert secret not in lab.attacker(f"mx.{d}").client_bytes()


def cli_retry(cfg: Path, store: Path, secret: bytes) -> tuple[int, list[dict[str, Any]], bytes]:
    """The same message sent again (as a queue retries it)."""
    message = b"Subject: learned\r\n\r\nHello.\r\n" + secret + b"\r\n"
    args = ["send", "--from", "alice@client.test", "--data", "-"]
    for d in STRIPPED:
        args += ["--to", f"bob@{d}"]
    code, out = cli(cfg, store, *args, data=message)
    return code, out if isinstance(out, list) else [out], secret


def test_one_receiver_that_really_drops_tls_is_a_drop_but_not_the_stripping_alarm(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, store = config(lab, tmp_path), tmp_path / "state.db"
    learn_honestly(lab, cfg, store, SOLO, *STRIPPED)
    receiver = lab.receiver(f"mx.{SOLO}")
    receiver.host = dataclasses.replace(receiver.host, starttls=False)  # really drops TLS
    caplog.set_level(logging.WARNING, logger="mxguard.learned")
    code, results, _ = send(cfg, store, SOLO, *STRIPPED)
    assert code == 0 and [a["starttls"] for a in results[0]["attempts"]] == [False]
    drops = cli(cfg, store, "policy", SOLO)[1]["learned"]["drops"]
    assert [(d["learned"], d["seen"], d["stripped"]) for d in drops] == [("webpki", "plain", True)]
    assert [r.getMessage() for r in caplog.records if "security level drop" in r.getMessage()]
    assert alarm_of(store) is None and not alarm_lines(caplog)


def test_no_drop_and_no_alarm_on_first_contact_a_moved_mx_set_or_a_decayed_level(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, store = config(lab, tmp_path, mode="enforce", decay=3600), tmp_path / "state.db"
    caplog.set_level(logging.WARNING, logger="mxguard.learned")
    # First contact, already stripped: nothing was learned, so nothing dropped.
    strip(lab, *STRIPPED[:3])
    code, results, _ = send(cfg, store, *STRIPPED[:3])
    assert code == 0 and all(a["plaintext"] for r in results for a in r["attempts"])
    # Decayed: TLS seen on the other two, but longer ago than `decay`.
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)

    async def learn_long_ago() -> None:
        s = await open_store(f"sqlite://{store}")
        try:
            await s.learn(
                [LevelSeen(d, f"mx.{d}", lab.address_of(f"mx.{d}"), SecurityLevel.WEBPKI, long_ago)
                 for d in STRIPPED[3:]],
                stale_before=long_ago - dt.timedelta(days=1),
            )  # fmt: skip
        finally:
            await s.close()

    asyncio.run(learn_long_ago())
    strip(lab, *STRIPPED[3:])
    code, results, _ = send(cfg, store, *STRIPPED[3:])
    assert code == 0 and all(a["plaintext"] for r in results for a in r["attempts"])
    # The MX set moved to a host that never had TLS.
    learn_honestly(lab, cfg, store, MOVED)
    moved = dataclasses.replace(lab.scenario.domain(MOVED), mx=(f"10 mx-b.{MOVED}",))
    lab.update_domain(moved)
    code, results, _ = send(cfg, store, MOVED)
    assert code == 0 and [a["mx"] for a in results[0]["attempts"]] == [f"mx-b.{MOVED}"]
    assert results[0]["attempts"][0]["plaintext"]
    code, policy = cli(cfg, store, "policy", MOVED)
    assert policy["learned"]["state"] == "none" and policy["source"] == "none"
    assert not [r for r in caplog.records if "security level drop" in r.getMessage()]
    assert alarm_of(store) is None
