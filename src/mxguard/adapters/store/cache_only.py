"""A `Store` over a backend that keeps the MTA-STS policy cache only (Redis, redis.py).

The engine, the reporter, the Postfix server, `mxguard check` and the report receiver are given
a `Store`, all six roles, whatever the URL (docs/design.md, "State"). Redis keeps the policy
cache (RFC 8461 §5) and nothing else: TLS-RPT session results need range queries and must be
kept until a report is accepted (RFC 8460 §5), and the report queue and the served log go
with them; the history of `mxguard check` is queried by domain and time, and its bulk-run
claims need a transaction shared with it; received reports are added up by domain, day and
more, and each is stored once in one transaction. `PolicyCacheOnly` passes the policy cache
through and answers every call of the other six roles with a StoreError that names the role,
the store and the backends that keep it.

Refusing per call rather than refusing the URL is deliberate: `mxguard send` and
`mxguard serve postfix` work with a Redis cache and deliveries must not fail because their
results cannot be recorded. The callers treat the StoreError as "not recorded": a delivery
logs it and is delivered all the same, the Postfix server counts it in /metrics and answers
Postfix unchanged, the log collector resolves policies itself instead of asking what was
served; where the refused role is the point of the command (`mxguard tlsrpt report`,
`collect-postfix`, `ingest`) the command stops with the message, and `tlsrpt run` logs it
each round.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from mxguard.adapters.store import (
    CachedPolicy,
    CheckRecord,
    LearnedHost,
    LevelDrop,
    LevelSeen,
    PendingReport,
    PolicyCache,
    ReceivedRecord,
    ReportTotals,
    ServedPolicy,
    SessionResult,
    StoreError,
    StrippingAlarm,
)

# What each role the backend lacks keeps, for the message.
SESSION_LOG = "TLS-RPT session results"
REPORT_QUEUE = "TLS-RPT reports awaiting delivery"
SERVED_LOG = "the policies the Postfix policy server served"
CHECK_LOG = "the history of mxguard check and the claims of its bulk runs"
REPORT_INBOX = "TLS reports received for domain owners"
LEARNED_LEVELS = "the security levels learned per domain and the stripping alarm"


class PolicyCacheOnly:
    """A Store whose policy cache is `cache` and whose other roles refuse; `where` names the
    store in messages (its URL without a password), e.g. "the Redis store redis://h:6379/0"."""

    def __init__(self, cache: PolicyCache, where: str) -> None:
        self.cache = cache
        self.where = where

    # --- the policy cache: the backend's ---

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        return await self.cache.get_policy(domain)

    async def put_policy(self, policy: CachedPolicy) -> None:
        await self.cache.put_policy(policy)

    async def delete_policy(self, domain: str) -> None:
        await self.cache.delete_policy(domain)

    async def policies(self) -> list[CachedPolicy]:
        return await self.cache.policies()

    async def close(self) -> None:
        await self.cache.close()

    # --- the session log: refused ---

    async def add_results(self, results: Sequence[SessionResult]) -> None:
        raise self._refused(SESSION_LOG)

    async def results_between(
        self,
        start: datetime,
        end: datetime,
        *,
        unreported_only: bool = True,
        unbuilt_only: bool = False,
    ) -> list[SessionResult]:
        raise self._refused(SESSION_LOG)

    async def oldest_unbuilt(self, start: datetime, end: datetime) -> datetime | None:
        raise self._refused(SESSION_LOG)

    async def mark_reported(self, ids: Iterable[int], report_id: str) -> None:
        raise self._refused(SESSION_LOG)

    # --- the report queue: refused ---

    async def add_report(self, report: PendingReport) -> bool:
        raise self._refused(REPORT_QUEUE)

    async def claim_report(
        self, report_id: str, *, now: datetime, until: datetime, force: bool = False
    ) -> PendingReport | None:
        raise self._refused(REPORT_QUEUE)

    async def reports(
        self, *, start: datetime | None = None, pending_only: bool = False
    ) -> list[PendingReport]:
        raise self._refused(REPORT_QUEUE)

    async def report_failed(self, report_id: str, error: str, next_attempt_at: datetime) -> None:
        raise self._refused(REPORT_QUEUE)

    async def report_dropped(self, report_id: str, error: str, at: datetime) -> None:
        raise self._refused(REPORT_QUEUE)

    async def report_delivered(self, report_id: str, uri: str, at: datetime) -> None:
        raise self._refused(REPORT_QUEUE)

    # --- the served log: refused ---

    async def add_served(self, records: Sequence[ServedPolicy]) -> None:
        raise self._refused(SERVED_LOG)

    async def served_at(self, domain: str, at: datetime) -> ServedPolicy | None:
        raise self._refused(SERVED_LOG)

    async def prune_served(self, before: datetime) -> int:
        raise self._refused(SERVED_LOG)

    # --- the check log: refused ---

    async def add_check(self, record: CheckRecord) -> int:
        raise self._refused(CHECK_LOG)

    async def last_check(self, domain: str, before: datetime | None = None) -> CheckRecord | None:
        raise self._refused(CHECK_LOG)

    async def claim_check(
        self, run: str, domain: str, node: str, now: datetime, lease: timedelta
    ) -> bool:
        raise self._refused(CHECK_LOG)

    async def run_progress(self, run: str) -> tuple[int, int]:
        raise self._refused(CHECK_LOG)

    # --- the report inbox: refused ---

    async def add_received(self, record: ReceivedRecord) -> bool:
        raise self._refused(REPORT_INBOX)

    async def received_between(
        self, domain: str, start: datetime, end: datetime
    ) -> list[ReceivedRecord]:
        raise self._refused(REPORT_INBOX)

    async def report_totals(
        self, domain: str, start: datetime, end: datetime, *, top: int = 20
    ) -> ReportTotals:
        raise self._refused(REPORT_INBOX)

    async def received_domains(self, start: datetime, end: datetime) -> list[str]:
        raise self._refused(REPORT_INBOX)

    # --- the learned levels: refused ---

    async def learn(self, seen: Sequence[LevelSeen], *, stale_before: datetime) -> None:
        raise self._refused(LEARNED_LEVELS)

    async def learned_hosts(self, domain: str | None = None) -> list[LearnedHost]:
        raise self._refused(LEARNED_LEVELS)

    async def forget_learned(self, domain: str) -> int:
        raise self._refused(LEARNED_LEVELS)

    async def add_drops(self, drops: Sequence[LevelDrop]) -> None:
        raise self._refused(LEARNED_LEVELS)

    async def drops_since(self, start: datetime, domain: str | None = None) -> list[LevelDrop]:
        raise self._refused(LEARNED_LEVELS)

    async def raise_alarm(self, alarm: StrippingAlarm) -> bool:
        raise self._refused(LEARNED_LEVELS)

    async def latest_alarm(self) -> StrippingAlarm | None:
        raise self._refused(LEARNED_LEVELS)

    async def extend_alarm(
        self, domains: Sequence[str], hosts: Sequence[str]
    ) -> StrippingAlarm | None:
        raise self._refused(LEARNED_LEVELS)

    async def clear_alarm(self, at: datetime) -> StrippingAlarm | None:
        raise self._refused(LEARNED_LEVELS)

    def _refused(self, what: str) -> StoreError:
        return StoreError(
            f"{self.where} holds the MTA-STS policy cache only and cannot keep {what}; "
            "keep them in SQLite or PostgreSQL (--store sqlite:///PATH or "
            "--store postgresql://…)"
        )
