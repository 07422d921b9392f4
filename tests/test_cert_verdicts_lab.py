"""Odd but real MX certificates under MTA-STS enforce: `mxguard send` and `mxguard cert verify`
give the verdict OpenSSL gives (and so Postfix), with the RFC 8460 result type, except where
RFC 8461 §4.2 is stricter.

Each `cert-<variant>.test` domain of the standard lab has one MX host presenting that variant
(lab/certprofiles.py) behind an honest path. Before this verdict was OpenSSL's, mail to the
first five was deferred forever while every OpenSSL-based MTA delivered it, and the RSA-1024
and AKI-mismatch chains were accepted where OpenSSL refuses them. tests/test_cert_differential.py
holds the same verdicts against OpenSSL's own tools on 69 variants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import CertKind

pytestmark = pytest.mark.lab

ROWS = [
    # (variant, result type; None = verified and delivered, rule if mxguard differs from OpenSSL)
    (CertKind.NO_AKI, None),
    (CertKind.LEAF_CA, None),
    (CertKind.NC_LEADING_DOT, None),
    (CertKind.NEGATIVE_SERIAL, None),
    (CertKind.EMPTY_SUBJECT, None),
    # RFC 7525 §4.3: RSA of at least 2048 bits (OpenSSL at security level 2: key too small).
    (CertKind.RSA1024, "validation-failure"),
    (CertKind.AKI_MISMATCH, "certificate-not-trusted"),  # OpenSSL finds no issuer
    (CertKind.SHA1, "validation-failure"),  # OpenSSL: digest too weak, not "not trusted"
    # RFC 8461 §4.2: the MX name must be a subjectAltName dNSName (OpenSSL falls back to CN).
    (CertKind.CN_ONLY, "certificate-host-mismatch"),
    (CertKind.IP_SAN_ONLY, "certificate-host-mismatch"),
]


def run(lab: Lab, store: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["--config", str(lab.config_file), "--store", f"sqlite:///{store}", *args]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout


def send_json(lab: Lab, store: Path, domain: str) -> tuple[int, dict[str, Any]]:
    code, out = run(lab, store, "send", "--from", "a@client.test", "--to", f"b@{domain}", "--json")
    return code, json.loads(out)


@pytest.mark.parametrize(("kind", "expected"), ROWS, ids=[k.value for k, _ in ROWS])
def test_send_gives_openssls_verdict_with_its_result_type(
    lab: Lab, tmp_path: Path, kind: CertKind, expected: str | None
) -> None:
    domain = f"cert-{kind.value}.test"
    code, result = send_json(lab, tmp_path / "store.db", domain)
    [attempt] = result["attempts"]
    assert attempt["result_type"] == expected, attempt["detail"]
    if expected is None:
        assert (code, attempt["verified"], attempt["delivered"]) == (0, "pkix", True)
        assert attempt["tls_version"] and not attempt["plaintext"]
        assert attempt["certificate_problems"] == []
    else:
        # MTA-STS enforce: a certificate the policy does not accept defers, nothing is sent.
        assert (code, attempt["verified"], attempt["delivered"]) == (75, None, False)
        assert attempt["certificate_problems"], attempt
        assert lab.receiver(f"mx.{domain}").messages == []
    assert attempt["certificates"][0]["dns_names"] == (
        [] if kind in (CertKind.CN_ONLY, CertKind.IP_SAN_ONLY) else [f"mx.{domain}"]
    )


@pytest.mark.parametrize(("kind", "expected"), ROWS, ids=[k.value for k, _ in ROWS])
def test_cert_verify_on_the_served_chain_says_what_send_said(
    lab: Lab, tmp_path: Path, kind: CertKind, expected: str | None
) -> None:
    domain = f"cert-{kind.value}.test"
    chain = lab.pki.issue(f"mx.{domain}", kind).cert_file
    code, out = run(
        lab, tmp_path / "s.db", "cert", "verify", "--chain", str(chain),
        "--name", f"mx.{domain}", "--json",
    )  # fmt: skip
    verdict = json.loads(out)
    assert (code, verdict["verified"], verdict["result_type"]) == (
        (0, True, None) if expected is None else (1, False, expected)
    )
    _, sent = send_json(lab, tmp_path / "s.db", domain)
    [attempt] = sent["attempts"]
    if expected is not None:
        assert verdict["detail"] in attempt["detail"]
        assert verdict["detail"] in attempt["certificate_problems"]


def test_send_verbose_shows_the_chain_and_every_problem(lab: Lab, tmp_path: Path) -> None:
    code, out = run(
        lab, tmp_path / "s.db", "send", "-v", "--from", "a@client.test",
        "--to", "b@cert-rsa1024.test",
    )  # fmt: skip
    assert code == 75
    assert "presented [0]: CN=mx.cert-rsa1024.test" in out
    assert "RSA 1024" in out
    assert "certificate problem: " in out and "key too weak" in out
