"""The lab resolver's TTL caps: a few seconds by default (a scenario switch reaches clients at
once), the zones' own TTLs when a benchmark lifts them (bench/postfix_policy.py), as a real
resolver would give them."""

from __future__ import annotations

import asyncio

import pytest

from mxguard.adapters.dns import DnsResolver
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import named
from mxguard.lab.zones import TTL

pytestmark = pytest.mark.lab


def _ttls(lab: Lab) -> tuple[int, int]:
    async def ask() -> tuple[int, int]:
        dns = DnsResolver([lab.resolver])
        try:
            found = await dns.query("mx.sts-enforce.test", "A")
            missing = await dns.query("mx.sts-enforce.test", "TXT")  # NODATA: SOA minimum
        finally:
            dns.close()
        return found.ttl, missing.ttl

    return asyncio.run(ask())


def test_the_lab_resolver_caps_ttls_unless_told_otherwise() -> None:
    scenario = named("standard")
    small = type(scenario)(
        name="ttls", tld=scenario.tld,
        domains=tuple(d for d in scenario.domains if d.name == "sts-enforce.test"),
    )  # fmt: skip
    with Lab(small, net="127.88") as lab:
        positive, negative = _ttls(lab)
        assert 0 < positive <= 5 and 0 <= negative <= 1
    with Lab(small, net="127.88", resolver_ttls=(3600, 3600)) as lab:
        positive, negative = _ttls(lab)
        assert TTL - 5 <= positive <= TTL and TTL - 5 <= negative <= TTL
