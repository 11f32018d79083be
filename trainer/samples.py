"""Samples while training: at each validation the model continues a few fixed prompts, so a
person sees it learn (in metrics.jsonl, TensorBoard, the events, the dashboard, `watch` and
the Discord message).

Cheap and invisible to the run's maths: a few prompts (the first words of the first lines
of the validation split), a bounded number of new tokens, drawn with the evaluator's own
generation (trainer.evaluate) from a private torch.Generator seeded with the run's seed + i,
on the eager model in eval mode, under inference mode. The global RNG is never drawn from,
so a run resumed from a checkpoint stays bit for bit the run that never stopped, and the
same run writes the same samples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from protocol.events import Sample
from protocol.settings import GenerateSettings
from trainer.config import TrainConfig
from trainer.corpus import split_path
from trainer.evaluate import SAMPLE_PROMPTS, LoadedModel, generation
from trainer.model import ModelConfig
from trainer.tokenizer import Tokenizer

PROMPT_WORDS = 3  # a prompt is the first words of a line of the validation split
PROMPT_CHARS = 48
MAX_LINE = 4096  # characters read of a line when looking for prompts
TEMPERATURE = 0.8  # as the evaluator's samples: greedy decoding of a weak model only repeats
TOP_K = 50


def prompts_of(data_dir: Path, count: int) -> list[str]:
    """The first PROMPT_WORDS words of the first `count` non-empty lines of the validation
    split (the evaluator's fixed prompts where it has fewer lines)."""
    found: list[str] = []
    path = split_path(data_dir, "validation")
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            while len(found) < count and (line := f.readline(MAX_LINE)):
                words = line.split()[:PROMPT_WORDS]
                if words:
                    found.append(" ".join(words)[:PROMPT_CHARS])
    found += SAMPLE_PROMPTS[: count - len(found)]
    return found


class Sampler:
    """Draws the run's samples from its model as it trains."""

    def __init__(self, lm: LoadedModel, prompts: list[str], tokens: int, seed: int) -> None:
        self.lm = lm
        self.prompts = prompts
        self.tokens = tokens
        self.seed = seed

    @classmethod
    def for_run(
        cls,
        cfg: TrainConfig,
        run_dir: Path,
        data_dir: Path,
        tok: Tokenizer,
        model: nn.Module,
        model_cfg: ModelConfig,
        device: torch.device,
    ) -> Sampler:
        """The sampler of a run (no prompts, so no samples, when cfg.sample_count is 0)."""
        lm = LoadedModel(
            run_dir=run_dir, model=model, tokenizer=tok, config=model_cfg, device=device
        )
        prompts = prompts_of(data_dir, cfg.sample_count) if cfg.sample_count else []
        return cls(lm, prompts, cfg.sample_tokens, cfg.seed)

    def draw(self) -> list[Sample]:
        """One sample per prompt, prompt i seeded with seed + i; the model's mode restored."""
        if not self.prompts:
            return []
        model = self.lm.model
        was_training = model.training
        model.eval()  # no dropout: it would draw from the global RNG
        try:
            out = []
            for i, prompt in enumerate(self.prompts):
                settings = GenerateSettings(
                    max_new_tokens=self.tokens,
                    temperature=TEMPERATURE,
                    top_k=TOP_K,
                    seed=(self.seed + i) % 2**32,
                    stop_on_eos=False,
                )
                text = generation(self.lm, prompt, settings).texts[0]
                out.append(Sample(prompt=prompt, text=text))
            return out
        finally:
            model.train(was_training)
