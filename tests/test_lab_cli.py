"""The lab's front ends: `mxguard lab up` (foreground, clean exit), `lab check`, `lab scenarios`,
and scenario files with mistakes in them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.scenario import ScenarioError, builtin_names, from_toml, named

MXGUARD = [sys.executable, "-m", "mxguard"]


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.lab
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_lab_up_prints_its_summary_and_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    workdir = tmp_path / "lab"
    proc = subprocess.Popen(
        [*MXGUARD, "lab", "up", "--net", "127.79", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C or SIGTERM stops the lab" in line:
                break
        text = "".join(lines)
        assert "resolver (Unbound, validating): 127.79.0.53:" in text
        assert f"lab CA file:                    {workdir}/pki/lab-ca.pem" in text
        assert "dane-ee.test" in text and "DANE-EE (3 1 1)" in text
        unbound = children_of(proc.pid)
        assert unbound, "Unbound should run as a child of the lab"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert "lab stopped" in proc.stdout.read()
        for pid in unbound:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.lab
def test_lab_check_passes() -> None:
    result = subprocess.run(
        [*MXGUARD, "lab", "check", "--net", "127.80"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout
    assert result.stdout.count("ok  ") >= 10


def test_lab_scenarios_lists_every_builtin_domain() -> None:
    result = CliRunner().invoke(main, ["lab", "scenarios", "--json"])
    assert result.exit_code == 0
    listed = {s["scenario"]: s for s in json.loads(result.stdout)}
    assert set(listed) == set(builtin_names())
    standard = named("standard")
    assert [d["domain"] for d in listed["standard"]["domains"]] == [
        d.name for d in standard.domains
    ]
    assert all(d["demonstrates"] for d in listed["standard"]["domains"])


BAD_SCENARIOS = [
    ("not toml [", "not valid TOML"),
    ('colour = "red"', "unknown key(s) colour"),
    ('[[domain]]\nname = "example.com"', "must be a name under .test"),
    ('[[domain]]\nname = "a.test"\ndnssec = "maybe"', "'maybe' is not one of"),
    ('[[domain]]\nname = "a.test"\nmx = ["ten mx.a.test"]', "is not 'PREFERENCE HOST'"),
    ('[[domain]]\nname = "a.test"\n[[domain.host]]\nname = "mx.b.test"', "is not in its zone"),
    ('[[domain]]\nname = "a.test"\n[[domain.host]]\nname = "mx.a.test"\ntlsa = ["3 1"]',
     "is not 'U S M'"),
    ('[[domain]]\nname = "a.test"\n[[domain.host]]\nname = "mx.a.test"\nattack = "nuke"',
     "'nuke' is not one of"),
    ('[[domain]]\nname = "a.test"\n[[domain]]\nname = "a.test"', "listed twice"),
    ('[[domain]]\nname = "a.test"\nlocal_rule = "strong"', "'strong' is not one of"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_SCENARIOS, ids=[m for _, m in BAD_SCENARIOS])
def test_bad_scenarios_are_refused_with_a_message_naming_the_mistake(
    text: str, message: str
) -> None:
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_toml(text, source="bad.toml")


def test_lab_up_with_an_unknown_scenario_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["lab", "up", "no-such-scenario"])
    assert result.exit_code == 2
    assert "no built-in scenario 'no-such-scenario'" in result.output
