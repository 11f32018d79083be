"""Command-line flags derived from the settings Structs: one flag per field, with the field's
type, bounds, default and doc, so `model-trainer train` and `python -m trainer train` offer
exactly the settings that the HTTP body and the commands have.

Flags that are not given are absent from `given()`, so that a TOML file's values, and after
them the Struct's defaults, stand.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import msgspec
import msgspec.inspect as mi

Fields = Sequence[tuple[str, mi.Field]]  # (flat name, the settings field)
_DEST = "opt_"


def struct_fields(typ: type[msgspec.Struct], *, skip: Iterable[str] = ()) -> Fields:
    info = mi.type_info(typ)
    assert isinstance(info, mi.StructType)
    left_out = set(skip)
    return [(f.name, f) for f in info.fields if f.name not in left_out]


def _plain(t: mi.Type) -> tuple[mi.Type, str]:
    """The type without Optional and Metadata, and the field's description."""
    doc = ""
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1:
            t = rest[0]
    if isinstance(t, mi.Metadata):
        doc = str((t.extra_json_schema or {}).get("description", ""))
        t = t.type
    return t, doc


def _bounds(t: mi.Type) -> str:
    if not isinstance(t, mi.IntType | mi.FloatType):
        return ""
    low = f">={t.ge}" if t.ge is not None else (f">{t.gt}" if t.gt is not None else "")
    high = f"<={t.le}" if t.le is not None else (f"<{t.lt}" if t.lt is not None else "")
    return " ".join(b for b in (low, high) if b)


def add_flags(
    group: argparse._ActionsContainer,
    fields: Fields,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """--model-family, --max-steps, --lowercase/--no-lowercase, … (plus any aliases)."""
    for name, f in fields:
        t, doc = _plain(f.type)
        if isinstance(t, mi.DictType):
            continue  # no flag spelling; settable from a TOML file or code
        flags = ["--" + name.replace("_", "-"), *(aliases or {}).get(name, ())]
        default = f.default if f.default is not msgspec.NODEFAULT else None
        bounds = _bounds(t)
        help_text = "; ".join(x for x in (doc, f"default {default!r}", bounds) if x)
        dest = _DEST + name
        if isinstance(t, mi.BoolType):
            group.add_argument(
                *flags, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif isinstance(t, mi.LiteralType):
            choices = [str(v) for v in t.values]
            group.add_argument(*flags, dest=dest, choices=choices, help=help_text)
        elif isinstance(t, mi.IntType):
            group.add_argument(*flags, dest=dest, type=int, metavar="N", help=help_text)
        elif isinstance(t, mi.FloatType):
            group.add_argument(*flags, dest=dest, type=float, metavar="X", help=help_text)
        elif isinstance(t, mi.ListType):
            group.add_argument(
                *flags, dest=dest, action="append", metavar="TEXT", help=help_text + " (repeat)"
            )
        else:
            group.add_argument(*flags, dest=dest, metavar="TEXT", help=help_text)
    group.set_defaults(**{_DEST + name: None for name, _ in fields})


def given(args: argparse.Namespace, fields: Fields) -> dict[str, object]:
    """The values of the flags that were given, by field name."""
    out: dict[str, object] = {}
    for name, _ in fields:
        value = getattr(args, _DEST + name, None)
        if value is not None:
            out[name] = value
    return out


class FlagError(ValueError):
    """A bad flag value or TOML file; the message names the field."""


def field_message(e: msgspec.ValidationError, what: str) -> str:
    text = str(e)
    if m := re.fullmatch(r"(.*) - at `\$\.([^`]+)`", text, flags=re.S):
        return f"invalid {m[2]}: {m[1]}"
    if m := re.fullmatch(r"Object contains unknown field `([^`]+)`.*", text, flags=re.S):
        return f"unknown field {m[1]!r}: not a field of {what}"
    return f"invalid {what}: {text}"


def load_toml(path: Path, fields: Fields, what: str) -> dict[str, object]:
    """A TOML file's keys (the flat field names; '-' may stand for '_'), checked against
    the fields."""
    import tomllib

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise FlagError(f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise FlagError(f"{path}: not valid TOML: {e}") from None
    values = {k.replace("-", "_"): v for k, v in data.items()}
    known = {name for name, _ in fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlagError(
            f"{path}: unknown key(s) {', '.join(unknown)}; keys are the fields of {what} "
            f"({', '.join(sorted(known))})"
        )
    return values
