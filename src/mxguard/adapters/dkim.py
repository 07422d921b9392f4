"""DKIM verification of received TLS report e-mails (RFC 8460 §5.3, RFC 6376).

A report sent by mail is to be signed by the reporting domain (RFC 8460 §5.3), and a receiver
may ignore reports that are not. mxguard keeps every report and records what the signature
said (`DkimResult`, stored with the report): a dashboard can then tell a report Google signed
from one anybody could have written.

The key is looked up through mxguard's own `DnsResolver` (the configured resolver, a timeout,
answers as values) before dkimpy runs: dkimpy looks keys up synchronously, so it is given a
lookup function that answers from what was fetched, for that one name only. Verification
itself (hashing a message of up to 16 MiB) runs in a worker thread, off the event loop.
`tlsrpt=True` makes dkimpy accept keys published for the `tlsrpt` service (RFC 8460 §5.3)
and hash the whole body whatever `l=` says, so text appended after signing is never counted
as signed.

At most MAX_SIGNATURES signatures are tried, in header order; the first that verifies
decides, otherwise the first one's failure is reported.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mxguard.adapters.dns import DnsResolver

MAX_SIGNATURES = 3  # DKIM-Signature header fields tried per message
UNSIGNED = "unsigned"  # the detail of a message without a DKIM-Signature


@dataclass(frozen=True, slots=True)
class DkimResult:
    """What the DKIM signature of a report e-mail said: `ok` when a signature verified with the
    key published at `selector._domainkey.domain`; `detail` says what was found, or why it
    failed ("unsigned" when there was no signature at all)."""

    ok: bool
    domain: str | None  # the signature's d=, as it is written (attacker-chosen, bounded)
    selector: str | None  # its s=
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "domain": self.domain,
            "selector": self.selector,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class _Signature:
    index: int  # which DKIM-Signature header field, counted from the top
    domain: str | None
    selector: str | None
    problem: str | None  # why it cannot be checked at all


async def verify_dkim(
    raw: bytes, dns: DnsResolver, *, max_signatures: int = MAX_SIGNATURES
) -> DkimResult:
    """Verify the DKIM signature(s) of the e-mail `raw`, looking the keys up through `dns`.
    Never raises for anything the message contains: every outcome is a DkimResult. An mbox
    `From ` line in front (what an MTA's pipe transport may add) is not part of the message."""
    import dkim  # type: ignore[import-untyped]

    if raw.startswith(b"From "):
        raw = raw.partition(b"\n")[2]

    try:
        signatures = _signatures(raw)
    except dkim.DKIMException as exc:
        return DkimResult(False, None, None, f"the message cannot be checked: {exc}")
    if not signatures:
        return DkimResult(False, None, None, UNSIGNED)
    first: DkimResult | None = None
    for sig in signatures[:max_signatures]:
        result = await _verify_one(raw, sig, dns)
        if result.ok:
            return result
        first = first or result
    assert first is not None
    return first


def _signatures(raw: bytes) -> list[_Signature]:
    """The DKIM-Signature header fields of `raw` in dkimpy's order, with their d= and s=."""
    import dkim
    import dkim.util  # type: ignore[import-untyped]

    message = dkim.DKIM(raw)
    found = []
    fields = [value for name, value in message.headers if name.lower() == b"dkim-signature"]
    for index, value in enumerate(fields):
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList as exc:
            found.append(_Signature(index, None, None, f"DKIM-Signature is malformed: {exc}"))
            continue
        domain = _tag(tags, b"d")
        selector = _tag(tags, b"s")
        problem = None
        if not domain or not selector:
            problem = "DKIM-Signature has no d= or no s= tag (RFC 6376 §3.5)"
        found.append(_Signature(index, domain, selector, problem))
    return found


def _tag(tags: dict[bytes, bytes], name: bytes) -> str | None:
    value = tags.get(name)
    if value is None:
        return None
    text = value.decode("ascii", errors="replace").strip()
    return text[:255] or None


async def _verify_one(raw: bytes, sig: _Signature, dns: DnsResolver) -> DkimResult:
    import dkim

    if sig.problem is not None or sig.domain is None or sig.selector is None:
        return DkimResult(False, sig.domain, sig.selector, sig.problem or "malformed")
    name = f"{sig.selector}._domainkey.{sig.domain}"
    answer = await dns.query(name, "TXT")
    if answer.failed:
        return DkimResult(
            False, sig.domain, sig.selector, f"the key could not be looked up: {answer.detail}"
        )
    keys = [t for t in answer.texts() if "p=" in t]
    if not keys:
        why = answer.detail or "no DKIM key record among its TXT records"
        return DkimResult(False, sig.domain, sig.selector, f"no DKIM key at {name}: {why}")
    record = keys[0].encode("utf-8")
    wanted = _absolute(name)

    def lookup(qname: bytes | str, timeout: float = 5) -> bytes | None:
        text = qname.decode("ascii", "replace") if isinstance(qname, bytes) else qname
        return record if _absolute(text) == wanted else None

    def work() -> tuple[bool, str]:
        errors = _Collector()
        log = logging.Logger("mxguard.dkim.verify", logging.ERROR)
        log.addHandler(errors)
        checker = dkim.DKIM(raw, logger=log, minkey=1024, tlsrpt=True)
        try:
            ok = bool(checker.verify(idx=sig.index, dnsfunc=lookup))
        except dkim.DKIMException as exc:
            return False, str(exc)
        return ok, errors.text or "the signature does not match the message"

    ok, why = await asyncio.to_thread(work)
    if ok:
        return DkimResult(True, sig.domain, sig.selector, f"signature verified with {name}")
    return DkimResult(False, sig.domain, sig.selector, f"signature does not verify: {why}")


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."


class _Collector(logging.Handler):
    """The error messages dkimpy logs while verifying (it returns False without a reason)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])

    @property
    def text(self) -> str:
        return "; ".join(self.messages[:3])
