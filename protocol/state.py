"""The run-state hash `mt:run:<run_id>`, derived from events so both always agree.

The runtime writes `state_fields(event)` into the hash in the same MULTI/EXEC as the event.
"""

from __future__ import annotations

import msgspec

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
    StepCompleted,
    StepStarted,
    TokenizerReady,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
)


class RunState(msgspec.Struct, kw_only=True):
    run_id: str
    status: RunStatus = "queued"
    step: str = ""
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
    tokens_per_s: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    message: str = ""
    attempt: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    last_heartbeat_ts: float | None = None
    artifact: str = ""  # JSON pointer {"storage": "local"|"data-bank", ...}

    @classmethod
    def from_hash(cls, run_id: str, fields: dict[str, str]) -> RunState:
        """Build from a Redis hash (all values strings); unknown fields are ignored."""
        raw: dict[str, object] = {"run_id": run_id}
        for name, typ in _FIELD_TYPES.items():
            if name in fields and fields[name] != "":
                value = fields[name]
                raw[name] = value if typ is str else msgspec.json.decode(value)
        return msgspec.convert(raw, cls)


_FIELD_TYPES: dict[str, type] = {
    "status": str,
    "step": str,
    "user_id": int,
    "model_family": str,
    "model_size": str,
    "corpus": str,
    "tokenizer_id": str,
    "epoch": int,
    "total_epochs": int,
    "train_step": int,
    "total_steps": int,
    "loss": float,
    "val_loss": float,
    "tokens_per_s": float,
    "test_loss": float,
    "test_ppl": float,
    "message": str,
    "attempt": int,
    "created_at": float,
    "started_at": float,
    "ended_at": float,
    "last_heartbeat_ts": float,
    "artifact": str,
}


def _num(value: float | int) -> str:
    return msgspec.json.encode(value).decode()


def state_fields(event: AnyEvent) -> dict[str, str]:
    """The hash fields an event changes (empty for events that do not touch run state)."""
    at = _num(event.at)
    match event:
        case RunQueued():
            return {
                "status": "queued",
                "step": event.steps[0] if event.steps else "",
                "user_id": _num(event.user_id),
                "model_family": event.model_family,
                "model_size": event.model_size,
                "corpus": event.corpus,
                "tokenizer_id": event.tokenizer_id,
                "created_at": at,
                "message": "queued",
            }
        case StepStarted():
            return {
                "status": "running",
                "step": event.step,
                "attempt": _num(event.attempt),
                "last_heartbeat_ts": at,
                "message": f"{event.step} started",
            }
        case StepCompleted():
            return {"last_heartbeat_ts": at, "message": f"{event.step} done"}
        case CorpusReady():
            return {"message": f"corpus ready: {sum(event.chars.values())} chars"}
        case TokenizerReady():
            return {"tokenizer_id": event.tokenizer_id, "message": "tokenizer ready"}
        case TrainStarted():
            return {
                "started_at": at,
                "total_epochs": _num(event.total_epochs),
                "total_steps": _num(event.total_steps),
                "last_heartbeat_ts": at,
                "train_step": _num(event.resumed_from_step),
                "message": "training",
            }
        case TrainProgress():
            fields = {
                "epoch": _num(event.epoch),
                "train_step": _num(event.step),
                "loss": _num(event.loss),
                "tokens_per_s": _num(event.tokens_per_s),
                "last_heartbeat_ts": at,
                "message": f"step {event.step}/{event.total_steps} loss {event.loss:.4f}",
            }
            if event.val_loss is not None:
                fields["val_loss"] = _num(event.val_loss)
            return fields
        case TrainCompleted():
            fields = {"train_step": _num(event.steps), "message": f"training {event.status}"}
            for name in ("val_loss", "test_loss", "test_ppl"):
                value = getattr(event, name)
                if value is not None:
                    fields[name] = _num(value)
            return fields
        case EvalCompleted():
            return {"message": "evaluation done"} if not event.request_id else {}
        case ArtifactStored():
            return {"artifact": msgspec.json.encode(event.pointer()).decode()}
        case RunCompleted():
            return {"status": "completed", "ended_at": at, "message": event.message or "completed"}
        case RunFailed():
            return {
                "status": "failed",
                "ended_at": at,
                "step": event.step,
                "message": f"{event.step} failed: {event.message}",
            }
        case RunCancelled():
            return {"status": "cancelled", "ended_at": at, "message": event.message or "cancelled"}
        case CancelRequested():
            return {"message": "cancel requested"}
        case CommandDuplicate() | ResultReady():
            return {}
