"""``webpki.valid`` (the learned levels' yes/no WebPKI check, no ``cryptography``) answers
exactly what ``pkix.verify_pkix(...).ok`` answers: over every certificate variant of the
differential test (tests/test_cert_differential.py, which holds verify_pkix to OpenSSL's own
tools), for the variant's host and a wrong one, now and after expiry, against the variant's
roots alone and among the system bundle's."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from mxguard.lab.certprofiles import VARIANTS, Built, CertAuthority, Variant, build
from mxguard.protocol import roots, webpki
from mxguard.protocol.pkix import verify_pkix

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
SYSTEM = roots.system_ders()


@pytest.fixture(scope="module")
def built() -> dict[str, Built]:
    ca = CertAuthority(NOW)
    return {v.name: build(v.profile, v.host, NOW, ca) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_valid_says_what_verify_pkix_says(built: dict[str, Built], variant: Variant) -> None:
    b = built[variant.name]
    mixed = (*SYSTEM, *b.roots)
    for trusted in (b.roots, mixed, ()):
        for host in (variant.host, "elsewhere.example"):
            for when in (NOW, NOW + dt.timedelta(days=3650)):
                want = verify_pkix(b.chain, name=host, roots=trusted, now=when).ok
                got = webpki.valid(b.chain, name=host, roots=trusted, now=when)
                assert got == want, (variant.name, host, when, len(trusted))


def test_some_variants_pass_and_some_fail(built: dict[str, Built]) -> None:
    # The comparison above means something only if both answers occur.
    answers = {
        webpki.valid(built[v.name].chain, name=v.host, roots=built[v.name].roots, now=NOW)
        for v in VARIANTS
    }
    assert answers == {True, False}


def test_the_candidate_roots_are_few_among_the_system_bundle(built: dict[str, Built]) -> None:
    b = built[VARIANTS[0].name]
    mixed = (*SYSTEM, *b.roots)
    chosen = webpki.candidates(b.chain, mixed)
    assert set(b.roots) & set(chosen)
    assert len(chosen) <= len(b.roots) + 5 < len(mixed) or not SYSTEM


def test_nothing_to_check_is_not_valid() -> None:
    assert not webpki.valid((), name="mx.example", roots=SYSTEM, now=NOW)
    assert not webpki.valid((b"not a certificate",), name="mx.example", roots=SYSTEM, now=NOW)
    assert not webpki.valid((b"x",), name="not a host name", roots=SYSTEM, now=NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        webpki.valid((b"x",), name="mx.example", roots=SYSTEM, now=NOW.replace(tzinfo=None))


def test_it_needs_no_cryptography() -> None:
    code = (
        "import sys; import mxguard.protocol.webpki as w, mxguard.protocol.roots as r; "
        "w.valid((b'x',), name='mx.example', roots=r.system_ders(), "
        "now=__import__('datetime').datetime.now(__import__('datetime').UTC)); "
        "print('cryptography' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_names_read_off_the_der_hash_as_openssl_hashes_the_parsed_certificate(
    built: dict[str, Built],
) -> None:
    from mxguard.protocol import libcrypto

    certs = list(SYSTEM) + [d for b in built.values() for d in (*b.chain, *b.roots)]
    parsed = libcrypto.name_hashes(certs)
    read = webpki._name_hashes(certs)
    assert len(certs) > 20
    assert read == parsed
    assert all(h is not None for h in parsed)  # the comparison covers real hashes


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"\x30",
        b"\x30\x05\x30\x03\x02\x01",
        b"\x31\x00",
        b"\x30\x84\xff\xff\xff\xff",
        b"x" * 50,
    ],
    ids=["empty", "truncated", "short", "not_a_sequence", "huge_length", "junk"],
)
def test_what_is_no_certificate_has_no_names(der: bytes) -> None:
    assert webpki._names(der) is None
    assert webpki._name_hashes([der]) == [None]


def test_libcrypto_is_found_by_its_soname_without_running_ldconfig(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ctypes.util.find_library runs `ldconfig -p` in a child process: the fallback only, or
    # every `mxguard send` forks itself once to verify a chain.
    import ctypes.util

    from mxguard.protocol import libcrypto

    def no_child(name: str) -> str | None:
        raise AssertionError(f"find_library({name!r}) was called")

    monkeypatch.setattr(ctypes.util, "find_library", no_child)
    assert libcrypto._open() is not None
