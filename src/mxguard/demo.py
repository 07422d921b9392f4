"""The STRIPTLS demonstration: one attacker, every defence, side by side (docs/design.md).

The demo runs the lab (or uses one it is given), puts the on-path attacker in front of the MX
hosts of one domain per defence into ``strip`` mode (RFC 3207 §4: the sender only upgrades
when the EHLO reply offers STARTTLS, so deleting that line is enough), and sends each domain a
message carrying a password-like line with mxguard's own ``Sender``. Then it looks at what
happened, never at what should have happened:

- the attacker's records: did the password cross the wire in plain text?
- the receivers' mailboxes: did the message arrive, and over TLS or not?
- the sender's result and the TLS-RPT session results in the store (RFC 8460 §4): which
  failure was recorded for the domain's daily report?

From these it derives each row's outcome and whether the sender behaved as a secure sender
must: an opportunistic sender delivers (and the attacker reads it: that is the attack), a
report-only MTA-STS policy delivers and reports the failure (RFC 8461 §5), and every
protecting defence (local rule, MTA-STS enforce RFC 8461 §4.2, DANE RFC 7672 §2.2, the static
list) either refuses or delivers over verified TLS, and never lets the attacker read the mail.

Acts: ``strip`` (the attack), ``honest`` (the attacker passes traffic unchanged: every policy
delivers over verified TLS) and ``tofu`` (RFC 8461 §5.1 trust on first use: the MTA-STS policy
was cached in the first act; now the attacker also deletes the ``_mta-sts`` TXT record and
breaks the policy host's HTTPS, and the cached policy still refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxguard import config
from mxguard.adapters.smtp import SmtpClient, SmtpError
from mxguard.engine.context import Engine, engine
from mxguard.engine.deliver import DeliveryResult, DomainResult, message_with_headers
from mxguard.lab.attacker import AttackSession
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode, CertKind, DnsAttack, Domain, Scenario, named

DEFAULT_NET = "127.76"  # not `mxguard lab up`'s 127.77: both may run at once
EHLO_DOMAIN = "nopolicy.test"  # whose MX host's EHLO reply is shown honest and stripped
MAIL_FROM = "alice@sender.test"
# One Sender step that stalls longer than this is stalled: the lab is local.
SMTP_TIMEOUT = 10.0


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


class Outcome(enum.StrEnum):
    """What happened to one message, as observed at the receiver and the attacker."""

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
    status: str  # the sender's verdict: delivered | deferred | failed
    result_type: str | None  # RFC 8460 result type of the sender's result
    reported: tuple[str, ...]  # result types recorded in the store for TLS-RPT
    attacker_sessions: int
    attacker_stripped: bool  # the attacker deleted STARTTLS from an EHLO reply it forwarded
    attacker_read_password: bool  # the password line is in the attacker's plain-text records
    attacker_saw_envelope: bool  # MAIL FROM or RCPT TO is in those records
    received: bool  # a receiver has the message
    received_tls: str | None  # the TLS version it arrived over; None: plain text or not at all
    verified: str | None  # how the sender authenticated the receiver: dane-ee, pkix, ...
    outcome: Outcome
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
            "status": self.status,
            "result_type": self.result_type,
            "reported": list(self.reported),
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
) -> Outcome:
    """The outcome of one message from what the receiver, the attacker and the store show."""
    if not received:
        return Outcome.REFUSED_LEAKED if attacker_read else Outcome.REFUSED
    if reported:
        return Outcome.REPORTED
    if not received_tls:
        return Outcome.LEAKED if attacker_read else Outcome.PLAIN
    return Outcome.VERIFIED if verified else Outcome.UNVERIFIED


def judge(
    expect: Expect, outcome: Outcome, *, attacker_read: bool, interfered: bool, reported: bool
) -> tuple[bool, str]:
    """Whether the sender did what a secure sender must for this defence, and why (or why not)."""
    delivered = outcome not in (Outcome.REFUSED, Outcome.REFUSED_LEAKED)
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
    if outcome in (Outcome.REFUSED, Outcome.VERIFIED):
        return True, "protected: " + ("refused" if outcome is Outcome.REFUSED else "verified TLS")
    return False, f"a protected message was {outcome.value}"


# --- the run ------------------------------------------------------------------------------


def demo_settings(lab: Lab, store_url: str) -> config.Settings:
    """Settings that point at ``lab`` (from the config file it writes) and at ``store_url``."""
    return config.load(lab.config_file).with_overrides(store=store_url)


def _secret() -> str:
    return f"password: hunter2-{secrets.token_hex(6)}"


def _message(rcpt: str, secret: str) -> bytes:
    body = "\r\n".join(
        [
            "Hi Bob,",
            "",
            "the new VPN login, as promised:",
            "",
            "user: alice",
            secret,
            "",
            "Alice",
        ]
    )
    return message_with_headers(MAIL_FROM, [rcpt], body)


def _ehlo_line(client: SmtpClient) -> str:
    """The raw lines of the first EHLO reply in ``client``'s transcript, joined by spaces."""
    lines: list[str] = []
    in_reply = False
    for entry in client.transcript:
        if entry.direction == "C":
            if in_reply:
                break
            in_reply = entry.text.upper().startswith("EHLO ")
        elif entry.direction == "S" and in_reply:
            lines.append(entry.text)
    return " ".join(lines)


async def read_ehlo(address: str, port: int, helo_name: str) -> str:
    """Connect, read the EHLO reply, quit: the reply as one line, or why there was none."""
    async with SmtpClient() as client:
        try:
            await client.connect(address, port, helo_name=helo_name, timeout=SMTP_TIMEOUT)
            await client.quit()
        except SmtpError as exc:
            return f"(no EHLO reply: {exc})"
        return _ehlo_line(client)


async def compare_ehlo(lab: Lab, host: str, helo_name: str) -> EhloComparison:
    """Two real sessions with ``host``: straight to its receiver, and through the attacker."""
    receiver = lab.receiver(host)
    attacker = lab.attacker(host)
    honest = await read_ehlo(receiver.address, receiver.port, helo_name)
    before = attacker.mode
    lab.set_attack(host, AttackMode.STRIP)
    try:
        stripped = await read_ehlo(lab.address_of(host), lab.ports.smtp, helo_name)
    finally:
        lab.set_attack(host, before)
    return EhloComparison(host, honest, stripped)


def _host_names(lab: Lab, domain: str) -> list[str]:
    return [h.name for h in lab.scenario.domain(domain).hosts]


async def run_case(e: Engine, lab: Lab, case: Case) -> Row:
    """Send one message to ``case.domain`` under the lab's current attack modes and judge it."""
    if case.domain not in {d.name for d in lab.scenario.domains}:
        raise DemoError(f"the lab's scenario {lab.scenario.name!r} has no domain {case.domain}")
    hosts = _host_names(lab, case.domain)
    seen = {h: len(lab.attacker(h).sessions) for h in hosts}
    secret = _secret()
    rcpt = f"bob@{case.domain}"
    start = dt.datetime.now(dt.UTC)
    sender = e.sender()
    sender.timeout = SMTP_TIMEOUT
    result = await sender.deliver(MAIL_FROM, [rcpt], _message(rcpt, secret))
    end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)

    sessions: list[AttackSession] = [s for h in hosts for s in lab.attacker(h).sessions[seen[h] :]]
    needle = secret.encode()
    attacker_read = any(needle in s.client_bytes for s in sessions)
    saw_envelope = any(
        b"MAIL FROM:" in s.client_bytes.upper() or b"RCPT TO:" in s.client_bytes.upper()
        for s in sessions
    )
    interfered = any(s.stripped or s.refused or s.intercepted for s in sessions)

    messages = [m for r in list(lab.receivers.values()) for m in r.messages if needle in m.data]
    received = bool(messages)
    tls_versions = [m.tls_version or "TLS" for m in messages if m.tls]
    received_tls = tls_versions[0] if tls_versions and len(tls_versions) == len(messages) else None

    d = _domain_result(result, case.domain)
    delivering = [a for a in d.attempts if a.delivered]
    verified = delivering[0].verified if delivering else None
    recorded = [
        r
        for r in await e.store.results_between(start, end, unreported_only=False)
        if r.policy_domain == case.domain and r.result_type is not None
    ]
    reported = tuple(dict.fromkeys(str(r.result_type) for r in recorded))

    outcome = classify(
        received=received,
        received_tls=received_tls is not None,
        verified=verified is not None,
        reported=bool(reported),
        attacker_read=attacker_read,
    )
    ok, why = judge(
        case.expect,
        outcome,
        attacker_read=attacker_read,
        interfered=interfered,
        reported=bool(reported),
    )
    policy = d.policy
    return Row(
        defence=case.defence,
        domain=case.domain,
        expect=case.expect,
        attack=", ".join(sorted({s.mode.value for s in sessions})) or "no connection",
        policy=f"{policy.source.value}/{policy.mode.value}" if policy else "none",
        policy_cached=bool(policy and policy.mta_sts and policy.mta_sts.from_cache),
        status=d.status.value,
        result_type=d.result_type.value if d.result_type else None,
        reported=reported,
        attacker_sessions=len(sessions),
        attacker_stripped=any(s.stripped for s in sessions),
        attacker_read_password=attacker_read,
        attacker_saw_envelope=saw_envelope,
        received=received,
        received_tls=received_tls,
        verified=verified,
        outcome=outcome,
        ok=ok,
        why=why,
    )


def _domain_result(result: DeliveryResult, domain: str) -> DomainResult:
    for d in result.domains:
        if d.domain == domain:
            return d
    raise DemoError(f"the sender returned no result for {domain}")  # a bug, not an outcome


@contextlib.contextmanager
def _attack(lab: Lab, domains: Sequence[str], mode: AttackMode) -> Iterator[None]:
    """Every MX host of ``domains`` behind an attacker in ``mode``; the old modes afterwards."""
    before = {h: lab.attacker(h).mode for d in domains for h in _host_names(lab, d)}
    try:
        for h in before:
            lab.set_attack(h, mode)
        yield
    finally:
        for h, m in before.items():
            lab.set_attack(h, m)


@contextlib.contextmanager
def _policy_hidden(lab: Lab, domain: str) -> Iterator[None]:
    """The attacker deletes ``_mta-sts.<domain>`` TXT and breaks HTTPS to its policy host."""
    original = lab.scenario.domain(domain)
    if original.mta_sts is None:
        raise DemoError(f"{domain} publishes no MTA-STS policy to hide")
    hidden: Domain = dataclasses.replace(
        original,
        dns_attack=DnsAttack.DROP_STS_TXT,
        mta_sts=dataclasses.replace(original.mta_sts, cert=CertKind.UNTRUSTED),
    )
    lab.update_domain(hidden)
    try:
        yield
    finally:
        lab.update_domain(original)


async def run_demo(
    lab: Lab,
    *,
    acts: Sequence[Act] = tuple(Act),
    store_url: str | None = None,
    cases: Sequence[Case] = CASES,
) -> DemoResult:
    """Run the demo against a running ``lab``; what it changes is put back afterwards.

    ``store_url`` defaults to a fresh SQLite file, so every run starts with an empty MTA-STS
    cache (the ``tofu`` act relies on the ``strip`` act having filled it).
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mxguard-demo-") as tmp:
        url = store_url or f"sqlite:///{Path(tmp) / 'demo.db'}"
        settings = demo_settings(lab, url)
        ehlo_host = _host_names(lab, EHLO_DOMAIN)[0]
        ehlo = await compare_ehlo(lab, ehlo_host, settings.helo_name)
        results: list[ActResult] = []
        domains = [c.domain for c in cases]
        async with engine(settings) as e:
            for act in acts:
                rows: list[Row] = []
                if act is Act.TOFU:
                    with _attack(lab, [TOFU_CASE.domain], AttackMode.STRIP):
                        # RFC 8461 §5.1: the policy must be in the cache before it is hidden.
                        if Act.STRIP not in acts:
                            await e.resolver.resolve(TOFU_CASE.domain)
                        with _policy_hidden(lab, TOFU_CASE.domain):
                            rows.append(await run_case(e, lab, TOFU_CASE))
                else:
                    mode = AttackMode.STRIP if act is Act.STRIP else AttackMode.PASS
                    with _attack(lab, domains, mode):
                        for case in cases:
                            rows.append(await run_case(e, lab, case))
                results.append(ActResult(act, ACT_TITLES[act], tuple(rows)))
    return DemoResult(ehlo, tuple(results), time.monotonic() - started)


def demo_scenario() -> Scenario:
    """The scenario the demo starts when it is not given a lab: the standard one."""
    return named("standard")


def run(
    lab: Lab | None = None,
    *,
    net: str = DEFAULT_NET,
    workdir: Path | None = None,
    acts: Sequence[Act] = tuple(Act),
) -> DemoResult:
    """Run the demo: in ``lab`` when given, else in a lab of its own on ``net`` (stopped after)."""
    if lab is not None:
        return asyncio.run(run_demo(lab, acts=acts))
    with Lab(demo_scenario(), workdir=workdir, net=net) as own:
        return asyncio.run(run_demo(own, acts=acts))


__all__ = [
    "CASES",
    "DEFAULT_NET",
    "Act",
    "ActResult",
    "Case",
    "DemoError",
    "DemoResult",
    "EhloComparison",
    "Expect",
    "Outcome",
    "Row",
    "classify",
    "judge",
    "run",
    "run_demo",
]
