"""Commands import what they need, when they need it (`mxguard send` runs once per message for
scripts and MTAs, and every module costs its start-up; a long-running `serve postfix` keeps
every module in its memory). Each row imports a command's module in a fresh interpreter and
names modules that must not come with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Reading received reports (and verifying their DKIM signatures) is the receiving side's
# work: no sender needs it.
RECEIVING = ["mxguard.protocol.tlsrpt_ingest", "mxguard.adapters.dkim", "dkim"]
# Whole DNS messages: only TCP, SERVFAIL and odd answers need dnspython to build or read one.
WHOLE_DNS = ["dns.message", "dns.edns"]


def loaded_after(module: str, candidates: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([m for m in {candidates!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


@pytest.mark.parametrize("command", ["mxguard.cli.send", "mxguard.cli.serve", "mxguard.cli.policy"])
def test_senders_do_not_import_the_report_reader(command: str) -> None:
    assert loaded_after(command, RECEIVING) == []


@pytest.mark.parametrize("command", ["mxguard.cli.send", "mxguard.cli.serve", "mxguard.cli.policy"])
def test_senders_do_not_import_whole_dns_messages_at_start(command: str) -> None:
    assert loaded_after(command, WHOLE_DNS) == []


@pytest.mark.parametrize("command", ["mxguard.cli.send", "mxguard.cli.serve", "mxguard.cli.policy"])
def test_senders_import_cryptography_only_for_a_certificate_check(command: str) -> None:
    # A certificate is parsed when DANE or MTA-STS checks a chain (deliver, pkix, dane's
    # chain checks), not at start-up.
    assert loaded_after(command, ["cryptography", "mxguard.protocol.pkix"]) == []
