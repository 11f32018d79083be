"""Subcommands on the streams themselves: `replay` (run, step, diff) and `trim`."""

from __future__ import annotations

import argparse

from actors.cli.common import CliError, connected, reachable, require_run, require_url
from actors.client import replay
from actors.client.client import UnknownRun
from actors.runtime import retention
from actors.runtime.config import Settings
from protocol.keys import Keys


async def cmd_trim(args: argparse.Namespace, settings: Settings) -> int:
    days = args.days if args.days is not None else retention.retention_days()
    async with connected(settings) as (_url, client):
        results = await retention.trim(client.redis, client.keys, days=days)
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
    async with connected(settings) as (url, client):
        redis, keys = client.redis, client.keys
        if args.run:
            recorded = await replay.run_commands(redis, keys, args.run)
            if not recorded:
                await require_run(client, args.run)
                raise CliError(f"no recorded commands of run {args.run} (trimmed?)", 2)
            commands = replay.select_for_run(recorded, all_commands=args.all)
        else:
            actor = replay.actor_of_stream(keys, args.stream)
            commands = await replay.range_commands(redis, keys, actor, args.start, args.end)
        prefix = args.to_prefix or replay.default_prefix(keys.prefix)
        target = replay.replay_settings(settings, prefix, args.data_dir)
        done = await replay.redrive(redis, keys, commands, target, run_id=args.run or "")
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
    with reachable(url):
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
    async with connected(settings) as (_url, client):
        try:
            result = await replay.diff_runs(client.redis, args.run, a, b, ignore=args.ignore or ())
        except UnknownRun:
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
