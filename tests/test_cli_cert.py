"""`mxguard cert verify`: exit codes, errors that name what to fix, and the time it judges at."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mxguard.cli import main
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import CertKind

MX = "mx.example.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("pki"))


def verify(pki: LabPKI, *args: str, chain: Path | None = None) -> Result:
    chain = chain or pki.issue(MX, CertKind.INTERMEDIATE).cert_file
    return CliRunner().invoke(
        main,
        ["cert", "verify", "--chain", str(chain), "--ca-file", str(pki.ca_file), *args],
    )


def test_a_good_chain_exits_0_and_shows_the_path(pki: LabPKI) -> None:
    result = verify(pki, "--name", MX)
    assert result.exit_code == 0, result.output
    assert "path: CN=mx.example.test" in result.output
    assert "intermediate CA" in result.output


def test_json_names_openssls_errors_and_each_certificate(pki: LabPKI) -> None:
    result = verify(pki, "--name", MX, "--json", chain=pki.issue(MX, CertKind.EXPIRED).cert_file)
    out = json.loads(result.output)
    assert result.exit_code == 1
    assert (out["valid"], out["result_type"], out["openssl_errors"]) == (
        False,
        "certificate-expired",
        [10],
    )
    assert out["presented"][0]["dns_names"] == [MX] and out["path"] == []


def test_at_moves_the_clock(pki: LabPKI) -> None:
    after_expiry = (pki.now + dt.timedelta(days=400)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = verify(pki, "--name", MX, "--at", after_expiry, "--json")
    assert json.loads(result.output)["result_type"] == "certificate-expired"


def test_a_certificate_expiring_within_21_days_is_a_warning(pki: LabPKI) -> None:
    soon = (pki.now + dt.timedelta(days=360)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = json.loads(verify(pki, "--name", MX, "--at", soon, "--json").output)
    assert out["valid"] and any("expires in" in w for w in out["warnings"])


def test_only_the_ca_file_is_trusted_without_system_roots(pki: LabPKI) -> None:
    out = json.loads(verify(pki, "--name", MX, "--no-system-roots", "--json").output)
    assert (out["valid"], out["roots"]) == (True, 1)


USAGE_ERRORS = [
    ("name_that_is_no_host_name", ["--name", "bad name..x"], "is not a host name"),
    ("time_that_is_no_time", ["--name", MX, "--at", "yesterday"], "not an ISO 8601 time"),
    ("ca_file_without_certificates", ["--name", MX, "--ca-file", "{empty}"], "no usable"),
]


@pytest.mark.parametrize(
    ("args", "message"), [r[1:] for r in USAGE_ERRORS], ids=[r[0] for r in USAGE_ERRORS]
)
def test_usage_errors_exit_2_and_say_what_is_wrong(
    pki: LabPKI, tmp_path: Path, args: list[str], message: str
) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    result = verify(pki, *[a.replace("{empty}", str(empty)) for a in args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize("content", [None, b"no pem here\n"], ids=["missing", "not_pem"])
def test_an_unusable_chain_file_is_a_usage_error_naming_it(
    pki: LabPKI, tmp_path: Path, content: bytes | None
) -> None:
    chain = tmp_path / "chain.pem"
    if content is not None:
        chain.write_bytes(content)
    result = verify(pki, "--name", MX, chain=chain)
    assert result.exit_code == 2
    assert str(chain) in result.output
