"""The ``mxguard`` command line (docs/design.md, "Command-line contract").

Front ends are thin: parse arguments, call the engine, render results. Exit codes: 0 success
or valid, 1 invalid input being linted, 2 usage error, 69 permanent failure, 75 deferred.

Global options are also read from ``MXGUARD_<NAME>`` environment variables and from the
TOML file named by ``--config`` (see ``mxguard.config``); a flag beats its variable, which
beats the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from mxguard import __version__
from mxguard.config import ConfigError, Settings, check_ca_file, load, port, resolvers


def settings(ctx: click.Context) -> Settings:
    """The effective settings of this invocation (set up by the ``main`` group)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings()


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "MXGUARD"}
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


# Sub-command groups live in their own modules; they are registered here, in one place.
from mxguard.cli import cert as _cert  # noqa: E402
from mxguard.cli import check as _check  # noqa: E402
from mxguard.cli import dane as _dane  # noqa: E402
from mxguard.cli import demo as _demo  # noqa: E402
from mxguard.cli import lab as _lab  # noqa: E402
from mxguard.cli import policy as _policy  # noqa: E402
from mxguard.cli import send as _send  # noqa: E402
from mxguard.cli import serve as _serve  # noqa: E402
from mxguard.cli import sts as _sts  # noqa: E402
from mxguard.cli import tlsrpt as _tlsrpt  # noqa: E402
from mxguard.cli import tlsrpt_collect as _tlsrpt_collect  # noqa: E402

main.add_command(_sts.sts)
main.add_command(_dane.dane)
main.add_command(_cert.cert)
main.add_command(_tlsrpt.tlsrpt)
_tlsrpt.tlsrpt.add_command(_tlsrpt_collect.collect)
main.add_command(_lab.lab)
main.add_command(_policy.policy)
main.add_command(_send.send)
main.add_command(_check.check)
main.add_command(_demo.demo)
main.add_command(_serve.serve)
