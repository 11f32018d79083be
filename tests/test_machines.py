"""Four machines that share only Redis and the artifact store: each "machine" is a set of
`model-trainer` processes with a data dir of its own —

- A: `actor ingest` + `actor tokenizer`,
- B: `actor trainer`,
- C: `actor evaluator` + `actor uploader`,
- D: `control` (the HTTP endpoint).

A run submitted to D completes, and D serves its logs, curves, evaluation and artifact; the
model that D's download holds loads with transformers. Over the S3 store (a real SeaweedFS)
and over the Data Bank (a real HTTP server). The corpus file is the user's input: A and D
each have their own copy under their own corpus root (D checks the path on submit)."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import pytest

from actors.runtime.embedded import free_port
from protocol.events import ArtifactPointer
from protocol.keys import Keys
from protocol.requests import RunCreated
from protocol.state import RunState
from tests.test_service import corpus_text

pytestmark = pytest.mark.timeout(600)


@dataclass
class Machine:
    """One machine: its data dir and corpus root, and the processes it runs."""

    name: str
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def start(self, *argv: str) -> None:
        log = self.root / f"{'-'.join(argv)}.log"
        with log.open("ab") as out:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "actors.cli.main", *argv],
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def output(self) -> str:
        return "\n".join(
            f"--- {self.name}: {log.name}\n{log.read_text(errors='replace')[-6000:]}"
            for log in sorted(self.root.glob("*.log"))
        )

    def check_alive(self) -> None:
        for proc in self.procs:
            assert proc.poll() is None, f"a process of {self.name} exited:\n{self.output()}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def machine(
    tmp_path: Path, name: str, redis_url: str, keys: Keys, store_env: dict[str, str]
) -> Machine:
    root = tmp_path / name
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "play.txt").write_text(corpus_text(), encoding="utf-8")
    env = {
        **os.environ,
        **store_env,
        "REDIS_URL": redis_url,
        "MT_PREFIX": keys.prefix,
        "MT_DATA_DIR": str(root / "data"),
        "MT_CORPUS_ROOT": str(corpus),
        "MT_LEASE_S": "5",
        "OMP_NUM_THREADS": "1",
    }
    for var in ("MT_STORE_URL", "MT_DATA_BANK_URL", "MT_DATA_BANK_KEY"):
        if var not in store_env:
            env.pop(var, None)
    return Machine(name, root, env)


@pytest.fixture
def machines(
    tmp_path: Path, redis_url: str, keys: Keys, store_env: dict[str, str]
) -> Iterator[dict[str, Machine]]:
    made = {
        name: machine(tmp_path, name, redis_url, keys, store_env) for name in ("A", "B", "C", "D")
    }
    try:
        yield made
    finally:
        for m in made.values():
            m.stop()


async def wait_http(session: aiohttp.ClientSession, url: str, d: Machine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d.check_alive()
        try:
            async with session.get(f"{url}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"the control endpoint did not answer in {timeout}s:\n{d.output()}")


async def test_a_run_over_four_machines_sharing_only_redis_and_the_store(
    machines: dict[str, Machine], tmp_path: Path
) -> None:
    a, b, c, d = (machines[n] for n in "ABCD")
    a.start("actor", "ingest")
    a.start("actor", "tokenizer")
    b.start("actor", "trainer")
    c.start("actor", "evaluator")
    c.start("actor", "uploader")
    port = free_port()
    d.env["MT_HTTP_PORT"] = str(port)
    d.start("control", "--host", "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    everything = "\n".join(m.output() for m in machines.values())

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await wait_http(http, url, d, 60)
        body = {
            "corpus_path": "play.txt",
            "vocab_size": 300,
            "model_family": "gpt2",
            "model_size": "tiny",
            "max_seq_len": 32,
            "batch_size": 4,
            "max_steps": 8,
            "eval_every": 4,
            "checkpoint_every": 4,
            "warmup_steps": 2,
            "learning_rate": 2e-3,
            "threads": 1,
        }
        async with http.post(f"{url}/runs/train", json=body) as resp:
            assert resp.status == 202, await resp.text()
            created = msgspec.json.decode(await resp.read(), type=RunCreated)
        run_id = created.run_id
        assert created.steps == ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]

        deadline = time.monotonic() + 400
        while True:
            async with http.get(f"{url}/runs/{run_id}") as resp:
                state = msgspec.json.decode(await resp.read(), type=RunState)
            if state.status in ("completed", "failed", "cancelled"):
                break
            for m in machines.values():
                m.check_alive()
            everything = "\n".join(m.output() for m in machines.values())
            assert time.monotonic() < deadline, f"run still {state.status}:\n{everything}"
            await asyncio.sleep(0.5)
        everything = "\n".join(m.output() for m in machines.values())
        assert state.status == "completed", f"{state.message}\n{everything}"

        # Logs, curves and the evaluation: from Redis, through D.
        async with http.get(f"{url}/runs/{run_id}/logs") as resp:
            assert resp.status == 200
            logs = await resp.text()
        assert "preparing corpus" in logs, logs[-3000:]
        async with http.get(f"{url}/runs/{run_id}/curves") as resp:
            assert resp.status == 200
            curves = msgspec.json.decode(await resp.read(), type=dict[str, object])
        assert curves["train_loss"], curves
        async with http.get(f"{url}/runs/{run_id}/eval") as resp:
            assert resp.status == 200, await resp.text()
            evaluation = msgspec.json.decode(await resp.read(), type=dict[str, object])
        assert isinstance(evaluation["loss"], float)

        # The artifact: in the store, downloaded through D (which has no copy of anything).
        async with http.get(f"{url}/runs/{run_id}/artifact") as resp:
            pointer = msgspec.json.decode(await resp.read(), type=ArtifactPointer)
        assert pointer.storage == "store" and pointer.key == f"artifacts/run/{run_id}.tar.gz"
        async with http.get(f"{url}/artifacts/run/{run_id}") as resp:
            assert resp.status == 200, await resp.text()
            archive = await resp.read()
        assert len(archive) == pointer.size

    # Each machine holds only its own part; D none of the run's folders.
    assert (a.data_dir / "corpora" / created.corpus_id / "corpus.json").is_file()
    assert (b.data_dir / "runs" / run_id / "config.json").is_file()
    assert (c.data_dir / "runs" / run_id / "config.json").is_file()  # fetched by C
    assert not (d.data_dir / "runs").exists() and not (d.data_dir / "corpora").exists()
    assert not (b.data_dir / "store").exists() and not (c.data_dir / "artifacts" / "run").exists()

    out = tmp_path / "download"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / run_id)
    assert model.config.model_type == "gpt2"
