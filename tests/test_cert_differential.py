"""Differential test: mxguard's WebPKI verdict against OpenSSL's own tools, chain by chain.

Every variant of ``mxguard.lab.certprofiles.VARIANTS`` is judged three ways on the same chain:
by ``verify_pkix``; by ``openssl verify`` (purpose sslserver, the system's security level as
authentication level, the host name, the same time); and by ``openssl s_client`` in a TLS
handshake with ``openssl s_server`` serving the chain on 127.0.0.1. mxguard accepts a chain
exactly when both OpenSSL tools do, except for the rows of ``RFC_RULES``: there RFC 8461 §4.2
makes mxguard stricter than OpenSSL's default host check, mxguard must refuse with
certificate-host-mismatch, and OpenSSL must still accept (else the row no longer belongs there).

Where OpenSSL refuses, mxguard's RFC 8460 result type follows OpenSSL's errors: for a single
fault, the type of OpenSSL's first error; for several, the first of them in ``pkix``'s order of
precedence. The errors ``openssl verify`` reports are the first ones mxguard records.

``s_server`` will not load some chains at the default security level (weak keys, SHA-1
signatures). That is recorded, the chain is then served at ``@SECLEVEL=0`` so that the client's
verdict is still tested, and mxguard must refuse every such chain as well.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mxguard.lab.certprofiles import VARIANTS, Built, CertAuthority, Variant, build
from mxguard.protocol.pkix import PkixVerdict, default_auth_level, verify_pkix
from mxguard.protocol.results import ResultType

OPENSSL = shutil.which("openssl")
if OPENSSL is None:
    pytest.skip(
        "the differential test needs the openssl command line tool (apt-get install openssl)",
        allow_module_level=True,
    )

NOT_TRUSTED = ResultType.CERTIFICATE_NOT_TRUSTED
EXPIRED = ResultType.CERTIFICATE_EXPIRED
MISMATCH = ResultType.CERTIFICATE_HOST_MISMATCH
FAILURE = ResultType.VALIDATION_FAILURE
PRECEDENCE = (NOT_TRUSTED, EXPIRED, MISMATCH, FAILURE)  # pkix: which type a chain gets

# The chains are built relative to the real clock, so that s_server and s_client see them as
# meant; all three verifiers are told this same time.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
AT = str(int(NOW.timestamp()))
AUTH_LEVEL = default_auth_level()
WEAK_SERVER = ("-cipher", "DEFAULT:@SECLEVEL=0")  # lets s_server serve what level 2 forbids

_NO_CN = "RFC 8461 §4.2: the MX host name must be a subjectAltName dNSName; no CN fallback"
RFC_RULES: dict[str, str] = {
    # variant -> the rule by which mxguard refuses what OpenSSL's default host check accepts
    "cn-only-no-san": _NO_CN,
    "ip-san-cn-host": _NO_CN + " (an IP address SAN alone leaves OpenSSL checking the CN)",
    "partial-wildcard": (
        "RFC 8461 §4.2 (RFC 6125 §6.4.3): a wildcard is the whole left-most label; "
        "'m*.example.test' matches no name"
    ),
}

_VERIFY_ERROR = re.compile(r"^(?:\[CRL path\] )?error (\d+) at (\d+) depth lookup", re.MULTILINE)
_CLIENT_ERROR = re.compile(r"verify error:num=(\d+)")


def rfc8460_type(code: int) -> ResultType:
    """The RFC 8460 §4.3.1 result type of an OpenSSL X509_V_ERR code."""
    if code in (9, 10):  # not yet valid, expired
        return EXPIRED
    if code in (2, 18, 19, 20, 21, 27, 28):  # no issuer, self-signed, untrusted, rejected
        return NOT_TRUSTED
    if code == 62:  # hostname mismatch
        return MISMATCH
    return FAILURE


@dataclass(frozen=True)
class Tool:
    """What one OpenSSL command said: accepted or not, its verify error codes, its output."""

    accepted: bool
    codes: tuple[int, ...]
    output: str

    def describe(self) -> str:
        said = "accepted" if self.accepted else f"refused (errors {list(self.codes)})"
        return f"{said}\n--- output ---\n{self.output.strip()}"


@dataclass(frozen=True)
class Row:
    variant: Variant
    built: Built
    verdict: PkixVerdict
    verify: Tool  # openssl verify
    handshake: Tool  # openssl s_client against openssl s_server
    server_refusal: str  # why s_server would not serve the chain at its default level, or ""

    def mxguard(self) -> str:
        if self.verdict.ok:
            return "mxguard accepted"
        return (
            f"mxguard refused: {self.verdict.result_type} {list(self.verdict.codes)}: "
            f"{self.verdict.detail}"
        )


# --- running OpenSSL -----------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    leaf: Path
    rest: Path | None  # what the server sends after the leaf; None when only the leaf
    key: Path
    roots: Path


def write_files(directory: Path, built: Built) -> Files:
    directory.mkdir()
    (directory / "leaf.pem").write_bytes(built.leaf_pem)
    (directory / "key.pem").write_bytes(built.key_pem)
    (directory / "roots.pem").write_bytes(built.roots_pem)
    rest = None
    if len(built.chain) > 1:
        rest = directory / "rest.pem"
        rest.write_bytes(built.rest_pem)
    return Files(directory / "leaf.pem", rest, directory / "key.pem", directory / "roots.pem")


def openssl_verify(files: Files, host: str) -> Tool:
    assert OPENSSL is not None
    untrusted = ["-untrusted", str(files.rest)] if files.rest else []
    command = [
        OPENSSL, "verify", "-CAfile", str(files.roots), "-no-CApath", "-no-CAstore", *untrusted,
        "-purpose", "sslserver", "-auth_level", str(AUTH_LEVEL), "-verify_hostname", host,
        "-attime", AT, str(files.leaf),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    codes = tuple(int(code) for code, _depth in _VERIFY_ERROR.findall(done.stderr))
    accepted = done.returncode == 0 and not codes and f"{files.leaf}: OK" in done.stdout
    return Tool(accepted, codes, done.stdout + done.stderr)


class ServerRefused(Exception):
    """s_server exited instead of listening; the message is what it said."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(files: Files, *, weak: bool) -> tuple[subprocess.Popen[bytes], int]:
    """An s_server for one connection on 127.0.0.1, serving the chain; ready when returned."""
    assert OPENSSL is not None
    chain = ["-cert_chain", str(files.rest)] if files.rest else []
    for _attempt in range(5):
        port = free_port()
        command = [
            OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
            "-cert", str(files.leaf), "-key", str(files.key), *chain,
            "-no-CAfile", "-no-CApath", "-no-CAstore", *(WEAK_SERVER if weak else ()),
        ]  # fmt: skip
        # stdin stays open: at end of input s_server would shut down.
        server = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert server.stdout is not None
        seen = b""
        deadline = time.monotonic() + 15
        try:
            while b"ACCEPT" not in seen:
                ready, _, _ = select.select([server.stdout], [], [], 0.5)
                if ready:
                    data = os.read(server.stdout.fileno(), 4096)
                    if not data:
                        break  # exited before listening
                    seen += data
                if time.monotonic() > deadline:
                    raise TimeoutError(f"s_server did not start listening: {seen!r}")
        except BaseException:
            stop(server)
            raise
        if b"ACCEPT" in seen:
            return server, port
        _, err = server.communicate(timeout=10)
        if b"in use" in err:  # another process took the port in between
            continue
        raise ServerRefused(err.decode(errors="replace").strip())
    raise RuntimeError("no free port for s_server on 127.0.0.1")


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.kill()
    server.communicate(timeout=10)


def openssl_handshake(files: Files, host: str) -> tuple[Tool, str]:
    """s_client's verdict on the chain s_server serves, and s_server's refusal at its default
    security level (then the chain is served at @SECLEVEL=0), or ""."""
    assert OPENSSL is not None
    refusal = ""
    try:
        server, port = start_server(files, weak=False)
    except ServerRefused as exc:
        refusal = str(exc)
        server, port = start_server(files, weak=True)
    try:
        command = [
            OPENSSL, "s_client", "-brief", "-connect", f"127.0.0.1:{port}", "-servername", host,
            "-verify_return_error", "-verify_hostname", host, "-CAfile", str(files.roots),
            "-no-CApath", "-no-CAstore", "-auth_level", str(AUTH_LEVEL), "-attime", AT,
        ]  # fmt: skip
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        stop(server)
    output = done.stdout + done.stderr
    codes = tuple(int(code) for code in _CLIENT_ERROR.findall(output))
    accepted = (
        done.returncode == 0
        and not codes
        and "CONNECTION ESTABLISHED" in output
        and "Verification: OK" in output
    )
    return Tool(accepted, codes, output), refusal


def judge(variant: Variant, ca: CertAuthority, directory: Path) -> Row:
    built = build(variant.profile, variant.host, NOW, ca)
    files = write_files(directory / variant.name, built)
    verdict = verify_pkix(built.chain, name=variant.host, roots=built.roots, now=NOW)
    handshake, refusal = openssl_handshake(files, variant.host)
    return Row(variant, built, verdict, openssl_verify(files, variant.host), handshake, refusal)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Row]]:
    directory = tmp_path_factory.mktemp("differential")
    ca = CertAuthority(NOW)
    with ThreadPoolExecutor(max_workers=4) as pool:
        judged = list(pool.map(lambda v: judge(v, ca, directory), VARIANTS))
    yield {row.variant.name: row for row in judged}


# --- the comparisons -----------------------------------------------------------------------


def _rfc_rule_problem(row: Row, tool: Tool, tool_name: str) -> str | None:
    rule = RFC_RULES[row.variant.name]
    if row.verdict.ok or row.verdict.result_type is not MISMATCH:
        return f"{rule}: mxguard must refuse with {MISMATCH}; {row.mxguard()}"
    if not tool.accepted:
        return (
            f"{tool_name} refuses too, so '{row.variant.name}' no longer belongs in RFC_RULES: "
            f"{tool.describe()}"
        )
    return None


def _verdict_problem(row: Row, tool: Tool, tool_name: str) -> str | None:
    if row.variant.name in RFC_RULES:
        return _rfc_rule_problem(row, tool, tool_name)
    if row.verdict.ok == tool.accepted:
        return None
    variant = f"{row.variant.name} ({row.variant.note})"
    return f"{variant}: {row.mxguard()}; {tool_name} {tool.describe()}"


def verify_problem(row: Row) -> str | None:
    """mxguard accepts the chain exactly when ``openssl verify`` does (outside RFC_RULES)."""
    return _verdict_problem(row, row.verify, "openssl verify")


def handshake_problem(row: Row) -> str | None:
    """mxguard accepts the chain exactly when s_client completes a verified handshake; when
    both refuse, the error that stopped s_client is one that mxguard found too."""
    problem = _verdict_problem(row, row.handshake, "openssl s_client")
    if problem or row.variant.name in RFC_RULES or row.verdict.ok:
        return problem
    if not row.handshake.codes:
        return f"s_client refused without a verify error: {row.handshake.describe()}"
    if row.handshake.codes[0] not in row.verdict.codes:
        return (
            f"s_client stopped at error {row.handshake.codes[0]}, which mxguard did not find "
            f"({row.mxguard()})"
        )
    return None


def type_problem(row: Row) -> str | None:
    """The RFC 8460 result type follows OpenSSL's errors, and OpenSSL's errors are the first
    ones mxguard records (error 21, "unable to verify the first certificate", aside: pkix drops
    it when it only repeats that the issuer is missing)."""
    if row.variant.name in RFC_RULES:
        return _rfc_rule_problem(row, row.verify, "openssl verify")
    if row.verify.accepted:
        return None if row.verdict.result_type is None else f"{row.mxguard()} but no type expected"
    codes = [c for c in row.verify.codes if c != 21] or list(row.verify.codes)
    types = {rfc8460_type(c) for c in codes}
    if len(types) == 1:  # a single fault: the type of OpenSSL's first error
        expected = rfc8460_type(row.verify.codes[0])
    else:
        expected = min(types, key=PRECEDENCE.index)
    if row.verdict.result_type is not expected:
        return (
            f"expected {expected} from OpenSSL's errors {list(row.verify.codes)}, {row.mxguard()}"
        )
    ours = [c for c in row.verdict.codes if c != 21]
    if ours[: len(codes)] != [c for c in codes if c != 21]:
        return (
            f"openssl verify reported errors {list(row.verify.codes)}, mxguard recorded "
            f"{list(row.verdict.codes)} first"
        )
    return None


def _ids(variants: tuple[Variant, ...]) -> list[str]:
    return [v.name for v in variants]


def test_the_variants_are_many_named_once_and_cover_the_rfc_rules() -> None:
    names = _ids(VARIANTS)
    assert len(names) >= 50
    assert len(set(names)) == len(names)
    assert set(RFC_RULES) <= set(names)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids(VARIANTS))
def test_verify_pkix_accepts_what_openssl_verify_accepts(
    rows: dict[str, Row], variant: Variant
) -> None:
    problem = verify_problem(rows[variant.name])
    assert problem is None, problem


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids(VARIANTS))
def test_verify_pkix_accepts_what_an_openssl_tls_client_accepts(
    rows: dict[str, Row], variant: Variant
) -> None:
    problem = handshake_problem(rows[variant.name])
    assert problem is None, problem


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids(VARIANTS))
def test_result_type_is_the_one_of_openssls_errors(rows: dict[str, Row], variant: Variant) -> None:
    problem = type_problem(rows[variant.name])
    assert problem is None, problem


def test_a_chain_openssl_will_not_serve_at_level_2_is_one_mxguard_refuses(
    rows: dict[str, Row],
) -> None:
    refused = {name: row for name, row in rows.items() if row.server_refusal}
    if AUTH_LEVEL >= 2:  # s_server's openssl.cnf level too, on Debian: the fallback is used
        assert {"leaf-rsa1024", "leaf-sha1", "intermediate-rsa1024"} <= set(refused)
    for name, row in refused.items():
        assert not row.verdict.ok, f"{name}: s_server said {row.server_refusal!r}, mxguard accepts"


def test_summary(rows: dict[str, Row], capsys: pytest.CaptureFixture[str]) -> None:
    outside = [row for name, row in rows.items() if name not in RFC_RULES]
    held = [row for name, row in rows.items() if name in RFC_RULES]
    checks = (verify_problem, handshake_problem, type_problem)
    agree = [row for row in outside if not any(check(row) for check in checks)]
    kept = [row for row in held if not any(check(row) for check in checks)]
    line = (
        f"differential: {len(agree)}/{len(outside)} agree outside the RFC 8461 rules "
        f"({len(kept)} rows held to RFC rules)"
    )
    unserved = sorted(name for name, row in rows.items() if row.server_refusal)
    with capsys.disabled():
        print(f"\n{line}")
        print(
            f"differential: s_server refused {len(unserved)} chains at its default security "
            f"level, served at @SECLEVEL=0 for the client's verdict: {', '.join(unserved)}"
        )
    assert len(rows) >= 50
    assert len(agree) == len(outside), [r.variant.name for r in outside if r not in agree]
    assert len(kept) == len(RFC_RULES) == len(held)
