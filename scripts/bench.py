"""Benchmarks the README names: `scripts/bench <name> [options]`.

Each benchmark is `def bench_<name>(args) -> None`, registered in BENCHES, with its options
added by the matching entry of ARGUMENTS.

messaging: what the actor runtime costs on top of bare Redis Streams, on one server (the
embedded one, or REDIS_URL): throughput of a drained backlog and pickup latency (XADD →
handler start) under a steadily paced producer, first with a bare redis-py XREADGROUP +
XACK loop, then through `actors.runtime.streams.Runtime` with a trivial actor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from actors.runtime import log
from actors.runtime.connection import Redis, connect
from actors.runtime.embedded import EmbeddedRedis
from actors.runtime.outcome import Outcome
from actors.runtime.streams import Actor, Context, Runtime, RuntimeConfig
from protocol.codec import FIELD, encode
from protocol.commands import Base, CorpusIngest, ModelScore
from protocol.keys import ActorName, Keys
from scripts.bench_ml import bench_tokenizer, tokenizer_arguments
from scripts.bench_serve import bench_serve, bench_startup, serve_arguments, startup_arguments
from scripts.bench_store import bench_store, store_arguments
from scripts.bench_train import bench_train, train_arguments

# ------------------------------------------------------------------------------ helpers


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """REDIS_URL when set, else a fresh embedded server (AOF, fsync always) in a temp dir."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp, EmbeddedRedis(Path(tmp)) as s:
        yield s.url


class _Stamp(msgspec.Struct):
    command_id: str


_stamp = msgspec.json.Decoder(_Stamp)


@dataclass
class Result:
    label: str
    throughput: float  # commands/s draining a backlog
    p50_ms: float  # pickup latency under a paced producer
    p99_ms: float


# --------------------------------------------------------------------------- messaging

CommandKind = str  # "chain" (corpus.ingest) or "request" (model.score)


def make_command(kind: CommandKind, i: int, tag: str) -> Base:
    command_id = f"{tag}-{i}"
    if kind == "chain":
        return CorpusIngest(command_id=command_id, run_id=f"run-{tag}-{i}", corpus_id="c")
    return ModelScore(command_id=command_id, run_id=f"run-{tag}", request_id=command_id, text="x")


def actor_for(kind: CommandKind) -> ActorName:
    return "ingest" if kind == "chain" else "evaluator"


async def produce_backlog(redis: Redis, stream: str, payloads: list[bytes]) -> float:
    """XADD every payload, pipelined in chunks; returns XADDs per second."""
    t0 = time.perf_counter()
    for start in range(0, len(payloads), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for data in payloads[start : start + 1000]:
                pipe.xadd(stream, {FIELD: data})
            await pipe.execute()
    return len(payloads) / (time.perf_counter() - t0)


async def produce_paced(
    redis: Redis,
    stream: str,
    payloads: list[tuple[str, bytes]],
    rate: float,
    sent: dict[str, float],
) -> None:
    """One XADD every 1/rate seconds, on a fixed schedule (late sends do not shift it)."""
    t0 = time.perf_counter()
    for i, (command_id, data) in enumerate(payloads):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[command_id] = time.perf_counter()
        await redis.xadd(stream, {FIELD: data})


def entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """An XREADGROUP reply (RESP2) as [(entry id, fields)]."""
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    if isinstance(reply, list):
        for _stream, items in reply:
            out.extend((entry_id, fields) for entry_id, fields in items)
    return out


async def raw_drain(blocking: Redis, redis: Redis, stream: str, group: str, n: int, k: int) -> int:
    got = 0
    while got < n:
        reply = await blocking.xreadgroup(group, "raw", {stream: ">"}, count=k, block=1000)
        ids = [entry_id for entry_id, _ in entries(reply)]
        if ids:
            await redis.xack(stream, group, *ids)
        got += len(ids)
    return got


async def raw_latency(
    blocking: Redis,
    redis: Redis,
    stream: str,
    group: str,
    n: int,
    k: int,
    sent: dict[str, float],
) -> list[float]:
    waits: list[float] = []
    while len(waits) < n:
        reply = await blocking.xreadgroup(group, "raw", {stream: ">"}, count=k, block=1000)
        now = time.perf_counter()
        ids = []
        for entry_id, fields in entries(reply):
            ids.append(entry_id)
            waits.append(now - sent[_stamp.decode(fields[FIELD.encode()]).command_id])
        if ids:
            await redis.xack(stream, group, *ids)
    return waits


async def bench_raw(url: str, args: argparse.Namespace, batch: int) -> Result:
    redis, blocking = connect(url), connect(url, blocking=True)
    keys = Keys(f"bench-raw-{os.getpid()}-{batch}")
    stream, group = keys.cmd(actor_for(args.command)), "raw"
    try:
        await redis.xgroup_create(stream, group, id="$", mkstream=True)
        payloads = [encode(make_command(args.command, i, "raw")) for i in range(args.n)]
        xadd_rate = await produce_backlog(redis, stream, payloads)
        t0 = time.perf_counter()
        await raw_drain(blocking, redis, stream, group, args.n, batch)
        throughput = args.n / (time.perf_counter() - t0)
        print(f"  pipelined XADD: {xadd_rate:,.0f}/s")

        sent: dict[str, float] = {}
        paced = [
            (f"rawlat-{i}", encode(make_command(args.command, i, "rawlat")))
            for i in range(args.latency_n)
        ]
        consumer = asyncio.create_task(
            raw_latency(blocking, redis, stream, group, args.latency_n, batch, sent)
        )
        await produce_paced(redis, stream, paced, args.rate, sent)
        waits = await consumer
        await redis.delete(stream)
        return Result(
            f"raw XREADGROUP COUNT {batch} + XACK",
            throughput,
            percentile(waits, 50) * 1e3,
            percentile(waits, 99) * 1e3,
        )
    finally:
        await redis.aclose()
        await blocking.aclose()


class TrivialActor(Actor):
    """Does nothing: handle() only notes when it was called."""

    def __init__(self, concurrency: int, sent: dict[str, float], expect: int) -> None:
        self.concurrency = concurrency
        self.sent = sent
        self.waits: list[float] = []
        self.handled = 0
        self.expect = expect
        self.all_seen = asyncio.Event()

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        if cmd.command_id in self.sent:
            self.waits.append(time.perf_counter() - self.sent[cmd.command_id])
        self.handled += 1
        if self.handled >= self.expect:
            self.all_seen.set()
        return Outcome()


class TrivialIngest(TrivialActor):
    name = "ingest"


class TrivialEvaluator(TrivialActor):
    name = "evaluator"


def trivial_actor(
    kind: CommandKind, concurrency: int, sent: dict[str, float], expect: int
) -> TrivialActor:
    return (TrivialIngest if kind == "chain" else TrivialEvaluator)(concurrency, sent, expect)


async def bench_runtime(url: str, args: argparse.Namespace, concurrency: int) -> Result:
    redis = connect(url)
    blocking = connect(url, blocking=True, block_ms=1000)
    keys = Keys(f"bench-rt-{os.getpid()}-{concurrency}")
    name = actor_for(args.command)
    config = RuntimeConfig(lease_s=30.0, block_ms=1000)
    try:
        tag = f"rt{concurrency}"
        payloads = [encode(make_command(args.command, i, tag)) for i in range(args.n)]
        await produce_backlog(redis, keys.cmd(name), payloads)
        sent: dict[str, float] = {}
        actor = trivial_actor(args.command, concurrency, sent, args.n)
        rt = Runtime(
            actor, redis, keys=keys, consumer="bench", config=config, blocking_redis=blocking
        )
        t0 = time.perf_counter()
        await rt.run(until_idle=True)
        throughput = actor.handled / (time.perf_counter() - t0)
        assert actor.handled == args.n, f"handled {actor.handled} of {args.n}"

        actor = trivial_actor(args.command, concurrency, sent, args.latency_n)
        rt = Runtime(
            actor, redis, keys=keys, consumer="bench", config=config, blocking_redis=blocking
        )
        running = asyncio.create_task(rt.run())
        paced = [
            (f"{tag}lat-{i}", encode(make_command(args.command, i, f"{tag}lat")))
            for i in range(args.latency_n)
        ]
        await produce_paced(redis, keys.cmd(name), paced, args.rate, sent)
        await actor.all_seen.wait()
        rt.stop()
        await running
        await _delete_prefix(redis, keys.prefix)
        return Result(
            f"runtime, concurrency {concurrency}",
            throughput,
            percentile(actor.waits, 50) * 1e3,
            percentile(actor.waits, 99) * 1e3,
        )
    finally:
        await redis.aclose()
        await blocking.aclose()


async def _delete_prefix(redis: Redis, prefix: str) -> None:
    batch: list[bytes | str] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await redis.delete(*batch)
            batch = []
    if batch:
        await redis.delete(*batch)


async def _messaging(args: argparse.Namespace) -> None:
    with redis_server() as url:
        events = (
            "3 events: step.started, step.completed, run.completed + run-state hash"
            if args.command == "chain"
            else "no events: done record + ack only"
        )
        print(
            f"server {url}; {args.n} commands backlog, {args.latency_n} paced at "
            f"{args.rate:g}/s; command {args.command} ({events})"
        )
        raw = await bench_raw(url, args, args.batch)
        one = await bench_raw(url, args, 1)
        results = [raw, one]
        for concurrency in args.concurrency:
            results.append(await bench_runtime(url, args, concurrency))
    print()
    print(f"{'':36} {'cmd/s':>9} {'vs raw':>7} {'vs COUNT 1':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for r in results:
        ratio, ratio_one = r.throughput / raw.throughput, r.throughput / one.throughput
        print(
            f"{r.label:36} {r.throughput:9,.0f} {ratio:7.1%} {ratio_one:10.0%}"
            f" {r.p50_ms:7.2f} {r.p99_ms:7.2f}"
        )
    print()
    print(f"target: runtime throughput >= 50% of raw (COUNT {args.batch}), p99 pickup < 10 ms")
    for r in results[2:]:
        ok_tp = r.throughput >= 0.5 * raw.throughput
        ok_lat = r.p99_ms < 10.0
        print(
            f"  {r.label}: throughput {'met' if ok_tp else 'MISSED'}, "
            f"p99 {'met' if ok_lat else 'MISSED'}"
        )


def bench_messaging(args: argparse.Namespace) -> None:
    """Raw Redis Streams against the actor runtime: throughput and pickup latency."""
    # Production logging (JSON, one line per command and event) but into /dev/null, so the
    # cost is measured without a terminal in the loop; --log-level warning leaves it out.
    log.configure(json_logs=True)
    if args.log_level == "warning":
        import logging

        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    real_stderr = sys.stderr
    with Path(os.devnull).open("w") as null:
        sys.stderr = null  # the log lines go to stderr as they are written
        try:
            asyncio.run(_messaging(args))
        finally:
            sys.stderr = real_stderr


def messaging_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=5000, help="backlog size for throughput")
    p.add_argument("--batch", type=int, default=100, help="XREADGROUP COUNT of the raw loop")
    p.add_argument("--latency-n", type=int, default=1000, help="paced commands for latency")
    p.add_argument("--rate", type=float, default=100.0, help="paced producer, commands/s")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="actor concurrency values"
    )
    p.add_argument("--command", choices=["chain", "request"], default="chain")
    p.add_argument("--log-level", choices=["info", "warning"], default="info")


# ---------------------------------------------------------------------------- registry

BENCHES: dict[str, Callable[[argparse.Namespace], None]] = {
    "messaging": bench_messaging,
    "train": bench_train,
    "tokenizer": bench_tokenizer,
    "store": bench_store,
    "serve": bench_serve,
    "startup": bench_startup,
}
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "messaging": messaging_arguments,
    "train": train_arguments,
    "tokenizer": tokenizer_arguments,
    "store": store_arguments,
    "serve": serve_arguments,
    "startup": startup_arguments,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, bench in BENCHES.items():
        doc = (bench.__doc__ or sys.modules[__name__].__doc__ or "").strip().split("\n")[0]
        bench_parser = sub.add_parser(name, help=doc)
        if name in ARGUMENTS:
            ARGUMENTS[name](bench_parser)
    args = parser.parse_args(argv)
    BENCHES[args.bench](args)


if __name__ == "__main__":
    main()
