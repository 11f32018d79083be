"""One source of truth: the same run asked for through every entry point — HTTP, the CLI's
flags, its TOML file, a raw XADD and `python -m trainer` — resolves to equal configurations,
with the settings given and with none given (the defaults)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from actors.cli.flags import request_from
from actors.cli.main import parser
from actors.client.submit import plan_train
from actors.runtime.config import Settings
from actors.runtime.connection import stream_entries
from actors.workers.trainer import train_config
from protocol.codec import FIELD, decode_command
from protocol.commands import CorpusIngest, ModelTrain, TokenizerTrain
from protocol.flags import struct_fields
from protocol.keys import Keys
from protocol.requests import TrainRequest, decode_flat, encode_flat, flat_fields
from protocol.settings import CorpusSettings, TokenizerSettings, TrainSettings
from tests.http_helpers import start_app
from trainer.__main__ import _parser as trainer_parser
from trainer.__main__ import corpus_config as trainer_corpus_config
from trainer.__main__ import train_config as trainer_train_config
from trainer.config import TrainConfig
from trainer.tokenizer import TokenizerConfig

# Non-default values for a spread of types: int, float, literal, optional int, bool.
# compile too: reachable from every entry point (it once was from none).
GIVEN: dict[str, object] = {
    "model_family": "llama",
    "max_seq_len": 64,
    "max_steps": 7,
    "batch_size": 4,
    "learning_rate": 0.001,
    "warmup_steps": 3,
    "checkpoint_every": 5,
    "early_stopping_patience": 2,
    "freeze_embed": True,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "precision": "fp32",
    "compile": "on",
    "seed": 7,
    "vocab_size": 300,
}
CASES = {"defaults": {}, "given": GIVEN}


def _flag_args(values: dict[str, object]) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            out += [flag, str(value)]
    return out


def _chain_configs(req: TrainRequest) -> tuple[TrainConfig, TokenizerConfig]:
    chain = plan_train(req, run_id="r1")
    train = next(c for c in chain if isinstance(c, ModelTrain))
    tok = next(c for c in chain if isinstance(c, TokenizerTrain))
    return train_config(train), msgspec.convert(tok, TokenizerConfig, from_attributes=True)


async def via_http(
    values: dict[str, object], redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> TrainConfig:
    settings = Settings(data_dir=tmp_path, corpus_root=tmp_path / "corpus", prefix=keys.prefix)
    async with start_app(settings, redis_url) as http:
        resp = await http.session.post("/runs/train", json={"corpus_name": "shakespeare", **values})
        assert resp.status == 202, await resp.text()
    [(_id, fields)] = stream_entries(await redis.xrange(keys.cmd("ingest")))
    ingest = decode_command("ingest", fields[FIELD.encode()])
    assert isinstance(ingest, CorpusIngest)
    train = next(c for c in ingest.rest if isinstance(c, ModelTrain))
    return train_config(train)


def via_cli_flags(values: dict[str, object]) -> TrainConfig:
    args = parser().parse_args(["train", "--corpus-name", "shakespeare", *_flag_args(values)])
    return _chain_configs(request_from(args, TrainRequest))[0]


def via_toml(values: dict[str, object], tmp_path: Path) -> TrainConfig:
    lines = ['corpus_name = "shakespeare"']
    for name, value in values.items():
        lines.append(f"{name} = {json.dumps(value)}")
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    args = parser().parse_args(["train", "--config", str(path)])
    return _chain_configs(request_from(args, TrainRequest))[0]


def via_xadd(values: dict[str, object]) -> TrainConfig:
    """What the Discord bot XADDs: only the fields it sets, as JSON."""
    train_fields = {f.name for f in msgspec.structs.fields(TrainSettings)}
    body = {
        "kind": "model.train",
        "command_id": "r1.trainer",
        "run_id": "r1",
        "corpus_id": "r1-corpus",
        "tokenizer_id": "r1-tok",
        **{k: v for k, v in values.items() if k in train_fields},
    }
    cmd = decode_command("trainer", json.dumps(body))
    assert isinstance(cmd, ModelTrain)
    return train_config(cmd)


def via_python_m_trainer(values: dict[str, object]) -> TrainConfig:
    train_fields = {f.name for f in msgspec.structs.fields(TrainSettings)}
    flags = _flag_args({k: v for k, v in values.items() if k in train_fields})
    args = trainer_parser().parse_args(
        ["train", "--corpus", "c", "--tokenizer", "t", "--out", "o", *flags]
    )
    return trainer_train_config(args)


@pytest.mark.parametrize("case", list(CASES))
async def test_every_entry_point_resolves_the_same_training_config(
    case: str, redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    values = CASES[case]
    resolved = {
        "http": await via_http(values, redis_url, redis, keys, tmp_path),
        "cli flags": via_cli_flags(values),
        "toml": via_toml(values, tmp_path),
        "xadd": via_xadd(values),
        "python -m trainer": via_python_m_trainer(values),
    }
    first = resolved["http"]
    for name, cfg in resolved.items():
        assert cfg == first, f"{name} differs from http"
    train_fields = {f.name for f in msgspec.structs.fields(TrainSettings)}
    for name, value in values.items():
        if name in train_fields:
            assert getattr(first, name) == value, name
    if not values:
        assert first == TrainConfig()  # nothing given: the settings' own defaults


# The corpus's knobs, read by ingest: how the files are read and what is done to the text.
CORPUS_GIVEN: dict[str, object] = {
    "corpus_format": "parquet",
    "text_field": "body",
    "lowercase": True,
    "seed": 7,
}


async def test_every_entry_point_gives_ingest_the_same_corpus_settings(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    expected = CorpusSettings(corpus_format="parquet", text_field="body", lowercase=True, seed=7)
    settings = Settings(data_dir=tmp_path, corpus_root=tmp_path / "corpus", prefix=keys.prefix)
    async with start_app(settings, redis_url) as http:
        body = {"corpus_name": "shakespeare", **CORPUS_GIVEN}
        resp = await http.session.post("/runs/train", json=body)
        assert resp.status == 202, await resp.text()
    [(_id, fields)] = stream_entries(await redis.xrange(keys.cmd("ingest")))
    queued = decode_command("ingest", fields[FIELD.encode()])
    xadd = decode_command(
        "ingest",
        json.dumps(
            {"kind": "corpus.ingest", "command_id": "r1.ingest", "run_id": "r1"}
            | {"corpus_id": "r1-corpus", "named": "shakespeare", **CORPUS_GIVEN}
        ),
    )
    toml = tmp_path / "run.toml"
    toml.write_text(
        'corpus_name = "shakespeare"\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in CORPUS_GIVEN.items())
    )
    flags = _flag_args(CORPUS_GIVEN)
    resolved = {
        "http": queued,
        "cli flags": request_from(
            parser().parse_args(["train", "--corpus-name", "shakespeare", *flags]), TrainRequest
        ).corpus,
        "toml": request_from(
            parser().parse_args(["train", "--config", str(toml)]), TrainRequest
        ).corpus,
        "xadd": xadd,
        "python -m trainer": trainer_corpus_config(
            trainer_parser().parse_args(["corpus", "src", "--out", "o", *flags])
        ),
    }
    for name, got in resolved.items():
        assert msgspec.convert(got, CorpusSettings, from_attributes=True) == expected, name


def test_the_tokenizer_and_corpus_settings_reach_their_configs_unchanged() -> None:
    req = decode_flat(
        {"corpus_name": "x", "tokenizer_kind": "char", "vocab_size": 64, "holdout_fraction": 0.2},
        TrainRequest,
    )
    chain = plan_train(req, run_id="r1")
    tok = next(c for c in chain if isinstance(c, TokenizerTrain))
    assert msgspec.convert(tok, TokenizerConfig, from_attributes=True) == TokenizerConfig(
        tokenizer_kind="char", vocab_size=64
    )
    assert req.corpus == CorpusSettings(validation_fraction=0.2)
    assert req.tokenizer == TokenizerSettings(tokenizer_kind="char", vocab_size=64)


def test_flat_bodies_round_trip_and_name_the_bad_field() -> None:
    req = decode_flat({"corpus_name": "x", **GIVEN, "holdout_fraction": 0.2}, TrainRequest)
    assert decode_flat(encode_flat(req), TrainRequest) == req
    assert req.train.seed == req.corpus.seed == 7  # one flat key feeds every group with it
    with pytest.raises(msgspec.ValidationError, match=r"- at `\$\.max_steps`"):
        decode_flat({"max_steps": 0}, TrainRequest)
    with pytest.raises(msgspec.ValidationError, match=r"- at `\$\.holdout_fraction`"):
        decode_flat({"holdout_fraction": 0.9}, TrainRequest)
    with pytest.raises(msgspec.ValidationError, match="unknown field `validation_fraction`"):
        decode_flat({"validation_fraction": 0.2}, TrainRequest)  # the API spells it holdout_


def test_a_knob_shared_by_groups_has_one_definition() -> None:
    """seed and threads appear in several groups of the flat body: same type, same default."""
    by_name: dict[str, list[msgspec.inspect.Field]] = {}
    for group in (CorpusSettings, TokenizerSettings, TrainSettings):
        for _, f in struct_fields(group):
            by_name.setdefault(f.name, []).append(f)
    shared = {name: fs for name, fs in by_name.items() if len(fs) > 1}
    assert set(shared) == {"seed", "threads"}
    for fs in shared.values():
        assert len({(repr(f.type), f.default) for f in fs}) == 1
    assert [f.name for f in flat_fields(TrainRequest)].count("seed") == 1


def test_python_m_trainer_keeps_its_short_flags() -> None:
    args = trainer_parser().parse_args(
        [
            *("train", "--corpus", "c", "--tokenizer", "t", "--out", "o", "--family", "qwen"),
            *("--lr", "0.01", "--epochs", "2", "--seq-len", "32", "--override", "n_layer=1"),
        ]
    )
    cfg = trainer_train_config(args)
    assert (cfg.model_family, cfg.learning_rate, cfg.num_epochs, cfg.max_seq_len) == (
        "qwen",
        0.01,
        2,
        32,
    )
    assert cfg.model_overrides == {"n_layer": 1}


def test_every_command_declares_the_header() -> None:
    """Base is field-less (a Struct inherits fields from one base only); each command
    declares command_id, user_id and requested_at, which the runtime relies on."""
    from protocol.commands import ACTOR_OF

    for typ in ACTOR_OF:
        names = {f.name for f in msgspec.structs.fields(typ)}
        assert {"command_id", "user_id", "requested_at", "run_id"} <= names, typ.__name__


def test_bad_flag_values_are_refused_naming_the_field() -> None:
    from actors.cli.common import CliError

    args = parser().parse_args(["train", "--corpus-name", "x", "--max-steps", "0"])
    with pytest.raises(CliError, match="max_steps"):
        request_from(args, TrainRequest)
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--model-family", "gpt5"])
    assert isinstance(parser(), argparse.ArgumentParser)
