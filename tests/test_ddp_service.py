"""The trainer actor runs a run on 2 processes through the elastic launcher: a rank killed
mid-run makes the group restart from the checkpoint and the run completes once, with its
events in order; a cancel ends every rank within seconds and leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors.client.submit import plan_train, submit
from actors.runtime.config import Settings
from actors.runtime.seaweed import SeaweedS3
from protocol.events import TrainCompleted, TrainProgress, TrainStarted, event_kind
from protocol.keys import ActorName, Keys
from tests.test_service import (
    actor_process,
    alive,
    events_of,
    make_settings,
    running,
    tiny,
    training_children,
    until_checkpoint,
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
        await until_checkpoint(run_dir)
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


def machine(root: Path, s3: SeaweedS3, keys: Keys) -> Settings:
    """A machine of its own: its data dir; the store (S3) and Redis are shared."""
    base = make_settings(root, keys.prefix)
    return replace(
        base,
        store_url=s3.env(prefix=keys.prefix)["MT_STORE_URL"],
        aws_endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        aws_region=s3.region,
        consumer=root.name,
    )


async def test_two_machines_train_one_run(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path, s3_server: SeaweedS3
) -> None:
    """Two trainers with data dirs of their own: the one that takes the run is node 0 and
    queues a join command, the other takes it, fetches the inputs from the store and trains
    its share; node 0 reports the run."""
    first, second = (
        machine(tmp_path / "a", s3_server, keys),
        machine(tmp_path / "b", s3_server, keys),
    )
    request = tiny(max_steps=12, nnodes=2, nproc_per_node=1, threads=1)
    async with running(first, redis_url, ACTORS):
        info = await submit(redis, keys, plan_train(request))
        await wait_for_event(redis, keys, info.run_id, "step.started", at_least=3, timeout=120)
        async with running(second, redis_url, ["trainer"]):
            await wait_for_event(redis, keys, info.run_id, "train.completed", timeout=240)
    events = await events_of(redis, keys, info.run_id)
    [started] = [e for e in events if isinstance(e, TrainStarted)]
    assert (started.world_size, started.backend) == (2, "gloo")
    state = await redis.hmget(keys.run(info.run_id), ["world_size", "backend", "threads"])
    assert state == [b"2", b"gloo", b"1"]  # what watch and the dashboard show
    [done] = [e for e in events if isinstance(e, TrainCompleted)]
    assert done.steps == 12
    lines = (second.run_dir(info.run_id) / "logs.jsonl").read_text().splitlines()
    joined = [json.loads(line) for line in lines]
    assert any(r.get("node") == "joined" for r in joined)
    assert any(r.get("event") == "this node's training processes ended" for r in joined)
    assert (second.corpus_dir(info.corpus_id) / "train.txt").is_file()  # from the store
    assert not (second.run_dir(info.run_id) / "manifest.json").exists()  # node 0 writes


async def test_a_node_killed_mid_run_restarts_the_group_on_the_node_that_takes_its_place(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path, s3_server: SeaweedS3
) -> None:
    """SIGKILL the joined node's trainer actor mid-run: its training processes die with it,
    node 0's group fails; its agent's restart waits at most the rendezvous timeout, then
    model.train is retried with a new rendezvous, whose join a third trainer takes, and the
    group starts again from the latest checkpoint. The run completes once; nothing of the
    dead node lives on."""
    timeout = {"MT_RENDEZVOUS_TIMEOUT_S": "30"}
    first = replace(machine(tmp_path / "a", s3_server, keys), rendezvous_timeout_s=30)
    second, third = (machine(tmp_path / n, s3_server, keys) for n in ("b", "c"))
    env = {**s3_server.env(prefix=keys.prefix), **timeout}
    request = tiny(max_steps=30, checkpoint_every=5, eval_every=30, nnodes=2, threads=1)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with running(first, redis_url, ACTORS):
            info = await submit(redis, keys, plan_train(request))
            # Node 0 is this service's trainer: the second machine comes once it has the run.
            await wait_for_event(redis, keys, info.run_id, "step.started", at_least=3)
            procs.append(actor_process(redis_url, second, "trainer", "b", env))
            run_dir = first.run_dir(info.run_id)
            await until_checkpoint(run_dir)
            [child] = training_children(second.run_dir(info.run_id))
            dead = [procs[0].pid, child, *descendants(child)]
            assert len(dead) >= 3, "the joined actor, its training child and its rank"
            killed = time.monotonic()
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            deadline = time.monotonic() + 5
            while any(alive(p) for p in dead):
                assert time.monotonic() < deadline, "the dead node's training lives on"
                await asyncio.sleep(0.05)
            procs.append(actor_process(redis_url, third, "trainer", "c", env))
            await wait_for_event(redis, keys, info.run_id, "train.completed", timeout=180)
            took = time.monotonic() - killed
            joined = training_children(third.run_dir(info.run_id))
            deadline = time.monotonic() + 10
            while any(map(alive, joined)):  # the run is over: the third node's processes end
                assert time.monotonic() < deadline, "the third node's training lives on"
                await asyncio.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"killed to completed: {took:.1f}s")
    events = await events_of(redis, keys, info.run_id)
    kinds = [event_kind(e) for e in events]
    assert kinds.count("train.completed") == 1
    starts = [e for e in events if isinstance(e, TrainStarted)]
    assert starts[0].resumed_from_step == 0 and starts[-1].resumed_from_step >= 5
    steps = [e.step for e in events if isinstance(e, TrainProgress)]
    assert steps[-1] == 30
    [done] = [e for e in events if isinstance(e, TrainCompleted)]
    assert done.steps == 30
    assert not any(alive(p) for p in dead)
