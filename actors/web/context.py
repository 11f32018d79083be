"""What the control endpoint's modules share: the app's and the request's keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from actors.client.client import ServiceClient
from actors.runtime.config import Settings

MAX_BODY = 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", ServiceClient)
STOPPING = web.AppKey("stopping", asyncio.Event)
OPENAPI = web.AppKey("openapi", bytes)
REQUEST_ID = web.RequestKey("request_id", str)
STREAM = web.RequestKey("stream", web.StreamResponse)  # an SSE response already under way
