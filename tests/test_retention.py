"""Retention trims by age and never an entry a consumer group still needs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors.cli import main as cli
from actors.runtime import retention
from actors.runtime.connection import read_entries, stream_entries
from protocol.keys import Keys
from trainer.errors import UserError

DAY_MS = 86_400_000


def old_id(days_ago: float, seq: int) -> str:
    return f"{int(time.time() * 1000 - days_ago * DAY_MS)}-{seq}"


async def ids(redis: aioredis.Redis, stream: str) -> list[str]:
    return [i for i, _ in stream_entries(await redis.xrange(stream))]


async def test_old_entries_go_but_pending_and_undelivered_ones_stay(
    redis: aioredis.Redis, keys: Keys
) -> None:
    events = keys.events
    old = [old_id(30, seq) for seq in range(1, 5)]  # four entries 30 days old
    for entry_id in old:
        await redis.xadd(events, {"data": b"{}"}, id=entry_id)
    await redis.xadd(events, {"data": b"{}"})  # a fresh one
    await redis.xgroup_create(events, "notifier", id="0")
    delivered = read_entries(await redis.xreadgroup("notifier", "n-0", {events: ">"}, count=2))
    assert [i for i, _ in delivered] == old[:2]
    await redis.xack(events, "notifier", old[0])  # old[1] stays pending

    [trimmed, *_] = await retention.trim(redis, keys, days=14)
    assert (trimmed.stream, trimmed.removed, trimmed.held_by) == (events, 1, "notifier")
    remaining = await ids(redis, events)
    assert remaining[:3] == old[1:] and len(remaining) == 4

    # Once everything is delivered and acknowledged, old entries go; the fresh one stays.
    batch = read_entries(await redis.xreadgroup("notifier", "n-0", {events: ">"}))
    await redis.xack(events, "notifier", *[i for i, _ in batch], old[1])
    [trimmed, *_] = await retention.trim(redis, keys, days=14)
    assert (trimmed.removed, trimmed.held_by) == (3, "")
    assert len(await ids(redis, events)) == 1


async def test_a_group_that_never_read_keeps_everything(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.cmd("trainer")
    await redis.xadd(stream, {"data": b"{}"}, id=old_id(20, 1))
    await redis.xgroup_create(stream, "trainer", id="0")
    results = {t.stream: t for t in await retention.trim(redis, keys, days=1)}
    assert results[stream].removed == 0 and results[stream].held_by == "trainer"
    assert await redis.xlen(stream) == 1


async def test_streams_without_groups_are_trimmed_by_age_only(
    redis: aioredis.Redis, keys: Keys
) -> None:
    stream = keys.cmd("uploader")
    await redis.xadd(stream, {"data": b"{}"}, id=old_id(3, 1))
    await redis.xadd(stream, {"data": b"{}"}, id=old_id(1, 1))
    await redis.xgroup_create(keys.cmd("ingest"), "ingest", id="0", mkstream=True)
    results = {t.stream: t for t in await retention.trim(redis, keys, days=2)}
    assert results[stream].removed == 1
    assert results[keys.cmd("ingest")] == retention.Trimmed(keys.cmd("ingest"), "0-1", 0, "")
    assert results[keys.cmd("evaluator")].removed == 0  # absent streams are fine
    assert await redis.xlen(stream) == 1


async def test_trim_command_and_retention_days(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MT_PREFIX", keys.prefix)
    monkeypatch.setenv("MT_DATA_DIR", str(data_dir))
    await redis.xadd(keys.events, {"data": b"{}"}, id=old_id(10, 1))
    monkeypatch.setenv("MT_RETENTION_DAYS", "30")
    assert await cli.run(["trim"]) == 0
    assert f"{keys.events}: removed 0 entries older than 30 days" in capsys.readouterr().out
    assert await cli.run(["trim", "--days", "7"]) == 0
    assert f"{keys.events}: removed 1 entries older than 7 days" in capsys.readouterr().out
    monkeypatch.setenv("MT_RETENTION_DAYS", "soon")
    assert await cli.run(["trim"]) == 2
    assert "MT_RETENTION_DAYS must be a number of days" in capsys.readouterr().err
    assert retention.retention_days({}) == 14.0
    with pytest.raises(UserError, match="positive"):
        retention.retention_days({"MT_RETENTION_DAYS": "0"})
