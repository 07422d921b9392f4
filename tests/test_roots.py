"""The trust store as DER (protocol/roots.py): what the policy fetch trusts without parsing a
certificate itself. Pure: no network; the TLS handshakes run over memory BIOs."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mxguard.adapters import https
from mxguard.protocol import pkix, roots

HOST = "mta-sts.example.test"
NOW = dt.datetime.now(dt.UTC)

# A PEM block whose base64 does not decode (bad padding), and one that decodes to bytes that
# are no certificate: neither is a root.
BAD_BASE64 = b"-----BEGIN CERTIFICATE-----\nMIIB=x\n-----END CERTIFICATE-----\n"
NOT_A_CERTIFICATE = (
    b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
)
# An ASN.1 SEQUENCE of the right shape on the outside and nothing inside: OpenSSL refuses it.
BROKEN_DER = b"\x30\x82\x01\x00" + b"\x00" * 256

KeyedCert = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]  # a certificate and its key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> KeyedCert:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str) -> KeyedCert:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def pem_of_der(data: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(data).encode("ascii")


@pytest.fixture(scope="module")
def ca() -> KeyedCert:
    return make_ca("Good Test Root")


@pytest.fixture
def no_system_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roots, "system_bundle", lambda: None)


def use_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: bytes) -> None:
    """Make a file holding ``data`` the system's CA bundle for this test."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(data)
    monkeypatch.setattr(roots, "system_bundle", lambda: bundle)


# --- the DER loader ------------------------------------------------------------------------


def test_roots_are_deduplicated_by_der(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: KeyedCert
) -> None:
    other, _ = make_ca("Other Test Root")
    ca_file = tmp_path / "extra.pem"
    ca_file.write_bytes(pem(other, other))
    use_bundle(monkeypatch, tmp_path, pem(ca[0], other, ca[0]))
    assert roots.system_ders() == (der(ca[0]), der(other))
    assert roots.ca_file_ders(ca_file) == (der(other),)
    # The CA file's root is the bundle's: it is trusted once, where the bundle has it.
    assert roots.load_ders(ca_file) == (der(ca[0]), der(other))
    assert roots.load_ders(ca_file, system=False) == (der(other),)
    # One set of roots is one tuple, call after call (what the verifiers' caches key on).
    assert roots.load_ders(ca_file) is roots.load_ders(ca_file)
    assert roots.load_ders(None) is roots.load_ders(None)
    # pkix parses the same roots, in the same order.
    assert pkix.load_roots(ca_file) == (ca[0], other)


def test_unparsable_blocks_are_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: KeyedCert
) -> None:
    junk = BAD_BASE64 + NOT_A_CERTIFICATE + pem_of_der(BROKEN_DER) + b"text between\n"
    ca_file = tmp_path / "mixed.pem"
    ca_file.write_bytes(junk + pem(ca[0]))
    # A user's CA file is checked with OpenSSL: only what it can load counts.
    assert roots.ca_file_ders(ca_file) == (der(ca[0]),)
    assert roots.load_ders(ca_file, system=False) == (der(ca[0]),)
    # The system bundle is only decoded (checking it would cost a second load of ~150
    # roots): an undecodable block is left out, the rest is left to load_into.
    use_bundle(monkeypatch, tmp_path, junk + pem(ca[0]))
    assert roots.system_ders() == (b"not a certificate", BROKEN_DER, der(ca[0]))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert roots.load_into(ctx, roots.system_ders()) == (der(ca[0]),)
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert pkix.load_roots(None) == (ca[0],)


@pytest.mark.parametrize(
    "content",
    [b"hello\n", BAD_BASE64 + NOT_A_CERTIFICATE + pem_of_der(BROKEN_DER)],
    ids=["no_pem_block", "only_broken_blocks"],
)
def test_a_ca_file_without_a_certificate_is_an_error(tmp_path: Path, content: bytes) -> None:
    ca_file = tmp_path / "nothing.pem"
    ca_file.write_bytes(content)
    with pytest.raises(roots.CaFileError, match="holds no usable certificate") as info:
        roots.load_ders(ca_file)
    assert str(ca_file) in str(info.value)
    # The same error, by the same class, from everywhere a CA file is read.
    assert pkix.CaFileError is roots.CaFileError
    with pytest.raises(pkix.CaFileError, match=str(ca_file)):
        pkix.load_roots(ca_file, system=False)
    with pytest.raises(OSError, match=str(ca_file)):
        https._new_context(ca_file)


def test_an_unreadable_ca_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(roots.CaFileError, match=f"cannot read CA file {missing}"):
        roots.ca_file_ders(missing)


def test_no_system_bundle_means_no_system_roots(no_system_bundle: None) -> None:
    assert roots.system_ders() == ()
    assert roots.load_ders(None) == ()
    assert pkix.load_roots(None) == ()


def test_pkix_keeps_its_names() -> None:
    for name in ("CaFileError", "pem_blocks", "pem_certificates", "system_bundle"):
        assert getattr(pkix, name) is getattr(roots, name)


# --- the fetch's TLS context ---------------------------------------------------------------


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, name: str) -> None:
    """A TLS handshake between the two contexts over memory BIOs; raises what the client's
    verification raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                pass  # the client's alert; the client raises the reason below
        c_in.write(s_out.read())
        if client_done and server_done:
            return
    raise AssertionError("the handshake did not finish")


@pytest.fixture(scope="module")
def policy_host(tmp_path_factory: pytest.TempPathFactory, ca: KeyedCert) -> ssl.SSLContext:
    """The server side: a policy host with a certificate for HOST issued by ``ca``."""
    leaf, key = make_leaf(*ca, HOST)
    folder = tmp_path_factory.mktemp("policy-host")
    (folder / "cert.pem").write_bytes(pem(leaf))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx


def test_a_broken_certificate_in_the_bundle_costs_no_other_root(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: KeyedCert,
    policy_host: ssl.SSLContext,
) -> None:
    other, _ = make_ca("Other Test Root")
    # The broken certificate first: OpenSSL stops at it when given the whole bundle at once.
    ders = [BROKEN_DER, der(other), der(ca[0])]
    with pytest.raises(ssl.SSLError):
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=b"".join(ders))
    use_bundle(monkeypatch, tmp_path, b"".join(pem_of_der(d) for d in ders))
    ctx = https._new_context(None)
    assert ctx.cert_store_stats()["x509_ca"] == 2
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    handshake(ctx, policy_host, HOST)  # verified: the good root is in the store
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(ctx, policy_host, "mta-sts.other.test")


def test_without_the_root_the_policy_host_is_not_trusted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, policy_host: ssl.SSLContext
) -> None:
    other, _ = make_ca("Other Test Root")
    use_bundle(monkeypatch, tmp_path, pem_of_der(BROKEN_DER) + pem(other))
    ctx = https._new_context(None)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(ctx, policy_host, HOST)


def test_the_ca_file_is_trusted_next_to_the_bundle(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: KeyedCert,
    policy_host: ssl.SSLContext,
) -> None:
    other, _ = make_ca("Other Test Root")
    ca_file = tmp_path / "lab.pem"
    ca_file.write_bytes(NOT_A_CERTIFICATE + pem(ca[0]))
    use_bundle(monkeypatch, tmp_path, pem(other))
    ctx = https._new_context(ca_file)
    assert ctx.cert_store_stats()["x509_ca"] == 2
    handshake(ctx, policy_host, HOST)


def test_load_into_takes_everything_in_one_call_when_it_can(
    ca: KeyedCert,
) -> None:
    other, _ = make_ca("Other Test Root")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ders = (der(ca[0]), der(other))
    assert roots.load_into(ctx, ders) == ders
    assert ctx.cert_store_stats()["x509_ca"] == 2
    assert roots.load_into(ctx, ()) == ()


# --- what the policy server imports ----------------------------------------------------------


def cryptography_loaded_after(code: str) -> list[str]:
    script = (
        "import json, sys\n"
        f"{code}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_the_fetch_context_and_the_config_check_parse_no_certificate(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pem(make_ca("Some Root")[0]))
    code = (
        "from pathlib import Path\n"
        "from mxguard import config\n"
        "from mxguard.adapters import https\n"
        f"ca = Path({str(ca_file)!r})\n"
        "config.check_ca_file(config.Settings(ca_file=ca))\n"
        "https.client_context(None); https.client_context(ca)\n"
    )
    assert cryptography_loaded_after(code) == []


@pytest.mark.parametrize("command", ["mxguard.cli.serve", "mxguard.cli.policy"])
def test_the_policy_commands_do_not_import_cryptography(command: str) -> None:
    assert cryptography_loaded_after(f"import {command}") == []
