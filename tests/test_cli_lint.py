"""`mxguard sts ...` and `mxguard tlsrpt check-record`: the lint contract of the command line.

Every lint command prints `{"valid": bool, ...fields..., "errors": [...], "warnings": [...]}`
with --json and exits 0 when valid, 1 when invalid, 2 on a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli import main

POLICY = "version: STSv1\nmode: enforce\nmx: *.example.com\nmx: mail.example.net\nmax_age: 604800\n"
BAD_POLICY = "version: STSv1\nmode: enforced\nmax_age: 604800\n"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "mta-sts.txt"
    path.write_text(POLICY)
    return path


def run(args: list[str], stdin: bytes | None = None) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, [*args, "--json"], input=stdin)
    return result.exit_code, json.loads(result.output)


RECORDS = [
    # (rule, command, record, exit code, field checked, expected value)
    ("sts_valid_record", "sts", "v=STSv1; id=20240501", 0, "id", "20240501"),
    ("sts_invalid_record", "sts", "v=STSv1; id=a-b", 1, "errors", None),
    ("sts_record_with_quotes", "sts", '"v=STSv1; id=1"', 1, "errors", None),
    (
        "tlsrpt_valid_record",
        "tlsrpt",
        "v=TLSRPTv1; rua=mailto:r@example.com",
        0,
        "rua",
        ["mailto:r@example.com"],
    ),
    ("tlsrpt_invalid_scheme", "tlsrpt", "v=TLSRPTv1; rua=http://r.example/", 1, "errors", None),
]


@pytest.mark.parametrize(
    ("command", "record", "code", "key", "value"),
    [r[1:] for r in RECORDS],
    ids=[r[0] for r in RECORDS],
)
def test_check_record(command: str, record: str, code: int, key: str, value: object) -> None:
    exit_code, out = run([command, "check-record", record])
    assert exit_code == code
    assert out["valid"] is (code == 0)
    if value is None:
        assert out[key]
    else:
        assert out[key] == value
    assert isinstance(out["warnings"], list)


def test_check_policy_from_file(policy_file: Path) -> None:
    code, out = run(["sts", "check-policy", str(policy_file)])
    assert code == 0
    assert out["mode"] == "enforce"
    assert out["mx"] == ["*.example.com", "mail.example.net"]
    assert out["max_age"] == 604800
    assert out["errors"] == []


POLICIES_ON_STDIN = [
    # (rule, stdin, exit code, fragment expected in errors or None)
    ("valid_policy_on_stdin", POLICY.encode(), 0, None),
    ("invalid_mode_is_reported", BAD_POLICY.encode(), 1, "mode is 'enforced'"),
    ("policy_must_be_utf8", b"version: STSv1\nmode: \xff\n", 1, "not UTF-8"),
]


@pytest.mark.parametrize(
    ("stdin", "code", "fragment"),
    [r[1:] for r in POLICIES_ON_STDIN],
    ids=[r[0] for r in POLICIES_ON_STDIN],
)
def test_check_policy_from_stdin(stdin: bytes, code: int, fragment: str | None) -> None:
    exit_code, out = run(["sts", "check-policy", "-"], stdin=stdin)
    assert exit_code == code
    errors = out["errors"]
    assert isinstance(errors, list)
    if fragment is None:
        assert errors == []
    else:
        assert any(fragment in e for e in errors), errors


def test_check_policy_calls_an_mx_with_a_trailing_dot_invalid() -> None:
    body = POLICY.replace("mail.example.net", "mail.example.net.")
    code, out = run(["sts", "check-policy", "-"], stdin=body.encode())
    assert code == 1
    assert out["valid"] is False
    [error] = out["errors"]
    assert "line 4: mx 'mail.example.net.' ends with a dot" in error
    assert "write 'mx: mail.example.net'" in error
    text = CliRunner().invoke(main, ["sts", "check-policy", "-"], input=body.encode())
    assert text.exit_code == 1
    assert "INVALID" in text.output and "error: line 4: mx 'mail.example.net.'" in text.output


def test_sts_match_warns_that_other_senders_may_not_match_a_trailing_dot(tmp_path: Path) -> None:
    # mxguard matches it (its sender removes the dot), so the match is valid; but say that
    # other senders may not.
    path = tmp_path / "mta-sts.txt"
    path.write_text(POLICY.replace("mail.example.net", "mail.example.net."))
    code, out = run(["sts", "match", str(path), "mail.example.net"])
    assert code == 0
    assert out["matched"] == "mail.example.net"
    assert any("'mail.example.net.'" in w and "other senders" in w for w in out["warnings"])


def test_oversized_policy_warns() -> None:
    big = POLICY + "".join(f"x{i}: {'y' * 60}\n" for i in range(1200))
    code, out = run(["sts", "check-policy", "-"], stdin=big.encode())
    assert code == 0
    assert any("senders refuse" in w for w in out["warnings"])


MATCHES = [
    # (rule, host, exit code, pattern that matched)
    ("wildcard_match_named", "mx1.example.com", 0, "*.example.com"),
    ("exact_match_named", "MAIL.example.net.", 0, "mail.example.net"),
    ("two_labels_do_not_match_wildcard", "a.b.example.com", 1, None),
    ("unlisted_host_refused", "mx.evil.test", 1, None),
]


@pytest.mark.parametrize(
    ("host", "code", "pattern"), [r[1:] for r in MATCHES], ids=[r[0] for r in MATCHES]
)
def test_sts_match(policy_file: Path, host: str, code: int, pattern: str | None) -> None:
    exit_code, out = run(["sts", "match", str(policy_file), host])
    assert exit_code == code
    assert out["valid"] is (code == 0)
    assert out["host"] == host
    assert out["matched"] == pattern


def test_sts_match_with_invalid_policy(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(BAD_POLICY)
    code, out = run(["sts", "match", str(path), "mx.example.com"])
    assert code == 1
    assert any("the policy is invalid" in e for e in out["errors"])


USAGE = [
    ("check_record_needs_text", ["sts", "check-record"]),
    ("check_policy_needs_a_file", ["sts", "check-policy"]),
    ("missing_file", ["sts", "check-policy", "/nonexistent/mta-sts.txt"]),
    ("match_needs_a_host", ["sts", "match", "-"]),
    ("tlsrpt_check_record_needs_text", ["tlsrpt", "check-record"]),
]


@pytest.mark.parametrize("args", [r[1] for r in USAGE], ids=[r[0] for r in USAGE])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert CliRunner().invoke(main, args).exit_code == 2


def test_human_output_says_valid_or_invalid(policy_file: Path) -> None:
    ok = CliRunner().invoke(main, ["sts", "match", str(policy_file), "mx1.example.com"])
    assert ok.exit_code == 0
    assert "valid" in ok.output
    assert "*.example.com" in ok.output
    bad = CliRunner().invoke(main, ["sts", "check-record", "v=STSv1"])
    assert bad.exit_code == 1
    assert "INVALID" in bad.output
