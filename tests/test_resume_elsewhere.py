"""A run is not tied to a machine: the trainer fetches its inputs by their pointers, stores
each checkpoint as it goes, and a trainer on another machine (another data dir, nothing
shared but Redis and the store) resumes a killed run from the stored checkpoint, bit for
bit, with either shared store (S3 or the Data Bank). A store outage during training delays
the checkpoints' upload and fails nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog

from actors.runtime import artifacts
from actors.runtime.config import Settings
from actors.runtime.seaweed import SeaweedS3
from actors.runtime.store import Store, make_store
from actors.runtime.store_s3 import S3Objects
from actors.workers.trainer import (
    CheckpointUploader,
    checkpoint_key,
    local_checkpoint_step,
    restore_checkpoint,
    train_config,
)
from protocol.codec import FIELD, encode
from protocol.commands import ModelTrain
from protocol.events import RunFailed, TrainStarted, event_kind
from protocol.keys import Keys
from tests.helpers_ml import TEXT, char_tokenizer, same_weights, train_curve
from tests.test_service import (
    actor_process,
    alive,
    events_of,
    running,
    training_children,
    wait_for_end,
)
from trainer.checkpoint_names import checkpoint_name
from trainer.corpus import CorpusConfig, prepare_corpus
from trainer.tracking import TB_DIR, TRACKING_NAME
from trainer.train import train

pytestmark = pytest.mark.timeout(600)


def machine(root: Path, keys: Keys, store_env: dict[str, str]) -> Settings:
    """One machine: a data dir of its own, the shared Redis namespace and store."""
    env = {"MT_DATA_DIR": str(root), "MT_PREFIX": keys.prefix, "MT_LEASE_S": "2", **store_env}
    return replace(Settings.from_env(env), events_channel=f"{keys.prefix}:trainer:events")


@dataclass
class Inputs:
    corpus_id: str
    tokenizer_id: str
    corpus_dir: Path  # on the machine that made them
    tokenizer_dir: Path


async def publish_inputs(settings: Settings, redis: aioredis.Redis, keys: Keys) -> Inputs:
    """What ingest and the tokenizer would leave: folders in the store, pointers in Redis."""
    corpus_id, tokenizer_id = f"c-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    source = settings.corpus_root / "river.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(TEXT * 4)
    corpus_dir = settings.corpus_dir(corpus_id)
    prepare_corpus(source, corpus_dir, CorpusConfig())
    tokenizer_dir = char_tokenizer(corpus_dir, settings.tokenizer_dir(tokenizer_id))
    async with make_store(settings) as store:
        corpus = await artifacts.publish(store, settings, corpus_dir, f"corpora/{corpus_id}")
        tok = await artifacts.publish(store, settings, tokenizer_dir, f"tokenizers/{tokenizer_id}")
    await redis.hset(keys.corpus(corpus_id), "stored", msgspec.json.encode(corpus))
    await redis.hset(keys.tokenizer(tokenizer_id), "stored", msgspec.json.encode(tok))
    return Inputs(corpus_id, tokenizer_id, corpus_dir, tokenizer_dir)


def train_command(inputs: Inputs, **changes: object) -> ModelTrain:
    settings: dict[str, object] = {
        "model_family": "gpt2",
        "max_seq_len": 32,
        "batch_size": 4,
        "max_steps": 160,
        "eval_every": 40,
        "checkpoint_every": 10,
        "warmup_steps": 4,
        "learning_rate": 2e-3,
        "threads": 1,
        "device": "cpu",
        "precision": "fp32",
        "compile": "off",
        **changes,
    }
    return msgspec.convert(
        {
            "command_id": f"cmd-{uuid.uuid4().hex[:8]}",
            "run_id": f"run-{uuid.uuid4().hex[:8]}",
            "corpus_id": inputs.corpus_id,
            "tokenizer_id": inputs.tokenizer_id,
            **settings,
        },
        ModelTrain,
    )


async def recorded_step(redis: aioredis.Redis, keys: Keys, run_id: str) -> int:
    raw = await redis.hget(keys.run(run_id), "checkpoint_step")
    return int(raw) if raw else 0


async def until_recorded(
    redis: aioredis.Redis, keys: Keys, run_id: str, at_least: int, timeout: float = 240
) -> int:
    deadline = time.monotonic() + timeout
    while (step := await recorded_step(redis, keys, run_id)) < at_least:
        assert time.monotonic() < deadline, f"no checkpoint past step {at_least} was recorded"
        await asyncio.sleep(0.05)
    return step


async def fetch_stored_run(
    settings: Settings, redis: aioredis.Redis, keys: Keys, run_id: str, dest: Path
) -> Path:
    pointer = await artifacts.read_pointer(redis, keys.run(run_id), "stored")
    assert pointer is not None, "the run's stored pointer was not written"
    assert pointer.key == f"runs/{run_id}/model"
    async with make_store(settings) as store:
        return await store.get(pointer, dest)


async def test_a_run_killed_on_one_machine_resumes_on_another_bit_for_bit(
    redis_url: str, redis: aioredis.Redis, keys: Keys, store_env: dict[str, str], tmp_path: Path
) -> None:
    a, b, c = (machine(tmp_path / m, keys, store_env) for m in ("a", "b", "c"))
    inputs = await publish_inputs(a, redis, keys)
    cmd = train_command(inputs)
    await redis.xadd(keys.cmd("trainer"), {FIELD: encode(cmd)})

    first = actor_process(redis_url, b, "trainer", "b", store_env, tmp_path / "b.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        # Past the first validation (step 40): best/ and the val line come along.
        seen = await until_recorded(redis, keys, cmd.run_id, 50)
        first.send_signal(signal.SIGKILL)
        first.wait()
        # B's training child exits with it (it must not write on after the takeover).
        [orphan] = training_children(b.run_dir(cmd.run_id))
        deadline = time.monotonic() + 5
        while alive(orphan):
            assert time.monotonic() < deadline, "B's training child lives on"
            await asyncio.sleep(0.05)
        assert not c.run_dir(cmd.run_id).exists() and not c.corpus_dir(cmd.corpus_id).exists()
        second = actor_process(redis_url, c, "trainer", "c", store_env, tmp_path / "c.log")
        status = await wait_for_end(redis, keys, cmd.run_id, timeout=400)
        assert status == "completed", (tmp_path / "c.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    events = await events_of(redis, keys, cmd.run_id)
    kinds = [event_kind(e) for e in events]
    assert kinds.count("train.completed") == 1 and not [
        e for e in events if isinstance(e, RunFailed)
    ]
    starts = [e for e in events if isinstance(e, TrainStarted)]
    assert [s.resumed_from_step > 0 for s in starts] == [False, True], starts
    resumed = starts[1].resumed_from_step
    assert resumed >= seen and resumed % cmd.checkpoint_every == 0
    c_log = (tmp_path / "c.log").read_text()
    assert "fetched the stored checkpoint" in c_log
    # C had nothing of its own: the inputs came from the store, by their pointers.
    assert (c.corpus_dir(cmd.corpus_id) / "train.txt").is_file()
    assert (c.tokenizer_dir(cmd.tokenizer_id) / "mt_tokenizer.json").is_file()

    # The same run, never interrupted, here in this process: the same weights, bit for bit,
    # and the same curve in the stored run folder (its metrics came along with the checkpoint).
    clean_dir = tmp_path / "clean"
    clean = await asyncio.to_thread(
        train, train_config(cmd), inputs.corpus_dir, inputs.tokenizer_dir, clean_dir
    )
    assert clean.resumed_from_step is None
    fetched = await fetch_stored_run(c, redis, keys, cmd.run_id, tmp_path / "fetched")
    assert same_weights(fetched, clean_dir), "the run resumed elsewhere has other weights"
    assert train_curve(fetched) == train_curve(clean_dir)
    assert not (fetched / "checkpoints").exists() and not (fetched / "logs.jsonl").exists()

    # The checkpoint pointer names the last one; the store keeps the newest keep_checkpoints.
    last = f"runs/{cmd.run_id}/checkpoints/{checkpoint_name(cmd.max_steps or 0)}"
    pointer = await artifacts.read_pointer(redis, keys.run(cmd.run_id), "checkpoint")
    assert pointer is not None and pointer.key == last
    async with make_store(c) as store:
        if store.can_list:  # the Data Bank can neither list nor delete: it keeps them all
            kept = await store.list(f"runs/{cmd.run_id}/checkpoints")
            assert kept[-1] == last and len(kept) == 2, kept


async def test_a_store_outage_during_training_delays_the_checkpoints_and_fails_nothing(
    redis_url: str, redis: aioredis.Redis, keys: Keys, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    settings = machine(tmp_path / "a", keys, s3_server.env(f"t-{uuid.uuid4().hex[:10]}"))
    inputs = await publish_inputs(settings, redis, keys)
    cmd = train_command(inputs, max_steps=240)
    run_dir = settings.run_dir(cmd.run_id)
    async with running(settings, redis_url, ["trainer"]):
        await redis.xadd(keys.cmd("trainer"), {FIELD: encode(cmd)})
        await until_recorded(redis, keys, cmd.run_id, 10)
        s3_server.stop()
        try:
            await asyncio.sleep(0.5)  # an upload that finished just before may still record
            during = await recorded_step(redis, keys, cmd.run_id)
            # Training goes on, unstalled, while its checkpoints cannot be stored.
            deadline = time.monotonic() + 120
            while local_checkpoint_step(run_dir / "checkpoints") < during + 40:
                assert time.monotonic() < deadline, "training stalled during the outage"
                await asyncio.sleep(0.1)
            assert await recorded_step(redis, keys, cmd.run_id) == during
        finally:
            s3_server.start()
        assert await wait_for_end(redis, keys, cmd.run_id, timeout=300) == "completed"
    events = await events_of(redis, keys, cmd.run_id)
    assert not [e for e in events if isinstance(e, RunFailed)]
    assert not await redis.exists(keys.tries(cmd.command_id)), "a retry was used"
    assert await recorded_step(redis, keys, cmd.run_id) == 240
    fetched = await fetch_stored_run(settings, redis, keys, cmd.run_id, tmp_path / "fetched")
    assert same_weights(fetched, run_dir)
    assert train_curve(fetched) == train_curve(run_dir)


def fake_checkpoint(run_dir: Path, step: int) -> None:
    """What the training child leaves: a checkpoint folder, metrics.jsonl, best/, its
    TensorBoard events and tracking.json."""
    folder = run_dir / "checkpoints" / checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(50_000))
    (folder / "trainer.json").write_text(f'{{"step": {step}}}')
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(f'{{"kind": "train", "step": {step}}}\n')
    best = run_dir / "best"
    best.mkdir(exist_ok=True)
    (best / "model.safetensors").write_bytes(f"best at {step}".encode())
    (run_dir / TB_DIR).mkdir(exist_ok=True)
    (run_dir / TB_DIR / f"events.out.tfevents.{step}").write_bytes(b"events")
    (run_dir / TRACKING_NAME).write_text(f'{{"mlflow_run_id": "m{step}"}}')


async def stored_names(store: Store, run_id: str) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in await store.list(f"runs/{run_id}/checkpoints")]


async def test_the_uploader_retries_an_outage_keeps_the_newest_and_never_goes_back(
    redis: aioredis.Redis, keys: Keys, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    run_id, run_dir = "r1", tmp_path / "run"
    objects = S3Objects(
        s3_server.bucket,
        f"t-{uuid.uuid4().hex[:10]}",
        endpoint=s3_server.endpoint,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
        region=s3_server.region,
        retry_timeout_s=1.0,  # an outage surfaces as StoreError within a second
    )
    log = structlog.stdlib.get_logger("test")

    async def until_uploaded(uploader: CheckpointUploader, step: int) -> None:
        deadline = time.monotonic() + 60
        while uploader.uploaded < step:
            assert time.monotonic() < deadline, f"step {step} was not stored"
            await asyncio.sleep(0.05)

    async with Store(objects) as store:
        up = CheckpointUploader(store, redis, keys, run_id, run_dir, 2, log, 0)
        try:
            fake_checkpoint(run_dir, 10)
            s3_server.stop()
            try:
                up.offer(10)
                deadline = time.monotonic() + 30
                while up.failures < 1:
                    assert time.monotonic() < deadline, "the outage was not noticed"
                    await asyncio.sleep(0.1)
                assert up.uploaded == 0
                assert not await redis.hget(keys.run(run_id), "checkpoint")
            finally:
                s3_server.start()
            await until_uploaded(up, 10)
            for step in (20, 30):
                fake_checkpoint(run_dir, step)
                up.offer(step)
                await until_uploaded(up, step)
            # Two offered at once: the newest wins, the older one is never stored.
            fake_checkpoint(run_dir, 40)
            fake_checkpoint(run_dir, 50)
            up.offer(40)
            up.offer(50)
            await until_uploaded(up, 50)
            # Pruning follows the upload's record: wait for it rather than cut it short.
            kept = [checkpoint_name(30), checkpoint_name(50)]  # keep 2: 10, 20 pruned
            deadline = time.monotonic() + 30
            while (names := await stored_names(store, run_id)) != kept:
                assert time.monotonic() < deadline, names
                await asyncio.sleep(0.05)
        finally:
            await up.close()

        # A stale trainer storing an older checkpoint does not move the pointer back.
        stale = CheckpointUploader(store, redis, keys, run_id, run_dir, 2, log, 0)
        await stale.finish(30)
        pointer = await artifacts.read_pointer(redis, keys.run(run_id), "checkpoint")
        assert pointer is not None and pointer.key == checkpoint_key(run_id, 50)

        # Another machine brings it back as its latest, metrics and best/ beside it.
        there = tmp_path / "there"
        assert await restore_checkpoint(store, pointer, there) == 50
        ckpt = there / "checkpoints"
        assert (ckpt / "latest").read_text().strip() == checkpoint_name(50)
        assert local_checkpoint_step(ckpt) == 50
        src = run_dir / "checkpoints" / checkpoint_name(50) / "model.safetensors"
        assert (ckpt / checkpoint_name(50) / "model.safetensors").read_bytes() == src.read_bytes()
        assert not (ckpt / checkpoint_name(50) / "_run").exists()
        assert (there / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
        assert (there / "best" / "model.safetensors").read_bytes() == b"best at 50"
        assert sorted(p.name for p in (there / TB_DIR).iterdir()) == [
            f"events.out.tfevents.{step}" for step in (10, 20, 30, 40, 50)
        ]
        assert (there / TRACKING_NAME).read_text() == '{"mlflow_run_id": "m50"}'
