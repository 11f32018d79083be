"""`scripts/bench store`: the artifact store's S3 backend against obstore alone.

A run folder of about --mb MB of random bytes (--big big files, the rest in --small small
ones, as a run dir holds weights plus many small files) goes up to and comes back from a
SeaweedFS server started here (actors.runtime.seaweed, as in the tests), two ways:

- through our store: `Store.put_folder` (each file hashed while it uploads, the manifest
  last) and `Store.get` (each file hashed while written to a temporary name, verified,
  renamed; the folder assembled aside and renamed into place);
- through obstore alone: the same files with `put_async` and `get_async` streamed to disk,
  the same number at a time, with nothing else (no hash, no manifest, no rename).

Each upload (and each download) of ours runs back to back with obstore's, first one then
the other in turn, --repeat times; the ratio is the median of these pairs' ratios, so that
a busy moment of the machine weighs on both sides of it (target >= 0.9x).

The second half: the training loop's tokens/s with checkpoint upload on vs off. A tiny
model trains in the trainer's own child process (actors.workers.trainer.Spare, the job the
actor gives it) while this process follows its progress as the actor does; "on", each
checkpoint the child completes is offered to the actor's CheckpointUploader (background
upload to the SeaweedFS server, forward-only pointer in an embedded Redis, pruning), "off",
nothing is uploaded. The tokens/s are the child's own (training steps only), so the ratio
is what the uploads (hashing, HTTP, the server, all on this machine) take from training.
Runs alternate on/off, --pairs times; the ratio is the median of the pairs' (target >=
0.97x). Each run also prints the CPU seconds of this process (the uploading side: staging,
hashing, HTTP) and of the S3 server, which here shares the machine's cores with training
(in production the store is elsewhere): on a small, busy machine they show where the
difference goes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from actors.workers.trainer import CheckpointUploader
    from trainer.config import TrainConfig

TARGET = 0.9
TRAIN_TARGET = 0.97


def make_run_folder(root: Path, mb: int, big: int, small: int, seed: int = 0) -> int:
    """Big files of equal size plus small ones of 1-64 KB; returns the total bytes."""
    rng = random.Random(seed)
    small_sizes = [rng.randint(1 << 10, 64 << 10) for _ in range(small)]
    big_size = max(0, (mb << 20) - sum(small_sizes)) // max(big, 1)
    files = {f"model-{i:02d}.safetensors": big_size for i in range(big)}
    files |= {f"logs/{i // 50:02d}/part-{i:04d}.jsonl": n for i, n in enumerate(small_sizes)}
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return sum(files.values())


async def _bench(args: argparse.Namespace) -> None:
    import obstore
    from obstore.store import S3Store

    from actors.runtime.seaweed import SeaweedS3
    from actors.runtime.store import Store
    from actors.runtime.store_s3 import CHUNK, PART, S3Objects

    with (
        tempfile.TemporaryDirectory(prefix="mt-bench-store-") as tmp,
        SeaweedS3(Path(tmp) / "s3") as server,
    ):
        src = Path(tmp) / "run"
        total = make_run_folder(src, args.mb, args.big, args.small)
        names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        mb = total / (1 << 20)
        print(
            f"SeaweedFS {server.endpoint}; run folder {mb:.1f} MB: {args.big} big files + "
            f"{args.small} small, {args.concurrency} files at a time, {args.repeat} pairs"
        )
        store = Store(
            S3Objects(
                server.bucket,
                "ours",
                endpoint=server.endpoint,
                access_key_id=server.access_key_id,
                secret_access_key=server.secret_access_key,
                region=server.region,
                max_concurrency=args.concurrency,
            ),
            concurrency=args.concurrency,
        )
        raw = S3Store(
            server.bucket,
            prefix="raw",
            endpoint=server.endpoint,
            access_key_id=server.access_key_id,
            secret_access_key=server.secret_access_key,
            region=server.region,
            client_options={"allow_http": True, "timeout": "1h"},
        )
        limit = asyncio.Semaphore(args.concurrency)

        async def raw_put(key: str) -> None:
            async def one(rel: str) -> None:
                async with limit:
                    await obstore.put_async(
                        raw,
                        f"{key}/{rel}",
                        src / rel,
                        chunk_size=PART,
                        max_concurrency=args.concurrency,
                    )

            await asyncio.gather(*(one(rel) for rel in names))

        async def raw_get(key: str, dest: Path) -> None:
            async def one(rel: str) -> None:
                async with limit:
                    got = await obstore.get_async(raw, f"{key}/{rel}")
                    path = dest / rel
                    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
                    f = await asyncio.to_thread(path.open, "wb")
                    try:
                        async for chunk in got.stream(min_chunk_size=CHUNK):
                            await asyncio.to_thread(f.write, chunk)
                    finally:
                        await asyncio.to_thread(f.close)

            await asyncio.gather(*(one(rel) for rel in names))

        async def timed(step: Awaitable[object]) -> float:
            t0 = time.perf_counter()
            await step
            return time.perf_counter() - t0

        # Warm both paths once (connections, the server's first volume), untimed.
        warm = await store.put_folder(src, "warm")
        await raw_put("warm")
        await store.get(warm, Path(tmp) / "warm-ours")
        await raw_get("warm", Path(tmp) / "warm-raw")
        times: dict[str, list[float]] = {
            k: [] for k in ("up ours", "up raw", "down ours", "down raw")
        }
        for i in range(args.repeat):
            out = Path(tmp) / f"out-{i}"
            # Each pair runs back to back, first one then the other in turn, so the load of
            # the machine at that moment weighs on both.
            ours_first = i % 2 == 0
            for who in ("ours", "raw") if ours_first else ("raw", "ours"):
                if who == "ours":
                    times["up ours"].append(await timed(store.put_folder(src, f"run-{i}")))
                else:
                    times["up raw"].append(await timed(raw_put(f"run-{i}")))
            for who in ("ours", "raw") if ours_first else ("raw", "ours"):
                if who == "ours":
                    times["down ours"].append(await timed(store.get(warm, out / "ours")))
                else:
                    times["down raw"].append(await timed(raw_get("warm", out / "raw")))
            for who in ("ours", "raw"):
                same = all(
                    (out / who / rel).read_bytes() == (src / rel).read_bytes() for rel in names
                )
                assert same, f"{who}: the downloaded folder differs from the source"
            shutil.rmtree(out)
        await store.aclose()

    print()
    print(f"{'':10} {'ours MB/s':>10} {'obstore MB/s':>13} {'ratio (median of pairs)':>24}")
    for what, label in (("up", "upload"), ("down", "download")):
        ours, raw_s = times[f"{what} ours"], times[f"{what} raw"]
        ratio = statistics.median(r / o for r, o in zip(raw_s, ours, strict=True))
        verdict = "met" if ratio >= TARGET else "MISSED"
        print(
            f"{label:10} {mb / statistics.median(ours):10.1f} {mb / statistics.median(raw_s):13.1f}"
            f" {ratio:23.2f}x  {verdict}"
        )
    print(f"\nMB/s: medians of {args.repeat} runs; target: ours >= {TARGET}x obstore alone")


@dataclass
class TrainRun:
    tokens_per_s: float  # the child's: training steps only
    wall_s: float  # job handed over → last checkpoint stored
    stored: int  # checkpoints uploaded (the newest wins: some are skipped)
    offered: int  # checkpoints the child wrote
    own_cpu_s: float  # this process (the actor's side: staging, hashing, HTTP)
    server_cpu_s: float  # the SeaweedFS server (on this machine here; remote in production)
    retries: int


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of process `pid`."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _train_once(
    config: TrainConfig,
    corpus: Path,
    tok: Path,
    run_dir: Path,
    cache: Path,
    uploader: CheckpointUploader | None,
    server_pid: int | None,
) -> TrainRun:
    from actors.workers.trainer import (
        ChildError,
        ChildProgress,
        ChildResult,
        ChildUserError,
        Spare,
        TrainJob,
        _get,
        checkpoint_on_disk,
    )

    spare = Spare.spawn()
    stored = 0
    try:
        job = TrainJob(
            config=config,
            corpus_dir=str(corpus),
            tokenizer_dir=str(tok),
            run_dir=str(run_dir),
            cancel_path=str(run_dir.parent / f"{run_dir.name}.cancel"),
            stop_path=str(run_dir.parent / f"{run_dir.name}.stop"),
            cache_dir=str(cache),
        )
        t0 = time.perf_counter()
        own0, server0 = _cpu_s(), _cpu_s(server_pid) if server_pid else 0.0
        spare.jobs.put(job)
        while True:
            msg = await asyncio.to_thread(_get, spare.out, 0.5)
            match msg:
                case ChildProgress(progress=p) if uploader is not None:
                    uploader.offer(checkpoint_on_disk(p.step, config.checkpoint_every))
                case ChildResult(result=result):
                    break
                case ChildUserError(message=m) | ChildError(message=m):
                    raise RuntimeError(f"training failed: {m}")
                case None if not spare.process.is_alive():
                    raise RuntimeError(f"the training child exited ({spare.process.exitcode})")
        if uploader is not None:
            await uploader.finish(result.steps)
            stored = uploader.stored
        return TrainRun(
            result.tokens_per_s,
            time.perf_counter() - t0,
            stored,
            -(-result.steps // config.checkpoint_every),
            _cpu_s() - own0,
            (_cpu_s(server_pid) - server0) if server_pid else 0.0,
            uploader.failures if uploader is not None else 0,
        )
    finally:
        if uploader is not None:
            await uploader.close()
        await asyncio.to_thread(spare.discard)


async def _bench_training(args: argparse.Namespace) -> None:
    from actors.runtime.connection import connect
    from actors.runtime.embedded import EmbeddedRedis
    from actors.runtime.seaweed import SeaweedS3
    from actors.runtime.store import Store
    from actors.runtime.store_s3 import S3Objects
    from actors.workers.trainer import CheckpointUploader
    from protocol.keys import Keys
    from trainer.config import load_config
    from trainer.corpus import CorpusConfig, prepare_corpus
    from trainer.tokenizer import TokenizerConfig, train_tokenizer

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with (
        tempfile.TemporaryDirectory(prefix="mt-bench-ckpt-") as tmp,
        SeaweedS3(Path(tmp) / "s3") as server,
        EmbeddedRedis(Path(tmp) / "redis") as redis_server,
    ):
        work = Path(tmp)
        corpus = work / "corpus"
        prepare_corpus("shakespeare", corpus, CorpusConfig())
        tok = work / "tok"
        train_tokenizer(corpus, tok, TokenizerConfig(tokenizer_kind="char", min_frequency=1))
        config = load_config(
            {
                "model_family": "gpt2",
                "model_size": args.model_size,
                "max_seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "eval_every": args.steps,
                "checkpoint_every": args.checkpoint_every,
                "warmup_steps": 10,
                "threads": args.threads,
                "device": args.device,
                "precision": "fp32",
                "compile": "off",
            }
        )
        redis = connect(redis_server.url)
        store = Store(
            S3Objects(
                server.bucket,
                "bench",
                endpoint=server.endpoint,
                access_key_id=server.access_key_id,
                secret_access_key=server.secret_access_key,
                region=server.region,
            )
        )
        keys, logger = Keys("bench"), structlog.stdlib.get_logger("bench")
        cache = work / "cache"
        print(
            f"\ntraining: gpt2 {args.model_size}, seq {args.seq_len}, batch {args.batch_size}, "
            f"{args.steps} steps, a checkpoint every {args.checkpoint_every}, "
            f"{args.threads} thread(s), {args.device}; {args.pairs} on/off pairs"
        )
        # Once untimed: the recipe cache, the first imports, the server's first volume.
        warm = CheckpointUploader(store, redis, keys, "warm", work / "warm", 2, logger, 0)
        pid = server.process.pid if server.process is not None else None
        await _train_once(config, corpus, tok, work / "warm", cache, warm, pid)
        runs: dict[str, list[TrainRun]] = {"on": [], "off": []}
        try:
            for i in range(args.pairs):
                for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    run_id = f"{mode}-{i}"
                    up = (
                        CheckpointUploader(store, redis, keys, run_id, work / run_id, 2, logger, 0)
                        if mode == "on"
                        else None
                    )
                    r = await _train_once(config, corpus, tok, work / run_id, cache, up, pid)
                    runs[mode].append(r)
                    print(
                        f"  {run_id:6} {r.tokens_per_s:10.0f} tokens/s  {r.wall_s:6.1f} s  cpu s: "
                        f"here {r.own_cpu_s:5.1f}, S3 server {r.server_cpu_s:5.1f}"
                        + (f"  {r.stored} of {r.offered} checkpoints stored" if up else "")
                    )
                    shutil.rmtree(work / run_id, ignore_errors=True)
        finally:
            await store.aclose()
            await redis.aclose()
    on, off = runs["on"], runs["off"]
    ratio = statistics.median(a.tokens_per_s / b.tokens_per_s for a, b in zip(on, off, strict=True))
    verdict = "met" if ratio >= TRAIN_TARGET else "MISSED"
    print()
    print(f"{'':10} {'upload on':>10} {'upload off':>11} {'ratio (median of pairs)':>24}")
    print(
        f"{'tokens/s':10} {statistics.median(r.tokens_per_s for r in on):10.0f} "
        f"{statistics.median(r.tokens_per_s for r in off):11.0f} {ratio:23.2f}x  {verdict}"
    )
    for label, get in (
        ("wall s", lambda r: r.wall_s),
        ("cpu s here", lambda r: r.own_cpu_s),
        ("cpu s S3", lambda r: r.server_cpu_s),
    ):
        print(
            f"{label:10} {statistics.median(map(get, on)):10.1f} "
            f"{statistics.median(map(get, off)):11.1f}"
        )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(
        f"\ntarget: tokens/s with checkpoint upload >= {TRAIN_TARGET}x without; upload retries: "
        f"{sum(r.retries for r in on)}"
    )


def bench_store(args: argparse.Namespace) -> None:
    """Artifact store on S3 (SeaweedFS): upload/download MB/s, ours vs obstore alone; then
    training tokens/s with checkpoint upload on vs off."""
    if args.part in ("all", "io"):
        asyncio.run(_bench(args))
    if args.part in ("all", "train"):
        asyncio.run(_bench_training(args))


def store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=["all", "io", "train"], default="all")
    p.add_argument("--mb", type=int, default=100, help="size of the run folder")
    p.add_argument("--big", type=int, default=4, help="big files (weights, checkpoints)")
    p.add_argument("--small", type=int, default=300, help="small files (1-64 KB)")
    p.add_argument("--concurrency", type=int, default=8, help="files (and parts) at a time")
    p.add_argument("--repeat", type=int, default=7, help="pairs of runs (median kept)")
    p.add_argument("--model-size", default="tiny", help="training half: gpt2 size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--pairs", type=int, default=3, help="on/off pairs of training runs")
