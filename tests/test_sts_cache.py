"""The MTA-STS cache against the lab (RFC 8461 §5): trust on first use, and what ends it.

Each test first lets the engine see a domain's policy, then has the lab (playing the attacker
or the domain owner) change DNS or the policy host, and checks what the next lookup decides
and how many fetches the policy host really served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxguard.adapters.dns import DnsResolver
from mxguard.adapters.store import Store, open_store
from mxguard.engine.policy import DeliveryPolicy
from mxguard.engine.resolve import Resolver
from mxguard.engine.sts import StsResolver
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import DnsAttack, MtaSts, PolicyBehaviour

pytestmark = pytest.mark.lab

DOMAIN = "sts-enforce.test"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = asyncio.run(open_store(f"sqlite:///{tmp_path / 'state.db'}"))
    yield s
    asyncio.run(s.close())


def engine(lab: Lab, store: Store, clock: Clock, *, backoff: float = 300) -> Resolver:
    dns = DnsResolver([lab.resolver])
    sts = StsResolver(
        dns, store, ca_file=lab.ca_file, https_port=lab.ports.https, fetch_timeout=3,
        backoff=backoff, clock=clock,
    )  # fmt: skip
    return Resolver(dns, sts, clock=clock)


def resolve(r: Resolver, domain: str = DOMAIN) -> DeliveryPolicy:
    return asyncio.run(r.resolve(domain))


def publish(lab: Lab, domain: str = DOMAIN, **changes: object) -> None:
    """The domain owner (or the attacker) changes the MTA-STS publication."""
    d = lab.scenario.domain(domain)
    assert d.mta_sts is not None
    mta_sts: MtaSts = dataclasses.replace(d.mta_sts, **changes)  # type: ignore[arg-type]
    lab.update_domain(dataclasses.replace(d, mta_sts=mta_sts))


def fetches(lab: Lab, domain: str = DOMAIN) -> int:
    return lab.policy_host(domain).fetches


def test_cached_policy_survives_the_attacker_removing_txt_and_breaking_https(
    lab: Lab, store: Store, clock: Clock
) -> None:
    r = engine(lab, store, clock)
    assert resolve(r).source == "mta-sts"
    lab.set_dns_attack(DOMAIN, DnsAttack.DROP_STS_TXT)
    publish(lab, behaviour=PolicyBehaviour.NOT_FOUND)
    p = resolve(r)
    assert (p.source, p.mode) == ("mta-sts", "enforce")
    assert p.mta_sts is not None and p.mta_sts.from_cache
    assert [m.auth for m in p.mx] == ["pkix", "pkix"]


def test_changed_id_triggers_a_refetch(lab: Lab, store: Store, clock: Clock) -> None:
    r = engine(lab, store, clock)
    resolve(r)
    resolve(r)
    assert fetches(lab) == 1  # same id: answered from the cache
    publish(lab, txt=("v=STSv1; id=second;",), mx=("mx1.sts-enforce.test",))
    p = resolve(r)
    assert fetches(lab) == 2
    assert p.mta_sts is not None and (p.mta_sts.id, p.mta_sts.from_cache) == ("second", False)
    assert [m.allowed for m in p.mx] == [True, False]  # the new policy's MX list applies


def test_fetch_failure_after_id_change_keeps_the_cached_policy_and_reports_it(
    lab: Lab, store: Store, clock: Clock
) -> None:
    r = engine(lab, store, clock)
    resolve(r)
    publish(lab, txt=("v=STSv1; id=second;",), behaviour=PolicyBehaviour.NOT_FOUND)
    p = resolve(r)
    assert (p.source, p.mode) == ("mta-sts", "enforce")
    assert p.mta_sts is not None and p.mta_sts.from_cache and p.mta_sts.id == "20261129T000000"
    assert [e.result_type for e in p.errors] == ["sts-policy-fetch-error"]


def test_mode_none_replaces_the_cached_policy(lab: Lab, store: Store, clock: Clock) -> None:
    r = engine(lab, store, clock)
    assert resolve(r).mode == "enforce"
    publish(lab, txt=("v=STSv1; id=withdrawn;",), mode="none")
    assert resolve(r).source == "none"
    cached = asyncio.run(store.get_policy(DOMAIN))
    assert cached is not None and "mode: none" in cached.policy_text
    # Even with the record gone, the withdrawn policy is what is remembered.
    lab.set_dns_attack(DOMAIN, DnsAttack.DROP_STS_TXT)
    assert resolve(r).source == "none"


def test_max_age_ends_the_cached_policy(lab: Lab, store: Store, clock: Clock) -> None:
    r = engine(lab, store, clock)
    resolve(r)
    lab.set_dns_attack(DOMAIN, DnsAttack.DROP_STS_TXT)
    clock.now += dt.timedelta(seconds=86400 - 60)
    assert resolve(r).source == "mta-sts"  # still within max_age
    clock.now += dt.timedelta(seconds=120)
    p = resolve(r)
    assert p.source == "none"
    assert asyncio.run(store.get_policy(DOMAIN)) is None


def test_policy_past_half_its_lifetime_is_refreshed_and_max_age_restarts(
    lab: Lab, store: Store, clock: Clock
) -> None:
    r = engine(lab, store, clock)
    first = resolve(r)
    clock.now += dt.timedelta(seconds=86400 * 0.6)
    second = resolve(r)
    assert fetches(lab) == 2
    assert first.mta_sts and second.mta_sts and second.mta_sts.expires_at
    assert second.mta_sts.expires_at == clock.now + dt.timedelta(seconds=86400)


def test_one_fetch_serves_all_concurrent_lookups(lab: Lab, store: Store, clock: Clock) -> None:
    r = engine(lab, store, clock)

    async def many() -> list[DeliveryPolicy]:
        return await asyncio.gather(*(r.resolve(DOMAIN) for _ in range(50)))

    results = asyncio.run(many())
    assert {p.source for p in results} == {"mta-sts"}
    assert fetches(lab) == 1


@pytest.mark.parametrize(("backoff", "expected"), [(300, 1), (0, 5)])
def test_failed_fetch_is_not_retried_during_the_backoff(
    lab: Lab, store: Store, clock: Clock, backoff: float, expected: int
) -> None:
    r = engine(lab, store, clock, backoff=backoff)
    for _ in range(5):
        p = resolve(r, "sts-404.test")
        assert [e.result_type for e in p.errors] == ["sts-policy-fetch-error"]
    assert fetches(lab, "sts-404.test") == expected


def test_dane_data_is_cached_for_its_dns_ttl(lab: Lab, store: Store, clock: Clock) -> None:
    dns = DnsResolver([lab.resolver], cache=True)
    sts = StsResolver(dns, store, ca_file=lab.ca_file, https_port=lab.ports.https)
    r = Resolver(dns, sts)
    first = asyncio.run(r.resolve("dane-ee.test"))
    sent = dns.queries
    second = asyncio.run(r.resolve("dane-ee.test"))
    assert dns.queries == sent  # everything came from the cache
    assert first.mx[0].tlsa == second.mx[0].tlsa
    assert dns.cache is not None
    _expiry, answer = dns.cache[("_25._tcp.mx.dane-ee.test", "TLSA")]
    assert 0 < answer.ttl <= 60  # the lab zone's TTL, not a fixed cache time


def test_prepare_builds_the_fetch_context_once_and_a_broken_ca_file_waits_for_the_fetch(
    tmp_path: Path,
) -> None:
    # serve postfix calls prepare() at start: its first cold lookup does not build the
    # context (reading and loading the system's roots); the fetch reuses what was built.
    from mxguard.adapters import https
    from mxguard.lab.pki import LabPKI

    pki = LabPKI(tmp_path / "pki")
    dns = DnsResolver([("127.0.0.1", 9)])

    async def body() -> None:
        store = await open_store("sqlite:///:memory:")
        try:
            sts = StsResolver(dns, store, ca_file=pki.ca_file)
            https._contexts.clear()
            sts.prepare()
            assert https.client_context(pki.ca_file) is next(iter(https._contexts.values()))
            assert len(https._contexts) == 1
            broken = tmp_path / "broken.pem"
            broken.write_text("not a certificate\n")
            StsResolver(dns, store, ca_file=broken).prepare()  # no exception: the fetch says
            failed = await https.fetch_policy("x.test", ca_file=broken, connect_to="127.0.0.1")
            assert not failed.ok and "CA file" in failed.detail
        finally:
            await store.close()

    asyncio.run(body())


def test_close_cancels_a_fetch_still_waiting_on_a_stalled_host(
    lab: Lab, store: Store, clock: Clock
) -> None:
    # The engine closes its MTA-STS resolver before the store: a fetch from a policy host
    # that accepts and never answers must not outlive it (nor the event loop).
    r = engine(lab, store, clock)

    async def body() -> None:
        lookup = asyncio.ensure_future(r.sts.lookup("sts-stall.test"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if r.sts._inflight:
                break
        (fetch,) = r.sts._inflight.values()
        await r.sts.close()
        assert fetch.cancelled()
        assert not r.sts._inflight
        lookup.cancel()
        await asyncio.gather(lookup, return_exceptions=True)

    asyncio.run(body())
