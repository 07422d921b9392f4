"""`mxguard tlsrpt`: TLS reporting: record linting and aggregate reports (RFC 8460)."""

from __future__ import annotations

import click


@click.group()
def tlsrpt() -> None:
    """TLS reporting: record linting and aggregate reports (RFC 8460)."""
