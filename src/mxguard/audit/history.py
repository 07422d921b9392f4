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
    """(changes in words, findings) from the previous check's JSON to this one's."""
    if previous is None:
        return [], []
    changes: list[str] = []
    when = previous.get("checked_at", "the last check")

    def changed(what: str, old: Any, new: Any) -> None:
        if old != new:
            changes.append(f"{what}: {_show(old)} → {_show(new)}")

    changed("verdict", previous.get("verdict"), now.get("verdict"))
    changed("protection", previous.get("protection"), now.get("protection"))
    changed("DNSSEC", previous.get("dnssec"), now.get("dnssec"))
    old_hosts = {h.get("host"): h for h in previous.get("mx", []) if isinstance(h, dict)}
    new_hosts = {h.get("host"): h for h in now.get("mx", []) if isinstance(h, dict)}
    for host in sorted(set(new_hosts) - set(old_hosts), key=str):
        changes.append(f"MX host {host} added")
    for host in sorted(set(old_hosts) - set(new_hosts), key=str):
        changes.append(f"MX host {host} removed")
    for host in sorted(set(old_hosts) & set(new_hosts), key=str):
        old, new = old_hosts[host], new_hosts[host]
        changed(f"{host} TLSA", sorted(old.get("tlsa", [])), sorted(new.get("tlsa", [])))
        old_leaf, new_leaf = _leaves(old), _leaves(new)
        for address in sorted(set(old_leaf) & set(new_leaf)):
            if old_leaf[address] != new_leaf[address]:
                changes.append(
                    f"{host} [{address}] certificate changed: sha256 "
                    f"{old_leaf[address][:16]}… → {new_leaf[address][:16]}…"
                )
    old_sts, new_sts = previous.get("mta_sts") or {}, now.get("mta_sts") or {}
    changed("MTA-STS id", old_sts.get("id"), new_sts.get("id"))
    changed("MTA-STS mode", old_sts.get("mode"), new_sts.get("mode"))
    old_body, new_body = old_sts.get("policy_sha256"), new_sts.get("policy_sha256")
    findings: list[Finding] = []
    if old_body and new_body and old_body != new_body:
        changes.append("MTA-STS policy body changed")
        old_id, new_id = old_sts.get("id"), new_sts.get("id")
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


def _leaves(host: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in host.get("addresses", []):
        certs = a.get("certificates") or []
        if isinstance(a, dict) and certs and isinstance(certs[0], dict):
            out[str(a.get("address"))] = str(certs[0].get("sha256"))
    return out


def _codes(doc: Mapping[str, Any]) -> set[str]:
    return {
        str(f.get("code")) for f in doc.get("findings", []) if isinstance(f, dict) and f.get("code")
    }


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)
