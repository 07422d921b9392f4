"""Whether a chain is WebPKI-valid for a host, yes or no, from DER alone.

``pkix.verify_pkix`` gives the whole verdict (the RFC 8460 result type, a sentence per
problem, the path), and parses certificates with ``cryptography`` to word it. The learned
levels (docs/learned.md) only need to know whether an opportunistic session's chain would have
passed, and a sender that runs once per message (``mxguard send``) should not import
``cryptography`` for that (about 35 ms of its start-up). ``valid`` asks the same OpenSSL
verifier with the same settings (libcrypto.py, pkix.HOST_FLAGS, the system's security level),
and narrows the trusted roots the way ``pkix.candidate_roots`` does, with OpenSSL's own name
hashes instead of parsed names. tests/test_webpki.py holds the two answers equal over every
certificate variant of the differential test.
"""

from __future__ import annotations

import datetime as dt
import functools
import ssl
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mxguard.protocol import libcrypto
from mxguard.protocol.der import tbs_fields
from mxguard.protocol.names import HostNameError, normalise_host

# RFC 8461 §4.2: the MX host name must be a dNSName of the subjectAltName (no CN fallback),
# and a wildcard is a whole left-most label ("*.example.com"), never part of one. pkix and
# this module verify with these flags.
HOST_FLAGS = libcrypto.CHECK_FLAG_NEVER_CHECK_SUBJECT | libcrypto.CHECK_FLAG_NO_PARTIAL_WILDCARDS

K = TypeVar("K", bound=Hashable)


@functools.cache
def default_auth_level() -> int:
    """The security level of the system's default TLS client context (its openssl.cnf)."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).security_level


def reachable_roots(
    wanted: set[K], subjects: Sequence[K | None], issuer: Callable[[int], K | None]
) -> list[int]:
    """The indexes of the roots OpenSSL could look up while building a path: those whose
    subject is among ``wanted`` (the chain's subject and issuer names) or unknown (None:
    it could be anything), then those that issue one of them, until nothing is added.
    ``issuer(i)`` is root i's issuer name. pkix and this module compare names differently
    (parsed names, OpenSSL's name hashes); the walk is the same."""
    chosen: set[int] = set()
    grew = True
    while grew:
        grew = False
        for i, subject in enumerate(subjects):
            if i in chosen or (subject is not None and subject not in wanted):
                continue
            chosen.add(i)
            grew = True
            name = issuer(i)
            if name is not None:
                wanted.add(name)
    return sorted(chosen)


def _names(der: bytes) -> tuple[bytes, bytes] | None:
    """The DER of a certificate's subject and issuer Names, read off its tbsCertificate
    (RFC 5280 §4.1) without parsing the rest; None if it is not laid out as one."""
    try:
        fields = tbs_fields(der)
    except ValueError:
        return None
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    if [tag for tag, _, _ in fields[:5]] != [0x02, 0x30, 0x30, 0x30, 0x30]:
        return None
    return fields[4][2], fields[2][2]


def _name_hashes(ders: Sequence[bytes]) -> list[tuple[int, int] | None]:
    """Per certificate, OpenSSL's (subject, issuer) name hashes, from the names alone where
    it can (parsing a whole certificate costs OpenSSL 3 about 0.1 ms: 20 ms for a system
    bundle, once per ``mxguard send``), else from the parsed certificate."""
    out: list[tuple[int, int] | None] = []
    for der in ders:
        names = _names(der)
        if names is not None:
            subject, issuer = libcrypto.name_hash(names[0]), libcrypto.name_hash(names[1])
            if subject is not None and issuer is not None:
                out.append((subject, issuer))
                continue
        out.extend(libcrypto.name_hashes([der]))
    return out


@dataclass(frozen=True)
class _Roots:
    ders: tuple[bytes, ...]
    hashes: tuple[tuple[int, int] | None, ...]  # (subject, issuer); None: unreadable


_roots_seen: dict[int, tuple[Sequence[bytes], _Roots]] = {}


def _hashed(roots: Sequence[bytes]) -> _Roots:
    # A sender checks every session against the same roots object: hash it once.
    hit = _roots_seen.get(id(roots))
    if hit is not None and hit[0] is roots:
        return hit[1]
    found = _Roots(tuple(roots), tuple(_name_hashes(roots)))
    if len(_roots_seen) > 8:
        _roots_seen.clear()
    _roots_seen[id(roots)] = (roots, found)
    return found


def candidates(chain: Sequence[bytes], roots: Sequence[bytes]) -> tuple[bytes, ...]:
    """The ``roots`` OpenSSL could look up while verifying ``chain``: those whose subject
    could be the subject or issuer of a chain certificate, or the issuer of another such
    root (all of them when a chain certificate cannot be read)."""
    known = _hashed(roots)
    wanted: set[int] = set()
    for names in _name_hashes(chain):
        if names is None:
            return known.ders
        wanted.update(names)
    hashes = known.hashes
    subjects = [h[0] if h is not None else None for h in hashes]
    chosen = reachable_roots(wanted, subjects, lambda i: h[1] if (h := hashes[i]) else None)
    return tuple(known.ders[i] for i in chosen)


def valid(chain: Sequence[bytes], *, name: str, roots: Sequence[bytes], now: dt.datetime) -> bool:
    """Whether ``chain`` (DER, leaf first) verifies for host ``name`` against ``roots`` at
    ``now``: what ``pkix.verify_pkix(...).ok`` says, without parsing anything in Python."""
    if now.tzinfo is None:
        raise ValueError("webpki.valid needs a timezone-aware 'now', e.g. datetime.now(UTC)")
    if not chain:
        return False
    try:
        reference = normalise_host(name)
    except HostNameError:
        return False
    try:
        result = libcrypto.verify(
            chain,
            roots=candidates(chain, roots),
            host=reference,
            hostflags=HOST_FLAGS,
            auth_level=default_auth_level(),
            at=int(now.timestamp()),
        )
    except ValueError:  # the leaf itself is unreadable
        return False
    return result.ok


__all__ = ["HOST_FLAGS", "candidates", "default_auth_level", "reachable_roots", "valid"]
