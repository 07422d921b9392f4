"""Postfix's own TLS-RPT events: libtlsrpt's datagrams, received on a UNIX datagram socket.

Postfix ≥ 3.10 built with libtlsrpt (Debian 13's is) reports the TLS outcome of its SMTP
sessions itself when `smtp_tlsrpt_enable = yes`: for each new TLS handshake (or refusal to
proceed without one) to a domain that publishes a TLS-RPT record (RFC 8460 §3), its smtp(8)
process sends one datagram to `smtp_tlsrpt_socket_name`. `collect()` receives them and records
each as the same durable `SessionResult` that mxguard's own sender records (engine/deliver.py),
in batches, through the result spool when the store refuses a write.

The datagram, as libtlsrpt writes it (libtlsrpt.c) and Postfix fills it (tlsrpt_wrapper.c,
smtp_tlsrpt.c): one JSON object, no newline or NUL after it, of a few hundred bytes (the
largest part is the server's EHLO reply). Texts are JSON strings, but bytes from 0x80 up are
copied unescaped, so they are UTF-8 only if Postfix's input was. Members:

- `dpv`: the datagram protocol version, the string "1". libtlsrpt 0.5.0rc1 (Debian 13's
  libtlsrpt0) predates the member and sends none; its layout is otherwise that of version 1,
  so a datagram without `dpv` is read as version 1. Any other value is refused.
- `d`: the domain whose TLS-RPT record Postfix found: the recipient domain (Postfix's next
  hop), in A-label form. It is the `policy-domain` mxguard stores and reports under.
- `pr`: that record's text (`v=TLSRPTv1; rua=…`); its `rua` is where the report goes.
- `policies`: a list of policies (libtlsrpt allows several; Postfix sends exactly one), each:
  - `policy-type`: 1 = `tlsa`, 2 = `sts`, 9 = `no-policy-found`;
  - `policy-domain` (optional): for `sts` the `policy_domain` the policy map answered; for
    `tlsa` the TLSA base domain, which is the MX host's name, not the recipient domain;
  - `policy-string` (optional): the MTA-STS policy's lines, or each TLSA record as
    "usage selector type HEX" with upper-case hex (stored in mxguard's lower-case form);
  - `mx-host` (optional): the MTA-STS policy's `mx` patterns;
  - `failure-details` (optional): a list of objects with `c`, the result type as a number
    (201 starttls-not-supported, 202 certificate-host-mismatch, 203 certificate-not-trusted,
    204 certificate-expired, 205 validation-failure, 301 sts-policy-fetch-error,
    302 sts-policy-invalid, 303 sts-webpki-invalid, 304 tlsa-invalid, 305 dnssec-invalid,
    306 dane-required), and optionally `s` the sending IP, `n` the receiving MX host's
    name, `h` its EHLO reply (Postfix: the whole reply, codes included, lines joined with
    CRLF), `r` its IP, `a` additional information and `f` a failure reason code;
  - `t`: how many failure details there are; `f`: the final result, 0 success, 1 failure.

A success names no failure details, hence no MX host and no addresses: Postfix does not say
which MX host a successful session went to, and such a result has `receiving_mx` None.
Postfix reports nothing for sessions whose TLS was optional and did not happen (STARTTLS
missing or refused under `may`, or under `dane` for a domain without TLSA records; so an
MTA-STS `testing` domain whose STARTTLS is stripped is never reported: `tlsrpt collect
--log` records those sessions from Postfix's log, collector.py), and nothing at all for
domains without a TLS-RPT record. A DANE certificate that no TLSA record matches is reported
by Postfix as certificate-not-trusted (203); it is recorded as validation-failure, the result
type mxguard's own sender and its log collector give the same session, so that one session
counts the same whichever of them saw it.

Parsing (`parse_datagram`) is pure and total: a datagram of more than MAX_DATAGRAM bytes, one
that is not such an object, a member of the wrong type, an unknown code, an invalid domain
or address, more than MAX_POLICIES policies or MAX_ITEMS list entries: each is returned as a
`DatagramError` saying what is wrong; nothing raises. Unknown members are ignored (a later
libtlsrpt may add some within version 1). The receiver counts malformed datagrams by kind and
logs them, at most one warning per LOG_INTERVAL seconds (with how many were not logged).

The socket. Postfix's smtp(8) processes send as its `mail_owner` (user `postfix`), so that
user must be able to write to the socket: the receiver creates it with `mode` (default 0660)
and, given `group`, that group (e.g. `postfix`); 0666 is fine in a folder only Postfix and
the receiver can enter. A stale socket at the path (nobody receiving) is replaced; a live one,
or any other kind of file, is an error. The socket is removed when the receiver stops.
libtlsrpt sends without blocking: what arrives while the receiver is not running, or while
the socket's buffer is full, is lost (Postfix logs a warning), so keep the receiver running
before Postfix starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import grp
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxguard.adapters.store import SessionLog, SessionResult, StoreError, check_result
from mxguard.engine import spool as result_spool
from mxguard.engine.spool import ResultSpool
from mxguard.protocol import dane, names
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt import TlsRptRecordError, parse_record
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "1"
MAX_DATAGRAM = 65536  # bytes; Postfix's are well under 2 KiB
MAX_POLICIES = 16  # per datagram (Postfix sends one)
MAX_ITEMS = 1000  # entries of one list: policy strings, MX patterns, failure details
MAX_TEXT = 8192  # characters of one text member
BATCH_SIZE = 200  # results per store write
FLUSH_INTERVAL = 1.0  # seconds a result may wait for its batch to fill
MAX_PENDING = 100_000  # results waiting for the store; beyond that new ones are dropped
LOG_INTERVAL = 60.0  # seconds between two warnings about malformed datagrams
RECEIVE_BUFFER = 1 << 20  # SO_RCVBUF asked for: room for bursts while a batch is written

POLICY_TYPES = {1: PolicyType.TLSA, 2: PolicyType.STS, 9: PolicyType.NO_POLICY_FOUND}
RESULT_TYPES = {
    201: ResultType.STARTTLS_NOT_SUPPORTED,
    202: ResultType.CERTIFICATE_HOST_MISMATCH,
    203: ResultType.CERTIFICATE_NOT_TRUSTED,
    204: ResultType.CERTIFICATE_EXPIRED,
    205: ResultType.VALIDATION_FAILURE,
    301: ResultType.STS_POLICY_FETCH_ERROR,
    302: ResultType.STS_POLICY_INVALID,
    303: ResultType.STS_WEBPKI_INVALID,
    304: ResultType.TLSA_INVALID,
    305: ResultType.DNSSEC_INVALID,
    306: ResultType.DANE_REQUIRED,
}


# Under a `tlsa` policy, what Postfix reports for a certificate that no TLSA record matches.
_DANE_AS_VALIDATION_FAILURE = frozenset({ResultType.CERTIFICATE_NOT_TRUSTED})


class DatagramError(ValueError):
    """Why a datagram is not a TLSRPT event; `kind` names the class of problem (for counts):
    "too-large", "empty", "not-json", "version", "invalid" (a member missing, of the wrong
    type or with a value that cannot be), "limit" (too many entries or characters); the
    receiver adds "unstorable" for an event whose result the store would refuse."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DatagramError) and (self.kind, self.reason) == (
            other.kind,
            other.reason,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.reason))


@dataclass(frozen=True, slots=True)
class DatagramFailure:
    """One `failure-details` entry: what went wrong in the session, and with whom."""

    result_type: ResultType
    sending_ip: str | None = None
    receiving_mx: str | None = None  # lower-case A-label, no trailing dot
    receiving_ehlo: str | None = None  # the server's EHLO reply as Postfix passed it
    receiving_ip: str | None = None
    additional_information: str | None = None
    failure_reason_code: str | None = None

    @property
    def receiving_helo(self) -> str | None:
        """The name the server announced: the first word of its EHLO reply (after the reply
        code, which Postfix leaves in), as mxguard's own sender records it."""
        if not self.receiving_ehlo:
            return None
        first = self.receiving_ehlo.splitlines()[0]
        if len(first) >= 4 and first[:3].isdigit() and first[3] in " -":
            first = first[4:]
        words = first.split()
        return words[0] if words else None


@dataclass(frozen=True, slots=True)
class DatagramPolicy:
    """One `policies` entry: the policy the session was made under and its outcome."""

    policy_type: PolicyType
    policy_domain: str | None = None
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()
    failures: tuple[DatagramFailure, ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.failures)


@dataclass(frozen=True, slots=True)
class Event:
    """One datagram: one SMTP session's TLS outcome, as Postfix reported it."""

    version: str | None  # "1", or None: the datagram had no `dpv` (libtlsrpt 0.5.0rc1)
    domain: str  # `d`: the recipient domain, lower-case A-label
    policy_record: str  # `pr`: the domain's TLS-RPT record
    rua: tuple[str, ...]  # from `pr`; () when it has none mxguard can use
    policies: tuple[DatagramPolicy, ...]

    def results(self, at: dt.datetime, *, is_report: bool = False) -> list[SessionResult]:
        """The session results to store: one per policy (Postfix: one per datagram), with
        the first failure's details when the session failed."""
        out = []
        for p in self.policies:
            first = p.failures[0] if p.failures else None
            detail = ["Postfix TLSRPT"]
            result_type = first.result_type if first else None
            if p.policy_type is PolicyType.TLSA and result_type in _DANE_AS_VALIDATION_FAILURE:
                # A certificate no TLSA record matches: Postfix 3.10 says certificate-not-
                # trusted; mxguard's own sender and the log collector say validation-failure
                # (RFC 8460 §4.3.1: DANE has no certificate authority whose trust failed).
                detail.append(f"Postfix reported {result_type.value}")
                result_type = ResultType.VALIDATION_FAILURE
            if first is not None:
                if first.failure_reason_code:
                    detail.append(f"failure reason: {first.failure_reason_code}")
                if first.additional_information:
                    detail.append(first.additional_information)
                others = [f.result_type.value for f in p.failures[1:]]
                if others:
                    detail.append(f"also reported: {', '.join(others)}")
            out.append(
                SessionResult(
                    id=None,
                    at=at,
                    policy_domain=self.domain,
                    policy=ReportedPolicy(p.policy_type, p.policy_strings, p.mx_patterns, self.rua),
                    result_type=result_type,
                    sending_ip=first.sending_ip if first else None,
                    receiving_mx=first.receiving_mx if first else None,
                    receiving_ip=first.receiving_ip if first else None,
                    receiving_helo=first.receiving_helo if first else None,
                    detail="; ".join(detail),
                    is_report=is_report,
                    reported=None,
                )
            )
        return out


# --- parsing ---------------------------------------------------------------------------------


def parse_datagram(data: bytes) -> Event | DatagramError:
    """The event in one datagram, or a DatagramError saying why it is none. Never raises."""
    try:
        return _parse(data)
    except DatagramError as exc:
        return exc
    except Exception as exc:  # a bug here must cost one datagram, never the receiver
        return DatagramError("invalid", f"cannot be read ({type(exc).__name__}: {exc})")


def _parse(data: bytes) -> Event:
    if len(data) > MAX_DATAGRAM:
        raise DatagramError(
            "too-large", f"{len(data)} bytes, more than the {MAX_DATAGRAM} a datagram may have"
        )
    # Bytes from 0x80 up arrive as libtlsrpt copied them: keep undecodable ones as surrogates
    # (written as escapes in texts, refused in names).
    text = data.decode("utf-8", "surrogateescape").strip()
    if not text:
        raise DatagramError("empty", "an empty datagram")
    try:
        top = json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except DatagramError:
        raise
    except (ValueError, RecursionError) as exc:
        raise DatagramError("not-json", f"not a JSON text: {exc}") from None
    if not isinstance(top, dict):
        raise DatagramError("invalid", f"a JSON {_kind(top)}, not an object")
    version = top.get("dpv")
    if version is not None and version != PROTOCOL_VERSION:
        raise DatagramError(
            "version",
            f"datagram protocol version {_shown(version)}; only {PROTOCOL_VERSION!r} "
            "(or none, libtlsrpt 0.5.0rc1) is understood",
        )
    domain = _name(_text(top, "d", "the datagram"), "d (the policy domain)")
    record = _storable(_text(top, "pr", "the datagram"))
    try:
        rua = parse_record(record).rua
    except TlsRptRecordError:
        rua = ()  # Postfix only checks the version; the session happened all the same
    policies = _list(top, "policies", "the datagram", required=True)
    if not policies:
        raise DatagramError("invalid", "policies is empty")
    if len(policies) > MAX_POLICIES:
        raise DatagramError(
            "limit", f"{len(policies)} policies, more than the {MAX_POLICIES} accepted"
        )
    return Event(
        version=version,
        domain=domain,
        policy_record=record,
        rua=rua,
        policies=tuple(_policy(p, i) for i, p in enumerate(policies)),
    )


def _policy(value: Any, i: int) -> DatagramPolicy:
    where = f"policies[{i}]"
    if not isinstance(value, dict):
        raise DatagramError("invalid", f"{where} is a JSON {_kind(value)}, not an object")
    code = _int(value, "policy-type", where)
    policy_type = POLICY_TYPES.get(code)
    if policy_type is None:
        raise DatagramError(
            "invalid",
            f"{where}.policy-type {code} is none of 1 (tlsa), 2 (sts), 9 (no-policy-found)",
        )
    domain = value.get("policy-domain")
    if domain is not None:
        domain = _name(_text(value, "policy-domain", where), f"{where}.policy-domain")
    strings = [_storable(s) for s in _texts(value, "policy-string", where)]
    if policy_type is PolicyType.TLSA:
        strings = [_tlsa_text(s) for s in strings]
    patterns = [_storable(s) for s in _texts(value, "mx-host", where)]
    details = _list(value, "failure-details", where)
    failures = tuple(_failure(d, f"{where}.failure-details[{j}]") for j, d in enumerate(details))
    count = _int(value, "t", where)
    if count != len(failures):
        raise DatagramError(
            "invalid", f"{where}.t says {count} failure(s), failure-details has {len(failures)}"
        )
    final = _int(value, "f", where)
    if final not in (0, 1):
        raise DatagramError("invalid", f"{where}.f {final} is neither 0 (success) nor 1 (failure)")
    if (final == 1) != bool(failures):
        raise DatagramError(
            "invalid",
            f"{where}.f {final} contradicts its {len(failures)} failure detail(s)",
        )
    return DatagramPolicy(
        policy_type=policy_type,
        policy_domain=domain,
        policy_strings=tuple(strings) if policy_type is not PolicyType.NO_POLICY_FOUND else (),
        mx_patterns=tuple(patterns) if policy_type is PolicyType.STS else (),
        failures=failures,
    )


def _failure(value: Any, where: str) -> DatagramFailure:
    if not isinstance(value, dict):
        raise DatagramError("invalid", f"{where} is a JSON {_kind(value)}, not an object")
    code = _int(value, "c", where)
    result_type = RESULT_TYPES.get(code)
    if result_type is None:
        raise DatagramError("invalid", f"{where}.c {code} is no TLS-RPT result type libtlsrpt has")
    mx = _optional_text(value, "n", where)
    return DatagramFailure(
        result_type=result_type,
        sending_ip=_address(_optional_text(value, "s", where), f"{where}.s"),
        receiving_mx=_name(mx, f"{where}.n") if mx else None,
        receiving_ehlo=_storable_or_none(_optional_text(value, "h", where)),
        receiving_ip=_address(_optional_text(value, "r", where), f"{where}.r"),
        additional_information=_storable_or_none(_optional_text(value, "a", where)),
        failure_reason_code=_storable_or_none(_optional_text(value, "f", where)),
    )


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DatagramError("invalid", f"member {_shown(key)} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise DatagramError("not-json", f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "number"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise DatagramError("invalid", f"{where} has no {key}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatagramError("invalid", f"{where}.{key} is a JSON {_kind(value)}, not an integer")
    return value


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise DatagramError("invalid", f"{where} has no {key}")
    value = _optional_text(obj, key, where)
    if value is None:
        raise DatagramError("invalid", f"{where}.{key} is null, not a string")
    return value


def _optional_text(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DatagramError("invalid", f"{where}.{key} is a JSON {_kind(value)}, not a string")
    if len(value) > MAX_TEXT:
        raise DatagramError(
            "limit", f"{where}.{key} has {len(value)} characters, more than {MAX_TEXT}"
        )
    return value


def _list(obj: dict[str, Any], key: str, where: str, *, required: bool = False) -> list[Any]:
    if key not in obj:
        if required:
            raise DatagramError("invalid", f"{where} has no {key}")
        return []
    value = obj[key]
    if not isinstance(value, list):
        raise DatagramError("invalid", f"{where}.{key} is a JSON {_kind(value)}, not an array")
    if len(value) > MAX_ITEMS:
        raise DatagramError(
            "limit", f"{where}.{key} has {len(value)} entries, more than {MAX_ITEMS}"
        )
    return value


def _texts(obj: dict[str, Any], key: str, where: str) -> list[str]:
    items = _list(obj, key, where)
    for j, item in enumerate(items):
        if not isinstance(item, str):
            raise DatagramError(
                "invalid", f"{where}.{key}[{j}] is a JSON {_kind(item)}, not a string"
            )
        if len(item) > MAX_TEXT:
            raise DatagramError(
                "limit", f"{where}.{key}[{j}] has {len(item)} characters, more than {MAX_TEXT}"
            )
    return items


def _name(value: str, what: str) -> str:
    """A domain or host name in the store's form (lower-case A-label, no trailing dot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DatagramError("invalid", f"{what} {_shown(value)} is not UTF-8") from None
    try:
        return names.normalise_host(value)
    except ValueError as exc:
        raise DatagramError(
            "invalid", f"{what} {_shown(value)} is not a host name: {exc}"
        ) from None


def _address(value: str | None, what: str) -> str | None:
    if not value:  # Postfix sends "" when it could not tell its own address
        return None
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise DatagramError("invalid", f"{what} {_shown(value)} is not an IP address") from None


def _storable(text: str) -> str:
    """`text` as every store can keep it: undecodable bytes and NUL written as escapes."""
    try:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate from a JSON \\u escape, not from a byte
        fixed = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return fixed.replace("\x00", "\\x00")


def _storable_or_none(text: str | None) -> str | None:
    return _storable(text) if text else None


def _tlsa_text(text: str) -> str:
    """A TLSA policy string in mxguard's form (lower-case hex), so that Postfix's sessions and
    mxguard's own group under one policy in a report; kept as sent when it does not parse."""
    try:
        return dane.parse_tlsa(text).to_text()
    except ValueError:
        return text


# --- the receiver ----------------------------------------------------------------------------


class ReceiverError(Exception):
    """The socket cannot be used; the message says which and why."""


@dataclass
class Counts:
    """What a receiver did since it started."""

    datagrams: int = 0
    events: int = 0
    results: dict[str, int] = field(default_factory=dict)  # result type or "success" -> n
    malformed: dict[str, int] = field(default_factory=dict)  # DatagramError.kind -> n
    dropped: int = 0  # results dropped because MAX_PENDING were waiting for the store
    written: int = 0  # results handed to the store (or, when it refused, to the spool)
    batches: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "datagrams": self.datagrams,
            "events": self.events,
            "results": dict(sorted(self.results.items())),
            "malformed": dict(sorted(self.malformed.items())),
            "dropped": self.dropped,
            "written": self.written,
            "batches": self.batches,
        }


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: DatagramReceiver) -> None:
        self.receiver = receiver

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.receiver.received(data)

    def error_received(self, exc: Exception) -> None:
        log.warning("TLSRPT socket %s: %s", self.receiver.socket_path, exc)


class DatagramReceiver:
    """Receives libtlsrpt datagrams on `socket_path` and records them in `store` (see the
    module docstring). `async with DatagramReceiver(…) as r:` binds the socket; leaving
    stops receiving, writes what is pending and removes the socket."""

    def __init__(
        self,
        socket_path: Path | str,
        store: SessionLog,
        *,
        mode: int = 0o660,
        group: int | str | None = None,
        spool: ResultSpool | None = None,
        batch_size: int = BATCH_SIZE,
        flush_interval: float = FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1 or max_pending < 1 or flush_interval < 0:
            raise ValueError("batch_size and max_pending must be positive, flush_interval >= 0")
        self.socket_path = Path(socket_path)
        self.store = store
        self.mode = mode
        self.group = group
        self.spool = spool
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.clock = clock
        self.monotonic = monotonic
        self.counts = Counts()
        self._pending: list[SessionResult] = []
        self._wake = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self._writer: asyncio.Task[None] | None = None
        self._inode: tuple[int, int] | None = None
        self._closing = False
        self._last_warning: float | None = None
        self._unlogged = 0

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        sock = self._bind()
        try:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._transport = transport
        self._writer = asyncio.create_task(self._write_loop(), name="mxguard-tlsrpt-writer")

    async def stop(self) -> None:
        """Stop receiving, write everything pending, remove the socket."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._unlink()
        # The writer finishes what it is writing and writes the rest: cancelling it could
        # interrupt a store write whose batch is no longer pending.
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        await self.flush()

    async def __aenter__(self) -> DatagramReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _bind(self) -> socket.socket:
        path = self.socket_path
        gid = _group_id(self.group)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise ReceiverError(f"cannot create {path.parent}: {exc.strerror}") from None
        self._remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # While bind() has made it and chmod() not yet changed it, the socket has the
            # umask's mode, which grants write access to nobody else unless umask is 0.
            sock.bind(str(path))
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, self.mode)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self._unlink()
            raise ReceiverError(f"cannot set up the TLSRPT socket {path}: {exc}") from None
        return sock

    @staticmethod
    def _remove_stale(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ReceiverError(f"cannot look at {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ReceiverError(
                f"{path} exists and is not a socket; remove it or pick another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)  # left by a receiver that is gone
            return
        except OSError as exc:
            raise ReceiverError(f"cannot use the socket {path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise ReceiverError(f"another process is receiving on {path}")

    def _unlink(self) -> None:
        """Remove the socket, if it is still the one this receiver bound."""
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.socket_path.unlink()
        self._inode = None

    # --- receiving -------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """One datagram (called by the transport; tests may call it directly)."""
        self.counts.datagrams += 1
        event = parse_datagram(data)
        if isinstance(event, DatagramError):
            self.counts.malformed[event.kind] = self.counts.malformed.get(event.kind, 0) + 1
            self._warn(event)
            return
        self.counts.events += 1
        for result in event.results(self.clock()):
            try:
                check_result(result)  # one result the store refuses must not fail a batch
            except StoreError as exc:
                self.counts.malformed["unstorable"] = self.counts.malformed.get("unstorable", 0) + 1
                self._warn(DatagramError("unstorable", str(exc)))
                continue
            key = result.result_text or "success"
            self.counts.results[key] = self.counts.results.get(key, 0) + 1
            if len(self._pending) >= self.max_pending:
                self.counts.dropped += 1
                continue
            self._pending.append(result)
        self._wake.set()

    def _warn(self, error: DatagramError) -> None:
        now = self.monotonic()
        if self._last_warning is not None and now - self._last_warning < LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last warning)" if self._unlogged else ""
        log.warning("ignored a malformed TLSRPT datagram%s: %s", more, error.reason)
        self._last_warning, self._unlogged = now, 0

    # --- writing ---------------------------------------------------------------------------

    def _take(self) -> list[SessionResult]:
        batch = self._pending[: self.batch_size]
        del self._pending[: self.batch_size]
        return batch

    async def _write(self, batch: list[SessionResult]) -> None:
        if batch:
            await result_spool.record(self.store, self.spool, batch)  # never raises
            self.counts.written += len(batch)
            self.counts.batches += 1

    async def _write_loop(self) -> None:
        """One batch at a time: full ones at once, a partial one when its first result has
        waited `flush_interval` (counted from when the writer saw it)."""
        while not self._closing:
            if not self._pending:
                await self._wake.wait()
                self._wake.clear()
                continue
            deadline = self.monotonic() + self.flush_interval
            while len(self._pending) < self.batch_size and not self._closing:
                left = deadline - self.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
                self._wake.clear()
            await self._write(self._take())

    async def flush(self) -> None:
        """Write everything pending now."""
        while self._pending:
            await self._write(self._take())


def _group_id(group: int | str | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ReceiverError(f"no group named {group!r} (for the TLSRPT socket)") from None


async def collect(
    socket_path: Path | str,
    store: SessionLog,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[DatagramReceiver], None] | None = None,
    **options: Any,
) -> Counts:
    """Receive on `socket_path` and record in `store` until `stop` is set (or the task is
    cancelled); then write what is pending, remove the socket and return the counts.

    `options` go to `DatagramReceiver` (`mode`, `group`, `spool`, `batch_size`,
    `flush_interval`, …); `ready` is called once the socket accepts datagrams.
    ReceiverError when the socket cannot be set up. For `mxguard tlsrpt collect --socket`.
    """
    receiver = DatagramReceiver(socket_path, store, **options)
    async with receiver:
        if ready is not None:
            ready(receiver)
        await (stop or asyncio.Event()).wait()
    return receiver.counts


__all__ = [
    "MAX_DATAGRAM",
    "PROTOCOL_VERSION",
    "Counts",
    "DatagramError",
    "DatagramFailure",
    "DatagramPolicy",
    "DatagramReceiver",
    "Event",
    "ReceiverError",
    "collect",
    "parse_datagram",
]
