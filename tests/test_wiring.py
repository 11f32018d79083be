"""The workers and the store, each on a "machine" of its own (a data dir) sharing only Redis
and a real SeaweedFS: ingest and the tokenizer record their pointers in their commit, the
tokenizer, evaluator and uploader fetch what they lack by pointer, and the uploader puts the
archive into the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime.artifacts import publish, read_pointer
from actors.runtime.config import Settings
from actors.runtime.seaweed import SeaweedS3
from actors.runtime.store import Pointer, make_store
from actors.runtime.streams import Actor, Runtime, RuntimeConfig
from actors.workers.evaluator import EvaluatorActor
from actors.workers.ingest import IngestActor
from actors.workers.tokenizer import TokenizerActor
from actors.workers.uploader import RUN_EXCLUDE, UploaderActor
from protocol.codec import FIELD, decode_event, encode
from protocol.commands import ArtifactUpload, Base, CorpusIngest, ModelEvaluate, TokenizerTrain
from protocol.events import ArtifactPointer, ArtifactStored, EvalCompleted, RunFailed
from protocol.keys import ActorName, Keys
from tests.helpers_ml import char_tokenizer, small_corpus, tiny_config
from tests.test_service import corpus_text
from trainer.train import train

pytestmark = pytest.mark.timeout(300)
CONFIG = RuntimeConfig(lease_s=30.0, block_ms=100, backoff_s=0.05, grace_s=5.0, max_tries=2)


def machine(root: Path, s3: SeaweedS3, keys: Keys) -> Settings:
    env = s3.env(prefix=keys.prefix)
    return Settings(
        data_dir=root / "data",
        corpus_root=root / "corpus",
        prefix=keys.prefix,
        store_url=env["MT_STORE_URL"],
        aws_endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        aws_region=s3.region,
    )


async def handle(
    redis: aioredis.Redis, keys: Keys, name: ActorName, actor: Actor, cmd: Base
) -> None:
    await redis.xadd(keys.cmd(name), {FIELD: encode(cmd)})
    try:
        await Runtime(actor, redis, keys=keys, consumer=f"{name}-0", config=CONFIG).run(
            until_idle=True
        )
    finally:
        await actor.stop()


async def events(redis: aioredis.Redis, keys: Keys) -> list[object]:
    out: list[object] = []
    for _, fields in await redis.xrange(keys.events) or []:
        assert fields is not None
        out.append(decode_event(fields[FIELD.encode()]))
    return out


async def test_ingest_and_tokenizer_on_two_machines(
    redis: aioredis.Redis, keys: Keys, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    a, b = machine(tmp_path / "a", s3_server, keys), machine(tmp_path / "b", s3_server, keys)
    a.corpus_root.mkdir(parents=True)
    (a.corpus_root / "play.txt").write_text(corpus_text()[:8000], encoding="utf-8")

    ingest = CorpusIngest(command_id="r1.ingest", run_id="r1", corpus_id="c1", path="play.txt")
    await handle(redis, keys, "ingest", IngestActor(a), ingest)
    corpus = await read_pointer(redis, keys.corpus("c1"), "stored")
    assert corpus is not None and corpus.key == "corpora/c1" and corpus.backend == "s3"
    assert corpus.kind == "folder" and corpus.size > 0

    tok = TokenizerTrain(
        command_id="r1.tokenizer",
        run_id="r1",
        tokenizer_id="t1",
        corpus_id="c1",
        tokenizer_kind="char",
    )
    assert not b.corpus_dir("c1").exists()
    await handle(redis, keys, "tokenizer", TokenizerActor(b), tok)
    assert not [e for e in await events(redis, keys) if isinstance(e, RunFailed)]
    # B fetched the corpus that A ingested, and stored the tokenizer it trained.
    assert (b.corpus_dir("c1") / "corpus.json").read_bytes() == (
        a.corpus_dir("c1") / "corpus.json"
    ).read_bytes()
    stored = await read_pointer(redis, keys.tokenizer("t1"), "stored")
    assert stored is not None and stored.key == "tokenizers/t1"
    assert await redis.hget(keys.tokenizer("t1"), "status") == b"ready"
    async with make_store(a) as store:
        assert await store.exists(stored)

    # A third machine archives the tokenizer it does not have; the pointer is in its record.
    c = machine(tmp_path / "c", s3_server, keys)
    upload = ArtifactUpload(
        command_id="r1.uploader", run_id="r1", target="tokenizer", tokenizer_id="t1"
    )
    await handle(redis, keys, "uploader", UploaderActor(c), upload)
    assert (c.tokenizer_dir("t1") / "tokenizer.json").is_file()
    raw = await redis.hget(keys.tokenizer("t1"), "artifact")
    assert raw is not None
    art = msgspec.json.decode(raw, type=ArtifactPointer)
    assert (art.storage, art.target, art.key) == (
        "store",
        "tokenizer",
        "artifacts/tokenizer/t1.tar.gz",
    )


async def test_evaluator_and_uploader_fetch_a_run_they_do_not_have(
    redis: aioredis.Redis, keys: Keys, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    # Machine X trains a run and stores it and its corpus, then loses its data dir.
    x = machine(tmp_path / "x", s3_server, keys)
    corpus = small_corpus(x.corpus_dir("c2"))
    tok = char_tokenizer(corpus, x.tokenizer_dir("t2"))
    cfg = tiny_config("char_lstm", max_steps=2, eval_every=2, checkpoint_every=2)
    train(cfg, corpus, tok, x.run_dir("r2"))
    async with make_store(x) as store:
        run = await publish(store, x, x.run_dir("r2"), "runs/r2/model", RUN_EXCLUDE)
        stored_corpus = await publish(store, x, corpus, "corpora/c2")
    await redis.hset(keys.run("r2"), "stored", msgspec.json.encode(run))
    await redis.hset(keys.corpus("c2"), "stored", msgspec.json.encode(stored_corpus))
    shutil.rmtree(x.data_dir)

    c = machine(tmp_path / "c", s3_server, keys)
    evaluate = ModelEvaluate(command_id="r2.evaluator", run_id="r2", split="test")
    await handle(redis, keys, "evaluator", EvaluatorActor(c), evaluate)
    done = [e for e in await events(redis, keys) if isinstance(e, EvalCompleted)]
    failed = [e for e in await events(redis, keys) if isinstance(e, RunFailed)]
    assert len(done) == 1 and not failed, failed
    assert done[0].loss is not None and done[0].split == "test"
    assert (c.run_dir("r2") / "model.safetensors").is_file()  # the run, fetched
    assert (c.corpus_dir("c2") / "test.txt").is_file()  # and the corpus it is evaluated on
    assert not (c.run_dir("r2") / "checkpoints").exists()
    assert await redis.exists(keys.eval("r2"))

    u = machine(tmp_path / "u", s3_server, keys)
    upload = ArtifactUpload(command_id="r2.uploader", run_id="r2")
    await handle(redis, keys, "uploader", UploaderActor(u), upload)
    [stored] = [e for e in await events(redis, keys) if isinstance(e, ArtifactStored)]
    assert stored.storage == "store" and stored.backend == "s3"
    assert stored.key == "artifacts/run/r2.tar.gz"
    assert stored.uri == f"{u.store_url}/artifacts/run/r2.tar.gz"
    assert not list((u.artifact_dir()).rglob("*.tar.gz"))  # no local copy left behind
    pointer = Pointer(backend="s3", key=stored.key, sha256=stored.sha256, size=stored.size)
    async with make_store(u) as store:
        got = await store.get(pointer, tmp_path / "got.tar.gz")
    assert got.stat().st_size == stored.size
    state = await redis.hget(keys.run("r2"), "artifact")
    assert state is not None and msgspec.json.decode(state)["storage"] == "store"


async def test_an_evaluator_without_the_run_or_its_pointer_says_so(
    redis: aioredis.Redis, keys: Keys, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    c = machine(tmp_path / "c", s3_server, keys)
    evaluate = ModelEvaluate(command_id="r3.evaluator", run_id="r3")
    await handle(redis, keys, "evaluator", EvaluatorActor(c), evaluate)
    [failed] = [e for e in await events(redis, keys) if isinstance(e, RunFailed)]
    assert "has no model on this machine and none in the store" in failed.message
