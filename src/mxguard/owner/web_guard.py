"""What keeps the listeners of `mxguard serve reports` usable under abuse (docs/reports.md).

An https `rua` is an address anyone may POST to (RFC 8460 §5.4), and the dashboard beside it
shows what strangers wrote. This module holds the defences that do not depend on what a
request means:

- `Gate` and `guarded_protocol`: every accepted connection is counted, in all and per client
  address (an IPv4 address, an IPv6 /64), *before* its TLS handshake, so that a flood of
  connections costs one refusal each rather than one handshake each. An admitted connection
  gets a deadline for its first request head and a lifetime it never outlives: uvicorn has
  neither, and a client that sends a byte a minute would otherwise keep its connection for
  ever.
- `TokenBuckets`: request rates per client address, in a table of bounded size.
- `Authenticator`: the dashboard's credentials, a bearer token (RFC 6750 §2.1) or an HTTP
  basic user (RFC 7617) whose password is kept only as a scrypt hash (RFC 7914); compared in
  constant time, scrypt run off the event loop and one at a time, so that guessing costs the
  guesser more than the server. `hash_password` makes the hash for the config file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable, Collection
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_ADDRESSES = 65_536  # entries of each per-address table


def address_key(address: str) -> str:
    """The unit per-address limits count in: an IPv4 address, or the /64 of an IPv6 one (one
    subscriber's share: a host with a /64 has 2**64 addresses to rotate through). An IPv4
    address mapped into IPv6 is the IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# --------------------------------------------------------------------------- rates


class TokenBuckets:
    """A token bucket per key: `burst` requests at once, then `rate` per second. The table
    keeps the `max_entries` keys used last; a key dropped from it starts full again."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_entries: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_entries = max_entries
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when there was one, else the seconds until there
        will be (nothing is taken then)."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_entries:
            self._buckets.popitem(last=False)
        return wait

    def available(self, key: str) -> bool:
        """Whether `key` has a token now (nothing is taken)."""
        tokens, at = self._buckets.get(key, (self.burst, self._clock()))
        return min(self.burst, tokens + (self._clock() - at) * self.rate) >= 1.0

    def __len__(self) -> int:
        return len(self._buckets)


class Counts:
    """How many of something each key holds now (connections, requests in flight)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self.total = 0

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def add(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        self.total += 1

    def remove(self, key: str) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)
        self.total -= 1

    def __len__(self) -> int:
        return len(self._counts)


# --------------------------------------------------------------------------- connections


@dataclass(frozen=True, slots=True)
class GateLimits:
    """Bounds on the connections of one listener."""

    max_connections: int = 4096  # open at once, handshaking ones included
    per_address: int = 16  # open at once from one client address (address_key)
    head_timeout: float = 10.0  # seconds from accepting to the first complete request head
    lifetime: float = 60.0  # seconds a connection lives at most, whatever it does
    handshake_timeout: float = 10.0  # seconds for the TLS handshake


class Gate:
    """The door of one listener: admits a connection, or refuses it before anything else
    happens to it (no TLS handshake, no HTTP parsing). `events(listener, what, reason)` is
    told about every refusal ("refused"), deadline ("timeout") and failed handshake
    ("handshake"), for the metrics."""

    def __init__(
        self,
        name: str,
        limits: GateLimits,
        *,
        tls: Callable[[], ssl.SSLContext] | None,
        events: Callable[[str, str, str], None],
        exempt: Collection[str] = (),
    ) -> None:
        self.name = name
        self.limits = limits
        self.tls = tls
        self.exempt = frozenset(exempt)  # addresses without a per-address limit (proxies)
        self._events = events
        self.connections = Counts()
        self.handshakes: set[asyncio.Task[None]] = set()

    @property
    def open(self) -> int:
        return self.connections.total

    def admit(self, peer: object) -> str | None:
        """The address key a new connection from `peer` (a socket address) counts under, or
        None: refused (the caller closes it)."""
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        key = address_key(str(host))
        if self.connections.total >= self.limits.max_connections:
            self.event("refused", "capacity")
            return None
        if key not in self.exempt and self.connections.get(key) >= self.limits.per_address:
            self.event("refused", "per-address")
            return None
        self.connections.add(key)
        return key

    def release(self, key: str) -> None:
        self.connections.remove(key)

    def event(self, what: str, reason: str) -> None:
        self._events(self.name, what, reason)

    def abort_handshakes(self) -> None:
        for task in list(self.handshakes):
            task.cancel()


class _LeanSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS layer with a smaller read buffer. The standard one allocates (and zeroes)
    256 KiB for every connection, which is 512 MB for 2,000 connections that send a byte a
    second; 32 KiB holds two full TLS records (RFC 8446 §5.1: at most 16 KiB of plaintext
    each)."""

    max_size = 32 * 1024


async def start_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> asyncio.Transport:
    """The server side of a TLS handshake on an accepted `transport`, as
    `loop.start_tls(..., server_side=True)` does it, with `_LeanSSLProtocol`; the TLS
    transport that `protocol` is then to be given (its connection_made is not called)."""
    waiter = loop.create_future()
    tls = _LeanSSLProtocol(
        loop, protocol, context, waiter, server_side=True, call_connection_made=False,
        ssl_handshake_timeout=math.ceil(handshake_timeout),  # typeshed wants an int
    )  # fmt: skip
    # Paused first, so that nothing is read before the TLS layer has the transport.
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    return tls._app_transport


def guarded_protocol(gate: Gate) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol behind `gate`: admitted or closed at once, TLS (when the gate
    has a context) after admission, a head deadline and a lifetime."""

    class Guarded(H11Protocol):
        _key: str | None = None
        _raw: asyncio.Transport | None = None
        _started = False
        _early: list[bytes] | None = None
        _head_timer: asyncio.TimerHandle | None = None
        _life_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            key = gate.admit(transport.get_extra_info("peername"))
            if key is None:
                transport.abort()
                return
            self._key = key
            self._raw = transport
            limits = gate.limits
            self._head_timer = self.loop.call_later(limits.head_timeout, self._expire, "head")
            self._life_timer = self.loop.call_later(limits.lifetime, self._expire, "lifetime")
            if gate.tls is None:
                self._start(transport)
                return
            # Nothing may be read before the TLS layer takes the transport over.
            transport.pause_reading()
            task = self.loop.create_task(self._handshake(transport, gate.tls()))
            gate.handshakes.add(task)
            task.add_done_callback(gate.handshakes.discard)

        async def _handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
            try:
                tls = await start_tls(self.loop, raw, self, context, gate.limits.handshake_timeout)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError):
                gate.event("handshake", "failed")
                raw.abort()
                self._done()
                return
            except asyncio.CancelledError:
                raw.abort()
                self._done()
                raise
            if tls is None or self._key is None:
                raw.abort()
                self._done()
                return
            self._start(tls)

        def _start(self, transport: asyncio.Transport) -> None:
            self._started = True
            super().connection_made(transport)
            early, self._early = self._early, None
            for data in early or ():
                self.data_received(data)

        def data_received(self, data: bytes) -> None:
            if not self._started:
                # The TLS layer hands over what arrived with the end of the handshake
                # before start_tls returns: keep it for when the connection is set up.
                if self._key is not None:
                    self._early = [*(self._early or []), data]
                return
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not None:
                self._head_timer.cancel()  # a request head arrived in time
                self._head_timer = None

        def send_400_response(self, msg: str) -> None:
            gate.event("refused", "malformed")  # uvicorn answers it; the app never sees it
            super().send_400_response(msg)

        def connection_lost(self, exc: Exception | None) -> None:
            self._done()
            if self._started:
                super().connection_lost(exc)

        def _done(self) -> None:
            for timer in (self._head_timer, self._life_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._life_timer = None
            if self._key is not None:
                gate.release(self._key)
                self._key = None

        def _expire(self, why: str) -> None:
            if why == "head":
                self._head_timer = None
            else:
                self._life_timer = None
            gate.event("timeout", why)
            log.info("%s: dropping a connection from %s: %s deadline", gate.name, self.client, why)
            if self._raw is not None:
                # abort, not close: a TLS close would wait for the peer's close_notify.
                self._raw.abort()

    return Guarded


# --------------------------------------------------------------------------- authentication


class AuthConfigError(ValueError):
    """A credential setting cannot be used; the message says which and why."""


SCRYPT_N = 2**15  # RFC 7914 §2 CPU/memory cost: 32 MiB and some 90 ms per check
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 256 * 1024 * 1024
MIN_TOKEN = 20  # characters of a bearer token at least
MAX_CREDENTIALS = 4096  # characters of an Authorization header read at most


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A scrypt password hash: ``scrypt$N$r$p$SALT$KEY`` (SALT and KEY in base64)."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (
            f"scrypt${self.n}${self.r}${self.p}${b64(self.salt).decode()}${b64(self.key).decode()}"
        )

    def matches(self, password: bytes) -> bool:
        """Whether `password` has this hash (slow by design; compared in constant time)."""
        derived = hashlib.scrypt(
            password, salt=self.salt, n=self.n, r=self.r, p=self.p, maxmem=_SCRYPT_MAXMEM,
            dklen=len(self.key),
        )  # fmt: skip
        return hmac.compare_digest(derived, self.key)


def hash_password(password: str, *, n: int = SCRYPT_N, salt: bytes | None = None) -> PasswordHash:
    """The scrypt hash of `password` with a new random salt, for the config file."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )  # fmt: skip
    return PasswordHash(n, SCRYPT_R, SCRYPT_P, salt, key)


def parse_password_hash(text: str) -> PasswordHash:
    """A `PasswordHash` from its text; AuthConfigError says what is wrong with it."""
    parts = text.strip().split("$")
    usage = "expected scrypt$N$r$p$SALT$KEY as `mxguard serve reports --hash-password` prints"
    if len(parts) != 6 or parts[0] != "scrypt":
        raise AuthConfigError(f"the password hash is not in the right form; {usage}")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise AuthConfigError(
            f"the password hash has a part that does not decode; {usage}"
        ) from None
    if n < 2**10 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise AuthConfigError(
            f"the password hash has N={n}, r={r}, p={p}; N must be a power of two from 1024 "
            "to 1048576, r from 1 to 32 and p from 1 to 16"
        )
    if 128 * n * r * p > _SCRYPT_MAXMEM // 2:
        raise AuthConfigError("the password hash asks for too much memory per check")
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise AuthConfigError("the password hash's salt or key is too short")
    return PasswordHash(n, r, p, salt, key)


def read_token(path: os.PathLike[str] | str) -> str:
    """The bearer token in a file (its first line, stripped); AuthConfigError if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIALS + 1)
    except OSError as exc:
        raise AuthConfigError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    try:
        token = data.decode("ascii").splitlines()[0].strip() if data.strip() else ""
    except UnicodeDecodeError:
        raise AuthConfigError(f"the token file {path} is not ASCII text") from None
    if len(token) < MIN_TOKEN or len(token) > MAX_CREDENTIALS or not token.isprintable():
        raise AuthConfigError(
            f"the token in {path} must be {MIN_TOKEN} to {MAX_CREDENTIALS} printable characters "
            "(e.g. `openssl rand -base64 32`)"
        )
    if " " in token:
        raise AuthConfigError(f"the token in {path} contains a space; a bearer token has none")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning("the token file %s can be read by other users: chmod 600 it", path)
    return token


class Authenticator:
    """The dashboard's credentials: a bearer token, an HTTP basic user with a scrypt hash,
    both, or neither (then everything is allowed: a loopback dashboard).

    Checks run in constant time. A basic password is checked with scrypt in a worker thread,
    one check at a time and at most `max_waiting` waiting (further requests are refused
    without a check); a header that passed is remembered (by its SHA-256) for `remember`
    seconds, so that a browser's every request does not cost a scrypt run."""

    def __init__(
        self,
        *,
        token: str | None = None,
        user: str | None = None,
        password_hash: PasswordHash | None = None,
        remember: float = 600.0,
        max_waiting: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (user is None) != (password_hash is None):
            raise AuthConfigError("HTTP basic authentication needs both a user and a password hash")
        if user is not None and (not user or ":" in user or not user.isprintable()):
            raise AuthConfigError("the dashboard user name must be printable and without ':'")
        self._token = hashlib.sha256(token.encode()).digest() if token else None
        self._user = user.encode("utf-8") if user else None
        self._hash = password_hash
        self._remember = remember
        self._max_waiting = max_waiting
        self._clock = clock
        self._passed: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._checking: asyncio.Semaphore | None = None
        self._waiting = 0

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._hash is not None

    def replace_token(self, token: str | None) -> None:
        """A new bearer token (SIGHUP re-reads the token file); remembered passes are forgotten."""
        self._token = hashlib.sha256(token.encode()).digest() if token else None
        self._passed.clear()

    def challenges(self) -> list[str]:
        """The WWW-Authenticate values of a 401 (RFC 9110 §11.6.1)."""
        out = []
        if self._hash is not None:
            out.append('Basic realm="mxguard reports", charset="UTF-8"')
        if self._token is not None:
            out.append('Bearer realm="mxguard reports"')
        return out

    async def verify(self, header: str | None) -> bool | None:
        """True: `header` (an Authorization value) holds valid credentials; False: it does
        not; None: not checked now (too many checks waiting; answer 503)."""
        if not self.enabled:
            return True
        if not header or len(header) > MAX_CREDENTIALS:
            return False
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "bearer" and self._token is not None:
            given = hashlib.sha256(value.encode("utf-8", "replace")).digest()
            return hmac.compare_digest(given, self._token)
        if scheme != "basic" or self._hash is None or self._user is None:
            return False
        digest = hashlib.sha256(header.encode("utf-8", "replace")).digest()
        now = self._clock()
        until = self._passed.get(digest)
        if until is not None and until > now:
            return True
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        user, colon, password = decoded.partition(b":")
        if not colon:
            return False
        if self._waiting >= self._max_waiting:
            return None
        if self._checking is None:
            self._checking = asyncio.Semaphore(1)
        self._waiting += 1
        try:
            async with self._checking:
                ok = await asyncio.to_thread(self._hash.matches, password)
        finally:
            self._waiting -= 1
        # The user is compared after the password, so the time taken says nothing of it.
        ok = hmac.compare_digest(user, self._user) and ok
        if ok:
            self._passed[digest] = now + self._remember
            while len(self._passed) > 64:
                self._passed.popitem(last=False)
        return ok


__all__ = [
    "MAX_ADDRESSES",
    "AuthConfigError",
    "Authenticator",
    "Counts",
    "Gate",
    "GateLimits",
    "PasswordHash",
    "TokenBuckets",
    "address_key",
    "guarded_protocol",
    "hash_password",
    "parse_password_hash",
    "read_token",
]
