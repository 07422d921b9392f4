"""`mxguard sts publish`: the policy file and the TXT record a domain owner publishes.

A domain that wants MTA-STS publishes two things that must agree: a policy body served at
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 §3.2, §3.3) and a TXT record
``_mta-sts.<domain>`` whose ``id`` changes whenever the body does (§3.1). Getting the body
wrong is how domains lose mail: an ``mx`` line that misses a real MX host, an ``enforce``
policy in front of a host whose certificate fails, a withdrawal done by deleting the records
while senders still hold the old policy in their caches. This module makes the body from the
MX set, derives the ``id`` from the body, refuses ``enforce`` while something would break, and
computes when a withdrawn policy may be removed.

- The policy is ``Policy.to_text()``: version, mode, one ``mx`` line per pattern, max_age, CRLF
  line ends (§3.2). Patterns default to the MX host names as the MX lookup gives them, in
  order of preference: senders compare those names, not CNAME targets (§4.1).
- The ``id`` is the first ``ID_LENGTH`` hex digits of the SHA-256 of that body: 1 to 32
  letters and digits (§3.1), the same for the same body and new for any change, so the record
  can never be forgotten when the body changes.
- Before ``enforce``: a fresh ``mxguard check`` of the domain (``audit.Auditor``, the
  sender's own lookups, fetch and certificate check); ``enforce_blockers`` turns it into the
  reasons a compliant sender would refuse honest mail under the new policy (§5: ``enforce``
  refuses hosts that are not covered, offer no STARTTLS or fail the WebPKI check, §4.1,
  §4.2), together with what the TLS reports of the last day received in the store's report
  inbox say senders elsewhere saw (owner/summary.py, ``ReportEvidence``).
- Removal (§8.3): a ``mode: none`` policy with a new id, kept with its TXT record until every
  policy served before it has expired from senders' caches: the max_age of the policy live
  now (fetched as senders fetch it), counted from when the ``none`` policy goes live.

Pure functions first; the lookups (``lookup_mx``, ``fetch_live_policy``) and ``publish``,
which writes the file, after them.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mxguard.adapters import https
from mxguard.adapters.dns import DnsAnswer, DnsOutcome, DnsResolver, DnssecStatus
from mxguard.adapters.store import StoreError, default_store_url, open_store
from mxguard.audit.auditor import Auditor
from mxguard.audit.model import DomainCheck
from mxguard.config import Settings
from mxguard.protocol import mtasts, names, tlsrpt
from mxguard.protocol.mtasts import Mode, Policy

if TYPE_CHECKING:
    from mxguard.owner.summary import ReportEvidence

# Default max_age per mode (seconds); docs/publish.md explains the choice.
# testing: one day. Nothing is enforced, so a long cache protects nothing; a short one means a
#   withdrawal during the trial is over in a day (RFC 8461 §8.3).
# enforce: two weeks. RFC 8461 §3.2 expects "weeks or greater" so that one honest fetch protects
#   the deliveries after it; `mxguard check` warns below a week (`sts-max-age-short`).
# none: one day, as RFC 8461 §8.3 suggests for the policy that withdraws the others.
DEFAULT_MAX_AGE: dict[Mode, int] = {
    Mode.TESTING: 86400,
    Mode.ENFORCE: 14 * 86400,
    Mode.NONE: 86400,
}
SHORT_MAX_AGE = 86400  # below this, a warning: the policy lapses a day after a sender's fetch
ENFORCE_MIN_MAX_AGE = 7 * 86400  # the audit's `sts-max-age-short` threshold
ID_LENGTH = 20  # hex digits of the body's SHA-256: 80 bits, within RFC 8461 §3.1's 32
POLICY_FILE = Path(".well-known") / "mta-sts.txt"

# Audit findings that `enforce_blockers` judges again against the new policy (coverage,
# STARTTLS, the certificate), because the audit judged them under the policy live now.
_REJUDGED = frozenset(
    {
        "sts-mx-not-covered",
        "sts-no-mx-covered",
        "starttls-missing",
        "starttls-failed",
        "certificate-expired",
        "certificate-host-mismatch",
        "certificate-not-trusted",
        "certificate-invalid",
    }
)


class PublishError(ValueError):
    """The arguments cannot make a policy (an invalid pattern, no pattern at all)."""


class Status(enum.StrEnum):
    """How ``publish`` ended; the command's exit status follows from it."""

    WRITTEN = "written"  # the policy file was written
    REFUSED = "refused"  # nothing written: blockers, or nothing to protect (exit 1)
    DEFERRED = "deferred"  # nothing written: a lookup failed, try again (exit 75)


class MxKind(enum.StrEnum):
    HOSTS = "hosts"
    IMPLICIT = "implicit"  # no MX records: the domain itself is the mail host (RFC 5321 §5.1)
    NULL = "null"  # RFC 7505: the domain takes no mail
    NXDOMAIN = "nxdomain"
    FAILED = "failed"  # no usable answer
    BOGUS = "bogus"  # DNSSEC validation failed


@dataclass(frozen=True, slots=True)
class MxSet:
    """A domain's MX host names, in order of preference, as the MX lookup gave them."""

    kind: MxKind
    hosts: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class LivePolicy:
    """The policy a sender fetches for the domain now, if any, and the TXT record's id."""

    policy: Policy | None
    record_id: str | None
    detail: str  # what was fetched, or why nothing was


@dataclass(frozen=True, slots=True)
class PublishRequest:
    domain: str
    mode: Mode = Mode.TESTING
    max_age: int | None = None  # None: DEFAULT_MAX_AGE[mode]
    patterns: tuple[str, ...] = ()  # empty: the MX host names
    out: Path = Path(".")
    force: bool = False  # write an enforce policy despite blockers


@dataclass(frozen=True, slots=True)
class Publication:
    """What ``publish`` made, wrote and found; ``to_json`` is ``sts publish --json``."""

    domain: str
    status: Status
    mode: Mode
    policy: Policy | None = None
    policy_path: Path | None = None  # set once written
    mx_hosts: tuple[str, ...] = ()  # the MX hosts found (for people; the policy has patterns)
    blockers: tuple[str, ...] | None = None  # None: no enforce check was made
    safe_to_remove_at: dt.datetime | None = None  # mode none only
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # steps and facts for people
    error: str | None = None  # why nothing was written, when not because of blockers
    live: LivePolicy | None = field(default=None, compare=False)

    @property
    def id(self) -> str | None:
        return policy_id(self.policy) if self.policy is not None else None

    @property
    def txt_name(self) -> str:
        return f"_mta-sts.{self.domain}"

    @property
    def txt_record(self) -> str | None:
        return txt_value(self.id) if self.id is not None else None

    @property
    def policy_url(self) -> str:
        return https.policy_url(self.domain)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "status": self.status.value,
            "policy": self.policy.to_text() if self.policy is not None else None,
            "policy_path": str(self.policy_path) if self.policy_path is not None else None,
            "policy_url": self.policy_url,
            "txt_name": self.txt_name,
            "txt_record": self.txt_record,
            "id": self.id,
            "mode": self.mode.value,
            "max_age": self.policy.max_age if self.policy is not None else None,
            "mx": list(self.policy.mx) if self.policy is not None else None,
            "mx_hosts": list(self.mx_hosts),
            "blockers": list(self.blockers) if self.blockers is not None else None,
            "safe_to_remove_at": _utc(self.safe_to_remove_at),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "error": self.error,
        }


# --------------------------------------------------------------------------- pure parts


def policy_id(policy: Policy) -> str:
    """The TXT ``id`` of ``policy``: a digest of its canonical body (RFC 8461 §3.1 allows 1 to
    32 letters and digits). The same body gives the same id; any change gives a new one."""
    return hashlib.sha256(policy.to_text().encode("utf-8")).hexdigest()[:ID_LENGTH]


def txt_value(record_id: str) -> str:
    """The ``_mta-sts`` TXT record's text (RFC 8461 §3.1)."""
    return mtasts.StsRecord(record_id).to_text()


def txt_line(domain: str, record_id: str) -> str:
    """The record as a zone-file line: ``_mta-sts.<domain>. TXT "v=STSv1; id=..."``."""
    return f'_mta-sts.{domain}. TXT "{txt_value(record_id)}"'


def policy_file(out: Path, domain: str) -> Path:
    """Where ``serve mta-sts --root OUT`` looks for ``domain``'s policy."""
    return out / domain / POLICY_FILE


def mx_set(domain: str, answer: DnsAnswer) -> MxSet:
    """The MX set in ``answer`` (the MX lookup of ``domain``), hosts in order of preference."""
    if answer.failed:
        kind = MxKind.BOGUS if answer.dnssec is DnssecStatus.BOGUS else MxKind.FAILED
        return MxSet(kind, detail=answer.detail)
    if answer.outcome is DnsOutcome.NXDOMAIN:
        return MxSet(MxKind.NXDOMAIN, detail=f"{domain} does not exist (NXDOMAIN)")
    if answer.outcome is DnsOutcome.NODATA:
        # RFC 5321 §5.1: no MX records, the domain itself is the (implicit) MX host.
        return MxSet(MxKind.IMPLICIT, (domain,), f"{domain} has no MX records")
    targets = sorted(
        ((int(r.preference), names.dns_name(str(r.exchange))) for r in answer.records),
        key=lambda t: t[0],
    )
    if any(host == "" for _, host in targets):
        return MxSet(MxKind.NULL, detail=f"{domain} publishes a null MX (RFC 7505)")
    hosts: list[str] = []
    for _, host in targets:
        if host not in hosts:
            hosts.append(host)
    return MxSet(MxKind.HOSTS, tuple(hosts))


def build_policy(mode: Mode, max_age: int, patterns: Sequence[str]) -> Policy:
    """The policy to publish; ``PublishError`` for an invalid pattern or none where needed."""
    if not 0 <= max_age <= mtasts.MAX_AGE_LIMIT:
        raise PublishError(
            f"max_age {max_age} is out of range: 0 to {mtasts.MAX_AGE_LIMIT} seconds "
            "(RFC 8461 §3.2)"
        )
    normalised: list[str] = []
    for pattern in patterns:
        try:
            value = names.normalise_pattern(pattern.strip())
        except names.HostNameError as exc:
            raise PublishError(f"invalid mx pattern: {exc.reason}") from None
        if value not in normalised:
            normalised.append(value)
    if mode is Mode.NONE and normalised:
        raise PublishError("a mode none policy withdraws MTA-STS: give it no mx patterns")
    if mode is not Mode.NONE and not normalised:
        # RFC 8461 §3.2: mx is required unless the mode is none.
        raise PublishError(f"a {mode.value} policy needs at least one mx pattern")
    policy = Policy(mtasts.STS_VERSION, mode, max_age, tuple(normalised))
    # What senders read back must be what was meant (Policy equality ignores the lines).
    if mtasts.parse_policy(policy.to_text()) != policy:  # pragma: no cover - a bug of ours
        raise AssertionError(f"the policy does not read back as itself: {policy.to_text()!r}")
    return policy


def coverage(policy: Policy, hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(MX hosts no pattern covers, patterns that cover no MX host) (RFC 8461 §4.1)."""
    hosts = list(hosts)
    uncovered = [h for h in hosts if not policy.allows(h)]
    unused = [p for p in policy.mx if not any(mtasts.matches(p, h) for h in hosts)]
    return uncovered, unused


def enforce_blockers(
    check_result: DomainCheck, new_policy: Policy, reports: ReportEvidence | None = None
) -> list[str]:
    """Why a compliant sender would refuse or defer honest mail if ``new_policy`` were
    published in ``enforce`` mode now, from a fresh ``mxguard check`` of the domain and, when
    given, the TLS reports received for it (``reports``, owner/summary.py).

    Under enforce a sender delivers only to MX hosts a pattern covers, only over STARTTLS, and
    only to a host whose certificate passes WebPKI for the MX host name (RFC 8461 §4.1, §4.2,
    §5), so each MX host and address is judged again here against the new policy (the audit
    judged them under the policy live now). Every other audit finding that breaks delivery
    (DNSSEC failures, DANE mismatches, no MX host taking honest mail, ...) blocks as well:
    enforce fixes none of them. An address the audit could not reach blocks too: its
    certificate is unknown. The reports add what senders elsewhere saw under the testing
    policy: certificate failures, MX hosts the new policy misses, policy fetches that failed
    (``ReportEvidence.blockers``). One sentence per blocker, for people.
    """
    blockers: list[str] = []

    def add(text: str) -> None:
        if text not in blockers:
            blockers.append(text)

    for finding in check_result.findings:
        if finding.breaks and finding.code not in _REJUDGED:
            add(f"{finding.code}: {finding.detail}")
    patterns = ", ".join(new_policy.mx)
    for h in check_result.observations.hosts:
        host = h.host
        if not new_policy.allows(host):
            add(
                f"MX host {host} matches no mx pattern of the new policy ({patterns}): under "
                "enforce senders never deliver to it (RFC 8461 §4.1)"
            )
            continue
        if h.policy.defer is not None:
            add(f"MX host {host} cannot be checked now: {h.policy.defer.detail}")
            continue
        for a in h.addresses:
            where = f"{host} [{a.address}]"
            p = a.probe
            if not p.connected:
                add(
                    f"{where}: no SMTP session from here ({p.error}), so its STARTTLS and "
                    "certificate are unknown"
                )
            elif not p.starttls:
                add(
                    f"{where} does not offer STARTTLS: under enforce senders refuse to "
                    "deliver to it"
                )
            elif p.tls is None:
                add(f"{where}: STARTTLS failed ({p.error}): under enforce senders refuse it")
            elif a.webpki is not None and not a.webpki.ok:
                kind = a.webpki.result_type.value if a.webpki.result_type else "invalid"
                add(
                    f"{where}: the certificate fails WebPKI validation for {host} ({kind}: "
                    f"{a.webpki.detail}): under enforce senders refuse to deliver to it "
                    "(RFC 8461 §4.2)"
                )
    if reports is not None:
        for b in reports.blockers(new_policy):
            add(b.text)
    return blockers


def safe_to_remove_at(published_at: dt.datetime, max_ages: Iterable[int]) -> dt.datetime:
    """When the TXT record and the ``none`` policy may go (RFC 8461 §8.3): once every policy
    served before it has expired from senders' caches, ``published_at`` (when the ``none``
    policy went live) plus the longest ``max_age`` among them. Unknown: the longest allowed."""
    longest = max(max_ages, default=mtasts.MAX_AGE_LIMIT)
    return published_at + dt.timedelta(seconds=longest)


def _utc(when: dt.datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lint_warnings(policy: Policy) -> list[str]:
    _, errors, warnings = mtasts.lint_policy(policy.to_text())
    return [*errors, *warnings]


# --------------------------------------------------------------------------- lookups


async def lookup_mx(dns: DnsResolver, domain: str) -> MxSet:
    return mx_set(domain, await dns.query(domain, "MX"))


async def _address(dns: DnsResolver, host: str) -> tuple[str | None, str]:
    """The first address of ``host`` (A, then AAAA), or None and why there is none."""
    detail = f"{host} has no address records"
    for rdtype in ("A", "AAAA"):
        answer = await dns.query(host, rdtype)
        if answer.outcome is DnsOutcome.OK and answer.records:
            return str(answer.records[0].address), ""
        if answer.failed:
            return None, answer.detail or f"the {rdtype} lookup of {host} failed"
        if answer.outcome is DnsOutcome.NXDOMAIN:
            return None, f"{host} does not exist (NXDOMAIN)"
    return None, detail


async def _record_id(dns: DnsResolver, domain: str) -> str | None:
    answer = await dns.query(f"_mta-sts.{domain}", "TXT")
    if answer.outcome is not DnsOutcome.OK:
        return None
    try:
        record = mtasts.select_record(answer.texts())
    except mtasts.StsRecordError:
        return None
    return record.id if record is not None else None


async def fetch_live_policy(dns: DnsResolver, settings: Settings, domain: str) -> LivePolicy:
    """The policy senders fetch for ``domain`` now, with the sender's fetch (no redirects,
    text/plain, 64 KiB, one deadline; adapters/https.py), the address of ``mta-sts.<domain>``
    found through the configured resolver as the sender finds it."""
    record_id = await _record_id(dns, domain)
    host = https.policy_host(domain)
    address, why = await _address(dns, host)
    if address is None:
        return LivePolicy(None, record_id, f"no policy fetched: {why}")
    result = await https.fetch_policy(
        domain,
        ca_file=settings.ca_file,
        port=settings.https_port,
        timeout=settings.fetch_timeout,
        connect_to=address,
    )
    if not result.ok or result.text is None:
        return LivePolicy(None, record_id, f"no policy fetched: {result.detail}")
    try:
        policy = mtasts.parse_policy(result.text)
    except mtasts.PolicyError as exc:
        return LivePolicy(None, record_id, f"the live policy is invalid: {exc}")
    return LivePolicy(policy, record_id, result.detail)


def read_policy_file(path: Path) -> Policy | None:
    """The policy in ``path`` (a file written earlier), None when absent or unusable."""
    try:
        data = path.read_bytes()[: https.DEFAULT_MAX_SIZE + 1]
        return mtasts.parse_policy(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, mtasts.PolicyError):
        return None


def write_policy_file(path: Path, policy: Policy) -> None:
    """Replace ``path`` with ``policy``'s body atomically: a server reading it meanwhile sees
    the old body or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".mta-sts.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(policy.to_text().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # a policy is public; the server may run as another user
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- publish


def _serving_notes(domain: str, out: Path, record_id: str, live_id: str | None) -> list[str]:
    host = https.policy_host(domain)
    steps = [
        f"serve {policy_file(out, domain)} at {https.policy_url(domain)}: `mxguard serve "
        f"mta-sts --root {out}` serves it as it is written",
        f"{host} needs A and/or AAAA records pointing at that server, and the server a "
        f"certificate valid for {host} from a CA senders trust (RFC 8461 §3.3)",
    ]
    if live_id == record_id:
        steps.append(f"_mta-sts.{domain} already announces id {record_id}: nothing to change")
    else:
        replacing = f" (replacing the record with id {live_id})" if live_id else ""
        steps.append(
            f"once the policy is served, publish the TXT record{replacing}: "
            f"{txt_line(domain, record_id)}; it must be the only _mta-sts record. Policy "
            "first, record second: a sender that sees the new id fetches the policy at once"
        )
    return steps


async def publish(
    settings: Settings,
    request: PublishRequest,
    *,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    auditor: Callable[[Settings], Auditor] = Auditor,
) -> Publication:
    """Make the policy for ``request``, check it, and write it unless refused.

    ``request.domain`` must already be normalised (``engine.resolve.normalise_domain``).
    ``PublishError`` when the arguments cannot make a policy.
    """
    dns = DnsResolver(settings.resolvers or None)
    if request.mode is Mode.NONE:
        return await _withdraw(settings, dns, request, clock())
    domain, mode = request.domain, request.mode
    max_age = request.max_age if request.max_age is not None else DEFAULT_MAX_AGE[mode]
    mx = await lookup_mx(dns, domain)
    warnings: list[str] = []
    if not request.patterns:
        problem = _no_mx_problem(mx)
        if problem is not None:
            status = Status.DEFERRED if mx.kind is MxKind.FAILED else Status.REFUSED
            return Publication(domain, status, mode, mx_hosts=mx.hosts, error=problem)
    elif mx.kind not in (MxKind.HOSTS, MxKind.IMPLICIT):
        warnings.append(f"the MX set cannot be compared with the patterns: {mx.detail}")
    if mx.kind is MxKind.IMPLICIT:
        warnings.append(
            f"{domain} has no MX records: senders deliver to {domain} itself (RFC 5321 §5.1), "
            "so the policy names it; publish an MX record instead"
        )
    policy = build_policy(mode, max_age, request.patterns or mx.hosts)
    warnings += _lint_warnings(policy)
    if mode is Mode.ENFORCE and max_age < ENFORCE_MIN_MAX_AGE:
        warnings.append(
            f"max_age {max_age} is under a week: the protection of an enforce policy lapses "
            "that soon after a sender's last fetch (RFC 8461 §3.2 expects weeks)"
        )
    uncovered, unused = coverage(policy, mx.hosts)
    if mode is Mode.TESTING:
        warnings += [
            f"MX host {h} matches no mx pattern: senders report it, and under enforce would "
            "never deliver to it"
            for h in uncovered
        ]
    warnings += [f"mx pattern {p!r} matches none of the MX hosts" for p in unused]
    host = https.policy_host(domain)
    address, why = await _address(dns, host)
    if address is None:
        warnings.append(f"senders cannot fetch the policy yet: {why}")
    live_id = await _record_id(dns, domain)
    notes: list[str] = []
    if mode is Mode.TESTING and await _lacks_tlsrpt(dns, domain):
        notes.append(
            f"publish a TLS-RPT record to receive the reports testing is for (RFC 8460 §3), "
            f'e.g. _smtp._tls.{domain}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"'
        )
    blockers: tuple[str, ...] | None = None
    if mode is Mode.ENFORCE:
        check = await auditor(settings).check(domain)
        reports, why = await _received_reports(settings, domain, clock())
        if reports is None:
            warnings.append(why)
        blockers = tuple(enforce_blockers(check, policy, reports))
        if blockers and not request.force:
            return Publication(
                domain, Status.REFUSED, mode, policy, mx_hosts=mx.hosts, blockers=blockers,
                warnings=tuple(warnings),
                notes=("fix the blockers (mxguard check lists each with its fix), or publish "
                       "anyway with --force",),
            )  # fmt: skip
        if blockers:
            warnings.append(f"published with --force despite {len(blockers)} blocker(s)")
    path = policy_file(request.out, domain)
    write_policy_file(path, policy)
    forget_withdrawal(request.out, domain)
    notes = _serving_notes(domain, request.out, policy_id(policy), live_id) + notes
    return Publication(
        domain, Status.WRITTEN, mode, policy, path, mx.hosts, blockers,
        warnings=tuple(warnings), notes=tuple(notes),
    )  # fmt: skip


async def _received_reports(
    settings: Settings, domain: str, now: dt.datetime
) -> tuple[ReportEvidence | None, str]:
    """The TLS reports received for ``domain`` over the last day and today, from the store's
    report inbox (``tlsrpt fetch`` / ``ingest`` keep them there); None and why not, when
    there are none to judge by. The freshest reports only: failures from before a fix are
    history here (``tlsrpt summary --days N`` shows the longer view)."""
    from mxguard.owner import summary  # it builds on this module

    start, end = summary.window(now, summary.ENFORCE_REPORT_DAYS)
    try:
        store = await open_store(settings.store or default_store_url())
        try:
            evidence = await summary.gather(store, domain, start, end)
        finally:
            await store.close()
    except StoreError as exc:
        return None, (
            f"the received TLS reports could not be read ({exc}): only this check was judged"
        )
    if evidence.sessions == 0:
        return None, (
            f"no TLS report received for {domain} since {start.date().isoformat()} is in the "
            "store: only this check was judged, not what senders elsewhere see (`mxguard "
            f"tlsrpt summary {domain}` says when there is enough evidence)"
        )
    return evidence, ""


def _no_mx_problem(mx: MxSet) -> str | None:
    """Why the MX set gives no mx patterns, or None."""
    if mx.kind is MxKind.NULL:
        return (
            f"{mx.detail}: it takes no mail, so there is nothing for MTA-STS to protect "
            "(to withdraw a published policy, use --mode none)"
        )
    if mx.kind is MxKind.NXDOMAIN:
        return mx.detail
    if mx.kind is MxKind.BOGUS:
        return f"the MX records fail DNSSEC validation ({mx.detail}); fix the zone first"
    if mx.kind is MxKind.FAILED:
        return f"the MX lookup failed ({mx.detail}); try again, or give the patterns with --mx"
    return None


async def _lacks_tlsrpt(dns: DnsResolver, domain: str) -> bool:
    """Whether the domain certainly publishes no TLS-RPT record (RFC 8460 §3)."""
    answer = await dns.query(f"_smtp._tls.{domain}", "TXT")
    if answer.failed:
        return False  # unknown: say nothing
    if answer.outcome is not DnsOutcome.OK:
        return True
    try:
        return tlsrpt.select_record(answer.texts()) is None
    except tlsrpt.TlsRptRecordError:
        return False  # there is one; `mxguard check` says what is wrong with it


async def _withdraw(
    settings: Settings, dns: DnsResolver, request: PublishRequest, now: dt.datetime
) -> Publication:
    """RFC 8461 §8.3: a ``none`` policy with a new id, and when everything may be removed."""
    domain = request.domain
    if request.patterns:
        raise PublishError("a mode none policy withdraws MTA-STS: give it no mx patterns")
    max_age = request.max_age if request.max_age is not None else DEFAULT_MAX_AGE[Mode.NONE]
    policy = build_policy(Mode.NONE, max_age, ())
    path = policy_file(request.out, domain)
    live = await fetch_live_policy(dns, settings, domain)
    local = read_policy_file(path)
    earlier = read_withdrawal(request.out, domain)
    warnings = _lint_warnings(policy)
    max_ages: list[int] = []
    if live.policy is not None:
        if live.policy.mode is not Mode.NONE:
            max_ages.append(live.policy.max_age)
        elif earlier is None:
            warnings.append(
                "the live policy is already mode none; if it replaced an enforce or testing "
                "policy less than that policy's max_age ago, wait until that has passed"
            )
    else:
        warnings.append(f"the live policy could not be fetched ({live.detail})")
    if local is not None and local.mode is not Mode.NONE:
        max_ages.append(local.max_age)  # the file about to be replaced, served until now
    if not max_ages and earlier is None:
        warnings.append(
            f"no max_age is known, so the longest allowed ({mtasts.MAX_AGE_LIMIT} s, a year) "
            "is assumed"
        )
    safe = safe_to_remove_at(now, max_ages) if max_ages or earlier is None else now
    if earlier is not None and earlier > safe:
        safe = earlier  # an earlier withdrawal's date still holds: running again cannot shorten it
    write_policy_file(path, policy)
    write_withdrawal(request.out, domain, safe)
    record_id = policy_id(policy)
    notes = [
        *_serving_notes(domain, request.out, record_id, live.record_id),
        f"keep serving this policy and the TXT record until {_utc(safe)}: by then every "
        "policy served before it has expired from senders' caches (RFC 8461 §8.3). That "
        "counts from now; if they go live later, add the delay",
        f"after that remove the TXT record _mta-sts.{domain} first, then the policy file and "
        f"the name {https.policy_host(domain)}",
    ]
    return Publication(
        domain, Status.WRITTEN, Mode.NONE, policy, path, (), None, safe, tuple(warnings),
        tuple(notes), live=live,
    )  # fmt: skip


# A withdrawal's date is kept next to the domain's policy folder (never served: the server
# serves .well-known/mta-sts.txt only), so that running --mode none again cannot shorten it.
WITHDRAWAL_FILE = "mxguard-withdrawal.json"


def read_withdrawal(out: Path, domain: str) -> dt.datetime | None:
    """The safe_to_remove_at of an earlier ``--mode none`` for ``domain``, if one was kept."""
    try:
        doc = json.loads((out / domain / WITHDRAWAL_FILE).read_text(encoding="utf-8"))
        when = dt.datetime.strptime(doc["safe_to_remove_at"], "%Y-%m-%dT%H:%M:%SZ")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return when.replace(tzinfo=dt.UTC)


def write_withdrawal(out: Path, domain: str, safe: dt.datetime) -> None:
    target = out / domain / WITHDRAWAL_FILE
    target.write_text(json.dumps({"safe_to_remove_at": _utc(safe)}) + "\n", encoding="utf-8")


def forget_withdrawal(out: Path, domain: str) -> None:
    """A policy in force again ends any withdrawal."""
    (out / domain / WITHDRAWAL_FILE).unlink(missing_ok=True)


__all__ = [
    "DEFAULT_MAX_AGE",
    "ID_LENGTH",
    "LivePolicy",
    "MxKind",
    "MxSet",
    "Publication",
    "PublishError",
    "PublishRequest",
    "Status",
    "build_policy",
    "coverage",
    "enforce_blockers",
    "fetch_live_policy",
    "lookup_mx",
    "mx_set",
    "policy_file",
    "policy_id",
    "publish",
    "read_policy_file",
    "safe_to_remove_at",
    "txt_line",
    "txt_value",
]
