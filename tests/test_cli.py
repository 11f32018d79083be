"""The command line against a real Redis: the service's side is simulated by the tests
(events and result keys written here), so these run in well under a second each."""

from __future__ import annotations

import asyncio
import fcntl
import json
import re
import time
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.cli import main as cli
from actors.client.client import CANCEL_TTL_S
from actors.client.watch import PlainRenderer
from actors.runtime.connection import stream_entries
from actors.runtime.outcome import add_event
from protocol.codec import FIELD, decode_command, decode_event
from protocol.commands import (
    Base,
    CorpusIngest,
    ModelEvaluate,
    ModelGenerate,
    ModelTrain,
    TokenizerTrain,
)
from protocol.events import (
    AnyEvent,
    RunCompleted,
    RunFailed,
    RunQueued,
    StepCompleted,
    StepStarted,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
)
from protocol.keys import ActorName, Keys


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str, keys: Keys, data_dir: Path) -> Path:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MT_PREFIX", keys.prefix)
    monkeypatch.setenv("MT_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MT_CORPUS_ROOT", raising=False)
    return data_dir


async def emit(redis: aioredis.Redis, keys: Keys, *events: AnyEvent) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for event in events:
            add_event(pipe, keys, event)
        await pipe.execute()


async def make_run(redis: aioredis.Redis, keys: Keys, run_id: str, *events: AnyEvent) -> None:
    now = time.time()
    queued = RunQueued(run_id=run_id, at=now, steps=["ingest", "tokenizer", "trainer"])
    await emit(redis, keys, queued, *events)
    await redis.zadd(keys.runs, {run_id: now})


async def wait_command(redis: aioredis.Redis, keys: Keys, actor: ActorName) -> Base:
    for _ in range(200):
        entries = stream_entries(await redis.xrange(keys.cmd(actor)))
        if entries:
            return decode_command(actor, entries[-1][1][FIELD.encode()])
        await asyncio.sleep(0.02)
    raise AssertionError(f"no command on {keys.cmd(actor)}")


async def wait_run_id(redis: aioredis.Redis, keys: Keys) -> str:
    for _ in range(200):
        ids = await redis.zrange(keys.runs, 0, -1)
        if ids:
            return ids[0].decode() if isinstance(ids[0], bytes) else str(ids[0])
        await asyncio.sleep(0.02)
    raise AssertionError("no run was submitted")


async def test_runs_lists_recent_runs_newest_first(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(redis, keys, "run-old")
    await make_run(
        redis,
        keys,
        "run-new",
        StepStarted(run_id="run-new", step="ingest", command_id="run-new.ingest"),
    )
    assert await cli.run(["runs"]) == 0
    out = capsys.readouterr().out
    assert out.index("run-new") < out.index("run-old")
    assert "running" in out and "queued" in out
    assert await cli.run(["runs", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in body] == ["run-new", "run-old"]


async def test_status_plain_and_json(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(
        redis,
        keys,
        "r1",
        TrainStarted(
            run_id="r1", model_family="gpt2", model_size="tiny", total_epochs=2, total_steps=10
        ),
        TrainProgress(run_id="r1", step=4, epoch=1, total_epochs=2, total_steps=10, loss=2.5),
    )
    assert await cli.run(["status", "r1"]) == 0
    out = capsys.readouterr().out
    assert "status: queued" in out  # no step.started yet
    assert "train_step: 4" in out and "loss: 2.5" in out
    assert await cli.run(["status", "r1", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["train_step"] == 4 and body["total_steps"] == 10 and body["status"] == "queued"


@pytest.mark.parametrize("command", ["status", "watch", "events", "cancel", "eval", "generate"])
async def test_unknown_run_is_a_clean_error(
    env: Path, keys: Keys, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert await cli.run([command, "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert f"unknown run 'no-such-run' (prefix '{keys.prefix}')" in err
    assert "Traceback" not in err


async def test_redis_unreachable_is_a_clean_error(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert await cli.run(["status", "r1"]) == 3
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in err and "Traceback" not in err


async def test_without_redis_url_the_url_file_of_a_running_server_is_used(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    redis: aioredis.Redis,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("REDIS_URL")
    assert await cli.run(["status", "r1"]) == 3
    assert "no service to talk to" in capsys.readouterr().err
    (env / "redis").mkdir()
    (env / "redis" / "url").write_text("redis://127.0.0.1:1/0")  # a dead server's leftover
    assert await cli.run(["runs"]) == 3
    assert await cli.run(["train", "--corpus-name", "shakespeare", "--detach"]) == 3
    assert "no service to hand the run to" in capsys.readouterr().err
    (env / "redis" / "url").write_text(redis_url)
    await make_run(redis, keys, "r1")
    # A server answering is not enough: a live `up` owns it (holds its owner lock).
    assert await cli.run(["status", "r1"]) == 3
    with (env / "redis" / "owner").open("a+") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert await cli.run(["status", "r1"]) == 0
    assert "queued" in capsys.readouterr().out


async def test_events_history_lines_and_json(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(redis, keys, "r1", StepStarted(run_id="r1", step="ingest", command_id="c1"))
    await make_run(redis, keys, "other")  # another run's events are not shown
    assert await cli.run(["events", "r1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["run.queued", "step.started"]
    assert 'step="ingest"' in lines[1]
    assert await cli.run(["events", "r1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"]["kind"] for r in rows] == ["run.queued", "step.started"]
    assert all(r["event"]["run_id"] == "r1" and r["id"] for r in rows)
    follow = asyncio.create_task(cli.run(["events", "r1", "--follow"]))
    await asyncio.sleep(0.2)
    await emit(redis, keys, RunCompleted(run_id="other"), RunCompleted(run_id="r1"))
    assert await asyncio.wait_for(follow, 10) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["run.queued", "step.started", "run.completed"]


async def test_cancel_sets_the_flag_and_records_the_request(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(redis, keys, "r1")
    assert await cli.run(["cancel", "r1"]) == 0
    assert await redis.get(keys.cancel("r1")) == b"1"
    assert 0 < await redis.ttl(keys.cancel("r1")) <= CANCEL_TTL_S
    kinds = [
        decode_event(f[FIELD.encode()]).__struct_config__.tag
        for _, f in stream_entries(await redis.xrange(keys.events))
    ]
    assert kinds[-1] == "run.cancel_requested"
    assert (await redis.hget(keys.run("r1"), "message")) == b"cancel requested"
    await make_run(redis, keys, "r3", RunCompleted(run_id="r3"))
    assert await cli.run(["cancel", "r3"]) == 0
    assert "already completed" in capsys.readouterr().out
    assert await redis.get(keys.cancel("r3")) is None


async def _answer(
    redis: aioredis.Redis, keys: Keys, body: dict[str, object], delay: float = 0.3
) -> Base:
    """Play the evaluator: wait for the request, then write its result key."""
    cmd = await wait_command(redis, keys, "evaluator")
    await asyncio.sleep(delay)
    assert isinstance(cmd, ModelEvaluate | ModelGenerate)
    await redis.set(keys.result(cmd.request_id), json.dumps(body))
    return cmd


async def test_eval_waits_for_the_result_and_prints_metrics(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(redis, keys, "r1", RunCompleted(run_id="r1"))
    body = {"ok": True, "what": "evaluate", "result": {"loss": 1.25, "perplexity": 3.49}}
    evaluator = asyncio.create_task(_answer(redis, keys, body))
    assert await cli.run(["eval", "r1", "--split", "validation", "--timeout", "10"]) == 0
    cmd = await evaluator
    assert isinstance(cmd, ModelEvaluate)
    assert cmd.split == "validation" and cmd.run_id == "r1" and cmd.request_id
    out = capsys.readouterr().out
    assert "loss: 1.25" in out and "perplexity: 3.49" in out


async def test_eval_failure_and_timeout(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(redis, keys, "r1")
    body = {"ok": False, "what": "evaluate", "error_kind": "user", "message": "run not done"}
    evaluator = asyncio.create_task(_answer(redis, keys, body, delay=0.0))
    assert await cli.run(["eval", "r1", "--timeout", "10"]) == 1
    await evaluator
    assert "evaluate failed (user error): run not done" in capsys.readouterr().err
    assert await cli.run(["eval", "r1", "--timeout", "0.1"]) == 1
    assert "no result after 0.1s" in capsys.readouterr().err


async def test_generate_prints_samples(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(redis, keys, "r1", RunCompleted(run_id="r1"))
    body = {
        "ok": True,
        "what": "generate",
        "result": {"prompt": "To be", "samples": ["To be or not", "To be free"]},
    }
    evaluator = asyncio.create_task(_answer(redis, keys, body))
    argv = ["generate", "r1", "To be", "--num", "2", "--temperature", "0.5", "--timeout", "10"]
    assert await cli.run(argv) == 0
    cmd = await evaluator
    assert isinstance(cmd, ModelGenerate)
    assert (cmd.prompt, cmd.num_return_sequences, cmd.temperature) == ("To be", 2, 0.5)
    out = capsys.readouterr().out
    assert "To be or not" in out and "To be free" in out and "sample 2" in out
    assert await cli.run(["generate", "r1", "x", "--max-new-tokens", "0"]) == 2
    assert "invalid max_new_tokens" in capsys.readouterr().err


async def test_train_submits_and_follows_until_completed(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    train = asyncio.create_task(
        cli.run(["train", "--corpus-name", "shakespeare", "--max-steps", "20"])
    )
    run_id = await wait_run_id(redis, keys)
    ingest = await wait_command(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest) and ingest.named == "shakespeare"
    at = time.time()
    await emit(
        redis,
        keys,
        StepStarted(run_id=run_id, step="ingest", command_id="c", at=at),
        StepCompleted(run_id=run_id, step="ingest", command_id="c", duration_s=0.5, at=at),
        TrainStarted(
            run_id=run_id,
            model_family="gpt2",
            model_size="tiny",
            total_epochs=1,
            total_steps=20,
            at=at,
        ),
    )
    for step in range(1, 21):  # 0.1 s of event time apart: rate-limited to one line a second
        val = 2.0 if step == 10 else None
        event = TrainProgress(
            run_id=run_id,
            step=step,
            epoch=1,
            total_epochs=1,
            total_steps=20,
            loss=3.0 - step / 20,
            val_loss=val,
            at=at + step / 10,
        )
        await emit(redis, keys, event)
    await emit(redis, keys, RunCompleted(run_id=run_id, at=at + 3))
    assert await asyncio.wait_for(train, 10) == 0
    out = capsys.readouterr().out
    assert f"run {run_id} queued: ingest → tokenizer → trainer → evaluator → uploader" in out
    assert "ingest (1/5) started" in out and "ingest (1/5) done in 0.5s" in out
    assert "validation at step 10: val_loss 2.0000" in out
    progress = [line for line in out.splitlines() if "| loss" in line]
    assert 2 <= len(progress) <= 4, progress  # 2 s of progress → a line a second
    assert f"run {run_id} completed" in out


async def test_train_failure_exits_1_with_the_message(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    train = asyncio.create_task(cli.run(["train", "--corpus-name", "shakespeare"]))
    run_id = await wait_run_id(redis, keys)
    await emit(
        redis,
        keys,
        RunFailed(run_id=run_id, step="ingest", error_kind="user", message="the corpus is empty"),
    )
    assert await asyncio.wait_for(train, 10) == 1
    assert "failed: ingest failed: the corpus is empty" in capsys.readouterr().err


async def test_train_from_a_toml_file_with_flags_overriding(
    env: Path,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'corpus_name = "shakespeare"\nmodel_family = "llama"\nbatch_size = 16\n'
        "num_epochs = 3\nupload = false\nlearning-rate = 0.001\n"
    )
    argv = ["train", "--config", str(config), "--batch-size", "4", "--detach", "--json"]
    assert await cli.run(argv) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["steps"] == ["ingest", "tokenizer", "trainer", "evaluator"]
    ingest = await wait_command(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest)
    train = next(c for c in ingest.rest if isinstance(c, ModelTrain))
    assert (train.model_family, train.batch_size, train.num_epochs) == ("llama", 4, 3)
    assert train.learning_rate == 0.001 and train.run_id == created["run_id"]


@pytest.mark.parametrize(
    ("argv", "toml", "message"),
    [
        (["--num-epochs", "0"], "", "invalid num_epochs: Expected `int` >= 1"),
        ([], "batch_size = 'big'", "invalid batch_size: Expected `int`, got `str`"),
        ([], "batch_sise = 4", "unknown key(s) batch_sise"),
        ([], "corpus_name = [", "not valid TOML"),
        (["--corpus-path", "a.txt"], "", "give exactly one of corpus_path, corpus_name"),
        (["--tokenizer-id", "bad id!"], "", "invalid tokenizer_id"),
    ],
)
async def test_train_request_errors_name_the_field(
    env: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    toml: str,
    message: str,
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'corpus_name = "shakespeare"\n{toml}\n' if toml else 'corpus_name = "x"\n')
    assert await cli.run(["train", "--config", str(config), *argv, "--detach"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


async def test_bad_flags_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        await cli.run(["train", "--model-family", "bert"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bert'" in capsys.readouterr().err


async def test_corpus_paths_are_confined_to_the_corpus_root(
    env: Path,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("hello")
    assert await cli.run(["train", "--corpus-path", str(outside), "--detach"]) == 2
    assert "outside the corpus root" in capsys.readouterr().err
    inside = env / "corpus" / "books" / "a.txt"
    inside.parent.mkdir(parents=True)
    inside.write_text("hello")
    assert await cli.run(["tokenizer", "train", "--corpus-path", str(inside), "--detach"]) == 0
    ingest = await wait_command(redis, keys, "ingest")
    assert isinstance(ingest, CorpusIngest) and ingest.path == "books/a.txt"
    assert [type(c) for c in ingest.rest] == [TokenizerTrain]


async def test_watch_of_a_finished_run_replays_its_history(
    env: Path, redis: aioredis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_run(
        redis,
        keys,
        "r1",
        RunFailed(run_id="r1", step="trainer", error_kind="system", message="boom"),
    )
    assert await cli.run(["watch", "r1"]) == 1
    captured = capsys.readouterr()
    assert "[r1] queued: ingest → tokenizer → trainer" in captured.out
    assert "run failed in trainer (system error): boom" in captured.out
    assert "run r1 failed: trainer failed: boom" in captured.err


def test_plain_renderer_rate_limits_progress_but_not_validations() -> None:
    import io

    out = io.StringIO()
    renderer = PlainRenderer(out, interval_s=1.0)
    renderer.update(
        TrainStarted(
            run_id="r",
            model_family="gpt2",
            model_size="tiny",
            total_epochs=2,
            total_steps=100,
            at=100.0,
        )
    )
    for step in range(1, 101):  # 0.05 s apart: 5 s of event time, epoch 2 from step 51
        val = 1.5 if step % 25 == 0 else None
        renderer.update(
            TrainProgress(
                run_id="r",
                step=step,
                epoch=1 + (step > 50),
                total_epochs=2,
                total_steps=100,
                loss=2.0,
                val_loss=val,
                at=100.0 + step * 0.05,
            )
        )
    lines = out.getvalue().splitlines()
    assert sum("validation at step" in line for line in lines) == 4
    progress = [line for line in lines if "| loss" in line]
    assert 5 <= len(progress) <= 7
    assert any("epoch 2/2" in line for line in progress)
    assert progress[0].endswith("step 1/100 | epoch 1/2 | loss 2.0000")  # no rate yet
    for line in progress[1:]:  # 20 steps a second from the first step on
        found = re.search(r"step (\d+)/100 .*\| ETA 0:00:(\d\d)$", line)
        assert found is not None, line
        assert int(found[2]) == round((100 - int(found[1])) / 20)


def test_watch_shows_the_recipe_and_mfu() -> None:
    import io

    out = io.StringIO()
    renderer = PlainRenderer(out, interval_s=1.0)
    recipe = "bf16: 1.41x fp32 measured, val loss within 0.4%; compile pays back after 80 steps"
    started = TrainStarted(
        run_id="r",
        model_family="gpt2",
        model_size="tiny",
        total_epochs=1,
        total_steps=10,
        device="cpu",
        precision="bf16",
        compile=True,
        recipe=recipe,
        threads=2,
        at=1.0,
    )
    renderer.update(started)
    for step, mfu in ((1, None), (2, 0.1234)):
        renderer.update(
            TrainProgress(
                run_id="r",
                step=step,
                epoch=1,
                total_epochs=1,
                total_steps=10,
                loss=2.0,
                tokens_per_s=1000.0,
                mfu=mfu,
                at=1.0 + 2 * step,
            )
        )
    renderer.update(TrainCompleted(run_id="r", steps=10, train_loss=1.5, mfu=0.125, at=30.0))
    renderer.update(msgspec.structs.replace(started, precision="fp32", compile=False, recipe=""))
    ddp = msgspec.structs.replace(started, recipe="", threads=1, world_size=2, backend="gloo")
    renderer.update(ddp)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        f"[r] training gpt2/tiny: 1 epochs, 10 steps, cpu bf16, compile on, 2 threads ({recipe})"
    )
    assert lines[1] == "[r] step 1/10 | epoch 1/1 | loss 2.0000 | 1,000 tok/s"  # MFU not known
    assert lines[2].startswith("[r] step 2/10 | epoch 1/1 | loss 2.0000 | 1,000 tok/s | MFU 12.3%")
    assert lines[3] == "[r] training completed: 10 steps, train_loss 1.5000, MFU 12.5%"
    assert lines[4].endswith("10 steps, cpu fp32, compile off, 2 threads")  # no recipe told
    assert lines[5].endswith("compile on, 2 processes (gloo) x 1 threads")  # DDP


def test_rich_renderer_draws_bars_and_notable_lines() -> None:
    import io

    from rich.console import Console

    from actors.client.watch import RichRenderer

    out = io.StringIO()
    renderer = RichRenderer(Console(file=out, force_terminal=True, width=120))
    renderer.update(RunQueued(run_id="r", steps=["ingest", "trainer"], at=1.0))
    renderer.update(StepStarted(run_id="r", step="trainer", command_id="c", at=1.0))
    renderer.update(
        TrainStarted(
            run_id="r",
            model_family="gpt2",
            model_size="tiny",
            total_epochs=1,
            total_steps=10,
            at=1.0,
        )
    )
    for step in range(1, 11):
        renderer.update(
            TrainProgress(
                run_id="r",
                step=step,
                epoch=1,
                total_epochs=1,
                total_steps=10,
                loss=2.0,
                tokens_per_s=1234.0,
                at=1.0 + step,
            )
        )
    renderer.update(RunCompleted(run_id="r", at=12.0))
    renderer.close()
    text = out.getvalue()
    assert "queued: ingest → trainer" in text and "run completed" in text
    assert "10/10" in text and "1,234 tok/s" in text and "2/2" in text


async def test_train_without_a_service_refuses_a_chain_it_cannot_run(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from actors import service

    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setattr(
        service, "ACTORS", {k: v for k, v in service.ACTORS.items() if k != "uploader"}
    )
    assert await cli.run(["train", "--corpus-name", "shakespeare"]) == 2
    assert "no uploader actor" in capsys.readouterr().err
    assert not (env / "redis").exists()  # refused before starting anything


async def test_tokenizer_train_without_a_service_runs_it_in_process(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end through the real ingest and tokenizer actors, on an embedded server that
    lives as long as the job."""
    monkeypatch.delenv("REDIS_URL")
    argv = ["tokenizer", "train", "--corpus-name", "shakespeare", "--vocab-size", "300"]
    assert await cli.run(argv) == 0
    captured = capsys.readouterr()
    assert "starting an embedded Redis and the actors in this process" in captured.err
    run_id = re.findall(r"^run (\S+) completed", captured.out, flags=re.M)[0]
    assert "tokenizer ready: bpe" in captured.out
    assert (env / "tokenizers" / f"{run_id}-tok").is_dir()
    assert not (env / "redis" / "url").exists()  # the server stopped with the job
