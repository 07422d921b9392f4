"""`mxguard check`: can a STRIPTLS attacker downgrade mail to this domain today? (docs/check.md)"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from mxguard.adapters.store import CheckLog, StoreError, default_store_url, open_store
from mxguard.audit.auditor import Auditor, InputError, RunStats
from mxguard.audit.model import DomainCheck, Severity, Verdict
from mxguard.cli.output import EXIT_INVALID, EXIT_OK, wants_json
from mxguard.config import ConfigError, Settings
from mxguard.protocol import pkix

_CSV_FIELDS = ["domain", "verdict", "protection", "errors", "warnings", "codes", "summary"]
_COLOURS = {
    Verdict.PROTECTED: "green",
    Verdict.PARTIAL: "yellow",
    Verdict.UNPROTECTED: "red",
    Verdict.BROKEN: "red",
}
_SEVERITY_COLOURS = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


@click.command("check")
@click.argument("domains", nargs=-1, metavar="DOMAIN...")
@click.option("--file", "files", multiple=True, metavar="FILE|-",
              help="Read domains from FILE, one per line ('#' comments); '-' is standard "
                   "input. Repeatable.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None,
              help="One JSON object per domain, one per line (JSON lines).")  # fmt: skip
@click.option("--csv", "as_csv", is_flag=True, help="CSV, one row per domain.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results to FILE instead of standard output.")  # fmt: skip
@click.option("--concurrency", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Domains checked at the same time.")  # fmt: skip
@click.option("--per-address", default=2, show_default=True, type=click.IntRange(1, 100),
              help="SMTP connections open to one address at a time, at most.")  # fmt: skip
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 600),
              help="Seconds for each SMTP step.")  # fmt: skip
@click.option("--run", "run_name", metavar="NAME",
              help="Name of a bulk run: domains already checked in it are skipped (resume), "
                   "and processes sharing one store share the run.")  # fmt: skip
@click.option("--no-history", is_flag=True,
              help="Do not read or keep check history in the store.")  # fmt: skip
@click.option("--progress/--no-progress", default=None,
              help="A progress bar on standard error (default: when it is a terminal and "
                   "more than one domain is checked).")  # fmt: skip
@click.pass_context
def check(
    ctx: click.Context,
    domains: tuple[str, ...],
    files: tuple[str, ...],
    as_json: bool | None,
    as_csv: bool,
    output: Path | None,
    concurrency: int,
    per_address: int,
    timeout: float,
    run_name: str | None,
    no_history: bool,
    progress: bool | None,
) -> None:
    """Audit domains as a receiving domain: MX, STARTTLS, certificates, DANE, MTA-STS and
    TLS-RPT, joined into one verdict per domain: protected, partial, unprotected or broken.

    Each finding says what a compliant sender does because of it, and the fix. With a store
    (the default state file, or --store) every check is kept and the next one says what
    changed. No mail is sent: each MX address gets EHLO, STARTTLS and QUIT.

    Exit status: 0 when every domain is protected; 1 when any is not, or some input was not a
    domain; 2 for a usage error.
    """
    from mxguard.cli import settings

    s = settings(ctx)
    json_out = wants_json(ctx, as_json)
    if json_out and as_csv:
        raise click.UsageError("--json and --csv exclude each other; pick one")
    if run_name is not None and no_history:
        raise click.UsageError("--run keeps its progress in the store; drop --no-history")
    if run_name is not None and not run_name.strip():
        raise click.UsageError("--run is empty; give the run a name")
    if not domains and not files:
        raise click.UsageError("give at least one DOMAIN or --file FILE")
    items = list(_items(domains, files))
    total = len(items)
    show_progress = progress if progress is not None else (sys.stderr.isatty() and total > 1)
    with contextlib.ExitStack() as stack:
        out: IO[str] = (
            stack.enter_context(_open_output(output)) if output is not None else sys.stdout
        )
        writer = _Writer(out, "json" if json_out else "csv" if as_csv else "text", items)
        stats = RunStats()
        try:
            asyncio.run(
                _run(s, items, writer, stats, concurrency=concurrency, per_address=per_address,
                     timeout=timeout, run_name=run_name, history=not no_history,
                     show_progress=show_progress, total=total)
            )  # fmt: skip
        except (ConfigError, StoreError, pkix.CaFileError) as exc:
            raise click.UsageError(str(exc)) from None
        writer.close()
    if total > 1 or stats.skipped:
        click.echo(_stats_line(stats, writer), err=True)
    bad = stats.errors or any(v != Verdict.PROTECTED.value for v in (stats.verdicts or {}))
    ctx.exit(EXIT_INVALID if bad else EXIT_OK)


def _items(domains: tuple[str, ...], files: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for i, d in enumerate(domains, 1):
        yield f"argument {i}", d
    for name in files:
        try:
            if name == "-":
                text = sys.stdin.read()
            else:
                text = Path(name).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise click.BadParameter(f"{name}: {exc.strerror}", param_hint="--file") from None
        shown = "standard input" if name == "-" else name
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                yield f"{shown} line {number}", entry


@contextlib.contextmanager
def _open_output(path: Path) -> Iterator[IO[str]]:
    try:
        handle = path.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="--output") from None
    with handle:
        yield handle


async def _run(
    s: Settings,
    items: list[tuple[str, str]],
    writer: _Writer,
    stats: RunStats,
    *,
    concurrency: int,
    per_address: int,
    timeout: float,  # noqa: ASYNC109 - each SMTP step's bound, passed to the prober
    run_name: str | None,
    history: bool,
    show_progress: bool,
    total: int,
) -> None:
    store: CheckLog | None = None
    if history:
        store = await open_store(s.store or default_store_url())
    try:
        auditor = Auditor(s, store=store, per_address=per_address, timeout=timeout)
        writer.prober = auditor.prober
        with _progress(show_progress, total) as advance:
            async for item in auditor.run(
                items, concurrency=concurrency, run=run_name, stats=stats
            ):
                writer.write(item)
                advance(item, auditor)
            advance(None, auditor)
        writer.store_problem = auditor.store_problem
    finally:
        if store is not None:
            await store.close()


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Any]:
    if not show:
        yield lambda item, auditor: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("checking", total=total)

        def advance(item: DomainCheck | InputError | None, auditor: Auditor) -> None:
            if item is not None:
                bar.advance(task)
            smtp = auditor.prober.smtp_connections
            bar.update(task, description=f"checking ({smtp} SMTP connections)")

        yield advance


class _Writer:
    """Writes each result as it comes; human output for a few domains is held and written in
    the order they were given."""

    HOLD = 50  # up to this many domains, human output keeps the input order

    def __init__(self, out: IO[str], form: str, items: list[tuple[str, str]]) -> None:
        self.out, self.form = out, form
        self.prober: Any = None
        self.store_problem: str | None = None
        self._hold = form == "text" and len(items) <= self.HOLD
        self._order = {text.strip().rstrip(".").lower(): i for i, (_, text) in enumerate(items)}
        self._held: list[DomainCheck | InputError] = []
        self._csv: Any = None
        if form == "csv":
            self._csv = csv.DictWriter(out, fieldnames=["source", *_CSV_FIELDS, "error"])
            self._csv.writeheader()

    def write(self, item: DomainCheck | InputError) -> None:
        if self._hold:
            self._held.append(item)
        else:
            self._write(item)

    def _write(self, item: DomainCheck | InputError) -> None:
        if self.form == "json":
            self.out.write(json.dumps(item.to_json(), default=str) + "\n")
            self.out.flush()
        elif self.form == "csv":
            self._csv.writerow(_csv_row(item))
            self.out.flush()
        elif isinstance(item, InputError):
            click.echo(click.style("error: ", fg="red") + _input_error(item), err=True)
        else:
            click.echo(render(item), file=self.out)  # colours only on a terminal

    def close(self) -> None:
        def position(item: DomainCheck | InputError) -> int:
            key = item.text if isinstance(item, InputError) else item.domain
            return self._order.get(key.strip().rstrip(".").lower(), len(self._order))

        for item in sorted(self._held, key=position):
            self._write(item)
        self._held = []


def _input_error(e: InputError) -> str:
    return f"{e.source}: {e.text[:80]!r}: {e.error}"


def _csv_row(item: DomainCheck | InputError) -> dict[str, Any]:
    if isinstance(item, InputError):
        return {"source": item.source, "domain": item.text, "error": item.error}
    return {
        "source": "",
        "domain": item.domain,
        "verdict": item.verdict.value,
        "protection": item.protection.value,
        "errors": sum(f.severity is Severity.ERROR for f in item.findings),
        "warnings": sum(f.severity is Severity.WARNING for f in item.findings),
        "codes": " ".join(dict.fromkeys(f.code for f in item.findings)),
        "summary": item.summary,
        "error": "",
    }


def _clean(text: str) -> str:
    """``text`` with control characters escaped: details quote what peers sent (banners,
    records), and a terminal must never receive their escape sequences."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def render(c: DomainCheck) -> str:
    """The human form of one check (peers' words escaped, our colours kept)."""
    buf = io.StringIO()

    def line(text: str = "") -> None:
        buf.write(text + "\n")

    verdict = click.style(c.verdict.value.upper(), fg=_COLOURS[c.verdict], bold=True)
    line(f"{c.domain}: " + verdict + f" (protection: {c.protection.value})")
    line(_clean(f"  {c.summary}"))
    o = c.observations
    line(f"  DNSSEC: {o.mx_lookup.dnssec}; MX lookup: {o.mx_lookup.kind}")
    sts = o.policy.mta_sts
    if sts is not None and sts.mode is not None:
        line(
            _clean(
                f"  MTA-STS: id {sts.id}, mode {sts.mode}, max_age {sts.max_age}, "
                f"mx {', '.join(sts.mx)}"
            )
        )
    for h in o.hosts:
        m = h.policy
        need = f"TLS {m.tls.value}, auth {m.auth.value}" + (" (testing)" if m.report_only else "")
        extra = "" if m.allowed else ", NOT ALLOWED by the policy"
        line(f"  MX {m.preference} {m.host} (DNSSEC {m.dnssec.value}; {need}{extra})")
        for t in m.tlsa:
            line(f"      TLSA {t.to_text()[:72]}")
        for a in h.addresses:
            mark = click.style("ok", fg="green") if a.honest else click.style("FAIL", fg="red")
            line(f"    {a.address}: " + mark + " " + _clean(a.outcome))
            if a.certificates:
                leaf = a.certificates[0]
                names = ", ".join(leaf.dns_names) or "no DNS names"
                line(_clean(f"      certificate: {names}; expires {leaf.not_after}; {leaf.key}"))
        if not h.addresses and m.defer is None and m.allowed:
            line("    (no address)")
    if o.rua:
        for r in o.rua:
            line(_clean(f"  TLS-RPT rua {r.uri}: {'ok' if r.ok else 'FAIL'} — {r.detail}"))
    if c.findings:
        line("  findings:")
        for f in c.findings:
            sev = click.style(f"{f.severity.value:<7}", fg=_SEVERITY_COLOURS[f.severity])
            where = f" [{f.mx}]" if f.mx else ""
            rt = f" ({f.result_type.value})" if f.result_type else ""
            line("    " + sev + _clean(f" {f.code}{where}{rt}: {f.detail}"))
            line(f"            sender: {f.sender}")
            line(f"            fix: {f.fix}")
    if c.changes:
        line("  changes since the last check:")
        for change in c.changes:
            line(_clean(f"    {change}"))
    return buf.getvalue().rstrip("\n")


def _stats_line(stats: RunStats, writer: _Writer) -> str:
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted((stats.verdicts or {}).items()))
    prober = writer.prober
    connections = prober.smtp_connections if prober is not None else 0
    most = max(prober.most_open.values(), default=0) if prober is not None else 0
    rate = stats.checked / elapsed * 60
    text = (
        f"checked {stats.checked} domains in {elapsed:.1f} s ({rate:.0f} per minute): "
        f"{verdicts or 'none'}; {stats.skipped} skipped, {stats.errors} errors; "
        f"{connections} SMTP connections, at most {most} at once to one address"
    )
    if writer.store_problem:
        text += f"; history not kept: {writer.store_problem}"
    return text
