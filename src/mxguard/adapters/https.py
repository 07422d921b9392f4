"""The MTA-STS policy fetch over HTTPS (RFC 8461 §3.3).

A domain's policy lives at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. The fetch is
on the delivery path of every message to a new domain, so it is strict and bounded:

- the host name is ``mta-sts.`` plus the domain in A-label form (IDNA 2008, UTS #46
  mapping, by ``protocol.names``); it is the TLS server name (SNI), the Host header and the
  name the certificate must be valid for (RFC 8461 §3.3: "valid for the "mta-sts" host
  name", RFC 6125);
- WebPKI verification against the system store plus an optional extra CA file; TLS 1.2 or
  newer (RFC 8461 §3.3 requires TLS that complies with RFC 7525);
- redirects are not followed (§3.3: "MUST NOT follow HTTP redirects"); only 200 counts;
- ``Content-Type`` must be ``text/plain`` (§3.2 says the policy is served as text/plain;
  mxguard rejects others, see docs/rfc-notes.md);
- the body is read as a stream and abandoned past ``max_size`` (64 KiB by default, §3.3
  suggests a limit), and one deadline covers connect, TLS, headers and body.

The fetch speaks HTTP/1.1 itself, over an asyncio TLS connection, with h11 (the HTTP/1.1
parser httpx uses) reading the response (adapters/http11.py): one request per connection,
nothing pooled, no client object per fetch. Through httpx, two thirds of a fetch's time
outside the TLS handshake went to the client's own layers (measured in bench/, a cold
Postfix lookup).
``strict_client`` remains the httpx client of mxguard's other HTTPS requests.

Every outcome is a ``FetchResult``; failures carry the RFC 8460 §4.3.2 result type:
``sts-webpki-invalid`` for any certificate problem of the policy host,
``sts-policy-fetch-error`` for everything else that went wrong on the way, and
``sts-policy-invalid`` when the body arrived but is not UTF-8 text. Parsing the policy is
protocol/mtasts.py's job, not this module's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mxguard.protocol import names, roots

if TYPE_CHECKING:
    import httpx
from mxguard.protocol.results import ResultType

POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
DEFAULT_MAX_SIZE = 65536
MAX_HEAD = 16384  # bytes of the response's status line and header fields
BODY_SLICE = 16384  # the body is handed on (and capped) in pieces of at most this
USER_AGENT = "mxguard"


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome of one policy fetch; ``text`` is set only when ``ok``."""

    ok: bool
    text: str | None
    result_type: ResultType | None  # None when ok
    detail: str  # one sentence for people: what was fetched or what failed
    status: int | None  # HTTP status, None if no response arrived
    content_type: str | None
    elapsed: float  # seconds, connect to last byte (or to the failure)
    certificate: bytes | None = None  # the policy host's certificate (DER), once TLS was up


class FetchAbort(Exception):
    """Raised inside a fetch to stop it with a failure; never leaves this module."""

    def __init__(self, result_type: ResultType, detail: str) -> None:
        super().__init__(detail)
        self.result_type = result_type
        self.detail = detail


def policy_host(domain: str) -> str:
    """``mta-sts.<domain>`` with the domain in A-label form, lower case, no trailing dot.

    Raises ``ValueError`` naming the problem when ``domain`` is not a valid host name, so
    that nothing but a host name can ever end up in the URL.
    """
    try:
        # names.normalise_host: UTS #46 mapping (case, compatibility forms, as browsers do),
        # then IDNA 2008 (RFC 5891) A-labels, and the host name rules.
        name = names.normalise_host(domain)
    except names.HostNameError as exc:
        raise ValueError(f"{domain!r} is not a valid domain name: {exc}") from None
    if "." not in name:
        raise ValueError(f"{domain!r} is not a valid mail domain: it needs at least two labels")
    host = "mta-sts." + name
    if len(host) > names.MAX_NAME_LENGTH:
        raise ValueError(
            f"{domain!r} is too long: {host} exceeds {names.MAX_NAME_LENGTH} characters"
        )
    return host


def policy_url(domain: str, port: int = 443) -> str:
    """The policy URL of ``domain`` (RFC 8461 §3.3); ``port`` other than 443 is for labs."""
    return _url(policy_host(domain), port)


def _url(host: str, port: int) -> str:
    return f"https://{host}{'' if port == 443 else f':{port}'}{POLICY_PATH}"


_contexts: dict[tuple[str | None, int], ssl.SSLContext] = {}


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The TLS context of the fetch: WebPKI (system store + ``ca_file``), TLS 1.2 or newer.

    Loading the system store costs about 20 ms, half of a cold policy resolution (measured in
    bench/), so contexts are shared; a changed ``ca_file`` (new mtime) gets a new one.
    """
    try:
        version = ca_file.stat().st_mtime_ns if ca_file is not None else 0
    except OSError:
        version = -1  # unreadable: let load_verify_locations say why, below
    key = (str(ca_file) if ca_file is not None else None, version)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _new_context(ca_file)
        if version >= 0:
            if len(_contexts) > 16:
                _contexts.clear()
            _contexts[key] = ctx
    return ctx


def _new_context(ca_file: Path | None) -> ssl.SSLContext:
    # The same roots the MX check trusts (roots.load_ders: the system bundle plus ca_file,
    # which pkix.load_roots parses), judged by the same OpenSSL verifier at the same (the
    # system's) security level. OpenSSL needs only their DER: no certificate is parsed here.
    try:
        ders = roots.load_ders(ca_file)
    except roots.CaFileError as exc:
        raise OSError(str(exc)) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    roots.load_into(ctx, ders)  # one that OpenSSL refuses does not cost the others
    # RFC 8461 §3.3 requires TLS per RFC 7525, which forbids anything older than TLS 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    # RFC 8461 §3.3 wants the certificate valid for the policy host as RFC 6125 says, and
    # mxguard holds MX hosts to subjectAltName DNS names (§4.2): the same rule for both.
    ctx.hostname_checks_common_name = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(slots=True)
class _Request:
    """Where and how one fetch goes, and the response head once it arrived."""

    host: str  # mta-sts.<domain>: SNI, Host header and the certificate's name
    url: str  # the policy URL, as reported
    connect: str  # what is connected to: the host name, or the IP address ``connect_to``
    port: int
    headers: dict[str, str]
    status: int | None = None
    content_type: str | None = None
    certificate: bytes | None = None


def _request(domain: str, port: int, connect_to: str | None) -> _Request:
    """The request for ``domain``'s policy; ``FetchAbort`` if there can be none."""
    try:
        host = policy_host(domain)
        url = _url(host, port)
    except ValueError as exc:
        raise FetchAbort(ResultType.STS_POLICY_FETCH_ERROR, f"no policy fetch: {exc}") from None
    headers = {
        "Host": host if port == 443 else f"{host}:{port}",
        "Accept": "text/plain",
        "Accept-Encoding": "identity",
        "Connection": "close",
        "User-Agent": USER_AGENT,
    }
    request = _Request(host, url, host, port, headers)
    if connect_to is not None:
        try:
            ip = ipaddress.ip_address(connect_to)
        except ValueError:
            raise FetchAbort(
                ResultType.STS_POLICY_FETCH_ERROR,
                f"connect_to {connect_to!r} is not an IP address",
            ) from None
        # Only where to connect changes; the name is kept where it matters: SNI (and thus
        # the certificate check, which uses the server name) and the Host header.
        request.connect = str(ip)
    return request


async def _get(
    request: _Request,
    ctx: ssl.SSLContext,
    max_size: int,
) -> bytes:
    """The policy body, read under the size cap; the head is noted on ``request``."""
    # Imported here: h11 costs every command's start-up, and only a policy fetch needs it.
    from mxguard.adapters.http11 import TlsExchange

    loop = asyncio.get_running_loop()
    transport, exchange = await loop.create_connection(
        # request.host: the SNI and the name the certificate is checked for
        lambda: TlsExchange(ctx, request.host),
        request.connect,
        request.port,
    )
    try:
        await exchange.handshake  # within the caller's deadline, as the whole fetch is
        der = exchange.tls.getpeercert(binary_form=True)
        request.certificate = bytes(der) if der else None
        exchange.send(request)
        head = await exchange.head()
        request.status = head.status_code
        request.content_type = head.headers.get("content-type")
        check_response(head, request.url, max_size)
        return await read_capped(exchange.body(), max_size, request.url)
    finally:
        if not loop.is_closed():  # (a fetch still running when its loop is shut down)
            transport.abort()  # one request per connection; nothing more is wanted from it


def strict_client(
    ctx: ssl.SSLContext,
    timeout: float,
) -> httpx.AsyncClient:
    """The HTTPS client of every fetch and post mxguard makes: verification by ``ctx``, no
    redirects followed (RFC 8461 §3.3), nothing taken from the environment (proxies, CA
    overrides), HTTP/1.1."""
    import httpx  # only for the clients that use it: the policy fetch does not

    return httpx.AsyncClient(
        verify=ctx,
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout),
        http2=False,
    )


def _failure(exc: BaseException, request: _Request, timeout: float) -> tuple[ResultType, str]:
    """The result type and detail of a fetch that raised ``exc``."""
    url = request.url
    if isinstance(exc, FetchAbort):
        return exc.result_type, exc.detail
    if isinstance(exc, TimeoutError):
        return (
            ResultType.STS_POLICY_FETCH_ERROR,
            f"no complete answer from {url} within {timeout:g} s",
        )
    httpx = sys.modules.get("httpx")  # an httpx error can only come from a loaded httpx
    if httpx is not None and isinstance(exc, httpx.TimeoutException):
        return ResultType.STS_POLICY_FETCH_ERROR, f"timed out fetching {url} (limit {timeout:g} s)"
    cert_error = _certificate_error(exc)
    if cert_error is not None:
        return ResultType.STS_WEBPKI_INVALID, (
            f"the certificate of {request.host} failed WebPKI validation: "
            f"{cert_error.verify_message or cert_error.reason} (fetching {url})"
        )
    return ResultType.STS_POLICY_FETCH_ERROR, f"cannot fetch {url}: {_describe(exc)}"


async def fetch_policy(
    domain: str,
    *,
    ca_file: Path | None = None,
    port: int = 443,
    timeout: float = 10.0,  # noqa: ASYNC109 - one deadline the caller chooses, applied inside
    max_size: int = DEFAULT_MAX_SIZE,
    connect_to: str | None = None,
) -> FetchResult:
    """Fetch the MTA-STS policy of ``domain``; never raises for network outcomes.

    ``connect_to`` (an IP address, for labs and tests) replaces name resolution only: the
    TLS server name, Host header and certificate check still use ``mta-sts.<domain>``.
    """
    start = time.monotonic()
    request: _Request | None = None

    def failed(result_type: ResultType, detail: str) -> FetchResult:
        status = request.status if request else None
        content_type = request.content_type if request else None
        elapsed = time.monotonic() - start
        certificate = request.certificate if request else None
        return FetchResult(
            False, None, result_type, detail, status, content_type, elapsed, certificate
        )

    try:
        request = _request(domain, port, connect_to)
    except FetchAbort as exc:
        return failed(exc.result_type, exc.detail)
    try:
        ctx = client_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        # A broken local CA file is not the policy host's fault, so not sts-webpki-invalid.
        return failed(ResultType.STS_POLICY_FETCH_ERROR, f"cannot load CA file {ca_file}: {exc}")
    try:
        async with asyncio.timeout(timeout):
            body = await _get(request, ctx, max_size)
    except (FetchAbort, TimeoutError, OSError) as exc:
        result_type, detail = _failure(exc, request, timeout)
        if result_type is ResultType.STS_WEBPKI_INVALID:
            request.status = request.content_type = None  # no response: the handshake failed
        return failed(result_type, detail)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return failed(
            ResultType.STS_POLICY_INVALID,
            f"the policy from {request.url} is not UTF-8 text (byte {exc.start} is invalid)",
        )
    return FetchResult(
        True,
        text,
        None,
        f"fetched {len(body)} bytes from {request.url}",
        request.status,
        request.content_type,
        time.monotonic() - start,
        request.certificate,
    )


class ResponseHead(Protocol):
    """What ``check_response`` reads of a response (an ``httpx.Response`` has it too)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def check_response(response: ResponseHead, url: str, max_size: int) -> None:
    """Reject a response by its head (RFC 8461 §3.3, §3.2); raises ``FetchAbort`` if it fails."""
    status = response.status_code
    if 300 <= status < 400:
        location = response.headers.get("location", "nowhere")
        raise FetchAbort(
            ResultType.STS_POLICY_FETCH_ERROR,
            f"HTTP {status} redirect from {url} to {location}; RFC 8461 §3.3 forbids "
            "following redirects, the policy must be served at that URL itself",
        )
    if status != 200:
        raise FetchAbort(ResultType.STS_POLICY_FETCH_ERROR, f"HTTP {status} from {url}")
    content_type = response.headers.get("content-type")
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "text/plain":
        found = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise FetchAbort(
            ResultType.STS_POLICY_FETCH_ERROR,
            f"{url} answered with {found}; an MTA-STS policy must be served as text/plain "
            "(RFC 8461 §3.2)",
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        # We asked for identity; decoding compressed bodies would defeat the size cap.
        raise FetchAbort(
            ResultType.STS_POLICY_FETCH_ERROR,
            f"{url} answered with Content-Encoding {encoding!r} although identity was asked",
        )
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_size:
        raise FetchAbort(
            ResultType.STS_POLICY_FETCH_ERROR,
            f"the policy from {url} is {int(declared)} bytes, over the limit of {max_size}",
        )


async def read_capped(chunks: AsyncIterator[bytes], max_size: int, url: str) -> bytes:
    """Collect ``chunks`` but stop pulling as soon as more than ``max_size`` bytes arrived.

    Raises ``FetchAbort`` (sts-policy-fetch-error) on the first chunk past the limit: a
    declared Content-Length cannot be trusted, so the cap applies to what is read.
    """
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_size:
            raise FetchAbort(
                ResultType.STS_POLICY_FETCH_ERROR,
                f"the policy from {url} is larger than the limit of {max_size} bytes",
            )
        parts.append(chunk)
    return b"".join(parts)


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure somewhere in ``exc``'s cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException) -> str:
    """The most telling message in the chain: httpx wraps OS errors in bland ones."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return f"cannot resolve the host name ({current.strerror})"
        if isinstance(current, OSError) and not isinstance(current, ssl.SSLError) and current.errno:
            return os.strerror(current.errno)
        current = current.__cause__ or current.__context__
    return str(exc) or type(exc).__name__


__all__ = [
    "DEFAULT_MAX_SIZE",
    "POLICY_PATH",
    "FetchAbort",
    "FetchResult",
    "check_response",
    "client_context",
    "fetch_policy",
    "policy_host",
    "policy_url",
    "read_capped",
]
