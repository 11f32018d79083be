"""Request building: the flags and TOML keys of a run or tokenizer job (the flat fields of
the HTTP body, derived from the settings by protocol.flags), validated as the control
endpoint validates the body."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

import msgspec

from actors.cli.common import CliError
from actors.runtime.config import Settings
from protocol.flags import FlagError, field_message, given, load_toml, struct_fields
from protocol.requests import (
    UPSTREAM_ONLY,
    CorpusSource,
    GenerateRequest,
    TokenizerTrainRequest,
    TrainRequest,
    decode_flat,
    flat_fields,
)
from trainer.corpus import resolve_corpus_path
from trainer.errors import UserError

S = TypeVar("S", bound=msgspec.Struct)
R = TypeVar("R", TrainRequest, TokenizerTrainRequest)

TRAIN_FIELDS = [(f.name, f.info) for f in flat_fields(TrainRequest)]
TOKENIZER_FIELDS = [(f.name, f.info) for f in flat_fields(TokenizerTrainRequest)]
GENERATE_FIELDS = struct_fields(GenerateRequest, skip=("prompt", "user_id", *UPSTREAM_ONLY))


def convert(values: dict[str, object], struct: type[S]) -> S:
    """Validate like the control endpoint does; a CliError naming the field otherwise."""
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as e:
        raise CliError(field_message(e, struct.__name__), 2) from None


def request_from(args: argparse.Namespace, struct: type[R]) -> R:
    """The --config TOML file (if any, keys as in the HTTP body), overridden by the flags
    that were given; validated as the control endpoint validates the body."""
    fields = [(f.name, f.info) for f in flat_fields(struct)]
    try:
        values = load_toml(Path(args.config), fields, struct.__name__) if args.config else {}
    except FlagError as e:
        raise CliError(str(e), 2) from None
    values.update(given(args, fields))
    try:
        return decode_flat(values, struct)
    except msgspec.ValidationError as e:
        raise CliError(field_message(e, struct.__name__), 2) from None


def with_corpus_path(settings: Settings, req: R) -> R:
    """A corpus path that exists here (under the corpus root, or relative to the current
    folder) is checked against the corpus root and made relative to it, as the control
    endpoint does; one that does not exist here is left to the ingest actor, whose machine
    may see other files."""
    source: CorpusSource = req.source
    if not source.corpus_path:
        return req
    root = settings.corpus_root
    here = Path(source.corpus_path).expanduser()
    if not (root / here).exists() and here.exists():
        here = here.absolute()
    elif not (root / here).exists():
        return req
    try:
        real = resolve_corpus_path(root, str(here))
    except UserError as e:
        raise CliError(f"{e} (the corpus root is {root}: set MT_CORPUS_ROOT)", 2) from None
    rel = real.relative_to(root.resolve()).as_posix()
    return msgspec.structs.replace(req, source=msgspec.structs.replace(source, corpus_path=rel))
