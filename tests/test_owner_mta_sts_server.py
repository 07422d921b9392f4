"""`mxguard serve mta-sts`: the policy host of RFC 8461 §3.3, fetched the way senders fetch.

The server runs as a real `mxguard` process on this file's own loopback addresses
(127.82.0.1 and 127.82.0.3-5, port 443), with certificates from a lab CA (no lab needed:
only its PKI). Every policy is fetched with mxguard's own sender fetch
(`adapters.https.fetch_policy`: no redirects, 200 and text/plain only, WebPKI for
`mta-sts.<domain>`), and what the server sends is also read raw, status line and headers as
they are. SIGHUP swaps certificates for new connections and keeps the old one when the new
file is broken: the serial a client is given says which one is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mta_sts_serving import (
    ServeProcess,
    client_context,
    http_request,
    served_certificate,
    serving,
)
from mxguard.adapters.https import FetchResult, fetch_policy
from mxguard.cli import main
from mxguard.lab.pki import Identity, LabPKI
from mxguard.lab.scenario import CertKind
from mxguard.owner import mta_sts_server as srv

MAIN = "127.82.0.1"  # the module's server
PORT = 443
DOMAIN = "srv.test"
HOST = f"mta-sts.{DOMAIN}"
# Stored with LF line ends: the server must send CRLF (RFC 8461 §3.2).
POLICY_LF = (
    "version: STSv1\nmode: enforce\nmx: mx1.srv.test\nmx: *.backup.srv.test\nmax_age: 1209600\n"
)
POLICY_CRLF = POLICY_LF.replace("\n", "\r\n")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binds port 443: run as root")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("owner-pki"))


def write_policy(root: Path, domain: str, text: str | bytes) -> Path:
    path = root / domain / ".well-known" / "mta-sts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("owner-root")
    write_policy(root, DOMAIN, POLICY_LF)
    write_policy(root, "broken.test", "version: STSv1\nmode: enforce\nmax_age: 86400\n")  # no mx
    write_policy(root, "huge.test", "version: STSv1\nmode: none\nmax_age: 1\n" + "x: y\n" * 20000)
    write_policy(root, "latin1.test", b"version: STSv1\nmode: none\nmax_age: 1\nx: \xe9\n")
    return root


def copy_identity(identity: Identity, folder: Path) -> tuple[Path, Path]:
    """The identity's files copied to ``folder`` (tests overwrite them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    shutil.copyfile(identity.cert_file, cert)
    shutil.copyfile(identity.key_file, key)
    return cert, key


@pytest.fixture(scope="module")
def server(
    pki: LabPKI, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    # One certificate for several names: the policy host and the broken and huge ones.
    identity = pki.issue(HOST)
    others = [pki.issue(f"mta-sts.{d}") for d in ("broken.test", "huge.test", "latin1.test")]
    pairs = [(identity.cert_file, identity.key_file)] + [(o.cert_file, o.key_file) for o in others]
    log = tmp_path_factory.mktemp("owner-log") / "server.log"
    with serving(root, pairs, f"{MAIN}:{PORT}", log) as process:
        yield process


def root_of(server: ServeProcess) -> str:
    args = server.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--root") + 1])


def fetch(domain: str, ca_file: Path, address: str = MAIN) -> FetchResult:
    return asyncio.run(
        fetch_policy(domain, ca_file=ca_file, port=PORT, connect_to=address, timeout=5)
    )


# --- serving as senders fetch ------------------------------------------------------------


def test_a_sender_fetches_the_policy_as_text_plain_with_crlf_lines(
    server: ServeProcess, pki: LabPKI
) -> None:
    result = fetch(DOMAIN, pki.ca_file)
    assert result.ok, result.detail
    assert result.status == 200
    assert result.content_type == "text/plain"
    assert result.text == POLICY_CRLF
    # The body lints clean, with no line-ending remark (RFC 8461 §3.2).
    lint = CliRunner().invoke(main, ["sts", "check-policy", "-", "--json"], input=result.text)
    assert lint.exit_code == 0, lint.output
    assert '"warnings": []' in lint.output


def test_the_response_head_carries_the_policy_headers(server: ServeProcess, pki: LabPKI) -> None:
    status, headers, body = http_request(MAIN, PORT, host=HOST, ca_file=pki.ca_file)
    assert status == 200
    assert headers["content-type"] == "text/plain"
    assert headers["cache-control"] == "no-cache"
    assert int(headers["content-length"]) == len(body) == len(POLICY_CRLF)
    assert "location" not in headers
    # HEAD: the same head, no body.
    status, headers, body = http_request(MAIN, PORT, method="HEAD", host=HOST, ca_file=pki.ca_file)
    assert (status, body) == (200, b"")
    assert headers["content-type"] == "text/plain"


@pytest.mark.parametrize(
    ("method", "host", "path", "status"),
    [
        ("GET", "mta-sts.unknown.test", "/.well-known/mta-sts.txt", 404),  # no such domain
        ("GET", DOMAIN, "/.well-known/mta-sts.txt", 404),  # not the policy host name
        ("GET", "mta-sts.srv.test:443", "/", 404),  # another path
        ("GET", "mta-sts.srv.test", "/.well-known/mta-sts.txt.bak", 404),
        ("GET", "mta-sts.srv.test", "/.well-known/../srv.test/.well-known/mta-sts.txt", 404),
        ("GET", "mta-sts...test", "/.well-known/mta-sts.txt", 404),  # not a host name
        ("GET", "[::1]:443", "/.well-known/mta-sts.txt", 404),
        ("POST", HOST, "/.well-known/mta-sts.txt", 405),
        ("PUT", HOST, "/.well-known/mta-sts.txt", 405),
        ("DELETE", HOST, "/.well-known/mta-sts.txt", 405),
        ("GET", "MTA-STS.SRV.TEST:443", "/.well-known/mta-sts.txt", 200),  # case, port
    ],
)
def test_only_the_policy_host_and_path_answer_200(
    server: ServeProcess, method: str, host: str, path: str, status: int
) -> None:
    got, headers, _ = http_request(MAIN, PORT, method=method, host=host, path=path,
                                   server_name=HOST)  # fmt: skip
    assert got == status
    if status == 405:
        assert set(headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


def test_a_sender_gets_a_404_for_an_unknown_domain(server: ServeProcess, pki: LabPKI) -> None:
    # The certificate is not valid for mta-sts.unknown.test either; with the name checked
    # away, the server still answers 404 rather than someone else's policy.
    status, _, _ = http_request(MAIN, PORT, host="mta-sts.unknown.test", server_name=HOST,
                                ca_file=pki.ca_file)  # fmt: skip
    assert status == 404
    result = fetch("unknown.test", pki.ca_file)
    assert not result.ok and result.result_type is not None
    assert result.result_type.value == "sts-webpki-invalid"  # no certificate covers the name


@pytest.mark.parametrize(
    ("domain", "problem"),
    [
        ("broken.test", "not a valid policy"),
        ("huge.test", "larger than 65536 bytes"),
        ("latin1.test", "not UTF-8"),
    ],
)
def test_a_policy_file_that_senders_would_refuse_is_a_500_and_a_log_line(
    server: ServeProcess, pki: LabPKI, domain: str, problem: str
) -> None:
    result = fetch(domain, pki.ca_file)
    assert not result.ok and result.status == 500
    lines = [line for line in server.wait_for_log(problem).splitlines() if problem in line]
    assert lines and all(
        f"ERROR: not serving {root_of(server)}/{domain}/.well-known/mta-sts.txt" in line
        for line in lines
    ), lines
    # Logged once per version of the file, not once per request.
    fetch(domain, pki.ca_file)
    assert server.log_text().count(problem) == len(lines)


def test_every_request_is_logged_once(server: ServeProcess) -> None:
    offset = len(server.log_text())
    http_request(MAIN, PORT, host="mta-sts.unknown.test", path="/logged-once", server_name=HOST)
    tail = server.wait_for_log("/logged-once", after=offset)
    assert tail.count("/logged-once") == 1
    assert "GET mta-sts.unknown.test /logged-once 404" in tail


def test_a_changed_policy_file_is_served_without_a_restart(
    server: ServeProcess, pki: LabPKI, root: Path
) -> None:
    write_policy(root, "changing.test", "version: STSv1\nmode: testing\nmx: a.changing.test\n"
                 "max_age: 86400\n")  # fmt: skip
    first, _, body = http_request(MAIN, PORT, host="mta-sts.changing.test", server_name=HOST)
    assert first == 200 and b"mode: testing\r\n" in body
    write_policy(root, "changing.test", "version: STSv1\nmode: enforce\nmx: a.changing.test\n"
                 "max_age: 86400\n")  # fmt: skip
    second, _, body = http_request(MAIN, PORT, host="mta-sts.changing.test", server_name=HOST)
    assert second == 200 and b"mode: enforce\r\n" in body


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    ("highest", "accepted"),
    [("TLSv1_1", False), ("TLSv1_2", True)],  # the second row shows the client itself works
)
def test_tls_older_than_1_2_is_refused(server: ServeProcess, highest: str, accepted: bool) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion[highest]
    with socket.create_connection((MAIN, PORT), timeout=5) as raw:
        if accepted:
            with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                assert tls.version() == "TLSv1.2"
        else:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname=HOST)


def test_connections_are_bounded_in_number_and_lifetime(
    pki: LabPKI, root: Path, tmp_path: Path
) -> None:
    identity = pki.issue(HOST)
    pairs = [(identity.cert_file, identity.key_file)]
    with (
        serving(
            root,
            pairs,
            "127.82.0.7:443",
            tmp_path / "log",
            extra_args=["--concurrency", "1", "--timeout", "1"],
        ),
        socket.create_connection(("127.82.0.7", PORT), timeout=5) as raw,
        client_context(pki.ca_file).wrap_socket(raw, server_hostname=HOST) as idle,
    ):
        idle.sendall(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-")  # and no more
        # One connection is open: a second one is answered 503 ...
        status, _, _ = http_request("127.82.0.7", PORT, host=HOST, ca_file=pki.ca_file)
        assert status == 503
        # ... until the first one has lived its second and is closed by the server.
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert idle.recv(1024) == b""
        assert time.monotonic() - started < 3
        time.sleep(0.2)
        status, _, _ = http_request("127.82.0.7", PORT, host=HOST, ca_file=pki.ca_file)
        assert status == 200


# --- certificates ------------------------------------------------------------------------


def test_sighup_swaps_the_certificate_for_new_connections(
    pki: LabPKI, root: Path, tmp_path: Path
) -> None:
    old, new = pki.issue(HOST), pki.issue(HOST, CertKind.INTERMEDIATE)
    cert, key = copy_identity(old, tmp_path / "live")
    with serving(root, [(cert, key)], "127.82.0.3:443", tmp_path / "log") as server:
        assert served_certificate("127.82.0.3", PORT, HOST, pki.ca_file).serial_number == (
            old.leaf.serial_number
        )
        copy_identity(new, tmp_path / "live")
        offset = server.hup()
        server.wait_for_log("certificates reloaded", after=offset)
        assert served_certificate("127.82.0.3", PORT, HOST, pki.ca_file).serial_number == (
            new.leaf.serial_number
        )
        # Senders still fetch the policy: the new chain (with its intermediate) verifies.
        result = fetch(DOMAIN, pki.ca_file, "127.82.0.3")
        assert result.ok, result.detail
        assert server.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.parametrize("breakage", ["garbage-cert", "missing-cert", "key-of-another-cert"])
def test_a_broken_certificate_file_on_sighup_keeps_the_old_certificate(
    pki: LabPKI, root: Path, tmp_path: Path, breakage: str
) -> None:
    old = pki.issue(HOST)
    cert, key = copy_identity(old, tmp_path / "live")
    with serving(root, [(cert, key)], "127.82.0.4:443", tmp_path / "log") as server:
        if breakage == "garbage-cert":
            cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        elif breakage == "missing-cert":
            cert.unlink()
        else:  # a valid certificate, but the key on disk is still the old one
            shutil.copyfile(pki.issue(HOST, CertKind.INTERMEDIATE).cert_file, cert)
        offset = server.hup()
        tail = server.wait_for_log("still serving the certificate loaded before", after=offset)
        assert "ERROR: certificate reload" in tail
        assert served_certificate("127.82.0.4", PORT, HOST, pki.ca_file).serial_number == (
            old.leaf.serial_number
        )
        assert fetch(DOMAIN, pki.ca_file, "127.82.0.4").ok
        # Fixed files are taken at the next SIGHUP.
        new = pki.issue(HOST, CertKind.INTERMEDIATE)
        copy_identity(new, tmp_path / "live")
        offset = server.hup()
        server.wait_for_log("certificates reloaded", after=offset)
        assert served_certificate("127.82.0.4", PORT, HOST, pki.ca_file).serial_number == (
            new.leaf.serial_number
        )


def test_each_connection_gets_the_certificate_that_covers_its_server_name(
    pki: LabPKI, root: Path, tmp_path: Path
) -> None:
    write_policy(root, "other.test", "version: STSv1\nmode: testing\nmx: mx.other.test\n"
                 "max_age: 86400\n")  # fmt: skip
    first, second = pki.issue(HOST), pki.issue("mta-sts.other.test")
    pairs = [(first.cert_file, first.key_file), (second.cert_file, second.key_file)]
    with serving(root, pairs, "127.82.0.5:443", tmp_path / "log"):
        for name, identity in ((HOST, first), ("mta-sts.other.test", second)):
            served = served_certificate("127.82.0.5", PORT, name, pki.ca_file)
            assert served.serial_number == identity.leaf.serial_number
        assert fetch("other.test", pki.ca_file, "127.82.0.5").ok
        assert fetch(DOMAIN, pki.ca_file, "127.82.0.5").ok


def test_unusable_certificates_and_mismatched_options_are_usage_errors(
    pki: LabPKI, root: Path, tmp_path: Path
) -> None:
    identity = pki.issue(HOST)
    runner = CliRunner()
    base = ["serve", "mta-sts", "--root", str(root), "--listen", "127.82.0.6:443"]
    result = runner.invoke(main, [*base, "--cert", str(identity.cert_file)])
    assert result.exit_code == 2
    other_key = pki.issue("mta-sts.other.test").key_file
    result = runner.invoke(
        main, [*base, "--cert", str(identity.cert_file), "--key", str(other_key)]
    )
    assert result.exit_code == 2 and "cannot use" in result.output
    pair = ["--cert", str(identity.cert_file), "--key", str(identity.key_file)]
    result = runner.invoke(main, [*base[:-1], "not-an-address", *pair])
    assert result.exit_code == 2 and "ADDRESS[:PORT]" in result.output


# --- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "domain"),
    [
        ("mta-sts.example.com", "example.com"),
        ("mta-sts.example.com:443", "example.com"),
        ("MTA-STS.Example.COM", "example.com"),
        ("mta-sts.example.com.", "example.com"),
        ("mta-sts.xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("mta-sts.bücher.example", "xn--bcher-kva.example"),
        ("example.com", None),
        ("mta-sts.com", None),  # a policy host needs a domain of two labels at least
        ("www.mta-sts.example.com", None),
        ("mta-sts.exa_mple.com", None),
        ("mta-sts.example.com/../x", None),
        ("[::1]:443", None),
        ("127.0.0.1", None),
        ("", None),
    ],
)
def test_the_domain_comes_from_the_host_header(header: str, domain: str | None) -> None:
    assert srv.domain_of(header) == domain


@pytest.mark.parametrize(
    ("stored", "sent"),
    [
        ("a: b\nc: d\n", "a: b\r\nc: d\r\n"),
        ("a: b\r\nc: d\r\n", "a: b\r\nc: d\r\n"),
        ("a: b\r\nc: d\n", "a: b\r\nc: d\r\n"),
        ("a: b\nc: d", "a: b\r\nc: d"),  # no final line end added
        ("a: b\u2028c\n", "a: b\u2028c\r\n"),  # only LF ends a line (RFC 8461 §3.2)
    ],
)
def test_lines_are_sent_with_crlf_and_nothing_else_changes(stored: str, sent: str) -> None:
    assert srv.with_crlf(stored) == sent


@pytest.mark.parametrize(
    ("spec", "host", "port"),
    [
        ("127.82.0.1:443", "127.82.0.1", 443),
        ("127.82.0.1", "127.82.0.1", 443),
        ("[::1]:8443", "::1", 8443),
        ("[::]", "::", 443),
        ("::", "::", 443),
        ("0.0.0.0:0", "0.0.0.0", 0),
    ],
)
def test_listen_addresses(spec: str, host: str, port: int) -> None:
    listen = srv.parse_listen(spec)
    assert (listen.host, listen.port) == (host, port)


@pytest.mark.parametrize(
    "spec", ["localhost:443", "127.0.0.1:99999", "[::1]443", "1.2.3.4:x", "", "[::1"]
)
def test_bad_listen_addresses(spec: str) -> None:
    with pytest.raises(srv.ListenError):
        srv.parse_listen(spec)
