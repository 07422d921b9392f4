"""A real Exim (Debian's exim4-daemon-light, 4.96) relays through `mxguard relay` (net 127.123).

Exim has no MTA-STS client. Here it sends through the relay as its smarthost (a
`manualroute` router, the configuration docs/relay.md gives): a message to an MTA-STS
`enforce` domain arrives at the lab MX over TLS; while the attacker strips STARTTLS there the
relay defers it and the MX host never sees it in plain text, which Exim on its own would have
sent in plain text.

Exim is not installed (that would remove Postfix, which other tests need): scripts/fetch-exim.sh
downloads and unpacks it, and nss_wrapper gives it the "Debian-exim" user it looks up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode
from relay_helpers import RelayProcess, relay_scenario, wait_for

pytestmark = pytest.mark.lab

NET = "127.123"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fetch-exim.sh"


@pytest.fixture(scope="module")
def exim_root() -> Path:
    if os.geteuid() != 0:
        pytest.skip("Exim runs with a configuration of its own only as root (-C)")
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(f"scripts/fetch-exim.sh failed: {done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("unbound") is None:
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(relay_scenario("relay-exim"), net=NET) as lab:
        yield lab


class Exim:
    """Exim with its own configuration, spool and logs in ``folder``."""

    def __init__(self, root: Path, folder: Path, relay_port: int, relay_address: str) -> None:
        self.root = root
        self.folder = folder
        self.binary = root / "usr" / "sbin" / "exim4"
        libs = root / "usr" / "lib" / "x86_64-linux-gnu"
        spool, logs = folder / "spool", folder / "log"
        for d in (spool, logs):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, 65534, 65534)
        # The user the Debian binary looks up by name, for nss_wrapper only.
        passwd, group = folder / "passwd", folder / "group"
        passwd.write_text(
            Path("/etc/passwd").read_text() + "Debian-exim:x:65534:65534::/nonexistent:/bin/false\n"
        )
        group.write_text(Path("/etc/group").read_text() + "Debian-exim:x:65534:\n")
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LD_LIBRARY_PATH": str(libs),
            "LD_PRELOAD": str(libs / "libnss_wrapper.so"),
            "NSS_WRAPPER_PASSWD": str(passwd),
            "NSS_WRAPPER_GROUP": str(group),
        }
        self.config = folder / "exim.conf"
        self.config.write_text(
            f"""
exim_path = {self.binary}
keep_environment = LD_LIBRARY_PATH : LD_PRELOAD : NSS_WRAPPER_PASSWD : NSS_WRAPPER_GROUP
spool_directory = {spool}
log_file_path = {logs}/%slog
primary_hostname = exim.client.test
domainlist local_domains = exim.client.test
# docs/relay.md, "Exim": everything that is not local goes to the relay.
begin routers
mxguard_relay:
  driver = manualroute
  domains = ! +local_domains
  transport = mxguard_smtp
  route_list = * {relay_address}::{relay_port}
  self = send
  no_more
begin transports
mxguard_smtp:
  driver = smtp
  port = {relay_port}
  allow_localhost
begin retry
*   *   F,1h,1m
""",
            encoding="utf-8",
        )

    def run(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(self.binary), "-C", str(self.config), *args],
            input=stdin, capture_output=True, env=self.env, timeout=120, check=False,
        )  # fmt: skip

    def send(self, sender: str, recipient: str, data: bytes) -> None:
        """Submit on the command line (-odq), then run the queue (-qff). Not -odf: Exim
        re-executes itself for an immediate delivery, with changed ids, and the dynamic loader
        then ignores LD_LIBRARY_PATH and LD_PRELOAD (secure mode), which this unpacked,
        uninstalled Exim needs; a queue run delivers in a forked process instead."""
        done = self.run("-odq", "-f", sender, recipient, stdin=data)
        assert done.returncode == 0, done.stderr.decode() + self.mainlog()
        done = self.run("-qff")
        assert done.returncode == 0, done.stderr.decode() + self.mainlog()

    def mainlog(self) -> str:
        log = self.folder / "log" / "mainlog"
        return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture
def exim_folder() -> Iterator[Path]:
    # Exim works as Debian-exim (uid 65534) in its spool: a folder that uid can reach, which
    # pytest's own (mode 0700) is not.
    folder = Path(tempfile.mkdtemp(prefix="mxguard-exim-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_exim_relays_through_mxguard_relay(
    exim_root: Path, exim_folder: Path, lab: Lab, tmp_path: Path
) -> None:
    args = ["--retry-first", "0.3s", "--retry-max", "0.5s", "--lifetime", "1h"]
    relay = RelayProcess(lab, f"sqlite:///{tmp_path / 'q.db'}", tmp_path, args=args,
                         address="127.124.0.108")  # fmt: skip
    with relay:
        exim = Exim(exim_root, exim_folder, relay.port, relay.address)
        assert b"Exim version 4" in exim.run("-bV").stdout
        data = b"Subject: via exim\r\nFrom: a@client.test\r\n\r\nhello from Exim\r\n"
        exim.send("a@client.test", "b@enforce.test", data)
        try:
            [got] = wait_for(
                "delivery",
                lambda: [m for m in lab.receiver("mx.enforce.test").messages
                         if b"via exim" in m.data],
            )  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}; Exim's log:\n{exim.mainlog()}\nrelay's log:\n"
                                 f"{relay.log.read_text()[-3000:]}") from None  # fmt: skip
        assert got.tls and got.mail_from == "a@client.test"
        assert b"hello from Exim" in got.data
        assert b"(mxguard relay)" in got.data and b"exim.client.test" in got.data
        assert "=> b@enforce.test" in exim.mainlog() and "R=mxguard_relay" in exim.mainlog()

        # Under attack: Exim hands the message over (the relay took it), and the relay keeps it
        # instead of sending it in plain text.
        lab.set_attack("mx.enforce.test", AttackMode.STRIP)
        try:
            exim.send("a@client.test", "c@enforce.test",
                      b"Subject: exim stripped\r\n\r\nsecret\r\n")  # fmt: skip

            def retried() -> bool:
                q = relay.queue()["messages"]
                return bool(q) and q[0]["recipients"][0]["attempts"] >= 2

            wait_for("two refused attempts", retried)
            assert not [m for m in lab.receiver("mx.enforce.test").messages
                        if b"exim stripped" in m.data]  # fmt: skip
            assert b"secret" not in lab.attacker("mx.enforce.test").client_bytes()
        finally:
            lab.set_attack("mx.enforce.test", AttackMode.PASS)
        wait_for(
            "delivery once the attacker left",
            lambda: [m for m in lab.receiver("mx.enforce.test").messages
                     if b"exim stripped" in m.data and m.tls],
        )  # fmt: skip
