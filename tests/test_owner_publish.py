"""`mxguard sts publish`: the policy and TXT record a domain owner publishes (RFC 8461 §3.1,
§3.2, §8.3), against a lab of its own (net 127.83).

The lab's domains are the owner's situations: an honest domain with two MX hosts, one whose
primary MX host presents an expired certificate, one without STARTTLS, a null MX, one with an
enforce policy live (for its withdrawal) and one that publishes nothing yet, for the end to
end: a policy written by `sts publish`, served by `serve mta-sts` on 127.82.0.2:443, the
lab's DNS pointing `mta-sts.<domain>` and `_mta-sts.<domain>` at it, and `mxguard check`
reading it as a sender would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mta_sts_serving import serving
from mxguard.cli import main
from mxguard.config import Settings, load
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import CertKind, Dnssec, Domain, Host, MtaSts, Scenario
from mxguard.owner import publish as pub
from mxguard.protocol import mtasts

NET = "127.83"
E2E_ADDRESS = "127.82.0.2"  # where this file's `serve mta-sts` listens (port 443)
LIVE_MAX_AGE = 1_209_600

pytestmark = pytest.mark.lab


def _domain(name: str, *hosts: Host, **kw: Any) -> Domain:
    mx = tuple(f"{10 * (i + 1)} {h.name}" for i, h in enumerate(hosts))
    return Domain(name, dnssec=Dnssec.UNSIGNED, mx=kw.pop("mx", mx), hosts=hosts, **kw)


SCENARIO = Scenario(
    name="owner",
    description="Domains about to publish MTA-STS, or to withdraw it.",
    domains=(
        _domain("honest.test", Host("mx1.honest.test"), Host("mx2.honest.test")),
        _domain(
            "badcert.test",
            Host("mx1.badcert.test", cert=CertKind.EXPIRED),
            Host("mx2.badcert.test"),
        ),
        _domain("plain.test", Host("mx.plain.test", starttls=False)),
        _domain("nullmx.test", mx=("0 .",)),
        _domain(
            "live.test",
            Host("mx.live.test"),
            mta_sts=MtaSts(mode="enforce", max_age=LIVE_MAX_AGE, txt=("v=STSv1; id=live1;",)),
            tlsrpt=("v=TLSRPTv1; rua=mailto:tlsrpt@live.test",),
        ),
        _domain("e2e.test", Host("mx.e2e.test")),
    ),
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(SCENARIO, net=NET) as lab:
        yield lab


@pytest.fixture(scope="module")
def settings(lab: Lab) -> Settings:
    return load(lab.config_file)


def publish_cli(lab: Lab, out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """`mxguard --config LAB sts publish ARGS --out OUT --json`: (exit status, JSON)."""
    result = CliRunner().invoke(
        main, ["--config", str(lab.config_file), "sts", "publish", *args, "--out", str(out),
               "--json"],
    )  # fmt: skip
    try:
        return result.exit_code, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"no JSON (exit {result.exit_code}): {result.output}") from None


KEYS = {"domain", "policy", "policy_path", "txt_name", "txt_record", "id", "mode", "max_age",
        "mx", "blockers", "safe_to_remove_at"}  # fmt: skip


# --- testing: the MX set becomes the policy ------------------------------------------------


def test_a_testing_policy_lists_the_mx_hosts_in_order_and_is_written_for_serve(
    lab: Lab, tmp_path: Path
) -> None:
    status, out = publish_cli(lab, tmp_path, "honest.test")
    assert status == 0, out
    assert set(out) >= KEYS
    body = (
        "version: STSv1\r\nmode: testing\r\nmx: mx1.honest.test\r\nmx: mx2.honest.test\r\n"
        "max_age: 86400\r\n"
    )
    path = tmp_path / "honest.test" / ".well-known" / "mta-sts.txt"
    assert path.read_bytes() == body.encode()  # CRLF, the layout `serve mta-sts` serves
    assert out["policy"] == body and out["policy_path"] == str(path)
    assert (out["mode"], out["max_age"]) == ("testing", 86400)
    assert out["mx"] == ["mx1.honest.test", "mx2.honest.test"]
    assert out["txt_name"] == "_mta-sts.honest.test"
    assert out["txt_record"] == f"v=STSv1; id={out['id']}"
    assert out["blockers"] is None and out["safe_to_remove_at"] is None
    # What is published lints clean, record and body.
    runner = CliRunner()
    assert runner.invoke(main, ["sts", "check-record", out["txt_record"]]).exit_code == 0
    lint = runner.invoke(main, ["sts", "check-policy", str(path), "--json"])
    assert lint.exit_code == 0 and json.loads(lint.output)["warnings"] == []
    # No TLS-RPT record yet: the reports testing is for need one.
    assert any("_smtp._tls.honest.test" in n for n in out["notes"])


def test_the_text_output_names_the_record_and_the_policy_host(lab: Lab, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--config", str(lab.config_file), "sts", "publish", "honest.test", "--out",
               str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record_id = pub.policy_id(mtasts.parse_policy(
        (tmp_path / "honest.test/.well-known/mta-sts.txt").read_text()))  # fmt: skip
    assert f'_mta-sts.honest.test. TXT "v=STSv1; id={record_id}"' in result.output
    assert "mta-sts.honest.test needs A and/or AAAA records" in result.output
    assert "certificate valid for mta-sts.honest.test" in result.output
    assert f"mxguard serve mta-sts --root {tmp_path}" in result.output


def test_the_global_json_setting_is_honoured(lab: Lab, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--config", str(lab.config_file), "--json", "sts", "publish", "honest.test",
               "--out", str(tmp_path)],
        env={"MXGUARD_JSON": ""},
    )  # fmt: skip
    assert result.exit_code == 0
    assert json.loads(result.stdout)["domain"] == "honest.test"


def test_the_id_is_derived_from_the_policy(lab: Lab, tmp_path: Path) -> None:
    ids = {}
    for name, args in {
        "first": [],
        "again": [],
        "longer": ["--max-age", "172800"],
        "one-mx": ["--mx", "mx1.honest.test", "--mx", "*.honest.test"],
    }.items():
        status, out = publish_cli(lab, tmp_path / name, "honest.test", *args)
        assert status == 0, out
        assert re.fullmatch(r"[A-Za-z0-9]{1,32}", out["id"])  # RFC 8461 §3.1
        assert out["id"] == pub.policy_id(mtasts.parse_policy(out["policy"]))
        ids[name] = out["id"]
    assert ids["first"] == ids["again"]  # the same policy, the same id
    assert len({ids["first"], ids["longer"], ids["one-mx"]}) == 3  # any change, a new id


def test_given_patterns_replace_the_mx_set_and_uncovered_hosts_are_warned(
    lab: Lab, tmp_path: Path
) -> None:
    status, out = publish_cli(lab, tmp_path, "honest.test", "--mx", "MX1.Honest.Test.",
                              "--mx", "mail.elsewhere.test")  # fmt: skip
    assert status == 0, out
    assert out["mx"] == ["mx1.honest.test", "mail.elsewhere.test"]
    warnings = " | ".join(out["warnings"])
    assert "MX host mx2.honest.test matches no mx pattern" in warnings
    assert "'mail.elsewhere.test' matches none of the MX hosts" in warnings


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mx", "m*.honest.test"], "invalid mx pattern"),
        (["--mode", "none", "--mx", "mx1.honest.test"], "no mx patterns"),
        (["--max-age", "31557601"], "31557601"),
    ],
)
def test_arguments_that_make_no_policy_are_usage_errors(
    lab: Lab, tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(
        main, ["--config", str(lab.config_file), "sts", "publish", "honest.test",
               "--out", str(tmp_path), *args],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "honest.test").exists()


def test_a_domain_that_takes_no_mail_gets_no_policy(lab: Lab, tmp_path: Path) -> None:
    status, out = publish_cli(lab, tmp_path, "nullmx.test")
    assert status == 1
    assert "null MX" in out["error"] and out["policy"] is None and out["policy_path"] is None
    assert not (tmp_path / "nullmx.test").exists()


def test_a_short_max_age_is_warned_about(lab: Lab, tmp_path: Path) -> None:
    status, out = publish_cli(lab, tmp_path, "honest.test", "--max-age", "3600")
    assert status == 0
    assert any("under one day" in w for w in out["warnings"])


# --- enforce: refused while a sender would refuse honest mail ----------------------------


@pytest.mark.parametrize(
    ("domain", "args", "blocker"),
    [
        ("badcert.test", [], r"mx1.badcert.test \[.*\]: the certificate fails WebPKI validation "
                             r"for mx1.badcert.test \(certificate-expired"),
        ("plain.test", [], r"mx.plain.test \[.*\] does not offer STARTTLS"),
        ("honest.test", ["--mx", "mx1.honest.test"],
         "MX host mx2.honest.test matches no mx pattern of the new policy"),
    ],
)  # fmt: skip
def test_enforce_is_refused_while_a_compliant_sender_would_refuse_honest_mail(
    lab: Lab, tmp_path: Path, domain: str, args: list[str], blocker: str
) -> None:
    status, out = publish_cli(lab, tmp_path, domain, "--mode", "enforce", *args)
    assert status == 1, out
    assert out["policy_path"] is None and not (tmp_path / domain).exists()
    assert out["mode"] == "enforce" and out["policy"] is not None  # what would be published
    assert any(re.search(blocker, b) for b in out["blockers"]), out["blockers"]
    # --force writes it anyway, and still says why it should not have.
    status, out = publish_cli(lab, tmp_path, domain, "--mode", "enforce", "--force", *args)
    assert status == 0
    assert (tmp_path / domain / ".well-known" / "mta-sts.txt").exists()
    assert any(re.search(blocker, b) for b in out["blockers"])
    assert any("--force" in w for w in out["warnings"])


def test_only_the_failing_host_blocks(lab: Lab, tmp_path: Path) -> None:
    _, out = publish_cli(lab, tmp_path, "badcert.test", "--mode", "enforce")
    assert out["blockers"] and all("mx1.badcert.test" in b for b in out["blockers"])


def test_enforce_is_written_for_an_honest_domain(lab: Lab, tmp_path: Path) -> None:
    status, out = publish_cli(lab, tmp_path, "honest.test", "--mode", "enforce")
    assert status == 0, out
    assert out["blockers"] == []
    assert (out["mode"], out["max_age"]) == ("enforce", 14 * 86400)
    text = (tmp_path / "honest.test" / ".well-known" / "mta-sts.txt").read_text()
    assert mtasts.parse_policy(text).mode is mtasts.Mode.ENFORCE


# --- none: the withdrawal of RFC 8461 §8.3 -----------------------------------------------


def test_mode_none_says_when_removal_is_safe_from_the_live_policys_max_age(
    lab: Lab, settings: Settings, tmp_path: Path
) -> None:
    now = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
    request = pub.PublishRequest("live.test", mtasts.Mode.NONE, out=tmp_path)
    result = asyncio.run(pub.publish(settings, request, clock=lambda: now))
    assert result.status is pub.Status.WRITTEN
    # The lab serves live.test's enforce policy with max_age 1209600: fetched as senders do.
    assert result.live is not None and result.live.policy is not None
    assert result.live.policy.max_age == LIVE_MAX_AGE and result.live.record_id == "live1"
    assert result.safe_to_remove_at == now + dt.timedelta(seconds=LIVE_MAX_AGE)
    assert result.policy is not None and result.policy.mode is mtasts.Mode.NONE
    assert result.policy.mx == () and result.policy.max_age == 86400
    assert result.id != "live1"
    out = result.to_json()
    assert out["safe_to_remove_at"] == "2026-12-15T12:00:00Z"
    assert out["blockers"] is None and out["mx"] == []
    assert any("until 2026-12-15T12:00:00Z" in n for n in out["notes"])
    assert (tmp_path / "live.test/.well-known/mta-sts.txt").read_bytes() == (
        b"version: STSv1\r\nmode: none\r\nmax_age: 86400\r\n"
    )


def test_running_mode_none_again_cannot_shorten_the_wait(
    lab: Lab, settings: Settings, tmp_path: Path
) -> None:
    first_now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    request = pub.PublishRequest("live.test", mtasts.Mode.NONE, out=tmp_path)
    first = asyncio.run(pub.publish(settings, request, clock=lambda: first_now))
    assert first.policy is not None
    # The none policy is live now: a second run sees max_age 86400 only.
    d = lab.scenario.domain("live.test")
    assert d.mta_sts is not None
    lab.update_domain(dataclasses.replace(
        d, mta_sts=dataclasses.replace(d.mta_sts, policy=first.policy.to_text(),
                                       txt=(f"v=STSv1; id={first.id}",))))  # fmt: skip
    try:
        later = first_now + dt.timedelta(days=2)
        second = asyncio.run(pub.publish(settings, request, clock=lambda: later))
        assert second.live is not None and second.live.policy is not None
        assert second.live.policy.mode is mtasts.Mode.NONE
        assert second.safe_to_remove_at == first.safe_to_remove_at
    finally:
        lab.update_domain(d)


def test_mode_none_without_a_live_policy_assumes_the_longest_max_age(
    lab: Lab, tmp_path: Path
) -> None:
    status, out = publish_cli(lab, tmp_path, "honest.test", "--mode", "none")
    assert status == 0
    safe = dt.datetime.strptime(out["safe_to_remove_at"], "%Y-%m-%dT%H:%M:%SZ")
    wait = safe.replace(tzinfo=dt.UTC) - dt.datetime.now(dt.UTC)
    assert abs(wait.total_seconds() - mtasts.MAX_AGE_LIMIT) < 120
    assert any("could not be fetched" in w for w in out["warnings"])


# --- end to end: published, served, found in DNS, checked --------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="serves on port 443: run as root")
def test_published_and_served_policies_are_what_senders_see(lab: Lab, tmp_path: Path) -> None:
    root = tmp_path / "root"
    identity = lab.pki.issue("mta-sts.e2e.test")
    original = lab.scenario.domain("e2e.test")

    def announce(record_id: str) -> None:
        lab.update_domain(dataclasses.replace(original, extra=(
            f"mta-sts A {E2E_ADDRESS}", f'_mta-sts TXT "v=STSv1; id={record_id}"')))  # fmt: skip

    def check() -> dict[str, Any]:
        result = CliRunner().invoke(main, ["--config", str(lab.config_file), "check",
                                           "e2e.test", "--json", "--no-history"])  # fmt: skip
        return dict(json.loads(result.stdout))

    status, testing = publish_cli(lab, root, "e2e.test")
    assert status == 0, testing
    pairs = [(identity.cert_file, identity.key_file)]
    try:
        with serving(root, pairs, f"{E2E_ADDRESS}:443", tmp_path / "server.log"):
            announce(testing["id"])
            seen = check()
            sts = seen["mta_sts"]
            assert (sts["id"], sts["mode"], sts["patterns"]) == (testing["id"], "testing",
                                                                 ["mx.e2e.test"])  # fmt: skip
            assert sts["fetch"]["ok"] and sts["fetch"]["content_type"] == "text/plain"
            assert sts["policy"] == testing["policy"]
            assert seen["verdict"] == "partial"
            assert "sts-ready-for-enforce" in {f["code"] for f in seen["findings"]}
            lint = CliRunner().invoke(main, ["sts", "check-policy", "-"], input=sts["policy"])
            assert lint.exit_code == 0, lint.output

            # Switch to enforce: the file changes under the running server, then the record.
            status, enforce = publish_cli(lab, root, "e2e.test", "--mode", "enforce")
            assert status == 0 and enforce["blockers"] == [], enforce
            assert enforce["id"] != testing["id"]
            announce(enforce["id"])
            seen = check()
            assert seen["verdict"] == "protected", seen["findings"]
            assert seen["mta_sts"]["mode"] == "enforce"

            # Withdraw: the live policy's max_age (two weeks) says when removal is safe.
            before = dt.datetime.now(dt.UTC).replace(microsecond=0)
            status, none = publish_cli(lab, root, "e2e.test", "--mode", "none")
            assert status == 0, none
            safe = dt.datetime.strptime(none["safe_to_remove_at"], "%Y-%m-%dT%H:%M:%SZ")
            wait = safe.replace(tzinfo=dt.UTC) - before
            assert 14 * 86400 <= wait.total_seconds() <= 14 * 86400 + 120
            announce(none["id"])
            assert check()["mta_sts"]["mode"] == "none"
    finally:
        lab.update_domain(original)


# --- pure parts ------------------------------------------------------------------------


def test_policy_ids_are_short_digests_of_the_canonical_body() -> None:
    policy = pub.build_policy(mtasts.Mode.ENFORCE, 604800, ["mx.example.com"])
    assert pub.policy_id(policy) == pub.policy_id(mtasts.parse_policy(policy.to_text()))
    assert len(pub.policy_id(policy)) == pub.ID_LENGTH
    assert mtasts.parse_record(pub.txt_value(pub.policy_id(policy))).id == pub.policy_id(policy)


@pytest.mark.parametrize(
    ("mode", "patterns", "problem"),
    [
        (mtasts.Mode.ENFORCE, [], "at least one mx pattern"),
        (mtasts.Mode.TESTING, ["*.*.example.com"], "invalid mx pattern"),
        (mtasts.Mode.NONE, ["mx.example.com"], "no mx patterns"),
    ],
)
def test_policies_that_cannot_be_built(
    mode: mtasts.Mode, patterns: list[str], problem: str
) -> None:
    with pytest.raises(pub.PublishError, match=problem):
        pub.build_policy(mode, 86400, patterns)


def test_patterns_are_normalised_and_deduplicated() -> None:
    written = ["MX.Example.COM.", "mx.example.com", "*.Bücher.example"]
    policy = pub.build_policy(mtasts.Mode.TESTING, 86400, written)
    assert policy.mx == ("mx.example.com", "*.xn--bcher-kva.example")


def test_removal_waits_for_the_longest_max_age() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert pub.safe_to_remove_at(now, [86400, 604800]) == now + dt.timedelta(days=7)
    assert pub.safe_to_remove_at(now, []) == now + dt.timedelta(seconds=mtasts.MAX_AGE_LIMIT)
