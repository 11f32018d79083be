"""Bodies of the control endpoint's POST routes, built from the settings Structs.

POST /runs/train and /tokenizers/train take one flat JSON object, as the Model-Trainer API that
the Discord bot speaks does: the fields of several groups side by side. Here such a body is a
Struct of groups (`TrainRequest.train` is a `TrainSettings`); `decode_flat` hands each group its
keys (a key two groups share, like `seed`, goes to both) and refuses keys no group has, and
`flat_fields` / `flat_schema` list the flat fields for the CLI, the TOML file, OpenAPI and the
dashboard. A few settings have another name on that API (`HTTP_NAMES`).

Upstream's other clients (the Model-Trainer API's own) are accepted as they are: `null` for
an optional field means its default, and upstream's names are aliases (`ALIASES`: on the
flat bodies documented by `flat_schema`, on the other bodies fields of their own, so that
their schema documents them); `decode_body` / `decode_flat` resolve them. A few fields
upstream sends mean nothing here and are accepted, checked and ignored (`Ignored`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

from protocol.errors import FieldError
from protocol.settings import (
    CorpusSettings,
    GenerateSettings,
    OptId,
    PathText,
    SamplingSettings,
    Seed,
    StopList,
    TokenizerSettings,
    TrainSettings,
    check,
)

UserId = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=64)]
FileId = Annotated[str, Meta(max_length=128)]
MAX_PROMPT_CHARS = 20_000
MAX_SCORE_CHARS = 100_000
PromptText = Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]
ScoreText = Annotated[str, Meta(min_length=1, max_length=MAX_SCORE_CHARS)]
ScoreTopK = Annotated[int, Meta(ge=0, le=50)]
ChatMessage = Annotated[str, Meta(min_length=1, max_length=4000)]
Split = Literal["validation", "test"]

# Settings whose name on the Model-Trainer API differs: settings field -> HTTP/CLI/TOML name.
HTTP_NAMES: dict[str, str] = {
    "validation_fraction": "holdout_fraction",
    "test_fraction": "test_split_ratio",
}
_FIELD_OF = {http: name for name, http in HTTP_NAMES.items()}

# Upstream's name -> ours, where the meaning is the same (upstream's Model-Trainer API).
ALIASES: dict[str, str] = {
    "method": "tokenizer_kind",
    "path_override": "path",
    "prompt_text": "prompt",
    "stop_sequences": "stop",
}
# Fields the request Structs have for upstream's clients only (not flags of the CLI).
UPSTREAM_ONLY = frozenset({*ALIASES, "prompt_path", "detail_level"})
_NULL_MEANS_DEFAULT = "`null` for an optional field means its default."


class Ignored(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields of upstream's train body that mean nothing here: checked, then ignored."""

    data_num_workers: (
        Annotated[
            int,
            Meta(
                ge=0,
                le=256,
                description="upstream's DataLoader workers: accepted and ignored (batches are "
                "cut from tokens already in memory, with no loader processes)",
            ),
        ]
        | None
    ) = None
    data_pin_memory: (
        Annotated[
            bool,
            Meta(description="upstream's DataLoader pin_memory: accepted and ignored (as above)"),
        ]
        | None
    ) = None


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


def _alias(target: str) -> str:
    return f"upstream's name for `{target}`"


class EvaluateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`null` for an optional field means its default."""

    split: Split = "test"
    path: Annotated[PathText, Meta(description="a text file under the corpus root")] = ""
    path_override: Annotated[PathText, Meta(description=_alias("path"))] = ""
    user_id: UserId = 0


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Exactly one of text and path. `null` for an optional field means its default."""

    text: Annotated[str, Meta(max_length=MAX_SCORE_CHARS, description="the text to score")] = ""
    path: Annotated[
        PathText, Meta(description="score this text file under the corpus root instead")
    ] = ""
    detail: bool = False
    detail_level: (
        Annotated[
            Literal["summary", "per_char"],
            Meta(description="upstream's name for detail: per_char = detail true"),
        ]
        | None
    ) = None
    top_k: ScoreTopK = 5
    seed: (
        Annotated[Seed, Meta(description="accepted and ignored: scoring draws nothing at random")]
        | None
    ) = None
    user_id: UserId = 0


class GenerateRequest(GenerateSettings, kw_only=True, forbid_unknown_fields=True):
    """At most one of prompt and prompt_path. `null` for an optional field means its
    default."""

    prompt: PromptText = ""
    prompt_text: Annotated[PromptText, Meta(description=_alias("prompt"))] = ""
    prompt_path: Annotated[
        PathText, Meta(description="a text file under the corpus root whose text is the prompt")
    ] = ""
    stop_sequences: Annotated[StopList, Meta(description=_alias("stop"))] = []
    user_id: UserId = 0


class ChatRequest(SamplingSettings, kw_only=True, forbid_unknown_fields=True):
    """`null` for an optional field means its default."""

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


def _object(data: bytes | str | Mapping[str, object]) -> dict[str, object]:
    raw = msgspec.json.decode(data) if isinstance(data, bytes | str) else dict(data)
    if not isinstance(raw, dict):
        raise msgspec.ValidationError(f"Expected `object`, got `{type(raw).__name__}`")
    return raw


def _resolve(raw: dict[str, object], known: set[str]) -> tuple[dict[str, object], dict[str, str]]:
    """The body without nulls (a default then), upstream's names (ALIASES) as ours, and which
    of ours came under an alias (ours -> the name sent)."""
    values = {k: v for k, v in raw.items() if v is not None}
    sent_as: dict[str, str] = {}
    for alias, ours in ALIASES.items():
        if alias in values and ours in known:
            if ours in values:
                raise msgspec.ValidationError(
                    f"give `{ours}` or upstream's `{alias}`, not both - at `$.{alias}`"
                )
            values[ours] = values.pop(alias)
            sent_as[ours] = alias
    return values, sent_as


def _sent_name(message: str, sent_as: dict[str, str]) -> str:
    """A validation message about a field sent under an alias names the alias."""
    for ours, alias in sent_as.items():
        message = message.replace(f"`$.{ours}`", f"`$.{alias}`").replace(
            f"`$.{ours}[", f"`$.{alias}["
        )
    return message


def decode_body(data: bytes | str, typ: type[F]) -> F:
    """A (non-flat) request body: upstream's aliases resolved, nulls as defaults.

    Raises msgspec.DecodeError for bad JSON and msgspec.ValidationError naming the field.
    """
    raw = _object(data)
    values, sent_as = _resolve(raw, set(typ.__struct_fields__) - set(ALIASES))
    try:
        return msgspec.convert(values, typ)
    except msgspec.ValidationError as e:
        raise msgspec.ValidationError(_sent_name(str(e), sent_as)) from None


def decode_flat(data: bytes | str | Mapping[str, object], typ: type[F]) -> F:
    """A grouped request from its flat form (JSON bytes or a mapping, as a TOML file gives):
    upstream's aliases resolved, nulls as defaults, upstream's ignored fields checked and
    dropped, each group's rules across fields checked (protocol.settings).

    Raises msgspec.DecodeError for bad JSON and msgspec.ValidationError naming the flat field.
    """
    known = {f.name for f in flat_fields(typ)}
    values, sent_as = _resolve(_object(data), known)
    ignored = {k: values.pop(k) for k in Ignored.__struct_fields__ if k in values}
    for key in values:
        if key not in known:
            raise msgspec.ValidationError(f"Object contains unknown field `{key}`")
    values = {_FIELD_OF.get(k, k): v for k, v in values.items()}
    groups = {f.name: values for f in msgspec.structs.fields(typ)}
    try:
        msgspec.convert(ignored, Ignored)
        req = msgspec.convert(groups, typ)
        for group in msgspec.structs.astuple(req):
            assert isinstance(group, msgspec.Struct)
            check(group)
    except msgspec.ValidationError as e:
        raise msgspec.ValidationError(_sent_name(_flat_message(str(e)), sent_as)) from None
    except FieldError as e:
        name = HTTP_NAMES.get(e.field, e.field)
        raise msgspec.ValidationError(f"{e.message} - at `$.{sent_as.get(name, name)}`") from None
    return req


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
    for alias, ours in ALIASES.items():
        if isinstance(prop := properties.get(ours), dict):
            properties[alias] = {**prop, "description": _alias(ours)}
    _, used = msgspec.json.schema_components([Ignored], ref_template=ref_template)
    ignored_props = used.pop(Ignored.__name__)
    assert isinstance(ignored_props, dict)
    properties.update(dict(ignored_props.get("properties", {})))
    components.update(used)
    body: dict[str, object] = {
        "title": typ.__name__,
        "description": f"{(typ.__doc__ or '').strip()} {_NULL_MEANS_DEFAULT}",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    return body, components
