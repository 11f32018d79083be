"""Tokenizers: byte-level BPE, SentencePiece (unigram/bpe) and characters, one interface.

Every kind is trained on the corpus train split only, measured on the validation split, and
saved as an HF `tokenizer.json` (+ tokenizer_config.json) so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it, next to our manifest
`mt_tokenizer.json`. The special tokens <pad>, <unk>, <bos>, <eos> have ids 0..3 in every kind.
Our classes encode with the native libraries (Rust `tokenizers`, C++ sentencepiece), which
are multithreaded for batches; nothing here imports torch or transformers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import msgspec
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from protocol.settings import SpmModelType, TokenizerKind, TokenizerSettings
from trainer.corpus import publish_dir, split_path, write_json
from trainer.errors import UserError
from trainer.jsonfile import read_json

KINDS: tuple[TokenizerKind, ...] = ("bpe", "sentencepiece", "char")
SPM_MODEL_TYPES: tuple[SpmModelType, ...] = ("unigram", "bpe")

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MANIFEST_VERSION = 1
MANIFEST_NAME = "mt_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
SPM_MODEL_FILE = "tokenizer.model"
MAX_VOCAB_SIZE = 200_000  # protocol.settings.VocabSize
_SPM_SPACE = "\u2581"  # "▁", sentencepiece's visible space


class TokenizerConfig(TokenizerSettings, kw_only=True):
    """What to train: the tokenizer settings (protocol.settings) plus what ingest did.
    `min_frequency` applies to bpe merges and char vocabularies; sentencepiece has no such
    knob (its `character_coverage` drops rare characters)."""

    lowercase: bool = False  # informational: lowercasing happens at corpus ingest

    def validate(self) -> None:
        if self.tokenizer_kind not in KINDS:
            raise UserError(
                f"unknown tokenizer kind {self.tokenizer_kind!r}; choose one of {KINDS}"
            )
        if self.spm_model_type not in SPM_MODEL_TYPES:
            raise UserError(
                f"unknown sentencepiece model type {self.spm_model_type!r}; "
                f"choose one of {SPM_MODEL_TYPES}"
            )
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise UserError(f"vocab_size must be {MAX_VOCAB_SIZE} or less, got {self.vocab_size}")
        self.check()  # the least vocabulary of the kind (protocol.settings.MIN_VOCAB)
        if self.min_frequency < 1:
            raise UserError(f"min_frequency must be at least 1, got {self.min_frequency}")
        if self.threads < 0:
            raise UserError(f"threads must be 0 (all cores) or more, got {self.threads}")


class TokenizerStats(msgspec.Struct, frozen=True, kw_only=True):
    """Measured on held-out text. Rates are fractions in [0, 1]."""

    vocab_size: int
    coverage: float  # fraction of characters not mapped to <unk>
    unk_rate: float  # <unk> tokens / tokens
    oov_rate: float  # fraction of words that contain a character mapped to <unk>
    char_coverage: float  # fraction of distinct characters representable without <unk>
    tokens_per_char: float
    tokens_per_word: float
    chars: int
    words: int
    tokens: int
    train_seconds: float = 0.0


class TokenizerManifest(msgspec.Struct, frozen=True, kw_only=True):
    """mt_tokenizer.json."""

    version: int = MANIFEST_VERSION
    kind: TokenizerKind
    config: TokenizerConfig
    stats: TokenizerStats | None = None


class Tokenizer:
    """A tokenizer backed by an HF `tokenizers.Tokenizer` (the file AutoTokenizer loads).

    encode/encode_batch never add special tokens; decode keeps them unless skip_special.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(
        self, hf: HFTokenizer, config: TokenizerConfig, stats: TokenizerStats | None = None
    ) -> None:
        self.hf = hf
        self.config = config
        self.stats = stats

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking; Rust spreads the batch over RAYON threads.
        return [
            list(e.ids) for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special))

    def id_to_token(self, i: int) -> str | None:
        token = self.hf.id_to_token(i)
        return None if token is None else str(token)

    @classmethod
    def train(cls, train_file: Path, config: TokenizerConfig) -> Self:
        raise NotImplementedError(f"{cls.__name__} cannot be trained; use a concrete kind")

    @classmethod
    def load(
        cls, directory: Path, config: TokenizerConfig, stats: TokenizerStats | None = None
    ) -> Self:
        return cls(_load_hf(directory), config, stats)

    def save(self, directory: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and mt_tokenizer.json into directory."""
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / HF_TOKENIZER_FILE))
        pad, unk, bos, eos = SPECIAL_TOKENS
        write_json(
            directory / HF_CONFIG_FILE,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": pad,
                "unk_token": unk,
                "bos_token": bos,
                "eos_token": eos,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
            },
        )
        manifest = TokenizerManifest(
            kind=self.config.tokenizer_kind, config=self.config, stats=self.stats
        )
        write_json(directory / MANIFEST_NAME, manifest)


def _load_hf(directory: Path) -> HFTokenizer:
    path = directory / HF_TOKENIZER_FILE
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for missing or bad files
        raise UserError(f"cannot load tokenizer file {path}: {e}") from None


def _add_specials(hf: HFTokenizer) -> None:
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])


# The Qwen2 split (GPT-4 style: single digits, letters with one leading mark, punctuation
# runs). transformers 5 loads any tokenizer in a folder whose config.json says model_type
# "qwen2" as Qwen2Tokenizer, which rebuilds NFC + this split + ByteLevel around our vocab and
# merges; using the same pipeline makes AutoTokenizer give our ids in every model family.
_BPE_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class BPETokenizer(Tokenizer):
    """Byte-level BPE: every string is representable, nothing maps to <unk>; NFC text
    round-trips exactly."""

    @classmethod
    def train(cls, train_file: Path, config: TokenizerConfig) -> Self:
        hf = HFTokenizer(models.BPE())
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_BPE_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train([str(train_file)], trainer)
        _add_specials(hf)
        return cls(hf, config)


class CharTokenizer(Tokenizer):
    """One token per character: the most frequent characters of the train split."""

    @classmethod
    def train(cls, train_file: Path, config: TokenizerConfig) -> Self:
        counts: Counter[str] = Counter()
        with train_file.open(encoding="utf-8") as f:
            while chunk := f.read(1 << 20):
                counts.update(chunk)
        ranked = sorted(
            (c for c, n in counts.items() if n >= config.min_frequency),
            key=lambda c: (-counts[c], c),
        )
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for c in ranked[: config.vocab_size - len(SPECIAL_TOKENS)]:
            vocab[c] = len(vocab)
        return cls(cls.build(vocab), config)

    @staticmethod
    def build(vocab: dict[str, int]) -> HFTokenizer:
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[UNK_ID]))
        hf.normalizer = normalizers.NFC()
        # Every code point on its own, newlines and spaces included; Fuse joins them back.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        _add_specials(hf)
        return hf


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece unigram or bpe, trained line by line with the Python package.

    Encoding runs in sentencepiece itself; tokenizer.json is an exact HF mirror of the model
    (identity normalization + NFC, a dummy prefix space, no whitespace collapsing), so
    AutoTokenizer gives the same ids. Lines are the training unit: a newline inside the text
    is not a piece (the data pipeline separates lines with <eos>).
    """

    def __init__(
        self,
        hf: HFTokenizer,
        config: TokenizerConfig,
        stats: TokenizerStats | None = None,
        *,
        model: bytes,
    ) -> None:
        import sentencepiece as spm

        super().__init__(hf, config, stats)
        self.model = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.threads = config.threads or (os.cpu_count() or 1)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(unicodedata.normalize("NFC", text)))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        batch = [unicodedata.normalize("NFC", t) for t in texts]
        return [list(ids) for ids in self.sp.encode(batch, num_threads=self.threads)]

    @classmethod
    def train(cls, train_file: Path, config: TokenizerConfig) -> Self:
        import io

        import sentencepiece as spm

        def lines() -> Iterator[str]:
            with train_file.open(encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")

        # sentencepiece's advice: full character coverage for small alphabets, 0.9995 for
        # large ones (CJK) where the rarest characters would crowd out useful pieces.
        alphabet: set[str] = set()
        with train_file.open(encoding="utf-8") as f:
            while chunk := f.read(1 << 20):
                alphabet.update(chunk)
        character_coverage = 1.0 if len(alphabet) <= 1000 else 0.9995

        pad, unk, bos, eos = SPECIAL_TOKENS
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(),
                model_writer=model,
                model_type=config.spm_model_type,
                vocab_size=config.vocab_size,
                hard_vocab_limit=False,  # a small corpus gets a smaller vocab, not an error
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece=pad,
                unk_piece=unk,
                bos_piece=bos,
                eos_piece=eos,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                byte_fallback=False,
                character_coverage=character_coverage,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                max_sentence_length=1 << 16,
                num_threads=config.threads or (os.cpu_count() or 1),
                minloglevel=2,
            )
        except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
            reason = str(e).split("] ", 1)[-1]  # drop the C++ file:line and the check
            raise UserError(f"sentencepiece training failed: {reason}") from None
        data = model.getvalue()
        return cls(cls.build(data, config.spm_model_type), config, model=data)

    @staticmethod
    def build(model: bytes, model_type: SpmModelType) -> HFTokenizer:
        """The HF tokenizers equivalent of a sentencepiece model trained by `train`."""
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=model)
        pieces = [
            (str(sp.id_to_piece(i)), float(sp.get_score(i))) for i in range(sp.get_piece_size())
        ]
        hf_model: models.Model
        if model_type == "unigram":
            hf_model = models.Unigram(pieces, unk_id=UNK_ID, byte_fallback=False)
        else:
            # spm bpe pieces are listed in merge order: rank each merge by its result's id.
            vocab = {p: i for i, (p, _) in enumerate(pieces)}
            merges: list[tuple[str, str]] = []
            for piece, _ in pieces:
                splits = [
                    (piece[:k], piece[k:])
                    for k in range(1, len(piece))
                    if piece[:k] in vocab and piece[k:] in vocab
                ]
                merges.extend(sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]])))
            hf_model = models.BPE(
                vocab, merges, unk_token=SPECIAL_TOKENS[UNK_ID], fuse_unk=True, byte_fallback=False
            )
        hf = HFTokenizer(hf_model)
        # Prepend in the normalizer, not in Metaspace: Metaspace skips its prefix when the
        # text already starts with a space, sentencepiece does not.
        hf.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.Prepend(_SPM_SPACE),
                normalizers.Replace(" ", _SPM_SPACE),
            ]
        )
        hf.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPM_SPACE, prepend_scheme="never", split=True
        )
        hf.decoder = decoders.Metaspace(replacement=_SPM_SPACE, prepend_scheme="always", split=True)
        _add_specials(hf)
        return hf

    @classmethod
    def load(
        cls, directory: Path, config: TokenizerConfig, stats: TokenizerStats | None = None
    ) -> Self:
        path = directory / SPM_MODEL_FILE
        try:
            model = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read sentencepiece model {path}: {e}") from None
        return cls(_load_hf(directory), config, stats, model=model)

    def save(self, directory: Path) -> None:
        super().save(directory)
        (directory / SPM_MODEL_FILE).write_bytes(self.model)


TOKENIZERS: dict[TokenizerKind, type[Tokenizer]] = {
    "bpe": BPETokenizer,
    "sentencepiece": SentencePieceTokenizer,
    "char": CharTokenizer,
}


def measure(tok: Tokenizer, text: str) -> TokenizerStats:
    """Stats of `tok` on `text`, encoded line by line as the data pipeline does."""
    lines = [line for line in text.split("\n") if line]
    encoded = tok.encode_batch(lines)
    tokens = sum(len(ids) for ids in encoded)
    unks = sum(ids.count(tok.unk_id) for ids in encoded)
    # Counted over the whole text at once (C speed): the same characters as the lines hold.
    counts = Counter(text)
    del counts["\n"]
    chars = sum(counts.values())
    distinct = sorted(counts)
    unknown = {
        c for c, ids in zip(distinct, tok.encode_batch(distinct), strict=True) if tok.unk_id in ids
    }
    words = text.split()
    oov = sum(1 for w in words if not unknown.isdisjoint(w)) if unknown else 0
    return TokenizerStats(
        vocab_size=tok.vocab_size,
        coverage=1.0 - sum(counts[c] for c in unknown) / chars if chars else 0.0,
        unk_rate=unks / tokens if tokens else 0.0,
        oov_rate=oov / len(words) if words else 0.0,
        char_coverage=1.0 - len(unknown) / len(distinct) if distinct else 0.0,
        tokens_per_char=tokens / chars if chars else 0.0,
        tokens_per_word=tokens / len(words) if words else 0.0,
        chars=chars,
        words=len(words),
        tokens=tokens,
    )


# Stats are measured on the first lines of the validation split, up to this many characters.
STATS_MAX_CHARS = 200_000


def train_tokenizer(corpus_dir: Path, out_dir: Path, config: TokenizerConfig) -> TokenizerStats:
    """Train on corpus_dir/train.txt, measure on validation.txt, write out_dir atomically."""
    config.validate()
    train_file, validation_file = (
        split_path(corpus_dir, "train"),
        split_path(corpus_dir, "validation"),
    )
    for path in (train_file, validation_file):
        if not path.is_file():
            raise UserError(f"no prepared corpus at {corpus_dir} (missing {path.name})")
    if train_file.stat().st_size == 0:
        raise UserError(f"the train split {train_file} is empty")
    if config.threads > 0:
        # Read once, when the Rust thread pool starts: the first parallel call in a process.
        os.environ.setdefault("RAYON_NUM_THREADS", str(config.threads))

    started = time.perf_counter()
    tok = TOKENIZERS[config.tokenizer_kind].train(train_file, config)
    train_seconds = time.perf_counter() - started
    held_out = validation_file.read_text(encoding="utf-8")
    if len(held_out) > STATS_MAX_CHARS:  # a sample of whole lines is plenty for rates
        held_out = held_out[: held_out.rfind("\n", 0, STATS_MAX_CHARS) + 1] or held_out
    stats = msgspec.structs.replace(measure(tok, held_out), train_seconds=round(train_seconds, 3))
    tok.stats = stats

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tok.save(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def read_tokenizer_manifest(directory: Path) -> tuple[TokenizerConfig, TokenizerStats | None]:
    try:
        manifest = read_json(directory / MANIFEST_NAME, TokenizerManifest, MANIFEST_VERSION)
    except FileNotFoundError:
        raise UserError(f"no trained tokenizer at {directory} (missing {MANIFEST_NAME})") from None
    # The top-level kind is authoritative: manifests written before the settings types
    # spell the config's field `kind`, which the config would otherwise leave at its default.
    config = msgspec.structs.replace(manifest.config, tokenizer_kind=manifest.kind)
    config.validate()
    return config, manifest.stats


def load_tokenizer(directory: Path) -> Tokenizer:
    config, stats = read_tokenizer_manifest(directory)
    return TOKENIZERS[config.tokenizer_kind].load(directory, config, stats)
