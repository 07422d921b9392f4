"""The WebPKI trust store as DER bytes: the system's CA bundle plus a user's CA file.

Whoever needs the roots starts here. The MTA-STS policy fetch hands them to OpenSSL through
the ``ssl`` module, which wants nothing but their DER, so the commands that only fetch
policies (``serve postfix``, ``policy``) and the config check never parse a certificate
themselves and never import ``cryptography`` (about 10 MiB of resident memory, for the whole
life of a server). ``pkix.load_roots`` parses the same DER into ``cryptography`` certificates
for the MX host check.

What counts as a root is what OpenSSL can load. A certificate of the system bundle that
OpenSSL refuses is left out by ``load_into`` without costing the others; a user's CA file is
checked when it is read, because a file that holds no loadable certificate is an error
(``CaFileError``), never "no extra roots".
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

FALLBACK_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"\n-----END CERTIFICATE-----"


class CaFileError(ValueError):
    """A CA file given by the user cannot be used; the message names the file and the reason."""


def pem_blocks(data: bytes) -> list[bytes]:
    """Each ``-----BEGIN CERTIFICATE-----``, line break, at least one byte, line break,
    ``-----END CERTIFICATE-----`` in ``data``, in order, CRLF or LF (what lies between is not
    looked at), the shortest such span from each BEGIN: what a lazy DOTALL regular expression
    finds (tests/test_pkix.py holds them equal), found with ``bytes.find``, because the
    expression took 7 to 11 ms over the system bundle, which every command loads."""
    blocks = []
    at = 0
    while (start := data.find(_PEM_BEGIN, at)) >= 0:
        body = start + len(_PEM_BEGIN)
        if data.startswith(b"\r\n", body):
            body += 2
        elif data.startswith(b"\n", body):
            body += 1
        else:
            at = start + 1
            continue
        end = data.find(_PEM_END, body + 1)  # at least one byte between the lines
        if end < 0:
            at = start + 1
            continue
        end += len(_PEM_END)
        blocks.append(data[start:end])
        at = end
    return blocks


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER of every PEM certificate block in ``data``, in order, parsed or not (a block
    whose base64 cannot be decoded is left out)."""
    ders = []
    for block in pem_blocks(data):
        with contextlib.suppress(ValueError):
            ders.append(ssl.PEM_cert_to_DER_cert(block.decode("ascii", "replace")))
    return ders


def system_bundle() -> Path | None:
    """The system's CA bundle file, if there is one."""
    cafile = ssl.get_default_verify_paths().cafile
    for candidate in (Path(cafile) if cafile else None, FALLBACK_BUNDLE):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _unique(ders: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(dict.fromkeys(ders))


def load_into(ctx: ssl.SSLContext, ders: Sequence[bytes]) -> tuple[bytes, ...]:
    """Trust ``ders`` in ``ctx``; the ones OpenSSL took, in order.

    All of them in one call when OpenSSL takes the lot (the usual case: one call for the
    ~150 roots of a system bundle); when it refuses one, each on its own, skipping those it
    refuses, so that a bundle's odd certificate does not cost all the others. (A refused
    concatenation may leave the certificates before the bad one loaded; loading them again
    is harmless, OpenSSL keeps one copy of each.)
    """
    if not ders:
        return ()
    try:
        ctx.load_verify_locations(cadata=b"".join(ders))
    except ssl.SSLError:
        pass
    else:
        return tuple(ders)
    taken = []
    for der in ders:
        try:
            ctx.load_verify_locations(cadata=der)
        except ssl.SSLError:
            continue
        taken.append(der)
    return tuple(taken)


@functools.lru_cache(maxsize=4)
def _system_ders(bundle: Path, mtime_ns: int) -> tuple[bytes, ...]:
    # Read once per version of the file (``mtime_ns`` is part of the key): the policy fetch
    # and every sender load it.
    return _unique(pem_certificates(bundle.read_bytes()))


def system_ders() -> tuple[bytes, ...]:
    """The DER of the system bundle's certificates, without duplicates; () without a bundle
    (containers often have none) or when it cannot be read."""
    bundle = system_bundle()
    if bundle is None:
        return ()
    try:
        return _system_ders(bundle, bundle.stat().st_mtime_ns)
    except OSError:  # an unreadable system bundle counts as absent
        return ()


@functools.lru_cache(maxsize=8)
def _loadable(ders: tuple[bytes, ...]) -> tuple[bytes, ...]:
    # A throw-away context: what OpenSSL takes into it, it takes into the fetch's context.
    return load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ders)


def ca_file_ders(ca_file: Path) -> tuple[bytes, ...]:
    """The DER of the certificates in ``ca_file`` that OpenSSL can load, without duplicates.

    ``CaFileError`` when the file cannot be read or holds no such certificate: the user asked
    for these roots, and silently trusting fewer would make policy fetches fail.
    """
    try:
        data = ca_file.read_bytes()
    except OSError as exc:
        raise CaFileError(f"cannot read CA file {ca_file}: {exc.strerror or exc}") from None
    ders = _loadable(_unique(pem_certificates(data)))
    if not ders:
        raise CaFileError(
            f"CA file {ca_file} holds no usable certificate; expected PEM blocks "
            "'-----BEGIN CERTIFICATE-----' ... '-----END CERTIFICATE-----'"
        )
    return ders


def load_ders(ca_file: Path | None, *, system: bool = True) -> tuple[bytes, ...]:
    """The DER of the trusted roots: the system bundle (if ``system`` and present) plus
    ``ca_file`` (``CaFileError`` if it is given but unusable), each root once, in order."""
    found = system_ders() if system else ()
    if ca_file is None:
        return found
    extra = ca_file_ders(ca_file)
    if not found:
        return extra
    return _merged(found, extra)


@functools.lru_cache(maxsize=4)
def _merged(found: tuple[bytes, ...], extra: tuple[bytes, ...]) -> tuple[bytes, ...]:
    # One tuple for one set of roots, call after call: pkix and libcrypto remember what they
    # made of a set of roots (parsed names, an OpenSSL trust store) per tuple object.
    return _unique((*found, *extra))


__all__ = [
    "FALLBACK_BUNDLE",
    "CaFileError",
    "ca_file_ders",
    "load_ders",
    "load_into",
    "pem_blocks",
    "pem_certificates",
    "system_bundle",
    "system_ders",
]
