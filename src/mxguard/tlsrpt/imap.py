"""Reading TLS report e-mails from an IMAP mailbox, for `mxguard tlsrpt fetch`.

Most domain owners point `rua=mailto:` (RFC 8460 §3) at an ordinary mailbox. This module
reads that mailbox over IMAP with implicit TLS (RFC 8314 §3.3, port 993; RFC 9051, or
IMAP4rev1 RFC 3501, as servers speak it), hands each message to the caller (who ingests its
reports, the same way `tlsrpt ingest` does) and files the message by the caller's answer:
into the done folder when its reports were read, into the failed folder when nothing in it
could be read, or not at all (it stays for the next run) when the caller could not finish.

- The server certificate is verified against the system's roots plus the configured CA file,
  for the host name given (RFC 8314, RFC 6125); the address is looked up through
  mxguard's resolver when one is configured, else the system's.
- Messages are found by UID (`UID SEARCH UNDELETED`), at most `max_messages` per run (the
  rest wait for the next), their size asked first (`RFC822.SIZE`) and only messages up to
  `max_size` downloaded, with `BODY.PEEK[]` (no \\Seen flag for a message left in place). A
  literal larger than that is refused while reading, whatever the server said before.
- Filing uses `UID MOVE` (RFC 6851) when the server offers MOVE, else `UID COPY`, `UID STORE
  +FLAGS.SILENT (\\Deleted)` and `UID EXPUNGE` (RFC 4315, UIDPLUS: only that message) or a
  plain `EXPUNGE` (the fallback RFC 6851 describes). Each message is filed as soon as it is
  handled, so a run that stops loses the filing of one message at most; the report inbox
  stores a resent report once, so a message handled twice does no harm. The folders are
  created when missing; their names are sent in modified UTF-7 (RFC 3501 §5.1.3).

The client is the standard library's `imaplib`, each command run in a worker thread
(`asyncio.to_thread`) with a socket timeout: it is maintained with Python, speaks TLS through
the `ssl` module mxguard configures everywhere else, and adds no dependency; a mailbox is
read one command at a time anyway. (The asyncio clients on PyPI are younger and less used;
IMAPClient is imaplib underneath.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import imaplib
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxguard.adapters.dns import DnsOutcome, DnsResolver
from mxguard.protocol.tlsrpt_ingest import MAX_MESSAGE_SIZE

DEFAULT_PORT = 993  # imaps: IMAP with implicit TLS (RFC 8314)
TIMEOUT = 60.0  # seconds per socket operation
MAX_MESSAGES = 200  # messages handled per run; the rest wait for the next
MAX_SIZE = MAX_MESSAGE_SIZE  # bytes of one message that are downloaded
DONE_FOLDER = "mxguard-done"
FAILED_FOLDER = "mxguard-failed"


class ImapError(Exception):
    """The mailbox could not be read or a message not filed. ``temporary``: a later run may
    succeed (network, server trouble); otherwise the settings are wrong (login, folder)."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


class Disposition(enum.StrEnum):
    """What becomes of a message once the caller has handled it."""

    DONE = "done"  # its reports were read: into the done folder
    FAILED = "failed"  # nothing in it could be read: into the failed folder
    KEEP = "kept"  # left where it is, for the next run


@dataclass(frozen=True, slots=True)
class Account:
    host: str  # the server's name (or address): what its certificate must name
    user: str
    password: str = field(repr=False)
    port: int = DEFAULT_PORT
    ca_file: Path | None = None  # trusted besides the system's roots
    timeout: float = TIMEOUT


@dataclass(frozen=True, slots=True)
class Folders:
    inbox: str = "INBOX"
    done: str = DONE_FOLDER
    failed: str = FAILED_FOLDER


@dataclass(frozen=True, slots=True)
class Message:
    """One message of the mailbox: its UID, its size, and its bytes (None: over the limit,
    not downloaded)."""

    uid: str
    size: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Filed:
    uid: str
    size: int
    disposition: Disposition
    folder: str | None  # where it went (None: kept)


@dataclass
class Run:
    """What one run did: each message handled, in order, and how many wait for the next."""

    server: str
    address: str | None = None
    move: str | None = None  # "move" (RFC 6851) or "copy-expunge"
    filed: list[Filed] = field(default_factory=list)
    left: int = 0  # messages beyond `max_messages`, for the next run


Handler = Callable[[Message], Awaitable[Disposition]]


def mailbox_name(name: str) -> str:
    """``name`` as an IMAP mailbox argument: modified UTF-7 (RFC 3501 §5.1.3), quoted."""
    if not name:
        raise ValueError("a folder name is empty")
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = base64.b64encode("".join(run).encode("utf-16-be")).decode("ascii")
            out.append("&" + raw.rstrip("=").replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    text = "".join(out)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_server(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` as (host, port)."""
    value = text.strip()
    port_text = ""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, e.g. [2001:db8::1]:993")
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host = value
    if not host:
        raise ValueError(f"{text!r} names no host")
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return host, port


def _ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


async def addresses(host: str, port: int, dns: DnsResolver | None) -> list[str]:
    """Where ``host`` is: itself when an address; through ``dns`` when mxguard has resolvers
    configured (A, then AAAA); else through the system (which reads /etc/hosts too)."""
    literal = _ip(host)
    if literal is not None:
        return [literal]
    if dns is not None:
        found: list[str] = []
        problems: list[str] = []
        for rdtype in ("A", "AAAA"):
            answer = await dns.query(host, rdtype)
            if answer.outcome is DnsOutcome.OK:
                found += [str(r.address) for r in answer.records]
            elif answer.failed:
                problems.append(answer.detail or f"the {rdtype} lookup failed")
        if not found:
            why = "; ".join(problems) or "it has no A or AAAA records"
            raise ImapError(f"cannot find the IMAP server {host}: {why}", temporary=True)
        return found
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImapError(f"cannot find the IMAP server {host}: {exc}", temporary=True) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the server for its name against the system's roots and ``ca_file``."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996: no TLS 1.0 or 1.1
    return ctx


class _Imaps(imaplib.IMAP4_SSL):
    """imaplib's IMAP over TLS, connecting to ``address`` while verifying the certificate for
    ``host``, and refusing any literal larger than ``max_literal`` bytes before reading it."""

    def __init__(
        self, host: str, address: str, port: int, ctx: ssl.SSLContext, timeout: float,
        max_literal: int,
    ) -> None:  # fmt: skip
        self._address = address
        self._max_literal = max_literal
        super().__init__(host, port, ssl_context=ctx, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), timeout)
        try:
            ctx: ssl.SSLContext = self.ssl_context
            return ctx.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def read(self, size: int) -> bytes:
        if size > self._max_literal:
            raise self.abort(
                f"the server sends {size:,} bytes at once; at most {self._max_literal:,} are read"
            )
        data: bytes = self.file.read(size)
        return data


def _ok(result: tuple[str, list[Any]], what: str) -> list[Any]:
    typ, data = result
    if typ != "OK":
        said = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
        raise imaplib.IMAP4.error(f"{what}: {typ} {said}".strip())
    return data


_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


class Mailbox:
    """One logged-in IMAP session; every call runs one command in a worker thread."""

    def __init__(self, conn: _Imaps, server: str, address: str) -> None:
        self._conn = conn
        self.server = server
        self.address = address
        self.capabilities: frozenset[str] = frozenset()

    @classmethod
    async def open(
        cls, account: Account, dns: DnsResolver | None, *, max_size: int = MAX_SIZE
    ) -> Mailbox:
        server = f"{account.host}:{account.port}"
        ctx = tls_context(account.ca_file)
        problems: list[str] = []
        for address in await addresses(account.host, account.port, dns):
            try:
                conn = await asyncio.to_thread(
                    _Imaps, account.host, address, account.port, ctx, account.timeout,
                    max_size + 1024,  # the literal of a whole message, and some slack
                )  # fmt: skip
            except ssl.SSLCertVerificationError as exc:
                raise ImapError(
                    f"the certificate of the IMAP server {server} [{address}] failed "
                    f"verification: {exc.verify_message}; it must be valid for {account.host} "
                    "and issued by a CA of the system or of --ca-file",
                    temporary=True,
                ) from None
            except (OSError, ssl.SSLError, imaplib.IMAP4.error) as exc:
                problems.append(f"[{address}]: {exc}")
                continue
            box = cls(conn, server, address)
            await box._login(account)
            return box
        raise ImapError(
            f"cannot connect to the IMAP server {server}: {'; '.join(problems)}", temporary=True
        )

    async def _login(self, account: Account) -> None:
        try:
            await asyncio.to_thread(self._conn.login, account.user, account.password)
        except imaplib.IMAP4.abort as exc:
            await self.close()
            raise ImapError(f"{self.server}: the connection broke at login: {exc}",
                            temporary=True) from None  # fmt: skip
        except (imaplib.IMAP4.error, UnicodeEncodeError) as exc:
            await self.close()
            raise ImapError(
                f"{self.server} refused the login of {account.user!r}: {exc}", temporary=False
            ) from None
        # The capabilities before login need not be those after it (RFC 9051 §6.2.3).
        data = await self._call(lambda: self._conn.capability(), "CAPABILITY")
        words = b" ".join(d for d in data if isinstance(d, bytes)).upper().split()
        self.capabilities = frozenset(w.decode("ascii", "replace") for w in words)

    async def _call(
        self, work: Callable[[], tuple[str, list[Any]]], what: str, *, refusal: str = ""
    ) -> list[Any]:
        """Run one command; ImapError when it fails. A refusal by the server (NO, BAD) is
        temporary unless ``refusal`` says what in the settings is wrong."""
        try:
            return _ok(await asyncio.to_thread(work), what)
        except imaplib.IMAP4.abort as exc:
            raise ImapError(f"{self.server}: {what}: the connection broke: {exc}",
                            temporary=True) from None  # fmt: skip
        except (OSError, ssl.SSLError) as exc:
            raise ImapError(f"{self.server}: {what}: {exc}", temporary=True) from None
        except imaplib.IMAP4.error as exc:
            if refusal:
                raise ImapError(f"{refusal}: {exc}", temporary=False) from None
            raise ImapError(f"{self.server}: {exc}", temporary=True) from None

    async def select(self, folder: str) -> None:
        await self._call(lambda: self._conn.select(mailbox_name(folder)), f"SELECT {folder}",
                         refusal=f"{self.server} cannot open the folder {folder!r}")  # fmt: skip

    async def ensure(self, folder: str) -> None:
        """Create ``folder`` unless it exists."""
        name = mailbox_name(folder)
        listed = await self._call(lambda: self._conn.list('""', name), f"LIST {folder}")
        if any(isinstance(d, bytes) for d in listed):
            return
        try:
            refusal = f"{self.server} cannot create the folder {folder!r}"
            await self._call(lambda: self._conn.create(name), f"CREATE {folder}", refusal=refusal)
        except ImapError as exc:
            if "ALREADYEXISTS" not in str(exc).upper():  # RFC 5530: created meanwhile
                raise

    async def uids(self) -> list[str]:
        """The UIDs of the messages not flagged \\Deleted, in ascending order."""
        data = await self._call(lambda: self._conn.uid("SEARCH", "UNDELETED"), "UID SEARCH")
        found = b" ".join(d for d in data if isinstance(d, bytes)).split()
        return sorted((u.decode("ascii") for u in found if u.isdigit()), key=int)

    async def sizes(self, uids: Sequence[str]) -> dict[str, int]:
        if not uids:
            return {}
        ids = ",".join(uids)
        data = await self._call(lambda: self._conn.uid("FETCH", ids, "(RFC822.SIZE)"),
                                "UID FETCH RFC822.SIZE")  # fmt: skip
        sizes: dict[str, int] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes):
                continue
            uid, size = _UID.search(line), _SIZE.search(line)
            if uid and size:
                sizes[uid.group(1).decode("ascii")] = int(size.group(1))
        return sizes

    async def body(self, uid: str) -> bytes | None:
        """The whole message ``uid`` (None when the server has no such message now)."""
        data = await self._call(lambda: self._conn.uid("FETCH", uid, "(BODY.PEEK[])"),
                                f"UID FETCH {uid} BODY.PEEK[]")  # fmt: skip
        for item in data:
            if isinstance(item, tuple) and len(item) == 2 and b"BODY[]" in item[0].upper():
                match = _UID.search(item[0])
                if match is None or match.group(1).decode("ascii") == uid:
                    return bytes(item[1])
        return None

    async def move(self, uid: str, folder: str) -> str:
        """File message ``uid`` into ``folder``; how ("move" or "copy-expunge")."""
        name = mailbox_name(folder)
        if "MOVE" in self.capabilities:
            await self._call(lambda: self._conn.uid("MOVE", uid, name), f"UID MOVE {uid}")
            return "move"
        # What a client does without MOVE (RFC 6851); UID EXPUNGE is RFC 4315 §2.1.
        await self._call(lambda: self._conn.uid("COPY", uid, name), f"UID COPY {uid}")
        await self._call(lambda: self._conn.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)"),
                         f"UID STORE {uid}")  # fmt: skip
        if "UIDPLUS" in self.capabilities:
            await self._call(lambda: self._conn.uid("EXPUNGE", uid), f"UID EXPUNGE {uid}")
        else:
            await self._call(lambda: self._conn.expunge(), "EXPUNGE")
        return "copy-expunge"

    async def close(self) -> None:
        with contextlib.suppress(imaplib.IMAP4.error, OSError, ssl.SSLError):
            await asyncio.to_thread(self._conn.logout)  # the session is over either way


async def fetch(
    account: Account,
    handle: Handler,
    *,
    folders: Folders = Folders(),
    dns: DnsResolver | None = None,
    max_messages: int = MAX_MESSAGES,
    max_size: int = MAX_SIZE,
    use_move: bool | None = None,
    run: Run | None = None,
) -> Run:
    """Hand each message of ``folders.inbox`` (oldest first, at most ``max_messages``) to
    ``handle`` and file it by its answer. ``handle`` gets ``data=None`` for a message over
    ``max_size`` bytes. An exception from ``handle`` stops the run: that message stays where
    it is, and the exception is raised after logout. ``use_move``: None, MOVE when offered;
    False, the COPY fallback (tests). ``run``: filled in as the run goes (so that a caller
    sees what was done when it stops with an exception); returned. ImapError when the mailbox
    cannot be read or a message cannot be filed."""
    run = run if run is not None else Run(f"{account.host}:{account.port}")
    box = await Mailbox.open(account, dns, max_size=max_size)
    run.address = box.address
    try:
        if use_move is False:
            box.capabilities = box.capabilities - {"MOVE"}
        await box.select(folders.inbox)
        for name in dict.fromkeys((folders.done, folders.failed)):
            await box.ensure(name)
        uids = await box.uids()
        run.left = max(0, len(uids) - max_messages)
        uids = uids[:max_messages]
        sizes = await box.sizes(uids)
        for uid in uids:
            size = sizes.get(uid, 0)
            data = await box.body(uid) if size <= max_size else None
            if data is None and size <= max_size:
                continue  # gone meanwhile (another client): nothing to file
            if data is not None and len(data) > max_size:
                data = None  # the server's size was wrong
            disposition = await handle(Message(uid, size or len(data or b""), data))
            folder: str | None = None
            if disposition is Disposition.DONE:
                folder = folders.done
            elif disposition is Disposition.FAILED:
                folder = folders.failed
            if folder is not None:
                run.move = await box.move(uid, folder)
            run.filed.append(Filed(uid, size, disposition, folder))
    finally:
        await box.close()
    return run


__all__ = [
    "DEFAULT_PORT",
    "DONE_FOLDER",
    "FAILED_FOLDER",
    "MAX_MESSAGES",
    "MAX_SIZE",
    "Account",
    "Disposition",
    "Filed",
    "Folders",
    "ImapError",
    "Mailbox",
    "Message",
    "Run",
    "addresses",
    "fetch",
    "mailbox_name",
    "parse_server",
    "tls_context",
]
