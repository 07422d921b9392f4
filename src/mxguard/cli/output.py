"""Rendering shared by the command-line front ends: lint results and JSON on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import click

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_PERMANENT = 69  # EX_UNAVAILABLE
EXIT_DEFERRED = 75  # EX_TEMPFAIL


def wants_json(ctx: click.Context, as_json: bool | None) -> bool:
    """Whether to print JSON: the command's own ``--json``, or the global setting (``--json``
    before the command, ``MXGUARD_JSON``, the config file's ``json``), as every command must
    honour (docs/design.md, "Global options")."""
    from mxguard.cli import settings  # the group module imports this one

    return bool(as_json or settings(ctx).json)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def emit_lint(
    what: str,
    fields: Mapping[str, Any],
    errors: Sequence[str],
    warnings: Sequence[str],
    *,
    as_json: bool,
) -> int:
    """Print a lint verdict and return the exit code: 0 valid, 1 invalid.

    JSON form (the contract of every lint command): ``{"valid": bool, **fields, "errors": [...],
    "warnings": [...]}``.
    """
    valid = not errors
    if as_json:
        emit_json({"valid": valid, **fields, "errors": list(errors), "warnings": list(warnings)})
    else:
        verdict = click.style("valid", fg="green") if valid else click.style("INVALID", fg="red")
        click.echo(f"{what}: {verdict}")
        for key, value in fields.items():
            if value is None or value == [] or value == {}:
                continue
            shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
            click.echo(f"  {key}: {shown}")
        for e in errors:
            click.echo(click.style("  error: ", fg="red") + e)
        for w in warnings:
            click.echo(click.style("  warning: ", fg="yellow") + w)
    return EXIT_OK if valid else EXIT_INVALID
