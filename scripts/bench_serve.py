"""serve and startup: the service as a user meets it — `model-trainer up` (the real command, in
a subprocess, on a fresh temp data dir with its own embedded server), driven over HTTP.

serve: p50/p99 of `POST /runs/{id}/generate` (32 new tokens) until its result is read back
(`GET …/generate/{request_id}`, polled), against trainer.evaluate.generation called in this
process on the same model, loaded once; the same for score. The two are interleaved request
by request, so both see the same machine.

startup: `model-trainer up` until /readyz answers ready, and `POST /runs/train` (a tiny run)
until its first train.progress event arrives (the run's events as server-sent events).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
GENERATE_TOKENS = 32
PROMPT = "ROMEO:\nBut soft, what light"
# The service's configuration comes from the environment: none of the caller's may leak in
# (a REDIS_URL would point the bench at another server, an API key would refuse its calls).
_DROPPED_ENV = ("REDIS_URL", "MT_API_KEY", "MT_STORE_URL", "MT_DATA_BANK_URL", "MT_PREFIX")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def corpus_text(max_chars: int) -> str:
    """The start of the shakespeare corpus (real text, no download), whole lines."""
    from trainer.corpus import shakespeare_files

    parts: list[str] = []
    size = 0
    for path in shakespeare_files():
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    return text[: text.rfind("\n") + 1]


def child_env() -> dict[str, str]:
    """The environment of the processes the benches start: this checkout's code first, none
    of the caller's service configuration."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Up:
    """A running `model-trainer up`."""

    proc: asyncio.subprocess.Process
    base: str  # http://127.0.0.1:<port>
    data_dir: Path
    ready_s: float  # from the start of the command until /readyz answered ready
    log: Path  # its output


async def wait_ready(
    session: aiohttp.ClientSession, base: str, proc: asyncio.subprocess.Process, limit_s: float
) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"`model-trainer up` exited with code {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"the service was not ready within {limit_s:g} s")


@contextlib.asynccontextmanager
async def service_up(
    session: aiohttp.ClientSession, tmp: Path, limit_s: float = 120.0
) -> AsyncIterator[Up]:
    """`model-trainer up` on a fresh data dir under tmp, from its start until /readyz says
    ready; stopped (SIGTERM, as a user's Ctrl-C would) at the end."""
    data_dir = tmp / "data"
    (data_dir / "corpus").mkdir(parents=True)
    port = free_port()
    env = {**child_env(), "MT_DATA_DIR": str(data_dir)}
    log = tmp / "up.log"
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "actors.cli", "up", "--port", str(port)),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(session, base, proc, limit_s)
        yield Up(proc, base, data_dir, time.perf_counter() - t0, log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class _Created(msgspec.Struct):
    run_id: str


class _Queued(msgspec.Struct):
    request_id: str


class _State(msgspec.Struct):
    status: str
    message: str = ""


class _Generated(msgspec.Struct):
    samples: list[str]
    steps: int


class _GenerateResult(msgspec.Struct):
    result: _Generated


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> bytes:
    async with session.post(url, json=body) as resp:
        data = await resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"POST {url}: {resp.status} {data[:300]!r}")
        return data


def train_body(corpus: str, max_steps: int) -> dict[str, object]:
    """A tiny run: BPE 512, GPT-2 tiny, short sequences, no archive at the end."""
    return {
        "corpus_path": corpus,
        "tokenizer_kind": "bpe",
        "vocab_size": 512,
        "model_family": "gpt2",
        "model_size": "tiny",
        "max_seq_len": 64,
        "batch_size": 8,
        "max_steps": max_steps,
        "eval_every": max_steps,
        "checkpoint_every": max_steps,
        "warmup_steps": 2,
        "upload": False,
    }


async def train_run(session: aiohttp.ClientSession, up: Up, max_steps: int) -> str:
    """A tiny run through the service, to its end; returns its id."""
    (up.data_dir / "corpus" / "bench.txt").write_text(corpus_text(50_000), encoding="utf-8")
    created = msgspec.json.decode(
        await post(session, f"{up.base}/runs/train", train_body("bench.txt", max_steps)),
        type=_Created,
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        async with session.get(f"{up.base}/runs/{created.run_id}") as resp:
            state = msgspec.json.decode(await resp.read(), type=_State)
        if state.status == "completed":
            return created.run_id
        if state.status in ("failed", "cancelled"):
            raise RuntimeError(f"the bench's run {state.status}: {state.message}")
        await asyncio.sleep(0.2)
    raise TimeoutError("the bench's run did not finish in 15 minutes")


async def request(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], poll_s: float
) -> tuple[str, float, bytes]:
    """POST a request-style route and poll its result until done: (request id, seconds,
    result body)."""
    t0 = time.perf_counter()
    queued = msgspec.json.decode(await post(session, url, body), type=_Queued)
    result_url = f"{url}/{queued.request_id}"
    while True:
        async with session.get(result_url) as resp:
            data = await resp.read()
            if resp.status == 200:
                return queued.request_id, time.perf_counter() - t0, data
            if resp.status != 202:
                raise RuntimeError(f"GET {result_url}: {resp.status} {data[:300]!r}")
        await asyncio.sleep(poll_s)


@dataclass
class Pair:
    """One request through HTTP and the same call made directly after it."""

    request_id: str
    posted: float  # wall clock when the POST was sent
    http_s: float
    direct_s: float


@dataclass
class Side:
    label: str
    pairs: list[Pair]

    def p(self, q: float, direct: bool = False) -> float:
        return percentile([x.direct_s if direct else x.http_s for x in self.pairs], q) * 1e3


@dataclass(frozen=True)
class Marks:
    """What the service recorded of each request: when the endpoint queued it (the
    command's requested_at) and when its result was committed (result.ready's at)."""

    queued: dict[str, float]
    committed: dict[str, float]


async def read_marks(up: Up) -> Marks:
    from actors.runtime.connection import connect, stream_entries
    from actors.runtime.outcome import request_id_of
    from protocol.codec import FIELD, decode_command, decode_event
    from protocol.events import ResultReady
    from protocol.keys import Keys

    url = next(
        line.split()[-1] for line in up.log.read_text().splitlines() if line.startswith("redis:")
    )
    keys, redis = Keys(), connect(url)
    try:
        commands = stream_entries(await redis.xrange(keys.cmd("evaluator")))
        events = stream_entries(await redis.xrange(keys.events))
    finally:
        await redis.aclose()
    queued: dict[str, float] = {}
    for _, fields in commands:
        cmd = decode_command("evaluator", fields[FIELD.encode()])
        queued[request_id_of(cmd)] = cmd.requested_at
    committed = {
        e.request_id: e.at
        for _, fields in events
        if isinstance(e := decode_event(fields[FIELD.encode()]), ResultReady)
    }
    return Marks(queued, committed)


def report(sides: list[Side], marks: Marks, target_ms: float) -> None:
    print(f"\n{'':24} {'p50 ms':>8} {'p99 ms':>8}")
    for s in sides:
        print(f"{s.label + ', HTTP':24} {s.p(50):8.1f} {s.p(99):8.1f}")
        print(f"{s.label + ', direct':24} {s.p(50, True):8.1f} {s.p(99, True):8.1f}")
    print()
    for s in sides:
        overhead = s.p(50) - s.p(50, True)
        paired = percentile([x.http_s - x.direct_s for x in s.pairs], 50) * 1e3
        verdict = "met" if overhead <= target_ms else "MISSED"
        print(
            f"{s.label}: overhead at p50 {overhead:.1f} ms (target <= {target_ms:g} ms:"
            f" {verdict}); median of the pairs' differences {paired:.1f} ms"
        )
        # Where it goes (medians, so they need not add up): the POST until the endpoint
        # queued the command; queued until the result was committed, less the direct
        # call's time; committed until the client read it (polling).
        posts, works, reads = [], [], []
        for x in s.pairs:
            queued, committed = marks.queued[x.request_id], marks.committed[x.request_id]
            posts.append(queued - x.posted)
            works.append(committed - queued - x.direct_s)
            reads.append(x.posted + x.http_s - committed)
        post_ms, work_ms, read_ms = (percentile(v, 50) * 1e3 for v in (posts, works, reads))
        print(
            f"  POST until queued {post_ms:.1f} ms, queued until committed less the direct"
            f" call {work_ms:.1f} ms, committed until read back {read_ms:.1f} ms"
        )


async def _serve(args: argparse.Namespace) -> None:
    from actors.workers.evaluator import TORCH_ENV

    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in TORCH_ENV.items()):
        print(
            f"note: torch was imported before {TORCH_ENV} could be set: the direct calls do"
            " not run torch as the evaluator does"
        )
    for name, value in TORCH_ENV.items():  # torch as the evaluator's children run it
        os.environ.setdefault(name, value)
    from protocol.settings import GenerateSettings
    from trainer.evaluate import generation, load, score
    from trainer.model import count_parameters

    gen = GenerateSettings(max_new_tokens=GENERATE_TOKENS, stop_on_eos=False, seed=7)
    gen_body: dict[str, object] = {**msgspec.to_builtins(gen), "prompt": PROMPT}
    text = corpus_text(2_000)[-args.score_chars :]
    poll_s = args.poll_ms / 1e3
    gen_side = Side(f"generate {GENERATE_TOKENS}", [])
    score_side = Side(f"score {len(text)} chars", [])
    with tempfile.TemporaryDirectory(prefix="mt-bench-serve-") as tmp:
        async with aiohttp.ClientSession() as session, service_up(session, Path(tmp)) as up:
            print(
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs;"
                f" `model-trainer up` ready in {up.ready_s:.2f} s; training a tiny run…",
                flush=True,
            )
            t0 = time.perf_counter()
            run_id = await train_run(session, up, args.train_steps)
            lm = load(up.data_dir / "runs" / run_id)
            c = lm.config
            print(
                f"run {run_id} trained in {time.perf_counter() - t0:.1f} s: {c.family} {c.size},"
                f" {count_parameters(lm.model):,} parameters, vocab {c.vocab_size},"
                f" context {c.max_seq_len}",
                flush=True,
            )
            run_url = f"{up.base}/runs/{run_id}"
            _, first, _ = await request(session, f"{run_url}/generate", gen_body, poll_s)
            print(f"first generate (the evaluator loads the model): {first * 1e3:.0f} ms")
            for i in range(args.n + args.warmup):
                posted = time.time()
                rid, took, data = await request(session, f"{run_url}/generate", gen_body, poll_s)
                got = msgspec.json.decode(data, type=_GenerateResult).result
                t = time.perf_counter()
                direct = generation(lm, PROMPT, gen)
                direct_s = time.perf_counter() - t
                if got.steps != GENERATE_TOKENS or direct.texts != got.samples:
                    raise RuntimeError("the service and the direct call generated differently")
                if i >= args.warmup:
                    gen_side.pairs.append(Pair(rid, posted, took, direct_s))
                posted = time.time()
                rid, took, _ = await request(session, f"{run_url}/score", {"text": text}, poll_s)
                t = time.perf_counter()
                score(lm, text)
                if i >= args.warmup:
                    score_side.pairs.append(Pair(rid, posted, took, time.perf_counter() - t))
            marks = await read_marks(up)
    print(
        f"\n{args.n} requests of each kind, one at a time, each followed by the same call made"
        f" directly (trainer.evaluate in this process, same model); results polled every"
        f" {args.poll_ms:g} ms"
    )
    report([gen_side, score_side], marks, args.target_ms)


def bench_serve(args: argparse.Namespace) -> None:
    """Interactive requests: generate/score through HTTP against trainer.evaluate in process."""
    asyncio.run(_serve(args))


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=50, help="requests of each kind")
    p.add_argument("--warmup", type=int, default=3, help="requests not counted")
    p.add_argument("--poll-ms", type=float, default=2.0, help="result polling interval")
    p.add_argument("--score-chars", type=int, default=500, help="length of the scored text")
    p.add_argument("--train-steps", type=int, default=20, help="steps of the bench's run")
    p.add_argument("--target-ms", type=float, default=25.0, help="overhead target at p50")


# ----------------------------------------------------------------------------- startup


class _Event(msgspec.Struct):
    kind: str
    at: float = 0.0
    step: str | int = ""  # the actor of step.*, the training step of train.progress


async def first_progress(session: aiohttp.ClientSession, base: str, run_id: str) -> list[_Event]:
    """The run's events (SSE) up to its first train.progress, or its end."""
    seen: list[_Event] = []
    async with session.get(f"{base}/runs/{run_id}/events") as resp:
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            event = msgspec.json.decode(line.removeprefix("data: "), type=_Event)
            seen.append(event)
            if event.kind in ("train.progress", "run.failed", "run.cancelled"):
                break
    return seen


# What the training child imports before it can train: the floor under the first step.
_CHILD_IMPORTS = (
    "import trainer.train; from trainer.evaluate import import_model_code; import_model_code()"
)


async def bare_imports_s() -> float:
    """Seconds a fresh interpreter takes to import what the training child needs."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD_IMPORTS, env=child_env()
    )
    if await proc.wait() != 0:
        raise RuntimeError("importing the training code failed")
    return time.perf_counter() - t0


async def _startup(args: argparse.Namespace) -> None:
    ready: list[float] = []
    step: list[float] = []
    imports: list[float] = []
    for i in range(args.n):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="mt-bench-startup-") as tmp:
            async with aiohttp.ClientSession() as session, service_up(session, Path(tmp)) as up:
                ready.append(up.ready_s)
                (up.data_dir / "corpus" / "tiny.txt").write_text(
                    corpus_text(args.corpus_chars), encoding="utf-8"
                )
                queued_at = time.time()
                t0 = time.perf_counter()
                body = train_body("tiny.txt", 20)
                created = msgspec.json.decode(
                    await post(session, f"{up.base}/runs/train", body), type=_Created
                )
                seen = await first_progress(session, up.base, created.run_id)
                if not seen or seen[-1].kind != "train.progress":
                    raise RuntimeError(f"the run ended before its first step: {seen}")
                step.append(time.perf_counter() - t0)
        imports.append(await bare_imports_s())  # the service stopped: alone on the machine
        print(
            f"start {i + 1} (load average {load:.1f} on {os.cpu_count()} CPUs before it):"
            f" ready in {ready[-1]:.2f} s, first training step {step[-1]:.2f} s after queuing;"
            f" the training child's imports alone, just after: {imports[-1]:.2f} s",
            flush=True,
        )
        timeline = ", ".join(
            f"{e.kind}{f'({e.step})' if e.step != '' else ''} {e.at - queued_at:.2f}" for e in seen
        )
        print(f"  events (s after queuing): {timeline}", flush=True)

    print()
    show: list[tuple[str, list[float], float]] = [
        ("`up` until /readyz is ready", ready, args.ready_target),
        ("queued train until first train.progress", step, args.step_target),
    ]
    for label, values, target in show:
        median = percentile(values, 50)
        verdict = "met" if median < target else "MISSED"
        print(
            f"{label:42} median {median:6.2f} s, worst {max(values):6.2f} s"
            f" (target < {target:g} s: {verdict})"
        )
    print(
        f"{'the training imports alone (a bare process)':42} median"
        f" {percentile(imports, 50):6.2f} s: the training child starts with the service and"
        " imports them before the run comes; the first step waits for what is left of them"
    )


def bench_startup(args: argparse.Namespace) -> None:
    """Start-up: `up` until ready, and a queued training until its first step."""
    asyncio.run(_startup(args))


def startup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=3, help="fresh starts")
    p.add_argument("--corpus-chars", type=int, default=50_000, help="size of the tiny corpus")
    p.add_argument("--ready-target", type=float, default=3.0)
    p.add_argument("--step-target", type=float, default=10.0)
