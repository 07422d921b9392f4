"""Listen addresses of the Postfix policy server: ``inet:HOST:PORT`` or ``unix:PATH``.

Parsing and printing only (``Listen.parse``, ``str(listen)``), plus ``bound()``, the address a
started listener actually got (port 0 picks a free port). Opens no sockets itself; the server
(``postfix/server.py``) does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ListenError(ValueError):
    """A listen address is not ``inet:HOST:PORT`` or ``unix:PATH``."""


@dataclass(frozen=True, slots=True)
class Listen:
    """Where to listen: TCP (``inet:127.0.0.1:8461``, ``inet:[::1]:8461``) or a UNIX socket."""

    host: str | None = None
    port: int = 0
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> Listen:
        if spec.startswith("unix:"):
            if not spec[5:]:
                raise ListenError(f"{spec!r}: unix: needs a socket path, e.g. unix:/run/mx.sock")
            return cls(path=Path(spec[5:]))
        rest = spec.removeprefix("inet:")
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ListenError(
                f"{spec!r} is not a listen address; use inet:HOST:PORT (e.g. "
                "inet:127.0.0.1:8461) or unix:PATH"
            )
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"inet:[{self.host}]:{self.port}" if ":" in str(self.host) else (
            f"inet:{self.host}:{self.port}"
        )  # fmt: skip


def bound(server: asyncio.Server, where: Listen) -> Any:
    """Where ``server``, started for ``where``, listens: ``(host, port)`` or the socket path."""
    if where.path is not None:
        return str(where.path)
    sockname = server.sockets[0].getsockname()
    return sockname[0], sockname[1]
