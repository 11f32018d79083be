"""The data dir as a bounded cache of the store: publish, fetch by pointer on another
machine, least-recently-used eviction that spares what a command holds and what the store
does not have."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from actors.runtime.artifacts import entry_path, fetch, gc, hold, publish, read_entry
from actors.runtime.config import Settings
from actors.runtime.store import LocalObjects, Store
from trainer.errors import UserError


def machine(root: Path) -> Settings:
    return Settings(data_dir=root, corpus_root=root / "corpus")


def folder(path: Path, size: int) -> Path:
    path.mkdir(parents=True)
    (path / "a.bin").write_bytes(os.urandom(size))
    (path / "sub").mkdir()
    (path / "sub" / "b.txt").write_text("b")
    return path


async def test_publish_here_fetch_there(tmp_path: Path) -> None:
    store = Store(LocalObjects(tmp_path / "shared-store"))
    a, b = machine(tmp_path / "a"), machine(tmp_path / "b")
    src = folder(a.corpus_dir("c1"), 1000)
    pointer = await publish(store, a, src, "corpora/c1")
    assert read_entry(a, src) is not None
    got = await fetch(store, b, pointer, b.corpus_dir("c1"), "corpus c1")
    assert (got / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (got / "sub" / "b.txt").read_text() == "b"
    # Here already, same version: not fetched again (a change here would be overwritten).
    (got / "marker").write_text("kept")
    assert (await fetch(store, b, pointer, got, "corpus c1") / "marker").is_file()
    # Without a pointer, only what is on this machine will do.
    with pytest.raises(UserError, match="corpus c9 is not on this machine"):
        await fetch(store, b, None, b.corpus_dir("c9"), "corpus c9")
    await store.aclose()


async def test_gc_evicts_least_recently_used_but_not_held_or_unstored(tmp_path: Path) -> None:
    store = Store(LocalObjects(tmp_path / "store"))
    s = machine(tmp_path / "m")
    dirs = []
    for i in range(4):
        d = folder(s.run_dir(f"r{i}"), 100_000)
        await publish(store, s, d, f"runs/r{i}")
        used = time.time() - 100 + i  # last used: r0 longest ago, r3 most recently
        os.utime(entry_path(s, d), (used, used))
        dirs.append(d)
    unstored = folder(s.run_dir("training"), 500_000)  # no entry: never evicted
    async with hold(s, dirs[0]):  # the oldest, but in use
        report = gc(s, limit_bytes=250_000)
    assert report.in_use == ["runs/r0"]
    assert report.evicted == ["runs/r1", "runs/r2"]
    assert dirs[0].is_dir() and not dirs[1].exists() and not dirs[2].exists() and dirs[3].is_dir()
    assert unstored.is_dir() and (tmp_path / "store" / "runs" / "r1").is_dir()
    assert read_entry(s, dirs[1]) is None
    # Evicted, then needed again: fetched back from the store by its pointer.
    pointer = await store.put_folder(dirs[3], "runs/r3")  # same content, same pointer
    entry = read_entry(s, dirs[3])
    assert entry is not None and entry.pointer == pointer
    report = gc(s, limit_bytes=0)
    assert report.evicted == ["runs/r0", "runs/r3"]
    back = await fetch(store, s, pointer, dirs[3], "run r3")
    assert (back / "sub" / "b.txt").read_text() == "b"
    await store.aclose()
