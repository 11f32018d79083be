"""Warm children: the evaluator's request child imports torch and transformers when the actor
starts (before, and without holding up, the first request); a loaded model is reused by the
next request on its run and loaded again once the run is retrained; the trainer's training
child is started ahead of the run it trains.

What a pool child has done is read by jobs run in it (child_state, cache_loads): they, and
this module's imports, import neither torch nor transformers, which the cold pool proves.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.pool import Pool
from actors.runtime.streams import Runtime, RuntimeConfig
from actors.workers import evaluator
from actors.workers.evaluator import EvaluatorActor
from actors.workers.trainer import TrainerActor
from protocol.codec import FIELD, encode
from protocol.commands import ModelScore, ModelTrain
from protocol.keys import Keys
from tests.helpers_ml import TEXT, char_tokenizer, small_corpus, tiny_config

CONFIG = RuntimeConfig(lease_s=30.0, block_ms=100, backoff_s=0.05, grace_s=5.0)
MODEL_CODE = "transformers.models.gpt2.modeling_gpt2"


class ChildState(msgspec.Struct):
    torch: bool
    model_code: bool  # transformers' GPT-2 modules
    warmed_at: float  # evaluator.WARMED_AT in the child
    omp_wait_policy: str


def child_state() -> ChildState:
    return ChildState(
        torch="torch" in sys.modules,
        model_code=MODEL_CODE in sys.modules,
        warmed_at=evaluator.WARMED_AT,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
    )


def cache_loads() -> int:
    from trainer.evaluate import MODEL_CACHE

    return MODEL_CACHE.loads


async def test_a_warm_pool_child_has_imported_torch_and_transformers_before_its_first_job() -> None:
    warm, cold = Pool(1, warm_up=evaluator.warm_up), Pool(1)
    try:
        await warm.start()
        [pid] = warm.pids()
        asked = time.time()
        state = await warm.run(child_state)
        assert state.torch and state.model_code
        assert 0 < state.warmed_at < asked  # warm before the job was even submitted
        assert warm.pids() == [pid]  # the job ran in the child that start() spawned
        assert state.omp_wait_policy == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        # The control: a child without the warm-up has none of it, so the job and this
        # module's imports do not import them themselves.
        cold_state = await cold.run(child_state)
        assert not cold_state.torch and not cold_state.model_code
        assert cold_state.warmed_at == 0.0
    finally:
        warm.shutdown()
        cold.shutdown()


async def test_the_evaluator_starts_its_request_child_warm_without_holding_up_its_start(
    tmp_path: Path,
) -> None:
    actor = EvaluatorActor(Settings(data_dir=tmp_path / "data"))
    try:
        await actor.start()
        returned = time.time()
        await actor.pools_started()
        assert len(actor.requests.pids()) == 1
        assert actor.pool.pids() == []  # the chain steps' child starts on its first use
        asked = time.time()
        state = await actor.requests.run(child_state)
        assert state.torch and state.model_code
        # start() had returned (the actor was ready) before the child finished warming up,
        # and the child was warm before the first request.
        assert returned < state.warmed_at < asked
    finally:
        await actor.stop()
    assert actor.requests.pids() == []


# ------------------------------------------------------------------------------ the cache


def train_model(root: Path, run_dir: Path, seed: int) -> Path:
    from trainer.train import train

    corpus = root / "corpus"
    if not corpus.exists():
        small_corpus(corpus)
        char_tokenizer(corpus, root / "tok")
    cfg = tiny_config("char_lstm", max_steps=2, eval_every=2, checkpoint_every=2, seed=seed)
    train(cfg, corpus, root / "tok", run_dir)
    return run_dir


def retrain(root: Path, run_dir: Path, seed: int) -> None:
    """The run's model file replaced by another training's (as a new training of the run
    id leaves it: a new file, renamed into place)."""
    other = train_model(root, root / f"other-{seed}", seed)
    os.replace(other / "model.safetensors", run_dir / "model.safetensors")


def test_the_model_cache_reuses_a_model_and_reloads_a_retrained_one(tmp_path: Path) -> None:
    from trainer.evaluate import ModelCache

    run_dir = train_model(tmp_path, tmp_path / "run", seed=1)
    cache = ModelCache(capacity=2)
    first = cache.get(run_dir, "cpu")
    assert cache.get(run_dir, "cpu") is first
    assert cache.loads == 1
    retrain(tmp_path, run_dir, seed=2)
    second = cache.get(run_dir, "cpu")
    assert second is not first
    assert cache.loads == 2
    assert len(cache) == 1  # the stale model was dropped, not kept beside the new one
    assert cache.get(run_dir, "cpu") is second


class _Scored(msgspec.Struct):
    loss: float


class _Answer(msgspec.Struct):
    ok: bool
    result: _Scored


async def wait_answer(redis: aioredis.Redis, keys: Keys, request_id: str) -> _Scored:
    deadline = time.monotonic() + 120
    while (raw := await redis.get(keys.result(request_id))) is None:
        assert time.monotonic() < deadline, f"no answer to {request_id}"
        await asyncio.sleep(0.05)
    answer = msgspec.json.decode(raw, type=_Answer)
    assert answer.ok
    return answer.result


async def test_requests_on_a_run_reuse_its_model_until_it_is_retrained(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    run_dir = train_model(tmp_path, settings.run_dir("run-warm"), seed=1)
    actor = EvaluatorActor(settings)
    rt = Runtime(actor, redis, keys=keys, consumer="e-0", config=CONFIG)
    running = asyncio.create_task(rt.run())
    text = TEXT.splitlines()[0]

    async def score(n: int) -> float:
        rid = f"score-{n}"
        cmd = ModelScore(command_id=rid, run_id="run-warm", request_id=rid, text=text)
        await redis.xadd(keys.cmd("evaluator"), {FIELD: encode(cmd)})
        return (await wait_answer(redis, keys, rid)).loss

    try:
        first = await score(1)
        assert await score(2) == first
        assert await actor.requests.run(cache_loads) == 1  # the second request reused it
        retrain(tmp_path, run_dir, seed=2)
        retrained = await score(3)
        assert retrained != first
        assert await actor.requests.run(cache_loads) == 2
    finally:
        rt.stop()
        await running


# --------------------------------------------------------------------------- the trainer


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


@pytest.fixture
def trainer_settings(tmp_path: Path) -> Settings:
    """A data dir with an ingested corpus "c1" and a char tokenizer "t1"."""
    from trainer.corpus import CorpusConfig, prepare_corpus
    from trainer.tokenizer import TokenizerConfig, train_tokenizer

    settings = Settings(data_dir=tmp_path / "data")
    source = tmp_path / "text.txt"
    source.write_text(TEXT * 3, encoding="utf-8")
    prepare_corpus(source, settings.corpus_dir("c1"), CorpusConfig())
    train_tokenizer(
        settings.corpus_dir("c1"),
        settings.tokenizer_dir("t1"),
        TokenizerConfig(tokenizer_kind="char", min_frequency=1),
    )
    return settings


async def test_the_trainer_trains_in_a_child_started_before_the_run(
    redis: aioredis.Redis, keys: Keys, trainer_settings: Settings
) -> None:
    log.configure()  # the runtime writes the run's log lines (with the child's pid)
    actor = TrainerActor(trainer_settings)
    runs_dir = trainer_settings.data_dir / "runs"
    rt = Runtime(actor, redis, keys=keys, consumer="t-0", config=CONFIG, runs_dir=runs_dir)
    running = asyncio.create_task(rt.run())
    nxt: int | None = None
    try:
        while actor.spare_pid() is None:  # start() spawned it
            await asyncio.sleep(0.01)
        spare = actor.spare_pid()
        cmd = ModelTrain(
            command_id="train-1",
            run_id="run-spare",
            corpus_id="c1",
            tokenizer_id="t1",
            model_family="char_lstm",
            model_size="tiny",
            max_seq_len=32,
            batch_size=4,
            max_steps=2,
            eval_every=2,
            checkpoint_every=2,
            threads=1,
            device="cpu",
            precision="fp32",
        )
        await redis.xadd(keys.cmd("trainer"), {FIELD: encode(cmd)})
        deadline = time.monotonic() + 180
        while await redis.hget(keys.run("run-spare"), "status") != b"completed":
            assert time.monotonic() < deadline, "the run did not complete"
            await asyncio.sleep(0.1)
        lines = (runs_dir / "run-spare" / "logs.jsonl").read_text().splitlines()
        pids = [
            line["pid"]
            for line in map(msgspec.json.decode, lines)
            if isinstance(line, dict) and line.get("event") == "training child started"
        ]
        assert pids == [spare]
        assert spare is not None and not alive(spare)  # one child, one run
        nxt = actor.spare_pid()
        assert nxt is not None and nxt != spare and alive(nxt)  # ready for the next run
    finally:
        rt.stop()
        await running
    assert nxt is not None and not alive(nxt)  # stopped with the actor
