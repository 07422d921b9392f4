"""`mxguard tlsrpt collect --socket PATH`: the receiver of Postfix 3.10's TLSRPT datagrams as
the command an operator runs (tests/test_postfix310_integration.py runs it under a real
Postfix 3.10).

Run as a process: it binds the socket with the mode and group asked for, records what arrives
in the store, stops on SIGTERM or SIGINT with everything received written and the socket
removed, and prints its counts (`--json`: one object). With `--log` it also follows Postfix's
log and records the sessions Postfix's events leave out (plain text under MTA-STS testing).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.adapters.store import ServedPolicy, SessionResult
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.cli import main
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy
from mxguard.tlsrpt.collector import REPORTED_BY_POSTFIX

FIXTURES = Path(__file__).parent / "fixtures" / "tlsrpt-datagrams"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A short path: sun_path holds 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="mxg-cli-") as d:
        yield Path(d)


def start(socket_path: Path, db: Path, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mxguard", "--store", f"sqlite:///{db}", "tlsrpt", "collect",
         "--socket", str(socket_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"collect did not start: {process.communicate()}")
        time.sleep(0.02)
    return process


def stored(db: Path) -> list[SessionResult]:
    async def read() -> list[SessionResult]:
        store = await SQLiteStore.open(str(db))
        try:
            now, far = dt.datetime.now(dt.UTC), dt.timedelta(days=1)
            return await store.results_between(now - far, now + far, unreported_only=False)
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_collect_records_until_stopped_and_prints_its_counts(
    sock_dir: Path, tmp_path: Path, how: signal.Signals
) -> None:
    path, db = sock_dir / "tlsrpt.sock", tmp_path / "state.db"
    gid = os.getgid()
    process = start(path, db, "--group", str(gid), "--mode", "0620", "--json")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for name in ("sts-enforce-success", "sts-enforce-starttls-not-supported-mx1"):
            s.sendto((FIXTURES / f"{name}.dgram").read_bytes(), str(path))
        s.sendto(b"not json", str(path))
    time.sleep(0.2)  # received, not yet written: the batch waits up to a second
    process.send_signal(how)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "receiving on" in err
    doc = json.loads(out)
    assert doc == {
        "socket": str(path), "datagrams": 3, "events": 2,
        "results": {"starttls-not-supported": 1, "success": 1}, "malformed": {"not-json": 1},
        "dropped": 0, "written": 2, "batches": 1,
    }  # fmt: skip
    assert mode == 0o620 and not path.exists()  # removed on the way out
    results = stored(db)
    assert sorted((r.policy_domain, r.result_text or "") for r in results) == [
        ("sts-enforce.test", ""), ("sts-enforce.test", "starttls-not-supported")]  # fmt: skip


def test_collect_says_what_it_received_in_words(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "t.sock"
    process = start(path, tmp_path / "s.db")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto((FIXTURES / "tlsa-success.dgram").read_bytes(), str(path))
        s.sendto(b"", str(path))
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert out.splitlines() == [
        f"{path}: 2 datagram(s), 1 event(s) (1 success); 1 result(s) written in 1 batch(es)",
        "  1 datagram(s) ignored: empty",
    ]


def test_collect_refuses_a_socket_someone_is_receiving_on(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.bind(str(path))
        r = CliRunner().invoke(
            main, ["--store", f"sqlite:///{tmp_path / 's.db'}", "tlsrpt", "collect",
                   "--socket", str(path)],
        )  # fmt: skip
    assert r.exit_code == 2 and "another process is receiving on" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "0999"], "is not an octal mode"),
        (["--mode", "1777"], "is not a permission mode"),
        (["--group", "no-such-group-mxg"], "no group named 'no-such-group-mxg'"),
        ([], "Missing option '--socket'"),
    ],
)
def test_collect_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    socket_args = [] if not args else ["--socket", str(tmp_path / "t.sock")]
    r = CliRunner().invoke(
        main, ["--store", f"sqlite:///{tmp_path / 's.db'}", "tlsrpt", "collect",
               *socket_args, *args],
    )  # fmt: skip
    assert r.exit_code == 2 and message in r.output, r.output


# --- with --log: the sessions Postfix's events leave out ----------------------------------

TESTING = ReportedPolicy(
    PolicyType.STS,
    ("version: STSv1", "mode: testing", "mx: *.sts-testing.test", "max_age: 86400"),
    ("*.sts-testing.test",),
    ("mailto:tlsrpt@sts-testing.test",),
)  # the policy of fixtures/tlsrpt-datagrams/sts-testing-success.dgram, as served


def serve(db: Path) -> None:
    """The record `mxguard serve postfix` writes when it answers for sts-testing.test."""

    async def add() -> None:
        store = await SQLiteStore.open(str(db))
        try:
            await store.add_served([ServedPolicy(
                domain="sts-testing.test", at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
                policy=TESTING, mx_hosts=("mx.sts-testing.test",), mx_addresses=("127.85.1.6",),
                answer="OK may policy_type=sts policy_domain=sts-testing.test",
            )])  # fmt: skip
        finally:
            await store.close()

    asyncio.run(add())


def postfix_lines(qid: str, *, tls: bool) -> list[str]:
    """One delivery to sts-testing.test as Postfix 3.10 logs it: over TLS (and reported), or
    in plain text with STARTTLS stripped (and not reported)."""
    p = f"{dt.datetime.now().strftime('%b %e %H:%M:%S')} client310 postfix/smtp[4242]: "
    peer = "mx.sts-testing.test[127.85.1.6]"
    lines = [
        f"{p}Trusted TLS connection established to {peer}:25: TLSv1.3 with cipher X",
        f"{p}TLSRPT: status=success, domain=sts-testing.test, receiving_mx={peer}",
    ] if tls else []  # fmt: skip
    lines.append(
        f"{p}{qid}: to=<postmaster@sts-testing.test>, relay={peer}:25, delay=0.02, "
        "delays=0/0/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 Message accepted)"
    )
    return [f"{ln}\n" for ln in lines]


def test_collect_with_log_records_what_postfixs_events_leave_out(
    sock_dir: Path, tmp_path: Path
) -> None:
    path, db, log = sock_dir / "tlsrpt.sock", tmp_path / "state.db", tmp_path / "mail.log"
    serve(db)
    log.write_text("".join(postfix_lines("AAAAA00001", tls=True)), encoding="utf-8")
    process = start(path, db, "--log", str(log), "--state", str(tmp_path / "log-state"),
                    "--poll", "0.1", "--sending-ip", "127.85.200.11", "--json")  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto((FIXTURES / "sts-testing-success.dgram").read_bytes(), str(path))
    with log.open("a", encoding="utf-8") as f:  # a STRIPTLS attack: delivered, not reported
        f.writelines(postfix_lines("AAAAA00002", tls=False))
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"reading {log} for what Postfix leaves out" in err
    doc = json.loads(out)
    assert (doc["events"], doc["results"], doc["written"]) == (1, {"success": 1}, 1)
    assert doc["log"]["path"] == str(log)
    assert (doc["log"]["lines"], doc["log"]["sessions"]) == (4, 1)
    assert doc["log"]["results"] == {"starttls-not-supported": 1}
    assert doc["log"]["dropped"] == {REPORTED_BY_POSTFIX: 1}
    assert doc["log"]["policies"] == {"served": 1, "resolved": 0}
    results = sorted(stored(db), key=lambda r: r.result_text or "")
    assert [(r.policy, r.result_text) for r in results] == [
        (TESTING, None), (TESTING, "starttls-not-supported")]  # fmt: skip
    assert (results[1].receiving_ip, results[1].sending_ip) == ("127.85.1.6", "127.85.200.11")


def test_collect_with_log_says_what_it_read_in_words(sock_dir: Path, tmp_path: Path) -> None:
    path, db, log = sock_dir / "t.sock", tmp_path / "s.db", tmp_path / "mail.log"
    serve(db)
    log.write_text("".join(postfix_lines("AAAAA00004", tls=False)), encoding="utf-8")
    process = start(path, db, "--log", str(log), "--state", str(tmp_path / "log-state"))
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert out.splitlines() == [
        f"{path}: 0 datagram(s), 0 event(s) (none); 0 result(s) written in 0 batch(es)",
        f"{log}: 1 new line(s), 1 session(s) Postfix's events leave out (1 starttls-not-supported)",
    ]


def test_collect_goes_on_receiving_while_the_log_cannot_be_read(
    sock_dir: Path, tmp_path: Path
) -> None:
    path, db, log = sock_dir / "t.sock", tmp_path / "s.db", tmp_path / "not-yet.log"
    process = start(path, db, "--log", str(log), "--state", str(tmp_path / "st"), "--poll",
                    "0.05", "--json")  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto((FIXTURES / "sts-testing-success.dgram").read_bytes(), str(path))
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert err.count("the Postfix log was not read (trying again): cannot read") == 1  # once
    doc = json.loads(out)
    assert (doc["written"], doc["log"]["lines"]) == (1, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "x"], "--state needs --log FILE"),
        (["--sending-ip", "192.0.2.1", "--state", "x"], "--state, --sending-ip needs --log"),
        (["--poll", "2"], "--poll needs --log FILE"),
        (["--log", "x", "--poll", "nan"], "is not a number of seconds"),
        (["--log", "x", "--poll", "0"], "is not a number of seconds"),
    ],
)
def test_collect_log_options_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(
        main, ["--store", f"sqlite:///{tmp_path / 's.db'}", "tlsrpt", "collect",
               "--socket", str(tmp_path / "t.sock"), *args],
    )  # fmt: skip
    assert r.exit_code == 2 and message in r.output, r.output
