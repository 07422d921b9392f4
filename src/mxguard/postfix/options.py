"""The Postfix policy server's answer options (``Options``) from the ``[postfix]`` config table.

Only the keys that change how a policy is translated into an answer are read here
(``tlsrpt_attributes``, ``strict_testing``, ``unusable_tlsa``, ``map_names``); the listener and
cache keys are the command's business (``cli/serve.py``). Pure: reads ``Settings``, raises
``ConfigError`` for a bad value.
"""

from __future__ import annotations

from typing import Any

from mxguard.config import ConfigError, Settings
from mxguard.postfix.answers import Options


def options_from(settings: Settings, **overrides: Any) -> Options:
    """``Options`` from the ``[postfix]`` table of the config, then the given overrides."""
    table = dict(settings.postfix)
    values: dict[str, Any] = {}
    for key in ("tlsrpt_attributes", "strict_testing"):
        if key in table:
            if not isinstance(table[key], bool):
                raise ConfigError(f"{settings.source}: postfix.{key}: expected true or false")
            values[key] = table[key]
    if "unusable_tlsa" in table:
        if table["unusable_tlsa"] not in ("encrypt", "dane"):
            raise ConfigError(
                f'{settings.source}: postfix.unusable_tlsa: expected "encrypt" or "dane"'
            )
        values["unusable_tlsa"] = table["unusable_tlsa"]
    if "map_names" in table:
        names = table["map_names"]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n and " " not in n for n in names)
        ):
            raise ConfigError(
                f'{settings.source}: postfix.map_names: expected a list of names, e.g. ["postfix"]'
            )
        values["map_names"] = frozenset(names)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Options(**values)
