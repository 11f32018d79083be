"""Subcommands about runs and requests: train, tokenizer train, runs, status, watch, cancel,
events, eval and generate."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

import msgspec

from actors import service
from actors.cli.common import (
    CliError,
    connected,
    follow_run,
    num,
    print_json,
    print_table,
    reachable,
    require_run,
    running_url,
    state_dict,
    when,
)
from actors.cli.flags import GENERATE_FIELDS, convert, request_from, with_corpus_path
from actors.cli.service_ctx import IN_PROCESS_GRACE_S, log_file, with_service
from actors.client.client import (
    Entry,
    RequestResult,
    RunEnded,
    Samples,
    ServiceClient,
)
from actors.client.submit import new_id, plan_tokenizer, plan_train
from actors.runtime.config import Settings
from actors.runtime.streams import RuntimeConfig
from protocol.commands import ChainCommand, ModelEvaluate, ModelGenerate, RequestCommand, actor_of
from protocol.flags import given
from protocol.keys import Keys
from protocol.requests import TokenizerTrainRequest, TrainRequest


async def _submit_and_follow(
    args: argparse.Namespace, settings: Settings, chain: list[ChainCommand]
) -> int:
    async def go(url: str) -> int:
        client = ServiceClient.connect(url, Keys(settings.prefix))
        try:
            with reachable(url):
                info = await client.submit(chain)
                if args.json:
                    print_json(info)
                else:
                    print(f"run {info.run_id} queued: {' → '.join(info.steps)}", flush=True)
                if args.detach:
                    if not args.json:
                        print(f"follow it with: model-trainer watch {info.run_id}", flush=True)
                    return 0
                return await follow_run(client, settings, info.run_id)
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
    logs = f"; their log: {where}" if (where := log_file()) else ""
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
    async with connected(settings) as (_url, client):
        states = await client.runs(args.limit)
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
            num(s.loss),
            num(s.val_loss),
            when(s.created_at),
            s.message[:60],
        ]
        for s in states
    ]
    print_table(["RUN", "STATUS", "STEP", "PROGRESS", "LOSS", "VAL", "CREATED", "MESSAGE"], rows)
    return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (_url, client):
        state = await require_run(client, args.run)
    body = state_dict(state)
    if args.json:
        print_json(body)
        return 0
    for name, value in body.items():
        if value in (None, "", 0) and name not in ("status",):
            continue
        if name in ("created_at", "started_at", "ended_at", "last_heartbeat_ts"):
            value = when(float(str(value)))
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items() if v not in ("", None))
        print(f"{name:>17}: {value}")
    return 0


async def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (_url, client):
        await require_run(client, args.run)
        return await follow_run(client, settings, args.run)


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (_url, client):
        await require_run(client, args.run)
        try:
            await client.cancel(args.run)
        except RunEnded as e:
            print(f"run {args.run} already {e.status}; nothing to cancel")
            return 0
    print(f"cancel requested for run {args.run}: it stops between two steps of its work")
    return 0


def _event_line(entry: Entry) -> str:
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


def _event_json(entry: Entry) -> str:
    try:
        body = msgspec.json.decode(entry.raw)
    except msgspec.DecodeError:
        body = entry.raw.decode(errors="replace")
    return msgspec.json.encode({"id": entry.id, "event": body}).decode()


async def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    render = _event_json if args.json else _event_line
    async with connected(settings) as (_url, client):
        await require_run(client, args.run)
        entries, last = await client.history(args.run)
        for entry in entries:
            print(render(entry), flush=True)
        if args.follow and not any(e.terminal for e in entries):
            async for batch in client.follow(args.run, after=last):
                for entry in batch:
                    print(render(entry), flush=True)
    return 0


async def ask(settings: Settings, cmd: RequestCommand, timeout_s: float) -> RequestResult:
    """Queue a request for the evaluator and wait for its answer (a CliError, exit code 1,
    when it failed or did not come in time)."""
    async with connected(settings) as (_url, client):
        await require_run(client, cmd.run_id)
        if "evaluator" not in await client.alive_kinds():
            print(
                "note: no evaluator is running right now; the request waits in its queue",
                file=sys.stderr,
                flush=True,
            )
        await client.queue(cmd)
        try:
            answer = await client.wait_result(cmd.request_id, timeout_s)
        except TimeoutError:
            raise CliError(
                f"no result after {timeout_s:g}s; request {cmd.request_id} stays queued and "
                f"its result will be under {client.keys.result(cmd.request_id)}",
                1,
            ) from None
    if not answer.ok:
        raise CliError(f"{answer.what} failed ({answer.error_kind} error): {answer.message}", 1)
    return answer


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
    answer = await ask(settings, cmd, args.timeout)
    if args.json:
        print_json(answer.result)
        return 0
    for name, value in msgspec.convert(answer.result, dict[str, object]).items():
        shown = f"{value:.6g}" if isinstance(value, float) else msgspec.json.encode(value).decode()
        print(f"{name:>20}: {shown}")
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
        **given(args, GENERATE_FIELDS),
    }
    cmd = convert(values, ModelGenerate)
    answer = await ask(settings, cmd, args.timeout)
    if args.json:
        print_json(answer.result)
        return 0
    samples = msgspec.convert(answer.result, Samples).samples
    for i, sample in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(sample)
    return 0
