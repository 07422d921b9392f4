"""`mxguard relay` against the lab: real TLS MX hosts, MTA-STS, the STRIPTLS attacker.

- A message to an MTA-STS `enforce` domain whose STARTTLS is stripped is deferred, retried
  under the same policy and finally returned to its sender in a DSN (RFC 3464); the lab MX
  never receives it, in plain text or otherwise.
- When the attacker leaves between two attempts, the retry delivers over TLS.
- REQUIRETLS (RFC 8689): to a domain without a policy it bounces at once with 5.7.30; with
  `TLS-Required: No` instead, it is delivered; to an authenticated MX that offers REQUIRETLS
  it travels with REQUIRETLS on the next hop's MAIL FROM; to one that does not, it bounces.
- A message refused by the next hop for good (5xx) bounces at once, with the reply in it.
- The relay's own protocol: AUTH refused in plain text, bad input answered with errors.
"""

from __future__ import annotations

import base64
import email
import shutil
import smtplib
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from email.message import Message as EmailMessage
from pathlib import Path

import pytest

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode
from relay_helpers import RelayProcess, message, relay_scenario, wait_for

pytestmark = pytest.mark.lab

NET = "127.120"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(relay_scenario(), net=NET) as lab:
        yield lab


@pytest.fixture(scope="module")
def relay(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    work = tmp_path_factory.mktemp("relay")
    args = ["--retry-first", "0.3s", "--retry-max", "0.6s", "--lifetime", "4s", "--seed", "1"]
    with RelayProcess(lab, f"sqlite:///{work / 'state.db'}", work, args=args) as r:
        yield r


@pytest.fixture(autouse=True)
def clean(lab: Lab) -> Iterator[None]:
    lab.clear_records()
    yield
    for host in lab.scenario.hosts():
        lab.set_attack(host.name, AttackMode.PASS)


def bounces(lab: Lab, key: str) -> list[EmailMessage]:
    """The DSNs that reached the sender's MX and mention ``key`` (a subject, or a recipient
    for bounces of REQUIRETLS messages, which return no header section)."""
    return [
        email.message_from_bytes(m.data)
        for m in lab.receiver("mx.client.test").messages
        if m.mail_from in ("", "<>") and key.encode() in m.data
    ]


def dsn_status(dsn: EmailMessage) -> list[tuple[str, str]]:
    """(Final-Recipient, Status) of every recipient block of a DSN."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    [status] = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [(str(b["Final-Recipient"]), str(b["Status"])) for b in blocks[1:]]


def delivered(lab: Lab, host: str, subject: str) -> list[object]:
    return [m for m in lab.receiver(host).messages if subject.encode() in m.data]


def test_a_stripped_enforce_domain_is_retried_then_bounced_never_sent_in_plain_text(
    lab: Lab, relay: RelayProcess
) -> None:
    lab.set_attack("mx.enforce.test", AttackMode.STRIP)
    code, reply = relay.submit("a@client.test", ["b@enforce.test"], message("stripped one"))
    assert code == 250, reply
    [dsn] = wait_for("the bounce", lambda: bounces(lab, "stripped one"))
    assert dsn_status(dsn) == [("rfc822; b@enforce.test", "4.4.7")]
    text = dsn.as_string()
    assert "STARTTLS not offered" in text, text
    assert "Subject: stripped one" in text  # the returned header section
    assert "body of stripped one" not in text
    # Retried: several sessions reached the MX host (through the attacker), none delivered.
    assert lab.receiver("mx.enforce.test").connections >= 2
    assert lab.receiver("mx.enforce.test").messages == []
    assert b"MAIL FROM" not in lab.attacker("mx.enforce.test").client_bytes()
    assert relay.queue()["count"] == 0
    # Every session was recorded for TLS-RPT (RFC 8460), under the domain's policy.
    with sqlite3.connect(relay.store.removeprefix("sqlite://")) as db:
        rows = db.execute(
            "SELECT policy_type, result_type FROM session_results WHERE policy_domain = ?",
            ("enforce.test",),
        ).fetchall()
    assert len(rows) >= 2 and ("sts", "starttls-not-supported") in rows, rows


def test_when_the_attacker_leaves_the_retry_delivers_over_tls(
    lab: Lab, relay: RelayProcess
) -> None:
    lab.set_attack("mx.enforce.test", AttackMode.STRIP)
    code, reply = relay.submit("a@client.test", ["b@enforce.test"], message("second try"))
    assert code == 250, reply

    def attempted() -> bool:
        q = relay.queue()["messages"]
        return bool(q) and q[0]["recipients"][0]["attempts"] >= 1

    wait_for("a first, refused attempt", attempted)
    assert lab.receiver("mx.enforce.test").messages == []
    lab.set_attack("mx.enforce.test", AttackMode.PASS)
    [got] = wait_for("the retry", lambda: delivered(lab, "mx.enforce.test", "second try"))
    assert got.tls and got.tls_version in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
    assert got.rcpt_tos == ("b@enforce.test",)  # type: ignore[attr-defined]
    assert bounces(lab, "second try") == []
    wait_for("an empty queue", lambda: relay.queue()["count"] == 0)


def test_requiretls_to_a_domain_without_a_policy_bounces_with_5_7_30(
    lab: Lab, relay: RelayProcess
) -> None:
    code, reply = relay.submit(
        "a@client.test", ["b@plain.test"], message("requiretls plain"), options=["REQUIRETLS"]
    )
    assert code == 250, reply
    [dsn] = wait_for("the bounce", lambda: bounces(lab, "b@plain.test"))
    assert dsn_status(dsn) == [("rfc822; b@plain.test", "5.7.30")]
    # Nothing of a REQUIRETLS message goes into a bounce that travels without it.
    assert "Subject: requiretls plain" not in dsn.as_string()
    assert lab.receiver("mx.plain.test").connections == 0
    assert lab.receiver("mx.plain.test").messages == []


def test_tls_required_no_is_delivered_to_a_domain_without_a_policy(
    lab: Lab, relay: RelayProcess
) -> None:
    data = message("optional tls", extra="TLS-Required: No\r\n")
    code, reply = relay.submit("a@client.test", ["b@plain.test"], data)
    assert code == 250, reply
    [got] = wait_for("delivery", lambda: delivered(lab, "mx.plain.test", "optional tls"))
    assert got.tls  # type: ignore[attr-defined]  # still opportunistic TLS when offered


def test_tls_required_no_relaxes_a_stripped_enforce_domain(lab: Lab, relay: RelayProcess) -> None:
    # RFC 8689 §4.2.2: the sender asked for the recipient's MTA-STS policy to be ignored.
    lab.set_attack("mx.enforce.test", AttackMode.STRIP)
    data = message("relaxed", extra="TLS-Required: No\r\n")
    code, reply = relay.submit("a@client.test", ["b@enforce.test"], data)
    assert code == 250, reply
    [got] = wait_for("delivery", lambda: delivered(lab, "mx.enforce.test", "relaxed"))
    assert not got.tls  # type: ignore[attr-defined]  # the attacker stripped it: as asked


def test_tls_required_no_never_goes_below_a_local_rule(lab: Lab, relay: RelayProcess) -> None:
    lab.set_attack("mx.ruled.test", AttackMode.STRIP)
    data = message("ruled", extra="TLS-Required: No\r\n")
    code, reply = relay.submit("a@client.test", ["b@ruled.test"], data)
    assert code == 250, reply
    # Deferred until the lifetime ends, then returned: never sent in plain text.
    [dsn] = wait_for("the bounce", lambda: bounces(lab, "Subject: ruled"))
    assert dsn_status(dsn) == [("rfc822; b@ruled.test", "4.4.7")]
    assert lab.receiver("mx.ruled.test").connections >= 2
    assert lab.receiver("mx.ruled.test").messages == []


def test_requiretls_travels_to_an_mta_sts_host_that_offers_it(
    lab: Lab, relay: RelayProcess
) -> None:
    code, reply = relay.submit(
        "a@client.test", ["b@enforce.test"], message("requiretls ok"), options=["REQUIRETLS"]
    )
    assert code == 250, reply
    [got] = wait_for("delivery", lambda: delivered(lab, "mx.enforce.test", "requiretls ok"))
    assert got.tls and got.requiretls  # type: ignore[attr-defined]


def test_requiretls_travels_to_a_dane_host_that_offers_it(lab: Lab, relay: RelayProcess) -> None:
    code, reply = relay.submit(
        "a@client.test", ["b@dane.test"], message("requiretls dane"), options=["REQUIRETLS"]
    )
    assert code == 250, reply
    [got] = wait_for("delivery", lambda: delivered(lab, "mx.dane.test", "requiretls dane"))
    assert got.tls and got.requiretls  # type: ignore[attr-defined]


def test_requiretls_bounces_when_the_mx_does_not_offer_it(lab: Lab, relay: RelayProcess) -> None:
    code, reply = relay.submit(
        "a@client.test", ["b@norequiretls.test"], message("no offer"), options=["REQUIRETLS"]
    )
    assert code == 250, reply
    [dsn] = wait_for("the bounce", lambda: bounces(lab, "b@norequiretls.test"))
    assert dsn_status(dsn) == [("rfc822; b@norequiretls.test", "5.7.30")]
    assert "does not offer REQUIRETLS" in dsn.as_string()
    assert lab.receiver("mx.norequiretls.test").messages == []


def test_a_5xx_bounces_at_once_and_a_4xx_is_retried(lab: Lab, relay: RelayProcess) -> None:
    data = message("mixed")
    code, reply = relay.submit(
        "a@client.test", ["unknown-x@plain.test", "ok@plain.test", "busy-y@plain.test"], data
    )
    assert code == 250, reply
    [dsn] = wait_for("the bounce of the 5xx", lambda: bounces(lab, "mixed"))
    statuses = dsn_status(dsn)
    assert ("rfc822; unknown-x@plain.test", "5.1.1") in statuses
    assert "550 5.1.1 no such user here" in dsn.as_string()
    wait_for("delivery to the others", lambda: delivered(lab, "mx.plain.test", "mixed"))
    # busy-y keeps getting 451 until the lifetime ends, then bounces with 4.2.1.
    all_dsns = wait_for("the second bounce", lambda: len(bounces(lab, "mixed")) >= 2 and
                        bounces(lab, "mixed"))  # fmt: skip
    assert ("rfc822; busy-y@plain.test", "4.2.1") in dsn_status(all_dsns[1])


def test_auth_is_refused_in_plain_text_and_bad_input_gets_error_replies(
    relay: RelayProcess,
) -> None:
    with smtplib.SMTP(relay.address, relay.port, timeout=30) as c:
        c.ehlo("x.test")
        assert c.has_extn("requiretls")  # loopback: nobody sits on this path
        assert c.docmd("AUTH PLAIN AGFhAGI=")[0] in (502, 504, 538)
        assert c.docmd("MAIL FROM:<not an address>")[0] >= 500
        assert c.docmd("MAIL FROM:<a@client.test>")[0] == 250
        assert c.docmd("RCPT TO:<no-domain>")[0] == 553
        assert c.docmd("RCPT TO:<b@bad..domain>")[0] == 553
        assert c.docmd("RCPT TO:<b@plain.test> NOTIFY=NEVER")[0] == 555
        assert c.docmd("BDAT 10")[0] >= 500
        assert c.docmd("RCPT TO:<b@plain.test>")[0] == 250
        code, reply = c.data(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n")
        assert code >= 500, reply
        c.rset()
        assert c.docmd("MAIL FROM:<a@client.test> SIZE=999999999999")[0] == 552
    # The relay is still there.
    code, _ = relay.submit("a@client.test", ["ok2@plain.test"], b"Subject: after\r\n\r\nok\r\n")
    assert code == 250


def test_the_queue_survives_a_restart(lab: Lab, tmp_path: Path) -> None:
    # A relay that cannot deliver (the attacker strips STARTTLS at an enforce domain) is
    # stopped with the message queued; the next one delivers it.
    lab.set_attack("mx.enforce.test", AttackMode.STRIP)
    store = f"sqlite:///{tmp_path / 'q.db'}"
    args = ["--retry-first", "0.2s", "--retry-max", "0.3s", "--lifetime", "1h"]
    r = RelayProcess(lab, store, tmp_path, args=args, address="127.124.0.102").start()
    assert r.submit("a@client.test", ["b@enforce.test"], message("restart"))[0] == 250
    wait_for("an attempt", lambda: r.queue()["messages"][0]["recipients"][0]["attempts"])
    assert r.stop() == 0  # SIGTERM: a clean stop, the message stays queued
    lab.set_attack("mx.enforce.test", AttackMode.PASS)
    with RelayProcess(lab, store, tmp_path, args=args, address="127.124.0.102") as r:
        wait_for("delivery", lambda: delivered(lab, "mx.enforce.test", "restart"))
        wait_for("an empty queue", lambda: r.queue()["count"] == 0)


def test_remote_clients_must_authenticate_and_only_over_tls(lab: Lab, tmp_path: Path) -> None:
    identity = lab.pki.issue("relay.client.test")
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    line = subprocess.run(
        [sys.executable, "-m", "mxguard", "relay", "password", "app", "--password-file",
         str(password)], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert line.startswith("app:scrypt$") and "s3cret" not in line
    (tmp_path / "users").write_text(line)
    args = ["--tls-cert", str(identity.cert_file), "--tls-key", str(identity.key_file),
            "--auth-file", str(tmp_path / "users"), "--trust", "10.99.0.0/16"]  # fmt: skip
    store = f"sqlite:///{tmp_path / 'q.db'}"
    with RelayProcess(lab, store, tmp_path, args=args, address="127.124.0.109") as r:
        tls = ssl.create_default_context(cafile=str(lab.ca_file))
        tls.check_hostname = False  # connected by address; the chain is still verified
        with smtplib.SMTP(r.address, r.port, timeout=30) as c:
            c.ehlo("app.test")
            assert not c.has_extn("auth")  # never offered in plain text
            code, reply = c.docmd("AUTH PLAIN " + base64.b64encode(b"\0app\0s3cret").decode())
            assert code == 538, reply  # RFC 4954 §4: encryption required
            assert c.docmd("MAIL FROM:<a@client.test>")[0] == 530  # not trusted, not authenticated
            c.starttls(context=tls)
            c.ehlo("app.test")
            assert c.has_extn("auth") and c.has_extn("requiretls")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("app", "wrong")
            c.login("app", "s3cret")
            c.sendmail("a@client.test", ["auth@plain.test"],
                       b"Subject: authenticated\r\n\r\nok\r\n")  # fmt: skip
        [got] = wait_for("delivery", lambda: delivered(lab, "mx.plain.test", "authenticated"))
        assert b"with ESMTPSA" in got.data  # type: ignore[attr-defined]


def test_garbage_on_the_wire_gets_replies_and_the_relay_stays_up(relay: RelayProcess) -> None:
    import socket

    lines = [b"\xff\xfe\x00garbage", b"EHLO x.test", b"MAIL FROM:<\xc3\x28@x.test>",
             b"MAIL FROM:<a@client.test> REQUIRETLS=1", b"RCPT TO:<\x00@plain.test>",
             b"X" * 100_000, b"AUTH LOGIN", b"QUIT"]  # fmt: skip
    with socket.create_connection((relay.address, relay.port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        for line in lines:
            s.sendall(line + b"\r\n")
        replies = f.read()  # until the relay closes after QUIT (or the line flood)
    codes = [r[:3] for r in replies.split(b"\r\n") if r[:1].isdigit()]
    assert codes and all(c[:1] in b"2345" for c in codes)
    assert b"250" in codes  # the EHLO after the garbage was answered
    code, _ = relay.submit("a@client.test", ["still@plain.test"], b"Subject: up\r\n\r\nok\r\n")
    assert code == 250


def test_deliveries_to_one_domain_are_bounded(lab: Lab, tmp_path: Path) -> None:
    # Ten messages to one domain come due together (deferred while the attacker strips
    # STARTTLS, then retried at once): with --per-domain 1 the MX host never sees two
    # sessions at the same time, though the relay may run 20 deliveries.
    lab.set_attack("mx.enforce.test", AttackMode.STRIP)
    args = ["--retry-first", "0.5s", "--retry-max", "0.5s", "--per-domain", "1"]
    store = f"sqlite:///{tmp_path / 'q.db'}"
    with RelayProcess(lab, store, tmp_path, args=args, address="127.124.0.110") as r:
        for n in range(10):
            assert (
                r.submit("a@client.test", [f"p{n}@enforce.test"], message(f"bound {n}"))[0] == 250
            )
        lab.receiver("mx.enforce.test").clear()
        lab.set_attack("mx.enforce.test", AttackMode.PASS)
        wait_for("ten deliveries", lambda: len(lab.receiver("mx.enforce.test").messages) == 10)
    assert lab.receiver("mx.enforce.test").max_open == 1
