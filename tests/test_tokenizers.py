"""Tokenizers of every kind: training, stats, round trips, AutoTokenizer compatibility."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.corpus import CorpusConfig, prepare_corpus, split_path
from trainer.errors import UserError
from trainer.tokenizer import (
    MANIFEST_NAME,
    SPECIAL_TOKENS,
    TOKENIZERS,
    CharTokenizer,
    SentencePieceTokenizer,
    TokenizerConfig,
    TokenizerStats,
    load_tokenizer,
    measure,
    read_tokenizer_manifest,
    train_tokenizer,
)

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "bold",
    "jackdaws",
    "and",
    "zebras;",
    "kings,",
    "queens,",
    "knights!",
    "why?",
    "maybe:",
    "yes.",
]

CONFIGS = {
    "bpe": TokenizerConfig(tokenizer_kind="bpe", vocab_size=320, min_frequency=2),
    "spm-unigram": TokenizerConfig(
        tokenizer_kind="sentencepiece", vocab_size=150, spm_model_type="unigram", threads=1
    ),
    "spm-bpe": TokenizerConfig(
        tokenizer_kind="sentencepiece", vocab_size=150, spm_model_type="bpe", threads=1
    ),
    "char": TokenizerConfig(tokenizer_kind="char", vocab_size=64, min_frequency=1),
}
# Every character of this text occurs in the generated training lines.
SEEN_TEXT = "the lazy dog jumps over seven zebras; maybe kings quietly hex bold wizards?"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(600):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words).capitalize())
    root = tmp_path_factory.mktemp("corpus")
    (root / "gen.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root.parent / f"{root.name}-prepared"
    prepare_corpus("gen.txt", out, CorpusConfig(), root=root)
    return out


@dataclass(frozen=True)
class Trained:
    config: TokenizerConfig
    out: Path
    stats: TokenizerStats


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def trained(
    request: pytest.FixtureRequest, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    config = CONFIGS[request.param]
    out = tmp_path_factory.mktemp("tok") / request.param
    return Trained(config, out, train_tokenizer(corpus_dir, out, config))


def test_stats_and_manifest(trained: Trained) -> None:
    s, cfg = trained.stats, trained.config
    assert 0 < s.vocab_size <= cfg.vocab_size
    for rate in (s.coverage, s.unk_rate, s.oov_rate, s.char_coverage):
        assert 0.0 <= rate <= 1.0
    assert s.coverage == 1.0 and s.char_coverage == 1.0  # validation uses the same alphabet
    assert s.unk_rate == 0.0 and s.oov_rate == 0.0
    assert 0 < s.tokens_per_char <= 1.0 and s.tokens_per_word > 0
    assert s.chars > 0 and s.words > 0 and s.tokens > 0
    if cfg.tokenizer_kind == "char":
        assert s.tokens_per_char == 1.0
    else:
        assert s.tokens_per_char < 0.6  # subwords: clearly fewer tokens than characters
    manifest = json.loads((trained.out / MANIFEST_NAME).read_text())
    assert next(iter(manifest)) == "version" and manifest["version"] == 1
    assert manifest["kind"] == cfg.tokenizer_kind
    assert read_tokenizer_manifest(trained.out) == (cfg, s)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(trained.out))
    if cfg.tokenizer_kind == "sentencepiece":
        assert (trained.out / "tokenizer.model").is_file()


def test_round_trip_and_specials(trained: Trained, corpus_dir: Path) -> None:
    tok = load_tokenizer(trained.out)
    assert type(tok) is TOKENIZERS[trained.config.tokenizer_kind]
    assert tok.stats == trained.stats and tok.vocab_size == trained.stats.vocab_size
    assert [tok.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    ids = tok.encode(SEEN_TEXT)
    assert ids and all(i >= 4 for i in ids)  # no specials, no <unk>
    assert tok.decode(ids) == SEEN_TEXT
    assert tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special=True) == SEEN_TEXT
    validation = split_path(corpus_dir, "validation").read_text().splitlines()
    batch = tok.encode_batch(validation)
    assert batch == [tok.encode(line) for line in validation]
    assert [tok.decode(b) for b in batch] == validation
    if trained.config.tokenizer_kind == "bpe":  # byte level: anything round-trips exactly
        odd = "Ünïcode ✓ 中文 🦊\n\ttabs  and\r\nnew lines <pad>-less"
        assert tok.decode(tok.encode(odd)) == odd


def test_autotokenizer_loads_same_ids(trained: Trained, corpus_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained.out))
    tok = load_tokenizer(trained.out)
    assert hf.is_fast
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert len(hf) == tok.vocab_size
    texts = [
        SEEN_TEXT,
        "  two  spaces ",
        *split_path(corpus_dir, "test").read_text().splitlines()[:40],
    ]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids)
    assert hf.decode(tok.encode(SEEN_TEXT)) == SEEN_TEXT


def test_bpe_loads_next_to_a_qwen2_model_config(corpus_dir: Path, tmp_path: Path) -> None:
    # transformers 5 forces Qwen2Tokenizer for a folder with a qwen2 config.json; it rebuilds
    # the pipeline around our vocab/merges, so ours must be the same pipeline.
    from transformers import AutoTokenizer, Qwen2Config

    train_tokenizer(corpus_dir, tmp_path / "tok", CONFIGS["bpe"])
    tok = load_tokenizer(tmp_path / "tok")
    run_dir = tmp_path / "run"
    tok.save(run_dir)
    Qwen2Config(vocab_size=tok.vocab_size, bos_token_id=2, eos_token_id=3).save_pretrained(run_dir)
    hf = AutoTokenizer.from_pretrained(str(run_dir))
    assert type(hf).__name__ == "Qwen2Tokenizer"
    for text in (SEEN_TEXT, 'In 1599, 12345 men said: \'tis "odd"!\n\n  ok\ttab ✓ 中文 🦊'):
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_unknown_characters_are_measured(corpus_dir: Path, tmp_path: Path) -> None:
    train_tokenizer(corpus_dir, tmp_path / "c", CONFIGS["char"])
    tok = load_tokenizer(tmp_path / "c")
    assert isinstance(tok, CharTokenizer)
    assert tok.encode("a\u2603b") == [tok.encode("a")[0], tok.unk_id, tok.encode("b")[0]]
    s = measure(tok, "ab\u2603 \u2603\u2603 ok\nzz yes\n")  # 3 of 15 chars unknown
    assert (s.chars, s.words, s.tokens) == (15, 5, 15)
    assert s.coverage == pytest.approx(12 / 15)
    assert s.unk_rate == pytest.approx(3 / 15)
    assert s.oov_rate == pytest.approx(2 / 5)
    assert s.char_coverage == pytest.approx(1 - 1 / 10)
    assert s.tokens_per_word == 3.0


def test_char_vocab_is_most_frequent_first_and_capped(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(tokenizer_kind="char", vocab_size=10, min_frequency=1)
    stats = train_tokenizer(corpus_dir, tmp_path / "c", cfg)
    tok = load_tokenizer(tmp_path / "c")
    assert stats.vocab_size == 10 and stats.coverage < 1.0
    assert tok.id_to_token(4) == " "  # the most frequent character of the generated text
    assert tok.encode(" ") == [4]


def test_sentencepiece_needs_no_binaries(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    stats = train_tokenizer(corpus_dir, tmp_path / "s", CONFIGS["spm-bpe"])
    assert isinstance(load_tokenizer(tmp_path / "s"), SentencePieceTokenizer)
    assert stats.vocab_size <= CONFIGS["spm-bpe"].vocab_size


def test_threads_set_rayon_only_when_unset(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    train_tokenizer(corpus_dir, tmp_path / "a", TokenizerConfig(tokenizer_kind="char", threads=1))
    assert os.environ["RAYON_NUM_THREADS"] == "1"
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    train_tokenizer(corpus_dir, tmp_path / "b", TokenizerConfig(tokenizer_kind="char", threads=1))
    assert os.environ["RAYON_NUM_THREADS"] == "2"


def test_retrain_replaces_output_atomically(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    train_tokenizer(corpus_dir, out, TokenizerConfig(tokenizer_kind="char", vocab_size=20))
    train_tokenizer(corpus_dir, out, CONFIGS["bpe"])
    assert load_tokenizer(out).config == CONFIGS["bpe"]
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no temp or old dirs left behind


@pytest.mark.parametrize(
    "cfg",
    [
        TokenizerConfig(tokenizer_kind="bpe", vocab_size=100),
        TokenizerConfig(tokenizer_kind="char", vocab_size=4),
        TokenizerConfig(tokenizer_kind="char", min_frequency=0),
        TokenizerConfig(tokenizer_kind="char", threads=-1),
    ],
    ids=["bpe-too-small", "char-too-small", "min-frequency", "threads"],
)
def test_bad_config(cfg: TokenizerConfig, corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError):
        train_tokenizer(corpus_dir, tmp_path / "t", cfg)
    assert not (tmp_path / "t").exists()


def test_bad_inputs(corpus_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "wp").mkdir()
    (tmp_path / "wp" / MANIFEST_NAME).write_text(
        '{"version": 1, "kind": "wordpiece", "config": {}}'
    )
    with pytest.raises(UserError, match=r"Invalid enum value 'wordpiece' - at `\$.kind`"):
        read_tokenizer_manifest(tmp_path / "wp")
    with pytest.raises(UserError, match=re.escape("missing train.txt")):
        train_tokenizer(tmp_path / "nothing", tmp_path / "t", CONFIGS["char"])
    with pytest.raises(UserError, match=re.escape("missing mt_tokenizer.json")):
        load_tokenizer(tmp_path)
    # more characters than the vocabulary can hold: sentencepiece refuses, clearly
    with pytest.raises(UserError, match="Vocabulary size is smaller than required_chars"):
        train_tokenizer(
            corpus_dir,
            tmp_path / "t",
            TokenizerConfig(tokenizer_kind="sentencepiece", vocab_size=20),
        )


def test_a_manifest_written_before_the_settings_types_keeps_its_kind(
    trained: Trained, tmp_path: Path
) -> None:
    """Older mt_tokenizer.json files spell the config's kind `kind`, not `tokenizer_kind`."""
    manifest = json.loads((trained.out / MANIFEST_NAME).read_text())
    config = manifest["config"]
    config["kind"] = config.pop("tokenizer_kind")
    old = tmp_path / "old"
    shutil.copytree(trained.out, old)
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert read_tokenizer_manifest(old)[0] == trained.config
