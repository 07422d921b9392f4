"""From MTA-STS testing to enforce on evidence, end to end in a lab of its own (net 127.75).

`rollout.test` publishes a `testing` policy with `mxguard sts publish`, served by a real
`mxguard serve mta-sts` on 127.74.0.4:443 (the lab's DNS pointing `mta-sts.rollout.test` and
`_mta-sts.rollout.test` at it), and a TLS-RPT record whose `rua` is an https
endpoint (`mxguard serve reports`) and, after it, a real IMAP mailbox (Dovecot on
127.74.0.2:993, `imap.reports.test`): report mail goes to the lab MX of `reports.test`, and
this test puts what that MX received into the mailbox, as its MDA would. mxguard senders
deliver to `rollout.test` through a STRIPTLS attacker and to an MX host with a certificate for
another name; the next day's reports are built and sent (`tlsrpt report --day`, DKIM-signed by
`sender.test`), the https endpoint is not up yet so they go by mail, `tlsrpt fetch` ingests
them, and `tlsrpt summary` lists the blocker: the wrong-name certificate, with its sessions,
sender and fix, the stripping as a signal. After the fix (a valid certificate) a day of clean
reports arrives over https, `summary` says ready, `sts publish --mode enforce` is accepted and
served by the same `serve mta-sts`, and a STRIPTLS attack is then refused by an mxguard sender.

The sessions happen on the two days before today (the sender's clock is set back), so that
`--days 1` is the day after the fix; the lab CA is made three days back for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mxguard.cli import main
from mxguard.config import load
from mxguard.engine.context import engine
from mxguard.lab.lab import Lab
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import AttackMode, CertKind, Dnssec, Domain, Host, Scenario

pytest.register_assert_rewrite("servers")
from mta_sts_serving import ServeProcess, http_request, serving  # noqa: E402
from servers import DovecotServer, running_dovecot  # noqa: E402

pytestmark = pytest.mark.lab

NET = "127.75"
IMAP_ADDRESS = "127.74.0.2"
REPORTS_ADDRESS = "127.74.0.3"  # serve reports
STS_ADDRESS = "127.74.0.4"  # serve mta-sts, for the policies sts publish writes
DOMAIN = "rollout.test"
MX = "mx1.rollout.test"
RUA_HTTPS = "https://reports.reports.test/tlsrpt"
RUA_MAIL = "mailto:tlsrpt@reports.test"
SENDER_ORG = "Sender Test Org"


def policy_records(txt_record: str | None) -> tuple[str, ...]:
    """The records that point senders at `serve mta-sts`: none before the first publish."""
    if txt_record is None:
        return ()
    return (f"mta-sts A {STS_ADDRESS}", f'_mta-sts TXT "{txt_record}"')


def scenario(cert: CertKind, dkim_record: str, sts_txt: str | None = None) -> Scenario:
    chunks = " ".join(f'"{dkim_record[i : i + 200]}"' for i in range(0, len(dkim_record), 200))
    return Scenario(
        name="rollout",
        description="A domain going from MTA-STS testing to enforce, and where its reports go.",
        domains=(
            Domain(
                DOMAIN, dnssec=Dnssec.UNSIGNED, mx=(f"10 {MX}",), hosts=(Host(MX, cert=cert),),
                tlsrpt=(f"v=TLSRPTv1; rua={RUA_HTTPS},{RUA_MAIL}",),
                extra=policy_records(sts_txt),
            ),
            Domain(
                "reports.test", dnssec=Dnssec.UNSIGNED, mx=("10 mx.reports.test",),
                hosts=(Host("mx.reports.test"),),
                extra=(f"imap A {IMAP_ADDRESS}", f"reports A {REPORTS_ADDRESS}"),
            ),
            Domain("sender.test", dnssec=Dnssec.UNSIGNED,
                   extra=(f"tlsrpt._domainkey TXT {chunks}",)),
        ),
    )  # fmt: skip


@pytest.fixture(scope="module")
def dkim_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_record(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; s=tlsrpt; p={base64.b64encode(der).decode()}"


@pytest.fixture(scope="module")
def lab(dkim_key: rsa.RSAPrivateKey) -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    lab = Lab(scenario(CertKind.WRONG_NAME, key_record(dkim_key)), net=NET)
    # Sessions are made on the two days before today: the lab's certificates must be valid
    # then already, so its CA starts three days back.
    lab.pki = LabPKI(lab.workdir / "pki", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with lab:
        yield lab


@pytest.fixture(scope="module")
def mailbox(lab: Lab) -> Iterator[DovecotServer]:
    identity = lab.pki.issue("imap.reports.test")
    with running_dovecot(identity.cert_file, identity.key_file, host=IMAP_ADDRESS) as server:
        yield server


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Context managers the test enters as it goes, left in reverse order at its end."""
    with contextlib.ExitStack() as s:
        yield s


def announce(lab: Lab, txt_record: str) -> None:
    """Point `mta-sts.rollout.test` at `serve mta-sts` and publish the policy's id."""
    d = lab.scenario.domain(DOMAIN)
    lab.update_domain(dataclasses.replace(d, extra=policy_records(txt_record)))


def served_policy(lab: Lab) -> str:
    """What `serve mta-sts` answers for rollout.test, fetched as a sender does (verified)."""
    status, headers, body = http_request(
        STS_ADDRESS, 443, host=f"mta-sts.{DOMAIN}", ca_file=lab.ca_file
    )
    assert status == 200 and headers["content-type"].startswith("text/plain"), headers
    return body.decode()


def write_config(lab: Lab, tmp: Path, key: rsa.RSAPrivateKey) -> Path:
    """The sending side's mxguard: the lab's DNS and CA, its own store, DKIM-signed reports."""
    (tmp / "dkim.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    config = tmp / "sender.toml"
    config.write_text(
        f'resolver = ["{lab.resolver_spec}"]\n'
        f'ca_file = "{lab.ca_file}"\n'
        f"smtp_port = {lab.ports.smtp}\nhttps_port = {lab.ports.https}\n"
        f'store = "sqlite:///{tmp / "sender.db"}"\n'
        'helo_name = "mta.sender.test"\nfetch_timeout = 3\n'
        "[tlsrpt]\n"
        f'organization_name = "{SENDER_ORG}"\ncontact_info = "mailto:tlsrpt@sender.test"\n'
        'submitter = "mta.sender.test"\nsender = "tlsrpt-noreply@sender.test"\n'
        "delay_window = 0\n"
        f'dkim_key = "{tmp / "dkim.pem"}"\ndkim_selector = "tlsrpt"\ndkim_domain = "sender.test"\n',
        encoding="utf-8",
    )
    return config


def cli(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, [*args, "--json"], env={"MXGUARD_JSON": ""})
    try:
        return result.exit_code, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"no JSON (exit {result.exit_code}): {result.output}") from None


def send(config: Path, lab: Lab, attack: AttackMode, at: dt.datetime | None) -> dict[str, Any]:
    """One message to rollout.test by an mxguard sender whose clock says ``at``."""
    lab.set_attack(MX, attack)

    async def work() -> dict[str, Any]:
        async with engine(load(config)) as e:
            sender = e.sender()
            if at is not None:
                sender.clock = lambda: at
            result = await sender.deliver("a@sender.test", [f"b@{DOMAIN}"], b"Hello\r\n")
            doc: dict[str, Any] = result.domains[0].to_json()
            return doc

    try:
        return asyncio.run(work())
    finally:
        lab.set_attack(MX, AttackMode.PASS)


def fetch_args(mailbox: DovecotServer) -> list[str]:
    return ["tlsrpt", "fetch", "--imap", f"imap.reports.test:{mailbox.port}", "--user",
            mailbox.user, "--password-file", str(mailbox.password_file)]  # fmt: skip


def report_day(config: Path, day: dt.date) -> dict[str, Any]:
    status, doc = cli("--config", str(config), "tlsrpt", "report", "--day", day.isoformat())
    assert status == 0, doc
    [built] = doc["reports"]
    assert built["policy_domain"] == DOMAIN and built["status"] == "delivered", built
    return dict(built)


def into_mailbox(lab: Lab, mailbox: DovecotServer) -> int:
    """What the lab MX of reports.test received for the rua, into the mailbox (the MDA's job)."""
    receiver = lab.receiver("mx.reports.test")
    mails = [m for m in receiver.messages if m.rcpt_tos == ("tlsrpt@reports.test",)]
    for m in mails:
        head = f"Return-Path: <{m.mail_from}>\r\nDelivered-To: tlsrpt@reports.test\r\n"
        mailbox.deliver(head.encode() + m.data)
    receiver.clear()
    return len(mails)


@dataclasses.dataclass
class ReportsServer:
    proc: subprocess.Popen[bytes]
    log: Path


def start_reports_server(lab: Lab, owner_store: str, tmp: Path) -> ReportsServer:
    identity = lab.pki.issue("reports.reports.test")
    log = tmp / "serve-reports.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mxguard", "-v", "--store", owner_store, "serve", "reports",
             "--listen", f"{REPORTS_ADDRESS}:443", "--cert", str(identity.cert_file), "--key",
             str(identity.key_file), "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while "receiving TLS reports on" not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"serve reports exited: {log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"serve reports did not start: {log.read_text()}"
        time.sleep(0.05)
    return ReportsServer(proc, log)


def test_a_domain_goes_from_testing_to_enforce_on_the_evidence_of_its_reports(
    lab: Lab,
    mailbox: DovecotServer,
    dkim_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    stack: contextlib.ExitStack,
) -> None:
    started = time.monotonic()
    config = write_config(lab, tmp_path, dkim_key)
    owner_store = f"sqlite:///{tmp_path / 'owner.db'}"
    owner = ["--config", str(config), "--store", owner_store]
    today = dt.datetime.now(dt.UTC).date()
    day1, day2 = today - dt.timedelta(days=2), today - dt.timedelta(days=1)

    def at(day: dt.date, hour: int) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(hour), tzinfo=dt.UTC)

    # The owner publishes testing: sts publish writes the policy, serve mta-sts serves it
    # with a certificate for mta-sts.rollout.test, and the lab's DNS points senders at it.
    root = tmp_path / "mta-sts"
    status, testing = cli(*owner, "sts", "publish", DOMAIN, "--mode", "testing", "--out",
                          str(root))  # fmt: skip
    assert status == 0 and testing["mode"] == "testing", testing
    identity = lab.pki.issue(f"mta-sts.{DOMAIN}")
    policy_host: ServeProcess = stack.enter_context(serving(
        root, [(identity.cert_file, identity.key_file)], f"{STS_ADDRESS}:443",
        tmp_path / "serve-mta-sts.log",
    ))  # fmt: skip
    announce(lab, testing["txt_record"])
    assert served_policy(lab) == testing["policy"]

    # Day 1, testing: a STRIPTLS attacker in front of the MX, then the honest path to a host
    # whose certificate names another host. Testing delivers anyway, and records both.
    stripped = send(config, lab, AttackMode.STRIP, at(day1, 9))
    assert stripped["status"] == "delivered" and stripped["result_type"] == "starttls-not-supported"
    for hour in (10, 11):
        wrong = send(config, lab, AttackMode.PASS, at(day1, hour))
        assert wrong["status"] == "delivered", wrong
        assert wrong["result_type"] == "certificate-host-mismatch", wrong

    # The next day the report is built and sent: the https rua is not up yet, so it goes by
    # mail, DKIM-signed, to the MX of reports.test, and from there into the IMAP mailbox.
    sent = report_day(config, day1)
    assert (sent["successful"], sent["failed"]) == (0, 3)
    assert sent["delivered_to"] == RUA_MAIL
    assert [a["ok"] for a in sent["attempts"]] == [False, True]  # https first, refused
    assert into_mailbox(lab, mailbox) == 1

    status, fetched = cli(*owner, *fetch_args(mailbox))
    assert status == 0, fetched
    assert (fetched["done"], fetched["stored"], fetched["failed"]) == (1, 1, 0)
    [message] = fetched["messages"]
    assert message["dkim"]["ok"] and message["dkim"]["domain"] == "sender.test"
    assert len(mailbox.messages("mxguard-done")) == 1 and mailbox.messages() == []

    # The summary: not ready. The blocker is the wrong-name certificate, with its sessions,
    # sender, MX host and fix; the stripping is a signal, not a blocker.
    status, before = cli(*owner, "tlsrpt", "summary", DOMAIN, "--days", "7")
    assert status == 1, before
    assert (before["total_successful"], before["total_failure"]) == (0, 3)
    assert before["ready_to_enforce"] is False
    assert before["by_result_type"] == [
        {"result_type": "certificate-host-mismatch", "failed": 2},
        {"result_type": "starttls-not-supported", "failed": 1},
    ]
    assert before["by_sender"][0]["organization"] == SENDER_ORG
    assert before["by_sender"][0]["dkim_verified"] == 1
    assert before["by_mx"][0]["mx_host"] == MX
    reported = [b for b in before["blockers"] if b["source"] == "reports"]
    assert [(b["result_type"], b["sessions"], b["senders"], b["mx_hosts"]) for b in reported] == [
        ("certificate-host-mismatch", 2, [SENDER_ORG], [MX])
    ]
    assert "subjectAltName names mx1.rollout.test" in reported[0]["fix"]
    checked = [b for b in before["blockers"] if b["source"] == "check"]
    assert any("certificate-host-mismatch" in b["what"] for b in checked), checked
    assert not any(b["result_type"] == "starttls-not-supported" for b in before["blockers"])
    assert any("STRIPTLS" in s for s in before["signals"])
    # sts publish refuses enforce as well, and leaves the served testing policy alone.
    status, refused = cli(*owner, "sts", "publish", DOMAIN, "--mode", "enforce", "--out",
                          str(root))  # fmt: skip
    assert status == 1 and refused["status"] == "refused", refused
    assert served_policy(lab) == testing["policy"]

    # The fix: a certificate for the MX host's own name. Day 2 is clean, and its report goes
    # over https now that serve reports is up; the mailbox gets nothing new.
    lab.apply(scenario(CertKind.VALID, key_record(dkim_key), testing["txt_record"]))
    server = start_reports_server(lab, owner_store, tmp_path)
    try:
        for hour in (9, 10):
            clean = send(config, lab, AttackMode.PASS, at(day2, hour))
            assert clean["status"] == "delivered" and clean["result_type"] is None, clean
        sent = report_day(config, day2)
        assert (sent["successful"], sent["failed"], sent["delivered_to"]) == (2, 0, RUA_HTTPS)
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=20)
    assert into_mailbox(lab, mailbox) == 0
    status, again = cli(*owner, *fetch_args(mailbox))
    assert status == 0 and again["messages"] == [], again

    # Ready: a day of clean reports and a clean check.
    status, after = cli(*owner, "tlsrpt", "summary", DOMAIN, "--days", "1")
    assert status == 0, after
    assert after["ready_to_enforce"] is True and after["blockers"] == []
    assert (after["total_successful"], after["total_failure"]) == (2, 0)
    # The longer window still holds the day before the fix.
    status, longer = cli(*owner, "tlsrpt", "summary", DOMAIN, "--days", "7")
    assert status == 1 and longer["total_failure"] == 3

    # Enforce is accepted: sts publish rewrites the file under the running serve mta-sts,
    # which serves it as it is, and the record's new id announces it.
    status, published = cli(*owner, "sts", "publish", DOMAIN, "--mode", "enforce", "--out",
                            str(root))  # fmt: skip
    assert status == 0 and published["blockers"] == [], published
    assert published["id"] != testing["id"]
    assert served_policy(lab) == published["policy"]
    announce(lab, published["txt_record"])

    # The sender that cached the testing policy sees the new id, fetches enforce, and refuses
    # to hand the message to a STRIPTLS attacker.
    before_attack = len(lab.receiver(MX).messages)
    refused_mail = send(config, lab, AttackMode.STRIP, None)
    assert refused_mail["status"] == "deferred", refused_mail
    assert refused_mail["result_type"] == "starttls-not-supported"
    assert refused_mail["policy"] == {"source": "mta-sts", "mode": "enforce"}
    assert len(lab.receiver(MX).messages) == before_attack
    # Both policies reached the sender from serve mta-sts: its log has more fetches of each
    # than this test's own looks (three at testing, one at enforce).
    log = policy_host.log_text()

    def fetches(policy: str) -> int:
        size = len(policy.encode())
        return log.count(f"GET mta-sts.{DOMAIN} /.well-known/mta-sts.txt 200 {size} bytes")

    assert len(testing["policy"].encode()) != len(published["policy"].encode())
    assert fetches(testing["policy"]) > 3 and fetches(published["policy"]) > 1, log
    assert time.monotonic() - started < 60
