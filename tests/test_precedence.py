"""The precedence of the defences, as specifications: one row per rule, no network.

Each row names a rule, the facts ``resolve()`` would have gathered (the MX RRset, how each MX
host's lookups ended, MTA-STS, the static list, the local rule) and the parts of the decision
the rule is about. ``precedence.decide`` is pure, so the facts are written down directly; the
lab tests (tests/test_policy_lab.py, tests/test_policy_rules.py) check the same rules against
real peers, and tests/test_resolve_rules.py the DNS outcomes that lead to these facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from mxguard.engine.policy import StsState
from mxguard.engine.precedence import (
    NO_STS,
    Decision,
    DomainFacts,
    HostFacts,
    HostLookup,
    ListFacts,
    MxFacts,
    MxLookup,
    decide,
)
from mxguard.engine.sts import StsOutcome
from mxguard.protocol import dane, localrules, mtasts, policylist
from mxguard.protocol.results import Failure, ResultType

D = "example.test"
MX1, MX2 = "mx1.example.test", "mx2.example.test"
ALIAS = "mx.provider.test"
EE = dane.Tlsa(3, 1, 1, b"\xab" * 32)  # DANE-EE: usable
PKIX_EE = dane.Tlsa(1, 1, 1, b"\xcd" * 32)  # PKIX-EE: unusable for SMTP (RFC 7672 §3.1.3)
FETCH_ERROR = Failure(ResultType.STS_POLICY_FETCH_ERROR, "HTTP 404")

# --- facts ---------------------------------------------------------------------------------


def host(
    name: str = MX1,
    lookup: HostLookup = HostLookup.INSECURE,
    *,
    pref: int = 10,
    addresses: tuple[str, ...] = ("192.0.2.1",),
    **more: Any,
) -> HostFacts:
    return HostFacts(name, pref, lookup, addresses, **more)


def signed(name: str = MX1, *records: dane.Tlsa, pref: int = 10, **more: Any) -> HostFacts:
    """A host with secure address records and a secure TLSA RRset at its own name."""
    more.setdefault("tlsa_base", name)
    return host(name, HostLookup.TLSA, pref=pref, tlsa=dane.classify(records), **more)


def facts(
    *hosts: HostFacts,
    mx: MxLookup = MxLookup.HOSTS,
    secure: bool = False,
    detail: str = "",
    sts: StsOutcome = NO_STS,
    listed: ListFacts | None = None,
    rule: localrules.Rule | None = None,
) -> DomainFacts:
    return DomainFacts(D, MxFacts(mx, secure, detail, hosts), sts, listed or ListFacts(), rule)


def sts(
    mode: str,
    *patterns: str,
    from_cache: bool = False,
    errors: tuple[Failure, ...] = (),
    notes: tuple[str, ...] = (),
) -> StsOutcome:
    policy = mtasts.Policy("STSv1", mtasts.Mode(mode), 86400, patterns)
    state = StsState("20260101T000000", mtasts.Mode(mode), 86400, patterns, (), None, None,
                     from_cache, None)  # fmt: skip
    return StsOutcome(policy, state, errors, notes)


def listing(mode: str, *patterns: str, expired: bool = False) -> ListFacts:
    return ListFacts(policylist.ListPolicy(mtasts.Mode(mode), patterns), expired=expired)


def floor(label: str, pattern: str = D) -> localrules.Rule:
    suffix = pattern.startswith(".")
    return localrules.Rule(pattern.lstrip("."), suffix, localrules.Floor.from_label(label))


# --- what is compared ----------------------------------------------------------------------


def mx(
    name: str,
    tls: str = "opportunistic",
    auth: str = "none",
    *,
    allowed: bool = True,
    report_only: bool = False,
    source: str = "none",
    defer: str | None = None,
) -> tuple[Any, ...]:
    """One MX host as the rows describe it."""
    return (name, allowed, tls, auth, report_only, source, defer)


# RFC 8460 §4.3.3: a DNS lookup that got no answer is no negotiation failure: no result type.
DNS_ERROR = "(DNS error: no result type)"


def kind(f: Failure) -> str:
    return f.reported_type or DNS_ERROR


def view(d: Decision) -> dict[str, Any]:
    return {
        "policy": (d.source, d.mode, d.status),
        "mx": [
            mx(
                m.host,
                m.tls,
                m.auth,
                allowed=m.allowed,
                report_only=m.report_only,
                source=m.source,
                defer=kind(m.defer) if m.defer else None,
            )
            for m in d.mx
        ],
        "defers": [(kind(m.defer), m.defer.detail) if m.defer else None for m in d.mx],
        "dnssec": [m.dnssec for m in d.mx],
        "tlsa": [[t.to_text() for t in m.tlsa] for m in d.mx],
        "tlsa_name": [m.tlsa_name for m in d.mx],
        "names": [m.names for m in d.mx],
        "notes": [list(m.notes) for m in d.mx],
        "errors": [(kind(e), e.detail) for e in d.errors],
        "warnings": list(d.warnings),
        "explanation": list(d.explanation),
        "local_floor": d.local_floor,
    }


NO_POLICY = "no policy: opportunistic STARTTLS, which an on-path attacker can strip"
NO_HOST = "deferred: no MX host may be used now"
UNUSABLE = (
    "only unusable TLSA records: TLS is required, but DANE cannot authenticate the certificate"
)
EXPIRED = (
    "the static policy list has EXPIRED; list entries are ignored and delivery falls back to "
    "opportunistic TLS for unlisted protection — update the list"
)
STS_ENFORCE_MX1 = "MTA-STS enforce policy (max_age 86400 s): verified TLS to mx1.example.test"
OK_NONE = ("none", "none", "ok")

# (rule, facts, the parts of the decision the rule is about)
RULES: list[tuple[str, DomainFacts, Mapping[str, Any]]] = [
    # --- the MX RRset: RFC 5321 §5.1, RFC 7505 §3, RFC 7672 §2.1.1 ------------------------
    ("temporary_failure_defers_domain",
     facts(mx=MxLookup.FAILED, detail="timed out", sts=sts("enforce", MX1),
           listed=listing("enforce", MX1), rule=floor("verified")),
     {"policy": ("none", "none", "defer"), "mx": [], "local_floor": None,
      "errors": [(DNS_ERROR, "timed out")],
      "explanation": ["deferred: timed out"]}),
    ("bogus_mx_defers_with_dnssec_invalid",
     facts(mx=MxLookup.BOGUS, detail="DNSSEC validation failed"),
     {"policy": ("none", "none", "defer"),
      "errors": [("dnssec-invalid", "MX lookup: DNSSEC validation failed")]}),
    ("settled_domain_keeps_what_mta_sts_found",
     facts(mx=MxLookup.FAILED, detail="timed out",
           sts=StsOutcome(None, None, (FETCH_ERROR,), ("_mta-sts TXT lookup failed",))),
     {"errors": [("sts-policy-fetch-error", "HTTP 404"),
                 (DNS_ERROR, "timed out")],
      "warnings": ["_mta-sts TXT lookup failed"]}),
    ("nxdomain_fails_domain",
     facts(mx=MxLookup.NXDOMAIN),
     {"policy": ("none", "none", "fail"), "errors": [],
      "explanation": ["example.test does not exist"]}),
    ("null_mx",
     facts(mx=MxLookup.NULL, sts=sts("enforce", MX1)),
     {"policy": ("none", "none", "fail"), "mx": [],
      "explanation": ["example.test publishes a null MX (RFC 7505): it accepts no mail"]}),
    ("no_mx_records_means_implicit_mx",
     facts(host(D, pref=0), mx=MxLookup.IMPLICIT),
     {"policy": OK_NONE, "mx": [mx(D)],
      "warnings": ["example.test has no MX records; using the domain itself (implicit MX)"]}),
    # --- one MX host's lookups: RFC 7672 §2.1.1, §2.2 ---------------------------------------
    ("bogus_address_defers_host",
     facts(host(lookup=HostLookup.ADDRESS_BOGUS, addresses=(), detail="DNSSEC validation failed")),
     {"policy": ("none", "none", "defer"), "dnssec": ["bogus"],
      "defers": [("dnssec-invalid", "DNSSEC validation failed")],
      "errors": [("dnssec-invalid", "DNSSEC validation failed")],
      "explanation": [NO_POLICY, NO_HOST]}),
    ("temporary_address_failure_defers_never_no_address",
     facts(host(lookup=HostLookup.ADDRESS_FAILED, addresses=(), detail="timed out")),
     {"policy": ("none", "none", "defer"), "dnssec": ["indeterminate"],
      "defers": [(DNS_ERROR, "timed out")]}),
    ("proof_of_no_address_fails_domain",
     facts(host(addresses=(), notes=("mx1.example.test has no address records",))),
     {"policy": ("none", "none", "fail"), "errors": [],
      "notes": [["mx1.example.test has no address records"]],
      "explanation": [NO_POLICY, "no MX host has an address: the domain cannot receive mail"]}),
    ("one_usable_host_is_enough",
     facts(host(MX1, HostLookup.ADDRESS_FAILED, addresses=(), detail="timed out"),
           host(MX2, pref=20)),
     {"policy": OK_NONE, "explanation": [NO_POLICY],
      "mx": [mx(MX1, defer=DNS_ERROR), mx(MX2)],
      "errors": [(DNS_ERROR, "timed out")]}),
    ("unsigned_addresses_never_make_dane",
     facts(host(tlsa=dane.classify([EE]), tlsa_base=MX1)),
     {"policy": OK_NONE, "mx": [mx(MX1)], "dnssec": ["insecure"], "tlsa": [[]]}),
    ("usable_tlsa_requires_dane",
     facts(signed(MX1, EE)),
     {"policy": ("dane", "enforce", "ok"), "mx": [mx(MX1, "required", "dane", source="dane")],
      "dnssec": ["secure"], "tlsa": [[EE.to_text()]], "tlsa_name": [MX1],
      "explanation": ["DANE: 1 usable TLSA record(s) on 1 signed MX host(s)"]}),
    ("unusable_tlsa_still_requires_tls",
     facts(signed(MX1, PKIX_EE)),
     {"policy": ("dane", "enforce", "ok"), "mx": [mx(MX1, "required", "none", source="dane")],
      "tlsa": [[]], "notes": [[UNUSABLE]],
      "explanation": ["DANE: only unusable TLSA records: TLS required, not authenticated"]}),
    ("bogus_tlsa_defers_never_falls_back",
     facts(host(lookup=HostLookup.TLSA_BOGUS, tlsa_base=MX1, detail="DNSSEC validation failed"),
           sts=sts("enforce", MX1)),
     {"policy": ("mta-sts", "enforce", "defer"), "dnssec": ["secure"], "tlsa": [[]],
      "mx": [mx(MX1, "required", "pkix", source="mta-sts", defer="dnssec-invalid")],
      "defers": [("dnssec-invalid", "TLSA lookup: DNSSEC validation failed")],
      "explanation": [STS_ENFORCE_MX1, NO_HOST]}),
    ("failed_tlsa_defers_host_never_unauthenticated",
     facts(host(MX1, HostLookup.TLSA_FAILED, tlsa_base=MX1, detail="timed out"),
           host(MX2, pref=20)),
     {"policy": OK_NONE, "dnssec": ["indeterminate", "insecure"],
      "mx": [mx(MX1, defer=DNS_ERROR), mx(MX2)],
      "defers": [(DNS_ERROR, "timed out"), None]}),
    ("unsigned_tlsa_is_ignored",
     facts(host(lookup=HostLookup.TLSA_UNSIGNED, tlsa_base=MX1, notes=("AAAA timed out",))),
     {"policy": OK_NONE, "mx": [mx(MX1)], "dnssec": ["secure"], "tlsa_name": [MX1],
      "notes": [["AAAA timed out",
                 "TLSA records at _25._tcp.mx1.example.test are not DNSSEC-signed: ignored"]]}),
    ("secure_denial_of_tlsa_means_no_dane",
     facts(host(lookup=HostLookup.NO_TLSA)),
     {"policy": OK_NONE, "mx": [mx(MX1)], "dnssec": ["secure"], "explanation": [NO_POLICY]}),
    # RFC 7671 §7: the CNAME-expanded name is the TLSA base domain when its TLSA RRset decided.
    ("cname_host_uses_the_expanded_tlsa_base",
     facts(signed(MX1, EE, canonical=ALIAS, tlsa_base=ALIAS)),
     {"mx": [mx(MX1, "required", "dane", source="dane")], "tlsa_name": [ALIAS],
      "names": [(ALIAS, MX1)]}),
    # RFC 7672 §3.2.2: the next-hop domain is a reference name only under a signed MX RRset.
    ("next_hop_domain_is_a_name_under_signed_mx",
     facts(signed(MX1, EE), secure=True),
     {"names": [(MX1, D)]}),
    ("next_hop_domain_is_no_name_under_unsigned_mx",
     facts(signed(MX1, EE), secure=False),
     {"names": [(MX1,)]}),
    # --- DANE and MTA-STS: RFC 8461 §2 ------------------------------------------------------
    ("dane_over_mta_sts",
     facts(signed(MX1, EE), sts=sts("enforce", MX2)),
     {"policy": ("dane", "enforce", "ok"), "mx": [mx(MX1, "required", "dane", source="dane")],
      "explanation": ["DANE: 1 usable TLSA record(s) on 1 signed MX host(s) — takes precedence "
                      "over the MTA-STS enforce policy"]}),
    ("mta_sts_applies_where_dane_does_not",
     facts(signed(MX1, EE), host(MX2, pref=20), sts=sts("enforce", "*.example.test")),
     {"policy": ("dane", "enforce", "ok"),
      "mx": [mx(MX1, "required", "dane", source="dane"),
             mx(MX2, "required", "pkix", source="mta-sts")]}),
    ("mta_sts_authenticates_where_tlsa_is_unusable",
     facts(signed(MX1, PKIX_EE), sts=sts("enforce", MX1)),
     {"policy": ("mta-sts", "enforce", "ok"),
      "mx": [mx(MX1, "required", "pkix", source="mta-sts")], "notes": [[UNUSABLE]]}),
    # --- MTA-STS: RFC 8461 §4.1, §4.2, §5 ---------------------------------------------------
    ("sts_enforce_requires_verified_tls",
     facts(host(MX1), sts=sts("enforce", MX1)),
     {"policy": ("mta-sts", "enforce", "ok"),
      "mx": [mx(MX1, "required", "pkix", source="mta-sts")],
      "explanation": [STS_ENFORCE_MX1]}),
    ("sts_enforce_excludes_unlisted_mx",
     facts(host(MX1), host(MX2, pref=20), sts=sts("enforce", MX1)),
     {"policy": ("mta-sts", "enforce", "ok"),
      "mx": [mx(MX1, "required", "pkix", source="mta-sts"),
             mx(MX2, allowed=False, source="mta-sts")],
      "notes": [[], ["not an MX host the mta-sts policy allows: never used"]]}),
    # RFC 8461 §5.1: no permanent failure on MTA-STS grounds; a new policy may be coming.
    ("sts_enforce_without_a_listed_mx_defers_never_fails",
     facts(host(MX2), sts=sts("enforce", MX1)),
     {"policy": ("mta-sts", "enforce", "defer"), "errors": [],
      "explanation": ["MTA-STS enforce policy (max_age 86400 s): verified TLS to "
                      "mx1.example.test", NO_HOST]}),
    ("testing_never_blocks",
     facts(host(MX1), host(MX2, pref=20), sts=sts("testing", MX1)),
     {"policy": ("mta-sts", "testing", "ok"),
      "mx": [mx(MX1, report_only=True, source="mta-sts"),
             mx(MX2, report_only=True, source="mta-sts")],
      "notes": [[], ["not an MX host the mta-sts policy lists (testing: reported, still used)"]],
      "explanation": ["MTA-STS testing policy (max_age 86400 s): verified TLS to "
                      "mx1.example.test — reported, not enforced"]}),
    # RFC 8461 §8.3: mode none withdraws the policy.
    ("sts_mode_none_is_no_policy",
     facts(host(MX1), sts=sts("none")),
     {"policy": OK_NONE, "mx": [mx(MX1)],
      "explanation": [NO_POLICY, "MTA-STS mode none: the domain has withdrawn its policy"]}),
    ("cached_sts_policy_says_so",
     facts(host(MX1), sts=sts("enforce", MX1, from_cache=True)),
     {"explanation": ["MTA-STS enforce policy (max_age 86400 s, from the cache): verified TLS "
                      "to mx1.example.test"]}),
    ("sts_findings_come_before_host_failures",
     facts(host(lookup=HostLookup.ADDRESS_FAILED, addresses=(), detail="timed out"),
           sts=StsOutcome(None, None, (FETCH_ERROR,), ("_mta-sts TXT is unusable",)),
           mx=MxLookup.IMPLICIT),
     {"errors": [("sts-policy-fetch-error", "HTTP 404"),
                 (DNS_ERROR, "timed out")],
      "warnings": ["_mta-sts TXT is unusable",
                   "example.test has no MX records; using the domain itself (implicit MX)"]}),
    # --- the static list (no RFC; docs/rfc-notes.md) ---------------------------------------
    ("list_enforce_stands_in_for_mta_sts",
     facts(host(MX1), host(MX2, pref=20), listed=listing("enforce", MX1)),
     {"policy": ("list", "enforce", "ok"),
      "mx": [mx(MX1, "required", "pkix", source="list"),
             mx(MX2, allowed=False, source="list")],
      "notes": [[], ["not an MX host the list policy allows: never used"]],
      "explanation": ["static policy list entry (enforce)"]}),
    ("list_testing_reports_only",
     facts(host(MX1), listed=listing("testing", MX2)),
     {"policy": ("list", "testing", "ok"), "mx": [mx(MX1, report_only=True, source="list")],
      "notes": [["not an MX host the list policy lists (testing: reported, still used)"]]}),
    ("list_applies_only_without_mta_sts",
     facts(host(MX1), sts=sts("testing", MX1), listed=listing("enforce", MX1)),
     {"policy": ("mta-sts", "testing", "ok"),
      "mx": [mx(MX1, report_only=True, source="mta-sts")]}),
    # Today a published mode none also keeps the list away (an MTA-STS policy exists).
    ("sts_mode_none_also_keeps_the_list_away",
     facts(host(MX1), sts=sts("none"), listed=listing("enforce", MX1)),
     {"policy": OK_NONE, "mx": [mx(MX1)]}),
    ("expired_list_is_ignored_loudly",
     facts(host(MX1), listed=listing("enforce", MX1, expired=True)),
     {"policy": OK_NONE, "mx": [mx(MX1)], "warnings": [EXPIRED], "explanation": [NO_POLICY]}),
    ("expired_list_is_not_mentioned_under_mta_sts",
     facts(host(MX1), sts=sts("enforce", MX1), listed=listing("enforce", MX1, expired=True)),
     {"policy": ("mta-sts", "enforce", "ok"), "warnings": []}),
    # --- local rules (no RFC; protocol/localrules.py): a floor only raises ----------------------
    ("local_tls_floor_requires_tls",
     facts(host(MX1), rule=floor("tls")),
     {"policy": ("local", "enforce", "ok"), "mx": [mx(MX1, "required", "none", source="local")],
      "explanation": ["local rule 'example.test': at least tls"], "local_floor": "tls"}),
    ("local_verified_floor_requires_pkix",
     facts(host(MX1), rule=floor("verified")),
     {"policy": ("local", "enforce", "ok"), "mx": [mx(MX1, "required", "pkix", source="local")],
      "local_floor": "verified"}),
    # RFC 8460 §4.3.2.1: DANE required and not available is dane-required.
    ("local_dane_floor_defers_without_dane",
     facts(host(MX1), rule=floor("dane")),
     {"policy": ("local", "enforce", "defer"),
      "mx": [mx(MX1, source="local", defer="dane-required")],
      "defers": [("dane-required", "a local rule requires DANE, and mx1.example.test has no "
                                   "usable DANE TLSA records")],
      "explanation": ["local rule 'example.test': at least dane", NO_HOST]}),
    ("local_dane_floor_is_met_by_dane",
     facts(signed(MX1, EE), rule=floor("dane")),
     {"policy": ("dane", "enforce", "ok"), "mx": [mx(MX1, "required", "dane", source="dane")],
      "local_floor": "dane"}),
    ("local_dane_floor_keeps_an_earlier_defer",
     facts(host(lookup=HostLookup.TLSA_FAILED, tlsa_base=MX1, detail="timed out"),
           rule=floor("dane")),
     {"defers": [(DNS_ERROR, "timed out")]}),
    ("local_floor_only_raises",
     facts(signed(MX1, EE), host(MX2, pref=20), sts=sts("enforce", "*.example.test"),
           rule=floor("tls")),
     {"policy": ("dane", "enforce", "ok"),
      "mx": [mx(MX1, "required", "dane", source="dane"),
             mx(MX2, "required", "pkix", source="mta-sts")]}),
    ("local_floor_raises_testing",
     facts(host(MX1), sts=sts("testing", MX1), rule=floor("verified")),
     {"policy": ("mta-sts", "testing", "ok"),
      "mx": [mx(MX1, "required", "pkix", report_only=True, source="mta-sts")]}),
    ("local_verified_floor_authenticates_unusable_tlsa",
     facts(signed(MX1, PKIX_EE), rule=floor("verified")),
     {"policy": ("dane", "enforce", "ok"), "mx": [mx(MX1, "required", "pkix", source="dane")]}),
    ("local_floor_none_changes_nothing",
     facts(host(MX1), rule=floor("none")),
     {"policy": OK_NONE, "mx": [mx(MX1)], "local_floor": "none",
      "explanation": [NO_POLICY, "local rule 'example.test': at least none"]}),
    ("suffix_rule_is_named_as_written",
     facts(host(MX1), rule=floor("verified", ".test")),
     {"mx": [mx(MX1, "required", "pkix", source="local")],
      "explanation": ["local rule '.test': at least verified"]}),
    # --- nothing applies: RFC 3207 §6 --------------------------------------------------------
    ("no_policy_is_opportunistic",
     facts(host(MX1)),
     {"policy": OK_NONE, "mx": [mx(MX1)], "errors": [], "warnings": [],
      "explanation": [NO_POLICY], "local_floor": None}),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "given", "expected"), RULES, ids=[r[0] for r in RULES])
def test_precedence_rule(rule: str, given: DomainFacts, expected: Mapping[str, Any]) -> None:
    got = view(decide(given))
    assert {key: got[key] for key in expected} == dict(expected), rule


def test_rule_names_are_unique() -> None:
    names = [r[0] for r in RULES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("lookup", list(HostLookup), ids=[x.value for x in HostLookup])
def test_every_host_lookup_outcome_is_decided(lookup: HostLookup) -> None:
    d = decide(facts(host(lookup=lookup, tlsa_base=MX1, detail="why")))
    (m,) = d.mx
    # A host that is deferred is never usable, and its failure is among the domain's errors.
    assert (m.defer is None) is m.usable
    assert list(d.errors) == ([m.defer] if m.defer else [])


@pytest.mark.parametrize("lookup", list(MxLookup), ids=[x.value for x in MxLookup])
def test_every_mx_lookup_outcome_is_decided(lookup: MxLookup) -> None:
    d = decide(facts(host(MX1), mx=lookup, detail="why"))
    # Only MX records (or the implicit MX) lead to MX hosts; anything else settles the domain.
    settles = lookup not in (MxLookup.HOSTS, MxLookup.IMPLICIT)
    assert (d.mx == ()) is settles
    assert d.status == ("ok" if not settles else "fail" if d.errors == () else "defer")
