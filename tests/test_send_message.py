"""Big and malformed messages: `send` streams from disk, honours SIZE, refuses long lines.

- A line over 998 octets (RFC 5322 §2.1.1) is refused before any connection, with its number;
  receivers would refuse it after the whole transfer (the lab's says "500 Line too long").
- A message bigger than the SIZE a server advertises (RFC 1870) is not sent to it at all,
  and MAIL FROM carries SIZE= when the server offers the extension.
- A 60 MB message is sent with bounded memory: the sending process stays under 100 MB.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.engine.message import Message
from mxguard.lab.lab import Lab
from mxguard.protocol.smtp import MessageError

pytestmark = pytest.mark.lab

BIG = 60 * 1024 * 1024
LINE = b"x" * 98 + b"\r\n"  # 100 octets


def big_message(path: Path) -> Path:
    with path.open("wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        block = LINE * 10_000  # 1 MB
        for _ in range(BIG // len(block)):
            f.write(block)
    return path


def peak_rss_mb(args: list[str]) -> tuple[int, str, float]:
    """Run ``args`` in a fresh wrapper process: exit code, stdout, the child's peak RSS."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "sys.stdout.buffer.write(r.stdout)\n"
        "print('\\nRSS-KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=240
    )
    out, _, rss = done.stdout.rpartition("\nRSS-KB ")
    return done.returncode, out, int(rss) / 1024


def test_a_line_over_998_octets_is_refused_before_any_connection(lab: Lab, tmp_path: Path) -> None:
    message = tmp_path / "long.eml"
    message.write_bytes(b"Subject: x\r\n\r\nshort\r\n" + b"y" * 999 + b"\r\n")
    result = CliRunner().invoke(
        main,
        ["--config", str(lab.config_file), "--store", f"sqlite:///{tmp_path / 's.db'}",
         "send", "--from", "a@client.test", "--to", "b@nopolicy.test", "--data", str(message)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "line 4 of the message is longer than 998 octets" in result.output
    assert lab.receiver("mx.nopolicy.test").connections == 0


LINE_ROWS = [
    ("998_octets_is_fine", b"y" * 998 + b"\r\n", None),
    ("999_octets_is_too_long", b"y" * 999 + b"\r\n", "line 1"),
    ("bare_lf_lines_count_too", b"ok\n" + b"y" * 999 + b"\n", "line 2"),
    ("a_long_last_line_without_crlf", b"ok\r\n" + b"y" * 999, "line 2"),
]


@pytest.mark.parametrize(
    ("data", "error"), [r[1:] for r in LINE_ROWS], ids=[r[0] for r in LINE_ROWS]
)
def test_line_length_rule(data: bytes, error: str | None) -> None:
    if error is None:
        assert Message.from_bytes(data).size == len(data)
    else:
        with pytest.raises(MessageError, match=error):
            Message.from_bytes(data)


def test_a_message_bigger_than_the_servers_size_is_not_sent_and_memory_stays_bounded(
    lab: Lab, tmp_path: Path
) -> None:
    # The lab's receivers advertise SIZE 35882577 (the transcript's): 60 MB is too big.
    message = big_message(tmp_path / "big.eml")
    code, out, rss = peak_rss_mb(
        [sys.executable, "-m", "mxguard", "--config", str(lab.config_file),
         "--store", f"sqlite:///{tmp_path / 's.db'}", "send", "--json",
         "--from", "a@client.test", "--to", "b@nopolicy.test", "--data", str(message)]
    )  # fmt: skip
    result = json.loads(out)
    [attempt] = result["attempts"]
    assert code == 69, out
    assert "accepts at most 35882577 (its SIZE, RFC 1870)" in attempt["detail"]
    assert lab.receiver("mx.nopolicy.test").messages == []
    assert b"DATA" not in lab.attacker("mx.nopolicy.test").client_bytes()
    assert rss < 100, f"peak RSS {rss:.0f} MB for a {BIG >> 20} MB message"


class Sink:
    """An SMTP server on loopback that takes any size and keeps only a count of the bytes."""

    def __init__(self) -> None:
        self.mail_lines: list[bytes] = []
        self.data_bytes = 0
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250-SIZE 0\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.mail_lines.append(line)
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                while (chunk := await reader.readline()) not in (b".\r\n", b""):
                    self.data_bytes += len(chunk)
                writer.write(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


SENDER = """
import asyncio, json, sys
from pathlib import Path
from mxguard.engine.deliver import Sender
from mxguard.engine.message import Message
from mxguard.engine.policy import DeliveryPolicy, Mode, MxPolicy, Source, Status

class GivenPolicy:
    async def resolve(self, domain):
        mx = MxPolicy("mx.sink.test", 10, addresses=("127.0.0.1",))
        return DeliveryPolicy("sink.test", Source.NONE, Mode.NONE, Status.OK, mx=(mx,))

async def main():
    sender = Sender(GivenPolicy(), None, smtp_port=int(sys.argv[1]), timeout=60)
    message = Message.from_file(Path(sys.argv[2]))
    result = await sender.deliver("a@client.test", ["b@sink.test"], message)
    print(json.dumps(result.to_json()))

asyncio.run(main())
"""


def test_a_60_mb_message_is_streamed_in_bounded_memory(sink: Sink, tmp_path: Path) -> None:
    message = big_message(tmp_path / "big.eml")
    code, out, rss = peak_rss_mb([sys.executable, "-c", SENDER, str(sink.port), str(message)])
    assert code == 0, out
    assert json.loads(out)["status"] == "delivered"
    assert sink.data_bytes == message.stat().st_size  # no line starts with "."
    assert sink.mail_lines == [
        f"MAIL FROM:<a@client.test> SIZE={message.stat().st_size}\r\n".encode()
    ]
    assert rss < 100, f"peak RSS {rss:.0f} MB for a {BIG >> 20} MB message"
