"""`mxguard send` against the lab's attacker: what leaks, what is refused, what is reported.

Every test asserts three views of the same delivery: what the sender decided (status, exit
code, result types), what the receiver got (and whether over TLS), and what the attacker in
front of the MX host could read. A protected message must never appear in the attacker's
records, and no envelope command may reach it in plain text.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode, DnsAttack, PolicyBehaviour

pytestmark = pytest.mark.lab


@dataclasses.dataclass
class Sent:
    code: int
    result: dict[str, Any]
    secret: bytes

    @property
    def attempts(self) -> list[dict[str, Any]]:
        return list(self.result["attempts"])

    def result_types(self) -> list[str | None]:
        return [a["result_type"] for a in self.attempts]


def send(lab: Lab, store: Path, domain: str) -> Sent:
    secret = f"password: hunter2-{secrets.token_hex(4)}".encode()
    message = b"Subject: lab test\r\n\r\nHello.\r\n" + secret + b"\r\n"
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{store}", "send",
         "--from", "alice@client.test", "--to", f"bob@{domain}", "--data", "-", "--json"],
        input=message,
    )  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return Sent(result.exit_code, json.loads(result.stdout), secret)


def attacker_read(lab: Lab, host: str, secret: bytes) -> bool:
    return secret in lab.attacker(host).client_bytes()


def envelope_leaked(lab: Lab, host: str) -> bool:
    seen = lab.attacker(host).client_bytes().upper()
    return any(cmd in seen for cmd in (b"MAIL FROM", b"RCPT TO", b"DATA"))


def received(lab: Lab, host: str, secret: bytes) -> list[bool]:
    """For each message the receiver stored that holds the secret: did it come over TLS?"""
    return [m.tls for m in lab.receiver(host).messages if secret in m.data]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def test_a_bad_sender_is_a_usage_error_that_names_the_option(lab: Lab, store: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{store}", "send",
         "--from", "alice@client.test>", "--to", "bob@nopolicy.test"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    # The option once, then the problem: "Invalid value for --from: address '…' is not a …".
    assert "--from: address 'alice@client.test>' is not a mailbox" in result.output
    assert "--from: --from" not in result.output and "sender address" not in result.output
    assert lab.attacker("mx.nopolicy.test").sessions == []


def test_no_policy_stripped_is_delivered_in_plain_text_and_read(lab: Lab, store: Path) -> None:
    host = "mx.nopolicy.test"
    lab.set_attack(host, AttackMode.STRIP)
    sent = send(lab, store, "nopolicy.test")
    assert (sent.code, sent.result["status"]) == (0, "delivered")
    (attempt,) = sent.attempts
    assert (attempt["starttls"], attempt["tls_version"], attempt["plaintext"]) == (
        False, None, True,
    )  # fmt: skip
    assert attacker_read(lab, host, sent.secret)
    assert received(lab, host, sent.secret) == [False]


def test_mta_sts_enforce_honest_path_is_delivered_with_pkix(lab: Lab, store: Path) -> None:
    sent = send(lab, store, "sts-enforce.test")
    assert (sent.code, sent.result["status"]) == (0, "delivered")
    assert sent.result["policy"] == {"source": "mta-sts", "mode": "enforce"}
    first = sent.attempts[0]
    assert (first["mx"], first["verified"], first["result_type"]) == (
        "mx1.sts-enforce.test", "pkix", None,
    )  # fmt: skip
    assert first["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert received(lab, "mx1.sts-enforce.test", sent.secret) == [True]
    assert not attacker_read(lab, "mx1.sts-enforce.test", sent.secret)


ENFORCE_ATTACKS = [
    (AttackMode.STRIP, "starttls-not-supported"),
    (AttackMode.REFUSE_454, "starttls-not-supported"),
    (AttackMode.INTERCEPT_SELF_SIGNED, "certificate-not-trusted"),
    (AttackMode.INTERCEPT_WRONG_NAME, "certificate-host-mismatch"),
]


@pytest.mark.parametrize(
    ("mode", "result_type"), ENFORCE_ATTACKS, ids=[m for m, _ in ENFORCE_ATTACKS]
)
def test_mta_sts_enforce_refuses_every_attack(
    lab: Lab, store: Path, mode: AttackMode, result_type: str
) -> None:
    hosts = ["mx1.sts-enforce.test", "mx2.sts-enforce.test"]
    for host in hosts:
        lab.set_attack(host, mode)
    sent = send(lab, store, "sts-enforce.test")
    assert (sent.code, sent.result["status"]) == (75, "deferred")
    assert sent.result_types() == [result_type, result_type]
    assert sent.result["result_type"] == result_type
    for host in hosts:
        assert not envelope_leaked(lab, host)
        assert not attacker_read(lab, host, sent.secret)
        assert received(lab, host, sent.secret) == []


def test_mta_sts_enforce_uses_the_honest_backup_mx(lab: Lab, store: Path) -> None:
    lab.set_attack("mx1.sts-enforce.test", AttackMode.STRIP)
    sent = send(lab, store, "sts-enforce.test")
    assert (sent.code, sent.result["status"]) == (0, "delivered")
    assert [(a["mx"], a["result_type"], a["delivered"]) for a in sent.attempts] == [
        ("mx1.sts-enforce.test", "starttls-not-supported", False),
        ("mx2.sts-enforce.test", None, True),
    ]
    assert not envelope_leaked(lab, "mx1.sts-enforce.test")
    assert received(lab, "mx2.sts-enforce.test", sent.secret) == [True]


def test_mta_sts_enforce_skips_an_expired_certificate(lab: Lab, store: Path) -> None:
    sent = send(lab, store, "sts-bad-cert-mx.test")
    assert sent.result["status"] == "delivered"
    assert [(a["mx"], a["result_type"]) for a in sent.attempts] == [
        ("mx1.sts-bad-cert-mx.test", "certificate-expired"),
        ("mx2.sts-bad-cert-mx.test", None),
    ]
    assert received(lab, "mx1.sts-bad-cert-mx.test", sent.secret) == []
    assert received(lab, "mx2.sts-bad-cert-mx.test", sent.secret) == [True]


def test_mta_sts_enforce_never_contacts_an_mx_outside_the_policy(lab: Lab, store: Path) -> None:
    host = "mx.sts-mx-mismatch.test"
    sent = send(lab, store, "sts-mx-mismatch.test")
    assert (sent.code, sent.result["status"]) == (75, "deferred")
    (attempt,) = sent.attempts
    assert (attempt["ip"], attempt["result_type"]) == (None, "validation-failure")
    assert lab.attacker(host).sessions == []
    assert lab.receiver(host).messages == []


def test_mta_sts_testing_stripped_delivers_and_records_the_failure(lab: Lab, store: Path) -> None:
    host = "mx.sts-testing.test"
    lab.set_attack(host, AttackMode.STRIP)
    sent = send(lab, store, "sts-testing.test")
    assert (sent.code, sent.result["status"]) == (0, "delivered")
    assert sent.result_types() == ["starttls-not-supported"]
    assert received(lab, host, sent.secret) == [False]
    # The failure is kept for TLS-RPT.
    import asyncio
    import datetime as dt

    from mxguard.adapters.store import open_store

    async def results() -> list[Any]:
        s = await open_store(f"sqlite:///{store}")
        try:
            now = dt.datetime.now(dt.UTC)
            return await s.results_between(now - dt.timedelta(hours=1), now + dt.timedelta(1))
        finally:
            await s.close()

    (r,) = asyncio.run(results())
    assert (r.policy_domain, r.policy_type, r.result_type, r.receiving_mx) == (
        "sts-testing.test", "sts", "starttls-not-supported", host,
    )  # fmt: skip
    assert r.rua == ("mailto:tlsrpt@sts-testing.test",)


@pytest.mark.parametrize(
    ("domain", "host", "method"),
    [
        ("dane-ee.test", "mx.dane-ee.test", "dane-ee"),
        ("dane-ta.test", "mx.dane-ta.test", "dane-ta"),
    ],
)
def test_dane_honest_path_is_delivered_and_verified(
    lab: Lab, store: Path, domain: str, host: str, method: str
) -> None:
    sent = send(lab, store, domain)
    assert (sent.code, sent.result["status"]) == (0, "delivered")
    assert sent.result["policy"] == {"source": "dane", "mode": "enforce"}
    assert sent.attempts[0]["verified"] == method
    assert received(lab, host, sent.secret) == [True]


@pytest.mark.parametrize("mode", [AttackMode.STRIP, AttackMode.INTERCEPT_WRONG_NAME])
def test_dane_refuses_a_stripped_or_intercepted_session(
    lab: Lab, store: Path, mode: AttackMode
) -> None:
    host = "mx.dane-ee.test"
    lab.set_attack(host, mode)
    sent = send(lab, store, "dane-ee.test")
    assert (sent.code, sent.result["status"]) == (75, "deferred")
    expected = "starttls-not-supported" if mode is AttackMode.STRIP else "validation-failure"
    assert sent.result_types() == [expected]
    assert not envelope_leaked(lab, host)
    assert received(lab, host, sent.secret) == []


def test_dane_tlsa_mismatch_is_not_delivered(lab: Lab, store: Path) -> None:
    host = "mx.dane-mismatch.test"
    sent = send(lab, store, "dane-mismatch.test")
    assert (sent.code, sent.result_types()) == (75, ["validation-failure"])
    assert not envelope_leaked(lab, host)
    assert received(lab, host, sent.secret) == []


def test_dane_bogus_zone_defers_with_dnssec_invalid(lab: Lab, store: Path) -> None:
    sent = send(lab, store, "dane-bogus.test")
    assert (sent.code, sent.result["status"], sent.result["result_type"]) == (
        75, "deferred", "dnssec-invalid",
    )  # fmt: skip
    assert lab.attacker("mx.dane-bogus.test").sessions == []


def test_dane_wins_over_a_valid_mta_sts_policy_when_tlsa_mismatches(lab: Lab, store: Path) -> None:
    d = lab.scenario.domain("dane-sts.test")
    (host,) = d.hosts
    # The certificate stays WebPKI-valid for the name: MTA-STS alone would accept it.
    lab.apply(lab.scenario.with_domain(
        dataclasses.replace(d, hosts=(dataclasses.replace(host, tlsa=("wrong 3 1 1",)),))
    ))  # fmt: skip
    sent = send(lab, store, "dane-sts.test")
    assert sent.result["policy"]["source"] == "dane"
    assert (sent.code, sent.result_types()) == (75, ["validation-failure"])
    assert received(lab, host.name, sent.secret) == []


def test_only_unusable_tlsa_refuses_stripping(lab: Lab, store: Path) -> None:
    host = "mx.dane-unusable.test"
    lab.set_attack(host, AttackMode.STRIP)
    sent = send(lab, store, "dane-unusable.test")
    assert (sent.code, sent.result_types()) == (75, ["starttls-not-supported"])
    assert not envelope_leaked(lab, host)


def test_only_unusable_tlsa_accepts_a_self_signed_certificate(lab: Lab, store: Path) -> None:
    host = "mx.dane-unusable.test"
    sent = send(lab, store, "dane-unusable.test")
    assert (sent.code, sent.result["status"]) == (0, "delivered")
    assert sent.attempts[0]["verified"] is None  # encrypted, not authenticated
    assert received(lab, host, sent.secret) == [True]


def test_cached_policy_resists_txt_removal_broken_https_and_stripping(
    lab: Lab, store: Path
) -> None:
    domain, hosts = "sts-enforce.test", ["mx1.sts-enforce.test", "mx2.sts-enforce.test"]
    assert send(lab, store, domain).result["status"] == "delivered"  # policy now cached
    lab.set_dns_attack(domain, DnsAttack.DROP_STS_TXT)
    d = lab.scenario.domain(domain)
    assert d.mta_sts is not None
    broken = dataclasses.replace(d.mta_sts, behaviour=PolicyBehaviour.NOT_FOUND)
    lab.update_domain(dataclasses.replace(d, mta_sts=broken))
    for host in hosts:
        lab.set_attack(host, AttackMode.STRIP)
    lab.clear_records()
    sent = send(lab, store, domain)
    assert (sent.code, sent.result["policy"]) == (75, {"source": "mta-sts", "mode": "enforce"})
    assert sent.result_types() == ["starttls-not-supported"] * 2
    for host in hosts:
        assert not envelope_leaked(lab, host)
    # Without the cache the same attack succeeds: a fresh store knows no policy.
    leaked = send(lab, store.with_name("fresh.db"), domain)
    assert leaked.result["status"] == "delivered"
    assert attacker_read(lab, hosts[0], leaked.secret)


def test_local_require_verified_rule_refuses_stripping(lab: Lab, store: Path) -> None:
    host = "mx.local-rule.test"
    lab.set_attack(host, AttackMode.STRIP)
    sent = send(lab, store, "local-rule.test")
    assert sent.result["policy"] == {"source": "local", "mode": "enforce"}
    assert (sent.code, sent.result_types()) == (75, ["starttls-not-supported"])
    assert not envelope_leaked(lab, host)


def test_static_list_entry_refuses_stripping(lab: Lab, store: Path) -> None:
    host = "mx.list.test"
    lab.set_attack(host, AttackMode.STRIP)
    sent = send(lab, store, "list.test")
    assert sent.result["policy"] == {"source": "list", "mode": "enforce"}
    assert (sent.code, sent.result_types()) == (75, ["starttls-not-supported"])
    assert not envelope_leaked(lab, host)


def test_null_mx_fails_permanently_without_any_connection(lab: Lab, store: Path) -> None:
    sent = send(lab, store, "nullmx.test")
    assert (sent.code, sent.result["status"], sent.attempts) == (69, "failed", [])
    assert all(a.sessions == [] for a in lab.attackers.values())


@pytest.mark.parametrize(
    ("domain", "code", "status"), [("rejects.test", 69, "failed"), ("busy.test", 75, "deferred")]
)
def test_receiver_refusals_fail_for_good_or_defer(
    lab: Lab, store: Path, domain: str, code: int, status: str
) -> None:
    sent = send(lab, store, domain)
    assert (sent.code, sent.result["status"]) == (code, status)
    (attempt,) = sent.attempts
    assert attempt["smtp_reply"].startswith("550" if code == 69 else "451")
    assert attempt["tls_version"] is not None  # refused after TLS, not because of it
    assert lab.receiver(f"mx.{domain}").messages == []


@pytest.mark.parametrize(
    ("refused", "code", "status"),
    [("unknown-carol", 69, "failed"), ("busy-carol", 75, "deferred")],
)
def test_recipients_refused_beside_accepted_ones_are_not_reported_delivered(
    lab: Lab, store: Path, refused: str, code: int, status: str
) -> None:
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{store}", "send",
         "--from", "alice@client.test", "--to", "bob@dane-ee.test",
         "--to", f"{refused}@dane-ee.test", "--json"],
    )  # fmt: skip
    out = json.loads(result.stdout)
    assert (result.exit_code, out["status"]) == (code, status)
    assert [(r["address"], r["status"]) for r in out["recipients"]] == [
        ("bob@dane-ee.test", "delivered"),
        (f"{refused}@dane-ee.test", status),
    ]
    (message,) = lab.receiver("mx.dane-ee.test").messages
    assert message.rcpt_tos == ("bob@dane-ee.test",)


def test_a_domain_too_long_for_the_dns_is_an_answer_not_a_crash(lab: Lab, store: Path) -> None:
    # 248 octets: a valid domain, but "_mta-sts." in front of it exceeds 255.
    domain = ".".join(["a" * 60] * 4) + ".test"
    sent = send(lab, store, domain)
    assert (sent.code, sent.result["status"]) == (69, "failed")  # it does not exist
