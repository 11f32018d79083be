"""`model-trainer`: one entry point; argparse subcommands, dispatched through COMMANDS.

Against a running service every subcommand talks to Redis directly: REDIS_URL, or else the
embedded server of a running `model-trainer up` on the same data dir (it writes its URL to
`<data_dir>/redis/url`). `train` and `tokenizer train` with no service running start one in
this process (embedded Redis + every actor) for the duration of the run.

Exit codes: 0 done; 1 the run or request failed or was cancelled (or `replay diff` found
different kinds); 2 bad input (flags, request fields, unknown run); 3 no Redis to talk to;
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.table import Table

from actors import service
from actors.client import replay, watch
from actors.client.submit import new_id, plan_tokenizer, plan_train, submit
from actors.runtime import log, retention
from actors.runtime.config import Settings
from actors.runtime.streams import Redis, RuntimeConfig, add_command, add_event, connect
from protocol.commands import Base, ChainCommand, ModelEvaluate, ModelGenerate, actor_of
from protocol.events import ArtifactPointer, CancelRequested
from protocol.flags import FlagError, add_flags, field_message, given, load_toml, struct_fields
from protocol.keys import ACTOR_NAMES, ActorName, Keys
from protocol.requests import (
    CorpusSource,
    GenerateRequest,
    TokenizerTrainRequest,
    TrainRequest,
    decode_flat,
    flat_fields,
)
from protocol.state import RunState
from trainer.corpus import resolve_corpus_path
from trainer.errors import UserError

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]
S = TypeVar("S", bound=msgspec.Struct)
R = TypeVar("R", TrainRequest, TokenizerTrainRequest)

CANCEL_TTL_S = 14 * 24 * 3600
# Interrupting an in-process run: how long its running step may take to finish before it is
# cancelled (its command stays queued; training resumes from its last checkpoint).
IN_PROCESS_GRACE_S = 5.0
_log_file: Path | None = None  # where log lines go instead of the terminal (train on a tty)


class CliError(Exception):
    """A clean failure: its message is printed (no traceback) and `code` is the exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _err(message: str) -> None:
    print(f"model-trainer: {message}", file=sys.stderr, flush=True)


def safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


# ------------------------------------------------------------------------- finding Redis
def url_file(settings: Settings) -> Path:
    return settings.data_dir / "redis" / "url"


async def answers(url: str, timeout_s: float = 1.0) -> bool:
    client = aioredis.Redis.from_url(
        url, protocol=2, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        return bool(await client.ping())
    except (RedisError, OSError, ValueError):
        return False
    finally:
        await client.aclose()


async def running_url(settings: Settings) -> str | None:
    """REDIS_URL; else the URL of a live embedded server of a running `up` (it answers PING)."""
    if settings.redis_url:
        return settings.redis_url
    try:
        url = url_file(settings).read_text().strip()
    except OSError:
        return None
    return url if url and await answers(url) else None


async def require_url(settings: Settings) -> str:
    url = await running_url(settings)
    if url is None:
        raise CliError(
            "no service to talk to: set REDIS_URL, or start `model-trainer up` "
            f"(no running embedded server under {settings.data_dir})",
            3,
        )
    return url


@contextlib.contextmanager
def _reachable(url: str) -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise CliError(f"cannot reach Redis at {safe_url(url)}: {e}", 3) from e


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[tuple[str, Redis, Keys]]:
    url = await require_url(settings)
    client = connect(url)
    try:
        with _reachable(url):
            yield url, client, Keys(settings.prefix)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def with_service(
    settings: Settings,
    *,
    names: Sequence[ActorName] = ACTOR_NAMES,
    config: RuntimeConfig | None = None,
) -> AsyncIterator[str]:
    """An embedded Redis (unless settings.redis_url) and every available actor, in this
    process, for the duration of the block; yields the Redis URL. At the end the actors stop
    in order (running handlers get their grace period), then the server."""
    if not any(n in service.ACTORS for n in names):
        raise CliError("no actors in this build to run the job", 2)
    with service.redis_for(settings) as url:
        stop = asyncio.Event()
        ready = asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        actors = asyncio.create_task(
            service.serve(
                settings,
                url,
                names,
                config=config,
                on_ready=on_ready,
                stop=stop,
                install_signals=False,
            )
        )
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait([actors, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if actors.done():
            actors.result()  # a start-up failure surfaces here
            raise CliError("the in-process actors stopped at start", 1)
        try:
            yield url
        except (asyncio.CancelledError, KeyboardInterrupt):
            print(
                f"stopping the actors of this process (a running step gets "
                f"{(config or RuntimeConfig()).grace_s:g}s, then its command stays queued)",
                file=sys.stderr,
                flush=True,
            )
            raise
        finally:
            stop.set()
            await actors


# ---------------------------------------------------------------------- request building
_TRAIN_FIELDS = [(f.name, f.info) for f in flat_fields(TrainRequest)]
_TOKENIZER_FIELDS = [(f.name, f.info) for f in flat_fields(TokenizerTrainRequest)]
_GENERATE_FIELDS = struct_fields(GenerateRequest, skip=("prompt", "user_id"))


def convert(values: dict[str, object], struct: type[S]) -> S:
    """Validate like the control endpoint does; a CliError naming the field otherwise."""
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as e:
        raise CliError(field_message(e, struct.__name__), 2) from None


def request_from(args: argparse.Namespace, struct: type[R]) -> R:
    """The --config TOML file (if any, keys as in the HTTP body), overridden by the flags
    that were given; validated as the control endpoint validates the body."""
    fields = [(f.name, f.info) for f in flat_fields(struct)]
    try:
        values = load_toml(Path(args.config), fields, struct.__name__) if args.config else {}
    except FlagError as e:
        raise CliError(str(e), 2) from None
    values.update(given(args, fields))
    try:
        return decode_flat(values, struct)
    except msgspec.ValidationError as e:
        raise CliError(field_message(e, struct.__name__), 2) from None


def with_corpus_path(settings: Settings, req: R) -> R:
    """A corpus path that exists here (under the corpus root, or relative to the current
    folder) is checked against the corpus root and made relative to it, as the control
    endpoint does; one that does not exist here is left to the ingest actor, whose machine
    may see other files."""
    source = req.source
    assert isinstance(source, CorpusSource)
    if not source.corpus_path:
        return req
    root = settings.corpus_root
    here = Path(source.corpus_path).expanduser()
    if not (root / here).exists() and here.exists():
        here = here.absolute()
    elif not (root / here).exists():
        return req
    try:
        real = resolve_corpus_path(root, str(here))
    except UserError as e:
        raise CliError(f"{e} (the corpus root is {root}: set MT_CORPUS_ROOT)", 2) from None
    rel = real.relative_to(root.resolve()).as_posix()
    return msgspec.structs.replace(req, source=msgspec.structs.replace(source, corpus_path=rel))


# ------------------------------------------------------------------------------- output
def _is_terminal() -> bool:
    return sys.stdout.isatty()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if _is_terminal():
        table = Table(*headers, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "" if value is None else format(value, fmt)


def state_dict(state: RunState) -> dict[str, object]:
    body: dict[str, object] = msgspec.to_builtins(state)
    if state.artifact:
        with contextlib.suppress(msgspec.DecodeError):
            body["artifact"] = msgspec.json.decode(state.artifact, type=ArtifactPointer)
    return body


def print_json(value: object) -> None:
    print(msgspec.json.encode(value).decode(), flush=True)


def _ended(settings: Settings, state: RunState) -> int:
    if state.status == "completed":
        where = settings.run_dir(state.run_id)
        extra = f"; files in {where}" if where.exists() else ""
        print(f"run {state.run_id} completed{extra}", flush=True)
        return 0
    print(f"run {state.run_id} {state.status}: {state.message}", file=sys.stderr, flush=True)
    return 1


async def require_run(redis: Redis, keys: Keys, run_id: str) -> RunState:
    try:
        return await watch.run_state(redis, keys, run_id)
    except watch.UnknownRun:
        raise CliError(f"unknown run {run_id!r} (prefix {keys.prefix!r})", 2) from None


async def follow_run(url: str, redis: Redis, settings: Settings, run_id: str) -> int:
    renderer = watch.renderer_for(sys.stdout)
    try:
        state = await watch.watch(url, redis, Keys(settings.prefix), run_id, renderer)
    finally:
        renderer.close()
    return _ended(settings, state)


# -------------------------------------------------------------------------- subcommands
async def serve_control(settings: Settings, url: str) -> None:
    """The control endpoint until cancelled; prints its bound URL once it listens. Imported
    here so that commands that do not serve HTTP never load aiohttp."""
    from actors.web.app import serve

    async def listening(where: str) -> None:
        print(f"control: {where}", flush=True)

    await serve(settings, url, settings.http_host, settings.http_port, on_ready=listening)


def _http(args: argparse.Namespace, settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        http_host=args.host or settings.http_host,
        http_port=settings.http_port if args.port is None else args.port,
    )


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    settings = _http(args, settings)
    if not settings.redis_url and (live := await running_url(settings)) is not None:
        raise CliError(
            f"a service already runs on {settings.data_dir} (its Redis: {safe_url(live)}); "
            "stop it first, or point this one at a shared REDIS_URL",
            2,
        )
    names = list(ACTOR_NAMES)
    days = retention.retention_days()
    with service.redis_for(settings) as url:
        keys = Keys(settings.prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def ready() -> None:
            print(f"redis:   {safe_url(url)}", flush=True)
            print(f"data:    {settings.data_dir}", flush=True)
            print(f"actors:  {', '.join(n for n in names if n in service.ACTORS)}", flush=True)
            print(f"prefix:  {settings.prefix} (streams kept {days:g} days)", flush=True)

        client = connect(url)
        side = [
            asyncio.create_task(serve_control(settings, url)),
            asyncio.create_task(retention.run_periodic(client, keys, days=days)),
        ]
        actors = asyncio.create_task(
            service.serve(settings, url, names, on_ready=ready, stop=stop, install_signals=False)
        )
        try:
            done, _ = await asyncio.wait([actors, *side], return_when=asyncio.FIRST_COMPLETED)
            stop.set()  # the endpoint failing (port taken) stops the actors too
            await actors
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await client.aclose()
        for task in side:
            if task in done and not task.cancelled() and (exc := task.exception()) is not None:
                raise CliError(f"stopped: {exc}", 1)
    return 0


async def cmd_actor(args: argparse.Namespace, settings: Settings) -> int:
    name: ActorName = args.name
    if name not in service.ACTORS:
        raise CliError(f"actor {name!r} is not available in this version", 2)
    url = await running_url(settings)
    if url is None:
        raise CliError(
            "set REDIS_URL to the shared Redis (or start `model-trainer up` on this data dir)", 3
        )
    await service.serve(settings, url, [name])
    return 0


async def cmd_control(args: argparse.Namespace, settings: Settings) -> int:
    settings = _http(args, settings)
    url = await require_url(settings)
    print(f"redis:   {safe_url(url)}", flush=True)
    await serve_control(settings, url)
    return 0


async def _submit_and_follow(
    args: argparse.Namespace, settings: Settings, chain: list[ChainCommand]
) -> int:
    async def go(url: str) -> int:
        client = connect(url)
        try:
            with _reachable(url):
                info = await submit(client, Keys(settings.prefix), chain)
                if args.json:
                    print_json(info)
                else:
                    print(f"run {info.run_id} queued: {' → '.join(info.steps)}", flush=True)
                if args.detach:
                    if not args.json:
                        print(f"follow it with: model-trainer watch {info.run_id}", flush=True)
                    return 0
                return await follow_run(url, client, settings, info.run_id)
        finally:
            await client.aclose()

    url = await running_url(settings)
    if url is not None:
        return await go(url)
    if args.detach:
        raise CliError(
            "no service to hand the run to: start `model-trainer up` (or set REDIS_URL), "
            "or leave out --detach to run it in this process",
            3,
        )
    missing = [a for a in (actor_of(c) for c in chain) if a not in service.ACTORS]
    if missing:
        raise CliError(
            f"no service running, and this build has no {', '.join(missing)} actor to run "
            "the job in this process"
            + (" (--no-upload skips the upload)" if "uploader" in missing else ""),
            2,
        )
    logs = f"; their log: {_log_file}" if _log_file else ""
    print(
        "no service running: starting an embedded Redis and the actors in this process "
        f"(they stop when the run ends{logs})",
        file=sys.stderr,
        flush=True,
    )
    async with with_service(settings, config=RuntimeConfig(grace_s=IN_PROCESS_GRACE_S)) as url:
        return await go(url)


async def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    req = with_corpus_path(settings, request_from(args, TrainRequest))
    return await _submit_and_follow(args, settings, plan_train(req))


async def cmd_tokenizer(args: argparse.Namespace, settings: Settings) -> int:
    req = with_corpus_path(settings, request_from(args, TokenizerTrainRequest))
    return await _submit_and_follow(args, settings, plan_tokenizer(req))


async def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (_url, client, keys):
        ids = [_text(i) for i in await client.zrevrange(keys.runs, 0, args.limit - 1)]
        async with client.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hgetall(keys.run(run_id))
            hashes = await pipe.execute()
    states = [
        RunState.from_hash(run_id, {k.decode(): v.decode() for k, v in h.items()})
        for run_id, h in zip(ids, hashes, strict=True)
    ]
    if args.json:
        print_json([state_dict(s) for s in states])
        return 0
    if not states:
        print("no runs yet")
        return 0
    rows = [
        [
            s.run_id,
            s.status,
            s.step,
            f"{s.train_step}/{s.total_steps}" if s.total_steps else "",
            _num(s.loss),
            _num(s.val_loss),
            _when(s.created_at),
            s.message[:60],
        ]
        for s in states
    ]
    print_table(["RUN", "STATUS", "STEP", "PROGRESS", "LOSS", "VAL", "CREATED", "MESSAGE"], rows)
    return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (_url, client, keys):
        state = await require_run(client, keys, args.run)
    body = state_dict(state)
    if args.json:
        print_json(body)
        return 0
    for name, value in body.items():
        if value in (None, "", 0) and name not in ("status",):
            continue
        if name in ("created_at", "started_at", "ended_at", "last_heartbeat_ts"):
            value = _when(float(str(value)))
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items() if v not in ("", None))
        print(f"{name:>17}: {value}")
    return 0


async def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (url, client, keys):
        await require_run(client, keys, args.run)
        return await follow_run(url, client, settings, args.run)


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (_url, client, keys):
        state = await require_run(client, keys, args.run)
        if state.status in watch.TERMINAL_STATUSES:
            print(f"run {args.run} already {state.status}; nothing to cancel")
            return 0
        async with client.pipeline(transaction=True) as pipe:
            pipe.set(keys.cancel(args.run), "1", ex=CANCEL_TTL_S)
            add_event(pipe, keys, CancelRequested(run_id=args.run, user_id=state.user_id))
            await pipe.execute()
    print(f"cancel requested for run {args.run}: it stops between two steps of its work")
    return 0


def _event_line(entry: watch.Entry) -> str:
    ms = int(entry.id.partition("-")[0])
    when = datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    try:
        body = msgspec.json.decode(entry.raw)
    except msgspec.DecodeError:
        return f"{when}  {entry.id}  (undecodable) {entry.raw[:200]!r}"
    if not isinstance(body, dict):
        return f"{when}  {entry.id}  {body!r}"
    kind = str(body.pop("kind", "?"))
    for name in ("run_id", "user_id", "at"):
        body.pop(name, None)
    detail = " ".join(f"{k}={msgspec.json.encode(v).decode()}" for k, v in body.items())
    return f"{when}  {kind:<22} {detail}".rstrip()


def _event_json(entry: watch.Entry) -> str:
    try:
        body = msgspec.json.decode(entry.raw)
    except msgspec.DecodeError:
        body = entry.raw.decode(errors="replace")
    return msgspec.json.encode({"id": entry.id, "event": body}).decode()


async def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    render = _event_json if args.json else _event_line
    async with connected(settings) as (url, client, keys):
        await require_run(client, keys, args.run)
        entries, last = await watch.run_history(client, keys, args.run)
        for entry in entries:
            print(render(entry), flush=True)
        if args.follow and not any(watch.is_terminal(e) for e in entries):

            def show(entry: watch.Entry) -> None:
                print(render(entry), flush=True)

            await watch.follow(url, keys, args.run, show, after=last)
    return 0


async def _send_request(client: Redis, keys: Keys, cmd: Base, actor: ActorName) -> None:
    if not [k async for k in client.scan_iter(match=keys.alive_pattern(actor), count=100)]:
        print(
            f"note: no {actor} is running right now; the request waits in its queue",
            file=sys.stderr,
            flush=True,
        )
    async with client.pipeline(transaction=True) as pipe:
        add_command(pipe, keys, cmd)
        await pipe.execute()


async def wait_result(
    client: Redis, keys: Keys, request_id: str, timeout_s: float, poll_s: float = 0.2
) -> dict[str, object]:
    """The result body of a request (absent key = still pending)."""
    deadline = time.monotonic() + timeout_s
    while True:
        raw = await client.get(keys.result(request_id))
        if raw is not None:
            body = msgspec.json.decode(raw)
            if not isinstance(body, dict):
                raise CliError(f"malformed result under {keys.result(request_id)}", 1)
            return body
        if time.monotonic() > deadline:
            raise CliError(
                f"no result after {timeout_s:g}s; request {request_id} stays queued and its "
                f"result will be under {keys.result(request_id)}",
                1,
            )
        await asyncio.sleep(poll_s)


def _failed(body: dict[str, object]) -> int | None:
    if body.get("ok") is True:
        return None
    print(
        f"{body.get('what', 'request')} failed ({body.get('error_kind', 'system')} error): "
        f"{body.get('message', '')}",
        file=sys.stderr,
        flush=True,
    )
    return 1


async def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    request_id = new_id("eval")
    cmd = convert(
        {
            "command_id": request_id,
            "run_id": args.run,
            "request_id": request_id,
            "split": args.split,
            "path": args.path,
            "user_id": args.user_id,
            "requested_at": time.time(),
        },
        ModelEvaluate,
    )
    async with connected(settings) as (_url, client, keys):
        await require_run(client, keys, args.run)
        await _send_request(client, keys, cmd, "evaluator")
        body = await wait_result(client, keys, request_id, args.timeout)
    if (code := _failed(body)) is not None:
        return code
    result = body.get("result")
    if args.json:
        print_json(result)
        return 0
    if isinstance(result, dict):
        for name, value in result.items():
            shown = f"{value:.6g}" if isinstance(value, float) else msgspec.json.encode(value)
            print(f"{name:>20}: {shown if isinstance(shown, str) else shown.decode()}")
    return 0


async def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    request_id = new_id("gen")
    values: dict[str, object] = {
        "command_id": request_id,
        "run_id": args.run,
        "request_id": request_id,
        "prompt": args.prompt,
        "user_id": args.user_id,
        "requested_at": time.time(),
        **given(args, _GENERATE_FIELDS),
    }
    cmd = convert(values, ModelGenerate)
    async with connected(settings) as (_url, client, keys):
        await require_run(client, keys, args.run)
        await _send_request(client, keys, cmd, "evaluator")
        body = await wait_result(client, keys, request_id, args.timeout)
    if (code := _failed(body)) is not None:
        return code
    result = body.get("result")
    if args.json:
        print_json(result)
        return 0
    samples = result.get("samples", []) if isinstance(result, dict) else []
    for i, sample in enumerate(samples if isinstance(samples, list) else []):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(sample)
    return 0


async def cmd_trim(args: argparse.Namespace, settings: Settings) -> int:
    days = args.days if args.days is not None else retention.retention_days()
    async with connected(settings) as (_url, client, keys):
        results = await retention.trim(client, keys, days=days)
    for t in results:
        held = f"; kept from {t.minid}: still needed by group {t.held_by}" if t.held_by else ""
        print(f"{t.stream}: removed {t.removed} entries older than {days:g} days{held}")
    return 0


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.replay_command == "step":
        return await _replay_step(args, settings)
    if args.replay_command == "diff":
        return await _replay_diff(args, settings)
    if bool(args.run) == bool(args.stream):
        raise CliError("give --run RUN, or --stream NAME [--start ID] [--end ID]", 2)
    async with connected(settings) as (url, client, keys):
        if args.run:
            recorded = await replay.run_commands(client, keys, args.run)
            if not recorded:
                await require_run(client, keys, args.run)
                raise CliError(f"no recorded commands of run {args.run} (trimmed?)", 2)
            commands = replay.select_for_run(recorded, all_commands=args.all)
        else:
            actor = replay.actor_of_stream(keys, args.stream)
            commands = await replay.range_commands(client, keys, actor, args.start, args.end)
        prefix = args.to_prefix or replay.default_prefix(keys.prefix)
        target = replay.replay_settings(settings, prefix, args.data_dir)
        done = await replay.redrive(client, keys, commands, target, run_id=args.run or "")
    for entry, new_id_ in done.entries:
        print(
            f"{keys.cmd(entry.actor)} {entry.entry_id} → {Keys(prefix).cmd(entry.actor)} "
            f"{new_id_}  {entry.kind} {entry.command_id}"
        )
    print(f"prefix:   {done.prefix}")
    print(f"data dir: {done.data_dir}", flush=True)
    if args.step or args.drain:
        return await _steps(url, target, until_idle=args.drain)
    print(
        f"next: model-trainer replay step --prefix {prefix}"
        + (f" --data-dir {args.data_dir}" if args.data_dir else "")
        + " (one command at a time), or a separate set of actors: "
        + f"MT_PREFIX={prefix} MT_DATA_DIR={done.data_dir} model-trainer up"
    )
    return 0


async def _steps(url: str, target: Settings, *, until_idle: bool) -> int:
    with _reachable(url):
        results = (
            await replay.drain(url, target)
            if until_idle
            else [r for r in [await replay.step(url, target)] if r is not None]
        )
    if not results:
        print("nothing queued")
    for r in results:
        print(f"{r.actor}: {r.kind} {r.command_id} ({r.entry_id}) → {', '.join(r.events)}")
    return 0


async def _replay_step(args: argparse.Namespace, settings: Settings) -> int:
    if args.prefix == settings.prefix:
        raise CliError(f"refusing to step the live prefix {settings.prefix!r}", 2)
    url = await require_url(settings)
    target = replay.replay_settings(settings, args.prefix, args.data_dir)
    return await _steps(url, target, until_idle=args.until_idle)


async def _replay_diff(args: argparse.Namespace, settings: Settings) -> int:
    a, b = Keys(args.prefix or settings.prefix), Keys(args.against)
    async with connected(settings) as (_url, client, _keys):
        try:
            result = await replay.diff_runs(client, args.run, a, b, ignore=args.ignore or ())
        except watch.UnknownRun:
            raise CliError(
                f"unknown run {args.run!r} in prefix {a.prefix!r} or {b.prefix!r}"
            ) from None
    width = max([len(a.prefix)] + [len(r[0]) for r in result.rows])
    print(f"{'#':>4}  {a.prefix:<{width}}  {b.prefix}")
    for i, (ka, kb, mark) in enumerate(result.rows, 1):
        print(f"{i:>4}  {ka or '-':<{width}}  {kb or '-':<24} {mark}")
    same = "match" if result.kinds_match else "DIFFER"
    print(
        f"event kinds {same} ({len(result.rows)} rows); "
        f"{result.fields_differ} events differ in more than timings"
    )
    return 0 if result.kinds_match else 1


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from actors.cli.demo import run_demo

    return await run_demo(settings, quick=args.quick)


COMMANDS: dict[str, Handler] = {
    "demo": cmd_demo,
    "up": cmd_up,
    "actor": cmd_actor,
    "control": cmd_control,
    "train": cmd_train,
    "tokenizer": cmd_tokenizer,
    "runs": cmd_runs,
    "status": cmd_status,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "events": cmd_events,
    "replay": cmd_replay,
    "trim": cmd_trim,
}


# ------------------------------------------------------------------------------- parsing
def _follow_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="request fields from a TOML file")
    p.add_argument("--detach", action="store_true", help="submit and return (do not follow)")
    p.add_argument("--json", action="store_true", help="print the created run as JSON")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model-trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="embedded Redis (unless REDIS_URL) + every actor + endpoint")
    up.add_argument("--host", default=None, help="control endpoint host (MT_HTTP_HOST)")
    up.add_argument("--port", type=int, default=None, help="control endpoint port (MT_HTTP_PORT)")
    actor = sub.add_parser("actor", help="run one actor against the shared Redis")
    actor.add_argument("name", choices=ACTOR_NAMES)
    control = sub.add_parser("control", help="the control endpoint only, against a running service")
    control.add_argument("--host", default=None)
    control.add_argument("--port", type=int, default=None)

    train = sub.add_parser("train", help="train a tokenizer + model and follow the run")
    _follow_flags(train)
    add_flags(train.add_argument_group("run settings (override the --config file)"), _TRAIN_FIELDS)
    tok = sub.add_parser("tokenizer", help="tokenizer jobs")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a tokenizer and follow the job")
    _follow_flags(tok_train)
    add_flags(
        tok_train.add_argument_group("tokenizer settings (override the --config file)"),
        _TOKENIZER_FIELDS,
    )

    runs = sub.add_parser("runs", help="recent runs")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="a run's state")
    status.add_argument("run")
    status.add_argument("--json", action="store_true")
    watch_p = sub.add_parser("watch", help="live progress of a run until it ends")
    watch_p.add_argument("run")
    cancel = sub.add_parser("cancel", help="cancel a run")
    cancel.add_argument("run")
    events = sub.add_parser("events", help="a run's recorded events, one line each")
    events.add_argument("run")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--follow", action="store_true", help="keep printing until the run ends")

    ev = sub.add_parser("eval", help="evaluate a run and print its metrics")
    ev.add_argument("run")
    ev.add_argument("--split", default="test", choices=["validation", "test"])
    ev.add_argument("--path", default="", help="a text file under the corpus root instead")
    gen = sub.add_parser("generate", help="sample text from a run's model")
    gen.add_argument("run")
    gen.add_argument("prompt", nargs="?", default="")
    add_flags(gen, _GENERATE_FIELDS, {"num_return_sequences": ["--num"]})
    for request in (ev, gen):
        request.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
        request.add_argument("--user-id", type=int, default=0)
        request.add_argument("--json", action="store_true")

    rp = sub.add_parser("replay", help="re-drive recorded commands into a fresh prefix")
    rp.add_argument("--run", help="replay this run (its first chain command; see --all)")
    rp.add_argument("--all", action="store_true", help="every recorded command of the run")
    rp.add_argument("--stream", help="or: an id range of this command stream (actor name)")
    rp.add_argument("--start", default="-", help="first entry id (default: the oldest)")
    rp.add_argument("--end", default="+", help="last entry id (default: the newest)")
    rp.add_argument("--to-prefix", help="fresh key prefix (default <prefix>-replay-<id>)")
    rp.add_argument("--data-dir", type=Path, help="default <data_dir>/replays/<to-prefix>")
    mode = rp.add_mutually_exclusive_group()
    mode.add_argument("--step", action="store_true", help="then handle exactly one command")
    mode.add_argument("--drain", action="store_true", help="then handle all, one at a time")
    rp_sub = rp.add_subparsers(dest="replay_command", metavar="{step,diff}")
    rp_step = rp_sub.add_parser("step", help="handle exactly one queued command of a prefix")
    rp_step.add_argument("--prefix", required=True)
    rp_step.add_argument("--data-dir", type=Path)
    rp_step.add_argument("--until-idle", action="store_true", help="one at a time until none")
    rp_diff = rp_sub.add_parser("diff", help="compare a run's events in two prefixes")
    rp_diff.add_argument("--run", required=True)
    rp_diff.add_argument("--prefix", help="default MT_PREFIX")
    rp_diff.add_argument("--against", required=True)
    rp_diff.add_argument("--ignore", action="append", metavar="KIND", help="skip these kinds")

    demo = sub.add_parser("demo", help="the main job end to end on the embedded service")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")

    trim = sub.add_parser("trim", help="trim old stream entries (never pending ones)")
    trim.add_argument("--days", type=float, default=None, help="MT_RETENTION_DAYS (14)")
    return p


async def run(argv: Sequence[str], settings: Settings | None = None) -> int:
    """Parse and run one command in the running event loop (tests call this)."""
    args = parser().parse_args(list(argv))
    settings = settings or Settings.from_env()
    try:
        return await COMMANDS[args.command](args, settings)
    except CliError as e:
        _err(e.message)
        return e.code
    except UserError as e:
        _err(str(e))
        return 2
    except (RedisConnectionError, RedisTimeoutError) as e:
        _err(f"cannot reach Redis: {e}")
        return 3


async def _main(argv: Sequence[str]) -> int:
    # SIGTERM ends a command as Ctrl-C does (`up` installs its own orderly stop instead).
    task = asyncio.current_task()
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        if task is not None:
            task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await run(argv)
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt
        _err("terminated")
        return 143


def _log_to_file(settings: Settings) -> None:
    """Send the console copy of log lines to a file (per-run logs.jsonl stay as they are), so
    that actors running in this process do not scribble over the live progress bars."""
    global _log_file
    path = settings.data_dir / "logs" / "model-trainer.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=path.open("a")))
    _log_file = path


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    settings = Settings.from_env()
    log.configure(settings.data_dir)
    # The demo's output is the story of its run; the actors' log lines go to a file.
    if args[:1] == ["demo"] or (args[:1] in (["train"], ["tokenizer"]) and sys.stdout.isatty()):
        _log_to_file(settings)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
