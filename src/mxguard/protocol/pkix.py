"""WebPKI verification of a certificate chain presented by an MX host (RFC 8461 §4.2).

An MTA-STS policy in force demands that the MX host presents a certificate that chains to a
trusted root, is valid now and is valid for the MX host name. Which chains pass is decided by
OpenSSL's ``X509_verify_cert`` (``libcrypto``), the verifier of Postfix, of Exim built with
OpenSSL and of our own policy fetch: a chain they accept, mxguard accepts, and the other way
round. Two rules of RFC 8461 are stricter than OpenSSL's defaults and are set as host-check
flags: the name must be a subjectAltName dNSName (no fallback to the subject CN), and a
wildcard stands for one whole left-most label (RFC 8461 §4.2, via RFC 6125 §6.4.3).

OpenSSL reports every problem with a chain (see ``libcrypto``); the RFC 8460 §4.3.1 result
type is chosen from them in this order of precedence:

1. no path from the leaf to a trusted root (self-signed, unknown CA) -> ``certificate-not-trusted``
   (first, because the dates and names of an untrusted certificate are claims of an unknown
   party: an attacker's certificate is "not trusted", whatever else is wrong with it);
2. a certificate on the path outside its validity period -> ``certificate-expired``;
3. the leaf is not valid for the host -> ``certificate-host-mismatch``;
4. anything else (weak keys or digests, CA flags, key usage, path length, name constraints,
   bad signatures, malformed certificates) -> ``validation-failure``.

The security level that sets the weakest key and digest accepted is the system's default for
TLS clients (Debian: 2, i.e. RSA of 2048 bits, no SHA-1), the level the policy fetch and Postfix
run at. Pure: no sockets, no clock (pass ``now``). ``load_roots`` gives the trusted roots as
certificates; the files they come from are read by ``roots``, which the policy fetch uses
without this module (and without cryptography).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from mxguard.protocol import libcrypto
from mxguard.protocol.names import HostNameError, normalise_host
from mxguard.protocol.results import ResultType

# The trust store's files are read by ``roots``, which needs no cryptography (the policy
# fetch uses it alone); its names stay importable from here for the callers of pkix.
from mxguard.protocol.roots import (
    FALLBACK_BUNDLE,
    CaFileError,
    load_ders,
    pem_blocks,
    pem_certificates,
    system_bundle,
)
from mxguard.protocol.webpki import HOST_FLAGS, default_auth_level, reachable_roots

_ISO = "%Y-%m-%dT%H:%M:%SZ"


_NOT_TRUSTED = frozenset(
    {
        libcrypto.UNABLE_TO_GET_ISSUER_CERT,
        libcrypto.DEPTH_ZERO_SELF_SIGNED_CERT,
        libcrypto.SELF_SIGNED_CERT_IN_CHAIN,
        libcrypto.UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        libcrypto.UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        libcrypto.CERT_UNTRUSTED,
        libcrypto.CERT_REJECTED,
    }
)
_NO_ISSUER = frozenset(
    {libcrypto.UNABLE_TO_GET_ISSUER_CERT_LOCALLY, libcrypto.UNABLE_TO_GET_ISSUER_CERT}
)
_EXPIRED = frozenset({libcrypto.CERT_NOT_YET_VALID, libcrypto.CERT_HAS_EXPIRED})


@dataclass(frozen=True, slots=True)
class PkixVerdict:
    """The outcome of WebPKI verification.

    ``ok`` with ``path`` (leaf first, ending at the trusted root) on success; otherwise the
    RFC 8460 ``result_type`` and a ``detail`` sentence for people. ``problems`` lists every
    problem OpenSSL found, one sentence each (``detail`` describes the one that decided the
    result type), and ``codes`` their OpenSSL ``X509_V_ERR_*`` numbers, in the same order.
    """

    ok: bool
    result_type: ResultType | None
    detail: str
    path: tuple[x509.Certificate, ...] = ()
    problems: tuple[str, ...] = ()
    codes: tuple[int, ...] = ()


def _fail(result_type: ResultType, detail: str) -> PkixVerdict:
    return PkixVerdict(False, result_type, detail, problems=(detail,))


def der(cert: x509.Certificate) -> bytes:
    """The DER encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.DER)


def _parse(der: bytes) -> x509.Certificate | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _subject(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "(unreadable certificate)"
    try:
        return cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        return "(unreadable subject)"


def reference_name(name: str) -> str | None:
    """The name RFC 8461 §4.2 compares (``names.normalise_host``: lower-case A-labels, IDNA
    2008, no trailing dot); None if it is not a host name."""
    try:
        return normalise_host(name)
    except HostNameError:
        return None


def dns_names(cert: x509.Certificate | None) -> tuple[str, ...]:
    """The subjectAltName dNSNames of ``cert``: the only names RFC 8461 §4.2 lets count."""
    if cert is None:
        return ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def _describe(
    error: libcrypto.VerifyError,
    *,
    reference: str,
    chain_len: int,
    have_roots: bool,
    presented: Sequence[x509.Certificate | None],
) -> str:
    leaf = presented[0]
    cert = _parse(error.cert_der) if error.cert_der else leaf if error.depth == 0 else None
    if error.depth == 0:
        what = "certificate"
    elif error.depth >= chain_len - 1 and error.code not in _NOT_TRUSTED:
        what = "root CA"
    else:
        what = "intermediate CA"
    code = error.code
    if code in _NOT_TRUSTED:
        if not have_roots:
            why = "no trusted root certificates are configured"
        elif code == libcrypto.DEPTH_ZERO_SELF_SIGNED_CERT:
            why = "it is self-signed"
        elif code == libcrypto.SELF_SIGNED_CERT_IN_CHAIN:
            why = f"it ends in the self-signed '{_subject(cert)}', which is not a trusted root"
        elif code in _NO_ISSUER and cert is not None:
            issuer = cert.issuer.rfc4514_string()
            if any(p is not None and p.subject == cert.issuer for p in presented):
                why = (
                    f"the certificate named '{issuer}' was sent but did not issue it "
                    "(its key identifier or signature does not match)"
                )
            else:
                why = f"its issuer '{issuer}' is not a trusted CA"
        else:
            why = error.message
        return f"certificate '{_subject(leaf)}' does not chain to a trusted root: {why}"
    if code in _EXPIRED and cert is not None:
        if code == libcrypto.CERT_HAS_EXPIRED:
            return f"{what} '{_subject(cert)}' expired at {cert.not_valid_after_utc:{_ISO}}"
        return f"{what} '{_subject(cert)}' is not valid before {cert.not_valid_before_utc:{_ISO}}"
    if code == libcrypto.HOSTNAME_MISMATCH:
        names = dns_names(leaf)
        text = f"certificate is valid for {', '.join(names) or 'no DNS name'}, not for {reference}"
        if not names:
            text += " (RFC 8461 §4.2: only subjectAltName DNS names count, not the subject CN)"
        return text
    return f"{what} '{_subject(cert)}': {error.message} (OpenSSL verify error {code})"


def _result_type(code: int) -> ResultType:
    if code in _NOT_TRUSTED:
        return ResultType.CERTIFICATE_NOT_TRUSTED
    if code in _EXPIRED:
        return ResultType.CERTIFICATE_EXPIRED
    if code == libcrypto.HOSTNAME_MISMATCH:
        return ResultType.CERTIFICATE_HOST_MISMATCH
    return ResultType.VALIDATION_FAILURE


_PRECEDENCE = (
    ResultType.CERTIFICATE_NOT_TRUSTED,
    ResultType.CERTIFICATE_EXPIRED,
    ResultType.CERTIFICATE_HOST_MISMATCH,
    ResultType.VALIDATION_FAILURE,
)


# --- Which roots OpenSSL could use for a chain -------------------------------------------
#
# OpenSSL finds a certificate's issuer in the trust store by name: it compares the canonical
# form of the issuer name with the canonical form of each stored certificate's subject
# (X509_NAME_cmp), and it looks up each chain certificate's own subject the same way to see
# whether it is trusted itself. A store holding only the roots whose subject could match such a
# name therefore verifies exactly as the whole store does, and building it costs a few
# certificates rather than the whole system bundle (146 here: 45 ms for every `mxguard send`).
#
# The key below is never finer than OpenSSL's canonical form (names OpenSSL calls equal get
# equal keys): each attribute value with ASCII whitespace stripped at both ends and collapsed
# inside, ASCII letters lower-cased, whatever the string type; a multi-valued RDN as a set. A
# name whose key cannot be computed matches everything (a root) or turns filtering off (a chain
# certificate): filtering may keep a root that cannot help, never drop one that could.

_NameKey = tuple[frozenset[tuple[str, object]], ...]
_ASCII_SPACE = re.compile("[ \t\n\v\f\r]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _canonical_value(value: object) -> object:
    if isinstance(value, str):
        return _ASCII_SPACE.sub(" ", value).strip(" ").translate(_ASCII_LOWER)
    return value


def _name_key(cert: x509.Certificate | None, which: str) -> _NameKey | None:
    """The key of ``cert``'s ``subject`` or ``issuer``; None when it cannot be read (the
    certificate is parsed lazily: a malformed name raises only when it is looked at)."""
    if cert is None:
        return None
    try:
        name: x509.Name = getattr(cert, which)
        return tuple(
            frozenset((a.oid.dotted_string, _canonical_value(a.value)) for a in rdn)
            for rdn in name.rdns
        )
    except (ValueError, TypeError):  # a name or value cryptography cannot decode
        return None


@dataclass(frozen=True)
class _Roots:
    ders: tuple[bytes, ...]
    certs: tuple[x509.Certificate | None, ...]  # None: cryptography cannot parse it
    subjects: tuple[_NameKey | None, ...]  # per root; None: matches any name


_root_cache: dict[int, tuple[Sequence[x509.Certificate | bytes], _Roots]] = {}


def _roots(roots: Sequence[x509.Certificate | bytes]) -> _Roots:
    # A sender verifies every session against the same roots object: encode it once.
    hit = _root_cache.get(id(roots))
    if hit is not None and hit[0] is roots:
        return hit[1]
    certs = tuple(_parse(r) if isinstance(r, bytes) else r for r in roots)
    found = _Roots(
        tuple(r if isinstance(r, bytes) else der(r) for r in roots),
        certs,
        tuple(_name_key(c, "subject") for c in certs),
    )
    if len(_root_cache) >= 16:
        _root_cache.clear()
    _root_cache[id(roots)] = (roots, found)  # holding ``roots`` keeps its id from being reused
    return found


def candidate_roots(
    chain: Sequence[x509.Certificate | None], roots: Sequence[x509.Certificate | bytes]
) -> tuple[bytes, ...]:
    """The DER of the ``roots`` OpenSSL could look up while verifying ``chain`` (parsed, leaf
    first; None for a certificate that could not be parsed): those whose subject could equal
    the subject or issuer of a chain certificate, or the issuer of another such root."""
    known = _roots(roots)
    wanted: set[_NameKey] = set()
    for cert in chain:
        keys = (_name_key(cert, "subject"), _name_key(cert, "issuer"))
        if keys[0] is None or keys[1] is None:
            return known.ders  # a name we cannot compare: let OpenSSL look through them all
        wanted.update((keys[0], keys[1]))
    chosen = reachable_roots(wanted, known.subjects, lambda i: _name_key(known.certs[i], "issuer"))
    return tuple(known.ders[i] for i in chosen)


def verify_pkix(
    chain: Sequence[x509.Certificate | bytes],
    *,
    name: str,
    roots: Sequence[x509.Certificate | bytes],
    now: dt.datetime,
    auth_level: int | None = None,
) -> PkixVerdict:
    """Verify ``chain`` (as presented: leaf first, then intermediates; objects or DER) for host
    ``name`` against the trusted ``roots`` (see ``load_roots``) at ``now`` (timezone-aware).

    ``auth_level``: the OpenSSL security level (default: the system's, ``default_auth_level``).
    Never raises for a bad chain: the verdict says what was wrong (RFC 8460 §4.3.1).
    """
    if now.tzinfo is None:
        raise ValueError("verify_pkix needs a timezone-aware 'now', e.g. datetime.now(UTC)")
    if not chain:
        return _fail(ResultType.VALIDATION_FAILURE, "the server presented no certificate")
    reference = reference_name(name)
    if reference is None:
        return _fail(
            ResultType.VALIDATION_FAILURE, f"{name!r} is not a host name a certificate can match"
        )
    ders = [c if isinstance(c, bytes) else der(c) for c in chain]
    parsed = [_parse(c) if isinstance(c, bytes) else c for c in chain]
    root_ders = candidate_roots(parsed, roots)
    try:
        result = libcrypto.verify(
            ders,
            roots=root_ders,
            host=reference,
            hostflags=HOST_FLAGS,
            auth_level=default_auth_level() if auth_level is None else auth_level,
            at=int(now.timestamp()),
        )
    except ValueError as exc:  # the leaf itself is unreadable: the server's failure, not a crash
        return _fail(
            ResultType.VALIDATION_FAILURE, f"the presented certificate is malformed: {exc}"
        )
    if result.ok:
        path = tuple(c for c in (_parse(d) for d in result.chain) if c is not None)
        anchor = _subject(path[-1] if path else None)
        return PkixVerdict(
            True, None, f"chain for {reference} verified to trusted root '{anchor}'", path
        )
    presented = parsed  # a refusal's sentences name the presented certificates
    errors = result.errors
    # UNABLE_TO_VERIFY_LEAF_SIGNATURE only repeats "no issuer found" for a lone leaf.
    if any(e.code != libcrypto.UNABLE_TO_VERIFY_LEAF_SIGNATURE for e in errors):
        errors = tuple(e for e in errors if e.code != libcrypto.UNABLE_TO_VERIFY_LEAF_SIGNATURE)
    described = [
        _describe(
            e,
            reference=reference,
            chain_len=len(result.chain),
            have_roots=bool(roots),
            presented=presented,
        )
        for e in errors
    ]
    types = [_result_type(e.code) for e in errors]
    decisive = min(range(len(errors)), key=lambda i: _PRECEDENCE.index(types[i]))
    return PkixVerdict(
        False,
        types[decisive],
        described[decisive],
        problems=tuple(dict.fromkeys(described)),
        codes=tuple(e.code for e in errors),
    )


@dataclass(frozen=True, slots=True)
class CertSummary:
    """What a person checks first in a presented certificate; from DER, never raising."""

    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    key: str  # "EC P-256", "RSA 2048", "Ed25519"
    signature: str  # the signature algorithm's name
    dns_names: tuple[str, ...]
    ca: bool | None  # basicConstraints cA; None when the extension is absent
    sha256: str  # fingerprint of the DER

    def to_json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "key": self.key,
            "signature": self.signature,
            "dns_names": list(self.dns_names),
            "ca": self.ca,
            "sha256": self.sha256,
        }

    def __str__(self) -> str:
        names = ", ".join(self.dns_names) or "no DNS name"
        return (
            f"{self.subject} (issuer {self.issuer}; {self.key}, {self.signature}; {names}; "
            f"{self.not_before} to {self.not_after})"
        )


def _key_text(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unreadable key"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"EC {curve.get(key.curve.name, key.curve.name)}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


def summarize(der: bytes) -> CertSummary:
    """A ``CertSummary`` of one certificate (fields say "unreadable" where parsing fails)."""
    with warnings.catch_warnings():
        # cryptography warns, lazily, of serial numbers RFC 5280 forbids; OpenSSL accepts them.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return _summarize(der)


def _summarize(der: bytes) -> CertSummary:
    fingerprint = hashlib.sha256(der).hexdigest()
    cert = _parse(der)
    if cert is None:
        bad = "(unreadable)"
        return CertSummary(bad, bad, bad, bad, bad, bad, bad, (), None, fingerprint)
    try:
        ca: bool | None = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        ca = None
    try:
        issuer = cert.issuer.rfc4514_string() or "(empty issuer)"
    except ValueError:
        issuer = "(unreadable issuer)"
    try:
        oid = cert.signature_algorithm_oid
        signature = getattr(oid, "_name", None) or oid.dotted_string
    except ValueError:
        signature = "unknown"
    return CertSummary(
        subject=_subject(cert),
        issuer=issuer,
        serial=str(cert.serial_number),
        not_before=f"{cert.not_valid_before_utc:{_ISO}}",
        not_after=f"{cert.not_valid_after_utc:{_ISO}}",
        key=_key_text(cert),
        signature=signature,
        dns_names=dns_names(cert),
        ca=ca,
        sha256=fingerprint,
    )


def load_roots(ca_file: Path | None, *, system: bool = True) -> tuple[x509.Certificate, ...]:
    """The trusted roots: the system bundle (if ``system`` and present) plus ``ca_file``
    (``roots.load_ders``), as certificates; those cryptography cannot parse are left out.

    A missing system bundle is tolerated (containers often have none); a ``ca_file`` that
    cannot be read or holds no certificate raises ``CaFileError``, because the user asked for it.
    """
    return _parsed_roots(load_ders(ca_file, system=system))


@functools.lru_cache(maxsize=8)
def _parsed_roots(ders: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    # Parsing the ~150 system roots is the costly part, and every sender loads them: once per
    # set of roots (``roots`` reads the bundle once per version of the file). One tuple for
    # one set also lets ``_roots`` find its encoding of them again.
    return tuple(cert for cert in map(_parse, ders) if cert is not None)


__all__ = [
    "FALLBACK_BUNDLE",
    "CaFileError",
    "CertSummary",
    "PkixVerdict",
    "default_auth_level",
    "der",
    "load_roots",
    "pem_blocks",
    "pem_certificates",
    "reference_name",
    "summarize",
    "system_bundle",
    "verify_pkix",
]
