"""What the control endpoint's modules share: the app's and the request's keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from actors.client.client import ServiceClient
from actors.runtime.config import Settings
from actors.runtime.store import Store

MAX_BODY = 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Slots:
    """A count of live SSE streams, at most `limit` at once: each holds a Redis connection
    and a task until its client leaves or its run ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live = 0

    def take(self) -> bool:
        if self.live >= self.limit:
            return False
        self.live += 1
        return True

    def give_back(self) -> None:
        self.live -= 1


SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", ServiceClient)
STOPPING = web.AppKey("stopping", asyncio.Event)
OPENAPI = web.AppKey("openapi", bytes)
STREAMS = web.AppKey("streams", Slots)
STORE = web.AppKey("store", Store)  # artifacts in the store are downloaded through it
REQUEST_ID = web.RequestKey("request_id", str)
STREAM = web.RequestKey("stream", web.StreamResponse)  # an SSE response already under way
