"""Settings: from the TOML config file, ``MXGUARD_<NAME>`` environment variables and flags.

Precedence: a command-line flag beats its environment variable, which beats the config
file, which beats the built-in default. Every key is checked: an unknown key or a value of
the wrong kind is an error that names the file, the key and what would be right.

Config file (all keys optional)::

    resolver = ["127.0.0.1:53"]        # validating resolver(s) on loopback, for DANE
    ca_file = "/etc/mxguard/extra-ca.pem"
    smtp_port = 25
    https_port = 443
    store = "sqlite:////var/lib/mxguard/state.db"
    policy_list = "/etc/mxguard/policy.json"   # STARTTLS Everywhere format
    helo_name = "mail.example.org"
    fetch_timeout = 10                 # seconds for a whole MTA-STS policy fetch

    [local_rules]                       # floors: "tls", "verified" or "dane"
    "bank.example" = "verified"
    ".gov.example" = "tls"

    [tlsrpt]                            # sending TLS reports (RFC 8460)
    organization_name = "Example Org"   # `organization-name` of the reports
    contact_info = "tlsrpt@example.org" # `contact-info`
    submitter = "mail.example.org"      # TLS-Report-Submitter and the §5.1 file name
    sender = "tlsrpt-noreply@example.org"  # MAIL FROM and From: of report e-mails
    delay_window = 14400                # seconds: reports go out at random within this
    dkim_key = "/etc/mxguard/dkim.pem"  # DKIM-sign report e-mails (RFC 8460 §3): RSA key, PEM
    dkim_selector = "tlsrpt"            # published at tlsrpt._domainkey.<dkim_domain>
    dkim_domain = "example.org"         # d=, the reporting domain; default: the submitter

    [postfix]                           # `mxguard serve postfix`: keys in docs/postfix.md
    listen = "inet:127.0.0.1:8461"

    [reports]                           # `mxguard serve reports`: keys in docs/reports.md
    dashboard_listen = "127.0.0.1:8025"

    [learned]                           # learned security levels: keys in docs/learned.md
    mode = "report"
"""

from __future__ import annotations

import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mxguard.adapters.dns import parse_server
from mxguard.protocol import names


class ConfigError(ValueError):
    """The configuration is invalid; the message names where and what would be right."""


@dataclass(frozen=True)
class TlsRptSettings:
    """How mxguard sends TLS reports (RFC 8460 §4, §5); None values default to names derived
    from ``helo_name`` (see ``Settings.report_*``)."""

    organization_name: str | None = None
    contact_info: str | None = None
    submitter: str | None = None
    sender: str | None = None
    delay_window: float = 4 * 3600.0  # RFC 8460 §4.1 asks senders to spread the load
    # DKIM signatures of report e-mails (RFC 8460 §3): the private key (PEM), the selector,
    # and the signing domain (None: the submitter); no key, no signature.
    dkim_key: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None


@dataclass(frozen=True)
class Settings:
    resolvers: tuple[tuple[str, int], ...] = ()  # empty: the system's resolvers
    ca_file: Path | None = None
    smtp_port: int = 25
    https_port: int = 443
    store: str | None = None  # None: the default SQLite file
    policy_list: Path | None = None
    local_rules: Mapping[str, str] = field(default_factory=dict)
    helo_name: str = field(default_factory=socket.getfqdn)
    fetch_timeout: float = 10.0  # the whole MTA-STS policy fetch, connect to last byte
    postfix: Mapping[str, Any] = field(default_factory=dict)  # checked by mxguard.postfix
    reports: Mapping[str, Any] = field(default_factory=dict)  # checked by owner.reports_server
    learned: Mapping[str, Any] = field(default_factory=dict)  # checked by mxguard.learned.config
    json: bool = False
    tlsrpt: TlsRptSettings = field(default_factory=TlsRptSettings)
    source: str = "defaults"  # where the settings came from, for messages

    @property
    def report_submitter(self) -> str:
        """RFC 8460 §5.3 TLS-Report-Submitter: configured, else the HELO name."""
        return self.tlsrpt.submitter or self.helo_name

    @property
    def report_dkim_domain(self) -> str:
        """The d= of report e-mails: the reporting domain (RFC 8460 §3), configured or else
        the submitter, whose name the reports carry (§5.3 TLS-Report-Submitter)."""
        return self.tlsrpt.dkim_domain or self.report_submitter

    @property
    def report_sender(self) -> str:
        return self.tlsrpt.sender or f"tlsrpt-noreply@{self.report_submitter}"

    @property
    def report_organization(self) -> str:
        return self.tlsrpt.organization_name or self.report_submitter

    @property
    def report_contact(self) -> str:
        return self.tlsrpt.contact_info or f"postmaster@{self.report_submitter}"

    def with_overrides(self, **values: Any) -> Settings:
        """A copy with the given (already validated) values; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_KEYS = {
    "resolver": 'a list of resolver addresses, e.g. ["127.0.0.1:53"]',
    "ca_file": "a path to a PEM file",
    "smtp_port": "a port number",
    "https_port": "a port number",
    "store": 'a store URL such as "sqlite:////var/lib/mxguard/state.db"',
    "policy_list": "a path to a STARTTLS Everywhere policy list (JSON)",
    "helo_name": "the host name mxguard announces in EHLO",
    "json": "true or false: machine-readable output, like --json",
    "local_rules": "a table of domain = floor",
    "fetch_timeout": "seconds (a number from 0.1 to 60) for a whole MTA-STS policy fetch",
    "postfix": "a table of `mxguard serve postfix` settings (see docs/postfix.md)",
    "reports": "a table of `mxguard serve reports` settings (see docs/reports.md)",
    "learned": "a table of learned-level settings (see docs/learned.md)",
    "tlsrpt": "a table with organization_name, contact_info, submitter, sender, delay_window, "
    "dkim_key, dkim_selector, dkim_domain",
}
_TLSRPT_KEYS = (
    "organization_name",
    "contact_info",
    "submitter",
    "sender",
    "delay_window",
    "dkim_key",
    "dkim_selector",
    "dkim_domain",
)
# RFC 6376 §3.1: a selector is a sub-domain: dot-separated labels.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def reject_unknown_keys(
    table: Mapping[str, Any],
    known: Iterable[str],
    where: str,
    error: type[Exception] = ConfigError,
) -> None:
    """Raise ``error`` naming the keys of ``table`` outside ``known`` (listed in that order)."""
    known = list(known)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")


def tlsrpt_settings(data: Any, where: str) -> TlsRptSettings:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected {_KEYS['tlsrpt']}")
    reject_unknown_keys(data, _TLSRPT_KEYS, where)
    values: dict[str, Any] = {}
    for key in ("organization_name", "contact_info", "submitter", "sender"):
        if key in data:
            if not isinstance(data[key], str) or not data[key].strip():
                raise ConfigError(f"{where}.{key}: expected a non-empty string")
            values[key] = data[key].strip()
    if "submitter" in values and ("!" in values["submitter"] or " " in values["submitter"]):
        raise ConfigError(
            f"{where}.submitter: {values['submitter']!r} must be a host name (it is part of "
            'the RFC 8460 §5.1 file name), e.g. "mail.example.org"'
        )
    if "sender" in values and "@" not in values["sender"]:
        raise ConfigError(f"{where}.sender: expected an address like tlsrpt@example.org")
    if "delay_window" in data:
        value = data["delay_window"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
            raise ConfigError(f"{where}.delay_window: expected seconds, a number from 0 to 86400")
        values["delay_window"] = float(value)
    for key in ("dkim_key", "dkim_selector", "dkim_domain"):
        if key in data:
            if not isinstance(data[key], str) or not data[key].strip():
                raise ConfigError(f"{where}.{key}: expected a non-empty string")
            values[key] = data[key].strip()
    if "dkim_key" in values:
        values["dkim_key"] = Path(values["dkim_key"])
    if ("dkim_key" in values) != ("dkim_selector" in values):
        raise ConfigError(
            f"{where}: dkim_key and dkim_selector go together (the key signs, the selector "
            "names where its public half is published)"
        )
    if "dkim_domain" in values and "dkim_key" not in values:
        raise ConfigError(f"{where}.dkim_domain: set dkim_key and dkim_selector too")
    selector = values.get("dkim_selector")
    if selector is not None and (len(selector) > 200 or not _SELECTOR.match(selector)):
        raise ConfigError(
            f"{where}.dkim_selector: {selector!r} is not a DKIM selector (RFC 6376 §3.1: "
            'labels of letters, digits and "-", separated by dots, e.g. "tlsrpt")'
        )
    if "dkim_domain" in values:
        problem = _helo_name_problem(values["dkim_domain"])
        if problem:
            raise ConfigError(
                f"{where}.dkim_domain: {values['dkim_domain']!r} is not a domain name ({problem})"
            )
    return TlsRptSettings(**values)


def _helo_name_problem(value: str) -> str | None:
    """Why ``value`` cannot be the EHLO name, or None. It is sent as written, so it must
    already be ASCII (A-labels, RFC 5321 §4.1.2); names.normalise_host checks the rest."""
    if not value.isascii():
        return "write internationalised labels as A-labels (xn--…)"
    try:
        names.normalise_host(value)
    except names.HostNameError as exc:
        return exc.reason
    return None


def port(value: Any, where: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ConfigError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def resolvers(value: Any, where: str) -> tuple[tuple[str, int], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: expected {_KEYS['resolver']}")
    out = []
    for item in items:
        try:
            out.append(parse_server(item))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(out)


def from_mapping(data: Mapping[str, Any], source: str) -> Settings:
    reject_unknown_keys(data, _KEYS, source)
    s = Settings(source=source)
    values: dict[str, Any] = {}
    if "resolver" in data:
        values["resolvers"] = resolvers(data["resolver"], f"{source}: resolver")
    for key in ("ca_file", "policy_list"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise ConfigError(f"{source}: {key}: expected {_KEYS[key]}")
            values[key] = Path(data[key])
    for key in ("smtp_port", "https_port"):
        if key in data:
            values[key] = port(data[key], f"{source}: {key}")
    for key in ("store", "helo_name"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise ConfigError(f"{source}: {key}: expected {_KEYS[key]}")
            values[key] = data[key]
    if "helo_name" in values:
        helo_problem = _helo_name_problem(values["helo_name"])
        if helo_problem:
            raise ConfigError(
                f"{source}: helo_name: {values['helo_name']!r} is not a host name "
                f"({helo_problem}; letters, digits, '-' and '.', e.g. \"mail.example.org\")"
            )
    if "json" in data:
        if not isinstance(data["json"], bool):
            raise ConfigError(f"{source}: json: expected {_KEYS['json']}")
        values["json"] = data["json"] or None
    if "fetch_timeout" in data:
        value = data["fetch_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.1 <= value <= 60:
            raise ConfigError(f"{source}: fetch_timeout: expected {_KEYS['fetch_timeout']}")
        values["fetch_timeout"] = float(value)
    if "local_rules" in data:
        rules = data["local_rules"]
        if not isinstance(rules, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in rules.items()
        ):
            raise ConfigError(f"{source}: local_rules: expected {_KEYS['local_rules']}")
        values["local_rules"] = dict(rules)
    if "tlsrpt" in data:
        values["tlsrpt"] = tlsrpt_settings(data["tlsrpt"], f"{source}: tlsrpt")
    if "postfix" in data:
        if not isinstance(data["postfix"], Mapping):
            raise ConfigError(f"{source}: postfix: expected {_KEYS['postfix']}")
        values["postfix"] = dict(data["postfix"])
    if "reports" in data:
        if not isinstance(data["reports"], Mapping):
            raise ConfigError(f"{source}: reports: expected {_KEYS['reports']}")
        values["reports"] = dict(data["reports"])
    if "learned" in data:
        if not isinstance(data["learned"], Mapping):
            raise ConfigError(f"{source}: learned: expected {_KEYS['learned']}")
        values["learned"] = dict(data["learned"])
    return s.with_overrides(**values)


def load(path: Path | str) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return from_mapping(data, str(path))


def check_ca_file(settings: Settings) -> None:
    """A CA file that cannot be used is an error, never "no extra CAs".

    Silently trusting fewer CAs would make every MTA-STS policy fetch fail, and a domain with
    no cached policy would then be treated as having none: a broken file must stop mxguard.
    """
    if settings.ca_file is None:
        return
    from mxguard.protocol import roots  # DER only: the check parses no certificate

    try:
        roots.ca_file_ders(settings.ca_file)
    except roots.CaFileError as exc:
        raise ConfigError(f"ca_file: {exc}") from None
