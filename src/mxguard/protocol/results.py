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
    """One observed failure: its result type and a sentence for people saying what happened.

    ``dns_error``: a DNS lookup got no usable answer (a timeout, SERVFAIL without a DNSSEC
    reason, REFUSED). That is not a TLS failure and RFC 8460 §4.3 has no result type for it:
    ``validation-failure`` is the general *negotiation* failure (RFC 8460 §4.3.3), and no
    session, hence nothing to report, follows a lookup that failed. Such a failure reports no
    type (``reported_type`` is None, ``result_type`` null in JSON) and reads as its ``detail``
    alone; ``result_type`` keeps ``validation-failure`` only for code that needs some value.
    """

    result_type: ResultType
    detail: str
    dns_error: bool = False

    @classmethod
    def dns_lookup(cls, detail: str) -> Failure:
        """A DNS lookup that got no usable answer; ``detail`` says which lookup and why."""
        return cls(ResultType.VALIDATION_FAILURE, detail, dns_error=True)

    @property
    def reported_type(self) -> ResultType | None:
        """The RFC 8460 result type, or None for a failure that has none (``dns_error``)."""
        return None if self.dns_error else self.result_type

    def __str__(self) -> str:
        """The line for people: ``result-type: detail``, or what happened for a DNS error."""
        if self.dns_error:
            return self.detail
        return f"{self.result_type.value}: {self.detail}"

    def to_json(self) -> dict[str, str | None]:
        kind = self.reported_type
        return {"result_type": kind.value if kind else None, "detail": self.detail}
