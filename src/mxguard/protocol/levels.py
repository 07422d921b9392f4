"""Security levels a sender can see in one SMTP session, in order of strength.

Most receiving domains publish neither DANE (RFC 7672) nor MTA-STS (RFC 8461); for them the
only evidence of what a session ought to look like is what earlier sessions looked like. These
four levels name what a session achieved, weakest first:

- ``plain``: no TLS (STARTTLS not offered, refused, or the handshake failed);
- ``tls``: TLS, the certificate not authenticated (RFC 3207 §4.1 opportunistic TLS);
- ``webpki``: TLS with a certificate valid for the MX host name under the WebPKI (the check of
  RFC 8461 §4.2, made whether or not a policy asked for it);
- ``dane``: TLS authenticated by DNSSEC-signed TLSA records (RFC 7672 §3).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class SecurityLevel(enum.StrEnum):
    PLAIN = "plain"
    TLS = "tls"
    WEBPKI = "webpki"
    DANE = "dane"

    @property
    def rank(self) -> int:
        """0 (plain) to 3 (dane): a higher rank is stronger."""
        return _RANKS[self]

    @classmethod
    def from_rank(cls, rank: int) -> SecurityLevel:
        return _BY_RANK[rank]

    @property
    def encrypted(self) -> bool:
        return self is not SecurityLevel.PLAIN


_RANKS = {
    SecurityLevel.PLAIN: 0,
    SecurityLevel.TLS: 1,
    SecurityLevel.WEBPKI: 2,
    SecurityLevel.DANE: 3,
}
_BY_RANK = {rank: level for level, rank in _RANKS.items()}


def strongest(levels: Iterable[SecurityLevel]) -> SecurityLevel | None:
    """The strongest of ``levels``; None when there are none."""
    found = list(levels)
    return max(found, key=lambda lv: lv.rank) if found else None
