"""Wiring: which actors exist, and running them (with the embedded server when needed)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence

from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.embedded import EmbeddedRedis
from actors.runtime.streams import Actor, RuntimeConfig, run_actors
from actors.workers.bot_events import NotifierConfig
from actors.workers.evaluator import EvaluatorActor
from actors.workers.ingest import IngestActor
from actors.workers.notifier import run_notifier
from actors.workers.tokenizer import TokenizerActor
from actors.workers.trainer import TrainerActor
from actors.workers.uploader import UploaderActor
from protocol.keys import ActorName, Keys

# Registry of the command actors; the notifier reads the events stream and is run beside
# them by serve().
ACTORS: dict[ActorName, Callable[[Settings], Actor]] = {
    "ingest": IngestActor,
    "tokenizer": TokenizerActor,
    "trainer": TrainerActor,
    "evaluator": EvaluatorActor,
    "uploader": UploaderActor,
}


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """REDIS_URL when set; otherwise the data dir's embedded server for the duration of the
    block: started here, or adopted when a killed owner left it running. Raises DataDirTaken
    while another live process owns it."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(settings.data_dir)
    server.start()
    if server.adopted is not None:
        log.get("service").info(
            "adopted the embedded server its stopped owner left running",
            url=server.url,
            pid=server.adopted,
        )
    try:
        yield server.url
    finally:
        server.stop()


def build(settings: Settings, names: Sequence[ActorName]) -> list[Actor]:
    return [ACTORS[name](settings) for name in names if name in ACTORS]


async def serve(
    settings: Settings,
    url: str,
    names: Sequence[ActorName],
    *,
    config: RuntimeConfig | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    until_idle: bool = False,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
) -> None:
    """Run the named actors (the notifier included) in this process until SIGTERM/SIGINT or
    `stop` — or, with until_idle, until each has handled what is queued."""
    log.configure()
    actors = build(settings, names)
    logger = log.get("service")
    missing = [n for n in names if n not in ACTORS and n != "notifier"]
    if missing:
        logger.info("actor kinds not available, not started", kinds=missing)
    stop = stop or asyncio.Event()
    config = config or RuntimeConfig(lease_s=settings.lease_s)
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        jobs = [
            run_actors(
                actors,
                url,
                keys=Keys(settings.prefix),
                consumer_name=settings.consumer_name,
                config=config,
                on_ready=on_ready,
                until_idle=until_idle,
                stop=stop,
                install_signals=False,
                runs_dir=settings.data_dir / "runs",
            )
        ]
        if "notifier" in names:
            notifier = NotifierConfig(block_ms=config.block_ms)
            jobs.append(
                run_notifier(settings, url, stop=stop, until_idle=until_idle, config=notifier)
            )
        await asyncio.gather(*jobs)
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
