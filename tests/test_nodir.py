"""A run's log lives in Redis (actors.runtime.runlog): what a runtime's handlers log for a
run reaches the run's capped stream, from the event loop and from threads, all of it by the
time the runtime has stopped; an outage of Redis never blocks the actor, the backlog is
bounded and what was dropped is counted, logged and noted in the run's log; retention trims
and expires it. Real servers; the end-to-end check (a control endpoint with an empty data
dir of its own serving a real run) is in test_service.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
import structlog

from actors.runtime import log, retention
from actors.runtime.connection import connect, stream_entries
from actors.runtime.embedded import EmbeddedRedis
from actors.runtime.outcome import Outcome
from actors.runtime.runlog import RunLog
from actors.runtime.streams import Actor, Context, Runtime, RuntimeConfig
from protocol.codec import FIELD, encode
from protocol.commands import Base, CorpusIngest
from protocol.events import CorpusReady
from protocol.keys import Keys

CONFIG = RuntimeConfig(lease_s=2.0, block_ms=100, grace_s=5.0)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def log_lines(redis: aioredis.Redis, key: str) -> list[dict[str, object]]:
    entries = stream_entries(await redis.xrange(key))
    return [json.loads(fields[FIELD.encode()]) for _, fields in entries]


class Talker(Actor):
    """Logs from the event loop, from a thread and through a plain logger, then finishes."""

    name = "ingest"

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        assert isinstance(cmd, CorpusIngest)
        for n in range(3):
            ctx.log.info("in the loop", n=n)
        await asyncio.to_thread(lambda: ctx.log.info("from a thread", path=Path("/x")))
        log.get("elsewhere").info("through the context")  # run_id bound by the runtime
        return Outcome(events=[CorpusReady(corpus_id=cmd.corpus_id)])


async def test_a_runs_lines_are_in_its_stream_once_the_runtime_stops(
    redis: aioredis.Redis, redis_url: str, keys: Keys
) -> None:
    log.configure(json_logs=True)  # the processor that feeds run logs (idempotent)
    for run_id in ("r1", "r2"):
        cmd = CorpusIngest(command_id=f"{run_id}.ingest", run_id=run_id, corpus_id=run_id)
        await redis.xadd(keys.cmd("ingest"), {FIELD: encode(cmd)})
    rt_redis = connect(redis_url)
    try:
        rt = Runtime(Talker(), rt_redis, keys=keys, consumer="talker-0", config=CONFIG)
        await rt.run(until_idle=True)
    finally:
        await rt_redis.aclose()
    # No waiting: stopping wrote every queued line, the last commit's own line included.
    for run_id in ("r1", "r2"):
        lines = await log_lines(redis, keys.logs(run_id))
        events = [line["event"] for line in lines]
        assert events[-1] == "events", events  # logged after the last commit
        assert [e for e in events if e != "events"] == [
            "handling",
            "in the loop",
            "in the loop",
            "in the loop",
            "from a thread",
            "through the context",
        ]
        assert all(line["run_id"] == run_id and "timestamp" in line for line in lines)
        thread_line = next(line for line in lines if line["event"] == "from a thread")
        assert thread_line["path"] == "/x"
        ttl = await redis.ttl(keys.logs(run_id))
        assert retention.retention_s() - 60 < ttl <= retention.retention_s()
    assert rt.run_log.queued == 0


async def test_an_outage_never_blocks_and_the_dropped_lines_are_counted(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "outage")
    server.start()
    keys = Keys("outage")
    redis = connect(server.url)
    sink = RunLog(redis, keys, ttl_s=3600, backlog_bytes=2_000)
    flusher = asyncio.create_task(sink.run())
    client = connect(server.url)
    line = msgspec.json.encode({"event": "step", "level": "info", "pad": "x" * 80})
    try:
        for _ in range(3):
            sink.put("r1", line)

        async def written(n: int) -> bool:
            return int(await client.xlen(keys.logs("r1"))) == n

        await eventually(lambda: written(3), "the first lines")
        await client.aclose()
        with structlog.testing.capture_logs() as captured:
            server.kill()
            for _ in range(100):  # ~9 KB into a 2 KB backlog, while Redis is down
                sink.put("r1", line)
            sink.put("r2", line)
            assert not flusher.done()

            async def down() -> bool:
                return any(e["event"].startswith("run logs: redis unreachable") for e in captured)

            await eventually(down, "the flusher to notice the outage")
            kept = sink.queued
            dropped = sink.dropped
            assert kept + dropped == 101 and dropped > 0 and kept * len(line) <= 2_000
            server.start()  # same port and data
            client = connect(server.url)
            await eventually(lambda: written(3 + 1 + kept - 1), "the backlog after the outage")
        reported = [e for e in captured if e["event"].startswith("run log lines were dropped")]
        assert [(e["dropped"], e["runs"]) for e in reported] == [(dropped, ["r1"])]
        lines = await log_lines(client, keys.logs("r1"))
        assert lines[3]["event"] == "log lines dropped while redis was unreachable"
        assert lines[3]["dropped"] == dropped and lines[3]["level"] == "warning"
        assert len(await log_lines(client, keys.logs("r2"))) == 1
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await client.aclose()
        await redis.aclose()
        server.stop()


async def test_a_stop_with_redis_down_gives_up_in_bounded_time(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "down")
    server.start()
    redis = connect(server.url)
    sink = RunLog(redis, Keys("down"), ttl_s=3600)
    server.kill()
    sink.put("r1", b'{"event": "lost"}')
    try:
        with structlog.testing.capture_logs() as captured:
            await sink.drain(timeout_s=1.0)
        lost = [e for e in captured if e["event"].startswith("run log lines not written")]
        assert [e["lost"] for e in lost] == [1] and sink.queued == 0
    finally:
        await redis.aclose()
        server.stop()


async def test_the_stream_is_capped(redis: aioredis.Redis, keys: Keys) -> None:
    sink = RunLog(redis, keys, ttl_s=3600, maxlen=100)
    for n in range(1_000):
        sink.put("r1", msgspec.json.encode({"event": "line", "n": n}))
    await sink.drain()
    length = int(await redis.xlen(keys.logs("r1")))
    assert 100 <= length < 1_000  # MAXLEN ~: whole radix nodes go
    newest = stream_entries(await redis.xrevrange(keys.logs("r1"), count=1))
    assert json.loads(newest[0][1][FIELD.encode()])["n"] == 999


async def test_retention_trims_old_log_lines_and_lists_only_streams_it_trimmed(
    redis: aioredis.Redis, keys: Keys
) -> None:
    old = f"{int((time.time() - 30 * 86400) * 1000)}-1"
    await redis.xadd(keys.logs("old"), {FIELD: b'{"event": "old"}'}, id=old)
    await redis.xadd(keys.logs("old"), {FIELD: b'{"event": "new"}'})
    await redis.xadd(keys.logs("fresh"), {FIELD: b'{"event": "new"}'})
    trimmed = {t.stream: t.removed for t in await retention.trim(redis, keys, days=14)}
    assert trimmed[keys.logs("old")] == 1 and keys.logs("fresh") not in trimmed
    assert [line["event"] for line in await log_lines(redis, keys.logs("old"))] == ["new"]
