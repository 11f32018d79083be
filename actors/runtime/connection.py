"""Connections to Redis and reading streams: the client settings every process uses, one
consumer of a consumer group (GroupReader), liveness keys, and the parsing of stream replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from actors.runtime import log

Redis = aioredis.Redis


async def keep_alive(redis: Redis, key: str, every_s: float) -> None:
    """Mark a consumer alive (a key with a TTL of a few periods) until cancelled; /readyz
    looks for one per actor kind."""
    ttl = max(2, int(every_s * 3))
    logger = log.get("runtime").bind(heartbeat=key)
    while True:
        try:
            await redis.set(key, str(time.time()), ex=ttl)
        except Exception as e:  # a missed beat must not end the heartbeat: the next one retries
            logger.warning("heartbeat write failed", error=f"{type(e).__name__}: {e}")
        await asyncio.sleep(every_s)


class GroupReader:
    """One consumer of one stream in one consumer group: creates the group, reads the
    consumer's own pending entries ("0") or new ones (">"), recreates the group when Redis
    lost it (NOGROUP), acknowledges. The command runtime and the notifier read through it.
    """

    def __init__(
        self,
        redis: Redis,
        blocking: Redis,
        stream: str,
        group: str,
        consumer: str,
        recreate_at: Callable[[], str],
    ) -> None:
        self.redis = redis
        self.blocking = blocking  # its own connection: the socket timeout exceeds BLOCK
        self.stream, self.group, self.consumer = stream, group, consumer
        self.recreate_at = recreate_at
        self.log = log.get("runtime").bind(stream=stream, group=group, consumer=consumer)

    async def ensure(self, at: str | None = None) -> None:
        try:
            await self.redis.xgroup_create(
                self.stream, self.group, id=at or self.recreate_at(), mkstream=True
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(
        self, entry_id: str, count: int, block: int | None
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        try:
            reply = await self.blocking.xreadgroup(
                self.group, self.consumer, {self.stream: entry_id}, count=count, block=block
            )
        except ResponseError as e:
            # Redis 7.0/7.1 answer a reader blocked on a deleted stream with UNBLOCKED.
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            self.log.warning("group missing, recreating", at=self.recreate_at())
            await self.ensure()
            return []
        return read_entries(reply)

    def ack(self, pipe: Redis, *entry_ids: str) -> None:
        """Queue the acknowledgement on a pipeline (with the writes it must go with)."""
        pipe.xack(self.stream, self.group, *entry_ids)


async def sit_out_outage(
    outages: int, error: Exception, stopping: asyncio.Event, logger: structlog.stdlib.BoundLogger
) -> None:
    """A reader's pause after Redis became unreachable (outages in a row: growing, capped at
    5 s); a stop ends it early. Redis restarting must not end a reader."""
    delay = min(5.0, 0.05 * 2**outages)
    logger.warning("redis unavailable, retrying", error=str(error), delay_s=delay)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), delay)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_entries(reply: object) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE / XREVRANGE replies (RESP2) → [(entry id, fields)]; deleted entries dropped."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    if not isinstance(reply, list):
        return out
    for entry_id, fields in reply:
        if isinstance(fields, dict):  # None: trimmed or deleted while pending
            out.append((_text(entry_id), dict(fields)))
    return out


def read_entries(reply: object) -> list[tuple[str, dict[bytes, bytes]]]:
    """XREAD / XREADGROUP replies (RESP2): [[stream, entries], ...] → [(entry id, fields)]."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    if isinstance(reply, list):
        for _stream, entries in reply:
            out.extend(stream_entries(entries))
    return out


def connect(url: str, *, blocking: bool = False, block_ms: int = 1000) -> Redis:
    """RESP2 (predictable reply shapes); blocking clients get a timeout longer than BLOCK."""
    timeout = block_ms / 1000 + 10 if blocking else 10.0
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        socket_timeout=timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry_on_timeout=False,
    )
