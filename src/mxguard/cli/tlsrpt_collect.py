"""`mxguard tlsrpt collect --socket PATH [--log FILE]`: receive Postfix ≥ 3.10's own TLSRPT
events, and with `--log` read from Postfix's log the sessions those events leave out.

Postfix 3.10 built with libtlsrpt (`smtp_tlsrpt_enable = yes`) sends one datagram per TLS
handshake (or refusal to go on without one) to `smtp_tlsrpt_socket_name`; this command binds
that socket and records each event as a session result in the store, exactly like the results
mxguard's own sender records (tlsrpt/datagram.py). `mxguard tlsrpt run` reports them.

- The socket is created with `--mode` (0660) and `--group`: Postfix's smtp(8) processes send
  as `mail_owner` (`postconf -h mail_owner`, normally `postfix`), so give its group write
  access. A stale socket at the path is replaced, a live one is an error.
- Results the store refuses wait in the result spool (`$XDG_STATE_HOME/mxguard/spool/`), as
  for `mxguard send`, and move into the store with a later write.
- `--log FILE` (Postfix's `maillog_file` or the syslog file it writes to): Postfix 3.10
  reports nothing for a session in plain text where TLS was optional, so a STRIPTLS attack on
  an MTA-STS `testing` domain would go unreported. The log is followed (every `--poll`
  seconds, as `tlsrpt collect-postfix --follow` does, resuming from the same `--state` file
  by default) and only such sessions are recorded from it, as starttls-not-supported under
  the policy `serve postfix` served then: every session Postfix logged a TLSRPT event for is
  left to its datagram (collector.py, "Beside Postfix's own events"). A log that cannot be
  read for now is warned about and tried again at the next poll; the datagrams go on.
- SIGTERM or SIGINT stops it: the socket is removed first (Postfix then only logs that nobody
  receives), then everything received is written and (with `--log`) the log is read a last
  time, then the counts are printed (`--json`: one JSON object) and it exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mxguard.adapters.store import StoreError, default_store_url, open_store, state_folder
from mxguard.cli.output import emit_json, wants_json
from mxguard.config import ConfigError
from mxguard.engine.spool import ResultSpool
from mxguard.tlsrpt import datagram

if TYPE_CHECKING:
    from mxguard.tlsrpt.collector import Counts as LogCounts

log = logging.getLogger(__name__)
WARN_INTERVAL = 60.0  # seconds between two warnings about the same log read failure


def _mode(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r} is not a permission mode from 0000 to 0777")
    return mode


def _poll(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not (math.isfinite(value) and 0.05 <= value <= 3600):
        raise click.BadParameter(f"{value} is not a number of seconds from 0.05 to 3600")
    return value


def _warner() -> Callable[[Exception], None]:
    """Logs a failed log read: a new problem at once, the same one at most once a minute."""
    last: dict[str, float] = {}

    def warn(exc: Exception) -> None:
        text, now = str(exc), time.monotonic()
        if text in last and now - last[text] < WARN_INTERVAL:
            return
        last.clear()
        last[text] = now
        log.warning("the Postfix log was not read (trying again): %s", text)

    return warn


def _group(value: str | None) -> int | str | None:
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("the group is empty; give a group name or number")
    return int(value) if value.isdigit() else value


@click.command("collect")
@click.option("--socket", "socket_path", required=True, metavar="PATH",
              type=click.Path(dir_okay=False, path_type=Path),
              help="The datagram socket: Postfix's smtp_tlsrpt_socket_name, as an absolute "
                   "path (relative names in main.cf are under queue_directory).")  # fmt: skip
@click.option("--group", metavar="GROUP",
              help="Group of the socket, by name or number: the group of Postfix's "
                   "mail_owner (normally postfix).")  # fmt: skip
@click.option("--mode", default="0660", show_default=True, callback=_mode, metavar="OCTAL",
              help="Permissions of the socket.")  # fmt: skip
@click.option("--log", "log_file", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Postfix's log (maillog_file or syslog file): also record the sessions its "
                   "events leave out (plain text under MTA-STS testing).")  # fmt: skip
@click.option("--state", "state_file", metavar="FILE", type=click.Path(path_type=Path),
              help="With --log: where reading stopped (default: collect-postfix's for that "
                   "log, under $XDG_STATE_HOME/mxguard/).")  # fmt: skip
@click.option("--poll", type=float, default=1.0, show_default=True, callback=_poll,
              metavar="SECONDS", help="With --log: seconds between reads of the log.")  # fmt: skip
@click.option("--sending-ip", metavar="IP",
              help="With --log: Postfix's smtp_bind_address, for sending-mta-ip.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None,
              help="Print the final counts as JSON.")  # fmt: skip
@click.pass_context
def collect(
    ctx: click.Context,
    socket_path: Path,
    group: str | None,
    mode: int,
    log_file: Path | None,
    state_file: Path | None,
    poll: float,
    sending_ip: str | None,
    as_json: bool | None,
) -> None:
    """Record Postfix's own TLSRPT events (Postfix ≥ 3.10, smtp_tlsrpt_enable = yes) as
    TLS-RPT session results, until SIGTERM or Ctrl-C; then print what was received.

    With --log, also follow Postfix's log and record the sessions its events leave out: those
    in plain text under a report-only policy (MTA-STS testing), as starttls-not-supported.
    """
    from mxguard.cli import settings

    s = settings(ctx)
    gid = _group(group)
    path = socket_path.absolute()
    if log_file is None:
        given = [o for o, v in (("--state", state_file), ("--sending-ip", sending_ip)) if v]
        if given or ctx.get_parameter_source("poll") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"{', '.join(given) or '--poll'} needs --log FILE")

    def ready(receiver: datagram.DatagramReceiver) -> None:
        also = f"; reading {log_file} for what Postfix leaves out" if log_file else ""
        click.echo(
            f"mxguard tlsrpt collect: receiving on {receiver.socket_path}{also}; SIGTERM stops",
            err=True,
        )

    def on_signals() -> asyncio.Event:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return stop

    async def with_log(log_path: Path) -> tuple[datagram.Counts, LogCounts]:
        from mxguard.engine.context import engine
        from mxguard.tlsrpt.collector import Collector, EnginePolicies

        async with engine(s) as e:
            stop = on_signals()
            collector = Collector(
                log_path, e.store, EnginePolicies(e.resolver), state_path=state_file,
                sending_ip=sending_ip, supplement=True, learner=e.learner,
            )  # fmt: skip
            receiver = datagram.DatagramReceiver(path, e.store, mode=mode, group=gid,
                                                 spool=e.spool)  # fmt: skip
            async with receiver:
                ready(receiver)
                follower = asyncio.create_task(
                    collector.follow(stop, poll=poll, on_error=_warner(), last_read=True)
                )
                stopped = asyncio.create_task(stop.wait())
                # The follower ends only after `stop`, unless something unforeseen broke it.
                await asyncio.wait({follower, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            # The socket is gone and what it received written; the log's last read ends this.
            return receiver.counts, await follower

    async def work() -> datagram.Counts:
        store = await open_store(s.store or default_store_url())
        try:
            try:
                spool: ResultSpool | None = ResultSpool(state_folder() / "spool")
            except StoreError:
                spool = None  # no state folder: what the store refuses is only logged
            return await datagram.collect(
                path, store, stop=on_signals(), ready=ready, mode=mode, group=gid, spool=spool
            )
        finally:
            await store.close()

    log_counts: LogCounts | None = None
    try:
        if log_file is None:
            counts = asyncio.run(work())
        else:
            counts, log_counts = asyncio.run(with_log(log_file))
    except (ConfigError, StoreError, datagram.ReceiverError) as exc:
        raise click.UsageError(str(exc)) from None
    doc: dict[str, Any] = {"socket": str(path), **counts.to_json()}
    if log_counts is not None:
        doc["log"] = {"path": str(log_file), **log_counts.to_json()}
    if wants_json(ctx, as_json):
        emit_json(doc)
        return
    results = ", ".join(f"{n} {k}" for k, n in doc["results"].items()) or "none"
    click.echo(
        f"{path}: {counts.datagrams} datagram(s), {counts.events} event(s) ({results}); "
        f"{counts.written} result(s) written in {counts.batches} batch(es)"
    )
    for kind, n in doc["malformed"].items():
        click.echo(f"  {n} datagram(s) ignored: {kind}")
    if counts.dropped:
        click.echo(f"  {counts.dropped} result(s) dropped: too many waiting for the store")
    if log_counts is not None:
        results = ", ".join(f"{n} {k}" for k, n in doc["log"]["results"].items()) or "none"
        click.echo(
            f"{log_file}: {log_counts.lines} new line(s), {log_counts.sessions} session(s) "
            f"Postfix's events leave out ({results})"
        )
        for why, n in doc["log"]["dropped"].items():
            click.echo(f"  {n} session(s) not recorded from the log: {why}")
