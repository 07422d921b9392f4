"""The ``mxguard`` command line (docs/design.md, "Command-line contract").

Front ends are thin: parse arguments, call the engine, render results. Exit codes: 0 success
or valid, 1 invalid input being linted, 2 usage error, 69 permanent failure, 75 deferred.

Global options are also read from ``MXGUARD_<NAME>`` environment variables and from the
TOML file named by ``--config`` (see ``mxguard.config``); a flag beats its variable, which
beats the file.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mxguard import __version__

if TYPE_CHECKING:
    from mxguard.config import Settings

# Sub-commands live in their own modules and are imported when they are used, not for every
# command: `mxguard --version` or `mxguard check` need neither the lab nor the Postfix server
# (docs/design.md, "Command-line contract"). They are listed here, in one place.
_COMMANDS: dict[str, tuple[str, str]] = {
    "cert": ("mxguard.cli.cert", "cert"),
    "check": ("mxguard.cli.check", "check"),
    "dane": ("mxguard.cli.dane", "dane"),
    "demo": ("mxguard.cli.demo", "demo"),
    "lab": ("mxguard.cli.lab", "lab"),
    "learned": ("mxguard.cli.learned", "learned"),
    "policy": ("mxguard.cli.policy", "policy"),
    "relay": ("mxguard.cli.relay", "relay"),
    "send": ("mxguard.cli.send", "send"),
    "serve": ("mxguard.cli.serve", "serve"),
    "status": ("mxguard.cli.status", "status"),
    "sts": ("mxguard.cli.sts", "sts"),
    "tlsrpt": ("mxguard.cli.tlsrpt", "tlsrpt"),
}
# Commands of a group that live in another module: (group, module, attribute).
_SUBCOMMANDS = {"tlsrpt": [("mxguard.cli.tlsrpt_collect", "collect")]}


class _LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _COMMANDS and cmd_name not in self.commands:
            module, attribute = _COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            for sub_module, sub_attribute in _SUBCOMMANDS.get(cmd_name, []):
                command.add_command(getattr(importlib.import_module(sub_module), sub_attribute))
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


def settings(ctx: click.Context) -> Settings:
    """The effective settings of this invocation (set up by the ``main`` group)."""
    from mxguard.config import Settings

    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings()


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "MXGUARD"},
)
@click.version_option(__version__, prog_name="mxguard")
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="TOML configuration file."
)
@click.option(
    "--resolver",
    multiple=True,
    metavar="ADDR[:PORT]",
    help="DNS resolver to query (repeatable). DANE needs a validating one on loopback.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Extra trusted CA certificates (PEM) for WebPKI checks.",
)
@click.option("--smtp-port", type=int, help="Port used to reach MX hosts (default 25).")
@click.option("--https-port", type=int, help="Port used to fetch MTA-STS policies (default 443).")
@click.option("--store", metavar="URL", help="State: sqlite:///PATH, postgresql://..., redis://...")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    envvar="MXGUARD_JSON",
    help="Machine-readable output.",
)
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug).")
@click.pass_context
def main(
    ctx: click.Context,
    config: Path | None,
    resolver: tuple[str, ...],
    ca_file: Path | None,
    smtp_port: int | None,
    https_port: int | None,
    store: str | None,
    as_json: bool,
    verbose: int,
) -> None:
    """Server-to-server e-mail that a STRIPTLS attacker cannot downgrade."""
    from mxguard.config import ConfigError, Settings, check_ca_file, load, port, resolvers

    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="mxguard: %(levelname)s: %(message)s",
    )
    try:
        s = load(config) if config else Settings()
        # An empty value must not quietly mean "the default": an empty resolver would fall
        # back to the system's (and turn DANE off), an empty store to the default file.
        if any(not r.strip(" ,") for r in resolver):
            raise ConfigError("--resolver (or MXGUARD_RESOLVER) is empty; give ADDRESS[:PORT]")
        if store is not None and not store.strip():
            raise ConfigError("--store (or MXGUARD_STORE) is empty; give a store URL")
        # MXGUARD_RESOLVER may list several, separated by spaces or commas.
        resolver_list = [part for r in resolver for part in r.split(",") if part]
        s = s.with_overrides(
            resolvers=resolvers(resolver_list, "--resolver") if resolver_list else None,
            ca_file=ca_file,
            smtp_port=port(smtp_port, "--smtp-port") if smtp_port is not None else None,
            https_port=port(https_port, "--https-port") if https_port is not None else None,
            store=store,
            json=as_json or None,
        )
        check_ca_file(s)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.obj = s
