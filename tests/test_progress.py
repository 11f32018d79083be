"""The trainer reports each new checkpoint as progress, so the poison limit counts only the
deliveries that made none: a run whose trainer dies after new checkpoints again and again
is resumed, not dead-lettered (real training on a tiny config, a real actor process)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors.client.submit import plan_train, submit
from actors.runtime.connection import read_entries
from actors.runtime.streams import RuntimeConfig
from protocol.events import RunFailed, TrainProgress, TrainStarted
from protocol.keys import ActorName, Keys
from tests.test_service import (
    actor_process,
    events_of,
    make_settings,
    running,
    tiny,
    wait_for_end,
)

pytestmark = pytest.mark.timeout(300)
LIMIT = RuntimeConfig().max_deliveries


async def past_step(redis: aioredis.Redis, keys: Keys, run_id: str, step: int) -> bool:
    events = await events_of(redis, keys, run_id)
    return any(isinstance(e, TrainProgress) and e.step > step for e in events)


async def test_a_trainer_that_dies_after_a_new_checkpoint_is_resumed_past_the_limit(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, keys.prefix)
    others: list[ActorName] = ["ingest", "tokenizer", "evaluator", "uploader"]
    stream = keys.cmd("trainer")
    procs = []
    try:
        async with running(settings, redis_url, others):
            info = await submit(redis, keys, plan_train(tiny(max_steps=60, checkpoint_every=5)))
            deadline = time.monotonic() + 120
            while not await redis.xlen(stream):
                assert time.monotonic() < deadline, "the train command was never queued"
                await asyncio.sleep(0.1)
            # Its earlier lives: LIMIT - 1 trainers took it and died without progress.
            with contextlib.suppress(ResponseError):  # BUSYGROUP
                await redis.xgroup_create(stream, "trainer", id="0")
            reply = await redis.xreadgroup("trainer", "dying-1", {stream: ">"}, count=1)
            [(entry_id, _)] = read_entries(reply)
            for n in range(2, LIMIT):
                await redis.xclaim(stream, "trainer", f"dying-{n}", 0, [entry_id], idle=60_000)

            # The last delivery allowed without progress writes a checkpoint, and dies (once
            # a step after the checkpoint was reported: the trainer has seen it on disk).
            procs.append(actor_process(redis_url, settings, "trainer", "t"))
            deadline = time.monotonic() + 120
            while not await past_step(redis, keys, info.run_id, 5):
                assert time.monotonic() < deadline, "training never got past step 5"
                await asyncio.sleep(0.02)
            procs[0].kill()
            procs[0].wait()
            # Restarted: one delivery past the limit, but the first since progress.
            procs.append(actor_process(redis_url, settings, "trainer", "t"))
            assert await wait_for_end(redis, keys, info.run_id, timeout=240) == "completed"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = await redis.xpending_range(stream, "trainer", min="-", max="+", count=10)
    assert rows == []
    events = await events_of(redis, keys, info.run_id)
    starts = [e for e in events if isinstance(e, TrainStarted)]
    assert len(starts) == 2 and starts[1].resumed_from_step >= 5
    assert not [e for e in events if isinstance(e, RunFailed)]
    assert await redis.xlen(keys.dead) == 0
