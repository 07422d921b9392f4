"""A bulk lab scenario: thousands of customer domains sharing a few providers' MX hosts.

Mail hosting is concentrated: one MX host of a large provider serves thousands of domains. An
audit of many domains (``mxguard check --file``) should therefore meet each MX host, its
certificate and its TLSA records many times over; this scenario lets it be measured doing so.

``bulk_scenario()`` builds, deterministically from ``seed``:

- ``providers`` provider zones ``provider1.<tld>`` … holding the ``hosts`` MX hosts between
  them (``mx1.provider1.<tld>`` …, as evenly as possible). Odd-numbered providers are
  DNSSEC-signed and publish TLSA ``3 1 1`` (DANE-EE, SPKI, SHA-256) for each host; the others
  are unsigned and publish none. Every host offers STARTTLS with a certificate from the lab
  root CA, except that the last host of the last provider has a certificate that expires in
  10 days (``CertKind.EXPIRING``: valid, but an audit should warn about it).
- ``domains`` customer zones ``d0001.<tld>`` … with no hosts of their own. Each uses one
  provider, with MX records for two of its hosts (preferences 10 and 20; one only if the
  provider has a single host). Exactly ``round(40 %)`` of them publish MTA-STS in enforce mode
  and ``round(10 %)`` in testing mode (policy ``mx: *.providerN.<tld>``, served by the lab's
  policy host ``mta-sts.<domain>``), another ``round(10 %)`` publish only a TLS-RPT record, and
  the rest publish neither; ``d0001`` is always one that enforces. About one in five customer
  zones is signed; the rest are unsigned.

``bulk_domains()`` lists the customer domains; ``write_domain_list()`` writes them to a file,
one per line, as ``mxguard check --file`` reads them.
"""

from __future__ import annotations

import random
from pathlib import Path

from mxguard.lab.scenario import CertKind, Dnssec, Domain, Host, MtaSts, Scenario

ENFORCE_SHARE = 0.4  # customer domains with an MTA-STS policy in enforce mode
TESTING_SHARE = 0.1  # ... in testing mode
TLSRPT_SHARE = 0.1  # ... with a TLS-RPT record and no MTA-STS
SIGNED_SHARE = 0.2  # customer zones that are DNSSEC-signed (independent of the above)
DEFAULT_PROVIDERS = 4


def provider_name(index: int, tld: str = "test") -> str:
    """The zone of provider ``index`` (1-based)."""
    return f"provider{index}.{tld}"


def provider_signed(index: int) -> bool:
    """Odd-numbered providers sign their zone and publish TLSA for their hosts."""
    return index % 2 == 1


def customer_name(index: int, domains: int, tld: str = "test") -> str:
    """Customer domain ``index`` (1-based) of ``domains``: ``d0001.<tld>`` and so on."""
    width = max(4, len(str(domains)))
    return f"d{index:0{width}d}.{tld}"


def bulk_domains(domains: int = 2000, *, tld: str = "test") -> list[str]:
    """The customer domains of ``bulk_scenario(domains, …, tld=tld)``, in order."""
    return [customer_name(i, domains, tld) for i in range(1, domains + 1)]


def write_domain_list(path: Path, domains: int | Scenario = 2000, *, tld: str = "test") -> Path:
    """Write the customer domains to ``path``, one per line; returns ``path``.

    ``domains`` is a count (as given to ``bulk_scenario``) or a bulk scenario itself, whose
    customer domains (every domain without hosts of its own) are written.
    """
    if isinstance(domains, Scenario):
        listed = [d.name for d in domains.domains if not d.hosts]
    else:
        listed = bulk_domains(domains, tld=tld)
    path.write_text("".join(f"{name}\n" for name in listed), encoding="utf-8")
    return path


def bulk_scenario(
    domains: int = 2000,
    hosts: int = 40,
    *,
    tld: str = "test",
    seed: int = 0,
    providers: int = DEFAULT_PROVIDERS,
) -> Scenario:
    """A scenario of ``domains`` customer domains whose MX records point at ``hosts`` hosts.

    Pure: the same arguments give the same scenario. ``providers`` is capped at ``hosts``.
    """
    if domains < 0:
        raise ValueError(f"domains must be 0 or more, not {domains}")
    if hosts < 1:
        raise ValueError(f"hosts must be 1 or more, not {hosts}")
    if providers < 1:
        raise ValueError(f"providers must be 1 or more, not {providers}")
    tld = tld.strip(".").lower()
    rng = random.Random(seed)
    providers = min(providers, hosts)

    provider_domains: list[Domain] = []
    provider_hosts: list[list[str]] = []
    for p in range(1, providers + 1):
        zone = provider_name(p, tld)
        count = hosts // providers + (1 if p <= hosts % providers else 0)
        signed = provider_signed(p)
        members = []
        for h in range(1, count + 1):
            last = p == providers and h == count
            members.append(
                Host(
                    name=f"mx{h}.{zone}",
                    cert=CertKind.EXPIRING if last else CertKind.VALID,
                    tlsa=("3 1 1",) if signed else (),
                )
            )
        provider_hosts.append([m.name for m in members])
        provider_domains.append(
            Domain(
                name=zone,
                description=f"mail provider {p}: {count} MX hosts"
                + (", DNSSEC-signed with DANE-EE TLSA" if signed else ", unsigned, no DANE"),
                dnssec=Dnssec.SIGNED if signed else Dnssec.UNSIGNED,
                hosts=tuple(members),
            )
        )

    # Exact shares, shuffled: counts do not drift with the seed.
    enforce = round(domains * ENFORCE_SHARE)
    testing = round(domains * TESTING_SHARE)
    tlsrpt = min(round(domains * TLSRPT_SHARE), domains - enforce - testing)
    kinds = (
        ["enforce"] * enforce
        + ["testing"] * testing
        + ["tlsrpt"] * tlsrpt
        + ["none"] * (domains - enforce - testing - tlsrpt)
    )
    rng.shuffle(kinds)
    if "enforce" in kinds:  # the first domain always enforces: a known example for tests
        first = kinds.index("enforce")
        kinds[0], kinds[first] = kinds[first], kinds[0]
    signed_count = round(domains * SIGNED_SHARE)
    signed_flags = [True] * signed_count + [False] * (domains - signed_count)
    rng.shuffle(signed_flags)

    customers: list[Domain] = []
    for i, (kind, signed) in enumerate(zip(kinds, signed_flags, strict=True), start=1):
        name = customer_name(i, domains, tld)
        p = rng.randrange(providers)
        pool = provider_hosts[p]
        chosen = rng.sample(pool, 2) if len(pool) >= 2 else list(pool)
        mx = tuple(f"{10 * (n + 1)} {host}" for n, host in enumerate(chosen))
        mta_sts = None
        if kind in ("enforce", "testing"):
            mta_sts = MtaSts(mode=kind, mx=(f"*.{provider_name(p + 1, tld)}",))
        report = (f"v=TLSRPTv1; rua=mailto:tlsrpt@{name}",) if kind == "tlsrpt" else ()
        customers.append(
            Domain(
                name=name,
                description=f"customer of provider {p + 1}: {kind}",
                dnssec=Dnssec.SIGNED if signed else Dnssec.UNSIGNED,
                mx=mx,
                mta_sts=mta_sts,
                tlsrpt=report,
            )
        )

    return Scenario(
        name=f"bulk-{domains}x{hosts}",
        description=(
            f"{domains} customer domains on {hosts} MX hosts of {providers} providers (seed {seed})"
        ),
        tld=tld,
        domains=(*provider_domains, *customers),
    ).validate()


__all__ = [
    "bulk_domains",
    "bulk_scenario",
    "customer_name",
    "provider_name",
    "provider_signed",
    "write_domain_list",
]
