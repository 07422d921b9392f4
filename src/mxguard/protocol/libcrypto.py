"""OpenSSL's own certificate-chain verifier, ``X509_verify_cert``, called through ctypes.

Postfix, Exim (built with OpenSSL) and ``openssl s_client`` judge a server's certificate chain
with ``X509_verify_cert`` from libcrypto. A sender that refuses what they accept defers honest
mail; one that accepts what they refuse is weaker than they are. So mxguard's WebPKI verdict is
made by the same function of the same library: the libcrypto that Python's ``ssl`` module is
linked against (checked at load time by comparing version numbers).

The verification is set up as libssl sets it up for a TLS client (``X509_STORE_CTX_set_default``
with ``"ssl_server"``: the server-authentication purpose and trust), with the security level as
the authentication level, a host name to check and a fixed time. One deliberate difference from
a TLS handshake: the verify callback records every error and lets verification go on, so the
caller sees all that is wrong with a chain, not only the first problem OpenSSL happened to meet;
the chain is accepted only when no error at all was recorded.

This module knows nothing of RFC 8460 result types; ``pkix`` maps the error codes. It does no
I/O. Each call builds and frees its own OpenSSL objects; trust stores are kept per set of roots.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# X509_CHECK_FLAG_* (include/openssl/x509v3.h)
CHECK_FLAG_NO_PARTIAL_WILDCARDS = 0x4
CHECK_FLAG_NEVER_CHECK_SUBJECT = 0x20

# X509_V_ERR_* codes that callers name (include/openssl/x509_vfy.h); the rest travel as numbers.
UNABLE_TO_GET_ISSUER_CERT = 2
CERT_SIGNATURE_FAILURE = 7
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
DEPTH_ZERO_SELF_SIGNED_CERT = 18
SELF_SIGNED_CERT_IN_CHAIN = 19
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
CERT_CHAIN_TOO_LONG = 22
INVALID_CA = 79
CERT_UNTRUSTED = 27
CERT_REJECTED = 28
HOSTNAME_MISMATCH = 62
EE_KEY_TOO_SMALL = 66
CA_KEY_TOO_SMALL = 67
CA_MD_TOO_WEAK = 68

_STORE_CACHE_SIZE = 8


class LibcryptoUnavailable(RuntimeError):
    """The libcrypto Python's ``ssl`` module uses could not be loaded or lacks a function."""


@dataclass(frozen=True, slots=True)
class VerifyError:
    """One error OpenSSL reported: its code, the depth of the certificate (0 = leaf), OpenSSL's
    own wording, and the DER of the certificate it was about (empty when OpenSSL named none)."""

    code: int
    depth: int
    message: str
    cert_der: bytes


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """All errors in the order OpenSSL met them, and the chain it built (leaf first, DER)."""

    errors: tuple[VerifyError, ...]
    chain: tuple[bytes, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "OpenSSL_version_num": (ctypes.c_ulong, []),
    "d2i_X509": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
    "i2d_X509": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_void_p)]),
    "X509_free": (None, [_P]),
    "X509_STORE_new": (_P, []),
    "X509_STORE_free": (None, [_P]),
    "X509_STORE_up_ref": (ctypes.c_int, [_P]),
    "X509_STORE_add_cert": (ctypes.c_int, [_P, _P]),
    "OPENSSL_sk_new_null": (_P, []),
    "OPENSSL_sk_push": (ctypes.c_int, [_P, _P]),
    "OPENSSL_sk_num": (ctypes.c_int, [_P]),
    "OPENSSL_sk_value": (_P, [_P, ctypes.c_int]),
    "OPENSSL_sk_free": (None, [_P]),
    "X509_STORE_CTX_new": (_P, []),
    "X509_STORE_CTX_free": (None, [_P]),
    "X509_STORE_CTX_init": (ctypes.c_int, [_P, _P, _P, _P]),
    "X509_STORE_CTX_set_default": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "X509_STORE_CTX_get0_param": (_P, [_P]),
    "X509_STORE_CTX_set_verify_cb": (None, [_P, _VERIFY_CB]),
    "X509_STORE_CTX_get_error": (ctypes.c_int, [_P]),
    "X509_STORE_CTX_get_error_depth": (ctypes.c_int, [_P]),
    "X509_STORE_CTX_get_current_cert": (_P, [_P]),
    "X509_STORE_CTX_get0_chain": (_P, [_P]),
    "X509_verify_cert": (ctypes.c_int, [_P]),
    "X509_verify_cert_error_string": (ctypes.c_char_p, [ctypes.c_long]),
    "X509_VERIFY_PARAM_set1_host": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_size_t]),
    "X509_VERIFY_PARAM_set_hostflags": (None, [_P, ctypes.c_uint]),
    "X509_VERIFY_PARAM_set_auth_level": (None, [_P, ctypes.c_int]),
    "X509_VERIFY_PARAM_set_time": (None, [_P, ctypes.c_int64]),
    "ERR_clear_error": (None, []),
    "X509_subject_name_hash": (ctypes.c_ulong, [_P]),
    "X509_issuer_name_hash": (ctypes.c_ulong, [_P]),
}
# Declared when present (OpenSSL 3): hashing a name alone, without parsing its certificate.
_OPTIONAL: dict[str, tuple[object, list[object]]] = {
    "d2i_X509_NAME": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
    "X509_NAME_free": (None, [_P]),
    "X509_NAME_hash_ex": (ctypes.c_ulong, [_P, _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]),
}


def _candidates() -> Iterator[str | None]:
    major = ssl.OPENSSL_VERSION_INFO[0]
    yield f"libcrypto.so.{major}"
    yield "libcrypto.so"
    # Only when the names above fail: find_library runs `ldconfig -p` in a child process,
    # which cost `mxguard send` a fork of itself on every run.
    yield ctypes.util.find_library("crypto")


def _open() -> ctypes.CDLL:
    # dlopen of a library already loaded (by the ssl module) returns that same library.
    for candidate in _candidates():
        if not candidate:
            continue
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    raise LibcryptoUnavailable(
        f"cannot load libcrypto ({ssl.OPENSSL_VERSION}) to verify certificate chains"
    )


def _load() -> Any:
    """libcrypto with the C signatures of the functions used here declared."""
    lib = _open()
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibcryptoUnavailable(f"libcrypto has no function {name}") from None
        fn.restype = restype
        fn.argtypes = argtypes
    for name, (restype, argtypes) in _OPTIONAL.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = restype
            fn.argtypes = argtypes
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise LibcryptoUnavailable(
            "the libcrypto found is not the one Python's ssl module uses "
            f"({ssl.OPENSSL_VERSION}); mxguard verifies chains with that one only"
        )
    return lib


_lib: Any = None
_lock = threading.Lock()
_stores: dict[bytes, int] = {}


def _get_lib() -> Any:
    global _lib
    with _lock:
        if _lib is None:
            _lib = _load()
        return _lib


class _X509:
    """An owned ``X509 *`` made from DER, freed by ``close``."""

    def __init__(self, lib: Any, der: bytes) -> None:
        buf = ctypes.c_char_p(der)
        ptr = lib.d2i_X509(None, ctypes.byref(buf), len(der))
        if not ptr:
            lib.ERR_clear_error()
            raise ValueError("OpenSSL cannot parse this certificate (malformed DER)")
        self.ptr: int = ptr
        self._lib = lib

    def close(self) -> None:
        self._lib.X509_free(self.ptr)


def to_der(lib: Any, x509_ptr: int) -> bytes:
    size = lib.i2d_X509(x509_ptr, None)
    if size <= 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buf))
    lib.i2d_X509(x509_ptr, ctypes.byref(cursor))
    return buf.raw[:size]


_keys: dict[int, tuple[Sequence[bytes], bytes]] = {}


def _roots_key(roots: Sequence[bytes]) -> bytes:
    """A digest of ``roots``, remembered per sequence object (callers pass the same one)."""
    hit = _keys.get(id(roots))
    if hit is not None and hit[0] is roots:
        return hit[1]
    key = hashlib.sha256(b"".join(hashlib.sha256(r).digest() for r in roots)).digest()
    with _lock:
        if len(_keys) >= 4 * _STORE_CACHE_SIZE:
            _keys.clear()
        _keys[id(roots)] = (roots, key)  # holding ``roots`` keeps its id from being reused
    return key


def _store(lib: Any, roots: Sequence[bytes]) -> int:
    """An ``X509_STORE *`` holding ``roots`` with one reference for the caller to free."""
    key = _roots_key(roots)
    with _lock:
        cached = _stores.get(key)
        if cached is not None:
            lib.X509_STORE_up_ref(cached)
            return cached
    store: int = lib.X509_STORE_new()
    if not store:
        raise MemoryError("X509_STORE_new failed")
    for der in roots:
        try:
            cert = _X509(lib, der)
        except ValueError:
            continue  # a root OpenSSL cannot read cannot anchor anything; the rest still can
        lib.X509_STORE_add_cert(store, cert.ptr)  # takes a reference
        cert.close()
    lib.ERR_clear_error()  # duplicate roots leave errors queued
    with _lock:
        raced = _stores.get(key)
        if raced is not None:  # another thread built the same store meanwhile: use that one
            lib.X509_STORE_free(store)
            lib.X509_STORE_up_ref(raced)
            return raced
        if len(_stores) >= _STORE_CACHE_SIZE:
            old_key = next(iter(_stores))
            lib.X509_STORE_free(_stores.pop(old_key))  # users still holding it keep a reference
        _stores[key] = store
        lib.X509_STORE_up_ref(store)
    return store


def error_string(code: int) -> str:
    text = _get_lib().X509_verify_cert_error_string(code)
    return text.decode("ascii", "replace") if text else f"error {code}"


def _recorder(lib: Any, errors: list[VerifyError]) -> Any:
    """A verify callback that records each error and lets verification go on."""

    def record(ok: int, ctx_ptr: int | None) -> int:
        if not ok:
            code = lib.X509_STORE_CTX_get_error(ctx_ptr)
            current = lib.X509_STORE_CTX_get_current_cert(ctx_ptr)
            errors.append(
                VerifyError(
                    code,
                    lib.X509_STORE_CTX_get_error_depth(ctx_ptr),
                    error_string(code),
                    to_der(lib, current) if current else b"",
                )
            )
        return 1  # go on: the caller wants every problem, and refuses on any

    return _VERIFY_CB(record)


def _configure(
    lib: Any, ctx: int, *, host: str | None, hostflags: int, auth_level: int, at: int
) -> None:
    # What libssl does for a client: server-authentication purpose and trust settings.
    lib.X509_STORE_CTX_set_default(ctx, b"ssl_server")
    param = lib.X509_STORE_CTX_get0_param(ctx)
    lib.X509_VERIFY_PARAM_set_auth_level(param, auth_level)
    lib.X509_VERIFY_PARAM_set_time(param, at)
    if host is not None:
        encoded = host.encode("ascii")
        if not lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded)):
            raise ValueError(f"OpenSSL does not accept {host!r} as a host name to check")
        lib.X509_VERIFY_PARAM_set_hostflags(param, hostflags)


def _built_chain(lib: Any, ctx: int) -> tuple[bytes, ...]:
    built = lib.X509_STORE_CTX_get0_chain(ctx)
    if not built:
        return ()
    return tuple(
        to_der(lib, lib.OPENSSL_sk_value(built, i)) for i in range(lib.OPENSSL_sk_num(built))
    )


def verify(
    chain: Sequence[bytes],
    *,
    roots: Sequence[bytes],
    host: str | None,
    hostflags: int,
    auth_level: int,
    at: int,
) -> VerifyResult:
    """``X509_verify_cert`` on ``chain`` (DER, leaf first, the rest untrusted) against ``roots``.

    ``host``: the reference name (A-labels) to check, or None for no name check; ``at``: the
    time to verify at, in seconds since the epoch. A leaf that OpenSSL cannot parse raises
    ``ValueError``; an unparsable certificate further down is left out, as a TLS stack that
    could not parse it would never have received it.
    """
    if not chain:
        raise ValueError("no certificate to verify")
    lib = _get_lib()
    owned: list[_X509] = [_X509(lib, chain[0])]
    untrusted = lib.OPENSSL_sk_new_null()
    ctx = lib.X509_STORE_CTX_new()
    store = 0
    errors: list[VerifyError] = []
    callback = _recorder(lib, errors)
    try:
        if not (untrusted and ctx):
            raise MemoryError("OpenSSL could not allocate a verification context")
        store = _store(lib, roots)
        for der in chain[1:]:
            try:
                owned.append(_X509(lib, der))
            except ValueError:
                continue
            lib.OPENSSL_sk_push(untrusted, owned[-1].ptr)
        if not lib.X509_STORE_CTX_init(ctx, store, owned[0].ptr, untrusted):
            raise MemoryError("X509_STORE_CTX_init failed")
        _configure(lib, ctx, host=host, hostflags=hostflags, auth_level=auth_level, at=at)
        lib.X509_STORE_CTX_set_verify_cb(ctx, callback)
        if lib.X509_verify_cert(ctx) <= 0 and not errors:
            # Refused without telling the callback (an internal failure): an error all the same.
            code = lib.X509_STORE_CTX_get_error(ctx)
            errors.append(VerifyError(code, 0, error_string(code), b""))
        return VerifyResult(tuple(errors), _built_chain(lib, ctx))
    finally:
        if ctx:
            lib.X509_STORE_CTX_free(ctx)
        if untrusted:
            lib.OPENSSL_sk_free(untrusted)
        if store:
            lib.X509_STORE_free(store)
        for cert in owned:
            cert.close()
        lib.ERR_clear_error()


def name_hashes(ders: Sequence[bytes]) -> list[tuple[int, int] | None]:
    """Per certificate, OpenSSL's hashes of its subject and issuer names (those of its
    lookup by name: equal canonical names, equal hashes); None for one it cannot parse."""
    lib = _get_lib()
    out: list[tuple[int, int] | None] = []
    for der in ders:
        try:
            cert = _X509(lib, der)
        except ValueError:
            out.append(None)
            continue
        try:
            out.append((lib.X509_subject_name_hash(cert.ptr), lib.X509_issuer_name_hash(cert.ptr)))
        finally:
            cert.close()
    lib.ERR_clear_error()
    return out


def name_hash(name_der: bytes) -> int | None:
    """OpenSSL's hash of a DER Name (what ``X509_subject_name_hash`` gives for a certificate
    with that subject); None if it cannot be parsed or this libcrypto cannot hash a name
    alone (before OpenSSL 3)."""
    lib = _get_lib()
    if not hasattr(lib, "X509_NAME_hash_ex") or not hasattr(lib, "d2i_X509_NAME"):
        return None
    buf = ctypes.c_char_p(name_der)
    name = lib.d2i_X509_NAME(None, ctypes.byref(buf), len(name_der))
    if not name:
        lib.ERR_clear_error()
        return None
    try:
        ok = ctypes.c_int(0)
        value: int = lib.X509_NAME_hash_ex(name, None, None, ctypes.byref(ok))
        return value if ok.value else None
    finally:
        lib.X509_NAME_free(name)


__all__ = [
    "LibcryptoUnavailable",
    "VerifyError",
    "VerifyResult",
    "error_string",
    "name_hash",
    "name_hashes",
    "verify",
]
