"""The lab's SMTP receivers and STRIPTLS attacker, against real sockets on 127.202.0.0/16.

Clients are the ones a sender would use: Python's smtplib (run in a thread, so the receivers and
the attacker keep running in the test's event loop), raw sockets for the wire-level checks, and
``openssl s_client -starttls smtp`` for what a TLS client is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import smtplib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import lab_peers as peers
from lab_peers import AddressPool, run
from mxguard.lab.attacker import Attacker, strip_starttls
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import AttackMode, CertKind, Host
from mxguard.lab.smtp_receiver import SmtpReceiver

pytestmark = pytest.mark.timeout(30)

MX = "mx.example.test"
SENDER = "alice@sender.test"
RECIPIENTS = ["bob@example.test", "carol@example.test"]
BODY = b"Subject: quarterly numbers\r\n\r\nThe secret figure is 4217.\r\n"

# OpenSSL verification error codes (include/openssl/x509_vfy.h), as ssl reports them.
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_HOSTNAME_MISMATCH = 62

fresh_address = AddressPool("127.202")  # this file's own loopback range


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


@contextlib.asynccontextmanager
async def receiver_for(
    pki: LabPKI, host: Host, address: str | None = None
) -> AsyncIterator[SmtpReceiver]:
    async with peers.receiver_for(pki, host, address or fresh_address()) as receiver:
        yield receiver


def attacked(
    pki: LabPKI, mode: AttackMode, host: Host | None = None
) -> contextlib.AbstractAsyncContextManager[tuple[SmtpReceiver, Attacker]]:
    return peers.attacked(pki, mode, host or Host(MX), fresh_address)


class Client(smtplib.SMTP):
    """smtplib, dialling an IP address but checking the certificate for the MX name."""

    def __init__(self, address: str, server_name: str = MX) -> None:
        super().__init__(address, 25, local_hostname="sender.test", timeout=5)
        # smtplib.starttls() passes _host as server_hostname (SNI and name check); it would
        # be the IP address we dialled.
        self._host = server_name


def verifying_context(pki: LabPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def ehlo_lines(client: smtplib.SMTP) -> list[bytes]:
    code, text = client.ehlo()
    assert code == 250, (code, text)
    return text.split(b"\n")


def send_over_tls(address: str, ctx: ssl.SSLContext) -> tuple[list[bytes], bytes]:
    """EHLO, STARTTLS, EHLO, one message; the first EHLO's lines and the peer certificate."""
    with Client(address) as client:
        first = ehlo_lines(client)
        client.starttls(context=ctx)
        client.ehlo()
        assert isinstance(client.sock, ssl.SSLSocket)
        cert = client.sock.getpeercert(binary_form=True)
        assert cert is not None
        client.sendmail(SENDER, RECIPIENTS, BODY)
    return first, cert


def send_plain(address: str) -> list[bytes]:
    with Client(address) as client:
        lines = ehlo_lines(client)
        client.sendmail(SENDER, RECIPIENTS, BODY)
    return lines


def tls_handshake(address: str, server_name: str, ctx: ssl.SSLContext) -> list[bytes]:
    """STARTTLS over a raw socket; the chain the server sent (DER, leaf first)."""
    with socket.create_connection((address, 25), timeout=5) as sock:
        stream = sock.makefile("rwb")
        assert stream.readline().startswith(b"220 ")
        stream.write(b"EHLO sender.test\r\n")
        stream.flush()
        while stream.readline()[3:4] == b"-":
            pass
        stream.write(b"STARTTLS\r\n")
        stream.flush()
        assert stream.readline().startswith(b"220 ")
        with ctx.wrap_socket(sock, server_hostname=server_name) as tls:
            # Undocumented before Python 3.13, see docs/lab-notes.md; public_bytes() gives PEM.
            chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
            return [ssl.PEM_cert_to_DER_cert(c.public_bytes()) for c in chain]


async def openssl_peer_cert(address: str, server_name: str) -> bytes:
    """The leaf certificate ``openssl s_client -starttls smtp`` is shown, as DER."""
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-starttls",
        "smtp",
        "-connect",
        f"{address}:25",
        "-servername",
        server_name,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        out, _ = await proc.communicate()
    pem = out[out.index(b"-----BEGIN CERTIFICATE-----") : out.index(b"-----END CERTIFICATE-----")]
    return der(x509.load_pem_x509_certificate(pem + b"-----END CERTIFICATE-----\n"))


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to 5 s: the effect of a close travels through the loop."""
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within 5 s: {what}")


def abort_socket(sock: socket.socket) -> None:
    """Close with a TCP RST, as a crashing client would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- the EHLO edit, as a pure function ----------------------------------------------------

HONEST = [
    b"250-smtp.example at your service\r\n",
    b"250-SIZE 35882577\r\n",
    b"250-8BITMIME\r\n",
    b"250-STARTTLS\r\n",
    b"250-ENHANCEDSTATUSCODES\r\n",
    b"250-PIPELINING\r\n",
    b"250 SMTPUTF8\r\n",
]


@pytest.mark.parametrize(
    ("rule", "reply", "expected"),
    [
        (
            "only the STARTTLS line goes (the README.md transcript)",
            HONEST,
            HONEST[:3] + HONEST[4:],
        ),
        (
            "STARTTLS last: the new last line gets the final '250 ' separator",
            [b"250-mx.example.test\r\n", b"250-8BITMIME\r\n", b"250 STARTTLS\r\n"],
            [b"250-mx.example.test\r\n", b"250 8BITMIME\r\n"],
        ),
        (
            "the keyword is case-insensitive and may carry trailing blanks",
            [b"250-mx\r\n", b"250-starttls \r\n", b"250 HELP\r\n"],
            [b"250-mx\r\n", b"250 HELP\r\n"],
        ),
        (
            "a reply without STARTTLS is left byte for byte",
            [b"250-mx\n", b"250-SIZE 10\n", b"250 HELP\n"],
            [b"250-mx\n", b"250-SIZE 10\n", b"250 HELP\n"],
        ),
        (
            "the greeting line is never an extension, even if it reads STARTTLS",
            [b"250 STARTTLS\r\n"],
            [b"250 STARTTLS\r\n"],
        ),
        (
            "only 250 replies are edited",
            [b"550-STARTTLS\r\n", b"550 STARTTLS\r\n"],
            [b"550-STARTTLS\r\n", b"550 STARTTLS\r\n"],
        ),
        (
            "an extension merely starting with STARTTLS stays",
            [b"250-mx\r\n", b"250 STARTTLSX\r\n"],
            [b"250-mx\r\n", b"250 STARTTLSX\r\n"],
        ),
    ],
)
def test_strip_starttls_rules(rule: str, reply: list[bytes], expected: list[bytes]) -> None:
    assert strip_starttls(reply) == expected, rule


# --- honest receivers ---------------------------------------------------------------------


def test_honest_receiver_offers_starttls_and_stores_a_tls_message(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with receiver_for(pki, Host(MX)) as receiver:
            reader, writer = await asyncio.open_connection(receiver.address, 25)
            banner = await reader.readline()
            writer.close()
            await writer.wait_closed()
            lines, cert = await asyncio.to_thread(
                send_over_tls, receiver.address, verifying_context(pki)
            )
            assert banner.startswith(b"220 " + MX.encode() + b" ")
            assert lines[0] == MX.encode() + b" at your service", "the EHLO greeting names the host"
            assert b"STARTTLS" in lines
            assert cert == der(pki.issue(MX).leaf)
            [msg] = receiver.messages
            assert msg.tls and msg.tls_version in ("TLSv1.2", "TLSv1.3")
            assert (msg.mail_from, list(msg.rcpt_tos)) == (SENDER, RECIPIENTS)
            assert BODY.rstrip(b"\r\n") in msg.data
            assert msg.peer.startswith("127.")
            assert msg.received_at.tzinfo is dt.UTC
            assert receiver.connections == 2  # the banner probe and the delivery
            receiver.clear()
            assert (receiver.messages, receiver.connections) == ([], 0)

    run(scenario)


def test_receiver_without_starttls_accepts_plain_text_only(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with receiver_for(pki, Host(MX, starttls=False)) as receiver:
            lines = await asyncio.to_thread(send_plain, receiver.address)
            assert b"STARTTLS" not in lines
            [msg] = receiver.messages
            assert (msg.tls, msg.tls_version) == (False, None)

    run(scenario)


def test_receiver_that_offers_starttls_needs_an_identity() -> None:
    with pytest.raises(ValueError, match="identity"):
        SmtpReceiver(Host(MX), None, "127.202.255.1", 25)


@pytest.mark.parametrize(
    ("kind", "chain_length", "verify_code"),
    [
        (CertKind.VALID, 1, None),
        (CertKind.INTERMEDIATE, 2, None),  # the intermediate is sent along with the leaf
        (CertKind.EXPIRED, 1, X509_V_ERR_CERT_HAS_EXPIRED),
        (CertKind.WRONG_NAME, 1, X509_V_ERR_HOSTNAME_MISMATCH),
        (CertKind.SELF_SIGNED, 1, X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT),
        (CertKind.UNTRUSTED, 1, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY),
    ],
)
def test_receiver_presents_its_certificate_variant(
    pki: LabPKI, kind: CertKind, chain_length: int, verify_code: int | None
) -> None:
    async def scenario() -> None:
        async with receiver_for(pki, Host(MX, cert=kind)) as receiver:
            sent = await asyncio.to_thread(
                tls_handshake, receiver.address, MX, unverified_context()
            )
            assert sent == [der(c) for c in pki.issue(MX, kind).chain]
            assert len(sent) == chain_length
            if verify_code is None:
                await asyncio.to_thread(tls_handshake, receiver.address, MX, verifying_context(pki))
            else:
                with pytest.raises(ssl.SSLCertVerificationError) as failure:
                    await asyncio.to_thread(
                        tls_handshake, receiver.address, MX, verifying_context(pki)
                    )
                assert failure.value.verify_code == verify_code, failure.value.verify_message

    run(scenario)


# --- the attacker -------------------------------------------------------------------------


def test_pass_mode_is_an_honest_path(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.PASS) as (receiver, attacker):
            direct, _ = await asyncio.to_thread(
                send_over_tls, receiver.address, verifying_context(pki)
            )
            proxied, cert = await asyncio.to_thread(
                send_over_tls, attacker.listen[0], verifying_context(pki)
            )
            assert proxied == direct
            assert cert == der(pki.issue(MX).leaf)
            assert [m.tls for m in receiver.messages] == [True, True]
            assert receiver.messages[1].tls_version is not None
            assert b"STARTTLS" in attacker.client_bytes()
            assert b"4217" not in attacker.client_bytes(), "the body crossed encrypted"
            [session] = attacker.sessions
            assert session.mode is AttackMode.PASS
            assert not (session.stripped or session.refused or session.intercepted)

    run(scenario)


def test_strip_mode_deletes_only_starttls_and_reads_the_mail(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.STRIP) as (receiver, attacker):
            honest = await asyncio.to_thread(send_plain, receiver.address)
            stripped = await asyncio.to_thread(send_plain, attacker.listen[0])
            assert b"STARTTLS" in honest
            assert stripped == [line for line in honest if line != b"STARTTLS"]
            assert f"mail from:<{SENDER}>".encode() in attacker.client_bytes().lower()
            assert BODY.rstrip(b"\r\n") in attacker.client_bytes()
            assert b"250-STARTTLS" in attacker.server_bytes(), "it saw what it deleted"
            assert [m.tls for m in receiver.messages] == [False, False]
            [session] = attacker.sessions
            assert session.stripped and not session.intercepted

    run(scenario)


def test_strip_mode_fixes_the_separator_when_starttls_was_last(pki: LabPKI) -> None:
    """A scripted server whose EHLO reply ends in STARTTLS; the wire bytes are checked."""
    reply = [b"250-mx.example.test\r\n", b"250-PIPELINING\r\n", b"250 STARTTLS\r\n"]

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"".join(reply))
        await writer.drain()
        await reader.read()
        writer.close()

    async def scenario() -> None:
        address = fresh_address()
        server = await asyncio.start_server(scripted, address, 25)
        attacker = Attacker(MX, (fresh_address(), 25), (address, 25), AttackMode.STRIP, pki)
        await attacker.start()
        try:
            reader, writer = await asyncio.open_connection(attacker.listen[0], 25)
            await reader.readline()
            writer.write(b"EHLO sender.test\r\n")
            async with asyncio.timeout(5):
                got = [await reader.readline(), await reader.readline()]
            assert got == strip_starttls(reply) == [reply[0], b"250 PIPELINING\r\n"]
            writer.close()
            await writer.wait_closed()
        finally:
            await attacker.stop()
            server.close()
            await server.wait_closed()

    run(scenario)


@pytest.mark.parametrize(
    ("mode", "code", "reply"),
    [
        (AttackMode.STRIP, 502, b"5.5.1 Command not implemented"),
        (AttackMode.REFUSE_454, 454, b"4.7.0 TLS not available due to temporary reason"),
    ],
)
def test_attacker_answers_starttls_itself(
    pki: LabPKI, mode: AttackMode, code: int, reply: bytes
) -> None:
    def try_starttls(address: str) -> tuple[bool, int, bytes | str]:
        with Client(address) as client:
            client.ehlo()
            offered = client.has_extn("starttls")
            text: bytes | str
            try:
                # smtplib refuses to send STARTTLS it was not offered; a hardened sender
                # might try anyway, so send the command itself then.
                if offered:
                    client.starttls(context=unverified_context())
                    raise AssertionError("STARTTLS succeeded through the attacker")
                code, text = client.docmd("STARTTLS")
            except smtplib.SMTPResponseException as exc:
                code, text = exc.smtp_code, exc.smtp_error
            # The opportunistic sender's next step: deliver in plain text.
            client.sendmail(SENDER, RECIPIENTS, BODY)
            return offered, code, text

    async def scenario() -> None:
        async with attacked(pki, mode) as (receiver, attacker):
            offered, got_code, got_reply = await asyncio.to_thread(try_starttls, attacker.listen[0])
            assert (got_code, got_reply) == (code, reply)
            assert offered is (mode is AttackMode.REFUSE_454), "454 leaves the EHLO alone"
            [session] = attacker.sessions
            assert session.refused
            assert [m.tls for m in receiver.messages] == [False], "and the mail went in clear"

    run(scenario)


@pytest.mark.parametrize(
    ("mode", "kind", "verify_code"),
    [
        (
            AttackMode.INTERCEPT_SELF_SIGNED,
            CertKind.SELF_SIGNED,
            X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        ),
        (AttackMode.INTERCEPT_WRONG_NAME, CertKind.WRONG_NAME, X509_V_ERR_HOSTNAME_MISMATCH),
    ],
)
def test_intercepting_attacker_shows_its_own_certificate_and_reads_the_mail(
    pki: LabPKI, mode: AttackMode, kind: CertKind, verify_code: int
) -> None:
    async def scenario() -> None:
        async with attacked(pki, mode) as (receiver, attacker):
            address = attacker.listen[0]
            forged = der(pki.issue(MX, kind).leaf)
            _, cert = await asyncio.to_thread(send_over_tls, address, unverified_context())
            assert cert == forged != der(pki.issue(MX).leaf)
            if shutil.which("openssl"):
                assert await openssl_peer_cert(address, MX) == forged
            with pytest.raises(ssl.SSLCertVerificationError) as failure:
                await asyncio.to_thread(send_over_tls, address, verifying_context(pki))
            assert failure.value.verify_code == verify_code

            first = attacker.sessions[0]
            assert first.intercepted and first.upstream_tls
            assert first.client_tls_version in ("TLSv1.2", "TLSv1.3")
            assert BODY.rstrip(b"\r\n") in first.client_bytes
            assert f"rcpt to:<{RECIPIENTS[0]}>".encode() in first.client_bytes.lower()
            [msg] = receiver.messages  # the verifying client gave up before MAIL FROM
            assert msg.tls and BODY.rstrip(b"\r\n") in msg.data
            await eventually(lambda: not attacker.sessions[-1].open, "the refused session ended")
            refused = attacker.sessions[-1]
            assert not refused.intercepted and refused.error is not None

    run(scenario)


def test_mode_changes_apply_to_new_connections(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.PASS) as (_, attacker):
            first = await asyncio.to_thread(send_plain, attacker.listen[0])
            attacker.mode = AttackMode.STRIP
            second = await asyncio.to_thread(send_plain, attacker.listen[0])
            assert b"STARTTLS" in first and b"STARTTLS" not in second
            assert [s.mode for s in attacker.sessions] == [AttackMode.PASS, AttackMode.STRIP]
            attacker.clear()
            assert (attacker.sessions, attacker.client_bytes()) == ([], b"")

    run(scenario)


@pytest.mark.parametrize("mode", [AttackMode.STRIP, AttackMode.INTERCEPT_SELF_SIGNED])
def test_abrupt_client_breaks_neither_attacker_nor_receiver(pki: LabPKI, mode: AttackMode) -> None:
    def crash_mid_session(address: str) -> None:
        sock = socket.create_connection((address, 25), timeout=5)
        stream = sock.makefile("rwb")
        stream.readline()
        stream.write(b"EHLO sender.test\r\n")
        stream.flush()
        while stream.readline()[3:4] == b"-":
            pass
        if mode is AttackMode.INTERCEPT_SELF_SIGNED:
            # Crash in the middle of the TLS handshake.
            stream.write(b"STARTTLS\r\n")
            stream.flush()
            assert stream.readline().startswith(b"220 ")
            sock.sendall(b"\x16\x03\x01\x00\x05garb")
        else:
            # Crash in the middle of a command line.
            stream.write(b"MAIL FR")
            stream.flush()
        stream.close()
        abort_socket(sock)

    async def scenario() -> None:
        async with attacked(pki, mode) as (receiver, attacker):
            await asyncio.to_thread(crash_mid_session, attacker.listen[0])
            await asyncio.to_thread(crash_mid_session, receiver.address)
            await eventually(lambda: not attacker.sessions[0].open, "attacker closed session")
            await eventually(lambda: receiver.open_connections == 0, "upstream closed too")
            if mode is AttackMode.STRIP:
                await asyncio.to_thread(send_plain, attacker.listen[0])
            else:
                await asyncio.to_thread(send_over_tls, attacker.listen[0], unverified_context())
            assert len(receiver.messages) == 1
            assert attacker.sessions[0].error is not None or mode is AttackMode.STRIP

    run(scenario)


def test_closing_the_server_side_closes_the_client_side(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.STRIP) as (receiver, attacker):
            reader, writer = await asyncio.open_connection(attacker.listen[0], 25)
            assert (await reader.readline()).startswith(b"220 ")
            await receiver.stop()
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            await eventually(lambda: not attacker.sessions[0].open, "session ended")

    run(scenario)


def test_overlong_lines_are_forwarded_not_buffered(pki: LabPKI) -> None:
    received = bytearray()

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)
        writer.close()

    async def scenario() -> None:
        address = fresh_address()
        server = await asyncio.start_server(capture, address, 25)
        attacker = Attacker(MX, (fresh_address(), 25), (address, 25), AttackMode.STRIP, pki)
        await attacker.start()
        try:
            _, writer = await asyncio.open_connection(attacker.listen[0], 25)
            line = b"NOOP " + b"x" * 10_000  # no line end, ever
            writer.write(line)
            await writer.drain()
            await eventually(lambda: bytes(received) == line, "the whole line went through")
            writer.close()
            await writer.wait_closed()
        finally:
            await attacker.stop()
            server.close()
            await server.wait_closed()

    run(scenario)


def test_stop_cuts_open_connections_and_leaves_no_task(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.STRIP) as (receiver, attacker):
            reader, writer = await asyncio.open_connection(attacker.listen[0], 25)
            assert (await reader.readline()).startswith(b"220 ")
            await attacker.stop()
            await receiver.stop()
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        # run() asserts that no task is left.

    run(scenario)
