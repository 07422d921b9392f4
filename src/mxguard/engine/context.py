"""Wiring: build the engine's parts (DNS, store, MTA-STS resolver, list, rules) from settings."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mxguard.adapters.dns import DnsResolver
from mxguard.adapters.store import Store, StoreError, default_store_url, open_store, state_folder
from mxguard.config import ConfigError, Settings, check_ca_file
from mxguard.engine.learning import LearnedResolver
from mxguard.engine.resolve import Resolver
from mxguard.engine.spool import ResultSpool
from mxguard.engine.sts import StsResolver
from mxguard.learned import config as learned_config
from mxguard.learned.learner import Learner
from mxguard.protocol import localrules, policylist

if TYPE_CHECKING:
    from mxguard.engine.deliver import Sender


@dataclass
class Engine:
    settings: Settings
    dns: DnsResolver
    store: Store
    sts: StsResolver
    resolver: Resolver
    spool: ResultSpool | None = None
    learner: Learner | None = None  # learned security levels (docs/learned.md)

    def sender(self, *, is_report: bool = False) -> Sender:
        """A sender under this engine's policies; WebPKI roots: the system's plus --ca-file."""
        # Imported here: the commands that never send (serve postfix, policy) need neither.
        # The roots go as DER: a chain is parsed (cryptography) only when a policy checks it.
        from mxguard.engine.deliver import Sender
        from mxguard.protocol import roots as trust

        try:
            roots = trust.load_ders(self.settings.ca_file)
        except trust.CaFileError as exc:
            raise ConfigError(str(exc)) from None
        return Sender(
            self.resolver,
            self.store,
            helo_name=self.settings.helo_name,
            smtp_port=self.settings.smtp_port,
            roots=roots,
            is_report=is_report,
            spool=self.spool,
            learner=self.learner,
        )


def load_policy_list(settings: Settings) -> policylist.PolicyList | None:
    if settings.policy_list is None:
        return None
    try:
        data = settings.policy_list.read_bytes()
    except OSError as exc:
        raise ConfigError(f"policy_list {settings.policy_list}: {exc.strerror}") from None
    try:
        return policylist.parse_list(data, now=dt.datetime.now(dt.UTC))
    except policylist.PolicyListError as exc:
        raise ConfigError(f"policy_list {settings.policy_list}: {exc}") from None


def load_rules(settings: Settings) -> localrules.Rules | None:
    if not settings.local_rules:
        return None
    try:
        return localrules.parse_rules(settings.local_rules)
    except localrules.RuleError as exc:
        raise ConfigError(f"{settings.source}: local_rules: {exc}") from None


def load_learned(settings: Settings) -> learned_config.LearnedSettings:
    """The ``[learned]`` settings (docs/learned.md); ConfigError naming the bad key."""
    return learned_config.parse(settings.learned, f"{settings.source}: learned")


@contextlib.asynccontextmanager
async def engine(settings: Settings, *, dns_cache: bool = False) -> AsyncIterator[Engine]:
    """The engine for one command or one server, closed (store included) on exit.

    ``dns_cache``: keep DNS answers for their TTL (long-running servers).
    """
    check_ca_file(settings)  # also on SIGHUP: a server reloads through here
    rules = load_rules(settings)
    learned = load_learned(settings)
    plist = load_policy_list(settings)
    dns = DnsResolver(settings.resolvers or None, cache=dns_cache)
    store = await open_store(settings.store or default_store_url())
    try:
        sts = StsResolver(
            dns,
            store,
            ca_file=settings.ca_file,
            https_port=settings.https_port,
            fetch_timeout=settings.fetch_timeout,
        )
        learner = Learner(store, learned)
        resolver = LearnedResolver(dns, sts, policy_list=plist, local_rules=rules, learner=learner)
        try:
            spool: ResultSpool | None = ResultSpool(state_folder() / "spool")
        except StoreError:
            spool = None  # no state folder to keep results in: they are only logged
        yield Engine(settings, dns, store, sts, resolver, spool, learner)
    finally:
        await store.close()
