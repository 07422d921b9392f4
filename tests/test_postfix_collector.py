"""`mxguard tlsrpt collect-postfix`: which sessions become results, and against the log of a
real Postfix (issue 6 acceptance).

The first tests feed the collector log lines in Postfix 3.7's formats, with policies given
by hand: what is kept (sessions to an MX host of the recipient domain), what is dropped and
counted, what a result may say. The lab tests below them use a real Postfix. The independent
count: the lab's STRIPTLS attacker sits in front of every MX host and records
every TCP connection it proxies (`Delivery.attacked`, only connections from Postfix's own
address, records cleared before each case). Each such connection is one SMTP session that
Postfix really made (RFC 8460 §4: sessions are what count). The collector, reading only
Postfix's log, must find exactly as many sessions per delivery, with the result types below.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from mxguard.adapters.store import SessionResult
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.config import load
from mxguard.engine.context import engine
from mxguard.engine.policy import DeliveryPolicy, Mode, MxPolicy, Source, Status
from mxguard.lab.lab import Lab
from mxguard.tlsrpt import collector as module
from mxguard.tlsrpt.collector import (
    BAD_DOMAIN,
    MX_UNKNOWN,
    NOT_TO_MX,
    Collector,
    Counts,
    EnginePolicies,
    ReportPolicy,
    State,
    report_policy,
)

pytest.register_assert_rewrite("postfix_harness")

from postfix_harness import PostfixRun  # noqa: E402

pytest_plugins = ["postfix_harness"]

# --- which sessions are results (no lab) -------------------------------------------------

NOW = dt.datetime(2025, 11, 29, 12, 0, tzinfo=dt.UTC)
P = "Nov 29 11:10:06 gw postfix/smtp[{pid}]: "


def policy(
    domain: str, *mx: tuple[str, tuple[str, ...]], status: Status = Status.OK
) -> DeliveryPolicy:
    return DeliveryPolicy(
        domain=domain,
        source=Source.NONE,
        mode=Mode.NONE,
        status=status,
        mx=tuple(MxPolicy(host=h, preference=10, addresses=a) for h, a in mx),
    )


POLICIES = {
    "example.com": policy("example.com", ("mx.example.com", ("192.0.2.1", "2001:db8::25"))),
    "xn--bcher-kva.example": policy(
        "xn--bcher-kva.example", ("mx.xn--bcher-kva.example", ("192.0.2.3",))
    ),
    "broken.example": policy("broken.example", status=Status.DEFER),  # the MX lookup failed
}


async def by_hand(domain: str) -> ReportPolicy:
    """The policies above; any other domain: none (which the collector must not be asked)."""
    assert domain in POLICIES, f"asked for the policy of {domain!r}: not an A-label domain?"
    return report_policy(POLICIES[domain])


def sent(pid: int, rcpt: str, relay: str, qid: str = "ABCDE12345", reason: str = "250 ok") -> str:
    return (
        f"{P.format(pid=pid)}{qid}: to=<{rcpt}>, relay={relay}, delay=0.5, "
        f"delays=0/0/0/0.5, dsn=2.0.0, status=sent ({reason})"
    )


def verified(pid: int, peer: str) -> str:
    return f"{P.format(pid=pid)}Verified TLS connection established to {peer}:25: TLSv1.3 with x"


def run(
    tmp_path: Path,
    lines: list[str],
    policies: Callable[[str], Awaitable[ReportPolicy]] = by_hand,
    runs: int = 1,
) -> tuple[list[Counts], list[SessionResult]]:
    """The collector over `lines`, `runs` times; the counts of each run, the stored results."""
    log = tmp_path / "mail.log"
    log.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")

    async def go() -> tuple[list[Counts], list[SessionResult]]:
        store = await SQLiteStore.open(str(tmp_path / "s.db"))
        try:
            counts = []
            for _ in range(runs):
                c = Collector(log, store, policies, state_path=tmp_path / "state",
                              clock=lambda: NOW)  # fmt: skip
                counts.append(await c.collect())
            far = dt.timedelta(days=400)
            stored = await store.results_between(NOW - far, NOW + far, unreported_only=False)
            return counts, stored
        finally:
            await store.close()

    return asyncio.run(go())


# RFC 8460 §4: a result is a session to an MX host of the policy domain. Postfix's next hop
# is often not one: name -> (status line, kept, or why it is dropped)
NEXT_HOPS: dict[str, tuple[str, str | None]] = {
    "an MX host by name and address": (
        sent(1, "bob@example.com", "mx.example.com[192.0.2.1]:25"), None),
    "an MX host by name (address not in the resolved policy)": (
        sent(1, "bob@example.com", "MX.example.com.[198.51.100.9]:25"), None),
    "an MX host by address (IPv6, written another way)": (
        sent(1, "bob@example.com", "mx-v6.example.com[2001:DB8:0:0::25]:25"), None),
    "a content filter (amavis)": (
        sent(1, "bob@example.com", "127.0.0.1[127.0.0.1]:10024",
             reason="250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as XYZ"),
        NOT_TO_MX),
    "a relayhost": (sent(1, "bob@example.com", "smtp.isp.example[198.51.100.7]:587"), NOT_TO_MX),
    "postfix/relay to an internal server": (
        sent(1, "bob@example.com", "exchange.corp.example[10.0.0.5]:25").replace(
            "postfix/smtp", "postfix/relay"), NOT_TO_MX),
    "the MX lookup failed: not known to be an MX host": (
        sent(1, "bob@broken.example", "mx.broken.example[192.0.2.4]:25"), MX_UNKNOWN),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NEXT_HOPS))
def test_only_sessions_to_an_mx_host_of_the_recipient_domain_are_results(
    name: str, tmp_path: Path
) -> None:
    line, dropped = NEXT_HOPS[name]
    ((counts,), stored) = run(tmp_path, [line])
    if dropped is None:
        assert (counts.sessions, counts.dropped, len(stored)) == (1, {}, 1), name
        assert stored[0].policy_domain == "example.com"
    else:
        assert (counts.sessions, counts.dropped, stored) == (0, {dropped: 1}, []), name
        assert counts.to_json()["dropped"] == {dropped: 1}


def test_an_smtputf8_recipient_domain_is_recorded_as_a_labels_and_never_wedges(
    tmp_path: Path,
) -> None:
    lines = [
        verified(1, "mx.bücher.example[192.0.2.3]"),
        sent(1, "anna@bücher.example", "mx.bücher.example[192.0.2.3]:25"),
        sent(2, "x@[192.0.2.9]", "mx.example.com[192.0.2.1]:25", qid="BBBBB22222"),  # a literal
        sent(3, "y@bad..example", "mx.example.com[192.0.2.1]:25", qid="CCCCC33333"),
        sent(4, "bob@example.com", "mx.example.com[192.0.2.1]:25", qid="DDDDD44444"),
    ]
    (first, second), stored = run(tmp_path, lines, runs=2)
    assert sorted((r.policy_domain, r.receiving_mx) for r in stored) == [
        ("example.com", "mx.example.com"),
        ("xn--bcher-kva.example", "mx.xn--bcher-kva.example"),
    ]
    assert (first.sessions, first.dropped) == (2, {BAD_DOMAIN: 2})
    assert (second.lines, second.sessions) == (0, 0)  # the batch was committed, not retried


def test_a_result_the_store_refuses_is_skipped_not_the_batch(tmp_path: Path) -> None:
    async def odd(domain: str) -> ReportPolicy:
        good = await by_hand(domain)
        if domain != "xn--bcher-kva.example":
            return good
        return ReportPolicy("not-a-policy-type", (), (), (), good.mx_hosts, good.mx_addresses)

    lines = [
        sent(1, "anna@bücher.example", "mx.bücher.example[192.0.2.3]:25"),
        sent(2, "bob@example.com", "mx.example.com[192.0.2.1]:25", qid="DDDDD44444"),
    ]
    ((counts,), stored) = run(tmp_path, lines, policies=odd)
    assert [r.policy_domain for r in stored] == ["example.com"]
    assert counts.dropped == {BAD_DOMAIN: 1}


def test_the_detail_a_report_may_carry_holds_tls_facts_only(tmp_path: Path) -> None:
    lines = [
        f"{P.format(pid=1)}server certificate verification failed for "
        "mx.example.com[192.0.2.1]:25: untrusted issuer /CN=Evil CA",
        f"{P.format(pid=1)}Untrusted TLS connection established to mx.example.com[192.0.2.1]:25: "
        "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        f"{P.format(pid=1)}ABCDE12348: to=<alice.secret@example.com>, "
        "relay=mx.example.com[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=5.1.1, status=bounced "
        "(host mx.example.com[192.0.2.1] said: 550 5.1.1 <alice.secret@example.com>: Recipient "
        "address rejected: User unknown (in reply to RCPT TO command))",
    ]
    (_, (result,)) = run(tmp_path, lines)
    assert result.detail == (
        "Postfix: Untrusted TLS; the server answered with an error; "
        "certificate: certificate-not-trusted"
    )


class CountingResolver:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, domain: str) -> DeliveryPolicy:
        self.asked.append(domain)
        return POLICIES[domain]


@pytest.mark.parametrize(
    ("domain", "ttl_seconds"),
    [("example.com", 3600), ("broken.example", 60)],  # a deferred lookup is retried sooner
)
def test_policies_are_resolved_again_after_their_time_limit(domain: str, ttl_seconds: int) -> None:
    resolver = CountingResolver()
    now = [1000.0]
    policies = EnginePolicies(resolver, clock=lambda: now[0])

    async def ask_at(*offsets: float) -> int:
        for offset in offsets:
            now[0] = 1000.0 + offset
            await policies(domain)
        return len(resolver.asked)

    assert asyncio.run(ask_at(0, ttl_seconds - 1)) == 1
    assert asyncio.run(ask_at(ttl_seconds + 1)) == 2


# --- a real Postfix (the lab) --------------------------------------------------------------

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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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
