"""`mxguard status`: the state shared by every node that needs an operator's eye — today the
stripping alarm and the recent drops below learned levels (docs/learned.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import EXIT_OK, emit_json, wants_json
from mxguard.config import ConfigError
from mxguard.engine.context import engine

RECENT = dt.timedelta(hours=24)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool | None) -> None:
    """The stripping alarm (active or the last one cleared), the learned mode, and the drops
    below learned levels of the last 24 hours."""
    from mxguard.cli import settings

    s = settings(ctx)

    async def run() -> dict[str, Any]:
        async with engine(s) as e:
            assert e.learner is not None
            learner = e.learner
            now = learner.clock()
            alarm = await learner.store.latest_alarm()
            drops = await learner.store.drops_since(now - RECENT)
            rows = await learner.store.learned_hosts()
            cfg = learner.settings
            return {
                "alarm": alarm.to_json() if alarm else None,
                "alarm_active": alarm is not None and alarm.active,
                "learned": {
                    "mode": cfg.mode.value,
                    "enforced": cfg.mode.value == "enforce"
                    or bool(alarm and alarm.active and alarm.enforce),
                    "domains": len({r.domain for r in rows}),
                    "hosts": len(rows),
                    "alarm_domains": cfg.alarm_domains,
                    "alarm_window": cfg.alarm_window,
                },
                "drops": {
                    "since": (now - RECENT).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "count": len(drops),
                    "stripped": sum(d.stripped for d in drops),
                    "domains": sorted({d.domain for d in drops}),
                },
            }

    try:
        out = asyncio.run(run())
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None
    if wants_json(ctx, as_json):
        emit_json(out)
        ctx.exit(EXIT_OK)
    alarm = out["alarm"]
    if out["alarm_active"]:
        click.echo(
            click.style("STRIPTLS ALARM ACTIVE", fg="red", bold=True)
            + f" since {alarm['raised_at']}: {len(alarm['domains'])} domains lost STARTTLS "
            f"within {alarm['window']:g} s"
            + (" — learned levels ENFORCED for every learned domain" if alarm["enforce"] else "")
        )
        for host in alarm["hosts"]:
            click.echo(f"  {host}")
        click.echo("  clear it with: mxguard learned clear-alarm")
    elif alarm:
        click.echo(f"no active alarm (the last, of {alarm['raised_at']}, cleared)")
    else:
        click.echo("no stripping alarm")
    lv = out["learned"]
    click.echo(f"learned: mode {lv['mode']}, {lv['domains']} domain(s), {lv['hosts']} host(s)")
    dr = out["drops"]
    click.echo(
        f"drops in the last 24 h: {dr['count']} ({dr['stripped']} lost STARTTLS)"
        + (f": {', '.join(dr['domains'])}" if dr["domains"] else "")
    )
    ctx.exit(EXIT_OK)
