"""`serve mta-sts` and `serve reports`: the domain owner's web servers, in a module of their own
so that `serve postfix` does not import uvicorn and Starlette (cli/serve.py adds them to the
`serve` group when asked for).

`serve mta-sts` is the HTTPS server of ``mta-sts.<domain>`` for policies written by `sts
publish` (``mxguard.owner.mta_sts_server``, docs/publish.md). SIGHUP reloads the certificate
files (a file that fails keeps its old certificate), SIGTERM and SIGINT stop it (exit 0).

`serve reports` receives TLS reports over HTTPS and serves the dashboard
(``mxguard.owner.reports_server``, docs/reports.md).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from mxguard.adapters.store import StoreError
from mxguard.cli.output import EXIT_OK, emit_json, wants_json
from mxguard.owner import mta_sts_server, reports_server


@click.command("mta-sts")
@click.option("--root", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Serve ROOT/<domain>/.well-known/mta-sts.txt for Host mta-sts.<domain> "
                   "(the layout `sts publish --out ROOT` writes).")  # fmt: skip
@click.option("--cert", "certs", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Certificate chain (PEM, leaf first); repeatable, one --key each. Each "
                   "connection gets the first one whose names cover its SNI name.")  # fmt: skip
@click.option("--key", "keys", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Private key (PEM, unencrypted) of the --cert in that position.")  # fmt: skip
@click.option("--listen", multiple=True, metavar="ADDR[:PORT]",
              help="Address to listen on, port 443 unless given; IPv6 as [ADDR]:PORT. "
                   "Repeatable. Default 0.0.0.0:443 and [::]:443.")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Connections served at once; a request on one more gets a 503.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              metavar="SECONDS",
              help="Seconds a connection may stay open, whatever it does.")  # fmt: skip
@click.pass_context
def mta_sts(
    ctx: click.Context,
    root: Path,
    certs: tuple[Path, ...],
    keys: tuple[Path, ...],
    listen: tuple[str, ...],
    concurrency: int,
    timeout: float,
) -> None:
    """The HTTPS server of mta-sts.<domain>: serves MTA-STS policy files (RFC 8461 §3.3).

    200 text/plain with CRLF lines for a valid policy file, 404 for other hosts and paths,
    405 for other methods, 500 (and a log line) for a file that is not a valid policy. TLS 1.2
    or newer. SIGHUP reloads the certificates: new connections get the new ones; a file that
    does not load is logged and its old certificate kept. One log line per request with -v.

    Exit status: 0 after SIGTERM or SIGINT, 1 when an address cannot be opened, 2 on a usage
    error (including a certificate or key that cannot be used).
    """
    if len(certs) != len(keys):
        raise click.UsageError(
            f"{len(certs)} --cert and {len(keys)} --key given: give one --key per --cert"
        )
    try:
        if listen:
            listens = [mta_sts_server.parse_listen(x) for x in listen]
        else:
            listens = [
                mta_sts_server.parse_listen("0.0.0.0:443"),
                mta_sts_server.parse_listen("[::]:443", required=False),
            ]
        server = mta_sts_server.Server(
            root,
            [mta_sts_server.CertificatePair(c, k) for c, k in zip(certs, keys, strict=True)],
            listens,
            limits=mta_sts_server.Limits(concurrency=concurrency, connection_lifetime=timeout),
        )
    except mta_sts_server.ListenError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    except mta_sts_server.CertificateError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        asyncio.run(_run_mta_sts(server, root))
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc.strerror or exc}") from None


async def _run_mta_sts(server: mta_sts_server.Server, root: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before start: a SIGHUP while starting must not end the process (its default action).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await server.start()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        raise
    domains = server.files.domains()
    click.echo(
        f"mxguard: serving MTA-STS policies of {len(domains)} domain(s) from {root} on "
        + ", ".join(f"https://{a}" for a in server.addresses),
        err=True,
    )
    waiter = asyncio.ensure_future(server.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        stopper.cancel()
        await server.stop()
        waiter.cancel()


_DEFAULTS = reports_server.Limits()


@click.command("reports")
@click.option("--listen", multiple=True, metavar="ADDR[:PORT]",
              help="Where senders POST reports (https://HOST/tlsrpt), port 443 unless given; "
                   "repeatable. Default 0.0.0.0:443 and [::]:443.")  # fmt: skip
@click.option("--cert", "certs", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Certificate chain (PEM, leaf first) for the report endpoint; repeatable, "
                   "one --key each, chosen by SNI.")  # fmt: skip
@click.option("--key", "keys", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Private key (PEM, unencrypted) of the --cert in that position.")  # fmt: skip
@click.option("--plain-http", is_flag=True,
              help="Serve the report endpoint (and an exposed dashboard) over plain HTTP: only "
                   "behind a reverse proxy that terminates TLS.")  # fmt: skip
@click.option("--dashboard-listen", multiple=True, metavar="ADDR[:PORT]",
              help="Where the dashboard listens, port 8025 unless given; repeatable. Default "
                   "127.0.0.1:8025. Anything but loopback needs authentication.")  # fmt: skip
@click.option("--no-dashboard", is_flag=True, help="Receive reports only.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File with the dashboard's bearer token (Authorization: Bearer).")  # fmt: skip
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
              help="Accept reports only about these domains (repeatable).")  # fmt: skip
@click.option("--trusted-proxy", "proxies", multiple=True, metavar="IP",
              help="A reverse proxy whose X-Forwarded-For is believed (repeatable).")  # fmt: skip
@click.option("--dashboard-host", "dashboard_hosts", multiple=True, metavar="NAME",
              help="A Host name the dashboard answers to without authentication, besides "
                   "addresses and localhost (repeatable).")  # fmt: skip
@click.option("--max-body", type=click.IntRange(1024, 64 * 1024 * 1024),
              default=_DEFAULTS.max_body, show_default=True, metavar="BYTES",
              help="Largest POST body.")  # fmt: skip
@click.option("--max-decompressed", type=click.IntRange(1024, 64 * 1024 * 1024),
              default=_DEFAULTS.max_decompressed, show_default=True, metavar="BYTES",
              help="Most JSON a gzip body may inflate to.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1, 600),
              default=_DEFAULTS.request_timeout, show_default=True,
              metavar="SECONDS", help="Time for a request head, then for its body.")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(1, 100_000),
              default=_DEFAULTS.concurrency, show_default=True,
              help="Report requests in flight at once; then the slowest body is cut "
                   "off to make room, or 503.")  # fmt: skip
@click.option("--max-connections", type=click.IntRange(16, 1_000_000),
              default=_DEFAULTS.max_connections, show_default=True,
              help="Report connections open at once; more are closed on arrival.")  # fmt: skip
@click.option("--per-address", type=click.IntRange(1, 100_000),
              default=_DEFAULTS.per_address, show_default=True,
              help="Connections, and requests in flight, per address (IPv6: /64).")  # fmt: skip
@click.option("--rate", type=click.FloatRange(0.001, 10_000),
              default=_DEFAULTS.rate, show_default=True, metavar="PER_SECOND",
              help="Report requests per second per client address, after --burst.")  # fmt: skip
@click.option("--burst", type=click.IntRange(1, 100_000),
              default=_DEFAULTS.burst, show_default=True,
              help="Report requests a client address may make at once.")  # fmt: skip
@click.option("--hash-password", is_flag=True,
              help="Read a dashboard password (prompted, or the first line of standard input), "
                   "print its password_hash line for [reports] and exit.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, default=None,
              help="With --hash-password: JSON.")  # fmt: skip
@click.pass_context
def reports(
    ctx: click.Context,
    listen: tuple[str, ...],
    certs: tuple[Path, ...],
    keys: tuple[Path, ...],
    plain_http: bool,
    dashboard_listen: tuple[str, ...],
    no_dashboard: bool,
    token_file: Path | None,
    domains: tuple[str, ...],
    proxies: tuple[str, ...],
    dashboard_hosts: tuple[str, ...],
    max_body: int,
    max_decompressed: int,
    timeout: float,
    concurrency: int,
    max_connections: int,
    per_address: int,
    rate: float,
    burst: int,
    hash_password: bool,
    as_json: bool | None,
) -> None:
    """Receive TLS reports over HTTPS (RFC 8460 §5.4) and show them on a dashboard.

    Senders POST to https://HOST/tlsrpt: 201 stored, 200 already stored, 4xx refused with the
    reason (nothing stored), 429/503 with Retry-After when over a limit. The dashboard (read
    only, 127.0.0.1:8025 by default) shows per domain and day the successful and failed
    sessions, failures by result type with the fix, by sending organisation and MX host, and
    the latest `mxguard check` verdict; /metrics has the counters. docs/reports.md has the
    security model. SIGHUP reloads the certificates and the token file.

    Exit status: 0 after SIGTERM or SIGINT, 1 when an address cannot be opened, 2 on a usage
    error (an unusable certificate, credential or store; a dashboard exposed without
    authentication).
    """
    from mxguard.adapters.store import default_store_url
    from mxguard.cli import settings
    from mxguard.owner import web_guard

    if hash_password:
        ctx.exit(_hash_password(wants_json(ctx, as_json)))
    s = settings(ctx)
    limits = reports_server.Limits(
        max_body=max_body, max_decompressed=max_decompressed, request_timeout=timeout,
        concurrency=concurrency, max_connections=max_connections, per_address=per_address,
        rate=rate, burst=burst, body_memory=max(_DEFAULTS.body_memory, 4 * max_body),
    )  # fmt: skip
    try:
        config = reports_server.config_from(
            s.reports, s.source, listen=listen, certs=certs, keys=keys, plain_http=plain_http,
            dashboard_listen=dashboard_listen, no_dashboard=no_dashboard, token_file=token_file,
            domains=domains, trusted_proxies=proxies, dashboard_hosts=dashboard_hosts,
            limits=limits,
        )  # fmt: skip
    except reports_server.ReportsConfigError as exc:
        raise click.UsageError(str(exc)) from None
    url = s.store or default_store_url()
    try:
        asyncio.run(_run_reports(url, config))
    except (StoreError, reports_server.CertificateError, web_guard.AuthConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc.strerror or exc}") from None


def _hash_password(as_json: bool) -> int:
    import sys

    from mxguard.owner.web_guard import hash_password

    if sys.stdin.isatty():
        password = click.prompt("Dashboard password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline(4096).rstrip("\r\n")
    if len(password) < 12:
        raise click.UsageError("the password must have at least 12 characters")
    hashed = str(hash_password(password))
    if as_json:
        emit_json({"password_hash": hashed})
    else:
        click.echo(f'password_hash = "{hashed}"')
    return EXIT_OK


async def _run_reports(url: str, config: reports_server.ReportsConfig) -> None:
    from mxguard.adapters.store import open_store
    from mxguard.adapters.store.cache_only import PolicyCacheOnly

    store = await open_store(url)
    try:
        if isinstance(store, PolicyCacheOnly):
            raise StoreError(
                "serve reports keeps the reports in the store, and this store keeps only the "
                "MTA-STS policy cache: use a SQLite or PostgreSQL store (--store)"
            )
        server = reports_server.Server(store, config)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload)
        try:
            await server.start()
            line = "mxguard: receiving TLS reports on " + ", ".join(
                f"{server.scheme}://{a}{reports_server.REPORT_PATH}" for a in server.addresses
            )
            if server.dashboard_addresses:
                dash_scheme = "https" if server.dashboard_gate.tls else "http"
                line += "; dashboard " + ", ".join(
                    f"{dash_scheme}://{a}/" for a in server.dashboard_addresses
                )
            click.echo(line, err=True)
            waiter = asyncio.ensure_future(server.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                await server.stop()
                waiter.cancel()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    finally:
        await store.close()
