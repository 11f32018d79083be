"""Evaluation, scoring, generation and chat over run dirs (trainer.evaluate)."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from protocol.settings import GenerateSettings, ModelFamily, SamplingSettings
from tests.helpers_ml import TINY_DIMS, char_tokenizer, small_corpus, tiny_config, write_corpus
from trainer.errors import UserError
from trainer.evaluate import (
    ContextLogits,
    LoadedModel,
    ModelCache,
    chat,
    distinct_n,
    eval_paths,
    evaluate,
    filter_logits,
    format_chat,
    generate,
    head_lines,
    score,
)
from trainer.model import CharLSTM, ModelConfig, build_model, save_model
from trainer.model import logits as model_logits
from trainer.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from trainer.train import train

torch.set_num_threads(1)


def save_random_run(run_dir: Path, tok_dir: Path, family: ModelFamily, seq_len: int = 32) -> Path:
    """An untrained model + tokenizer saved the way a finished run leaves them."""
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(
        family=family,
        vocab_size=tok.vocab_size,
        max_seq_len=seq_len,
        overrides=dict(TINY_DIMS[family]),
    )
    torch.manual_seed(0)
    save_model(build_model(cfg), cfg, run_dir)
    tok.save(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def char_tok(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return char_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "char")


@pytest.fixture(scope="module")
def run(corpus: Path, char_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt2 run trained for a few steps (model, tokenizer, manifest in the run dir)."""
    run_dir = tmp_path_factory.mktemp("runs") / "gpt2"
    train(tiny_config("gpt2", max_steps=20), corpus, char_tok, run_dir)
    return run_dir


# ---------------------------------------------------------------------------- generation


def test_generation_is_reproducible_with_a_seed(run: Path) -> None:
    def sample(seed: int) -> str:
        return generate(
            run, "The river", GenerateSettings(seed=seed, max_new_tokens=24, stop_on_eos=False)
        )[0]

    first = sample(7)
    assert first == sample(7)
    others = {sample(s) for s in (8, 9, 10)}
    assert len(others | {first}) >= 3  # different seeds: (almost always) different text


def test_greedy_is_deterministic_and_ignores_the_seed(run: Path) -> None:
    a = generate(
        run, "The", GenerateSettings(temperature=0, seed=1, max_new_tokens=20, stop_on_eos=False)
    )
    b = generate(
        run, "The", GenerateSettings(temperature=0, seed=2, max_new_tokens=20, stop_on_eos=False)
    )
    assert a == b and len(a) == 1


def test_stop_sequences_cut_the_output(run: Path) -> None:
    full = generate(run, "The", GenerateSettings(seed=3, max_new_tokens=40, stop_on_eos=False))[0]
    assert len(full) >= 10
    stop = full[6:8]
    cut = generate(
        run, "The", GenerateSettings(seed=3, max_new_tokens=40, stop_on_eos=False, stop=[stop])
    )[0]
    assert cut == full[: full.find(stop)]
    assert stop not in cut


def test_stop_on_eos_ends_the_line(run: Path) -> None:
    texts = generate(
        run, "The", GenerateSettings(seed=5, max_new_tokens=60, num_return_sequences=4)
    )
    assert all("\n" not in t for t in texts)


def test_num_return_sequences(run: Path) -> None:
    texts = generate(
        run,
        "In the",
        GenerateSettings(seed=11, max_new_tokens=20, num_return_sequences=3, stop_on_eos=False),
    )
    assert len(texts) == 3
    assert len(set(texts)) > 1
    assert texts == generate(
        run,
        "In the",
        GenerateSettings(seed=11, max_new_tokens=20, num_return_sequences=3, stop_on_eos=False),
    )


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen", "char_lstm"])
def test_every_family_generates_past_max_seq_len(
    family: ModelFamily, char_tok: Path, tmp_path: Path
) -> None:
    run_dir = save_random_run(tmp_path / family, char_tok, family, seq_len=16)
    a = generate(run_dir, "The", GenerateSettings(max_new_tokens=40, stop_on_eos=False, seed=1))
    assert a == generate(
        run_dir, "The", GenerateSettings(max_new_tokens=40, stop_on_eos=False, seed=1)
    )
    assert a[0]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen"])
def test_kv_cache_matches_full_recompute(
    family: ModelFamily, char_tok: Path, tmp_path: Path
) -> None:
    lm = LoadedModel.load(save_random_run(tmp_path / family, char_tok, family, seq_len=8), "cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, lm.tokenizer.vocab_size, (2, 12), generator=gen)
    ctx = ContextLogits(lm)
    with torch.inference_mode():
        for n in range(3, 12):  # cached up to 8 tokens, a sliding window after that
            want = model_logits(lm.model, ids[:, :n][:, -8:])[:, -1, :]
            torch.testing.assert_close(ctx.next_logits(ids[:, :n]), want, atol=1e-4, rtol=1e-4)


def test_filter_logits_keeps_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=0, top_p=0.8).isfinite()  # 0.5 + 0.3 reach 0.8
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=0, top_p=0.81).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    kept = filter_logits(logits, top_k=0, top_p=0.1).isfinite()  # the top token always stays
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (GenerateSettings(max_new_tokens=0), "max_new_tokens"),
        (GenerateSettings(temperature=-1.0), "temperature"),
        (GenerateSettings(top_k=-1), "top_k"),
        (GenerateSettings(top_p=0.0), "top_p"),
        (GenerateSettings(top_p=1.5), "top_p"),
        (GenerateSettings(num_return_sequences=0), "num_return_sequences"),
        (GenerateSettings(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_options_are_user_errors(bad: GenerateSettings, field: str, run: Path) -> None:
    with pytest.raises(UserError, match=rf"\$\.{field}"):
        generate(run, "The", bad)


def test_generate_validates_its_options(run: Path) -> None:
    with pytest.raises(UserError, match="top_p"):
        generate(run, "The", GenerateSettings(top_p=0.0))


# ---------------------------------------------------------------------------- chat


class BigramScript(CharLSTM):
    """Always predicts a fixed successor of the last token; records its input lengths."""

    def __init__(self, vocab_size: int, successor: dict[int, int]) -> None:
        super().__init__(vocab_size, n_embd=4, hidden=4, n_layer=1)
        self.table = torch.zeros(vocab_size, vocab_size)
        for a, b in successor.items():
            self.table[a, b] = 10.0
        self.lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.lengths.append(input_ids.size(1))
        return self.table[input_ids]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A model that answers ' Hi' and then starts the next user turn, forever."""
    root = tmp_path_factory.mktemp("chat")
    chat_lines = ["User: Hi there", "Assistant: Hello!", "User: How are you?", "Assistant: Hi."]
    corpus = write_corpus(root / "corpus", chat_lines * 3, chat_lines, chat_lines)
    train_tokenizer(corpus, root / "tok", TokenizerConfig(tokenizer_kind="char", min_frequency=1))
    tok = load_tokenizer(root / "tok")
    ids = {c: tok.encode(c)[0] for c in "Userhi: H"}
    script = [":", " ", "H", "i", "\n", "U", "s", "e", "r", ":"]
    succ = {
        (tok.eos_id if a == "\n" else ids[a]): (tok.eos_id if b == "\n" else ids[b])
        for a, b in itertools.pairwise(script)
    }
    cfg = ModelConfig(family="char_lstm", vocab_size=tok.vocab_size, max_seq_len=64)
    model = BigramScript(tok.vocab_size, succ).eval()
    return LoadedModel(
        run_dir=root, model=model, tokenizer=tok, config=cfg, device=torch.device("cpu")
    )


def test_chat_stops_at_the_next_user_turn(scripted: LoadedModel) -> None:
    assert generate(
        scripted,
        "Assistant:",
        GenerateSettings(temperature=0, max_new_tokens=12, stop_on_eos=False),
    ) == [" Hi\nUser: Hi"]
    assert generate(scripted, "Assistant:", GenerateSettings(temperature=0, max_new_tokens=12)) == [
        " Hi"
    ]
    reply = chat(
        scripted,
        [("user", "Hi there"), ("assistant", "Hello!")],
        "How are you?",
        SamplingSettings(temperature=0, max_new_tokens=50),
    )
    assert reply == "Hi"


def test_chat_drops_old_turns_to_fit(scripted: LoadedModel) -> None:
    history = [("user", "How are you?"), ("assistant", "Hello!")] * 20
    assert isinstance(scripted.model, BigramScript)
    scripted.model.lengths.clear()
    assert (
        chat(scripted, history, "Hi there", SamplingSettings(temperature=0, max_new_tokens=16))
        == "Hi"
    )
    # budget: max_seq_len 64 - 16 new tokens; the full history would be ~600 tokens.
    assert scripted.model.lengths[0] <= 48
    assert format_chat(history[-2:], "Hi there").startswith("User: How are you?\n")
    with pytest.raises(UserError, match="role"):
        chat(scripted, [("robot", "beep")], "Hi", SamplingSettings(temperature=0))


# ---------------------------------------------------------------------------- score/evaluate


def test_score_loss_equals_evaluate_on_the_same_text(run: Path, corpus: Path) -> None:
    text = (corpus / "validation.txt").read_text()
    assert len(text) > 3 * 32  # several windows of max_seq_len
    by_path = evaluate(run, path=corpus / "validation.txt", out_name="by-path")
    by_split = evaluate(run, split="validation")
    scored = score(run, text)
    assert isinstance(scored["loss"], float) and isinstance(by_path["loss"], float)
    assert abs(scored["loss"] - by_path["loss"]) < 1e-5
    assert by_split["loss"] == by_path["loss"]


def test_evaluate_writes_metrics_and_samples(run: Path, corpus: Path) -> None:
    metrics = evaluate(run, split="test")
    metrics_file, samples_file = eval_paths(run)
    assert metrics_file == run / "eval" / "metrics.json"
    assert json.loads(metrics_file.read_text()) == metrics
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(rows) == metrics["samples"] == 5
    assert all(r["prompt"] and isinstance(r["completion"], str) for r in rows)

    loss, ppl = metrics["loss"], metrics["perplexity"]
    assert isinstance(loss, float) and isinstance(ppl, float)
    assert 0 < loss < math.log(load_tokenizer(run).vocab_size) + 1
    assert ppl == pytest.approx(math.exp(loss))
    assert metrics["tokens_per_char"] == 1.0  # char tokenizer, newline = eos
    bpc = metrics["bits_per_char"]
    assert isinstance(bpc, float) and bpc == pytest.approx(loss / math.log(2))
    for key in ("distinct_1", "distinct_2", "repetition_rate"):
        value = metrics[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert metrics["source"] == "test"
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".")]  # no temp files

    # The same seed gives the same samples.
    assert evaluate(run, split="test", out_name="again")["distinct_2"] == metrics["distinct_2"]
    assert (run / "eval" / "again.json").is_file()
    assert (run / "eval" / "again-samples.jsonl").read_text() == samples_file.read_text()


def test_evaluate_max_tokens_scores_the_first_lines(run: Path, corpus: Path) -> None:
    metrics = evaluate(run, split="validation", max_tokens=100, out_name="head")
    assert metrics["truncated"] is True
    tokens = metrics["tokens"]
    assert isinstance(tokens, int) and 0 < tokens <= 100
    head = head_lines(load_tokenizer(run), (corpus / "validation.txt").read_text(), 100)
    assert head.endswith("\n") and len(head) == metrics["chars"]
    assert score(run, head)["loss"] == metrics["loss"]
    assert evaluate(run, split="validation", max_tokens=10**6)["truncated"] is False


def test_evaluate_user_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="evaluation name"):
        evaluate(run, out_name="../escape")
    with pytest.raises(UserError, match="does not exist"):
        evaluate(run, path=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        evaluate(run, path=tmp_path / "empty.txt")
    with pytest.raises(UserError, match="no trained model"):
        evaluate(tmp_path, path=tmp_path / "empty.txt")


def test_score_detail(run: Path) -> None:
    text = "The mill stood.\nHer father"
    result = score(run, text, detail=True, top_k=3)
    bits = result["surprisal_bits"]
    tokens, chars = result["tokens"], result["chars"]
    assert isinstance(bits, list) and isinstance(tokens, list) and isinstance(chars, list)
    assert result["num_tokens"] == len(bits) == len(tokens) == len(text)  # first token scored
    loss = result["loss"]
    assert isinstance(loss, float)
    assert sum(bits) / len(bits) * math.log(2) == pytest.approx(loss)
    assert tokens[15]["token"] == "\n" and tokens[15]["start"] == 15  # the newline is eos
    for t in tokens:
        probs = [c["prob"] for c in t["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert all(0 < p <= 1 for p in probs)
    assert "".join(c["char"] for c in chars) == text
    assert sum(c["bits"] for c in chars) == pytest.approx(sum(bits))
    assert "tokens" not in score(run, text)  # detail only when asked


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_char_detail_with_subword_tokens(kind: str, corpus: Path, tmp_path: Path) -> None:
    cfg = (
        TokenizerConfig(tokenizer_kind="bpe", vocab_size=300, min_frequency=1)
        if kind == "bpe"
        else TokenizerConfig(tokenizer_kind="sentencepiece", vocab_size=80, threads=1)
    )
    train_tokenizer(corpus, tmp_path / "tok", cfg)
    run_dir = save_random_run(tmp_path / "run", tmp_path / "tok", "gpt2")
    text = "The naïve miller, café 日本\nand  the river"
    result = score(run_dir, text, detail=True, top_k=1)
    chars, bits = result["chars"], result["surprisal_bits"]
    assert isinstance(chars, list) and isinstance(bits, list)
    assert len(chars) == len(text)
    assert all(c["bits"] > 0 and c["token"] >= 0 for c in chars)  # every char is attributed
    assert sum(c["bits"] for c in chars) == pytest.approx(sum(bits))


def test_score_rejects_empty_text(run: Path) -> None:
    with pytest.raises(UserError, match="empty"):
        score(run, "")


# ---------------------------------------------------------------------------- metrics, cache


def test_distinct_and_repetition() -> None:
    from trainer.evaluate import repetition_rate

    samples = [[1, 2, 1, 2, 1, 2], [3, 4]]
    assert distinct_n(samples, 1) == pytest.approx(4 / 8)
    assert distinct_n(samples, 2) == pytest.approx(3 / 6)  # (1,2) (2,1) (3,4) of 5+1
    # 4-grams of sample 1: 1212, 2121, 1212 -> one of three repeats; sample 2 has none.
    assert repetition_rate(samples, 4) == pytest.approx(1 / 3)
    assert distinct_n([], 2) == 0.0 and repetition_rate([[1]]) == 0.0


def test_model_cache_is_lru_and_sees_new_model_files(char_tok: Path, tmp_path: Path) -> None:
    runs = [save_random_run(tmp_path / f"r{i}", char_tok, "char_lstm") for i in range(3)]
    cache = ModelCache(capacity=2)
    a = cache.get(runs[0], "cpu")
    b = cache.get(runs[1], "cpu")
    assert cache.get(runs[0], "cpu") is a
    cache.get(runs[2], "cpu")  # evicts runs[1], the least recently used
    assert len(cache) == 2
    assert cache.get(runs[0], "cpu") is a
    assert cache.get(runs[1], "cpu") is not b
    model_file = runs[0] / "model.safetensors"
    st = model_file.stat()
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # retrained
    assert cache.get(runs[0], "cpu") is not a
