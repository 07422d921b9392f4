"""A real Postfix, driven by `mxguard serve postfix`, sending into the lab (`CASES`).

Postfix 3.7 has DANE but no MTA-STS. With `smtp_tls_policy_maps` pointing at mxguard's
socketmap, an MTA-STS `enforce` domain gets `secure match=…` (RFC 8461 §5: verified TLS to a
listed MX host or no delivery), a `testing` domain gets Postfix's own default (deliver anyway),
and a DANE domain gets `dane-only`, which Postfix verifies itself through the lab's validating
resolver (RFC 7672 §2). Each case below is delivered once by the session's Postfix
(`postfix_run` in postfix_harness.py); the tests check, per case, what Postfix logged, what the
lab's receiver got and what the STRIPTLS attacker in front of the MX host saw.

The last case has no policy at all: the attacker strips STARTTLS and reads the message. It is
what every protected case would look like if mxguard's answer did not reach Postfix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mxguard.lab.lab import Lab

pytest.register_assert_rewrite("postfix_harness")

from postfix_harness import (  # noqa: E402
    CASES,
    SPARE_HOST,
    Delivery,
    LogLine,
    PostfixInstance,
    PostfixRun,
    find_outcome,
    skip_reason,
    suite_address,
)

pytest_plugins = ["postfix_harness"]

pytestmark = pytest.mark.lab

# case -> (status, dsn class, text in Postfix's reason, trust of the last TLS session or None)
OUTCOMES = {
    "sts-enforce-honest": ("sent", "2", "", "Verified"),
    # RFC 8461 §5: enforce and STARTTLS missing -> no delivery; Postfix's `secure` level says so.
    "sts-enforce-stripped": ("deferred", "4", "TLS is required, but was not offered", None),
    # RFC 8461 §4.2: the certificate must be valid for the MX host name, not any name below
    # the domain; `secure match=<the allowed MX hosts>` makes Postfix check exactly that.
    "sts-enforce-intercepted": ("deferred", "4", "Server certificate not verified", "Untrusted"),
    # RFC 8461 §5: testing mode delivers anyway (and would only report).
    "sts-testing-stripped": ("sent", "2", "", None),
    # RFC 7672 §3.1.1: DANE-EE 3 1 1 matches the self-signed certificate -> Verified.
    "dane-honest": ("sent", "2", "", "Verified"),
    # RFC 7672 §2.2: no TLSA record matches -> do not deliver; defer (never bounce).
    "dane-mismatch": ("deferred", "4", "Server certificate not verified", "Untrusted"),
    "no-policy-stripped": ("sent", "2", "", None),
}

# case -> how the message reached the receiver: "tls", "plain", or None (it did not)
RECEIVED = {
    "sts-enforce-honest": "tls",
    "sts-enforce-stripped": None,
    "sts-enforce-intercepted": None,
    "sts-testing-stripped": "plain",
    "dane-honest": "tls",
    "dane-mismatch": None,
    "no-policy-stripped": "plain",
}


def delivery(run: PostfixRun, name: str) -> Delivery:
    return run.deliveries[name]


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_postfix_logs_the_outcome_the_policy_demands(postfix_run: PostfixRun, name: str) -> None:
    status, dsn_class, reason, trust = OUTCOMES[name]
    outcome = delivery(postfix_run, name).outcome
    detail = f"{name}: Postfix logged\n{outcome.text()}"
    assert outcome.status == status, detail
    assert outcome.dsn.startswith(dsn_class + "."), detail
    assert reason in outcome.reason, detail
    assert (outcome.tls[-1] if outcome.tls else None) == trust, detail
    assert outcome.verified == (trust == "Verified" and status == "sent"), detail


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_receiver_gets_the_message_only_as_the_policy_allows(
    postfix_run: PostfixRun, name: str
) -> None:
    d = delivery(postfix_run, name)
    expected = RECEIVED[name]
    if expected is None:
        assert d.received == (), f"{name}: delivered although the policy forbids it"
    else:
        assert [m.tls for m in d.received] == [expected == "tls"], name


@pytest.mark.parametrize(
    "name", ["sts-enforce-honest", "sts-enforce-stripped", "dane-honest", "dane-mismatch"]
)
def test_attacker_sees_no_envelope_and_no_message_of_a_protected_domain(
    postfix_run: PostfixRun, name: str
) -> None:
    # RFC 3207 / RFC 8461 §5: nothing of the transaction is sent before verified TLS.
    d = delivery(postfix_run, name)
    assert d.attacked, f"{name}: Postfix's connection did not pass the attacker"
    assert not d.attacker_saw(b"MAIL FROM"), name
    assert not d.attacker_saw(d.submission.marker.encode()), name


@pytest.mark.parametrize("name", ["sts-enforce-stripped", "sts-testing-stripped"])
def test_stripping_really_happened(postfix_run: PostfixRun, name: str) -> None:
    d = delivery(postfix_run, name)
    assert any(s.stripped for s in d.attacked), f"{name}: the attacker stripped nothing"


@pytest.mark.parametrize("name", ["sts-testing-stripped", "no-policy-stripped"])
def test_without_enforcement_the_attacker_reads_the_message(
    postfix_run: PostfixRun, name: str
) -> None:
    # The counter-proof: where no policy forbids plain text, STRIPTLS works against Postfix.
    d = delivery(postfix_run, name)
    assert d.attacker_saw(b"MAIL FROM"), name
    assert d.attacker_saw(d.submission.marker.encode()), name


def test_enforce_tries_every_mx_host_before_deferring(
    postfix_run: PostfixRun, postfix_mta: PostfixInstance
) -> None:
    d = delivery(postfix_run, "sts-enforce-stripped")
    assert {s.peer.split(":")[0] for s in d.attacked} == {postfix_mta.address}
    assert len(d.attacked) >= 2, "both MX hosts of sts-enforce.test should have been tried"


def test_log_file_holds_every_delivery(postfix_log: Path, postfix_run: PostfixRun) -> None:
    # Read independently of the harness's parser: every submitted message has a final
    # status line for its recipient in the file other tests (the TLS-RPT collector) read.
    lines = postfix_log.read_text(encoding="utf-8").splitlines()
    for name, d in postfix_run.deliveries.items():
        statuses = [
            line.split("status=")[1].split()[0]
            for line in lines
            if f" {d.submission.queue_id}: " in line
            and f"to=<{d.submission.recipient}>" in line
            and "status=" in line
        ]
        assert statuses, f"{name}: no status line for {d.submission.queue_id} in the log"
        assert statuses[-1] == OUTCOMES[name][0], name


def test_deferred_messages_are_not_left_in_the_queue(
    postfix_mta: PostfixInstance, postfix_run: PostfixRun
) -> None:
    assert "Mail queue is empty" in postfix_mta.queue()


def test_postfix_resolves_through_the_lab_resolver_only(postfix_mta: PostfixInstance) -> None:
    # Postfix's processes see their own resolv.conf (lab resolver, AD bit trusted); the
    # machine's stays what it was.
    assert postfix_mta.master_pid is not None
    seen_by_postfix = Path(f"/proc/{postfix_mta.master_pid}/root/etc/resolv.conf").read_text()
    assert seen_by_postfix == postfix_mta.resolv_conf.read_text()
    assert f"nameserver {postfix_mta.resolver}\noptions trust-ad\n" == seen_by_postfix
    assert Path("/etc/resolv.conf").read_text() != seen_by_postfix


def test_a_stopped_instance_leaves_no_process_behind(lab: Lab) -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    instance = PostfixInstance(
        address=suite_address(lab, SPARE_HOST), resolver=lab.resolver_address, ca_file=lab.ca_file
    )
    with instance:
        assert instance.pids(), "the instance should be running"
    assert instance.pids() == []


# --- the log parser, on lines as Postfix 3.7 writes them --------------------------------

_LOG = [
    "Nov 29 11:10:06 client postfix/smtp[21573]: server certificate verification failed for "
    "mx.d.test[127.0.0.9]:25: num=65:no matching DANE TLSA records",
    "Nov 29 11:10:06 client postfix/smtp[21573]: Untrusted TLS connection established to "
    "mx.d.test[127.0.0.9]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
    "Nov 29 11:10:06 client postfix/smtp[21570]: Verified TLS connection established to "
    "mx.e.test[127.0.0.8]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
    "Nov 29 11:10:06 client postfix/smtp[21570]: A3F1D20D0B2: to=<b@e.test>, "
    "relay=mx.e.test[127.0.0.8]:25, delay=0.09, delays=0.02/0.04/0.03/0, dsn=2.0.0, "
    "status=sent (250 2.0.0 Message accepted for delivery)",
    "Nov 29 11:10:06 client postfix/smtp[21573]: A6C3220D0B3: to=<b@d.test>, "
    "relay=mx.d.test[127.0.0.9]:25, delay=0.07, delays=0.03/0.02/0.02/0, dsn=4.7.5, "
    "status=deferred (Server certificate not verified)",
    "Nov 29 11:10:07 client postfix/smtp[21570]: A8CF320C116: to=<c@f.test>, "
    "relay=mx.f.test[127.0.0.7]:25, delay=0.1, delays=0.01/0.04/0.01/0, dsn=4.7.4, "
    "status=deferred (TLS is required, but was not offered by host mx.f.test[127.0.0.7])",
]


@pytest.mark.parametrize(
    ("queue_id", "rcpt", "status", "dsn", "tls", "n_lines"),
    [
        ("A3F1D20D0B2", "b@e.test", "sent", "2.0.0", ("Verified",), 2),
        ("A6C3220D0B3", "b@d.test", "deferred", "4.7.5", ("Untrusted",), 3),
        # the same smtp process: lines before its previous status line belong to that one
        ("A8CF320C116", "c@f.test", "deferred", "4.7.4", (), 1),
    ],
)
def test_outcome_collects_the_session_lines_of_the_smtp_process(
    queue_id: str, rcpt: str, status: str, dsn: str, tls: tuple[str, ...], n_lines: int
) -> None:
    outcome = find_outcome(_LOG, queue_id, rcpt)
    assert outcome is not None
    assert (outcome.status, outcome.dsn, outcome.tls, len(outcome.lines)) == (
        status, dsn, tls, n_lines,
    )  # fmt: skip


def test_outcome_of_an_unknown_queue_id_or_recipient_is_none() -> None:
    assert find_outcome(_LOG, "FFFFFFFFFFF", "b@e.test") is None
    assert find_outcome(_LOG, "A3F1D20D0B2", "someone@else.test") is None


def test_unparsable_log_lines_are_ignored() -> None:
    assert LogLine.parse("garbage") is None
    assert find_outcome(["garbage", *_LOG], "A3F1D20D0B2", "b@e.test") is not None
