"""`mxguard learned`: what was learned per domain, forgetting a domain, clearing the alarm
(docs/learned.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import EXIT_OK, emit_json, wants_json
from mxguard.config import ConfigError
from mxguard.engine.context import engine, load_learned
from mxguard.engine.resolve import DomainError, normalise_domain
from mxguard.learned.learner import Learner
from mxguard.learned.model import fresh


def _domain(text: str) -> str:
    try:
        return normalise_domain(text)
    except DomainError as exc:
        raise click.BadParameter(str(exc), param_hint="DOMAIN") from None


def _run(ctx: click.Context, work: Any) -> Any:
    from mxguard.cli import settings

    s = settings(ctx)

    async def run() -> Any:
        async with engine(s) as e:
            assert e.learner is not None
            return await work(e.learner)

    try:
        return asyncio.run(run())
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None


@click.group("learned")
def learned() -> None:
    """Security levels learned per recipient domain, and the stripping alarm."""


@learned.command("show")
@click.argument("domain", required=False)
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def show(ctx: click.Context, domain: str | None, as_json: bool | None) -> None:
    """What was learned about DOMAIN (or every domain): per MX host and address, the
    strongest level seen, when first and last, and in how many sessions."""
    name = _domain(domain) if domain else None

    async def work(learner: Learner) -> list[dict[str, Any]]:
        now = learner.clock()
        rows = await learner.store.learned_hosts(name)
        live = {id(h) for h in fresh(rows, now=now, decay=learner.settings.decay)}
        return [
            {"domain": h.domain, "mx": h.mx, "ip": h.ip, "level": h.level.value,
             "first_seen": _iso(h.first_seen), "last_seen": _iso(h.last_seen), "seen": h.seen,
             "decayed": id(h) not in live}
            for h in rows
        ]  # fmt: skip

    rows = _run(ctx, work)
    if wants_json(ctx, as_json):
        emit_json(rows)
    else:
        if not rows:
            click.echo("nothing learned" + (f" about {name}" if name else ""))
        for r in rows:
            click.echo(
                f"{r['domain']} {r['mx']} [{r['ip']}] {r['level']}: {r['seen']} session(s), "
                f"last {r['last_seen']}" + (" (decayed)" if r["decayed"] else "")
            )
    ctx.exit(EXIT_OK)


@learned.command("forget")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def forget(ctx: click.Context, domain: str, as_json: bool | None) -> None:
    """Forget what was learned about DOMAIN (and its drops): its next session starts afresh."""
    name = _domain(domain)

    async def work(learner: Learner) -> int:
        return await learner.store.forget_learned(name)

    count = _run(ctx, work)
    if wants_json(ctx, as_json):
        emit_json({"domain": name, "forgotten": count})
    else:
        click.echo(f"{name}: forgot {count} learned host(s)")
    ctx.exit(EXIT_OK)


@learned.command("clear-alarm")
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def clear_alarm(ctx: click.Context, as_json: bool | None) -> None:
    """Clear the active stripping alarm (and with it an automatic switch to enforce)."""

    async def work(learner: Learner) -> Any:
        return await learner.clear_alarm()

    alarm = _run(ctx, work)
    if wants_json(ctx, as_json):
        emit_json({"cleared": alarm is not None, "alarm": alarm.to_json() if alarm else None})
    elif alarm is None:
        click.echo("no stripping alarm is active")
    else:
        click.echo(f"cleared the stripping alarm raised at {_iso(alarm.raised_at)}")
    ctx.exit(EXIT_OK)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["learned", "load_learned"]
