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
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mxguard.adapters.dns import parse_server


class ConfigError(ValueError):
    """The configuration is invalid; the message names where and what would be right."""


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
    json: bool = False
    source: str = "defaults"  # where the settings came from, for messages

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
    "local_rules": "a table of domain = floor",
    "fetch_timeout": "seconds (a number from 0.1 to 60) for a whole MTA-STS policy fetch",
}


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
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_KEYS)}"
        )
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
    return s.with_overrides(**values)


def load(path: Path) -> Settings:
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
