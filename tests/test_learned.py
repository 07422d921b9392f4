"""Learned security levels, as specifications without a network (docs/learned.md): the level of
a session, drops, decay, floors and their defer window, the stripping alarm over its window,
the `[learned]` configuration, and how precedence applies a learned floor (weaker than every
published policy and local rule, never lowering anything). The lab tests
(tests/test_learned_lab.py, tests/test_learned_postfix_integration.py) check the same against
real peers."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.adapters.dns import DnssecStatus
from mxguard.adapters.store import LearnedHost, LevelDrop, open_store
from mxguard.config import ConfigError
from mxguard.engine.policy import Auth, DeliveryPolicy, Mode, MxPolicy, Source, Status, Tls
from mxguard.engine.precedence import apply_learned
from mxguard.learned import model
from mxguard.learned.config import AfterWindow, LearnedSettings, parse
from mxguard.learned.config import Mode as LMode
from mxguard.learned.learner import Learner, level_of_postfix_trust
from mxguard.learned.model import FloorState, LearnedFloor, Observation
from mxguard.postfix.answers import policy_answer
from mxguard.protocol.levels import SecurityLevel
from mxguard.protocol.results import ResultType

L = SecurityLevel
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
HOUR, DAY = dt.timedelta(hours=1), dt.timedelta(days=1)
D, MX, IP = "example.test", "mx1.example.test", "192.0.2.1"
STRIP = ResultType.STARTTLS_NOT_SUPPORTED


def row(level: SecurityLevel = L.TLS, *, last: dt.datetime = NOW - HOUR, **kw: Any) -> LearnedHost:
    base = LearnedHost(D, MX, IP, level, last - DAY, last, 5)
    return replace(base, **kw)


def drop(at: dt.datetime = NOW, **kw: Any) -> LevelDrop:
    return replace(LevelDrop(at, D, MX, IP, L.TLS, L.PLAIN, STRIP), **kw)


# --- the level of one session ------------------------------------------------------------------

LEVEL_ROWS = [
    ("no_tls_is_plain", dict(tls=False, verified="pkix"), L.PLAIN),
    ("dane_ee_is_dane", dict(tls=True, verified="dane-ee"), L.DANE),
    ("dane_ta_is_dane", dict(tls=True, verified="dane-ta"), L.DANE),
    ("pkix_is_webpki", dict(tls=True, verified="pkix"), L.WEBPKI),
    ("unchecked_chain_the_webpki_accepts_is_webpki",
     dict(tls=True, verified=None, webpki=lambda: True), L.WEBPKI),
    ("unchecked_chain_it_refuses_is_tls", dict(tls=True, verified=None, webpki=lambda: False),
     L.TLS),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "kw", "want"), LEVEL_ROWS, ids=[r[0] for r in LEVEL_ROWS])
def test_session_level(rule: str, kw: dict[str, Any], want: SecurityLevel) -> None:
    assert model.session_level(**kw) is want


@pytest.mark.parametrize(
    ("trust", "dane", "want"),
    [(None, False, L.PLAIN), ("Anonymous", False, L.TLS), ("Untrusted", False, L.TLS),
     ("Trusted", False, L.TLS), ("Verified", False, L.WEBPKI), ("Verified", True, L.DANE)],
)  # fmt: skip
def test_level_of_a_postfix_session_from_its_trust_word(
    trust: str | None, dane: bool, want: SecurityLevel
) -> None:
    assert level_of_postfix_trust(trust, dane_policy=dane) is want


def test_levels_are_ordered_plain_tls_webpki_dane() -> None:
    assert [lv.rank for lv in (L.PLAIN, L.TLS, L.WEBPKI, L.DANE)] == [0, 1, 2, 3]
    assert all(SecurityLevel.from_rank(lv.rank) is lv for lv in SecurityLevel)


# --- drops ---------------------------------------------------------------------------------------

levels = st.sampled_from(list(SecurityLevel))


@given(learned=levels, seen=levels, by_name=st.booleans())
def test_a_drop_is_exactly_a_session_below_the_level_learned_for_its_host_or_address(
    learned: SecurityLevel, seen: SecurityLevel, by_name: bool
) -> None:
    # The same host reached by name (another address) or at the same address (renamed).
    o = Observation(MX, "192.0.2.99", seen) if by_name else Observation("mx9.test", IP, seen)
    found = model.drops(D, [o], [row(learned)], now=NOW)
    assert bool(found) == (seen.rank < learned.rank)
    if found:
        assert (found[0].learned, found[0].seen) == (learned, seen)


@given(learned=levels, seen=levels)
def test_a_host_that_never_carried_a_level_never_drops(
    learned: SecurityLevel, seen: SecurityLevel
) -> None:
    o = Observation("mx-new.example.test", "198.51.100.1", seen)
    assert model.drops(D, [o], [row(learned)], now=NOW) == []


def test_first_contact_is_no_drop() -> None:
    assert model.drops(D, [Observation(MX, IP, L.PLAIN, STRIP)], [], now=NOW) == []


def test_a_decayed_row_counts_for_nothing() -> None:
    rows = [row(L.WEBPKI, last=NOW - 10 * DAY), row(L.TLS, mx="mx2.example.test", ip="192.0.2.2")]
    assert model.fresh(rows, now=NOW, decay=(9 * DAY).total_seconds()) == rows[1:]
    assert model.fresh(rows, now=NOW, decay=(11 * DAY).total_seconds()) == rows


@pytest.mark.parametrize(
    ("learned", "seen", "stripped"),
    [(L.TLS, L.PLAIN, True), (L.DANE, L.PLAIN, True), (L.WEBPKI, L.TLS, False),
     (L.PLAIN, L.PLAIN, False)],
)  # fmt: skip
def test_a_stripped_drop_is_tls_learned_and_none_seen(
    learned: SecurityLevel, seen: SecurityLevel, stripped: bool
) -> None:
    assert drop(learned=learned, seen=seen).stripped is stripped


# --- floors --------------------------------------------------------------------------------------

MXSET = [(MX, [IP])]
ENFORCE = LearnedSettings(mode=LMode.ENFORCE, defer_window=DAY.total_seconds())

# (rule, rows, mx set, settings, drops of the domain, alarm enforce, state, level)
FLOOR_ROWS: list[tuple[str, list[LearnedHost], Any, LearnedSettings, list[LevelDrop], bool,
                       FloorState, SecurityLevel | None]] = [
    ("nothing_learned_no_floor", [], MXSET, ENFORCE, [], False, FloorState.NONE, None),
    ("plain_learned_no_floor", [row(L.PLAIN)], MXSET, ENFORCE, [], False, FloorState.NONE,
     L.PLAIN),
    ("report_mode_reports", [row()], MXSET, LearnedSettings(), [], False, FloorState.REPORT,
     L.TLS),
    ("enforce_mode_enforces", [row()], MXSET, ENFORCE, [], False, FloorState.ENFORCE, L.TLS),
    ("within_the_window_still_enforced", [row()], MXSET, ENFORCE, [drop(NOW - 23 * HOUR)], False,
     FloorState.ENFORCE, L.TLS),
    ("after_the_window_bounce", [row(last=NOW - 2 * DAY)], MXSET, ENFORCE,
     [drop(NOW - 25 * HOUR)], False, FloorState.BOUNCE, L.TLS),
    ("after_the_window_deliver", [row(last=NOW - 2 * DAY)], MXSET,
     replace(ENFORCE, after_window=AfterWindow.DELIVER), [drop(NOW - 25 * HOUR)], False,
     FloorState.DELIVER, L.TLS),
    ("drops_before_the_level_was_seen_again_start_no_window", [row(last=NOW - HOUR)], MXSET,
     ENFORCE, [drop(NOW - 3 * DAY)], False, FloorState.ENFORCE, L.TLS),
    ("the_alarm_switches_report_to_enforce", [row()], MXSET, LearnedSettings(), [], True,
     FloorState.ENFORCE, L.TLS),
    ("a_domain_override_beats_the_global_mode", [row()], MXSET,
     LearnedSettings(domains={D: LMode.ENFORCE}), [], False, FloorState.ENFORCE, L.TLS),
    ("a_parent_override_covers_subdomains", [row()], MXSET,
     LearnedSettings(mode=LMode.ENFORCE, domains={"test": LMode.REPORT}), [], False,
     FloorState.REPORT, L.TLS),
    ("mx_set_moved_to_new_hosts_no_floor", [row()], [("mx-new.example.test", ["198.51.100.1"])],
     ENFORCE, [], False, FloorState.NONE, None),
    ("a_learned_host_still_listed_holds_the_domain", [row()],
     [("mx-new.example.test", ["198.51.100.1"]), (MX, [IP])], ENFORCE, [], False,
     FloorState.ENFORCE, L.TLS),
    ("decayed_no_floor", [row(last=NOW - 61 * DAY)], MXSET, ENFORCE, [], False, FloorState.NONE,
     None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "rows", "mxset", "settings", "drops", "alarm", "state", "level"),
    FLOOR_ROWS, ids=[r[0] for r in FLOOR_ROWS],
)  # fmt: skip
def test_floor(
    rule: str, rows: list[LearnedHost], mxset: Any, settings: LearnedSettings,
    drops: list[LevelDrop], alarm: bool, state: FloorState, level: SecurityLevel | None,
) -> None:  # fmt: skip
    f = model.floor(D, rows, mxset, settings=settings, now=NOW, domain_drops=drops,
                    alarm_enforce=alarm)  # fmt: skip
    assert (f.state, f.level) == (state, level)
    assert f.explanation()  # every state explains itself


# --- the stripping alarm -------------------------------------------------------------------------

ALARM = LearnedSettings(alarm_domains=3, alarm_window=900)


def test_enough_domains_losing_starttls_raise_one_alarm_naming_them_and_their_hosts() -> None:
    window = [drop(domain=f"d{n}.test", mx=f"mx.d{n}.test", ip=f"192.0.2.{n}") for n in (3, 1, 2)]
    alarm = model.alarm_due(window, settings=ALARM, now=NOW)
    assert alarm is not None and alarm.domains == ("d1.test", "d2.test", "d3.test")
    assert alarm.hosts == tuple(f"d{n}.test mx.d{n}.test [192.0.2.{n}]" for n in (1, 2, 3))


@given(
    n_domains=st.integers(1, 2),
    hosts=st.lists(st.integers(1, 200), min_size=1, max_size=30),
)
def test_fewer_domains_than_the_threshold_never_alarm_however_many_hosts(
    n_domains: int, hosts: list[int]
) -> None:
    window = [drop(domain=f"d{h % n_domains}.test", mx=f"mx{h}.test", ip=f"198.51.100.{h}")
              for h in hosts]  # fmt: skip
    assert model.alarm_due(window, settings=ALARM, now=NOW) is None


def test_drops_that_are_not_lost_tls_do_not_count_for_the_alarm() -> None:
    window = [drop(domain=f"d{n}.test", learned=L.WEBPKI, seen=L.TLS, result_type=None)
              for n in range(5)]  # fmt: skip
    assert model.alarm_due(window, settings=ALARM, now=NOW) is None


def test_the_alarm_is_raised_once_not_again_for_drops_before_it_was_cleared() -> None:
    async def body() -> None:
        store = await open_store("sqlite:///:memory:")
        clock = [NOW]
        learner = Learner(store, ALARM, clock=lambda: clock[0])
        try:
            for n in range(5):
                await learner.observe(f"d{n}.test", [Observation(MX, f"192.0.2.{n}", L.TLS)])
            stripped = [
                learner.observe(f"d{n}.test", [Observation(MX, f"192.0.2.{n}", L.PLAIN, STRIP)])
                for n in range(5)
            ]
            await asyncio.gather(*stripped)
            assert learner.counters.alarms == 1 and learner.counters.stripped == 5
            alarm = await learner.active_alarm()
            assert alarm is not None and len(alarm.domains) == 5  # the late ones were added
            assert (await learner.clear_alarm()) is not None
            clock[0] = NOW + dt.timedelta(seconds=1)
            assert await learner.check_alarm() is None  # the same drops: cleared is cleared
            assert await learner.active_alarm() is None
        finally:
            await store.close()

    asyncio.run(body())


# --- configuration -------------------------------------------------------------------------------


def test_the_learned_section_is_read_with_its_defaults() -> None:
    s = parse({"mode": "enforce", "domains": {"Bank.Example": "report"}, "alarm_enforce": True})
    assert (s.mode, dict(s.domains), s.alarm_enforce) == (
        LMode.ENFORCE, {"bank.example": LMode.REPORT}, True,
    )  # fmt: skip
    assert parse({}) == LearnedSettings()


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"mode": "strict"}, "learned.mode"),
        ({"after_window": "drop"}, "learned.after_window"),
        ({"defer_window": -1}, "learned.defer_window"),
        ({"decay": "long"}, "learned.decay"),
        ({"alarm_domains": 1}, "learned.alarm_domains"),
        ({"alarm_window": True}, "learned.alarm_window"),
        ({"alarm_enforce": "yes"}, "learned.alarm_enforce"),
        ({"domains": {"a..b": "enforce"}}, "learned.domains"),
        ({"domains": {"ok.example": "loud"}}, "ok.example"),
        ({"modes": "report"}, "modes"),
    ],
)
def test_a_bad_learned_setting_is_an_error_naming_the_key(data: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse(data)


# --- precedence: a learned floor never lowers anything -------------------------------------------


def policy(
    *hosts: MxPolicy, source: Source = Source.NONE, mode: Mode = Mode.NONE
) -> DeliveryPolicy:
    return DeliveryPolicy(
        D, source, mode, Status.OK, mx=hosts or (MxPolicy(MX, 10, addresses=(IP,)),)
    )


def learned(state: FloorState, level: SecurityLevel = L.TLS, **kw: Any) -> LearnedFloor:
    return LearnedFloor(D, level, state, LMode.ENFORCE, (row(level),), **kw)


OPEN = MxPolicy(MX, 10, addresses=(IP,))
TESTING = replace(OPEN, report_only=True, source=Source.MTA_STS)
STS = replace(OPEN, tls=Tls.REQUIRED, auth=Auth.PKIX, source=Source.MTA_STS)
DANE = replace(OPEN, tls=Tls.REQUIRED, auth=Auth.DANE, source=Source.DANE,
               dnssec=DnssecStatus.SECURE)  # fmt: skip
FORBIDDEN = replace(OPEN, allowed=False, source=Source.MTA_STS)

# (rule, host, floor, (tls, auth, report_only, source) afterwards)
APPLY_ROWS = [
    ("enforced_tls_requires_tls", OPEN, learned(FloorState.ENFORCE),
     (Tls.REQUIRED, Auth.NONE, False, Source.LEARNED)),
    ("enforced_webpki_requires_verified_tls", OPEN, learned(FloorState.ENFORCE, L.WEBPKI),
     (Tls.REQUIRED, Auth.PKIX, False, Source.LEARNED)),
    ("enforced_dane_without_tlsa_requires_tls_only", OPEN, learned(FloorState.ENFORCE, L.DANE),
     (Tls.REQUIRED, Auth.NONE, False, Source.LEARNED)),
    ("report_changes_nothing", OPEN, learned(FloorState.REPORT),
     (Tls.OPPORTUNISTIC, Auth.NONE, False, Source.NONE)),
    ("testing_is_raised_to_the_floor", TESTING, learned(FloorState.ENFORCE),
     (Tls.REQUIRED, Auth.NONE, False, Source.MTA_STS)),
    ("sts_enforce_is_never_lowered", STS, learned(FloorState.ENFORCE, L.TLS),
     (Tls.REQUIRED, Auth.PKIX, False, Source.MTA_STS)),
    ("dane_is_never_touched", DANE, learned(FloorState.ENFORCE, L.WEBPKI),
     (Tls.REQUIRED, Auth.DANE, False, Source.DANE)),
    ("deliver_after_the_window_lifts_the_floor", OPEN, learned(FloorState.DELIVER),
     (Tls.OPPORTUNISTIC, Auth.NONE, False, Source.NONE)),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "host", "floor", "want"), APPLY_ROWS,
                         ids=[r[0] for r in APPLY_ROWS])  # fmt: skip
def test_apply_learned(
    rule: str, host: MxPolicy, floor: LearnedFloor, want: tuple[Any, ...]
) -> None:
    got = apply_learned(policy(host), floor)
    m = got.mx[0]
    assert (m.tls, m.auth, m.report_only, m.source) == want
    assert got.learned is floor and floor.explanation() in got.explanation


_TLS_RANK = {Tls.OPPORTUNISTIC: 0, Tls.REQUIRED: 1}
_AUTH_RANK = {Auth.NONE: 0, Auth.PKIX: 1, Auth.DANE: 2}


@given(
    tls=st.sampled_from(list(Tls)), auth=st.sampled_from(list(Auth)), report_only=st.booleans(),
    allowed=st.booleans(), state=st.sampled_from(list(FloorState)), level=levels,
)  # fmt: skip
def test_a_learned_floor_never_lowers_a_requirement_nor_allows_a_forbidden_host(
    tls: Tls, auth: Auth, report_only: bool, allowed: bool, state: FloorState,
    level: SecurityLevel,
) -> None:  # fmt: skip
    before = replace(OPEN, tls=tls, auth=auth, report_only=report_only, allowed=allowed)
    after = apply_learned(policy(before), learned(state, level)).mx[0]
    assert _TLS_RANK[after.tls] >= _TLS_RANK[before.tls]
    assert _AUTH_RANK[after.auth] >= _AUTH_RANK[before.auth]
    assert after.allowed == before.allowed and after.addresses == before.addresses
    assert not (after.report_only and not before.report_only)


def test_bounce_after_the_window_fails_a_domain_that_would_go_in_plain_text_only() -> None:
    assert apply_learned(policy(OPEN), learned(FloorState.BOUNCE)).status is Status.FAIL
    assert apply_learned(policy(STS), learned(FloorState.BOUNCE)).status is Status.OK


def test_unreadable_levels_defer_an_enforced_domain_and_are_only_noted_in_report_mode() -> None:
    broken = LearnedFloor(D, None, FloorState.NONE, LMode.ENFORCE, error="database is locked")
    got = apply_learned(policy(OPEN), broken)
    assert got.status is Status.DEFER and got.mx[0].defer is not None
    assert "database is locked" in got.mx[0].defer.detail
    assert got.mx[0].defer.reported_type is None  # no TLS negotiation failed
    noted = apply_learned(policy(OPEN), replace(broken, mode=LMode.REPORT))
    assert noted.status is Status.OK and noted.mx[0] == OPEN
    assert any("database is locked" in line for line in noted.explanation)


@pytest.mark.parametrize(
    ("level", "state", "answer"),
    [(L.TLS, FloorState.ENFORCE, "OK encrypt"),
     (L.WEBPKI, FloorState.ENFORCE, "OK secure match=hostname servername=hostname"),
     (L.TLS, FloorState.BOUNCE, "OK encrypt"),
     (L.TLS, FloorState.REPORT, "NOTFOUND ")],
)  # fmt: skip
def test_serve_postfix_answers_a_learned_floor(
    level: SecurityLevel, state: FloorState, answer: str
) -> None:
    got = policy_answer(apply_learned(policy(OPEN), learned(state, level)))
    assert got.socketmap().decode() == answer


# --- the commands --------------------------------------------------------------------------------


def test_learned_show_forget_clear_alarm_and_status_over_one_store(tmp_path: Any) -> None:
    import json

    from click.testing import CliRunner

    from mxguard.adapters.store import LevelSeen, StrippingAlarm
    from mxguard.cli import main

    url = f"sqlite://{tmp_path / 'state.db'}"
    now = dt.datetime.now(dt.UTC)

    async def fill() -> None:
        store = await open_store(url)
        try:
            await store.learn([LevelSeen(D, MX, IP, L.WEBPKI, now),
                               LevelSeen("other.test", "mx.other.test", IP, L.TLS, now)],
                              stale_before=now - DAY)  # fmt: skip
            await store.add_drops([drop(now)])
            await store.raise_alarm(StrippingAlarm(now, (D,), (f"{D} {MX} [{IP}]",), 900, True))
        finally:
            await store.close()

    asyncio.run(fill())

    def cli(*args: str) -> Any:
        result = CliRunner().invoke(main, ["--store", url, "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    shown = cli("learned", "show", D)
    assert [(r["mx"], r["level"], r["seen"], r["decayed"]) for r in shown] == [
        (MX, "webpki", 1, False)
    ]
    status = cli("status")
    assert status["alarm_active"] and status["learned"]["enforced"]
    assert status["alarm"]["domains"] == [D] and status["drops"]["stripped"] == 1
    assert status["learned"]["domains"] == 2
    assert cli("learned", "forget", "EXAMPLE.test.") == {"domain": D, "forgotten": 1}
    assert cli("learned", "show", D) == []
    assert [r["domain"] for r in cli("learned", "show")] == ["other.test"]
    assert cli("learned", "clear-alarm")["cleared"] is True
    assert cli("learned", "clear-alarm") == {"cleared": False, "alarm": None}
    after = cli("status")
    assert not after["alarm_active"] and after["alarm"]["cleared_at"] is not None
    assert after["drops"]["count"] == 0  # forgetting a domain forgets its drops


def test_a_bad_learned_section_stops_every_command_naming_the_key(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from mxguard.cli import main

    cfg = tmp_path / "mxguard.toml"
    cfg.write_text('[learned]\nmode = "strict"\n', encoding="utf-8")
    result = CliRunner().invoke(
        main, ["--config", str(cfg), "--store", "sqlite:///:memory:", "status"]
    )
    assert result.exit_code == 2 and "learned.mode" in result.output


@pytest.mark.parametrize(("published", "level"), [(False, "WARNING"), (True, "INFO")])
def test_a_drop_is_a_warning_unless_a_published_policy_already_decides(
    published: bool, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> list[LevelDrop]:
        store = await open_store("sqlite:///:memory:")
        learner = Learner(store, clock=lambda: NOW)
        try:
            await learner.observe(D, [Observation(MX, IP, L.TLS)])
            return await learner.observe(
                D, [Observation(MX, IP, L.PLAIN, STRIP)], published=published
            )
        finally:
            await store.close()

    caplog.set_level(logging.INFO, logger="mxguard.learned")
    assert len(asyncio.run(body())) == 1  # recorded either way
    assert [r.levelname for r in caplog.records if "level drop" in r.getMessage()] == [level]


def test_a_burst_of_floors_reads_the_alarm_once_and_an_alarm_from_elsewhere_soon_applies(
    tmp_path: Any,
) -> None:
    from mxguard.learned import learner as learner_module

    settings = replace(ALARM, alarm_enforce=True)
    url = f"sqlite:///{tmp_path / 'state.db'}"

    async def body() -> None:
        here, there = await open_store(url), await open_store(url)  # two processes' stores
        reads = [0]
        latest = here.latest_alarm

        async def counted() -> Any:
            reads[0] += 1
            return await latest()

        here.latest_alarm = counted  # type: ignore[method-assign]
        ticks = [0.0]
        mine = Learner(here, settings, clock=lambda: NOW)
        mine.monotonic = lambda: ticks[0]
        other = Learner(there, settings, clock=lambda: NOW)
        mx_set = [(MX, ("192.0.2.1",))]
        try:
            await asyncio.gather(*(mine.floor(f"d{n}.test", mx_set) for n in range(20)))
            assert reads[0] == 1  # twenty resolutions at once: one read
            # The other process raises the alarm (it saw enough domains lose STARTTLS).
            for n in range(3):
                await other.observe(f"d{n}.test", [Observation(MX, f"192.0.2.{n}", L.TLS)])
                await other.observe(f"d{n}.test", [Observation(MX, f"192.0.2.{n}", L.PLAIN, STRIP)])
            assert other.counters.alarms == 1
            await mine.floor("d0.test", mx_set)
            assert reads[0] == 1  # still within ALARM_READ_FRESH of the first read
            ticks[0] += learner_module.ALARM_READ_FRESH
            floor = await mine.floor("d0.test", [(MX, ("192.0.2.0",))])
            assert reads[0] == 2
            assert floor.mode is LMode.ENFORCE  # the alarm applies here now
            await mine.clear_alarm()  # this process's own change: seen at once
            floor = await mine.floor("d0.test", [(MX, ("192.0.2.0",))])
            assert reads[0] == 3 and floor.mode is LMode.REPORT
        finally:
            await here.close()
            await there.close()

    asyncio.run(body())
