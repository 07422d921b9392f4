"""Helpers shared by the tests that start lab SMTP peers one by one (no whole lab): a
loopback address pool per test file, receivers and attackers as context managers, and an
event-loop runner that fails when a test leaves a task behind."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

from mxguard.lab.attacker import Attacker
from mxguard.lab.pki import LabPKI
from mxguard.lab.scenario import AttackMode, Host
from mxguard.lab.smtp_receiver import SmtpReceiver


class AddressPool:
    """Fresh addresses of one /16 (``prefix`` like "127.202"): no two tests share one, so
    port 25 is always free."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._next = itertools.count(1)

    def __call__(self) -> str:
        n = next(self._next)
        return f"{self.prefix}.{n // 250}.{n % 250 + 1}"


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    """Run a test's coroutine; whatever it started, it must have stopped."""

    async def main() -> None:
        await coro_fn()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not others, f"tasks left behind: {others}"

    asyncio.run(main())


@contextlib.asynccontextmanager
async def receiver_for(pki: LabPKI, host: Host, address: str) -> AsyncIterator[SmtpReceiver]:
    identity = pki.issue(host.name, host.cert) if host.starttls else None
    receiver = SmtpReceiver(host, identity, address, 25)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@contextlib.asynccontextmanager
async def attacked(
    pki: LabPKI, mode: AttackMode, host: Host, addresses: AddressPool
) -> AsyncIterator[tuple[SmtpReceiver, Attacker]]:
    """A receiver for ``host`` with an attacker in ``mode`` in front of it."""
    async with receiver_for(pki, host, addresses()) as receiver:
        upstream = (receiver.address, receiver.port)
        attacker = Attacker(host.name, (addresses(), 25), upstream, mode, pki)
        await attacker.start()
        try:
            yield receiver, attacker
        finally:
            await attacker.stop()
