"""mxguard's state, in seven roles: the MTA-STS policy cache, the TLS-RPT session log, the
report queue, the log of what the Postfix policy server served, the history of
`mxguard check`, the inbox of TLS reports received for domain owners and the security levels
learned per recipient domain.

Several things outlive a single delivery and must survive restarts:

- the MTA-STS policy cache (RFC 8461 §5, `PolicyCache`): a policy fetched once is trusted
  until `max_age` passes, and this trust on first use is exactly what stops a STRIPTLS
  attacker who later blocks policy discovery; losing the cache silently removes the
  protection;
- the session log (`SessionLog`): the TLS outcome of every SMTP session (RFC 8460 §4), from
  which the daily aggregate reports are built, and which must be kept until some `rua`
  accepted the report (RFC 8460 §5);
- the report queue (`ReportQueue`): built reports waiting for delivery, with the claim that
  gives each to one reporter at a time and the count of attempts (RFC 8460 §5);
- the served log (`ServedLog`): what mxguard's Postfix policy server served for each domain
  and since when (`ServedPolicy`), so that the sessions Postfix logged are reported under the
  policy Postfix was actually told to apply, not one resolved later (RFC 8460 §4.4 `policy`);
- the check log (`CheckLog`): every `mxguard check` of a domain (`CheckRecord`: its verdict,
  the whole report, the MTA-STS policy it saw), so that a later check can say what changed,
  and the claims that let several processes or nodes share one bulk run, each domain checked
  once per run;
- the report inbox (`ReportInbox`): aggregate reports other senders sent to a domain owner's
  `rua` (RFC 8460 §4, §5), each stored once however often it is resent (`ReceivedRecord`:
  the parsed report, its raw body, where it came from and what its DKIM signature said),
  and the totals a summary or dashboard shows;
- the learned levels (`LearnedLevels`, docs/learned.md): per recipient domain and per MX host
  and address, the strongest security level seen (`LearnedHost`), when and how often; the
  drops below it (`LevelDrop`) and the stripping alarm (`StrippingAlarm`), shared by every
  node so that one alarm is raised, once, for an attack seen by several.

Each role is a `typing.Protocol` of its own (a backend conforms by having the methods; mypy
checks it where `open_store` returns the backend), and `Store` is all seven together: what the
engine, the reporter, the collector, the Postfix server, `mxguard check` and the report
receiver are given.
`open_store(url)` picks a backend from the URL:

- `sqlite:///ABS/PATH` or `sqlite:///:memory:` — the default, embedded (sqlite.py): all seven;
- `postgresql://…` — several mxguard nodes share one state (postgres.py): all seven;
- `redis://…` (or `rediss://…`, `unix://…`) — the policy cache only (redis.py). `open_store`
  returns it as a `Store` (cache_only.py) whose other roles raise StoreError naming what
  cannot be kept there and where it can: a delivery still works and logs that its session
  results could not be recorded.

SQLite and PostgreSQL behave the same, call for call (tests/test_store_conformance.py runs one
set of cases against each backend for each role it keeps). The store never interprets what
it keeps: it does not parse policies and does not apply expiry (the engine decides what an
expired policy means, RFC 8461 §5.1), except that Redis drops a key at `expires_at` because
that is how Redis keeps memory bounded. Writes that matter are durable before the call
returns. Datetimes go in and come out as UTC-aware values. A value that some backend could not
give back unchanged (a naive time, a name not in key form, text with a NUL or a lone
surrogate) is refused with StoreError by every backend alike, before anything is written.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mxguard.protocol.levels import SecurityLevel
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import FailureDetail, PolicyType, ReportedPolicy

if TYPE_CHECKING:
    # Imported where received reports are handled: a sender (`mxguard send`, `serve
    # postfix`) never needs the report reader or the DKIM verifier.
    from mxguard.adapters.dkim import DkimResult
    from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy, ReceivedReport

__all__ = [
    "CachedPolicy",
    "CheckLog",
    "CheckRecord",
    "Closable",
    "DayTotals",
    "LearnedHost",
    "LearnedLevels",
    "LevelDrop",
    "LevelSeen",
    "OrganizationTotals",
    "PendingReport",
    "PolicyCache",
    "ReceivedRecord",
    "ReportInbox",
    "ReportQueue",
    "ReportSource",
    "ReportTotals",
    "ServedLog",
    "ServedPolicy",
    "SessionLog",
    "SessionResult",
    "Store",
    "StoreError",
    "StrippingAlarm",
    "Tally",
    "default_store_url",
    "open_store",
    "state_folder",
]

ACCEPTED_URLS = (
    "sqlite:///ABSOLUTE/PATH, sqlite:///:memory:, postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DB, "
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?prefix=KEYPREFIX] (policy cache only)"
)


class StoreError(Exception):
    """The store cannot do what was asked: a bad URL, an unreachable server, a schema from a
    newer mxguard, a value that cannot be stored, or an operation the backend does not offer.
    The message says what was wrong and what would be right.

    A failure of the database itself also carries ``kind`` (one word for metrics and logs:
    ``corrupt``, ``full``, ``busy``, ``ioerr``, …; ``other`` when there is none) and
    ``detail``, the database's own words ("database disk image is malformed"), for answers
    that name the store problem."""

    def __init__(self, message: str, *, kind: str = "other", detail: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = message if detail is None else detail


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """One MTA-STS policy as fetched (RFC 8461 §5): trusted until `expires_at`."""

    domain: str  # lower-case A-label, no trailing dot
    policy_id: str  # the `id` of the TXT record it was fetched under (RFC 8461 §3.1)
    policy_text: str  # the body exactly as fetched; the store never parses it
    fetched_at: datetime  # UTC, timezone-aware
    expires_at: datetime  # fetched_at + max_age


class _PolicyFields:
    """The flat names of a record's ``policy`` (a ``ReportedPolicy``), as stored and as the
    report builder reads them."""

    __slots__ = ()
    policy: ReportedPolicy

    @property
    def policy_type(self) -> PolicyType:
        """RFC 8460 §4.4 `policy-type`."""
        return self.policy.policy_type

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """`policy-string`: STS policy lines or one TLSA RR each."""
        return self.policy.policy_strings

    @property
    def mx_patterns(self) -> tuple[str, ...]:
        """`mx-host`: the STS policy's mx patterns."""
        return self.policy.mx_patterns

    @property
    def rua(self) -> tuple[str, ...]:
        """The domain's TLS-RPT rua at that moment (RFC 8460 §3)."""
        return self.policy.rua


@dataclass(frozen=True, slots=True)
class SessionResult(_PolicyFields):
    """One SMTP session's TLS outcome, the raw material of a TLS-RPT report (RFC 8460 §4).

    Stored flat: `policy` is kept as the columns `policy_type`, `policy_strings`,
    `mx_patterns` and `rua` (the properties of those names read them back). A result type this
    mxguard does not know, read back from the store (a newer mxguard wrote it: RFC 8460 made
    result types an IANA registry, which may grow), is not an error: `result_type` is then
    None and the text is kept in `other_result_type`, counted as a failure and reported as it
    is. A stored policy type RFC 8460 §4.4 does not allow (no mxguard writes one) is a
    StoreError when read.
    """

    id: int | None  # assigned by the store; None when adding
    at: datetime  # UTC, timezone-aware
    policy_domain: str  # RFC 8460 §4.4 `policy-domain`
    policy: ReportedPolicy  # the policy the session was made under, and the domain's rua
    result_type: ResultType | None  # None = success (unless other_result_type says otherwise)
    sending_ip: str | None
    receiving_mx: str | None
    receiving_ip: str | None
    receiving_helo: str | None
    detail: str | None  # `additional-information` for people
    is_report: bool  # delivered a TLS report: excluded from reports (RFC 8460 §5.3)
    reported: str | None  # the report-id that included it, once a report was accepted
    other_result_type: str | None = None  # a stored result type this mxguard does not know

    @property
    def result_text(self) -> str | None:
        """The result type as stored and reported (RFC 8460 §4.3 spelling); None = success."""
        return self.result_type.value if self.result_type is not None else self.other_result_type


@dataclass(frozen=True, slots=True)
class PendingReport:
    """A built TLS-RPT report and its delivery state (RFC 8460 §5: keep the data until some
    `rua` accepted it). Usually one per policy domain and UTC day; results recorded late for
    a day already built go into a further report for that day, with its own report-id (§4.4:
    each report has a unique report-id). `result_ids` belong to this report alone from the
    moment it is stored, and are marked reported in the transaction that records the
    delivery. A report no `rua` will ever accept is dropped (`dropped_at`), not retried
    forever."""

    report_id: str
    policy_domain: str
    start: datetime  # 00:00:00Z of the day the report covers
    filename: str  # RFC 8460 §5.1 file name
    body: bytes  # the gzipped JSON report
    rua: tuple[str, ...]  # where it goes (the domain's TLS-RPT record, RFC 8460 §3)
    result_ids: tuple[int, ...]  # the session results it covers
    created_at: datetime
    next_attempt_at: datetime  # not before: the random delay, then back-off after failures
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None
    delivered_to: str | None = None  # the rua URI that accepted it
    dropped_at: datetime | None = None  # given up: every rua refused it for good, or too old


@dataclass(frozen=True, slots=True)
class ServedPolicy(_PolicyFields):
    """What the Postfix policy server answered for `domain` from `at` on, until the next record
    of that domain: the policy as a TLS-RPT report names it (RFC 8460 §4.4) and the MX hosts it
    let Postfix use. The server writes one only when something changed."""

    domain: str  # lower-case A-label, no trailing dot
    at: datetime  # UTC, timezone-aware: when the server started serving it
    policy: ReportedPolicy  # stored flat, like SessionResult.policy
    mx_hosts: tuple[str, ...]  # the MX host names the policy allowed (as published, CNAME-expanded)
    mx_addresses: tuple[str, ...]  # their addresses
    answer: str  # the socketmap answer Postfix got, e.g. "OK dane-only" or "NOTFOUND"


@dataclass(frozen=True, slots=True)
class CheckRecord:
    """One `mxguard check` of one domain, as kept for history."""

    domain: str  # lower-case A-label, no trailing dot
    at: datetime  # when the check finished (timezone-aware; stored and given back as UTC)
    verdict: str  # "protected" | "partial" | "unprotected" | "broken"; the store keeps any text
    report: str  # the check's whole JSON document, as text (may be tens of KiB)
    policy_id: str | None = None  # the `id` of the _mta-sts TXT record this check saw
    policy_digest: str | None = None  # SHA-256 hex of the MTA-STS policy body fetched, if any
    run: str | None = None  # the bulk run this check belongs to, if any
    id: int | None = None  # assigned by the store; None when adding


@dataclass(frozen=True, slots=True)
class LevelSeen:
    """One session's security level, to be learned (`LearnedLevels.learn`)."""

    domain: str  # the recipient domain, lower-case A-label, no trailing dot
    mx: str  # the MX host name as published (lower case, no trailing dot)
    ip: str  # the address the session went to
    level: SecurityLevel
    at: datetime  # UTC, timezone-aware


@dataclass(frozen=True, slots=True)
class LearnedHost:
    """The strongest level seen for one (domain, MX host, address): since `first_seen` (when
    it was first seen at that level, or the row was reset by decay), last at `last_seen`, in
    `seen` sessions at that level."""

    domain: str
    mx: str
    ip: str
    level: SecurityLevel
    first_seen: datetime
    last_seen: datetime
    seen: int


@dataclass(frozen=True, slots=True)
class LevelDrop:
    """A session below the level learned for its MX host or address: an event."""

    at: datetime
    domain: str
    mx: str
    ip: str
    learned: SecurityLevel  # what had been seen there before
    seen: SecurityLevel  # what this session achieved
    result_type: ResultType | None  # RFC 8460 §4.3 (a stripped STARTTLS: starttls-not-supported)
    id: int | None = None  # assigned by the store; None when adding

    @property
    def stripped(self) -> bool:
        """TLS had been seen here and this session had none: STARTTLS missing, refused, or
        no handshake after it (what a STRIPTLS attacker causes)."""
        return self.learned.encrypted and not self.seen.encrypted


@dataclass(frozen=True, slots=True)
class StrippingAlarm:
    """Many domains that used to get TLS lost STARTTLS within a short window: raised once,
    active until an operator clears it (`cleared_at`)."""

    raised_at: datetime
    domains: tuple[str, ...]  # the domains affected, in code point order
    hosts: tuple[str, ...]  # "domain mx [ip]" per host affected, in code point order
    window: float  # seconds the drops were counted over
    enforce: bool  # learned levels are enforced for every domain while it is active
    cleared_at: datetime | None = None
    id: int | None = None  # assigned by the store

    @property
    def active(self) -> bool:
        return self.cleared_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "raised_at": format_time(self.raised_at),
            "domains": list(self.domains),
            "hosts": list(self.hosts),
            "window": self.window,
            "enforce": self.enforce,
            "active": self.active,
            "cleared_at": None if self.cleared_at is None else format_time(self.cleared_at),
        }


class ReportSource(enum.StrEnum):
    """How a received report reached mxguard."""

    HTTPS = "https"  # POSTed to an https rua (RFC 8460 §5.4)
    MAIL = "mail"  # an e-mail to a mailto rua (RFC 8460 §5.3)
    FILE = "file"  # a file handed to `mxguard tlsrpt ingest`


@dataclass(frozen=True, slots=True)
class ReceivedRecord:
    """A TLS report received for a domain owner (RFC 8460 §4), as the report inbox keeps it:
    the report as parsed (mxguard.protocol.tlsrpt_ingest), the body exactly as received (gzip
    or JSON), when and how it came and, for mail, what its DKIM signature said. Stored once per
    `dedupe_key`: a resent report is not counted twice."""

    report: ReceivedReport
    raw: bytes  # the report body as received: the attachment or POST body, gzip or JSON
    received_at: datetime  # timezone-aware; stored and given back as UTC
    source: ReportSource
    dkim: DkimResult | None = None  # the e-mail's signature (RFC 8460 §5.3); None: not mail
    id: int | None = None  # assigned by the store; None when adding

    @property
    def dedupe_key(self) -> str:
        """The report's identity (organisation, report-id, date range, policies)."""
        from mxguard.protocol.tlsrpt_ingest import dedupe_key

        return dedupe_key(self.report)


@dataclass(frozen=True, slots=True)
class DayTotals:
    """The sessions reported for a domain in the reports of one UTC day (the day each report's
    date range starts, RFC 8460 §4.1)."""

    day: date
    reports: int
    successful: int
    failed: int


@dataclass(frozen=True, slots=True)
class OrganizationTotals:
    """The sessions one sending organisation (`organization-name`) reported for a domain."""

    organization: str
    reports: int
    successful: int
    failed: int


@dataclass(frozen=True, slots=True)
class Tally:
    """Failed sessions of a domain under one `key` (a result type, or a receiving MX host name;
    None: the reports did not say), from `failure-details`, and in how many reports."""

    key: str | None
    reports: int
    failed: int


@dataclass(frozen=True, slots=True)
class ReportTotals:
    """What the reports received for `domain` with a date range starting in [start, end) say,
    added up over their policies for that domain. `successful` and `failed` come from the
    summaries; `result_types` and `mx_hosts` from the failure details, which senders may
    leave incomplete, so their sums need not equal `failed`. `organizations`, `result_types`
    and `mx_hosts` are the largest `top` of each, most failed sessions first."""

    domain: str
    start: datetime
    end: datetime
    reports: int
    successful: int
    failed: int
    days: tuple[DayTotals, ...]  # every UTC day with reports, in order
    organizations: tuple[OrganizationTotals, ...]
    result_types: tuple[Tally, ...]
    mx_hosts: tuple[Tally, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "reports": self.reports,
            "successful": self.successful,
            "failed": self.failed,
            "days": [
                {"day": d.day.isoformat(), "reports": d.reports, "successful": d.successful,
                 "failed": d.failed}
                for d in self.days
            ],
            "organizations": [
                {"organization": o.organization, "reports": o.reports,
                 "successful": o.successful, "failed": o.failed}
                for o in self.organizations
            ],
            "result_types": [
                {"result_type": t.key, "reports": t.reports, "failed": t.failed}
                for t in self.result_types
            ],
            "mx_hosts": [
                {"mx_host": t.key, "reports": t.reports, "failed": t.failed}
                for t in self.mx_hosts
            ],
        }  # fmt: skip


class Closable(Protocol):
    """What every role has: a store is closed once, by whoever opened it."""

    async def close(self) -> None:
        """Release connections; the store must not be used afterwards (StoreError if it is)."""
        ...


class PolicyCache(Closable, Protocol):
    """The MTA-STS policy cache (RFC 8461 §5): one policy per domain, trusted on first use.
    Kept by every backend."""

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        """The cached policy of `domain`, expired or not (a backend that expires keys, Redis,
        has forgotten it once `expires_at` passed); None when there is none."""
        ...

    async def put_policy(self, policy: CachedPolicy) -> None:
        """Insert or replace the cached policy of `policy.domain`."""
        ...

    async def delete_policy(self, domain: str) -> None:
        """Forget the cached policy of `domain` (no error when there is none)."""
        ...

    async def policies(self) -> list[CachedPolicy]:
        """Every cached policy, ordered by domain in code point order (for the background
        refresher)."""
        ...


class SessionLog(Closable, Protocol):
    """The TLS outcome of every SMTP session (RFC 8460 §4), kept until a report covering it was
    accepted (§5). Kept by SQLite and PostgreSQL."""

    async def add_results(self, results: Sequence[SessionResult]) -> None:
        """Record session outcomes, all or none; each `id` must be None (the store assigns
        one)."""
        ...

    async def results_between(
        self,
        start: datetime,
        end: datetime,
        *,
        unreported_only: bool = True,
        unbuilt_only: bool = False,
    ) -> list[SessionResult]:
        """Results with `start <= at < end`, ordered by (at, id); report sessions included.
        `unbuilt_only`: only those no stored report covers yet (what the next build takes)."""
        ...

    async def oldest_unbuilt(self, start: datetime, end: datetime) -> datetime | None:
        """The earliest `at` in [start, end) of a result a report could cover but none does
        yet: not a report session (RFC 8460 §5.3), with a `rua`, in no stored report."""
        ...

    async def mark_reported(self, ids: Iterable[int], report_id: str) -> None:
        """Record that an accepted report `report_id` covered the results `ids`."""
        ...


class ReportQueue(Closable, Protocol):
    """Built TLS-RPT reports until some `rua` accepted them (RFC 8460 §5): claims, attempts,
    delivery. It works on the session log of the same store (a report takes its results
    atomically), so a backend with a report queue has a session log too. Kept by SQLite and
    PostgreSQL."""

    async def add_report(self, report: PendingReport) -> bool:
        """Keep a built report and give it its `result_ids`, in one transaction; False (and
        nothing stored) when another report already covers one of those results, or one of
        them is not in the store (another reporter built them first): no session is reported
        twice. Idempotent per `report_id`: the same report added again answers True and
        changes nothing; a different report under a stored report-id is a StoreError, and so
        is a report that lists a result twice."""
        ...

    async def claim_report(
        self, report_id: str, *, now: datetime, until: datetime, force: bool = False
    ) -> PendingReport | None:
        """Take report `report_id` for one delivery attempt, atomically: when it is still
        pending (neither delivered nor dropped) and due (`next_attempt_at <= now`, or any
        time with `force`), move `next_attempt_at` to `until` (the lease: no other reporter
        on this store takes it before then) and return it; else None."""
        ...

    async def reports(
        self, *, start: datetime | None = None, pending_only: bool = False
    ) -> list[PendingReport]:
        """Reports (of the day beginning at `start`, or all; only those neither delivered nor
        dropped if `pending_only`), ordered by (next_attempt_at, report_id), report-ids in
        code point order."""
        ...

    async def report_failed(self, report_id: str, error: str, next_attempt_at: datetime) -> None:
        """Record a delivery attempt that no `rua` accepted, and when to try again (nothing
        happens for a report-id the store does not have)."""
        ...

    async def report_dropped(self, report_id: str, error: str, at: datetime) -> None:
        """Give up on a report (every rua refused it for good, or it stayed undeliverable too
        long): it is no longer pending; its results stay in the store, unreported."""
        ...

    async def report_delivered(self, report_id: str, uri: str, at: datetime) -> None:
        """Record that `uri` accepted the report and mark its results reported (one
        transaction: a crash leaves either both or neither); StoreError for an unknown
        report-id."""
        ...


class ServedLog(Closable, Protocol):
    """What the Postfix policy server served for each domain and since when (`ServedPolicy`),
    so that logged sessions are reported under the policy Postfix was told to apply. Kept by
    SQLite and PostgreSQL."""

    async def add_served(self, records: Sequence[ServedPolicy]) -> None:
        """Record what the Postfix policy server served (one transaction)."""
        ...

    async def served_at(self, domain: str, at: datetime) -> ServedPolicy | None:
        """The record of `domain` in force at `at`: the latest with `record.at <= at` (of two
        at the same moment, the one written later)."""
        ...

    async def prune_served(self, before: datetime) -> int:
        """Forget records no longer in force at `before` (each domain keeps the one in force
        then, however old: an unchanged policy is never written again); how many went."""
        ...


class CheckLog(Closable, Protocol):
    """The audit history of `mxguard check`, and the claims that let several processes or
    nodes share one bulk run (each domain checked once per run). A claim is per (run, domain):
    held by one node until its lease ends, and done once a check of that domain in that run
    was added. Kept by SQLite and PostgreSQL."""

    async def add_check(self, record: CheckRecord) -> int:
        """Keep `record` (its `id` must be None) and return the id the store gave it. When
        `record.run` is set, the (run, domain) claim is marked done in the same transaction
        (created done when there was none), whoever held it."""
        ...

    async def last_check(self, domain: str, before: datetime | None = None) -> CheckRecord | None:
        """The newest check of `domain` (greatest `at`; of two at the same moment, the one
        added later), only among those with `at < before` when `before` is given; None when
        there is none."""
        ...

    async def claim_check(
        self, run: str, domain: str, node: str, now: datetime, lease: timedelta
    ) -> bool:
        """True if `node` may check `domain` for `run` now, and then the claim is `node`'s
        until `now + lease`: the domain was never claimed in this run, or its claim is not done
        and its lease has ended (`until <= now`). False otherwise: claimed by anyone, `node`
        itself included, whose lease still runs, or done. Atomic: of concurrent callers,
        across processes and nodes, exactly one gets True."""
        ...

    async def run_progress(self, run: str) -> tuple[int, int]:
        """(domains claimed in `run`, of which done): a domain whose check was added with
        this run counts as claimed and done even if nobody claimed it first."""
        ...


class ReportInbox(Closable, Protocol):
    """TLS reports received for domain owners (RFC 8460 §4, §5): each report once, with its raw
    body, one row per policy and one per failure detail, and the totals a summary or a
    dashboard shows. A report belongs to every domain one of its policies names; "in [start,
    end)" means its date range starts then. Kept by SQLite and PostgreSQL."""

    async def add_received(self, record: ReceivedRecord) -> bool:
        """Keep `record` (its `id` must be None), all of it in one transaction; False, and
        nothing written, when a report with its `dedupe_key` is already stored (a resent
        report, RFC 8460 §5.5). Of concurrent adds of one report, exactly one is True."""
        ...

    async def received_between(
        self, domain: str, start: datetime, end: datetime
    ) -> list[ReceivedRecord]:
        """The reports for `domain` in [start, end), whole (every policy, the raw body), each
        with the id the store gave it; ordered by (start of the date range, id)."""
        ...

    async def report_totals(
        self, domain: str, start: datetime, end: datetime, *, top: int = 20
    ) -> ReportTotals:
        """The sessions the reports for `domain` in [start, end) count under its policies: in
        all, per UTC day, per sending organisation, per result type and per receiving MX host
        (the `top` largest of the last three; ties in code point order of the key, unknown
        keys last). Sums are exact however large."""
        ...

    async def received_domains(self, start: datetime, end: datetime) -> list[str]:
        """The policy domains of the reports in [start, end), in code point order."""
        ...


class LearnedLevels(Closable, Protocol):
    """Security levels learned per recipient domain, MX host and address (docs/learned.md),
    the drops below them and the stripping alarm. The store compares levels by their rank but
    decides no expiry: callers say which rows are stale. Kept by SQLite and PostgreSQL."""

    async def learn(self, seen: Sequence[LevelSeen], *, stale_before: datetime) -> None:
        """Record sessions' levels, all or none, in order. Per (domain, mx, ip): a first
        session, a stronger level, or any level over a row last seen before `stale_before`
        (decayed) makes the row that level, first and last seen then, seen once; the same
        level counts one more session and moves `last_seen` forward; a weaker level changes
        nothing (it is a drop, recorded with `add_drops`)."""
        ...

    async def learned_hosts(self, domain: str | None = None) -> list[LearnedHost]:
        """The rows of `domain` (all domains when None), ordered by (domain, mx, ip) in code
        point order."""
        ...

    async def forget_learned(self, domain: str) -> int:
        """Forget what was learned about `domain` and its drops; how many rows went."""
        ...

    async def add_drops(self, drops: Sequence[LevelDrop]) -> None:
        """Record drops (one transaction); each `id` must be None."""
        ...

    async def drops_since(self, start: datetime, domain: str | None = None) -> list[LevelDrop]:
        """Drops with `at >= start` (of `domain`, or all), ordered by (at, id)."""
        ...

    async def raise_alarm(self, alarm: StrippingAlarm) -> bool:
        """Keep `alarm` (not cleared, `id` None) unless an alarm is active already; True when
        it was kept. Atomic: of concurrent callers, across nodes, at most one gets True."""
        ...

    async def latest_alarm(self) -> StrippingAlarm | None:
        """The alarm raised last, active or cleared; None when none ever was."""
        ...

    async def extend_alarm(
        self, domains: Sequence[str], hosts: Sequence[str]
    ) -> StrippingAlarm | None:
        """Add domains and hosts to the active alarm (each once, kept in code point order) and
        give it back; None when no alarm is active."""
        ...

    async def clear_alarm(self, at: datetime) -> StrippingAlarm | None:
        """Clear the active alarm at `at` and give it back cleared; None when none is active."""
        ...


class Store(
    PolicyCache, SessionLog, ReportQueue, ServedLog, CheckLog, ReportInbox, LearnedLevels, Protocol
):
    """All seven roles: what `open_store` returns and what the engine, the reporter, the
    collector, the Postfix server, `mxguard check` and the report receiver are given. All
    methods are coroutines;
    writes are durable on return. Over a backend that lacks a role (Redis), that role's methods
    raise StoreError (see cache_only.py)."""


def default_store_url() -> str:
    """`sqlite:///` + `$XDG_STATE_HOME/mxguard/state.db` (XDG Base Directory; the default state
    home is `~/.local/state`), creating the folder."""
    return f"sqlite://{state_folder() / 'state.db'}"


def state_folder() -> Path:
    """`$XDG_STATE_HOME/mxguard` (default `~/.local/state/mxguard`), created if needed."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    # XDG Base Directory: a relative value is invalid and must be ignored.
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    folder = base / "mxguard"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(
            f"cannot create the state folder {folder}: {exc.strerror}; "
            "set XDG_STATE_HOME to a writable folder or pass --store URL"
        ) from exc
    return folder


async def open_store(url: str) -> Store:
    """Open the store that `url` names (see ACCEPTED_URLS), creating its schema if needed."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise StoreError(
            f"store URL {redact_url(url)!r} has no scheme; use one of: {ACCEPTED_URLS}"
        )
    if scheme == "sqlite":
        # sqlite:///ABS/PATH: what follows "sqlite://" is the absolute path itself.
        if rest == "/:memory:":
            path = ":memory:"
        elif rest.startswith("/") and len(rest) > 1 and not rest.endswith("/"):
            path = rest
        else:
            raise StoreError(
                f"store URL {url!r} does not name an absolute file path; "
                "use sqlite:///ABSOLUTE/PATH (three slashes, then the path) or sqlite:///:memory:"
            )
        from mxguard.adapters.store.sqlite import SQLiteStore

        return await SQLiteStore.open(path)
    if scheme in ("postgresql", "postgres"):
        from mxguard.adapters.store.postgres import PostgresStore

        return await PostgresStore.open(url)
    if scheme in ("redis", "rediss", "unix"):
        from mxguard.adapters.store.cache_only import PolicyCacheOnly
        from mxguard.adapters.store.redis import RedisStore

        return PolicyCacheOnly(await RedisStore.open(url), f"the Redis store {redact_url(url)}")
    raise StoreError(
        f"store URL {redact_url(url)!r} has an unknown scheme {scheme!r}; "
        f"use one of: {ACCEPTED_URLS}"
    )


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{tail}"


# Validation shared by the backends: the store refuses values it could not give back
# unchanged, rather than normalising them behind the caller's back. The checks are the same
# for every backend, so that a value one of them takes is taken by all (PostgreSQL's text
# cannot hold NUL; no backend can encode a lone surrogate; SQLite would take both).


def check_domain(domain: str) -> str:
    """`domain` if it is a lower-case ASCII name without a trailing dot, white space or control
    characters, else StoreError."""
    if (
        not domain
        or not domain.isascii()
        or not domain.isprintable()
        or domain != domain.lower()
        or domain.endswith(".")
        or any(c.isspace() for c in domain)
    ):
        raise StoreError(
            f"domain {domain!r} is not in the form the store keys on; pass a lower-case A-label "
            "without a trailing dot, e.g. 'example.com' or 'xn--bcher-kva.example'"
        )
    return domain


def check_text(value: str, name: str) -> str:
    """`value` if every backend can keep it unchanged, else StoreError: no NUL character and
    no lone surrogate (what `errors="surrogateescape"` leaves for undecodable bytes)."""
    shown = repr(value if len(value) <= 60 else value[:60] + "…")
    if "\x00" in value:
        raise StoreError(
            f"{name} {shown} contains a NUL character, which the store cannot keep "
            "(PostgreSQL text cannot hold it); escape or remove it before storing"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StoreError(
                f"{name} {shown} has a lone surrogate at position {exc.start}, which has no "
                "UTF-8 form to store; decode the bytes it came from with errors='replace'"
            ) from None
    return value


def _check_texts(
    value: CachedPolicy
    | SessionResult
    | ServedPolicy
    | PendingReport
    | ReportedPolicy
    | CheckRecord,
) -> None:
    """Every text (and every text in a tuple) among the fields of `value` and of the
    dataclasses in them (`policy`), by check_text."""
    for f in fields(value):
        item = getattr(value, f.name)
        if isinstance(item, ReportedPolicy):
            _check_texts(item)
            continue
        for text in item if isinstance(item, tuple) else (item,):
            if isinstance(text, str):
                check_text(text, f.name)


def as_utc(value: datetime, name: str) -> datetime:
    """`value` converted to UTC; StoreError for a naive datetime (its zone would be a guess) and
    for one that is no datetime in UTC (e.g. 9999-12-31T23:00-05:00)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreError(
            f"{name} {value.isoformat()} has no time zone; pass a timezone-aware datetime, "
            "e.g. datetime.now(UTC)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise StoreError(
            f"{name} {value.isoformat()} is outside the years 1 to 9999 in UTC; pass a time "
            "that is a datetime in UTC too"
        ) from None


def check_policy(policy: CachedPolicy) -> CachedPolicy:
    """`policy` with UTC datetimes, after checking it can be stored."""
    check_domain(policy.domain)
    if not policy.policy_id:
        raise StoreError(f"policy for {policy.domain} has an empty policy_id; pass the TXT id")
    _check_texts(policy)
    return CachedPolicy(
        domain=policy.domain,
        policy_id=policy.policy_id,
        policy_text=policy.policy_text,
        fetched_at=as_utc(policy.fetched_at, "fetched_at"),
        expires_at=as_utc(policy.expires_at, "expires_at"),
    )


def check_result(result: SessionResult) -> SessionResult:
    """`result` with a UTC `at`, after checking it can be added."""
    if result.id is not None:
        raise StoreError(
            f"session result already has id {result.id}; pass id=None, the store assigns ids"
        )
    policy = _check_reported(result.policy)
    result_type = _check_result_type(result.result_type, result.other_result_type)
    check_domain(result.policy_domain)
    _check_texts(result)
    return replace(result, at=as_utc(result.at, "at"), policy=policy, result_type=result_type)


def check_served(record: ServedPolicy) -> ServedPolicy:
    """`record` with a UTC `at`, after checking it can be added."""
    check_domain(record.domain)
    policy = _check_reported(record.policy)
    _check_texts(record)
    return replace(record, at=as_utc(record.at, "at"), policy=policy)


def check_check(record: CheckRecord) -> CheckRecord:
    """`record` with a UTC `at`, after checking it can be added."""
    if record.id is not None:
        raise StoreError(
            f"check record already has id {record.id}; pass id=None, the store assigns ids"
        )
    check_domain(record.domain)
    _check_texts(record)
    if record.run is not None:
        check_run(record.run)
    return replace(record, at=as_utc(record.at, "at"))


def check_run(run: str) -> str:
    """`run` if it can name a bulk run of `mxguard check`, else StoreError."""
    if not run:
        raise StoreError(
            "run is empty; name the bulk run (or pass run=None for a check outside any run)"
        )
    return check_text(run, "run")


def check_claim(
    run: str, domain: str, node: str, now: datetime, lease: timedelta
) -> tuple[datetime, datetime]:
    """(`now`, `now + lease`) in UTC, after checking that the claim can be recorded."""
    check_run(run)
    check_domain(domain)
    if not node:
        raise StoreError("node is empty; name the process or node that claims the check")
    check_text(node, "node")
    if lease <= timedelta(0):
        raise StoreError(f"lease {lease} is not positive; pass how long the claim holds")
    start = as_utc(now, "now")
    try:
        return start, start + lease
    except OverflowError:
        raise StoreError(
            f"now + lease ({start.isoformat()} + {lease}) is past the year 9999; "
            "pass a shorter lease"
        ) from None


def _check_reported(policy: ReportedPolicy) -> ReportedPolicy:
    """`policy` with its type as a PolicyType; StoreError for a type RFC 8460 §4.4 lacks."""
    try:
        return replace(policy, policy_type=PolicyType(policy.policy_type))
    except ValueError:
        raise StoreError(
            f"policy_type {policy.policy_type!r} is not an RFC 8460 §4.4 policy type; "
            f"use one of {sorted(t.value for t in PolicyType)}"
        ) from None


def _check_result_type(result_type: str | None, other: str | None) -> ResultType | None:
    """`result_type` as a ResultType, after checking that it, or `other_result_type`, can be
    stored and read back as it is: a result type this mxguard knows travels as a ResultType,
    only one it does not know (from a newer mxguard's store) as `other_result_type`."""
    if other is not None:
        if result_type is not None or other in _RESULT_TYPES:
            raise StoreError(
                f"other_result_type {other!r} is only for a result type this mxguard does not "
                "know, on a result without result_type; pass a known one as result_type"
            )
        return None
    if result_type is None:
        return None
    if result_type not in _RESULT_TYPES:
        raise StoreError(
            f"result_type {result_type!r} is not an RFC 8460 §4.3 result type; pass a "
            "ResultType (mxguard.protocol.results)"
        )
    return ResultType(result_type)


_RESULT_TYPES = frozenset(t.value for t in ResultType)


def policy_from_store(
    policy_type: str, strings: Sequence[str], patterns: Sequence[str], rua: Sequence[str]
) -> ReportedPolicy:
    """The `policy` of a stored result or served record, from its columns; StoreError for a
    policy type no mxguard writes (none gets past `check_result`: the row was edited)."""
    try:
        kind = PolicyType(policy_type)
    except ValueError:
        raise StoreError(
            f"a stored row has the policy type {policy_type!r}, which RFC 8460 §4.4 does not "
            f"allow (only {', '.join(t.value for t in PolicyType)}); correct or delete that row"
        ) from None
    return ReportedPolicy(kind, tuple(strings), tuple(patterns), tuple(rua))


def result_type_from_store(text: str | None) -> tuple[ResultType | None, str | None]:
    """(`result_type`, `other_result_type`) of a stored result type: a value this mxguard does
    not know is kept as text, never an error (see SessionResult)."""
    if text is None:
        return None, None
    if text in _RESULT_TYPES:
        return ResultType(text), None
    return None, text


def check_report_id(report_id: str) -> str:
    """`report_id` if it can name a stored report, else StoreError."""
    if not report_id:
        raise StoreError("report_id is empty; pass the RFC 8460 §4.4 report-id")
    return check_text(report_id, "report_id")


def check_report(report: PendingReport) -> PendingReport:
    """`report` with UTC datetimes, after checking it can be stored: a report covers each of
    its results once."""
    check_domain(report.policy_domain)
    check_report_id(report.report_id)
    _check_texts(report)
    seen: set[int] = set()
    for i in report.result_ids:
        if i in seen:
            raise StoreError(
                f"report {report.report_id!r} lists session result {i} more than once; "
                "list each result once (a session is counted in one report, once)"
            )
        seen.add(i)
    return replace(
        report,
        start=as_utc(report.start, "start"),
        created_at=as_utc(report.created_at, "created_at"),
        next_attempt_at=as_utc(report.next_attempt_at, "next_attempt_at"),
        delivered_at=None
        if report.delivered_at is None
        else as_utc(report.delivered_at, "delivered_at"),
        dropped_at=None if report.dropped_at is None else as_utc(report.dropped_at, "dropped_at"),
    )


def readded_report(stored: PendingReport, report: PendingReport) -> bool:
    """What `add_report(report)` answers when a report with its report-id is `stored` already:
    True when it is the same build (adding is idempotent: a retry after a lost answer must not
    fail), StoreError when it is another report (RFC 8460 §4.4: report-ids are unique). The
    delivery state (attempts, lease, outcome) has moved on since and is not compared."""
    if _build(stored) != _build(report):
        raise StoreError(
            f"another report with report-id {report.report_id!r} is already in the store; "
            "give each report its own report-id (RFC 8460 §4.4)"
        )
    return True


def _build(r: PendingReport) -> tuple[object, ...]:
    return (r.policy_domain, r.start, r.filename, r.body, r.rua, r.result_ids, r.created_at)


def check_received(record: ReceivedRecord) -> ReceivedRecord:
    """`record` with UTC times and its known policy and result types as enums, after checking
    that it can be stored and given back unchanged: no id yet, a known source, bytes for the
    raw body, a report-id, every policy domain in key form (or None), every count an integer
    from 0 to 2**53 - 1, every text storable (check_text)."""
    if record.id is not None:
        raise StoreError(
            f"received report already has id {record.id}; pass id=None, the store assigns ids"
        )
    if not isinstance(record.raw, bytes):
        raise StoreError(
            f"raw is {type(record.raw).__name__}, not bytes; pass the report body as received"
        )
    try:
        source = ReportSource(record.source)
    except ValueError:
        raise StoreError(
            f"source {record.source!r} is not one of {', '.join(s.value for s in ReportSource)}"
        ) from None
    report = record.report
    if not report.report_id:
        raise StoreError("report_id is empty; pass the RFC 8460 §4.4 report-id")
    _check_all_texts(report, "report")
    if record.dkim is not None:
        _check_all_texts(record.dkim, "dkim")
    policies = tuple(_check_received_policy(p) for p in report.policies)
    report = replace(
        report,
        start=as_utc(report.start, "start"),
        end=as_utc(report.end, "end"),
        policies=policies,
    )
    return replace(
        record,
        report=report,
        source=source,
        received_at=as_utc(record.received_at, "received_at"),
    )


def _check_received_policy(policy: ReceivedPolicy) -> ReceivedPolicy:
    if policy.policy_domain is not None:
        check_domain(policy.policy_domain)
    check_count(policy.successful, "successful")
    check_count(policy.failed, "failed")
    details = []
    for d in policy.failure_details:
        check_count(d.failed_session_count, "failed_session_count")
        details.append(replace(d, result_type=known_result_type(str(d.result_type))))
    return replace(
        policy,
        policy_type=known_policy_type(str(policy.policy_type)),
        failure_details=tuple(details),
    )


def check_count(value: object, name: str) -> int:
    """`value` if it is a session count every backend keeps exactly (an integer from 0 to
    2**53 - 1, as a received report may hold), else StoreError."""
    from mxguard.protocol.tlsrpt_ingest import MAX_COUNT

    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise StoreError(
            f"{name} {value!r} is not a session count; pass an integer from 0 to 2**53 - 1"
        )
    return value


def check_inbox_range(
    domain: str | None, start: datetime, end: datetime, top: int = 1
) -> tuple[datetime, datetime]:
    """(`start`, `end`) in UTC, after checking the arguments of a report inbox query."""
    if domain is not None:
        check_domain(domain)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise StoreError(f"top {top!r} is not a positive integer; pass how many to list")
    return as_utc(start, "start"), as_utc(end, "end")


def _check_all_texts(value: object, name: str) -> None:
    """check_text on every text in `value`: itself, in its tuples, in its dataclass fields."""
    if isinstance(value, str):
        check_text(value, name)
    elif isinstance(value, tuple):
        for item in value:
            _check_all_texts(item, name)
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            _check_all_texts(getattr(value, f.name), f.name)


def known_policy_type(text: str) -> PolicyType | str:
    """A received `policy-type`: a PolicyType, or the text of one RFC 8460 §4.4 lacks."""
    try:
        return PolicyType(text)
    except ValueError:
        return text


def known_result_type(text: str) -> ResultType | str:
    """A received `result-type`: a ResultType, or the text of one this mxguard does not know."""
    return ResultType(text) if text in _RESULT_TYPES else text


def dkim_from_store(
    ok: bool | None, domain: str | None, selector: str | None, detail: str | None
) -> DkimResult | None:
    """The DKIM result kept with a received report (None: none was checked)."""
    if ok is None:
        return None
    from mxguard.adapters.dkim import DkimResult

    return DkimResult(bool(ok), domain, selector, detail or "")


def assemble_received(
    heads: Sequence[ReceivedRecord],
    policies: Iterable[tuple[int, int, ReceivedPolicy]],
    failures: Iterable[tuple[int, FailureDetail]],
) -> list[ReceivedRecord]:
    """Whole records from a backend's rows: `heads` (with ids, without policies), `policies`
    as (report id, policy id, policy without details) and `failures` as (policy id, detail),
    each in stored order. Rows of reports not among `heads` are ignored."""
    details: dict[int, list[FailureDetail]] = {}
    for policy_id, detail in failures:
        details.setdefault(policy_id, []).append(detail)
    by_report: dict[int, list[ReceivedPolicy]] = {}
    for report_id, policy_id, policy in policies:
        found = tuple(details.get(policy_id, ()))
        by_report.setdefault(report_id, []).append(replace(policy, failure_details=found))
    out = []
    for head in heads:
        assert head.id is not None
        report = replace(head.report, policies=tuple(by_report.get(head.id, ())))
        out.append(replace(head, report=report))
    return out


def check_seen(seen: LevelSeen) -> LevelSeen:
    check_domain(seen.domain)
    _check_level_texts(seen.mx, seen.ip)
    if not isinstance(seen.level, SecurityLevel):
        raise StoreError(f"level {seen.level!r} is not one of {', '.join(SecurityLevel)}")
    return replace(seen, at=as_utc(seen.at, "at"))


def check_drop(drop: LevelDrop) -> LevelDrop:
    if drop.id is not None:
        raise StoreError("a drop to add must have id None; the store assigns it")
    check_domain(drop.domain)
    _check_level_texts(drop.mx, drop.ip)
    for name, level in (("learned", drop.learned), ("seen", drop.seen)):
        if not isinstance(level, SecurityLevel):
            raise StoreError(f"{name} level {level!r} is not one of {', '.join(SecurityLevel)}")
    return replace(drop, at=as_utc(drop.at, "at"))


def check_alarm(alarm: StrippingAlarm) -> StrippingAlarm:
    if alarm.id is not None or alarm.cleared_at is not None:
        raise StoreError("an alarm to raise must have id None and cleared_at None")
    for d in alarm.domains:
        check_domain(d)
    for h in alarm.hosts:
        check_text(h, "alarm host")
    return replace(alarm, raised_at=as_utc(alarm.raised_at, "raised_at"))


def _check_level_texts(mx: str, ip: str) -> None:
    check_text(mx, "mx")
    check_text(ip, "ip")
    if not mx or mx != mx.lower() or mx.endswith("."):
        raise StoreError(
            f"mx {mx!r} is not in the form the store keys on; pass the MX host name in lower "
            "case without a trailing dot"
        )


def level_from_store(text: object, where: str) -> SecurityLevel:
    """A stored level; a value no mxguard writes is a StoreError naming the row."""
    try:
        return SecurityLevel(str(text))
    except ValueError:
        raise StoreError(
            f"{where}: stored level {text!r} is not one of {', '.join(SecurityLevel)}; "
            "the row was not written by mxguard: fix or delete it (mxguard learned forget)"
        ) from None


# Times are kept as fixed-width UTC text where the backend has no time type, so that text order
# is time order and a person reading the data sees real dates. The year has four digits even
# before 1000 (strftime's %Y does not pad it: "999-…" would sort after "2026-…").
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_time(value: datetime) -> str:
    """`value` (aware) as fixed-width UTC text, e.g. 2024-05-01T00:00:00.000000Z."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    """The UTC-aware datetime that `format_time` wrote as `text`."""
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)
