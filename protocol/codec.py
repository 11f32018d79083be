"""One encoder; one decoder per stream, built once at import.

Every payload read from a stream is checked before it is decoded (`check_payload`): at most
MAX_PAYLOAD_BYTES long and nested at most MAX_PAYLOAD_DEPTH deep. msgspec decodes nesting
by recursion, so a payload thousands of levels deep raises RecursionError instead of a
DecodeError; a cheap scan of the raw bytes refuses it first, with a DecodeError like every
other bad payload.
"""

from __future__ import annotations

import re

import msgspec

from protocol.commands import ACCEPTS, Base, Command
from protocol.events import AnyEvent
from protocol.keys import COMMAND_ACTORS, ActorName

FIELD = "data"  # the single stream field that holds the msgspec JSON payload

# The largest command is a score request (100,000 characters of text, up to 6 bytes each
# once JSON-escaped); everything else is a few KB.
MAX_PAYLOAD_BYTES = 1024 * 1024
# A chain command nests a handful of levels (command → rest → command → a list field);
# 32 leaves room for growth and stays far below Python's recursion limit.
MAX_PAYLOAD_DEPTH = 32

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENS = bytes.maketrans(b"[]{}", b"()()")

encoder = msgspec.json.Encoder()


def _decoder_for(types: tuple[type[Base], ...]) -> msgspec.json.Decoder[Base]:
    # A union of Struct types is built at runtime from the registry; msgspec checks it here.
    union = types[0]
    for t in types[1:]:
        union = union | t  # type: ignore[assignment]  # runtime union of Struct classes
    return msgspec.json.Decoder(union)


COMMAND_DECODERS: dict[ActorName, msgspec.json.Decoder[Base]] = {
    actor: _decoder_for(ACCEPTS[actor]) for actor in COMMAND_ACTORS
}
any_command_decoder: msgspec.json.Decoder[Command] = msgspec.json.Decoder(Command)
event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def encode(obj: msgspec.Struct) -> bytes:
    return encoder.encode(obj)


def nesting_depth(data: bytes, limit: int = MAX_PAYLOAD_DEPTH) -> int:
    """How deep a decoder would recurse into `data`, counted up to `limit + 1`.

    Strings are dropped (brackets inside them do not nest), the brackets left are made one
    kind, and each pass of `replace` removes exactly the innermost level; what is left when
    no pair is, is unmatched brackets (")))((("), whose opening ones a decoder would still
    descend into before failing. All of it runs in C: a few passes over the brackets."""
    brackets = _STRING.sub(b"", data).translate(_AS_PARENS, _NOT_BRACKET)
    depth = 0
    while depth <= limit:
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            return depth + brackets.count(b"(")
        brackets, depth = shorter, depth + 1
    return depth


def check_payload(data: bytes | str) -> bytes:
    """The payload as bytes, or msgspec.DecodeError when it is too big or too deep."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise msgspec.DecodeError(
            f"payload of {len(raw)} bytes is over the limit of {MAX_PAYLOAD_BYTES} bytes"
        )
    if nesting_depth(raw) > MAX_PAYLOAD_DEPTH:
        raise msgspec.DecodeError(f"payload nested more than {MAX_PAYLOAD_DEPTH} levels deep")
    return raw


def decode_command(actor: ActorName, data: bytes | str) -> Base:
    """Raises msgspec.DecodeError / ValidationError with a message naming the bad field."""
    return COMMAND_DECODERS[actor].decode(check_payload(data))


def decode_event(data: bytes | str) -> AnyEvent:
    return event_decoder.decode(check_payload(data))
