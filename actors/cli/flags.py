"""Request building: a flag per field of a request Struct, a TOML file of its fields, and
their validation (the same as the control endpoint's)."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import TypeVar

import msgspec
import msgspec.inspect as mi

from actors.cli.common import CliError
from actors.runtime.config import Settings
from protocol.requests import TokenizerFields
from trainer.corpus import resolve_corpus_path
from trainer.errors import UserError

S = TypeVar("S", bound=msgspec.Struct)
F = TypeVar("F", bound=TokenizerFields)


def _strip_optional(t: mi.Type) -> mi.Type:
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1:
            return rest[0]
    return t


def _bounds(t: mi.Type) -> str:
    if not isinstance(t, mi.IntType | mi.FloatType):
        return ""
    low = f">={t.ge}" if t.ge is not None else (f">{t.gt}" if t.gt is not None else "")
    high = f"<={t.le}" if t.le is not None else (f"<{t.lt}" if t.lt is not None else "")
    return " ".join(b for b in (low, high) if b)


def add_request_flags(p: argparse.ArgumentParser, struct: type[msgspec.Struct]) -> None:
    """One flag per field of the request (--model-family, --max-steps, --lowercase/--no-...);
    flags not given are absent, so a TOML file's values stand."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    group = p.add_argument_group(f"{struct.__name__} fields (override the --config file)")
    for f in info.fields:
        t = _strip_optional(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not msgspec.NODEFAULT else None
        bounds = _bounds(t)
        help_text = f"default {default!r}" + (f"; {bounds}" if bounds else "")
        dest = f"req_{f.name}"
        if isinstance(t, mi.BoolType):
            group.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif isinstance(t, mi.LiteralType):
            group.add_argument(
                flag, dest=dest, choices=[str(v) for v in t.values], default=None, help=help_text
            )
        elif isinstance(t, mi.IntType):
            group.add_argument(flag, dest=dest, type=int, metavar="N", default=None, help=help_text)
        elif isinstance(t, mi.FloatType):
            group.add_argument(
                flag, dest=dest, type=float, metavar="X", default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=dest, metavar="TEXT", default=None, help=help_text)


def field_message(e: msgspec.ValidationError, what: str) -> str:
    text = str(e)
    if m := re.fullmatch(r"(.*) - at `\$\.([^`]+)`", text, flags=re.S):
        return f"invalid {m[2]}: {m[1]}"
    if m := re.fullmatch(r"Object contains unknown field `([^`]+)`.*", text, flags=re.S):
        return f"unknown field {m[1]!r}: not a field of {what}"
    return f"invalid {what}: {text}"


def convert(values: dict[str, object], struct: type[S]) -> S:
    """Validate like the control endpoint does; a CliError naming the field otherwise."""
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as e:
        raise CliError(field_message(e, struct.__name__), 2) from None


def load_toml(path: Path, struct: type[msgspec.Struct]) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}", 2) from None
    except tomllib.TOMLDecodeError as e:
        raise CliError(f"{path}: not valid TOML: {e}", 2) from None
    values = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in msgspec.structs.fields(struct)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(
            f"{path}: unknown key(s) {', '.join(unknown)}; keys are {struct.__name__} fields "
            f"({', '.join(sorted(known))})",
            2,
        )
    return values


def request_from(args: argparse.Namespace, struct: type[S]) -> S:
    """The --config TOML file (if any), overridden by the flags that were given."""
    values = load_toml(Path(args.config), struct) if args.config else {}
    for f in msgspec.structs.fields(struct):
        given = getattr(args, f"req_{f.name}", None)
        if given is not None:
            values[f.name] = given
    return convert(values, struct)


def with_corpus_path(settings: Settings, req: F) -> F:
    """A corpus path that exists here (under the corpus root, or relative to the current
    folder) is checked against the corpus root and made relative to it, as the control
    endpoint does; one that does not exist here is left to the ingest actor, whose machine
    may see other files."""
    given = req.corpus_path
    if not given:
        return req
    root = settings.corpus_root
    here = Path(given).expanduser()
    if not (root / here).exists() and here.exists():
        here = here.absolute()
    elif not (root / here).exists():
        return req
    try:
        real = resolve_corpus_path(root, str(here))
    except UserError as e:
        raise CliError(f"{e} (the corpus root is {root}: set MT_CORPUS_ROOT)", 2) from None
    rel = real.relative_to(root.resolve()).as_posix()
    return msgspec.structs.replace(req, corpus_path=rel)
