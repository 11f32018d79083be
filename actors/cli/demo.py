"""`model-trainer demo`: the main job end to end on the embedded service.

Starts the embedded Redis, every actor and the control endpoint in this process tree,
submits a run on the `shakespeare` corpus (byte-level BPE + GPT-2 tiny), shows it live,
and ends with a summary: tokenizer stats, perplexity against the first evaluation, three
generated samples, where the artifacts are and how to load the model with transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator

import msgspec

from actors.cli.service_ctx import with_service
from actors.client.client import Samples, ServiceClient
from actors.client.submit import new_id
from actors.client.watch import renderer_for, watch
from actors.runtime.config import Settings
from protocol.commands import ModelGenerate
from protocol.events import TokenizerReady, TrainProgress
from protocol.keys import Keys
from protocol.requests import CorpusSource, TrainRequest
from protocol.settings import TokenizerSettings, TrainSettings

PROMPTS = ("ROMEO:\n", "To be, or not to be", "KING HENRY:\nMy lords,")


def demo_request(quick: bool) -> TrainRequest:
    """Sized for a few minutes on 2 CPU cores (quick: about a minute, for CI)."""
    return TrainRequest(
        source=CorpusSource(corpus_name="shakespeare"),
        tokenizer=TokenizerSettings(tokenizer_kind="bpe", vocab_size=1024 if quick else 2048),
        train=TrainSettings(
            model_family="gpt2",
            model_size="tiny",
            max_seq_len=64 if quick else 128,
            batch_size=8 if quick else 16,
            max_steps=60 if quick else 500,
            eval_every=20 if quick else 50,
            checkpoint_every=30 if quick else 100,
            learning_rate=1e-3,
            warmup_steps=10 if quick else 30,
        ),
    )


@contextlib.asynccontextmanager
async def control_endpoint(settings: Settings, url: str) -> AsyncIterator[str]:
    """The HTTP endpoint (and dashboard) for the demo's duration; yields its URL ("" if it
    could not start: the demo goes on without it)."""
    from actors.web.app import serve

    address: list[str] = []
    started = asyncio.Event()

    async def ready(bound: str) -> None:
        address.append(bound)
        started.set()

    async def run() -> None:
        try:
            await serve(settings, url, settings.http_host, settings.http_port, on_ready=ready)
        except OSError:  # the port is taken: any free one will do
            await serve(settings, url, settings.http_host, 0, on_ready=ready)

    task = asyncio.create_task(run())
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    try:
        yield address[0] if address else ""
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task


async def generate(client: ServiceClient, run_id: str, timeout_s: float = 120) -> list[str]:
    request_id = new_id("req")
    samples: list[str] = []
    for i, prompt in enumerate(PROMPTS):
        cmd = ModelGenerate(
            command_id=f"{request_id}-{i}",
            run_id=run_id,
            request_id=f"{request_id}-{i}",
            prompt=prompt,
            max_new_tokens=48,
            temperature=0.8,
            top_k=40,
            seed=7 + i,
            num_return_sequences=1,
            stop_on_eos=False,
        )
        await client.queue(cmd)
        try:
            answer = await client.wait_result(cmd.request_id, timeout_s)
        except TimeoutError:
            raise TimeoutError("no answer from the evaluator") from None
        if not answer.ok:
            raise RuntimeError(f"generation failed: {answer.message}")
        texts = msgspec.convert(answer.result, Samples).samples
        samples.append(prompt + (texts[0] if texts else ""))
    return samples


def _fmt(x: object) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


class _TestMetrics(msgspec.Struct):
    """What the summary shows of the evaluation's metrics.json."""

    perplexity: float | None = None
    bits_per_char: float | None = None


async def summary(settings: Settings, client: ServiceClient, run_id: str) -> None:
    entries, _ = await client.history(run_id)
    events = [e.event for e in entries if e.event is not None]
    tok = next((e for e in events if isinstance(e, TokenizerReady)), None)
    val = [e for e in events if isinstance(e, TrainProgress) and e.val_ppl is not None]
    run_dir = settings.run_dir(run_id)
    metrics_file = run_dir / "eval" / "metrics.json"
    metrics: _TestMetrics | None = None
    if metrics_file.is_file():  # json parses: the file may hold NaN, which JSON proper cannot
        metrics = msgspec.convert(json.loads(metrics_file.read_text()), _TestMetrics)
    out = sys.stdout
    print("\n== summary", file=out)
    if tok is not None:
        st = tok.stats
        print(
            f"tokenizer   {tok.tokenizer_kind}, vocab {int(st.get('vocab_size', 0))}, "
            f"{st.get('tokens_per_char', 0):.3f} tokens/char, "
            f"{st.get('tokens_per_word', 0):.2f} tokens/word, "
            f"coverage {st.get('coverage', 0):.4f}",
            file=out,
        )
    if val:
        first, last = val[0], val[-1]
        print(
            f"validation  perplexity {_fmt(first.val_ppl)} at step {first.step} "
            f"→ {_fmt(last.val_ppl)} at step {last.step}",
            file=out,
        )
    if metrics is not None:
        print(
            f"test        perplexity {_fmt(metrics.perplexity)}, "
            f"{_fmt(metrics.bits_per_char)} bits/char",
            file=out,
        )
    print("samples", file=out)
    for text in await generate(client, run_id):
        print("  " + text.replace("\n", "\n  "), file=out)
    pointer = (await client.run_state(run_id)).artifact
    print(f"run dir     {run_dir}", file=out)
    if pointer:
        print(f"artifact    {pointer}", file=out)
    where = repr(str(run_dir))
    print(
        "load it     from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"            model = AutoModelForCausalLM.from_pretrained({where})\n"
        f"            tokenizer = AutoTokenizer.from_pretrained({where})",
        file=out,
    )


async def run_demo(settings: Settings, quick: bool) -> int:
    req = demo_request(quick)
    async with with_service(settings) as url, control_endpoint(settings, url) as http:
        client = ServiceClient.connect(url, Keys(settings.prefix))
        try:
            info = await client.train(req)
            print(f"redis       {url}")
            print(
                f"logs        {settings.data_dir / 'logs' / 'model-trainer.log'} "
                f"(and {settings.run_dir(info.run_id) / 'logs.jsonl'})"
            )
            if http:
                print(f"dashboard   {http}/#/runs/{info.run_id}")
            train = req.train
            print(
                f"run         {info.run_id}: shakespeare → bpe {req.tokenizer.vocab_size} → "
                f"gpt2 tiny, {train.max_steps} steps of {train.batch_size}x{train.max_seq_len} "
                "tokens",
                flush=True,
            )
            renderer = renderer_for()
            try:
                state = await watch(client, info.run_id, renderer)
            finally:
                renderer.close()
            if state.status != "completed":
                print(f"\nthe run ended {state.status}: {state.message}", file=sys.stderr)
                return 1
            await summary(settings, client, info.run_id)
            return 0
        finally:
            await client.aclose()
