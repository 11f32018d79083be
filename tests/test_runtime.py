"""The delivery guarantees of DESIGN.md, proven against a real server with the ScriptedActor:
crashes lose nothing and finish a command exactly once, live jobs keep their lease, late
workers are fenced out, poison goes to the dead letters, the error policy (retry, user
error, give up), idempotency, a server crash and a FLUSHALL, graceful stop, a dead pool
child, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog

from actors.runtime.connection import connect, keep_alive
from actors.runtime.embedded import EmbeddedRedis
from actors.runtime.outcome import DEAD_LETTER_KEEP_BYTES, Outcome
from actors.runtime.streams import Actor, Context, Fenced, Runtime, RuntimeConfig
from protocol.codec import FIELD, MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH, decode_event, encode
from protocol.commands import Base, CorpusIngest, RunCancel, TokenizerTrain
from protocol.events import (
    AnyEvent,
    CancelRequested,
    CommandDuplicate,
    CorpusReady,
    RunCancelled,
    RunFailed,
    StepStarted,
)
from protocol.keys import Keys
from protocol.state import RunState
from tests.actors_for_tests import ScriptedActor

REPO = Path(__file__).resolve().parent.parent
LEASE = 1.0
CONFIG = RuntimeConfig(lease_s=LEASE, block_ms=100, backoff_s=0.05, grace_s=5.0)


# ------------------------------------------------------------------------------ helpers
def ingest(command_id: str, script: str, run_id: str = "r1") -> CorpusIngest:
    """A ScriptedActor command; its corpus id is its command id, to count effects by."""
    return CorpusIngest(command_id=command_id, run_id=run_id, corpus_id=command_id, path=script)


async def send(redis: aioredis.Redis, keys: Keys, *cmds: Base) -> list[str]:
    ids = []
    for cmd in cmds:
        entry_id = await redis.xadd(keys.cmd("ingest"), {FIELD: encode(cmd)})
        ids.append(_text(entry_id))
    return ids


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _stream(redis: aioredis.Redis, key: str) -> list[dict[str, bytes]]:
    """Every entry of a stream, field names as text, values as the bytes stored."""
    out = []
    for _, fields in await redis.xrange(key) or []:
        assert fields is not None
        out.append({_text(k): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()})
    return out


async def events(redis: aioredis.Redis, keys: Keys) -> list[AnyEvent]:
    return [decode_event(fields[FIELD]) for fields in await _stream(redis, keys.events)]


async def ready_count(redis: aioredis.Redis, keys: Keys, command_id: str) -> int:
    """How many times the command's effect (one corpus.ready) was recorded."""
    evs = await events(redis, keys)
    return sum(isinstance(e, CorpusReady) and e.corpus_id == command_id for e in evs)


async def pending(redis: aioredis.Redis, keys: Keys) -> list[tuple[str, str, int]]:
    """(entry id, consumer, times delivered) of every pending entry of the ingest group."""
    rows = await redis.xpending_range(keys.cmd("ingest"), "ingest", min="-", max="+", count=100)
    return [(_text(r["message_id"]), _text(r["consumer"]), int(r["times_delivered"])) for r in rows]


async def is_up(redis: aioredis.Redis, keys: Keys, consumer: str) -> bool:
    return bool(await redis.exists(keys.heartbeat("ingest", consumer)))


async def is_done(redis: aioredis.Redis, keys: Keys, command_id: str) -> bool:
    return bool(await redis.exists(keys.done(command_id)))


def started(work: Path, command_id: str) -> list[tuple[int, int]]:
    """(pid, attempt) for every time the ScriptedActor began handling the command."""
    marker = work / f"{command_id}.started"
    if not marker.exists():
        return []
    return [(int(p), int(a)) for p, a in (ln.split() for ln in marker.read_text().splitlines())]


def read_pid(path: Path) -> int:
    """The pid a pool child wrote, 0 until it is there (the write is not atomic)."""
    text = path.read_text() if path.exists() else ""
    return int(text) if text.strip().isdigit() else 0


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 45.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def exited(proc: subprocess.Popen[bytes], timeout: float) -> int:
    await eventually(lambda: proc.poll() is not None, f"pid {proc.pid} to exit", timeout)
    return proc.wait()


async def dead_letters(redis: aioredis.Redis, keys: Keys) -> dict[str, dict[str, bytes]]:
    """Dead letters by the entry id they came from."""
    return {letter["entry_id"].decode(): letter for letter in await _stream(redis, keys.dead)}


class ActorProcs:
    """ScriptedActor processes (python -m tests.actors_for_tests); all killed at the end."""

    def __init__(self, url: str, keys: Keys, work: Path, logs: Path) -> None:
        self.url, self.keys, self.work, self.logs = url, keys, work, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, consumer: str, *, grace: float = 5.0, url: str = "", keys: Keys | None = None
    ) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-m",
            "tests.actors_for_tests",
            "--url",
            url or self.url,
            "--prefix",
            (keys or self.keys).prefix,
            "--consumer",
            consumer,
            "--work-dir",
            str(self.work),
            "--lease",
            str(LEASE),
            "--grace",
            str(grace),
        ]
        with (self.logs / f"{consumer}.log").open("ab") as log:
            proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture
def procs(redis_url: str, keys: Keys, work: Path, tmp_path: Path) -> Iterator[ActorProcs]:
    actors = ActorProcs(redis_url, keys, work, tmp_path)
    try:
        yield actors
    finally:
        actors.kill_all()


def runtime(
    redis: aioredis.Redis,
    keys: Keys,
    actor: Actor,
    consumer: str = "t-0",
    config: RuntimeConfig = CONFIG,
) -> Runtime:
    return Runtime(actor, redis, keys=keys, consumer=consumer, config=config)


# ------------------------------------------------------------------ crashes and leases
@pytest.mark.parametrize("taker", ["a", "b"], ids=["restarted-same-consumer", "second-consumer"])
async def test_command_of_a_killed_actor_is_finished_exactly_once(
    taker: str, redis: aioredis.Redis, keys: Keys, procs: ActorProcs, work: Path
) -> None:
    entry_id, _ = await send(redis, keys, ingest("c-kill", "sleep:1"), ingest("c-next", "ok"))
    a = procs.start("a")
    await eventually(lambda: len(started(work, "c-kill")) == 1, "a to start c-kill")
    a.kill()
    a.wait()
    assert await pending(redis, keys) == [(entry_id, "a", 1)]  # still there, still a's

    survivor = procs.start(taker)
    await eventually(lambda: is_done(redis, keys, "c-kill"), "c-kill to finish")
    await eventually(lambda: is_done(redis, keys, "c-next"), "c-next to finish")
    pids = [pid for pid, _ in started(work, "c-kill")]
    assert pids == [a.pid, survivor.pid]
    assert [att for _, att in started(work, "c-kill")] == [1, 2]
    assert await ready_count(redis, keys, "c-kill") == 1
    assert await ready_count(redis, keys, "c-next") == 1
    assert await pending(redis, keys) == []
    starts = [e for e in await events(redis, keys) if isinstance(e, StepStarted)]
    assert sorted((e.command_id, e.attempt, e.consumer) for e in starts) == [
        ("c-kill", 1, "a"),
        ("c-kill", 2, taker),
        ("c-next", 1, taker),
    ]


async def test_live_handler_keeps_its_lease_and_a_dead_one_loses_it(
    redis: aioredis.Redis, keys: Keys, procs: ActorProcs, work: Path
) -> None:
    a, b = procs.start("a"), procs.start("b")
    for name in ("a", "b"):
        await eventually(partial(is_up, redis, keys, name), f"{name} to be up", timeout=10)

    # Three leases long, while the other consumer keeps looking for idle entries.
    await send(redis, keys, ingest("c-long", "sleep:3"))
    await eventually(lambda: len(started(work, "c-long")) == 1, "someone to start c-long")
    [(owner, _)] = started(work, "c-long")
    await eventually(lambda: is_done(redis, keys, "c-long"), "c-long to finish")
    assert started(work, "c-long") == [(owner, 1)]  # never taken over
    assert await ready_count(redis, keys, "c-long") == 1

    # The same with a process that dies: taken over after the lease.
    await send(redis, keys, ingest("c-dies", "sleep:1.5"))
    await eventually(lambda: len(started(work, "c-dies")) == 1, "someone to start c-dies")
    [(pid, _)] = started(work, "c-dies")
    victim, survivor = (a, b) if pid == a.pid else (b, a)
    victim.kill()
    victim.wait()
    await eventually(lambda: is_done(redis, keys, "c-dies"), "c-dies to be taken over")
    assert started(work, "c-dies") == [(victim.pid, 1), (survivor.pid, 2)]
    assert await ready_count(redis, keys, "c-dies") == 1
    assert await pending(redis, keys) == []


class GatedActor(Actor):
    """Holds each command until released; keeps its context and what interrupted it."""

    name = "ingest"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.ctx: Context | None = None
        self.interrupted: BaseException | None = None

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        assert isinstance(cmd, CorpusIngest)
        self.ctx = ctx
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError as e:
            self.interrupted = e
            raise
        return Outcome(events=[CorpusReady(corpus_id=cmd.corpus_id)])


async def test_a_fenced_out_worker_cannot_record_completion(
    redis: aioredis.Redis, keys: Keys
) -> None:
    [entry_id] = await send(redis, keys, ingest("c-fence", "ok"))
    actor = GatedActor()
    # A long lease: the renewer stays out of the way, the commit itself must refuse.
    rt = runtime(redis, keys, actor, config=replace(CONFIG, lease_s=30.0))
    task = asyncio.create_task(rt.run(until_idle=True))
    try:
        await asyncio.wait_for(actor.entered.wait(), 10)
        assert actor.ctx is not None and actor.ctx.attempt == 1
        await redis.incr(keys.attempt("c-fence"))  # what a takeover by another consumer does
        actor.release.set()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert not await is_done(redis, keys, "c-fence")
    assert await ready_count(redis, keys, "c-fence") == 0
    kinds = [type(e) for e in await events(redis, keys)]
    assert kinds == [StepStarted]  # no corpus.ready, no step.completed
    assert [p[0] for p in await pending(redis, keys)] == [entry_id]  # the new owner acks it
    with pytest.raises(Fenced):  # and any later write of the old attempt is refused
        await rt.commit(actor.ctx, [CorpusReady(corpus_id="c-fence")], [], finish=True)
    assert not await is_done(redis, keys, "c-fence")


async def test_a_worker_whose_attempt_was_taken_over_is_stopped(
    redis: aioredis.Redis, keys: Keys
) -> None:
    await send(redis, keys, ingest("c-stolen", "ok"))
    actor = GatedActor()  # never released: only the renewer can end the handler
    rt = runtime(redis, keys, actor, config=replace(CONFIG, lease_s=0.3, grace_s=0.1))
    task = asyncio.create_task(rt.run(until_idle=True))
    try:
        await asyncio.wait_for(actor.entered.wait(), 10)
        await redis.incr(keys.attempt("c-stolen"))
        await eventually(lambda: actor.interrupted is not None, "the renewer to stop the handler")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert isinstance(actor.interrupted, asyncio.CancelledError)
    assert not await is_done(redis, keys, "c-stolen")
    assert await ready_count(redis, keys, "c-stolen") == 0


# ------------------------------------------------------------------------- error policy
async def test_poison_payloads_are_dead_lettered_and_the_actor_goes_on(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    stream = keys.cmd("ingest")
    valid = msgspec.json.decode(encode(ingest("c-bad", "ok")))
    poison: dict[bytes, str] = {
        b"\x00\xff\xfe not json": "JSON is malformed",
        b'{"kind": "corpus.shred", "command_id": "c1"}': "Invalid value 'corpus.shred'",
        msgspec.json.encode({**valid, "validation_fraction": 0.9}): "$.validation_fraction",
        encode(
            TokenizerTrain(command_id="c2", run_id="r1", tokenizer_id="t", corpus_id="k")
        ): "Invalid value 'tokenizer.train'",
    }
    ids = {raw: _text(await redis.xadd(stream, {FIELD: raw})) for raw in poison}
    no_data = _text(await redis.xadd(stream, {"other": "x"}))
    await send(redis, keys, ingest("c-good", "ok"))

    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)

    dead = await dead_letters(redis, keys)
    assert set(dead) == {*ids.values(), no_data}
    for raw, reason in poison.items():
        letter = dead[ids[raw]]
        assert letter["data"] == raw
        assert letter["error"].decode().startswith("undecodable payload: ")
        assert reason in letter["error"].decode()
        assert letter["stream"].decode() == stream
        assert letter["actor"] == b"ingest"
    assert b"truncated" in dead[no_data]["error"]
    assert await ready_count(redis, keys, "c-good") == 1
    assert await pending(redis, keys) == []


async def test_transient_failures_are_retried_with_backoff_then_succeed(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    await send(redis, keys, ingest("c-flaky", "fail:2"))
    t0 = time.monotonic()
    rt = runtime(redis, keys, ScriptedActor(work), config=replace(CONFIG, backoff_s=0.15))
    await rt.run(until_idle=True)
    assert time.monotonic() - t0 >= 0.15 + 0.3  # two doubling backoffs
    assert len(started(work, "c-flaky")) == 3
    assert await ready_count(redis, keys, "c-flaky") == 1
    assert await redis.xlen(keys.dead) == 0
    assert not await redis.exists(keys.tries("c-flaky"))
    assert RunState.from_hash("r1", await _hash(redis, keys, "r1")).status == "completed"


async def test_a_command_that_keeps_failing_is_dead_lettered_as_a_system_error(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    [entry_id] = await send(redis, keys, ingest("c-broken", "fail:99", run_id="r-broken"))
    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)
    assert len(started(work, "c-broken")) == CONFIG.max_tries
    dead = await dead_letters(redis, keys)
    assert dead[entry_id]["error"] == b"RuntimeError: transient failure number 3"
    assert b"transient failure number 3" in dead[entry_id]["traceback"]
    assert dead[entry_id]["data"] == encode(ingest("c-broken", "fail:99", run_id="r-broken"))
    failed = [e for e in await events(redis, keys) if isinstance(e, RunFailed)]
    assert [(e.run_id, e.error_kind, e.step) for e in failed] == [("r-broken", "system", "ingest")]
    assert await ready_count(redis, keys, "c-broken") == 0
    assert await pending(redis, keys) == []
    state = RunState.from_hash("r-broken", await _hash(redis, keys, "r-broken"))
    assert state.status == "failed"


async def deliver_to_dying_consumers(redis: aioredis.Redis, keys: Keys, deliveries: int) -> str:
    """Queue a command and deliver it `deliveries` times to consumers that die with it: the
    first reads it, each next one takes it over (XCLAIM, as XAUTOCLAIM does once the lease
    ran out). It is left idle past the lease, so a live consumer claims it next."""
    command_id = f"c-dying-{deliveries}"
    [entry_id] = await send(redis, keys, ingest(command_id, "ok", run_id=f"r-{command_id}"))
    stream = keys.cmd("ingest")
    await redis.xgroup_create(stream, "ingest", id="0")
    await redis.xreadgroup("ingest", "dying-1", {stream: ">"}, count=1)
    idle = int(LEASE * 1000) * 10
    for n in range(2, deliveries + 1):
        await redis.xclaim(stream, "ingest", f"dying-{n}", 0, [entry_id], idle=idle)
    rows = await redis.xpending_range(stream, "ingest", min=entry_id, max=entry_id, count=1)
    assert int(rows[0]["times_delivered"]) == deliveries
    return entry_id


@pytest.mark.parametrize(
    "before",
    [CONFIG.max_deliveries, CONFIG.max_deliveries - 1],
    ids=["one-delivery-too-many", "max-deliveries-still-handled"],
)
async def test_a_command_whose_consumers_keep_dying_is_dead_lettered(
    before: int, redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    entry_id = await deliver_to_dying_consumers(redis, keys, before)
    command_id, run_id = f"c-dying-{before}", f"r-c-dying-{before}"

    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)  # one delivery more

    assert await pending(redis, keys) == []
    assert await is_done(redis, keys, command_id)
    state = RunState.from_hash(run_id, await _hash(redis, keys, run_id))
    if before < CONFIG.max_deliveries:  # max_deliveries deliveries: still handled
        assert len(started(work, command_id)) == 1
        assert await ready_count(redis, keys, command_id) == 1
        assert await redis.xlen(keys.dead) == 0
        assert state.status == "completed"
        return
    assert started(work, command_id) == []  # never handled again
    reason = f"delivered {before + 1} times; its consumers kept dying"
    letter = (await dead_letters(redis, keys))[entry_id]
    assert letter["error"].decode() == reason
    assert letter["deliveries"] == str(before + 1).encode()
    assert letter["data"] == encode(ingest(command_id, "ok", run_id=run_id))
    failed = [e for e in await events(redis, keys) if isinstance(e, RunFailed)]
    assert [(e.run_id, e.error_kind, e.step, e.message) for e in failed] == [
        (run_id, "system", "ingest", reason)
    ]
    assert (state.status, state.message) == ("failed", f"ingest failed: {reason}")


def nested_ingest(command_id: str, levels: int) -> bytes:
    """A corpus.ingest whose `rest` nests `levels` commands deep (the decoder recurses)."""
    head = encode(ingest(command_id, "ok"))[:-1] + b',"rest":['
    return head * levels + encode(ingest(command_id, "ok")) + b"]}" * levels


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_reads(redis: aioredis.Redis) -> int:
    """XREADGROUP and XAUTOCLAIM calls the server has answered so far."""
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("xreadgroup", "xautoclaim")
    )


async def test_deep_and_oversized_entries_pending_across_a_restart_are_dead_lettered_at_once(
    redis: aioredis.Redis, keys: Keys, procs: ActorProcs, work: Path
) -> None:
    stream = keys.cmd("ingest")
    deep = nested_ingest("c-deep", 3000)  # ~280 KB: RecursionError in the decoder
    # A valid command, just too big: a chain of 5,000 steps.
    step = msgspec.json.decode(encode(ingest("c-big", "ok")))
    big = msgspec.json.encode({**step, "rest": [step] * 5_000})
    assert len(big) > MAX_PAYLOAD_BYTES
    deep_id = _text(await redis.xadd(stream, {FIELD: deep}))
    big_id = _text(await redis.xadd(stream, {FIELD: big}))
    await send(redis, keys, ingest("c-good", "ok"))
    # A previous life of consumer "a" read both and died before acknowledging them.
    await redis.xgroup_create(stream, "ingest", id="0")
    await redis.xreadgroup("ingest", "a", {stream: ">"}, count=2)
    assert [(i, c) for i, c, _ in await pending(redis, keys)] == [(deep_id, "a"), (big_id, "a")]

    a = procs.start("a")
    await eventually(lambda: is_done(redis, keys, "c-good"), "c-good to complete behind them")
    dead = await dead_letters(redis, keys)
    assert set(dead) == {deep_id, big_id}
    assert dead[deep_id]["error"] == (
        f"undecodable payload: payload nested more than {MAX_PAYLOAD_DEPTH} levels deep".encode()
    )
    assert (
        dead[big_id]["error"]
        == (
            f"undecodable payload: payload of {len(big)} bytes is over the limit of "
            f"{MAX_PAYLOAD_BYTES} bytes"
        ).encode()
    )
    for entry_id, raw in ((deep_id, deep), (big_id, big)):
        assert dead[entry_id]["data"] == raw[:DEAD_LETTER_KEEP_BYTES]
        assert dead[entry_id]["size"] == str(len(raw)).encode()
        assert dead[entry_id]["deliveries"] == b"1"
    assert await pending(redis, keys) == []
    assert started(work, "c-deep") == started(work, "c-big") == []

    # Idle again: no entry read over and over, no CPU burnt (a busy loop reads thousands).
    reads, cpu, t0 = await stream_reads(redis), cpu_seconds(a.pid), time.monotonic()
    await asyncio.sleep(1.0)
    window = time.monotonic() - t0
    assert await stream_reads(redis) - reads < 20 * window  # BLOCK 200 ms reads + claims
    assert cpu_seconds(a.pid) - cpu < 0.25 * window
    assert a.poll() is None


async def test_dead_letters_keep_a_bounded_prefix_and_the_size(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    garbage = [bytes([n]) * (8 * 1024 * 1024) for n in range(3)]  # 3 x 8 MB of garbage
    ids = [_text(await redis.xadd(keys.cmd("ingest"), {FIELD: g})) for g in garbage]
    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)
    dead = await dead_letters(redis, keys)
    for entry_id, raw in zip(ids, garbage, strict=True):
        assert dead[entry_id]["data"] == raw[:DEAD_LETTER_KEEP_BYTES]
        assert dead[entry_id]["size"] == str(8 * 1024 * 1024).encode()
    kept = await redis.memory_usage(keys.dead)
    assert kept is not None and kept < 4 * DEAD_LETTER_KEEP_BYTES


async def deliver_until_pending_again(
    redis: aioredis.Redis, keys: Keys, work: Path, command_id: str, deliveries: int, up_to: int
) -> None:
    """Deliver a pending command `deliveries` times more to a consumer that dies with it:
    each life reads it again (its own backlog), starts it, reports progress in deliveries up
    to `up_to`, and is stopped with the handler cut off, leaving the entry pending."""
    config = replace(CONFIG, grace_s=0.0)
    for _ in range(deliveries):
        n = len(started(work, command_id)) + 1
        rt = runtime(redis, keys, ScriptedActor(work), consumer="dies", config=config)
        task = asyncio.create_task(rt.run())
        try:
            await eventually(partial(started_times, work, command_id, n), f"delivery {n}")
            if n <= up_to:
                check = partial(progress_in, redis, keys, command_id, n)
                await eventually(check, f"progress in delivery {n}")
        finally:
            rt.stop()
            await asyncio.wait_for(task, 5)


def started_times(work: Path, command_id: str, n: int) -> bool:
    return len(started(work, command_id)) == n


async def progress_in(redis: aioredis.Redis, keys: Keys, command_id: str, n: int) -> bool:
    """Whether the progress record names delivery `n`."""
    return await redis.hget(keys.progress(command_id), "delivered") == str(n).encode()


@pytest.mark.parametrize(
    ("up_to", "dead_at"),
    [(10, 0), (0, CONFIG.max_deliveries + 1), (3, 3 + CONFIG.max_deliveries + 1)],
    ids=["progress-each-time", "never-progressing", "stops-progressing"],
)
async def test_only_deliveries_without_progress_count_toward_the_poison_limit(
    up_to: int, dead_at: int, redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    # Progress in the first `up_to` deliveries, finish in the 11th, hang in the others.
    cmd = ingest("c-resumed", f"progress:{up_to}:11", run_id="r-resumed")
    [entry_id] = await send(redis, keys, cmd)
    lives = dead_at - 1 if dead_at else 10
    await deliver_until_pending_again(redis, keys, work, "c-resumed", lives, up_to)
    assert await pending(redis, keys) == [(entry_id, "dies", lives)]

    await runtime(redis, keys, ScriptedActor(work), consumer="dies").run(until_idle=True)

    assert await pending(redis, keys) == []
    state = RunState.from_hash("r-resumed", await _hash(redis, keys, "r-resumed"))
    if not dead_at:  # ten deliveries that each made progress: resumed, completed
        assert len(started(work, "c-resumed")) == 11
        assert await ready_count(redis, keys, "c-resumed") == 1
        assert await redis.xlen(keys.dead) == 0
        assert state.status == "completed"
        assert not await redis.exists(keys.progress("c-resumed"))
        return
    assert len(started(work, "c-resumed")) == dead_at - 1  # never handled again
    reason = f"delivered {dead_at} times; its consumers kept dying"
    if up_to:
        reason = (
            f"delivered {dead_at - up_to} times without progress ({dead_at} in all); "
            "its consumers kept dying"
        )
    letter = (await dead_letters(redis, keys))[entry_id]
    assert (letter["error"].decode(), letter["deliveries"]) == (reason, str(dead_at).encode())
    assert (state.status, state.message) == ("failed", f"ingest failed: {reason}")


async def test_a_redelivery_without_progress_backs_off(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    await send(redis, keys, ingest("c-crashy", "progress:0:4", run_id="r-crashy"))
    await deliver_until_pending_again(redis, keys, work, "c-crashy", 3, 0)
    config = replace(CONFIG, backoff_s=0.2)
    t0 = time.monotonic()
    await runtime(redis, keys, ScriptedActor(work), consumer="dies", config=config).run(
        until_idle=True
    )
    # The 4th delivery, 3 deliveries since progress: 0.2 x 2^2 s before it starts.
    assert time.monotonic() - t0 >= 0.8
    assert await ready_count(redis, keys, "c-crashy") == 1


async def test_a_user_error_fails_at_once_and_is_not_retried(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    await send(redis, keys, ingest("c-user", "user", run_id="r-user"))
    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)
    assert len(started(work, "c-user")) == 1
    failed = [e for e in await events(redis, keys) if isinstance(e, RunFailed)]
    assert [(e.error_kind, e.message) for e in failed] == [("user", "the corpus is empty")]
    assert await redis.xlen(keys.dead) == 0
    assert not await redis.exists(keys.tries("c-user"))
    assert await pending(redis, keys) == []
    state = RunState.from_hash("r-user", await _hash(redis, keys, "r-user"))
    assert (state.status, state.message) == ("failed", "ingest failed: the corpus is empty")


async def test_the_same_command_id_twice_is_carried_out_once(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    await send(redis, keys, ingest("c-twice", "ok"), ingest("c-twice", "ok"))
    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)
    assert len(started(work, "c-twice")) == 1
    assert await ready_count(redis, keys, "c-twice") == 1
    dups = [e for e in await events(redis, keys) if isinstance(e, CommandDuplicate)]
    assert [(e.command_id, e.step) for e in dups] == [("c-twice", "ingest")]
    assert await pending(redis, keys) == []


async def _hash(redis: aioredis.Redis, keys: Keys, run_id: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.run(run_id))
    return {_text(k): _text(v) for k, v in raw.items()}


# ------------------------------------------------------------------- the server crashing
async def test_a_machine_crash_loses_no_acknowledged_or_pending_command(
    tmp_path: Path, procs: ActorProcs, work: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "crash")  # its own server: its AOF is under test
    server.start()
    keys = Keys("crash")
    client = connect(server.url)
    try:
        await send(client, keys, ingest("c1", "ok"), ingest("c2", "ok"))
        a = procs.start("a", url=server.url, keys=keys)
        await eventually(lambda: is_done(client, keys, "c2"), "c1, c2 to finish")
        pending_id, waiting_id = await send(
            client, keys, ingest("c3", "sleep:1.5"), ingest("c4", "ok")
        )
        await eventually(lambda: len(started(work, "c3")) == 1, "a to start c3")
        a.kill()
        server.kill()  # both at once, as a power cut would
        a.wait()
        await client.aclose()

        server.start()  # same data dir, same port
        client = connect(server.url)
        for cid in ("c1", "c2"):  # acknowledged: their effects and done records are back
            assert await is_done(client, keys, cid)
            assert await ready_count(client, keys, cid) == 1
        assert await pending(client, keys) == [(pending_id, "a", 1)]  # delivered, not acked
        assert await client.xlen(keys.cmd("ingest")) == 4  # and c4 still queued
        assert await client.get(keys.attempt("c3")) == b"1"

        rt = runtime(client, keys, ScriptedActor(work), consumer="a")
        await rt.run(until_idle=True)  # restarted with the same name: its own entry first
        assert [att for _, att in started(work, "c3")] == [1, 2]
        for cid in ("c1", "c2", "c3", "c4"):
            assert await ready_count(client, keys, cid) == 1, cid
            assert len(started(work, cid)) == (2 if cid == "c3" else 1), cid
        assert await pending(client, keys) == []
        assert waiting_id > pending_id
    finally:
        await client.aclose()
        server.stop()


async def test_a_running_actor_rides_out_a_server_restart_and_a_flushall(
    tmp_path: Path, work: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "restart")
    server.start()
    keys = Keys("restart")
    rt_redis = connect(server.url)
    blocking = connect(server.url, blocking=True, block_ms=CONFIG.block_ms)
    rt = Runtime(
        ScriptedActor(work),
        rt_redis,
        keys=keys,
        consumer="w-0",
        config=CONFIG,
        blocking_redis=blocking,
    )
    task = asyncio.create_task(rt.run())
    client = connect(server.url)
    try:
        await send(client, keys, ingest("c1", "ok"))
        await eventually(lambda: is_done(client, keys, "c1"), "c1 to finish")

        server.kill()
        await client.aclose()
        server.start()
        client = connect(server.url)
        await send(client, keys, ingest("c2", "ok"))
        await eventually(lambda: is_done(client, keys, "c2"), "c2 after the restart")
        assert not task.done()

        await client.flushall()  # Redis lost everything: the group must come back by itself
        await send(client, keys, ingest("c3", "ok"))
        await eventually(lambda: is_done(client, keys, "c3"), "c3 after FLUSHALL")
        groups = await client.xinfo_groups(keys.cmd("ingest"))
        assert [g["name"] for g in groups] == [b"ingest"]
        assert await ready_count(client, keys, "c3") == 1
        assert [len(started(work, c)) for c in ("c1", "c2", "c3")] == [1, 1, 1]
    finally:
        rt.stop()
        await asyncio.wait_for(task, 10)
        for c in (client, rt_redis, blocking):
            await c.aclose()
        server.stop()


# -------------------------------------------------------------------- stopping, pools
async def test_sigterm_lets_a_short_handler_finish(
    redis: aioredis.Redis, keys: Keys, procs: ActorProcs, work: Path
) -> None:
    await send(redis, keys, ingest("c-short", "sleep:0.8"))
    a = procs.start("a", grace=5.0)
    await eventually(lambda: len(started(work, "c-short")) == 1, "a to start c-short")
    a.send_signal(signal.SIGTERM)
    assert await exited(a, timeout=5.0) == 0
    assert await is_done(redis, keys, "c-short")
    assert await ready_count(redis, keys, "c-short") == 1
    assert await pending(redis, keys) == []


async def test_sigterm_leaves_a_long_handler_pending_for_another_consumer(
    redis: aioredis.Redis, keys: Keys, procs: ActorProcs, work: Path
) -> None:
    [entry_id] = await send(redis, keys, ingest("c-long", "sleep:2.5"))
    a = procs.start("a", grace=0.3)
    await eventually(lambda: len(started(work, "c-long")) == 1, "a to start c-long")
    t0 = time.monotonic()
    a.send_signal(signal.SIGTERM)
    assert await exited(a, timeout=5.0) == 0
    assert time.monotonic() - t0 < 2.0  # cut off after the grace, not waited for
    assert not await is_done(redis, keys, "c-long")
    assert await pending(redis, keys) == [(entry_id, "a", 1)]

    b = procs.start("b")
    await eventually(lambda: is_done(redis, keys, "c-long"), "b to take c-long over")
    assert started(work, "c-long") == [(a.pid, 1), (b.pid, 2)]
    assert await ready_count(redis, keys, "c-long") == 1


async def test_a_killed_pool_child_is_replaced_and_the_command_retried(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    await send(redis, keys, ingest("c-pool", "pool-sleep:1.0"))
    actor = ScriptedActor(work)
    task = asyncio.create_task(runtime(redis, keys, actor).run(until_idle=True))
    pid_file = work / "c-pool.pid"
    try:
        await eventually(lambda: read_pid(pid_file) > 0, "the pool child to start", timeout=30)
        child = read_pid(pid_file)
        os.kill(child, signal.SIGKILL)
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        actor.pool.shutdown(wait=False)
    assert read_pid(pid_file) not in (0, child)  # a second child ran it
    assert len(started(work, "c-pool")) == 2  # the WorkerDied try, then the retry
    assert await ready_count(redis, keys, "c-pool") == 1
    assert await redis.xlen(keys.dead) == 0
    assert await pending(redis, keys) == []


async def test_a_cancelled_run_starts_no_further_step(
    redis: aioredis.Redis, keys: Keys, work: Path
) -> None:
    await send(
        redis, keys, RunCancel(command_id="x-cancel", run_id="r-c"), ingest("x-step", "ok", "r-c")
    )
    await runtime(redis, keys, ScriptedActor(work)).run(until_idle=True)
    assert await redis.exists(keys.cancel("r-c"))
    evs = await events(redis, keys)
    assert [type(e) for e in evs] == [CancelRequested, RunCancelled]
    assert isinstance(evs[1], RunCancelled) and evs[1].step == "ingest"
    assert started(work, "x-step") == []
    assert await is_done(redis, keys, "x-step")
    assert RunState.from_hash("r-c", await _hash(redis, keys, "r-c")).status == "cancelled"
    assert await pending(redis, keys) == []


# ---------------------------------------------------------------------------- heartbeat
async def test_a_heartbeat_whose_write_fails_logs_it_and_keeps_beating(
    redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    # A real refusal from the server: a user that may not SET, allowed to later.
    user, password = f"{keys.prefix}-hb", "hb-secret"
    await redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["~*"], commands=["+@all", "-set"]
    )
    limited = aioredis.Redis.from_url(redis_url, protocol=2, username=user, password=password)
    key = keys.heartbeat("ingest", "hb-0")

    async def beating() -> bool:
        return bool(await redis.exists(key))

    with structlog.testing.capture_logs() as logs:
        beat = asyncio.create_task(keep_alive(limited, key, 0.05))
        try:
            await eventually(lambda: len(logs) >= 2, "two failed beats to be logged", timeout=5)
            assert not beat.done() and not await beating()
            await redis.acl_setuser(user, commands=["+set"])
            await eventually(beating, "a beat once writes are allowed again")
            assert not beat.done()
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            await limited.aclose()
            await redis.acl_deluser(user)
    failed = [e for e in logs if e["event"] == "heartbeat write failed"]
    assert len(failed) >= 2 and all(e["log_level"] == "warning" for e in failed)
    assert "NoPermissionError" in failed[0]["error"] and failed[0]["heartbeat"] == key
