"""`mxguard tlsrpt`: TLS reporting: record linting and aggregate reports (RFC 8460)."""

from __future__ import annotations

import click

from mxguard.cli.output import emit_lint
from mxguard.protocol import tlsrpt as tlsrpt_record


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
    ctx.exit(emit_lint("TLS-RPT record", fields, errors, warnings, as_json=as_json))
