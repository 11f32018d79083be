"""The client side of the service, once: what the HTTP endpoint, the CLI, the demo and replay
do to the service through Redis.

`ServiceClient` submits runs and tokenizer jobs, cancels runs (atomically), lists runs and
loads their state, queues score / generate / chat / evaluate requests and waits for their
results, reads a run's recorded events and follows it live. Live reads (XREAD BLOCK) go
through a connection of their own, whose socket timeout is longer than the BLOCK.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

import msgspec

from actors.client.submit import plan_tokenizer, plan_train, submit
from actors.runtime.connection import Redis, connect, read_entries, stream_entries
from actors.runtime.outcome import Write, add_command, event_writes, request_kind
from protocol.codec import FIELD, decode_event
from protocol.commands import ChainCommand, RequestCommand
from protocol.events import (
    TERMINAL_KINDS,
    TERMINAL_STATUSES,
    AnyEvent,
    CancelRequested,
    ErrorKind,
    RequestKind,
)
from protocol.keys import ACTOR_NAMES, ActorName, Keys
from protocol.requests import RunCreated, TokenizerTrainRequest, TrainRequest
from protocol.state import RunState

BLOCK_MS = 1000  # one XREAD BLOCK: bounds how late a follower notices a stop
PAGE = 500  # entries per XRANGE / XREAD
CANCEL_TTL_S = 14 * 24 * 3600
REQUEST_TTL_S = 7 * 24 * 3600  # as long as the evaluator keeps results
# The history of a run starts at its run.queued event; event ids are the server's clock and
# created_at the submitter's, so the scan starts this much earlier to allow for clock skew.
HISTORY_MARGIN_S = 3600.0

# Set the cancel flag and record run.cancel_requested only while the run exists, has not
# ended and has no flag yet: two cancels racing record one event, and an ended run none.
# KEYS: the run's state hash, its cancel flag. ARGV[1]: how many terminal statuses follow;
# then the writes, each as its argument count followed by the command and its arguments.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown' end
local status = redis.call('HGET', KEYS[1], 'status')
local n = tonumber(ARGV[1])
for i = 2, n + 1 do
  if status == ARGV[i] then return status end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'pending' end
local i = n + 2
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
return 'requested'
"""


class UnknownRun(LookupError):
    """No run-state hash under this id (in this prefix)."""


class RunEnded(Exception):
    """The run has already ended, so there is nothing to cancel."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id!r} is already {status}")
        self.status = status


CancelOutcome = Literal["requested", "pending"]  # pending: an earlier cancel is under way


class RequestMarker(msgspec.Struct, kw_only=True):
    """Which run and route a request id belongs to, so an unknown id is told apart from a
    pending one."""

    what: RequestKind
    run_id: str


class RequestResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request's stored answer, as `actors.runtime.streams.answer` writes it: `result` when
    it succeeded, `error_kind` and `message` when it failed."""

    ok: bool
    what: RequestKind
    result: object = None
    error_kind: ErrorKind = "system"
    message: str = ""


class Samples(msgspec.Struct, kw_only=True):
    """The `result` of a generate request."""

    prompt: str = ""
    samples: list[str] = []


class _Head(msgspec.Struct):
    """Just enough of any event to filter by run without decoding the whole union."""

    kind: str = ""
    run_id: str = ""


_head = msgspec.json.Decoder(_Head)
_result = msgspec.json.Decoder(RequestResult)
_marker = msgspec.json.Decoder(RequestMarker)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Entry:
    """One event as recorded: its stream id, kind, run, raw payload, and the decoded event
    (None for a kind this version does not know)."""

    id: str
    kind: str
    run_id: str
    raw: bytes
    event: AnyEvent | None

    @classmethod
    def of(cls, entry_id: str, fields: dict[bytes, bytes]) -> Entry | None:
        """The entry of an events-stream record; None when the payload is not an event."""
        raw = fields.get(FIELD.encode(), b"")
        try:
            head = _head.decode(raw)
        except msgspec.DecodeError:
            return None
        try:
            event: AnyEvent | None = decode_event(raw)
        except msgspec.DecodeError:
            event = None
        return cls(entry_id, head.kind, head.run_id, raw, event)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


def start_after(state: RunState) -> str:
    """The events-stream id a run's history is read after."""
    if not state.created_at:
        return "0-0"
    return f"{max(0, int((state.created_at - HISTORY_MARGIN_S) * 1000))}-0"


class ServiceClient:
    """The service as seen from outside: one Redis connection for commands and reads, one
    for blocking reads, and the key names of one prefix."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        blocking: Redis | None = None,
        *,
        block_ms: int = BLOCK_MS,
        url: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.blocking = blocking  # only `follow` needs it; its timeout must exceed block_ms
        self.block_ms = block_ms
        self.url = url  # where `dedicated` connects
        self._cancel = redis.register_script(_CANCEL)

    @classmethod
    def connect(cls, url: str, keys: Keys, *, block_ms: int = BLOCK_MS) -> ServiceClient:
        """A client with connections of its own (closed by `aclose`)."""
        blocking = connect(url, blocking=True, block_ms=block_ms)
        return cls(connect(url), keys, blocking, block_ms=block_ms, url=url)

    def dedicated(self) -> ServiceClient:
        """A client of the same service on one connection of its own, opened on first use and
        used for reads and blocking reads alike (one at a time), closed by `aclose`.

        For a long-lived reader such as an SSE stream: it holds exactly one connection while
        it lives and none once closed, where a shared pool would keep every connection its
        busiest moment opened."""
        if self.url is None:
            raise RuntimeError("a dedicated client needs a client made by connect()")
        own = connect(self.url, blocking=True, block_ms=self.block_ms)
        return ServiceClient(own, self.keys, own, block_ms=self.block_ms, url=self.url)

    async def aclose(self) -> None:
        if self.blocking is not None and self.blocking is not self.redis:
            await self.blocking.aclose()
        await self.redis.aclose()

    # ------------------------------------------------------------------------------ runs
    async def submit(self, chain: list[ChainCommand]) -> RunCreated:
        return await submit(self.redis, self.keys, chain)

    async def train(self, req: TrainRequest) -> RunCreated:
        """Submit a training run (UserError for a request that cannot make one)."""
        return await self.submit(plan_train(req))

    async def train_tokenizer(self, req: TokenizerTrainRequest) -> RunCreated:
        return await self.submit(plan_tokenizer(req))

    async def find_run(self, run_id: str) -> RunState | None:
        raw = await self.redis.hgetall(self.keys.run(run_id))
        if not raw:
            return None
        return RunState.from_hash(run_id, {_text(k): _text(v) for k, v in raw.items()})

    async def run_state(self, run_id: str) -> RunState:
        """The run's state; UnknownRun when there is none."""
        state = await self.find_run(run_id)
        if state is None:
            raise UnknownRun(run_id)
        return state

    async def runs(self, limit: int) -> list[RunState]:
        """The newest `limit` runs, newest first (ids whose state is gone are left out)."""
        newest = await self.redis.zrevrange(self.keys.runs, 0, limit - 1)
        run_ids = [_text(r) for r in newest if isinstance(r, bytes | str)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(self.keys.run(run_id))
            hashes = await pipe.execute()
        return [
            RunState.from_hash(run_id, {_text(k): _text(v) for k, v in fields.items()})
            for run_id, fields in zip(run_ids, hashes, strict=True)
            if fields
        ]

    async def cancel(self, run_id: str) -> CancelOutcome:
        """Set the run's cancel flag (with its TTL) and record run.cancel_requested, in one
        script; UnknownRun or RunEnded when there is nothing to cancel."""
        state = await self.run_state(run_id)  # the event carries the run's user
        writes: list[Write] = [("SET", self.keys.cancel(run_id), "1", "EX", str(CANCEL_TTL_S))]
        writes += event_writes(self.keys, CancelRequested(run_id=run_id, user_id=state.user_id))
        args: list[str | bytes] = [str(len(TERMINAL_STATUSES)), *sorted(TERMINAL_STATUSES)]
        for write in writes:
            args += [str(len(write)), *write]
        keys = [self.keys.run(run_id), self.keys.cancel(run_id)]
        outcome = _text(await self._cancel(keys=keys, args=args))
        if outcome == "unknown":
            raise UnknownRun(run_id)
        if outcome in TERMINAL_STATUSES:
            raise RunEnded(run_id, outcome)
        return "pending" if outcome == "pending" else "requested"

    async def alive_kinds(self) -> dict[ActorName, int]:
        """Live consumers per actor kind (heartbeat keys with a TTL), by one SCAN."""
        patterns = {actor: self.keys.alive_pattern(actor) for actor in ACTOR_NAMES}
        counts: dict[ActorName, int] = {}
        async for key in self.redis.scan_iter(match=f"{self.keys.prefix}:alive:*", count=1000):
            name = _text(key)
            for actor, pattern in patterns.items():
                if fnmatch.fnmatchcase(name, pattern):
                    counts[actor] = counts.get(actor, 0) + 1
        return counts

    # -------------------------------------------------------------------------- requests
    async def queue(self, cmd: RequestCommand) -> None:
        """The request's command, with a marker of which run and route its id belongs to."""
        marker = RequestMarker(what=request_kind(cmd), run_id=cmd.run_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(
                self.keys.request(cmd.request_id), msgspec.json.encode(marker), ex=REQUEST_TTL_S
            )
            add_command(pipe, self.keys, cmd)
            await pipe.execute()

    async def request_marker(self, request_id: str) -> RequestMarker | None:
        raw = await self.redis.get(self.keys.request(request_id))
        return _marker.decode(raw) if raw is not None else None

    async def result(self, request_id: str) -> RequestResult | None:
        """The request's answer; None while it is pending (or when the id is unknown)."""
        raw = await self.redis.get(self.keys.result(request_id))
        return _result.decode(raw) if raw is not None else None

    async def wait_result(
        self, request_id: str, timeout_s: float, poll_s: float = 0.2
    ) -> RequestResult:
        """The request's answer once there is one; TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (result := await self.result(request_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for request {request_id} after {timeout_s:g}s")
            await asyncio.sleep(poll_s)
        return result

    # ---------------------------------------------------------------------------- events
    async def history_pages(
        self, run_id: str, *, after: str
    ) -> AsyncGenerator[tuple[list[Entry], str], None]:
        """The run's recorded events after entry `after`, a page at a time, each with the id
        of the last entry scanned (where a live read continues without a gap)."""
        last = after
        while True:
            batch = stream_entries(
                await self.redis.xrange(self.keys.events, min=f"({last}", max="+", count=PAGE)
            )
            entries: list[Entry] = []
            for entry_id, fields in batch:
                last = entry_id
                entry = Entry.of(entry_id, fields)
                if entry is not None and entry.run_id == run_id:
                    entries.append(entry)
            yield entries, last
            if len(batch) < PAGE:
                return

    async def history(self, run_id: str, *, after: str | None = None) -> tuple[list[Entry], str]:
        """Every recorded event of the run, in order, and the id of the last entry scanned.
        Without `after`, from just before the run's creation (UnknownRun if it has no state).
        """
        if after is None:
            after = start_after(await self.run_state(run_id))
        out: list[Entry] = []
        last = after
        async for entries, scanned in self.history_pages(run_id, after=after):
            out.extend(entries)
            last = scanned
        return out, last

    async def follow(self, run_id: str, *, after: str) -> AsyncGenerator[list[Entry], None]:
        """Live events of the run after entry `after`, a batch per XREAD BLOCK (an empty one
        when the block timed out, so callers can stop or ping between them), until its
        terminal event, or until its state says it ended should that event be trimmed away.
        """
        if self.blocking is None:
            raise RuntimeError("following a run needs a blocking connection (connect())")
        last = after
        while True:
            reply = read_entries(
                await self.blocking.xread({self.keys.events: last}, count=PAGE, block=self.block_ms)
            )
            batch: list[Entry] = []
            for entry_id, fields in reply:
                last = entry_id
                entry = Entry.of(entry_id, fields)
                if entry is None or entry.run_id != run_id:
                    continue
                batch.append(entry)
                if entry.terminal:
                    yield batch
                    return
            yield batch
            if not reply:
                status = await self.redis.hget(self.keys.run(run_id), "status")
                if status is not None and _text(status) in TERMINAL_STATUSES:
                    return
