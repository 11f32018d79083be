"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromedriver,
driven by selenium) against the whole service running in-process: a run submitted through
the form trains while its curves fill in, completes, and generates text from the prompt box;
a second run is cancelled from its page; an API key is asked for and used; recorded runs are
filtered, sorted and ticked in the runs table, and their curves overlaid on one chart.

Where the browser, its driver or selenium is missing (./scripts/ensure-chromium installs
them), the tests are skipped with the reason, except under CI (CI=true), where they fail: a
CI run must not go green without having run them. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

import pytest
from aiohttp import web

from actors import service
from actors.runtime.config import Settings
from actors.runtime.connection import connect
from actors.runtime.outcome import add_event
from actors.runtime.streams import RuntimeConfig
from actors.web.app import bound_url, create_app
from actors.web.dashboard import add_routes
from protocol.events import (
    AnyEvent,
    RunCompleted,
    RunFailed,
    RunQueued,
    StepStarted,
    TrainProgress,
    TrainStarted,
)
from protocol.keys import COMMAND_ACTORS, ActorName, Keys

IN_CI = os.environ.get("CI", "").lower() in {"true", "1"}

try:  # a dev dependency: missing, the tests skip (locally) or fail (under CI)
    from selenium import webdriver
    from selenium.common.exceptions import (
        StaleElementReferenceException,
        TimeoutException,
        WebDriverException,
    )
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys as Key
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    if IN_CI:
        raise
    pytest.skip("selenium is not installed (pip install selenium)", allow_module_level=True)


def unavailable(reason: str) -> NoReturn:
    """Skip locally, with the reason; fail under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: the dashboard's browser tests must run)", pytrace=False)
    pytest.skip(reason)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEY = "e2e-secret-key"
T = TypeVar("T")


@pytest.fixture(scope="module", autouse=True)
def browser() -> tuple[str, str]:
    """Chromium and chromedriver, before any other fixture of this module starts anything."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        unavailable(
            "chromium/chromedriver not found: run ./scripts/ensure-chromium "
            "(apt-get install chromium chromium-driver) to run the dashboard's browser tests"
        )
    return CHROMIUM, CHROMEDRIVER


# ------------------------------------------------------------------------ the service


class Background:
    """The actors (actors.service.serve) and the control app with the dashboard, on their own
    event loop in a thread: the test itself blocks on the browser."""

    def __init__(self, settings: Settings, redis_url: str, names: list[ActorName]) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.names = names
        self.url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="dashboard-e2e", daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the service did not start within 60 s")
        if self._error is not None:
            raise RuntimeError("the service failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = create_app(self.settings, self.redis_url)
        add_routes(app)
        runner = web.AppRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        actors: asyncio.Task[None] | None = None
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.url = bound_url(runner)
            if self.names:
                actors = asyncio.create_task(
                    service.serve(
                        self.settings,
                        self.redis_url,
                        self.names,
                        config=RuntimeConfig(block_ms=100, grace_s=10.0),
                        stop=self._stop,
                        install_signals=False,
                    )
                )
            self._ready.set()
            await self._stop.wait()
            if actors is not None:
                await asyncio.wait_for(actors, 30)
        finally:
            await runner.cleanup()


def write_corpus(root: Path) -> None:
    """~40 KB of simple, repetitive English: enough for a tiny BPE and 30 short steps."""
    rng = random.Random(7)
    subjects = ["the cat", "a dog", "the old king", "my friend", "the river", "a small bird"]
    verbs = ["sees", "likes", "follows", "sings to", "waits for", "dreams of"]
    objects = ["the moon", "a green field", "the quiet town", "the sea", "an open door"]
    lines = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(1400)
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"e2e{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[Settings]:
    data_dir = tmp_path_factory.mktemp("dashboard-e2e")
    write_corpus(data_dir / "corpus")
    yield Settings(
        data_dir=data_dir, corpus_root=data_dir / "corpus", prefix=prefix, consumer="e2e"
    )


@pytest.fixture(scope="module")
def names() -> list[ActorName]:
    return [name for name in COMMAND_ACTORS if name in service.ACTORS]


@pytest.fixture(scope="module")
def server(settings: Settings, redis_url: str, names: list[ActorName]) -> Iterator[Background]:
    with Background(settings, redis_url, names) as bg:
        yield bg


@pytest.fixture(scope="module")
def driver(browser: tuple[str, str]) -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read back
    try:
        chrome = webdriver.Chrome(
            options=options, service=ChromeService(executable_path=chromedriver)
        )
    except WebDriverException as e:
        unavailable(f"chromium could not be started: {e.msg}")
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


# ------------------------------------------------------------------------- helpers


def wait_for(
    browser: webdriver.Chrome, what: str, check: Callable[[], T | None], timeout: float = 30
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` and a screenshot."""

    def probe(_: webdriver.Chrome) -> T | Literal[False]:
        try:
            value = check()
        except StaleElementReferenceException:
            return False
        return False if value is None else value

    try:
        result: T = WebDriverWait(browser, timeout, poll_frequency=0.2).until(probe)
    except TimeoutException:
        shot(browser, f"timeout-{what.replace(' ', '-')[:40]}")
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
    return result


def shot(browser: webdriver.Chrome, name: str) -> Path:
    """A screenshot of the whole page (not only the window), from the top."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    browser.execute_script("window.scrollTo(0, 0)")
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    png = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(png["data"]))
    return path


def by_id(browser: webdriver.Chrome, element_id: str) -> WebElement:
    return browser.find_element(By.ID, element_id)


def fill(browser: webdriver.Chrome, element_id: str, value: str) -> None:
    field = by_id(browser, element_id)
    field.clear()
    field.send_keys(value)


def status_of(browser: webdriver.Chrome) -> str:
    return by_id(browser, "run-status").text


def int_attr(element: WebElement, name: str) -> int:
    return int(element.get_attribute(name) or 0)


def api(
    server: Background, method: str, path: str, body: object = None, key: str = ""
) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("X-Api-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def open_page(browser: webdriver.Chrome, url: str) -> None:
    browser.get(url)
    wait_for(
        browser,
        "the page script",
        lambda: browser.execute_script("return document.readyState") == "complete",
    )


# --------------------------------------------------------------------------- tests


def test_the_form_shows_the_api_s_validation_message(
    driver: webdriver.Chrome, server: Background
) -> None:
    open_page(driver, f"{server.url}/#/new")
    form = by_id(driver, "train-form")
    wait_for(driver, "the form", form.is_displayed)
    fill(driver, "train-corpus_path", "tiny.txt")
    fill(driver, "train-batch_size", "0")
    by_id(driver, "train-submit").click()
    slot = form.find_element(By.CSS_SELECTOR, '[data-error-for="batch_size"]')
    message = wait_for(driver, "the batch_size error", lambda: slot.text)
    status, expected = api(
        server, "POST", "/runs/train", {"corpus_path": "tiny.txt", "batch_size": 0}
    )
    assert status == 422
    assert message == expected["message"]
    assert by_id(driver, "train-form-error").text == expected["message"]
    assert by_id(driver, "train-batch_size").get_attribute("aria-invalid") == "true"

    # A path outside the corpus root is refused the same way, next to its own field.
    fill(driver, "train-batch_size", "8")
    fill(driver, "train-corpus_path", "../../etc/passwd")
    by_id(driver, "train-submit").click()
    path_slot = form.find_element(By.CSS_SELECTOR, '[data-error-for="corpus_path"]')
    wait_for(driver, "the corpus_path error", lambda: "outside the corpus root" in path_slot.text)
    assert slot.text == ""  # the earlier error is gone
    assert driver.current_url.endswith("#/new")  # nothing was submitted
    shot(driver, "new-run-invalid")


def test_a_tokenizer_from_its_form_becomes_ready_with_its_stats(
    driver: webdriver.Chrome, server: Background, names: list[ActorName]
) -> None:
    if "tokenizer" not in names:
        pytest.skip("no tokenizer actor registered")
    open_page(driver, f"{server.url}/#/tokenizers/new")
    wait_for(driver, "the form", by_id(driver, "tokenizer-form").is_displayed)
    fill(driver, "tok-corpus_path", "tiny.txt")
    Select(by_id(driver, "tok-tokenizer_kind")).select_by_value("bpe")
    fill(driver, "tok-vocab_size", "abc")
    by_id(driver, "tokenizer-submit").click()
    slot = by_id(driver, "tokenizer-form").find_element(
        By.CSS_SELECTOR, '[data-error-for="vocab_size"]'
    )
    wait_for(driver, "the vocab_size error", lambda: "Expected `int`" in slot.text)
    fill(driver, "tok-vocab_size", "300")
    by_id(driver, "tokenizer-submit").click()
    wait_for(driver, "the tokenizer page", lambda: "-tok" in driver.current_url)
    tokenizer_id = driver.current_url.split("#/tokenizers/", 1)[1]
    assert by_id(driver, "tokenizer-result-id").text == tokenizer_id
    status = by_id(driver, "tokenizer-result-status")
    wait_for(driver, "the tokenizer to be ready", lambda: status.text == "ready", 90)
    stats = by_id(driver, "tokenizer-result-stats").text
    assert "vocab_size" in stats
    assert "coverage" in stats
    assert by_id(driver, "tokenizer-result-run").text.startswith("tokjob-")
    shot(driver, "tokenizer-ready")
    by_id(driver, "tokenizer-use").click()  # the run form, with this tokenizer chosen
    field = by_id(driver, "train-tokenizer_id")
    wait_for(driver, "the run form", field.is_displayed)
    assert field.get_attribute("value") == tokenizer_id
    assert not by_id(driver, "train-vocab_size").is_displayed()


def test_a_run_from_the_form_trains_live_completes_and_generates(
    driver: webdriver.Chrome, server: Background, names: list[ActorName]
) -> None:
    open_page(driver, f"{server.url}/#/new")
    wait_for(driver, "the form", by_id(driver, "train-form").is_displayed)
    fill(driver, "train-corpus_path", "tiny.txt")
    driver.find_element(By.CSS_SELECTOR, "input[name=tokenizer_source][value=new]").click()
    Select(by_id(driver, "train-tokenizer_kind")).select_by_value("bpe")
    fill(driver, "train-vocab_size", "320")
    Select(by_id(driver, "train-model_family")).select_by_value("gpt2")
    Select(by_id(driver, "train-model_size")).select_by_value("tiny")
    for name, value in {
        "max_seq_len": "32",
        "batch_size": "8",
        "num_epochs": "50",
        "max_steps": "30",
        "eval_every": "10",
        "checkpoint_every": "10",
        "warmup_steps": "5",
        "learning_rate": "0.003",
    }.items():
        fill(driver, f"train-{name}", value)
    driver.find_element(By.CSS_SELECTOR, "#train-advanced summary").click()
    fill(driver, "train-threads", "1")  # the machine is shared: one training thread
    Select(by_id(driver, "train-compile")).select_by_value("off")  # a 30-step run
    by_id(driver, "train-submit").click()
    wait_for(driver, "the run page", lambda: "#/runs/" in driver.current_url)
    run_id = driver.current_url.split("#/runs/", 1)[1]
    wait_for(driver, "the run id", lambda: by_id(driver, "run-id").text == run_id)

    chart = by_id(driver, "loss-chart")
    wait_for(driver, "loss points", lambda: int_attr(chart, "data-train-points") >= 3, 120)
    shot(driver, "run-training")
    if "evaluator" not in names:
        # The chain stops after training until the evaluator exists: check what we can.
        wait_for(
            driver, "training to finish", lambda: _step_state(driver, "trainer") == "done", 120
        )
        assert int_attr(chart, "data-val-points") >= 3
        assert status_of(driver) == "running"
        shot(driver, "run-trained")
        pytest.skip("no evaluator actor registered yet: the run stops after training")

    wait_for(driver, "the run to complete", lambda: status_of(driver) == "completed", 240)
    points = int_attr(chart, "data-train-points")
    val_points = int_attr(chart, "data-val-points")
    assert val_points >= 3  # steps 10, 20, 30
    assert points >= val_points
    assert [_step_state(driver, s) for s in ("ingest", "tokenizer", "trainer")] == ["done"] * 3
    assert by_id(driver, "cancel-button").is_displayed() is False
    stat = driver.find_element(By.CSS_SELECTOR, '[data-testid="tokenizer-stat-vocab_size"] td')
    assert float(stat.text) <= 320
    wait_for(driver, "the training summary", lambda: "30" in by_id(driver, "train-summary").text)
    _check_recipe_and_mfu(driver, server, run_id)
    _check_samples(driver, server, run_id)
    wait_for(driver, "evaluation metrics", lambda: by_id(driver, "eval-metrics").text)
    assert driver.find_elements(By.CSS_SELECTOR, '[data-testid="eval-perplexity"]')
    if "uploader" in names:
        link = wait_for(
            driver, "the artifact link", lambda: driver.find_elements(By.ID, "artifact-download")
        )
        href = link[0].get_attribute("href") or ""
        assert href == f"{server.url}/artifacts/run/{run_id}"
        with urllib.request.urlopen(href, timeout=30) as resp:  # the link downloads the archive
            assert resp.headers["Content-Type"] == "application/gzip"
            assert resp.read(2) == b"\x1f\x8b"

    # Reloading replays the recorded events: the whole curve comes back.
    driver.refresh()
    chart = wait_for(driver, "the chart after reload", lambda: by_id(driver, "loss-chart"))
    wait_for(driver, "the replayed curve", lambda: int_attr(chart, "data-train-points") == points)
    assert int_attr(chart, "data-val-points") == val_points
    wait_for(driver, "the log tail", lambda: "trainer" in by_id(driver, "log-tail").text)

    fill(driver, "prompt-input", "the cat")
    fill(driver, "gen-max_new_tokens", "12")
    by_id(driver, "generate-button").click()
    sample = wait_for(
        driver,
        "a generated sample",
        lambda: driver.find_elements(By.CSS_SELECTOR, '[data-testid="sample"]'),
        120,
    )
    shown_prompt = sample[0].find_element(By.CSS_SELECTOR, ".prompt").text
    assert shown_prompt == "the cat"
    generated = sample[0].text.removeprefix(shown_prompt)
    assert generated.strip(), f"the generate returned no text: {sample[0].text!r}"
    shot(driver, "run-completed")

    open_page(driver, f"{server.url}/#/")
    row = wait_for(
        driver,
        "the run in the list",
        lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-run-id="{run_id}"]'),
    )
    assert row[0].get_attribute("data-status") == "completed"
    assert "gpt2 / tiny" in row[0].text
    shot(driver, "runs")


UNKNOWN = "\N{EN DASH}"  # what the page shows for a value not known (yet)


def _percent(value: object) -> str:
    """How the page shows an MFU (a fraction, or null while unknown)."""
    return f"{100 * value:.1f}%" if isinstance(value, float) else UNKNOWN


def _check_recipe_and_mfu(browser: webdriver.Chrome, server: Background, run_id: str) -> None:
    """The tiles and the summary show the view's recipe and MFU (GET /runs/{id})."""
    status, run = api(server, "GET", f"/runs/{run_id}")
    assert status == 200
    assert run["compile"] is False  # as chosen in the form
    recipe = by_id(browser, "stat-recipe")
    wait_for(browser, "the recipe tile", lambda: recipe.text == f"{run['precision']} · compile off")
    assert recipe.get_attribute("title") == run["recipe"]
    assert by_id(browser, "stat-mfu").text == _percent(run["mfu"])
    completed = run["train_completed"]
    assert isinstance(completed, dict)
    summary = browser.find_element(By.CSS_SELECTOR, '[data-testid="train-summary-mfu"] td')
    assert summary.text == _percent(completed["mfu"])


def _check_samples(browser: webdriver.Chrome, server: Background, run_id: str) -> None:
    """The samples panel shows what the model wrote at its last validation (step 30)."""
    status, run = api(server, "GET", f"/runs/{run_id}")
    assert status == 200 and run["samples_step"] == 30
    samples = run["samples"]
    assert isinstance(samples, list) and len(samples) == 2  # sample_count's default
    shown = wait_for(
        browser,
        "the samples",
        lambda: browser.find_elements(By.CSS_SELECTOR, '[data-testid="train-sample"]'),
    )
    assert by_id(browser, "train-samples-step").text == "(step 30)"
    for element, sample in zip(shown, samples, strict=True):
        assert isinstance(sample, dict)
        assert element.find_element(By.CSS_SELECTOR, ".prompt").text == sample["prompt"]
        assert element.text.split() == (sample["prompt"] + sample["text"]).split()


def _step_state(browser: webdriver.Chrome, step: str) -> str:
    items = browser.find_elements(By.CSS_SELECTOR, f'#chain-steps li[data-step="{step}"]')
    return (items[0].get_attribute("data-state") or "") if items else ""


def test_a_running_run_is_cancelled_from_its_page(
    driver: webdriver.Chrome, server: Background, names: list[ActorName]
) -> None:
    if "trainer" not in names:
        pytest.skip("no trainer actor registered")
    body = {
        "corpus_path": "tiny.txt",
        "vocab_size": 300,
        "max_seq_len": 32,
        "batch_size": 8,
        "num_epochs": 1000,
        "max_steps": 100_000,
        "eval_every": 50,
        "checkpoint_every": 1000,
        "threads": 1,
        # A long run would first probe its recipe (bf16? compile?), a minute of compiling on
        # this CPU; cancelling needs none of it.
        "precision": "fp32",
        "compile": "off",
    }
    status, created = api(server, "POST", "/runs/train", body)
    assert status == 202
    run_id = str(created["run_id"])
    open_page(driver, f"{server.url}/#/runs/{run_id}")
    chart = by_id(driver, "loss-chart")
    wait_for(driver, "training to start", lambda: int_attr(chart, "data-train-points") >= 1, 120)
    cancel = by_id(driver, "cancel-button")
    assert cancel.is_displayed()
    cancel.click()
    wait_for(driver, "the run to be cancelled", lambda: status_of(driver) == "cancelled", 60)
    assert _step_state(driver, "trainer") == "cancelled"
    assert _step_state(driver, "evaluator") == "skipped"
    assert not cancel.is_displayed()
    state = api(server, "GET", f"/runs/{run_id}")[1]
    assert state["status"] == "cancelled"
    shot(driver, "run-cancelled")


def test_an_api_key_is_asked_for_and_used(
    driver: webdriver.Chrome, settings: Settings, redis_url: str
) -> None:
    """A second control endpoint with a key and a prefix of its own (no actors: its runs stay
    queued): the page asks for the key, keeps it for the tab, and its live views (SSE, with
    ?api_key=) work with it."""
    keyed = Settings(
        data_dir=settings.data_dir,
        corpus_root=settings.corpus_root,
        prefix=f"{settings.prefix}k",
        api_key=KEY,
    )
    with Background(keyed, redis_url, []) as guarded:
        status, created = api(guarded, "POST", "/runs/train", {"corpus_path": "tiny.txt"}, KEY)
        assert status == 202  # queued: no actors behind this endpoint
        run_id = str(created["run_id"])
        open_page(driver, f"{guarded.url}/#/")
        driver.execute_script("sessionStorage.clear()")
        driver.refresh()
        dialog = by_id(driver, "api-key-dialog")
        wait_for(driver, "the key prompt", dialog.is_displayed)
        fill(driver, "api-key-input", "wrong")
        by_id(driver, "api-key-save").click()
        reason = by_id(driver, "api-key-reason")
        wait_for(driver, "the key to be refused", lambda: "refused" in reason.text)
        assert dialog.is_displayed()
        fill(driver, "api-key-input", KEY)
        by_id(driver, "api-key-save").click()
        wait_for(
            driver,
            "the runs list",
            lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-run-id="{run_id}"]'),
        )
        assert not dialog.is_displayed()
        assert driver.execute_script("return sessionStorage.getItem('mt-api-key')") == KEY

        # The run page: state by fetch with the header, the chain by SSE with ?api_key=.
        open_page(driver, f"{guarded.url}/#/runs/{run_id}")
        wait_for(
            driver,
            "the chain from the events stream",
            lambda: _step_state(driver, "uploader") == "pending",
        )
        assert _step_state(driver, "ingest") == "pending"
        assert status_of(driver) == "queued"
        assert not dialog.is_displayed()
        by_id(driver, "cancel-button").click()
        wait_for(
            driver,
            "the cancel request",
            lambda: "cancel requested" in by_id(driver, "run-message").text,
        )
        driver.execute_script("sessionStorage.clear()")


# ------------------------------------------------------------------ comparing recorded runs


def recorded_run(
    run_id: str, model: str, losses: list[float], val_every: int, *, failed: bool = False
) -> list[AnyEvent]:
    """The events a finished run leaves (what the actors would emit), its curve given."""
    family, size = model.split("/")
    events: list[AnyEvent] = [
        RunQueued(run_id=run_id, steps=["trainer"], model_family=family, model_size=size),
        StepStarted(run_id=run_id, step="trainer", command_id=f"{run_id}.trainer"),
    ]
    if failed:
        return [*events, RunFailed(run_id=run_id, step="trainer", error_kind="user", message="no")]
    events.append(TrainStarted(run_id=run_id, model_family=family, model_size=size, total_epochs=1))
    for step, loss in enumerate(losses, start=1):
        val = loss + 0.25 if step % val_every == 0 else None
        events.append(
            TrainProgress(
                run_id=run_id,
                step=step,
                epoch=1,
                total_epochs=1,
                total_steps=len(losses),
                loss=loss,
                lr=1e-3,
                tokens_per_s=1000.0 + step,
                val_loss=val,
            )
        )
    return [*events, RunCompleted(run_id=run_id)]


async def record(redis_url: str, keys: Keys, runs: list[list[AnyEvent]]) -> None:
    redis = connect(redis_url)
    try:
        for i, events in enumerate(runs):
            async with redis.pipeline(transaction=True) as pipe:
                for event in events:
                    add_event(pipe, keys, event)
                pipe.zadd(keys.runs, {events[0].run_id: time.time() + i})  # listed newest first
                await pipe.execute()
    finally:
        await redis.aclose()


def console_errors(browser: webdriver.Chrome) -> list[str]:
    """The page's errors (exceptions, console.error, failed loads) since the last call."""
    # selenium leaves get_log untyped
    entries: list[dict[str, object]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    errors = [str(e["message"]) for e in entries if e["level"] == "SEVERE"]
    # The one answer the page asks for knowing it may be 404: a run's evaluation, not yet made
    # (it shows "No evaluation yet"); the browser logs the status all the same.
    return [m for m in errors if not re.search(r"/runs/[^/ ]+/eval - .* status of 404", m)]


def listed(browser: webdriver.Chrome) -> list[str]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs-body tr[data-run-id]")
    return [row.get_attribute("data-run-id") or "" for row in rows]


def sort_by(browser: webdriver.Chrome, column: str) -> None:
    browser.find_element(By.CSS_SELECTOR, f'th[data-sort="{column}"] button').click()


def test_runs_are_filtered_sorted_and_compared_on_one_chart(
    driver: webdriver.Chrome, settings: Settings, redis_url: str, keys: Keys
) -> None:
    """Three recorded runs (two trained, one failed) behind a control endpoint of their own:
    the table filters and sorts them, and ticking the two trained ones overlays their train
    and validation curves on the compare chart, each series named after its run."""
    a, b, c = (f"cmp-{x}-{keys.prefix}" for x in "abc")
    runs = [
        recorded_run(a, "gpt2/tiny", [4.0 - 0.1 * i for i in range(20)], 5),  # ends at 2.1
        recorded_run(b, "llama/tiny", [3.5 - 0.15 * i for i in range(12)], 6),  # ends at 1.85
        recorded_run(c, "qwen/tiny", [], 1, failed=True),
    ]
    asyncio.run(record(redis_url, keys, runs))
    own = Settings(data_dir=settings.data_dir, corpus_root=settings.corpus_root, prefix=keys.prefix)
    with Background(own, redis_url, []) as bg:
        open_page(driver, f"{bg.url}/#/")
        console_errors(driver)  # from here on, the console must stay clean
        wait_for(driver, "the three runs", lambda: listed(driver) == [c, b, a] or None)

        search = by_id(driver, "runs-filter")
        search.send_keys("llama")
        wait_for(driver, "the filter by model", lambda: listed(driver) == [b] or None)
        search.send_keys(Key.CONTROL, "a")
        search.send_keys("FAILED")  # the status, whatever the case
        wait_for(driver, "the filter by status", lambda: listed(driver) == [c] or None)
        search.send_keys(Key.CONTROL, "a")
        search.send_keys(f"cmp-a-{keys.prefix[:4]}")  # part of an id
        wait_for(driver, "the filter by id", lambda: listed(driver) == [a] or None)
        search.send_keys(Key.CONTROL, "a")
        search.send_keys("nothing-like-this")
        wait_for(driver, "no match", lambda: by_id(driver, "runs-none-match").is_displayed())
        search.send_keys(Key.CONTROL, "a", Key.BACKSPACE)
        wait_for(driver, "the filter cleared", lambda: listed(driver) == [c, b, a] or None)

        sort_by(driver, "loss")  # ascending; the failed run has no loss: last either way
        wait_for(driver, "loss ascending", lambda: listed(driver) == [b, a, c] or None)
        sort_by(driver, "loss")
        wait_for(driver, "loss descending", lambda: listed(driver) == [a, b, c] or None)
        header = driver.find_element(By.CSS_SELECTOR, 'th[data-sort="loss"]')
        assert header.get_attribute("aria-sort") == "descending"
        sort_by(driver, "run_id")
        wait_for(driver, "ids ascending", lambda: listed(driver) == [a, b, c] or None)
        assert header.get_attribute("aria-sort") is None

        chart = by_id(driver, "compare-chart")
        assert not chart.is_displayed()  # nothing ticked yet
        for run_id in (a, b):
            pick = f'tr[data-run-id="{run_id}"] input[data-testid="run-pick"]'
            driver.find_element(By.CSS_SELECTOR, pick).click()
        expected = {f"{a} train": 20, f"{a} val": 4, f"{b} train": 12, f"{b} val": 2}
        wait_for(
            driver,
            "both runs on the compare chart",
            lambda: json.loads(chart.get_attribute("data-points") or "{}") == expected or None,
        )
        legend = chart.find_elements(By.CSS_SELECTOR, ".u-legend .u-series .u-label")
        assert [item.text for item in legend] == ["step", *expected]
        assert chart.find_elements(By.CSS_SELECTOR, "canvas")
        assert driver.current_url.endswith("#/")  # a tick is not a click on the row
        shot(driver, "runs-compared")

        driver.find_element(
            By.CSS_SELECTOR, f'tr[data-run-id="{b}"] [data-testid="run-pick"]'
        ).click()
        only_a = {f"{a} train": 20, f"{a} val": 4}
        wait_for(
            driver,
            "the unticked run to leave the chart",
            lambda: json.loads(chart.get_attribute("data-points") or "{}") == only_a or None,
        )

        # The run's own page draws its curves with the same library.
        open_page(driver, f"{bg.url}/#/runs/{a}")
        loss = by_id(driver, "loss-chart")
        wait_for(driver, "the run's curves", lambda: int_attr(loss, "data-train-points") == 20)
        assert int_attr(loss, "data-val-points") == 4
        labels = loss.find_elements(By.CSS_SELECTOR, ".u-legend .u-series .u-label")
        assert [item.text for item in labels] == ["step", "train", "validation"]
        assert int_attr(by_id(driver, "lr-chart"), "data-lr-points") == 20
        assert int_attr(by_id(driver, "tps-chart"), "data-tps-points") == 20
        shot(driver, "run-recorded")
        assert console_errors(driver) == []


def test_at_most_eight_runs_are_compared_at_once(
    driver: webdriver.Chrome, settings: Settings, redis_url: str, keys: Keys
) -> None:
    """Each compared run is one full curves read: the ninth tick is refused until one goes."""
    ids = [f"many-{i}-{keys.prefix}" for i in range(9)]
    runs = [recorded_run(run_id, "gpt2/tiny", [3.0, 2.0], 2) for run_id in ids]
    asyncio.run(record(redis_url, keys, runs))
    own = Settings(data_dir=settings.data_dir, corpus_root=settings.corpus_root, prefix=keys.prefix)
    with Background(own, redis_url, []) as bg:
        open_page(driver, f"{bg.url}/#/")
        wait_for(driver, "the nine runs", lambda: len(listed(driver)) == 9 or None)
        for i in range(8):  # the rows are redrawn on each tick: found again each time
            driver.find_elements(By.CSS_SELECTOR, '[data-testid="run-pick"]')[i].click()
        chart = by_id(driver, "compare-chart")
        wait_for(
            driver,
            "eight runs on the chart",
            lambda: len(json.loads(chart.get_attribute("data-points") or "{}")) == 16 or None,
        )
        picks = driver.find_elements(By.CSS_SELECTOR, '[data-testid="run-pick"]')
        assert [p.is_enabled() for p in picks] == [True] * 8 + [False]
        assert "at most 8" in by_id(driver, "compare-hint").text
        picks[0].click()  # one less: the last can be ticked again
        wait_for(
            driver,
            "the ninth tick allowed",
            lambda: (
                driver.find_elements(By.CSS_SELECTOR, '[data-testid="run-pick"]')[8].is_enabled()
                or None
            ),
        )
