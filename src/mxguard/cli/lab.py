"""`mxguard lab`: run the simulated mail internet on loopback, list its scenarios, self-test.

Each command prints JSON with its own `--json` or with the global setting (`mxguard --json`,
`MXGUARD_JSON`, the config file's `json`).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from mxguard.cli.output import emit_json, wants_json
from mxguard.lab.scenario import Scenario, ScenarioError, builtin_names, named


@click.group()
def lab() -> None:
    """A simulated mail internet on loopback: DNSSEC, MTA-STS hosts, MX hosts, an attacker."""


@lab.command("scenarios")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def scenarios(ctx: click.Context, as_json: bool) -> None:
    """List the built-in scenarios and what each domain in them demonstrates."""
    found = [named(name) for name in builtin_names()]
    if wants_json(ctx, as_json):
        emit_json(
            [
                {
                    "scenario": s.name,
                    "description": s.description,
                    "domains": [
                        {"domain": d.name, "demonstrates": d.demonstrates or d.description}
                        for d in s.domains
                    ],
                }
                for s in found
            ]
        )
        return
    for s in found:
        click.echo(click.style(s.name, bold=True) + f" — {s.description}")
        for d in s.domains:
            click.echo(f"  {d.name:<24} {d.demonstrates or d.description}")


@lab.command("up")
@click.argument("scenario", default="standard")
@click.option("--net", default="127.77", show_default=True, help="Loopback /16 the lab uses.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep certificates, configs and logs here (default: a temporary folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def up(ctx: click.Context, scenario: str, net: str, workdir: Path | None, as_json: bool) -> None:
    """Run the lab in the foreground until Ctrl-C or SIGTERM."""
    from mxguard.lab.lab import Lab, LabError

    as_json = wants_json(ctx, as_json)
    scen = named_or_fail(scenario)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        the_lab = Lab(scen, workdir=workdir, net=net)
    except LabError as exc:
        raise click.BadParameter(str(exc), param_hint="--net") from None
    try:
        the_lab.start()
    except (LabError, OSError) as exc:
        raise click.ClickException(f"the lab did not start: {exc}") from None
    try:
        summary = the_lab.summary()
        if as_json:
            emit_json(summary)
        else:
            _print_summary(summary, time.monotonic() - started)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        the_lab.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not as_json:
        click.echo("lab stopped")


def named_or_fail(value: str) -> Scenario:
    try:
        return named(value)
    except ScenarioError as exc:
        raise click.BadParameter(str(exc), param_hint="SCENARIO") from None


def _print_summary(summary: dict[str, object], seconds: float) -> None:
    click.echo(
        click.style(f"mxguard lab: scenario {summary['scenario']}", bold=True)
        + f" (up in {seconds:.1f} s)"
    )
    click.echo(f"  resolver (Unbound, validating): {summary['resolver']}")
    click.echo(f"  lab CA file:                    {summary['ca_file']}")
    click.echo(f"  client config:                  {summary['config']}")
    click.echo(f"  try: mxguard --config {summary['config']} policy sts-enforce.test")
    click.echo("")
    for d in summary["domains"]:  # type: ignore[attr-defined]
        click.echo(f"  {d['domain']:<24} [{d['dnssec']:<8}] {d['demonstrates']}")
    click.echo("")
    click.echo("Ctrl-C or SIGTERM stops the lab.")


@lab.command("check")
@click.option("--net", default="127.78", show_default=True, help="Loopback /16 the lab uses.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def check(ctx: click.Context, net: str, as_json: bool) -> None:
    """Self-test: start the standard lab and check each kind of peer from the outside.

    Exit status: 0 every check passed, 1 some failed. JSON: ``ok``, ``passed``, ``failed``,
    ``seconds``, ``checks`` (``check``, ``ok``, ``detail``).
    """
    from mxguard.lab import check as lab_check
    from mxguard.lab import lab as lab_module

    started = time.monotonic()
    try:
        with lab_module.Lab(named("standard"), net=net) as the_lab:
            results = lab_check.run_checks(the_lab)
    except (lab_module.LabError, OSError) as exc:
        raise click.ClickException(f"the lab did not start: {exc}") from None
    failed = sum(not ok for _, ok, _ in results)
    seconds = time.monotonic() - started
    if wants_json(ctx, as_json):
        emit_json(
            {
                "ok": not failed,
                "passed": len(results) - failed,
                "failed": failed,
                "seconds": round(seconds, 3),
                "checks": [
                    {"check": name, "ok": ok, "detail": detail} for name, ok, detail in results
                ],
            }
        )
    else:
        for name, ok, detail in results:
            mark = click.style("ok  ", fg="green") if ok else click.style("FAIL", fg="red")
            click.echo(f"{mark} {name}" + (f" — {detail}" if detail else ""))
        click.echo(f"{len(results) - failed} passed, {failed} failed ({seconds:.1f} s)")
    sys.exit(1 if failed else 0)
