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

__version__ = "0.1.0"
