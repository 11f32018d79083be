"""The process pool each actor owns, and cancellation that reaches the child.

A ProcessPoolExecutor whose child died is broken for good: `Pool.run` rebuilds it and
raises `WorkerDied` (a transient error, so the runtime retries the command). Cancelling the
awaiting task does not stop a child, so cancellation is a flag file the child checks
between steps: cheap (one stat), visible across processes, and it survives the parent.

Children leave signals to their parent: each starts a session of its own and ignores SIGINT,
so a Ctrl-C in the terminal (SIGINT to the whole foreground group) reaches only the service,
which stops in order; and each exits when its parent dies, instead of living on unowned.

A pool may be given a warm-up that each child runs as it starts (importing torch and
transformers takes seconds), and `start` spawns the children ahead of the first job, so
that the first request does not pay for either.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ParamSpec, TypeVar

from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.streams import Actor

P = ParamSpec("P")
R = TypeVar("R")


class WorkerDied(RuntimeError):
    """The pool child running the job died (killed, out of memory); the job may be retried."""


_HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Start children inside this: SIGINT/SIGTERM are blocked in this thread meanwhile, and a
    child inherits the mask, so a Ctrl-C that lands before the child has detached stays
    pending in it (and is discarded by `detach`) instead of interrupting its start-up. The
    parent gets its own copy once unblocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def detach() -> None:
    """First thing in a child process: a session of its own, SIGINT ignored (the parent stops
    it through its flag files, or kills it), signals unblocked (see signals_held), and an
    exit as soon as its parent is gone."""
    with contextlib.suppress(OSError):  # already a group leader: keep its group
        os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
    exit_with_parent()


def exit_with_parent() -> None:
    """A child whose parent died (SIGKILL) has no one to report to, and a training child must
    not go on writing the run dir that the next trainer resumes from: it exits at once.
    The parent is the one that started this process, not whoever adopted it: a parent killed
    while this child was still starting up must not leave it waiting forever."""
    starter = multiprocessing.parent_process()
    parent = starter.pid if starter is not None and starter.pid else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start_child(warm_up: Callable[[], None] | None) -> None:
    """A pool child's initializer: detach, then the pool's warm-up, if any. A warm-up that
    fails is logged, not raised: an initializer error would break the pool for good, and
    the job that needs what failed to load reports the error itself."""
    detach()
    if warm_up is None:
        return
    try:
        warm_up()
    except Exception:
        log.get("pool").exception("pool child warm-up failed")


def _started() -> int:
    return os.getpid()


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
    """`workers` spawned children; `warm_up` (a module-level function: it is pickled by
    name) runs in each as it starts, before its first job."""

    def __init__(self, workers: int = 1, warm_up: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self.warm_up = warm_up
        self._executor: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn: a forked child would inherit the event loop, sockets and torch threads.
            ctx = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                initializer=start_child,
                initargs=(self.warm_up,),
            )
        return self._executor

    async def start(self) -> None:
        """Spawn every child now (each runs the warm-up as it starts) and return once one
        has answered: a job that comes meanwhile waits for a warm child, not for a new one.
        A pool whose child died is rebuilt by the next job, which then waits for its start."""
        await asyncio.gather(*(self.run(_started) for _ in range(self.workers)))

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        executor = self._get()
        try:
            # submit spawns the child it needs (while fewer than `workers` run and none is
            # idle), in this thread
            with signals_held():
                future = loop.run_in_executor(executor, partial(fn, *args, **kwargs))
            return await future
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

    def __init__(
        self, settings: Settings, workers: int = 1, warm_up: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.pool = Pool(workers, warm_up)
        self._starting: asyncio.Task[None] | None = None

    def start_pools(self, *pools: Pool) -> None:
        """Start these pools' children, one pool after the other, in the background: the
        actor is ready (and reads commands) at once, and the warm-ups do not all compete
        for the CPU with the service's own start."""

        async def start_all() -> None:
            for pool in pools:
                try:
                    await pool.start()
                except Exception:  # the pool is started again by its first job
                    log.get("pool").exception("starting a pool failed")

        self._starting = asyncio.create_task(start_all())

    async def pools_started(self) -> None:
        """Wait until start_pools has started its pools (or given up on one)."""
        if self._starting is not None:
            await asyncio.shield(self._starting)

    async def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        self.pool.shutdown(wait=False)
