"""`mxguard tlsrpt fetch`: TLS report e-mails read from a real IMAP mailbox (RFC 8460 §5.3).

The mailbox is Debian's Dovecot (tests/servers.py, `running_dovecot`) on 127.74.0.1:993 with
TLS only, a passwd-file user and a Maildir this test writes messages into, as an MDA would.
Its certificate is issued for 127.74.0.1 (an IP SAN) by a lab CA that only `--ca-file` makes
trusted. Every report e-mail is ingested as `tlsrpt ingest` ingests one and moved to the done
folder, a message without a report to the failed folder; a second run finds nothing new, and
a report mailed twice is stored once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mxguard.adapters.store import open_store
from mxguard.cli import main
from mxguard.lab.pki import LabPKI
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import (
    FailureDetail,
    PolicyResult,
    PolicyType,
    Report,
    ReportedPolicy,
    email_message,
)
from mxguard.tlsrpt import imap

pytest.register_assert_rewrite("servers")  # a plugin of other modules: rewrite it here too
from servers import DovecotServer, issue_server_certificate, running_dovecot  # noqa: E402

HOST = "127.74.0.1"
DAY = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
STS = ReportedPolicy(
    PolicyType.STS,
    ("version: STSv1", "mode: testing", "mx: mx.example.com", "max_age: 86400"),
    ("mx.example.com",),
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dovecot(pki: LabPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    cert, key = issue_server_certificate(
        pki.root.key, pki.root.cert, ["imap.mxguard.test"], [HOST], tmp_path_factory.mktemp("c")
    )
    with running_dovecot(cert, key, host=HOST) as server:
        yield server


@pytest.fixture
def mailbox(dovecot: DovecotServer) -> Iterator[DovecotServer]:
    """The mailbox, emptied after each test (every folder's messages)."""
    yield dovecot
    for folder in [dovecot.maildir, *dovecot.maildir.glob(".*")]:
        for sub in ("new", "cur"):
            for p in (folder / sub).glob("*"):
                p.unlink()


def report(number: int, failed: int = 0) -> Report:
    details = (
        (FailureDetail(ResultType.CERTIFICATE_EXPIRED, "192.0.2.1", "mx.example.com",
                       "203.0.113.25", "mx.example.com", failed),)
        if failed else ()
    )  # fmt: skip
    return Report(
        organization_name="Sender Inc.",
        start=DAY,
        end=DAY + dt.timedelta(days=1, seconds=-1),
        contact_info="mailto:tlsrpt@sender.example",
        report_id=f"2026-11-30T00:00:00Z_example.com_{number}",
        policies=(PolicyResult("example.com", STS, 10 * number, failed, details),),
    )


def report_email(number: int, failed: int = 0) -> bytes:
    return email_message(
        report(number, failed), submitter="sender.example", mail_from="tlsrpt@sender.example",
        recipients=["tlsrpt@example.com"], unique=str(number),
        date=DAY + dt.timedelta(days=1, hours=2), message_id=f"<r{number}@sender.example>",
    )  # fmt: skip


def not_a_report() -> bytes:
    msg = EmailMessage()
    msg["From"] = "someone@elsewhere.example"
    msg["To"] = "tlsrpt@example.com"
    msg["Subject"] = "Cheap watches"
    msg.set_content("No report here.\n")
    return bytes(msg)


def fetch_cli(server: DovecotServer, store: str, ca_file: Path | None, *args: str) -> Result:
    global_args = ["--ca-file", str(ca_file)] if ca_file else []
    return CliRunner().invoke(
        main,
        [*global_args, "tlsrpt", "fetch", "--imap", server.server, "--user", server.user,
         "--password-file", str(server.password_file), "--store", store, "--json", *args],
        env={"MXGUARD_JSON": ""},
    )  # fmt: skip


def fetched(result: Result) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"exit {result.exit_code}, no JSON: {result.output}") from None
    return doc


def stored(store: str, domain: str = "example.com") -> list[Any]:
    async def work() -> list[Any]:
        s = await open_store(store)
        try:
            return await s.received_between(domain, DAY, DAY + dt.timedelta(days=1))
        finally:
            await s.close()

    return asyncio.run(work())


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'owner.db'}"


# --- the mailbox is read, filed, and read again ---------------------------------------------


def test_fetch_ingests_each_report_email_and_files_it_and_a_second_run_finds_nothing(
    mailbox: DovecotServer, pki: LabPKI, store: str
) -> None:
    mailbox.deliver(report_email(1))
    mailbox.deliver(not_a_report())
    mailbox.deliver(report_email(2, failed=3))
    result = fetch_cli(mailbox, store, pki.ca_file)
    assert result.exit_code == 0, result.output
    doc = fetched(result)
    assert (doc["done"], doc["failed"], doc["kept"], doc["left"]) == (2, 1, 0, 0)
    assert (doc["stored"], doc["duplicates"], doc["refused"]) == (2, 0, 1)
    assert doc["move"] == "move"  # Dovecot offers MOVE (RFC 6851)
    statuses = [(m["status"], m["moved_to"]) for m in doc["messages"]]
    assert statuses == [("done", "mxguard-done"), ("failed", "mxguard-failed"),
                        ("done", "mxguard-done")]  # fmt: skip
    refused = doc["messages"][1]
    assert refused["subject"] == "Cheap watches"
    assert "no TLS report in this e-mail" in refused["reports"][0]["error"]
    # What ingest keeps: the report, from mail, with what its (missing) signature said.
    kept = stored(store)
    assert sorted(r.report.report_id for r in kept) == [
        "2026-11-30T00:00:00Z_example.com_1", "2026-11-30T00:00:00Z_example.com_2",
    ]  # fmt: skip
    assert {r.source.value for r in kept} == {"mail"}
    assert all(r.dkim is not None and r.dkim.detail == "unsigned" for r in kept)
    assert sum(r.report.failed for r in kept) == 3
    # The server moved them: nothing left in INBOX, each in its folder.
    assert mailbox.messages() == []
    assert len(mailbox.messages("mxguard-done")) == 2
    [failed] = mailbox.messages("mxguard-failed")
    assert b"Cheap watches" in failed
    # Nothing new: a second run reads nothing and stores nothing.
    again = fetched(fetch_cli(mailbox, store, pki.ca_file))
    assert (again["messages"], again["stored"]) == ([], 0)
    assert len(stored(store)) == 2


def test_a_report_mailed_twice_is_stored_once_and_both_messages_are_filed(
    mailbox: DovecotServer, pki: LabPKI, store: str
) -> None:
    mailbox.deliver(report_email(1))
    assert fetched(fetch_cli(mailbox, store, pki.ca_file))["stored"] == 1
    mailbox.deliver(report_email(1))  # a sender retrying (RFC 8460 §5.5)
    doc = fetched(fetch_cli(mailbox, store, pki.ca_file))
    assert (doc["done"], doc["stored"], doc["duplicates"]) == (1, 0, 1)
    assert doc["messages"][0]["reports"][0]["status"] == "duplicate"
    assert len(stored(store)) == 1
    assert len(mailbox.messages("mxguard-done")) == 2


def test_folders_of_ones_own_are_created_and_used(
    mailbox: DovecotServer, pki: LabPKI, store: str
) -> None:
    mailbox.deliver(report_email(1), "Reports")
    mailbox.deliver(not_a_report(), "Reports")
    result = fetch_cli(mailbox, store, pki.ca_file, "--folder", "Reports", "--done-folder",
                       "Gelesen Berichte", "--failed-folder", "Unlesbar & Co")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = fetched(result)
    assert (doc["done"], doc["failed"]) == (1, 1)
    # Maildir++ keeps a folder as ".NAME" in modified UTF-7 (RFC 3501 §5.1.3).
    assert len(mailbox.messages("Gelesen Berichte")) == 1
    assert len(mailbox.messages("Unlesbar &- Co")) == 1
    assert mailbox.messages("Reports") == []


def test_a_run_handles_at_most_max_messages_and_leaves_the_rest_for_the_next(
    mailbox: DovecotServer, pki: LabPKI, store: str
) -> None:
    for n in (1, 2, 3):
        mailbox.deliver(report_email(n))
    doc = fetched(fetch_cli(mailbox, store, pki.ca_file, "--max-messages", "2"))
    assert (doc["done"], doc["left"]) == (2, 1)
    doc = fetched(fetch_cli(mailbox, store, pki.ca_file, "--max-messages", "2"))
    assert (doc["done"], doc["left"]) == (1, 0)
    assert len(stored(store)) == 3


def test_the_human_output_says_what_became_of_each_message(
    mailbox: DovecotServer, pki: LabPKI, store: str
) -> None:
    mailbox.deliver(report_email(1))
    mailbox.deliver(not_a_report())
    result = CliRunner().invoke(
        main,
        ["--ca-file", str(pki.ca_file), "tlsrpt", "fetch", "--imap", mailbox.server, "--user",
         mailbox.user, "--password-file", str(mailbox.password_file), "--store", store],
        env={"MXGUARD_JSON": ""},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 message(s): 1 done (1 report(s) stored, 0 already stored), 1 failed" in result.output
    assert "-> mxguard-done" in result.output and "-> mxguard-failed" in result.output
    assert "stored: report 2026-11-30T00:00:00Z_example.com_1 from Sender Inc." in result.output
    assert "DKIM: not verified (unsigned)" in result.output


def test_the_global_json_setting_is_honoured(
    mailbox: DovecotServer, pki: LabPKI, store: str
) -> None:
    mailbox.deliver(report_email(1))
    result = CliRunner().invoke(
        main,
        ["--json", "--ca-file", str(pki.ca_file), "tlsrpt", "fetch", "--imap", mailbox.server,
         "--user", mailbox.user, "--password-file", str(mailbox.password_file), "--store", store],
        env={"MXGUARD_JSON": ""},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert fetched(result)["stored"] == 1


# --- the library: the COPY fallback, the size bound -----------------------------------------


def library_fetch(server: DovecotServer, pki: LabPKI, **kw: Any) -> tuple[imap.Run, list[Any]]:
    seen: list[imap.Message] = []

    async def handle(message: imap.Message) -> imap.Disposition:
        seen.append(message)
        return imap.Disposition.DONE if message.data else imap.Disposition.FAILED

    account = imap.Account(server.host, server.user, server.password, server.port, pki.ca_file)
    return asyncio.run(imap.fetch(account, handle, **kw)), seen


def test_without_move_the_message_is_copied_flagged_and_expunged(
    mailbox: DovecotServer, pki: LabPKI
) -> None:
    mailbox.deliver(report_email(1))
    run, [message] = library_fetch(mailbox, pki, use_move=False)
    assert run.move == "copy-expunge"  # RFC 6851's fallback, UID EXPUNGE (RFC 4315)
    assert message.data is not None and b"tlsrpt+gzip" in message.data
    assert mailbox.messages() == []  # expunged, not only flagged
    assert len(mailbox.messages("mxguard-done")) == 1


def test_a_message_over_the_size_limit_is_not_downloaded_and_goes_to_the_failed_folder(
    mailbox: DovecotServer, pki: LabPKI
) -> None:
    mailbox.deliver(report_email(1))
    run, [message] = library_fetch(mailbox, pki, max_size=1000)
    assert message.data is None and message.size > 1000
    assert [f.disposition for f in run.filed] == [imap.Disposition.FAILED]
    assert len(mailbox.messages("mxguard-failed")) == 1


def test_a_message_the_handler_keeps_stays_and_is_seen_again(
    mailbox: DovecotServer, pki: LabPKI
) -> None:
    mailbox.deliver(report_email(1))

    async def keep(message: imap.Message) -> imap.Disposition:
        return imap.Disposition.KEEP

    account = imap.Account(mailbox.host, mailbox.user, mailbox.password, mailbox.port,
                           pki.ca_file)  # fmt: skip
    for _ in range(2):
        run = asyncio.run(imap.fetch(account, keep))
        assert [(f.disposition, f.folder) for f in run.filed] == [(imap.Disposition.KEEP, None)]
    assert len(mailbox.messages()) == 1


# --- failures: the store, the certificate, the login ----------------------------------------


def test_a_store_that_fails_leaves_the_message_in_place_and_exits_75(
    mailbox: DovecotServer, pki: LabPKI, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mxguard.adapters.store import StoreError
    from mxguard.adapters.store.sqlite import SQLiteStore

    async def fails(self: SQLiteStore, record: Any) -> bool:
        raise StoreError("SQLite store: disk I/O error", kind="ioerr")

    mailbox.deliver(report_email(1))
    monkeypatch.setattr(SQLiteStore, "add_received", fails)
    result = fetch_cli(mailbox, store, pki.ca_file)
    assert result.exit_code == 75, result.output
    doc = fetched(result)
    assert "disk I/O error" in doc["error"] and doc["kept"] == 1
    assert len(mailbox.messages()) == 1  # still there for the next run
    monkeypatch.undo()
    assert fetched(fetch_cli(mailbox, store, pki.ca_file))["stored"] == 1


def test_a_server_certificate_nobody_trusts_is_refused_before_login(
    mailbox: DovecotServer, store: str
) -> None:
    mailbox.deliver(report_email(1))
    result = fetch_cli(mailbox, store, None)  # the lab CA is not among the system's roots
    assert result.exit_code == 75
    doc = fetched(result)
    assert "failed verification" in doc["error"] and "--ca-file" in doc["error"]
    assert len(mailbox.messages()) == 1


def test_a_certificate_for_another_name_is_refused(
    mailbox: DovecotServer, pki: LabPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The certificate names 127.74.0.1 and imap.mxguard.test; reached under another name that
    # leads to the same address, it does not match (RFC 8314, RFC 6125).
    async def here(host: str, port: int, dns: Any) -> list[str]:
        return [mailbox.host]

    monkeypatch.setattr(imap, "addresses", here)
    account = imap.Account("imap.elsewhere.test", mailbox.user, mailbox.password, mailbox.port,
                           pki.ca_file)  # fmt: skip

    async def never(message: imap.Message) -> imap.Disposition:
        raise AssertionError("no message may be read from a server that is not who it says")

    with pytest.raises(imap.ImapError, match=r"failed verification.*imap\.elsewhere\.test"):
        asyncio.run(imap.fetch(account, never))
    # Under its own name it is fine.
    account = imap.Account("imap.mxguard.test", mailbox.user, mailbox.password, mailbox.port,
                           pki.ca_file)  # fmt: skip
    assert asyncio.run(imap.fetch(account, never)).filed == []


def test_a_refused_login_is_a_usage_error(
    mailbox: DovecotServer, pki: LabPKI, store: str, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    result = CliRunner().invoke(
        main,
        ["--ca-file", str(pki.ca_file), "tlsrpt", "fetch", "--imap", mailbox.server, "--user",
         mailbox.user, "--password-file", str(wrong), "--store", store],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "refused the login of 'tlsrpt'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folder", "mxguard-done"], "is also where handled messages go"),
        (["--imap", "imap.example.org:99999"], "port must be a number"),
        (["--store", ""], "--store is empty"),
    ],
)
def test_usage_errors_exit_2(
    mailbox: DovecotServer, store: str, args: list[str], message: str
) -> None:
    base = ["tlsrpt", "fetch", "--imap", mailbox.server, "--user", "u", "--password-file",
            str(mailbox.password_file), "--store", store]  # fmt: skip
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


# --- pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("INBOX", '"INBOX"'),
        ("mxguard-done", '"mxguard-done"'),
        ("Entwürfe", '"Entw&APw-rfe"'),  # RFC 3501 §5.1.3's own kind of example
        ("A & B", '"A &- B"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("日本語", '"&ZeVnLIqe-"'),
    ],
)
def test_folder_names_go_in_modified_utf7_and_quoted(name: str, wire: str) -> None:
    assert imap.mailbox_name(name) == wire


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("imap.example.org", ("imap.example.org", 993)),
        ("imap.example.org:10993", ("imap.example.org", 10993)),
        ("[2001:db8::1]", ("2001:db8::1", 993)),
        ("[2001:db8::1]:994", ("2001:db8::1", 994)),
        ("2001:db8::1", ("2001:db8::1", 993)),
    ],
)
def test_the_server_is_host_and_optional_port(text: str, expected: tuple[str, int]) -> None:
    assert imap.parse_server(text) == expected
