"""The STARTTLS SMTP client (RFC 5321, RFC 3207) against real peers on 127.206.0.0/16.

Honest lab receivers and the lab's STRIPTLS attacker show what the client learns and sends in
each attack; tiny scripted servers written here play the broken and hostile servers the lab
does not have (endless lines, endless replies, silence, injected plain text, garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import lab_peers as peers
from lab_peers import AddressPool, run
from mxguard.adapters.smtp import MAX_LINE, SmtpClient, SmtpError, SmtpErrorKind
from mxguard.lab.attacker import Attacker
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import AttackMode, CertKind, Host
from mxguard.lab.smtp_receiver import SmtpReceiver
from mxguard.protocol.pkix import verify_pkix
from mxguard.protocol.results import ResultType
from mxguard.protocol.smtp import MAX_REPLY_LINES, Reply, ReplyError, dot_stuff, parse_reply

pytestmark = pytest.mark.timeout(30)

MX = "mx.example.test"
HELO = "sender.test"
SENDER = "alice@sender.test"
RECIPIENT = "bob@example.test"
BODY = b"Subject: quarterly numbers\r\n\r\nThe secret figure is 4217.\r\n"
STEP_TIMEOUT = 1.0  # for the hostile servers: each must fail well within this

fresh_address = AddressPool("127.206")  # this file's own loopback range


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


def der(certs: tuple[x509.Certificate, ...]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def receiver_for(pki: LabPKI, host: Host) -> contextlib.AbstractAsyncContextManager[SmtpReceiver]:
    return peers.receiver_for(pki, host, fresh_address())


def attacked(
    pki: LabPKI, mode: AttackMode
) -> contextlib.AbstractAsyncContextManager[tuple[SmtpReceiver, Attacker]]:
    return peers.attacked(pki, mode, Host(MX), fresh_address)


async def connected(address: str, *, require_tls: bool = False) -> SmtpClient:
    client = SmtpClient(require_tls=require_tls)
    await client.connect(address, 25, helo_name=HELO, timeout=5)
    return client


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[str]:
    """A one-off SMTP server running ``handler`` per connection; yields its address."""
    address = fresh_address()
    tasks: set[asyncio.Task[None]] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, OSError):
            pass  # the client cut us off, which is what these tests expect
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(session, address, 25)
    try:
        yield address
    finally:
        server.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Banner, then read the EHLO line."""
    writer.write(b"220 scripted.test ESMTP\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"EHLO ")


# --- replies and DATA, as pure functions ------------------------------------------------------

REPLY_ROWS = [
    # (rule, lines on the wire, code, texts, enhanced code)
    ("single_line", [b"250 OK\r\n"], 250, ("OK",), None),
    ("bare_code_is_a_complete_line", [b"250\r\n"], 250, ("",), None),
    ("multi_line_keeps_every_text", [b"250-a\r\n", b"250-b c\r\n", b"250 d\r\n"], 250,
     ("a", "b c", "d"), None),
    ("enhanced_code_from_first_line", [b"550 5.7.1 go away\r\n"], 550, ("5.7.1 go away",),
     "5.7.1"),
    ("enhanced_code_of_other_class_is_ignored", [b"250 5.0.0 odd\r\n"], 250, ("5.0.0 odd",),
     None),
    ("bare_lf_line_end_is_tolerated", [b"221 bye\n"], 221, ("bye",), None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "code", "texts", "enhanced"),
    [r[1:] for r in REPLY_ROWS],
    ids=[r[0] for r in REPLY_ROWS],
)
def test_reply_parsing(
    lines: list[bytes], code: int, texts: tuple[str, ...], enhanced: str | None
) -> None:
    assert parse_reply(lines) == Reply(code, texts, enhanced)


BAD_REPLY_ROWS = [
    # (rule, lines, what the error must say)
    ("code_must_be_digits", [b"ABC hello\r\n"], "does not start with a code"),
    ("code_must_be_200_to_599", [b"100 hello\r\n"], "does not start with a code"),
    ("separator_is_space_or_dash", [b"250*hello\r\n"], "expected ' ' or '-'"),
    ("all_lines_carry_one_code", [b"250-a\r\n", b"251 b\r\n"], "code 251, the first line had 250"),
    ("only_the_last_line_is_final", [b"250 a\r\n", b"250 b\r\n"], "final before the end"),
    ("the_last_line_is_final", [b"250-a\r\n"], "continued at the end"),
    ("at_most_200_lines", [b"250-x\r\n"] * MAX_REPLY_LINES + [b"250 x\r\n"], "at most 200"),
]


@pytest.mark.parametrize(
    ("lines", "message"), [r[1:] for r in BAD_REPLY_ROWS], ids=[r[0] for r in BAD_REPLY_ROWS]
)
def test_malformed_replies_are_named(lines: list[bytes], message: str) -> None:
    with pytest.raises(ReplyError, match=message):
        parse_reply(lines)


DOT_ROWS = [
    # (rule, message, bytes on the wire after DATA)
    ("leading_dot_is_doubled", b".hidden\r\n", b"..hidden\r\n.\r\n"),
    ("lone_dot_line_is_doubled", b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    ("dots_inside_a_line_stay", b"a.b\r\n", b"a.b\r\n.\r\n"),
    ("bare_lf_becomes_crlf", b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    ("bare_cr_becomes_crlf", b"a\rb", b"a\r\nb\r\n.\r\n"),
    ("missing_final_line_end_is_added", b"a", b"a\r\n.\r\n"),
    ("empty_message_is_just_the_end", b"", b".\r\n"),
]


@pytest.mark.parametrize(
    ("message", "wire"), [r[1:] for r in DOT_ROWS], ids=[r[0] for r in DOT_ROWS]
)
def test_dot_stuffing(message: bytes, wire: bytes) -> None:
    assert dot_stuff(message) == wire


# --- an honest receiver -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [CertKind.VALID, CertKind.INTERMEDIATE])
def test_starttls_with_honest_receiver_collects_its_chain_and_delivers(
    pki: LabPKI, kind: CertKind
) -> None:
    async def scenario() -> None:
        async with receiver_for(pki, Host(MX, cert=kind)) as receiver:
            assert receiver.identity is not None
            async with SmtpClient(require_tls=True) as client:
                await client.connect(receiver.address, 25, helo_name=HELO, timeout=5)
                assert client.starttls_offered
                info = await client.starttls(MX + ".")
                assert info.version in ("TLSv1.2", "TLSv1.3")
                assert info.server_name == MX and info.cipher  # SNI has no trailing dot
                assert der(info.chain) == der(receiver.identity.chain)
                assert len(info.chain) == (2 if kind is CertKind.INTERMEDIATE else 1)
                verdict = verify_pkix(info.chain, name=MX, roots=(pki.root_cert,), now=pki.now)
                assert verdict.ok, verdict.detail
                assert (await client.mail_from(SENDER)).code == 250
                assert (await client.rcpt_to(RECIPIENT)).code == 250
                final = await client.data(BODY)
                assert final.code == 250 and final.enhanced == "2.0.0"
                assert (await client.quit()) is not None
            [message] = receiver.messages
            assert message.tls and message.tls_version == info.version
            assert message.data == BODY and message.rcpt_tos == (RECIPIENT,)

    run(scenario)


def test_capabilities_are_forgotten_and_ehlo_sent_again_after_tls(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with receiver_for(pki, Host(MX)) as receiver, SmtpClient() as client:
            await client.connect(receiver.address, 25, helo_name=HELO, timeout=5)
            before = client.ehlo_reply
            await client.starttls(MX)
            after = client.ehlo_reply
            # The lab receiver offers STARTTLS only before TLS: the capabilities in force
            # are the second EHLO's (RFC 3207 §4.2).
            assert before is not None and after is not None and before != after
            assert "STARTTLS" in before.text and not client.starttls_offered
            assert "PIPELINING" in client.capabilities
            sent = [e.text for e in client.transcript if e.direction == "C"]
            assert sent == [f"EHLO {HELO}", "STARTTLS", f"EHLO {HELO}"]
            tls_event = next(
                i for i, e in enumerate(client.transcript) if e.text.startswith("TLS ")
            )
            assert client.transcript[tls_event + 1].text == f"EHLO {HELO}"

    run(scenario)


def test_dot_stuffed_body_arrives_unchanged(pki: LabPKI) -> None:
    body = b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\n. \r\nlast\r\n"

    async def scenario() -> None:
        async with receiver_for(pki, Host(MX)) as receiver:
            async with SmtpClient() as client:
                await client.connect(receiver.address, 25, helo_name=HELO, timeout=5)
                await client.starttls(MX)
                await client.mail_from(SENDER)
                await client.rcpt_to(RECIPIENT)
                assert (await client.data(body)).code == 250
            assert [m.data for m in receiver.messages] == [body]

    run(scenario)


def test_transcript_has_commands_and_replies_but_no_body(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with receiver_for(pki, Host(MX)) as receiver:
            async with SmtpClient() as client:
                await client.connect(receiver.address, 25, helo_name=HELO, timeout=5)
                await client.starttls(MX)
                await client.mail_from(SENDER)
                await client.rcpt_to(RECIPIENT)
                await client.data(BODY)
                text = "\n".join(str(e) for e in client.transcript)
            assert f"C: MAIL FROM:<{SENDER}>" in text and "S: 250 2.0.0" in text
            assert "4217" not in text and "quarterly" not in text
            assert f"<message, {len(dot_stuff(BODY))} bytes on the wire>" in text

    run(scenario)


# --- the STRIPTLS attacker ----------------------------------------------------------------------


def test_strip_mode_hides_starttls_and_starttls_anyway_is_refused(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.STRIP) as (_, attacker):
            client = await connected(attacker.listen[0])
            try:
                assert not client.starttls_offered
                with pytest.raises(SmtpError) as info:
                    await client.starttls(MX)
                err = info.value
                assert err.kind is SmtpErrorKind.REFUSED and err.reply is not None
                assert err.reply.code == 502
                assert err.result_type is ResultType.STARTTLS_NOT_SUPPORTED
            finally:
                await client.close()
            assert attacker.sessions[0].stripped

    run(scenario)


def test_454_mode_reports_the_refusal_and_the_session_goes_on(pki: LabPKI) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.REFUSE_454) as (_, attacker):
            client = await connected(attacker.listen[0])
            try:
                assert client.starttls_offered
                with pytest.raises(SmtpError) as info:
                    await client.starttls(MX)
                assert info.value.reply is not None and info.value.reply.code == 454
                assert info.value.result_type is ResultType.STARTTLS_NOT_SUPPORTED
                assert client.tls is None
                assert (await client.noop()).code == 250  # still a usable plain session
            finally:
                await client.close()

    run(scenario)


INTERCEPT_ROWS = [
    (AttackMode.INTERCEPT_SELF_SIGNED, CertKind.SELF_SIGNED, ResultType.CERTIFICATE_NOT_TRUSTED),
    (AttackMode.INTERCEPT_WRONG_NAME, CertKind.WRONG_NAME, ResultType.CERTIFICATE_HOST_MISMATCH),
]


@pytest.mark.parametrize(("mode", "kind", "result_type"), INTERCEPT_ROWS, ids=lambda v: str(v))
def test_intercepting_attacker_is_seen_in_the_chain(
    pki: LabPKI, mode: AttackMode, kind: CertKind, result_type: ResultType
) -> None:
    async def scenario() -> None:
        async with attacked(pki, mode) as (receiver, attacker):
            async with SmtpClient(require_tls=True) as client:
                await client.connect(attacker.listen[0], 25, helo_name=HELO, timeout=5)
                info = await client.starttls(MX)
            assert der(info.chain) == der(pki.issue(MX, kind).chain)
            assert receiver.identity is not None
            assert der(info.chain) != der(receiver.identity.chain)
            verdict = verify_pkix(info.chain, name=MX, roots=(pki.root_cert,), now=pki.now)
            assert not verdict.ok and verdict.result_type is result_type
            assert attacker.sessions[0].intercepted

    run(scenario)


GUARDED_STEPS: list[tuple[str, Callable[[SmtpClient], Awaitable[object]]]] = [
    ("MAIL FROM", lambda c: c.mail_from(SENDER)),
    ("RCPT TO", lambda c: c.rcpt_to(RECIPIENT)),
    ("DATA", lambda c: c.data(BODY)),
    ("AUTH", lambda c: c.auth("alice", "secret")),
]


@pytest.mark.parametrize(("step", "call"), GUARDED_STEPS, ids=[s for s, _ in GUARDED_STEPS])
def test_require_tls_guard_sends_nothing_in_plain_text(
    pki: LabPKI, step: str, call: Callable[[SmtpClient], Awaitable[object]]
) -> None:
    async def scenario() -> None:
        async with attacked(pki, AttackMode.STRIP) as (receiver, attacker):
            async with SmtpClient(require_tls=True) as client:
                await client.connect(attacker.listen[0], 25, helo_name=HELO, timeout=5)
                with pytest.raises(SmtpError) as info:
                    await call(client)
                assert info.value.kind is SmtpErrorKind.TLS_REQUIRED
                assert info.value.step == step
                # NOOP's reply proves that anything sent before it has reached the attacker.
                assert (await client.noop()).code == 250
                assert attacker.client_bytes() == f"EHLO {HELO}\r\nNOOP\r\n".encode()
            assert receiver.messages == []

    run(scenario)


def test_without_the_guard_a_stripped_session_leaks_the_message(pki: LabPKI) -> None:
    # The contrast that makes the guard worth having: the same client, opportunistic.
    async def scenario() -> None:
        async with attacked(pki, AttackMode.STRIP) as (receiver, attacker):
            async with SmtpClient(require_tls=False) as client:
                await client.connect(attacker.listen[0], 25, helo_name=HELO, timeout=5)
                await client.mail_from(SENDER)
                await client.rcpt_to(RECIPIENT)
                assert (await client.data(BODY)).code == 250
            assert b"4217" in attacker.client_bytes()
            assert [m.tls for m in receiver.messages] == [False]

    run(scenario)


# --- broken and hostile servers -----------------------------------------------------------------


async def endless_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await greet(reader, writer)
    writer.write(b"250 ")
    while True:
        writer.write(b"x" * 1024)
        await writer.drain()


async def endless_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await greet(reader, writer)
    while True:
        writer.write(b"250-more\r\n" * 50)
        await writer.drain()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await greet(reader, writer)
    await reader.read()  # until the client gives up


async def dripping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await greet(reader, writer)
    while True:  # a well-formed reply that never ends, slower than the line bound
        writer.write(b"250-still going\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)


def answering_ehlo(answer: bytes, *, then_close: bool = False) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer)
        writer.write(answer)
        await writer.drain()
        if not then_close:
            await reader.read()

    return handler


HOSTILE_ROWS = [
    # (rule, server, error kind, what the message must say)
    ("endless_reply_line", endless_line, SmtpErrorKind.PROTOCOL, f"longer than {MAX_LINE}"),
    ("endless_multi_line_reply", endless_reply, SmtpErrorKind.PROTOCOL, "more than 200 lines"),
    ("no_reply_at_all", silent, SmtpErrorKind.TIMEOUT, "no complete reply within 1 s"),
    ("reply_that_never_finishes", dripping, SmtpErrorKind.TIMEOUT, "no complete reply"),
    ("garbage_code", answering_ehlo(b"hello there\r\n"), SmtpErrorKind.PROTOCOL,
     "'hello there' does not start with a code"),
    ("mismatched_codes", answering_ehlo(b"250-a\r\n354 b\r\n"), SmtpErrorKind.PROTOCOL,
     "code 354, the first line had 250"),
    ("closed_mid_line", answering_ehlo(b"250-a\r\n250 b", then_close=True), SmtpErrorKind.CLOSED,
     "in the middle of a reply line"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("handler", "kind", "message"), [r[1:] for r in HOSTILE_ROWS], ids=[r[0] for r in HOSTILE_ROWS]
)
def test_hostile_server_gives_an_error_within_the_timeout(
    handler: Handler, kind: SmtpErrorKind, message: str
) -> None:
    async def scenario() -> None:
        async with scripted(handler) as address:
            client = SmtpClient()
            started = time.monotonic()
            with pytest.raises(SmtpError) as info:
                await client.connect(address, 25, helo_name=HELO, timeout=STEP_TIMEOUT)
            elapsed = time.monotonic() - started
            assert info.value.step == "EHLO"
            assert info.value.kind is kind, info.value
            assert message in str(info.value)
            assert elapsed < STEP_TIMEOUT + 5  # the step timeout, not a hang
            assert not client.connected

    run(scenario)


def scripted_session(answers: dict[bytes, bytes]) -> Handler:
    """Banner, then one canned answer per command (matched by the first word)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.get(b"", b"220 scripted.test ESMTP\r\n"))
        await writer.drain()
        while line := await reader.readline():
            word = line.split()[0].upper() if line.split() else b""
            writer.write(answers.get(word, b"502 5.5.2 not in the script\r\n"))
            await writer.drain()

    return handler


def test_ehlo_refused_with_5xx_falls_back_to_helo() -> None:
    async def scenario() -> None:
        answers = {b"EHLO": b"502 5.5.2 what?\r\n", b"HELO": b"250 scripted.test\r\n"}
        async with scripted(scripted_session(answers)) as address, SmtpClient() as client:
            await client.connect(address, 25, helo_name=HELO, timeout=STEP_TIMEOUT)
            assert client.ehlo_reply == Reply(250, ("scripted.test",))
            assert not client.starttls_offered and dict(client.capabilities) == {}
            sent = [e.text for e in client.transcript if e.direction == "C"]
            assert sent == [f"EHLO {HELO}", f"HELO {HELO}"]

    run(scenario)


def test_greeting_refused_twice_is_an_error_and_the_client_quits() -> None:
    async def scenario() -> None:
        answers = {
            b"EHLO": b"550 5.7.1 not you\r\n",
            b"HELO": b"550 5.7.1 not you either\r\n",
            b"QUIT": b"221 bye\r\n",
        }
        async with scripted(scripted_session(answers)) as address:
            client = SmtpClient()
            with pytest.raises(SmtpError) as info:
                await client.connect(address, 25, helo_name=HELO, timeout=STEP_TIMEOUT)
            assert info.value.kind is SmtpErrorKind.REFUSED
            assert info.value.reply is not None and info.value.reply.code == 550
            sent = [e.text for e in client.transcript if e.direction == "C"]
            assert sent == [f"EHLO {HELO}", f"HELO {HELO}", "QUIT"]
            assert not client.connected

    run(scenario)


def test_refusing_banner_is_an_error_with_the_reply() -> None:
    async def scenario() -> None:
        answers = {b"": b"554 5.3.2 no service for you\r\n", b"QUIT": b"221 bye\r\n"}
        async with scripted(scripted_session(answers)) as address:
            client = SmtpClient()
            with pytest.raises(SmtpError) as info:
                await client.connect(address, 25, helo_name=HELO, timeout=STEP_TIMEOUT)
            assert info.value.kind is SmtpErrorKind.REFUSED
            assert info.value.reply == Reply(554, ("5.3.2 no service for you",), "5.3.2")
            assert [e.text for e in client.transcript if e.direction == "C"] == ["QUIT"]

    run(scenario)


def test_plain_text_after_the_220_to_starttls_is_refused_not_read_as_tls() -> None:
    # RFC 3207 §4.2: an on-path attacker appends its own "reply" to the 220; a client that
    # kept it would read it as the first reply inside TLS.
    async def scenario() -> None:
        answers = {
            b"EHLO": b"250-scripted.test\r\n250 STARTTLS\r\n",
            b"STARTTLS": b"220 go ahead\r\n250-INJECTED\r\n250 AUTH PLAIN\r\n",
        }
        async with scripted(scripted_session(answers)) as address:
            client = await connected(address)
            with pytest.raises(SmtpError) as info:
                await client.starttls("scripted.test")
            assert info.value.kind is SmtpErrorKind.PROTOCOL
            assert "after the 220" in info.value.message
            assert not client.connected and client.tls is None

    run(scenario)


def test_failed_handshake_is_a_tls_error() -> None:
    async def scenario() -> None:
        answers = {
            b"EHLO": b"250-scripted.test\r\n250 STARTTLS\r\n",
            b"STARTTLS": b"220 go ahead\r\n",
        }

        async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 scripted.test ESMTP\r\n")
            for _ in range(2):
                line = await reader.readline()
                writer.write(answers[line.split()[0].upper()])
                await writer.drain()
            await reader.read(5)  # the start of the ClientHello
            writer.write(b"this is not a TLS record\r\n" * 4)
            await writer.drain()
            await reader.read()

        async with scripted(not_tls) as address:
            client = await connected(address)
            with pytest.raises(SmtpError) as info:
                await client.starttls("scripted.test")
            assert info.value.kind is SmtpErrorKind.TLS
            assert info.value.result_type is ResultType.VALIDATION_FAILURE
            assert "TLS handshake with scripted.test failed" in info.value.message
            assert not client.connected

    run(scenario)


def test_auth_credentials_stay_out_of_the_transcript() -> None:
    async def scenario() -> None:
        answers = {
            b"EHLO": b"250-scripted.test\r\n250 AUTH LOGIN PLAIN\r\n",
            b"AUTH": b"235 2.7.0 welcome\r\n",
        }
        async with scripted(scripted_session(answers)) as address:
            async with SmtpClient() as client:
                await client.connect(address, 25, helo_name=HELO, timeout=STEP_TIMEOUT)
                assert (await client.auth("alice", "hunter2")).code == 235
                text = "\n".join(str(e) for e in client.transcript)
            assert "C: AUTH PLAIN ********" in text
            assert "hunter2" not in text and "aHVudGVyMg" not in text  # nor its base64 form

    run(scenario)


def test_nothing_listening_is_a_connect_error() -> None:
    async def scenario() -> None:
        client = SmtpClient()
        with pytest.raises(SmtpError) as info:
            await client.connect(fresh_address(), 25, helo_name=HELO, timeout=STEP_TIMEOUT)
        assert info.value.kind is SmtpErrorKind.CONNECT

    run(scenario)


USAGE_ROWS: list[tuple[str, Callable[[SmtpClient], Awaitable[object]], str]] = [
    ("crlf_in_an_address_cannot_inject_commands",
     lambda c: c.rcpt_to("bob@example.test>\r\nDATA"), "contains CR, LF or NUL"),
    ("angle_brackets_are_not_part_of_an_address", lambda c: c.mail_from("<a@b.test>"),
     "is not a mailbox"),
    ("empty_recipient", lambda c: c.rcpt_to(""), "must not be empty"),
    ("sni_must_be_a_host_name", lambda c: c.starttls("."), "not a host name to send as SNI"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "message"), [r[1:] for r in USAGE_ROWS], ids=[r[0] for r in USAGE_ROWS]
)
def test_bad_arguments_are_refused_before_sending(
    call: Callable[[SmtpClient], Awaitable[object]], message: str
) -> None:
    async def scenario() -> None:
        answers = {b"EHLO": b"250 scripted.test\r\n", b"NOOP": b"250 ok\r\n"}
        async with scripted(scripted_session(answers)) as address, SmtpClient() as client:
            await client.connect(address, 25, helo_name=HELO, timeout=STEP_TIMEOUT)
            with pytest.raises(SmtpError, match=message) as info:
                await call(client)
            assert info.value.kind is SmtpErrorKind.USAGE
            assert (await client.noop()).code == 250
            sent = [e.text for e in client.transcript if e.direction == "C"]
            assert sent == [f"EHLO {HELO}", "NOOP"]

    run(scenario)


def test_the_client_never_negotiates_below_tls_1_2() -> None:
    # RFC 8996 retires TLS 1.0 and 1.1; RFC 8461 §3.3 and RFC 7672 §3 build on RFC 7525.
    import ssl

    from mxguard.adapters.smtp import _client_tls_context

    assert _client_tls_context().minimum_version >= ssl.TLSVersion.TLSv1_2
