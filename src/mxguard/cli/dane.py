"""`mxguard dane`: DANE for SMTP: match certificate chains against TLSA records (RFC 7672)."""

from __future__ import annotations

import click


@click.group()
def dane() -> None:
    """DANE for SMTP: match certificate chains against TLSA records (RFC 7672)."""
