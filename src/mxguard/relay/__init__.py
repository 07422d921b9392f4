"""`mxguard relay`: a local SMTP relay that queues durably and delivers under mxguard's policy.

An MTA without DANE, MTA-STS, the policy list or TLS-RPT (Exim, sendmail, OpenSMTPD, an
appliance, an application) hands its outgoing mail to this relay as its smarthost; the relay
accepts a message only once it is durable in the queue (``queue``), then delivers it with
``Sender.deliver()`` under the recipient domains' policies, retrying deferred recipients with
back-off and jitter until the message's lifetime runs out, and returning a delivery status
notification (RFC 3464, ``dsn``) to the envelope sender for recipients that fail for good.

- ``listener``: the SMTP server (aiosmtpd), with STARTTLS, AUTH only over TLS, REQUIRETLS
  (RFC 8689) and the ``TLS-Required: No`` header field;
- ``queue``: the queue in SQLite or PostgreSQL, with a lease per claimed delivery so that
  several nodes share one PostgreSQL queue and a dead node's work goes to the others;
- ``worker``: the scheduler that claims due work, bounded per destination domain;
- ``dsn``: the bounce messages.

See docs/relay.md.
"""
