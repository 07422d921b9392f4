"""`mxguard policy --json` against the lab: one row per case of the policy engine's contract.

Each row names a lab domain, the policy the engine must decide and the failures it must have
recorded. The lab's real peers answer: Unbound validating signed, unsigned and bogus zones,
HTTPS policy hosts with every misbehaviour, and a static list and local rule written into the
config the lab gives clients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab

pytestmark = pytest.mark.lab


def policy_json(lab: Lab, store: Path, domain: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{store}", "policy", domain,
         "--json"],
    )  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def summary(p: dict[str, Any]) -> tuple[Any, ...]:
    """source, mode, status, and per MX (host, allowed, tls, auth, report_only, defer type)."""
    return (
        p["source"],
        p["mode"],
        p["status"],
        [
            (m["host"], m["allowed"], m["tls"], m["auth"], m["report_only"],
             (m["defer"] or {}).get("result_type"))
            for m in p["mx"]
        ],
    )  # fmt: skip


OPPORTUNISTIC = ("opportunistic", "none", False, None)
PKIX = ("required", "pkix", False, None)
DANE = ("required", "dane", False, None)

CASES = [
    # (domain, exit code, source, mode, status, [(mx, allowed, tls, auth, report_only, defer)],
    #  result types among the errors)
    ("nopolicy.test", 0, "none", "none", "ok", [("mx.nopolicy.test", True, *OPPORTUNISTIC)], []),
    ("sts-enforce.test", 0, "mta-sts", "enforce", "ok",
     [("mx1.sts-enforce.test", True, *PKIX), ("mx2.sts-enforce.test", True, *PKIX)], []),
    ("sts-testing.test", 0, "mta-sts", "testing", "ok",
     [("mx.sts-testing.test", True, "opportunistic", "none", True, None)], []),
    ("sts-none.test", 0, "none", "none", "ok", [("mx.sts-none.test", True, *OPPORTUNISTIC)], []),
    ("sts-mx-mismatch.test", 75, "mta-sts", "enforce", "defer",
     [("mx.sts-mx-mismatch.test", False, *OPPORTUNISTIC)], []),
    # RFC 8461 §5: with nothing cached a failed fetch means "no policy", and is recorded.
    ("sts-404.test", 0, "none", "none", "ok", [("mx.sts-404.test", True, *OPPORTUNISTIC)],
     ["sts-policy-fetch-error"]),
    ("sts-redirect.test", 0, "none", "none", "ok",
     [("mx.sts-redirect.test", True, *OPPORTUNISTIC)], ["sts-policy-fetch-error"]),
    ("sts-content-type.test", 0, "none", "none", "ok",
     [("mx.sts-content-type.test", True, *OPPORTUNISTIC)], ["sts-policy-fetch-error"]),
    ("sts-oversize.test", 0, "none", "none", "ok",
     [("mx.sts-oversize.test", True, *OPPORTUNISTIC)], ["sts-policy-fetch-error"]),
    ("sts-stall.test", 0, "none", "none", "ok",
     [("mx.sts-stall.test", True, *OPPORTUNISTIC)], ["sts-policy-fetch-error"]),
    ("sts-expired-cert.test", 0, "none", "none", "ok",
     [("mx.sts-expired-cert.test", True, *OPPORTUNISTIC)], ["sts-webpki-invalid"]),
    ("sts-wrong-name.test", 0, "none", "none", "ok",
     [("mx.sts-wrong-name.test", True, *OPPORTUNISTIC)], ["sts-webpki-invalid"]),
    ("sts-untrusted.test", 0, "none", "none", "ok",
     [("mx.sts-untrusted.test", True, *OPPORTUNISTIC)], ["sts-webpki-invalid"]),
    ("sts-bad-policy.test", 0, "none", "none", "ok",
     [("mx.sts-bad-policy.test", True, *OPPORTUNISTIC)], ["sts-policy-invalid"]),
    # RFC 8461 §3.1: a malformed record, or two of them, means no policy is announced.
    ("sts-bad-record.test", 0, "none", "none", "ok",
     [("mx.sts-bad-record.test", True, *OPPORTUNISTIC)], []),
    ("sts-two-records.test", 0, "none", "none", "ok",
     [("mx.sts-two-records.test", True, *OPPORTUNISTIC)], []),
    ("dane-ee.test", 0, "dane", "enforce", "ok", [("mx.dane-ee.test", True, *DANE)], []),
    ("dane-ta.test", 0, "dane", "enforce", "ok", [("mx.dane-ta.test", True, *DANE)], []),
    ("dane-unusable.test", 0, "dane", "enforce", "ok",
     [("mx.dane-unusable.test", True, "required", "none", False, None)], []),
    ("dane-bogus.test", 75, "none", "none", "defer", [], ["dnssec-invalid"]),
    ("dane-unsigned.test", 0, "none", "none", "ok",
     [("mx.dane-unsigned.test", True, *OPPORTUNISTIC)], []),
    ("dane-sts.test", 0, "dane", "enforce", "ok", [("mx.dane-sts.test", True, *DANE)], []),
    ("dane-cname.test", 0, "dane", "enforce", "ok", [("mail.dane-cname.test", True, *DANE)], []),
    ("insecure-mx.test", 0, "dane", "enforce", "ok", [("mx.dane-provider.test", True, *DANE)], []),
    ("nullmx.test", 69, "none", "none", "fail", [], []),
    ("list.test", 0, "list", "enforce", "ok", [("mx.list.test", True, *PKIX)], []),
    ("local-rule.test", 0, "local", "enforce", "ok", [("mx.local-rule.test", True, *PKIX)], []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("domain", "code", "source", "mode", "status", "mx", "errors"), CASES, ids=[c[0] for c in CASES]
)
def test_policy_json_for_each_lab_case(
    lab: Lab,
    tmp_path: Path,
    domain: str,
    code: int,
    source: str,
    mode: str,
    status: str,
    mx: list[tuple[Any, ...]],
    errors: list[str],
) -> None:
    exit_code, p = policy_json(lab, tmp_path / "state.db", domain)
    assert summary(p) == (source, mode, status, mx)
    assert exit_code == code
    assert sorted({e["result_type"] for e in p["errors"]}) == errors


def test_dane_records_are_the_published_ones(lab: Lab, tmp_path: Path) -> None:
    _, p = policy_json(lab, tmp_path / "s.db", "dane-ee.test")
    (m,) = p["mx"]
    assert [t.split()[:3] for t in m["tlsa"]] == [["3", "1", "1"]]
    assert m["dnssec"] == "secure"
    assert p["mx_dnssec"] == "secure"
    assert p["tlsrpt"] == {"rua": ["mailto:tlsrpt@dane-ee.test"]}


def test_dane_wins_over_mta_sts_and_says_so(lab: Lab, tmp_path: Path) -> None:
    _, p = policy_json(lab, tmp_path / "s.db", "dane-sts.test")
    assert p["mta_sts"]["mode"] == "enforce"  # the MTA-STS policy was found...
    assert "takes precedence over the MTA-STS enforce policy" in p["explanation"][0]  # ...and lost


def test_cname_mx_host_uses_the_expanded_name_for_tlsa(lab: Lab, tmp_path: Path) -> None:
    _, p = policy_json(lab, tmp_path / "s.db", "dane-cname.test")
    (m,) = p["mx"]
    assert m["canonical"] == "mx.dane-cname.test"
    assert m["tlsa_name"] == "mx.dane-cname.test"


def test_bogus_zone_defers_instead_of_trying_a_weaker_policy(lab: Lab, tmp_path: Path) -> None:
    _, p = policy_json(lab, tmp_path / "s.db", "dane-bogus.test")
    assert p["status"] == "defer"
    assert any("DNSSEC" in e["detail"] for e in p["errors"])


def test_mta_sts_fields_follow_the_design_contract(lab: Lab, tmp_path: Path) -> None:
    _, p = policy_json(lab, tmp_path / "s.db", "sts-enforce.test")
    sts = p["mta_sts"]
    assert set(sts) >= {"id", "mode", "max_age", "mx", "fetched_at", "expires_at", "from_cache",
                        "error"}  # fmt: skip
    assert (sts["id"], sts["mode"], sts["max_age"], sts["mx"], sts["from_cache"]) == (
        "20261129T000000", "enforce", 86400, ["*.sts-enforce.test"], False,
    )  # fmt: skip
    # The second lookup is answered from the cache: same id, nothing fetched.
    before = lab.policy_host("sts-enforce.test").fetches
    _, again = policy_json(lab, tmp_path / "s.db", "sts-enforce.test")
    assert again["mta_sts"]["from_cache"] is True
    assert lab.policy_host("sts-enforce.test").fetches == before
