"""Issuer checks for the DANE-TA path search (RFC 7672 §3.2.2; RFC 5280 §6.1, in essence).

A presented chain is the peer's to choose, and an attacker on the path is a peer: a handful of
CA certificates that share one subject and key each "issue" every other, and a naive search
over orderings grows factorially. Every verification therefore gets a ``Budget`` of signature
checks; past it the chain is refused with ``ChainTooComplex``.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

MAX_SIGNATURE_CHECKS = 64


class ChainTooComplex(Exception):
    """The presented chain needs more signature checks than its budget allows."""


class Budget:
    """Signature checks one verification may still spend."""

    def __init__(self, checks: int = MAX_SIGNATURE_CHECKS) -> None:
        self.limit = checks
        self.left = checks

    def spend(self) -> None:
        if self.left <= 0:
            raise ChainTooComplex(
                f"the presented chain needs more than {self.limit} signature checks to search "
                "(refused: a chain crafted to stall the verifier)"
            )
        self.left -= 1


def issued_by(cert: x509.Certificate, issuer: x509.Certificate, budget: Budget) -> bool:
    """Whether ``issuer``'s name and key made ``cert`` (RSA, ECDSA, Ed25519, Ed448)."""
    if cert.issuer != issuer.subject:
        return False  # a name comparison: free, and it rules out nearly every pair
    budget.spend()
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True
