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
  whole report e-mail (§5.3, its DKIM signature checked), kept in the store once each;
- `fetch --imap HOST` does the same for every report e-mail in an IMAP mailbox (the `rua`
  mailbox, tlsrpt/imap.py) and files each message into a done or a failed folder;
- `summary DOMAIN` adds up the reports received for a domain and says whether an MTA-STS
  enforce policy would have refused honest mail (owner/summary.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email.parser
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mxguard.adapters.dkim import DkimResult, verify_dkim
from mxguard.adapters.dns import DnsResolver
from mxguard.adapters.store import (
    ReceivedRecord,
    ReportSource,
    Store,
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
from mxguard.engine.resolve import DomainError, normalise_domain
from mxguard.owner import summary as summaries
from mxguard.protocol import tlsrpt as tlsrpt_record
from mxguard.protocol import tlsrpt_ingest
from mxguard.tlsrpt import imap
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
                sending_ip=sending_ip, learner=e.learner,
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
        name = Path(source).name if source != "-" else ""
        items, result = await _read_reports(data, shown, kind, name, s.resolvers, now)
        if not any(i.record is not None for i in items):
            return items, result
        store = await open_store(url)
        try:
            await _keep(store, items)
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


_NO_REPORT = (
    "no TLS report in this e-mail: no application/tlsrpt+gzip or application/tlsrpt+json part "
    "(RFC 8460 §5.3), and no .json or .json.gz attachment; and it is not a report itself "
    "(neither gzip nor JSON)"
)


async def _read_reports(
    data: bytes,
    shown: str,
    kind: str,
    name: str,
    resolvers: Sequence[tuple[str, int]],
    now: dt.datetime,
) -> tuple[list[_Received], DkimResult | None]:
    """The reports in ``data`` (a report when ``kind`` is "report", else a whole e-mail, whose
    DKIM signature is checked), each read or refused; nothing is stored here. The one way in
    of `tlsrpt ingest` and `tlsrpt fetch`."""
    if len(data) > tlsrpt_ingest.MAX_MESSAGE_SIZE:
        limit = tlsrpt_ingest.MAX_MESSAGE_SIZE
        return [_Received(shown, error=f"the input is over {limit:,} bytes")], None
    found: list[tuple[str, bytes, str | None]]
    result = None
    if kind == "report":
        origin = ReportSource.FILE
        found = [(name, data, None)]
    else:
        origin = ReportSource.MAIL
        try:
            found = tlsrpt_ingest.reports_from_email(data)
        except tlsrpt_ingest.ReportRejected as exc:
            return [_Received(shown, error=exc.reason)], None
        if not found:
            return [_Received(shown, error=_NO_REPORT)], None
        result = await verify_dkim(data, DnsResolver(resolvers or None))
    items: list[_Received] = []
    for part_name, body, ctype in found:
        item = _Received(part_name or shown)
        try:
            text = tlsrpt_ingest.decode(body, content_type=ctype, filename=part_name or None)
            report = tlsrpt_ingest.parse(text, domain_hint=tlsrpt_ingest.filename_domain(part_name))
        except tlsrpt_ingest.ReportRejected as exc:
            item.error = exc.reason
        else:
            item.record = ReceivedRecord(report, body, now, origin, result)
        items.append(item)
    return items, result


async def _keep(store: Store, items: Sequence[_Received]) -> None:
    """Store each report of ``items`` that was read (``stored`` says whether it was new);
    _WriteFailed when the store fails meanwhile; StoreError for a store that keeps no
    reports at all (a usage error, not a retry)."""
    for item in items:
        if item.record is None:
            continue
        try:
            item.stored = await store.add_received(item.record)
        except StoreError as exc:
            if isinstance(store, PolicyCacheOnly):
                raise
            raise _WriteFailed(str(exc)) from None


# --------------------------------------------------------------------------- fetch


@dataclasses.dataclass
class _Fetched:
    """One message of the mailbox, as `tlsrpt fetch` handled it."""

    uid: str
    size: int
    subject: str | None = None
    items: list[_Received] = dataclasses.field(default_factory=list)
    dkim: DkimResult | None = None
    status: imap.Disposition = imap.Disposition.KEEP
    moved_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "size": self.size,
            "subject": self.subject,
            "status": self.status.value,
            "moved_to": self.moved_to,
            "dkim": None if self.dkim is None else self.dkim.to_json(),
            "reports": [i.to_json() for i in self.items],
        }


MAX_SUBJECT = 200  # characters of a message's Subject shown


def _subject(data: bytes) -> str | None:
    """The Subject header field as written (no decoding that could fail), cut short."""
    head = data[: 64 * 1024].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    value = email.parser.BytesHeaderParser().parsebytes(head).get("Subject")
    return None if value is None else " ".join(str(value).split())[:MAX_SUBJECT]


def _password(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(4097)
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="--password-file") from None
    text = raw.decode("utf-8", "replace").split("\n", 1)[0].rstrip("\r")
    if not text or len(raw) > 4096:
        raise click.BadParameter(
            f"{path}: expected the password on the first line (and nothing big)",
            param_hint="--password-file",
        )
    return text


@tlsrpt.command("fetch")
@click.option("--imap", "server", required=True, metavar="HOST[:PORT]",
              envvar="MXGUARD_TLSRPT_FETCH_IMAP",
              help="The IMAP server of the rua mailbox; TLS on connect, port 993 by "
                   "default. Its certificate must be valid for HOST (system roots and "
                   "--ca-file).")  # fmt: skip
@click.option("--user", required=True, help="The mailbox's login name.")
@click.option("--password-file", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="A file with the password on its first line.")  # fmt: skip
@click.option("--folder", default="INBOX", show_default=True,
              help="Where the report e-mails arrive.")  # fmt: skip
@click.option("--done-folder", default=imap.DONE_FOLDER, show_default=True,
              help="Where messages whose reports were read go (created when missing).")  # fmt: skip
@click.option("--failed-folder", default=imap.FAILED_FOLDER, show_default=True,
              help="Where messages without a readable report go (created when "
                   "missing).")  # fmt: skip
@click.option("--max-messages", type=click.IntRange(1, 100_000), default=imap.MAX_MESSAGES,
              show_default=True,
              help="Messages handled in one run; the rest wait for the next.")  # fmt: skip
@click.option("--store", "store_url", metavar="URL",
              help="Keep the reports in this store (default: the global --store, or the "
                   "default state file).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def fetch(
    ctx: click.Context,
    server: str,
    user: str,
    password_file: Path,
    folder: str,
    done_folder: str,
    failed_folder: str,
    max_messages: int,
    store_url: str | None,
    as_json: bool | None,
) -> None:
    """Receive the TLS reports mailed to your rua mailbox (RFC 8460 §5.3) from its IMAP server.

    Each message of --folder is read as `tlsrpt ingest` reads an e-mail (every report
    attached, DKIM checked) and kept in the store; then it is moved (IMAP MOVE, or COPY and
    EXPUNGE) to --done-folder, or to --failed-folder when no report in it could be read (not
    a report e-mail, too big, damaged). A report already stored is not stored twice, so
    running it again, or from cron, is safe.

    Exit status: 0 the run finished (messages without a report were filed in the failed
    folder); 2 usage error (also a refused login, a missing folder, a store that cannot be
    opened); 75 the server, the network or the store failed on the way (what was done stays
    done; run it again).
    """
    from mxguard.cli import settings

    s = settings(ctx)
    if store_url is not None and not store_url.strip():
        raise click.UsageError("--store is empty; give a store URL")
    url = store_url or s.store or default_store_url()
    try:
        host, port = imap.parse_server(server)
        for name in (folder, done_folder, failed_folder):
            imap.mailbox_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if folder in (done_folder, failed_folder):
        raise click.UsageError(
            f"--folder {folder!r} is also where handled messages go: give other folders "
            "(--done-folder, --failed-folder)"
        )
    account = imap.Account(host, user, _password(password_file), port, s.ca_file)
    folders = imap.Folders(folder, done_folder, failed_folder)
    run = imap.Run(f"{host}:{port}")
    messages: list[_Fetched] = []
    now = dt.datetime.now(dt.UTC)

    async def work() -> None:
        store = await open_store(url)
        try:
            await store.received_domains(now, now + dt.timedelta(seconds=1))  # keeps reports?

            async def handle(message: imap.Message) -> imap.Disposition:
                entry = _Fetched(message.uid, message.size)
                messages.append(entry)
                shown = f"message UID {message.uid}"
                if message.data is None:
                    limit = imap.MAX_SIZE
                    entry.items = [_Received(shown, error=f"the message is over {limit:,} bytes")]
                    entry.status = imap.Disposition.FAILED
                    return entry.status
                entry.subject = _subject(message.data)
                entry.items, entry.dkim = await _read_reports(
                    message.data, shown, "mail", "", s.resolvers, dt.datetime.now(dt.UTC)
                )
                if not any(i.record is not None for i in entry.items):
                    entry.status = imap.Disposition.FAILED
                    return entry.status
                await _keep(store, entry.items)  # _WriteFailed: the message stays
                entry.status = imap.Disposition.DONE
                return entry.status

            dns = DnsResolver(s.resolvers) if s.resolvers else None
            await imap.fetch(account, handle, folders=folders, dns=dns,
                             max_messages=max_messages, run=run)  # fmt: skip
        finally:
            await store.close()

    error: str | None = None
    try:
        asyncio.run(work())
    except StoreError as exc:
        raise click.UsageError(str(exc)) from None
    except imap.ImapError as exc:
        if not exc.temporary:
            raise click.UsageError(str(exc)) from None
        error = str(exc)
    except _WriteFailed as exc:
        error = f"the store failed: {exc}; the message stays in {folder!r} for the next run"
    filed = {f.uid: f for f in run.filed}
    for m in messages:
        f = filed.get(m.uid)
        m.moved_to = f.folder if f is not None else None
        if f is None:
            m.status = imap.Disposition.KEEP
    reports = [i for m in messages for i in m.items]
    doc = {
        "server": run.server,
        "address": run.address,
        "user": user,
        "folder": folder,
        "done_folder": done_folder,
        "failed_folder": failed_folder,
        "move": run.move,
        "messages": [m.to_json() for m in messages],
        "done": sum(1 for m in messages if m.status is imap.Disposition.DONE),
        "failed": sum(1 for m in messages if m.status is imap.Disposition.FAILED),
        "kept": sum(1 for m in messages if m.status is imap.Disposition.KEEP),
        "left": run.left,
        "stored": sum(1 for i in reports if i.stored),
        "duplicates": sum(1 for i in reports if i.stored is False),
        "refused": sum(1 for i in reports if i.error is not None),
        "error": error,
    }
    if wants_json(ctx, as_json):
        emit_json(doc)
    elif messages or error is None:
        _fetch_text(doc, messages)
    if error is not None:
        if not wants_json(ctx, as_json):
            click.echo(f"mxguard tlsrpt fetch: {_clean(error)}", err=True)
        ctx.exit(EXIT_DEFERRED)
    ctx.exit(EXIT_OK)


def _fetch_text(doc: dict[str, Any], messages: list[_Fetched]) -> None:
    click.echo(
        f"{doc['server']} {_clean(doc['folder'])}: {len(messages)} message(s): {doc['done']} "
        f"done ({doc['stored']} report(s) stored, {doc['duplicates']} already stored), "
        f"{doc['failed']} failed, {doc['kept']} kept; {doc['left']} left for the next run"
    )
    for m in messages:
        subject = f" {_clean(repr(m.subject))}" if m.subject else ""
        where = f" -> {_clean(m.moved_to)}" if m.moved_to else " (not moved)"
        click.echo(f"  UID {m.uid}{subject}{where}")
        for item in m.items:
            for line in _ingest_text(item, m.dkim, "mail").split("\n"):
                click.echo(f"    {line}")


# --------------------------------------------------------------------------- summary


@tlsrpt.command("summary")
@click.argument("domain")
@click.option("--days", type=click.IntRange(1, summaries.MAX_DAYS),
              default=summaries.DEFAULT_DAYS, show_default=True,
              help="The reports of the last N whole UTC days, and of today.")  # fmt: skip
@click.option("--store", "store_url", metavar="URL",
              help="The store the reports were kept in (default: the global --store, or the "
                   "default state file).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def summary(
    ctx: click.Context, domain: str, days: int, store_url: str | None, as_json: bool | None
) -> None:
    """What the TLS reports received for DOMAIN say, and whether it is ready for an MTA-STS
    enforce policy (docs/reports-rollout.md).

    Adds up the reports of the window (sessions by result type, sender and MX host) and checks
    the domain afresh as `mxguard check` does. Ready means: reports came in, no sender saw a
    certificate fail, used an MX host the policy misses or failed to refresh the policy, and
    the check finds nothing enforce would refuse. Each blocker says what failed, how many
    sessions, which senders and MX hosts, and the fix. STARTTLS missing on a sender's path is
    listed as a signal of stripping, not a blocker.

    Exit status: 0 ready to enforce, 1 not (yet), 2 usage error (also a store that cannot be
    opened or keeps no reports).
    """
    from mxguard.cli import settings

    s = settings(ctx)
    try:
        name = normalise_domain(domain)
    except DomainError as exc:
        raise click.BadParameter(str(exc), param_hint="DOMAIN") from None
    if store_url is not None and not store_url.strip():
        raise click.UsageError("--store is empty; give a store URL")
    url = store_url or s.store or default_store_url()

    async def work() -> summaries.Summary:
        store = await open_store(url)
        try:
            return await summaries.summarise(s, store, name, days=days)
        finally:
            await store.close()

    try:
        result = asyncio.run(work())
    except (StoreError, ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    if wants_json(ctx, as_json):
        emit_json(result.to_json())
    else:
        _summary_text(result)
    ctx.exit(EXIT_OK if result.ready_to_enforce else EXIT_INVALID)


def _summary_text(r: summaries.Summary) -> None:
    e = r.evidence
    last = (e.end - dt.timedelta(days=1)).date().isoformat()
    verdict = (
        click.style("READY", fg="green")
        if r.ready_to_enforce
        else click.style("NOT READY", fg="red")
    )
    click.echo(
        f"{r.domain}: {verdict} for MTA-STS enforce (reports of {e.start.date().isoformat()} "
        f"to {last})"
    )
    click.echo(
        f"  {e.reports} report(s) from {len(e.senders)} sender(s): {e.successful} successful, "
        f"{e.failed} failed session(s)"
    )
    for row in e.by_result_type():
        click.echo(_clean(f"  {row['result_type']}: {row['failed']} failed"))
    for t in e.senders:
        click.echo(
            _clean(
                f"  sender {t.organization!r}: {t.reports} report(s), {t.successful} ok, "
                f"{t.failed} failed, {t.dkim_verified} DKIM-verified"
            )
        )
    for row in e.by_mx():
        kinds = ", ".join(f"{k} {n}" for k, n in row["result_types"].items())
        click.echo(_clean(f"  MX {row['mx_host'] or '(not named)'}: {row['failed']} failed "
                          f"({kinds})"))  # fmt: skip
    if r.check is not None:
        click.echo(f"  check: {r.check.verdict.value}: {_clean(r.check.summary)}")
    if r.decision.blockers:
        click.echo(click.style("blockers:", fg="red"))
        for b in r.decision.blockers:
            click.echo(_clean(f"  - [{b.source.value}] {b.what}"))
            click.echo(_clean(f"    fix: {b.fix}"))
    for title, lines in (("signals", r.decision.signals), ("warnings", r.decision.warnings)):
        if lines:
            click.echo(click.style(f"{title}:", fg="yellow"))
            for line in lines:
                click.echo(_clean(f"  - {line}"))


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
