"""Postfix log lines -> sessions and RFC 8460 result types (mxguard.tlsrpt.postfix_log).

The lines are written here in the formats Postfix 3.7 really uses with smtp_tls_loglevel = 1
(checked against the log of the Postfix integration test): the `maillog_file` / traditional
syslog format and the ISO 8601 timestamps of rsyslog's high-precision format. Postfix 3.10's
`TLSRPT: status=…` lines (the end of the module) are as Postfix 3.10.13 logged them in the lab.
"""

from __future__ import annotations

import datetime as dt

import pytest

from mxguard.protocol.results import ResultType as R
from mxguard.protocol.tlsrpt_report import NO_POLICY_FOUND, PolicyType, ReportedPolicy
from mxguard.tlsrpt.postfix_log import (
    MAX_LINE,
    Ending,
    Joiner,
    Session,
    certificate_failure,
    host_key,
    left_out_by_postfix,
    parse_line,
    report_only,
    result_type,
    sessions,
)

NOW = dt.datetime(2025, 11, 30, 12, 0, tzinfo=dt.UTC)
P = "Nov 29 11:17:03 client postfix/smtp[4554]: "
CIPHER = ": TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"


def status(qid: str, rcpt: str, relay: str, st: str, reason: str, extra: str = "") -> str:
    dsn = {"sent": "2.0.0", "deferred": "4.7.4", "bounced": "5.1.1"}[st]
    return (
        f"{P}{qid}: to=<{rcpt}>, relay={relay}, {extra}delay=0.02, delays=0/0/0.01/0, "
        f"dsn={dsn}, status={st} ({reason})"
    )


def tls(trust: str, host: str, ip: str, how: str = "established") -> str:
    return f"{P}{trust} TLS connection {how} to {host}[{ip}]:25{CIPHER}"


# --- one line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "at", "program", "pid"),
    [
        (  # maillog_file and traditional syslog: no year, no zone (the reader's are used)
            "Nov 29 11:17:03 client postfix/smtp[4554]: x",
            dt.datetime(2025, 11, 29, 11, 17, 3, tzinfo=dt.UTC), "postfix/smtp", 4554,
        ),
        (  # a day with one digit is padded with a space
            "Nov  2 01:02:03 mail postfix-out/smtp[7]: x",
            dt.datetime(2025, 11, 2, 1, 2, 3, tzinfo=dt.UTC), "postfix-out/smtp", 7,
        ),
        (  # December read in January belongs to the year before
            "Dec 31 23:59:59 mail postfix/smtp[1]: x",
            dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=dt.UTC), "postfix/smtp", 1,
        ),
        (  # rsyslog high precision / journalctl -o short-iso: zone given
            "2025-11-29T12:17:03.123456+01:00 mail postfix/smtp[9]: x",
            dt.datetime(2025, 11, 29, 11, 17, 3, 123456, tzinfo=dt.UTC), "postfix/smtp", 9,
        ),
        (  # syslog <PRI> in front
            "<22>2025-11-29T11:17:03Z mail postfix/relay/smtp[9]: x",
            dt.datetime(2025, 11, 29, 11, 17, 3, tzinfo=dt.UTC), "postfix/relay/smtp", 9,
        ),
    ],
)  # fmt: skip
def test_syslog_and_maillog_file_formats_are_parsed(
    text: str, at: dt.datetime, program: str, pid: int
) -> None:
    now = NOW if not text.startswith("Dec") else dt.datetime(2026, 1, 1, 0, 5, tzinfo=dt.UTC)
    line = parse_line(text, now=now)
    assert line is not None
    assert (line.at, line.program, line.pid, line.message) == (at, program, pid, "x")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "Nov 29 11:17:03 client postfix/smtp: no pid",
        "Foo 29 11:17:03 client postfix/smtp[1]: not a month",
        "Nov 29 11:17:03 client postfix/smtp[1]: " + "x" * MAX_LINE,  # over-long
    ],
)
def test_lines_that_are_not_log_lines_are_ignored(text: str) -> None:
    assert parse_line(text, now=NOW) is None


@pytest.mark.parametrize(
    ("why", "expected"),
    [
        ("num=65:no matching DANE TLSA records", R.VALIDATION_FAILURE),  # RFC 7672 §3.1
        ("certificate has expired", R.CERTIFICATE_EXPIRED),
        ("certificate not yet valid", R.CERTIFICATE_EXPIRED),
        ("num=10:certificate has expired", R.CERTIFICATE_EXPIRED),
        ("self-signed certificate", R.CERTIFICATE_NOT_TRUSTED),
        ("untrusted issuer /CN=Evil CA", R.CERTIFICATE_NOT_TRUSTED),
        ("not trusted by local or TLSA policy", R.CERTIFICATE_NOT_TRUSTED),
        ("num=20:unable to get local issuer certificate", R.CERTIFICATE_NOT_TRUSTED),
        ("num=62:hostname mismatch", R.CERTIFICATE_HOST_MISMATCH),
        ("something new", R.VALIDATION_FAILURE),  # §4.3.1: the general failure
    ],
)
def test_certificate_verification_failures_map_to_rfc8460_result_types(
    why: str, expected: R
) -> None:
    assert certificate_failure(why) == expected


# --- sessions ---------------------------------------------------------------------------

# name -> (log lines, [(mx host, tls, result under sts, under tlsa, under no-policy-found)])
CASES: dict[str, tuple[list[str], list[tuple[str, str | None, R | None, R | None, R | None]]]] = {
    "verified and delivered: one successful session": (
        [
            tls("Verified", "mx1.a.test", "192.0.2.1"),
            status("AAAAA1", "b@a.test", "mx1.a.test[192.0.2.1]:25", "sent", "250 ok"),
        ],
        [("mx1.a.test", "Verified", None, None, None)],
    ),
    "STARTTLS stripped on both MX hosts: two sessions, both starttls-not-supported": (
        [
            f"{P}AAAAA2: TLS is required, but was not offered by host mx1.a.test[192.0.2.1]",
            status(
                "AAAAA2",
                "b@a.test",
                "mx2.a.test[192.0.2.2]:25",
                "deferred",
                "TLS is required, but was not offered by host mx2.a.test[192.0.2.2]",
            ),
        ],
        [
            (
                "mx1.a.test",
                None,
                R.STARTTLS_NOT_SUPPORTED,
                R.STARTTLS_NOT_SUPPORTED,
                R.STARTTLS_NOT_SUPPORTED,
            ),
            (
                "mx2.a.test",
                None,
                R.STARTTLS_NOT_SUPPORTED,
                R.STARTTLS_NOT_SUPPORTED,
                R.STARTTLS_NOT_SUPPORTED,
            ),
        ],
    ),
    "STARTTLS answered with 454: starttls-not-supported": (
        [
            f"{P}AAAAA3: TLS is required, but host mx1.a.test[192.0.2.1] refused to start TLS: "
            "454 4.7.0 TLS not available due to temporary reason",
            tls("Verified", "mx2.a.test", "192.0.2.2"),
            status("AAAAA3", "b@a.test", "mx2.a.test[192.0.2.2]:25", "sent", "250 ok"),
        ],
        [
            (
                "mx1.a.test",
                None,
                R.STARTTLS_NOT_SUPPORTED,
                R.STARTTLS_NOT_SUPPORTED,
                R.STARTTLS_NOT_SUPPORTED,
            ),
            ("mx2.a.test", "Verified", None, None, None),
        ],
    ),
    "expired certificate on the primary, delivered to the backup": (
        [
            f"{P}server certificate verification failed for mx1.a.test[192.0.2.1]:25: "
            "certificate has expired",
            tls("Untrusted", "mx1.a.test", "192.0.2.1"),
            f"{P}AAAAA4: Server certificate not verified",
            tls("Verified", "mx2.a.test", "192.0.2.2"),
            status("AAAAA4", "b@a.test", "mx2.a.test[192.0.2.2]:25", "sent", "250 ok"),
        ],
        [
            (
                "mx1.a.test",
                "Untrusted",
                R.CERTIFICATE_EXPIRED,
                R.CERTIFICATE_EXPIRED,
                R.CERTIFICATE_EXPIRED,
            ),
            ("mx2.a.test", "Verified", None, None, None),
        ],
    ),
    "DANE mismatch: validation-failure": (
        [
            f"{P}server certificate verification failed for mx.d.test[192.0.2.9]:25: "
            "num=65:no matching DANE TLSA records",
            tls("Untrusted", "mx.d.test", "192.0.2.9"),
            status(
                "AAAAA5",
                "b@d.test",
                "mx.d.test[192.0.2.9]:25",
                "deferred",
                "Server certificate not verified",
            ),
        ],
        [
            (
                "mx.d.test",
                "Untrusted",
                R.VALIDATION_FAILURE,
                R.VALIDATION_FAILURE,
                R.VALIDATION_FAILURE,
            )
        ],
    ),
    "trusted chain, name not verified, refused: certificate-host-mismatch": (
        [
            tls("Trusted", "mx.a.test", "192.0.2.1"),
            f"{P}AAAAA6: Server certificate not verified",
            tls("Verified", "mx2.a.test", "192.0.2.2"),
            status("AAAAA6", "b@a.test", "mx2.a.test[192.0.2.2]:25", "sent", "250 ok"),
        ],
        [
            (
                "mx.a.test",
                "Trusted",
                R.CERTIFICATE_HOST_MISMATCH,
                R.CERTIFICATE_HOST_MISMATCH,
                R.CERTIFICATE_HOST_MISMATCH,
            ),
            ("mx2.a.test", "Verified", None, None, None),
        ],
    ),
    "plain text delivery: fails a policy, counts as success without one": (
        [status("AAAAA7", "b@a.test", "mx.a.test[192.0.2.1]:25", "sent", "250 ok")],
        [("mx.a.test", None, R.STARTTLS_NOT_SUPPORTED, R.STARTTLS_NOT_SUPPORTED, None)],
    ),
    "untrusted TLS delivered opportunistically": (
        [
            tls("Untrusted", "mx.a.test", "192.0.2.1"),
            status("AAAAA8", "b@a.test", "mx.a.test[192.0.2.1]:25", "sent", "250 ok"),
        ],
        [("mx.a.test", "Untrusted", R.CERTIFICATE_NOT_TRUSTED, R.VALIDATION_FAILURE, None)],
    ),
    "two recipients in one session: one session": (
        [
            tls("Verified", "mx.a.test", "192.0.2.1"),
            status("AAAAA9", "b@a.test", "mx.a.test[192.0.2.1]:25", "sent", "250 ok"),
            status("AAAAA9", "c@a.test", "mx.a.test[192.0.2.1]:25", "sent", "250 ok"),
        ],
        [("mx.a.test", "Verified", None, None, None)],
    ),
    "connection refused and relay=none: no session took place": (
        [
            f"{P}connect to mx.a.test[192.0.2.1]:25: Connection refused",
            status(
                "AAAAB1",
                "b@a.test",
                "none",
                "deferred",
                "connect to mx.a.test[192.0.2.1]:25: Connection refused",
            ),
        ],
        [],
    ),
    "a cached connection (conn_use=2, or TLS reused) is not a new session": (
        [
            status(
                "AAAAB2",
                "b@a.test",
                "mx.a.test[192.0.2.1]:25",
                "sent",
                "250 ok",
                extra="conn_use=2, ",
            ),
            tls("Verified", "mx.a.test", "192.0.2.1", how="reused"),
            status("AAAAB3", "b@a.test", "mx.a.test[192.0.2.1]:25", "sent", "250 ok"),
        ],
        [],
    ),
    # RFC 8460 §4.3.1: starttls-not-supported is a server that answered EHLO without STARTTLS.
    # One that failed at the greeting or at EHLO/HELO (smtp_proto.c) had no TLS session.
    "greeting refused with 421 on the first MX host: no session": (
        [
            f"{P}AAAAE1: host mx1.a.test[192.0.2.1] refused to talk to me: "
            "421 4.7.0 Too many connections",
            tls("Verified", "mx2.a.test", "192.0.2.2"),
            status("AAAAE1", "b@a.test", "mx2.a.test[192.0.2.2]:25", "sent", "250 ok"),
        ],
        [("mx2.a.test", "Verified", None, None, None)],
    ),
    "greeting refused on the last MX host (its status line): no session": (
        [
            status(
                "AAAAE2",
                "b@a.test",
                "mx.a.test[192.0.2.1]:25",
                "bounced",
                "host mx.a.test[192.0.2.1] refused to talk to me: 554 5.7.1 No service",
            ),
        ],
        [],
    ),
    "connection lost while receiving the greeting: no session": (
        [
            f"{P}AAAAE3: lost connection with mx1.a.test[192.0.2.1] while receiving the initial "
            "server greeting",
            status(
                "AAAAE3",
                "b@a.test",
                "none",
                "deferred",
                "connect to mx2.a.test[192.0.2.2]:25: Connection refused",
            ),
        ],
        [],
    ),
    "timed out during the EHLO handshake: no session": (
        [
            status(
                "AAAAE4",
                "b@a.test",
                "mx.a.test[192.0.2.1]:25",
                "deferred",
                "conversation with mx.a.test[192.0.2.1] timed out while performing the EHLO "
                "handshake",
            ),
        ],
        [],
    ),
    "EHLO and then HELO refused (4xx/5xx to EHLO falls back to HELO): no session": (
        [
            status(
                "AAAAE5",
                "b@a.test",
                "mx.a.test[192.0.2.1]:25",
                "deferred",
                "host mx.a.test[192.0.2.1] refused to talk to me: 451 4.3.0 try later",
            ),
        ],
        [],
    ),
    "421 to the EHLO after STARTTLS: a TLS session, counted": (
        [
            tls("Verified", "mx.a.test", "192.0.2.1"),
            status(
                "AAAAE6",
                "b@a.test",
                "mx.a.test[192.0.2.1]:25",
                "deferred",
                "host mx.a.test[192.0.2.1] refused to talk to me: 421 4.3.2 shutting down",
            ),
        ],
        [("mx.a.test", "Verified", None, None, None)],
    ),
    "connection lost after EHLO, at STARTTLS: starttls-not-supported": (
        [
            status(
                "AAAAE7",
                "b@a.test",
                "mx.a.test[192.0.2.1]:25",
                "deferred",
                "lost connection with mx.a.test[192.0.2.1] while receiving the STARTTLS response",
            ),
        ],
        [("mx.a.test", None, R.STARTTLS_NOT_SUPPORTED, R.STARTTLS_NOT_SUPPORTED, None)],
    ),
    "an SMTP failure on the first MX host ends its session": (
        [
            tls("Verified", "mx1.a.test", "192.0.2.1"),
            f"{P}AAAAB4: host mx1.a.test[192.0.2.1] said: 421 4.3.2 busy (in reply to MAIL FROM)",
            tls("Verified", "mx2.a.test", "192.0.2.2"),
            status("AAAAB4", "b@a.test", "mx2.a.test[192.0.2.2]:25", "sent", "250 ok"),
        ],
        [
            ("mx1.a.test", "Verified", None, None, None),
            ("mx2.a.test", "Verified", None, None, None),
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_session_to_an_mx_host_is_one_result(name: str) -> None:
    lines, expected = CASES[name]
    found = sessions(lines, now=NOW)
    got = [
        (s.mx_host, s.tls, result_type(s, PolicyType.STS), result_type(s, PolicyType.TLSA),
         result_type(s, PolicyType.NO_POLICY_FOUND))
        for s in found
    ]  # fmt: skip
    assert got == expected, name
    assert {s.domain for s in found} <= {"a.test", "d.test"}


# Sessions carry no text of Postfix's: replies quote addresses (RFC 8460 §4.4 goes to others).
ENDINGS: list[tuple[list[str], list[Ending]]] = [
    (
        [
            tls("Untrusted", "mx.a.test", "192.0.2.1"),
            status(
                "AAAAF1",
                "alice.secret@a.test",
                "mx.a.test[192.0.2.1]:25",
                "bounced",
                "host mx.a.test[192.0.2.1] said: 550 5.1.1 <alice.secret@a.test>: Recipient "
                "address rejected: User unknown (in reply to RCPT TO command)",
            ),
        ],
        [Ending.SMTP_ERROR],
    ),
    (
        [
            f"{P}AAAAF2: TLS is required, but host mx1.a.test[192.0.2.1] refused to start TLS: "
            "454 4.7.0 <bob@a.test> not today",
            f"{P}AAAAF2: TLS is required, but was not offered by host mx2.a.test[192.0.2.2]",
            f"{P}AAAAF2: lost connection with mx3.a.test[192.0.2.3] while sending RCPT TO",
            f"{P}server certificate verification failed for mx4.a.test[192.0.2.4]:25: "
            "certificate has expired",
            tls("Untrusted", "mx4.a.test", "192.0.2.4"),
            f"{P}AAAAF2: Server certificate not verified",
            f"{P}SSL_connect error to mx6.a.test[192.0.2.6]:25: -1",
            f"{P}AAAAF2: Cannot start TLS: handshake failure",
            status("AAAAF2", "bob@a.test", "mx5.a.test[192.0.2.5]:25", "sent", "250 <bob@a.test>"),
        ],
        [
            Ending.STARTTLS_REFUSED,
            Ending.STARTTLS_NOT_OFFERED,
            Ending.CONNECTION_LOST,
            Ending.CERTIFICATE_NOT_VERIFIED,
            Ending.TLS_HANDSHAKE_FAILED,
            Ending.DELIVERED,
        ],
    ),
]


@pytest.mark.parametrize(("lines", "endings"), ENDINGS)
def test_sessions_say_how_they_ended_in_a_fixed_vocabulary(
    lines: list[str], endings: list[Ending]
) -> None:
    found = sessions(lines, now=NOW)
    assert [s.ending for s in found] == endings
    assert all(isinstance(s.ending, Ending) for s in found)


def test_state_saved_with_postfix_text_resumes_without_it() -> None:
    j = Joiner()
    first = parse_line(
        f"{P}AAAAF3: host mx1.a.test[192.0.2.1] said: 450 4.2.0 <alice@a.test>: mailbox busy "
        "(in reply to RCPT TO command)",
        now=NOW,
    )
    assert first is not None
    assert list(j.feed(first)) == []
    state = j.to_json()
    (proc,) = state.values()
    assert proc["finished"][0]["detail"] == Ending.SMTP_ERROR.value
    # A state file of the first release kept the text itself.
    proc["finished"][0]["detail"] = "host mx1.a.test[192.0.2.1] said: 450 4.2.0 <alice@a.test>"
    last = parse_line(
        status("AAAAF3", "alice@a.test", "mx2.a.test[192.0.2.2]:25", "sent", "250 ok"), now=NOW
    )
    assert last is not None
    found = list(Joiner.from_json(state).feed(last))
    assert [s.ending for s in found] == [Ending.SMTP_ERROR, Ending.DELIVERED]


def test_processes_are_joined_separately_when_their_lines_interleave() -> None:
    other = "Nov 29 11:17:03 client postfix/smtp[9999]: "
    lines = [
        tls("Verified", "mx.a.test", "192.0.2.1"),
        f"{other}Untrusted TLS connection established to mx.e.test[192.0.2.5]:25{CIPHER}",
        status("AAAAC1", "b@a.test", "mx.a.test[192.0.2.1]:25", "sent", "250 ok"),
        f"{other}AAAAC2: to=<x@e.test>, relay=mx.e.test[192.0.2.5]:25, delay=1, dsn=2.0.0, "
        "status=sent (250 ok)",
    ]
    got = [(s.queue_id, s.domain, s.tls) for s in sessions(lines, now=NOW)]
    assert got == [("AAAAC1", "a.test", "Verified"), ("AAAAC2", "e.test", "Untrusted")]


def test_other_programs_lines_are_not_sessions() -> None:
    lines = [
        "Nov 29 11:17:03 client postfix/lmtp[5]: AAAAD1: to=<b@a.test>, "
        "relay=mx.a.test[192.0.2.1]:24, delay=1, dsn=2.0.0, status=sent (250 ok)",
        "Nov 29 11:17:03 client postfix/qmgr[4]: AAAAD1: removed",
    ]
    assert sessions(lines, now=NOW) == []


def test_joiner_state_survives_a_stop_between_any_two_lines() -> None:
    lines = CASES["expired certificate on the primary, delivered to the backup"][0]
    whole = sessions(lines, now=NOW)
    for cut in range(len(lines) + 1):
        j = Joiner()
        got: list[Session] = []
        for text in lines[:cut]:
            line = parse_line(text, now=NOW)
            assert line is not None
            got.extend(j.feed(line))
        j = Joiner.from_json(j.to_json())
        for text in lines[cut:]:
            line = parse_line(text, now=NOW)
            assert line is not None
            got.extend(j.feed(line))
        assert got == whole, f"stopped after {cut} lines"


def test_damaged_joiner_state_is_refused() -> None:
    with pytest.raises(ValueError, match="not a saved Postfix log joiner state"):
        Joiner.from_json({"x": {"pending": 1}})


# Names as they are compared (lower-case A-labels, no root dot), and never an error: a log
# line is untrusted, and a name without an A-label just matches nothing.
HOST_KEYS = [
    ("MX1.A.Test.", "mx1.a.test"),
    ("mx.bücher.example", "mx.xn--bcher-kva.example"),
    ("mx.xn--bcher-kva.example", "mx.xn--bcher-kva.example"),
    ("_underscore.a.test", "_underscore.a.test"),  # not a host name: kept, lower-cased
    ("a\u200db.example", "a\u200db.example"),  # no A-label (a joiner, RFC 5892): as logged
    ("", ""),
]


@pytest.mark.parametrize(("logged", "key"), HOST_KEYS)
def test_host_names_from_the_log_are_compared_as_a_labels(logged: str, key: str) -> None:
    assert host_key(logged) == key


def test_a_status_line_names_the_domain_and_mx_host_as_a_labels() -> None:
    lines = [status("QID1234567", "Bob@Bücher.Example.", "MX.Bücher.Example[192.0.2.1]:25",
                    "sent", "250 ok")]  # fmt: skip
    [s] = sessions(lines, now=NOW)
    assert (s.domain, s.mx_host) == ("xn--bcher-kva.example", "mx.xn--bcher-kva.example")


# --- Postfix 3.10: the sessions its own TLSRPT events cover, and those they leave out -------

Q = "Dec  2 06:25:13 client310 postfix/smtp[21159]: "


def sts(mode: str, *, rua: tuple[str, ...] = ("mailto:tlsrpt@t.test",)) -> ReportedPolicy:
    return ReportedPolicy(
        PolicyType.STS,
        ("version: STSv1", f"mode: {mode}", "mx: *.t.test", "max_age: 86400"),
        ("*.t.test",),
        rua,
    )


TESTING, ENFORCE = sts("testing"), sts("enforce")
TLSA = ReportedPolicy(PolicyType.TLSA, ("3 1 1 " + "ab" * 32,), (), ("mailto:tlsrpt@t.test",))


def sent310(qid: str, host: str = "mx.t.test", ip: str = "127.86.1.6") -> str:
    return (
        f"{Q}{qid}: to=<postmaster@t.test>, relay={host}[{ip}]:25, delay=0.02, "
        "delays=0/0/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 Message accepted for delivery)"
    )


def tlsrpt(status: str, host: str = "mx.t.test", ip: str = "127.86.1.6", more: str = "") -> str:
    return f"{Q}TLSRPT: status={status}, domain=t.test, receiving_mx={host}[{ip}]{more}"


TLS13 = ": TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange x25519"

# name -> (Postfix 3.10.13's lines for one delivery, (MX host, TLSRPT status logged, TLS) per
# session, the sessions left out under the `testing` policy: what only the log can report)
CASES_310: dict[str, tuple[list[str], list[tuple[str, str | None, str | None]], list[int]]] = {
    # TLS optional (`may`) and not offered: no TLSRPT event, nothing but the status line.
    "testing, STARTTLS stripped": (
        [sent310("2373C22C16F")], [("mx.t.test", None, None)], [0]),
    # Offered, but answered 454: the same lines (3.10 reports this only where TLS is required).
    "testing, STARTTLS refused with 454": (
        [sent310("2373C22C170")], [("mx.t.test", None, None)], [0]),
    # The handshake failed: reported (validation-failure), then the retry in plain text to the
    # same host (a message that waited minimal_backoff_time) is not.
    "testing, TLS handshake failure, then plain text": (
        [
            f"{Q}SSL_connect error to mx.t.test[127.86.1.6]:25: lost connection",
            tlsrpt("failure", more=", failure_type=validation_failure, "
                   "failure_reason=tls-handshake-failure"),
            f"{Q}C7FAA220191: Cannot start TLS: handshake failure",
            sent310("C7FAA220191"),
        ],
        [("mx.t.test", "failure", None), ("mx.t.test", None, None)],
        [1],
    ),
    # At `may` the certificate is not checked: Postfix reports a success.
    "testing, intercepted with a self-signed certificate": (
        [
            f"{Q}Untrusted TLS connection established to mx.t.test[127.86.1.6]:25{TLS13}",
            tlsrpt("success"),
            sent310("AC1EF22C16F"),
        ],
        [("mx.t.test", "success", "Untrusted")],
        [],
    ),
    "enforce, STARTTLS stripped on mx1, delivered to mx2": (
        [
            tlsrpt("failure", "mx1.t.test", "127.86.1.4", ", failure_type=starttls_not_supported"),
            f"{Q}A097122C10E: TLS is required, but was not offered by host mx1.t.test[127.86.1.4]",
            f"{Q}Verified TLS connection established to mx2.t.test[127.86.1.5]:25{TLS13}",
            tlsrpt("success", "mx2.t.test", "127.86.1.5"),
            sent310("A097122C10E", "mx2.t.test", "127.86.1.5"),
        ],
        [("mx1.t.test", "failure", None), ("mx2.t.test", "success", "Verified")],
        [],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES_310))
def test_the_tlsrpt_event_postfix_logged_belongs_to_its_session(name: str) -> None:
    lines, expected, left_out = CASES_310[name]
    found = sessions(lines, now=NOW)
    assert [(s.mx_host, s.tlsrpt, s.tls) for s in found] == expected
    assert [i for i, s in enumerate(found) if left_out_by_postfix(s, TESTING)] == left_out
    assert [s.reported_by_postfix for s in found] == [t is not None for _, t, _ in expected]
    # A session Postfix reported is never left out, whatever the policy.
    for s in found:
        if s.reported_by_postfix:
            assert not any(left_out_by_postfix(s, p) for p in (TESTING, ENFORCE, TLSA))


@pytest.mark.parametrize("name", list(CASES_310))
def test_what_is_left_out_is_what_the_log_alone_would_call_starttls_not_supported(
    name: str,
) -> None:
    # Under `testing`, the log collector (Postfix 3.7) calls each of these sessions
    # starttls-not-supported; the others are Postfix's own events.
    lines, _, left_out = CASES_310[name]
    for i, s in enumerate(sessions(lines, now=NOW)):
        if i in left_out:
            assert result_type(s, PolicyType.STS) is R.STARTTLS_NOT_SUPPORTED, name


# A plain-text session without a TLSRPT event, under each policy: left out or not.
PLAIN = sessions([sent310("2373C22C171")], now=NOW)[0]
LEFT_OUT_POLICIES = [
    (TESTING, True),
    (sts("testing", rua=()), False),  # no TLS-RPT record: Postfix reports nothing, nor do we
    (ENFORCE, False),  # TLS was required: Postfix refused and reported what it could
    (TLSA, False),
    (NO_POLICY_FOUND, False),  # nothing a session could fail
]


@pytest.mark.parametrize(("policy", "left_out"), LEFT_OUT_POLICIES)
def test_only_plain_text_under_a_report_only_policy_with_a_rua_is_left_out(
    policy: ReportedPolicy, left_out: bool
) -> None:
    assert left_out_by_postfix(PLAIN, policy) is left_out


def test_a_session_postfix_refused_or_reported_or_with_tls_is_not_left_out() -> None:
    # Refused by Postfix itself, for a reason it does not report (a local one).
    local = sent310("D1E2F30001").replace(
        "dsn=2.0.0, status=sent (250 2.0.0 Message accepted for delivery)",
        "dsn=4.7.5, status=deferred (TLS is required, but our TLS engine is unavailable)",
    )
    [refused] = sessions([local], now=NOW)
    assert (refused.tls, refused.refused, refused.tlsrpt) == (None, R.STARTTLS_NOT_SUPPORTED, None)
    assert not left_out_by_postfix(refused, TESTING)
    # A later Postfix that reports a refused STARTTLS under `may` (3.11) logs an event: then
    # the same plain-text session is its own, not the log's.
    reported = sessions(
        [tlsrpt("failure", more=", failure_type=starttls_not_supported"), sent310("D1E2F30002")],
        now=NOW,
    )
    assert [(s.tls, s.tlsrpt) for s in reported] == [(None, "failure")]
    assert not left_out_by_postfix(reported[0], TESTING)
    # TLS without a TLSRPT event (e.g. a resumed handshake Postfix skips): TLS happened.
    resumed = sessions([f"{Q}Trusted TLS connection established to mx.t.test[127.86.1.6]:25"
                        f"{TLS13}", sent310("D1E2F30003")], now=NOW)  # fmt: skip
    assert [(s.tls, s.tlsrpt) for s in resumed] == [("Trusted", None)]
    assert not left_out_by_postfix(resumed[0], TESTING)


def test_a_tlsrpt_line_without_a_usable_peer_still_marks_the_session() -> None:
    found = sessions(
        [f"{Q}TLSRPT: status=success, domain=t.test, receiving_mx=(null)[(null)]",
         sent310("D1E2F30004")], now=NOW,
    )  # fmt: skip
    assert [(s.mx_host, s.tlsrpt) for s in found] == [("mx.t.test", "success")]


def test_tlsrpt_lines_of_another_process_belong_to_its_sessions() -> None:
    other = "Dec  2 06:25:13 client310 postfix/smtp[777]: "
    lines = [
        f"{other}TLSRPT: status=success, domain=o.test, receiving_mx=mx.o.test[192.0.2.7]",
        sent310("D1E2F30005"),
        f"{other}D1E2F30006: to=<x@o.test>, relay=mx.o.test[192.0.2.7]:25, dsn=2.0.0, "
        "status=sent (ok)",
    ]
    assert [(s.queue_id, s.tlsrpt) for s in sessions(lines, now=NOW)] == [
        ("D1E2F30005", None), ("D1E2F30006", "success")]  # fmt: skip


def test_the_tlsrpt_status_survives_a_stop_between_any_two_lines() -> None:
    lines = CASES_310["testing, TLS handshake failure, then plain text"][0]
    whole = sessions(lines, now=NOW)
    for cut in range(len(lines) + 1):
        j = Joiner()
        got: list[Session] = []
        for i, text in enumerate(lines):
            if i == cut:
                j = Joiner.from_json(j.to_json())
            line = parse_line(text, now=NOW)
            assert line is not None
            got.extend(j.feed(line))
        assert got == whole, f"stopped after {cut} lines"


def test_state_saved_before_tlsrpt_statuses_resumes() -> None:
    j = Joiner()
    for text in CASES_310["testing, TLS handshake failure, then plain text"][0][:3]:
        line = parse_line(text, now=NOW)
        assert line is not None
        assert list(j.feed(line)) == []
    state = j.to_json()
    (proc,) = state.values()
    del proc["pending"]["tlsrpt"], proc["finished"][0]["tlsrpt"]  # as an older release saved
    last = parse_line(sent310("C7FAA220191"), now=NOW)
    assert last is not None
    found = list(Joiner.from_json(state).feed(last))
    assert [(s.tlsrpt, s.refused) for s in found] == [
        (None, R.VALIDATION_FAILURE), (None, None)]  # fmt: skip


@pytest.mark.parametrize(
    ("strings", "expected"),
    [
        (("version: STSv1", "mode: testing", "mx: a.test", "max_age: 1"), True),
        (("version: STSv1", "mode:testing"), True),
        (("mode: \ttesting  ",), True),
        (("version: STSv1", "mode: enforce"), False),
        (("mode: none",), False),
        (("Mode: testing",), False),  # RFC 8461 §3.2: field names are case-sensitive
        (("mode: Testing",), False),  # and so are the modes
        (("mode: enforce", "mode: testing"), False),  # the first mode counts
        (("version: STSv1",), False),
        ((), False),
    ],
)
def test_a_report_only_policy_is_mta_sts_testing(strings: tuple[str, ...], expected: bool) -> None:
    assert report_only(ReportedPolicy(PolicyType.STS, strings, ("a.test",))) is expected
    # Only an `sts` policy has a mode.
    assert not report_only(ReportedPolicy(PolicyType.TLSA, strings))
    assert not report_only(ReportedPolicy(PolicyType.NO_POLICY_FOUND, strings))
