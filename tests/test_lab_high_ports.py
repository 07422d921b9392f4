"""As a normal user the lab cannot bind ports 53, 25 and 443: it uses high ports, and the
config it writes points mxguard at them. The whole path must work there too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab, LabPorts
from mxguard.lab.scenario import named

pytestmark = pytest.mark.lab


def test_a_lab_on_high_ports_serves_policy_and_delivery(tmp_path: Path) -> None:
    ports = LabPorts(dns=5353, smtp=2525, https=4443)
    scenario = named("standard")
    keep = {"sts-enforce.test", "dane-ee.test"}
    small = type(scenario)(
        name="high-ports", tld=scenario.tld,
        domains=tuple(d for d in scenario.domains if d.name in keep),
    )  # fmt: skip
    with Lab(small, net="127.81", ports=ports, workdir=tmp_path / "lab") as lab:
        assert "smtp_port = 2525" in lab.config_file.read_text()
        for domain, verified in [("sts-enforce.test", "pkix"), ("dane-ee.test", "dane-ee")]:
            result = CliRunner().invoke(
                main,
                ["--config", str(lab.config_file), "--store", f"sqlite:///{tmp_path}/s.db",
                 "send", "--from", "a@client.test", "--to", f"b@{domain}", "--json"],
            )  # fmt: skip
            out = json.loads(result.stdout)
            assert (result.exit_code, out["status"]) == (0, "delivered"), out
            assert out["attempts"][0]["verified"] == verified
