"""Unbound as the lab's validating resolver (DNSSEC, RFC 4033-4035; EDE, RFC 8914).

mxguard trusts DNSSEC only through the AD bit of a validating resolver on loopback
(RFC 7672 §2.1, RFC 6840 §5.8). In the lab that resolver is a real Unbound, started as a child
process with a generated configuration: the lab TLD is a stub zone pointing at the lab's
authoritative server (``mxguard.lab.dns_server``), and the lab root key is its only trust
anchor. Bogus answers come back as SERVFAIL with an Extended DNS Error saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import time
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rdatatype

_START_TIMEOUT = 5.0  # seconds Unbound gets to answer its first query
_STOP_TIMEOUT = 5.0
_CONTROL_TIMEOUT = 5.0
_LOG_TAIL_LINES = 20
_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL


# The lab resolver's TTL caps: seconds, so that a scenario switch reaches clients at once.
MAX_TTL = 5
MAX_NEGATIVE_TTL = 1


class UnboundError(RuntimeError):
    """Unbound is missing, would not start, or refused a control command."""


def unbound_path() -> Path:
    """The ``unbound`` binary; raises ``UnboundError`` with the install hint if it is missing."""
    for candidate in (shutil.which("unbound"), "/usr/sbin/unbound", "/usr/local/sbin/unbound"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise UnboundError(
        "Unbound is not installed (no 'unbound' on PATH or in /usr/sbin); the lab needs it as "
        "its validating resolver: apt-get install unbound"
    )


def _control_path(server: Path) -> Path:
    for candidate in (
        shutil.which("unbound-control"),
        server.with_name("unbound-control"),
        "/usr/sbin/unbound-control",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise UnboundError("unbound-control is not installed next to unbound: apt-get install unbound")


class Unbound:
    """One Unbound process serving ``address``:``port``, validating the lab TLD ``tld``.

    ``trust_anchor`` is zone-file text (a DNSKEY or DS line for ``<tld>.``), e.g.
    ``LabKeys.trust_anchor(tld)``. Files (config, log, control socket) live in ``workdir``.
    """

    def __init__(
        self,
        workdir: Path,
        address: str,
        port: int,
        tld: str,
        stub_address: str,
        stub_port: int,
        trust_anchor: str,
        *,
        cache_max_ttl: int = MAX_TTL,
        cache_max_negative_ttl: int = MAX_NEGATIVE_TTL,
    ) -> None:
        self.workdir = workdir
        self.address = address
        self.port = port
        self.tld = tld.strip(".").lower()
        self.stub_address = stub_address
        self.stub_port = stub_port
        self.trust_anchor = trust_anchor
        self.cache_max_ttl = cache_max_ttl
        self.cache_max_negative_ttl = cache_max_negative_ttl
        self.config_file = workdir / "unbound.conf"
        self.log_file = workdir / "unbound.log"
        self.stderr_file = workdir / "unbound.stderr"
        self.anchor_file = workdir / "trust-anchor.txt"
        self.control_socket = workdir / "control.sock"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def config(self) -> str:
        """The configuration file text (unbound.conf(5))."""
        w = self.workdir
        tld = self.tld
        return f"""\
server:
    interface: {self.address}
    port: {self.port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{w}"
    pidfile: "{w / "unbound.pid"}"
    logfile: "{self.log_file}"
    use-syslog: no
    log-time-ascii: yes
    verbosity: 1
    # Every validation failure explains itself in the log.
    val-log-level: 2
    num-threads: 1
    so-reuseport: no
    # Loopback only: the lab never talks to or answers the outside world.
    access-control: 0.0.0.0/0 refuse
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    # RFC 6761 names such as test. are answered locally unless told otherwise.
    local-zone: "{tld}." nodefault
    trust-anchor-file: "{self.anchor_file}"
    # RFC 8145 key-tag signalling only adds _ta-XXXX queries to the lab's logs.
    trust-anchor-signaling: no
    module-config: "validator iterator"
    # What real resolvers do; it is why empty non-terminals must be served right.
    qname-minimisation: yes
    # RFC 8914: SERVFAIL for a bogus answer carries "DNSSEC Bogus" and friends.
    ede: yes
    # Scenarios change records mid-run; stale cache entries must not outlive them.
    cache-min-ttl: 0
    cache-max-ttl: {self.cache_max_ttl}
    cache-max-negative-ttl: {self.cache_max_negative_ttl}
    infra-host-ttl: 5

stub-zone:
    name: "{tld}."
    stub-addr: {self.stub_address}@{self.stub_port}

remote-control:
    control-enable: yes
    control-interface: "{self.control_socket}"
    control-use-cert: no
"""

    async def start(self) -> None:
        """Write the files, start ``unbound -d -c FILE`` and wait until it answers."""
        if self._process is not None:
            raise UnboundError(f"Unbound at {self.address}:{self.port} is already running")
        binary = unbound_path()
        if len(str(self.control_socket)) > _UNIX_SOCKET_PATH_MAX:
            raise UnboundError(
                f"workdir {self.workdir} is too long for Unbound's control socket "
                f"({len(str(self.control_socket))} > {_UNIX_SOCKET_PATH_MAX} bytes); "
                "use a shorter directory"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.control_socket.unlink(missing_ok=True)
        self.anchor_file.write_text(self.trust_anchor, encoding="utf-8")
        self.config_file.write_text(self.config(), encoding="utf-8")
        self.log_file.write_text("", encoding="utf-8")
        with self.stderr_file.open("wb") as stderr:
            self._process = await asyncio.create_subprocess_exec(
                str(binary),
                "-d",
                "-c",
                str(self.config_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        assert self._process is not None
        # Any reply, even SERVFAIL, shows the listener is up; the SOA query also primes the
        # lab's trust anchor.
        probe = dns.message.make_query(f"{self.tld}.", dns.rdatatype.SOA, want_dnssec=True)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise UnboundError(
                    f"Unbound exited with status {self._process.returncode} while starting "
                    f"(config {self.config_file}):\n{self.log_tail()}"
                )
            try:
                await dns.asyncquery.udp(probe, self.address, port=self.port, timeout=0.25)
                return
            except (dns.exception.Timeout, OSError):
                await asyncio.sleep(0.05)
        raise UnboundError(
            f"Unbound did not answer on {self.address}:{self.port} within {_START_TIMEOUT:.0f} s "
            f"(config {self.config_file}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of Unbound's log and stderr, for error messages."""
        out: list[str] = []
        for f in (self.stderr_file, self.log_file):
            with contextlib.suppress(OSError):
                out += f.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return "\n".join(out) or "(Unbound wrote nothing)"

    async def stop(self) -> None:
        """Terminate the process (by its pid) and wait for it; kill it if it lingers."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def control(self, *command: str) -> str:
        """Run one ``unbound-control`` command against this instance; return its output."""
        if self._process is None:
            raise UnboundError("Unbound is not running; start() it first")
        binary = _control_path(unbound_path())
        process = await asyncio.create_subprocess_exec(
            str(binary),
            "-c",
            str(self.config_file),
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(_CONTROL_TIMEOUT):
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise UnboundError(f"unbound-control {' '.join(command)} did not finish") from None
        text = output.decode("utf-8", errors="replace")
        if process.returncode != 0:
            raise UnboundError(
                f"unbound-control {' '.join(command)} failed ({process.returncode}): {text}"
            )
        return text

    async def flush(self) -> None:
        """Forget everything cached about the lab TLD, so a scenario switch shows at once."""
        # flush_zone drops RRsets, messages and validator keys at or below the name;
        # flush_bogus and flush_negative catch entries kept apart from those; flush_infra
        # forgets server timeouts seen while the authoritative server was switching.
        await self.control("flush_zone", f"{self.tld}.")
        await self.control("flush_bogus")
        await self.control("flush_negative")
        await self.control("flush_infra", "all")


__all__ = ["Unbound", "UnboundError", "unbound_path"]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child, before exec: be sent SIGTERM when the lab's thread goes away (Linux).

    A lab killed without the chance to stop (SIGKILL, an unhandled SIGTERM) would otherwise
    leave Unbound running on its address, answering the next lab on that network from a cache
    signed by keys that no longer exist: every answer bogus."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the lab still stops Unbound itself on a normal stop
