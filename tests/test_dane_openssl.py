"""mxguard's DANE verdicts agree with OpenSSL's own DANE verification (RFC 7672 §3, RFC 7671 §5).

For each certificate setup a real TLS server listens on 127.203.1.x (a Python ``ssl`` server,
one per setup, reused by all rows). For every row of the matrix, ``openssl s_client`` connects
with ``-dane_tlsa_domain``/``-dane_tlsa_rrdata`` and ``mxguard dane match`` checks the chain
that the same server presents (read once with ``s_client -showcerts``); the two verdicts, and
on success the record and the method (DANE-EE or DANE-TA) that authenticated, must agree.

OpenSSL semantics to know: it checks names against ``-dane_tlsa_domain`` and dates for
DANE-TA; for DANE-EE it ignores dates, and ignores names only with ``-dane_ee_no_namechecks``
(RFC 7672 §3.1.1 requires that, so it is always passed). OpenSSL also accepts PKIX-TA/EE
(usages 0/1), which SMTP must not use (RFC 7672 §3.1.3), so the matrix has usages 2 and 3
only; ``tests/test_dane.py`` covers the rest.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from mxguard.cli import main
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import CertKind
from mxguard.protocol.dane import association_data

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

HOST = "mx.example.test"
WRONG = "wrong.example.test"
ADDRESS_PREFIX = "127.203.1."  # this file's part of the 127.203.0.0/16 test range
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


def _make(
    cn: str,
    key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    *,
    san: Sequence[str] | None = None,
    ca: bool = False,
) -> x509.Certificate:
    """A certificate the lab CA does not issue (other key types, a non-CA issuer, wildcards)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca, None), True)
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), False
        )
    signer = issuer[1] if issuer else key
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm)


@dataclass(frozen=True)
class Setup:
    """One server: the chain it sends (leaf first) and the key of its leaf."""

    chain: tuple[x509.Certificate, ...]
    key: Any


def _setups(pki: LabPKI) -> dict[str, Setup]:
    valid = pki.issue(HOST)
    inter = pki.issue(HOST, CertKind.INTERMEDIATE)
    expired = pki.issue(HOST, CertKind.EXPIRED)
    self_signed = pki.issue(HOST, CertKind.SELF_SIGNED)
    root = pki.root_cert
    root_ca = (pki.root.cert, pki.root.key)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_root = _make("rsa root", rsa_key, None, ca=True)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_int = _make("ed25519 intermediate", ed_key, (rsa_root, rsa_key), ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    not_ca_key = ec.generate_private_key(ec.SECP256R1())
    not_ca = _make("not a ca", not_ca_key, root_ca, ca=False)
    rsa_ed_leaf = _make(HOST, leaf_key, (ed_int, ed_key), san=[HOST])
    not_ca_leaf = _make(HOST, leaf_key, (not_ca, not_ca_key), san=[HOST])
    wildcard_leaf = _make("wild", leaf_key, root_ca, san=["*.example.test"])
    return {
        "valid": Setup((valid.leaf, root), valid.key),
        "leaf_only": Setup((valid.leaf,), valid.key),
        "inter": Setup((*inter.chain, root), inter.key),
        "inter_only": Setup(inter.chain, inter.key),
        "expired": Setup((expired.leaf, root), expired.key),
        "self_signed": Setup(self_signed.chain, self_signed.key),
        "broken": Setup((valid.leaf, pki.intermediate.cert), valid.key),
        "rsa_ed": Setup((rsa_ed_leaf, ed_int, rsa_root), leaf_key),
        "not_ca": Setup((not_ca_leaf, not_ca, root), leaf_key),
        "wildcard": Setup((wildcard_leaf, root), leaf_key),
    }


class TlsServer:
    """A TLS server on loopback that completes handshakes with one certificate setup."""

    def __init__(self, address: str, setup: Setup, directory: Path) -> None:
        cert_file, key_file = directory / "chain.pem", directory / "key.pem"
        cert_file.write_bytes(_pem(setup.chain))
        key_file.write_bytes(
            setup.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.sock = socket.create_server((address, 0))  # ephemeral port: no collisions
        self.sock.settimeout(0.2)
        self.address = f"{address}:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass  # the handshake is all that is needed
            except (OSError, ssl.SSLError):
                conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


def _pem(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


@dataclass(frozen=True)
class Lab:
    pki: LabPKI
    servers: dict[str, TlsServer]
    presented: dict[str, Path]  # the chain each server presented, as a PEM file
    other: x509.Certificate  # an unrelated certificate, for data that must not match


def _s_client(
    address: str, name: str, tlsa: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    args = ["openssl", "s_client", "-connect", address, "-servername", name, "-showcerts"]
    if tlsa:
        args += ["-dane_tlsa_domain", name, "-dane_ee_no_namechecks"]
        for record in tlsa:
            args += ["-dane_tlsa_rrdata", record]
    return subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False
    )


_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", re.S)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("dane-openssl")
    pki = LabPKI(base / "pki", now=NOW)
    servers: dict[str, TlsServer] = {}
    presented: dict[str, Path] = {}
    try:
        for n, (label, setup) in enumerate(_setups(pki).items(), start=1):
            directory = base / label
            directory.mkdir()
            servers[label] = TlsServer(f"{ADDRESS_PREFIX}{n}", setup, directory)
            # What the server actually sends, as a client sees it.
            shown = _s_client(servers[label].address, HOST).stdout
            pem = "".join(_PEM_BLOCK.findall(shown))
            assert x509.load_pem_x509_certificates(pem.encode()) == list(setup.chain), label
            presented[label] = directory / "presented.pem"
            presented[label].write_text(pem)
        yield Lab(pki, servers, presented, pki.issue("unrelated.example.test").leaf)
    finally:
        for server in servers.values():
            server.stop()


def _records(lab: Lab, server: str, spec: str) -> list[str]:
    """``"U S M @ref; U S M HEX"``: ``@0``/``@1``/``@2`` is that certificate of the presented
    chain, ``@root``/``@inter`` the lab CAs, ``@other`` an unrelated certificate."""
    chain = x509.load_pem_x509_certificates(lab.presented[server].read_bytes())
    named = {"root": lab.pki.root_cert, "inter": lab.pki.intermediate.cert, "other": lab.other}
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        u, s, m, target = part.split()
        if target.startswith("@"):
            ref = target[1:]
            cert = chain[int(ref)] if ref.isdigit() else named[ref]
            target = association_data(cert, int(s), int(m)).hex()
        out.append(f"{u} {s} {m} {target}")
    return out


# "matched EE/TA certificate at depth N", or for a bare key in DNS (2 1 0) "signed the
# certificate at depth N".
_MATCHED = re.compile(
    r"DANE TLSA (\d) (\d) (\d) (?:\.\.\.)?([0-9a-f]+) (?:matched (EE|TA)|signed the certificate)"
)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    method: str | None  # "dane-ee" | "dane-ta" on success
    record: str | None  # on success: "U S M" and enough hex to identify the record


def _openssl_verdict(lab: Lab, server: str, name: str, tlsa: Sequence[str]) -> Verdict:
    done = _s_client(lab.servers[server].address, name, tlsa)
    output = done.stdout + done.stderr
    if "Failed to import any TLSA records" in output:
        return Verdict(False, None, None)  # no usable record: OpenSSL does not even connect
    assert "CONNECTED" in output, output
    if "Verify return code: 0 (ok)" not in output:
        return Verdict(False, None, None)
    found = _MATCHED.search(output)
    assert found, output
    u, s, m, tail, kind = found.groups()
    return Verdict(True, "dane-ee" if kind == "EE" else "dane-ta", f"{u} {s} {m} ...{tail}")


def _mxguard_verdict(lab: Lab, server: str, name: str, tlsa: Sequence[str]) -> Verdict:
    args = ["dane", "match", "--chain", str(lab.presented[server]), "--name", name, "--json"]
    for record in tlsa:
        args += ["--tlsa", record]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.output
    out = json.loads(result.output)
    assert out["valid"] is (result.exit_code == 0)
    if not out["valid"]:
        return Verdict(False, None, None)
    return Verdict(True, out["method"], out["matched"])


# (row, server, records, reference name, what RFC 7672 says: authenticated?)
MATRIX: list[tuple[str, str, str, str, bool]] = [
    # DANE-EE, every selector and matching type (RFC 7672 §3.1.1)
    ("ee_3_0_0_leaf", "valid", "3 0 0 @0", HOST, True),
    ("ee_3_0_1_leaf", "valid", "3 0 1 @0", HOST, True),
    ("ee_3_0_2_leaf", "valid", "3 0 2 @0", HOST, True),
    ("ee_3_1_0_leaf", "valid", "3 1 0 @0", HOST, True),
    ("ee_3_1_1_leaf", "valid", "3 1 1 @0", HOST, True),
    ("ee_3_1_2_leaf", "valid", "3 1 2 @0", HOST, True),
    ("ee_3_1_1_other", "valid", "3 1 1 @other", HOST, False),
    ("ee_3_0_0_other", "valid", "3 0 0 @other", HOST, False),
    ("ee_3_1_2_other", "valid", "3 1 2 @other", HOST, False),
    ("ee_ignores_wrong_name", "valid", "3 1 1 @0", WRONG, True),
    ("ee_matches_leaf_not_issuer", "valid", "3 1 1 @root", HOST, False),
    ("ee_ignores_expiry", "expired", "3 1 1 @0", HOST, True),
    ("ee_ignores_expiry_and_name", "expired", "3 0 0 @0", WRONG, True),
    ("ee_self_signed", "self_signed", "3 1 1 @0", HOST, True),
    ("ta_self_signed_leaf_digest", "self_signed", "2 1 1 @0", HOST, False),
    ("ta_self_signed_leaf_key_in_dns", "self_signed", "2 1 0 @0", HOST, True),
    ("ta_self_signed_leaf_cert_in_dns_is_no_ca", "self_signed", "2 0 0 @0", HOST, False),
    ("ee_leaf_only", "leaf_only", "3 0 1 @0", HOST, True),
    ("ee_on_intermediate_fails", "inter", "3 1 1 @1", HOST, False),
    # DANE-TA, every selector and matching type, anchor sent (RFC 7672 §3.1.2)
    ("ta_2_0_0_root", "valid", "2 0 0 @root", HOST, True),
    ("ta_2_0_1_root", "valid", "2 0 1 @root", HOST, True),
    ("ta_2_0_2_root", "valid", "2 0 2 @root", HOST, True),
    ("ta_2_1_0_root", "valid", "2 1 0 @root", HOST, True),
    ("ta_2_1_1_root", "valid", "2 1 1 @root", HOST, True),
    ("ta_2_1_2_root", "valid", "2 1 2 @root", HOST, True),
    ("ta_2_1_1_other", "valid", "2 1 1 @other", HOST, False),
    ("ta_2_1_0_other", "valid", "2 1 0 @other", HOST, False),
    ("ta_leaf_is_no_anchor", "valid", "2 1 1 @0", HOST, False),
    ("ta_wrong_name", "valid", "2 1 1 @root", WRONG, False),
    ("ta_expired_leaf", "expired", "2 1 1 @root", HOST, False),
    ("ta_expired_leaf_key_in_dns", "expired", "2 1 0 @root", HOST, False),
    # DANE-TA with an intermediate (RFC 7671 §5.2)
    ("ta_root_via_intermediate", "inter", "2 1 1 @root", HOST, True),
    ("ta_intermediate_anchor", "inter", "2 0 1 @1", HOST, True),
    ("ta_intermediate_anchor_wrong_name", "inter", "2 0 1 @1", WRONG, False),
    ("ta_intermediate_anchor_no_root_sent", "inter_only", "2 1 2 @1", HOST, True),
    ("ta_root_digest_not_sent", "inter_only", "2 1 1 @root", HOST, False),
    ("ta_root_key_in_dns_not_sent", "inter_only", "2 1 0 @root", HOST, True),
    ("ta_root_cert_in_dns_not_sent", "inter_only", "2 0 0 @root", HOST, True),
    ("ta_leaf_only_digest", "leaf_only", "2 1 1 @root", HOST, False),
    ("ta_leaf_only_key_in_dns", "leaf_only", "2 1 0 @root", HOST, True),
    ("ta_leaf_only_cert_in_dns", "leaf_only", "2 0 0 @root", HOST, True),
    ("ta_leaf_only_key_in_dns_wrong_name", "leaf_only", "2 1 0 @root", WRONG, False),
    # Chain breaks and other key types
    ("ta_chain_break_wrong_intermediate", "broken", "2 1 1 @1", HOST, False),
    ("ta_chain_break_root_not_sent", "broken", "2 1 1 @root", HOST, False),
    ("ta_chain_break_root_key_in_dns", "broken", "2 1 0 @root", HOST, True),
    ("ta_issuer_not_ca", "not_ca", "2 1 1 @root", HOST, False),
    ("ta_anchor_not_ca", "not_ca", "2 1 1 @1", HOST, False),
    ("ee_under_non_ca_issuer", "not_ca", "3 1 1 @0", HOST, True),
    ("ta_rsa_root_ed25519_intermediate", "rsa_ed", "2 1 1 @2", HOST, True),
    ("ta_ed25519_intermediate", "rsa_ed", "2 0 2 @1", HOST, True),
    ("ta_rsa_root_wrong_name", "rsa_ed", "2 1 1 @2", WRONG, False),
    # Names (RFC 7672 §3.2.3)
    ("ta_wildcard_one_label", "wildcard", "2 1 1 @root", HOST, True),
    ("ta_wildcard_not_two_labels", "wildcard", "2 1 1 @root", "a." + HOST, False),
    # Several records at once; unusable ones are skipped (RFC 7672 §3.1)
    ("several_ee_fails_ta_matches", "valid", "3 1 1 @other; 2 1 1 @root", HOST, True),
    ("several_ta_fails_ee_matches", "valid", "2 1 1 @other; 3 1 1 @0", HOST, True),
    ("several_ta_wrong_name_ee_matches", "valid", "2 1 1 @root; 3 1 1 @0", WRONG, True),
    ("several_all_fail", "valid", "2 1 1 @root; 3 1 1 @other", WRONG, False),
    ("several_short_digest_skipped", "valid", "3 1 1 0a0b; 3 1 1 @0", HOST, True),
    (
        "several_unknown_selector_skipped",
        "valid",
        "3 9 1 " + "ab" * 32 + "; 2 0 1 @root",
        HOST,
        True,
    ),
    ("only_unusable_records", "valid", "3 1 1 0a0b; 3 1 2 0a0b", HOST, False),
    ("full_cert_data_not_a_certificate", "valid", "3 0 0 3003020100; 2 1 2 @other", HOST, False),
]


@pytest.mark.parametrize(
    ("server", "records", "name", "expected"), [r[1:] for r in MATRIX], ids=[r[0] for r in MATRIX]
)
def test_mxguard_agrees_with_openssl(
    lab: Lab, server: str, records: str, name: str, expected: bool
) -> None:
    tlsa = _records(lab, server, records)
    theirs = _openssl_verdict(lab, server, name, tlsa)
    ours = _mxguard_verdict(lab, server, name, tlsa)
    assert (ours.ok, ours.method) == (theirs.ok, theirs.method), (tlsa, theirs, ours)
    if ours.ok:
        # The same record authenticated: OpenSSL shows "U S M ..." and the last hex digits.
        assert theirs.record is not None and ours.record is not None
        head, _, tail = theirs.record.partition(" ...")
        assert ours.record.startswith(head) and ours.record.endswith(tail), (theirs, ours)
    assert ours.ok is expected
