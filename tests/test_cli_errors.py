"""Bad input to the command line gets a clear usage error (exit 2), before anything happens.

Each row is a mistake a user or a script could make; the message must name what was wrong.
None of these may fall back to a default silently (an empty resolver would turn DANE off, an
unusable CA file would turn MTA-STS off) or be reported as "deferred" (callers would retry a
bad address forever).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=env)
    return result.exit_code, result.output


@pytest.fixture
def empty_pem(tmp_path: Path) -> Path:
    path = tmp_path / "empty.pem"
    path.write_text("")
    return path


def test_an_unusable_ca_file_stops_every_command(empty_pem: Path) -> None:
    for command in (["policy", "example.test"], ["serve", "postfix", "--query", "example.test"]):
        code, out = run(["--ca-file", str(empty_pem), *command])
        assert code == 2, out
        assert "holds no usable certificate" in out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--resolver", "", "policy", "example.test"], None, "--resolver"),
        (["policy", "example.test"], {"MXGUARD_RESOLVER": ","}, "MXGUARD_RESOLVER"),
        (["--store", " ", "policy", "example.test"], None, "--store"),
        (["tlsrpt", "run", "--poll", "nan"], None, "is not a number of seconds"),
        (["tlsrpt", "run", "--grace", "-1"], None, "is not a number of seconds"),
        (["lab", "up", "--net", "999.1"], None, "must look like '127.N'"),
        (["--store", "redis://[", "policy", "example.test"], None, "not a valid Redis URL"),
    ],
    ids=[
        "empty-resolver",
        "empty-resolver-env",
        "empty-store",
        "poll-nan",
        "grace-negative",
        "lab-net",
        "redis-url",
    ],
)
def test_usage_errors_name_the_mistake(
    args: list[str], env: dict[str, str] | None, message: str
) -> None:
    code, out = run(args, env)
    assert code == 2, out
    assert message in out


@pytest.mark.lab
@pytest.mark.parametrize(
    "sender", ["a@example.org>\r\nRCPT TO:<evil@x.test", "x" * 600 + "@example.org"]
)
def test_a_bad_sender_is_refused_before_any_connection(lab: Lab, sender: str) -> None:
    code, out = run(["--config", str(lab.config_file), "send", "--from", sender,
                     "--to", "bob@nopolicy.test"])  # fmt: skip
    assert code == 2, out
    assert lab.attacker("mx.nopolicy.test").sessions == []


@pytest.mark.lab
def test_a_bad_recipient_fails_for_good_without_a_connection(lab: Lab, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/s.db"
    args = ["--config", str(lab.config_file), "--store", store, "send"]
    code, out = run([*args, "--from", "a@example.org", "--to", "bad<x>@nopolicy.test"])
    assert code == 69, out
    assert lab.attacker("mx.nopolicy.test").sessions == []


def test_a_helo_name_that_is_not_a_host_name_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "mxguard.toml"
    config.write_text('helo_name = "client.test\\r\\nMAIL FROM:<x@y>"\n')
    code, out = run(["--config", str(config), "policy", "example.test"])
    assert code == 2, out
    assert "helo_name" in out and "is not a host name" in out


@pytest.mark.parametrize("host", ["", "a..b", "x" * 300])
def test_sts_match_refuses_a_host_that_is_not_a_host_name(tmp_path: Path, host: str) -> None:
    policy = tmp_path / "policy.txt"
    policy.write_text("version: STSv1\nmode: enforce\nmx: *.a.test\nmax_age: 100\n")
    code, out = run(["sts", "match", str(policy), host])
    assert code == 2, out
    assert "is not a host name" in out
