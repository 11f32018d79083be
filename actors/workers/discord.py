"""Direct messages to the user of a run through Discord's REST API: one message per run,
edited in place as the run advances, rate-limited per run, with 429s waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

from actors.runtime import log
from actors.workers.bot_events import NotifierConfig, RunView, pointer_of, recipe_label


class DiscordError(RuntimeError):
    """Discord refused a request (or kept failing); the card of that run stops updating."""


_COLORS = {
    "queued": 0x95A5A6,
    "running": 0x3498DB,
    "completed": 0x2ECC71,
    "failed": 0xE74C3C,
    "cancelled": 0x7F8C8D,
}


_WIDE = {"Recipe"}  # fields with a sentence in them get a line of their own


def embed(view: RunView) -> dict[str, object]:
    """One embed per run: the run's card in the user's direct messages."""
    state = view.state
    fields = [
        ("Status", state.status),
        ("Step", state.step or "-"),
        ("Progress", f"{view.progress}%"),
    ]
    if state.total_epochs:
        fields.append(("Epoch", f"{state.epoch}/{state.total_epochs}"))
    if state.train_step:
        total = f"/{state.total_steps}" if state.total_steps else ""
        fields.append(("Train step", f"{state.train_step}{total}"))
    for name, value in (
        ("Loss", state.loss),
        ("Val loss", state.val_loss),
        ("Test loss", state.test_loss),
        ("Test ppl", state.test_ppl),
    ):
        if value is not None:
            fields.append((name, f"{value:.4f}"))
    if state.mfu is not None and math.isfinite(state.mfu):
        fields.append(("MFU", f"{state.mfu:.1%}"))
    if state.precision:  # once training has started: what it trains with, and why
        reason = f": {state.recipe}" if state.recipe else ""
        fields.append(("Recipe", recipe_label(state) + reason))
    if (art := pointer_of(state)) is not None:
        fields.append(("Artifact", art.file_id or art.uri))
    return {
        "title": f"Run {view.run_id}"[:256],
        "description": view.message[:4000],
        "color": _COLORS.get(state.status, _COLORS["running"]),
        "fields": [
            {"name": n, "value": v[:1024] or "-", "inline": n not in _WIDE} for n, v in fields
        ],
    }


class Discord:
    """Just enough of Discord's REST API for direct messages, honouring rate limits."""

    def __init__(
        self, session: aiohttp.ClientSession, api: str, token: str, tries: int = 5
    ) -> None:
        self.session = session
        self.api = api.rstrip("/")
        self.headers = {"Authorization": f"Bot {token}", "Content-Type": "application/json"}
        self.tries = tries
        self.log = log.get("discord")
        self._channels: dict[int, str] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def request(self, method: str, path: str, body: object) -> dict[str, object]:
        data = msgspec.json.encode(body)
        for attempt in range(1, self.tries + 1):
            try:
                async with self.session.request(
                    method, f"{self.api}{path}", data=data, headers=self.headers
                ) as resp:
                    raw = await resp.read()
                    if resp.status == 429:
                        wait = _retry_after(raw, resp.headers.get("Retry-After"))
                        self.log.info("rate limited by Discord", path=path, retry_after_s=wait)
                        await asyncio.sleep(wait)
                        continue
                    if resp.status < 500:
                        if resp.status >= 400:
                            text = raw[:300].decode("utf-8", "replace")
                            raise DiscordError(f"{method} {path}: HTTP {resp.status} {text}")
                        decoded = msgspec.json.decode(raw) if raw else {}
                        return decoded if isinstance(decoded, dict) else {}
                    problem = f"HTTP {resp.status}"
            except aiohttp.ClientError as e:
                problem = f"{type(e).__name__}: {e}"
            await asyncio.sleep(min(10.0, 0.5 * 2 ** (attempt - 1)))
            self.log.warning("Discord request failed, retrying", path=path, error=problem)
        raise DiscordError(f"{method} {path}: gave up after {self.tries} tries")

    async def dm_channel(self, user_id: int) -> str:
        """The DM channel with a user, opened once and cached."""
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            if user_id not in self._channels:
                reply = await self.request(
                    "POST", "/users/@me/channels", {"recipient_id": str(user_id)}
                )
                self._channels[user_id] = str(reply["id"])
            return self._channels[user_id]

    async def post(self, channel_id: str, card: dict[str, object]) -> str:
        reply = await self.request("POST", f"/channels/{channel_id}/messages", {"embeds": [card]})
        return str(reply["id"])

    async def edit(self, channel_id: str, message_id: str, card: dict[str, object]) -> None:
        await self.request(
            "PATCH", f"/channels/{channel_id}/messages/{message_id}", {"embeds": [card]}
        )


class _RateLimited(msgspec.Struct):
    """Discord's 429 body (the part we read)."""

    retry_after: float | None = None


def _retry_after(body: bytes, header: str | None) -> float:
    """Seconds to wait after a 429: the body's `retry_after`, else the Retry-After header."""
    with contextlib.suppress(msgspec.DecodeError):
        value = msgspec.json.decode(body, type=_RateLimited).retry_after
        if value is not None and math.isfinite(value):
            return max(0.0, value)
    if header:
        with contextlib.suppress(ValueError):
            return max(0.0, float(header))
    return 1.0


@dataclass
class Card:
    """The DM of one run: its worker sends the newest state, at most once per interval."""

    view: RunView
    version: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Mailer:
    """Per-run Discord workers, fed by the reading loop without ever blocking it."""

    def __init__(self, discord: Discord, config: NotifierConfig) -> None:
        self.discord = discord
        self.config = config
        self.cards: dict[str, Card] = {}
        self.flushing = asyncio.Event()
        self.log = log.get("discord")

    def update(self, view: RunView) -> None:
        if view.user_id <= 0:
            return
        card = self.cards.get(view.run_id)
        if card is None:
            if self.flushing.is_set():
                return
            card = self.cards[view.run_id] = Card(view)
            card.task = asyncio.create_task(self._work(card))
        card.view = view
        card.version += 1
        card.wake.set()

    async def _work(self, card: Card) -> None:
        run_id = card.view.run_id
        sent, last = 0, -math.inf
        channel = message_id = ""
        try:
            while True:
                await card.wake.wait()
                card.wake.clear()
                wait = self.config.discord_interval_s - (time.monotonic() - last)
                if wait > 0 and not self.flushing.is_set():
                    # Updates arriving meanwhile are folded into the next edit.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.flushing.wait(), wait)
                if card.version != sent:
                    version, body = card.version, embed(card.view)
                    if not channel:
                        channel = await self.discord.dm_channel(card.view.user_id)
                    if not message_id:
                        message_id = await self.discord.post(channel, body)
                    else:
                        await self.discord.edit(channel, message_id, body)
                    sent, last = version, time.monotonic()
                if card.version == sent and (card.view.final or self.flushing.is_set()):
                    return
                if card.version != sent:
                    card.wake.set()
        except DiscordError as e:
            self.log.warning("Discord DM abandoned for this run", run_id=run_id, error=str(e))
        finally:
            self.cards.pop(run_id, None)

    async def close(self) -> None:
        """Send each card's last state (within the grace period), then stop the workers."""
        self.flushing.set()
        tasks = [c.task for c in self.cards.values() if c.task is not None]
        for card in self.cards.values():
            card.wake.set()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ------------------------------------------------------------------ the reader
