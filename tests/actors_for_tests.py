"""A scriptable actor for runtime tests, runnable in its own process.

It handles `corpus.ingest` on the ingest stream; the command's `path` is a tiny script:
`sleep:S` (hold the command S seconds), `fail:N` (raise a transient error on the first N
tries), `user` (a user error), `pool-sleep:S` (sleep S seconds inside a pool child),
`progress:P:F` (report progress in deliveries up to P, finish in delivery F and later,
hang in the others: a consumer dying with the command, again and again), `ok` (finish at
once). Every finished command leaves one `corpus.ready` event, so tests
count effects by counting those events.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from actors.runtime import log
from actors.runtime.outcome import Outcome
from actors.runtime.pool import Pool
from actors.runtime.streams import Actor, Context, RuntimeConfig, run_actors
from protocol.commands import Base, CorpusIngest
from protocol.events import CorpusReady
from protocol.keys import Keys
from trainer.errors import UserError


def sleep_in_child(seconds: float, pid_file: str) -> int:
    Path(pid_file).write_text(str(os.getpid()))
    import time

    time.sleep(seconds)
    return os.getpid()


class ScriptedActor(Actor):
    name = "ingest"

    def __init__(self, work_dir: Path, concurrency: int = 1) -> None:
        self.work_dir = work_dir
        self.concurrency = concurrency
        self.pool = Pool(1)

    async def stop(self) -> None:
        self.pool.shutdown(wait=False)

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        match cmd:
            case CorpusIngest(path=script):
                verb, _, arg = script.partition(":")
                marker = self.work_dir / f"{cmd.command_id}.started"
                with marker.open("a") as f:
                    f.write(f"{os.getpid()} {ctx.attempt}\n")
                if verb == "sleep":
                    await asyncio.sleep(float(arg))
                elif verb == "fail":
                    tries = int(
                        await ctx.redis.incr(f"{ctx.keys.prefix}:test-fails:{cmd.command_id}")
                    )
                    if tries <= int(arg):
                        raise RuntimeError(f"transient failure number {tries}")
                elif verb == "user":
                    raise UserError("the corpus is empty")
                elif verb == "progress":
                    up_to, _, finish_at = arg.partition(":")
                    if ctx.deliveries <= int(up_to):
                        await ctx.progressed()
                    if ctx.deliveries < int(finish_at):
                        await asyncio.sleep(3600)
                elif verb == "pool-sleep":
                    pid_file = str(self.work_dir / f"{cmd.command_id}.pid")
                    await self.pool.run(sleep_in_child, float(arg), pid_file)
                return Outcome(events=[CorpusReady(corpus_id=cmd.corpus_id)])
            case _:
                return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    log.configure(json_logs=True)
    config = RuntimeConfig(lease_s=args.lease, block_ms=200, grace_s=args.grace, backoff_s=0.05)
    actor = ScriptedActor(Path(args.work_dir))
    asyncio.run(
        run_actors(
            [actor],
            args.url,
            keys=Keys(args.prefix),
            consumer_name=lambda _name: args.consumer,
            config=config,
        )
    )


if __name__ == "__main__":
    main()
