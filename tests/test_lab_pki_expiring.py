"""The lab's ``expiring`` certificate: valid today, but only for another 10 days.

An audit (``mxguard check``) must warn about a certificate that expires within 21 days while
every verifier still accepts it; this certificate is what the lab presents for that case.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import CertKind
from mxguard.protocol.pkix import load_roots, verify_pkix
from mxguard.protocol.results import ResultType

HOST = "mx.expiring.test"
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


def test_expiring_certificate_is_valid_now_and_ends_in_ten_days(pki: LabPKI) -> None:
    identity = pki.issue(HOST, CertKind.EXPIRING)
    leaf = identity.leaf
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc < now < leaf.not_valid_after_utc
    assert abs(leaf.not_valid_after_utc - (now + 10 * DAY)) < dt.timedelta(hours=1)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    assert leaf.issuer == pki.root_cert.subject
    assert identity.chain == (leaf,)
    # The file a server loads holds the same certificate.
    assert x509.load_pem_x509_certificate(identity.cert_file.read_bytes()) == leaf


def test_expiring_certificate_passes_verification_until_it_expires(pki: LabPKI) -> None:
    chain = pki.issue(HOST, CertKind.EXPIRING).chain
    roots = load_roots(pki.ca_file, system=False)
    now = dt.datetime.now(dt.UTC)
    today = verify_pkix(chain, name=HOST, roots=roots, now=now)
    assert today.ok, today.detail
    assert today.result_type is None
    later = verify_pkix(chain, name=HOST, roots=roots, now=now + 11 * DAY)
    assert not later.ok
    assert later.result_type is ResultType.CERTIFICATE_EXPIRED


def test_expiring_is_a_scenario_certificate_kind() -> None:
    assert CertKind("expiring") is CertKind.EXPIRING
