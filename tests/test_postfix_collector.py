"""`mxguard tlsrpt collect-postfix` against the log of a real Postfix (issue 6 acceptance).

The independent count: the lab's STRIPTLS attacker sits in front of every MX host and records
every TCP connection it proxies (`Delivery.attacked`, only connections from Postfix's own
address, records cleared before each case). Each such connection is one SMTP session that
Postfix really made (RFC 8460 §4: sessions are what count). The collector, reading only
Postfix's log, must find exactly as many sessions per delivery, with the result types below.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxguard.adapters.store import SessionResult
from mxguard.config import load
from mxguard.engine.context import engine
from mxguard.lab.lab import Lab
from mxguard.tlsrpt import collector as module
from mxguard.tlsrpt.collector import Collector, EnginePolicies, State

pytest.register_assert_rewrite("postfix_harness")

from postfix_harness import PostfixRun  # noqa: E402

pytest_plugins = ["postfix_harness"]
pytestmark = pytest.mark.lab

# case -> (policy type, result type of each session in order; None = success)
EXPECTED: dict[str, tuple[str, list[str | None]]] = {
    "sts-enforce-honest": ("sts", [None]),
    "sts-enforce-stripped": ("sts", ["starttls-not-supported", "starttls-not-supported"]),
    "sts-enforce-intercepted": ("sts", ["certificate-host-mismatch", "certificate-host-mismatch"]),
    "sts-testing-stripped": ("sts", ["starttls-not-supported"]),  # delivered, but reported
    "dane-honest": ("tlsa", [None]),
    "dane-mismatch": ("tlsa", ["validation-failure"]),
    "no-policy-stripped": ("no-policy-found", [None]),
}


def collect(lab: Lab, log: Path, db: Path, state: Path, sending_ip: str) -> list[SessionResult]:
    """One collector run with the lab's settings; every result in the store afterwards."""
    settings = load(lab.config_file).with_overrides(store=f"sqlite:///{db}")

    async def run() -> list[SessionResult]:
        async with engine(settings) as e:
            c = Collector(log, e.store, EnginePolicies(e.resolver), state_path=state,
                          sending_ip=sending_ip)  # fmt: skip
            await c.collect()
            far = dt.timedelta(days=400)
            now = dt.datetime.now(dt.UTC)
            return await e.store.results_between(now - far, now + far, unreported_only=False)

    return asyncio.run(run())


@pytest.fixture
def snapshot(postfix_run: PostfixRun, tmp_path: Path) -> Iterator[Path]:
    """A copy of Postfix's log after the acceptance deliveries (later tests may append)."""
    copy = tmp_path / "maillog"
    shutil.copyfile(postfix_run.log_file, copy)
    yield copy


def test_collected_sessions_equal_the_sessions_postfix_made(
    session_lab: Lab, postfix_run: PostfixRun, snapshot: Path, tmp_path: Path
) -> None:
    results = collect(session_lab, snapshot, tmp_path / "s.db", tmp_path / "st", "192.0.2.7")
    # Cases that share a domain are told apart by their order in the log (= delivery order).
    by_domain: dict[str, list[SessionResult]] = {}
    for r in results:
        by_domain.setdefault(r.policy_domain, []).append(r)
    for name, d in postfix_run.deliveries.items():
        kind, types = EXPECTED[name]
        mine = by_domain[d.case.domain][: len(d.attacked)]
        del by_domain[d.case.domain][: len(d.attacked)]
        assert len(mine) == len(d.attacked), (
            f"{name}: the attackers saw {len(d.attacked)} sessions from Postfix, "
            f"the collector found {len(mine)}:\n{d.outcome.text()}"
        )
        assert [r.result_type for r in mine] == types, name
        assert {r.policy_type for r in mine} == {kind}, name
        assert all(r.sending_ip == "192.0.2.7" and r.receiving_ip for r in mine), name
        if kind == "tlsa":
            assert all(r.policy_strings for r in mine), f"{name}: TLSA records missing"
        if kind == "sts":
            assert all(r.mx_patterns and r.rua for r in mine), f"{name}: STS policy missing"
    assert len(results) == sum(len(d.attacked) for d in postfix_run.deliveries.values())


def test_a_second_run_adds_nothing_and_new_lines_are_added_once(
    session_lab: Lab, postfix_run: PostfixRun, snapshot: Path, tmp_path: Path
) -> None:
    db, state = tmp_path / "s.db", tmp_path / "st"
    first = collect(session_lab, snapshot, db, state, "192.0.2.7")
    assert collect(session_lab, snapshot, db, state, "192.0.2.7") == first
    lines = [ln for ln in snapshot.read_text().splitlines() if "dane-ee.test" in ln]
    with snapshot.open("a") as f:
        f.write("\n".join(lines) + "\n")
    third = collect(session_lab, snapshot, db, state, "192.0.2.7")
    (new,) = [r for r in third if r.id not in {f.id for f in first}]
    assert new.policy_domain == "dane-ee.test" and new.result_type is None


def test_rotated_and_truncated_logs_lose_and_repeat_nothing(
    session_lab: Lab, snapshot: Path, tmp_path: Path
) -> None:
    db, state = tmp_path / "s.db", tmp_path / "st"
    lines = snapshot.read_text().splitlines(keepends=True)
    half = next(i for i, ln in enumerate(lines) if "dane-ee.test" in ln and "status=" in ln) + 1
    snapshot.write_text("".join(lines[:half]))
    before = collect(session_lab, snapshot, db, state, "192.0.2.7")
    # Postfix writes more, then logrotate renames the file and Postfix starts a new one.
    with snapshot.open("a") as f:
        f.write("".join(lines[half : half + 8]))
    snapshot.rename(snapshot.with_name("maillog.1"))
    snapshot.write_text("".join(lines[half + 8 :]))
    rotated = collect(session_lab, snapshot, db, state, "192.0.2.7")
    (tmp_path / "whole").write_text("".join(lines))
    everything = collect(session_lab, tmp_path / "whole", tmp_path / "w.db", tmp_path / "wst", "")
    assert len(before) < len(rotated) == len(everything)
    # copytruncate: the same file emptied and written again from the start.
    snapshot.write_text("")
    with snapshot.open("a") as f:
        f.write("".join(ln for ln in lines if "dane-ee.test" in ln))
    assert len(collect(session_lab, snapshot, db, state, "192.0.2.7")) == len(rotated) + 1


def test_a_crash_between_store_and_state_neither_loses_nor_repeats(
    session_lab: Lab, snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, state = tmp_path / "s.db", tmp_path / "st"
    expected = len(collect(session_lab, snapshot, tmp_path / "ref.db", tmp_path / "ref", "x"))
    calls = {"n": 0}
    original = module.save_state

    def dying(path: Path, st: State) -> None:
        calls["n"] += 1
        if st.pending is None and calls["n"] == 2:  # the save after add_results
            raise KeyboardInterrupt("killed")
        original(path, st)

    monkeypatch.setattr(module, "save_state", dying)
    with pytest.raises(KeyboardInterrupt):
        collect(session_lab, snapshot, db, state, "192.0.2.7")
    assert calls["n"] == 2, "the crash should have come after the store write"
    monkeypatch.setattr(module, "save_state", original)
    # The interrupted batch was recorded: the next run skips it instead of adding it again.
    assert len(collect(session_lab, snapshot, db, state, "192.0.2.7")) == expected
