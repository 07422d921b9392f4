"""Learned levels over the store: what ``deliver()``, the resolver, the Postfix collectors and
the commands call (the rules themselves are in model.py).

``observe`` never raises: a store that cannot record a level costs the level, never the
delivery (it is logged). ``floor`` raises StoreError; the engine defers an enforced domain on
it (a temporary failure never lowers security) and notes it otherwise.

Every drop is logged as a warning and counted (``Counters``, shown in ``serve postfix``'s
/metrics); the stripping alarm is raised in the store, which lets exactly one caller on any
node raise it, and that caller logs it, once, at CRITICAL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mxguard.adapters.store import (
    LearnedLevels,
    LevelDrop,
    LevelSeen,
    StoreError,
    StrippingAlarm,
)
from mxguard.learned import model
from mxguard.learned.config import LearnedSettings
from mxguard.protocol.levels import SecurityLevel
from mxguard.protocol.results import ResultType
from mxguard.protocol.webpki import valid as webpki_valid

log = logging.getLogger("mxguard.learned")

# Seconds one read of the stripping alarm serves ``floor``: a burst of resolutions reads it
# once, not once each; an alarm another process raises or clears applies within this time
# (one this process raises or clears, at once).
ALARM_READ_FRESH = 1.0


@dataclass
class Counters:
    """What this process saw, for /metrics."""

    sessions: Counter[str] = field(default_factory=Counter)  # by level seen
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)  # (learned, seen)
    stripped: int = 0
    alarms: int = 0  # alarms this process raised
    store_errors: int = 0


class Learner:
    """Learned levels of one store under one ``[learned]`` configuration."""

    def __init__(
        self,
        store: LearnedLevels,
        settings: LearnedSettings | None = None,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        counters: Counters | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or LearnedSettings()
        self.clock = clock
        self.counters = counters or Counters()
        self.monotonic = time.monotonic
        self._alarm_read: tuple[float, asyncio.Future[StrippingAlarm | None]] | None = None

    # --- what the engine asks before a delivery ---

    async def floor(
        self, domain: str, mx_set: Sequence[tuple[str, Sequence[str]]]
    ) -> model.LearnedFloor:
        now = self.clock()
        rows = await self.store.learned_hosts(domain)
        alarm = await self._recent_alarm()
        alarm_enforce = alarm is not None and alarm.active and alarm.enforce
        domain_drops: list[LevelDrop] = []
        if rows:
            start = now - dt.timedelta(seconds=self.settings.decay)
            domain_drops = await self.store.drops_since(start, domain)
        return model.floor(
            domain, rows, mx_set, settings=self.settings, now=now,
            domain_drops=domain_drops, alarm_enforce=alarm_enforce,
        )  # fmt: skip

    async def _recent_alarm(self) -> StrippingAlarm | None:
        """The latest alarm, read at most ALARM_READ_FRESH seconds ago; concurrent callers
        share one read. A failed read is not kept (StoreError for every one that waited)."""
        now = self.monotonic()
        if self._alarm_read is not None and now - self._alarm_read[0] < ALARM_READ_FRESH:
            return await asyncio.shield(self._alarm_read[1])
        read = asyncio.ensure_future(self.store.latest_alarm())
        self._alarm_read = (now, read)
        try:
            return await asyncio.shield(read)
        except BaseException:
            if self._alarm_read is not None and self._alarm_read[1] is read:
                self._alarm_read = None
            raise

    def _forget_alarm_read(self) -> None:
        self._alarm_read = None

    async def active_alarm(self) -> StrippingAlarm | None:
        alarm = await self.store.latest_alarm()
        return alarm if alarm is not None and alarm.active else None

    # --- what a session taught ---

    async def observe_attempts(
        self,
        domain: str,
        attempts: Iterable[model.AttemptLike],
        *,
        roots: Sequence[Any] = (),
        now: dt.datetime | None = None,
        published: bool = False,
    ) -> list[LevelDrop]:
        """Learn from ``deliver()``'s attempts (those with a session and an address)."""
        when = now or self.clock()
        root_ders = _ders(roots)
        found = []
        for a in attempts:
            if not a.session or a.ip is None:
                continue

            def webpki(a: model.AttemptLike = a) -> bool:
                if not a.presented:
                    return False
                return webpki_valid(a.presented, name=a.mx, roots=root_ders, now=when)

            level = model.session_level(
                tls=a.tls_version is not None, verified=a.verified, webpki=webpki
            )
            result = a.result_type
            if result is None and a.starttls is False:
                # Opportunistic delivery records no failure; the level does (RFC 8460 §4.3.2.1).
                result = ResultType.STARTTLS_NOT_SUPPORTED
            found.append(model.Observation(a.mx, a.ip, level, result))
        return await self.observe(domain, found, now=when, published=published)

    async def observe(
        self,
        domain: str,
        observations: Sequence[model.Observation],
        *,
        now: dt.datetime | None = None,
        published: bool = False,
    ) -> list[LevelDrop]:
        """Learn the levels of sessions to ``domain``; record, log and count the drops among
        them, and raise the alarm when it is due. Never raises. ``published``: the domain
        has a policy of its own (DANE, MTA-STS, the list, a local rule) that already decides
        what its sessions must be: its drops are recorded, counted and alarm as any, but
        logged at INFO (that policy's failures are reported its own way), not WARNING."""
        if not observations:
            return []
        now = now or self.clock()
        try:
            rows = model.fresh(
                await self.store.learned_hosts(domain), now=now, decay=self.settings.decay
            )
            found = model.drops(domain, observations, rows, now=now)
            stale = now - dt.timedelta(seconds=self.settings.decay)
            await self.store.learn(
                [LevelSeen(domain, o.mx, o.ip, o.level, now) for o in observations],
                stale_before=stale,
            )
            if found:
                await self.store.add_drops(found)
        except StoreError as exc:
            self.counters.store_errors += 1
            log.warning("learned levels of %s not recorded: %s", domain, exc)
            return []
        for o in observations:
            self.counters.sessions[o.level.value] += 1
        for d in found:
            self.counters.drops[(d.learned.value, d.seen.value)] += 1
            self.counters.stripped += d.stripped
            log.log(
                logging.INFO if published else logging.WARNING,
                "security level drop for %s: %s [%s] gave %s where %s was learned%s",
                d.domain, d.mx, d.ip, d.seen.value, d.learned.value,
                f" ({d.result_type.value})" if d.result_type else "",
            )  # fmt: skip
        stripped = [d for d in found if d.stripped]
        if stripped and await self.check_alarm(now) is None:
            await self._extend_alarm(stripped)
        return found

    async def _extend_alarm(self, stripped: Sequence[LevelDrop]) -> None:
        """Name further domains in an alarm already active (logged once per domain added)."""
        try:
            before = await self.active_alarm()
            if before is None or {d.domain for d in stripped} <= set(before.domains):
                return
            after = await self.store.extend_alarm(
                [d.domain for d in stripped], [model.host_label(d) for d in stripped]
            )
            self._forget_alarm_read()
        except StoreError as exc:
            self.counters.store_errors += 1
            log.warning("the stripping alarm could not be extended: %s", exc)
            return
        if after is not None:
            added = sorted(set(after.domains) - set(before.domains))
            if added:
                log.warning("stripping alarm: %s lost STARTTLS too", ", ".join(added))

    async def check_alarm(self, now: dt.datetime | None = None) -> StrippingAlarm | None:
        """Raise the stripping alarm if the drops of the window call for it and none is
        active; the alarm this call raised, else None. Never raises."""
        now = now or self.clock()
        try:
            latest = await self.store.latest_alarm()
            if latest is not None and latest.active:
                return None
            start = now - dt.timedelta(seconds=self.settings.alarm_window)
            if latest is not None and latest.cleared_at is not None:
                # What was cleared is not raised again: only drops after the clearing count.
                start = max(start, latest.cleared_at + dt.timedelta(microseconds=1))
            alarm = model.alarm_due(
                await self.store.drops_since(start), settings=self.settings, now=now
            )
            if alarm is None:
                return None
            raised = await self.store.raise_alarm(alarm)
            self._forget_alarm_read()
            if not raised:
                return None
        except StoreError as exc:
            self.counters.store_errors += 1
            log.warning("the stripping alarm could not be checked: %s", exc)
            return None
        self.counters.alarms += 1
        log.critical(
            "STRIPTLS ALARM: %d domains that used to get TLS lost STARTTLS within %g s — an "
            "attacker near this sender is the likely cause, not the receivers. Domains: %s. "
            "MX hosts: %s. %s Clear it with `mxguard learned clear-alarm`.",
            len(alarm.domains), alarm.window, ", ".join(alarm.domains), ", ".join(alarm.hosts),
            "Learned levels are now ENFORCED for every learned domain until it is cleared."
            if alarm.enforce else "Mail is still delivered (report mode).",
        )  # fmt: skip
        return alarm

    async def clear_alarm(self) -> StrippingAlarm | None:
        alarm = await self.store.clear_alarm(self.clock())
        self._forget_alarm_read()
        if alarm is not None:
            log.warning("stripping alarm of %s cleared", alarm.raised_at.isoformat())
        return alarm


def _ders(roots: Sequence[Any]) -> Sequence[bytes]:
    """``roots`` as DER (a sender's are already; parsed ones are encoded, once per call)."""
    if all(isinstance(r, bytes) for r in roots):
        return roots
    from mxguard.protocol import pkix

    return tuple(r if isinstance(r, bytes) else pkix.der(r) for r in roots)


def level_of_postfix_trust(trust: str | None, *, dane_policy: bool) -> SecurityLevel:
    """The level of a Postfix session from its TLS trust word (``Verified``, ``Trusted``,
    ``Untrusted``, ``Anonymous``; None: no TLS). ``Verified`` under a DANE policy is DANE."""
    if trust is None:
        return SecurityLevel.PLAIN
    if trust == "Verified":
        return SecurityLevel.DANE if dane_policy else SecurityLevel.WEBPKI
    return SecurityLevel.TLS
