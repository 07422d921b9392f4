"""Chains an attacker crafts to stall or crash the verifiers are refused, not followed.

Certificates that share one subject and key each verify as the issuer of every other, so a
search over orderings of N of them takes N! signature checks; a malformed extension makes
cryptography raise when it is first read. Both must come back as a failed verification.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mxguard.protocol import certpath, dane, pkix

NOW = dt.datetime.now(dt.UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
EVIL = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Evil CA")])


def evil_ca(serial: int) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(EVIL).issuer_name(EVIL).public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(KEY, hashes.SHA256())
    )  # fmt: skip


def leaf(issuer: x509.Name = EVIL) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(issuer).public_key(key.public_key()).serial_number(999)
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=9))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.test")]), False)
        .sign(KEY, hashes.SHA256())
    )  # fmt: skip


BOMB = [leaf(), *(evil_ca(i) for i in range(1, 13))]  # 12! orderings to a naive search


def test_a_same_key_ca_swarm_is_refused_by_dane_ta() -> None:
    record = dane.Tlsa(2, 1, 1, hashlib.sha256(b"some other CA key").digest())
    verdict = dane.verify_chain([record], BOMB, names=["mx.example.test"], now=NOW)
    assert (verdict.ok, verdict.result_type) == (False, "validation-failure")
    assert f"more than {certpath.MAX_SIGNATURE_CHECKS} signature checks" in verdict.detail


def test_a_same_key_ca_swarm_is_refused_by_webpki() -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    trusted = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Real Root")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Real Root")]))
        .public_key(other_key.public_key()).serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(other_key, hashes.SHA256())
    )  # fmt: skip
    # WebPKI is OpenSSL's X509_verify_cert, whose chain building is linear: it takes the
    # first self-signed "issuer" it meets, finds it untrusted and stops. Without that bound
    # this test would not finish.
    verdict = pkix.verify_pkix(BOMB, name="mx.example.test", roots=[trusted], now=NOW)
    assert (verdict.ok, verdict.result_type) == (False, "certificate-not-trusted")
    assert "'CN=Evil CA', which is not a trusted root" in verdict.detail


def test_the_budget_counts_only_signature_checks() -> None:
    budget = certpath.Budget(2)
    other = leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Someone else")]))
    for _ in range(10):  # name mismatches are free
        assert not certpath.issued_by(other, BOMB[1], budget)
    assert certpath.issued_by(BOMB[0], BOMB[1], budget)
    assert certpath.issued_by(BOMB[0], BOMB[2], budget)
    with pytest.raises(certpath.ChainTooComplex):
        certpath.issued_by(BOMB[0], BOMB[3], budget)


def test_a_malformed_extension_in_a_presented_ca_is_a_failure_not_a_crash() -> None:
    bad_san = x509.UnrecognizedExtension(
        x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x82\x05x"
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(EVIL).issuer_name(EVIL).public_key(KEY.public_key()).serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=9))
        .add_extension(bad_san, critical=False)
        .sign(KEY, hashes.SHA256())
    )  # fmt: skip
    record = dane.Tlsa(2, 1, 1, hashlib.sha256(b"the domain's real trust anchor").digest())
    verdict = dane.verify_chain([record], [leaf(), ca], names=["mx.example.test"], now=NOW)
    assert (verdict.ok, verdict.result_type) == (False, "validation-failure")
    # OpenSSL cannot use a CA whose extensions do not parse as anyone's issuer, so the leaf
    # has no trusted issuer (`openssl verify` says the same: error 20).
    pk = pkix.verify_pkix([leaf(), ca], name="mx.example.test", roots=[ca], now=NOW)
    assert (pk.ok, pk.result_type) == (False, "certificate-not-trusted")
