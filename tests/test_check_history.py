"""What changed since the previous check of a domain (``audit.history.compare``), as
specifications: two JSON documents in the shape of ``check --json`` (docs/check.md, "Output"),
the changes in words and the findings out. Pure: no store, no network.

The previous document comes from the store, written by whatever version of mxguard ran then,
and possibly by hand: ``compare`` must read any JSON object without raising.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from mxguard.audit.analysis import CODES
from mxguard.audit.history import compare
from mxguard.audit.model import Severity

D = "example.test"
MX1, MX2 = "mx1.example.test", "mx2.example.test"
IP1, IP2 = "192.0.2.1", "192.0.2.2"
TLSA_OLD = "3 1 1 " + "aa" * 32
TLSA_NEW = "3 1 1 " + "bb" * 32
CERT_OLD, CERT_NEW = "0123456789abcdef" * 4, "fedcba9876543210" * 4
BODY_OLD, BODY_NEW = "11" * 32, "22" * 32
WHEN = "2026-05-01T12:00:00Z"

Doc = dict[str, Any]


def address(ip: str, *shas: str) -> Doc:
    return {
        "address": ip,
        "smtp": {"connected": True, "starttls": True, "tls_version": "TLSv1.3"},
        "certificates": [{"subject": "CN=x", "sha256": s} for s in shas],
        "honest_delivery": True,
    }


def mx(host: str, *addresses: Doc, tlsa: tuple[str, ...] = ()) -> Doc:
    return {"host": host, "preference": 10, "tlsa": list(tlsa), "addresses": list(addresses)}


def doc(**changes: Any) -> Doc:
    """A check of example.test as ``DomainCheck.to_json`` writes it (the keys compare reads)."""
    base: Doc = {
        "domain": D,
        "verdict": "protected",
        "protection": "mta-sts",
        "summary": "protected by MTA-STS enforce",
        "checked_at": "2026-06-01T12:00:00Z",
        "dnssec": "insecure",
        "mx_lookup": "hosts",
        "mx": [mx(MX1, address(IP1, CERT_OLD), tlsa=(TLSA_OLD,))],
        "mta_sts": {
            "record": {"name": f"_mta-sts.{D}", "records": ["v=STSv1; id=1;"], "outcome": "ok"},
            "id": "20260501",
            "mode": "enforce",
            "max_age": 2592000,
            "patterns": [MX1],
            "fetch": None,
            "policy": "version: STSv1\r\n",
            "policy_sha256": BODY_OLD,
        },
        "tlsrpt": {"record": {}, "rua": []},
        "findings": [{"code": "dnssec-unsigned", "severity": "info"}],
        "changes": [],
        "elapsed": 0.5,
    }
    base.update(changes)
    return base


def sts(**changes: Any) -> Doc:
    out: Doc = copy.deepcopy(doc()["mta_sts"])
    out.update(changes)
    return out


def findings(*codes: str) -> list[Doc]:
    return [{"code": c, "severity": "warning"} for c in codes]


NOW = doc()

# (rule, the previous check, the changes in words, in order)
CHANGES: list[tuple[str, Doc, list[str]]] = [
    ("same_document_changes_nothing", copy.deepcopy(NOW), []),
    ("verdict_change_is_worded",
     doc(verdict="partial"), ["verdict: partial → protected"]),
    ("protection_change_is_worded",
     doc(protection="none"), ["protection: none → mta-sts"]),
    ("dnssec_change_is_worded",
     doc(dnssec="secure"), ["DNSSEC: secure → insecure"]),
    ("mx_host_added",
     doc(mx=[]), [f"MX host {MX1} added"]),
    ("mx_host_removed",
     doc(mx=[NOW["mx"][0], mx(MX2, address(IP2, CERT_OLD))]), [f"MX host {MX2} removed"]),
    ("mx_hosts_added_and_removed_in_order",
     doc(mx=[mx(MX2), mx("mx0.example.test")]),
     [f"MX host {MX1} added", "MX host mx0.example.test removed", f"MX host {MX2} removed"]),
    ("tlsa_change_is_worded",
     doc(mx=[mx(MX1, address(IP1, CERT_OLD), tlsa=(TLSA_NEW,))]),
     [f"{MX1} TLSA: {TLSA_NEW} → {TLSA_OLD}"]),
    ("tlsa_published_is_worded",
     doc(mx=[mx(MX1, address(IP1, CERT_OLD))]), [f"{MX1} TLSA: none → {TLSA_OLD}"]),
    ("certificate_change_is_worded",
     doc(mx=[mx(MX1, address(IP1, CERT_NEW), tlsa=(TLSA_OLD,))]),
     [f"{MX1} [{IP1}] certificate changed: sha256 {CERT_NEW[:16]}… → {CERT_OLD[:16]}…"]),
    ("certificate_of_an_address_gone_is_no_change",
     doc(mx=[mx(MX1, address(IP1, CERT_OLD), address(IP2, CERT_NEW), tlsa=(TLSA_OLD,))]), []),
    ("intermediate_change_is_no_certificate_change",
     doc(mx=[mx(MX1, address(IP1, CERT_OLD, CERT_NEW), tlsa=(TLSA_OLD,))]), []),
    ("mode_change_is_worded",
     doc(mta_sts=sts(mode="testing")), ["MTA-STS mode: testing → enforce"]),
    ("policy_published_is_worded",
     doc(mta_sts=None),
     ["MTA-STS id: none → 20260501", "MTA-STS mode: none → enforce"]),
    ("id_and_body_change_is_worded",
     doc(mta_sts=sts(id="20260401", policy_sha256=BODY_NEW)),
     ["MTA-STS id: 20260401 → 20260501", "MTA-STS policy body changed"]),
    ("new_finding_is_listed",
     doc(findings=[]), ["new finding dnssec-unsigned"]),
    ("resolved_findings_are_listed_sorted",
     doc(findings=findings("sts-testing", "dnssec-unsigned", "no-protection")),
     ["resolved: no-protection", "resolved: sts-testing"]),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "previous", "expected"), CHANGES, ids=[r[0] for r in CHANGES])
def test_change_is_worded(rule: str, previous: Doc, expected: list[str]) -> None:
    changes, found = compare(previous, NOW)
    assert changes == expected, rule
    assert found == []


def test_rule_names_are_unique() -> None:
    names = [r[0] for r in CHANGES]
    assert len(names) == len(set(names))


def test_tlsa_order_is_no_change() -> None:
    now = doc(mx=[mx(MX1, address(IP1, CERT_OLD), tlsa=(TLSA_OLD, TLSA_NEW))])
    previous = doc(mx=[mx(MX1, address(IP1, CERT_OLD), tlsa=(TLSA_NEW, TLSA_OLD))])
    assert compare(previous, now) == ([], [])


def test_first_check_has_no_history() -> None:
    assert compare(None, NOW) == ([], [])
    assert compare(None, {}) == ([], [])


def test_documents_are_not_changed() -> None:
    previous = doc(verdict="broken", mta_sts=sts(policy_sha256=BODY_NEW))
    before, now_before = copy.deepcopy(previous), copy.deepcopy(NOW)
    compare(previous, NOW)
    assert (previous, NOW) == (before, now_before)


# --- the policy body changed, the id did not (RFC 8461 §3.1) -------------------------------


def test_changed_body_under_the_same_id_is_one_error() -> None:
    changes, found = compare(doc(checked_at=WHEN, mta_sts=sts(policy_sha256=BODY_NEW)), NOW)
    (f,) = found
    assert (f.code, f.severity, f.breaks, f.mx, f.result_type) == (
        "sts-id-unchanged", Severity.ERROR, False, None, None,
    )  # fmt: skip
    assert f.code in CODES
    assert WHEN in f.detail and "'20260501'" in f.detail
    assert f.sender.strip() and "id" in f.fix
    assert changes == ["MTA-STS policy body changed", "new finding sts-id-unchanged"]


def test_changed_body_with_a_new_id_is_no_finding() -> None:
    changes, found = compare(doc(mta_sts=sts(id="20260401", policy_sha256=BODY_NEW)), NOW)
    assert found == []
    assert "MTA-STS policy body changed" in changes


def test_sts_id_unchanged_already_known_is_not_new() -> None:
    previous = doc(
        mta_sts=sts(policy_sha256=BODY_NEW),
        findings=findings("dnssec-unsigned", "sts-id-unchanged"),
    )
    changes, found = compare(previous, NOW)
    assert [f.code for f in found] == ["sts-id-unchanged"]
    assert changes == ["MTA-STS policy body changed"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param({"policy_sha256": None, "id": None}, {}, id="no_policy_before"),
        pytest.param({"policy_sha256": BODY_NEW}, {"policy_sha256": None, "id": None},
                     id="no_policy_now"),
        pytest.param({"policy_sha256": BODY_NEW, "id": None}, {}, id="no_id_before"),
        pytest.param({}, {}, id="same_body"),
    ],
)  # fmt: skip
def test_no_sts_id_unchanged_without_two_bodies_under_one_id(old: Doc, new: Doc) -> None:
    _, found = compare(doc(mta_sts=sts(**old)), doc(mta_sts=sts(**new)))
    assert found == []


# --- malformed previous documents: never raises --------------------------------------------


def _host(**fields: Any) -> Doc:
    return {"mx": [{"host": MX1, **fields}]}


RAISES = "history.compare raises on this previous document instead of ignoring what it cannot read"

# (what is wrong, the previous document, raises today)
MALFORMED: list[tuple[str, Doc, str | None]] = [
    ("empty_object", {}, None),
    ("keys_of_an_older_version_only", {"domain": D, "verdict": "partial"}, None),
    ("mx_is_an_object", {"mx": {"host": MX1}}, None),
    ("mx_lists_names", {"mx": [MX1]}, None),
    ("findings_is_an_object", {"findings": {"code": "no-protection"}}, None),
    ("findings_lists_codes", {"findings": ["no-protection"]}, None),
    ("finding_code_is_a_list", {"findings": [{"code": ["no-protection"]}]}, None),
    ("verdict_is_a_list", {"verdict": ["broken"]}, None),
    ("checked_at_is_null", {"checked_at": None, "mta_sts": sts(policy_sha256=BODY_NEW)}, None),
    ("mta_sts_is_null", {"mta_sts": None}, None),
    ("tlsa_is_a_string", _host(tlsa=TLSA_OLD), None),
    ("certificates_list_names", _host(addresses=[{"address": IP1, "certificates": ["x"]}]),
     None),
    ("address_is_a_list", _host(addresses=[{"address": [IP1], "certificates": [{}]}]), None),
    # These raised once (history.compare read the stored document unchecked).
    ("mx_is_null", {"mx": None}, None),
    ("mx_is_a_number", {"mx": 5}, None),
    ("host_name_is_a_list", {"mx": [{"host": [MX1]}]}, None),
    ("tlsa_is_null", _host(tlsa=None), None),
    ("tlsa_mixes_types", _host(tlsa=[1, TLSA_OLD]), None),
    ("addresses_is_null", _host(addresses=None), None),
    ("addresses_list_strings", _host(addresses=[IP1]), None),
    ("addresses_is_an_object", _host(addresses={IP1: {}}), None),
    ("certificates_is_an_object",
     _host(addresses=[{"address": IP1, "certificates": {"a": 1}}]), None),
    ("mta_sts_is_a_list", {"mta_sts": ["20260501"]}, None),
    ("mta_sts_is_a_string", {"mta_sts": "20260501"}, None),
    ("findings_is_null", {"findings": None}, None),
    ("findings_is_a_number", {"findings": 3}, None),
]  # fmt: skip


def _malformed(rule: str, previous: Doc, bug: str | None) -> Any:
    marks = [pytest.mark.xfail(strict=True, raises=Exception, reason=f"{RAISES}: {bug}")]
    return pytest.param(previous, id=rule, marks=marks if bug else [])


@pytest.mark.parametrize("previous", [_malformed(*r) for r in MALFORMED])
def test_malformed_previous_document_never_raises(previous: Doc) -> None:
    changes, found = compare(previous, NOW)
    assert all(isinstance(c, str) and c for c in changes)
    assert all(f.code in CODES for f in found)


def test_policy_digest_of_another_type_is_no_body_change() -> None:
    """A digest that is not a string is no digest: nothing can be said about the body."""
    changes, found = compare(doc(mta_sts=sts(policy_sha256=5)), NOW)
    assert found == []
    assert "MTA-STS policy body changed" not in changes


WRONG_SHAPES: list[tuple[str, Callable[[Doc], None]]] = [
    ("mx_entry_without_host", lambda d: d["mx"][0].pop("host")),
    ("address_without_certificates", lambda d: d["mx"][0]["addresses"][0].pop("certificates")),
    ("mta_sts_without_digest", lambda d: d["mta_sts"].pop("policy_sha256")),
    ("finding_without_code", lambda d: d["findings"][0].pop("code")),
]


@pytest.mark.parametrize("damage", [pytest.param(f, id=i) for i, f in WRONG_SHAPES])
def test_missing_inner_keys_never_raise(damage: Callable[[Doc], None]) -> None:
    previous = doc()
    damage(previous)
    changes, found = compare(previous, NOW)
    assert all(isinstance(c, str) for c in changes)
    assert found == []
