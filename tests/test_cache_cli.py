"""`model-trainer gc`: the data dir's cache of the store trimmed to MT_CACHE_GB (or
--limit-gb), least recently used first, what a running command holds kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest

from actors.cli import main as cli
from actors.cli.serve_cmds import gc_periodic
from actors.runtime.artifacts import entry_path, hold, publish, read_entry
from actors.runtime.config import Settings
from actors.runtime.store import LocalObjects, Store


async def test_gc_evicts_over_the_cache_limit_and_keeps_what_a_command_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 250 kB of cache: three 100 kB folders are over it.
    s = Settings(data_dir=tmp_path / "m", corpus_root=tmp_path / "corpus", cache_gb=250e3 / 1e9)
    store = Store(LocalObjects(tmp_path / "store"))
    dirs = []
    for i in range(3):
        d = s.run_dir(f"r{i}")
        d.mkdir(parents=True)
        (d / "model.bin").write_bytes(os.urandom(100_000))
        await publish(store, s, d, f"runs/r{i}/model")
        used = time.time() - 100 + i  # r0 used longest ago
        os.utime(entry_path(s, d), (used, used))
        dirs.append(d)
    await store.aclose()

    async with hold(s, dirs[0]):  # the least recently used, but a command is using it
        assert await cli.run(["gc"], s) == 0
    out = capsys.readouterr().out
    assert "evicted  runs/r1" in out and "in use   runs/r0 (kept)" in out
    assert "freed 100.0 kB of 300.0 kB (limit 250.0 kB); 1 evicted, 1 kept in use" in out
    assert dirs[0].is_dir() and not dirs[1].exists() and dirs[2].is_dir()
    assert read_entry(s, dirs[1]) is None

    # Under the limit now: nothing to do.
    assert await cli.run(["gc"], s) == 0
    assert "0 evicted, 0 kept in use" in capsys.readouterr().out

    # --limit-gb overrides MT_CACHE_GB; nothing is held any more.
    assert await cli.run(["gc", "--limit-gb", "0"], s) == 0
    out = capsys.readouterr().out
    assert "evicted  runs/r0" in out and "evicted  runs/r2" in out
    assert not dirs[0].exists() and not dirs[2].exists()
    assert (tmp_path / "store" / "runs" / "r0" / "model").is_dir()  # the store keeps them

    assert await cli.run(["gc", "--limit-gb", "-1"], s) == 2


async def test_the_periodic_pass_evicts_at_start_and_then_again(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "m", corpus_root=tmp_path / "corpus", cache_gb=150e3 / 1e9)
    store = Store(LocalObjects(tmp_path / "store"))

    async def add(name: str) -> Path:
        d = s.run_dir(name)
        d.mkdir(parents=True)
        (d / "model.bin").write_bytes(os.urandom(100_000))
        await publish(store, s, d, f"runs/{name}/model")
        used = time.time() - 100 + int(name[1:])  # r0 used longest ago
        os.utime(entry_path(s, d), (used, used))
        return d

    first, second = await add("r0"), await add("r1")
    task = asyncio.create_task(gc_periodic(s, every_s=0.05))
    try:
        for _ in range(100):  # the pass at start: r0, the older, goes
            if not first.exists():
                break
            await asyncio.sleep(0.02)
        assert not first.exists() and second.is_dir()
        third = await add("r2")  # over the limit again: a later pass evicts r1
        for _ in range(200):
            if not second.exists():
                break
            await asyncio.sleep(0.02)
        assert not second.exists() and third.is_dir()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.aclose()
