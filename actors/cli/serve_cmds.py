"""Subcommands that run parts of the service: `up`, `actor`, `control` and `demo`; and `gc`,
the data dir's cache of the store trimmed to MT_CACHE_GB (also run by `up` and `actor`
every artifacts.GC_EVERY_S, and once at their start)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

from actors import service
from actors.cli.common import CliError, require_url, running_url, safe_url
from actors.cli.demo import run_demo
from actors.cli.service_ctx import serve_control, service_redis
from actors.runtime import artifacts, log, retention
from actors.runtime.config import Settings
from actors.runtime.connection import connect
from protocol.keys import ACTOR_NAMES, ActorName, Keys


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def print_gc(report: artifacts.GcReport) -> None:
    for path in report.evicted:
        print(f"evicted  {path}")
    for path in report.in_use:
        print(f"in use   {path} (kept)")
    print(
        f"freed {_size(report.freed_bytes)} of {_size(report.total_bytes)} "
        f"(limit {_size(report.limit_bytes)}); {len(report.evicted)} evicted, "
        f"{len(report.in_use)} kept in use"
    )


async def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    limit = None if args.limit_gb is None else int(args.limit_gb * 1e9)
    if limit is not None and limit < 0:
        raise CliError("--limit-gb must not be negative", 2)
    print_gc(await asyncio.to_thread(artifacts.gc, settings, limit))
    return 0


async def gc_periodic(settings: Settings, every_s: float = artifacts.GC_EVERY_S) -> None:
    """gc now and then every `every_s` seconds, until cancelled; each pass is logged."""
    logger = log.get("cache").bind(data_dir=str(settings.data_dir), limit_gb=settings.cache_gb)
    while True:
        try:
            report = await asyncio.to_thread(artifacts.gc, settings)
        except OSError as e:  # a pass that fails is logged; the next one tries again
            logger.warning("cache gc failed", error=str(e))
        else:
            logger.info(
                "cache gc",
                evicted=report.evicted,
                freed_bytes=report.freed_bytes,
                total_bytes=report.total_bytes,
                in_use=report.in_use,
            )
        await asyncio.sleep(every_s)


def _http(args: argparse.Namespace, settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        http_host=args.host or settings.http_host,
        http_port=settings.http_port if args.port is None else args.port,
    )


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    settings = _http(args, settings)
    names = list(ACTOR_NAMES)
    days = retention.retention_days()
    # Refused while another live process owns the data dir's server; adopted when a killed
    # `up` left it running.
    with service_redis(settings) as url:
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
            asyncio.create_task(gc_periodic(settings)),
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
    gc = asyncio.create_task(gc_periodic(settings))
    try:
        await service.serve(settings, url, [name])
    finally:
        gc.cancel()
        await asyncio.gather(gc, return_exceptions=True)
    return 0


async def cmd_control(args: argparse.Namespace, settings: Settings) -> int:
    settings = _http(args, settings)
    url = await require_url(settings)
    print(f"redis:   {safe_url(url)}", flush=True)
    await serve_control(settings, url)
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    return await run_demo(settings, quick=args.quick)
