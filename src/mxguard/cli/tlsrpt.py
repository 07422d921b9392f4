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
  log as session results, resuming where it stopped (collector.py);
- `ingest FILE|-` receives reports other senders sent to a domain owner: a report file or a
  whole report e-mail (§5.3, its DKIM signature checked), kept in the store once each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import signal
import sys
from pathlib import Path
from typing import Any

import click

from mxguard.adapters.dkim import DkimResult, verify_dkim
from mxguard.adapters.dns import DnsResolver
from mxguard.adapters.store import (
    ReceivedRecord,
    ReportSource,
    StoreError,
    default_store_url,
    open_store,
)
from mxguard.adapters.store.cache_only import PolicyCacheOnly
from mxguard.cli.output import (
    EXIT_DEFERRED,
    EXIT_INVALID,
    EXIT_OK,
    emit_json,
    emit_lint,
    wants_json,
)
from mxguard.config import ConfigError
from mxguard.engine.context import engine
from mxguard.protocol import tlsrpt as tlsrpt_record
from mxguard.protocol import tlsrpt_ingest
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


@dataclasses.dataclass
class _Received:
    """One report of the input: read (`record`) or refused (`error`), then stored or not."""

    filename: str
    record: ReceivedRecord | None = None
    error: str | None = None
    stored: bool | None = None  # False: a report with its dedupe key was already stored

    @property
    def status(self) -> str:
        if self.error is not None:
            return "refused"
        return "stored" if self.stored else "duplicate"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"filename": self.filename, "status": self.status,
                               "error": self.error}  # fmt: skip
        if self.record is not None:
            r = self.record.report
            doc.update(
                organization_name=r.organization_name,
                report_id=r.report_id,
                policy_domains=list(r.policy_domains),
                start=r.start.isoformat(),
                end=r.end.isoformat(),
                successful=r.successful,
                failed=r.failed,
                notes=list(r.notes),
            )
        return doc


@tlsrpt.command("ingest")
@click.argument("source", metavar="FILE|-")
@click.option("--store", "store_url", metavar="URL",
              help="Keep the reports in this store (default: the global --store, or the "
                   "default state file).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def ingest(ctx: click.Context, source: str, store_url: str | None, as_json: bool | None) -> None:
    """Receive TLS reports sent to your domain (RFC 8460 §4, §5) and keep them in the store.

    FILE (or standard input, '-') is a report, .json or .json.gz, or a whole e-mail carrying
    one or more (its DKIM signature is checked and kept with each; an unsigned report is kept
    too). Each report is stored once: a resent one is reported as a duplicate. As an MTA pipe
    transport (Postfix: `argv=mxguard tlsrpt ingest -`) it reads the message on standard input.

    Exit status: 0 every report stored or already stored; 1 some input refused (too big, not
    a report, no report attached; nothing of a refused report is stored); 2 usage error (also
    a store that cannot be opened); 75 the store failed while writing (try again).
    """
    from mxguard.cli import settings

    s = settings(ctx)
    if store_url is not None and not store_url.strip():
        raise click.UsageError("--store is empty; give a store URL")
    url = store_url or s.store or default_store_url()
    data, shown = _read_input(source)
    now = dt.datetime.now(dt.UTC)
    dkim: DkimResult | None = None
    kind = "report" if tlsrpt_ingest.looks_like_report(data) else "mail"

    async def work() -> tuple[list[_Received], DkimResult | None]:
        items: list[_Received] = []
        found: list[tuple[str, bytes, str | None]]
        origin = ReportSource.FILE
        result = None
        if len(data) > tlsrpt_ingest.MAX_MESSAGE_SIZE:
            limit = tlsrpt_ingest.MAX_MESSAGE_SIZE
            return [_Received(shown, error=f"the input is over {limit:,} bytes")], None
        if kind == "report":
            found = [(Path(source).name if source != "-" else "", data, None)]
        else:
            origin = ReportSource.MAIL
            try:
                found = tlsrpt_ingest.reports_from_email(data)
            except tlsrpt_ingest.ReportRejected as exc:
                return [_Received(shown, error=exc.reason)], None
            if not found:
                why = (
                    "no TLS report in this e-mail: no application/tlsrpt+gzip or "
                    "application/tlsrpt+json part (RFC 8460 §5.3), and no .json or .json.gz "
                    "attachment; and it is not a report itself (neither gzip nor JSON)"
                )
                return [_Received(shown, error=why)], None
            result = await verify_dkim(data, DnsResolver(s.resolvers or None))
        for name, body, ctype in found:
            item = _Received(name or shown)
            try:
                text = tlsrpt_ingest.decode(body, content_type=ctype, filename=name or None)
                report = tlsrpt_ingest.parse(text, domain_hint=tlsrpt_ingest.filename_domain(name))
            except tlsrpt_ingest.ReportRejected as exc:
                item.error = exc.reason
            else:
                item.record = ReceivedRecord(report, body, now, origin, result)
            items.append(item)
        readable = [i for i in items if i.record is not None]
        if not readable:
            return items, result
        store = await open_store(url)
        try:
            for item in readable:
                assert item.record is not None
                try:
                    item.stored = await store.add_received(item.record)
                except StoreError as exc:
                    if isinstance(store, PolicyCacheOnly):
                        raise  # this store never keeps reports: a usage error, not a retry
                    raise _WriteFailed(str(exc)) from None
        finally:
            await store.close()
        return items, result

    try:
        items, dkim = asyncio.run(work())
    except StoreError as exc:
        raise click.UsageError(str(exc)) from None
    except _WriteFailed as exc:
        click.echo(f"mxguard tlsrpt ingest: {exc}; nothing more was stored, try again", err=True)
        ctx.exit(EXIT_DEFERRED)
    refused = sum(1 for i in items if i.error is not None)
    if wants_json(ctx, as_json):
        emit_json(
            {
                "input": shown,
                "kind": kind,
                "dkim": None if dkim is None else dkim.to_json(),
                "reports": [i.to_json() for i in items],
                "stored": sum(1 for i in items if i.stored),
                "duplicates": sum(1 for i in items if i.stored is False),
                "refused": refused,
            }
        )
    else:
        for item in items:
            click.echo(_ingest_text(item, dkim, kind))
    ctx.exit(EXIT_INVALID if refused else EXIT_OK)


class _WriteFailed(Exception):
    """The store refused a write after it was opened (e.g. the database went away)."""


def _read_input(source: str) -> tuple[bytes, str]:
    """At most one byte more than an e-mail may have, and how to name where it came from."""
    limit = tlsrpt_ingest.MAX_MESSAGE_SIZE + 1
    if source == "-":
        return sys.stdin.buffer.read(limit), "standard input"
    try:
        with open(source, "rb") as f:
            return f.read(limit), source
    except OSError as exc:
        raise click.BadParameter(f"{source}: {exc.strerror}", param_hint="FILE") from None


def _ingest_text(item: _Received, dkim: DkimResult | None, kind: str) -> str:
    """What people read about one report; every text from the report escaped (it is the
    sender's, and could drive a terminal)."""
    if item.record is None:
        return _clean(f"refused: {item.filename}: {item.error}")
    r = item.record.report
    domains = ", ".join(r.policy_domains) or "no policy domain"
    what = "stored" if item.stored else "duplicate (already stored)"
    lines = [
        _clean(
            f"{what}: report {r.report_id} from {r.organization_name} for {domains}, "
            f"{r.start.isoformat()} to {r.end.isoformat()}: {r.successful} successful, "
            f"{r.failed} failed sessions"
        )
    ]
    if kind == "mail" and dkim is not None:
        if dkim.ok:
            lines.append(_clean(f"  DKIM: verified, d={dkim.domain} s={dkim.selector}"))
        else:
            lines.append(_clean(f"  DKIM: not verified ({dkim.detail})"))
    lines += [_clean(f"  note: {n}") for n in r.notes]
    return "\n".join(lines)


def _clean(text: str) -> str:
    """`text` with every character that is not printable shown as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
