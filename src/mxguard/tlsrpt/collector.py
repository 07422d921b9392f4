"""Follow a Postfix log and record its SMTP sessions as TLS-RPT results (RFC 8460 §4).

`mxguard tlsrpt collect-postfix` turns what Postfix logged (postfix_log.py) into the same
`SessionResult`s that mxguard's own sender records, joined with the policy that mxguard serves
Postfix for that domain (the engine resolves it with the same settings: DANE -> `tlsa` with
the TLSA records, MTA-STS -> `sts` with the policy lines and MX patterns, RFC 8460 §4.4).

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

Bounded: lines longer than MAX_LINE are skipped (counted), a batch holds at most BATCH_LINES
lines, the joiner follows at most MAX_PROCESSES processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from mxguard.adapters.store import SessionResult, Store
from mxguard.engine.deliver import _policy_for_report
from mxguard.engine.policy import DeliveryPolicy
from mxguard.engine.resolve import DomainError, Resolver
from mxguard.tlsrpt.postfix_log import MAX_LINE, Joiner, Session, parse_line, result_type

BATCH_LINES = 10_000
FINGERPRINT_BYTES = 256
MAX_ROTATED_CANDIDATES = 64  # files next to the log looked at to find the rotated one
STATE_VERSION = 1


class CollectorError(Exception):
    """The log or the state file cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """What a session's result says about the domain's policy (RFC 8460 §4.4)."""

    policy_type: str  # "sts" | "tlsa" | "no-policy-found"
    strings: tuple[str, ...]
    mx_patterns: tuple[str, ...]
    rua: tuple[str, ...]


NO_POLICY = ReportPolicy("no-policy-found", (), (), ())


class PolicySource(Protocol):
    async def __call__(self, domain: str) -> ReportPolicy: ...


def report_policy(policy: DeliveryPolicy) -> ReportPolicy:
    kind, strings, patterns = _policy_for_report(policy)
    return ReportPolicy(kind, strings, patterns, policy.tlsrpt_rua)


class EnginePolicies:
    """The policy mxguard's policy server would serve for a domain: resolved by the engine
    with the same settings, once per domain per collector run."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._cache: dict[str, ReportPolicy] = {}

    async def __call__(self, domain: str) -> ReportPolicy:
        if domain not in self._cache:
            try:
                self._cache[domain] = report_policy(await self._resolver.resolve(domain))
            except DomainError:
                self._cache[domain] = NO_POLICY
        return self._cache[domain]


def to_result(session: Session, policy: ReportPolicy, *, sending_ip: str | None) -> SessionResult:
    """The store's record of one Postfix session (the shape deliver.py's `_record` writes)."""
    failure = result_type(session, policy.policy_type)
    tls = f"{session.tls} TLS" if session.tls else "no TLS"
    return SessionResult(
        id=None,
        at=session.at,
        policy_domain=session.domain,
        policy_type=policy.policy_type,
        policy_strings=policy.strings,
        mx_patterns=policy.mx_patterns,
        result_type=failure.value if failure else None,
        sending_ip=sending_ip,
        receiving_mx=session.mx_host,
        receiving_ip=session.mx_ip,
        receiving_helo=None,  # Postfix does not log the server's EHLO name
        # No queue id or address: this text may reach the domain's report (additional-information).
        detail=f"Postfix: {tls}; {session.detail}",
        rua=policy.rua,
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
    return f"{r.at.astimezone(dt.UTC).isoformat()}|{r.receiving_ip}|{r.result_type}"


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
    rotated: bool = False
    truncated: bool = False
    recovered: str | None = None  # "recorded" | "re-read": what became of an interrupted batch

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "skipped_long_lines": self.skipped_long,
            "sessions": self.sessions,
            "results": dict(sorted(self.results.items())),
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
        policies: Callable[[str], Awaitable[ReportPolicy]],
        *,
        state_path: Path | None = None,
        sending_ip: str | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone(),
        tz: dt.tzinfo | None = None,
    ) -> None:
        self.log = log
        self.store = store
        self.policies = policies
        self.state_path = state_path or default_state_path(log)
        self.sending_ip = sending_ip
        self.clock = clock
        self.tz = tz

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
        if not found:
            save_state(self.state_path, after)
            return
        results = [
            to_result(s, await self.policies(s.domain), sending_ip=self.sending_ip) for s in found
        ]
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
            key = r.result_type or "success"
            counts.results[key] = counts.results.get(key, 0) + 1

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

    async def follow(self, stop: asyncio.Event, *, poll: float = 1.0) -> Counts:
        """`collect()` every `poll` seconds until `stop` is set; the totals."""
        total = Counts()
        while True:
            c = await self.collect()
            total.lines += c.lines
            total.skipped_long += c.skipped_long
            total.sessions += c.sessions
            total.rotated |= c.rotated
            total.truncated |= c.truncated
            for k, v in c.results.items():
                total.results[k] = total.results.get(k, 0) + v
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
            if stop.is_set():
                return total
