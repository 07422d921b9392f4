"""The Redis store: an MTA-STS policy cache (RFC 8461 §5) shared by several nodes, nothing else.

`RedisStore` is a `PolicyCache` (store/__init__.py); `open_store` hands it out as a `Store`
through `PolicyCacheOnly` (cache_only.py), whose other roles refuse: TLS-RPT session results
need range queries and must be kept until a report is accepted (RFC 8460 §5), which is
SQLite's or PostgreSQL's job, and so are the report queue and the record of what the Postfix
policy server served (`ServedPolicy`), which go with them.

Each cached policy is one hash, `<prefix>sts-policy:<domain>`, with the fields `policy_id`,
`policy_text`, `fetched_at` and `expires_at` (fixed-width UTC text). The key expires at
`expires_at` (PEXPIREAT), so Redis forgets a policy once RFC 8461 §5 no longer lets anyone
use it; this is the one place where a store applies expiry. The key prefix defaults to
`mxguard:` and is chosen with `?prefix=…` in the URL.

Durability is the server's: a write is acknowledged once Redis has it in memory. Run Redis
with `appendonly yes` and `appendfsync always` if the cache must survive a crash of Redis.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions

from mxguard.adapters.store import (
    CachedPolicy,
    StoreError,
    check_domain,
    check_policy,
    format_time,
    parse_time,
    redact_url,
)

DEFAULT_PREFIX = "mxguard:"

# Seconds to wait for the server on connect and on every command.
TIMEOUT = 10.0


class RedisStore:
    """A PolicyCache on Redis; open it with `await RedisStore.open(url)`."""

    def __init__(self, url: str, client: aioredis.Redis, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._client = client
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> RedisStore:
        """Connect to the Redis server `url` names and check that it answers."""
        try:
            server_url, prefix = _split_prefix(url)
            client = aioredis.Redis.from_url(
                server_url,
                decode_responses=True,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
            )
        except ValueError as exc:
            raise StoreError(
                f"store URL {redact_url(url)!r} is not a valid Redis URL ({exc}); use "
                "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?prefix=KEYPREFIX]"
            ) from exc
        store = cls(url, client, prefix)
        try:
            await store._call(client.ping())
        except BaseException:
            await client.aclose()
            raise
        return store

    # --- policy cache (RFC 8461 §5) ---

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        check_domain(domain)
        fields = await self._call(self._client.hgetall(self._key(domain)))
        return _policy_from_hash(domain, fields)

    async def put_policy(self, policy: CachedPolicy) -> None:
        p = check_policy(policy)
        key = self._key(p.domain)
        # One MULTI/EXEC: readers see the old policy or the new one, never a mix.
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "policy_id": p.policy_id,
                "policy_text": p.policy_text,
                "fetched_at": format_time(p.fetched_at),
                "expires_at": format_time(p.expires_at),
            },
        )
        pipe.pexpireat(key, p.expires_at)
        await self._call(pipe.execute())

    async def delete_policy(self, domain: str) -> None:
        check_domain(domain)
        await self._call(self._client.delete(self._key(domain)))

    async def policies(self) -> list[CachedPolicy]:
        head = self._key("")
        pattern = _glob_escape(head) + "*"

        async def collect() -> list[CachedPolicy]:
            found: list[CachedPolicy] = []
            async for key in self._client.scan_iter(match=pattern, count=500):
                fields: dict[Any, Any] = await self._client.hgetall(key)
                # A key that expired between SCAN and HGETALL comes back empty: skip it.
                policy = _policy_from_hash(str(key)[len(head) :], fields)
                if policy is not None:
                    found.append(policy)
            return sorted(found, key=lambda p: p.domain)

        policies: list[CachedPolicy] = await self._call(collect())
        return policies

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.aclose()

    # --- plumbing ---

    def _key(self, domain: str) -> str:
        return f"{self.prefix}sts-policy:{domain}"

    async def _call(self, awaitable: Any) -> Any:
        if self._closed:
            # redis-py would quietly open a new connection; the other backends refuse.
            _close_unawaited(awaitable)
            raise StoreError(f"Redis store {redact_url(self.url)} is closed; open it again")
        try:
            async with asyncio.timeout(TIMEOUT * 2):
                return await awaitable
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            reason = str(exc).strip() or type(exc).__name__
            raise StoreError(f"Redis store {redact_url(self.url)}: {reason}") from exc


def _close_unawaited(awaitable: Any) -> None:
    # A coroutine that is never awaited warns when it is collected.
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def _split_prefix(url: str) -> tuple[str, str]:
    """The URL without our `prefix` query parameter (redis-py would reject it), and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    kept = []
    for name, value in query:
        if name == "prefix":
            prefix = value
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def _glob_escape(text: str) -> str:
    # SCAN MATCH is a glob: a prefix like "a*b:" must match itself only.
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _policy_from_hash(domain: str, fields: dict[Any, Any]) -> CachedPolicy | None:
    if not fields:
        return None
    try:
        return CachedPolicy(
            domain=domain,
            policy_id=fields["policy_id"],
            policy_text=fields["policy_text"],
            fetched_at=parse_time(fields["fetched_at"]),
            expires_at=parse_time(fields["expires_at"]),
        )
    except (KeyError, ValueError) as exc:
        raise StoreError(
            f"Redis hash for {domain} is not a cached policy written by mxguard ({exc!r}); "
            "delete the key or choose another ?prefix="
        ) from exc
