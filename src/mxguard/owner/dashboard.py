"""The pages of the TLS report dashboard of `mxguard serve reports`, as HTML text (pure).

Everything a page shows from a report was written by whoever sent the report: organisation
names, report-ids, contact addresses, MX host names that are not names, result types no RFC
defines, `additional-information` URLs, policy strings. This module is where that text meets
HTML, so it is the one place that has to get escaping right:

- text, in element content and in quoted attribute values alike, goes through `text()`:
  `html.escape` with quotes, after characters that are not printable (controls, bidi
  overrides, zero-width joiners) are shown as visible escapes and the length is bounded;
- URLs the pages build themselves percent-encode every path and query value (`_href`);
- chart labels are the same escaped text, inside inline SVG that the server draws (no
  script draws anything);
- a URL from a report is never a link on a report page: it is shown as text, and when it is
  an `http:` or `https:` URL a link leads to a warning page (`leave_page`) that names the
  host and only then links to it, with no referrer and no opener. Any other scheme
  (`javascript:`, `data:`, …) is text and nothing else.

No page has inline script or inline style (the server's Content-Security-Policy forbids
both): styling is by class, from ``static/dashboard.css``; the one script,
``static/dashboard.js``, only makes the range selector submit itself.

The result types (RFC 8460 §4.3) are explained in `EXPLANATIONS`: what the failure means and
what the domain owner does about it, in the words of `mxguard check` where it has them.
"""

from __future__ import annotations

import datetime as dt
import html
import ipaddress
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

import idna

from mxguard.adapters.store import CheckRecord, ReceivedRecord, ReportTotals, Tally
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import FailureDetail

MAX_TEXT = 300  # characters of one report value shown
MAX_URL = 2048  # characters of a URL the warning page accepts
RANGES = (7, 30, 90, 365)  # the day ranges offered
VERDICTS = ("protected", "partial", "unprotected", "broken")


# --------------------------------------------------------------------------- escaping


def text(value: object, limit: int = MAX_TEXT) -> str:
    """`value` as HTML text, safe in element content and in quoted attribute values: at most
    `limit` characters (then "…"), every character that is not printable shown as an escape
    (``\\n``, ``\\u202e``), then `html.escape` with quotes."""
    s = str(value)
    cut = len(s) > limit
    s = s[:limit]
    if not s.isprintable():
        s = "".join(c if c.isprintable() else _visible(c) for c in s)
    return html.escape(s, quote=True) + ("…" if cut else "")


def _visible(c: str) -> str:
    code = ord(c)
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _href(path: str, **query: object) -> str:
    """A URL of this dashboard, every value percent-encoded, escaped for an attribute."""
    pairs = [(k, str(v)) for k, v in query.items() if v is not None]
    url = path + ("?" + urlencode(pairs) if pairs else "")
    return html.escape(url, quote=True)


def domain_href(domain: str, **query: object) -> str:
    return _href("/domain/" + quote(domain, safe=""), **query)


def num(n: int | float) -> str:
    return f"{n:,}"


# --------------------------------------------------------------------------- URLs from reports


@dataclass(frozen=True, slots=True)
class OutsideLink:
    """A URL from a report, judged: `href` is the URL to link to (percent-encoded, ASCII),
    or None when it must stay text; `host` the host it leads to, in A-labels; `problem` why
    there is no link (or what is odd about it)."""

    shown: str
    href: str | None
    host: str | None
    problem: str | None


_URL_SAFE = "/:@!$&'()*+,;=-._~%"


def outside_link(url: str) -> OutsideLink:
    """Whether `url` (from a report) may be offered as a link on the warning page."""
    value = url.strip()
    if len(value) > MAX_URL:
        return OutsideLink(value[:MAX_URL], None, None, f"it is longer than {MAX_URL} characters")
    if any(not c.isprintable() or c.isspace() for c in value):
        return OutsideLink(value, None, None, "it contains spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return OutsideLink(value, None, None, f"it is not a usable URL ({exc})")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        what = f"its scheme is {scheme!r}" if scheme else "it has no scheme"
        return OutsideLink(value, None, None, f"{what}; only http and https addresses are linked")
    host = parts.hostname
    if not host:
        return OutsideLink(value, None, None, "it names no host")
    try:
        ascii_host = host if _is_ip(host) else idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        return OutsideLink(value, None, None, f"its host is not a valid name ({exc})")
    netloc = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    if port is not None:
        netloc += f":{port}"
    href = f"{scheme}://{netloc}{quote(parts.path, safe=_URL_SAFE)}"
    if parts.query:
        href += "?" + quote(parts.query, safe=_URL_SAFE + "?")
    if parts.fragment:
        href += "#" + quote(parts.fragment, safe=_URL_SAFE + "?")
    problem = None
    if parts.username is not None or parts.password is not None:
        problem = "it carries a user name or password before the host, a trick to disguise the host"
    return OutsideLink(value, href, ascii_host, problem)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- result types


EXPLANATIONS: dict[str, tuple[str, str]] = {
    ResultType.STARTTLS_NOT_SUPPORTED.value: (
        "The sender reached your MX host but was not offered STARTTLS, or STARTTLS was "
        "refused. Either the host has no TLS, or something between the sender and your host "
        "removed STARTTLS from its EHLO reply: the STRIPTLS attack this report exists to reveal.",
        "Offer STARTTLS with a certificate for the MX host name on every MX host (Postfix: "
        "smtpd_tls_security_level = may with smtpd_tls_chain_files). If it is offered, the "
        "path strips it: run mxguard check DOMAIN from outside your network and compare.",
    ),
    ResultType.CERTIFICATE_HOST_MISMATCH.value: (
        "Your MX host presented a certificate that is not valid for the MX host name the "
        "sender connected to.",
        "Install a certificate whose subjectAltName lists the MX host name as a DNS name "
        "(RFC 8461 §4.2 ignores the CN), or make the policy's mx: lines match the names "
        "your certificates carry.",
    ),
    ResultType.CERTIFICATE_EXPIRED.value: (
        "A certificate your MX host presented had expired (or was not valid yet).",
        "Renew the certificate and install it on the MX host; automate the renewal.",
    ),
    ResultType.CERTIFICATE_NOT_TRUSTED.value: (
        "The sender found no path from your MX host's certificate to a root it trusts: "
        "self-signed, a private CA, or intermediates missing.",
        "Install a certificate from a public CA and send the intermediate certificates with "
        "it (the full chain file, not the leaf alone).",
    ),
    ResultType.VALIDATION_FAILURE.value: (
        "Some other certificate or DANE check failed: a weak key or signature, wrong CA "
        "flags or key usage, a malformed certificate, or a chain that matches none of your "
        "TLSA records.",
        "Install a certificate a current TLS library accepts (RSA of 2048 bits or more, or "
        "EC; SHA-256 or better) and check it and your TLSA records with mxguard check DOMAIN.",
    ),
    ResultType.TLSA_INVALID.value: (
        "Your DNSSEC-signed TLSA records exist but none of them is usable, so DANE cannot "
        "authenticate the host.",
        "Publish usable TLSA records (3 1 1 for the current key, and one for the next key "
        "before a rollover), or remove the broken ones; mxguard check DOMAIN lists them.",
    ),
    ResultType.DNSSEC_INVALID.value: (
        "DNSSEC validation failed (a bogus answer) on the way to your policy: senders "
        "cannot trust your DNS and defer mail.",
        "Fix the zone's signatures or the DS record in the parent zone (a key rollover "
        "gone wrong is the usual cause).",
    ),
    ResultType.DANE_REQUIRED.value: (
        "The sender requires DANE for your domain by its own rule, and found no usable "
        "TLSA records.",
        "Publish DNSSEC-signed TLSA records for your MX hosts if you want DANE; otherwise "
        "this is the sender's local choice and nothing of yours is wrong.",
    ),
    ResultType.STS_POLICY_FETCH_ERROR.value: (
        "The sender could not fetch your MTA-STS policy: DNS, connection, HTTP status, "
        "redirect, size, time or content type.",
        "Make mta-sts.DOMAIN resolvable and answer HTTPS on port 443 with the policy at "
        "/.well-known/mta-sts.txt, status 200, Content-Type text/plain (mxguard serve "
        "mta-sts does it).",
    ),
    ResultType.STS_POLICY_INVALID.value: (
        "The sender fetched your MTA-STS policy but could not parse it.",
        "Correct the policy (mxguard sts check-policy FILE), then change the id in the "
        "_mta-sts TXT record so that senders fetch it again.",
    ),
    ResultType.STS_WEBPKI_INVALID.value: (
        "The certificate of your MTA-STS policy host mta-sts.DOMAIN failed WebPKI "
        "validation, so senders ignore the policy.",
        "Give mta-sts.DOMAIN a certificate from a public CA for that name, with its intermediates.",
    ),
}

UNKNOWN_TYPE = (
    "A result type this mxguard does not know, kept as the sender wrote it (the registry of "
    "result types grows, RFC 8460 §6).",
    "Look it up in the IANA TLS-RPT Failure Types registry, or ask the sender (contact-info "
    "of its reports).",
)
NO_TYPE = (
    "Failed sessions the sender counted but did not describe in failure-details.",
    "Nothing to do from this line alone; the totals still count them.",
)


def explain(result_type: str | None) -> tuple[str, str]:
    """(what it means, what to do) for a result type as stored."""
    if result_type is None:
        return NO_TYPE
    return EXPLANATIONS.get(result_type, UNKNOWN_TYPE)


# --------------------------------------------------------------------------- the audit


@dataclass(frozen=True, slots=True)
class Verdict:
    """The latest `mxguard check` of a domain, for the page."""

    verdict: str
    at: dt.datetime
    summary: str
    findings: tuple[tuple[str, str, str], ...]  # (severity, detail, fix), errors first


def verdict_of(record: CheckRecord | None, *, max_findings: int = 6) -> Verdict | None:
    if record is None:
        return None
    summary = ""
    findings: list[tuple[str, str, str]] = []
    try:
        doc = json.loads(record.report)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        summary = str(doc.get("summary") or "")
        raw = doc.get("findings")
        if isinstance(raw, list):
            rank = {"error": 0, "warning": 1, "info": 2}
            items = [f for f in raw if isinstance(f, dict)]
            items.sort(key=lambda f: rank.get(str(f.get("severity")), 3))
            for f in items[:max_findings]:
                findings.append(
                    (str(f.get("severity") or ""), str(f.get("detail") or ""),
                     str(f.get("fix") or ""))
                )  # fmt: skip
    return Verdict(record.verdict, record.at, summary, tuple(findings))


def _verdict_badge(verdict: str | None) -> str:
    if verdict is None:
        return '<span class="badge none">not checked</span>'
    kind = verdict if verdict in VERDICTS else "unknown"
    return f'<span class="badge {kind}">{text(verdict, 40)}</span>'


# --------------------------------------------------------------------------- page frame


def page(title: str, body: str, *, nav: str = "") -> str:
    """A whole page: `title` is plain text (escaped here), `body` and `nav` HTML."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{text(title, 120)} · mxguard TLS reports</title>\n"
        '<link rel="stylesheet" href="/static/dashboard.css">\n'
        '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">\n'
        '<script src="/static/dashboard.js" defer></script>\n'
        "</head>\n<body>\n"
        '<header class="top"><a class="brand" href="/">mxguard <span>TLS reports</span></a>'
        f"{nav}</header>\n"
        f"<main>\n{body}\n</main>\n"
        "<footer>Read-only view of the reports in the store. Every value shown is what the "
        "sending organisation wrote; none of it is verified.</footer>\n"
        "</body>\n</html>\n"
    )


def error_page(status: int, title: str, detail: str) -> str:
    body = f'<h1>{text(title)}</h1>\n<p class="detail">{text(detail, 1000)}</p>\n' + (
        '<p><a href="/">Back to the overview</a></p>'
    )
    return page(f"{status} {title}", body)


def _range_form(action: str, days: int, extra: dict[str, str] | None = None) -> str:
    options = "".join(
        f'<option value="{d}"{" selected" if d == days else ""}>last {d} days</option>'
        for d in RANGES
    )
    if days not in RANGES:
        options += f'<option value="{days}" selected>last {days} days</option>'
    hidden = "".join(
        f'<input type="hidden" name="{text(k)}" value="{text(v)}">'
        for k, v in (extra or {}).items()
    )
    return (
        f'<form class="range" method="get" action="{html.escape(action, quote=True)}">'
        f'<label>Range <select name="days" data-autosubmit>{options}</select></label>{hidden}'
        '<button type="submit" class="nojs">Show</button></form>'
    )


# --------------------------------------------------------------------------- the overview


@dataclass(frozen=True, slots=True)
class DomainRow:
    domain: str
    totals: ReportTotals
    verdict: str | None
    checked_at: dt.datetime | None


def overview_page(
    rows: Sequence[DomainRow],
    *,
    days: int,
    start: dt.date,
    end: dt.date,
    more: int = 0,
    restricted: bool = False,
) -> str:
    """The list of domains with reports in [start, end] (UTC days), newest audit beside each."""
    parts = [
        f"<h1>TLS reports, {start.isoformat()} to {end.isoformat()} (UTC)</h1>",
        _range_form("/", days),
    ]
    if not rows:
        parts.append(
            '<p class="empty">No reports in this range. Senders post them to '
            "<code>/tlsrpt</code> on the report listener once a day, for the domains whose "
            "<code>_smtp._tls</code> record names it (RFC 8460 §3).</p>"
        )
    else:
        parts.append(
            '<table class="domains"><thead><tr><th>Domain</th><th class="n">Reports</th>'
            '<th class="n">Successful</th><th class="n">Failed</th><th class="n">Failed %</th>'
            "<th>Failed per day</th><th>Latest audit</th></tr></thead><tbody>"
        )
        for row in rows:
            t = row.totals
            checked = (
                f' <span class="when">{text(row.checked_at.strftime("%Y-%m-%d %H:%M"))}</span>'
                if row.checked_at
                else ""
            )
            parts.append(
                f'<tr><td><a href="{domain_href(row.domain, days=days)}">{text(row.domain)}</a>'
                f'</td><td class="n">{num(t.reports)}</td><td class="n">{num(t.successful)}</td>'
                f'<td class="n">{num(t.failed)}</td><td class="n">{_percent(t.failed, t)}</td>'
                f"<td>{_sparkline(t, start, end)}</td>"
                f"<td>{_verdict_badge(row.verdict)}{checked}</td></tr>"
            )
        parts.append("</tbody></table>")
    if more:
        parts.append(
            f'<p class="note">{num(more)} more domains have reports in this range; open one '
            "with /domain/NAME.</p>"
        )
    if restricted:
        parts.append('<p class="note">Only reports for the configured domains are accepted.</p>')
    return page("Overview", "\n".join(parts))


def _percent(failed: int, t: ReportTotals) -> str:
    total = t.successful + t.failed
    if not total:
        return "–"
    share = 100.0 * failed / total
    return f"{share:.2f}" if share >= 0.01 or not failed else "<0.01"


def _days(start: dt.date, end: dt.date) -> list[dt.date]:
    count = (end - start).days + 1
    return [start + dt.timedelta(days=i) for i in range(max(count, 0))]


def _sparkline(t: ReportTotals, start: dt.date, end: dt.date) -> str:
    days = _days(start, end)
    by_day = {d.day: d for d in t.days}
    top = max((by_day[d].failed for d in days if d in by_day), default=0)
    w = 3
    bars = []
    for i, d in enumerate(days):
        item = by_day.get(d)
        if item is None or not item.failed or not top:
            continue
        h = max(1.0, 20.0 * item.failed / top)
        bars.append(f'<rect x="{i * w}" y="{20 - h:.2f}" width="{w - 1}" height="{h:.2f}"/>')
    width = max(len(days) * w, 1)
    return (
        f'<svg class="spark" viewBox="0 0 {width} 20" preserveAspectRatio="none" '
        f'role="img" aria-label="failed sessions per day">{"".join(bars)}</svg>'
    )


# --------------------------------------------------------------------------- a domain


def domain_page(
    totals: ReportTotals,
    verdict: Verdict | None,
    *,
    days: int,
    start: dt.date,
    end: dt.date,
    day: dt.date | None = None,
    day_totals: ReportTotals | None = None,
    reports: Sequence[ReceivedRecord] | None = None,
    listed_at_most: int = 50,
) -> str:
    """One domain: the range's sessions per day, its failures by result type, sending
    organisation and MX host (of `day_totals` when a day is chosen), the latest audit, and for
    a chosen day its reports (`reports`; None when there were too many to list)."""
    domain = totals.domain
    shown = day_totals if day_totals is not None else totals
    when = day.isoformat() if day else f"{start.isoformat()} to {end.isoformat()}"
    parts = [
        f"<h1>{text(domain)}</h1>",
        _range_form("/domain/" + quote(domain, safe=""), days),
        '<section class="cards">',
        _card("Reports", num(shown.reports), when),
        _card("Successful sessions", num(shown.successful), when, "ok"),
        _card("Failed sessions", num(shown.failed), f"{_percent(shown.failed, shown)} %", "fail"),
        _audit_card(verdict),
        "</section>",
        "<h2>Sessions per day</h2>",
        '<p class="hint">Select a day for its reports and failure details.</p>',
        _day_chart(totals, start, end, days=days, chosen=day),
    ]
    if day is not None:
        parts.append(
            f'<p class="chosen">Showing {text(day.isoformat())} · '
            f'<a href="{domain_href(domain, days=days)}">back to the whole range</a></p>'
        )
    parts += [
        "<h2>Failures by result type</h2>",
        _result_types(shown.result_types, domain),
        "<h2>By sending organisation</h2>",
        _organisations(shown),
        "<h2>By receiving MX host</h2>",
        _mx_hosts(shown.mx_hosts),
        _audit_section(domain, verdict),
    ]
    if day is not None:
        parts.append(f"<h2>Reports of {text(day.isoformat())}</h2>")
        if reports is None:
            parts.append(
                f'<p class="note">{num(shown.reports)} reports that day, more than the '
                f"{listed_at_most} this page lists; the totals above count them all.</p>"
            )
        elif not reports:
            parts.append('<p class="empty">No reports that day.</p>')
        else:
            parts.extend(_report(r, domain) for r in reports)
    nav = f' <a class="crumb" href="{_href("/", days=days)}">all domains</a>'
    return page(domain, "\n".join(parts), nav=nav)


def _card(title: str, value: str, note: str, kind: str = "") -> str:
    return (
        f'<div class="card {kind}"><div class="label">{text(title)}</div>'
        f'<div class="value">{value}</div><div class="sub">{text(note)}</div></div>'
    )


def _audit_card(v: Verdict | None) -> str:
    if v is None:
        return (
            '<div class="card"><div class="label">Latest audit</div>'
            f'<div class="value">{_verdict_badge(None)}</div>'
            '<div class="sub">run mxguard check</div></div>'
        )
    return (
        '<div class="card"><div class="label">Latest audit</div>'
        f'<div class="value">{_verdict_badge(v.verdict)}</div>'
        f'<div class="sub">{text(v.at.strftime("%Y-%m-%d %H:%M UTC"))}</div></div>'
    )


def _day_chart(
    t: ReportTotals, start: dt.date, end: dt.date, *, days: int, chosen: dt.date | None
) -> str:
    """Two bar rows per UTC day, successful sessions above, failed below, each on its own
    scale (a few failures among millions of sessions must still show); each day a link."""
    all_days = _days(start, end)
    by_day = {d.day: d for d in t.days}
    n = max(len(all_days), 1)
    left, right, top_pad = 64, 8, 8
    step = max(6.0, min(28.0, 900.0 / n))
    width = left + right + step * n
    row = 80.0
    gap = 26.0
    height = top_pad + row + gap + row + 22
    max_ok = max((d.successful for d in t.days), default=0)
    max_bad = max((d.failed for d in t.days), default=0)
    out = [
        f'<svg class="chart days" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        'aria-labelledby="days-title">',
        '<title id="days-title">Successful and failed sessions per UTC day</title>',
        f'<text class="axis" x="{left - 6}" y="{top_pad + 10}" text-anchor="end">'
        f"{_short(max_ok)}</text>",
        f'<text class="axis" x="{left - 6}" y="{top_pad + row}" text-anchor="end">0</text>',
        f'<text class="axis ok" x="4" y="{top_pad + row / 2}">ok</text>',
        f'<text class="axis" x="{left - 6}" y="{top_pad + row + gap + 10}" text-anchor="end">'
        f"{_short(max_bad)}</text>",
        f'<text class="axis fail" x="4" y="{top_pad + row + gap + row / 2}">failed</text>',
        f'<line class="base" x1="{left}" x2="{width - right:.1f}" y1="{top_pad + row}" '
        f'y2="{top_pad + row}"/>',
    ]
    label_every = max(1, math.ceil(n / 12))
    for i, d in enumerate(all_days):
        item = by_day.get(d)
        x = left + i * step
        ok = item.successful if item else 0
        bad = item.failed if item else 0
        h_ok = row * ok / max_ok if max_ok else 0.0
        h_bad = row * bad / max_bad if max_bad else 0.0
        if ok and h_ok < 1:
            h_ok = 1.0
        if bad and h_bad < 1:
            h_bad = 1.0
        cls = "day chosen" if d == chosen else "day"
        tip = f"{d.isoformat()}: {num(ok)} successful, {num(bad)} failed sessions"
        if item:
            tip += f", {num(item.reports)} reports"
        out.append(
            f'<a href="{domain_href(t.domain, days=days, day=d.isoformat())}">'
            f'<g class="{cls}"><title>{text(tip)}</title>'
            f'<rect class="hit" x="{x:.1f}" y="{top_pad}" width="{step:.1f}" '
            f'height="{row * 2 + gap:.1f}"/>'
            f'<rect class="ok" x="{x + 1:.1f}" y="{top_pad + row - h_ok:.2f}" '
            f'width="{max(step - 2, 1):.1f}" height="{h_ok:.2f}"/>'
            f'<rect class="fail" x="{x + 1:.1f}" y="{top_pad + row + gap:.2f}" '
            f'width="{max(step - 2, 1):.1f}" height="{h_bad:.2f}"/></g></a>'
        )
        if i % label_every == 0:
            out.append(
                f'<text class="axis" x="{x + step / 2:.1f}" y="{height - 6:.0f}" '
                f'text-anchor="middle">{text(d.strftime("%m-%d"))}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def _short(n: int) -> str:
    for size, suffix in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _bar(value: int, top: int, kind: str) -> str:
    width = 100.0 * value / top if top else 0.0
    if value and width < 0.5:
        width = 0.5
    return (
        f'<svg class="bar {kind}" viewBox="0 0 100 10" preserveAspectRatio="none" '
        f'aria-hidden="true"><rect width="{width:.2f}" height="10"/></svg>'
    )


def _result_types(tallies: Sequence[Tally], domain: str) -> str:
    if not tallies:
        return '<p class="empty">No failure details in these reports.</p>'
    top = max(t.failed for t in tallies)
    rows = []
    for t in tallies:
        meaning, fix = (x.replace("DOMAIN", domain) for x in explain(t.key))
        label = t.key if t.key is not None else "(not described)"
        known = t.key in EXPLANATIONS
        rows.append(
            f'<tr><td><code class="{"rt" if known else "rt unknown"}">{text(label, 120)}</code>'
            f'</td><td class="n">{num(t.failed)}</td><td class="barcell">'
            f'{_bar(t.failed, top, "fail")}</td><td class="n">{num(t.reports)}</td>'
            f'<td class="explain"><p>{text(meaning, 2000)}</p>'
            f'<p class="fix"><strong>Fix:</strong> {text(fix, 2000)}</p></td></tr>'
        )
    return (
        '<table class="types"><thead><tr><th>Result type</th><th class="n">Failed sessions</th>'
        '<th></th><th class="n">Reports</th><th>What it means, and the fix</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _organisations(t: ReportTotals) -> str:
    if not t.organizations:
        return '<p class="empty">No reports.</p>'
    top = max(max(o.failed for o in t.organizations), 1)
    top_ok = max(max(o.successful for o in t.organizations), 1)
    rows = "".join(
        f'<tr><td class="label" title="{text(o.organization, 200)}">{text(o.organization, 80)}'
        f'</td><td class="n">{num(o.successful)}</td><td class="barcell">'
        f'{_bar(o.successful, top_ok, "ok")}</td><td class="n">{num(o.failed)}</td>'
        f'<td class="barcell">{_bar(o.failed, top, "fail")}</td>'
        f'<td class="n">{num(o.reports)}</td></tr>'
        for o in t.organizations
    )
    return (
        '<table class="orgs"><thead><tr><th>Organisation (as it calls itself)</th>'
        '<th class="n">Successful</th><th></th><th class="n">Failed</th><th></th>'
        f'<th class="n">Reports</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _mx_hosts(tallies: Sequence[Tally]) -> str:
    if not tallies:
        return '<p class="empty">No failure details name a receiving MX host.</p>'
    top = max(t.failed for t in tallies)
    rows = "".join(
        f'<tr><td class="label"><code>{text(t.key if t.key is not None else "(not named)", 120)}'
        f'</code></td><td class="n">{num(t.failed)}</td><td class="barcell">'
        f'{_bar(t.failed, top, "fail")}</td><td class="n">{num(t.reports)}</td></tr>'
        for t in tallies
    )
    return (
        '<table class="hosts"><thead><tr><th>Receiving MX host</th><th class="n">Failed '
        f'sessions</th><th></th><th class="n">Reports</th></tr></thead><tbody>{rows}</tbody>'
        "</table>"
    )


def _audit_section(domain: str, v: Verdict | None) -> str:
    if v is None:
        return (
            "<h2>Latest audit</h2>"
            f'<p class="empty">No audit of {text(domain)} in the store. Run '
            f"<code>mxguard check {text(domain)}</code> with the same store to see here whether "
            "an attacker can downgrade mail to it today.</p>"
        )
    items = "".join(
        f'<li class="{text(sev if sev in ("error", "warning", "info") else "info")}">'
        f'<span class="sev">{text(sev, 20)}</span> {text(detail, 1000)}'
        + (f'<br><span class="fix"><strong>Fix:</strong> {text(fix, 1000)}</span>' if fix else "")
        + "</li>"
        for sev, detail, fix in v.findings
    )
    return (
        f"<h2>Latest audit {_verdict_badge(v.verdict)}</h2>"
        f'<p>{text(v.summary, 2000)} <span class="when">(mxguard check, '
        f"{text(v.at.strftime('%Y-%m-%d %H:%M UTC'))})</span></p>"
        + (f'<ul class="findings">{items}</ul>' if items else "")
    )


def _report(record: ReceivedRecord, domain: str) -> str:
    r = record.report
    dkim = record.dkim
    if dkim is None:
        signed = ""
    elif dkim.ok:
        signed = f" · DKIM verified (d={text(dkim.domain or '', 100)})"
    else:
        signed = " · DKIM not verified"
    head = (
        f'<article class="report"><h3>{text(r.organization_name, 200)}</h3>'
        '<dl class="meta">'
        f"<dt>report-id</dt><dd><code>{text(r.report_id)}</code></dd>"
        f"<dt>range</dt><dd>{text(r.start.isoformat())} to {text(r.end.isoformat())}</dd>"
        f"<dt>contact</dt><dd>{text(r.contact_info or '(none)')}</dd>"
        f"<dt>received</dt><dd>{text(record.received_at.strftime('%Y-%m-%d %H:%M UTC'))} by "
        f"{text(record.source.value)}{signed}</dd></dl>"
    )
    policies = []
    for p in r.policies:
        if p.policy_domain != domain:
            continue
        strings = "\n".join(text(s) for s in p.policy_strings[:20])
        mx = ", ".join(text(m, 120) for m in p.mx_hosts[:20])
        details = "".join(_failure_row(d) for d in p.failure_details[:200])
        policies.append(
            f'<div class="policy"><p><strong>{text(p.policy_type, 60)}</strong> policy · '
            f"{num(p.successful)} successful, {num(p.failed)} failed sessions"
            + (f" · MX patterns: {mx}" if mx else "")
            + "</p>"
            + (f'<pre class="policy-string">{strings}</pre>' if strings else "")
            + (
                '<div class="scroll"><table class="details"><thead><tr><th>Result type</th>'
                '<th class="n">'
                "Sessions</th><th>Sending MTA</th><th>Receiving MX</th><th>Receiving IP</th>"
                "<th>HELO</th><th>Reason code</th><th>Additional information</th></tr></thead>"
                f"<tbody>{details}</tbody></table></div>"
                if details
                else ""
            )
            + "</div>"
        )
    notes = "".join(f"<li>{text(n, 500)}</li>" for n in r.notes[:50])
    return (
        head
        + "".join(policies)
        + (f'<details class="notes"><summary>Notes on reading it</summary><ul>{notes}</ul>'
           "</details>" if notes else "")
        + "</article>"
    )  # fmt: skip


def _failure_row(d: FailureDetail) -> str:
    info = d.additional_information
    if info:
        link = outside_link(info)
        shown = f'<span class="url">{text(info)}</span>'
        if link.href is not None:
            shown += (
                f' <a class="leave" href="{_href("/leave", url=info)}">open, after a warning</a>'
            )
    else:
        shown = ""
    rt = str(d.result_type)
    return (
        f'<tr><td><code class="{"rt" if rt in EXPLANATIONS else "rt unknown"}">{text(rt, 120)}'
        f'</code></td><td class="n">{num(d.failed_session_count)}</td>'
        f"<td>{text(d.sending_mta_ip or '')}</td><td>{text(d.receiving_mx_hostname or '')}</td>"
        f"<td>{text(d.receiving_ip or '')}</td><td>{text(d.receiving_mx_helo or '')}</td>"
        f"<td>{text(d.failure_reason_code or '')}</td><td>{shown}</td></tr>"
    )


# --------------------------------------------------------------------------- leaving


def leave_page(url: str) -> str:
    """The warning page between a report's URL and the browser going there."""
    link = outside_link(url)
    parts = [
        "<h1>A link from a TLS report</h1>",
        '<p class="warning">This address was written by whoever sent the report. Nobody has '
        "checked it: it may lead to a phishing page or to something that attacks your "
        "browser. Open it only if you expected it and trust the host it names.</p>",
        f'<p>The address, as the report gives it:</p><pre class="url">{text(link.shown, MAX_URL)}'
        "</pre>",
    ]
    if link.href is None:
        parts.append(f'<p class="refused">Not offered as a link: {text(link.problem or "")}.</p>')
    else:
        parts.append(f"<p>It leads to the host <code>{text(link.host or '')}</code>.</p>")
        if link.problem:
            parts.append(f'<p class="refused">Careful: {text(link.problem)}.</p>')
        parts.append(
            f'<p><a class="outside" href="{html.escape(link.href, quote=True)}" '
            'rel="noopener noreferrer nofollow" referrerpolicy="no-referrer" target="_blank">'
            f"Open {text(link.href, MAX_URL)}</a></p>"
        )
    parts.append('<p><a href="/">Back to the overview</a></p>')
    return page("Leaving the dashboard", "\n".join(parts))


__all__ = [
    "EXPLANATIONS",
    "RANGES",
    "DomainRow",
    "OutsideLink",
    "Verdict",
    "domain_href",
    "domain_page",
    "error_page",
    "explain",
    "leave_page",
    "outside_link",
    "overview_page",
    "page",
    "text",
    "verdict_of",
]
