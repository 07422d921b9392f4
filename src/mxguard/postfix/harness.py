"""Running an asyncio service on a background thread, for tests and the Postfix harness.

``ThreadHarness`` is a mixin for a class with ``async start()``, ``async stop()`` and a
``grace`` (seconds ``stop()`` may take). It gives the class a private event loop on a daemon
thread, ``call()`` to run a coroutine on that loop from the calling thread, and the context
manager protocol::

    with PolicyServer(settings, listen="inet:127.0.0.1:0") as server:
        host, port = server.socketmap_address
        server.call(server.lookup("example.com"))

``mxguard serve postfix`` does not use it: there the service runs on the main thread's loop.
Touches only its own thread and loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")


class ThreadHarness:
    """Start, call into and stop a service on a thread of its own (see the module docstring)."""

    grace: float
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def start_in_thread(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="mxguard-postfix", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self.call(self.start())
        except BaseException:
            self.stop_in_thread()
            raise
        return self

    def stop_in_thread(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self.call(self.stop(), timeout=self.grace + 15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the service's loop (service started with ``start_in_thread``)."""
        if self._loop is None:
            raise RuntimeError("the policy server is not running on a thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()
