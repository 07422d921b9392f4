"""WebPKI verification of MX certificates (RFC 8461 §4.2), with the RFC 8460 §4.3.1 result type
of every failure, against certificates from the lab CA and a few built here for the edge cases
the lab does not issue (wildcards, expired intermediates, not-yet-valid leaves, no SAN)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import CertKind
from mxguard.protocol.pkix import CaFileError, load_roots, system_bundle, verify_pkix
from mxguard.protocol.results import ResultType

MX = "mx.example.test"
DAY = dt.timedelta(days=1)
NOT = ResultType.CERTIFICATE_NOT_TRUSTED
EXPIRED = ResultType.CERTIFICATE_EXPIRED
MISMATCH = ResultType.CERTIFICATE_HOST_MISMATCH
FAILURE = ResultType.VALIDATION_FAILURE


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


@dataclass(frozen=True)
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    issuer: Issuer | None,
    *,
    names: tuple[str, ...] = (MX,),
    cn: str = "test leaf",
    begin: dt.datetime,
    end: dt.datetime,
    ca: bool = False,
) -> Issuer:
    """A certificate signed by ``issuer`` (self-signed when None); SAN dNSNames ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if ca:
        builder = builder.add_extension(
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
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False
        )
    return Issuer(key, builder.sign(signer, hashes.SHA256()))


def root_of(pki: LabPKI) -> Issuer:
    return Issuer(pki.root.key, pki.root.cert)


def verify(
    pki: LabPKI,
    chain: tuple[x509.Certificate, ...],
    name: str = MX,
    when: dt.datetime | None = None,
) -> tuple[bool, ResultType | None, str]:
    verdict = verify_pkix(chain, name=name, roots=(pki.root_cert,), now=when or pki.now)
    assert verdict.ok == (verdict.result_type is None), verdict
    return verdict.ok, verdict.result_type, verdict.detail


# --- the lab's certificate variants -------------------------------------------------------

LAB_VARIANTS = [
    # (variant, expected result type; None = verified)
    (CertKind.VALID, None),
    (CertKind.INTERMEDIATE, None),
    (CertKind.EXPIRED, EXPIRED),
    (CertKind.WRONG_NAME, MISMATCH),
    (CertKind.SELF_SIGNED, NOT),
    (CertKind.UNTRUSTED, NOT),
]


@pytest.mark.parametrize(("kind", "expected"), LAB_VARIANTS, ids=[k for k, _ in LAB_VARIANTS])
def test_each_lab_certificate_variant_gets_its_result_type(
    pki: LabPKI, kind: CertKind, expected: ResultType | None
) -> None:
    identity = pki.issue(MX, kind)
    ok, result_type, detail = verify(pki, identity.chain)
    assert result_type is expected, detail
    assert ok is (expected is None)


def test_success_returns_the_path_up_to_the_trusted_root(pki: LabPKI) -> None:
    identity = pki.issue(MX, CertKind.INTERMEDIATE)
    verdict = verify_pkix(identity.chain, name=MX, roots=(pki.root_cert,), now=pki.now)
    assert verdict.path == (*identity.chain, pki.root_cert)


def test_intermediate_not_sent_means_no_path_to_a_root(pki: LabPKI) -> None:
    identity = pki.issue(MX, CertKind.INTERMEDIATE)
    _, result_type, detail = verify(pki, identity.chain[:1])
    assert result_type is NOT
    assert "mxguard lab intermediate CA" in detail  # names the issuer it could not find


def test_a_root_that_is_not_configured_is_not_trusted(pki: LabPKI) -> None:
    identity = pki.issue(MX, CertKind.VALID)
    other = make_cert(
        None, cn="other root", names=(), begin=pki.now - DAY, end=pki.now + DAY, ca=True
    )
    verdict = verify_pkix(identity.chain, name=MX, roots=(other.cert,), now=pki.now)
    assert verdict.result_type is NOT
    assert verify_pkix(identity.chain, name=MX, roots=(), now=pki.now).result_type is NOT


# --- names (RFC 6125 §6.4 as RFC 8461 §4.2 requires) ---------------------------------------

NAME_ROWS = [
    # (rule, SAN names of the certificate, host name checked, verified?)
    ("exact_name_matches", (MX,), MX, True),
    ("case_and_trailing_dot_do_not_matter", (MX,), "MX.Example.TEST.", True),
    ("wildcard_covers_one_label", ("*.example.test",), MX, True),
    ("wildcard_does_not_cover_the_parent", ("*.example.test",), "example.test", False),
    ("wildcard_does_not_cover_two_labels", ("*.example.test",), "a.mx.example.test", False),
    ("partial_wildcard_label_is_not_a_wildcard", ("m*.example.test",), MX, False),
    ("any_san_name_may_match", ("mail.other.test", MX), MX, True),
    ("sibling_name_does_not_match", ("mx2.example.test",), MX, False),
]


@pytest.mark.parametrize(
    ("names", "host", "verified"), [r[1:] for r in NAME_ROWS], ids=[r[0] for r in NAME_ROWS]
)
def test_name_rules(pki: LabPKI, names: tuple[str, ...], host: str, verified: bool) -> None:
    leaf = make_cert(root_of(pki), names=names, begin=pki.now - DAY, end=pki.now + DAY)
    ok, result_type, detail = verify(pki, (leaf.cert,), name=host)
    assert ok is verified, detail
    if not verified:
        assert result_type is MISMATCH
        assert host.rstrip(".").lower() in detail


def test_common_name_without_san_is_a_host_mismatch(pki: LabPKI) -> None:
    # RFC 8461 §4.2: the MX name must be a subjectAltName dNSName; OpenSSL alone would fall
    # back to the CN, mxguard tells it not to.
    leaf = make_cert(root_of(pki), names=(), cn=MX, begin=pki.now - DAY, end=pki.now + DAY)
    ok, result_type, detail = verify(pki, (leaf.cert,))
    assert not ok and result_type is MISMATCH
    assert "RFC 8461 §4.2" in detail and "not the subject CN" in detail


# --- validity dates, and which failure wins -------------------------------------------------


def dated_rows(pki: LabPKI) -> dict[str, Callable[[], tuple[tuple[x509.Certificate, ...], str]]]:
    now = pki.now
    root = root_of(pki)

    def not_yet_valid() -> tuple[tuple[x509.Certificate, ...], str]:
        leaf = make_cert(root, begin=now + DAY, end=now + 9 * DAY)
        return (leaf.cert,), "not valid before"

    def expired_intermediate() -> tuple[tuple[x509.Certificate, ...], str]:
        mid = make_cert(
            root, cn="old intermediate", names=(), begin=now - 9 * DAY, end=now - DAY, ca=True
        )
        leaf = make_cert(mid, begin=now - DAY, end=now + DAY)
        return (leaf.cert, mid.cert), "intermediate CA 'CN=old intermediate' expired"

    def expired_and_wrong_name() -> tuple[tuple[x509.Certificate, ...], str]:
        leaf = make_cert(root, names=("other.test",), begin=now - 9 * DAY, end=now - DAY)
        return (leaf.cert,), "expired at"

    return {
        "not_yet_valid": not_yet_valid,
        "expired_intermediate": expired_intermediate,
        "expired_wins_over_name_mismatch": expired_and_wrong_name,
    }


@pytest.mark.parametrize(
    "rule", ["not_yet_valid", "expired_intermediate", "expired_wins_over_name_mismatch"]
)
def test_certificate_outside_its_validity_period_is_expired(pki: LabPKI, rule: str) -> None:
    chain, detail_part = dated_rows(pki)[rule]()
    _, result_type, detail = verify(pki, chain)
    assert result_type is EXPIRED
    assert detail_part in detail


def test_untrusted_wins_over_expired_and_wrong_name(pki: LabPKI) -> None:
    # An attacker's certificate: self-signed, expired, for another name.
    forged = make_cert(None, names=("evil.test",), begin=pki.now - 9 * DAY, end=pki.now - DAY)
    _, result_type, detail = verify(pki, (forged.cert,))
    assert result_type is NOT
    assert "self-signed" in detail


def test_now_is_the_callers_clock(pki: LabPKI) -> None:
    identity = pki.issue(MX, CertKind.VALID)
    later = identity.leaf.not_valid_after_utc + DAY
    assert verify(pki, identity.chain)[0]
    assert verify(pki, identity.chain, when=later)[1] is EXPIRED


def test_empty_chain_is_a_validation_failure(pki: LabPKI) -> None:
    assert verify(pki, ())[1] is FAILURE


def test_naive_now_is_refused(pki: LabPKI) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_pkix(
            pki.issue(MX).chain, name=MX, roots=(pki.root_cert,), now=dt.datetime(2026, 1, 1)
        )


# --- trust store ----------------------------------------------------------------------------


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def test_ca_file_roots_are_added_to_the_system_bundle(pki: LabPKI) -> None:
    bundle = system_bundle()
    system = load_roots(None)
    both = load_roots(pki.ca_file)
    assert pki.root_cert in both
    assert len(both) == len(system) + 1
    # Tolerated when absent; when present, its roots are all there.
    assert (len(system) > 10) if bundle is not None else (system == ())


def test_system_bundle_can_be_left_out(pki: LabPKI) -> None:
    assert load_roots(pki.ca_file, system=False) == (pki.root_cert,)


def test_unparsable_blocks_are_skipped_and_duplicates_dropped(pki: LabPKI, tmp_path: Path) -> None:
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    ca_file = tmp_path / "mixed.pem"
    ca_file.write_bytes(broken + pem(pki.root_cert) + b"some text\n" + pem(pki.root_cert))
    assert load_roots(ca_file, system=False) == (pki.root_cert,)


CA_FILE_ERRORS = [
    ("missing_file", None, "cannot read CA file"),
    ("no_certificate_in_file", b"hello\n", "holds no usable certificate"),
]


@pytest.mark.parametrize(
    ("content", "message"), [r[1:] for r in CA_FILE_ERRORS], ids=[r[0] for r in CA_FILE_ERRORS]
)
def test_unusable_ca_file_is_an_error_naming_it(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_bytes(content)
    with pytest.raises(CaFileError, match=message) as info:
        load_roots(ca_file)
    assert str(ca_file) in str(info.value)


def test_lab_chain_verifies_against_system_bundle_plus_lab_ca(pki: LabPKI) -> None:
    roots = load_roots(pki.ca_file)
    verdict = verify_pkix(pki.issue(MX).chain, name=MX, roots=roots, now=pki.now)
    assert verdict.ok, verdict.detail


# --- only the roots OpenSSL could look up go into the store ---------------------------------


def _issued_by_name(
    root: Issuer, issuer_name: x509.Name, begin: dt.datetime, end: dt.datetime
) -> x509.Certificate:
    """A leaf signed by ``root``'s key whose issuer field is ``issuer_name`` as given."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(_name("leaf"))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(MX)]), False)
        .sign(root.key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("root_cn", "issuer_attribute", "same_name"),
    [
        ("Example Root CA", x509.NameAttribute(NameOID.COMMON_NAME, "Example Root CA"), True),
        # X509_NAME_cmp compares canonical forms: ASCII case, surrounding and repeated
        # whitespace and the string type do not count...
        (
            "  Example \t Root CA ",
            x509.NameAttribute(
                NameOID.COMMON_NAME, "EXAMPLE  ROOT ca", x509.name._ASN1Type.PrintableString
            ),
            True,
        ),
        ("Ünïcode Root", x509.NameAttribute(NameOID.COMMON_NAME, "Ünïcode   ROOT"), True),
        # ... but the case of letters beyond ASCII does.
        ("Ünïcode Root", x509.NameAttribute(NameOID.COMMON_NAME, "üNïcode Root"), False),
        ("Example Root CA", x509.NameAttribute(NameOID.COMMON_NAME, "Example Root CB"), False),
    ],
)
def test_the_filtered_store_finds_a_root_by_canonical_name(
    pki: LabPKI, root_cn: str, issuer_attribute: x509.NameAttribute, same_name: bool
) -> None:
    from mxguard.protocol import libcrypto, pkix

    begin, end = pki.now - DAY, pki.now + 30 * DAY
    root = make_cert(None, cn=root_cn, begin=begin, end=end, ca=True, names=())
    decoys = [
        make_cert(None, cn=f"decoy {i}", begin=begin, end=end, ca=True, names=()).cert
        for i in range(20)
    ]
    roots = (*decoys, root.cert)
    leaf = _issued_by_name(root, x509.Name([issuer_attribute]), begin, end)
    chosen = pkix.candidate_roots([leaf], roots)
    assert len(chosen) < len(roots)
    # OpenSSL over the whole store, and mxguard over the roots it chose, agree.
    full = libcrypto.verify(
        [pkix.der(leaf)], roots=[pkix.der(r) for r in roots], host=MX,
        hostflags=pkix.HOST_FLAGS, auth_level=1, at=int(pki.now.timestamp()),
    )  # fmt: skip
    verdict = verify_pkix((leaf,), name=MX, roots=roots, now=pki.now, auth_level=1)
    assert full.ok == same_name, full
    assert verdict.ok == same_name, verdict.detail
    if same_name:
        assert pkix.der(root.cert) in chosen


def test_the_filtered_store_follows_issuers_through_the_roots(pki: LabPKI) -> None:
    """A trust store may hold an intermediate and the root above it: both are kept."""
    from mxguard.protocol import pkix

    begin, end = pki.now - DAY, pki.now + 30 * DAY
    top = make_cert(None, cn="top root", begin=begin, end=end, ca=True, names=())
    middle = make_cert(top, cn="middle ca", begin=begin, end=end, ca=True, names=())
    unrelated = make_cert(None, cn="unrelated", begin=begin, end=end, ca=True, names=())
    leaf = make_cert(middle, begin=begin, end=end)
    roots = (unrelated.cert, middle.cert, top.cert)
    chosen = pkix.candidate_roots([leaf.cert], roots)
    assert set(chosen) == {pkix.der(middle.cert), pkix.der(top.cert)}
    assert pkix.candidate_roots([None], roots) == tuple(pkix.der(r) for r in roots)
    assert verify_pkix((leaf.cert,), name=MX, roots=roots, now=pki.now).ok


_OLD_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PIECES = st.sampled_from(
    [b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----", b"\n", b"\r", b"\r\n",
     b"MIIB", b"-", b"x"]
)  # fmt: skip


@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_pem_blocks_finds_what_the_pattern_found(data: bytes) -> None:
    from mxguard.protocol.pkix import pem_blocks

    assert pem_blocks(data) == _OLD_PEM_BLOCK.findall(data)


def test_pem_blocks_of_the_system_bundle() -> None:
    from mxguard.protocol.pkix import pem_blocks

    bundle = system_bundle()
    if bundle is None:
        pytest.skip("no system CA bundle")
    data = bundle.read_bytes()
    assert pem_blocks(data) == _OLD_PEM_BLOCK.findall(data)
    assert len(pem_blocks(data)) > 50
