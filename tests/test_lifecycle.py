"""Process lifecycle. Pool children leave signals to their parent and die with it; and
`model-trainer up` as a user runs it, in a process group of its own: Ctrl-C (SIGINT to the
whole group) mid-training and kill -9 of `up` both lose nothing, and `up` again on the same
data dir resumes the run from its checkpoint and completes it once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from actors.client.submit import plan_train, submit
from actors.runtime.config import Settings
from actors.runtime.connection import connect
from actors.runtime.embedded import EmbeddedRedis, free_port
from actors.runtime.pool import Pool
from protocol.commands import ChainCommand, ModelEvaluate, ModelTrain
from protocol.events import RunFailed, TrainStarted, event_kind
from protocol.keys import Keys
from tests.test_service import (
    alive,
    events_of,
    make_settings,
    tiny,
    trainer_steps,
    training_children,
    wait_for_end,
)

pytestmark = pytest.mark.timeout(300)
KEYS = Keys("mt")


async def test_a_pool_child_leaves_sigint_to_its_parent() -> None:
    pool = Pool(1)
    try:
        assert await pool.run(signal.getsignal, signal.SIGINT) == signal.SIG_IGN
        assert await pool.run(os.getsid, 0) != os.getsid(0), "not a session of its own"
        [pid] = pool.pids()
        job = asyncio.ensure_future(pool.run(time.sleep, 1.0))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGINT)
        await job  # ran to its end: no KeyboardInterrupt, no dead worker
        assert pool.pids() == [pid]
    finally:
        pool.shutdown()


def test_a_pool_child_exits_when_its_parent_is_killed() -> None:
    script = (
        "import asyncio, os, time\n"
        "from actors.runtime.pool import Pool\n"
        "pool = Pool(1)\n"
        "print(asyncio.run(pool.run(os.getpid)), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, "the pool child outlived its parent"
        time.sleep(0.05)


def test_a_child_whose_parent_died_while_it_started_exits(tmp_path: Path) -> None:
    """The parent is killed before the child gets to watch it (a trainer killed while its
    spare training child still imports): the child, adopted by now, exits all the same."""
    script = (
        "import multiprocessing as mp, os, sys, time\n"
        "from actors.runtime.pool import exit_with_parent\n"
        "def child() -> None:\n"
        "    time.sleep(1.0)\n"
        "    print('started', flush=True)\n"
        "    exit_with_parent()\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    p = mp.get_context('spawn').Process(target=child)\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    os._exit(0)\n"
    )
    main = tmp_path / "parent.py"  # a file: the spawned child imports its target from it
    main.write_text(script)
    parent = subprocess.Popen([sys.executable, str(main)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.wait()
    # It started well, after its parent was gone; then it saw that its parent was gone.
    assert parent.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


class Up:
    """One `python -m actors.cli.main up` in its own process group, its output in a file."""

    def __init__(self, settings: Settings, log: Path) -> None:
        env = {
            **os.environ,
            "MT_DATA_DIR": str(settings.data_dir),
            "MT_CORPUS_ROOT": str(settings.corpus_root),
            "MT_LEASE_S": str(settings.lease_s),
            "MT_HTTP_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1",
        }
        env.pop("REDIS_URL", None)
        env.pop("MT_PREFIX", None)
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "actors.cli.main", "up"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`up` did not exit in {timeout}s:\n{self.output()}") from None

    def interrupt(self) -> None:
        """Ctrl-C in its terminal: SIGINT to every process of the foreground group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.kill()
    # Whatever server the last one left running on the data dir goes too.
    url_file = tmp_path / "data" / "redis" / "url"
    if url_file.exists():
        import redis

        client = redis.Redis.from_url(url_file.read_text(), socket_timeout=2.0)
        try:
            client.shutdown(nosave=True)
        except RedisError:
            pass
        finally:
            client.close()


def training_run() -> list[ChainCommand]:
    """A tiny run that ends with its training (run.completed then): long enough to be
    interrupted after its first checkpoint, short enough to finish soon after the restart."""
    chain = plan_train(tiny(max_steps=80, checkpoint_every=10, eval_every=40, upload=False))
    return [c for c in chain if not isinstance(c, ModelEvaluate)]


async def service_url(up: Up, timeout: float = 60) -> str:
    """The Redis URL that `up` announces once its actors are ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert up.proc.poll() is None, f"`up` exited:\n{up.output()}"
        for line in up.output().splitlines():
            if line.startswith("redis: "):
                return line.split()[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"`up` was not ready in {timeout}s:\n{up.output()}")


async def until_checkpoint(run_dir: Path, up: Up, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline, f"no checkpoint was written:\n{up.output()}"
        assert up.proc.poll() is None, f"`up` exited:\n{up.output()}"
        await asyncio.sleep(0.1)


async def check_completed_once_resumed(redis: aioredis.Redis, run_id: str) -> None:
    assert await wait_for_end(redis, KEYS, run_id, timeout=180) == "completed"
    events = await events_of(redis, KEYS, run_id)
    kinds = [event_kind(e) for e in events]
    assert kinds.count("train.completed") == 1 and kinds.count("run.completed") == 1
    assert not [e for e in events if isinstance(e, RunFailed)]
    starts = [e for e in events if isinstance(e, TrainStarted)]
    assert len(starts) == 2 and starts[0].resumed_from_step == 0
    assert starts[1].resumed_from_step > 0


async def test_ctrl_c_on_up_keeps_the_run_pending_and_the_next_up_resumes_it(
    tmp_path: Path, ups: list[Up]
) -> None:
    settings = make_settings(tmp_path, "mt")
    chain = training_run()
    train_id = next(c.command_id for c in chain if isinstance(c, ModelTrain))
    ups.append(first := Up(settings, tmp_path / "up1.log"))
    redis = connect(await service_url(first))
    try:
        info = await submit(redis, KEYS, chain)
    finally:
        await redis.aclose()
    run_dir = settings.run_dir(info.run_id)
    await until_checkpoint(run_dir, first)
    first.interrupt()
    assert first.wait(60) == 0, first.output()
    assert "KeyboardInterrupt" not in first.output()
    # Nothing started during the shutdown, and the child is gone with its `up`.
    [child] = training_children(run_dir)
    assert not alive(child)

    # What the interrupted run left behind, read from the data dir's server alone.
    with EmbeddedRedis(settings.data_dir) as server:
        redis = connect(server.url)
        try:
            status = await redis.hget(KEYS.run(info.run_id), "status")
            assert status not in (b"failed", b"completed", b"cancelled"), status
            assert not await redis.exists(KEYS.tries(train_id)), "a retry was used"
            events = await events_of(redis, KEYS, info.run_id)
            assert not [e for e in events if isinstance(e, RunFailed)]
            assert len(trainer_steps(events)) == 1
            pending = await redis.xpending(KEYS.cmd("trainer"), "trainer")
            assert pending["pending"] == 1, "the train command is no longer pending"
        finally:
            await redis.aclose()

    ups.append(second := Up(settings, tmp_path / "up2.log"))
    redis = connect(await service_url(second))
    try:
        await check_completed_once_resumed(redis, info.run_id)
    finally:
        await redis.aclose()
    second.interrupt()
    assert second.wait(60) == 0, second.output()
    assert len(training_children(run_dir)) == 2


async def test_up_after_kill_9_of_up_adopts_the_server_and_resumes_the_run(
    tmp_path: Path, ups: list[Up]
) -> None:
    settings = make_settings(tmp_path, "mt")
    ups.append(first := Up(settings, tmp_path / "up1.log"))
    url = await service_url(first)
    redis = connect(url)
    try:
        info = await submit(redis, KEYS, training_run())
    finally:
        await redis.aclose()
    run_dir = settings.run_dir(info.run_id)
    await until_checkpoint(run_dir, first)
    first.kill()  # SIGKILL of `up` alone: its embedded server lives on, by design

    ups.append(second := Up(settings, tmp_path / "up2.log"))
    assert await service_url(second) == url, "the running server was not adopted"
    # A second `up` while this one lives is still refused, plainly.
    ups.append(third := Up(settings, tmp_path / "up3.log"))
    assert third.wait(60) == 2
    assert f"already runs on {settings.data_dir}" in third.output()
    assert f"pid {second.proc.pid}" in third.output()
    redis = connect(url)
    try:
        await check_completed_once_resumed(redis, info.run_id)
    finally:
        await redis.aclose()
    second.interrupt()
    assert second.wait(60) == 0, second.output()
    # The adopted server stopped with the `up` that adopted it.
    assert not (settings.data_dir / "redis" / "url").exists()
    redis = connect(url)
    try:
        with pytest.raises(RedisConnectionError):
            await redis.ping()
    finally:
        await redis.aclose()
