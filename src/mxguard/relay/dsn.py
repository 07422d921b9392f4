"""Delivery status notifications (RFC 3464) for recipients the relay gives up on.

A bounce is a ``multipart/report; report-type=delivery-status`` message (RFC 6522): a part
for people, a ``message/delivery-status`` part with one block of per-message fields and one
per failed recipient (RFC 3464 §2.2, §2.3), and the returned message's header section as
``text/rfc822-headers`` (never its body: the header section says which message it was, and a
bounce must not carry content further than the sender meant it to go). It goes to the envelope
sender with the null reverse-path (RFC 5321 §4.5.5), so that it can never cause a bounce
itself; a message whose sender is already null gets none.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

_STATUS = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Failed:
    """One recipient given up on, and why (the DSN's per-recipient fields)."""

    recipient: str
    status: str  # enhanced status code, RFC 3463 ("5.1.1", "4.4.7", "5.7.30")
    diagnostic: str  # the remote server's reply, or what the relay decided
    remote_mta: str | None = None  # the MX host the last attempt reached
    smtp_reply: bool = False  # diagnostic is an SMTP reply (Diagnostic-Code type "smtp")


def status_of(reply: str | None, default: str) -> str:
    """The enhanced status code at the start of an SMTP reply's text (RFC 2034), else
    ``default``; its class follows the reply code's when they disagree."""
    if reply:
        words = reply.split()
        if len(words) > 1 and _STATUS.match(words[1].encode()):
            code = words[1]
            if words[0][:1] in "45" and code[0] != words[0][0]:
                code = words[0][0] + code[1:]
            return code
        if words and words[0][:1] == "5":
            return "5.0.0"
        if words and words[0][:1] == "4":
            return "4.0.0"
    return default


def _field(text: str) -> str:
    """``text`` as one header field body: no line breaks, printable ASCII (the fields of a
    delivery-status part are ASCII, RFC 3464 §2.1.1)."""
    flat = " ".join(text.split())
    return flat.encode("ascii", "backslashreplace").decode("ascii")[:900]


def headers_of(data: bytes) -> bytes:
    """The header section of an RFC 5322 message (up to the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[: end + len(sep) // 2]
    return data if len(data) < 64 * 1024 else b""


def build_bounce(
    *,
    reporting_mta: str,
    original_sender: str,
    failed: Sequence[Failed],
    original: bytes,
    arrival: dt.datetime,
    now: dt.datetime,
    message_id: str,
) -> bytes:
    """The DSN for ``failed`` recipients of the message ``original`` (bytes, CRLF)."""
    boundary = f"mxguard-dsn-{message_id}"
    lines_human = [
        f"This is the mail relay at {reporting_mta}.",
        "",
        "Your message could not be delivered to the recipients below; the relay has",
        "given up and will not try again.",
        "",
    ]
    for f in failed:
        lines_human.append(f"<{f.recipient}>: {_field(f.diagnostic)}")
    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mxguard-Queue-ID: {message_id}",
        f"Arrival-Date: {email.utils.format_datetime(arrival)}",
    ]
    blocks = []
    for f in failed:
        block = [
            f"Final-Recipient: rfc822; {_field(f.recipient)}",
            "Action: failed",
            f"Status: {f.status}",
        ]
        if f.remote_mta:
            block.append(f"Remote-MTA: dns; {_field(f.remote_mta)}")
        kind = "smtp" if f.smtp_reply else "x-mxguard"
        block.append(f"Diagnostic-Code: {kind}; {_field(f.diagnostic)}")
        block.append(f"Last-Attempt-Date: {email.utils.format_datetime(now)}")
        blocks.append("\r\n".join(block))
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: <{message_id}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *lines_human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "\r\n".join(per_message),
        "",
        "\r\n\r\n".join(blocks),
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    returned = headers_of(original).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    # A header line of the original that is longer than 998 octets would make this bounce
    # undeliverable (RFC 5322 §2.1.1): such lines are cut.
    returned = b"\r\n".join(line[:998] for line in returned.split(b"\r\n"))
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return "\r\n".join(head).encode("ascii", "replace") + b"\r\n" + returned.rstrip(b"\r\n") + tail
