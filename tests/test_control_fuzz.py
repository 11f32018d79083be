"""Random bodies to every POST route of the control endpoint: never a 5xx, and every answer
is either a success or a well-formed error {"code", "message", "request_id"}."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from actors.runtime.config import Settings
from actors.runtime.outcome import add_event
from protocol.events import RunCompleted, RunQueued
from protocol.keys import Keys
from protocol.requests import (
    ChatRequest,
    EvaluateRequest,
    GenerateRequest,
    ScoreRequest,
    TokenizerTrainRequest,
    TrainRequest,
)
from tests.http_helpers import Served, start_app

RUN = "run-fuzz"  # completed
QUEUED = "run-fuzz-queued"
# Route → (its body type, a valid body that random fields are mixed into).
POST_ROUTES: dict[str, tuple[type[msgspec.Struct] | None, dict[str, object]]] = {
    "/runs/train": (TrainRequest, {"corpus_path": "tiny.txt"}),
    "/tokenizers/train": (TokenizerTrainRequest, {"corpus_path": "tiny.txt"}),
    f"/runs/{RUN}/evaluate": (EvaluateRequest, {}),
    f"/runs/{RUN}/score": (ScoreRequest, {"text": "hello"}),
    f"/runs/{RUN}/generate": (GenerateRequest, {}),
    f"/runs/{RUN}/chat": (ChatRequest, {"message": "hi"}),
    f"/runs/{QUEUED}/cancel": (None, {}),
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
# Values that get past the type checks, so the deeper checks (paths, ids, names) run too.
plausible = st.sampled_from(
    [
        "tiny.txt",
        "../outside.txt",
        "/etc/hostname",
        "escape.txt",
        "missing.txt",
        "",
        "shakespeare",
        "tok-ready",
        "run-fuzz",
        "bpe",
        "char",
        "test",
        "gpt2",
        "tiny",
        "a" * 300,
        "x\x00y",
        "hello",
        0,
        1,
        64,
        2**40,
        -1,
        0.5,
        1e9,
        True,
        [],
        ["a"],
        {},
    ]
)


def valid_values(typ: type[msgspec.Struct] | None) -> dict[str, st.SearchStrategy[object]]:
    """Per field, values near its default (so that many distinct bodies are accepted)."""
    out: dict[str, st.SearchStrategy[object]] = {}
    for f in msgspec.structs.fields(typ) if typ is not None else ():
        d = f.default
        if isinstance(d, bool):
            out[f.name] = st.booleans()
        elif isinstance(d, int):
            out[f.name] = st.integers(d, d + 2)
        elif d is not msgspec.NODEFAULT:
            out[f.name] = st.just(d)
    return out


def bodies(typ: type[msgspec.Struct] | None, valid: dict[str, object]) -> st.SearchStrategy[bytes]:
    """Any JSON, dicts of the real field names, a valid body with some fields set to valid
    or random values, and bytes that are not JSON at all."""
    names = list(typ.__struct_fields__) if typ is not None else ["x"]
    fields = st.dictionaries(
        st.sampled_from(names) | st.text(max_size=8), json_values | plausible, max_size=6
    )
    good = valid_values(typ)
    near_valid = st.fixed_dictionaries({}, optional=good).map(lambda extra: {**valid, **extra})
    one_off = st.tuples(near_valid, st.sampled_from(names), plausible | json_values).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    anything = st.one_of(near_valid, one_off, json_values, fields)
    as_json = anything.map(lambda v: json.dumps(v).encode())
    return as_json | st.binary(max_size=64)


@pytest.fixture
async def fuzz_http(keys: Keys, tmp_path: Path, redis_url: str) -> AsyncIterator[Served]:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "tiny.txt").write_text("some text\n" * 10)
    (tmp_path / "outside.txt").write_text("secret\n")
    os.symlink(tmp_path / "outside.txt", root / "escape.txt")
    cfg = Settings(prefix=keys.prefix, data_dir=tmp_path / "data", corpus_root=root)
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    async with client.pipeline(transaction=True) as pipe:
        add_event(pipe, keys, RunQueued(run_id=RUN))
        add_event(pipe, keys, RunCompleted(run_id=RUN))
        add_event(pipe, keys, RunQueued(run_id=QUEUED))
        pipe.hset(keys.tokenizer("tok-ready"), "status", "ready")
        await pipe.execute()
    await client.aclose()
    async with start_app(cfg, redis_url) as served:
        yield served


@pytest.mark.parametrize("route", list(POST_ROUTES))
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_bodies_never_break_a_post_route(
    fuzz_http: Served, route: str, data: st.DataObject
) -> None:
    body = data.draw(bodies(*POST_ROUTES[route]), label="body")
    headers = {"Content-Type": "application/json"}
    async with fuzz_http.session.post(route, data=body, headers=headers) as resp:
        assert resp.status < 500, await resp.text()
        assert resp.content_type == "application/json"
        answer = json.loads(await resp.read())
    event(f"status {resp.status}")
    assert isinstance(answer, dict)
    if resp.status >= 400:
        assert resp.status in (400, 404, 409, 413, 422), answer
        assert isinstance(answer["code"], str) and answer["code"]
        assert isinstance(answer["message"], str) and answer["message"]
        assert answer["request_id"] == resp.headers["X-Request-ID"]
    else:
        assert resp.status == 202, answer
        assert "run_id" in answer
