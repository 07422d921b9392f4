"""Running the relay: the listener and the worker in one event loop, on one queue."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mxguard.adapters.store import StoreError, default_store_url
from mxguard.config import ConfigError, Settings
from mxguard.engine.context import engine
from mxguard.relay.listener import (
    DEFAULT_MAX_SIZE,
    LOOPBACK,
    AuthFileError,
    ListenerConfig,
    Network,
    RelayHandler,
    load_auth_file,
)
from mxguard.relay.queue import RelayQueue, open_queue
from mxguard.relay.worker import RetryPolicy, Worker

log = logging.getLogger(__name__)


@dataclass
class RelayOptions:
    listen: tuple[str, int] = ("127.0.0.1", 10025)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_file: Path | None = None
    trusted: Sequence[str] = LOOPBACK
    node_id: str = field(default_factory=socket.gethostname)
    concurrency: int = 20
    per_domain: int = 4
    lease: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_size: int = DEFAULT_MAX_SIZE
    seed: int | None = None  # jitter seed (tests)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as a listen address, or ConfigError saying what is."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"--listen {text!r}: expected IP:PORT, e.g. 127.0.0.1:10025 (port 0: any free one)"
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def parse_networks(items: Sequence[str]) -> list[Network]:
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"--trust {item!r}: expected a network, e.g. 10.0.0.0/8") from None
    return out


def listener_config(options: RelayOptions, hostname: str) -> ListenerConfig:
    tls = None
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key (STARTTLS needs both), or neither")
    if options.tls_cert is not None and options.tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--tls-cert/--tls-key: cannot load {options.tls_cert} with "
                f"{options.tls_key}: {exc}"
            ) from None
    users: dict[str, str] = {}
    if options.auth_file is not None:
        if tls is None:
            raise ConfigError(
                "--auth-file needs --tls-cert and --tls-key: AUTH is only offered over TLS"
            )
        try:
            users = load_auth_file(options.auth_file)
        except AuthFileError as exc:
            raise ConfigError(f"--auth-file: {exc}") from None
    return ListenerConfig(
        hostname=hostname,
        trusted=parse_networks(options.trusted),
        tls=tls,
        users=users,
        max_size=options.max_size,
    )


async def serve(
    settings: Settings,
    options: RelayOptions,
    *,
    ready: Callable[[str], None] = lambda _line: None,
) -> int:
    """Run the relay until SIGTERM or SIGINT; returns the exit status."""
    config = listener_config(options, settings.helo_name)
    loop = asyncio.get_running_loop()
    async with engine(settings, dns_cache=True) as e:
        queue: RelayQueue = await open_queue(settings.store or default_store_url())
        try:
            worker = Worker(
                queue,
                e.sender(),
                options.node_id,
                hostname=settings.helo_name,
                retry=options.retry,
                concurrency=options.concurrency,
                per_domain=options.per_domain,
                lease=options.lease,
                rng=random.Random(options.seed),
            )
            handler = RelayHandler(config, queue, on_queued=lambda _id: worker.wake())
            host, port = options.listen
            try:
                server = await loop.create_server(handler.protocol, host, port)
            except OSError as exc:
                raise ConfigError(f"--listen {host}:{port}: {exc.strerror}") from None
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            bound = server.sockets[0].getsockname()
            ready(f"{bound[0]}:{bound[1]}")

            async def close_on_stop() -> None:
                await stop.wait()
                server.close()  # accept nothing more while deliveries in progress finish

            closer = asyncio.create_task(close_on_stop())
            try:
                await worker.run(stop)
            finally:
                closer.cancel()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                server.close()
                await server.wait_closed()
        finally:
            await queue.close()
    return 0


async def queue_entries(settings: Settings) -> list[dict[str, object]]:
    """The queue as ``relay queue --json`` prints it: one object per message."""
    queue = await open_queue(settings.store or default_store_url())
    try:
        entries = await queue.entries()
    finally:
        await queue.close()
    messages: dict[str, dict[str, object]] = {}
    for en in entries:
        m = messages.setdefault(
            en.message_id,
            {
                "id": en.message_id,
                "from": en.mail_from,
                "received_at": _iso(en.received_at),
                "size": en.size,
                "requiretls": en.requiretls,
                "tls_optional": en.tls_optional,
                "recipients": [],
            },
        )
        recipients = m["recipients"]
        assert isinstance(recipients, list)
        recipients.append(
            {
                "address": en.recipient,
                "domain": en.domain,
                "attempts": en.attempts,
                "next_attempt_at": _iso(en.next_attempt_at),
                "last_error": en.last_error,
                "claimed_by": en.claimed_by,
                "lease_until": _iso(en.lease_until) if en.lease_until is not None else None,
            }
        )
    return list(messages.values())


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


__all__ = ["RelayOptions", "RetryPolicy", "StoreError", "parse_listen", "queue_entries", "serve"]
