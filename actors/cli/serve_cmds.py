"""Subcommands that run parts of the service: `up`, `actor`, `control` and `demo`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

from actors import service
from actors.cli.common import CliError, require_url, running_url, safe_url
from actors.cli.demo import run_demo
from actors.cli.service_ctx import serve_control, service_redis
from actors.runtime import retention
from actors.runtime.config import Settings
from actors.runtime.connection import connect
from protocol.keys import ACTOR_NAMES, ActorName, Keys


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


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    return await run_demo(settings, quick=args.quick)
