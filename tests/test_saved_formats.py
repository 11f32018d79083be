"""Every saved format is a versioned msgspec Struct: it round-trips, a bad file fails with
an error naming the file and the field, a file written before formats had a version loads
as version 1; and the training child's messages to its parent round-trip."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import torch
from torch import nn

from actors.workers.trainer import (
    ChildError,
    ChildMessage,
    ChildProgress,
    ChildResult,
    ChildStarted,
    ChildUserError,
    completed_event,
    decode_message,
    encode_message,
    progress_event,
    started_event,
)
from protocol.commands import ModelTrain
from protocol.events import Sample
from trainer.checkpoint import CheckpointMeta, TrainState, load_checkpoint, save_checkpoint
from trainer.corpus import MANIFEST_VERSION as CORPUS_VERSION
from trainer.corpus import CorpusConfig, load_corpus_manifest, prepare_corpus
from trainer.data import META_NAME, TOKENS_VERSION, TokenFiles, encode_splits, load_token_data
from trainer.jsonfile import BadFile, dumps, read_json
from trainer.manifest import DataRef, RunManifest, TokenizerRef, read_manifest, write_manifest
from trainer.model import MT_MODEL_FILE, ModelConfig, MtModelFile, build_model, read_model_config
from trainer.model import save_model as save_model_dir
from trainer.report import Progress, StartInfo, TrainResult
from trainer.tokenizer import TokenizerConfig, read_tokenizer_manifest, train_tokenizer
from trainer.tracking import TRACKING_NAME, TrackingRecord, read_record

MAX = sys.float_info.max
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(40))


@dataclass
class Saved:
    path: Path  # the file
    read: Callable[[], object]  # reads it back the way its users do
    expected: object  # what was written
    field: tuple[str, ...]  # a field to break, and its msgspec path
    bad: object  # a wrong-typed (or invalid) value for it
    where: str  # how the error names it (msgspec writes a dict key as [...])
    version: int = 1  # the format's version now


def _corpus(tmp: Path) -> Path:
    (tmp / "book.txt").write_text(TEXT)
    prepare_corpus(tmp / "book.txt", tmp / "corpus", CorpusConfig())
    return tmp / "corpus"


def _tokenizer(tmp: Path) -> tuple[Path, Path]:
    corpus = _corpus(tmp)
    train_tokenizer(
        corpus, tmp / "tok", TokenizerConfig(tokenizer_kind="char", vocab_size=64, threads=1)
    )
    return corpus, tmp / "tok"


def corpus_json(tmp: Path) -> Saved:
    (tmp / "book.txt").write_text(TEXT)
    m = prepare_corpus(tmp / "book.txt", tmp / "corpus", CorpusConfig())
    read = lambda: load_corpus_manifest(tmp / "corpus")  # noqa: E731
    return Saved(
        tmp / "corpus" / "corpus.json",
        read,
        m,
        ("splits", "train", "bytes"),
        "many",
        "$.splits[...].bytes",
        CORPUS_VERSION,
    )


def tokenizer_json(tmp: Path) -> Saved:
    corpus = _corpus(tmp)
    cfg = TokenizerConfig(tokenizer_kind="char", vocab_size=64, threads=1)
    stats = train_tokenizer(corpus, tmp / "tok", cfg)
    read = lambda: read_tokenizer_manifest(tmp / "tok")  # noqa: E731
    return Saved(
        tmp / "tok" / "mt_tokenizer.json",
        read,
        (cfg, stats),
        ("stats", "coverage"),
        "x",
        "$.stats.coverage",
    )


def tokens_json(tmp: Path) -> Saved:
    corpus, tok = _tokenizer(tmp)
    info = encode_splits(corpus, tok, tmp / "tokens", threads=1)
    path = tmp / "tokens" / META_NAME
    read = lambda: read_json(path, TokenFiles, TOKENS_VERSION)  # noqa: E731
    return Saved(path, read, info.meta, ("tokens", "train"), "12", "$.tokens[...]")


def trainer_json(tmp: Path) -> Saved:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    # inf: best_val_loss before the first validation; it must survive the round trip.
    state = TrainState(step=7, micro_step=7, tokens=70, losses=[2.5, 2.0], val_history=[(5, 2.2)])
    meta = CheckpointMeta(state=state, config={"batch_size": 8}, data_fingerprint="f" * 64)
    ckpt = save_checkpoint(tmp / "ckpt", model, {}, meta)
    read = lambda: load_checkpoint(ckpt, nn.Linear(3, 2)).meta  # noqa: E731
    return Saved(ckpt / "trainer.json", read, meta, ("state", "step"), 7.5, "$.state.step")


def manifest_json(tmp: Path) -> Saved:
    manifest = RunManifest(
        status="completed",
        config={"batch_size": 8},
        model={"family": "gpt2", "parameters": 1000},
        tokenizer=TokenizerRef(dir="/t", vocab_size=64, sha256="a" * 64),
        data=DataRef(dir="/d", tokens={"train": 10, "validation": 2, "test": 2}, fingerprint="f"),
        seed=1,
        device="cpu",
        precision="fp32",
        started_at="2024-01-01T00:00:00+00:00",
        train_loss=800.0,
        train_ppl=math.inf,  # perplexity of a huge loss: written and read back as is
    )
    write_manifest(tmp, manifest)
    read = lambda: read_manifest(tmp)  # noqa: E731
    return Saved(tmp / "manifest.json", read, manifest, ("data", "tokens"), [1, 2], "$.data.tokens")


def char_lstm_config_json(tmp: Path) -> Saved:
    cfg = ModelConfig(family="char_lstm", vocab_size=40, max_seq_len=32)
    save_model_dir(build_model(cfg), cfg, tmp / "m")
    read = lambda: read_model_config(tmp / "m")  # noqa: E731
    return Saved(tmp / "m" / "config.json", read, cfg, ("dims", "hidden"), "wide", "$.dims.hidden")


def mt_model_json(tmp: Path) -> Saved:
    # The description we keep beside an HF model's own config.json (no weights needed here).
    (tmp / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    cfg = ModelConfig(family="gpt2", vocab_size=300, overrides={"n_layer": 2})
    (tmp / MT_MODEL_FILE).write_text(dumps(MtModelFile(config=cfg)))
    read = lambda: read_model_config(tmp)  # noqa: E731
    return Saved(tmp / MT_MODEL_FILE, read, cfg, ("config", "family"), "bert", "$.config.family")


def tracking_json(tmp: Path) -> Saved:
    record = TrackingRecord(mlflow_run_id="0123abcd")
    (tmp / TRACKING_NAME).write_text(dumps(record))
    read = lambda: read_record(tmp)  # noqa: E731
    return Saved(tmp / TRACKING_NAME, read, record, ("mlflow_run_id",), 12, "$.mlflow_run_id")


FORMATS: dict[str, Callable[[Path], Saved]] = {
    "corpus.json": corpus_json,
    "mt_tokenizer.json": tokenizer_json,
    "tokens.json": tokens_json,
    "trainer.json": trainer_json,
    "manifest.json": manifest_json,
    "char_lstm config.json": char_lstm_config_json,
    "mt_model.json": mt_model_json,
    "tracking.json": tracking_json,
}


def _edit(path: Path, change: Callable[[dict[str, object]], object]) -> None:
    raw = json.loads(path.read_text())
    assert isinstance(raw, dict)
    change(raw)
    path.write_text(json.dumps(raw))


def _set(raw: dict[str, object], keys: tuple[str, ...], value: object) -> None:
    node = raw
    for key in keys[:-1]:
        child = node[key]
        assert isinstance(child, dict)
        node = child
    node[keys[-1]] = value


@pytest.fixture(params=list(FORMATS))
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> Saved:
    make = FORMATS[request.param]
    return make(tmp_path)


def test_round_trips_and_starts_with_its_version(saved: Saved) -> None:
    assert saved.read() == saved.expected
    raw = json.loads(saved.path.read_text())
    assert next(iter(raw)) == "version" and raw["version"] == saved.version


def test_a_wrong_typed_field_is_named_with_the_file(saved: Saved) -> None:
    _edit(saved.path, lambda raw: _set(raw, saved.field, saved.bad))
    with pytest.raises(BadFile) as caught:
        saved.read()
    message = str(caught.value)
    assert str(saved.path) in message
    assert f"`{saved.where}`" in message


def test_a_file_that_is_not_json_is_named(saved: Saved) -> None:
    saved.path.write_text('{"version": 1, "trunc')
    with pytest.raises(BadFile, match=re.escape(str(saved.path))):
        saved.read()


def test_a_file_without_a_version_loads_as_version_1(saved: Saved) -> None:
    _edit(saved.path, lambda raw: raw.pop("version"))
    if saved.version == 1:
        assert saved.read() == saved.expected
    else:  # a format past its first version refuses a file of its first
        with pytest.raises(BadFile, match="format version 1; this trainer reads"):
            saved.read()


def test_another_version_is_refused(saved: Saved) -> None:
    _edit(saved.path, lambda raw: _set(raw, ("version",), 99))
    with pytest.raises(BadFile, match=re.escape(str(saved.path)) + ".*format version 99"):
        saved.read()


def test_a_corpus_manifest_missing_a_split_is_refused(tmp_path: Path) -> None:
    case = corpus_json(tmp_path)

    def drop_test(raw: dict[str, object]) -> None:
        splits = raw["splits"]
        assert isinstance(splits, dict)
        del splits["test"]

    _edit(case.path, drop_test)
    with pytest.raises(BadFile, match=r"no split test - at `\$\.splits`"):
        case.read()


def test_a_bad_token_cache_is_encoded_again(tmp_path: Path) -> None:
    case = tokens_json(tmp_path)
    _edit(case.path, lambda raw: _set(raw, case.field, case.bad))
    assert load_token_data(case.path.parent) is None  # and encode_splits rebuilds it


# ------------------------------------------------------------------ training child -> parent

PROGRESS = Progress(
    step=3,
    epoch=1,
    total_epochs=2,
    total_steps=10,
    loss=2.5,
    lr=1e-3,
    grad_norm=math.inf,
    tokens_per_s=100.0,
    samples_per_s=4.0,
    val_loss=math.nan,
    val_ppl=None,
    elapsed_s=1.5,
    samples=[Sample(prompt="The river", text=" ran\npast"), Sample(prompt="In", text="")],
)
RESULT = TrainResult(
    status="early_stopped",
    steps=10,
    total_steps=10,
    tokens=1000,
    train_loss=math.nan,
    val_loss=2.0,
    val_ppl=7.4,
    test_loss=None,
    test_ppl=None,
    best_step=None,
    best_val_loss=None,
    tokens_per_s=-math.inf,
    resumed_from_step=4,
    elapsed_s=9.0,
    losses=[],
    val_history=[],
)
START = StartInfo(
    device="cpu",
    precision="fp32",
    parameters=1234,
    total_steps=10,
    total_epochs=2,
    resumed_from_step=4,
)


@pytest.mark.parametrize(
    "msg",
    [
        ChildStarted(START),
        ChildProgress(PROGRESS),
        ChildResult(RESULT),
        ChildUserError("bad corpus"),
        ChildError("RuntimeError: boom", "Traceback ..."),
    ],
    ids=lambda m: type(m).__name__,
)
def test_child_messages_round_trip(msg: ChildMessage) -> None:
    back = decode_message(encode_message(msg))
    assert type(back) is type(msg)
    # NaN != NaN: compare the encodings, which keep NaN/inf as they are.
    assert encode_message(back) == encode_message(msg)


def test_events_clamp_what_json_cannot_hold() -> None:
    p = progress_event(PROGRESS)
    assert p.grad_norm == MAX and p.val_loss == MAX and p.val_ppl is None
    assert (p.step, p.loss, p.lr, p.tokens_per_s) == (3, 2.5, 1e-3, 100.0)
    assert p.samples == PROGRESS.samples  # a validation's samples reach its event
    done = completed_event(RESULT)
    assert done.train_loss == MAX and done.tokens_per_s == -MAX
    assert (done.status, done.early_stopped, done.best_step, done.test_loss) == (
        "early_stopped",
        True,
        0,
        None,
    )


def test_events_carry_the_recipe_threads_flops_and_mfu() -> None:
    """What the child measured (recipe, threads, FLOPs, MFU) reaches the events; a
    non-finite figure is clamped like every other float."""
    cmd = ModelTrain(command_id="c1", run_id="r1", corpus_id="k1", tokenizer_id="t1", threads=3)
    recipe = "bf16: 1.41x fp32, val loss +0.3%; compile: pays back after 120 of 500 steps"
    info = msgspec.structs.replace(
        START,
        precision="bf16",
        compile=True,
        recipe=recipe,
        threads=2,
        flops_per_token=4.5e6,
        peak_flops=math.inf,
    )
    started = started_event(cmd, info)
    assert (started.precision, started.compile, started.recipe) == ("bf16", True, recipe)
    assert (started.threads, started.flops_per_token, started.peak_flops) == (2, 4.5e6, MAX)
    # A child that does not say how many threads it uses: the command's figure, as before.
    assert started_event(cmd, START).threads == 3
    assert (started_event(cmd, START).compile, started_event(cmd, START).recipe) == (False, "")

    assert progress_event(msgspec.structs.replace(PROGRESS, mfu=0.123)).mfu == 0.123
    assert progress_event(msgspec.structs.replace(PROGRESS, mfu=math.nan)).mfu == MAX
    assert progress_event(PROGRESS).mfu is None
    assert completed_event(msgspec.structs.replace(RESULT, mfu=0.25)).mfu == 0.25
    assert completed_event(RESULT).mfu is None
