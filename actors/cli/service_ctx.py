"""The service inside this process: an embedded Redis (unless REDIS_URL) and every actor for
the duration of a block, the control endpoint, and where the actors' log lines go meanwhile.

`train` / `tokenizer train` with no service running and `demo` both use it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import structlog

from actors import service
from actors.cli.common import CliError, safe_url
from actors.runtime.config import Settings
from actors.runtime.embedded import DataDirTaken
from actors.runtime.streams import RuntimeConfig
from protocol.keys import ACTOR_NAMES, ActorName

# Interrupting an in-process run: how long its running step may take to finish before it is
# cancelled (its command stays queued; training resumes from its last checkpoint).
IN_PROCESS_GRACE_S = 5.0
_log_file: Path | None = None  # where log lines go instead of the terminal (train on a tty)


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
    with service_redis(settings) as url:
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


@contextlib.contextmanager
def service_redis(settings: Settings) -> Iterator[str]:
    """service.redis_for, where a data dir that another live process serves is a clean
    error instead of a traceback."""
    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(service.redis_for(settings))
    except DataDirTaken as e:
        raise CliError(
            f"{safe_url(str(e))}; stop it first, or point this one at a shared REDIS_URL", 2
        ) from e
    with stack:
        yield url


async def serve_control(settings: Settings, url: str) -> None:
    """The control endpoint until cancelled; prints its bound URL once it listens. Imported
    here so that commands that do not serve HTTP never load aiohttp."""
    from actors.web.app import serve

    async def listening(where: str) -> None:
        print(f"control: {where}", flush=True)

    await serve(settings, url, settings.http_host, settings.http_port, on_ready=listening)


def log_to_file(settings: Settings) -> None:
    """Send the console copy of log lines to a file (per-run logs.jsonl stay as they are), so
    that actors running in this process do not scribble over the live progress bars."""
    global _log_file
    path = settings.data_dir / "logs" / "model-trainer.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=path.open("a")))
    _log_file = path


def log_file() -> Path | None:
    return _log_file
