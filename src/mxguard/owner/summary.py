"""`mxguard tlsrpt summary`: what the TLS reports received for a domain say, and whether an
MTA-STS ``enforce`` policy would have refused honest mail (docs/reports-rollout.md).

A domain owner publishes MTA-STS in ``testing`` mode first: senders check the MX hosts as
under ``enforce``, deliver anyway and say in their daily TLS reports (RFC 8460 §4) what
failed. This module reads those reports back from the report inbox (``ReportInbox``) for a
window of days and decides, together with a fresh ``mxguard check`` of the domain, whether
switching to ``enforce`` is safe. What counts (docs/reports-rollout.md has the reasons):

- **Blockers from the reports** (``Category.CERTIFICATE``, ``MX_NOT_COVERED``,
  ``STS_POLICY``): sessions that failed on the certificate (``certificate-*``,
  ``validation-failure``, RFC 8460 §4.3.1) under an ``sts`` policy or under none; sessions at
  an MX host the policy to be enforced does not cover (RFC 8461 §4.1); and MTA-STS policy
  failures (``sts-*``, RFC 8460 §4.3.2.2) reported under an ``sts`` policy: senders that
  hold the policy cannot refresh it, and would keep enforcing a stale one. Under ``enforce``
  each of these is mail refused or a sender left behind (RFC 8461 §5).
- **Signals, not blockers**: ``starttls-not-supported``. When the check sees STARTTLS on
  every MX host, a sender that saw none had it removed on its path: a STRIPTLS attack, which
  is what ``enforce`` makes senders refuse. A host that really lacks STARTTLS is the check's
  blocker, not the reports'.
- **Warnings**: failures of DANE senders (``policy-type`` ``tlsa``, or the DANE result types):
  for those senders DANE overrides MTA-STS (RFC 8461 §2), so ``enforce`` changes nothing for
  them; ``sts-*`` failures of senders that have no policy (discovery that did not finish);
  result types this version does not know.
- **No evidence**: no report, or reports of no session, in the window is a blocker: readiness
  needs what senders saw, not only what mxguard sees from here.

``ReportEvidence`` (``evidence``) and ``decide`` are pure; ``gather`` reads the inbox and
``summarise`` adds the check.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mxguard.adapters.store import ReceivedRecord, ReportInbox
from mxguard.audit.auditor import Auditor
from mxguard.audit.model import DomainCheck
from mxguard.config import Settings
from mxguard.owner import publish
from mxguard.protocol.mtasts import Mode, Policy
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import PolicyType

DEFAULT_DAYS = 14  # a fortnight: weekly patterns show, and a fix is not history for long
MAX_DAYS = 366
# `sts publish --mode enforce` looks at the reports of the last whole UTC day and of today:
# the freshest evidence, without the failures of before a fix (docs/reports-rollout.md).
ENFORCE_REPORT_DAYS = 1
MAX_SENDERS_NAMED = 3  # senders named in one blocker's sentence; the JSON lists them all
MAX_DETAILS = 3  # distinct failure-reason codes or additional-information texts kept per group

_CERTIFICATE_TYPES = frozenset(
    {
        ResultType.CERTIFICATE_HOST_MISMATCH,
        ResultType.CERTIFICATE_EXPIRED,
        ResultType.CERTIFICATE_NOT_TRUSTED,
        ResultType.VALIDATION_FAILURE,
    }
)
_DANE_TYPES = frozenset(
    {ResultType.TLSA_INVALID, ResultType.DNSSEC_INVALID, ResultType.DANE_REQUIRED}
)


class Category(enum.StrEnum):
    """What a group of failed sessions means for an ``enforce`` rollout."""

    CERTIFICATE = "certificate"  # blocker: the MX certificate fails for senders
    MX_NOT_COVERED = "mx-not-covered"  # blocker: senders used an MX host the policy misses
    STS_POLICY = "sts-policy"  # blocker: senders holding the policy cannot refresh it
    STARTTLS = "starttls"  # signal: STARTTLS missing on the way (stripping)
    STS_DISCOVERY = "sts-discovery"  # warning: senders without the policy could not fetch it
    DANE = "dane"  # warning: DANE senders, whom MTA-STS does not concern (RFC 8461 §2)
    OTHER = "other"  # warning: a result type this version does not know

    @property
    def blocks(self) -> bool:
        return self in _BLOCKING


_BLOCKING = frozenset({Category.CERTIFICATE, Category.MX_NOT_COVERED, Category.STS_POLICY})


def classify(policy_type: PolicyType | str, result_type: ResultType | str) -> Category:
    """The category of failed sessions of ``result_type`` reported under ``policy_type``."""
    if not isinstance(result_type, ResultType):
        return Category.OTHER
    if result_type is ResultType.STARTTLS_NOT_SUPPORTED:
        return Category.STARTTLS
    if result_type in _CERTIFICATE_TYPES:
        # A DANE sender judged the certificate by its TLSA records, not by WebPKI.
        return Category.DANE if policy_type == PolicyType.TLSA else Category.CERTIFICATE
    if result_type.is_sts_policy_failure:
        return Category.STS_POLICY if policy_type == PolicyType.STS else Category.STS_DISCOVERY
    if result_type in _DANE_TYPES:
        return Category.DANE
    return Category.OTHER  # pragma: no cover - every ResultType is named above


# --------------------------------------------------------------------------- the evidence


@dataclass(frozen=True, slots=True)
class Cell:
    """Failed sessions of one kind: reported under ``policy_type`` with ``result_type`` at
    ``mx_host`` (None: the reports did not say) by ``organization``, added up over the window."""

    policy_type: str
    result_type: ResultType | str
    mx_host: str | None
    organization: str
    sessions: int
    details: tuple[str, ...] = ()  # failure-reason-code / additional-information, first few


@dataclass(frozen=True, slots=True)
class SenderTotals:
    organization: str
    reports: int
    successful: int
    failed: int
    dkim_verified: int  # reports in e-mails whose DKIM signature verified

    def to_json(self) -> dict[str, Any]:
        return {
            "organization": self.organization,
            "reports": self.reports,
            "successful": self.successful,
            "failed": self.failed,
            "dkim_verified": self.dkim_verified,
        }


@dataclass(frozen=True, slots=True)
class ReportEvidence:
    """What the reports received for ``domain`` whose date range starts in [start, end) say,
    under the policies they report for that domain. Session totals come from the summaries;
    the cells from the failure details, which senders may leave incomplete."""

    domain: str
    start: dt.datetime
    end: dt.datetime
    reports: int = 0
    successful: int = 0
    failed: int = 0
    senders: tuple[SenderTotals, ...] = ()  # most failed sessions first
    cells: tuple[Cell, ...] = ()

    @property
    def sessions(self) -> int:
        return self.successful + self.failed

    def by_result_type(self) -> list[dict[str, Any]]:
        totals: dict[str, int] = {}
        for c in self.cells:
            totals[str(c.result_type)] = totals.get(str(c.result_type), 0) + c.sessions
        return [
            {"result_type": k, "failed": n}
            for k, n in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    def by_mx(self) -> list[dict[str, Any]]:
        hosts: dict[str | None, dict[str, int]] = {}
        for c in self.cells:
            per = hosts.setdefault(c.mx_host, {})
            per[str(c.result_type)] = per.get(str(c.result_type), 0) + c.sessions
        rows = [
            {"mx_host": h, "failed": sum(per.values()),
             "result_types": dict(sorted(per.items(), key=lambda kv: (-kv[1], kv[0])))}
            for h, per in hosts.items()
        ]  # fmt: skip
        return sorted(rows, key=lambda r: (-r["failed"], r["mx_host"] is None, r["mx_host"] or ""))

    def groups(self, policy: Policy | None) -> list[Group]:
        """The cells grouped by what they mean for ``policy`` (the policy to be enforced): a
        failure at an MX host it does not cover is about coverage, whatever its type."""
        found: dict[tuple[Category, str, str | None], _GroupBuilder] = {}
        for c in self.cells:
            kind = classify(c.policy_type, c.result_type)
            key = (kind, str(c.result_type), c.mx_host)
            if c.mx_host is not None and policy is not None and not policy.allows(c.mx_host):
                key = (Category.MX_NOT_COVERED, "", c.mx_host)
            found.setdefault(key, _GroupBuilder(*key)).add(c)
        groups = [b.build() for b in found.values()]
        return sorted(groups, key=lambda g: (not g.category.blocks, -g.sessions, g.result_type,
                                             g.mx_host or ""))  # fmt: skip

    def blockers(self, policy: Policy | None, *, days: int | None = None) -> list[Blocker]:
        """The reports' blockers of an ``enforce`` rollout of ``policy`` (module docstring)."""
        return [_group_blocker(self, g, days) for g in self.groups(policy) if g.category.blocks]


@dataclass(frozen=True, slots=True)
class Group:
    """Cells of one category, result type and MX host, with the senders that reported them."""

    category: Category
    result_type: str  # "" for MX_NOT_COVERED (all types together)
    mx_host: str | None
    sessions: int
    senders: tuple[tuple[str, int], ...]  # (organization, failed sessions), most first
    result_types: tuple[str, ...]
    details: tuple[str, ...]


@dataclass
class _GroupBuilder:
    category: Category
    result_type: str
    mx_host: str | None
    sessions: int = 0
    senders: dict[str, int] = field(default_factory=dict)
    types: dict[str, None] = field(default_factory=dict)
    details: dict[str, None] = field(default_factory=dict)

    def add(self, c: Cell) -> None:
        self.sessions += c.sessions
        self.senders[c.organization] = self.senders.get(c.organization, 0) + c.sessions
        self.types[str(c.result_type)] = None
        for d in c.details:
            if len(self.details) < MAX_DETAILS:
                self.details[d] = None

    def build(self) -> Group:
        senders = sorted(self.senders.items(), key=lambda kv: (-kv[1], kv[0]))
        return Group(self.category, self.result_type, self.mx_host, self.sessions,
                     tuple(senders), tuple(self.types), tuple(self.details))  # fmt: skip


def evidence(
    domain: str, records: Iterable[ReceivedRecord], start: dt.datetime, end: dt.datetime
) -> ReportEvidence:
    """The evidence in ``records`` (reports received in the window) about ``domain``: only
    their policies for ``domain`` count (a report may cover several domains)."""
    reports = successful = failed = 0
    senders: dict[str, list[int]] = {}
    cells: dict[tuple[str, str, str | None, str], list[Any]] = {}
    for record in records:
        r = record.report
        policies = [p for p in r.policies if p.policy_domain == domain]
        if not policies:
            continue
        reports += 1
        org = r.organization_name
        totals = senders.setdefault(org, [0, 0, 0, 0])
        totals[0] += 1
        totals[3] += 1 if record.dkim is not None and record.dkim.ok else 0
        for p in policies:
            successful += p.successful
            failed += p.failed
            totals[1] += p.successful
            totals[2] += p.failed
            for d in p.failure_details:
                key = (str(p.policy_type), str(d.result_type), d.receiving_mx_hostname, org)
                cell = cells.setdefault(key, [d.result_type, 0, {}])
                cell[1] += d.failed_session_count
                for text in (d.failure_reason_code, d.additional_information):
                    if text and len(cell[2]) < MAX_DETAILS:
                        cell[2][text] = None
    return ReportEvidence(
        domain, start, end, reports, successful, failed,
        senders=tuple(sorted(
            (SenderTotals(o, n, s, f, v) for o, (n, s, f, v) in senders.items()),
            key=lambda t: (-t.failed, -t.successful, t.organization),
        )),
        cells=tuple(Cell(pt, rt, mx, org, n, tuple(details))
                    for (pt, _, mx, org), (rt, n, details) in cells.items()),
    )  # fmt: skip


def window(now: dt.datetime, days: int) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the reports that count: those whose date range starts on one of the
    last ``days`` whole UTC days before ``now``, or today (a report covers a UTC day, RFC 8460
    §4.1, and arrives after it; a report about today counts too)."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be from 1 to {MAX_DAYS}, not {days}")
    today = now.astimezone(dt.UTC).date()
    midnight = dt.datetime.combine(today, dt.time(), tzinfo=dt.UTC)
    return midnight - dt.timedelta(days=days), midnight + dt.timedelta(days=1)


async def gather(
    inbox: ReportInbox, domain: str, start: dt.datetime, end: dt.datetime
) -> ReportEvidence:
    """The evidence of the reports kept in ``inbox`` for ``domain`` in [start, end)."""
    return evidence(domain, await inbox.received_between(domain, start, end), start, end)


# --------------------------------------------------------------------------- blockers


class BlockerSource(enum.StrEnum):
    REPORTS = "reports"  # what senders reported
    CHECK = "check"  # what the fresh `mxguard check` found
    EVIDENCE = "evidence"  # what is missing to decide


@dataclass(frozen=True, slots=True)
class Blocker:
    """One reason not to switch to ``enforce`` yet: what failed and the fix, for people; the
    sessions, senders and MX hosts it concerns, for programs."""

    source: BlockerSource
    what: str
    fix: str
    result_type: str | None = None
    sessions: int | None = None
    senders: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return f"{self.what}. Fix: {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source.value,
            "what": self.what,
            "result_type": self.result_type,
            "sessions": self.sessions,
            "senders": list(self.senders),
            "mx_hosts": list(self.mx_hosts),
            "fix": self.fix,
            "text": self.text,
        }


_CERTIFICATE_FIX = {
    ResultType.CERTIFICATE_HOST_MISMATCH.value: (
        "install on {mx} a certificate whose subjectAltName names {mx} itself (a certificate "
        "for the domain alone, or for another host, is refused, RFC 8461 §4.2)"
    ),
    ResultType.CERTIFICATE_EXPIRED.value: (
        "renew the certificate of {mx}, make every address of it serve the new one, and "
        "automate the renewal"
    ),
    ResultType.CERTIFICATE_NOT_TRUSTED.value: (
        "serve on {mx} a certificate from a CA senders trust, with its intermediate "
        "certificates (self-signed and private-CA certificates are refused)"
    ),
    ResultType.VALIDATION_FAILURE.value: (
        "check {mx} with `mxguard check {domain}` (a weak key or signature, a damaged chain, "
        "a handshake that fails) and read the failure details of the reports"
    ),
}


def _senders_text(senders: Sequence[tuple[str, int]]) -> str:
    named = [f"{org!r} ({n})" for org, n in senders[:MAX_SENDERS_NAMED]]
    if len(senders) > MAX_SENDERS_NAMED:
        named.append(f"{len(senders) - MAX_SENDERS_NAMED} more")
    return ", ".join(named)


def _period(e: ReportEvidence) -> str:
    last = e.end - dt.timedelta(days=1)
    return f"in the reports of {e.start.date().isoformat()} to {last.date().isoformat()}"


def _group_blocker(e: ReportEvidence, g: Group, days: int | None) -> Blocker:
    where = g.mx_host or "an MX host the reports do not name"
    mx = g.mx_host or "the MX host"
    senders = _senders_text(g.senders)
    sessions = f"{g.sessions} failed session{'s' if g.sessions != 1 else ''}"
    later = (
        f"; failures already fixed count until they are older than the window ({days} days; "
        "--days shortens it)"
        if days
        else ""
    )
    if g.category is Category.MX_NOT_COVERED:
        what = (
            f"{where} matches no mx pattern of the policy to enforce, but senders used it: "
            f"{sessions} ({', '.join(g.result_types)}) reported by {senders} {_period(e)}; under "
            "enforce they never deliver to it (RFC 8461 §4.1)"
        )
        fix = (
            f"add a pattern covering {mx} to the policy (`mxguard sts publish --mx`), or remove "
            f"{mx} from the MX records of {e.domain}"
        )
    elif g.category is Category.STS_POLICY:
        what = (
            f"{g.result_type}: {sessions} of senders that hold the policy reported by "
            f"{senders} {_period(e)}; they cannot refresh it (RFC 8460 §4.3.2.2), and under "
            "enforce would keep applying the policy they have"
        )
        fix = (
            f"serve https://mta-sts.{e.domain}/.well-known/mta-sts.txt with a certificate "
            f"valid for mta-sts.{e.domain} from a public CA, as text/plain, without redirects "
            f"(`mxguard check {e.domain}` fetches it as senders do)"
        )
    else:
        what = (
            f"{g.result_type} at {where}: {sessions} reported by {senders} {_period(e)}; "
            "under enforce these senders refuse to deliver there (RFC 8461 §4.2)"
        )
        template = _CERTIFICATE_FIX.get(g.result_type, "check {mx} with `mxguard check {domain}`")
        fix = template.format(mx=mx, domain=e.domain)
    if g.details:
        what += f" (the senders said: {'; '.join(repr(d) for d in g.details)})"
    return Blocker(
        BlockerSource.REPORTS, what, fix + later, g.result_type or None, g.sessions,
        tuple(org for org, _ in g.senders), (g.mx_host,) if g.mx_host else (),
    )  # fmt: skip


def no_evidence_blocker(e: ReportEvidence) -> Blocker:
    what = (
        f"no TLS report {_period(e)} counts a session to {e.domain}"
        if e.reports
        else f"no TLS report for {e.domain} was received {_period(e)}"
    )
    return Blocker(
        BlockerSource.EVIDENCE,
        f"{what}: no evidence yet of what senders see",
        f"publish a TLS-RPT record (_smtp._tls.{e.domain}) if there is none, keep the testing "
        "policy up and wait for a day of reports (senders send them daily, RFC 8460 §4.1); "
        "receive them with `mxguard tlsrpt fetch` or `mxguard tlsrpt ingest`",
        sessions=0,
    )


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class HostState:
    """What the check saw at every address of an MX host it reached."""

    starttls: bool  # every address offered STARTTLS
    certificate: bool  # every address presented a certificate valid for the host (WebPKI)


def host_states(check: DomainCheck) -> dict[str, HostState]:
    """The check's view of each MX host it reached at some address."""
    states = {}
    for h in check.observations.hosts:
        reached = [a for a in h.addresses if a.probe.connected]
        if reached:
            states[h.host] = HostState(
                starttls=all(a.probe.starttls for a in reached),
                certificate=all(a.webpki is not None and a.webpki.ok for a in reached),
            )
    return states


@dataclass(frozen=True)
class Decision:
    """Blockers, signals and warnings of an ``enforce`` rollout: ``decide``'s result."""

    blockers: tuple[Blocker, ...]
    signals: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.blockers


def decide(
    e: ReportEvidence,
    policy: Policy | None,
    check_blockers: Sequence[str],
    hosts: Mapping[str, HostState],
    *,
    days: int | None = None,
) -> Decision:
    """Whether an ``enforce`` ``policy`` would have refused honest mail, by the reports in
    ``e`` and the check's blockers and host states (module docstring). Pure."""
    blockers: list[Blocker] = []
    signals: list[str] = []
    warnings: list[str] = []
    if e.sessions == 0:
        blockers.append(no_evidence_blocker(e))
    for g in e.groups(policy):
        if g.category.blocks:
            b = _group_blocker(e, g, days)
            state = hosts.get(g.mx_host or "")
            if g.category is Category.CERTIFICATE and state is not None and state.certificate:
                b = Blocker(
                    b.source, b.what,
                    f"{b.fix}. The check from here sees a valid certificate on {g.mx_host} now: "
                    "if it was fixed, wait for clean reports; if not, those senders may be "
                    "reaching another server (an old address, a proxy, someone intercepting TLS "
                    "on their path): ask their contact",
                    b.result_type, b.sessions, b.senders, b.mx_hosts,
                )  # fmt: skip
            blockers.append(b)
            continue
        at = g.mx_host or "an MX host the reports do not name"
        sessions = f"{g.sessions} failed session{'s' if g.sessions != 1 else ''}"
        said = f"{g.result_type} at {at}: {sessions} reported by {_senders_text(g.senders)}"
        if g.category is Category.STARTTLS:
            state = hosts.get(g.mx_host or "")
            if state is not None and not state.starttls:
                signals.append(
                    f"{said}; the check from here sees no STARTTLS on {at} either (its blocker "
                    "is listed)"
                )
            else:
                signals.append(
                    f"{said}, while the check from here sees STARTTLS offered: someone on "
                    "those senders' path removed it (STRIPTLS). Not a blocker: enforce makes "
                    "senders refuse such a session instead of delivering in plain text"
                )
        elif g.category is Category.DANE:
            warnings.append(
                f"{said} under DANE: for these senders DANE overrides MTA-STS (RFC 8461 §2), "
                "so enforce changes nothing for them; fix the TLSA records or DNSSEC"
            )
        elif g.category is Category.STS_DISCOVERY:
            warnings.append(
                f"{said} by senders that found the _mta-sts record but got no policy: check "
                f"https://mta-sts.{e.domain}/.well-known/mta-sts.txt (someone may also be "
                "blocking the fetch, which the policy cache of earlier senders defeats)"
            )
        else:
            warnings.append(f"{said}: a result type this version of mxguard does not know")
    blockers += [
        Blocker(BlockerSource.CHECK, text,
                f"`mxguard check {e.domain}` lists the finding with its fix")
        for text in check_blockers
    ]  # fmt: skip
    return Decision(tuple(blockers), tuple(signals), tuple(warnings))


@dataclass(frozen=True)
class Summary:
    """``mxguard tlsrpt summary``: the reports of the window, the check, the decision."""

    domain: str
    days: int
    evidence: ReportEvidence
    decision: Decision
    policy: Policy | None  # the enforce policy judged
    check: DomainCheck | None = None

    @property
    def ready_to_enforce(self) -> bool:
        return self.decision.ready

    def to_json(self) -> dict[str, Any]:
        e = self.evidence
        return {
            "domain": self.domain,
            "days": self.days,
            "start": e.start.isoformat(),
            "end": e.end.isoformat(),
            "reports": e.reports,
            "total_successful": e.successful,
            "total_failure": e.failed,
            "by_result_type": e.by_result_type(),
            "by_sender": [s.to_json() for s in e.senders],
            "by_mx": e.by_mx(),
            "ready_to_enforce": self.ready_to_enforce,
            "blockers": [b.to_json() for b in self.decision.blockers],
            "signals": list(self.decision.signals),
            "warnings": list(self.decision.warnings),
            "policy": self.policy.to_text() if self.policy is not None else None,
            "check": None
            if self.check is None
            else {"verdict": self.check.verdict.value, "summary": self.check.summary},
        }


def enforce_policy(check: DomainCheck) -> tuple[Policy | None, list[str]]:
    """The policy whose ``enforce`` is judged: the live policy's patterns in ``enforce`` mode
    (what testing has tried), else the MX hosts (what `sts publish --mode enforce` writes);
    with warnings that say which."""
    warnings: list[str] = []
    sts = check.observations.policy.mta_sts
    patterns: tuple[str, ...] = ()
    if sts is not None and sts.mode in (Mode.TESTING, Mode.ENFORCE) and sts.mx:
        patterns = sts.mx
    else:
        patterns = tuple(h.host for h in check.observations.hosts)
        warnings.append(
            f"no testing or enforce policy of {check.domain} could be fetched: judged the "
            "policy `mxguard sts publish --mode enforce` would write from the MX hosts"
        )
    max_age = publish.DEFAULT_MAX_AGE[Mode.ENFORCE]
    try:
        return publish.build_policy(Mode.ENFORCE, max_age, patterns), warnings
    except publish.PublishError as exc:
        return None, [*warnings, f"no enforce policy can be made: {exc}"]


async def summarise(
    settings: Settings,
    inbox: ReportInbox,
    domain: str,
    *,
    days: int = DEFAULT_DAYS,
    now: dt.datetime | None = None,
    auditor: Callable[[Settings], Auditor] = Auditor,
) -> Summary:
    """The summary of ``domain`` (normalised): its reports in ``window(now, days)`` from
    ``inbox``, and a fresh check (``auditor(settings).check``, as `sts publish` makes it)."""
    start, end = window(now or dt.datetime.now(dt.UTC), days)
    e = await gather(inbox, domain, start, end)
    check = await auditor(settings).check(domain)
    policy, warnings = enforce_policy(check)
    if policy is not None:
        check_blockers = publish.enforce_blockers(check, policy)
    else:  # nothing to judge the hosts against: what breaks delivery already still counts
        check_blockers = [f"{f.code}: {f.detail}" for f in check.findings if f.breaks]
        check_blockers.append(f"no enforce policy can be made for {domain} ({warnings[-1]})")
    decision = decide(e, policy, check_blockers, host_states(check), days=days)
    if warnings:
        decision = Decision(decision.blockers, decision.signals, (*warnings, *decision.warnings))
    return Summary(domain, days, e, decision, policy, check)


__all__ = [
    "DEFAULT_DAYS",
    "ENFORCE_REPORT_DAYS",
    "MAX_DAYS",
    "Blocker",
    "BlockerSource",
    "Category",
    "Cell",
    "Decision",
    "Group",
    "HostState",
    "ReportEvidence",
    "SenderTotals",
    "Summary",
    "classify",
    "decide",
    "enforce_policy",
    "evidence",
    "gather",
    "host_states",
    "summarise",
    "window",
]
