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
a busy moment of the machine weighs on both sides of it (target >= 0.9x). The other half
the issue names (training tokens/s with checkpoint upload on vs off) comes with the
checkpoint upload itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

TARGET = 0.9


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


def bench_store(args: argparse.Namespace) -> None:
    """Artifact store on S3 (SeaweedFS): upload/download MB/s, ours vs obstore alone."""
    asyncio.run(_bench(args))


def store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mb", type=int, default=100, help="size of the run folder")
    p.add_argument("--big", type=int, default=4, help="big files (weights, checkpoints)")
    p.add_argument("--small", type=int, default=300, help="small files (1-64 KB)")
    p.add_argument("--concurrency", type=int, default=8, help="files (and parts) at a time")
    p.add_argument("--repeat", type=int, default=7, help="pairs of runs (median kept)")
