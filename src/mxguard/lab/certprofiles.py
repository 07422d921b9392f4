"""Certificate-chain variants: a realistic public-CA issuance and many single deviations from it.

mxguard's WebPKI verdict (``mxguard.protocol.pkix``) must accept the chains that TLS clients
built on OpenSSL accept and refuse the ones they refuse, except where RFC 8461 §4.2 is stricter.
Checking that takes chains that differ from an ordinary issuance in one known respect each: a
weak key, a missing extension, an expired intermediate, a name constraint, a chain sent in the
wrong order. This module makes them, for the differential test against OpenSSL's own tools and
for lab servers that should present an odd chain.

``Profile`` describes a leaf and the chain sent with it as deviations from the baseline (every
field's default is the baseline); ``CaProfile`` does the same for an intermediate.
``CertAuthority`` is a lab-style trust setup (a trusted root, an intermediate under it, an
untrusted root); ``build`` issues a profile for a host and returns the DER chain as a server
sends it, with the leaf key and the roots a client trusts. ``VARIANTS`` names the deviations.

Some certificates ``cryptography`` refuses to make (serial numbers that are zero or negative,
SHA-1 signatures): they are issued normally, then ``resign`` rewrites the TBSCertificate DER
and signs it again with the issuer's key. Keys are made fresh for every build; nothing is
written to disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from mxguard.protocol.der import tbs_fields

KeyKind = Literal["ec256", "ec384", "rsa2048", "rsa1024", "ed25519"]
DigestName = Literal["sha256", "sha384", "sha1"]
KeyUsageName = Literal[
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
]
EkuName = Literal["serverAuth", "clientAuth", "anyExtendedKeyUsage", "emailProtection"]
IssuerKind = Literal["intermediate", "root", "self", "untrusted-intermediate", "untrusted-root"]
BasicConstraintsKind = Literal["absent", "ca-false", "ca-true"]
AkiKind = Literal["issuer", "absent", "wrong-key"]
ExtraExtension = Literal["none", "critical", "non-critical"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Placeholders in names of a profile, replaced when a profile is built for a host:
HOST = "{host}"  # the host name itself, e.g. mx.example.test
ZONE = "{zone}"  # the host name without its first label, e.g. example.test

ORGANIZATION = "mxguard lab"
DV_POLICY = ObjectIdentifier("2.23.140.1.2.1")  # CA/Browser Forum: domain validated
# An extension no verifier knows: an arc under IANA's example enterprise number (RFC 5612).
UNKNOWN_EXTENSION = ObjectIdentifier("1.3.6.1.4.1.32473.8461.1")
_DAY = dt.timedelta(days=1)
MX = "mx.example.test"  # the host name of most VARIANTS

_EKU_OIDS: dict[EkuName, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "anyExtendedKeyUsage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
}
_HASHES: dict[DigestName, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha1": hashes.SHA1,
}
# Signature AlgorithmIdentifier OIDs (RFC 5758, RFC 8017, RFC 8410), by issuer key and digest.
_SIG_OIDS: dict[tuple[str, DigestName], str] = {
    ("ec", "sha1"): "1.2.840.10045.4.1",
    ("ec", "sha256"): "1.2.840.10045.4.3.2",
    ("ec", "sha384"): "1.2.840.10045.4.3.3",
    ("rsa", "sha1"): "1.2.840.113549.1.1.5",
    ("rsa", "sha256"): "1.2.840.113549.1.1.11",
    ("rsa", "sha384"): "1.2.840.113549.1.1.12",
}
_ED25519_OID = "1.3.101.112"


@dataclass(frozen=True, slots=True)
class CaProfile:
    """An intermediate CA, as deviations from a public CA's issuing intermediate.

    The baseline: ECDSA P-256, signed with SHA-256 by its issuer, basicConstraints cA=TRUE
    with pathLenConstraint 0 (critical), keyUsage digitalSignature+keyCertSign+cRLSign
    (critical), EKU serverAuth+clientAuth, SKI and AKI, valid from yesterday for three years.
    ``ca=None`` leaves basicConstraints out; ``path_length=None`` sets no limit. Names in
    ``permitted_dns`` and ``excluded_dns`` become a critical nameConstraints extension (RFC 5280
    §4.2.1.10; a leading dot means "subdomains only"); they may use ``HOST`` and ``ZONE``.
    Days are relative to the time the intermediate is issued at.
    """

    key: KeyKind = "ec256"
    digest: DigestName = "sha256"
    ca: bool | None = True
    path_length: int | None = 0
    key_usage: tuple[KeyUsageName, ...] | None = ("digital_signature", "key_cert_sign", "crl_sign")
    eku: tuple[EkuName, ...] | None = ("serverAuth", "clientAuth")
    permitted_dns: tuple[str, ...] = ()
    excluded_dns: tuple[str, ...] = ()
    not_before_days: int = -1
    not_after_days: int = 3 * 365


DEFAULT_INTERMEDIATE = CaProfile()


@dataclass(frozen=True, slots=True)
class Profile:
    """A leaf certificate and the chain sent with it, as deviations from a public CA's issuance.

    The baseline (every default): an ECDSA P-256 leaf signed with SHA-256 by an intermediate,
    subject CN=host, O=mxguard lab, subjectAltName dNSName host (not critical), basicConstraints
    cA=FALSE (critical), keyUsage digitalSignature (critical), EKU serverAuth+clientAuth, SKI,
    AKI naming the issuer's key, the CA/B Forum DV policy, valid from yesterday for 90 days, a
    random positive serial, and the chain sent as leaf then intermediate.

    Name fields may use ``HOST`` and ``ZONE``. ``san_dns`` None or empty: no subjectAltName
    unless ``san_ip`` has addresses. ``common_name`` and ``organization`` None: left out of the
    subject (both None: an empty subject). ``serial`` None: random positive; any other value is
    used as is, zero and negative included. Days are relative to the time of ``build``.

    The chain: ``issuer`` signs the leaf ("intermediate": the trusted root's intermediate, in
    ``intermediate``; "root": the trusted root itself; "self": self-signed; "untrusted-...":
    the same under a root no client trusts). ``intermediate`` and ``sub_intermediate`` (a second
    intermediate below the first, which then signs the leaf) apply to the intermediate issuers
    only. The certificates after the leaf are the intermediates (leaf-side first; left out
    without ``send_intermediates``), then the path's root (``send_root``; the trusted root for a
    self-signed leaf), then an unrelated certificate (``send_unrelated``); ``reverse_rest``
    reverses everything after the leaf (the leaf stays first, as a TLS server must send it).
    """

    key: KeyKind = "ec256"
    digest: DigestName = "sha256"
    san_dns: tuple[str, ...] | None = (HOST,)
    san_ip: tuple[str, ...] = ()
    san_critical: bool = False
    common_name: str | None = HOST
    organization: str | None = ORGANIZATION
    aki: AkiKind = "issuer"
    ski: bool = True
    basic_constraints: BasicConstraintsKind = "ca-false"
    key_usage: tuple[KeyUsageName, ...] | None = ("digital_signature",)
    eku: tuple[EkuName, ...] | None = ("serverAuth", "clientAuth")
    extra_extension: ExtraExtension = "none"
    not_before_days: int = -1
    not_after_days: int = 90
    serial: int | None = None
    issuer: IssuerKind = "intermediate"
    intermediate: CaProfile = DEFAULT_INTERMEDIATE
    sub_intermediate: CaProfile | None = None
    send_intermediates: bool = True
    send_root: bool = False
    send_unrelated: bool = False
    reverse_rest: bool = False


@dataclass(frozen=True, slots=True)
class Variant:
    """A named profile, the reference name a client checks it against, and what it is about."""

    name: str
    profile: Profile
    host: str
    note: str


@dataclass(frozen=True, slots=True)
class Built:
    """A built profile: the chain as a server sends it (DER, leaf first), the leaf's private key
    (PKCS#8 PEM), the chain as PEM (what a TLS server loads), and the roots a client trusts."""

    chain: tuple[bytes, ...]
    key_pem: bytes
    chain_pem: bytes
    roots: tuple[bytes, ...]

    @property
    def leaf(self) -> bytes:
        return self.chain[0]

    @property
    def leaf_pem(self) -> bytes:
        return to_pem(self.chain[0])

    @property
    def rest_pem(self) -> bytes:
        """Everything the server sends after the leaf, as PEM (empty when only the leaf)."""
        return b"".join(to_pem(der) for der in self.chain[1:])

    @property
    def roots_pem(self) -> bytes:
        return b"".join(to_pem(der) for der in self.roots)


@dataclass(frozen=True, slots=True)
class _Signer:
    """An issued certificate with its key: what is needed to issue below it."""

    key: PrivateKey
    subject: x509.Name
    der: bytes


def to_pem(der: bytes) -> bytes:
    """One certificate, DER to PEM."""
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


# --- a little DER: enough to rewrite a TBSCertificate -------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        body = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(body)]) + body
    return bytes([tag]) + length + content


def _der_integer(value: int) -> bytes:
    """A DER INTEGER: minimal two's complement, so zero and negative values encode as well."""
    size = (value + (value < 0)).bit_length() // 8 + 1
    return _tlv(0x02, value.to_bytes(size, "big", signed=True))


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        septets = [arc & 0x7F]
        arc >>= 7
        while arc:
            septets.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(septets))
    return _tlv(0x06, bytes(body))


def _algorithm_identifier(key: PrivateKey, digest: DigestName) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _tlv(0x30, _der_oid(_ED25519_OID))
    if isinstance(key, rsa.RSAPrivateKey):  # RFC 8017: the parameters are an explicit NULL
        return _tlv(0x30, _der_oid(_SIG_OIDS[("rsa", digest)]) + b"\x05\x00")
    return _tlv(0x30, _der_oid(_SIG_OIDS[("ec", digest)]))


def _sign_bytes(key: PrivateKey, data: bytes, digest: DigestName) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), _HASHES[digest]())
    return key.sign(data, ec.ECDSA(_HASHES[digest]()))


def resign(
    der: bytes, issuer_key: PrivateKey, digest: DigestName, *, serial: int | None = None
) -> bytes:
    """``der`` signed again by ``issuer_key`` with ``digest`` (ignored for Ed25519), and with
    serial number ``serial`` if given: the certificates ``CertificateBuilder`` will not make.

    Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING };
    the serial number and the ``signature`` AlgorithmIdentifier in the TBSCertificate are
    replaced, the outer AlgorithmIdentifier is set to match, and the TBSCertificate is signed.
    """
    fields = [raw for _, _, raw in tbs_fields(der)]
    at = 1 if fields[0][0] == 0xA0 else 0  # after the optional [0] EXPLICIT version
    algorithm = _algorithm_identifier(issuer_key, digest)
    if serial is not None:
        fields[at] = _der_integer(serial)
    fields[at + 1] = algorithm
    tbs = _tlv(0x30, b"".join(fields))
    signature = _sign_bytes(issuer_key, tbs, digest)
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


# --- issuing -------------------------------------------------------------------------------


def _generate(kind: KeyKind) -> PrivateKey:
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(65537, 2048 if kind == "rsa2048" else 1024)


def _expand(text: str, host: str) -> str:
    zone = host.split(".", 1)[1] if "." in host else host
    return text.replace(HOST, host).replace(ZONE, zone)


def _name(common_name: str | None, organization: str | None = ORGANIZATION) -> x509.Name:
    attributes = []
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _key_usage(names: tuple[KeyUsageName, ...]) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature="digital_signature" in names,
        content_commitment="content_commitment" in names,
        key_encipherment="key_encipherment" in names,
        data_encipherment="data_encipherment" in names,
        key_agreement="key_agreement" in names,
        key_cert_sign="key_cert_sign" in names,
        crl_sign="crl_sign" in names,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(
    builder: x509.CertificateBuilder,
    signer: PrivateKey,
    digest: DigestName,
    serial: int | None = None,
) -> bytes:
    """Sign ``builder``; through ``resign`` for what ``CertificateBuilder`` refuses to make."""
    odd_serial = serial is not None and serial <= 0
    builder = builder.serial_number(
        serial if serial is not None and not odd_serial else x509.random_serial_number()
    )
    eddsa = isinstance(signer, ed25519.Ed25519PrivateKey)
    # SHA-1 is signed as SHA-256 first, then re-signed.
    algorithm = None if eddsa else hashes.SHA384() if digest == "sha384" else hashes.SHA256()
    der = builder.sign(signer, algorithm).public_bytes(serialization.Encoding.DER)
    if odd_serial or (digest == "sha1" and not eddsa):
        der = resign(der, signer, digest, serial=serial if odd_serial else None)
    return der


def _root(common_name: str, now: dt.datetime) -> _Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 20 * 365 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(("key_cert_sign", "crl_sign")), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return _Signer(key, name, _sign(builder, key, "sha256"))


def _intermediate(
    profile: CaProfile, common_name: str, parent: _Signer, now: dt.datetime, host: str
) -> _Signer:
    key = _generate(profile.key)
    name = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.subject)
        .public_key(key.public_key())
        .not_valid_before(now + profile.not_before_days * _DAY)
        .not_valid_after(now + profile.not_after_days * _DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), False
        )
    )
    if profile.ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(
                ca=profile.ca, path_length=profile.path_length if profile.ca else None
            ),
            critical=True,
        )
    if profile.key_usage is not None:
        builder = builder.add_extension(_key_usage(profile.key_usage), critical=True)
    if profile.eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([_EKU_OIDS[e] for e in profile.eku]), False
        )
    if profile.permitted_dns or profile.excluded_dns:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(_expand(n, host)) for n in profile.permitted_dns]
                or None,
                excluded_subtrees=[x509.DNSName(_expand(n, host)) for n in profile.excluded_dns]
                or None,
            ),
            critical=True,
        )
    return _Signer(key, name, _sign(builder, parent.key, profile.digest))


def _adopt(ca: tuple[PrivateKey, x509.Certificate]) -> _Signer:
    key, cert = ca
    return _Signer(key, cert.subject, cert.public_bytes(serialization.Encoding.DER))


class CertAuthority:
    """A lab-style trust setup: a trusted root, an intermediate under it, an untrusted root.

    ``name`` starts the subject CN of every CA certificate made here (``ORGANIZATION`` is O).

    The trusted root is self-signed ECDSA P-256 with SHA-256, cA=TRUE, keyUsage keyCertSign and
    cRLSign, with an SKI; it is valid from the day before ``now`` for 20 years. The intermediate
    is ``DEFAULT_INTERMEDIATE``, issued at ``now``. The untrusted root is made the same way as
    the trusted one, and no client trusts it. ``unrelated`` is a leaf for another host from the
    untrusted root, to pad chains with.
    """

    def __init__(
        self,
        now: dt.datetime,
        *,
        name: str = "mxguard lab",
        root: tuple[PrivateKey, x509.Certificate] | None = None,
        intermediate: tuple[PrivateKey, x509.Certificate] | None = None,
        untrusted: tuple[PrivateKey, x509.Certificate] | None = None,
    ) -> None:
        # ``root``, ``intermediate``, ``untrusted``: existing CAs (key, certificate) to issue
        # under instead of new ones, so that a lab's variants chain to the lab's own root.
        self.now = now
        self.name = name
        self._root = _adopt(root) if root else _root(f"{name} root CA", now)
        self._intermediate = (
            _adopt(intermediate)
            if intermediate
            else _intermediate(
                DEFAULT_INTERMEDIATE, f"{name} intermediate CA", self._root, now, "unused.invalid"
            )
        )
        self._untrusted = (
            _adopt(untrusted) if untrusted else _root(f"{name} untrusted root CA", now)
        )
        self._unrelated = build(
            Profile(issuer="untrusted-root"), "unrelated.example.net", now, self
        ).leaf

    @property
    def root(self) -> bytes:
        """The trusted root (DER)."""
        return self._root.der

    @property
    def intermediate(self) -> bytes:
        """The standing intermediate under the trusted root (DER)."""
        return self._intermediate.der

    @property
    def unrelated(self) -> bytes:
        """A certificate unrelated to any chain built here (DER)."""
        return self._unrelated

    @property
    def roots(self) -> tuple[bytes, ...]:
        """What clients trust: the trusted root alone."""
        return (self._root.der,)


def _leaf_extensions(
    builder: x509.CertificateBuilder,
    profile: Profile,
    host: str,
    key: PrivateKey,
    issuer_key: PrivateKey,
    wrong_key: PrivateKey,
) -> x509.CertificateBuilder:
    names: list[x509.GeneralName] = [x509.DNSName(_expand(n, host)) for n in profile.san_dns or ()]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in profile.san_ip]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), profile.san_critical)
    if profile.basic_constraints != "absent":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=profile.basic_constraints == "ca-true", path_length=None),
            critical=True,
        )
    if profile.key_usage is not None:
        builder = builder.add_extension(_key_usage(profile.key_usage), critical=True)
    if profile.eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([_EKU_OIDS[e] for e in profile.eku]), False
        )
    if profile.ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    if profile.aki != "absent":
        named = issuer_key if profile.aki == "issuer" else wrong_key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(named.public_key()), False
        )
    builder = builder.add_extension(
        x509.CertificatePolicies([x509.PolicyInformation(DV_POLICY, None)]), False
    )
    if profile.extra_extension != "none":
        builder = builder.add_extension(
            x509.UnrecognizedExtension(UNKNOWN_EXTENSION, b"\x05\x00"),
            critical=profile.extra_extension == "critical",
        )
    return builder


def build(profile: Profile, host: str, now: dt.datetime, ca: CertAuthority) -> Built:
    """Issue ``profile`` for ``host`` at ``now`` under ``ca``: the chain a server would send.

    The standing intermediate of ``ca`` is used when the profile asks for the default one under
    the trusted root; every other intermediate is issued for this build.
    """
    top: _Signer | None = None
    path_root: _Signer = ca._root
    if profile.issuer in ("intermediate", "untrusted-intermediate"):
        trusted = profile.issuer == "intermediate"
        path_root = ca._root if trusted else ca._untrusted
        if trusted and profile.intermediate == DEFAULT_INTERMEDIATE:
            top = ca._intermediate
        else:
            label = "variant" if trusted else "untrusted"
            top = _intermediate(
                profile.intermediate, f"{ca.name} {label} intermediate CA", path_root, now, host
            )
    elif profile.issuer == "untrusted-root":
        path_root = ca._untrusted
    intermediates: list[_Signer] = []
    if top is not None:
        intermediates.append(top)
        if profile.sub_intermediate is not None:
            sub = _intermediate(
                profile.sub_intermediate, f"{ca.name} sub-intermediate CA", top, now, host
            )
            intermediates.insert(0, sub)

    key = _generate(profile.key)
    subject = _name(
        _expand(profile.common_name, host) if profile.common_name is not None else None,
        profile.organization,
    )
    signer: _Signer | None = intermediates[0] if intermediates else None
    if signer is None and profile.issuer != "self":
        signer = path_root
    issuer_key = signer.key if signer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .not_valid_before(now + profile.not_before_days * _DAY)
        .not_valid_after(now + profile.not_after_days * _DAY)
    )
    builder = _leaf_extensions(builder, profile, host, key, issuer_key, ca._untrusted.key)
    leaf = _sign(builder, issuer_key, profile.digest, profile.serial)

    rest = [s.der for s in intermediates] if profile.send_intermediates else []
    if profile.send_root:
        rest.append(path_root.der)
    if profile.send_unrelated:
        rest.append(ca.unrelated)
    if profile.reverse_rest:
        rest.reverse()
    chain = (leaf, *rest)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Built(
        chain=chain,
        key_pem=key_pem,
        chain_pem=b"".join(to_pem(der) for der in chain),
        roots=ca.roots,
    )


# --- the named variants --------------------------------------------------------------------


def variant(name: str) -> Variant:
    """The variant called ``name``; KeyError names the ones there are."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no certificate variant {name!r}; known: {', '.join(v.name for v in VARIANTS)}")


VARIANTS: tuple[Variant, ...] = (
    # Baselines: what public CAs issue today.
    Variant("baseline-ec256", Profile(), MX, "ECDSA P-256 leaf from an intermediate, chain sent"),
    Variant("baseline-rsa2048", Profile(key="rsa2048"), MX, "RSA-2048 leaf"),
    Variant("baseline-ed25519", Profile(key="ed25519"), MX, "Ed25519 leaf (128-bit security)"),
    Variant("leaf-ec384-sha384", Profile(key="ec384", digest="sha384"), MX, "P-384, SHA-384"),
    Variant("issued-by-root", Profile(issuer="root"), MX, "no intermediate: root signs the leaf"),
    Variant(
        "two-intermediates",
        Profile(intermediate=CaProfile(path_length=None), sub_intermediate=CaProfile()),
        MX,
        "root -> intermediate (no path length limit) -> sub-intermediate -> leaf",
    ),
    # Leaf extensions that are missing or odd.
    Variant("leaf-no-aki", Profile(aki="absent"), MX, "no authorityKeyIdentifier"),
    Variant("leaf-no-ski", Profile(ski=False), MX, "no subjectKeyIdentifier"),
    Variant(
        "leaf-aki-wrong-key",
        Profile(aki="wrong-key"),
        MX,
        "the AKI names a key other than the issuer's: the issuer is not found",
    ),
    Variant("leaf-no-basic-constraints", Profile(basic_constraints="absent"), MX, "no BC"),
    Variant("leaf-ca-true", Profile(basic_constraints="ca-true"), MX, "a CA certificate as leaf"),
    Variant("leaf-no-key-usage", Profile(key_usage=None), MX, "no keyUsage extension"),
    Variant(
        "leaf-ku-digsig-keyenc",
        Profile(key="rsa2048", key_usage=("digital_signature", "key_encipherment")),
        MX,
        "RSA leaf with the classic digitalSignature+keyEncipherment",
    ),
    Variant(
        "leaf-ku-keycertsign-only",
        Profile(key_usage=("key_cert_sign",)),
        MX,
        "keyUsage allows certificate signing only: not a TLS server key",
    ),
    Variant("leaf-eku-server-only", Profile(eku=("serverAuth",)), MX, "EKU serverAuth alone"),
    Variant("leaf-eku-client-only", Profile(eku=("clientAuth",)), MX, "EKU clientAuth only"),
    Variant("leaf-no-eku", Profile(eku=None), MX, "no EKU: any purpose"),
    Variant(
        "leaf-eku-any",
        Profile(eku=("anyExtendedKeyUsage",)),
        MX,
        "EKU anyExtendedKeyUsage alone (OpenSSL wants serverAuth listed)",
    ),
    Variant(
        "leaf-eku-email-only",
        Profile(eku=("emailProtection",)),
        MX,
        "an S/MIME certificate",
    ),
    Variant(
        "leaf-unknown-critical-extension",
        Profile(extra_extension="critical"),
        MX,
        "an extension no verifier knows, marked critical: must be refused (RFC 5280 §4.2)",
    ),
    Variant(
        "leaf-unknown-extension",
        Profile(extra_extension="non-critical"),
        MX,
        "the same extension, not critical: ignored",
    ),
    # Keys and signatures.
    Variant("leaf-rsa1024", Profile(key="rsa1024"), MX, "RSA-1024 leaf: below security level 2"),
    Variant("leaf-sha1", Profile(digest="sha1"), MX, "leaf signed with ECDSA-SHA1"),
    Variant(
        "leaf-rsa2048-by-rsa1024",
        Profile(key="rsa2048", intermediate=CaProfile(key="rsa1024")),
        MX,
        "RSA-2048 leaf from an RSA-1024 intermediate",
    ),
    # Serial numbers (RFC 5280 §4.1.2.2: positive; but verifiers tolerate others).
    Variant("serial-negative", Profile(serial=-0x5EED_CAFE), MX, "negative serial number"),
    Variant("serial-zero", Profile(serial=0), MX, "serial number 0"),
    Variant("serial-large", Profile(serial=(1 << 159) - 1), MX, "a 20-octet serial number"),
    # Subjects.
    Variant(
        "empty-subject-san-noncritical",
        Profile(common_name=None, organization=None),
        MX,
        "empty subject with a non-critical SAN (RFC 5280 wants it critical; not checked)",
    ),
    Variant(
        "empty-subject-san-critical",
        Profile(common_name=None, organization=None, san_critical=True),
        MX,
        "empty subject with a critical SAN: the RFC 5280 form",
    ),
    Variant("subject-cn-only", Profile(organization=None), MX, "subject CN alone (DV style)"),
    Variant("subject-no-cn", Profile(common_name=None), MX, "subject O alone; name in SAN"),
    # Names.
    Variant(
        "cn-only-no-san",
        Profile(san_dns=None),
        MX,
        "the host name only in the subject CN, no subjectAltName",
    ),
    Variant(
        "ip-san-only",
        Profile(san_dns=None, san_ip=("192.0.2.25",), common_name="192.0.2.25"),
        MX,
        "only an IP address SAN; CN is the address",
    ),
    Variant(
        "ip-san-cn-host",
        Profile(san_dns=None, san_ip=("192.0.2.25",)),
        MX,
        "only an IP address SAN, the host name in the CN",
    ),
    Variant("san-other-name", Profile(san_dns=("mail.example.test",)), MX, "SAN for another name"),
    Variant(
        "san-several-names",
        Profile(san_dns=("mail.example.test", HOST, "smtp.example.test")),
        MX,
        "the host is one of several SAN names",
    ),
    Variant("san-uppercase", Profile(san_dns=("MX.EXAMPLE.TEST",)), MX, "names are caseless"),
    Variant(
        "san-parent-zone",
        Profile(san_dns=("example.test",)),
        MX,
        "SAN for the zone apex only",
    ),
    Variant("wildcard", Profile(san_dns=("*.example.test",)), MX, "one whole left-most label"),
    Variant(
        "wildcard-two-labels-deep",
        Profile(san_dns=("*.example.test",)),
        "a.mx.example.test",
        "a wildcard covers one label, not two",
    ),
    Variant(
        "wildcard-apex",
        Profile(san_dns=("*.example.test",)),
        "example.test",
        "a wildcard does not cover the zone apex",
    ),
    Variant(
        "partial-wildcard",
        Profile(san_dns=("m*.example.test",)),
        MX,
        "a wildcard as part of the left-most label",
    ),
    # Validity.
    Variant("leaf-expired", Profile(not_before_days=-91, not_after_days=-1), MX, "ended yesterday"),
    Variant(
        "leaf-not-yet-valid",
        Profile(not_before_days=1, not_after_days=91),
        MX,
        "starts tomorrow",
    ),
    Variant(
        "leaf-long-validity",
        Profile(not_after_days=5 * 365),
        MX,
        "five years: CA/B Forum rules, not a verifier's",
    ),
    # Intermediates.
    Variant(
        "intermediate-expired",
        Profile(intermediate=CaProfile(not_before_days=-400, not_after_days=-1)),
        MX,
        "the intermediate ended yesterday",
    ),
    Variant(
        "intermediate-not-yet-valid",
        Profile(intermediate=CaProfile(not_before_days=1, not_after_days=400)),
        MX,
        "the intermediate starts tomorrow",
    ),
    Variant("intermediate-not-ca", Profile(intermediate=CaProfile(ca=False)), MX, "cA=FALSE"),
    Variant(
        "intermediate-no-basic-constraints",
        Profile(intermediate=CaProfile(ca=None)),
        MX,
        "no basicConstraints, only keyUsage keyCertSign: not a CA (RFC 5280 §4.2.1.9)",
    ),
    Variant(
        "intermediate-pathlen0-with-sub",
        Profile(sub_intermediate=CaProfile()),
        MX,
        "pathLenConstraint 0, yet a sub-intermediate below it",
    ),
    Variant(
        "intermediate-ku-no-certsign",
        Profile(intermediate=CaProfile(key_usage=("digital_signature", "crl_sign"))),
        MX,
        "the intermediate's keyUsage lacks keyCertSign",
    ),
    Variant(
        "intermediate-rsa1024", Profile(intermediate=CaProfile(key="rsa1024")), MX, "weak CA key"
    ),
    Variant(
        "intermediate-rsa2048", Profile(intermediate=CaProfile(key="rsa2048")), MX, "RSA CA key"
    ),
    Variant(
        "intermediate-sha1",
        Profile(intermediate=CaProfile(digest="sha1")),
        MX,
        "the root signed the intermediate with ECDSA-SHA1",
    ),
    Variant(
        "intermediate-eku-client-only",
        Profile(intermediate=CaProfile(eku=("clientAuth",))),
        MX,
        "the intermediate's EKU excludes serverAuth",
    ),
    Variant(
        "intermediate-no-eku", Profile(intermediate=CaProfile(eku=None)), MX, "no EKU on the CA"
    ),
    Variant(
        "nc-permitted-leading-dot",
        Profile(intermediate=CaProfile(permitted_dns=("." + ZONE,))),
        MX,
        "name constraints permit '.example.test': subdomains of the host's zone",
    ),
    Variant(
        "nc-permitted-zone",
        Profile(intermediate=CaProfile(permitted_dns=(ZONE,))),
        MX,
        "name constraints permit 'example.test': the zone and its subdomains",
    ),
    Variant(
        "nc-excluded-zone",
        Profile(intermediate=CaProfile(excluded_dns=(ZONE,))),
        MX,
        "name constraints exclude the host's zone",
    ),
    Variant(
        "nc-permitted-other",
        Profile(intermediate=CaProfile(permitted_dns=("example.net",))),
        MX,
        "name constraints permit another domain only",
    ),
    # The chain as sent.
    Variant(
        "intermediate-not-sent",
        Profile(send_intermediates=False),
        MX,
        "the server sends the leaf alone",
    ),
    Variant("unrelated-appended", Profile(send_unrelated=True), MX, "an extra unrelated cert"),
    Variant("root-appended", Profile(send_root=True), MX, "the root is sent too"),
    Variant(
        "wrong-order",
        Profile(send_unrelated=True, reverse_rest=True),
        MX,
        "leaf, unrelated certificate, intermediate",
    ),
    Variant(
        "two-intermediates-reversed",
        Profile(
            intermediate=CaProfile(path_length=None),
            sub_intermediate=CaProfile(),
            reverse_rest=True,
        ),
        MX,
        "leaf, then the upper intermediate, then the one that issued the leaf",
    ),
    # Trust.
    Variant("self-signed", Profile(issuer="self"), MX, "self-signed leaf"),
    Variant(
        "untrusted-root",
        Profile(issuer="untrusted-intermediate"),
        MX,
        "a chain to a root nobody trusts, the root not sent",
    ),
    Variant(
        "untrusted-root-sent",
        Profile(issuer="untrusted-intermediate", send_root=True),
        MX,
        "a chain to a root nobody trusts, the root sent",
    ),
    Variant(
        "untrusted-root-direct",
        Profile(issuer="untrusted-root", send_root=True),
        MX,
        "the untrusted root signs the leaf and is sent with it",
    ),
)


__all__ = [
    "DEFAULT_INTERMEDIATE",
    "HOST",
    "MX",
    "VARIANTS",
    "ZONE",
    "Built",
    "CaProfile",
    "CertAuthority",
    "Profile",
    "Variant",
    "build",
    "resign",
    "to_pem",
]
