"""DANE for SMTP: TLSA records and certificate matching (RFC 7672, RFC 7671, RFC 6698).

A receiving domain pins the certificate (or the issuing CA) of each MX host in a TLSA RRset at
``_25._tcp.<mxhost>``, signed with DNSSEC. This module parses those records, decides which of
them an SMTP client may use (RFC 7672 §3.1), and checks the certificate chain that a server
presented against them (RFC 7672 §3.1.1-§3.2, RFC 7671 §5). It is pure: no sockets, no
clock (the caller passes ``now``), no DNS. Whether the RRset was DNSSEC-secure is the DNS
adapter's business; everything here assumes it was. Reference names are matched against the
certificate's names by ``names.identifier_matches`` (RFC 6125 §6.4, IDNA 2008).

Failures are named with the RFC 8460 result types (``ResultType``) so that deliveries,
reports and the CLI speak one vocabulary.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mxguard.protocol.names import identifier_matches
from mxguard.protocol.results import ResultType

if TYPE_CHECKING:
    # The TLSA model (parse, classify) needs no certificate code: the resolver, and with it
    # serve postfix and policy, use it alone. What checks certificates imports cryptography
    # (and certpath, which is built on it) where it runs.
    from cryptography import x509

    from mxguard.protocol import certpath

# RFC 6698 §2.1.1 / RFC 7218 §2: certificate usages, selectors and matching types.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2

_USAGE_NAMES = {"PKIX-TA": 0, "PKIX-EE": 1, "DANE-TA": 2, "DANE-EE": 3, "PRIVCERT": 255}
_SELECTOR_NAMES = {"CERT": 0, "SPKI": 1, "PRIVSEL": 255}
_MATCHING_NAMES = {"FULL": 0, "SHA2-256": 1, "SHA2-512": 2, "PRIVMATCH": 255}
_DIGEST_LENGTHS = {MATCH_SHA256: 32, MATCH_SHA512: 64}

# Untrusted text is bounded: the TLSA RDATA is at most 65535 octets on the wire (RFC 1035
# §3.2.1), so its presentation form (2 hex digits per octet, plus spaces) is bounded too.
_MAX_TEXT = 4 * 65535
_NUMBER = re.compile(r"[0-9]{1,3}")
_HEX = re.compile(r"[0-9A-Fa-f]+")
# A server chain longer than this is not a chain anyone deploys; it bounds path building.
_MAX_CHAIN_DEPTH = 10

_ISO = "%Y-%m-%dT%H:%M:%SZ"

Method = Literal["dane-ee", "dane-ta"]


class TlsaError(ValueError):
    """A TLSA record in presentation form is malformed (RFC 6698 §2.2); the message says how."""


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type and association data."""

    usage: int
    selector: int
    matching_type: int
    data: bytes

    def to_text(self) -> str:
        """RFC 6698 §2.2 presentation form: ``"U S M HEX"``, hex in lower case, no spaces."""
        return f"{self.usage} {self.selector} {self.matching_type} {self.data.hex()}"

    def __str__(self) -> str:
        return self.to_text()


def _field(token: str, names: dict[str, int], what: str) -> int:
    # RFC 7218 §2 acronyms (e.g. "DANE-EE") are accepted alongside the numbers.
    named = names.get(token.upper())
    if named is not None:
        return named
    # Only ASCII digits: int() alone would also accept "٣" or "1_0".
    if not _NUMBER.fullmatch(token) or int(token) > 255:
        raise TlsaError(
            f"TLSA {what} {token!r} is not a number from 0 to 255 "
            f"(or one of {', '.join(sorted(names))})"
        )
    return int(token)


def parse_tlsa(text: str) -> Tlsa:
    """Parse ``"usage selector matching-type hex"`` (RFC 6698 §2.2).

    The hex data may contain whitespace, as in zone files. Raises ``TlsaError`` naming the
    field that is wrong.
    """
    if len(text) > _MAX_TEXT:
        raise TlsaError(f"TLSA record text is {len(text)} characters long; at most {_MAX_TEXT}")
    tokens = text.split()
    if len(tokens) < 4:
        raise TlsaError(
            f"TLSA record {text.strip()!r} has {len(tokens)} fields; expected "
            "'usage selector matching-type hex-data', e.g. '3 1 1 0a1b…'"
        )
    usage = _field(tokens[0], _USAGE_NAMES, "certificate usage")
    selector = _field(tokens[1], _SELECTOR_NAMES, "selector")
    matching_type = _field(tokens[2], _MATCHING_NAMES, "matching type")
    hex_data = "".join(tokens[3:])
    if not _HEX.fullmatch(hex_data):
        raise TlsaError("TLSA association data must be hexadecimal digits only")
    if len(hex_data) % 2:
        raise TlsaError(
            f"TLSA association data has an odd number of hex digits ({len(hex_data)}); "
            "each octet needs two"
        )
    return Tlsa(usage, selector, matching_type, bytes.fromhex(hex_data))


def from_rdata(rdata: Any) -> Tlsa:
    """A ``Tlsa`` from a dnspython TLSA rdata (``dns.rdtypes.ANY.TLSA.TLSA``)."""
    # dnspython names the fields usage, selector, mtype and cert.
    return Tlsa(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))


def usable(record: Tlsa) -> str | None:
    """None if an SMTP client may use ``record``; otherwise why it may not.

    RFC 7672 §3.1: only DANE-TA(2) and DANE-EE(3) are usable for SMTP; records with an
    unknown selector or matching type, or data that cannot be what they claim, are
    "unusable" and are skipped while the rest of the RRset still counts.
    """
    if record.usage in (PKIX_TA, PKIX_EE):
        # RFC 7672 §3.1.3: there is no agreed set of WebPKI trust anchors for SMTP.
        name = "PKIX-TA" if record.usage == PKIX_TA else "PKIX-EE"
        return (
            f"certificate usage {record.usage} ({name}) is not usable for SMTP "
            "(RFC 7672 §3.1.3); use 2 (DANE-TA) or 3 (DANE-EE)"
        )
    if record.usage not in (DANE_TA, DANE_EE):
        return f"unknown certificate usage {record.usage}; SMTP uses 2 (DANE-TA) or 3 (DANE-EE)"
    if record.selector not in (SELECTOR_CERT, SELECTOR_SPKI):
        return f"unknown selector {record.selector}; expected 0 (Cert) or 1 (SPKI)"
    if record.matching_type not in (MATCH_FULL, MATCH_SHA256, MATCH_SHA512):
        return (
            f"unknown matching type {record.matching_type}; "
            "expected 0 (Full), 1 (SHA2-256) or 2 (SHA2-512)"
        )
    expected = _DIGEST_LENGTHS.get(record.matching_type)
    if expected is not None and len(record.data) != expected:
        return (
            f"matching type {record.matching_type} needs a {expected}-octet digest, "
            f"got {len(record.data)} octets"
        )
    if record.matching_type == MATCH_FULL:
        # RFC 6698 §2.1.3: Full(0) carries the whole certificate or SubjectPublicKeyInfo;
        # data that does not parse as one can never match (RFC 7672 §3.1: unusable).
        if record.selector == SELECTOR_CERT and _full_certificate(record) is None:
            return "selector 0 with matching type 0 needs a DER certificate; the data is not one"
        if record.selector == SELECTOR_SPKI and _full_key(record) is None:
            return (
                "selector 1 with matching type 0 needs a DER SubjectPublicKeyInfo; "
                "the data is not one"
            )
    return None


def _full_certificate(record: Tlsa) -> x509.Certificate | None:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        cert = x509.load_der_x509_certificate(record.data)
        cert.public_key()  # a certificate whose key cannot be read cannot anchor anything
    except (ValueError, UnsupportedAlgorithm):
        return None
    return cert


def _full_key(record: Tlsa) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_der_public_key(record.data)
    except (ValueError, UnsupportedAlgorithm):
        return None


@dataclass(frozen=True, slots=True)
class UnusableTlsa:
    """A record the SMTP client skipped, and why (RFC 7672 §3.1)."""

    record: Tlsa
    reason: str


@dataclass(frozen=True, slots=True)
class TlsaSet:
    """A DNSSEC-secure TLSA RRset sorted into usable and unusable records.

    ``tls_required``: any record at all was published (RFC 7672 §2.2: a secure, non-empty
    TLSA RRset means the server supports TLS, so STARTTLS is mandatory).
    ``authenticated``: at least one record is usable, so the server must also authenticate
    via DANE (RFC 7672 §3.1). With only unusable records TLS is still mandatory but no
    authentication applies (Postfix's ``encrypt`` level).
    """

    usable: tuple[Tlsa, ...]
    unusable: tuple[UnusableTlsa, ...]

    @property
    def tls_required(self) -> bool:
        return bool(self.usable or self.unusable)

    @property
    def authenticated(self) -> bool:
        return bool(self.usable)


def classify(records: Iterable[Tlsa]) -> TlsaSet:
    """Sort a (DNSSEC-secure) TLSA RRset into usable and unusable records (RFC 7672 §3.1)."""
    good: list[Tlsa] = []
    bad: list[UnusableTlsa] = []
    for record in records:
        reason = usable(record)
        if reason is None:
            good.append(record)
        else:
            bad.append(UnusableTlsa(record, reason))
    return TlsaSet(tuple(good), tuple(bad))


@dataclass(frozen=True, slots=True)
class DaneVerdict:
    """The outcome of matching a presented chain against a TLSA RRset.

    ``ok`` with ``method`` and the ``matched`` record on success; otherwise the RFC 8460
    ``result_type`` and a ``detail`` sentence for people.
    """

    ok: bool
    method: Method | None
    matched: Tlsa | None
    result_type: ResultType | None
    detail: str


def _matches(record: Tlsa, cert: x509.Certificate) -> bool:
    # RFC 6698 §2.1.2-§2.1.3: select the certificate or its SPKI, then compare it exactly
    # or by digest.
    return association_data(cert, record.selector, record.matching_type) == record.data


def association_data(cert: x509.Certificate, selector: int, matching_type: int) -> bytes:
    """The TLSA certificate-association data for ``cert`` (RFC 6698 §2.1.2, §2.1.3)."""
    from cryptography.hazmat.primitives import serialization

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


# --- certificate path checks for DANE-TA (RFC 7671 §5.2, RFC 5280 §6.1 in essence) ---------


def _may_issue(issuer: x509.Certificate, intermediates_below: int) -> str | None:
    """None if ``issuer`` may sign certificates at this depth, else why not (RFC 5280 §4.2.1)."""
    from cryptography import x509

    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    # RFC 5280 §4.2.1.9: only a certificate with cA=TRUE may issue certificates.
    if bc is None or not bc.ca:
        return f"'{_subject(issuer)}' signed a certificate but is not a CA (basic constraints)"
    if bc.path_length is not None and intermediates_below > bc.path_length:
        return (
            f"'{_subject(issuer)}' allows {bc.path_length} intermediate CA(s) below it, "
            f"the chain has {intermediates_below}"
        )
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    # RFC 5280 §4.2.1.3: when key usage is present, keyCertSign must be set on an issuer.
    if not ku.key_cert_sign:
        return f"'{_subject(issuer)}' signed a certificate but its key usage lacks keyCertSign"
    return None


def _signed_by_key(cert: x509.Certificate, key: Any) -> bool:
    """Whether ``key`` made ``cert``'s signature: for a bare trust-anchor key (``2 1 0``)."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    params = cert.signature_algorithm_parameters
    try:
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            key.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif (
            isinstance(key, rsa.RSAPublicKey)
            and isinstance(params, padding.PSS | padding.PKCS1v15)
            and cert.signature_hash_algorithm is not None
        ):
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, params, cert.signature_hash_algorithm
            )
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Path:
    """Leaf first; ``anchor`` is the certificate carried in DNS when it is not in ``certs``."""

    certs: tuple[x509.Certificate, ...]
    anchor_cert: x509.Certificate | None = None


@dataclass(frozen=True, slots=True)
class _Failure:
    stage: int  # how far the check got: a later stage says more about what went wrong
    result_type: ResultType
    detail: str


_NO_MATCH, _CHAIN, _DATES, _NAME = 0, 1, 2, 3


def _ta_paths(
    record: Tlsa, chain: Sequence[x509.Certificate], budget: certpath.Budget
) -> Iterator[_Path | _Failure]:
    """Every path from the leaf up to a trust anchor that ``record`` designates.

    RFC 7671 §5.2: a DANE-TA record designates an issuing CA; the server is expected to send
    it in its chain, except that a record carrying the full key or certificate
    (matching type 0) can stand in for it. Paths use only presented certificates, each
    signed by the next one (RFC 7672 §3.1.2).
    """
    leaf = chain[0]
    from mxguard.protocol import certpath

    # Untrusted input is bounded: at most this many presented issuers are considered.
    pool = list(chain[1 : 2 * _MAX_CHAIN_DEPTH])
    dns_key = _full_key(record) if (record.selector, record.matching_type) == (1, 0) else None
    dns_cert = (
        _full_certificate(record) if (record.selector, record.matching_type) == (0, 0) else None
    )

    def walk(path: tuple[x509.Certificate, ...]) -> Iterator[_Path | _Failure]:
        top = path[-1]
        # The trust anchor is an issuer: the leaf itself is pinned with DANE-EE, not DANE-TA.
        if len(path) > 1 and _matches(record, top):
            yield _Path(path)
            return
        if dns_key is not None and _signed_by_key(top, dns_key):
            yield _Path(path)
        if dns_cert is not None and certpath.issued_by(top, dns_cert, budget):
            reason = _may_issue(dns_cert, len(path) - 1)
            if reason is None:
                yield _Path(path, anchor_cert=dns_cert)
            else:
                yield _Failure(_CHAIN, ResultType.VALIDATION_FAILURE, reason)
        if len(path) >= _MAX_CHAIN_DEPTH:
            return
        for candidate in pool:
            if any(candidate is seen for seen in path) or not certpath.issued_by(
                top, candidate, budget
            ):
                continue
            reason = _may_issue(candidate, len(path) - 1)
            if reason is not None:
                yield _Failure(_CHAIN, ResultType.VALIDATION_FAILURE, reason)
                continue
            yield from walk((*path, candidate))

    yield from walk((leaf,))


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _dates_failure(
    certs: Sequence[x509.Certificate], now: dt.datetime
) -> tuple[ResultType, str] | None:
    for cert in certs:
        begin, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now > end:
            return ResultType.CERTIFICATE_EXPIRED, f"'{_subject(cert)}' expired at {end:{_ISO}}"
        if now < begin:
            # RFC 8460 §4.3.1 has no "not yet valid"; "certificate-expired" would mislead.
            return (
                ResultType.VALIDATION_FAILURE,
                f"'{_subject(cert)}' is not valid before {begin:{_ISO}}",
            )
    return None


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is valid for: SAN dNSNames, else its CN (RFC 6125 §6.4.4)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    if dns_names:
        return dns_names
    # RFC 6125 §6.4.4: the CN counts only when there is no subjectAltName DNS-ID.
    return tuple(
        str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    )


def _name_failure(leaf: x509.Certificate, names: Sequence[str]) -> str | None:
    presented = certificate_names(leaf)
    # RFC 7672 §3.2.3 via RFC 6125 §6.4: A-labels, case-insensitive, a wildcard for one whole
    # left-most label (and never directly above a top-level label).
    if any(identifier_matches(p, n) for p in presented for n in names):
        return None
    return (
        f"certificate is for {', '.join(presented) or 'no DNS name'}, "
        f"not for {' or '.join(names) or 'any reference name (none given)'}"
    )


def _verify_ta(
    record: Tlsa,
    chain: Sequence[x509.Certificate],
    names: Sequence[str],
    now: dt.datetime,
    budget: certpath.Budget,
) -> _Failure | None:
    """None if ``record`` (DANE-TA) authenticates ``chain``, else the furthest failure."""
    best = _Failure(
        _NO_MATCH, ResultType.VALIDATION_FAILURE, "matches no issuer in the presented chain"
    )
    for found in _ta_paths(record, chain, budget):
        if isinstance(found, _Failure):
            failure = found
        else:
            certs = list(found.certs)
            if found.anchor_cert is not None:
                certs.append(found.anchor_cert)
            # RFC 7672 §3.1.2: with DANE-TA the usual checks apply: every certificate from
            # the leaf up to the anchor must be within its validity period ...
            date_problem = _dates_failure(certs, now)
            # ... and the leaf must carry a reference identifier (RFC 7672 §3.2.2).
            name_problem = _name_failure(chain[0], names)
            if date_problem is not None:
                failure = _Failure(_DATES, *date_problem)
            elif name_problem is not None:
                failure = _Failure(_NAME, ResultType.CERTIFICATE_HOST_MISMATCH, name_problem)
            else:
                return None
        if failure.stage > best.stage:
            best = failure
    if best.stage == _NO_MATCH and len(chain) == 1 and record.matching_type != MATCH_FULL:
        best = _Failure(
            _NO_MATCH,
            ResultType.VALIDATION_FAILURE,
            "names a trust anchor, but the server sent only its own certificate "
            "(RFC 7671 §5.2.2: a DANE-TA server must send the trust anchor in its chain)",
        )
    return best


def verify_chain(
    records: Iterable[Tlsa],
    chain: Sequence[x509.Certificate],
    *,
    names: Sequence[str],
    now: dt.datetime,
) -> DaneVerdict:
    """Check the chain a server presented (leaf first) against its TLSA RRset.

    ``names`` are the reference identifiers for DANE-TA (RFC 7672 §3.2.2: the TLSA base
    domain, i.e. the MX host name, and optionally the name before CNAME expansion).
    ``now`` must be timezone-aware. Success if any usable record succeeds.
    """
    if now.tzinfo is None:
        raise ValueError("verify_chain needs a timezone-aware 'now', e.g. datetime.now(UTC)")
    from cryptography.exceptions import UnsupportedAlgorithm

    from mxguard.protocol import certpath

    try:
        return _verify_chain(records, chain, names=names, now=now, budget=certpath.Budget())
    except certpath.ChainTooComplex as exc:
        return DaneVerdict(False, None, None, ResultType.VALIDATION_FAILURE, str(exc))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography parses extensions and keys lazily: a malformed certificate in the
        # presented chain surfaces here, and is the server's failure, never ours.
        return DaneVerdict(
            False, None, None, ResultType.VALIDATION_FAILURE,
            f"a presented certificate is malformed: {exc}",
        )  # fmt: skip


def _verify_chain(
    records: Iterable[Tlsa],
    chain: Sequence[x509.Certificate],
    *,
    names: Sequence[str],
    now: dt.datetime,
    budget: certpath.Budget,
) -> DaneVerdict:
    tlsa_set = classify(records)
    if not tlsa_set.usable:
        # RFC 8460 §4.3.2.1: "tlsa-invalid" is the TLSA RRset itself being unusable, which
        # is what a set without a single usable record is. "validation-failure" would blame
        # the server's certificate, which no record here could have judged.
        reasons = "; ".join(f"{u.record}: {u.reason}" for u in tlsa_set.unusable)
        return DaneVerdict(
            False,
            None,
            None,
            ResultType.TLSA_INVALID,
            f"no usable TLSA record ({reasons or 'the RRset is empty'})",
        )
    if not chain:
        return DaneVerdict(
            False, None, None, ResultType.VALIDATION_FAILURE, "the server sent no certificate"
        )
    leaf = chain[0]
    best: tuple[_Failure, Tlsa] | None = None
    for record in tlsa_set.usable:
        if record.usage == DANE_EE:
            # RFC 7672 §3.1.1 / RFC 7671 §5.1: DANE-EE pins the leaf; names and validity
            # dates are not checked, the key binding is all that counts.
            if _matches(record, leaf):
                return DaneVerdict(
                    True, "dane-ee", record, None, f"leaf certificate matches {record}"
                )
            failure = _Failure(
                _NO_MATCH, ResultType.VALIDATION_FAILURE, "does not match the leaf certificate"
            )
        else:
            found = _verify_ta(record, chain, names, now, budget)
            if found is None:
                return DaneVerdict(
                    True,
                    "dane-ta",
                    record,
                    None,
                    f"chain leads to the trust anchor of {record}; "
                    f"leaf valid for {', '.join(names)}",
                )
            failure = found
        if best is None or failure.stage > best[0].stage:
            best = (failure, record)
    assert best is not None  # at least one usable record was tried
    failure, record = best
    if failure.stage == _NO_MATCH and len(tlsa_set.usable) > 1:
        tried = ", ".join(str(r) for r in tlsa_set.usable)
        return DaneVerdict(
            False,
            None,
            None,
            failure.result_type,
            f"no usable TLSA record matches the presented chain (tried {tried})",
        )
    # ``matched`` stays None: no record authenticated the server; the detail names the
    # record that came closest.
    return DaneVerdict(False, None, None, failure.result_type, f"{record}: {failure.detail}")
