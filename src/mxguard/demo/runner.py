"""The STRIPTLS demonstration's run: the lab, the attacker's modes, one message per defence.

``run`` starts a lab of its own (or uses the one it is given); ``run_demo`` plays the acts
against a running lab. For each act it puts the on-path attacker in front of the MX hosts of
one domain per defence into the act's mode, sends each domain a message carrying a
password-like line with mxguard's own ``Sender``, and then looks at what happened, never at
what should have happened: the attacker's records, the receivers' mailboxes, the sender's
result and the TLS-RPT session results in the store (RFC 8460 §4). ``model.py`` turns that
into rows and judges them.

Touches the lab (attack modes, a domain's DNS and policy host during the ``tofu`` act; every
change is put back), an engine of its own on a fresh SQLite store, and SMTP sessions with the
lab's MX hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mxguard import config
from mxguard.adapters.smtp import SmtpClient, SmtpError
from mxguard.demo.model import (
    ACT_TITLES,
    CASES,
    TOFU_CASE,
    Act,
    ActResult,
    Case,
    DemoError,
    DemoResult,
    EhloComparison,
    Row,
    classify,
    judge,
)
from mxguard.engine.context import Engine, engine
from mxguard.engine.deliver import DeliveryResult, DomainResult, message_with_headers
from mxguard.lab.attacker import AttackSession
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode, CertKind, DnsAttack, Domain, Scenario, named
from mxguard.protocol.results import ResultType

DEFAULT_NET = "127.76"  # not `mxguard lab up`'s 127.77: both may run at once
EHLO_DOMAIN = "nopolicy.test"  # whose MX host's EHLO reply is shown honest and stripped
MAIL_FROM = "alice@sender.test"
# One Sender step that stalls longer than this is stalled: the lab is local.
SMTP_TIMEOUT = 10.0


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

    sessions = [s for h in hosts for s in lab.attacker(h).sessions[seen[h] :]]
    observed = _observe(lab, sessions, secret.encode())
    d = _domain_result(result, case.domain)
    reported = await _reported(e, case.domain, start, end)
    return _row(case, d, observed, reported)


@dataclass(frozen=True)
class _Observed:
    """What the attacker's records and the receivers' mailboxes show about one message."""

    sessions: tuple[AttackSession, ...]  # the attacker's sessions while it was sent
    attacker_read: bool  # the password line crossed the attacker in plain text
    saw_envelope: bool  # MAIL FROM or RCPT TO did
    interfered: bool  # the attacker stripped, refused or intercepted something
    received: bool
    received_tls: str | None  # the TLS version, when every copy arrived over TLS


def _observe(lab: Lab, sessions: Sequence[AttackSession], needle: bytes) -> _Observed:
    """What ``sessions`` and the receivers show about the message that contains ``needle``."""
    messages = [m for r in list(lab.receivers.values()) for m in r.messages if needle in m.data]
    tls_versions = [m.tls_version or "TLS" for m in messages if m.tls]
    return _Observed(
        sessions=tuple(sessions),
        attacker_read=any(needle in s.client_bytes for s in sessions),
        saw_envelope=any(
            b"MAIL FROM:" in s.client_bytes.upper() or b"RCPT TO:" in s.client_bytes.upper()
            for s in sessions
        ),
        interfered=any(s.stripped or s.refused or s.intercepted for s in sessions),
        received=bool(messages),
        received_tls=(
            tls_versions[0] if tls_versions and len(tls_versions) == len(messages) else None
        ),
    )


async def _reported(
    e: Engine, domain: str, start: dt.datetime, end: dt.datetime
) -> tuple[ResultType, ...]:
    """The result types recorded in the store for ``domain``'s TLS-RPT between the times."""
    recorded = [
        r.result_type
        for r in await e.store.results_between(start, end, unreported_only=False)
        if r.policy_domain == domain and r.result_type is not None
    ]
    return tuple(dict.fromkeys(recorded))


def _row(case: Case, d: DomainResult, seen: _Observed, reported: tuple[ResultType, ...]) -> Row:
    """The row for ``case`` from what the sender, the attacker and the receivers showed."""
    delivering = [a for a in d.attempts if a.delivered]
    verified = delivering[0].verified if delivering else None
    outcome = classify(
        received=seen.received,
        received_tls=seen.received_tls is not None,
        verified=verified is not None,
        reported=bool(reported),
        attacker_read=seen.attacker_read,
    )
    ok, why = judge(
        case.expect,
        outcome,
        attacker_read=seen.attacker_read,
        interfered=seen.interfered,
        reported=bool(reported),
    )
    policy = d.policy
    return Row(
        defence=case.defence,
        domain=case.domain,
        expect=case.expect,
        attack=", ".join(sorted({s.mode.value for s in seen.sessions})) or "no connection",
        policy=f"{policy.source.value}/{policy.mode.value}" if policy else "none",
        policy_cached=bool(policy and policy.mta_sts and policy.mta_sts.from_cache),
        status=d.status,
        result_type=d.result_type,
        reported=reported,
        attacker_sessions=len(seen.sessions),
        attacker_stripped=any(s.stripped for s in seen.sessions),
        attacker_read_password=seen.attacker_read,
        attacker_saw_envelope=seen.saw_envelope,
        received=seen.received,
        received_tls=seen.received_tls,
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
