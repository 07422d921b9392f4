"""`mxguard send` with recipients whose outcomes differ: which exit status wins, and what the
text output says per recipient.

The rule (docs/design.md, "Commands"; sendmail's sysexits.h convention): 75 (EX_TEMPFAIL)
as soon as any recipient is still deferred, since the caller must try those again; 69
(EX_UNAVAILABLE) only when nothing is left to retry and some recipient failed for good; 0
when every recipient got the message. Which recipient had which outcome is in `--json`
``recipients`` and in one text line per recipient.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.adapters.dns import DnsResolver
from mxguard.cli import main
from mxguard.engine.deliver import Attempt, DeliveryResult, DeliveryStatus, DomainResult
from mxguard.lab.lab import Lab

D, F, X = DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED, DeliveryStatus.FAILED


def domain(name: str, status: DeliveryStatus, *rcpts: str, refused: tuple[tuple[str, str], ...] = ()
           ) -> DomainResult:  # fmt: skip
    attempts = (Attempt(f"mx.{name}", "192.0.2.1", delivered=True, refused=refused),) if (
        refused
    ) else ()  # fmt: skip
    return DomainResult(name, status, rcpts or (f"u@{name}",), None, attempts)


# (rule, domain results, exit status)
EXIT_ROWS = [
    ("everything_delivered_is_0", [domain("a.test", D), domain("b.test", D)], 0),
    ("deferred_alone_is_75", [domain("a.test", F)], 75),
    ("failed_alone_is_69", [domain("a.test", X)], 69),
    ("delivered_and_failed_is_69", [domain("a.test", D), domain("b.test", X)], 69),
    ("delivered_and_deferred_is_75", [domain("a.test", D), domain("b.test", F)], 75),
    # The defect: a deferred recipient was counted lost because another failed for good.
    (
        "failed_and_deferred_is_75_the_deferred_must_be_retried",
        [domain("a.test", X), domain("b.test", F)],
        75,
    ),
    ("deferred_and_failed_in_any_order_is_75", [domain("b.test", F), domain("a.test", X)], 75),
    # One domain, one session: one recipient refused with 5xx, another with 4xx.
    (
        "one_domain_5xx_and_4xx_refusals_is_75",
        [
            domain(
                "a.test",
                X,
                "x@a.test",
                "y@a.test",
                "z@a.test",
                refused=(("x@a.test", "550 no such user"), ("y@a.test", "451 try later")),
            )
        ],
        75,
    ),
    (
        "one_domain_5xx_refusal_beside_delivered_is_69",
        [domain("a.test", X, "x@a.test", "z@a.test", refused=(("x@a.test", "550 no such user"),))],
        69,
    ),
]


@pytest.mark.parametrize(("rule", "domains", "code"), EXIT_ROWS, ids=[r[0] for r in EXIT_ROWS])
def test_exit_status_when_recipients_differ(
    rule: str, domains: list[DomainResult], code: int
) -> None:
    assert DeliveryResult(tuple(domains)).exit_code == code


@pytest.mark.lab
def test_one_session_refusing_one_recipient_for_good_and_one_for_now_defers(
    lab: Lab, tmp_path: Path
) -> None:
    """RFC 5321 §4.2.1: the 4xx recipient must be tried again, so the domain is deferred."""
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{tmp_path / 's.db'}", "send",
         "--from", "alice@client.test", "--to", "bob@dane-ee.test",
         "--to", "unknown-carol@dane-ee.test", "--to", "busy-carol@dane-ee.test", "--json"],
    )  # fmt: skip
    out = json.loads(result.stdout)
    assert (result.exit_code, out["status"]) == (75, "deferred"), result.output
    assert [(r["address"], r["status"]) for r in out["recipients"]] == [
        ("bob@dane-ee.test", "delivered"),
        ("unknown-carol@dane-ee.test", "failed"),
        ("busy-carol@dane-ee.test", "deferred"),
    ]


# --- the command line, against a resolver that never answers ------------------------------


@pytest.fixture
def silent_resolver() -> Iterator[str]:
    """A UDP socket on loopback that receives DNS queries and never answers them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def quick_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS lookups give up after 0.3 s instead of 5 s."""
    monkeypatch.setattr("mxguard.engine.context.DnsResolver", partial(DnsResolver, timeout=0.3))


def send(resolver: str, *recipients: str, as_json: bool = False) -> tuple[int, str]:
    args = ["--resolver", resolver, "--store", "sqlite:///:memory:", *(["--json"] * as_json),
            "send", "--from", "me@sender.test"]  # fmt: skip
    for r in recipients:
        args += ["--to", r]
    result = CliRunner().invoke(main, args, env={"MXGUARD_CONFIG": "/dev/null"})
    return result.exit_code, result.output


@pytest.mark.usefixtures("quick_dns")
def test_send_a_failed_and_a_deferred_recipient_exits_75(silent_resolver: str) -> None:
    code, out = send(silent_resolver, "not-an-address", "bob@slow.test", as_json=True)
    assert code == 75, out
    results = json.loads(out)
    assert [(r["address"], r["status"]) for d in results for r in d["recipients"]] == [
        ("not-an-address", "failed"), ("bob@slow.test", "deferred"),
    ]  # fmt: skip


@pytest.mark.usefixtures("quick_dns")
def test_send_text_output_says_per_recipient_what_happened(silent_resolver: str) -> None:
    code, out = send(silent_resolver, "not-an-address", "bob@slow.test")
    assert code == 75, out
    lines = out.splitlines()
    assert any(line.startswith("  not-an-address: FAILED (for good, not retried)")
               for line in lines), out  # fmt: skip
    assert any(line.startswith("  bob@slow.test: DEFERRED (try again later)")
               for line in lines), out  # fmt: skip
    assert lines[-1] == (
        "2 recipients: 0 delivered, 1 deferred, 1 failed for good; exit status 75 "
        "(EX_TEMPFAIL: try the deferred recipients again later)"
    ), out
