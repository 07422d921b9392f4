"""SMTP as text, without a connection (RFC 5321): replies, the DATA payload, mailbox checks.

The half of the SMTP client (``adapters/smtp.py``) that does no I/O, so that it can be
table-tested and fuzzed on its own:

- ``parse_reply_line`` / ``parse_reply``: reply syntax (RFC 5321 §4.2): a three-digit code
  200-599, ``-`` on every line but the last, the same code on every line (§4.2.1), at most
  ``MAX_REPLY_LINES`` lines; ``Reply`` with the RFC 3463 enhanced status code when the first
  line carries one of the reply's class (RFC 2034 §3). Bad input raises ``ReplyError``.
- ``dot_stuff``: the DATA payload (§4.5.2 transparency, §4.1.1.4 the final ``.``, §2.3.8 line
  endings).
- ``address_problem``: whether an address can go into MAIL FROM or RCPT TO without breaking
  the command line (§4.1.2, §4.5.3.1).

Touches nothing: no sockets, no clock, no state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_REPLY_LINES = 200

# RFC 3463 §2: class.subject.detail, class 2, 4 or 5.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply (RFC 5321 §4.2): the code, the text of each line, the RFC 3463 code."""

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None  # "2.0.0", taken from the first line when its class fits

    @property
    def text(self) -> str:
        return " / ".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        # RFC 5321 §4.2.1: 4yz, "Transient Negative Completion": try again later.
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class ReplyError(ValueError):
    """Reply text that breaks RFC 5321 §4.2 syntax; the message says what and where."""


def parse_reply_line(raw: bytes) -> tuple[int, bool, str]:
    """``(code, is_last, text)`` of one reply line (line ending already removed or not)."""
    line = raw.rstrip(b"\r\n")
    head = line[:3]
    # RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39; we accept any second/third digit.
    if len(head) < 3 or not head.isdigit() or head[:1] not in b"2345":
        raise ReplyError(f"reply line {_show(line)} does not start with a code 200-599")
    sep = line[3:4]
    if sep not in (b"", b" ", b"-"):
        raise ReplyError(f"reply line {_show(line)}: expected ' ' or '-' after the code")
    text = line[4:].decode("utf-8", "replace")
    return int(head), sep != b"-", text


def parse_reply(raw_lines: Sequence[bytes]) -> Reply:
    """A complete reply from its lines; every line must carry the same code (RFC 5321 §4.2.1)
    and only the last one may be final."""
    if not raw_lines:
        raise ReplyError("empty reply")
    if len(raw_lines) > MAX_REPLY_LINES:
        raise ReplyError(f"reply has {len(raw_lines)} lines; at most {MAX_REPLY_LINES} accepted")
    code = 0
    texts = []
    for i, raw in enumerate(raw_lines):
        this, last, text = parse_reply_line(raw)
        if i and this != code:
            raise ReplyError(f"reply line {i + 1} has code {this}, the first line had {code}")
        if last != (i == len(raw_lines) - 1):
            where = "before the end" if last else "at the end"
            raise ReplyError(f"reply line {i + 1} is {'final' if last else 'continued'} {where}")
        code = this
        texts.append(text)
    return Reply(code, tuple(texts), _enhanced(code, texts[0]))


def _enhanced(code: int, text: str) -> str | None:
    match = _ENHANCED.match(text)
    # RFC 3463 §3 / RFC 2034 §3: the enhanced class must agree with the reply's class.
    if match is None or match.group(1) != str(code)[0]:
        return None
    end = match.end()
    if end < len(text) and not text[end].isspace():
        return None
    return match.group(0)


def _show(line: bytes, limit: int = 60) -> str:
    shown = line[:limit].decode("utf-8", "replace")
    return repr(shown) + ("..." if len(line) > limit else "")


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for ``message``: CRLF line endings, leading dots doubled, final ".".

    RFC 5321 §4.5.2: a line that starts with "." gets another "." in front; §4.1.1.4: the data
    ends with CRLF "." CRLF. Bare CR and bare LF are line endings too (§2.3.8 forbids them in
    the data, so they can only have been meant as line breaks).
    """
    text = _LINE_END.sub(b"\r\n", message)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    text = re.sub(rb"(?m)^\.", b"..", text)
    return text + b".\r\n"


# RFC 5322 §2.1.1: at most 998 characters in a line, not counting its CRLF (RFC 5321
# §4.5.3.1.6: 1,000 octets with it).
MAX_LINE_OCTETS = 998


class MessageError(ValueError):
    """A message that must not be sent as it is; the message says which line and why."""


class MessageScanner:
    """Checks a message fed in chunks, in bounded memory: line lengths (RFC 5322 §2.1.1) and
    the size it has on the wire once its line endings are CRLF (what SIZE counts, RFC 1870 §4).

    Raises ``MessageError`` from ``feed`` at the first line longer than ``MAX_LINE_OCTETS``.
    """

    def __init__(self) -> None:
        self.size = 0  # octets with CRLF line endings, before dot-stuffing
        self.lines = 0
        self._line = 0  # octets of the current line so far
        self._cr = False  # the previous chunk ended in CR

    def feed(self, chunk: bytes) -> None:
        for piece in _LINE_END_OR_TEXT.finditer(chunk):
            text = piece.group(0)
            if text == b"\n" and self._cr:
                self._cr = False  # the LF of a CRLF split across chunks
                continue
            self._cr = text.endswith(b"\r") and not text.endswith(b"\r\n")
            if text[-1:] in (b"\r", b"\n"):
                self._end_line()
            else:
                self._grow(len(text))

    def _grow(self, n: int) -> None:
        self._line += n
        if self._line > MAX_LINE_OCTETS:
            raise MessageError(
                f"line {self.lines + 1} of the message is longer than {MAX_LINE_OCTETS} octets "
                "(RFC 5322 §2.1.1; servers refuse such lines): wrap it, or send the body "
                "quoted-printable or base64 encoded"
            )

    def _end_line(self) -> None:
        self.size += self._line + 2
        self.lines += 1
        self._line = 0

    def finish(self) -> int:
        """The size on the wire, the last line counted with the CRLF ``DotStuffer`` adds."""
        if self._line:
            self._end_line()
        return self.size


_LINE_END_OR_TEXT = re.compile(rb"\r\n|\r|\n|[^\r\n]+")


class DotStuffer:
    """``dot_stuff`` for a message that arrives in chunks: the same bytes, bounded memory."""

    def __init__(self) -> None:
        self._start = True  # at the start of a line
        self._cr = False  # the previous chunk ended in a bare CR, so far

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for piece in _LINE_END_OR_TEXT.finditer(chunk):
            text = piece.group(0)
            if text == b"\n" and self._cr:
                self._cr = False  # completes the CRLF already written for the CR
                continue
            self._cr = text == b"\r"
            if text in (b"\r\n", b"\r", b"\n"):
                out += b"\r\n"  # RFC 5321 §2.3.8: bare CR and LF were meant as line ends
                self._start = True
                continue
            if self._start and text.startswith(b"."):
                out += b"."  # RFC 5321 §4.5.2
            out += text
            self._start = False
        return bytes(out)

    def finish(self) -> bytes:
        """The end of the data: CRLF if the last line lacked one, then "." CRLF (§4.1.1.4)."""
        return (b"" if self._start else b"\r\n") + b".\r\n"


def address_problem(address: str) -> str | None:
    """Why ``address`` cannot go into MAIL FROM or RCPT TO, or None when it can."""
    if "\r" in address or "\n" in address or "\0" in address:
        return f"address {address[:60]!r} contains CR, LF or NUL"
    if any(c in address for c in "<> ") or len(address) > 512:
        return (
            f"address {address[:60]!r} is not a mailbox: no '<', '>' or spaces, at most 512 "
            "characters (RFC 5321 §4.1.2, §4.5.3.1)"
        )
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return f"address {address[:60]!r} is not valid UTF-8 text"
    return None


__all__ = [
    "MAX_LINE_OCTETS",
    "MAX_REPLY_LINES",
    "DotStuffer",
    "MessageError",
    "MessageScanner",
    "Reply",
    "ReplyError",
    "address_problem",
    "dot_stuff",
    "parse_reply",
    "parse_reply_line",
]
