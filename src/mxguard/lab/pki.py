"""The lab's certificate authority: every certificate variant a lab TLS server can present.

Three CAs exist per lab: the *root* (the only one in the lab CA file that clients trust), an
*intermediate* issued by the root, and an *untrusted* root that no client knows. Leaf
certificates are issued for host names in one of the ``CertKind`` variants. Keys are ECDSA
P-256: fast to make, and accepted by every TLS stack the lab talks to.
"""

from __future__ import annotations

import datetime as dt
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mxguard.lab import certprofiles
from mxguard.lab.scenario import CertKind

_DAY = dt.timedelta(days=1)
EXPIRING_DAYS = 10  # CertKind.EXPIRING: valid today, within any "expires soon" warning window


@dataclass(frozen=True)
class Identity:
    """A key and its certificate chain (leaf first), as files and as objects."""

    name: str
    kind: CertKind
    key: certprofiles.PrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf, then any intermediate to send with it
    issuer: x509.Certificate  # the certificate that signed the leaf (itself if self-signed)
    cert_file: Path  # PEM: the chain as sent
    key_file: Path

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.kind in _WEAK:
            # OpenSSL will not even load such a certificate at the default security level;
            # old servers run at a lower one, and so does this one, to be judged by clients.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


# The lab's odd-but-real issuances, each a named variant of lab/certprofiles.py.
PROFILE_KINDS: dict[CertKind, str] = {
    CertKind.NO_AKI: "leaf-no-aki",
    CertKind.LEAF_CA: "leaf-ca-true",
    CertKind.NC_LEADING_DOT: "nc-permitted-leading-dot",
    CertKind.NEGATIVE_SERIAL: "serial-negative",
    CertKind.EMPTY_SUBJECT: "empty-subject-san-noncritical",
    CertKind.RSA1024: "leaf-rsa1024",
    CertKind.AKI_MISMATCH: "leaf-aki-wrong-key",
    CertKind.SHA1: "leaf-sha1",
    CertKind.CN_ONLY: "cn-only-no-san",
    CertKind.IP_SAN_ONLY: "ip-san-only",
}
_WEAK = frozenset({CertKind.RSA1024, CertKind.SHA1})


@dataclass(frozen=True)
class _CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mxguard lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca(cn: str, now: dt.datetime, parent: _CA | None = None) -> _CA:
    key = _key()
    issuer_name = parent.cert.subject if parent else _name(cn)
    signer = parent.key if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 3650 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if parent:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), False
        )
    return _CA(key, builder.sign(signer, hashes.SHA256()))


class LabPKI:
    """Issues lab certificates into ``directory``; ``ca_file`` is what clients should trust."""

    def __init__(self, directory: Path, *, now: dt.datetime | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.now = now or dt.datetime.now(dt.UTC)
        self.root = _ca("mxguard lab root CA", self.now)
        self.intermediate = _ca("mxguard lab intermediate CA", self.now, parent=self.root)
        self.untrusted = _ca("mxguard untrusted CA", self.now)
        self.ca_file = directory / "lab-ca.pem"
        self.ca_file.write_bytes(self.root.cert.public_bytes(serialization.Encoding.PEM))
        self._issued: dict[tuple[str, CertKind], Identity] = {}
        self._authority = certprofiles.CertAuthority(
            self.now,
            root=(self.root.key, self.root.cert),
            intermediate=(self.intermediate.key, self.intermediate.cert),
            untrusted=(self.untrusted.key, self.untrusted.cert),
        )

    @property
    def root_cert(self) -> x509.Certificate:
        return self.root.cert

    def issue(self, name: str, kind: CertKind = CertKind.VALID) -> Identity:
        """The identity of ``name`` in variant ``kind``; the same object on every call."""
        cached = self._issued.get((name, kind))
        if cached is None:
            cached = self._issue(name, kind)
            self._issued[(name, kind)] = cached
        return cached

    def _issue(self, name: str, kind: CertKind) -> Identity:
        if kind in PROFILE_KINDS:
            return self._issue_variant(name, kind)
        key = _key()
        # A wrong-name certificate is valid for a sibling name only, so that no one-label
        # wildcard pattern could cover the host by accident.
        subject_name = "not-" + name if kind is CertKind.WRONG_NAME else name
        begin, end = self.now - _DAY, self.now + 365 * _DAY
        if kind is CertKind.EXPIRED:
            begin, end = self.now - 60 * _DAY, self.now - 2 * _DAY
        elif kind is CertKind.EXPIRING:
            begin, end = self.now - 80 * _DAY, self.now + EXPIRING_DAYS * _DAY
        ca: _CA | None = {
            CertKind.VALID: self.root,
            CertKind.EXPIRED: self.root,
            CertKind.EXPIRING: self.root,
            CertKind.WRONG_NAME: self.root,
            CertKind.INTERMEDIATE: self.intermediate,
            CertKind.UNTRUSTED: self.untrusted,
            CertKind.SELF_SIGNED: None,
        }[kind]
        issuer_name = ca.cert.subject if ca else _name(subject_name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject_name))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(begin)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject_name)]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if ca:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
            )
        leaf = builder.sign(ca.key if ca else key, hashes.SHA256())
        chain: tuple[x509.Certificate, ...] = (leaf,)
        if kind is CertKind.INTERMEDIATE:
            chain = (leaf, self.intermediate.cert)
        stem = self.directory / f"{name}.{kind.value}"
        cert_file = stem.with_name(stem.name + ".crt")
        key_file = stem.with_name(stem.name + ".key")
        cert_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return Identity(
            name=name,
            kind=kind,
            key=key,
            chain=chain,
            issuer=ca.cert if ca else leaf,
            cert_file=cert_file,
            key_file=key_file,
        )

    def _issue_variant(self, name: str, kind: CertKind) -> Identity:
        profile = certprofiles.variant(PROFILE_KINDS[kind]).profile
        built = certprofiles.build(profile, name, self.now, self._authority)
        stem = self.directory / f"{name}.{kind.value}"
        cert_file = stem.with_name(stem.name + ".crt")
        key_file = stem.with_name(stem.name + ".key")
        cert_file.write_bytes(built.chain_pem)
        key_file.write_bytes(built.key_pem)
        key_file.chmod(0o600)
        key = serialization.load_pem_private_key(built.key_pem, password=None)
        assert isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # negative serial
            chain = tuple(x509.load_der_x509_certificate(d) for d in built.chain)
        return Identity(
            name=name,
            kind=kind,
            key=key,
            chain=chain,
            issuer=self.intermediate.cert,  # every variant here is issued by the intermediate
            cert_file=cert_file,
            key_file=key_file,
        )
