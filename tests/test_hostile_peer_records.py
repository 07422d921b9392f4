"""A hostile receiver cannot erase its own TLS-RPT record with the bytes it sends.

The peer chooses its banner and EHLO reply, and the first word becomes the session result's
`receiving_helo`. A NUL there (PostgreSQL text cannot hold one, and the store refuses it on
every backend) or bytes that are not UTF-8 must be kept escaped, not make the whole
delivery's results unrecordable. The peer is a real SMTP server on loopback; only the
policy is given directly, since no DNS is involved.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mxguard.adapters.store import open_store
from mxguard.engine.deliver import Sender, storable
from mxguard.engine.policy import DeliveryPolicy, Mode, MxPolicy, Source, Status


class _GivenPolicy:
    def __init__(self, policy: DeliveryPolicy) -> None:
        self.policy = policy

    async def resolve(self, domain: str) -> DeliveryPolicy:
        return self.policy


async def _hostile_smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    name = b"evil\x00name\xff"
    writer.write(b"220 " + name + b" ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250-" + name + b" hello\r\n250 8BITMIME\r\n")
        elif verb == b"DATA":
            writer.write(b"354 go on\r\n")
            await writer.drain()
            while await reader.readline() not in (b".\r\n", b""):
                pass
            writer.write(b"250 2.0.0 taken\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            break
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_nul_in_the_peers_name_is_recorded_escaped(tmp_path: Path, backend: str) -> None:
    async def run() -> None:
        server = await asyncio.start_server(_hostile_smtp, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = await open_store(f"sqlite:///{tmp_path / 'state.db'}")
        policy = DeliveryPolicy(
            "hostile.test", Source.NONE, Mode.NONE, Status.OK,
            mx=(MxPolicy("mx.hostile.test", 10, addresses=("127.0.0.1",)),),
        )  # fmt: skip
        sender = Sender(_GivenPolicy(policy), store, smtp_port=port, timeout=10)  # type: ignore[arg-type]
        try:
            result = await sender.deliver(
                "a@client.test", ["b@hostile.test"], b"Subject: x\r\n\r\nhi\r\n"
            )
            assert result.exit_code == 0
            start = policy.resolved_at.replace(year=2000)
            end = policy.resolved_at.replace(year=2100)
            [recorded] = await store.results_between(start, end)
            # The client decodes replies with U+FFFD for bytes that are not UTF-8.
            assert recorded.receiving_helo == "evil\\x00name\ufffd"
        finally:
            await store.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())


STORABLE = [
    ("plain_text_is_unchanged", "mx.example.com", "mx.example.com"),
    ("nul_is_escaped", "a\x00b", "a\\x00b"),
    ("lone_surrogate_is_escaped", "a\udcffb", "a\\udcffb"),
    ("none_stays_none", None, None),
]


@pytest.mark.parametrize(
    ("text", "expected"), [r[1:] for r in STORABLE], ids=[r[0] for r in STORABLE]
)
def test_storable(text: str | None, expected: str | None) -> None:
    assert storable(text) == expected
