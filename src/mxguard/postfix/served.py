"""What the Postfix policy server served, recorded for TLS reporting (RFC 8460 §4.4).

Each resolution whose answer Postfix delivers under (``OK``, ``NOTFOUND``; after a ``TEMP``
Postfix makes no session) becomes a ``ServedPolicy``: the policy type, strings and MX
patterns, the domain's TLS-RPT ``rua``, the MX hosts and addresses the policy allowed, the
answer text. ``served_record`` builds it (pure); ``ServedRecorder`` writes the records that
differ from the domain's last one to the store, in batches, from its own task, so a slow or
failing store never delays or changes an answer (failures are counted in ``Metrics``). The log
collector (``tlsrpt/collector.py``) then reports each Postfix session under the policy in force
when it ran.

Touches the store (``served_at``, ``add_served``, ``prune_served``) and nothing else.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from mxguard.adapters.store import ServedPolicy, Store
from mxguard.engine.policy import DeliveryPolicy
from mxguard.postfix.answers import Answer
from mxguard.postfix.metrics import Metrics

log = logging.getLogger(__name__)


def served_record(
    domain: str, policy: DeliveryPolicy, answer: Answer, at: dt.datetime
) -> ServedPolicy:
    """The record of serving ``answer`` for ``policy`` from ``at`` on."""
    return ServedPolicy(
        domain=domain,
        at=at,
        policy=policy.reported(),
        # Sorted: DNS may list the same hosts and addresses in another order next time.
        mx_hosts=policy.allowed_hosts,
        mx_addresses=policy.allowed_addresses,
        answer=answer.socketmap().decode("utf-8", "replace").rstrip(),
    )


def _content(r: ServedPolicy) -> tuple[object, ...]:
    """What a record says, apart from when: equal content means nothing changed."""
    return (r.policy, r.mx_hosts, r.mx_addresses, r.answer)


class ServedRecorder:
    """Writes the changed served policies to the store, in batches, from its own task.

    ``offer()`` is called on the request path: it only compares with the domain's last record
    (kept in memory, at most ``max_known`` domains) and queues, never awaits. ``run()`` writes
    the queue every ``interval`` seconds in one transaction, each write bounded by
    ``timeout``; a domain not in memory (after a restart, or evicted) is first compared with
    its latest stored record, so an unchanged policy is not written again. A failed write is
    counted and forgotten from memory, so the next resolution of those domains writes again.
    Every ``prune_interval`` seconds records older than ``keep`` that are no longer in force
    are pruned.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        metrics: Metrics,
        *,
        interval: float = 0.5,
        timeout: float = 10.0,
        max_pending: int = 10_000,
        max_known: int = 100_000,
        keep: dt.timedelta = dt.timedelta(days=40),
        prune_interval: float = 86_400.0,
    ) -> None:
        self._store = store
        self.metrics = metrics
        self.interval, self.timeout = interval, timeout
        self.max_pending, self.max_known = max_pending, max_known
        self.keep, self.prune_interval = keep, prune_interval
        self._known: OrderedDict[str, tuple[object, ...]] = OrderedDict()
        self._pending: list[tuple[ServedPolicy, bool]] = []  # (record, compare with the store)
        self._last_error = ""
        self._writing = asyncio.Lock()  # one write at a time, in order

    def offer(self, record: ServedPolicy) -> None:
        """Queue ``record`` if it differs from the last one of its domain."""
        content = _content(record)
        known = self._known.get(record.domain)
        if known == content:
            self._known.move_to_end(record.domain)
            return
        if len(self._pending) >= self.max_pending:
            self.metrics.served_dropped += 1
            return
        self._pending.append((record, known is None))
        self._known[record.domain] = content
        self._known.move_to_end(record.domain)
        while len(self._known) > self.max_known:
            self._known.popitem(last=False)

    async def run(self) -> None:
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_interval
                await self.prune()

    async def flush(self) -> None:
        """Write what is queued (one transaction); on return, everything offered before the
        call was written or counted as failed."""
        async with self._writing:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        fresh: list[ServedPolicy] = []
        try:
            store = self._store()
            async with asyncio.timeout(self.timeout):
                for record, compare in batch:
                    if compare:
                        latest = await store.served_at(record.domain, record.at)
                        if latest is not None and _content(latest) == _content(record):
                            continue
                    fresh.append(record)
                await store.add_served(fresh)
        except Exception as exc:
            self.metrics.served_failures += len(batch)
            self._failed(f"could not record {len(batch)} served policies", exc)
            for record, _ in batch:
                if self._known.get(record.domain) == _content(record):
                    del self._known[record.domain]
            return
        self.metrics.served_recorded += len(fresh)

    async def prune(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._store().prune_served(dt.datetime.now(dt.UTC) - self.keep)
        except Exception as exc:
            self.metrics.served_failures += 1
            self._failed("could not prune served policies", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        # Once per distinct error: a store that refuses (Redis) must not flood the log.
        reason = str(exc) or type(exc).__name__
        level = logging.DEBUG if reason == self._last_error else logging.WARNING
        log.log(level, "%s: %s (answers to Postfix are not affected)", what, reason)
        self._last_error = reason
