"""Session results the store refuses are spooled on disk and recorded once it takes them.

A Redis store keeps no session results (it refuses them with StoreError at once), which makes
it a real store that refuses; the spool then lives in $XDG_STATE_HOME/mxguard/spool/ until a
delivery on a store that takes results moves them over.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.adapters.store import SessionResult, open_store
from mxguard.cli import main
from mxguard.engine.spool import ResultSpool, record
from mxguard.lab.lab import Lab
from mxguard.protocol.tlsrpt_report import NO_POLICY_FOUND

pytest_plugins = ["servers"]

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
FAR = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2100, 1, 1, tzinfo=dt.UTC))


def result(mx: str = "mx.example.com") -> SessionResult:
    return SessionResult(
        id=None, at=T0, policy_domain="example.com", policy=NO_POLICY_FOUND, result_type=None,
        sending_ip="192.0.2.1", receiving_mx=mx, receiving_ip="192.0.2.25",
        receiving_helo=None, detail=None, is_report=False, reported=None,
    )  # fmt: skip


def test_results_the_store_refuses_wait_in_the_spool_until_it_takes_them(
    tmp_path: Path, redis_server: Any
) -> None:
    spool = ResultSpool(tmp_path / "spool")

    async def body() -> None:
        refusing = await open_store(redis_server.url(prefix=f"t{uuid.uuid4().hex}:"))
        taking = await open_store(f"sqlite:///{tmp_path / 'state.db'}")
        try:
            await record(refusing, spool, [result("mx1.example.com")])
            await record(refusing, spool, [result("mx2.example.com")])
            assert spool.path.exists()
            assert await taking.results_between(*FAR) == []
            await record(taking, spool, [result("mx3.example.com")])
            recorded = sorted(r.receiving_mx for r in await taking.results_between(*FAR))
            assert recorded == ["mx1.example.com", "mx2.example.com", "mx3.example.com"]
            assert not spool.path.exists()
        finally:
            await refusing.close()
            await taking.close()

    asyncio.run(body())


@pytest.mark.lab
def test_send_keeps_the_results_a_redis_store_refuses(
    lab: Lab, tmp_path: Path, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def send(store: str) -> None:
        result = CliRunner().invoke(
            main,
            ["--config", str(lab.config_file), "--store", store, "send",
             "--from", "a@client.test", "--to", "b@sts-enforce.test"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output

    send(redis_server.url(prefix=f"t{uuid.uuid4().hex}:"))
    spool = ResultSpool(tmp_path / "state" / "mxguard" / "spool")
    assert spool.path.exists()
    send(f"sqlite:///{tmp_path / 'state.db'}")
    assert not spool.path.exists()

    async def recorded() -> list[SessionResult]:
        store = await open_store(f"sqlite:///{tmp_path / 'state.db'}")
        try:
            return await store.results_between(*FAR)
        finally:
            await store.close()

    results = asyncio.run(recorded())
    assert len(results) == 2  # the spooled session and the new one
    assert {r.policy_domain for r in results} == {"sts-enforce.test"}
