"""The lab: a simulated mail internet on loopback, brought to life from a scenario.

One ``Lab`` runs every peer in one asyncio event loop on a background thread, so that tests,
the demo and ``mxguard lab up`` can drive it with plain method calls while their own code
(clients under test) runs in its own loop or synchronously:

- an authoritative DNS server for the lab zones and Unbound as the validating resolver;
- for every MX host an SMTP receiver on a private address, and in front of it, at the address
  its A record names, an on-path attacker (in ``pass`` mode it is an honest wire);
- for every domain with MTA-STS an HTTPS policy host ``mta-sts.<domain>``; when a scenario
  has very many of them (more than ``SHARED_POLICY_LISTENER_ABOVE``, as a bulk scenario of
  thousands of domains does), they all share one address and one HTTPS listener that picks
  the host by SNI, as a provider hosting many domains' policies would;
- the attacker's own mail host ``mx.attacker.<tld>`` (where a spoofed MX leads).

Every peer (but shared policy hosts) has its own 127.0.0.0/8 address. As root the lab uses
the real ports (53, 25, 443); otherwise high ports. Everything the lab writes (certificates,
Unbound's config and log, an mxguard config file for clients) goes into its work directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mxguard.lab.attacker import Attacker
from mxguard.lab.dns_server import AuthServer
from mxguard.lab.pki import LabPKI
from mxguard.lab.policy_host import PolicyHost, SharedPolicyListener
from mxguard.lab.scenario import (
    ATTACKER_DOMAIN,
    AttackMode,
    DnsAttack,
    Domain,
    Host,
    Scenario,
)
from mxguard.lab.smtp_receiver import SmtpReceiver
from mxguard.lab.unbound import MAX_NEGATIVE_TTL, MAX_TTL, Unbound
from mxguard.lab.zones import LabKeys, build_zones

T = TypeVar("T")

# Above this many MTA-STS domains, their policy hosts share one HTTPS listener (unless the Lab
# is told otherwise): one socket instead of one per domain, so that thousands of domains stay
# within the usual limit of 1024 open files per process.
SHARED_POLICY_LISTENER_ABOVE = 100
_SHARED_POLICY_KEY = "https:shared-policy-hosts"  # the _Addresses key of that listener


class LabError(RuntimeError):
    """The lab could not start or could not do what was asked; the message says why."""


@dataclass(frozen=True, slots=True)
class LabPorts:
    dns: int
    smtp: int
    https: int

    @classmethod
    def default(cls) -> LabPorts:
        if os.geteuid() == 0:
            return cls(dns=53, smtp=25, https=443)
        return cls(dns=5353, smtp=2525, https=4443)


class _Addresses:
    """Hands out 127.<net>.x.y addresses, the same one again for the same key."""

    def __init__(self, net: str) -> None:
        parts = net.split(".")
        if len(parts) != 2 or parts[0] != "127" or not parts[1].isdigit() or int(parts[1]) > 255:
            raise LabError(f"lab network {net!r} must look like '127.N' with N from 0 to 255")
        self.net = net
        self._given: dict[str, str] = {}
        self._next = 256  # 127.N.1.0 onwards; 127.N.0.x is for the DNS servers

    def fixed(self, last: int) -> str:
        return f"{self.net}.0.{last}"

    def __call__(self, key: str) -> str:
        if key not in self._given:
            n = self._next
            self._next += 1
            if n % 256 == 0:  # skip .0 host parts; they look like network addresses
                n = self._next
                self._next += 1
            if n >= 65536:
                raise LabError("the lab ran out of loopback addresses")
            self._given[key] = f"{self.net}.{n // 256}.{n % 256}"
        return self._given[key]

    def share(self, key: str, with_key: str) -> str:
        """Give ``key`` the address of ``with_key`` (from now on)."""
        self._given[key] = self(with_key)
        return self._given[key]


class Lab:
    """A running lab. Use as a context manager, or call ``start()`` and ``stop()``."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        workdir: Path | None = None,
        net: str = "127.77",
        ports: LabPorts | None = None,
        shared_policy_listener: bool | None = None,
        resolver_ttls: tuple[int, int] = (MAX_TTL, MAX_NEGATIVE_TTL),
    ) -> None:
        """``shared_policy_listener``: put every policy host behind one HTTPS listener (true),
        give each its own (false), or decide by the scenario's number of MTA-STS domains
        (None: shared above ``SHARED_POLICY_LISTENER_ABOVE``). Fixed for the lab's life.

        ``resolver_ttls``: the (positive, negative) TTL caps of the lab's resolver. By
        default a few seconds (unbound.MAX_TTL, MAX_NEGATIVE_TTL), so that a scenario switch
        reaches clients at once; a benchmark lifts them, so that the zones' own TTLs apply
        as they would anywhere.
        """
        self.resolver_ttls = resolver_ttls
        self.scenario = scenario.validate()
        self.ports = ports or LabPorts.default()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mxguard-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._addr = _Addresses(net)
        self.ns_address = self._addr.fixed(1)
        self.resolver_address = self._addr.fixed(53)
        self.pki = LabPKI(self.workdir / "pki")
        self.keys = LabKeys(scenario.tld)
        self.receivers: dict[str, SmtpReceiver] = {}
        self.attackers: dict[str, Attacker] = {}
        self.policy_hosts: dict[str, PolicyHost] = {}
        if shared_policy_listener is None:
            with_sts = sum(1 for d in scenario.domains if d.mta_sts is not None)
            shared_policy_listener = with_sts > SHARED_POLICY_LISTENER_ABOVE
        self._share_policy_hosts = shared_policy_listener
        self._policy_listener: SharedPolicyListener | None = None
        self._share_policy_addresses()
        self._auth: AuthServer | None = None
        self._unbound: Unbound | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- what clients need to know -------------------------------------------------------

    @property
    def resolver(self) -> tuple[str, int]:
        return self.resolver_address, self.ports.dns

    @property
    def resolver_pid(self) -> int | None:
        """The lab's Unbound process, for benchmarks that count the CPU the lab spends."""
        return self._unbound.pid if self._unbound is not None else None

    @property
    def resolver_spec(self) -> str:
        return f"{self.resolver_address}:{self.ports.dns}"

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    @property
    def attacker_host(self) -> str:
        return f"mx.{ATTACKER_DOMAIN}.{self.scenario.tld}"

    def address_of(self, name: str) -> str:
        """The address a name's A record points at (for MX hosts: where the wire starts)."""
        return self._addr(name)

    def receiver(self, host: str) -> SmtpReceiver:
        return self.receivers[self._canonical_host(host)]

    def attacker(self, host: str) -> Attacker:
        return self.attackers[self._canonical_host(host)]

    def policy_host(self, domain: str) -> PolicyHost:
        return self.policy_hosts[domain]

    @property
    def policy_listener(self) -> SharedPolicyListener | None:
        """The HTTPS listener shared by all policy hosts, if they share one (see ``Lab``)."""
        return self._policy_listener

    def smtp_connections(self) -> dict[str, int]:
        """TCP connections each lab mail host accepted since start (or ``clear_records()``).

        Keyed by host name: every MX host of the scenario (counted at its receiver, so each
        connection made through the attacker in front of it counts once, whatever the attack
        mode) and the attacker's own mail host.
        """
        return {name: r.connections for name, r in self.receivers.items()}

    def client_options(self) -> list[str]:
        """The mxguard global options that point a client at this lab."""
        return [
            "--resolver", self.resolver_spec,
            "--ca-file", str(self.ca_file),
            "--smtp-port", str(self.ports.smtp),
            "--https-port", str(self.ports.https),
        ]  # fmt: skip

    def _canonical_host(self, host: str) -> str:
        return self.scenario.host(host).name if host != self.attacker_host else host

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> Lab:
        if self._thread is not None:
            return self
        # aiosmtpd logs a traceback for every client that rejects a certificate, which in
        # the lab is the point of the exercise: keep its log for real problems only.
        logging.getLogger("mail.log").setLevel(logging.CRITICAL)
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="mxguard-lab", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._call(self._start(), timeout=60)
        except OSError as exc:
            self.stop()
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = (
                    f" — is another lab already running on {self._addr.net}.0.0/16? "
                    "Pick another with --net"
                )
            raise LabError(f"{exc.strerror or exc}{hint}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self._stop(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        if self._loop is None:
            raise LabError("the lab is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise LabError(f"the lab did not finish a step within {timeout} s") from None

    # --- changing the world --------------------------------------------------------------

    def apply(self, scenario: Scenario) -> None:
        """Switch to another scenario: peers are rebuilt, DNS swapped, the resolver flushed."""
        self.scenario = scenario.validate()
        self._share_policy_addresses()
        self._call(self._apply())

    def set_attack(self, host: str, mode: AttackMode | str) -> None:
        """Put the attacker in front of ``host`` into ``mode`` for new connections."""
        self.attacker(host).mode = AttackMode(mode)

    def set_dns_attack(self, domain: str, attack: DnsAttack | str) -> None:
        d = self.scenario.domain(domain)
        self.scenario = self.scenario.with_domain(
            dataclasses.replace(d, dns_attack=DnsAttack(attack))
        )
        self._call(self._refresh_dns())

    def update_domain(self, domain: Domain) -> None:
        """Change one domain's DNS data and MTA-STS publication in place (same MX hosts).

        Cheaper than ``apply()``: no peer restarts; the policy host answers the new way at
        once and the resolver's cache is flushed.
        """
        old = self.scenario.domain(domain.name)
        if {h.name for h in old.hosts} != {h.name for h in domain.hosts}:
            raise LabError(
                f"update_domain cannot change the MX hosts of {domain.name}: use apply()"
            )
        self.scenario = self.scenario.with_domain(domain).validate()
        self._call(self._update_domain(domain))

    async def _update_domain(self, domain: Domain) -> None:
        host = self.policy_hosts.get(domain.name)
        name = f"mta-sts.{domain.name}"
        if domain.mta_sts is not None and host is not None:
            host.update(domain.mta_sts, self.pki.issue(name, domain.mta_sts.cert))
        elif domain.mta_sts is not None:
            await self._start_policy_host(domain)
        elif host is not None:
            if self._policy_listener is not None:
                await self._policy_listener.remove(host)
            else:
                await host.stop()
            del self.policy_hosts[domain.name]
        await self._refresh_dns()

    def clear_records(self) -> None:
        """Forget what receivers, attackers and policy hosts have recorded so far."""
        for r in self.receivers.values():
            r.clear()
        for a in self.attackers.values():
            a.clear()
        for p in self.policy_hosts.values():
            p.clear()

    def flush_resolver(self) -> None:
        if self._unbound is not None:
            self._call(self._unbound.flush())

    def _share_policy_addresses(self) -> None:
        # In shared mode every mta-sts.<domain> of the scenario resolves to the listener.
        if self._share_policy_hosts:
            for d in self.scenario.domains:
                self._addr.share(f"mta-sts.{d.name}", _SHARED_POLICY_KEY)

    # --- inside the loop -----------------------------------------------------------------

    def _zone_addresses(self) -> dict[str, str]:
        names = [h.name for h in self.scenario.hosts()] + [self.attacker_host]
        names += [f"mta-sts.{d.name}" for d in self.scenario.domains if d.mta_sts]
        return {n: self._addr(n) for n in names}

    async def _start(self) -> None:
        zones = build_zones(
            self.scenario, self._zone_addresses(), self.pki, self.keys,
            ns_address=self.ns_address,
        )  # fmt: skip
        self._auth = AuthServer(zones, self.ns_address, self.ports.dns)
        await self._auth.start()
        self._unbound = Unbound(
            self.workdir / "unbound",
            self.resolver_address,
            self.ports.dns,
            self.scenario.tld,
            self.ns_address,
            self.ports.dns,
            self.keys.trust_anchor(),
            cache_max_ttl=self.resolver_ttls[0],
            cache_max_negative_ttl=self.resolver_ttls[1],
        )
        await self._unbound.start()
        await self._start_peers()
        self._write_client_config()

    async def _start_peers(self) -> None:
        smtp = self.ports.smtp
        for host in self.scenario.hosts():
            identity = self.pki.issue(host.name, host.cert) if host.starttls else None
            private = self._addr("receiver:" + host.name)
            receiver = SmtpReceiver(host, identity, private, smtp)
            await receiver.start()
            self.receivers[host.name] = receiver
            attacker = Attacker(
                host.name, (self._addr(host.name), smtp), (private, smtp), host.attack, self.pki
            )
            await attacker.start()
            self.attackers[host.name] = attacker
        # The attacker's own mail host, where a spoofed MX leads: nobody sits in front of it,
        # and its certificate is valid for its own name (anyone can get one for their name).
        own = Host(name=self.attacker_host)
        receiver = SmtpReceiver(own, self.pki.issue(own.name), self._addr(own.name), smtp)
        await receiver.start()
        self.receivers[own.name] = receiver
        if self._share_policy_hosts:
            self._policy_listener = SharedPolicyListener(
                self._addr(_SHARED_POLICY_KEY), self.ports.https
            )
            await self._policy_listener.start()
        for d in self.scenario.domains:
            if d.mta_sts is not None:
                await self._start_policy_host(d)

    async def _start_policy_host(self, d: Domain) -> None:
        assert d.mta_sts is not None
        name = f"mta-sts.{d.name}"
        policy_host = PolicyHost(
            d.name, d.mta_sts, self.pki.issue(name, d.mta_sts.cert), self._addr(name),
            self.ports.https,
        )  # fmt: skip
        if self._policy_listener is not None:
            self._policy_listener.add(policy_host)
        else:
            await policy_host.start()
        self.policy_hosts[d.name] = policy_host

    async def _stop_peers(self) -> None:
        peers: list[Any] = [
            *self.attackers.values(), *self.receivers.values(), *self.policy_hosts.values(),
        ]  # fmt: skip
        listener, self._policy_listener = self._policy_listener, None
        if listener is not None:
            await listener.stop()  # first: it stops accepting, then stops its policy hosts
        for peer in peers:
            await peer.stop()
        self.attackers.clear()
        self.receivers.clear()
        self.policy_hosts.clear()

    async def _stop(self) -> None:
        await self._stop_peers()
        if self._unbound is not None:
            await self._unbound.stop()
            self._unbound = None
        if self._auth is not None:
            await self._auth.stop()
            self._auth = None

    async def _refresh_dns(self) -> None:
        if self._auth is None or self._unbound is None:
            raise LabError("the lab is not running")
        self._auth.update(
            build_zones(
                self.scenario, self._zone_addresses(), self.pki, self.keys,
                ns_address=self.ns_address,
            )
        )  # fmt: skip
        await self._unbound.flush()

    async def _apply(self) -> None:
        await self._stop_peers()
        await self._start_peers()
        await self._refresh_dns()
        self._write_client_config()

    def _write_client_config(self) -> None:
        """An mxguard config file (TOML), the static policy list and a JSON summary."""
        listed = {
            d.name: {"mode": d.listed, "mxs": ["." + d.name]}
            for d in self.scenario.domains
            if d.listed
        }
        now = dt.datetime.now(dt.UTC)
        policy_list = {
            "author": "mxguard lab",
            "timestamp": (now - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expires": (now + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "policies": listed,
        }
        list_file = self.workdir / "policy-list.json"
        list_file.write_text(json.dumps(policy_list, indent=2) + "\n", encoding="utf-8")
        lines = [
            "# Written by the mxguard lab: point mxguard at the lab with --config THIS_FILE",
            f'resolver = ["{self.resolver_spec}"]',
            f'ca_file = "{self.ca_file}"',
            f"smtp_port = {self.ports.smtp}",
            f"https_port = {self.ports.https}",
            f'policy_list = "{list_file}"',
            'helo_name = "client.mxguard.test"',
            "fetch_timeout = 3  # the lab is local: a policy host that stalls 3 s is stalled",
            "",
            "[local_rules]",
            *(f'"{d.name}" = "{d.local_rule}"' for d in self.scenario.domains if d.local_rule),
        ]
        self.config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self.workdir / "lab.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        # The scenario's mail domains, one per line: for `mxguard check --file`.
        domains = "".join(f"{d.name}\n" for d in self.scenario.domains)
        (self.workdir / "domains.txt").write_text(domains, encoding="utf-8")

    @property
    def config_file(self) -> Path:
        return self.workdir / "mxguard.toml"

    def summary(self) -> dict[str, Any]:
        """What is running where: for ``mxguard lab up`` and for people reading lab.json."""
        return {
            "scenario": self.scenario.name,
            "resolver": self.resolver_spec,
            "ca_file": str(self.ca_file),
            "config": str(self.config_file),
            "ports": dataclasses.asdict(self.ports),
            "domains": [
                {
                    "domain": d.name,
                    "demonstrates": d.demonstrates or d.description,
                    "dnssec": d.dnssec.value,
                    "mx": list(d.mx) if d.mx is not None else None,
                    "hosts": {
                        h.name: {
                            "address": self._addr(h.name),
                            "attack": self.attacker(h.name).mode.value
                            if h.name in self.attackers
                            else h.attack.value,
                        }
                        for h in d.hosts
                    },
                    "mta_sts": f"https://mta-sts.{d.name}:{self.ports.https}/.well-known/mta-sts.txt"
                    if d.mta_sts
                    else None,
                }
                for d in self.scenario.domains
            ],
        }
