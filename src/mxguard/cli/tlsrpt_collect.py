"""`mxguard tlsrpt collect --socket PATH`: receive Postfix ≥ 3.10's own TLSRPT events.

Postfix 3.10 built with libtlsrpt (`smtp_tlsrpt_enable = yes`) sends one datagram per TLS
handshake (or refusal to go on without one) to `smtp_tlsrpt_socket_name`; this command binds
that socket and records each event as a session result in the store, exactly like the results
mxguard's own sender records (tlsrpt/datagram.py). `mxguard tlsrpt run` reports them.

- The socket is created with `--mode` (0660) and `--group`: Postfix's smtp(8) processes send
  as `mail_owner` (`postconf -h mail_owner`, normally `postfix`), so give its group write
  access. A stale socket at the path is replaced, a live one is an error.
- Results the store refuses wait in the result spool (`$XDG_STATE_HOME/mxguard/spool/`), as
  for `mxguard send`, and move into the store with a later write.
- SIGTERM or SIGINT stops it: the socket is removed first (Postfix then only logs that nobody
  receives), then everything received is written, then the counts are printed (`--json`: one
  JSON object) and it exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from mxguard.adapters.store import StoreError, default_store_url, open_store, state_folder
from mxguard.cli.output import emit_json, wants_json
from mxguard.config import ConfigError
from mxguard.engine.spool import ResultSpool
from mxguard.tlsrpt import datagram


def _mode(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r} is not a permission mode from 0000 to 0777")
    return mode


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
@click.option("--json", "as_json", is_flag=True, default=None,
              help="Print the final counts as JSON.")  # fmt: skip
@click.pass_context
def collect(
    ctx: click.Context, socket_path: Path, group: str | None, mode: int, as_json: bool | None
) -> None:
    """Record Postfix's own TLSRPT events (Postfix ≥ 3.10, smtp_tlsrpt_enable = yes) as
    TLS-RPT session results, until SIGTERM or Ctrl-C; then print what was received."""
    from mxguard.cli import settings

    s = settings(ctx)
    gid = _group(group)
    path = socket_path.absolute()

    async def work() -> datagram.Counts:
        store = await open_store(s.store or default_store_url())
        try:
            try:
                spool: ResultSpool | None = ResultSpool(state_folder() / "spool")
            except StoreError:
                spool = None  # no state folder: what the store refuses is only logged
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)

            def ready(receiver: datagram.DatagramReceiver) -> None:
                click.echo(
                    f"mxguard tlsrpt collect: receiving on {receiver.socket_path}; SIGTERM stops",
                    err=True,
                )

            return await datagram.collect(
                path, store, stop=stop, ready=ready, mode=mode, group=gid, spool=spool
            )
        finally:
            await store.close()

    try:
        counts = asyncio.run(work())
    except (ConfigError, StoreError, datagram.ReceiverError) as exc:
        raise click.UsageError(str(exc)) from None
    doc: dict[str, Any] = {"socket": str(path), **counts.to_json()}
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
