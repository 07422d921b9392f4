"""`mxguard demo`: the STRIPTLS attack against every defence, judged from what happened.

The demo's rows must come from the run, not from expectations: the table for the standard
scenario is checked row by row, then the scenario is changed under the demo (a policy
withdrawn, TLSA records removed, a testing policy made enforcing) and the same row must change
with it. The judging rules themselves are checked without a lab, one row per rule. The CLI
test starts the demo's own lab on 127.210.0.0/16; the others reuse the session lab.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from conftest import restore
from mxguard.cli import main
from mxguard.cli.demo import render
from mxguard.demo import (
    CASES,
    Act,
    Case,
    DemoResult,
    Expect,
    MessageFate,
    Row,
    classify,
    judge,
    run_demo,
)
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Domain, Scenario

DEMO_NET = "127.210"  # this file's own range for the lab the CLI starts

LEAKED, REFUSED, REPORTED = MessageFate.LEAKED, MessageFate.REFUSED, MessageFate.REPORTED
VERIFIED, UNVERIFIED = MessageFate.VERIFIED, MessageFate.UNVERIFIED


def demo(lab: Lab, acts: tuple[Act, ...] = tuple(Act), cases: tuple[Case, ...] = CASES) -> Any:
    return asyncio.run(run_demo(lab, acts=acts, cases=cases))


def table(result: DemoResult, act: Act) -> list[tuple[Any, ...]]:
    """(domain, policy, outcome, attacker read the password, received, over TLS, ok) per row."""
    [found] = [a for a in result.acts if a.act is act]
    return [
        (r.domain, r.policy, r.outcome, r.attacker_read_password, r.received,
         r.received_tls is not None, r.ok)
        for r in found.rows
    ]  # fmt: skip


# --- the standard run ---------------------------------------------------------------------

STRIP_TABLE = [
    ("nopolicy.test", "none/none", LEAKED, True, True, False, True),
    ("local-rule.test", "local/enforce", REFUSED, False, False, False, True),
    ("sts-testing.test", "mta-sts/testing", REPORTED, True, True, False, True),
    ("sts-enforce.test", "mta-sts/enforce", REFUSED, False, False, False, True),
    ("dane-ee.test", "dane/enforce", REFUSED, False, False, False, True),
    ("list.test", "list/enforce", REFUSED, False, False, False, True),
]
HONEST_TABLE = [
    ("nopolicy.test", "none/none", UNVERIFIED, False, True, True, True),
    ("local-rule.test", "local/enforce", VERIFIED, False, True, True, True),
    ("sts-testing.test", "mta-sts/testing", VERIFIED, False, True, True, True),
    ("sts-enforce.test", "mta-sts/enforce", VERIFIED, False, True, True, True),
    ("dane-ee.test", "dane/enforce", VERIFIED, False, True, True, True),
    ("list.test", "list/enforce", VERIFIED, False, True, True, True),
]
TOFU_TABLE = [("sts-enforce.test", "mta-sts/enforce", REFUSED, False, False, False, True)]


@pytest.fixture(scope="module")
def standard(session_lab: Lab, standard_scenario: Scenario) -> Iterator[tuple[DemoResult, float]]:
    """One standard run shared by the tests that read it (the demo takes about a second)."""
    started = time.monotonic()
    result = demo(session_lab)
    yield result, time.monotonic() - started
    restore(session_lab, standard_scenario)


@pytest.mark.lab
def test_each_defence_row_is_what_happened_to_its_message(
    standard: tuple[DemoResult, float],
) -> None:
    result, _ = standard
    assert table(result, Act.STRIP) == STRIP_TABLE
    assert table(result, Act.HONEST) == HONEST_TABLE
    assert table(result, Act.TOFU) == TOFU_TABLE
    assert result.ok and result.exit_code == 0


@pytest.mark.lab
def test_refused_rows_name_the_result_type_and_the_attacker_saw_no_envelope(
    standard: tuple[DemoResult, float],
) -> None:
    result, _ = standard
    refused = [row for act in result.acts for row in act.rows if row.outcome is REFUSED]
    assert refused, "the standard run refuses the protected rows"
    for row in refused:
        # RFC 8460 §4.3.1: the stripped EHLO reply is "starttls-not-supported".
        assert row.result_type == "starttls-not-supported", row
        assert "starttls-not-supported" in row.reported, row
        assert row.attacker_stripped and not row.attacker_saw_envelope, row
        assert row.status == "deferred", row


@pytest.mark.lab
def test_testing_policy_records_the_failure_for_the_tls_report(
    standard: tuple[DemoResult, float],
) -> None:
    result, _ = standard
    [row] = [r for r in result.acts[0].rows if r.domain == "sts-testing.test"]
    assert row.status == "delivered" and row.reported == ("starttls-not-supported",)


@pytest.mark.lab
def test_tofu_act_uses_the_cached_policy_although_the_txt_record_is_gone(
    standard: tuple[DemoResult, float],
) -> None:
    result, _ = standard
    [tofu] = [a for a in result.acts if a.act is Act.TOFU]
    assert [r.policy_cached for r in tofu.rows] == [True]


@pytest.mark.lab
def test_ehlo_lines_are_read_from_real_sessions(standard: tuple[DemoResult, float]) -> None:
    ehlo = standard[0].ehlo
    assert ehlo.host == "mx.nopolicy.test"
    assert ehlo.honest.startswith("250-mx.nopolicy.test ") and " 250-STARTTLS " in ehlo.honest
    assert "STARTTLS" not in ehlo.stripped
    # Only the STARTTLS line is gone; everything else is byte for byte the same.
    assert ehlo.stripped == ehlo.honest.replace(" 250-STARTTLS", "")


@pytest.mark.lab
def test_demo_finishes_in_seconds(standard: tuple[DemoResult, float]) -> None:
    _, seconds = standard
    assert seconds < 20


@pytest.mark.lab
def test_demo_puts_back_what_it_changed(lab: Lab) -> None:
    modes = {h: a.mode for h, a in lab.attackers.items()}
    scenario = lab.scenario
    demo(lab)
    assert {h: a.mode for h, a in lab.attackers.items()} == modes
    assert lab.scenario.domain("sts-enforce.test") == scenario.domain("sts-enforce.test")


@pytest.mark.lab
def test_human_output_shows_the_ehlo_lines_and_every_row(
    standard: tuple[DemoResult, float],
) -> None:
    out = io.StringIO()
    render(standard[0], Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    ehlo = standard[0].ehlo
    assert f"honest:   {ehlo.honest}\n" in text
    assert f"stripped: {ehlo.stripped}\n" in text
    for case in CASES:
        assert case.domain in text
    assert "delivered in plain text, READ by the attacker" in text
    assert "Every defence behaved as a secure sender must" in text


# --- the table follows the scenario -------------------------------------------------------


def no_mta_sts(d: Domain) -> Domain:
    return dataclasses.replace(d, mta_sts=None)


def no_tlsa(d: Domain) -> Domain:
    return dataclasses.replace(d, hosts=tuple(dataclasses.replace(h, tlsa=()) for h in d.hosts))


def sts_enforce(d: Domain) -> Domain:
    assert d.mta_sts is not None
    return dataclasses.replace(d, mta_sts=dataclasses.replace(d.mta_sts, mode="enforce"))


CHANGES: list[tuple[str, Callable[[Domain], Domain], tuple[Any, ...]]] = [
    # (domain, change, its row in the strip act afterwards)
    ("sts-enforce.test", no_mta_sts,
     ("sts-enforce.test", "none/none", LEAKED, True, True, False, False)),
    ("dane-ee.test", no_tlsa, ("dane-ee.test", "none/none", LEAKED, True, True, False, False)),
    ("sts-testing.test", sts_enforce,
     ("sts-testing.test", "mta-sts/enforce", REFUSED, False, False, False, False)),
]  # fmt: skip


@pytest.mark.lab
@pytest.mark.parametrize(("domain", "change", "row"), CHANGES, ids=[c[0] for c in CHANGES])
def test_changing_the_scenario_changes_the_row(
    lab: Lab, domain: str, change: Callable[[Domain], Domain], row: tuple[Any, ...]
) -> None:
    [case] = [c for c in CASES if c.domain == domain]
    before = demo(lab, (Act.STRIP,), (case,))
    assert table(before, Act.STRIP) == [r for r in STRIP_TABLE if r[0] == domain]
    lab.update_domain(change(lab.scenario.domain(domain)))
    after = demo(lab, (Act.STRIP,), (case,))
    # The last column is the row's verdict, which still judges by the defence's promise
    # (the sts-testing domain now refuses: as a testing row, that is wrong).
    assert table(after, Act.STRIP) == [row]
    assert after.exit_code == 1


# --- the judging rules, without a lab -----------------------------------------------------

CLASSIFY = [
    # received, over TLS, verified, failure reported, attacker read -> outcome
    (False, False, False, False, False, MessageFate.REFUSED),
    (False, False, False, True, False, MessageFate.REFUSED),
    (False, False, False, False, True, MessageFate.REFUSED_LEAKED),
    (True, False, False, True, True, MessageFate.REPORTED),
    (True, True, True, True, False, MessageFate.REPORTED),
    (True, False, False, False, True, MessageFate.LEAKED),
    (True, False, False, False, False, MessageFate.PLAIN),
    (True, True, True, False, False, MessageFate.VERIFIED),
    (True, True, False, False, False, MessageFate.UNVERIFIED),
]


@pytest.mark.parametrize(("received", "tls", "verified", "reported", "read", "outcome"), CLASSIFY)
def test_outcome_is_derived_from_receiver_attacker_and_store(
    received: bool, tls: bool, verified: bool, reported: bool, read: bool, outcome: MessageFate
) -> None:
    got = classify(
        received=received, received_tls=tls, verified=verified, reported=reported,
        attacker_read=read,
    )  # fmt: skip
    assert got is outcome


JUDGE = [
    # expect, outcome, attacker read, attacker interfered, failure reported -> ok
    (Expect.OPPORTUNISTIC, MessageFate.LEAKED, True, True, False, True),
    (Expect.OPPORTUNISTIC, MessageFate.UNVERIFIED, False, False, False, True),
    (Expect.OPPORTUNISTIC, MessageFate.REFUSED, False, True, False, False),
    (Expect.REPORT_ONLY, MessageFate.REPORTED, True, True, True, True),
    (Expect.REPORT_ONLY, MessageFate.VERIFIED, False, False, False, True),
    (Expect.REPORT_ONLY, MessageFate.LEAKED, True, True, False, False),  # not reported
    (Expect.REPORT_ONLY, MessageFate.REFUSED, False, True, True, False),  # must deliver
    (Expect.PROTECTED, MessageFate.REFUSED, False, True, True, True),
    (Expect.PROTECTED, MessageFate.VERIFIED, False, False, False, True),
    (Expect.PROTECTED, MessageFate.LEAKED, True, True, False, False),
    (Expect.PROTECTED, MessageFate.REFUSED_LEAKED, True, True, True, False),
    (Expect.PROTECTED, MessageFate.UNVERIFIED, False, False, False, False),
    (Expect.PROTECTED, MessageFate.REPORTED, True, True, True, False),
]


@pytest.mark.parametrize(("expect", "outcome", "read", "interfered", "reported", "ok"), JUDGE)
def test_protected_rows_never_leak_and_report_only_rows_always_deliver(
    expect: Expect, outcome: MessageFate, read: bool, interfered: bool, reported: bool, ok: bool
) -> None:
    verdict, why = judge(
        expect, outcome, attacker_read=read, interfered=interfered, reported=reported
    )
    assert verdict is ok and why


# --- the command --------------------------------------------------------------------------


@pytest.mark.lab
def test_cli_json_starts_its_own_lab_and_prints_the_tables() -> None:
    started = time.monotonic()
    result = CliRunner().invoke(main, ["demo", "--net", DEMO_NET, "--json"])
    seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"ok", "seconds", "ehlo", "acts"}
    assert data["ok"] is True
    assert set(data["ehlo"]) == {"host", "honest", "stripped"}
    assert [a["act"] for a in data["acts"]] == ["strip", "honest", "tofu"]
    row = data["acts"][0]["rows"][0]
    assert set(row) == {f.name for f in dataclasses.fields(Row)} - {
        "attacker_sessions", "attacker_stripped", "attacker_read_password",
        "attacker_saw_envelope", "received", "received_tls",
    } | {"attacker", "receiver"}  # fmt: skip
    assert row["attacker"] == {
        "sessions": 1, "stripped": True, "read_password": True, "saw_envelope": True
    }  # fmt: skip
    assert row["receiver"] == {"received": True, "tls": False, "tls_version": None}
    assert [r["outcome"] for r in data["acts"][0]["rows"]] == [r[2].value for r in STRIP_TABLE]
    assert seconds < 60  # the bound, lab start included


@pytest.mark.lab
def test_cli_act_option_runs_only_the_chosen_acts() -> None:
    result = CliRunner().invoke(main, ["demo", "--net", DEMO_NET, "--act", "strip"])
    assert result.exit_code == 0, result.output
    assert "Act 1" in result.output and "Act 2" not in result.output
    assert "stripped: 250-" in result.output


@pytest.mark.parametrize("net", ["300", "10.1", "127.256", "127.x"])
def test_cli_net_must_be_a_loopback_slash_16(net: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--net", net])
    assert result.exit_code == 2 and "127.N" in result.output
