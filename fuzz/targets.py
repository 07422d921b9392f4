"""Fuzz targets: every parser of untrusted input, as a function of raw bytes.

Each target feeds the bytes to one parser the way mxguard receives them (a TXT record's
strings, a policy body, an SMTP reply, a netstring stream, a TLS report, a log line, ...) and
lets only that parser's named error pass. Anything else that escapes is a bug: the fuzzer
(fuzz/run.py, with atheris) reports it, and tests/test_fuzz_corpus.py replays every input
kept in fuzz/corpus/<target>/ in CI, so a crash once found stays found.

Pure and quick: no network, no files, no clock (a fixed time is passed where one is needed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import Callable
from pathlib import Path

from mxguard import config
from mxguard.lab.scenario import ScenarioError, from_toml
from mxguard.postfix import answers, netstring
from mxguard.protocol import dane, localrules, mtasts, names, policylist, smtp, tlsrpt
from mxguard.protocol import tlsrpt_report as report
from mxguard.tlsrpt import postfix_log

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _text(data: bytes) -> str:
    # What the DNS and HTTP adapters hand on: bytes decoded, undecodable ones replaced.
    return data.decode("utf-8", "replace")


def _strings(data: bytes) -> list[str]:
    # A TXT RRset: several records, split here on NUL (which no record we parse contains).
    return [_text(part) for part in data.split(b"\x00")]


def sts_record(data: bytes) -> None:
    with contextlib.suppress(mtasts.StsRecordError):
        mtasts.select_record(_strings(data))
    with contextlib.suppress(mtasts.StsRecordError):
        mtasts.parse_record(_text(data))


def sts_policy(data: bytes) -> None:
    with contextlib.suppress(mtasts.PolicyError):
        policy = mtasts.parse_policy(_text(data))
        for pattern in policy.mx:
            names.identifier_matches(pattern, "mx.example.com", tld_wildcard=True)


def tlsrpt_record(data: bytes) -> None:
    with contextlib.suppress(tlsrpt.TlsRptRecordError):
        tlsrpt.select_record(_strings(data))


def tlsa_record(data: bytes) -> None:
    with contextlib.suppress(dane.TlsaError):
        dane.parse_tlsa(_text(data))


def host_name(data: bytes) -> None:
    with contextlib.suppress(names.HostNameError):
        names.normalise_host(_text(data))
    with contextlib.suppress(names.HostNameError):
        names.normalise_pattern(_text(data))
    with contextlib.suppress(names.HostNameError):
        names.dns_name(_text(data))


def policy_list(data: bytes) -> None:
    with contextlib.suppress(policylist.PolicyListError):
        policylist.parse_list(data, now=NOW)


def local_rules(data: bytes) -> None:
    text = _text(data)
    domain, _, level = text.partition("=")
    with contextlib.suppress(localrules.RuleError):
        localrules.parse_rules({domain: level})


def smtp_reply(data: bytes) -> None:
    with contextlib.suppress(smtp.ReplyError):
        smtp.parse_reply(data.split(b"\n")[:20])


def netstrings(data: bytes) -> None:
    # The socketmap stream in random pieces: the decoder must never raise, whatever arrives.
    decoder = netstring.NetstringDecoder()
    step = (data[0] % 7) + 1 if data else 1
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
    lines = netstring.LineDecoder()
    lines.feed(data)


def postfix_key(data: bytes) -> None:
    answers.parse_key_bytes(data)  # returns an answer (PERM) for a bad key, never raises


def tls_report(data: bytes) -> None:
    with contextlib.suppress(report.ReportError):
        report.parse_report(data)


def postfix_log_lines(data: bytes) -> None:
    joiner = postfix_log.Joiner()
    for text in _text(data).splitlines()[:50]:
        line = postfix_log.parse_line(text, now=NOW)
        if line is not None:
            list(joiner.feed(line))


def scenario(data: bytes) -> None:
    with contextlib.suppress(ScenarioError):
        from_toml(_text(data), source="fuzz.toml")


def config_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mxguard.toml"
        path.write_bytes(data)
        with contextlib.suppress(config.ConfigError):
            config.load(path)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sts_record": sts_record,
    "sts_policy": sts_policy,
    "tlsrpt_record": tlsrpt_record,
    "tlsa_record": tlsa_record,
    "host_name": host_name,
    "policy_list": policy_list,
    "local_rules": local_rules,
    "smtp_reply": smtp_reply,
    "netstrings": netstrings,
    "postfix_key": postfix_key,
    "tls_report": tls_report,
    "postfix_log": postfix_log_lines,
    "scenario": scenario,
    "config": config_file,
}
