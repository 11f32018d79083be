"""One reducer: a run's events give the same view through the run-state hash (written by the
runtime's add_event, in the MULTI/EXEC of each event, into the real server) and through the
in-memory rule that watch and the notifier use."""

from __future__ import annotations

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime.outcome import add_event
from protocol.events import (
    TERMINAL_KINDS,
    TERMINAL_STATUSES,
    AnyEvent,
    ArtifactStored,
    CancelRequested,
    CommandDuplicate,
    CorpusReady,
    EvalCompleted,
    ResultReady,
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
    event_kind,
)
from protocol.keys import Keys
from protocol.state import RunState, StepView, apply

RECIPE = "fp32: bf16 measured 0.73x; compile: pays back after 90 of 500 steps"
CHAIN = ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]


def _progress(step: int, loss: float, val: float | None = None) -> TrainProgress:
    return TrainProgress(
        step=step,
        epoch=1 + (step > 10),
        total_epochs=2,
        total_steps=20,
        loss=loss,
        lr=1e-3,
        tokens_per_s=1000.0 + step,
        val_loss=val,
        mfu=step / 100,
    )


def _until_training() -> list[AnyEvent]:
    return [
        RunQueued(
            user_id=42,
            steps=["ingest", "tokenizer", "trainer", "evaluator", "uploader"],
            model_family="gpt2",
            model_size="tiny",
            corpus="tiny.txt",
            tokenizer_id="t1",
        ),
        StepStarted(step="ingest", command_id="c1"),
        CorpusReady(corpus_id="k1", chars={"train": 900, "validation": 100}, lines={"train": 9}),
        StepCompleted(step="ingest", command_id="c1", duration_s=1.5),
        StepStarted(step="tokenizer", command_id="c2"),
        TokenizerReady(tokenizer_id="t1", tokenizer_kind="bpe", stats={"vocab_size": 300.0}),
        StepCompleted(step="tokenizer", command_id="c2", duration_s=2.0),
        StepStarted(step="trainer", command_id="c3"),
        TrainStarted(
            model_family="gpt2",
            model_size="tiny",
            total_epochs=2,
            total_steps=20,
            parameters=1234,
            device="cpu",
            precision="fp32",
            compile=True,
            recipe=RECIPE,
            flops_per_token=7.5e6,
            peak_flops=2.5e11,
        ),
        _progress(5, 3.0),
        _progress(10, 2.5, val=2.75),
    ]


def completed() -> list[AnyEvent]:
    return [
        *_until_training(),
        _progress(20, 2.0),
        TrainCompleted(
            steps=20, tokens=5000, train_loss=2.0, val_loss=2.5, test_loss=2.25, mfu=0.125
        ),
        StepCompleted(step="trainer", command_id="c3", duration_s=30.0),
        StepStarted(step="evaluator", command_id="c4"),
        EvalCompleted(split="test", loss=2.25, ppl=9.5),
        EvalCompleted(request_id="q1", split="test", loss=9.0),  # a request: not the run's
        ResultReady(request_id="q1", what="evaluate"),
        StepCompleted(step="evaluator", command_id="c4"),
        StepStarted(step="uploader", command_id="c5"),
        ArtifactStored(storage="local", uri="file:///a.tar.gz", size=3, sha256="ab"),
        StepCompleted(step="uploader", command_id="c5"),
        CommandDuplicate(step="uploader", command_id="c5"),
        RunCompleted(),
    ]


def failed() -> list[AnyEvent]:
    return [
        *_until_training(),
        RunFailed(step="trainer", error_kind="system", message="out of memory"),
    ]


def cancelled() -> list[AnyEvent]:
    return [
        *_until_training(),
        CancelRequested(),
        _progress(11, 2.4),
        RunCancelled(step="trainer", message="cancelled by request"),
    ]


def resumed() -> list[AnyEvent]:
    """The trainer died after step 10; its command was taken over and resumed there."""
    events = _until_training()
    takeover: list[AnyEvent] = [
        StepStarted(step="trainer", command_id="c3", attempt=2),
        TrainStarted(
            model_family="gpt2",
            model_size="tiny",
            total_epochs=2,
            total_steps=20,
            resumed_from_step=10,
        ),
        _progress(15, 2.2),
    ]
    return [*events, *takeover]


SEQUENCES = {"completed": completed, "failed": failed, "cancelled": cancelled, "resumed": resumed}


async def _through_the_hash(
    redis: aioredis.Redis, keys: Keys, run_id: str, events: list[AnyEvent]
) -> RunState:
    for at, event in enumerate(events, start=1):
        event.run_id, event.at = run_id, float(at)
        async with redis.pipeline(transaction=True) as pipe:
            add_event(pipe, keys, event)
            await pipe.execute()
    raw = await redis.hgetall(keys.run(run_id))
    return RunState.from_hash(run_id, {_text(k): _text(v) for k, v in raw.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _in_memory(run_id: str, events: list[AnyEvent]) -> RunState:
    state = RunState(run_id=run_id)
    for event in events:
        state = apply(state, event)
    return state


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_the_hash_and_the_in_memory_rule_give_the_same_view(
    redis: aioredis.Redis, keys: Keys, name: str
) -> None:
    events = SEQUENCES[name]()
    stored = await _through_the_hash(redis, keys, f"r-{name}", events)
    assert stored == _in_memory(f"r-{name}", events)
    # Both went through msgspec: the view encodes and decodes back to itself.
    assert msgspec.json.decode(msgspec.json.encode(stored), type=RunState) == stored


async def test_a_completed_run(redis: aioredis.Redis, keys: Keys) -> None:
    state = await _through_the_hash(redis, keys, "r1", completed())
    assert (state.status, state.message, state.ended_at) == ("completed", "completed", 24.0)
    assert state.steps_done == 5
    assert state.chain["ingest"] == StepView(state="done", duration_s=1.5)
    assert state.chain["uploader"].state == "done"
    assert (state.user_id, state.model_family, state.corpus, state.tokenizer_id) == (
        42,
        "gpt2",
        "tiny.txt",
        "t1",
    )
    assert (state.train_step, state.total_steps, state.epoch, state.total_epochs) == (20, 20, 2, 2)
    assert (state.loss, state.val_loss, state.test_loss, state.lr) == (2.0, 2.5, 2.25, 1e-3)
    assert (state.parameters, state.device, state.precision) == (1234, "cpu", "fp32")
    assert (state.compile, state.recipe) == (True, RECIPE)
    assert (state.flops_per_token, state.peak_flops) == (7.5e6, 2.5e11)
    assert state.mfu == 0.125  # the run's, from train.completed, not the last progress's
    assert state.corpus_ready is not None and state.corpus_ready.chars["train"] == 900
    assert state.tokenizer_ready is not None and state.tokenizer_ready.stats["vocab_size"] == 300
    assert state.train_completed is not None and state.train_completed.tokens == 5000
    assert msgspec.json.decode(state.artifact)["sha256"] == "ab"
    assert (state.created_at, state.started_at) == (1.0, 9.0)


async def test_a_failed_and_a_cancelled_run(redis: aioredis.Redis, keys: Keys) -> None:
    failure = await _through_the_hash(redis, keys, "r2", failed())
    assert (failure.status, failure.step) == ("failed", "trainer")
    assert failure.message == "trainer failed: out of memory"
    assert failure.chain["trainer"] == StepView(state="failed", error="out of memory")
    assert "evaluator" not in failure.chain  # pending, never started
    assert failure.steps_done == 2

    cancel = await _through_the_hash(redis, keys, "r3", cancelled())
    assert (cancel.status, cancel.message) == ("cancelled", "cancelled by request")
    assert cancel.cancel_requested and cancel.train_step == 11
    assert cancel.mfu == 0.11  # the latest progress's
    assert cancel.chain["trainer"].state == "cancelled"
    assert cancel.status in TERMINAL_STATUSES and cancel.ended_at == 14.0


async def test_a_resumed_training(redis: aioredis.Redis, keys: Keys) -> None:
    state = await _through_the_hash(redis, keys, "r4", resumed())
    assert (state.status, state.attempt) == ("running", 2)
    assert state.chain["trainer"] == StepView(state="running", attempt=2)
    assert (state.train_step, state.loss, state.val_loss) == (15, 2.2, 2.75)
    assert state.mfu == 0.15
    # The takeover's train.started named no recipe: the view shows what the new start said.
    assert (state.compile, state.recipe, state.peak_flops) == (False, "", 0.0)
    assert state.started_at == 13.0  # the resumed training's start
    assert state.ended_at is None


def test_a_view_that_missed_the_queued_event_still_learns_the_user() -> None:
    state = apply(
        RunState(run_id="r"), StepStarted(run_id="r", user_id=7, step="ingest", command_id="c")
    )
    assert state.user_id == 7


def test_terminal_kinds_are_the_events_that_set_a_terminal_status() -> None:
    ends: list[AnyEvent] = [
        RunCompleted(),
        RunFailed(step="trainer", error_kind="user", message="x"),
        RunCancelled(),
    ]
    assert {event_kind(e) for e in ends} == TERMINAL_KINDS
    assert {apply(RunState(run_id="r"), e).status for e in ends} == TERMINAL_STATUSES


def test_a_malformed_hash_value_names_its_field() -> None:
    with pytest.raises(msgspec.DecodeError, match="'epoch'"):
        RunState.from_hash("r", {"status": "queued", "epoch": "[oops"})
    with pytest.raises(msgspec.DecodeError, match=r"'chain\.ingest'"):
        RunState.from_hash("r", {"chain.ingest": "{"})
