"""`mxguard serve postfix --query KEY`: one answer, and an exit status a script can act on.

0 for OK and NOTFOUND (Postfix has its answer), 75 (EX_TEMPFAIL) for TEMP (Postfix would
defer the mail and ask again: a script must not take it for an answer), 2 for PERM (the key is
not one Postfix sends: the caller's mistake). JSON or text, the status is the same.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.lab.lab import Lab


@pytest.fixture
def servfail_resolver() -> Iterator[str]:
    """A DNS resolver on loopback that answers every query with SERVFAIL, at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                reply = dns.message.make_response(dns.message.from_wire(data))
            except dns.exception.DNSException:
                continue
            reply.set_rcode(dns.rcode.SERVFAIL)
            sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        sock.close()


def query(args: list[str], key: str, *, as_json: bool = False) -> tuple[int, str]:
    command = [*args, "serve", "postfix", "--query", key, *(["--json"] if as_json else [])]
    result = CliRunner().invoke(main, command)
    return result.exit_code, result.output


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_temp_answer_exits_75(servfail_resolver: str, tmp_path: Path, as_json: bool) -> None:
    args = ["--resolver", servfail_resolver, "--store", f"sqlite:///{tmp_path}/s.db"]
    code, out = query(args, "example.test", as_json=as_json)
    assert code == 75, out
    if as_json:
        doc = json.loads(out)
        assert doc["kind"] == "TEMP" and doc["answer"].startswith("TEMP ")
    else:
        assert out.startswith("TEMP ")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_notfound_answer_without_a_lookup_exits_0(tmp_path: Path, as_json: bool) -> None:
    # An IP literal next hop: NOTFOUND without any DNS (Postfix applies its own default).
    code, out = query(["--store", f"sqlite:///{tmp_path}/s.db"], "[192.0.2.1]", as_json=as_json)
    assert code == 0, out
    assert (json.loads(out)["kind"] if as_json else out.split()[0]) == "NOTFOUND"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_perm_answer_for_an_invalid_key_exits_2(tmp_path: Path, as_json: bool) -> None:
    code, out = query(["--store", f"sqlite:///{tmp_path}/s.db"], "not a key", as_json=as_json)
    assert code == 2, out
    assert (json.loads(out)["kind"] if as_json else out.split()[0]) == "PERM"


def test_help_says_what_the_exit_codes_mean() -> None:
    result = CliRunner().invoke(main, ["serve", "postfix", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "With --query KEY: 0 for an OK or NOTFOUND answer, 75 (EX_TEMPFAIL) for TEMP" in text
    assert "2 for PERM" in text


LAB_ANSWERS = [
    # (domain, kind of answer, exit status)
    ("dane-bogus.test", "TEMP", 75),  # DNSSEC bogus: defer, never a weaker level
    ("dane-ee.test", "OK", 0),
    ("sts-enforce.test", "OK", 0),
    ("nopolicy.test", "NOTFOUND", 0),
]


@pytest.mark.lab
@pytest.mark.parametrize(("domain", "kind", "code"), LAB_ANSWERS, ids=[r[0] for r in LAB_ANSWERS])
def test_exit_status_follows_the_answer_in_the_lab(
    lab: Lab, tmp_path: Path, domain: str, kind: str, code: int
) -> None:
    args = ["--config", str(lab.config_file), "--store", f"sqlite:///{tmp_path}/s.db"]
    for as_json in (False, True):
        exit_code, out = query(args, domain, as_json=as_json)
        assert exit_code == code, out
        assert (json.loads(out)["kind"] if as_json else out.split()[0]) == kind
