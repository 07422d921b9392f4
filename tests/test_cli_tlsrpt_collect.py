"""`mxguard tlsrpt collect --socket PATH`: the receiver of Postfix 3.10's TLSRPT datagrams as
the command an operator runs (tests/test_postfix310_integration.py runs it under a real
Postfix 3.10).

Run as a process: it binds the socket with the mode and group asked for, records what arrives
in the store, stops on SIGTERM or SIGINT with everything received written and the socket
removed, and prints its counts (`--json`: one object).
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

from mxguard.adapters.store import SessionResult
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.cli import main

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
