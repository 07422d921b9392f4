"""A throw-away Postfix instance for integration tests: a real MTA sending into the lab.

mxguard's Postfix front end (`mxguard serve postfix`, a socketmap for `smtp_tls_policy_maps`)
only proves itself when the real Postfix obeys its answers. This module runs one Postfix
instance that shares nothing with the machine's own (which may not even be configured):

- its own `config_directory`, `queue_directory` and `data_directory` in a temporary folder,
  started and stopped with `postfix -c DIR start|stop`, no chroot anywhere in its master.cf;
- its log in a file (`maillog_file`, written by a `postlog` service in its own master.cf), so
  a test can read exactly what Postfix decided and why;
- a submission port: plain SMTP to `address:25` (an address of this suite's own 127.208/16
  range), where every loopback client may relay;
- DNS through the lab's validating resolver with the AD bit: the Postfix processes run in a
  private mount namespace whose /etc/resolv.conf is a bind-mounted file naming the lab's
  Unbound with `options trust-ad` (glibc hides the AD bit without it, and Postfix then sees
  no DNSSEC, hence no DANE: RFC 7672 §2.1). The machine's own /etc/resolv.conf is untouched;
- `smtp_dns_support_level = dnssec`, `smtp_tls_CAfile` = the lab CA, `smtp_tls_loglevel = 1`
  (one "Verified/Trusted/Untrusted TLS connection established" line per session) and short
  queue timers, so a deferral shows up in the log at once.

`inet_interfaces` stays `all` and the submission service binds its address in master.cf:
Postfix refuses an `inet_interfaces` address that is not configured on an interface, and
loopback addresses other than 127.0.0.1 are routable without being configured. Outbound
sessions leave from the same address (`smtp_bind_address`), so the lab's peers can tell
Postfix's connections from everyone else's.

Use:

    with PostfixInstance(workdir, address="127.208.0.1", resolver="127.218.0.53",
                         ca_file=lab.ca_file, tls_policy_maps="socketmap:inet:…:postfix") as pf:
        outcome = pf.deliver("someone@sts-enforce.test")
        assert outcome.status == "sent" and outcome.verified

As a pytest plugin (`pytest_plugins = ["postfix_harness"]`) it also provides session fixtures:
`postfix_mta` (the instance, wired to `mxguard serve postfix` for the lab), `postfix_run` (the
acceptance deliveries in `CASES`, each with what Postfix logged, what the receiver got and
what the attacker saw) and `postfix_log` (Postfix's log file after those deliveries, for
tests of log collectors).

Installs nothing: `skip_reason()` says why the tests cannot run (no /usr/sbin/postfix, not root,
no `unshare`). The test script installs Debian's `postfix` package.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from mxguard.config import load
from mxguard.lab.attacker import AttackSession
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Scenario
from mxguard.lab.smtp_receiver import ReceivedMessage
from mxguard.postfix.server import PolicyServer

POSTFIX = "/usr/sbin/postfix"
POSTSUPER = "/usr/sbin/postsuper"
POSTQUEUE = "/usr/sbin/postqueue"
INSTALL_HINT = (
    'echo "postfix postfix/main_mailer_type select No configuration" | '
    "debconf-set-selections && apt-get install -y postfix"
)
SUBMIT_PORT = 25
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
OUTCOME_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0

# "Nov 29 11:10:06 client postfix/smtp[21570]: message" (maillog_file format, RFC 3164 style).
_LOG_LINE = re.compile(
    r"^(?P<time>\w{3} [ \d]\d [\d:]{8}) (?P<host>\S+) (?P<program>[\w/.-]+)\[(?P<pid>\d+)\]: "
    r"(?P<message>.*)$"
)
# "QID: to=<rcpt>, [orig_to=<…>, ]relay=…, …, dsn=4.7.4, status=deferred (reason)"
_STATUS = re.compile(
    r"^(?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>[^,]+), "
    r".*\bdsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>\w+) \((?P<reason>.*)\)$"
)
_QUEUED_AS = re.compile(rb"queued as ([0-9A-Za-z]+)")
_TLS_ESTABLISHED = re.compile(r"^(?P<trust>\w+) TLS connection established to (?P<peer>\S+?):? ")

# Every service this instance needs, none chrooted (column 5 = "n"): the daemons read the
# lab CA, the socketmap and the bind-mounted resolv.conf from the real file system.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{address}:{port} inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """The Postfix instance could not do what was asked; the message says why, with its log."""


def skip_reason() -> str | None:
    """Why a real Postfix cannot run here, or None when it can."""
    if not Path(POSTFIX).exists():
        return f"needs Debian's postfix ({POSTFIX} is missing): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "needs root: Postfix's master starts as root and the mount namespace needs it"
    if shutil.which("unshare") is None:
        return "needs unshare(1) from util-linux for the private /etc/resolv.conf"
    return None


@dataclass(frozen=True)
class LogLine:
    """One line of Postfix's maillog_file."""

    program: str  # "postfix/smtp"
    pid: int
    message: str
    text: str  # the whole line as written

    @classmethod
    def parse(cls, text: str) -> LogLine | None:
        m = _LOG_LINE.match(text)
        if m is None:
            return None
        return cls(m["program"], int(m["pid"]), m["message"], text)


@dataclass(frozen=True)
class Submission:
    """A message Postfix accepted for delivery."""

    queue_id: str
    recipient: str
    marker: str  # unique text in its Subject and body: find it at the receiver or attacker


@dataclass(frozen=True)
class Outcome:
    """What Postfix logged about one delivery attempt of one recipient."""

    queue_id: str
    recipient: str
    status: str  # "sent" | "deferred" | "bounced" | "expired"
    relay: str  # "mx.example.test[127.0.0.1]:25" or "none"
    dsn: str  # "2.0.0", "4.7.4", …
    reason: str  # the text in parentheses after status=
    lines: tuple[str, ...]  # this attempt's log lines: the smtp session's, then the status line

    @property
    def tls(self) -> tuple[str, ...]:
        """Trust levels of the TLS sessions of this attempt: "Verified", "Trusted", …"""
        return tuple(
            m["trust"]
            for line in self.lines
            if (parsed := LogLine.parse(line)) is not None
            and (m := _TLS_ESTABLISHED.match(parsed.message)) is not None
        )

    @property
    def verified(self) -> bool:
        """Postfix authenticated the server that took the message (DANE or `secure` match)."""
        return self.status == "sent" and self.tls[-1:] == ("Verified",)

    def text(self) -> str:
        return "\n".join(self.lines)


class PostfixInstance:
    """One Postfix instance in `workdir`; a context manager that starts and stops it."""

    # Who owns data_directory: Postfix's mail_owner, by name or (another root's) user id.
    mail_owner: str | int = "postfix"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        address: str,
        resolver: str,
        ca_file: Path,
        tls_policy_maps: str | None = None,
        security_level: str = "dane",
        hostname: str = "client.mxguard.test",
        extra_main_cf: Mapping[str, str] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mxguard-postfix-"))
        self.address = address
        self.resolver = resolver
        self.ca_file = ca_file
        self.tls_policy_maps = tls_policy_maps
        self.security_level = security_level
        self.hostname = hostname
        self.extra_main_cf = dict(extra_main_cf or {})
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.log_file = self.workdir / "maillog"
        self.resolv_conf = self.config_dir / "resolv.conf"
        self._master_pid: int | None = None

    # --- configuration -------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings, in the order written."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": "all",
            "inet_protocols": "ipv4",
            "smtp_bind_address": self.address,
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            # DNS through the lab resolver; MX hosts only from DNS (no /etc/hosts).
            "smtp_host_lookup": "dns",
            "smtp_dns_support_level": "dnssec",
            "dnssec_probe": "",  # the lab has no real root zone to probe
            "smtp_tls_security_level": self.security_level,
            "smtp_tls_CAfile": str(self.config_dir / "lab-ca.pem"),
            "smtp_tls_loglevel": "1",
            # Each delivery gets its own session: a cached plain-text connection from one test
            # must not carry the next test's message.
            "smtp_connection_cache_on_demand": "no",
            # Deferrals are logged at once and retried soon (tests delete what they defer).
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
        }
        if self.tls_policy_maps is not None:
            settings["smtp_tls_policy_maps"] = self.tls_policy_maps
        settings.update(self.extra_main_cf)
        return settings

    def write_config(self) -> None:
        # Postfix's unprivileged daemons must traverse the tree to reach the queue.
        self.workdir.chmod(0o755)
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(self.data_dir, user=self.mail_owner)
        shutil.copyfile(self.ca_file, self.config_dir / "lab-ca.pem")
        (self.config_dir / "lab-ca.pem").chmod(0o644)
        self.resolv_conf.write_text(
            f"nameserver {self.resolver}\noptions trust-ad\n", encoding="ascii"
        )
        self.resolv_conf.chmod(0o644)
        lines = [f"{k} = {v}".rstrip() for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n", encoding="ascii")
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(address=self.address, port=SUBMIT_PORT), encoding="ascii"
        )
        self.log_file.touch(mode=0o644)

    # --- life cycle ----------------------------------------------------------------------

    def check(self) -> None:
        """`postfix -c DIR check`: the configuration is sound and the queue exists."""
        self._postfix("check")

    def start(self) -> PostfixInstance:
        self.write_config()
        self.check()
        # Postfix's own daemons are started from inside a private mount namespace, where
        # /etc/resolv.conf names the lab resolver; master daemonizes, its children stay there.
        script = (
            f"mount --bind {shlex.quote(str(self.resolv_conf))} /etc/resolv.conf "
            f"&& exec {POSTFIX} -c {shlex.quote(str(self.config_dir))} start"
        )
        self._run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], "start")
        self._master_pid = self._read_master_pid()
        self._wait_listening()
        return self

    def stop(self) -> None:
        """`postfix stop`, wait for the master, then kill whatever of this instance is left."""
        try:
            if self._master_pid is not None and _alive(self._master_pid):
                with contextlib.suppress(PostfixError):
                    self._postfix("stop")
                deadline = time.monotonic() + STOP_TIMEOUT
                while _alive(self._master_pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._master_pid = None
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def master_pid(self) -> int | None:
        """The running master's process id (None when stopped)."""
        return self._master_pid

    def pids(self) -> list[int]:
        """Processes of this instance: the master, and every daemon run with its config."""
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ or int(entry.name) == self._master_pid:
                pids.append(int(entry.name))
        return [p for p in pids if _alive(p)]

    def _read_master_pid(self) -> int:
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            return int(pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError) as e:
            raise PostfixError(f"Postfix started but left no master pid in {pid_file}: {e}") from e

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection((self.address, SUBMIT_PORT), timeout=1):
                    return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise PostfixError(
                        f"Postfix does not accept connections on {self.address}:{SUBMIT_PORT} "
                        f"after {START_TIMEOUT} s ({e}); its log:\n{self.log_tail()}"
                    ) from e
                time.sleep(0.05)

    def _postfix(self, *args: str) -> None:
        self._run([POSTFIX, "-c", str(self.config_dir), *args], " ".join(args))

    def _run(self, argv: Sequence[str], what: str) -> str:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise PostfixError(f"`{what}` did not finish within {COMMAND_TIMEOUT} s") from e
        if done.returncode != 0:
            raise PostfixError(
                f"`{' '.join(argv)}` failed with exit status {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}\nPostfix log:\n{self.log_tail()}"
            )
        return done.stdout

    # --- mail ----------------------------------------------------------------------------

    def send(self, recipient: str, *, sender: str = "sender@client.mxguard.test") -> Submission:
        """Submit one message for `recipient` over SMTP; returns its queue id and marker."""
        marker = f"mxguard-postfix-test-{uuid.uuid4().hex}"
        message = (
            f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@{self.hostname}>\r\n\r\n"
            f"Test message {marker}: its text must never cross the wire in plain text.\r\n"
        )
        with smtplib.SMTP(self.address, SUBMIT_PORT, timeout=10) as smtp:
            smtp.ehlo("submit.mxguard.test")
            smtp.mail(sender)
            code, reply = smtp.rcpt(recipient)
            if code != 250:
                raise PostfixError(f"Postfix refused recipient {recipient}: {code} {reply!r}")
            code, reply = smtp.data(message.encode("ascii"))
        queued = _QUEUED_AS.search(reply)
        if code != 250 or queued is None:
            raise PostfixError(f"Postfix did not queue the message: {code} {reply!r}")
        return Submission(queued.group(1).decode("ascii"), recipient, marker)

    def wait_outcome(self, submission: Submission, timeout: float = OUTCOME_TIMEOUT) -> Outcome:
        """The first delivery status Postfix logs for the submission (polls the log)."""
        deadline = time.monotonic() + timeout
        while True:
            outcome = find_outcome(self.log_lines(), submission.queue_id, submission.recipient)
            if outcome is not None:
                return outcome
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"no delivery status for {submission.recipient} (queue id "
                    f"{submission.queue_id}) within {timeout} s; queue:\n{self.queue()}\n"
                    f"log:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def deliver(self, recipient: str, *, keep_deferred: bool = False) -> tuple[Submission, Outcome]:
        """Send, wait for the first outcome; a deferred message is deleted from the queue
        unless `keep_deferred`, so its retries cannot reach the next test's receivers."""
        submission = self.send(recipient)
        outcome = self.wait_outcome(submission)
        if outcome.status == "deferred" and not keep_deferred:
            self.delete(submission.queue_id)
        return submission, outcome

    def delete(self, queue_id: str) -> None:
        """Remove a message from the queue (`postsuper -d`)."""
        self._run([POSTSUPER, "-c", str(self.config_dir), "-d", queue_id], "postsuper -d")

    def queue(self) -> str:
        """`postqueue -p`: what is still queued."""
        return self._run([POSTQUEUE, "-c", str(self.config_dir), "-p"], "postqueue -p")

    # --- the log -------------------------------------------------------------------------

    def log_lines(self) -> list[str]:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_lines()[-n:])


def find_outcome(lines: Sequence[str], queue_id: str, recipient: str) -> Outcome | None:
    """The first status line for (queue id, recipient), with the lines of the session before it.

    Postfix logs TLS results without a queue id, from the smtp process that then logs the
    status; the lines of that process since its previous status line belong to this attempt.
    """
    parsed = [LogLine.parse(line) for line in lines]
    for i, line in enumerate(parsed):
        if line is None:
            continue
        m = _STATUS.match(line.message)
        if m is None or m["qid"] != queue_id or m["rcpt"] != recipient:
            continue
        session: list[str] = []
        for earlier in reversed(parsed[:i]):
            if earlier is None or (earlier.program, earlier.pid) != (line.program, line.pid):
                continue
            if _STATUS.match(earlier.message):
                break
            session.append(earlier.text)
        return Outcome(
            queue_id=queue_id,
            recipient=recipient,
            status=m["status"],
            relay=m["relay"],
            dsn=m["dsn"],
            reason=m["reason"],
            lines=(*reversed(session), line.text),
        )
    return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


# --- pytest fixtures: one Postfix for the session, driven by mxguard's policy server -------
#
# Test modules that want them declare `pytest_plugins = ["postfix_harness"]`. The lab
# fixtures (`session_lab`, `standard_scenario`) come from conftest.py.

# This suite's addresses: 127.208.N.x, where N is the lab's own /16 (127.N), so that test runs
# with different MXGUARD_TEST_LAB_NET values (developers working in parallel) never collide.
POSTFIX_HOST = 1  # Postfix's submission service and outbound source address
POLICY_HOST = 2  # mxguard serve postfix
SPARE_HOST = 3  # for tests that start an instance of their own


def suite_address(lab: Lab, host: int) -> str:
    """127.208.<the lab's second octet>.<host>."""
    return f"127.208.{lab.resolver_address.split('.')[1]}.{host}"


@dataclass(frozen=True)
class Case:
    """One acceptance delivery: a recipient domain and what the attacker does to its MX hosts."""

    name: str
    domain: str
    attack: str  # AttackMode of every MX host of the domain during the delivery


# The acceptance cases of the Postfix integration, plus the control case that shows what the
# attacker does to a Postfix that has no policy for a domain.
CASES = (
    Case("sts-enforce-honest", "sts-enforce.test", "pass"),
    Case("sts-enforce-stripped", "sts-enforce.test", "strip"),
    # A lab-CA certificate for another name under the domain (not-mx1.sts-enforce.test):
    # RFC 8461 §4.2 wants a certificate valid for the MX host itself.
    Case("sts-enforce-intercepted", "sts-enforce.test", "intercept-wrong-name"),
    Case("sts-testing-stripped", "sts-testing.test", "strip"),
    Case("dane-honest", "dane-ee.test", "pass"),
    Case("dane-mismatch", "dane-mismatch.test", "pass"),
    Case("no-policy-stripped", "nopolicy.test", "strip"),
)


@dataclass(frozen=True)
class Delivery:
    """What happened to one case's message: Postfix's log, the receivers, the attackers."""

    case: Case
    submission: Submission
    outcome: Outcome
    received: tuple[ReceivedMessage, ...]  # messages with the marker, at any of the domain's MX
    attacked: tuple[AttackSession, ...]  # the attackers' records of Postfix's connections

    def attacker_saw(self, data: bytes) -> bool:
        """`data` crossed an attacker in plain text (in either direction)."""
        return any(data in s.client_bytes or data in s.server_bytes for s in self.attacked)


@dataclass(frozen=True)
class PostfixRun:
    """The session's acceptance deliveries, and Postfix's log file after them.

    Other test files deliver through the same session Postfix, before or after these
    deliveries: ``log_range`` is the byte range of the log that these deliveries wrote.
    """

    log_file: Path
    deliveries: Mapping[str, Delivery]
    log_range: tuple[int, int] = (0, 0)

    def own_log(self) -> bytes:
        """The part of the log these deliveries wrote (whole lines)."""
        start, end = self.log_range
        with self.log_file.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


@pytest.fixture(scope="session")
def policy_server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session policy server's folder; its store is `state.db` in it."""
    return tmp_path_factory.mktemp("policy-server")


@pytest.fixture(scope="session")
def postfix_policy_map(session_lab: Lab, policy_server_dir: Path) -> Iterator[str]:
    """mxguard's policy server for the lab, as an `smtp_tls_policy_maps` value."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with policy_server(session_lab, policy_server_dir) as address:
        yield f"socketmap:inet:{address}:postfix"


@pytest.fixture(scope="session")
def postfix_mta(session_lab: Lab, postfix_policy_map: str) -> Iterator[PostfixInstance]:
    """One Postfix for the session: lab DNS, lab CA, policies from mxguard."""
    # Its own folder under /tmp: Postfix's unprivileged daemons cannot enter pytest's
    # (mode 0700) temporary folders. Removed when the instance stops.
    instance = PostfixInstance(
        address=suite_address(session_lab, POSTFIX_HOST),
        resolver=session_lab.resolver_address,
        ca_file=session_lab.ca_file,
        tls_policy_maps=postfix_policy_map,
    )
    with instance:
        yield instance


@pytest.fixture(scope="session")
def postfix_run(
    session_lab: Lab, standard_scenario: Scenario, postfix_mta: PostfixInstance
) -> PostfixRun:
    """Every case of CASES delivered once through the session's Postfix; the lab is put back
    the way it was after each one. `.log_file` is Postfix's log of all of them."""
    if session_lab.ports.smtp != 25:
        pytest.skip("Postfix delivers to port 25: the lab must run as root")
    deliveries = {}
    start = postfix_mta.log_file.stat().st_size if postfix_mta.log_file.exists() else 0
    for case in CASES:
        hosts = [h.name for h in session_lab.scenario.domain(case.domain).hosts]
        session_lab.clear_records()
        for host in hosts:
            session_lab.set_attack(host, case.attack)
        try:
            submission, outcome = postfix_mta.deliver(f"postmaster@{case.domain}")
            marker = submission.marker.encode()
            deliveries[case.name] = Delivery(
                case=case,
                submission=submission,
                outcome=outcome,
                received=tuple(
                    m
                    for host in hosts
                    for m in session_lab.receiver(host).messages
                    if marker in m.data
                ),
                attacked=tuple(
                    s
                    for host in hosts
                    for s in session_lab.attacker(host).sessions
                    if s.peer.startswith(postfix_mta.address + ":")
                ),
            )
        finally:
            for host in hosts:
                session_lab.set_attack(host, standard_scenario.host(host).attack)
            session_lab.clear_records()
    return PostfixRun(
        postfix_mta.log_file, deliveries, (start, postfix_mta.log_file.stat().st_size)
    )


@pytest.fixture(scope="session")
def postfix_log(postfix_run: PostfixRun) -> Path:
    """Postfix's log file after the acceptance deliveries (input for log collectors)."""
    return postfix_run.log_file


@contextlib.contextmanager
def policy_server(lab: Lab, workdir: Path) -> Iterator[str]:
    """`mxguard serve postfix` for the lab on a background thread; yields "HOST:PORT".

    Configured as a user would configure it: from the client config file the lab writes
    (resolver, CA file, ports, policy list, local rules), with its own store.
    """
    settings = load(lab.config_file).with_overrides(store=f"sqlite:///{workdir / 'state.db'}")
    listen = f"inet:{suite_address(lab, POLICY_HOST)}:0"
    with PolicyServer(settings, listen=listen) as server:
        host, port = server.socketmap_address
        yield f"{host}:{port}"
