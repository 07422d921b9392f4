"""mxguard: server-to-server e-mail that an on-path attacker cannot downgrade to plain text.

Layers (data flows down, never back up):

- ``mxguard.protocol``: pure parsing, validation and matching (MTA-STS, DANE, TLS-RPT,
  static policy lists, local rules). No I/O.
- ``mxguard.adapters``: DNS with DNSSEC status, the HTTPS policy fetch, the STARTTLS SMTP
  client and the state store. They do I/O and return typed results.
- ``mxguard.engine``: ``resolve()`` decides the delivery policy of a domain; ``deliver()``
  enforces it on live SMTP sessions.
- front ends: the ``mxguard`` command line, the Postfix policy server, the lab and the demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mxguard.config import Settings
    from mxguard.engine.deliver import DeliveryResult


async def deliver(
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    *,
    settings: Settings | None = None,
) -> DeliveryResult:
    """Deliver one message to the recipients' MX hosts under their delivery policy.

    ``settings`` (``mxguard.config.Settings``, or ``mxguard.config.load(path)``) says which
    resolver, CA file, store, static list and local rules to use; by default the system
    resolver and the default SQLite store. The result says, per recipient domain, whether the
    message was delivered, deferred or failed, and every attempt with its RFC 8460 result type.
    A sender address that cannot go into MAIL FROM raises ``mxguard.engine.deliver.AddressError``
    (a ``ValueError``) before any connection is made.
    """
    from mxguard.config import Settings
    from mxguard.engine.context import engine

    async with engine(settings or Settings()) as e:
        return await e.sender().deliver(mail_from, recipients, data)
