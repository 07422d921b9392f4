"""The lab's SMTP receivers: an MX host that accepts any mail (RFC 5321, STARTTLS per RFC 3207).

Each lab MX host is one ``SmtpReceiver`` on its own loopback address. It offers STARTTLS when
its scenario ``Host`` says so, presenting the certificate variant the scenario chose, but never
requires it: a receiver that insisted on TLS would hide exactly the downgrade the lab exists to
show. Every message it accepts is kept with the TLS state of the session that carried it, so a
test or the demo can tell whether the mail crossed the wire in plain text.

All receivers and attackers of a lab run in one asyncio event loop, so this module drives
aiosmtpd's ``SMTP`` protocol through ``loop.create_server`` rather than its threaded
``Controller``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mxguard.lab.pki import Identity
from mxguard.lab.scenario import Host

# How long stop() waits for a session handler to notice its connection is gone.
_STOP_GRACE = 2.0


@dataclass(frozen=True)
class ReceivedMessage:
    """One message accepted by a receiver, with how it travelled."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool  # RFC 3207: the session had completed STARTTLS before MAIL FROM
    tls_version: str | None  # e.g. "TLSv1.3"; None without TLS
    peer: str  # "ip:port" of the sending client
    received_at: dt.datetime  # UTC
    requiretls: bool = False  # MAIL FROM carried REQUIRETLS (RFC 8689 §2)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


DATA_SIZE_LIMIT = 35882577  # the SIZE of the STRIPTLS transcript in README.md


class _Handler:
    """aiosmtpd handler hooks: accept every recipient, keep every message."""

    def __init__(self, receiver: SmtpReceiver) -> None:
        self._receiver = receiver

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        # The EHLO reply of README.md's transcript (the one ISPs were caught stripping), so
        # that the lab, the demo and a real sender see what a real mail server says.
        session.host_name = hostname
        keywords = [f"{server.hostname} at your service", f"SIZE {DATA_SIZE_LIMIT}", "8BITMIME"]
        if "250-STARTTLS" in responses:  # offered only before TLS
            keywords.append("STARTTLS")
        if self._receiver.host.requiretls and session.ssl is not None:
            keywords.append("REQUIRETLS")  # RFC 8689 §2: only over TLS
        keywords += ["ENHANCEDSTATUSCODES", "PIPELINING", "SMTPUTF8"]
        return [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # A scenario can make the receiver refuse recipients (temporarily or for good); and
        # every lab receiver refuses local parts that say so, for mixed-recipient tests.
        refusal = self._receiver.host.rcpt_reply
        if refusal:
            return refusal
        local = address.partition("@")[0].lower()
        if local.startswith("unknown-"):
            return "550 5.1.1 no such user here"
        if local.startswith("busy-"):
            return "451 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        tls_version: str | None = None
        if session.ssl is not None:
            ssl_object = session.ssl.get("ssl_object")
            tls_version = ssl_object.version() if ssl_object is not None else None
        content = envelope.original_content or b""
        self._receiver.messages.append(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=content,
                tls=session.ssl is not None,
                tls_version=tls_version,
                peer=_peer_text(session.peer),
                received_at=dt.datetime.now(dt.UTC),
                requiretls=bool(getattr(envelope, "requiretls", False)),
            )
        )
        return "250 2.0.0 Message accepted for delivery"


class _LabSMTP(SMTP):
    """aiosmtpd's protocol, made to report its own lifetime to the receiver."""

    def __init__(self, receiver: SmtpReceiver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lab_receiver = receiver

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again with the TLS transport after STARTTLS; that is the same connection.
        if self.transport is None:
            receiver = self._lab_receiver
            receiver._live.add(self)
            receiver.max_open = max(receiver.max_open, len(receiver._live))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._lab_receiver._live.discard(self)
        super().connection_lost(error)

    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd knows no REQUIRETLS parameter: take it off before aiosmtpd parses the rest,
        # and only where it was offered (over TLS, on a host that offers it).
        requiretls = False
        if arg and self._lab_receiver.host.requiretls and self._tls_protocol is not None:
            words = arg.split(" ")
            kept = [w for w in words if w.upper() != "REQUIRETLS"]
            requiretls, arg = len(kept) != len(words), " ".join(kept)
        await super().smtp_MAIL(arg)
        if requiretls and self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.requiretls = True  # type: ignore[attr-defined]


class SmtpReceiver:
    """An SMTP server for one lab MX host, listening on ``address``:``port``.

    ``identity`` is required when ``host.starttls`` is true; it is the certificate and key the
    receiver presents after STARTTLS. ``port=0`` picks a free port (see ``port`` after start).
    """

    def __init__(self, host: Host, identity: Identity | None, address: str, port: int) -> None:
        if host.starttls and identity is None:
            raise ValueError(
                f"receiver for {host.name!r}: host.starttls is true, so an identity "
                "(certificate and key from LabPKI.issue) is required"
            )
        self.host = host
        self.identity = identity
        self.address = address
        self.port = port
        self.messages: list[ReceivedMessage] = []
        self.connections = 0  # TCP connections accepted since start (or clear())
        self.max_open = 0  # the most connections open at once since start (or clear())
        self._live: set[_LabSMTP] = set()
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        """Connections currently open."""
        return len(self._live)

    def _protocol(self) -> _LabSMTP:
        self.connections += 1
        tls_context = None
        if self.host.starttls and self.identity is not None:
            tls_context = self.identity.server_context()
        return _LabSMTP(
            self,
            handler=_Handler(self),
            hostname=self.host.name,  # the banner and the EHLO greeting name the host
            ident="ESMTP mxguard lab receiver",
            tls_context=tls_context,
            require_starttls=False,  # offered, never required: see the module docstring
            enable_SMTPUTF8=True,
            data_size_limit=DATA_SIZE_LIMIT,
            timeout=60,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        """Bind and start accepting connections in the running event loop."""
        if self._server is not None:
            raise RuntimeError(f"receiver for {self.host.name!r} is already running")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close open sessions and wait for their handlers to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = []
        for proto in list(self._live):
            if proto.transport is not None:
                proto.transport.close()
            if proto._handler_coroutine is not None:
                handlers.append(proto._handler_coroutine)
        if handlers:
            await asyncio.wait(handlers, timeout=_STOP_GRACE)
        await server.wait_closed()

    def clear(self) -> None:
        """Forget received messages and reset the connection count."""
        self.messages.clear()
        self.connections = 0
        self.max_open = 0


__all__ = ["ReceivedMessage", "SmtpReceiver"]
