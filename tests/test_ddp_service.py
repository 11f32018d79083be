"""The trainer actor runs a run on 2 processes through the elastic launcher: a rank killed
mid-run makes the group restart from the checkpoint and the run completes once, with its
events in order; a cancel ends every rank within seconds and leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors.client.submit import plan_train, submit
from protocol.events import TrainCompleted, TrainProgress, TrainStarted, event_kind
from protocol.keys import ActorName, Keys
from tests.test_service import (
    alive,
    events_of,
    make_settings,
    running,
    tiny,
    training_children,
    wait_for_end,
    wait_for_event,
)

pytestmark = pytest.mark.timeout(600)
ACTORS: list[ActorName] = ["ingest", "tokenizer", "trainer"]


def descendants(pid: int) -> list[int]:
    """Every living process below pid."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if alive(c):
                out.append(c)
                todo.append(c)
    return out


def ranks(agent: int) -> list[int]:
    """The training processes of an elastic agent: its children, but for multiprocessing's
    resource tracker."""
    return [
        pid
        for pid in descendants(agent)
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(agent)
        and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


async def test_a_killed_rank_restarts_the_group_and_a_cancel_stops_every_rank(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, keys.prefix)
    ddp = {"nproc_per_node": 2, "threads": 2, "max_restarts": 1}
    async with running(settings, redis_url, ACTORS):
        info = await submit(redis, keys, plan_train(tiny(max_steps=40, **ddp)))
        run_dir = settings.run_dir(info.run_id)
        deadline = time.monotonic() + 180
        while not list((run_dir / "checkpoints").glob("step-*")):
            assert time.monotonic() < deadline, "no checkpoint was written"
            await asyncio.sleep(0.2)
        [agent] = training_children(run_dir)
        group = ranks(agent)
        assert len(group) == 2, "2 training processes below the training child"
        victim = group[-1]
        os.kill(victim, signal.SIGKILL)
        await wait_for_event(redis, keys, info.run_id, "train.completed", timeout=240)

        # Asked for, precision and compile are not measured first (a long run would).
        endless = tiny(max_steps=100_000, precision="fp32", compile="off", **ddp)
        cancelled = await submit(redis, keys, plan_train(endless))
        await wait_for_event(redis, keys, cancelled.run_id, "train.progress", timeout=240)
        [agent2] = training_children(settings.run_dir(cancelled.run_id))
        assert len(ranks(agent2)) == 2
        group = descendants(agent2)
        asked = time.monotonic()
        await redis.set(keys.cancel(cancelled.run_id), "1")
        assert await wait_for_end(redis, keys, cancelled.run_id, timeout=60) == "cancelled"
        assert time.monotonic() - asked < 15
        deadline = time.monotonic() + 10
        while any(alive(p) for p in [agent2, *group]):
            assert time.monotonic() < deadline, "a training process outlived the cancel"
            await asyncio.sleep(0.1)

    events = await events_of(redis, keys, info.run_id)
    kinds = [event_kind(e) for e in events]
    assert kinds.count("train.started") == 1 and kinds.count("train.completed") == 1
    [started] = [e for e in events if isinstance(e, TrainStarted)]
    assert (started.world_size, started.backend, started.threads) == (2, "gloo", 1)
    steps = [e.step for e in events if isinstance(e, TrainProgress)]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step reported twice
    [done] = [e for e in events if isinstance(e, TrainCompleted)]
    assert done.steps == 40
    log = (run_dir / "logs.jsonl").read_text()
    assert "training processes restarted from the checkpoint" in log
    assert not alive(victim)
