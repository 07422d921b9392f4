"""MTA-STS discovery, fetch and the trust-on-first-use cache (RFC 8461 §3, §5).

``StsResolver.lookup(domain)`` answers "which MTA-STS policy applies to this domain now?":

- the ``_mta-sts`` TXT record is looked up; a policy is fetched only when the record's ``id``
  differs from the cached policy's, when nothing is cached, or when the cached copy is past
  half its ``max_age`` (a refresh: a successful fetch restarts ``max_age``, §5.1);
- an unexpired cached policy keeps applying when the record vanishes, the DNS lookup fails or
  the fetch fails (§5.1): this is what stops an attacker who can strip DNS or HTTPS *later*;
- a fetched ``mode: none`` policy replaces the cached one (the domain withdrew it, §5);
- one fetch serves all concurrent lookups of a domain, and a failed fetch is not repeated
  for ``backoff`` seconds however many lookups arrive (RFC 8461 §3.3 asks for five minutes or
  more after a failure; docs/rfc-notes.md).

Failures are kept in the RFC 8460 vocabulary: fetch problems (``sts-policy-fetch-error``),
the policy host's certificate (``sts-webpki-invalid``), an invalid body
(``sts-policy-invalid``).

Store faults: a lookup never waits on a cache write for longer than ``write_wait``. A write
that takes longer goes on in the background (bounded: at most ``MAX_PENDING_WRITES``) and a
write that fails is dropped with a log line; either way the policy just fetched is the one
that applies (a failed cache write never weakens an answer; the next lookup fetches again).
A failed cache *read* raises StoreError: without it, no-one can say whether a cached policy
applies, so the caller defers. Both are counted by kind in ``StoreFaults``, which logs one
line per kind per ``log_interval`` instead of one per lookup and says what is wrong now.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mxguard.adapters import https
from mxguard.adapters.dns import DnsOutcome, DnsResolver
from mxguard.adapters.store import CachedPolicy, PolicyCache, StoreError
from mxguard.engine.policy import StsState
from mxguard.protocol import mtasts
from mxguard.protocol.results import Failure, ResultType

log = logging.getLogger(__name__)

MAX_PENDING_WRITES = 256  # cache writes left running in the background, at most

# What an operator should do about a store error of each kind.
_ADVICE = {
    "corrupt": "the SQLite file is damaged: stop mxguard and move it away (the cache is "
    "rebuilt; trust-on-first-use protection is lost until policies are fetched again)",
    "notadb": "the store file is not an SQLite database: check --store",
    "full": "the disk (or the database's size limit) is full: free space",
    "busy": "another process holds the database lock",
    "locked": "another connection holds the database lock",
    "readonly": "the store cannot be written: check the file's permissions and mount",
    "ioerr": "the disk reported an I/O error",
}


class StoreFaults:
    """Store failures seen by the MTA-STS cache: counted by kind, logged at most once per
    kind per ``log_interval`` seconds, and what is wrong now (``problem``, for ``/healthz``).

    Reads and writes are tracked apart (on a full disk reads still work): a problem lasts
    until an operation of the same direction succeeds, or ``hold`` seconds pass without
    another failure."""

    def __init__(
        self,
        *,
        log_interval: float = 60.0,
        hold: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log_interval, self.hold, self.clock = log_interval, hold, clock
        self.counts: dict[str, int] = {}
        self._current: dict[str, tuple[float, str]] = {}  # "read"/"write" -> (when, text)
        self._logged: dict[str, tuple[float, int]] = {}  # kind -> (when, count then)

    def failed(self, what: str, direction: str, exc: StoreError) -> None:
        kind = exc.kind
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        self._current[direction] = (now, f"store error ({kind}) on {what}: {exc.detail}")
        last = self._logged.get(kind)
        if last is None or now - last[0] >= self.log_interval:
            more = "" if last is None else f" ({self.counts[kind] - last[1] - 1} more since)"
            advice = _ADVICE.get(kind)
            log.warning(
                "store error (%s) on %s: %s%s%s", kind, what, exc,
                f"; {advice}" if advice else "", more,
            )  # fmt: skip
            self._logged[kind] = (now, self.counts[kind])

    def succeeded(self, direction: str) -> None:
        self._current.pop(direction, None)

    @property
    def problem(self) -> str | None:
        """The store problem now (None: none seen lately)."""
        now = self.clock()
        live = [text for when, text in self._current.values() if now - when < self.hold]
        return "; ".join(sorted(live)) or None


@dataclass(frozen=True)
class StsOutcome:
    """The policy that applies (None: no MTA-STS), what is known of it, and what went wrong."""

    policy: mtasts.Policy | None
    state: StsState | None
    errors: tuple[Failure, ...] = ()
    notes: tuple[str, ...] = ()
    fetched: https.FetchResult | None = None  # the fetch this lookup made, if it made one
    record: mtasts.StsRecord | None = None  # the `_mta-sts` record this lookup found, if usable


class StsResolver:
    def __init__(
        self,
        dns: DnsResolver,
        store: PolicyCache,
        *,
        ca_file: Path | None = None,
        https_port: int = 443,
        fetch_timeout: float = 10.0,
        backoff: float = 300.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        write_wait: float = 1.0,
        faults: StoreFaults | None = None,
    ) -> None:
        self.dns = dns
        self.store = store
        self.write_wait = write_wait  # seconds a lookup waits for its cache write, at most
        self.faults = faults or StoreFaults()
        self._writes: set[asyncio.Task[None]] = set()
        self.ca_file = ca_file
        self.https_port = https_port
        self.fetch_timeout = fetch_timeout
        self.backoff = backoff
        self.clock = clock
        self.fetches = 0  # policy fetches actually sent (for tests, metrics and benchmarks)
        self._inflight: dict[str, asyncio.Task[https.FetchResult]] = {}
        self._failed: dict[str, tuple[float, https.FetchResult]] = {}

    def prepare(self) -> None:
        """Build the policy fetch's TLS context now (reading and loading some 150 roots takes
        about 25 ms): a long-running server calls this at start, so that its first lookup
        does not wait for it. A CA file that cannot be used is reported by the fetch."""
        with contextlib.suppress(OSError):  # ssl.SSLError is an OSError
            https.client_context(self.ca_file)

    async def lookup(self, domain: str) -> StsOutcome:
        now = self.clock()
        # The TXT lookup goes on while the cache is read (at once, from SQLite's page cache,
        # or a round trip to another store): one task, not gather's two and its future.
        discovery = asyncio.ensure_future(self.dns.query(f"_mta-sts.{domain}", "TXT"))
        try:
            cached = await self._cached(domain, now)
        except BaseException:
            discovery.cancel()
            raise
        txt = await discovery
        notes: list[str] = []
        record: mtasts.StsRecord | None = None
        if txt.outcome is DnsOutcome.OK:
            try:
                record = mtasts.select_record(txt.texts())
            except mtasts.StsRecordError as exc:
                notes.append(f"_mta-sts.{domain} TXT is unusable: {exc.reason}")
        elif txt.failed:
            notes.append(f"_mta-sts.{domain} TXT lookup failed: {txt.detail}")

        if record is None:
            if cached is None:
                return StsOutcome(None, None, notes=tuple(notes))
            # RFC 8461 §5.1: discovery failed, the cached policy still applies (TOFU).
            notes.append("no usable MTA-STS record now; the cached policy still applies")
            return self._from_cache(cached, None, notes)

        if (
            cached is not None
            and cached[0].policy_id == record.id
            and not self._stale(cached[0], now)
        ):
            return replace(self._from_cache(cached, None, notes), record=record)

        result = await self._fetch(domain)
        if not result.ok or result.text is None:
            failure = Failure(
                result.result_type or ResultType.STS_POLICY_FETCH_ERROR, result.detail
            )
            return replace(
                self._failed_fetch(domain, cached, failure, notes), fetched=result, record=record
            )
        try:
            policy = mtasts.parse_policy(result.text)
        except mtasts.PolicyError as exc:
            failure = Failure(
                ResultType.STS_POLICY_INVALID,
                f"the policy of {domain} is invalid: {'; '.join(exc.errors)}",
            )
            return replace(
                self._failed_fetch(domain, cached, failure, notes), fetched=result, record=record
            )
        expires = now + dt.timedelta(seconds=policy.max_age)
        # Used for this answer even if caching it fails (a fetched policy is never ignored).
        entry = CachedPolicy(domain, record.id, result.text, now, expires)
        await self._write(f"caching the policy of {domain}", lambda: self.store.put_policy(entry))
        state = _state(record.id, policy, now, expires, from_cache=False, error=None)
        if policy.mode is mtasts.Mode.NONE:
            notes.append("the domain publishes mode none: it has withdrawn its MTA-STS policy")
        return StsOutcome(
            policy,
            state,
            notes=tuple(notes + list(policy.warnings)),
            fetched=result,
            record=record,
        )

    # --- cache -----------------------------------------------------------------------------

    async def _cached(
        self, domain: str, now: dt.datetime
    ) -> tuple[CachedPolicy, mtasts.Policy] | None:
        try:
            cached = await self.store.get_policy(domain)
        except StoreError as exc:
            self.faults.failed(f"reading the cached policy of {domain}", "read", exc)
            raise
        self.faults.succeeded("read")
        if cached is None:
            return None
        if cached.expires_at <= now:
            # RFC 8461 §5: a policy is only valid for max_age after it was fetched.
            await self._write(
                f"deleting the expired policy of {domain}",
                lambda: self.store.delete_policy(domain),
            )
            return None
        try:
            return cached, mtasts.parse_policy(cached.policy_text)
        except mtasts.PolicyError:
            log.warning("cached MTA-STS policy of %s no longer parses; dropping it", domain)
            await self._write(
                f"deleting the unparsable policy of {domain}",
                lambda: self.store.delete_policy(domain),
            )
            return None

    async def _write(self, what: str, write: Callable[[], Awaitable[None]]) -> None:
        """Run a cache write, waiting for it at most ``write_wait`` seconds; a slower one
        goes on in the background, a failed one is counted and logged, never raised."""
        if len(self._writes) >= MAX_PENDING_WRITES:
            exc = StoreError(f"{len(self._writes)} cache writes are still waiting", kind="backlog")
            self.faults.failed(what + " (dropped)", "write", exc)
            return

        async def run() -> None:
            try:
                await write()
            except StoreError as exc:
                self.faults.failed(what, "write", exc)
            else:
                self.faults.succeeded("write")

        task = asyncio.ensure_future(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        # shield: giving up waiting must not cancel the write itself.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.write_wait)

    async def close(self) -> None:
        """Cancel the policy fetches still going on and wait for the cache writes: what a
        stopping server does before its store closes, so that nothing is left running (a
        fetch from a stalled host outlived a stopped server, and its loop). A lookup waiting
        for a cancelled fetch is cancelled too: only for a stop, never while serving."""
        fetches = list(self._inflight.values())
        for task in fetches:
            task.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        await self.writes_done()

    async def writes_done(self) -> None:
        """Wait for the cache writes still going on in the background (tests, shutdown)."""
        if self._writes:
            await asyncio.wait(set(self._writes))

    @staticmethod
    def _stale(cached: CachedPolicy, now: dt.datetime) -> bool:
        """Past half its lifetime: refresh now, so that a long outage cannot expire it."""
        return now - cached.fetched_at > (cached.expires_at - cached.fetched_at) / 2

    def _from_cache(
        self,
        cached: tuple[CachedPolicy, mtasts.Policy],
        error: Failure | None,
        notes: list[str],
    ) -> StsOutcome:
        entry, policy = cached
        state = _state(
            entry.policy_id, policy, entry.fetched_at, entry.expires_at, from_cache=True,
            error=error,
        )  # fmt: skip
        return StsOutcome(policy, state, errors=(error,) if error else (), notes=tuple(notes))

    def _failed_fetch(
        self,
        domain: str,
        cached: tuple[CachedPolicy, mtasts.Policy] | None,
        failure: Failure,
        notes: list[str],
    ) -> StsOutcome:
        if cached is not None:
            notes.append(f"policy fetch failed ({failure.detail}); the cached policy still applies")
            return self._from_cache(cached, failure, notes)
        # Nothing cached: RFC 8461 §5 treats the domain as having no policy, but the failure
        # is recorded (it is reported with TLS-RPT and shown to the operator).
        state = StsState(None, None, None, (), (), None, None, from_cache=False, error=failure)
        return StsOutcome(None, state, errors=(failure,), notes=tuple(notes))

    # --- fetch -----------------------------------------------------------------------------

    async def _fetch(self, domain: str) -> https.FetchResult:
        failed = self._failed.get(domain)
        if failed is not None:
            since, result = failed
            wait = self.backoff - (time.monotonic() - since)
            if wait > 0:
                return https.FetchResult(
                    ok=False,
                    text=None,
                    result_type=result.result_type,
                    detail=f"{result.detail} (not retried for another {wait:.0f} s)",
                    status=result.status,
                    content_type=result.content_type,
                    elapsed=0.0,
                )
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.ensure_future(self._fetch_once(domain))
            self._inflight[domain] = task
            task.add_done_callback(lambda _: self._inflight.pop(domain, None))
        # shield: one caller's cancellation must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    async def _fetch_once(self, domain: str) -> https.FetchResult:
        self.fetches += 1
        host = f"mta-sts.{domain}"
        address = await self._address(host)
        if isinstance(address, https.FetchResult):
            result = address
        else:
            result = await https.fetch_policy(
                domain,
                ca_file=self.ca_file,
                port=self.https_port,
                timeout=self.fetch_timeout,
                connect_to=address,
            )
        if result.ok:
            self._failed.pop(domain, None)
        else:
            self._failed[domain] = (time.monotonic(), result)
        return result

    async def _address(self, host: str) -> str | https.FetchResult:
        """The policy host's address through the configured resolver (not the system's)."""
        for rdtype in ("A", "AAAA"):
            answer = await self.dns.query(host, rdtype)
            if answer.outcome is DnsOutcome.OK:
                return str(answer.records[0].address)
            if answer.failed or answer.outcome is DnsOutcome.NXDOMAIN:
                break
        return https.FetchResult(
            ok=False,
            text=None,
            result_type=ResultType.STS_POLICY_FETCH_ERROR,
            detail=f"policy host {host} has no address: {answer.detail}",
            status=None,
            content_type=None,
            elapsed=0.0,
        )


def _state(
    policy_id: str,
    policy: mtasts.Policy,
    fetched_at: dt.datetime,
    expires_at: dt.datetime,
    *,
    from_cache: bool,
    error: Failure | None,
) -> StsState:
    return StsState(
        id=policy_id,
        mode=policy.mode,
        max_age=policy.max_age,
        mx=policy.mx,
        policy_strings=tuple(policy.policy_strings()),
        fetched_at=fetched_at,
        expires_at=expires_at,
        from_cache=from_cache,
        error=error,
    )
