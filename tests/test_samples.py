"""Samples while training: fixed prompts, seeded, drawn without touching the global RNG or
the model's mode; and a validation's samples reach the run's view, `watch` and the Discord
progress message. (That a run logs them at each validation, the same twice, and that exact
resume holds with them on: tests/test_tracking.py and tests/test_resume.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.client.watch import RunView as WatchView
from actors.runtime.config import Settings
from actors.workers.bot_events import SAMPLE_CHARS, JobProgress, NotifierConfig, Translator
from actors.workers.discord import embed
from protocol.events import Sample, TrainProgress, TrainStarted
from protocol.settings import ModelFamily
from protocol.state import RunState, apply
from tests.helpers_ml import TINY_DIMS, char_tokenizer, small_corpus, tiny_config, write_corpus
from trainer.evaluate import SAMPLE_PROMPTS
from trainer.model import ModelConfig, build_model
from trainer.samples import Sampler, prompts_of
from trainer.tokenizer import load_tokenizer

SAMPLES = [Sample(prompt="The river", text=' ran "past"\nthe mill'), Sample(prompt="In", text="")]


def test_prompts_are_the_first_words_of_the_validation_lines(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "a", ["x"], ["", "  The river ran past", "In the spring"], [])
    assert prompts_of(corpus, 2) == ["The river ran", "In the spring"]
    assert prompts_of(corpus, 1) == ["The river ran"]
    # Fewer lines than prompts asked for: the evaluator's fixed prompts fill in.
    assert prompts_of(corpus, 4) == ["The river ran", "In the spring", *SAMPLE_PROMPTS[:2]]
    assert prompts_of(tmp_path / "nowhere", 2) == list(SAMPLE_PROMPTS[:2])


FAMILIES: list[ModelFamily] = ["gpt2", "char_lstm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_drawing_leaves_the_global_rng_and_the_mode_alone(
    family: ModelFamily, tmp_path: Path
) -> None:
    corpus = small_corpus(tmp_path / "corpus", repeat=1)
    tok = load_tokenizer(char_tokenizer(corpus, tmp_path / "tok"))
    cfg = tiny_config(family, sample_tokens=6)
    model_cfg = ModelConfig(
        family=cfg.model_family,
        vocab_size=tok.vocab_size,
        max_seq_len=32,
        dropout=0.1,
        pad_id=tok.pad_id,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        overrides=dict(TINY_DIMS[cfg.model_family]),
    )
    torch.manual_seed(0)
    model = build_model(model_cfg)
    model.train()
    device = torch.device("cpu")
    sampler = Sampler.for_run(cfg, tmp_path / "run", corpus, tok, model, model_cfg, device)
    before = (torch.get_rng_state(), random.getstate(), numpy_rng())
    first = sampler.draw()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert numpy_rng() == before[2]
    assert model.training  # back in train mode
    assert [s.prompt for s in first] == prompts_of(corpus, 2)
    assert all(s.text for s in first)
    assert sampler.draw() == first  # seeded: the same weights write the same samples
    off = Sampler.for_run(
        tiny_config(cfg.model_family, sample_count=0),
        tmp_path,
        corpus,
        tok,
        model,
        model_cfg,
        device,
    )
    assert off.draw() == []


def numpy_rng() -> tuple[list[int], int]:
    state = np.random.get_state(legacy=False)["state"]
    return state["key"].tolist(), int(state["pos"])


def validation(step: int, samples: list[Sample], at: float) -> TrainProgress:
    return TrainProgress(
        run_id="r1",
        user_id=7,
        at=at,
        step=step,
        epoch=1,
        total_epochs=1,
        total_steps=100,
        loss=2.0,
        val_loss=2.5,
        samples=samples,
    )


def test_the_view_keeps_the_latest_samples() -> None:
    state = apply(RunState(run_id="r1"), validation(10, SAMPLES, 1.0))
    assert (state.samples, state.samples_step) == (SAMPLES, 10)
    plain = TrainProgress(run_id="r1", at=2.0, step=11, epoch=1, total_epochs=1, loss=1.9)
    state = apply(state, plain)
    assert (state.samples, state.samples_step) == (SAMPLES, 10)  # kept until the next ones


def test_watch_shows_each_sample_under_its_validation() -> None:
    view = WatchView()
    line = view.apply(validation(10, SAMPLES, 1.0))
    assert line == (
        "validation at step 10: val_loss 2.5000\n"
        '  sample: "The river" → " ran \\"past\\"\\nthe mill"\n'
        '  sample: "In" → ""'
    )
    plain = TrainProgress(run_id="r1", at=2.0, step=11, epoch=1, total_epochs=1, loss=1.9)
    assert view.apply(plain) is None  # samples come with validations only


def test_the_discord_progress_message_tells_the_latest_sample(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, corpus_root=tmp_path)
    translator = Translator(settings, NotifierConfig(progress_interval_s=0.0))
    view = translator.view("r1")
    started = TrainStarted(
        run_id="r1",
        user_id=7,
        model_family="gpt2",
        model_size="tiny",
        total_epochs=1,
        total_steps=100,
    )
    translator.messages(started, view)
    job, _ = translator.messages(validation(10, SAMPLES, 1.0), view)
    assert isinstance(job, JobProgress)
    suffix = ' | sample (step 10): The river →  ran "past"⏎the mill'
    assert job.message.endswith(suffix)
    assert suffix in str(embed(view)["description"])  # the direct message's card
    # Between validations the message still quotes the latest sample.
    later = TrainProgress(run_id="r1", at=2.0, step=11, epoch=1, total_epochs=1, loss=1.9)
    job, _ = translator.messages(later, view)
    assert isinstance(job, JobProgress) and job.message.endswith(suffix)
    # A long sample is cut.
    long = [Sample(prompt="The", text=" word" * 100)]
    job, _ = translator.messages(validation(20, long, 3.0), view)
    assert isinstance(job, JobProgress)
    quoted = job.message.split(" | sample (step 20): ", 1)[1]
    assert len(quoted) == SAMPLE_CHARS and quoted.endswith("…")
