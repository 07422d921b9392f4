"""Specification of mxguard.protocol.dane: TLSA parsing, usability and chain matching.

Each table row is one rule of RFC 6698 §2, RFC 7671 §5 or RFC 7672 §3, named after it.
Certificates come from the lab CA (LabPKI) plus a few built here for cases the lab does not
issue (RSA and Ed25519 issuers, wildcards, CN-only, broken constraints). No network.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.rdata
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from mxguard.cli import main
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import CertKind
from mxguard.protocol.dane import (
    Tlsa,
    TlsaError,
    association_data,
    certificate_names,
    classify,
    from_rdata,
    parse_tlsa,
    usable,
    verify_chain,
)
from mxguard.protocol.names import identifier_matches as name_matches
from mxguard.protocol.results import ResultType

HOST = "mx.example.test"
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)

# --- certificates ----------------------------------------------------------------------------

Key = Any  # a private key of any kind cryptography can sign with


def _make(
    cn: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None,
    *,
    san: Sequence[str] | None = None,
    ca: bool | None = False,
    path_length: int | None = None,
    cert_sign: bool | None = None,
    begin: dt.datetime = NOW - DAY,
    end: dt.datetime = NOW + 30 * DAY,
) -> x509.Certificate:
    """A certificate for ``cn``; ``issuer`` None means self-signed. ``ca`` None: no extension."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(end)
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), False
        )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), True)
    if cert_sign is not None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, cert_sign, cert_sign, False, False),
            True,
        )
    signer = issuer[1] if issuer else key
    # Ed25519 signs without a separate hash (RFC 8410); the others use SHA-256.
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm)


def _ec() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class World:
    """Every chain the rows below refer to, leaf first."""

    pki: LabPKI
    valid: tuple[x509.Certificate, ...]  # lab leaf + lab root
    inter: tuple[x509.Certificate, ...]  # lab leaf + lab intermediate + lab root
    inter_only: tuple[x509.Certificate, ...]  # lab leaf + lab intermediate (no root)
    expired: tuple[x509.Certificate, ...]  # expired lab leaf + lab root
    future: tuple[x509.Certificate, ...]  # not-yet-valid leaf + lab root
    self_signed: tuple[x509.Certificate, ...]
    broken: tuple[x509.Certificate, ...]  # root-issued leaf + the intermediate (wrong issuer)
    rsa_ed: tuple[x509.Certificate, ...]  # EC leaf <- Ed25519 intermediate <- RSA root
    not_ca: tuple[x509.Certificate, ...]  # leaf signed by a certificate with cA=FALSE
    no_cert_sign: tuple[x509.Certificate, ...]  # issuer's key usage lacks keyCertSign
    path_len: tuple[x509.Certificate, ...]  # root pathLen=0 above an intermediate
    forged: tuple[x509.Certificate, ...]  # leaf names the root as issuer, other key signed
    wildcard: tuple[x509.Certificate, ...]  # *.example.test + root
    cn_only: tuple[x509.Certificate, ...]  # no SAN, CN=mx.example.test + root
    san_other: tuple[x509.Certificate, ...]  # SAN other.example.test, CN=mx.example.test
    other: x509.Certificate  # unrelated certificate for non-matching data

    @property
    def root(self) -> x509.Certificate:
        return self.pki.root_cert


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    pki = LabPKI(tmp_path_factory.mktemp("pki"), now=NOW)
    root = (pki.root.cert, pki.root.key)
    valid = pki.issue(HOST)
    inter = pki.issue(HOST, CertKind.INTERMEDIATE)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_root = _make("rsa root", rsa_key, None, ca=True)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_int = _make("ed25519 intermediate", ed_key, (rsa_root, rsa_key), ca=True)
    leaf_key = _ec()
    fake_ca_key = _ec()
    fake_ca = _make("not a ca", fake_ca_key, root, ca=False)
    nks_key = _ec()
    nks_ca = _make("no keyCertSign", nks_key, root, ca=True, cert_sign=False)
    pl_root_key = _ec()
    pl_root = _make("pathlen 0 root", pl_root_key, None, ca=True, path_length=0)
    pl_int_key = _ec()
    pl_int = _make("pathlen intermediate", pl_int_key, (pl_root, pl_root_key), ca=True)

    def leaf(issuer: tuple[x509.Certificate, Key], **kw: Any) -> x509.Certificate:
        return _make(HOST, leaf_key, issuer, **{"san": [HOST], **kw})

    return World(
        pki=pki,
        valid=(valid.leaf, pki.root_cert),
        inter=(*inter.chain, pki.root_cert),
        inter_only=inter.chain,
        expired=(pki.issue(HOST, CertKind.EXPIRED).leaf, pki.root_cert),
        future=(leaf(root, begin=NOW + DAY, end=NOW + 9 * DAY), pki.root_cert),
        self_signed=pki.issue(HOST, CertKind.SELF_SIGNED).chain,
        broken=(valid.leaf, pki.intermediate.cert),
        rsa_ed=(leaf((ed_int, ed_key)), ed_int, rsa_root),
        not_ca=(leaf((fake_ca, fake_ca_key)), fake_ca, pki.root_cert),
        no_cert_sign=(leaf((nks_ca, nks_key)), nks_ca, pki.root_cert),
        path_len=(leaf((pl_int, pl_int_key)), pl_int, pl_root),
        forged=(leaf((pki.root.cert, _ec())), pki.root_cert),
        wildcard=(leaf(root, san=["*.example.test"]), pki.root_cert),
        cn_only=(leaf(root, san=None), pki.root_cert),
        san_other=(leaf(root, san=["other.example.test"]), pki.root_cert),
        other=pki.issue("unrelated.example.test").leaf,
    )


def rec(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> Tlsa:
    """The record that a publisher would compute for ``cert``."""
    return Tlsa(usage, selector, mtype, association_data(cert, selector, mtype))


# --- parsing ---------------------------------------------------------------------------------

PARSE_OK = [
    ("numbers_and_hex", "3 1 1 0a1B", Tlsa(3, 1, 1, bytes.fromhex("0a1b"))),
    ("hex_may_contain_spaces", "2 0 1 0a 1b\t2c", Tlsa(2, 0, 1, bytes.fromhex("0a1b2c"))),
    ("surrounding_whitespace_ignored", "  3 1 2 ff \n", Tlsa(3, 1, 2, b"\xff")),
    ("rfc7218_acronyms", "DANE-EE SPKI SHA2-256 00", Tlsa(3, 1, 1, b"\x00")),
    ("acronyms_any_case", "dane-ta cert full 00", Tlsa(2, 0, 0, b"\x00")),
    ("unknown_numbers_parse_but_are_unusable", "255 7 9 00", Tlsa(255, 7, 9, b"\x00")),
]


@pytest.mark.parametrize(
    ("text", "expected"), [r[1:] for r in PARSE_OK], ids=[r[0] for r in PARSE_OK]
)
def test_parse_tlsa_accepts(text: str, expected: Tlsa) -> None:
    assert parse_tlsa(text) == expected


PARSE_BAD = [
    ("too_few_fields", "3 1 1", "3 fields"),
    ("empty", "", "0 fields"),
    ("usage_not_a_number", "x 1 1 00", "certificate usage"),
    ("usage_above_255", "256 1 1 00", "0 to 255"),
    ("non_ascii_digits_rejected", "\u0663 1 1 00", "certificate usage"),
    ("underscore_in_number_rejected", "1_0 1 1 00", "certificate usage"),
    ("negative_selector", "3 -1 1 00", "selector"),
    ("matching_type_not_a_number", "3 1 sha 00", "matching type"),
    ("hex_with_non_hex_digit", "3 1 1 0g", "hexadecimal"),
    ("hex_with_odd_length", "3 1 1 abc", "odd number"),
    ("oversized_text", "3 1 1 " + "0" * 300_000, "at most"),
]


@pytest.mark.parametrize(
    ("text", "fragment"), [r[1:] for r in PARSE_BAD], ids=[r[0] for r in PARSE_BAD]
)
def test_parse_tlsa_rejects(text: str, fragment: str) -> None:
    with pytest.raises(TlsaError, match=fragment):
        parse_tlsa(text)


@given(st.text(max_size=200))
def test_parse_tlsa_on_arbitrary_text_raises_only_tlsa_error(text: str) -> None:
    with contextlib.suppress(TlsaError):
        parse_tlsa(text)


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(min_size=1, max_size=80),
)
def test_to_text_round_trips(u: int, s: int, m: int, data: bytes) -> None:
    record = Tlsa(u, s, m, data)
    assert parse_tlsa(record.to_text()) == record


def test_from_rdata_reads_dnspython_tlsa() -> None:
    digest = bytes(range(32))
    rdata = dns.rdata.from_text("IN", "TLSA", f"3 1 1 {digest.hex()}")
    assert from_rdata(rdata) == Tlsa(3, 1, 1, digest)


# --- usability (RFC 7672 §3.1) ---------------------------------------------------------------

Build = Callable[[World], Tlsa]

USABLE: list[tuple[str, Build, str | None]] = [
    ("dane_ee_spki_sha256_usable", lambda w: rec(3, 1, 1, w.valid[0]), None),
    ("dane_ee_cert_sha512_usable", lambda w: rec(3, 0, 2, w.valid[0]), None),
    ("dane_ta_full_cert_usable", lambda w: rec(2, 0, 0, w.root), None),
    ("dane_ta_full_spki_usable", lambda w: rec(2, 1, 0, w.root), None),
    ("pkix_ta_unusable_for_smtp", lambda w: rec(0, 1, 1, w.root), "PKIX-TA"),
    ("pkix_ee_unusable_for_smtp", lambda w: rec(1, 1, 1, w.valid[0]), "PKIX-EE"),
    ("unknown_usage_unusable", lambda w: Tlsa(4, 1, 1, bytes(32)), "unknown certificate usage"),
    ("unknown_selector_unusable", lambda w: Tlsa(3, 2, 1, bytes(32)), "unknown selector"),
    ("unknown_matching_type_unusable", lambda w: Tlsa(3, 1, 3, bytes(32)), "unknown matching"),
    ("sha256_needs_32_octets", lambda w: Tlsa(3, 1, 1, bytes(31)), "32-octet"),
    ("sha256_rejects_64_octets", lambda w: Tlsa(3, 1, 1, bytes(64)), "32-octet"),
    ("sha512_needs_64_octets", lambda w: Tlsa(3, 1, 2, bytes(32)), "64-octet"),
    ("full_cert_must_parse", lambda w: Tlsa(3, 0, 0, b"\x30\x03\x02\x01\x00"), "certificate"),
    ("full_spki_must_parse", lambda w: Tlsa(2, 1, 0, bytes(40)), "SubjectPublicKeyInfo"),
    (
        "full_cert_selector_with_spki_data_unusable",
        lambda w: Tlsa(2, 0, 0, association_data(w.root, 1, 0)),
        "certificate",
    ),
]


@pytest.mark.parametrize(("build", "reason"), [r[1:] for r in USABLE], ids=[r[0] for r in USABLE])
def test_usable(world: World, build: Build, reason: str | None) -> None:
    got = usable(build(world))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


CLASSIFY: list[tuple[str, Callable[[World], list[Tlsa]], bool, bool]] = [
    ("no_records_no_tls_no_dane", lambda w: [], False, False),
    (
        "only_unusable_tls_mandatory_unauthenticated",
        lambda w: [Tlsa(1, 1, 1, bytes(32))],
        True,
        False,
    ),
    (
        "one_usable_among_unusable_authenticates",
        lambda w: [Tlsa(1, 1, 1, bytes(32)), rec(3, 1, 1, w.valid[0])],
        True,
        True,
    ),
]


@pytest.mark.parametrize(
    ("build", "tls_required", "authenticated"),
    [r[1:] for r in CLASSIFY],
    ids=[r[0] for r in CLASSIFY],
)
def test_classify(
    world: World, build: Callable[[World], list[Tlsa]], tls_required: bool, authenticated: bool
) -> None:
    records = build(world)
    result = classify(records)
    assert (result.tls_required, result.authenticated) == (tls_required, authenticated)
    assert len(result.usable) + len(result.unusable) == len(records)
    assert all(usable(r) is None for r in result.usable)
    assert all(u.reason == usable(u.record) for u in result.unusable)


# --- names (RFC 6125 §6.4 as profiled by RFC 7672 §3.2.3) ------------------------------------

NAMES = [
    ("exact_name", "mx.example.test", "mx.example.test", True),
    ("case_insensitive", "MX.Example.TEST", "mx.example.test", True),
    ("trailing_dot_ignored", "mx.example.test.", "mx.example.test", True),
    ("different_name", "mx2.example.test", "mx.example.test", False),
    ("wildcard_covers_one_label", "*.example.test", "mx.example.test", True),
    ("wildcard_not_two_labels", "*.example.test", "a.mx.example.test", False),
    ("wildcard_not_the_parent", "*.example.test", "example.test", False),
    ("wildcard_only_left_most", "mx.*.test", "mx.example.test", False),
    ("partial_wildcard_rejected", "m*.example.test", "mx.example.test", False),
    ("wildcard_needs_two_labels_after_it", "*.test", "example.test", False),
    ("no_substring_match", "example.test", "mx.example.test", False),
]


@pytest.mark.parametrize(
    ("pattern", "ref", "expected"), [r[1:] for r in NAMES], ids=[r[0] for r in NAMES]
)
def test_name_matches(pattern: str, ref: str, expected: bool) -> None:
    assert name_matches(pattern, ref) is expected


def test_cn_counts_only_without_san(world: World) -> None:
    assert certificate_names(world.cn_only[0]) == (HOST,)
    assert certificate_names(world.san_other[0]) == ("other.example.test",)


# --- chain verification ----------------------------------------------------------------------


def records_of(w: World, spec: str) -> list[Tlsa]:
    """Records from ``"U S M @cert; U S M HEX"``: ``@valid.0`` is the data computed for that
    certificate of ``World`` (``@x!spki`` computes it with selector 1 whatever ``S`` says)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        u, sel, m, target = part.split()
        if not target.startswith("@"):
            out.append(parse_tlsa(part))
            continue
        ref, _, override = target[1:].partition("!")
        name, _, index = ref.partition(".")
        obj = getattr(w, name)
        cert = obj[int(index)] if index else obj
        data_selector = 1 if override == "spki" else int(sel)
        out.append(Tlsa(int(u), int(sel), int(m), association_data(cert, data_selector, int(m))))
    return out


def chain_of(w: World, spec: str) -> Sequence[x509.Certificate]:
    """``"valid"`` is that chain of ``World``; ``"valid:1"`` its first certificate only."""
    name, _, count = spec.partition(":")
    chain: Sequence[x509.Certificate] = getattr(w, name)
    return chain[: int(count)] if count else chain


OK_EE, OK_TA = ("dane-ee", None), ("dane-ta", None)
MISMATCH = (None, ResultType.CERTIFICATE_HOST_MISMATCH)
EXPIRED = (None, ResultType.CERTIFICATE_EXPIRED)
NO_MATCH = (None, ResultType.VALIDATION_FAILURE)
TLSA_INVALID = (None, ResultType.TLSA_INVALID)
WRONG = "wrong.example.test"

# (rule, records, chain, reference names, expected (method, result_type))
VERIFY: list[tuple[str, str, str, list[str], tuple[str | None, ResultType | None]]] = [
    # DANE-EE: RFC 7672 §3.1.1, RFC 7671 §5.1
    ("ee_spki_sha256_matches_leaf", "3 1 1 @valid.0", "valid", [HOST], OK_EE),
    ("ee_cert_sha512_matches_leaf", "3 0 2 @valid.0", "valid", [HOST], OK_EE),
    ("ee_full_cert_matches_leaf", "3 0 0 @valid.0", "valid", [HOST], OK_EE),
    ("ee_full_spki_matches_leaf", "3 1 0 @valid.0", "valid", [HOST], OK_EE),
    ("ee_ignores_name", "3 1 1 @valid.0", "valid", [WRONG], OK_EE),
    ("ee_ignores_expiry", "3 1 1 @expired.0", "expired", [HOST], OK_EE),
    ("ee_ignores_issuer", "3 1 1 @self_signed.0", "self_signed", [HOST], OK_EE),
    ("ee_wrong_data_fails", "3 1 1 @other", "valid", [HOST], NO_MATCH),
    ("ee_matches_leaf_only_not_issuer", "3 1 1 @root", "valid", [HOST], NO_MATCH),
    ("ee_selector_decides_what_is_hashed", "3 0 1 @valid.0!spki", "valid", [HOST], NO_MATCH),
    # DANE-TA: RFC 7672 §3.1.2, RFC 7671 §5.2
    ("ta_root_sent_in_chain", "2 1 1 @root", "valid", [HOST], OK_TA),
    ("ta_root_through_intermediate", "2 0 2 @root", "inter", [HOST], OK_TA),
    ("ta_intermediate_as_anchor", "2 0 1 @inter.1", "inter_only", [HOST], OK_TA),
    ("ta_full_key_need_not_be_sent", "2 1 0 @root", "inter_only", [HOST], OK_TA),
    ("ta_full_cert_need_not_be_sent", "2 0 0 @root", "valid:1", [HOST], OK_TA),
    ("ta_digest_needs_anchor_in_chain", "2 1 1 @root", "valid:1", [HOST], NO_MATCH),
    ("ta_leaf_itself_is_no_anchor", "2 1 1 @valid.0", "valid", [HOST], NO_MATCH),
    ("ta_wrong_data_fails", "2 1 1 @other", "valid", [HOST], NO_MATCH),
    ("ta_name_mismatch", "2 1 1 @root", "valid", [WRONG], MISMATCH),
    ("ta_any_reference_name_suffices", "2 1 1 @root", "valid", [WRONG, HOST], OK_TA),
    ("ta_expired_leaf", "2 1 1 @root", "expired", [HOST], EXPIRED),
    ("ta_not_yet_valid_leaf", "2 1 1 @root", "future", [HOST], NO_MATCH),
    ("ta_chain_break_wrong_issuer", "2 1 1 @inter.1", "broken", [HOST], NO_MATCH),
    ("ta_forged_signature", "2 1 1 @root", "forged", [HOST], NO_MATCH),
    ("ta_issuer_must_be_ca", "2 1 1 @root", "not_ca", [HOST], NO_MATCH),
    ("ta_issuer_needs_key_cert_sign", "2 1 1 @root", "no_cert_sign", [HOST], NO_MATCH),
    ("ta_path_length_enforced", "2 1 1 @path_len.2", "path_len", [HOST], NO_MATCH),
    ("ta_rsa_root_ed25519_intermediate", "2 1 1 @rsa_ed.2", "rsa_ed", [HOST], OK_TA),
    ("ta_ed25519_key_in_dns_signed_leaf", "2 1 0 @rsa_ed.1", "rsa_ed:1", [HOST], OK_TA),
    ("ta_rsa_key_in_dns_signed_intermediate", "2 1 0 @rsa_ed.2", "rsa_ed:2", [HOST], OK_TA),
    ("ta_wildcard_covers_host", "2 1 1 @root", "wildcard", [HOST], OK_TA),
    ("ta_wildcard_one_label_only", "2 1 1 @root", "wildcard", ["a." + HOST], MISMATCH),
    ("ta_cn_used_without_san", "2 1 1 @root", "cn_only", [HOST], OK_TA),
    ("ta_cn_ignored_with_san", "2 1 1 @root", "san_other", [HOST], MISMATCH),
    # Several records: RFC 7672 §3.1 (any usable record that succeeds authenticates)
    ("several_ta_succeeds_after_ee_fails", "3 1 1 @other; 2 1 1 @root", "valid", [HOST], OK_TA),
    ("several_ee_succeeds_after_ta_fails", "2 1 1 @other; 3 1 1 @valid.0", "valid", [HOST], OK_EE),
    (
        "several_unusable_ignored",
        "3 1 1 0a0b; 1 1 1 @valid.0; 3 1 1 @valid.0",
        "valid",
        [HOST],
        OK_EE,
    ),
    (
        "several_failing_report_most_specific",
        "3 1 1 @other; 2 1 1 @root",
        "valid",
        [WRONG],
        MISMATCH,
    ),
    (
        "several_ee_needs_no_name_though_ta_does",
        "2 1 1 @root; 3 1 1 @valid.0",
        "valid",
        [WRONG],
        OK_EE,
    ),
    # No usable record: RFC 8460 §4.3.2.1 tlsa-invalid
    (
        "only_unusable_records_tlsa_invalid",
        "1 1 1 @valid.0; 3 1 1 0a0b",
        "valid",
        [HOST],
        TLSA_INVALID,
    ),
    ("no_records_tlsa_invalid", "", "valid", [HOST], TLSA_INVALID),
    ("no_certificate_presented", "3 1 1 @valid.0", "valid:0", [HOST], NO_MATCH),
]


@pytest.mark.parametrize(
    ("records", "chain", "names", "expected"), [r[1:] for r in VERIFY], ids=[r[0] for r in VERIFY]
)
def test_verify_chain(
    world: World,
    records: str,
    chain: str,
    names: list[str],
    expected: tuple[str | None, ResultType | None],
) -> None:
    tlsa = records_of(world, records)
    verdict = verify_chain(tlsa, chain_of(world, chain), names=names, now=NOW)
    method, result_type = expected
    assert (verdict.method, verdict.result_type) == (method, result_type), verdict.detail
    assert verdict.ok is (method is not None)
    # A success names the record that authenticated; a failure names none.
    assert (verdict.matched in tlsa) if verdict.ok else (verdict.matched is None)
    assert verdict.detail


def test_verify_chain_needs_aware_now(world: World) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_chain(
            [rec(3, 1, 1, world.valid[0])], world.valid, names=[HOST], now=NOW.replace(tzinfo=None)
        )


# --- CLI: mxguard dane match -----------------------------------------------------------------


def _pem(path: Path, chain: Sequence[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    return path


CLI: list[tuple[str, Callable[[World], list[str]], str, int, bool, str | None]] = [
    ("cli_match_exits_0", lambda w: [rec(3, 1, 1, w.valid[0]).to_text()], HOST, 0, True, "dane-ee"),
    ("cli_no_match_exits_1", lambda w: [rec(3, 1, 1, w.other).to_text()], HOST, 1, False, None),
    ("cli_ta_with_name", lambda w: [rec(2, 1, 1, w.root).to_text()], HOST, 0, True, "dane-ta"),
    (
        "cli_ta_wrong_name_exits_1",
        lambda w: [rec(2, 1, 1, w.root).to_text()],
        "x.test",
        1,
        False,
        None,
    ),
]


@pytest.mark.parametrize(
    ("texts", "name", "code", "valid", "method"), [r[1:] for r in CLI], ids=[r[0] for r in CLI]
)
def test_cli_match(
    world: World,
    tmp_path: Path,
    texts: Callable[[World], list[str]],
    name: str,
    code: int,
    valid: bool,
    method: str | None,
) -> None:
    pem = _pem(tmp_path / "chain.pem", world.valid)
    tlsa = [*texts(world), "3 1 1 00"]  # plus one unusable record, always reported
    args = ["dane", "match", "--chain", str(pem), "--name", name, "--json"]
    for text in tlsa:
        args += ["--tlsa", text]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    out = json.loads(result.output)
    assert (out["valid"], out["method"]) == (valid, method)
    assert (out["matched"] == tlsa[0]) is valid
    assert [r["tlsa"] for r in out["records"]] == tlsa
    assert [r["usable"] for r in out["records"]] == [True, False]
    assert out["records"][1]["reason"] == usable(parse_tlsa("3 1 1 00"))
    assert bool(out["errors"]) is not valid
    assert len(out["warnings"]) == 1


USAGE = [
    ("cli_bad_tlsa_is_usage_error", ["--tlsa", "3 1 1 zz"], "hexadecimal"),
    (
        "cli_missing_chain_is_usage_error",
        ["--tlsa", "3 1 1 00", "--chain", "/no/x.pem"],
        "cannot read",
    ),
    ("cli_empty_pem_is_usage_error", ["--tlsa", "3 1 1 00", "--chain", "EMPTY"], "no PEM"),
    ("cli_tlsa_required", [], "--tlsa"),
]


@pytest.mark.parametrize(("args", "message"), [r[1:] for r in USAGE], ids=[r[0] for r in USAGE])
def test_cli_usage_errors(world: World, tmp_path: Path, args: list[str], message: str) -> None:
    pem = _pem(tmp_path / "chain.pem", world.valid)
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if "--chain" not in args:
        args += ["--chain", str(pem)]
    result = CliRunner().invoke(main, ["dane", "match", "--name", HOST, *args])
    assert result.exit_code == 2
    assert message in result.output
