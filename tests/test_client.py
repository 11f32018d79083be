"""The ServiceClient against the real embedded server: what the HTTP endpoint, the CLI, the
demo and replay do to the service, each written once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import get_args

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.client import client as client_module
from actors.client.client import (
    CANCEL_TTL_S,
    Entry,
    RequestMarker,
    RunEnded,
    Samples,
    ServiceClient,
    UnknownRun,
)
from actors.runtime.connection import stream_entries
from actors.runtime.outcome import Write, add_event, answer
from protocol.codec import FIELD, decode_command, decode_event
from protocol.commands import CorpusIngest, ModelGenerate
from protocol.events import (
    TERMINAL_KINDS,
    TERMINAL_STATUSES,
    AnyEvent,
    CancelRequested,
    EvalCompleted,
    RunCompleted,
    RunFailed,
    RunQueued,
    RunStatus,
    StepStarted,
    TrainProgress,
    event_kind,
)
from protocol.keys import Keys
from protocol.requests import CorpusSource, TokenizerTrainRequest, TrainRequest


@pytest.fixture
async def client(redis_url: str, keys: Keys) -> AsyncIterator[ServiceClient]:
    c = ServiceClient.connect(redis_url, keys, block_ms=200)
    try:
        yield c
    finally:
        await c.aclose()


async def emit(redis: aioredis.Redis, keys: Keys, *events: AnyEvent) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for event in events:
            add_event(pipe, keys, event)
        await pipe.execute()


async def make_run(redis: aioredis.Redis, keys: Keys, run_id: str, *events: AnyEvent) -> None:
    """A run as submit (and the actors, for `events`) would leave it."""
    await emit(redis, keys, RunQueued(run_id=run_id, user_id=7, steps=["ingest"]), *events)
    await redis.zadd(keys.runs, {run_id: time.time()})


async def kinds(redis: aioredis.Redis, keys: Keys, run_id: str) -> list[str]:
    out = []
    for _, fields in stream_entries(await redis.xrange(keys.events)):
        event = decode_event(fields[FIELD.encode()])
        if event.run_id == run_id:
            out.append(event_kind(event))
    return out


async def commit(redis: aioredis.Redis, writes: list[Write]) -> None:
    """The writes of an evaluator's Outcome (here: the result key with its TTL)."""
    for command, key, value, ex, ttl in writes:
        assert (command, ex) == ("SET", "EX")
        await redis.set(key, value, ex=int(ttl))


def test_terminal_constants_are_the_ending_events_and_statuses() -> None:
    assert {"run.completed", "run.failed", "run.cancelled"} == TERMINAL_KINDS
    assert {"completed", "failed", "cancelled"} == TERMINAL_STATUSES
    assert set(get_args(RunStatus)) > TERMINAL_STATUSES


async def test_submit_then_list_runs_and_load_the_state(
    client: ServiceClient, redis: aioredis.Redis, keys: Keys
) -> None:
    shakespeare = CorpusSource(corpus_name="shakespeare", user_id=3)
    first = await client.train(TrainRequest(source=shakespeare))
    await asyncio.sleep(0.01)  # distinct submission times: the index orders by them
    second = await client.train_tokenizer(TokenizerTrainRequest(source=shakespeare))
    assert first.steps[0] == "ingest" and second.steps == ["ingest", "tokenizer"]

    runs = await client.runs(10)
    assert [r.run_id for r in runs] == [second.run_id, first.run_id]
    assert [r.run_id for r in await client.runs(1)] == [second.run_id]
    state = await client.run_state(first.run_id)
    assert (state.status, state.user_id, state.corpus) == ("queued", 3, "shakespeare")
    assert state.created_at > 0
    [(_, fields)] = stream_entries(await redis.xrange(keys.cmd("ingest"), count=1))
    cmd = decode_command("ingest", fields[FIELD.encode()])
    assert isinstance(cmd, CorpusIngest) and cmd.run_id == first.run_id

    assert await client.find_run("no-such-run") is None
    with pytest.raises(UnknownRun):
        await client.run_state("no-such-run")
    await redis.zadd(keys.runs, {"gone": time.time()})  # indexed, but its state is gone
    assert [r.run_id for r in await client.runs(10)] == [second.run_id, first.run_id]


async def test_cancel_of_an_unknown_or_ended_run_is_refused_and_leaves_no_flag(
    client: ServiceClient, redis: aioredis.Redis, keys: Keys
) -> None:
    with pytest.raises(UnknownRun):
        await client.cancel("no-such-run")
    assert not await redis.exists(keys.cancel("no-such-run"))

    ended: list[tuple[str, AnyEvent]] = [
        ("completed", RunCompleted(run_id="r-done")),
        ("failed", RunFailed(run_id="r-failed", step="trainer", error_kind="user", message="x")),
    ]
    for status, event in ended:
        await make_run(redis, keys, event.run_id, event)
        with pytest.raises(RunEnded) as refused:
            await client.cancel(event.run_id)
        assert refused.value.status == status
        assert not await redis.exists(keys.cancel(event.run_id))
        assert "run.cancel_requested" not in await kinds(redis, keys, event.run_id)


async def test_cancel_sets_the_flag_with_its_ttl_and_records_the_request(
    client: ServiceClient, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "r1")
    assert await client.cancel("r1") == "requested"
    assert await redis.get(keys.cancel("r1")) == b"1"
    assert 0 < await redis.ttl(keys.cancel("r1")) <= CANCEL_TTL_S
    entries, _ = await client.history("r1")
    [request] = [e.event for e in entries if isinstance(e.event, CancelRequested)]
    assert request.user_id == 7
    assert (await client.run_state("r1")).message == "cancel requested"
    assert await client.cancel("r1") == "pending"  # no second event
    assert (await kinds(redis, keys, "r1")).count("run.cancel_requested") == 1


async def test_concurrent_cancels_of_a_live_run_record_exactly_one_request(
    redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    clients = [ServiceClient.connect(redis_url, keys) for _ in range(4)]
    try:
        for i in range(10):
            run_id = f"race-{i}"
            await make_run(redis, keys, run_id)
            outcomes = await asyncio.gather(*(c.cancel(run_id) for c in clients))
            assert sorted(outcomes) == ["pending"] * 3 + ["requested"]
            assert (await kinds(redis, keys, run_id)).count("run.cancel_requested") == 1
    finally:
        for c in clients:
            await c.aclose()


async def test_queue_a_request_then_wait_for_its_result(
    client: ServiceClient, redis: aioredis.Redis, keys: Keys
) -> None:
    cmd = ModelGenerate(command_id="gen-1", run_id="r1", request_id="gen-1", prompt="To be")
    await client.queue(cmd)
    assert await client.request_marker("gen-1") == RequestMarker(what="generate", run_id="r1")
    assert await client.request_marker("gen-never-sent") is None
    [(_, fields)] = stream_entries(await redis.xrange(keys.cmd("evaluator")))
    assert decode_command("evaluator", fields[FIELD.encode()]) == cmd
    assert await client.result("gen-1") is None

    async def evaluator() -> None:
        """Write the answer as the evaluator's fenced commit does."""
        await asyncio.sleep(0.3)
        result = {"prompt": "To be", "samples": ["To be or not"]}
        await commit(redis, answer(keys, cmd, {"result": result}).writes)

    answering = asyncio.create_task(evaluator())
    got = await client.wait_result("gen-1", timeout_s=10, poll_s=0.05)
    await answering
    assert got.ok and got.what == "generate"
    assert msgspec.convert(got.result, Samples).samples == ["To be or not"]

    failed = ModelGenerate(command_id="gen-2", run_id="r1", request_id="gen-2")
    await client.queue(failed)
    body: dict[str, object] = {"ok": False, "error_kind": "user", "message": "no model"}
    await commit(redis, answer(keys, failed, body).writes)
    got = await client.wait_result("gen-2", timeout_s=1)
    assert (got.ok, got.error_kind, got.message) == (False, "user", "no model")

    with pytest.raises(TimeoutError):
        await client.wait_result("gen-never-sent", timeout_s=0.2, poll_s=0.05)


async def test_history_and_follow_yield_the_run_up_to_its_terminal_event(
    client: ServiceClient, redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = StepStarted(run_id="r1", step="ingest", command_id="r1.ingest")
    await make_run(redis, keys, "r1", started)
    await make_run(redis, keys, "other")
    await redis.xadd(keys.events, {FIELD: b"not an event"})
    entries, last = await client.history("r1")
    assert [e.kind for e in entries] == ["run.queued", "step.started"]
    assert not any(e.terminal for e in entries)

    seen: list[Entry] = []

    async def follow() -> None:
        async for batch in client.follow("r1", after=last):
            seen.extend(batch)

    following = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # at least one empty block first
    progress = TrainProgress(run_id="r1", step=1, epoch=1, total_epochs=1, loss=2.0)
    after = EvalCompleted(run_id="r1")
    await emit(redis, keys, RunCompleted(run_id="other"), progress, RunCompleted(run_id="r1"))
    await asyncio.wait_for(following, 10)
    await emit(redis, keys, after)  # after the terminal event: not followed
    assert [e.kind for e in seen] == ["train.progress", "run.completed"]
    assert seen[-1].terminal and isinstance(seen[-1].event, RunCompleted)

    # History reads everything recorded; a page boundary loses nothing.
    everything, _ = await client.history("r1")
    monkeypatch.setattr(client_module, "PAGE", 2)
    assert [e.kind for e in everything][-3:] == [
        "train.progress",
        "run.completed",
        "eval.completed",
    ]
    paged = [e async for page, _ in client.history_pages("r1", after="0-0") for e in page]
    assert [e.id for e in paged] == [e.id for e in everything]
    with pytest.raises(UnknownRun):
        await client.history("no-such-run")


async def test_follow_ends_when_the_state_says_the_run_ended_without_its_event(
    client: ServiceClient, redis: aioredis.Redis, keys: Keys
) -> None:
    """The terminal event may have been trimmed away: the state still ends the follow."""
    await make_run(redis, keys, "r1")
    _, last = await client.history("r1")
    following = asyncio.create_task(_drain(client.follow("r1", after=last)))
    await asyncio.sleep(0.3)
    assert not following.done()
    await redis.hset(keys.run("r1"), "status", "cancelled")
    assert await asyncio.wait_for(following, 10) == []


async def _drain(batches: AsyncIterator[list[Entry]]) -> list[Entry]:
    return [e async for batch in batches for e in batch]
