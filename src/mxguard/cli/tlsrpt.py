"""`mxguard tlsrpt`: TLS reporting: record linting and aggregate reports (RFC 8460).

- `check-record TEXT` lints an `_smtp._tls` TXT record (§3);
- `report --day YYYY-MM-DD` builds the aggregate reports (§4) of a past day from the session
  results no report covers yet and sends them to each domain's `rua` (§5); with `--dry-run
  --out DIR` it writes the `.json.gz` files and the `.eml` messages to DIR instead and sends
  nothing (a dry run may look at today so far; a real report only at a day that is over);
- `run` is the long-running sender: a grace period after each UTC midnight it builds every
  complete day with results no report covers yet (late results included), sends the reports
  after a random delay, retries failed deliveries; SIGTERM stops it;
- `collect-postfix --log FILE [--follow] [--state FILE]` records the SMTP sessions of a Postfix
  log as session results, resuming where it stopped (collector.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import signal
from pathlib import Path
from typing import Any

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import EXIT_DEFERRED, emit_json, emit_lint, wants_json
from mxguard.config import ConfigError
from mxguard.engine.context import engine
from mxguard.protocol import tlsrpt as tlsrpt_record
from mxguard.tlsrpt.reporter import GRACE, Built, Delivery, reporter_for


class Seconds(click.ParamType[float]):
    """A finite number of seconds within [low, high] (NaN and infinities are refused)."""

    name = "seconds"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number) or not self.low <= number <= self.high:
            self.fail(
                f"{value!r} is not a number of seconds from {self.low} to {self.high}", param, ctx
            )
        return number


@click.group()
def tlsrpt() -> None:
    """TLS reporting: record linting and aggregate reports (RFC 8460)."""


@tlsrpt.command("check-record")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def check_record(ctx: click.Context, text: str, as_json: bool) -> None:
    """Lint an `_smtp._tls` TXT record, e.g. 'v=TLSRPTv1; rua=mailto:tlsrpt@example.com'."""
    fields, errors, warnings = tlsrpt_record.lint_record(text)
    ctx.exit(
        emit_lint("TLS-RPT record", fields, errors, warnings, as_json=wants_json(ctx, as_json))
    )


def _day(ctx: click.Context, param: click.Parameter, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date; use YYYY-MM-DD (UTC)") from None


@tlsrpt.command("report")
@click.option("--day", required=True, callback=_day, metavar="YYYY-MM-DD",
              help="The UTC day to report.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Build and write files; send nothing.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the .json.gz reports and .eml files (with --dry-run).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def report(
    ctx: click.Context, day: dt.date, dry_run: bool, out: Path | None, as_json: bool | None
) -> None:
    """Build the aggregate reports of one UTC day and send them (RFC 8460 §4, §5).

    Exit status: 0 every report accepted (or written), 75 some delivery failed (it stays in the
    store and `mxguard tlsrpt run` retries it).
    """
    from mxguard.cli import settings

    s = settings(ctx)
    if dry_run and out is None:
        raise click.UsageError("--dry-run needs --out DIR: where to write the reports")
    if out is not None and not dry_run:
        raise click.UsageError("--out is for --dry-run; without it the reports are sent")
    today = dt.datetime.now(dt.UTC).date()
    # RFC 8460 §4.1: a report covers a whole UTC day; sending one for a day that is not over
    # would leave the rest of that day for a second report, and a future day has no results.
    if day > today or (day == today and not dry_run):
        raise click.UsageError(
            f"--day {day.isoformat()} is not over yet (today is {today.isoformat()} UTC); "
            "a report covers a whole UTC day (RFC 8460 §4.1): pass an earlier day, or "
            "--dry-run --out DIR to look at today so far"
        )

    async def work() -> tuple[list[Built], list[Delivery]]:
        async with engine(s) as e:
            r = reporter_for(e)
            built = await r.build(day, store=not dry_run)
            if dry_run:
                return built, []
            wanted = {b.pending.report_id for b in built if b.stored}
            if not wanted:
                return built, []
            return built, await r.deliver_due(force=True, only=wanted)

    try:
        built, deliveries = asyncio.run(work())
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None
    files: dict[str, list[str]] = {}
    if dry_run and out is not None:
        files = _write(built, out, s)
    doc = [_report_json(b, files.get(b.pending.report_id, []), deliveries) for b in built]
    if wants_json(ctx, as_json):
        emit_json({"day": day.isoformat(), "reports": doc})
    else:
        if not doc:
            click.echo(f"{day}: no session results with a TLS-RPT rua left to report")
        for d in doc:
            state = d["delivered_to"] or ("written" if dry_run else d["status"])
            click.echo(
                f"{d['policy_domain']}: {d['successful']} ok, {d['failed']} failed sessions; "
                f"report {d['report_id']}: {state}"
            )
            for f in d["files"]:
                click.echo(f"  {f}")
            for a in d["attempts"]:
                click.echo(f"  {a['uri']}: {'accepted' if a['ok'] else 'FAILED'} — {a['detail']}")
    failed = any(not d.delivered_to for d in deliveries)
    ctx.exit(EXIT_DEFERRED if failed else 0)


def _write(built: list[Built], out: Path, s: Any) -> dict[str, list[str]]:
    from mxguard.tlsrpt.reporter import config_from

    out.mkdir(parents=True, exist_ok=True)
    config = config_from(s)
    files: dict[str, list[str]] = {}
    for b in built:
        gz = out / b.pending.filename
        gz.write_bytes(b.pending.body)
        eml = out / (b.pending.filename.removesuffix(".json.gz") + ".eml")
        eml.write_bytes(b.email(config, dt.datetime.now(dt.UTC)))
        files[b.pending.report_id] = [str(gz), str(eml)]
    return files


def _report_json(b: Built, files: list[str], deliveries: list[Delivery]) -> dict[str, Any]:
    d = next((x for x in deliveries if x.report_id == b.pending.report_id), None)
    if not b.stored and d is None:
        status = "written" if files else "built elsewhere"
    elif d and d.delivered_to:
        status = "delivered"
    else:
        status = "dropped" if d and d.dropped else "pending"
    return {
        "policy_domain": b.pending.policy_domain,
        "report_id": b.pending.report_id,
        "filename": b.pending.filename,
        "rua": list(b.pending.rua),
        "successful": b.report.successful,
        "failed": b.report.failed,
        "status": status,
        "delivered_to": d.delivered_to if d else None,
        "next_attempt_at": d.next_attempt_at.isoformat() if d and d.next_attempt_at else None,
        "attempts": [{"uri": a.uri, "ok": a.ok, "detail": a.detail} for a in d.attempts]
        if d
        else [],
        "files": files,
    }


@tlsrpt.command("run")
@click.option("--poll", type=Seconds(0.1, 3600), default=60.0, show_default=True,
              help="Seconds between checks for due deliveries and late results.")  # fmt: skip
@click.option("--grace", type=Seconds(0, 86400), default=GRACE, show_default=True,
              help="Seconds after UTC midnight before the day is built: longer than the "
                   "results collector lags behind.")  # fmt: skip
@click.pass_context
def run(ctx: click.Context, poll: float, grace: float) -> None:
    """Send reports forever: a grace period after each UTC midnight (plus a random delay)
    every complete day not reported yet, also after downtime; results recorded late go into a
    further report for their day; failed deliveries are retried. SIGTERM or Ctrl-C stops it
    cleanly. Several nodes may run it on one PostgreSQL store: each report is sent once."""
    from mxguard.cli import settings

    s = settings(ctx)

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with engine(s) as e:
            click.echo("mxguard tlsrpt run: sending TLS reports; SIGTERM stops", err=True)
            r = reporter_for(e)
            r.config = dataclasses.replace(r.config, grace=grace)
            await r.run(stop, poll=poll)

    try:
        asyncio.run(work())
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None


@tlsrpt.command("collect-postfix")
@click.option("--log", "log_file", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Postfix's log: its maillog_file, or the syslog file it writes to.")  # fmt: skip
@click.option("--state", "state_file", metavar="FILE", type=click.Path(path_type=Path),
              help="Where reading stopped (default: under $XDG_STATE_HOME/mxguard/).")  # fmt: skip
@click.option("--follow", is_flag=True, help="Keep reading as Postfix writes; SIGTERM stops.")
@click.option("--poll", type=Seconds(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between reads with --follow.")  # fmt: skip
@click.option("--sending-ip", metavar="IP",
              help="Postfix's smtp_bind_address, for sending-mta-ip.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def collect_postfix(
    ctx: click.Context,
    log_file: Path,
    state_file: Path | None,
    follow: bool,
    poll: float,
    sending_ip: str | None,
    as_json: bool | None,
) -> None:
    """Record the SMTP sessions in a Postfix log as TLS-RPT results (RFC 8460 §4).

    Reads from where the last run stopped (log rotation and truncation included); each session
    to an MX host becomes one result, under the policy mxguard serves for its domain.
    """
    from mxguard.cli import settings
    from mxguard.tlsrpt.collector import Collector, CollectorError, Counts, EnginePolicies

    s = settings(ctx)

    async def work() -> Counts:
        async with engine(s) as e:
            c = Collector(
                log_file, e.store, EnginePolicies(e.resolver), state_path=state_file,
                sending_ip=sending_ip,
            )  # fmt: skip
            if not follow:
                return await c.collect()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            return await c.follow(stop, poll=poll)

    try:
        counts = asyncio.run(work())
    except (ConfigError, StoreError, CollectorError) as exc:
        raise click.UsageError(str(exc)) from None
    doc = {"log": str(log_file), **counts.to_json()}
    if wants_json(ctx, as_json):
        emit_json(doc)
        return
    results = ", ".join(f"{n} {k}" for k, n in doc["results"].items()) or "none"
    click.echo(f"{log_file}: {counts.lines} new lines, {counts.sessions} sessions ({results})")
    for why, n in doc["dropped"].items():
        click.echo(f"  {n} session(s) not recorded: {why}")
    served, resolved = doc["policies"]["served"], doc["policies"]["resolved"]
    if served or resolved:
        click.echo(f"  policies: {served} as served to Postfix, {resolved} resolved now")
    for flag in ("rotated", "truncated"):
        if doc[flag]:
            click.echo(f"  the log was {flag} since the last run")
    if counts.skipped_long:
        click.echo(f"  {counts.skipped_long} over-long line(s) skipped")
