"""`mxguard policy DOMAIN`: resolve and explain the effective delivery policy of a domain."""

from __future__ import annotations

import asyncio

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import EXIT_DEFERRED, EXIT_OK, EXIT_PERMANENT, emit_json, wants_json
from mxguard.config import ConfigError
from mxguard.engine.context import engine
from mxguard.engine.policy import DeliveryPolicy, Status
from mxguard.engine.resolve import DomainError
from mxguard.learned.model import FloorState, LearnedFloor


@click.command("policy")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def policy(ctx: click.Context, domain: str, as_json: bool | None) -> None:
    """Resolve and print the effective delivery policy of DOMAIN (uses and updates the cache).

    Exit status: 0 when mail may be delivered now, 75 when it must be deferred (temporary or
    DNSSEC failure), 69 when the domain accepts no mail.
    """
    from mxguard.cli import settings

    s = settings(ctx)

    async def run() -> DeliveryPolicy:
        async with engine(s) as e:
            return await e.resolver.resolve(domain)

    try:
        result = asyncio.run(run())
    except DomainError as exc:
        raise click.BadParameter(str(exc), param_hint="DOMAIN") from None
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None
    if wants_json(ctx, as_json):
        emit_json(result.to_json())
    else:
        render(result)
    ctx.exit(
        {Status.OK: EXIT_OK, Status.DEFER: EXIT_DEFERRED, Status.FAIL: EXIT_PERMANENT}[
            result.status
        ]
    )


def render(p: DeliveryPolicy) -> None:
    colour = {"ok": "green", "defer": "yellow", "fail": "red"}[p.status.value]
    click.echo(
        click.style(p.domain, bold=True)
        + f": source {p.source.value}, mode {p.mode.value}, "
        + click.style(p.status.value, fg=colour)
    )
    for line in p.explanation:
        click.echo(f"  {line}")
    for m in p.mx:
        state = "ALLOWED" if m.allowed else "NOT ALLOWED"
        if m.defer:
            state = "DEFERRED"
        click.echo(
            f"  MX {m.preference:>3} {m.host:<32} {state:<11} tls={m.tls.value} "
            f"auth={m.auth.value}{' (testing: report only)' if m.report_only else ''} "
            f"dnssec={m.dnssec.value}"
        )
        if m.canonical:
            click.echo(f"        alias of {m.canonical}")
        for t in m.tlsa:
            click.echo(f"        TLSA {t.to_text()}")
        for t in m.tlsa_unusable:
            click.echo(f"        TLSA {t.to_text()} (unusable)")
        if m.defer:
            click.echo(f"        {m.defer}")
        for note in m.notes:
            click.echo(f"        {note}")
    if p.mta_sts and p.mta_sts.id:
        s = p.mta_sts
        click.echo(
            f"  MTA-STS id {s.id}: mode {s.mode}, max_age {s.max_age}, mx {', '.join(s.mx)}"
            f"{' (cached)' if s.from_cache else ''}, expires {s.expires_at:%Y-%m-%d %H:%M} UTC"
        )
    if p.tlsrpt_rua:
        click.echo(f"  TLS-RPT reports to {', '.join(p.tlsrpt_rua)}")
    for e in p.errors:
        label = f"{e.reported_type.value}: " if e.reported_type else "DNS: "
        click.echo(click.style(f"  {label}", fg="red") + e.detail)
    for w in p.warnings:
        click.echo(click.style("  note: ", fg="yellow") + w)
    if p.learned is not None:
        render_learned(p.learned)


def render_learned(f: LearnedFloor) -> None:
    """What the learned levels say (docs/learned.md): per host, and the drops since."""
    state = f.state.value.upper() if f.state is not FloorState.NONE else "none"
    click.echo(
        f"  learned: level {f.level.value if f.level else '-'}, mode {f.mode.value}, "
        f"floor {state}" + (" (stripping alarm)" if f.alarm else "")
    )
    for h in f.hosts:
        click.echo(
            f"        {h.mx} [{h.ip}] {h.level.value}: {h.seen} session(s), "
            f"first {h.first_seen:%Y-%m-%d %H:%M:%S}Z, last {h.last_seen:%Y-%m-%d %H:%M:%S}Z"
        )
    for d in f.drops:
        click.echo(
            click.style("  DROP ", fg="red")
            + f"{d.at:%Y-%m-%d %H:%M:%S}Z {d.mx} [{d.ip}]: {d.seen.value} where "
            f"{d.learned.value} was learned"
            + (f" ({d.result_type.value})" if d.result_type else "")
        )
