"""`mxguard sts`: MTA-STS linting: records, policies and MX matching (RFC 8461).

Thin front end over `mxguard.protocol.mtasts`: each command prints a lint verdict with
`emit_lint` and exits 0 when valid, 1 when invalid (2 for usage errors, from click). JSON comes
with each command's own `--json` or with the global setting (`mxguard --json`, `MXGUARD_JSON`).
"""

from __future__ import annotations

from typing import Any, BinaryIO

import click

from mxguard.cli.output import emit_lint, wants_json
from mxguard.protocol import mtasts, names

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
