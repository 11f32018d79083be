"""notifier: fans the events stream out to the Discord bot's pub/sub channel and, with a bot
token, to one direct message per run that is edited in place as the run advances.

It reads `<prefix>:events` through its own consumer group "notifier" with a stable consumer
name: its own pending entries first after a restart (once each), then new ones, and, like
the command actors, XAUTOCLAIM of entries idle past the lease (`MT_LEASE_S`): a notifier
that died with a batch read leaves it to the next one. Each batch is published, then
acknowledged (at-least-once: a crash in between publishes a batch twice). An event that
does not decode, or that the translation fails on, goes to the dead letters with the ack.
The group is created at "$" the first time, so a notifier that starts on an old stream does
not replay history to the bot; if Redis loses the group, it is recreated at the last entry
handled (or "$" when none was), so nothing after that point is skipped.

The translation into the bot's event shapes is actors.workers.bot_events; the direct
messages are actors.workers.discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.connection import (
    GroupReader,
    Redis,
    connect,
    keep_alive,
    read_entries,
    sit_out_outage,
)
from actors.runtime.outcome import dead_letter
from actors.workers.bot_events import NotifierConfig, Translator
from actors.workers.discord import Discord, Mailer
from protocol.codec import FIELD, decode_event
from protocol.events import (
    RunCompleted,
)
from protocol.keys import Keys

GROUP = "notifier"


class Notifier:
    """Reads the events stream as consumer `consumer` of group "notifier"."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        consumer: str,
        keys: Keys | None = None,
        config: NotifierConfig | None = None,
        blocking_redis: Redis | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = keys or Keys(settings.prefix)
        self.consumer = consumer
        self.config = config or NotifierConfig()
        self.translator = Translator(settings, self.config)
        self.log = log.get("notifier").bind(consumer=consumer)
        self._stopping = asyncio.Event()
        self._last_id: str | None = None
        self._last_claim = 0.0
        self._mailer: Mailer | None = None
        self.reader = GroupReader(
            redis,
            blocking_redis or redis,
            self.keys.events,
            GROUP,
            consumer,
            lambda: self._last_id or "$",
        )

    async def ensure_group(self, start: str | None = None) -> None:
        """Create the group: at `start`, else after the last entry handled, else at "$"."""
        await self.reader.ensure(start)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, until_idle: bool = False) -> None:
        """Read and notify until stopped; with until_idle, handle what is there and return."""
        await self.ensure_group()
        session: aiohttp.ClientSession | None = None
        if self.settings.discord_token:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            discord = Discord(
                session,
                self.settings.discord_api,
                self.settings.discord_token,
                self.config.discord_tries,
            )
            self._mailer = Mailer(discord, self.config)
        else:
            self.log.info("Discord DMs are off (no MT_DISCORD_TOKEN)")
        alive_key = self.keys.heartbeat("notifier", self.consumer)
        heartbeat = asyncio.create_task(keep_alive(self.redis, alive_key, self.config.heartbeat_s))
        try:
            await self._loop(until_idle)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if self._mailer is not None:
                await self._mailer.close()
                self._mailer = None
            if session is not None:
                await session.close()

    async def _loop(self, until_idle: bool) -> None:
        # Our own pending entries first (a restart with the same name), each read once.
        backlog, cursor = True, "0"
        outages = 0
        while not self._stopping.is_set():
            try:
                if backlog:
                    entries = await self._read(cursor, None)
                    backlog = bool(entries)
                    if entries:
                        cursor = entries[-1][0]
                elif time.monotonic() - self._last_claim > self.settings.lease_s / 3:
                    entries = await self._claim()
                else:
                    entries = await self._read(">", 50 if until_idle else self.config.block_ms)
                    if until_idle and not entries:
                        entries = await self._claim()  # one last look for a dead one's
                        if not entries:
                            return
                if entries:
                    await self._handle(entries)
                outages = 0
            except (RedisConnectionError, RedisTimeoutError) as e:
                outages += 1
                backlog, cursor = True, "0"
                await sit_out_outage(outages, e, self._stopping, self.log)

    async def _read(self, entry_id: str, block: int | None) -> list[tuple[str, bytes]]:
        entries = await self.reader.read(entry_id, self.config.batch, block)
        return [(eid, fields.get(FIELD.encode(), b"")) for eid, fields in entries]

    async def _claim(self) -> list[tuple[str, bytes]]:
        """Entries idle past the lease: the notifier that read them died (a live one
        acknowledges each batch as soon as it is published)."""
        self._last_claim = time.monotonic()
        try:
            reply = await self.redis.xautoclaim(
                self.keys.events,
                GROUP,
                self.consumer,
                min_idle_time=int(self.settings.lease_s * 1000),
                start_id="0-0",
                count=self.config.batch,
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return []
        entries = read_entries([[self.keys.events, reply[1]]])
        if entries:
            self.log.info("claimed idle events", count=len(entries), first=entries[0][0])
        return [(eid, fields.get(FIELD.encode(), b"")) for eid, fields in entries]

    async def _handle(self, entries: list[tuple[str, bytes]]) -> None:
        """Translate a batch, then publish it, dead-letter what failed and acknowledge it
        all in one round trip."""
        outgoing: list[bytes] = []
        dead: list[dict[str, bytes | str]] = []
        for entry_id, raw in entries:
            try:
                outgoing.extend(await self._translate(raw))
            except (RedisConnectionError, RedisTimeoutError):
                raise  # an outage, not a bad event: the loop retries the batch
            except Exception as e:  # one bad event must not stop the notifier
                reason = f"{type(e).__name__}: {e}"
                if isinstance(e, msgspec.DecodeError | msgspec.ValidationError):
                    reason = f"undecodable event: {e}"
                self.log.error("event dead-lettered", entry_id=entry_id, reason=reason)
                dead.append(
                    dead_letter(
                        raw,
                        error=reason,
                        stream=self.keys.events,
                        entry_id=entry_id,
                        deliveries=1,
                        actor="notifier",
                        consumer=self.consumer,
                    )
                )
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in outgoing:
                pipe.publish(self.settings.events_channel, message)
            for letter in dead:
                pipe.xadd(self.keys.dead, letter)  # type: ignore[arg-type]  # redis-py's field type is invariant
            self.reader.ack(pipe, *[i for i, _ in entries])
            await pipe.execute()
        newest = max((i for i, _ in entries), key=_order)
        if self._last_id is None or _order(newest) > _order(self._last_id):
            self._last_id = newest  # a claimed batch is older than what was read before

    async def _translate(self, raw: bytes) -> list[bytes]:
        """One event → the bot's messages (and the run's direct message updated)."""
        event = decode_event(raw)
        if not self.translator.relevant(event):
            return []
        view = self.translator.view(event.run_id)
        if isinstance(event, RunCompleted) and not view.state.artifact:
            stored = await self.redis.hget(self.keys.run(event.run_id), "artifact")
            if stored:  # the artifact event came before this notifier's time
                artifact = stored.decode() if isinstance(stored, bytes) else stored
                view.state = msgspec.structs.replace(view.state, artifact=artifact)
        messages = [msgspec.json.encode(m) for m in self.translator.messages(event, view)]
        if self._mailer is not None:
            self._mailer.update(view)
        if view.final:
            self.translator.finish(event.run_id)
        return messages


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def run_notifier(
    settings: Settings,
    url: str,
    *,
    stop: asyncio.Event | None = None,
    until_idle: bool = False,
    config: NotifierConfig | None = None,
) -> None:
    """Run one notifier on its own connections until `stop` is set (or until idle)."""
    cfg = config or NotifierConfig()
    redis = connect(url)
    blocking = connect(url, blocking=True, block_ms=cfg.block_ms)
    notifier = Notifier(
        redis,
        settings,
        consumer=settings.consumer_name("notifier"),
        config=cfg,
        blocking_redis=blocking,
    )

    async def stop_on(event: asyncio.Event) -> None:
        await event.wait()
        notifier.stop()

    watcher = asyncio.create_task(stop_on(stop)) if stop is not None else None
    try:
        await notifier.run(until_idle=until_idle)
    finally:
        if watcher is not None:
            watcher.cancel()
        for client in (blocking, redis):
            await client.aclose()
