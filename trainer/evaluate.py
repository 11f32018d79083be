"""Evaluation, scoring, generation and chat over a trained run dir.

A run dir holds the final model and the tokenizer files side by side (see trainer.train),
so both load from the same folder. Text is turned into tokens the way the training data
was (trainer.data): each line is encoded on its own and every newline is the eos token,
the line separator the model learned. The first token of a text is predicted from an
eos: training streams never contain bos, and "just after an eos" is exactly the start of
a line to the model, so every token of the text gets a prediction.

Loss is computed over windows of max_seq_len + 1 tokens that overlap by one (window i
starts at token i * max_seq_len, the layout validation uses during training), so each
token is scored exactly once and a text's loss is the same number whichever entry point
(evaluate on a file, score on its text) computes it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from protocol.settings import (
    Device,
    GenerateSettings,
    SamplingSettings,
    checked,
    with_fields,
)
from trainer.corpus import split_path
from trainer.errors import UserError
from trainer.manifest import read_manifest
from trainer.model import CharLSTM, ModelConfig, count_parameters, input_embedding, load_model
from trainer.model import logits as model_logits
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from trainer.train import perplexity, resolve_device

EvalSplit = Literal["validation", "test"]
EVAL_DIR = "eval"
EVAL_VERSION = 1
MODEL_FILE = "model.safetensors"
# Fixed prompts for the evaluation samples: short openings that fit most English text.
SAMPLE_PROMPTS = ("The", "To be", "My lord,", "What is", "I will")
REPETITION_N = 4
_OUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ROLE_PREFIX: dict[str, str] = {"system": "System", "user": "User", "assistant": "Assistant"}
# Logits memory per scoring batch, in floats: batch = this // (max_seq_len * vocab).
_SCORE_BATCH_FLOATS = 1 << 24
_MAX_SCORE_BATCH = 16


# ---------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A run dir's model (in eval mode, on its device) with its tokenizer and config."""

    run_dir: Path
    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    device: torch.device

    @classmethod
    def load(cls, run_dir: Path, device: Device = "auto") -> LoadedModel:
        if not (run_dir / MODEL_FILE).is_file():
            raise UserError(f"no trained model in {run_dir} (missing {MODEL_FILE})")
        tok = load_tokenizer(run_dir)
        model, cfg = load_model(run_dir)
        n_vocab = input_embedding(model).num_embeddings
        if tok.vocab_size > n_vocab:
            raise UserError(
                f"the tokenizer in {run_dir} has {tok.vocab_size} tokens but the model only "
                f"{n_vocab}: they do not belong together"
            )
        dev = resolve_device(device)
        model.to(dev).eval()
        return cls(run_dir=run_dir, model=model, tokenizer=tok, config=cfg, device=dev)

    @cached_property
    def unsampled_ids(self) -> torch.Tensor:
        """Tokens generation never picks: pad, bos and unk carry no text, and a token
        holding a newline never occurs in training data (there a newline is always eos)."""
        tok = self.tokenizer
        ids = [tok.pad_id, tok.bos_id, tok.unk_id]
        ids += [i for i in range(len(SPECIAL_TOKENS), tok.vocab_size) if "\n" in token_text(tok, i)]
        return torch.tensor(ids, dtype=torch.long, device=self.device)


def import_model_code() -> None:
    """Import transformers' causal LM code of every family now: seconds, once per process,
    that the first model load would otherwise pay (the evaluator's pool children run this
    as they start)."""
    import transformers

    for name in ("AutoModelForCausalLM", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"):
        getattr(transformers, name)  # transformers imports a model's module on first access


class ModelCache:
    """The `capacity` most recently used models, by run dir and device.

    Each use checks the model file (one stat): a retrained run (its model file rewritten:
    another inode, mtime or size) is loaded again and its stale model dropped, so a
    stale model is never served. `loads` counts the loads done.
    """

    def __init__(self, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.loads = 0
        # (run dir, device) -> (the model file's identity when loaded, the model)
        self._models: OrderedDict[tuple[Path, str], tuple[tuple[int, int, int], LoadedModel]] = (
            OrderedDict()
        )

    def get(self, run_dir: Path, device: Device = "auto") -> LoadedModel:
        try:
            st = (run_dir / MODEL_FILE).stat()
        except OSError:
            raise UserError(f"no trained model in {run_dir} (missing {MODEL_FILE})") from None
        key = (run_dir.absolute(), device)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._models.get(key)
        if cached is not None and cached[0] == stamp:
            self._models.move_to_end(key)
            return cached[1]
        self._models.pop(key, None)  # a retrained run: its old model goes before the new loads
        lm = LoadedModel.load(run_dir, device)
        self.loads += 1
        self._models[key] = (stamp, lm)
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
        return lm

    def clear(self) -> None:
        self._models.clear()

    def __len__(self) -> int:
        return len(self._models)


MODEL_CACHE = ModelCache(capacity=2)


def load(run_dir: Path | LoadedModel, device: Device = "auto") -> LoadedModel:
    """The loaded model of run_dir, from MODEL_CACHE (a LoadedModel is returned as is)."""
    if isinstance(run_dir, LoadedModel):
        return run_dir
    return MODEL_CACHE.get(run_dir, device)


# ---------------------------------------------------------------------------- text <-> tokens


@dataclass
class EncodedText:
    """The tokens of a text: every line encoded on its own, every newline one eos.

    spans[i] is the [start, end) character range of the text that token i came from
    (from the tokenizer's offsets; a newline's eos spans the newline). Several tokens can
    share a character (a multi-byte character split by byte-level BPE, sentencepiece's
    word-start piece) and a span can be empty. None when not asked for.
    """

    ids: list[int]
    spans: list[tuple[int, int]] | None


def encode_text(tok: Tokenizer, text: str, with_spans: bool = False) -> EncodedText:
    lines = text.split("\n")
    encoded = tok.encode_batch(lines)
    ids: list[int] = []
    spans: list[tuple[int, int]] | None = [] if with_spans else None
    pos = 0
    for i, (line, line_ids) in enumerate(zip(lines, encoded, strict=True)):
        ids.extend(line_ids)
        if spans is not None:
            spans.extend(_line_spans(tok, line, line_ids, pos))
        pos += len(line)
        if i < len(lines) - 1:
            ids.append(tok.eos_id)
            if spans is not None:
                spans.append((pos, pos + 1))
            pos += 1
    return EncodedText(ids=ids, spans=spans)


def _line_spans(tok: Tokenizer, line: str, ids: list[int], base: int) -> list[tuple[int, int]]:
    enc = tok.hf.encode(line, add_special_tokens=False)
    if list(enc.ids) == ids:
        return [(base + a, base + b) for a, b in enc.offsets]
    # The native encoder and its HF mirror disagree (should not happen): spread evenly.
    n, width = len(ids), len(line)
    return [(base + k * width // n, base + (k + 1) * width // n) for k in range(n)]


def decode_tokens(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Text of token ids: each eos is a newline, other special tokens are dropped."""
    parts: list[list[int]] = [[]]
    for i in ids:
        if i == tok.eos_id:
            parts.append([])
        else:
            parts[-1].append(i)
    return "\n".join(tok.decode(p, skip_special=True) if p else "" for p in parts)


def token_text(tok: Tokenizer, token_id: int) -> str:
    """How one token reads in text: eos is a newline, other specials their name."""
    if token_id == tok.eos_id:
        return "\n"
    if 0 <= token_id < len(SPECIAL_TOKENS):
        return SPECIAL_TOKENS[token_id]
    if tok.config.tokenizer_kind == "sentencepiece":  # decode would drop a word-start piece's space
        piece = tok.id_to_token(token_id)
        return "" if piece is None else piece.replace("\u2581", " ")
    return tok.decode([token_id])


# ---------------------------------------------------------------------------- scoring


@dataclass
class TokenScores:
    nll: npt.NDArray[np.float64]  # per target token, nats
    top_ids: npt.NDArray[np.int64] | None  # [n, k] the k likeliest tokens at each target
    top_probs: npt.NDArray[np.float64] | None

    @property
    def loss(self) -> float:
        return float(self.nll.sum() / len(self.nll))


def score_batch_size(max_seq_len: int, vocab_size: int) -> int:
    return max(1, min(_MAX_SCORE_BATCH, _SCORE_BATCH_FLOATS // (max_seq_len * vocab_size)))


@torch.inference_mode()
def token_scores(lm: LoadedModel, ids: Sequence[int], top_k: int = 0) -> TokenScores:
    """Negative log-likelihood of each of ids, each predicted from eos + the tokens before.

    Windows of max_seq_len targets (layout in the module docstring), batched; the batch
    size depends only on the model, so the same ids always give the same numbers.
    """
    n = len(ids)
    if n == 0:
        raise UserError("the text encodes to no tokens: nothing to score")
    stream = torch.tensor([lm.tokenizer.eos_id, *ids], dtype=torch.long)
    t = lm.config.max_seq_len
    vocab = input_embedding(lm.model).num_embeddings
    k = min(top_k, vocab)
    n_windows = -(-n // t)
    batch = score_batch_size(t, vocab)
    nll = np.empty(n, dtype=np.float64)
    top_ids = np.empty((n, k), dtype=np.int64) if k > 0 else None
    top_probs = np.empty((n, k), dtype=np.float64) if k > 0 else None
    for first in range(0, n_windows, batch):
        rows = range(first, min(first + batch, n_windows))
        # Filler after the text is eos, not pad: it is masked out of the loss and, behind
        # the causal mask, invisible; pad ids only make transformers warn about masks.
        x = torch.full((len(rows), t), lm.tokenizer.eos_id, dtype=torch.long)
        y = torch.full((len(rows), t), -100, dtype=torch.long)
        for r, w in enumerate(rows):
            chunk = stream[w * t : w * t + t + 1]
            x[r, : len(chunk) - 1] = chunk[:-1]
            y[r, : len(chunk) - 1] = chunk[1:]
        logp = F.log_softmax(model_logits(lm.model, x.to(lm.device)).float(), dim=-1)
        mask = (y >= 0).to(lm.device)
        target = y.clamp(min=0).to(lm.device).unsqueeze(-1)
        token_nll = -logp.gather(-1, target).squeeze(-1)[mask]
        lo = rows[0] * t
        hi = lo + len(token_nll)
        nll[lo:hi] = token_nll.double().cpu().numpy()
        if top_ids is not None and top_probs is not None:
            values, indices = logp[mask].topk(k, dim=-1)
            top_ids[lo:hi] = indices.cpu().numpy()
            top_probs[lo:hi] = values.double().exp().cpu().numpy()
    return TokenScores(nll=nll, top_ids=top_ids, top_probs=top_probs)


def _nonempty(text: str, what: str) -> str:
    if not text:
        raise UserError(f"{what} is empty: nothing to score")
    return text


def score(
    run_dir: Path | LoadedModel,
    text: str,
    detail: bool = False,
    top_k: int = 5,
    device: Device = "auto",
) -> dict[str, object]:
    """Loss and surprisal of text under the run's model.

    Always: loss (mean nats per token), perplexity, bits_per_char, num_tokens, num_chars and
    surprisal_bits (one value per token, -log2 p). With detail:

    - tokens: per token its text, id, [start, end) character span, bits, and top_k: the
      top_k likeliest tokens of the distribution that token was drawn against (token text
      + probability), i.e. what the model expected at that position.
    - chars: per character of text its index, the first token covering it and bits. Each
      token's bits are spread evenly over the characters of its span; a character shared
      by several tokens adds up their shares; a token with an empty span gives its bits to
      the character at its position. So the chars' bits sum to the text's total bits.
    """
    if top_k < 0:
        raise UserError(f"top_k must not be negative, got {top_k}")
    lm = load(run_dir, device)
    enc = encode_text(lm.tokenizer, _nonempty(text, "text"), with_spans=detail)
    scores = token_scores(lm, enc.ids, top_k if detail else 0)
    bits = scores.nll / math.log(2)
    out: dict[str, object] = {
        "loss": scores.loss,
        "perplexity": perplexity(scores.loss),
        "bits_per_char": float(bits.sum() / len(text)),
        "num_tokens": len(enc.ids),
        "num_chars": len(text),
        "surprisal_bits": [float(b) for b in bits],
    }
    if detail:
        assert enc.spans is not None
        out["tokens"] = _token_detail(lm.tokenizer, enc, bits, scores)
        out["chars"] = _char_detail(text, enc.spans, bits)
    return out


def _token_detail(
    tok: Tokenizer, enc: EncodedText, bits: npt.NDArray[np.float64], scores: TokenScores
) -> list[dict[str, object]]:
    assert enc.spans is not None
    detail: list[dict[str, object]] = []
    for i, (token_id, (start, end)) in enumerate(zip(enc.ids, enc.spans, strict=True)):
        top: list[dict[str, object]] = []
        if scores.top_ids is not None and scores.top_probs is not None:
            top = [
                {"token": token_text(tok, int(t)), "id": int(t), "prob": float(p)}
                for t, p in zip(scores.top_ids[i], scores.top_probs[i], strict=True)
            ]
        detail.append(
            {
                "token": token_text(tok, token_id),
                "id": token_id,
                "start": start,
                "end": end,
                "bits": float(bits[i]),
                "top_k": top,
            }
        )
    return detail


def _char_detail(
    text: str, spans: list[tuple[int, int]], bits: npt.NDArray[np.float64]
) -> list[dict[str, object]]:
    char_bits = np.zeros(len(text), dtype=np.float64)
    owner = [-1] * len(text)
    for i, (start, end) in enumerate(spans):
        if end <= start:  # an empty span: its character is the one at its position
            start = min(start, len(text) - 1)
            end = start + 1
        char_bits[start:end] += bits[i] / (end - start)
        for c in range(start, end):
            if owner[c] < 0:
                owner[c] = i
    return [
        {"index": c, "char": ch, "token": owner[c], "bits": float(char_bits[c])}
        for c, ch in enumerate(text)
    ]


# ---------------------------------------------------------------------------- generation


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[n, V] logits with everything outside the top-k / top-p nucleus set to -inf."""
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


class ContextLogits:
    """Next-token logits for a batch of equal-length contexts.

    transformers models reuse their KV cache while the context fits in max_seq_len; past
    that (and always for char_lstm) the last max_seq_len tokens are run again each step.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.cacheable = not isinstance(lm.model, CharLSTM)
        self.past: object | None = None
        self.seen = 0  # tokens of the context already in the cache

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.lm.config.max_seq_len
        if not self.cacheable or ids.size(1) > t:
            self.past = None
            return model_logits(self.lm.model, ids[:, -t:])[:, -1, :].float()
        new = ids[:, self.seen :] if self.past is not None else ids
        out = self.lm.model(input_ids=new, past_key_values=self.past, use_cache=True)
        self.past, self.seen = out.past_key_values, ids.size(1)
        result: torch.Tensor = out.logits[:, -1, :].float()
        return result


@dataclass(frozen=True)
class Generation:
    """Continuations, how many decoding steps ran, and which continuations ended at eos."""

    texts: list[str]
    steps: int
    eos_terminated: list[bool]


@torch.inference_mode()
def _generate(lm: LoadedModel, prompt: str, cfg: GenerateSettings) -> Generation:
    try:
        cfg = checked(cfg)
    except msgspec.ValidationError as e:
        raise UserError(f"bad sampling setting: {e}") from None
    tok = lm.tokenizer
    prompt_ids = encode_text(tok, prompt).ids
    n = cfg.num_return_sequences
    ids = torch.tensor([[tok.eos_id, *prompt_ids]] * n, dtype=torch.long, device=lm.device)
    start = ids.size(1)
    gen = torch.Generator(device=lm.device).manual_seed(cfg.seed)
    banned = lm.unsampled_ids
    prefix = decode_tokens(tok, prompt_ids)
    finished: list[str | None] = [None] * n
    at_eos = [False] * n
    steps = 0
    ctx = ContextLogits(lm)
    for step in range(cfg.max_new_tokens):
        steps = step + 1
        logits = ctx.next_logits(ids)
        logits[:, banned] = -math.inf
        if cfg.temperature < 1e-5:  # 0, or so close to it that logits / T would overflow
            nxt = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        ids = torch.cat([ids, nxt.unsqueeze(-1)], dim=-1)
        for r, token_id in enumerate(nxt.tolist()):
            if finished[r] is not None:
                continue
            if cfg.stop_on_eos and token_id == tok.eos_id:
                at_eos[r] = True
                finished[r] = _continuation(
                    tok, prompt_ids, ids[r, start : start + step].tolist(), prefix
                )
            elif cfg.stop:
                text = _continuation(tok, prompt_ids, ids[r, start:].tolist(), prefix)
                cut = _stop_at(text, cfg.stop)
                if cut is not None:
                    finished[r] = text[:cut]
        if all(f is not None for f in finished):
            break
    texts = [
        f if f is not None else _continuation(tok, prompt_ids, ids[r, start:].tolist(), prefix)
        for r, f in enumerate(finished)
    ]
    return Generation(texts=texts, steps=steps, eos_terminated=at_eos)


def _continuation(tok: Tokenizer, prompt_ids: list[int], new_ids: list[int], prefix: str) -> str:
    # Decode prompt and continuation together: decoders (sentencepiece's word starts, a
    # character split over byte tokens) need the context to place spaces and bytes right.
    full = decode_tokens(tok, [*prompt_ids, *new_ids])
    return full[len(prefix) :] if full.startswith(prefix) else decode_tokens(tok, new_ids)


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def generate(
    run_dir: Path | LoadedModel,
    prompt: str,
    settings: GenerateSettings | None = None,
    device: Device = "auto",
) -> list[str]:
    """Continue prompt: num_return_sequences continuations (prompt not included).

    temperature 0 is greedy; otherwise sampling from the temperature-scaled distribution
    restricted to the top_k tokens and the top_p nucleus, drawn from a torch.Generator
    seeded with the settings' seed, so a fixed seed gives the same texts. A continuation
    ends at eos (when stop_on_eos; eos is the end of a line, without it eos is generated
    as a newline), before the first stop sequence, or after max_new_tokens. The context is
    cropped to the model's max_seq_len.
    """
    return generation(run_dir, prompt, settings, device).texts


def generation(
    run_dir: Path | LoadedModel,
    prompt: str,
    settings: GenerateSettings | None = None,
    device: Device = "auto",
) -> Generation:
    """generate, with the decoding steps taken and which continuations ended at eos."""
    return _generate(load(run_dir, device), prompt, settings or GenerateSettings())


def format_chat(history: Sequence[tuple[str, str]], message: str) -> str:
    """The chat prompt: a "Role: content" line per turn, the message, then "Assistant:"."""
    lines = []
    for role, content in history:
        prefix = _ROLE_PREFIX.get(role)
        if prefix is None:
            raise UserError(f"unknown chat role {role!r}; use one of {sorted(_ROLE_PREFIX)}")
        lines.append(f"{prefix}: {content}\n")
    return "".join(lines) + f"User: {message}\nAssistant:"


def chat(
    run_dir: Path | LoadedModel,
    history: Sequence[tuple[str, str]],
    message: str,
    settings: SamplingSettings | None = None,
    device: Device = "auto",
) -> str:
    """The assistant's reply to message after history [(role, content)], roles user/assistant
    (and system).

    The oldest turns are dropped until the prompt leaves room for the reply within
    max_seq_len (at least half of it); the reply ends where the model starts the next
    user turn ("\\nUser:") or at a stop sequence, and is stripped of surrounding spaces.
    """
    lm = load(run_dir, device)
    sampling = settings or SamplingSettings()
    budget = max(lm.config.max_seq_len // 2, lm.config.max_seq_len - sampling.max_new_tokens)
    turns = list(history)
    prompt = format_chat(turns, message)
    while turns and len(encode_text(lm.tokenizer, prompt).ids) + 1 > budget:
        turns.pop(0)
        prompt = format_chat(turns, message)
    # The reply ends where the model starts the user's next turn.
    cfg = with_fields(GenerateSettings, sampling, stop=["\nUser:"], stop_on_eos=False)
    return _generate(lm, prompt, cfg).texts[0].strip()


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class SampleConfig:
    """How evaluate draws its samples: one per prompt, prompt i with seed + i."""

    prompts: tuple[str, ...] = SAMPLE_PROMPTS
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 1337


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over the samples (Li et al., 2016).

    N-grams do not cross sample boundaries; 0.0 when no sample has n tokens.
    """
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: Sequence[Sequence[int]], n: int = REPETITION_N) -> float:
    """Fraction of n-grams that repeat an earlier n-gram of the same sample.

    Pooled over the samples: sum(total - distinct n-grams of each sample) / sum(total)
    (seq-rep-n of Welleck et al., 2019, weighted by length). 0.0 for no n-grams at all.
    """
    total = repeated = 0
    for s in samples:
        grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def eval_paths(run_dir: Path, out_name: str = "metrics") -> tuple[Path, Path]:
    """(metrics file, samples file) of an evaluation: eval/metrics.json + eval/samples.jsonl
    for the default name, eval/<name>.json + eval/<name>-samples.jsonl otherwise."""
    if not _OUT_NAME.match(out_name):
        raise UserError(
            f"bad evaluation name {out_name!r}: letters, digits, '_', '.', '-' (max 64)"
        )
    d = run_dir / EVAL_DIR
    samples = "samples.jsonl" if out_name == "metrics" else f"{out_name}-samples.jsonl"
    return d / f"{out_name}.json", d / samples


def corpus_dir_of(run_dir: Path) -> Path:
    """The prepared corpus a run was trained on (its manifest's data dir)."""
    try:
        return Path(read_manifest(run_dir).data.dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the manifest of run {run_dir}: {e}") from None


def head_lines(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """The first lines of text (each with its newline) whose tokens fit in max_tokens;
    at least the first line."""
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    lines = text.split("\n")
    kept, total = 0, 0
    for ids in tok.encode_batch(lines):
        total += len(ids) + 1  # + the eos of its newline
        if total > max_tokens and kept:
            break
        kept += 1
    return "\n".join(lines[:kept]) + ("\n" if kept < len(lines) else "")


def evaluate(
    run_dir: Path,
    split: EvalSplit = "validation",
    path: Path | None = None,
    corpus_dir: Path | None = None,
    out_name: str = "metrics",
    samples: SampleConfig | None = None,
    max_tokens: int | None = None,
    device: Device = "auto",
) -> dict[str, object]:
    """Evaluate the run's model on a corpus split (or the text file at path).

    max_tokens caps the text at its first lines that hold at most that many tokens (at
    least one line; None: all of it); metrics "truncated" says whether it was cut, and
    every number describes the text actually scored.

    The split file is corpus_dir/<split>.txt, corpus_dir defaulting to the corpus recorded
    in the run's manifest. Metrics: loss (nats per token, computed exactly as score() does
    on the same text), perplexity, bits_per_token, bits_per_char, tokens_per_char,
    tokens_per_word (tokens include one eos per newline; words are whitespace-separated),
    and over one seeded sample per fixed prompt: distinct_1, distinct_2 and
    repetition_rate (see those functions; over the tokens of the sample texts).
    Writes eval/metrics.json and eval/samples.jsonl (see eval_paths), each atomically.
    """
    t0 = time.perf_counter()
    metrics_path, samples_path = eval_paths(run_dir, out_name)
    lm = load(run_dir, device)
    source: str
    if path is None:
        if split not in ("validation", "test"):
            raise UserError(f"unknown split {split!r}; evaluate on validation or test")
        path = split_path(corpus_dir if corpus_dir is not None else corpus_dir_of(run_dir), split)
        source = split
    else:
        source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no text to evaluate on: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text: {e}") from None
    enc = encode_text(lm.tokenizer, _nonempty(text, str(path)))
    truncated = max_tokens is not None and len(enc.ids) > max_tokens
    if max_tokens is not None and truncated:
        text = head_lines(lm.tokenizer, text, max_tokens)
        enc = encode_text(lm.tokenizer, text)
    scores = token_scores(lm, enc.ids)
    total_bits = float(scores.nll.sum()) / math.log(2)
    words = len(text.split())

    sc = samples or SampleConfig()
    sample_rows: list[dict[str, object]] = []
    sample_ids: list[list[int]] = []
    for i, prompt in enumerate(sc.prompts):
        # One seed per prompt: with a single seed a weak model that ignores its prompt
        # would repeat one sample five times and distinct-n would say little.
        cfg = GenerateSettings(
            max_new_tokens=sc.max_new_tokens,
            temperature=sc.temperature,
            top_k=sc.top_k,
            seed=sc.seed + i,
            stop_on_eos=False,
        )
        completion = _generate(lm, prompt, cfg).texts[0]
        ids = encode_text(lm.tokenizer, completion).ids
        sample_ids.append(ids)
        sample_rows.append(
            {"prompt": prompt, "completion": completion, "seed": sc.seed + i, "tokens": len(ids)}
        )

    metrics: dict[str, object] = {
        "version": EVAL_VERSION,
        "source": source,
        "truncated": truncated,
        "loss": scores.loss,
        "perplexity": perplexity(scores.loss),
        "bits_per_token": total_bits / len(enc.ids),
        "bits_per_char": total_bits / len(text),
        "tokens": len(enc.ids),
        "chars": len(text),
        "words": words,
        "tokens_per_char": len(enc.ids) / len(text),
        "tokens_per_word": len(enc.ids) / words if words else None,
        "distinct_1": distinct_n(sample_ids, 1),
        "distinct_2": distinct_n(sample_ids, 2),
        "repetition_rate": repetition_rate(sample_ids),
        "repetition_n": REPETITION_N,
        "samples": len(sample_rows),
        "sampling": {**asdict(sc), "prompts": list(sc.prompts)},
        "model": {
            "family": lm.config.family,
            "size": lm.config.size,
            "parameters": count_parameters(lm.model),
            "max_seq_len": lm.config.max_seq_len,
        },
        "tokenizer": {
            "kind": lm.tokenizer.config.tokenizer_kind,
            "vocab_size": lm.tokenizer.vocab_size,
        },
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    # Samples first: metrics.json appearing is the sign that the evaluation is complete.
    _write_atomic(
        samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows)
    )
    _write_atomic(metrics_path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics
