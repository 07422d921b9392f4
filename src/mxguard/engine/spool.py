"""Session results the store could not take, kept on local disk until it can.

TLS-RPT reports are built from the session results in the store (RFC 8460 §4). When the
store refuses a write (PostgreSQL down, a Redis store, which keeps no results, a locked or
broken file), dropping the results would silently shrink the domain's next report. They go
into a spool instead: a small SQLite file of its own (the store's format, so nothing new to
parse), and the next delivery whose results the store does take moves the spooled ones over
too. One process moves them at a time (an exclusive lock on ``spool.lock``). Results leave
the spool only after the store took them: a crash between the two would count those sessions
twice in a report rather than lose them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from mxguard.adapters.store import SessionLog, SessionResult, StoreError
from mxguard.adapters.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FAR = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


class ResultSpool:
    """``folder``/spool.db holds results waiting for the store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "spool.db"

    async def keep(self, results: Sequence[SessionResult]) -> None:
        """Keep ``results`` for later; StoreError if even the spool cannot take them."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = await SQLiteStore.open(str(self.path))
        try:
            await spool.add_results(list(results))
        finally:
            await spool.close()

    async def move_into(self, store: SessionLog) -> int:
        """Move every spooled result into ``store``; how many were moved."""
        if not self.path.exists():
            return 0
        with (self.folder / "spool.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.path.exists():
                return 0
            spool = await SQLiteStore.open(str(self.path))
            try:
                waiting = await spool.results_between(_EPOCH, _FAR)
                if waiting:
                    await store.add_results([replace(r, id=None) for r in waiting])
            finally:
                await spool.close()
            _remove(self.path)
        if waiting:
            log.warning("recorded %d TLS-RPT session result(s) kept in %s", len(waiting), self.path)
        return len(waiting)


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


async def record(
    store: SessionLog, spool: ResultSpool | None, results: Sequence[SessionResult]
) -> None:
    """``results`` into ``store``, then the spooled ones; into the spool when the store fails.

    The new results go first, so that a store that refuses everything costs one refused call
    and one spool write, not a read of the whole spool as well. Never raises: a reporting
    problem must not fail a delivery. What cannot be kept anywhere is logged with its count.
    """
    try:
        await store.add_results(list(results))
    except Exception as exc:  # StoreError, or a bug: neither may fail the delivery
        await _keep(spool, results, exc)
        return
    if spool is not None:
        try:
            await spool.move_into(store)
        except Exception as exc:  # they stay in the spool for the next delivery
            log.warning("could not move the spooled session results into the store: %s", exc)


async def _keep(
    spool: ResultSpool | None, results: Sequence[SessionResult], problem: Exception
) -> None:
    if spool is not None:
        try:
            await spool.keep(results)
            log.warning(
                "the store did not take %d TLS-RPT session result(s) (%s); kept in %s until "
                "it does", len(results), problem, spool.path,
            )  # fmt: skip
            return
        except (StoreError, OSError) as exc:
            problem = exc
    log.error("could not record %d TLS-RPT session result(s): %s", len(results), problem)


__all__ = ["ResultSpool", "record"]
