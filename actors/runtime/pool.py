"""The process pool each actor owns, and cancellation that reaches the child.

A ProcessPoolExecutor whose child died is broken for good: `Pool.run` rebuilds it and
raises `WorkerDied` (a transient error, so the runtime retries the command). Cancelling the
awaiting task does not stop a child, so cancellation is a flag file the child checks
between steps: cheap (one stat), visible across processes, and it survives the parent.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ParamSpec, TypeVar

from actors.runtime.config import Settings
from actors.runtime.streams import Actor

P = ParamSpec("P")
R = TypeVar("R")


class WorkerDied(RuntimeError):
    """The pool child running the job died (killed, out of memory); the job may be retried."""


@dataclass(frozen=True)
class CancelFlag:
    path: Path

    def set(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Pool:
    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn: a forked child would inherit the event loop, sockets and torch threads.
            ctx = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._executor

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        executor = self._get()
        try:
            return await loop.run_in_executor(executor, partial(fn, *args, **kwargs))
        except BrokenProcessPool as e:
            if self._executor is executor:
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            raise WorkerDied("a worker process died while running the job") from e

    def pids(self) -> list[int]:
        """Pids of the live children (tests kill them to prove the rebuild)."""
        if self._executor is None:
            return []
        procs = self._executor._processes or {}  # no public accessor for the children
        return [p for p in procs if p is not None]

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool; without `wait`, running children are terminated too (their
        commands stay pending in Redis and are retried elsewhere)."""
        if self._executor is not None:
            if not wait:
                for proc in (self._executor._processes or {}).values():
                    proc.terminate()
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None


class PoolActor(Actor):
    """An actor whose heavy work runs in a process pool it owns; the pool goes with it."""

    def __init__(self, settings: Settings, workers: int = 1) -> None:
        self.settings = settings
        self.pool = Pool(workers)

    async def stop(self) -> None:
        self.pool.shutdown(wait=False)
