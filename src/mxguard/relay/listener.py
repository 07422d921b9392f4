"""The relay's SMTP listener (aiosmtpd): accepts a message only once the queue has it.

- Who may relay: a client on a trusted network (loopback by default) or one that
  authenticated. AUTH (PLAIN, LOGIN; RFC 4954) is offered only after STARTTLS and refused in
  plain text (538 5.7.11), so a password never crosses the wire unencrypted.
- DATA is answered 250 only after the queue committed the message (durable); if the queue
  cannot take it the client hears 451 and keeps the message. A message the relay could never
  send (a line over 998 octets, RFC 5322 §2.1.1; too many Received fields, a loop) is refused
  with 5xx at once, never accepted and bounced later.
- REQUIRETLS (RFC 8689 §2) is advertised over TLS, and on loopback (where no one sits on the
  path); ``MAIL FROM:<...> REQUIRETLS`` marks the message. ``TLS-Required: No`` in the header
  section (RFC 8689 §3) marks it the other way; REQUIRETLS wins when both are present.
- Every reply to bad input is an SMTP error reply: aiosmtpd bounds command lines and message
  size (SIZE, 552), and recipients are bounded per message (452, RFC 5321 §4.5.3.1.8).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mxguard.adapters.smtp import address_problem
from mxguard.adapters.store import StoreError
from mxguard.engine.message import Message, MessageError
from mxguard.engine.resolve import normalise_domain
from mxguard.relay.queue import NewMessage, RelayQueue

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 1000
MAX_RECEIVED = 50  # Received fields beyond which a message is taken for a loop (RFC 5321 §6.3)
DEFAULT_MAX_SIZE = 35 * 1024 * 1024
LOOPBACK = ("127.0.0.0/8", "::1/128")
_AUTH_LIMIT = 5  # AUTH commands per session (then the session is closed)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthFileError(ValueError):
    """The AUTH file cannot be used; the message says which line and what is expected."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """An AUTH file entry's secret: ``scrypt$N$r$p$SALT$HASH`` (base64), never the password."""
    salt = salt or secrets.token_bytes(16)
    n, r, p = 2**14, 8, 1
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def _verify(secret: str, password: bytes) -> bool:
    try:
        kind, n, r, p, salt, digest = secret.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(
            password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def load_auth_file(path: Path) -> dict[str, str]:
    """``USER:SECRET`` lines (``mxguard relay password USER`` makes one); # starts a comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthFileError(f"{path}: {exc.strerror}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        if not sep or not user or not secret.startswith("scrypt$") or secret.count("$") != 5:
            raise AuthFileError(
                f"{path} line {number}: expected USER:scrypt$... as `mxguard relay password "
                "USER` prints it (passwords are never stored in clear)"
            )
        users[user] = secret
    return users


@dataclass
class ListenerConfig:
    hostname: str  # our name in the banner, EHLO reply and Received fields
    trusted: Sequence[Network] = field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in LOOPBACK]
    )
    tls: ssl.SSLContext | None = None
    users: dict[str, str] = field(default_factory=dict)
    max_size: int = DEFAULT_MAX_SIZE
    timeout: float = 300.0


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the REQUIRETLS MAIL parameter (aiosmtpd does not know it)."""

    def __init__(self, config: ListenerConfig, handler: RelayHandler) -> None:
        super().__init__(
            handler,
            hostname=config.hostname,
            ident="ESMTP mxguard relay",
            tls_context=config.tls,
            require_starttls=False,
            data_size_limit=config.max_size,
            enable_SMTPUTF8=True,
            timeout=config.timeout,
            auth_required=False,
            auth_require_tls=True,  # RFC 4954 §6: 538 5.7.11, no credentials in plain text
            authenticator=handler.authenticate if config.users else None,
            auth_exclude_mechanism=() if config.users else ("LOGIN", "PLAIN"),
            command_call_limit={"AUTH": _AUTH_LIMIT, "*": 10_000},
            loop=asyncio.get_running_loop(),
        )
        self.relay_handler = handler

    @property
    def encrypted(self) -> bool:
        return self._tls_protocol is not None

    def requiretls_offered(self) -> bool:
        return self.encrypted or self.relay_handler.loopback(self.session)

    async def smtp_MAIL(self, arg: str | None) -> None:
        requiretls = False
        if arg:
            words = arg.split(" ")
            kept = [w for w in words if w.upper() != "REQUIRETLS"]
            if len(kept) != len(words):
                if not self.requiretls_offered():
                    await self.push("555 5.5.4 REQUIRETLS is offered only after STARTTLS")
                    return
                requiretls, arg = True, " ".join(kept)
        await super().smtp_MAIL(arg)
        if requiretls and self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.requiretls = True  # type: ignore[attr-defined]


class RelayHandler:
    """aiosmtpd handler hooks of the relay."""

    def __init__(
        self,
        config: ListenerConfig,
        queue: RelayQueue,
        *,
        on_queued: Callable[[str], None] = lambda _id: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.queue = queue
        self.on_queued = on_queued
        self.clock = clock
        self.accepted = 0

    def protocol(self) -> RelaySMTP:
        return RelaySMTP(self.config, self)

    # --- who may relay ----------------------------------------------------------------------

    def _peer_ip(self, session: Session | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        peer = getattr(session, "peer", None)
        host = peer[0] if isinstance(peer, tuple) and peer else "0.0.0.0"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return ipaddress.ip_address("0.0.0.0")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    def loopback(self, session: Session | None) -> bool:
        return self._peer_ip(session).is_loopback

    def trusted(self, session: Session | None) -> bool:
        ip = self._peer_ip(session)
        return any(ip.version == n.version and ip in n for n in self.config.trusted)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = data.login.decode("utf-8", "replace")
        secret = self.config.users.get(user)
        # Unknown users cost as much as known ones: the answer must not tell them apart.
        ok = _verify(secret or hash_password("x", salt=b"0" * 16), data.password)
        if not (ok and secret is not None):
            log.warning("relay: failed AUTH for %r from %s", user[:64], self._peer_ip(session))
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)

    # --- hooks ------------------------------------------------------------------------------

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        if server.requiretls_offered():
            last = responses.pop()
            responses += ["250-" + last[4:], "250 REQUIRETLS"]
        return responses

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        if not (self.trusted(session) or session.authenticated):
            how = "AUTH after STARTTLS" if self.config.tls and self.config.users else None
            return "530 5.7.0 relaying denied: " + (
                f"authenticate ({how})" if how else "connect from a trusted network"
            )
        if address == "<>":
            address = ""  # the null reverse-path (RFC 5321 §4.5.5)
        problem = address_problem(address)
        if problem is None and address and not _mailbox(address):
            problem = "not a mailbox (local-part@domain)"
        if problem is not None:
            return f"553 5.1.7 sender address refused: {problem}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        if options:
            return "555 5.5.4 RCPT TO parameters are not supported here"
        problem = address_problem(address)
        if problem is None and not _mailbox(address):
            problem = "not a mailbox (local-part@domain)"
        if problem is not None:
            return f"553 5.1.3 recipient address refused: {problem}"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 too many recipients: at most {MAX_RECIPIENTS} per message"
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if isinstance(content, str):  # not with decode_data=False; for the type checker
            content = content.encode("utf-8", "surrogateescape")
        try:
            Message.from_bytes(content)
        except MessageError as exc:
            return f"550 5.6.0 message refused: {exc}"
        header = _header_section(content)
        if len(re.findall(rb"(?im)^received:", header)) > MAX_RECEIVED:
            return f"554 5.4.6 message refused: more than {MAX_RECEIVED} Received fields (a loop)"
        requiretls = bool(getattr(envelope, "requiretls", False))
        tls_optional = not requiretls and _tls_required_no(header)
        data = self._received(server, session) + content
        message = NewMessage(
            mail_from=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            data=data,
            requiretls=requiretls,
            tls_optional=tls_optional,
            client=f"{self._peer_ip(session)} {session.host_name or ''}".strip(),
        )
        try:
            message_id = await self.queue.add(message, self.clock())
        except StoreError as exc:
            log.error("relay: cannot queue a message from %s: %s", message.client, exc)
            return "451 4.3.0 the queue cannot take the message now; try again later"
        self.accepted += 1
        self.on_queued(message_id)
        return f"250 2.0.0 Ok: queued as {message_id}"

    def _received(self, server: RelaySMTP, session: Session) -> bytes:
        """A Received field (RFC 5321 §4.4), with the protocol name of RFC 3848."""
        proto = "ESMTP" + ("S" if server.encrypted else "") + ("A" if session.authenticated else "")
        helo = "".join(c for c in (session.host_name or "unknown") if c.isprintable())[:200]
        date = email.utils.formatdate(self.clock(), localtime=False)
        return (
            f"Received: from {helo} ([{self._peer_ip(session)}])\r\n"
            f"\tby {self.config.hostname} (mxguard relay) with {proto}; {date}\r\n"
        ).encode("utf-8", "replace")


def _mailbox(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    try:
        normalise_domain(domain)
    except ValueError:
        return False
    return True


def _header_section(data: bytes) -> bytes:
    m = re.search(rb"\r?\n\r?\n", data)
    return data[: m.start()] if m else data


def _tls_required_no(header: bytes) -> bool:
    """The header section has ``TLS-Required: No`` (RFC 8689 §3; the value is
    case-insensitive, folding allowed)."""
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header)
    return any(
        m.group(1).strip().lower() == b"no"
        for m in re.finditer(rb"(?im)^tls-required[ \t]*:(.*)$", unfolded)
    )
