"""The relay's delivery scheduler: claims due work from the queue and delivers it.

Each claimed piece of work (the due recipients of one message in one domain) is delivered by
``Sender.deliver()``, which resolves the domain's policy, enforces it on every session and
records every session for TLS-RPT. Then, per recipient (RFC 5321 §4.2.1, §4.5.4.1):

- delivered: done;
- failed for good (a 5xx, a null MX, REQUIRETLS impossible): bounced at once;
- deferred (a 4xx, a policy or TLS failure, no connection): tried again after a back-off that
  doubles from ``RetryPolicy.first`` up to ``RetryPolicy.maximum``, with ±25 % jitter so that
  recipients deferred together do not come back together; once the message is
  ``RetryPolicy.lifetime`` old the last attempt is made and, if it is deferred again, the
  recipient is bounced with the last reason (status 4.4.7 unless the reply had its own).

A temporary failure never weakens the policy: a stripped STARTTLS at an MTA-STS ``enforce``
domain is deferred, retried under the same policy, and bounced when the lifetime runs out.

Concurrency is bounded in total (``concurrency``) and per destination domain
(``per_domain``): a domain with that many deliveries in progress is left out of claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mxguard.adapters.store import StoreError
from mxguard.engine.deliver import AddressError, DeliveryStatus, DomainResult, Sender
from mxguard.engine.message import Message, MessageError
from mxguard.engine.policy import Status
from mxguard.relay.dsn import Failed, build_bounce, status_of
from mxguard.relay.queue import BOUNCED, DELIVERED, QUEUED, Decision, NewMessage, RelayQueue, Work

log = logging.getLogger(__name__)

POLL = 1.0  # seconds between looks at the queue when nothing is due (other nodes add work)


@dataclass(frozen=True)
class RetryPolicy:
    first: float = 300.0  # seconds before the first retry
    maximum: float = 3600.0  # the longest wait between two attempts
    lifetime: float = 5 * 86400.0  # how long a message is tried before it is bounced

    def delay(self, attempts: int, rng: random.Random) -> float:
        """The wait after the ``attempts``-th failed attempt (1 for the first)."""
        base = min(self.maximum, self.first * 2.0 ** max(0, attempts - 1))
        return max(0.0, base * rng.uniform(0.75, 1.25))


@dataclass
class Worker:
    queue: RelayQueue
    sender: Sender
    node: str
    hostname: str = "localhost"  # the Reporting-MTA of bounces
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 20
    per_domain: int = 4
    lease: float = 300.0
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self._active: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.bounced = 0
        self.deferred = 0

    def wake(self) -> None:
        """New work was queued (by this process's listener): look at once."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and deliver until ``stop`` is set; then wait for deliveries in progress."""
        released = await self.queue.release(self.node)
        if released:
            log.info("took back %d recipients this node had claimed before it stopped", released)
        try:
            while not stop.is_set():
                try:
                    claimed = await self._fill()
                    due = await self.queue.next_due()
                except StoreError as exc:
                    log.error("relay queue: %s (trying again)", exc)
                    claimed, due = 0, None
                wait = POLL if due is None else min(POLL, max(0.0, due - self.clock()))
                if self._tasks and (claimed == 0 or len(self._tasks) >= self.concurrency):
                    # Whatever is due waits for a delivery in progress (its domain is at its
                    # limit, or all are): the end of one wakes this loop.
                    wait = POLL
                self._wake.clear()
                waiters = [asyncio.ensure_future(stop.wait()),
                           asyncio.ensure_future(self._wake.wait())]  # fmt: skip
                await asyncio.wait(
                    [*waiters, *self._tasks] if self._tasks else waiters,
                    timeout=max(wait, 0.01),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for w in waiters:
                    w.cancel()
        finally:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=30)
            for t in list(self._tasks):
                t.cancel()

    async def _fill(self) -> int:
        """Claim due work up to the limits; how many pieces were claimed."""
        claimed = 0
        while len(self._tasks) < self.concurrency:
            busy = [d for d, n in self._active.items() if n >= self.per_domain]
            work = await self.queue.claim(self.node, self.clock(), self.lease, busy)
            if work is None:
                return claimed
            claimed += 1
            self._active[work.domain] += 1
            task = asyncio.create_task(self._deliver(work))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, domain=work.domain))
        return claimed

    def _done(self, task: asyncio.Task[None], domain: str) -> None:
        self._tasks.discard(task)
        self._active[domain] -= 1
        if self._active[domain] <= 0:
            del self._active[domain]
        self._wake.set()

    async def _deliver(self, work: Work) -> None:
        renewer = asyncio.create_task(self._renew(work))
        try:
            decisions, bounce = await self._attempt(work)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        try:
            await self.queue.finish(work, decisions, bounce, self.clock())
        except StoreError as exc:
            # The outcome is lost, not the message: the lease runs out and it is tried again.
            log.error("relay queue: cannot record the outcome of %s: %s", work.message_id, exc)
            return
        for d in decisions:
            if d.state == DELIVERED:
                self.delivered += 1
            elif d.state == BOUNCED:
                self.bounced += 1
            else:
                self.deferred += 1
        if bounce is not None:
            self.wake()

    async def _renew(self, work: Work) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(StoreError):
                await self.queue.renew(work, self.node, self.clock() + self.lease)

    async def _attempt(self, work: Work) -> tuple[list[Decision], NewMessage | None]:
        now = self.clock()
        try:
            result = await self.sender.deliver(
                work.mail_from,
                work.recipients,
                Message.from_bytes(work.data),
                requiretls=work.requiretls,
                tls_optional=work.tls_optional,
            )
        except (AddressError, MessageError) as exc:  # checked at acceptance: not expected
            refused = [Failed(r, "5.6.0", str(exc)) for r in work.recipients]
            decided = [Decision(r, BOUNCED, error=str(exc)) for r in work.recipients]
            return decided, self._bounce(work, refused)
        except Exception as exc:  # a bug of ours defers, never loses or bounces the message
            log.exception("relay: delivering %s failed unexpectedly", work.message_id)
            at = now + self.retry.delay(work.attempts + 1, self.rng)
            return [
                Decision(r, QUEUED, at, f"internal error: {exc!r}") for r in work.recipients
            ], None
        decisions: list[Decision] = []
        failed: list[Failed] = []
        expired = now >= work.received_at + self.retry.lifetime
        for d in result.domains:
            remote, why = _last_words(d)
            for address, status, reply in d.recipient_statuses():
                diagnostic = reply or why
                if status is DeliveryStatus.DELIVERED:
                    decisions.append(Decision(address, DELIVERED))
                elif status is DeliveryStatus.FAILED:
                    code = d.status_code or status_of(reply or _reply_of(d), _failed_code(d))
                    if code[0] != "5":
                        code = "5" + code[1:]
                    decisions.append(Decision(address, BOUNCED, error=diagnostic))
                    failed.append(Failed(address, code, diagnostic, remote, reply is not None))
                elif expired:
                    code = status_of(reply or _reply_of(d), "4.4.7")
                    text = f"gave up after {_age(now - work.received_at)}: {diagnostic}"
                    decisions.append(Decision(address, BOUNCED, error=text))
                    failed.append(Failed(address, code, text, remote, False))
                else:
                    at = now + self.retry.delay(work.attempts + 1, self.rng)
                    # The last attempt is made when the lifetime ends, not after it.
                    at = min(at, work.received_at + self.retry.lifetime)
                    decisions.append(Decision(address, QUEUED, at, diagnostic))
        return decisions, self._bounce(work, failed) if failed else None

    def _bounce(self, work: Work, failed: list[Failed]) -> NewMessage | None:
        if not work.mail_from:
            log.warning(
                "relay: a bounce (null sender) to %s could not be delivered; it is dropped, "
                "as RFC 5321 §6.1 says", ", ".join(f.recipient for f in failed),
            )  # fmt: skip
            return None
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        data = build_bounce(
            reporting_mta=self.hostname,
            original_sender=work.mail_from,
            failed=failed,
            # RFC 8689: nothing of a message that required TLS travels in a bounce that does
            # not, not even its header section.
            original=b"" if work.requiretls else work.data,
            arrival=dt.datetime.fromtimestamp(work.received_at, dt.UTC),
            now=now,
            message_id=work.message_id,
        )
        return NewMessage("", (work.mail_from,), data, client="bounce")


def _failed_code(d: DomainResult) -> str:
    """The enhanced status of a failure no server replied to (RFC 3463 §3.2): a destination
    that takes no mail (a null MX, no such domain) is X.1.2, an address that is not one X.1.3."""
    if d.policy is None:
        return "5.1.3"
    if d.policy.status is Status.FAIL:
        return "5.1.2"
    return "5.0.0"


def _reply_of(d: DomainResult) -> str | None:
    """The last SMTP reply any attempt got, if any."""
    for a in reversed(d.attempts):
        if a.smtp_reply:
            return a.smtp_reply
    return None


def _last_words(d: DomainResult) -> tuple[str | None, str]:
    """The MX host the last session reached, and what to tell the sender about the domain."""
    remote = next((a.mx for a in reversed(d.attempts) if a.ip is not None), None)
    last = next((a for a in reversed(d.attempts) if a.detail), None)
    why = d.detail or "not delivered"
    if last is not None and last.detail not in why:
        why = f"{why}; {last.mx}: {last.detail}"
    return remote, why


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"
