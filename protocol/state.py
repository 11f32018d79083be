"""A run's view and THE rule that reduces the run's events into it.

`changes(event)` is the only place where an event's effect on a run's view is written. Two
places apply it and must agree (tests/test_view.py proves they do):

- the run-state hash `mt:run:<run_id>`: the runtime HSETs `state_fields(event)` in the same
  MULTI/EXEC as the event, and `RunState.from_hash` reads it back;
- in-memory views (watch, the notifier): `apply(state, event)`.

A change replaces a field, except for the chain: each step's entry is its own change (and its
own hash field, `chain.<step>`), so the hash is updated without being read first.
In the hash, text fields hold their text and every other field its msgspec JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec
import msgspec.inspect

from protocol.events import (
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
    RunStatus,
    Sample,
    StepCompleted,
    StepStarted,
    TokenizerReady,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
)
from protocol.keys import ActorName

StepState = Literal["pending", "running", "done", "failed", "cancelled"]
CHAIN = "chain."  # hash field (and change) prefix of one step of the chain


class StepView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of the run's chain."""

    state: StepState = "pending"
    attempt: int = 0  # while running
    duration_s: float | None = None  # once done
    error: str = ""  # once failed


class RunState(msgspec.Struct, kw_only=True):
    run_id: str
    status: RunStatus = "queued"
    step: str = ""
    steps: list[ActorName] = []  # the chain, in order
    chain: dict[str, StepView] = {}  # by step name; a step not in it is pending
    user_id: int = 0
    model_family: str = ""
    model_size: str = ""
    corpus: str = ""
    tokenizer_id: str = ""
    epoch: int = 0
    total_epochs: int = 0
    train_step: int = 0
    total_steps: int = 0
    loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    mfu: float | None = None  # model FLOPs utilisation, 0..1: the latest, then the run's
    samples: list[Sample] = []  # what the model wrote at its latest validation
    samples_step: int = 0  # the training step of those samples
    parameters: int = 0
    device: str = ""
    precision: str = ""
    compile: bool = False
    recipe: str = ""  # why this precision and compile, with the measured figures
    threads: int = 0  # of each training process
    world_size: int = 1  # training processes (DDP), all machines together
    backend: str = ""  # their torch.distributed backend (gloo, nccl); "" for one
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # measured FLOP/s in the chosen precision (MFU's base)
    message: str = ""
    cancel_requested: bool = False
    attempt: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None  # set by the run's terminal event, and only by it
    last_heartbeat_ts: float | None = None
    artifact: str = ""  # JSON pointer {"storage": "local"|"data-bank", ...}
    corpus_ready: CorpusReady | None = None
    tokenizer_ready: TokenizerReady | None = None
    train_completed: TrainCompleted | None = None

    @property
    def steps_done(self) -> int:
        if self.status == "completed":
            return len(self.steps)
        return sum(1 for s in self.steps if s in self.chain and self.chain[s].state == "done")

    @classmethod
    def from_hash(cls, run_id: str, fields: Mapping[str, str]) -> RunState:
        """Build from a Redis hash (all values strings); unknown and empty fields are ignored.
        A malformed value raises msgspec.DecodeError naming its field."""
        raw: dict[str, object] = {"run_id": run_id}
        chain: dict[str, object] = {}
        for name, text in fields.items():
            if name in _TEXT_FIELDS:
                raw[name] = text
            elif text == "" or (name not in _JSON_FIELDS and not name.startswith(CHAIN)):
                continue
            else:
                try:
                    value = msgspec.json.decode(text)
                except msgspec.DecodeError as e:
                    raise msgspec.DecodeError(f"run-state field {name!r}: {e}") from None
                if name.startswith(CHAIN):
                    chain[name.removeprefix(CHAIN)] = value
                else:
                    raw[name] = value
        raw["chain"] = chain
        return msgspec.convert(raw, cls)


def _is_text(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.UnionType):
        return all(_is_text(u) for u in t.types)
    if isinstance(t, msgspec.inspect.LiteralType):
        return all(isinstance(v, str) for v in t.values)
    return isinstance(t, msgspec.inspect.StrType)


def _field_kinds() -> tuple[frozenset[str], frozenset[str]]:
    info = msgspec.inspect.type_info(RunState)
    assert isinstance(info, msgspec.inspect.StructType)
    text = frozenset(f.name for f in info.fields if _is_text(f.type) and f.name != "run_id")
    other = frozenset(f.name for f in info.fields if not _is_text(f.type) and f.name != "chain")
    return text, other


# Derived from RunState's types: which hash fields hold text, which hold JSON.
_TEXT_FIELDS, _JSON_FIELDS = _field_kinds()


def changes(event: AnyEvent) -> dict[str, object]:
    """What an event changes in its run's view: field name (or `chain.<step>`) → new value.
    Empty for events that do not touch the view."""
    at = event.at
    update: dict[str, object]
    match event:
        case RunQueued():
            return {
                "status": "queued",
                "step": event.steps[0] if event.steps else "",
                "steps": list(event.steps),
                "user_id": event.user_id,
                "model_family": event.model_family,
                "model_size": event.model_size,
                "corpus": event.corpus,
                "tokenizer_id": event.tokenizer_id,
                "created_at": at,
                "message": "queued",
            }
        case StepStarted():
            update = {
                "status": "running",
                "step": event.step,
                CHAIN + event.step: StepView(state="running", attempt=event.attempt),
                "attempt": event.attempt,
                "last_heartbeat_ts": at,
                "message": f"{event.step} started",
            }
        case StepCompleted():
            update = {
                CHAIN + event.step: StepView(state="done", duration_s=event.duration_s),
                "last_heartbeat_ts": at,
                "message": f"{event.step} done",
            }
        case CorpusReady():
            update = {
                "corpus_ready": event,
                "message": f"corpus ready: {sum(event.chars.values())} chars",
            }
        case TokenizerReady():
            update = {
                "tokenizer_id": event.tokenizer_id,
                "tokenizer_ready": event,
                "message": "tokenizer ready",
            }
        case TrainStarted():
            update = {
                "started_at": at,
                "total_epochs": event.total_epochs,
                "total_steps": event.total_steps,
                "parameters": event.parameters,
                "device": event.device,
                "precision": event.precision,
                "compile": event.compile,
                "recipe": event.recipe,
                "threads": event.threads,
                "world_size": event.world_size,
                "backend": event.backend,
                "flops_per_token": event.flops_per_token,
                "peak_flops": event.peak_flops,
                "last_heartbeat_ts": at,
                "train_step": event.resumed_from_step,
                "message": "training",
            }
        case TrainProgress():
            update = {
                "epoch": event.epoch,
                "train_step": event.step,
                "loss": event.loss,
                "lr": event.lr,
                "tokens_per_s": event.tokens_per_s,
                "mfu": event.mfu,
                "last_heartbeat_ts": at,
                "message": f"step {event.step}/{event.total_steps} loss {event.loss:.4f}",
            }
            if event.total_epochs:
                update["total_epochs"] = event.total_epochs
            if event.total_steps:
                update["total_steps"] = event.total_steps
            if event.val_loss is not None:
                update["val_loss"] = event.val_loss
            if event.samples:
                update["samples"], update["samples_step"] = event.samples, event.step
        case TrainCompleted():
            update = {"train_completed": event, "message": f"training {event.status}"}
            if event.steps:
                update["train_step"] = event.steps
            for name in ("val_loss", "test_loss", "test_ppl", "mfu"):
                value = getattr(event, name)
                if value is not None:
                    update[name] = value
        case EvalCompleted():
            if event.request_id:
                return {}  # an evaluate request, not a step of the run
            update = {"message": "evaluation done"}
        case ArtifactStored():
            update = {"artifact": msgspec.json.encode(event.pointer()).decode()}
        case RunCompleted():
            update = {
                "status": "completed",
                "ended_at": at,
                "message": event.message or "completed",
            }
        case RunFailed():
            update = {
                "status": "failed",
                "ended_at": at,
                "step": event.step,
                CHAIN + event.step: StepView(state="failed", error=event.message),
                "message": f"{event.step} failed: {event.message}",
            }
        case RunCancelled():
            update = {
                "status": "cancelled",
                "ended_at": at,
                "message": event.message or "cancelled",
            }
            if event.step:
                update[CHAIN + event.step] = StepView(state="cancelled")
        case CancelRequested():
            update = {"cancel_requested": True, "message": "cancel requested"}
        case CommandDuplicate() | ResultReady():
            return {}
    if event.user_id:
        update["user_id"] = event.user_id  # a view that missed run.queued still learns it
    return update


def apply(state: RunState, event: AnyEvent) -> RunState:
    """The view after one more event: what HSET of `state_fields(event)` and `from_hash` give."""
    update = changes(event)
    steps = {k.removeprefix(CHAIN): v for k, v in update.items() if k.startswith(CHAIN)}
    plain = {k: v for k, v in update.items() if not k.startswith(CHAIN)}
    if steps:
        plain["chain"] = {**state.chain, **steps}
    return msgspec.structs.replace(state, **plain)


def state_fields(event: AnyEvent) -> dict[str, str]:
    """The hash fields an event changes (empty for events that do not touch run state)."""
    return {k: v if isinstance(v, str) else _json(v) for k, v in changes(event).items()}


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()
