"""What every subcommand shares: clean errors, finding the service's Redis, a connected
ServiceClient, and printing (tables, JSON, a run's end)."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.table import Table

from actors.client import watch
from actors.client.client import ServiceClient, UnknownRun
from actors.runtime.config import Settings
from actors.runtime.embedded import has_owner
from protocol.events import ArtifactPointer
from protocol.keys import Keys
from protocol.state import RunState


class CliError(Exception):
    """A clean failure: its message is printed (no traceback) and `code` is the exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def err(message: str) -> None:
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
    """REDIS_URL; else the URL of a live embedded server of a running `up` (it answers PING
    and a live process owns it: a server a killed `up` left behind has no actors, and the
    next in-process service adopts it)."""
    if settings.redis_url:
        return settings.redis_url
    try:
        url = url_file(settings).read_text().strip()
    except OSError:
        return None
    if not url or not has_owner(settings.data_dir):
        return None
    return url if await answers(url) else None


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
def reachable(url: str) -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise CliError(f"cannot reach Redis at {safe_url(url)}: {e}", 3) from e


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[tuple[str, ServiceClient]]:
    url = await require_url(settings)
    client = ServiceClient.connect(url, Keys(settings.prefix))
    try:
        with reachable(url):
            yield url, client
    finally:
        await client.aclose()


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


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def num(value: float | None, fmt: str = ".4f") -> str:
    return "" if value is None else format(value, fmt)


def state_dict(state: RunState) -> dict[str, object]:
    body: dict[str, object] = msgspec.to_builtins(state)
    if state.artifact:
        with contextlib.suppress(msgspec.DecodeError):
            body["artifact"] = msgspec.json.decode(state.artifact, type=ArtifactPointer)
    return body


def print_json(value: object) -> None:
    print(msgspec.json.encode(value).decode(), flush=True)


def ended(settings: Settings, state: RunState) -> int:
    if state.status == "completed":
        where = settings.run_dir(state.run_id)
        extra = f"; files in {where}" if where.exists() else ""
        print(f"run {state.run_id} completed{extra}", flush=True)
        return 0
    print(f"run {state.run_id} {state.status}: {state.message}", file=sys.stderr, flush=True)
    return 1


async def require_run(client: ServiceClient, run_id: str) -> RunState:
    try:
        return await client.run_state(run_id)
    except UnknownRun:
        raise CliError(f"unknown run {run_id!r} (prefix {client.keys.prefix!r})", 2) from None


async def follow_run(client: ServiceClient, settings: Settings, run_id: str) -> int:
    renderer = watch.renderer_for(sys.stdout)
    try:
        state = await watch.watch(client, run_id, renderer)
    finally:
        renderer.close()
    return ended(settings, state)
