"""Follow a Postfix log and record its SMTP sessions as TLS-RPT results (RFC 8460 §4).

`mxguard tlsrpt collect-postfix` turns what Postfix logged (postfix_log.py) into the same
`SessionResult`s that mxguard's own sender records, joined with the policy that mxguard served
Postfix for that domain when the session ran (DANE -> `tlsa` with the TLSA records, MTA-STS ->
`sts` with the policy lines and MX patterns, RFC 8460 §4.4; and the domain's `rua`):

- served: the policy server (postfix/server.py) records what it served whenever it changes
  (`ServedPolicy` in the store); a session is joined with the record in force when it was
  logged (`Store.served_at`). Classic syslog timestamps are whole seconds, truncated: a
  session logged at 11:10:06 ended before 11:10:07, so records up to the end of that second
  count (LOG_PRECISION);
- resolved: when there is no record for that time (Postfix ran without mxguard's policy
  server then, or the store keeps no records: Redis), the engine resolves the policy now with
  the same settings (`EnginePolicies`), which may differ from what Postfix was told.

`Counts.policies` says how many sessions were judged either way.

Incremental and resumable. A state file remembers where reading stopped: the log's device and
inode, the byte offset, a fingerprint of the file's first bytes, and the line joiner's state
(sessions whose status line has not been logged yet). On each run:

- same file, grown: read on from the offset;
- rotated (the path now names another inode): first read the rest of the old file, found by
  its inode among the rotated names next to it (`mail.log.1`, `maillog-20241130`, ...), then
  the new file from its start;
- truncated (`copytruncate`), or rewritten (the first bytes changed): read from the start.

Exactly once: results are added to the store (one transaction) before the state file moves
past the lines they came from, and the batch is first announced in the state file with how
many stored results matched its sessions' keys (time, MX address, result) before. After a
crash between the two writes, the next run counts again: the batch was recorded exactly when
the count grew by its size; it is then skipped, otherwise read again.

Only sessions to the recipient domain's MX hosts are results (RFC 8460 §4: the report is
about the policy domain's MX hosts). Postfix's next hop is often something else: a content
filter (amavis at ``127.0.0.1:10024``), a ``relayhost``, an internal server of
``postfix/relay``. A session is kept when its host name or address is one of the MX hosts of
the policy (`PolicyInForce.is_mx`); the others are counted as "not to an MX host".
A recipient domain is converted to the A-label form the store keys on (IDNA: SMTPUTF8
recipients such as ``anna@bücher.example``); a session whose domain or result still cannot be
stored is counted and skipped, so that one bad line never fails its batch (which would fail
again on every run).

Beside Postfix's own events (`supplement=True`: `mxguard tlsrpt collect --socket … --log …`).
Postfix ≥ 3.10 with TLSRPT on reports most sessions itself, as datagrams another receiver
records (datagram.py); those events are authoritative for every session that produced one,
and the log then supplies only the sessions they leave out (`left_out_by_postfix`): sessions
in plain text under a report-only policy (MTA-STS `testing`), recorded as
starttls-not-supported under the policy served then. Postfix logs each event it reports
(``TLSRPT: status=…`` of that smtp process, before the session's status line), so a session
is matched with its event by the log itself, never by time: a session with such a line is
Postfix's (counted as REPORTED_BY_POSTFIX, not looked up); every other session that is not
left out is counted as NOT_LEFT_OUT.

Bounded: lines longer than MAX_LINE are skipped (counted), a batch holds at most BATCH_LINES
lines, the joiner follows at most MAX_PROCESSES processes, the policy cache holds at most
MAX_CACHED_POLICIES domains for at most POLICY_TTL (RETRY_TTL for a deferred lookup).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from mxguard.adapters.store import ServedPolicy, SessionResult, Store, StoreError, check_result
from mxguard.engine.policy import DeliveryPolicy, Status
from mxguard.engine.resolve import DomainError, normalise_domain
from mxguard.learned.learner import Learner, level_of_postfix_trust
from mxguard.learned.model import Observation
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import NO_POLICY_FOUND, PolicyType, ReportedPolicy
from mxguard.tlsrpt.postfix_log import (
    MAX_LINE,
    Joiner,
    Session,
    host_key,
    left_out_by_postfix,
    parse_line,
    result_type,
)

BATCH_LINES = 10_000
FINGERPRINT_BYTES = 256
MAX_ROTATED_CANDIDATES = 64  # files next to the log looked at to find the rotated one
STATE_VERSION = 1
POLICY_TTL = 3600.0  # seconds a resolved policy is used for (--follow runs for months)
RETRY_TTL = 60.0  # seconds a deferred lookup (DNS trouble: MX hosts unknown) is used for
MAX_CACHED_POLICIES = 10_000
# Timestamps in whole seconds are truncated: the session ended before the next second began.
LOG_PRECISION = dt.timedelta(seconds=1)

# Why a session the log shows is not a result (`Counts.dropped` keys).
NOT_TO_MX = "not to an MX host"
MX_UNKNOWN = "MX hosts unknown"
BAD_DOMAIN = "recipient domain unusable"
# Only with `supplement`: the session is Postfix's own TLSRPT event's (it logged one) ...
REPORTED_BY_POSTFIX = "reported by Postfix itself (TLSRPT)"
# ... or it is none that Postfix's events leave out (`left_out_by_postfix`).
NOT_LEFT_OUT = "not a plain-text session under a report-only policy"

# Where a session's policy came from (`Counts.policies` keys).
SERVED = "served"  # the record of what mxguard's policy server served at the session's time
RESOLVED = "resolved"  # no such record: resolved by the collector (`EnginePolicies`)


class CollectorError(Exception):
    """The log or the state file cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PolicyInForce:
    """The policy a logged session is judged and reported under (RFC 8460 §4.4), and the MX
    hosts it allowed: whom a session must have gone to for it to be a result at all."""

    policy: ReportedPolicy
    # The domain's MX hosts (names as published and CNAME-expanded) and their addresses.
    mx_hosts: frozenset[str] = frozenset()
    mx_addresses: frozenset[str] = frozenset()
    deferred: bool = False  # the lookup failed for now: MX hosts may be missing

    @classmethod
    def of(
        cls,
        policy: ReportedPolicy,
        hosts: Iterable[str],
        addresses: Iterable[str],
        *,
        deferred: bool = False,
    ) -> PolicyInForce:
        """`policy` with the MX host names and addresses in the form sessions are matched in."""
        return cls(
            policy,
            mx_hosts=frozenset(host_key(h) for h in hosts),
            mx_addresses=frozenset(_ip_key(a) for a in addresses),
            deferred=deferred,
        )

    def is_mx(self, host: str, ip: str) -> bool:
        """Whether a session to `host`[`ip`] was one to an MX host of this domain."""
        return host_key(host) in self.mx_hosts or _ip_key(ip) in self.mx_addresses


NO_POLICY = PolicyInForce(NO_POLICY_FOUND)


class PolicySource(Protocol):
    async def __call__(self, domain: str) -> PolicyInForce: ...


def _ip_key(ip: str) -> str:
    try:
        return ipaddress.ip_address(ip).compressed
    except ValueError:
        return ip


def report_policy(policy: DeliveryPolicy) -> PolicyInForce:
    """A resolved policy, with the MX hosts it allows (as the policy server records them: an
    MTA-STS `enforce` policy forbids the others, RFC 8461 §4.1)."""
    return PolicyInForce.of(
        policy.reported(),
        policy.allowed_hosts,
        policy.allowed_addresses,
        deferred=policy.status is Status.DEFER,
    )


def served_policy(record: ServedPolicy) -> PolicyInForce:
    """A served record, with the MX hosts it allowed (the same as `report_policy` of the
    policy that was served)."""
    return PolicyInForce.of(record.policy, record.mx_hosts, record.mx_addresses)


def logged_until(at: dt.datetime) -> dt.datetime:
    """The latest moment a session logged at `at` can have ended (see LOG_PRECISION)."""
    if at.microsecond == 0:
        return at + LOG_PRECISION - dt.timedelta(microseconds=1)
    return at


class _Resolves(Protocol):
    async def resolve(self, domain: str) -> DeliveryPolicy: ...


class EnginePolicies:
    """The policy mxguard's policy server would serve for a domain now, for sessions with no
    served record (see the module's docstring): resolved by the engine with the same
    settings, then used for `ttl` seconds (`retry_ttl` when the lookup was
    deferred), so that a collector that follows the log for months sees policy and MX changes.
    """

    def __init__(
        self,
        resolver: _Resolves,
        *,
        ttl: float = POLICY_TTL,
        retry_ttl: float = RETRY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._ttl, self._retry_ttl, self._clock = ttl, retry_ttl, clock
        self._cache: OrderedDict[str, tuple[float, PolicyInForce]] = OrderedDict()

    async def __call__(self, domain: str) -> PolicyInForce:
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            policy = report_policy(await self._resolver.resolve(domain))
        except DomainError:
            policy = NO_POLICY
        self._cache.pop(domain, None)
        self._cache[domain] = (now + (self._retry_ttl if policy.deferred else self._ttl), policy)
        while len(self._cache) > MAX_CACHED_POLICIES:
            self._cache.popitem(last=False)  # the oldest lookup
        return policy


def to_result(session: Session, policy: PolicyInForce, *, sending_ip: str | None) -> SessionResult:
    """The store's record of one Postfix session (the shape deliver.py's `_record` writes)."""
    failure = result_type(session, policy.policy.policy_type)
    tls = f"{session.tls} TLS" if session.tls else "no TLS"
    # Only TLS facts in our own words: this text may reach the domain's report (RFC 8460 §4.4
    # additional-information), so no SMTP reply, address or queue id.
    detail = [f"Postfix: {tls}", session.ending.value]
    if session.certificate_failure is not None:
        detail.append(f"certificate: {session.certificate_failure.value}")
    return SessionResult(
        id=None,
        at=session.at,
        policy_domain=session.domain,
        policy=policy.policy,
        result_type=failure,
        sending_ip=sending_ip,
        receiving_mx=session.mx_host,
        receiving_ip=session.mx_ip,
        receiving_helo=None,  # Postfix does not log the server's EHLO name
        detail="; ".join(detail),
        is_report=False,
        reported=None,
    )


# --- where reading stopped ------------------------------------------------------------------


@dataclass
class State:
    """The state file's content."""

    dev: int | None = None
    inode: int | None = None
    offset: int = 0
    fingerprint: str = ""  # sha256 of the first FINGERPRINT_BYTES (fewer while shorter)
    fingerprint_len: int = 0
    skipping: bool = False  # inside an over-long line: drop bytes up to the next newline
    joiner: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Any] | None = None  # an announced batch: token, times, state after it

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "dev": self.dev,
            "inode": self.inode,
            "offset": self.offset,
            "fingerprint": self.fingerprint,
            "fingerprint_len": self.fingerprint_len,
            "skipping": self.skipping,
            "joiner": self.joiner,
            "pending": self.pending,
        }

    @classmethod
    def from_json(cls, data: Any, where: Path) -> State:
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise CollectorError(
                f"{where} is not a collect-postfix state file of version {STATE_VERSION}; "
                "pass another --state FILE, or delete it to read the log from its start"
            )
        try:
            return cls(
                dev=data["dev"],
                inode=data["inode"],
                offset=int(data["offset"]),
                fingerprint=str(data["fingerprint"]),
                fingerprint_len=int(data["fingerprint_len"]),
                skipping=bool(data["skipping"]),
                joiner=dict(data["joiner"]),
                pending=data["pending"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CollectorError(f"{where}: damaged state file ({exc!r}); delete it") from exc


def load_state(path: Path) -> State:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return State()
    except OSError as exc:
        raise CollectorError(f"cannot read the state file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CollectorError(f"{path}: not a state file (not UTF-8 text); delete it") from exc
    try:
        return State.from_json(json.loads(text), path)
    except json.JSONDecodeError as exc:
        raise CollectorError(f"{path}: damaged state file ({exc}); delete it") from exc


def save_state(path: Path, state: State) -> None:
    """Write atomically and durably: a temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(state.to_json(), separators=(",", ":")).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_state_path(log: Path) -> Path:
    """`$XDG_STATE_HOME/mxguard/postfix-<hash of the log's absolute path>.json`."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    digest = hashlib.sha256(str(log.absolute()).encode()).hexdigest()[:16]
    return base / "mxguard" / f"postfix-{digest}.json"


def _key(r: SessionResult) -> str:
    return f"{r.at.astimezone(dt.UTC).isoformat()}|{r.receiving_ip}|{r.result_text}"


def _fingerprint(f: BinaryIO, length: int) -> str:
    f.seek(0)
    return hashlib.sha256(f.read(length)).hexdigest()


# --- the collector --------------------------------------------------------------------------


@dataclass
class Counts:
    """What one `collect()` did."""

    lines: int = 0
    skipped_long: int = 0
    sessions: int = 0
    results: dict[str, int] = field(default_factory=dict)  # result type or "success" -> n
    dropped: dict[str, int] = field(default_factory=dict)  # NOT_TO_MX, ... -> sessions
    policies: dict[str, int] = field(default_factory=dict)  # SERVED | RESOLVED -> sessions
    rotated: bool = False
    truncated: bool = False
    recovered: str | None = None  # "recorded" | "re-read": what became of an interrupted batch

    def drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1

    def add(self, other: Counts) -> None:
        """Add `other`'s counts to these (the totals of `follow`)."""
        self.lines += other.lines
        self.skipped_long += other.skipped_long
        self.sessions += other.sessions
        self.rotated |= other.rotated
        self.truncated |= other.truncated
        for mine, theirs in (
            (self.results, other.results),
            (self.dropped, other.dropped),
            (self.policies, other.policies),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "skipped_long_lines": self.skipped_long,
            "sessions": self.sessions,
            "results": dict(sorted(self.results.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "policies": {k: self.policies.get(k, 0) for k in (SERVED, RESOLVED)},
            "rotated": self.rotated,
            "truncated": self.truncated,
            "recovered_batch": self.recovered,
        }


class Collector:
    """Reads `log` from where `state_path` says it stopped and records sessions in `store`."""

    def __init__(
        self,
        log: Path,
        store: Store,
        policies: Callable[[str], Awaitable[PolicyInForce]],
        *,
        state_path: Path | None = None,
        sending_ip: str | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone(),
        tz: dt.tzinfo | None = None,
        supplement: bool = False,
        learner: Learner | None = None,
    ) -> None:
        """`supplement`: Postfix reports over TLSRPT and another receiver records its events;
        record only the sessions they leave out (see the module's docstring)."""
        self.log = log
        self.store = store
        self.policies = policies
        self.state_path = state_path or default_state_path(log)
        self.sending_ip = sending_ip
        self.clock = clock
        self.tz = tz
        self.supplement = supplement
        self.learner = learner  # learns each session's security level (docs/learned.md)
        self._served = True  # ask the store for served records (until it refuses, per run)

    async def collect(self) -> Counts:
        """Read everything new (in batches), record it, and move the state past it."""
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CollectorError(
                f"cannot create {self.state_path.parent} for the state file: {exc.strerror}; "
                "pass --state FILE in a writable folder"
            ) from exc
        counts = Counts()
        self._served = True
        state = load_state(self.state_path)
        if state.pending is not None:
            state = await self._recover(state, counts)
        try:
            st = os.stat(self.log)
        except OSError as exc:
            raise CollectorError(f"cannot read the Postfix log {self.log}: {exc.strerror}") from exc
        if state.inode is not None and (state.dev, state.inode) != (st.st_dev, st.st_ino):
            counts.rotated = True
            old = self._rotated(state)
            if old is not None:
                state = await self._drain(old, state, counts)
            state = State(joiner=state.joiner)  # the new file from its start
        state = await self._drain(self.log, state, counts)
        return counts

    def _rotated(self, state: State) -> Path | None:
        """The file that now has the inode we were reading (renamed by log rotation)."""
        folder = self.log.absolute().parent
        try:
            names = sorted(p for p in folder.iterdir() if p.name.startswith(self.log.name))
        except OSError:
            return None
        for p in names[:MAX_ROTATED_CANDIDATES]:
            with contextlib.suppress(OSError):
                st = p.stat()
                if (st.st_dev, st.st_ino) == (state.dev, state.inode) and p != self.log:
                    return p
        return None

    async def _drain(self, path: Path, state: State, counts: Counts) -> State:
        try:
            # Local file reads of at most BATCH_LINES lines between awaits: blocking is brief.
            f = open(path, "rb")  # noqa: SIM115, ASYNC230
        except OSError as exc:
            raise CollectorError(f"cannot read the Postfix log {path}: {exc.strerror}") from exc
        with f:
            st = os.fstat(f.fileno())
            same = (state.dev, state.inode) == (st.st_dev, st.st_ino)
            if same and (
                st.st_size < state.offset
                or _fingerprint(f, state.fingerprint_len) != state.fingerprint
            ):
                counts.truncated = True
                same = False
            if not same:
                state = State(dev=st.st_dev, inode=st.st_ino, joiner=state.joiner)
            while True:
                new = await self._batch(f, state, counts)
                if new is None:
                    return state
                state = new

    async def _batch(self, f: BinaryIO, state: State, counts: Counts) -> State | None:
        """Read, record and commit up to BATCH_LINES lines; None when nothing new was read."""
        f.seek(state.offset)
        joiner = Joiner.from_json(state.joiner)
        offset, skipping, n = state.offset, state.skipping, 0
        now = self.clock()
        found: list[Session] = []
        while n < BATCH_LINES:
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                break
            if not raw.endswith(b"\n"):
                if len(raw) <= MAX_LINE:
                    break  # a line still being written: read it next time, whole
                if not skipping:
                    counts.skipped_long += 1
                skipping = True  # over-long: drop it up to its newline
                offset += len(raw)
                continue
            offset += len(raw)
            n += 1
            if skipping:
                skipping = False
                continue
            line = parse_line(raw.decode("utf-8", "replace"), now=now, tz=self.tz)
            if line is not None:
                found.extend(joiner.feed(line))
        if offset == state.offset:
            return None
        counts.lines += n
        fp_len = min(FINGERPRINT_BYTES, max(offset, state.fingerprint_len))
        after = State(
            dev=state.dev,
            inode=state.inode,
            offset=offset,
            fingerprint=_fingerprint(f, fp_len),
            fingerprint_len=fp_len,
            skipping=skipping,
            joiner=joiner.to_json(),
        )
        await self._commit(state, after, found, counts)
        return after

    async def _commit(
        self, before: State, after: State, found: list[Session], counts: Counts
    ) -> None:
        if self.learner is not None:
            await self._learn(found, self.learner)
        results = await self._results(found, counts)
        if not results:
            save_state(self.state_path, after)
            return
        start, end = min(r.at for r in results), max(r.at for r in results)
        keys = sorted({_key(r) for r in results})
        # Announce the batch first: if we die after add_results, the next run can tell.
        before.pending = {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "keys": keys,
            "stored_before": await self._matching(start, end, set(keys)),
            "size": len(results),
            "after": after.to_json(),
        }
        save_state(self.state_path, before)
        await self.store.add_results(results)
        save_state(self.state_path, after)
        counts.sessions += len(results)
        for r in results:
            key = r.result_text or "success"
            counts.results[key] = counts.results.get(key, 0) + 1

    async def _results(self, found: Iterable[Session], counts: Counts) -> list[SessionResult]:
        """The results of the sessions to an MX host of their domain that can be stored."""
        out = []
        for s in found:
            if self.supplement and s.reported_by_postfix:
                counts.drop(REPORTED_BY_POSTFIX)
                continue
            try:
                # RFC 6531 recipients (SMTPUTF8) name U-labels; policies and the store use A-labels.
                domain = normalise_domain(s.domain)
            except DomainError:
                counts.drop(BAD_DOMAIN)
                continue
            policy = await self._policy(domain, s.at, counts)
            if not policy.is_mx(s.mx_host, s.mx_ip):
                counts.drop(MX_UNKNOWN if policy.deferred and not policy.mx_hosts else NOT_TO_MX)
                continue
            if self.supplement and not left_out_by_postfix(s, policy.policy):
                counts.drop(NOT_LEFT_OUT)
                continue
            s = replace(s, domain=domain, mx_host=host_key(s.mx_host))  # A-labels too
            result = to_result(s, policy, sending_ip=self.sending_ip)
            try:
                out.append(check_result(result))
            except StoreError:
                counts.drop(BAD_DOMAIN)  # one bad result must not fail (and wedge) its batch
        return out

    async def _learn(self, found: Iterable[Session], learner: Learner) -> None:
        """Learn the security level of every session to an MX host of its domain, whoever
        reports it (docs/learned.md); a drop below a learned level is an event."""
        by_domain: dict[str, list[tuple[dt.datetime, Observation]]] = {}
        published: set[str] = set()
        for s in found:
            try:
                domain = normalise_domain(s.domain)
            except DomainError:
                continue
            policy = await self._policy(domain, s.at, Counts())
            if not policy.is_mx(s.mx_host, s.mx_ip):
                continue
            dane_policy = policy.policy.policy_type is PolicyType.TLSA
            level = level_of_postfix_trust(s.tls, dane_policy=dane_policy)
            failure = s.refused or s.certificate_failure
            if failure is None and s.tls is None:
                failure = ResultType.STARTTLS_NOT_SUPPORTED  # Postfix's "may" logs no failure
            seen = Observation(host_key(s.mx_host), _ip_key(s.mx_ip), level, failure)
            if policy.policy.policy_type is not PolicyType.NO_POLICY_FOUND:
                published.add(domain)
            by_domain.setdefault(domain, []).append((s.at, seen))
        for domain, seen_list in by_domain.items():
            await learner.observe(
                domain, [o for _, o in seen_list], now=max(at for at, _ in seen_list),
                published=domain in published,
            )  # fmt: skip

    async def _policy(self, domain: str, at: dt.datetime, counts: Counts) -> PolicyInForce:
        """The policy served for `domain` at `at`; resolved now when none was recorded."""
        record = None
        if self._served:
            try:
                record = await self.store.served_at(domain, logged_until(at))
            except StoreError:
                self._served = False  # e.g. Redis keeps no records: don't ask per session
        if record is not None:
            counts.policies[SERVED] = counts.policies.get(SERVED, 0) + 1
            return served_policy(record)
        counts.policies[RESOLVED] = counts.policies.get(RESOLVED, 0) + 1
        return await self.policies(domain)

    async def _recover(self, state: State, counts: Counts) -> State:
        """Finish a batch interrupted between the store write and the state write."""
        pending = state.pending or {}
        try:
            start = dt.datetime.fromisoformat(pending["start"])
            end = dt.datetime.fromisoformat(pending["end"])
            keys = {str(k) for k in pending["keys"]}
            expected = int(pending["stored_before"]) + int(pending["size"])
            after = State.from_json(pending["after"], self.state_path)
        except (KeyError, TypeError, ValueError) as exc:
            raise CollectorError(f"{self.state_path}: damaged pending batch ({exc!r})") from exc
        recorded = await self._matching(start, end, keys) >= expected
        counts.recovered = "recorded" if recorded else "re-read"
        state.pending = None
        new = after if recorded else state
        save_state(self.state_path, new)
        return new

    async def _matching(self, start: dt.datetime, end: dt.datetime, keys: set[str]) -> int:
        """How many stored results between `start` and `end` have one of `keys`."""
        stored = await self.store.results_between(
            start, end + dt.timedelta(seconds=1), unreported_only=False
        )
        return sum(1 for r in stored if _key(r) in keys)

    async def follow(
        self,
        stop: asyncio.Event,
        *,
        poll: float = 1.0,
        on_error: Callable[[Exception], None] | None = None,
        last_read: bool = False,
    ) -> Counts:
        """`collect()` every `poll` seconds until `stop` is set; the totals.

        `on_error`: a read that fails (CollectorError: the log is missing or unreadable for
        now; StoreError: the store refused the batch) is passed to it and reading goes on at
        the next poll, from where the state file says (nothing is lost or read twice);
        without it the error ends following. `last_read`: read once more after `stop` is set,
        so that what was logged up to then is recorded now.
        """
        total = Counts()
        while True:
            try:
                total.add(await self.collect())
            except (CollectorError, StoreError) as exc:
                if on_error is None:
                    raise
                on_error(exc)
            if stop.is_set():
                return total
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
            if stop.is_set() and not last_read:
                return total
