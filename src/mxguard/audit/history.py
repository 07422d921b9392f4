"""What changed since the previous check of a domain (pure: two JSON documents in, words out).

The previous check is the JSON document ``DomainCheck.to_json()`` made then, as the store kept
it. Besides listing changes, one of them is a finding: an MTA-STS policy body that changed
while the ``_mta-sts`` TXT ``id`` did not. Senders refetch a policy only when the id changes
(or the cached copy is half-way to expiry), so the ones that cached the old body keep
applying it, up to its ``max_age`` (RFC 8461 §3.1, §5.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mxguard.audit.model import Finding, Severity


def compare(
    previous: Mapping[str, Any] | None, now: Mapping[str, Any]
) -> tuple[list[str], list[Finding]]:
    """(changes in words, findings) from the previous check's JSON to this one's.

    The previous document comes from the store and may have been written by another version
    (or edited): every value is read defensively, and a value of the wrong type counts as
    absent, never as an error."""
    if previous is None:
        return [], []
    changes: list[str] = []
    when = _text(previous.get("checked_at")) or "the last check"

    def changed(what: str, old: Any, new: Any) -> None:
        if old != new:
            changes.append(f"{what}: {_show(old)} → {_show(new)}")

    for key, what in (("verdict", "verdict"), ("protection", "protection"), ("dnssec", "DNSSEC")):
        changed(what, _text(previous.get(key)), _text(now.get(key)))
    old_hosts, new_hosts = _hosts(previous), _hosts(now)
    for host in sorted(set(new_hosts) - set(old_hosts)):
        changes.append(f"MX host {host} added")
    for host in sorted(set(old_hosts) - set(new_hosts)):
        changes.append(f"MX host {host} removed")
    for host in sorted(set(old_hosts) & set(new_hosts)):
        old, new = old_hosts[host], new_hosts[host]
        changed(f"{host} TLSA", _texts(old.get("tlsa")), _texts(new.get("tlsa")))
        old_leaf, new_leaf = _leaves(old), _leaves(new)
        for address in sorted(set(old_leaf) & set(new_leaf)):
            if old_leaf[address] != new_leaf[address]:
                changes.append(
                    f"{host} [{address}] certificate changed: sha256 "
                    f"{old_leaf[address][:16]}… → {new_leaf[address][:16]}…"
                )
    old_sts, new_sts = _mapping(previous.get("mta_sts")), _mapping(now.get("mta_sts"))
    old_id, new_id = _text(old_sts.get("id")), _text(new_sts.get("id"))
    changed("MTA-STS id", old_id, new_id)
    changed("MTA-STS mode", _text(old_sts.get("mode")), _text(new_sts.get("mode")))
    old_body, new_body = _text(old_sts.get("policy_sha256")), _text(new_sts.get("policy_sha256"))
    findings: list[Finding] = []
    if old_body and new_body and old_body != new_body:
        changes.append("MTA-STS policy body changed")
        if old_id is not None and old_id == new_id:
            findings.append(
                Finding(
                    "sts-id-unchanged",
                    Severity.ERROR,
                    f"the policy body changed since {when} but the TXT id is still {new_id!r}",
                    "senders that cached the old policy do not fetch the new one: they keep "
                    "applying the old body until its max_age runs out (RFC 8461 §3.1)",
                    "publish a new id in the _mta-sts TXT record (e.g. the current date and "
                    "time) whenever the policy changes",
                )
            )
    old_codes = _codes(previous)
    new_codes = _codes(now) | {f.code for f in findings}
    for code in sorted(new_codes - old_codes):
        changes.append(f"new finding {code}")
    for code in sorted(old_codes - new_codes):
        changes.append(f"resolved: {code}")
    return changes, findings


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _texts(value: Any) -> list[str]:
    return sorted(v for v in _list(value) if isinstance(v, str))


def _hosts(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for h in _list(doc.get("mx")):
        host = _text(_mapping(h).get("host"))
        if host is not None:
            out[host] = _mapping(h)
    return out


def _leaves(host: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in _list(host.get("addresses")):
        certs = _list(_mapping(a).get("certificates"))
        address = _text(_mapping(a).get("address"))
        digest = _text(_mapping(certs[0]).get("sha256")) if certs else None
        if address is not None and digest is not None:
            out[address] = digest
    return out


def _codes(doc: Mapping[str, Any]) -> set[str]:
    codes = (_text(_mapping(f).get("code")) for f in _list(doc.get("findings")))
    return {c for c in codes if c}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)
