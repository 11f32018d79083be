"""Replay: recorded commands re-driven into a fresh prefix, processed again by a separate
set of actors (tiny fakes here) while the original keys stay exactly as they were."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors import service
from actors.cli import main as cli
from actors.client import replay
from actors.client.submit import plan_tokenizer, submit
from actors.runtime.config import Settings
from actors.runtime.connection import stream_entries
from actors.runtime.outcome import Outcome
from actors.runtime.streams import Actor, Context, Runtime, RuntimeConfig
from protocol.codec import FIELD, decode_event
from protocol.commands import Base, CorpusIngest, TokenizerTrain
from protocol.events import CorpusReady, TokenizerReady
from protocol.keys import ActorName, Keys
from protocol.requests import CorpusSource, TokenizerTrainRequest


class FakeIngest(Actor):
    name = "ingest"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        assert isinstance(cmd, CorpusIngest)
        out = self.settings.corpus_dir(cmd.corpus_id)
        out.mkdir(parents=True)  # fails on a second run in the same data dir
        (out / "train.txt").write_text("hello")
        return Outcome(events=[CorpusReady(corpus_id=cmd.corpus_id, chars={"train": 5})])


class FakeTokenizer(Actor):
    name = "tokenizer"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        assert isinstance(cmd, TokenizerTrain)
        assert (self.settings.corpus_dir(cmd.corpus_id) / "train.txt").exists()
        return Outcome(events=[TokenizerReady(tokenizer_id=cmd.tokenizer_id, stats={"v": 1.0})])


FAKES: dict[ActorName, Callable[[Settings], Actor]] = {
    "ingest": FakeIngest,
    "tokenizer": FakeTokenizer,
}
FAST = RuntimeConfig(block_ms=50, backoff_s=0.01)


@pytest.fixture
def settings(data_dir: Path, keys: Keys, redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url, data_dir=data_dir, corpus_root=data_dir / "corpus", prefix=keys.prefix
    )


async def recorded_run(redis: aioredis.Redis, keys: Keys, settings: Settings) -> str:
    """A tokenizer job submitted and carried out by the fake actors in the original prefix."""
    info = await submit(
        redis, keys, plan_tokenizer(TokenizerTrainRequest(source=CorpusSource(corpus_name="x")))
    )
    for actor in (FakeIngest(settings), FakeTokenizer(settings)):
        await Runtime(actor, redis, keys=keys, consumer="orig", config=FAST).run(until_idle=True)
    return info.run_id


async def snapshot(redis: aioredis.Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key of the prefix, serialized (liveness keys expire on their own: left out)."""
    out: dict[bytes, bytes] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        dumped = await redis.dump(key)
        if b":alive:" not in key and dumped is not None:
            out[key] = dumped
    return out


async def command_kinds(redis: aioredis.Redis, keys: Keys, run_id: str) -> list[str]:
    return [r.kind for r in await replay.run_commands(redis, keys, run_id)]


async def event_kinds(redis: aioredis.Redis, keys: Keys) -> list[str]:
    return [
        str(decode_event(f[FIELD.encode()]).__struct_config__.tag)
        for _, f in stream_entries(await redis.xrange(keys.events))
    ]


async def test_replay_of_a_run_reproduces_it_and_leaves_the_original_untouched(
    redis: aioredis.Redis, keys: Keys, settings: Settings, redis_url: str
) -> None:
    run_id = await recorded_run(redis, keys, settings)
    original_files = sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*"))
    before = await snapshot(redis, keys.prefix)
    recorded = await replay.run_commands(redis, keys, run_id)
    assert [r.kind for r in recorded] == ["corpus.ingest", "tokenizer.train"]

    target = replay.replay_settings(settings, f"{keys.prefix}-replay-a")
    done = await replay.redrive(
        redis, keys, replay.select_for_run(recorded, all_commands=False), target, run_id=run_id
    )
    assert [e.kind for e, _ in done.entries] == ["corpus.ingest"]  # the chain does the rest
    steps = await replay.drain(redis_url, target, actors=FAKES, config=FAST)
    assert [(s.actor, s.kind) for s in steps] == [
        ("ingest", "corpus.ingest"),
        ("tokenizer", "tokenizer.train"),
    ]

    new = Keys(target.prefix)
    assert await command_kinds(redis, new, run_id) == await command_kinds(redis, keys, run_id)
    assert await event_kinds(redis, new) == await event_kinds(redis, keys)
    assert (await redis.hget(new.run(run_id), "status")) == b"completed"
    assert await snapshot(redis, keys.prefix) == before
    # The replay wrote its files under its own data dir; the original's are as they were.
    assert target.data_dir == settings.data_dir / "replays" / target.prefix
    assert (target.data_dir / "corpora" / f"{run_id}-corpus" / "train.txt").exists()
    assert (target.data_dir / "replay.json").exists()
    after = [p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*")]
    assert sorted(p for p in after if p.parts[0] != "replays") == original_files


async def test_step_handles_exactly_one_command(
    redis: aioredis.Redis, keys: Keys, settings: Settings, redis_url: str
) -> None:
    run_id = await recorded_run(redis, keys, settings)
    target = replay.replay_settings(settings, f"{keys.prefix}-replay-b")
    recorded = await replay.run_commands(redis, keys, run_id)
    await replay.redrive(redis, keys, recorded[:1], target, run_id=run_id)
    new = Keys(target.prefix)

    first = await replay.step(redis_url, target, actors=FAKES, config=FAST)
    assert first is not None and (first.actor, first.kind) == ("ingest", "corpus.ingest")
    assert first.events == ["step.started", "corpus.ready", "step.completed"]
    # The chain queued the tokenizer step; nobody has handled it.
    assert await command_kinds(redis, new, run_id) == ["corpus.ingest", "tokenizer.train"]
    assert "tokenizer.ready" not in await event_kinds(redis, new)

    second = await replay.step(redis_url, target, actors=FAKES, config=FAST)
    assert second is not None and second.kind == "tokenizer.train"
    assert second.events == ["step.started", "tokenizer.ready", "step.completed", "run.completed"]
    assert await replay.step(redis_url, target, actors=FAKES, config=FAST) is None


async def test_replay_of_every_recorded_command_acknowledges_the_chain_duplicates(
    redis: aioredis.Redis, keys: Keys, settings: Settings, redis_url: str
) -> None:
    run_id = await recorded_run(redis, keys, settings)
    recorded = await replay.run_commands(redis, keys, run_id)
    target = replay.replay_settings(settings, f"{keys.prefix}-replay-all")
    done = await replay.redrive(
        redis, keys, replay.select_for_run(recorded, all_commands=True), target, run_id=run_id
    )
    assert [e.kind for e, _ in done.entries] == ["corpus.ingest", "tokenizer.train"]
    steps = await replay.drain(redis_url, target, actors=FAKES, config=FAST)
    assert [s.kind for s in steps] == ["corpus.ingest", "tokenizer.train", "tokenizer.train"]
    assert steps[-1].events == ["command.duplicate"]


async def test_replay_refuses_a_prefix_in_use_and_the_source_prefix(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    run_id = await recorded_run(redis, keys, settings)
    recorded = await replay.run_commands(redis, keys, run_id)
    with pytest.raises(ValueError, match="must differ"):
        await replay.redrive(redis, keys, recorded, settings)
    target = replay.replay_settings(settings, f"{keys.prefix}-replay-c")
    await replay.redrive(redis, keys, recorded[:1], target)
    with pytest.raises(ValueError, match="is not fresh"):
        await replay.redrive(redis, keys, recorded[:1], target)


async def test_cli_replay_drain_then_diff(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    data_dir: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MT_PREFIX", keys.prefix)
    monkeypatch.setenv("MT_DATA_DIR", str(data_dir))
    monkeypatch.setattr(service, "ACTORS", FAKES)
    run_id = await recorded_run(redis, keys, settings)
    full, half = f"{keys.prefix}-full", f"{keys.prefix}-half"

    assert await cli.run(["replay", "--run", run_id, "--to-prefix", full, "--drain"]) == 0
    out = capsys.readouterr().out
    assert f"{keys.cmd('ingest')} " in out and f"→ {full}:cmd:ingest" in out
    assert "tokenizer: tokenizer.train" in out
    assert await cli.run(["replay", "diff", "--run", run_id, "--against", full]) == 0
    out = capsys.readouterr().out
    assert "event kinds match" in out and "run.completed" in out

    assert await cli.run(["replay", "--run", run_id, "--to-prefix", half, "--step"]) == 0
    assert "ingest: corpus.ingest" in capsys.readouterr().out
    assert await cli.run(["replay", "diff", "--run", run_id, "--against", half]) == 1
    out = capsys.readouterr().out
    assert "event kinds DIFFER" in out and "!" in out
    assert await cli.run(["replay", "step", "--prefix", half]) == 0
    assert "tokenizer: tokenizer.train" in capsys.readouterr().out
    assert await cli.run(["replay", "diff", "--run", run_id, "--against", half]) == 0
    assert await cli.run(["replay", "step", "--prefix", half]) == 0
    assert "nothing queued" in capsys.readouterr().out
    assert await cli.run(["replay", "step", "--prefix", keys.prefix]) == 2
    assert await cli.run(["replay", "diff", "--run", "nope", "--against", half]) == 2


async def test_cli_replay_of_a_stream_range_copies_those_entries(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    data_dir: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MT_PREFIX", keys.prefix)
    monkeypatch.setenv("MT_DATA_DIR", str(data_dir))
    await redis.xadd(keys.cmd("tokenizer"), {FIELD: b"not json"})
    await recorded_run(redis, keys, settings)
    ids = [i for i, _ in stream_entries(await redis.xrange(keys.cmd("tokenizer")))]
    assert len(ids) == 2
    to = Keys(f"{keys.prefix}-range")
    argv = [
        "replay",
        "--stream",
        "tokenizer",
        "--start",
        ids[0],
        "--end",
        ids[0],
        "--to-prefix",
        to.prefix,
    ]
    assert await cli.run(argv) == 0
    assert "(undecodable)" in capsys.readouterr().out
    assert [f for _, f in stream_entries(await redis.xrange(to.cmd("tokenizer")))] == [
        {FIELD.encode(): b"not json"}
    ]
    assert await redis.xlen(to.cmd("ingest")) == 0
    assert await cli.run(["replay", "--stream", "nope", "--to-prefix", "x"]) == 2
    assert "unknown command stream 'nope'" in capsys.readouterr().err
    assert await cli.run(["replay"]) == 2
    assert await cli.run(["replay", "--run", "nope"]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err
