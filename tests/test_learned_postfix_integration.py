"""Learned levels through a real Postfix 3.7 driven by `mxguard serve postfix` (docs/learned.md).

A lab of its own (net 127.131; Postfix on 127.132.0.1, the policy server on 127.132.0.2) with
five domains that publish no policy. Postfix first delivers to each over TLS (the policy server
has nothing learned: NOTFOUND, Postfix's own opportunistic TLS); `mxguard tlsrpt
collect-postfix` reads Postfix's log and learns `tls` for each MX host. With `[learned] mode =
"enforce"` the policy server then answers `encrypt` for them. The STRIPTLS attacker strips
STARTTLS in front of all five: Postfix defers every message ("TLS is required, but was not
offered"), the attacker sees no envelope; the collector records the drops and raises one
alarm naming the five, which `/metrics` shows. When the attacker leaves, Postfix's own retry
delivers every deferred message over TLS.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.config import load
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode
from mxguard.postfix.server import PolicyServer

pytest.register_assert_rewrite("postfix_harness")
from postfix_harness import PostfixInstance, skip_reason  # noqa: E402
from test_learned_lab import STRIPPED, alarm_of, config, scenario  # noqa: E402

pytestmark = pytest.mark.lab

NET = "127.131"
POSTFIX_ADDRESS = "127.132.0.1"
POLICY_LISTEN = "inet:127.132.0.2:8461"
DEADLINE = 60.0  # seconds to wait for Postfix to log something (a bound, not a measurement)


@pytest.fixture(scope="module")
def pf_lab() -> Iterator[Lab]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(scenario(), net=NET) as lab:
        if lab.ports.smtp != 25:
            pytest.skip("Postfix delivers to port 25: the lab must run as root")
        yield lab


def serving(cfg: Path, store: Path) -> PolicyServer:
    settings = load(cfg).with_overrides(store=f"sqlite://{store}")
    return PolicyServer(settings, listen=POLICY_LISTEN, refresh_interval=0.2)


def collect(cfg: Path, store: Path, pf: PostfixInstance, state: Path) -> dict[str, object]:
    result = CliRunner().invoke(
        main,
        ["--config", str(cfg), "--store", f"sqlite://{store}", "tlsrpt", "collect-postfix",
         "--log", str(pf.log_file), "--state", str(state), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    return dict(json.loads(result.stdout))


def wait_for(pf: PostfixInstance, pattern: str) -> str:
    """The first log line matching `pattern`, polling Postfix's log until DEADLINE."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + DEADLINE
    while True:
        found = [line for line in pf.log_lines() if regex.search(line)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r}; log:\n{pf.log_tail(40)}")
        time.sleep(0.1)


def test_postfix_learns_tls_then_defers_stripped_mail_raises_the_alarm_and_retries_over_tls(
    pf_lab: Lab, tmp_path: Path
) -> None:
    lab = pf_lab
    cfg, store, state = config(lab, tmp_path, mode="enforce"), tmp_path / "s.db", tmp_path / "st"
    instance = PostfixInstance(
        address=POSTFIX_ADDRESS,
        resolver=lab.resolver_address,
        ca_file=lab.ca_file,
        tls_policy_maps=f"socketmap:{POLICY_LISTEN}:postfix",
    )
    with instance as pf:
        with serving(cfg, store) as server:
            for d in STRIPPED:
                assert server.call(server.lookup(d)).kind.value == "NOTFOUND"  # nothing learned
            for d in STRIPPED:
                _, outcome = pf.deliver(f"postmaster@{d}")
                assert outcome.status == "sent" and outcome.tls, outcome.text
        collect(cfg, store, pf, state)

        lab.clear_records()
        for d in STRIPPED:
            lab.set_attack(f"mx.{d}", AttackMode.STRIP)
        with serving(cfg, store) as server:
            for d in STRIPPED:
                assert server.call(server.lookup(d)).text == "encrypt", d
            deferred = []
            for d in STRIPPED:
                submission, outcome = pf.deliver(f"postmaster@{d}", keep_deferred=True)
                assert outcome.status == "deferred", outcome.text
                assert "TLS is required, but was not offered" in outcome.reason, outcome.text
                deferred.append(submission)
            for d in STRIPPED:
                host = f"mx.{d}"
                sessions = [s for s in lab.attacker(host).sessions if s.peer.startswith(
                    POSTFIX_ADDRESS + ":")]  # fmt: skip
                assert sessions and all(s.stripped for s in sessions)
                seen = b"".join(s.client_bytes for s in sessions).upper()
                assert not any(c in seen for c in (b"MAIL FROM", b"RCPT TO", b"DATA")), d
                assert lab.receiver(host).messages == []
            collect(cfg, store, pf, state)
            alarm = alarm_of(store)
            assert alarm is not None and alarm.domains == tuple(sorted(STRIPPED))
            metrics = server.render_metrics()
            assert 'mxguard_learned_floors_total{state="enforce"}' in metrics

            for d in STRIPPED:  # the attacker leaves; Postfix retries on its own
                lab.set_attack(f"mx.{d}", AttackMode.PASS)
            for submission in deferred:
                line = wait_for(
                    pf, rf"{submission.queue_id}: to=<{re.escape(submission.recipient)}>.*"
                    r"status=sent"
                )  # fmt: skip
                assert "status=sent" in line
            for d in STRIPPED:
                got = [m for m in lab.receiver(f"mx.{d}").messages]
                assert got and all(m.tls for m in got), d
