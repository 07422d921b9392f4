"""Framing for Postfix's lookup-table protocols: netstrings (socketmap) and tcp_table lines.

Both decoders are sans-I/O (like h11): feed them bytes, get back events. They hold at most
``max_request`` bytes of one request, however much a client sends, and never raise for bad
input; a malformed request becomes an event the server answers.

**socketmap** (Postfix socketmap_table(5)) frames every request and reply as a netstring
(D. J. Bernstein, https://cr.yp.to/proto/netstrings.txt): ``<decimal length>:<bytes>,``.

- A request longer than ``max_request`` is reported as soon as its length prefix is read
  (``Malformed(..., too_long=True)``) and its bytes are then skipped without being stored:
  the framing is intact, so the next request is read normally.
- A framing error (a non-digit in the length, more than ``max_digits`` digits, a missing ``:``
  or a missing ``,`` after the payload) is reported once; the decoder then skips input up to
  and including the next ``,`` and reads the next request after it. This resynchronises a
  client that sent one garbled request and then well-formed ones.
- When no ``,`` arrives within ``max_skip`` bytes of skipping, the framing is lost for good:
  ``Malformed(..., fatal=True)``. The server answers it and then closes the connection — a
  reply first, never a silent drop.

**tcp_table** (Postfix tcp_table(5)): one request per line, ``get SP key LF``, with the key
%-encoded (``%XX`` for ``%``, space, controls and bytes above 126); replies ``200 SP value``,
``500 SP text`` (not found) or ``400 SP text`` (failed), %-encoded the same way. An over-long
line is reported once and skipped through its newline; framing is never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MAX_REQUEST = 4096  # Postfix keys are domain names or [host]:port: far below this
MAX_DIGITS = 10  # enough for any length a 32-bit client could announce
MAX_SKIP = 65536  # bytes skipped while looking for a "," before the framing counts as lost


@dataclass(frozen=True, slots=True)
class Request:
    """One complete request payload (not yet decoded as text)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request that could not be framed. ``fatal``: the connection must close after the reply."""

    reason: str
    fatal: bool = False
    too_long: bool = False


Event = Request | Malformed


def encode(payload: bytes) -> bytes:
    """``payload`` as a netstring."""
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    """Incremental netstring decoder with bounded memory (see the module docstring)."""

    _LENGTH, _PAYLOAD, _COMMA, _DISCARD, _RESYNC, _DEAD = range(6)

    def __init__(
        self,
        *,
        max_request: int = MAX_REQUEST,
        max_digits: int = MAX_DIGITS,
        max_skip: int = MAX_SKIP,
    ) -> None:
        self.max_request = max_request
        self.max_digits = max_digits
        self.max_skip = max_skip
        self._state = self._LENGTH
        self._digits = bytearray()
        self._payload = bytearray()
        self._want = 0  # payload bytes still to read (or to discard)
        self._skipped = 0
        self._skipping_long = False  # the payload being skipped was answered as too long
        self._steps: dict[int, Callable[[bytes, int, list[Event]], int]] = {
            self._LENGTH: self._length,
            self._PAYLOAD: self._payload_bytes,
            self._COMMA: self._comma,
            self._DISCARD: self._discard,
            self._RESYNC: self._resync,
        }

    @property
    def buffered(self) -> int:
        """Bytes held for the request being read (never more than max_request + max_digits)."""
        return len(self._digits) + len(self._payload)

    @property
    def dead(self) -> bool:
        """True once the framing is lost: nothing more is decoded."""
        return self._state == self._DEAD

    def whole(self, data: bytes) -> bytes | None:
        """The payload if ``data`` is exactly one netstring within the limits and nothing is
        held from earlier reads (what a Postfix client sends per read); else None, and
        nothing was taken: ``feed`` then reads ``data`` as always, to the same events."""
        if self._state != self._LENGTH or self._digits:
            return None
        colon, end = self._netstring_at(data, 0)
        return data[colon + 1 : end] if 0 <= end == len(data) - 1 else None

    def _netstring_at(self, data: bytes, i: int) -> tuple[int, int]:
        """The ':' and the ',' of a whole netstring within the limits starting at ``i``, or
        (-1, -1) when there is none there (split, too long, malformed)."""
        colon = data.find(b":", i, i + self.max_digits + 1)
        if colon > i and data[i:colon].isdigit():
            end = colon + 1 + int(data[i:colon])
            if end - colon - 1 <= self.max_request and end < len(data) and data[end] == 0x2C:
                return colon, end
        return -1, -1

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        i, n = 0, len(data)
        length_state = self._LENGTH
        while i < n and self._state != self._DEAD:
            if self._state == length_state and not self._digits:
                # The common case, a whole netstring at ``i``: taken in one slice. Anything
                # else (split, too long, malformed) goes through the states below, byte by
                # byte, which give the same events for whole netstrings.
                colon, end = self._netstring_at(data, i)
                if end >= 0:
                    events.append(Request(bytes(data[colon + 1 : end])))
                    i = end + 1
                    continue
            # Each step consumes at least one byte and may change the state.
            i = self._steps[self._state](data, i, events)
        return events

    # One method per state: ``(data, i, events) -> the index of the first byte not consumed``.

    def _length(self, data: bytes, i: int, events: list[Event]) -> int:
        """One byte of the length prefix: a digit, the ':' after the digits, or an error."""
        byte = data[i]
        if 0x30 <= byte <= 0x39:
            if len(self._digits) >= self.max_digits:
                events.append(self._framing_error(f"length has more than {self.max_digits} digits"))
            else:
                self._digits.append(byte)
        elif byte == 0x3A:  # ":"
            self._colon(events)
        else:
            what = "a ','" if byte == 0x2C else f"byte 0x{byte:02x}"
            events.append(
                self._framing_error(
                    f"netstring length expected digits and ':', got {what}",
                    consumed_comma=byte == 0x2C,
                )
            )
        return i + 1

    def _colon(self, events: list[Event]) -> None:
        """The length is complete: read the payload, or skip it when it is too long."""
        if not self._digits:
            events.append(self._framing_error("netstring has no length before ':'"))
            return
        length = int(self._digits)
        self._digits.clear()
        self._want = length
        if length > self.max_request:
            self._state = self._DISCARD
            events.append(
                Malformed(
                    f"request of {length} bytes is longer than the limit of {self.max_request}",
                    too_long=True,
                )
            )
        else:
            self._state = self._PAYLOAD if length else self._COMMA

    def _payload_bytes(self, data: bytes, i: int, events: list[Event]) -> int:
        take = min(self._want, len(data) - i)
        self._payload += data[i : i + take]
        self._want -= take
        if self._want == 0:
            self._state = self._COMMA
        return i + take

    def _discard(self, data: bytes, i: int, events: list[Event]) -> int:
        """Skip an over-long payload (already answered) without storing it."""
        take = min(self._want, len(data) - i)
        self._want -= take
        if self._want == 0:
            self._state = self._COMMA
            self._payload.clear()
            self._skipping_long = True
        return i + take

    def _comma(self, data: bytes, i: int, events: list[Event]) -> int:
        """The ',' that ends a netstring: the request is complete (or its framing broken)."""
        byte = data[i]
        was_long, self._skipping_long = self._skipping_long, False
        if byte == 0x2C:
            if not was_long:
                events.append(Request(bytes(self._payload)))
            self._payload.clear()
            self._state = self._LENGTH
        else:
            self._payload.clear()
            error = self._framing_error(
                f"netstring payload is not followed by ',' (got byte 0x{byte:02x})"
            )
            if not was_long:  # an over-long request was answered already
                events.append(error)
        return i + 1

    def _resync(self, data: bytes, i: int, events: list[Event]) -> int:
        """Skip to the next ',' after a framing error; past ``max_skip`` bytes give up."""
        n = len(data)
        comma = data.find(b",", i, min(n, i + self.max_skip - self._skipped + 1))
        if comma >= 0:
            self._state = self._LENGTH
            return comma + 1
        self._skipped += n - i
        if self._skipped >= self.max_skip:
            self._state = self._DEAD
            events.append(
                Malformed(
                    f"no ',' within {self.max_skip} bytes after a malformed netstring: "
                    "framing lost",
                    fatal=True,
                )
            )
        return n

    def _framing_error(self, reason: str, *, consumed_comma: bool = False) -> Malformed:
        self._digits.clear()
        self._payload.clear()
        self._skipped = 0
        # A ',' that caused the error already ends the garbled unit.
        self._state = self._LENGTH if consumed_comma else self._RESYNC
        return Malformed(reason)


# --- tcp_table ----------------------------------------------------------------------------


def pct_encode(text: str | bytes) -> bytes:
    """tcp_table(5) encoding: ``%XX`` for '%', space, controls and bytes outside 33..126."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    out = bytearray()
    for byte in raw:
        if byte <= 0x20 or byte >= 0x7F or byte == 0x25:
            out += b"%%%02X" % byte
        else:
            out.append(byte)
    return bytes(out)


class PercentError(ValueError):
    """A '%' not followed by two hex digits (tcp_table(5) encoding)."""


def pct_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == 0x25:
            pair = data[i + 1 : i + 3]
            try:
                if len(pair) != 2 or not pair.isalnum():
                    raise ValueError
                out.append(int(pair, 16))
            except ValueError:
                raise PercentError(f"'%' at offset {i} is not followed by two hex digits") from None
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


class LineDecoder:
    """Incremental LF-terminated line decoder for tcp_table, bounded like NetstringDecoder."""

    def __init__(self, *, max_request: int = MAX_REQUEST) -> None:
        self.max_request = max_request
        self._line = bytearray()
        self._overlong = False

    @property
    def buffered(self) -> int:
        return len(self._line)

    dead = False  # a line protocol always resynchronises at the next newline

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        i, n = 0, len(data)
        while i < n:
            nl = data.find(b"\n", i)
            end = n if nl < 0 else nl
            if not self._overlong:
                room = self.max_request - len(self._line)
                chunk = data[i:end]
                if len(chunk) > room:
                    self._overlong = True
                    self._line.clear()
                    events.append(
                        Malformed(
                            f"request line is longer than the limit of {self.max_request} bytes",
                            too_long=True,
                        )
                    )
                else:
                    self._line += chunk
            if nl < 0:
                break
            if not self._overlong:
                line = bytes(self._line)
                events.append(Request(line[:-1] if line.endswith(b"\r") else line))
            self._line.clear()
            self._overlong = False
            i = nl + 1
        return events
