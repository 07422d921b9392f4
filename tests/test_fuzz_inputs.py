"""Arbitrary input to the parsers that face the network or the user raises only their own,
named error: never a crash of another kind (untrusted input is bounded everywhere, see
docs/design.md, "Conventions").

The record and policy parsers have such properties next to their table tests; these cover
the rest: SMTP replies, TLS-RPT reports (as received from others), scenario files, config
files and Postfix log lines.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mxguard import config
from mxguard.lab import certprofiles
from mxguard.lab.scenario import ScenarioError, from_toml
from mxguard.protocol import pkix
from mxguard.protocol.smtp import ReplyError, parse_reply, parse_reply_line
from mxguard.protocol.tlsrpt_report import ReportError, parse_report
from mxguard.tlsrpt import postfix_log

reply_lines = st.lists(st.binary(max_size=80), max_size=6)


@given(reply_lines)
def test_smtp_replies_raise_only_reply_error(lines: list[bytes]) -> None:
    try:
        reply = parse_reply(lines)
    except ReplyError:
        return
    assert 100 <= reply.code <= 599 and len(reply.lines) == len(lines)


@given(st.binary(max_size=120))
def test_smtp_reply_lines_raise_only_reply_error(line: bytes) -> None:
    with contextlib.suppress(ReplyError):
        parse_reply_line(line)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=30), children, max_size=5)
    ),
    max_leaves=25,
)
report_keys = st.sampled_from(
    ["organization-name", "date-range", "contact-info", "report-id", "policies", "policy",
     "summary", "failure-details", "start-datetime", "end-datetime", "policy-type",
     "policy-domain", "total-successful-session-count", "total-failure-session-count"]
)  # fmt: skip
report_like = st.dictionaries(report_keys, json_values, max_size=8)


@given(st.binary(max_size=300) | report_like.map(lambda d: json.dumps(d).encode()))
def test_received_reports_raise_only_report_error(data: bytes) -> None:
    for blob in (data, gzip.compress(data)):
        with contextlib.suppress(ReportError):
            parse_report(blob)


@given(st.text(max_size=400))
def test_scenario_files_raise_only_scenario_error(text: str) -> None:
    with contextlib.suppress(ScenarioError):
        from_toml(text, source="fuzz.toml")


@given(st.text(max_size=300))
def test_config_files_raise_only_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mxguard.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with contextlib.suppress(config.ConfigError):
            config.load(path)


postfix_like = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda pid, qid, rest: f"Nov 29 11:23:06 client postfix/smtp[{pid}]: {qid}: {rest}",
        st.integers(0, 99999),
        st.sampled_from(["C0D5320C7DB", "ABC", ""]),
        st.text(max_size=150)
        | st.sampled_from(
            [
                "to=<a@b.test>, relay=mx.b.test[127.0.0.1]:25, status=sent (250 ok)",
                "Verified TLS connection established to mx.b.test[127.0.0.1]:25: TLSv1.3",
                "TLS is required, but was not offered by host mx.b.test[127.0.0.1]",
            ]
        ),
    ),
)


@given(st.lists(postfix_like, max_size=8))
def test_postfix_log_lines_never_raise(lines: list[str]) -> None:
    import datetime as dt

    joiner = postfix_log.Joiner()
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    for text in lines:
        line = postfix_log.parse_line(text, now=now)
        if line is not None:
            list(joiner.feed(line))


# Presented certificate chains: the peer's bytes, handed to OpenSSL. Mutations of a real
# chain reach deep into the DER parser; whatever comes out is a verdict, never an exception.
_NOW = dt.datetime.now(dt.UTC)
_AUTHORITY = certprofiles.CertAuthority(_NOW)
_CHAIN = certprofiles.build(certprofiles.Profile(), certprofiles.MX, _NOW, _AUTHORITY).chain


def _mutate(der: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(der)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[: max(1, len(data) - cut)])


@given(
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
    st.integers(0, 40),
    st.lists(st.binary(max_size=200), max_size=3),
)
def test_presented_chains_get_a_verdict_never_an_exception(
    edits: list[tuple[int, int]], cut: int, junk: list[bytes]
) -> None:
    chain = [_mutate(_CHAIN[0], edits, cut), *(_CHAIN[1:]), *junk]
    verdict = pkix.verify_pkix(chain, name=certprofiles.MX, roots=_AUTHORITY.roots, now=_NOW)
    assert verdict.ok is (verdict.result_type is None)
    assert verdict.detail
