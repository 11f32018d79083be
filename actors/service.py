"""Wiring: which actors exist, and running them (with the embedded server when needed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence

from actors import log
from actors.config import Settings
from actors.embedded import EmbeddedRedis
from actors.evaluator import EvaluatorActor
from actors.ingest import IngestActor
from actors.tokenizer import TokenizerActor
from actors.trainer import TrainerActor
from actors.runtime import Actor, RuntimeConfig, run_actors
from protocol.keys import ActorName, Keys

# Registry of command actors; a kind that is not here yet is simply not started.
ACTORS: dict[ActorName, Callable[[Settings], Actor]] = {
    "ingest": IngestActor,
    "tokenizer": TokenizerActor,
    "trainer": TrainerActor,
    "evaluator": EvaluatorActor,
}


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """REDIS_URL when set; otherwise an embedded server for the duration of the block."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(settings.data_dir)
    server.start()
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
    actors = build(settings, names)
    logger = log.get("service")
    missing = [n for n in names if n not in ACTORS]
    if missing:
        logger.info("actor kinds not available, not started", kinds=missing)
    await run_actors(
        actors, url, keys=Keys(settings.prefix),
        consumer_name=settings.consumer_name, config=config,
        on_ready=on_ready, until_idle=until_idle, stop=stop, install_signals=install_signals,
    )  # fmt: skip


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
