"""The control endpoint, black-box: a real loopback server and the real Redis.

The success paths that need no actor are here; where a run must have got further, the test
writes the events (or result keys, files) the actors would have written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from actors.runtime.config import Settings
from actors.runtime.connection import stream_entries
from actors.runtime.outcome import add_event
from actors.web.app import ROUTES, bound_url, create_app, serve
from actors.web.http import field_of
from protocol.codec import FIELD, any_command_decoder, decode_event
from protocol.commands import (
    ArtifactUpload,
    Command,
    CorpusIngest,
    ModelChat,
    ModelEvaluate,
    ModelGenerate,
    ModelScore,
    ModelTrain,
    TokenizerTrain,
)
from protocol.events import (
    AnyEvent,
    ArtifactStored,
    CancelRequested,
    RunCompleted,
    RunQueued,
    StepStarted,
    TrainProgress,
)
from protocol.keys import ACTOR_NAMES, ActorName, Keys
from protocol.settings import GenerateSettings, SamplingSettings
from tests.http_helpers import Served, read_sse, sse_messages, start_app

DISCORD_BODY: dict[str, object] = {
    "model_family": "gpt2",
    "model_size": "small",
    "max_seq_len": 512,
    "num_epochs": 3,
    "batch_size": 4,
    "learning_rate": 0.0005,
    "corpus_path": "",
    "tokenizer_id": "",
    "user_id": 1234,
}


@pytest.fixture
def settings(keys: Keys, tmp_path: Path) -> Settings:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "tiny.txt").write_text("to be or not to be\n" * 20, encoding="utf-8")
    (root / "books").mkdir()
    (root / "books" / "a.txt").write_text("a book\n" * 5, encoding="utf-8")
    return Settings(prefix=keys.prefix, data_dir=tmp_path / "data", corpus_root=root)


@pytest.fixture
async def http(settings: Settings, redis_url: str) -> AsyncIterator[Served]:
    async with start_app(settings, redis_url) as served:
        yield served


async def commands(redis: aioredis.Redis, keys: Keys, actor: ActorName) -> list[Command]:
    entries = stream_entries(await redis.xrange(keys.cmd(actor)))
    return [any_command_decoder.decode(fields[FIELD.encode()]) for _, fields in entries]


async def events(redis: aioredis.Redis, keys: Keys) -> list[AnyEvent]:
    entries = stream_entries(await redis.xrange(keys.events))
    return [decode_event(fields[FIELD.encode()]) for _, fields in entries]


async def emit(redis: aioredis.Redis, keys: Keys, *evs: AnyEvent) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for event in evs:
            add_event(pipe, keys, event)
        await pipe.execute()


async def make_run(
    redis: aioredis.Redis, keys: Keys, run_id: str, *, completed: bool = False
) -> None:
    """A run as submit + the actors would leave it: queued, or completed."""
    await emit(redis, keys, RunQueued(run_id=run_id, steps=["ingest", "trainer"]))
    await redis.zadd(keys.runs, {run_id: time.time()})
    if completed:
        await emit(redis, keys, RunCompleted(run_id=run_id))


async def error_of(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, str]:
    """Checks the standard error format and returns the body."""
    body = await resp.json()
    assert resp.status == status, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body  # type: ignore[no-any-return]  # aiohttp's json() is untyped


# ----------------------------------------------------------------------------- submitting


async def test_the_discord_bots_train_body_queues_a_run(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    body = {**DISCORD_BODY, "corpus_path": str(settings.corpus_root / "tiny.txt")}
    async with http.session.post("/runs/train", json=body) as resp:
        created = await resp.json()
        assert resp.status == 202, created
        assert resp.headers["Location"] == f"/runs/{created['run_id']}"
    run_id = created["run_id"]
    assert created["job_id"] == run_id
    assert created["steps"] == ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]

    [ingest] = await commands(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest)
    assert (ingest.run_id, ingest.path, ingest.user_id) == (run_id, "tiny.txt", 1234)
    tok, trainer, evaluator, uploader = ingest.rest
    assert isinstance(tok, TokenizerTrain) and tok.tokenizer_kind == "bpe"
    assert isinstance(trainer, ModelTrain)
    assert (trainer.model_family, trainer.model_size, trainer.max_seq_len) == ("gpt2", "small", 512)
    assert (trainer.num_epochs, trainer.batch_size, trainer.learning_rate) == (3, 4, 0.0005)
    assert trainer.tokenizer_id == tok.tokenizer_id == created["tokenizer_id"]
    assert isinstance(evaluator, ModelEvaluate) and isinstance(uploader, ArtifactUpload)

    [queued] = await events(redis, keys)
    assert isinstance(queued, RunQueued) and queued.run_id == run_id
    async with http.session.get(f"/runs/{run_id}") as resp:
        state = await resp.json()
    assert resp.status == 200
    assert (state["run_id"], state["status"], state["user_id"]) == (run_id, "queued", 1234)
    assert state["last_heartbeat_ts"] is None and state["message"] == "queued"
    async with http.session.get("/runs", params={"limit": "5"}) as resp:
        listed = await resp.json()
    assert [r["run_id"] for r in listed["runs"]] == [run_id]


async def test_run_ids_are_unique(http: Served, redis: aioredis.Redis, keys: Keys) -> None:
    body = {"corpus_path": "books", "upload": False}
    ids = set()
    for _ in range(5):
        async with http.session.post("/runs/train", json=body) as resp:
            assert resp.status == 202
            ids.add((await resp.json())["run_id"])
    assert len(ids) == 5
    ingested = await commands(redis, keys, "ingest")
    assert {c.run_id for c in ingested if isinstance(c, CorpusIngest)} == ids


async def test_train_with_a_named_corpus_and_an_existing_tokenizer(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    await redis.hset(keys.tokenizer("tok-ready"), mapping={"status": "ready", "kind": "bpe"})
    body = {"corpus_name": "shakespeare", "tokenizer_id": "tok-ready", "model_size": "tiny"}
    async with http.session.post("/runs/train", json=body) as resp:
        created = await resp.json()
        assert resp.status == 202, created
    assert created["tokenizer_id"] == "tok-ready"
    assert created["steps"] == ["ingest", "trainer", "evaluator", "uploader"]
    [ingest] = await commands(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest) and ingest.named == "shakespeare"

    # Only the record counts: a tokenizer folder on the endpoint's own disk is not looked at.
    (settings.tokenizer_dir("tok-on-disk")).mkdir(parents=True)
    for tok_id, status in (("tok-missing", None), ("tok-busy", "training"), ("tok-on-disk", None)):
        if status:
            await redis.hset(keys.tokenizer(tok_id), "status", status)
        async with http.session.post("/runs/train", json={**body, "tokenizer_id": tok_id}) as r:
            err = await error_of(r, 422, "INVALID_INPUT")
        assert err["field"] == "tokenizer_id" and tok_id in err["message"]


async def test_pretrained_run_must_exist_and_be_completed(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    body = {"corpus_path": "tiny.txt", "pretrained_run_id": "run-base"}
    async with http.session.post("/runs/train", json=body) as resp:
        assert (await error_of(resp, 422, "INVALID_INPUT"))["field"] == "pretrained_run_id"
    await make_run(redis, keys, "run-base")
    async with http.session.post("/runs/train", json=body) as resp:
        assert "queued" in (await error_of(resp, 422, "INVALID_INPUT"))["message"]
    await emit(redis, keys, RunCompleted(run_id="run-base"))
    async with http.session.post("/runs/train", json=body) as resp:
        assert resp.status == 202
    [ingest] = await commands(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest) and ingest.rest[1].pretrained_run_id == "run-base"  # type: ignore[union-attr]  # rest[1] is the ModelTrain


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"corpus_path": "../outside.txt"}, "corpus_path", "outside the corpus root"),
        ({"corpus_path": "/etc/hostname"}, "corpus_path", "outside the corpus root"),
        ({"corpus_path": "escape.txt"}, "corpus_path", "outside the corpus root"),
        ({"corpus_path": "nope.txt"}, "corpus_path", "does not exist"),
        ({"corpus_path": "x" * 300}, "corpus_path", "invalid corpus path"),
        ({"corpus_path": "a\u0000b"}, "corpus_path", "invalid"),
        ({}, "corpus_path", "exactly one of"),
        ({"corpus_path": "tiny.txt", "corpus_name": "shakespeare"}, "corpus_name", "exactly one"),
        ({"corpus_name": "dickens"}, "corpus_name", "known: shakespeare"),
        ({"corpus_file_id": "abc"}, "corpus_file_id", "MT_DATA_BANK_URL"),
    ],
)
async def test_corpus_sources_are_checked_and_confined(
    http: Served,
    settings: Settings,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
    body: dict[str, str],
    field: str,
    words: str,
) -> None:
    (tmp_path / "outside.txt").write_text("secret\n")
    os.symlink(tmp_path / "outside.txt", settings.corpus_root / "escape.txt")
    for route in ("/runs/train", "/tokenizers/train"):
        async with http.session.post(route, json=body) as resp:
            err = await error_of(resp, 422, "INVALID_INPUT")
        assert err["field"] == field and words in err["message"], err
    assert await redis.exists(keys.cmd("ingest")) == 0


async def test_symlinks_that_stay_inside_the_root_are_fine(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    os.symlink(settings.corpus_root / "books", settings.corpus_root / "shelf")
    async with http.session.post("/tokenizers/train", json={"corpus_path": "shelf/a.txt"}) as r:
        assert r.status == 202
    [ingest] = await commands(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest) and ingest.path == "books/a.txt"


# ------------------------------------------------------------------------- request errors


async def test_bad_bodies_get_400_and_422_naming_the_field(http: Served) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.session.post("/runs/train", data=b'{"corpus_path": ', headers=headers) as resp:
        await error_of(resp, 400, "INVALID_JSON")
    cases: list[tuple[str, object, str]] = [
        ("/runs/train", {"corpus_path": "tiny.txt", "num_epochs": 0}, "num_epochs"),
        ("/runs/train", {"corpus_path": "tiny.txt", "num_epochs": "3"}, "num_epochs"),
        ("/runs/train", {"corpus_path": "tiny.txt", "model_family": "gpt5"}, "model_family"),
        ("/runs/train", {"corpus_path": "tiny.txt", "learning_rate": 0}, "learning_rate"),
        ("/runs/train", {"corpus_path": "tiny.txt", "colour": "red"}, "colour"),
        ("/runs/train", {"corpus_path": "tiny.txt", "tokenizer_id": "../x"}, "tokenizer_id"),
        ("/tokenizers/train", {"corpus_path": "tiny.txt", "vocab_size": 1}, "vocab_size"),
    ]
    for route, body, field in cases:
        async with http.session.post(route, json=body) as resp:
            err = await error_of(resp, 422, "INVALID_INPUT")
        assert err["field"] == field and field in err["message"], err
    async with http.session.post("/runs/train", json=[1, 2]) as resp:
        assert "object" in (await error_of(resp, 422, "INVALID_INPUT"))["message"]


async def test_missing_required_field_and_nested_errors(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-done", completed=True)
    async with http.session.post("/runs/run-done/score", json={}) as resp:
        assert (await error_of(resp, 422, "INVALID_INPUT"))["field"] == "text"
    async with http.session.post("/runs/run-done/generate", json={"stop": ["ok", ""]}) as resp:
        assert (await error_of(resp, 422, "INVALID_INPUT"))["field"] == "stop[1]"
    assert field_of("Object contains unknown field `x` - at `$.a`") == "a.x"


async def test_an_oversized_body_is_413(http: Served) -> None:
    body = json.dumps({"corpus_path": "tiny.txt", "pad": "x" * (2 * 1024 * 1024)}).encode()
    headers = {"Content-Type": "application/json"}
    async with http.session.post("/runs/train", data=body, headers=headers) as resp:
        await error_of(resp, 413, "PAYLOAD_TOO_LARGE")


async def test_unknown_routes_methods_and_runs(http: Served) -> None:
    async with http.session.get("/nope") as resp:
        await error_of(resp, 404, "NOT_FOUND")
    async with http.session.delete("/runs/train") as resp:
        await error_of(resp, 405, "METHOD_NOT_ALLOWED")
        assert "POST" in resp.headers["Allow"]
    gets = [
        "/runs/run-x",
        "/runs/run-x/logs",
        "/runs/run-x/logs/stream",
        "/runs/run-x/events",
        "/runs/run-x/eval",
        "/runs/run-x/artifact",
        "/runs/run-x/score/req-1",
        "/runs/run-x/chat/sess-1",
        "/runs/bad%20id",
        "/tokenizers/tok-x",
        "/artifacts/run/run-x",
        "/artifacts/model/run-x",
        "/artifacts/run/..%2Fx",
    ]
    for path in gets:
        async with http.session.get(path) as resp:
            await error_of(resp, 404, "NOT_FOUND")
    for path in ("/runs/run-x/cancel", "/runs/run-x/score", "/runs/run-x/evaluate"):
        async with http.session.post(path, json={"text": "hi"}) as resp:
            await error_of(resp, 404, "NOT_FOUND")


async def test_request_id_is_echoed_or_replaced(http: Served) -> None:
    async with http.session.get("/healthz", headers={"X-Request-ID": "abc-1.2_3"}) as resp:
        assert resp.headers["X-Request-ID"] == "abc-1.2_3"
    for bad in ("x" * 129, "no spaces", "semi;colon", ""):
        async with http.session.get("/runs/r-1", headers={"X-Request-ID": bad}) as resp:
            err = await error_of(resp, 404, "NOT_FOUND")
        assert err["request_id"] != bad and len(err["request_id"]) == 32
    async with http.session.get("/healthz") as resp:
        assert len(resp.headers["X-Request-ID"]) == 32


async def test_api_key_is_required_when_configured(settings: Settings, redis_url: str) -> None:
    with_key = dataclasses.replace(settings, api_key="s3cret")
    async with start_app(with_key, redis_url) as http:
        for headers in ({}, {"X-Api-Key": "wrong"}, {"X-Api-Key": "s3cret-but-longer"}):
            async with http.session.get("/runs", headers=headers) as resp:
                await error_of(resp, 401, "UNAUTHORIZED")
            async with http.session.post("/runs/train", json={}, headers=headers) as resp:
                await error_of(resp, 401, "UNAUTHORIZED")
        async with http.session.get("/runs", headers={"X-Api-Key": "s3cret"}) as resp:
            assert resp.status == 200
        # EventSource cannot send headers: GET takes ?api_key= too (POST does not).
        async with http.session.get("/runs", params={"api_key": "s3cret"}) as resp:
            assert resp.status == 200
        async with http.session.get("/runs", params={"api_key": "nope"}) as resp:
            await error_of(resp, 401, "UNAUTHORIZED")
        async with http.session.post("/runs/r-1/cancel", params={"api_key": "s3cret"}) as resp:
            await error_of(resp, 401, "UNAUTHORIZED")
        async with http.session.get("/healthz") as resp:
            assert resp.status == 200
        async with http.session.get("/readyz") as resp:
            assert resp.status == 503  # not 401: health needs no key
        async with http.session.get("/openapi.json", headers={"X-Api-Key": "s3cret"}) as resp:
            assert (await resp.json())["security"] == [{"ApiKey": []}, {"ApiKeyQuery": []}]


async def test_an_unexpected_error_is_a_500_without_details(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await redis.hset(keys.run("run-corrupt"), mapping={"status": "queued", "epoch": "[oops"})
    async with http.session.get("/runs/run-corrupt") as resp:
        err = await error_of(resp, 500, "INTERNAL_ERROR")
    assert "Traceback" not in err["message"] and "oops" not in err["message"]


# ------------------------------------------------------------------------ cancel, results


async def test_cancel_sets_the_flag_and_records_the_request(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-c")
    async with http.session.post("/runs/run-c/cancel") as resp:
        assert resp.status == 202
        assert await resp.json() == {"run_id": "run-c", "status": "cancellation-requested"}
    assert await redis.get(keys.cancel("run-c")) == b"1"
    assert 0 < await redis.ttl(keys.cancel("run-c")) <= 14 * 24 * 3600
    async with http.session.post("/runs/run-c/cancel") as resp:
        assert resp.status == 202  # idempotent: no second event
    assert [type(e) for e in await events(redis, keys)] == [RunQueued, CancelRequested]
    async with http.session.get("/runs/run-c") as resp:
        assert (await resp.json())["message"] == "cancel requested"

    await make_run(redis, keys, "run-over", completed=True)
    async with http.session.post("/runs/run-over/cancel") as resp:
        assert "completed" in (await error_of(resp, 409, "CONFLICT"))["message"]
    assert not await redis.exists(keys.cancel("run-over"))


async def test_score_is_queued_and_its_result_read_back(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-q")
    async with http.session.post("/runs/run-q/score", json={"text": "hello"}) as resp:
        assert "queued" in (await error_of(resp, 409, "CONFLICT"))["message"]
    await emit(redis, keys, RunCompleted(run_id="run-q"))
    body = {"text": "hello there", "detail": True, "top_k": 3, "user_id": 7}
    async with http.session.post("/runs/run-q/score", json=body) as resp:
        accepted = await resp.json()
        assert resp.status == 202, accepted
    request_id = accepted["request_id"]
    assert accepted["run_id"] == "run-q" and accepted["status"] == "pending"
    [cmd] = await commands(redis, keys, "evaluator")
    assert isinstance(cmd, ModelScore)
    assert (cmd.request_id, cmd.run_id, cmd.text, cmd.detail, cmd.top_k, cmd.user_id) == (
        request_id,
        "run-q",
        "hello there",
        True,
        3,
        7,
    )

    path = f"/runs/run-q/score/{request_id}"
    async with http.session.get(path) as resp:
        assert resp.status == 202
        assert await resp.json() == {"request_id": request_id, "status": "pending"}
    for unknown in ("/runs/run-q/score/score-never-sent", f"/runs/run-q/generate/{request_id}"):
        async with http.session.get(unknown) as resp:  # not pending forever: unknown
            await error_of(resp, 404, "NOT_FOUND")
    result = {"ok": True, "what": "score", "result": {"loss": 2.0, "perplexity": 7.39}}
    await redis.set(keys.result(request_id), json.dumps(result))
    # Upstream's flat fields beside ours (what the detail-less result has of them).
    upstream = {"loss": 2.0, "perplexity": 7.39, "surprisal": None, "topk": None, "tokens": None}
    async with http.session.get(path) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            **result,
            **upstream,
            "request_id": request_id,
            "status": "completed",
        }
    async with http.session.get(f"/runs/run-q/generate/{request_id}") as resp:
        await error_of(resp, 404, "NOT_FOUND")  # a score result is not a generate result

    for kind, status in (("user", 422), ("system", 502)):
        failed = {"ok": False, "what": "score", "error_kind": kind, "message": "text too long"}
        await redis.set(keys.result(request_id), json.dumps(failed))
        async with http.session.get(path) as resp:
            err = await error_of(resp, status, "REQUEST_FAILED")
        assert err["message"] == "text too long" and err["error_kind"] == kind


async def test_generate_evaluate_and_chat_are_queued(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    await make_run(redis, keys, "run-g", completed=True)
    gen = {
        "prompt": "Once",
        "max_new_tokens": 5,
        "stop": ["\n"],
        "num_return_sequences": 2,
        "stop_on_eos": False,
    }
    async with http.session.post("/runs/run-g/generate", json=gen) as resp:
        gen_id = (await resp.json())["request_id"]
        assert resp.status == 202
    async with http.session.post("/runs/run-g/evaluate", json={"split": "validation"}) as resp:
        eval_id = (await resp.json())["request_id"]
        assert resp.status == 202
    async with http.session.post("/runs/run-g/evaluate", json={"path": "books/a.txt"}) as resp:
        assert resp.status == 202
    (tmp_path / "secret.txt").write_text("x\n")
    async with http.session.post("/runs/run-g/evaluate", json={"path": "../secret.txt"}) as r:
        assert (await error_of(r, 422, "INVALID_INPUT"))["field"] == "path"
    async with http.session.post("/runs/run-g/chat", json={"message": "hi"}) as resp:
        first = await resp.json()
        assert resp.status == 202
    body = {"message": "more", "session_id": first["session_id"]}
    async with http.session.post("/runs/run-g/chat", json=body) as resp:
        second = await resp.json()
    assert second["session_id"] == first["session_id"]
    assert second["request_id"] != first["request_id"]

    g, e1, e2, c1, c2 = await commands(redis, keys, "evaluator")
    assert isinstance(g, ModelGenerate) and g.request_id == gen_id
    assert (g.prompt, g.max_new_tokens, g.stop, g.num_return_sequences, g.stop_on_eos) == (
        "Once",
        5,
        ["\n"],
        2,
        False,
    )
    assert isinstance(e1, ModelEvaluate) and (e1.request_id, e1.split) == (eval_id, "validation")
    assert isinstance(e2, ModelEvaluate) and e2.path == "books/a.txt"
    assert isinstance(c1, ModelChat) and isinstance(c2, ModelChat)
    assert c1.session_id == c2.session_id == first["session_id"] and c2.message == "more"

    async with http.session.get(f"/runs/run-g/evaluate/{eval_id}") as resp:
        assert resp.status == 202
    session = first["session_id"]
    chat_path = f"/runs/run-g/chat/{session}"
    async with http.session.get(chat_path) as resp:
        await error_of(resp, 404, "NOT_FOUND")
    async with http.session.get(f"{chat_path}/{c1.request_id}") as resp:
        assert resp.status == 202
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    await redis.rpush(keys.chat("run-g", session), *(json.dumps(m) for m in history))
    reply = {"reply": "hello", "session_id": session, "history": history}
    await redis.set(
        keys.result(c1.request_id), json.dumps({"ok": True, "what": "chat", "result": reply})
    )
    async with http.session.get(chat_path) as resp:
        assert await resp.json() == {"session_id": session, "run_id": "run-g", "messages": history}
    async with http.session.get(f"{chat_path}/{c1.request_id}") as resp:
        assert (await resp.json())["result"]["reply"] == "hello"
    async with http.session.delete(chat_path) as resp:
        assert resp.status == 200
    async with http.session.delete(chat_path) as resp:
        await error_of(resp, 404, "NOT_FOUND")


async def test_a_chat_session_is_a_404_through_another_run(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-a", completed=True)
    await make_run(redis, keys, "run-b", completed=True)
    async with http.session.post("/runs/run-b/chat", json={"message": "hi"}) as resp:
        session = (await resp.json())["session_id"]
        assert resp.status == 202
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "secret"}]
    await redis.rpush(keys.chat("run-b", session), *(json.dumps(m) for m in history))

    async with http.session.get(f"/runs/run-a/chat/{session}") as resp:
        await error_of(resp, 404, "NOT_FOUND")
    async with http.session.delete(f"/runs/run-a/chat/{session}") as resp:
        await error_of(resp, 404, "NOT_FOUND")
    body = {"message": "tell me", "session_id": session}
    async with http.session.post("/runs/run-a/chat", json=body) as resp:
        await error_of(resp, 404, "NOT_FOUND")
    assert len(await commands(redis, keys, "evaluator")) == 1  # nothing queued through run-a

    # Run B's session is untouched and still its own.
    async with http.session.get(f"/runs/run-b/chat/{session}") as resp:
        assert (await resp.json())["messages"] == history
    async with http.session.post("/runs/run-b/chat", json=body) as resp:
        assert resp.status == 202


async def test_eval_and_artifacts_appear_when_written(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-a", completed=True)
    for path in ("/runs/run-a/eval", "/runs/run-a/artifact", "/artifacts/run/run-a"):
        async with http.session.get(path) as resp:
            await error_of(resp, 404, "NOT_FOUND")

    # The evaluator's record, not a folder on the endpoint's disk.
    eval_dir = settings.run_dir("run-a") / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps({"split": "disk", "loss": 9.0}))
    async with http.session.get("/runs/run-a/eval") as resp:
        await error_of(resp, 404, "NOT_FOUND")
    record = {"metrics": {"split": "test", "loss": 1.5}, "samples": [{"prompt": "a", "text": "ab"}]}
    await redis.set(keys.eval("run-a"), json.dumps(record))
    async with http.session.get("/runs/run-a/eval") as resp:
        got = await resp.json()
    assert got["metrics"] == {"split": "test", "loss": 1.5} and got["loss"] == 1.5
    assert got["samples"] == [{"prompt": "a", "text": "ab"}] and got["run_id"] == "run-a"

    archive = settings.artifact_dir() / "run" / "run-a.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"\x1f\x8b" + os.urandom(5000))
    stored = ArtifactStored(run_id="run-a", storage="local", uri=str(archive), size=5002)
    await emit(redis, keys, stored)
    async with http.session.get("/runs/run-a/artifact") as resp:
        pointer = await resp.json()
    assert (pointer["storage"], pointer["size"], pointer["target"]) == ("local", 5002, "run")
    async with http.session.get("/artifacts/run/run-a") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/gzip"
        assert "run-a.tar.gz" in resp.headers["Content-Disposition"]
        assert await resp.read() == archive.read_bytes()
        assert len(resp.headers["X-Request-ID"]) == 32


# -------------------------------------------------------------------------------- tokenizers


async def test_tokenizer_jobs_and_records(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    body = {"corpus_path": "tiny.txt", "tokenizer_kind": "char", "vocab_size": 64}
    async with http.session.post("/tokenizers/train", json=body) as resp:
        created = await resp.json()
        assert resp.status == 202, created
    tok_id = created["tokenizer_id"]
    assert created["steps"] == ["ingest", "tokenizer"] and created["job_id"] == created["run_id"]
    [ingest] = await commands(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest)
    [tok] = ingest.rest
    assert isinstance(tok, TokenizerTrain)
    assert (tok.tokenizer_id, tok.tokenizer_kind, tok.vocab_size) == (tok_id, "char", 64)

    async with http.session.get(f"/tokenizers/{tok_id}") as resp:
        assert (await resp.json())["status"] == "queued"
    stats = json.dumps({"coverage": 0.99, "vocab_size": 40, "note": "x"})
    await redis.hset(
        keys.tokenizer(tok_id),
        mapping={
            "status": "ready",
            "kind": "char",
            "run_id": created["run_id"],
            "stats": stats,
            "path": "/somewhere",
            "created_at": "1700000000.5",
        },
    )
    async with http.session.get(f"/tokenizers/{tok_id}") as resp:
        info = await resp.json()
    assert (info["status"], info["kind"], info["path"]) == ("ready", "char", "/somewhere")
    assert info["stats"] == {"coverage": 0.99, "vocab_size": 40.0}
    settings.tokenizer_dir("tok-disk").mkdir(parents=True)  # no record: the folder is not read
    async with http.session.get("/tokenizers/tok-disk") as resp:
        await error_of(resp, 404, "NOT_FOUND")


# -------------------------------------------------------------------------------- run logs


async def write_log(
    redis: aioredis.Redis, keys: Keys, run_id: str, *lines: dict[str, object] | bytes
) -> list[str]:
    """Lines on the run's log stream, as the actors' run log writes them; their entry ids."""
    ids = []
    for line in lines:
        data = line if isinstance(line, bytes) else json.dumps(line).encode()
        entry_id = await redis.xadd(keys.logs(run_id), {FIELD: data})
        ids.append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
    return ids


def log_line(n: int) -> dict[str, object]:
    return {
        "event": f"step {n}",
        "timestamp": "2025-01-02T03:04:05.123Z",
        "level": "info",
        "run_id": "run-l",
        "loss": 1.25,
    }


async def test_logs_tail_is_readable_text(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-l")
    # A logs.jsonl on the endpoint's own disk is not read.
    path = settings.run_dir("run-l") / "logs.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(log_line(0)) + "\n")
    async with http.session.get("/runs/run-l/logs") as resp:
        await error_of(resp, 404, "NOT_FOUND")
    await write_log(redis, keys, "run-l", *(log_line(i) for i in range(300)), b"not json")
    async with http.session.get("/runs/run-l/logs", params={"tail": "3"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    assert text.splitlines() == [
        "[2025-01-02 03:04:05] INFO step 298 loss=1.25",
        "[2025-01-02 03:04:05] INFO step 299 loss=1.25",
        "not json",
    ]
    async with http.session.get("/runs/run-l/logs") as resp:
        assert len((await resp.text()).splitlines()) == 200
    async with http.session.get("/runs/run-l/logs", params={"tail": "0"}) as resp:
        assert resp.status == 200 and await resp.text() == ""
    for bad in ("x", "-1", "10001"):
        async with http.session.get("/runs/run-l/logs", params={"tail": bad}) as resp:
            assert (await error_of(resp, 422, "INVALID_INPUT"))["field"] == "tail"


async def test_log_stream_sends_the_tail_then_follows_until_the_run_ends(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-l")
    ids = await write_log(redis, keys, "run-l", *(log_line(i) for i in range(5)))
    params = {"tail": "2", "follow": "false"}
    async with http.session.get("/runs/run-l/logs/stream", params=params) as resp:
        assert resp.content_type == "text/event-stream"
        messages = await read_sse(resp)
    assert [m["data"].split()[4] for m in messages[:2]] == ["3", "4"]
    assert [m["id"] for m in messages[:2]] == ids[3:]  # each line's id is its entry id
    assert messages[-1] == {"event": "end", "data": '{"status":"queued"}'}

    async with asyncio.timeout(10):
        params = {"tail": "1", "follow": "true"}
        async with http.session.get("/runs/run-l/logs/stream", params=params) as resp:
            stream = sse_messages(resp)
            assert "step 4" in (await anext(stream))["data"]
            await write_log(redis, keys, "run-l", log_line(5), log_line(6))
            assert "step 5" in (await anext(stream))["data"]
            assert "step 6" in (await anext(stream))["data"]
            await write_log(redis, keys, "run-l", log_line(7))
            await emit(redis, keys, RunCompleted(run_id="run-l"))
            rest = [m async for m in stream]
    assert "step 7" in rest[0]["data"]
    assert rest[-1] == {"event": "end", "data": '{"status":"completed"}'}

    # Resuming with Last-Event-ID sends exactly the lines after it.
    headers = {"Last-Event-ID": ids[4]}
    async with http.session.get("/runs/run-l/logs/stream", headers=headers) as resp:
        resumed = await read_sse(resp)
    assert [m["data"].split()[4] for m in resumed[:-1]] == ["5", "6", "7"]
    headers["Last-Event-ID"] = resumed[-2]["id"]
    params = {"follow": "false"}
    async with http.session.get("/runs/run-l/logs/stream", headers=headers, params=params) as r:
        assert [m.get("event") for m in await read_sse(r)] == ["end"]
    # A byte offset from an endpoint that read logs.jsonl: the whole log again, none missed.
    headers["Last-Event-ID"] = "1234"
    async with http.session.get("/runs/run-l/logs/stream", headers=headers, params=params) as r:
        assert [m["data"].split()[4] for m in (await read_sse(r))[:-1]] == [
            str(i) for i in range(8)
        ]
    # tail=0: no line of the past.
    params = {"tail": "0", "follow": "false"}
    async with http.session.get("/runs/run-l/logs/stream", params=params) as r:
        assert [m.get("event") for m in await read_sse(r)] == ["end"]


async def test_a_failure_inside_a_stream_ends_it_with_an_error_event(
    http: Served, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-l")
    await write_log(redis, keys, "run-l", log_line(0))
    async with asyncio.timeout(10):
        async with http.session.get("/runs/run-l/logs/stream") as resp:
            stream = sse_messages(resp)
            assert "step 0" in (await anext(stream))["data"]
            await redis.hset(keys.run("run-l"), "epoch", "[not json")  # corrupt state
            rest = [m async for m in stream]
    assert [m["event"] for m in rest] == ["error"]
    assert json.loads(rest[0]["data"])["code"] == "INTERNAL_ERROR"


async def test_event_stream_replays_history_and_follows_until_terminal(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-e")
    await make_run(redis, keys, "run-other")
    started = StepStarted(run_id="run-e", step="ingest", command_id="run-e.ingest")
    await emit(redis, keys, started)
    async with http.session.get("/runs/run-e/events", params={"follow": "false"}) as resp:
        history = await read_sse(resp)
    assert [m["event"] for m in history] == ["run.queued", "step.started"]
    assert json.loads(history[1]["data"])["command_id"] == "run-e.ingest"
    ids = [entry_id for entry_id, _ in stream_entries(await redis.xrange(keys.events))]
    assert history[0]["id"] == ids[0] and history[1]["id"] == ids[2]

    async with asyncio.timeout(10):
        async with http.session.get("/runs/run-e/events") as resp:
            stream = sse_messages(resp)
            assert [(await anext(stream))["event"] for _ in range(2)] == [
                "run.queued",
                "step.started",
            ]
            progress = TrainProgress(run_id="run-e", step=1, epoch=0, total_epochs=1, loss=3.0)
            await emit(redis, keys, progress, RunCompleted(run_id="run-other"))
            assert (await anext(stream))["event"] == "train.progress"
            await emit(redis, keys, RunCompleted(run_id="run-e"))
            rest = [m async for m in stream]
    assert [m["event"] for m in rest] == ["run.completed"]

    headers = {"Last-Event-ID": history[1]["id"]}
    async with http.session.get("/runs/run-e/events", headers=headers) as resp:
        resumed = await read_sse(resp)
    assert [m["event"] for m in resumed] == ["train.progress", "run.completed"]


async def test_open_streams_end_when_the_server_shuts_down(
    settings: Settings, redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_run(redis, keys, "run-s")
    runner = web.AppRunner(create_app(settings, redis_url), shutdown_timeout=30.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = bound_url(runner)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/runs/run-s/events") as events_resp,
        session.get(f"{url}/runs/run-s/logs/stream") as logs_resp,
    ):
        assert events_resp.status == logs_resp.status == 200
        first = await anext(sse_messages(events_resp))
        assert first["event"] == "run.queued"
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 5  # not the 30 s shutdown timeout


# ------------------------------------------------------------------ health, docs, serving


async def test_readyz_names_the_actor_kinds_without_a_live_consumer(
    http: Served, redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    async with http.session.get("/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with http.session.get("/readyz") as resp:
        err = await error_of(resp, 503, "NOT_READY")
        assert (await resp.json())["missing"] == list(ACTOR_NAMES)
    assert "trainer" in err["message"]
    for actor in ACTOR_NAMES[:4]:
        await redis.set(keys.heartbeat(actor, f"host-{actor}-0"), "1", ex=30)
    async with http.session.get("/readyz") as resp:
        await error_of(resp, 503, "NOT_READY")
        assert (await resp.json())["missing"] == list(ACTOR_NAMES[4:])
    for actor in ACTOR_NAMES[4:]:
        await redis.set(keys.heartbeat(actor, "h-0"), "1", ex=30)
    await redis.set(keys.heartbeat("trainer", "h-1"), "1", ex=30)
    async with http.session.get("/readyz") as resp:
        ready = await resp.json()
    assert resp.status == 200 and ready["status"] == "ready" and ready["actors"]["trainer"] == 2

    # A Redis that cannot be reached: not ready, but alive.
    async with start_app(settings, "redis://127.0.0.1:1/0") as down:
        async with down.session.get("/readyz") as resp:
            err = await error_of(resp, 503, "NOT_READY")
        assert err["reason"] == "redis-unavailable"
        async with down.session.get("/healthz") as resp:
            assert resp.status == 200
        async with down.session.get("/runs/run-1") as resp:
            await error_of(resp, 503, "UNAVAILABLE")


async def test_openapi_is_generated_from_the_request_types(http: Served) -> None:
    async with http.session.get("/openapi.json") as resp:
        doc = await resp.json()
    schemas = doc["components"]["schemas"]
    for op, _ in ROUTES:
        entry = doc["paths"][op.path][op.method.lower()]
        if op.method == "POST" and op.body is not None:
            ref = entry["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{op.body.__name__}"
    assert doc["paths"]["/runs/{id}/cancel"]["post"]["responses"]["409"]
    train = doc["paths"]["/runs/train"]["post"]
    assert train["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RunCreated"
    )
    run = doc["paths"]["/runs/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert run["schema"]["$ref"].endswith("/RunState")
    props = schemas["TrainRequest"]["properties"]
    assert props["num_epochs"]["minimum"] == 1 and props["model_family"]["enum"]
    assert {"RunCreated", "RunState", "ErrorBody", "ScoreRequest"} <= set(schemas)
    assert doc["paths"]["/healthz"]["get"]["security"] == []


async def test_serve_reports_its_url_and_stops_when_cancelled(
    settings: Settings, redis_url: str
) -> None:
    ready: asyncio.Queue[str] = asyncio.Queue()

    async def on_ready(url: str) -> None:
        await ready.put(url)

    task = asyncio.create_task(serve(settings, redis_url, "127.0.0.1", 0, on_ready=on_ready))
    async with asyncio.timeout(10):
        url = await ready.get()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz"):
            pass


async def test_every_sampling_setting_of_the_body_reaches_the_command(
    http: Served, redis: aioredis.Redis, keys: Keys
) -> None:
    """The body's settings travel as they are: each field of GenerateSettings (and of
    SamplingSettings for chat), set to a value other than its default, is in the command."""
    await make_run(redis, keys, "run-s", completed=True)
    given: dict[str, object] = {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_k": 3,
        "top_p": 0.9,
        "seed": 11,
        "stop": ["x"],
        "num_return_sequences": 2,
        "stop_on_eos": False,
    }
    assert set(given) == {f.name for f in msgspec.structs.fields(GenerateSettings)}
    sampling = {f.name for f in msgspec.structs.fields(SamplingSettings)}
    async with http.session.post("/runs/run-s/generate", json=given) as resp:
        assert resp.status == 202
    chat = {k: v for k, v in given.items() if k in sampling}
    async with http.session.post("/runs/run-s/chat", json={"message": "hi", **chat}) as resp:
        assert resp.status == 202
    gen, chatted = await commands(redis, keys, "evaluator")
    assert isinstance(gen, ModelGenerate) and isinstance(chatted, ModelChat)
    for name, value in given.items():
        assert getattr(gen, name) == value, name
        if name in sampling:
            assert getattr(chatted, name) == value, name
