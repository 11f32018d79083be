"""GET /runs/{id}/curves: a run's training curves read by the server from its recorded events
(written by the runtime's add_event into the real server), served by the real app on
loopback; `after` gives only newer points."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from actors.runtime.config import Settings
from actors.runtime.outcome import add_event
from actors.web.app import bound_url, create_app
from actors.web.curves import Curves
from protocol.events import AnyEvent, RunQueued, StepStarted, TrainProgress, TrainStarted
from protocol.keys import Keys


@pytest.fixture
async def client(
    redis_url: str, keys: Keys, data_dir: Path
) -> AsyncIterator[aiohttp.ClientSession]:
    settings = Settings(data_dir=data_dir, corpus_root=data_dir, prefix=keys.prefix)
    runner = web.AppRunner(create_app(settings, redis_url), shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession(base_url=bound_url(runner)) as session:
            yield session
    finally:
        await runner.cleanup()


async def record(redis: aioredis.Redis, keys: Keys, events: list[AnyEvent]) -> None:
    for event in events:
        async with redis.pipeline(transaction=True) as pipe:
            add_event(pipe, keys, event)
            await pipe.execute()


def progress(
    run_id: str,
    step: int,
    loss: float,
    *,
    lr: float = 0.0,
    tokens_per_s: float = 0.0,
    val_loss: float | None = None,
) -> TrainProgress:
    return TrainProgress(
        run_id=run_id,
        step=step,
        epoch=1,
        total_epochs=1,
        total_steps=30,
        loss=loss,
        lr=lr,
        tokens_per_s=tokens_per_s,
        val_loss=val_loss,
    )


def entry(stream_id: str) -> tuple[int, int]:
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


async def curves(client: aiohttp.ClientSession, path: str) -> Curves:
    async with client.get(path) as resp:
        assert resp.status == 200, await resp.text()
        return msgspec.json.decode(await resp.read(), type=Curves)


async def test_the_curves_of_a_run_from_its_events(
    client: aiohttp.ClientSession, redis: aioredis.Redis, keys: Keys
) -> None:
    await record(
        redis,
        keys,
        [
            RunQueued(run_id="r1", steps=["trainer"]),
            RunQueued(run_id="other", steps=["trainer"]),
            StepStarted(run_id="r1", step="trainer", command_id="c1"),
            TrainStarted(run_id="r1", model_family="gpt2", model_size="tiny", total_epochs=1),
            progress("r1", 1, 4.0, lr=1e-4, tokens_per_s=100.0),
            progress("other", 1, 9.0, lr=1.0, tokens_per_s=9.0, val_loss=9.0),
            progress("r1", 10, 3.0, lr=1e-3, tokens_per_s=110.0, val_loss=3.5),
            progress("r1", 20, 2.5, lr=5e-4, tokens_per_s=120.0),
            # The trainer died after its checkpoint at step 10 and resumed from there.
            StepStarted(run_id="r1", step="trainer", command_id="c1", attempt=2),
            TrainStarted(
                run_id="r1",
                model_family="gpt2",
                model_size="tiny",
                total_epochs=1,
                resumed_from_step=10,
            ),
            progress("r1", 20, 2.4, tokens_per_s=130.0, val_loss=2.9),  # no lr reported
        ],
    )
    got = await curves(client, "/runs/r1/curves")
    assert got.run_id == "r1"
    assert got.train_loss == [(1, 4.0), (10, 3.0), (20, 2.4)]  # the resumed value wins
    assert got.val_loss == [(10, 3.5), (20, 2.9)]
    assert got.lr == [(1, 1e-4), (10, 1e-3), (20, 5e-4)]
    assert got.tokens_per_s == [(1, 100.0), (10, 110.0), (20, 130.0)]
    assert got.last

    # Only what came after the last read, and the same `last` when nothing did.
    await record(redis, keys, [progress("r1", 30, 2.0, val_loss=2.6), progress("other", 2, 8.0)])
    newer = await curves(client, f"/runs/r1/curves?after={got.last}")
    assert (newer.train_loss, newer.val_loss, newer.lr) == ([(30, 2.0)], [(30, 2.6)], [])
    assert entry(newer.last) > entry(got.last)
    again = await curves(client, f"/runs/r1/curves?after={newer.last}")
    assert (again.train_loss, again.last) == ([], newer.last)


async def test_a_run_without_training_has_empty_curves_and_an_unknown_one_is_404(
    client: aiohttp.ClientSession, redis: aioredis.Redis, keys: Keys
) -> None:
    await record(redis, keys, [RunQueued(run_id="r2", steps=["ingest"])])
    got = await curves(client, "/runs/r2/curves?after=not-an-id")  # ignored, like Last-Event-ID
    assert (got.train_loss, got.val_loss, got.lr, got.tokens_per_s) == ([], [], [], [])
    async with client.get("/runs/nope/curves") as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == "NOT_FOUND"


async def test_the_curves_route_is_documented(client: aiohttp.ClientSession) -> None:
    async with client.get("/openapi.json") as resp:
        doc = await resp.json()
    op = doc["paths"]["/runs/{id}/curves"]["get"]
    assert [p["name"] for p in op["parameters"] if p["in"] == "query"] == ["after"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/Curves")
    props = doc["components"]["schemas"]["Curves"]["properties"]
    assert {"train_loss", "val_loss", "lr", "tokens_per_s", "last"} <= set(props)
