"""The ``[learned]`` section of the config file (docs/learned.md, "Configuration").

::

    [learned]
    mode = "report"            # or "enforce": learned levels become floors
    defer_window = 172800      # seconds an enforced floor defers before after_window applies
    after_window = "bounce"    # or "deliver": what happens once the window has passed
    decay = 5184000            # seconds unseen after which a learned level is forgotten
    alarm_domains = 3          # domains losing STARTTLS within alarm_window raise the alarm
    alarm_window = 900         # seconds
    alarm_enforce = false      # while the alarm is active, enforce for every learned domain

    [learned.domains]          # per-domain mode, beats the global one
    "bank.example" = "enforce"
    "lists.example" = "report"

Every key is checked; an error names the key and what would be right.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mxguard.config import ConfigError, reject_unknown_keys
from mxguard.protocol import names

E = TypeVar("E", bound=enum.StrEnum)


class Mode(enum.StrEnum):
    REPORT = "report"  # deliver, raise the event
    ENFORCE = "enforce"  # a learned level is a floor


class AfterWindow(enum.StrEnum):
    DELIVER = "deliver"  # the floor is lifted: delivered (and reported) as in report mode
    BOUNCE = "bounce"  # the message fails for good


@dataclass(frozen=True)
class LearnedSettings:
    mode: Mode = Mode.REPORT
    domains: Mapping[str, Mode] = field(default_factory=dict)
    defer_window: float = 2 * 86400.0
    after_window: AfterWindow = AfterWindow.BOUNCE
    decay: float = 60 * 86400.0
    alarm_domains: int = 3
    alarm_window: float = 900.0
    alarm_enforce: bool = False

    def mode_for(self, domain: str) -> Mode:
        """The configured mode of ``domain``: its own entry, else its parent's, else global."""
        labels = domain.split(".")
        for i in range(len(labels)):
            found = self.domains.get(".".join(labels[i:]))
            if found is not None:
                return found
        return self.mode


_KEYS = {
    "mode": '"report" or "enforce"',
    "domains": 'a table of domain = "report" or "enforce"',
    "defer_window": "seconds, a number from 0 to 2592000 (30 days)",
    "after_window": '"deliver" or "bounce"',
    "decay": "seconds, a number from 3600 to 315360000 (10 years)",
    "alarm_domains": "a whole number from 2 to 100000",
    "alarm_window": "seconds, a number from 1 to 86400",
    "alarm_enforce": "true or false",
}


def parse(data: Mapping[str, Any], where: str = "learned") -> LearnedSettings:
    """``[learned]`` as settings; ConfigError naming the key for anything wrong."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table with {', '.join(_KEYS)}")
    reject_unknown_keys(data, _KEYS, where)
    values: dict[str, Any] = {}
    if "mode" in data:
        values["mode"] = _enum(Mode, data["mode"], f"{where}.mode")
    if "after_window" in data:
        values["after_window"] = _enum(AfterWindow, data["after_window"], f"{where}.after_window")
    for key, low, high in (
        ("defer_window", 0, 30 * 86400),
        ("decay", 3600, 10 * 365 * 86400),
        ("alarm_window", 1, 86400),
    ):
        if key in data:
            values[key] = _number(data[key], low, high, f"{where}.{key}: expected {_KEYS[key]}")
    if "alarm_domains" in data:
        value = data["alarm_domains"]
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 100000:
            raise ConfigError(
                f"{where}.alarm_domains: {value!r}: expected {_KEYS['alarm_domains']}"
            )
        values["alarm_domains"] = value
    if "alarm_enforce" in data:
        if not isinstance(data["alarm_enforce"], bool):
            raise ConfigError(f"{where}.alarm_enforce: expected {_KEYS['alarm_enforce']}")
        values["alarm_enforce"] = data["alarm_enforce"]
    if "domains" in data:
        table = data["domains"]
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}.domains: expected {_KEYS['domains']}")
        domains: dict[str, Mode] = {}
        for name, mode in table.items():
            key = f"{where}.domains.{name!r}"
            try:
                domain = names.normalise_host(str(name).lstrip("."))
            except ValueError as exc:
                raise ConfigError(f"{key}: not a domain name ({exc})") from None
            domains[domain] = _enum(Mode, mode, key)
        values["domains"] = domains
    return LearnedSettings(**values)


def _enum(kind: type[E], value: object, where: str) -> E:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return kind(value)
    except ValueError:
        allowed = " or ".join(f'"{v}"' for v in kind)
        raise ConfigError(f"{where}: {value!r} is not {allowed}") from None


def _number(value: object, low: float, high: float, message: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{message} (got {value!r})")
    return float(value)
