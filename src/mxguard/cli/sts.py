"""`mxguard sts`: MTA-STS linting (records, policies, MX matching) and publishing (RFC 8461).

The lint commands are a thin front end over `mxguard.protocol.mtasts`: each prints a lint
verdict with `emit_lint` and exits 0 when valid, 1 when invalid (2 for usage errors, from
click). `sts publish` is the front end of `mxguard.owner.publish` (docs/publish.md). JSON comes
with each command's own `--json` or with the global setting (`mxguard --json`, `MXGUARD_JSON`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, BinaryIO

import click

from mxguard.adapters import https
from mxguard.cli.output import (
    EXIT_DEFERRED,
    EXIT_INVALID,
    EXIT_OK,
    emit_json,
    emit_lint,
    wants_json,
)
from mxguard.engine.resolve import DomainError, normalise_domain
from mxguard.owner import publish as publishing
from mxguard.protocol import mtasts, names, pkix

# Senders cap the policy body they fetch (RFC 8461 §3.3 suggests 64 KiB); a bigger file is read
# anyway, to say what is wrong with it, up to this much.
POLICY_SIZE_LIMIT = 64 * 1024
_READ_LIMIT = 1024 * 1024

_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def sts() -> None:
    """MTA-STS linting: records, policies and MX matching (RFC 8461)."""


@sts.command("check-record")
@click.argument("text")
@_json_option
@click.pass_context
def check_record(ctx: click.Context, text: str, as_json: bool) -> None:
    """Lint an `_mta-sts` TXT record, e.g. 'v=STSv1; id=20240501T000000'."""
    fields, errors, warnings = mtasts.lint_record(text)
    ctx.exit(
        emit_lint("MTA-STS record", fields, errors, warnings, as_json=wants_json(ctx, as_json))
    )


def _read_policy(stream: BinaryIO) -> tuple[str | None, list[str], list[str]]:
    """The policy text from `stream`, with read errors and size warnings."""
    data = stream.read(_READ_LIMIT + 1)
    if len(data) > _READ_LIMIT:
        return None, [f"the policy is larger than {_READ_LIMIT} bytes; not read"], []
    warnings = []
    if len(data) > POLICY_SIZE_LIMIT:
        warnings.append(
            f"the policy is {len(data)} bytes; senders refuse bodies over {POLICY_SIZE_LIMIT}"
        )
    try:
        return data.decode("utf-8"), [], warnings
    except UnicodeDecodeError as exc:
        return None, [f"the policy is not UTF-8 text: {exc}"], warnings


@sts.command("check-policy")
@click.argument("policy_file", metavar="FILE|-", type=click.File("rb"))
@_json_option
@click.pass_context
def check_policy(ctx: click.Context, policy_file: BinaryIO, as_json: bool) -> None:
    """Lint an MTA-STS policy body (the content of .well-known/mta-sts.txt)."""
    text, errors, warnings = _read_policy(policy_file)
    fields: dict[str, Any] = {}
    if text is not None:
        fields, errors, lint_warnings = mtasts.lint_policy(text)
        warnings += lint_warnings
    ctx.exit(
        emit_lint("MTA-STS policy", fields, errors, warnings, as_json=wants_json(ctx, as_json))
    )


@sts.command("match")
@click.argument("policy_file", metavar="POLICYFILE", type=click.File("rb"))
@click.argument("host")
@_json_option
@click.pass_context
def match(ctx: click.Context, policy_file: BinaryIO, host: str, as_json: bool) -> None:
    """Say whether MX HOST is allowed by a policy, and which pattern matched (RFC 8461 §4.1)."""
    text, errors, warnings = _read_policy(policy_file)
    fields: dict[str, Any] = {"host": host, "matched": None}
    try:
        names.normalise_host(host)
    except names.HostNameError as exc:
        raise click.BadParameter(
            f"{host[:80]!r} is not a host name: {exc}", param_hint="HOST"
        ) from None
    if text is not None:
        try:
            policy = mtasts.parse_policy(text)
        except mtasts.PolicyError as exc:
            errors = [f"the policy is invalid: {e}" for e in exc.errors]
        else:
            pattern = policy.matching_pattern(host)
            fields.update({"matched": pattern, "mode": policy.mode.value, "mx": list(policy.mx)})
            if pattern is None:
                shown = ", ".join(policy.mx) or "none"
                errors.append(f"{host} matches no mx pattern of the policy (patterns: {shown})")
            if policy.mode is mtasts.Mode.NONE:
                warnings.append("the policy's mode is 'none': senders do not enforce it")
            # mxguard matches these (it removes the dot); other senders may not: say so here,
            # and `sts check-policy` calls the policy invalid.
            for dotted in mtasts.trailing_dot_patterns(policy):
                warnings.append(mtasts.trailing_dot_problem(dotted))
    ctx.exit(emit_lint("MTA-STS match", fields, errors, warnings, as_json=wants_json(ctx, as_json)))


_PUBLISH_EXIT = {
    publishing.Status.WRITTEN: EXIT_OK,
    publishing.Status.REFUSED: EXIT_INVALID,
    publishing.Status.DEFERRED: EXIT_DEFERRED,
}


@sts.command("publish")
@click.argument("domain")
@click.option("--mode", type=click.Choice([m.value for m in mtasts.Mode]), default="testing",
              show_default=True,
              help="testing first; enforce once the domain passes; none to withdraw the "
                   "policy (RFC 8461 §8.3).")  # fmt: skip
@click.option("--max-age", type=click.IntRange(0, mtasts.MAX_AGE_LIMIT), metavar="SECONDS",
              help="max_age of the policy. Default: 86400 (testing, none), 1209600 "
                   "(enforce: two weeks).")  # fmt: skip
@click.option("--mx", "patterns", multiple=True, metavar="PATTERN",
              help="An mx pattern (host or *.domain); repeatable. Default: the domain's MX "
                   "hosts as DNS lists them now.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True,
              help="Write DIR/<domain>/.well-known/mta-sts.txt (serve it with `mxguard serve "
                   "mta-sts --root DIR`).")  # fmt: skip
@click.option("--force", is_flag=True,
              help="Write an enforce policy although the check found blockers.")  # fmt: skip
@_json_option
@click.pass_context
def publish(
    ctx: click.Context,
    domain: str,
    mode: str,
    max_age: int | None,
    patterns: tuple[str, ...],
    out: Path,
    force: bool,
    as_json: bool,
) -> None:
    """Write DOMAIN's MTA-STS policy and print the TXT record that announces it.

    The policy lists the domain's MX hosts (or the --mx patterns); the record's id is derived
    from the policy, so it changes exactly when the policy does. --mode enforce first checks
    the domain as `mxguard check` does and refuses while a compliant sender would refuse honest
    mail under the new policy (MX hosts not covered, no STARTTLS, certificates failing WebPKI),
    unless --force. --mode none withdraws the policy and says until when it and the TXT
    record must stay (RFC 8461 §8.3).

    Exit status: 0 written; 1 refused (blockers, or a domain that takes no mail); 75 the MX
    lookup failed (try again); 2 usage error.
    """
    from mxguard.cli import settings

    s = settings(ctx)
    try:
        name = normalise_domain(domain)
        https.policy_host(name)
    except (DomainError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="DOMAIN") from None
    request = publishing.PublishRequest(
        domain=name, mode=mtasts.Mode(mode), max_age=max_age, patterns=patterns, out=out,
        force=force,
    )  # fmt: skip
    try:
        result = asyncio.run(publishing.publish(s, request))
    except (publishing.PublishError, pkix.CaFileError) as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write the policy under {out}: {exc}") from None
    if wants_json(ctx, as_json):
        emit_json(result.to_json())
    else:
        _render_publication(result)
    ctx.exit(_PUBLISH_EXIT[result.status])


def _render_publication(p: publishing.Publication) -> None:
    if p.error is not None:
        click.echo(click.style("not published: ", fg="red") + p.error, err=True)
        return
    assert p.policy is not None and p.id is not None
    if p.status is publishing.Status.WRITTEN:
        click.echo(f"wrote {p.policy_path} (mode {p.mode.value}, id {p.id}):")
    else:
        click.echo(click.style("REFUSED", fg="red") + f": {p.mode.value} policy for {p.domain}:")
    for line in p.policy.to_text().split("\r\n")[:-1]:
        click.echo(f"    {line}")
    if p.blockers:
        title = "blockers" if p.status is publishing.Status.REFUSED else "blockers (forced)"
        click.echo(click.style(f"{title}:", fg="red"))
        for b in p.blockers:
            click.echo(f"  - {b}")
    elif p.blockers is not None:
        click.echo(click.style("no blockers: ", fg="green") + "every MX host passes enforce")
    if p.status is publishing.Status.WRITTEN:
        click.echo("TXT record:")
        click.echo(f"    {publishing.txt_line(p.domain, p.id)}")
    if p.safe_to_remove_at is not None:
        when = p.safe_to_remove_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        click.echo(click.style("safe to remove: ", fg="yellow") + when)
    for note in p.notes:
        click.echo(f"  * {note}")
    for w in p.warnings:
        click.echo(click.style("  warning: ", fg="yellow") + w)
