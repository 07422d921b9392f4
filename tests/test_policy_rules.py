"""Precedence rules that need the lab: local floors only raise, an expired static list falls
back loudly, and every store backend keeps the MTA-STS cache."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.adapters.dns import DnsResolver
from mxguard.adapters.store import open_store
from mxguard.cli import main
from mxguard.engine.resolve import Resolver
from mxguard.engine.sts import StsResolver
from mxguard.lab.lab import Lab
from mxguard.protocol import policylist

pytest_plugins = ["servers"]
pytestmark = pytest.mark.lab


def policy_with_rules(lab: Lab, tmp_path: Path, domain: str, rules: dict[str, str]) -> Any:
    config = tmp_path / "mxguard.toml"
    text = lab.config_file.read_text().split("[local_rules]")[0]
    config.write_text(
        text + "[local_rules]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in rules.items())
    )
    result = CliRunner().invoke(
        main,
        ["--config", str(config), "--store", f"sqlite:///{tmp_path}/s.db", "policy", domain,
         "--json"],
    )  # fmt: skip
    return json.loads(result.stdout)


FLOORS = [
    # domain, local floor, expected (source, [(tls, auth)], [defer result types])
    ("nopolicy.test", "tls", ("local", [("required", "none")], [None])),
    ("nopolicy.test", "verified", ("local", [("required", "pkix")], [None])),
    ("nopolicy.test", "dane", ("local", [("opportunistic", "none")], ["dane-required"])),
    # A floor never lowers DANE ...
    ("dane-ee.test", "tls", ("dane", [("required", "dane")], [None])),
    ("dane-ee.test", "verified", ("dane", [("required", "dane")], [None])),
    ("dane-ee.test", "dane", ("dane", [("required", "dane")], [None])),
    # ... nor an enforced MTA-STS policy ...
    ("sts-enforce.test", "tls", ("mta-sts", [("required", "pkix")] * 2, [None, None])),
    # ... but raises a testing policy to what the operator demands.
    ("sts-testing.test", "verified", ("mta-sts", [("required", "pkix")], [None])),
    ("dane-unusable.test", "verified", ("dane", [("required", "pkix")], [None])),
]  # fmt: skip


@pytest.mark.parametrize(
    ("domain", "floor", "expected"), FLOORS, ids=[f"{d}-{f}" for d, f, _ in FLOORS]
)
def test_local_floors_only_raise_requirements(
    lab: Lab, tmp_path: Path, domain: str, floor: str, expected: tuple[Any, ...]
) -> None:
    p = policy_with_rules(lab, tmp_path, domain, {domain: floor})
    got = (
        p["source"],
        [(m["tls"], m["auth"]) for m in p["mx"]],
        [(m["defer"] or {}).get("result_type") for m in p["mx"]],
    )
    assert got == expected
    assert p["local_rule"] == floor


def test_suffix_rule_covers_subdomains_only(lab: Lab, tmp_path: Path) -> None:
    p = policy_with_rules(lab, tmp_path, "nopolicy.test", {".test": "verified"})
    assert [m["auth"] for m in p["mx"]] == ["pkix"]


def test_expired_static_list_falls_back_to_opportunistic_and_warns(lab: Lab) -> None:
    now = dt.datetime.now(dt.UTC)
    raw = json.loads((lab.workdir / "policy-list.json").read_text())
    plist = policylist.parse_list(json.dumps(raw), now=now)

    async def resolve(at: dt.datetime) -> Any:
        store = await open_store("sqlite:///:memory:")
        try:
            dns = DnsResolver([lab.resolver])
            sts = StsResolver(dns, store, ca_file=lab.ca_file, https_port=lab.ports.https)
            return await Resolver(dns, sts, policy_list=plist, clock=lambda: at).resolve(
                "list.test"
            )
        finally:
            await store.close()

    fresh = asyncio.run(resolve(now))
    assert (fresh.source, fresh.mx[0].auth) == ("list", "pkix")
    later = asyncio.run(resolve(plist.expires + dt.timedelta(seconds=1)))
    assert (later.source, later.mx[0].tls, later.mx[0].auth) == ("none", "opportunistic", "none")
    assert any("EXPIRED" in w for w in later.warnings)


def test_expired_static_list_is_refused_at_load(lab: Lab, tmp_path: Path) -> None:
    raw = json.loads((lab.workdir / "policy-list.json").read_text())
    raw["expires"] = "2020-01-01T00:00:00Z"
    raw["timestamp"] = "2019-12-01T00:00:00Z"
    stale = tmp_path / "list.json"
    stale.write_text(json.dumps(raw))
    config = tmp_path / "mxguard.toml"
    config.write_text(
        lab.config_file.read_text().replace(str(lab.workdir / "policy-list.json"), str(stale))
    )
    result = CliRunner().invoke(main, ["--config", str(config), "policy", "list.test"])
    assert result.exit_code == 2
    assert "policy_list" in result.output and "expired" in result.output.lower()


@pytest.mark.parametrize("backend", ["postgresql", "redis"])
def test_the_policy_cache_works_on_every_store(
    lab: Lab, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").create_database()
    else:
        url = request.getfixturevalue("redis_server").url(prefix="policytest:")

    def policy() -> Any:
        result = CliRunner().invoke(
            main, ["--config", str(lab.config_file), "--store", url, "policy", "sts-enforce.test",
                   "--json"],
        )  # fmt: skip
        return json.loads(result.stdout)

    first, second = policy(), policy()
    assert (first["source"], first["mta_sts"]["from_cache"]) == ("mta-sts", False)
    assert (second["source"], second["mta_sts"]["from_cache"]) == ("mta-sts", True)
    assert lab.policy_host("sts-enforce.test").fetches == 1
