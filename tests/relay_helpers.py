"""A real `mxguard relay serve` process for tests, its lab, and an SMTP client to submit to it.

The relay labs live in 127.120.0.0/16 to 127.123.0.0/16 (other test files use other ranges),
one /16 per test file; relays listen on 127.124.0.101-199 (bench/relay.py's lab is 127.124,
whose peers use 127.124.0.1, .0.53 and 127.124.1.0 onwards).
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Dnssec, Domain, Host, MtaSts, Scenario

RELAY_ADDRESS = "127.124.0.101"


def relay_scenario(name: str = "relay") -> Scenario:
    """Domains a relay test sends to, and the sender's own domain (where bounces go)."""
    return Scenario(
        name=name,
        description="Recipient domains of relay tests.",
        domains=(
            Domain(
                "enforce.test", dnssec=Dnssec.UNSIGNED, mx=("10 mx.enforce.test",),
                hosts=(Host("mx.enforce.test", requiretls=True),), mta_sts=MtaSts(mode="enforce"),
            ),
            Domain(
                "norequiretls.test", dnssec=Dnssec.UNSIGNED, mx=("10 mx.norequiretls.test",),
                hosts=(Host("mx.norequiretls.test"),), mta_sts=MtaSts(mode="enforce"),
            ),
            Domain("dane.test", dnssec=Dnssec.SIGNED, mx=("10 mx.dane.test",),
                   hosts=(Host("mx.dane.test", tlsa=("3 1 1",), requiretls=True),)),
            Domain("plain.test", dnssec=Dnssec.UNSIGNED, mx=("10 mx.plain.test",),
                   hosts=(Host("mx.plain.test"),)),
            # No published policy, but a local rule of the relay's operator: TLS required.
            Domain("ruled.test", dnssec=Dnssec.UNSIGNED, mx=("10 mx.ruled.test",),
                   hosts=(Host("mx.ruled.test"),), local_rule="tls"),
            Domain("client.test", dnssec=Dnssec.UNSIGNED, mx=("10 mx.client.test",),
                   hosts=(Host("mx.client.test"),)),
        ),
    )  # fmt: skip


class RelayProcess:
    """`python -m mxguard ... relay serve` on ``address`` (a free port), as a subprocess."""

    def __init__(
        self,
        lab: Lab,
        store: str,
        workdir: Path,
        *,
        args: Sequence[str] = (),
        address: str = RELAY_ADDRESS,
        node_id: str = "node-a",
    ) -> None:
        self.lab = lab
        self.store = store
        self.workdir = workdir
        self.args = list(args)
        self.address = address
        self.node_id = node_id
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"relay-{node_id}.log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mxguard", "--config", str(self.lab.config_file),
            "--store", self.store, "relay", "serve", "--json",
            "--listen", f"{self.address}:{self.port}", "--node-id", self.node_id, *self.args,
        ]  # fmt: skip

    def start(self) -> RelayProcess:
        assert self.proc is None
        env = dict(os.environ)
        env.pop("MXGUARD_JSON", None)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=log, env=env, cwd=self.workdir
            )
        assert self.proc.stdout is not None
        text = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the relay exited: {self.log.read_text()[-3000:]}")
            text += line
            try:
                ready = json.loads(text)
            except ValueError:
                continue
            self.port = int(ready["listening"].rpartition(":")[2])
            return self
        raise AssertionError("the relay did not say it was listening")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.proc = None
        return code

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        options: Sequence[str] = (),
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        """One message over SMTP; the reply to the end of DATA (or the refusal)."""
        with smtplib.SMTP(self.address, self.port, timeout=timeout) as client:
            client.ehlo("submitter.test")
            code, reply = client.mail(mail_from, list(options))
            if code != 250:
                return code, reply
            for r in recipients:
                code, reply = client.rcpt(r)
                if code != 250:
                    return code, reply
            return client.data(data)

    def queue(self) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "mxguard", "--config", str(self.lab.config_file),
             "--store", self.store, "relay", "queue", "--json"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        result: dict[str, Any] = json.loads(done.stdout)
        return result


def wait_for(what: str, check: Callable[[], Any], *, within: float = 60.0) -> Any:
    """Poll ``check`` until it returns something true; a generous bound, not a timing test."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def message(subject: str, *, extra: str = "") -> bytes:
    return (
        f"From: <a@client.test>\r\nTo: <b@enforce.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@client.test>\r\n{extra}\r\n"
        f"body of {subject}\r\n"
    ).encode()
