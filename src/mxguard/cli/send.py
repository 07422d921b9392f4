"""`mxguard send`: deliver one message to the recipients' MX hosts under policy."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import emit_json, wants_json
from mxguard.config import ConfigError
from mxguard.engine.context import engine
from mxguard.engine.deliver import (
    AddressError,
    DeliveryResult,
    DeliveryStatus,
    DomainResult,
    message_with_headers,
)
from mxguard.engine.message import CHUNK, Message, MessageError


@click.command("send")
@click.option("--from", "mail_from", required=True, metavar="ADDRESS", help="Envelope sender.")
@click.option("--to", "recipients", required=True, multiple=True, metavar="ADDRESS",
              help="Recipient (repeatable).")  # fmt: skip
@click.option("--data", metavar="FILE|-",
              help="The message (RFC 5322, headers included); '-' reads standard input. "
                   "Without it a short test message is sent.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show each presented chain and every problem in it.")  # fmt: skip
@click.pass_context
def send(
    ctx: click.Context,
    mail_from: str,
    recipients: tuple[str, ...],
    data: str | None,
    as_json: bool | None,
    verbose: bool,
) -> None:
    """Deliver one message to the recipients' MX hosts under their delivery policy.

    Exit status, over all recipients: 75 while any recipient is deferred (try those again
    later), else 69 if any failed for good, else 0 (every recipient has the message). The
    outcome of each recipient is printed, and is in --json "recipients".
    """
    from mxguard.cli import settings

    s = settings(ctx)
    with contextlib.ExitStack() as cleanup:
        message = _message(data, mail_from, recipients, cleanup)

        async def run() -> DeliveryResult:
            async with engine(s) as e:
                return await e.sender().deliver(mail_from, recipients, message)

        try:
            result = asyncio.run(run())
        except (ConfigError, StoreError) as exc:
            raise click.UsageError(str(exc)) from None
        except AddressError as exc:  # a bad --from: the caller's mistake, before any connection
            raise click.BadParameter(exc.problem, param_hint="--from") from None
    if wants_json(ctx, as_json):
        emit_json(result.to_json())
    else:
        for d in result.domains:
            render(d, verbose=verbose)
        click.echo(summary(result))
    ctx.exit(result.exit_code)


def _message(
    data: str | None, mail_from: str, recipients: tuple[str, ...], cleanup: contextlib.ExitStack
) -> Message:
    """The message to send, never whole in memory when it comes from a file or stdin."""
    if data is None:
        text = "A test message sent by mxguard under the recipient's policy."
        return Message.from_bytes(message_with_headers(mail_from, recipients, text))
    if data == "-":
        # Standard input can be read once; spooled to a file, it can be sent to every MX host.
        spool = cleanup.enter_context(tempfile.NamedTemporaryFile(prefix="mxguard-send-"))  # noqa: SIM115 - closed by the ExitStack
        shutil.copyfileobj(sys.stdin.buffer, spool, CHUNK)
        spool.flush()
        path, shown = Path(spool.name), "standard input"
    else:
        path, shown = Path(data), data
    try:
        return Message.from_file(path)
    except OSError as exc:
        raise click.BadParameter(f"{shown}: {exc.strerror}", param_hint="--data") from None
    except MessageError as exc:
        raise click.BadParameter(f"{shown}: {exc}", param_hint="--data") from None


_COLOURS = {
    DeliveryStatus.DELIVERED: "green",
    DeliveryStatus.DEFERRED: "yellow",
    DeliveryStatus.FAILED: "red",
}


# What each outcome means to the caller, per recipient.
_MEANING = {
    DeliveryStatus.DELIVERED: "",
    DeliveryStatus.DEFERRED: " (try again later)",
    DeliveryStatus.FAILED: " (for good, not retried)",
}

_EXIT_MEANING = {
    0: "every recipient has the message",
    75: "EX_TEMPFAIL: try the deferred recipients again later",
    69: "EX_UNAVAILABLE: nothing to try again; the failed recipients will not get it",
}


def render(d: DomainResult, *, verbose: bool = False) -> None:
    colour = _COLOURS[d.status]
    policy = f"{d.policy.source.value}/{d.policy.mode.value}" if d.policy else "—"
    click.echo(
        click.style(d.domain, bold=True)
        + f" (policy {policy}): "
        + click.style(d.status.value.upper(), fg=colour)
        + (f" — {d.detail}" if d.detail else "")
    )
    for address, status, reply in d.recipient_statuses():
        click.echo(
            f"  {address}: "
            + click.style(status.value.upper(), fg=_COLOURS[status])
            + _MEANING[status]
            + (f" — the server said: {reply}" if reply else "")
        )
    for a in d.attempts:
        tls = f"{a.tls_version} {a.cipher}" if a.tls_version else "no TLS"
        offered = {True: "offered", False: "NOT offered", None: "—"}[a.starttls]
        click.echo(f"  {a.mx} [{a.ip or '-'}] STARTTLS {offered}, {tls}, "
                   f"verified {a.verified or 'no'}")  # fmt: skip
        why = f"{a.result_type.value}: " if a.result_type else ""
        mark = click.style("delivered", fg="red" if a.plaintext else "green") if a.delivered else ""
        click.echo(f"    {mark + ' — ' if mark else ''}{why}{a.detail}")
        if a.smtp_reply:
            click.echo(f"    server said: {a.smtp_reply}")
        if verbose:
            # The same words as `mxguard cert verify` on the same chain.
            for position, c in enumerate(a.certificates):
                click.echo(f"    presented [{position}]: {c}")
            for problem in a.cert_problems:
                click.echo(click.style("    certificate problem: ", fg="red") + problem)


def summary(result: DeliveryResult) -> str:
    """The last line: how many recipients ended how, and the exit status that follows."""
    n = result.counts()
    total = sum(n.values())
    return (
        f"{total} recipient{'s' if total != 1 else ''}: "
        f"{n[DeliveryStatus.DELIVERED]} delivered, {n[DeliveryStatus.DEFERRED]} deferred, "
        f"{n[DeliveryStatus.FAILED]} failed for good; exit status {result.exit_code} "
        f"({_EXIT_MEANING[result.exit_code]})"
    )
