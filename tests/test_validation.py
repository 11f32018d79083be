"""Bad commands are refused at once, and upstream's clients are understood.

On the streams: each bad command, XADDed as raw JSON and handled by the real actor, fails as
a user error with one start, before any work, with a message that names the field and no
path of the server. Over HTTP: each bad body is a 422 naming the field; the bodies upstream's
Model-Trainer API takes (nulls, its names) are accepted, and the results carry its fields.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors.runtime.config import Settings
from actors.runtime.connection import stream_entries
from actors.runtime.outcome import add_event
from actors.runtime.streams import Actor, Runtime, RuntimeConfig
from actors.workers.evaluator import EvaluatorActor
from actors.workers.ingest import IngestActor
from actors.workers.tokenizer import TokenizerActor
from actors.workers.trainer import TrainerActor
from actors.workers.uploader import UploaderActor
from protocol.codec import FIELD, any_command_decoder, decode_event
from protocol.commands import (
    Command,
    CorpusIngest,
    ModelChat,
    ModelEvaluate,
    ModelGenerate,
    ModelScore,
    ModelTrain,
    TokenizerTrain,
)
from protocol.events import AnyEvent, RunCompleted, RunFailed, RunQueued, StepStarted
from protocol.keys import ActorName, Keys
from tests.helpers_ml import char_tokenizer, small_corpus, tiny_config
from tests.http_helpers import Served, start_app
from trainer.corpus import CorpusConfig, prepare_corpus
from trainer.train import train

pytestmark = pytest.mark.timeout(300)

CONFIG = RuntimeConfig(lease_s=30.0, block_ms=50, backoff_s=0.05, grace_s=5.0)
RUN = "run-ok"  # has a (barely) trained model


@dataclass(frozen=True)
class Root:
    """A data dir with one trained run and one ingested corpus, and a corpus root beside it."""

    tmp: Path
    data: Path
    corpus_root: Path

    def settings(self, keys: Keys, data_bank_url: str | None = None) -> Settings:
        return Settings(
            prefix=keys.prefix,
            data_dir=self.data,
            corpus_root=self.corpus_root,
            data_bank_url=data_bank_url,
        )

    def server_paths(self) -> list[str]:
        return [str(self.tmp), str(self.tmp.resolve())]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Root:
    tmp = tmp_path_factory.mktemp("validation")
    corpus = small_corpus(tmp / "split")
    tok = char_tokenizer(corpus, tmp / "tok")
    settings = Settings(data_dir=tmp / "data", corpus_root=tmp / "corpus")
    train(
        tiny_config("char_lstm", max_steps=2, eval_every=2, checkpoint_every=2),
        corpus,
        tok,
        settings.run_dir(RUN),
    )
    text = "".join(f"{line}\n" for line in (corpus / "train.txt").read_text().splitlines())
    root = settings.corpus_root
    (root / "books").mkdir(parents=True)
    (root / "books" / "a.txt").write_text(text)
    (root / "tiny.txt").write_text(text)
    (root / "prompt.txt").write_text("The river")
    (tmp / "outside.txt").write_text(text)
    prepare_corpus(root / "tiny.txt", settings.corpus_dir("corpus-ok"), CorpusConfig())
    return Root(tmp, settings.data_dir, root)


async def events_of(redis: aioredis.Redis, keys: Keys) -> list[AnyEvent]:
    entries = stream_entries(await redis.xrange(keys.events))
    return [decode_event(fields[FIELD.encode()]) for _, fields in entries]


async def handle_raw(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    name: ActorName,
    body: dict[str, object],
) -> None:
    """XADD the command as raw JSON and let the real actor handle what is queued (with the
    per-run logs that `up` writes, which make a run's folder as soon as it is named)."""
    await redis.xadd(keys.cmd(name), {FIELD: json.dumps(body)})
    actor = actor_for(name, settings)
    runs_dir = settings.data_dir / "runs"
    rt = Runtime(actor, redis, keys=keys, consumer=f"{name}-0", config=CONFIG, runs_dir=runs_dir)
    try:
        await asyncio.wait_for(rt.run(until_idle=True), 120)
    finally:
        await actor.stop()


def header(kind: str, run_id: str) -> dict[str, object]:
    return {"kind": kind, "command_id": f"{run_id}.{kind}", "run_id": run_id}


def _bpe_too_small(run_id: str) -> dict[str, object]:
    return {
        **header("tokenizer.train", run_id),
        "tokenizer_id": f"{run_id}-tok",
        "corpus_id": "corpus-ok",
        "tokenizer_kind": "bpe",
        "vocab_size": 100,
    }


# (actor, the command's fields past its header, field named, words of the message)
BAD_COMMANDS: dict[str, tuple[ActorName, dict[str, object], str, str]] = {
    "evaluate outside the root": (
        "evaluator",
        {"kind": "model.evaluate", "path": "../outside.txt"},
        "path",
        "outside the corpus root",
    ),
    "evaluate an absolute path": (
        "evaluator",
        {"kind": "model.evaluate", "path": "/etc/hostname"},
        "path",
        "outside the corpus root",
    ),
    "evaluate a folder": (
        "evaluator",
        {"kind": "model.evaluate", "path": "books"},
        "path",
        "is a folder",
    ),
    "upload an unknown run": (
        "uploader",
        {"kind": "artifact.upload"},
        "run_id",
        "no trained model",
    ),
    "bpe vocabulary below 260": (
        "tokenizer",
        {"kind": "tokenizer.train", "tokenizer_kind": "bpe", "vocab_size": 100},
        "vocab_size",
        "260",
    ),
    "a chain whose tokenizer is too small": (
        "ingest",
        {"kind": "corpus.ingest", "path": "tiny.txt", "rest": ["tokenizer"]},
        "vocab_size",
        "260",
    ),
    "fractions that leave nothing to train on": (
        "ingest",
        {
            "kind": "corpus.ingest",
            "path": "tiny.txt",
            "validation_fraction": 0.5,
            "test_fraction": 0.5,
        },
        "test_fraction",
        "below 1",
    ),
    "two corpus sources": (
        "ingest",
        {"kind": "corpus.ingest", "path": "tiny.txt", "named": "shakespeare"},
        "named",
        "exactly one",
    ),
    "two models to fine-tune": (
        "trainer",
        {
            "kind": "model.train",
            "tokenizer_id": "tok",
            "corpus_id": "corpus-ok",
            "pretrained_run_id": RUN,
            "pretrained_path": "runs/x",
        },
        "pretrained_path",
        "not both",
    ),
    "fp16 on the cpu": (
        "trainer",
        {
            "kind": "model.train",
            "tokenizer_id": "tok",
            "corpus_id": "corpus-ok",
            "precision": "fp16",
            "device": "cpu",
        },
        "precision",
        "fp16 needs a CUDA GPU",
    ),
}


def actor_for(name: ActorName, settings: Settings) -> Actor:
    match name:
        case "evaluator":
            return EvaluatorActor(settings)
        case "uploader":
            return UploaderActor(settings)
        case "tokenizer":
            return TokenizerActor(settings)
        case "ingest":
            return IngestActor(settings)
        case "trainer":
            return TrainerActor(settings)
    raise AssertionError(name)


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
async def test_a_bad_stream_command_fails_at_once_as_a_user_error(
    redis: aioredis.Redis, keys: Keys, root: Root, case: str
) -> None:
    name, fields, field, words = BAD_COMMANDS[case]
    settings = root.settings(keys)
    run_id = f"run-bad-{keys.prefix}"
    body: dict[str, object] = {**header(str(fields["kind"]), run_id), **fields}
    if fields["kind"] == "model.evaluate":
        body["run_id"] = RUN  # a run with a model: the path alone is wrong
    if fields["kind"] == "corpus.ingest":
        body["corpus_id"] = f"{run_id}-corpus"
        if body.get("rest"):
            body["rest"] = [_bpe_too_small(run_id)]
    if fields["kind"] == "tokenizer.train":
        body.update(tokenizer_id=f"{run_id}-tok", corpus_id="corpus-ok")
    await handle_raw(redis, keys, settings, name, body)

    events = await events_of(redis, keys)
    started = [e for e in events if isinstance(e, StepStarted)]
    failed = [e for e in events if isinstance(e, RunFailed)]
    assert len(started) == 1, f"{case}: a user error is not retried ({len(started)} starts)"
    assert len(failed) == 1, f"{case}: {[type(e).__name__ for e in events]}"
    assert failed[0].error_kind == "user" and failed[0].step == name
    assert failed[0].message.split()[0].rstrip(":") == field, failed[0].message  # names it
    assert words in failed[0].message, failed[0].message
    assert not any(p in failed[0].message for p in root.server_paths()), failed[0].message
    assert not await redis.exists(keys.tries(str(body["command_id"])))
    # Refused before any work: nothing was made for it.
    assert not await redis.exists(keys.tokenizer(f"{run_id}-tok"))
    assert not settings.corpus_dir(f"{run_id}-corpus").exists()
    assert not (settings.artifact_dir() / "run" / f"{run_id}.tar.gz").exists()
    assert not (settings.run_dir(RUN) / "eval" / "metrics.json").exists()


# ------------------------------------------------------------------------------- over HTTP


async def emit(redis: aioredis.Redis, keys: Keys, *events: AnyEvent) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for event in events:
            add_event(pipe, keys, event)
        await pipe.execute()


@pytest.fixture
async def http(
    redis: aioredis.Redis, keys: Keys, root: Root, redis_url: str
) -> AsyncIterator[Served]:
    settings = root.settings(keys, data_bank_url="http://127.0.0.1:9")
    await emit(
        redis, keys, RunQueued(run_id=RUN, steps=["ingest", "trainer"]), RunCompleted(run_id=RUN)
    )
    async with start_app(settings, redis_url) as served:
        yield served


async def post(http: Served, path: str, body: object) -> tuple[int, dict[str, object]]:
    async with http.session.post(path, json=body) as resp:
        return resp.status, await resp.json()


async def queued(redis: aioredis.Redis, keys: Keys, actor: ActorName) -> list[Command]:
    entries = stream_entries(await redis.xrange(keys.cmd(actor)))
    return [any_command_decoder.decode(fields[FIELD.encode()]) for _, fields in entries]


async def test_bad_http_bodies_are_refused_with_422_naming_the_field(
    http: Served, redis: aioredis.Redis, keys: Keys, root: Root
) -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("/runs/train", {"corpus_path": "tiny.txt", "vocab_size": 259}, "vocab_size"),
        (
            "/runs/train",
            {"corpus_path": "tiny.txt", "vocab_size": 16, "method": "bpe"},
            "vocab_size",
        ),
        ("/tokenizers/train", {"corpus_path": "tiny.txt", "vocab_size": 100}, "vocab_size"),
        (
            "/tokenizers/train",
            {"corpus_path": "tiny.txt", "tokenizer_kind": "sentencepiece", "vocab_size": 8},
            "vocab_size",
        ),
        (
            "/runs/train",
            {"corpus_path": "tiny.txt", "holdout_fraction": 0.5, "test_split_ratio": 0.5},
            "test_split_ratio",
        ),
        (
            "/runs/train",
            {"corpus_path": "tiny.txt", "pretrained_run_id": RUN, "pretrained_path": "x"},
            "pretrained_path",
        ),
        (
            "/runs/train",
            {"corpus_path": "tiny.txt", "precision": "fp16", "device": "cpu"},
            "precision",
        ),
        (
            "/runs/train",
            {"corpus_path": "tiny.txt", "method": "char", "tokenizer_kind": "char"},
            "method",
        ),
        ("/runs/train", {"corpus_path": "tiny.txt", "method": "words"}, "method"),
        ("/runs/train", {"corpus_path": "tiny.txt", "data_num_workers": -1}, "data_num_workers"),
        (f"/runs/{RUN}/evaluate", {"path": "books"}, "path"),
        (f"/runs/{RUN}/evaluate", {"path_override": "../outside.txt"}, "path"),
        (f"/runs/{RUN}/score", {"text": "hi", "path": "tiny.txt"}, "text"),
        (f"/runs/{RUN}/score", {"path": "books"}, "path"),
        (f"/runs/{RUN}/score", {"text": "hi", "detail_level": "everything"}, "detail_level"),
        (f"/runs/{RUN}/generate", {"prompt": "a", "prompt_path": "prompt.txt"}, "prompt_path"),
        (f"/runs/{RUN}/generate", {"prompt_path": "/etc/hostname"}, "prompt_path"),
        (f"/runs/{RUN}/generate", {"prompt_text": "x" * 20_001}, "prompt_text"),
        (f"/runs/{RUN}/generate", {"stop_sequences": ["ok", ""]}, "stop_sequences[1]"),
        (f"/runs/{RUN}/chat", {"message": None}, "message"),
    ]
    for route, body, field in cases:
        status, err = await post(http, route, body)
        assert status == 422 and err["code"] == "INVALID_INPUT", (route, body, err)
        assert err["field"] == field and field in str(err["message"]), (route, body, err)
        assert not any(p in str(err["message"]) for p in root.server_paths()), err
    # The bpe minimum is what a bpe tokenizer needs, no more: 260 and a char 16 pass.
    good: list[dict[str, object]] = [{"vocab_size": 260}, {"vocab_size": 16, "method": "char"}]
    for extra in good:
        status, created = await post(http, "/runs/train", {"corpus_path": "tiny.txt", **extra})
        assert status == 202, created
    assert len(await queued(redis, keys, "ingest")) == 2  # only those two
    assert await queued(redis, keys, "evaluator") == []


async def test_upstreams_bodies_are_accepted_for_every_route(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    train_body = {  # as upstream's clients send it: every optional field, many of them null
        "model_family": "gpt2",
        "model_size": "small",
        "max_seq_len": 16,
        "num_epochs": 1,
        "batch_size": 1,
        "learning_rate": 5e-4,
        "tokenizer_id": "",
        "corpus_file_id": "deadbeef",
        "holdout_fraction": 0.01,
        "seed": 42,
        "pretrained_run_id": None,
        "freeze_embed": False,
        "gradient_clipping": 1.0,
        "optimizer": "adamw",
        "user_id": 7,
        "device": "cpu",
        "precision": "auto",
        "data_num_workers": None,
        "data_pin_memory": True,
        "early_stopping_patience": 5,
        "test_split_ratio": 0.15,
        "finetune_lr_cap": 5e-5,
        "max_steps": None,
    }
    status, created = await post(http, "/runs/train", train_body)
    assert status == 202, created
    tok_body = {
        "method": "char",
        "vocab_size": 128,
        "min_frequency": 2,
        "corpus_file_id": "deadbeef",
        "holdout_fraction": 0.01,
        "seed": 42,
    }
    status, created = await post(http, "/tokenizers/train", tok_body)
    assert status == 202, created
    ingest_run, ingest_tok = await queued(redis, keys, "ingest")
    assert isinstance(ingest_run, CorpusIngest) and isinstance(ingest_tok, CorpusIngest)
    assert (ingest_run.file_id, ingest_run.validation_fraction, ingest_run.test_fraction) == (
        "deadbeef",
        0.01,
        0.15,
    )
    trainer = next(c for c in ingest_run.rest if isinstance(c, ModelTrain))
    assert (trainer.max_steps, trainer.pretrained_run_id, trainer.early_stopping_patience) == (
        None,
        "",
        5,
    )
    assert trainer.user_id == 7 and trainer.device == "cpu"
    [tok] = ingest_tok.rest
    assert isinstance(tok, TokenizerTrain) and (tok.tokenizer_kind, tok.vocab_size) == ("char", 128)

    bodies: list[tuple[str, dict[str, object]]] = [
        ("evaluate", {"split": "validation", "path_override": None}),
        ("evaluate", {"split": "test", "path_override": "books/a.txt"}),
        (
            "score",
            {
                "text": "The river ran",
                "path": None,
                "detail_level": "per_char",
                "top_k": None,
                "seed": None,
            },
        ),
        (
            "score",
            {"text": None, "path": "tiny.txt", "detail_level": "summary", "top_k": 3, "seed": 1},
        ),
        (
            "generate",
            {
                "prompt_text": "The river",
                "prompt_path": None,
                "max_new_tokens": 6,
                "temperature": 0.0,
                "top_k": 50,
                "top_p": 1.0,
                "stop_on_eos": True,
                "stop_sequences": ["zzz"],
                "seed": None,
                "num_return_sequences": 2,
            },
        ),
        ("generate", {"prompt_text": None, "prompt_path": "prompt.txt", "max_new_tokens": 4}),
        (
            "chat",
            {
                "message": "hello",
                "session_id": None,
                "max_new_tokens": 4,
                "temperature": 0.8,
                "top_k": 50,
                "top_p": 0.95,
            },
        ),
    ]
    for route, body in bodies:
        status, accepted = await post(http, f"/runs/{RUN}/{route}", body)
        assert status == 202, (route, body, accepted)
    e1, e2, s1, s2, g1, g2, c1 = await queued(redis, keys, "evaluator")
    assert isinstance(e1, ModelEvaluate) and (e1.split, e1.path) == ("validation", "")
    assert isinstance(e2, ModelEvaluate) and e2.path == "books/a.txt"
    assert isinstance(s1, ModelScore) and (s1.text, s1.detail, s1.top_k) == (
        "The river ran",
        True,
        5,
    )
    assert isinstance(s2, ModelScore) and s2.detail is False and s2.text.startswith("The river ran")
    assert isinstance(g1, ModelGenerate) and (g1.prompt, g1.stop, g1.seed, g1.temperature) == (
        "The river",
        ["zzz"],
        0,
        0.0,
    )
    assert isinstance(g2, ModelGenerate) and g2.prompt == "The river"
    assert isinstance(c1, ModelChat) and c1.session_id


async def test_results_carry_upstreams_fields_beside_ours(
    http: Served, redis: aioredis.Redis, keys: Keys, root: Root
) -> None:
    requests = {
        "evaluate": {"split": "validation", "path_override": "books/a.txt"},
        "score": {"text": "The river ran", "detail_level": "per_char", "top_k": 2},
        "generate": {
            "prompt_text": "The",
            "max_new_tokens": 5,
            "stop_on_eos": True,
            "num_return_sequences": 2,
        },
        "chat": {"message": "hello", "max_new_tokens": 3},
    }
    ids: dict[str, str] = {}
    sessions: dict[str, str] = {}
    for route, body in requests.items():
        status, accepted = await post(http, f"/runs/{RUN}/{route}", body)
        assert status == 202, accepted
        ids[route] = str(accepted["request_id"])
        sessions[route] = str(accepted.get("session_id", ""))
    settings = root.settings(keys)
    actor = EvaluatorActor(settings)
    rt = Runtime(actor, redis, keys=keys, consumer="evaluator-0", config=CONFIG)
    try:
        await asyncio.wait_for(rt.run(until_idle=True), 240)
    finally:
        await actor.stop()

    async def result(route: str) -> dict[str, object]:
        middle = f"chat/{sessions[route]}" if route == "chat" else route
        async with http.session.get(f"/runs/{RUN}/{middle}/{ids[route]}") as resp:
            body: dict[str, object] = await resp.json()
            assert resp.status == 200, body
        assert (
            body["ok"] is True
            and body["status"] == "completed"
            and isinstance(body["result"], dict)
        )
        return body

    ev = await result("evaluate")
    assert isinstance(ev["result"], dict)
    assert ev["loss"] == ev["result"]["loss"] and ev["perplexity"] == ev["result"]["perplexity"]
    assert ev["split"] == "books/a.txt"
    assert ev["result"]["source"] == "books/a.txt"  # as given, never the server's path
    sc = await result("score")
    assert (
        isinstance(sc["result"], dict)
        and isinstance(sc["tokens"], list)
        and isinstance(sc["topk"], list)
    )
    assert sc["loss"] == sc["result"]["loss"] and isinstance(sc["perplexity"], float)
    assert sc["surprisal"] == sc["result"]["surprisal_bits"]
    surprisal = sc["surprisal"]
    assert isinstance(surprisal, list)
    assert len(sc["tokens"]) == len(sc["topk"]) == len(surprisal)
    assert all(len(top) == 2 and isinstance(top[0][0], str) for top in sc["topk"])
    gen = await result("generate")
    assert isinstance(gen["result"], dict) and gen["outputs"] == gen["result"]["samples"]
    assert isinstance(gen["outputs"], list) and len(gen["outputs"]) == 2
    assert isinstance(gen["steps"], int) and 1 <= gen["steps"] <= 5
    assert isinstance(gen["eos_terminated"], list) and len(gen["eos_terminated"]) == 2
    assert all(isinstance(e, bool) for e in gen["eos_terminated"])
    chat = await result("chat")
    assert isinstance(chat["result"], dict) and chat["response"] == chat["result"]["reply"]
    assert chat["session_id"] == sessions["chat"]


async def test_openapi_documents_upstreams_names(http: Served) -> None:
    async with http.session.get("/openapi.json") as resp:
        schemas = (await resp.json())["components"]["schemas"]
    train = schemas["TrainRequest"]
    assert "null" in train["description"]
    props = train["properties"]
    assert props["method"]["enum"] == props["tokenizer_kind"]["enum"]
    assert "tokenizer_kind" in props["method"]["description"]
    for ignored in ("data_num_workers", "data_pin_memory"):
        assert "ignored" in str(props[ignored]), props[ignored]
    assert "method" in schemas["TokenizerTrainRequest"]["properties"]
    documented = {
        "EvaluateRequest": ("path_override",),
        "ScoreRequest": ("path", "detail_level", "seed"),
        "GenerateRequest": ("prompt_text", "prompt_path", "stop_sequences"),
    }
    for name, fields in documented.items():
        assert "null" in schemas[name]["description"]
        for field in fields:
            assert schemas[name]["properties"][field], (name, field)
