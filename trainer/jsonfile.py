"""Our saved JSON files (corpus.json, mt_tokenizer.json, tokens.json, trainer.json,
manifest.json, model descriptions): written from msgspec Structs, read back by msgspec.

Python's json does the text on both sides: msgspec's JSON encoder writes NaN and infinity
as null, and these files record them as they are (a checkpoint's best_val_loss is inf
before the first validation; a diverged loss is NaN). msgspec.convert does the typing, so a
bad file fails with the file's name and the path of the bad field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import msgspec

from trainer.errors import UserError

T = TypeVar("T")


class BadFile(UserError):
    """A saved file that is unreadable, not JSON, of another version or of the wrong shape."""


class _Versioned(msgspec.Struct):
    version: int = 1  # files written before formats carried a version are version 1


def dumps(obj: object, indent: int = 2) -> str:
    """JSON text of a Struct (or dataclass, or plain data), NaN/inf kept as Python writes them."""
    return (
        json.dumps(msgspec.to_builtins(obj), indent=indent, ensure_ascii=False, allow_nan=True)
        + "\n"
    )


def load_json(path: Path) -> object:
    """The decoded JSON of path, untyped (see from_json). FileNotFoundError passes through."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise BadFile(f"unreadable {path}: {e}") from None


def from_json(raw: object, type_: type[T], path: Path, version: int | None = None) -> T:
    """raw (load_json of path) as type_; with `version`, a file of another version is refused
    before its shape is checked."""
    try:
        if version is not None:
            found = msgspec.convert(raw, _Versioned).version
            if found != version:
                raise BadFile(f"{path} has format version {found}; this trainer reads {version}")
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        raise BadFile(f"corrupt {path}: {e}") from None


def read_json(path: Path, type_: type[T], version: int | None = None) -> T:
    return from_json(load_json(path), type_, path, version)
