"""What the STRIPTLS demonstration checks and how it judges: cases, outcomes, rows.

Pure data and rules, no I/O: the defences and their lab domains (``CASES``), what a secure
sender must do for each (``Expect``), what happened to a message (``MessageFate``, derived by
``classify`` from what the receiver, the attacker and the store showed), and whether that was
right (``judge``). The results (``Row``, ``ActResult``, ``DemoResult``) carry the JSON of
``mxguard demo --json`` (``to_json``). The run that fills them in is ``runner.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from mxguard.engine.deliver import DeliveryStatus
from mxguard.protocol.results import ResultType


class Expect(enum.StrEnum):
    """What a secure sender must do for a defence, whatever the attacker does."""

    OPPORTUNISTIC = "opportunistic"  # deliver; without a policy it cannot know better
    REPORT_ONLY = "report-only"  # deliver; record every failure for TLS-RPT (RFC 8461 §5)
    PROTECTED = "protected"  # refuse, or deliver over verified TLS; never in plain text


@dataclass(frozen=True)
class Case:
    """One row of the demo: a defence and the lab domain that has it."""

    defence: str
    domain: str
    expect: Expect


CASES: tuple[Case, ...] = (
    Case("none (opportunistic STARTTLS)", "nopolicy.test", Expect.OPPORTUNISTIC),
    Case("local require-TLS rule", "local-rule.test", Expect.PROTECTED),
    Case("MTA-STS testing", "sts-testing.test", Expect.REPORT_ONLY),
    Case("MTA-STS enforce", "sts-enforce.test", Expect.PROTECTED),
    Case("DANE", "dane-ee.test", Expect.PROTECTED),
    Case("static policy list", "list.test", Expect.PROTECTED),
)
TOFU_CASE = Case(
    "MTA-STS enforce, cached; TXT deleted, HTTPS broken", "sts-enforce.test", Expect.PROTECTED
)


class MessageFate(enum.StrEnum):
    """What happened to one message, as observed at the receiver and the attacker (the
    sender's own verdict is a ``DeliveryStatus``)."""

    LEAKED = "delivered in plain text, READ by the attacker"
    REFUSED = "refused (not delivered)"
    REPORTED = "delivered, failure reported"
    VERIFIED = "delivered over verified TLS"
    UNVERIFIED = "delivered over unverified TLS"
    PLAIN = "delivered in plain text"  # and yet the attacker did not read it
    REFUSED_LEAKED = "not delivered, but READ by the attacker"


class Act(enum.StrEnum):
    STRIP = "strip"
    HONEST = "honest"
    TOFU = "tofu"


ACT_TITLES = {
    Act.STRIP: "Act 1: a STRIPTLS attacker deletes STARTTLS in front of every MX host",
    Act.HONEST: "Act 2: the same path, honest (the attacker passes every byte unchanged)",
    Act.TOFU: "Act 3: trust on first use: the attacker also hides the MTA-STS policy",
}


class DemoError(RuntimeError):
    """The demo could not run (the lab, a scenario without a demo domain); says why."""


@dataclass(frozen=True)
class Row:
    """One defence under one act, every field read from the run."""

    defence: str
    domain: str
    expect: Expect
    attack: str  # the attacker modes of the sessions it proxied ("pass", "strip", ...)
    policy: str  # source/mode the sender applied, e.g. "mta-sts/enforce"
    policy_cached: bool  # the MTA-STS policy came from the cache (RFC 8461 §5.1)
    status: DeliveryStatus  # the sender's verdict
    result_type: ResultType | None  # RFC 8460 result type of the sender's result
    reported: tuple[ResultType, ...]  # result types recorded in the store for TLS-RPT
    attacker_sessions: int
    attacker_stripped: bool  # the attacker deleted STARTTLS from an EHLO reply it forwarded
    attacker_read_password: bool  # the password line is in the attacker's plain-text records
    attacker_saw_envelope: bool  # MAIL FROM or RCPT TO is in those records
    received: bool  # a receiver has the message
    received_tls: str | None  # the TLS version it arrived over; None: plain text or not at all
    verified: str | None  # how the sender authenticated the receiver: dane-ee, pkix, ...
    outcome: MessageFate
    ok: bool
    why: str  # what a secure sender does for this defence, and whether that happened

    def to_json(self) -> dict[str, Any]:
        return {
            "defence": self.defence,
            "domain": self.domain,
            "expect": self.expect.value,
            "attack": self.attack,
            "policy": self.policy,
            "policy_cached": self.policy_cached,
            "status": self.status.value,
            "result_type": self.result_type.value if self.result_type else None,
            "reported": [t.value for t in self.reported],
            "attacker": {
                "sessions": self.attacker_sessions,
                "stripped": self.attacker_stripped,
                "read_password": self.attacker_read_password,
                "saw_envelope": self.attacker_saw_envelope,
            },
            "receiver": {
                "received": self.received,
                "tls": self.received_tls is not None,
                "tls_version": self.received_tls,
            },
            "verified": self.verified,
            "outcome": self.outcome.value,
            "ok": self.ok,
            "why": self.why,
        }


@dataclass(frozen=True)
class ActResult:
    act: Act
    title: str
    rows: tuple[Row, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "act": self.act.value,
            "title": self.title,
            "ok": self.ok,
            "rows": [r.to_json() for r in self.rows],
        }


@dataclass(frozen=True)
class EhloComparison:
    """One MX host's EHLO reply, read directly from the receiver and through the attacker."""

    host: str
    honest: str  # reply lines joined by spaces, exactly as received
    stripped: str

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "honest": self.honest, "stripped": self.stripped}


@dataclass(frozen=True)
class DemoResult:
    ehlo: EhloComparison
    acts: tuple[ActResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.acts)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "ehlo": self.ehlo.to_json(),
            "acts": [a.to_json() for a in self.acts],
        }


# --- judging one row --------------------------------------------------------------------------


def classify(
    *, received: bool, received_tls: bool, verified: bool, reported: bool, attacker_read: bool
) -> MessageFate:
    """The outcome of one message from what the receiver, the attacker and the store show."""
    if not received:
        return MessageFate.REFUSED_LEAKED if attacker_read else MessageFate.REFUSED
    if reported:
        return MessageFate.REPORTED
    if not received_tls:
        return MessageFate.LEAKED if attacker_read else MessageFate.PLAIN
    return MessageFate.VERIFIED if verified else MessageFate.UNVERIFIED


def judge(
    expect: Expect, outcome: MessageFate, *, attacker_read: bool, interfered: bool, reported: bool
) -> tuple[bool, str]:
    """Whether the sender did what a secure sender must for this defence, and why (or why not)."""
    delivered = outcome not in (MessageFate.REFUSED, MessageFate.REFUSED_LEAKED)
    if expect is Expect.OPPORTUNISTIC:
        if delivered:
            return True, "no policy: an opportunistic sender delivers, and cannot tell"
        return False, "no policy, yet the message was not delivered"
    if expect is Expect.REPORT_ONLY:
        # RFC 8461 §5: in testing mode failures are reported but mail is still delivered.
        if not delivered:
            return False, "a testing policy must not stop delivery"
        if interfered and not reported:
            return False, "the attacker interfered and no failure was recorded for TLS-RPT"
        return True, "testing mode: delivered" + (", failure reported" if reported else "")
    if attacker_read:
        return False, "a protected message was READ by the attacker"
    if outcome in (MessageFate.REFUSED, MessageFate.VERIFIED):
        how = "refused" if outcome is MessageFate.REFUSED else "verified TLS"
        return True, f"protected: {how}"
    return False, f"a protected message was {outcome.value}"
