"""`mxguard serve`: the servers mxguard runs for a mail system.

`serve postfix` runs the Postfix socketmap/tcp_table policy server, or queries it. Settings
come from the flags, then the ``[postfix]`` table of the config file, then the defaults
(docs/postfix.md lists every key). SIGHUP re-reads the config file (listeners stay as they
are; the answer cache is kept), SIGTERM and SIGINT stop gracefully (exit 0).

`serve mta-sts` and `serve reports` live in cli/serve_owner.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, ClassVar

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import EXIT_DEFERRED, EXIT_OK, EXIT_USAGE, emit_json, wants_json
from mxguard.config import ConfigError, Settings, load, port, reject_unknown_keys, resolvers
from mxguard.engine.context import engine
from mxguard.postfix.answers import Answer, Kind, Options
from mxguard.postfix.listen import ListenError
from mxguard.postfix.options import options_from
from mxguard.postfix.query import query
from mxguard.postfix.server import PolicyServer

log = logging.getLogger(__name__)

_POSTFIX_KEYS = {
    "listen": 'a listen address or a list of them, e.g. "inet:127.0.0.1:8461"',
    "tcp_table": 'a listen address for the tcp_table protocol, e.g. "inet:127.0.0.1:8462"',
    "metrics": 'a listen address for /healthz and /metrics, e.g. "inet:127.0.0.1:9461"',
    "budget": "seconds (0.05 to 60) a lookup may take before the answer is TEMP",
    "answer_ttl": "seconds (1 to 86400) an answer is cached at most",
    "tlsrpt_attributes": "true or false: Postfix >= 3.10 TLS-RPT attributes",
    "strict_testing": "true or false: MTA-STS testing answers encrypt",
    "unusable_tlsa": '"encrypt" or "dane"',
    "map_names": 'a list of socketmap names to answer, e.g. ["postfix"]',
}


def _table(s: Settings) -> dict[str, Any]:
    table = dict(s.postfix)
    reject_unknown_keys(table, _POSTFIX_KEYS, f"{s.source}: postfix")
    for key in ("budget", "answer_ttl"):
        low, high = (0.05, 60) if key == "budget" else (1, 86400)
        value = table.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ConfigError(f"{s.source}: postfix.{key}: expected {_POSTFIX_KEYS[key]}")
    for key in ("tcp_table", "metrics"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{s.source}: postfix.{key}: expected {_POSTFIX_KEYS[key]}")
    listen = table.get("listen")
    if listen is not None and not (
        isinstance(listen, str)
        or (isinstance(listen, list) and listen and all(isinstance(x, str) for x in listen))
    ):
        raise ConfigError(f"{s.source}: postfix.listen: expected {_POSTFIX_KEYS['listen']}")
    return table


class _LazyServe(click.Group):
    """`serve`, whose web servers (uvicorn, Starlette) are imported only when one of them runs:
    `serve postfix` is a long-running process, and what it imports it keeps in memory."""

    _ELSEWHERE: ClassVar[dict[str, str]] = {"mta-sts": "mta_sts", "reports": "reports"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._ELSEWHERE))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._ELSEWHERE and cmd_name not in self.commands:
            from mxguard.cli import serve_owner

            self.add_command(getattr(serve_owner, self._ELSEWHERE[cmd_name]), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group("serve", cls=_LazyServe)
def serve() -> None:
    """Run mxguard as a server for a mail system."""


@serve.command("postfix")
@click.option(
    "--listen",
    multiple=True,
    metavar="inet:HOST:PORT|unix:PATH",
    help="socketmap listener (repeatable). Default inet:127.0.0.1:8461.",
)
@click.option("--tcp-table", metavar="ADDR", help="Also serve the tcp_table protocol here.")
@click.option("--metrics", metavar="ADDR", help="Serve /healthz and /metrics (HTTP) here.")
@click.option(
    "--tlsrpt-attributes/--no-tlsrpt-attributes",
    default=None,
    help="Add TLS-RPT attributes to answers (Postfix >= 3.10 only).",
)
@click.option(
    "--strict-testing/--no-strict-testing",
    default=None,
    help="MTA-STS testing: answer encrypt instead of Postfix's default level.",
)
@click.option(
    "--unusable-tlsa",
    type=click.Choice(["encrypt", "dane"]),
    default=None,
    help="Answer for domains with only unusable TLSA records (default encrypt).",
)
@click.option(
    "--budget",
    type=float,
    metavar="SECONDS",
    help="Time a cache miss may take before the answer is TEMP (default 5).",
)
@click.option(
    "--query",
    "query_key",
    metavar="KEY",
    help="Print the answer for KEY (a domain or any Postfix key) and exit: 0 for OK or "
    "NOTFOUND, 75 for TEMP, 2 for PERM (KEY is not a valid key).",
)
@click.option("--json", "as_json", is_flag=True, default=None, help="With --query: JSON.")
@click.pass_context
def postfix(
    ctx: click.Context,
    listen: tuple[str, ...],
    tcp_table: str | None,
    metrics: str | None,
    tlsrpt_attributes: bool | None,
    strict_testing: bool | None,
    unusable_tlsa: str | None,
    budget: float | None,
    query_key: str | None,
    as_json: bool | None,
) -> None:
    """The Postfix TLS policy server (smtp_tls_policy_maps = socketmap:inet:HOST:PORT:postfix).

    Answers per domain: dane-only (usable DANE), secure match=... (MTA-STS or list enforce),
    encrypt, TEMP on temporary or DNSSEC failures, NOTFOUND without a policy. See
    docs/postfix.md for main.cf lines and every decision.

    Exit status: 0 after SIGTERM or SIGINT, 1 when a listener cannot be opened, 2 on a usage
    error. With --query KEY: 0 for an OK or NOTFOUND answer, 75 (EX_TEMPFAIL) for TEMP (Postfix
    would defer the mail and ask again later), 2 for PERM (KEY is not a key Postfix sends).
    """
    from mxguard.cli import settings

    s = settings(ctx)
    try:
        table = _table(s)
        options = options_from(
            s, tlsrpt_attributes=tlsrpt_attributes, strict_testing=strict_testing,
            unusable_tlsa=unusable_tlsa,
        )  # fmt: skip
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if budget is not None and not 0.05 <= budget <= 60:
        raise click.BadParameter("expected seconds from 0.05 to 60", param_hint="--budget")

    if query_key is not None:
        ctx.exit(_query(s, query_key, options, wants_json(ctx, as_json)))

    listens = list(listen) or table.get("listen") or ["inet:127.0.0.1:8461"]
    try:
        server = PolicyServer(
            s,
            listen=[listens] if isinstance(listens, str) else listens,
            tcp_table=tcp_table or table.get("tcp_table"),
            metrics=metrics or table.get("metrics"),
            options=options,
            budget=budget if budget is not None else float(table.get("budget", 5.0)),
            answer_ttl=float(table.get("answer_ttl", 300.0)),
        )
    except ListenError as exc:
        raise click.UsageError(str(exc)) from None
    overrides = {"tlsrpt_attributes": tlsrpt_attributes, "strict_testing": strict_testing,
                 "unusable_tlsa": unusable_tlsa}  # fmt: skip
    try:
        asyncio.run(_run(server, lambda: _reread(ctx), overrides))
    except OSError as exc:
        # Name what could not be opened: "[Errno 2] No such file or directory" alone does not.
        where = ", ".join(
            str(x) for x in (*server.listen, server.tcp_table, server.metrics_listen) if x
        )
        raise click.ClickException(f"cannot listen on {where}: {exc.strerror or exc}") from None
    except (ConfigError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None


# `serve postfix --query`: the exit status of each kind of answer. TEMP (and TIMEOUT, which
# the server alone gives) is what a caller must retry, as Postfix does; PERM, for a key that is
# not one, is the caller's mistake.
_QUERY_EXIT = {
    Kind.OK: EXIT_OK,
    Kind.NOTFOUND: EXIT_OK,
    Kind.TEMP: EXIT_DEFERRED,
    Kind.TIMEOUT: EXIT_DEFERRED,
    Kind.PERM: EXIT_USAGE,
}


def _query(s: Settings, key: str, options: Options, as_json: bool) -> int:
    """Print the answer for ``key``; return the exit status (``_QUERY_EXIT``)."""

    async def run() -> tuple[Answer, Any]:
        async with engine(s) as e:
            return await query(e, key, options)

    try:
        answer, policy = asyncio.run(run())
    except (ConfigError, StoreError) as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        emit_json(
            {
                "key": key,
                "answer": answer.socketmap().decode(),
                "kind": answer.kind.value,
                "policy": policy.to_json() if policy is not None else None,
            }
        )
    else:
        click.echo(answer.socketmap().decode())
        if policy is not None:
            from mxguard.cli.policy import render

            render(policy)
    return _QUERY_EXIT[answer.kind]


def _reread(ctx: click.Context) -> Settings:
    """The settings as `main` builds them: the config file again, then the global flags."""
    p = ctx.find_root().params
    config: Path | None = p.get("config")
    new = load(config) if config else Settings()
    resolver_list = [part for r in p.get("resolver") or () for part in r.split(",") if part]
    return new.with_overrides(
        resolvers=resolvers(resolver_list, "--resolver") if resolver_list else None,
        ca_file=p.get("ca_file"),
        smtp_port=port(p["smtp_port"], "--smtp-port") if p.get("smtp_port") else None,
        https_port=port(p["https_port"], "--https-port") if p.get("https_port") else None,
        store=p.get("store"),
    )


async def _run(server: PolicyServer, reread: Any, overrides: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            new = reread()
            _table(new)
            await server.reload(new, options_from(new, **overrides))
        except (ConfigError, StoreError, OSError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)

    def on_hup() -> None:
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    click.echo(
        "mxguard: serving Postfix on "
        + ", ".join(str(a) for a in server.socketmap_addresses)
        + (f"; tcp_table {server.tcp_table_address}" if server.tcp_table_address else "")
        + (f"; metrics {server.metrics_address}" if server.metrics_address else ""),
        err=True,
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await asyncio.gather(*reloads, return_exceptions=True)
        await server.stop()
