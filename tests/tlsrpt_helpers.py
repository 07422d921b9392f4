"""Shared by the TLS-RPT tests: settings that point mxguard at a running lab."""

from __future__ import annotations

from pathlib import Path

from mxguard.config import Settings, TlsRptSettings
from mxguard.lab.lab import Lab

SUBMITTER = "client.mxguard.test"


def lab_settings(lab: Lab, tmp_path: Path) -> Settings:
    return Settings(
        resolvers=(lab.resolver,), ca_file=lab.ca_file, smtp_port=lab.ports.smtp,
        https_port=lab.ports.https, store=f"sqlite:///{tmp_path / 'state.db'}",
        helo_name=SUBMITTER, fetch_timeout=3,
        tlsrpt=TlsRptSettings(organization_name="mxguard tests", contact_info="t@mxguard.test",
                              submitter=SUBMITTER, sender="tlsrpt@client.mxguard.test",
                              delay_window=0),
    )  # fmt: skip
