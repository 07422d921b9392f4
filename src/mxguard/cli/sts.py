"""`mxguard sts`: MTA-STS linting: records, policies and MX matching (RFC 8461)."""

from __future__ import annotations

import click


@click.group()
def sts() -> None:
    """MTA-STS linting: records, policies and MX matching (RFC 8461)."""
