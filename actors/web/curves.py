"""GET /runs/{id}/curves: a run's training curves (train loss, validation loss, learning rate,
tokens/s by step), read from its recorded train.progress events, so the dashboard draws them
without reducing events itself. `after` (an events-stream entry id, the `last` of a previous
answer) limits the answer to newer points: the page asks for those when an event arrives.
"""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

from actors.client.client import ServiceClient, start_after
from actors.web.context import CLIENT
from actors.web.http import json_response, run_of
from actors.web.openapi import Param
from protocol.events import AnyEvent, TrainProgress
from protocol.state import RunState

Point = tuple[int, float]  # (training step, value)
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

AFTER = Param(
    "after",
    {"type": "string", "pattern": _ENTRY_ID.pattern},
    "only points recorded after this events-stream entry id (a previous answer's `last`)",
)


class Curves(msgspec.Struct, kw_only=True):
    """Points in step order, one per step: a step recorded twice (a training resumed from
    its last checkpoint repeats steps) keeps its newest value."""

    run_id: str
    train_loss: list[Point] = []
    val_loss: list[Point] = []
    lr: list[Point] = []
    tokens_per_s: list[Point] = []
    last: str = ""  # the last events-stream entry scanned: the next `after`


def curves_of(run_id: str, events: list[AnyEvent], last: str = "") -> Curves:
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    lr: dict[int, float] = {}
    tps: dict[int, float] = {}
    for event in events:
        if not isinstance(event, TrainProgress):
            continue
        train[event.step] = event.loss
        if event.val_loss is not None:
            val[event.step] = event.val_loss
        if event.lr:  # 0.0: not reported
            lr[event.step] = event.lr
        if event.tokens_per_s:
            tps[event.step] = event.tokens_per_s
    return Curves(
        run_id=run_id,
        train_loss=sorted(train.items()),
        val_loss=sorted(val.items()),
        lr=sorted(lr.items()),
        tokens_per_s=sorted(tps.items()),
        last=last,
    )


async def read_curves(client: ServiceClient, state: RunState, after: str = "") -> Curves:
    """The run's curves from its creation on, or only the points recorded after `after`."""
    entries, last = await client.history(state.run_id, after=after or start_after(state))
    events = [e.event for e in entries if e.event is not None]
    return curves_of(state.run_id, events, last)


async def get_curves(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    after = request.query.get("after", "")
    if not _ENTRY_ID.fullmatch(after):
        after = ""  # as for Last-Event-ID: anything else means from the start
    curves = await read_curves(request.app[CLIENT], state, after)
    return json_response(curves)
