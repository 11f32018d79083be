"""The evaluator actor under the runtime, against a real server: a chat turn's history is
written in the fenced commit, with the answer and the ack."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime.config import Settings
from actors.runtime.streams import Context, Runtime, RuntimeConfig
from actors.workers.evaluator import EvaluatorActor, Turn
from protocol.codec import FIELD, encode
from protocol.commands import ModelChat
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

    async def run_dir(self, run_id: str, ctx: Context) -> Path:
        await ctx.redis.incr(ctx.keys.attempt(ctx.cmd.command_id))
        return await super().run_dir(run_id, ctx)


def chat(command_id: str, message: str) -> ModelChat:
    return ModelChat(
        command_id=command_id,
        run_id="run-chat",
        request_id=f"q-{command_id}",
        session_id="s1",
        message=message,
        max_new_tokens=4,
        seed=1,
    )


async def handle(redis: aioredis.Redis, keys: Keys, actor: EvaluatorActor, cmd: ModelChat) -> None:
    await redis.xadd(keys.cmd("evaluator"), {FIELD: encode(cmd)})
    rt = Runtime(actor, redis, keys=keys, consumer="e-0", config=CONFIG)
    await rt.run(until_idle=True)


async def history(redis: aioredis.Redis, keys: Keys) -> list[Turn]:
    raw = await redis.get(keys.chat("s1"))
    return msgspec.json.decode(raw, type=list[Turn]) if raw else []


async def test_a_fenced_out_chat_turn_leaves_the_history_unchanged(
    redis: aioredis.Redis, keys: Keys, data_root: Path
) -> None:
    settings = Settings(data_dir=data_root)
    await handle(redis, keys, EvaluatorActor(settings), chat("c1", "Hello"))
    first = await history(redis, keys)
    assert [t.role for t in first] == ["user", "assistant"]
    assert first[0].content == "Hello"
    assert await redis.exists(keys.result("q-c1"))
    ttl = await redis.ttl(keys.chat("s1"))
    assert 0 < ttl <= 24 * 3600

    await handle(redis, keys, TakenOverEvaluator(settings), chat("c2", "Again"))
    assert await history(redis, keys) == first  # the fenced-out turn was not appended
    assert not await redis.exists(keys.result("q-c2"))
    assert not await redis.exists(keys.done("c2"))
