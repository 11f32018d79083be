"""The notifier against real Redis (events stream in, pub/sub out) and a real local HTTP
server speaking Discord's API."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime.config import Settings
from actors.runtime.outcome import DEAD_LETTER_KEEP_BYTES
from actors.workers.bot_events import JobProgress, MetricsProgress, NotifierConfig, Translator
from actors.workers.discord import Discord
from actors.workers.notifier import GROUP, Notifier, run_notifier
from protocol.codec import FIELD, encode
from protocol.events import (
    AnyEvent,
    ArtifactStored,
    CommandDuplicate,
    CorpusReady,
    EvalCompleted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunQueued,
    StepCompleted,
    StepStarted,
    TokenizerReady,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
)
from protocol.keys import ActorName, Keys
from tests.fake_services import FakeDiscord

T0 = 1_700_000_000.0
FILE_ID = "ab" * 32
STEPS: list[ActorName] = ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]

# The bot's shapes: every key, and the type of each value.
SHAPES: dict[str, dict[str, type]] = {
    "trainer.job.started.v1": {
        "type": str,
        "domain": str,
        "job_id": str,
        "user_id": int,
        "queue": str,
    },
    "trainer.job.progress.v1": {
        "type": str,
        "domain": str,
        "job_id": str,
        "user_id": int,
        "progress": int,
        "message": str,
    },
    "trainer.job.completed.v1": {
        "type": str,
        "domain": str,
        "job_id": str,
        "user_id": int,
        "result_id": str,
        "result_bytes": int,
    },
    "trainer.job.failed.v1": {
        "type": str,
        "domain": str,
        "job_id": str,
        "user_id": int,
        "error_kind": str,
        "message": str,
    },
    "trainer.metrics.config.v1": {
        "type": str,
        "job_id": str,
        "user_id": int,
        "model_family": str,
        "model_size": str,
        "total_epochs": int,
        "queue": str,
        "cpu_cores": int,
        "memory_mb": int,
        "optimal_threads": int,
        "optimal_workers": int,
        "batch_size": int,
        "learning_rate": float,
    },
    "trainer.metrics.progress.v1": {
        "type": str,
        "job_id": str,
        "user_id": int,
        "epoch": int,
        "total_epochs": int,
        "step": int,
        "train_loss": float,
        "train_ppl": float,
        "grad_norm": float,
        "samples_per_sec": float,
    },
    "trainer.metrics.completed.v1": {
        "type": str,
        "job_id": str,
        "user_id": int,
        "test_loss": float,
        "test_ppl": float,
        "artifact_path": str,
    },
}
VALIDATION = {"val_loss": float, "val_ppl": float}
RECIPE = "bf16: 1.41x fp32 measured, val loss within 0.4%; compile pays back after 80 steps"


def progress(i: int, at: float, **extra: float) -> TrainProgress:
    values: dict[str, float] = {
        "loss": 3.0 - i / 100,
        "grad_norm": 0.5,
        "samples_per_s": 40.0,
        **extra,
    }
    return TrainProgress(
        run_id="r1",
        user_id=42,
        at=at,
        step=i,
        epoch=1 + i // 50,
        total_epochs=2,
        total_steps=100,
        loss=values["loss"],
        grad_norm=values["grad_norm"],
        samples_per_s=values["samples_per_s"],
        val_loss=extra.get("val_loss"),
        mfu=extra.get("mfu"),
    )


def successful_run() -> list[AnyEvent]:
    """A whole run as the actors write it: 42 progress events, one of them a validation."""
    t = T0
    events: list[AnyEvent] = [
        RunQueued(at=t, steps=STEPS, model_family="gpt2", model_size="tiny"),
        StepStarted(at=t + 1, step="ingest", command_id="r1.ingest"),
        CorpusReady(at=t + 2, corpus_id="c", chars={"train": 900, "test": 100}),
        StepCompleted(at=t + 2, step="ingest", command_id="r1.ingest"),
        StepStarted(at=t + 3, step="tokenizer", command_id="r1.tokenizer"),
        TokenizerReady(at=t + 4, tokenizer_id="tok", tokenizer_kind="bpe"),
        StepCompleted(at=t + 4, step="tokenizer", command_id="r1.tokenizer"),
        StepStarted(at=t + 5, step="trainer", command_id="r1.trainer"),
        TrainStarted(
            at=t + 6,
            model_family="gpt2",
            model_size="tiny",
            total_epochs=2,
            total_steps=100,
            batch_size=8,
            learning_rate=3e-4,
            threads=2,
            cpu_cores=2,
            memory_mb=4096,
            device="cpu",
            precision="bf16",
            compile=True,
            recipe=RECIPE,
        ),
    ]
    # 40 steps within 4 s, a validation among them, then one 6.5 s after the validation
    # (sent) and one just after it (not sent). MFU is known from the second step on.
    for i in range(1, 41):
        extra = {"val_loss": 2.5} if i == 20 else {}
        if i > 1:
            extra["mfu"] = 0.123
        events.append(progress(i, t + 10 + i / 10, **extra))
    events += [progress(41, t + 18.5, mfu=0.123), progress(42, t + 19.0, mfu=0.123)]
    events += [
        TrainCompleted(at=t + 20, steps=42, test_loss=2.1, val_loss=2.4, mfu=0.125),
        StepCompleted(at=t + 20, step="trainer", command_id="r1.trainer"),
        StepStarted(at=t + 21, step="evaluator", command_id="r1.evaluator"),
        EvalCompleted(at=t + 22, split="test", loss=2.1, ppl=8.17),
        StepCompleted(at=t + 22, step="evaluator", command_id="r1.evaluator"),
        StepStarted(at=t + 23, step="uploader", command_id="r1.uploader"),
        ArtifactStored(at=t + 24, storage="data-bank", file_id=FILE_ID, size=12345),
        StepCompleted(at=t + 24, step="uploader", command_id="r1.uploader"),
        RunCompleted(at=t + 24),
        # A redelivered command after the end must not revive the run.
        CommandDuplicate(at=t + 30, step="uploader", command_id="r1.uploader"),
    ]
    for event in events:
        event.run_id, event.user_id = "r1", 42
    return events


def failed_runs() -> list[AnyEvent]:
    return [
        RunQueued(run_id="r2", user_id=43, at=T0, steps=["ingest", "tokenizer"]),
        StepStarted(run_id="r2", user_id=43, at=T0 + 1, step="ingest", command_id="r2.ingest"),
        RunFailed(
            run_id="r2",
            user_id=43,
            at=T0 + 2,
            step="ingest",
            error_kind="user",
            message="the corpus is empty",
        ),
        RunQueued(run_id="r3", user_id=44, at=T0, steps=["ingest"]),
        StepStarted(run_id="r3", user_id=44, at=T0 + 1, step="ingest", command_id="r3.ingest"),
        RunCancelled(run_id="r3", user_id=44, at=T0 + 2, step="ingest", message="by request"),
    ]


async def add(redis: aioredis.Redis, keys: Keys, events: list[AnyEvent]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(keys.events, {FIELD: encode(event)})
        await pipe.execute()


def _no_constants(name: str) -> float:
    raise AssertionError(f"non-JSON number {name} in a message")


async def received(pubsub: aioredis.client.PubSub) -> list[dict[str, object]]:
    """Everything published until the channel has been quiet for 0.3 s."""
    out: list[dict[str, object]] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 0.3:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if msg is None:  # also what a subscribe confirmation reads as
            continue
        decoded = json.loads(msg["data"], parse_constant=_no_constants)
        assert isinstance(decoded, dict)
        out.append(decoded)
        quiet_since = time.monotonic()
    return out


@pytest.fixture
def settings(data_dir: Path, keys: Keys) -> Settings:
    return Settings(
        data_dir=data_dir,
        corpus_root=data_dir / "corpus",
        prefix=keys.prefix,
        events_channel=f"{keys.prefix}:bot-events",
    )


@pytest.fixture
async def pubsub(
    redis: aioredis.Redis, settings: Settings
) -> AsyncIterator[aioredis.client.PubSub]:
    ps = redis.pubsub()
    await ps.subscribe(settings.events_channel)
    try:
        yield ps
    finally:
        await ps.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose untyped


def check_shape(msg: dict[str, object]) -> None:
    kind = msg["type"]
    assert isinstance(kind, str)
    shape = dict(SHAPES[kind])
    if kind == "trainer.metrics.progress.v1" and "val_loss" in msg:
        shape |= VALIDATION
    assert set(msg) == set(shape), kind
    for key, typ in shape.items():
        assert type(msg[key]) is typ, (kind, key, msg[key])
    if "domain" in msg:
        assert msg["domain"] == "trainer"


async def test_events_become_the_bots_messages_rate_limited(
    redis: aioredis.Redis, keys: Keys, settings: Settings, pubsub: aioredis.client.PubSub
) -> None:
    # History from before the notifier's first start is not replayed to the bot.
    await add(redis, keys, [RunQueued(run_id="old", user_id=1, at=T0)])
    notifier = Notifier(redis, settings, consumer="n-0", keys=keys)
    await notifier.ensure_group()
    await add(redis, keys, successful_run())
    await redis.xadd(keys.events, {FIELD: b"not an event"})
    await add(redis, keys, failed_runs())
    await notifier.run(until_idle=True)

    messages = await received(pubsub)
    for msg in messages:
        check_shape(msg)
    r1 = [m for m in messages if m["job_id"] == "r1"]
    assert [str(m["type"]).split(".", 1)[1] for m in r1] == [
        "job.started.v1",
        "job.progress.v1",
        "job.progress.v1",
        "job.progress.v1",
        "job.progress.v1",
        "metrics.config.v1",
        "job.progress.v1",
        "metrics.progress.v1",  # step 1: the first
        "job.progress.v1",
        "metrics.progress.v1",  # step 20: the validation
        "job.progress.v1",
        "metrics.progress.v1",  # step 41: 6.5 s after the last one
        "job.progress.v1",
        "job.progress.v1",
        "job.progress.v1",
        "job.progress.v1",
        "metrics.completed.v1",  # when the run is complete, not when training ends
        "job.completed.v1",
    ]
    assert all(m["user_id"] == 42 for m in r1)
    assert r1[0]["queue"] == "ingest"
    percents = [m["progress"] for m in r1 if m["type"] == "trainer.job.progress.v1"]
    assert percents == [5, 5, 15, 15, 15, 30, 45, 90, 97, 97, 100]
    config = r1[5]
    assert (config["model_family"], config["model_size"]) == ("gpt2", "tiny")
    assert config["queue"] == "trainer"
    assert (config["total_epochs"], config["cpu_cores"], config["memory_mb"]) == (2, 2, 4096)
    assert (config["batch_size"], config["optimal_threads"]) == (8, 2)
    assert config["learning_rate"] == 3e-4 and config["optimal_workers"] == 1
    metrics = [m for m in r1 if m["type"] == "trainer.metrics.progress.v1"]
    assert [m["step"] for m in metrics] == [1, 20, 41]
    # MFU is in the progress message's text (check_shape: the metrics shape has no key for it).
    said = [str(r1[i]["message"]) for i in (6, 8, 10)]
    assert said == [
        "epoch 1/2 step 1/100 loss 2.9900",
        "epoch 1/2 step 20/100 loss 2.8000 val 2.5000 MFU 12.3%",
        "epoch 1/2 step 41/100 loss 2.5900 MFU 12.3%",
    ]
    assert "val_loss" not in metrics[0] and "val_loss" not in metrics[2]
    assert metrics[1]["val_loss"] == 2.5
    assert metrics[1]["val_ppl"] == pytest.approx(math.exp(2.5))
    assert metrics[1]["train_ppl"] == pytest.approx(math.exp(2.8))
    done = r1[-2]
    assert done["test_loss"] == 2.1 and done["test_ppl"] == pytest.approx(math.exp(2.1))
    assert done["artifact_path"] == str(settings.run_dir("r1"))
    assert (r1[-1]["result_id"], r1[-1]["result_bytes"]) == (FILE_ID, 12345)

    rest = [m for m in messages if m["job_id"] != "r1"]
    assert [(m["job_id"], m["type"]) for m in rest] == [
        ("r2", "trainer.job.started.v1"),
        ("r2", "trainer.job.failed.v1"),
        ("r3", "trainer.job.started.v1"),
        ("r3", "trainer.job.failed.v1"),
    ]
    assert (rest[1]["error_kind"], rest[1]["message"]) == (
        "user",
        "ingest failed: the corpus is empty",
    )
    assert (rest[3]["error_kind"], rest[3]["message"]) == (
        "user",
        "Cancelled on request at the ingest step, before training; nothing failed. "
        "There is no checkpoint yet.",
    )
    assert not [m for m in messages if m["job_id"] == "old"]
    assert (await redis.xpending(keys.events, GROUP))["pending"] == 0


def _run(run_id: str, events: list[AnyEvent]) -> list[AnyEvent]:
    for i, event in enumerate(events):
        event.run_id, event.user_id, event.at = run_id, 7, T0 + i
    return events


async def test_the_bot_hears_a_cancel_plainly_and_completed_only_for_a_complete_run(
    redis: aioredis.Redis, keys: Keys, settings: Settings, pubsub: aioredis.client.PubSub
) -> None:
    notifier = Notifier(redis, settings, consumer="n-9", keys=keys)
    await notifier.ensure_group()

    def train() -> StepStarted:
        return StepStarted(step="trainer", command_id="x.trainer")

    await add(
        redis,
        keys,
        [
            # Cancelled mid-training: the trainer kept a checkpoint.
            *_run("cancelled", [train(), progress(30, T0), RunCancelled(step="trainer")]),
            # Trained, then the upload failed: the bot never hears "completed".
            *_run(
                "upload-failed",
                [
                    train(),
                    TrainCompleted(steps=100, test_loss=2.0),
                    StepStarted(step="uploader", command_id="x.up"),
                    RunFailed(step="uploader", error_kind="system", message="disk full"),
                ],
            ),
            # Trained without a test split; the evaluation step measured one.
            *_run(
                "completed",
                [
                    train(),
                    TrainCompleted(steps=100),
                    EvalCompleted(split="test", loss=1.5, ppl=4.48),
                    RunCompleted(),
                ],
            ),
        ],
    )
    await notifier.run(until_idle=True)
    messages = await received(pubsub)
    for msg in messages:
        check_shape(msg)
    by_run: dict[object, list[dict[str, object]]] = {}
    for msg in messages:
        by_run.setdefault(msg["job_id"], []).append(msg)

    failed = by_run["cancelled"][-1]
    assert (failed["type"], failed["error_kind"]) == ("trainer.job.failed.v1", "user")
    assert failed["message"] == (
        "Cancelled on request at the trainer step, after training step 30 of 100; "
        "nothing failed. Its checkpoint is kept."
    )
    kinds = [m["type"] for m in by_run["upload-failed"]]
    assert "trainer.metrics.completed.v1" not in kinds
    assert kinds[-1] == "trainer.job.failed.v1"
    assert [m["type"] for m in by_run["completed"][-2:]] == [
        "trainer.metrics.completed.v1",
        "trainer.job.completed.v1",
    ]
    metrics = by_run["completed"][-2]
    assert (metrics["test_loss"], metrics["test_ppl"]) == (1.5, 4.48)


async def test_completed_reads_the_pointer_from_run_state_and_pending_comes_first(
    redis: aioredis.Redis, keys: Keys, settings: Settings, pubsub: aioredis.client.PubSub
) -> None:
    notifier = Notifier(redis, settings, consumer="n-1", keys=keys)
    await notifier.ensure_group()
    pointer = {"storage": "local", "uri": "file:///a/r9.tar.gz", "file_id": "", "size": 77}
    await redis.hset(keys.run("r9"), "artifact", json.dumps(pointer))
    await add(
        redis,
        keys,
        [
            StepStarted(run_id="r9", user_id=5, at=T0, step="uploader", command_id="r9.up"),
            RunCompleted(run_id="r9", user_id=5, at=T0 + 1),
        ],
    )
    # A previous life of this consumer read the entries and died before acknowledging them.
    await redis.xreadgroup(GROUP, "n-1", {keys.events: ">"})
    assert (await redis.xpending(keys.events, GROUP))["pending"] == 2
    await notifier.run(until_idle=True)
    messages = await received(pubsub)
    assert [m["type"] for m in messages] == ["trainer.job.started.v1", "trainer.job.completed.v1"]
    assert (messages[1]["result_id"], messages[1]["result_bytes"]) == ("file:///a/r9.tar.gz", 77)
    assert (await redis.xpending(keys.events, GROUP))["pending"] == 0

    # Redis lost the group: it comes back after the last entry handled, skipping nothing new.
    await redis.xgroup_destroy(keys.events, GROUP)
    await add(
        redis,
        keys,
        [
            RunQueued(run_id="r10", user_id=6, at=T0),
            StepStarted(run_id="r10", user_id=6, at=T0, step="ingest", command_id="r10.ingest"),
        ],
    )
    await notifier.run(until_idle=True)
    assert [m["job_id"] for m in await received(pubsub)] == ["r10"]


async def test_a_second_notifier_takes_over_a_dead_ones_pending_events(
    redis: aioredis.Redis, keys: Keys, settings: Settings, pubsub: aioredis.client.PubSub
) -> None:
    s = replace(settings, lease_s=0.5)
    live = Notifier(redis, s, consumer="n-live", keys=keys, config=NotifierConfig(block_ms=100))
    await live.ensure_group()
    await add(redis, keys, failed_runs())
    # Another notifier read them and died (SIGKILL, a lost machine) before acknowledging.
    t0 = time.monotonic()
    await redis.xreadgroup(GROUP, "n-dead", {keys.events: ">"})
    assert (await redis.xpending(keys.events, GROUP))["pending"] == 6
    task = asyncio.create_task(live.run())
    try:
        messages = await received(pubsub)
        while not messages and time.monotonic() - t0 < 5:
            messages = await received(pubsub)
    finally:
        live.stop()
        await task
    assert time.monotonic() - t0 >= s.lease_s  # taken once idle past the lease, not before
    assert [(m["job_id"], m["type"]) for m in messages] == [
        ("r2", "trainer.job.started.v1"),
        ("r2", "trainer.job.failed.v1"),
        ("r3", "trainer.job.started.v1"),
        ("r3", "trainer.job.failed.v1"),
    ]
    assert (await redis.xpending(keys.events, GROUP))["pending"] == 0


async def test_an_undecodable_event_is_dead_lettered_and_the_rest_published(
    redis: aioredis.Redis, keys: Keys, settings: Settings, pubsub: aioredis.client.PubSub
) -> None:
    notifier = Notifier(redis, settings, consumer="n-3", keys=keys)
    await notifier.ensure_group()
    r2 = failed_runs()[:3]  # queued, started, failed
    await add(redis, keys, r2[:1])
    garbage = {
        "not json": b"not an event",
        "deep": encode(r2[0])[:-1] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        "big": b" " * (9 * 1024 * 1024),
    }
    ids: dict[str, bytes] = {}
    for name, raw in garbage.items():
        entry_id = await redis.xadd(keys.events, {FIELD: raw})
        ids[name] = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
    await add(redis, keys, r2[1:])
    await notifier.run(until_idle=True)

    messages = await received(pubsub)
    assert [(m["job_id"], m["type"]) for m in messages] == [
        ("r2", "trainer.job.started.v1"),
        ("r2", "trainer.job.failed.v1"),
    ]
    letters: dict[bytes, dict[bytes, bytes]] = {}
    for _, fields in await redis.xrange(keys.dead) or []:
        assert fields is not None
        letter = {k: v for k, v in fields.items() if isinstance(k, bytes) and isinstance(v, bytes)}
        letters[letter[b"entry_id"]] = letter
    assert set(letters) == set(ids.values())
    for name, raw in garbage.items():
        letter = letters[ids[name]]
        assert letter[b"error"].startswith(b"undecodable event: ")
        assert letter[b"stream"] == keys.events.encode()
        assert (letter[b"actor"], letter[b"consumer"]) == (b"notifier", b"n-3")
        assert letter[b"data"] == raw[:DEAD_LETTER_KEEP_BYTES]
        assert letter[b"size"] == str(len(raw)).encode()
    assert b"levels deep" in letters[ids["deep"]][b"error"]
    assert b"over the limit" in letters[ids["big"]][b"error"]
    assert (await redis.xpending(keys.events, GROUP))["pending"] == 0


def test_non_finite_floats_never_reach_the_bot(settings: Settings) -> None:
    """Decoded events cannot carry NaN (JSON has none), but the translation is the last
    line: required floats are clamped to the largest double, optional ones dropped."""
    translator = Translator(settings, NotifierConfig())
    view = translator.view("r1")
    event = TrainProgress(
        run_id="r1",
        user_id=42,
        at=T0,
        step=3,
        epoch=1,
        total_epochs=1,
        total_steps=10,
        loss=math.nan,
        grad_norm=math.inf,
        samples_per_s=-math.inf,
        val_loss=math.inf,
    )
    job, metrics = translator.messages(event, view)
    assert isinstance(job, JobProgress) and isinstance(metrics, MetricsProgress)
    decoded = json.loads(msgspec.json.encode(metrics), parse_constant=_no_constants)
    big = sys.float_info.max
    assert (decoded["train_loss"], decoded["train_ppl"]) == (big, big)
    assert (decoded["grad_norm"], decoded["samples_per_sec"]) == (big, -big)
    assert "val_loss" not in decoded and "val_ppl" not in decoded
    assert job.progress == 37  # 15 + 75 * 3/10, rounded down


def test_the_recipe_and_mfu_are_told_in_the_messages_text(settings: Settings) -> None:
    translator = Translator(settings, NotifierConfig(progress_interval_s=0.0))
    view = translator.view("r1")
    [started] = [e for e in successful_run() if isinstance(e, TrainStarted)]
    translator.messages(started, view)
    assert view.message == f"training gpt2 tiny (cpu bf16, compile on): {RECIPE}"
    # An MFU that is not a number is not shown (the trainer clamps, but this is the last line).
    job, _ = translator.messages(progress(2, T0 + 11, mfu=math.inf), view)
    assert isinstance(job, JobProgress) and "MFU" not in job.message
    done = TrainCompleted(run_id="r1", user_id=42, at=T0 + 20, steps=42, mfu=0.125)
    assert translator.messages(done, view) == []
    assert view.message == "training completed after 42 steps MFU 12.5%"


# ------------------------------------------------------------------------------ Discord
@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def card(body: object) -> dict[str, object]:
    """The one embed of a message body."""
    assert isinstance(body, dict)
    [embed] = body["embeds"]
    assert isinstance(embed, dict)
    return embed


def dm_settings(settings: Settings, discord: FakeDiscord, token: str | None) -> Settings:
    return Settings(
        data_dir=settings.data_dir,
        corpus_root=settings.corpus_root,
        prefix=settings.prefix,
        events_channel=settings.events_channel,
        discord_token=token,
        discord_api=discord.url,
    )


async def test_one_dm_per_run_edited_in_place_and_429_honoured(
    redis: aioredis.Redis, keys: Keys, settings: Settings, discord: FakeDiscord
) -> None:
    discord.rate_limit, discord.retry_after = 1, 0.25
    s = dm_settings(settings, discord, discord.token)
    config = NotifierConfig(discord_interval_s=0.4)
    notifier = Notifier(redis, s, consumer="n-2", keys=keys, config=config)
    await notifier.ensure_group()
    task = asyncio.create_task(notifier.run())
    await add(redis, keys, successful_run()[:9])  # queued → training started
    for i in range(1, 21):  # 20 progress events over ~1 s
        await add(redis, keys, [progress(i, T0 + 10 + i / 10, mfu=0.2)])
        await asyncio.sleep(0.05)
    await add(redis, keys, successful_run()[-6:])  # evaluator → completed
    # Another run of the same user (the DM channel is reused) and one without a user.
    await add(
        redis,
        keys,
        [
            RunQueued(run_id="r5", user_id=42, at=T0),
            RunQueued(run_id="r6", user_id=0, at=T0),
            StepStarted(run_id="r6", at=T0, step="ingest", command_id="r6.ingest"),
        ],
    )
    await asyncio.sleep(1.0)
    notifier.stop()
    await task

    reqs = discord.requests
    assert all(r.headers["Authorization"] == f"Bot {discord.token}" for r in reqs)
    opens = [r for r in reqs if r.path == "/users/@me/channels"]
    assert [r.status for r in opens] == [429, 200]  # opened once, after waiting
    assert opens[1].at - opens[0].at >= 0.25
    assert opens[1].body == {"recipient_id": "42"}
    posts = [r for r in reqs if r.method == "POST" and r.path == "/channels/dm42/messages"]
    assert sorted(str(card(r.body)["title"]) for r in posts) == ["Run r1", "Run r5"]  # one per run
    [r1_id] = [mid for mid, body in discord.messages.items() if card(body)["title"] == "Run r1"]
    edits = [r for r in reqs if r.method == "PATCH" and r.path.endswith(f"/{r1_id}")]
    assert 1 <= len(edits) <= 10  # ~30 updates folded into a few edits
    times = [r.at for r in [*posts, *edits] if card(r.body)["title"] == "Run r1"]
    assert all(b - a >= 0.35 for a, b in itertools.pairwise(times))
    final = card(discord.messages[r1_id])
    fields = final["fields"]
    assert isinstance(fields, list)
    values = {f["name"]: f["value"] for f in fields}
    assert values["Status"] == "completed" and values["Progress"] == "100%"
    assert values["Artifact"] == FILE_ID
    assert values["MFU"] == "20.0%"
    assert values["Recipe"] == f"cpu bf16, compile on: {RECIPE}"
    assert [f["inline"] for f in fields if f["name"] == "Recipe"] == [False]  # a line of its own
    assert not [r for r in reqs if "dm0" in r.path]


async def test_without_a_token_nothing_goes_to_discord(
    redis: aioredis.Redis,
    redis_url: str,
    keys: Keys,
    settings: Settings,
    discord: FakeDiscord,
    pubsub: aioredis.client.PubSub,
) -> None:
    s = dm_settings(settings, discord, None)
    await Notifier(redis, s, consumer="unused", keys=keys).ensure_group()
    await add(redis, keys, successful_run())
    await run_notifier(s, redis_url, until_idle=True)
    assert len(await received(pubsub)) == 18  # the bot still hears of the run
    assert discord.requests == []


async def test_the_retry_after_header_is_honoured_without_a_body_value(
    discord: FakeDiscord,
) -> None:
    discord.rate_limit, discord.retry_after, discord.retry_after_in_body = 1, 0.2, False
    async with aiohttp.ClientSession() as session:
        client = Discord(session, discord.url, discord.token)
        assert await client.dm_channel(7) == await client.dm_channel(7) == "dm7"
    first, second = discord.requests
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.2
