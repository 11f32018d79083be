"""Retention: trim the events stream, the command streams and the runs' log streams by age
(XTRIM MINID).

An entry is never trimmed while any consumer group still needs it: the MINID is the oldest
of the age cutoff, the smallest pending id of every group (XPENDING summary `min`) and the
first entry a group has not been delivered yet (just after its last-delivered-id). So a
command that waits in a stream whose actor has been down for a month is kept, and so is one
a dead consumer still holds. Dead letters (`<prefix>:dead`) are kept: they are the record
of what went wrong.

A run's log stream (`<prefix>:logs:<run_id>`, no consumer group) and its evaluation record
(`<prefix>:eval:<run_id>`) also expire `retention_s()` after their last write; the trim
removes the lines older than the cutoff of a run that is still logging.

The records that hold store pointers (`<prefix>:corpus:<id>`, `<prefix>:tokenizer:<id>`, a
run's `stored` and `checkpoint` fields) are kept, like the run state they go with: a run
submitted later may use that corpus or tokenizer, and they are a few hundred bytes each.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError, ResponseError

from actors.runtime import log
from actors.runtime.connection import Redis
from protocol.keys import COMMAND_ACTORS, Keys
from trainer.errors import UserError

DEFAULT_DAYS = 14.0
EVERY_S = 3600.0


def retention_days(env: Mapping[str, str] | None = None) -> float:
    """MT_RETENTION_DAYS (default 14)."""
    raw = (os.environ if env is None else env).get("MT_RETENTION_DAYS") or ""
    if not raw:
        return DEFAULT_DAYS
    try:
        days = float(raw)
    except ValueError:
        raise UserError(f"MT_RETENTION_DAYS must be a number of days, got {raw!r}") from None
    if not days > 0:
        raise UserError(f"MT_RETENTION_DAYS must be positive, got {raw!r}")
    return days


def retention_s(env: Mapping[str, str] | None = None) -> int:
    """MT_RETENTION_DAYS in seconds: the TTL of a run's log stream and evaluation record."""
    return max(1, int(retention_days(env) * 86400))


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


@dataclass(frozen=True)
class Trimmed:
    stream: str
    minid: str  # entries below this id were removed
    removed: int
    held_by: str  # the group that kept entries past the age cutoff, "" when none did


async def safe_minid(redis: Redis, stream: str, cutoff: tuple[int, int]) -> tuple[str, str]:
    """The MINID to trim `stream` to without losing an entry any group still needs."""
    minid, held_by = cutoff, ""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key
        return format_id(minid), ""
    for group in groups:
        name = group["name"].decode()
        summary = await redis.xpending(stream, name)
        if summary["min"] is not None and parse_id(summary["min"]) < minid:
            minid, held_by = parse_id(summary["min"]), name
        ms, seq = parse_id(group["last-delivered-id"])
        undelivered = (ms, seq + 1)
        if undelivered < minid:
            minid, held_by = undelivered, name
    return format_id(minid), held_by


async def trim(redis: Redis, keys: Keys, *, days: float, now: float | None = None) -> list[Trimmed]:
    """Trim every stream of the prefix (events, commands, runs' logs) to `days` of history;
    a log stream is listed only when it lost entries."""
    if not days > 0:
        raise UserError(f"retention must be a positive number of days, got {days}")
    cutoff = (int(((time.time() if now is None else now) - days * 86400) * 1000), 0)
    out: list[Trimmed] = []
    for stream in [keys.events, *(keys.cmd(actor) for actor in COMMAND_ACTORS)]:
        minid, held_by = await safe_minid(redis, stream, cutoff)
        # Exact, not `~`: an approximate trim removes only whole radix nodes (often nothing).
        removed = int(await redis.xtrim(stream, minid=minid, approximate=False))
        if held_by and not await redis.xrange(
            stream, min=minid, max=f"({format_id(cutoff)}", count=1
        ):
            held_by = ""  # nothing older than the cutoff was actually kept
        out.append(Trimmed(stream, minid, removed, held_by))
    # Runs' logs: no group reads them, so the cutoff alone; only those that lost lines.
    minid = format_id(cutoff)
    async for key in redis.scan_iter(match=keys.logs_pattern, count=1000, _type="stream"):
        stream = key.decode() if isinstance(key, bytes) else str(key)
        removed = int(await redis.xtrim(stream, minid=minid, approximate=False))
        if removed:
            out.append(Trimmed(stream, minid, removed, ""))
    return out


async def run_periodic(redis: Redis, keys: Keys, *, days: float, every_s: float = EVERY_S) -> None:
    """Trim now and then every `every_s` seconds, until cancelled (the service runs it)."""
    logger = log.get("retention").bind(prefix=keys.prefix, days=days)
    while True:
        try:
            results = await trim(redis, keys, days=days)
            removed = {t.stream: t.removed for t in results if t.removed}
            held = {t.stream: t.held_by for t in results if t.held_by}
            logger.info("streams trimmed", removed=removed, held_by_pending=held)
        except RedisError as e:
            logger.warning("trim failed, will retry", error=str(e))
        await asyncio.sleep(every_s)
