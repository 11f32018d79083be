"""The dashboard over plain HTTP: the page and its static files are served (without an API key),
and the JSON, SSE and forms the page relies on have the fields its JavaScript reads."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import aiohttp
import msgspec
import pytest
from aiohttp import web

from actors.runtime.config import Settings
from actors.web.app import bound_url, create_app
from actors.web.curves import Curves
from actors.web.dashboard import STATIC_DIR, STATIC_FILES, add_routes
from protocol.events import AnyEvent, Sample
from protocol.keys import Keys
from protocol.requests import HTTP_NAMES, GenerateRequest, TokenizerTrainRequest, TrainRequest
from protocol.state import RunState, StepView
from tests.http_helpers import read_sse
from trainer.corpus import NAMED_CORPORA

KEY = "dashboard-test-key"
APP_JS = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
INDEX = (STATIC_DIR / "index.html").read_text(encoding="utf-8")


@contextlib.asynccontextmanager
async def served(settings: Settings, redis_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    app = create_app(settings, redis_url)
    add_routes(app)  # idempotent: also fine once create_app registers the dashboard itself
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession(base_url=bound_url(runner)) as session:
            yield session
    finally:
        await runner.cleanup()


def settings_for(data_dir: Path, keys: Keys, api_key: str | None = None) -> Settings:
    corpus = data_dir / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "tiny.txt").write_text("the cat sat on the mat.\n" * 50, encoding="utf-8")
    return Settings(data_dir=data_dir, corpus_root=corpus, prefix=keys.prefix, api_key=api_key)


@pytest.fixture
async def client(
    redis_url: str, keys: Keys, data_dir: Path
) -> AsyncIterator[aiohttp.ClientSession]:
    async with served(settings_for(data_dir, keys), redis_url) as session:
        yield session


@pytest.fixture
async def keyed(redis_url: str, keys: Keys, data_dir: Path) -> AsyncIterator[aiohttp.ClientSession]:
    async with served(settings_for(data_dir, keys, KEY), redis_url) as session:
        yield session


# ----------------------------------------------------------------------- serving the files


async def test_the_page_is_served_at_the_root(client: aiohttp.ClientSession) -> None:
    async with client.get("/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.charset == "utf-8"
        body = await resp.text()
    assert '<script src="/static/app.js" defer></script>' in body
    assert '<link rel="stylesheet" href="/static/app.css">' in body


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("index.html", "text/html"),
        ("uPlot.iife.min.js", "text/javascript"),
        ("uPlot.min.css", "text/css"),
        ("uPlot.LICENSE.txt", "text/plain"),
    ],
)
async def test_static_files_have_their_content_types(
    client: aiohttp.ClientSession, name: str, content_type: str
) -> None:
    async with client.get(f"/static/{name}") as resp:
        assert resp.status == 200
        assert resp.content_type == content_type
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert await resp.read() == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fdashboard.py", "/static/"])
async def test_other_static_paths_are_not_found(client: aiohttp.ClientSession, path: str) -> None:
    async with client.get(path) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["code"] == "NOT_FOUND"


def test_only_the_listed_files_exist_and_nothing_is_fetched_from_elsewhere() -> None:
    assert sorted(p.name for p in STATIC_DIR.iterdir()) == sorted(STATIC_FILES)
    for name in STATIC_FILES:
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        # No CDN, font or script from another host; the SVG namespace is only a name.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), name
        assert not re.search(
            r"""(fetch|EventSource|url|@import)\s*\(\s*["']?(https?:)?//""", text
        ), name


def test_the_vendored_chart_library_is_the_version_readme_names() -> None:
    """uPlot ships as its npm package's files, unchanged: the script's banner names the
    version, README says which one is vendored, and its MIT licence comes along."""
    banner = (STATIC_DIR / "uPlot.iife.min.js").read_text(encoding="utf-8").splitlines()[0]
    m = re.fullmatch(r"/\*! https://github\.com/leeoniya/uPlot \(v(\d+\.\d+\.\d+)\) \*/", banner)
    assert m is not None, banner
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"uPlot {m[1]}" in readme
    assert "The MIT License" in (STATIC_DIR / "uPlot.LICENSE.txt").read_text(encoding="utf-8")
    assert '<script src="/static/uPlot.iife.min.js" defer></script>' in INDEX
    assert '<link rel="stylesheet" href="/static/uPlot.min.css">' in INDEX


def test_add_routes_is_idempotent() -> None:
    app = web.Application()
    add_routes(app)
    add_routes(app)
    paths = [r.resource.canonical for r in app.router.routes() if r.resource is not None]
    assert paths.count("/") == 2  # GET and its implicit HEAD
    assert paths.count("/static/{name}") == 2


async def test_the_dashboard_needs_no_key_but_the_api_does(keyed: aiohttp.ClientSession) -> None:
    for path in ("/", "/static/app.js", "/static/app.css", "/static/uPlot.iife.min.js"):
        async with keyed.get(path) as resp:
            assert resp.status == 200, path
    async with keyed.get("/runs") as resp:  # the 401 that opens the page's key prompt
        assert resp.status == 401
        assert (await resp.json())["code"] == "UNAUTHORIZED"
    async with keyed.get("/runs", headers={"X-Api-Key": KEY}) as resp:
        assert resp.status == 200


async def test_sse_routes_accept_the_key_as_a_query_parameter(
    keyed: aiohttp.ClientSession,
) -> None:
    """EventSource cannot send headers: the page passes the key as ?api_key=."""
    body = {"corpus_path": "tiny.txt", "max_steps": 5}
    async with keyed.post("/runs/train", json=body, headers={"X-Api-Key": KEY}) as resp:
        assert resp.status == 202
        run_id = (await resp.json())["run_id"]
    async with keyed.get(f"/runs/{run_id}/events?follow=false&api_key={KEY}") as resp:
        assert resp.status == 200
        assert [m["event"] for m in await read_sse(resp)] == ["run.queued"]
    async with keyed.get(f"/runs/{run_id}/logs/stream?follow=false&api_key={KEY}") as resp:
        assert resp.status == 200
    async with keyed.get(f"/runs/{run_id}/events?follow=false&api_key=wrong") as resp:
        assert resp.status == 401


# ------------------------------------------------------------- the JSON the page reads


# What app.js reads of each object (checked against the real types, so a rename breaks this).
RUN_FIELDS = (
    "run_id",
    "status",
    "step",
    "steps",
    "chain",
    "model_family",
    "model_size",
    "corpus",
    "tokenizer_id",
    "epoch",
    "total_epochs",
    "train_step",
    "total_steps",
    "loss",
    "val_loss",
    "lr",
    "tokens_per_s",
    "mfu",
    "samples",
    "samples_step",
    "parameters",
    "device",
    "precision",
    "compile",
    "recipe",
    "flops_per_token",
    "peak_flops",
    "message",
    "cancel_requested",
    "attempt",
    "created_at",
    "started_at",
    "ended_at",
    "artifact",
    "corpus_ready",
    "tokenizer_ready",
    "train_completed",
)
STEP_FIELDS = ("state", "attempt", "duration_s", "error")
CURVES_FIELDS = ("train_loss", "val_loss", "lr", "tokens_per_s", "last")
# The events the view keeps whole (corpus_ready, tokenizer_ready, train_completed).
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "corpus.ready": ("corpus_id", "chars", "lines"),
    "tokenizer.ready": ("tokenizer_id", "tokenizer_kind", "stats"),
    "train.completed": (
        "status",
        "steps",
        "tokens",
        "train_loss",
        "val_loss",
        "test_loss",
        "test_ppl",
        "best_step",
        "early_stopped",
        "tokens_per_s",
        "mfu",
    ),
}


def _event_types() -> dict[str, type[msgspec.Struct]]:
    return {str(t.__struct_config__.tag): t for t in get_args(AnyEvent)}


def test_the_page_listens_to_every_event_kind() -> None:
    m = re.search(r"const EVENT_KINDS = \[(.*?)\];", APP_JS, re.S)
    assert m is not None
    listened = set(re.findall(r'"([a-z_.]+)"', m[1]))
    assert listened == set(_event_types())


def test_the_event_fields_the_page_reads_exist() -> None:
    types = _event_types()
    for kind, names in EVENT_FIELDS.items():
        fields = {f.name for f in msgspec.structs.fields(types[kind])}
        assert set(names) <= fields, kind
    assert set(RUN_FIELDS) <= {f.name for f in msgspec.structs.fields(RunState)}
    assert set(STEP_FIELDS) <= {f.name for f in msgspec.structs.fields(StepView)}
    assert set(CURVES_FIELDS) <= {f.name for f in msgspec.structs.fields(Curves)}
    assert {"prompt", "text"} <= {f.name for f in msgspec.structs.fields(Sample)}


def test_the_page_reduces_no_events() -> None:
    """The server reduces the events (the view, the curves); the page only re-fetches."""
    assert "/curves" in APP_JS
    assert "JSON.parse(msg.data)" not in APP_JS
    assert not re.search(r"case \"(run|train|step)\.", APP_JS)


async def test_runs_and_run_and_events_have_what_the_page_reads(
    client: aiohttp.ClientSession,
) -> None:
    body = {"corpus_path": "tiny.txt", "model_family": "gpt2", "max_steps": 5}
    async with client.post("/runs/train", json=body) as resp:
        assert resp.status == 202
        created = await resp.json()
    run_id = created["run_id"]
    assert created["tokenizer_id"]
    async with client.get("/runs?limit=50") as resp:
        listed = (await resp.json())["runs"]
    row = next(r for r in listed if r["run_id"] == run_id)
    assert set(RUN_FIELDS) <= set(row)
    assert (row["status"], row["model_family"], row["model_size"]) == ("queued", "gpt2", "tiny")
    assert row["corpus"] == "tiny.txt"
    async with client.get(f"/runs/{run_id}") as resp:
        run = await resp.json()
    assert set(RUN_FIELDS) <= set(run)
    assert run["steps"] == ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]
    async with client.get(f"/runs/{run_id}/curves") as resp:
        assert set(CURVES_FIELDS) <= set(await resp.json())
    async with client.get(f"/runs/{run_id}/events?follow=false") as resp:
        assert resp.content_type == "text/event-stream"
        messages = await read_sse(resp)
    assert [m["event"] for m in messages] == ["run.queued"]
    queued = msgspec.json.decode(messages[0]["data"])
    assert queued["steps"] == ["ingest", "tokenizer", "trainer", "evaluator", "uploader"]
    async with client.get(f"/runs/{run_id}/eval") as resp:
        assert resp.status == 404  # the page shows "No evaluation yet"
    async with client.post(f"/runs/{run_id}/cancel") as resp:
        assert resp.status == 202
    async with client.get(f"/runs/{run_id}/events?follow=false") as resp:
        kinds = [m["event"] for m in await read_sse(resp)]
    assert kinds == ["run.queued", "run.cancel_requested"]


async def test_a_rejected_field_is_named_for_the_form(client: aiohttp.ClientSession) -> None:
    """The page puts `message` next to the input whose name is `field`."""
    cases = [
        ({"corpus_path": "tiny.txt", "batch_size": 0}, "batch_size"),
        ({"corpus_path": "tiny.txt", "learning_rate": "fast"}, "learning_rate"),
        ({"corpus_path": "nope.txt"}, "corpus_path"),
        ({"corpus_path": "tiny.txt", "tokenizer_id": "no-such-tok"}, "tokenizer_id"),
    ]
    for body, field in cases:
        async with client.post("/runs/train", json=body) as resp:
            assert resp.status == 422, body
            error = await resp.json()
        assert error["field"] == field
        assert error["message"]
        assert f'data-error-for="{field}"' in INDEX


async def test_the_schema_gives_the_form_its_defaults(client: aiohttp.ClientSession) -> None:
    async with client.get("/openapi.json") as resp:
        schemas = (await resp.json())["components"]["schemas"]
    train = schemas["TrainRequest"]["properties"]
    assert train["batch_size"]["default"] == 8
    assert train["batch_size"]["minimum"] == 1
    assert "properties" in schemas["TokenizerTrainRequest"]


# ------------------------------------------------------------------ the forms themselves


class _Inputs(HTMLParser):
    """name → (data-type, select options) of the inputs of each form, by form id."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, tuple[str, list[str]]]] = {}
        self._form = ""
        self._select = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self._form = a.get("id") or ""
            self.forms[self._form] = {}
        elif tag in ("input", "select", "textarea") and a.get("name") and "data-type" in a:
            name = a["name"] or ""
            self.forms[self._form][name] = (a["data-type"] or "", [])
            self._select = name if tag == "select" else ""
        elif tag == "option" and self._select:
            self.forms[self._form][self._select][1].append(a.get("value") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = ""
        elif tag == "form":
            self._form = ""


def _parse_forms() -> dict[str, dict[str, tuple[str, list[str]]]]:
    parser = _Inputs()
    parser.feed(INDEX)
    return parser.forms


def _unwrap(typ: object) -> list[object]:
    """The types behind Annotated[...] and X | None."""
    origin = get_origin(typ)
    if origin is Annotated:
        return _unwrap(get_args(typ)[0])
    if origin in (Union, UnionType):
        return [t for a in get_args(typ) if a is not type(None) for t in _unwrap(a)]
    return [typ]


def _flat_types(request_type: type[msgspec.Struct]) -> dict[str, object]:
    """The body's fields and their types; a grouped request's groups side by side, as sent."""
    out: dict[str, object] = {}
    for f in msgspec.structs.fields(request_type):
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            for g in msgspec.structs.fields(f.type):
                out.setdefault(HTTP_NAMES.get(g.name, g.name), g.type)
        else:
            out[f.name] = f.type
    return out


@pytest.mark.parametrize(
    ("form_id", "request_type"),
    [
        ("train-form", TrainRequest),
        ("tokenizer-form", TokenizerTrainRequest),
        ("generate-form", GenerateRequest),
    ],
)
def test_form_inputs_match_the_request_fields(
    form_id: str, request_type: type[msgspec.Struct]
) -> None:
    """Each input is named after a field of the request, with its type; a select offers
    exactly the values of the field's Literal."""
    inputs = _parse_forms()[form_id]
    fields = _flat_types(request_type)
    assert inputs, form_id
    for name, (data_type, options) in inputs.items():
        assert name in fields, f"{form_id}: {name} is not a field of {request_type.__name__}"
        types = _unwrap(fields[name])
        literals = [v for t in types if get_origin(t) is Literal for v in get_args(t)]
        if name == "corpus_name":  # a str checked against the registry of named corpora
            literals = list(NAMED_CORPORA)
        if options:
            assert sorted(options) == sorted(map(str, literals)), f"{form_id}: {name}"
            assert data_type == "str"
        else:
            expected = {"int": int, "float": float, "str": str, "bool": bool}[data_type]
            assert expected in types, f"{form_id}: {name} is {fields[name]!r}, not {data_type}"


def test_the_train_form_covers_the_main_settings() -> None:
    inputs = _parse_forms()["train-form"]
    main = (
        "corpus_path",
        "corpus_name",
        "corpus_file_id",
        "tokenizer_id",
        "tokenizer_kind",
        "vocab_size",
        "model_family",
        "model_size",
        "max_seq_len",
        "num_epochs",
        "max_steps",
        "batch_size",
        "learning_rate",
        "eval_every",
        "checkpoint_every",
    )
    assert set(main) <= set(inputs)


# ------------------------------------------------------------- the browser tests' gate
@pytest.mark.parametrize("ci", ["true", ""], ids=["under-ci-they-fail", "locally-they-skip"])
def test_the_browser_tests_without_a_browser_fail_under_ci_and_skip_locally(
    ci: str, redis_url: str, tmp_path: Path
) -> None:
    """tests/test_dashboard_e2e.py run where chromium and chromedriver are not on the PATH."""
    env = {**os.environ, "PATH": str(tmp_path), "REDIS_URL": redis_url, "CI": ci}
    args = ["-q", "-rsE", "-p", "no:cacheprovider", "tests/test_dashboard_e2e.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "chromium/chromedriver not found" in out, out[-3000:]
    summary = out.strip().splitlines()[-1]
    if ci:
        assert proc.returncode == 1, out[-3000:]
        assert "CI is set" in out and "error" in summary and "skipped" not in summary, summary
    else:
        assert proc.returncode == 0, out[-3000:]
        assert "skipped" in summary and "error" not in summary and "failed" not in summary, summary
