"""WebPKI verification of a certificate chain presented by an MX host (RFC 8461 §4.2).

An MTA-STS policy in force demands that the MX host presents a certificate that chains to a
trusted root, is valid now and is valid for the MX host name (RFC 8461 §4.2, which defers to
RFC 6125 for names; wildcards cover exactly one label). This module checks exactly that, for a
chain the SMTP client collected without verifying anything during the handshake.

Path building and the WebPKI profile are left to ``cryptography.x509.verification``. Its
errors are strings made for developers, so the RFC 8460 §4.3.1 result type is decided by our
own checks around it, in this order of precedence:

1. no path from the leaf to a trusted root (self-signed, unknown CA) -> ``certificate-not-trusted``
   (first, because the dates and names of an untrusted certificate are claims of an unknown
   party: an attacker's certificate is "not trusted", whatever else is wrong with it);
2. a certificate on that path outside its validity period -> ``certificate-expired``;
3. no DNS name of the leaf covers the host -> ``certificate-host-mismatch``;
4. anything else the verifier rejects (profile violations, key usage, ...) ->
   ``validation-failure``.

Pure: no sockets, no clock (pass ``now``), no globals. ``load_roots`` is the one function that
reads files; it is here so that everything about the WebPKI trust store lives in one place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from mxguard.protocol import certpath
from mxguard.protocol.dane import certificate_names, name_matches
from mxguard.protocol.results import ResultType

# A chain longer than this is not deployed anywhere; it bounds our own path search.
_MAX_DEPTH = 8
_ISO = "%Y-%m-%dT%H:%M:%SZ"
_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
FALLBACK_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class CaFileError(ValueError):
    """A CA file given by the user cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class PkixVerdict:
    """The outcome of WebPKI verification.

    ``ok`` with ``path`` (leaf first, ending at the trusted root) on success; otherwise the
    RFC 8460 ``result_type`` and a ``detail`` sentence for people.
    """

    ok: bool
    result_type: ResultType | None
    detail: str
    path: tuple[x509.Certificate, ...] = ()


def _fail(result_type: ResultType, detail: str) -> PkixVerdict:
    return PkixVerdict(False, result_type, detail)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _path_to_root(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    budget: certpath.Budget,
) -> tuple[x509.Certificate, ...] | None:
    """A signature-linked path from ``chain[0]`` through ``chain[1:]`` to one of ``roots``.

    Only names and signatures are looked at, not dates or extensions: this answers "does this
    chain lead to a trusted root at all?", the question behind ``certificate-not-trusted``.
    """
    root_ders = {_der(r) for r in roots}
    intermediates = list(chain[1:])

    def walk(path: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...] | None:
        last = path[-1]
        if _der(last) in root_ders:
            return path
        if len(path) > _MAX_DEPTH:
            return None
        for candidate in (*roots, *intermediates):
            if candidate in path or not certpath.issued_by(last, candidate, budget):
                continue
            found = walk((*path, candidate))
            if found is not None:
                return found
        return None

    return walk((chain[0],))


def _date_problem(cert: x509.Certificate, now: dt.datetime, what: str) -> str | None:
    begin, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > end:
        return f"{what} '{_subject(cert)}' expired at {end:{_ISO}}"
    if now < begin:
        return f"{what} '{_subject(cert)}' is not valid before {begin:{_ISO}}"
    return None


def _reference_name(name: str) -> str | None:
    # RFC 8461 §4.2 compares against the MX host name: no trailing dot, any case, A-labels.
    name = name.strip().rstrip(".").lower()
    if not name:
        return None
    try:
        return name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def verify_pkix(
    chain: Sequence[x509.Certificate],
    *,
    name: str,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> PkixVerdict:
    """Verify ``chain`` (as presented: leaf first, then intermediates) for host ``name``.

    ``roots`` are the trusted roots (see ``load_roots``); ``now`` must be timezone-aware.
    Never raises for a bad chain: the verdict says what was wrong (RFC 8460 §4.3.1).
    """
    if now.tzinfo is None:
        raise ValueError("verify_pkix needs a timezone-aware 'now', e.g. datetime.now(UTC)")
    try:
        return _verify_pkix(chain, name=name, roots=roots, now=now)
    except certpath.ChainTooComplex as exc:
        return _fail(ResultType.VALIDATION_FAILURE, str(exc))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # A malformed certificate (cryptography parses extensions lazily) is the server's
        # failure, never a crash of ours.
        return _fail(ResultType.VALIDATION_FAILURE, f"a presented certificate is malformed: {exc}")


def _verify_pkix(
    chain: Sequence[x509.Certificate],
    *,
    name: str,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> PkixVerdict:
    if not chain:
        return _fail(ResultType.VALIDATION_FAILURE, "the server presented no certificate")
    leaf = chain[0]
    path = _path_to_root(chain, roots, certpath.Budget()) if roots else None
    if path is None:
        if not roots:
            why = "no trusted root certificates are configured"
        elif leaf.issuer == leaf.subject and len(chain) == 1:
            why = "it is self-signed"
        else:
            why = f"its issuer '{leaf.issuer.rfc4514_string()}' is not a trusted CA"
        return _fail(
            ResultType.CERTIFICATE_NOT_TRUSTED,
            f"certificate '{_subject(leaf)}' does not chain to a trusted root: {why}",
        )
    for position, cert in enumerate(path[:-1]):  # the root's own dates are the store's affair
        problem = _date_problem(cert, now, "certificate" if position == 0 else "intermediate CA")
        if problem is not None:
            # RFC 8460 §4.3.1 has no "not yet valid"; a certificate outside its validity
            # period is reported as "certificate-expired", the detail says which end.
            return _fail(ResultType.CERTIFICATE_EXPIRED, problem)
    reference = _reference_name(name)
    if reference is None:
        return _fail(
            ResultType.VALIDATION_FAILURE, f"{name!r} is not a host name a certificate can match"
        )
    presented = certificate_names(leaf)
    # RFC 8461 §4.2 / RFC 6125 §6.4: one of the leaf's DNS names must cover the MX host.
    if not any(name_matches(p, reference) for p in presented):
        return _fail(
            ResultType.CERTIFICATE_HOST_MISMATCH,
            f"certificate is valid for {', '.join(presented) or 'no DNS name'}, "
            f"not for {reference}",
        )
    try:
        subject = DNSName(reference)
        verifier = (
            PolicyBuilder().store(Store(list(roots))).time(now).build_server_verifier(subject)
        )
        verified = verifier.verify(leaf, list(chain[1:]))
    except VerificationError as exc:
        return _fail(ResultType.VALIDATION_FAILURE, f"WebPKI verification failed: {exc}")
    except ValueError as exc:  # a name the verifier's DNS name syntax does not accept
        return _fail(ResultType.VALIDATION_FAILURE, f"cannot verify for {reference!r}: {exc}")
    anchor = verified[-1]
    return PkixVerdict(
        True,
        None,
        f"chain for {reference} verified to trusted root '{_subject(anchor)}'",
        tuple(verified),
    )


def _parse_pem_bundle(data: bytes) -> list[x509.Certificate]:
    certs = []
    for block in _PEM_BLOCK.findall(data):
        try:
            with warnings.catch_warnings():
                # Old roots with non-positive serial numbers parse with a deprecation warning
                # that says nothing useful to our users.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            # System bundles carry the odd certificate cryptography will not parse (negative
            # serial numbers, old encodings); one of them must not cost us all the others.
            continue
    return certs


def system_bundle() -> Path | None:
    """The system's CA bundle file, if there is one."""
    cafile = ssl.get_default_verify_paths().cafile
    for candidate in (Path(cafile) if cafile else None, FALLBACK_BUNDLE):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def load_roots(ca_file: Path | None, *, system: bool = True) -> tuple[x509.Certificate, ...]:
    """The trusted roots: the system bundle (if ``system`` and present) plus ``ca_file``.

    A missing system bundle is tolerated (containers often have none); a ``ca_file`` that
    cannot be read or holds no certificate raises ``CaFileError``, because the user asked for it.
    """
    roots: list[x509.Certificate] = []
    bundle = system_bundle() if system else None
    if bundle is not None:
        with contextlib.suppress(OSError):  # an unreadable system bundle counts as absent
            roots += _parse_pem_bundle(bundle.read_bytes())
    if ca_file is not None:
        try:
            data = ca_file.read_bytes()
        except OSError as exc:
            raise CaFileError(f"cannot read CA file {ca_file}: {exc.strerror or exc}") from None
        extra = _parse_pem_bundle(data)
        if not extra:
            raise CaFileError(
                f"CA file {ca_file} holds no usable certificate; expected PEM blocks "
                "'-----BEGIN CERTIFICATE-----' ... '-----END CERTIFICATE-----'"
            )
        roots += extra
    seen: set[bytes] = set()
    unique = []
    for cert in roots:
        der = _der(cert)
        if der not in seen:
            seen.add(der)
            unique.append(cert)
    return tuple(unique)


__all__ = ["CaFileError", "PkixVerdict", "load_roots", "system_bundle", "verify_pkix"]
