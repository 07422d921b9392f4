"""`mxguard serve mta-sts` as a real process, for the tests of publishing and serving policies.

`ServeProcess.start(...)` runs the command (with `-v`, so that every request and reload is
logged) on a 127.82.x.y address of this suite's own, waits for its start line and is stopped
with SIGTERM by its own process id. `served_certificate` is the certificate a TLS client is
given for a server name, and `http_request` one raw HTTPS request (what a test needs to see
status lines and headers exactly as sent).
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

START_TIMEOUT = 20.0


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, *, after: int = 0, timeout: float = 10.0) -> str:
        """The log from offset ``after`` once ``text`` appears in it (fails after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            tail = self.log_text()[after:]
            if text in tail:
                return tail
            assert self.proc.poll() is None, f"the server exited: {self.log_text()}"
            assert time.monotonic() < deadline, f"no {text!r} in the log: {self.log_text()}"
            time.sleep(0.05)

    def hup(self) -> int:
        """Send SIGHUP; the log offset before it (for ``wait_for_log(after=...)``)."""
        offset = len(self.log_text())
        self.proc.send_signal(signal.SIGHUP)
        return offset

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def serving(
    root: Path,
    pairs: Sequence[tuple[Path, Path]],
    listen: str,
    log: Path,
    *,
    global_args: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> Iterator[ServeProcess]:
    """`mxguard serve mta-sts --root ROOT --cert C --key K ... --listen LISTEN` while inside."""
    command = [sys.executable, "-m", "mxguard", "-v", *global_args, "serve", "mta-sts",
               "--root", str(root), "--listen", listen, *extra_args]  # fmt: skip
    for cert, key in pairs:
        command += ["--cert", str(cert), "--key", str(key)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)
    server = ServeProcess(proc, log)
    try:
        server.wait_for_log("mxguard: serving MTA-STS policies", timeout=START_TIMEOUT)
        yield server
    finally:
        if proc.poll() is None:
            server.stop()


def client_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def served_certificate(
    address: str, port: int, server_name: str, ca_file: Path
) -> x509.Certificate:
    """The leaf certificate the server presents for ``server_name`` (verified)."""
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        client_context(ca_file).wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def http_request(
    address: str,
    port: int,
    *,
    method: str = "GET",
    host: str,
    path: str = "/.well-known/mta-sts.txt",
    server_name: str | None = None,
    ca_file: Path | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over TLS: (status, headers with lower-case names, body)."""
    ctx = client_context(ca_file) if ca_file else ssl.create_default_context()
    if ca_file is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    request = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name or host.split(":")[0]) as tls,
    ):
        tls.sendall(request.encode("latin-1"))
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
