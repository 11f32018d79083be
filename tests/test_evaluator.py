"""The evaluator actor under the runtime, against a real server: a chat turn's history is
written in the fenced commit, with the answer and the ack; concurrent turns are all kept;
a session keeps its newest turns; interactive requests never hold up a run's evaluation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime.config import Settings
from actors.runtime.connection import stream_entries
from actors.runtime.outcome import Outcome
from actors.runtime.streams import Context, Runtime, RuntimeConfig
from actors.workers.evaluator import EvaluatorActor, Turn
from protocol.codec import FIELD, decode_event, encode
from protocol.commands import ModelChat, ModelEvaluate
from protocol.events import EvalCompleted, ResultReady, StepStarted
from protocol.keys import Keys
from tests.helpers_ml import char_tokenizer, small_corpus, tiny_config
from trainer.train import train

CONFIG = RuntimeConfig(lease_s=30.0, block_ms=100, backoff_s=0.05, grace_s=5.0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with one run that has a (barely) trained model."""
    root = tmp_path_factory.mktemp("evaluator")
    corpus = small_corpus(root / "corpus")
    tok = char_tokenizer(corpus, root / "tok")
    settings = Settings(data_dir=root / "data")
    cfg = tiny_config("char_lstm", max_steps=2, eval_every=2, checkpoint_every=2)
    train(cfg, corpus, tok, settings.run_dir("run-chat"))
    return root / "data"


class TakenOverEvaluator(EvaluatorActor):
    """Another consumer takes each command over (bumps its attempt, as XAUTOCLAIM + INCR
    does) while this one is handling it."""

    @contextlib.asynccontextmanager
    async def run_dir(self, run_id: str, ctx: Context) -> AsyncIterator[Path]:
        await ctx.redis.incr(ctx.keys.attempt(ctx.cmd.command_id))
        async with super().run_dir(run_id, ctx) as run_dir:
            yield run_dir


def chat(command_id: str, message: str, max_new_tokens: int = 4) -> ModelChat:
    return ModelChat(
        command_id=command_id,
        run_id="run-chat",
        request_id=f"q-{command_id}",
        session_id="s1",
        message=message,
        max_new_tokens=max_new_tokens,
        seed=1,
    )


async def handle(
    redis: aioredis.Redis, keys: Keys, actor: EvaluatorActor, *cmds: ModelChat
) -> None:
    for cmd in cmds:
        await redis.xadd(keys.cmd("evaluator"), {FIELD: encode(cmd)})
    rt = Runtime(actor, redis, keys=keys, consumer="e-0", config=CONFIG)
    await rt.run(until_idle=True)


async def history(redis: aioredis.Redis, keys: Keys) -> list[Turn]:
    return [msgspec.json.decode(r, type=Turn) for r in await redis.lrange(chat_key(keys), 0, -1)]


def chat_key(keys: Keys) -> str:
    return keys.chat("run-chat", "s1")


class _Reply(msgspec.Struct):
    history: list[Turn]


class _Result(msgspec.Struct):
    result: _Reply


async def test_a_fenced_out_chat_turn_leaves_the_history_unchanged(
    redis: aioredis.Redis, keys: Keys, data_root: Path
) -> None:
    settings = Settings(data_dir=data_root)
    await handle(redis, keys, EvaluatorActor(settings), chat("c1", "Hello"))
    first = await history(redis, keys)
    assert [t.role for t in first] == ["user", "assistant"]
    assert first[0].content == "Hello"
    assert await redis.exists(keys.result("q-c1"))
    ttl = await redis.ttl(chat_key(keys))
    assert 0 < ttl <= 24 * 3600

    await handle(redis, keys, TakenOverEvaluator(settings), chat("c2", "Again"))
    assert await history(redis, keys) == first  # the fenced-out turn was not appended
    assert not await redis.exists(keys.result("q-c2"))
    assert not await redis.exists(keys.done("c2"))


async def test_concurrent_turns_of_a_session_are_all_kept(
    redis: aioredis.Redis, keys: Keys, data_root: Path
) -> None:
    actor = EvaluatorActor(Settings(data_dir=data_root))
    await handle(redis, keys, actor, *(chat(f"c{i}", f"turn {i}") for i in range(5)))
    turns = await history(redis, keys)
    assert len(turns) == 10
    assert [t.role for t in turns] == ["user", "assistant"] * 5
    assert sorted(t.content for t in turns[::2]) == [f"turn {i}" for i in range(5)]
    assert all([await redis.exists(keys.result(f"q-c{i}")) for i in range(5)])


async def test_a_session_keeps_its_newest_turns(
    redis: aioredis.Redis, keys: Keys, data_root: Path
) -> None:
    actor = EvaluatorActor(Settings(data_dir=data_root))
    actor.chat_max_turns = 2
    actor.request_slots = 1  # one at a time
    await handle(redis, keys, actor, *(chat(f"k{i}", f"turn {i}") for i in range(3)))
    done = [
        e.request_id
        for _, fields in stream_entries(await redis.xrange(keys.events))
        if isinstance(e := decode_event(fields[FIELD.encode()]), ResultReady)
    ]
    assert len(done) == 3
    turns = await history(redis, keys)
    assert [t.role for t in turns] == ["user", "assistant"] * 2
    # The first turn committed was dropped; the other two are kept in commit order.
    assert [t.content for t in turns[::2]] == [f"turn {r[-1]}" for r in done[1:]]
    last = msgspec.json.decode(await redis.get(keys.result(done[-1])) or b"", type=_Result)
    assert last.result.history == turns
    assert 0 < await redis.ttl(chat_key(keys)) <= 24 * 3600


def wait_for_file(path: str, limit_s: float) -> None:
    """A pool job that holds its child until the file exists (at most limit_s)."""
    deadline = time.monotonic() + limit_s
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class SlowChatEvaluator(EvaluatorActor):
    """Chats that hold their pool child (as a 2,048-token chat does) until released."""

    def __init__(self, settings: Settings, release: Path) -> None:
        super().__init__(settings)
        self.release = release

    async def chat(self, cmd: ModelChat, run_dir: Path, ctx: Context) -> Outcome:
        await self.pool_for(cmd).run(wait_for_file, str(self.release), 120.0)
        return await super().chat(cmd, run_dir, ctx)


async def test_a_runs_evaluation_does_not_wait_behind_chats(
    redis: aioredis.Redis, keys: Keys, data_root: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    actor = SlowChatEvaluator(Settings(data_dir=data_root), release)
    for i in range(3):  # more chats than the evaluator has slots
        await redis.xadd(keys.cmd("evaluator"), {FIELD: encode(chat(f"h{i}", "hi"))})
    step = ModelEvaluate(command_id="ev-1", run_id="run-chat")
    await redis.xadd(keys.cmd("evaluator"), {FIELD: encode(step)})
    rt = Runtime(actor, redis, keys=keys, consumer="e-0", config=CONFIG)
    running = asyncio.create_task(rt.run())
    try:
        started = evaluated = 0.0
        t0 = time.monotonic()
        while not evaluated and time.monotonic() - t0 < 60:
            for _, fields in stream_entries(await redis.xrange(keys.events)):
                event = decode_event(fields[FIELD.encode()])
                if isinstance(event, StepStarted) and not started:
                    started = time.monotonic() - t0
                if isinstance(event, EvalCompleted) and not event.request_id:
                    evaluated = time.monotonic() - t0
            await asyncio.sleep(0.1)
        assert not release.exists()  # every chat still holds its slot and its child
        assert 0 < started < 5, "the evaluation step did not start promptly"
        assert evaluated, "the evaluation step did not finish while chats held the evaluator"
        release.touch()
        t1 = time.monotonic()
        while not all([await redis.exists(keys.result(f"q-h{i}")) for i in range(3)]):
            assert time.monotonic() - t1 < 60, "the chats did not finish once released"
            await asyncio.sleep(0.1)
    finally:
        release.touch()
        rt.stop()
        await running
