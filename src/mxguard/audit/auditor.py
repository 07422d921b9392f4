"""One check of a domain, and bulk runs of many (``mxguard check``).

``Auditor.check(domain)`` looks at the domain the way a compliant sender that has never seen
it does: ``engine.resolve.Resolver`` (the same lookups and precedence as ``send``) over a
policy cache that remembers nothing, so the MTA-STS policy is fetched by the sender's own
fetch. Then every address of every MX host is probed (``probe.Prober``: one session per
address and server name per run, at most ``per_address`` at a time), each presented chain
is judged by the sender's own check (``analysis.judge_address``), and the store's previous
check of the domain says what changed.

``Auditor.run(...)`` checks many domains with ``concurrency`` workers. With a store and a run
name, each domain is claimed first (``CheckLog.claim_check``): a domain done in that run is
skipped (a run is resumable), and several processes or nodes on one PostgreSQL store share
the run, each domain checked once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mxguard.adapters.dns import DnsAnswer, DnsOutcome, DnsResolver, DnssecStatus
from mxguard.adapters.store import CachedPolicy, CheckLog, CheckRecord, StoreError
from mxguard.audit import analysis, history
from mxguard.audit.model import (
    AddressCheck,
    DomainCheck,
    HostCheck,
    MxLookupView,
    Observations,
    RuaCheck,
    SmtpProbe,
    TxtLookup,
)
from mxguard.audit.probe import Prober
from mxguard.config import Settings
from mxguard.engine.policy import Auth
from mxguard.engine.resolve import DomainError, Resolver, normalise_domain
from mxguard.engine.sts import StsOutcome, StsResolver
from mxguard.protocol import mtasts, pkix, tlsrpt

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=10)  # a claimed domain not finished by then may be taken over


class _NoCache:
    """A policy cache that remembers nothing: the audit sees what a first-time sender sees."""

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        return None

    async def put_policy(self, policy: CachedPolicy) -> None:
        return None

    async def delete_policy(self, domain: str) -> None:
        return None

    async def policies(self) -> list[CachedPolicy]:
        return []

    async def close(self) -> None:
        return None


class _RecordingSts(StsResolver):
    """The sender's MTA-STS lookup, keeping each domain's outcome (the fetch it made) for
    the audit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, StsOutcome] = {}

    async def lookup(self, domain: str) -> StsOutcome:
        outcome = await super().lookup(domain)
        self.outcomes[domain] = outcome
        return outcome


@dataclass(frozen=True, slots=True)
class InputError:
    """A line or argument that is not a domain, or a domain whose check could not be made."""

    source: str  # "argument 2", "domains.txt line 14"
    text: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.text, "source": self.source, "error": self.error}


@dataclass
class RunStats:
    checked: int = 0
    skipped: int = 0  # done in this run already, or claimed by another node
    errors: int = 0
    verdicts: dict[str, int] | None = None
    started: float = 0.0

    def __post_init__(self) -> None:
        self.verdicts = self.verdicts or {}
        self.started = self.started or time.monotonic()


class Auditor:
    def __init__(
        self,
        settings: Settings,
        *,
        store: CheckLog | None = None,
        per_address: int = 2,
        timeout: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.dns = DnsResolver(settings.resolvers or None, cache=True)
        self.sts = _RecordingSts(
            self.dns,
            _NoCache(),
            ca_file=settings.ca_file,
            https_port=settings.https_port,
            fetch_timeout=settings.fetch_timeout,
            backoff=0.0,
            clock=clock,
        )
        self.resolver = Resolver(self.dns, self.sts, clock=clock)
        self.prober = Prober(
            self.dns,
            helo_name=settings.helo_name,
            smtp_port=settings.smtp_port,
            https_port=settings.https_port,
            ca_file=settings.ca_file,
            timeout=timeout,
            per_address=per_address,
        )
        self.roots = pkix.load_roots(settings.ca_file)
        self.store_problem: str | None = None  # the last store error, when history is lost
        self._judged: dict[tuple[str, str, Any], AddressCheck] = {}

    # --- one domain ----------------------------------------------------------------------------

    async def check(self, domain: str, *, run: str | None = None) -> DomainCheck:
        """Check ``domain``; DomainError if it is not a domain name."""
        start = time.monotonic()
        domain = normalise_domain(domain)
        now = self.clock()
        policy = await self.resolver.resolve(domain)
        sts = self.sts.outcomes.pop(domain, None)
        mx_answer, sts_txt, rpt_txt = await asyncio.gather(
            self.dns.query(domain, "MX"),
            self.dns.query(f"_mta-sts.{domain}", "TXT"),
            self.dns.query(f"_smtp._tls.{domain}", "TXT"),
        )
        patterns = policy.mta_sts.mx if policy.mta_sts and policy.mta_sts.mode else None
        hosts = await asyncio.gather(*(self._host(m, patterns, now) for m in policy.mx))
        rua: tuple[RuaCheck, ...] = ()
        try:
            record = tlsrpt.select_record(_texts(rpt_txt))
        except tlsrpt.TlsRptRecordError:
            record = None
        if record is not None:
            rua = tuple(await asyncio.gather(*(self.prober.rua(u) for u in record.rua)))
        fetch = sts.fetched if sts else None
        previous = await self._previous(domain)
        obs = Observations(
            domain=domain,
            at=now,
            policy=policy,
            mx_lookup=_mx_view(mx_answer),
            hosts=tuple(hosts),
            sts_txt=_txt(f"_mta-sts.{domain}", sts_txt),
            fetch=fetch,
            policy_text=fetch.text if fetch is not None and fetch.ok else None,
            rpt_txt=_txt(f"_smtp._tls.{domain}", rpt_txt),
            rua=rua,
            previous=previous,
        )
        verdict, protection, summary, findings = analysis.analyse(obs)
        first = DomainCheck(domain, verdict, protection, summary, obs, findings)
        changes, more = history.compare(previous, first.to_json())
        if more:
            verdict, protection, summary, findings = analysis.analyse(obs, more)
        result = DomainCheck(
            domain, verdict, protection, summary, obs, findings, tuple(changes),
            elapsed=time.monotonic() - start,
        )  # fmt: skip
        await self._keep(result, sts, run)
        return result

    async def _host(self, m: Any, patterns: tuple[str, ...] | None, now: dt.datetime) -> HostCheck:
        covered = None if patterns is None else any(mtasts.matches(p, m.host) for p in patterns)
        insecure: tuple[str, ...] = ()
        if m.auth is not Auth.DANE and not m.tlsa_unusable and m.defer is None:
            answer = await self.dns.query(f"_25._tcp.{m.canonical or m.host}", "TLSA")
            if answer.outcome is DnsOutcome.OK and not answer.secure:
                insecure = tuple(r.to_text() for r in answer.records)
        sni = m.tlsa_name or m.host
        probes = await asyncio.gather(*(self.prober.smtp(ip, sni) for ip in m.addresses))
        return HostCheck(m, covered, tuple(self._judge(m, p, now) for p in probes), insecure)

    def _judge(self, m: Any, probe: SmtpProbe, now: dt.datetime) -> AddressCheck:
        """``judge_address``, once per probe and MX policy for the whole run: thousands of
        domains share a few MX hosts, and parsing and verifying the same chain again for each
        would cost more than the rest of a check (the verdict is a run's, not a second's)."""
        key = (probe.address, probe.server_name, m)
        try:
            found = self._judged.get(key)
        except TypeError:  # a policy with an unhashable part: judge it afresh
            return analysis.judge_address(m, probe, roots=self.roots, now=now)
        if found is None:
            found = analysis.judge_address(m, probe, roots=self.roots, now=now)
            if len(self._judged) < 100_000:
                self._judged[key] = found
        return found

    # --- history -------------------------------------------------------------------------------

    async def _previous(self, domain: str) -> dict[str, Any] | None:
        if self.store is None:
            return None
        try:
            record = await self.store.last_check(domain)
        except StoreError as exc:
            self._store_failed(exc)
            return None
        if record is None:
            return None
        try:
            doc = json.loads(record.report)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def _keep(self, result: DomainCheck, sts: StsOutcome | None, run: str | None) -> None:
        if self.store is None:
            return
        record_id = sts.record.id if sts and sts.record else None
        try:
            await self.store.add_check(
                CheckRecord(
                    domain=result.domain,
                    at=result.observations.at,
                    verdict=result.verdict.value,
                    report=json.dumps(result.to_json(), default=str),
                    policy_id=record_id,
                    policy_digest=result.observations.policy_digest,
                    run=run,
                )
            )
        except StoreError as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: StoreError) -> None:
        if self.store_problem is None:
            log.warning("check history is not kept: %s", exc)
        self.store_problem = str(exc)

    # --- many domains --------------------------------------------------------------------------

    async def run(
        self,
        items: Iterable[tuple[str, str]],
        *,
        concurrency: int = 10,
        run: str | None = None,
        node: str | None = None,
        stats: RunStats | None = None,
    ) -> AsyncIterator[DomainCheck | InputError]:
        """Check each ``(source, text)`` of ``items``; yield results as they are ready.

        A text that is not a domain yields an ``InputError`` naming its source, and the run
        goes on. With ``run`` (and a store) domains are claimed first and skipped when done
        or claimed by another node.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        stats = stats or RunStats()
        node = node or f"{socket.gethostname()}:{os.getpid()}"
        queue: asyncio.Queue[DomainCheck | InputError | None] = asyncio.Queue(concurrency * 4)
        source = iter(items)
        seen: set[str] = set()

        async def worker() -> None:
            for where, text in source:  # one iterator shared by every worker
                outcome = await self._one(where, text, run, node, seen, stats)
                if outcome is not None:
                    await queue.put(outcome)
            await queue.put(None)

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        try:
            finished = 0
            while finished < len(workers):
                item = await queue.get()
                if item is None:
                    finished += 1
                    continue
                yield item
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _one(
        self, where: str, text: str, run: str | None, node: str, seen: set[str], stats: RunStats
    ) -> DomainCheck | InputError | None:
        try:
            domain = normalise_domain(text)
        except DomainError as exc:
            stats.errors += 1
            return InputError(where, text, str(exc))
        if domain in seen:
            stats.skipped += 1
            return None
        seen.add(domain)
        if run is not None and self.store is not None:
            try:
                claimed = await self.store.claim_check(run, domain, node, self.clock(), LEASE)
            except StoreError as exc:
                stats.errors += 1
                return InputError(where, text, f"cannot claim it in run {run!r}: {exc}")
            if not claimed:
                stats.skipped += 1
                return None
        try:
            result = await self.check(domain, run=run)
        except Exception as exc:  # a bug of ours must not end a run of thousands
            log.exception("checking %s failed", domain)
            stats.errors += 1
            return InputError(where, text, f"internal error while checking it: {exc!r}")
        stats.checked += 1
        assert stats.verdicts is not None
        stats.verdicts[result.verdict.value] = stats.verdicts.get(result.verdict.value, 0) + 1
        return result


def _texts(answer: DnsAnswer) -> list[str]:
    return answer.texts() if answer.outcome is DnsOutcome.OK else []


def _txt(name: str, answer: DnsAnswer) -> TxtLookup:
    outcome = "error" if answer.failed else answer.outcome.value
    return TxtLookup(name, tuple(_texts(answer)), outcome, answer.dnssec.value, answer.detail)


def _mx_view(answer: DnsAnswer) -> MxLookupView:
    status = answer.dnssec.value
    if answer.failed:
        kind = "bogus" if answer.dnssec is DnssecStatus.BOGUS else "failed"
    elif answer.outcome is DnsOutcome.NXDOMAIN:
        kind = "nxdomain"
    elif answer.outcome is DnsOutcome.NODATA:
        kind = "implicit"
    elif any(str(r.exchange) == "." for r in answer.records):
        kind = "null"
    else:
        kind = "hosts"
    return MxLookupView(kind, status, answer.detail)


__all__ = ["Auditor", "InputError", "RunStats"]
