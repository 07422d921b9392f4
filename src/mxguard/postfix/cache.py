"""The Postfix policy server's answer cache: one answer per domain, least recently used out.

An entry holds the answer, its socketmap reply as it goes on the wire (a netstring, made once
when the answer is stored, so that a hit costs no encoding), when it expires, when the
refresher should re-resolve it, and when it was last asked for. ``lifetime()`` decides how
long an answer may be served: ``answer_ttl`` seconds, never past the MTA-STS policy's expiry
(RFC 8461 §5), and only ``temp_ttl`` for ``TEMP`` and ``TIMEOUT`` answers and for answers
other than ``OK`` that no policy stands behind (``PERM`` for an invalid key). Times are
``time.monotonic()`` seconds passed in by the server; nothing here reads a clock but
``lifetime()``, which compares the policy's expiry with the wall clock. No I/O.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

from mxguard.engine.policy import DeliveryPolicy
from mxguard.postfix import answers
from mxguard.postfix.answers import Answer
from mxguard.postfix.netstring import encode

MAX_SHARED = 4096  # distinct answers kept for sharing (a cache of them, emptied when full)


@dataclass(slots=True)
class Entry:
    answer: Answer
    expires: float  # monotonic
    refresh_at: float
    last_used: float
    socketmap: bytes = b""  # the reply netstring
    label: str = ""  # the answer's metrics label


def lifetime(
    answer: Answer, policy: DeliveryPolicy | None, *, answer_ttl: float, temp_ttl: float
) -> float:
    """Seconds ``answer`` (translated from ``policy``, if any) may be served from the cache."""
    ttl = temp_ttl if answer.kind is not answers.Kind.OK and policy is None else None
    if answer.kind in (answers.Kind.TEMP, answers.Kind.TIMEOUT):
        ttl = temp_ttl
    if ttl is None:
        ttl = answer_ttl
        sts = policy.mta_sts if policy is not None else None
        if sts is not None and sts.expires_at is not None:
            # RFC 8461 §5: the policy is not valid past max_age from its fetch.
            left = (sts.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
            ttl = max(1.0, min(ttl, left))
    return ttl


class AnswerCache:
    """Answers by domain, at most ``max_entries``; the least recently used go first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # Many domains get the very same answer (a provider's MX hosts, NOTFOUND): they share
        # one Answer, one reply and one label instead of a copy each.
        self._shared: dict[Answer, tuple[Answer, bytes, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, domain: str, now: float) -> Answer | None:
        """The unexpired answer for ``domain``, marked as used ``now``; None on a miss."""
        entry = self.hit_entry(domain, now)
        return entry.answer if entry is not None else None

    def hit_entry(self, domain: str, now: float) -> Entry | None:
        """``hit``, with the whole entry (its reply bytes and label)."""
        entry = self._entries.get(domain)
        if entry is None or entry.expires <= now:
            return None
        entry.last_used = now
        self._entries.move_to_end(domain)
        return entry

    def peek(self, domain: str, now: float) -> Answer | None:
        """The unexpired answer for ``domain``, without counting it as used."""
        entry = self._entries.get(domain)
        return entry.answer if entry is not None and entry.expires > now else None

    def put(self, domain: str, answer: Answer, ttl: float, now: float) -> None:
        """Keep ``answer`` for ``ttl`` seconds; due for refresh after three quarters of it."""
        old = self._entries.pop(domain, None)
        shared = self._shared.get(answer)
        if shared is None:
            if len(self._shared) >= MAX_SHARED:
                self._shared.clear()
            shared = self._shared[answer] = (answer, encode(answer.socketmap()), answer.label)
        self._entries[domain] = Entry(
            answer=shared[0],
            expires=now + ttl,
            refresh_at=now + ttl * 0.75,
            last_used=old.last_used if old is not None else now,
            socketmap=shared[1],
            label=shared[2],
        )
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)  # the least recently used

    def due(
        self, now: float, *, hot_window: float, busy: Container[str], retry_in: float
    ) -> list[str]:
        """The domains used within ``hot_window`` whose refresh is due and not ``busy``.

        Each is not due again for ``retry_in`` seconds. Cold entries that expired are dropped.
        """
        due: list[str] = []
        for domain, entry in list(self._entries.items()):
            if now - entry.last_used > hot_window:
                if entry.expires <= now:
                    del self._entries[domain]
                continue
            if entry.refresh_at <= now and domain not in busy:
                entry.refresh_at = now + retry_in  # don't start it again next tick
                due.append(domain)
        return due

    def clear(self) -> None:
        """Forget every answer (the fault suite's "nothing cached")."""
        self._entries.clear()
        self._shared.clear()

    def refresh_all(self, now: float) -> None:
        """Make every entry due for refresh (after a reload: answers under the new config)."""
        for entry in self._entries.values():
            entry.refresh_at = now
