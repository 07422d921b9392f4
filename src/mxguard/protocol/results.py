"""The one failure vocabulary of mxguard: the TLS-RPT result types (RFC 8460 §4.3).

Every failure that mxguard observes — while resolving a policy, while delivering, in the
Postfix policy server — is named with one of these values, so that results, logs, reports,
metrics and command-line output all say the same thing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ResultType(enum.StrEnum):
    """RFC 8460 §4.3 result types. The value is the wire spelling used in reports."""

    # §4.3.1 Negotiation failures
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    # §4.3.2 Policy failures: DANE
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    # §4.3.2 Policy failures: MTA-STS
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"

    @property
    def is_sts_policy_failure(self) -> bool:
        """RFC 8460 §4.3.2.2: an MTA-STS policy failure (discovery, fetch, body, certificate of
        the policy host), as opposed to a negotiation failure or a DANE policy failure."""
        return self in _STS_POLICY_FAILURES


_STS_POLICY_FAILURES = frozenset(
    {
        ResultType.STS_POLICY_FETCH_ERROR,
        ResultType.STS_POLICY_INVALID,
        ResultType.STS_WEBPKI_INVALID,
    }
)


@dataclass(frozen=True, slots=True)
class Failure:
    """One observed failure: its result type and a sentence for people saying what happened."""

    result_type: ResultType
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"result_type": self.result_type.value, "detail": self.detail}
