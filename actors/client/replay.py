"""Stream replay for debugging: re-drive recorded commands into a fresh key prefix.

The command streams are the record of what a run asked for: the submitter XADDs the first
step of the chain, and every actor XADDs the next step when it finishes its own. Replay
copies those payloads, byte for byte (command ids included: the fresh prefix has no done
records), onto the command streams of a new prefix, so that a separate set of actors
processes them again while the original keys stay untouched.

- `--run RUN` re-drives the run's first chain command by default: it carries the rest of
  the chain, so the replayed actors re-create every later step themselves, in order.
  `--all` re-drives every recorded command of the run (later chain steps, cancels, score /
  generate / evaluate requests) in their original order; chain steps then also come back
  from the replayed chain and are acknowledged as duplicates.
- `--stream ACTOR --start ID --end ID` re-drives an id range of one command stream as is,
  undecodable payloads included (a poison message can be replayed too).

The replayed run keeps its run id, so it must not share the original's files: a replay
uses its own data dir (default `<data_dir>/replays/<prefix>`); only the corpus root is
shared (corpus paths are resolved against it). A replayed run that points at artifacts of
another run (a given tokenizer_id, pretrained_run_id) finds them only if they are copied
into the replay's data dir. Replays never upload to the Data Bank nor send Discord DMs.

`step` handles exactly one queued command of the replay prefix (the oldest) and stops;
`diff` compares a run's event history in two prefixes, ignoring timings.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
from redis.exceptions import ResponseError

from actors import service
from actors.client.client import Entry, ServiceClient
from actors.runtime.config import Settings
from actors.runtime.connection import Redis, connect, stream_entries
from actors.runtime.outcome import add_event, is_chain_step, run_id_of
from actors.runtime.streams import Actor, Runtime, RuntimeConfig
from protocol.codec import FIELD, decode_command
from protocol.commands import Base, kind_of
from protocol.events import RunQueued
from protocol.keys import COMMAND_ACTORS, ActorName, Keys
from trainer.errors import UserError

ActorFactories = Mapping[ActorName, Callable[[Settings], Actor]]

# Fields that differ between two faithful executions of the same commands.
VOLATILE = frozenset(
    {
        "at",
        "duration_s",
        "consumer",
        "attempt",
        "tokens_per_s",
        "samples_per_s",
        "memory_mb",
        "cpu_cores",
        "threads",
        "uri",
        "mfu",  # measured: MFU, the device's peak and the recipe's figures
        "peak_flops",
        "recipe",
    }
)


@dataclass(frozen=True)
class Recorded:
    """One entry of a command stream."""

    actor: ActorName
    entry_id: str
    raw: bytes
    command: Base | None  # None: the payload does not decode

    @property
    def kind(self) -> str:
        return kind_of(self.command) if self.command is not None else "(undecodable)"

    @property
    def command_id(self) -> str:
        return self.command.command_id if self.command is not None else ""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _recorded(actor: ActorName, entry_id: str, fields: dict[bytes, bytes]) -> Recorded:
    raw = fields.get(FIELD.encode(), b"")
    try:
        command: Base | None = decode_command(actor, raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        command = None
    return Recorded(actor, entry_id, raw, command)


def _order_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _order(entry: Recorded) -> tuple[int, int]:
    return _order_id(entry.entry_id)


async def run_commands(redis: Redis, keys: Keys, run_id: str) -> list[Recorded]:
    """Every recorded command of the run, across the command streams, in stream-id order."""
    out: list[Recorded] = []
    for actor in COMMAND_ACTORS:
        for entry_id, fields in stream_entries(await redis.xrange(keys.cmd(actor))):
            entry = _recorded(actor, entry_id, fields)
            if entry.command is not None and run_id_of(entry.command) == run_id:
                out.append(entry)
    return sorted(out, key=_order)


def actor_of_stream(keys: Keys, name: str) -> ActorName:
    """An actor name, or the full command stream key of this prefix."""
    for actor in COMMAND_ACTORS:
        if name in (actor, keys.cmd(actor)):
            return actor
    raise UserError(
        f"unknown command stream {name!r}: one of {', '.join(COMMAND_ACTORS)} "
        f"(or {keys.cmd('ingest')}, ...)"
    )


async def range_commands(
    redis: Redis, keys: Keys, actor: ActorName, start: str, end: str
) -> list[Recorded]:
    entries = stream_entries(await redis.xrange(keys.cmd(actor), min=start, max=end))
    return [_recorded(actor, entry_id, fields) for entry_id, fields in entries]


def select_for_run(commands: list[Recorded], *, all_commands: bool) -> list[Recorded]:
    if all_commands:
        return commands
    roots = [c for c in commands if c.command is not None and is_chain_step(c.command)]
    return roots[:1]


def default_prefix(prefix: str) -> str:
    return f"{prefix}-replay-{secrets.token_hex(3)}"


def replay_settings(settings: Settings, prefix: str, data_dir: Path | None = None) -> Settings:
    """The settings replayed actors run with: own prefix and data dir, same corpus root,
    no Data Bank uploads and no Discord DMs."""
    return dataclasses.replace(
        settings,
        prefix=prefix,
        data_dir=(data_dir or settings.data_dir / "replays" / prefix).absolute(),
        corpus_root=settings.corpus_root,
        data_bank_url=None,
        data_bank_key=None,
        discord_token=None,
        events_channel=f"{prefix}:notifications",
    )


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def is_fresh(redis: Redis, prefix: str) -> bool:
    async for _key in redis.scan_iter(match=f"{_glob_escape(prefix)}:*", count=1000):
        return False
    return True


@dataclass(frozen=True)
class Replayed:
    prefix: str
    data_dir: Path
    entries: list[tuple[Recorded, str]]  # (the original entry, its new entry id)


async def redrive(
    redis: Redis,
    source: Keys,
    commands: list[Recorded],
    target: Settings,
    *,
    run_id: str = "",
) -> Replayed:
    """XADD the payloads, in order, onto the command streams of the fresh prefix
    `target.prefix`; for a run, its run.queued record too (so status/watch/diff see it)."""
    if not commands:
        raise UserError("nothing to replay: no recorded commands matched")
    to = Keys(target.prefix)
    if to.prefix == source.prefix:
        raise UserError("the replay prefix must differ from the recorded one")
    if not await is_fresh(redis, to.prefix):
        raise UserError(f"prefix {to.prefix!r} is not fresh: keys {to.prefix}:* exist")
    queued: RunQueued | None = None
    if run_id:
        entries, _ = await ServiceClient(redis, source).history(run_id, after="0-0")
        queued = next((e.event for e in entries if isinstance(e.event, RunQueued)), None)
    async with redis.pipeline(transaction=True) as pipe:
        if queued is not None:
            queued.at = time.time()
            add_event(pipe, to, queued)
            pipe.zadd(to.runs, {run_id: queued.at})
        for entry in commands:
            pipe.xadd(to.cmd(entry.actor), {FIELD: entry.raw})
        replies = await pipe.execute()
    new_ids = [_text(r) for r in replies[-len(commands) :]]
    target.data_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "source_prefix": source.prefix,
        "prefix": to.prefix,
        "run_id": run_id,
        "replayed_at": time.time(),
        "commands": [
            {
                "stream": source.cmd(e.actor),
                "entry_id": e.entry_id,
                "new_id": new,
                "kind": e.kind,
                "command_id": e.command_id,
            }
            for e, new in zip(commands, new_ids, strict=True)
        ],
    }
    (target.data_dir / "replay.json").write_text(json.dumps(record, indent=2) + "\n")
    return Replayed(to.prefix, target.data_dir, list(zip(commands, new_ids, strict=True)))


# ------------------------------------------------------------------------------- stepping
def step_consumer(actor: ActorName) -> str:
    """Stable: a step that died leaves its entry pending for the next step to take first."""
    return f"replay-{actor}"


class _OneCommand(Runtime):
    """A runtime that starts exactly one entry and then stops reading. Entries it was handed
    beyond that one stay pending under its (stable) consumer name: the next step reads them
    first."""

    started: tuple[str, bytes] | None = None  # (entry id, payload) of the one it handled

    def _start(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        if self.started is not None:
            return
        self.started = (entry_id, fields.get(FIELD.encode(), b""))
        super()._start(entry_id, fields)
        self.stop()


async def next_entry(redis: Redis, keys: Keys, actor: ActorName) -> str | None:
    """The entry a step of this actor would handle: its own pending one, else the oldest one
    not yet delivered to the group."""
    stream, group = keys.cmd(actor), actor
    last = "0-0"
    try:
        pending = await redis.xpending_range(
            stream, group, min="-", max="+", count=1, consumername=step_consumer(actor)
        )
        if pending:
            return _text(pending[0]["message_id"])
        for info in await redis.xinfo_groups(stream):
            if _text(info["name"]) == group:
                last = _text(info["last-delivered-id"])
    except ResponseError:  # no stream or no group yet: everything is undelivered
        pass
    entries = stream_entries(await redis.xrange(stream, min=f"({last}", max="+", count=1))
    return entries[0][0] if entries else None


@dataclass(frozen=True)
class StepResult:
    actor: ActorName
    entry_id: str
    kind: str
    command_id: str
    events: list[str]  # kinds of the events the step wrote


async def step(
    url: str,
    settings: Settings,
    *,
    actors: ActorFactories | None = None,
    config: RuntimeConfig | None = None,
) -> StepResult | None:
    """Handle exactly one queued command of `settings.prefix` (the oldest across its command
    streams) with a fresh actor of its kind; None when nothing is queued."""
    factories = service.ACTORS if actors is None else actors
    keys = Keys(settings.prefix)
    cfg = config or RuntimeConfig(block_ms=50, grace_s=7 * 24 * 3600.0)
    redis = connect(url)
    blocking = connect(url, blocking=True, block_ms=cfg.block_ms)
    try:
        candidates = [(a, await next_entry(redis, keys, a)) for a in COMMAND_ACTORS]
        queued = [(_order_id(e), a) for a, e in candidates if e is not None]
        if not queued:
            return None
        actor_name = min(queued)[1]
        if actor_name not in factories:
            raise UserError(f"no {actor_name} actor in this build to handle the next command")
        tail = stream_entries(await redis.xrevrange(keys.events, count=1))
        before = tail[0][0] if tail else "0-0"
        runtime = _OneCommand(
            factories[actor_name](settings),
            redis,
            keys=keys,
            consumer=step_consumer(actor_name),
            config=cfg,
            blocking_redis=blocking,
        )
        await runtime.run(until_idle=True)
        if runtime.started is None:
            return None
        entry_id, raw = runtime.started
        entry = _recorded(actor_name, entry_id, {FIELD.encode(): raw})
        written = stream_entries(await redis.xrange(keys.events, min=f"({before}", max="+"))
        kinds = [_event_kind(entry_id, fields) for entry_id, fields in written]
        return StepResult(actor_name, entry_id, entry.kind, entry.command_id, kinds)
    finally:
        await blocking.aclose()
        await redis.aclose()


def _event_kind(entry_id: str, fields: dict[bytes, bytes]) -> str:
    entry = Entry.of(entry_id, fields)
    return entry.kind if entry is not None and entry.kind else "?"


async def drain(
    url: str,
    settings: Settings,
    *,
    actors: ActorFactories | None = None,
    config: RuntimeConfig | None = None,
    max_steps: int = 10_000,
) -> list[StepResult]:
    """Step until nothing is queued: the replay runs one command at a time, in order."""
    done: list[StepResult] = []
    while len(done) < max_steps:
        result = await step(url, settings, actors=actors, config=config)
        if result is None:
            break
        done.append(result)
    return done


# ----------------------------------------------------------------------------------- diff
@dataclass(frozen=True)
class Diff:
    rows: list[tuple[str, str, str]]  # (kind in A, kind in B, "=" same, "~" fields differ, "!")
    kinds_match: bool
    fields_differ: int


def _normal(raw: bytes) -> tuple[str, dict[str, object]]:
    body = msgspec.json.decode(raw)
    if not isinstance(body, dict):
        return "?", {}
    kind = str(body.pop("kind", "?"))
    return kind, {k: v for k, v in body.items() if k not in VOLATILE}


def compare(a: Iterable[bytes], b: Iterable[bytes], *, ignore: Iterable[str] = ()) -> Diff:
    """Event payloads of one run in two prefixes: same kinds in the same order? Which differ
    in more than timings?"""
    skip = set(ignore)
    left = [n for n in map(_normal, a) if n[0] not in skip]
    right = [n for n in map(_normal, b) if n[0] not in skip]
    rows: list[tuple[str, str, str]] = []
    differ = 0
    for i in range(max(len(left), len(right))):
        ka, fa = left[i] if i < len(left) else ("", {})
        kb, fb = right[i] if i < len(right) else ("", {})
        mark = "!" if ka != kb else ("=" if fa == fb else "~")
        differ += mark == "~"
        rows.append((ka, kb, mark))
    return Diff(rows, [k for k, _ in left] == [k for k, _ in right], differ)


async def diff_runs(
    redis: Redis, run_id: str, a: Keys, b: Keys, *, ignore: Iterable[str] = ()
) -> Diff:
    """UnknownRun when the run has no state in one of the prefixes."""
    left, _ = await ServiceClient(redis, a).history(run_id)
    right, _ = await ServiceClient(redis, b).history(run_id)
    return compare([e.raw for e in left], [e.raw for e in right], ignore=ignore)
