"""Specification of the MTA-STS policy fetch (RFC 8461 §3.3) and of the lab's policy host.

Real TLS, real server, real client: each row starts a ``PolicyHost`` on its own loopback
address in 127.204.0.0/16 with a certificate from the lab PKI, and fetches from it with
``fetch_policy``. Unit rows cover the pure parts (host names, response checks, the size cap).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from mxguard.adapters import http11
from mxguard.adapters.https import (
    FetchAbort,
    FetchResult,
    check_response,
    client_context,
    fetch_policy,
    policy_host,
    policy_url,
    read_capped,
)
from mxguard.lab.pki import LabPKI
from mxguard.lab.policy_host import (
    MAX_HEAD,
    OVERSIZE_BODY,
    POLICY_PATH,
    REDIRECT_TARGET,
    PolicyHost,
)
from mxguard.lab.scenario import CertKind, MtaSts, PolicyBehaviour
from mxguard.protocol.pkix import load_roots, verify_pkix
from mxguard.protocol.results import ResultType

FETCH_ERROR = ResultType.STS_POLICY_FETCH_ERROR
WEBPKI = ResultType.STS_WEBPKI_INVALID
DOMAIN = "fetch.test"
_host_numbers = itertools.count(1)


def next_address() -> str:
    """A fresh address in this file's range, so rows never share a listener."""
    n = next(_host_numbers)
    return f"127.204.{n // 250}.{n % 250 + 1}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


async def with_host(
    pki: LabPKI,
    mta_sts: MtaSts,
    body: Callable[[PolicyHost], Awaitable[Any]],
    *,
    cert: CertKind = CertKind.VALID,
    domain: str = DOMAIN,
) -> Any:
    host = PolicyHost(domain, mta_sts, pki.issue(f"mta-sts.{domain}", cert), next_address(), 443)
    await host.start()
    try:
        return await body(host)
    finally:
        await host.stop()


def fetch_from(host: PolicyHost, pki: LabPKI, **kwargs: Any) -> Awaitable[FetchResult]:
    kwargs.setdefault("ca_file", pki.ca_file)
    kwargs.setdefault("timeout", 5.0)
    return fetch_policy(host.domain, connect_to=host.address, port=host.port, **kwargs)


def fetch_once(
    pki: LabPKI, mta_sts: MtaSts, cert: CertKind = CertKind.VALID, **kwargs: Any
) -> tuple[FetchResult, PolicyHost]:
    async def body(host: PolicyHost) -> tuple[FetchResult, PolicyHost]:
        return await fetch_from(host, pki, **kwargs), host

    result: tuple[FetchResult, PolicyHost] = asyncio.run(with_host(pki, mta_sts, body, cert=cert))
    return result


# --- behaviours of the policy host (RFC 8461 §3.3) ---------------------------------------


def test_policy_served_as_text_plain_is_fetched_exactly(pki: LabPKI) -> None:
    sts = MtaSts(mx=("mx1.fetch.test", "*.backup.fetch.test"), max_age=604800)
    result, host = fetch_once(pki, sts)
    assert result.ok, result.detail
    assert result.text == sts.body(DOMAIN)
    assert (result.result_type, result.status) == (None, 200)
    assert result.content_type == "text/plain"
    assert host.fetches == 1
    # SNI and Host header are the policy host's name (RFC 8461 §3.3), not the IP connected to.
    [request] = host.requests
    assert request.sni == request.host == f"mta-sts.{DOMAIN}"


@pytest.mark.parametrize(
    ("behaviour", "status", "detail_part"),
    [
        pytest.param(PolicyBehaviour.NOT_FOUND, 404, "HTTP 404 from ", id="only_200_is_success"),
        pytest.param(PolicyBehaviour.REDIRECT, 301, REDIRECT_TARGET, id="redirect_is_a_failure"),
        pytest.param(
            PolicyBehaviour.WRONG_CONTENT_TYPE, 200, "'text/html'", id="content_type_not_text_plain"
        ),
        pytest.param(PolicyBehaviour.OVERSIZE, 200, "larger than the limit", id="body_over_64kib"),
    ],
)
def test_misbehaving_policy_host_is_a_fetch_error(
    pki: LabPKI, behaviour: PolicyBehaviour, status: int, detail_part: str
) -> None:
    result, host = fetch_once(pki, MtaSts(behaviour=behaviour))
    assert not result.ok and result.text is None
    assert result.result_type is FETCH_ERROR
    assert result.status == status
    assert detail_part in result.detail
    assert policy_url(DOMAIN) in result.detail
    assert host.fetches == 1


def test_redirect_target_is_not_fetched(pki: LabPKI) -> None:
    async def body(host: PolicyHost) -> tuple[FetchResult, list[str], httpx.Response]:
        result = await fetch_from(host, pki)
        paths = [r.path for r in host.requests]
        # The target really would serve the policy, so not following it is the client's choice.
        target = await get(host, pki, REDIRECT_TARGET)
        return result, paths, target

    result, paths, target = asyncio.run(
        with_host(pki, MtaSts(behaviour=PolicyBehaviour.REDIRECT), body)
    )
    assert result.result_type is FETCH_ERROR
    assert paths == [POLICY_PATH]
    assert target.status_code == 200 and target.text == MtaSts().body(DOMAIN)


def test_oversize_body_is_abandoned_after_the_limit(
    pki: LabPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count what the fetch takes from the connection: it must stop right after 64 KiB, not
    # read the whole 100 KiB the host sends (without a Content-Length to refuse it by).
    # Reading pauses after each piece the TLS connection hands over until the fetch has
    # taken it, and the body is capped piece by piece.
    received: list[int] = []
    original = http11.Exchange.data_received

    def counting(self: http11.Exchange, data: bytes) -> None:
        received.append(len(data))
        original(self, data)

    monkeypatch.setattr(http11.Exchange, "data_received", counting)
    result, _ = fetch_once(pki, MtaSts(behaviour=PolicyBehaviour.OVERSIZE))
    assert result.result_type is FETCH_ERROR
    assert "larger than the limit" in result.detail
    # It stopped at the first piece that crossed the limit (the response head is in there).
    assert sum(received[:-1]) <= 65536 + 512, received
    assert 65536 < sum(received) < OVERSIZE_BODY, received


def test_stalling_host_fails_within_the_deadline(pki: LabPKI) -> None:
    result, host = fetch_once(pki, MtaSts(behaviour=PolicyBehaviour.STALL), timeout=1.0)
    assert result.result_type is FETCH_ERROR
    assert result.status is None
    assert 0.9 < result.elapsed < 5  # the 1 s deadline, not the stall (which never ends)
    assert host.fetches == 1  # the request arrived; the answer never did


def test_invalid_utf8_body_is_not_a_policy(pki: LabPKI) -> None:
    body = "version: STSv1\r\nmode: enforce\r\nmx: mx.fetch.test\udcff\r\nmax_age: 86400\r\n"
    result, _ = fetch_once(pki, MtaSts(policy=body))
    assert not result.ok and result.text is None
    assert result.result_type is ResultType.STS_POLICY_INVALID
    assert "UTF-8" in result.detail


# --- certificate of the policy host (RFC 8461 §3.3: WebPKI, valid for the exact name) --------


@pytest.mark.parametrize(
    ("cert", "result_type"),
    [
        pytest.param(CertKind.VALID, None, id="valid_certificate_is_accepted"),
        pytest.param(CertKind.INTERMEDIATE, None, id="chain_through_intermediate_is_accepted"),
        pytest.param(CertKind.EXPIRED, WEBPKI, id="expired_certificate_is_webpki_invalid"),
        pytest.param(CertKind.WRONG_NAME, WEBPKI, id="other_name_is_webpki_invalid"),
        pytest.param(CertKind.UNTRUSTED, WEBPKI, id="unknown_ca_is_webpki_invalid"),
        pytest.param(CertKind.SELF_SIGNED, WEBPKI, id="self_signed_is_webpki_invalid"),
    ],
)
def test_policy_host_certificate_must_be_webpki_valid(
    pki: LabPKI, cert: CertKind, result_type: ResultType | None
) -> None:
    result, host = fetch_once(pki, MtaSts(), cert)
    assert result.result_type is result_type
    assert result.ok is (result_type is None)
    # A rejected certificate ends the connection before any request is sent.
    assert host.fetches == (1 if result.ok else 0)
    if not result.ok:
        assert f"mta-sts.{DOMAIN}" in result.detail


@pytest.mark.parametrize("cert", list(CertKind), ids=[k.value for k in CertKind])
def test_policy_fetch_judges_a_certificate_as_the_mx_check_does(
    pki: LabPKI, cert: CertKind
) -> None:
    # The same roots, the same OpenSSL verifier, the same security level and name rules: a
    # policy host and an MX host presenting the same chain get the same verdict.
    result, _ = fetch_once(pki, MtaSts(), cert)
    identity = pki.issue(f"mta-sts.{DOMAIN}", cert)
    mx_check = verify_pkix(
        identity.chain, name=f"mta-sts.{DOMAIN}", roots=load_roots(pki.ca_file), now=pki.now
    )
    assert result.ok is mx_check.ok, (result.detail, mx_check.detail)
    assert result.result_type is (None if mx_check.ok else WEBPKI)


def test_lab_ca_is_trusted_only_through_ca_file(pki: LabPKI) -> None:
    result, host = fetch_once(pki, MtaSts(), ca_file=None)
    assert result.result_type is WEBPKI
    assert host.fetches == 0


def test_client_context_requires_verified_tls_1_2_or_newer(pki: LabPKI) -> None:
    for ctx in (client_context(), client_context(pki.ca_file)):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.check_hostname


# --- host names (RFC 8461 §3.3, IDNA) ---------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "host"),
    [
        pytest.param("example.test", "mta-sts.example.test", id="plain_name"),
        pytest.param("Example.TEST.", "mta-sts.example.test", id="lower_case_no_trailing_dot"),
        pytest.param("bücher.test", "mta-sts.xn--bcher-kva.test", id="u_label_becomes_a_label"),
        pytest.param("BÜCHER.test", "mta-sts.xn--bcher-kva.test", id="u_label_case_mapped"),
        pytest.param("xn--bcher-kva.test", "mta-sts.xn--bcher-kva.test", id="a_label_kept"),
    ],
)
def test_policy_host_name_is_in_a_label_form(domain: str, host: str) -> None:
    assert policy_host(domain) == host
    assert policy_url(domain) == f"https://{host}{POLICY_PATH}"
    assert policy_url(domain, 8443) == f"https://{host}:8443{POLICY_PATH}"


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("", id="empty"),
        pytest.param("evil.test/x?", id="path_characters"),
        pytest.param("user@evil.test", id="userinfo"),
        pytest.param("evil.test:8080", id="port"),
        pytest.param("exa mple.test", id="space"),
        pytest.param("-bad.test", id="leading_hyphen"),
        pytest.param("a" * 64 + ".test", id="label_over_63"),
        pytest.param("a..test", id="empty_label"),
        pytest.param("localhost", id="single_label"),
    ],
)
def test_only_a_host_name_can_reach_the_url(domain: str) -> None:
    with pytest.raises(ValueError, match="not a valid"):
        policy_host(domain)
    result = asyncio.run(fetch_policy(domain, timeout=1.0))
    assert result.result_type is FETCH_ERROR and result.status is None


def test_idna_domain_is_fetched_with_its_a_label(pki: LabPKI) -> None:
    a_label = policy_host("bücher.test").removeprefix("mta-sts.")

    async def body(host: PolicyHost) -> tuple[FetchResult, PolicyHost]:
        result = await fetch_policy(
            "bücher.test", ca_file=pki.ca_file, connect_to=host.address, timeout=5.0
        )
        return result, host

    result, host = asyncio.run(with_host(pki, MtaSts(), body, domain=a_label))
    assert result.ok, result.detail
    [request] = host.requests
    assert request.sni == request.host == f"mta-sts.{a_label}"


# --- transport ---------------------------------------------------------------------------


def test_closed_port_is_a_quick_fetch_error() -> None:
    result = asyncio.run(fetch_policy(DOMAIN, connect_to=next_address(), port=443, timeout=5.0))
    assert result.result_type is FETCH_ERROR
    assert result.status is None
    assert result.elapsed < 5  # refused at once, not a connect timeout
    assert "refused" in result.detail.lower()


def test_connect_to_must_be_an_ip_address() -> None:
    result = asyncio.run(fetch_policy(DOMAIN, connect_to="evil.test", timeout=1.0))
    assert result.result_type is FETCH_ERROR and "not an IP address" in result.detail


# --- response head checks (unit) -------------------------------------------------------


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers={k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("resp", "detail_part"),
    [
        pytest.param(response(200, content_type="text/plain"), None, id="text_plain_ok"),
        pytest.param(
            response(200, content_type="text/plain; charset=utf-8"), None, id="parameters_ok"
        ),
        pytest.param(response(200, content_type="Text/Plain"), None, id="media_type_any_case"),
        pytest.param(response(200), "no Content-Type", id="missing_content_type_fails"),
        pytest.param(
            response(200, content_type="text/plainx"), "'text/plainx'", id="prefix_is_not_enough"
        ),
        pytest.param(
            response(200, content_type="application/json"), "text/plain", id="other_type_fails"
        ),
        pytest.param(response(302, location="https://x/"), "redirect", id="302_not_followed"),
        pytest.param(response(308, location="https://x/"), "redirect", id="308_not_followed"),
        pytest.param(response(204, content_type="text/plain"), "HTTP 204", id="204_not_success"),
        pytest.param(response(500, content_type="text/plain"), "HTTP 500", id="500_fails"),
        pytest.param(
            response(200, content_type="text/plain", content_length="65537"),
            "65537 bytes",
            id="declared_length_over_limit_refused_unread",
        ),
        pytest.param(
            response(200, content_type="text/plain", content_encoding="gzip"),
            "Content-Encoding",
            id="compressed_body_refused",
        ),
    ],
)
def test_response_head_rules(resp: httpx.Response, detail_part: str | None) -> None:
    if detail_part is None:
        check_response(resp, "https://mta-sts.x.test/", 65536)
        return
    with pytest.raises(FetchAbort) as caught:
        check_response(resp, "https://mta-sts.x.test/", 65536)
    assert caught.value.result_type is FETCH_ERROR
    assert detail_part in caught.value.detail


# --- the size cap (unit) ----------------------------------------------------------------


async def chunks(sizes: list[int], pulled: list[int]) -> AsyncIterator[bytes]:
    for size in sizes:
        pulled.append(size)
        yield b"a" * size


@pytest.mark.parametrize(
    ("sizes", "limit", "ok", "pulled_count"),
    [
        pytest.param([10, 10], 20, True, 2, id="exactly_the_limit_is_accepted"),
        pytest.param([10, 11], 20, False, 2, id="one_byte_over_fails"),
        pytest.param([15, 15, 15, 15], 20, False, 2, id="stops_pulling_at_the_first_chunk_over"),
    ],
)
def test_body_is_capped_while_reading(
    sizes: list[int], limit: int, ok: bool, pulled_count: int
) -> None:
    pulled: list[int] = []

    async def read() -> bytes:
        return await read_capped(chunks(sizes, pulled), limit, "https://mta-sts.x.test/")

    if ok:
        assert asyncio.run(read()) == b"a" * sum(sizes)
    else:
        with pytest.raises(FetchAbort, match="larger than the limit"):
            asyncio.run(read())
    assert len(pulled) == pulled_count


# --- the policy host itself ---------------------------------------------------------------


async def get(host: PolicyHost, pki: LabPKI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(verify=client_context(pki.ca_file), trust_env=False) as client:
        return await client.get(
            f"https://{host.address}{path}",
            headers={"Host": host.name},
            extensions={"sni_hostname": host.name},
        )


def test_fetches_counts_policy_requests_and_clear_resets(pki: LabPKI) -> None:
    async def body(host: PolicyHost) -> list[int]:
        counts = []
        for _ in range(2):
            await fetch_from(host, pki)
        counts.append(host.fetches)
        assert (await get(host, pki, "/other")).status_code == 404  # other paths: 404
        counts.append(host.fetches)
        host.clear()
        counts.append(host.fetches)
        return counts

    counts = asyncio.run(with_host(pki, MtaSts(behaviour=PolicyBehaviour.NOT_FOUND), body))
    assert counts == [2, 2, 0]


def test_update_changes_behaviour_and_certificate_at_once(pki: LabPKI) -> None:
    async def body(host: PolicyHost) -> list[ResultType | None]:
        seen = [(await fetch_from(host, pki)).result_type]
        host.update(MtaSts(behaviour=PolicyBehaviour.NOT_FOUND), host.identity)
        seen.append((await fetch_from(host, pki)).result_type)
        host.update(MtaSts(), pki.issue(host.name, CertKind.EXPIRED))
        seen.append((await fetch_from(host, pki)).result_type)
        host.update(MtaSts(), pki.issue(host.name, CertKind.INTERMEDIATE))
        seen.append((await fetch_from(host, pki)).result_type)
        return seen

    assert asyncio.run(with_host(pki, MtaSts(), body)) == [None, FETCH_ERROR, WEBPKI, None]


def test_post_to_other_paths_is_stored_for_tlsrpt(pki: LabPKI) -> None:
    report = b"\x1f\x8b gzip bytes of a report"

    async def body(host: PolicyHost) -> tuple[int, int, PolicyHost]:
        async with httpx.AsyncClient(verify=client_context(pki.ca_file), trust_env=False) as c:
            kwargs: dict[str, Any] = {
                "headers": {"Host": host.name, "Content-Type": "application/tlsrpt+gzip"},
                "extensions": {"sni_hostname": host.name},
                "content": report,
            }
            stored = await c.post(f"https://{host.address}/tlsrpt", **kwargs)
            refused = await c.post(f"https://{host.address}{POLICY_PATH}", **kwargs)
        return stored.status_code, refused.status_code, host

    stored, refused, host = asyncio.run(with_host(pki, MtaSts(), body))
    assert (stored, refused) == (200, 405)  # the policy path answers GET only
    [post] = host.posts
    assert (post.path, post.body) == ("/tlsrpt", report)
    assert post.header("Content-Type") == "application/tlsrpt+gzip"
    assert host.fetches == 0


def test_request_head_is_bounded(pki: LabPKI) -> None:
    async def body(host: PolicyHost) -> bytes:
        reader, writer = await asyncio.open_connection(
            host.address, host.port, ssl=client_context(pki.ca_file), server_hostname=host.name
        )
        padding = "X-Padding: " + "p" * MAX_HEAD + "\r\n"
        writer.write(f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host.name}\r\n{padding}\r\n".encode())
        answer = await reader.read()
        writer.close()
        return answer

    answer = asyncio.run(with_host(pki, MtaSts(), body))
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"Connection: close" in answer
