"""What deliver() does for TLS reports and what it records about sessions.

RFC 8460 §5.3 with RFC 8689's `TLS-Required: No`: a report must reach the domain even when
the domain's TLS is what is broken. And what goes into a report (`additional-information`)
leaves the machine: TLS facts only, never an SMTP reply, which can carry addresses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from mxguard import config
from mxguard.adapters.store import SessionResult
from mxguard.engine.context import engine
from mxguard.engine.deliver import DeliveryResult
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode

pytestmark = pytest.mark.lab


def deliver(
    lab: Lab, db: Path, to: list[str], *, is_report: bool
) -> tuple[DeliveryResult, list[SessionResult]]:
    settings = config.load(lab.config_file).with_overrides(store=f"sqlite:///{db}")

    async def run() -> tuple[DeliveryResult, list[SessionResult]]:
        async with engine(settings) as e:
            result = await e.sender(is_report=is_report).deliver(
                "tlsrpt@client.test", to, b"Subject: report\r\nTLS-Required: No\r\n\r\nhi\r\n"
            )
            now = dt.datetime.now(dt.UTC)
            day = dt.timedelta(days=1)
            return result, await e.store.results_between(now - day, now + day)

    return asyncio.run(run())


@pytest.mark.parametrize("mode", [AttackMode.STRIP, AttackMode.INTERCEPT_WRONG_NAME])
def test_a_report_gets_through_when_the_domains_tls_is_broken(
    lab: Lab, tmp_path: Path, mode: AttackMode
) -> None:
    for host in ("mx1.sts-enforce.test", "mx2.sts-enforce.test"):
        lab.set_attack(host, mode)
    result, sessions = deliver(lab, tmp_path / "s.db", ["tlsrpt@sts-enforce.test"], is_report=True)
    assert result.status == "delivered"
    assert lab.receiver("mx1.sts-enforce.test").messages
    assert sessions and all(s.is_report for s in sessions)


def test_the_same_message_as_ordinary_mail_is_refused(lab: Lab, tmp_path: Path) -> None:
    for host in ("mx1.sts-enforce.test", "mx2.sts-enforce.test"):
        lab.set_attack(host, AttackMode.STRIP)
    result, _ = deliver(lab, tmp_path / "s.db", ["tlsrpt@sts-enforce.test"], is_report=False)
    assert result.status == "deferred"


def test_recorded_details_carry_no_smtp_reply(lab: Lab, tmp_path: Path) -> None:
    # MTA-STS testing, stripped: a reported failure; the receiver then refuses the recipient
    # with a reply that names the address.
    lab.set_attack("mx.sts-testing.test", AttackMode.STRIP)
    result, sessions = deliver(
        lab, tmp_path / "s.db", ["unknown-alice.secret@sts-testing.test"], is_report=False
    )
    assert result.status == "failed"
    (session,) = sessions
    assert session.result_type == "starttls-not-supported"
    assert session.detail is not None and "STARTTLS" in session.detail
    assert "@" not in session.detail and "550" not in session.detail
