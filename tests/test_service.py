"""The six actors end to end: real Redis, real training on tiny configs.

One module-scoped run goes through the whole chain; the checks of the events, the bot's
messages, the artifacts, the HTTP routes, the CLI and replay read it. The crash, cancel,
bad-input and scale-out tests run runs of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors import service
from actors.client.submit import plan_train, submit
from actors.runtime.config import Settings
from actors.runtime.connection import connect
from actors.runtime.streams import RuntimeConfig
from actors.workers.trainer import train_config
from protocol.codec import FIELD, decode_event
from protocol.commands import ModelTrain
from protocol.events import (
    AnyEvent,
    CorpusReady,
    RunFailed,
    StepStarted,
    TokenizerReady,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
    event_kind,
)
from protocol.keys import ACTOR_NAMES, ActorName, Keys
from protocol.requests import TrainRequest, decode_flat
from tests.helpers_ml import same_weights, train_curve
from tests.http_helpers import read_sse, start_app
from trainer.train import train

pytestmark = pytest.mark.timeout(600)


def corpus_text() -> str:
    """A few hundred lines of real text: the start of a play from the demo corpus."""
    from trainer.corpus import NAMED_CORPORA
    from trainer.formats import strip_markdown

    play = next(p for p in NAMED_CORPORA["shakespeare"]() if p.name == "macbeth.md")
    return strip_markdown(play.read_text(encoding="utf-8"))[:30_000]


def tiny(**overrides: object) -> TrainRequest:
    """A tiny run; overrides are fields of the flat HTTP body."""
    base: dict[str, object] = {
        "corpus_path": "play.txt",
        "vocab_size": 300,
        "model_family": "gpt2",
        "model_size": "tiny",
        "max_seq_len": 32,
        "batch_size": 4,
        "max_steps": 16,
        "eval_every": 8,
        "checkpoint_every": 8,
        "warmup_steps": 2,
        "learning_rate": 2e-3,
        "threads": 1,
    }
    return decode_flat({**base, **overrides}, TrainRequest)


def make_settings(root: Path, prefix: str) -> Settings:
    data = root / "data"
    (data / "corpus").mkdir(parents=True, exist_ok=True)
    (data / "corpus" / "play.txt").write_text(corpus_text(), encoding="utf-8")
    return Settings(
        data_dir=data,
        corpus_root=data / "corpus",
        prefix=prefix,
        events_channel=f"{prefix}:trainer:events",
        lease_s=2.0,
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, url: str, names: Sequence[ActorName] = ACTOR_NAMES
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    config = RuntimeConfig(block_ms=100, lease_s=settings.lease_s, grace_s=10.0)
    task = asyncio.create_task(
        service.serve(settings, url, names, config=config, stop=stop, install_signals=False)
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def events_of(redis: aioredis.Redis, keys: Keys, run_id: str) -> list[AnyEvent]:
    out = []
    for _id, fields in await redis.xrange(keys.events) or []:
        assert fields is not None
        event = decode_event(fields[FIELD.encode()])
        if event.run_id == run_id:
            out.append(event)
    return out


def trainer_steps(events: list[AnyEvent]) -> list[StepStarted]:
    return [e for e in events if isinstance(e, StepStarted) and e.step == "trainer"]


async def wait_for_end(redis: aioredis.Redis, keys: Keys, run_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await redis.hget(keys.run(run_id), "status")
        if status in (b"completed", b"failed", b"cancelled"):
            return status.decode()
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} did not end in {timeout}s")


async def wait_for_event(
    redis: aioredis.Redis,
    keys: Keys,
    run_id: str,
    kind: str,
    timeout: float = 120,
    at_least: int = 1,
) -> list[AnyEvent]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in await events_of(redis, keys, run_id) if event_kind(e) == kind]
        if len(found) >= at_least:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {kind} for run {run_id} in {timeout}s")


# ------------------------------------------------------------------ the shared completed run
@dataclass
class Finished:
    settings: Settings
    url: str
    run_id: str
    events: list[AnyEvent]
    messages: list[dict[str, object]]


@pytest.fixture(scope="module")
async def finished(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Finished]:
    prefix = f"svc{uuid.uuid4().hex[:8]}"
    settings = make_settings(tmp_path_factory.mktemp("service"), prefix)
    redis = connect(redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(settings.events_channel)
    messages: list[dict[str, object]] = []

    async def listen() -> None:
        async for m in pubsub.listen():
            if m["type"] == "message":
                messages.append(json.loads(m["data"]))

    listener = asyncio.create_task(listen())
    async with running(settings, redis_url):
        info = await submit(redis, Keys(prefix), plan_train(tiny(user_id=42)))
        await wait_for_end(redis, Keys(prefix), info.run_id)
        await asyncio.sleep(0.5)  # the notifier's last messages
        events = await events_of(redis, Keys(prefix), info.run_id)
        yield Finished(settings, redis_url, info.run_id, events, messages)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose untyped
    await redis.aclose()


async def test_a_full_chain_finishes_with_every_step_in_order(finished: Finished) -> None:
    kinds = [event_kind(e) for e in finished.events]
    steps = [e.step for e in finished.events if isinstance(e, StepStarted)]
    assert steps == ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]
    assert kinds[0] == "run.queued" and kinds[-1] == "run.completed"
    order = [
        "corpus.ready",
        "tokenizer.ready",
        "train.started",
        "train.progress",
        "train.completed",
        "eval.completed",
        "artifact.stored",
        "run.completed",
    ]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    assert kinds.count("run.completed") == 1 and "run.failed" not in kinds


async def test_the_model_learned_and_every_artifact_is_there(finished: Finished) -> None:
    losses = [e.loss for e in finished.events if isinstance(e, TrainProgress)]
    assert losses[-1] < losses[0]
    started = next(e for e in finished.events if isinstance(e, TrainStarted))
    assert (started.device, started.precision, started.total_steps) == ("cpu", "fp32", 16)
    assert started.parameters > 100_000 and started.resumed_from_step == 0
    tok = next(e for e in finished.events if isinstance(e, TokenizerReady))
    stats = tok.stats
    assert 0 < stats["tokens_per_char"] < 1 and stats["coverage"] == 1.0

    run_dir = finished.settings.run_dir(finished.run_id)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["perplexity"] > 1
    samples = (run_dir / "eval" / "samples.jsonl").read_text().splitlines()
    assert samples and all("completion" in json.loads(line) for line in samples)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["artifact"]["storage"] == "local"
    logs = [json.loads(line) for line in (run_dir / "logs.jsonl").read_text().splitlines()]
    assert all(line["run_id"] == finished.run_id for line in logs)
    assert "handling" in {line["event"] for line in logs} and len(logs) >= 10

    redis = connect(finished.url)
    keys = Keys(finished.settings.prefix)
    state = await redis.hgetall(keys.run(finished.run_id))
    record = await redis.hgetall(keys.tokenizer(tok.tokenizer_id))
    await redis.aclose()
    assert record[b"status"] == b"ready" and json.loads(record[b"stats"]) == stats
    pointer = json.loads(state[b"artifact"])
    archive = Path(pointer["uri"].removeprefix("file://"))
    assert archive.is_file() and archive.stat().st_size == pointer["size"]
    assert state[b"status"] == b"completed" and state[b"step"] == b"uploader"


def test_the_model_loads_with_transformers(finished: Finished) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = finished.settings.run_dir(finished.run_id)
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tok = AutoTokenizer.from_pretrained(run_dir)
    ids = tok("Fair is foul", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] >= tok.vocab_size


BOT_KEYS = {
    "trainer.job.started.v1": {"type", "domain", "job_id", "user_id", "queue"},
    "trainer.job.progress.v1": {"type", "domain", "job_id", "user_id", "progress", "message"},
    "trainer.job.completed.v1": {
        "type",
        "domain",
        "job_id",
        "user_id",
        "result_id",
        "result_bytes",
    },
    "trainer.metrics.config.v1": {
        "type",
        "job_id",
        "user_id",
        "model_family",
        "model_size",
        "total_epochs",
        "queue",
        "cpu_cores",
        "memory_mb",
        "optimal_threads",
        "optimal_workers",
        "batch_size",
        "learning_rate",
    },
    "trainer.metrics.completed.v1": {
        "type",
        "job_id",
        "user_id",
        "test_loss",
        "test_ppl",
        "artifact_path",
    },
}
PROGRESS_KEYS = {
    "type",
    "job_id",
    "user_id",
    "epoch",
    "total_epochs",
    "step",
    "train_loss",
    "train_ppl",
    "grad_norm",
    "samples_per_sec",
}


def test_the_bot_gets_its_shapes_in_order(finished: Finished) -> None:
    msgs = finished.messages
    types = [m["type"] for m in msgs]
    assert types[0] == "trainer.job.started.v1" and types[-1] == "trainer.job.completed.v1"
    assert types.index("trainer.metrics.config.v1") < types.index("trainer.metrics.completed.v1")
    for m in msgs:
        assert m["job_id"] == finished.run_id and m["user_id"] == 42
        t = str(m["type"])
        if t in BOT_KEYS:
            assert set(m) == BOT_KEYS[t], t
        elif t == "trainer.metrics.progress.v1":
            assert PROGRESS_KEYS <= set(m) <= PROGRESS_KEYS | {"val_loss", "val_ppl"}
            assert all(isinstance(m[k], int) for k in ("epoch", "total_epochs", "step"))
        elif t == "trainer.job.progress.v1":
            assert set(m) == BOT_KEYS.get(t, set(m)) and isinstance(m["progress"], int)
            assert 0 <= int(str(m["progress"])) <= 100
    config = next(m for m in msgs if m["type"] == "trainer.metrics.config.v1")
    assert config["model_family"] == "gpt2" and config["batch_size"] == 4
    done = next(m for m in msgs if m["type"] == "trainer.job.completed.v1")
    assert isinstance(done["result_bytes"], int) and done["result_bytes"] > 0
    # Rate-limited: far fewer progress messages than training steps.
    assert types.count("trainer.metrics.progress.v1") < 16


async def test_replay_of_the_finished_run_reproduces_its_event_kinds(finished: Finished) -> None:
    from actors.client import replay

    redis = connect(finished.url)
    source = Keys(finished.settings.prefix)
    target = f"{finished.settings.prefix}-replay"
    try:
        replayed = replay.replay_settings(finished.settings, target, None)
        commands = replay.select_for_run(
            await replay.run_commands(redis, source, finished.run_id), all_commands=False
        )
        await replay.redrive(redis, source, commands, replayed, run_id=finished.run_id)
        async with running(replayed, finished.url):
            await wait_for_end(redis, Keys(target), finished.run_id)
        # Progress between validations is sent at most once a second of wall time, so how
        # many of those a run sends is not reproducible; everything else is, and so are the
        # validations' progress events (with their samples).
        result = await replay.diff_runs(
            redis, finished.run_id, source, Keys(target), ignore=["train.progress"]
        )
        assert result.kinds_match, result.rows

        async def validations(keys: Keys) -> list[tuple[int, int]]:
            events = await events_of(redis, keys, finished.run_id)
            return [
                (e.step, len(e.samples))
                for e in events
                if isinstance(e, TrainProgress) and e.val_loss is not None
            ]

        assert await validations(source) == await validations(Keys(target)) == [(8, 2), (16, 2)]
        # The original keys are untouched: still one run.completed there.
        original = [event_kind(e) for e in await events_of(redis, source, finished.run_id)]
        assert original.count("run.completed") == 1
    finally:
        await redis.aclose()


# Requests on the run add events of their own: keep this after the replay comparison.
async def test_http_routes_through_the_real_actors(finished: Finished) -> None:
    rid = finished.run_id
    async with start_app(finished.settings, finished.url) as app:
        http = app.session
        state = await (await http.get(f"/runs/{rid}")).json()
        assert state["status"] == "completed" and state["run_id"] == rid
        assert {"last_heartbeat_ts", "message"} <= set(state)
        assert rid in [r["run_id"] for r in (await (await http.get("/runs")).json())["runs"]]
        ev = await (await http.get(f"/runs/{rid}/eval")).json()
        assert ev["metrics"]["perplexity"] > 1
        pointer = await (await http.get(f"/runs/{rid}/artifact")).json()
        assert pointer["storage"] == "local"
        download = await http.get(f"/artifacts/run/{rid}")
        assert download.status == 200 and len(await download.read()) == pointer["size"]
        logs = await http.get(f"/runs/{rid}/logs", params={"tail": "5"})
        assert logs.status == 200 and len((await logs.text()).splitlines()) == 5
        sse = await http.get(f"/runs/{rid}/events")
        kinds = [m.get("event") for m in await read_sse(sse)]
        assert kinds[0] == "run.queued" and "run.completed" in kinds
        tok_id = f"{rid}-tok"
        tok = await (await http.get(f"/tokenizers/{tok_id}")).json()
        assert tok["status"] == "ready"

        async with running(finished.settings, finished.url, ["evaluator"]):
            for route, body in (
                ("generate", {"prompt": "Fair is", "max_new_tokens": 8, "seed": 1}),
                ("score", {"text": "Fair is foul, and foul is fair"}),
                ("evaluate", {"split": "validation"}),
            ):
                posted = await http.post(f"/runs/{rid}/{route}", json=body)
                assert posted.status == 202, await posted.text()
                req = (await posted.json())["request_id"]
                result = await poll(http, f"/runs/{rid}/{route}/{req}")
                assert result["ok"] is True, result
            chat = await http.post(
                f"/runs/{rid}/chat", json={"message": "Hello", "seed": 3, "max_new_tokens": 8}
            )
            chat_body = await chat.json()
            sid, req = chat_body["session_id"], chat_body["request_id"]
            await poll(http, f"/runs/{rid}/chat/{sid}/{req}")
            history = await (await http.get(f"/runs/{rid}/chat/{sid}")).json()
            assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
            assert (await http.delete(f"/runs/{rid}/chat/{sid}")).status == 200


async def test_a_control_endpoint_with_an_empty_data_dir_of_its_own_serves_the_run(
    finished: Finished, tmp_path: Path
) -> None:
    """The run's logs (tail, SSE, Last-Event-ID resume), evaluation, tokenizer, state and
    curves come from Redis: a control endpoint on another machine has none of its folders."""
    empty = tmp_path / "control"
    empty.mkdir()
    control = replace(finished.settings, data_dir=empty, corpus_root=empty / "corpus")
    rid = finished.run_id
    run_dir = finished.settings.run_dir(rid)
    async with start_app(control, finished.url) as app:
        http = app.session
        logs = await http.get(f"/runs/{rid}/logs", params={"tail": "10000"})
        lines = (await logs.text()).splitlines()
        assert logs.status == 200
        # Every actor of the chain logged into the run's log, the trainer's child included.
        for words in ("training child started", 'kinds=["eval.completed"', "artifact"):
            assert any(words in line for line in lines), words
        on_disk = (run_dir / "logs.jsonl").read_text().splitlines()
        assert len(lines) == len(on_disk)  # the same lines as the actors' own logs.jsonl

        params = {"tail": "10000", "follow": "false"}
        messages = await read_sse(await http.get(f"/runs/{rid}/logs/stream", params=params))
        assert [m["data"] for m in messages[:-1]] == lines
        assert messages[-1] == {"event": "end", "data": '{"status":"completed"}'}
        half = len(messages) // 2
        headers = {"Last-Event-ID": messages[half]["id"]}
        resumed = await read_sse(await http.get(f"/runs/{rid}/logs/stream", headers=headers))
        assert resumed[:-1] == messages[half + 1 : -1] and resumed[-1]["event"] == "end"

        ev = await (await http.get(f"/runs/{rid}/eval")).json()
        assert ev["metrics"] == json.loads((run_dir / "eval" / "metrics.json").read_text())
        samples = (run_dir / "eval" / "samples.jsonl").read_text().splitlines()
        assert ev["samples"] == [json.loads(line) for line in samples] and ev["samples"]

        ready = next(e for e in finished.events if isinstance(e, TokenizerReady))
        tok = await (await http.get(f"/tokenizers/{ready.tokenizer_id}")).json()
        assert (tok["status"], tok["kind"], tok["run_id"]) == ("ready", ready.tokenizer_kind, rid)
        assert tok["stats"] == ready.stats and tok["stats"]["vocab_size"] > 0

        state = await (await http.get(f"/runs/{rid}")).json()
        assert state["status"] == "completed"
        curves = await (await http.get(f"/runs/{rid}/curves")).json()
        assert curves["train_loss"] and curves["val_loss"]
    assert list(empty.iterdir()) == []  # it wrote nothing there either


async def poll(http: object, path: str, timeout: float = 120) -> dict[str, object]:
    import aiohttp

    assert isinstance(http, aiohttp.ClientSession)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await http.get(path)
        if resp.status == 200:
            body: dict[str, object] = await resp.json()
            return body
        assert resp.status == 202, (resp.status, await resp.text())
        await asyncio.sleep(0.2)
    raise AssertionError(f"{path} still pending after {timeout}s")


async def test_a_model_missing_here_is_fetched_through_its_artifact_pointer(
    finished: Finished,
) -> None:
    # Runs last of the shared run's tests: it takes the run dir away.
    run_dir = finished.settings.run_dir(finished.run_id)
    run_dir.rename(run_dir.with_name(run_dir.name + ".away"))
    async with (
        start_app(finished.settings, finished.url) as app,
        running(finished.settings, finished.url, ["evaluator"]),
    ):
        body = {"prompt": "Fair", "max_new_tokens": 4, "seed": 2}
        posted = await app.session.post(f"/runs/{finished.run_id}/generate", json=body)
        req = (await posted.json())["request_id"]
        result = await poll(app.session, f"/runs/{finished.run_id}/generate/{req}")
    assert result["ok"] is True
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "manifest.json").is_file()
    assert not (run_dir / "checkpoints").exists()  # archives leave resume state out


# ------------------------------------------------------------------------- runs of their own
@pytest.mark.parametrize(
    ("overrides", "step", "words"),
    [
        ({"tokenizer_id": "no-such-tokenizer"}, "trainer", "unknown tokenizer"),
        ({"corpus_path": "../outside.txt"}, "ingest", "outside the corpus root"),
        ({"corpus_path": "missing.txt"}, "ingest", "does not exist"),
        # fp16 with a CPU-only device: refused at once, before the chain runs (test_validation);
        # with device auto on a machine without CUDA the trainer step refuses it.
        ({"precision": "fp16"}, "trainer", "fp16"),
    ],
)
async def test_bad_commands_fail_as_user_errors_without_retries(
    redis_url: str,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
    overrides: dict[str, object],
    step: str,
    words: str,
) -> None:
    settings = make_settings(tmp_path, keys.prefix)
    (tmp_path / "data" / "outside.txt").write_text(corpus_text())
    async with running(settings, redis_url):
        info = await submit(redis, keys, plan_train(tiny(**overrides)))
        assert await wait_for_end(redis, keys, info.run_id) == "failed"
    events = await events_of(redis, keys, info.run_id)
    failed = next(e for e in events if isinstance(e, RunFailed))
    assert failed.error_kind == "user" and failed.step == step
    assert words in failed.message
    started = [e for e in events if isinstance(e, StepStarted) and e.step == step]
    assert len(started) == 1, "a user error must not be retried"
    assert not await redis.exists(keys.tries(f"{info.run_id}.{step}"))


async def test_cancel_mid_run_ends_cancelled_and_stops_the_child(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, keys.prefix)
    async with running(settings, redis_url):
        info = await submit(redis, keys, plan_train(tiny(max_steps=100_000, checkpoint_every=20)))
        await wait_for_event(redis, keys, info.run_id, "train.progress")
        asked = time.monotonic()
        await redis.set(keys.cancel(info.run_id), "1")
        assert await wait_for_end(redis, keys, info.run_id, timeout=30) == "cancelled"
        assert time.monotonic() - asked < 10
    run_dir = settings.run_dir(info.run_id)
    pids = [
        int(line["pid"])
        for line in map(json.loads, (run_dir / "logs.jsonl").open())
        if line.get("event") == "training child started"
    ]
    assert pids and not Path(f"/proc/{pids[-1]}").exists(), "the training child is still alive"
    assert any((run_dir / "checkpoints").glob("step-*")), "the checkpoint is kept"


def actor_process(
    url: str,
    settings: Settings,
    name: str,
    consumer: str,
    store_env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`model-trainer actor <name>` on the machine of settings (its data dir, the shared
    store of store_env), writing to log when given."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MT_", "AWS_"))},
        **(store_env or {}),
        "REDIS_URL": url,
        "MT_PREFIX": settings.prefix,
        "MT_DATA_DIR": str(settings.data_dir),
        "MT_CORPUS_ROOT": str(settings.corpus_root),
        "MT_CONSUMER": consumer,
        "MT_LEASE_S": str(settings.lease_s),
        "OMP_NUM_THREADS": "1",
    }
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "actors.cli.main", "actor", name],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        )


async def until_checkpoint(run_dir: Path, timeout: float = 180) -> None:
    """Until the run has written a checkpoint here."""
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        await asyncio.sleep(0.2)


def training_children(run_dir: Path) -> list[int]:
    """Pids of the run's training children, in the order their trainers started them."""
    lines = map(json.loads, (run_dir / "logs.jsonl").open())
    return [int(line["pid"]) for line in lines if line.get("event") == "training child started"]


def alive(pid: int) -> bool:
    """A zombie (exited, not yet reaped by whoever adopted it) is not alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


async def test_a_killed_trainer_is_taken_over_and_resumes_from_its_checkpoint(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, keys.prefix)
    request = tiny(max_steps=100, checkpoint_every=10)
    first = actor_process(redis_url, settings, "trainer", "first")
    second: subprocess.Popen[bytes] | None = None
    try:
        others: list[ActorName] = ["ingest", "tokenizer", "evaluator", "uploader"]
        async with running(settings, redis_url, others):
            info = await submit(redis, keys, plan_train(request))
            run_dir = settings.run_dir(info.run_id)
            await until_checkpoint(run_dir)
            [orphan] = training_children(run_dir)
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = actor_process(redis_url, settings, "trainer", "second")
            # The killed actor's child exits by itself, before the second trainer starts the
            # command (a lease later): nothing of it can land in the run after the takeover.
            deadline = time.monotonic() + 5
            while alive(orphan):
                assert time.monotonic() < deadline, "the orphaned training child lives on"
                await asyncio.sleep(0.05)
            assert len(trainer_steps(await events_of(redis, keys, info.run_id))) == 1
            assert await wait_for_end(redis, keys, info.run_id, timeout=300) == "completed"
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    events = await events_of(redis, keys, info.run_id)
    kinds = [event_kind(e) for e in events]
    assert kinds.count("train.completed") == 1 and kinds.count("run.completed") == 1
    starts = [e for e in events if isinstance(e, TrainStarted)]
    assert len(starts) == 2 and starts[1].resumed_from_step > 0
    assert [e.consumer.split("-")[0] for e in trainer_steps(events)] == ["first", "second"]
    done = next(e for e in events if isinstance(e, TrainCompleted))
    assert done.steps == 100
    children = training_children(run_dir)
    assert len(children) == 2 and children[0] == orphan and not alive(orphan)

    # The same run, never interrupted, in this process on the same corpus and tokenizer.
    [cmd] = [c for c in plan_train(request, info.run_id) if isinstance(c, ModelTrain)]
    assert cmd.tokenizer_id == info.tokenizer_id
    clean_dir = tmp_path / "clean"
    clean = await asyncio.to_thread(
        train,
        train_config(cmd),
        settings.corpus_dir(cmd.corpus_id),
        settings.tokenizer_dir(cmd.tokenizer_id),
        clean_dir,
    )
    assert clean.resumed_from_step is None
    assert same_weights(run_dir, clean_dir), "the resumed run's weights differ"
    assert train_curve(run_dir) == train_curve(clean_dir)


async def test_two_trainers_split_two_runs(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, keys.prefix)
    rest: list[ActorName] = ["ingest", "tokenizer", "evaluator", "uploader"]
    a, b = replace(settings, consumer="a"), replace(settings, consumer="b")
    async with (
        running(a, redis_url, rest),
        running(a, redis_url, ["trainer"]),
        running(b, redis_url, ["trainer"]),
    ):
        runs = [await submit(redis, keys, plan_train(tiny(max_steps=60))) for _ in range(2)]
        for info in runs:
            assert await wait_for_end(redis, keys, info.run_id) == "completed"
    consumers = {
        e.consumer
        for info in runs
        for e in trainer_steps(await events_of(redis, keys, info.run_id))
    }
    assert consumers == {"a-trainer-0", "b-trainer-0"}


async def test_cli_train_runs_a_tiny_config_to_completion(
    redis_url: str,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from actors.cli import main as cli

    settings = replace(make_settings(tmp_path, keys.prefix), redis_url=redis_url)
    flags = [
        "--corpus-path",
        "play.txt",
        "--vocab-size",
        "300",
        "--max-seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "8",
        "--eval-every",
        "4",
        "--checkpoint-every",
        "4",
        "--threads",
        "1",
        "--user-id",
        "7",
    ]
    async with running(settings, redis_url):
        code = await cli.run(["train", *flags], settings)
    out = capsys.readouterr().out
    assert code == 0, out
    newest = (await redis.zrange(keys.runs, -1, -1))[0]
    assert isinstance(newest, bytes)
    run_id = newest.decode()
    assert run_id in out and "run completed" in out
    assert (await redis.hget(keys.run(run_id), "status")) == b"completed"


async def test_a_data_bank_corpus_is_downloaded_checked_and_split(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    from tests.fake_services import FakeDataBank

    bank = FakeDataBank(tmp_path / "bank")
    url = await bank.start()
    try:
        settings = replace(
            make_settings(tmp_path, keys.prefix), data_bank_url=url, data_bank_key=bank.key
        )
        file_id = bank.put(corpus_text().encode())
        async with running(settings, redis_url, ["ingest"]):
            info = await submit(
                redis, keys, plan_train(tiny(corpus_path="", corpus_file_id=file_id))
            )
            [ready] = await wait_for_event(redis, keys, info.run_id, "corpus.ready")
        assert isinstance(ready, CorpusReady) and sum(ready.lines.values()) > 100
        assert (settings.corpus_dir(info.corpus_id) / "train.txt").is_file()
        assert (settings.data_dir / "downloads" / f"{file_id}.txt").read_bytes() == bank.stored(
            file_id
        )
        bank.tamper = True  # a corrupted download is refused, never split
        file_id2 = bank.put(b"other text\n" * 50)
        async with running(settings, redis_url, ["ingest"]):
            bad = await submit(
                redis, keys, plan_train(tiny(corpus_path="", corpus_file_id=file_id2))
            )
            assert await wait_for_end(redis, keys, bad.run_id, timeout=120) == "failed"
        assert not (settings.corpus_dir(bad.corpus_id) / "train.txt").exists()
    finally:
        await bank.stop()
