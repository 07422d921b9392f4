"""`mxguard relay`: a local smarthost that queues durably and delivers under mxguard's policy.

`relay serve` runs the SMTP listener and the delivery worker (docs/relay.md); SIGTERM and
SIGINT stop it (exit 0): the listener closes, deliveries in progress finish. `relay queue`
lists what is waiting (``--json``). `relay password USER` prints an ``--auth-file`` line.
The queue lives in the store ``--store`` names: SQLite (one node) or PostgreSQL (several).
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from pathlib import Path
from typing import TextIO

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import emit_json, wants_json
from mxguard.config import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str, name: str) -> float:
    """``90``, ``90s``, ``5m``, ``4h`` or ``5d`` as seconds, else a usage error naming ``name``."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:])
    number = t[:-1] if unit else t
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        value = -1.0
    if not value >= 0 or value != value or value > 365 * 86400:
        raise click.BadParameter(
            f"{text!r} is not a duration: give seconds or a number with s, m, h or d (5m, 4h, "
            "5d), at most a year",
            param_hint=name,
        )
    return value


@click.group("relay")
def relay() -> None:
    """A local SMTP relay (smarthost) that delivers under DANE, MTA-STS and the list."""


@relay.command("serve")
@click.option(
    "--listen",
    default="127.0.0.1:10025",
    show_default=True,
    metavar="IP:PORT",
    help="Where to accept SMTP. Loopback unless remote clients must reach it.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Certificate chain (PEM) for STARTTLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key (PEM) for STARTTLS.",
)
@click.option(
    "--auth-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="USER:SECRET lines (`mxguard relay password`); AUTH only after STARTTLS.",
)
@click.option(
    "--trust",
    multiple=True,
    metavar="NETWORK",
    help="Networks that may relay without AUTH (repeatable; default loopback only).",
)
@click.option(
    "--node-id",
    metavar="NAME",
    help="This node's name in the queue (default: the host name); unique per node.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Deliveries in progress at most.",
)
@click.option(
    "--per-domain",
    type=click.IntRange(1, 1000),
    default=4,
    show_default=True,
    help="Deliveries in progress to one recipient domain at most.",
)
@click.option(
    "--retry-first",
    default="5m",
    show_default=True,
    metavar="DURATION",
    help="Wait before the first retry of a deferred recipient (then doubled).",
)
@click.option(
    "--retry-max",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="Longest wait between two attempts.",
)
@click.option(
    "--lifetime",
    default="5d",
    show_default=True,
    metavar="DURATION",
    help="How long a message is tried before it is returned to its sender.",
)
@click.option(
    "--lease",
    default="5m",
    show_default=True,
    metavar="DURATION",
    help="How long a claimed delivery is this node's before others may take it.",
)
@click.option(
    "--max-size",
    type=click.IntRange(1024),
    default=35 * 1024 * 1024,
    show_default=True,
    help="Largest message accepted, in octets (SIZE).",
)
@click.option("--seed", type=int, hidden=True, help="Seed of the retry jitter (tests).")
@click.option("--json", "as_json", is_flag=True, default=None,
              help="Print the ready line as JSON.")  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    listen: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    auth_file: Path | None,
    trust: tuple[str, ...],
    node_id: str | None,
    concurrency: int,
    per_domain: int,
    retry_first: str,
    retry_max: str,
    lifetime: str,
    lease: str,
    max_size: int,
    seed: int | None,
    as_json: bool | None,
) -> None:
    """Accept mail over SMTP, queue it durably, deliver it under the recipients' policies.

    A message is answered 250 only once it is in the queue. Deferred recipients are retried
    with back-off and jitter until --lifetime; recipients that fail for good, and those still
    deferred then, are returned to the sender in a delivery status notification (RFC 3464).
    """
    from mxguard.cli import settings
    from mxguard.relay.service import RelayOptions, RetryPolicy, parse_listen
    from mxguard.relay.service import serve as run

    s = settings(ctx)
    json_out = wants_json(ctx, as_json)
    retry = RetryPolicy(
        first=duration(retry_first, "--retry-first"),
        maximum=duration(retry_max, "--retry-max"),
        lifetime=duration(lifetime, "--lifetime"),
    )
    lease_s = duration(lease, "--lease")
    if lease_s < 1:
        raise click.BadParameter("at least 1 second", param_hint="--lease")
    try:
        options = RelayOptions(
            listen=parse_listen(listen),
            tls_cert=tls_cert,
            tls_key=tls_key,
            auth_file=auth_file,
            concurrency=concurrency,
            per_domain=per_domain,
            lease=lease_s,
            retry=retry,
            max_size=max_size,
            seed=seed,
        )
        if trust:
            options.trusted = trust
        if node_id:
            options.node_id = node_id
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None

    def ready(address: str) -> None:
        if json_out:
            emit_json({"listening": address, "node_id": options.node_id, "store": _store(s)})
            sys.stdout.flush()
        else:
            click.echo(
                f"mxguard: relay listening on {address} (node {options.node_id}, queue in "
                f"{_store(s)})",
                err=True,
            )

    try:
        code = asyncio.run(run(s, options, ready=ready))
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None
    ctx.exit(code)


def _store(s: object) -> str:
    from mxguard.adapters.store import default_store_url, redact_url

    return redact_url(getattr(s, "store", None) or default_store_url())


@relay.command("queue")
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def queue(ctx: click.Context, as_json: bool | None) -> None:
    """List the messages waiting in the queue, with each recipient's attempts and last error."""
    from mxguard.cli import settings
    from mxguard.relay.service import queue_entries

    s = settings(ctx)
    try:
        messages = asyncio.run(queue_entries(s))
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None
    if wants_json(ctx, as_json):
        emit_json({"messages": messages, "count": len(messages)})
        return
    if not messages:
        click.echo("the queue is empty")
        return
    for m in messages:
        flags = (
            " REQUIRETLS" if m["requiretls"] else (" TLS-Required:No" if m["tls_optional"] else "")
        )
        click.echo(f"{m['id']}  {m['received_at']}  {m['size']} octets  from <{m['from']}>{flags}")
        recipients = m["recipients"]
        assert isinstance(recipients, list)
        for r in recipients:
            state = "delivering" if r["claimed_by"] else f"next attempt {r['next_attempt_at']}"
            click.echo(f"  <{r['address']}>  {r['attempts']} attempt(s), {state}")
            if r["last_error"]:
                click.echo(f"    last error: {r['last_error']}")
    click.echo(f"{len(messages)} message(s)")


@relay.command("password")
@click.argument("user")
@click.option(
    "--password-file",
    type=click.File("r"),
    help="Read the password from this file ('-': standard input) instead of asking.",
)
def password(user: str, password_file: TextIO | None) -> None:
    """Print an --auth-file line for USER (the password is hashed with scrypt)."""
    from mxguard.relay.listener import hash_password

    if ":" in user or not user.isprintable() or not user.strip():
        raise click.BadParameter("a user name without ':' or control characters", param_hint="USER")
    if password_file is not None:
        secret = password_file.readline().rstrip("\r\n")
    else:
        secret = getpass.getpass(f"password for {user}: ")
    if not secret:
        raise click.BadParameter("the password is empty", param_hint="--password-file")
    click.echo(f"{user}:{hash_password(secret)}")
