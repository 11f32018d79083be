"""What a handler leaves behind (Outcome) and how it becomes Redis writes: events with the
run-state change they imply, commands, request results, and the chain's next step.

The runtime commits these in one fenced transaction with the ack; callers outside the
runtime (submitting, cancelling) queue the same writes on a MULTI pipeline.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import msgspec

from actors.runtime.connection import Redis
from protocol.codec import FIELD, encode
from protocol.commands import (
    ArtifactUpload,
    Base,
    ChainCommand,
    CorpusIngest,
    ModelChat,
    ModelEvaluate,
    ModelGenerate,
    ModelScore,
    ModelTrain,
    ModelTrainJoin,
    RequestCommand,
    RunCancel,
    TokenizerTrain,
    actor_of,
)
from protocol.events import AnyEvent, RequestKind, ResultReady
from protocol.keys import Keys
from protocol.state import state_fields


class Cancelled(Exception):
    """The run was cancelled; raised by handlers that noticed it (the runtime records it)."""


Write = tuple[str | bytes, ...]  # one Redis command and its arguments


@dataclass
class Outcome:
    """What a successful handler leaves behind: committed atomically with the ack.

    For a chain step the runtime adds step.completed and queues the next step of the chain
    (or records run.completed after the last one); `send` is for anything extra, `writes`
    for other keys that must change with the ack (a request's result)."""

    events: list[AnyEvent] = field(default_factory=list)
    send: list[Base] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)


def request_id_of(cmd: Base) -> str:
    """Request-style commands answer under a request id instead of moving a run along."""
    if isinstance(cmd, RequestCommand):
        return cmd.request_id
    return ""


def run_id_of(cmd: Base) -> str:
    if isinstance(
        cmd,
        CorpusIngest
        | TokenizerTrain
        | ModelTrain
        | ModelTrainJoin
        | ModelEvaluate
        | ModelScore
        | ModelGenerate
        | ModelChat
        | ArtifactUpload
        | RunCancel,
    ):
        return cmd.run_id
    return ""


def is_chain_step(cmd: Base) -> bool:
    return isinstance(cmd, ChainCommand) and not request_id_of(cmd)


def next_in_chain(cmd: Base) -> list[Base]:
    """The next step of the run, carrying the rest of the chain."""
    if not isinstance(cmd, ChainCommand) or not cmd.rest:
        return []
    nxt = cmd.rest[0]
    nxt.rest = list(cmd.rest[1:])
    return [nxt]


def event_writes(keys: Keys, event: AnyEvent) -> list[Write]:
    """An event on the events stream and the run-state change it implies."""
    if not event.at:
        event.at = time.time()
    writes: list[Write] = [("XADD", keys.events, "*", FIELD, encode(event))]
    fields = state_fields(event)
    if event.run_id and fields:
        writes.append(("HSET", keys.run(event.run_id), *itertools.chain(*fields.items())))
    return writes


def command_writes(keys: Keys, cmd: Base) -> list[Write]:
    return [("XADD", keys.cmd(actor_of(cmd)), "*", FIELD, encode(cmd))]


RESULT_TTL_S = 7 * 24 * 3600


def answer(keys: Keys, cmd: Base, body: dict[str, object]) -> Outcome:
    """The outcome of a request-style command: its result under the request id (`ok` and
    `what` added here) and the result.ready event."""
    rid, what = request_id_of(cmd), request_kind(cmd)
    ok = body.get("ok", True) is True
    stored = msgspec.json.encode({"ok": ok, "what": what, **body})
    message = str(body.get("message", "")) if not ok else ""
    return Outcome(
        events=[ResultReady(request_id=rid, what=what, ok=ok, message=message)],
        writes=[("SET", keys.result(rid), stored, "EX", str(RESULT_TTL_S))],
    )


# A dead letter keeps this much of its payload (and the payload's size): enough to see
# what any real command was, while a flood of multi-megabyte garbage costs little to keep.
DEAD_LETTER_KEEP_BYTES = 64 * 1024


def dead_letter(
    raw: bytes,
    *,
    error: str,
    stream: str,
    entry_id: str,
    deliveries: int,
    consumer: str,
    actor: str = "",
    tb: str = "",
) -> dict[str, bytes | str]:
    """The fields of a dead letter on `<prefix>:dead`: the payload (a bounded prefix) and
    its size, the reason, where it came from and how often it was delivered."""
    return {
        "data": raw[:DEAD_LETTER_KEEP_BYTES],
        "size": str(len(raw)),
        "error": error,
        "stream": stream,
        "entry_id": entry_id,
        "deliveries": str(deliveries),
        "actor": actor,
        "consumer": consumer,
        "traceback": tb[-4000:],
        "at": str(time.time()),
    }


def add_event(pipe: Redis, keys: Keys, event: AnyEvent) -> None:
    """Queue an event and the run-state change it implies on a MULTI pipeline (the same
    writes as `event_writes`, for callers outside the runtime)."""
    if not event.at:
        event.at = time.time()
    pipe.xadd(keys.events, {FIELD: encode(event)})
    fields = state_fields(event)
    if event.run_id and fields:
        pipe.hset(keys.run(event.run_id), mapping=fields)  # type: ignore[arg-type]  # redis-py's mapping type is invariant


def add_command(pipe: Redis, keys: Keys, cmd: Base) -> None:
    pipe.xadd(keys.cmd(actor_of(cmd)), {FIELD: encode(cmd)})


def request_kind(cmd: Base) -> RequestKind:
    match cmd:
        case ModelScore():
            return "score"
        case ModelGenerate():
            return "generate"
        case ModelChat():
            return "chat"
        case _:
            return "evaluate"
