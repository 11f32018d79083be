"""The OpenAPI document of the control endpoint, generated from the same msgspec types that
validate its requests, so the published schema and the validation cannot drift apart.

The control endpoint describes each route once (an `Operation`); the same table registers
the route and feeds `build`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from protocol.requests import flat_schema

JsonObject = dict[str, object]
_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")

# What each documented error status means; every error body is the same ErrorBody schema.
ERROR_STATUSES: dict[int, str] = {
    400: "the body is not valid JSON",
    401: "missing or wrong X-Api-Key",
    403: "sent by a browser from a page of another origin",
    404: "no such run, request, session, tokenizer or file",
    405: "method not allowed",
    409: "the run is in the wrong state for this request",
    408: "the request body did not arrive in time",
    413: "request body too large",
    415: "the request body is not sent as application/json",
    422: "a field is missing, unknown or out of range (the error names it)",
    500: "unexpected server error (details are in the server log)",
    502: "the request failed inside the service (system error)",
    503: "Redis unreachable, an actor kind has no live consumer, or every stream slot is taken",
}


@dataclass(frozen=True)
class Param:
    """A query or header parameter; a path parameter only where its schema is not the id's
    (path parameters are read from the path itself)."""

    name: str
    schema: JsonObject
    description: str = ""
    where: Literal["query", "header", "path"] = "query"


@dataclass(frozen=True)
class Reply:
    """One documented answer: a msgspec type, a free-form JSON object, or another media type."""

    status: int
    description: str
    body: type[msgspec.Struct] | None = None
    media: str = "application/json"


@dataclass(frozen=True)
class Operation:
    method: Literal["GET", "POST", "DELETE"]
    path: str
    summary: str
    replies: tuple[Reply, ...]
    body: type[msgspec.Struct] | None = None
    flat_body: bool = False  # a grouped request sent flat (protocol.requests.decode_flat)
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = (401, 404)
    public: bool = False  # no X-Api-Key needed

    @property
    def operation_id(self) -> str:
        words = re.sub(r"[{}]", "", self.path).strip("/").replace("/", "_").replace(".", "_")
        return f"{self.method.lower()}_{words or 'root'}"


def _types(operations: Sequence[Operation], error: type[msgspec.Struct]) -> list[type]:
    seen: list[type] = [error]
    for op in operations:
        candidates = [None if op.flat_body else op.body, *(r.body for r in op.replies)]
        seen.extend(t for t in candidates if t is not None and t not in seen)
    return seen


def _media_schema(reply: Reply, refs: dict[type, JsonObject]) -> JsonObject:
    if reply.body is not None:
        return refs[reply.body]
    if reply.media == "application/json":
        return {"type": "object"}
    return {"type": "string"}


def build(
    operations: Sequence[Operation],
    *,
    title: str,
    version: str,
    error: type[msgspec.Struct],
    id_pattern: str,
    api_key: bool,
) -> JsonObject:
    """An OpenAPI 3.1 document: every path, every request body as a $ref to its schema."""
    types = _types(operations, error)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs: dict[type, JsonObject] = dict(zip(types, schemas, strict=True))
    for op in operations:
        if op.flat_body and op.body is not None and op.body not in refs:
            flat, used = flat_schema(op.body, _REF)
            components.update(used)
            components[op.body.__name__] = flat
            refs[op.body] = {"$ref": _REF.format(name=op.body.__name__)}
    paths: dict[str, JsonObject] = {}
    for op in operations:
        given = {p.name: p for p in op.params}
        parameters: list[JsonObject] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": given[name].schema
                if name in given
                else {"type": "string", "pattern": id_pattern},
            }
            for name in _PATH_PARAM.findall(op.path)
        ]
        parameters += [
            {
                "name": p.name,
                "in": p.where,
                "required": False,
                "schema": p.schema,
                "description": p.description,
            }
            for p in op.params
            if p.where != "path"
        ]
        responses: JsonObject = {
            str(r.status): {
                "description": r.description,
                "content": {r.media: {"schema": _media_schema(r, refs)}},
            }
            for r in op.replies
        }
        for status in sorted(op.errors):
            responses[str(status)] = {
                "description": ERROR_STATUSES[status],
                "content": {"application/json": {"schema": refs[error]}},
            }
        entry: JsonObject = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "parameters": parameters,
            "responses": responses,
        }
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[op.body]}},
            }
        if op.public:
            entry["security"] = []
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    doc: JsonObject = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
                "ApiKeyQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "api_key",
                    "description": "GET requests only (for EventSource)",
                },
            },
        },
    }
    if api_key:
        doc["security"] = [{"ApiKey": []}, {"ApiKeyQuery": []}]
    return doc
