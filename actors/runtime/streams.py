"""The actor runtime: the one module that owns XREADGROUP, XACK, XAUTOCLAIM and dead letters.

An actor is a small class with a name, the commands it accepts (protocol.codec decoders)
and an async `handle`. The runtime gives it, per command:

- its own pending entries first after a restart (stable consumer name), then new ones,
  and XAUTOCLAIM of entries whose consumer stopped renewing its lease;
- a fencing attempt number (INCR on start); every write of the handler is a WATCHed
  MULTI/EXEC that fails once another consumer has taken the command over;
- lease renewal while the handler is alive (idle reset of its own entry, in Lua, only while
  it still owns the entry and the attempt), so a live job is never stolen;
- idempotency by command_id: a finished command that comes back is acknowledged and
  reported as a duplicate;
- the error policy: a payload that fails to decode in any way (protocol.codec bounds its
  size and depth first) → dead letter at once; UserError → failed at once; anything else →
  retried with backoff, dead-lettered after `max_tries`;
- the poison limit: a command delivered `max_deliveries` times without progress (its
  consumers keep dying with it) is dead-lettered; a handler that reports progress
  (`ctx.progressed()`, e.g. a new checkpoint) starts the count again, so a job that moves
  on is resumed however often its machine dies; each redelivery without progress waits a
  growing backoff first;
- a restart reads its own pending entries once each (a cursor through them, not id 0 over
  and over): an entry whose handling ended without an ack comes back only by XAUTOCLAIM,
  a lease later;
- events and the run-state hash written in one MULTI/EXEC;
- the lines logged while handling a run's command go to that run's log stream in Redis
  (actors.runtime.runlog: queued by the log processor, written by a task of the runtime,
  drained at stop);
- an orderly stop: stop reading, begin and retry nothing more, let running handlers finish
  within the grace period, cancel the rest (their entries stay pending for another consumer
  or the next start); work interrupted by the stop is never a failure and uses no retry.

Why one module of ~800 lines: these are the states of one delivery (read, claim, begin,
renew, commit or fail, ack) and they guard each other's invariants; split, the fencing rule
would be spread over files. What a handler returns and how it becomes writes is
actors.runtime.outcome; connections and stream reading are actors.runtime.connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.runtime import log, retention
from actors.runtime.connection import (
    GroupReader,
    Redis,
    connect,
    keep_alive,
    read_entries,
    sit_out_outage,
)
from actors.runtime.outcome import (
    Cancelled,
    Outcome,
    Write,
    add_event,
    answer,
    command_writes,
    dead_letter,
    event_writes,
    is_chain_step,
    next_in_chain,
    request_id_of,
    run_id_of,
)
from actors.runtime.runlog import RunLog
from protocol.codec import FIELD, decode_command
from protocol.commands import (
    Base,
    RunCancel,
)
from protocol.events import (
    AnyEvent,
    CancelRequested,
    CommandDuplicate,
    ErrorKind,
    RunCancelled,
    RunCompleted,
    RunFailed,
    StepCompleted,
    StepStarted,
)
from protocol.keys import ActorName, Keys
from trainer.errors import UserError

# Reset the idle time of our own pending entry, but only while we still own both the entry
# and the current attempt: a renewal must never take a command back from its new owner.
_RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return 0 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


# Apply a batch of writes atomically, but only while ARGV[1] is still the command's attempt
# number (KEYS[1]; '0' writes unfenced). ARGV[2..] holds the writes, each as its argument
# count followed by the command and its arguments. One round trip, where WATCH + GET +
# MULTI/EXEC took three.
_COMMIT = """
if ARGV[1] ~= '0' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


class Fenced(Exception):
    """Another consumer took the command over; this one must not write anything more."""


class Interrupted(Exception):
    """The handler's work was stopped before its end, not failed (the service is stopping,
    its process was stopped by a signal): the entry stays pending, no retry is used, and the
    next delivery resumes it."""


@dataclass(frozen=True)
class Delivery:
    """What `_begin` learns about one delivery of a command."""

    done: bool  # finished before: acknowledge as a duplicate
    deliveries: int  # XPENDING's count: every read, restart, reconnect and XAUTOCLAIM
    since_progress: int  # of those, the ones since the handler last reported progress
    attempt: int  # the fencing token of this delivery
    cancelled: bool  # the run's cancel flag is set


@dataclass(frozen=True)
class RuntimeConfig:
    lease_s: float = 30.0
    block_ms: int = 1000
    max_tries: int = 3  # handler failures (transient) before the dead letter
    max_deliveries: int = 5  # deliveries without progress (consumers died) before the dead letter
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    grace_s: float = 30.0
    done_ttl_s: int = 14 * 24 * 3600
    # Request-style commands taken while their slots are busy wait (leased) up to this many,
    # so that the reads reach a chain step queued behind them (Actor.request_slots).
    request_backlog: int = 32


class Actor:
    """Subclasses set `name` and implement `handle`; `start`/`stop` own their resources."""

    name: ClassVar[ActorName]
    concurrency: int = 1
    # Slots of their own for request-style commands (a request_id: score, generate, chat),
    # beside `concurrency` for the rest, so that a run's step never waits behind interactive
    # work; 0: they share `concurrency`.
    request_slots: int = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        raise NotImplementedError


class Context:
    """What a handler sees of the runtime while it handles one command."""

    def __init__(
        self, runtime: Runtime, cmd: Base, entry_id: str, attempt: int, deliveries: int = 1
    ) -> None:
        self.runtime = runtime
        self.cmd = cmd
        self.entry_id = entry_id
        self.attempt = attempt
        self.deliveries = deliveries
        self.run_id = run_id_of(cmd)
        self.log = runtime.log.bind(command_id=cmd.command_id, attempt=attempt)
        if self.run_id:
            self.log = self.log.bind(run_id=self.run_id)

    @property
    def redis(self) -> Redis:
        return self.runtime.redis

    async def until_stopping(self) -> None:
        """Returns once the service is stopping: a long handler then saves its progress and
        raises Interrupted, rather than run on through the grace period."""
        await self.runtime._stopping.wait()

    @property
    def keys(self) -> Keys:
        return self.runtime.keys

    async def emit(self, *events: AnyEvent, send: Sequence[Base] = ()) -> None:
        """Write events (and their run-state change) now, fenced by the attempt number."""
        await self.runtime.commit(self, list(events), list(send), finish=False)

    async def progressed(self) -> None:
        """Record that this delivery moved the command on (say, a new checkpoint is on
        disk): the deliveries before it no longer count toward the poison limit. Fenced."""
        key = self.keys.progress(self.cmd.command_id)
        ttl = str(self.runtime.config.done_ttl_s)
        writes: list[Write] = [
            ("HSET", key, "delivered", str(self.deliveries)),
            ("EXPIRE", key, ttl),
        ]
        await self.runtime.commit(self, [], [], finish=False, writes=writes)

    async def cancel_requested(self) -> bool:
        if not self.run_id:
            return False
        return bool(await self.redis.exists(self.keys.cancel(self.run_id)))

    def fill(self, event: AnyEvent) -> AnyEvent:
        if not event.run_id:
            event.run_id = self.run_id
        if not event.user_id:
            event.user_id = self.cmd.user_id
        return event


class Runtime:
    """Runs one actor as one consumer of its command stream."""

    def __init__(
        self,
        actor: Actor,
        redis: Redis,
        *,
        keys: Keys | None = None,
        consumer: str,
        config: RuntimeConfig | None = None,
        blocking_redis: Redis | None = None,
        runs_dir: Path | None = None,
    ) -> None:
        self.actor = actor
        self.runs_dir = runs_dir  # where per-run logs.jsonl go (see actors.runtime.log)
        self.redis = redis
        self.keys = keys or Keys()
        self.consumer = consumer
        self.config = config or RuntimeConfig()
        self.stream = self.keys.cmd(actor.name)
        self.group = actor.name
        self.log = log.get("runtime").bind(actor=actor.name, consumer=consumer)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Entries of request-style tasks (running or waiting for a request slot); a task not
        # decoded yet counts as a chain step until it is (then _lanes_changed wakes the loop).
        self._requests: set[str] = set()
        self._request_slots = asyncio.Semaphore(max(1, actor.request_slots))
        self._lanes_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        # Blocking reads get their own connection (socket timeout > BLOCK). The group starts
        # at id 0: commands XADDed before the first actor started are not skipped.
        self.reader = GroupReader(
            redis, blocking_redis or redis, self.stream, self.group, consumer, lambda: "0"
        )
        # Lines logged while a run's command is handled: to the run's log stream.
        self.run_log = RunLog(redis, self.keys, ttl_s=retention.retention_s())
        self._renew = self.redis.register_script(_RENEW)
        self._commit = self.redis.register_script(_COMMIT)
        self._last_claim = 0.0

    # ----------------------------------------------------------------- reading
    async def ensure_group(self) -> None:
        await self.reader.ensure()

    async def _read(
        self, entry_id: str, count: int, block: int | None
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        return await self.reader.read(entry_id, count, block)

    async def _claim(self) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries idle past the lease: their consumer is dead (a live one renews)."""
        self._last_claim = time.monotonic()
        try:
            reply = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=int(self.config.lease_s * 1000),
                start_id="0-0",
                count=max(1, self._free()),
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return []
        # Never our own running entries (a renewal that came late), never more than we can run.
        claimed = [
            (i, f) for i, f in read_entries([[self.stream, reply[1]]]) if i not in self._tasks
        ]
        if claimed:
            self.log.info("claimed idle entries", ids=[i for i, _ in claimed])
        return claimed

    def _free(self) -> int:
        """How many entries may be read now: room for each, whichever kind it turns out to be."""
        if not self.actor.request_slots:
            return max(0, self.actor.concurrency - len(self._tasks))
        requests = len(self._requests)
        others = self.actor.concurrency - (len(self._tasks) - requests)
        return max(
            0, min(others, self.actor.request_slots + self.config.request_backlog - requests)
        )

    async def run(self, *, until_idle: bool = False) -> None:
        """Read and handle until stopped; with until_idle, handle what is queued and return."""
        await self.ensure_group()
        await self.actor.start()
        alive_key = self.keys.heartbeat(self.actor.name, self.consumer)
        every = max(0.5, self.config.lease_s / 3)
        heartbeat = asyncio.create_task(keep_alive(self.redis, alive_key, every))
        flusher = asyncio.create_task(self.run_log.run())
        try:
            await self._loop(until_idle)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            try:
                await self._drain()
                await self.actor.stop()
            finally:
                # Last: the lines of the handlers that just ended are written too.
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                await self.run_log.drain()

    async def _loop(self, until_idle: bool) -> None:
        # Our own pending entries first (a restart with the same consumer name), once each:
        # the cursor moves past every entry read, so one that stays pending (its handling
        # ended without an ack) is not read again at once, in a loop; XAUTOCLAIM brings it
        # back a lease later.
        backlog, cursor = True, "0"
        outages = 0
        while not self._stopping.is_set():
            try:
                if self._free() == 0:
                    await self._wait_for_slot()
                    continue
                if backlog:
                    entries = await self._read(cursor, self._free(), None)
                    backlog = bool(entries)
                    if entries:
                        cursor = entries[-1][0]
                    # Entries we are already handling come back in our PEL: skip those.
                    entries = [(i, f) for i, f in entries if i not in self._tasks]
                elif time.monotonic() - self._last_claim > self.config.lease_s / 3:
                    entries = await self._claim()
                else:
                    block = 50 if until_idle else self.config.block_ms
                    entries = await self._read(">", self._free(), block)
                for entry_id, fields in entries:
                    self._start(entry_id, fields)
                if until_idle and not entries and not self._tasks and not backlog:
                    # One last look for idle entries and new ones, then return.
                    claimed = await self._claim()
                    room = self._free() - len(claimed)
                    fresh = await self._read(">", room, None) if room > 0 else []
                    if not claimed and not fresh:
                        return
                    for entry_id, fields in claimed + fresh:
                        self._start(entry_id, fields)
                outages = 0
            except (RedisConnectionError, RedisTimeoutError) as e:
                # Redis restarting must not end the actor: wait, reconnect, and re-read our
                # own pending entries (a read's reply, or a handler's commit, may be lost).
                outages += 1
                backlog, cursor = True, "0"
                await sit_out_outage(outages, e, self._stopping, self.log)

    async def _wait_for_slot(self) -> None:
        self._lanes_changed.clear()
        stopping = asyncio.create_task(self._stopping.wait())
        lanes = asyncio.create_task(self._lanes_changed.wait())
        try:
            await asyncio.wait(
                [*self._tasks.values(), stopping, lanes], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
            lanes.cancel()

    def _start(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        if self.stopping:  # read just before the stop: it stays pending for the next start
            return
        task = asyncio.create_task(self._process(entry_id, fields))
        self._tasks[entry_id] = task

        def done(_t: asyncio.Task[None]) -> None:
            self._tasks.pop(entry_id, None)
            self._requests.discard(entry_id)

        task.add_done_callback(done)

    def stop(self) -> None:
        """Stop reading; `run` then drains running handlers within the grace period."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _drain(self) -> None:
        if not self._tasks:
            return
        self.log.info(
            "waiting for running handlers", count=len(self._tasks), grace_s=self.config.grace_s
        )
        _, pending = await asyncio.wait(list(self._tasks.values()), timeout=self.config.grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pending:
            self.log.warning(
                "handlers cancelled at shutdown; entries stay pending", count=len(pending)
            )

    # ---------------------------------------------------------------- handling
    async def _process(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        raw = fields.get(FIELD.encode(), b"")
        try:
            try:
                cmd = decode_command(self.actor.name, raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                await self._dead_letter_raw(entry_id, raw, f"undecodable payload: {e}")
                return
            except Exception as e:  # any failure to decode (RecursionError, MemoryError…)
                reason = f"undecodable payload: {type(e).__name__}: {e}"
                await self._dead_letter_raw(entry_id, raw, reason)
                return
            if self.actor.request_slots and request_id_of(cmd):
                self._requests.add(entry_id)
                self._lanes_changed.set()
            structlog.contextvars.bind_contextvars(command_id=cmd.command_id)
            if self.runs_dir is not None:
                structlog.contextvars.bind_contextvars(runs_dir=str(self.runs_dir))
            if rid := run_id_of(cmd):
                structlog.contextvars.bind_contextvars(run_id=rid)
                log.bind_run_log(self.run_log.put)
            await self._process_command(entry_id, raw, cmd)
        except Fenced as e:
            self.log.warning("fenced out: another consumer owns the command", command_id=str(e))
        except asyncio.CancelledError:
            raise
        except Exception:  # the runtime itself must never die of one entry
            self.log.exception("runtime error while processing entry", entry_id=entry_id)

    async def _process_command(self, entry_id: str, raw: bytes, cmd: Base) -> None:
        d = await self._begin(entry_id, cmd)
        if d.done:
            ctx = Context(self, cmd, entry_id, attempt=0)
            ctx.log.info("duplicate command acknowledged")
            dup = ctx.fill(CommandDuplicate(step=self.actor.name, command_id=cmd.command_id))
            await self._finish_unfenced(entry_id, [dup])
            return
        if d.since_progress > self.config.max_deliveries:
            reason = f"delivered {d.deliveries} times; its consumers kept dying"
            if d.since_progress < d.deliveries:
                reason = (
                    f"delivered {d.since_progress} times without progress "
                    f"({d.deliveries} in all); its consumers kept dying"
                )
            ctx = Context(self, cmd, entry_id, 0, d.deliveries)
            await self._dead_letter(ctx, raw, reason, d.deliveries)
            return
        ctx = Context(self, cmd, entry_id, d.attempt, d.deliveries)

        if isinstance(cmd, RunCancel):
            flag: Write = (
                "SET",
                self.keys.cancel(cmd.run_id),
                "1",
                "EX",
                str(self.config.done_ttl_s),
            )
            await self.commit(ctx, [CancelRequested()], [], finish=True, writes=[flag])
            return
        if is_chain_step(cmd) and d.cancelled:
            await self.commit(
                ctx,
                [RunCancelled(step=self.actor.name, message="cancelled before it started")],
                [],
                finish=True,
            )
            return

        renewer = asyncio.create_task(self._renew_lease(ctx, asyncio.current_task()))
        lane = (
            self._request_slots
            if self.actor.request_slots and request_id_of(cmd)
            else contextlib.nullcontext()
        )
        try:
            if d.since_progress > 1:
                # Its last delivery died without progress: back off before trying again,
                # so a command that kills its consumer is not retried in a tight loop.
                delay = min(
                    self.config.backoff_max_s,
                    self.config.backoff_s * 2 ** (d.since_progress - 2),
                )
                ctx.log.info(
                    "redelivered without progress; backing off",
                    deliveries=d.deliveries,
                    since_progress=d.since_progress,
                    delay_s=delay,
                )
                await asyncio.sleep(delay)
            async with lane:  # a request waits here, leased, for a request slot
                await self._handle_with_retries(ctx, raw, d.deliveries)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _handle_with_retries(self, ctx: Context, raw: bytes, deliveries: int) -> None:
        cmd = ctx.cmd
        chain = is_chain_step(cmd)
        if chain:
            await ctx.emit(
                StepStarted(
                    step=self.actor.name,
                    command_id=cmd.command_id,
                    attempt=ctx.attempt,
                    consumer=self.consumer,
                )
            )
        started = time.monotonic()
        while True:
            try:
                ctx.log.info("handling", kind=type(cmd).__struct_config__.tag)
                outcome = await self.actor.handle(cmd, ctx) or Outcome()
            except (Fenced, asyncio.CancelledError):
                raise
            except Interrupted as e:
                ctx.log.info("interrupted; the command stays pending", reason=str(e))
                return
            except Cancelled as e:
                await self.commit(
                    ctx,
                    [RunCancelled(step=self.actor.name, message=str(e) or "cancelled")],
                    [],
                    finish=True,
                )
                return
            except UserError as e:
                ctx.log.info("user error", error=str(e))
                await self._fail(ctx, "user", str(e))
                return
            except Exception as e:
                if self.stopping:
                    # Its process stopped with the service (Ctrl-C): not the command's fault.
                    ctx.log.info("interrupted by the stop; the command stays pending", error=str(e))
                    return
                tries = int(await self.redis.incr(self.keys.tries(cmd.command_id)))
                await self.redis.expire(self.keys.tries(cmd.command_id), self.config.done_ttl_s)
                message = f"{type(e).__name__}: {e}"
                if tries >= self.config.max_tries:
                    ctx.log.error("giving up after retries", tries=tries, error=message)
                    await self._dead_letter(
                        ctx, raw, message, deliveries, tb=traceback.format_exc()
                    )
                    return
                delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (tries - 1))
                ctx.log.warning(
                    "transient failure, retrying", tries=tries, delay_s=delay, error=message
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self.stopping:
                    return  # retried at the next start
                continue
            events = list(outcome.events)
            send = list(outcome.send)
            if chain:
                # The chain moves on from here, in the same transaction as the ack: the next
                # step is queued exactly when this one is recorded as done.
                events.append(
                    StepCompleted(
                        step=self.actor.name,
                        command_id=cmd.command_id,
                        duration_s=round(time.monotonic() - started, 3),
                    )
                )
                nxt = next_in_chain(cmd)
                send.extend(nxt)
                if not nxt:
                    events.append(RunCompleted(message=f"completed ({self.actor.name} was last)"))
            await self.commit(ctx, events, send, finish=True, writes=outcome.writes)
            return

    def _failure(self, ctx: Context, kind: ErrorKind, message: str) -> Outcome:
        """A request answers with the error; a chain step fails its run."""
        if request_id_of(ctx.cmd):
            return answer(self.keys, ctx.cmd, {"ok": False, "error_kind": kind, "message": message})
        if ctx.run_id:
            return Outcome(
                events=[RunFailed(step=self.actor.name, error_kind=kind, message=message)]
            )
        return Outcome()

    async def _fail(self, ctx: Context, kind: ErrorKind, message: str) -> None:
        failure = self._failure(ctx, kind, message)
        await self.commit(ctx, failure.events, [], finish=True, writes=failure.writes)

    async def _begin(self, entry_id: str, cmd: Base) -> Delivery:
        """Done record, delivery count, the delivery that last made progress, a new attempt
        number and the run's cancel flag, in one round trip. The attempt is taken even for a
        command that turns out to be done, dead or cancelled: fencing out a late worker of
        such a command is what we want."""
        attempt_key = self.keys.attempt(cmd.command_id)
        run_id = run_id_of(cmd)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.done(cmd.command_id))
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            pipe.hget(self.keys.progress(cmd.command_id), "delivered")
            pipe.incr(attempt_key)
            pipe.expire(attempt_key, self.config.done_ttl_s)
            if run_id:
                pipe.exists(self.keys.cancel(run_id))
            done, pending, progressed, attempt, _, *cancelled = await pipe.execute()
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        # Progress in delivery n means deliveries up to n made it; only later ones count.
        since = deliveries - int(progressed) if progressed else deliveries
        return Delivery(bool(done), deliveries, max(1, since), int(attempt), any(cancelled))

    # --------------------------------------------------------------- writing
    async def commit(
        self,
        ctx: Context,
        events: list[AnyEvent],
        send: list[Base],
        *,
        finish: bool,
        writes: Sequence[Write] = (),
    ) -> None:
        """Events + state (+ next commands, other writes, done record and XACK when
        finishing), atomically, and only while this consumer's attempt is still the current
        one (attempt 0: unfenced)."""
        events = [ctx.fill(e) for e in events]
        writes = [*writes, *(w for e in events for w in event_writes(self.keys, e))]
        writes += [w for cmd in send for w in command_writes(self.keys, cmd)]
        if finish:
            cid = ctx.cmd.command_id
            writes += [
                ("SET", self.keys.done(cid), "1", "EX", str(self.config.done_ttl_s)),
                ("DEL", self.keys.tries(cid), self.keys.progress(cid)),
                ("XACK", self.stream, self.group, ctx.entry_id),
            ]
        args: list[str | bytes] = [str(ctx.attempt)]
        for write in writes:
            args += [str(len(write)), *write]
        if not await self._commit(keys=[self.keys.attempt(ctx.cmd.command_id)], args=args):
            raise Fenced(ctx.cmd.command_id)
        if events:  # one line per commit: a log line costs as much as a round trip
            ctx.log.info("events", kinds=[type(e).__struct_config__.tag for e in events])

    async def _finish_unfenced(self, entry_id: str, events: list[AnyEvent]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for event in events:
                add_event(pipe, self.keys, event)
            pipe.xack(self.stream, self.group, entry_id)
            await pipe.execute()

    async def _dead_letter(
        self, ctx: Context, raw: bytes, reason: str, deliveries: int, tb: str = ""
    ) -> None:
        """Dead letter, the failure (a failed run or request, system error) and the ack, in
        one commit."""
        letter = self._letter(ctx.entry_id, raw, reason, deliveries, tb)
        dead: Write = ("XADD", self.keys.dead, "*", *(v for kv in letter.items() for v in kv))
        failure = self._failure(ctx, "system", reason)
        await self.commit(ctx, failure.events, [], finish=True, writes=[dead, *failure.writes])
        ctx.log.error("dead-lettered", reason=reason)

    async def _dead_letter_raw(self, entry_id: str, raw: bytes, reason: str) -> None:
        letter = self._letter(entry_id, raw, reason, 1, "")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead, letter)  # type: ignore[arg-type]  # redis-py's field type is invariant
            pipe.xack(self.stream, self.group, entry_id)
            await pipe.execute()
        self.log.error("dead-lettered undecodable payload", entry_id=entry_id, reason=reason)

    def _letter(
        self, entry_id: str, raw: bytes, reason: str, deliveries: int, tb: str
    ) -> dict[str, bytes | str]:
        return dead_letter(
            raw,
            error=reason,
            stream=self.stream,
            entry_id=entry_id,
            deliveries=deliveries,
            actor=self.actor.name,
            consumer=self.consumer,
            tb=tb,
        )

    async def _renew_lease(self, ctx: Context, handler: asyncio.Task[None] | None) -> None:
        """Keep our entry's idle time low while the handler lives; lose it → stop the handler."""
        attempt_key = self.keys.attempt(ctx.cmd.command_id)
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            try:
                owned = await self._renew(
                    keys=[self.stream, attempt_key],
                    args=[self.group, self.consumer, ctx.entry_id, str(ctx.attempt)],
                )
                if owned and ctx.run_id:
                    await self.redis.hset(
                        self.keys.run(ctx.run_id), "last_heartbeat_ts", str(time.time())
                    )
            except (RedisConnectionError, RedisTimeoutError) as e:
                # A blip must not end the renewals of a job that is still running.
                ctx.log.warning("lease renewal failed, retrying", error=str(e))
                continue
            if not owned:
                ctx.log.warning("lease lost: another consumer took the command over")
                if handler is not None:
                    handler.cancel()
                return


async def run_actors(
    actors: Sequence[Actor],
    url: str,
    *,
    keys: Keys,
    consumer_name: Callable[[ActorName], str],
    config: RuntimeConfig | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    until_idle: bool = False,
    install_signals: bool = True,
    stop: asyncio.Event | None = None,
    runs_dir: Path | None = None,
) -> None:
    """Run several actors in this process until SIGTERM/SIGINT, `stop` (or until idle)."""
    cfg = config or RuntimeConfig()
    redis = connect(url)
    runtimes: list[Runtime] = []
    blockers: list[Redis] = []
    for actor in actors:
        blocking = connect(url, blocking=True, block_ms=cfg.block_ms)
        blockers.append(blocking)
        runtimes.append(
            Runtime(
                actor,
                redis,
                keys=keys,
                consumer=consumer_name(actor.name),
                config=cfg,
                blocking_redis=blocking,
                runs_dir=runs_dir,
            )
        )
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for rt in runtimes:
            rt.stop()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_all)

    async def stop_on_event(event: asyncio.Event) -> None:
        await event.wait()
        stop_all()

    watcher = asyncio.create_task(stop_on_event(stop)) if stop is not None else None
    try:
        tasks = [asyncio.create_task(rt.run(until_idle=until_idle)) for rt in runtimes]
        if on_ready is not None:
            await on_ready()
        await asyncio.gather(*tasks)
    finally:
        if watcher is not None:
            watcher.cancel()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        for client in [*blockers, redis]:
            await client.aclose()
