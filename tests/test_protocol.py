"""The wire contract: every command and event round-trips, bad payloads are rejected with a
message that names the problem, schemas evolve without breaking old or new readers, and the
run-state hash derived from events reads back as the expected RunState."""

from __future__ import annotations

import re
from typing import get_args

import msgspec
import pytest
import redis.asyncio as aioredis

from protocol.codec import (
    COMMAND_DECODERS,
    any_command_decoder,
    decode_command,
    decode_event,
    encode,
)
from protocol.commands import (
    ACCEPTS,
    ACTOR_OF,
    ArtifactUpload,
    Base,
    Command,
    CorpusIngest,
    ModelChat,
    ModelEvaluate,
    ModelGenerate,
    ModelScore,
    ModelTrain,
    ModelTrainJoin,
    RunCancel,
    TokenizerTrain,
    actor_of,
    kind_of,
)
from protocol.events import (
    AnyEvent,
    ArtifactStored,
    CancelRequested,
    CommandDuplicate,
    CorpusReady,
    EvalCompleted,
    Event,
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
from protocol.keys import COMMAND_ACTORS, Keys
from protocol.state import CHAIN, RunState, state_fields

COMMANDS: list[Base] = [
    CorpusIngest(
        command_id="c-ingest",
        run_id="r1",
        corpus_id="k1",
        path="a.txt",
        rest=[
            TokenizerTrain(command_id="c-tok", run_id="r1", tokenizer_id="t1", corpus_id="k1"),
            ModelTrain(
                command_id="c-train",
                run_id="r1",
                corpus_id="k1",
                tokenizer_id="t1",
                max_steps=10,
                early_stopping_patience=2,
                finetune_lr_cap=1e-4,
            ),
            ModelEvaluate(command_id="c-eval", run_id="r1"),
            ArtifactUpload(command_id="c-up", run_id="r1"),
        ],
    ),
    TokenizerTrain(command_id="c2", run_id="r1", tokenizer_id="t1", corpus_id="k1"),
    ModelTrain(command_id="c3", run_id="r1", corpus_id="k1", tokenizer_id="t1"),
    ModelEvaluate(command_id="c4", run_id="r1", request_id="q1", split="validation"),
    ModelScore(command_id="c5", run_id="r1", request_id="q2", text="hello"),
    ModelGenerate(command_id="c6", run_id="r1", request_id="q3", prompt="hi", stop=["\n"]),
    ModelChat(command_id="c7", run_id="r1", request_id="q4", session_id="s1", message="hi"),
    ArtifactUpload(command_id="c8", run_id="r1", target="tokenizer", tokenizer_id="t1"),
    RunCancel(command_id="c9", run_id="r1"),
    ModelTrainJoin(
        command_id="c3.join-1-1",
        run_id="r1",
        train=ModelTrain(command_id="c3", run_id="r1", corpus_id="k1", tokenizer_id="t1", nnodes=2),
        endpoint="10.0.0.5:29400",
    ),
]

EVENTS: list[AnyEvent] = [
    RunQueued(run_id="r1", steps=["ingest", "tokenizer"], model_family="gpt2"),
    StepStarted(run_id="r1", step="ingest", command_id="c1", attempt=2, consumer="h-ingest-0"),
    StepCompleted(run_id="r1", step="ingest", command_id="c1", duration_s=1.5),
    CommandDuplicate(run_id="r1", step="ingest", command_id="c1"),
    CorpusReady(run_id="r1", corpus_id="k1", chars={"train": 10}, lines={"train": 2}),
    TokenizerReady(run_id="r1", tokenizer_id="t1", stats={"coverage": 0.99}),
    TrainStarted(run_id="r1", model_family="gpt2", model_size="tiny", total_epochs=1),
    TrainProgress(run_id="r1", step=3, epoch=1, total_epochs=2, loss=2.5, val_loss=2.75),
    TrainCompleted(run_id="r1", steps=10, val_loss=2.0, test_loss=2.1, test_ppl=8.2),
    EvalCompleted(run_id="r1", split="test", loss=2.0, metrics={"ppl": 7.4}),
    ResultReady(run_id="r1", request_id="q1", what="score", ok=False, message="no model"),
    ArtifactStored(run_id="r1", storage="local", uri="file:///x.tar.gz", size=3),
    RunCompleted(run_id="r1"),
    RunFailed(run_id="r1", step="trainer", error_kind="user", message="bad corpus"),
    RunCancelled(run_id="r1", step="trainer"),
    CancelRequested(run_id="r1"),
]


def test_samples_cover_every_tagged_class() -> None:
    assert {type(c) for c in COMMANDS} == set(get_args(Command))
    assert {type(e) for e in EVENTS} == set(get_args(AnyEvent))


@pytest.mark.parametrize("cmd", COMMANDS, ids=kind_of)
def test_every_command_round_trips(cmd: Base) -> None:
    data = encode(cmd)
    assert msgspec.json.decode(data)["kind"] == kind_of(cmd)
    assert any_command_decoder.decode(data) == cmd
    assert decode_command(actor_of(cmd), data) == cmd


@pytest.mark.parametrize("event", EVENTS, ids=event_kind)
def test_every_event_round_trips(event: AnyEvent) -> None:
    data = encode(event)
    assert msgspec.json.decode(data)["kind"] == event_kind(event)
    assert decode_event(data) == event


def test_unknown_tag_is_rejected_naming_the_tag() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value 'corpus\.shred'.*\$\.kind"):
        decode_command("ingest", b'{"kind": "corpus.shred", "command_id": "c1"}')
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value 'run\.exploded'"):
        decode_event(b'{"kind": "run.exploded"}')
    with pytest.raises(msgspec.ValidationError, match="missing required field `kind`"):
        decode_command("ingest", b'{"command_id": "c1"}')


@pytest.mark.parametrize("raw", [b"\x00\xff\xfe garbage", b"", b'{"command_id": "c1", "run_id":'])
def test_garbage_bytes_are_rejected(raw: bytes) -> None:
    with pytest.raises(msgspec.DecodeError, match=r"malformed|truncated"):
        decode_command("ingest", raw)
    with pytest.raises(msgspec.DecodeError, match=r"malformed|truncated"):
        decode_event(raw)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("validation_fraction", 0.9, "<= 0.5"),
        ("test_fraction", 0.0, ">= 0.01"),
        ("seed", -1, ">= 0"),
        ("command_id", "no spaces allowed", "matching regex"),
        ("user_id", "7", "Expected `int`"),
    ],
)
def test_out_of_range_field_names_the_field(field: str, value: object, message: str) -> None:
    payload: dict[str, object] = {
        "kind": "corpus.ingest",
        "command_id": "c1",
        "run_id": "r1",
        "corpus_id": "k1",
    }
    payload[field] = value
    with pytest.raises(msgspec.ValidationError) as info:
        decode_command("ingest", msgspec.json.encode(payload))
    assert f"$.{field}" in str(info.value)
    assert message in str(info.value)


def test_nested_chain_command_errors_name_the_path() -> None:
    bad = {
        "kind": "corpus.ingest",
        "command_id": "c1",
        "run_id": "r1",
        "corpus_id": "k1",
        "rest": [
            {
                "kind": "tokenizer.train",
                "command_id": "c2",
                "run_id": "r1",
                "tokenizer_id": "t1",
                "corpus_id": "k1",
                "vocab_size": 3,
            }
        ],
    }
    with pytest.raises(msgspec.ValidationError, match=r"\$\.rest\[0\]\.vocab_size"):
        decode_command("ingest", msgspec.json.encode(bad))


class IngestV0(msgspec.Struct, kw_only=True, tag_field="kind", tag="corpus.ingest"):
    """corpus.ingest as an older consumer knew it: before lowercase, seed, rest etc."""

    command_id: str
    run_id: str
    corpus_id: str
    path: str = ""


def test_old_decoder_ignores_fields_added_later() -> None:
    new = CorpusIngest(
        command_id="c1",
        run_id="r1",
        corpus_id="k1",
        path="a.txt",
        lowercase=True,
        seed=7,
        rest=[TokenizerTrain(command_id="c2", run_id="r1", tokenizer_id="t1", corpus_id="k1")],
    )
    old = msgspec.json.decode(encode(new), type=IngestV0)
    assert old == IngestV0(command_id="c1", run_id="r1", corpus_id="k1", path="a.txt")
    # And today's decoders accept what a newer producer sends (fields we do not know yet).
    data = msgspec.json.encode({**msgspec.json.decode(encode(new)), "added_in_v9": {"x": 1}})
    assert decode_command("ingest", data) == new
    event = msgspec.json.encode({"kind": "run.completed", "run_id": "r1", "added_in_v9": 1})
    assert decode_event(event) == RunCompleted(run_id="r1")


def test_new_decoder_fills_defaults_for_missing_fields() -> None:
    old = encode(IngestV0(command_id="c1", run_id="r1", corpus_id="k1", path="a.txt"))
    cmd = decode_command("ingest", old)
    assert cmd == CorpusIngest(command_id="c1", run_id="r1", corpus_id="k1", path="a.txt")
    assert isinstance(cmd, CorpusIngest)
    assert (cmd.lowercase, cmd.seed, cmd.validation_fraction, cmd.rest) == (False, 1337, 0.1, [])
    assert (cmd.user_id, cmd.requested_at) == (0, 0.0)
    progress = decode_event(
        b'{"kind": "train.progress", "step": 1, "epoch": 1, "total_epochs": 1, "loss": 3.0}'
    )
    assert isinstance(progress, TrainProgress)
    assert (progress.val_loss, progress.lr, progress.run_id) == (None, 0.0, "")


@pytest.mark.parametrize("cmd", COMMANDS, ids=kind_of)
def test_each_actor_decodes_only_its_own_commands(cmd: Base) -> None:
    data = encode(cmd)
    for actor in COMMAND_ACTORS:
        if type(cmd) in ACCEPTS[actor]:
            assert decode_command(actor, data) == cmd
        else:
            wrong = re.escape(f"Invalid value '{kind_of(cmd)}' - at `$.kind`")
            with pytest.raises(msgspec.ValidationError, match=wrong):
                decode_command(actor, data)


def test_routing_tables_agree() -> None:
    for cls, actor in ACTOR_OF.items():
        assert cls in ACCEPTS[actor]
    for actor in COMMAND_ACTORS:
        assert RunCancel in ACCEPTS[actor]  # a cancel may land on any command stream
    assert set(COMMAND_DECODERS) == set(COMMAND_ACTORS)
    assert ACCEPTS["notifier"] == ()


@pytest.mark.parametrize("event", EVENTS, ids=event_kind)
def test_state_fields_are_strings_of_run_state_fields(event: AnyEvent) -> None:
    fields = state_fields(event)
    assert isinstance(fields, dict)
    chain = {CHAIN + step for step in COMMAND_ACTORS}
    assert set(fields) <= set(RunState.__struct_fields__) | chain
    assert all(isinstance(v, str) for v in fields.values())
    RunState.from_hash("r1", fields)  # every value an event writes reads back


def _apply(events: list[AnyEvent]) -> dict[str, str]:
    """What HSET of each event's fields, in order, leaves in the hash."""
    state: dict[str, str] = {}
    for at, event in enumerate(events, start=1):
        event.at = float(at)
        state.update(state_fields(event))
    return state


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _completed_run() -> list[AnyEvent]:
    return [
        RunQueued(
            run_id="r1",
            user_id=42,
            steps=["ingest", "trainer"],
            model_family="gpt2",
            model_size="tiny",
            corpus="shakespeare",
        ),
        StepStarted(run_id="r1", step="ingest", command_id="c1"),
        CorpusReady(run_id="r1", corpus_id="k1", chars={"train": 900, "validation": 100}),
        StepCompleted(run_id="r1", step="ingest", command_id="c1"),
        StepStarted(run_id="r1", step="trainer", command_id="c2", attempt=2),
        TrainStarted(
            run_id="r1", model_family="gpt2", model_size="tiny", total_epochs=2, total_steps=10
        ),
        TrainProgress(
            run_id="r1",
            step=5,
            epoch=1,
            total_epochs=2,
            total_steps=10,
            loss=2.5,
            val_loss=3.0,
            tokens_per_s=1234.5,
        ),
        TrainProgress(run_id="r1", step=10, epoch=2, total_epochs=2, total_steps=10, loss=2.25),
        TrainCompleted(run_id="r1", steps=10, val_loss=2.0, test_loss=2.125),
        ArtifactStored(run_id="r1", storage="local", uri="file:///a.tar.gz", size=3),
        RunCompleted(run_id="r1"),
    ]


async def test_run_state_from_events_through_a_real_hash(redis: aioredis.Redis, keys: Keys) -> None:
    fields = _apply(_completed_run())
    await redis.hset(keys.run("r1"), mapping=fields)  # type: ignore[arg-type]  # redis-py's mapping type is invariant
    raw = await redis.hgetall(keys.run("r1"))
    stored = {_text(k): _text(v) for k, v in raw.items()}
    state = RunState.from_hash("r1", stored)
    assert state.status == "completed"
    assert (state.step, state.attempt, state.user_id) == ("trainer", 2, 42)
    assert (state.epoch, state.total_epochs, state.train_step, state.total_steps) == (2, 2, 10, 10)
    assert (state.loss, state.val_loss, state.test_loss) == (2.25, 2.0, 2.125)
    assert state.tokens_per_s == 0.0  # the last progress event reported none
    assert (state.created_at, state.started_at, state.ended_at) == (1.0, 6.0, 11.0)
    assert msgspec.json.decode(state.artifact)["uri"] == "file:///a.tar.gz"
    assert state.message == "completed"


@pytest.mark.parametrize(
    ("last", "status", "message"),
    [
        (
            RunFailed(run_id="r1", step="trainer", error_kind="user", message="empty corpus"),
            "failed",
            "trainer failed: empty corpus",
        ),
        (RunCancelled(run_id="r1", step="trainer"), "cancelled", "cancelled"),
        (CancelRequested(run_id="r1"), "running", "cancel requested"),
    ],
)
def test_run_state_ends(last: Event, status: str, message: str) -> None:
    events: list[AnyEvent] = [
        RunQueued(run_id="r1", steps=["ingest"]),
        StepStarted(run_id="r1", step="trainer", command_id="c1"),
        TrainProgress(run_id="r1", step=3, epoch=1, total_epochs=1, loss=4.0),
    ]
    assert isinstance(last, RunFailed | RunCancelled | CancelRequested)
    state = RunState.from_hash("r1", _apply([*events, last]))
    assert (state.status, state.message, state.train_step, state.loss) == (status, message, 3, 4.0)
    assert state.ended_at == (None if status == "running" else 4.0)


def test_run_state_ignores_unknown_and_empty_hash_fields() -> None:
    state = RunState.from_hash("r1", {"status": "running", "from_the_future": "x", "loss": ""})
    assert (state.run_id, state.status, state.loss) == ("r1", "running", None)
    assert RunState.from_hash("r2", {}) == RunState(run_id="r2")
