"""The global `--json` flag, `MXGUARD_JSON` and the config file's `json` key reach every command.

docs/design.md, "Command-line contract": `--json` is a global option, so `mxguard --json sts
check-record ...` must print JSON exactly as `mxguard sts check-record ... --json` does. The lab
commands are run against a stand-in for the lab: what is checked is the front end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mxguard.cli import main
from mxguard.lab import check as lab_check
from mxguard.lab import lab as lab_module

POLICY = "version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 604800\n"
HOST = "mx.example.com"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A policy file, and a self-signed chain with the DANE-EE record that pins it."""
    where = tmp_path_factory.mktemp("global-json")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    chain = where / "chain.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    policy = where / "mta-sts.txt"
    policy.write_text(POLICY)
    return {
        "policy": str(policy),
        "chain": str(chain),
        "tlsa": f"3 1 1 {hashlib.sha256(spki).hexdigest()}",
    }


# (id, arguments of the command, keys its JSON must have)
COMMANDS: list[tuple[str, Callable[[dict[str, str]], list[str]], set[str]]] = [
    ("sts-check-record", lambda f: ["sts", "check-record", "v=STSv1; id=1"], {"valid", "id"}),
    ("sts-check-policy", lambda f: ["sts", "check-policy", f["policy"]], {"valid", "mode", "mx"}),
    ("sts-match", lambda f: ["sts", "match", f["policy"], HOST], {"valid", "host", "matched"}),
    (
        "dane-match",
        lambda f: ["dane", "match", "--tlsa", f["tlsa"], "--chain", f["chain"], "--name", HOST],
        {"valid", "method", "records"},
    ),
    (
        "tlsrpt-check-record",
        lambda f: ["tlsrpt", "check-record", "v=TLSRPTv1; rua=mailto:r@example.com"],
        {"valid", "rua"},
    ),
]
WAYS = ["global-flag", "environment", "config-file"]


def _invoke(way: str, args: list[str], tmp_path: Path) -> Any:
    env: dict[str, str] = {}
    if way == "global-flag":
        args = ["--json", *args]
    elif way == "environment":
        env["MXGUARD_JSON"] = "1"
    else:
        config = tmp_path / "mxguard.toml"
        config.write_text("json = true\n")
        args = ["--config", str(config), *args]
    return CliRunner().invoke(main, args, env=env)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("args", "keys"), [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_lint_commands_honour_the_global_json_setting(
    files: dict[str, str],
    tmp_path: Path,
    way: str,
    args: Callable[[dict[str, str]], list[str]],
    keys: set[str],
) -> None:
    result = _invoke(way, args(files), tmp_path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert keys <= set(out), out
    assert out["valid"] is True
    assert out["errors"] == [] and isinstance(out["warnings"], list)


@pytest.mark.parametrize(("args", "keys"), [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_lint_commands_print_text_without_any_json_setting(
    files: dict[str, str], args: Callable[[dict[str, str]], list[str]], keys: set[str]
) -> None:
    result = CliRunner().invoke(main, args(files), env={"MXGUARD_JSON": ""})
    assert result.exit_code == 0, result.output
    assert ": valid" in result.output
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.output)


@pytest.mark.parametrize("way", WAYS)
def test_lab_scenarios_honours_the_global_json_setting(tmp_path: Path, way: str) -> None:
    result = _invoke(way, ["lab", "scenarios"], tmp_path)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert "standard" in {s["scenario"] for s in listed}
    assert all({"scenario", "description", "domains"} <= set(s) for s in listed)


class FakeLab:
    """Stands in for `mxguard.lab.lab.Lab`: starting it "presses Ctrl-C" at once."""

    def __init__(self, scenario: Any, workdir: Path | None = None, net: str = "") -> None:
        self.scenario = scenario
        self.net = net

    def start(self) -> None:
        signal.raise_signal(signal.SIGINT)  # `lab up` has installed its handler by now

    def stop(self) -> None:
        pass

    def __enter__(self) -> FakeLab:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "resolver": f"{self.net}.0.53:53",
            "ca_file": "/x/lab-ca.pem",
            "config": "/x/mxguard.toml",
            "domains": [],
        }


@pytest.fixture
def fake_lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(lab_module, "Lab", FakeLab)
    monkeypatch.setattr(
        lab_check, "run_checks", lambda lab: [("dns", True, ""), ("smtp", False, "refused")]
    )
    yield


@pytest.mark.parametrize("way", WAYS)
def test_lab_up_prints_its_summary_as_json_under_the_global_setting(
    fake_lab: None, tmp_path: Path, way: str
) -> None:
    result = _invoke(way, ["lab", "up", "--net", "127.97"], tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)  # the whole output: no "lab stopped" after it
    assert summary["scenario"] == "standard"
    assert summary["resolver"] == "127.97.0.53:53"


@pytest.mark.parametrize("way", [*WAYS, "own-flag"])
def test_lab_check_prints_json(fake_lab: None, tmp_path: Path, way: str) -> None:
    if way == "own-flag":
        result = CliRunner().invoke(main, ["lab", "check", "--json"])
    else:
        result = _invoke(way, ["lab", "check"], tmp_path)
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    assert out["ok"] is False
    assert out["checks"] == [
        {"check": "dns", "ok": True, "detail": ""},
        {"check": "smtp", "ok": False, "detail": "refused"},
    ]
    assert (out["passed"], out["failed"]) == (1, 1)
    assert isinstance(out["seconds"], float)


def test_lab_check_text_is_unchanged(fake_lab: None) -> None:
    result = CliRunner().invoke(main, ["lab", "check"])
    assert result.exit_code == 1
    assert "ok   dns" in result.output
    assert "FAIL smtp — refused" in result.output
    assert "1 passed, 1 failed" in result.output
