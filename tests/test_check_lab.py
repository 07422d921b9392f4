"""`mxguard check` against real peers: the audit scenario (lab/scenarios/audit.toml), one
receiving domain per verdict and finding, served by the lab's Unbound, SMTP receivers and
HTTPS policy hosts.

Each row names a domain, the verdict and protection the audit must give it, and the findings
it must report (code, and whether a compliant sender defers or refuses honest mail because
of it). A second test holds the audit to the sender: for every domain, "some MX address takes
honest mail" is exactly "mxguard send delivers" (the same resolver, fetch and certificate
check). History, bulk input, output formats and shared runs are tested through the command.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.adapters.store import open_store
from mxguard.audit.analysis import CODES
from mxguard.audit.auditor import Auditor
from mxguard.audit.model import DomainCheck, Severity
from mxguard.cli import main
from mxguard.config import Settings, load
from mxguard.engine.context import engine
from mxguard.engine.message import Message
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import named

NET = "127.86"


@pytest.fixture(scope="module")
def audit_lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(named("audit"), net=NET) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab_settings(audit_lab: Lab) -> Settings:
    return load(audit_lab.config_file)


def check(settings: Settings, *domains: str, store: Any = None) -> list[DomainCheck]:
    async def run() -> list[DomainCheck]:
        auditor = Auditor(settings, store=store, timeout=10)
        return [await auditor.check(d) for d in domains]

    return asyncio.run(run())


# (domain, verdict, protection, {code: breaks}) — the codes must be among the findings, with
# that `breaks`; for "clean" rows (no codes) no finding may be an error or a warning.
ROWS: list[tuple[str, str, str, dict[str, bool]]] = [
    ("dane-honest.test", "protected", "dane", {}),
    ("dane-single.test", "protected", "dane", {"dane-rollover-unready": False}),
    ("dane-mismatch.test", "broken", "dane", {"dane-mismatch": True, "no-working-mx": True}),
    ("dnssec-bogus.test", "broken", "none", {"dnssec-bogus": True}),
    ("enforce-honest.test", "protected", "mta-sts", {}),
    ("enforce-mx-missing.test", "broken", "mta-sts", {"sts-mx-not-covered": True}),
    ("enforce-expired.test", "broken", "mta-sts", {"certificate-expired": True}),
    ("enforce-wrong-name.test", "broken", "mta-sts", {"certificate-host-mismatch": True}),
    ("enforce-untrusted.test", "broken", "mta-sts", {"certificate-not-trusted": True}),
    ("enforce-no-starttls.test", "broken", "mta-sts", {"starttls-missing": True}),
    ("testing-ready.test", "partial", "mta-sts", {"sts-testing": False,
                                                  "sts-ready-for-enforce": False}),
    ("testing-failing.test", "partial", "mta-sts", {"sts-testing": False,
                                                    "certificate-host-mismatch": False}),
    ("policy-404.test", "unprotected", "none", {"sts-policy-http-status": False,
                                                "no-protection": False}),
    ("policy-redirect.test", "unprotected", "none", {"sts-policy-redirect": False}),
    ("policy-content-type.test", "unprotected", "none", {"sts-policy-content-type": False}),
    ("record-invalid.test", "unprotected", "none", {"sts-record-invalid": False}),
    ("no-policy.test", "unprotected", "none", {"no-protection": False}),
    ("no-starttls.test", "unprotected", "none", {"starttls-missing": False,
                                                 "no-protection": False}),
    ("null-mx.test", "protected", "none", {"null-mx": False}),
    ("rpt-missing.test", "protected", "mta-sts", {"tlsrpt-missing": False}),
    ("rpt-invalid.test", "protected", "mta-sts", {"tlsrpt-invalid": False}),
    ("rpt-unreachable.test", "protected", "mta-sts", {"tlsrpt-rua-unreachable": False}),
    ("expiring.test", "protected", "mta-sts", {"certificate-expiring": False}),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(lab_settings: Settings) -> dict[str, DomainCheck]:
    return {c.domain: c for c in check(lab_settings, *(row[0] for row in ROWS))}


@pytest.mark.parametrize(
    ("domain", "verdict", "protection", "codes"), ROWS, ids=[r[0] for r in ROWS]
)
def test_each_audit_domain_gets_its_verdict_and_findings(
    results: dict[str, DomainCheck], domain: str, verdict: str, protection: str,
    codes: dict[str, bool],
) -> None:  # fmt: skip
    c = results[domain]
    found = {f.code: f for f in c.findings}
    shown = [(f.code, f.severity.value, f.breaks) for f in c.findings]
    assert (c.verdict.value, c.protection.value) == (verdict, protection), shown
    for code, breaks in codes.items():
        assert code in found, f"{code} missing from {shown}"
        assert found[code].breaks is breaks, found[code]
    if not codes:
        loud = [f for f in c.findings if f.severity is not Severity.INFO]
        assert not loud, loud
    for f in c.findings:
        assert f.code in CODES and f.sender and f.fix and f.detail, f


def test_certificate_findings_carry_the_result_type_a_sender_reports(
    results: dict[str, DomainCheck],
) -> None:
    expected = {
        "enforce-expired.test": "certificate-expired",
        "enforce-wrong-name.test": "certificate-host-mismatch",
        "enforce-untrusted.test": "certificate-not-trusted",
        "enforce-no-starttls.test": "starttls-not-supported",
        "dnssec-bogus.test": "dnssec-invalid",
        "policy-404.test": "sts-policy-fetch-error",
    }
    for domain, result_type in expected.items():
        types = {f.result_type.value for f in results[domain].findings if f.result_type}
        assert result_type in types, (domain, types)


def test_the_expiring_certificate_is_named_with_its_days_left(
    results: dict[str, DomainCheck],
) -> None:
    [f] = [f for f in results["expiring.test"].findings if f.code == "certificate-expiring"]
    assert f.mx == "mx.expiring.test"
    assert "in 10 days" in f.detail or "in 9 days" in f.detail, f.detail


def test_rollover_readiness_is_judged_from_the_tlsa_records(
    results: dict[str, DomainCheck],
) -> None:
    honest = {f.code for f in results["dane-honest.test"].findings}
    single = {f.code for f in results["dane-single.test"].findings}
    assert "dane-rollover-unready" not in honest  # 3 1 1 plus 2 1 1
    assert "dane-rollover-unready" in single  # one 3 1 1 only, for the key in use


def test_the_audit_agrees_with_send_on_whether_honest_mail_is_delivered(
    audit_lab: Lab, lab_settings: Settings, results: dict[str, DomainCheck]
) -> None:
    """For each domain: some address takes honest mail (audit) == mxguard send delivers."""
    settings = dataclasses.replace(lab_settings, store="sqlite:///:memory:")

    async def deliveries() -> dict[str, bool]:
        out: dict[str, bool] = {}
        async with engine(settings) as e:
            sender = e.sender()
            for domain in results:
                message = Message.from_bytes(b"Subject: audit agreement\r\n\r\nhello\r\n")
                r = await sender.deliver("audit@client.test", [f"postmaster@{domain}"], message)
                out[domain] = r.domains[0].delivered
        return out

    delivered = asyncio.run(deliveries())
    audit = {
        d: any(a.honest for h in c.observations.hosts for a in h.addresses)
        for d, c in results.items()
    }
    assert audit == delivered


def test_a_policy_changed_without_a_new_id_is_flagged_on_the_next_check(
    audit_lab: Lab, lab_settings: Settings, tmp_path: Path
) -> None:
    domain = audit_lab.scenario.domain("id-unchanged.test")
    assert domain.mta_sts is not None

    async def twice() -> tuple[DomainCheck, DomainCheck]:
        store = await open_store(f"sqlite://{tmp_path / 'state.db'}")
        try:
            auditor = Auditor(lab_settings, store=store, timeout=10)
            first = await auditor.check(domain.name)
            changed = dataclasses.replace(domain.mta_sts, max_age=2419200)  # same TXT id
            await asyncio.to_thread(
                audit_lab.update_domain, dataclasses.replace(domain, mta_sts=changed)
            )
            second = await Auditor(lab_settings, store=store, timeout=10).check(domain.name)
            return first, second
        finally:
            await store.close()

    try:
        first, second = asyncio.run(twice())
    finally:
        audit_lab.update_domain(domain)
    assert "sts-id-unchanged" not in {f.code for f in first.findings}
    [f] = [f for f in second.findings if f.code == "sts-id-unchanged"]
    assert f.severity is Severity.ERROR and "20261129T000000" in f.detail
    assert "MTA-STS policy body changed" in second.changes
    assert "new finding sts-id-unchanged" in second.changes


# --- the command -----------------------------------------------------------------------------


def cli(lab: Lab, *args: str, store: Path | None = None) -> Any:
    options = ["--config", str(lab.config_file)]
    if store is not None:
        options += ["--store", f"sqlite://{store}"]
    return CliRunner().invoke(main, [*options, "check", *args], catch_exceptions=False)


def test_bad_input_lines_are_named_and_the_run_goes_on(audit_lab: Lab, tmp_path: Path) -> None:
    listing = tmp_path / "domains.txt"
    listing.write_text(
        "# customers\nenforce-honest.test\nnot a domain\n\nno-policy.test  # trailing note\n"
        "exa mple..test\n"
    )
    r = cli(audit_lab, "--file", str(listing), "--json", "--no-history")
    assert r.exit_code == 1
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    done = {d["domain"]: d["verdict"] for d in lines if "verdict" in d}
    assert done == {"enforce-honest.test": "protected", "no-policy.test": "unprotected"}
    errors = {d["source"]: d for d in lines if "error" in d and "verdict" not in d}
    assert set(errors) == {f"{listing} line 3", f"{listing} line 6"}
    assert "not a valid domain name" in errors[f"{listing} line 3"]["error"]


def test_an_unreadable_file_is_a_usage_error_naming_it(audit_lab: Lab, tmp_path: Path) -> None:
    r = cli(audit_lab, "--file", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2
    assert "missing.txt" in r.output and "No such file" in r.output


def test_exit_status_is_zero_only_when_every_domain_is_protected(audit_lab: Lab) -> None:
    assert cli(audit_lab, "enforce-honest.test", "dane-honest.test", "--no-history").exit_code == 0
    assert cli(audit_lab, "enforce-honest.test", "no-policy.test", "--no-history").exit_code == 1


def test_human_output_says_the_verdict_each_finding_and_its_fix(audit_lab: Lab) -> None:
    r = cli(audit_lab, "enforce-expired.test", "--no-history")
    out = r.stdout
    assert "enforce-expired.test: BROKEN (protection: mta-sts)" in out
    assert "certificate-expired [mx.enforce-expired.test] (certificate-expired)" in out
    assert "sender: " in out and "fix: renew the certificate" in out


def test_csv_has_one_row_per_domain(audit_lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    r = cli(audit_lab, "no-policy.test", "dane-honest.test", "--csv", "-o", str(out),
            "--no-history")  # fmt: skip
    assert r.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {(row["domain"], row["verdict"]) for row in rows} == {
        ("no-policy.test", "unprotected"),
        ("dane-honest.test", "protected"),
    }
    assert "no-protection" in next(r["codes"] for r in rows if r["domain"] == "no-policy.test")


def test_history_says_what_changed_since_the_last_check(audit_lab: Lab, tmp_path: Path) -> None:
    store = tmp_path / "state.db"
    first = json.loads(cli(audit_lab, "enforce-honest.test", "--json", store=store).stdout)
    assert first["changes"] == []
    audit_lab.set_attack("mx1.enforce-honest.test", "intercept-self-signed")
    try:
        second = json.loads(cli(audit_lab, "enforce-honest.test", "--json", store=store).stdout)
    finally:
        audit_lab.set_attack("mx1.enforce-honest.test", "pass")
    assert "verdict: protected → broken" in second["changes"]
    assert any(c.startswith("mx1.enforce-honest.test [") and "certificate changed" in c
               for c in second["changes"])  # fmt: skip


def test_a_named_run_resumes_and_skips_what_it_has_done(audit_lab: Lab, tmp_path: Path) -> None:
    store = tmp_path / "state.db"
    listing = tmp_path / "domains.txt"
    listing.write_text("enforce-honest.test\nno-policy.test\n")
    first = cli(audit_lab, "--file", str(listing), "--json", "--run", "r1", store=store)
    assert len(first.stdout.splitlines()) == 2
    listing.write_text("enforce-honest.test\nno-policy.test\ndane-honest.test\n")
    second = cli(audit_lab, "--file", str(listing), "--json", "--run", "r1", store=store)
    assert [json.loads(x)["domain"] for x in second.stdout.splitlines()] == ["dane-honest.test"]
    assert "2 skipped" in second.stderr


def test_two_processes_share_one_run_and_check_each_domain_once(
    audit_lab: Lab, tmp_path: Path
) -> None:
    store = tmp_path / "state.db"
    listing = tmp_path / "domains.txt"
    domains = [row[0] for row in ROWS]
    listing.write_text("\n".join(domains) + "\n")
    command = [
        sys.executable, "-m", "mxguard", "--config", str(audit_lab.config_file),
        "--store", f"sqlite://{store}", "check", "--file", str(listing), "--json",
        "--run", "shared", "--concurrency", "3",
    ]  # fmt: skip
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    seen = [json.loads(line)["domain"] for out, _ in outputs for line in out.splitlines()]
    # Every domain once, across both processes (which one took how many depends on timing).
    assert sorted(seen) == sorted(domains)

    async def progress() -> tuple[int, int]:
        s = await open_store(f"sqlite://{store}")
        try:
            return await s.run_progress("shared")
        finally:
            await s.close()

    assert asyncio.run(progress()) == (len(domains), len(domains))


def test_human_output_escapes_control_characters_that_peers_sent(
    results: dict[str, DomainCheck],
) -> None:
    from mxguard.cli.check import render

    c = results["no-policy.test"]
    hostile = dataclasses.replace(c.findings[0], detail="banner \x1b[2J\x1b]0;pwned\x07 here")
    shown = render(dataclasses.replace(c, findings=(hostile,)))
    assert "\x1b[2J" not in shown and "\x07" not in shown
    assert "banner \\x1b[2J\\x1b]0;pwned\\x07 here" in shown
