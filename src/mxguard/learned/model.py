"""The rules of learned levels, pure: no I/O, no clock (callers pass ``now``).

- A session's level (``session_level``): ``plain`` without TLS, ``dane`` or ``webpki`` when the
  certificate was authenticated that way, else ``tls``.
- What is learned is kept per (domain, MX host, address) (``LearnedHost``). A row is *fresh*
  while it was seen within the decay age; a stale row counts for nothing, and the next session
  there starts it again (``LearnedLevels.learn``'s ``stale_before``).
- A **drop** (``drops``) is a session below the strongest fresh level learned for the same MX
  host name or the same address. A host that never carried a level (a new MX host, a renamed
  one on a new address) has nothing to drop from: first contact and an MX set that moved to
  new hosts raise nothing.
- The **floor** of a domain (``floor``) is the strongest fresh encrypted level among the hosts
  of its current MX set that carried one. In ``enforce`` mode (per domain, global, or because
  the alarm is active with ``alarm_enforce``) it holds every MX host of the domain to that
  level, for ``defer_window`` from the first drop since the level was last seen; then
  ``after_window`` says whether mail is delivered anyway or bounced.
- The **stripping alarm** (``alarm_due``): at least ``alarm_domains`` different domains whose
  sessions had no TLS on hosts that used to give TLS (``LevelDrop.stripped``), within
  ``alarm_window``.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mxguard.adapters.store import LearnedHost, LevelDrop, StrippingAlarm, format_time
from mxguard.learned.config import AfterWindow, LearnedSettings, Mode
from mxguard.protocol.levels import SecurityLevel, strongest
from mxguard.protocol.results import ResultType

DANE_METHODS = frozenset({"dane-ee", "dane-ta", "dane"})


@dataclass(frozen=True, slots=True)
class Observation:
    """One session to an MX host address: the level it achieved and its RFC 8460 failure."""

    mx: str
    ip: str
    level: SecurityLevel
    result_type: ResultType | None = None


def session_level(
    *, tls: bool, verified: str | None, webpki: Callable[[], bool] = lambda: False
) -> SecurityLevel:
    """The level of one session: ``verified`` is how the certificate was authenticated
    (``dane-ee``, ``dane-ta``, ``pkix`` or None); ``webpki`` checks an unauthenticated
    chain against the WebPKI, called only when it matters."""
    if not tls:
        return SecurityLevel.PLAIN
    if verified in DANE_METHODS:
        return SecurityLevel.DANE
    if verified == "pkix" or webpki():
        return SecurityLevel.WEBPKI
    return SecurityLevel.TLS


def fresh(hosts: Iterable[LearnedHost], *, now: dt.datetime, decay: float) -> list[LearnedHost]:
    """The rows seen within ``decay`` seconds of ``now``: the others have decayed."""
    cutoff = now - dt.timedelta(seconds=decay)
    return [h for h in hosts if h.last_seen >= cutoff]


def learned_for(hosts: Iterable[LearnedHost], mx: str, ip: str) -> LearnedHost | None:
    """The strongest (fresh) row for this MX host name or this address, if any."""
    rows = [h for h in hosts if h.mx == mx or h.ip == ip]
    return max(rows, key=lambda h: (h.level.rank, h.last_seen)) if rows else None


def drops(
    domain: str,
    observations: Iterable[Observation],
    hosts: Sequence[LearnedHost],
    *,
    now: dt.datetime,
) -> list[LevelDrop]:
    """The observations below what ``hosts`` (fresh rows of ``domain``) learned there."""
    out = []
    for o in observations:
        row = learned_for(hosts, o.mx, o.ip)
        if row is not None and o.level.rank < row.level.rank:
            out.append(LevelDrop(now, domain, o.mx, o.ip, row.level, o.level, o.result_type))
    return out


class FloorState(enum.StrEnum):
    NONE = "none"  # nothing encrypted learned on the current MX hosts (or it decayed)
    REPORT = "report"  # learned; a drop is reported, mail is delivered
    ENFORCE = "enforce"  # the floor holds: sessions below it are not used (deferred)
    DELIVER = "deliver"  # enforced, the defer window has passed: delivered, reported
    BOUNCE = "bounce"  # enforced, the defer window has passed: the message fails for good


@dataclass(frozen=True)
class LearnedFloor:
    """What the learned levels say about a domain now: the engine's fact for precedence."""

    domain: str
    level: SecurityLevel | None  # strongest fresh level on hosts still in the MX set
    state: FloorState
    mode: Mode  # the effective mode (the alarm may have switched it to enforce)
    hosts: tuple[LearnedHost, ...] = ()  # every fresh row of the domain
    since: dt.datetime | None = None  # the first drop since the level was last seen
    until: dt.datetime | None = None  # when the defer window ends (enforce)
    alarm: bool = False  # enforced because the stripping alarm is active
    error: str | None = None  # the store could not be read
    drops: tuple[LevelDrop, ...] = ()  # the drops since the level was last seen

    @property
    def enforced(self) -> bool:
        return self.state is FloorState.ENFORCE

    @property
    def last_seen(self) -> dt.datetime | None:
        rows = [h.last_seen for h in self.hosts if self.level and h.level is self.level]
        return max(rows, default=None)

    @property
    def seen(self) -> int:
        return sum(h.seen for h in self.hosts if self.level and h.level is self.level)

    def explanation(self) -> str:
        """One line for people."""
        if self.error is not None:
            return f"learned levels unavailable: {self.error}"
        if self.level is None or self.state is FloorState.NONE:
            what = self.level.value if self.level else "nothing"
            return f"learned: {what} on the current MX hosts; no learned floor"
        last = _when(self.last_seen)
        seen = f"learned: {self.level.value} seen in {self.seen} session(s), last {last}"
        return {
            FloorState.REPORT: f"{seen}; report mode: a drop is reported, mail is delivered",
            FloorState.ENFORCE: f"{seen}; enforced"
            + (" (stripping alarm active)" if self.alarm else "")
            + ": sessions below it are not used"
            + (f", deferring until {_when(self.until)}" if self.since else ""),
            FloorState.DELIVER: f"{seen}; enforced, but the defer window since {_when(self.since)}"
            " has passed: delivered as after_window = deliver says",
            FloorState.BOUNCE: f"{seen}; enforced, and the defer window since {_when(self.since)}"
            " has passed: bounced as after_window = bounce says",
        }[self.state]

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level.value if self.level else None,
            "state": self.state.value,
            "mode": self.mode.value,
            "alarm": self.alarm,
            "last_seen": _iso(self.last_seen),
            "seen": self.seen,
            "since": _iso(self.since),
            "until": _iso(self.until),
            "error": self.error,
            "drops": [
                {"at": _iso(d.at), "mx": d.mx, "ip": d.ip, "learned": d.learned.value,
                 "seen": d.seen.value, "stripped": d.stripped,
                 "result_type": d.result_type.value if d.result_type else None}
                for d in self.drops
            ],
            "hosts": [
                {"mx": h.mx, "ip": h.ip, "level": h.level.value, "first_seen": _iso(h.first_seen),
                 "last_seen": _iso(h.last_seen), "seen": h.seen}
                for h in self.hosts
            ],
        }  # fmt: skip


def _iso(t: dt.datetime | None) -> str | None:
    return format_time(t) if t else None


def _when(t: dt.datetime | None) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t else "never"


def floor(
    domain: str,
    rows: Iterable[LearnedHost],
    mx_set: Sequence[tuple[str, Sequence[str]]],
    *,
    settings: LearnedSettings,
    now: dt.datetime,
    domain_drops: Sequence[LevelDrop] = (),
    alarm_enforce: bool = False,
) -> LearnedFloor:
    """The learned floor of ``domain`` with MX hosts ``mx_set`` ((name, addresses) each)."""
    hosts = tuple(fresh(rows, now=now, decay=settings.decay))
    names = {name for name, _ in mx_set}
    addresses = {a for _, addrs in mx_set for a in addrs}
    present = [h for h in hosts if h.mx in names or h.ip in addresses]
    level = strongest(h.level for h in present)
    configured = settings.mode_for(domain)
    mode = Mode.ENFORCE if alarm_enforce else configured
    alarm = alarm_enforce and configured is not Mode.ENFORCE
    if level is None or not level.encrypted:
        return LearnedFloor(domain, level, FloorState.NONE, mode, hosts)
    # The streak of drops that began after the level was last seen on these hosts.
    last = max(h.last_seen for h in present if h.level is level)
    streak = tuple(d for d in domain_drops if d.at > last)
    if mode is Mode.REPORT:
        return LearnedFloor(domain, level, FloorState.REPORT, mode, hosts, drops=streak)
    since = min((d.at for d in streak), default=None)
    until = since + dt.timedelta(seconds=settings.defer_window) if since else None
    state = FloorState.ENFORCE
    if until is not None and now >= until:
        state = (
            FloorState.BOUNCE if settings.after_window is AfterWindow.BOUNCE else FloorState.DELIVER
        )
    return LearnedFloor(domain, level, state, mode, hosts, since, until, alarm, drops=streak)


def alarm_due(
    window_drops: Iterable[LevelDrop],
    *,
    settings: LearnedSettings,
    now: dt.datetime,
) -> StrippingAlarm | None:
    """The alarm the drops of the window call for: at least ``alarm_domains`` domains that
    lost STARTTLS on hosts that used to give TLS. One receiver dropping TLS is one domain."""
    by_domain: dict[str, set[str]] = {}
    for d in window_drops:
        if d.stripped:
            by_domain.setdefault(d.domain, set()).add(host_label(d))
    if len(by_domain) < settings.alarm_domains:
        return None
    return StrippingAlarm(
        raised_at=now,
        domains=tuple(sorted(by_domain)),
        hosts=tuple(sorted(h for hs in by_domain.values() for h in hs)),
        window=settings.alarm_window,
        enforce=settings.alarm_enforce,
    )


def host_label(d: LevelDrop) -> str:
    """How an alarm names an affected host: ``domain mx [address]``."""
    return f"{d.domain} {d.mx} [{d.ip}]"


class AttemptLike(Protocol):
    """What ``deliver()`` knows of one attempt (engine/deliver.py ``Attempt``)."""

    @property
    def mx(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def session(self) -> bool: ...
    @property
    def starttls(self) -> bool | None: ...
    @property
    def tls_version(self) -> str | None: ...
    @property
    def verified(self) -> str | None: ...
    @property
    def presented(self) -> tuple[bytes, ...]: ...
    @property
    def result_type(self) -> ResultType | None: ...
