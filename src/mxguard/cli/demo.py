"""`mxguard demo`: a STRIPTLS attacker against every defence, side by side.

Thin front end over ``mxguard.demo``: start a lab of its own (on its own loopback /16, so it
can run next to `mxguard lab up`), run the acts, render the EHLO comparison and one table per
act with rich, or everything as JSON. Exit status 0 when every row behaved as a secure sender
must, 1 when one did not, 2 on usage errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mxguard.cli.output import emit_json
from mxguard.demo import DEFAULT_NET, Act, ActResult, DemoResult, EhloComparison, MessageFate, Row

_OUTCOME_STYLE = {
    MessageFate.LEAKED: "bold red",
    MessageFate.REFUSED_LEAKED: "bold red",
    MessageFate.PLAIN: "red",
    MessageFate.REFUSED: "green",
    MessageFate.REPORTED: "yellow",
    MessageFate.VERIFIED: "bold green",
    MessageFate.UNVERIFIED: "yellow",
}


def _net(ctx: click.Context, param: click.Parameter, value: str) -> str:
    first, _, second = value.partition(".")
    if first != "127" or not second.isdigit() or int(second) > 255:
        raise click.BadParameter(f"{value!r} is not a loopback /16: use '127.N', N from 0 to 255")
    return value


@click.command("demo")
@click.option("--net", default=DEFAULT_NET, show_default=True, callback=_net,
              help="Loopback /16 the demo's own lab uses, as 127.N.")  # fmt: skip
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the lab's certificates, configs and logs here (default: a temporary folder).",
)
@click.option("--act", "acts", multiple=True, type=click.Choice([a.value for a in Act]),
              help="Run only these acts (repeatable; default: all, in order).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def demo(
    ctx: click.Context, net: str, workdir: Path | None, acts: tuple[str, ...], as_json: bool | None
) -> None:
    """Show what a STRIPTLS attacker reads, and what each defence stops.

    Starts a simulated mail internet on loopback (DNSSEC, MTA-STS policy hosts, MX hosts with
    an attacker in front of each), sends a message with a password line to one domain per
    defence, and reports what the attacker, the receivers and the sender saw. Global options
    other than --json are ignored: the demo points mxguard at its own lab.
    """
    from mxguard import demo as logic
    from mxguard.adapters.store import StoreError
    from mxguard.cli import settings
    from mxguard.config import ConfigError
    from mxguard.lab.lab import LabError

    chosen = [Act(a) for a in dict.fromkeys(acts)] or list(Act)
    order = list(Act)
    chosen.sort(key=order.index)
    try:
        result = logic.run(net=net, workdir=workdir, acts=chosen)
    except (LabError, logic.DemoError, ConfigError, StoreError, OSError) as exc:
        raise click.ClickException(f"the demo could not run: {exc}") from None
    if as_json or settings(ctx).json:
        emit_json(result.to_json())
    else:
        # On a terminal rich fits the table to it; in a pipe or file nothing wraps lines.
        width = None if sys.stdout.isatty() else 132
        render(result, Console(highlight=False, width=width))
    ctx.exit(result.exit_code)


def render(result: DemoResult, console: Console) -> None:
    render_ehlo(result.ehlo, console)
    for act in result.acts:
        console.print()
        console.print(act_table(act))
    console.print()
    if result.ok:
        console.print(
            f"[bold green]Every defence behaved as a secure sender must[/] "
            f"({result.seconds:.1f} s). Without a policy, the attacker reads the mail."
        )
    else:
        console.print("[bold red]Some rows did NOT behave as a secure sender must:[/]")
        for act in result.acts:
            for row in act.rows:
                if not row.ok:
                    console.print(f"  {act.act.value} / {row.defence} ({row.domain}): {row.why}")


def render_ehlo(ehlo: EhloComparison, console: Console) -> None:
    console.print(f"[bold]The EHLO reply of {ehlo.host}[/], straight from it and through the "
                  "attacker:")  # fmt: skip
    # README.md's transcript style: one line each, labels padded to the same width.
    console.print(Text("honest:   " + ehlo.honest), soft_wrap=True)
    console.print(Text("stripped: " + ehlo.stripped, style="red"), soft_wrap=True)


def act_table(act: ActResult) -> Table:
    table = Table(title=act.title, title_justify="left", title_style="bold")
    table.add_column("defence")
    table.add_column("policy applied", no_wrap=True)
    table.add_column("outcome")
    table.add_column("result type", no_wrap=True)
    table.add_column("attacker read\nthe password")
    table.add_column("receiver got it")
    table.add_column("ok")
    for row in act.rows:
        table.add_row(*_cells(row))
    return table


def _cells(row: Row) -> tuple[str | Text, ...]:
    defence = Text(row.defence)
    defence.append("\n" + row.domain, style="dim")
    policy = row.policy + ("\n(cached)" if row.policy_cached else "")
    if row.received:
        got = Text(f"yes, {row.received_tls}" if row.received_tls else "yes, IN PLAIN TEXT")
        got.stylize("green" if row.received_tls else "red")
    else:
        got = Text("no")
    read = Text("YES", style="bold red") if row.attacker_read_password else Text("no", "green")
    named = (row.result_type,) if row.result_type else ()
    types = "\n".join(dict.fromkeys((*named, *row.reported))) or "—"
    ok = Text("✓", style="green") if row.ok else Text("✗", style="bold red")
    outcome = Text(row.outcome.value, style=_OUTCOME_STYLE[row.outcome])
    return defence, policy, outcome, types, read, got, ok
