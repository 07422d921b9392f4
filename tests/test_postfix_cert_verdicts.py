"""The same MX certificates judged by a real Postfix and by `mxguard send`: the same verdict.

Under `serve postfix`, mxguard answers `secure match=<the MX hosts>` for an MTA-STS enforce
domain and Postfix verifies the MX host's certificate itself, with OpenSSL. `mxguard send`
verifies with OpenSSL's X509_verify_cert too. For every `cert-<variant>.test` domain of the
lab (one MX host presenting that variant, honest path) both must deliver or both must defer;
where they may differ, the row names the RFC 8461 rule that makes mxguard the stricter one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab
from mxguard.lab.pki import PROFILE_KINDS
from mxguard.lab.scenario import CertKind

pytest.register_assert_rewrite("postfix_harness")

from postfix_harness import PostfixInstance  # noqa: E402

pytest_plugins = ["postfix_harness"]

pytestmark = pytest.mark.lab

# Where Postfix delivers and mxguard, by a rule it follows on purpose, defers. Postfix's
# `secure` level falls back to the subject CN when a certificate has no DNS name in its
# subjectAltName, and Postfix 3.7 runs OpenSSL at a lower security level than OpenSSL's default
# here (it verifies an RSA-1024 key but not a SHA-1 signature: level 1).
RFC_RULES = {
    CertKind.CN_ONLY: "RFC 8461 §4.2: the MX identity is a SAN dNSName; no CN fallback",
    CertKind.RSA1024: (
        "RFC 7525 §4.3 (BCP 195, which RFC 8461 §3.3 requires of the policy fetch): RSA keys "
        "of at least 2048 bits; MX hosts are held to the policy host's security level, 2"
    ),
}
KINDS = sorted(PROFILE_KINDS, key=lambda k: k.value)


def mxguard_delivers(lab: Lab, store: Path, domain: str) -> bool:
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{store}", "send",
         "--from", "a@client.test", "--to", f"b@{domain}", "--json"],
    )  # fmt: skip
    assert result.exit_code in (0, 75), result.output
    return bool(json.loads(result.stdout)["delivered"])


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_postfix_and_mxguard_give_the_same_verdict(
    lab: Lab, postfix_mta: PostfixInstance, tmp_path: Path, kind: CertKind
) -> None:
    if lab.ports.smtp != 25:
        pytest.skip("Postfix delivers to port 25: the lab must run as root")
    domain = f"cert-{kind.value}.test"
    _, outcome = postfix_mta.deliver(f"postmaster@{domain}")
    postfix_sent = outcome.status == "sent"
    ours = mxguard_delivers(lab, tmp_path / "store.db", domain)
    if kind in RFC_RULES:
        assert (postfix_sent, ours) == (True, False), (RFC_RULES[kind], outcome.reason)
    else:
        assert ours == postfix_sent, (outcome.status, outcome.reason, outcome.lines)
    if postfix_sent:
        assert outcome.tls == ("Verified",), outcome.lines
