"""The Postfix policy server's connection policy: which connection to close, and when.

Sans-I/O bookkeeping (like ``netstring``): no sockets, no clock (callers pass ``now``, in
monotonic seconds). The server (``server.py``) tells the table what happens on each
connection and closes the connections the table gives back.

A connection is in one of three states:

- **waiting**: accepted, no complete request yet;
- **busy**: at least one complete request whose reply is not written yet;
- **idle**: it has sent requests and every one of them is answered.

The rules, so that connections that do not ask cannot keep out a client that does:

1. At most ``max_connections`` connections. A new connection beyond that is *admitted*, and
   an old one is closed in its place: the connection that has waited longest, once it has
   waited ``request_grace`` seconds (1 s) without sending a request; otherwise the one that
   has gone longest without activity, a waiting one counted from its accept, an idle one from
   its last reply. Only when every connection is busy is the new one refused. So a flood of
   silent connections evicts itself, the connections that asked most recently are closed
   last, and a connection that has just been accepted (Postfix sends its request at once,
   but the server reads it a moment later) goes only after every connection inactive for
   longer. Evicting waiting connections first, whatever their age, would close exactly
   those when the others are idle.
2. A waiting connection is closed ``first_request_timeout`` seconds after it was accepted, an
   idle one ``idle_timeout`` seconds after its last reply. Bytes that do not complete a
   request change nothing, so a client sending a byte at a time cannot hold a connection
   open by trickling.
3. A busy connection is never closed here: its replies are due within the lookup budget. (A
   client that does not read its replies is the server's business: a send timeout.)

Nothing here looks at the peer's address: Postfix's smtp processes all connect from one
address (or one UNIX socket), and on loopback a local client can pick any 127.0.0.0/8
source address, so a per-address limit would hit Postfix first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)

REQUEST_GRACE = 1.0  # seconds a new connection has to send a request before it counts as silent
NO_REQUEST = "no-request"  # a waiting connection reached first_request_timeout
IDLE = "idle"  # an idle connection reached idle_timeout


@dataclass(frozen=True, slots=True)
class Admission(Generic[C]):
    """What ``ConnectionTable.admit`` decided: ``admitted``, and the connection to close."""

    admitted: bool
    evicted: C | None = None


class ConnectionTable(Generic[C]):
    """The server's open connections and the rules above (see the module docstring).

    ``received`` and ``answered`` for a connection that is no longer in the table (evicted,
    timed out) are ignored, and so is a second ``remove``: the server's handler may still be
    finishing a connection the table has already given up.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        first_request_timeout: float,
        idle_timeout: float,
        request_grace: float = REQUEST_GRACE,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.first_request_timeout = first_request_timeout
        self.idle_timeout = idle_timeout
        self.request_grace = request_grace
        # Insertion order is the order of their times (callers pass a monotonic clock), so
        # the first entry is the one to evict or to time out first.
        self._waiting: OrderedDict[C, float] = OrderedDict()  # -> accepted at
        self._idle: OrderedDict[C, float] = OrderedDict()  # -> idle since
        self._busy: dict[C, int] = {}  # -> requests not yet answered

    def __len__(self) -> int:
        return len(self._waiting) + len(self._idle) + len(self._busy)

    def __iter__(self) -> Iterator[C]:
        yield from list(self._waiting)
        yield from list(self._busy)
        yield from list(self._idle)

    def __contains__(self, conn: object) -> bool:
        return conn in self._waiting or conn in self._busy or conn in self._idle

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        return len(self._busy)

    def admit(self, conn: C, now: float) -> Admission[C]:
        """Take a new connection in, evicting a waiting or idle one when the table is full."""
        evicted: C | None = None
        if len(self) >= self.max_connections:
            waited = next(iter(self._waiting.items()), None)
            idled = next(iter(self._idle.items()), None)
            if waited is not None and (
                idled is None or now - waited[1] >= self.request_grace or waited[1] <= idled[1]
            ):
                evicted = waited[0]
                del self._waiting[evicted]
            elif idled is not None:
                evicted = idled[0]
                del self._idle[evicted]
            else:
                return Admission(False)
        self._waiting[conn] = now
        return Admission(True, evicted)

    def received(self, conn: C) -> None:
        """A complete request arrived on ``conn`` (a malformed one too: it gets a reply)."""
        if conn in self._busy:
            self._busy[conn] += 1
        elif self._waiting.pop(conn, None) is not None or self._idle.pop(conn, None) is not None:
            self._busy[conn] = 1

    def answered(self, conn: C, now: float) -> None:
        """One reply was written on ``conn`` (or dropped: the client went away)."""
        left = self._busy.get(conn)
        if left is None:
            return
        if left > 1:
            self._busy[conn] = left - 1
        else:
            del self._busy[conn]
            self._idle[conn] = now

    def answered_at_once(self, conn: C, now: float) -> None:
        """A request arrived on ``conn`` and was answered at once (a cache hit), with nothing
        else in flight on it: ``received`` then ``answered``, in one step."""
        if conn in self._busy:
            return  # requests are in flight: idleness starts with their replies
        if self._waiting.pop(conn, None) is not None or self._idle.pop(conn, None) is not None:
            self._idle[conn] = now

    def remove(self, conn: C) -> None:
        """``conn`` is closed."""
        self._waiting.pop(conn, None)
        self._idle.pop(conn, None)
        self._busy.pop(conn, None)

    def expired(self, now: float) -> list[tuple[C, str]]:
        """The connections past their deadline, with the reason (``NO_REQUEST``, ``IDLE``);
        they are removed from the table, and the caller closes them."""
        out: list[tuple[C, str]] = []
        for table, timeout, reason in (
            (self._waiting, self.first_request_timeout, NO_REQUEST),
            (self._idle, self.idle_timeout, IDLE),
        ):
            while table:
                conn, since = next(iter(table.items()))
                if since + timeout > now:
                    break
                del table[conn]
                out.append((conn, reason))
        return out

    def next_deadline(self) -> float | None:
        """When ``expired`` next has something to return (if nothing changes before)."""
        deadlines = []
        if self._waiting:
            deadlines.append(next(iter(self._waiting.values())) + self.first_request_timeout)
        if self._idle:
            deadlines.append(next(iter(self._idle.values())) + self.idle_timeout)
        return min(deadlines, default=None)
