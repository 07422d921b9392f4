"""DANE for SMTP: TLSA records and certificate matching (RFC 7672, RFC 7671, RFC 6698).

Placeholder module: the association-data computation below is used by the lab to publish
TLSA records; parsing, usability and chain matching are added alongside it.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def association_data(cert: x509.Certificate, selector: int, matching_type: int) -> bytes:
    """The TLSA certificate-association data for ``cert`` (RFC 6698 §2.1.2, §2.1.3)."""
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    elif selector == 1:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        raise ValueError(f"unknown TLSA selector {selector}")
    if matching_type == 0:
        return data
    if matching_type == 1:
        return hashlib.sha256(data).digest()
    if matching_type == 2:
        return hashlib.sha512(data).digest()
    raise ValueError(f"unknown TLSA matching type {matching_type}")
