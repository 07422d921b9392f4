"""The message a delivery sends: bytes in memory or a file, read as often as attempts need.

A message from a file is never held in memory whole: it is checked once when opened (every
line at most 998 octets, RFC 5322 §2.1.1, and its size on the wire, which SIZE compares,
RFC 1870 §4), then read again in chunks for each SMTP session that sends it. A message that
breaks a line-length rule is refused before any connection, with the line number, instead of
being refused by every receiver after the whole transfer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mxguard.protocol.smtp import MessageError, MessageScanner

CHUNK = 64 * 1024


class Message:
    """A message to send; ``size`` is its size with CRLF line endings, before dot-stuffing."""

    def __init__(self, *, data: bytes | None = None, path: Path | None = None) -> None:
        if (data is None) == (path is None):
            raise TypeError("a Message is made from data or from a path, not both")
        self._data = data
        self._path = path
        scanner = MessageScanner()
        for chunk in self.chunks():
            scanner.feed(chunk)
        self.size = scanner.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """``data`` as a message; ``MessageError`` if a line is too long."""
        return cls(data=data)

    @classmethod
    def from_file(cls, path: Path) -> Message:
        """The message in ``path``; ``MessageError`` if a line is too long, ``OSError`` if the
        file cannot be read."""
        return cls(path=path)

    def chunks(self) -> Iterator[bytes]:
        """The message's bytes, in pieces of at most ``CHUNK`` bytes."""
        if self._data is not None:
            for start in range(0, len(self._data), CHUNK):
                yield self._data[start : start + CHUNK]
            return
        assert self._path is not None
        with self._path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def __repr__(self) -> str:
        where = str(self._path) if self._path is not None else "memory"
        return f"<Message {self.size} octets from {where}>"


__all__ = ["CHUNK", "Message", "MessageError"]
