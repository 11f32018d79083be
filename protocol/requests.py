"""Bodies of the control endpoint's POST routes, built from the settings Structs.

POST /runs/train and /tokenizers/train take one flat JSON object, as the Model-Trainer API that
the Discord bot speaks does: the fields of several groups side by side. Here such a body is a
Struct of groups (`TrainRequest.train` is a `TrainSettings`); `decode_flat` hands each group its
keys (a key two groups share, like `seed`, goes to both) and refuses keys no group has, and
`flat_fields` / `flat_schema` list the flat fields for the CLI, the TOML file, OpenAPI and the
dashboard. A few settings have another name on that API (`HTTP_NAMES`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

from protocol.settings import (
    CorpusSettings,
    GenerateSettings,
    OptId,
    PathText,
    SamplingSettings,
    TokenizerSettings,
    TrainSettings,
)

UserId = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=64)]
FileId = Annotated[str, Meta(max_length=128)]
PromptText = Annotated[str, Meta(max_length=20_000)]
ScoreText = Annotated[str, Meta(min_length=1, max_length=100_000)]
ScoreTopK = Annotated[int, Meta(ge=0, le=50)]
ChatMessage = Annotated[str, Meta(min_length=1, max_length=4000)]
Split = Literal["validation", "test"]

# Settings whose name on the Model-Trainer API differs: settings field -> HTTP/CLI/TOML name.
HTTP_NAMES: dict[str, str] = {
    "validation_fraction": "holdout_fraction",
    "test_fraction": "test_split_ratio",
}
_FIELD_OF = {http: name for name, http in HTTP_NAMES.items()}


class CorpusSource(msgspec.Struct, kw_only=True):
    """Where the text comes from: exactly one of corpus_path / corpus_name / corpus_file_id."""

    corpus_path: Annotated[PathText, Meta(description="file or folder under the corpus root")] = ""
    corpus_name: Annotated[Name, Meta(description="a named corpus, e.g. shakespeare")] = ""
    corpus_file_id: Annotated[FileId, Meta(description="a Data Bank file id")] = ""
    user_id: UserId = 0


class ChainOptions(msgspec.Struct, kw_only=True):
    tokenizer_id: Annotated[
        OptId, Meta(description="an existing tokenizer; empty trains a byte-level BPE in the run")
    ] = ""
    upload: Annotated[bool, Meta(description="archive the run at the end")] = True


class TokenizerTrainRequest(msgspec.Struct, kw_only=True):
    """POST /tokenizers/train (flat on the wire)."""

    source: CorpusSource = msgspec.field(default_factory=CorpusSource)
    corpus: CorpusSettings = msgspec.field(default_factory=CorpusSettings)
    tokenizer: TokenizerSettings = msgspec.field(default_factory=TokenizerSettings)


class TrainRequest(msgspec.Struct, kw_only=True):
    """POST /runs/train (flat on the wire). An empty tokenizer_id trains a byte-level BPE
    tokenizer in the run."""

    source: CorpusSource = msgspec.field(default_factory=CorpusSource)
    corpus: CorpusSettings = msgspec.field(default_factory=CorpusSettings)
    tokenizer: TokenizerSettings = msgspec.field(default_factory=TokenizerSettings)
    train: TrainSettings = msgspec.field(default_factory=TrainSettings)
    chain: ChainOptions = msgspec.field(default_factory=ChainOptions)


class EvaluateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    split: Split = "test"
    path: Annotated[PathText, Meta(description="a text file under the corpus root")] = ""
    user_id: UserId = 0


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: ScoreText
    detail: bool = False
    top_k: ScoreTopK = 5
    user_id: UserId = 0


class GenerateRequest(GenerateSettings, kw_only=True, forbid_unknown_fields=True):
    prompt: PromptText = ""
    user_id: UserId = 0


class ChatRequest(SamplingSettings, kw_only=True, forbid_unknown_fields=True):
    message: ChatMessage
    session_id: Annotated[OptId, Meta(description="continue this session; empty starts one")] = ""
    user_id: UserId = 0


class RunCreated(msgspec.Struct, kw_only=True):
    run_id: str
    job_id: str
    corpus_id: str
    tokenizer_id: str
    steps: list[str]


# ------------------------------------------------------------------------------ flat bodies

F = TypeVar("F", bound=msgspec.Struct)
_AT = re.compile(r"`\$\.(\w+)\.(\w+)")


@dataclass(frozen=True)
class FlatField:
    name: str  # the flat (HTTP, CLI, TOML) name
    group: str  # the attribute of the request that holds the group
    info: mi.Field  # the settings field: type with bounds, default, docs


def flat_fields(typ: type[msgspec.Struct]) -> list[FlatField]:
    """The flat fields of a grouped request, in order; a name shared by groups once."""
    out: dict[str, FlatField] = {}
    info = mi.type_info(typ)
    assert isinstance(info, mi.StructType)
    for group in info.fields:
        assert isinstance(group.type, mi.StructType), f"{typ.__name__}.{group.name}"
        for f in group.type.fields:
            name = HTTP_NAMES.get(f.name, f.name)
            out.setdefault(name, FlatField(name, group.name, f))
    return list(out.values())


def _flat_message(message: str) -> str:
    """`... - at `$.train.max_steps`` -> `... - at `$.max_steps``, with the HTTP name."""
    return _AT.sub(lambda m: f"`$.{HTTP_NAMES.get(m[2], m[2])}", message)


def decode_flat(data: bytes | str | Mapping[str, object], typ: type[F]) -> F:
    """A grouped request from its flat form (JSON bytes or a mapping, as a TOML file gives).

    Raises msgspec.DecodeError for bad JSON and msgspec.ValidationError naming the flat field.
    """
    raw = msgspec.json.decode(data) if isinstance(data, bytes | str) else dict(data)
    if not isinstance(raw, dict):
        raise msgspec.ValidationError(f"Expected `object`, got `{type(raw).__name__}`")
    known = {f.name for f in flat_fields(typ)}
    for key in raw:
        if key not in known:
            raise msgspec.ValidationError(f"Object contains unknown field `{key}`")
    values = {_FIELD_OF.get(k, k): v for k, v in raw.items()}
    groups = {f.name: values for f in msgspec.structs.fields(typ)}
    try:
        return msgspec.convert(groups, typ)
    except msgspec.ValidationError as e:
        raise msgspec.ValidationError(_flat_message(str(e))) from None


def encode_flat(req: msgspec.Struct) -> dict[str, object]:
    """The flat form of a grouped request (what decode_flat reads back)."""
    out: dict[str, object] = {}
    for group in msgspec.structs.astuple(req):
        assert isinstance(group, msgspec.Struct)
        for name, value in msgspec.to_builtins(group).items():
            out.setdefault(HTTP_NAMES.get(name, name), value)
    return out


def flat_schema(
    typ: type[msgspec.Struct], ref_template: str
) -> tuple[dict[str, object], dict[str, object]]:
    """The JSON schema of a grouped request's flat form, and the components it refers to."""
    groups = [f.type for f in msgspec.structs.fields(typ)]
    schemas, components = msgspec.json.schema_components(groups, ref_template=ref_template)
    properties: dict[str, object] = {}
    for schema in schemas:
        ref = str(schema["$ref"]).rsplit("/", 1)[-1]
        group = components.pop(ref)
        assert isinstance(group, dict)
        for name, prop in dict(group.get("properties", {})).items():
            properties.setdefault(HTTP_NAMES.get(name, name), prop)
    body: dict[str, object] = {
        "title": typ.__name__,
        "description": (typ.__doc__ or "").strip(),
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    return body, components
